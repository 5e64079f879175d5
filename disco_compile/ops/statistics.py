"""Statistics over channels: reductions (sum, mean, amax, amin) and normalisations (LayerNorm, RMSNorm, GroupNorm
with any number of groups, softmax, log-softmax, L2 normalisation).

Rule: over dims that hold no split channels, the op is local (labels pass through, or lose the reduced dims).
Over split channels, each node computes partial statistics of its own channels and the nodes exchange them
(a StatExchange, costed): reductions send to every node (the result is replicated), normalisations to the
other holders of the input (the result stays split like the input). GroupNorm with at least as many groups as
nodes ties each group's channels to one node instead, and runs locally on whole groups.

Lowering, merging the nodes' parts k = 1..N exactly:
- mean and variance (LayerNorm; GroupNorm per group g), by Chan et al.'s pairwise formula over counts c_k:
      mean = sum_k c_k m_k / sum_k c_k,    M2 = sum_k (M2_k + c_k (m_k - mean)^2),    var = M2 / sum_k c_k
- softmax: per-row maxima t_k and sums s_k = sum exp(x - t_k); t = max_k t_k, s = sum_k s_k exp(t_k - t)
- sum, mean, L2 and RMS sums of squares: sums add; amax and amin: the maximum (minimum) of the parts.
  RMSNorm is then x / sqrt(sum of squares / count + eps) * weight.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..backend.program import Layout, Local, LoweringError, is_tensor_meta
from ..ir import REPLICATED, StatExchange, channel_dims
from .channelwise import keeps_layout, run_local
from .registry import Fallback, Family, RuleContext, describe_target, node_arg

STATISTICS = Family("statistics")
aten = torch.ops.aten


def _dims_arg(ctx: RuleContext, ndim: int) -> tuple[int, ...]:
    dim = ctx.arg(1, "dim")
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % ndim for d in dims)


def _stat_exchange(ctx: RuleContext, values: int, itemsize: int, to_all: bool) -> None:
    ctx.stats.append(StatExchange(ctx.node.name, describe_target(ctx.node, ctx.module),
                                  ctx.node.all_input_nodes[0].name, values=values, itemsize=itemsize, to_all=to_all))


def reduce(ctx: RuleContext) -> torch.Tensor | None:
    value, labels = ctx.first_labelled()
    dims = _dims_arg(ctx, value.dim())
    keepdim = bool(ctx.arg(2, "keepdim", False))
    if any(labels.size(d) > 1 for d in dims):
        # partial -> all-reduce: each node reduces its own channels, then the partial results are merged
        _stat_exchange(ctx, ctx.out.numel() // max(1, ctx.out.shape[0] if ctx.out.dim() else 1),
                       ctx.out.element_size(), to_all=True)
        return None
    if keepdim:
        return labels
    return labels.reshape([s for d, s in enumerate(labels.shape) if d not in dims])


STATISTICS.ops(torch.sum, "sum", rule=reduce, kind="sum", aten={aten.sum.dim_IntList: torch.sum})
STATISTICS.ops(torch.mean, "mean", rule=reduce, kind="mean", aten={aten.mean.dim: torch.mean})
STATISTICS.ops(torch.amax, "amax", rule=reduce, kind="amax", aten={aten.amax.default: torch.amax})
STATISTICS.ops(torch.amin, "amin", rule=reduce, kind="amin", aten={aten.amin.default: torch.amin})


def max_with_indices(ctx: RuleContext):
    """torch.max(x) is amax over every dim; torch.max(x, dim) returns (values, indices): over the split channels,
    each node sends its maxima with the global index of each, and every node keeps the largest (the first such
    index on ties, as torch does)."""
    dim = ctx.arg(1, "dim")
    if isinstance(dim, torch.Tensor):
        raise Fallback("torch.max of two tensors (elementwise: torch.maximum is split)")
    if dim is None:
        return reduce(ctx)
    value, labels = ctx.first_labelled()
    if channel_dims(labels) != (dim % value.dim(),):
        raise Fallback("max with indices over dims other than the split channel dim alone")
    values = ctx.out[0]
    _stat_exchange(ctx, 2 * values.numel() // max(1, values.shape[0] if values.dim() else 1), values.element_size(),
                   to_all=True)
    return None


STATISTICS.ops(torch.max, "max", rule=max_with_indices, kind="max")


def _normalise(ctx: RuleContext, value: torch.Tensor, labels: torch.Tensor, dims: tuple[int, ...],
               stats: int) -> torch.Tensor:
    if any(labels.size(d) > 1 for d in dims):
        # partial statistics -> all-reduce (e.g. per-token sum and sum of squares for LayerNorm)
        rows = value[0].numel()
        for d in dims:
            rows //= value.size(d)
        _stat_exchange(ctx, rows * stats, value.element_size(), to_all=False)
    return keeps_layout(ctx)


@STATISTICS.rule(nn.LayerNorm, F.layer_norm, kind="layer_norm")
def layer_norm(ctx: RuleContext) -> torch.Tensor:
    value, labels = ctx.first_labelled()
    shape = ctx.module.normalized_shape if ctx.module is not None else ctx.arg(1, "normalized_shape")
    dims = tuple(range(value.dim() - len(shape), value.dim()))
    return _normalise(ctx, value, labels, dims, stats=2)


@STATISTICS.rule(nn.RMSNorm, F.rms_norm, kind="rms_norm", aten={aten.rms_norm.default: F.rms_norm})
def rms_norm(ctx: RuleContext) -> torch.Tensor:
    value, labels = ctx.first_labelled()
    shape = ctx.module.normalized_shape if ctx.module is not None else ctx.arg(1, "normalized_shape")
    return _normalise(ctx, value, labels, tuple(range(value.dim() - len(shape), value.dim())), stats=1)


def softmax(ctx: RuleContext) -> torch.Tensor:
    value, labels = ctx.first_labelled()
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    return _normalise(ctx, value, labels, (dim % value.dim(),), stats=2)


STATISTICS.ops(nn.Softmax, F.softmax, torch.softmax, "softmax", rule=softmax, kind="softmax",
               aten={aten.softmax.int: torch.softmax})
STATISTICS.ops(nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax", rule=softmax, kind="log_softmax")


@STATISTICS.rule(F.normalize, kind="normalize")
def normalize(ctx: RuleContext) -> torch.Tensor:
    """Division by the L2 norm along `dim` (SSD's L2Norm): per-row partial sums of squares all-reduced."""
    value, labels = ctx.first_labelled()
    if ctx.arg(1, "p", 2.0) != 2:
        raise Fallback("a norm other than L2")
    return _normalise(ctx, value, labels, (ctx.arg(2, "dim", 1) % value.dim(),), stats=1)


def _groups(n: fx.Node, module) -> int:
    return module.num_groups if module is not None else node_arg(n.args, n.kwargs, 1, "num_groups")


@STATISTICS.rule(nn.GroupNorm, F.group_norm, kind="group_norm")
def group_norm(ctx: RuleContext) -> torch.Tensor:
    value, labels = ctx.first_labelled()
    if channel_dims(labels) not in ((), (1,)):
        raise Fallback(f"channels vary along dims {channel_dims(labels)}, not along dim 1 alone")
    groups = _groups(ctx.node, ctx.module)
    if labels.size(1) > 1 and groups >= ctx.nodes:
        for g in labels[0].reshape(labels.size(1)).chunk(groups):
            ctx.universe.tie_all(g)  # each group's statistics stay on one node
        return keeps_layout(ctx)
    return _normalise(ctx, value, labels, tuple(range(1, value.dim())), stats=2 * groups)


# ---------------------------------------------------------------- lowering

def _local_dims(n: fx.Node, kind: str, module, lay: Layout) -> tuple[int, ...]:
    """The reduced dims, in the local representation (channel dims collapsed into lay.axis)."""
    ndim = len(lay.shape)
    if kind in ("layer_norm", "rms_norm"):
        k = len(module.normalized_shape if module is not None else node_arg(n.args, n.kwargs, 1, "normalized_shape"))
        full = range(ndim - k, ndim)
    elif kind in ("softmax", "log_softmax") and module is not None:
        full = [module.dim % ndim]
    elif kind == "normalize":
        full = [node_arg(n.args, n.kwargs, 2, "dim", 1) % ndim]
    else:
        dim = node_arg(n.args, n.kwargs, 1, "dim")
        full = range(ndim) if dim is None else [d % ndim for d in ((dim,) if isinstance(dim, int) else dim)]
    if not set(lay.dims) <= set(full):
        raise LoweringError(f"'{n.name}' reduces over part of the channel dims {lay.dims}; not lowered yet")
    shift = len(lay.dims) - 1
    return tuple(sorted({lay.axis if d in lay.dims else d - (shift if d > lay.axis else 0) for d in full}))


def _stats_shape(shape: tuple[int, ...], dims: tuple[int, ...], kind: str) -> tuple[int, ...]:
    reduced = tuple(1 if d in dims else s for d, s in enumerate(shape))
    return reduced + ((2,) if kind in ("layer_norm", "softmax", "log_softmax") else (1,))


def _local_affine(t: torch.Tensor, lay: Layout, units: torch.Tensor, k: int) -> torch.Tensor:
    """A LayerNorm weight (over the last dims) restricted to the held units."""
    rep = lay.rep_shape(lay.units)
    return t.reshape(rep[-k:]).index_select(lay.axis - (len(rep) - k), units)


def partial_stats(x: torch.Tensor, kind: str, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-row statistics of this node's part, stacked on a new last dim."""
    if kind == "layer_norm":
        mean = x.mean(dims, keepdim=True)
        return torch.stack([mean, ((x - mean) ** 2).sum(dims, keepdim=True)], -1)
    if kind in ("softmax", "log_softmax"):
        top = x.amax(dims, keepdim=True)
        return torch.stack([top, torch.exp(x - top).sum(dims, keepdim=True)], -1)
    if kind in ("normalize", "rms_norm"):
        return x.square().sum(dims, keepdim=True).unsqueeze(-1)
    if kind in ("amax", "amin"):
        return getattr(x, kind)(dims, keepdim=True).unsqueeze(-1)
    return x.sum(dims, keepdim=True).unsqueeze(-1)


def merge_mean_var(parts: list[torch.Tensor], counts: list) -> torch.Tensor:
    """Chan et al.'s merge of (mean, M2) parts over `counts` (numbers, or tensors broadcasting to the means)."""
    total = sum(counts)
    mean = sum(p[..., 0] * c for p, c in zip(parts, counts, strict=True)) / total
    m2 = sum(p[..., 1] + c * (p[..., 0] - mean) ** 2 for p, c in zip(parts, counts, strict=True))
    return torch.stack([mean, m2 / total], -1)


def merge_stats(parts: list[torch.Tensor], counts: list[int], kind: str) -> torch.Tensor:
    """Merge the nodes' partial statistics exactly (module docstring)."""
    if kind == "layer_norm":
        return merge_mean_var(parts, [float(c) for c in counts])
    if kind in ("softmax", "log_softmax"):
        top = parts[0][..., 0]
        for p in parts[1:]:
            top = torch.maximum(top, p[..., 0])
        return torch.stack([top, sum(p[..., 1] * torch.exp(p[..., 0] - top) for p in parts)], -1)
    if kind in ("amax", "amin"):
        out = parts[0]
        for p in parts[1:]:
            out = torch.maximum(out, p) if kind == "amax" else torch.minimum(out, p)
        return out
    return sum(parts)


def normalised(x, stats, eps: float, weight, bias):
    y = (x - stats[..., 0]) / torch.sqrt(stats[..., 1] + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def normalize_finish(x, stats, eps: float):
    """F.normalize (p=2) from the merged sum of squares."""
    return x / stats[..., 0].sqrt().clamp_min(eps)


def rms_finish(x, stats, total: int, eps: float | None, weight):
    """RMSNorm from the merged sum of squares over `total` elements per row (eps None: the dtype's epsilon)."""
    y = x / torch.sqrt(stats[..., 0] / total + (torch.finfo(x.dtype).eps if eps is None else eps))
    return y if weight is None else y * weight


def softmax_finish(x, stats, kind: str):
    if kind == "log_softmax":
        return x - stats[..., 0] - torch.log(stats[..., 1])
    return torch.exp(x - stats[..., 0]) / stats[..., 1]


def finish_reduction(merged, kind: str, total: int, dims: tuple[int, ...], keepdim: bool):
    out = merged[..., 0]
    if kind == "mean":
        out = out / total
    return out if keepdim else out.squeeze(dims)


def _exchange(b, n: fx.Node, parts: dict, shapes: dict[int, tuple], holders: list[int], receivers: list[int],
              dtype: torch.dtype) -> list:
    """Send node j's partial statistics to the other receivers and receive the other holders' parts:
    every holder's part, in node order."""
    if b.j in parts:
        for dst in receivers:
            if dst != b.j:
                msg = b.low.message("stats", n.name, b.j, dst, torch.arange(0), shapes[b.j], dtype)
                b.send(msg, parts[b.j])
    for src in holders:
        if src != b.j:
            msg = b.low.message("stats", n.name, src, b.j, torch.arange(0), shapes[src], dtype)
            parts[src] = b.receive(msg, shapes[src], dtype)
    return [parts[k] for k in sorted(parts)]


def _split_statistics(b, n: fx.Node, module, kind: str) -> None:
    """Statistics over channels that several nodes hold: each holder computes per-row partial statistics,
    sends them, and every receiver merges them exactly."""
    x = n.all_input_nodes[0]
    lay, loc = b.low.layout(x), b.env[x.name]
    holders = [k for k in range(b.low.nodes) if lay.owned(k).numel()]
    receivers = list(range(b.low.nodes)) if kind in ("sum", "mean", "amax", "amin") else holders
    if b.j not in receivers:
        b.env[n.name] = Local(None, loc.units)
        return
    dims = _local_dims(n, kind, module, lay)
    shapes = {k: _stats_shape(lay.rep_shape(lay.owned(k).numel()), dims, kind) for k in holders}
    count = {k: int(torch.tensor([lay.rep_shape(lay.owned(k).numel())[d] for d in dims]).prod()) for k in holders}
    own = {b.j: b.call(partial_stats, (loc.node, kind, dims), shape=shapes[b.j], dtype=lay.dtype)} \
        if b.j in holders else {}
    parts = _exchange(b, n, own, shapes, holders, receivers, lay.dtype)
    merged = b.call(merge_stats, (parts, [count[k] for k in sorted(count)], kind), shape=shapes[holders[0]],
                    dtype=lay.dtype)
    if kind in ("sum", "mean", "amax", "amin"):
        out = b.low.layout(n)
        keepdim = bool(node_arg(n.args, n.kwargs, 2, "keepdim", False))
        node = b.call(finish_reduction, (merged, kind, sum(count.values()), dims, keepdim), shape=out.shape,
                      dtype=out.dtype)
        b.env[n.name] = Local(node)
        return
    if kind in ("layer_norm", "rms_norm"):
        affine = ((2, "weight"), (3, "bias")) if kind == "layer_norm" else ((2, "weight"),)
        consts = []
        for k, name in affine:
            t = getattr(module, name) if module is not None else b.concrete_tensor(node_arg(n.args, n.kwargs, k, name))
            consts.append(None if t is None else
                          b.const(f"{n.name}_{name}", _local_affine(t.detach(), lay, loc.units, len(dims))))
        if kind == "layer_norm":
            eps = module.eps if module is not None else node_arg(n.args, n.kwargs, 4, "eps", 1e-5)
            node = b.call(normalised, (loc.node, merged, float(eps), *consts))
        else:
            eps = module.eps if module is not None else node_arg(n.args, n.kwargs, 3, "eps")
            node = b.call(rms_finish, (loc.node, merged, sum(count.values()), eps, *consts))
    elif kind == "normalize":
        node = b.call(normalize_finish, (loc.node, merged, float(node_arg(n.args, n.kwargs, 3, "eps", 1e-12))))
    else:
        node = b.call(softmax_finish, (loc.node, merged, kind))
    b.hold(n, node, loc.units)


# ---------------------------------------------------------------- GroupNorm

def group_partial_stats(x: torch.Tensor, assign: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(batch, groups, 2): the mean and M2 over this node's channels of each group and all positions; `assign`
    (local channels, groups) is one-hot, `counts` the elements per group here (groups without any: 0, 0)."""
    sums = x.flatten(2).sum(-1) @ assign
    mean = sums / counts.clamp_min(1)
    centred = x - (mean @ assign.t()).reshape(x.shape[:2] + (1,) * (x.dim() - 2))
    return torch.stack([mean, (centred ** 2).flatten(2).sum(-1) @ assign], -1)


def group_normalised(x: torch.Tensor, stats: torch.Tensor, assign: torch.Tensor, eps: float, weight, bias):
    """GroupNorm of node j's channels from its groups' merged (mean, var), with the affine of its channels."""
    shape = x.shape[:2] + (1,) * (x.dim() - 2)
    mean, var = ((stats[..., k] @ assign.t()).reshape(shape) for k in (0, 1))
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape((-1,) + (1,) * (x.dim() - 2))
    return y + bias.reshape((-1,) + (1,) * (x.dim() - 2)) if bias is not None else y


def _group_affine(b, n: fx.Node, module, units: torch.Tensor) -> tuple:
    eps = module.eps if module is not None else node_arg(n.args, n.kwargs, 4, "eps", 1e-5)
    out = [float(eps)]
    for k, name in ((2, "weight"), (3, "bias")):
        t = getattr(module, name) if module is not None else b.concrete_tensor(node_arg(n.args, n.kwargs, k, name))
        out.append(None if t is None else b.const(f"{n.name}_{name}", t.detach()[units]))
    return tuple(out)


def _split_group_norm(b, n: fx.Node, module) -> None:
    """GroupNorm whose groups straddle nodes: per-group partial (mean, M2) merged between the holders."""
    x = n.all_input_nodes[0]
    lay, loc = b.low.layout(x), b.env[x.name]
    holders = [k for k in range(b.low.nodes) if lay.owned(k).numel()]
    if b.j not in holders:
        b.env[n.name] = Local(None, loc.units)
        return
    groups = _groups(n, module)
    per_group, positions = lay.units // groups, int(torch.tensor(lay.shape[2:]).prod())
    one_hot = torch.eye(groups, dtype=lay.dtype)

    def assign(units: torch.Tensor) -> torch.Tensor:
        return one_hot[units // per_group]
    shapes = {k: (1, groups, 2) for k in holders}
    counts = {k: b.const(f"{n.name}_count", assign(lay.owned(k)).sum(0) * positions) for k in holders}
    mine = b.const(f"{n.name}_groups", assign(loc.units))
    own = b.call(group_partial_stats, (loc.node, mine, counts[b.j]), shape=shapes[b.j], dtype=lay.dtype)
    parts = _exchange(b, n, {b.j: own}, shapes, holders, holders, lay.dtype)
    merged = b.call(merge_mean_var, (parts, [counts[k] for k in sorted(counts)]), shape=shapes[b.j],
                    dtype=lay.dtype)
    node = b.call(group_normalised, (loc.node, merged, mine, *_group_affine(b, n, module, loc.units)))
    b.hold(n, node, loc.units)


def _local_group_norm(b, n: fx.Node, module) -> None:
    """GroupNorm whose groups each lie whole on one node (rule: tied): the node's groups alone."""
    x = n.all_input_nodes[0]
    loc = b.env[x.name]
    if loc.node is None or loc.units is None:
        return run_local(b, n, module)
    lay = b.low.layout(x)
    units = torch.sort(loc.units).values
    per_group = lay.units // _groups(n, module)
    if units.numel() % per_group or bool((units.reshape(-1, per_group) % per_group
                                          != torch.arange(per_group)).any()):
        raise LoweringError(f"'{n.name}': node {b.j} holds part of a GroupNorm group")
    eps, weight, bias = _group_affine(b, n, module, units)
    node = b.call(F.group_norm, (b.aligned(x, units), units.numel() // per_group, weight, bias, eps))
    b.hold(n, node, units)


def max_partial(x: torch.Tensor, units: torch.Tensor, axis: int) -> torch.Tensor:
    """(values, global index) of this node's maxima along `axis`, stacked on a new last dim."""
    values, local = x.max(axis, keepdim=True)
    index = torch.gather(units.reshape([-1 if d == axis else 1 for d in range(x.dim())]).expand_as(x), axis, local)
    return torch.stack([values, index.to(values.dtype)], -1)


def max_merge(parts: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(parts)
    best = stacked[..., 0].amax(0)
    first = torch.where(stacked[..., 0] == best, stacked[..., 1], torch.inf).amin(0)
    return torch.stack([best, first], -1)


def max_finish(merged: torch.Tensor, axis: int, keepdim: bool):
    values, indices = merged[..., 0], merged[..., 1].to(torch.int64)
    return (values, indices) if keepdim else (values.squeeze(axis), indices.squeeze(axis))


def _split_max(b, n: fx.Node) -> None:
    """torch.max(x, dim) over the split channels: every node merges every holder's (maximum, index)."""
    x = n.all_input_nodes[0]
    lay, loc = b.low.layout(x), b.env[x.name]
    holders = [k for k in range(b.low.nodes) if lay.owned(k).numel()]
    shape = tuple(1 if d == lay.axis else s for d, s in enumerate(lay.shape)) + (2,)
    shapes = {k: shape for k in holders}
    own = {}
    if b.j in holders:
        units = b.const(f"{n.name}_units", loc.units.to(lay.dtype))
        own[b.j] = b.call(max_partial, (loc.node, units, lay.axis), shape=shape, dtype=lay.dtype)
    parts = _exchange(b, n, own, shapes, holders, list(range(b.low.nodes)), lay.dtype)
    merged = b.call(max_merge, (parts,), shape=shape, dtype=lay.dtype)
    keepdim = bool(node_arg(n.args, n.kwargs, 2, "keepdim", False))
    b.env[n.name] = Local(b.call(max_finish, (merged, lay.axis, keepdim)))


@STATISTICS.lowers
def lower(b, n: fx.Node, module, op) -> None:
    kind = op.data["kind"]
    if kind == "max" and not is_tensor_meta(n.meta.get("tensor_meta")):
        return _split_max(b, n)
    kind = "amax" if kind == "max" else kind
    split = n.name in b.low.stats
    x = n.all_input_nodes[0]
    if split and bool((b.low.layout(x).owner == REPLICATED).any()):
        raise LoweringError(f"'{n.name}': statistics over channels that are partly replicated; not lowered yet")
    if kind == "group_norm":
        return (_split_group_norm if split else _local_group_norm)(b, n, module)
    if split:
        return _split_statistics(b, n, module, kind)
    run_local(b, n, module, per_channel=False)  # over dims that hold no split channels: parameters act there
