"""Which remote channels each exchange sends: scores, and their allocation at a budget.

A *candidate* of exchange e is a (destination j, unit u) with u owned by a node
i != j and needed on j (`ex.remote[j, u]`); sending it costs `ex.unit_bytes`
per sample. The budget rho is the fraction of dense exchange bytes kept
(exchange ratio = kept bytes / bytes of every candidate). Given a score s per
candidate (higher = more useful), two allocations:

- uniform: every (e, i, j) pair keeps the floor(rho * n) best of its n
  candidates, so every link and every layer is cut by the same fraction; the
  pairs with the largest remainders rho * n - floor(rho * n) keep one more
  while the total stays within rho * dense bytes (so narrow layers at small
  rho do not all round down to nothing).
- global (cost-aware): scores are made comparable across pairs by dividing by
  the mean |s| of the pair's candidates, ranked by s_norm / cost over the
  whole model, and kept from the top while the kept bytes stay within
  rho * dense bytes. Cheap, useful channels anywhere win over expensive ones.
  cost = unit_bytes + w * macs, where macs is what the channel costs its
  destination in multiply-accumulates per sample (mixing.column_weights x
  output positions, over every consumer) and w (`compute_weight`, bytes per
  MAC) prices compute in link bytes: a link's bytes per second over a node's
  MACs per second (1 Gbit/s against 30 GMAC/s: w = 0.004). w = 0 ranks by
  bytes alone. A larger w keeps the same bytes where received channels cost
  fewer MACs per byte (early, high-resolution layers rather than late ones
  whose channels feed many output rows), so the nodes compute less.

Alignment `align` = g > 1: every pair keeps a multiple of g of its
candidates (or all n of them): the count c the allocation asks for becomes
g * floor(c / g), then pairs with the largest remainders c - g * floor(c / g)
get g more (at most n) while the kept bytes stay within rho * dense bytes;
each keeps its best. A received payload with a multiple of 8 channels lets
onnxruntime's blocked (NCHWc) convolution kernels take it on AVX2 CPUs
(16 on AVX-512), measured on ResNet-50 at N=2, rho=0.2 as about 7% less node
compute (docs/performance.md). g = 1 is the allocation itself.

rho, the allocation, g and w travel together as one `Budget` (budget.py), which checks them and holds
their defaults (global, g = 8, w = 0.004).

Scores: `magnitude` is the squared norm of the weight columns the unit feeds,
over the destination's rows of every consumer (`mixing.column_scores`), times the
unit's activation power E[x_u^2] when calibration batches are given (scores.py;
`one_shot` then also re-estimates BatchNorm statistics on them);
`random` is a seeded permutation. Learned scores (finetuning.py) are a running
mean of minus the gradient of the loss with respect to each candidate's mask
entry, which the straight-through estimator (SparseExchange.masks) hands every
candidate, sent or not, while the forward pass uses the hard selection.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ..ops import mixing
from . import batchnorm
from .data import split_batch
from .scores import activation_power
from .budget import Budget, as_budget


@torch.no_grad()
def weight_scores(dm) -> dict[str, torch.Tensor]:
    """Per exchange, (nodes, units): squared weight-column norm over the destination's consumer rows."""
    gm, plan = dm.graph_module, dm.plan
    scores = {name: torch.zeros(ex.gate.shape) for name, ex in dm.exchanges.items()}
    for layer in plan.layers:
        if layer.exchange is None:
            continue
        module = gm.get_submodule(layer.module)
        out_owner = plan.owner_of[layer.out_labels.reshape(-1)]
        for j in range(dm.nodes):
            scores[layer.exchange][j] += mixing.column_scores(layer, module, out_owner, j).float().cpu()
    return scores


def magnitude_scores(dm, batches: Iterable | None = None) -> dict[str, torch.Tensor]:
    """Per exchange, (nodes, units): weight_scores, times each unit's activation power E[x_u^2] measured on
    calibration `batches` when they are given (scores.py)."""
    weights = weight_scores(dm)
    if batches is None:
        return weights
    power = activation_power(dm, batches)
    return {name: s * power[name].to(s.dtype)[None] for name, s in weights.items()}


def one_shot(dm, budget: Budget | float, batches: Iterable | None = None) -> None:
    """The selection at `budget` without fine-tuning. With calibration `batches` (a few batches of inputs):
    magnitude scores times measured activation power, then every BatchNorm's statistics re-estimated on the
    batches (batchnorm.py: dropping channels shifts the statistics of every later layer). Without: the
    weight-column magnitude alone (DiscoModel.set_budget). At an integer wire the batches also calibrate its
    scales, on the selected model (without batches they stay to be calibrated: DiscoModel.calibrate_wire)."""
    budget = as_budget(budget)
    dm.set_wire(budget.wire)
    if batches is None:
        select(dm, magnitude_scores(dm), budget)
        return
    batches = list(batches)
    dm.calibrate_wire(batches)  # the activation power below runs the model at its wire
    select(dm, magnitude_scores(dm, batches), budget)
    batchnorm.recalibrate(dm, (split_batch(b)[0] for b in batches))
    dm.calibrate_wire(batches)


@torch.no_grad()
def candidate_macs(dm) -> dict[str, torch.Tensor]:
    """Per exchange, (nodes, units): MACs per sample a unit costs the destination that receives it."""
    macs = {name: torch.zeros(ex.gate.shape, dtype=torch.float64) for name, ex in dm.exchanges.items()}
    for layer in dm.plan.layers:
        if layer.exchange is not None:
            out_owner = dm.plan.owner_of[layer.out_labels.reshape(-1)]
            for j in range(dm.nodes):
                macs[layer.exchange][j] += mixing.column_weights(layer, out_owner, j).double() * layer.out_positions
    return macs


def random_scores(dm, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(ex.gate.shape, generator=g) for name, ex in dm.exchanges.items()}


def _pairs(ex) -> list[torch.Tensor]:
    """Flat indices into (nodes * units) of the candidates of each (source, destination) pair."""
    units = ex.owner.numel()
    out = []
    for j in range(ex.nodes):
        for i in range(ex.nodes):
            idx = (ex.remote[j] & (ex.owner == i)).nonzero().flatten()
            if i != j and idx.numel():
                out.append(j * units + idx.cpu())
    return out


def _top(flat: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    return idx[torch.argsort(flat[idx], descending=True, stable=True)[:k]]


def _counts(pairs: list, share: list[float], rho: float, align: int) -> list[int]:
    """Candidates kept per pair: multiples of `align` (or all of a pair's), `share` rounded down, then one more
    step for the largest remainders while the kept bytes stay within rho x the bytes of every candidate."""
    sizes = [idx.numel() for _, idx, _ in pairs]
    unit_bytes = [b for _, _, b in pairs]
    counts = [min(size, align * math.floor(x / align + 1e-9)) for x, size in zip(share, sizes, strict=True)]
    room = rho * sum(n * b for n, b in zip(sizes, unit_bytes, strict=True)) - \
        sum(k * b for k, b in zip(counts, unit_bytes, strict=True))
    for p in sorted(range(len(share)), key=lambda p: counts[p] - share[p]):  # largest remainder first
        step = min(align, sizes[p] - counts[p])
        if share[p] - counts[p] > 1e-9 and step * unit_bytes[p] <= room * (1 + 1e-12):
            counts[p] += step
            room -= step * unit_bytes[p]
    return counts


def _keep_counts(exchanges: Mapping, scores: Mapping[str, torch.Tensor], pairs: list, counts: list[int]):
    keep = {name: torch.zeros(ex.gate.numel(), dtype=torch.bool) for name, ex in exchanges.items()}
    for (name, idx, _), k in zip(pairs, counts, strict=True):
        if k:
            keep[name][_top(scores[name].reshape(-1), idx, k)] = True
    return {name: keep[name].reshape(ex.gate.shape) for name, ex in exchanges.items()}


def _all_pairs(exchanges: Mapping) -> list[tuple[str, torch.Tensor, int]]:
    return [(name, idx, ex.unit_bytes) for name, ex in exchanges.items() for idx in _pairs(ex)]


def _uniform(exchanges: Mapping, scores: Mapping[str, torch.Tensor], rho: float,
             align: int = 1) -> dict[str, torch.Tensor]:
    pairs = _all_pairs(exchanges)
    counts = _counts(pairs, [rho * idx.numel() for _, idx, _ in pairs], rho, align)
    return _keep_counts(exchanges, scores, pairs, counts)


def _aligned(exchanges: Mapping, scores: Mapping[str, torch.Tensor], chosen: dict[str, torch.Tensor], rho: float,
             align: int) -> dict[str, torch.Tensor]:
    """`chosen` with each pair's count aligned (see the module docstring)."""
    pairs = _all_pairs(exchanges)
    share = [float(chosen[name].reshape(-1)[idx].sum()) for name, idx, _ in pairs]
    return _keep_counts(exchanges, scores, pairs, _counts(pairs, share, rho, align))


def _global(exchanges: Mapping, scores: Mapping[str, torch.Tensor], rho: float,
            unit_cost: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names, flat_idx, values, costs = [], [], [], []
    for n, (name, ex) in enumerate(exchanges.items()):
        flat = scores[name].reshape(-1)
        for idx in _pairs(ex):
            s = flat[idx].double()
            values.append(s / s.abs().mean().clamp_min(1e-30) / unit_cost[name].reshape(-1)[idx])
            costs.append(torch.full((idx.numel(),), ex.unit_bytes, dtype=torch.float64))
            flat_idx.append(idx)
            names.append(torch.full((idx.numel(),), n))
    keep = {name: torch.zeros(ex.gate.numel(), dtype=torch.bool) for name, ex in exchanges.items()}
    if values:
        value, cost = torch.cat(values), torch.cat(costs)
        owner, index = torch.cat(names), torch.cat(flat_idx)
        order = torch.argsort(value, descending=True, stable=True)
        chosen = order[torch.cumsum(cost[order], 0) <= rho * float(cost.sum()) * (1 + 1e-12)]
        by_number = list(keep.values())
        for n in owner[chosen].unique().tolist():
            by_number[n][index[chosen][owner[chosen] == n]] = True
    return {name: keep[name].reshape(ex.gate.shape) for name, ex in exchanges.items()}


@torch.no_grad()
def select(dm, scores: Mapping[str, torch.Tensor], budget: Budget | float) -> None:
    """Set every exchange's `keep` to the candidates chosen by `scores` at `budget` (a Budget, or a number
    rho meaning Budget(rho); module docstring)."""
    budget = as_budget(budget)
    rho, align, weight = budget.rho, budget.align, budget.compute_weight
    exchanges = dm.exchanges
    cpu = {name: s.detach().float().cpu() for name, s in scores.items()}
    if budget.allocation == "uniform":
        chosen = _uniform(exchanges, cpu, rho, align)
    else:
        macs = candidate_macs(dm) if weight else \
            {name: torch.zeros(ex.gate.shape, dtype=torch.float64) for name, ex in exchanges.items()}
        unit_cost = {name: ex.unit_bytes + weight * macs[name] for name, ex in exchanges.items()}
        chosen = _global(exchanges, cpu, rho, unit_cost)
        if align > 1:
            chosen = _aligned(exchanges, cpu, chosen, rho, align)
    for name, ex in exchanges.items():
        ex.keep.copy_(chosen[name].to(ex.keep.device) & ex.remote)
