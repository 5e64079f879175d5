"""Multi-head self-attention as ops the channel analysis can split by heads.

nn.MultiheadAttention packs its maths into one opaque module. For self-attention
(query, key and value one tensor x of E = H*d channels, no masks) it computes

    [q, k, v] = x W_in^T + b_in                       W_in: (3E, E), the packed in_proj
    o_h = softmax(q_h k_h^T / sqrt(d)) v_h            per head h, q_h = q[..., h*d:(h+1)*d]
    y = o W_out^T + b_out                             o = [o_0, ..., o_{H-1}], the out_proj

so channel c of head h's output mixes value channel c over tokens, with weights
that depend on q_h and k_h alone. Once the 3d channels (q_h, k_h, v_h) of every
head live on one node, that node computes o_h with no communication: the
in_proj and out_proj are ordinary channel-mixing layers (exchanges before them),
and `heads_attention` is the per-head core, run by each node on the heads it
owns (passes/expand_attention.py rewrites the module into these ops).

Rule: the 3d channels (q_h, k_h, v_h) of every head are tied to one node; the output's channels are v's.
Lowering: node j runs the core on the whole heads it owns, with q, k and v aligned to one unit order.
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


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    batch_first: bool) -> torch.Tensor:
    """o_h = softmax(q_h k_h^T / sqrt(d)) v_h for each of `num_heads` heads of d channels, the heads
    side by side in the last dim; tensors (batch, tokens, H*d), or (tokens, batch, H*d) if not batch_first."""
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
    return o if batch_first else o.transpose(0, 1)


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


def tied_heads(ctx: RuleContext) -> torch.Tensor:
    """Head h's output channels mix v_h over tokens with weights from q_h and k_h: the 3d channels
    (q_h, k_h, v_h) of every head are tied to one node, which then needs nothing from the others."""
    qkv = ctx.tensor_inputs()[:3]
    heads = ctx.arg(3, "num_heads")
    for t, lab in qkv:
        if lab is None or channel_dims(lab) != (t.dim() - 1,):
            raise Fallback("query, key or value not split along its last dim alone")
    for head in zip(*(lab.reshape(-1).chunk(heads) for _, lab in qkv), strict=True):
        ctx.universe.tie_all(torch.cat(head))
    return qkv[2][1]


ATTENTION.ops(heads_attention, rule=tied_heads)


@ATTENTION.rule(nn.MultiheadAttention)
def multihead_attention(ctx: RuleContext) -> torch.Tensor:
    """Reached only for calls passes/expand_attention.py left opaque: say why."""
    why = why_not_split(ctx.node, ctx.module) or "another call of this module is not"
    raise Fallback(f"not split by heads: {why}")


@ATTENTION.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """The per-head core on the heads this node owns (whole heads: tied_heads ties them), with query, key and
    value aligned to one unit order; per-head tensors of windowed attention (relative position bias, logit
    scale: heads along dim -3) cut to those heads."""
    lay = b.low.layout(n)
    held = lay.held(b.j)
    if held.numel() == 0:
        b.env[n.name] = Local(None, held)
        return
    q, k, v, heads, *rest = n.args
    width = lay.units // heads
    blocks = held.reshape(-1, width) if held.numel() % width == 0 else None
    if blocks is None or bool((blocks != blocks[:, :1] + torch.arange(width)).any() | (blocks[:, 0] % width).any()):
        raise LoweringError(f"'{n.name}': node {b.j} holds part of an attention head")
    mine = blocks[:, 0] // width

    def per_head(a):
        node = b.value(a)
        return b.select(node, len(b.shapes[node.name]) - 3, mine) if isinstance(node, fx.Node) else node
    args = (*(b.aligned(a, held) for a in (q, k, v)), mine.numel(),
            *(per_head(a) if isinstance(a, fx.Node) else a for a in rest))
    kwargs = {key: per_head(a) if key == "logit_scale" else b.value(a) if isinstance(a, fx.Node) else a
              for key, a in n.kwargs.items()}
    b.hold(n, b.call(n.target, args, kwargs, shape=lay.rep_shape(held.numel()), dtype=lay.dtype), held)
