"""Raise functional layers: a call of F.conv1d/2d/3d or F.linear whose weight (and bias) is a parameter of the
model becomes a call of an nn.Conv1d/2d/3d or nn.Linear module holding those same parameters, so the mixing
family (ops/mixing.py) splits it as it splits the module. The new module shares the Parameter objects:
fine-tuning trains the model's own weights. A call whose weight is computed (or a plain tensor) stays as it
is and is replicated, named in the report.

    F.conv2d(x, W, b, stride, padding, dilation, groups) -> nn.Conv2d(W.shape[1] * groups, W.shape[0],
                                                            W.shape[2:], stride, padding, dilation, groups)
    F.linear(x, W, b)                                    -> nn.Linear(W.shape[1], W.shape[0])
"""
from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops.registry import node_arg

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_ARGS = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))


def _parameter(gm: fx.GraphModule, a) -> nn.Parameter | None:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        value = operator.attrgetter(a.target)(gm)
        if isinstance(value, nn.Parameter):
            return value
    return None


def _layer(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """The module computing call `n`, holding its parameters; None if they are not parameters."""
    weight = _parameter(gm, node_arg(n.args, n.kwargs, 1, "weight"))
    bias_arg = node_arg(n.args, n.kwargs, 2, "bias")
    bias = _parameter(gm, bias_arg)
    if weight is None or (bias_arg is not None and bias is None):
        return None
    if n.target is F.linear:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        stride, padding, dilation, groups = (node_arg(n.args, n.kwargs, 3 + k, name, default)
                                             for k, (name, default) in enumerate(_CONV_ARGS))
        m = _CONVS[n.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias is not None, device="meta")
    m.weight = weight
    if bias is not None:
        m.bias = bias
    return m.eval()


def raise_functional(gm: fx.GraphModule) -> int:
    """Rewrite, in place, the functional convolutions and linear layers of `gm` (module docstring); returns how
    many."""
    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (*_CONVS, F.linear):
            continue
        m = _layer(gm, n)
        if m is None:
            continue
        name = f"{node_arg(n.args, n.kwargs, 1, 'weight').target.replace('.', '_')}_{n.name}"
        gm.add_submodule(name, m)
        with gm.graph.inserting_before(n):
            call = gm.graph.call_module(name, (node_arg(n.args, n.kwargs, 0, "input"),))
        call.meta = dict(n.meta)
        n.replace_all_uses_with(call)
        attrs = [a for a in n.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(n)
        for a in attrs:
            if not a.users:
                gm.graph.erase_node(a)
        done += 1
    if done:
        gm.recompile()
    return done
