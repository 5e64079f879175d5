"""Channel-flow analysis: run the traced graph on the example inputs and label
every tensor's channels (see ir/labels.py), applying each op's channel rule (ops/registry.py).

This is ShapeProp plus channel labels: each node gets `meta['tensor_meta']`
and `meta['disco'] = Placement(labels)`. Ties between channels are collected
in a ChannelUniverse; channel-mixing ops, statistics exchanges and replicated
ops are listed in the returned `ChannelFlow`. Values that do not depend on the
model's inputs (Swin V2's relative position bias, made by an MLP from a
constant table) are computed whole on every node: no op on them is split.

A tensor whose channels would vary along non-adjacent dims (heads and head width apart, Hiera's windows
between them) or along dim 0, where the batch is (HaloNet's heads folded into B*H rows), has no per-node
layout: the ops that would make one are replicated instead (their inputs gathered, the op run whole), and the
analysis is run again until no such tensor is left, so that whatever the analysis accepts lowers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from ..ops import registry
from ..errors import ExampleInputError
from ..ir import ChannelUniverse, MixingLayer, Placement, ReplicatedOp, StatExchange, channel_dims


@dataclass
class ChannelFlow:
    universe: ChannelUniverse
    mixing: list[MixingLayer]
    stats: list[StatExchange]
    replicated: list[ReplicatedOp]
    batch: int


def _has_tensor(value) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def _shape_desc(value) -> str:
    return str([tuple(v.shape) for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)])


class _ChannelFlowInterpreter(ShapeProp):
    def __init__(self, gm: fx.GraphModule, nodes: int, whole: dict[str, str] | None = None):
        super().__init__(gm)
        self.nodes = nodes
        self.whole = whole or {}  # node name -> why it is replicated although it has a rule
        self.made_whole: set[fx.Node] = set()  # computed whole because of `whole`: ops with no rule still named
        self.labels: dict[fx.Node, object] = {}
        self.universe = ChannelUniverse()
        self.mixing: list[MixingLayer] = []
        self.stats: list[StatExchange] = []
        self.replicated: list[ReplicatedOp] = []
        self.from_inputs: set[fx.Node] = set()  # nodes whose value depends on a placeholder

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            inputs = [self.env[a] for a in n.all_input_nodes if a in self.env]
            raise ExampleInputError(
                f"the example inputs do not fit the model: node '{n.name}' ({n.op} {n.target}) failed on "
                f"inputs of shapes {_shape_desc(inputs)}: {type(exc).__name__}: {exc}\n"
                f"  what to do: pass example inputs of the shape the model expects "
                f"(for ImageNet classifiers 1x3x224x224)") from exc
        labels = self._label(n, result)
        if labels is None and self._after_made_whole(n):
            self.made_whole.add(n)
        self.labels[n] = labels
        n.meta["disco"] = Placement(labels if isinstance(labels, torch.Tensor) or labels is None else None,
                                    source=str(n.target) if n.op == "call_module" else n.name)
        return result

    def _after_made_whole(self, n: fx.Node) -> bool:
        """Whether n reads a value made whole by `whole` (directly or through ops computed whole from it)."""
        return any(a.name in self.whole or a in self.made_whole for a in n.all_input_nodes)

    def _label(self, n: fx.Node, result):
        if n.op == "placeholder" or any(a in self.from_inputs for a in n.all_input_nodes):
            self.from_inputs.add(n)
        if n.op in ("placeholder", "get_attr", "output") or n not in self.from_inputs:
            return None
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if not _has_tensor(result):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        label_args, label_kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.labels.get(a))
        ctx = registry.RuleContext(n, module, args, kwargs, label_args, label_kwargs, result, self.universe,
                                self.nodes, self.mixing, self.stats)
        op = registry.lookup(n, module)
        if all(lab is None for _, lab in ctx.tensor_inputs()) and not (op and op.data.get("creates_channels")):
            if (op is None or op.rule is None) and self._after_made_whole(n):  # still named
                self.replicated.append(registry.replicated(ctx, "no channel rule for this op"))
            return None  # computed whole on every node from replicated data
        if op is None or op.rule is None or n.name in self.whole:
            self.replicated.append(registry.replicated(ctx, self.whole.get(n.name, "no channel rule for this op")))
            return None
        try:
            return op.rule(ctx)
        except registry.Fallback as why:
            self.replicated.append(registry.replicated(ctx, str(why)))
            return None


def analyse(gm: fx.GraphModule, example_inputs: tuple, nodes: int) -> ChannelFlow:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise ExampleInputError(
            f"the model takes {len(placeholders)} input(s) ({', '.join(p.name for p in placeholders)}) "
            f"but {len(example_inputs)} example input(s) were given")
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise ExampleInputError("example_inputs must contain a batched tensor (e.g. torch.randn(1, 3, 224, 224))")
    whole: dict[str, str] = {}
    while True:
        interp = _ChannelFlowInterpreter(gm, nodes, whole)
        with torch.no_grad():
            interp.run(*example_inputs)
        apart = _first_unlaid(interp.labels)
        if not apart:
            return ChannelFlow(interp.universe, interp.mixing, interp.stats, interp.replicated, batch=first.shape[0])
        whole.update(apart)


def _unlaid(labels) -> str | None:
    """Why no per-node layout holds a labelling (or the first such piece of a split's), or None."""
    for lab in pytree.tree_leaves(labels):
        dims = channel_dims(lab) if isinstance(lab, torch.Tensor) else ()
        if dims and dims != tuple(range(dims[0], dims[-1] + 1)):
            return f"its output's channels would vary along non-adjacent dims {dims}"
        if dims and dims[0] == 0:
            return "its output's channels would vary along dim 0, folded with the batch (heads in B*H rows)"
    return None


def _first_unlaid(labels: dict[fx.Node, object]) -> dict[str, str]:
    """The nodes whose output no per-node layout holds while their inputs' are held, with the reason they are
    replicated (the pieces of a split are its own: the split is replicated, not they)."""
    return {n.name: f"{why}, which no per-node layout holds: computed whole on every node"
            for n, lab in labels.items() if (why := _unlaid(lab))
            and not any(_unlaid(labels.get(a)) for a in n.all_input_nodes)}
