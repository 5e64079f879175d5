"""benchmarks/netbench.py's pure parts: the cgroup quota maths, the calibration loop, argument parsing, link names,
the network's naming and core placement, the model bound per switch port; and one real cgroup (root only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import netbench as nb  # noqa: E402
import netbench_cgroup as cg  # noqa: E402
import netbench_doc as doc  # noqa: E402
import netbench_net as net  # noqa: E402


def test_next_quota_moves_by_the_measured_over_target_ratio():
    # slowdown ~ period / quota: 5.0x measured at 2170 us for a 4.6x target wants 2170 * 5.0 / 4.6 = 2359 us
    assert cg.next_quota(2170, 5.0, 4.6, 10000) == 2359
    assert cg.next_quota(2170, 4.0, 4.6, 10000) == 1887  # too fast: less quota
    assert cg.next_quota(1100, 1.0, 4.6, 5000) == cg.MIN_QUOTA_US  # clamped to the kernel's minimum
    assert cg.next_quota(4000, 9.0, 1.5, 5000) == 5000  # never more than the period
    with pytest.raises(cg.CgroupError, match="positive"):
        cg.next_quota(2000, 0.0, 4.6, 10000)


def test_first_quota_refuses_a_quota_under_the_kernels_minimum():
    assert cg.first_quota(4.6, 5000) == 1087
    with pytest.raises(cg.CgroupError, match="--period-us 6000 or more"):
        cg.first_quota(5.0, 4000)


class FakeGroup:
    def __init__(self):
        self.quota = None

    def set(self, quota, period):
        self.quota = quota


def test_calibrate_converges_on_a_process_whose_slowdown_exceeds_the_nominal():
    # a model of what was measured: 1.087x the nominal slowdown (2170/10000 gave 5.0x, nominal 4.61x)
    g = FakeGroup()
    cal = cg.calibrate(lambda grp: 0.1 if grp is None else 0.1 * 1.087 * 10000 / g.quota, g, 4.6, 10000)
    assert abs(cal.factor / 4.6 - 1) <= 0.03
    assert len(cal.steps) == 2 and cal.steps[0][0] == 2174 and cal.quota == cal.steps[-1][0]


def test_calibrate_reports_the_closest_step_when_it_cannot_reach_the_target():
    g = FakeGroup()  # a slowdown that ignores the quota: the calibration stops after max_steps
    cal = cg.calibrate(lambda grp: 0.1 if grp is None else 0.2, g, 4.6, 10000, max_steps=3)
    assert len(cal.steps) == 3 and cal.factor == pytest.approx(2.0)


def test_group_argv_joins_the_group_and_keeps_the_pid(tmp_path):
    g = cg.CpuGroup("_t", "v1", tmp_path)
    (tmp_path / "discobench_t").mkdir()
    argv = g.argv([sys.executable, "-c", "import os; print(os.getpid())"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    assert (tmp_path / "discobench_t" / "cgroup.procs").read_text().strip() == out


def test_parse_args_reads_lists_and_names_every_problem(capsys):
    a = nb.parse_args(["--nodes", "2,3,4", "--slow", "4.6", "--links", "unshaped,1gbit@4000", "--pipelined", "8"])
    got = (a.node_counts, a.slow_factors, a.link_list, a.pipelined)
    assert got == ([2, 3, 4], [4.6], ["unshaped", "1gbit@4000"], 8)
    with pytest.raises(SystemExit):
        nb.parse_args(["--nodes", "1", "--slow", "0.5", "--links", "2gbit,unshaped@4000", "--workloads", "foo"])
    err = capsys.readouterr().err
    for part in ("--nodes: 1", "--slow: 0.5", "2gbit: the rate is one of", "unshaped@4000: only a shaped rate",
                 "--workloads: unknown foo"):
        assert part in err


def test_units_run_the_whole_model_once_per_speed_and_every_split_per_node_count():
    a = nb.parse_args(["--nodes", "2,3", "--slow", "4.6", "--workloads", "whole,disco"])
    assert nb.units(a) == [("1", 1, "whole"), ("1", 2, "disco"), ("1", 3, "disco"),
                           ("4.6", 1, "whole"), ("4.6", 2, "disco"), ("4.6", 3, "disco")]
    assert nb.run_key("4.6", 3, "whole", "1gbit") == "4.6/n1/whole/1gbit"


def test_nodes_share_cores_round_robin(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert [net.core(k) for k in range(4)] == [0, 1, 0, 1]
    assert net.sharing(2) == "each of the 2 nodes on its own core"
    assert net.sharing(3) == "3 nodes on 2 cores, sharing them: core 0: nodes 0, 2; core 1: nodes 1"
    assert net.peers_yaml(3) == "0: 10.77.0.1:47100\n1: 10.77.0.2:47101\n2: 10.77.0.3:47102\n"


def test_bound_is_the_busiest_switch_port_direction():
    results = {"compute": {"1": {"n3/disco": [0.010, 0.012, 0.011]}},
               "bytes": {"n3/disco": {"0->1": 1_000_000, "0->2": 1_000_000, "1->0": 500_000, "2->1": 250_000}}}
    # node 0 sends 2 MB through its port: 16 ms at 1 Gbit/s, more than any node's compute
    assert doc.bound(results, "1", 3, "disco", "1gbit") == pytest.approx(0.016, rel=1e-9)
    assert doc.bound(results, "1", 3, "disco", "unshaped") == pytest.approx(0.012, rel=1e-9)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()
                    and cg.v2_root() is None, reason="needs root and a cgroup cpu controller")
def test_a_real_group_is_set_joined_and_removed():
    g = cg.group("_pytest")
    try:
        g.set(2000, 10000)
        assert "2000" in g.setting() and "10000" in g.setting()
        out = subprocess.run(g.argv(["cat", "/proc/self/cgroup"]), capture_output=True, text=True, check=True)
        assert "discobench_pytest" in out.stdout
    finally:
        g.remove()
    assert not g.path.exists()


def test_the_hand_written_observations_survive_a_rewrite(tmp_path):
    md = tmp_path / "latency.md"
    assert doc.kept_observations(md) == []
    md.write_text("# Latency\n\n| old table |\n\n## Observations (by hand)\n\n- a finding\n")
    assert doc.kept_observations(md) == ["## Observations (by hand)\n\n- a finding", ""]


def test_goals_compare_with_the_whole_model_at_the_same_speed_and_link():
    # (speed, nodes, workload, link) -> (median s, throughput /s, schedule s)
    med = {("4.6", 1, "whole", "100mbit"): (0.50, 2.0, 0.50), ("4.6", 2, "disco", "100mbit"): (0.25, 5.0, 0.20),
           ("4.6", 2, "dense", "100mbit"): (1.50, 0.7, 1.20), ("1", 1, "whole", "100mbit"): (0.10, 10.0, 0.10)}
    lines = doc.goal_lines(med, ["4.6"], [2], ["100mbit"])
    assert ("- speed 4.6, N=2, DISCO rho=0.2 vs whole model (1 node) at 100mbit: latency 2.00x faster, throughput "
            "2.50x (goal >= 1.5x); the schedules alone 2.50x") in lines
    assert any("vs dense split (rho=1) at 100mbit: latency 6.00x" in line for line in lines)
    assert "- speed 4.6, N=2, DISCO rho=0.2 at 100mbit: median / schedule 1.25 (goal <= 1.15)" in lines


def test_stage_medians_are_scaled_to_keep_a_throttled_pass_in():
    # three stages of 1 ms; in passes 0-2 one of them (a different one) waits out an 8 ms period
    per = [[0.009, 0.001, 0.001, 0.001], [0.001, 0.009, 0.001, 0.001], [0.001, 0.001, 0.009, 0.001]]
    scale, times = nb.scaled_medians(per)
    assert scale == pytest.approx(11 / 3, rel=1e-9)  # passes of 11 ms against medians summing to 3 ms
    assert sum(times) == pytest.approx(0.011, rel=1e-9)
    assert nb.scaled_medians([[0.002, 0.002], [0.001, 0.001]]) == (pytest.approx(1.0), [0.002, 0.001])


def test_rounds_pool_latencies_and_average_throughput_and_cpu_per_node():
    a = {"lat": [0.1, 0.2], "tput": 4.0, "wall_s": 10.0, "cpu": [0.05, 0.07]}
    b = {"lat": [0.3], "tput": 2.0, "wall_s": 20.0, "cpu": [0.07, 0.09]}
    r = nb.pooled(nb.pooled(None, a), b)
    assert r["lat"] == [0.1, 0.2, 0.3] and r["tput"] == 3.0 and r["wall_s"] == 15.0
    assert r["cpu"] == pytest.approx([0.06, 0.08], rel=1e-9) and len(r["rounds"]) == 2


def test_placement_says_whether_slowed_nodes_sharing_a_core_fit_in_it(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    results = {"calibration": {"4.6": {"quota_us": 2360, "period_us": 10000}, "1.5": {"quota_us": 6700,
                                                                                      "period_us": 10000}}}
    assert doc.placement(results, "4.6", 4).endswith("2 on one core at most 47% together, within the core.")
    assert doc.placement(results, "1.5", 3).endswith("more than the core: they slow each other.")
    assert doc.placement(results, "1", 2) == "Placement: each of the 2 nodes on its own core."
