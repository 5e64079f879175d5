"""The network probes of benchmarks/netbench.py, run in the nodes' namespaces (standard library only).

Between node 0 and node 1: a TCP bulk rate (`child_source` sends MB megabytes to `child_sink`), and message
times (`child_message_times`: each size in MESSAGE_SIZES sent after 20 ms of idle link, timed until
`child_echo` on node 1 holds all of it and its one-byte answer is back; the median of reps), which show a
tbf bucket's head start and any pacing loss against the time at the rate.
"""
from __future__ import annotations

import json
import socket
import statistics
import time

from netbench_net import addr

MESSAGE_SIZES = (16 << 10, 64 << 10, 160 << 10, 512 << 10, 2 << 20)  # bytes; netbench's messages: 8 KB to 1.6 MB


def _accept(port: int):
    """The first connection to node 1's port (the probes' server side)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr(1), port))
    srv.listen(1)
    return srv.accept()[0]


def _connect(port: int):
    """A connection from node 0 to node 1's port, retried while node 1 starts listening."""
    for _ in range(100):
        try:
            return socket.create_connection((addr(1), port))
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"node 1 does not listen on port {port}")


def child_sink(port: int) -> None:
    c = _accept(port)
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    c.close()


def child_echo(port: int) -> None:
    """Node 1 of the message-time probe: for each message (an 8-byte length, then that many bytes), read
    it whole, then answer one byte."""
    c = _accept(port)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    while True:
        head = c.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            break
        left = int.from_bytes(head, "little")
        while left:
            left -= c.recv_into(buf, min(left, len(buf)))
        c.sendall(b"k")
    c.close()


def child_message_times(port: int, reps: int) -> None:
    """Node 0 of the probe: the time from sending a message of each size in MESSAGE_SIZES (after 20 ms with
    the link idle) to the one-byte answer that node 1 sends once it holds the whole message; median of reps."""
    c = _connect(port)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = {}
    for size in MESSAGE_SIZES:
        data = size.to_bytes(8, "little") + b"\0" * size
        t = []
        for _ in range(reps + 2):
            time.sleep(0.02)
            t0 = time.perf_counter()
            c.sendall(data)
            c.recv(1)
            t.append(time.perf_counter() - t0)
        times[size] = statistics.median(t[2:])
    c.close()
    print(json.dumps({"times": times}))


def child_source(port: int, mbytes: int) -> None:
    c = _connect(port)
    buf = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(mbytes):
        c.sendall(buf)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print(json.dumps({"rate_bps": mbytes * (1 << 20) * 8 / (time.perf_counter() - t0)}))
