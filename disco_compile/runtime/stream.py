"""Streams of requests: numpy arrays one after another, and requests kept in flight while they run.

A stream is .npy records back to back, as numpy.save writes them to one open file (a pipe, a socket,
stdin): `disco-run --input -` reads one model input per record and runs each as a request, and
`--output -` writes each request's outputs, one record per model output, in the order the requests came.
`pipelined` keeps up to `depth` requests running while more are read, so a stream is run as fast as
the nodes allow and not one request at a time.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import numpy as np

from ..errors import InputMismatch


class _Rejoined:
    """A binary file object with `head` put back in front of what is left to read."""

    def __init__(self, head: bytes, fp):
        self.head, self.fp = head, fp

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.fp.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.fp.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + (self.fp.read(n - len(data)) if len(data) < n else b"")


def read_arrays(fp) -> Iterator[np.ndarray]:
    """The arrays of the .npy stream `fp` (a binary file object), until it ends. InputMismatch if what
    comes is not a .npy record (or is cut short)."""
    count = 0
    while True:
        head = fp.read(1)
        if not head:
            return
        count += 1
        try:
            yield np.lib.format.read_array(_Rejoined(head, fp), allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise InputMismatch(f"record {count} of the input stream is not a .npy array ({exc}); write each "
                                f"input with numpy.save(stream, array)") from exc


def write_arrays(fp, arrays: Iterable[np.ndarray]) -> None:
    """Append `arrays` to the .npy stream `fp` and flush it."""
    for a in arrays:
        np.lib.format.write_array(fp, np.asarray(a), allow_pickle=False)
    fp.flush()


def pipelined(submit: Callable[[object], Future], requests: Iterable, depth: int) -> Iterator:
    """Each request's result, in request order, with up to `depth` requests submitted and not yet taken."""
    pending: deque[Future] = deque()
    for request in requests:
        pending.append(submit(request))
        while pending and (len(pending) >= depth or pending[0].done()):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
