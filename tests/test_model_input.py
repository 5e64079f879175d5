"""The model input when every node has it (issue 19 item 2, `input_on_all_nodes` with an export): nothing is sent,
every node's stages read the model input themselves, and the shards still compute what the DISCO model computes,
in one process (run_local) and as one OS process per node, each given its own input file. (The input that node 0
sends at the wire precision is tests/test_wire.py's.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import disco_compile as dc
from conftest import assert_close
from disco_compile.artifact.bundle import load_bundle
from disco_compile.budget import selection
from disco_compile.errors import BundleError
from disco_compile.runtime.net.network import run_processes
from test_small_models import OddNet


def _export(tmp_path, nodes: int = 2, input_on_all_nodes: bool = True):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    dm = dc.transform(OddNet().eval(), nodes=nodes, example_inputs=x, input_on_all_nodes=input_on_all_nodes)
    selection.one_shot(dm, dc.Budget(0.5, align=1, wire="int8"), [torch.randn(2, 3, 4, 4) for _ in range(2)])
    out = tmp_path / "out"
    dc.export(dm.eval(), out)
    return dm, x, out


@pytest.mark.parametrize("nodes", [2, 3])
def test_input_on_all_nodes_sends_nothing_and_matches(tmp_path, nodes):
    """No 'input' message and no input wire (the int8 wire quantises the exchanges only); each node's first stage
    reads the model input; the cost report's io bytes are the outputs' alone; run_local == the DISCO model (at
    the fp32 wire: at int8 a value on a rounding tie after another summation order may land one step apart,
    tests/test_wire.py's bounded count, which this VM's kernels hit at N=3)."""
    dm, x, out = _export(tmp_path, nodes)
    assert not dm.input_wires
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["inputs_on_all_nodes"] is True
    assert [m for m in schedule["messages"] if m["kind"] == "input"] == []
    for k, program in enumerate(schedule["programs"]):
        assert any(i["source"] == "model_input" for st in program for i in st["inputs"]), f"node {k} reads no input"
    assert dm.cost().io_bytes == sum(m["bytes"] for m in schedule["messages"] if m["kind"] == "output")
    dm.set_budget(dc.Budget(0.5, align=1, wire="fp32"))
    dc.export(dm, tmp_path / "fp32")
    with torch.no_grad():
        ref = dm(x)
    got = dc.run_local(tmp_path / "fp32", x.numpy())[0]
    assert_close(torch.from_numpy(got), ref, what="shards with the input on all nodes")


def test_only_such_an_export_reads_the_input_on_other_nodes(tmp_path):
    """The same stages without the schedule's flag are refused when loaded: node 1 would read a model input that
    only node 0 holds."""
    _, _, out = _export(tmp_path)
    bundle = load_bundle(out)
    bundle.schedule.inputs_on_all_nodes = False
    from disco_compile.artifact.checks import check_schedule
    with pytest.raises(BundleError, match="read on node 1; only node 0 holds the model inputs"):
        check_schedule(bundle.schedule)


def test_each_node_process_takes_its_own_input(tmp_path):
    """`disco-run OUT --simulate --procs`: every node an OS process over TCP, each given the input file (as a
    device its camera); the outputs are run_local's. A worker given no input is refused with what to do."""
    dm, x, out = _export(tmp_path)
    np.save(tmp_path / "x.npy", x.numpy())
    got = run_processes(out, [tmp_path / "x.npy"], insecure=True)
    np.testing.assert_allclose(got["output0"], dc.run_local(out, x.numpy())[0], rtol=1e-5, atol=1e-6)
    from disco_compile.errors import DiscoError
    from disco_compile.runtime.net.network import serve
    with pytest.raises(DiscoError, match="node 1 takes its own model inputs .* --input FILE"):
        serve(out, 1, {0: "127.0.0.1:1", 1: "127.0.0.1:2"}, insecure=True)
