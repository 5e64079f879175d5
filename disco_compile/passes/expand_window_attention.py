"""Expand windowed attention: Swin's and MaxViT's attention calls are rewritten, in place, into the
ops of window_attention.py that the channel analysis splits by heads.

Swin (`shifted_window_attention(x, qkv.weight, proj.weight, B, window, heads, shift, ...)`, an fx leaf):

    w = window_partition(x, window, shift)             pad, cyclic shift, windows: (B, windows, P, C)
    q, k, v = qkv(w).chunk(3, -1)                      the module's qkv weights as an nn.Linear
    o = window_heads_attention(q, k, v, heads, B, scale | logit_scale, mask)
    y = window_reverse(proj(o), window, shift, H, W)

The map size (H, W) comes from running the graph on the example inputs, so the
shift is dropped where torchvision drops it (a window as large as the padded
map) and the mask M is a constant buffer beside the attention's weights. Swin
V2 zeroes the key's part of the qkv bias on every call; the expanded Linear
holds it zeroed once.

MaxViT (`RelativePositionalMultiHeadAttention`, traced as a leaf: `MODULES`):

    q, k, v = to_qkv(x).chunk(3, -1)                   x: (B, groups, P, C)
    y = merge(window_heads_attention(q, k, v, heads, B, scale, scale_key=True))

Swin calls with dropout in training, or weights not laid out as in torchvision,
stay opaque: replicated, reported as having no channel rule. The expansion
runs the graph once for the map sizes (ShapeProp); channel_flow.analyse then
runs it again on the rewritten graph.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import shifted_window_attention

from ..ops.window_attention import (relative_position_bias, shifted_window_mask, window_heads_attention,
    window_partition, window_reverse)

MODULES = (RelativePositionalMultiHeadAttention,)  # traced as leaves, then expanded here


def _linear(gm: fx.GraphModule, weight: fx.Node, bias: fx.Node | None) -> str | None:
    """The module path of the weight (and bias) get_attr nodes, made an nn.Linear holding them; None if they
    are not one module's `weight` and `bias`."""
    if weight.op != "get_attr" or (bias is not None and bias.op != "get_attr"):
        return None
    path, field = weight.target.rpartition(".")[::2]
    if field != "weight" or (bias is not None and bias.target != f"{path}.bias"):
        return None
    holder = gm.get_submodule(path)
    if not isinstance(holder, nn.Linear):
        linear = nn.Linear(holder.weight.shape[1], holder.weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = holder.weight
        if bias is not None:
            linear.bias = holder.bias
        gm.add_submodule(path, linear)
    return path


def _heads_core(g: fx.Graph, qkv: fx.Node, heads: int, bias: fx.Node, kwargs: dict) -> fx.Node:
    chunks = g.call_method("chunk", (qkv, 3, -1))
    q, k, v = (g.call_function(operator.getitem, (chunks, i)) for i in range(3))
    return g.call_function(window_heads_attention, (q, k, v, heads, bias), kwargs)


def _expand_swin(gm: fx.GraphModule, n: fx.Node) -> bool:
    a = inspect.signature(shifted_window_attention).bind(*n.args, **n.kwargs)
    a.apply_defaults()
    a = a.arguments
    if a["training"] and (a["attention_dropout"] > 0 or a["dropout"] > 0):
        return False
    qkv_path = _linear(gm, a["qkv_weight"], a["qkv_bias"])
    proj_path = _linear(gm, a["proj_weight"], a["proj_bias"])
    if qkv_path is None or proj_path is None:
        return False
    _, height, width, channels = n.args[0].meta["tensor_meta"].shape
    window = tuple(a["window_size"])
    padded = (height + -height % window[0], width + -width % window[1])
    shift = tuple(0 if w >= p else s for w, p, s in zip(window, padded, a["shift_size"], strict=False))
    heads = a["num_heads"]
    g = gm.graph
    kwargs = {}
    if a["logit_scale"] is not None:
        kwargs["logit_scale"] = a["logit_scale"]
        if a["qkv_bias"] is not None:
            with torch.no_grad():
                gm.get_submodule(qkv_path).bias[channels:2 * channels].zero_()
    else:
        kwargs["scale"] = (channels // heads) ** -0.5
    if any(shift):
        owner = qkv_path.rpartition(".")[0]
        gm.get_submodule(owner).register_buffer(
            "shift_mask", shifted_window_mask(height, width, window, shift, n.args[0].meta["tensor_meta"].dtype))
    with g.inserting_before(n):
        if any(shift):
            kwargs["mask"] = g.get_attr(f"{owner}.shift_mask" if owner else "shift_mask")
        w = g.call_function(window_partition, (a["input"], window, shift))
        o = _heads_core(g, g.call_module(qkv_path, (w,)), heads, a["relative_position_bias"], kwargs)
        y = g.call_function(window_reverse, (g.call_module(proj_path, (o,)), window, shift, height, width))
    n.replace_all_uses_with(y)
    g.erase_node(n)
    for weight in (a["qkv_weight"], a["proj_weight"], a["qkv_bias"], a["proj_bias"]):
        if weight is not None and not weight.users:
            g.erase_node(weight)
    return True


def _expand_maxvit(gm: fx.GraphModule, n: fx.Node) -> bool:
    m = gm.get_submodule(n.target)
    g = gm.graph
    with g.inserting_before(n):
        bias = g.call_function(relative_position_bias, (g.get_attr(f"{n.target}.relative_position_bias_table"),
                                                        g.get_attr(f"{n.target}.relative_position_index"),
                                                        m.max_seq_len))
        o = _heads_core(g, g.call_module(f"{n.target}.to_qkv", n.args), m.n_heads, bias,
                        {"scale": m.scale_factor, "scale_key": True})
        y = g.call_module(f"{n.target}.merge", (o,))
    n.replace_all_uses_with(y)
    g.erase_node(n)
    return True


def expand_window_attention(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """Rewrite the windowed attention calls of `gm` in place; returns how many were rewritten."""
    swin = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is shifted_window_attention]
    maxvit = [n for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MODULES) and len(n.args) == 1]
    if not swin and not maxvit:
        return 0
    if swin:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    expanded = sum(_expand_swin(gm, n) for n in swin) + sum(_expand_maxvit(gm, n) for n in maxvit)
    if expanded:
        gm.graph.lint()
        gm.recompile()
    return expanded
