"""State_dicts without --arch (frontend/arch_match.py): the one torchvision architecture whose keys and shapes
match, num_classes read off the shapes; several or none is a clear error; --num-classes and --arch-arg."""
from __future__ import annotations

import time

import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import assert_close
from disco_compile import run_local
from disco_compile.errors import ModelLoadError
from disco_compile.frontend import arch_index, arch_match
from disco_compile.cli.compile import main

SMALL = ["--input-shape", "1,3,64,64"]


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
           f"resnet18(num_classes=3))" in result.stdout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(out, [x.numpy()])[0]), model(x))


def test_matching_builds_only_the_candidates(resnet18_3):
    """The index narrows 82 architectures to those with the file's key hash: one here, built on meta."""
    _, path = resnet18_3
    sd = torch.load(path, weights_only=True)
    built = []
    real = arch_match._shapes
    start = time.perf_counter()
    found = arch_match.match(sd, str(path))
    seconds = time.perf_counter() - start
    assert (found.name, found.kwargs) == ("resnet18", {"num_classes": 3})
    arch_match._shapes = lambda name, kwargs: built.append(name) or real(name, kwargs)
    try:
        arch_match.match(sd, str(path))
    finally:
        arch_match._shapes = real
    assert built == ["resnet18", "resnet18"], built  # defaults, then num_classes=3
    assert seconds < 30, seconds  # far below building every architecture (about 30 s on meta); not a timing test


def test_several_matches_are_an_error(monkeypatch, resnet18_3):
    _, path = resnet18_3
    entry = next(e for e in arch_index.INDEX if e["name"] == "resnet18")
    monkeypatch.setattr(arch_index, "INDEX", [entry, {**entry, "kwargs": {"zero_init_residual": True}}])
    with pytest.raises(ModelLoadError, match=r"match several torchvision architectures: resnet18\(num_classes=3\), "
                                             r"resnet18\(zero_init_residual=True, num_classes=3\); say which"):
        arch_match.match(torch.load(path, weights_only=True), str(path))


def test_same_keys_other_shapes_name_the_difference(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ModelLoadError, match=r"matches no torchvision classification architecture: resnet18: 1 "
                                             r"shape\(s\) differ, e.g. conv1.weight \(file \(64, 3, 5, 5\), "
                                             r"resnet18 \(64, 3, 7, 7\)\)"):
        arch_match.match(sd, "weights.pt")


def test_index_is_torchvision_s():
    """The shipped index covers every torchvision classification architecture; spot-checked entries are as built."""
    names = {e["name"] for e in arch_index.INDEX}
    assert names == set(torchvision.models.list_models(module=torchvision.models))
    assert arch_index.TORCHVISION == torchvision.__version__.split("+")[0]
    for name, kwargs in (("resnet50", {}), ("googlenet", {"aux_logits": False}), ("mobilenet_v3_small", {})):
        keys = list(arch_match._shapes(name, kwargs))
        entry = next(e for e in arch_index.INDEX if e["name"] == name and e["kwargs"] == kwargs)
        assert (entry["count"], entry["hash"], entry["first"], entry["last"]) == \
            (len(keys), arch_match.key_hash(keys), keys[0], keys[-1])


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
