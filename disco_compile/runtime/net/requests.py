"""The requests of one node: which run here, which node 0 announced, which failed and why, and the payloads
that arrived for them.

Requests. Messages are tagged with a request id, and a receive looks for the
(request, message) pair, so requests in flight at the same time cannot mix.
The thread that runs a request sets it with `with transport.request(r):`;
without one, request 0. Node 0 announces each request to every peer with
BEGIN, under one lock, so every node sees the requests in the same order;
workers run them in that order (`next_request`).

What is kept. A request is live from its BEGIN (node 0: from when it opens it)
until it finishes here; payloads and failures are kept for live requests only,
one payload per (request, message). Node 0 sends a request's BEGIN before its
messages on the same connection, so anything from node 0 for a request that is
not live is dropped. Another worker may run a request before node 0's BEGIN for
it reaches this node (the two travel on different connections): what it sends
is kept as early, for at most EARLY_KEPT requests and until `expire` (the
transport's timeout) unless the BEGIN comes. At most ANNOUNCED_KEPT announced
requests wait to be taken. So the book holds at most that many requests'
messages, whatever a peer sends.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from ...errors import DiscoError

_FINISHED_KEPT = 4096  # ids of finished requests remembered, to drop their late messages
EARLY_KEPT = 64  # requests not announced yet whose messages (from other workers) are kept
ANNOUNCED_KEPT = 1024  # announced requests not yet taken by a worker


class Requests:
    """The request book of one ZmqTransport; the transport's lock guards every use. `node`: this node."""

    def __init__(self, node: int):
        self.node = node
        self.open: set[int] = set()  # requests running on this node
        self.announced: deque[int] = deque()  # requests announced by node 0, not yet taken
        self.failed: dict[int, DiscoError] = {}  # request -> why it failed
        self._live: set[int] = set()  # announced, taken or open here, not finished
        self._early: dict[int, float] = {}  # request not yet announced -> when something first came for it
        self._inbox: dict[tuple[int, str], np.ndarray] = {}  # (request, message id) -> payload
        self._finished: deque[int] = deque(maxlen=_FINISHED_KEPT)
        self._finished_set: set[int] = set()

    def finished(self, request: int) -> bool:
        """Whether `request` ended here (recently): its late messages are dropped."""
        return request in self._finished_set

    def start(self, request: int) -> None:
        """Run `request` here (ValueError if it runs already)."""
        if request in self.open:
            raise ValueError(f"request {request} is running already on node {self.node}")
        self.open.add(request)
        self._live.add(request)
        self._early.pop(request, None)

    def announce(self, request: int) -> str | None:
        """Node 0 announced `request`; why the BEGIN is dropped instead (None if it is taken)."""
        if request in self._live or self.finished(request):
            return f"request {request} was announced before"
        if len(self.announced) >= ANNOUNCED_KEPT:
            return f"{ANNOUNCED_KEPT} announced requests wait already"
        self.announced.append(request)
        self._live.add(request)
        self._early.pop(request, None)
        return None

    def admit(self, request: int, sender: int, now: float) -> str | None:
        """Whether something from `sender` for `request` is kept: None if so, else why not (see What is kept)."""
        if request in self._live:
            return None
        if self.finished(request):
            return ""  # a late message of a request that ended (failed) here: dropped without a word
        if sender == 0 or self.node == 0:
            return f"request {request} was never announced"
        if request not in self._early and len(self._early) >= EARLY_KEPT:
            return f"request {request} was never announced ({EARLY_KEPT} such requests are kept already)"
        self._early.setdefault(request, now)
        return None

    def expire(self, before: float) -> None:
        """Forget the early requests first seen before `before` that were never announced."""
        for request in [r for r, seen in self._early.items() if seen < before]:
            self._forget(request)

    def finish(self, request: int) -> None:
        """Forget `request`: drop what is buffered for it, and its late messages."""
        self._forget(request)
        if request not in self._finished_set:
            if len(self._finished) == self._finished.maxlen:
                self._finished_set.discard(self._finished[0])
            self._finished.append(request)
            self._finished_set.add(request)

    def _forget(self, request: int) -> None:
        self.open.discard(request)
        self._live.discard(request)
        self._early.pop(request, None)
        self.failed.pop(request, None)
        for key in [key for key in self._inbox if key[0] == request]:
            del self._inbox[key]

    def fail(self, request: int, err: DiscoError) -> None:
        """`request` failed with `err` (unless it failed already)."""
        self.failed.setdefault(request, err)

    def fail_open(self, err: DiscoError) -> None:
        """Fail every live request here with `err`."""
        for r in self._live:
            self.fail(r, err)

    def file(self, request: int, message_id: str, payload: np.ndarray) -> str | None:
        """A payload that arrived for message `message_id` of `request` (admitted); why it is dropped instead
        (None if it is kept)."""
        key = (request, message_id)
        if key in self._inbox:
            return f"message {message_id!r} of request {request} arrived twice"
        self._inbox[key] = payload
        return None

    def take(self, request: int, message_id: str) -> np.ndarray | None:
        """The payload filed for message `message_id` of `request`, None if there is none yet."""
        return self._inbox.pop((request, message_id), None)

    def drop_messages(self, message_ids: set[str]) -> None:
        """Drop the payloads filed for these messages in every request (their sender restarted)."""
        for key in [key for key in self._inbox if key[1] in message_ids]:
            del self._inbox[key]

    def held(self) -> int:
        """How many payloads are held (for tests and benchmarks)."""
        return len(self._inbox)
