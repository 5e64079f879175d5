"""`transform`: capture -> raise functional layers -> expand attention (multi-head, windowed) -> channel-flow
analysis -> partition -> insert exchanges, returning a `DiscoModel`, an nn.Module that computes in one process
exactly what the N nodes compute together (see ops/modules.py for the block equation).
With `submodule=NAME`, only that submodule is split and the rest of the model
runs whole on node 0 (a `DiscoSubmodel`, frontend/submodule.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from .budget import cost, selection
from .artifact.wire import DEFAULT_WIRE
from .budget.budget import Budget, as_budget
from .budget.data import split_batch
from .frontend.capture import LeafSpec, bind_inputs, capture
from .errors import PartitionError
from .frontend.exported import to_module
from .ir import PartitionPlan
from .ops.attention import HeadsRegion
from .ops.modules import InputWire, SparseExchange
from .ops.wire import Calibration
from .passes.channel_flow import analyse
from .passes.expand_attention import expand_attention
from .passes.expand_window_attention import MODULES as WINDOW_ATTENTION_MODULES
from .passes.expand_window_attention import expand_window_attention
from .passes.insert_exchanges import insert_exchanges
from .passes.partition import assign_owners, check_weights
from .passes.raise_attention import raise_attention
from .passes.raise_functional import raise_functional
from .frontend.submodule import DiscoSubmodel, capture_inputs, find_submodule


class DiscoModel(nn.Module):
    """A model split across `nodes` nodes, run in one process.

    `graph_module` is the traced model with partitioned Conv/Linear layers and
    one `SparseExchange` per exchanged tensor (`exchanges`, keyed by the fx
    name of the tensor). Parameter names match the original model's.
    `route`: how the model was captured (frontend/capture.py): "torch.fx", "torch.export", or
    "torch.export (torch.fx failed: why)". `input_names`: the inputs it takes, positionally in this order or
    by name (the example inputs' names in forward's order; the export's inputs are the same, in that order).
    """

    def __init__(self, graph_module: fx.GraphModule, plan: PartitionPlan, route: str = "torch.fx"):
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.route = route
        self.input_wires = nn.ModuleDict(_input_wires(graph_module, plan))

    def _arrived(self, name: str, x):
        return self.input_wires[name](x) if name in self.input_wires else x

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.target for n in self.graph_module.graph.nodes if n.op == "placeholder")

    @property
    def nodes(self) -> int:
        return self.plan.nodes

    @property
    def exchanges(self) -> dict[str, SparseExchange]:
        return dict(self.graph_module.exchanges.items())

    def forward(self, *args, **kwargs):
        if any(w.active for w in self.input_wires.values()):  # the inputs as every node computes from them
            names = self.input_names
            args = (*(self._arrived(name, x) for name, x in zip(names, args, strict=False)), *args[len(names):])
            kwargs = {name: self._arrived(name, x) for name, x in kwargs.items()}
        return self.graph_module(*args, **kwargs)

    def wired(self) -> list[SparseExchange | InputWire]:
        """Everything that sends at a wire precision: the exchanges, then the model inputs node 0 sends."""
        return [*self.exchanges.values(), *self.input_wires.values()]

    def gates(self) -> list[nn.Parameter]:
        return [ex.gate for ex in self.exchanges.values()]

    def cost(self) -> cost.CostReport:
        """Communication, compute and memory per sample, for the current gate selection."""
        gm, ex, plan = self.graph_module, self.exchanges, self.plan
        fixed = cost.fixed_exchange_bytes(gm, plan.nodes, plan.replicated, plan.stats)
        exchange = cost.exchange_bytes(ex, dense=False) + fixed
        dense = cost.exchange_bytes(ex, dense=True) + fixed
        io = cost.io_bytes(gm, plan.nodes, plan.batch, plan.input_on_all_nodes,
                           {name: w.wire for name, w in self.input_wires.items()})
        return cost.CostReport(
            nodes=plan.nodes, exchange_bytes=exchange, dense_exchange_bytes=dense, fixed_exchange_bytes=fixed,
            io_bytes=io, comm_bytes=exchange + io, dense_comm_bytes=dense + io,
            macs_per_node=cost.macs_per_node(plan.layers, ex, plan.owner_of, plan.nodes, plan.replicated_macs,
                                             plan.channelwise_macs),
            params_per_node=cost.params_per_node(gm, plan.nodes, plan.layers, ex, plan.owner_of),
            original_macs=plan.original_macs, original_params=plan.original_params,
            replicated_ops=list(plan.replicated))

    def set_budget(self, budget: Budget | float, *, wire: str | None = None) -> None:
        """One-shot selection at `budget`, a Budget or a number rho meaning Budget(rho) (global allocation,
        align 8, compute weight 0.004, wire fp32: disco-compile's defaults): the remote channels whose weight
        columns, over the destination's output rows of every consumer, have the largest norm
        (budget/selection.py). `wire` overrides the budget's; an integer wire's scales then still need
        `calibrate_wire` (selection.one_shot with batches does both)."""
        budget = as_budget(budget) if wire is None else replace(as_budget(budget), wire=wire)
        self.set_wire(budget.wire)
        selection.select(self, selection.magnitude_scores(self), budget)

    @property
    def wire(self) -> str:
        """The precision every exchange message carries (ops/wire.py)."""
        return next((ex.wire for ex in self.exchanges.values()), DEFAULT_WIRE)

    def set_wire(self, wire: str) -> None:
        """Every exchange sends at `wire`, and the model input at its input wire (artifact/wire.INPUT_WIRES); an
        integer wire's scales are calibrated by `calibrate_wire`."""
        for w in self.wired():
            w.set_wire(wire)

    @torch.no_grad()
    def calibrate_wire(self, batches: Iterable, model: nn.Module | None = None) -> None:
        """The integer wire's per-channel scales from the largest |value| each sent channel takes over `batches`
        (inputs, or (inputs, target) pairs), in eval mode; the mode is restored. `model`: the model this one is
        part of (a DiscoSubmodel), called with each batch as its one argument."""
        wired = [w for w in self.wired() if w.scale is not None]
        if not wired:
            return
        runner = self if model is None else model
        was_training = runner.training
        runner.eval()
        for w in wired:
            w.calibration = Calibration(w.label_shape)
        try:
            for batch in batches:
                runner(split_batch(batch)[0] if model is None else batch)
            for w in wired:
                w.scale.data.copy_(w.calibration.scales(w.wire).to(w.scale))
        finally:
            for w in wired:
                w.calibration = None
            runner.train(was_training)


def _input_wires(gm: fx.GraphModule, plan: PartitionPlan) -> dict[str, InputWire]:
    """An InputWire for each floating-point model input node 0 sends the others (none on one node, or when the
    input is on every node)."""
    if plan.nodes == 1 or plan.input_on_all_nodes:
        return {}
    metas = {n.target: n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder" and n.users}
    return {name: InputWire(tuple(meta.shape)) for name, meta in metas.items()
            if isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point}


def transform(model: nn.Module | torch.export.ExportedProgram, nodes: int, example_inputs, *,
              node_weights: Sequence[float] | None = None, leaf_modules: LeafSpec = (),
              input_on_all_nodes: bool = False, submodule: str | None = None) -> DiscoModel | DiscoSubmodel:
    """Rewrite `model` into a DISCO model over `nodes` nodes with every gate on.

    model: an nn.Module, or a torch.export ExportedProgram (raised to modules first: frontend/exported.py).
    example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs (batch first) used for
      tracing shapes; forward's optional parameters they do not give are bound to their defaults (capture.py).
      When torch.fx cannot trace the model, it is captured with torch.export, said in a warning (`route`).
    node_weights: relative speed of each node; a node gets that share of every layer's channels.
    leaf_modules: module classes or qualified names that are not traced into.
    input_on_all_nodes: the input is present on every node (no input io bytes).
    submodule: split only this submodule (qualified name, e.g. "backbone" of a torchvision detector); the
      rest of the model runs whole on node 0 (submodule.py). example_inputs are then what the whole model
      is called with: a tuple of positional arguments, or one argument (a detector's list of images);
      leaf_modules are named inside the submodule. Returns a DiscoSubmodel.
    """
    route = "torch.fx"
    if isinstance(model, torch.export.ExportedProgram):
        model, route = to_module(model), "torch.export"
    if submodule is not None:
        inner = find_submodule(model, submodule)
        disco = transform(inner, nodes, capture_inputs(model, submodule, example_inputs), node_weights=node_weights,
                          leaf_modules=leaf_modules, input_on_all_nodes=input_on_all_nodes)
        return DiscoSubmodel(model, submodule, disco)
    weights = check_weights(nodes, node_weights)
    bound = bind_inputs(model, example_inputs)
    example_inputs = bound.args
    captured = capture(model, bound, (*leaf_modules, *WINDOW_ATTENTION_MODULES, HeadsRegion))
    gm, route = captured.graph_module, captured.route if route == "torch.fx" else route
    raise_functional(gm)
    expand_attention(gm)
    expand_window_attention(gm, example_inputs)
    raise_attention(gm, example_inputs)
    flow = analyse(gm, example_inputs, nodes)
    if not flow.mixing:
        raise PartitionError("the model has no Conv or Linear layer whose channels could be split across nodes")
    widest = max(layer.out_channels for layer in flow.mixing)
    if nodes > widest:
        raise PartitionError(f"nodes={nodes} is more than the widest layer's {widest} channels: some node would "
                             f"own nothing; use at most {widest} nodes")
    owner_of = assign_owners(flow.universe, weights)
    original_macs = sum(cost.op_macs(gm, n, flow.batch) for n in gm.graph.nodes)
    replicated_names = {r.node for r in flow.replicated}
    replicated_macs = sum(cost.op_macs(gm, n, flow.batch) for n in gm.graph.nodes if n.name in replicated_names)
    original_params = sum(p.numel() for p in model.parameters())
    channelwise_macs = cost.channelwise_macs(gm, owner_of, nodes, flow.batch,
                                             replicated_names | {layer.node for layer in flow.mixing})
    mixing = [replace(layer, out_positions=cost.out_positions(gm, layer, flow.batch)) for layer in flow.mixing]
    layers = insert_exchanges(gm, mixing, owner_of, nodes, example_inputs)
    return DiscoModel(gm, PartitionPlan(
        nodes=nodes, node_weights=weights, owner_of=owner_of, layers=layers, stats=flow.stats,
        replicated=flow.replicated, batch=flow.batch, input_on_all_nodes=input_on_all_nodes,
        original_macs=original_macs, original_params=original_params, replicated_macs=replicated_macs,
        channelwise_macs=channelwise_macs), route)
