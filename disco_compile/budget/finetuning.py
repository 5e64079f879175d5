"""`finetune`: recover the original model's quality at a communication budget.

The student is the DISCO model; the teacher is frozen (by default, a copy of
the DISCO model as finetune starts with every candidate channel sent: equal to
the original model when the DISCO model comes straight from `transform`).
With the target `Budget` (budget.py) at rho,
step t of T trains at budget

    rho_t = rho + (1 - rho) * max(0, 1 - t / (anneal * T))

(from every channel down to the target over the first `anneal` part, then
held). Whenever rho_t changes, and at every step while it anneals for
learned scores, the selection is made at rho_t with the target's allocation,
align and compute weight (selection.py); once at rho it is held, so the
weights adapt to one fixed selection. Scores: "learned",
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
scores are dropped and BatchNorm statistics are re-estimated on training
batches (batchnorm.py). At the budget's integer wire (ops/wire.py) the student
sends fake-quantised channels; their scales are calibrated on the first batches
and train with the weights (the teacher sends fp32). In the code: `_setup`
(devices, teacher, wire, scores, optimiser, checkpoint or resume), one `_step`
per step, `_finish`.

Several processes (torchrun, DistributedDataParallel): when the
torch.distributed environment is set (WORLD_SIZE > 1) every process takes
every WORLD_SIZE-th batch, gradients are averaged, and process 0 alone writes
checkpoints and shows progress. Scores are parameters like any other, so
every process makes the same selection.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import batchnorm, cost, selection
from .budget import METHODS, Budget, as_budget
from .data import Batch, batches, split_batch
from .distill import Loss, Metric, is_logits, main_output
from .resumable import StepBatches
from ..artifact.atomic import write_atomic
from ..errors import CheckpointMismatch, DataError, FinetuneInterrupted, TrainingDiverged

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
    """The DISCO model with every candidate sent at fp32 and gates at their current values."""
    teacher = copy.deepcopy(dm)
    for ex in teacher.exchanges.values():
        ex.learn_selection(None)
        ex.keep.copy_(ex.remote)
    teacher.set_wire("fp32")
    return teacher  # finetune freezes every teacher (and puts one it is given in eval mode)


def exchange_ratio(dm) -> float:
    dense = cost.exchange_bytes(dm.exchanges, dense=True)
    return cost.exchange_bytes(dm.exchanges, dense=False) / dense if dense else 1.0


def fingerprint(dm, method: str, budget: Budget, score_decay: float | None) -> dict:
    """What a checkpoint must match to be resumed: partition, tensor names and shapes, method, and the settings
    that decide which channels the budget keeps (every field of the Budget, rho under "budget", and the score
    decay). The number of steps may change: a resumed run can train for longer."""
    h = hashlib.sha256(dm.plan.owner_of.cpu().numpy().tobytes())
    for name, t in sorted(dm.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
    return {"nodes": dm.nodes, "partition": h.hexdigest(), "method": method, **budget.settings(),
            "score_decay": score_decay}


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
            write_atomic(self.path, lambda f: torch.save({"fingerprint": self.expected, **state}, f))

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:  # weights only: a checkpoint holds tensors, numbers and lists; unpickling anything else runs code
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
            reason = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
            raise CheckpointMismatch(f"checkpoint {self.path} cannot be read as one fine-tuning writes (torch.load "
                                     f"with weights_only=True: {type(exc).__name__}: {reason[:300]}); it was not "
                                     f"written by disco-compile's fine-tuning: remove it or start afresh in "
                                     f"another checkpoint folder") from None
        found = state.get("fingerprint") if isinstance(state, dict) else None
        if found != self.expected:
            diff = ", ".join(f"{k}: checkpoint {None if found is None else found.get(k)!r} vs now {v!r}"
                             for k, v in self.expected.items() if found is None or found.get(k) != v)
            raise CheckpointMismatch(f"checkpoint {self.path} was written for another model, partition or budget "
                                     f"({diff}); resume with the same model, nodes, method, budget, allocation, "
                                     f"align and compute weight, or start afresh in another checkpoint folder")
        return state


def finetune(dm, data: Iterable, *, budget: Budget | float, steps: int, teacher: nn.Module | None = None,
             val_data: Iterable | None = None, method: str = "learned", lr: float = 1e-3, score_decay: float = 0.9,
             anneal: float = 0.5, loss: Loss | None = None, seed: int = 0, device: str = "cpu",
             checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = False,
             batchnorm_batches: int = 20, log_every: int = 10, progress: bool = True,
             stop: Callable[[], bool] | None = None, wire: str | None = None,
             calibration_batches: int = 4) -> FinetuneResult:
    """Fine-tune DISCO model `dm` in place to `budget` over `steps` optimiser steps on `data`, an iterable of
    batches (see data.py), cycled.

    budget: a Budget (budget.py: the fraction rho of dense exchange bytes kept, the allocation, align, compute
      weight, wire), or a number rho meaning Budget(rho).
    wire: the precision exchange messages carry (ops/wire.py), overriding the budget's; training sees it (fake
      quantisation). An integer wire's per-channel scales are calibrated on the first `calibration_batches`
      batches of `data` (unless dm's already are) and then learned with the weights.
    teacher: the frozen model to distil from (default: dm as it is now, every channel sent).
    val_data: batches to measure quality on at the end: against their targets (and the teacher's
      quality beside it), or, unlabelled, as agreement with the teacher.
    method: "learned" | "magnitude" | "random" channel scores.
    anneal: the part of the steps over which the budget goes from 1 to rho.
    score_decay: beta of the learned scores' running mean of the loss gradient, in [0, 1) (module docstring).
    checkpoint_dir: where last.pt is written every `checkpoint_every` steps; resume=True continues from it.
      `data` a StepBatches (resumable.py): a resumed run starts at its step without decoding earlier batches.
    stop: asked after every step; when it returns True, the checkpoint is written (with checkpoint_dir) and
      FinetuneInterrupted raised (the command line asks it whether SIGINT or SIGTERM came).
    A NaN or infinite loss stops training, puts dm back at the last good state and raises TrainingDiverged.
    """
    budget = as_budget(budget) if wire is None else replace(as_budget(budget), wire=wire)
    _check_settings(method, steps, score_decay, resume, checkpoint_dir)
    run = _setup(dm, data, budget, steps, teacher=teacher, method=method, lr=lr, score_decay=score_decay,
                 anneal=anneal, loss=loss, seed=seed, device=device, checkpoint_dir=checkpoint_dir, resume=resume,
                 calibration_batches=calibration_batches)
    with _progress(steps, run.start, progress and run.rank == 0) as bar:
        for step in range(run.start, steps):
            _step(run, step, bar, log_every, checkpoint_every)
            if stop is not None and stop():
                _interrupted(run, step + 1, checkpoint_every)
    return _finish(run, data, val_data, batchnorm_batches)


def _interrupted(run: _Run, done: int, checkpoint_every: int) -> None:
    """Stop after `done` steps: the checkpoint (unless the step just wrote it), then FinetuneInterrupted."""
    if done % checkpoint_every and done != run.steps:
        run.ckpt.save(run.state(done), write=run.rank == 0)
    path = run.ckpt.path
    raise FinetuneInterrupted(f"fine-tuning stopped after step {done} of {run.steps}"
                              + (f"; checkpoint saved in {path}" if path is not None else "; no checkpoint folder"),
                              done, path)


def _check_settings(method: str, steps: int, score_decay: float, resume: bool, checkpoint_dir) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= score_decay < 1.0:
        raise ValueError(f"score_decay must be in [0, 1) (0: each step's gradient alone), got {score_decay!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir: the folder the interrupted run wrote last.pt to")


@dataclass
class _Run:
    """One fine-tuning run, from `_setup` through the steps to `_finish`."""

    dm: nn.Module
    student: nn.Module  # dm, or dm in DistributedDataParallel
    teacher: nn.Module
    budget: Budget
    method: str
    steps: int
    anneal: float
    score_decay: float
    lr: float
    loss: Loss
    opt: torch.optim.Optimizer
    ckpt: _Checkpoints
    fixed_scores: dict[str, torch.Tensor]  # magnitude or random; learned scores live on the exchanges
    score_params: list[nn.Parameter]  # the learned scores (none for fixed ones)
    rank: int
    world: int
    dev: torch.device
    stream: Iterator[Batch] | None = None
    start: int = 0
    history: list[dict] = field(default_factory=list)
    current: float | None = None  # the budget of the exchanges' current selection (None: none made yet)

    def select(self, rho: float) -> None:
        """Every exchange's selection at `rho` with the run's other budget settings, by the current scores."""
        scores = {name: ex.score for name, ex in self.dm.exchanges.items()} if self.method == "learned" \
            else self.fixed_scores
        selection.select(self.dm, scores, replace(self.budget, rho=rho))
        self.current = rho

    def state(self, step: int) -> dict:
        return {"step": step, "model": self.dm.state_dict(), "optimizer": self.opt.state_dict(),
                "history": list(self.history), "rng": torch.get_rng_state()}


def _setup(dm, data: Iterable, budget: Budget, steps: int, *, teacher: nn.Module | None, method: str, lr: float,
           score_decay: float, anneal: float, loss: Loss | None, seed: int, device: str,
           checkpoint_dir: str | os.PathLike | None, resume: bool, calibration_batches: int) -> _Run:
    """Devices, frozen teacher, wire, starting scores, optimiser and checkpoints, then the state of `resume`."""
    rank, world, dev = _rank_world(_check_device(device))
    loss = loss or Loss()
    torch.manual_seed(seed)
    teacher = _frozen(dense_teacher(dm) if teacher is None else teacher.eval())
    dm.set_wire(budget.wire)
    if not resume and not all(w.calibrated() for w in dm.wired()):
        stream = data.steps(0) if isinstance(data, StepBatches) else batches(data)
        dm.calibrate_wire(itertools.islice(stream, calibration_batches))
    scores = _starting_scores(dm, method, seed)
    dm.to(dev)
    teacher.to(dev)
    score_params = [ex.score for ex in dm.exchanges.values() if ex.score is not None]
    ids = {id(p) for p in score_params}
    opt = torch.optim.Adam([p for p in dm.parameters() if id(p) not in ids and p.requires_grad], lr=lr)
    student = dm if world == 1 else \
        nn.parallel.DistributedDataParallel(dm, device_ids=[dev.index] if dev.type == "cuda" else None)
    ckpt = _Checkpoints(None if checkpoint_dir is None else Path(checkpoint_dir),
                        fingerprint(dm, method, budget, score_decay if method == "learned" else None))
    run = _Run(dm=dm, student=student, teacher=teacher, budget=budget, method=method, steps=steps, anneal=anneal,
               score_decay=score_decay, lr=lr, loss=loss, opt=opt, ckpt=ckpt, fixed_scores=scores,
               score_params=score_params, rank=rank, world=world, dev=dev)
    _start(run, data, resume)
    return run


def _frozen(teacher: nn.Module) -> nn.Module:
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _starting_scores(dm, method: str, seed: int) -> dict[str, torch.Tensor]:
    """Random or magnitude scores; learned ones start from the magnitude scores, as parameters of the exchanges."""
    scores = selection.random_scores(dm, seed) if method == "random" else selection.magnitude_scores(dm)
    if method == "learned":
        for name, ex in dm.exchanges.items():
            ex.learn_selection(scores[name])
    return scores


def _start(run: _Run, data: Iterable, resume: bool) -> None:
    """From step 0, or from the checkpoint when resuming: the step, history, selection, batches, random state."""
    saved = run.ckpt.load() if resume else None
    if resume and saved is None:
        raise CheckpointMismatch(f"resume asked for but {run.ckpt.path} does not exist")
    if saved is not None:
        run.dm.load_state_dict(saved["model"])
        run.opt.load_state_dict(saved["optimizer"])
        run.start, run.history = saved["step"], saved["history"]
        run.current = budget_at(run.start - 1, run.steps, run.budget.rho, run.anneal)  # `keep` came with the state
    run.stream = data.steps(run.start, run.rank, run.world) if isinstance(data, StepBatches) else \
        batches(data, run.start, run.rank, run.world)
    if saved is not None:
        torch.set_rng_state(saved["rng"])
    run.ckpt.save(run.state(run.start), write=False)
    run.dm.train()


def _step(run: _Run, step: int, bar, log_every: int, checkpoint_every: int) -> None:
    """Optimiser step `step` (from 0): the selection at its budget, the loss, the update, log and checkpoint."""
    rho_t = budget_at(step, run.steps, run.budget.rho, run.anneal)
    if rho_t != run.current or (run.method == "learned" and rho_t > run.budget.rho):
        run.select(rho_t)
    x, y = next(run.stream)
    x = x.to(run.dev)
    with torch.no_grad():
        target_out = run.teacher(x)
    value = run.loss(run.student(x), target_out, None if y is None else y.to(run.dev))
    if not torch.isfinite(value):
        _diverged(run, value, step)
    run.opt.zero_grad()
    value.backward()
    run.opt.step()
    done = step + 1
    update_scores(run.score_params, run.score_decay, done)
    if done % log_every == 0 or done == run.steps:
        run.history.append({"step": done, "loss": value.item(), "budget": rho_t,
                            "exchange_ratio": exchange_ratio(run.dm)})
        bar.set_postfix(loss=f"{value.item():.4g}", rho=f"{rho_t:.3f}", comm=_bytes(run.dm))
    bar.update(1)
    if done % checkpoint_every == 0 or done == run.steps:
        run.ckpt.save(run.state(done), write=run.rank == 0)


def _diverged(run: _Run, value: torch.Tensor, step: int) -> None:
    """Back to the last good state, then TrainingDiverged."""
    good = run.ckpt.good
    run.dm.load_state_dict(good["model"])
    path = run.ckpt.path
    where = f"; it is saved in {path}" if path is not None and path.exists() else ""
    raise TrainingDiverged(f"the loss became {value.item()} at step {step + 1}; training stopped and the model is "
                           f"back at its last good state (step {good['step']}){where}; lower the learning rate "
                           f"(now {run.lr}) or check the data for NaN or inf values")


def _finish(run: _Run, data: Iterable, val_data: Iterable | None, batchnorm_batches: int) -> FinetuneResult:
    """Settle at the target budget, drop the scores, re-estimate BatchNorm statistics, validate."""
    dm, rho = run.dm, run.budget.rho
    if run.current != rho:  # annealing took every step (anneal >= 1): settle at the target
        run.select(rho)
    for ex in dm.exchanges.values():
        ex.learn_selection(None)
    used = batchnorm.recalibrate(dm, _inputs(data, batchnorm_batches, run.dev))
    if run.world > 1:
        _average_batchnorm(dm, run.world)
    result = FinetuneResult(steps=run.steps, budget=rho, exchange_ratio=exchange_ratio(dm), history=run.history,
                            checkpoint=run.ckpt.path, batchnorm_batches=used)
    if val_data is not None:
        name, value, teacher_value = _validate(dm, val_data, run.dev, reference=run.teacher, score_reference=True)
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
