"""Quality against communication budget on the two bundled tasks -> docs/accuracy.md + docs/accuracy.png.

For each task (digits classification, x4 super-resolution) an original model is trained
once (seed 0), then for N in {2, 4} and rho in {1, 0.5, 0.2, 0.1, 0} the DISCO model is
fine-tuned with the same schedule and steps by each selection method:

  learned    scores from weight magnitudes, trained through the straight-through mask
  magnitude  fixed weight-column magnitude scores (one-shot selection)
  random     a fixed random order
  no comm    rho = 0: nothing exchanged (the same for every method)

each over several seeds (mean, sample standard deviation, min-max), plus the one-shot
selection's quality before any fine-tuning. At rho = 1 every candidate is sent, so the
methods coincide: it is run once per seed. A second table compares the uniform and the
global (cost-aware) allocation. Finally one fine-tuned model per task is exported and run
by run_local on the test set: the metric must match PyTorch's to 0.01.

    python benchmarks/accuracy.py                 # full run (about 30-60 min on 2 cores)
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

from disco_compile import tasks, transform
from disco_compile.data import loader
from disco_compile.distill import Loss
from disco_compile.finetuning import evaluate, finetune

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
    res = finetune(dm, loader(task.train, batch, True, seed), budget=rho, steps=ARGS.steps, method=method,
                   allocation=allocation, lr=ARGS.lr, loss=loss, seed=seed, progress=False)
    return {"task": name, "nodes": nodes, "rho": rho, "method": method, "allocation": allocation, "seed": seed,
            "metric": test_metric(dm, task), "exchange_ratio": res.exchange_ratio, "seconds": time.perf_counter() - t0}


def jobs_for(name: str, path: str) -> list[tuple]:
    out = []
    for nodes, seed in itertools.product(ARGS.nodes, range(ARGS.seeds)):
        for rho in ARGS.rhos:
            for method in (("magnitude",) if rho in (0.0, 1.0) else METHODS):
                out.append((name, path, nodes, rho, method, "uniform", seed))
        if 2 == nodes:
            for rho in ARGS.allocation_rhos:
                for method in ("learned", "magnitude"):
                    out.append((name, path, nodes, rho, method, "global", seed))
    return out


def one_shot(name: str, model) -> list[dict]:
    task, *_ = build_task(name)
    rows = []
    for nodes, rho in itertools.product(ARGS.nodes, ARGS.rhos):
        dm = transform(model, nodes, task.example)
        dm.set_budget(rho)
        rows.append({"task": name, "nodes": nodes, "rho": rho, "metric": test_metric(dm.eval(), task)})
    return rows


def export_check(name: str, model) -> dict:
    """Fine-tune at N=2 rho=0.2 (learned), export, run the test set through run_local."""
    import numpy as np
    from disco_compile import run_local
    from disco_compile.distill import Metric
    from disco_compile.exporter import export
    task, _, loss, batch = build_task(name)
    dm = transform(model, 2, task.example)
    finetune(dm, loader(task.train, batch, True, 0), budget=0.2, steps=ARGS.steps, lr=ARGS.lr, loss=loss,
             progress=False)
    torch_metric = test_metric(dm, task)
    metric = Metric()
    with tempfile.TemporaryDirectory() as tmp:
        export(dm, Path(tmp) / "shards")
        for x, y in loader(task.test, 256, False, 0):
            out = run_local(Path(tmp) / "shards", [x.numpy()])
            metric.add(torch.from_numpy(np.asarray(out[0])), y)
    return {"task": name, "torch": torch_metric, "onnx": metric.value()}


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f} ({min(values):.2f}–{max(values):.2f})"


def write_report(results, shots, originals, checks, elapsed: float, cmd: str) -> None:
    lines = ["# Accuracy against communication budget", "",
             f"Command: `{cmd}`  ",
             f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min on 2 CPU cores "
             f"({ARGS.jobs} runs in parallel, one thread each). Written by `benchmarks/accuracy.py`.", "",
             "Setup (chosen so the task is not trivially easy at rho = 0; see the notes):", "",
             f"- digits: `DigitsNet(width={ARGS.digits_width})`, sklearn digits (1,197 train / 300 test images); "
             f"metric: test accuracy %.",
             f"- super-resolution x4: `SRNet(scale=4, width={ARGS.sr_width})` on 12x12 -> 48x48 crops of "
             f"scikit-image photos (train: {', '.join(tasks.SR_TRAIN)}; test: {', '.join(tasks.SR_TEST)}); "
             f"metric: test PSNR dB.",
             f"- originals trained {ARGS.original_steps} steps (seed 0). Fine-tuning: {ARGS.steps} steps, Adam "
             f"lr {ARGS.lr}, budget annealed from 1 to rho over the first half, distillation from the original "
             f"(KL T=4 on digits, L1 on SR) plus the task loss, BatchNorm re-estimated after hardening. "
             f"{ARGS.seeds} seeds (fine-tuning data order and random scores); cells are mean ± sample std "
             f"(min–max).", ""]
    for name in ARGS.tasks:
        lines += [f"## {name}: original {originals[name]:.2f}", "",
                  "| N | rho | exchange ratio | one-shot, no fine-tuning | learned | magnitude + ft | random + ft |",
                  "|---|---|---|---|---|---|---|"]
        for nodes, rho in itertools.product(ARGS.nodes, ARGS.rhos):
            cell = [r for r in results if r["task"] == name and r["nodes"] == nodes and r["rho"] == rho
                    and r["allocation"] == "uniform"]
            shot = next(s["metric"] for s in shots if s["task"] == name and s["nodes"] == nodes and s["rho"] == rho)
            ratio = statistics.fmean(r["exchange_ratio"] for r in cell) if cell else float("nan")
            by = {m: [r["metric"] for r in cell if r["method"] == m] for m in METHODS}
            if rho in (0.0, 1.0):  # one run per seed stands for every method
                by = {m: by["magnitude"] for m in METHODS}
            label = f"{rho:g}" + (" (no comm)" if rho == 0 else "")
            lines.append(f"| {nodes} | {label} | {ratio:.3f} | {shot:.2f} | " +
                         " | ".join(_fmt(by[m]) for m in METHODS) + " |")
        lines.append("")
    if ARGS.allocation_rhos:
        lines += ["## Allocation: uniform against global (cost-aware), N=2", "",
                  "| task | rho | learned uniform | learned global | magnitude uniform | magnitude global |",
                  "|---|---|---|---|---|---|"]
        for name, rho in itertools.product(ARGS.tasks, ARGS.allocation_rhos):
            cells = []
            for method, alloc in (("learned", "uniform"), ("learned", "global"), ("magnitude", "uniform"),
                                  ("magnitude", "global")):
                cells.append(_fmt([r["metric"] for r in results if r["task"] == name and r["nodes"] == 2
                                   and r["rho"] == rho and r["method"] == method and r["allocation"] == alloc]))
            lines.append(f"| {name} | {rho:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Exported shards reproduce the fine-tuned model (N=2, rho=0.2, learned)", "",
              "| task | PyTorch | ONNX shards via run_local | difference |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['task']} | {c['torch']:.4f} | {c['onnx']:.4f} | {abs(c['torch'] - c['onnx']):.4f} |")
    lines += ["", "![quality against rho](accuracy.png)", ""]
    (ROOT / "docs" / "accuracy.md").write_text("\n".join(lines))


def plot(results, originals) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(ARGS.tasks), len(ARGS.nodes), figsize=(5 * len(ARGS.nodes), 3.6 * len(ARGS.tasks)),
                             squeeze=False)
    for (ti, name), (ni, nodes) in itertools.product(enumerate(ARGS.tasks), enumerate(ARGS.nodes)):
        ax = axes[ti][ni]
        for k, method in enumerate(METHODS):
            xs, means, sds = [], [], []
            for rho in sorted(ARGS.rhos):
                m = "magnitude" if rho in (0.0, 1.0) else method
                vals = [r["metric"] for r in results if r["task"] == name and r["nodes"] == nodes and r["rho"] == rho
                        and r["method"] == m and r["allocation"] == "uniform"]
                if vals:
                    xs.append(rho + (k - 1) * 0.006)
                    means.append(statistics.fmean(vals))
                    sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=method)
        ax.axhline(originals[name], color="grey", linestyle="--", label="original")
        ax.set_title(f"{name}, N={nodes}")
        ax.set_xlabel("budget rho (fraction of dense exchange bytes)")
        ax.set_ylabel("test accuracy %" if name == "digits" else "test PSNR dB")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "accuracy.png", dpi=110)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,sr", help="comma-separated: digits, sr (default both)")
    p.add_argument("--nodes", default="2,4")
    p.add_argument("--rhos", default="1,0.5,0.2,0.1,0")
    p.add_argument("--allocation-rhos", default="0.2,0.1", help="rho values of the allocation comparison ('' = none)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    p.add_argument("--original-steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--digits-width", type=int, default=16)
    p.add_argument("--sr-width", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="fine-tuning runs in parallel (one thread each)")
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, originals 300 steps: a smoke run")
    ARGS = p.parse_args()
    ARGS.tasks = ARGS.tasks.split(",")
    ARGS.nodes = [int(n) for n in ARGS.nodes.split(",")]
    ARGS.rhos = [float(r) for r in ARGS.rhos.split(",")]
    ARGS.allocation_rhos = [float(r) for r in ARGS.allocation_rhos.split(",") if r]
    if ARGS.quick:
        ARGS.seeds, ARGS.steps, ARGS.original_steps = 1, 40, 300
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # other jobs share this machine: one thread avoids oversubscription
    originals, shots, checks, jobs = {}, [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARGS.tasks:
            model = original(name)
            originals[name] = test_metric(model, build_task(name)[0])
            print(f"{name}: original {originals[name]:.3f}", flush=True)
            path = str(Path(tmp) / f"{name}.pt")
            torch.save(model, path)
            shots += one_shot(name, copy.deepcopy(model))
            checks.append(export_check(name, copy.deepcopy(model)))
            print(f"{name}: export check {checks[-1]}", flush=True)
            jobs += jobs_for(name, path)
        results = []
        ctx = mp.get_context("fork")
        with ctx.Pool(ARGS.jobs, initializer=_init, initargs=(ARGS,)) as pool:
            for k, r in enumerate(pool.imap_unordered(one_run, jobs), 1):
                results.append(r)
                print(f"[{k}/{len(jobs)}] {r['task']} N={r['nodes']} rho={r['rho']:g} {r['method']}/{r['allocation']} "
                      f"seed {r['seed']}: {r['metric']:.3f} ({r['seconds']:.1f} s)", flush=True)
    elapsed = time.perf_counter() - t0
    write_report(results, shots, originals, checks, elapsed, cmd)
    plot(results, originals)
    print(f"wrote docs/accuracy.md and docs/accuracy.png in {elapsed / 60:.1f} min")


def _init(args) -> None:
    global ARGS
    ARGS = args


if __name__ == "__main__":
    main()
