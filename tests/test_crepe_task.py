"""The CREPE benchmark's helpers (benchmarks/crepe_task.py): synthetic frames, the pitch metric, the model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import crepe_task as ct  # noqa: E402


def _probs_at(cents: torch.Tensor) -> torch.Tensor:
    """Probabilities shaped like CREPE's training targets: a Gaussian of 25 cents around `cents`."""
    centres = ct.CENTS_OFFSET + ct.CENTS_PER_BIN * torch.arange(ct.BINS, dtype=torch.float64)
    return torch.exp(-(centres[None] - cents[:, None]) ** 2 / (2 * 25.0 ** 2))


def test_frames_are_normalised_and_pitches_in_range():
    frames, f0 = ct.synth_frames(6, seed=3)
    assert frames.shape == (6, ct.WINDOW) and f0.shape == (6,)
    torch.testing.assert_close(frames.mean(1), torch.zeros(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(frames.std(1), torch.ones(6), rtol=1e-4, atol=1e-5)
    assert bool(((f0 >= ct.F_MIN) & (f0 <= ct.F_MAX)).all())
    again, f0_again = ct.synth_frames(6, seed=3)
    assert torch.equal(frames, again) and torch.equal(f0, f0_again)


def test_decode_recovers_known_pitches_and_the_metric_counts_cents():
    f0 = torch.tensor([55.0, 220.0, 440.0, 1200.0], dtype=torch.float64)
    cents = ct.hz_to_cents(f0)
    torch.testing.assert_close(ct.decode_cents(_probs_at(cents)), cents, rtol=0, atol=0.5)
    exact = ct.pitch_metrics(_probs_at(cents), f0)
    assert exact["rpa50"] == exact["rpa10"] == 100.0 and exact["mae_cents"] < 0.5
    off = ct.pitch_metrics(_probs_at(cents + torch.tensor([1200.0, 30.0, 60.0, 0.0])), f0)
    assert off["rpa50"] == 50.0 and off["rpa25"] == 25.0
    assert off["mae_cents"] == pytest.approx((30 + 60 + 1200) / 4, abs=0.5)


def test_pretrained_tiny_traces_and_finds_the_pitch_of_a_clean_tone():
    pytest.importorskip("librosa")
    model = ct.crepe("tiny")
    t = torch.arange(ct.WINDOW, dtype=torch.float64) / ct.SAMPLE_RATE
    f0 = torch.tensor([220.0, 440.0])
    tones = torch.stack([sum(torch.sin(2 * torch.pi * k * f * t) / k for k in range(1, 6)) for f in f0.tolist()])
    metrics = ct.pitch_metrics(ct.predict(model, ct.normalise(tones.float())), f0)
    assert metrics["rpa50"] == 100.0, metrics
    from disco_compile import transform
    dm = transform(model, 2, tones[:1].float())
    x = ct.normalise(tones.float())
    torch.testing.assert_close(dm(x), model(x), rtol=1e-4, atol=1e-5)
