"""Wire precisions of a message, torch-free (the export format's side; the quantisation is ops/wire.py).

fp32: the values as computed (the tensor's own dtype); fp16: IEEE half; int8 and int4: integers with one scale per
unit and zero point 0, in [-128, 127] and [-8, 7]. An int4 message packs two values a byte: a sample's values,
flattened (C order), as nibbles c = q + 8, two a byte, c[2k] + 16 c[2k+1], uint8; an odd count ends with a 0
nibble. Its payload is [batch, ceil(n / 2)] uint8 for n values a sample. The schedule records a message's `wire`.

A model input that node 0 sends the others travels at the message wire, but at 8 bits at least (INPUT_WIRES: an
int4 export sends its input as int8; 16 levels would be coarser than the camera's own 256).
"""
from __future__ import annotations

import math

WIRES = ("fp32", "fp16", "int8", "int4")
DEFAULT_WIRE = "fp32"
WIRE_BITS = {"fp16": 16, "int8": 8, "int4": 4}  # fp32: the tensor's own dtype
RANGES = {"int8": (-128, 127), "int4": (-8, 7)}
INPUT_WIRES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int8"}  # message wire -> the input's
DTYPES = {"fp16": "float16", "int8": "int8", "int4": "uint8"}  # numpy dtype of the payload (fp32: the tensor's)


def is_integer(wire: str) -> bool:
    return wire in RANGES


def unit_bytes(elems: int, itemsize: int, wire: str) -> float:
    """Bytes per sample one unit of `elems` values costs on the wire (int4: half a byte a value)."""
    return elems * (itemsize if wire == "fp32" else WIRE_BITS[wire] / 8)


def payload_shape(shape: tuple[int, ...], wire: str) -> tuple[int, ...]:
    """The per-sample payload shape of values of per-sample `shape` at `wire` (int4: packed, (1, ceil(n / 2)))."""
    return (1, math.ceil(math.prod(shape) / 2)) if wire == "int4" else tuple(shape)
