"""The network runtime against hostile or broken peers (issue 21, items 3, 8, 9, 14).

A fake node 0 (a raw ZeroMQ PUSH socket, with node 0's CURVE key where the test says so) or a raw TCP client
talks to a real node 1 (ZmqTransport) on 127.0.0.1: frames above the size limit are refused before and after
authentication, malformed frames are dropped with a named log line, messages for requests never announced
are not kept, a wrong key is refused at once. A stage that never returns (its session's run monkeypatched to
sleep) ends the run with a named error on every node.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from disco_compile import Budget, NodeFailure, PeerTimeout, transform
from disco_compile.artifact.bundle import load_bundle
from disco_compile.backend.exporter import export
from disco_compile.cli.run import main as disco_run
from disco_compile.runtime.executor import NodeExecutor, run_local
from disco_compile.runtime.net.keys import keygen, load_keys
from disco_compile.runtime.net.network import free_ports, node_command
from disco_compile.runtime.net.peers import load_peers
from disco_compile.runtime.net.protocol import ABORT, BEGIN, BYE, HELLO, MSG, PING, PROTOCOL, HandshakeError
from disco_compile.runtime.net.zmq_transport import ZmqTransport

INSTANCE = "feedfacefeedface"  # the fake node 0's process


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    dm = transform(model, 2, torch.randn(1, 3, 8, 8))
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    root = tmp_path_factory.mktemp("reliability") / "n2"
    export(dm, root)
    return root


def sample(batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 8, 8)).astype(np.float32)


def peers_of(tmp: Path) -> dict[int, str]:
    path = tmp / "peers.yaml"
    path.write_text("".join(f"{k}: 127.0.0.1:{port}\n" for k, port in enumerate(free_ports(2))))
    return load_peers(path)


class FakeNode0:
    """A raw PUSH socket to node 1 that speaks the protocol by hand, as node 0 (with its keys, if given)."""

    def __init__(self, node1: ZmqTransport, endpoint: str, keys=None):
        self.node1 = node1
        self.instance = INSTANCE
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.linger = 0
        if keys is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey = keys.public, keys.secret
            self.sock.curve_serverkey = keys.peers[1]
        self.sock.connect(endpoint)

    def hello(self, instance: str = INSTANCE) -> None:
        """The handshake of node 0's process `instance` (a new one makes node 1 forget the old one's state)."""
        self.instance = instance
        bundle = self.node1
        self.sock.send_multipart([HELLO, json.dumps({"proto": PROTOCOL, "node": 0, "nodes": 2, "instance": instance,
                                                     "manifest": bundle.manifest_hash,
                                                     "schedule": bundle.schedule_hash}).encode()])

    def send(self, kind: bytes, *payload, **fields) -> None:
        meta = {"node": 0, "instance": self.instance, "to": self.node1.instance, **fields}
        self.sock.send_multipart([kind, json.dumps(meta).encode(), *payload])

    def message(self, msg, data: np.ndarray, request: int) -> None:
        self.send(MSG, data, schedule=self.node1.schedule_hash, id=msg.id, src=0, dtype=data.dtype.name,
                  shape=list(data.shape), request=request)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def node1(out, tmp_path):
    """(node 1 with CURVE keys, a fake node 0 holding node 0's valid key, the input message node 1 receives)."""
    keygen(tmp_path / "keys", 2)
    peers = peers_of(tmp_path)
    bundle = load_bundle(out)
    with ZmqTransport(bundle, 1, peers, keys=load_keys(tmp_path / "keys", 1, 2), timeout=5.0) as t:
        fake = FakeNode0(t, peers[1], keys=load_keys(tmp_path / "keys", 0, 2))
        try:
            fake.hello()
            t.wait_ready(10)
            msg = next(m for m in bundle.schedule.messages if m.dst == 1 and m.kind == "input")
            yield t, fake, msg
        finally:
            fake.close()


def serves(t: ZmqTransport, fake: FakeNode0, msg, request: int) -> None:
    """Node 1 still takes a request and its message from node 0 (the transport did not fail)."""
    fake.send(BEGIN, request=request)
    while t.next_request() != request:  # requests announced before (or a goodbye) are passed over
        pass
    fake.message(msg, sample(1), request)
    with t.request(request):
        np.testing.assert_array_equal(t.recv(msg, 5.0), sample(1), strict=True)


# ---------------------------------------------------------------- item 3: the size limit on every socket

def test_frame_above_the_limit_is_refused_after_authentication(node1):
    """A frame of limits.frame + 1 bytes from the keyed node 0 never arrives (ZeroMQ drops its connection);
    the node reconnects and keeps serving."""
    t, fake, msg = node1
    fake.send(BEGIN, request=1)
    assert t.next_request() == 1
    big = np.zeros(t.limits.frame + 1, np.uint8)
    fake.send(MSG, big, schedule=t.schedule_hash, id=msg.id, src=0, dtype="uint8", shape=[big.size], request=1)
    with t.request(1), pytest.raises(PeerTimeout):
        t.recv(msg, 1.0)
    serves(t, fake, msg, 2)


def test_frame_announced_above_the_limit_is_refused_before_authentication(node1):
    """A client with no key that speaks ZMTP with the CURVE mechanism and announces a 100 MB frame is
    disconnected at the frame's header: the connection closes after 1 MB sent, the node keeps serving."""
    t, fake, msg = node1
    host, port = t.endpoint.removeprefix("tcp://").rsplit(":", 1)
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + bytes(32)
    with socket.create_connection((host, int(port)), timeout=3) as raw:
        raw.sendall(greeting + b"\x06" + struct.pack(">Q", 100_000_000))
        sent, closed = 0, False
        try:
            while sent < 1_000_000:
                sent += raw.send(bytes(64 * 1024))
            while raw.recv(65536):
                pass
            closed = True
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            pass
    assert closed, f"node 1 kept the connection open after {sent} bytes of a 100 MB frame"
    serves(t, fake, msg, 1)


def test_batch_above_one_part_travels_in_parts(node1):
    """A payload larger than limits.part (a big batch) goes as several frames, each under the limit, and
    arrives whole."""
    t, fake, msg = node1
    batch = t.limits.part // msg.bytes + 2
    data = sample(batch)
    fake.send(BEGIN, request=1)
    assert t.next_request() == 1
    parts = t.limits.parts(data)
    assert len(parts) >= 2 and max(p.nbytes for p in parts) <= t.limits.part
    fake.send(MSG, *parts, schedule=t.schedule_hash, id=msg.id, src=0, dtype="float32", shape=list(data.shape),
              request=1)
    with t.request(1):
        np.testing.assert_array_equal(t.recv(msg, 5.0), data, strict=True)


# ---------------------------------------------------------------- item 8: fields validated, state bounded

MALFORMED = [
    ([BEGIN], {}, "a BEGIN without field 'request' (an integer 0..2**63-1)"),
    ([ABORT], {"request": "x", "reason": "r"}, "a ABORT whose field 'request' is 'x', it must be null"),
    ([BEGIN], {"request": -1}, "a BEGIN whose field 'request' is -1"),
    ([BEGIN], {"request": True}, "a BEGIN whose field 'request' is True"),
    ([MSG, b"\0" * 4], {"request": 1, "id": "m", "schedule": "s", "src": 0, "dtype": "float32", "shape": "12"},
     "a MSG whose field 'shape' is '12', it must be a list of at most 32 integers"),
    ([MSG], {"request": 1, "id": "m", "schedule": "s", "src": 0, "dtype": "float32", "shape": [1]},
     "a MSG of 2 frame(s), it has at least 3 frames"),
    ([b"NOPE"], {}, "a frame sequence of unknown kind b'NOPE'"),
    ([PING, b"extra"], {}, "a PING of 3 frame(s), it has 2 frames"),
]


def test_malformed_frames_from_a_keyed_peer_are_dropped_and_named(node1, caplog):
    """Frames with the valid key of node 0 but wrong fields are dropped, each with a log line naming the kind,
    the field and what it must hold; the node does not fail and serves the next request."""
    t, fake, msg = node1
    caplog.set_level(logging.WARNING, logger="disco_compile.runtime")
    for frames, fields, _ in MALFORMED:
        fake.send(frames[0], *frames[1:], **fields)
    fake.sock.send_multipart([BEGIN, b"{not json"])
    serves(t, fake, msg, 7)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for _, _, text in MALFORMED:
        assert text in logged
    assert "a BEGIN whose second frame is not a JSON object, sent with node 0's key" in logged
    assert "network thread failed" not in logged


def test_messages_for_requests_never_announced_are_not_kept(node1, caplog):
    """Valid messages from node 0 for 300 requests it never announced are dropped (logged a few times, then
    counted), not held; a second copy of a message is dropped too."""
    t, fake, msg = node1
    caplog.set_level(logging.WARNING, logger="disco_compile.runtime")
    for r in range(100, 400):
        fake.message(msg, sample(1), r)
    fake.send(BEGIN, request=5)
    assert t.next_request() == 5
    fake.message(msg, sample(1), 5)
    fake.message(msg, sample(1), 5)
    fake.send(BEGIN, request=6)  # arrives after both copies
    assert t.next_request() == 6
    assert t._requests.held() == 1
    logged = [r.getMessage() for r in caplog.records]
    never = [m for m in logged if "request" in m and "was never announced" in m]
    assert 1 <= len(never) <= 6, never
    assert any(f"message {msg.id!r} of request 5 arrived twice" in m for m in logged)


# ---------------------------------------------------------------- hypothesis over frames

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_KEYS = st.sampled_from(["node", "instance", "to", "request", "id", "schedule", "src", "dtype", "shape", "reason",
                         "proto", "nodes", "manifest"])


@st.composite
def frame_sequences(draw, to: str):
    kind = draw(st.sampled_from([HELLO, PING, BEGIN, MSG, ABORT, BYE, b"", b"X" * 20]))
    meta = {"node": 0, "instance": INSTANCE, "to": to}
    meta |= draw(st.dictionaries(_KEYS, _JSON | st.integers(0, 3), max_size=6))
    second = draw(st.sampled_from([json.dumps(meta).encode(), b"\xff\xfe", b"[1, 2]", b"9" * 30]))
    extra = draw(st.lists(st.binary(max_size=64), max_size=3))
    return [kind, second, *extra]


def test_fuzzed_frames_are_dropped_or_taken_never_a_crash(node1, caplog):
    """Hypothesis (bounded to ~20 s): any frame sequence from the keyed node 0 is dropped with a named log line
    or taken as what it says; the node never fails, and afterwards serves a request exactly."""
    t, fake, msg = node1
    caplog.set_level(logging.WARNING, logger="disco_compile.runtime")

    examples = int(os.environ.get("DISCO_FRAME_EXAMPLES", "400"))  # the long run: docs/reliability.md

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frame_sequences(t.instance))
    def check(frames):
        fake.sock.send_multipart(frames)

    start = time.monotonic()
    check()
    assert time.monotonic() - start < 30 * max(1, examples / 400)
    fake.hello("0123456789abcdef")  # a new process of node 0: whatever state the frames left, it starts clean
    deadline = time.monotonic() + 5
    while t.peer_states()[0][0] != "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    serves(t, fake, msg, 2 ** 62)
    assert t._fatal is None
    bad = [r.getMessage() for r in caplog.records if "network thread failed" in r.getMessage()
           or r.exc_info is not None]
    assert not bad, bad


# ---------------------------------------------------------------- item 14: a wrong key is refused at once

def test_wrong_key_is_reported_when_the_handshake_fails(out, tmp_path):
    """Node 1 holds keys of another keygen: both nodes raise HandshakeError within 4 s, not at the 20 s connect
    timeout, naming the other node and its key."""
    keygen(tmp_path / "keys", 2)
    keygen(tmp_path / "stranger", 2)
    peers = peers_of(tmp_path)
    bundle = load_bundle(out)
    with ZmqTransport(bundle, 0, peers, keys=load_keys(tmp_path / "keys", 0, 2)) as t0, \
            ZmqTransport(bundle, 1, peers, keys=load_keys(tmp_path / "stranger", 1, 2)) as t1:
        start = time.monotonic()
        for t, other in ((t0, 1), (t1, 0)):
            with pytest.raises(HandshakeError, match=rf"node {other} failed the CURVE handshake with node {t.node} "
                                                     rf"\(HANDSHAKE_FAILED_\w+ at tcp://127.0.0.1:\d+\): it holds "
                                                     rf"another key than public_keys/node{other}.key"):
                t.wait_ready(20)
        assert time.monotonic() - start < 4  # both: the refusal stays 1.5 s, so that the peer sees it too


# ---------------------------------------------------------------- item 9: a stage that never returns

def hang(monkeypatch, node: int, stage: int) -> None:
    """Make node `node`'s stage `stage` never return (its session's run sleeps an hour)."""
    made = NodeExecutor._session

    class Sleeping:
        def __init__(self, session):
            self.session = session

        def run(self, *args):
            time.sleep(3600)

    def session(self, st_, options):
        s = made(self, st_, options)
        return Sleeping(s) if (self.node, st_.index) == (node, stage) else s
    monkeypatch.setattr(NodeExecutor, "_session", session)


def within(seconds: float, fn):
    """fn()'s result or exception, failing the test if it has not returned after `seconds` (it hangs)."""
    box = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("node", [0, 1])
def test_stage_that_never_returns_ends_a_local_run(out, monkeypatch, node):
    """Node 0's last stage (nothing waits for it) or node 1's first stage sleeps: run_local raises NodeFailure
    naming the stage and the timeout within timeout + a few seconds."""
    stages = load_bundle(out).schedule.programs
    hang(monkeypatch, node, len(stages[0]) - 1 if node == 0 else 0)
    with pytest.raises(NodeFailure, match=rf"node {node} failed: node {node} stage \d+ \(node{node}/\S+\): the stage "
                                          rf"did not return within 1 s \(the timeout\), so it was stopped"):
        within(10, lambda: run_local(out, sample(1), timeout=1.0))


def test_stage_that_never_returns_simulate_cli_exits_1(out, monkeypatch, tmp_path):
    """`disco-run --simulate --timeout 1` with node 0's last stage asleep: exit status 1, the error named."""
    hang(monkeypatch, 0, len(load_bundle(out).schedule.programs[0]) - 1)
    np.save(tmp_path / "x.npy", sample(1))
    result = within(15, lambda: CliRunner().invoke(disco_run, [str(out), "--simulate", "--timeout", "1",
                                                               "--input", str(tmp_path / "x.npy")]))
    assert result.exit_code == 1, result.output
    assert "did not return within 1 s (the timeout)" in result.output


_HANGING_NODE = """
import sys, time
from disco_compile.runtime.executor import NodeExecutor
made = NodeExecutor._session
class Sleeping:
    def run(self, *args):
        time.sleep(3600)
NodeExecutor._session = lambda self, s, o: Sleeping() if s.index == 0 else made(self, s, o)
from disco_compile.cli.run import main
sys.argv = ["disco-run", *sys.argv[1:]]
main()
"""


def test_stage_that_never_returns_over_the_network(out, tmp_path):
    """Node 1 (a process) has a first stage that sleeps: node 1 and node 0 both exit with status 1 and a named
    error within the timeout and a few seconds, no traceback and no abort (status 134)."""
    peers = tmp_path / "peers.yaml"
    peers.write_text("".join(f"{k}: 127.0.0.1:{port}\n" for k, port in enumerate(free_ports(2))))
    np.save(tmp_path / "x.npy", sample(1))
    procs = []
    for k in (1, 0):
        cmd = node_command(out, k, peers, insecure=True, timeout=2.0, connect_timeout=30.0,
                           extra=["--input", tmp_path / "x.npy"] if k == 0 else [])
        if k == 1:
            cmd = [sys.executable, "-c", _HANGING_NODE, *cmd[3:]]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outputs = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        outputs.append((p.returncode, text.decode(errors="replace")))
    (rc1, out1), (rc0, out0) = outputs
    assert rc1 == 1 and "Error: node 1 stage 0 (node1/" in out1 and "did not return within 2 s" in out1, out1
    assert rc0 == 1 and "Error: " in out0, out0
    assert "Traceback" not in out0 + out1
