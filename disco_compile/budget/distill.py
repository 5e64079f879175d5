"""Training losses and quality metrics for fine-tuning a DISCO model.

Outputs may be nested (tuples, lists, dicts); they are flattened with
torch's pytree and compared leaf by leaf with the frozen teacher's:

- a leaf of shape (batch, classes) is *logits*: Hinton's distillation loss
  T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch;
- any other floating leaf is a *dense* output: mean squared error (or L1).

With labels, a task loss is added: cross-entropy on the logits against class
indices, or the dense loss against a target tensor. The total is

    L = distill_weight * sum_leaves L_leaf + task_weight * L_task

Metrics: top-1 accuracy for class labels, PSNR = 10 log10(1 / MSE) for dense
targets in [0, 1] (the outputs are clamped to [0, 1] first, as an image is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def is_logits(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1


@dataclass(frozen=True)
class Loss:
    temperature: float = 4.0
    dense: str = "mse"  # or "l1"
    distill_weight: float = 1.0
    task_weight: float = 1.0

    def _dense(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(a, b) if self.dense == "l1" else F.mse_loss(a, b)

    def distill(self, student, teacher) -> torch.Tensor:
        s_leaves, t_leaves = _leaves(student), _leaves(teacher)
        if len(s_leaves) != len(t_leaves) or not s_leaves:
            raise ValueError(f"student and teacher outputs differ in structure: {len(s_leaves)} vs "
                             f"{len(t_leaves)} floating-point tensors")
        total = s_leaves[0].new_zeros(())
        for s, t in zip(s_leaves, t_leaves, strict=True):
            if is_logits(s):
                T = self.temperature
                total = total + T * T * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t.detach() / T, 1),
                                                  reduction="batchmean", log_target=True)
            else:
                total = total + self._dense(s, t.detach())
        return total

    def task(self, student, target: torch.Tensor) -> torch.Tensor:
        out = main_output(student)
        if is_logits(out) and not target.is_floating_point():
            return F.cross_entropy(out, target)
        return self._dense(out, target.to(out.dtype))

    def __call__(self, student, teacher, target: torch.Tensor | None) -> torch.Tensor:
        loss = self.distill_weight * self.distill(student, teacher)
        if target is not None and self.task_weight:
            loss = loss + self.task_weight * self.task(student, target)
        return loss


def main_output(out) -> torch.Tensor:
    """The tensor labels refer to: the only output, or the first floating-point leaf ('out' of a dict)."""
    if isinstance(out, dict) and "out" in out:
        return out["out"]
    leaves = _leaves(out)
    if not leaves:
        raise ValueError("the model returned no floating-point tensor")
    return leaves[0]


class Metric:
    """Accumulates a quality figure over batches: accuracy (%) for class labels, PSNR (dB) for images."""

    def __init__(self) -> None:
        self.correct = 0
        self.count = 0
        self.sq_error = 0.0
        self.pixels = 0
        self.psnr_sum = 0.0

    @torch.no_grad()
    def add(self, out, target: torch.Tensor) -> None:
        pred = main_output(out)
        if is_logits(pred) and not target.is_floating_point():
            self.correct += int((pred.argmax(1) == target).sum())
            self.count += target.shape[0]
            return
        err = (pred.clamp(0, 1) - target.to(pred.dtype)).pow(2).flatten(1).mean(1).double()
        self.psnr_sum += float((10 * torch.log10(1.0 / err.clamp_min(1e-20))).sum())
        self.count += target.shape[0]
        self.pixels += 1

    @property
    def name(self) -> str:
        return "PSNR dB" if self.pixels else "accuracy %"

    def value(self) -> float:
        if not self.count:
            return math.nan
        if self.pixels:
            return self.psnr_sum / self.count
        return 100.0 * self.correct / self.count
