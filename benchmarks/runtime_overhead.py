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

Run: python benchmarks/runtime_overhead.py [--reps 100] [--rounds 3] [--work /tmp/netbench] [--no-write]
Writes the runtime_overhead section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
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


def _cache_stage_outputs() -> None:
    """Make NodeExecutor's stage sessions return their first run's outputs from then on (cached mode)."""
    from disco_compile.runtime import executor

    class Cached:
        def __init__(self, session):
            self.session, self.outputs = session, None

        def run(self, fetch, feeds):
            if self.outputs is None:
                self.outputs = self.session.run(fetch, feeds)
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


def one_run(work: Path, export: str, mode: str, reps: int) -> dict:
    from disco_compile.runtime.net.network import free_ports
    ports = ",".join(map(str, free_ports(2)))
    me = [sys.executable, __file__]
    mode0, mode1 = MODES[mode]
    node1 = subprocess.Popen(["taskset", "-c", "1", *me, "_node1", str(work / export), ports, mode1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = subprocess.run(["taskset", "-c", "0", *me, "_client", str(work / export), ports, mode0, str(reps),
                                 str(work / "x.npy")], capture_output=True, text=True, timeout=600)
        if client.returncode != 0:
            raise RuntimeError(f"node 0 ({export}, {mode}) exited {client.returncode}:\n{client.stderr[-3000:]}")
        _, err = node1.communicate(timeout=60)
        if node1.returncode != 0:
            raise RuntimeError(f"node 1 ({export}, {mode}) exited {node1.returncode}:\n{err[-3000:]}")
        return json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        if node1.poll() is None:
            node1.kill()


def report(results: dict, args, cmd: str, load_start: str) -> str:
    med = _perfdoc.median
    lines = ["## Runtime overhead: resnet50 1x3x224x224, N=2, rho=0.2, two processes on loopback", "",
             "Exports: global allocation, align 8 (disco-compile's defaults; benchmarks/netbench.py's `disco` and "
             "`disco_no_overlap`).  ",
             f"Command: `{cmd}`  ",
             f"Run: {_perfdoc.today()}; machine: {_perfdoc.machine()}; load average (1/5/15 min) {load_start} at the "
             f"start, {_perfdoc.load()} at the end.  ",
             f"Node 0 (DiscoClient) on core 0, node 1 (`serve`) on core 1, loopback TCP, insecure, one onnxruntime "
             f"thread; {args.rounds} interleaved rounds of {args.reps} sequential requests per row, after 5 warm-up "
             f"each. A node that does not compute has every stage return its first run's outputs (the same "
             f"messages and checks): with neither computing the latency is the runtime alone.", "",
             "| export | mode | median latency ms | node 0 CPU ms per request |", "|---|---|---|---|"]
    for export, how in EXPORTS.items():
        for mode in MODES:
            runs = results[(export, mode)]
            lat = [v for r in runs for v in r["lat"]]
            lines.append(f"| {how} | {mode} | {med(lat) * 1e3:.1f} | {med([r['cpu0'] for r in runs]) * 1e3:.1f} |")
    lines += ["", "Sends on node 0, neither node computing (every message of every timed request; wall: the call "
                  "that hands the frames to ZeroMQ; CPU: the calling thread's):", "",
              "| export | payload bytes | sends per request | median wall us | median thread CPU us |",
              "|---|---|---|---|---|"]
    for export, how in EXPORTS.items():
        runs = results[(export, "neither computes")]
        bins = defaultdict(list)
        for r in runs:
            for size, wall, cpu in r["sends"]:
                k = next(i for i in range(len(SIZE_BINS) - 1) if SIZE_BINS[i] <= size < SIZE_BINS[i + 1])
                bins[k].append((wall, cpu))
        requests = args.reps * len(runs)
        for k in sorted(bins):
            hi = SIZE_BINS[k + 1]
            span = f"{SIZE_BINS[k]:,} - {hi:,}" if hi < SIZE_BINS[-1] else f"{SIZE_BINS[k]:,} and more"
            walls, cpus = zip(*bins[k], strict=True)
            lines.append(f"| {how} | {span} | {len(walls) / requests:.1f} | {med(walls) * 1e6:.0f} | "
                         f"{med(cpus) * 1e6:.0f} |")
    lines += ["", "Both nodes share this machine: on loopback the kernel's work for both ends of a TCP connection runs "
                  "on the sending core, and a send's wall time beyond its thread's CPU time is ZeroMQ's I/O thread "
                  "and that kernel work, on the node's one core. benchmarks/netbench.py measures over shaped links "
                  "(docs/latency.md)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/netbench"),
                    help="netbench's work directory: its exports are used, and made if missing")
    ap.add_argument("--reps", type=int, default=100, help="timed requests per round (default 100)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (default 3)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPU cores (one per node)")
    import netbench
    work = args.work.resolve()
    netbench.prepare(work)
    cmd, load_start = _perfdoc.command(), _perfdoc.load()
    results = defaultdict(list)
    for r in range(args.rounds):
        for export in EXPORTS:
            for mode in MODES:
                t0 = time.time()
                run = one_run(work, export, mode, args.reps)
                results[(export, mode)].append(run)
                print(f"round {r + 1}: {export} {mode}: median {_perfdoc.median(run['lat']) * 1e3:.1f} ms "
                      f"({time.time() - t0:.0f} s)", flush=True)
    _perfdoc.publish("runtime_overhead", report(results, args, cmd, load_start), not args.no_write)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_node1":
        child_node1(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        child_client(*sys.argv[2:5], int(sys.argv[5]), sys.argv[6])
    else:
        main()
