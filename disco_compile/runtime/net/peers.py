"""Who the other nodes are: the peers file, their addresses as ZeroMQ endpoints, and what a node knows of each.

A peers file (peers.yaml, the same on every machine) has one line per node,
node index to HOST:PORT, for every node 0..N-1 of the export:

    0: 10.0.0.1:5550
    1: 10.0.0.2:5550

`load_peers` turns it into node index -> "tcp://host:port" and refuses a file
that misses a node, has a node the export lacks, or gives two nodes one
address. Every node binds its own address and connects to the others'.
The file is read as plain YAML: at most MAX_PEERS_BYTES, nested at most MAX_PEERS_DEPTH deep, no
anchors or aliases (a few hundred bytes of nested aliases expand to gigabytes), node indices
whole numbers (`1` or `"1"`, not `1.0` or `.inf`); values are quoted in errors
cut to a line.

A running node keeps one `Peer` record per other node; its `PeerState` says
where the handshake and the connection stand (waiting, ready, lost, left,
refused), and `problem` says why, in words that messages repeat.
"""
from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import dataclass

from ...errors import DiscoError


class NetworkConfigError(DiscoError, ValueError):
    """A peers file, a keys directory or a transport option that cannot be used."""


MAX_PEERS_BYTES = 1 << 16  # a line of about 25 bytes per node
MAX_PEERS_DEPTH = 2


def _shown(value) -> str:
    """repr(value) cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_address(where: str, value) -> tuple[str, int]:
    text = str(value).strip() if isinstance(value, (str, int)) else ""
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NetworkConfigError(f"{where}: {_shown(value)} is not HOST:PORT (e.g. 10.0.0.2:5550)")
    return host, int(port)


def _node_index(where: str, key) -> int:
    """A peers file's key as a node index: an int or a string of digits (not a bool, float or anything else)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise NetworkConfigError(f"{where}: {_shown(key)} is not a node index (a whole number 0..N-1)")


def endpoint(host: str, port: int) -> str:
    """The ZeroMQ TCP endpoint of HOST:PORT (IPv6 addresses in brackets: [::1]:5550)."""
    return f"tcp://{host}:{port}"


def _read_yaml(path) -> object:
    import yaml
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PEERS_BYTES + 1)
    except OSError as exc:
        raise NetworkConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if len(text) > MAX_PEERS_BYTES:
        raise NetworkConfigError(f"{path}: larger than {MAX_PEERS_BYTES} bytes; a peers file has one short line "
                                 f"per node, '0: 10.0.0.1:5550'")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where built in: the same rules, faster
    flat = "a peers file is one line 'K: HOST:PORT' per node"
    try:
        depth = 0
        for event in yaml.parse(text, Loader=loader):
            if getattr(event, "anchor", None):
                raise NetworkConfigError(f"{path}: uses YAML anchors or aliases (&name, *name); {flat}")
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_PEERS_DEPTH:
                raise NetworkConfigError(f"{path}: nested deeper than {MAX_PEERS_DEPTH} levels; {flat}")
        return yaml.load(text, Loader=loader)
    except NetworkConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError, ...
        raise NetworkConfigError(f"{path}: not valid YAML ({str(exc)[:300]})") from None


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
        k = _node_index(where, key)
        result[k] = endpoint(*_parse_address(f"{where}: node {k}", value))
    expected = nodes if nodes is not None else len(result)
    if sorted(result) != list(range(expected)):
        raise NetworkConfigError(f"{where}: has nodes {_shown(sorted(result))}, but the export has nodes "
                                 f"0..{expected - 1}: give one address per node")
    clash = [e for e, n in Counter(result.values()).items() if n > 1]
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
