"""`disco-run --benchmark K`: K requests after warm-up, one at a time, each timed on the wall clock.

Figures: the median and the 90th percentile (numpy's linear interpolation) of the K latencies, and the
throughput, samples per second = K x batch / the K requests' total time. Requests run one after another, so
the throughput is that of one request in flight (pipelining several raises it on a run across machines).
"""
from __future__ import annotations

import time
from collections.abc import Callable

WARMUP = 2  # untimed requests first: onnxruntime allocates its arenas and picks kernels on the first runs


def measure(call: Callable[[], object], requests: int, warmup: int = WARMUP) -> list[float]:
    """Seconds each of `requests` calls of `call` took, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float], batch: int, warmup: int = WARMUP) -> str:
    """One line: the requests, the latency median and p90, the throughput."""
    import numpy as np  # here, not at the top: cli/run.py imports this module for --help

    ms = np.asarray(seconds) * 1e3
    throughput = len(seconds) * batch / float(np.sum(seconds))
    return (f"benchmark: {len(seconds)} request(s) of batch {batch} after {warmup} warm-up, one at a time: "
            f"latency median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms; "
            f"throughput {throughput:.1f} samples/s")
