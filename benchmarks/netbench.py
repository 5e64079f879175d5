"""Latency and throughput of a model split across N nodes over a shaped network, at this machine's speed and
on edge-class (slowed) cores (run as root).

Network (benchmarks/netbench_net.py): node k in namespace discobench{k}, all on one bridge (a switch with a
full-duplex port per node), every port shaped with tbf in both directions for the links 1gbit and 100mbit,
or left unshaped. Node k runs on core k mod the CPU count (onnxruntime one thread per node): with more nodes
than cores, nodes share cores, and the report says which.

Speeds (benchmarks/netbench_cgroup.py): this machine's cores, and for each --slow F a core F times slower:
every node process (and the whole model) in its own CPU-bandwidth cgroup, Q us of CPU per --period-us P,
with Q calibrated before the runs by timing the whole model alone with and without the group until the
measured factor is within 3% of F; the report gives the measured factor and the kernel's setting, and the
whole model is measured again at every link at every speed in the same run.

Workloads (--model at --size, zoo.build; every split for each N of --nodes):
  whole   the original model exported with torch.onnx.export(dynamo=False, opset 17), timed with
          onnxruntime (1 thread) in namespace 1, no network: one node of the same speed;
  dense   transform(model, N, x) (rho=1), export;
  disco   the same after set_budget(Budget(0.2, "global", align=8, compute_weight=0)), export;
  disco_uniform   Budget(0.2, "uniform", align=8): every exchange cut by the budget;
  disco_cw   Budget(0.2, "global", align=8, compute_weight=0.1): channels ranked per (bytes + 0.1 x MACs);
  disco_int8, disco_int4, disco_r0.1_int8   disco's selection at wire int8 / int4 (rho 0.1 for the last), scales
          calibrated on the benchmark input (ops/wire.py);
  *_no_overlap   the same exported with overlap=False (a node waits for a layer's messages, then runs it as one
          convolution).
For a split, nodes 1..N-1 run `disco-run OUT --node k --peers peers.yaml --insecure` and node 0 is a driver
(this file, `_client`) using DiscoClient: median and p90 latency of sequential requests after warm-up, and
throughput with --pipelined K requests in flight (DiscoClient(max_in_flight=K), `map` of --pipe requests).

Model bound per configuration: max(slowest node's compute alone (its stages with pre-captured inputs, one
onnxruntime thread, no network, at that speed; each stage's median scaled so that a node's stages sum to
the median of its whole passes, which keeps a throttled core's waits in), the most bytes any one switch
port carries in one direction per inference / link rate). Schedule: the latency the export's schedule
allows with no runtime cost (disco_compile.runtime.estimate); it treats each ordered pair of nodes as its
own link, so for N > 2, where a node's messages to several peers share its port, it can be below the
model bound's link term.

Run:  sudo .venv/bin/python benchmarks/netbench.py [--work /tmp/netbench] [--model resnet50 --size 224]
      [--nodes 2,3,4] [--links unshaped,1gbit,100mbit] [--slow 4.6] [--pipelined 4]
      [--workloads whole,dense,disco] [--doc docs/latency.md]
Writes --doc (results, commands; its hand-written "## Observations" section is kept) and WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _perfdoc  # noqa: E402
import netbench_cgroup as cg  # noqa: E402
import netbench_net as net  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PROBE_REPS = 20  # messages of each size in the message-time probe
COMPUTE_WEIGHT = 0.1  # bytes per MAC of the disco_cw workloads (--compute-weight; selection.py)
_BASE = {"dense": (1.0, "global", 0.0, "fp32"), "disco": (0.2, "global", 0.0, "fp32"),
         "disco_uniform": (0.2, "uniform", 0.0, "fp32"), "disco_cw": (0.2, "global", COMPUTE_WEIGHT, "fp32"),
         "disco_int8": (0.2, "global", 0.0, "int8"), "disco_int4": (0.2, "global", 0.0, "int4"),
         "disco_r0.1_int8": (0.1, "global", 0.0, "int8")}  # budget, allocation, compute weight, wire
EXPORTS = {f"{name}{suffix}": (rho, overlap, allocation, weight, wire)
           for name, (rho, allocation, weight, wire) in _BASE.items()
           for suffix, overlap in (("", True), ("_no_overlap", False))}
SPLITS = tuple(EXPORTS)
WORKLOADS = ("whole", *SPLITS)
TIMEOUT = 120.0  # disco-run --timeout: several requests queue on the workers at 100 Mbit/s
CAL_REPS = 7  # whole-model runs per calibration measurement


def ort_opts(ort):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.log_severity_level = 3
    return o


def speed_key(factor: float) -> str:
    return f"{factor:g}"


def split_key(nodes: int, wl: str) -> str:
    return f"n{nodes}/{wl}"


def model_dir(work: Path, model: str, size: int) -> Path:
    """Where a model's exports live in WORK: whole.onnx, x.npy, ref.npy, n{N}/{workload}/ (`split_key`)."""
    return (work / f"{model}_{size}").resolve()


def run_key(speed: str, nodes: int, wl: str, link: str) -> str:
    return f"{speed}/{split_key(1 if wl == 'whole' else nodes, wl)}/{link}"


# ================================================================ preparation (torch, outside namespaces)

def prepare(work: Path, model_name: str, size: int, nodes: list[int], splits: list[str]) -> None:
    """Export what WORK lacks (an export left from an earlier run is kept: the model is built the same way)."""
    missing = [(n, wl) for n in nodes for wl in splits if not (work / split_key(n, wl) / "manifest.json").exists()]
    if not missing and (work / "whole.onnx").exists():
        return
    import numpy as np
    import torch
    from disco_compile import Budget, transform
    from disco_compile.backend.exporter import export
    from disco_compile.frontend.zoo import build
    work.mkdir(parents=True, exist_ok=True)
    model, x = build(model_name, size)
    np.save(work / "x.npy", x.numpy())
    torch.onnx.export(model, (x,), str(work / "whole.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    np.save(work / "ref.npy", model(x).detach().numpy())
    t = time.time()
    for n in sorted({n for n, _ in missing}):
        dm = transform(model, n, x)
        for wl in (wl for m, wl in missing if m == n):
            budget, overlap, allocation, weight, wire = EXPORTS[wl]
            dm.set_budget(Budget(budget, allocation, align=8, compute_weight=weight, wire=wire))
            dm.calibrate_wire([x])  # integer wires: scales from the benchmark input (ops/wire.py)
            export(dm, work / split_key(n, wl), force=True, overlap=overlap)  # align 8: disco-compile's default
    print(f"exported {', '.join(split_key(n, wl) for n, wl in missing)} in {time.time() - t:.0f} s", flush=True)


# ================================================================ children (numpy + onnxruntime only)

def scaled_medians(per_stage: list[list[float]]) -> tuple[float, list[float]]:
    """(scale, stage times) from `per_stage[i][p]`, stage i's seconds in pass p: each stage's median times
    scale = median over passes of the pass's total / sum of the medians. On a throttled core most short stages
    run within the period's quota and now and then one waits out the period, so the medians alone would leave
    the throttling out; on a quiet core at full speed the scale is ~1."""
    medians = [statistics.median(v) for v in per_stage]
    scale = statistics.median(map(sum, zip(*per_stage, strict=True))) / sum(medians)
    return scale, [m * scale for m in medians]


def child_compute(work: Path, reps: int, keys: list[str]) -> None:
    """Per-node compute alone of the splits `keys` (n{N}/{workload}: stages with pre-captured inputs, the sum
    of each stage's median) and the whole model, one thread, interleaved passes."""
    import numpy as np
    import onnxruntime as ort
    from node_compute import _capture, _fetch

    from disco_compile.artifact.schedule import Schedule
    from disco_compile.runtime.timeline import timeline
    x = np.load(work / "x.npy")
    res = {}
    whole = ort.InferenceSession(str(work / "whole.onnx"), ort_opts(ort), providers=["CPUExecutionProvider"])
    targets = {"whole": [(whole, None, {"x": x})]}
    for key in keys:
        sched = json.loads((work / key / "schedule.json").read_text())
        sessions = [[ort.InferenceSession(str(work / key / st["file"]), ort_opts(ort),
                                          providers=["CPUExecutionProvider"]) for st in p] for p in sched["programs"]]
        feeds, _, outputs = _capture(sched, sessions, x)
        y = outputs[sched["outputs"][0]["name"]]
        res[f"{key}_maxdiff_vs_torch"] = float(np.abs(y - np.load(work / "ref.npy")).max())
        for k, prog in enumerate(sched["programs"]):
            targets[f"{key}#{k}"] = [(s, _fetch(st), f) for s, st, f in zip(sessions[k], prog, feeds[k], strict=True)]
    times = {t: [[] for _ in targets[t]] for t in targets}
    names = list(targets)
    for rep in range(reps + 3):
        for t in names[rep % len(names):] + names[:rep % len(names)]:
            for i, (s, fetch, feed) in enumerate(targets[t]):
                t0 = time.perf_counter()
                s.run(fetch, feed)
                if rep >= 3:
                    times[t][i].append(time.perf_counter() - t0)
    stage_times = {}
    for t, per in times.items():
        res[f"{t}_scale"], stage_times[t] = scaled_medians(per)
    res["whole"] = sum(stage_times["whole"])
    for key in keys:
        sched = Schedule.from_json(json.loads((work / key / "schedule.json").read_text()))
        res[f"{key}_stage_times"] = st_t = [stage_times[f"{key}#{k}"] for k in range(sched.nodes)]
        res[key] = [sum(p) for p in st_t]
        res[f"{key}_critical_path"] = timeline(sched, st_t).latency
        res[f"{key}_stages"] = [len(p) for p in st_t]
    print(json.dumps(res))


def child_whole(work: Path, reps: int, pipe: int) -> None:
    import numpy as np
    import onnxruntime as ort
    s = ort.InferenceSession(str(work / "whole.onnx"), ort_opts(ort), providers=["CPUExecutionProvider"])
    x = np.load(work / "x.npy")
    for _ in range(5):
        s.run(None, {"x": x})
    lat, c0 = [], time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        lat.append(time.perf_counter() - t0)
    share = (time.process_time() - c0) / sum(lat)  # of its core: below 1 when others share it (or a quota binds)
    t0 = time.perf_counter()
    for _ in range(pipe):  # one thread, one core: back-to-back is its throughput
        s.run(None, {"x": x})
    print(json.dumps({"lat": lat, "cpu_share": share, "tput": pipe / (time.perf_counter() - t0) if pipe else 0.0}))


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
        print("PIPE", flush=True)  # the parent reads the workers' CPU time at these two marks
        t0, c0 = time.perf_counter(), time.process_time()
        ys = client.map([[x]] * pipe)
        tput = pipe / (time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / pipe  # node 0's CPU seconds per inference, pipelined
        print("DONE", flush=True)
    print(json.dumps({"lat": lat, "tput": tput, "cpu0": cpu, "maxdiff": float(np.abs(y - ref).max()),
                      "pipe_maxdiff": float(max(np.abs(o[0] - ys[0][0]).max() for o in ys))}))


# ================================================================ running the children

CHILDREN: list[subprocess.Popen] = []


def start(argv: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(argv, cwd=ROOT, **kw)
    CHILDREN.append(p)
    return p


def run_child(argv: list[str], timeout: float) -> dict:
    """Run a child to its end; the JSON object on its last line."""
    p = start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    CHILDREN.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def stop_children() -> None:
    for p in list(CHILDREN):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        CHILDREN.remove(p)


def paired(server: list[str], client: list[str], timeout: float) -> dict:
    """A probe: `server` in node 1's namespace, `client` in node 0's."""
    srv = start(net.in_ns(1, server))
    try:
        return run_child(net.in_ns(0, client), timeout)
    finally:
        srv.wait(10)
        CHILDREN.remove(srv)


def link_rate(link: str) -> float:
    mb = 40 if link.startswith("100mbit") else 200
    port = str(net.PORT_BASE + 90)
    return paired([PY, __file__, "_sink", port], [PY, __file__, "_source", port, str(mb)], 120)["rate_bps"]


def message_times(reps: int) -> dict:
    port = str(net.PORT_BASE + 91)
    return paired([PY, __file__, "_echo", port], [PY, __file__, "_message_times", port, str(reps)], 300)["times"]


class Speed:
    """One speed class: this machine's cores (factor 1, no group) or cores slowed by a calibrated quota."""

    def __init__(self, factor: float, quota: int | None = None, period: int | None = None):
        self.factor, self.quota, self.period = factor, quota, period
        self.key = speed_key(factor)

    def wrap(self, k: int, argv: list[str]) -> list[str]:
        """`argv` as node k's process: in node k's own group when slowed."""
        if self.quota is None:
            return argv
        g = cg.group(f"_node{k}")
        g.set(self.quota, self.period)
        return g.argv(argv)


def calibrate(work: Path, factor: float, period: int) -> tuple[Speed, dict]:
    """The quota that slows the whole model (alone on core 1) by `factor`; the report records the share of its
    core the whole model had at full speed in each step (below 1: other processes on the core)."""
    shares = []

    def whole_time(group: cg.CpuGroup | None) -> float:
        argv = ["taskset", "-c", "1", PY, __file__, "_whole", str(work), str(CAL_REPS), "0"]
        r = run_child(argv if group is None else group.argv(argv), 600)
        if group is None:
            shares.append(r["cpu_share"])
        return statistics.median(r["lat"])
    cal = cg.calibrate(whole_time, cg.group("_calibrate"), factor, period)
    g = cg.group("_calibrate")
    g.set(cal.quota, period)
    report = {"target": factor, "period_us": period, "quota_us": cal.quota, "factor": cal.factor,
              "steps": cal.steps, "setting": g.setting(), "cgroup": g.version, "v2": cg.v2_status(),
              "full_speed_core_share": shares}
    print(f"--slow {factor:g}: quota {cal.quota} us per {period} us, measured {cal.factor:.2f}x "
          f"(steps: {', '.join(f'{q} us {s / b:.2f}x' for q, b, s in cal.steps)})", flush=True)
    return Speed(factor, cal.quota, period), report


def compute_alone(work: Path, speed: Speed, keys: list[str], reps: int) -> dict:
    argv = ["taskset", "-c", "1", PY, __file__, "_compute", str(work), str(reps), ",".join(keys)]
    return run_child(speed.wrap(1, argv), 3600)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds (ip netns exec, taskset and the cgroup shell exec: pid is disco-run)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def run_split(work: Path, nodes: int, wl: str, speed: Speed, args) -> dict:
    out, peers = work / split_key(nodes, wl), work / f"peers{nodes}.yaml"
    workers = [start(speed.wrap(k, net.in_ns(k, [
        str(ROOT / ".venv/bin/disco-run"), str(out), "--node", str(k), "--peers", str(peers), "--insecure",
        "--timeout", str(TIMEOUT), "--connect-timeout", "60", "--threads", "1"])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(1, nodes)]
    try:
        client = start(speed.wrap(0, net.in_ns(0, [PY, __file__, "_client", str(out), str(peers), str(work),
                                                   str(args.reps), str(args.pipe), str(args.pipelined)])),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        marks, last = [], ""
        for line in client.stdout:
            if line.strip() in ("PIPE", "DONE"):
                marks.append([proc_cpu(w.pid) for w in workers])
            last = line
        err = client.stderr.read()
        client.wait(900)
        CHILDREN.remove(client)
        if client.returncode != 0:
            raise RuntimeError(f"client of {split_key(nodes, wl)} exited {client.returncode}:\n{err[-3000:]}")
        res = json.loads(last)
        res["cpu"] = [res.pop("cpu0")] + [(b - a) / args.pipe for a, b in zip(*marks, strict=True)]
        for k, w in enumerate(workers, 1):
            _, err = w.communicate(timeout=30)
            if w.returncode != 0:
                res.setdefault("worker_err", {})[k] = err[-2000:]
        return res
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait(10)
            CHILDREN.remove(w)


def schedule_bytes(work: Path, key: str) -> dict:
    by = {}
    for m in json.loads((work / key / "schedule.json").read_text())["messages"]:
        by[f"{m['src']}->{m['dst']}"] = by.get(f"{m['src']}->{m['dst']}", 0) + m["bytes"]
    return by


def pooled(before: dict | None, r: dict) -> dict:
    """One workload's results over rounds: every latency; throughput and CPU per inference averaged."""
    if before is None:
        return dict(r, rounds=[r])
    rounds = before["rounds"] + [r]
    out = dict(r, rounds=rounds, lat=[x for q in rounds for x in q["lat"]],
               **{k: statistics.mean(q[k] for q in rounds) for k in ("tput", "wall_s")})
    if "cpu" in r:
        out["cpu"] = [statistics.mean(c) for c in zip(*(q["cpu"] for q in rounds), strict=True)]
    return out


# ================================================================ main

def _list(kind, text: str, what: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{what}: cannot read {text!r} as a comma-separated list") from exc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/netbench"))
    ap.add_argument("--model", default="resnet50", help="a torchvision name (zoo.build)")
    ap.add_argument("--size", type=int, default=224, help="input side")
    ap.add_argument("--nodes", default="2", help="node counts of the splits, comma-separated (2,3,4)")
    ap.add_argument("--links", default="unshaped,1gbit,100mbit",
                    help="unshaped, 1gbit, 100mbit; a shaped one optionally with its own tbf bucket (1gbit@4000)")
    ap.add_argument("--slow", default="", help="slowdown factors of edge-class cores run besides this machine's "
                    "speed, comma-separated (4.6)")
    ap.add_argument("--period-us", type=int, default=10000, help="CFS period (us) of the slowed nodes' cgroups")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--pipe", type=int, default=40, help="requests of the throughput phase")
    ap.add_argument("--pipelined", type=int, default=4, help="requests in flight in the throughput phase")
    ap.add_argument("--compute-reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the workloads of each link this many times in turn, pooling their latencies (the "
                         "machine's speed drifts: interleaving compares workloads under the same drift)")
    ap.add_argument("--workloads", default="whole,dense,disco", help="a subset of " + ",".join(WORKLOADS))
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "latency.md")
    args = ap.parse_args(argv)
    try:
        args.node_counts = _list(int, args.nodes, "--nodes")
        args.slow_factors = _list(float, args.slow, "--slow")
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    args.link_list = args.links.split(",")
    args.workload_list = args.workloads.split(",")
    problems = [e for e in map(net.link_error, args.link_list) if e]
    problems += [f"--nodes: {n} (a split has 2 nodes or more)" for n in args.node_counts if n < 2]
    problems += [f"--slow: {f:g} (a factor above 1: how many times slower than this machine's core)"
                 for f in args.slow_factors if f <= 1]
    problems += [f"--workloads: unknown {w}; choose from {', '.join(WORKLOADS)}"
                 for w in args.workload_list if w not in WORKLOADS]
    problems += [f"--pipelined {args.pipelined}: at least 1"] * (args.pipelined < 1)
    for f in args.slow_factors:
        try:
            cg.first_quota(f, args.period_us)
        except cg.CgroupError as exc:
            problems.append(str(exc))
    if problems:
        ap.error("; ".join(problems))
    return args


def units(args) -> list[tuple[str, int, str]]:
    """(speed, nodes, workload) of one round at one link: the whole model once per speed, every split per N."""
    speeds = ["1", *map(speed_key, args.slow_factors)]
    return [(s, n, wl) for s in speeds for wl in args.workload_list
            for n in ([1] if wl == "whole" else args.node_counts)]


def measure(work: Path, args, results: dict) -> None:
    """Calibrate the slow speeds, time compute alone at every speed, then run every link's workloads."""
    splits = [split_key(n, wl) for n in args.node_counts for wl in args.workload_list if wl != "whole"]
    speeds = {"1": Speed(1.0)}
    for f in args.slow_factors:
        speeds[speed_key(f)], results["calibration"][speed_key(f)] = calibrate(work, f, args.period_us)
    for key, speed in speeds.items():
        print(f"compute alone at speed {key} ...", flush=True)
        results["compute"][key] = compute_alone(work, speed, splits, args.compute_reps)
    net.setup(max(args.node_counts))
    for link in args.link_list:
        results["tc"][link] = net.shape(link, max(args.node_counts))
        results["link"][link] = link_rate(link)
        results["message_times"][link] = message_times(PROBE_REPS)
        print(f"[{link}] TCP bulk rate {results['link'][link] / 1e6:.0f} Mbit/s; message times (ms) "
              + ", ".join(f"{int(k) >> 10} KB {v * 1e3:.2f}" for k, v in results["message_times"][link].items()),
              flush=True)
        for k, (s, n, wl) in ((k, u) for k in range(args.rounds) for u in units(args)):
            t0 = time.time()
            if wl == "whole":
                r = run_child(speeds[s].wrap(1, net.in_ns(1, [PY, __file__, "_whole", str(work), str(args.reps),
                                                                str(args.pipe)])), 1800)
            else:
                r = run_split(work, n, wl, speeds[s], args)
            r["wall_s"] = time.time() - t0
            key = run_key(s, n, wl, link)
            results["runs"][key] = pooled(results["runs"].get(key), r)
            print(f"[{link}] round {k + 1} speed {s} N={n} {wl}: median {statistics.median(r['lat']) * 1e3:.1f} ms, "
                  f"{r['tput']:.2f}/s ({r['wall_s']:.0f} s)", flush=True)
            (work / "results.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("netbench: run as root (network namespaces, tc, cgroups): sudo .venv/bin/python "
                 "benchmarks/netbench.py ...")

    def on_signal(signum, frame):
        raise SystemExit(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    work = model_dir(args.work, args.model, args.size)
    splits = [wl for wl in args.workload_list if wl != "whole"]
    prepare(work, args.model, args.size, args.node_counts, splits)
    for n in args.node_counts:
        (work / f"peers{n}.yaml").write_text(net.peers_yaml(n))
    results = {"meta": {"model": args.model, "size": args.size, "nodes": args.node_counts,
                        "slow": args.slow_factors, "cpus": os.cpu_count(), "argv": sys.argv[1:],
                        "load_start": _perfdoc.load()},
               "calibration": {}, "compute": {}, "runs": {}, "tc": {}, "link": {}, "message_times": {},
               "bytes": {split_key(n, wl): schedule_bytes(work, split_key(n, wl))
                         for n in args.node_counts for wl in splits}}
    try:
        net.cleanup()
        cg.remove_all()
        measure(work, args, results)
    finally:
        stop_children()
        net.cleanup()
        removed = cg.remove_all()
        print(f"removed namespaces discobench*; cgroups: {', '.join(removed) or 'none'}", flush=True)
    results["meta"]["load_end"] = _perfdoc.load()
    (work / "results.json").write_text(json.dumps(results, indent=1))
    from netbench_doc import write_doc  # here: netbench_doc imports this module

    write_doc(results, args, work)


CHILD_COMMANDS = {"_compute": lambda a: child_compute(Path(a[0]), int(a[1]), [k for k in a[2].split(",") if k]),
                  "_whole": lambda a: child_whole(Path(a[0]), int(a[1]), int(a[2])),
                  "_client": lambda a: child_client(Path(a[0]), Path(a[1]), Path(a[2]), int(a[3]), int(a[4]),
                                                    int(a[5]))}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        import netbench_probe as probe
        probes = {"_sink": lambda a: probe.child_sink(int(a[0])), "_echo": lambda a: probe.child_echo(int(a[0])),
                  "_source": lambda a: probe.child_source(int(a[0]), int(a[1])),
                  "_message_times": lambda a: probe.child_message_times(int(a[0]), int(a[1]))}
        {**CHILD_COMMANDS, **probes}[sys.argv[1]](sys.argv[2:])
    else:
        main()
