"""benchmarks/accuracy.py's wire-precision helpers: the grid at every wire with the same seeds, differences paired
by seed, and the int8 verdict against issue 19's target."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402


def _run(seed: int, wire: str, metric: float, nodes: int = 2, rho: float = 0.2) -> dict:
    return {"nodes": nodes, "rho": rho, "method": "learned", "seed": seed, "wire": wire, "metric": metric}


def test_every_run_of_the_grid_is_made_at_every_wire_with_the_same_seeds(monkeypatch):
    monkeypatch.setattr(accuracy, "ARGS", argparse.Namespace(
        seeds=2, nodes=[2, 4], rhos=[0.2, 0.0], methods=["learned", "random"], allocation="global",
        allocation_rhos=[0.1], wires=["fp32", "int8", "int4"]), raising=False)
    jobs = accuracy.jobs_for("digits", "model.pt")
    runs = {job[:7] for job in jobs}
    assert len(jobs) == 3 * len(runs)
    assert {job[:7] + (w,) for job in jobs for w in ("fp32", "int8", "int4")} == set(jobs)
    # seed outermost, wire innermost: a run stopped early has whole pairs
    assert [job[7] for job in jobs[:3]] == ["fp32", "int8", "int4"]
    assert {job[6] for job in jobs[:len(jobs) // 2]} == {0}


def test_differences_are_paired_by_seed_and_unpaired_seeds_left_out():
    results = [_run(0, "fp32", 99.0), _run(1, "fp32", 98.0), _run(0, "int8", 98.5), _run(1, "int8", 98.0),
               _run(2, "int8", 90.0), _run(0, "int8", 10.0, nodes=4)]
    assert accuracy.paired(results, "int8", nodes=2, rho=0.2, method="learned") == [-0.5, 0.0]


def test_the_int8_verdict_is_its_mean_paired_difference_against_the_target():
    results = [_run(s, "fp32", 99.0) for s in range(2)] + [_run(0, "int8", 98.8), _run(1, "int8", 98.6)]
    results += [_run(s, "fp32", 99.0, rho=0.1) for s in range(2)] + [_run(0, "int8", 98.8, rho=0.1),
                                                                   _run(1, "int8", 98.4, rho=0.1)]
    rows = accuracy.wire_table(results, [(2, 0.2, "learned"), (2, 0.1, "learned")], ["fp32", "int8"], 0.3)
    assert rows[0].endswith("| int8 − fp32 (paired) | int8 within 0.3 of fp32 |")
    assert rows[2].endswith("| -0.300 ± 0.141 (-0.400–-0.200) | yes |")
    assert rows[3].endswith("| -0.400 ± 0.283 (-0.600–-0.200) | **no** |")
