"""The distributed runtime's own cost: ResNet-50 on two processes over loopback, with and without compute.

ResNet-50 (zoo.build("resnet50", 224), input 1x3x224x224), N=2, rho=0.2, global allocation, align 8
(disco-compile's defaults), exported with overlap and without (the exports of benchmarks/netbench.py,
made in --work if missing). Node 1 runs
`serve` in a process pinned to core 1, node 0 a DiscoClient in a process pinned to core 0, over
loopback TCP (insecure: no CURVE), one onnxruntime thread each. Each node runs its stages either

  compute   as exported, or
  cached    with every stage session replaced by one that returns the outputs of its first run: the
            same arrays every time, so the same messages, headers, checks and waits, without the
            compute;

four modes per export: both compute; only node 0 computes; only node 1 computes; neither (what
remains is the runtime: sending, receiving, checking and filing messages, and waiting for the
peer's runtime).

For each (export, mode), --rounds rounds, interleaved, of --reps sequential requests after 5 warm-up;
reported: the median over all requests' latencies, node 0's CPU time per request (process time of
its process), and, with neither node computing, every send on node 0 timed around ZmqTransport's send of the
frames (wall time, and the CPU time of the calling thread), grouped by payload size. A send's wall
time beyond its thread's CPU time is the ZeroMQ I/O thread and the kernel's TCP path, which run on
the node's same core.

Both processes share this machine (loopback: the kernel's work for both ends of a connection runs on
the sender's core), so this is the runtime's cost on one core per node, not a network measurement;
benchmarks/netbench.py measures over shaped links.

With --baseline REV, every row is also run with the runtime of git revision REV (its disco_compile/, extracted
with `git archive` into --work and put first on the children's PYTHONPATH), interleaved with this tree's, so
a change to the runtime is measured before and after in one run. The schedule: each node's stages timed alone
(pre-captured inputs, median of 11 interleaved passes, one process on core 1) and laid out with
disco_compile.runtime.timeline with no link cost: what the runtime would take if it cost nothing; rows with
both nodes computing give median / schedule.

Run: python benchmarks/runtime_overhead.py [--reps 100] [--rounds 3] [--work /tmp/netbench] [--baseline REV]
     [--modes "both compute,neither computes"] [--no-write]
On a machine other jobs share, a node's core is not its own; to measure as if it were, run the benchmark in an
autogroup of its own at a high priority (root): setsid sh -c 'echo -20 > /proc/self/autogroup; exec python
benchmarks/runtime_overhead.py ...' (the report says which autogroup priority it ran at).
Writes the runtime_overhead section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _perfdoc  # noqa: E402

EXPORTS = {"disco": "with overlap", "disco_no_overlap": "without overlap"}  # netbench's exports
MODES = {"both compute": ("compute", "compute"), "node 0 computes": ("compute", "cached"),
         "node 1 computes": ("cached", "compute"), "neither computes": ("cached", "cached")}  # (node 0, node 1)
SIZE_BINS = (0, 16_384, 65_536, 262_144, 1 << 40)  # payload bytes
THIS_TREE = "this tree"
STAGE_PASSES = 11  # interleaved passes over every stage for the schedule


def _cache_stage_outputs() -> None:
    """Make NodeExecutor's stage sessions return their first run's outputs from then on (cached mode)."""
    from disco_compile.runtime import executor

    class Cached:
        def __init__(self, session):
            self.session, self.outputs = session, None

        def run(self, fetch, feeds, options=None):
            if self.outputs is None:
                self.outputs = self.session.run(fetch, feeds, options)
            return self.outputs

    make = executor.NodeExecutor._session
    executor.NodeExecutor._session = lambda self, stage, options: Cached(make(self, stage, options))


def _time_sends(records: list) -> None:
    """Append (payload bytes, wall s, thread CPU s) for every message (a MSG frame: not the handshakes, request
    announcements and heartbeats) ZmqTransport sends."""
    from disco_compile.runtime.net import zmq_transport

    send = zmq_transport.ZmqTransport._send

    def timed(self, peer, frames, *, strict=False):
        t0, c0 = time.perf_counter(), time.thread_time()
        send(self, peer, frames, strict=strict)
        if frames[0] == zmq_transport.MSG:
            records.append((frames[-1].nbytes, time.perf_counter() - t0, time.thread_time() - c0))
    zmq_transport.ZmqTransport._send = timed


def _peers(ports: str) -> dict[int, str]:
    return {k: f"127.0.0.1:{p}" for k, p in enumerate(ports.split(","))}


def child_node1(out: str, ports: str, mode: str) -> None:
    from disco_compile.runtime.net.network import serve
    if mode == "cached":
        _cache_stage_outputs()
    serve(out, 1, _peers(ports), insecure=True, timeout=60, connect_timeout=60)


def child_client(out: str, ports: str, mode: str, reps: int, x_path: str) -> None:
    import numpy as np

    from disco_compile.runtime.net.network import DiscoClient
    records: list = []
    if mode == "cached":
        _cache_stage_outputs()
    _time_sends(records)
    x = np.load(x_path)
    with DiscoClient(out, _peers(ports), insecure=True, timeout=60, connect_timeout=60, threads=1,
                     max_in_flight=1) as client:
        for _ in range(5):
            client([x])
        records.clear()
        lat = []
        c0 = time.process_time()
        for _ in range(reps):
            t0 = time.perf_counter()
            client([x])
            lat.append(time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / reps
    print(json.dumps({"lat": lat, "cpu0": cpu, "sends": records}))


def one_run(work: Path, export: str, mode: str, reps: int, runtime: Path | None) -> dict:
    """One row's round: node 1 and node 0 as processes, with this tree's runtime or the one in `runtime`."""
    from disco_compile.runtime.net.network import free_ports
    ports = ",".join(map(str, free_ports(2)))
    me = [sys.executable, __file__]
    mode0, mode1 = MODES[mode]
    env = os.environ | ({"PYTHONPATH": str(runtime)} if runtime is not None else {})
    node1 = subprocess.Popen(["taskset", "-c", "1", *me, "_node1", str(work / "n2" / export), ports, mode1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        client = subprocess.run(["taskset", "-c", "0", *me, "_client", str(work / "n2" / export), ports, mode0,
                                 str(reps), str(work / "x.npy")], capture_output=True, text=True, timeout=600,
                                env=env)
        if client.returncode != 0:
            raise RuntimeError(f"node 0 ({export}, {mode}) exited {client.returncode}:\n{client.stderr[-3000:]}")
        _, err = node1.communicate(timeout=60)
        if node1.returncode != 0:
            raise RuntimeError(f"node 1 ({export}, {mode}) exited {node1.returncode}:\n{err[-3000:]}")
        return json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        if node1.poll() is None:
            node1.kill()


def child_stages(work: str) -> None:
    """Each export's stages timed alone (node_compute's captured inputs, the runtime's session options) and the
    schedule they allow with no link cost (runtime/timeline.py): {export: seconds}."""
    import numpy as np
    import onnxruntime as ort
    from node_compute import _capture, _fetch

    from disco_compile.artifact.schedule import Schedule
    from disco_compile.runtime.executor import session_options
    from disco_compile.runtime.timeline import timeline
    x = np.load(Path(work) / "x.npy")
    runs, schedules = {}, {}
    for export in EXPORTS:
        sched = json.loads((Path(work) / "n2" / export / "schedule.json").read_text())
        sessions = [[ort.InferenceSession(str(Path(work) / "n2" / export / st["file"]), session_options(1),
                                          providers=["CPUExecutionProvider"]) for st in p] for p in sched["programs"]]
        feeds, _, _ = _capture(sched, sessions, x)
        runs[export] = [[(s, _fetch(st), f) for s, st, f in zip(sessions[k], prog, feeds[k], strict=True)]
                        for k, prog in enumerate(sched["programs"])]
        schedules[export] = Schedule.from_json(sched)
    times = {e: [[[] for _ in node] for node in r] for e, r in runs.items()}
    for _ in range(STAGE_PASSES):
        for export, nodes in runs.items():
            for k, node in enumerate(nodes):
                for i, (session, fetch, feed) in enumerate(node):
                    t0 = time.perf_counter()
                    session.run(fetch, feed)
                    times[export][k][i].append(time.perf_counter() - t0)
    print(json.dumps({e: timeline(schedules[e], [[statistics.median(v) for v in node] for node in t]).latency
                      for e, t in times.items()}))


def schedule_times(work: Path) -> dict[str, float]:
    run = subprocess.run(["taskset", "-c", "1", sys.executable, __file__, "_stages", str(work)], capture_output=True,
                         text=True, timeout=1200)
    if run.returncode != 0:
        raise RuntimeError(f"timing the stages failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def baseline_runtime(rev: str, work: Path) -> Path:
    """disco_compile/ of git revision `rev`, extracted (git archive: the repository is only read) under `work`."""
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = work / f"runtime-{sha}"
    if not (dest / "disco_compile").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(root), "archive", sha, "disco_compile"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def autogroup() -> str:
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return "no autogroup"


def _sends_rows(runs: list[dict], reps: int, how: str, version: str) -> list[str]:
    """The send-time table's rows of one export and runtime (neither node computing), by payload size."""
    med, bins = _perfdoc.median, defaultdict(list)
    for r in runs:
        for size, wall, cpu in r["sends"]:
            k = next(i for i in range(len(SIZE_BINS) - 1) if SIZE_BINS[i] <= size < SIZE_BINS[i + 1])
            bins[k].append((wall, cpu))
    rows = []
    for k in sorted(bins):
        hi = SIZE_BINS[k + 1]
        span = f"{SIZE_BINS[k]:,} - {hi:,}" if hi < SIZE_BINS[-1] else f"{SIZE_BINS[k]:,} and more"
        walls, cpus = zip(*bins[k], strict=True)
        rows.append(f"| {how} | {version} | {span} | {len(walls) / (reps * len(runs)):.1f} | {med(walls) * 1e6:.0f} | "
                    f"{med(cpus) * 1e6:.0f} |")
    return rows


def report(results: dict, schedule: dict[str, float], args, cmd: str, load_start: str) -> str:
    med = _perfdoc.median
    versions = sorted({v for _, _, v in results}, key=lambda v: v != THIS_TREE)
    lines = ["## Runtime overhead: resnet50 1x3x224x224, N=2, rho=0.2, two processes on loopback", "",
             "Exports: global allocation, align 8 (disco-compile's defaults; benchmarks/netbench.py's `disco` and "
             "`disco_no_overlap`).  ",
             f"Command: `{cmd}`  ",
             f"Run: {_perfdoc.today()}; machine: {_perfdoc.machine()}; load average (1/5/15 min) {load_start} at the "
             f"start, {_perfdoc.load()} at the end; scheduling: {autogroup()}.  ",
             f"Node 0 (DiscoClient) on core 0, node 1 (`serve`) on core 1, loopback TCP, insecure, one onnxruntime "
             f"thread; {args.rounds} interleaved rounds of {args.reps} sequential requests per row, after 5 warm-up "
             f"each. A node that does not compute has every stage return its first run's outputs (the same "
             f"messages and checks): with neither computing the latency is the runtime alone. Runtime: "
             f"{', '.join(versions)} (`--baseline`: that revision's disco_compile/, the rows interleaved). Schedule: "
             f"every stage timed alone and laid out with no link cost (runtime/timeline.py): "
             + ", ".join(f"{EXPORTS[e]} {t * 1e3:.1f} ms" for e, t in schedule.items()) + ".", "",
             "| export | mode | runtime | median latency ms | node 0 CPU ms per request | median / schedule |",
             "|---|---|---|---|---|---|"]
    for export, how in EXPORTS.items():
        for mode in args.modes:
            for version in versions:
                runs = results[(export, mode, version)]
                lat = med([v for r in runs for v in r["lat"]])
                ratio = f"{lat / schedule[export]:.2f}" if mode == "both compute" else ""
                lines.append(f"| {how} | {mode} | {version} | {lat * 1e3:.1f} | "
                             f"{med([r['cpu0'] for r in runs]) * 1e3:.1f} | {ratio} |")
    if "neither computes" in args.modes:
        lines += ["", "Sends on node 0, neither node computing (every message of every timed request; wall: the "
                      "call that hands the frames to ZeroMQ; CPU: the calling thread's):", "",
                  "| export | runtime | payload bytes | sends per request | median wall us | median thread CPU us |",
                  "|---|---|---|---|---|---|"]
        for export, how in EXPORTS.items():
            for version in versions:
                lines += _sends_rows(results[(export, "neither computes", version)], args.reps, how, version)
    lines += ["", "Both nodes share this machine: on loopback the kernel's work for both ends of a TCP connection runs "
                  "on the sending core, and a send's wall time beyond its thread's CPU time is ZeroMQ's I/O thread "
                  "and that kernel work, on the node's one core. benchmarks/netbench.py measures over shaped links "
                  "(docs/latency.md)."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/netbench"),
                    help="netbench's work directory: its exports are used, and made if missing")
    ap.add_argument("--reps", type=int, default=100, help="timed requests per round (default 100)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (default 3)")
    ap.add_argument("--baseline", metavar="REV", help="also run every row with the runtime of git revision REV")
    ap.add_argument("--modes", type=lambda t: [m.strip() for m in t.split(",")], default=list(MODES),
                    help=f"comma-separated, of: {', '.join(MODES)} (default all)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {unknown}; the modes are {', '.join(MODES)}")
    return args


def main() -> None:
    args = parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPU cores (one per node)")
    import netbench
    work = netbench.model_dir(args.work, "resnet50", 224)  # netbench's exports: n2/disco, n2/disco_no_overlap
    netbench.prepare(work, "resnet50", 224, [2], list(EXPORTS))
    runtimes = {THIS_TREE: None}
    if args.baseline:
        runtimes[f"baseline {args.baseline}"] = baseline_runtime(args.baseline, work)
    cmd, load_start = _perfdoc.command(), _perfdoc.load()
    schedule = schedule_times(work)
    results = defaultdict(list)
    for r in range(args.rounds):
        for export in EXPORTS:
            for mode in args.modes:
                for version, runtime in (runtimes.items() if r % 2 == 0 else reversed(runtimes.items())):
                    t0 = time.time()
                    run = one_run(work, export, mode, args.reps, runtime)
                    results[(export, mode, version)].append(run)
                    print(f"round {r + 1}: {export} {mode} ({version}): median "
                          f"{_perfdoc.median(run['lat']) * 1e3:.1f} ms ({time.time() - t0:.0f} s)", flush=True)
    _perfdoc.publish("runtime_overhead", report(results, schedule, args, cmd, load_start), not args.no_write)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_node1":
        child_node1(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_stages":
        child_stages(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        child_client(*sys.argv[2:5], int(sys.argv[5]), sys.argv[6])
    else:
        main()
