"""One node's ZeroMQ sockets: a PULL bound at its own address, a PUSH to every peer, and their monitors.

Sockets. Every node binds one PULL socket at its own address (peers.yaml) and
connects one PUSH socket to each peer's PULL. So each ordered pair of nodes has
exactly one TCP connection, in the direction the data flows: a node's messages
to peer j leave through its PUSH to j (a FIFO of its own, so a slow peer never
holds up the others, and the messages of one pair arrive in the order sent),
and everything addressed to a node arrives, fair-queued, on its one PULL. PUSH
and PULL rather than DEALER and ROUTER because traffic is one-way: nothing is
ever answered on the connection it came in on, and ZeroMQ reconnects a PUSH by
itself when its peer restarts at the same address, so the others keep their
sockets when a node rejoins.

`NodeSockets` holds them for ZmqTransport: `send` queues frames on a peer's
PUSH (a lock per peer) without waiting, `receive` and `poll` serve the one
thread that reads the PULL socket at a time (`reader`, see Threads in
zmq_transport.py). With keys the PULL is a CURVE server behind the ZAP handler
of keys.py and each PUSH a CURVE client expecting its peer's public key. The
monitors report each PUSH's handshakes and disconnections, and the PULL's
failed handshakes (a peer with a key or a protocol this node refuses). Every
socket refuses frames above `max_frame` bytes (ZMQ_MAXMSGSIZE, set before it
binds or connects, so it holds during the CURVE handshake too): ZeroMQ closes a
connection whose next frame header announces more, before reading it.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from ...errors import PeerFailed
from .keys import ZAP_DOMAIN, Authenticator, NodeKeys
from .peers import NetworkConfigError

_SEND_QUEUE = 10_000  # frames queued for one peer before a send fails (the peer is not taking them)
_LINGER_MS = 1000  # how long closing waits to deliver what is queued (a goodbye, an abort)
RECONNECT_MAX_MS = 1000  # the longest a PUSH waits between tries to connect (from 100 ms, doubling)
_PULL_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_PUSH_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class NodeSockets:
    """Node `node`'s PULL socket bound at `bind` and a PUSH socket connected to each of `peers` (node index ->
    endpoint), with CURVE when `keys` are given. `on_denied(text)` hears of every connection the ZAP handler
    refuses; `max_frame`: the largest frame any socket takes. Binding failures are a NetworkConfigError; `close`
    releases everything."""

    def __init__(self, node: int, bind: str, peers: dict[int, str], keys: NodeKeys | None, on_denied, *,
                 max_frame: int):
        self.node = node
        self.max_frame = max_frame
        self.reader = threading.Lock()  # held by the one thread reading the PULL socket
        self._send_locks = {k: threading.Lock() for k in peers}
        self._ctx = zmq.Context()
        self._auth: Authenticator | None = None
        self._monitors: dict[zmq.Socket, int | None] = {}  # monitor -> the peer of its PUSH (None: the PULL)
        self.pull: zmq.Socket | None = None
        self._push: dict[int, zmq.Socket] = {}
        try:
            self._bind(bind, keys, on_denied)
            for k, peer in peers.items():
                self._connect(k, peer, keys)
        except BaseException:
            self.close()
            raise
        self._monitor_poller, self._poller = zmq.Poller(), zmq.Poller()
        self._poller.register(self.pull, zmq.POLLIN)
        for m in self._monitors:
            self._monitor_poller.register(m, zmq.POLLIN)
            self._poller.register(m, zmq.POLLIN)

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.maxmsgsize = self.max_frame
        if "[" in endpoint:
            s.ipv6 = True
        return s

    def _bind(self, bind: str, keys: NodeKeys | None, on_denied) -> None:
        if keys is not None:
            self._auth = Authenticator(self._ctx, self.node, on_denied)
            self._auth.start()
            self._auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.public_dir))
        pull = self.pull = self._socket(zmq.PULL, bind)
        pull.linger = 0
        pull.rcvhwm = 0
        if keys is not None:
            pull.curve_publickey, pull.curve_secretkey = keys.public, keys.secret
            pull.curve_server = True
            pull.zap_domain = ZAP_DOMAIN.encode()
        self._monitors[pull.get_monitor_socket(_PULL_EVENTS)] = None
        try:
            pull.bind(bind)
        except zmq.ZMQError as exc:
            raise NetworkConfigError(f"node {self.node} cannot listen at {bind} ({exc}): another program "
                                     f"uses the port, or the address is not this machine's (see --bind)") from exc

    def _connect(self, peer: int, endpoint: str, keys: NodeKeys | None) -> None:
        s = self._socket(zmq.PUSH, endpoint)
        s.linger = _LINGER_MS
        s.sndhwm = _SEND_QUEUE
        s.reconnect_ivl = 100
        s.reconnect_ivl_max = RECONNECT_MAX_MS
        if keys is not None:
            s.curve_publickey, s.curve_secretkey = keys.public, keys.secret
            s.curve_serverkey = keys.peers[peer]
        self._monitors[s.get_monitor_socket(_PUSH_EVENTS)] = peer
        s.connect(endpoint)
        self._push[peer] = s

    def send(self, peer: int, frames: list, *, strict: bool = False) -> None:
        """Queue `frames` for `peer` without waiting. `strict`: a full queue or closed sockets raise PeerFailed
        (else the frames are dropped: heartbeats, goodbyes)."""
        try:
            with self._send_locks[peer]:
                self._push[peer].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if strict:
                raise PeerFailed(f"node {self.node} cannot send to node {peer}: {_SEND_QUEUE} messages are queued "
                                 f"for it already (it stopped taking them)") from None
        except zmq.ZMQError as exc:
            if strict:
                raise PeerFailed(f"node {self.node} cannot send to node {peer}: the transport is closed "
                                 f"({exc})") from exc

    def receive(self) -> list[zmq.Frame] | None:
        """(holding the reader lock) The next frames waiting on the PULL socket, None if there are none."""
        try:
            return self.pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def poll(self, timeout_ms: int, *, pull: bool) -> set[zmq.Socket]:
        """Wait up to `timeout_ms` for the monitors and, with `pull` (holding the reader lock), the PULL socket;
        the sockets with something to read."""
        return {s for s, _ in (self._poller if pull else self._monitor_poller).poll(timeout_ms)}

    def monitor_events(self, ready: set[zmq.Socket]) -> Iterator[tuple[int | None, dict]]:
        """(from one thread) The events waiting on the monitors in `ready`: (peer of the PUSH or None for the
        PULL, event)."""
        for m, peer in self._monitors.items():
            if m in ready:
                while m.poll(0):
                    yield peer, recv_monitor_message(m)

    def close(self) -> None:
        """Close every socket; what the PUSH sockets hold (a goodbye, an abort) gets their linger to go out."""
        for sock in [*self._push.values(), self.pull]:
            if sock is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
        for m in self._monitors:
            m.close(linger=0)
        if self.pull is not None:
            with self.reader:  # a waiting thread reading it finishes its poll first (at most 0.25 s)
                self.pull.close(linger=0)
        for k, s in self._push.items():
            with self._send_locks[k]:  # no send may be inside the socket while it closes
                s.close()  # with its linger: what is queued (a goodbye, an abort) still goes out
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
