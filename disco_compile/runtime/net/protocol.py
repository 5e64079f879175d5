"""The frames between nodes: what a node sends on the wire and how it reads what arrives.

Frames. Every frame sequence starts with a kind (HELLO, PING, BEGIN, MSG, ABORT,
BYE) and a small JSON frame naming the sender node, the sender's instance (a
random id per process) and the recipient instance it believes it talks to.
A MSG adds the Header fields (schedule hash, message id, source, dtype, shape)
and the request id, then the payload as a third frame, sent straight from the
numpy buffer (copy=False; pyzmq still copies payloads under
zmq.COPY_THRESHOLD = 64 KiB, where a copy is cheaper than the bookkeeping)
and received zero-copy (np.frombuffer on the frame, read-only). Every arrival is
checked with `check_arrival` against this node's schedule as it arrives; a
mismatch is a MessageError naming the message, which fails that request.

Handshake. At start each node sends HELLO (protocol version, node count,
sha256 of its manifest, schedule hash, instance) to every peer; `wait_ready`
waits until every peer's HELLO has arrived and matches. Different hashes are a
HandshakeError naming the peer and both pairs of hashes: the node refuses to
run. A node answers a HELLO from an instance it has not seen with its own, so
a restarted node learns about the others without anyone reconnecting.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np
import zmq

from ...artifact.bundle import Bundle, canonical_json
from ...artifact.schedule import Message
from ...errors import DiscoError
from ..transport import Header
from .peers import Peer

PROTOCOL = 1

HELLO, PING, BEGIN, MSG, ABORT, BYE = b"HELLO", b"PING", b"BEGIN", b"MSG", b"ABORT", b"BYE"


class HandshakeError(DiscoError):
    """Nodes that must not run together: different exports, or keys that do not fit."""


def manifest_hash(bundle: Bundle) -> str:
    """sha256 of the canonical manifest.json: names the export (it holds the sha256 of every other file)."""
    return hashlib.sha256(canonical_json(bundle.manifest.to_json())).hexdigest()


@dataclass(frozen=True)
class Identity:
    """What one node's process says about itself: its index, the export's node count, its instance (a random
    id per process), and the sha256 of its manifest and its schedule hash. Makes the frames it sends."""
    node: int
    nodes: int
    instance: str
    manifest: str
    schedule: str

    def hello(self) -> list[bytes]:
        return [HELLO, json.dumps({"proto": PROTOCOL, "node": self.node, "nodes": self.nodes,
                                   "instance": self.instance, "manifest": self.manifest,
                                   "schedule": self.schedule}).encode()]

    def frames(self, kind: bytes, to: str | None, **fields) -> list[bytes]:
        """A frame sequence of `kind` for the peer process `to` (its instance; None before its HELLO)."""
        return [kind, json.dumps({"node": self.node, "instance": self.instance, "to": to, **fields},
                                 separators=(",", ":")).encode()]

    def message(self, to: str | None, msg: Message, data: np.ndarray, request: int) -> list:
        """The MSG frames of `msg` in request `request`: its Header fields, then `data` (C-contiguous) as is."""
        return [*self.frames(MSG, to, schedule=self.schedule, id=msg.id, src=msg.src, dtype=data.dtype.name,
                             shape=[int(d) for d in data.shape], request=request), data]

    def mismatch(self, hello: dict, peer: Peer) -> str | None:
        """Why `peer`'s HELLO (its JSON frame) shows an export this node must not run with; None if it fits."""
        theirs = (hello.get("proto"), hello.get("nodes"), hello.get("manifest"), hello.get("schedule"))
        ours = (PROTOCOL, self.nodes, self.manifest, self.schedule)
        if theirs == ours:
            return None
        return (f"holds another export: node {peer.node} (at {peer.endpoint}) has manifest sha256 {theirs[2]}, "
                f"schedule {theirs[3]} ({theirs[1]} nodes, protocol {theirs[0]}); node {self.node} has "
                f"manifest sha256 {ours[2]}, schedule {ours[3]} ({ours[1]} nodes, protocol {ours[0]}); "
                f"give every node the same export directory")


@dataclass(frozen=True)
class Arrival:
    """A frame sequence as received: its kind, its JSON frame, and the sender node and instance it names."""
    kind: bytes
    meta: dict
    sender: int
    instance: str
    frames: list[zmq.Frame]


def read_arrival(frames: list[zmq.Frame]) -> Arrival | None:
    """The Arrival of `frames`; None if they are malformed (no JSON frame naming the sender)."""
    try:
        meta = json.loads(frames[1].bytes)
        return Arrival(frames[0].bytes, meta, int(meta["node"]), str(meta["instance"]), frames)
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def message_key(meta: dict) -> tuple[int, str] | None:
    """A MSG's (request, message id); None if it lacks them."""
    try:
        return int(meta["request"]), str(meta["id"])
    except (KeyError, TypeError, ValueError):
        return None


def message_header(meta: dict, sender: int) -> Header:
    """A MSG's Header, with the node it came from as source (the authenticated sender, not its claim).
    KeyError, TypeError or ValueError if the header is incomplete."""
    shape = tuple(int(d) for d in meta["shape"])
    header = Header(str(meta["schedule"]), str(meta["id"]), int(meta["src"]), str(meta["dtype"]), shape)
    return header if header.src == sender else replace(header, src=sender)


def message_payload(arrival: Arrival, header: Header) -> np.ndarray:
    """A MSG's payload, read-only on the received frame (no copy); an empty array when it does not fit its
    header (`check_arrival` then names the mismatch)."""
    if len(arrival.frames) == 3:
        try:
            return np.frombuffer(arrival.frames[2].buffer, dtype=np.dtype(header.dtype)).reshape(header.shape)
        except (TypeError, ValueError):
            pass
    return np.empty((0,), np.uint8)
