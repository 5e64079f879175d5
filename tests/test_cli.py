"""The disco-compile command: model sources, the printed report, JSON, and clear errors (exit code 2)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner

from conftest import assert_close
from disco_compile import Budget, transform
from disco_compile.frontend import zoo
from disco_compile.cli.compile import main

SMALL = ["--input-shape", "1,3,64,64"]  # resnet18 on 64x64 images: a whole torchvision model, fast on 2 cores
SCRIPT = Path(sys.executable).with_name("disco-compile")


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()


class RunsOnLoad:
    """Unpickling this calls os.makedirs(path): the code a pickled file can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.fixture(scope="module")
def resnet18_budget(tmp_path_factory):
    """resnet18 by name with --budget 0.2: the CLI result and its JSON report."""
    out = tmp_path_factory.mktemp("name") / "cost.json"
    result = invoke("resnet18", "--nodes", 2, "--budget", 0.2, *SMALL, "--json", out)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text()), out


def test_name_prints_table_and_ratios(resnet18_budget):
    result, _, _ = resnet18_budget
    out = result.stdout
    assert "resnet18 (torchvision), random weights (no pretrained weights are downloaded)" in out
    assert "input    1x3x64x64" in out
    for row in ("exchange bytes", "io bytes", "comm bytes", "MACs", "node 0:", "node 1:", "replicated ops"):
        assert row in out, f"table row {row!r} missing:\n{out}"
    ratio = float(re.search(r"exchange ratio  ([0-9.]+)", out).group(1))
    assert abs(ratio - 0.2) < 0.02, out
    assert "one-shot selection" in out and "fine-tuning" in out
    assert "tracing and splitting across 2 nodes ... done" in result.stderr


def test_budget_json(resnet18_budget):
    _, report, out = resnet18_budget
    assert report["nodes"] == 2
    assert report["run"] == {"model": "resnet18 (torchvision), random weights (no pretrained weights are downloaded)",
                             "input_shape": [1, 3, 64, 64], "nodes": 2, "node_weights": None, "budget": 0.2,
                             "align": 8, "allocation": "global", "compute_weight": 0.004, "wire": "fp32",
                             "submodule": None}
    assert abs(report["exchange_ratio"] - 0.2) < 0.02, report["exchange_ratio"]
    assert report["exchange_bytes"] < report["dense_exchange_bytes"]
    assert isinstance(report["replicated_ops"], list)
    assert os.listdir(out.parent) == ["cost.json"], "the temporary file was left behind"


def test_one_shot_budget_follows_allocation(tmp_path, resnet18_budget):
    """Without --data, --budget selects by weight magnitude with --allocation (default global): uniform keeps
    rho of every exchange, as DiscoModel.set_budget(Budget(rho, "uniform")) does; global ranks channels over the
    model."""
    from disco_compile import transform
    _, global_report, _ = resnet18_budget
    out = tmp_path / "cost.json"
    result = invoke("resnet18", "--nodes", 2, "--budget", 0.2, *SMALL, "--allocation", "uniform", "--json", out)
    assert result.exit_code == 0, result.output
    assert "each node keeps that fraction of the channels" in result.stdout
    uniform_report = json.loads(out.read_text())
    assert uniform_report["run"]["allocation"] == "uniform"
    model, x = zoo.build("resnet18", 64)
    dm = transform(model, 2, x)
    dm.set_budget(Budget(0.2, "uniform", align=8))
    assert uniform_report["macs_per_node"] == dm.cost().macs_per_node
    assert global_report["macs_per_node"] != uniform_report["macs_per_node"]


def test_compute_weight_reaches_the_selection(tmp_path):
    """--compute-weight W ranks channels by score per (bytes + W x MACs): the report is set_budget's with the
    same weight, its busier node computes less than with bytes alone, and a uniform allocation refuses it."""
    out = tmp_path / "cost.json"
    result = invoke("resnet18", "--nodes", 2, "--budget", 0.2, *SMALL, "--compute-weight", 0.5, "--json", out)
    assert result.exit_code == 0, result.output
    assert "score per (bytes + 0.5 x MACs at the destination, --compute-weight)" in result.stdout
    report = json.loads(out.read_text())
    assert report["run"]["compute_weight"] == 0.5
    model, x = zoo.build("resnet18", 64)
    dm = transform(model, 2, x)
    dm.set_budget(Budget(0.2, "global", align=8, compute_weight=0.5))
    assert report["macs_per_node"] == dm.cost().macs_per_node
    dm.set_budget(Budget(0.2, "global", align=8, compute_weight=0.0))
    assert max(report["macs_per_node"]) < max(dm.cost().macs_per_node)
    result = invoke("resnet18", "--nodes", 2, "--budget", 0.2, *SMALL, "--compute-weight", 0.5,
                    "--allocation", "uniform")
    assert result.exit_code == 2 and "use it with --allocation global" in result.output


@pytest.mark.parametrize("prefix", ["", "module."])
def test_state_dict_with_arch_costs_as_the_name(tmp_path, resnet18_budget, prefix):
    _, by_name, _ = resnet18_budget
    model, _ = zoo.build("resnet18", 64)  # the same weights the name gets
    path = tmp_path / "resnet18.pth"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    out = tmp_path / "cost.json"
    result = invoke(path, "--arch", "torchvision:resnet18", "--nodes", 2, "--budget", 0.2, *SMALL, "--json", out)
    assert result.exit_code == 0, result.output
    assert f"resnet18 (torchvision) with the state_dict in {path}" in result.stdout
    by_file = json.loads(out.read_text())
    assert by_file.pop("run")["model"] == f"resnet18 (torchvision) with the state_dict in {path}"
    assert by_file == {k: v for k, v in by_name.items() if k != "run"}


def test_pickled_module_needs_trust(tmp_path):
    model = tiny()
    marker = tmp_path / "code-ran"
    model.payload = RunsOnLoad(marker)
    path = tmp_path / "whole.pt"
    torch.save(model, path)

    refused = invoke(path, "--nodes", 2, "--input-shape", "1,3,16,16")
    assert refused.exit_code == 2
    assert "--trust-pickle" in refused.stderr and "runs code" in refused.stderr
    assert "--arch torchvision:NAME" in refused.stderr
    assert "Traceback" not in refused.output
    assert not marker.exists(), "the file's code ran without --trust-pickle"

    accepted = invoke(path, "--nodes", 2, "--input-shape", "1,3,16,16", "--trust-pickle")
    assert accepted.exit_code == 0, accepted.output
    assert "Sequential pickled in" in accepted.stdout and "exchange ratio  1.000" in accepted.stdout
    assert marker.exists()


def _state_dict_file(tmp_path: Path, sd: dict) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(sd, path)
    return path


def _exported_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(tiny().eval(), (torch.randn(1, 3, 8, 8),)), path)
    return path


BAD = {
    "budget above 1": (lambda tmp: ["resnet18", "--nodes", 2, "--budget", 1.5],
                       ["--budget", "between 0 and 1"]),
    "budget below 0": (lambda tmp: ["resnet18", "--nodes", 2, "--budget", -0.1],
                       ["--budget", "between 0 and 1"]),
    "zero nodes": (lambda tmp: ["resnet18", "--nodes", 0], ["--nodes", "at least 1"]),
    "missing file": (lambda tmp: [tmp / "nope.pt", "--nodes", 2], ["file not found", "nope.pt"]),
    "unknown name": (lambda tmp: ["resnet5000", "--nodes", 2],
                     ["'resnet5000'", "not a torchvision model name", "torchvision.models.list_models()"]),
    "state_dict without --arch": (lambda tmp: [_state_dict_file(tmp, tiny().state_dict()), "--nodes", 2],
                                  ["(4 tensors) matches no torchvision or timm classification architecture",
                                   "closest: torchvision alexnet (16 tensors, missing from the file:",
                                   "--arch torchvision:NAME"]),
    "mismatched keys": (lambda tmp: [_state_dict_file(tmp, tiny().state_dict()), "--nodes", 2,
                                     "--arch", "torchvision:resnet18"],
                        ["do not match torchvision resnet18", "missing from the file: conv1.weight",
                         "unexpected in the file: 0.weight, 0.bias, 2.weight, 2.bias"]),
    "mismatched shapes": (lambda tmp: [_state_dict_file(tmp, torchvision.models.resnet18(num_classes=10).state_dict()),
                                       "--nodes", 2, "--arch", "torchvision:resnet18"],
                          ["shapes differ for fc.weight (file (10, 512), resnet18 (1000, 512))"]),
    "arch without source": (lambda tmp: [_state_dict_file(tmp, tiny().state_dict()), "--nodes", 2,
                                         "--arch", "resnet18"], ["--arch", "expected torchvision:NAME"]),
    "unknown submodule": (lambda tmp: ["resnet18", "--nodes", 2, "--input-shape", "1,3,32,32",
                                       "--submodule", "layer9"], ["no submodule 'layer9'", "'layer1'"]),
    "detector whole": (lambda tmp: ["ssdlite320_mobilenet_v3_large", "--nodes", 2, "--input-shape", "1,3,64,64"],
                       ["ssdlite320_mobilenet_v3_large is a detection model", "--submodule backbone"]),
    "unknown leaf module": (lambda tmp: ["resnet18", "--nodes", 2, "--input-shape", "1,3,32,32",
                                         "--leaf-module", "layer9"], ["['layer9']", "--leaf-module NAME"]),
    "node weights per node": (lambda tmp: ["resnet18", "--nodes", 2, "--node-weights", "1,2,3"],
                              ["node_weights has 3 entries but nodes=2"]),
    "program with --arch": (lambda tmp: [_exported_file(tmp), "--nodes", 2, "--arch", "torchvision:resnet18"],
                            ["model.pt2 is a torch.export program", "--arch is only for state_dict files"]),
    "program, other shape": (lambda tmp: [_exported_file(tmp), "--nodes", 2, "--input-shape", "1,3,16,16"],
                             ["model.pt2 was exported for input shape 1,3,8,8", "not --input-shape 1,3,16,16"]),
    "unreadable program": (lambda tmp: [tmp / "notes.pt2", "--nodes", 2],
                           ["cannot read", "notes.pt2 as a torch.export program"]),
    "not a torch file": (lambda tmp: [tmp / "notes.pt", "--nodes", 2],
                         ["notes.pt cannot be read as a state_dict", "--trust-pickle"]),
    "not a torch file, trusted": (lambda tmp: [tmp / "notes.pt", "--nodes", 2, "--trust-pickle"],
                                  ["cannot read", "notes.pt", "unpickling it fully"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_error(tmp_path, case):
    (tmp_path / "notes.pt").write_text("not a model")
    (tmp_path / "notes.pt2").write_text("not a model")
    args, expected = BAD[case]
    result = invoke(*args(tmp_path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"


def test_exported_program_compiles_and_exports(tmp_path):
    from disco_compile import run_local
    path, out = _exported_file(tmp_path), tmp_path / "shards"
    result = invoke(path, "--nodes", 2, "--budget", 0.5, "--align", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"model    torch.export program {path}, layers raised to modules\n" in result.stdout
    assert "input    1x3x8x8" in result.stdout and "reading the torch.export program" in result.stderr
    x = torch.randn(1, 3, 8, 8)
    dm = transform(torch.export.load(path), 2, x).eval()
    dm.set_budget(Budget(0.5, "global", align=1))  # the command's settings: --budget 0.5 --align 1
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(out, [x.numpy()])[0]), dm(x))


def test_program_with_a_static_batch_is_not_fine_tuned(tmp_path):
    flat = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)).eval()
    path = tmp_path / "flat.pt2"
    torch.export.save(torch.export.export(flat, (torch.randn(1, 3, 16, 16),)), path)
    result = invoke(path, "--nodes", 2, "--data", _image_folder(tmp_path / "images"), "--steps", 2, "--workers", 0)
    assert result.exit_code == 2, result.output
    assert "computes batches of 1 only" in result.stderr and "dynamic_shapes=" in result.stderr


def test_detector_backbone():
    """A detector by name, its backbone split: the report covers the backbone (its export: test_submodule.py)."""
    result = invoke("fasterrcnn_mobilenet_v3_large_fpn", "--nodes", 2, "--submodule", "backbone",
                    "--input-shape", "1,3,128,128", "--budget", 0.5)
    assert result.exit_code == 0, result.output
    assert "a list of random images" in result.output and "split    submodule 'backbone' only" in result.output
    assert "fractions of the original submodule" in result.output
    ratio = float(re.search(r"exchange ratio  ([0-9.]+)", result.output).group(1))
    assert 0.45 <= ratio <= 0.5, result.output


def test_help_explains_every_option():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "disco-compile resnet50 --nodes 2 --budget 0.2" in result.stdout
    assert "disco-compile resnet50 --nodes 2 --budget 0.2 --out shards/" in result.stdout
    for option in ("--nodes", "--budget", "--input-shape", "--arch", "--trust-pickle", "--node-weights",
                   "--leaf-module", "--input-on-all-nodes", "--json", "--out", "--force", "--align", "--no-overlap"):
        assert option in result.stdout


def test_installed_script(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    ok = subprocess.run([SCRIPT, "resnet18", "--nodes", "2", *SMALL], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "comm bytes" in ok.stdout and "exchange ratio  1.000" in ok.stdout
    assert "building resnet18" in ok.stderr and "Traceback" not in ok.stderr

    bad = subprocess.run([SCRIPT, "resnet18", "--nodes", "2", "--budget", "2"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert bad.returncode == 2
    assert "between 0 and 1" in bad.stderr and "Traceback" not in bad.stderr


def _image_folder(root: Path, classes=("a", "b"), per_class: int = 6) -> Path:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{k}.png")
    return root


def test_finetune_then_export_and_resume(tmp_path):
    from disco_compile import run_local
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    args = [path, "--trust-pickle", "--nodes", 2, "--input-shape", "1,3,16,16", "--budget", 0.5, "--data", data,
            "--steps", 4, "--batch-size", 4, "--workers", 0, "--val-fraction", 0.25]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "fine-tuned 4 steps at budget 0.5; validation agreement with the teacher %" in result.stdout
    assert "fine-tuning on 9 images" in result.stderr
    ckpt = tmp_path / "shards.ckpt" / "last.pt"
    assert ckpt.exists() and (out / "manifest.json").exists()
    x = torch.randn(2, 3, 16, 16)
    assert run_local(out, [x.numpy()])[0].shape == (2, 4)

    resumed = invoke(*args[:-6], "--steps", 6, "--batch-size", 4, "--workers", 0, "--val-fraction", 0.25,
                     "--checkpoint-dir", tmp_path / "shards.ckpt", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(ckpt, weights_only=False)["step"] == 6
    other = invoke(*args[:3], 3, *args[4:], "--checkpoint-dir", tmp_path / "shards.ckpt", "--resume")
    assert other.exit_code == 2 and "nodes: checkpoint 2 vs now 3" in other.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = invoke(*args[:9], empty, "--steps", 2)
    assert refused.exit_code == 2 and "holds no images" in refused.stderr
    lone = invoke(*args[:8], "--resume")
    assert lone.exit_code == 2 and "give --data DIR" in lone.stderr
