"""The requests of one node: which run here, which node 0 announced, which failed and why, and the payloads
that arrived for them.

Requests. Messages are tagged with a request id, and a receive looks for the
(request, message) pair, so requests in flight at the same time cannot mix.
The thread that runs a request sets it with `with transport.request(r):`;
without one, request 0. Node 0 announces each request to every peer with
BEGIN, under one lock, so every node sees the requests in the same order;
workers run them in that order (`next_request`).
"""
from __future__ import annotations

from collections import deque

import numpy as np

from ...errors import DiscoError

_FINISHED_KEPT = 4096  # ids of finished requests remembered, to drop their late messages


class Requests:
    """The request book of one ZmqTransport; the transport's lock guards every use."""

    def __init__(self):
        self.open: set[int] = set()  # requests running on this node
        self.announced: deque[int] = deque()  # requests announced by node 0, not yet taken
        self.failed: dict[int, DiscoError] = {}  # request -> why it failed
        self._inbox: dict[tuple[int, str], deque[np.ndarray]] = {}  # (request, message id) -> payloads
        self._finished: deque[int] = deque(maxlen=_FINISHED_KEPT)
        self._finished_set: set[int] = set()

    def finished(self, request: int) -> bool:
        """Whether `request` ended here (recently): its late messages are dropped."""
        return request in self._finished_set

    def finish(self, request: int) -> None:
        """Forget `request`: drop what is buffered for it, and its late messages."""
        self.open.discard(request)
        self.failed.pop(request, None)
        for key in [key for key in self._inbox if key[0] == request]:
            del self._inbox[key]
        if request not in self._finished_set:
            if len(self._finished) == self._finished.maxlen:
                self._finished_set.discard(self._finished[0])
            self._finished.append(request)
            self._finished_set.add(request)

    def fail(self, request: int, err: DiscoError) -> None:
        """`request` failed with `err` (unless it failed already)."""
        self.failed.setdefault(request, err)

    def fail_open(self, err: DiscoError) -> None:
        """Fail every request open or announced here with `err`."""
        for r in [*self.open, *self.announced]:
            self.fail(r, err)

    def file(self, request: int, message_id: str, payload: np.ndarray) -> None:
        """A payload that arrived for message `message_id` of `request`."""
        self._inbox.setdefault((request, message_id), deque()).append(payload)

    def take(self, request: int, message_id: str) -> np.ndarray | None:
        """The first payload filed for message `message_id` of `request`, None if there is none yet."""
        key = (request, message_id)
        queue_ = self._inbox.get(key)
        if not queue_:
            return None
        payload = queue_.popleft()
        if not queue_:
            del self._inbox[key]
        return payload

    def drop_messages(self, message_ids: set[str]) -> None:
        """Drop the payloads filed for these messages in every request (their sender restarted)."""
        for key in [key for key in self._inbox if key[1] in message_ids]:
            del self._inbox[key]
