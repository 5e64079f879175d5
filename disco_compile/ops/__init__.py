"""Op families: for each family of ops, its channel rule (analysis) and its lowering (per-node programs), side by
side and registered once (registry.py). Importing this package imports every family and checks the registry.

    channelwise   activations, BatchNorm and subclasses, InstanceNorm, PReLU, casts, pad
    elementwise   add, mul, where, ... (ties the owners of their inputs)
    statistics    sum, mean, amax, amin over channels; LayerNorm, GroupNorm, softmax, normalize
    movement      view, permute, cat, split, chunk, shuffles, getitem; windowing
    pooling       pooling and resizing
    mixing        Conv and Linear (new channel spaces; the block sum)
    exchange      SparseExchange (inserted after the analysis)
    attention     the per-head cores of multi-head and windowed attention
    replicate     everything without a rule: gathered and run whole on every node
"""
from . import (attention, channelwise, elementwise, exchange, mixing, movement, pooling, registry, replicate,
               statistics, window_attention)

registry.check()

__all__ = ["attention", "channelwise", "elementwise", "exchange", "mixing", "movement", "pooling", "registry",
           "replicate", "statistics", "window_attention"]
