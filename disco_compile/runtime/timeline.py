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

from ..artifact.schedule import Schedule


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
    messages = {m.id: m for m in schedule.messages}
    sent_by = {}  # (node, stage) -> its messages, in output order
    for m in schedule.messages:
        sent_by.setdefault((m.src, m.src_stage), []).append(m)
    stage_end, arrival, link_free, link_busy = {}, {}, {}, {}
    waiting = [0.0] * len(programs)
    nxt = [0] * len(programs)
    while any(nxt[k] < len(p) for k, p in enumerate(programs)):
        progressed = False
        for k, program in enumerate(programs):
            while nxt[k] < len(program):
                i = nxt[k]
                reads = [inp.ref for inp in program[i].inputs if inp.source == "message"]
                if any(ref not in arrival for ref in reads):
                    break  # a message it needs is not laid out yet: another node first
                ready = stage_end.get((k, i - 1), 0.0)
                start = max([ready] + [arrival[ref] for ref in reads])
                waiting[k] += start - ready
                stage_end[(k, i)] = end = start + stage_seconds[k][i]
                for m in sent_by.get((k, i), []):
                    link = (m.src, m.dst)
                    on_wire = 0.0 if rate is None else m.bytes * batch * wire / rate
                    leaves = max(end, link_free.get(link, 0.0)) + on_wire
                    link_free[link] = leaves
                    link_busy[link] = link_busy.get(link, 0.0) + on_wire
                    arrival[m.id] = leaves + latency
                nxt[k] += 1
                progressed = True
        if not progressed:
            stuck = {k: nxt[k] for k in range(len(programs)) if nxt[k] < len(programs[k])}
            raise ValueError(f"the schedule cannot run: nodes {stuck} (node: stage) each wait for a message "
                             f"that no stage before them produces")
    missing = [ref for ref in messages if ref not in arrival]
    if missing:
        raise ValueError(f"messages {missing} are produced by no stage of the schedule")
    return Timeline(latency=max(stage_end.values(), default=0.0), stage_end=stage_end, arrival=arrival,
                    waiting=waiting, link_busy=link_busy)
