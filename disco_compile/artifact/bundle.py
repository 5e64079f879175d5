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
and that every stage graph declares the names, dtypes and shapes the schedule
says (`check_schedule`, `check_stage_graphs`: checks.py). The schedule hash (sha256 of the canonical
schedule.json bytes) tags every message at run time, so nodes that hold
different exports refuse each other's messages.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path

from jsonschema import Draft202012Validator

from ..errors import BundleError
from .checks import REEXPORT, SCHEDULE, check_schedule, check_stage_graphs, listing
from .schedule import FORMAT_VERSION, Manifest, Schedule, Stage

MANIFEST = "manifest.json"


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
                          f"tool; {REEXPORT}:{listing(problems)}")


def _read_json(path: Path, file: str):
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{file}: cannot be read as JSON ({exc}); {REEXPORT}") from exc
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise BundleError(f"{file}: format version {data['format_version']!r}, but this disco-compile reads "
                          f"version {FORMAT_VERSION}; re-export with this version of disco-compile")
    return data


# ---------------------------------------------------------------- reading

def load_bundle(out_dir: str | os.PathLike) -> Bundle:
    """Read and check the export directory `out_dir` (see the module docstring); BundleError if anything is off."""
    root = Path(out_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such directory; give the directory an export wrote")
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root}: no {MANIFEST}, so this is not an export directory (or an export that "
                          f"did not finish); {REEXPORT}")
    manifest_data = _read_json(root / MANIFEST, MANIFEST)
    _check_against_schema(manifest_data, "manifest", MANIFEST)
    manifest = Manifest.from_json(manifest_data)
    _check_files(root, manifest)

    schedule_data = _read_json(root / SCHEDULE, SCHEDULE)
    _check_against_schema(schedule_data, "schedule", SCHEDULE)
    schedule = Schedule.from_json(schedule_data)
    if manifest.nodes != schedule.nodes:
        raise BundleError(f"{MANIFEST} says {manifest.nodes} nodes, {SCHEDULE} says {schedule.nodes}; {REEXPORT}")
    check_schedule(schedule)
    unlisted = [st.file for p in schedule.programs for st in p if st.file not in manifest.files]
    if unlisted:
        raise BundleError(f"stage files not listed in {MANIFEST}, so their sha256 cannot be checked; "
                          f"{REEXPORT}:{listing(unlisted)}")
    check_stage_graphs(root, schedule)
    return Bundle(root=root.resolve(), schedule=schedule, manifest=manifest, schedule_hash=schedule_hash(schedule))


def _check_files(root: Path, manifest: Manifest) -> None:
    problems = []
    for rel, digest in sorted(manifest.files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in {MANIFEST} but missing; {REEXPORT} (or copy the whole directory)")
        elif _sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 mismatch, the file was changed after export; {REEXPORT}")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    problems += [f"{rel}: not listed in {MANIFEST}, so not part of this export; remove it or {REEXPORT}"
                 for rel in sorted(on_disk - set(manifest.files) - {MANIFEST})]
    if problems:
        raise BundleError(f"{root} is not the directory the export wrote:{listing(problems)}")


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
        raise BundleError(f"write_bundle: the stage files do not fit the schedule:{listing(problems)}")


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
