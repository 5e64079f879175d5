"""CURVE keys: who may talk to a node, and the encryption of everything between nodes.

`keygen` makes a key pair per node (node{k}.key, node{k}.key_secret) and the
folder public_keys with every node's public key; machine k gets that folder
and its own secret key. `load_keys` reads node k's NodeKeys from such a
directory and checks that its secret key is the pair of its public key.

Security. With keys (`load_keys`, made by `keygen`), every socket uses CURVE:
the PULL is a CURVE server whose ZAP handler (zmq.auth ThreadAuthenticator,
here `Authenticator`) accepts only the public keys in the keys' public_keys
folder and logs every refusal; each PUSH is a CURVE client that checks the
peer's server key against public_keys/node{j}.key. A frame whose authenticated
key is not the key of the node it claims to come from is dropped and logged
(ZmqTransport). Without keys the transport needs `insecure=True`.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .peers import NetworkConfigError

PUBLIC_KEYS = "public_keys"
ZAP_DOMAIN = "disco"


@dataclass(frozen=True)
class NodeKeys:
    """One node's CURVE key pair and the public key of every node (z85 bytes)."""
    node: int
    public: bytes
    secret: bytes
    peers: dict[int, bytes]
    public_dir: Path


def check_keys(node: int, keys: NodeKeys | None, insecure: bool) -> None:
    """NetworkConfigError unless node `node` runs with its own `keys` or, without, with an explicit `insecure`."""
    if keys is None and not insecure:
        raise NetworkConfigError("running over the network without keys needs an explicit insecure=True "
                                 "(--insecure): anyone who can reach the ports could read and inject messages; "
                                 "make keys with 'disco-run keygen DIR --nodes N' and give keys=load_keys(...) "
                                 "(--keys DIR)")
    if keys is not None and insecure:
        raise NetworkConfigError("give keys or insecure=True, not both")
    if keys is not None and keys.node != node:
        raise NetworkConfigError(f"the keys are node {keys.node}'s, this is node {node}")


def keygen(directory: str | os.PathLike, nodes: int, *, force: bool = False) -> list[Path]:
    """Make a CURVE key pair per node in `directory` (node{k}.key, node{k}.key_secret) and the folder
    `directory`/public_keys with every node's public key. Returns the files written. Existing keys are
    refused unless `force`. A `directory` made here is mode 0700; an existing one keeps its mode (secret key
    files are 0600 either way)."""
    if nodes < 1:
        raise NetworkConfigError(f"--nodes {nodes}: give at least 1 node")
    root = Path(directory)
    public = root / PUBLIC_KEYS
    existing = [p for p in [*root.glob("node*.key*"), *public.glob("*.key")] if p.is_file()]
    if existing and not force:
        raise NetworkConfigError(f"{root} already holds keys ({existing[0].name} ...); choose another directory or "
                                 f"pass --force to replace them (every node then needs the new ones)")
    if force and public.is_dir():
        for p in public.glob("*.key"):
            p.unlink()
    if not root.exists():  # a folder keygen makes is private; an existing one keeps the mode its owner gave it
        root.mkdir(parents=True)
        os.chmod(root, 0o700)
    public.mkdir(exist_ok=True)
    written = []
    for k in range(nodes):
        pub, sec = zmq.auth.create_certificates(str(root), f"node{k}")
        os.chmod(sec, 0o600)
        shutil.copy(pub, public / f"node{k}.key")
        written += [Path(pub), Path(sec), public / f"node{k}.key"]
    return written


def load_keys(directory: str | os.PathLike, node: int, nodes: int) -> NodeKeys:
    """Node `node`'s keys from `directory`: node{node}.key_secret and public_keys/node{k}.key for every node."""
    root = Path(directory)
    secret_file = root / f"node{node}.key_secret"
    public = root / PUBLIC_KEYS
    if not secret_file.is_file():
        raise NetworkConfigError(f"--keys {root}: no node{node}.key_secret (make keys with "
                                 f"'disco-run keygen {root} --nodes {nodes}' and give node {node} its secret key)")
    try:
        pub, sec = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise NetworkConfigError(f"{secret_file}: not a key file made by 'disco-run keygen' ({exc})") from exc
    if not sec:
        raise NetworkConfigError(f"{secret_file}: holds no secret key")
    peers = {}
    for k in range(nodes):
        f = public / f"node{k}.key"
        try:
            peers[k], _ = zmq.auth.load_certificate(str(f))
        except (OSError, ValueError) as exc:
            raise NetworkConfigError(f"--keys {root}: cannot read {PUBLIC_KEYS}/node{k}.key ({exc}); every node "
                                     f"needs the whole public_keys folder") from exc
    if peers[node] != pub:
        raise NetworkConfigError(f"--keys {root}: node{node}.key_secret is not the key pair of "
                                 f"{PUBLIC_KEYS}/node{node}.key, so the other nodes would refuse this node; "
                                 f"give every node keys from the same 'disco-run keygen'")
    return NodeKeys(node=node, public=pub, secret=sec, peers=peers, public_dir=public)


class Authenticator(ThreadAuthenticator):
    """zmq.auth's ThreadAuthenticator for node `node`'s PULL socket, telling `on_denied` (a sentence) about
    every refused connection (zmq.auth's own log is debug level)."""

    def __init__(self, context: zmq.Context, node: int, on_denied):
        super().__init__(context, log=logging.getLogger("disco_compile.runtime.zap"))
        self._node = node
        self._on_denied = on_denied
        self._request: list[bytes] = []

    def handle_zap_message(self, msg: list[bytes]):
        self._request = msg  # requests are handled one at a time: _send_zap_reply below answers this one
        return super().handle_zap_message(msg)  # a coroutine in pyzmq >= 25 (awaited by the caller)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous") -> None:
        if status_code != b"200":
            msg = self._request
            address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
            key = zmq.utils.z85.encode(msg[6]).decode() if len(msg) > 6 and len(msg[6]) == 32 else "(none)"
            self._on_denied(f"node {self._node} refused a connection from {address}: ZAP denied "
                            f"({status_text.decode('utf-8', 'replace')}), its public key {key} is not in "
                            f"the public_keys folder")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)
