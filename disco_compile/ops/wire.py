"""Wire precision: what an exchange message carries, and the quantisation that gets it there.

A message's values are the exchanged units of one tensor. At wire precision `fp32` they travel as computed; `fp16`
as IEEE half; `int8` and `int4` as integers with one scale per unit (channel) s_u, zero point 0:

    q = clamp(round_half_even(x / s_u), lo, hi),   x' = q * s_u
    int8: [lo, hi] = [-128, 127],  s_u = amax_u / 127;   int4: [-8, 7],  s_u = amax_u / 7

amax_u is the largest |x_u| seen on calibration data (`Calibration`); the scales are then held, or learned in
fine-tuning. The DISCO model applies x' in the forward pass with the straight-through gradient (d round(v)/dv := 1,
so dx'/dx = 1 inside the clamp and 0 outside; ds_u gets the LSQ gradient round(v) - v inside, lo or hi outside), so
training sees exactly what the wire carries. int4 packs two values a byte (artifact/wire.py).

Lowering (ops/exchange.py): the sender's stage ends in `quantise` (ONNX QuantizeLinear per axis, then a Clip to
[-8, 7] for int4, then the packing), the receiver's begins with `dequantise` (the unpacking, then DequantizeLinear).
QuantizeLinear divides by the scale and rounds half to even as `quantise` does here, so the shards compute what the
DISCO model computes; where onnxruntime's division lands on the other side of a rounding tie, the value differs by
one step s_u (tests count such values). The names and the payload layout are torch-free: artifact/wire.py.
"""
from __future__ import annotations

import math

import torch

from ..errors import DiscoError
from ..artifact.wire import DEFAULT_WIRE, DTYPES, INPUT_WIRES, RANGES, WIRE_BITS, WIRES, is_integer, payload_shape
from ..artifact.wire import unit_bytes

__all__ = ["DEFAULT_WIRE", "INPUT_WIRES", "WIRE_BITS", "WIRES", "Calibration", "WireError", "dequantise", "fake",
           "is_integer", "payload", "quantise", "uncalibrated", "unit_bytes"]


def payload(shape: tuple[int, ...], dtype: torch.dtype, wire: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(per-sample shape, dtype) of a message whose values have per-sample `shape` and `dtype`, at `wire`."""
    return payload_shape(shape, wire), dtype if wire == "fp32" else getattr(torch, DTYPES[wire])


class WireError(DiscoError):
    """A wire precision that is unknown, or an integer one whose scales were never calibrated."""


def uncalibrated(wire: str, where: str) -> WireError:
    """The error for an integer wire used (`where`: what was asked of it) before its scales were calibrated."""
    return WireError(f"{where}: the {wire} wire's scales were never calibrated: call dm.calibrate_wire(batches) "
                     f"first (finetune and one_shot with batches do it)")


# ---------------------------------------------------------------- the DISCO model's fake quantisation

def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def fake(x: torch.Tensor, wire: str, scale: torch.Tensor | None) -> torch.Tensor:
    """x as the receiver gets it (module docstring); `scale` broadcasts against x (one value per unit)."""
    if wire == "fp32":
        return x
    if wire == "fp16":
        return x + (x.to(torch.float16).to(x.dtype) - x).detach()
    lo, hi = RANGES[wire]
    return _round_ste(x / scale).clamp(lo, hi) * scale


class Calibration:
    """The running max |x| per unit of one tensor, reduced over every dim but the unit dims of `label_shape`
    (which broadcasts against x's trailing dims)."""

    def __init__(self, label_shape: tuple[int, ...]):
        self.label_shape = label_shape
        self.amax: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        a = x.detach().abs()
        lead = a.dim() - len(self.label_shape)
        a = a.amax(dim=tuple(range(lead))) if lead else a
        dims = tuple(d for d, s in enumerate(self.label_shape) if s == 1 and a.shape[d] != 1)
        a = (a.amax(dim=dims, keepdim=True) if dims else a).reshape(-1).float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)

    def scales(self, wire: str) -> torch.Tensor:
        """s_u = amax_u / hi; a unit never seen nonzero gets s_u = 1 (its values are all 0 at any scale)."""
        if self.amax is None:
            raise WireError("calibrating the wire's scales needs at least one batch of inputs; none was given")
        hi = RANGES[wire][1]
        return torch.where(self.amax > 0, self.amax / hi, torch.ones_like(self.amax))


# ---------------------------------------------------------------- lowering: the stages' quantise and dequantise

class _QuantizeLinear(torch.autograd.Function):
    """round_half_even(x / scale) saturated to int8, one scale per index of `axis` (ONNX QuantizeLinear)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis):
        shape = [1] * x.dim()
        shape[axis] = -1
        return torch.round(x / scale.reshape(shape)).clamp(-128, 127).to(torch.int8)

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis):
        return g.op("QuantizeLinear", x, scale, zero_point, axis_i=axis)


class _DequantizeLinear(torch.autograd.Function):
    """q * scale, one scale per index of `axis` (ONNX DequantizeLinear)."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):
        shape = [1] * q.dim()
        shape[axis] = -1
        return q.to(torch.float32) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def quantise(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, wire: str,
             shape: tuple[int, ...]) -> torch.Tensor:
    """The sender's side: x (units along `axis`; per sample of `shape`, dim 0 the batch or the batch folded with
    rows, batch-major) as the message payload at integer `wire`."""
    q = _QuantizeLinear.apply(x, scale, zero_point, axis)
    if wire == "int8":
        return q
    lo, hi = RANGES[wire]
    n = math.prod(shape)
    flat = q.clamp(lo, hi).reshape(-1, n).to(torch.int32) - lo
    if n % 2:
        flat = torch.cat([flat, torch.zeros_like(flat[:, :1])], 1)
    pairs = flat.reshape(-1, (n + 1) // 2, 2)
    return (pairs[:, :, 0] + pairs[:, :, 1] * 16).to(torch.uint8)


def dequantise(payload: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, wire: str,
               shape: tuple[int, ...]) -> torch.Tensor:
    """The receiver's side: the payload back as float32 values of per-sample `shape` (as `quantise`'s)."""
    q = payload
    if wire == "int4":
        lo = RANGES[wire][0]
        v = payload.to(torch.int32)
        high = torch.div(v, 16, rounding_mode="floor")
        both = torch.stack([v - high * 16, high], 2).reshape(payload.shape[0], -1)
        q = (both[:, :math.prod(shape)] + lo).to(torch.int8).reshape(-1, *shape[1:])
    return _DequantizeLinear.apply(q, scale, zero_point, axis)
