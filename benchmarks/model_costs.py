"""Communication, MACs and parameters per node from `cost()` for a CNN and two transformers.

For each model (default: resnet50, vit_b_16, swin_t at 1x3x224x224) at N nodes and budget rho
(default N=2, rho=0.2, the one-shot magnitude selection of `set_budget`, with each allocation:
uniform, and global as disco-compile's default; align 8 as disco-compile's default): bytes exchanged per
inference (gated exchanges, ungated statistics such as LayerNorm's partial sums, input and output
transfers) beside the dense split's, and each node's MACs and parameters beside the original
model's. Counted, not timed: the figures do not depend on the machine or its load. Writes the
model_costs section of docs/performance.md.

    python benchmarks/model_costs.py [--models resnet50,vit_b_16,swin_t] [--nodes 2] [--budget 0.2]
"""
from __future__ import annotations

import argparse
import time

import torch

import _perfdoc
from disco_compile import Budget, transform
from disco_compile.frontend import zoo
from disco_compile.backend.harden import harden


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


ALLOCATIONS = ("uniform", "global")


def measure(name: str, size: int, nodes: int, budget: float) -> list[dict]:
    """One row per allocation."""
    model, x = zoo.build(name, size)
    start = time.perf_counter()
    dm = transform(model, nodes, x)
    rows = []
    for allocation in ALLOCATIONS:
        dm.set_budget(Budget(budget, allocation, align=8, compute_weight=0.0))
        messages, _ = harden(dm)
        sending = sum(1 for ms in messages.values() if any(m.channels for m in ms))
        rows.append({"name": name, "size": size, "allocation": allocation, "report": dm.cost(),
                     "sending": sending, "exchanges": len(dm.exchanges), "seconds": time.perf_counter() - start})
    return rows


def section(rows: list[dict], nodes: int, budget: float) -> str:
    lines = [f"## Cost per node: N={nodes}, rho={budget} (one-shot selection, align 8)", "",
             f"Command: `{_perfdoc.command()}`  ",
             f"Run: {_perfdoc.today()}; torch {torch.__version__}. Counted by `DiscoModel.cost()`, batch 1, random "
             f"weights (`disco_compile.frontend.zoo.build`); exchange = gated channel messages plus ungated statistics "
             f"(LayerNorm's per-token partial sums; the ungated part in brackets); io = the input sent from node 0 "
             f"and the outputs gathered on it; ratios are against the dense split (every gate on). allocation: "
             f"uniform keeps rho of every exchange; global (disco-compile's default) ranks the channels over the "
             f"whole model by weight magnitude per byte; exchanges sending: how many of the model's exchanges "
             f"send anything (the others make no node wait).", "",
             "| model | input | allocation | exchanges sending | exchange MB (ungated) | ratio | comm MB incl. io | "
             "ratio | MACs per node (G) | / original | params per node (M) | / original | replicated ops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["report"]
        lines.append(
            f"| {r['name']} | {r['size']}×{r['size']} | {r['allocation']} | {r['sending']} of {r['exchanges']} | "
            f"{_mb(c.exchange_bytes)} ({_mb(c.fixed_exchange_bytes)}) | "
            f"{c.exchange_ratio:.3f} | {_mb(c.comm_bytes)} | {c.comm_ratio:.3f} | "
            + ", ".join(f"{m / 1e9:.2f}" for m in c.macs_per_node) + " | "
            + ", ".join(f"{m / c.original_macs:.3f}" for m in c.macs_per_node) + " | "
            + ", ".join(f"{p / 1e6:.1f}" for p in c.params_per_node) + " | "
            + ", ".join(f"{p / c.original_params:.3f}" for p in c.params_per_node) + f" | {len(c.replicated_ops)} |")
    lines += ["", "Original models: " + "; ".join(
        f"{r['name']} {r['report'].original_macs / 1e9:.2f} GMACs, {r['report'].original_params / 1e6:.1f} M "
        f"parameters" for r in rows if r["allocation"] == ALLOCATIONS[0]) + ".", "",
        "Global allocation spends the byte budget where a channel costs fewest bytes: late layers, whose maps are "
        "small but whose weights are many, so the receiving node computes and holds more for the same bytes; "
        "fewer exchanges send, so fewer layers wait for messages (docs/latency.md, docs/performance.md).", "",
        "The transformers' ungated statistics (every LayerNorm over split channels exchanges two values per "
        "token) are a fixed cost the budget does not reduce, so their exchange ratio stays above rho. "
        "Parameters per node count the weights a node holds after slicing (its rows, the columns it keeps). "
        "MACs count Conv and Linear layers; the attention cores' q k^T and a v products (split by heads, no "
        "exchange, each node doing its own heads' share) are not counted on either side.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vit_b_16,swin_t")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--no-write", action="store_true", help="print the section, do not write docs/performance.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        rows += measure(name.strip(), args.size, args.nodes, args.budget)
        print(f"{name}: {rows[-1]['seconds']:.0f} s")
    _perfdoc.publish("model_costs", section(rows, args.nodes, args.budget), write=not args.no_write)


if __name__ == "__main__":
    main()
