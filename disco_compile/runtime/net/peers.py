"""Who the other nodes are: the peers file, their addresses as ZeroMQ endpoints, and what a node knows of each.

A peers file (peers.yaml, the same on every machine) has one line per node,
node index to HOST:PORT, for every node 0..N-1 of the export:

    0: 10.0.0.1:5550
    1: 10.0.0.2:5550

`load_peers` turns it into node index -> "tcp://host:port" and refuses a file
that misses a node, has a node the export lacks, or gives two nodes one
address. Every node binds its own address and connects to the others'.

A running node keeps one `Peer` record per other node; its `PeerState` says
where the handshake and the connection stand (waiting, ready, lost, left,
refused), and `problem` says why, in words that messages repeat.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from ...errors import DiscoError


class NetworkConfigError(DiscoError, ValueError):
    """A peers file, a keys directory or a transport option that cannot be used."""


def _parse_address(where: str, value) -> tuple[str, int]:
    text = str(value).strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NetworkConfigError(f"{where}: {value!r} is not HOST:PORT (e.g. 10.0.0.2:5550)")
    return host, int(port)


def endpoint(host: str, port: int) -> str:
    """The ZeroMQ TCP endpoint of HOST:PORT (IPv6 addresses in brackets: [::1]:5550)."""
    return f"tcp://{host}:{port}"


def _read_yaml(path) -> object:
    try:
        import yaml
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise NetworkConfigError(f"{path}: cannot be read ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError and friends
        raise NetworkConfigError(f"{path}: not valid YAML ({exc})") from exc


def load_peers(peers, nodes: int | None = None) -> dict[int, str]:
    """Node index -> "tcp://host:port". `peers`: a YAML file (or a mapping) from node index to "host:port"
    for every node 0..N-1; with `nodes`, N must be that."""
    where = "peers"
    if isinstance(peers, (str, os.PathLike)):
        where = str(peers)
        peers = _read_yaml(peers)
    if not isinstance(peers, dict) or not peers:
        raise NetworkConfigError(f"{where}: give a mapping from node index to HOST:PORT, one line per node, "
                                 f"e.g. '0: 10.0.0.1:5550'")
    result = {}
    for key, value in peers.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise NetworkConfigError(f"{where}: {key!r} is not a node index") from None
        result[k] = endpoint(*_parse_address(f"{where}: node {k}", value))
    expected = nodes if nodes is not None else len(result)
    if sorted(result) != list(range(expected)):
        raise NetworkConfigError(f"{where}: has nodes {sorted(result)}, but the export has nodes "
                                 f"0..{expected - 1}: give one address per node")
    clash = [e for e in set(result.values()) if list(result.values()).count(e) > 1]
    if clash:
        raise NetworkConfigError(f"{where}: several nodes have the address {clash[0]}")
    return result


class PeerState(enum.Enum):
    """Where a peer stands, as this node sees it; the value is the word `ZmqTransport.peer_states` gives."""
    WAITING = "waiting"  # no HELLO from it yet (or its connection failed before one came)
    READY = "ready"  # its HELLO matched and it is alive
    LOST = "lost"  # its connection closed, it went silent, or it said it stopped
    LEFT = "left"  # it said goodbye
    REFUSED = "refused"  # it holds another export, or it refused this node's key

    @property
    def gone(self) -> bool:
        """Whether requests that need this peer fail at once."""
        return self in (PeerState.LOST, PeerState.REFUSED)


@dataclass
class Peer:
    """What a node knows of one other node."""
    node: int
    endpoint: str
    state: PeerState = PeerState.WAITING
    instance: str | None = None  # of its current process, from its HELLO
    last_seen: float = 0.0
    problem: str | None = None  # why it is lost or refused, or the last trouble connecting to it
    dropped_at: float | None = None  # its connection closed at; lost if it is not back within the grace
