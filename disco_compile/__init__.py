"""disco-compile: rewrite PyTorch models into DISCO form (Distributed Inference
with Sparse Communications): every layer split across N nodes by channels,
with learnable sparse exchanges of activations between them.

The public names below load their module on first use, so running an export
(`run_local`, `disco-run`) does not import torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
from .errors import (BudgetError, BundleError, CheckpointMismatch, DataError, DiscoError, ExampleInputError,
                     ExportedProgramError, InputMismatch, MessageError, ModelLoadError, NodeFailure, PartitionError,
                     PeerFailed, PeerTimeout, StageFailure, SubmoduleError, TraceFailure, TrainingDiverged)

if TYPE_CHECKING:
    from .backend.exporter import export
    from .budget.budget import Budget
    from .budget.cost import CostReport
    from .budget.finetuning import FinetuneResult, finetune
    from .frontend.load import LoadedModel, load_model
    from .frontend.submodule import DiscoSubmodel
    from .model import DiscoModel, transform
    from .runtime import run_local

_LAZY = {"transform": "model", "DiscoModel": "model", "DiscoSubmodel": "frontend.submodule",
         "CostReport": "budget.cost", "Budget": "budget.budget", "load_model": "frontend.load",
         "LoadedModel": "frontend.load", "run_local": "runtime", "finetune": "budget.finetuning",
         "FinetuneResult": "budget.finetuning", "export": "backend.exporter"}

__all__ = ["transform", "load_model", "Budget", "finetune", "export", "run_local", "DiscoModel", "DiscoSubmodel",
           "LoadedModel", "CostReport", "FinetuneResult", "DiscoError",
           "TraceFailure", "ExampleInputError", "ExportedProgramError", "ModelLoadError", "PartitionError",
           "BudgetError", "BundleError", "InputMismatch",
           "MessageError", "PeerTimeout", "PeerFailed", "StageFailure", "NodeFailure", "DataError",
           "CheckpointMismatch", "TrainingDiverged", "SubmoduleError"]


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
