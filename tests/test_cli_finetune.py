"""Fine-tuning from disco-compile: --checkpoint-every, a checkpoint written when SIGINT or SIGTERM stops it, a
resume that gives the uninterrupted run's model and scores without decoding the batches already done, and the
same scores again when a finished checkpoint is run once more."""
from __future__ import annotations

import itertools
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from disco_compile.budget import data, finetuning
from disco_compile.budget.resumable import StepBatches
from disco_compile.cli.compile import main

STEPS = 50


def _images(root: Path, per_class: int = 6) -> Path:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny pickled model and a tiny labelled image folder; the arguments of a 50-step fine-tuning."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    path = root / "whole.pt"
    torch.save(model, path)
    args = [path, "--trust-pickle", "--nodes", 2, "--input-shape", "1,3,16,16", "--budget", 0.5, "--data",
            _images(root / "images"), "--steps", STEPS, "--batch-size", 4, "--workers", 0, "--val-fraction", 0.25,
            "--use-labels", "--checkpoint-every", 10]
    return root, args


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _signal_after(monkeypatch, done: int, signum: int) -> None:
    """Send this process `signum` while step `done` (1, 2, ...) runs: as a user's Ctrl-C or a kill would."""
    real = finetuning._step

    def step(run, index, *rest):
        real(run, index, *rest)
        if index + 1 == done:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(finetuning, "_step", step)


def _scores(result) -> str:
    found = re.search(r"fine-tuned \d+ steps at budget [0-9.]+; validation .*", result.stdout)
    assert found, result.output
    return found.group(0).split("; checkpoint")[0]


def _model(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / finetuning.CHECKPOINT, weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, args = setup
    ckpt = root / "whole-run"
    result = invoke(*args, "--checkpoint-dir", ckpt)
    assert result.exit_code == 0, result.output
    return result, ckpt


def test_sigint_at_step_36_then_resume_gives_the_uninterrupted_scores(setup, uninterrupted, monkeypatch):
    root, args = setup
    ckpt = root / "interrupted"
    with monkeypatch.context() as m:
        _signal_after(m, 36, signal.SIGINT)
        stopped = invoke(*args, "--checkpoint-dir", ckpt)
    assert stopped.exit_code == 130, stopped.output
    assert "Aborted!" not in stopped.output and "Traceback" not in stopped.output
    assert f"disco-compile: interrupted (SIGINT): fine-tuning stopped after step 36 of {STEPS}; checkpoint saved " \
           f"in {ckpt / 'last.pt'}; to continue, run the same command with --resume" in stopped.stderr
    assert torch.load(ckpt / "last.pt", weights_only=True)["step"] == 36  # not 30, the last --checkpoint-every

    resumed = invoke(*args, "--checkpoint-dir", ckpt, "--resume")
    assert resumed.exit_code == 0, resumed.output
    whole, whole_ckpt = uninterrupted
    assert _scores(resumed) == _scores(whole)
    expected, got = _model(whole_ckpt), _model(ckpt)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after the resumed run"


def test_finished_checkpoint_rerun_reports_the_same_scores(setup, uninterrupted):
    _, args = setup
    whole, ckpt = uninterrupted
    again = invoke(*args, "--checkpoint-dir", ckpt, "--resume")
    assert again.exit_code == 0, again.output
    assert _scores(again) == _scores(whole)


def test_sigterm_stops_with_143_and_a_checkpoint(setup, monkeypatch):
    root, args = setup
    ckpt = root / "terminated"
    with monkeypatch.context() as m:
        _signal_after(m, 3, signal.SIGTERM)
        stopped = invoke(*args[:-1], 2, "--checkpoint-dir", ckpt)
    assert stopped.exit_code == 143, stopped.output
    assert "disco-compile: interrupted (SIGTERM): fine-tuning stopped after step 3 of" in stopped.stderr
    assert torch.load(ckpt / "last.pt", weights_only=True)["step"] == 3


def test_checkpoint_every(setup, monkeypatch):
    """--checkpoint-every N writes last.pt after steps N, 2N, ... and the last."""
    root, args = setup
    saved = []
    real = finetuning._Checkpoints.save

    def save(self, state, write):
        if write:
            saved.append(state["step"])
        real(self, state, write)
    monkeypatch.setattr(finetuning._Checkpoints, "save", save)
    result = invoke(*args[:-1], 4, "--steps", 10, "--checkpoint-dir", root / "every4")
    assert result.exit_code == 0, result.output
    assert saved == [4, 8, 10]


def test_resuming_decodes_none_of_the_earlier_batches(setup, monkeypatch):
    """StepBatches.steps(36) gives batch 36 of the whole stream, decoding only its own images."""
    root, _ = setup
    images = data.image_folder(root / "images", (16, 16), train=True)
    stream = StepBatches(images, 4, seed=0)
    whole = list(itertools.islice(iter(stream), 40))
    decoded = []
    real = type(images).__getitem__
    monkeypatch.setattr(type(images), "__getitem__", lambda self, k: decoded.append(k) or real(self, k))
    x, y = next(stream.steps(36))
    assert len(decoded) == 4
    assert torch.equal(x, whole[36][0]) and torch.equal(y, whole[36][1])
    epochs = {tuple(b[1].tolist()) for b in whole[:3]}
    assert len(epochs) > 1, "the batches of an epoch are all alike: the order is not shuffled"
