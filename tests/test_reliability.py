"""Issue 21, files, loaders and artifacts: nothing runs code it was not told to trust, nothing is deleted that
disco-compile did not write, and a bad file gets a named error (DiscoError) in bounded time.

One test (or a few) per item of the issue, each failing before its fix: payload files of each kind (.pt2,
.pt checkpoint, fine-tuning checkpoint) that must not run; --force on a folder that is not an export; `>f4`
inputs; ONNX external data; deep JSON, floats for integers, unreadable files; --output written atomically; the
schema checks in linear time; .npy headers and peers files that claim too much; leftovers of a killed export,
symbolic links inside an export, keygen and an existing folder's mode, NaN weights.
"""
from __future__ import annotations

import io
import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import external_data_helper

from disco_compile import BundleError, InputMismatch, ModelLoadError, load_model, run_local
from disco_compile.artifact.atomic import write_atomic
from disco_compile.artifact.bundle import load_bundle, write_bundle
from disco_compile.budget import finetuning
from disco_compile.errors import CheckpointMismatch
from disco_compile.runtime.net.keys import keygen
from disco_compile.runtime.net.peers import NetworkConfigError, load_peers
from disco_compile.runtime.stream import load_npy, read_arrays, write_arrays
from test_runtime import MODEL_HASH, RTOL, ATOL, inputs, rewrite_json, two_node, two_node_reference


class Payload:
    """Unpickled, it writes `marker`: a model file that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def two(tmp_path) -> Path:
    out = tmp_path / "two"
    write_bundle(out, *two_node(), MODEL_HASH)
    return out


def _program(path: Path) -> Path:
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 4),)), path)
    return path


def _with_member(src: Path, dst: Path, ending: str, content: bytes) -> Path:
    """`src` (a zip) copied to `dst` with the member whose name ends with `ending` replaced by `content`."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, content if info.filename.endswith(ending) else zin.read(info.filename))
    return dst


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- 1, 5: no code runs from a model or checkpoint

def test_pt2_payload_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    ok = _program(tmp_path / "ok.pt2")
    evil = _with_member(ok, tmp_path / "evil.pt2", "sample_inputs/model.pt", _pickled(Payload(marker)))
    with pytest.raises(ModelLoadError, match=r"evil.pt2 holds a pickled .*exec.*runs code.*--trust-pickle"):
        load_model(evil)
    assert not marker.exists()
    assert load_model(ok).shape == (1, 4)  # a plain program still loads


def test_pt2_with_pickled_constants_is_refused_before_reading(tmp_path):
    ok = _program(tmp_path / "ok.pt2")
    import zipfile
    with zipfile.ZipFile(ok, "a") as z:
        z.writestr("ok/data/constants/opaque_obj_0", b"whatever")
    with pytest.raises(ModelLoadError, match="holds pickled objects .*opaque_obj_0.*--trust-pickle"):
        load_model(ok)


def test_pt_checkpoint_payload_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": Payload(marker)}, path)
    with pytest.raises(ModelLoadError, match="pass --trust-pickle"):
        load_model(path)
    assert not marker.exists()


def test_resume_checkpoint_payload_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"fingerprint": {}, "step": Payload(marker)}, tmp_path / finetuning.CHECKPOINT)
    with pytest.raises(CheckpointMismatch, match=r"last.pt cannot be read .*weights_only=True.*exec"):
        finetuning._Checkpoints(tmp_path, {}).load()
    assert not marker.exists()


# ---------------------------------------------------------------- 2, 14: --force and leftovers

def test_force_replaces_only_an_export(two, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "photos").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(BundleError, match=r"thesis is not an export of disco-compile \(it has no manifest.json; "
                                          r"it holds thesis.tex\)"):
        write_bundle(thesis, *two_node(), MODEL_HASH, force=True)
    assert (thesis / "thesis.tex").read_text() == "years of work" and (thesis / "photos").is_dir()
    (two / "notes.txt").write_text("mine")  # an export the user added a file to
    with pytest.raises(BundleError, match="not an export of disco-compile .*holds what no export wrote: notes.txt"):
        write_bundle(two, *two_node(), MODEL_HASH, force=True)
    (two / "notes.txt").unlink()
    write_bundle(two, *two_node(), MODEL_HASH, force=True)
    assert load_bundle(two).schedule.nodes == 2


def test_leftovers_of_a_killed_export_are_removed_by_the_next(two):
    writing, old = two.parent / ".two.writing-0123abcd", two.parent / ".two.old-89abcdef"
    (writing / "node0").mkdir(parents=True)
    (writing / "node0" / "stage000.onnx").write_bytes(b"half")
    (writing / "schedule.json").write_text("{}")
    os.rename(two, old)  # killed between moving the old export aside and renaming the new one
    (two.parent / ".two.old-user").mkdir()  # not a name an export makes: kept
    write_bundle(two, *two_node(), MODEL_HASH)
    assert sorted(p.name for p in two.parent.iterdir()) == [".two.old-user", "two"]


def test_symlinked_directory_inside_an_export_is_not_followed(two, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    os.rename(two / "node1", elsewhere)
    os.symlink(elsewhere, two / "node1")
    with pytest.raises(BundleError, match="node1: a symbolic link; .*not followed"):
        load_bundle(two)


def test_keygen_leaves_an_existing_folders_mode(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    keygen(folder, 2)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "node0.key_secret").stat().st_mode) == 0o600
    keygen(tmp_path / "fresh", 2)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700


def test_nan_weights_of_a_pickled_module_are_named_at_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[1].running_var[1] = float("nan")
        model[1].running_mean[2] = float("inf")  # an infinite buffer can be a mask: not named
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match=r"model.pt: tensors with NaN or infinite values: 0.weight "
                                             r"\(parameter\), 1.running_var \(buffer\); the file is damaged"):
        load_model(tmp_path / "model.pt", trust_pickle=True, input_shape=(1, 3, 8, 8))


def test_resnet_state_dict_with_nan_is_named(tmp_path):
    import torchvision
    sd = torchvision.models.resnet18().state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ModelLoadError, match=r"layer1.0.conv1.weight \(parameter\)"):
        load_model(tmp_path / "w.pt", arch="resnet18", input_shape=(1, 3, 32, 32))


# ---------------------------------------------------------------- 4, 13: .npy records and input shapes

def test_big_endian_input_is_converted(two, tmp_path):
    x = inputs(3)
    np.save(tmp_path / "x.npy", x.astype(">f4"))
    loaded = load_npy(tmp_path / "x.npy")
    assert loaded.dtype == np.dtype("float32") and loaded.dtype.isnative and np.array_equal(loaded, x)
    stream = io.BytesIO()
    write_arrays(stream, [x.astype(">f4")])
    stream.seek(0)
    (streamed,) = read_arrays(stream)
    assert streamed.dtype.isnative and np.array_equal(streamed, x)
    np.testing.assert_allclose(run_local(two, loaded)[0], two_node_reference(x), rtol=RTOL, atol=ATOL)
    # an array given to the API as it is: onnxruntime would read its bytes as little-endian (1e36 and NaN)
    np.testing.assert_allclose(run_local(two, x.astype(">f4"))[0], two_node_reference(x), rtol=RTOL, atol=ATOL)


def _header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npy_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(_header((1, 3, 1_000_000, 1_000_000)) + b"\0" * 64)
    with pytest.raises(InputMismatch, match=r"huge.npy: its header claims shape \(1, 3, 1000000, 1000000\).*only 64 "
                                            r"bytes follow"):
        load_npy(path)
    stream = io.BytesIO(_header((1 << 30, 1 << 10)) + b"\0" * 64)  # 4 TiB claimed, 64 bytes sent
    with pytest.raises(InputMismatch, match="record 1 of the input stream: cut short, 64 of the"):
        list(read_arrays(stream))


@pytest.mark.parametrize("content", [b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}      \n", b"\x93NUMPY\x09\x00",
                                     b"not numpy at all", _header((2,), descr="|O") + b"\0" * 16,
                                     _header((-1, 2)) + b"\0" * 16])
def test_malformed_npy_headers_are_named(tmp_path, content):
    path = tmp_path / "bad.npy"
    path.write_bytes(content)
    with pytest.raises(InputMismatch, match="bad.npy"):
        load_npy(path)
    with pytest.raises(InputMismatch, match="record 1 of the input stream"):
        list(read_arrays(io.BytesIO(content)))


def test_huge_input_shape_is_refused_before_allocating():
    with pytest.raises(ModelLoadError, match=r"--input-shape 1,3,1000000,1000000 is 3e\+12 values"):
        load_model("resnet18", input_shape=(1, 3, 1_000_000, 1_000_000))


# ---------------------------------------------------------------- 6, 7: stage graphs and JSON files

def test_stage_graph_with_external_data_is_refused(two):
    stage = two / "node1" / "stage000.onnx"
    model = onnx.load(str(stage))
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w1.bin",
                                                        size_threshold=0)
    onnx.save(model, str(stage))
    (two / "node1" / "w1.bin").unlink()
    manifest = json.loads((two / "manifest.json").read_text())
    import hashlib
    manifest["files"]["node1/stage000.onnx"] = hashlib.sha256(stage.read_bytes()).hexdigest()
    (two / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"node1/stage000.onnx \(node 1 stage 0\): tensors .* are stored as ONNX "
                                          r"external data"):
        load_bundle(two)


@pytest.mark.parametrize("file", ["manifest.json", "schedule.json"])
def test_deeply_nested_json_is_named(two, file):
    (two / file).write_text("[" * 100_000 + "]" * 100_000)
    if file == "schedule.json":
        rewrite_json_hash(two, file)
    with pytest.raises(BundleError, match=rf"{file}: cannot be read as JSON \(nested too deeply\)"):
        load_bundle(two)
    (two / file).write_text("[" * 100 + "]" * 100)
    if file == "schedule.json":
        rewrite_json_hash(two, file)
    with pytest.raises(BundleError, match=rf"{file}: nested deeper than 32 levels"):
        load_bundle(two)


def rewrite_json_hash(out: Path, file: str) -> None:
    import hashlib
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][file] = hashlib.sha256((out / file).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("file, edit, where", [
    ("manifest.json", lambda d: d.update(nodes=2.0), "at nodes: 2.0 is not of type 'integer'"),
    ("schedule.json", lambda d: d.update(nodes=2.0), "at nodes: 2.0 is not of type 'integer'"),
    ("schedule.json", lambda d: d["messages"][0].update(src_stage=0.0), "at messages/0/src_stage"),
])
def test_integers_written_as_floats_are_refused(two, file, edit, where):
    if file == "schedule.json":
        rewrite_json(two / file, edit)
    else:
        data = json.loads((two / file).read_text())
        edit(data)
        (two / file).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=where):
        load_bundle(two)


@pytest.mark.parametrize("file", ["schedule.json", "node1/stage000.onnx", "manifest.json"])
def test_unreadable_files_are_named(two, file, monkeypatch):
    real_open = open
    target = str(two / file)

    def refusing(path, *args, **kwargs):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", refusing)
    monkeypatch.setattr(Path, "read_bytes", lambda self: refusing(self, "rb").read())
    with pytest.raises(BundleError, match=rf"{file}.*(cannot be read|Permission denied)"):
        load_bundle(two)


# ---------------------------------------------------------------- 10: --output written atomically

def test_output_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from disco_compile.cli import run as cli_run
    path = tmp_path / "y.npy"
    np.save(path, np.arange(3.0))
    real_save = np.save

    def disk_full(f, array, *args, **kwargs):
        f.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(Exception, match="No space left on device"):
        cli_run._save(path, ["y"], [np.ones(4)])
    monkeypatch.setattr(np, "save", real_save)
    assert np.array_equal(np.load(path), np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.npy"]
    write_atomic(path, lambda f: np.save(f, np.ones(2)))
    assert np.array_equal(np.load(path), np.ones(2))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- 11: the schema checks in linear time

def test_schema_rejects_one_bad_channel_among_20000_in_well_under_a_second(two):
    def edit(data):
        data["messages"][0]["channels"] = [*range(20_000), "x"]
    rewrite_json(two / "schedule.json", edit)
    start = time.perf_counter()
    with pytest.raises(BundleError, match=r"at messages/0/channels/20000: 'x' is not"):
        load_bundle(two)
    assert time.perf_counter() - start < 1.0

    def repeated(data):
        data["messages"][0]["channels"] = [*range(20_000), 7]
    rewrite_json(two / "schedule.json", repeated)
    with pytest.raises(BundleError, match=r"at messages/0/channels: the array of 20001 items has 7 more than once"):
        load_bundle(two)


# ---------------------------------------------------------------- 12: what the hashes guarantee

def test_readme_says_the_hashes_are_integrity_not_authenticity():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Security"):]
    assert "not authenticity" in section and "CURVE" in section


# ---------------------------------------------------------------- 13: peers files

@pytest.mark.parametrize("text, match", [
    (".inf: 10.0.0.1:5550\n", r"inf is not a node index"),
    ("0.0: 10.0.0.1:5550\n", r"0.0 is not a node index"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n0: [*d, *d, *d]\n",
     "uses YAML anchors or aliases"),
    ("0: " + "[" * 10 + "]" * 10 + "\n", "nested deeper than 2 levels"),
    ("0: " + "[" * 10_000 + "]" * 10_000 + "\n",
     r"not valid YAML \(while increasing flow level\s+exceeded maximum nesting depth"),
    ("0: [" + "1, " * 10_000 + "1]\n", r"node 0: \[1, 1, [1, ]*\.\.\. is not HOST:PORT"),
])
def test_bad_peers_files_are_named_briefly(tmp_path, text, match):
    path = tmp_path / "peers.yaml"
    path.write_text(text)
    with pytest.raises(NetworkConfigError, match=match) as caught:
        load_peers(path, 1)
    assert len(str(caught.value)) < 500
