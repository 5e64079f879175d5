"""The exchange family: the SparseExchange modules that passes/insert_exchanges.py puts wherever a channel-mixing
layer on node j reads channels that node i owns (ops/modules.py). They are inserted after the analysis, so they
have no channel rule.

Lowering: node i sends node j, as one message, the units of the source tensor in the hardened index list G_ij
(backend/harden.py); node j receives them. The consumer (ops/mixing.py) multiplies each payload by its columns
W[T_j, G_ij] times the gates.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..backend.program import Local
from .modules import SparseExchange
from .registry import Family

EXCHANGE = Family("exchange")
EXCHANGE.ops(SparseExchange, rule=None)


@EXCHANGE.lowers
def lower(b, n: fx.Node, module, op) -> None:
    """Send each destination its kept units of the source; the received payloads ride on the exchange's Local."""
    src = n.all_input_nodes[0]
    lay = b.low.layout(src)
    messages = b.low.exchange_messages.get(src.name, [])
    for msg in messages:
        if msg.src == b.j:
            payload = b.aligned(src, torch.tensor(msg.channels, dtype=torch.long))
            b.send(msg, payload)
    received = [(msg, b.receive(msg, lay.rep_shape(len(msg.channels)), lay.dtype))
                for msg in messages if msg.dst == b.j]
    loc = b.env[src.name]
    b.env[n.name] = Local(loc.node, loc.units, received=received)
