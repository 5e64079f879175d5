"""The op registry: every op the compiler splits belongs to one op family, which holds the op's channel rule
(analysis), its lowering (per-node programs) and, where a torch.export program needs it, its ATen raising.

A *rule* receives a `RuleContext` (the fx node, its concrete argument values, the labels of its tensor
arguments, its concrete output) and returns the labels of its output (ir/labels.py), or raises `Fallback`,
and the op is replicated. Ops are keyed by target: a function (`torch.cat`, `operator.add`), a method name
(`"view"`), or a module class (looked up along the class's MRO). An op with no entry falls back to the
*replicate* family: its inputs are gathered on every node and it runs whole on every node, which is always
correct and is costed and named in the report.

A *lowering* is `lower(builder, n, module, op)`: it writes what node `builder.j` computes of fx node `n` into
the node's program (backend/lower.py's NodeBuilder, whose helpers it calls). A family registers its ops with
`Family.ops(*targets, rule=..., aten=..., **data)`: every op gets the family's lowering and `data` (what the
lowering needs to know of that op, e.g. the statistics a normalisation merges), so nothing can pass the
analysis that the lowering has not been told about. `check()` runs once the family modules are imported
(ops/__init__.py): a family without a lowering, an op registered twice, or an ATen raising to a target the
analysis does not know is an error then, not a surprise at export.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..ir import ChannelUniverse, MixingLayer, ReplicatedOp, StatExchange


class Fallback(Exception):
    """Raised by a rule that cannot handle this use of its op; the op is replicated."""


class RegistryError(RuntimeError):
    """The op registry is inconsistent (a programming error in an op family module)."""


@dataclass
class RuleContext:
    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    label_args: tuple
    label_kwargs: dict
    out: Any
    universe: ChannelUniverse
    nodes: int
    mixing: list[MixingLayer] = field(default_factory=list)
    stats: list[StatExchange] = field(default_factory=list)

    def leaves(self) -> list[tuple[Any, Any]]:
        """(value, labels) of every argument leaf, in order (labels None for non-tensors)."""
        return paired_leaves((self.args, self.kwargs), (self.label_args, self.label_kwargs))

    def tensor_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(value, labels) of every tensor argument, in order."""
        return [(v, lab) for v, lab in self.leaves() if isinstance(v, torch.Tensor)]

    def input_node_names(self) -> list[str]:
        return [n.name for n in self.node.all_input_nodes]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        return node_arg(self.args, self.kwargs, index, name, default)

    def first_labelled(self) -> tuple[torch.Tensor, torch.Tensor]:
        for value, labels in self.tensor_inputs():
            if labels is not None:
                return value, labels
        raise Fallback("no labelled input")


def node_arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` (or keyword `name`) of a call."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def argument_leaf(x: Any) -> bool:
    """A leaf of an fx argument structure: None, and a torch.Size (a shape read off a node, `x.shape`, whose
    labels are one None)."""
    return x is None or isinstance(x, torch.Size)


def paired_leaves(values: Any, labels: Any) -> list[tuple[Any, Any]]:
    """Flatten an fx argument structure and its labels alike (argument_leaf on both sides)."""
    return list(zip(pytree.tree_leaves(values, is_leaf=argument_leaf),
                    pytree.tree_leaves(labels, is_leaf=argument_leaf),
                    strict=False))  # a replicated container has one None for all its values


Rule = Callable[[RuleContext], Any]
Lowering = Callable[..., None]


@dataclass(frozen=True)
class Op:
    """One registered op: its family, its channel rule and what the family's lowering needs to know of it."""
    family: Family
    rule: Rule | None
    data: MappingProxyType

    def lower(self, builder, n: fx.Node, module: nn.Module | None) -> None:
        self.family.lowering(builder, n, module, self)


class Family:
    """An op family: the ops it registers (each with its rule) and the one lowering they share."""

    def __init__(self, name: str):
        self.name = name
        self.lowering: Lowering | None = None
        self.targets: list[Any] = []
        FAMILIES.append(self)

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    def ops(self, *targets: Any, rule: Rule | None, aten: dict | None = None, **data: Any) -> Op:
        """Register `targets` with `rule`; `aten` maps ATen overloads to the registered target they raise to."""
        op = Op(self, rule, MappingProxyType(data))
        for t in dict.fromkeys(targets):  # aliases (F.relu_ is torch.relu_) once
            if t in _OPS:
                raise RegistryError(f"{describe(t)} is registered twice: by {_OPS[t].family.name} and {self.name}")
            _OPS[t] = op
            self.targets.append(t)
        for overload, target in (aten or {}).items():
            if target not in targets:
                raise RegistryError(f"{self.name}: {overload} raises to {describe(target)}, which it does not "
                                    f"register")
            _ATEN[overload] = target
        return op

    def rule(self, *targets: Any, aten: dict | None = None, **data: Any) -> Callable[[Rule], Rule]:
        """Decorator form of `ops`."""
        def deco(fn: Rule) -> Rule:
            self.ops(*targets, rule=fn, aten=aten, **data)
            return fn
        return deco

    def lowers(self, fn: Lowering) -> Lowering:
        """Decorator: the family's lowering."""
        if self.lowering is not None:
            raise RegistryError(f"{self.name} has two lowerings")
        self.lowering = fn
        return fn


FAMILIES: list[Family] = []
_OPS: dict[Any, Op] = {}
_ATEN: dict[Any, Any] = {}


def describe(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def lookup(node: fx.Node, module: nn.Module | None) -> Op | None:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in _OPS:
                return _OPS[cls]
        return None
    if node.op in ("call_function", "call_method"):
        return _OPS.get(node.target)
    return None


def registered() -> MappingProxyType:
    """Every registered target -> its Op."""
    return MappingProxyType(_OPS)


def aten_raising() -> MappingProxyType:
    """ATen overload -> the registered torch function a torch.export program's call is raised to."""
    return MappingProxyType(_ATEN)


def check() -> None:
    """The registry is consistent: every family that registers ops lowers them."""
    for family in FAMILIES:
        if family.targets and family.lowering is None:
            raise RegistryError(f"op family {family.name} registers {len(family.targets)} ops for analysis but has "
                                f"no lowering: export could not build them")


def describe_target(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return type(module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def call_like(n: fx.Node, module: nn.Module | None, args, kwargs):
    """What fx node `n` computes from these arguments."""
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        return module(*args, **kwargs)
    return n.target(*args, **kwargs)


def replicated(ctx: RuleContext, reason: str) -> ReplicatedOp:
    return ReplicatedOp(ctx.node.name, describe_target(ctx.node, ctx.module), reason, ctx.input_node_names())
