"""The planner's predictions against netbench's measurements: issue 19's "the planner's prediction within 15% of
the measured latency for every configuration netbench runs".

Reads a netbench run (WORK/MODEL_SIZE/results.json: its model, size, node counts, speeds, links and measured
medians), then makes and times the planner's exports once (`budget/plan.measure`: one-shot selection at each
budget, compute weight 0 as netbench's workloads, fp32 exports, stages and the whole model timed here with one
onnxruntime thread) and predicts every configuration netbench ran (`predict`, the workload's budget and
wire, node speed = the slowdown netbench measured for that speed, the link's nominal rate, 0.1 ms a message as
`disco-compile plan`). Prints and writes docs/plan_check.md: predicted / measured per configuration, and the
whole model on one node beside them.

Run on an idle machine, after the netbench run it reads (the planner times this machine as netbench did):
    .venv/bin/python benchmarks/plan_check.py --work /tmp/netbench19 [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _perfdoc  # noqa: E402

from disco_compile.budget import plan as planner  # noqa: E402
from disco_compile.frontend import zoo  # noqa: E402
from disco_compile.runtime.estimate import parse_rate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plan_check.md"
SECTION = "plan_check"
HEADER = ("# The planner's predictions against measured latency\n\n"
          "Written by `benchmarks/plan_check.py` (the planner: docs/plan.md).\n")
TOLERANCE = 0.15  # the issue's: within 15% of the measured latency
# netbench workload -> (budget, wire, overlap) (netbench.py EXPORTS, compute weight 0 for all of these)
WORKLOADS = {"dense": (1.0, "fp32", True), "disco": (0.2, "fp32", True), "disco_int8": (0.2, "int8", True),
             "disco_int4": (0.2, "int4", True), "disco_r0.1_int8": (0.1, "int8", True),
             "dense_no_overlap": (1.0, "fp32", False), "disco_no_overlap": (0.2, "fp32", False),
             "disco_int8_no_overlap": (0.2, "int8", False), "disco_int4_no_overlap": (0.2, "int4", False),
             "disco_r0.1_int8_no_overlap": (0.1, "int8", False)}


def runs(results: dict) -> dict[tuple[str, int, str, str], float]:
    """(speed, nodes, workload, link) -> measured median latency, seconds, for the workloads above and whole."""
    out = {}
    for key, r in results["runs"].items():
        speed, n, wl, link = key.split("/")
        if wl in WORKLOADS or wl == "whole":
            out[(speed, int(n[1:]), wl, link)] = statistics.median(r["lat"])
    return out


def factor(results: dict, speed: str) -> float:
    """The slowdown netbench measured for `speed` (1 for this machine's)."""
    return 1.0 if speed == "1" else results["calibration"][speed]["factor"]


def rate(link: str) -> float | None:
    return parse_rate("none" if link.partition("@")[0] == "unshaped" else link.partition("@")[0])


def rows(results: dict, timed: planner.Timed) -> list[dict]:
    measured = runs(results)
    out = []
    for (speed, n, wl, link), got in sorted(measured.items()):
        if wl == "whole":
            continue
        budget, wire, overlap = WORKLOADS[wl]
        m = next(m for m in timed.measured if (m.nodes, m.budget, m.overlap) == (n, budget, overlap))
        p = planner.predict(m, wire, rate=rate(link), node_speed=factor(results, speed), latency=planner.LATENCY,
                            whole=timed.whole_here * factor(results, speed))
        whole = measured.get((speed, 1, "whole", link))
        out.append({"speed": speed, "nodes": n, "workload": wl, "link": link, "measured_ms": got * 1e3,
                    "predicted_ms": p.latency * 1e3, "ratio": p.latency / got,
                    "whole_measured_ms": None if whole is None else whole * 1e3,
                    "whole_predicted_ms": timed.whole_here * factor(results, speed) * 1e3})
    return out


def section(results: dict, table: list[dict], timed: planner.Timed, args, seconds: float) -> str:
    within = sum(abs(r["ratio"] - 1) <= TOLERANCE for r in table)
    lines = ["## The planner against netbench", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/plan_check.py --work "
             f"{args.work} --reps {args.reps}` ({seconds:.0f} s) on {_perfdoc.machine()}; load average "
             f"{timed.load[0]:.2f} before the timing passes, {timed.load[1]:.2f} after. The netbench run it reads: "
             f"{results['meta']['model']} at {results['meta']['size']}, `netbench.py "
             f"{' '.join(results['meta']['argv'])}` (docs/latency.md).", "",
             "Predicted: the planner's exports (one-shot selection, compute weight 0 as netbench's workloads, fp32 "
             "exports with the messages' bytes at the wire), its stages and the whole model timed here, times the "
             "slowdown netbench measured, laid out at the link's nominal rate with 0.1 ms a message. Measured: "
             "netbench's median latency of sequential requests.", "",
             f"Within {TOLERANCE:.0%}: **{within} of {len(table)}** configurations. The whole model on one node: "
             f"predicted {timed.whole_here * 1e3:.1f} ms here (speed 1).", "",
             "| speed | N | workload | link | measured ms | predicted ms | predicted / measured |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        mark = "" if abs(r["ratio"] - 1) <= TOLERANCE else " (off)"
        lines.append(f"| {r['speed']} | {r['nodes']} | {r['workload']} | {r['link']} | {r['measured_ms']:.1f} | "
                     f"{r['predicted_ms']:.1f} | {r['ratio']:.2f}{mark} |")
    wholes = sorted({(r["speed"], r["link"], r["whole_measured_ms"], r["whole_predicted_ms"]) for r in table
                     if r["whole_measured_ms"] is not None})
    lines += ["", "The whole model on one node, measured by netbench at each link (it does not use the link) and "
              "predicted: " + "; ".join(f"speed {s} at {li}: {m:.1f} against {p:.1f} ms" for s, li, m, p in wholes)
              + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/netbench"), help="netbench's --work folder")
    ap.add_argument("--reps", type=int, default=planner.REPS, help="timing passes (disco-compile plan --reps)")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args()
    found = sorted(args.work.glob("*/results.json"))
    if not found:
        sys.exit(f"plan_check: no netbench results under {args.work} (run benchmarks/netbench.py --work "
                 f"{args.work} first)")
    results = json.loads(found[-1].read_text())
    meta = results["meta"]
    model, example = zoo.build(meta["model"], meta["size"])
    workloads = {wl for (_, _, wl, _) in runs(results)} - {"whole"}
    budgets = sorted({WORKLOADS[wl][0] for wl in workloads})
    overlaps = sorted({WORKLOADS[wl][2] for wl in workloads}, reverse=True)
    start = time.time()
    timed = planner.measure(model, example, nodes=meta["nodes"], budgets=budgets, overlaps=overlaps,
                            reps=args.reps, compute_weight=0.0,
                            progress=lambda done, total, what: print(f"[{done}/{total}] {what}", flush=True))
    table = rows(results, timed)
    text = section(results, table, timed, args, time.time() - start)
    print(text)
    _perfdoc.write_section(SECTION, text, path=args.doc, header=HEADER, names=(SECTION,))


if __name__ == "__main__":
    main()
