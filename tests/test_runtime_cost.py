"""The runtime's own cost, kept down without changing a byte on the wire (issue 19 item 4).

Two shortcuts on every message (docs/performance.md, "The runtime's own cost"): a MSG's JSON frame is made from a
text cached per (peer process, message, dtype, shape) with only the request id written in, and numpy dtype names
(worked out in Python by numpy 2 on every call) are remembered per dtype. Each must give exactly what the long
way gives; the frames a node sends must parse and check as before.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from disco_compile.artifact.schedule import Message
from disco_compile.errors import MessageError
from disco_compile.runtime.net.protocol import MSG, Identity, Limits, message_header, message_payload, read_arrival
from disco_compile.runtime.transport import Header, check_arrival, dtype_name

SCHEDULE = "5" * 64


def message(dtype: str = "float32", shape=("batch", 8, 3, 3)) -> Message:
    return Message(id="conv1->n1", kind="exchange", src=0, dst=1, tensor="conv1", channels=list(range(8)),
                   shape=list(shape), dtype=dtype, bytes=4 * 8 * 9, src_stage=0, dst_stage=1)


def identity() -> Identity:
    return Identity(0, 2, "0123456789abcdef", "a" * 64, SCHEDULE)


class _Frame:
    """What pyzmq hands a receiver (`bytes`, `buffer`, `len`), from bytes or an array."""

    def __init__(self, data):
        self.bytes = bytes(data) if not isinstance(data, np.ndarray) else data.tobytes()
        self.buffer = memoryview(self.bytes)

    def __len__(self) -> int:
        return len(self.bytes)


@pytest.mark.parametrize("to", [None, "fedcba9876543210"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("request_id", [0, 7, 2 ** 63 - 1])
def test_message_frame_is_the_one_frames_makes(to, batch, request_id):
    """Identity.message's JSON frame is byte for byte the frame `frames` makes from the same fields."""
    ident, msg = identity(), message()
    data = np.ones((batch, 8, 3, 3), np.float32)
    frames = ident.message(to, msg, data, request_id, Limits.of([msg]))
    assert frames[0] == MSG and frames[2] is data
    expected = ident.frames(MSG, to, schedule=SCHEDULE, id=msg.id, src=0, dtype="float32", shape=[batch, 8, 3, 3],
                            request=request_id)[1]
    assert frames[1] == expected
    assert json.loads(frames[1])["request"] == request_id


def test_cached_message_frames_parse_and_check_per_request():
    """The same message sent in two requests and two batch sizes: each frame names its own request and shape,
    parses with read_arrival and passes check_arrival (the cache holds no request id and no stale shape)."""
    ident, msg = identity(), message()
    limits = Limits.of([msg])
    for request, batch in ((11, 1), (12, 2), (13, 1)):
        data = np.arange(batch * 72, dtype=np.float32).reshape(batch, 8, 3, 3)
        arrival = read_arrival([_Frame(f) for f in ident.message("x" * 16, msg, data, request, limits)])
        assert arrival.meta["request"] == request and arrival.meta["shape"] == [batch, 8, 3, 3]
        header = message_header(arrival.meta, 0)
        payload = message_payload(arrival, header, msg.dtype)
        check_arrival(header, payload, msg, SCHEDULE)
        np.testing.assert_array_equal(payload, data, strict=True)


@pytest.mark.parametrize("dtype", ["float32", ">f4", "float16", "int8", "uint8", "int64", "bool", "<i2", ">i2"])
def test_dtype_name_is_numpys(dtype):
    """The remembered name is numpy's, for each byte order too (dtypes equal as keys only when they are equal)."""
    dt = np.dtype(dtype)
    assert dtype_name(dt) == dt.name
    assert dtype_name(np.zeros(2, dt).dtype) == dt.name  # asked again, from the cache


def test_header_and_check_name_other_dtypes():
    """A float16 payload under a float32 schedule entry is refused with both dtypes named, as before."""
    msg = message()
    payload = np.zeros((1, 8, 3, 3), np.float16)
    header = Header.describe(SCHEDULE, msg, payload)
    assert header.dtype == "float16"
    with pytest.raises(MessageError, match=r"dtype float16, the schedule says float32"):
        check_arrival(header, payload, msg, SCHEDULE)
