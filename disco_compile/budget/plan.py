"""The planner: which split to compile for a target device and link, predicted from stage times measured here.

A candidate is c = (N nodes, budget rho, wire precision w, overlap o). For every (N, rho, o) the model is
split (`transform`), given the budget (`set_budget(Budget(rho, compute_weight=w_c, wire="fp32"))`, disco-compile's
one-shot selection, w_c its compute weight, the default unless given) and exported to a temporary folder; then
every stage of every export is timed on this machine (`runtime.estimate.StageTimer`: one onnxruntime thread, on
the inputs it gets in a real run), and the original model, exported whole to one ONNX graph, in the same
passes: each pass runs every export and the whole model once, in rotating order, the first pass untimed; the
median of `reps` passes counts.
With F the target's slowness (how many times slower a device's core is than this machine's), r the link rate,
l the one-way delay per message and w the wire precision:

    latency(c)  = timeline(schedule at w, F x s, rate=r, latency=l, wire=WIRE).latency
    whole       = F x t_whole                              (the whole model on ONE such node)
    speedup(c)  = whole / latency(c)
    exchange(c) = bytes of the schedule's exchange, gather and stats messages at w (per sample)
    comm(c)     = bytes of every message at w, the model input and outputs included

where s[k][i] is node k's stage i measured here, t_whole the whole model measured here, and WIRE the Ethernet,
IP and TCP bytes per payload byte (runtime/estimate.py); the timeline (runtime/timeline.py) lays out each node's
stages in order, each waiting for the messages it reads, one message at a time per direction. "The schedule at
w" is the export's (made at fp32) with every exchange message's bytes those of its n values at w: ceil(n x
bits / 8), bits = 16 (fp16), 8 (int8), 4 (int4, two values a byte); a floating-point model input node 0 sends at
the input wire of w (artifact/wire.INPUT_WIRES: int4 sends it as int8); the messages disco-compile --wire leaves
as computed (the model outputs, gathers for replicated ops, statistics) keep their bytes.

What is an estimate: the wire precision is that per-value size only; the quantisation kernels, which an export at
w runs before each send and after each receive, are not timed. F scales every stage alike, which
holds where both cores are compute-bound alike (caches and memory bandwidth differ between real devices). The
runtime's own cost (Python, ZeroMQ and TCP work on the nodes' cores: 20-50 ms per request for ResNet-50 on 2
one-core nodes, docs/latency.md) is not counted, as in `disco-run estimate`. The times are this machine's as it
is while they are measured: on a busy machine (`Plan.busy`: a load average above its cores) they are slower
than its cores, and F scales that. The selection is the one-shot one: fine-tuning keeps other channels at the
same budget, which moves the stage times a little.

`measure` makes and times the exports once; `predict_all` lays them out for any link, speed and wire, so that a
benchmark compares one measurement with many runs (benchmarks/plan_check.py); `plan` is the two.
"""
from __future__ import annotations

import copy
import io
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..artifact.bundle import load_bundle
from ..artifact.schedule import Schedule
from ..artifact.wire import INPUT_WIRES
from ..errors import BudgetError, PlanError
from ..runtime.estimate import WIRE, StageTimer, parse_rate
from ..runtime.timeline import timeline
from .budget import Budget

WIRE_BITS = {"fp32": None, "fp16": 16, "int8": 8, "int4": 4}  # bits a value; fp32: as computed (its own dtype)
IO_KINDS = ("input", "output")  # message kinds that are io bytes; every other kind is exchange bytes
NODES = (2,)
BUDGETS = (0.2, 0.1, 0.05)
WIRES = ("fp32", "int8")
OVERLAPS = (True, False)
LATENCY = 1e-4  # seconds per message besides its time on the wire, as `disco-run estimate --latency-ms 0.1`
REPS = 5

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what the next step is)


@dataclass(frozen=True)
class Measured:
    """One export (nodes, budget, overlap) and its stages timed here on `batch` samples, seconds [node][stage]."""

    nodes: int
    budget: float
    overlap: bool
    batch: int
    schedule: Schedule = field(repr=False)
    seconds: list[list[float]] = field(repr=False)


@dataclass(frozen=True)
class Prediction:
    """A candidate at the target's speed and link (module docstring): seconds, and bytes per sample."""

    nodes: int
    budget: float
    wire: str
    overlap: bool
    latency: float
    speedup: float  # the whole model on one such node / latency
    exchange_bytes: float
    comm_bytes: float
    compute: list[float]  # per node, seconds at the target's speed
    measured: Measured = field(repr=False)

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "budget": self.budget, "wire": self.wire, "overlap": self.overlap,
                "latency_ms": self.latency * 1e3, "speedup": self.speedup, "exchange_bytes": self.exchange_bytes,
                "comm_bytes": self.comm_bytes, "compute_ms": [c * 1e3 for c in self.compute],
                "stages": [len(p) for p in self.measured.schedule.programs]}


@dataclass(frozen=True)
class Plan:
    """Every candidate's prediction, fastest first; `whole`: the whole model on one target node, seconds."""

    link: str
    rate: float | None  # bytes per second; None: no limit
    node_speed: float
    latency: float
    reps: int
    whole_here: float  # the whole model measured on this machine, seconds
    whole: float
    predictions: list[Prediction]
    load: tuple[float, float]  # this machine's 1-minute load average before and after the timing passes

    @property
    def best(self) -> Prediction:
        return self.predictions[0]

    def as_dict(self) -> dict:
        return {"link": self.link, "rate_bytes_per_s": self.rate, "node_speed": self.node_speed,
                "latency_per_message_ms": self.latency * 1e3, "reps": self.reps, "threads": 1,
                "whole_model_here_ms": self.whole_here * 1e3, "whole_model_ms": self.whole * 1e3,
                "load_average": list(self.load), "cpus": os.cpu_count(),
                "candidates": [p.as_dict() for p in self.predictions]}

    @property
    def busy(self) -> bool:
        """Whether more processes wanted this machine's cores than it has while the stages were timed: then
        every time measured here is slower than its cores are, and the prediction for `node_speed` with it."""
        return max(self.load) > (os.cpu_count() or 1)


@dataclass(frozen=True)
class Timed:
    """Every export (nodes x budgets x overlaps) with its stages timed here (`Measured.seconds`: medians), and
    the whole model's median, seconds."""

    measured: list[Measured]
    whole_here: float
    reps: int
    load: tuple[float, float]  # this machine's 1-minute load average before and after the timing passes


def check_candidates(link: str, nodes: Sequence[int], budgets: Sequence[float], wires: Sequence[str],
                     overlaps: Sequence[bool], node_speed: float, compute_weight: float | None = None
                     ) -> float | None:
    """The link's rate in bytes per second (None: no limit), once every candidate setting is valid; else a
    PlanError whose message starts with the setting's keyword ("link: ...", "wires: ...")."""
    try:
        rate = parse_rate(link)
    except ValueError as exc:
        raise PlanError(f"link: {exc}") from None
    for name, values in (("nodes", nodes), ("budgets", budgets), ("wires", wires), ("overlaps", overlaps)):
        if not values:
            raise PlanError(f"{name}: no value given; give at least one candidate")
    bad_nodes = [n for n in nodes if isinstance(n, bool) or not isinstance(n, int) or n < 2]
    if bad_nodes:
        raise PlanError(f"nodes: {', '.join(map(str, bad_nodes))}: each is a whole number of devices, at least 2 "
                        f"(one node is the whole model, which every speedup is measured against)")
    unknown = [w for w in wires if w not in WIRE_BITS]
    if unknown:
        raise PlanError(f"wires: {', '.join(map(repr, unknown))}: each is one of {', '.join(WIRE_BITS)}")
    try:
        [Budget(rho) for rho in budgets]
    except BudgetError as exc:
        raise PlanError(f"budgets: {exc}") from None
    try:
        Budget(1.0, compute_weight=compute_weight)
    except BudgetError as exc:
        raise PlanError(f"compute_weight: {exc}") from None
    if not 0 < node_speed < float("inf"):
        raise PlanError(f"node_speed: {node_speed}: how many times slower the device's core is than this "
                        f"machine's, a finite number above 0 (1: as fast; about 4.6: a Raspberry Pi 4 class core)")
    return rate


def at_wire(schedule: Schedule, wire: str) -> Schedule:
    """`schedule` (exported at fp32) with each exchange message's bytes those of its values at `wire`, and each
    floating-point model input's at the input wire of `wire` (module docstring)."""
    bits = {"exchange": WIRE_BITS[wire], "input": WIRE_BITS[INPUT_WIRES[wire]]}

    def quantised(m) -> bool:
        return bits.get(m.kind) is not None and (m.kind != "input" or np.dtype(m.dtype).kind == "f")
    messages = [replace(m, bytes=math.ceil(m.bytes // np.dtype(m.dtype).itemsize * bits[m.kind] / 8))
                if quantised(m) else m for m in schedule.messages]
    return replace(schedule, messages=messages)


def predict(measured: Measured, wire: str, *, rate: float | None, node_speed: float, latency: float,
            whole: float) -> Prediction:
    """`measured` at the target: its stages F = `node_speed` times slower, its exchange messages at `wire`, over
    a link of `rate` bytes per second; `whole`: the whole model on one target node, seconds (module docstring)."""
    schedule = at_wire(measured.schedule, wire)
    seconds = [[s * node_speed for s in node] for node in measured.seconds]
    laid = timeline(schedule, seconds, rate=rate, latency=latency, wire=WIRE, batch=measured.batch)
    exchange = sum(m.bytes for m in schedule.messages if m.kind not in IO_KINDS)
    comm = sum(m.bytes for m in schedule.messages)
    return Prediction(measured.nodes, measured.budget, wire, measured.overlap, laid.latency, whole / laid.latency,
                      exchange, comm, [sum(node) for node in seconds], measured)


def plan(model: torch.nn.Module, example: torch.Tensor, *, link: str, nodes: Sequence[int] = NODES,
         budgets: Sequence[float] = BUDGETS, wires: Sequence[str] = WIRES, overlaps: Sequence[bool] = OVERLAPS,
         node_speed: float = 1.0, latency: float = LATENCY, reps: int = REPS, compute_weight: float | None = None,
         progress: Progress | None = None) -> Plan:
    """Predict every candidate (nodes x budgets x wires x overlaps) of `model` on `example` (one input tensor)
    for devices `node_speed` times slower than this machine on a `link` ("100mbit", "1gbit", "none": as
    `disco-run estimate --link`), `latency` seconds per message; fastest first (module docstring).
    `compute_weight`: the selection's (Budget's; None: its default)."""
    rate = check_candidates(link, nodes, budgets, wires, overlaps, node_speed, compute_weight)
    timed = measure(model, example, nodes=nodes, budgets=budgets, overlaps=overlaps, reps=reps,
                    compute_weight=compute_weight, progress=progress)
    predictions = predict_all(timed, wires, rate=rate, node_speed=node_speed, latency=latency)
    return Plan(link, rate, node_speed, latency, reps, timed.whole_here, timed.whole_here * node_speed, predictions,
                timed.load)


def predict_all(timed: Timed, wires: Sequence[str], *, rate: float | None, node_speed: float,
                latency: float) -> list[Prediction]:
    """Every measured export at every wire, for this target (`predict`), fastest first."""
    whole = timed.whole_here * node_speed
    predictions = [predict(m, w, rate=rate, node_speed=node_speed, latency=latency, whole=whole)
                   for m in timed.measured for w in wires]
    return sorted(predictions, key=lambda p: p.latency)


def measure(model: torch.nn.Module, example: torch.Tensor, *, nodes: Sequence[int] = NODES,
            budgets: Sequence[float] = BUDGETS, overlaps: Sequence[bool] = OVERLAPS, reps: int = REPS,
            compute_weight: float | None = None, progress: Progress | None = None) -> Timed:
    """Export every (nodes, budget, overlap) at fp32 and time its stages and the whole model here (module
    docstring). Every export is held in memory while the stages are timed: the exports' weights, once each."""
    if reps < 1:
        raise PlanError(f"reps: {reps}: the stages are timed at least once (the median of reps passes)")
    steps = _Steps(1 + len(nodes) * (1 + len(budgets) * len(overlaps)) + reps + 1, progress)
    steps.next("exporting the whole model")
    whole = _WholeModel(model, example)
    with tempfile.TemporaryDirectory(prefix="disco-plan-") as folder:
        exports = _export_all(model, example, Path(folder), nodes, budgets, overlaps, compute_weight, steps)
        targets = [timer.run_pass for _, timer in exports] + [whole.run]
        load = os.getloadavg()[0]
        for rep in range(reps + 1):  # every target once per pass, in rotating order, the first pass untimed
            steps.next(f"timing {len(exports)} exports and the whole model: pass {rep + 1} of {reps + 1}")
            for run in targets[rep % len(targets):] + targets[:rep % len(targets)]:
                run(record=rep > 0)
        load = (load, os.getloadavg()[0])
    steps.next("done")
    return Timed([replace(m, seconds=timer.medians()) for m, timer in exports], statistics.median(whole.seconds),
                 reps, load)


def _export_all(model: torch.nn.Module, example: torch.Tensor, folder: Path, nodes: Sequence[int],
                budgets: Sequence[float], overlaps: Sequence[bool], compute_weight: float | None,
                steps: _Steps) -> list[tuple[Measured, StageTimer]]:
    """Every (nodes, budget, overlap) exported into `folder`, each with its stages ready to time (seconds empty)."""
    from ..backend.exporter import export
    from ..model import transform
    exports = []
    for n in nodes:
        steps.next(f"splitting across {n} nodes")
        disco = transform(model, n, example)
        for rho in budgets:
            # other wires: these exports' bytes at the wire (at_wire)
            disco.set_budget(Budget(rho, compute_weight=compute_weight, wire="fp32"))
            for overlap in overlaps:
                name = f"{n} nodes, budget {rho:g}, {'overlap' if overlap else 'no overlap'}"
                steps.next(f"exporting {name}")
                out = folder / f"n{n}_b{rho:g}_{'overlap' if overlap else 'no-overlap'}"
                export(disco, out, overlap=overlap)
                bundle = load_bundle(out)
                timer = StageTimer(bundle, [example.detach().numpy()], threads=1)
                exports.append((Measured(n, rho, overlap, int(example.shape[0]), bundle.schedule, []), timer))
    return exports


class _Steps:
    """Progress over `total` steps: `next(what)` reports the steps done so far and what comes next."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self.progress = total, -1, progress

    def next(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, what)


class _WholeModel:
    """The original model (a copy, in eval mode) as one ONNX graph (torch.onnx, as the stages are exported), run
    with the runtime's session options and one thread; `run(record=True)` times one inference into `seconds`."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor):
        import onnxruntime as ort

        from ..backend.exporter import OPSET
        from ..runtime.executor import session_options
        if not isinstance(example, torch.Tensor):
            raise PlanError(f"the planner times models with one input tensor; the example is a "
                            f"{type(example).__name__}")
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
                torch.onnx.export(copy.deepcopy(model).eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                                  input_names=["x"])
        except Exception as exc:  # torch.onnx raises many types; all mean no single-graph reference
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError(f"torch.onnx cannot export the whole model, which every speedup is measured against "
                            f"({first}); try another --input-shape") from exc
        self.session = ort.InferenceSession(buffer.getvalue(), session_options(1),
                                            providers=["CPUExecutionProvider"])
        self.feed = {"x": example.detach().numpy()}
        self.seconds: list[float] = []

    def run(self, *, record: bool = True) -> None:
        start = time.perf_counter()
        self.session.run(None, self.feed)
        if record:
            self.seconds.append(time.perf_counter() - start)
