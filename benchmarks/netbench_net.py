"""The network of benchmarks/netbench.py: N nodes on one switch, each in its own namespace (run as root).

Node k lives in network namespace discobench{k} with address 10.77.0.{k+1}/24 on dbveth{k}, whose peer
dbport{k} is a port of bridge dbbr in namespace discobenchsw: a switch with one full-duplex port per
node, as devices on one Ethernet switch. A link R shapes both directions of every port,
`tc qdisc add dev DEV root tbf rate R burst B latency 400ms` on dbveth{k} (node k's sends) and on
dbport{k} (what node k receives), with TCP segmentation-offload packets capped at G bytes
(`ip link set dev DEV gso_max_size G`): SHAPING gives B and G per rate. So a node's sends to all its
peers share its R, and so does what it receives from all of them; at N=2 that is one link of rate R
each way. A TSO packet larger than the bucket is cut by tbf into 1448-byte segments in software, each
then received and acknowledged alone: work on the nodes' own cores that a real NIC does in hardware,
and the rate tbf reaches drops (TCP 850 Mbit/s at 1 Gbit/s with a 4000-byte bucket). A bucket holds a
head start: after an idle spell its B bytes pass at once. So at 1 Gbit/s TSO packets are capped at 16 KB
and the bucket holds one (18000 bytes, 0.14 ms of data; TCP reaches 940-950 Mbit/s, as on a real gigabit
link); at 100 Mbit/s the bucket is 4000 bytes (0.32 ms) and packets are segmented in software. A link may
name other values: 1gbit@4000 (bucket 4000, TSO packets uncapped) or 1gbit@18000/16384.

Node k runs on core k mod (CPU count): with more nodes than cores, nodes share cores (`core`, `sharing`).
`cleanup` deletes every discobench* namespace (their veth ends and the bridge go with them).
"""
from __future__ import annotations

import os
import re
import subprocess

SWITCH = "discobenchsw"
BRIDGE = "dbbr"
RATES = {"unshaped": None, "1gbit": 1e9, "100mbit": 1e8}
SHAPING = {"1gbit": (18000, 16384), "100mbit": (4000, 65536)}  # tbf bucket, gso_max_size (bytes); see above
GSO_DEFAULT = 65536  # veth's own TSO packet cap
PORT_BASE = 47100  # node k listens on PORT_BASE + k


def ns(k: int) -> str:
    return f"discobench{k}"


def veth(k: int) -> str:
    return f"dbveth{k}"


def port(k: int) -> str:
    return f"dbport{k}"


def addr(k: int) -> str:
    return f"10.77.0.{k + 1}"


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def core(k: int) -> int:
    return k % (os.cpu_count() or 1)


def sharing(nodes: int) -> str:
    """How `nodes` nodes sit on this machine's cores, for the report."""
    cpus = os.cpu_count() or 1
    if nodes <= cpus:
        return f"each of the {nodes} nodes on its own core"
    on = {c: [k for k in range(nodes) if core(k) == c] for c in range(cpus)}
    return (f"{nodes} nodes on {cpus} cores, sharing them: "
            + "; ".join(f"core {c}: nodes {', '.join(map(str, ks))}" for c, ks in on.items()))


def peers_yaml(nodes: int) -> str:
    return "".join(f"{k}: {addr(k)}:{PORT_BASE + k}\n" for k in range(nodes))


def in_ns(k: int, argv: list[str]) -> list[str]:
    """`argv` run in node k's namespace on its core."""
    return ["ip", "netns", "exec", ns(k), "taskset", "-c", str(core(k)), *argv]


def cleanup() -> None:
    """Delete every discobench* namespace, this run's and any an interrupted run left."""
    listed = sh(["ip", "netns", "list"], check=False).stdout
    for name in re.findall(r"^(discobench\S*)", listed, re.M):
        sh(["ip", "netns", "del", name], check=False)


def setup_commands(nodes: int) -> list[list[str]]:
    """The commands that build the switch and `nodes` nodes on it."""
    cmds = [["ip", "netns", "add", SWITCH], ["ip", "-n", SWITCH, "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "-n", SWITCH, "link", "set", BRIDGE, "up"]]
    for k in range(nodes):
        cmds += [["ip", "netns", "add", ns(k)],
                 ["ip", "link", "add", veth(k), "netns", ns(k), "type", "veth", "peer", "name", port(k), "netns",
                  SWITCH],
                 ["ip", "-n", SWITCH, "link", "set", port(k), "master", BRIDGE, "up"],
                 ["ip", "-n", ns(k), "addr", "add", f"{addr(k)}/24", "dev", veth(k)],
                 ["ip", "-n", ns(k), "link", "set", veth(k), "up"], ["ip", "-n", ns(k), "link", "set", "lo", "up"]]
    return cmds


def setup(nodes: int) -> None:
    cleanup()
    for cmd in setup_commands(nodes):
        sh(cmd)


def link_bps(link: str) -> float | None:
    """A link's rate in bit/s (None: unshaped). A link is RATE[@B[/G]]: a RATES name, optionally with its own
    tbf bucket B and TSO packet cap G in bytes."""
    return RATES[link.partition("@")[0]]


def link_error(link: str) -> str | None:
    """What is wrong with a link's name, or None."""
    rate, at, own = link.partition("@")
    if rate not in RATES:
        return f"{link}: the rate is one of {', '.join(RATES)}"
    if at and (RATES[rate] is None or not re.fullmatch(r"\d+(/\d+)?", own)):
        return f"{link}: only a shaped rate takes @BUCKET or @BUCKET/GSO_MAX_SIZE in bytes (1gbit@4000)"
    return None


def link_shaping(link: str) -> tuple[int, int]:
    """(tbf bucket bytes, gso_max_size) of a shaped link."""
    rate, _, own = link.partition("@")
    if not own:
        return SHAPING[rate]
    burst, _, gso = own.partition("/")
    return int(burst), int(gso or GSO_DEFAULT)


def shape(link: str, nodes: int) -> list[str]:
    """Shape every port of the switch (both directions) for `link`; the commands, for the report."""
    cmds = []
    burst, gso = link_shaping(link) if link_bps(link) is not None else (None, GSO_DEFAULT)
    for where, dev in ((where, dev) for k in range(nodes) for where, dev in ((ns(k), veth(k)), (SWITCH, port(k)))):
        sh(["ip", "netns", "exec", where, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        cap = ["ip", "-n", where, "link", "set", "dev", dev, "gso_max_size", str(gso)]
        sh(cap)
        if burst is not None:
            cmd = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", link.partition("@")[0], "burst",
                   f"{burst}b", "latency", "400ms"]
            sh(["ip", "netns", "exec", where, *cmd])
            cmds += [" ".join(cap), f"ip netns exec {where} " + " ".join(cmd)]
    return cmds
