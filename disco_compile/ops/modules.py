"""Partition-aware modules that make one process compute what N nodes compute.

SparseExchange, for a tensor x whose channel units are owned by nodes, returns
the N views of x that the N nodes hold after the exchange, stacked:

    x_j = x * m_j,   m_j[u] = 1                              if node j holds u
                             = gate[j, u] * keep[j, u]        if u is sent to j
                             = 0                              otherwise

(`gate` is learnable and starts at 1; `keep` is the hard selection made by a
budget). While the selection is learned, each exchange also holds a `score`
per candidate and the sent part of the mask becomes

    keep[j, u] + s[j, u] - stopgrad(s[j, u])

equal to `keep` in the forward pass, while the backward pass hands every
candidate (kept or not) dL/dm_j[u]: the straight-through estimator.

At a wire precision other than fp32 (ops/wire.py) what is sent arrives quantised, x' = wire.fake(x): then
x_j = x * local_j + x' * (m_j - local_j), and `scale` holds the per-unit scales of the integer wires (a
Parameter: fine-tuning learns it with the rest).

InputWire is the same for a model input, which node 0 holds and sends whole to the others: every node, node 0
included, computes from x' = wire.fake(x), so that all hold one value as the replicated ops on it require
(node 0 quantises and dequantises its own copy). The input travels at the message wire but at 8 bits at least
(artifact/wire.INPUT_WIRES), with one scale per channel (dim 1) of an input of 3 dims or more, else one.

A partitioned Conv/Linear then computes on node j only its own output rows
from x_j: y[T_j] = W[T_j] x_j, and reassembles y in channel order, so with
every gate on the result equals the original layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ir import REPLICATED
from . import wire as wires
from .wire import WireError


class _Wired:
    """A wire precision and, at an integer wire, one scale per unit (`scale`, NaN until calibrated); a
    `calibration` set by DiscoModel.calibrate_wire observes the values meanwhile."""

    def _set_wire(self, wire: str, units: int, device: torch.device) -> None:
        """Send at `wire`; an integer wire starts with uncalibrated (NaN) scales, kept if it already was one."""
        if wire not in wires.WIRES:
            raise WireError(f"wire precision must be one of {', '.join(wires.WIRES)}, got {wire!r}")
        if wires.is_integer(wire) and self.scale is None:
            self.scale = nn.Parameter(torch.full((units,), float("nan"), device=device))
        elif not wires.is_integer(wire):
            self.scale = None
        self.wire = wire

    def calibrated(self) -> bool:
        return self.scale is None or bool(torch.isfinite(self.scale).all())

    def _arrived(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """x as the wire delivers it (fake quantisation with the unit scales)."""
        if not self.calibrated():
            raise wires.uncalibrated(self.wire, where)
        scale = None if self.scale is None else self.scale.reshape(self.label_shape).to(x.dtype)
        return wires.fake(x, self.wire, scale)


class SparseExchange(_Wired, nn.Module):
    """The learnable exchange of one tensor: one gate vector per (source, destination) pair,
    stored as `gate[dst, unit]` (the source of a unit is its owner)."""

    def __init__(self, owner: torch.Tensor, needed: torch.Tensor, unit_elems: int, itemsize: int):
        super().__init__()
        nodes = needed.shape[0]
        flat = owner.reshape(-1)
        local = torch.stack([(flat == j) | (flat == REPLICATED) for j in range(nodes)])
        self.label_shape = tuple(owner.shape)
        self.unit_elems, self.itemsize = unit_elems, itemsize
        self.wire = wires.DEFAULT_WIRE
        self.scale: nn.Parameter | None = None
        self.calibration: wires.Calibration | None = None
        self.register_buffer("owner", flat.clone())
        self.register_buffer("local", local)
        self.register_buffer("remote", needed & ~local)
        self.register_buffer("keep", needed & ~local)
        self.gate = nn.Parameter(torch.ones(nodes, flat.numel()))
        self.score: nn.Parameter | None = None

    @property
    def nodes(self) -> int:
        return self.gate.shape[0]

    @property
    def unit_bytes(self) -> float:
        """Wire bytes per sample of one sent unit."""
        return wires.unit_bytes(self.unit_elems, self.itemsize, self.wire)

    def _sent(self) -> torch.Tensor:
        sent = (self.remote & self.keep).to(self.gate.dtype)
        if self.score is not None:
            sent = sent + self.remote * (self.score - self.score.detach())
        return sent * self.gate

    def masks(self) -> torch.Tensor:
        return self.local.to(self.gate.dtype) + self._sent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibration is not None:
            self.calibration.observe(x)
        shape = (self.nodes,) + self.label_shape
        if self.wire == "fp32" or self.calibration is not None:
            return x.unsqueeze(0) * self.masks().reshape(shape).to(x.dtype)
        arrived = self._arrived(x, "the DISCO model's forward")
        return x.unsqueeze(0) * self.local.reshape(shape).to(x.dtype) + \
            arrived.unsqueeze(0) * self._sent().reshape(shape).to(x.dtype)

    def set_wire(self, wire: str) -> None:
        """Send at `wire` (ops/wire.py; an integer wire's scales then need calibrating)."""
        self._set_wire(wire, self.owner.numel(), self.gate.device)

    def learn_selection(self, initial: torch.Tensor | None) -> None:
        """Start (with initial scores) or stop (None) learning which candidates to send."""
        self.score = None if initial is None else nn.Parameter(initial.to(self.gate))

    def sent_units(self, dense: bool = False) -> torch.Tensor:
        """Units sent to each destination: (nodes,)."""
        return (self.remote if dense else self.remote & self.keep).sum(1)

    def extra_repr(self) -> str:
        return f"nodes={self.nodes}, units={self.owner.numel()}, unit_bytes={self.unit_bytes}, wire={self.wire}"


class InputWire(_Wired, nn.Module):
    """A model input of `shape` (batch first) as every node computes from it (module docstring)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.axis = 1 if len(shape) >= 3 else None  # the dim its scales run along (None: one scale)
        self.label_shape = (shape[1], *(1,) * (len(shape) - 2)) if self.axis else (1,) * max(len(shape) - 1, 1)
        self.wire = wires.DEFAULT_WIRE
        self.scale: nn.Parameter | None = None
        self.calibration: wires.Calibration | None = None

    @property
    def active(self) -> bool:
        """Whether forward does anything: quantises (a wire below fp32) or observes (calibrating)."""
        return self.wire != "fp32" or self.calibration is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibration is not None:
            self.calibration.observe(x)
        if self.wire == "fp32" or self.calibration is not None:
            return x
        return self._arrived(x, "the model input's wire")

    def set_wire(self, wire: str) -> None:
        """Travel at the input wire of message wire `wire` (artifact/wire.INPUT_WIRES)."""
        device = torch.device("cpu") if self.scale is None else self.scale.device
        self._set_wire(wires.INPUT_WIRES.get(wire, wire), math.prod(self.label_shape), device)

    def extra_repr(self) -> str:
        return f"units={math.prod(self.label_shape)}, wire={self.wire}"


COMPUTABLE = ("weight", "bias")  # the tensors of a layer that may be computed from parameters


class ComputedWeight:
    """A layer whose `weight` (or `bias`) is `weight_fn()` (`bias_fn()`), computed from parameters at each use
    (passes/raise_functional.py: weight standardisation, W^T of `x @ W`, BEiT's cat(q_bias, 0, v_bias));
    `share_weight` gives a partitioned layer the same, so training trains the parameters they are computed from."""

    def compute(self, name: str, fn: nn.Module) -> None:
        self._parameters.pop(name, None)
        self.add_module(f"{name}_fn", fn)

    def __getattr__(self, name: str):
        modules = self.__dict__.get("_modules")
        if name in COMPUTABLE and modules is not None and f"{name}_fn" in modules:
            return modules[f"{name}_fn"]()
        return super().__getattr__(name)


def share_weight(target: nn.Module, layer: nn.Module) -> None:
    """target.weight and target.bias are layer's: the same Parameters (or None), or the same `*_fn`
    (ComputedWeight)."""
    for name in COMPUTABLE:
        if f"{name}_fn" in layer._modules:
            target.compute(name, layer._modules[f"{name}_fn"])
        else:
            setattr(target, name, getattr(layer, name))


class _Partitioned(ComputedWeight, nn.Module):
    """Shared reassembly: node j's output rows, concatenated, back in channel order."""

    def _set_rows(self, out_owner: torch.Tensor, nodes: int) -> None:
        rows = [(out_owner == j).nonzero().flatten() for j in range(nodes)]
        self.rows = rows
        self.register_buffer("inverse", torch.argsort(torch.cat(rows)), persistent=False)

    def _assemble(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(parts, dim).index_select(dim, self.inverse)

    def _apply(self, fn, recurse=True):
        self.rows = [fn(r) for r in self.rows]
        return super()._apply(fn, recurse)


class PartitionedConv(_Partitioned):
    """A Conv1d/2d/3d split by output rows; forward takes the stacked per-node inputs."""

    _CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def __init__(self, conv: nn.modules.conv._ConvNd, out_owner: torch.Tensor, nodes: int):
        super().__init__()
        share_weight(self, conv)
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._conv = self._CONV[conv.weight.dim() - 2]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self._set_rows(out_owner, nodes)

    def _node(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, w, b, self.stride, 0, self.dilation, groups)
        return self._conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        parts = []
        for j, r in enumerate(self.rows):
            if r.numel() == 0:
                continue
            if self.groups == 1:
                parts.append(self._node(xs[j], self.weight[r], None if self.bias is None else self.bias[r], 1))
            else:  # rows of a group split across nodes: compute the grouped conv, keep node j's rows
                parts.append(self._node(xs[j], self.weight, self.bias, self.groups).index_select(1, r))
        return self._assemble(parts, 1)


class PartitionedLinear(_Partitioned):
    """A Linear split by output features; forward takes the stacked per-node inputs."""

    def __init__(self, linear: nn.Linear, out_owner: torch.Tensor, nodes: int):
        super().__init__()
        share_weight(self, linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._set_rows(out_owner, nodes)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        parts = [F.linear(xs[j], self.weight[r], None if self.bias is None else self.bias[r])
                 for j, r in enumerate(self.rows) if r.numel()]
        return self._assemble(parts, -1)


def partitioned(module: nn.Module, out_owner: torch.Tensor, nodes: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        return PartitionedLinear(module, out_owner, nodes)
    return PartitionedConv(module, out_owner, nodes)
