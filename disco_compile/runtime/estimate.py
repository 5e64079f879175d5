"""How fast an export runs over a link of a given rate, estimated from its stages timed on this machine.

`stage_times` runs the export once in this process (every node a thread, as `run_local`) while recording
each stage's inputs, then times every stage on them: `reps` passes over all stages, interleaved, the
median per stage (`StageTimer` holds the recorded inputs and the passes). `estimate` lays the schedule
out in time at each link rate (disco_compile.runtime.timeline): each node runs its stages in order, each
waiting for the messages it reads; each direction between two nodes carries one message at a time at the
rate, counting WIRE bytes per payload byte (Ethernet, IP and TCP headers of full-size segments), plus
`latency` seconds per message. Beside it, the model bound:
max(the busiest node's compute, the bytes of the busiest direction / rate).

What it leaves out: the runtime's own cost (Python, ZeroMQ and the kernel's TCP work, on the node's own
core: 20-50 ms per request for ResNet-50 at N=2 with one core per node, measured on a 2-core VM,
docs/latency.md), and any difference between this machine's cores and the target's.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

from ..artifact.bundle import Bundle
from ..artifact.schedule import Schedule
from .executor import NodeExecutor, check_inputs, run_executors
from .timeline import timeline
from .transport import InProcHub

WIRE = 1514 / 1448  # wire bytes per payload byte of a full-size TCP segment over Ethernet
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float | None:
    """Link rate in bytes per second from "100mbit", "1gbit", "2.5gbit", "500kbit" (bits per second);
    None for "none" (no limit)."""
    t = text.strip().lower()
    if t == "none":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", t)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"link rate {text!r}: write it as bits per second, e.g. 100mbit, 1gbit, 2.5gbit, or "
                         f"none for no limit")
    return float(m.group(1)) * _UNITS[m.group(2)] / 8


class StageTimer:
    """An export's stages ready to be timed: the export run once in this process (every node a thread) while
    each stage's inputs are recorded; `run_pass` then runs every stage once on them, and `medians` gives the
    median seconds per stage, [node][stage], of the recorded passes. Several timers' passes can be interleaved
    (the planner, budget/plan.py, times all its candidates that way)."""

    def __init__(self, bundle: Bundle, inputs, *, threads: int = 1):
        schedule = bundle.schedule
        model_inputs = check_inputs(schedule, inputs)
        self.feeds: list[list[dict]] = [[{} for _ in program] for program in schedule.programs]

        def record(node: int, stage: int, stage_feeds: dict, seconds: float) -> None:
            self.feeds[node][stage] = stage_feeds

        hub = InProcHub(schedule.nodes)
        self.executors = [NodeExecutor(bundle, k, hub.transport(k, bundle.schedule_hash), threads=threads,
                                       on_stage=record) for k in range(schedule.nodes)]
        run_executors(self.executors, hub, model_inputs)
        self.times: list[list[list[float]]] = [[[] for _ in node] for node in self.feeds]

    def run_pass(self, *, record: bool = True) -> None:
        """Run every stage once, node by node, in order; `record` False: untimed (a warm-up pass)."""
        for k, executor in enumerate(self.executors):
            for i, stage_feeds in enumerate(self.feeds[k]):
                t0 = time.perf_counter()
                executor.run_stage(i, stage_feeds)
                if record:
                    self.times[k][i].append(time.perf_counter() - t0)

    def medians(self) -> list[list[float]]:
        return [[statistics.median(v) for v in node] for node in self.times]


def stage_times(bundle: Bundle, inputs, *, reps: int = 5, threads: int = 1,
                progress=None) -> list[list[float]]:
    """Seconds per stage, [node][stage]: the median of `reps` timed runs of each stage on the inputs it gets
    when the export runs `inputs` (after one untimed pass). `progress(done, total)` is called after each pass."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    timer = StageTimer(bundle, inputs, threads=threads)
    for rep in range(reps + 1):
        timer.run_pass(record=rep > 0)
        if progress is not None:
            progress(rep + 1, reps + 1)
    return timer.medians()


@dataclass(frozen=True)
class Estimate:
    rate: float | None  # bytes per second, None: no limit
    latency: float  # seconds per inference, the schedule laid out at this rate
    bound: float  # max(busiest node's compute, busiest direction's bytes / rate)
    compute: list[float]  # per node, seconds
    waiting: list[float]  # per node, seconds waiting for messages
    direction_bytes: dict[tuple[int, int], int]  # (src, dst) -> payload bytes per inference


def estimate(schedule: Schedule, seconds: list[list[float]], rates: list[float | None], *,
             latency: float = 1e-4, batch: int = 1) -> list[Estimate]:
    """`schedule` with stage times `seconds` laid out at each rate (bytes per second; None: no limit),
    `latency` seconds per message besides its time on the wire, `batch` samples per inference."""
    by_direction: dict[tuple[int, int], int] = {}
    for m in schedule.messages:
        by_direction[(m.src, m.dst)] = by_direction.get((m.src, m.dst), 0) + m.bytes * batch
    compute = [sum(node) for node in seconds]
    out = []
    for rate in rates:
        t = timeline(schedule, seconds, rate=rate, latency=latency, wire=WIRE, batch=batch)
        link = 0.0 if rate is None else max(by_direction.values(), default=0) / rate
        out.append(Estimate(rate, t.latency, max(max(compute), link), compute, t.waiting, by_direction))
    return out
