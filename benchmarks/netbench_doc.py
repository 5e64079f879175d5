"""docs/latency.md from benchmarks/netbench.py's results: a section per (core speed, N), the links, the goals.

Per configuration: median and p90 latency, throughput, the model bound (max(slowest node's compute alone,
the most bytes one switch port carries in one direction / link rate)), the schedule's latency
(disco_compile.runtime.estimate: stages timed alone, each ordered pair of nodes a link at the nominal rate,
plus a fixed time per message) and the speedup against the whole model on one node of the same speed at the
same link, measured in the same run. The doc's hand-written `## Observations` section is kept.
"""
from __future__ import annotations

import datetime
from collections import Counter
import json
import platform
import statistics
import sys
from pathlib import Path

import netbench as nb
import netbench_net as net
from _perfdoc import machine
from netbench_probe import MESSAGE_SIZES

from disco_compile.artifact.schedule import Schedule
from disco_compile.runtime.estimate import WIRE, estimate

def _label(workload: str) -> str:
    """A workload as the tables name it, from its settings (netbench.EXPORTS)."""
    if workload == "whole":
        return "whole model (1 node)"
    rho, overlap, allocation, weight, wire = nb.EXPORTS[workload]
    parts = ["dense split (rho=1)" if rho == 1 else f"DISCO rho={rho:g}"]
    parts += [f"{allocation} allocation"] if allocation != "global" else []
    parts += [f"compute weight {weight:g}"] if weight else []
    parts += [f"wire {wire}"] if wire != "fp32" else []
    parts += [] if overlap else ["no overlap"]
    return ", ".join(parts)


LABEL = {wl: _label(wl) for wl in ("whole", *nb.EXPORTS)}
# (DISCO workload, the dense workload it is compared with) in the Goals section: the dense split of the same overlap
GOAL_PAIRS = tuple((wl, "dense" if overlap else "dense_no_overlap") for wl, (rho, overlap, *_) in nb.EXPORTS.items()
                   if rho < 1)
# issue 19's goals: (against, link, speedup at least) for this machine's cores and for edge-class cores
GOALS = {"this": (("whole", "1gbit", 1.5), ("whole", "unshaped", 1.8), ("dense", "1gbit", 4.7),
                  ("dense", "100mbit", 4.7)),
         "edge": (("whole", "100mbit", 1.5), ("whole", "1gbit", 1.8), ("dense", "1gbit", 4.7),
                  ("dense", "100mbit", 4.7))}
SCHEDULE_GOAL = 1.15  # measured latency / schedule at every link
OBSERVATIONS = "## Observations"


def speed_label(results, speed: str) -> str:
    if speed == "1":
        return "this machine's cores"
    cal = results["calibration"][speed]
    return f"edge-class cores ({speed}x slower; measured {cal['factor']:.2f}x)"


def bound(results, speed: str, nodes: int, wl: str, link: str) -> float:
    comp = results["compute"][speed]
    if wl == "whole":
        return comp["whole"]
    key = nb.split_key(nodes, wl)
    c = max(comp[key])
    bps = net.link_bps(link)
    if bps is None:
        return c
    port = {}  # (node, "out" | "in") -> bytes through that port direction
    for d, b in results["bytes"][key].items():
        src, dst = map(int, d.split("->"))
        port[(src, "out")] = port.get((src, "out"), 0) + b
        port[(dst, "in")] = port.get((dst, "in"), 0) + b
    return max(c, max(port.values(), default=0) * 8 / bps)


def one_way(results) -> float:
    """Seconds a message takes besides its time on the wire: half the shortest unshaped message time (a round
    trip of a small message and its one-byte answer), 0 when the probe did not run."""
    times = results.get("message_times", {}).get("unshaped")
    return min(times.values()) / 2 if times else 0.0


def schedule_bound(results, work: Path, speed: str, nodes: int, wl: str, link: str) -> float:
    """The latency the export's schedule allows at this link (as `disco-run estimate` computes it)."""
    comp = results["compute"][speed]
    if wl == "whole":
        return comp["whole"]
    key = nb.split_key(nodes, wl)
    sched = Schedule.from_json(json.loads((work / key / "schedule.json").read_text()))
    bps = net.link_bps(link)
    return estimate(sched, comp[f"{key}_stage_times"], [None if bps is None else bps / 8],
                    latency=one_way(results))[0].latency


def _p90(v):
    v = sorted(v)
    return v[int(0.9 * (len(v) - 1))]


def measured(results, work: Path, links) -> dict:
    """(speed, nodes, workload, link) -> (median latency, throughput, schedule latency) of every run."""
    out = {}
    for key, r in results["runs"].items():
        speed, n, wl, link = key.split("/")
        if link in links:
            nodes = int(n[1:])
            out[(speed, nodes, wl, link)] = (statistics.median(r["lat"]), r["tput"],
                                             schedule_bound(results, work, speed, nodes, wl, link))
    return out


def latency_table(results, med: dict, speed: str, nodes: int, links) -> list[str]:
    lines = ["| workload | link | median ms | p90 ms | throughput /s | vs whole (latency, throughput) | bound ms | "
             "median/bound | schedule ms | median/schedule |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for wl in nb.WORKLOADS:
        for link in links:
            n = 1 if wl == "whole" else nodes
            if (speed, n, wl, link) not in med:
                continue
            m, tput, t = med[(speed, n, wl, link)]
            r = results["runs"][nb.run_key(speed, nodes, wl, link)]
            w = med.get((speed, 1, "whole", link))
            vs = f"{w[0] / m:.2f}x, {tput / w[1]:.2f}x" if w and wl != "whole" else ""
            b = bound(results, speed, nodes, wl, link)
            lines.append(f"| {LABEL[wl]} | {link} | {m * 1e3:.1f} | {_p90(r['lat']) * 1e3:.1f} | {tput:.2f} | {vs} | "
                         f"{b * 1e3:.1f} | {m / b:.2f} | {t * 1e3:.1f} | {m / t:.2f} |")
    return lines


def compute_line(results, speed: str, nodes: int, splits, reps: int) -> str:
    comp = results["compute"][speed]
    parts = []
    for wl in splits:
        key = nb.split_key(nodes, wl)
        parts.append(f"{LABEL[wl]}: " + ", ".join(f"node{k} {t * 1e3:.1f} (x{comp[f'{key}#{k}_scale']:.2f})"
                                                  for k, t in enumerate(comp[key]))
                     + f" ({'/'.join(map(str, comp[key + '_stages']))} stages; critical path with zero "
                     f"communication cost {comp[key + '_critical_path'] * 1e3:.1f}; output max |diff| vs torch "
                     f"{comp[key + '_maxdiff_vs_torch']:.1e})")
    return (f"Compute alone (ms; each stage's median over {reps} interleaved passes, scaled (x) so that a node's "
            f"stages sum to the median of its whole passes, summed per node; one thread, core "
            f"1{'' if speed == '1' else ', in a slowed group'}): whole {comp['whole'] * 1e3:.1f}; "
            + "; ".join(parts) + ".")


def cpu_table(results, speed: str, nodes: int, splits, links) -> list[str]:
    rows = [f"| {LABEL[wl]} | {link} | " + " / ".join(f"{c * 1e3:.1f}" for c in r["cpu"]) + " | "
            + " / ".join(f"{c * 1e3:.1f}" for c in results["compute"][speed][nb.split_key(nodes, wl)]) + " |"
            for wl in splits for link in links
            for r in [results["runs"].get(nb.run_key(speed, nodes, wl, link))] if r and "cpu" in r]
    return ["CPU ms per inference in the pipelined phase (node 0: the client's process_time; the others: "
            "utime+stime of disco-run from /proc), against each node's compute alone (wall time: on a slowed core "
            "it includes the waits for the next period, which CPU time does not):", "",
            "| workload | link | CPU ms per node | compute alone ms per node |", "|---|---|---|---|", *rows]


def placement(results, speed: str, nodes: int) -> str:
    """Where the nodes run and, for a slowed speed, whether the nodes sharing a core fit in it together."""
    text = f"Placement: {net.sharing(nodes)}."
    if speed == "1":
        return text
    cal = results["calibration"][speed]
    share = cal["quota_us"] / cal["period_us"]
    per_core = max(Counter(map(net.core, range(nodes))).values())  # nodes on the busiest core
    fits = "within the core" if per_core * share <= 1 else "more than the core: they slow each other"
    return (f"{text} At this speed a node may use {share:.0%} of a core; {per_core} on one core at most "
            f"{per_core * share:.0%} together, {fits}.")


def section(results, med, speed: str, nodes: int, args, links) -> list[str]:
    splits = [wl for wl in nb.SPLITS if wl in args.workload_list]
    return [f"## {speed_label(results, speed)[0].upper() + speed_label(results, speed)[1:]}, N={nodes}", "",
            placement(results, speed, nodes), "",
            *latency_table(results, med, speed, nodes, links), "",
            compute_line(results, speed, nodes, splits, args.compute_reps), "",
            *cpu_table(results, speed, nodes, splits, links), ""]


def calibration_lines(results) -> list[str]:
    if not results["calibration"]:
        return []
    lines = ["## Edge-class cores: how they are made", "",
             "Each slowed node's process (and the whole model) runs in its own cgroup "
             "(benchmarks/netbench_cgroup.py) with a CPU quota per period; the quota was calibrated before the "
             "runs on the whole model alone (core 1, no network), with and without the group, interleaved:", ""]
    for speed, cal in results["calibration"].items():
        steps = "; ".join(f"quota {q} us: {b * 1e3:.1f} -> {s * 1e3:.1f} ms ({s / b:.2f}x)" for q, b, s in cal["steps"])
        shares = cal["full_speed_core_share"]
        line = (f"- target {speed}x: cgroup {cal['cgroup']} ({cal['v2']}), {cal['setting']}; measured "
                f"{cal['factor']:.2f}x. Steps: {steps}. At full speed the whole model had {min(shares):.0%}-"
                f"{max(shares):.0%} of its core's time (100%: the core to itself).")
        if abs(cal["factor"] / cal["target"] - 1) > nb.cg.TOL:
            line += (" **The calibration did not reach the target**: other processes on the core, or a period "
                     "too short for the quota it needs; the runs at this speed are slowed by the measured factor, "
                     "not the target.")
        lines.append(line)
    lines += ["", "The quota caps CPU time per period; a node that waited for a message can run what is left of "
              "its period's quota at full speed, so a node that waits often gets up to one quota per period more "
              "than a core that is slow at every instant. The whole model never waits: the factor above is "
              "its slowdown, and the `vs whole` column compares with it at every link in the same run. The "
              "kernel's network work in softirq is not counted against a node's quota.", ""]
    return lines


def link_lines(results, links) -> list[str]:
    lines = ["## Links", "", "Bytes per inference (schedule.json): " + "; ".join(
        f"{key} " + ", ".join(f"{d} {b / 1e6:.2f} MB" for d, b in sorted(by.items()))
        for key, by in results["bytes"].items()) + ".", "",
        "Measured TCP bulk rate node0->node1 through the switch (one connection, Python sockets): " + ", ".join(
            f"{r} {v / 1e6:.0f} Mbit/s" for r, v in results["link"].items()) + ".", ""]
    times = results.get("message_times", {})
    if "unshaped" not in times:
        return lines
    shaped = [r for r in links if net.link_bps(r) is not None and r in times]
    fixed = min(times["unshaped"].values())  # the round trip itself, without a transfer time to speak of
    lines += [f"Message time (ms), node 0 to node 1: a message sent after 20 ms of idle link until node 1 holds "
              f"all of it and its one-byte answer is back, median of {nb.PROBE_REPS}. \"at rate\": the shortest "
              "unshaped time plus the message on the wire (payload x 1514/1448) at the link rate."
              + (" tbf bucket and TSO packet cap (bytes): " + "; ".join(
                  f"{r} {net.link_shaping(r)[0]}, {net.link_shaping(r)[1]}" for r in shaped) + "." if shaped else ""),
              "",
              "| message | unshaped | " + " | ".join(f"{r} | {r} at rate" for r in shaped) + " |",
              "|---|---|" + "---|---|" * len(shaped)]
    for size in MESSAGE_SIZES:
        cells = [f"{size / 1024:.0f} KB", f"{times['unshaped'][str(size)] * 1e3:.2f}"]
        for r in shaped:
            cells += [f"{times[r][str(size)] * 1e3:.2f}",
                      f"{(fixed + size * WIRE * 8 / net.link_bps(r)) * 1e3:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def goal_lines(med: dict, speeds, nodes_list, links) -> list[str]:
    """Issue 19's goals, measured and between the schedules, for every speed, N and DISCO workload run."""
    lines = []
    for speed, nodes, (disco, dense) in ((s, n, p) for s in speeds for n in nodes_list for p in GOAL_PAIRS):
        for against, base, goal in GOALS["this" if speed == "1" else "edge"]:
            b = dense if against == "dense" else "whole"
            for link in (li for li in links if li.partition("@")[0] == base):
                a, o = med.get((speed, nodes, disco, link)), med.get((speed, 1 if b == "whole" else nodes, b, link))
                if a and o:
                    lines.append(f"- speed {speed}, N={nodes}, {LABEL[disco]} vs {LABEL[b]} at {link}: latency "
                                 f"{o[0] / a[0]:.2f}x faster, throughput {a[1] / o[1]:.2f}x (goal >= {goal}x); "
                                 f"the schedules alone {o[2] / a[2]:.2f}x")
        for link in links:
            a = med.get((speed, nodes, disco, link))
            if a:
                lines.append(f"- speed {speed}, N={nodes}, {LABEL[disco]} at {link}: median / schedule "
                             f"{a[0] / a[2]:.2f} (goal <= {SCHEDULE_GOAL})")
    return lines


def command_lines(results, args) -> list[str]:
    slowed = bool(results["calibration"])
    return ["## Commands", "", "```", "sudo .venv/bin/python benchmarks/netbench.py " + " ".join(sys.argv[1:]),
            "```", "", "What it runs (netbench_net.setup_commands, then per link the shaping):", "", "```",
            *(" ".join(c) for c in net.setup_commands(max(args.node_counts))),
            *[line for link, cs in results["tc"].items() if cs for line in (f"# {link}", *cs)],
            "# peers{N}.yaml: k: 10.77.0.{k+1}:" + f"{net.PORT_BASE}+k",
            *([f"# a slowed node k's command is prefixed by: sh -c '{nb.cg.JOIN}' "
               f"CGROUP/discobench_node{{k}}/cgroup.procs"] if slowed else []),
            f"ip netns exec discobench{{k}} taskset -c CORE .venv/bin/disco-run OUT --node k --peers peers{{N}}.yaml "
            f"--insecure --timeout {nb.TIMEOUT} --connect-timeout 60 --threads 1   # k = 1..N-1",
            f"ip netns exec discobench0 taskset -c 0 python benchmarks/netbench.py _client OUT peers{{N}}.yaml WORK "
            f"{args.reps} {args.pipe} {args.pipelined}   # DiscoClient(max_in_flight={args.pipelined})",
            f"ip netns exec discobench1 taskset -c 1 python benchmarks/netbench.py _whole WORK {args.reps} {args.pipe}",
            "```", "", f"Latency: {args.reps} sequential requests after 5 warm-up; throughput: {args.pipe} requests "
            f"submitted at once, {args.pipelined} in flight (whole model: back to back)"
            + (f"; each link's workloads run {args.rounds} times in turn, the latencies pooled and the "
               f"throughputs and CPU times averaged" if args.rounds > 1 else "") + ".", ""]


def kept_observations(path: Path) -> list[str]:
    """The hand-written section of the doc being replaced (from `OBSERVATIONS` to the end), if any."""
    if not path.exists():
        return []
    text = path.read_text()
    at = text.find("\n" + OBSERVATIONS)
    return [text[at + 1:].rstrip("\n"), ""] if at >= 0 else []


def write_doc(results, args, work: Path) -> None:
    links = [r for r in results["tc"] if any(k.endswith("/" + r) for k in results["runs"])]
    med = measured(results, work, links)
    speeds = list(results["compute"])
    meta = results["meta"]
    lines = [f"# Latency over a network: {meta['model']} on {', '.join(map(str, meta['nodes']))} nodes", "",
             f"Measured {datetime.date.today().isoformat()} by `benchmarks/netbench.py` on {platform.node()}: "
             f"{machine()}. Every node on this one machine in its own network namespace, all on one bridge "
             "(a switch port per node, shaped both ways); onnxruntime 1 thread per node. "
             f"Input 1x3x{meta['size']}x{meta['size']}, `zoo.build(\"{meta['model']}\", {meta['size']})`. "
             f"Speeds: {'; '.join(speed_label(results, s) for s in speeds)}. Load average (1/5/15 min) at the "
             f"start {meta['load_start']}, at the end {meta.get('load_end', '?')}: above 0 means other processes "
             "shared the cores, and the ratios below are only as good as the machine was quiet.", "",
             *calibration_lines(results),
             *(line for s in speeds for n in meta["nodes"] for line in section(results, med, s, n, args, links)),
             *link_lines(results, links),
             "## Goals", "",
             "Issue 19's goals: each measured ratio (speedups against the whole model on one node of the same "
             "speed, at the same link, in this run), then the same ratio between the schedules (what the exports "
             "allow with no runtime cost).", "",
             *goal_lines(med, speeds, meta["nodes"], links), "",
             *command_lines(results, args),
             *kept_observations(args.doc)]
    args.doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
