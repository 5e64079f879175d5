"""BatchNorm running statistics from data.

Running statistics are reset and re-estimated as the plain average over the
given batches (momentum=None: cumulative averaging), in training mode without
gradients; every other module is left as it was. Used after the channel
selection changes (hardening changes the statistics of every downstream
activation) and to make random-weight test models numerically sane.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's statistics over `inputs`; returns the batches used.
    The model is left in eval mode."""
    layers = norms(model)
    used = 0
    if layers:
        saved = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        try:
            for x in inputs:
                model(x)
                used += 1
        finally:
            for m, mom in zip(layers, saved, strict=True):
                m.momentum = mom
    model.eval()
    return used
