"""Capture: a model as a user has it -> one torch.fx GraphModule computing exactly what it computes (eval mode).

Example inputs (`bind_inputs`): a tensor or a list (the one input: a detector's list of images), a tuple
(positional inputs) or a dict (keyword inputs, as Hugging Face models take `input_ids`, `attention_mask`,
`pixel_values`). They are bound to the parameters of the model's `forward` in one place, with one contract: the
captured graph takes the given inputs, positionally, in the order `forward` declares them (`ExampleInputs.names`),
and every optional parameter not given is bound to its default (torch.fx `concrete_args`: `attn_mask=None`,
`is_causal=False`, `embed=False`), so it is no input of the graph, of the DISCO model or of the export.

Two routes (`capture`), the first that works:
1. torch.fx (`trace`): a `torch.fx.Tracer` whose leaves are torch.nn's plus the user's `leaf_modules` (classes or
   qualified names); the graph keeps the model's module structure. timm's `pad_same` ("same" padding computed
   from the input's size, which is control flow on a traced size: Conv2dSame, StdConv2dSame, MaxPool2dSame) is
   traced as one call, and `capture` makes it the F.pad it computes at the example's size,
   F.pad(x, pad_same_arg(x.shape[-2:], kernel, stride, dilation), value=value) (timm/layers/padding.py), as
   every other shape in the graph is the example's.
2. torch.export, when torch.fx cannot trace the model (Python control flow on sizes, Hugging Face's
   `'Proxy' object does not support item assignment`): `torch.export.export` on the bound inputs, raised back to
   modules by exported.to_module. Dim 0 of every input is exported dynamic (`Dim.DYNAMIC`; an example batch of
   1 is given twice, since torch.export specialises sizes 0 and 1), so the graph's reshapes read the batch from
   the input and the shards take any batch; where torch.export finds dim 0 fixed (a model built for one batch,
   a sequence-first input) it is exported with the example's shapes, and that batch only. The route taken and
   why is said in one warning and kept in `Captured.route`.

When both fail, the error names the module being traced, the user source line, suggests `leaf_modules`, and
gives torch.export's reason.
"""
from __future__ import annotations

import copy
import inspect
import os
import traceback
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import ExampleInputError, TraceFailure

LeafSpec = Iterable["type[torch.nn.Module] | str"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_ASSERTS = (torch._assert, fx._symbolic_trace._assert_is_none)  # fx's checks of a specialised argument


@dataclass(frozen=True)
class ExampleInputs:
    """Example inputs bound to `forward`: `args` in the order `forward` declares `names`; `defaults` the optional
    parameters not given, bound to their default values."""

    args: tuple
    names: tuple[str, ...]
    defaults: dict[str, object] = field(default_factory=dict)

    def as_kwargs(self) -> dict[str, object]:
        return dict(zip(self.names, self.args, strict=True))


@dataclass(frozen=True)
class Captured:
    """The captured graph and the route that made it: "torch.fx", "torch.export" (a program given), or
    "torch.export (torch.fx failed: ...)"."""

    graph_module: fx.GraphModule
    route: str


def bind_inputs(model: torch.nn.Module, example_inputs) -> ExampleInputs:
    """Bind a tensor, a tuple or a dict of example inputs to `model.forward` (module docstring)."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}
    params = inspect.signature(model.forward).parameters
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ExampleInputError(f"the example inputs do not fit {type(model).__name__}.forward{_signature(params)}: "
                                f"{exc}; give a tensor, a tuple of positional inputs or a dict of keyword "
                                f"inputs") from None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    given = [(name, bound.arguments[name]) for name, p in params.items() if name in bound.arguments
             and p.kind not in variadic]
    if any(p.kind in variadic and name in bound.arguments for name, p in params.items()):
        raise ExampleInputError(f"the example inputs fill {type(model).__name__}.forward's variadic parameters "
                                f"(*args/**kwargs) {_signature(params)}; give each input by its parameter name")
    missing = [name for name, p in params.items() if name not in bound.arguments and p.kind not in variadic
               and p.default is inspect.Parameter.empty]
    if missing:
        raise ExampleInputError(f"{type(model).__name__}.forward{_signature(params)} needs {missing}, which the "
                                f"example inputs do not give; add them (a tuple in that order, or a dict by name)")
    defaults = {name: p.default for name, p in params.items() if name not in bound.arguments
                and p.kind not in variadic}
    return ExampleInputs(tuple(v for _, v in given), tuple(n for n, _ in given), defaults)


def _signature(params) -> str:
    return "(" + ", ".join(str(p) for p in params.values()) + ")"


class _LeafTracer(fx.Tracer):
    """A tracer that treats user-chosen modules as leaves and remembers which
    module it was inside when tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__(autowrap_functions=_size_dependent())
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


def _size_dependent() -> tuple:
    """Functions traced as one call because they branch on the input's size (module docstring)."""
    try:
        from timm.layers.padding import pad_same
    except ImportError:  # timm is optional
        return ()
    return (pad_same,)


class _SamePadding(fx.Interpreter):
    """Runs the graph on the example inputs and records each pad_same call's F.pad arguments."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.pads: dict[fx.Node, tuple[list[int], float]] = {}

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target in _size_dependent():
            from timm.layers.padding import pad_same_arg
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            call = inspect.signature(n.target).bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            self.pads[n] = (pad_same_arg(a["x"].shape[-2:], a["kernel_size"], a["stride"], a["dilation"]),
                            a["value"])
        return super().run_node(n)


def _static_same_padding(gm: fx.GraphModule, inputs: tuple) -> None:
    """Each pad_same call of `gm` becomes the F.pad it computes on `inputs` (module docstring)."""
    if not any(n.op == "call_function" and n.target in _size_dependent() for n in gm.graph.nodes):
        return
    shapes = _SamePadding(gm)
    with torch.no_grad():
        shapes.run(*inputs)
    for n, (pad, value) in shapes.pads.items():
        with gm.graph.inserting_before(n):
            padded = gm.graph.call_function(torch.nn.functional.pad, (n.args[0], pad), {"value": value})
        n.replace_all_uses_with(padded)
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the model code that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def _drop_specialised(graph: fx.Graph, forward, defaults: dict[str, object]) -> None:
    """Remove the placeholders fx keeps for arguments bound to a default, with the checks fx adds on them: the
    graph's inputs are then the given inputs only."""
    if not defaults:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = list(inspect.signature(forward).parameters)  # fx makes one placeholder per parameter, in order
    for p, name in zip(placeholders, names, strict=True):
        if name not in defaults:
            continue
        for user in list(p.users):  # fx renames them (`mask` -> `mask_1`)
            user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a, p=p, v=defaults[name]: v
                                                     if a is p else a)
        graph.erase_node(p)
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target in _ASSERTS]:
        if all(a.op != "placeholder" for a in n.all_input_nodes):
            graph.erase_node(n)


def trace(model: torch.nn.Module, leaf_modules: LeafSpec = (), defaults: dict[str, object] | None = None
          ) -> fx.GraphModule:
    """Trace a deep copy of `model` in eval mode with torch.fx, `defaults` (optional forward parameters) bound to
    their values; the copy owns its own weights.

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
        graph = tracer.trace(model, concrete_args=dict(defaults or {}) or None)
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
    _drop_specialised(graph, model.forward, dict(defaults or {}))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if defaults:
        gm.graph.eliminate_dead_code()  # the comparisons fx made on a specialised argument
        gm.recompile()
    return gm


def _export(model: torch.nn.Module, inputs: ExampleInputs) -> torch.export.ExportedProgram:
    """torch.export of the bound inputs with dim 0 dynamic (module docstring), else with the example's shapes."""
    given = inputs.as_kwargs()
    batched = {k for k, v in given.items() if v.dim() > 0}
    wider = {k: torch.cat([v, v]) if k in batched and v.shape[0] == 1 else v for k, v in given.items()}
    dims = {k: {0: torch.export.Dim.DYNAMIC} if k in batched else None for k in given}
    try:
        return torch.export.export(copy.deepcopy(model).eval(), (), wider, dynamic_shapes=dims)
    except Exception:  # torch.export specialised dim 0 (a fixed batch, or no batch there): the example's shapes
        return torch.export.export(copy.deepcopy(model).eval(), (), given)


def capture(model: torch.nn.Module, inputs: ExampleInputs, leaf_modules: LeafSpec = ()) -> Captured:
    """The model's graph by the first route that works (module docstring); a fall-back to torch.export is said
    in one warning naming why torch.fx failed."""
    try:
        gm = trace(model, leaf_modules, inputs.defaults)
        _static_same_padding(gm, inputs.args)
        return Captured(gm, "torch.fx")
    except TraceFailure as fx_failure:
        if isinstance(model, fx.GraphModule) or any(isinstance(x, str) for x in leaf_modules) or \
                not all(isinstance(x, torch.Tensor) for x in inputs.args):
            raise  # a program raised already, leaves the user chose, inputs other than tensors: none for torch.export
        why = str(fx_failure).splitlines()[0].removeprefix("torch.fx could not trace the model: ")
        from .exported import to_module  # exported.py reads programs; imported here, where one is made
        try:
            program = _export(model, inputs)
        except Exception as exc:  # torch.export raises many exception types; all mean "not exportable"
            raise TraceFailure(f"{fx_failure}\n  torch.export could not capture it either: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        route = f"torch.export (torch.fx failed: {why[:200]})"
        warnings.warn(f"disco_compile: captured {type(model).__name__} with {route}", stacklevel=3)
        return Captured(to_module(program), route)
