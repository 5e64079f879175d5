"""The torchvision examples run: each script's main on its cheapest configuration.

Every example exports its shards, runs them with onnxruntime and compares them with the DISCO model
in PyTorch; here those comparisons must hold at the fp32 tolerances, and the cost report must be
printed. The scripts are not a package: their folder goes on sys.path (for their `_pipeline`
helper) and each is loaded from its file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import assert_close

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# (script, arguments, comparisons checked). A detector's detections go through top-k and NMS, which
# random weights make ill-conditioned (test_submodule.py): only its backbone outputs (the first) are checked.
CASES = [
    ("classify_resnet50", ["--size", "64"], slice(None)),
    ("vit", ["--model", "vit_b_32", "--size", "32"], slice(None)),
    ("segmentation", ["--model", "lraspp_mobilenet_v3_large", "--size", "64"], slice(None)),
    ("detection", ["--size", "64"], slice(0, 1)),
]


def load_main(script: str, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{script}", EXAMPLES / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("script, argv, checked", CASES, ids=[c[0] for c in CASES])
def test_example_shards_equal_the_disco_model(script, argv, checked, monkeypatch, capsys):
    torch.set_num_threads(1)
    comparisons = load_main(script, monkeypatch)(argv)
    for c in comparisons[checked]:
        assert_close(c.shards, c.disco, what=f"{script}: {c.what}")
    printed = capsys.readouterr().out
    assert "comm bytes" in printed and "node 1: MACs" in printed and "max abs difference" in printed
