"""Edge-class nodes for benchmarks/netbench.py: each node's process slowed by CPU bandwidth control (root).

A process in a cgroup whose CPU bandwidth is Q us of CPU per period of P us (cgroup v1
`cpu.cfs_quota_us` = Q, `cpu.cfs_period_us` = P; cgroup v2 `cpu.max` = "Q P") runs at most Q us in
every P us window and then waits for the next window: busy and single-threaded, it does a core's work
at Q/P of the core's speed, so the nominal slowdown is P/Q. Measured it is larger (Q = 2170 per
P = 10000 made ResNet-50 5.0x slower here, not 4.6x: every throttled window costs a wake-up and a cold
cache), so the quota is calibrated against a measured factor. With slowdown ~ P/Q, a quota r times
larger is r times faster, and one step is

    Q_next = Q x measured / target,   clamped to [MIN_QUOTA_US, P]

repeated (the whole model timed with and without the group, interleaved) until the measured factor is
within `tol` of the target. What bandwidth control does not reproduce: a slow core is slow at every
instant, a throttled fast one is not. A node that waited for a message may run up to the Q us left in
its window at full speed, so a node that waits often gains up to Q us per window against a slow core;
a short period bounds that credit (Q ~ 2.2 ms at P = 10 ms and 4.6x; P = 5 ms halves it, but leaves
the calibration no room under the kernel's 1 ms minimum quota where the measured slowdown falls short of
the nominal, as it does when other processes share the core), and netbench's whole model, which never
waits, is the baseline the calibration measures. Kernel work done outside the process (softirq
network processing) is not counted against its quota.

Every group this module makes is named `discobench*` and removed by `remove_all` (its processes moved
to the root group first), which netbench calls in a `finally`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from disco_compile.errors import DiscoError

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup/unified")  # systemd's hybrid layout; a pure v2 host mounts it at /sys/fs/cgroup
PREFIX = "discobench"
MIN_QUOTA_US = 1000  # the kernel refuses a smaller cfs quota
TOL = 0.03  # the calibration ends when the measured factor is within 3% of the target
# Run a command inside a group: the shell writes its own pid into the group, then exec keeps that pid
# (taskset and ip netns exec exec too), so the command and everything it starts are in the group from the start.
JOIN = 'echo $$ > "$0" && exec "$@"'


class CgroupError(DiscoError, RuntimeError):
    """A CPU-bandwidth group could not be made, set or removed."""


def v2_root() -> Path | None:
    """Where cgroup v2 has the cpu controller enabled for child groups, or None."""
    for root in (V2_ROOT, Path("/sys/fs/cgroup")):
        ctl = root / "cgroup.controllers"
        if ctl.exists() and "cpu" in ctl.read_text().split():
            return root
    return None


def v2_status() -> str:
    """What cgroup v2 offers here, for the report."""
    root = v2_root()
    if root is not None:
        return f"cgroup v2 has the cpu controller at {root} (used: cpu.max)"
    for r in (V2_ROOT, Path("/sys/fs/cgroup")):
        if (r / "cgroup.controllers").exists():
            return (f"cgroup v2 is mounted at {r} with controllers [{(r / 'cgroup.controllers').read_text().strip()}]"
                    f", without cpu (bound to v1 in this hybrid layout), so v1's cfs quota is used")
    return "no cgroup v2 mount"


def controller() -> tuple[str, Path]:
    """("v2", root) where v2 has the cpu controller, else ("v1", root) where v1 mounts it."""
    root = v2_root()
    if root is not None:
        return "v2", root
    if (V1_ROOT / "cpu.cfs_quota_us").exists():
        return "v1", V1_ROOT
    raise CgroupError(f"no cgroup cpu controller: neither {V2_ROOT}/cgroup.controllers nor "
                      f"/sys/fs/cgroup/cgroup.controllers lists cpu and {V1_ROOT}/cpu.cfs_quota_us is absent; "
                      f"run netbench without --slow, or on a host that mounts the cpu controller")


def next_quota(quota: int, measured: float, target: float, period: int) -> int:
    """The quota (us per `period`) that should give `target` where `quota` gave `measured` (slowdown ~ 1/quota)."""
    if measured <= 0 or target < 1:
        raise CgroupError(f"slowdown factors must be positive and the target at least 1, got measured "
                          f"{measured}, target {target}")
    return max(MIN_QUOTA_US, min(period, round(quota * measured / target)))


def first_quota(target: float, period: int) -> int:
    """The nominal quota P / target, checked against the kernel's minimum."""
    quota = round(period / target)
    if quota < MIN_QUOTA_US:
        enough = int(MIN_QUOTA_US * target * 1.2)
        raise CgroupError(f"--slow {target:g} at --period-us {period} needs a quota of {quota} us, under the "
                          f"kernel's minimum {MIN_QUOTA_US}; use --period-us {enough} or more")
    return quota


@dataclass(frozen=True)
class CpuGroup:
    """One CPU-bandwidth group, `PREFIX` + name, under the cpu controller's root."""
    name: str
    version: str
    root: Path

    @property
    def path(self) -> Path:
        return self.root / (PREFIX + self.name)

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def set(self, quota: int, period: int) -> None:
        """Make the group if needed and give it `quota` us of CPU per `period` us."""
        self.path.mkdir(exist_ok=True)
        try:
            if self.version == "v2":
                (self.path / "cpu.max").write_text(f"{quota} {period}")
            else:  # v1: the period first, then a quota it allows
                (self.path / "cpu.cfs_quota_us").write_text("-1")
                (self.path / "cpu.cfs_period_us").write_text(str(period))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            raise CgroupError(f"{self.path}: cannot set {quota} us per {period} us ({exc}); netbench needs root "
                              f"and a writable cgroup cpu controller") from exc

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside this group (same pid: see JOIN)."""
        return ["sh", "-c", JOIN, str(self.procs), *argv]

    def remove(self) -> None:
        """Move any process left in the group to the root group, then remove the group."""
        if not self.path.exists():
            return
        for pid in self.procs.read_text().split():
            try:
                (self.root / "cgroup.procs").write_text(pid)
            except OSError:  # exited in between
                pass
        os.rmdir(self.path)

    def setting(self) -> str:
        """The group's bandwidth as the kernel holds it, for the report."""
        if self.version == "v2":
            return f"{self.path}/cpu.max = {(self.path / 'cpu.max').read_text().strip()}"
        q, p = ((self.path / f).read_text().strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return f"{self.path}/cpu.cfs_quota_us = {q}, cpu.cfs_period_us = {p}"


def group(name: str) -> CpuGroup:
    version, root = controller()
    return CpuGroup(name, version, root)


def remove_all() -> list[str]:
    """Remove every `PREFIX`* group (any process left in one is moved to the root group first); the removed."""
    try:
        version, root = controller()
    except CgroupError:
        return []
    removed = []
    for path in sorted(root.glob(PREFIX + "*")):
        CpuGroup(path.name[len(PREFIX):], version, root).remove()
        removed.append(str(path))
    return removed


@dataclass(frozen=True)
class Calibration:
    target: float
    period: int
    quota: int  # the quota the runs use
    factor: float  # measured slowdown at that quota
    steps: list[tuple[int, float, float]]  # (quota, full-speed seconds, slowed seconds) per step


def calibrate(time_in: Callable[[CpuGroup | None], float], cal: CpuGroup, target: float, period: int,
              tol: float = TOL, max_steps: int = 6) -> Calibration:
    """Find the quota that slows what `time_in(group)` times (seconds; None: no group) by `target`.

    Each step times it at full speed and in `cal` at the current quota, then moves the quota by
    `next_quota`; the calibration ends within `tol` of the target or after `max_steps` (the last factor
    measured is reported either way)."""
    quota, steps = first_quota(target, period), []
    for _ in range(max_steps):
        cal.set(quota, period)
        base, slowed = time_in(None), time_in(cal)
        steps.append((quota, base, slowed))
        factor = slowed / base
        if abs(factor / target - 1) <= tol:
            break
        quota = next_quota(quota, factor, target, period)
    best = min(steps, key=lambda s: abs(s[2] / s[1] / target - 1))
    return Calibration(target, period, best[0], best[2] / best[1], steps)
