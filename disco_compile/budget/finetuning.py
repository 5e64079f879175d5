"""`finetune`: recover the original model's quality at a communication budget.

The student is the DISCO model; the teacher is frozen (by default, a copy of
the DISCO model as finetune starts with every candidate channel sent: equal to
the original model when the DISCO model comes straight from `transform`).
Step t of T trains at budget

    rho_t = rho + (1 - rho) * max(0, 1 - t / (anneal * T))

(from every channel down to the target over the first `anneal` part, then
held). Whenever rho_t changes, and at every step while it anneals for
learned scores, the selection is made at rho_t (selection.py); once at rho it
is held, so the weights adapt to one fixed selection. Scores: "learned",
"magnitude" (fixed) or "random" (a fixed random order).

Learned scores estimate each candidate's usefulness from the loss. With g the
straight-through gradient dL/dm of a candidate's mask entry (modules.py), -g
is to first order how much the loss rises when a sent candidate is dropped,
or falls when an unsent one is added (its Taylor importance). After update
t = 1, 2, ... (one per step) the score is the bias-corrected exponential mean

    s_t = s_(t-1) + (1 - beta) / (1 - beta^t) * (-g_t - s_(t-1))

over roughly the last 1 / (1 - beta) steps (beta = `score_decay`, 0.9), so
the selection follows the weights as they adapt; the weight-magnitude scores
order the candidates until the first gradient replaces them (s_1 = -g_1).
Weights and gate values train with Adam on the distillation loss, plus the
task loss when batches carry targets (distill.py). After the last step the
scores are dropped and BatchNorm statistics
are re-estimated on training batches (batchnorm.py).

Several processes (torchrun, DistributedDataParallel): when the
torch.distributed environment is set (WORLD_SIZE > 1) every process takes
every WORLD_SIZE-th batch, gradients are averaged, and process 0 alone writes
checkpoints and shows progress. Scores are parameters like any other, so
every process makes the same selection.
"""
from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import batchnorm, cost, selection
from .data import batches, split_batch
from .distill import Loss, Metric, is_logits, main_output
from ..errors import CheckpointMismatch, DataError, TrainingDiverged

METHODS = ("learned", "magnitude", "random")
CHECKPOINT = "last.pt"


@dataclass
class FinetuneResult:
    steps: int
    budget: float
    exchange_ratio: float
    history: list[dict] = field(default_factory=list)  # per logged step: step, loss, budget, exchange_ratio
    validation: dict | None = None  # {"metric": name, "student": value, "teacher": value when labelled}
    checkpoint: Path | None = None
    batchnorm_batches: int = 0


def budget_at(step: int, steps: int, rho: float, anneal: float) -> float:
    ramp = anneal * steps
    if ramp <= 0:
        return rho
    return rho + (1.0 - rho) * max(0.0, 1.0 - step / ramp)


def dense_teacher(dm) -> nn.Module:
    """The DISCO model with every candidate sent and gates at their current values."""
    teacher = copy.deepcopy(dm)
    for ex in teacher.exchanges.values():
        ex.learn_selection(None)
        ex.keep.copy_(ex.remote)
    return teacher  # finetune freezes and puts in eval mode every teacher


def exchange_ratio(dm) -> float:
    dense = cost.exchange_bytes(dm.exchanges, dense=True)
    return cost.exchange_bytes(dm.exchanges, dense=False) / dense if dense else 1.0


def fingerprint(dm, method: str, budget: float, allocation: str, align: int, compute_weight: float,
                score_decay: float | None) -> dict:
    """What a checkpoint must match to be resumed: partition, tensor names and shapes, method, and the settings
    that decide which channels the budget keeps (budget, allocation, align, compute weight, score decay). The
    number of steps may change: a resumed run can train for longer."""
    h = hashlib.sha256(dm.plan.owner_of.cpu().numpy().tobytes())
    for name, t in sorted(dm.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
    return {"nodes": dm.nodes, "partition": h.hexdigest(), "method": method, "budget": budget,
            "allocation": allocation, "align": align, "compute_weight": compute_weight, "score_decay": score_decay}


@torch.no_grad()
def update_scores(scores: Iterable[nn.Parameter], decay: float, t: int) -> None:
    """Update t (1, 2, ...) of the learned scores from their gradients (module docstring); clears the gradients."""
    rate = (1.0 - decay) / (1.0 - decay ** t)
    for s in scores:
        if s.grad is not None:
            s.add_(s.grad.neg() - s, alpha=rate)
            s.grad = None


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, device: str | torch.device = "cpu",
             reference: nn.Module | None = None) -> tuple[str, float]:
    """(metric name, value) over batches: accuracy % or PSNR dB against their targets (distill.Metric).
    Unlabelled batches are scored against `reference`'s outputs instead: top-1 agreement % for
    logits, PSNR dB for dense outputs."""
    name, value, _ = _validate(model, data, device, reference)
    return name, value


@torch.no_grad()
def _validate(model: nn.Module, data: Iterable, device, reference: nn.Module | None = None,
              score_reference: bool = False) -> tuple[str, float, float | None]:
    """One pass over `data`: (metric name, model's value, reference's value against the targets or None).
    Unlabelled batches score the model against the reference's outputs (the reference then has no value)."""
    was_training = model.training
    model.eval()
    score_reference = score_reference and reference is not None
    metric, ref_metric, against_reference = Metric(), Metric(), False
    for batch in data:
        x, y = split_batch(batch)
        x = x.to(device)
        if y is None:
            if reference is None:
                raise DataError("validation data needs targets (pairs (inputs, target)) to measure quality")
            ref = main_output(reference(x))
            y, against_reference = (ref.argmax(1) if is_logits(ref) else ref), True
        elif score_reference:
            ref_metric.add(reference(x), y.to(device))
        metric.add(model(x), y.to(device))
    model.train(was_training)
    if against_reference:
        name = metric.name.replace("accuracy", "agreement with the teacher") if metric.name.startswith(
            "accuracy") else f"{metric.name} against the teacher"
        return name, metric.value(), None
    return metric.name, metric.value(), ref_metric.value() if score_reference else None


def evaluate_bundle(out_dir: str | os.PathLike, data: Iterable) -> tuple[str, float]:
    """`evaluate` for an exported model: every labelled batch run by `run_local` (onnxruntime)."""
    from ..runtime import run_local
    metric = Metric()
    for batch in data:
        x, y = split_batch(batch)
        if y is None:
            raise DataError("evaluating exported shards needs targets (pairs (inputs, target))")
        metric.add(torch.from_numpy(run_local(out_dir, [x.numpy()])[0]), y)
    return metric.name, metric.value()


def _rank_world(dev: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins the process group torchrun describes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dist.get_rank(), dist.get_world_size(), dev


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch sees no CUDA GPU here; use device='cpu'")
    return dev


class _Checkpoints:
    """last.pt in a folder, written atomically; remembers the last good state in memory too."""

    def __init__(self, folder: Path | None, expected: dict):
        self.folder, self.expected = folder, expected
        self.good: dict | None = None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT

    def save(self, state: dict, write: bool) -> None:
        self.good = copy.deepcopy(state)
        if write and self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({"fingerprint": self.expected, **state}, tmp)
            os.replace(tmp, self.path)

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        found = state.get("fingerprint") if isinstance(state, dict) else None
        if found != self.expected:
            diff = ", ".join(f"{k}: checkpoint {None if found is None else found.get(k)!r} vs now {v!r}"
                             for k, v in self.expected.items() if found is None or found.get(k) != v)
            raise CheckpointMismatch(f"checkpoint {self.path} was written for another model, partition or budget "
                                     f"({diff}); resume with the same model, nodes, method, budget, allocation, "
                                     f"align and compute weight, or start afresh in another checkpoint folder")
        return state


def finetune(dm, data: Iterable, *, budget: float, steps: int, teacher: nn.Module | None = None,
             val_data: Iterable | None = None, method: str = "learned", allocation: str = "global",
             align: int = 1, compute_weight: float = 0.0, lr: float = 1e-3, score_decay: float = 0.9,
             anneal: float = 0.5, loss: Loss | None = None, seed: int = 0, device: str = "cpu",
             checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = False,
             batchnorm_batches: int = 20, log_every: int = 10, progress: bool = True) -> FinetuneResult:
    """Fine-tune DISCO model `dm` in place to budget `budget` (the fraction of dense exchange bytes
    kept) over `steps` optimiser steps on `data`, an iterable of batches (see data.py), cycled.

    teacher: the frozen model to distil from (default: dm as it is now, every channel sent).
    val_data: batches to measure quality on at the end: against their targets (and the teacher's
      quality beside it), or, unlabelled, as agreement with the teacher.
    method: "learned" | "magnitude" | "random" channel scores; allocation: "uniform" | "global"; align: every
      message carries a multiple of that many channels; compute_weight: bytes per MAC in the global
      allocation's cost (selection.py).
    anneal: the part of the steps over which the budget goes from 1 to `budget`.
    score_decay: beta of the learned scores' running mean of the loss gradient, in [0, 1) (module docstring).
    checkpoint_dir: where last.pt is written every `checkpoint_every` steps; resume=True continues from it.
    A NaN or infinite loss stops training, puts dm back at the last good state and raises TrainingDiverged.
    """
    rho = selection.check_budget(budget)
    align = selection.check_align(align)
    compute_weight = selection.check_compute_weight(compute_weight)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if allocation not in selection.ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(selection.ALLOCATIONS)}, got {allocation!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= score_decay < 1.0:
        raise ValueError(f"score_decay must be in [0, 1) (0: each step's gradient alone), got {score_decay!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir: the folder the interrupted run wrote last.pt to")
    rank, world, dev = _rank_world(_check_device(device))
    loss_fn = loss or Loss()
    torch.manual_seed(seed)

    teacher = dense_teacher(dm) if teacher is None else teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    scores = selection.random_scores(dm, seed) if method == "random" else selection.magnitude_scores(dm)
    if method == "learned":
        for name, ex in dm.exchanges.items():
            ex.learn_selection(scores[name])
    dm.to(dev)
    teacher.to(dev)
    score_params = [ex.score for ex in dm.exchanges.values() if ex.score is not None]
    ids = {id(p) for p in score_params}
    opt = torch.optim.Adam([p for p in dm.parameters() if id(p) not in ids and p.requires_grad], lr=lr)
    student = dm if world == 1 else \
        nn.parallel.DistributedDataParallel(dm, device_ids=[dev.index] if dev.type == "cuda" else None)

    ckpt = _Checkpoints(None if checkpoint_dir is None else Path(checkpoint_dir),
                        fingerprint(dm, method, rho, allocation, align, compute_weight,
                                    score_decay if method == "learned" else None))
    start, history = 0, []
    saved = ckpt.load() if resume else None
    if saved is not None:
        dm.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start, history = saved["step"], saved["history"]
    elif resume:
        raise CheckpointMismatch(f"resume asked for but {ckpt.path} does not exist")

    def state(step: int) -> dict:
        return {"step": step, "model": dm.state_dict(), "optimizer": opt.state_dict(), "history": list(history),
                "rng": torch.get_rng_state()}

    def current_scores():
        if method == "learned":
            return {name: ex.score for name, ex in dm.exchanges.items()}
        return scores

    stream = batches(data, start, rank, world)
    if saved is not None:
        torch.set_rng_state(saved["rng"])
    ckpt.save(state(start), write=False)
    bar = _progress(steps, start, progress and rank == 0)
    dm.train()
    current = None if saved is None else budget_at(start - 1, steps, rho, anneal)  # `keep` came with the state
    for step in range(start, steps):
        rho_t = budget_at(step, steps, rho, anneal)
        if rho_t != current or (method == "learned" and rho_t > rho):
            selection.select(dm, current_scores(), rho_t, allocation, align, compute_weight)
            current = rho_t
        x, y = next(stream)
        x = x.to(dev)
        with torch.no_grad():
            target_out = teacher(x)
        value = loss_fn(student(x), target_out, None if y is None else y.to(dev))
        if not torch.isfinite(value):
            dm.load_state_dict(ckpt.good["model"])
            bar.close()
            where = f"; it is saved in {ckpt.path}" if ckpt.path is not None and ckpt.path.exists() else ""
            raise TrainingDiverged(f"the loss became {value.item()} at step {step + 1}; training stopped and the "
                                   f"model is back at its last good state (step {ckpt.good['step']}){where}; "
                                   f"lower the learning rate (now {lr}) or check the data for NaN or inf values")
        opt.zero_grad()
        value.backward()
        opt.step()
        done = step + 1
        update_scores(score_params, score_decay, done)
        if done % log_every == 0 or done == steps:
            history.append({"step": done, "loss": value.item(), "budget": rho_t, "exchange_ratio": exchange_ratio(dm)})
            bar.set_postfix(loss=f"{value.item():.4g}", rho=f"{rho_t:.3f}", comm=_bytes(dm))
        bar.update(1)
        if done % checkpoint_every == 0 or done == steps:
            ckpt.save(state(done), write=rank == 0)
    bar.close()

    if current != rho:  # annealing took every step (anneal >= 1): settle at the target
        selection.select(dm, current_scores(), rho, allocation, align, compute_weight)
    for ex in dm.exchanges.values():
        ex.learn_selection(None)
    used = batchnorm.recalibrate(dm, _inputs(data, batchnorm_batches, dev))
    if world > 1:
        _average_batchnorm(dm, world)
    result = FinetuneResult(steps=steps, budget=rho, exchange_ratio=exchange_ratio(dm), history=history,
                            checkpoint=ckpt.path, batchnorm_batches=used)
    if val_data is not None:
        name, value, teacher_value = _validate(dm, val_data, dev, reference=teacher, score_reference=True)
        result.validation = {"metric": name, "student": value}
        if teacher_value is not None:
            result.validation["teacher"] = teacher_value
    dm.eval()
    return result


def _inputs(data: Iterable, count: int, dev: torch.device):
    stream = batches(data)
    for _ in range(count):
        yield next(stream)[0].to(dev)


def _average_batchnorm(dm, world: int) -> None:
    for m in batchnorm.norms(dm):
        for t in (m.running_mean, m.running_var):
            if t is not None:
                dist.all_reduce(t)
                t /= world


def _bytes(dm) -> str:
    return cost._si(cost.exchange_bytes(dm.exchanges, dense=False), "B")


def _progress(steps: int, start: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=steps, initial=start, desc="fine-tuning", unit="step", disable=not enabled,
                dynamic_ncols=True, leave=False)
