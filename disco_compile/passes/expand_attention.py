"""Expand attention: every nn.MultiheadAttention whose calls attention.why_not_split
accepts is rewritten, in place, into ops the channel analysis can split by heads:

    qkv = in_proj(x)                                   nn.Linear(E, 3E): the packed in_proj_weight, in_proj_bias
    q, k, v = qkv.chunk(3, -1)
    o = heads_attention(q, k, v, num_heads, batch_first)
    y = out_proj(o)                                    the module's own out_proj

and the call's first output is replaced by y (the attention weights, unused, are
dropped). The module at the attention's path becomes a plain container of
in_proj and out_proj, so its packed parameters are named in_proj.weight and
in_proj.bias (the same tensors as in_proj_weight and in_proj_bias). A module
called from several places is expanded only if every call can be; the others
stay opaque and are replicated, with the reason in the report (ops/attention.py).
It runs right after tracing; the channel-flow analysis then gives every node,
new ones included, its meta.
"""
from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn

from ..ops.attention import forward_args, heads_attention, why_not_split


def _packed_in_proj(mha: nn.MultiheadAttention) -> nn.Linear:
    linear = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
    linear.weight = mha.in_proj_weight
    if mha.in_proj_bias is not None:
        linear.bias = mha.in_proj_bias
    return linear


def expand_attention(gm: fx.GraphModule) -> int:
    """Rewrite the splittable attention calls of `gm` in place; returns how many were rewritten."""
    g = gm.graph
    calls: dict[str, list[fx.Node]] = {}
    for n in g.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention):
            calls.setdefault(n.target, []).append(n)
    expanded = 0
    for target, nodes in calls.items():
        mha = gm.get_submodule(target)
        if any(why_not_split(n, mha) for n in nodes):
            continue
        container = nn.Module()
        container.in_proj = _packed_in_proj(mha)
        container.out_proj = mha.out_proj
        gm.add_submodule(target, container)
        for n in nodes:
            with g.inserting_before(n):
                qkv = g.call_module(f"{target}.in_proj", (forward_args(n)["query"],))
                chunks = g.call_method("chunk", (qkv, 3, -1))
                q, k, v = (g.call_function(operator.getitem, (chunks, i)) for i in range(3))
                o = g.call_function(heads_attention, (q, k, v, mha.num_heads, mha.batch_first))
                y = g.call_module(f"{target}.out_proj", (o,))
            for user in list(n.users):  # getitem 0: the output; getitem 1: the unused weights
                if user.args[1] == 0:
                    user.replace_all_uses_with(y)
                g.erase_node(user)
            g.erase_node(n)
            expanded += 1
    if expanded:
        g.lint()
        gm.recompile()
    return expanded
