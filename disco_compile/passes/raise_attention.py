"""Raise attention: every attention core of a graph, in whichever form it is written, becomes the per-head ops
of ops/attention.py, so that heads split across nodes and nothing in attention is replicated.

Forms matched (torch.fx graphs and torch.export programs alike):

    F.scaled_dot_product_attention(q, k, v, attn_mask, scale)        (timm with fused_attn, HF "sdpa", programs)
    s = q @ kt;  ... (scale, bias, mask, softmax: the model's own ops) ...;  o = a @ v    (the written-out form)
    o^T = vt @ a.transpose(-2, -1)                                   (CoAtNet's channels-first matmul form)

where q, k, v are (batch, H, tokens, d) and kt is k transposed, (batch, H, d, tokens). A heads layout puts
channels along two dims apart (reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4) even puts them along three and
the batch at dim 1), which the lowering cannot hold; the pass takes them out of the graph:

    operand   q, kt or v is reached from one node S, channels-last (batch, tokens, C) or (tokens, batch, C)
              or channels-first (batch, C, *spatial) as a 1x1 conv's output (CoAtNet's Attention2d; S then
              reads as S.flatten(2).transpose(1, 2)),
              through data movement alone (reshape, permute, transpose, unbind, split, nn.Identity),
              multiplications by a number (a scale on q) and normalisations over the last dim whose rows are
              the operand's heads (F.normalize, F.layer_norm, nn.LayerNorm, nn.RMSNorm: Swin V2's cosine
              attention, qk-norm). Running that chain on element ids of S shows which channels of S, in which
              order, form q's heads side by side (H*d channels): if the result is such a channel gather of S
              (positions unchanged, or S seq-first), q becomes S[..., index] (times the numbers, each norm
              its per-head op of ops/attention.py, in the chain's order), channels-last; reshaped to (batch,
              tokens, H*d) where S holds the same positions in other dims (GPT-2's Conv1D projects
              x.view(-1, C): S is (batch * tokens, C)).
    core      q @ kt becomes head_scores(q, k, H) (same value, heads along dim 1); a @ v becomes
              heads_apply(a, v, H); the attention call becomes heads_attention(q, k, v, H, scale), or with a
              mask head_scores -> * scale -> + mask (masked_fill for a bool mask) -> softmax -> heads_apply;
              is_causal=True is the bool mask tril(ones(tokens_q, tokens_k)) (SDPA's own definition), a buffer
              of the module.
    end       the output o (batch, H, tokens, d) is followed, through data movement with one user each, to the
              first node T that the same id run shows to be a channel gather of the canonical output
              (transpose(1, 2).reshape(B, N, C) in every form seen), or channels-first, (batch, C, *spatial)
              back for a conv; T's uses take the core's output (gathered, and reshaped where T folds batch
              and tokens together; transposed to channels first and reshaped for a channels-first T).

Every step is decided on element ids, so a rewrite computes exactly what the graph computed; whatever does
not fit (a chain through an op that is neither data movement nor per head, such as rotary embeddings,
grouped-query attention, dropout) declines and that call stays as written: replicated on every node,
named in the cost report. Nothing here raises for a graph it does not understand. timm's mask helpers, traced
as leaves, are folded away first where no mask is given. Called on every traced graph (model.py) and on raised
torch.export programs (frontend/exported.py).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import registry
from ..ops.attention import (HeadsRegion, head_covariance, head_scores, heads_apply, heads_attention, heads_layer_norm,
                             heads_mix, heads_normalize, heads_rms_norm)
from ..ops.movement import MOVEMENT
from .head_regions import Region, find_region

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_ATTENTION_CALLS = (SDPA, F.scaled_dot_product_attention)
_MATMULS = (operator.matmul, torch.matmul, "matmul", torch.ops.aten.matmul.default)
_SCALARS = (operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div")
_IDENTITIES = ("contiguous", "clone")
_TRANSPOSES = ("transpose", torch.transpose, torch.ops.aten.transpose.int)


class _Values(fx.Interpreter):
    """Runs the module and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        self.values[n] = super().run_node(n)
        return self.values[n]


def _tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list)) and len(value) > 0
                                               and all(isinstance(v, torch.Tensor) for v in value))


@dataclass(frozen=True)
class _Step:
    node: fx.Node
    data: fx.Node  # the one tensor input
    kind: str  # "move": data movement (run on ids), "same": an identity, "scalar": times a number, "norm": a
    # normalisation over the last dim, "region": ops head by head (head_regions.py; ids pass unchanged)
    norm: tuple | None = None  # for "norm": _head_norm's (per-head op, its arguments)
    region: Region | None = None


def _step(gm: fx.GraphModule, n: fx.Node, values: dict) -> _Step | None:
    """n as a step of an operand chain, or None."""
    if n.op not in ("call_function", "call_method", "call_module"):
        return None
    data = [a for a in n.all_input_nodes if _tensors(values.get(a))]
    if len(data) != 1 or not _tensors(values.get(n)):
        return None
    module = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(module, nn.Identity) or n.target in _IDENTITIES:
        return _Step(n, data[0], "same")
    if _times_number(n, data[0]):
        return _Step(n, data[0], "scalar")
    if (norm := _head_norm(n, module, values[data[0]])) is not None:
        return _Step(n, data[0], "norm", norm)
    op = registry.lookup(n, module)
    return _Step(n, data[0], "move") if op is not None and op.family is MOVEMENT else None


def _times_number(n: fx.Node, data: fx.Node) -> bool:
    """n is data * number, number * data or data / number."""
    if n.target not in _SCALARS or len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    if a is data and isinstance(b, (int, float)):
        return True
    return n.target in (operator.mul, torch.mul) and b is data and isinstance(a, (int, float))


def _head_norm(n: fx.Node, module: nn.Module | None, x: torch.Tensor) -> tuple | None:
    """(per-head op, its arguments after the head width: a parameter's name for get_attr) if n normalises its
    input x over the last dim alone: F.normalize(x, p, dim=-1, eps), F.layer_norm(x, (d,), weight, bias, eps)
    (all given), or an nn.LayerNorm / nn.RMSNorm of x's last dim."""
    if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == x.shape[-1:]:
        return heads_layer_norm, (f"{n.target}.weight" if module.weight is not None else None,
                                  f"{n.target}.bias" if module.bias is not None else None, module.eps)
    if isinstance(module, nn.RMSNorm) and tuple(module.normalized_shape) == x.shape[-1:]:
        return heads_rms_norm, (f"{n.target}.weight" if module.weight is not None else None, module.eps)
    if n.target is F.layer_norm and not n.kwargs and len(n.args) == 5 and tuple(n.args[1]) == x.shape[-1:]:
        return heads_layer_norm, tuple(n.args[2:])
    if n.target is not F.normalize or len(n.args) > 1:
        return None
    given = {"p": 2.0, "dim": 1, "eps": 1e-12} | dict(n.kwargs)
    if set(given) - {"p", "dim", "eps", "out"} or given.get("out") is not None or given["dim"] % x.dim() != x.dim() - 1:
        return None
    return heads_normalize, (given["p"], given["eps"])


def _run_ids(gm: fx.GraphModule, steps: list[_Step], start: fx.Node, ids: torch.Tensor, values: dict):
    """The steps (in graph order) run on element ids given for `start`; None if an op refuses them."""
    env = {start: ids}
    for s in steps:
        if s.kind != "move":
            env[s.node] = env[s.data]
            continue
        module = gm.get_submodule(s.node.target) if s.node.op == "call_module" else None
        args, kwargs = fx.node.map_arg((s.node.args, s.node.kwargs), lambda a: env[a] if a in env else values[a])
        try:
            env[s.node] = registry.call_like(s.node, module, args, kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return None
    return env


def _gather_index(ids: torch.Tensor, base: torch.Tensor, channels: int) -> list[int] | None:
    """If ids[..., c] == base[..., index[c]] at every position (base: element ids of a tensor with `channels`
    channels in its last dim, positions in the order wanted), that index."""
    if ids.dim() < 1 or base.numel() // channels != ids.numel() // max(ids.shape[-1], 1):
        return None
    rows, base_rows = ids.reshape(-1, ids.shape[-1]), base.reshape(-1, channels)
    if not torch.equal(rows // channels, (base_rows[:, :1] // channels).expand_as(rows)):
        return None
    index = rows[0] % channels
    return index.tolist() if torch.equal(rows % channels, index.expand_as(rows)) else None


@dataclass(frozen=True)
class _Operand:
    source: fx.Node
    index: list[int]
    batch_first: bool
    post: tuple[tuple[_Step, str], ...]  # its numbers and norms, in graph order, each with its form (_norm_form)
    positions: tuple[int, int] | None  # (batch, tokens) or (tokens, batch) to reshape S[..., index] to, if S differs
    channels_first: bool = False  # S is (batch, C, *spatial): the operand gathers S.flatten(2).transpose(1, 2)


def _channels_last_ids(shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Element ids of a (batch, C, *spatial) tensor numbered as its channels-last view (batch, positions, C)
    numbers them (id = (b * positions + p) * C + c): (the ids in the tensor's shape, the channels-last view)."""
    view = torch.arange(shape.numel()).reshape(shape[0], -1, shape[1])
    return view.transpose(1, 2).reshape(shape), view


def _region_step(gm: fx.GraphModule, x: fx.Node, values: dict) -> _Step | None:
    region = find_region(gm, x, values)
    return None if region is None else _Step(x, region.input, "region", region=region)


def _chain(gm: fx.GraphModule, x: fx.Node, values: dict, regions: bool) -> tuple[list[_Step], fx.Node]:
    """The steps from x back to the node they start from (regions: also through per-head regions)."""
    steps, n = [], x
    while (s := _step(gm, n, values)) is not None or (regions and (s := _region_step(gm, n, values)) is not None):
        steps.append(s)
        n = s.data
    return steps, n


def _operand(gm: fx.GraphModule, x: fx.Node, values: dict, transposed: bool) -> _Operand | None:
    """q, v (batch, H, tokens, d) or, transposed, kt (batch, H, d, tokens) as a channel gather of one node;
    through per-head regions where the plain chain is none."""
    plain = _gathered(gm, x, values, transposed, *_chain(gm, x, values, False))
    return plain if plain is not None else _gathered(gm, x, values, transposed, *_chain(gm, x, values, True))


def _gathered(gm: fx.GraphModule, x: fx.Node, values: dict, transposed: bool, steps: list[_Step],
              n: fx.Node) -> _Operand | None:
    value, source = values.get(x), values.get(n)
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or not isinstance(source, torch.Tensor) \
            or source.dim() < 2 or source.is_complex():
        return None
    lead = (value.shape[0], value.shape[3 if transposed else 2])
    post = tuple(s for s in steps[::-1] if s.kind in ("scalar", "norm", "region"))
    sources = [(False, torch.arange(source.numel()).reshape(source.shape), None)]
    if source.dim() >= 3:  # or channels-first (batch, C, *spatial), as a 1x1 conv's output (CoAtNet)
        sources.append((True, *_channels_last_ids(source.shape)))
    for channels_first, start, base in sources:
        env = _run_ids(gm, steps[::-1], n, start, values)
        if env is None:
            continue
        ids = env[x].permute(0, 3, 1, 2) if transposed else env[x].transpose(1, 2)  # (batch, tokens, H, d)
        ids = ids.flatten(2)
        base = env[n] if base is None else base
        layouts = [(True, ids)] + ([(False, ids.transpose(0, 1))] if source.dim() == 3 and not channels_first
                                   else [])
        for batch_first, wanted in layouts:  # q_c = S[..., index], S batch first or seq first
            index = _gather_index(wanted, base, base.shape[-1])
            forms = None if index is None else [_norm_form(s, env, index, base, batch_first) for s in post]
            if forms is not None and None not in forms:
                positions = lead if batch_first else lead[::-1]
                return _Operand(n, index, batch_first, tuple(zip(post, forms, strict=True)),
                                None if tuple(base.shape[:-1]) == positions else positions, channels_first)
    return None


def _norm_form(s: _Step, env: dict, index: list[int], base: torch.Tensor, batch_first: bool) -> str | None:
    """How a step of an operand chain acts on the gathered operand, from the element ids of its input: "scalar";
    "heads" for a norm whose rows (its input's last dim) are each one head of the operand, a head being `width`
    consecutive channels of `index`, in that order; "tokens" for an F.normalize whose rows are one channel
    of one batch element over every token in order (XCA's q and k), base (batch, tokens, C); else None."""
    if s.kind == "scalar":
        return "scalar"
    channels, ids = base.shape[-1], env[s.data]
    if s.kind == "region":  # batch first, heads side by side in the operand's order
        return "region" if batch_first and _gather_index(ids.transpose(1, 2).flatten(2), base, channels) == index \
            else None
    width = ids.shape[-1]
    rows = ids.reshape(-1, width)
    if len(index) % width == 0:
        heads = torch.tensor(index).reshape(-1, width)
        if bool(((rows % channels)[:, None, :] == heads[None]).all(-1).any(-1).all()):
            return "heads"
    if s.node.target is F.normalize and batch_first and base.dim() == 3 and width == base.shape[1]:
        positions, tokens = rows // channels, torch.arange(width)
        if torch.equal(rows % channels, (rows[:, :1] % channels).expand_as(rows)) \
                and torch.equal(positions % width, tokens.expand_as(rows)) \
                and torch.equal(positions // width, (positions[:, :1] // width).expand_as(rows)):
            return "tokens"
    return None


@dataclass(frozen=True)
class _End:
    node: fx.Node  # T
    index: list[int]
    reshape: bool  # T folds positions other than the canonical output's
    shape: tuple[int, ...]  # T's shape
    channels_first: bool = False  # T is (batch, C, *spatial): the canonical output transposed and reshaped


def _end(gm: fx.GraphModule, o: fx.Node, values: dict, batch_first: bool, transposed: bool = False) -> _End | None:
    """The first node after o (batch, H, tokens, d), or transposed (batch, H, d, tokens), through data movement
    with one user each, that is a channel gather of the canonical output (module docstring)."""
    batch, heads, tokens, width = values[o].shape
    if transposed:
        tokens, width = width, tokens
    canonical = torch.arange(values[o].numel()).reshape(*((batch, tokens) if batch_first else (tokens, batch)), -1)
    ids = (canonical if batch_first else canonical.transpose(0, 1)).unflatten(-1, (heads, width)).transpose(1, 2)
    if transposed:
        ids = ids.transpose(2, 3)
    steps, n = [], o
    while len(n.users) == 1:
        (user,) = n.users
        s = _step(gm, user, values)
        if s is None or s.data is not n or isinstance(values[user], (tuple, list)):
            return None
        steps.append(s)
        env = _run_ids(gm, steps, o, ids, values)
        if env is None:
            return None
        got = env[user]
        if got.dim() >= 2 and got.numel() and (index := _gather_index(got, canonical, heads * width)) is not None:
            return _End(user, index, got.shape[:-1] != canonical.shape[:-1], tuple(values[user].shape))
        if batch_first and got.dim() >= 3 and got.numel() and (index := _gather_index(
                got.flatten(2).transpose(1, 2), canonical, heads * width)) is not None:
            return _End(user, index, True, tuple(values[user].shape), channels_first=True)
        n = user
    return None


@dataclass(frozen=True)
class _Core:
    node: fx.Node  # the attention call, or the matmul
    kind: str  # "sdpa", "scores", "covariance", "apply", "mix"
    operands: tuple[_Operand, ...]
    heads: int
    end: _End | None
    probs: fx.Node | None = None  # for "apply" written vt @ a^T: a (else the matmul's first argument)


def _plain_call(n: fx.Node) -> dict | None:
    """The mask, causal flag and scale of an attention call with no dropout or grouped-query heads."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = dict(zip(names, n.args[3:], strict=False)) | dict(n.kwargs)
    if len(n.args) < 3 or set(given) - set(names) or given.get("dropout_p", 0.0) != 0.0 \
            or given.get("enable_gqa", False) or not isinstance(given.get("is_causal", False), bool) \
            or (given.get("is_causal", False) and given.get("attn_mask") is not None):  # SDPA refuses both
        return None
    return given


def _agree(operands) -> bool:
    return all(x is not None for x in operands) and len({x.batch_first for x in operands}) == 1


def _core(gm: fx.GraphModule, n: fx.Node, values: dict) -> _Core | None:
    if n.op not in ("call_function", "call_method") or len(n.args) < 2 or not all(
            isinstance(values.get(a), torch.Tensor) and values[a].dim() == 4 for a in n.args[:2]):
        return None
    if n.target in _ATTENTION_CALLS:
        if _plain_call(n) is None or not isinstance(values.get(n.args[2]), torch.Tensor):
            return None
        q, k, v = (values[a] for a in n.args[:3])
        operands = tuple(_operand(gm, a, values, False) for a in n.args[:3])
        if not _agree(operands) or k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
            return None
        end = _end(gm, n, values, operands[0].batch_first)
        return None if end is None else _Core(n, "sdpa", operands, q.shape[1], end)
    return _matmul_core(gm, n, values) if n.target in _MATMULS else None


def _matmul_core(gm: fx.GraphModule, n: fx.Node, values: dict) -> _Core | None:
    """A product of the written-out form: scores q @ kt (or XCA's qt @ k), or weights applied to v (a @ v,
    CoAtNet's vt @ a^T, XCA's a @ vt), each followed to its end."""
    a, b = (values[x] for x in n.args[:2])
    for kind, transposed in (("scores", (False, True)), ("covariance", (True, False))):  # covariance: XCA's
        operands = tuple(_operand(gm, x, values, t) for x, t in zip(n.args[:2], transposed, strict=True))
        if _agree(operands) and a.shape[1] == b.shape[1]:
            return _Core(n, kind, operands, a.shape[1], None)
    v = _operand(gm, n.args[1], values, False)
    end = None if v is None else _end(gm, n, values, v.batch_first)
    if end is not None:
        return _Core(n, "apply", (v,), b.shape[1], end)
    probs = _transposed_last(n.args[1], values)  # vt @ a^T = (a @ v)^T, CoAtNet's matmul form
    vt = None if probs is None else _operand(gm, n.args[0], values, True)
    end = None if vt is None else _end(gm, n, values, vt.batch_first, transposed=True)
    if end is not None:
        return _Core(n, "apply", (vt,), a.shape[1], end, probs)
    vt = _operand(gm, n.args[1], values, True)  # a @ vt = (v a^T)^T, XCA's
    end = None if vt is None else _end(gm, n, values, vt.batch_first, transposed=True)
    return None if end is None else _Core(n, "mix", (vt,), b.shape[1], end)


def _transposed_last(n: object, values: dict) -> fx.Node | None:
    """x if n is x (4-D) with its last two dims swapped, else None."""
    if not isinstance(n, fx.Node) or n.target not in _TRANSPOSES or len(n.args) != 3 or n.kwargs:
        return None
    x, *dims = n.args
    rank = values[x].dim() if isinstance(values.get(x), torch.Tensor) else 0
    return x if rank == 4 and sorted(d % rank for d in dims) == [2, 3] else None


def _canonical(gm: fx.GraphModule, x: _Operand, channels: int, values: dict) -> fx.Node:
    """x's source gathered to the operand's heads side by side, times its numbers, each head normalised."""
    g = gm.graph
    index, node = x.index, x.source
    if x.channels_first:
        node = g.call_method("transpose", (g.call_method("flatten", (node, 2)), 1, 2))
    if index != list(range(channels)):
        whole = index == list(range(index[0], index[0] + len(index)))
        index = slice(index[0], index[-1] + 1) if whole else index
        node = g.call_function(operator.getitem, (node, (Ellipsis, index)))
    if x.positions is not None:  # rows folded with the batch: -1 there, so any batch runs (not the example's)
        rows = (-1, x.positions[1]) if x.batch_first else (x.positions[0], -1)
        node = g.call_method("reshape", (node, (*rows, len(x.index))))
    for s, form in x.post:
        if form == "tokens":  # batch first: the tokens are dim 1
            node = g.call_function(F.normalize, (node,), {**s.node.kwargs, "dim": 1})
            continue
        if form == "region":
            name = next(f"heads_region_{k}" for k in range(len(gm.graph.nodes)) if not hasattr(gm, f"heads_region_{k}"))
            gm.add_submodule(name, HeadsRegion(s.region.module, values[s.data].shape[-1]))
            node = g.call_module(name, (node, *s.region.tables))
            continue
        if form == "heads":
            fn, rest = s.norm
            rest = tuple(g.get_attr(a) if isinstance(a, str) else a for a in rest)  # a node: defined before the core
            node = g.call_function(fn, (node, values[s.data].shape[-1], *rest))
            continue
        a, b = s.node.args
        args = (node, b) if isinstance(a, fx.Node) else (a, node)
        node = g.call_method(s.node.target, args) if s.node.op == "call_method" else g.call_function(s.node.target,
                                                                                                      args)
    return node


def _causal_mask(gm: fx.GraphModule, tokens_q: int, tokens_k: int) -> fx.Node:
    """is_causal as SDPA defines it: query i attends to keys j <= i, tril(ones(tokens_q, tokens_k))."""
    name = f"causal_mask_{tokens_q}_{tokens_k}"
    if not hasattr(gm, name):
        gm.register_buffer(name, torch.ones(tokens_q, tokens_k, dtype=torch.bool).tril())
    return gm.graph.get_attr(name)


def _attention(gm: fx.GraphModule, core: _Core, qkv: list[fx.Node], values: dict) -> fx.Node:
    g = gm.graph
    given = _plain_call(core.node)
    mask, scale, causal = given.get("attn_mask"), given.get("scale"), given.get("is_causal", False)
    batch_first = core.operands[0].batch_first
    q, k = (values[a] for a in core.node.args[:2])
    if causal:
        mask = _causal_mask(gm, q.shape[-2], k.shape[-2])
    if mask is None:
        extra = {} if scale is None else {"scale": scale}
        return g.call_function(heads_attention, (*qkv, core.heads, batch_first), extra)
    scores = g.call_function(head_scores, (*qkv[:2], core.heads, batch_first))
    scores = g.call_function(operator.mul, (scores, scale or 1 / math.sqrt(q.shape[-1])))
    if causal or values[mask].dtype == torch.bool:
        scores = g.call_method("masked_fill", (scores, g.call_method("logical_not", (mask,)), -math.inf))
    else:
        scores = g.call_function(operator.add, (scores, mask))
    return g.call_function(heads_apply, (g.call_method("softmax", (scores, -1)), qkv[2], core.heads, batch_first))


def _rewrite(gm: fx.GraphModule, core: _Core, values: dict) -> None:
    g = gm.graph
    n = core.node
    with g.inserting_before(n):
        qkv = [_canonical(gm, x, values[x.source].shape[1 if x.channels_first else -1], values)
               for x in core.operands]
        if core.kind in ("scores", "covariance"):
            fn = head_scores if core.kind == "scores" else head_covariance
            out = g.call_function(fn, (*qkv, core.heads, core.operands[0].batch_first))
        elif core.kind == "apply":
            probs = n.args[0] if core.probs is None else core.probs
            out = g.call_function(heads_apply, (probs, qkv[0], core.heads, core.operands[0].batch_first))
        elif core.kind == "mix":
            out = g.call_function(heads_mix, (n.args[0], qkv[0], core.heads, core.operands[0].batch_first))
        else:
            out = _attention(gm, core, qkv, values)
    if core.end is None:
        n.replace_all_uses_with(out)
        return
    end = core.end
    with g.inserting_before(next(iter(end.node.users)) if end.node.users else end.node.next):
        if end.index != list(range(len(end.index))) or len(end.index) != values[n].shape[1] * values[n].shape[3]:
            out = g.call_function(operator.getitem, (out, (Ellipsis, end.index)))
        if end.channels_first:
            out = g.call_method("transpose", (out, 1, 2))
        if end.reshape:
            out = g.call_method("reshape", (out, (-1, *end.shape[1:])))
    end.node.replace_all_uses_with(out)


def _timm_mask_helpers() -> tuple:
    try:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
    except ImportError:  # timm is optional
        return None, None
    return maybe_add_mask, resolve_self_attn_mask


def _fold_absent_masks(gm: fx.GraphModule) -> None:
    """timm's traced-as-leaf mask helpers when no mask is given: resolve_self_attn_mask(n, attn, None, False)
    is None, and maybe_add_mask(scores, None) is scores (their source: timm/layers/attention.py)."""
    add, resolve = _timm_mask_helpers()
    if add is None:
        return
    for n in list(gm.graph.nodes):
        if n.target is resolve and len(n.args) == 4 and n.args[2] is None and n.args[3] is False and not n.kwargs:
            for user in list(n.users):
                user.replace_input_with(n, None)
            gm.graph.erase_node(n)
        elif n.target is add and len(n.args) == 2 and n.args[1] is None and not n.kwargs:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)


def raise_attention(gm: fx.GraphModule, inputs: tuple) -> int:
    """Rewrite, in place, the attention cores of `gm` that fit (module docstring); returns how many."""
    _fold_absent_masks(gm)
    candidates = [n for n in gm.graph.nodes if n.target in _ATTENTION_CALLS or n.target in _MATMULS]
    if not candidates:
        gm.recompile()
        return 0
    values = _Values(gm)
    with torch.no_grad():
        values.run(*inputs)
    cores = [c for n in candidates if (c := _core(gm, n, values.values)) is not None]
    for core in cores:
        _rewrite(gm, core, values.values)
    gm.graph.eliminate_dead_code()
    for core in cores:  # an attention call is a seeded op that dead-code elimination keeps
        if core.node in gm.graph.nodes and not core.node.users:
            gm.graph.erase_node(core.node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return len(cores)
