"""Channel identity and ownership metadata attached to fx nodes.

Every channel that a channel-mixing op (or the model input) creates gets a
global integer id. A tensor's *labels* is an int64 tensor that broadcasts to
the tensor's shape and holds, for each element, the id of the channel it
belongs to; it has size 1 on every dimension along which the channel does not
change (batch, spatial), so an NCHW activation has labels of shape (1, C, 1, 1)
and the same activation flattened has labels of shape (1, C*H*W). The id
`REPLICATED` (-1) marks data that every node holds whole; labels of `None`
mean the whole tensor is replicated.

Ops that combine tensors elementwise force their channels to have one owner
("ties"); the ties form equivalence classes (a union-find over channel ids),
and the partition gives every class one owner node. The owner of an element
is then `owner_of[labels]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx.utils
import torch

REPLICATED = -1


@dataclass(frozen=True)
class ChannelSpace:
    """The channels created by one op: ids offset .. offset+size-1."""
    creator: str
    offset: int
    size: int


class ChannelUniverse:
    """All channel ids of a model, and the ownership ties between them."""

    def __init__(self) -> None:
        self.spaces: list[ChannelSpace] = []
        self.size = 0
        self._ties = networkx.utils.UnionFind()

    def new_space(self, creator: str, size: int) -> torch.Tensor:
        space = ChannelSpace(creator, self.size, size)
        self.spaces.append(space)
        self.size += size
        return torch.arange(space.offset, space.offset + size)

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Force a[k] and b[k] to have the same owner, for every k where both are channels."""
        a, b = torch.broadcast_tensors(a, b)
        keep = (a != REPLICATED) & (b != REPLICATED) & (a != b)
        pairs = torch.stack([a[keep], b[keep]], 1).unique(dim=0) if keep.any() else torch.empty(0, 2)
        for x, y in pairs.tolist():
            self._ties.union(x, y)

    def tie_all(self, ids: torch.Tensor) -> None:
        ids = ids[ids != REPLICATED].unique().tolist()
        if len(ids) > 1:
            self._ties.union(*ids)

    def root(self, channel: int) -> int:
        return self._ties[channel]


def compress(labels: torch.Tensor) -> torch.Tensor | None:
    """Shrink every dimension along which the labels are constant to size 1;
    None if the tensor is replicated everywhere."""
    if bool((labels == REPLICATED).all()):
        return None
    for d in range(labels.dim()):
        if labels.size(d) > 1 and bool((labels == labels.narrow(d, 0, 1)).all()):
            labels = labels.narrow(d, 0, 1)
    return labels.contiguous()


def left_padded(labels: torch.Tensor, ndim: int) -> torch.Tensor:
    """Labels with size-1 dims prepended up to `ndim`, as broadcasting aligns them to a tensor of ndim dims."""
    return labels.reshape((1,) * (ndim - labels.dim()) + tuple(labels.shape))


def channel_dims(labels: torch.Tensor | None) -> tuple[int, ...]:
    """Dimensions along which the channel identity changes."""
    if labels is None:
        return ()
    return tuple(d for d in range(labels.dim()) if labels.size(d) > 1)


def fits(labels: torch.Tensor, shape: torch.Size) -> bool:
    """Whether `labels` is a valid (broadcast-form) labelling of a tensor of `shape`."""
    return labels.dim() == len(shape) and all(n in (1, s) for n, s in zip(labels.shape, shape, strict=False))


def units_per_sample(shape: torch.Size, labels: torch.Tensor) -> int:
    """Elements of one sample that share one label position (e.g. H*W for NCHW labels)."""
    total = 1
    for d, s in enumerate(shape):
        if d > 0 and labels.size(d) == 1:
            total *= s
    return total


def owners(labels: torch.Tensor | None, owner_of: torch.Tensor) -> torch.Tensor | None:
    """Owner node of every label position (REPLICATED stays REPLICATED)."""
    if labels is None:
        return None
    return torch.where(labels == REPLICATED, REPLICATED, owner_of[labels.clamp(min=0)])
