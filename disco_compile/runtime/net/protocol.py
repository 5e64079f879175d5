"""The frames between nodes: what a node sends on the wire and how it reads what arrives.

Frames. Every frame sequence starts with a kind (HELLO, PING, BEGIN, MSG, ABORT,
BYE) and a small JSON frame naming the sender node, the sender's instance (a
random id per process) and the recipient instance it believes it talks to.
A MSG adds the Header fields (schedule hash, message id, source, dtype, shape)
and the request id, then the payload as the frames after it, sent straight from
the numpy buffer (copy=False; pyzmq still copies payloads under
zmq.COPY_THRESHOLD = 64 KiB, where a copy is cheaper than the bookkeeping).
A payload travels as one frame when it fits in `Limits.part` bytes and as
consecutive parts of at most that many bytes when it does not (a batch of
several samples): the receiver reads one frame zero-copy (np.frombuffer on the
frame, read-only) and joins several into one buffer (one copy).

Limits. Every socket refuses a frame above `Limits.frame` = part + FRAME_HEADROOM
bytes (ZMQ_MAXMSGSIZE): ZeroMQ drops the connection as soon as a frame header
announces more, before authentication (CURVE handshake commands) and after, so
a client without a key cannot make a node hold more than one frame of that
size per connection. `part` is the schedule's largest message for one sample
(at least MIN_PART), so a batch-1 message is always one frame; the headroom
covers the JSON frame and CURVE's box around each frame.

Fields. `read_arrival` checks every field of the JSON frame against what its
kind carries (FIELDS: request ids are integers 0..2**63-1, instances, hashes,
ids and dtypes bounded strings, shapes lists of such integers) and the frame
count (a MSG has at least one payload frame, the others exactly two frames);
anything else is a FrameError naming the kind, the field and what it must be,
which the transport logs and drops. Every arrival is then checked with
`check_arrival` against this node's schedule; a mismatch is a MessageError
naming the message, which fails that request.

Handshake. At start each node sends HELLO (protocol version, node count,
sha256 of its manifest, schedule hash, instance) to every peer; `wait_ready`
waits until every peer's HELLO has arrived and matches. Different hashes are a
HandshakeError naming the peer and both pairs of hashes: the node refuses to
run. A node answers a HELLO from an instance it has not seen with its own, so
a restarted node learns about the others without anyone reconnecting.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import zmq

from ...artifact.bundle import Bundle, canonical_json
from ...artifact.schedule import Message
from ...errors import DiscoError
from ..transport import Header, dtype_name
from . import log
from .peers import Peer

PROTOCOL = 1

HELLO, PING, BEGIN, MSG, ABORT, BYE = b"HELLO", b"PING", b"BEGIN", b"MSG", b"ABORT", b"BYE"

MIN_PART = 64 * 1024  # bytes: the smallest payload part (below, splitting costs more than it bounds)
FRAME_HEADROOM = 64 * 1024  # bytes a frame may hold beyond a payload part: the JSON frame, CURVE's box
_REASON_CHARS = 2000  # an ABORT's reason is cut to this many characters before it is sent
_DROPS_LOGGED = 5  # drops of one kind logged one by one; after these, every 1000th


class HandshakeError(DiscoError):
    """Nodes that must not run together: different exports, or keys that do not fit."""


class FrameError(DiscoError):
    """A frame sequence from a peer that this node drops: its fields are not what its kind carries.
    `what` names the kind and field (e.g. "BEGIN request"), for counting drops of the same kind."""

    def __init__(self, what: str, text: str):
        super().__init__(text)
        self.what = what


class Drops:
    """The frames node `node` drops, counted by what was wrong (`what`: FrameError.what, ...) and logged: the first
    _DROPS_LOGGED of each one by one, then every 1000th with the count, so a peer cannot flood the log.
    `key_owner` (z85 public key -> node; None without keys) names the key frames came with."""

    def __init__(self, node: int, key_owner: dict[str, int] | None):
        self.node, self.key_owner = node, key_owner
        self.counts: dict[str, int] = {}

    def __call__(self, what: str, text: str, frames: list[zmq.Frame] | None = None) -> None:
        n = self.counts[what] = self.counts.get(what, 0) + 1
        if n <= _DROPS_LOGGED or n % 1000 == 0:
            log.warning("node %d: dropped %s%s%s", self.node, text, self._key(frames),
                        f" ({n} such so far)" if n > _DROPS_LOGGED else "")

    def _key(self, frames: list[zmq.Frame] | None) -> str:
        if self.key_owner is None or frames is None:
            return ""
        owner = self.key_owner.get(frames[0].get("User-Id"))
        return ", sent with " + ("an unknown key" if owner is None else f"node {owner}'s key")


def manifest_hash(bundle: Bundle) -> str:
    """sha256 of the canonical manifest.json: names the export (it holds the sha256 of every other file)."""
    return hashlib.sha256(canonical_json(bundle.manifest.to_json())).hexdigest()


@dataclass(frozen=True)
class Limits:
    """The sizes of one export's frames: `part`, the most payload bytes one frame carries, and `frame`, the
    largest frame a socket accepts (ZMQ_MAXMSGSIZE)."""
    part: int

    @classmethod
    def of(cls, messages: list[Message]) -> Limits:
        return cls(max([MIN_PART, *(m.bytes for m in messages)]))

    @property
    def frame(self) -> int:
        return self.part + FRAME_HEADROOM

    def parts(self, data: np.ndarray) -> list[np.ndarray]:
        """`data` (C-contiguous) as the payload frames of a MSG: itself if it fits in one part, else byte views
        of at most `part` bytes each (no copy)."""
        if data.nbytes <= self.part:
            return [data]
        flat = data.reshape(-1).view(np.uint8)
        return [flat[i:i + self.part] for i in range(0, data.nbytes, self.part)]


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
        if isinstance(fields.get("reason"), str):
            fields["reason"] = fields["reason"][:_REASON_CHARS]
        return [kind, json.dumps({"node": self.node, "instance": self.instance, "to": to, **fields},
                                 separators=(",", ":")).encode()]

    def message(self, to: str | None, msg: Message, data: np.ndarray, request: int, limits: Limits) -> list:
        """The MSG frames of `msg` in request `request`: its Header fields, then `data` (C-contiguous) as is,
        in parts of at most `limits.part` bytes. The JSON frame is the one `frames` makes, its text up to the
        request id made once per (peer process, message, dtype, shape)."""
        head = _message_head(self, to, msg.id, msg.src, dtype_name(data.dtype), data.shape)
        return [MSG, b"%s%d}" % (head, request), *limits.parts(data)]

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


@functools.lru_cache(maxsize=4096)
def _message_head(identity: Identity, to: str | None, message_id: str, src: int, dtype: str,
                  shape: tuple[int, ...]) -> bytes:
    """The JSON frame of a MSG (Identity.message) without its request id and closing brace."""
    fields = identity.frames(MSG, to, schedule=identity.schedule, id=message_id, src=src, dtype=dtype,
                             shape=[int(d) for d in shape], request=0)[1]
    return fields[:-len(b"0}")]


# ---------------------------------------------------------------- reading frames

@dataclass(frozen=True)
class Field:
    """What one JSON field must hold: `check(value)`, described in words for the drop's log line."""
    check: Callable[[object], bool]
    words: str


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63


def _text(limit: int) -> Field:
    return Field(lambda v: isinstance(v, str) and 0 < len(v) <= limit, f"a string of 1..{limit} characters")


_ID = Field(_count, "an integer 0..2**63-1")
_TO = Field(lambda v: v is None or isinstance(v, str) and len(v) <= 64, "null or a string of at most 64 characters")
_HASH = _text(128)
_SHAPE = Field(lambda v: isinstance(v, list) and len(v) <= 32 and all(_count(d) for d in v),
               "a list of at most 32 integers 0..2**63-1")
_REASON = Field(lambda v: isinstance(v, str), "a string")

COMMON = {"node": _ID, "instance": _text(64)}
FIELDS: dict[bytes, dict[str, Field]] = {  # beside COMMON, per kind; other fields are ignored
    HELLO: {"proto": _ID, "nodes": _ID, "manifest": _HASH, "schedule": _HASH},
    PING: {"to": _TO},
    BYE: {"to": _TO},
    BEGIN: {"to": _TO, "request": _ID},
    ABORT: {"to": _TO, "request": Field(lambda v: v is None or _count(v), "null (the node stops) or " + _ID.words),
            "reason": _REASON},
    MSG: {"to": _TO, "request": _ID, "id": _text(256), "schedule": _HASH, "src": _ID, "dtype": _text(32),
          "shape": _SHAPE},
}


@dataclass(frozen=True)
class Arrival:
    """A frame sequence as received, its fields checked: its kind, its JSON frame, and the sender node and
    instance it names."""
    kind: bytes
    meta: dict
    sender: int
    instance: str
    frames: list[zmq.Frame]


def read_arrival(frames: list[zmq.Frame]) -> Arrival:
    """The Arrival of `frames`; FrameError naming what is wrong if a field or the frame count is not what the
    kind carries (see Fields in the module docstring)."""
    kind = frames[0].bytes[:16]
    fields = FIELDS.get(kind)
    if fields is None:
        raise FrameError("kind", f"a frame sequence of unknown kind {kind!r} (the kinds are "
                                 f"{', '.join(k.decode() for k in FIELDS)})")
    name = kind.decode()
    wanted = "at least 3 frames (kind, fields, payload)" if kind == MSG else "2 frames (kind, fields)"
    if len(frames) < 2 or (len(frames) < 3 if kind == MSG else len(frames) != 2):
        raise FrameError(f"{name} frames", f"a {name} of {len(frames)} frame(s), it has {wanted}")
    try:
        meta = json.loads(frames[1].bytes)
    except (UnicodeDecodeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise FrameError(f"{name} fields", f"a {name} whose second frame is not a JSON object")
    for key, field in (COMMON | fields).items():
        if key not in meta and field.check(None):
            continue
        if key not in meta:
            raise FrameError(f"{name} {key}", f"a {name} without field {key!r} ({field.words})")
        if not field.check(meta[key]):
            raise FrameError(f"{name} {key}", f"a {name} whose field {key!r} is {_short(meta[key])}, it must be "
                                              f"{field.words}")
    return Arrival(kind, meta, meta["node"], meta["instance"], frames)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def message_header(meta: dict, sender: int) -> Header:
    """A MSG's Header (its fields checked by `read_arrival`), with the node it came from as source (the
    authenticated sender, not its claim)."""
    header = Header(meta["schedule"], meta["id"], meta["src"], meta["dtype"], tuple(meta["shape"]))
    return header if header.src == sender else replace(header, src=sender)


def message_payload(arrival: Arrival, header: Header, dtype: str) -> np.ndarray:
    """A MSG's payload as the schedule's `dtype`, read-only: on the received frame (no copy) when it is one,
    the parts joined when several. An empty array when the header names another dtype or the payload's
    bytes do not fit its header (`check_arrival` then names the mismatch)."""
    parts = arrival.frames[2:]
    size = sum(len(p) for p in parts)
    if header.dtype != dtype or size != math.prod(header.shape) * np.dtype(dtype).itemsize:
        return np.empty((0,), np.uint8)
    buffer = parts[0].buffer if len(parts) == 1 else b"".join(p.buffer for p in parts)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(header.shape)
