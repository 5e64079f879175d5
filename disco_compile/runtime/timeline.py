"""The latency an export's schedule allows: its stages and messages laid out in time, with no runtime cost.

Given how long each stage takes (`stage_seconds[k][i]`: node k's stage i, run alone) and a link, every
stage and message gets a start and an end:

    stage i of node k starts at  max(end of stage i-1 of node k, arrival of every message it reads)
                      and ends at start + stage_seconds[k][i];
    a message leaves its link at  max(end of the stage that produces it, when the link is free)
                                   + bytes x batch x wire / rate
                     and arrives  latency seconds after that.

Each node runs one stage at a time, in program order. Each ordered pair of nodes has one link of
`rate` bytes per second, carrying one message at a time in the order its sender produced them (the
sender's program order: one TCP connection per direction); `wire` is the bytes on the wire per payload
byte (Ethernet, IP and TCP headers: 1514/1448 for full segments) and `latency` a fixed one-way delay per
message. Without a rate, messages take only `latency`; with neither, the latency is the critical path of
the stage graph. Sending costs the sender nothing and receiving costs the receiver nothing: the runtime
(Python, ZeroMQ, the kernel's TCP work) is what a measured latency adds on top of this one.

Latency = when the last stage of any node ends. It is at least max(slowest node's compute, bytes in the
busier direction / rate) (the model bound of benchmarks/netbench.py) and above it wherever a node waits
for a message that could not have come sooner.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..artifact.schedule import Message, Schedule


@dataclass(frozen=True)
class Timeline:
    latency: float  # seconds: when the last stage ends
    stage_end: dict[tuple[int, int], float]  # (node, stage index) -> end, seconds
    arrival: dict[str, float]  # message id -> when its last byte is at its destination
    waiting: list[float]  # per node: time its stages waited for messages, before its last stage ended
    link_busy: dict[tuple[int, int], float]  # (src, dst) -> seconds the link carried data


def timeline(schedule: Schedule, stage_seconds: Sequence[Sequence[float]], *, rate: float | None = None,
             latency: float = 0.0, wire: float = 1.0, batch: int = 1) -> Timeline:
    """Lay out `schedule` in time (module docstring). `stage_seconds[k][i]`: node k's stage i alone, seconds;
    `rate`: link bytes per second in each direction (None: unlimited); `latency`: one-way seconds per message;
    `wire`: wire bytes per payload byte; `batch`: samples per inference (message bytes are per sample)."""
    programs = schedule.programs
    if [len(p) for p in programs] != [len(t) for t in stage_seconds]:
        raise ValueError(f"stage_seconds has {[len(t) for t in stage_seconds]} stages per node, the schedule "
                         f"{[len(p) for p in programs]}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be above 0 bytes per second, got {rate}")
    layout = _Layout(schedule, stage_seconds, rate, latency, wire, batch)
    while any(layout.next[k] < len(p) for k, p in enumerate(programs)):
        progressed = [layout.advance(k) for k in range(len(programs))]
        if not any(progressed):
            stuck = {k: layout.next[k] for k in range(len(programs)) if layout.next[k] < len(programs[k])}
            raise ValueError(f"the schedule cannot run: nodes {stuck} (node: stage) each wait for a message "
                             f"that no stage before them produces")
    missing = [ref for ref in dict.fromkeys(m.id for m in schedule.messages) if ref not in layout.arrival]
    if missing:
        raise ValueError(f"messages {missing} are produced by no stage of the schedule")
    return Timeline(latency=max(layout.stage_end.values(), default=0.0), stage_end=layout.stage_end,
                    arrival=layout.arrival, waiting=layout.waiting, link_busy=layout.link_busy)


class _Layout:
    """The stages and messages laid out so far (module docstring): `next[k]`, node k's first stage not laid
    out yet; when each stage ends and each message arrives; when each link is free again and how long it has
    carried data; how long each node has waited."""

    def __init__(self, schedule: Schedule, stage_seconds: Sequence[Sequence[float]], rate: float | None,
                 latency: float, wire: float, batch: int):
        self.programs, self.stage_seconds = schedule.programs, stage_seconds
        self.rate, self.latency, self.wire, self.batch = rate, latency, wire, batch
        self.sent_by: dict[tuple[int, int], list[Message]] = {}  # (node, stage) -> its messages, in output order
        for m in schedule.messages:
            self.sent_by.setdefault((m.src, m.src_stage), []).append(m)
        self.next = [0] * len(self.programs)
        self.stage_end: dict[tuple[int, int], float] = {}
        self.arrival: dict[str, float] = {}
        self.link_free: dict[tuple[int, int], float] = {}
        self.link_busy: dict[tuple[int, int], float] = {}
        self.waiting = [0.0] * len(self.programs)

    def advance(self, k: int) -> bool:
        """Lay out node k's next stages up to one that reads a message not laid out yet; whether any were."""
        program = self.programs[k]
        progressed = False
        while self.next[k] < len(program):
            i = self.next[k]
            reads = [inp.ref for inp in program[i].inputs if inp.source == "message"]
            if any(ref not in self.arrival for ref in reads):
                break  # a message it needs is not laid out yet: another node first
            ready = self.stage_end.get((k, i - 1), 0.0)
            start = max([ready] + [self.arrival[ref] for ref in reads])
            self.waiting[k] += start - ready
            self.stage_end[(k, i)] = end = start + self.stage_seconds[k][i]
            for m in self.sent_by.get((k, i), []):
                self._send(m, end)
            self.next[k] += 1
            progressed = True
        return progressed

    def _send(self, m: Message, ready: float) -> None:
        """Lay out message `m`, produced at time `ready`, on its link."""
        link = (m.src, m.dst)
        on_wire = 0.0 if self.rate is None else m.bytes * self.batch * self.wire / self.rate
        leaves = max(ready, self.link_free.get(link, 0.0)) + on_wire
        self.link_free[link] = leaves
        self.link_busy[link] = self.link_busy.get(link, 0.0) + on_wire
        self.arrival[m.id] = leaves + self.latency
