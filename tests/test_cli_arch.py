"""State_dicts without --arch (frontend/arch_match.py): the one torchvision or timm architecture whose keys and
shapes match, num_classes read off the shapes, nothing built to match; several or none is a clear error; the
shipped index is what tools/arch_index.py makes; --arch timm:NAME, --num-classes and --arch-arg."""
from __future__ import annotations

import importlib.util
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import assert_close
from disco_compile import run_local
from disco_compile.errors import ModelLoadError
from disco_compile.frontend import arch_match
from disco_compile.cli.compile import main

SMALL = ["--input-shape", "1,3,64,64"]
TOOLS = Path(__file__).resolve().parent.parent / "tools"
# timm's resnetblur18 (blur pooling, no parameter of its own) has resnet18's tensors: the reason names it
BLUR18 = "; so do timm:resnetblur18, other networks: --arch picks one" if find_spec("timm") else ""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def resnet18_3(tmp_path_factory):
    """A 3-class ResNet-18 (eval mode, seeded) and its state_dict file."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path_factory.mktemp("arch") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_three_class_resnet18_exports_without_arch(tmp_path, resnet18_3):
    model, path = resnet18_3
    out = tmp_path / "shards"
    result = invoke(path, "--nodes", 2, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"resnet18 (torchvision) with the state_dict in {path} (all 122 tensors match torchvision " \
           f"resnet18(num_classes=3){BLUR18})" in result.stdout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(out, [x.numpy()])[0]), model(x))


def test_matching_builds_nothing(resnet18_3, monkeypatch):
    """The index holds each architecture's key and shape hashes and head: nothing is built to match (resnet50,
    resnext50_32x4d and wide_resnet50_2 share their keys and are told apart by the shape hash)."""
    _, path = resnet18_3
    sd = torch.load(path, weights_only=True)
    monkeypatch.setattr(arch_match, "build", lambda *a, **k: pytest.fail(f"built {a} to match"))
    found = arch_match.match(sd, str(path))
    assert (found.source, found.name, found.kwargs) == ("torchvision", "resnet18", {"num_classes": 3})
    for name in ("resnext50_32x4d", "wide_resnet50_2"):
        with torch.device("meta"):
            sd = getattr(torchvision.models, name)().state_dict()
        assert arch_match.match(sd, "w.pt").name == name


def fake_index(monkeypatch, torchvision_entries, timm_entries=()):
    index = {"torchvision": {"version": arch_match.installed("torchvision"), "entries": list(torchvision_entries)},
             "timm": {"version": arch_match.installed("timm"), "entries": list(timm_entries)}}
    monkeypatch.setattr(arch_match, "index", lambda: index)


def entry(source, name):
    return next(e for e in arch_match.index()[source]["entries"] if e["name"] == name and not e["kwargs"])


def test_several_matches_are_an_error(monkeypatch, resnet18_3):
    _, path = resnet18_3
    resnet18 = entry("torchvision", "resnet18")
    fake_index(monkeypatch, [resnet18, {**resnet18, "kwargs": {"zero_init_residual": True}}])
    with pytest.raises(ModelLoadError, match=r"match several torchvision architectures: resnet18\(num_classes=3\), "
                                             r"resnet18\(zero_init_residual=True, num_classes=3\); say which with "
                                             r"--arch torchvision:NAME"):
        arch_match.match(torch.load(path, weights_only=True), str(path))


def test_torchvision_is_asked_before_timm(monkeypatch, resnet18_3):
    """timm's resnet18 has torchvision's keys and shapes (the same network): the torchvision match decides."""
    pytest.importorskip("timm")
    _, path = resnet18_3
    resnet18 = entry("torchvision", "resnet18")
    fake_index(monkeypatch, [resnet18], [resnet18, {**resnet18, "name": "resnet18_again"}])
    assert arch_match.match(torch.load(path, weights_only=True), str(path)).source == "torchvision"
    fake_index(monkeypatch, [], [resnet18, {**resnet18, "name": "resnet18_again"}])
    with pytest.raises(ModelLoadError, match=r"match several timm architectures: resnet18\(num_classes=3\), "
                                             r"resnet18_again\(num_classes=3\)"):
        arch_match.match(torch.load(path, weights_only=True), str(path))


def test_same_keys_other_shapes_name_the_difference(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ModelLoadError, match=r"matches no torchvision( or timm)? classification architecture: "
                                             r"torchvision resnet18: 1 shape\(s\) differ, e.g. conv1.weight "
                                             r"\(file \(64, 3, 5, 5\), resnet18 \(64, 3, 7, 7\)\)"):
        arch_match.match(sd, "weights.pt")


def test_other_keys_name_the_closest():
    sd = {"encoder.weight": torch.zeros(8, 3), "decoder.weight": torch.zeros(3, 8)}
    with pytest.raises(ModelLoadError, match=r"matches no torchvision( or timm)? classification architecture: none "
                                             r"has these key names; closest: \w+ \S+ \(\d+ tensors, missing from "
                                             r"the file: .*; say which with --arch"):
        arch_match.match(sd, "weights.pt")


def load_generator():
    spec = importlib.util.spec_from_file_location("arch_index_tool", TOOLS / "arch_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_is_torchvision_s():
    """The shipped index covers every torchvision classification architecture; spot-checked entries are as the
    generator (tools/arch_index.py) makes them now, so an index made with other code or versions fails here."""
    section = arch_match.index()["torchvision"]
    assert {e["name"] for e in section["entries"]} == set(torchvision.models.list_models(module=torchvision.models))
    assert section["version"] == arch_match.installed("torchvision") and not section["skipped"]
    tool = load_generator()
    for name, kwargs in (("resnet50", {}), ("googlenet", {"aux_logits": False}), ("mobilenet_v3_small", {})):
        shipped = next(e for e in section["entries"] if e["name"] == name and e["kwargs"] == kwargs)
        assert tool.torchvision_entry(name, kwargs) == shipped


@pytest.mark.skipif(arch_match.installed("timm") != arch_match.index()["timm"]["version"],
                    reason=f"timm {arch_match.installed('timm')} is not the {arch_match.index()['timm']['version']} "
                           f"indexed ([test] takes timm>=1.0): python tools/arch_index.py --source timm")
def test_index_is_timm_s():
    """Every timm architecture is indexed or listed as skipped with its reason; spot-checked entries are as built."""
    timm = pytest.importorskip("timm")
    section = arch_match.index()["timm"]
    indexed = {e["name"] for e in section["entries"]}
    assert indexed | set(section["skipped"]) == set(timm.list_models()) and len(indexed) > 1300
    tool = load_generator()
    for name in ("resnet10t", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"):
        shipped = next(e for e in section["entries"] if e["name"] == name)
        assert tool.timm_entry(name, {}) == shipped
    assert set(entry("timm", "deit_tiny_distilled_patch16_224")["head"]) == {"head.weight", "head.bias",
                                                                              "head_dist.weight", "head_dist.bias"}


def test_timm_state_dict_exports_without_arch(tmp_path):
    """A timm architecture torchvision does not have (resnet10t's deep stem), 3 classes: matched, built, exact."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    path, out = tmp_path / "resnet10t.pt", tmp_path / "shards"
    torch.save(model.state_dict(), path)
    result = invoke(path, "--nodes", 2, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    count = len(model.state_dict())
    assert f"resnet10t (timm) with the state_dict in {path} (all {count} tensors match timm " \
           f"resnet10t(num_classes=3))" in result.stdout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(out, [x.numpy()])[0]), model(x))


def test_arch_timm(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "t.pt"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=5).state_dict(), path)
    result = invoke(path, "--arch", "timm:resnet10t", "--num-classes", 5, "--nodes", 2, *SMALL)
    assert result.exit_code == 0, result.output
    assert f"resnet10t (timm) with the state_dict in {path}\n" in result.stdout
    result = invoke(path, "--arch", "timm:no_such_net", "--nodes", 2)
    assert result.exit_code == 2 and "'no_such_net' is not a timm model name" in result.stderr, result.output
    result = invoke(path, "--arch", "keras:resnet10t", "--nodes", 2)
    assert result.exit_code == 2 and "expected torchvision:NAME or timm:NAME" in result.stderr, result.output


@pytest.mark.parametrize("flags", [["--num-classes", 10], ["--arch-arg", "num_classes=10"]])
def test_constructor_arguments_with_arch(tmp_path, flags):
    path = tmp_path / "ten.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    result = invoke(path, "--arch", "torchvision:resnet18", *flags, "--nodes", 2, *SMALL)
    assert result.exit_code == 0, result.output
    assert f"resnet18 (torchvision) with the state_dict in {path}\n" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--arch-arg", "no_such_argument=1"], "cannot be built with {'no_such_argument': 1}"),
    (["--arch-arg", "=1"], "expected KEY=VALUE"),
])
def test_bad_constructor_arguments(tmp_path, args, expected):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    result = invoke(path, "--arch", "torchvision:resnet18", *args, "--nodes", 2, *SMALL)
    assert result.exit_code == 2 and expected in result.stderr, result.output


def test_num_classes_is_for_files():
    result = invoke("resnet18", "--num-classes", 3, "--nodes", 2)
    assert result.exit_code == 2 and "build the architecture of a state_dict file" in result.stderr
