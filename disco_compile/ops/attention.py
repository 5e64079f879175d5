"""Multi-head self-attention as ops the channel analysis can split by heads.

Attention computes, on q, k and v of H*d channels (E = H*d; v may have another head width),

    o_h = softmax(s * q_h k_h^T + B_h + M) v_h        per head h, q_h = q[..., h*d:(h+1)*d]
    y = o W_out^T + b_out                             o = [o_0, ..., o_{H-1}], the out_proj

with s the scale (1/sqrt(d) by default), B_h a per-head bias (relative position) and M a mask. Channel c of
head h's output mixes value channel c over tokens, with weights that depend on q_h and k_h alone. Once the
channels (q_h, k_h, v_h) of every head live on one node, that node computes o_h with no communication: the
projections are ordinary channel-mixing layers (exchanges before them), and the ops here are the per-head
cores, run by each node on the heads it owns. q, k and v are channels-last tensors, (batch, tokens, E), or
(tokens, batch, E) if not batch_first:

    heads_attention(q, k, v, H, batch_first, scale)   the whole core, no bias or mask (o, channels-last)
    head_scores(q, k, H, batch_first)                 q_h k_h^T: (batch, H, tokens_q, tokens_k), one head per
                                                      index of dim 1; scale, bias, mask and softmax stay the
                                                      model's own ops on it
    heads_apply(a, v, H, batch_first)                 a_h v_h for weights a of that layout (o, channels-last)
    head_covariance(q, k, H, batch_first)             q_h^T k_h over the tokens, (batch, H, d, d), and
    heads_mix(a, v, H, batch_first)                   v_h a_h^T: XCA's attention over channels (EdgeNeXt, XCiT)
    heads_normalize(x, d, p, eps)                     each head's d channels normalised over themselves, as
    heads_layer_norm(x, d, weight, bias, eps)         F.normalize, F.layer_norm and F.rms_norm over the last
    heads_rms_norm(x, d, weight, eps)                 dim of (batch, H, tokens, d) (cosine attention, qk-norm);
                                                      weight and bias (d,) are every head's
    HeadsRegion(region, d)(x, *tables)                any ops checked to act head by head (rotary embeddings)

passes/expand_attention.py rewrites nn.MultiheadAttention into these ops, passes/raise_attention.py every
attention written with F.scaled_dot_product_attention or as q @ k^T ... @ v.

Rules: the channels (q_h, k_h, v_h) of every head are tied to one node; heads_attention's and heads_apply's
output channels are v's, the per-head norms' their input's (each head's channels tied); head_scores labels
head h of its output with a channel of q_h (tied to the head), so the ops after it (scale, bias, mask, softmax
along the tokens) pass that along dim 1.
Lowering: node j runs the core on the whole heads it owns, with q, k and v aligned to one unit order, and the
scores and per-head tensors (a bias along dim -3) cut to those heads.
nn.MultiheadAttention calls that expand_attention left opaque are replicated, with the reason.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..backend.program import Local, LoweringError
from ..ir import channel_dims
from .registry import Fallback, Family, RuleContext

ATTENTION = Family("attention")


def _split_heads(t: torch.Tensor, num_heads: int, batch_first: bool) -> torch.Tensor:
    """(batch, tokens, H*d), or (tokens, batch, H*d) if not batch_first -> (batch, H, tokens, d)."""
    return (t if batch_first else t.transpose(0, 1)).unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _merge_heads(o: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(batch, H, tokens, d) -> (batch, tokens, H*d), or (tokens, batch, H*d) if not batch_first."""
    o = o.transpose(1, 2).flatten(-2)
    return o if batch_first else o.transpose(0, 1)


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    batch_first: bool, scale: float | None = None) -> torch.Tensor:
    """o_h = softmax(s q_h k_h^T) v_h for each of `num_heads` heads of d channels, the heads side by side in
    the last dim, s = `scale` or 1/sqrt(d); tensors (batch, tokens, H*d), or (tokens, batch, H*d) if not
    batch_first."""
    q, k, v = (_split_heads(t, num_heads, batch_first) for t in (q, k, v))
    return _merge_heads(F.scaled_dot_product_attention(q, k, v, scale=scale), batch_first)


def head_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int, batch_first: bool) -> torch.Tensor:
    """q_h k_h^T for each head: (batch, H, tokens_q, tokens_k)."""
    return _split_heads(q, num_heads, batch_first) @ _split_heads(k, num_heads, batch_first).transpose(-2, -1)


def heads_apply(weights: torch.Tensor, v: torch.Tensor, num_heads: int, batch_first: bool) -> torch.Tensor:
    """a_h v_h for attention weights (batch, H, tokens_q, tokens_k): (batch, tokens_q, H*d_v), or seq-first."""
    return _merge_heads(weights @ _split_heads(v, num_heads, batch_first), batch_first)


def head_covariance(q: torch.Tensor, k: torch.Tensor, num_heads: int, batch_first: bool) -> torch.Tensor:
    """q_h^T k_h for each head, summed over the tokens: (batch, H, d, d) (XCA's cross-covariance attention)."""
    return _split_heads(q, num_heads, batch_first).transpose(-2, -1) @ _split_heads(k, num_heads, batch_first)


def heads_mix(weights: torch.Tensor, v: torch.Tensor, num_heads: int, batch_first: bool) -> torch.Tensor:
    """v_h a_h^T for weights (batch, H, d, d): each head's channels mixed by its weights (XCA), (batch, tokens,
    H*d), or seq-first."""
    return _merge_heads(_split_heads(v, num_heads, batch_first) @ weights.transpose(-2, -1), batch_first)


def heads_normalize(x: torch.Tensor, width: int, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize over each head's `width` channels (heads side by side in the last dim)."""
    return F.normalize(x.unflatten(-1, (-1, width)), p=p, dim=-1, eps=eps).flatten(-2)


def heads_layer_norm(x: torch.Tensor, width: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """F.layer_norm over each head's `width` channels, with one (width,) weight and bias for every head."""
    return F.layer_norm(x.unflatten(-1, (-1, width)), (width,), weight, bias, eps).flatten(-2)


def heads_rms_norm(x: torch.Tensor, width: int, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """F.rms_norm over each head's `width` channels, with one (width,) weight for every head."""
    return F.rms_norm(x.unflatten(-1, (-1, width)), (width,), weight, eps).flatten(-2)


HEAD_NORMS = (heads_normalize, heads_layer_norm, heads_rms_norm)


class HeadsRegion(nn.Module):
    """Ops a model runs on q or k head by head (rotary embeddings, the prefix tokens they skip): `region`, a graph
    module from (batch, H, tokens, d) to that shape whose ops act on each head alone (passes/raise_attention.py
    checks that on the example), run on heads side by side in the last dim, (batch, tokens, H*d); its other
    inputs are tables broadcast over the heads (the sines and cosines), computed whole on every node."""

    def __init__(self, region: fx.GraphModule, width: int):
        super().__init__()
        self.region, self.width = region, width

    def forward(self, x: torch.Tensor, *tables: torch.Tensor) -> torch.Tensor:
        # sizes read off x, not unflatten: torch.onnx folds the region's shape reads after an unflatten to the
        # example's batch
        heads = x.reshape(x.shape[0], x.shape[1], -1, self.width).transpose(1, 2)
        return self.region(heads, *tables).transpose(1, 2).flatten(-2)

_FORWARD_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")


def forward_args(node: fx.Node) -> dict:
    """The arguments of a call of nn.MultiheadAttention, by name."""
    return dict(zip(_FORWARD_ARGS, node.args, strict=False), **node.kwargs)


def why_not_split(node: fx.Node, module: nn.MultiheadAttention) -> str | None:
    """Why this call of `module` cannot be split by heads (None: it can)."""
    given = forward_args(node)
    if not (given["query"] is given["key"] is given["value"]):
        return "not self-attention (query, key and value differ)"
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return "separate q/k/v projections, bias_k/bias_v or add_zero_attn"
    if module.dropout > 0:
        return "attention dropout"
    if given.get("key_padding_mask") is not None or given.get("attn_mask") is not None or given.get("is_causal"):
        return "an attention mask"
    for user in node.users:
        if user.target is not operator.getitem or (user.args[1] != 0 and user.users):
            return "its attention weights are used"
    return None


def _along_last(ctx: RuleContext, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` tensor inputs (query, key, value), each split along its last dim alone."""
    inputs = ctx.tensor_inputs()[:count]
    for t, lab in inputs:
        if lab is None or channel_dims(lab) != (t.dim() - 1,):
            raise Fallback("query, key or value not split along its last dim alone")
    return inputs


def _per_head(labels: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    return labels.reshape(-1).chunk(heads)


def tied_heads(ctx: RuleContext) -> torch.Tensor:
    """Head h's output channels mix v_h over tokens with weights from q_h and k_h: the 3d channels
    (q_h, k_h, v_h) of every head are tied to one node, which then needs nothing from the others."""
    qkv = _along_last(ctx, 3)
    heads = ctx.arg(3, "num_heads")
    for head in zip(*(_per_head(lab, heads) for _, lab in qkv), strict=True):
        ctx.universe.tie_all(torch.cat(head))
    return qkv[2][1]


ATTENTION.ops(heads_attention, rule=tied_heads)


@ATTENTION.rule(head_scores, head_covariance)
def scores_by_head(ctx: RuleContext) -> torch.Tensor:
    """Head h's scores mix q_h and k_h: their channels are tied, and the scores' index h along dim 1 is
    labelled with q_h's first channel (so whatever is tied to that channel follows the head)."""
    (_, q), (_, k) = _along_last(ctx, 2)
    heads = ctx.arg(2, "num_heads")
    first = []
    for head_q, head_k in zip(_per_head(q, heads), _per_head(k, heads), strict=True):
        ctx.universe.tie_all(torch.cat((head_q, head_k)))
        first.append(head_q[0])
    return torch.stack(first).reshape(1, heads, 1, 1)


def _head_width(n: fx.Node, module: nn.Module | None) -> int:
    """The head width of a per-head norm (its argument) or region (its module's)."""
    return module.width if isinstance(module, HeadsRegion) else n.args[1]


@ATTENTION.rule(*HEAD_NORMS, HeadsRegion)
def norm_by_head(ctx: RuleContext) -> torch.Tensor:
    """Each head's channels are normalised (or computed) over themselves: they are tied to one node, labels
    pass through; a region's tables must be whole."""
    ((_, labels),) = _along_last(ctx, 1)
    if isinstance(ctx.module, HeadsRegion) and any(lab is not None for _, lab in ctx.tensor_inputs()[1:]):
        raise Fallback("a table of a per-head region is split across nodes")
    for head in labels.reshape(-1).split(_head_width(ctx.node, ctx.module)):
        ctx.universe.tie_all(head)
    return labels


@ATTENTION.rule(heads_apply, heads_mix)
def apply_by_head(ctx: RuleContext) -> torch.Tensor:
    """Head h's output mixes v_h with head h's weights: index h of the weights (dim 1) is tied to v_h's
    channels. Weights computed whole on every node (labels None) are cut to each node's heads."""
    (_, labels), (v, v_labels) = ctx.tensor_inputs()[:2]
    heads = ctx.arg(2, "num_heads")
    if v_labels is None or channel_dims(v_labels) != (v.dim() - 1,):
        raise Fallback("value not split along its last dim alone")
    if labels is not None and (channel_dims(labels) != (1,) or labels.dim() != 4 or labels.size(1) != heads):
        raise Fallback("attention weights not split by heads along dim 1")
    for h, head_v in enumerate(_per_head(v_labels, heads)):
        ctx.universe.tie_all(head_v if labels is None else torch.cat((labels[0, h].reshape(1), head_v)))
    return v_labels


@ATTENTION.rule(nn.MultiheadAttention)
def multihead_attention(ctx: RuleContext) -> torch.Tensor:
    """Reached only for calls passes/expand_attention.py left opaque: say why."""
    why = why_not_split(ctx.node, ctx.module) or "another call of this module is not"
    raise Fallback(f"not split by heads: {why}")


def _whole_heads(n: fx.Node, j: int, held: torch.Tensor, width: int) -> torch.Tensor:
    """The heads whose `width` channels node j holds, each whole and in order (tied_heads ties them)."""
    blocks = held.reshape(-1, width) if held.numel() % width == 0 else None
    if blocks is None or bool((blocks != blocks[:, :1] + torch.arange(width)).any() | (blocks[:, 0] % width).any()):
        raise LoweringError(f"'{n.name}': node {j} holds part of an attention head")
    return blocks[:, 0] // width


def _head_channels(heads: torch.Tensor, width: int) -> torch.Tensor:
    return (heads[:, None] * width + torch.arange(width)).reshape(-1)


@ATTENTION.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """The per-head core on the heads this node owns, with query, key and value aligned to one unit order;
    attention weights and per-head tensors of windowed attention (relative position bias, logit scale: heads
    along dim -3) cut to those heads."""
    lay = b.low.layout(n)
    held = lay.held(b.j)
    if held.numel() == 0:
        b.env[n.name] = Local(None, held)
        return

    def per_head(a, mine):
        if isinstance(a, fx.Node) and b.env[a.name].units is not None:  # split by heads along dim 1
            return b.aligned(a, mine)
        node = b.value(a)
        return b.select(node, len(b.shapes[node.name]) - 3, mine) if isinstance(node, fx.Node) else node
    if n.target in (head_scores, head_covariance):  # held: head indices
        q, k, heads, batch_first = n.args
        args = [b.aligned(a, _head_channels(held, b.low.layout(a).units // heads)) for a in (q, k)]
        b.hold(n, b.call(n.target, (*args, held.numel(), batch_first), shape=lay.rep_shape(held.numel()),
                         dtype=lay.dtype), held)
        return
    if n.target in HEAD_NORMS or isinstance(module, HeadsRegion):  # the same op on each node's whole heads
        x, *rest = n.args
        _whole_heads(n, b.j, held, _head_width(n, module))
        args = (b.aligned(x, held), *(b.value(a) if isinstance(a, fx.Node) else a for a in rest))
        b.hold(n, b.emit(n, module, args, {}, shape=lay.rep_shape(held.numel()), dtype=lay.dtype), held)
        return
    if n.target in (heads_apply, heads_mix):
        weights, v, heads, batch_first = n.args
        mine = _whole_heads(n, b.j, held, lay.units // heads)
        args = (per_head(weights, mine), b.aligned(v, held), mine.numel(), batch_first)
        b.hold(n, b.call(n.target, args, shape=lay.rep_shape(held.numel()), dtype=lay.dtype), held)
        return
    q, k, v, heads, *rest = n.args
    mine = _whole_heads(n, b.j, held, lay.units // heads)
    args = (*(b.aligned(a, held) for a in (q, k, v)), mine.numel(),
            *(per_head(a, mine) if isinstance(a, fx.Node) else a for a in rest))
    kwargs = {key: per_head(a, mine) if key == "logit_scale" else b.value(a) if isinstance(a, fx.Node) else a
              for key, a in n.kwargs.items()}
    b.hold(n, b.call(n.target, args, kwargs, shape=lay.rep_shape(held.numel()), dtype=lay.dtype), held)
