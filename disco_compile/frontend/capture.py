"""Capture: trace a model with torch.fx, keeping chosen modules as opaque leaves.

`trace` returns a `torch.fx.GraphModule` that computes exactly what the model
computes (in eval mode). When tracing fails, the error names the module being
traced, the user source line, and suggests `leaf_modules`.
"""
from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Iterable

import torch
import torch.fx as fx

from ..errors import TraceFailure

LeafSpec = Iterable["type[torch.nn.Module] | str"]

_TORCH_DIR = os.path.dirname(torch.__file__)


class _LeafTracer(fx.Tracer):
    """A tracer that treats user-chosen modules as leaves and remembers which
    module it was inside when tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.open_modules: list[tuple[str, str]] = []

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.open_modules.append((name, type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self.open_modules.pop()
        return out


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the model code that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def trace(model: torch.nn.Module, leaf_modules: LeafSpec = ()) -> fx.GraphModule:
    """Trace a deep copy of `model` in eval mode; the copy owns its own weights.

    A GraphModule whose submodule calls are all leaves (as exported.to_module makes) is a trace
    already: its graph is kept as it is, with its node names."""
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    unknown = leaf_names - {name for name, _ in model.named_modules()}
    if unknown:
        raise TraceFailure(f"leaf_modules names {sorted(unknown)} are not submodules of the model; "
                           f"use qualified names as in model.named_modules(), e.g. 'layer1.0.conv1'")
    model = copy.deepcopy(model).eval()
    tracer = _LeafTracer(leaf_types, leaf_names)
    if isinstance(model, fx.GraphModule) and all(
            tracer.is_leaf_module(model.get_submodule(n.target), n.target)
            for n in model.graph.nodes if n.op == "call_module"):
        return fx.GraphModule(model, model.graph, type(model).__name__)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many exception types; all mean "not traceable"
        where = tracer.open_modules[-1] if tracer.open_modules else ("", type(model).__name__)
        frame = _user_frame(exc)
        module_desc = f"module '{where[0]}' ({where[1]})" if where[0] else f"the top-level module ({where[1]})"
        hint = (f"pass leaf_modules=['{where[0]}'] (or its class {where[1]}) so it runs as one opaque op"
                if where[0] else "mark the untraceable submodule with leaf_modules=[...] or make the code traceable")
        raise TraceFailure(
            f"torch.fx could not trace the model: {type(exc).__name__}: {exc}\n"
            f"  while tracing {module_desc}" + (f"\n  at {frame}" if frame else "") +
            f"\n  what to do: {hint}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
