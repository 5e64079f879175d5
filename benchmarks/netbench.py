"""Latency and throughput of ResNet-50 split across 2 nodes over a shaped network (run as root).

Two network namespaces (one per node) joined by a veth pair, 10.77.0.1/24 (node 0) and
10.77.0.2/24 (node 1), addresses that exist only inside those namespaces. Each direction is
shaped with `tc qdisc add dev VETH root tbf rate R burst B latency 400ms` for R in
1gbit, 100mbit, and also left unshaped, with TCP segmentation-offload packets capped at G bytes
(`ip link set dev VETH gso_max_size G`): SHAPING gives B and G per rate. A TSO packet larger than
the bucket is cut by tbf into 1448-byte segments in software, each then received and acknowledged
alone: work on the nodes' own cores (about 9 ms of CPU per MB measured here, 0.3 unshaped) that a
real NIC does in hardware, and the rate tbf reaches drops (TCP 850 Mbit/s at 1 Gbit/s with a
4000-byte bucket). A bucket holds a head start: after an idle spell its B bytes pass at once. So at
1 Gbit/s TSO packets are capped at 16 KB and the bucket holds one (18000 bytes, 0.14 ms of data;
TCP reaches 940-950 Mbit/s, as on a real gigabit link); at 100 Mbit/s the bucket is 4000 bytes
(0.32 ms) and packets are segmented in software, behind a link that is busy most of the time. A
link may name other values: 1gbit@4000 (bucket 4000, TSO packets uncapped, the setting of earlier
runs) or 1gbit@18000/16384. Each link also gets a message-time probe (MESSAGE_SIZES sent after an
idle spell) that shows the head start and any pacing loss against the time at the rate.
Node 0's process is pinned with `taskset -c 0`, node 1's with `taskset -c 1`. onnxruntime one
thread per node.

Workloads (ResNet-50, 1x3x224x224, zoo.build("resnet50", 224), N=2):
  whole   the original model exported with torch.onnx.export(dynamo=False, opset 17), timed with
          onnxruntime (1 thread) inside namespace 1, no network;
  dense   transform(model, 2, x) (rho=1), export;
  disco   the same after set_budget(Budget(0.2, "global", align=8, compute_weight=0)) (disco-compile
          --budget 0.2 --compute-weight 0: its defaults are --allocation global --align 8), export;
  disco_uniform   with Budget(0.2, "uniform", align=8) instead (--allocation uniform: every
          exchange cut by the budget, so every layer exchanges; global leaves out the exchanges whose
          channels rank low);
  disco_cw   with Budget(0.2, "global", align=8, compute_weight=0.1) (--compute-weight 0.1: the
          same bytes, channels ranked by score per (bytes + 0.1 x the MACs they cost their destination));
  dense_no_overlap, disco_no_overlap, disco_uniform_no_overlap, disco_cw_no_overlap   the same exported with
          overlap=False (disco-compile --no-overlap: a node waits for a layer's messages, then runs
          it as one convolution).
For the splits, node 1 runs `disco-run OUT --node 1 --peers peers.yaml --insecure` in its namespace
and node 0 is a driver (this file, `_client`) using DiscoClient in the other namespace: median and p90
latency of sequential requests after warm-up, and throughput with several requests in flight.

Model bound per configuration: max(slowest node's compute time measured alone (all of its stages, one
onnxruntime thread, no network, pre-captured inputs), bytes per inference in the busier direction
(schedule.json, sum of message bytes by direction) / link rate). Unshaped: compute only. Schedule bound:
the latency the export's schedule allows with no runtime cost (disco_compile.runtime.timeline: every stage taking
its time measured alone, each node's stages in order, each waiting for the messages it reads, each link
direction carrying one message at a time at the nominal rate); at least the model bound, above it where
a node waits for a message that could not have come sooner.

Run:  sudo .venv/bin/python benchmarks/netbench.py [--work /tmp/netbench] [--reps 30] [--pipe 40]
      [--rates unshaped,1gbit,100mbit] [--workloads whole,dense,...]   (subsets for a quick look)
      [--rates unshaped,1gbit,1gbit@4000]   (the same rate with another tbf bucket)
Writes docs/latency.md (results table and the commands) and WORK/results.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from disco_compile.runtime.estimate import WIRE, estimate
from disco_compile.artifact.schedule import Schedule
from disco_compile.runtime.timeline import timeline

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NS = ("discobench0", "discobench1")
VETH = ("dbveth0", "dbveth1")
ADDR = ("10.77.0.1", "10.77.0.2")
PORTS = (47100, 47101)
RATES = {"unshaped": None, "1gbit": 1e9, "100mbit": 1e8}
MESSAGE_SIZES = (16 << 10, 64 << 10, 160 << 10, 512 << 10, 2 << 20)  # bytes; netbench's messages: 8 KB to 1.6 MB
SHAPING = {"1gbit": (18000, 16384), "100mbit": (4000, 65536)}  # tbf bucket, gso_max_size (bytes); see above
GSO_DEFAULT = 65536  # veth's own TSO packet cap
PROBE_REPS = 20  # messages of each size in the message-time probe
SPLITS = ("dense", "disco", "dense_no_overlap", "disco_no_overlap", "disco_uniform", "disco_uniform_no_overlap",
          "disco_cw", "disco_cw_no_overlap")
COMPUTE_WEIGHT = 0.1  # bytes per MAC of the disco_cw workloads (--compute-weight; selection.py)
WORKLOADS = ("whole", *SPLITS)
LABEL = {"whole": "whole model (1 node)", "dense": "dense split (rho=1)", "disco": "DISCO rho=0.2",
         "dense_no_overlap": "dense split (rho=1), no overlap", "disco_no_overlap": "DISCO rho=0.2, no overlap",
         "disco_uniform": "DISCO rho=0.2, uniform allocation",
         "disco_uniform_no_overlap": "DISCO rho=0.2, uniform allocation, no overlap",
         "disco_cw": f"DISCO rho=0.2, compute weight {COMPUTE_WEIGHT:g}",
         "disco_cw_no_overlap": f"DISCO rho=0.2, compute weight {COMPUTE_WEIGHT:g}, no overlap"}
EXPORTS = {"dense": (1.0, True, "global", 0.0), "dense_no_overlap": (1.0, False, "global", 0.0),
           "disco": (0.2, True, "global", 0.0), "disco_no_overlap": (0.2, False, "global", 0.0),
           "disco_uniform": (0.2, True, "uniform", 0.0), "disco_uniform_no_overlap": (0.2, False, "uniform", 0.0),
           "disco_cw": (0.2, True, "global", COMPUTE_WEIGHT),
           "disco_cw_no_overlap": (0.2, False, "global", COMPUTE_WEIGHT)}  # budget, overlap, allocation, weight
TIMEOUT = 120.0  # disco-run --timeout: several requests queue on the worker at 100 Mbit/s


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def ort_opts(ort):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.log_severity_level = 3
    return o


# ================================================================ preparation (torch, outside namespaces)

def prepare(work: Path) -> None:
    """Export what WORK lacks (an export left from an earlier run is kept: the model is built the same way)."""
    missing = [wl for wl in SPLITS if not (work / wl / "manifest.json").exists()]
    if not missing and (work / "whole.onnx").exists():
        return
    import numpy as np
    import torch
    from disco_compile import Budget, transform
    from disco_compile.backend.exporter import export
    from disco_compile.frontend.zoo import build
    work.mkdir(parents=True, exist_ok=True)
    model, x = build("resnet50", 224)
    np.save(work / "x.npy", x.numpy())
    torch.onnx.export(model, (x,), str(work / "whole.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    np.save(work / "ref.npy", model(x).detach().numpy())
    dm = transform(model, 2, x)
    t = time.time()
    for wl in missing:
        budget, overlap, allocation, weight = EXPORTS[wl]
        dm.set_budget(Budget(budget, allocation, align=8, compute_weight=weight))
        export(dm, work / wl, force=True, overlap=overlap)  # align 8: disco-compile's default
    print(f"exported {', '.join(missing)} in {time.time() - t:.0f} s", flush=True)


# ================================================================ children (numpy + onnxruntime only)

def child_compute(work: Path, reps: int) -> None:
    """Per-node compute alone (stages with pre-captured inputs, the sum of each stage's median) and the whole
    model, one thread, interleaved passes."""
    import numpy as np
    import onnxruntime as ort
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from node_compute import _capture, _fetch
    x = np.load(work / "x.npy")
    res = {}
    whole = ort.InferenceSession(str(work / "whole.onnx"), ort_opts(ort), providers=["CPUExecutionProvider"])
    targets = {"whole": [(whole, None, {"x": x})]}
    for wl in SPLITS:
        sched = json.loads((work / wl / "schedule.json").read_text())
        sessions = [[ort.InferenceSession(str(work / wl / st["file"]), ort_opts(ort),
                                          providers=["CPUExecutionProvider"]) for st in p] for p in sched["programs"]]
        feeds, _, outputs = _capture(sched, sessions, x)
        y = outputs[sched["outputs"][0]["name"]]
        res[f"{wl}_maxdiff_vs_torch"] = float(np.abs(y - np.load(work / "ref.npy")).max())
        for k, prog in enumerate(sched["programs"]):
            targets[f"{wl}{k}"] = [(s, _fetch(st), f) for s, st, f in zip(sessions[k], prog, feeds[k], strict=True)]
    # each stage timed in every pass; a node's compute alone is the sum of its stages' medians, the stage times
    # of the schedule's timeline (disco_compile.runtime.timeline; with no link its length is the critical path of the
    # stage graph), so the timeline is never shorter than the node's compute
    times = {t: [[] for _ in targets[t]] for t in targets}
    names = list(targets)
    for rep in range(reps + 3):
        for t in names[rep % len(names):] + names[:rep % len(names)]:
            for i, (s, fetch, feed) in enumerate(targets[t]):
                t0 = time.perf_counter()
                s.run(fetch, feed)
                if rep >= 3:
                    times[t][i].append(time.perf_counter() - t0)
    stage_times = {t: [statistics.median(v) for v in per] for t, per in times.items()}
    res.update({t: sum(v) for t, v in stage_times.items()})
    for wl in SPLITS:
        sched = Schedule.from_json(json.loads((work / wl / "schedule.json").read_text()))
        res[f"{wl}_stage_times"] = st_t = [stage_times[f"{wl}{k}"] for k in range(sched.nodes)]
        res[f"{wl}_critical_path"] = timeline(sched, st_t).latency
        res[f"{wl}_stages"] = [len(p) for p in st_t]
    print(json.dumps(res))


def child_whole(work: Path, reps: int, pipe: int) -> None:
    import numpy as np
    import onnxruntime as ort
    s = ort.InferenceSession(str(work / "whole.onnx"), ort_opts(ort), providers=["CPUExecutionProvider"])
    x = np.load(work / "x.npy")
    for _ in range(5):
        s.run(None, {"x": x})
    lat = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(pipe):  # one thread, one core: back-to-back is its throughput
        s.run(None, {"x": x})
    print(json.dumps({"lat": lat, "tput": pipe / (time.perf_counter() - t0)}))


def child_client(out: Path, peers: Path, work: Path, reps: int, pipe: int, inflight: int) -> None:
    import numpy as np
    from disco_compile.runtime.net.network import DiscoClient
    x = np.load(work / "x.npy")
    ref = np.load(work / "ref.npy")
    with DiscoClient(out, peers, insecure=True, timeout=TIMEOUT, connect_timeout=60, threads=1,
                     max_in_flight=inflight) as client:
        y, = client([x])
        for _ in range(4):
            client([x])
        lat = []
        for _ in range(reps):
            t0 = time.perf_counter()
            client([x])
            lat.append(time.perf_counter() - t0)
        client.map([[x]] * inflight)  # warm the pool threads
        print("PIPE", flush=True)  # the parent reads node 1's CPU time at these two marks
        t0, c0 = time.perf_counter(), time.process_time()
        ys = client.map([[x]] * pipe)
        tput = pipe / (time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / pipe  # node 0's CPU seconds per inference, pipelined
        print("DONE", flush=True)
    print(json.dumps({"lat": lat, "tput": tput, "cpu0": cpu, "maxdiff": float(np.abs(y - ref).max()),
                      "pipe_maxdiff": float(max(np.abs(o[0] - ys[0][0]).max() for o in ys))}))


def _accept(port: int):
    """The first connection to node 1's port (the probes' server side)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ADDR[1], port))
    srv.listen(1)
    return srv.accept()[0]


def _connect(port: int):
    """A connection from node 0 to node 1's port, retried while node 1 starts listening."""
    for _ in range(100):
        try:
            return socket.create_connection((ADDR[1], port))
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"node 1 does not listen on port {port}")


def child_sink(port: int) -> None:
    c = _accept(port)
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    c.close()


def child_echo(port: int) -> None:
    """Node 1 of the message-time probe: for each message (an 8-byte length, then that many bytes), read
    it whole, then answer one byte."""
    c = _accept(port)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    while True:
        head = c.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            break
        left = int.from_bytes(head, "little")
        while left:
            left -= c.recv_into(buf, min(left, len(buf)))
        c.sendall(b"k")
    c.close()


def child_message_times(port: int, reps: int) -> None:
    """Node 0 of the probe: the time from sending a message of each size in MESSAGE_SIZES (after 20 ms with
    the link idle) to the one-byte answer that node 1 sends once it holds the whole message; median of reps."""
    c = _connect(port)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = {}
    for size in MESSAGE_SIZES:
        data = size.to_bytes(8, "little") + b"\0" * size
        t = []
        for _ in range(reps + 2):
            time.sleep(0.02)
            t0 = time.perf_counter()
            c.sendall(data)
            c.recv(1)
            t.append(time.perf_counter() - t0)
        times[size] = statistics.median(t[2:])
    c.close()
    print(json.dumps({"times": times}))


def child_source(port: int, mbytes: int) -> None:
    c = _connect(port)
    buf = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(mbytes):
        c.sendall(buf)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print(json.dumps({"rate_bps": mbytes * (1 << 20) * 8 / (time.perf_counter() - t0)}))


# ================================================================ namespaces

def cleanup() -> None:
    for ns in NS:
        sh(["ip", "netns", "del", ns], check=False)  # deleting a namespace removes its veth end too


def setup_net() -> None:
    cleanup()
    for ns in NS:
        sh(["ip", "netns", "add", ns])
    sh(["ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1]])
    for ns, dev, addr in zip(NS, VETH, ADDR, strict=True):
        sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
        sh(["ip", "-n", ns, "link", "set", dev, "up"])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])


def link_bps(link: str) -> float | None:
    """A link's rate in bit/s (None: unshaped). A link is RATE[@B[/G]]: a RATES name, optionally with its own
    tbf bucket B and TSO packet cap G in bytes."""
    return RATES[link.partition("@")[0]]


def link_shaping(link: str) -> tuple[int, int]:
    """(tbf bucket bytes, gso_max_size) of a shaped link."""
    rate, _, own = link.partition("@")
    if not own:
        return SHAPING[rate]
    burst, _, gso = own.partition("/")
    return int(burst), int(gso or GSO_DEFAULT)


def shape(link: str) -> list[str]:
    cmds = []
    burst, gso = link_shaping(link) if link_bps(link) is not None else (None, GSO_DEFAULT)
    for ns, dev in zip(NS, VETH, strict=True):
        sh(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        cap = ["ip", "-n", ns, "link", "set", "dev", dev, "gso_max_size", str(gso)]
        sh(cap)
        if burst is not None:
            cmd = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", link.partition("@")[0], "burst",
                   f"{burst}b", "latency", "400ms"]
            cmds.append(" ".join(cap))
            sh(["ip", "netns", "exec", ns] + cmd)
            cmds.append(f"ip netns exec {ns} " + " ".join(cmd))
    return cmds


CHILDREN: list[subprocess.Popen] = []


def in_ns(k: int, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NS[k], "taskset", "-c", str(k)] + argv


def run_child(k: int, argv: list[str], timeout: float) -> dict:
    p = subprocess.Popen(in_ns(k, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    CHILDREN.append(p)
    out, err = p.communicate(timeout=timeout)
    CHILDREN.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def message_times(reps: int) -> dict:
    echo = subprocess.Popen(in_ns(1, [PY, __file__, "_echo", str(PORTS[1] + 11)]), cwd=ROOT)
    CHILDREN.append(echo)
    try:
        return run_child(0, [PY, __file__, "_message_times", str(PORTS[1] + 11), str(reps)], 300)["times"]
    finally:
        echo.wait(10)
        CHILDREN.remove(echo)


def link_rate(rate: str) -> float:
    sink = subprocess.Popen(in_ns(1, [PY, __file__, "_sink", str(PORTS[1] + 10)]), cwd=ROOT)
    CHILDREN.append(sink)
    try:
        mb = 200 if rate != "100mbit" else 40
        return run_child(0, [PY, __file__, "_source", str(PORTS[1] + 10), str(mb)], 120)["rate_bps"]
    finally:
        sink.wait(10)
        CHILDREN.remove(sink)


def run_disco(work: Path, wl: str, args) -> dict:
    out = work / wl
    peers = work / "peers.yaml"
    worker_cmd = [str(ROOT / ".venv/bin/disco-run"), str(out), "--node", "1", "--peers", str(peers), "--insecure",
                  "--timeout", str(TIMEOUT), "--connect-timeout", "60", "--threads", "1"]
    worker = subprocess.Popen(in_ns(1, worker_cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    CHILDREN.append(worker)
    try:
        client = subprocess.Popen(in_ns(0, [PY, __file__, "_client", str(out), str(peers), str(work),
                                            str(args.reps), str(args.pipe), str(args.inflight)]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        CHILDREN.append(client)

        def cpu1():  # ip netns exec and taskset exec: worker.pid is disco-run itself
            f = open(f"/proc/{worker.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        marks, last = [], ""
        for line in client.stdout:
            if line.strip() in ("PIPE", "DONE"):
                marks.append(cpu1())
            last = line
        err = client.stderr.read()
        client.wait(900)
        CHILDREN.remove(client)
        if client.returncode != 0:
            raise RuntimeError(f"client exited {client.returncode}:\n{err[-3000:]}")
        res = json.loads(last)
        res["cpu1"] = (marks[1] - marks[0]) / args.pipe  # node 1's CPU seconds per inference, pipelined
        _, err = worker.communicate(timeout=30)
        res["worker_rc"] = worker.returncode
        if worker.returncode != 0:
            res["worker_err"] = err[-2000:]
        return res
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(10)
        CHILDREN.remove(worker)


# ================================================================ main

def schedule_bytes(work: Path, wl: str) -> dict:
    sched = json.loads((work / wl / "schedule.json").read_text())
    by = {}
    for m in sched["messages"]:
        by[f"{m['src']}->{m['dst']}"] = by.get(f"{m['src']}->{m['dst']}", 0) + m["bytes"]
    return by


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/netbench"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--pipe", type=int, default=40)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--compute-reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the workloads of each link this many times in turn, pooling their latencies (the "
                         "machine's speed drifts: interleaving compares workloads under the same drift)")
    ap.add_argument("--rates", default="unshaped,1gbit,100mbit",
                    help="links to measure: unshaped, 1gbit, 100mbit, each optionally with its own tbf bucket "
                         "after an @ (1gbit@4000)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="a subset of " + ",".join(WORKLOADS))
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "latency.md")
    args = ap.parse_args()
    bad = [r for r in args.rates.split(",") if r.partition("@")[0] not in RATES
           or not re.fullmatch(r"(\d+(/\d+)?)?", r.partition("@")[2]) or ("@" in r and RATES[r.split("@")[0]] is None)]
    if bad:
        ap.error(f"--rates: cannot read {', '.join(bad)}; a link is one of {', '.join(RATES)}, a shaped one "
                 f"optionally with @BUCKET or @BUCKET/GSO_MAX_SIZE in bytes (1gbit@4000)")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        ap.error(f"--workloads: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    return args


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, tc)")
    work = args.work.resolve()

    def on_signal(signum, frame):
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    prepare(work)
    peers = enumerate(zip(ADDR, PORTS, strict=True))
    (work / "peers.yaml").write_text("".join(f"{k}: {a}:{p}\n" for k, (a, p) in peers))
    print("compute alone ...", flush=True)
    comp = json.loads(sh(["taskset", "-c", "1", PY, __file__, "_compute", str(work), str(args.compute_reps)],
                         cwd=ROOT).stdout.strip().splitlines()[-1])
    print(json.dumps(comp), flush=True)
    results = {"compute": comp, "bytes": {wl: schedule_bytes(work, wl) for wl in SPLITS},
               "runs": {}, "tc": {}, "link": {}, "message_times": {}}
    try:
        setup_net()
        for rate in args.rates.split(","):
            results["tc"][rate] = shape(rate)
            results["link"][rate] = link_rate(rate)
            results["message_times"][rate] = message_times(PROBE_REPS)
            print(f"[{rate}] TCP bulk rate {results['link'][rate] / 1e6:.0f} Mbit/s; message times (ms) "
                  + ", ".join(f"{int(k) >> 10} KB {v * 1e3:.2f}" for k, v in results["message_times"][rate].items()),
                  flush=True)
            for k, wl in ((k, wl) for k in range(args.rounds) for wl in args.workloads.split(",")):
                t0 = time.time()
                if wl == "whole":
                    r = run_child(1, [PY, __file__, "_whole", str(work), str(args.reps), str(args.pipe)], 600)
                else:
                    r = run_disco(work, wl, args)
                r["wall_s"] = time.time() - t0
                results["runs"][f"{wl}/{rate}"] = pooled(results["runs"].get(f"{wl}/{rate}"), r)
                print(f"[{rate}] round {k + 1} {wl}: median {statistics.median(r['lat']) * 1e3:.1f} ms, "
                      f"p90 {_p90(r['lat']) * 1e3:.1f} ms, {r['tput']:.2f}/s "
                      f"({r['wall_s']:.0f} s)", flush=True)
                (work / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        for p in list(CHILDREN):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        cleanup()
    (work / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(results, args)


def _p90(v):
    v = sorted(v)
    return v[int(0.9 * (len(v) - 1))]


def pooled(before: dict | None, r: dict) -> dict:
    """One workload's results over rounds: every latency; throughput and CPU per inference averaged."""
    if before is None:
        return dict(r, rounds=[r])
    rounds = before["rounds"] + [r]
    return dict(r, rounds=rounds, lat=[x for q in rounds for x in q["lat"]],
                **{k: statistics.mean(q[k] for q in rounds) for k in ("tput", "cpu0", "cpu1", "wall_s") if k in r})


def bound(results, wl, rate) -> float:
    comp = results["compute"]
    if wl == "whole":
        return comp["whole"]
    c = max(comp[f"{wl}0"], comp[f"{wl}1"])
    if link_bps(rate) is None:
        return c
    return max(c, max(results["bytes"][wl].values()) * 8 / link_bps(rate))


def one_way(results) -> float:
    """Seconds a message takes besides its time on the wire: half the shortest unshaped message time (a round
    trip of a small message and its one-byte answer), 0 when the probe did not run."""
    times = results.get("message_times", {}).get("unshaped")
    return min(times.values()) / 2 if times else 0.0


def schedule_bound(results, work: Path, wl, rate) -> float:
    """The latency the export's schedule allows at this link (disco_compile.runtime.estimate, as `disco-run
    estimate` computes it): every stage's time measured alone, each direction at the link's nominal rate and
    `one_way` per message."""
    if wl == "whole":
        return results["compute"]["whole"]
    sched = Schedule.from_json(json.loads((work / wl / "schedule.json").read_text()))
    bps = link_bps(rate)
    return estimate(sched, results["compute"][f"{wl}_stage_times"], [None if bps is None else bps / 8],
                    latency=one_way(results))[0].latency


def message_table(results) -> list[str]:
    times = results.get("message_times", {})
    if "unshaped" not in times:
        return []
    shaped = [r for r in times if link_bps(r) is not None]
    lines = ["Message time (ms): a message sent after 20 ms of idle link until node 1 holds all of it and its "
             f"one-byte answer is back, median of {PROBE_REPS}. \"at rate\": the shortest unshaped time (the round "
             "trip itself) plus the message on the wire (payload x 1514/1448 for the Ethernet, IP and TCP headers) "
             "at the link rate: "
             "what a link that never sends faster than its rate takes. tbf bucket and TSO packet cap (bytes): "
             + "; ".join(
                 f"{r} {link_shaping(r)[0]}, {link_shaping(r)[1]}" for r in shaped) + ".", "",
             "| message | unshaped | " + " | ".join(f"{r} | {r} at rate" for r in shaped) + " |",
             "|---|---|" + "---|---|" * len(shaped)]
    fixed = min(times["unshaped"].values())  # the round trip itself, without a transfer time to speak of
    for size, base in times["unshaped"].items():
        cells = [f"{int(size) / 1024:.0f} KB", f"{base * 1e3:.2f}"]
        for r in shaped:
            cells += [f"{times[r][size] * 1e3:.2f}", f"{(fixed + int(size) * WIRE * 8 / link_bps(r)) * 1e3:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


# (DISCO workload, the dense workload it is compared with, how they are exported) in the Goals section
GOAL_PAIRS = (("disco", "dense", "with overlap"), ("disco_no_overlap", "dense_no_overlap", "without overlap"),
              ("disco_uniform", "dense", "uniform allocation, with overlap"),
              ("disco_uniform_no_overlap", "dense_no_overlap", "uniform allocation, without overlap"),
              ("disco_cw", "dense", f"compute weight {COMPUTE_WEIGHT:g}, with overlap"),
              ("disco_cw_no_overlap", "dense_no_overlap", f"compute weight {COMPUTE_WEIGHT:g}, without overlap"))


def latency_table(results, args, rates) -> tuple[list[str], dict, dict]:
    """The results table (a row per workload and link), the measured (median latency, throughput) and the
    schedule's latency per (workload, link)."""
    lines = ["| workload | link | median ms | p90 ms | throughput /s | bound ms | median/bound | throughput x bound "
             "| schedule ms | median/schedule |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    med, sched = {}, {}
    for wl in WORKLOADS:
        for rate in rates:
            r = results["runs"].get(f"{wl}/{rate}")
            if r is None:
                continue
            m = statistics.median(r["lat"])
            med[(wl, rate)] = (m, r["tput"])
            b = bound(results, wl, rate)
            sched[(wl, rate)] = t = schedule_bound(results, args.work.resolve(), wl, rate)
            lines.append(f"| {LABEL[wl]} | {rate} | {m * 1e3:.1f} | {_p90(r['lat']) * 1e3:.1f} | {r['tput']:.2f} | "
                         f"{b * 1e3:.1f} | {m / b:.2f} | {r['tput'] * b:.2f} | {t * 1e3:.1f} | {m / t:.2f} |")
    return lines, med, sched


def compute_lines(results, args) -> list[str]:
    """What bound and schedule mean, and each node's compute alone."""
    comp = results["compute"]
    return [
        "Bound = max(slowest node's compute alone, bytes in the busier direction / link rate); for the "
        "whole model, its compute alone. `throughput x bound` is the achieved fraction of the bound's "
        "throughput (1/bound). Schedule = the latency the export's schedule allows with no runtime cost "
        "(`disco_compile.runtime.timeline`): each node runs its stages in order, each stage taking its time measured "
        "alone and starting once the messages it reads have arrived; each direction of the link carries one "
        "message at a time, in the order sent, at the nominal rate (payload x 1514/1448), plus "
        f"{one_way(results) * 1e3:.2f} ms per message (half the shortest unshaped message time below). It is "
        "at least the bound, and above it where a node must wait for a message that could not have come "
        "sooner; the measured latency's excess over it is the runtime (Python, ZeroMQ, the kernel's TCP "
        "work on the nodes' own cores) and the two nodes slowing each other.", "",
        f"Compute alone (ms; each stage's median over {args.compute_reps} interleaved passes, summed per node; "
        f"one thread, core 1): whole "
        f"{comp['whole'] * 1e3:.1f}; " + "; ".join(
            f"{LABEL[wl]}: node0 {comp[wl + '0'] * 1e3:.1f}, node1 {comp[wl + '1'] * 1e3:.1f} "
            f"({comp[wl + '_stages'][0]} and {comp[wl + '_stages'][1]} stages; critical path of the stage "
            f"graph with every stage timed alone and zero communication cost "
            f"{comp[wl + '_critical_path'] * 1e3:.1f})" for wl in SPLITS) + ".",
        "", "Without overlap a node waits for a layer's messages and runs the layer as one convolution over its "
        "own and the received channels (about half the stages, faster kernels); with overlap it computes its "
        "own channels' share while the messages are in flight. DISCO keeps channel counts that are multiples "
        "of 8 (`--align 8`, disco-compile's default)."]


def cpu_table(results, rates) -> list[str]:
    """CPU seconds per inference on each node, pipelined, against its compute alone."""
    comp = results["compute"]
    return ["CPU seconds per inference during the pipelined phase (node 0: the client process's "
            "process_time; node 1: utime+stime of the disco-run process from /proc), against the node's "
            "onnxruntime compute alone:", "",
            "| workload | link | node 0 CPU ms | node 1 CPU ms | compute alone ms (n0/n1) |",
            "|---|---|---|---|---|",
            *[f"| {LABEL[wl]} | {rate} | {r['cpu0'] * 1e3:.1f} | {r['cpu1'] * 1e3:.1f} | "
              f"{comp[wl + '0'] * 1e3:.1f} / {comp[wl + '1'] * 1e3:.1f} |"
              for wl in SPLITS for rate in rates
              for r in [results["runs"].get(f"{wl}/{rate}")] if r and "cpu1" in r]]


def transfer_lines(results) -> list[str]:
    """Bytes per inference and the measured TCP bulk rates."""
    return ["Bytes per inference (schedule.json): " + "; ".join(
                f"{wl} " + ", ".join(f"{d} {b / 1e6:.2f} MB" for d, b in sorted(results["bytes"][wl].items()))
                for wl in SPLITS) + ".", "",
            "Measured TCP bulk rate node0->node1 (one connection, Python sockets): " + ", ".join(
                f"{r} {v / 1e6:.0f} Mbit/s" for r, v in results["link"].items()) + "."]


def goal_lines(results, rates, med: dict, sched: dict) -> list[str]:
    """Each goal's measured ratio and the same ratio between the schedules."""
    def ratio(a, b, rate):
        if (a, rate) in med and (b, rate) in med:
            return med[(b, rate)][0] / med[(a, rate)][0], med[(a, rate)][1] / med[(b, rate)][1]
        return None
    lines = []
    for disco, dense, how in GOAL_PAIRS:
        goals = ((dense, "100mbit", ">= 4x"), (dense, "1gbit", ">= 4x"), ("whole", "1gbit", "> 1x (faster)"),
                 ("whole", "unshaped", ">= 1.8x"))
        for b, rate, goal in ((b, link, goal) for b, base, goal in goals for link in rates
                              if link.partition("@")[0] == base):
            r = ratio(disco, b, rate)
            if r:
                lines.append(f"- {how}: DISCO vs {'dense' if b == dense else b} at {rate}: latency {r[0]:.2f}x "
                             f"faster, throughput {r[1]:.2f}x (goal {goal}); the schedules alone "
                             f"{sched[(b, rate)] / sched[(disco, rate)]:.2f}x")
        for rate in rates:
            if (disco, rate) in med:
                b = bound(results, disco, rate)
                lines.append(f"- {how}: DISCO latency / bound at {rate}: {med[(disco, rate)][0] / b:.2f} "
                             f"(goal <= 1.3); the schedule alone {sched[(disco, rate)] / b:.2f}")
    return lines


def command_lines(results, args) -> list[str]:
    """The benchmark's command and what it runs."""
    return ["## Commands", "", "```", "sudo .venv/bin/python benchmarks/netbench.py " + " ".join(sys.argv[1:]),
            "```", "", "What it runs (namespaces discobench0/discobench1, veth dbveth0/dbveth1):", "", "```",
            "ip netns add discobench0; ip netns add discobench1",
            "ip link add dbveth0 netns discobench0 type veth peer name dbveth1 netns discobench1",
            "ip -n discobench0 addr add 10.77.0.1/24 dev dbveth0; "
            "ip -n discobench1 addr add 10.77.0.2/24 dev dbveth1",
            "ip -n discobench{0,1} link set dbveth{0,1} up",
            *[line for link, cs in results["tc"].items() if cs for line in (f"# {link}", *cs)],
            "# peers.yaml: 0: 10.77.0.1:47100 / 1: 10.77.0.2:47101",
            f"ip netns exec discobench1 taskset -c 1 .venv/bin/disco-run OUT --node 1 --peers peers.yaml --insecure "
            f"--timeout {TIMEOUT} --connect-timeout 60 --threads 1",
            f"ip netns exec discobench0 taskset -c 0 python benchmarks/netbench.py _client OUT peers.yaml WORK "
            f"{args.reps} {args.pipe} {args.inflight}   # DiscoClient(max_in_flight={args.inflight})",
            f"ip netns exec discobench1 taskset -c 1 python benchmarks/netbench.py _whole WORK "
            f"{args.reps} {args.pipe}",
            "```", "", f"Latency: {args.reps} sequential requests after 5 warm-up; throughput: {args.pipe} requests "
            f"submitted at once, {args.inflight} in flight (whole model: back to back)"
            + (f"; each link's workloads run {args.rounds} times in turn, the latencies pooled and the "
               f"throughputs and CPU times averaged" if args.rounds > 1 else "") + ".", ""]


def write_doc(results, args) -> None:
    rates = [r for r in results["tc"] if any(k.endswith("/" + r) for k in results["runs"])]
    table, med, sched = latency_table(results, args, rates)
    lines = ["# Latency over a network: ResNet-50 on 2 nodes", "",
             f"Measured {datetime.date.today().isoformat()} by `benchmarks/netbench.py` on {platform.node()}: "
             f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             "both nodes on this one machine, each in its own network namespace, pinned to its own core. "
             "onnxruntime 1 thread per node. Input 1x3x224x224, `zoo.build(\"resnet50\", 224)`.", "",
             *table, "",
             *compute_lines(results, args), "",
             *cpu_table(results, rates), "",
             *transfer_lines(results), "",
             *message_table(results),
             "## Goals", "",
             "Each goal's measured ratio, then the same ratio between the schedules (the Schedule column: what the "
             "exports allow with no runtime cost): a goal the schedules miss cannot be met by a faster runtime "
             "with these exports on this machine.", "",
             *goal_lines(results, rates, med, sched), "",
             *command_lines(results, args)]
    args.doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        cmd, rest = sys.argv[1], sys.argv[2:]
        if cmd == "_compute":
            child_compute(Path(rest[0]), int(rest[1]))
        elif cmd == "_whole":
            child_whole(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif cmd == "_client":
            child_client(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), int(rest[4]), int(rest[5]))
        elif cmd == "_sink":
            child_sink(int(rest[0]))
        elif cmd == "_source":
            child_source(int(rest[0]), int(rest[1]))
        elif cmd == "_echo":
            child_echo(int(rest[0]))
        elif cmd == "_message_times":
            child_message_times(int(rest[0]), int(rest[1]))
    else:
        main()
