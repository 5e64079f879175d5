"""The runtime over a network: the nodes of one export on separate machines, over TCP with ZeroMQ.

How the data flows, module by module:

    peers.py          who the other nodes are: peers.yaml -> node index -> endpoint; what is known of each
    keys.py           CURVE keys per node (keygen, load_keys) and the ZAP handler that admits only them
    protocol.py       the frames on the wire: kinds, metadata, the HELLO handshake, MSG headers and payloads
    sockets.py        one node's ZeroMQ sockets: a PULL bound at its address, a PUSH to every peer, monitors
    zmq_transport.py  ZmqTransport: the Transport between machines (threads, requests, failures)
    network.py        serve (nodes 1..N-1), DiscoClient (node 0), run_processes (every node as a process)
"""
import logging

log = logging.getLogger(__name__)
