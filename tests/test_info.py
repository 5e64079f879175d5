"""What an export records and shows: settings and per-layer records in manifest.json, `disco-run info` (text,
JSON, plot), readable ONNX stage graphs, and a device holding one node's files only."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from disco_compile import Budget, BundleError, export, run_local, transform
from disco_compile.artifact.bundle import load_bundle
from disco_compile.cli.info import info
from disco_compile.runtime import NodeExecutor, run_bundle
from disco_compile.artifact.info import InfoError, plot, summarize
from disco_compile.runtime.net.network import DiscoClient, free_ports, node_command

SETTINGS = {"model": {"description": "test net", "source": "net.pt", "input_shape": [1, 3, 8, 8]},
            "budget": {"rho": 0.5, "allocation": "uniform", "align": 1, "compute_weight": 0.0},
            "finetune": {"steps": 7, "data": "images/", "quality": {"metric": "top1", "student": 0.5}}}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)) + x)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Block(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "out"
    dm = transform(net(), 2, torch.randn(1, 3, 8, 8))
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    export(dm, out, settings=SETTINGS)
    return out, dm


def test_manifest_records_settings_and_layers(made):
    out, dm = made
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"] == {"nodes": 2, "node_weights": None, "overlap": True, **SETTINGS}
    names = [row["name"] for row in manifest["layers"]]
    assert names[:2] == ["0", "1"] and "2.conv1" in names and names[-1] == "4"
    cost = dm.cost()
    assert [sum(row["macs"][j] for row in manifest["layers"]) for j in range(2)] == cost.macs_per_node
    assert sum(sum(map(sum, row["sent"])) for row in manifest["layers"]) == cost.exchange_bytes


def test_info_text_and_json(made, tmp_path):
    out, dm = made
    result = CliRunner().invoke(info, [str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "model     test net, input 1x3x8x8" in text
    assert "budget    rho 0.5, allocation uniform, align 1, compute weight 0" in text
    assert "finetuned 7 steps on images/; measured metric top1, student 0.5" in text
    assert "2.conv1" in text and "Conv2d" in text and "total (exchange)" in text
    as_json = CliRunner().invoke(info, [str(out), "--json", "-"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    schedule = json.loads((out / "schedule.json").read_text())
    io = sum(m["bytes"] for m in schedule["messages"] if m["kind"] in ("input", "output"))
    assert data["io_bytes"] == io and data["total_exchange_bytes"] == dm.cost().exchange_bytes
    assert data["macs_per_node"] == dm.cost().macs_per_node
    assert f"{io / (io + data['total_exchange_bytes']):.0%} of the" in text
    to_file = CliRunner().invoke(info, [str(out), "--json", str(tmp_path / "info.json")])
    assert to_file.exit_code == 0 and to_file.output.startswith("export    ")
    assert json.loads((tmp_path / "info.json").read_text()) == data


def test_info_plot(made, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = made
    result = CliRunner().invoke(info, [str(out), "--plot", str(tmp_path / "split.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "split.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_install(made, tmp_path, monkeypatch):
    out, _ = made
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(InfoError, match=r"pip install 'disco-compile\[plot\]'"):
        plot(summarize(load_bundle(out)), tmp_path / "split.png")


def test_info_refuses_a_changed_export(made, tmp_path):
    out, _ = made
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stage = next((copy / "node1").iterdir())
    stage.write_bytes(stage.read_bytes() + b"\0")
    result = CliRunner().invoke(info, [str(copy)])
    assert result.exit_code == 2 and "sha256 mismatch" in result.output


# ---------------------------------------------------------------- readable ONNX

def test_stage_graphs_are_named_after_modules(made):
    out, _ = made
    names, props = set(), []
    for path in sorted(out.glob("node*/*.onnx")):
        model = onnx.load(str(path))
        names |= {n.name for n in model.graph.node}
        props.append({p.key: p.value for p in model.metadata_props})
        assert model.doc_string.startswith(f"DISCO node {path.parent.name[4:]}, stage ")
    assert "/2/conv1/Conv" in names and "/0/Conv" in names and any(n.startswith("/4/") for n in names)
    manifest = json.loads((out / "manifest.json").read_text())
    for p in props:
        assert p["disco.model_hash"] == manifest["model_hash"] and json.loads(p["disco.settings"])["nodes"] == 2
    assert {p["disco.node"] for p in props} == {"0", "1"}


# ---------------------------------------------------------------- one node's files per device

def node_dir(out: Path, dest: Path, node: int) -> Path:
    """What a device holding node `node` gets: nodeK/, manifest.json and schedule.json."""
    dest.mkdir()
    shutil.copytree(out / f"node{node}", dest / f"node{node}")
    for name in ("manifest.json", "schedule.json"):
        shutil.copy(out / name, dest / name)
    return dest


def test_one_node_directory_loads_and_refuses_the_rest(made, tmp_path):
    out, _ = made
    only1 = node_dir(out, tmp_path / "only1", 1)
    bundle = load_bundle(only1)
    assert bundle.held == (1,)
    with pytest.raises(BundleError, match=r"node\(s\) \[0\] are needed here: copy node0"):
        run_bundle(bundle, [np.zeros((1, 3, 8, 8), np.float32)])
    with pytest.raises(BundleError, match="copy node0"):
        NodeExecutor(bundle, 0, None)
    stage = sorted((only1 / "node1").iterdir())[0]
    stage.unlink()
    with pytest.raises(BundleError, match=r"while other files of node1/ are here; copy the whole node1/ folder"):
        load_bundle(only1)


def test_one_node_directory_checks_what_it_holds(made, tmp_path):
    out, _ = made
    only0 = node_dir(out, tmp_path / "only0", 0)
    stage = sorted((only0 / "node0").iterdir())[-1]
    stage.write_bytes(stage.read_bytes()[:-1])
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(only0)
    (only0 / "schedule.json").unlink()
    with pytest.raises(BundleError, match="schedule.json: listed in manifest.json but missing"):
        load_bundle(only0)


def test_two_devices_each_with_its_own_node(made, tmp_path):
    """Node 1 as a process holding node1/ only, node 0 (DiscoClient) holding node0/ only: run_local's outputs."""
    out, _ = made
    peers = tmp_path / "peers.yaml"
    peers.write_text("".join(f"{k}: 127.0.0.1:{port}\n" for k, port in enumerate(free_ports(2))))
    dir0, dir1 = node_dir(out, tmp_path / "dev0", 0), node_dir(out, tmp_path / "dev1", 1)
    with open(tmp_path / "node1.log", "wb") as log:
        proc = subprocess.Popen(node_command(dir1, 1, peers, insecure=True, timeout=10.0, connect_timeout=30.0),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
        with DiscoClient(dir0, peers, insecure=True, timeout=10.0, connect_timeout=30.0) as client:
            got = client(x)
        np.testing.assert_array_equal(got[0], run_local(out, x)[0], strict=True)
        assert proc.wait(30) == 0, (tmp_path / "node1.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- settings from the command line

def test_compile_records_its_settings_and_the_finetuning(tmp_path):
    """disco-compile --data ... --out: manifest.json holds the model file's sha256, the budget and what the
    fine-tuning measured, and disco-run info shows them."""
    import hashlib

    from PIL import Image

    from disco_compile.cli.compile import main as compile_main
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for k in range(6):
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{k}.png")
    out = tmp_path / "shards"
    args = [path, "--trust-pickle", "--nodes", 2, "--input-shape", "1,3,16,16", "--budget", 0.5, "--data",
            tmp_path / "images", "--steps", 3, "--batch-size", 4, "--workers", 0, "--out", out]
    result = CliRunner().invoke(compile_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["model"]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert settings["model"]["input_shape"] == [1, 3, 16, 16] and settings["nodes"] == 2
    assert settings["budget"] == {"rho": 0.5, "allocation": "global", "align": 8, "compute_weight": 0.004}
    tuned = settings["finetune"]
    assert tuned["steps"] == 3 and tuned["data"] == str(tmp_path / "images")
    assert tuned["quality"]["metric"] and isinstance(tuned["quality"]["student"], float)
    shown = CliRunner().invoke(info, [str(out)])
    assert shown.exit_code == 0 and f"finetuned 3 steps on {tmp_path / 'images'}; measured" in shown.output
