"""Reading torch.export programs (`.pt2`): an ATen graph raised back to the module-level ops the op families know.

torch.export writes a model as a flat graph of ATen operators whose weights are graph attributes; the
passes read layers as modules (nn.Conv2d, nn.Linear, nn.BatchNorm2d: ops/, budget/selection.py, backend/lower.py)
and everything else as torch-level functions. `to_module` functionalises the program
(`run_decompositions({})`: in-place ops become out-of-place ones, BatchNorm becomes
`_native_batch_norm_legit_no_training`) and rewrites each ATen call:

    aten.convNd(x, W, b, stride, padding, dilation, groups)           -> nn.ConvNd holding W, b
    aten.linear(x, W, b)                                                -> nn.Linear
      (with W or b computed in the graph, as weight_norm's, F.convNd / F.linear: raise_functional raises them)
    aten.addmm(b, x, W), aten.mm(x, W), aten.matmul(x, W) (GPT-2's Conv1D: x @ W + b)
                                                                        -> nn.Linear with weight W^T
    aten._native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]
                                                                        -> nn.BatchNormNd in eval mode
    aten.layer_norm(x, shape, w, b, eps), aten.group_norm(x, G, w, b, eps) -> nn.LayerNorm, nn.GroupNorm
    aten.relu(x), aten.add(a, b), aten.max_pool2d(x, ...), aten.cat(...) ... -> the torch function with
                                                                           the same arguments (_FUNCTIONS)
    aten.expand(x, sizes)                                               -> x.expand(sizes)
    aten.sym_size.int(x, d) (a dynamic dim's size, the batch)           -> x.size(d) (torch.onnx's tracer
                                                                           records it; an op's int it bakes in)
    aten.upsample_{nearest,bilinear,bicubic}2d(x, size, [align,] scale) -> F.interpolate
    aten.select(x, d, i), aten.slice(x, d, start, end, step)           -> x[..., i], x[..., start:end:step]
    aten.clone(x), aten.alias(x)                                        -> x (a graph without mutation)
    aten.slice_scatter(x, src, d) over the whole of dim d (x[:] = src)  -> src
    aten.arange(...) (sizes read off a dynamic batch)                   -> torch.arange(...) (traceable to ONNX)
    aten._to_copy(x, dtype=d) (a mask cast, HF's attention masks)       -> x.to(d)
    aten.scaled_dot_product_attention(q, k, v) cut from one packed in_proj and read by an out_proj
                                                                        -> heads_attention (passes/raise_attention.py)

A module takes the name of the attribute its weight had (`layer1.0.conv1.weight` -> `layer1.0.conv1`),
so reports name the layers as the source model did. Any other ATen call stays as it is: it computes the
same, and the passes run it whole on every node (replicated, named in the cost report). `to_module`
checks the result against the program on its example input before returning it.
"""
from __future__ import annotations

import logging
import operator
import os
import sys
import zipfile

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..errors import ExportedProgramError
from ..ops import registry
from ..passes.raise_attention import SDPA, raise_attention

aten = torch.ops.aten

_FUNCTIONS = dict(registry.aten_raising())  # each op family registers the ATen calls it raises (ops/)
_METHODS = {aten.expand.default: "expand", aten.sym_size.int: "size"}
_RESIZES = {aten.upsample_nearest2d.vec: "nearest", aten.upsample_bilinear2d.vec: "bilinear",
            aten.upsample_bicubic2d.vec: "bicubic"}
_COPIES = (aten.clone.default, aten.alias.default)
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_CONVS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d,
          aten.conv1d.padding: nn.Conv1d, aten.conv2d.padding: nn.Conv2d, aten.conv3d.padding: nn.Conv3d}
_FUNCTIONAL_CONVS = {aten.conv1d: F.conv1d, aten.conv2d: F.conv2d, aten.conv3d: F.conv3d}
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def load(path: str | os.PathLike) -> torch.export.ExportedProgram:
    if not zipfile.is_zipfile(path):
        raise ExportedProgramError(f"cannot read {path} as a torch.export program: it is not the zip archive "
                                   f"torch.export.save writes")
    quiet = logging.getLogger("torch.export")  # it logs a traceback before trying an older format
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return torch.export.load(path)
    except Exception as exc:  # torch.export.load raises many types for files it cannot read
        raise ExportedProgramError(f"cannot read {path} as a torch.export program (torch.export.save): "
                                   f"{type(exc).__name__}: {exc}") from None
    finally:
        quiet.setLevel(level)


def _inputs(ep: torch.export.ExportedProgram) -> list[object]:
    """The example value (a fake tensor, or another object) of each input the program's caller gives."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return [vals[s.arg.name] for s in ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]


def example_shapes(ep: torch.export.ExportedProgram, *, hinted: bool = False) -> list[tuple[int, ...] | None]:
    """Each input's shape as exported; None where a dimension is dynamic (or the input is no tensor), or with
    `hinted` the size that dimension had in the example the program was exported with."""
    def size(d):
        return d if isinstance(d, int) else d.node.hint if hinted else None
    shapes = [tuple(size(d) for d in v.shape) if isinstance(v, torch.Tensor) else None for v in _inputs(ep)]
    return [s if s is not None and None not in s else None for s in shapes]


class _Raiser:
    """Copies a functional ATen graph into a new graph, replacing layer calls by modules."""

    def __init__(self, source: fx.GraphModule):
        self.source = source
        self.graph = fx.Graph()
        self.attrs: dict[str, object] = {}  # qualified name -> module or tensor of the new root
        self.env: dict[fx.Node, object] = {}
        self.kept: list[str] = []  # ATen ops left as they are
        self.layers: dict[tuple, str] = {}  # a layer's op, weights and arguments -> its module's name

    def tensor(self, node: object) -> torch.Tensor | None:
        if node is None:
            return None
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise _Keep  # a weight computed in the graph: the op stays as it is
        return operator.attrgetter(node.target)(self.source)

    def name_for(self, *weights: object) -> str:
        source = next((w for w in weights if isinstance(w, fx.Node)), None)
        base = source.target.rpartition(".")[0] if source is not None and "." in source.target else "layer"
        name, k = base, 1
        while any(a == name or a.startswith(name + ".") or name.startswith(a + ".") for a in self.attrs):
            name, k = f"{base.replace('.', '_')}_{k}", k + 1
        return name

    def module_name(self, node: fx.Node, m: nn.Module, *weights: object) -> str:
        """Module m's name; a layer called again with the same weights and arguments is the same module."""
        given = (*node.args, *node.kwargs.values())  # its weights (get_attr) and arguments, not its input
        key = (node.target, *(a.target if isinstance(a, fx.Node) else a for a in given
                              if not isinstance(a, fx.Node) or a.op == "get_attr"))
        if key not in self.layers:
            self.layers[key] = self.name_for(*weights)
            self.attrs[self.layers[key]] = m.eval()
        return self.layers[key]

    def module(self, node: fx.Node, m: nn.Module, *weights: object) -> fx.Node:
        """A call of module m on the op's first argument (module_name)."""
        return self.graph.call_module(self.module_name(node, m, *weights), (self.arg(node.args[0]),))

    def arg(self, a):
        def one(x):
            if not isinstance(x, fx.Node):
                return x
            if x not in self.env and x.op == "get_attr":
                self.attrs[x.target] = operator.attrgetter(x.target)(self.source)
                self.env[x] = self.graph.get_attr(x.target)
            return self.env[x]
        return fx.map_arg(a, one)

    def computed(self, node: fx.Node, fn, args: tuple) -> fx.Node:
        """The torch function `fn` on `args`: a layer whose weight (or bias) the graph computes, which
        passes/raise_functional.py raises to a module when only parameters reach that weight."""
        return self.graph.create_node("call_function", fn, self.arg(args), name=_readable_name(node))

    def conv(self, node: fx.Node) -> fx.Node:
        x, w, b, stride, padding, dilation, groups = (list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:])[:7]
        try:
            weight, bias = self.tensor(w), self.tensor(b)
        except _Keep:
            fn = _FUNCTIONAL_CONVS[node.target.overloadpacket]
            return self.computed(node, fn, (x, w, b, stride, padding, dilation, groups))
        stride, padding, dilation = (v if isinstance(v, (int, str)) else tuple(v) for v in (stride, padding, dilation))
        m = _CONVS[node.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                                padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
        _assign(m, weight=weight, bias=bias)
        return self.module(node, m, w, b)

    def linear(self, node: fx.Node) -> fx.Node:
        x, w, b = (list(node.args) + [None])[:3]
        try:
            weight, bias = self.tensor(w), self.tensor(b)
        except _Keep:
            return self.computed(node, F.linear, (x, w, b))
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        _assign(m, weight=weight, bias=bias)
        return self.module(node, m, w, b)

    def matmul(self, node: fx.Node) -> fx.Node:
        """x @ W (+ b) with W a weight (in, out): the linear layer whose weight is W^T."""
        if node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                raise _Keep  # a scaled product: not a plain linear layer
            b, x, w = node.args
        else:
            (x, w), b = node.args, None
        weight, bias = self.tensor(w), self.tensor(b)
        if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[1:]):
            raise _Keep
        m = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
        _assign(m, weight=weight.t(), bias=bias)
        return self.graph.call_module(self.module_name(node, m, w, b), (self.arg(x),))

    def batch_norm(self, node: fx.Node) -> fx.Node:
        x, w, b, mean, var, momentum, eps = node.args
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            raise _Keep  # its saved statistics are used: not a plain inference BatchNorm
        rank = x.meta["val"].dim()
        weight, bias, running_mean, running_var = (self.tensor(t) for t in (w, b, mean, var))
        m = _BATCH_NORMS[rank](running_mean.numel(), eps=eps, momentum=momentum, affine=weight is not None)
        _assign(m, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
        return self.module(node, m, w, mean)

    def norm(self, node: fx.Node) -> fx.Node:
        if node.target is aten.layer_norm.default:
            x, shape, w, b, eps = (list(node.args) + [None, None, 1e-5][len(node.args) - 2:])[:5]
            weight, bias = self.tensor(w), self.tensor(b)
            m = nn.LayerNorm(shape, eps=eps, elementwise_affine=weight is not None, bias=bias is not None)
        else:
            x, groups, w, b, eps = (list(node.args) + [None, None, 1e-5][len(node.args) - 2:])[:5]
            weight, bias = self.tensor(w), self.tensor(b)
            m = nn.GroupNorm(groups, x.meta["val"].shape[1], eps=eps, affine=weight is not None)
        _assign(m, weight=weight, bias=bias)
        return self.module(node, m, w, b)

    def index(self, node: fx.Node) -> fx.Node:
        if node.target is aten.select.int:
            x, dim, i = node.args
            key = i
        else:
            x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
            key = slice(start, end, step)
        dim %= x.meta["val"].dim()
        return self.graph.create_node("call_function", operator.getitem, (self.arg(x), (slice(None),) * dim + (key,)),
                                      name=_readable_name(node))

    def resize(self, node: fx.Node) -> fx.Node:
        x, size, *rest = node.args
        align_corners, scale = (None, rest[0]) if node.target is aten.upsample_nearest2d.vec else rest
        kwargs = {"size": size} if size is not None else {"scale_factor": scale}
        kwargs.update(mode=_RESIZES[node.target], align_corners=align_corners)
        return self.graph.create_node("call_function", F.interpolate, (self.arg(x),), self.arg(kwargs),
                                      name=_readable_name(node))

    def raise_node(self, node: fx.Node) -> object:
        t = node.target
        if t in _CONVS:
            return self.conv(node)
        if t is aten.linear.default:
            return self.linear(node)
        if t in (aten.addmm.default, aten.mm.default, aten.matmul.default):
            return self.matmul(node)
        if t is aten._native_batch_norm_legit_no_training.default:
            return {0: self.batch_norm(node)}
        if t in (aten.layer_norm.default, aten.group_norm.default):
            return self.norm(node)
        if t in (aten.select.int, aten.slice.Tensor):
            return self.index(node)
        if t in _RESIZES:
            return self.resize(node)
        if t in _COPIES:
            return self.arg(node.args[0])
        if t is aten.slice_scatter.default and _whole_range(*node.args[2:], **node.kwargs):
            return self.arg(node.args[1])
        if t in _ARANGES:
            return self.graph.create_node("call_function", torch.arange, self.arg(node.args), self.arg(node.kwargs),
                                          name=_readable_name(node))
        if t is aten._to_copy.default and set(node.kwargs) <= {"dtype", "layout", "device", "pin_memory"} \
                and node.kwargs.get("dtype") is not None and not node.kwargs.get("pin_memory"):
            return self.graph.create_node("call_method", "to", (self.arg(node.args[0]), node.kwargs["dtype"]),
                                          name=_readable_name(node))
        if t in _FUNCTIONS:
            return self.graph.create_node("call_function", _FUNCTIONS[t], self.arg(node.args), self.arg(node.kwargs),
                                          name=_readable_name(node))
        if t in _METHODS:
            return self.graph.create_node("call_method", _METHODS[t], self.arg(node.args), self.arg(node.kwargs),
                                          name=_readable_name(node))
        raise _Keep

    def copy(self, node: fx.Node) -> object:
        if node.op == "call_function":
            if node.target is operator.getitem and isinstance(self.env.get(node.args[0]), dict):
                return self.env[node.args[0]][node.args[1]]
            try:
                return self.raise_node(node)
            except _Keep:
                if isinstance(node.target, torch._ops.OpOverload) and isinstance(node.meta.get("val"), torch.Tensor):
                    self.kept.append(str(node.target))
        return self.graph.node_copy(node, self.arg)

    def run(self, out_spec) -> fx.GraphModule:
        for node in self.source.graph.nodes:
            if node.op == "get_attr":
                continue  # copied where a kept op uses it; the modules hold the layers' weights
            if node.op == "call_module":  # torch.export's input guards (`_guards_fn`): no value
                if node.users:
                    raise ExportedProgramError(f"unexpected submodule call {node.target} in the program")
                continue
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                continue  # the dtype check of a traced .to(): it would keep whatever it checks alive
            if node.op == "output":
                flat = self.arg(list(pytree.tree_leaves(node.args[0])))
                self.graph.output(pytree.tree_unflatten(flat, out_spec))
                continue
            self.env[node] = self.copy(node)
        self.graph.lint()
        return fx.GraphModule(self.attrs, self.graph, "ExportedModule")


class _Keep(Exception):
    """The node is not raised: copy it as an ATen call."""


def _whole_range(dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> bool:
    """A slice that is its whole dim: slice_scatter over it writes every element (x[:] = src, as MViTv2's
    attn[:, :, 0:, 0:] += ..., decomposed with a dynamic batch)."""
    return start in (None, 0) and (end is None or end == sys.maxsize) and step == 1


def _readable_name(node: fx.Node) -> str:
    """The name the op had in the source model's modules: `layer1_0_relu` for a ReLU module's call,
    `layer1_0_add` for an add in layer1.0's forward; the op's own name outside any module."""
    stack = node.meta.get("nn_module_stack")
    op = node.target.overloadpacket.__name__ if isinstance(node.target, torch._ops.OpOverload) else node.name
    path, cls = list(stack.values())[-1] if stack else ("", "")
    if not path:
        return op
    name = path.replace(".", "_")
    return name if cls.startswith("torch.nn.modules.") else f"{name}_{op}"


def _assign(m: nn.Module, **tensors: torch.Tensor | None) -> None:
    with torch.no_grad():
        for name, t in tensors.items():
            if t is not None:
                getattr(m, name).copy_(t)


def to_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """An nn.Module (a GraphModule) computing what `ep` computes, with its layers as modules (see above).

    Its `kept_aten_ops` lists the ATen ops left as they are. Checked against `ep` on random inputs of the
    exported shapes and dtypes (where all are static), to 1e-4 relative. `fixed_batch` is the exported
    batch size when the module fails on twice that batch (a program exported with a static batch keeps
    shapes such as view(x, [1, 2048])), else None."""
    vals = _inputs(ep)
    if not all(isinstance(v, torch.Tensor) for v in vals):
        raise ExportedProgramError("the program takes inputs other than tensors; disco-compile reads programs "
                                   "whose inputs are tensors")
    source = ep.run_decompositions({}).module()
    raiser = _Raiser(source)
    gm = raiser.run(ep.module_call_graph[0].signature.out_spec)
    gm.fixed_batch = None
    kept = set(raiser.kept)
    shapes = example_shapes(ep)
    if all(s is not None for s in shapes):
        g = torch.Generator().manual_seed(0)
        inputs = [_random(s, v.dtype, g) for s, v in zip(shapes, vals, strict=False)]
        if raise_attention(gm, tuple(inputs)) and not any(n.target is SDPA for n in gm.graph.nodes):
            kept.discard(str(SDPA))
        with torch.no_grad():
            args, kwargs = pytree.tree_unflatten(inputs, ep.call_spec.in_spec)  # as exported: by position or name
            want, got = ep.module()(*args, **kwargs), gm(*inputs)
        for a, b in zip(pytree.tree_leaves(want), pytree.tree_leaves(got), strict=False):
            if isinstance(a, torch.Tensor) and not torch.allclose(
                    a, b, rtol=1e-4, atol=1e-5 * float(a.nan_to_num().abs().max()), equal_nan=True):
                raise ExportedProgramError(f"raising the program to modules changed its output (max abs "
                                           f"difference {(a - b).abs().max().item():.3g}); please report this "
                                           f"with the .pt2 file")
        if all(len(s) > 0 for s in shapes):
            try:
                with torch.no_grad():
                    gm(*(_random((2 * s[0], *s[1:]), v.dtype, g) for s, v in zip(shapes, vals, strict=False)))
            except Exception:  # any failure at another batch size means the program fixed its batch
                gm.fixed_batch = shapes[0][0]
    gm.kept_aten_ops = sorted(kept)
    return gm


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Normal values; integer and bool inputs all ones (valid token ids, masks that attend everywhere)."""
    return torch.randn(shape, generator=g, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
