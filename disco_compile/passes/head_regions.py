"""Per-head regions of attention operands (used by passes/raise_attention.py): ops a model runs on q or k head
by head, found back from an operand x (batch, H, tokens, d) to one heads tensor P of its shape, and checked on
the example to act on each head alone: region(P[:, S]) = x[:, S] for S = heads[1:] and the heads reversed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

_TYPE_AS = ("type_as", torch.ops.aten.type_as.default)
_REGION_NODES = 40  # the most ops a per-head region may hold


@dataclass(frozen=True)
class Region:
    """Ops from a heads tensor P (batch, H, tokens, d) to a tensor of its shape, acting head by head."""
    input: fx.Node  # P
    module: fx.GraphModule  # (P, *tables) -> the region's output
    tables: tuple[fx.Node, ...]  # its other inputs, broadcast over the heads


def _heads_like(value, heads: torch.Size) -> bool:
    """A (batch, H, ...) tensor of those heads, or a tuple of them (a split)."""
    if isinstance(value, (tuple, list)):
        return len(value) > 0 and all(_heads_like(v, heads) for v in value)
    return isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[:2] == heads


def _sizes(value) -> bool:
    """A size or shape (read off a tensor: the region copies the read)."""
    return isinstance(value, (int, torch.Size)) and not isinstance(value, bool)


def _table(value) -> bool:
    """A tensor input a region may take: broadcast over the heads (dim -3 absent or of size 1)."""
    return isinstance(value, torch.Tensor) and (value.dim() < 3 or value.shape[-3] == 1)


def find_region(gm: fx.GraphModule, x: fx.Node, values: dict) -> Region | None:
    """x (batch, H, tokens, d) computed from one heads tensor P of its shape by ops that act on each head alone
    (rotary embeddings: x * cos + rotate(x) * sin, the prefix tokens they skip, a cast), or None.
    The ops are grown back from x over inputs of the heads' (batch, H) and the sizes read off them; every other
    input must be a table broadcast over the heads (`type_as`'s reference gives only its dtype). Checked on the
    example: the region recomputes x, and on the heads without the first and on the heads reversed it gives
    those heads of x."""
    want = values.get(x)
    if not isinstance(want, torch.Tensor) or want.dim() != 4 or want.shape[1] < 2:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region, frontier, tables = [], [x], []
    while len(region) < _REGION_NODES:
        f = max(frontier, key=order.__getitem__)
        if len(frontier) == 1 and f is not x and isinstance(values[f], torch.Tensor) \
                and values[f].shape == want.shape:
            found = _checked_region(gm, f, x, region, tables, values, order)
            if found is not None:
                return found
        if f.op not in ("call_function", "call_method", "call_module"):
            return None
        frontier.remove(f)
        region.append(f)
        inputs = f.all_input_nodes[:1] if f.target in _TYPE_AS else f.all_input_nodes
        for a in inputs:
            if _heads_like(values.get(a), want.shape[:2]) or _sizes(values.get(a)):
                frontier += [] if a in frontier or a in region else [a]
            elif _table(values.get(a)):
                tables += [] if a in tables else [a]
            else:
                return None
        if not frontier:
            return None
    return None


def _reaches(start: fx.Node, targets: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Some target is computed from `start` (every node a target reads, back to `start`'s place in the graph
    `order`)."""
    seen, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n is start:
            return True
        if n not in seen and order[n] > order[start]:
            seen.add(n)
            stack += n.all_input_nodes
    return False


def _checked_region(gm, p: fx.Node, x: fx.Node, region: list[fx.Node], tables: list[fx.Node], values: dict,
                    order: dict[fx.Node, int]) -> Region | None:
    if _reaches(p, tables, order):  # a table computed from P carries every head into each (q + q.mean(1))
        return None
    graph = fx.Graph()
    env = {p: graph.placeholder("heads")}
    env.update({t: graph.placeholder(f"table_{k}") for k, t in enumerate(tables)})
    for n in sorted(region, key=order.__getitem__):
        if n.target in _TYPE_AS:  # only the reference's dtype
            env[n] = graph.call_method("to", (env[n.args[0]], values[n.args[1]].dtype))
            continue
        if any(isinstance(a, fx.Node) and a not in env for a in n.all_input_nodes):
            return None  # a size or another value read off a node outside the region
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[x])
    module = fx.GraphModule(gm, graph)
    tensors = [values[t] for t in tables]
    heads = values[p].shape[1]
    try:
        with torch.no_grad():
            if not torch.equal(module(values[p], *tensors), values[x]):
                return None
            for index in (torch.arange(1, heads), torch.arange(heads - 1, -1, -1)):
                if not torch.equal(module(values[p][:, index], *tensors), values[x][:, index]):
                    return None
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    return Region(p, module, tuple(tables))
