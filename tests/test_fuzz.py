"""Fuzzing the loaders: manifest.json, schedule.json, peers files and .npy records (files and streams).

Property, for every input: the loader gives a named error (a DiscoError) or the correct output, never a raw
traceback, and in bounded time. "Correct" per loader:
  - manifest.json (mutated, in a copy of a valid export): a bundle that loads has the original schedule;
  - schedule.json (mutated, its sha256 recomputed in manifest.json so every later check is reached): a bundle
    that loads runs to a named error or to outputs (whether they are the original's is not a property: with
    the hash recomputed the file is a different, consistent model; README "Security");
  - schedule.json mutated without recomputing the hash: always refused;
  - a peers file: a mapping of every node 0..N-1 to a tcp:// endpoint;
  - a .npy record: what numpy.load reads from the same bytes (in native byte order), when it reads them.

The targets (`Target`) and strategies here are shared with benchmarks/fuzz.py, which runs them for 10^4 and
more inputs each and writes the counts to docs/reliability.md; this suite runs a bounded sample (about a
minute in all).
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disco_compile.artifact.bundle import canonical_json, load_bundle, write_bundle
from disco_compile.errors import DiscoError
from disco_compile.runtime.executor import run_bundle
from disco_compile.runtime.net.peers import load_peers
from disco_compile.runtime.stream import load_npy, read_arrays
from test_runtime import MODEL_HASH, inputs, two_node

# ---------------------------------------------------------------- mutations of a JSON document

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                     st.text(max_size=12), st.sampled_from([0, 1, 2, -1, 2.0, "batch", "float32", "node0/x.onnx"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                          inner, max_size=4),
                       max_leaves=12)
_DEEP = "__deep__"  # a value replaced, in the text, by this many nested brackets:
_DEPTHS = st.integers(1, 100_000)


def _paths(data, prefix=()) -> list[tuple]:
    """Every path (keys and indices) into `data`, `data` itself first."""
    found = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _paths(v, (*prefix, i))
    return found


def _replace(data, path: tuple, value):
    if not path:
        return value
    *head, last = path
    parent = data
    for p in head:
        parent = parent[p]
    parent[last] = value
    return data


@st.composite
def mutated_json(draw, original: dict) -> bytes:
    """`original` with one to three values replaced (by JSON values, deep nesting, or a removed key), then
    written (canonically or not); or its bytes cut, flipped or extended."""
    if draw(st.integers(0, 4)) == 0:
        raw = bytearray(canonical_json(original))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(raw) - 1))
            raw[at:at + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
        return bytes(raw)
    data = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        if path and isinstance(path[-1], str) and draw(st.booleans()):
            parent = data
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
            continue
        data = _replace(data, path, _DEEP if draw(st.integers(0, 9)) == 0 else draw(_VALUES))
    text = json.dumps(data).encode() if draw(st.booleans()) else canonical_json(data)
    depth = draw(_DEPTHS)
    return text.replace(f'"{_DEEP}"'.encode(), b"[" * depth + b"]" * depth)


# ---------------------------------------------------------------- the targets

@dataclass
class Target:
    """One loader under fuzz: `strategy` draws an input, `check(input)` returns "named" (a DiscoError) or
    "ok" (the correct output), raises AssertionError for a wrong output, and lets any other exception out (a
    raw traceback)."""
    name: str
    strategy: st.SearchStrategy
    check: Callable[[object], str]


class ExportUnderFuzz:
    """A valid two-node export (tests/test_runtime.py's toy program) whose files the checks overwrite and
    restore."""

    def __init__(self, root: Path):
        self.out = root / "two"
        write_bundle(self.out, *two_node(), MODEL_HASH)
        self.original = {f: (self.out / f).read_bytes() for f in ("manifest.json", "schedule.json")}
        self.schedule_hash = load_bundle(self.out).schedule_hash
        self.x = inputs(2)
        self.expected = run_bundle(load_bundle(self.out), [self.x])

    def _load(self, files: dict[str, bytes]) -> str:
        try:
            for f, content in files.items():
                (self.out / f).write_bytes(content)
            try:
                return self._loaded(load_bundle(self.out))
            except DiscoError:
                return "named"
        finally:
            for f, content in self.original.items():
                (self.out / f).write_bytes(content)

    def _loaded(self, bundle) -> str:
        if bundle.schedule_hash == self.schedule_hash:
            outputs = run_bundle(bundle, [self.x], timeout=5)
            assert all(np.array_equal(a, b) for a, b in zip(outputs, self.expected, strict=True)), "wrong answer"
            return "ok"
        try:
            run_bundle(bundle, [self.x], timeout=5)
        except DiscoError:
            return "named"
        return "ok"

    def manifest(self, content: bytes) -> str:
        return self._load({"manifest.json": content})

    def schedule(self, content: bytes) -> str:
        manifest = json.loads(self.original["manifest.json"])
        manifest["files"]["schedule.json"] = hashlib.sha256(content).hexdigest()
        return self._load({"schedule.json": content, "manifest.json": canonical_json(manifest)})

    def schedule_unhashed(self, content: bytes) -> str:
        outcome = self._load({"schedule.json": content})
        assert outcome == "named" or content == self.original["schedule.json"], "a changed schedule.json loaded"
        return outcome


_PEER_LINES = st.lists(st.tuples(st.one_of(st.integers(-1, 3).map(str), st.sampled_from([".inf", "1.0", "~", "'0'",
                                                                                           "[0]", "&a 0", "*a"])),
                                 st.one_of(st.sampled_from(["10.0.0.1:5550", "[::1]:5551", "h:0", "h:65536", "*a",
                                                            "&a x:1", "tcp://h:1", "{a: b}", "h:5550"]),
                                           st.text(max_size=20))),
                       max_size=5)


@st.composite
def peers_text(draw) -> bytes:
    lines = draw(_PEER_LINES)
    text = "".join(f"{k}: {v}\n" for k, v in lines)
    if draw(st.integers(0, 3)) == 0:
        text = draw(st.text(max_size=60)) + text
    return text.encode("utf-8", "surrogatepass")


def check_peers(content: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peers.yaml"
        path.write_bytes(content)
        try:
            peers = load_peers(path, 2)
        except DiscoError:
            return "named"
    assert sorted(peers) == [0, 1] and all(e.startswith("tcp://") for e in peers.values()), peers
    return "ok"


_DTYPES = st.sampled_from(["<f4", ">f4", "<f8", ">i8", "|u1", "|b1", "<f2", "|O", "<U3", "V8", "<c8", "f4"])
_SHAPES = st.lists(st.integers(-2, 6) | st.sampled_from([10**6, 2**40]), max_size=4).map(tuple)


@st.composite
def npy_record(draw) -> bytes:
    """A .npy record: a valid one, or one with a drawn header (dtype, shape, order) and payload length, or
    bytes changed."""
    buf = io.BytesIO()
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape).astype(draw(_DTYPES.filter(
            lambda d: d not in ("|O", "<U3", "V8"))))
        np.lib.format.write_array(buf, np.asfortranarray(array) if draw(st.booleans()) else array)
    else:
        header = {"descr": draw(_DTYPES), "fortran_order": draw(st.booleans()), "shape": draw(_SHAPES)}
        try:
            np.lib.format.write_array_header_1_0(buf, header)
        except (ValueError, TypeError):
            buf.write(b"\x93NUMPY\x01\x00" + draw(st.binary(max_size=30)))
        buf.write(b"\0" * draw(st.integers(0, 200)))
    raw = bytearray(buf.getvalue())
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw[at:at + draw(st.integers(0, 4))] = draw(st.binary(max_size=4))
    return bytes(raw)


def check_npy(content: bytes) -> str:
    """A .npy record as a file and as a stream of one record; what is read must be what numpy reads."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        path.write_bytes(content)
        outcomes = []
        for read in (lambda: load_npy(path), lambda: next(iter(read_arrays(io.BytesIO(content))), None)):
            try:
                array = read()
            except DiscoError:
                outcomes.append("named")
                continue
            if array is not None:  # read, so its payload is in `content`: numpy may read it too
                reference = np.lib.format.read_array(io.BytesIO(content), allow_pickle=False)
                same = np.array_equal(array, reference, equal_nan=array.dtype.kind in "fc")
                assert array.dtype.isnative and array.dtype == reference.dtype.newbyteorder("=") and \
                    array.shape == reference.shape and same, "wrong array"
            outcomes.append("ok")
    return "ok" if "ok" in outcomes else "named"


def targets(root: Path) -> list[Target]:
    """Every loader under fuzz, the export ones working in `root`."""
    export = ExportUnderFuzz(root)
    manifest = json.loads(export.original["manifest.json"])
    schedule = json.loads(export.original["schedule.json"])
    return [Target("manifest.json", mutated_json(manifest), export.manifest),
            Target("schedule.json, sha256 recomputed", mutated_json(schedule), export.schedule),
            Target("schedule.json, sha256 not recomputed", mutated_json(schedule), export.schedule_unhashed),
            Target("peers.yaml", peers_text(), check_peers),
            Target(".npy records (file and stream)", npy_record(), check_npy)]


# ---------------------------------------------------------------- the bounded suite

@pytest.fixture(scope="module")
def fuzz_targets(tmp_path_factory) -> dict[str, Target]:
    return {t.name: t for t in targets(tmp_path_factory.mktemp("fuzz"))}


EXAMPLES = {"manifest.json": 150, "schedule.json, sha256 recomputed": 150, "schedule.json, sha256 not recomputed": 60,
            "peers.yaml": 300, ".npy records (file and stream)": 400}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_named_error_or_correct_output(fuzz_targets, name):
    target = fuzz_targets[name]

    @settings(max_examples=EXAMPLES[name], deadline=5000, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(target.strategy)
    def run(value):
        assert target.check(value) in ("named", "ok")
    run()


def test_targets_see_both_outcomes(fuzz_targets):
    """The checks can tell: the valid file is 'ok', a broken one 'named'."""
    t = fuzz_targets
    export_files = t["manifest.json"].check.__self__.original
    assert t["manifest.json"].check(export_files["manifest.json"]) == "ok"
    assert t["manifest.json"].check(b"{") == "named"
    assert t["schedule.json, sha256 recomputed"].check(export_files["schedule.json"]) == "ok"
    assert t["peers.yaml"].check(b"0: h:1\n1: h:2\n") == "ok" and t["peers.yaml"].check(b"0: h:1\n") == "named"
    buf = io.BytesIO()
    np.save(buf, np.arange(3, dtype=">f4"))
    assert t[".npy records (file and stream)"].check(buf.getvalue()) == "ok"
    assert t[".npy records (file and stream)"].check(buf.getvalue()[:20]) == "named"
