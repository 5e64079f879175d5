"""Pooling and resizing: max, average, adaptive and LP pooling, upsampling and interpolation, and the patch
extraction of Unfold. Each output channel is computed from the same input channel alone, so the rule is
channelwise's (labels pass through); Unfold's output channel c*k + i (k = kh*kw patch positions) is position i
of input channel c's patches, so it takes channel c's label.

Lowering: the op on node j's local tensor. Adaptive average pooling between sizes that do not divide (which
torch.onnx cannot export) becomes one matrix product per pooled dim: X C^T for a signal, R X C^T for an image
(and a transposed product for a volume's depth), where row i of R (and of C) averages inputs
floor(i*in/out) .. ceil((i+1)*in/out) - 1 as adaptive pooling does.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..backend.program import Local
from ..ir import channel_dims
from .channelwise import keeps_layout, run_local
from .registry import Fallback, Family, RuleContext

POOLING = Family("pooling")
aten = torch.ops.aten

POOLING.ops(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
    rule=keeps_layout,
    aten={aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
          aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
          aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
          aten.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d})


@POOLING.rule(nn.Unfold, F.unfold, patches=True)
def unfold(ctx: RuleContext) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*k, L): each input channel's label repeated for its k patch positions."""
    value, labels = ctx.first_labelled()
    if value.dim() != 4 or channel_dims(labels) not in ((), (1,)):
        raise Fallback("Unfold of a tensor whose channels are not along dim 1 of (B, C, H, W)")
    return labels.reshape(1, -1, 1).repeat_interleave(ctx.out.shape[1] // value.shape[1], dim=1)


def _unfold_local(b, n: fx.Node, module, loc: Local) -> None:
    """Unfold of node j's channels: input unit u (in local order) becomes output units u*k .. u*k + k-1."""
    lay, x = b.low.layout(n), n.all_input_nodes[0]
    per = lay.units // b.low.layout(x).units
    units = None if loc.units is None else (loc.units[:, None] * per + torch.arange(per)).reshape(-1)
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: loc.node if a is x else b.value(a))
    node = b.emit(n, module, args, kwargs, lay.rep_shape(None if units is None else units.numel()), lay.dtype)
    b.hold(n, node, units)


def adaptive_pool_matrix(size_in: int, size_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(size_out, size_in): row i averages inputs floor(i*in/out) .. ceil((i+1)*in/out) - 1."""
    m = torch.zeros(size_out, size_in, dtype=dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def pool_by_matrices(x: torch.Tensor, *mats: torch.Tensor) -> torch.Tensor:
    """Adaptive average pooling of the last len(mats) dims of x, mats[k] (out, in) pooling the k-th of them:
    rows @ x @ cols^T for (..., H, W)."""
    for k, m in enumerate(mats):
        d = k - len(mats)
        if d == -1:
            x = x @ m.transpose(0, 1)
        elif d == -2:
            x = m @ x
        else:
            x = (x.transpose(d, -1) @ m.transpose(0, 1)).transpose(d, -1)
    return x


_ADAPTIVE_AVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                 F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}


def _uneven_adaptive_avg_pool(n: fx.Node, module, in_shape, out_shape) -> int:
    """How many dims an adaptive average pooling with a size that does not divide its input pools; else 0."""
    dims = _ADAPTIVE_AVG.get(type(module) if module is not None else n.target, 0)
    if not dims or len(in_shape) != dims + 2:
        return 0
    return dims if any(i % o for i, o in zip(in_shape[-dims:], out_shape[-dims:], strict=True)) else 0


@POOLING.lowers
def lower(b, n: fx.Node, module, op) -> None:
    loc = b.env[n.all_input_nodes[0].name]
    if loc.node is None:
        b.env[n.name] = Local(None, loc.units)
        return
    if op.data.get("patches"):
        return _unfold_local(b, n, module, loc)
    lay = b.low.layout(n)
    shape = lay.rep_shape(None if loc.units is None else loc.units.numel())
    in_shape = b.shapes[loc.node.name]
    dims = _uneven_adaptive_avg_pool(n, module, in_shape, shape)
    if not dims:
        return run_local(b, n, module)
    mats = tuple(b.const(f"{n.name}_pool", adaptive_pool_matrix(i, o, lay.dtype))
                 for i, o in zip(in_shape[-dims:], shape[-dims:], strict=True))
    b.hold(n, b.call(pool_by_matrices, (loc.node, *mats), shape=shape, dtype=lay.dtype), loc.units)
