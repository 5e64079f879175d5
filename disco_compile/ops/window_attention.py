"""Windowed multi-head attention (Swin, MaxViT) as ops the channel analysis can split by heads.

Swin's `shifted_window_attention` and MaxViT's `RelativePositionalMultiHeadAttention`
compute, on tokens x of C = H*d channels grouped into windows of P tokens,

    [q, k, v] = x W_qkv^T + b_qkv                          W_qkv: (3C, C), an nn.Linear
    a_h = s * q_h k_h^T                                    scaled dot product, s applied to q (Swin) or k (MaxViT)
        | exp(min(t_h, ln 100)) * q_h k_h^T / (|q_h| |k_h|)  Swin V2: cosine attention, learned t_h
    o_h = softmax(a_h + B_h + M) v_h                       B_h: head h's relative position bias (P, P)
    y = o W_out^T + b_out                                  o = [o_0, ..., o_{H-1}]

where M is Swin's shifted-window mask (-100 between tokens that the cyclic
shift brought together from different regions, 0 elsewhere; one (P, P) mask
per window). Windowing (Swin's pad, cyclic roll and partition; its reverse)
moves tokens and never mixes channels. So, as for nn.MultiheadAttention
(attention.py), once the 3d channels (q_h, k_h, v_h) of a head live on one node
that node computes o_h alone, given its heads' rows of B and t; the qkv and
output projections are ordinary channel-mixing layers with exchanges before
them. passes/expand_window_attention.py rewrites the models' calls into these
ops; the attention family (ops/attention.py) ties each head's channels and hands each node its heads'
rows of the per-head tensors. Window partition and reverse, and Swin's patch merging, move tokens of
channels-last maps: in the movement family, their labels pass through along the last dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.models.swin_transformer import _patch_merging_pad

from ..ir import channel_dims
from .attention import ATTENTION, tied_heads
from .movement import MOVEMENT
from .registry import Fallback, RuleContext


def window_partition(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, windows, wh * ww, C): pad H and W to multiples of the window, roll by -shift,
    cut into windows, row-major. (torchvision folds the windows into the batch dim; they are kept apart
    here so that dim 0 stays the batch, as lowering and export expect.)"""
    _, height, width, channels = x.shape
    x = F.pad(x, (0, 0, 0, -width % window[1], 0, -height % window[0]))
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols = x.shape[1] // window[0], x.shape[2] // window[1]
    x = x.view(-1, rows, window[0], cols, window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, rows * cols, window[0] * window[1], channels)


def window_reverse(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int], height: int,
                   width: int) -> torch.Tensor:
    """The inverse of window_partition for a (height, width) map: (B, windows, wh * ww, C) -> (B, H, W, C)."""
    channels = x.shape[-1]
    rows, cols = -(-height // window[0]), -(-width // window[1])
    x = x.view(-1, rows, cols, window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, rows * window[0], cols * window[1], channels)
    if any(shift):
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                        dtype: torch.dtype) -> torch.Tensor:
    """Swin's mask M, one (P, P) block per window of the padded (height, width) map: -100 between tokens
    from different regions of the cyclic shift, 0 within one."""
    pad_h, pad_w = height + -height % window[0], width + -width % window[1]
    regions = torch.zeros((pad_h, pad_w), dtype=dtype)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    regions = regions.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differ.masked_fill(differ != 0, -100.0).masked_fill(differ == 0, 0.0)


def relative_position_bias(table: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
    """B: (1, H, P, P) from a ((2w-1)^2, H) table and a (P, P) index into it."""
    return table[index.reshape(-1)].view(tokens, tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def window_heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, bias: torch.Tensor,
                           scale: float | None = None, scale_key: bool = False, mask: torch.Tensor | None = None,
                           logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """o_h = softmax(a_h + B_h + M) v_h for `num_heads` heads of d channels side by side in the last dim;
    q, k, v: (..., P, H*d); bias: (1, H, P, P); mask: (windows, P, P), windows the last leading dim of q
    (Swin: (B, windows, P, H*d)); logit_scale: (H, 1, 1) for cosine attention, else `scale` multiplies q (or k
    if scale_key)."""
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(-2, -3) for t in (q, k, v))
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    elif scale_key:
        attn = q @ (k * scale).transpose(-2, -1)
    else:
        attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + bias
    if mask is not None:
        attn = attn + mask.unsqueeze(1)
    out = F.softmax(attn, dim=-1) @ v
    return out.transpose(-2, -3).flatten(-2)


@ATTENTION.rule(window_heads_attention)
def window_attention(ctx: RuleContext) -> torch.Tensor:
    """As `tied_heads`, for windowed attention: its per-head tensors (relative position bias, logit scale)
    and the shift mask must be whole on every node, which then keeps its own heads' rows."""
    if any(labels is not None for _, labels in ctx.tensor_inputs()[3:]):
        raise Fallback("the attention's bias, mask or logit scale is split across nodes")
    return tied_heads(ctx)


def _channels_last(ctx: RuleContext) -> torch.Tensor:
    value, labels = ctx.first_labelled()
    if channel_dims(labels) not in ((), (value.dim() - 1,)):
        raise Fallback("channels do not vary along the last dim alone")
    return labels.reshape([1] * (ctx.out.dim() - 1) + [labels.size(-1)])


@MOVEMENT.rule(window_partition, window_reverse)
def windows(ctx: RuleContext) -> torch.Tensor:
    """Tokens of a channels-last map moved into or out of windows: channel labels pass through."""
    return _channels_last(ctx)


@MOVEMENT.rule(_patch_merging_pad)
def patch_merging(ctx: RuleContext) -> torch.Tensor:
    """Swin's 2x2 patch merging: four strided token subsets side by side along channels, each with the
    input's channel labels (relayout would run the op's zero padding on labels)."""
    labels = _channels_last(ctx)
    return torch.cat([labels] * 4, -1)
