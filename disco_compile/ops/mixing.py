"""The block maths of one channel-mixing layer split across nodes.

For a layer with weight W (rows = output channels, columns = input channels,
grouped convolutions connecting output row o only to the columns of its group),
node j owns output rows T_j and computes

    y[T_j] = W[T_j, local_j] x[local_j] + sum_{i != j} W[T_j, G_ij] x[G_ij]

where local_j are the input columns node j holds (its own and replicated
ones) and G_ij the columns it receives from node i. A column is *needed* by j
when some row of T_j is connected to it. Node j's MACs are
sum_{o in T_j} |available columns of o| * kernel * output positions, and its
weight count the same without the output positions.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ir import REPLICATED, MixingLayer


def _column_group(layer: MixingLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(group of each output row, group of each input column)."""
    out_group = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
    in_group = torch.arange(layer.in_channels) // (layer.in_channels // layer.groups)
    return out_group, in_group


def rows(out_owner: torch.Tensor, node: int) -> torch.Tensor:
    return (out_owner == node).nonzero().flatten()


def needed(layer: MixingLayer, out_owner: torch.Tensor, node: int) -> torch.Tensor:
    """Bool over input columns: connected to some output row that `node` owns."""
    mine = out_owner == node
    if layer.groups == 1:
        return torch.full((layer.in_channels,), bool(mine.any()))
    out_group, in_group = _column_group(layer)
    groups_used = torch.zeros(layer.groups, dtype=torch.bool)
    groups_used[out_group[mine]] = True
    return groups_used[in_group]


def column_scores(layer: MixingLayer, module: nn.Module, out_owner: torch.Tensor, node: int) -> torch.Tensor:
    """Squared norm of each input column restricted to the rows `node` owns."""
    w = module.weight.detach()
    sq = (w.reshape(w.shape[0], w.shape[1], -1) ** 2).sum(2)  # rows x columns-per-group
    mine = out_owner == node
    if layer.groups == 1:
        return sq[mine].sum(0)
    out_group, _ = _column_group(layer)
    per_group = layer.in_channels // layer.groups
    cols = out_group[mine, None] * per_group + torch.arange(per_group)
    return torch.zeros(layer.in_channels, dtype=sq.dtype).index_add_(0, cols.flatten(), sq[mine].flatten())


def column_weights(layer: MixingLayer, out_owner: torch.Tensor, node: int) -> torch.Tensor:
    """Weight entries of each input column that `node` uses: its connected rows of `node` x kernel size
    (times out_positions: the MACs per sample the column costs `node`)."""
    mine = out_owner == node
    if layer.groups == 1:
        rows_per_column = torch.full((layer.in_channels,), int(mine.sum()))
    else:
        out_group, in_group = _column_group(layer)
        rows_per_group = torch.zeros(layer.groups, dtype=torch.long).index_add_(0, out_group, mine.long())
        rows_per_column = rows_per_group[in_group]
    return rows_per_column * layer.kernel_numel


def weights_used(layer: MixingLayer, out_owner: torch.Tensor, available: torch.Tensor, node: int) -> int:
    """Weight entries node `node` uses, given the input columns available to it."""
    return int(column_weights(layer, out_owner, node)[available].sum())


def local_columns(in_owner: torch.Tensor | None, layer: MixingLayer, node: int) -> torch.Tensor:
    if in_owner is None:
        return torch.ones(layer.in_channels, dtype=torch.bool)
    return (in_owner == node) | (in_owner == REPLICATED)


def full_macs(layer: MixingLayer) -> int:
    return layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel_numel * layer.out_positions
