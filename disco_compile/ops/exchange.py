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


def _scales(b, ex: SparseExchange, lay: Layout, units: torch.Tensor) -> tuple[fx.Node, fx.Node, int]:
    """The scales and zero points of `units` as constants, and the axis they run along (per tensor: none)."""
    s = ex.scale.detach()[units].float()
    if lay.axis is None:
        s = s.reshape(())
    return b.const("scale", s), b.const("zero_point", torch.zeros(s.shape, dtype=torch.int8)), lay.axis or 0


def _encode(b, ex: SparseExchange, lay: Layout, values: fx.Node, units: torch.Tensor) -> fx.Node:
    """The payload of `values` (the sent units, in order) at the exchange's wire."""
    if ex.wire == "fp32":
        return values
    shape = b.shapes[values.name]
    sent, dtype = wires.payload(shape, lay.dtype, ex.wire)
    if ex.wire == "fp16":
        return b.method("to", (values, dtype), shape=sent, dtype=dtype)
    scale, zero_point, axis = _scales(b, ex, lay, units)
    return b.call(wires.quantise, (values, scale, zero_point, axis, ex.wire, shape), shape=sent, dtype=dtype)


def _decode(b, ex: SparseExchange, lay: Layout, msg) -> fx.Node:
    """The received values of `msg`, as float (its payload decoded)."""
    shape = lay.rep_shape(len(msg.channels))
    sent, dtype = wires.payload(shape, lay.dtype, ex.wire)
    node = b.receive(msg, sent, dtype)
    if ex.wire == "fp32":
        return node
    if ex.wire == "fp16":
        node = b.method("to", (node, lay.dtype), shape=shape, dtype=lay.dtype)
    else:
        scale, zero_point, axis = _scales(b, ex, lay, torch.tensor(msg.channels, dtype=torch.long))
        node = b.call(wires.dequantise, (node, scale, zero_point, axis, ex.wire, shape), shape=shape)
    for decoding in (node, *node.all_input_nodes):
        if decoding.op != "get_attr":
            decoding.meta[DECODES] = True
    return node


@EXCHANGE.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """Send each destination its kept units of the source; the received payloads ride on the exchange's Local."""
    src = n.all_input_nodes[0]
    lay = b.low.layout(src)
    messages = b.low.exchange_messages.get(src.name, [])
    for msg in messages:
        if msg.src == b.j:
            units = torch.tensor(msg.channels, dtype=torch.long)
            b.send(msg, _encode(b, module, lay, b.aligned(src, units), units))
    received = [(msg, _decode(b, module, lay, msg)) for msg in messages if msg.dst == b.j]
    loc = b.env[src.name]
    b.env[n.name] = Local(loc.node, loc.units, received=received)
