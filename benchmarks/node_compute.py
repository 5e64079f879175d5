"""Per-node compute of an export against the whole model, on one onnxruntime thread.

ResNet-50 (torchvision, random BatchNorm-calibrated weights, input 1x3x224x224), N=2 nodes,
budget rho=0.2 (channels ranked over the whole model, aligned to 8 channels per message and exported
with overlap unless --allocation, --align, --no-overlap say otherwise, as disco-compile does),
exported once to a temporary directory with `export`; the original model is exported whole with
torch.onnx.export (dynamo=False, opset 17, symbolic batch like the stages). Ten export options,
overlap (yes/no) x (align 1 global, align 8 uniform, align 8 global, align 8 global with compute
weights 0.004 and 0.1), are also exported and their slowest node timed in the same passes (the export
options table).

Every onnxruntime session takes the runtime's options, as NodeExecutor(threads=1) (session_options in
disco_compile/runtime/executor.py: intra_op_num_threads=1, inter_op_num_threads=1, ORT_SEQUENTIAL,
default graph optimisations; stage sessions draw on one CPU arena registered for the process), and the
CPUExecutionProvider. The memory processes (5.) import only numpy and onnxruntime, so they build the
same options themselves; the timing process stops if those differ from the runtime's.

1. Node time / whole-model time. Every stage's inputs are captured by running all stages once
   in schedule order (messages and carried values kept in dicts; the result is checked against
   the DISCO model in torch). A node's time is one pass over its `session.run` calls with those
   pre-made inputs: pure compute, no waiting for messages. The whole model is one `session.run`.
   All targets (whole model, nodes, the diagnostics and overhead probes below) are timed
   interleaved, in rotating order, in one process; medians over --reps passes, ratios as
   medians of per-pass ratios. Goal: slowest node at most 0.40 of the whole model (its MAC
   share from dm.cost() is printed beside). Diagnostics: the same stages with an arena per
   session (onnxruntime's default), and each node's stages merged into one ONNX graph (built
   here: the node's compute without the cuts).
2. Per-call overhead of the stages, four ways: (a) a one-element Identity graph's call time
   times the number of stages; (b) for every stage an identity-like graph with the same inputs
   and outputs (dtypes, shapes; each output an Expand of a zero scalar, optimisations off so
   nothing is folded) timed with the same feeds; (b') the same with one-element outputs (the
   calls, bindings and output objects without writing the output data, which a real stage's
   last kernel does as part of its compute); (c) stages minus the merged graph. As a fraction
   of the node's time. Goal, judged by (b'): under 5%.
3. Where the time goes: onnxruntime's profiler (separate sessions, first pass skipped), per op
   kind, convolutions split into local (own channels) and remote (received channels) with
   their MAC rates.
4. Weight bytes: initializer bytes of a node's stage files against the whole model's ONNX file.
5. Peak memory: peak RSS (VmHWM, /proc/self/status) of a fresh process importing only numpy and
   onnxruntime that loads one node's stages (file bytes -> InferenceSession, as NodeExecutor)
   and runs them twice (messages read from .npy files when needed, carried values dropped after
   last use), against one that loads and runs the whole model; the same process with the
   imports alone is the baseline to subtract. Median of --mem-reps processes each,
   interleaved; with one shared arena (as NodeExecutor), the default per-session CPU arena, and
   without arena.

Prints the figures and rewrites the node_compute section of docs/performance.md.

Run: python benchmarks/node_compute.py [--reps 21] [--profile-reps 5] [--mem-reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _perfdoc  # noqa: E402  (standard library only: the child processes must not load torch)

GOAL_RATIO = 0.40
# (align, allocation, compute weight) of the export options table, each with and without overlap
VARIANTS = ((1, "global", 0.0), (8, "uniform", 0.0), (8, "global", 0.0), (8, "global", 0.004), (8, "global", 0.1))
GOAL_OVERHEAD = 0.05
ALLOCS = ("shared", "arena", "none")  # memory children: one shared arena (NodeExecutor), one per session, none


# ================================================================ children (no torch; memory: numpy + onnxruntime only)

_COMPARED_OPTIONS = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level",
                     "enable_cpu_mem_arena")
_ENV_ALLOCATORS = "session.use_env_allocators"


def _mem_options(ort, alloc: str):
    """The memory children's session options with allocator `alloc` (ALLOCS). Those processes import only
    numpy and onnxruntime, so they cannot call the runtime's session_options; the timing child checks that
    these are the same (`_check_mem_options`)."""
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.log_severity_level = 3
    o.enable_cpu_mem_arena = alloc != "none"
    if alloc == "shared":
        o.add_session_config_entry(_ENV_ALLOCATORS, "1")
    return o


def _option_values(o) -> dict[str, str | None]:
    try:
        env = o.get_session_config_entry(_ENV_ALLOCATORS)
    except RuntimeError:  # not set
        env = None
    return {name: str(getattr(o, name)) for name in _COMPARED_OPTIONS} | {_ENV_ALLOCATORS: env}


def _check_mem_options(ort, session_options) -> None:
    """Stop if the memory children's options differ from the runtime's (`session_options` of
    disco_compile.runtime.executor): with one shared arena as NodeExecutor, and with an arena per session."""
    for alloc, shared in (("shared", True), ("arena", False)):
        ours = _option_values(_mem_options(ort, alloc))
        runtime = _option_values(session_options(1, shared_arena=shared))
        if ours != runtime:
            raise RuntimeError(f"the memory children's session options ({alloc}) are {ours}, NodeExecutor's "
                               f"{runtime}: make _mem_options build the runtime's")


def _fetch(stage) -> list[str]:
    return list(dict.fromkeys(o["name"] for o in stage["outputs"]))


def _capture(schedule, sessions, x):
    """Run every node's stages in schedule order (any node whose next stage has its messages first);
    returns feeds[k][i], the messages and the model outputs."""
    programs = schedule["programs"]
    model_inputs = {schedule["inputs"][0]["name"]: x}
    messages, outputs = {}, {}
    carried = [dict() for _ in programs]
    feeds = [[None] * len(p) for p in programs]
    nxt = [0] * len(programs)
    while any(nxt[k] < len(p) for k, p in enumerate(programs)):
        progressed = False
        for k, prog in enumerate(programs):
            if nxt[k] >= len(prog):
                continue
            stage = prog[nxt[k]]
            if any(i["source"] == "message" and i["ref"] not in messages for i in stage["inputs"]):
                continue
            feed = {i["name"]: (model_inputs[i["ref"]] if i["source"] == "model_input" else
                                messages[i["ref"]] if i["source"] == "message" else carried[k][i["ref"]])
                    for i in stage["inputs"]}
            feeds[k][nxt[k]] = feed
            fetch = _fetch(stage)
            values = dict(zip(fetch, sessions[k][nxt[k]].run(fetch, feed), strict=True))
            for o in stage["outputs"]:
                {"message": messages, "carried": carried[k], "model_output": outputs}[o["role"]][o["ref"]] = \
                    values[o["name"]]
            nxt[k] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("deadlock while capturing stage inputs")
    return feeds, messages, outputs


def child_time(args) -> None:
    import numpy as np
    import onnxruntime as ort

    from disco_compile.runtime.executor import session_options  # torch-free; the memory children do without

    _check_mem_options(ort, session_options)
    timed = _Timed(ort, session_options, Path(args.work))
    check = timed.capture()
    times = timed.time_passes(args.warmup, args.reps)
    profiles = timed.profiles(args.profile_reps)
    print(json.dumps({"times": times, "check": check, "profiles": profiles, "ort": ort.__version__,
                      "numpy": np.__version__}))


def _run_seq(sessions, fetches, feeds) -> tuple[float, float]:
    """Seconds to run `sessions` in turn, and the seconds inside their session.run calls."""
    t0 = time.perf_counter()
    inner = 0.0
    for s, f, feed in zip(sessions, fetches, feeds, strict=True):
        a = time.perf_counter()
        s.run(f, feed)
        inner += time.perf_counter() - a
    return time.perf_counter() - t0, inner


def _run_one(session, feed) -> tuple[float, None]:
    t0 = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - t0, None


def _run_trivial(session, feed, calls: int = 200) -> tuple[float, None]:
    """Seconds per call of the one-element Identity graph, over `calls` calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        session.run(["b"], feed)
    return (time.perf_counter() - t0) / calls, None


class _Timed:
    """The timing child's sessions (all with the runtime's `session_options`, as NodeExecutor(threads=1), but
    for the diagnostics' differences), the inputs captured for each, the timing passes and the profiles."""

    def __init__(self, ort, session_options, work: Path):
        import numpy as np

        self.ort, self.options, self.work = ort, session_options, work
        bundle = work / "bundle"
        self.schedule = json.loads((bundle / "schedule.json").read_text())
        programs = self.schedule["programs"]
        opts = session_options(1, shared_arena=False)
        self.node_opts = session_options(1)
        mock_opts = session_options(1)
        mock_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sessions = [[self._load(bundle / st["file"], self.node_opts) for st in p] for p in programs]
        self.fetches = [[_fetch(st) for st in p] for p in programs]
        self.mocks = [[self._load(work / "mock" / st["file"], mock_opts) for st in p] for p in programs]
        self.mock_fetches = [[[o.name for o in s.get_outputs()] for s in p] for p in self.mocks]
        self.tinies = [[self._load(work / "tiny" / st["file"], mock_opts) for st in p] for p in programs]
        self.merged = [self._load(work / f"merged{k}.onnx", opts) for k in range(len(programs))]
        # diagnostic: the same stage sessions with an arena each (onnxruntime's default)
        self.own = [[self._load(bundle / st["file"], opts) for st in p] for p in programs]
        self.whole = self._load(work / "whole.onnx", opts)
        self.trivial = self._load(work / "trivial.onnx", mock_opts)
        self.tiny = {"a": np.zeros((1,), np.float32)}
        self.x = np.load(work / "x.npy")
        self.whole_feed = {self.whole.get_inputs()[0].name: self.x}

    def _load(self, path: Path, options):
        return self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def capture(self) -> dict[str, float]:
        """Capture every stage's inputs (and each export option's), save the messages for the memory children;
        the checks: outputs against torch and the merged graphs against the stages (max abs differences)."""
        import numpy as np

        work, schedule, x = self.work, self.schedule, self.x
        self.feeds, messages, outputs = _capture(schedule, self.sessions, x)
        self.variants = json.loads((work / "variants.json").read_text())
        self.var_runs = [self._variant_run(v["dir"]) for v in self.variants]
        (work / "msgs").mkdir(exist_ok=True)
        for mid, payload in messages.items():
            np.save(work / "msgs" / f"{mid}.npy", payload)
        out_name = schedule["outputs"][0]["name"]
        y_whole = self.whole.run(None, self.whole_feed)[0]
        check = {"bundle_vs_torch_disco": float(np.abs(outputs[out_name] - np.load(work / "ref_disco.npy")).max()),
                 "whole_onnx_vs_torch": float(np.abs(y_whole - np.load(work / "ref_whole.npy")).max()),
                 "ref_scale": float(np.abs(y_whole).max())}
        known = {**messages, **outputs, schedule["inputs"][0]["name"]: x}
        self.merged_feeds = [{i.name: known[i.name] for i in m.get_inputs()} for m in self.merged]
        check["merged_vs_stages"] = max(float(np.abs(v - known[o.name]).max())
                                        for m, f in zip(self.merged, self.merged_feeds, strict=True)
                                        for o, v in zip(m.get_outputs(), m.run(None, f), strict=True))
        return check

    def _variant_run(self, folder: str) -> list[tuple]:
        """Per node of one export option: (sessions, fetches, feeds) of its stages, as _run_seq takes them."""
        vs = json.loads((self.work / folder / "schedule.json").read_text())
        sessions = [[self._load(self.work / folder / st["file"], self.node_opts) for st in p] for p in vs["programs"]]
        feeds, _, _ = _capture(vs, sessions, self.x)
        return [(sessions[k], [_fetch(st) for st in p], feeds[k]) for k, p in enumerate(vs["programs"])]

    def _targets(self) -> dict:
        """Every timed target, in the passes' base order: name -> a call that runs it once and returns
        (seconds, seconds inside session.run or None)."""
        nodes, feeds = range(len(self.sessions)), self.feeds
        runs = {"whole": partial(_run_one, self.whole, self.whole_feed)}
        runs |= {f"node{k}": partial(_run_seq, self.sessions[k], self.fetches[k], feeds[k]) for k in nodes}
        runs |= {f"merged{k}": partial(_run_one, self.merged[k], self.merged_feeds[k]) for k in nodes}
        runs |= {f"own{k}": partial(_run_seq, self.own[k], self.fetches[k], feeds[k]) for k in nodes}
        runs |= {f"mock{k}": partial(_run_seq, self.mocks[k], self.mock_fetches[k], feeds[k]) for k in nodes}
        runs["trivial"] = partial(_run_trivial, self.trivial, self.tiny)
        runs |= {f"tiny{k}": partial(_run_seq, self.tinies[k], self.mock_fetches[k], feeds[k]) for k in nodes}
        runs |= {f"var{i}_{k}": partial(_run_seq, *run) for i, var in enumerate(self.var_runs)
                 for k, run in enumerate(var)}
        return runs

    def time_passes(self, warmup: int, reps: int) -> dict[str, list[float]]:
        """`warmup` + `reps` passes over every target, in rotating order; per timed pass each target's seconds
        (node k's seconds inside session.run as calls{k}) and the ratios taken within the pass."""
        runs = self._targets()
        targets = list(runs)
        times = defaultdict(list)
        for rep in range(warmup + reps):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            row = {}
            for t in order:
                row[t], inner = runs[t]()
                if t.startswith("node"):
                    row["calls" + t[4:]] = inner
            if rep < warmup:
                continue
            for t, v in row.items():
                times[t].append(v)
            self._pass_ratios(times, row)
        return times

    def _pass_ratios(self, times: dict[str, list[float]], row: dict[str, float]) -> None:
        """Ratios per pass, so a slow spell on the machine hits both sides of a ratio."""
        nodes = range(len(self.sessions))
        for k in nodes:
            times[f"ratio{k}"].append(row[f"node{k}"] / row["whole"])
            times[f"merged_ratio{k}"].append(row[f"merged{k}"] / row["whole"])
            times[f"own_ratio{k}"].append(row[f"own{k}"] / row["whole"])
            times[f"mock_share{k}"].append(row[f"mock{k}"] / row[f"node{k}"])
            times[f"tiny_share{k}"].append(row[f"tiny{k}"] / row[f"node{k}"])
            times[f"cut_share{k}"].append((row[f"node{k}"] - row[f"merged{k}"]) / row[f"node{k}"])
        for i in range(len(self.variants)):
            times[f"var_ratio{i}"].append(max(row[f"var{i}_{k}"] for k in nodes) / row["whole"])

    def _profiled(self, path: Path, tag: str, shared: bool = False):
        o = self.options(1, shared_arena=shared)
        o.enable_profiling = True
        o.profile_file_prefix = str(self.work / "prof" / tag)
        o.optimized_model_filepath = str(self.work / "opt" / f"{tag}.onnx")
        return self._load(path, o)

    def profiles(self, reps: int) -> dict[str, list[str]]:
        """Profile files per target from fresh sessions, `reps` passes after one warm-up pass (skipped when the
        profiles are read)."""
        work, programs = self.work, self.schedule["programs"]
        (work / "prof").mkdir(exist_ok=True)
        (work / "opt").mkdir(exist_ok=True)
        profiles = {}
        for k in range(len(programs)):
            ps = [self._profiled(work / "bundle" / st["file"], f"node{k}_{i:03d}", shared=True)
                  for i, st in enumerate(programs[k])]
            for _ in range(reps + 1):
                for s, f, feed in zip(ps, self.fetches[k], self.feeds[k], strict=True):
                    s.run(f, feed)
            profiles[f"node{k}"] = [s.end_profiling() for s in ps]
            ms = self._profiled(work / f"merged{k}.onnx", f"merged{k}")
            for _ in range(reps + 1):
                ms.run(None, self.merged_feeds[k])
            profiles[f"merged{k}"] = [ms.end_profiling()]
        ws = self._profiled(work / "whole.onnx", "whole")
        for _ in range(reps + 1):
            ws.run(None, self.whole_feed)
        profiles["whole"] = [ws.end_profiling()]
        return profiles


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _register_shared_arena(ort) -> None:
    """One arena allocator for the process, registered as the runtime's session_options registers it."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


def child_mem(args) -> None:
    start_rss = _rss_kib("VmRSS")
    import numpy as np
    import onnxruntime as ort
    imported_rss = _rss_kib("VmRSS")
    work = Path(args.work)
    bundle = work / "bundle"
    if args.alloc == "shared":  # one arena for all of this process's sessions
        _register_shared_arena(ort)
    opts = _mem_options(ort, args.alloc)
    prov = ["CPUExecutionProvider"]
    target = args.target
    loaded = {}
    sessions = []  # held until the figures are printed
    if target == "whole":
        sessions = [ort.InferenceSession((work / "whole.onnx").read_bytes(), opts, providers=prov)]
        loaded = {"rss": _rss_kib("VmRSS"), "hwm": _rss_kib("VmHWM")}
        _mem_run_whole(np, work, sessions[0])
    elif target.startswith("node"):
        k = int(target[4:])
        schedule = json.loads((bundle / "schedule.json").read_text())
        sessions = [ort.InferenceSession((bundle / st["file"]).read_bytes(), opts, providers=prov)
                    for st in schedule["programs"][k]]
        loaded = {"rss": _rss_kib("VmRSS"), "hwm": _rss_kib("VmHWM")}
        _mem_run_node(np, work, schedule, k, sessions)
    heavy = sorted(m for m in ("torch", "onnx", "disco_compile") if m in sys.modules)
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "hwm_kib": _rss_kib("VmHWM"), "rss_kib": _rss_kib("VmRSS"), "start_rss_kib": start_rss,
                      "imported_rss_kib": imported_rss, "loaded_rss_kib": loaded.get("rss", imported_rss),
                      "loaded_hwm_kib": loaded.get("hwm", imported_rss), "heavy_modules": heavy}))


def _mem_run_whole(np, work: Path, sess) -> None:
    """Run the whole model twice."""
    x = np.load(work / "x.npy")
    name = sess.get_inputs()[0].name
    for _ in range(2):
        sess.run(None, {name: x})


def _mem_run_node(np, work: Path, schedule: dict, k: int, sessions: list) -> None:
    """Run node k's stages twice, in order, each carried value dropped after its last use."""
    stages = schedule["programs"][k]
    last_use = {o["ref"]: st["index"] for st in stages for o in st["outputs"] if o["role"] == "carried"}
    last_use |= {i["ref"]: st["index"] for st in stages for i in st["inputs"] if i["source"] == "carried"}
    for _ in range(2):
        model_inputs = {schedule["inputs"][0]["name"]: np.load(work / "x.npy")} if k == 0 else {}
        carried = {}
        for st, s in zip(stages, sessions, strict=True):
            _mem_run_stage(np, work, st, s, model_inputs, carried)
            for ref in [r for r, last in last_use.items() if last == st["index"]]:
                carried.pop(ref, None)


def _mem_run_stage(np, work: Path, st: dict, session, model_inputs: dict, carried: dict) -> None:
    """Run one stage, its messages read from .npy files; its carried outputs are added to `carried`."""
    feed = {}
    for i in st["inputs"]:
        if i["source"] == "model_input":
            feed[i["name"]] = model_inputs[i["ref"]]
        elif i["source"] == "carried":
            feed[i["name"]] = carried[i["ref"]]
        else:
            feed[i["name"]] = np.load(work / "msgs" / f"{i['ref']}.npy")
    fetch = _fetch(st)
    values = dict(zip(fetch, session.run(fetch, feed), strict=True))
    for o in st["outputs"]:
        if o["role"] == "carried":
            carried[o["ref"]] = values[o["name"]]


# ================================================================ parent (torch)

def _initializer_bytes(path: Path) -> dict[str, int]:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    out = {"float": 0, "int": 0, "count": 0}
    for t in tensors:
        nbytes = len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
        out["float" if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                       onnx.TensorProto.BFLOAT16) else "int"] += nbytes
        out["count"] += 1
    out["total"] = out["float"] + out["int"]
    out["file"] = path.stat().st_size
    return out


def _mock(stage_path: Path, mock_path: Path, tiny: bool = False) -> None:
    """An ONNX graph with the stage's graph inputs and outputs (names, dtypes, shapes) and no compute:
    each output is Expand(zero scalar, its batch-1 shape); `tiny`: one element each instead (same rank)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    stage = onnx.load(str(stage_path), load_external_data=False)
    initialized = {t.name for t in stage.graph.initializer}
    inputs = [vi for vi in stage.graph.input if vi.name not in initialized]
    nodes, inits = [], []
    for n, vi in enumerate(stage.graph.output):
        tt = vi.type.tensor_type
        dims = [1 if tiny or not d.HasField("dim_value") else d.dim_value for d in tt.shape.dim]
        np_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        inits.append(numpy_helper.from_array(np.zeros((), np_dtype), f"zero{n}"))
        inits.append(numpy_helper.from_array(np.array(dims, np.int64), f"shape{n}"))
        nodes.append(helper.make_node("Expand", [f"zero{n}", f"shape{n}"], [vi.name]))
    outputs = [helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type,
                                             [1] * len(vi.type.tensor_type.shape.dim)) if tiny else vi
               for vi in stage.graph.output]
    graph = helper.make_graph(nodes, "mock", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = stage.ir_version
    onnx.checker.check_model(model)
    mock_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(mock_path))


def _trivial(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "trivial",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _merge_node(bundle: Path, schedule: dict, k: int, path: Path) -> None:
    """Node k's stage graphs joined into one graph: carried values become internal tensors (their names match
    across stages), received messages and model inputs are graph inputs, sent messages and model outputs graph
    outputs. The same ops as the stages, without the cuts: what the node costs without per-stage calls."""
    import onnx
    from onnx import helper
    nodes, inits, inputs, outputs = [], [], {}, {}
    opset, ir_version = None, None
    for i, st in enumerate(schedule["programs"][k]):
        model = onnx.load(str(bundle / st["file"]))
        g = model.graph
        interface = {vi.name for vi in g.input} | {vi.name for vi in g.output}

        def rename(name: str, i=i, interface=interface) -> str:
            return name if name in interface or name == "" else f"s{i}/{name}"
        for t in g.initializer:
            t.name = rename(t.name)
            inits.append(t)
        for n in g.node:
            n.name = f"s{i}/{n.name}"
            n.input[:] = [rename(v) for v in n.input]
            n.output[:] = [rename(v) for v in n.output]
            nodes.append(n)
        sources = {inp["name"]: inp["source"] for inp in st["inputs"]}
        for vi in g.input:
            if sources.get(vi.name, "carried") != "carried":
                inputs.setdefault(vi.name, vi)
        for vi in g.output:
            if any(o["name"] == vi.name and o["role"] != "carried" for o in st["outputs"]):
                outputs.setdefault(vi.name, vi)
        opset, ir_version = model.opset_import, model.ir_version
    graph = helper.make_graph(nodes, f"node{k}_merged", list(inputs.values()), list(outputs.values()), inits)
    merged = helper.make_model(graph, opset_imports=opset)
    merged.ir_version = ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(path))


def prepare(work: Path, args) -> dict:
    import warnings

    import numpy as np
    import torch

    from disco_compile import Budget, transform
    from disco_compile.frontend import zoo
    from disco_compile.backend.exporter import export
    model, x = zoo.build(args.model, size=args.size)
    dm = transform(model, args.nodes, x)
    dm.eval()
    variants = []
    for overlap in (True, False):  # the export options side by side (the variants table)
        for align, allocation, weight in VARIANTS:
            dm.set_budget(Budget(args.budget, allocation, align, weight))
            name = f"variants/{overlap}_{align}_{allocation}_{weight:g}"
            export(dm, work / name, overlap=overlap)
            vs = json.loads((work / name / "schedule.json").read_text())
            cost = dm.cost()
            variants.append({"dir": name, "overlap": overlap, "align": align, "allocation": allocation,
                             "compute_weight": weight, "stages": [len(p) for p in vs["programs"]],
                             "messages": len(vs["messages"]), "exchange_ratio": cost.exchange_ratio,
                             "macs": max(cost.macs_per_node) / cost.original_macs})
    (work / "variants.json").write_text(json.dumps(variants))
    dm.set_budget(Budget(args.budget, args.allocation, args.align, args.compute_weight))
    cost = dm.cost()
    export(dm, work / "bundle", overlap=args.overlap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(work / "whole.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    with torch.no_grad():
        np.save(work / "ref_disco.npy", dm(x).numpy())
        np.save(work / "ref_whole.npy", model(x).numpy())
    np.save(work / "x.npy", x.numpy())
    schedule = json.loads((work / "bundle" / "schedule.json").read_text())
    for k, prog in enumerate(schedule["programs"]):
        for st in prog:
            _mock(work / "bundle" / st["file"], work / "mock" / st["file"])
            _mock(work / "bundle" / st["file"], work / "tiny" / st["file"], tiny=True)
        _merge_node(work / "bundle", schedule, k, work / f"merged{k}.onnx")
    _trivial(work / "trivial.onnx")
    weights = {"whole": _initializer_bytes(work / "whole.onnx")}
    for k, prog in enumerate(schedule["programs"]):
        parts = [_initializer_bytes(work / "bundle" / st["file"]) for st in prog]
        weights[f"node{k}"] = {key: sum(p[key] for p in parts) for key in parts[0]}
    return {"macs_per_node": cost.macs_per_node, "original_macs": cost.original_macs,
            "params_per_node": cost.params_per_node, "original_params": cost.original_params,
            "exchange_ratio": cost.exchange_ratio, "weights": weights,
            "stages": [len(p) for p in schedule["programs"]], "messages": len(schedule["messages"]),
            "torch": torch.__version__, "variants": variants}


def _remote_convs(work: Path, schedule: dict, target: str) -> set[tuple[int, str]]:
    """(file index, node name) of the convolutions, in onnxruntime's optimised graphs, whose input is a received
    payload (followed through ReorderInput/Identity/Reshape and through carried values across stages)."""
    import onnx

    def graph(tag: str):
        return onnx.load(str(work / "opt" / f"{tag}.onnx"), load_external_data=False).graph
    if target == "whole":
        return set()
    k = int(target.replace("merged", "").replace("node", ""))
    if target.startswith("merged"):
        g = graph(f"merged{k}")
        message_ids = {m["id"] for m in schedule["messages"]}
        convs, _ = _received_convs(g, {vi.name for vi in g.input if vi.name in message_ids})
        return {(0, name) for name in convs}
    remote: set[tuple[int, str]] = set()
    derived_carried: set[str] = set()
    for i, st in enumerate(schedule["programs"][k]):
        received = {inp["name"] for inp in st["inputs"] if inp["source"] == "message"
                    or (inp["source"] == "carried" and inp["ref"] in derived_carried)}
        convs, derived = _received_convs(graph(f"node{k}_{i:03d}"), received)
        remote |= {(i, name) for name in convs}
        derived_carried |= {o["ref"] for o in st["outputs"] if o["role"] == "carried" and o["name"] in derived}
    return remote


def _received_convs(g, received: set[str]) -> tuple[list[str], set[str]]:
    """The Conv/FusedConv nodes of graph g whose input derives from the `received` values (followed through
    ReorderInput/Identity/Reshape), and every value so derived."""
    derived = set(received)
    convs = []
    for n in g.node:  # topological order
        if n.op_type in ("ReorderInput", "Identity", "Reshape") and n.input and n.input[0] in derived:
            derived.update(n.output)
        if n.op_type in ("Conv", "FusedConv") and n.input[0] in derived:
            convs.append(n.name)
    return convs, derived


def analyse_profiles(work: Path, profiles: dict, schedule: dict, reps: int) -> dict:
    """Per target: kernel ms per pass by op kind (first pass of each session skipped), conv MACs split into
    local and remote."""
    out = {}
    for target, files in profiles.items():
        remote = _remote_convs(work, schedule, target)
        ms, macs, counts = defaultdict(float), defaultdict(int), defaultdict(int)
        model_run = 0.0
        for i, f in enumerate(files):
            events = json.loads(Path(f).read_text())
            runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                          key=lambda e: e["ts"])
            warm = runs[0]
            model_run += sum(e["dur"] for e in runs[1:])
            for e in events:
                if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                    continue
                if warm["ts"] <= e["ts"] <= warm["ts"] + warm["dur"]:
                    continue
                op = e["args"]["op_name"]
                if op in ("Conv", "FusedConv"):
                    if target == "whole":
                        c = "Conv"
                    elif (i, e["name"][:-len("_kernel_time")]) in remote:
                        c = "Conv, remote (input: received channels)"
                    else:
                        c = "Conv, local"
                    w = list(e["args"]["input_type_shape"][1].values())[0]
                    y = list(e["args"]["output_type_shape"][0].values())[0]
                    n_macs = 1
                    for d in list(y) + list(w[1:]):
                        n_macs *= d
                    macs[c] += n_macs
                elif op in ("ReorderInput", "ReorderOutput"):
                    c = "ReorderInput/Output (NCHWc layout)"
                elif op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
                    c = "Gemm/MatMul"
                else:
                    c = op
                ms[c] += e["dur"]
                counts[c] += 1
        out[target] = {"ms": {c: v / reps / 1000 for c, v in ms.items()},
                       "count": {c: v // reps for c, v in counts.items()},
                       "macs": {c: v // reps for c, v in macs.items()},
                       "model_run_ms": model_run / reps / 1000, "kernels_ms": sum(ms.values()) / reps / 1000}
    return out


def _rate(prof: dict, target: str, kind: str) -> float:
    """GMAC/s of op kind `kind` in `target`'s profile (0 if absent)."""
    ms = prof[target]["ms"].get(kind, 0.0)
    return prof[target]["macs"].get(kind, 0) / (ms * 1e-3) / 1e9 if ms else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--size", type=int, default=224, help="input side length (default 224)")
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    parser.add_argument("--budget", type=float, default=0.2, help="budget rho (default 0.2)")
    parser.add_argument("--align", type=int, default=8, help="channels per message a multiple of this (default 8, "
                                                             "as disco-compile)")
    parser.add_argument("--allocation", choices=("uniform", "global"), default="global",
                        help="budget allocation (default global, as disco-compile)")
    parser.add_argument("--compute-weight", type=float, default=None,
                        help="bytes per MAC in the global allocation's ranking (default as disco-compile: 0.004 "
                             "with global, 0 with uniform; 0: bytes alone)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                        help="export with overlap of compute and messages (default: --overlap, as disco-compile)")
    parser.add_argument("--reps", type=int, default=21, help="timed passes of each target (default 21)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes first (default 3)")
    parser.add_argument("--profile-reps", type=int, default=5, help="passes under the profiler (default 5)")
    parser.add_argument("--mem-reps", type=int, default=3, help="processes per memory target (default 3)")
    parser.add_argument("--keep", type=Path, help="keep the work directory (export, profiles) here")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    parser.add_argument("--child", choices=("time", "mem"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--alloc", default="shared", choices=ALLOCS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "time":
        return child_time(args)
    if args.child == "mem":
        return child_mem(args)

    if args.compute_weight is None:  # here, not at parsing: the children must not import torch
        from disco_compile.budget.budget import default_compute_weight
        args.compute_weight = default_compute_weight(args.allocation)
    cmd = _perfdoc.command()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            sys.exit(f"{args.keep} is not empty")
        work, tmp = args.keep, None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="disco-node-compute-")
        work = Path(tmp.name)
    try:
        run(args, work, cmd)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _variant_name(v: dict) -> str:
    return (f"{'' if v['overlap'] else 'no '}overlap, align {v['align']}, {v['allocation']}"
            + (f", compute weight {v['compute_weight']:g}" if v["compute_weight"] else ""))


def _child(work: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--work", str(work), *extra], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"child {extra} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class _Memory:
    """Peak memory of the memory children, MB by (target, allocator), medians over --mem-reps processes."""
    targets: list[str]  # "bare" (the imports alone), "whole", then "node{k}"
    peak: dict[tuple[str, str], float]  # VmHWM
    after_load: dict[tuple[str, str], float]  # VmRSS after loading the graphs, before running them
    py_alone: float  # the interpreter before importing numpy and onnxruntime
    heavy: list[str]  # modules that should not have been loaded, but were

    def ratio(self, k: int, alloc: str) -> float:
        """Node k's peak over the whole model's, both above the imports-only process."""
        bare = self.peak[("bare", alloc)]
        return (self.peak[(f"node{k}", alloc)] - bare) / (self.peak[("whole", alloc)] - bare)


@dataclass
class _Figures:
    """What the report is made of: the arguments, what prepare and the timing child returned, the medians of the
    timed figures (`t`), the profiles by op kind, the memory figures and the load averages."""
    args: argparse.Namespace
    cmd: str
    prep: dict
    res: dict
    t: dict[str, float]
    prof: dict
    mem: _Memory
    load_start: str
    load_end: str

    @property
    def node_ids(self) -> range:
        return range(self.args.nodes)

    @property
    def mac_ratio(self) -> list[float]:
        return [m / self.prep["original_macs"] for m in self.prep["macs_per_node"]]

    @property
    def slowest(self) -> int:
        return max(self.node_ids, key=lambda k: self.t[f"ratio{k}"])


def run(args, work: Path, cmd: str) -> None:
    """Export, time, profile and measure memory, then print the report and rewrite the docs section."""
    load_start = _perfdoc.load()
    prep, res, prof = _measure_compute(args, work)
    mem = _measure_memory(args, work)
    t = {name: _perfdoc.median(v) for name, v in res["times"].items()}
    fig = _Figures(args, cmd, prep, res, t, prof, mem, load_start, _perfdoc.load())
    sections = (_intro, _summary, _compute_table, _options_table, _compute_goal, _overhead_table, _profile_table,
                _weights_table, _memory_table)
    lines = [line for section in sections for line in section(fig)]
    _perfdoc.publish("node_compute", "\n".join(lines), write=not args.no_write)


def _measure_compute(args, work: Path) -> tuple[dict, dict, dict]:
    """Export (`prepare`), time every target in the timing child and read its profiles: (prep, res, prof)."""
    print("exporting ...", flush=True)
    prep = prepare(work, args)
    schedule = json.loads((work / "bundle" / "schedule.json").read_text())
    print(f"exported: {prep['stages']} stages, {prep['messages']} messages; timing ...", flush=True)
    res = _child(work, "--child", "time", "--reps", str(args.reps), "--warmup", str(args.warmup),
                 "--profile-reps", str(args.profile_reps))
    print("reading the profiles ...", flush=True)
    return prep, res, analyse_profiles(work, res["profiles"], schedule, args.profile_reps)


def _measure_memory(args, work: Path) -> _Memory:
    """--mem-reps memory children per target and allocator, interleaved."""
    med = _perfdoc.median
    print("memory ...", flush=True)
    mem = defaultdict(list)
    targets = ["bare", "whole"] + [f"node{k}" for k in range(args.nodes)]
    for r in range(args.mem_reps):
        for alloc in ALLOCS:
            for target in targets[r % len(targets):] + targets[:r % len(targets)]:
                mem[(target, alloc)].append(_child(work, "--child", "mem", "--target", target, "--alloc", alloc))
    heavy = sorted({m for v in mem.values() for r in v for m in r["heavy_modules"]})
    peak = {key: med([r["hwm_kib"] for r in v]) / 1024 for key, v in mem.items()}
    after_load = {key: med([r["loaded_rss_kib"] for r in v]) / 1024 for key, v in mem.items()}
    py_alone = med([r["start_rss_kib"] for v in mem.values() for r in v]) / 1024
    print("peak RSS MB:", {f"{k[0]}/{k[1]}": round(v, 1) for k, v in peak.items()}, flush=True)
    return _Memory(targets, peak, after_load, py_alone, heavy)


def _intro(fig: _Figures) -> list[str]:
    args, prep, res, chk = fig.args, fig.prep, fig.res, fig.res["check"]
    return [f"## Node compute: {args.model} 1x3x{args.size}x{args.size}, N={args.nodes}, rho={args.budget}", "",
            f"Command: `{fig.cmd}`  ",
            f"Run: {_perfdoc.today()}; machine: {_perfdoc.machine()}; onnxruntime {res['ort']}, numpy "
            f"{res['numpy']}, torch {prep['torch']} (export only); load average (1/5/15 min) {fig.load_start} at the "
            f"start, {fig.load_end} at the end.  ",
            f"Export: {sum(prep['stages'])} stage graphs ("
            + ", ".join(f"node {k}: {n}" for k, n in enumerate(prep["stages"]))
            + f"), {prep['messages']} messages, exchange ratio {prep['exchange_ratio']:.3f}; "
            f"{'with' if args.overlap else 'without'} overlap, align {args.align}, {args.allocation} allocation"
            + (f", compute weight {args.compute_weight:g}" if args.compute_weight else "") + " "
            f"(export options: see the "
            f"table below). Timings: median of "
            f"{args.reps} interleaved passes after {args.warmup} warm-up passes, one thread.  ",
            f"Checks: export output against the DISCO model in torch, max abs diff "
            f"{chk['bundle_vs_torch_disco']:.1e}; "
            f"whole-model ONNX against torch {chk['whole_onnx_vs_torch']:.1e} (outputs up to {chk['ref_scale']:.1f}); "
            f"merged node graphs against the stages {chk['merged_vs_stages']:.1e}.", ""]


def _summary(fig: _Figures) -> list[str]:
    args, prep, t, prof, w = fig.args, fig.prep, fig.t, fig.prof, fig.prep["weights"]
    slowest, mac_ratio, node_ids = fig.slowest, fig.mac_ratio, fig.node_ids
    worst_a, worst_b, worst_b2, worst_c = _per_call_estimates(fig)
    return ["### Summary", "",
            f"- Slowest node / whole model: **{t[f'ratio{slowest}']:.3f}** (goal at most {GOAL_RATIO:.2f}: "
            f"{'met' if t[f'ratio{slowest}'] <= GOAL_RATIO else 'NOT met'}); its MAC share is "
            f"{mac_ratio[slowest]:.3f}. The same node's ops merged into one graph: "
            f"{t[f'merged_ratio{slowest}']:.3f}, so cutting them into {prep['stages'][slowest]} stages costs "
            f"{t[f'ratio{slowest}'] - t[f'merged_ratio{slowest}']:.3f} of the whole model's time; the rest above "
            f"the MAC share is the node's own op mix ("
            + (f"remote convolutions on few received channels run at "
               f"{_rate(prof, f'merged{slowest}', 'Conv, remote (input: received channels)'):.0f} GMAC/s against "
               f"{_rate(prof, f'merged{slowest}', 'Conv, local'):.0f} for local ones, plus the Adds that join "
               f"local and remote partial sums and " if args.overlap else
               "the Concat of local and received channels before each convolution, and ")
            + f"the layout conversions around them). With an arena per session "
            f"(onnxruntime's default) instead of NodeExecutor's shared one: {t[f'own_ratio{slowest}']:.3f}.",
            f"- Per-call overhead (b'), calling the stages with their inputs and outputs but without writing the "
            f"output data: **{worst_b2:.1%}** of the node's time at worst (goal under {GOAL_OVERHEAD:.0%}: "
            f"{'met' if worst_b2 < GOAL_OVERHEAD else 'NOT met'}); writing the output data too (b): {worst_b:.1%}; "
            f"bare call cost alone {worst_a:.1%}; everything the cut costs {worst_c:.1%}.",
            "- Weights on disk per node / whole model: "
            + ", ".join(f"{w[f'node{k}']['total'] / w['whole']['total']:.3f}" for k in node_ids) + ".",
            "- Peak memory per node / whole model, above the imports-only process: "
            + ", ".join(f"{fig.mem.ratio(k, 'shared'):.3f}" for k in node_ids) + " with one shared arena (as "
            "NodeExecutor), " + ", ".join(f"{fig.mem.ratio(k, 'arena'):.3f}" for k in node_ids)
            + " with an arena per session.", ""]


def _per_call_estimates(fig: _Figures) -> tuple[float, float, float, float]:
    """The worst node's per-call overhead by estimates (a), (b), (b') and (c), as shares of its time."""
    t, stages, ids = fig.t, fig.prep["stages"], fig.node_ids
    return (max(t["trivial"] * stages[k] / t[f"node{k}"] for k in ids), max(t[f"mock_share{k}"] for k in ids),
            max(t[f"tiny_share{k}"] for k in ids), max(t[f"cut_share{k}"] for k in ids))


def _compute_table(fig: _Figures) -> list[str]:
    prep, t, mac_ratio = fig.prep, fig.t, fig.mac_ratio
    lines = ["### Compute per node against the whole model", "",
             "| | time ms | / whole model | MACs / whole model (dm.cost) | time share / MAC share |",
             "|---|---|---|---|---|",
             f"| whole model (1 session) | {t['whole'] * 1e3:.1f} | 1 | 1 | |"]
    for k in fig.node_ids:
        lines.append(f"| **node {k}: its {prep['stages'][k]} stages** | {t[f'node{k}'] * 1e3:.1f} | "
                     f"**{t[f'ratio{k}']:.3f}** | {mac_ratio[k]:.3f} | {t[f'ratio{k}'] / mac_ratio[k]:.2f} |")
    for k in fig.node_ids:
        lines.append(f"| node {k}: its stages, an arena per session (diagnostic) | "
                     f"{t[f'own{k}'] * 1e3:.1f} | {t[f'own_ratio{k}']:.3f} | {mac_ratio[k]:.3f} | "
                     f"{t[f'own_ratio{k}'] / mac_ratio[k]:.2f} |")
    for k in fig.node_ids:
        lines.append(f"| node {k}: its stages merged into one graph (diagnostic) | {t[f'merged{k}'] * 1e3:.1f} | "
                     f"{t[f'merged_ratio{k}']:.3f} | {mac_ratio[k]:.3f} | {t[f'merged_ratio{k}'] / mac_ratio[k]:.2f} |")
    return lines


def _options_table(fig: _Figures) -> list[str]:
    lines = ["", "Export options, each exported from the same model and timed in the same passes (slowest node / "
                 "whole model; the bold figures above are one of these rows, timed separately):", "",
             "| overlap | align | allocation | compute weight | stages per node | messages | exchange ratio | "
             "MACs of the busier node / whole model | slowest node / whole model |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, v in enumerate(fig.prep["variants"]):
        lines.append(f"| {'yes' if v['overlap'] else 'no'} | {v['align']} | {v['allocation']} | "
                     f"{v['compute_weight']:g} | {', '.join(map(str, v['stages']))} | {v['messages']} | "
                     f"{v['exchange_ratio']:.3f} | {v['macs']:.3f} | {fig.t[f'var_ratio{i}']:.3f} |")
    return lines + ["", "overlap: each node computes its own channels' share of a layer while the other nodes' "
                        "channels are in flight, then one convolution per received message and an Add; without: it "
                        "waits, then runs one convolution over the concatenation of its own and the received channels "
                        "(`export(..., overlap=False)`, `disco-compile --no-overlap`). align: each message's channel "
                        "count is a "
                        "multiple of it, within the budget (`Budget(rho, align=8)`, `disco-compile --align 8`); "
                        "onnxruntime's blocked (NCHWc) convolutions take inputs with a multiple of 8 channels on AVX2 "
                        "CPUs (16 on AVX-512). "
                        "allocation: uniform keeps rho of every exchange; global ranks the candidate channels over the "
                        "whole model by weight magnitude per byte (`Budget(rho, \"global\")`, disco-compile's "
                        "default), so exchanges whose channels rank low send nothing and fewer layers wait for "
                        "messages. compute weight W: the global ranking's cost is bytes + W x the MACs a channel costs "
                        "its destination (`Budget(rho, \"global\", compute_weight=W)`, `disco-compile --compute-weight "
                        "W`; default 0.004; 0 ranks by bytes alone): the same bytes, channels that cost the receiver "
                        "fewer MACs. Which channels it keeps changes the model's quality, which these timings do not "
                        "measure."]


def _compute_goal(fig: _Figures) -> list[str]:
    t, slowest, variants = fig.t, fig.slowest, fig.prep["variants"]
    met_ratio = t[f"ratio{slowest}"] <= GOAL_RATIO
    return ["", "Ratios are medians of per-pass ratios (both sides timed in the same pass). Bold: the figure the "
                "goal is about (the stage graphs as exported, sessions as NodeExecutor makes them: all draw on one "
                "arena registered for the process, `create_and_register_allocator` + "
                "`session.use_env_allocators=1`). Diagnostics: \"an arena per session\" runs the same stage "
                "graphs with onnxruntime's default allocator, an arena each; the merged graph (built by this "
                "script, not by the export) has exactly the stages' "
                "ops with carried values as internal tensors and received messages as inputs: the node's compute "
                "without the cuts.", "",
            f"**Goal: slowest node at most {GOAL_RATIO:.2f} of the whole model: "
            f"{'met' if met_ratio else 'NOT met'}** (node {slowest}: {t[f'ratio{slowest}']:.3f}; its MAC share "
            f"is {fig.mac_ratio[slowest]:.3f}; merged into one graph it would be "
            f"{t[f'merged_ratio{slowest}']:.3f}). Export options at or under it in the table above: "
            + ("; ".join(_variant_name(v) + f" {t[f'var_ratio{i}']:.3f}" for i, v in enumerate(variants)
                         if t[f"var_ratio{i}"] <= GOAL_RATIO) or "none") + ".", ""]


def _overhead_table(fig: _Figures) -> list[str]:
    prep, t = fig.prep, fig.t
    worst_a, worst_b, worst_b2, worst_c = _per_call_estimates(fig)
    lines = ["### Per-call overhead of the stages", "",
             "Four estimates, each as a fraction of the node's time (medians of per-pass fractions):", "",
             "- (a) fixed cost of a call: one `session.run` of a one-element Identity graph "
             f"({t['trivial'] * 1e6:.1f} us) times the number of stages;",
             "- (b) identity graphs with each stage's I/O: for every stage a graph with the same inputs (fed the "
             "same arrays) and outputs of the same dtypes and shapes (Expand of a zero scalar, nothing folded), "
             "timed in sequence: the cost of calling a stage, binding its inputs and materialising its outputs as "
             "new numpy arrays, without its compute;",
             "- (b') the same graphs with one-element outputs (same count, dtypes and rank): calling a stage, "
             "binding its inputs and handing back its outputs, without writing the output data. A real stage "
             "writes its outputs with its last kernel, as part of its compute (where the cut adds that writing, "
             "a layout conversion, (c) holds it), so (b) counts that writing a second time; (b') is the per-call "
             "overhead the goal is about;",
             "- (c) the whole cost of the cut: stages minus the same node merged into one graph; besides (b) it "
             "holds the NCHWc layout conversions onnxruntime adds at every stage's inputs and outputs and the "
             "fusions a cut prevents.", "",
             "| | node time ms | in session.run ms | (a) ms | (a) share | (b) ms | (b) share | (b') ms | (b') share "
             "| (c) ms | (c) share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in fig.node_ids:
        n = prep["stages"][k]
        lines.append(f"| node {k} ({n} stages) | {t[f'node{k}'] * 1e3:.2f} | {t[f'calls{k}'] * 1e3:.2f} | "
                     f"{t['trivial'] * n * 1e3:.2f} | {t['trivial'] * n / t[f'node{k}']:.1%} | "
                     f"{t[f'mock{k}'] * 1e3:.2f} | {t[f'mock_share{k}']:.1%} | {t[f'tiny{k}'] * 1e3:.2f} | "
                     f"{t[f'tiny_share{k}']:.1%} | "
                     f"{(t[f'node{k}'] - t[f'merged{k}']) * 1e3:.2f} | {t[f'cut_share{k}']:.1%} |")
    return lines + ["", f"**Goal: per-call overhead under {GOAL_OVERHEAD:.0%} of the node's time: "
                        f"{'met' if worst_b2 < GOAL_OVERHEAD else 'NOT met'}** by estimate (b'), worst node "
                        f"{worst_b2:.1%}; writing the output data too, (b): {worst_b:.1%} "
                        f"({'under' if worst_b < GOAL_OVERHEAD else 'over'} the goal); the bare call cost (a) alone is "
                        f"{worst_a:.1%} "
                        f"({'under' if worst_a < GOAL_OVERHEAD else 'over'} the goal), everything the cut costs (c) "
                        f"{worst_c:.1%}.", ""]


def _profile_table(fig: _Figures) -> list[str]:
    prof, node_ids = fig.prof, fig.node_ids
    lines = ["### Where the time goes (onnxruntime profiler)", "",
             f"Kernel time per pass, ms, from onnxruntime's profiler: {fig.args.profile_reps} passes after one warm-up "
             "pass, in sessions of their own (not those timed above). The profiler adds a little to every "
             "kernel, so read the shares. onnxruntime fuses BatchNorm, Relu and the residual Add into Conv where "
             "it can (the whole model has no separate Add or Relu); a FusedConv (a Conv with the Add of a partial sum "
             "and the Relu after it, fused by onnxruntime) counts as a Conv. GMAC/s: convolution MACs / their kernel "
             "time. Local convolutions read the node's own channels, remote ones the received channels.", ""]
    cols = ["whole"] + [f"node{k}" for k in node_ids] + [f"merged{k}" for k in node_ids]
    heads = ["whole model"] + [f"node {k} stages" for k in node_ids] + [f"node {k} merged" for k in node_ids]
    cats: list[str] = []
    for col in cols:
        for c in sorted(prof[col]["ms"], key=lambda c: -prof[col]["ms"][c]):
            if c not in cats:
                cats.append(c)
    lines += ["| op kind | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(_profile_cell(prof[col], c) for col in cols) + " |" for c in cats]
    lines.append("| all kernels | " + " | ".join(f"{prof[c]['kernels_ms']:.2f}" for c in cols) + " |")
    lines.append("| session runs (model_run events) | " + " | ".join(f"{prof[c]['model_run_ms']:.2f}" for c in cols)
                 + " |")
    return lines


def _profile_cell(prof: dict, kind: str) -> str:
    """One target's kernel ms per pass of op kind `kind`, its count and, for convolutions, MACs and MAC rate."""
    v = prof["ms"].get(kind)
    if v is None:
        return ""
    cell = f"{v:.2f} ({prof['count'][kind]}x)"
    if kind in prof["macs"] and v > 0:
        cell += f", {prof['macs'][kind] / 1e6:.0f} MMAC, {prof['macs'][kind] / (v * 1e-3) / 1e9:.1f} GMAC/s"
    return cell


def _weights_table(fig: _Figures) -> list[str]:
    prep, w = fig.prep, fig.prep["weights"]
    lines = ["", "### Weights on disk", "",
             "| | initializer bytes MB | float MB | integer MB (Gather indices, shapes) | / whole model | "
             "params / original (dm.cost) | files MB |", "|---|---|---|---|---|---|---|",
             f"| whole model ONNX | {w['whole']['total'] / 1e6:.2f} | {w['whole']['float'] / 1e6:.2f} | "
             f"{w['whole']['int'] / 1e6:.3f} | 1 | 1 | {w['whole']['file'] / 1e6:.2f} |"]
    for k in fig.node_ids:
        wk = w[f"node{k}"]
        lines.append(f"| node {k} stages | {wk['total'] / 1e6:.2f} | {wk['float'] / 1e6:.2f} | {wk['int'] / 1e6:.3f} | "
                     f"**{wk['total'] / w['whole']['total']:.3f}** | "
                     f"{prep['params_per_node'][k] / prep['original_params']:.3f} | {wk['file'] / 1e6:.2f} |")
    return lines


_ALLOC_LABELS = {"shared": "one shared arena (NodeExecutor)", "arena": "per-session arena", "none": "no arena"}


def _memory_table(fig: _Figures) -> list[str]:
    mem = fig.mem
    heavy, peak = mem.heavy, mem.peak
    lines = ["", "### Peak memory", "",
             f"Peak RSS (`VmHWM`) of a fresh process whose only imports beyond the standard library are numpy and "
             f"onnxruntime ({'also loaded: ' + ', '.join(heavy) if heavy else 'checked: torch and onnx not loaded'}"
             f"), median of {fig.args.mem_reps} processes each. The interpreter alone, before those imports: "
             f"{mem.py_alone:.0f} MB. \"- imports\": minus the same process that only imports (first row). Columns by "
             "onnxruntime CPU allocator: one arena shared by all sessions of the process (what NodeExecutor uses: "
             "`create_and_register_allocator` + `session.use_env_allocators=1`), an arena per session "
             "(onnxruntime's default), and no arena.", ""]
    hdr = [column for alloc in ALLOCS for column in (f"{_ALLOC_LABELS[alloc]}: peak MB", "- imports", "/ whole")]
    lines += ["| process | " + " | ".join(hdr) + " | after loading, before running, MB (shared arena) |",
              "|---" * (len(hdr) + 2) + "|"]
    for target in mem.targets:
        cells = []
        for alloc in ALLOCS:
            p, b = peak[(target, alloc)], peak[("bare", alloc)]
            base = peak[("whole", alloc)] - b
            cells += [f"{p:.0f}", f"{p - b:.0f}", "" if target in ("bare", "whole") else
                      (f"**{(p - b) / base:.3f}**" if alloc == "shared" else f"{(p - b) / base:.3f}")]
        name = {"bare": "imports only (numpy + onnxruntime)", "whole": "whole model"}.get(target,
                                                                                        f"node {target[4:]} stages")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mem.after_load[(target, 'shared')]:.0f} |")
    return lines + ["", "Each process loads its graphs from file bytes, as NodeExecutor does, runs them twice (node "
                        "processes read each received message from an .npy file just before the stage that needs it, "
                        "and drop carried values after their last use) and reports `VmHWM` from /proc/self/status. "
                        "(Not `getrusage(RUSAGE_SELF).ru_maxrss`: on Linux a child started by fork+exec keeps the "
                        "parent's high-water mark there, here the torch process that made the export.) No goal was "
                        "set for memory.", ""]


if __name__ == "__main__":
    main()
