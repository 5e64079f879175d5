"""The planner (budget/plan.py, disco-compile plan): every prediction is the timeline of the stages it measured,
scaled to the target's speed, over the link at the wire precision's bytes; the speedup is against the whole
model measured in the same passes; bad settings are named errors; the command line keeps the API's defaults."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from disco_compile.budget import plan as planner
from disco_compile.cli import compile_main
from disco_compile.cli import plan as plan_cli
from disco_compile.cli.compile import main as compile_command
from disco_compile.errors import PlanError
from disco_compile.frontend import zoo
from disco_compile.runtime.estimate import WIRE, parse_rate
from disco_compile.runtime.timeline import timeline

SPEED = 4.6
LINK = "100mbit"


@pytest.fixture(scope="module")
def resnet18_plan() -> planner.Plan:
    """ResNet-18 at 64x64 on 2 nodes, budget 0.2, with and without overlap, at fp32 and int8."""
    model, x = zoo.build("resnet18", 64)
    steps = []
    result = planner.plan(model, x, link=LINK, nodes=(2,), budgets=(0.2,), wires=("fp32", "int8"),
                          node_speed=SPEED, reps=2, progress=lambda done, total, what: steps.append((done, total)))
    assert steps[0] == (0, steps[0][1]) and steps[-1] == (steps[0][1], steps[0][1])  # from 0 to all steps done
    assert [d for d, _ in steps] == list(range(len(steps)))
    return result


def test_prediction_is_the_timeline_of_the_measured_stages(resnet18_plan):
    result = resnet18_plan
    assert {(p.overlap, p.wire) for p in result.predictions} == {(o, w) for o in (True, False)
                                                                 for w in ("fp32", "int8")}
    assert [p.latency for p in result.predictions] == sorted(p.latency for p in result.predictions)
    assert result.whole == pytest.approx(SPEED * result.whole_here, rel=1e-12) and result.whole_here > 0
    for p in result.predictions:
        m = p.measured
        assert [len(s) for s in m.seconds] == [len(prog) for prog in m.schedule.programs]
        assert all(msg.dtype == "float32" for msg in m.schedule.messages)  # exported at fp32
        value_bytes = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}[p.wire]
        input_bytes = {"fp32": 4, "fp16": 2}.get(p.wire, 1)  # the input travels at int8 for int4
        at_wire = [dataclasses.replace(msg, bytes=math.ceil(msg.bytes / 4 * value_bytes)) if msg.kind == "exchange"
                   else dataclasses.replace(msg, bytes=msg.bytes // 4 * input_bytes) if msg.kind == "input"
                   else msg for msg in m.schedule.messages]
        direct = timeline(dataclasses.replace(m.schedule, messages=at_wire),
                          [[SPEED * s for s in node] for node in m.seconds], rate=parse_rate(LINK),
                          latency=planner.LATENCY, wire=WIRE).latency
        assert p.latency == pytest.approx(direct, rel=1e-12)
        assert p.speedup == pytest.approx(result.whole / direct, rel=1e-12)
        assert p.compute == pytest.approx([SPEED * sum(node) for node in m.seconds], rel=1e-12)
        assert p.exchange_bytes == sum(msg.bytes for msg in at_wire if msg.kind not in ("input", "output")) > 0
        assert p.comm_bytes == sum(msg.bytes for msg in at_wire) > p.exchange_bytes
    by = {(p.overlap, p.wire): p for p in result.predictions}
    for overlap in (True, False):  # fewer bytes on a 100 Mbit/s link: never slower
        assert by[overlap, "int8"].latency < by[overlap, "fp32"].latency
        io = {w: by[overlap, w].comm_bytes - by[overlap, w].exchange_bytes for w in ("fp32", "int8")}
        inputs = {w: sum(msg.bytes for msg in planner.at_wire(by[overlap, w].measured.schedule, w).messages
                         if msg.kind == "input") for w in ("fp32", "int8")}
        assert inputs["int8"] * 4 == inputs["fp32"] > 0  # the model input travels at the wire
        assert io["fp32"] - io["int8"] == inputs["fp32"] - inputs["int8"]  # the outputs as computed
    stages = {o: sum(len(prog) for prog in by[o, "fp32"].measured.schedule.programs) for o in (True, False)}
    assert stages[True] > stages[False]  # two different exports were timed


def test_node_speed_scales_the_compute(resnet18_plan):
    """Without a link limit and delay, the latency is the stage graph's critical path: F times slower stages
    give an F times longer latency, and the same speedup."""
    m = resnet18_plan.predictions[0].measured
    here = planner.predict(m, "fp32", rate=None, node_speed=1.0, latency=0.0, whole=1.0)
    slow = planner.predict(m, "fp32", rate=None, node_speed=3.0, latency=0.0, whole=3.0)
    assert slow.latency == pytest.approx(3.0 * here.latency, rel=1e-9)
    assert slow.speedup == pytest.approx(here.speedup, rel=1e-9)


@pytest.mark.parametrize("setting, value, match", [
    ("link", "fast", r"^link: link rate 'fast'"),
    ("nodes", (2, 1), r"^nodes: 1: each is a whole number of devices, at least 2"),
    ("nodes", (), r"^nodes: no value given"),
    ("budgets", (0.2, 1.5), r"^budgets: budget rho must be in \[0, 1\]"),
    ("wires", ("int8", "int2"), r"^wires: 'int2': each is one of fp32, fp16, int8, int4"),
    ("node_speed", 0.0, r"^node_speed: 0.0: how many times slower"),
    ("node_speed", float("nan"), r"^node_speed: nan"),
])
def test_bad_settings_are_named(setting, value, match):
    settings = {"link": "1gbit", "nodes": (2,), "budgets": (0.2,), "wires": ("fp32",), "overlaps": (True,),
                "node_speed": 1.0, setting: value}
    with pytest.raises(PlanError, match=match):
        planner.check_candidates(**settings)


def test_cli_defaults_are_the_apis():
    assert plan_cli.NODES == ",".join(map(str, planner.NODES))
    assert plan_cli.BUDGETS == ",".join(f"{b:g}" for b in planner.BUDGETS)
    assert plan_cli.WIRES == ",".join(planner.WIRES)
    assert plan_cli.LATENCY_MS == planner.LATENCY * 1e3 and plan_cli.REPS == planner.REPS
    assert plan_cli.OVERLAP_CHOICES["both"] == planner.OVERLAPS
    assert set(plan_cli._OPTIONS) <= {"link", "nodes", "budgets", "wires", "node_speed", "compute_weight"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).eval()
    path = tmp_path_factory.mktemp("plan") / "tiny.pt"
    torch.save(model, path)
    return path


def test_cli_prints_the_candidates_and_the_command_of_the_fastest(tiny):
    args = [str(tiny), "--trust-pickle", "--input-shape", "1,3,16,16", "--link", "1gbit", "--budgets", "0.5",
            "--wire", "fp32,int4", "--node-speed", "2", "--reps", "1", "--json", "-"]
    result = CliRunner().invoke(plan_cli.plan, args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    got = plan["candidates"]
    assert {(c["overlap"], c["wire"]) for c in got} == {(o, w) for o in (True, False) for w in ("fp32", "int4")}
    assert [c["latency_ms"] for c in got] == sorted(c["latency_ms"] for c in got)
    assert plan["node_speed"] == 2.0 and plan["rate_bytes_per_s"] == 1e9 / 8
    for c in got:
        assert c["speedup"] == pytest.approx(plan["whole_model_ms"] / c["latency_ms"], rel=1e-12)
    best = got[0]
    expected = (f"disco-compile {tiny} --input-shape 1,3,16,16 --trust-pickle --nodes 2 --budget 0.5"
                + ("" if best["overlap"] else " --no-overlap") + ("" if best["wire"] == "fp32" else " --wire int4"))
    assert plan["run"]["command"] == expected + " --out OUT"
    assert f"compile it: {expected} --out OUT" in result.stderr  # the table goes to stderr with --json -
    words = shlex.split(plan["run"]["command"])
    parsed = compile_command.make_context("disco-compile", words[1:])  # disco-compile takes the line as it is
    assert parsed.params["nodes"] == 2 and parsed.params["budget"] == 0.5 and parsed.params["out_dir"] == "OUT"


@pytest.mark.parametrize("args, match", [
    (["--link", "fast"], r"--link: link rate 'fast'"),
    (["--link", "1gbit", "--nodes", "1"], r"--nodes: 1: each is a whole number"),
    (["--link", "1gbit", "--nodes", "two"], r"Invalid value for '--nodes'.*comma-separated"),
    (["--link", "1gbit", "--wire", "int2"], r"--wire: 'int2': each is one of"),
    (["--link", "1gbit", "--node-speed", "-1"], r"--node-speed: -1.0: how many times slower"),
])
def test_cli_bad_options_are_named(args, match):
    result = CliRunner().invoke(plan_cli.plan, ["resnet18", *args])
    assert result.exit_code == 2 and re.search(match, result.output, re.S), result.output


def test_disco_compile_plan_runs_the_planner(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["disco-compile", "plan", "--help"])
    with pytest.raises(SystemExit) as done:
        compile_main()
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: disco-compile plan [OPTIONS] MODEL") and "--node-speed" in out


def test_help_imports_no_torch():
    check = ("import sys; from click.testing import CliRunner; import disco_compile.cli.plan as m; "
             "r = CliRunner().invoke(m.plan, ['--help']); assert r.exit_code == 0, r.output; "
             "sys.exit('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"torch imported while building the plan command's help\n{done.stderr}"


def test_busy_machine_is_told(resnet18_plan):
    """A load average above the cores means the times measured here are slower than the cores are."""
    cores = os.cpu_count() or 1
    assert not dataclasses.replace(resnet18_plan, load=(0.0, cores)).busy
    assert dataclasses.replace(resnet18_plan, load=(0.0, cores + 0.5)).busy
    assert resnet18_plan.as_dict()["load_average"] == list(resnet18_plan.load)


def test_compile_line_repeats_the_model_options_as_given(resnet18_plan):
    best = dataclasses.replace(resnet18_plan.best, nodes=3, budget=0.05, wire="int8", overlap=False)
    line = plan_cli._compile_line("my weights.pt", (1, 3, 32, 32), "timm:resnet10t", True, 0, best)
    assert line == ("disco-compile 'my weights.pt' --input-shape 1,3,32,32 --arch timm:resnet10t --trust-pickle "
                    "--nodes 3 --budget 0.05 --no-overlap --wire int8 --compute-weight 0 --out OUT")
