"""ZmqTransport: the nodes of one export on separate machines, over TCP with ZeroMQ.

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

Requests. Messages are tagged with a request id, and a receive looks for the
(request, message) pair, so requests in flight at the same time cannot mix.
The thread that runs a request sets it with `with transport.request(r):`;
without one, request 0. Node 0 announces each request to every peer with
BEGIN, under one lock, so every node sees the requests in the same order;
workers run them in that order (`next_request`).

Failures. A peer is lost when its connection closes without a goodbye (after a
short grace), when nothing (not even a heartbeat, sent every timeout/5 s at
most 1 s apart) has come from it for `timeout` seconds, or when it reports
that it stopped (ABORT without a request). Losing a peer fails every request
open on this node at once (PeerFailed naming the peer); a node failing inside
a request sends ABORT for that request, which fails it everywhere. Frames from
an earlier process of a node, or addressed to an earlier process of this node
(queued while a peer was down), are dropped, so a node that rejoins starts
clean. A restarted node rejoins by starting again with the same address: the
others keep their sockets and take it back when its HELLO arrives.

Security. With keys (`load_keys`, made by `keygen`), every socket uses CURVE:
the PULL is a CURVE server whose ZAP handler (zmq.auth ThreadAuthenticator)
accepts only the public keys in the keys' public_keys folder and logs every
refusal; each PUSH is a CURVE client that checks the peer's server key
against public_keys/node{j}.key. A frame whose authenticated key is not the
key of the node it claims to come from is dropped and logged. Without keys
the transport needs `insecure=True`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from ...artifact.bundle import Bundle, canonical_json
from ...errors import DiscoError, MessageError, PeerFailed, PeerTimeout
from ...artifact.schedule import Message
from ..transport import Header, Transport, check_arrival

PROTOCOL = 1
PUBLIC_KEYS = "public_keys"
DEFAULT_CONNECT_TIMEOUT = 60.0  # seconds a node waits at start for every peer's handshake
_SEND_QUEUE = 10_000  # frames queued for one peer before a send fails (the peer is not taking them)
_LINGER_MS = 1000  # how long closing waits to deliver what is queued (a goodbye, an abort)
_POLL_MS = 50
_SIDE_POLL_MS = 20  # the pump's poll while waiting threads read the socket themselves
_READER_IDLE = 0.1  # seconds without a waiting thread after which the pump reads the socket again
_FINISHED_KEPT = 4096  # ids of finished requests remembered, to drop their late messages

HELLO, PING, BEGIN, MSG, ABORT, BYE = b"HELLO", b"PING", b"BEGIN", b"MSG", b"ABORT", b"BYE"

log = logging.getLogger("disco_compile.runtime.net")


class HandshakeError(DiscoError):
    """Nodes that must not run together: different exports, or keys that do not fit."""


class NetworkConfigError(DiscoError, ValueError):
    """A peers file, a keys directory or a transport option that cannot be used."""


# ---------------------------------------------------------------- peers

def _parse_address(where: str, value) -> tuple[str, int]:
    text = str(value).strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NetworkConfigError(f"{where}: {value!r} is not HOST:PORT (e.g. 10.0.0.2:5550)")
    return host, int(port)


def endpoint(host: str, port: int) -> str:
    """The ZeroMQ TCP endpoint of HOST:PORT (IPv6 addresses in brackets: [::1]:5550)."""
    return f"tcp://{host}:{port}"


def load_peers(peers, nodes: int | None = None) -> dict[int, str]:
    """Node index -> "tcp://host:port". `peers`: a YAML file (or a mapping) from node index to "host:port"
    for every node 0..N-1; with `nodes`, N must be that."""
    where = "peers"
    if isinstance(peers, (str, os.PathLike)):
        where = str(peers)
        try:
            import yaml
            with open(peers, encoding="utf-8") as f:
                peers = yaml.safe_load(f)
        except OSError as exc:
            raise NetworkConfigError(f"{where}: cannot be read ({exc})") from exc
        except Exception as exc:  # yaml.YAMLError and friends
            raise NetworkConfigError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(peers, dict) or not peers:
        raise NetworkConfigError(f"{where}: give a mapping from node index to HOST:PORT, one line per node, "
                                 f"e.g. '0: 10.0.0.1:5550'")
    result = {}
    for key, value in peers.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise NetworkConfigError(f"{where}: {key!r} is not a node index") from None
        result[k] = endpoint(*_parse_address(f"{where}: node {k}", value))
    expected = nodes if nodes is not None else len(result)
    if sorted(result) != list(range(expected)):
        raise NetworkConfigError(f"{where}: has nodes {sorted(result)}, but the export has nodes "
                                 f"0..{expected - 1}: give one address per node")
    clash = [e for e in set(result.values()) if list(result.values()).count(e) > 1]
    if clash:
        raise NetworkConfigError(f"{where}: several nodes have the address {clash[0]}")
    return result


# ---------------------------------------------------------------- keys

@dataclass(frozen=True)
class NodeKeys:
    """One node's CURVE key pair and the public key of every node (z85 bytes)."""
    node: int
    public: bytes
    secret: bytes
    peers: dict[int, bytes]
    public_dir: Path


def keygen(directory: str | os.PathLike, nodes: int, *, force: bool = False) -> list[Path]:
    """Make a CURVE key pair per node in `directory` (node{k}.key, node{k}.key_secret) and the folder
    `directory`/public_keys with every node's public key. Returns the files written. Existing keys are
    refused unless `force`."""
    if nodes < 1:
        raise NetworkConfigError(f"--nodes {nodes}: give at least 1 node")
    root = Path(directory)
    public = root / PUBLIC_KEYS
    existing = [p for p in [*root.glob("node*.key*"), *public.glob("*.key")] if p.is_file()]
    if existing and not force:
        raise NetworkConfigError(f"{root} already holds keys ({existing[0].name} ...); choose another directory or "
                                 f"pass --force to replace them (every node then needs the new ones)")
    if force and public.is_dir():
        for p in public.glob("*.key"):
            p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    public.mkdir(exist_ok=True)
    written = []
    for k in range(nodes):
        pub, sec = zmq.auth.create_certificates(str(root), f"node{k}")
        os.chmod(sec, 0o600)
        shutil.copy(pub, public / f"node{k}.key")
        written += [Path(pub), Path(sec), public / f"node{k}.key"]
    return written


def load_keys(directory: str | os.PathLike, node: int, nodes: int) -> NodeKeys:
    """Node `node`'s keys from `directory`: node{node}.key_secret and public_keys/node{k}.key for every node."""
    root = Path(directory)
    secret_file = root / f"node{node}.key_secret"
    public = root / PUBLIC_KEYS
    if not secret_file.is_file():
        raise NetworkConfigError(f"--keys {root}: no node{node}.key_secret (make keys with "
                                 f"'disco-run keygen {root} --nodes {nodes}' and give node {node} its secret key)")
    try:
        pub, sec = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise NetworkConfigError(f"{secret_file}: not a key file made by 'disco-run keygen' ({exc})") from exc
    if not sec:
        raise NetworkConfigError(f"{secret_file}: holds no secret key")
    peers = {}
    for k in range(nodes):
        f = public / f"node{k}.key"
        try:
            peers[k], _ = zmq.auth.load_certificate(str(f))
        except (OSError, ValueError) as exc:
            raise NetworkConfigError(f"--keys {root}: cannot read {PUBLIC_KEYS}/node{k}.key ({exc}); every node "
                                     f"needs the whole public_keys folder") from exc
    if peers[node] != pub:
        raise NetworkConfigError(f"--keys {root}: node{node}.key_secret is not the key pair of "
                                 f"{PUBLIC_KEYS}/node{node}.key, so the other nodes would refuse this node; "
                                 f"give every node keys from the same 'disco-run keygen'")
    return NodeKeys(node=node, public=pub, secret=sec, peers=peers, public_dir=public)


class _Authenticator(ThreadAuthenticator):
    """zmq.auth's ThreadAuthenticator, logging every refused connection (its own log is debug level)."""

    def __init__(self, context: zmq.Context, node: int, keys: NodeKeys, on_denied):
        super().__init__(context, log=logging.getLogger("disco_compile.runtime.zap"))
        self._node, self._names = node, {v: f"node {k}" for k, v in keys.peers.items()}
        self._on_denied = on_denied
        self._request: list[bytes] = []

    def handle_zap_message(self, msg: list[bytes]):
        self._request = msg  # requests are handled one at a time: _send_zap_reply below answers this one
        return super().handle_zap_message(msg)  # a coroutine in pyzmq >= 25 (awaited by the caller)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous") -> None:
        if status_code != b"200":
            msg = self._request
            address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
            key = zmq.utils.z85.encode(msg[6]).decode() if len(msg) > 6 and len(msg[6]) == 32 else "(none)"
            self._on_denied(f"node {self._node} refused a connection from {address}: ZAP denied "
                            f"({status_text.decode('utf-8', 'replace')}), its public key {key} is not in "
                            f"the public_keys folder")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


# ---------------------------------------------------------------- the transport

def manifest_hash(bundle: Bundle) -> str:
    """sha256 of the canonical manifest.json: names the export (it holds the sha256 of every other file)."""
    return hashlib.sha256(canonical_json(bundle.manifest.to_json())).hexdigest()


@dataclass
class _Peer:
    node: int
    endpoint: str
    state: str = "waiting"  # waiting (no HELLO yet) | ready | lost | left | refused
    instance: str | None = None  # of its current process, from its HELLO
    last_seen: float = 0.0
    problem: str | None = None  # why it is lost or refused, or the last trouble connecting to it
    dropped_at: float | None = None  # its connection closed at; lost if it is not back within the grace


class ZmqTransport(Transport):
    """Node `node` of `bundle`, with its peers at `peers` (node index -> "tcp://host:port" or a peers.yaml).

    `keys`: NodeKeys (CURVE authentication and encryption) or None with `insecure=True`. `timeout`: seconds
    of silence after which a peer is lost. `bind`: the endpoint to bind (default: this node's address in
    `peers`). The sockets are bound and connected here; call `wait_ready` before the first request and
    `close` at the end (or use the transport as a context manager).
    """

    def __init__(self, bundle: Bundle, node: int, peers, *, keys: NodeKeys | None = None, insecure: bool = False,
                 timeout: float = 10.0, bind: str | None = None):
        super().__init__(node, bundle.schedule_hash)
        schedule = bundle.schedule
        if not 0 <= node < schedule.nodes:
            raise NetworkConfigError(f"node {node}: the export has nodes 0..{schedule.nodes - 1}")
        if keys is None and not insecure:
            raise NetworkConfigError("running over the network without keys needs an explicit insecure=True "
                                     "(--insecure): anyone who can reach the ports could read and inject messages; "
                                     "make keys with 'disco-run keygen DIR --nodes N' and give keys=load_keys(...) "
                                     "(--keys DIR)")
        if keys is not None and insecure:
            raise NetworkConfigError("give keys or insecure=True, not both")
        if keys is not None and keys.node != node:
            raise NetworkConfigError(f"the keys are node {keys.node}'s, this is node {node}")
        if not timeout > 0:
            raise NetworkConfigError(f"timeout must be above 0, got {timeout}")
        endpoints = load_peers(peers, schedule.nodes)
        self.nodes = schedule.nodes
        self.manifest_hash = manifest_hash(bundle)
        self.instance = secrets.token_hex(8)
        self.timeout = timeout
        self.heartbeat = min(1.0, timeout / 5)
        self._grace = min(0.5, timeout / 2)  # a closed connection not back within this is a lost peer
        self.keys = keys
        self.endpoint = bind or endpoints[node]
        self._messages = {m.id: m for m in schedule.messages}
        self._peers = {k: _Peer(k, e) for k, e in endpoints.items() if k != node}
        self._key_owner = {v.decode(): k for k, v in keys.peers.items()} if keys else {}  # z85 key -> node

        self._cv = threading.Condition()
        self._reader = threading.Lock()  # held by the one thread reading the PULL socket
        self._waiting = 0  # threads waiting for an arrival (under _cv)
        self._last_wait = 0.0  # when a thread last waited for an arrival (monotonic)
        self._inbox: dict[tuple[int, str], deque[np.ndarray]] = {}
        self._failed: dict[int, DiscoError] = {}  # request -> why it failed
        self._open: set[int] = set()  # requests running on this node
        self._finished: deque[int] = deque(maxlen=_FINISHED_KEPT)
        self._finished_set: set[int] = set()
        self._begins: deque[int] = deque()  # requests announced by node 0, not yet taken
        self._bye = False  # node 0 said goodbye
        self._denials: list[str] = []  # connections this node refused
        self._fatal: DiscoError | None = None  # the pump itself failed
        self._closed = False
        self._leaving = False  # said goodbye or stopped: no more heartbeats
        self._local = threading.local()
        self._begin_lock = threading.Lock()
        self._send_locks = {k: threading.Lock() for k in self._peers}

        self._ctx = zmq.Context()
        self._auth = None
        self._monitors: dict[zmq.Socket, int | None] = {}
        try:
            self._setup_sockets()
        except BaseException:
            self._teardown()
            raise
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._pump_main, name=f"disco-net-node{node}", daemon=True)
        for k in self._peers:
            self._send(k, self._hello())
        self._pump.start()

    # ------------------------------------------------------------ sockets

    def _setup_sockets(self) -> None:
        ctx, keys = self._ctx, self.keys
        if keys is not None:
            self._auth = _Authenticator(ctx, self.node, keys, self._denied)
            self._auth.start()
            self._auth.configure_curve(domain="disco", location=str(keys.public_dir))
        self._pull = ctx.socket(zmq.PULL)
        self._pull.linger = 0
        self._pull.rcvhwm = 0
        if keys is not None:
            self._pull.curve_publickey, self._pull.curve_secretkey = keys.public, keys.secret
            self._pull.curve_server = True
            self._pull.zap_domain = b"disco"
        if "[" in self.endpoint:
            self._pull.ipv6 = True
        self._monitors[self._pull.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)] = None
        try:
            self._pull.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise NetworkConfigError(f"node {self.node} cannot listen at {self.endpoint} ({exc}): another program "
                                     f"uses the port, or the address is not this machine's (see --bind)") from exc
        self._push: dict[int, zmq.Socket] = {}
        for k, peer in self._peers.items():
            s = ctx.socket(zmq.PUSH)
            s.linger = _LINGER_MS
            s.sndhwm = _SEND_QUEUE
            s.reconnect_ivl = 100
            s.reconnect_ivl_max = 1000
            if "[" in peer.endpoint:
                s.ipv6 = True
            if keys is not None:
                s.curve_publickey, s.curve_secretkey = keys.public, keys.secret
                s.curve_serverkey = keys.peers[k]
            self._monitors[s.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)] = k
            s.connect(peer.endpoint)
            self._push[k] = s

    def _teardown(self) -> None:
        for sock in [*getattr(self, "_push", {}).values(), getattr(self, "_pull", None)]:
            if sock is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
        for m in self._monitors:
            m.close(linger=0)
        if getattr(self, "_pull", None) is not None:
            with self._reader:  # a waiting thread reading it finishes its poll first (at most 0.25 s)
                self._pull.close(linger=0)
        for k, s in getattr(self, "_push", {}).items():
            with self._send_locks[k]:  # no send may be inside the socket while it closes
                s.close()  # with its linger: what is queued (a goodbye, an abort) still goes out
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def _denied(self, text: str) -> None:
        """A connection this node refused: logged once per distinct refusal (ZeroMQ retries every second)."""
        with self._cv:
            if text in self._denials:
                return
            log.warning(text)
            self._denials.append(text)
            del self._denials[:-8]

    # ------------------------------------------------------------ frames out

    def _meta(self, peer: int, **fields) -> bytes:
        p = self._peers[peer]
        return json.dumps({"node": self.node, "instance": self.instance, "to": p.instance, **fields},
                          separators=(",", ":")).encode()

    def _hello(self) -> list[bytes]:
        return [HELLO, json.dumps({"proto": PROTOCOL, "node": self.node, "nodes": self.nodes,
                                   "instance": self.instance, "manifest": self.manifest_hash,
                                   "schedule": self.schedule_hash}).encode()]

    def _send(self, peer: int, frames: list, *, strict: bool = False) -> None:
        """Queue `frames` for `peer` without waiting. `strict`: a full queue or a closed transport raises."""
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

    # ------------------------------------------------------------ the Transport interface

    def current_request(self) -> int:
        """The request this thread runs (`request`), 0 outside one."""
        request = getattr(self._local, "request", None)
        return 0 if request is None else request

    @contextmanager
    def request(self, request: int):
        """Run request `request` in this thread: sends are tagged with it, receives look for it."""
        with self._cv:
            if request in self._open:
                raise ValueError(f"request {request} is running already on node {self.node}")
            self._open.add(request)
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
            self._open.discard(request)
            self._failed.pop(request, None)
            for key in [key for key in self._inbox if key[0] == request]:
                del self._inbox[key]
            if request not in self._finished_set:
                if len(self._finished) == self._finished.maxlen:
                    self._finished_set.discard(self._finished[0])
                self._finished.append(request)
                self._finished_set.add(request)

    def send(self, msg: Message, payload: np.ndarray) -> None:
        self._check_ends(msg, sending=True)
        request = self.current_request()
        with self._cv:
            self._raise_if_failed(request, f"before sending message {msg.id!r} to node {msg.dst}")
        data = np.ascontiguousarray(payload)
        meta = self._meta(msg.dst, schedule=self.schedule_hash, id=msg.id, src=msg.src, dtype=data.dtype.name,
                          shape=[int(d) for d in data.shape], request=request)
        self._send(msg.dst, [MSG, meta, data], strict=True)

    def recv(self, msg: Message, timeout: float) -> np.ndarray:
        self._check_ends(msg, sending=False)
        request = self.current_request()
        deadline = time.monotonic() + timeout
        key = (request, msg.id)
        with self._cv:
            while True:
                queue_ = self._inbox.get(key)
                if queue_:
                    payload = queue_.popleft()
                    if not queue_:
                        del self._inbox[key]
                    return payload
                self._raise_if_failed(request, f"waiting for message {msg.id!r} from node {msg.src}")
                src = self._peers[msg.src]
                if src.state == "left":
                    raise PeerFailed(f"node {self.node} stopped waiting for message {msg.id!r} from node "
                                     f"{msg.src}: node {msg.src} left (said goodbye) without sending it")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(msg, timeout)
                self._wait(min(remaining, 0.25))

    def _raise_if_failed(self, request: int, doing: str) -> None:
        """Raise (holding the lock) if request `request` cannot go on: it failed, a peer is gone, or the
        transport is closed or broken."""
        if self._closed:
            raise PeerFailed(f"node {self.node} stopped {doing}: the transport was closed")
        if self._fatal is not None:
            raise self._fatal
        err = self._failed.get(request)
        if isinstance(err, MessageError):
            raise err
        if err is None:
            gone = next((p for p in self._peers.values() if p.state in ("lost", "refused")), None)
            if gone is not None:
                err = PeerFailed(f"node {gone.node} {gone.problem}")
        if err is not None:
            raise PeerFailed(f"node {self.node} stopped {doing}: {err}") from err

    def abort(self, reason: str) -> None:
        """Tell every peer that this node failed the current request (`reason`); they fail it too."""
        request = self.current_request()
        with self._cv:
            self._failed.setdefault(request, PeerFailed(f"node {self.node} failed ({reason})"))
            self._cv.notify_all()
        for k in self._peers:
            self._send(k, [ABORT, self._meta(k, request=request, reason=reason)])

    def abort_node(self, reason: str) -> None:
        """Tell every peer that this node stops altogether (`reason`); they lose it at once."""
        self._leaving = True
        for k in self._peers:
            self._send(k, [ABORT, self._meta(k, request=None, reason=reason)])

    def goodbye(self) -> None:
        """Tell every peer that this node leaves cleanly (node 0: the session is over)."""
        self._leaving = True
        for k in self._peers:
            self._send(k, [BYE, self._meta(k)])

    def close(self) -> None:
        """Stop the pump thread and close the sockets (what is queued gets up to 1 s to go out)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._stop.set()
        self._pump.join(timeout=5.0)
        self._teardown()

    def __enter__(self) -> ZmqTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ sessions

    def peer_states(self) -> dict[int, tuple[str, str | None]]:
        """Peer -> (state, problem): state is waiting, ready, lost, left or refused."""
        with self._cv:
            return {k: (p.state, p.problem) for k, p in self._peers.items()}

    def wait_ready(self, timeout: float) -> None:
        """Wait until every peer has answered the handshake with the same export and is alive.
        HandshakeError if a peer holds another export or refused this node's key; PeerTimeout naming
        the peers still missing (and what went wrong connecting to them) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if self._closed:
                    raise PeerFailed(f"node {self.node}: the transport was closed")
                if self._fatal is not None:
                    raise self._fatal
                refused = [p for p in self._peers.values() if p.state == "refused"]
                if refused:
                    raise HandshakeError(f"node {refused[0].node} {refused[0].problem}")
                missing = [p for p in self._peers.values() if p.state != "ready"]
                if not missing:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    cls = PeerTimeout if all(p.state == "waiting" for p in missing) else PeerFailed
                    raise cls(self._missing_text(missing, timeout))
                self._cv.wait(min(remaining, 0.25))

    def require_ready(self, doing: str) -> None:
        """PeerFailed (HandshakeError for a refused peer) at once unless every peer is connected and alive."""
        with self._cv:
            if self._closed:
                raise PeerFailed(f"node {self.node} cannot {doing}: the transport was closed")
            if self._fatal is not None:
                raise self._fatal
            missing = [p for p in self._peers.values() if p.state != "ready"]
            if missing:
                cls = HandshakeError if any(p.state == "refused" for p in missing) else PeerFailed
                raise cls(f"node {self.node} cannot {doing}: " + "; ".join(
                    f"node {p.node} at {p.endpoint} {p.problem or 'has not answered the handshake'}" for p in missing)
                    + "; once it runs again (same command), it rejoins: wait_ready() waits for it")

    def _missing_text(self, missing: list[_Peer], timeout: float) -> str:
        parts = []
        for p in missing:
            if p.state == "waiting":
                parts.append(f"node {p.node} at {p.endpoint} never answered the handshake"
                             + (f" ({p.problem})" if p.problem else ""))
            else:
                parts.append(f"node {p.node} at {p.endpoint} {p.problem}")
        text = f"node {self.node} waited {timeout:g} s for its peers: " + "; ".join(parts)
        if self._denials:
            text += "; refused connections: " + "; ".join(self._denials[-3:])
        return text + ("; start every node with the same export, peers file and keys (or all with --insecure), "
                       "and check that the addresses are reachable")

    def begin(self, request: int) -> None:
        """Node 0: announce request `request` to every peer (before any of its messages)."""
        if self.node != 0:
            raise ValueError("only node 0 starts requests")
        with self._begin_lock:
            for k in self._peers:
                self._send(k, [BEGIN, self._meta(k, request=request)], strict=True)

    def next_request(self, *, stay: bool = False) -> int | None:
        """A worker's next request, in the order node 0 announced them; None when node 0 said goodbye.
        Unless `stay`, a lost or refused peer raises PeerFailed naming it (the node stops)."""
        with self._cv:
            while True:
                if self._begins:
                    return self._begins.popleft()
                if self._bye:
                    self._bye = False
                    return None
                if self._closed:
                    raise PeerFailed(f"node {self.node}: the transport was closed")
                if self._fatal is not None:
                    raise self._fatal
                if not stay:
                    gone = next((p for p in self._peers.values() if p.state in ("lost", "refused")), None)
                    if gone is not None:
                        cls = HandshakeError if gone.state == "refused" else PeerFailed
                        raise cls(f"node {self.node} stopped: node {gone.node} {gone.problem}")
                self._wait(0.25)

    def _wait(self, seconds: float) -> None:
        """(holding the lock) Wait up to `seconds` for arrivals: read the PULL socket in this thread if no other
        thread reads it, else sleep until the reader files something (see Threads in the module docstring)."""
        self._last_wait = time.monotonic()
        if self._closed or not self._reader.acquire(blocking=False):
            self._waiting += 1
            try:
                self._cv.wait(seconds)
            finally:
                self._waiting -= 1
            return
        self._cv.release()
        try:
            if self._pull.poll(max(1, int(seconds * 1000))):
                self._drain()
        finally:
            self._reader.release()
            self._cv.acquire()
            self._cv.notify_all()  # a thread sleeping in _wait may read now

    # ------------------------------------------------------------ the pump thread

    def _drain(self) -> None:
        """(holding the reader lock, not the lock) Take and file what has arrived on the PULL socket."""
        for _ in range(1000):  # at most this many, then the caller looks at the rest of its work
            try:
                frames = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._arrive(frames)

    def _pump_main(self) -> None:
        monitors, everything = zmq.Poller(), zmq.Poller()
        everything.register(self._pull, zmq.POLLIN)
        for m in self._monitors:
            monitors.register(m, zmq.POLLIN)
            everything.register(m, zmq.POLLIN)
        next_ping = 0.0
        try:
            while not self._stop.is_set():
                with self._cv:
                    reading = (self._waiting == 0 and time.monotonic() - self._last_wait > _READER_IDLE
                               and self._reader.acquire(blocking=False))
                if reading:
                    try:
                        events = dict(everything.poll(_POLL_MS))
                        if self._pull in events:
                            self._drain()
                    finally:
                        self._reader.release()
                    with self._cv:
                        self._cv.notify_all()  # a thread that came to wait meanwhile may read now
                else:
                    events = dict(monitors.poll(_SIDE_POLL_MS))
                for m, peer in self._monitors.items():
                    if m in events:
                        while m.poll(0):
                            self._monitor_event(peer, recv_monitor_message(m))
                now = time.monotonic()
                if now >= next_ping and not self._leaving:
                    next_ping = now + self.heartbeat
                    for k, p in self._peers.items():
                        if p.state in ("ready", "lost"):
                            self._send(k, [PING, self._meta(k)])
                self._check_liveness(now)
        except BaseException as exc:  # a bug here must not leave the node waiting forever
            log.exception("node %d: the network thread failed", self.node)
            with self._cv:
                self._fatal = PeerFailed(f"node {self.node}: its network thread failed ({type(exc).__name__}: "
                                         f"{exc})")
                self._cv.notify_all()

    def _check_liveness(self, now: float) -> None:
        with self._cv:
            for p in self._peers.values():
                if p.state != "ready":
                    continue
                if p.dropped_at is not None and now - p.dropped_at > self._grace:
                    self._lose(p, "was lost: its connection closed (the process ended, or the network dropped)")
                elif now - p.last_seen > self.timeout:
                    self._lose(p, f"was lost: silent for {self.timeout:g} s (no message or heartbeat)")

    def _lose(self, p: _Peer, problem: str, state: str = "lost") -> None:
        """(holding the lock) `p` is gone: fail every request open or announced here."""
        if p.state == state and p.problem == problem:
            return
        p.state, p.problem, p.dropped_at = state, problem, None
        (log.error if state == "refused" else log.warning)("node %d: node %d %s", self.node, p.node, problem)
        self._fail_open(PeerFailed(f"node {p.node} {problem}"))

    def _fail_open(self, err: DiscoError) -> None:
        """(holding the lock) Fail every request open or announced here with `err`."""
        for r in [*self._open, *self._begins]:
            self._failed.setdefault(r, err)
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
                if p.state == "waiting":
                    p.problem = None
                self._send(peer, self._hello())  # a new connection may be a new process of the peer
            elif kind == zmq.EVENT_DISCONNECTED:
                if p.state == "ready":
                    p.dropped_at = time.monotonic()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._lose(p, f"refused this node's key (ZAP status {value} at {where}): node {self.node}'s "
                              f"public key is not in node {peer}'s public_keys folder", state="refused")
            else:
                p.problem = (f"the CURVE handshake with it failed ({zmq.Event(kind).name}): it holds another key "
                             f"than public_keys/node{peer}.key, or runs without keys (--insecure)"
                             if self.keys else
                             f"the handshake with it failed ({zmq.Event(kind).name}): it runs with keys; "
                             f"give every node --keys, or every node --insecure")

    def _arrive(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        try:
            meta = json.loads(frames[1].bytes)
            sender, instance = int(meta["node"]), str(meta["instance"])
        except (IndexError, ValueError, KeyError, TypeError):
            log.warning("node %d: dropped a malformed frame (kind %r)", self.node, kind[:16])
            return
        if sender not in self._peers:
            log.warning("node %d: dropped a frame from node %d, %s", self.node, sender,
                        "which is this node's own index: two processes run it" if sender == self.node
                        else f"but the export has nodes 0..{self.nodes - 1}")
            return
        if self.keys is not None:
            owner = self._key_owner.get(frames[0].get("User-Id"))
            if owner != sender:
                log.warning("node %d: dropped a frame claiming to come from node %d but sent with %s", self.node,
                            sender, f"node {owner}'s key" if owner is not None else "an unknown key")
                return
        with self._cv:
            p = self._peers[sender]
            if kind == HELLO:
                self._on_hello(p, meta)
                return
            if instance != p.instance:
                return  # from an earlier process of the peer (or one whose handshake was refused)
            p.last_seen = time.monotonic()
            p.dropped_at = None
            if p.state == "lost":
                p.state, p.problem = "ready", None
                log.warning("node %d: node %d is back", self.node, sender)
            to = meta.get("to")
            if to != self.instance:
                if kind == PING:
                    self._send(sender, self._hello())  # it does not know this process yet
                if to is not None or kind in (MSG, BEGIN):
                    return  # meant for an earlier process of this node (queued while it was down)
            if kind == PING:
                pass
            elif kind == MSG:
                self._on_message(sender, meta, frames)
            elif kind == BEGIN:
                if sender == 0:
                    self._begins.append(int(meta["request"]))
            elif kind == ABORT:
                reason = str(meta.get("reason"))
                if meta.get("request") is None:
                    self._lose(p, f"stopped ({reason})")
                else:
                    r = int(meta["request"])
                    if r not in self._finished_set:
                        self._failed.setdefault(r, PeerFailed(f"node {sender} failed ({reason})"))
            elif kind == BYE:
                p.state, p.problem = "left", "left (said goodbye)"
                if sender == 0:
                    self._bye = True
            self._cv.notify_all()

    def _on_hello(self, p: _Peer, meta: dict) -> None:
        """(holding the lock) A peer's handshake."""
        theirs = (meta.get("proto"), meta.get("nodes"), meta.get("manifest"), meta.get("schedule"))
        ours = (PROTOCOL, self.nodes, self.manifest_hash, self.schedule_hash)
        if theirs != ours:
            problem = (f"holds another export: node {p.node} (at {p.endpoint}) has manifest sha256 {theirs[2]}, "
                       f"schedule {theirs[3]} ({theirs[1]} nodes, protocol {theirs[0]}); node {self.node} has "
                       f"manifest sha256 {ours[2]}, schedule {ours[3]} ({ours[1]} nodes, protocol {ours[0]}); "
                       f"give every node the same export directory")
            self._lose(p, problem, state="refused")
            return
        instance = str(meta["instance"])
        if instance != p.instance:
            if p.instance is not None:
                log.warning("node %d: node %d rejoined (a new process)", self.node, p.node)
                if p.state == "ready":  # restarted before we noticed: the requests running are gone with it
                    self._fail_open(PeerFailed(f"node {p.node} restarted (a new process) while requests were "
                                               f"running"))
                for key in [key for key in self._inbox if self._messages[key[1]].src == p.node]:
                    del self._inbox[key]
            p.instance = instance
            self._send(p.node, self._hello())
        p.state, p.problem, p.last_seen, p.dropped_at = "ready", None, time.monotonic(), None
        self._cv.notify_all()

    def _on_message(self, sender: int, meta: dict, frames: list[zmq.Frame]) -> None:
        """(holding the lock) A MSG frame: checked against the schedule, then filed by (request, id)."""
        try:
            request = int(meta["request"])
            message_id = str(meta["id"])
        except (KeyError, TypeError, ValueError):
            log.warning("node %d: dropped a message without request or id from node %d", self.node, sender)
            return
        if request in self._finished_set:
            return  # a late message of a request that ended (failed) here
        msg = self._messages.get(message_id)
        if msg is None or msg.dst != self.node:
            self._failed.setdefault(request, MessageError(
                f"message {message_id!r} from node {sender} (request {request}) arrived wrong: this node's schedule "
                f"has no such message for node {self.node}; the nodes hold different exports"))
            return
        try:
            shape = tuple(int(d) for d in meta["shape"])
            header = Header(str(meta["schedule"]), message_id, int(meta["src"]), str(meta["dtype"]), shape)
        except (KeyError, TypeError, ValueError):
            self._failed.setdefault(request, MessageError(
                f"message {message_id!r} ({msg.kind}, node {msg.src} -> node {msg.dst}) arrived wrong: its header "
                f"is incomplete: {meta}"))
            return
        payload = np.empty((0,), np.uint8)
        if len(frames) == 3:
            try:
                payload = np.frombuffer(frames[2].buffer, dtype=np.dtype(header.dtype)).reshape(shape)
            except (TypeError, ValueError):
                pass  # check_arrival names it: the payload does not match its header
        if header.src != sender:
            header = Header(header.schedule_hash, header.message_id, sender, header.dtype, header.shape)
        try:
            check_arrival(header, payload, msg, self.schedule_hash)
        except MessageError as exc:
            log.error("node %d: %s", self.node, exc)
            self._failed.setdefault(request, exc)
            return
        self._inbox.setdefault((request, message_id), deque()).append(payload)
