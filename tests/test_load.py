"""load_model, the loader disco-compile uses, called from Python: sources, the pickle rule, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from disco_compile import LoadedModel, ModelLoadError, load_model


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()


def test_state_dict_with_arch(tmp_path):
    model = torchvision.models.resnet18()
    path, other = tmp_path / "weights.pt", tmp_path / "ten_classes.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)  # as DataParallel saves it
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), other)
    described = load_model(path).description  # arch_match
    assert described.startswith(f"resnet18 (torchvision) with the state_dict in {path} (all 122 tensors match "
                                f"torchvision resnet18")
    with pytest.raises(ModelLoadError, match="shapes differ for fc.weight"):
        load_model(other, arch="resnet18")
    with pytest.raises(ModelLoadError, match="'resnet5000' is not a torchvision model name"):
        load_model(path, arch="resnet5000")
    loaded = load_model(path, arch="resnet18", input_shape=(1, 3, 32, 32))
    assert isinstance(loaded, LoadedModel) and loaded.shape == (1, 3, 32, 32) and not loaded.detector
    sd = loaded.model.state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded.example(), loaded.example())


def test_pickled_module_only_when_trusted(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny(), path)
    with pytest.raises(ModelLoadError, match="pass --trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True, input_shape=(1, 3, 16, 16))
    x = loaded.example()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), tiny()(x))
    assert loaded.description.startswith("Sequential pickled in")


def test_names_and_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="file not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="not a torchvision model name"):
        load_model("resnet5000")
    with pytest.raises(ModelLoadError, match="is not a file"):
        load_model(tmp_path)
