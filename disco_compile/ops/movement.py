"""Data movement: view, reshape, flatten, permute, transpose, cat, stack, split, chunk, unbind, squeeze,
narrow, roll, flip, expand, repeat, channel and pixel (un)shuffle, getitem.

Rule: the op itself is run on the expanded label tensor (each element holding its channel id), which maps
channels through any reshape exactly. A replicated tensor concatenated beside split ones (a class token before
the patch tokens) takes their labels; a pixel shuffle ties the r*r input channels of each output channel.
Lowering, on node j, two candidates, each accepted only if it yields, on element-id tensors, exactly the
elements node j must hold: (1) the op itself on the local tensors (parts node j lacks left out of lists;
whole inputs first narrowed to the held units if need be), (2) a gather along the local axis of its input.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..backend.program import Local, LoweringError, is_tensor_meta
from ..ir import REPLICATED, compress, fits, left_padded
from .registry import Family, RuleContext, call_like, describe_target

MOVEMENT = Family("movement")
aten = torch.ops.aten


def _expand(value: Any, labels: Any) -> Any:
    if isinstance(value, torch.Tensor):
        base = labels if labels is not None else torch.tensor(REPLICATED)
        return left_padded(base, value.dim()).expand(value.shape).clone()
    return value


def relayout(ctx: RuleContext) -> Any:
    """Run the op itself on full-size label tensors: exact for any data movement."""
    _, spec = pytree.tree_flatten((ctx.args, ctx.kwargs), is_leaf=lambda x: x is None)
    args, kwargs = pytree.tree_unflatten([_expand(v, lab) for v, lab in ctx.leaves()], spec)
    result = call_like(ctx.node, ctx.module, args, kwargs)
    return pytree.tree_map(lambda t: compress(t) if isinstance(t, torch.Tensor) else None, result)


MOVEMENT.ops(torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.stack,
             torch.split, torch.chunk, torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim,
             torch.swapaxes, torch.roll, torch.flip, F.pixel_unshuffle,
             torch.unbind, torch.tensor_split,
             "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "split", "chunk",
             "narrow", "movedim", "swapaxes", "unbind", "expand", "expand_as", "repeat", "roll", "flip",
             "unflatten", "view_as", "reshape_as", "tensor_split",
             nn.Flatten, nn.Unflatten, nn.PixelUnshuffle, rule=relayout,
             aten={aten.view.default: torch.reshape, aten.reshape.default: torch.reshape,
                   aten._unsafe_view.default: torch.reshape, aten.flatten.using_ints: torch.flatten,
                   aten.permute.default: torch.permute, aten.transpose.int: torch.transpose,
                   aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split,
                   aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze,
                   aten.roll.default: torch.roll})


# torch.onnx exports no channel_shuffle: on a node it is always the gather (candidate 2)
MOVEMENT.ops(torch.channel_shuffle, nn.ChannelShuffle, rule=relayout, as_gather=True)


@MOVEMENT.rule(F.pixel_shuffle, nn.PixelShuffle, aten={aten.pixel_shuffle.default: F.pixel_shuffle})
def pixel_shuffle(ctx: RuleContext) -> torch.Tensor:
    """Shuffle-aligned ownership: the r*r input channels that become one output channel are tied,
    so every output channel lies whole on one node and the node shuffles its own channels."""
    out = relayout(ctx)
    if out is not None and out.dim() >= 3:
        for c in range(out.size(-3)):
            channel = out.select(-3, c).unique()
            ctx.universe.tie_all(channel[channel != REPLICATED])
    return out


@MOVEMENT.rule(torch.cat, torch.concat, aten={aten.cat.default: torch.cat})
def cat(ctx: RuleContext) -> Any:
    """A concatenation; replicated inputs beside split ones whose labels agree and do not vary along the
    concatenated dim take those labels: every node holds a replicated tensor whole, so each keeps the part
    that lines up with its own channels (a learned class token concatenated before the patch tokens gets
    the channel ownership of the token embeddings) and the result is split like its split inputs."""
    tensors = ctx.arg(0, "tensors")
    labels = ctx.label_args[0] if ctx.args else ctx.label_kwargs["tensors"]
    split = [lab for lab in labels if lab is not None]
    if not split or len(split) == len(labels):
        return relayout(ctx)
    dim = ctx.arg(1, "dim", 0) % ctx.out.dim()
    first = split[0]
    if first.dim() != ctx.out.dim() or first.size(dim) != 1 or any(not torch.equal(lab, first) for lab in split) \
            or not all(fits(first, t.shape) for t in tensors):
        return relayout(ctx)
    return first


@MOVEMENT.rule(operator.getitem)
def getitem(ctx: RuleContext) -> Any:
    container, index = ctx.args[0], ctx.args[1]
    if isinstance(container, torch.Tensor):
        return relayout(ctx)
    labels = ctx.label_args[0]
    return None if labels is None else labels[index]


@MOVEMENT.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """The candidates of the module docstring, each checked on element ids."""
    lay = b.low.layout(n)
    held = lay.held(b.j)
    if held.numel() == 0:
        b.env[n.name] = Local(None, held)
        return
    producer = n
    if n.target is operator.getitem and not is_tensor_meta(n.args[0].meta.get("tensor_meta")):
        producer = n.args[0]  # element `index` of a split/chunk
    inputs = [a for a in producer.all_input_nodes if is_tensor_meta(a.meta.get("tensor_meta"))]
    ids, offset = {}, 0
    for a in inputs:
        la = b.low.layout(a)
        numel = int(torch.tensor(la.shape).prod())
        ids[a.name] = torch.arange(offset, offset + numel).reshape(la.shape)
        offset += numel

    def run(arg_of):
        args, kwargs = fx.node.map_arg((producer.args, producer.kwargs), arg_of)
        module_ = b.low.gm.get_submodule(producer.target) if producer.op == "call_module" else None
        out = call_like(producer, module_, args, kwargs)
        return out[n.args[1]] if producer is not n else out

    expected = lay.as_rep(run(lambda a: ids[a.name] if a.name in ids else b.env[a.name].full))
    local_ids = {a.name: _local_ids(b, a, ids[a.name]) for a in inputs}
    if producer is n and not (op is not None and op.data.get("as_gather")):  # candidate 1: the op itself on the local tensors (parts this node lacks left out of lists)
        empty = {a.name for a in inputs if b.env[a.name].node is None}
        # candidate 1b: the same with whole inputs first narrowed to the held units along the output's channel
        # axis (a replicated class token concatenated beside split tokens takes their labels, the cat rule)
        narrowable = [a for a in inputs if b.env[a.name].units is None and a.name not in empty
                      and len(lay.dims) == 1 and len(b.low.layout(a).shape) == len(lay.shape)
                      and b.low.layout(a).shape[lay.axis] == lay.units]
        for narrow in ([], narrowable) if narrowable else ([],):
            ids_of = {**local_ids, **{a.name: ids[a.name].index_select(lay.axis, held) for a in narrow}}
            try:
                args, kwargs = _without(fx.node.map_arg((n.args, n.kwargs), lambda a: ids_of.get(a.name, b.env[a.name].value)
                                                        if a.name not in empty else _EMPTY))
                got = call_like(n, module, args, kwargs)
                # units spanning several dims (a pixel shuffle's channels x positions) are held flattened
                natural = isinstance(got, torch.Tensor) and got.dim() == len(lay.shape) != expected.dim()
                units = _match_units(expected, got.reshape(expected.shape[:lay.axis] + (-1,)) if natural else got,
                                     lay.axis)
            except (RuntimeError, ValueError, IndexError, TypeError):  # the op rejects the local shapes
                units = None
            if units is not None and torch.equal(torch.sort(units).values, held):
                nodes_of = {a.name: b.select(b.value(a), lay.axis, held) for a in narrow}
                args, kwargs = _without(fx.node.map_arg((n.args, n.kwargs), lambda a: nodes_of.get(a.name, b.value(a))
                                                        if a.name not in empty else _EMPTY))
                node = b.emit(n, module, args, kwargs, shape=tuple(got.shape) if natural else None)
                b.hold(n, b.reshape(node, lay.rep_shape(units.numel())) if natural else node, units)
                return
    if len(inputs) == 1 and b.low.layout(inputs[0]).axis is not None:  # candidate 2: a gather
        src = inputs[0]
        axis = b.low.layout(src).axis
        pos = _gather_positions(expected, held, local_ids[src.name], axis, lay.axis)
        if pos is not None:
            node = b.select(b.env[src.name].node, axis, pos)
            b.hold(n, b.reshape(node, lay.rep_shape(held.numel())), held)
            return
    raise LoweringError(f"'{n.name}' ({describe_target(producer, module)}): no local form of this data "
                        f"movement on node {b.j}")

def _local_ids(b, a: fx.Node, full: torch.Tensor) -> torch.Tensor:
    loc = b.env[a.name]
    if loc.units is None:
        return full
    lay = b.low.layout(a)
    return lay.as_rep(full).index_select(lay.axis, loc.units)


_EMPTY = object()  # stands for an input of which this node holds nothing


def _without(tree):
    """Drop the _EMPTY parts from the lists and tuples of an argument structure."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_without(t) for t in tree if t is not _EMPTY)
    if isinstance(tree, dict):
        return {k: _without(v) for k, v in tree.items()}
    if tree is _EMPTY:
        raise TypeError("an input this node does not hold")
    return tree


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _match_units(expected: torch.Tensor, got, axis: int | None) -> torch.Tensor | None:
    """If `got` is exactly some units of `expected` (both in representation form), those units in order."""
    if not isinstance(got, torch.Tensor) or axis is None or got.dim() != expected.dim():
        return None
    if got.shape[:axis] != expected.shape[:axis] or got.shape[axis + 1:] != expected.shape[axis + 1:]:
        return None
    first = {int(v): u for u, v in enumerate(_rows(expected, axis)[:, 0])}
    units = torch.tensor([first.get(int(v), -1) for v in _rows(got, axis)[:, 0]], dtype=torch.long)
    if bool((units < 0).any()) or not torch.equal(expected.index_select(axis, units), got):
        return None
    return units


def _gather_positions(expected: torch.Tensor, held: torch.Tensor, src: torch.Tensor, src_axis: int,
                      out_axis: int) -> torch.Tensor | None:
    """Positions along the source's local axis whose slices are exactly the held output units."""
    want = _rows(expected.index_select(out_axis, held), out_axis)
    rows = _rows(src, src_axis)
    if rows.shape[1] != want.shape[1]:
        return None
    first = {int(v): k for k, v in enumerate(rows[:, 0])}
    pos = torch.tensor([first.get(int(v), -1) for v in want[:, 0]], dtype=torch.long)
    if bool((pos < 0).any()) or not torch.equal(rows[pos], want):
        return None
    return pos
