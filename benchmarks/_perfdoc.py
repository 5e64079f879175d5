"""Shared by the benchmarks: the header of docs/performance.md, one section per benchmark
(or per task, in docs/accuracy.md) between markers, written atomically,
and a description of the machine. Standard library only (node_compute.py's child
processes import this module and must not load torch)."""
from __future__ import annotations

import datetime
import fcntl
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
SECTIONS = ("compile_time", "node_compute", "runtime_overhead", "model_costs")  # order in the file

HEADER = """\
# Performance: compile time and per-node compute

Written by `benchmarks/compile_time.py`, `benchmarks/node_compute.py`, `benchmarks/runtime_overhead.py` and
`benchmarks/model_costs.py`; each script rewrites only its own section (between its `<!-- name -->` markers) and keeps
the others.

How to read these figures:

- Every figure is a median of repeated measurements on the machine named in its section. Other
  jobs share that machine now and then (each section gives the load average), so both sides of
  every ratio are measured in the same run, interleaved; ratios are more trustworthy than
  absolute times, which can grow several-fold while other jobs run.
- Weights are random (BatchNorm-calibrated, `disco_compile.frontend.zoo`). Timings do not depend on the
  weight values; which channels the budget keeps does, but compute depends only on how many.
- Node compute is pure compute: each stage is fed pre-made inputs (captured from one run of
  the export), so no time is spent waiting for messages and no transport is involved. A real
  distributed run adds communication and waiting on top.
- onnxruntime runs on one thread (intra- and inter-op), CPU execution provider, default graph
  optimisations, as `NodeExecutor(threads=1)` does. Other thread counts, batch sizes, or
  hardware with different per-call and per-layer costs give other ratios.
- Memory is the peak resident set size of a fresh process that imports only numpy and
  onnxruntime, loads one node's stage graphs (or the whole model) and runs them; the
  interpreter with those imports alone is reported so it can be subtracted.
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def load() -> str:
    """The 1, 5 and 15 minute load averages: other jobs on the machine show here."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def today() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def median(values) -> float:
    return statistics.median(values)


def _marker(name: str, closing: bool = False) -> str:
    return f"<!-- {'/' if closing else ''}{name} -->"


def _sections(text: str, names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        m = re.search(re.escape(_marker(name)) + r"\n(.*?)" + re.escape(_marker(name, True)), text, re.S)
        if m:
            found[name] = m.group(1)
    return found


def write_section(name: str, body: str, path: Path = DOC, header: str = HEADER,
                  names: tuple[str, ...] = SECTIONS) -> None:
    """Replace section `name` of `path` with `body`, keep the other sections `names`, rewrite the
    header; the new file is written to a temporary file and renamed over the old one."""
    assert name in names, name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two benchmarks finishing together must not lose a section
        old = path.read_text() if path.exists() else ""
        sections = _sections(old, names)
        sections[name] = body.rstrip("\n") + "\n"
        parts = [header]
        for s in names:
            if s in sections:
                parts.append(f"{_marker(s)}\n{sections[s]}{_marker(s, True)}\n")
        text = "\n".join(parts)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            tmp = f.name
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def publish(section: str, text: str, write: bool) -> None:
    """Print a section and, unless told not to, write it into its place in docs/performance.md."""
    print()
    print(text)
    if write:
        write_section(section, text)
        print(f"wrote the {section} section of {DOC}")
