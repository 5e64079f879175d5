"""Insert sparse exchanges: wherever a channel-mixing layer on node j reads
channels owned by another node (the consumer's placement differs from the
producer's), feed it through a SparseExchange of its input tensor and replace
the layer with its partitioned form. One exchange per tensor, shared by every
mixing consumer of that tensor. Layers whose input is replicated, or whose
groups keep every needed column local, stay as they are.

Every node's Placement is replaced by one with its owners; the new exchange
nodes get a Placement and, after re-running ShapeProp, `meta['tensor_meta']`.
Returns the mixing layers as they now are: those fed by an exchange name it,
and the module that computes them (a call of a shared module gets its own).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..ops import mixing
from ..ir import MixingLayer, Placement, owners
from ..ops.modules import SparseExchange, partitioned


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def insert_exchanges(gm: fx.GraphModule, layers: list[MixingLayer], owner_of: torch.Tensor, nodes: int,
                     example_inputs: tuple) -> list[MixingLayer]:
    by_name = {n.name: n for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        placement = n.meta.get("disco")
        if placement is not None:
            n.meta["disco"] = dataclasses.replace(placement, owner=owners(placement.labels, owner_of))

    consumers: dict[str, list[tuple[MixingLayer, torch.Tensor]]] = {}
    for layer in layers:
        if layer.in_labels is None:
            continue
        in_owner = owners(layer.in_labels, owner_of).reshape(-1)
        out_owner = owner_of[layer.out_labels.reshape(-1)]
        need = torch.stack([mixing.needed(layer, out_owner, j) for j in range(nodes)])
        remote = need & torch.stack([~mixing.local_columns(in_owner, layer, j) for j in range(nodes)])
        if remote.any():
            consumers.setdefault(layer.in_node, []).append((layer, need))

    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    made: dict[str, MixingLayer] = {}  # layer node -> the layer with its exchange
    gm.add_submodule("exchanges", nn.ModuleDict())
    for in_name, uses in consumers.items():
        first = uses[0][0]
        need = torch.stack([u[1] for u in uses]).any(0)
        owner = owners(first.in_labels, owner_of)
        ex = SparseExchange(owner, need, unit_elems=first.in_unit_elems, itemsize=first.itemsize)
        gm.exchanges[in_name] = ex
        src = by_name[in_name]
        with gm.graph.inserting_after(src):
            ex_node = gm.graph.call_module(f"exchanges.{in_name}", (src,))
        ex_node.meta["disco"] = Placement(first.in_labels, owner, source=f"exchange of {in_name}")
        for layer, _ in uses:
            consumer = by_name[layer.node]
            consumer.replace_input_with(src, ex_node)
            module = partitioned(gm.get_submodule(layer.module), owner_of[layer.out_labels.reshape(-1)], nodes)
            target = layer.module
            if calls[layer.module] == 1:
                _set_submodule(gm, layer.module, module)
            else:  # a module called from several places: this call gets its own partitioned view of the weights
                consumer.target = target = f"shared_partitioned.{layer.node}"
                gm.add_submodule(consumer.target, module)
            made[layer.node] = dataclasses.replace(layer, exchange=in_name, module=target)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return [made.get(layer.node, layer) for layer in layers]
