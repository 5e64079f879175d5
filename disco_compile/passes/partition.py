"""Partition: give every channel an owner node.

Channels tied together (ir.py) form classes; each class gets one owner. Spaces
(the channels one op creates) are visited in graph order; a space's channels
whose class is still free are handed out in index order, filling node 0's
quota, then node 1's, ... so an untied space gets contiguous, even blocks.
Quotas follow `node_weights`: node k's share of a space of C channels is
round(C * W_k) - round(C * W_{k-1}) with W the cumulative normalised weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import PartitionError
from ..ir import ChannelUniverse


def quotas(size: int, weights: Sequence[float]) -> list[int]:
    total = float(sum(weights))
    cum = [0.0]
    for w in weights:
        cum.append(cum[-1] + w / total)
    bounds = [round(size * c) for c in cum]
    return [b - a for a, b in zip(bounds, bounds[1:])]


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
    nodes = len(weights)
    owner_of = torch.full((universe.size,), -1, dtype=torch.long)
    class_owner: dict[int, int] = {}
    for space in universe.spaces:
        ids = range(space.offset, space.offset + space.size)
        roots = [universe.root(i) for i in ids]
        quota = quotas(space.size, weights)
        filled = [0] * nodes
        for r in roots:
            if r in class_owner:
                filled[class_owner[r]] += 1
        members: dict[int, int] = {}
        for r in roots:
            if r not in class_owner:
                members[r] = members.get(r, 0) + 1
        for r, count in members.items():
            open_nodes = [k for k in range(nodes) if filled[k] < quota[k]]
            k = open_nodes[0] if open_nodes else max(range(nodes), key=lambda j: quota[j] - filled[j])
            class_owner[r] = k
            filled[k] += count
        owner_of[space.offset:space.offset + space.size] = torch.tensor([class_owner[r] for r in roots])
    return owner_of
