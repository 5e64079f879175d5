"""Export directories: writing them whole or not at all, and reading them back checked.

An export directory OUT holds

    manifest.json   format version, model hash, node count, sha256 of every other file
    schedule.json   the Schedule (disco_compile/artifact/schedule.py states its semantics)
    node{k}/...     the ONNX graph of each stage of node k

`write_bundle` writes into a temporary sibling of OUT, reads the result back
with `load_bundle`, and only then renames it into place, so OUT is never
half-written and an invalid export is never written at all. `load_bundle`
trusts nothing on disk: it checks both JSON files against the JSON Schemas in
disco_compile/artifact/schemas/, every file's sha256, the schedule's consistency
(`check_schedule`) and that every stage graph declares the names, dtypes and
shapes the schedule says. The schedule hash (sha256 of the canonical
schedule.json bytes) tags every message at run time, so nodes that hold
different exports refuse each other's messages.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import onnx
from jsonschema import Draft202012Validator

from ..errors import BundleError
from .schedule import BATCH, FORMAT_VERSION, MESSAGE_KINDS, Manifest, Schedule, Stage

MANIFEST = "manifest.json"
SCHEDULE = "schedule.json"
_SHOWN = 8  # problems listed in one error before "... and N more"
_REEXPORT = "re-export the model"


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked export directory."""
    root: Path
    schedule: Schedule
    manifest: Manifest
    schedule_hash: str

    def path(self, stage: Stage) -> Path:
        return self.root / stage.file


# ---------------------------------------------------------------- canonical JSON and hashes

def canonical_json(data) -> bytes:
    """`data` (dicts, lists, str, int, bool, None) as the bytes written to disk: keys in the
    order given, two-space indent, lists of scalars on one line, a final newline."""
    def encode(value, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(value, dict):
            if not value:
                return "{}"
            items = (f"{inner}{json.dumps(str(k))}: {encode(v, depth + 1)}" for k, v in value.items())
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in value):
                return json.dumps(list(value), separators=(", ", ": "))
            return "[\n" + ",\n".join(inner + encode(v, depth + 1) for v in value) + "\n" + pad + "]"
        return json.dumps(value)
    return (encode(data, 0) + "\n").encode()


def schedule_bytes(schedule: Schedule) -> bytes:
    """The canonical schedule.json bytes of `schedule`."""
    return canonical_json(schedule.to_json())


def schedule_hash(schedule: Schedule) -> str:
    """sha256 (hex) of the canonical schedule.json bytes: the tag every message carries."""
    return hashlib.sha256(schedule_bytes(schedule)).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(problems: list[str]) -> str:
    shown = problems[:_SHOWN]
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return "".join(f"\n  {p}" for p in shown) + more


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# ---------------------------------------------------------------- JSON Schemas

@cache
def _validator(kind: str) -> Draft202012Validator:
    text = (resources.files("disco_compile.artifact") / "schemas" / f"{kind}.schema.json").read_text()
    return Draft202012Validator(json.loads(text))


def _check_against_schema(data, kind: str, file: str) -> None:
    """BundleError listing where `data` breaks disco_compile/artifact/schemas/{kind}.schema.json."""
    problems = []
    for error in _validator(kind).iter_errors(data):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        text = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        problems.append(f"at {where}: {text}")
    if problems:
        raise BundleError(f"{file} does not follow the {kind} format "
                          f"(disco_compile/artifact/schemas/{kind}.schema.json); it was edited or written by another "
                          f"tool; {_REEXPORT}:{_listing(problems)}")


def _read_json(path: Path, file: str):
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{file}: cannot be read as JSON ({exc}); {_REEXPORT}") from exc
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise BundleError(f"{file}: format version {data['format_version']!r}, but this disco-compile reads "
                          f"version {FORMAT_VERSION}; re-export with this version of disco-compile")
    return data


# ---------------------------------------------------------------- schedule consistency

def check_schedule(schedule: Schedule) -> None:
    """Raise BundleError listing every inconsistency of `schedule`.

    Checked: node count, unique names and ids; each message goes between two
    different existing nodes, its bytes match its shape and dtype, and it is
    produced by exactly one output of stage `src_stage` of node `src` and
    consumed by exactly one input of stage `dst_stage` of node `dst`; carried
    values are produced once, before they are used, on the node that uses them;
    model inputs and outputs appear on node 0 only, every model output produced
    exactly once; and no stages wait on each other in a cycle.
    """
    problems = _schedule_problems(schedule)
    if not problems:
        problems = _cycle_problems(schedule)
    if problems:
        raise BundleError(f"{SCHEDULE} is inconsistent, the runtime cannot run it; {_REEXPORT} (if it "
                          f"happens again, it is a bug in disco-compile's export):{_listing(problems)}")


def _duplicates(names) -> list:
    return sorted(name for name, n in Counter(names).items() if n > 1)


def _schedule_problems(s: Schedule) -> list[str]:
    problems: list[str] = []
    if s.format_version != FORMAT_VERSION:
        problems.append(f"format_version {s.format_version}, expected {FORMAT_VERSION}")
    if s.nodes != len(s.programs):
        problems.append(f"nodes is {s.nodes} but there are {len(s.programs)} programs")
    for what, names in (("model input", [t.name for t in s.inputs]), ("model output", [t.name for t in s.outputs]),
                        ("message id", [m.id for m in s.messages]),
                        ("stage file", [st.file for p in s.programs for st in p])):
        problems += [f"{what} {name!r} appears more than once" for name in _duplicates(names)]

    messages = {m.id: m for m in s.messages}
    for m in s.messages:
        where = f"message {m.id!r}"
        if m.kind not in MESSAGE_KINDS:
            problems.append(f"{where}: kind {m.kind!r} is not one of {MESSAGE_KINDS}")
        if not (0 <= m.src < len(s.programs) and 0 <= m.dst < len(s.programs)):
            problems.append(f"{where}: from node {m.src} to node {m.dst}, but the nodes are 0..{len(s.programs) - 1}")
            continue
        if m.src == m.dst:
            problems.append(f"{where}: from node {m.src} to itself (a value kept on one node is 'carried')")
        if m.kind == "input" and m.src != 0:
            problems.append(f"{where}: an 'input' message must come from node 0, not node {m.src}")
        if m.kind == "output" and m.dst != 0:
            problems.append(f"{where}: an 'output' message must go to node 0, not node {m.dst}")
        if not 0 <= m.src_stage < len(s.programs[m.src]):
            problems.append(f"{where}: src_stage {m.src_stage}, but node {m.src} has {len(s.programs[m.src])} stages")
        if not 0 <= m.dst_stage < len(s.programs[m.dst]):
            problems.append(f"{where}: dst_stage {m.dst_stage}, but node {m.dst} has {len(s.programs[m.dst])} stages")
        if not m.shape or m.shape[0] != BATCH or not all(isinstance(d, int) for d in m.shape[1:]):
            problems.append(f"{where}: shape {m.shape} must be {BATCH!r} followed by whole numbers")
        else:
            try:
                expected = math.prod(m.shape[1:]) * np.dtype(m.dtype).itemsize
            except TypeError:
                problems.append(f"{where}: dtype {m.dtype!r} is not a numpy dtype name")
            else:
                if m.bytes != expected:
                    problems.append(f"{where}: bytes {m.bytes}, but shape {_fmt_shape(m.shape)} of {m.dtype} "
                                    f"is {expected} bytes per sample")

    produced: Counter = Counter()
    consumed: Counter = Counter()
    model_outputs: Counter = Counter()
    input_names = {t.name for t in s.inputs}
    output_names = {t.name for t in s.outputs}
    for node, program in enumerate(s.programs):
        carried_at: dict[str, int] = {}  # carried value -> stage that produced it
        for position, stage in enumerate(program):
            where = f"node {node} stage {stage.index} ({stage.file})"
            if stage.index != position:
                problems.append(f"{where}: index {stage.index}, but it is stage {position} of node {node}")
            problems += [f"{where}: graph input {name!r} listed more than once"
                         for name in _duplicates(i.name for i in stage.inputs)]
            for inp in stage.inputs:
                if inp.source == "model_input":
                    if node != 0:
                        problems.append(f"{where}: model input {inp.ref!r} read on node {node}; only node 0 holds "
                                        f"the model inputs (others get them as 'input' messages)")
                    elif inp.ref not in input_names:
                        problems.append(f"{where}: reads model input {inp.ref!r}, which is not a model input")
                elif inp.source == "message":
                    m = messages.get(inp.ref)
                    if m is None:
                        problems.append(f"{where}: receives message {inp.ref!r}, which is not in the messages")
                        continue
                    consumed[m.id] += 1
                    if (m.dst, m.dst_stage) != (node, stage.index):
                        problems.append(f"{where}: receives message {m.id!r}, which the messages send to "
                                        f"node {m.dst} stage {m.dst_stage}")
                elif inp.source == "carried":
                    if inp.ref not in carried_at:
                        problems.append(f"{where}: uses carried value {inp.ref!r} before any earlier stage of "
                                        f"node {node} produces it")
                else:
                    problems.append(f"{where}: input {inp.name!r} has unknown source {inp.source!r}")
            for out in stage.outputs:
                if out.role == "message":
                    m = messages.get(out.ref)
                    if m is None:
                        problems.append(f"{where}: sends message {out.ref!r}, which is not in the messages")
                        continue
                    produced[m.id] += 1
                    if (m.src, m.src_stage) != (node, stage.index):
                        problems.append(f"{where}: sends message {m.id!r}, which the messages say comes from "
                                        f"node {m.src} stage {m.src_stage}")
                elif out.role == "carried":
                    if out.ref in carried_at:
                        problems.append(f"{where}: carried value {out.ref!r} is already produced by stage "
                                        f"{carried_at[out.ref]} of node {node}")
                    carried_at.setdefault(out.ref, stage.index)
                elif out.role == "model_output":
                    if node != 0:
                        problems.append(f"{where}: produces model output {out.ref!r} on node {node}; model "
                                        f"outputs are produced on node 0 (others send 'output' messages)")
                    elif out.ref not in output_names:
                        problems.append(f"{where}: produces model output {out.ref!r}, which is not a model output")
                    model_outputs[out.ref] += 1
                else:
                    problems.append(f"{where}: output {out.name!r} has unknown role {out.role!r}")
    for m in s.messages:
        if produced[m.id] != 1:
            problems.append(f"message {m.id!r}: sent by {produced[m.id]} stage outputs, expected exactly 1")
        if consumed[m.id] != 1:
            problems.append(f"message {m.id!r}: received by {consumed[m.id]} stage inputs, expected exactly 1")
    for t in s.outputs:
        if model_outputs[t.name] != 1:
            problems.append(f"model output {t.name!r}: produced {model_outputs[t.name]} times, expected exactly once")
    return problems


def _cycle_problems(s: Schedule) -> list[str]:
    """Stages that can never run: each node runs its stages in order and a stage
    waits for its messages, so (node, stage) pairs form a graph that must be acyclic."""
    waits_on: dict[tuple[int, int], list[tuple[int, int]]] = {
        (k, i): ([(k, i - 1)] if i else []) for k, p in enumerate(s.programs) for i in range(len(p))}
    for m in s.messages:
        waits_on[(m.dst, m.dst_stage)].append((m.src, m.src_stage))
    done: set[tuple[int, int]] = set()
    progress = True
    while progress:
        ready = [key for key, deps in waits_on.items() if key not in done and all(d in done for d in deps)]
        done.update(ready)
        progress = bool(ready)
    stuck = sorted(set(waits_on) - done)
    if not stuck:
        return []
    names = ", ".join(f"node {k} stage {i}" for k, i in stuck[:_SHOWN]) + (" ..." if len(stuck) > _SHOWN else "")
    return [f"stages that wait on each other's messages in a cycle (they would deadlock): {names}"]


# ---------------------------------------------------------------- stage graphs against the schedule

def _declared_type(value_info) -> tuple[str | None, list | None]:
    """(numpy dtype name, shape: ints for fixed dims, names for symbolic ones); None where undeclared."""
    if not value_info.type.HasField("tensor_type"):
        return "(not a tensor)", None
    tensor = value_info.type.tensor_type
    dtype = None
    if tensor.elem_type:
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return dtype, shape


def _type_problems(declared: tuple[str | None, list | None], dtype: str, shape: list) -> list[str]:
    """How a graph's declared (dtype, shape) disagrees with the schedule's (dtype, shape with "batch")."""
    graph_dtype, graph_shape = declared
    problems = []
    if graph_dtype is not None and graph_dtype != dtype:
        problems.append(f"dtype {graph_dtype} in the graph, {dtype} in {SCHEDULE}")
    if graph_shape is not None:
        shown = _fmt_shape(graph_shape)
        if len(graph_shape) != len(shape):
            problems.append(f"shape {shown} in the graph, {_fmt_shape(shape)} in {SCHEDULE}")
        elif graph_shape and isinstance(graph_shape[0], int):
            problems.append(f"the graph fixes the batch dimension to {graph_shape[0]} (shape {shown}); "
                            f"{SCHEDULE} says any batch: export the graph with a symbolic batch dimension")
        elif any(isinstance(g, int) and g != d for g, d in zip(graph_shape[1:], shape[1:])):
            problems.append(f"shape {shown} in the graph, {_fmt_shape(shape)} in {SCHEDULE}")
    return problems


def _check_stage_graphs(root: Path, s: Schedule) -> None:
    messages = {m.id: m for m in s.messages}
    inputs = {t.name: t for t in s.inputs}
    outputs = {t.name: t for t in s.outputs}
    problems: list[str] = []
    for node, program in enumerate(s.programs):
        carried: dict[str, tuple[str | None, list | None]] = {}  # value -> type declared by its producer
        for stage in program:
            where = f"{stage.file} (node {node} stage {stage.index})"
            try:
                model = onnx.load(str(root / stage.file))
                onnx.checker.check_model(model, full_check=True)
            except Exception as exc:  # onnx raises several types (DecodeError, ValidationError, ...)
                raise BundleError(f"{where}: not a valid ONNX model ({type(exc).__name__}: {exc}); "
                                  f"{_REEXPORT}") from exc
            graph = model.graph
            initialized = {t.name for t in graph.initializer}
            graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in initialized}
            graph_outputs = {vi.name: vi for vi in graph.output}
            for what, graph_names, declared in (("inputs", graph_inputs, {i.name for i in stage.inputs}),
                                                ("outputs", graph_outputs, {o.name for o in stage.outputs})):
                if set(graph_names) != declared:
                    problems.append(f"{where}: graph {what} {sorted(graph_names)}, but {SCHEDULE} declares "
                                    f"{sorted(declared)} (not in the graph: {sorted(declared - set(graph_names))}; "
                                    f"not in {SCHEDULE}: {sorted(set(graph_names) - declared)})")
            for inp in stage.inputs:
                if inp.name not in graph_inputs:
                    continue
                declared_type = _declared_type(graph_inputs[inp.name])
                if inp.source == "message":
                    m = messages[inp.ref]
                    found = _type_problems(declared_type, m.dtype, m.shape)
                    what = f"message {m.id!r} received as graph input {inp.name!r}"
                elif inp.source == "model_input":
                    t = inputs[inp.ref]
                    found = _type_problems(declared_type, t.dtype, t.shape)
                    what = f"model input {t.name!r} read as graph input {inp.name!r}"
                else:
                    found = _carried_problems(carried.get(inp.ref), declared_type)
                    what = f"carried value {inp.ref!r} read as graph input {inp.name!r}"
                problems += [f"{where}: {what}: {p}" for p in found]
            for out in stage.outputs:
                if out.name not in graph_outputs:
                    continue
                declared_type = _declared_type(graph_outputs[out.name])
                if out.role == "message":
                    m = messages[out.ref]
                    problems += [f"{where}: message {m.id!r} sent from graph output {out.name!r}: {p}"
                                 for p in _type_problems(declared_type, m.dtype, m.shape)]
                elif out.role == "model_output":
                    t = outputs[out.ref]
                    problems += [f"{where}: model output {t.name!r} from graph output {out.name!r}: {p}"
                                 for p in _type_problems(declared_type, t.dtype, t.shape)]
                else:
                    carried[out.ref] = declared_type
    if problems:
        raise BundleError(f"the stage graphs and {SCHEDULE} disagree; {_REEXPORT}:{_listing(problems)}")


def _carried_problems(produced, consumed) -> list[str]:
    """A carried value's type as its producing stage declares it against its consuming stage."""
    if produced is None:
        return []
    (d1, s1), (d2, s2) = produced, consumed
    problems = []
    if d1 is not None and d2 is not None and d1 != d2:
        problems.append(f"dtype {d1} where it is produced, {d2} where it is used")
    if s1 is not None and s2 is not None and (
            len(s1) != len(s2) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(s1, s2))):
        problems.append(f"shape {_fmt_shape(s1)} where it is produced, {_fmt_shape(s2)} where it is used")
    return problems


# ---------------------------------------------------------------- reading

def load_bundle(out_dir: str | os.PathLike) -> Bundle:
    """Read and check the export directory `out_dir` (see the module docstring); BundleError if anything is off."""
    root = Path(out_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such directory; give the directory an export wrote")
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root}: no {MANIFEST}, so this is not an export directory (or an export that "
                          f"did not finish); {_REEXPORT}")
    manifest_data = _read_json(root / MANIFEST, MANIFEST)
    _check_against_schema(manifest_data, "manifest", MANIFEST)
    manifest = Manifest.from_json(manifest_data)
    _check_files(root, manifest)

    schedule_data = _read_json(root / SCHEDULE, SCHEDULE)
    _check_against_schema(schedule_data, "schedule", SCHEDULE)
    schedule = Schedule.from_json(schedule_data)
    if manifest.nodes != schedule.nodes:
        raise BundleError(f"{MANIFEST} says {manifest.nodes} nodes, {SCHEDULE} says {schedule.nodes}; {_REEXPORT}")
    check_schedule(schedule)
    unlisted = [st.file for p in schedule.programs for st in p if st.file not in manifest.files]
    if unlisted:
        raise BundleError(f"stage files not listed in {MANIFEST}, so their sha256 cannot be checked; "
                          f"{_REEXPORT}:{_listing(unlisted)}")
    _check_stage_graphs(root, schedule)
    return Bundle(root=root.resolve(), schedule=schedule, manifest=manifest, schedule_hash=schedule_hash(schedule))


def _check_files(root: Path, manifest: Manifest) -> None:
    problems = []
    for rel, digest in sorted(manifest.files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in {MANIFEST} but missing; {_REEXPORT} (or copy the whole directory)")
        elif _sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 mismatch, the file was changed after export; {_REEXPORT}")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    problems += [f"{rel}: not listed in {MANIFEST}, so not part of this export; remove it or {_REEXPORT}"
                 for rel in sorted(on_disk - set(manifest.files) - {MANIFEST})]
    if problems:
        raise BundleError(f"{root} is not the directory the export wrote:{_listing(problems)}")


# ---------------------------------------------------------------- writing

def write_bundle(out_dir: str | os.PathLike, schedule: Schedule, stage_files: Mapping[str, bytes],
                 model_hash: str, *, force: bool = False) -> Manifest:
    """Write the export directory `out_dir`: schedule.json, every stage file, then manifest.json.

    `stage_files` maps paths relative to `out_dir` ("node0/stage000.onnx") to
    file contents; every stage of the schedule needs its file. `model_hash` is
    the sha256 (hex) of the source model. An existing non-empty `out_dir` is
    refused unless `force`. Everything is written into a temporary sibling
    directory and read back with `load_bundle` first; `out_dir` (with `force`,
    the old one) is replaced only once the new one is complete and valid.
    """
    out = Path(out_dir)
    refuse_existing(out, force)
    check_schedule(schedule)
    _check_stage_files(schedule, stage_files)
    data = schedule_bytes(schedule)
    files = {SCHEDULE: hashlib.sha256(data).hexdigest()}
    files |= {rel: hashlib.sha256(stage_files[rel]).hexdigest() for rel in sorted(stage_files)}
    manifest = Manifest(format_version=FORMAT_VERSION, model_hash=model_hash, nodes=schedule.nodes,
                        files=files, created_by=f"disco-compile {_version()}")
    _check_against_schema(manifest.to_json(), "manifest", MANIFEST)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.writing-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as exc:
        raise BundleError(f"{out}: cannot create the output directory ({exc}); choose a writable place") from exc
    try:
        _write_file(staging / SCHEDULE, data)
        for rel in sorted(stage_files):
            _write_file(staging / rel, stage_files[rel])
        _write_file(staging / MANIFEST, canonical_json(manifest.to_json()))
        try:
            load_bundle(staging)
        except BundleError as exc:
            raise BundleError(f"{out}: not written, the export does not read back: {exc}") from exc
        _move_into_place(staging, out, force)
    except OSError as exc:
        raise BundleError(f"{out}: writing failed ({exc}); nothing was changed there") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the move succeeded
    return manifest


def refuse_existing(out: Path, force: bool) -> None:
    """Refuse to write into an existing non-empty directory unless `force` (checked again when writing)."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} already exists and is not empty; choose another output directory, or pass "
                          f"--force (force=True) to replace it")


def _check_stage_files(schedule: Schedule, stage_files: Mapping[str, bytes]) -> None:
    problems = []
    for rel, content in stage_files.items():
        parts = rel.split("/")
        if rel in (MANIFEST, SCHEDULE) or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..")
                                                                                   for p in parts):
            problems.append(f"{rel!r}: not a usable file path inside the export directory")
        if not isinstance(content, bytes):
            problems.append(f"{rel!r}: content is {type(content).__name__}, expected bytes "
                            f"(model.SerializeToString())")
    problems += [f"{st.file}: node {k} stage {st.index} has no file in stage_files"
                 for k, p in enumerate(schedule.programs) for st in p if st.file not in stage_files]
    if problems:
        raise BundleError(f"write_bundle: the stage files do not fit the schedule:{_listing(problems)}")


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    """Rename the complete `staging` to `out`; an existing `out` is moved aside first and removed last."""
    refuse_existing(out, force)  # again: something may have appeared while writing
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    try:
        return metadata.version("disco-compile")
    except metadata.PackageNotFoundError:
        return "(not installed)"
