"""The runtime: run an exported DISCO model, one NodeExecutor per node, messages through a Transport.

`run_local` runs every node in one process (threads, InProcTransport); a
transport between machines is a later addition with the same interface.
"""
from .executor import DEFAULT_TIMEOUT, NodeExecutor, check_inputs, run_bundle, run_local
from .transport import Header, InProcHub, InProcTransport, Transport, check_arrival

__all__ = ["run_local", "run_bundle", "NodeExecutor", "check_inputs", "DEFAULT_TIMEOUT", "Transport", "InProcHub",
           "InProcTransport", "Header", "check_arrival"]
