"""Data movement: view, reshape, flatten, permute, transpose, cat, stack, split, chunk, unbind, squeeze,
narrow, roll, flip, unfold (sliding windows along a dim: HaloNet's halo blocks), expand, repeat, channel and
pixel (un)shuffle, getitem.

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
from .registry import Family, RuleContext, argument_leaf, call_like, describe_target

MOVEMENT = Family("movement")
aten = torch.ops.aten


def _expand(value: Any, labels: Any) -> Any:
    if isinstance(value, torch.Tensor):
        base = labels if labels is not None else torch.tensor(REPLICATED)
        return left_padded(base, value.dim()).expand(value.shape).clone()
    return value


def relayout(ctx: RuleContext) -> Any:
    """Run the op itself on full-size label tensors: exact for any data movement."""
    _, spec = pytree.tree_flatten((ctx.args, ctx.kwargs), is_leaf=argument_leaf)
    args, kwargs = pytree.tree_unflatten([_expand(v, lab) for v, lab in ctx.leaves()], spec)
    result = call_like(ctx.node, ctx.module, args, kwargs)
    return pytree.tree_map(lambda t: compress(t) if isinstance(t, torch.Tensor) else None, result)


MOVEMENT.ops(torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.stack,
             torch.split, torch.chunk, torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim,
             torch.swapaxes, torch.roll, torch.flip, F.pixel_unshuffle,
             torch.unbind, torch.tensor_split,
             "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "split", "chunk",
             "narrow", "movedim", "swapaxes", "unbind", "expand", "expand_as", "repeat", "roll", "flip",
             "unflatten", "view_as", "reshape_as", "tensor_split", "unfold",
             nn.Flatten, nn.Unflatten, nn.PixelUnshuffle, rule=relayout,
             aten={aten.view.default: torch.reshape, aten.reshape.default: torch.reshape,
                   aten._unsafe_view.default: torch.reshape, aten.flatten.using_ints: torch.flatten,
                   aten.permute.default: torch.permute, aten.transpose.int: torch.transpose,
                   aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split,
                   aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze,
                   aten.roll.default: torch.roll, aten.unbind.int: torch.unbind,
                   aten.stack.default: torch.stack})


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
    """A concatenation along a dim its split inputs' labels do not vary along. Replicated inputs beside split
    ones take their labels: every node holds a replicated tensor whole, so each keeps the part that lines up
    with its own channels (a learned class token concatenated before the patch tokens gets the channel
    ownership of the token embeddings). Split inputs with disjoint labels of one shape (PiT's class token, from
    its own Linear, before the pooled patch tokens) are aligned: position k of each is tied to one owner, so the
    result is labelled like the first and every node concatenates the parts it holds."""
    tensors = ctx.arg(0, "tensors")
    labels = ctx.label_args[0] if ctx.args else ctx.label_kwargs["tensors"]
    split = [lab for lab in labels if lab is not None]
    if not split:
        return relayout(ctx)
    dim = ctx.arg(1, "dim", 0) % ctx.out.dim()
    first = split[0]
    if first.dim() != ctx.out.dim() or first.size(dim) != 1 or not all(fits(first, t.shape) for t in tensors) \
            or any(lab.shape != first.shape for lab in split):
        return relayout(ctx)
    distinct = list({tuple(lab.flatten().tolist()): lab for lab in split}.values())
    if len(distinct) > 1:
        ids = torch.cat([lab.flatten() for lab in distinct])
        if ids.unique().numel() != ids.numel() or (ids == REPLICATED).any():  # overlapping: tying would merge
            return relayout(ctx)
        for lab in distinct[1:]:
            ctx.universe.tie(first, lab)
    elif len(split) == len(labels):
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
    if held is None:
        return _shaped_like_split(b, n, lay)
    if held.numel() == 0:
        b.env[n.name] = Local(None, held)
        return
    move = _Movement(b, n, module, lay, held)
    if not (op is not None and op.data.get("as_gather")):
        # candidate 1b: whole inputs first narrowed to the held units along the output's channel axis (a
        # replicated class token concatenated beside split tokens takes their labels, the cat rule)
        narrowable = move.narrowable() if move.producer is n else []
        for narrow in ([], narrowable) if narrowable else ([],):
            if move.local_op(narrow):
                return
        if move.natural and move.local_op([], natural=True):  # candidate 1c: units spanning dims, unflattened
            return
        if move.collapsed_permute():  # candidate 1d: a permute that moves units spanning dims as one block
            return
    if len(move.inputs) == 1 and b.low.layout(move.inputs[0]).axis is not None and (move.gather() or move.reshaped()):
        return
    raise LoweringError(f"'{n.name}' ({describe_target(move.producer, module)}): no local form of this data "
                        f"movement on node {b.j}")


_SHAPED_LIKE = {"expand_as": "expand", "view_as": "reshape", "reshape_as": "reshape"}


def _shaped_like_split(b, n: fx.Node, lay) -> None:
    """A replicated tensor given the shape of a split one (ECA's gate, `y.expand_as(x)`): the split tensor gives
    only its whole shape, so every node shapes its whole copy to it, the batch dim left to follow its own."""
    x = n.args[0]
    if not (n.op == "call_method" and n.target in _SHAPED_LIKE and b.env[x.name].units is None):
        raise LoweringError(f"'{n.name}' ({describe_target(n, None)}): a replicated value computed from a value "
                            f"split across nodes")
    have = b.low.layout(x).shape
    sizes = [-1 if d == 0 or (n.target == "expand_as" and d < len(have) and have[d] == s) else s
             for d, s in enumerate(lay.shape)]
    b.env[n.name] = Local(b.method(_SHAPED_LIKE[n.target], (b.value(x), sizes), shape=lay.shape, dtype=lay.dtype))


def unfold_by_gather(x: torch.Tensor, dim: int, size: int, step: int, length: int) -> torch.Tensor:
    """x.unfold(dim, size, step) as one gather of constant indices along `dim`, of static `length` (torch.onnx's
    Unfold needs the size of that dim, which it loses after a Pad with a symbolic batch: HaloNet's halo blocks)."""
    windows = (length - size) // step + 1
    index = (torch.arange(windows)[:, None] * step + torch.arange(size)).flatten()
    return x.index_select(dim, index).unflatten(dim, (windows, size)).movedim(dim + 1, -1)


class _Movement:
    """One data-movement op on node j: element ids of its inputs, and what node j must hold of its output."""

    def __init__(self, b, n: fx.Node, module, lay, held: torch.Tensor):
        self.b, self.n, self.module, self.lay, self.held = b, n, module, lay, held
        self.producer = n
        if n.target is operator.getitem and not is_tensor_meta(n.args[0].meta.get("tensor_meta")):
            self.producer = n.args[0]  # element `index` of a split/chunk
        p = self.producer
        self.producer_module = b.low.gm.get_submodule(p.target) if p.op == "call_module" else module
        self.inputs = [a for a in self.producer.all_input_nodes if is_tensor_meta(a.meta.get("tensor_meta"))]
        self.ids, offset = {}, 0
        for a in self.inputs:
            shape = b.low.layout(a).shape
            numel = int(torch.tensor(shape).prod())
            self.ids[a.name] = torch.arange(offset, offset + numel).reshape(shape)
            offset += numel
        self.expected = lay.as_rep(self._run(lambda a: self.ids[a.name] if a.name in self.ids else b.env[a.name].full))
        self.local_ids = {a.name: _local_ids(b, a, self.ids[a.name]) for a in self.inputs}
        self.empty = {a.name for a in self.inputs if b.env[a.name].node is None}
        self.natural = {a.name: shape for a in self.inputs if (shape := _natural_shape(b, a)) is not None}

    def _run(self, arg_of):
        p = self.producer
        return self._call(*fx.node.map_arg((p.args, p.kwargs), arg_of))

    def narrowable(self) -> list[fx.Node]:
        lay, low = self.lay, self.b.low
        return [a for a in self.inputs if self.b.env[a.name].units is None and a.name not in self.empty
                and len(lay.dims) == 1 and len(low.layout(a).shape) == len(lay.shape)
                and low.layout(a).shape[lay.axis] == lay.units]

    def _args(self, value_of):
        """The producer's arguments with node j's values (parts it lacks left out of lists)."""
        p = self.producer
        return _without(fx.node.map_arg((p.args, p.kwargs),
                                        lambda a: value_of(a) if a.name not in self.empty else _EMPTY))

    def _call(self, args, kwargs):
        """The op (or, for an element of a split, the producer and the element) on these arguments."""
        out = call_like(self.producer, self.producer_module, args, kwargs)
        return out if self.producer is self.n else out[self.n.args[1]]

    def _emit(self, args, kwargs, shape) -> fx.Node:
        b = self.b
        if self.n.op == "call_method" and self.n.target == "unfold" and isinstance(args[0], fx.Node):
            x, dim, size, step = (*args, *(kwargs[k] for k in ("dimension", "size", "step") if k in kwargs))
            dim %= len(b.shapes[x.name])
            if dim:  # not along dim 0, whose size follows the batch
                return b.call(unfold_by_gather, (x, dim, size, step, b.shapes[x.name][dim]), shape=shape,
                              dtype=self.lay.dtype)
        if self.producer is self.n:
            return b.emit(self.n, self.module, args, kwargs, shape=shape)
        whole = b.emit(self.producer, self.producer_module, args, kwargs)
        return b.call(operator.getitem, (whole, self.n.args[1]), shape=shape, dtype=self.lay.dtype)

    def local_op(self, narrow: list[fx.Node], natural: bool = False) -> bool:
        """Candidate 1: the op itself on node j's local tensors, if that yields exactly the held units; with
        `natural`, inputs whose units span several dims in whole blocks of the inner ones are given to it in
        those dims (HaloNet's heads folded into dim 0 with the head width beside them, permuted as 6-D)."""
        b, lay, held = self.b, self.lay, self.held
        ids_of = {**self.local_ids, **{a.name: self.ids[a.name].index_select(lay.axis, held) for a in narrow}}
        if natural:
            ids_of.update({name: ids_of[name].reshape(shape) for name, shape in self.natural.items()})
        try:
            got = self._call(*self._args(lambda a: ids_of.get(a.name, b.env[a.name].value)))
            # units spanning several dims (a pixel shuffle's channels x positions) are held flattened
            spread = isinstance(got, torch.Tensor) and got.dim() == len(lay.shape) != self.expected.dim()
            flat = self.expected.shape[:lay.axis] + (-1,) + self.expected.shape[lay.axis + 1:] if spread else None
            units = _match_units(self.expected, got.reshape(flat) if spread else got, lay.axis)
        except (RuntimeError, ValueError, IndexError, TypeError):  # the op rejects the local shapes
            return False
        if units is None or not torch.equal(torch.sort(units).values, held):
            return False
        nodes_of = {a.name: b.select(b.value(a), lay.axis, held) for a in narrow}
        if natural:
            nodes_of.update({a.name: b.reshape(b.value(a), self.natural[a.name]) for a in self.inputs
                             if a.name in self.natural})
        node = self._emit(*self._args(lambda a: nodes_of.get(a.name, b.value(a))),
                          shape=tuple(got.shape) if spread else None)
        b.hold(self.n, b.reshape(node, lay.rep_shape(units.numel())) if spread else node, units)
        return True

    def collapsed_permute(self) -> bool:
        """Candidate 1d: a permute (or transpose) that keeps the input's channel dims together and in order, as a
        permute of the local tensor, where those dims are one unit axis (a node holding part of a head)."""
        b, n = self.b, self.n
        if len(self.inputs) != 1 or b.env[self.inputs[0].name].node is None:
            return False
        src = b.low.layout(self.inputs[0])
        perm = _permutation(n, len(src.shape))
        if perm is None or len(src.dims) < 2:
            return False
        first, span = src.dims[0], len(src.dims) - 1
        starts = [i for i in range(len(perm) - span) if perm[i:i + span + 1] == list(src.dims)]
        if not starts:
            return False
        rep = [d if d <= first else max(first, d - span) for d in range(len(perm))]  # input dim -> local dim
        local = [rep[d] for i, d in enumerate(perm) if not starts[0] < i <= starts[0] + span]
        got = self.local_ids[self.inputs[0].name].permute(local)
        units = _match_units(self.expected, got, self.lay.axis) if self.lay.axis is not None else None
        if units is None or not torch.equal(torch.sort(units).values, self.held):
            return False
        b.hold(n, b.method("permute", (b.value(self.inputs[0]), local), shape=tuple(got.shape), dtype=self.lay.dtype),
               units)
        return True

    def gather(self) -> bool:
        """Candidate 2: a gather along the local axis of the one input."""
        b, src = self.b, self.inputs[0]
        axis = b.low.layout(src).axis
        pos = _gather_positions(self.expected, self.held, self.local_ids[src.name], axis, self.lay.axis)
        if pos is None:
            return False
        node = b.select(b.env[src.name].node, axis, pos)
        b.hold(self.n, b.reshape(node, self.lay.rep_shape(self.held.numel())), self.held)
        return True

    def reshaped(self) -> bool:
        """Candidate 3: the one input's local tensor reshaped to the output's local shape (a reshape to sizes
        that hold every channel, such as x.reshape(-1, C * H * W), is on node j that of its own channels)."""
        b, src, lay, held = self.b, self.inputs[0], self.lay, self.held
        shape = lay.rep_shape(held.numel())
        local = self.local_ids[src.name]
        want = self.expected if lay.axis is None else self.expected.index_select(lay.axis, held)
        if local.numel() != want.numel() or not torch.equal(local.reshape(shape), want):
            return False
        b.hold(self.n, b.reshape(b.env[src.name].node, shape), held)
        return True


_PERMUTES = (torch.permute, "permute", aten.permute.default)
_TRANSPOSES = (torch.transpose, "transpose", aten.transpose.int, torch.swapaxes, "swapaxes")


def _permutation(n: fx.Node, ndim: int) -> list[int] | None:
    """The dims of a permute or transpose node as a full permutation (output dim i is input dim perm[i])."""
    if n.target in _PERMUTES:
        dims = n.args[1:] if n.op == "call_method" and not isinstance(n.args[1], (list, tuple)) else n.args[1]
        return [int(d) % ndim for d in dims]
    if n.target in _TRANSPOSES and len(n.args) == 3:
        perm = list(range(ndim))
        d0, d1 = int(n.args[1]) % ndim, int(n.args[2]) % ndim
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    return None


def _natural_shape(b, a: fx.Node) -> tuple[int, ...] | None:
    """The local shape of input `a` with its unit axis unflattened into the layout's channel dims, where node j
    holds whole blocks of the inner dims (units u*inner .. u*inner + inner - 1 for some u); else None."""
    lay, units = b.low.layout(a), b.env[a.name].units
    if units is None or len(lay.dims) < 2 or b.env[a.name].node is None:
        return None
    inner = int(torch.tensor([lay.shape[d] for d in lay.dims[1:]]).prod())
    blocks = units.reshape(-1, inner) if units.numel() % inner == 0 else None
    if blocks is None or not torch.equal(blocks, blocks[:, :1] + torch.arange(inner)) or (blocks[:, 0] % inner).any():
        return None
    return lay.shape[:lay.dims[0]] + (blocks.shape[0],) + lay.shape[lay.dims[0] + 1:]


def _local_ids(b, a: fx.Node, full: torch.Tensor) -> torch.Tensor:
    loc = b.env[a.name]
    if loc.units is None or b.low.layout(a).axis is None:  # held whole, or a tensor of one unit
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
    if isinstance(got, torch.Tensor) and axis is None:  # a tensor of one unit
        return torch.arange(1) if got.shape == expected.shape and torch.equal(got, expected) else None
    if not isinstance(got, torch.Tensor) or got.dim() != expected.dim():
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
    want = expected.reshape(1, -1) if out_axis is None else _rows(expected.index_select(out_axis, held), out_axis)
    rows = _rows(src, src_axis)
    if rows.shape[1] != want.shape[1]:
        return None
    first = {int(v): k for k, v in enumerate(rows[:, 0])}
    pos = torch.tensor([first.get(int(v), -1) for v in want[:, 0]], dtype=torch.long)
    if bool((pos < 0).any()) or not torch.equal(rows[pos], want):
        return None
    return pos
