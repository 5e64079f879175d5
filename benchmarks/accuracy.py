"""Quality against communication budget on the two bundled tasks -> docs/accuracy.md, docs/accuracy_<task>.png.

For each task (digits classification, x4 super-resolution) an original model is trained
once (seed 0), then for N in {2, 4} and rho in {1, 0.5, 0.2, 0.1, 0} the DISCO model is
fine-tuned with the same schedule and steps by each selection method:

  learned    a running mean of minus the loss gradient per candidate (straight-through mask)
  magnitude  fixed weight-column magnitude scores (one-shot selection)
  random     a fixed random order
  no comm    rho = 0: nothing exchanged (the same for every method)

each over several seeds (mean, sample standard deviation, min-max), plus the one-shot
selection's quality before any fine-tuning. At rho = 1 every candidate is sent, so the
methods coincide: it is run once per seed. The main table uses finetune's default
allocation (global); a second table compares it with the uniform allocation at N=2. Finally one
fine-tuned model per task is exported and run by run_local on the test set: the metric must match
PyTorch's to 0.01.

Wire precision (`--wires fp32,int8,int4`): every fine-tuned run of the grid is made at each wire precision
(finetune(..., wire=W): fake quantisation with per-channel scales, calibrated then learned), with the same seeds,
so each seed gives a paired difference d_s = metric(W, s) - metric(fp32, s). rho is the fraction of the dense
exchange bytes at the same wire, so every wire keeps the same channels and an int8 message is a quarter of the
fp32 one. Such a run writes the task's wire-precision section (rewritten after every finished run, so a partial
run leaves its numbers) instead of the main one: per cell the metric at each wire and d_s (mean ± sd, min–max),
against issue 19's target for int8 (TARGETS), and one export check at int8: the fine-tuned model exported, the
test set run by run_local, and the shards' outputs compared with the DISCO model's one by one.

    python benchmarks/accuracy.py --tasks digits --steps 1500 --digits-width 8 --original-steps 1000  # 30 min, 2 jobs
    python benchmarks/accuracy.py --tasks sr --steps 200       # about 30 min
    python benchmarks/accuracy.py --quick         # one seed, few steps: a smoke run
    python benchmarks/accuracy.py --tasks sr --steps 200 --original-steps 1000 --rhos 0.2,0.1 \
        --allocation-rhos '' --wires fp32,int8,int4                  # the wire-precision section of sr
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import multiprocessing as mp
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from disco_compile.artifact.wire import WIRES
from disco_compile.budget import tasks
from disco_compile import Budget, transform
from disco_compile.budget.data import loader
from disco_compile.budget.distill import Loss, Metric, is_logits, main_output
from disco_compile.budget.finetuning import evaluate, exchange_ratio, finetune
from disco_compile.budget.budget import ALLOCATIONS

import _perfdoc

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("learned", "magnitude", "random")
# issue 19: after fine-tuning at int8, the metric within this much of the fp32 wire's (points, dB, points)
TARGETS = {"digits": 0.3, "sr": 0.05, "crepe_tiny": 0.5, "crepe_full": 0.5}


def build_task(name: str):
    if name == "digits":
        return tasks.digits(), lambda: tasks.DigitsNet(width=ARGS.digits_width), Loss(), 64
    task = tasks.super_resolution(scale=4)
    return task, lambda: tasks.SRNet(scale=4, width=ARGS.sr_width), Loss(dense="l1"), 32


def original(name: str) -> torch.nn.Module:
    task, make, _, batch = build_task(name)
    torch.manual_seed(0)
    return tasks.train_original(make(), task, ARGS.original_steps, batch_size=batch,
                                lr=3e-3 if name == "digits" else 1e-3)


def test_metric(model, task) -> float:
    return evaluate(model, loader(task.test, 256, False, 0))[1]


def one_run(job: tuple) -> dict:
    name, model_path, nodes, rho, method, allocation, seed, wire = job
    torch.set_num_threads(1)
    task, _, loss, batch = build_task(name)
    model = torch.load(model_path, weights_only=False)
    dm = transform(model, nodes, task.example)
    t0 = time.perf_counter()
    res = finetune(dm, loader(task.train, batch, True, seed),
                   budget=Budget(rho, allocation, align=1, compute_weight=0.0), steps=ARGS.steps, method=method,
                   lr=ARGS.lr, loss=loss, seed=seed, progress=False, wire=wire)
    return {"task": name, "nodes": nodes, "rho": rho, "method": method, "allocation": allocation, "seed": seed,
            "wire": wire, "metric": test_metric(dm, task), "exchange_ratio": res.exchange_ratio,
            "seconds": time.perf_counter() - t0}


def jobs_for(name: str, path: str) -> list[tuple]:
    out = []
    other = next(a for a in ALLOCATIONS if a != ARGS.allocation)
    for seed, nodes in itertools.product(range(ARGS.seeds), ARGS.nodes):  # seed outermost, wire innermost:
        for rho in ARGS.rhos:                                               # a partial run has whole pairs
            for method in (("magnitude",) if rho in (0.0, 1.0) else ARGS.methods):
                out += [(name, path, nodes, rho, method, ARGS.allocation, seed, w) for w in ARGS.wires]
        if nodes == 2:
            for rho, method in itertools.product(ARGS.allocation_rhos, ("learned", "magnitude")):
                out += [(name, path, nodes, rho, method, other, seed, w) for w in ARGS.wires]
    return out


def one_shot(name: str, model) -> list[dict]:
    task, *_ = build_task(name)
    rows = []
    for nodes, rho in itertools.product(ARGS.nodes, ARGS.rhos):
        dm = transform(model, nodes, task.example)
        dm.set_budget(Budget(rho, allocation="uniform", align=1))
        rows.append({"task": name, "nodes": nodes, "rho": rho, "metric": test_metric(dm.eval(), task),
                     "exchange_ratio": exchange_ratio(dm)})
    return rows


def export_check(name: str, model, wire: str = "fp32") -> dict:
    """Fine-tune at N=2 rho=0.2 (learned) at `wire`, export, run the test set through run_local."""
    from disco_compile import export
    task, _, loss, batch = build_task(name)
    dm = transform(model, 2, task.example)
    finetune(dm, loader(task.train, batch, True, 0), budget=Budget(0.2, align=1, compute_weight=0.0), steps=ARGS.steps,
             lr=ARGS.lr, loss=loss, progress=False, wire=wire)
    with tempfile.TemporaryDirectory() as tmp:
        export(dm, Path(tmp) / "shards")
        shards = compare_shards(dm, Path(tmp) / "shards", loader(task.test, 256, False, 0))
    return {"task": name, "wire": wire, **shards}


@torch.no_grad()
def compare_shards(dm, out_dir: Path, data) -> dict:
    """The test set through the DISCO model and through its export (run_local), output by output: both metrics,
    the predictions that differ (classes; for dense outputs every value), the values outside fp32 tolerance
    (rtol 1e-4, atol 1e-5) and the largest difference."""
    from disco_compile.runtime import run_local
    dm.eval()
    ours, theirs = Metric(), Metric()
    differ = outside = values = 0
    largest, classes = 0.0, False
    for x, y in data:
        ref = main_output(dm(x))
        got = torch.from_numpy(run_local(out_dir, [x.numpy()])[0])
        ours.add(ref, y)
        theirs.add(got, y)
        classes = is_logits(ref)
        differ += int((ref.argmax(1) != got.argmax(1)).sum()) if classes else int((ref != got).sum())
        outside += int((~torch.isclose(got, ref, rtol=1e-4, atol=1e-5)).sum())
        values += ref.numel()
        largest = max(largest, float((got - ref).abs().max()))
    return {"torch": ours.value(), "onnx": theirs.value(), "classes": classes, "predictions": ours.count,
            "differ": differ, "outside": outside, "values": values, "max_diff": largest}


HEADER = """\
# Accuracy against communication budget

Written by `benchmarks/accuracy.py`, one section per task (each run rewrites only the sections of the
tasks it ran); the five-seed digits runs below were copied by hand and the compute weight sections (one
per network) are written by `benchmarks/compute_weight.py`. For each task an original model is trained
once (seed 0); for N in {2, 4} and each budget rho the DISCO model is fine-tuned with the same schedule
and steps by each selection method: learned (each candidate's score is a running mean of minus the loss
gradient with respect to its mask entry, from the straight-through mask: finetuning.py), magnitude + ft
(fixed one-shot magnitude scores), random + ft (a fixed random order); rho = 0 sends nothing (no
communication, the same for every method) and at rho = 1 every candidate is sent (the methods coincide;
one run per seed stands for all three). "one-shot" is the magnitude selection before any fine-tuning,
with its exchange ratio (kept / dense exchange bytes). The budget is annealed from 1 to rho over the
first half of the steps, then held; the loss is distillation from the original plus the task loss;
BatchNorm statistics are re-estimated after training. Cells: mean ± sample standard deviation (min–max)
over seeds (data order and random scores). Runs share a 2-core machine with other jobs, one thread each:
times vary, results do not.
"""
TASKS = ("digits", "sr")
# sections of docs/accuracy.md in order: digits_n4, crepe_notes and wire (the wire-precision summary) are written
# by hand, compute_weight and compute_weight_ARCH by benchmarks/compute_weight.py (one per --arch), TASK_wire by a
# run with --wires; a run of this script rewrites the sections of its tasks and keeps the others
SECTIONS = ("digits", "digits_n4", "sr", "crepe_tiny", "crepe_full", "crepe_notes", "compute_weight",
            "compute_weight_mobilenet_v2", "wire", "digits_wire", "sr_wire", "crepe_tiny_wire", "crepe_full_wire")
CREPE = ("crepe_tiny", "crepe_full")  # benchmarks/crepe_accuracy.py


def _fmt(values: list[float], places: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{places}f} ± {sd:.{places}f} ({min(values):.{places}f}–{max(values):.{places}f})"


def _cell(results, **match) -> list[float]:
    return [r["metric"] for r in results if all(r[k] == v for k, v in match.items())]


def paired(results, wire: str, **match) -> list[float]:
    """Per seed that ran at both: the metric at `wire` minus the metric at fp32 (cells chosen by `match`)."""
    cell = [r for r in results if all(r[k] == v for k, v in match.items())]
    base = {r["seed"]: r["metric"] for r in cell if r["wire"] == "fp32"}
    return [r["metric"] - base[r["seed"]] for r in cell if r["wire"] == wire and r["seed"] in base]


def wire_table(results, cells: list[tuple[int, float, str]], wires: list[str], target: float) -> list[str]:
    """Markdown rows, one per (N, rho, method) cell: the metric at each wire, each wire's paired difference from
    fp32, and whether int8's mean difference is within `target` of fp32 (a gain counts as within)."""
    others = [w for w in wires if w != "fp32"]
    lines = ["| N | rho | method | " + " | ".join(wires) + " | " + " | ".join(f"{w} − fp32 (paired)" for w in others)
             + (f" | int8 within {target:g} of fp32 |" if "int8" in others else " |"),
             "|---|---|---|" + "---|" * (len(wires) + len(others) + ("int8" in others))]
    for nodes, rho, method in cells:
        match = {"nodes": nodes, "rho": rho, "method": method}
        row = [_fmt(_cell(results, wire=w, **match), 3) for w in wires]
        diffs = {w: paired(results, w, **match) for w in others}
        row += [_fmt(diffs[w], 3) for w in others]
        if "int8" in others:
            # 1e-9: a difference of two figures such as 98.8 - 99.0 is not exact in binary
            row.append("-" if not diffs["int8"] else "yes" if statistics.fmean(diffs["int8"]) >= -target - 1e-9
                       else "**no**")
        label = "no communication" if rho == 0 else method
        lines.append(f"| {nodes} | {rho:g} | {label} | " + " | ".join(row) + " |")
    return lines


def check_line(check: dict) -> str:
    """What the export check at an integer wire found, in one paragraph."""
    differ = (f"{check['differ']} of {check['predictions']} predicted classes differ" if check["classes"] else
              f"{check['differ']} of {check['values']} output values differ at all")
    return (f"Export at {check['wire']}: the model fine-tuned at N=2, rho=0.2 (learned) at the {check['wire']} wire, "
            f"exported and the test set run through `run_local`: {check['torch']:.4f} in PyTorch, {check['onnx']:.4f} "
            f"from the shards (difference {abs(check['torch'] - check['onnx']):.4f}); {differ}; {check['outside']} of "
            f"{check['values']} output values lie outside fp32 tolerance (rtol 1e-4, atol 1e-5), "
            f"the largest difference {check['max_diff']:.3g} (where the shards' division lands on the other side of a "
            f"rounding tie, a sent value moves by one quantisation step: ops/wire.py).")


def section(name: str, results, shots, original_value: float, check: dict, elapsed: float, cmd: str) -> str:
    task, *_ = build_task(name)
    unit = "test accuracy %" if name == "digits" else "test PSNR dB"
    setup = setup_line(name)
    lines = [f"## {task.name}", "",
             f"Command: `{cmd}`  ",
             f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min.  ",
             f"Model: {setup}; original trained {ARGS.original_steps} steps: **{unit} {original_value:.3f}**. "
             f"Fine-tuning: {ARGS.steps} steps, Adam lr {ARGS.lr}, {ARGS.seeds} seeds.", "",
             "| N | rho | one-shot: exchange ratio | one-shot, no fine-tuning | learned | magnitude + ft | "
             "random + ft |", "|---|---|---|---|---|---|---|"]
    for nodes, rho in itertools.product(ARGS.nodes, ARGS.rhos):
        shot = next(x for x in shots if x["nodes"] == nodes and x["rho"] == rho)
        by = {m: _cell(results, nodes=nodes, rho=rho, method=m, allocation=ARGS.allocation) for m in METHODS}
        if rho in (0.0, 1.0):
            by = {m: by["magnitude"] for m in METHODS}
        label = f"{rho:g}" + (" (no comm)" if rho == 0 else "")
        lines.append(f"| {nodes} | {label} | {shot['exchange_ratio']:.3f} | {shot['metric']:.3f} | " +
                     " | ".join(_fmt(by[m]) for m in METHODS) + " |")
    if ARGS.allocation_rhos:
        lines += ["", f"The table above uses the {ARGS.allocation} allocation. Allocation, N=2: uniform (every "
                      "exchange and link cut by rho) against global (channels ranked by score per byte over the whole "
                      "model):", "",
                  "| rho | learned uniform | learned global | magnitude uniform | magnitude global |",
                  "|---|---|---|---|---|"]
        for rho in ARGS.allocation_rhos:
            lines.append(f"| {rho:g} | " + " | ".join(
                _fmt(_cell(results, nodes=2, rho=rho, method=m, allocation=a))
                for m, a in (("learned", "uniform"), ("learned", "global"), ("magnitude", "uniform"),
                             ("magnitude", "global"))) + " |")
    lines += ["", f"Export: the model fine-tuned at N=2, rho=0.2 (learned) gives {check['torch']:.4f} in PyTorch and "
                  f"{check['onnx']:.4f} as ONNX shards run by `run_local` (difference "
                  f"{abs(check['torch'] - check['onnx']):.4f}; goal at most 0.01).", "",
              f"![{task.name}: quality against rho](accuracy_{name}.png)", ""]
    return "\n".join(lines)


def setup_line(name: str) -> str:
    return (f"`DigitsNet(width={ARGS.digits_width})` on sklearn's digits (1,197 train / 300 test images)"
            if name == "digits" else
            f"`SRNet(scale=4, width={ARGS.sr_width})` on 12x12 -> 48x48 crops of scikit-image photos (train: "
            f"{', '.join(tasks.SR_TRAIN)}; test: {', '.join(tasks.SR_TEST)}); KL is replaced by L1")


def wire_section(name: str, results, total: int, original_value: float, check: dict | None, elapsed: float,
                 cmd: str) -> str:
    """The task's wire-precision section from the runs finished so far (`total` in the whole grid)."""
    task, *_ = build_task(name)
    unit = "test accuracy %" if name == "digits" else "test PSNR dB"
    cells = [(n, rho, m) for n, rho in itertools.product(ARGS.nodes, ARGS.rhos)
             for m in (("magnitude",) if rho in (0.0, 1.0) else ARGS.methods)]
    lines = [f"## {task.name}: wire precision", "",
             f"Command: `{cmd}`  ",
             f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min, {len(results)} of "
             f"{total} fine-tuning runs finished; machine: {_perfdoc.machine()}, load average {_perfdoc.load()} "
             f"(other jobs), one thread per run, {ARGS.jobs} at a time.  ",
             f"Model: {setup_line(name)}; original trained {ARGS.original_steps} steps: **{unit} "
             f"{original_value:.3f}**. Fine-tuning: {ARGS.steps} steps, Adam lr {ARGS.lr}, {ARGS.allocation} "
             f"allocation, align 1, compute weight 0, seeds 0-{ARGS.seeds - 1}, every seed at every wire (the "
             f"same data order and scores); cells: {unit}, mean ± sd (min–max) over seeds; differences paired by "
             f"seed.", "",
             *wire_table(results, cells, ARGS.wires, TARGETS[name]), ""]
    if check is not None:
        lines += [check_line(check), ""]
    return "\n".join(lines)


def crepe_wire_section(name: str, results, total: int, orig: dict, elapsed: float, cmd: str) -> str:
    """The wire-precision section of CREPE `name` (crepe_accuracy.wire_grid's runs finished so far)."""
    cells = [(n, rho, m) for n, rho in itertools.product(ARGS.nodes, ARGS.rhos)
             for m in (("magnitude",) if rho == 0 else ARGS.methods)]
    return "\n".join([
        f"## CREPE {name.split('_', 1)[1]}: wire precision", "",
        f"Command: `{cmd}`  ",
        f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min, {len(results)} of {total} "
        f"fine-tuning runs finished; machine: {_perfdoc.machine()}, load average {_perfdoc.load()} (other jobs), one "
        f"thread per run, {ARGS.jobs} at a time.  ",
        f"Model and data as in the CREPE section above ({ARGS.crepe_train} training, {ARGS.crepe_test} test frames); "
        f"original rpa50 **{orig['rpa50']:.2f} %**. Fine-tuning: {ARGS.steps} steps of distillation (batch "
        f"{ARGS.crepe_batch}), Budget(rho, wire) (global, align 8, compute weight 0.004), seeds 0-{ARGS.seeds - 1} at "
        f"every wire; cells: rpa50 %, mean ± sd (min–max) over seeds, differences paired by seed.", "",
        *wire_table(results, cells, ARGS.wires, TARGETS[name]), ""])


def plot(name: str, results, original_value: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ARGS.nodes), figsize=(5 * len(ARGS.nodes), 3.6), squeeze=False)
    for ni, nodes in enumerate(ARGS.nodes):
        ax = axes[0][ni]
        for k, method in enumerate(METHODS):
            xs, means, sds = [], [], []
            for rho in sorted(ARGS.rhos):
                vals = _cell(results, nodes=nodes, rho=rho, allocation=ARGS.allocation,
                             method="magnitude" if rho in (0.0, 1.0) else method)
                if vals:
                    xs.append(rho + (k - 1) * 0.006)
                    means.append(statistics.fmean(vals))
                    sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=method)
        ax.axhline(original_value, color="grey", linestyle="--", label="original")
        ax.set_title(f"{name}, N={nodes}")
        ax.set_xlabel("budget rho (fraction of dense exchange bytes)")
        ax.set_ylabel("test accuracy %" if name == "digits" else "test PSNR dB")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / f"accuracy_{name}.png", dpi=110)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,sr", help="comma-separated: digits, sr, crepe_tiny, crepe_full "
                   "(default digits,sr)")
    p.add_argument("--nodes", default="2,4")
    p.add_argument("--rhos", default="1,0.5,0.2,0.1,0")
    p.add_argument("--allocation-rhos", default="0.2,0.1", help="rho values of the allocation comparison ('' = none)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--allocation", choices=ALLOCATIONS, default="global", help="allocation of the main table")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    p.add_argument("--original-steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--digits-width", type=int, default=16)
    p.add_argument("--sr-width", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="fine-tuning runs in parallel (one thread each)")
    p.add_argument("--methods", default=",".join(METHODS), help="selection methods fine-tuned (default all three)")
    p.add_argument("--wires", default="fp32", help="comma-separated wire precisions, every fine-tuned run at each "
                   f"({', '.join(WIRES)}; default fp32); more than fp32 writes the wire-precision sections")
    p.add_argument("--shot-nodes", default="2,3,4", help="crepe: N of the one-shot table")
    p.add_argument("--shot-rhos", default="0.5,0.2,0.1", help="crepe: rho of the one-shot table")
    p.add_argument("--crepe-train", type=int, default=2048, help="crepe: synthetic training frames")
    p.add_argument("--crepe-test", type=int, default=500, help="crepe: synthetic test frames")
    p.add_argument("--crepe-batch", type=int, default=32, help="crepe: fine-tuning batch size")
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, originals 300 steps: a smoke run")
    ARGS = p.parse_args()
    ARGS.tasks = ARGS.tasks.split(",")
    ARGS.nodes = [int(n) for n in ARGS.nodes.split(",")]
    ARGS.rhos = [float(r) for r in ARGS.rhos.split(",")]
    ARGS.allocation_rhos = [float(r) for r in ARGS.allocation_rhos.split(",") if r]
    ARGS.methods = ARGS.methods.split(",")
    ARGS.wires = ARGS.wires.split(",")
    if unknown := [w for w in ARGS.wires + ARGS.methods if w not in WIRES + METHODS]:
        p.error(f"unknown wire or method {', '.join(unknown)}: wires are {', '.join(WIRES)}, methods "
                f"{', '.join(METHODS)}")
    ARGS.shot_nodes = [int(n) for n in ARGS.shot_nodes.split(",") if n]
    ARGS.shot_rhos = [float(r) for r in ARGS.shot_rhos.split(",") if r]
    if ARGS.quick:
        ARGS.seeds, ARGS.steps, ARGS.original_steps = 1, 40, 300
    cmd = "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:])
    torch.set_num_threads(1)  # other jobs share this machine: one thread avoids oversubscription
    wires = ARGS.wires != ["fp32"]
    for name in ARGS.tasks:
        if name in CREPE:
            import crepe_accuracy
            if wires:
                t0 = time.perf_counter()
                crepe_accuracy.wire_grid(ARGS, name, functools.partial(_publish_crepe_wire, name, t0, cmd))
            else:
                publish(name, crepe_accuracy.run(ARGS, name, cmd))
            continue
        if wires:
            run_wires(name, cmd)
            continue
        t0 = time.perf_counter()
        model = original(name)
        original_value = test_metric(model, build_task(name)[0])
        print(f"{name}: original {original_value:.3f}", flush=True)
        shots = one_shot(name, copy.deepcopy(model))
        check = export_check(name, copy.deepcopy(model))
        print(f"{name}: export check {check}", flush=True)
        results = grid(name, model)
        text = section(name, results, shots, original_value, check, time.perf_counter() - t0, cmd)
        publish(name, text)
        plot(name, results, original_value)


def publish(name: str, text: str) -> None:
    """Section `name` of docs/accuracy.md := text (the other sections kept); printed too."""
    _perfdoc.write_section(name, text, path=ROOT / "docs" / "accuracy.md", header=HEADER, names=SECTIONS)
    print(text, flush=True)


def _publish_crepe_wire(name: str, t0: float, cmd: str, results, total: int, orig: dict) -> None:
    publish(f"{name}_wire", crepe_wire_section(name, results, total, orig, time.perf_counter() - t0, cmd))


def grid(name: str, model, done: Callable[[list[dict], int], None] | None = None) -> list[dict]:
    """Every fine-tuning run of jobs_for, ARGS.jobs at a time; `done(results so far, total)` after each."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"{name}.pt")
        torch.save(model, path)
        jobs = jobs_for(name, path)
        with mp.get_context("fork").Pool(ARGS.jobs, initializer=_init, initargs=(ARGS,)) as pool:
            for k, r in enumerate(pool.imap_unordered(one_run, jobs), 1):
                results.append(r)
                print(f"[{k}/{len(jobs)}] {name} N={r['nodes']} rho={r['rho']:g} {r['method']}/{r['allocation']} "
                      f"{r['wire']} seed {r['seed']}: {r['metric']:.3f} ({r['seconds']:.1f} s)", flush=True)
                if done is not None:
                    done(results, len(jobs))
    return results


def run_wires(name: str, cmd: str) -> None:
    """The wire-precision section of task `name`: the export check at int8, then the grid at every wire, the
    section rewritten after each run."""
    t0 = time.perf_counter()
    model = original(name)
    original_value = test_metric(model, build_task(name)[0])
    print(f"{name}: original {original_value:.3f}", flush=True)
    check = export_check(name, copy.deepcopy(model), "int8") if "int8" in ARGS.wires else None
    print(f"{name}: export check {check}", flush=True)
    grid(name, model, lambda results, total: publish(f"{name}_wire", wire_section(
        name, results, total, original_value, check, time.perf_counter() - t0, cmd)))


def _init(args) -> None:
    global ARGS
    ARGS = args


if __name__ == "__main__":
    main()
