"""The exchange family: the SparseExchange modules that passes/insert_exchanges.py puts wherever a channel-mixing
layer on node j reads channels that node i owns (ops/modules.py). They are inserted after the analysis, so they
have no channel rule.

Lowering: node i sends node j, as one message, the units of the source tensor in the hardened index list G_ij
(backend/harden.py), written at the exchange's wire precision (ops/wire.py: the sender quantises with the
exchange's per-unit scales of G_ij, the receiver dequantises); node j receives them. The consumer
(ops/mixing.py) multiplies each payload by its columns W[T_j, G_ij] times the gates. The receiver's decoding
nodes are marked DECODES so that lowering places them where the payload is first used (backend/lower.py).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..backend.program import Layout, Local
from . import wire as wires
from .modules import SparseExchange
from .registry import Family

EXCHANGE = Family("exchange")
EXCHANGE.ops(SparseExchange, rule=None)
DECODES = "disco_decodes"  # node.meta key: the node decodes a received payload


def _constants(b, scale: torch.Tensor, axis: int | None) -> tuple[fx.Node, fx.Node, int]:
    """`scale` (one value per unit along `axis`; None: one value) and its zero points as constants, and the axis."""
    s = scale.detach().float()
    if axis is None:
        s = s.reshape(())
    return b.const("scale", s), b.const("zero_point", torch.zeros(s.shape, dtype=torch.int8)), axis or 0


def encode(b, wire: str, scale: torch.Tensor | None, axis: int | None, values: fx.Node,
           dtype: torch.dtype) -> fx.Node:
    """The payload of `values` (float `dtype`, units along `axis`, with these unit scales) at `wire`."""
    if wire == "fp32":
        return values
    shape = b.shapes[values.name]
    sent, sent_dtype = wires.payload(shape, dtype, wire)
    if wire == "fp16":
        return b.method("to", (values, sent_dtype), shape=sent, dtype=sent_dtype)
    scale, zero_point, axis = _constants(b, scale, axis)
    return b.call(wires.quantise, (values, scale, zero_point, axis, wire, shape), shape=sent, dtype=sent_dtype)


def decode(b, wire: str, scale: torch.Tensor | None, axis: int | None, payload: fx.Node,
           shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
    """The values of per-sample `shape` and float `dtype` that `payload` (`encode`'s) carries; the decoding
    nodes are marked DECODES (placed where first used)."""
    if wire == "fp32":
        return payload
    if wire == "fp16":
        node = b.method("to", (payload, dtype), shape=shape, dtype=dtype)
    else:
        scale, zero_point, axis = _constants(b, scale, axis)
        node = b.call(wires.dequantise, (payload, scale, zero_point, axis, wire, shape), shape=shape)
    for decoding in (node, *node.all_input_nodes):
        if decoding.op != "get_attr":
            decoding.meta[DECODES] = True
    return node


def _unit_scales(ex: SparseExchange, units: torch.Tensor) -> torch.Tensor | None:
    return None if ex.scale is None else ex.scale[units]


def _receive(b, ex: SparseExchange, lay: Layout, msg) -> fx.Node:
    """The received values of `msg`, as float (its payload decoded)."""
    shape = lay.rep_shape(len(msg.channels))
    sent, dtype = wires.payload(shape, lay.dtype, ex.wire)
    units = torch.tensor(msg.channels, dtype=torch.long)
    return decode(b, ex.wire, _unit_scales(ex, units), lay.axis, b.receive(msg, sent, dtype), shape, lay.dtype)


@EXCHANGE.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """Send each destination its kept units of the source; the received payloads ride on the exchange's Local."""
    src = n.all_input_nodes[0]
    lay = b.low.layout(src)
    messages = b.low.exchange_messages.get(src.name, [])
    for msg in messages:
        if msg.src == b.j:
            units = torch.tensor(msg.channels, dtype=torch.long)
            b.send(msg, encode(b, module.wire, _unit_scales(module, units), lay.axis, b.aligned(src, units),
                               lay.dtype))
    received = [(msg, _receive(b, module, lay, msg)) for msg in messages if msg.dst == b.j]
    loc = b.env[src.name]
    b.env[n.name] = Local(loc.node, loc.units, received=received)
