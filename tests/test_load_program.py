"""torch.export programs in load_model: told from torch.save files by their contents (so `disco-compile -` reads
one from stdin), and read weights-only with the forcing scoped to the load and safe under threads."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from disco_compile import load_model
from disco_compile.cli.compile import main as disco_compile
from disco_compile.frontend import exported, load

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    path = tmp_path_factory.mktemp("program") / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), path)
    return path


def test_program_named_otherwise_is_a_program(program, tmp_path):
    renamed = tmp_path / "tiny.pt"
    renamed.write_bytes(program.read_bytes())
    loaded = load_model(renamed)
    assert loaded.description.startswith(f"torch.export program {renamed}") and loaded.shape == (1, 3, 16, 16)


def test_program_from_stdin(program):
    result = CliRunner().invoke(disco_compile, ["-", "--nodes", "2"], input=program.read_bytes())
    assert result.exit_code == 0, result.output
    assert "torch.export program stdin, layers raised to modules" in result.stdout


def test_weights_only_is_restored_and_scoped(program, monkeypatch):
    monkeypatch.setenv(FORCE, "0")
    seen = []
    real = exported.load
    monkeypatch.setattr(exported, "load", lambda path: seen.append(os.environ.get(FORCE)) or real(path))
    load_model(program)
    assert seen == ["1"] and os.environ[FORCE] == "0"
    monkeypatch.delenv(FORCE)
    monkeypatch.setattr(exported, "load", lambda path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        load._read_program(str(program), trust_pickle=False)
    assert FORCE not in os.environ  # put back as it was (absent) after a failure too


def test_weights_only_holds_for_concurrent_loads(program, monkeypatch):
    """Two threads reading programs at once: the first one's restore must not end the second's forcing while
    the second still reads (before the lock, the second read ran unforced)."""
    monkeypatch.delenv(FORCE, raising=False)
    seen = {}

    def slow_load(path):
        name = threading.current_thread().name
        time.sleep(0.2 if name == "first" else 0.5)
        seen[name] = os.environ.get(FORCE)

    monkeypatch.setattr(exported, "load", slow_load)
    threads = [threading.Thread(target=load._read_program, args=(str(program), False), name=n)
               for n in ("first", "second")]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {"first": "1", "second": "1"}, seen
    assert FORCE not in os.environ
