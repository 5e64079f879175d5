"""Streams of requests: numpy arrays one after another, and requests kept in flight while they run.

A stream is .npy records back to back, as numpy.save writes them to one open file (a pipe, a socket,
stdin): `disco-run --input -` reads one model input per record and runs each as a request, and
`--output -` writes each request's outputs, one record per model output, in the order the requests came.
`pipelined` keeps up to `depth` requests running while more are read, so a stream is run as fast as
the nodes allow and not one request at a time.

Reading a record trusts nothing in it: the header is parsed (numpy's own parser, at most numpy's
10,000-byte header), object dtypes, negative dimensions and dimensions whose product is beyond what numpy
can index (even with a zero among them) are refused, a record that claims more bytes than
a file holds is refused before anything is allocated, and a stream's payload is read in chunks of CHUNK
bytes, so memory grows only with the bytes that actually arrive. Arrays come back in native byte order
(a `>f4` record is converted: onnxruntime would read its bytes as little-endian).
"""
from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import numpy as np

from ..errors import InputMismatch


CHUNK = 1 << 24  # bytes of a stream's payload read at a time


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
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def native(array: np.ndarray) -> np.ndarray:
    """`array` in this machine's byte order (a copy where it was not)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def read_array(fp, what: str, file_size: int | None = None) -> np.ndarray:
    """The .npy record at the position of the binary file object `fp` (module docstring); `file_size`: the size
    of the file `fp` reads, which the payload must fit in. InputMismatch naming `what` if it is not a .npy record,
    is cut short, or claims more than the file holds."""
    try:
        version = np.lib.format.read_magic(fp)
        if version not in _HEADERS:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here (1.0 or 2.0)")
        shape, fortran, dtype = _HEADERS[version](fp)
    except Exception as exc:  # numpy's header parser raises many types: ValueError, SyntaxError, TokenError, ...
        raise InputMismatch(f"{what} is not a .npy array ({str(exc)[:300]}); write each input with "
                            f"numpy.save") from None
    if dtype.hasobject or any(d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) * dtype.itemsize >> 62:
        raise InputMismatch(f"{what}: a .npy header with dtype {dtype} and shape {shape[:8]}, which is no array "
                            f"numpy can hold; write each input with numpy.save")
    size = math.prod(shape) * dtype.itemsize
    left = None if file_size is None else file_size - fp.tell()
    if left is not None and size > left:
        raise InputMismatch(f"{what}: its header claims shape {shape[:8]} of {dtype} ({size:.4g} bytes), but only "
                            f"{left} bytes follow it: the file is cut short or its header is wrong")
    data = bytearray()
    while len(data) < size:
        chunk = fp.read(min(CHUNK, size - len(data)))
        if not chunk:
            raise InputMismatch(f"{what}: cut short, {len(data)} of the {size} bytes its header claims (shape "
                                f"{shape[:8]} of {dtype})")
        data += chunk
    flat = np.frombuffer(data, dtype)
    return native(flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape))


def load_npy(path) -> np.ndarray:
    """The array in the .npy file `path` (`read_array`, held to the file's size); InputMismatch naming it."""
    what = f"--input {path}"
    try:
        with open(path, "rb") as f:
            array = read_array(f, what, file_size=os.fstat(f.fileno()).st_size)
            if f.read(1):
                raise InputMismatch(f"{what}: more bytes follow the array its header describes; write it with "
                                    f"numpy.save(path, array)")
            return array
    except OSError as exc:
        raise InputMismatch(f"{what}: cannot be read ({exc.strerror or exc})") from None


def read_arrays(fp) -> Iterator[np.ndarray]:
    """The arrays of the .npy stream `fp` (a binary file object), until it ends (`read_array` each).
    InputMismatch if what comes is not a .npy record (or is cut short)."""
    count = 0
    while True:
        head = fp.read(1)
        if not head:
            return
        count += 1
        yield read_array(_Rejoined(head, fp), f"record {count} of the input stream")


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
