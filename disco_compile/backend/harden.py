"""Hardening: the gates of every SparseExchange become fixed index lists.

For exchange e of tensor t and nodes i != j, message (t, i -> j) carries the
units u with owner(u) = i that some consumer on j needs and the budget keeps
(ex.remote[j, u] & ex.keep[j, u]), in ascending order. The gate values of the
kept units stay with the destination: lowering folds them into its weights.
The payload is written at the exchange's wire precision (ops/wire.py).
"""
from __future__ import annotations

import math

import torch

from ..artifact.schedule import Message
from ..ops import wire as wires
from .program import rows_per_sample, wire_shape


def harden(dm) -> tuple[dict[str, list[Message]], dict[str, torch.Tensor]]:
    """The messages of every exchange (by source tensor) and the gate values, for `dm`'s current selection;
    `dm` must be in eval mode (BatchNorm statistics fixed) as lowering expects."""
    if dm.training:
        raise ValueError("lowering needs the model in eval mode (BatchNorm statistics fixed): call dm.eval()")
    messages: dict[str, list[Message]] = {}
    gates: dict[str, torch.Tensor] = {}
    by_name = {n.name: n for n in dm.graph_module.graph.nodes}
    count = 0
    for name, iw in dm.input_wires.items():
        if not iw.calibrated():
            raise wires.uncalibrated(iw.wire, f"exporting model input '{name}'")
    for name, ex in dm.exchanges.items():
        if not ex.calibrated():
            raise wires.uncalibrated(ex.wire, f"exporting exchange '{name}'")
        gates[name] = ex.gate.detach().clone()
        meta = by_name[name].meta["tensor_meta"]
        shape = [rows_per_sample(meta.shape, dm.plan.batch), *meta.shape[1:]]
        axis = min(d for d, s in enumerate(ex.label_shape) if s > 1) if ex.owner.numel() > 1 else 1
        for j in range(ex.nodes):
            sent = ex.remote[j] & ex.keep[j]
            for i in range(ex.nodes):
                units = (sent & (ex.owner == i)).nonzero().flatten()
                if i == j or units.numel() == 0:
                    continue
                values = shape.copy()
                values[axis] = units.numel()
                payload, dtype = wires.payload(tuple(values), meta.dtype, ex.wire)
                messages.setdefault(name, []).append(Message(
                    id=f"exchange{count}", src=i, dst=j, kind="exchange", tensor=name, channels=units.tolist(),
                    shape=wire_shape(payload), dtype=str(dtype).replace("torch.", ""),
                    bytes=math.prod(payload) * dtype.itemsize, wire=ex.wire))
                count += 1
    return messages, gates
