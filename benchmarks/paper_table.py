"""ResNet-50 on 2 nodes at communication budget rho=0.2: the cost figures that
arXiv 2302.11180 headlines (5x less communication, about half the computation
and memory per node), from DiscoModel.cost() after the one-shot selection
(set_budget). Prints the table and writes docs/paper_table.md.

Run: python benchmarks/paper_table.py [--size 224] [--nodes 2]
Weights are random (BatchNorm-calibrated); the cost figures depend only on the
architecture and the selection, and the selection on weight-column norms.
"""
from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from disco_compile import Budget, transform
from disco_compile.frontend import zoo

TARGETS = [  # (figure, limit, how the issue states it)
    ("exchange ratio", (0.19, 0.21), "0.2 +- 0.01"),
    ("comm ratio (io included)", (None, 0.22), "<= 0.22"),
    ("MACs, all nodes / original", (None, 0.62), "<= 0.62"),
    ("MACs, largest node / original", (None, 0.31), "<= 0.31"),
    ("params, largest node / original", (None, 0.31), "<= 0.31"),
]


def figures(report) -> list[float]:
    return [report.exchange_ratio, report.comm_ratio, report.macs_ratio,
            max(report.macs_per_node) / report.original_macs, max(report.params_per_node) / report.original_params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input side length (default 224)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "paper_table.md")
    args = parser.parse_args()

    model, x = zoo.build("resnet50", size=args.size)
    dm = transform(model, args.nodes, x)
    rows = []
    for rho in (1.0, 0.5, 0.2, 0.1, 0.0):
        dm.set_budget(Budget(rho, allocation="uniform", align=1))
        rows.append((rho, dm.cost()))
    headline = dict(rows)[0.2]

    lines = [f"# ResNet-50, N={args.nodes}: cost against the budget", "",
             f"Command: `python benchmarks/paper_table.py --size {args.size} --nodes {args.nodes}`  ",
             f"Run: {datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}; "
             f"input 1x3x{args.size}x{args.size}, "
             "fp32, per sample. Selection: one-shot weight-column norms (`set_budget`).", "",
             "| rho | exchange MB | dense exchange MB | io MB | exchange ratio | comm ratio | MACs all/orig "
             "| MACs max node/orig | params max node/orig |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rho, c in rows:
        f = figures(c)
        lines.append(f"| {rho} | {c.exchange_bytes / 1e6:.2f} | {c.dense_exchange_bytes / 1e6:.2f} | "
                     f"{c.io_bytes / 1e6:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in f) + " |")
    lines += ["", "## Targets at rho=0.2 (issue: the paper's headline figures)", "",
              "| figure | measured | target | met |", "|---|---|---|---|"]
    for (name, (lo, hi), text), value in zip(TARGETS, figures(headline), strict=True):
        ok = (lo is None or value >= lo) and value <= hi
        lines.append(f"| {name} | {value:.3f} | {text} | {'yes' if ok else 'NO'} |")
    lines += ["", "Full report at rho=0.2:", "", "```", headline.table(), "```", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
