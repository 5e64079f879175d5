"""The records the analysis and the passes make: where each tensor lives (Placement, in node.meta['disco']),
the channel-mixing layers, the statistics exchanges, the replicated ops, and the partition plan that holds
them beside the rewritten graph."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Placement:
    """node.meta['disco']: where a tensor's elements live.

    labels: channel ids in broadcast form (None = replicated).
    owner: same shape as labels, the owner node of each element (REPLICATED where all nodes hold it).
    """
    labels: torch.Tensor | None
    owner: torch.Tensor | None = None
    source: str = ""

    def __repr__(self) -> str:
        if self.labels is None:
            return f"Placement(replicated, source={self.source!r})"
        counts = None if self.owner is None else torch.bincount(self.owner[self.owner >= 0].flatten()).tolist()
        return f"Placement(labels{tuple(self.labels.shape)}, owned per node={counts}, source={self.source!r})"


@dataclass
class MixingLayer:
    """A channel-mixing op (Conv, Linear) and the channel maps of its input and output.

    in_labels/out_labels are the compressed labels of input and output; `dim_in`
    and `dim_out` the dimension of the channels (1 for convolutions, -1 for Linear).
    """
    node: str
    module: str
    kind: str  # "conv" or "linear"
    in_node: str
    in_labels: torch.Tensor | None
    out_labels: torch.Tensor
    in_channels: int
    out_channels: int
    groups: int
    kernel_numel: int
    out_positions: int  # output elements per channel, per sample
    in_unit_elems: int  # input elements per label position, per sample
    itemsize: int
    exchange: str | None = None  # name of the SparseExchange feeding it, if any


@dataclass
class StatExchange:
    """Per-row statistics that nodes owning parts of a normalised dimension
    all-reduce (LayerNorm over split channels, softmax over split channels,
    a sum over split channels): `values` numbers per sample per sending node,
    sent to every node (`to_all`, the result is replicated) or only to the
    other holders of the input (the result stays split like the input)."""
    node: str
    target: str
    in_node: str
    values: int
    itemsize: int
    to_all: bool


@dataclass
class ReplicatedOp:
    """An op without a rule for its input's channel layout: its inputs are
    gathered on every node and it runs whole on every node."""
    node: str
    target: str
    reason: str
    inputs: list[str] = field(default_factory=list)


@dataclass
class PartitionPlan:
    """What the passes decided, kept beside the rewritten graph: the owner of
    every channel id, the mixing layers, statistics exchanges and replicated
    ops, and the figures of the original model the costs are compared with."""
    nodes: int
    node_weights: list[float]
    owner_of: torch.Tensor
    layers: list[MixingLayer]
    stats: list[StatExchange]
    replicated: list[ReplicatedOp]
    batch: int
    input_on_all_nodes: bool
    original_macs: int
    original_params: int
    replicated_macs: int
    channelwise_macs: dict[str, list[int]] = field(default_factory=dict)  # per node, of layers run on its channels
