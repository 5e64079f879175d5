"""Quality and compute at compute weights of the global allocation -> the compute_weight section of docs/accuracy.md.

The global allocation ranks candidate channels by score per (bytes + W x MACs at the receiver)
(selection.py; W = 0: bytes alone). W keeps the budget's bytes and moves them to channels that
cost the receiver fewer MACs. This measures what that does to quality on a network where it moves
many channels: a torchvision ResNet (default resnet50, random initialisation, 10 classes) trained
on the digits task with its 8x8 images resized to 32x32 and repeated over 3 channels (train 1197,
test 300 images). Which channels the ranking keeps does not depend on the input size: a channel's
bytes and its MACs both scale with the positions, so the choice here is the one made at 224x224.

For each W: the busier node's MACs / the whole model's, how many exchanges send, test accuracy of
the one-shot selection (set_budget) and after fine-tuning (finetune: learned scores, distillation
from the original plus the labels' cross-entropy, the budget annealed over the first half), over
--seeds seeds (data order). N=2, rho=0.2, align 8.

    python benchmarks/compute_weight.py                       # resnet50, W 0 and 0.1, 2 seeds: ~40 min
    python benchmarks/compute_weight.py --arch mobilenet_v2 --weights 0,0.004,0.1 --seeds 3

Writes the compute_weight section of docs/accuracy.md (resnet50) or compute_weight_ARCH (other archs, each
listed in benchmarks/accuracy.py's SECTIONS).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import TensorDataset

from disco_compile.budget import tasks
from disco_compile import Budget, transform
from disco_compile.budget.data import loader
from disco_compile.budget.finetuning import evaluate, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _perfdoc  # noqa: E402
from accuracy import HEADER, SECTIONS  # noqa: E402

SIDE = 32


def digits_rgb() -> tasks.Task:
    d = tasks.digits()

    def resized(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        x = F.interpolate(x, size=SIDE, mode="bilinear", align_corners=False)
        return TensorDataset(x.expand(-1, 3, -1, -1).contiguous(), y)
    return tasks.Task(f"digits {SIDE}x{SIDE} RGB", resized(d.train), resized(d.val), resized(d.test), "accuracy %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="torchvision classification model (default resnet50)")
    p.add_argument("--weights", default="0,0.1", help="compute weights W, bytes per MAC (default 0,0.1)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=80, help="fine-tuning steps per run (default 80)")
    p.add_argument("--original-steps", type=int, default=200, help="training steps of the original (default 200)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/accuracy.md alone")
    args = p.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    section = "compute_weight" if args.arch == "resnet50" else f"compute_weight_{args.arch}"
    if not args.no_write and section not in SECTIONS:
        p.error(f"docs/accuracy.md has no section for --arch {args.arch}: add {section!r} to SECTIONS in "
                f"benchmarks/accuracy.py, or pass --no-write")
    cmd = _perfdoc.command()
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    task = digits_rgb()
    test = loader(task.test, 300, shuffle=False, seed=0)
    torch.manual_seed(0)
    model = tasks.train_original(torchvision.models.get_model(args.arch, num_classes=10), task,
                                 args.original_steps, lr=1e-3)
    original = evaluate(model, test)[1]
    print(f"original {args.arch}: {original:.1f} % ({time.perf_counter() - t_start:.0f} s)", flush=True)
    rows = []
    for w in weights:
        dm = transform(model, 2, task.example)
        dm.set_budget(Budget(args.budget, "global", align=8, compute_weight=w))
        cost = dm.cost()
        row = {"w": w, "macs": max(cost.macs_per_node) / cost.original_macs, "ratio": cost.exchange_ratio,
               "sending": sum(bool(ex.keep[ex.remote].any()) for ex in dm.exchanges.values()),
               "exchanges": len(dm.exchanges), "one_shot": evaluate(dm, test)[1], "tuned": []}
        for seed in range(args.seeds):
            dm = transform(model, 2, task.example)
            finetune(dm, loader(task.train, 64, shuffle=True, seed=seed),
                     budget=Budget(args.budget, align=8, compute_weight=w), steps=args.steps, seed=seed, progress=False)
            row["tuned"].append(evaluate(dm, test)[1])
            print(f"W={w:g} seed {seed}: {row['tuned'][-1]:.1f} % ({time.perf_counter() - t_start:.0f} s)", flush=True)
        rows.append(row)
    lines = [f"## Compute weight: {args.arch} on digits {SIDE}x{SIDE}, N=2, rho={args.budget:g}", "",
             f"Command: `{cmd}`  ",
             f"Run: {_perfdoc.today()}; machine: {_perfdoc.machine()}; torch {torch.__version__}, 2 threads; "
             f"{(time.perf_counter() - t_start) / 60:.0f} min.  ",
             f"Original: torchvision {args.arch} (10 classes) trained {args.original_steps} steps on the digits "
             f"resized to {SIDE}x{SIDE} (3 channels): **{original:.1f} %** test accuracy (300 images). Each row: "
             f"`set_budget(Budget({args.budget:g}, \"global\", align=8, compute_weight=W))` for the one-shot column "
             f"and `finetune(..., budget=Budget({args.budget:g}, align=8, compute_weight=W), steps={args.steps})` "
             f"(learned scores) for the fine-tuned one, {args.seeds} seeds (mean, then each).", "",
             "| compute weight W | MACs, busier node / model | exchange ratio | exchanges sending | one-shot % | "
             "fine-tuned % |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['w']:g} | {r['macs']:.3f} | {r['ratio']:.3f} | {r['sending']} of {r['exchanges']} | "
                     f"{r['one_shot']:.1f} | {statistics.fmean(r['tuned']):.2f} "
                     f"({', '.join(f'{a:.1f}' for a in r['tuned'])}) |")
    lines += ["", "W prices the multiply-accumulates a received channel costs its destination in link bytes "
              "(`--compute-weight`); the exchange ratio is the same at every W. The speed it buys is in "
              "docs/performance.md (node compute, export options) and docs/latency.md (disco_cw)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        _perfdoc.write_section(section, text, path=_perfdoc.ROOT / "docs" / "accuracy.md", header=HEADER,
                               names=SECTIONS)


if __name__ == "__main__":
    main()
