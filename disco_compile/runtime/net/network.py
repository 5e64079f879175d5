"""Running an export over the network: `serve` for nodes 1..N-1, `DiscoClient` for node 0, and
`run_processes` (`disco-run OUT --simulate --procs`) starting every node as an OS process on loopback.

Node 0 drives: each request (one call of the model) gets a fresh id, node 0
announces it to every peer (ZmqTransport.begin) and runs its own stages; the
workers run theirs for each announced request, in announcement order. Several
requests may be in flight at once (DiscoClient.submit); their messages carry
the request id, so they cannot mix. Node 0 returns a request's outputs only
when every stage of it has run: a failure anywhere raises instead, never a
partial result.

Failures. A worker started without `stay` stops (non-zero exit in disco-run)
as soon as a peer is lost, a request fails, or a handshake is refused, naming
the peer; it exits cleanly when node 0 says goodbye (DiscoClient.close). With
`stay` it logs the failure, drops the requests that were running, keeps its
sockets and serves the next requests once every peer is back, and outlives
node 0's goodbye (serving the next client). DiscoClient keeps its sockets
after a failure too: requests fail (PeerFailed naming the peer) until every
peer is back; `DiscoClient.wait_ready` waits for that.

Rejoining. Start the failed node again with the same command (same address,
export and keys); it sends its handshake to every peer, which answer and take
it back. Requests running when it failed have failed; the next ones run.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...artifact.bundle import Bundle, load_bundle
from ...errors import DiscoError, PeerFailed
from ..executor import DEFAULT_TIMEOUT, NodeExecutor, check_inputs
from . import log
from .keys import keygen, load_keys
from .peers import NetworkConfigError
from .zmq_transport import DEFAULT_CONNECT_TIMEOUT, ZmqTransport


def _bundle(out_dir) -> Bundle:
    return out_dir if isinstance(out_dir, Bundle) else load_bundle(out_dir)


def _keys(keys, node: int, nodes: int):
    if keys is None or hasattr(keys, "secret"):
        return keys
    return load_keys(keys, node, nodes)


def serve(out_dir, node: int, peers, *, keys=None, insecure: bool = False, timeout: float = DEFAULT_TIMEOUT,
          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, threads: int = 1, stay: bool = False,
          bind: str | None = None, ready=None, inputs=None) -> int:
    """Run worker node `node` (1..N-1) of the export in `out_dir` until node 0 says goodbye; the number of
    requests served. `keys`: a keys directory (disco-run keygen) or NodeKeys; without, `insecure=True`.
    Without `stay`, any failure raises (PeerFailed, MessageError, HandshakeError ...) after telling the peers.
    `ready()` is called once every peer has answered the handshake. `inputs(i)`: this node's own model inputs
    for the i-th request it serves (0, 1, ...), for an export with the inputs on all nodes (and only then)."""
    bundle = _bundle(out_dir)
    if node == 0:
        raise NetworkConfigError("node 0 drives the requests: run it with DiscoClient (or disco-run --node 0 "
                                 "--input ...), not serve()")
    if (inputs is not None) != bundle.schedule.inputs_on_all_nodes:
        raise NetworkConfigError(
            f"node {node} takes its own model inputs (the export has them on every node): give them "
            f"(disco-run OUT --node {node} --input FILE)" if inputs is None else
            f"node {node} gets the model inputs from node 0 (the export was not compiled with the input on all "
            f"nodes): give it none")
    transport = ZmqTransport(bundle, node, peers, keys=_keys(keys, node, bundle.schedule.nodes), insecure=insecure,
                             timeout=timeout, bind=bind, log_losses=stay)  # without stay, the error says it
    served = 0
    try:
        executor = NodeExecutor(bundle, node, transport, threads=threads, timeout=timeout)
        transport.wait_ready(connect_timeout)
        log.info("node %d: every peer answered; serving", node)
        if ready is not None:
            ready()
        while True:
            request = transport.next_request(stay=stay)
            if request is None:
                if stay:
                    log.info("node %d: node 0 said goodbye; waiting for the next client", node)
                    continue
                log.info("node %d: node 0 said goodbye after %d request(s)", node, served)
                break
            try:
                with transport.request(request):
                    try:
                        # every peer must know this node's current process (and it theirs) before messages flow:
                        # after a rejoin, node 0 may announce a request before this node has the new handshake
                        if stay:
                            transport.wait_ready(timeout)
                        else:
                            transport.require_ready("run a request")
                        executor.run(None if inputs is None else inputs(served))
                    except PeerFailed as exc:
                        transport.abort(str(exc))  # the others may not know yet: fail the request there too
                        raise
                served += 1
            except DiscoError as exc:
                if not stay:
                    raise
                log.error("node %d: request %d failed: %s", node, request, exc)
        transport.goodbye()
        return served
    except BaseException as exc:
        transport.abort_node(str(exc) if isinstance(exc, DiscoError) else f"{type(exc).__name__}: {exc}")
        raise
    finally:
        transport.close()


class DiscoClient:
    """Node 0 of a distributed run, for applications: call it with the model inputs, get the outputs.

        with DiscoClient("out/", "peers.yaml", keys="keys/") as model:
            y, = model(x)                                   # one request
            futures = [model.submit(x) for x in batches]    # several in flight
            ys = [f.result() for f in futures]

    `peers`: a peers.yaml or a mapping node -> "host:port"; `keys`: a keys directory (disco-run keygen) or
    NodeKeys, or `insecure=True`. The constructor waits up to `connect_timeout` s for every peer's handshake.
    `timeout`: seconds of silence after which a peer is lost, and the longest wait for one message (with
    several requests in flight, the workers run them one after another: allow for that). `max_in_flight`:
    requests run at once. A failed request raises (PeerFailed naming the peer, MessageError naming the
    message ...); the client keeps its sockets. While a peer is lost, new requests fail at once naming it;
    once it runs again it rejoins, and `wait_ready` waits for that.
    """

    def __init__(self, out_dir, peers, node: int = 0, *, keys=None, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 threads: int = 1, max_in_flight: int = 4, bind: str | None = None):
        if node != 0:
            raise NetworkConfigError(f"DiscoClient runs node 0 (it holds the model inputs and outputs); run node "
                                     f"{node} with disco-run OUT --node {node} --peers ...")
        if max_in_flight < 1:
            raise NetworkConfigError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.bundle = _bundle(out_dir)
        self.timeout = timeout
        self._transport = ZmqTransport(self.bundle, 0, peers, keys=_keys(keys, 0, self.bundle.schedule.nodes),
                                       insecure=insecure, timeout=timeout, bind=bind)
        self._pool = None
        self.max_in_flight = max_in_flight
        try:
            self._executor = NodeExecutor(self.bundle, 0, self._transport, threads=threads, timeout=timeout)
            self._transport.wait_ready(connect_timeout)
        except BaseException as exc:
            self._transport.abort_node(f"{type(exc).__name__}: {exc}")
            self._transport.close()
            raise
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="disco-client")
        self._lock = threading.Lock()
        self._next = time.time_ns()  # request ids: increasing, and not reused by a restarted client
        self._closed = False

    @property
    def transport(self) -> ZmqTransport:
        return self._transport

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every peer is connected and agrees on the export (PeerTimeout naming the missing ones)."""
        self._transport.wait_ready(self.timeout if timeout is None else timeout)

    def submit(self, inputs) -> Future:
        """Start one request; a Future of its outputs (list, in `schedule.outputs` order). The inputs are
        checked here (InputMismatch), before anything is sent."""
        if self._closed:
            raise PeerFailed("this DiscoClient is closed")
        model_inputs = check_inputs(self.bundle.schedule, inputs)
        with self._lock:
            self._next += 1
            request = self._next
        return self._pool.submit(self._run, request, model_inputs)

    def __call__(self, inputs) -> list[np.ndarray]:
        """Run one request and return the model outputs, in `schedule.outputs` order."""
        return self.submit(inputs).result()

    def map(self, batches) -> list[list[np.ndarray]]:
        """Every batch of `batches` as its own request, all in flight together (up to max_in_flight)."""
        futures = [self.submit(b) for b in batches]
        return [f.result() for f in futures]

    def _run(self, request: int, model_inputs) -> list[np.ndarray]:
        transport = self._transport
        transport.require_ready("start a request")
        with transport.request(request):
            transport.begin(request)
            outputs = self._executor.run(model_inputs)
        return [outputs[t.name] for t in self.bundle.schedule.outputs]

    def close(self, reason: str | None = None) -> None:
        """Wait for the requests in flight, tell the workers the session is over (with `reason`: that node 0
        stopped because of it, so workers started without `stay` exit with an error), close the sockets."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if reason is None:
                self._transport.goodbye()
            else:
                self._transport.abort_node(reason)
        finally:
            self._transport.close()

    def __enter__(self) -> DiscoClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(None if exc is None else f"{exc_type.__name__}: {exc}")


# ---------------------------------------------------------------- all nodes as processes on this machine

def free_ports(n: int) -> list[int]:
    """`n` TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_command(out_dir, node: int, peers_file, *, keys=None, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 threads: int = 1, extra=()) -> list[str]:
    """The command line that runs node `node` with this Python (`python -m disco_compile.cli.run ...`)."""
    cmd = [sys.executable, "-m", "disco_compile.cli.run", str(out_dir), "--node", str(node), "--peers",
           str(peers_file), "--timeout", repr(timeout), "--connect-timeout", repr(connect_timeout),
           "--threads", str(threads)]
    cmd += ["--insecure"] if insecure else ["--keys", str(keys)]
    return cmd + [str(a) for a in extra]


def run_processes(out_dir, input_files, *, insecure: bool = False, timeout: float = DEFAULT_TIMEOUT,
                  connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, threads: int = 1) -> dict[str, np.ndarray]:
    """Run the export in `out_dir` with every node in its own OS process on 127.0.0.1 (ports chosen free),
    over TCP, with fresh CURVE keys unless `insecure`. `input_files`: .npy files, one per model input. The
    model outputs by name. If a node fails, the others stop and PeerFailed carries the nodes' errors."""
    bundle = _bundle(out_dir)
    n = bundle.schedule.nodes
    work = Path(tempfile.mkdtemp(prefix="disco-procs-"))
    os.chmod(work, 0o700)
    procs: dict[int, subprocess.Popen] = {}
    try:
        ports = free_ports(n)
        peers = work / "peers.yaml"
        peers.write_text("".join(f"{k}: 127.0.0.1:{p}\n" for k, p in enumerate(ports)))
        keys = None
        if not insecure:
            keys = work / "keys"
            keygen(keys, n)
        result = work / "outputs.npz"
        given = [a for f in input_files for a in ("--input", Path(f).resolve())]
        for k in [*range(1, n), 0]:
            extra = given if bundle.schedule.inputs_on_all_nodes else []  # each node its own (here the same)
            if k == 0:
                extra = given + ["--output", result]
            log_file = open(work / f"node{k}.log", "wb")
            procs[k] = subprocess.Popen(node_command(bundle.root, k, peers, keys=keys, insecure=insecure,
                                                     timeout=timeout, connect_timeout=connect_timeout,
                                                     threads=threads, extra=extra),
                                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
            log_file.close()
        failed = _wait_all(procs, connect_timeout + timeout + 60.0, timeout + 5.0)
        if failed:
            texts = []
            for k in failed:
                lines = (work / f"node{k}.log").read_text(errors="replace").strip().splitlines()
                error = next((line for line in reversed(lines) if line.startswith("Error:")), None)
                texts.append(f"node {k} (exit {procs[k].returncode}): "
                             + (error[len("Error: "):] if error else "\n    ".join(lines[-5:]) or "(no output)"))
            raise PeerFailed("the nodes failed:\n  " + "\n  ".join(texts))
        with np.load(result) as saved:
            return {t.name: saved[t.name] for t in bundle.schedule.outputs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _wait_all(procs: dict[int, subprocess.Popen], limit: float, after_failure: float) -> list[int]:
    """Wait for every process; after the first failure, give the others `after_failure` s to stop by
    themselves, then kill them. The failed nodes, first failure first."""
    deadline = time.monotonic() + limit
    failed: list[int] = []
    while any(p.poll() is None for p in procs.values()):
        for k, p in procs.items():
            if p.returncode not in (None, 0) and k not in failed:
                failed.append(k)
        if failed:
            deadline = min(deadline, time.monotonic() + after_failure)
        if time.monotonic() > deadline:
            for k, p in procs.items():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(2.0)
                    except subprocess.TimeoutExpired:
                        p.kill()
                    failed.append(k)
            break
        time.sleep(0.02)
    failed += [k for k, p in procs.items() if p.returncode not in (None, 0) and k not in failed]
    return failed
