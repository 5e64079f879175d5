"""Per-layer records of an export, named by the original model's module paths (manifest.json `layers`).

A row is one op of the DISCO graph that mixes channels (Conv, Linear: it has MACs) or whose output is sent
(exchange, gather and stats messages name it as their `tensor`), in graph order. For N nodes it records the units
of the op's output each node owns (None: replicated), the MACs per sample each node computes for it
(budget/cost.py `layer_macs`, the cost model's own figure) and sent[i][j], the bytes per sample node i sends
node j of its output. MACs of replicated ops (run whole on every node) are one more row, "(replicated ops)".
runtime/info.py reads the rows without torch.

Module paths: a module call is named by its qualified name ("layer1.0.conv1"), a function call by the module
it was called in and the function ("layer1.0.add"); a name used again gets a suffix, as torch.onnx numbers a
module called twice ("layer1.0.relu", "layer1.0.relu_1").
"""
from __future__ import annotations

from collections import Counter

import torch.fx as fx

from ..artifact.schedule import Message
from ..budget.cost import layer_macs
from ..ir import REPLICATED

EXCHANGE_KINDS = ("exchange", "gather", "stats")


def module_paths(gm: fx.GraphModule) -> dict[str, str]:
    """fx node name -> its module path in the original model (module docstring), for every call."""
    seen: Counter = Counter()
    paths = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            base = str(n.target)
        elif n.op in ("call_function", "call_method"):
            scope = list((n.meta.get("nn_module_stack") or {}).keys())
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.name)
            base = f"{scope[-1]}.{name}" if scope else name
        else:
            continue
        paths[n.name] = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1
    return paths


def _op_name(gm: fx.GraphModule, n: fx.Node, layer) -> str:
    """The op as the original model has it: a mixing layer's torch.nn class (not its partitioned form)."""
    if layer is not None:
        weight = gm.get_submodule(layer.module).weight
        return "Linear" if layer.kind == "linear" else f"Conv{weight.dim() - 2}d"
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _channels(n: fx.Node, nodes: int) -> list[int] | None:
    placement = n.meta.get("disco")
    owner = None if placement is None else placement.owner
    if owner is None or bool((owner == REPLICATED).all()):
        return None
    return [int((owner == j).sum()) for j in range(nodes)]


def _zeros(nodes: int) -> list[list[int]]:
    return [[0] * nodes for _ in range(nodes)]


def layer_records(dm, messages: list[Message]) -> list[dict]:
    """The manifest's `layers` rows of DISCO model `dm` (its current selection) and its schedule's messages."""
    gm, plan = dm.graph_module, dm.plan
    n_nodes = plan.nodes
    sent: dict[str, list[list[int]]] = {}
    for m in messages:
        if m.kind in EXCHANGE_KINDS:
            sent.setdefault(m.tensor, _zeros(n_nodes))[m.src][m.dst] += m.bytes
    mixing = {layer.node: layer for layer in plan.layers}
    exchanges = dm.exchanges
    paths = module_paths(gm)
    rows = []
    for n in gm.graph.nodes:
        if n.name not in mixing and n.name not in sent and n.name not in plan.channelwise_macs:
            continue
        macs = (layer_macs(mixing[n.name], exchanges, plan.owner_of, n_nodes) if n.name in mixing
                else plan.channelwise_macs.get(n.name, [0] * n_nodes))
        rows.append({"name": paths.get(n.name, n.name), "op": _op_name(gm, n, mixing.get(n.name)),
                     "channels": _channels(n, n_nodes), "macs": macs, "sent": sent.pop(n.name, _zeros(n_nodes))})
    if plan.replicated_macs:
        rows.append({"name": "(replicated ops)", "op": ", ".join(sorted({r.target for r in plan.replicated})),
                     "channels": None, "macs": [plan.replicated_macs] * n_nodes,
                     "sent": _zeros(n_nodes)})
    return rows
