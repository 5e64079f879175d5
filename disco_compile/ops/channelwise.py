"""Channelwise ops: each output element depends on the same channel of the input (activations, dropout,
BatchNorm and its subclasses, InstanceNorm, PReLU, casts, padding along non-channel dims, F.pad or its module form).

Rule: labels pass through unchanged, provided the output keeps the input's channel layout.
Lowering: node j runs the op on its local tensor. A module's per-channel parameters and buffers p (BatchNorm's
running statistics and affine, PReLU's slopes, InstanceNorm's affine: p[c] acts on channel c along dim 1)
are sliced to the units the node holds, p_j = p[held units]; a parameter with one value (PReLU(1)) is kept.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision.ops

from ..backend.program import Local, LoweringError
from ..ir import channel_dims, fits
from .registry import Fallback, Family, RuleContext, node_arg

CHANNELWISE = Family("channelwise")
aten = torch.ops.aten


def keeps_layout(ctx: RuleContext) -> torch.Tensor:
    """The rule: the first labelled input's labels, if the output keeps that channel layout."""
    _, labels = ctx.first_labelled()
    if not isinstance(ctx.out, torch.Tensor) or not fits(labels, ctx.out.shape) or any(
            labels.size(d) != ctx.out.size(d) for d in channel_dims(labels)):
        raise Fallback(f"output shape {tuple(ctx.out.shape)} does not keep the channel layout {tuple(labels.shape)}")
    return labels


CHANNELWISE.ops(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout2d,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, torch.clamp, torch.clip, torch.erf, operator.neg, torch.square,
    F.dropout1d, F.alpha_dropout,
    torchvision.ops.stochastic_depth,  # drops whole samples (or the batch), never single channels
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp",
    "clamp_", "clip", "erf", "float", "to", "type_as", "detach", "clone", "contiguous", "square",
    rule=keeps_layout,
    aten={aten.relu.default: torch.relu, aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
          aten.hardtanh.default: F.hardtanh, aten.silu.default: F.silu, aten.gelu.default: F.gelu,
          aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid,
          aten.leaky_relu.default: F.leaky_relu, aten.dropout.default: F.dropout})


# the functional forms of modules with per-channel tensors: which arguments hold them (index, name)
CHANNELWISE.ops(F.batch_norm, F.instance_norm, rule=keeps_layout,
                channel_args=((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
CHANNELWISE.ops(F.prelu, torch.prelu, rule=keeps_layout, channel_args=((1, "weight"),))


def _pads_channels(labels: torch.Tensor, padding) -> bool:
    """padding: (last dim's left, right, the dim before's left, right, ...), as F.pad takes it."""
    return any(labels.size(labels.dim() - 1 - k // 2) > 1 for k, p in enumerate(padding) if p)


@CHANNELWISE.rule(F.pad, aten={aten.pad.default: F.pad})
def pad(ctx: RuleContext) -> torch.Tensor:
    _, labels = ctx.first_labelled()
    if _pads_channels(labels, ctx.arg(1, "pad")):
        raise Fallback("padding along a channel dimension")
    return keeps_layout(ctx)


@CHANNELWISE.rule(nn.ConstantPad2d, nn.ZeroPad2d)
def pad_module(ctx: RuleContext) -> torch.Tensor:
    """F.pad's module form (timm's ResNetV2 stem: nn.ConstantPad2d(1, 0.0)); `padding` is F.pad's tuple."""
    _, labels = ctx.first_labelled()
    if _pads_channels(labels, ctx.module.padding):
        raise Fallback("padding along a channel dimension")
    return keeps_layout(ctx)


def sliced_module(n: fx.Node, module: nn.Module, units: torch.Tensor, channels: int, axis: int | None) -> nn.Module:
    """A copy of `module` whose per-channel parameters and buffers keep only `units` (module docstring)."""
    part = copy.deepcopy(module)
    tensors = [(m, name, t, True) for m in part.modules() for name, t in m.named_parameters(recurse=False)] + \
        [(m, name, t, False) for m in part.modules() for name, t in m.named_buffers(recurse=False)]
    for owner, name, t, is_param in tensors:
        if t is None or t.dim() == 0 or t.numel() == 1:
            continue
        if axis != 1 or t.size(0) != channels:
            raise LoweringError(f"'{n.name}' ({type(module).__name__}): its {name} of shape {tuple(t.shape)} does "
                                f"not act along the split channel dim 1 of {channels} channels")
        kept = t.detach()[units].clone()
        if is_param:
            setattr(owner, name, nn.Parameter(kept, requires_grad=False))
        else:
            owner.register_buffer(name, kept)
    for attr in _CHANNEL_COUNTS:  # the count a module checks its input against (InstanceNorm's num_features)
        if getattr(part, attr, None) == channels:
            setattr(part, attr, units.numel())
    return part


_CHANNEL_COUNTS = ("num_features", "num_parameters", "num_channels")


def has_state(module: nn.Module | None) -> bool:
    return module is not None and any(t is not None and t.numel() > 1
                                      for t in [*module.parameters(), *module.buffers()])


def _channel_args(b, n: fx.Node, op, loc: Local, channels: int, axis: int | None) -> dict[fx.Node, fx.Node]:
    """The per-channel tensor arguments of a functional call (op data `channel_args`), sliced to node j's units."""
    sliced = {}
    for index, name in (op.data.get("channel_args", ()) if op is not None else ()):
        a = node_arg(n.args, n.kwargs, index, name)
        if not isinstance(a, fx.Node) or b.env[a.name].units is not None or loc.units is None:
            continue
        whole = b.value(a)
        shape = b.shapes.get(whole.name) if isinstance(whole, fx.Node) else None
        if shape is None or len(shape) != 1 or shape[0] == 1:
            continue
        if axis != 1 or shape[0] != channels:
            raise LoweringError(f"'{n.name}': its {name} of shape {shape} does not act along the split channel "
                                f"dim 1 of {channels} channels")
        sliced[a] = b.select(whole, 0, loc.units)
    return sliced


def run_local(b, n: fx.Node, module: nn.Module | None, op=None, *, per_channel: bool = True) -> None:
    """The op on node j's local tensor of its first input, holding the same units; `per_channel`: the module's
    parameters act on its channels and are sliced (False: they act along other dims and are kept whole)."""
    x = n.all_input_nodes[0]
    loc = b.env[x.name]
    if loc.node is None:
        b.env[n.name] = Local(None, loc.units)
        return
    lay = b.low.layout(n)
    shape = lay.rep_shape(None if loc.units is None else loc.units.numel())
    sliced = _channel_args(b, n, op, loc, lay.units, lay.axis)
    args, kwargs = fx.node.map_arg((n.args, n.kwargs),
                                   lambda a: loc.node if a is x else sliced[a] if a in sliced else b.value(a))
    counts = any(getattr(module, attr, None) == lay.units for attr in _CHANNEL_COUNTS)
    if per_channel and (has_state(module) or counts) and loc.units is not None:
        part = sliced_module(n, module, loc.units, lay.units, lay.axis)
        node = b.submodule(n, part, args, kwargs, shape, lay.dtype)
    else:
        node = b.emit(n, module, args, kwargs, shape, lay.dtype)
    b.hold(n, node, loc.units)


@CHANNELWISE.lowers
def lower(b, n: fx.Node, module: nn.Module | None, op) -> None:
    run_local(b, n, module, op)
