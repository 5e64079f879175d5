"""How large each exchanged unit's activation is, measured on calibration batches: the factor that turns
weight-column norms into activation-aware one-shot scores.

Dropping candidate u of destination j removes W[T_j, u] x_u from j's output rows; its expected squared size is,
for uncorrelated channels,

    ||W[T_j, u]||^2  x  E[x_u^2]

(selection.magnitude_scores multiplies the first factor, the squared weight-column norm, by the power
E[x_u^2] measured here when calibration batches are given). The weight norm alone ignores that a BatchNorm in
front scales and shifts each channel (a channel with gamma = 0.01 carries almost nothing, whatever its
weights), as do a PReLU or a residual sum. The power is E[x_u^2] at every exchange's input over every sample
and position of the unit, with every candidate sent (what the exchanged tensor is in the original model).
Without data the scores stay the weight norms: an estimate of the power from the BatchNorm statistics alone
(beta^2 + gamma^2 per channel, propagated through what follows) was measured on CREPE and lost to the weight
norm at rho 0.2 (docs/accuracy.md, "One-shot selection (CREPE tiny)").
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .data import split_batch
from ..errors import DataError


def _unit_power(x: torch.Tensor, label_shape: tuple[int, ...]) -> torch.Tensor:
    """E[x^2] per unit: the mean over every dimension along which the unit does not change."""
    dims = [d for d, n in enumerate(label_shape) if n == 1]
    return x.detach().double().pow(2).mean(dims, keepdim=True).reshape(-1)


class _Recorder:
    """Forward pre-hooks on every exchange, summing the power of what it receives, batch by batch."""

    def __init__(self, dm):
        self.sums = {name: torch.zeros(ex.owner.numel(), dtype=torch.float64) for name, ex in dm.exchanges.items()}
        self.batches = 0
        self.handles = [ex.register_forward_pre_hook(self._hook(name, ex)) for name, ex in dm.exchanges.items()]

    def _hook(self, name: str, ex):
        def record(_module, args):
            self.sums[name] += _unit_power(args[0], ex.label_shape).cpu()
        return record

    def power(self) -> dict[str, torch.Tensor]:
        return {name: s / max(self.batches, 1) for name, s in self.sums.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def activation_power(dm, batches: Iterable) -> dict[str, torch.Tensor]:
    """Per exchange, (units,): E[x_u^2] of the tensor it exchanges over calibration `batches` (inputs, or
    (inputs, target) pairs; every one used), every candidate sent (module docstring)."""
    keep = {name: ex.keep.clone() for name, ex in dm.exchanges.items()}
    was_training = dm.training
    recorder = _Recorder(dm)
    device = next(iter(dm.parameters())).device
    try:
        for ex in dm.exchanges.values():
            ex.keep.copy_(ex.remote)
        dm.eval()
        for batch in batches:
            dm(split_batch(batch)[0].to(device))
            recorder.batches += 1
    finally:
        recorder.close()
        for name, ex in dm.exchanges.items():
            ex.keep.copy_(keep[name])
        dm.train(was_training)
    if not recorder.batches:
        raise DataError("calibration for the one-shot selection got no batches; give at least one batch of inputs")
    return recorder.power()
