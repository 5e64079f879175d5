"""Transports: how one node's messages reach another.

A Transport moves (Header, payload) pairs and nothing else. The Header says what
the sender believes it sends: the schedule hash of its export, the message id,
its node, and the payload's dtype and shape. The receiver checks it against its
own schedule with `check_arrival` before handing the array over; any difference
is a MessageError naming the message and what differs, never a reshape or a
cast. Sends never block; receives wait at most `timeout` seconds (PeerTimeout,
naming the message and the peer) and stop at once when a peer reports that it
failed (PeerFailed), so a failure anywhere stops every node.

InProcTransport (threads of one process, for `disco-run --simulate` and tests)
is one queue per destination node, shared through an InProcHub; the payload is
copied on send, so sender and receiver never share an array. A transport
between machines implements the same four methods and reuses `Header` and
`check_arrival`.
"""
from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import MessageError, PeerFailed, PeerTimeout
from ..artifact.schedule import BATCH, Message


_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """`dtype.name`, remembered per dtype: numpy 2 works the name out in Python on every call (26 us a call
    measured on a loaded core, docs/performance.md), and the runtime asks for it several times per message."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


@dataclass(frozen=True)
class Header:
    """What travels in front of every payload."""
    schedule_hash: str
    message_id: str
    src: int
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]

    @classmethod
    def describe(cls, schedule_hash: str, msg: Message, payload: np.ndarray) -> Header:
        return cls(schedule_hash, msg.id, msg.src, dtype_name(payload.dtype), tuple(int(d) for d in payload.shape))


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_arrival(header: Header, payload: np.ndarray, msg: Message, schedule_hash: str) -> None:
    """MessageError unless `header` and `payload` are what the schedule says `msg` carries."""
    problems = []
    if header.schedule_hash != schedule_hash:
        problems.append(f"it was sent under schedule {header.schedule_hash[:12]}..., this node runs schedule "
                        f"{schedule_hash[:12]}...: the nodes hold different exports; give every node the same "
                        f"export directory")
    if header.message_id != msg.id:
        problems.append(f"its header names message {header.message_id!r}")
    if header.src != msg.src:
        problems.append(f"it came from node {header.src}, the schedule says node {msg.src}")
    if header.dtype != msg.dtype:
        problems.append(f"dtype {header.dtype}, the schedule says {msg.dtype}")
    if len(header.shape) != len(msg.shape) or tuple(header.shape[1:]) != tuple(msg.shape[1:]) or (
            header.shape and header.shape[0] < 1):
        problems.append(f"shape {_fmt(header.shape)}, the schedule says {_fmt(msg.shape)} ({BATCH!r}: any batch)")
    if dtype_name(payload.dtype) != header.dtype or payload.shape != tuple(header.shape):
        problems.append(f"the payload ({dtype_name(payload.dtype)} {_fmt(payload.shape)}) does not match its header "
                        f"({header.dtype} {_fmt(header.shape)}): it was damaged on the way")
    if problems:
        raise MessageError(f"message {msg.id!r} ({msg.kind}, node {msg.src} -> node {msg.dst}) arrived wrong: "
                           + "; ".join(problems))


class Transport(ABC):
    """Carries this node's messages. One instance per node; `node` is this node's index."""

    def __init__(self, node: int, schedule_hash: str):
        self.node = node
        self.schedule_hash = schedule_hash

    @abstractmethod
    def send(self, msg: Message, payload: np.ndarray) -> None:
        """Send `payload` as message `msg` to node `msg.dst`, tagged with a Header; returns without waiting."""

    @abstractmethod
    def recv(self, msg: Message, timeout: float) -> np.ndarray:
        """The payload of message `msg`, checked with `check_arrival`. Waits at most `timeout` seconds
        (PeerTimeout); PeerFailed as soon as a peer reports that it failed."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Tell every peer that this node failed (`reason`), so they stop instead of waiting."""

    def close(self) -> None:  # noqa: B027 (not abstract: a transport that holds nothing needs no close)
        """Release what the transport holds (sockets, ...)."""

    def _check_ends(self, msg: Message, sending: bool) -> None:
        node = msg.src if sending else msg.dst
        if node != self.node:
            verb = "send" if sending else "receive"
            raise MessageError(f"node {self.node} cannot {verb} message {msg.id!r}: the schedule has it "
                               f"go from node {msg.src} to node {msg.dst}")

    def _timeout(self, msg: Message, timeout: float) -> PeerTimeout:
        return PeerTimeout(f"node {self.node} waited {timeout:g} s for message {msg.id!r} ({msg.kind}) from node "
                           f"{msg.src} (its stage {msg.src_stage}, for stage {msg.dst_stage} here), and it did not "
                           f"come: node {msg.src} failed, stopped or is slower than that; if it is only slow, "
                           f"give a longer timeout (run_local(timeout=...), disco-run --timeout)")


_WAKE = object()  # put into every queue when a node fails, so waiting receivers look at once


class InProcHub:
    """The shared medium of the InProcTransports of one process: a queue per destination node,
    and the first failure reported by any node."""

    def __init__(self, nodes: int):
        self._queues = [queue.Queue() for _ in range(nodes)]
        self._lock = threading.Lock()
        self._failure: tuple[int | None, str] | None = None

    def transport(self, node: int, schedule_hash: str) -> InProcTransport:
        if not 0 <= node < len(self._queues):
            raise ValueError(f"node {node}: this hub connects nodes 0..{len(self._queues) - 1}")
        return InProcTransport(self, node, schedule_hash)

    def abort(self, node: int | None, reason: str) -> None:
        """Record that `node` (None: the caller of the run) failed, and wake every receiver."""
        with self._lock:
            if self._failure is None:
                self._failure = (node, reason)
        for q in self._queues:
            q.put(_WAKE)

    def failure(self) -> tuple[int | None, str] | None:
        with self._lock:
            return self._failure


class InProcTransport(Transport):
    """Messages between threads of one process, through an InProcHub."""

    def __init__(self, hub: InProcHub, node: int, schedule_hash: str):
        super().__init__(node, schedule_hash)
        self._hub = hub
        self._inbox = hub._queues[node]
        self._arrived: dict[str, deque[tuple[Header, np.ndarray]]] = {}  # taken from the queue, not yet asked for

    def send(self, msg: Message, payload: np.ndarray) -> None:
        self._check_ends(msg, sending=True)
        data = np.array(payload, copy=True, order="C")  # the receiver gets its own array
        self._hub._queues[msg.dst].put((Header.describe(self.schedule_hash, msg, data), data))

    def recv(self, msg: Message, timeout: float) -> np.ndarray:
        self._check_ends(msg, sending=False)
        deadline = time.monotonic() + timeout
        while not self._arrived.get(msg.id):
            failure = self._hub.failure()
            if failure is not None:
                failed, reason = failure
                who = "the run was stopped" if failed is None else f"node {failed} failed"
                raise PeerFailed(f"node {self.node} stopped waiting for message {msg.id!r} from node {msg.src}: "
                                 f"{who} ({reason})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(msg, timeout)
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is not _WAKE:
                header, data = item
                self._arrived.setdefault(header.message_id, deque()).append((header, data))
        header, data = self._arrived[msg.id].popleft()
        check_arrival(header, data, msg, self.schedule_hash)
        return data

    def abort(self, reason: str) -> None:
        self._hub.abort(self.node, reason)
