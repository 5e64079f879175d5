"""The op-rule registry: how each op maps input channels to output channels.

A rule receives a `RuleContext` (the fx node, its concrete argument values,
the labels of its tensor arguments, its concrete output) and returns the
labels of its output (see ir.py). Rules are keyed by op target: a function
(`torch.cat`, `operator.add`), a method name (`"view"`), or a module class
(looked up along the class's MRO). An op with no rule falls back to
*replicate*: its inputs are gathered on every node and it runs whole on every
node, which is always correct and is costed and named in the report.

Rule families:
- channelwise: output element depends on the same channel of the input
  (activations, BatchNorm, pooling, interpolation); labels pass through.
- elementwise: n-ary broadcast ops (add, mul); labelled inputs are tied, so a
  residual add forces equal ownership.
- relayout: pure data movement (view, permute, cat, split, getitem,
  pixel_shuffle); the op itself is run on the expanded label tensor, which
  maps channels through any reshape exactly. A replicated tensor concatenated
  beside split ones (a class token before the patch tokens) takes their labels.
- reduce: a reduction over non-channel dims drops those dims; over channel dims
  it becomes a partial sum all-reduced between nodes.
- normalise: LayerNorm/softmax/L2 normalisation over split channels; labels pass
  through and the per-row statistics are all-reduced.
- mixing: Conv and Linear create a new channel space; grouped convolutions tie
  each input group to its output group so no group straddles nodes.
- attention: the per-head core of multi-head attention (attention.py) and of
  windowed attention (window_attention.py) ties the query, key and value
  channels of each head to one node; its output channels are the value's.
  Windowing (Swin's window partition and reverse, patch merging) moves tokens
  of channels-last maps: labels pass through along the last dim.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision.ops
from torch.utils import _pytree as pytree
from torchvision.models.swin_transformer import _patch_merging_pad

from .attention import heads_attention, why_not_split
from ..ir import (REPLICATED, ChannelUniverse, MixingLayer, ReplicatedOp, StatExchange, channel_dims, compress, fits,
    units_per_sample)
from .window_attention import window_heads_attention, window_partition, window_reverse


class Fallback(Exception):
    """Raised by a rule that cannot handle this use of its op; the op is replicated."""


@dataclass
class RuleContext:
    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    label_args: tuple
    label_kwargs: dict
    out: Any
    universe: ChannelUniverse
    nodes: int
    mixing: list[MixingLayer] = field(default_factory=list)
    stats: list[StatExchange] = field(default_factory=list)

    def leaves(self) -> list[tuple[Any, Any]]:
        """(value, labels) of every argument leaf, in order (labels None for non-tensors)."""
        return paired_leaves((self.args, self.kwargs), (self.label_args, self.label_kwargs))

    def tensor_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(value, labels) of every tensor argument, in order."""
        return [(v, l) for v, l in self.leaves() if isinstance(v, torch.Tensor)]

    def input_node_names(self) -> list[str]:
        return [n.name for n in self.node.all_input_nodes]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)


def paired_leaves(values: Any, labels: Any) -> list[tuple[Any, Any]]:
    """Flatten an fx argument structure and its labels alike (None is a leaf on both sides)."""
    is_none = lambda x: x is None  # noqa: E731
    return list(zip(pytree.tree_leaves(values, is_leaf=is_none), pytree.tree_leaves(labels, is_leaf=is_none)))


Rule = Callable[[RuleContext], Any]
_RULES: dict[Any, Rule] = {}


def register(*targets: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for t in targets:
            _RULES[t] = fn
        return fn
    return deco


def lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in _RULES:
                return _RULES[cls]
        return None
    return _RULES.get(node.target)


def describe_target(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return type(module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


# ---------------------------------------------------------------- channelwise

def _first_labelled(ctx: RuleContext) -> tuple[torch.Tensor, torch.Tensor]:
    for value, labels in ctx.tensor_inputs():
        if labels is not None:
            return value, labels
    raise Fallback("no labelled input")


def channelwise(ctx: RuleContext) -> torch.Tensor:
    _, labels = _first_labelled(ctx)
    if not isinstance(ctx.out, torch.Tensor) or not fits(labels, ctx.out.shape) or any(
            labels.size(d) != ctx.out.size(d) for d in channel_dims(labels)):
        raise Fallback(f"output shape {tuple(ctx.out.shape)} does not keep the channel layout {tuple(labels.shape)}")
    return labels


_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_CHANNELWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout2d, F.batch_norm,
    F.instance_norm, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.clamp, torch.clip, torch.erf, operator.neg,
    torch.nn.functional.dropout1d, torch.nn.functional.alpha_dropout,
    torchvision.ops.stochastic_depth,  # drops whole samples (or the batch), never single channels
)
_CHANNELWISE_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp",
    "clamp_", "clip", "erf", "float", "to", "type_as", "detach", "clone", "contiguous", "pow",
)
register(*_CHANNELWISE_MODULES, *_CHANNELWISE_FUNCTIONS, *_CHANNELWISE_METHODS)(channelwise)


@register(F.pad)
def pad(ctx: RuleContext) -> torch.Tensor:
    _, labels = _first_labelled(ctx)
    padding = ctx.arg(1, "pad")
    padded = range(labels.dim() - len(padding) // 2, labels.dim())
    if any(labels.size(d) > 1 for d in padded):
        raise Fallback("padding along a channel dimension")
    return channelwise(ctx)


# ---------------------------------------------------------------- elementwise

def _aligned(labels: torch.Tensor, ndim: int) -> torch.Tensor:
    return labels.reshape((1,) * (ndim - labels.dim()) + tuple(labels.shape))


def elementwise(ctx: RuleContext) -> torch.Tensor | None:
    """Broadcast ops: every labelled input must have the same owner per element."""
    if not isinstance(ctx.out, torch.Tensor):
        raise Fallback("non-tensor output")
    ndim = ctx.out.dim()
    labelled = [_aligned(l, ndim) for v, l in ctx.tensor_inputs() if l is not None]
    if not labelled:
        return None
    if any(l.dim() != ndim for l in labelled):
        raise Fallback("input has more dimensions than the output")
    labelled = torch.broadcast_tensors(*labelled)
    out = labelled[0]
    for other in labelled[1:]:
        ctx.universe.tie(out, other)
        out = torch.where(out == REPLICATED, other, out)
    out = compress(out.contiguous())
    if out is not None and not fits(out, ctx.out.shape):
        raise Fallback("broadcast does not fit the output")
    return out


register(operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
         operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.where,
         torch.maximum, torch.minimum, "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
         "masked_fill", "where")(elementwise)


# ---------------------------------------------------------------- relayout

def _expand(value: Any, labels: Any) -> Any:
    if isinstance(value, torch.Tensor):
        base = labels if labels is not None else torch.tensor(REPLICATED)
        return _aligned(base, value.dim()).expand(value.shape).clone()
    return value


def relayout(ctx: RuleContext) -> Any:
    """Run the op itself on full-size label tensors: exact for any data movement."""
    _, spec = pytree.tree_flatten((ctx.args, ctx.kwargs), is_leaf=lambda x: x is None)
    args, kwargs = pytree.tree_unflatten([_expand(v, l) for v, l in ctx.leaves()], spec)
    node = ctx.node
    if node.op == "call_method":
        result = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif node.op == "call_module":
        result = ctx.module(*args, **kwargs)
    else:
        result = node.target(*args, **kwargs)
    return pytree.tree_map(lambda t: compress(t) if isinstance(t, torch.Tensor) else None, result)


register(torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.stack,
         torch.split, torch.chunk, torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim,
         torch.swapaxes, torch.roll, torch.flip, F.pixel_unshuffle, torch.channel_shuffle,
         torch.unbind, torch.tensor_split,
         "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "split", "chunk",
         "narrow", "movedim", "swapaxes", "unbind", "expand", "expand_as", "repeat", "roll", "flip",
         "unflatten", "view_as", "reshape_as", "tensor_split",
         nn.Flatten, nn.Unflatten, nn.PixelUnshuffle, nn.ChannelShuffle)(relayout)


@register(F.pixel_shuffle, nn.PixelShuffle)
def pixel_shuffle(ctx: RuleContext) -> torch.Tensor:
    """Shuffle-aligned ownership: the r*r input channels that become one output channel are tied,
    so every output channel lies whole on one node and the node shuffles its own channels."""
    out = relayout(ctx)
    if out is not None and out.dim() >= 3:
        for c in range(out.size(-3)):
            channel = out.select(-3, c).unique()
            ctx.universe.tie_all(channel[channel != REPLICATED])
    return out


@register(torch.cat, torch.concat)
def cat(ctx: RuleContext) -> Any:
    """A concatenation; replicated inputs beside split ones whose labels agree and do not vary along the
    concatenated dim take those labels: every node holds a replicated tensor whole, so each keeps the part
    that lines up with its own channels (a learned class token concatenated before the patch tokens gets
    the channel ownership of the token embeddings) and the result is split like its split inputs."""
    tensors = ctx.arg(0, "tensors")
    labels = ctx.label_args[0] if ctx.args else ctx.label_kwargs["tensors"]
    split = [l for l in labels if l is not None]
    if not split or len(split) == len(labels):
        return relayout(ctx)
    dim = ctx.arg(1, "dim", 0) % ctx.out.dim()
    first = split[0]
    if first.dim() != ctx.out.dim() or first.size(dim) != 1 or any(not torch.equal(l, first) for l in split) \
            or not all(fits(first, t.shape) for t in tensors):
        return relayout(ctx)
    return first


@register(operator.getitem)
def getitem(ctx: RuleContext) -> Any:
    container, index = ctx.args[0], ctx.args[1]
    if isinstance(container, torch.Tensor):
        return relayout(ctx)
    labels = ctx.label_args[0]
    return None if labels is None else labels[index]


# ---------------------------------------------------------------- reduce

def _dims_arg(ctx: RuleContext, ndim: int) -> tuple[int, ...]:
    dim = ctx.arg(1, "dim")
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % ndim for d in dims)


@register(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def reduce(ctx: RuleContext) -> torch.Tensor | None:
    value, labels = _first_labelled(ctx)
    dims = _dims_arg(ctx, value.dim())
    keepdim = bool(ctx.arg(2, "keepdim", False))
    if any(labels.size(d) > 1 for d in dims):
        # partial -> all-reduce: each node reduces its own channels, then the partial results are summed
        ctx.stats.append(StatExchange(ctx.node.name, describe_target(ctx.node, ctx.module), ctx.node.all_input_nodes[0].name,
                                      values=ctx.out.numel() // max(1, ctx.out.shape[0] if ctx.out.dim() else 1),
                                      itemsize=ctx.out.element_size(), to_all=True))
        return None
    if keepdim:
        return labels
    return labels.reshape([s for d, s in enumerate(labels.shape) if d not in dims])


# ---------------------------------------------------------------- normalise

def _normalise(ctx: RuleContext, value: torch.Tensor, labels: torch.Tensor, dims: tuple[int, ...], stats: int) -> torch.Tensor:
    if any(labels.size(d) > 1 for d in dims):
        # partial statistics -> all-reduce (e.g. per-token sum and sum of squares for LayerNorm)
        rows = value[0].numel()
        for d in dims:
            rows //= value.size(d)
        ctx.stats.append(StatExchange(ctx.node.name, describe_target(ctx.node, ctx.module), ctx.node.all_input_nodes[0].name,
                                      values=rows * stats, itemsize=value.element_size(), to_all=False))
    return channelwise(ctx)


@register(nn.LayerNorm, F.layer_norm)
def layer_norm(ctx: RuleContext) -> torch.Tensor:
    value, labels = _first_labelled(ctx)
    shape = ctx.module.normalized_shape if ctx.module is not None else ctx.arg(1, "normalized_shape")
    dims = tuple(range(value.dim() - len(shape), value.dim()))
    return _normalise(ctx, value, labels, dims, stats=2)


@register(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax")
def softmax(ctx: RuleContext) -> torch.Tensor:
    value, labels = _first_labelled(ctx)
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    return _normalise(ctx, value, labels, (dim % value.dim(),), stats=2)


@register(F.normalize)
def normalize(ctx: RuleContext) -> torch.Tensor:
    """Division by the L2 norm along `dim` (SSD's L2Norm): per-row partial sums of squares all-reduced."""
    value, labels = _first_labelled(ctx)
    if ctx.arg(1, "p", 2.0) != 2:
        raise Fallback("a norm other than L2")
    return _normalise(ctx, value, labels, (ctx.arg(2, "dim", 1) % value.dim(),), stats=1)


@register(nn.GroupNorm, F.group_norm)
def group_norm(ctx: RuleContext) -> torch.Tensor:
    value, labels = _first_labelled(ctx)
    groups = ctx.module.num_groups if ctx.module is not None else ctx.arg(1, "num_groups")
    if labels.size(1) > 1 and groups >= ctx.nodes:
        for g in labels[0].reshape(labels.size(1)).chunk(groups):
            ctx.universe.tie_all(g)  # each group's statistics stay on one node
        return channelwise(ctx)
    return _normalise(ctx, value, labels, (1,), stats=2 * groups)


# ---------------------------------------------------------------- mixing

def _mixing_input(ctx: RuleContext, dim: int, size: int) -> torch.Tensor | None:
    value, labels = ctx.tensor_inputs()[0]
    if labels is None:
        return None
    dims = channel_dims(labels)
    if dims and dims != (dim % value.dim(),):
        raise Fallback(f"input channels vary along dims {dims}, expected only dim {dim}")
    if not fits(labels, value.shape):
        raise Fallback("input labels do not fit the input")
    full = list(labels.shape)
    full[dim % value.dim()] = size
    return labels.expand(full).contiguous()  # one label position per weight column


def _record_mixing(ctx: RuleContext, kind: str, dim: int, in_ch: int, out_ch: int, groups: int, kernel: int,
                   in_labels: torch.Tensor | None) -> torch.Tensor:
    value = ctx.tensor_inputs()[0][0]
    out = ctx.out
    ids = ctx.universe.new_space(ctx.node.name, out_ch)
    shape = [1] * out.dim()
    shape[dim % out.dim()] = out_ch
    out_labels = ids.reshape(shape)
    out_positions = out[0].numel() // out_ch if out.dim() > 1 else 1
    in_unit = units_per_sample(value.shape, in_labels) if in_labels is not None else value[0].numel() // in_ch
    ctx.mixing.append(MixingLayer(
        node=ctx.node.name, module=str(ctx.node.target), kind=kind, in_node=ctx.node.all_input_nodes[0].name,
        in_labels=in_labels, out_labels=out_labels, in_channels=in_ch, out_channels=out_ch, groups=groups,
        kernel_numel=kernel, out_positions=out_positions, in_unit_elems=in_unit, itemsize=out.element_size()))
    return out_labels


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: RuleContext) -> torch.Tensor:
    m = ctx.module
    in_labels = _mixing_input(ctx, 1, m.in_channels)
    out_labels = _record_mixing(ctx, "conv", 1, m.in_channels, m.out_channels, m.groups,
                                m.weight[0, 0].numel(), in_labels)
    if m.groups > 1 and in_labels is not None and m.groups >= ctx.nodes:
        # group-aligned ownership: input group g and output group g live on one node
        for gin, gout in zip(in_labels.reshape(-1).chunk(m.groups), out_labels.reshape(-1).chunk(m.groups)):
            ctx.universe.tie_all(torch.cat([gin, gout]))
    return out_labels


@register(nn.Linear)
def linear(ctx: RuleContext) -> torch.Tensor:
    m = ctx.module
    in_labels = _mixing_input(ctx, -1, m.in_features)
    return _record_mixing(ctx, "linear", -1, m.in_features, m.out_features, 1, 1, in_labels)


# ---------------------------------------------------------------- attention

@register(heads_attention)
def attention(ctx: RuleContext) -> torch.Tensor:
    """Head h's output channels mix v_h over tokens with weights from q_h and k_h: the 3d channels
    (q_h, k_h, v_h) of every head are tied to one node, which then needs nothing from the others."""
    qkv = ctx.tensor_inputs()[:3]
    heads = ctx.arg(3, "num_heads")
    for t, l in qkv:
        if l is None or channel_dims(l) != (t.dim() - 1,):
            raise Fallback("query, key or value not split along its last dim alone")
    for head in zip(*(l.reshape(-1).chunk(heads) for _, l in qkv)):
        ctx.universe.tie_all(torch.cat(head))
    return qkv[2][1]


@register(window_heads_attention)
def window_attention(ctx: RuleContext) -> torch.Tensor:
    """As `attention`, for windowed attention: its per-head tensors (relative position bias, logit scale)
    and the shift mask must be whole on every node, which then keeps its own heads' rows."""
    if any(labels is not None for _, labels in ctx.tensor_inputs()[3:]):
        raise Fallback("the attention's bias, mask or logit scale is split across nodes")
    return attention(ctx)


def _channels_last(ctx: RuleContext) -> torch.Tensor:
    value, labels = _first_labelled(ctx)
    if channel_dims(labels) not in ((), (value.dim() - 1,)):
        raise Fallback("channels do not vary along the last dim alone")
    return labels.reshape([1] * (ctx.out.dim() - 1) + [labels.size(-1)])


@register(window_partition, window_reverse)
def windows(ctx: RuleContext) -> torch.Tensor:
    """Tokens of a channels-last map moved into or out of windows: channel labels pass through."""
    return _channels_last(ctx)


@register(_patch_merging_pad)
def patch_merging(ctx: RuleContext) -> torch.Tensor:
    """Swin's 2x2 patch merging: four strided token subsets side by side along channels, each with the
    input's channel labels (relayout would run the op's zero padding on labels)."""
    labels = _channels_last(ctx)
    return torch.cat([labels] * 4, -1)


@register(nn.MultiheadAttention)
def multihead_attention(ctx: RuleContext) -> torch.Tensor:
    """Reached only for calls passes/expand_attention.py left opaque: say why."""
    raise Fallback(f"not split by heads: {why_not_split(ctx.node, ctx.module) or 'another call of this module is not'}")


def is_mixing(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


def replicated(ctx: RuleContext, reason: str) -> ReplicatedOp:
    return ReplicatedOp(ctx.node.name, describe_target(ctx.node, ctx.module), reason, ctx.input_node_names())
