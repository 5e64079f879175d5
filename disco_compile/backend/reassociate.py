"""Reassociate each node's sums so that terms needing no further message are added before those that do.

    (p + r) + z  ->  (p + z) + r     when r waits for a message that p and z do not

(z: a residual branch, p: the local partial sum of a Conv, r: a received partial sum). What then runs after the
message arrives is Conv + Add (+ Relu), one fused kernel in onnxruntime. Exact in real arithmetic; fp32 rounding
may differ in the last bits.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from .program import NodeProgram, recv


def local_terms_first(prog: NodeProgram) -> None:
    """Reassociate sums so that terms needing no further message are added before those that do:
    (p + r) + z -> (p + z) + r when r waits for a message that p and z do not (z: a residual branch, p: the
    local partial sum of a Conv, r: a received partial sum). The new sum is placed right after p and z, so the
    cut (stages.py) puts it before the wait, and what runs after the message arrives is Conv + Add (+ Relu),
    one fused kernel in onnxruntime; the part of z computed after p in program order (a gather of the residual's
    rows, say) moves up with it. Exact in real arithmetic; fp32 rounding may differ in the last bits."""
    waits: dict[fx.Node, frozenset] = {}
    for node in prog.graph.nodes:
        waits[node] = frozenset({node} if node.op == "call_function" and node.target is recv else ()).union(
            *(waits[a] for a in node.all_input_nodes))
    while _reassociate_one(prog, waits):
        pass


def _is_add(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.add
            and len(node.args) == 2 and not node.kwargs)


def _reassociate_one(prog: NodeProgram, waits: dict[fx.Node, frozenset]) -> bool:
    """One rewrite of `_local_terms_first`; False when none applies."""
    order = {node: k for k, node in enumerate(prog.graph.nodes)}
    for outer in filter(_is_add, prog.graph.nodes):
        for inner, z in (outer.args, outer.args[::-1]):
            if not (_is_add(inner) and len(inner.users) == 1 and isinstance(z, fx.Node)):
                continue
            p, r = inner.args
            shape = prog.shapes.get(outer.name)
            if not (isinstance(p, fx.Node) and isinstance(r, fx.Node) and waits[z] <= waits[p]
                    and not waits[r] <= waits[p] and shape is not None
                    and prog.shapes.get(p.name) == prog.shapes.get(z.name) == shape):
                continue
            anchor = p
            for a in sorted(_ancestors_after(z, order[p], order), key=order.__getitem__):
                anchor.append(a)  # computed before the wait too
                anchor = a
            with prog.graph.inserting_after(anchor):
                local = prog.graph.call_function(operator.add, (p, z))
            prog.shapes[local.name], prog.dtypes[local.name] = shape, prog.dtypes[outer.name]
            waits[local] = waits[p]
            outer.args = (local, r)
            prog.graph.erase_node(inner)
            return True
    return False


def _ancestors_after(node: fx.Node, position: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """`node` and its ancestors that come after `position` in program order."""
    found, todo = set(), [node]
    while todo:
        a = todo.pop()
        if order[a] > position and a not in found:
            found.add(a)
            todo.extend(a.all_input_nodes)
    return found
