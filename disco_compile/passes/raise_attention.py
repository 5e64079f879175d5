"""Raise attention in programs: aten.scaled_dot_product_attention between a packed in_proj and an out_proj
becomes `heads_attention`, so a torch.export program's self-attention is split by heads as the module's is.

torch.export writes nn.MultiheadAttention as its maths: the in_proj Linear (E -> 3E), reshapes, transposes
and selects that cut its output into q, k, v of shape (batch, H, tokens, d), the ATen attention, and a permute
and reshape back to E channels before the out_proj Linear. For every attention call with no mask, no
dropout, no causal flag and the default scale, the pass looks for that frame:

    S   the one node that q, k and v come from through shape ops alone (reshape, transpose, permute,
        unsqueeze, squeeze, select), of shape (tokens, batch, 3E) or (batch, tokens, 3E), E = H*d;
    T   the end of the chain of shape ops after the attention whose one user is a Linear with E inputs,

and puts in front of T, as passes/expand_attention.py writes the module,

    q, k, v = S.chunk(3, -1);  o = heads_attention(q, k, v, H, batch_first);  o.reshape(T's shape)

keeping the rewrite only where it computes T as before on the example inputs (to 1e-5; both layouts are
tried). Anything else stays as it was: replicated on every node, named in the cost report.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from ..ops.attention import heads_attention

_SHAPE_OPS = {torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, operator.getitem}
SDPA = torch.ops.aten.scaled_dot_product_attention.default


class _Values(fx.Interpreter):
    """Runs the module and keeps the values of `wanted` nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value
        return value


def _is_shape_op(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _SHAPE_OPS and isinstance(n.args[0], fx.Node)


def _source(n: fx.Node) -> fx.Node:
    while _is_shape_op(n):
        n = n.args[0]
    return n


def _out_proj_input(gm: fx.GraphModule, n: fx.Node, embed: int) -> fx.Node | None:
    while len(n.users) == 1:
        (user,) = n.users
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.Linear):
            return n if gm.get_submodule(user.target).in_features == embed else None
        if not _is_shape_op(user) or user.args[0] is not n:
            return None
        n = user
    return None


_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _plain(n: fx.Node) -> bool:
    """An attention call with q, k, v alone: no mask, dropout, causal flag or scale."""
    given = dict(zip(("attn_mask", "dropout_p", "is_causal"), n.args[3:], strict=False)) | dict(n.kwargs)
    return len(n.args) >= 3 and all(k in _DEFAULTS and _DEFAULTS[k] == v for k, v in given.items())


def _run(gm: fx.GraphModule, inputs: tuple, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    gm.recompile()
    values = _Values(gm, wanted)
    with torch.no_grad():
        values.run(*inputs)
    return values.values


def _frames(gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, tuple[fx.Node, fx.Node, int]]:
    """The attention calls that fit: each -> (its packed in_proj output, the out_proj's input, heads)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA and _plain(n)]
    calls = [n for n in calls if _source(n.args[0]) is _source(n.args[1]) is _source(n.args[2])]
    values = _run(gm, inputs, {x for n in calls for x in (n.args[0], _source(n.args[0]))})
    frames = {}
    for n in calls:
        q, s = values[n.args[0]], values[_source(n.args[0])]
        if q.dim() == 4 and s.dim() == 3 and s.shape[-1] == 3 * q.shape[1] * q.shape[3]:
            end = _out_proj_input(gm, n, q.shape[1] * q.shape[3])
            if end is not None:
                frames[n] = (_source(n.args[0]), end, q.shape[1])
    return frames


def _raise_layout(gm: fx.GraphModule, inputs: tuple, frames: dict, batch_first: bool) -> list[fx.Node]:
    """Try heads_attention with this layout for every frame; keep the ones that compute the same. Returns the
    attention calls replaced (erased from the graph)."""
    g = gm.graph
    tried = {}
    for n, (source, end, heads) in frames.items():
        with g.inserting_before(next(iter(end.users))):
            chunks = g.call_method("chunk", (source, 3, -1))
            qkv = [g.call_function(operator.getitem, (chunks, i)) for i in range(3)]
            tried[n] = (g.call_function(heads_attention, (*qkv, heads, batch_first)), [*qkv, chunks])
    try:
        values = _run(gm, inputs, {x for n in tried for x in (tried[n][0], frames[n][1])})
    except RuntimeError:  # a guess that does not fit the shapes: none of this layout's guesses is kept
        values = {}
    fitted = []
    for n, (o, made) in tried.items():
        end = frames[n][1]
        fits = o in values and values[o].numel() == values[end].numel() and torch.allclose(
            values[o].reshape(values[end].shape), values[end], rtol=1e-5, atol=1e-6)
        if fits:
            with g.inserting_after(o):
                new = g.call_function(torch.reshape, (o, list(values[end].shape)))
            end.replace_all_uses_with(new)
            fitted.append(n)
        else:
            for x in (o, *made):
                g.erase_node(x)
    g.eliminate_dead_code()  # from each replaced `end` back to its attention, which FX keeps (a seeded op) ...
    for n in fitted:
        g.erase_node(n)  # ... so it goes by hand (nothing uses it now), and then its inputs
    return fitted


def raise_attention(gm: fx.GraphModule, inputs: tuple) -> int:
    """Rewrite, in place, the attention calls of `gm` that fit (module docstring); returns how many."""
    frames = _frames(gm, inputs)
    done = 0
    for batch_first in (False, True):
        fitted = _raise_layout(gm, inputs, frames, batch_first)
        for n in fitted:
            del frames[n]
        done += len(fitted)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return done
