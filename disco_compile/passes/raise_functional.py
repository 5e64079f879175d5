"""Raise functional layers: a call of F.conv1d/2d/3d or F.linear whose weight (and bias) comes from the model's
parameters becomes a call of an nn.Conv1d/2d/3d or nn.Linear module, so the mixing family (ops/mixing.py) splits
it as it splits the module. `torch.addmm(b, x, W)` and `x @ W` with a 2-D parameter W (GPT-2's Conv1D) are the
same linear layer, with weight W^T:

    F.conv2d(x, W, b, stride, padding, dilation, groups) -> nn.Conv2d(W.shape[1] * groups, W.shape[0],
                                                            W.shape[2:], stride, padding, dilation, groups)
    F.linear(x, W, b)                                    -> nn.Linear(W.shape[1], W.shape[0])
    torch.addmm(b, x, W), x @ W                          -> nn.Linear(W.shape[0], W.shape[1]), weight W^T

A weight or bias that is a Parameter is shared: the new module holds that same Parameter object. One computed from
parameters alone (no model input reaches it: timm's StdConv2d / ScaledStdConv2d weight standardisation in NFNet,
W^T above, BEiT's and SwinV2's qkv bias cat(q_bias, zeros, v_bias)) makes a module of the `Computed*` classes
here: its `weight` is `weight_fn()` (its `bias` `bias_fn()`), the graph of that computation (sharing the Parameters
it reads), evaluated at each use, so the result is exact and fine-tuning trains the parameters it is computed from
(ops/modules.py's partitioned layers keep the functions). A weight or bias that a model input reaches stays as it
is and is replicated, named in the report.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops.modules import ComputedWeight
from ..ops.registry import node_arg

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_ARGS = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_MATMULS = (torch.matmul, operator.matmul)


class ComputedLinear(ComputedWeight, nn.Linear):
    """nn.Linear whose weight or bias is computed (`weight_fn()`, `bias_fn()`)."""


class ComputedConv1d(ComputedWeight, nn.Conv1d):
    """nn.Conv1d whose weight or bias is computed."""


class ComputedConv2d(ComputedWeight, nn.Conv2d):
    """nn.Conv2d whose weight or bias is computed."""


class ComputedConv3d(ComputedWeight, nn.Conv3d):
    """nn.Conv3d whose weight or bias is computed."""


_COMPUTED = {nn.Linear: ComputedLinear, nn.Conv1d: ComputedConv1d, nn.Conv2d: ComputedConv2d,
             nn.Conv3d: ComputedConv3d}


def _parameter(gm: fx.GraphModule, a) -> nn.Parameter | None:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        value = operator.attrgetter(a.target)(gm)
        if isinstance(value, nn.Parameter):
            return value
    return None


def _parameter_graph(gm: fx.GraphModule, w: fx.Node) -> fx.GraphModule | None:
    """The computation of `w` as a GraphModule with no inputs, if it reads parameters and no model input."""
    needed: list[fx.Node] = []
    todo, seen = [w], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("get_attr", "call_function", "call_method"):
            return None  # a model input (placeholder) or a module call reaches the weight
        needed.append(n)
        todo.extend(n.all_input_nodes)
    if not any(_parameter(gm, n) is not None for n in needed):
        return None
    graph, env = fx.Graph(), {}
    for n in (n for n in gm.graph.nodes if n in seen):  # in the graph's order
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[w])
    return fx.GraphModule(gm, graph, "ParameterFn")  # holds the same Parameter objects as gm


def _normalised(gm: fx.GraphModule, n: fx.Node) -> tuple[fx.Node, object, object]:
    """(input, weight, bias) of a linear layer or convolution call, weight in (out, in, ...) layout."""
    if n.target is torch.addmm:
        bias, x, w = (node_arg(n.args, n.kwargs, k, name) for k, name in enumerate(("input", "mat1", "mat2")))
    elif n.target in _MATMULS:
        (x, w), bias = n.args, None
    else:
        return node_arg(n.args, n.kwargs, 0, "input"), node_arg(n.args, n.kwargs, 1, "weight"), \
            node_arg(n.args, n.kwargs, 2, "bias")
    with gm.graph.inserting_before(n):
        return x, gm.graph.call_method("t", (w,)), bias


def _is_layer_call(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is torch.addmm:
        return not (set(n.kwargs) & {"beta", "alpha"}) and len(n.args) == 3
    if n.target in _MATMULS:
        w = _parameter(gm, n.args[1])
        return w is not None and w.dim() == 2
    return n.target in (*_CONVS, F.linear)


def _layer(gm: fx.GraphModule, n: fx.Node, w, bias_arg) -> nn.Module | None:
    """The module computing call `n`, holding its parameters (or the functions computing them from parameters);
    None if they are neither."""
    weight, bias = _parameter(gm, w), _parameter(gm, bias_arg)
    weight_fn = _parameter_graph(gm, w) if weight is None and isinstance(w, fx.Node) else None
    bias_fn = _parameter_graph(gm, bias_arg) if bias is None and isinstance(bias_arg, fx.Node) else None
    if (weight is None and weight_fn is None) or (bias_arg is not None and bias is None and bias_fn is None):
        return None
    shape = weight.shape if weight is not None else weight_fn().shape
    if n.target in _CONVS:
        stride, padding, dilation, groups = (node_arg(n.args, n.kwargs, 3 + k, name, default)
                                             for k, (name, default) in enumerate(_CONV_ARGS))
        cls, size = _CONVS[n.target], (shape[1] * groups, shape[0], tuple(shape[2:]))
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    else:
        cls, size, kwargs = nn.Linear, (shape[1], shape[0]), {}
    computed = weight_fn is not None or bias_fn is not None
    m = (_COMPUTED[cls] if computed else cls)(*size, bias=bias_arg is not None, device="meta", **kwargs)
    for name, value, fn in (("weight", weight, weight_fn), ("bias", bias, bias_fn)):
        if fn is not None:
            m.compute(name, fn)
        elif value is not None:
            setattr(m, name, value)
    return m.eval()


def _name(n: fx.Node, w) -> str:
    source = w if w.op == "get_attr" else next((a for a in w.all_input_nodes if a.op == "get_attr"), w)
    return f"{str(source.target).replace('.', '_')}_{n.name}"


def raise_functional(gm: fx.GraphModule) -> int:
    """Rewrite, in place, the functional convolutions and linear layers of `gm` (module docstring); returns how
    many."""
    done = 0
    for n in list(gm.graph.nodes):
        if not _is_layer_call(gm, n):
            continue
        x, w, bias = _normalised(gm, n)
        m = _layer(gm, n, w, bias)
        if m is None:
            if n.target is torch.addmm or n.target in _MATMULS:
                gm.graph.erase_node(w)  # the W^T _normalised made, for a call that stays as it is
            continue
        name = _name(n, w)
        gm.add_submodule(name, m)
        with gm.graph.inserting_before(n):
            call = gm.graph.call_module(name, (x,))
        call.meta = dict(n.meta)
        n.replace_all_uses_with(call)
        gm.graph.erase_node(n)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()  # the weights' computations, now in the modules' weight_fn
        gm.recompile()
    return done
