"""Errors raised by disco-compile. Each names what was wrong, where, and what to do next."""


class DiscoError(Exception):
    """Base class of every error disco-compile raises on purpose."""


class TraceFailure(DiscoError):
    """torch.fx could not trace the model."""


class SubmoduleError(DiscoError, ValueError):
    """A submodule name (transform's `submodule`) that the model does not have."""


class ModelLoadError(DiscoError, ValueError):
    """A model file or name that `load_model` cannot read or build: missing, unreadable, unsafe to unpickle
    without trust, or weights that do not fit the architecture."""


class ExportedProgramError(DiscoError, ValueError):
    """A torch.export program (.pt2) that cannot be read or raised to modules."""


class ExampleInputError(DiscoError, ValueError):
    """The example inputs do not fit the model."""


class PartitionError(DiscoError, ValueError):
    """The requested partition cannot be built (bad node count, weights, ...)."""


class BudgetError(DiscoError, ValueError):
    """A communication budget (`Budget`) with a setting out of range: rho outside [0, 1], an unknown
    allocation, an align below 1, a compute weight that is negative, not finite or given with uniform."""


class DataError(DiscoError, ValueError):
    """Training data that is missing, empty, unreadable or not in a form fine-tuning accepts."""


class CheckpointMismatch(DiscoError, ValueError):
    """A fine-tuning checkpoint written for another model, partition or selection method."""


class TrainingDiverged(DiscoError, RuntimeError):
    """The fine-tuning loss became NaN or infinite; the model is back at the last good state."""


class BundleError(DiscoError, ValueError):
    """An export directory cannot be written, or what was read back is not a valid, unchanged export."""


class InputMismatch(DiscoError, ValueError):
    """The inputs given to the runtime do not match the exported model's inputs."""


class MessageError(DiscoError):
    """A message arrived (or was about to be sent) that disagrees with the schedule."""


class PeerTimeout(DiscoError, TimeoutError):
    """A node waited longer than the timeout for a message from a peer."""


class PeerFailed(DiscoError):
    """A peer reported that it failed, so this node stopped instead of waiting for it."""


class StageFailure(DiscoError, RuntimeError):
    """onnxruntime raised while running one stage graph of one node."""


class NodeFailure(DiscoError, RuntimeError):
    """A node of a local (in-process) run failed; the other nodes were stopped.

    `node` is the failing node; the original error is chained as __cause__."""

    def __init__(self, message: str, node: int):
        super().__init__(message)
        self.node = node


class ProviderError(DiscoError, ValueError):
    """An onnxruntime execution provider asked for (disco-run --provider) that this onnxruntime build lacks."""


class FinetuneInterrupted(DiscoError):
    """Fine-tuning was asked to stop (a signal on the command line) and stopped between two steps, after writing
    its checkpoint; `step` is the number of steps done, `checkpoint` the file (None without a checkpoint folder)."""

    def __init__(self, message: str, step: int, checkpoint):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class PlanError(DiscoError, ValueError):
    """A planner setting that names no candidate (disco-compile plan: a link, node count, wire or node speed), or a
    model the planner cannot time whole."""
