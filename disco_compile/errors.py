"""Errors raised by disco-compile. Each names what was wrong, where, and what to do next."""


class DiscoError(Exception):
    """Base class of every error disco-compile raises on purpose."""


class TraceFailure(DiscoError):
    """torch.fx could not trace the model."""


class ExampleInputError(DiscoError):
    """The example inputs do not fit the model."""


class PartitionError(DiscoError):
    """The requested partition cannot be built (bad node count, weights, ...)."""
