"""What lowering makes and works with: the per-node programs, and how a node holds a DISCO value.

A tensor whose channels vary along dims D (ir/labels.py) is held by node j in its *local representation*: the
full tensor with the dims D collapsed into one axis (at D[0]) and restricted to the units node j holds (its own
and the replicated ones), in an order recorded as `Local.units`. Replicated tensors are held whole. `Layout`
is that representation for one tensor; `Local` is what one node holds of it.

Points where a node sends, receives or produces a model output are marked in a node's program with the marker
functions below; backend/stages.py cuts the program there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils import _pytree as pytree

from ..artifact.schedule import BATCH, Message
from ..errors import DiscoError
from ..ir import REPLICATED, channel_dims


def mutable_output(value):
    """An fx output argument with fx's immutable_dict/immutable_list replaced by dict/list: what the
    GraphModule returns, so the exported output structure is the model's."""
    if isinstance(value, immutable_dict):
        return {k: mutable_output(v) for k, v in value.items()}
    if isinstance(value, immutable_list):
        return [mutable_output(v) for v in value]
    if type(value) is tuple:
        return tuple(mutable_output(v) for v in value)
    return value


class LoweringError(DiscoError):
    """A DISCO op that cannot be lowered to per-node programs."""


# ---------------------------------------------------------------- markers

def recv(message_id: str) -> torch.Tensor:
    """Marker: the payload of a received message (a stage input)."""
    raise RuntimeError("marker: node programs run through stages.py")


def send(message_id: str, payload: torch.Tensor) -> None:
    """Marker: send `payload` as message `message_id` (a stage output)."""
    raise RuntimeError("marker: node programs run through stages.py")


def model_output(name: str, value: torch.Tensor) -> None:
    """Marker: model output `name`, produced on node 0 (a stage output)."""
    raise RuntimeError("marker: node programs run through stages.py")


# ---------------------------------------------------------------- data

@dataclass
class Local:
    """What one node holds of one DISCO value."""
    node: fx.Node | None = None  # None: holds nothing of it (or a non-tensor value)
    units: torch.Tensor | None = None  # held units in local order; None: the whole tensor
    value: Any = None  # non-tensor values: the concrete value on this node (batch 1)
    full: Any = None  # non-tensor values: the concrete value in the whole model (batch 1)
    received: list[tuple[Message, fx.Node]] = field(default_factory=list)  # exchanges: payloads received


@dataclass
class NodeProgram:
    node: int
    graph: fx.Graph
    root: nn.Module
    shapes: dict[str, tuple[int, ...]]  # per-sample (batch 1) shape of tensor-valued graph nodes
    dtypes: dict[str, torch.dtype]


@dataclass
class Lowered:
    programs: list[NodeProgram]
    messages: list[Message]
    inputs: list[tuple[str, tuple[int, ...], torch.dtype]]
    outputs: list[tuple[str, tuple[int, ...], torch.dtype]]
    output_spec: pytree.TreeSpec


def is_tensor_meta(meta) -> bool:
    return isinstance(meta, TensorMetadata)


def rows_per_sample(shape, batch: int) -> int:
    """Rows of dim 0 per sample: 1 where dim 0 is the batch, more where other rows are folded into it batch-major
    (dim 0 a multiple of the example batch), and 1 where dim 0 is no multiple of it. (A sequence-first tensor's
    tokens are taken for folded rows where they are a multiple of the batch: such tensors lower only at batch 1.)"""
    return shape[0] // batch if len(shape) and shape[0] % batch == 0 else 1


def wire_shape(shape: tuple[int, ...]) -> list:
    """A message's shape for a local per-sample shape: [BATCH, ...], dim 0 the batch. Rows folded into dim 0
    (shape[0] > 1) travel as a dim of their own, [BATCH, rows, ...]."""
    return [BATCH, *shape] if shape[0] != 1 else [BATCH, *shape[1:]]


class Layout:
    """The label layout of one DISCO tensor: per-sample shape, channel dims, owner per unit. Dim 0 is the
    batch, or the batch folded with other rows batch-major (timm's windows, x.reshape(-1, C) over tokens):
    per sample it holds meta.shape[0] / batch rows, `batch` being the example inputs' batch."""

    def __init__(self, node: fx.Node, batch: int = 1):
        meta = node.meta["tensor_meta"]
        self.name = node.name
        self.shape = (rows_per_sample(meta.shape, batch),) + tuple(meta.shape[1:])
        self.dtype = meta.dtype
        labels = node.meta["disco"].labels
        self.dims = channel_dims(labels)
        if self.dims and self.dims != tuple(range(self.dims[0], self.dims[-1] + 1)):
            raise LoweringError(f"'{node.name}': channels vary along non-adjacent dims {self.dims}")
        owner = node.meta["disco"].owner
        self.owner = None if owner is None else owner.reshape(-1)

    @property
    def axis(self) -> int | None:
        return self.dims[0] if self.dims else None

    @property
    def units(self) -> int:
        return 0 if self.owner is None else self.owner.numel()

    def held(self, j: int) -> torch.Tensor | None:
        if self.owner is None:
            return None
        return ((self.owner == j) | (self.owner == REPLICATED)).nonzero().flatten()

    def owned(self, j: int) -> torch.Tensor:
        return (self.owner == j).nonzero().flatten()

    def rep_shape(self, units: int | None) -> tuple[int, ...]:
        """Shape of the local representation holding `units` units (None: the whole tensor)."""
        if units is None or not self.dims:
            return self.shape
        return self.shape[:self.dims[0]] + (units,) + self.shape[self.dims[-1] + 1:]

    def as_rep(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.rep_shape(self.units)) if self.dims else t


def is_marker(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (recv, send, model_output)
