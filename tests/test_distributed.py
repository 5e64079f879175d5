"""The network runtime: nodes as OS processes over TCP on 127.0.0.1 (ZeroMQ, CURVE keys).

One small conv net is exported for N=2 and N=3 (and once more with other
weights, for the mismatch test), once per module. Multi-process runs must give
bit-identical outputs to run_local (same graphs, same onnxruntime, one thread
per node). Failure tests use a short timeout (3 s) and check that every node
stops within it, naming the peer.
"""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import zmq
from PIL import Image
from click.testing import CliRunner
from torch import nn

from disco_compile import Budget, MessageError, PeerFailed, run_local, transform
from disco_compile.runtime import images
from disco_compile.artifact.bundle import load_bundle
from disco_compile.backend.exporter import export
from disco_compile.cli.run import main as disco_run
from disco_compile.runtime.net.network import DiscoClient, free_ports, node_command
from disco_compile.runtime.stream import read_arrays, write_arrays
from disco_compile.runtime.net.keys import keygen, load_keys
from disco_compile.runtime.net.peers import NetworkConfigError, load_peers
from disco_compile.runtime.net.protocol import BEGIN, HELLO, MSG, PROTOCOL, HandshakeError, manifest_hash
from disco_compile.runtime.net.zmq_transport import ZmqTransport

TIMEOUT = 3.0  # the short failure timeout of these tests
CONNECT = 30.0  # start-up allowance: the processes import numpy, onnxruntime, zmq on 2 shared cores


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, nodes, seed in (("n2", 2, 0), ("n3", 3, 0), ("n2_other", 2, 1)):
        torch.manual_seed(100 + seed)
        dm = transform(small_net(seed), nodes, torch.randn(1, 3, 8, 8))
        dm.set_budget(Budget(0.5, allocation="uniform", align=1))
        export(dm, root / name)
        out[name] = root / name
    return out


def sample(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 8, 8)).astype(np.float32)


def write_peers(path: Path, nodes: int) -> Path:
    path.write_text("".join(f"{k}: 127.0.0.1:{port}\n" for k, port in enumerate(free_ports(nodes))))
    return path


class Node:
    """One node as an OS process (disco-run OUT --node K ...), its output in a log file."""

    def __init__(self, tmp: Path, out: Path, node: int, peers: Path, *, keys=None, extra=(), name=None,
                 timeout: float = TIMEOUT):
        self.log = tmp / f"{name or f'node{node}'}.log"
        cmd = node_command(out, node, peers, keys=keys, insecure=keys is None, timeout=timeout,
                           connect_timeout=CONNECT, extra=extra)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)

    def wait(self, limit: float) -> int:
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.log.stem} did not exit within {limit} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for n in started:
        n.stop()


# ---------------------------------------------------------------- bit-identical to run_local

@pytest.mark.parametrize("name, secure", [("n2", True), ("n3", False)])
def test_procs_bit_identical_to_run_local(exports, tmp_path, name, secure):
    """disco-run OUT --simulate --procs: every node its own process, over TCP (N=2 with fresh CURVE keys,
    N=3 --insecure): exactly the outputs of the in-process runtime."""
    x = sample(3)
    np.save(tmp_path / "x.npy", x)
    args = [str(exports[name]), "--simulate", "--procs", "--input", str(tmp_path / "x.npy"),
            "--output", str(tmp_path / "y.npy"), "--timeout", "10"]
    result = CliRunner().invoke(disco_run, args + ([] if secure else ["--insecure"]))
    assert result.exit_code == 0, result.output
    expected = run_local(exports[name], x)[0]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected, strict=True)


def test_client_pipelined_requests_over_keys(exports, tmp_path, nodes):
    """DiscoClient as node 0, workers as processes with CURVE keys: several requests in flight at once
    (different batch sizes), each answered with exactly its own run_local outputs; close() ends the workers."""
    keygen(tmp_path / "keys", 3)
    peers = write_peers(tmp_path / "peers.yaml", 3)
    nodes += [Node(tmp_path, exports["n3"], k, peers, keys=tmp_path / "keys") for k in (1, 2)]
    batches = [sample(b, seed) for seed, b in enumerate((1, 3, 2, 1, 2))]
    with DiscoClient(exports["n3"], peers, keys=tmp_path / "keys", timeout=10.0, connect_timeout=CONNECT,
                     max_in_flight=4) as client:
        futures = [client.submit(x) for x in batches]
        results = [f.result(timeout=60) for f in futures]
        again = client(batches[1])
    for x, got in zip(batches, results, strict=False):
        np.testing.assert_array_equal(got[0], run_local(exports["n3"], x)[0], strict=True)
    np.testing.assert_array_equal(again[0], results[1][0], strict=True)
    for n in nodes:
        assert n.wait(15) == 0, n.output()
        assert "served 6 request(s)" in n.output()


def test_folder_of_images_over_processes(exports, tmp_path):
    """--input FOLDER: the images in name order, prepared by images.prepare, run over TCP as one batch."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, photo in (("b.png", skimage.data.coffee()), ("a.png", skimage.data.astronaut())):
        Image.fromarray(photo).save(folder / name)
    result = CliRunner().invoke(disco_run, [str(exports["n2"]), "--simulate", "--procs", "--insecure", "--input",
                                            str(folder), "--output", str(tmp_path / "y.npy"), "--timeout", "10"])
    assert result.exit_code == 0, result.output
    assert "read 2 image(s) from" in result.stderr
    files, batch = images.read_folder(folder, (8, 8))
    assert [f.name for f in files] == ["a.png", "b.png"]
    expected = run_local(exports["n2"], batch)[0]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected, strict=True)
    # a (batch, classes) output: each image's top-1 class
    for name, row in zip(("a.png", "b.png"), expected, strict=False):
        assert f"{name}: top-1 class {int(row.argmax())} " in result.stdout


def test_stream_through_node0(exports, tmp_path, nodes):
    """disco-run --node 0 --input - --output -: requests read from stdin as they come, several in flight,
    each answered on stdout, in order, with exactly its run_local outputs."""
    peers = write_peers(tmp_path / "peers.yaml", 2)
    nodes.append(Node(tmp_path, exports["n2"], 1, peers))
    xs = [sample(b, seed) for seed, b in enumerate((1, 2, 1, 3, 1))]
    stdin = io.BytesIO()
    write_arrays(stdin, xs)
    cmd = node_command(exports["n2"], 0, peers, insecure=True, timeout=10.0, connect_timeout=CONNECT,
                       extra=["--input", "-", "--output", "-"])
    done = subprocess.run(cmd, input=stdin.getvalue(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"ran 5 request(s) from the stream" in done.stderr
    records = list(read_arrays(io.BytesIO(done.stdout)))
    assert len(records) == len(xs)
    for x, got in zip(xs, records, strict=False):
        np.testing.assert_array_equal(got, run_local(exports["n2"], x)[0], strict=True)
    assert nodes[0].wait(15) == 0, nodes[0].output()
    assert "served 5 request(s)" in nodes[0].output()


# ---------------------------------------------------------------- failures

@pytest.mark.parametrize("how, why", [(signal.SIGKILL, "its connection closed"),
                                      (signal.SIGSTOP, f"silent for {TIMEOUT:g} s")], ids=["killed", "silent"])
def test_dead_or_silent_peer_stops_every_node(exports, tmp_path, nodes, how, why):
    """Node 1 is killed (or frozen) while idle: node 2 exits non-zero naming node 1 within the timeout, and
    the client's next request fails naming node 1 instead of hanging or returning anything."""
    peers = write_peers(tmp_path / "peers.yaml", 3)
    nodes += [Node(tmp_path, exports["n3"], k, peers) for k in (1, 2)]
    x = sample(2)
    with DiscoClient(exports["n3"], peers, insecure=True, timeout=TIMEOUT, connect_timeout=CONNECT) as client:
        np.testing.assert_array_equal(client(x)[0], run_local(exports["n3"], x)[0], strict=True)
        nodes[0].proc.send_signal(how)
        stopped = time.monotonic()
        assert nodes[1].wait(TIMEOUT + 5) == 1, nodes[1].output()
        assert time.monotonic() - stopped < TIMEOUT + 2, "node 2 did not stop within the timeout"
        assert f"Error: node 2 stopped: node 1 was lost: {why}" in nodes[1].output(), nodes[1].output()
        assert nodes[1].output().count("node 1 was lost") == 1, nodes[1].output()  # printed once (issue 22)
        start = time.monotonic()
        # node 0 hears of node 1's loss from node 1's closed connection, or first from node 2's stop: both name it
        lost = f"(node 2 at \\S+ stopped \\(node 2 stopped: )?node 1 (at \\S+ )?was lost: {why}"
        with pytest.raises(PeerFailed, match=f"node 0 cannot start a request: {lost}") as failed:
            client(x)
        assert "wait_ready" not in str(failed.value) and not re.search(r"\d{12}", str(failed.value)), failed.value
        assert time.monotonic() - start < 1.0


def test_restarted_node_rejoins(exports, tmp_path, nodes):
    """Workers with --stay outlive a peer's death; the killed node started again with the same command
    rejoins (the others keep their sockets) and the next request is exact again."""
    peers = write_peers(tmp_path / "peers.yaml", 3)
    nodes += [Node(tmp_path, exports["n3"], k, peers, extra=["--stay"]) for k in (1, 2)]
    x = sample(2)
    expected = run_local(exports["n3"], x)[0]
    with DiscoClient(exports["n3"], peers, insecure=True, timeout=TIMEOUT, connect_timeout=CONNECT) as client:
        np.testing.assert_array_equal(client(x)[0], expected, strict=True)
        nodes[0].stop()
        time.sleep(TIMEOUT / 2)  # let the others notice
        with pytest.raises(PeerFailed, match=r"node 1 at \S+ was lost: its connection closed"):
            client(x)
        assert nodes[1].proc.poll() is None, nodes[1].output()
        assert "node 1 was lost" in nodes[1].output()
        nodes.append(Node(tmp_path, exports["n3"], 1, peers, extra=["--stay"], name="node1-again"))
        client.wait_ready(CONNECT)
        np.testing.assert_array_equal(client(x)[0], expected, strict=True)
    assert nodes[1].proc.poll() is None  # --stay outlives node 0's goodbye too
    for n in nodes[1:]:
        n.proc.send_signal(signal.SIGTERM)
        assert n.wait(10) == 143, n.output()


def test_mismatched_exports_are_refused_at_start(exports, tmp_path, nodes):
    """Two nodes with different exports (other weights): both refuse to run, naming the peer and both
    manifest hashes, at the handshake, before any request."""
    peers = write_peers(tmp_path / "peers.yaml", 2)
    nodes += [Node(tmp_path, exports["n2"], 0, peers, extra=["--input", tmp_path / "x.npy"]),
              Node(tmp_path, exports["n2_other"], 1, peers)]
    np.save(tmp_path / "x.npy", sample(1))
    ours, theirs = manifest_hash(load_bundle(exports["n2"])), manifest_hash(load_bundle(exports["n2_other"]))
    for n in nodes:
        assert n.wait(CONNECT) == 1, n.output()
    assert "Error: node 1 holds another export: node 1 (at tcp://127.0.0.1:" in nodes[0].output()
    assert f"has manifest sha256 {theirs}" in nodes[0].output() and f"node 0 has manifest sha256 {ours}" in \
        nodes[0].output()
    assert "Error: node 0 holds another export" in nodes[1].output()
    assert "Traceback" not in nodes[0].output() + nodes[1].output()


def test_keys_from_another_keygen_are_refused(exports, tmp_path, nodes):
    """Node 1 holds keys from another keygen: neither side completes the CURVE handshake, both stop as soon
    as it fails (not after the connect timeout) with an error naming the other node."""
    keygen(tmp_path / "keys", 2)
    keygen(tmp_path / "stranger", 2)
    np.save(tmp_path / "x.npy", sample(1))
    peers = write_peers(tmp_path / "peers.yaml", 2)
    nodes += [Node(tmp_path, exports["n2"], 0, peers, keys=tmp_path / "keys", extra=["--input", tmp_path / "x.npy"]),
              Node(tmp_path, exports["n2"], 1, peers, keys=tmp_path / "stranger")]
    for n in nodes:
        assert n.wait(CONNECT - 5) == 1, n.output()
    assert "Error: node 1 failed the CURVE handshake with node 0" in nodes[0].output()
    assert "Error: node 0 failed the CURVE handshake with node 1" in nodes[1].output()


def test_unknown_key_is_denied_and_logged(exports, tmp_path, caplog):
    """An impostor node 1 knows node 0's public key (public keys are public) but its own key is not in node
    0's public_keys: node 0's ZAP handler refuses it and logs the rejected key once; the impostor stops at
    once with an error naming node 0; node 0 never takes it as node 1."""
    keygen(tmp_path / "keys", 2)
    keygen(tmp_path / "other", 2)
    impostor = tmp_path / "impostor"
    shutil.copytree(tmp_path / "keys" / "public_keys", impostor / "public_keys")
    shutil.copy(tmp_path / "other" / "public_keys" / "node1.key", impostor / "public_keys" / "node1.key")
    shutil.copy(tmp_path / "other" / "node1.key_secret", impostor / "node1.key_secret")
    bundle = load_bundle(exports["n2"])
    peers = load_peers(write_peers(tmp_path / "peers.yaml", 2))
    caplog.set_level(logging.WARNING, logger="disco_compile.runtime")
    with ZmqTransport(bundle, 0, peers, keys=load_keys(tmp_path / "keys", 0, 2), timeout=TIMEOUT) as node0, \
            ZmqTransport(bundle, 1, peers, keys=load_keys(impostor, 1, 2), timeout=TIMEOUT) as node1:
        start = time.monotonic()
        with pytest.raises(HandshakeError, match=r"node 0 refused this node's key \(ZAP status 400 at "
                                                 r"tcp://127.0.0.1:\d+\): node 1's public key is not in node 0's "
                                                 r"public_keys folder"):
            node1.wait_ready(10)
        assert time.monotonic() - start < 5
        with pytest.raises(HandshakeError, match=r"node 1 failed the CURVE handshake with node 0 .*refused "
                                                 r"connections: node 0 refused a connection from 127.0.0.1: "
                                                 r"ZAP denied \(Unknown key\)"):
            node0.wait_ready(10)
        assert time.monotonic() - start < 5
        assert node0.peer_states()[1][0] == "refused"
    rejected = (impostor / "public_keys" / "node1.key").read_text().split('public-key = "')[1].split('"')[0]
    denials = [r.getMessage() for r in caplog.records if "ZAP denied" in r.getMessage()]
    assert len(denials) == 1 and f"its public key {rejected} is not in the public_keys folder" in denials[0]


def test_keys_or_insecure_required(exports, tmp_path):
    peers = write_peers(tmp_path / "peers.yaml", 2)
    result = CliRunner().invoke(disco_run, [str(exports["n2"]), "--node", "1", "--peers", str(peers)])
    assert result.exit_code == 2
    assert "give --keys DIR (made with 'disco-run keygen DIR --nodes N') or, to run without authentication " \
           "and encryption, --insecure" in result.output
    with pytest.raises(NetworkConfigError, match=r"without keys needs an explicit insecure=True \(--insecure\)"):
        DiscoClient(exports["n2"], peers)
    both = CliRunner().invoke(disco_run, [str(exports["n2"]), "--node", "1", "--peers", str(peers), "--insecure",
                                          "--keys", str(tmp_path)])
    assert both.exit_code == 2 and "give --keys DIR or --insecure, not both" in both.output


def test_keygen_cli(tmp_path):
    result = CliRunner().invoke(disco_run, ["keygen", str(tmp_path / "k"), "--nodes", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "k" / "public_keys").iterdir()) == ["node0.key", "node1.key",
                                                                                  "node2.key"]
    assert (tmp_path / "k" / "node2.key_secret").stat().st_mode & 0o077 == 0
    assert load_keys(tmp_path / "k", 2, 3).node == 2
    again = CliRunner().invoke(disco_run, ["keygen", str(tmp_path / "k"), "--nodes", "3"])
    assert again.exit_code == 2 and "already holds keys" in again.output


# ---------------------------------------------------------------- arrivals checked at the transport

def hello(bundle, node: int, instance: str = "feedfacefeedface") -> list[bytes]:
    return [HELLO, json.dumps({"proto": PROTOCOL, "node": node, "nodes": bundle.schedule.nodes,
                               "instance": instance, "manifest": manifest_hash(bundle),
                               "schedule": bundle.schedule_hash}).encode()]


def fake_msg(node1: ZmqTransport, msg, payload: np.ndarray, request: int, schedule: str | None = None):
    meta = {"node": 0, "instance": "feedfacefeedface", "to": node1.instance, "schedule": schedule or
            node1.schedule_hash, "id": msg.id, "src": 0, "dtype": payload.dtype.name,
            "shape": list(payload.shape), "request": request}
    return [MSG, json.dumps(meta).encode(), payload]


def test_hand_crafted_messages_are_checked(exports, tmp_path):
    """A fake node 0 (a raw PUSH socket) shakes hands with node 1, then sends message frames by hand: a wrong
    shape and a wrong schedule hash are refused naming the message; a right one arrives; then it goes silent
    and node 1 stops waiting within the timeout, naming it."""
    bundle = load_bundle(exports["n2"])
    peers = load_peers(write_peers(tmp_path / "peers.yaml", 2))
    msg = next(m for m in bundle.schedule.messages if m.src == 0 and m.dst == 1 and m.kind == "input")
    good = sample(2)
    with ZmqTransport(bundle, 1, peers, insecure=True, timeout=1.5) as node1:
        ctx = zmq.Context()
        try:
            fake = ctx.socket(zmq.PUSH)
            fake.linger = 0
            fake.connect(peers[1])
            fake.send_multipart(hello(bundle, 0))
            node1.wait_ready(10)
            for r in (1, 2, 3):  # node 0 announces a request before its messages
                fake.send_multipart([BEGIN, json.dumps({"node": 0, "instance": "feedfacefeedface",
                                                        "to": node1.instance, "request": r}).encode()])
            fake.send_multipart(fake_msg(node1, msg, np.ascontiguousarray(good[:, :2]), request=1))
            fake.send_multipart(fake_msg(node1, msg, good, request=2, schedule="f" * 64))
            fake.send_multipart(fake_msg(node1, msg, good, request=3))
            with node1.request(1), pytest.raises(MessageError, match=rf"message {msg.id!r} \(input, node 0 -> node "
                                                                     rf"1\) arrived wrong: shape \(2, 2, 8, 8\), the "
                                                                     rf"schedule says \(batch, 3, 8, 8\)"):
                node1.recv(msg, 5.0)
            with node1.request(2), pytest.raises(MessageError, match=rf"message {msg.id!r} .* sent under schedule "
                                                                     rf"ffffffffffff\.\.\., this node runs schedule"):
                node1.recv(msg, 5.0)
            with node1.request(3):
                got = node1.recv(msg, 5.0)
            np.testing.assert_array_equal(got, good, strict=True)
            start = time.monotonic()
            with node1.request(4), pytest.raises(PeerFailed, match=r"node 1 stopped waiting for message .* from "
                                                                   r"node 0: node 0 was lost: silent for 1.5 s"):
                node1.recv(msg, 10.0)
            assert time.monotonic() - start < 1.5 + 1.0
        finally:
            ctx.destroy(linger=0)


def test_peers_file_errors(tmp_path):
    bad = tmp_path / "peers.yaml"
    bad.write_text("0: 127.0.0.1:5000\n2: 127.0.0.1:5001\n")
    with pytest.raises(NetworkConfigError, match=r"has nodes \[0, 2\], but the export has nodes 0..1"):
        load_peers(bad, 2)
    with pytest.raises(NetworkConfigError, match="node 1: 'localhost' is not HOST:PORT"):
        load_peers({0: "127.0.0.1:5000", 1: "localhost"}, 2)
    assert load_peers({0: "127.0.0.1:5000", "1": "tcp://127.0.0.1:5001"}) == {0: "tcp://127.0.0.1:5000",
                                                                             1: "tcp://127.0.0.1:5001"}


def test_handshake_refusal_in_process(exports, tmp_path):
    """The same check as between processes, in one: wait_ready raises HandshakeError naming both hashes."""
    a, b = load_bundle(exports["n2"]), load_bundle(exports["n2_other"])
    peers = load_peers(write_peers(tmp_path / "peers.yaml", 2))
    with ZmqTransport(a, 0, peers, insecure=True) as t0, ZmqTransport(b, 1, peers, insecure=True) as t1:
        for t, other in ((t0, b), (t1, a)):
            with pytest.raises(HandshakeError, match=rf"has manifest sha256 {manifest_hash(other)}"):
                t.wait_ready(10)
