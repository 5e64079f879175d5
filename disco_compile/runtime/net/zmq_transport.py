"""ZmqTransport: the nodes of one export on separate machines, over TCP with ZeroMQ.

The transport puts together the other modules of this package: the peers
(peers.py), the CURVE keys (keys.py), the sockets (sockets.py), the frames on
them (protocol.py) and the requests in flight (requests.py). What it adds is
below: the threads that move the frames, and what happens when a peer fails.

Threads. Each transport owns one background thread (the pump) that watches
the connection monitors, sends heartbeats, and notices peers that die or go
silent. Whoever reads the PULL socket (one thread at a time: the reader lock)
checks every arrival and files payloads by (request id, message id). A thread
that waits for a message or a request reads the socket itself when no other
thread does, so a message goes from ZeroMQ to the thread that needs it without
a hand-off through the pump (measured: an exchange of two 70 KB messages
between two processes on loopback takes about 0.4 ms this way against 0.85 ms
through a pump thread, and ResNet-50 waits for about 50 messages per
inference); other waiting threads sleep until the reader files their message.
The pump reads the socket only while no thread has waited for a while
(_READER_IDLE), so arrivals between requests (heartbeats, a peer's abort) are
still taken at once. Sends are issued directly by the caller's thread on the
peer's PUSH socket (a lock per peer, shared with the pump's heartbeats) with
NOBLOCK and a deep send queue: a send hands the frames to ZeroMQ's I/O thread
and returns at once, so the node's compute never waits for the network.

Failures. A peer is lost when its connection closes without a goodbye (after a
short grace), when nothing (not even a heartbeat, sent every timeout/5 s at
most 1 s apart) has come from it for `timeout` seconds, or when it reports
that it stopped (ABORT without a request). Losing a peer fails every request
open on this node at once (PeerFailed naming the peer); a node failing inside
a request sends ABORT for that request, which fails it everywhere. Frames from
an earlier process of a node, or addressed to an earlier process of this node
(queued while a peer was down), are dropped, so a node that rejoins starts
clean. A restarted node rejoins by starting again with the same address: the
others keep their sockets and take it back when its HELLO arrives. A failed CURVE
handshake (another key, or no keys) refuses the peer at once, not at the connect timeout.

Hostile frames. A frame with fields its kind does not carry (protocol.py), from a
node not in the export or with another node's key, or for a request this node
does not keep (requests.py) is dropped and logged (protocol.Drops), never raised.
"""
from __future__ import annotations

import secrets
import threading
import time
from contextlib import contextmanager

import numpy as np
import zmq

from ...artifact.bundle import Bundle
from ...artifact.schedule import Message
from ...errors import DiscoError, MessageError, PeerFailed, PeerTimeout
from ..transport import Transport, check_arrival
from . import log
from .keys import NodeKeys, check_keys
from .peers import NetworkConfigError, Peer, PeerState, load_peers
from .protocol import (ABORT, BEGIN, BYE, HELLO, MSG, PING, Arrival, Drops, FrameError, HandshakeError, Identity,
                       Limits, manifest_hash, message_header, message_payload, read_arrival)
from .requests import Requests
from .sockets import RECONNECT_MAX_MS, NodeSockets

DEFAULT_CONNECT_TIMEOUT = 60.0  # seconds a node waits at start for every peer's handshake
_POLL_MS = 50
_SIDE_POLL_MS = 20  # the pump's poll while waiting threads read the socket themselves
_READER_IDLE = 0.1  # seconds without a waiting thread after which the pump reads the socket again
_REFUSED_STAY = 1.5 * RECONNECT_MAX_MS / 1000  # s wait_ready keeps the sockets after a refusal: the peer's next
# try (at most RECONNECT_MAX_MS apart) fails too, so it reports the refusal at once as well


class ZmqTransport(Transport):
    """Node `node` of `bundle`, with its peers at `peers` (node index -> "tcp://host:port" or a peers.yaml).

    `keys`: NodeKeys (CURVE authentication and encryption) or None with `insecure=True`. `timeout`: seconds
    of silence after which a peer is lost. `bind`: the endpoint to bind (default: this node's address in
    `peers`). `log_losses`: log each peer lost or refused (False for a node that stops on it and says so in its
    error: `serve` without `stay`, so the loss is printed once). The sockets are bound and connected here; call
    `wait_ready` before the first request and `close` at the end (or use the transport as a context manager).
    """

    def __init__(self, bundle: Bundle, node: int, peers, *, keys: NodeKeys | None = None, insecure: bool = False,
                 timeout: float = 10.0, bind: str | None = None, log_losses: bool = True):
        super().__init__(node, bundle.schedule_hash)
        schedule = bundle.schedule
        if not 0 <= node < schedule.nodes:
            raise NetworkConfigError(f"node {node}: the export has nodes 0..{schedule.nodes - 1}")
        if not timeout > 0:
            raise NetworkConfigError(f"timeout must be above 0, got {timeout}")
        check_keys(node, keys, insecure)
        endpoints = load_peers(peers, schedule.nodes)
        self.nodes = schedule.nodes
        self.manifest_hash = manifest_hash(bundle)
        self.instance = secrets.token_hex(8)
        self._identity = Identity(node, self.nodes, self.instance, self.manifest_hash, self.schedule_hash)
        self.timeout, self.log_losses = timeout, log_losses
        self.heartbeat = min(1.0, timeout / 5)
        self._grace = min(0.5, timeout / 2)  # a closed connection not back within this is a lost peer
        self.keys = keys
        self.endpoint = bind or endpoints[node]
        self._messages = {m.id: m for m in schedule.messages}
        self._peers = {k: Peer(k, e) for k, e in endpoints.items() if k != node}
        self._key_owner = {v.decode(): k for k, v in keys.peers.items()} if keys else {}  # z85 key -> node

        self._cv = threading.Condition()
        self._waiting = 0  # threads waiting for an arrival (under _cv)
        self._last_wait = 0.0  # when a thread last waited for an arrival (monotonic)
        self._requests = Requests(node)
        self.limits = Limits.of(schedule.messages)
        self._drop = Drops(node, self._key_owner if keys else None)
        self._bye = False  # node 0 said goodbye
        self._denials: list[str] = []  # connections this node refused
        self._fatal: DiscoError | None = None  # the pump itself failed
        self._closed = False
        self._leaving = False  # said goodbye or stopped: no more heartbeats
        self._local = threading.local()
        self._begin_lock = threading.Lock()

        self._sockets = NodeSockets(node, self.endpoint, {k: p.endpoint for k, p in self._peers.items()}, keys,
                                    self._denied, max_frame=self.limits.frame)
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._pump_main, name=f"disco-net-node{node}", daemon=True)
        for k in self._peers:
            self._send(k, self._identity.hello())
        self._pump.start()

    def _denied(self, text: str) -> None:
        """A connection this node refused: logged once per distinct refusal (ZeroMQ retries every second)."""
        with self._cv:
            if text in self._denials:
                return
            log.warning(text)
            self._denials.append(text)
            del self._denials[:-8]

    # ------------------------------------------------------------ frames out

    def _frames(self, kind: bytes, peer: int, **fields) -> list[bytes]:
        """Frames of `kind` for the current process of `peer`."""
        return self._identity.frames(kind, self._peers[peer].instance, **fields)

    def _send(self, peer: int, frames: list, *, strict: bool = False) -> None:
        """Queue `frames` for `peer` without waiting. `strict`: a full queue or a closed transport raises."""
        self._sockets.send(peer, frames, strict=strict)

    # ------------------------------------------------------------ the Transport interface

    def current_request(self) -> int:
        """The request this thread runs (`request`), 0 outside one."""
        request = getattr(self._local, "request", None)
        return 0 if request is None else request

    @contextmanager
    def request(self, request: int):
        """Run request `request` in this thread: sends are tagged with it, receives look for it."""
        with self._cv:
            self._requests.start(request)
        previous = getattr(self._local, "request", None)
        self._local.request = request
        try:
            yield request
        finally:
            self._local.request = previous
            self.finish(request)

    def finish(self, request: int) -> None:
        """Forget request `request`: drop what is buffered for it, and its late messages."""
        with self._cv:
            self._requests.finish(request)

    def send(self, msg: Message, payload: np.ndarray) -> None:
        self._check_ends(msg, sending=True)
        request = self.current_request()
        with self._cv:
            self._raise_if_failed(request, f"before sending message {msg.id!r} to node {msg.dst}")
        data = np.ascontiguousarray(payload)
        self._send(msg.dst, self._identity.message(self._peers[msg.dst].instance, msg, data, request, self.limits),
                   strict=True)

    def recv(self, msg: Message, timeout: float) -> np.ndarray:
        self._check_ends(msg, sending=False)
        request = self.current_request()
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                payload = self._requests.take(request, msg.id)
                if payload is not None:
                    return payload
                self._raise_if_failed(request, f"waiting for message {msg.id!r} from node {msg.src}")
                if self._peers[msg.src].state is PeerState.LEFT:
                    raise PeerFailed(f"node {self.node} stopped waiting for message {msg.id!r} from node "
                                     f"{msg.src}: node {msg.src} left (said goodbye) without sending it")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(msg, timeout)
                self._wait(min(remaining, 0.25))

    def _gone(self) -> Peer | None:
        """(holding the lock) The first peer that is lost or refused."""
        return next((p for p in self._peers.values() if p.state.gone), None)

    def _raise_if_failed(self, request: int, doing: str) -> None:
        """Raise (holding the lock) if request `request` cannot go on: it failed, a peer is gone, or the
        transport is closed or broken."""
        if self._closed:
            raise PeerFailed(f"node {self.node} stopped {doing}: the transport was closed")
        if self._fatal is not None:
            raise self._fatal
        err = self._requests.failed.get(request)
        if isinstance(err, MessageError):
            raise err
        if err is None:
            gone = self._gone()
            if gone is not None:
                err = PeerFailed(f"node {gone.node} {gone.problem}")
        if err is not None:
            raise PeerFailed(f"node {self.node} stopped {doing}: {err}") from err

    def abort(self, reason: str) -> None:
        """Tell every peer that this node failed the current request (`reason`); they fail it too."""
        request = self.current_request()
        with self._cv:
            self._requests.fail(request, PeerFailed(f"node {self.node} failed ({reason})"))
            self._cv.notify_all()
        for k in self._peers:
            self._send(k, self._frames(ABORT, k, request=request, reason=reason))

    def abort_node(self, reason: str) -> None:
        """Tell every peer that this node stops altogether (`reason`); they lose it at once."""
        self._leaving = True
        for k in self._peers:
            self._send(k, self._frames(ABORT, k, request=None, reason=reason))

    def goodbye(self) -> None:
        """Tell every peer that this node leaves cleanly (node 0: the session is over)."""
        self._leaving = True
        for k in self._peers:
            self._send(k, self._frames(BYE, k))

    def close(self) -> None:
        """Stop the pump thread and close the sockets (what is queued gets up to 1 s to go out)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._stop.set()
        self._pump.join(timeout=5.0)
        self._sockets.close()

    def __enter__(self) -> ZmqTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ sessions

    def peer_states(self) -> dict[int, tuple[str, str | None]]:
        """Peer -> (state, problem): state is the word of its PeerState: waiting, ready, lost, left or refused."""
        with self._cv:
            return {k: (p.state.value, p.problem) for k, p in self._peers.items()}

    def wait_ready(self, timeout: float) -> None:
        """Wait until every peer has answered the handshake with the same export and is alive.
        HandshakeError if a peer holds another export or refused this node's key; PeerTimeout naming
        the peers still missing (and what went wrong connecting to them) after `timeout` seconds."""
        deadline, refused_at = time.monotonic() + timeout, None
        with self._cv:
            while True:
                if self._closed:
                    raise PeerFailed(f"node {self.node}: the transport was closed")
                if self._fatal is not None:
                    raise self._fatal
                refused = [p for p in self._peers.values() if p.state is PeerState.REFUSED]
                refused_at = (refused_at or time.monotonic()) if refused else None
                if refused and time.monotonic() - refused_at >= _REFUSED_STAY:
                    raise HandshakeError(f"node {refused[0].node} {refused[0].problem}" + self._denials_text())
                missing = [p for p in self._peers.values() if p.state is not PeerState.READY]
                if not missing:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    cls = PeerTimeout if all(p.state is PeerState.WAITING for p in missing) else PeerFailed
                    raise cls(self._missing_text(missing, timeout))
                self._cv.wait(min(remaining, 0.25))

    def require_ready(self, doing: str) -> None:
        """PeerFailed (HandshakeError for a refused peer) at once unless every peer is connected and alive."""
        with self._cv:
            if self._closed:
                raise PeerFailed(f"node {self.node} cannot {doing}: the transport was closed")
            if self._fatal is not None:
                raise self._fatal
            missing = [p for p in self._peers.values() if p.state is not PeerState.READY]
            if missing:
                cls = HandshakeError if any(p.state is PeerState.REFUSED for p in missing) else PeerFailed
                raise cls(f"node {self.node} cannot {doing}: " + "; ".join(
                    f"node {p.node} at {p.endpoint} {p.problem or 'has not answered the handshake'}" for p in missing)
                    + "; once it runs again (same command), it rejoins and the next request runs")

    def _missing_text(self, missing: list[Peer], timeout: float) -> str:
        parts = []
        for p in missing:
            if p.state is PeerState.WAITING:
                parts.append(f"node {p.node} at {p.endpoint} never answered the handshake"
                             + (f" ({p.problem})" if p.problem else ""))
            else:
                parts.append(f"node {p.node} at {p.endpoint} {p.problem}")
        text = f"node {self.node} waited {timeout:g} s for its peers: " + "; ".join(parts) + self._denials_text()
        return text + ("; start every node with the same export, peers file and keys (or all with --insecure), "
                       "and check that the addresses are reachable")

    def _denials_text(self) -> str:
        """(holding the lock) The last connections this node refused, as a clause for an error ('' if none)."""
        return "; refused connections: " + "; ".join(self._denials[-3:]) if self._denials else ""

    def begin(self, request: int) -> None:
        """Node 0: announce request `request` to every peer (before any of its messages)."""
        if self.node != 0:
            raise ValueError("only node 0 starts requests")
        with self._begin_lock:
            for k in self._peers:
                self._send(k, self._frames(BEGIN, k, request=request), strict=True)

    def next_request(self, *, stay: bool = False) -> int | None:
        """A worker's next request, in the order node 0 announced them; None when node 0 said goodbye.
        Unless `stay`, a lost or refused peer raises PeerFailed naming it (the node stops)."""
        with self._cv:
            while True:
                if self._requests.announced:
                    return self._requests.announced.popleft()
                if self._bye:
                    self._bye = False
                    return None
                if self._closed:
                    raise PeerFailed(f"node {self.node}: the transport was closed")
                if self._fatal is not None:
                    raise self._fatal
                gone = None if stay else self._gone()
                if gone is not None:
                    cls = HandshakeError if gone.state is PeerState.REFUSED else PeerFailed
                    raise cls(f"node {self.node} stopped: node {gone.node} {gone.problem}")
                self._wait(0.25)

    def _wait(self, seconds: float) -> None:
        """(holding the lock) Wait up to `seconds` for arrivals: read the PULL socket in this thread if no other
        thread reads it, else sleep until the reader files something (see Threads in the module docstring)."""
        self._last_wait = time.monotonic()
        reader = self._sockets.reader
        if self._closed or not reader.acquire(blocking=False):
            self._waiting += 1
            try:
                self._cv.wait(seconds)
            finally:
                self._waiting -= 1
            return
        self._cv.release()
        try:
            if self._sockets.pull.poll(max(1, int(seconds * 1000))):
                self._drain()
        finally:
            reader.release()
            self._cv.acquire()
            self._cv.notify_all()  # a thread sleeping in _wait may read now

    # ------------------------------------------------------------ the pump thread

    def _drain(self) -> None:
        """(holding the reader lock, not the lock) Take and file what has arrived on the PULL socket."""
        for _ in range(1000):  # at most this many, then the caller looks at the rest of its work
            frames = self._sockets.receive()
            if frames is None:
                return
            self._arrive(frames)

    def _pump_main(self) -> None:
        sockets = self._sockets
        next_ping = 0.0
        try:
            while not self._stop.is_set():
                with self._cv:
                    reading = (self._waiting == 0 and time.monotonic() - self._last_wait > _READER_IDLE
                               and sockets.reader.acquire(blocking=False))
                if reading:
                    try:
                        ready = sockets.poll(_POLL_MS, pull=True)
                        if sockets.pull in ready:
                            self._drain()
                    finally:
                        sockets.reader.release()
                    with self._cv:
                        self._cv.notify_all()  # a thread that came to wait meanwhile may read now
                else:
                    ready = sockets.poll(_SIDE_POLL_MS, pull=False)
                for peer, event in sockets.monitor_events(ready):
                    self._monitor_event(peer, event)
                now = time.monotonic()
                if now >= next_ping and not self._leaving:
                    next_ping = now + self.heartbeat
                    for k, p in self._peers.items():
                        if p.state in (PeerState.READY, PeerState.LOST):
                            self._send(k, self._frames(PING, k))
                self._check_liveness(now)
        except BaseException as exc:  # a bug here must not leave the node waiting forever
            log.exception("node %d: the network thread failed", self.node)
            with self._cv:
                self._fatal = PeerFailed(f"node {self.node}: its network thread failed ({type(exc).__name__}: "
                                         f"{exc})")
                self._cv.notify_all()

    def _check_liveness(self, now: float) -> None:
        with self._cv:
            self._requests.expire(now - self.timeout)
            for p in self._peers.values():
                if p.state is not PeerState.READY:
                    continue
                if p.dropped_at is not None and now - p.dropped_at > self._grace:
                    self._lose(p, "was lost: its connection closed (the process ended, or the network dropped)")
                elif now - p.last_seen > self.timeout:
                    self._lose(p, f"was lost: silent for {self.timeout:g} s (no message or heartbeat)")

    def _lose(self, p: Peer, problem: str, state: PeerState = PeerState.LOST) -> None:
        """(holding the lock) `p` is gone: fail every request open or announced here."""
        if p.state is state and p.problem == problem:
            return
        p.state, p.problem, p.dropped_at = state, problem, None
        if self.log_losses:
            (log.error if state is PeerState.REFUSED else log.warning)("node %d: node %d %s", self.node, p.node,
                                                                       problem)
        self._fail_open(PeerFailed(f"node {p.node} {problem}"))

    def _fail_open(self, err: DiscoError) -> None:
        """(holding the lock) Fail every request open or announced here with `err`."""
        self._requests.fail_open(err)
        self._cv.notify_all()

    def _monitor_event(self, peer: int | None, event: dict) -> None:
        kind, value, where = event["event"], event.get("value"), event.get("endpoint", b"").decode()
        with self._cv:
            if peer is None:  # this node's PULL: someone failed the handshake with it
                self._denied(f"node {self.node} refused a connection on {where}: its handshake failed "
                             f"({zmq.Event(kind).name}: it encrypts to another key, or one side runs without keys)")
                return
            p = self._peers[peer]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                p.dropped_at = None
                if p.state is PeerState.WAITING:
                    p.problem = None
                self._send(peer, self._identity.hello())  # a new connection may be a new process of the peer
            elif kind == zmq.EVENT_DISCONNECTED:
                if p.state is PeerState.READY:
                    p.dropped_at = time.monotonic()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._lose(p, f"refused this node's key (ZAP status {value} at {where}): node {self.node}'s "
                              f"public key is not in node {peer}'s public_keys folder", state=PeerState.REFUSED)
            else:
                self._handshake_failed(p, zmq.Event(kind).name, where)

    def _handshake_failed(self, p: Peer, event: str, where: str) -> None:
        """(holding the lock) This node's handshake with `p` failed (`event`): `p` is refused at once. A wrong key
        fails every retry; a peer that died inside a handshake (the other cause) is taken back by its next HELLO."""
        problem = (f"failed the CURVE handshake with node {self.node} ({event} at {where}): it holds another key "
                   f"than public_keys/node{p.node}.key, or runs without keys (--insecure)" if self.keys else
                   f"failed the handshake with node {self.node} ({event} at {where}): it runs with keys; give "
                   f"every node --keys, or every node --insecure")
        if p.state is not PeerState.LEFT:
            self._lose(p, problem, state=PeerState.REFUSED)

    # ------------------------------------------------------------ arrivals

    def _arrive(self, frames: list[zmq.Frame]) -> None:
        """(holding the reader lock, not the lock) Check where `frames` come from, then take them in."""
        try:
            arrival = read_arrival(frames)
        except FrameError as exc:
            self._drop(exc.what, str(exc), frames)
            return
        if not self._authentic(arrival):
            return
        with self._cv:
            p = self._peers[arrival.sender]
            if arrival.kind == HELLO:
                self._on_hello(p, arrival.meta)
                return
            if arrival.instance != p.instance:
                return  # from an earlier process of the peer (or one whose handshake was refused)
            p.last_seen = time.monotonic()
            p.dropped_at = None
            if p.state is PeerState.LOST:
                p.state, p.problem = PeerState.READY, None
                log.warning("node %d: node %d is back", self.node, p.node)
            to = arrival.meta.get("to")
            if to != self.instance:
                if arrival.kind == PING:
                    self._send(p.node, self._identity.hello())  # it does not know this process yet
                if to is not None or arrival.kind in (MSG, BEGIN):
                    return  # meant for an earlier process of this node (queued while it was down)
            self._on_frame(p, arrival)
            self._cv.notify_all()

    def _authentic(self, arrival: Arrival) -> bool:
        """Whether `arrival` names a peer of this node and, with keys, came with that peer's key (else logged)."""
        sender = arrival.sender
        if sender not in self._peers:
            log.warning("node %d: dropped a frame from node %d, %s", self.node, sender,
                        "which is this node's own index: two processes run it" if sender == self.node
                        else f"but the export has nodes 0..{self.nodes - 1}")
            return False
        if self.keys is not None:
            owner = self._key_owner.get(arrival.frames[0].get("User-Id"))
            if owner != sender:
                log.warning("node %d: dropped a frame claiming to come from node %d but sent with %s", self.node,
                            sender, f"node {owner}'s key" if owner is not None else "an unknown key")
                return False
        return True

    def _on_frame(self, p: Peer, arrival: Arrival) -> None:
        """(holding the lock) A frame from the current process of `p`, addressed to this one (not a HELLO)."""
        kind, meta = arrival.kind, arrival.meta
        if kind == MSG:
            self._on_message(p.node, arrival)
        elif kind == BEGIN:
            refused = ("only node 0 announces requests, to the other nodes" if p.node != 0 or self.node == 0
                       else self._requests.announce(meta["request"]))
            if refused:
                self._drop("BEGIN refused", f"a BEGIN of request {meta['request']} from node {p.node}: {refused}")
        elif kind == ABORT:
            reason, request = meta.get("reason", "no reason given"), meta.get("request")
            if request is None:
                self._lose(p, f"stopped ({reason})")
            elif self._admitted("an ABORT", request, p.node):
                self._requests.fail(request, PeerFailed(f"node {p.node} failed ({reason})"))
        elif kind == BYE:
            p.state, p.problem = PeerState.LEFT, "left (said goodbye)"
            if p.node == 0:
                self._bye = True

    def _on_hello(self, p: Peer, meta: dict) -> None:
        """(holding the lock) A peer's handshake."""
        problem = self._identity.mismatch(meta, p)
        if problem is not None:
            self._lose(p, problem, state=PeerState.REFUSED)
            return
        instance = str(meta["instance"])
        if instance != p.instance:
            if p.instance is not None:
                log.warning("node %d: node %d rejoined (a new process)", self.node, p.node)
                if p.state is PeerState.READY:  # restarted before we noticed: the requests running are gone
                    self._fail_open(PeerFailed(f"node {p.node} restarted (a new process) while requests were "
                                               f"running"))
                self._requests.drop_messages({m for m, message in self._messages.items() if message.src == p.node})
            p.instance = instance
            self._send(p.node, self._identity.hello())
        p.state, p.problem, p.last_seen, p.dropped_at = PeerState.READY, None, time.monotonic(), None
        self._cv.notify_all()

    def _on_message(self, sender: int, arrival: Arrival) -> None:
        """(holding the lock) A MSG frame: checked against the schedule, then filed by (request, id)."""
        request, message_id = arrival.meta["request"], arrival.meta["id"]
        if not self._admitted(f"message {message_id!r}", request, sender):
            return
        msg = self._messages.get(message_id)
        if msg is None or msg.dst != self.node:
            self._requests.fail(request, MessageError(
                f"message {message_id!r} from node {sender} (request {request}) arrived wrong: this node's schedule "
                f"has no such message for node {self.node}; the nodes hold different exports"))
            return
        header = message_header(arrival.meta, sender)
        payload = message_payload(arrival, header, msg.dtype)
        try:
            check_arrival(header, payload, msg, self.schedule_hash)
        except MessageError as exc:
            log.error("node %d: %s", self.node, exc)
            self._requests.fail(request, exc)
            return
        refused = self._requests.file(request, message_id, payload)
        if refused:
            self._drop("MSG twice", f"a message from node {sender}: {refused}")

    def _admitted(self, what: str, request: int, sender: int) -> bool:
        """(holding the lock) Whether `what` from `sender` for `request` is taken in (requests.py: What is kept);
        else it is dropped, and logged unless it is late for a request that ended here."""
        refused = self._requests.admit(request, sender, time.monotonic())
        if refused:
            self._drop("unannounced", f"{what} from node {sender}: {refused}")
        return refused is None
