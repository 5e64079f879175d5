"""Replicate: the family of every op without a rule for its input's channel layout (no rule at all, or a rule
that fell back). Always correct: every node gathers the op's split inputs whole (each owner sends its units to
every other node, the `gather` messages, costed in the report) and runs the op whole, so its output is held
whole (replicated) on every node.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..backend.program import Local, is_tensor_meta
from .registry import node_arg, Family

REPLICATE = Family("replicate")

# ops whose size argument is spatial, never the batch: given as the model's sizes, constants in the ONNX graph
# (torch.onnx's fold needs its output size constant; VOLO computes it from x.shape)
_SPATIAL_SIZE = {F.fold: (1, "output_size"), torch.ops.aten.col2im.default: (1, "output_size")}


@REPLICATE.lowers
def lower(b, n: fx.Node, module, op) -> None:
    todo = [a for a in n.all_input_nodes if b.env[a.name].units is not None and a.name not in b.gathers]
    for a in todo:
        b.send_owned(a, "gather", list(range(b.low.nodes)))
    for a in todo:  # gathered once: later replicated ops reading the same tensor take the whole copy
        b.gathers[a.name] = b.gathered(a, "gather")
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: b.gathers[a.name]
                                   if b.env[a.name].units is not None else b.value(a))
    if n.target in _SPATIAL_SIZE:
        index, name = _SPATIAL_SIZE[n.target]
        size = fx.node.map_arg(node_arg(n.args, n.kwargs, index, name), lambda a: b.env[a.name].full)
        args, kwargs = (args[:index] + (size,) + args[index + 1:], kwargs) if len(args) > index else \
            (args, {**kwargs, name: size})
    if is_tensor_meta(n.meta.get("tensor_meta")):
        lay = b.low.layout(n)
        b.env[n.name] = Local(b.emit(n, module, args, kwargs, lay.shape, lay.dtype))
    else:  # several values (Tensor.max with a dim): each is taken whole by its getitem
        b.env[n.name] = Local(b.emit(n, module, args, kwargs))
