"""Errors raised by disco-compile. Each names what was wrong, where, and what to do next."""


class DiscoError(Exception):
    """Base class of every error disco-compile raises on purpose."""


class TraceFailure(DiscoError):
    """torch.fx could not trace the model."""


class ExampleInputError(DiscoError, ValueError):
    """The example inputs do not fit the model."""


class PartitionError(DiscoError, ValueError):
    """The requested partition cannot be built (bad node count, weights, ...)."""


class BudgetError(DiscoError, ValueError):
    """A communication budget outside [0, 1]."""
