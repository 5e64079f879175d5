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

    python benchmarks/accuracy.py --tasks digits --steps 1500 --digits-width 8 --original-steps 1000  # 30 min, 2 jobs
    python benchmarks/accuracy.py --tasks sr --steps 200       # about 30 min
    python benchmarks/accuracy.py --quick         # one seed, few steps: a smoke run
"""
from __future__ import annotations

import argparse
import copy
import itertools
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from disco_compile.budget import tasks
from disco_compile import Budget, transform
from disco_compile.budget.data import loader
from disco_compile.budget.distill import Loss
from disco_compile.budget.finetuning import evaluate, evaluate_bundle, exchange_ratio, finetune
from disco_compile.budget.budget import ALLOCATIONS

import _perfdoc

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("learned", "magnitude", "random")


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
    name, model_path, nodes, rho, method, allocation, seed = job
    torch.set_num_threads(1)
    task, _, loss, batch = build_task(name)
    model = torch.load(model_path, weights_only=False)
    dm = transform(model, nodes, task.example)
    t0 = time.perf_counter()
    res = finetune(dm, loader(task.train, batch, True, seed),
                   budget=Budget(rho, allocation, align=1, compute_weight=0.0), steps=ARGS.steps, method=method,
                   lr=ARGS.lr, loss=loss, seed=seed, progress=False)
    return {"task": name, "nodes": nodes, "rho": rho, "method": method, "allocation": allocation, "seed": seed,
            "metric": test_metric(dm, task), "exchange_ratio": res.exchange_ratio, "seconds": time.perf_counter() - t0}


def jobs_for(name: str, path: str) -> list[tuple]:
    out = []
    other = next(a for a in ALLOCATIONS if a != ARGS.allocation)
    for nodes, seed in itertools.product(ARGS.nodes, range(ARGS.seeds)):
        for rho in ARGS.rhos:
            for method in (("magnitude",) if rho in (0.0, 1.0) else METHODS):
                out.append((name, path, nodes, rho, method, ARGS.allocation, seed))
        if nodes == 2:
            for rho, method in itertools.product(ARGS.allocation_rhos, ("learned", "magnitude")):
                out.append((name, path, nodes, rho, method, other, seed))
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


def export_check(name: str, model) -> dict:
    """Fine-tune at N=2 rho=0.2 (learned), export, run the test set through run_local."""
    from disco_compile import export
    task, _, loss, batch = build_task(name)
    dm = transform(model, 2, task.example)
    finetune(dm, loader(task.train, batch, True, 0), budget=Budget(0.2, align=1, compute_weight=0.0), steps=ARGS.steps,
             lr=ARGS.lr, loss=loss, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        export(dm, Path(tmp) / "shards")
        onnx_metric = evaluate_bundle(Path(tmp) / "shards", loader(task.test, 256, False, 0))[1]
    return {"task": name, "torch": test_metric(dm, task), "onnx": onnx_metric}


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
# sections of docs/accuracy.md in order: digits_n4 is written by hand (a run with other options), compute_weight
# and compute_weight_ARCH by benchmarks/compute_weight.py (one per --arch); a run of this script rewrites the
# sections of its tasks and keeps the others
SECTIONS = ("digits", "digits_n4", "sr", "crepe_tiny", "crepe_full", "crepe_notes", "compute_weight",
            "compute_weight_mobilenet_v2")
CREPE = ("crepe_tiny", "crepe_full")  # benchmarks/crepe_accuracy.py


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f} ({min(values):.2f}–{max(values):.2f})"


def _cell(results, **match) -> list[float]:
    return [r["metric"] for r in results if all(r[k] == v for k, v in match.items())]


def section(name: str, results, shots, original_value: float, check: dict, elapsed: float, cmd: str) -> str:
    task, *_ = build_task(name)
    unit = "test accuracy %" if name == "digits" else "test PSNR dB"
    setup = (f"`DigitsNet(width={ARGS.digits_width})` on sklearn's digits (1,197 train / 300 test images)"
             if name == "digits" else
             f"`SRNet(scale=4, width={ARGS.sr_width})` on 12x12 -> 48x48 crops of scikit-image photos (train: "
             f"{', '.join(tasks.SR_TRAIN)}; test: {', '.join(tasks.SR_TEST)}); KL is replaced by L1")
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
    p.add_argument("--methods", default=",".join(METHODS), help="crepe: selection methods fine-tuned")
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
    ARGS.shot_nodes = [int(n) for n in ARGS.shot_nodes.split(",") if n]
    ARGS.shot_rhos = [float(r) for r in ARGS.shot_rhos.split(",") if r]
    if ARGS.quick:
        ARGS.seeds, ARGS.steps, ARGS.original_steps = 1, 40, 300
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(1)  # other jobs share this machine: one thread avoids oversubscription
    for name in ARGS.tasks:
        if name in CREPE:
            import crepe_accuracy
            text = crepe_accuracy.run(ARGS, name, cmd)
            _perfdoc.write_section(name, text, path=ROOT / "docs" / "accuracy.md", header=HEADER, names=SECTIONS)
            print(text)
            continue
        t0 = time.perf_counter()
        model = original(name)
        original_value = test_metric(model, build_task(name)[0])
        print(f"{name}: original {original_value:.3f}", flush=True)
        shots = one_shot(name, copy.deepcopy(model))
        check = export_check(name, copy.deepcopy(model))
        print(f"{name}: export check {check}", flush=True)
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / f"{name}.pt")
            torch.save(model, path)
            jobs = jobs_for(name, path)
            with mp.get_context("fork").Pool(ARGS.jobs, initializer=_init, initargs=(ARGS,)) as pool:
                for k, r in enumerate(pool.imap_unordered(one_run, jobs), 1):
                    results.append(r)
                    print(f"[{k}/{len(jobs)}] {name} N={r['nodes']} rho={r['rho']:g} {r['method']}/{r['allocation']} "
                          f"seed {r['seed']}: {r['metric']:.3f} ({r['seconds']:.1f} s)", flush=True)
        text = section(name, results, shots, original_value, check, time.perf_counter() - t0, cmd)
        _perfdoc.write_section(name, text, path=ROOT / "docs" / "accuracy.md", header=HEADER, names=SECTIONS)
        plot(name, results, original_value)
        print(text)


def _init(args) -> None:
    global ARGS
    ARGS = args


if __name__ == "__main__":
    main()
