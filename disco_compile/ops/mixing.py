"""The block maths of one channel-mixing layer split across nodes.

For a layer with weight W (rows = output channels, columns = input channels,
grouped convolutions connecting output row o only to the columns of its group),
node j owns output rows T_j and computes

    y[T_j] = W[T_j, local_j] x[local_j] + sum_{i != j} W[T_j, G_ij] x[G_ij]

where local_j are the input columns node j holds (its own and replicated
ones) and G_ij the columns it receives from node i. A column is *needed* by j
when some row of T_j is connected to it. Node j's MACs are
sum_{o in T_j} |available columns of o| * kernel * output positions, and its
weight count the same without the output positions.

Rule: Conv and Linear create a new channel space (one id per output channel, recorded as a MixingLayer);
grouped convolutions with at least as many groups as nodes tie each input group to its output group, so no
group straddles nodes. A Linear whose input channels vary only along dims other than its last (MLP-Mixer's and
ResMLP's token mixing, (B, C, T) @ W^T) computes each channel's row from that row alone: channelwise, the labels
pass through, and node j applies the whole W to its own channels (costed as its share of the channels).
Lowering, on node j (a BatchNorm right after the conv folded into W and b by backend/lower.py):
    y[T_j] = W[T_j, local] x_local + b[T_j]          first, while messages fly
           + sum_i (W[T_j, G_ij] * gate_ij) x_ij      as each message arrives
Each received term's Conv carries a zero bias, so onnxruntime fuses it with the Add and a following Relu.
Without overlap (`lower(..., overlap=False)`) the node waits for all its messages and runs one Conv over the
concatenation [x_local | x_ij ...] with the columns [W[T_j, local] | W[T_j, G_ij] * gate_ij ...]: the same sum
in one kernel. Grouped convs whose groups stay on one node run on the node's groups alone; others rebuild the
group inputs with zeros where nothing was sent.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..backend.program import Local, LoweringError
from ..ir import REPLICATED, MixingLayer, channel_dims, fits, units_per_sample
from .channelwise import keeps_layout, run_local
from .modules import PartitionedConv, PartitionedLinear
from .registry import Fallback, Family, RuleContext

MIXING = Family("mixing")
MIXING.ops(PartitionedConv, PartitionedLinear, rule=None)  # what insert_exchanges makes of the layers below


def _column_group(layer: MixingLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(group of each output row, group of each input column)."""
    out_group = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
    in_group = torch.arange(layer.in_channels) // (layer.in_channels // layer.groups)
    return out_group, in_group


def rows(out_owner: torch.Tensor, node: int) -> torch.Tensor:
    return (out_owner == node).nonzero().flatten()


def needed(layer: MixingLayer, out_owner: torch.Tensor, node: int) -> torch.Tensor:
    """Bool over input columns: connected to some output row that `node` owns."""
    mine = out_owner == node
    if layer.groups == 1:
        return torch.full((layer.in_channels,), bool(mine.any()))
    out_group, in_group = _column_group(layer)
    groups_used = torch.zeros(layer.groups, dtype=torch.bool)
    groups_used[out_group[mine]] = True
    return groups_used[in_group]


def column_scores(layer: MixingLayer, module: nn.Module, out_owner: torch.Tensor, node: int) -> torch.Tensor:
    """Squared norm of each input column restricted to the rows `node` owns."""
    w = module.weight.detach()
    sq = (w.reshape(w.shape[0], w.shape[1], -1) ** 2).sum(2)  # rows x columns-per-group
    mine = out_owner == node
    if layer.groups == 1:
        return sq[mine].sum(0)
    out_group, _ = _column_group(layer)
    per_group = layer.in_channels // layer.groups
    cols = out_group[mine, None] * per_group + torch.arange(per_group)
    return torch.zeros(layer.in_channels, dtype=sq.dtype).index_add_(0, cols.flatten(), sq[mine].flatten())


def column_weights(layer: MixingLayer, out_owner: torch.Tensor, node: int) -> torch.Tensor:
    """Weight entries of each input column that `node` uses: its connected rows of `node` x kernel size
    (times out_positions: the MACs per sample the column costs `node`)."""
    mine = out_owner == node
    if layer.groups == 1:
        rows_per_column = torch.full((layer.in_channels,), int(mine.sum()))
    else:
        out_group, in_group = _column_group(layer)
        rows_per_group = torch.zeros(layer.groups, dtype=torch.long).index_add_(0, out_group, mine.long())
        rows_per_column = rows_per_group[in_group]
    return rows_per_column * layer.kernel_numel


def weights_used(layer: MixingLayer, out_owner: torch.Tensor, available: torch.Tensor, node: int) -> int:
    """Weight entries node `node` uses, given the input columns available to it."""
    return int(column_weights(layer, out_owner, node)[available].sum())


def local_columns(in_owner: torch.Tensor | None, layer: MixingLayer, node: int) -> torch.Tensor:
    if in_owner is None:
        return torch.ones(layer.in_channels, dtype=torch.bool)
    return (in_owner == node) | (in_owner == REPLICATED)


def full_macs(layer: MixingLayer) -> int:
    return layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel_numel * layer.out_positions


def _mixing_input(ctx: RuleContext, dim: int, size: int) -> torch.Tensor | None:
    value, labels = ctx.tensor_inputs()[0]
    if labels is None:
        return None
    dims = channel_dims(labels)
    if dims and dims != (dim % value.dim(),):
        slides = isinstance(ctx.module, nn.modules.conv._ConvNd) and dims == (value.dim() - 1,)
        raise Fallback(f"input channels vary along dims {dims}, expected only dim {dim % value.dim()}" + (
            ": the kernel slides across the split channels (ECA's Conv1d over pooled channels), each output mixing "
            "its neighbours' channels; its input, one value per channel, is gathered on every node" if slides else ""))
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


@MIXING.rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, creates_channels=True)
def conv(ctx: RuleContext) -> torch.Tensor:
    m = ctx.module
    in_labels = _mixing_input(ctx, 1, m.in_channels)
    out_labels = _record_mixing(ctx, "conv", 1, m.in_channels, m.out_channels, m.groups,
                                m.weight[0, 0].numel(), in_labels)
    if m.groups > 1 and in_labels is not None and m.groups >= ctx.nodes:
        # group-aligned ownership: input group g and output group g live on one node
        for gin, gout in zip(in_labels.reshape(-1).chunk(m.groups), out_labels.reshape(-1).chunk(m.groups),
                             strict=True):
            ctx.universe.tie_all(torch.cat([gin, gout]))
    return out_labels


@MIXING.rule(nn.Linear, creates_channels=True)
def linear(ctx: RuleContext) -> torch.Tensor:
    m = ctx.module
    value, labels = ctx.tensor_inputs()[0]
    dims = () if labels is None else channel_dims(labels)
    if dims and value.dim() - 1 not in dims:
        return keeps_layout(ctx)  # it mixes along a dim the split channels do not vary along (token mixing)
    in_labels = _mixing_input(ctx, -1, m.in_features)
    return _record_mixing(ctx, "linear", -1, m.in_features, m.out_features, 1, 1, in_labels)


@MIXING.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """Node j's output rows T_j: a block sum, or a grouped conv on whole groups or with zeros for what is not sent."""
    if n.name not in b.low.layers:  # a Linear along other dims (the rule): node j's channels, W whole
        return run_local(b, n, module, per_channel=False)
    layer = b.low.layers[n.name]
    out_owner = b.low.owner_of[layer.out_labels.reshape(-1)]
    rows = (out_owner == b.j).nonzero().flatten()
    if rows.numel() == 0:
        b.env[n.name] = Local(None, rows)
        return
    module = b.low.gm.get_submodule(layer.module)
    weight, bias = b.low.weights(layer)
    x_node = n.all_input_nodes[0]
    source = x_node.all_input_nodes[0] if layer.exchange is not None else x_node
    loc = b.env[x_node.name]
    if layer.groups > 1 and layer.exchange is not None:
        out = _grouped_with_exchange(b, n, module, layer, source, loc, weight, bias, rows)
    elif layer.groups > 1:
        out = _grouped_local(b, n, module, layer, source, weight[rows], None if bias is None else bias[rows], rows)
    else:
        out = _block_sum(b, n, module, layer, loc, weight[rows], None if bias is None else bias[rows], rows)
    b.hold(n, out, rows)


def _block_sum(b, n, module, layer, loc: Local, w_rows, b_rows, rows) -> fx.Node:
    if loc.units is None:  # input held whole: every column is local
        return _apply_weights(b, n, module, loc.node, w_rows, b_rows, rows)
    parts = [(loc.node, w_rows[:, loc.units])] if loc.node is not None and loc.units.numel() else []
    for msg, payload in loc.received:
        cols = torch.tensor(msg.channels, dtype=torch.long)
        gate = b.low.gates[layer.exchange][b.j, cols]
        parts.append((payload, w_rows[:, cols] * gate.reshape((1, -1) + (1,) * (w_rows.dim() - 2))))
    if not parts:  # nothing of the input here at this budget: the rows are their bias (or zero)
        bias = torch.zeros(w_rows.shape[0], dtype=w_rows.dtype) if b_rows is None else b_rows
        lay = b.low.layout(n)
        shape = lay.rep_shape(rows.numel())
        return b.call(constant_rows, (b.batch_of_inputs(), b.const(f"{n.name}_b", bias), shape[1:], lay.axis - 1),
                      shape=shape)
    if not b.low.overlap and len(parts) > 1:  # one product over [local | received] once all arrived
        axis = b.low.layout(n.all_input_nodes[0]).axis
        shape = list(b.shapes[parts[0][0].name])
        shape[axis] = sum(w.shape[1] for _, w in parts)
        x = b.call(torch.cat, ([x for x, _ in parts], axis), shape=tuple(shape))
        return _apply_weights(b, n, module, x, torch.cat([w for _, w in parts], 1), b_rows, rows)
    terms = []
    for x, w in parts:
        if not terms:
            bias = b_rows
        elif w.dim() > 2:  # zeros: onnxruntime fuses Conv + Add (+ Relu) only into a Conv with a bias input
            bias = torch.zeros(w.shape[0], dtype=w.dtype)
        else:
            bias = None
        terms.append(_apply_weights(b, n, module, x, w, bias, rows))
    out = terms[0]
    for t in terms[1:]:
        out = b.call(operator.add, (out, t), shape=b.shapes[out.name])
    return out


def constant_rows(batch: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """(len(batch), *shape) holding bias[c] at position c of dim `axis` of `shape`: output rows that receive
    no input channel."""
    fill = bias.reshape([-1 if d == axis else 1 for d in range(len(shape))]).expand(shape)
    return batch.reshape((-1,) + (1,) * len(shape)) * 0 + fill


def _apply_weights(b, n, module, x, w, bias, rows) -> fx.Node:
    shape = b.low.layout(n).rep_shape(rows.numel())
    wn, bn = b.const(f"{n.name}_w", w), None if bias is None else b.const(f"{n.name}_b", bias)
    if isinstance(module, nn.Linear) or w.dim() == 2:
        return b.call(F.linear, (x, wn, bn), shape=shape)
    return _conv(b, module, x, wn, bn, 1, shape)


def _conv(b, module, x, w, bias, groups, shape) -> fx.Node:
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(shape)]
    padding = module.padding
    if module.padding_mode != "zeros":  # Conv2d and PartitionedConv both keep torch's padding tuple
        x = b.call(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        padding = 0
    return b.call(fn, (x, w, bias, module.stride, padding, module.dilation, groups), shape=shape)


def _grouped_local(b, n, module, layer, source, w_rows, b_rows, rows) -> fx.Node:
    per_in, per_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    groups = torch.unique(rows // per_out)
    if not torch.equal(torch.sort(rows).values, (groups[:, None] * per_out + torch.arange(per_out)).flatten()):
        raise LoweringError(f"'{n.name}': node {b.j} holds part of a group's output channels")
    channels = (groups[:, None] * per_in + torch.arange(per_in)).flatten()
    if b.env[source.name].units is None and b.low.layout(source).axis is None:  # a whole input (MViTv2's pooling
        x = b.select(b.value(source), 1, channels)  # conv after heads made whole): its groups' channels, dim 1
    else:
        x = b.aligned(source, channels)
    shape = b.low.layout(n).rep_shape(rows.numel())
    wn, bn = b.const(f"{n.name}_w", w_rows), None if b_rows is None else b.const(f"{n.name}_b", b_rows)
    return _conv(b, module, x, wn, bn, groups.numel(), shape)


def _grouped_with_exchange(b, n, module, layer, source, loc, weight, bias, rows) -> fx.Node:
    """Groups split across nodes: the whole grouped conv on the input channels this node
    holds or receives (zeros for the rest), keeping this node's rows."""
    lay = b.low.layout(source)
    parts, order = [], []
    if loc.node is not None and loc.units.numel():
        parts.append(loc.node)
        order.append(loc.units)
    for msg, payload in loc.received:
        cols = torch.tensor(msg.channels, dtype=torch.long)
        gate = b.low.gates[layer.exchange][b.j, cols].reshape((1, -1) + (1,) * (len(lay.shape) - 2))
        parts.append(b.call(operator.mul, (payload, b.const("gate", gate)), shape=b.shapes[payload.name]))
        order.append(cols)
    have = torch.cat(order)
    missing = torch.tensor(sorted(set(range(layer.in_channels)) - set(have.tolist())), dtype=torch.long)
    if missing.numel():
        one = b.select(parts[0], 1, torch.zeros(1, dtype=torch.long))
        zero = b.call(torch.zeros_like, (one,), shape=b.shapes[one.name])
        sizes = (-1, missing.numel(), *([-1] * (len(lay.shape) - 2)))
        parts.append(b.method("expand", (zero, *sizes), lay.rep_shape(missing.numel()), lay.dtype))
        have = torch.cat([have, missing])
    x = b.call(torch.cat, (parts, 1), shape=lay.shape)
    x = b.select(x, 1, torch.argsort(have))
    full = b.low.layout(n).shape
    wn, bn = b.const(f"{n.name}_w", weight), None if bias is None else b.const(f"{n.name}_b", bias)
    return b.select(_conv(b, module, x, wn, bn, layer.groups, full), 1, rows)
