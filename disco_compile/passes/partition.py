"""Partition: give every channel an owner node.

Channels tied together (ir.py) form classes; each class gets one owner. Every
space (the channels one op creates) has a quota per node, following
`node_weights`: node k's share of a space of C channels is
round(C * W_k) - round(C * W_{k-1}), W the cumulative normalised weights.
Classes are taken in order of their first channel and each goes to the node
whose quotas it overflows least, summed over all spaces the class spans (ties
go to the lowest node), so an untied space gets contiguous, even blocks and a
class that spans several spaces lands where all of them still have room.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import PartitionError
from ..ir import ChannelUniverse


def quotas(size: int, weights: Sequence[float]) -> list[int]:
    total = float(sum(weights))
    cum = [0.0]
    for w in weights:
        cum.append(cum[-1] + w / total)
    bounds = [round(size * c) for c in cum]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def check_weights(nodes: int, node_weights: Sequence[float] | None) -> list[float]:
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise PartitionError(f"nodes must be a whole number >= 1, got {nodes!r}")
    if node_weights is None:
        return [1.0] * nodes
    weights = [float(w) for w in node_weights]
    if len(weights) != nodes:
        raise PartitionError(f"node_weights has {len(weights)} entries but nodes={nodes}; give one weight per node")
    if any(not w > 0 for w in weights):
        raise PartitionError(f"node_weights must all be positive, got {weights}")
    return weights


def assign_owners(universe: ChannelUniverse, weights: Sequence[float]) -> torch.Tensor:
    """owner_of[channel id] -> node index."""
    quota = np.array([quotas(sp.size, weights) for sp in universe.spaces], dtype=np.int64)
    filled = np.zeros_like(quota)
    # classes in order of first appearance, each with its member count in every space it touches
    members: dict[int, dict[int, int]] = {}
    roots = []
    for k, sp in enumerate(universe.spaces):
        for i in range(sp.offset, sp.offset + sp.size):
            r = universe.root(i)
            roots.append(r)
            counts = members.setdefault(r, {})
            counts[k] = counts.get(k, 0) + 1
    class_owner: dict[int, int] = {}
    for r, counts in members.items():
        sp = np.fromiter(counts.keys(), dtype=np.int64)
        c = np.fromiter(counts.values(), dtype=np.int64)[:, None]
        f, q = filled[sp], quota[sp]
        # the node whose quotas this class overflows least, summed over the spaces it spans
        overflow = (np.maximum(f + c - q, 0) - np.maximum(f - q, 0)).sum(0)
        k = int(np.argmin(overflow))  # first minimum: fresh spaces fill node 0, then node 1, ...
        class_owner[r] = k
        filled[sp, k] += c[:, 0]
    return torch.tensor([class_owner[r] for r in roots], dtype=torch.long)
