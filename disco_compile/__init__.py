"""disco-compile: rewrite PyTorch models into DISCO form (Distributed Inference
with Sparse Communications): every layer split across N nodes by channels,
with learnable sparse exchanges of activations between them."""
from .cost import CostReport
from .errors import BudgetError, DiscoError, ExampleInputError, PartitionError, TraceFailure
from .model import DiscoModel, transform

__all__ = ["transform", "DiscoModel", "CostReport", "DiscoError", "TraceFailure", "ExampleInputError",
           "PartitionError", "BudgetError"]
