"""The command lines' conventions: --version, disco-run's subcommands and shell completion, `-` for stdout,
help without torch, the install disco-compile needs, SIGINT/SIGTERM (one line, 130/143), --log-level with
timestamps, bad flag values as named usage errors, --benchmark, --provider, --threads, estimate beside one node."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from disco_compile import export, transform
from disco_compile.cli import main as compile_group
from disco_compile.cli.compile import main as disco_compile
from disco_compile.cli.run import main as disco_run
from disco_compile.runtime import executor
from disco_compile.runtime.net.network import free_ports

PYTHON = sys.executable
COMPLETE = [PYTHON, "-c", "from disco_compile.cli.run import main; main(prog_name='disco-run')"]  # as the script
COMPILE_SCRIPT = [PYTHON, "-c", "from disco_compile.cli import compile_main; compile_main()"]  # as disco-compile
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) disco_compile", re.M)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """A tiny export on 2 nodes, with its input in x.npy beside it."""
    root = tmp_path_factory.mktemp("conventions")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    export(transform(model, 2, x), root / "two")
    np.save(root / "x.npy", x.numpy())
    torch.save(model, root / "tiny.pt")
    return root / "two"


def run(*args, **kw):
    return CliRunner().invoke(disco_run, [str(a) for a in args], **kw)


def _completion_env(var: str, words: str) -> dict[str, str]:
    """The environment in which bash asks a click script to complete the last of `words` (click's protocol)."""
    return dict(os.environ, **{var: "bash_complete"}, COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))


def _completions(script: list[str], var: str, words: str) -> set[str]:
    """What a bash TAB after `words` offers (one 'type,value' line each), as the script runs."""
    done = subprocess.run(script, env=_completion_env(var, words), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return {line.split(",", 1)[1] for line in done.stdout.splitlines() if "," in line}


@pytest.mark.parametrize("command, name", [(compile_group, "disco-compile"), (disco_compile, "disco-compile"),
                                           (disco_run, "disco-run")])
def test_version(command, name):
    result = CliRunner().invoke(command, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(rf"{name}, version \d+\.\d+\.\d+\S*\n", result.stdout)


def test_subcommands_in_help_and_completion():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("keygen", "estimate", "info", "run"):
        assert re.search(rf"^  {command}\s", result.stdout, re.M), result.stdout
    assert {"keygen", "estimate", "info", "run"} <= _completions(COMPLETE, "_DISCO_RUN_COMPLETE", "disco-run ")
    assert "--simulate" in _completions(COMPLETE, "_DISCO_RUN_COMPLETE", "disco-run out/ --si")  # run's options


def test_compile_group_lists_its_commands_and_completes_them():
    """disco-compile is a group: its help shows the default usage and plan; a TAB completes plan, and after a
    model the compile command's options (MODEL ... is `compile MODEL ...`)."""
    result = CliRunner().invoke(compile_group, ["--help"], prog_name="disco-compile")
    assert result.exit_code == 0, result.output
    assert "disco-compile MODEL --nodes N ..." in result.stdout and "disco-compile plan MODEL --link RATE" in \
        result.stdout
    for command in ("compile", "plan"):
        assert re.search(rf"^  {command}\s", result.stdout, re.M), result.stdout
    assert _completions(COMPILE_SCRIPT, "_DISCO_COMPILE_COMPLETE", "disco-compile pl") == {"plan"}
    assert "--no-overlap" in _completions(COMPILE_SCRIPT, "_DISCO_COMPILE_COMPLETE", "disco-compile m.pt --no-ov")
    assert "--node-speed" in _completions(COMPILE_SCRIPT, "_DISCO_COMPILE_COMPLETE", "disco-compile plan m.pt --nod")


@pytest.mark.parametrize("args, usage", [(["resnet18", "--nodes", "0"], "Usage: disco-compile compile [OPTIONS] MODEL"),
                                         (["plan", "resnet18"], "Usage: disco-compile plan [OPTIONS] MODEL")])
def test_compile_group_runs_the_command_named_else_compile(args, usage):
    """A first argument that names no subcommand is compile's MODEL (its --nodes check answers: nothing is built)."""
    result = CliRunner().invoke(compile_group, args, prog_name="disco-compile")
    assert result.exit_code == 2 and result.stderr.startswith(usage), result.output


HEAVY = ("torch", "onnxruntime", "numpy", "jsonschema", "zmq", "onnx")  # what --help must not wait for


@pytest.mark.parametrize("module, argv", [
    ("disco_compile.cli.compile", [["--help"], ["--version"]]),
    ("disco_compile.cli", [["--help"], ["--version"], ["plan", "--help"], ["compile", "--help"], ["m.pt", "--help"]]),
    ("disco_compile.cli.run", [["--help"], ["--version"], ["run", "--help"], ["info", "--help"],
                               ["estimate", "--help"], ["keygen", "--help"]]),
])
def test_help_imports_nothing_heavy(module, argv):
    """--help, --version (and so each completion TAB) load click and the command's module only: no torch, and for
    disco-run none of the runtime's packages (before: 0.5-1.5 s for disco-run --help, onnxruntime and numpy)."""
    check = (f"import sys; from click.testing import CliRunner; import {module} as m\n"
             f"for args in {argv!r}:\n"
             f"    r = CliRunner().invoke(m.main, args); assert r.exit_code == 0, (args, r.output)\n"
             f"print(' '.join(name for name in {HEAVY!r} if name in sys.modules))")
    done = subprocess.run([PYTHON, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"{module} {argv} imported {done.stdout.strip()}"


@pytest.mark.parametrize("script, var, words, offered", [
    (COMPLETE, "_DISCO_RUN_COMPLETE", "disco-run ", "plain,keygen"),
    (COMPILE_SCRIPT, "_DISCO_COMPILE_COMPLETE", "disco-compile ", "plain,plan"),
    (COMPILE_SCRIPT, "_DISCO_COMPILE_COMPLETE", "disco-compile plan m.pt --li", "plain,--link"),
])
def test_completion_imports_nothing_heavy(script, var, words, offered):
    """A TAB after `disco-run ` or `disco-compile ` lists the subcommands with their help, as the script runs it."""
    check = ("import sys, atexit; atexit.register(lambda: sys.stderr.write(' '.join(n for n in "
             f"{HEAVY!r} if n in sys.modules))); " + script[2])
    done = subprocess.run([PYTHON, "-c", check], env=_completion_env(var, words), capture_output=True, text=True,
                          timeout=60)
    assert offered in done.stdout, done.stdout + done.stderr
    assert done.stderr.split() == [], f"completion imported {done.stderr.strip()}"


def test_run_defaults_are_the_runtimes():
    """cli/run.py writes the runtime's timeouts out (importing them would load onnxruntime for --help)."""
    from disco_compile.cli import run as cli_run
    from disco_compile.runtime.net.zmq_transport import DEFAULT_CONNECT_TIMEOUT
    assert (cli_run.TIMEOUT, cli_run.CONNECT_TIMEOUT) == (executor.DEFAULT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)


def test_compile_without_torch_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError, as without the extra
    result = CliRunner().invoke(disco_compile, ["resnet18", "--nodes", "2"])
    assert result.exit_code == 2, result.output
    assert "pip install 'disco-compile[compile]'" in result.stderr and "Traceback" not in result.output


def test_json_dash_writes_stdout(two, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(disco_compile, [str(two.parent / "tiny.pt"), "--trust-pickle", "--nodes", "2",
                                                "--input-shape", "1,3,16,16", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "-").exists(), "--json - wrote a file named -"
    report = json.loads(result.stdout)
    assert report["nodes"] == 2 and report["run"]["nodes"] == 2
    assert "exchange ratio" in result.stderr  # the printed report moved to stderr


def test_model_dash_reads_stdin(two):
    result = CliRunner().invoke(disco_compile, ["-", "--trust-pickle", "--nodes", "2", "--input-shape", "1,3,16,16"],
                                input=(two.parent / "tiny.pt").read_bytes())
    assert result.exit_code == 0, result.output
    assert "model    Sequential pickled in stdin (loaded with --trust-pickle)" in result.stdout


@pytest.mark.parametrize("args, option, text", [
    (["--timeout", "nan"], "--timeout", "finite number of seconds above 0, got nan"),
    (["--timeout", "inf"], "--timeout", "finite number of seconds above 0, got inf"),
    (["--connect-timeout", "nan"], "--connect-timeout", "got nan"),
    (["--threads", "100000"], "--threads", f"must be between 1 and {os.cpu_count()}"),
    (["--provider", "nosuch"], "--provider", "onnxruntime has no execution provider 'nosuch'; available here"),
])
def test_bad_run_flags_are_named(two, args, option, text):
    result = run(two, "--simulate", "--input", two.parent / "x.npy", *args)
    assert result.exit_code == 2, result.output
    assert option in result.stderr and text in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("weights", ["inf,1", "1e308,1e308", "nan,1", "0,1"])
def test_bad_node_weights_are_named(weights):
    result = CliRunner().invoke(disco_compile, ["resnet18", "--nodes", "2", "--node-weights", weights])
    assert result.exit_code == 2, result.output
    assert "'--node-weights'" in result.stderr and "a finite number above 0" in result.stderr


def test_unavailable_provider_and_cpu():
    if "CUDAExecutionProvider" not in executor.ort.get_available_providers():
        with pytest.raises(executor.ProviderError, match="CUDAExecutionProvider is not available"):
            executor.use_providers(["cuda"])
    try:
        assert executor.use_providers(["cpu"]) == ["CPUExecutionProvider"]
    finally:
        executor.use_providers([])


def test_benchmark_prints_latency_and_throughput(two):
    result = run(two, "--simulate", "--input", two.parent / "x.npy", "--benchmark", 5, "--threads", 1)
    assert result.exit_code == 0, result.output
    found = re.search(r"benchmark: 5 request\(s\) of batch 1 after 2 warm-up, one at a time: latency median "
                      r"([0-9.]+) ms, p90 ([0-9.]+) ms; throughput ([0-9.]+) samples/s", result.stdout)
    assert found, result.stdout
    median, p90, throughput = map(float, found.groups())
    assert 0 < median <= p90 and throughput > 0
    refused = run(two, "--simulate", "--procs", "--insecure", "--input", two.parent / "x.npy", "--benchmark", 5)
    assert refused.exit_code == 2 and "--benchmark K times requests" in refused.stderr


def test_estimate_shows_one_node_beside_the_split(two, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # a device install has no tqdm
    result = run("estimate", two, "--link", "1gbit", "--reps", 1)
    assert result.exit_code == 0, result.output
    one = float(re.search(r"one node alone, every node's stages in turn, no messages: ([0-9.]+) ms",
                          result.stdout).group(1))
    row = re.search(r"1gbit\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)x", result.stdout)
    assert row, result.stdout
    latency, ratio = float(row.group(1)), float(row.group(2))
    # both times are printed to 0.1 ms (a tiny model: under 1 ms), the ratio to 0.01, from the unrounded times
    assert one > 0 and (one - 0.05) / (latency + 0.05) - 0.005 <= ratio <= (one + 0.05) / (latency - 0.05) + 0.005


def _node(two: Path, peers: Path, node: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "disco_compile.cli.run", str(two), "--node", str(node), "--peers",
                             str(peers), "--insecure", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _peers(tmp_path: Path) -> Path:
    peers = tmp_path / "peers.yaml"
    peers.write_text("".join(f"{k}: 127.0.0.1:{p}\n" for k, p in enumerate(free_ports(2))))
    return peers


def _wait_started(proc: subprocess.Popen, seconds: float = 30.0) -> None:
    """Until the process has imported its modules and installed its handlers (a signal before that is Python's)."""
    deadline = time.monotonic() + seconds
    pid = proc.pid
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.05)
    raise AssertionError("the node did not start")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_a_node_with_one_line(two, tmp_path, signum, status):
    proc = _node(two, _peers(tmp_path), 1)  # waits for node 0, which never comes
    _wait_started(proc)
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"disco-run: interrupted ({signal.Signals(signum).name})", err
    assert "Aborted!" not in err and "Traceback" not in err


def test_a_signal_inside_an_extension_import_ends_with_one_line():
    """A signal while an extension module initialises (onnxruntime's, measured: the node's first seconds) reaches
    the command as that module's ImportError raised from the Stopped: it is still the signal's one line and
    status, not a traceback."""
    from disco_compile.cli.common import Command, Stopped

    @click.command(cls=Command)
    def importing() -> None:
        raise ImportError("initialization failed") from Stopped(signal.SIGTERM)
    result = CliRunner().invoke(importing, [], prog_name="disco-run")
    assert result.exit_code == 143 and result.output.strip() == "disco-run: interrupted (SIGTERM)", result.output


def test_signal_ends_disco_compile_with_one_line(tmp_path):
    out = tmp_path / "shards"
    proc = subprocess.Popen([PYTHON, "-m", "disco_compile.cli.compile", "resnet50", "--nodes", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_started(proc, 120)
    first = proc.stderr.readline()  # "building resnet50 ... done": tracing, splitting and export (seconds) follow
    assert first.startswith("building resnet50"), first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, first + err
    assert err.strip().splitlines()[-1].endswith("disco-compile: interrupted (SIGINT)"), err
    assert "Aborted!" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("level, shown", [("info", True), ("warning", False)])
def test_node_logs_have_time_and_level(two, tmp_path, level, shown):
    peers = _peers(tmp_path)
    worker = _node(two, peers, 1, "--log-level", level)
    client = _node(two, peers, 0, "--input", str(two.parent / "x.npy"), "--log-level", level)
    _, client_err = client.communicate(timeout=120)
    _, worker_err = worker.communicate(timeout=120)
    assert client.returncode == 0 and worker.returncode == 0, client_err + worker_err
    assert bool(TIMESTAMPED.search(worker_err)) is shown, worker_err
    if shown:
        assert "INFO disco_compile.runtime.net: node 1: every peer answered; serving" in worker_err
