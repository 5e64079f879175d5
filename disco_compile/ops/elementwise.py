"""Elementwise ops: n-ary broadcast ops (add, mul, where, maximum, pow, addcmul (ResMLP's affine), ...).

Rule: out[e] depends on in_k[e] for every input k, so every labelled input must have the same owner per
element: their labels are tied (a residual add forces equal ownership), and the output takes them.
Lowering: node j brings its inputs to one unit order and runs the op; a whole (replicated) input broadcast
along the channels is narrowed to the units node j holds.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..backend.program import Local, LoweringError
from ..ir import REPLICATED, channel_dims, compress, fits, left_padded
from .registry import Fallback, Family, RuleContext

ELEMENTWISE = Family("elementwise")
aten = torch.ops.aten


def tied(ctx: RuleContext) -> torch.Tensor | None:
    """Broadcast ops: every labelled input must have the same owner per element."""
    if not isinstance(ctx.out, torch.Tensor):
        raise Fallback("non-tensor output")
    ndim = ctx.out.dim()
    inputs = [(v, left_padded(lab, ndim)) for v, lab in ctx.tensor_inputs() if lab is not None]
    if not inputs:
        return None
    if any(lab.dim() != ndim for _, lab in inputs):
        raise Fallback("input has more dimensions than the output")
    labelled = torch.broadcast_tensors(*(lab for _, lab in inputs))
    for value, lab in inputs:
        value_shape = (1,) * (ndim - value.dim()) + tuple(value.shape)
        if any(value_shape[d] == 1 < labelled[0].size(d) and lab.size(d) == 1 for d in channel_dims(labelled[0])):
            # one channel broadcast over channels of other nodes: tying would put them all on its node
            raise Fallback("a channel of one node broadcast over channels split across nodes")
    out = labelled[0]
    for other in labelled[1:]:
        ctx.universe.tie(out, other)
        out = torch.where(out == REPLICATED, other, out)
    out = compress(out.contiguous())
    if out is not None and not fits(out, ctx.out.shape):
        raise Fallback("broadcast does not fit the output")
    return out


ELEMENTWISE.ops(operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.where,
                torch.maximum, torch.minimum, "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
                "masked_fill", "where", operator.pow, torch.pow, "pow", torch.addcmul, "addcmul", rule=tied,
                aten={aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
                      aten.div.Tensor: torch.div, aten.pow.Tensor_Scalar: torch.pow,
                      aten.pow.Tensor_Tensor: torch.pow, aten.addcmul.default: torch.addcmul})


@ELEMENTWISE.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """Inputs brought to one unit order (split ones aligned, whole ones narrowed to the held units), then the op."""
    lay = b.low.layout(n)
    split = [a for a in n.all_input_nodes if b.env[a.name].units is not None]
    for a in split:
        la = b.low.layout(a)
        if (la.axis is None) != (lay.axis is None) or len(la.shape) != len(lay.shape) or lay.axis is not None and \
                la.rep_shape(la.units)[la.axis:la.axis + 1] != lay.rep_shape(lay.units)[lay.axis:lay.axis + 1]:
            raise LoweringError(f"'{n.name}': inputs split along different layouts; not lowered yet")
    ref = b.env[split[0].name]
    if ref.node is None:
        b.env[n.name] = Local(None, ref.units)
        return
    units = ref.units

    def arg(a: fx.Node):
        loc = b.env[a.name]
        if loc.units is not None:
            return b.aligned(a, units)
        if loc.node is None:
            return loc.value
        if lay.axis is None:  # a tensor of one unit (SwiftFormer's one-channel query weights): whole operands as is
            return loc.node
        shape = b.shapes[loc.node.name]
        axis = lay.axis - (len(lay.shape) - len(shape))  # broadcasting aligns dims from the right
        if len(lay.dims) == 1 and 0 <= axis and shape[axis] == lay.shape[lay.axis] and shape[axis] > 1:
            return b.select(loc.node, axis, units)
        if len(lay.dims) > 1 and tuple(shape) == lay.shape:  # units span several dims (after a pixel shuffle)
            return b.select(b.reshape(loc.node, lay.rep_shape(lay.units)), lay.axis, units)
        if axis >= 0 and any(s > 1 for s in shape[axis:axis + len(lay.dims)]):
            raise LoweringError(f"'{n.name}': a whole tensor broadcast over split channels; not lowered yet")
        return loc.node
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), arg)
    b.hold(n, b.emit(n, module, args, kwargs), units)
