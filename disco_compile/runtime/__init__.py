"""The runtime: run an exported DISCO model, one NodeExecutor per node, messages through a Transport.

`run_local` runs every node in one process (threads, InProcTransport). Across
machines, each node runs with a ZmqTransport (ZeroMQ over TCP, CURVE keys):
`DiscoClient` is node 0 for applications, `serve` runs nodes 1..N-1, and
`disco-run` wraps both (net/network.py, net/zmq_transport.py). The network
names load on first use, so run_local does not import zmq.
"""

from .._lazy import lazy_attributes
from .executor import DEFAULT_TIMEOUT, NodeExecutor, check_inputs, run_bundle, run_local
from .transport import Header, InProcHub, InProcTransport, Transport, check_arrival

_LAZY = {"ZmqTransport": "net.zmq_transport", "HandshakeError": "net.protocol", "NetworkConfigError": "net.peers",
         "keygen": "net.keys", "load_keys": "net.keys", "load_peers": "net.peers",
         "DiscoClient": "net.network", "serve": "net.network", "run_processes": "net.network"}

__all__ = ["run_local", "run_bundle", "NodeExecutor", "check_inputs", "DEFAULT_TIMEOUT", "Transport", "InProcHub",
           "InProcTransport", "Header", "check_arrival", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY, globals())
