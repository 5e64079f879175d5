"""A node's memory while a client floods it (issue 21, items 3 and 8).

Node 1 of a small 2-node export runs as its own process (`disco-run OUT --node 1 --keys ... --stay`, waiting for
node 0); its resident memory (VmRSS of /proc/PID/status) is sampled every 20 ms through each flood, and its growth
at the peak and after is printed.

1. Without a key: `--connections` raw TCP clients each speak ZMTP 3 with the CURVE mechanism (what a CURVE
   client sends first), announce one frame of `--size-mb` MB and stream that many bytes into it; printed also:
   how many bytes each got into its socket before the node closed it, and the node's frame limit.
2. With node 0's key: a fake node 0 (raw ZeroMQ sockets with node 0's keys) shakes hands with node 1, then
   sends `--messages` valid input messages of at most 64 KiB each (one frame), every one for a request it
   never announced.

    python benchmarks/reliability_net.py                        # 4 connections x 400 MB, the shipped code
    python benchmarks/reliability_net.py --code /tmp/old/       # the node run from another checkout's package
"""
from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + bytes(32)  # ZMTP 3.0
CHUNK = 1 << 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_export(root: Path) -> Path:
    """A 2-node export of a small conv net (its largest message: 768 bytes per sample)."""
    import torch
    from torch import nn

    from disco_compile import Budget, transform
    from disco_compile.backend.exporter import export
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    dm = transform(model, 2, torch.randn(1, 3, 8, 8))
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    export(dm, root / "out")
    return root / "out"


def flood(port: int, size: int, sent: list[int], k: int) -> None:
    """One client with no key: greeting, a frame header announcing `size` bytes, then up to `size` bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(GREETING + b"\x06" + struct.pack(">Q", size))
        block = bytes(CHUNK)
        try:
            while sent[k] < size:
                sent[k] += s.send(block[:min(CHUNK, size - sent[k])])
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass


def wait_listening(port: int, proc: subprocess.Popen, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the node did not listen on port {port} within {limit} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=400, help="MB each client announces and streams")
    parser.add_argument("--messages", type=int, default=10_000, help="messages for requests never announced")
    parser.add_argument("--out", type=Path, help="a 2-node export to run (default: a small conv net, exported here)")
    parser.add_argument("--code", type=Path, help="run the node from this folder (a checkout holding another "
                                                  "disco_compile/: python -m puts the working folder first)")
    args = parser.parse_args()

    from disco_compile.runtime.net.keys import keygen
    from disco_compile.runtime.net.network import free_ports, node_command
    work = Path(tempfile.mkdtemp(prefix="reliability-net-"))
    out = args.out or make_export(work)
    keygen(work / "keys", 2)
    ports = free_ports(2)
    peers = work / "peers.yaml"
    peers.write_text("".join(f"{k}: 127.0.0.1:{p}\n" for k, p in enumerate(ports)))
    cmd = node_command(out, 1, peers, keys=work / "keys", connect_timeout=600.0, extra=["--stay"])
    node = subprocess.Popen(cmd, cwd=args.code, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    size = args.size_mb * 1_000_000
    sent = [0] * args.connections
    try:
        wait_listening(ports[1], node, 60)
        time.sleep(1.0)
        clients = [threading.Thread(target=flood, args=(ports[1], size, sent, k)) for k in range(args.connections)]
        keyless = watch(node.pid, clients)
        fake = threading.Thread(target=unannounced, args=(out, work / "keys", ports, args.messages))
        keyed = watch(node.pid, [fake])
    finally:
        node.kill()
        node.wait()
    if args.code is None:
        from disco_compile.artifact.bundle import load_bundle
        from disco_compile.runtime.net.protocol import Limits
        where = f"this checkout, frame limit {Limits.of(load_bundle(out).schedule.messages).frame} bytes"
    else:
        where = f"the package in {args.code}"
    print(f"node 1 ({where})")
    print(f"1. {args.connections} clients without a key, each announcing and streaming {args.size_mb} MB: "
          f"{keyless}")
    print(f"   bytes each client got into its socket before the node closed it: "
          f"{', '.join(f'{b / 1e6:.2f} MB' for b in sent)}")
    print(f"2. node 0's key, {args.messages} messages of 64 KiB for requests never announced: {keyed}")


def watch(pid: int, threads: list[threading.Thread]) -> str:
    """Run `threads`, sampling the RSS of process `pid` until they end and 1 s after: the figures, as words."""
    before = peak = rss_mb(pid)
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid))
        time.sleep(0.02)
    seconds = time.monotonic() - start
    settle = time.monotonic() + 1.0
    while time.monotonic() < settle:  # what the node still takes in from its socket
        peak = max(peak, rss_mb(pid))
        time.sleep(0.02)
    after = rss_mb(pid)
    return (f"done in {seconds:.1f} s; node RSS before {before:.1f} MB, peak {peak:.1f} MB (+{peak - before:.1f} "
            f"MB), 1 s after {after:.1f} MB (+{after - before:.1f} MB)")


def unannounced(out: Path, keys_dir: Path, ports: list[int], count: int) -> None:
    """Be node 0 (its keys, its address): shake hands with node 1, then send `count` valid input messages of
    64 KiB for requests never announced."""
    import json

    import numpy as np
    import zmq

    from disco_compile.artifact.bundle import load_bundle
    from disco_compile.runtime.net.keys import load_keys
    from disco_compile.runtime.net.protocol import HELLO, MSG, PROTOCOL, manifest_hash
    bundle, keys = load_bundle(out), load_keys(keys_dir, 0, 2)
    msg = next(m for m in bundle.schedule.messages if m.dst == 1 and m.kind == "input")
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.curve_publickey, pull.curve_secretkey, pull.curve_server = keys.public, keys.secret, True
        pull.bind(f"tcp://127.0.0.1:{ports[0]}")
        push.curve_publickey, push.curve_secretkey, push.curve_serverkey = keys.public, keys.secret, keys.peers[1]
        push.connect(f"tcp://127.0.0.1:{ports[1]}")
        me = "feedfacefeedface"
        push.send_multipart([HELLO, json.dumps({"proto": PROTOCOL, "node": 0, "nodes": 2, "instance": me,
                                                "manifest": manifest_hash(bundle),
                                                "schedule": bundle.schedule_hash}).encode()])
        if not pull.poll(30_000):
            raise RuntimeError("node 1 sent no handshake within 30 s")
        node1 = json.loads(pull.recv_multipart()[1])["instance"]
        data = np.zeros((65536 // msg.bytes, *msg.shape[1:]), msg.dtype)
        for r in range(count):
            meta = {"node": 0, "instance": me, "to": node1, "schedule": bundle.schedule_hash, "id": msg.id,
                    "src": 0, "dtype": msg.dtype, "shape": list(data.shape), "request": 10 ** 9 + r}
            push.send_multipart([MSG, json.dumps(meta).encode(), data], copy=False)
        push.close(linger=30_000)  # until every message is out
        pull.close(linger=0)
    finally:
        ctx.destroy(linger=0)


if __name__ == "__main__":
    sys.exit(main())
