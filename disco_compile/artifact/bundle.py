"""Export directories: writing them whole or not at all, and reading them back checked.

An export directory OUT holds

    manifest.json   format version, model hash, node count, sha256 of every other file
    schedule.json   the Schedule (disco_compile/artifact/schedule.py states its semantics)
    node{k}/...     the ONNX graph of each stage of node k

`write_bundle` writes into a temporary sibling of OUT, reads the result back
with `load_bundle`, and only then renames it into place, so OUT is never
half-written and an invalid export is never written at all. `load_bundle`
trusts nothing on disk: it checks both JSON files against the JSON Schemas in
disco_compile/artifact/schemas/ (an integer is a JSON number without a fraction or exponent: `2.0` is
refused; nesting deeper than MAX_DEPTH is refused before any check recurses; every keyword runs in time
linear in the file), every file's sha256 (regular files only: a symbolic link anywhere inside OUT is
refused, never followed), the schedule's consistency and that every stage graph declares the names, dtypes
and shapes the schedule says and holds its weights itself, without ONNX external data
(`check_schedule`, `check_stage_graphs`: checks.py). The schedule hash (sha256 of the canonical
schedule.json bytes) tags every message at run time, so nodes that hold
different exports refuse each other's messages.

The hashes guard against accidents (a truncated copy, a changed file), not against someone who edits a
file and recomputes its sha256: they are integrity, not authenticity (README, "Security").

`force` replaces only an earlier export: a directory whose manifest.json reads and follows its schema and
that holds nothing the manifest does not list. The temporary siblings a killed export leaves
(.OUT.writing-*, .OUT.old-*, holding only files an export writes) are removed by the next export to OUT.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path

from jsonschema import Draft202012Validator, ValidationError, validators

from ..errors import BundleError
from .checks import REEXPORT, SCHEDULE, check_schedule, check_stage_graphs, listing
from .schedule import FORMAT_VERSION, Manifest, Schedule, Stage

MANIFEST = "manifest.json"
MAX_DEPTH = 32  # JSON nesting read; the formats nest 6 deep
_EXPORT_FILE = re.compile(r"(manifest\.json|schedule\.json|[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\.onnx)")


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked export directory; `held`: the nodes whose stage files it holds (a device may hold
    only its own nodeK/, with manifest.json and schedule.json)."""
    root: Path
    schedule: Schedule
    manifest: Manifest
    schedule_hash: str
    held: tuple[int, ...]

    def require(self, *nodes: int) -> None:
        """BundleError unless this directory holds the stage files of every node in `nodes`."""
        absent = [k for k in nodes if k not in self.held]
        if absent:
            folders = ", ".join(sorted({Path(st.file).parts[0] for k in absent for st in self.schedule.programs[k]}))
            raise BundleError(f"{self.root} holds the stage files of node(s) {list(self.held)} only, and node(s) "
                              f"{absent} are needed here: copy {folders} from the export (a run with every node "
                              f"on one machine, --simulate, needs the whole directory)")

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

def _hashable(value):
    """A JSON value as a hashable key, equal for values JSON Schema calls equal (1 and 1.0; not true and 1)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, list):
        return ("array", tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _hashable(v)) for k, v in value.items()))
    return ("scalar", value)


def _unique_items(validator, unique, instance, schema):
    """uniqueItems in linear time (jsonschema's own compares every pair once the items do not sort: 65 s for
    one string among 20,000 channel ids)."""
    if unique and validator.is_type(instance, "array") and len({_hashable(v) for v in instance}) != len(instance):
        seen, repeated = set(), None
        for v in instance:
            key = _hashable(v)
            if key in seen:
                repeated = v
                break
            seen.add(key)
        yield ValidationError(f"the array of {len(instance)} items has {repeated!r} more than once")


_WHOLE = {"type": "integer", "minimum": 0}


def _items(validator, items, instance, schema):
    """items; an array of whole numbers >= 0 (channel ids) in one pass, instead of one validator descent per
    item (1.0 s of ResNet-50's 1.4 s load: 16,612 channel ids)."""
    if items != _WHOLE or not validator.is_type(instance, "array"):
        yield from Draft202012Validator.VALIDATORS["items"](validator, items, instance, schema)
        return
    bad = next((i for i, v in enumerate(instance) if type(v) is not int or v < 0), None)
    if bad is not None:
        yield ValidationError(f"{instance[bad]!r} is not a whole number at least 0", path=[bad])


_Strict = validators.extend(
    Draft202012Validator, {"uniqueItems": _unique_items, "items": _items},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)))


@cache
def _validator(kind: str) -> Draft202012Validator:
    """The JSON Schema of `kind`, integers strict (no 2.0) and uniqueItems linear."""
    text = (resources.files("disco_compile.artifact") / "schemas" / f"{kind}.schema.json").read_text()
    return _Strict(json.loads(text))


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


def _depth(data) -> int:
    """How deep `data` (parsed JSON) nests; counted without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _read_json(path: Path, file: str):
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions, or "
                          f"{REEXPORT}") from exc
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BundleError(f"{file}: cannot be read as JSON ({reason}); {REEXPORT}") from exc
    if _depth(data) > MAX_DEPTH:
        raise BundleError(f"{file}: nested deeper than {MAX_DEPTH} levels, which no export writes; {REEXPORT}")
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise BundleError(f"{file}: format version {data['format_version']!r}, but this disco-compile reads "
                          f"version {FORMAT_VERSION}; re-export with this version of disco-compile")
    return data


# ---------------------------------------------------------------- reading

def load_bundle(out_dir: str | os.PathLike, *, graphs: bool = True) -> Bundle:
    """Read and check the export directory `out_dir` (see the module docstring); BundleError if anything is off.

    Every file it holds is checked; the stage files of a node it does not hold at all are not required
    (`Bundle.held`, `Bundle.require`), a node's files held in part are refused. `graphs` False: the stage graphs
    are hash-checked but not parsed (what `disco-run info` needs, without importing onnx)."""
    root = Path(out_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such directory; give the directory an export wrote")
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root}: no {MANIFEST}, so this is not an export directory (or an export that "
                          f"did not finish); {REEXPORT}")
    manifest_data = _read_json(root / MANIFEST, MANIFEST)
    _check_against_schema(manifest_data, "manifest", MANIFEST)
    manifest = Manifest.from_json(manifest_data)
    absent = _check_files(root, manifest)

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
    held = _held_nodes(root, schedule, absent)
    if graphs:
        check_stage_graphs(root, schedule, held)
    return Bundle(root=root.resolve(), schedule=schedule, manifest=manifest, schedule_hash=schedule_hash(schedule),
                  held=held)


def _held_nodes(root: Path, schedule: Schedule, absent: set[str]) -> tuple[int, ...]:
    """The nodes none of whose stage files are in `absent` (the folders `_check_files` found missing whole);
    BundleError when there is none."""
    held = tuple(k for k, program in enumerate(schedule.programs) if not {st.file for st in program} & absent)
    if not held:
        raise BundleError(f"{root} holds no node's stage files: copy at least one nodeK/ folder of the export "
                          f"(or {REEXPORT})")
    return held


def _walk(root: Path) -> tuple[set[str], list[str]]:
    """The files under `root` (relative, '/'-separated), and problems: symbolic links (never followed) and
    folders that cannot be listed."""
    files, problems = set(), []

    def unreadable(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot be listed ({exc.strerror or exc})")
    for folder, dirs, names in os.walk(root, onerror=unreadable):
        for name in dirs + names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                problems.append(f"{rel}: a symbolic link; an export holds regular files only, and links are "
                                f"not followed: copy what it points to instead")
            elif name in names:
                files.add(rel)
    return files, problems


def _check_files(root: Path, manifest: Manifest) -> set[str]:
    """Every file under `root` listed in the manifest and matching its sha256, but whole folders missing (the
    nodeK/ of nodes this directory does not hold); the files of those folders."""
    on_disk, problems = _walk(root)
    missing = {rel for rel in manifest.files if rel not in on_disk and not (root / rel).is_symlink()}
    folder = {rel: rel.split("/")[0] for rel in manifest.files if "/" in rel}
    whole = {f for f in set(folder.values()) if all(r in missing for r, g in folder.items() if g == f)}
    absent = {rel for rel in missing if folder.get(rel) in whole}
    for rel, digest in sorted(manifest.files.items()):
        path = root / rel
        if rel in absent:
            continue
        if rel in missing and rel in folder:
            problems.append(f"{rel}: listed in {MANIFEST} but missing, while other files of {folder[rel]}/ are "
                            f"here; copy the whole {folder[rel]}/ folder (or {REEXPORT})")
            continue
        if rel not in on_disk or not stat.S_ISREG(path.lstat().st_mode):
            problems.append(f"{rel}: listed in {MANIFEST} but missing (or not a regular file); {REEXPORT} "
                            f"(or copy the whole directory)")
            continue
        try:
            changed = _sha256_file(path) != digest
        except OSError as exc:
            problems.append(f"{rel}: cannot be read ({exc.strerror or exc}); check its permissions")
            continue
        if changed:
            problems.append(f"{rel}: sha256 mismatch, the file was changed after export; {REEXPORT}")
    problems += [f"{rel}: not listed in {MANIFEST}, so not part of this export; remove it or {REEXPORT}"
                 for rel in sorted(on_disk - set(manifest.files) - {MANIFEST})]
    if problems:
        raise BundleError(f"{root} is not the directory the export wrote:{listing(problems)}")
    return absent


# ---------------------------------------------------------------- writing

def write_bundle(out_dir: str | os.PathLike, schedule: Schedule, stage_files: Mapping[str, bytes],
                 model_hash: str, *, force: bool = False, settings: dict | None = None,
                 layers: list[dict] | None = None) -> Manifest:
    """Write the export directory `out_dir`: schedule.json, every stage file, then manifest.json (with
    `settings` and `layers`, what made the export and its per-layer records, when given).

    `stage_files` maps paths relative to `out_dir` ("node0/stage000.onnx") to
    file contents; every stage of the schedule needs its file. `model_hash` is
    the sha256 (hex) of the source model. An existing non-empty `out_dir` is
    refused unless `force` and it is an earlier export (`refuse_existing`);
    leftovers of a killed export to `out_dir` are removed. Everything is written into a temporary sibling
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
                        files=files, created_by=f"disco-compile {_version()}", settings=settings, layers=layers)
    _check_against_schema(manifest.to_json(), "manifest", MANIFEST)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
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
    """Refuse to write into an existing non-empty directory unless `force` and it is an earlier export
    (`_not_an_export`); checked again when writing."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"{out} exists and is not a directory; choose another output directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise BundleError(f"{out} already exists and is not empty; choose another output directory, or pass "
                          f"--force (force=True) to replace it")
    problem = _not_an_export(out)
    if problem:
        raise BundleError(f"{out} is not an export of disco-compile ({problem}), so --force (force=True) does "
                          f"not replace it: choose another output directory, or move what is in it away first")


def _not_an_export(out: Path) -> str | None:
    """Why the directory `out` is not an earlier export (None if it is): its manifest.json must read and follow
    its schema, and it must hold nothing the manifest does not list. Hashes are not checked: a damaged export
    is still one."""
    on_disk, problems = _walk(out)
    if MANIFEST not in on_disk:
        return f"it has no {MANIFEST}; it holds {_few(sorted(on_disk) or ['only empty folders'])}"
    try:
        data = _read_json(out / MANIFEST, MANIFEST)
        _check_against_schema(data, "manifest", MANIFEST)
    except BundleError as exc:
        return f"its {MANIFEST} is not valid: {str(exc).splitlines()[0]}"
    foreign = sorted(on_disk - set(data["files"]) - {MANIFEST})
    if problems or foreign:
        return f"it holds what no export wrote: {_few(problems + foreign)}"
    return None


def _few(items: list[str]) -> str:
    """The first few of `items` on one line."""
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def _remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` a killed export left (.OUT.writing-*, .OUT.old-*), where they
    hold only files an export writes; returns those removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(writing|old)-[0-9a-f]{{8}}")
    removed = []
    for path in out.parent.iterdir():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        files, problems = _walk(path)
        if not problems and all(_EXPORT_FILE.fullmatch(rel) for rel in files):
            shutil.rmtree(path)
            removed.append(path)
    return removed


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
