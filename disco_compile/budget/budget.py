"""`Budget`: the communication budget as one value, validated once, taken by `DiscoModel.set_budget`,
`finetune`, `selection.select` and disco-compile.

Its fields (what each means for the allocation: selection.py's docstring):

- rho: the fraction of dense exchange bytes kept, in [0, 1].
- allocation: "global" (candidates ranked over the whole model by score per cost) or "uniform" (every
  source-destination pair of every exchange cut by rho).
- align: every pair keeps a multiple of this many channels (or all of its candidates); 1: no alignment.
- compute_weight: bytes per MAC in the global ranking's cost, at least 0 and finite; 0 ranks by bytes alone.
  The uniform allocation does not rank across exchanges, so a nonzero weight with it is refused.
- wire: the precision exchange messages carry (artifact/wire.py: fp32, fp16, int8, int4). Exchange bytes count it,
  and rho is the fraction of the dense exchange bytes at the same wire, so rho chooses the channels and the wire
  their bits (int8 at rho 0.2 sends the channels fp32 at rho 0.2 sends, in a quarter of the bytes); in the global
  allocation's cost a channel's bytes are its wire bytes, so a compute weight prices MACs against them.

The defaults are disco-compile's, chosen by the benchmarks (docs/performance.md, docs/accuracy.md): global,
align 8, compute weight DEFAULT_COMPUTE_WEIGHT with global (0 with uniform). Wherever a budget is taken, a
number r means Budget(r). This module imports no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..artifact.wire import DEFAULT_WIRE, WIRES
from ..errors import BudgetError

ALLOCATIONS = ("uniform", "global")
METHODS = ("learned", "magnitude", "random")  # fine-tuning's channel scores (finetuning.py), torch-free here
# bytes per MAC of a 1 Gbit/s link against a node doing 30 GMAC/s: the default with global (quality level with 0 on
# two networks; ResNet-50's slowest node 0.39 of the model: docs/decisions.md#default-compute-weight)
DEFAULT_COMPUTE_WEIGHT = 0.004


def default_compute_weight(allocation: str) -> float:
    """The compute weight when none is given: DEFAULT_COMPUTE_WEIGHT for the global allocation, 0 for uniform."""
    return DEFAULT_COMPUTE_WEIGHT if allocation == "global" else 0.0


def _as_float(value) -> float:
    """float(value), or NaN where it is not a number (so the range checks refuse it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass(frozen=True)
class Budget:
    """How much of the exchanges to keep and how the kept channels are chosen (module docstring).
    compute_weight None: default_compute_weight(allocation)."""

    rho: float
    allocation: str = "global"
    align: int = 8
    compute_weight: float | None = None
    wire: str = DEFAULT_WIRE

    def __post_init__(self) -> None:
        rho = _as_float(self.rho)
        if not 0.0 <= rho <= 1.0:
            raise BudgetError(f"budget rho must be in [0, 1] (the fraction of dense exchange bytes to keep), "
                              f"got {self.rho}")
        align = self.align
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise BudgetError(f"align must be a whole number of channels, at least 1 (1: no alignment), "
                              f"got {align!r}")
        given = self.compute_weight
        weight = default_compute_weight(self.allocation) if given is None else _as_float(given)
        if not 0.0 <= weight < math.inf:
            raise BudgetError(f"compute weight must be a finite number of bytes per MAC, at least 0 (0: rank by "
                              f"bytes alone), got {given!r}")
        if self.allocation not in ALLOCATIONS:
            raise BudgetError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if weight and self.allocation != "global":
            raise BudgetError(f"compute_weight prices MACs in the global allocation's ranking; the "
                              f"{self.allocation} allocation does not rank across exchanges: use "
                              f"allocation='global' or compute_weight=0")
        if self.wire not in WIRES:
            raise BudgetError(f"wire must be one of {', '.join(WIRES)} (the precision exchange messages carry), "
                              f"got {self.wire!r}")
        object.__setattr__(self, "rho", rho)
        object.__setattr__(self, "compute_weight", weight)

    def settings(self) -> dict:
        """Every field by name, rho under "budget": what a fine-tuning checkpoint records (finetuning.py)."""
        return {("budget" if f.name == "rho" else f.name): getattr(self, f.name) for f in fields(self)}


def as_budget(budget: Budget | float) -> Budget:
    """`budget` itself, or Budget(budget) for a number."""
    return budget if isinstance(budget, Budget) else Budget(budget)
