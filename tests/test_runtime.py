"""Export directories and the runtime, on hand-built toy programs (no compiler involved).

Two toy programs, each built with onnx.helper (opset 17), written with
write_bundle and run with run_local against numpy computing the same thing:

  2 nodes:  node 0 keeps x[:, :3] and sends x[:, 3:] to node 1 ("input");
            node 1 sends relu(x[:, 3:] @ W1) back ("output");
            node 0: y = relu(x[:, :3] @ W0) + that.
  3 nodes:  node 0 sends x[:, 2:4] to node 1 and x[:, 4:] to node 2;
            node 1: a1 = relu(x1 @ W1), sent to node 2 ("exchange") and carried;
            node 2: b = relu(x2 @ W2 + a1 @ W21), sent to nodes 0 and 1;
            node 1: a = a1 * b, sent to node 0;
            node 0: y = relu(x[:, :2] @ W0) + a + b, z = concat(a, b).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from disco_compile import BundleError, InputMismatch, MessageError, NodeFailure, PeerTimeout, run_local
from disco_compile.artifact import bundle as bundle_module
from disco_compile.artifact.bundle import canonical_json, check_schedule, load_bundle, schedule_hash, write_bundle
from disco_compile.runtime import InProcHub, NodeExecutor
from disco_compile.cli.run import main as disco_run
from disco_compile.runtime.estimate import WIRE, estimate, parse_rate, stage_times
from disco_compile.runtime.stream import pipelined, read_arrays, write_arrays
from disco_compile.artifact.schedule import Message, Schedule, Stage, StageInput, StageOutput, TensorSpec

MODEL_HASH = hashlib.sha256(b"toy model").hexdigest()
SCRIPT = Path(sys.executable).with_name("disco-run")
# onnxruntime and numpy sum the same float32 products in different orders; the reference is float64
RTOL, ATOL = 1e-6, 1e-6
rng = np.random.default_rng(0)
W = {name: rng.standard_normal(shape).astype(np.float32)
     for name, shape in {"W0": (3, 4), "W1": (3, 4), "V0": (2, 4), "V1": (2, 4), "V2": (2, 4), "V21": (4, 4)}.items()}


# ---------------------------------------------------------------- building toy bundles

def value(name: str, width: int, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, ["batch", width])


def graph_bytes(name: str, nodes, inputs, outputs, initializers=()) -> bytes:
    g = helper.make_graph(nodes, name, inputs, outputs,
                          [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def sliced(src: str, dst: str, start: int, end: int):
    """Slice columns start:end of `src` into `dst` (the constant inputs as initializers)."""
    consts = [(f"{dst}_s", np.array([start])), (f"{dst}_e", np.array([end])), (f"{dst}_a", np.array([1]))]
    return helper.make_node("Slice", [src, *(n for n, _ in consts)], [dst]), consts


def message(id, src, dst, kind, width, src_stage, dst_stage) -> Message:
    return Message(id=id, src=src, dst=dst, kind=kind, tensor=f"t_{id}", channels=list(range(width)),
                   shape=["batch", width], dtype="float32", bytes=4 * width, src_stage=src_stage, dst_stage=dst_stage)


def two_node():
    """The 2-node toy program: (schedule, stage files)."""
    lo, lo_c = sliced("x", "x_lo", 0, 3)
    hi, hi_c = sliced("x", "x_hi", 3, 6)
    files = {
        "node0/stage000.onnx": graph_bytes("n0s0", [lo, hi], [value("x", 6)], [value("x_lo", 3), value("x_hi", 3)],
                                           lo_c + hi_c),
        "node1/stage000.onnx": graph_bytes(
            "n1s0", [helper.make_node("MatMul", ["x_hi", "W1"], ["p"]), helper.make_node("Relu", ["p"], ["h"])],
            [value("x_hi", 3)], [value("h", 4)], [("W1", W["W1"])]),
        "node0/stage001.onnx": graph_bytes(
            "n0s1", [helper.make_node("MatMul", ["x_lo", "W0"], ["p"]), helper.make_node("Relu", ["p"], ["r"]),
                     helper.make_node("Add", ["r", "h"], ["y"])],
            [value("x_lo", 3), value("h", 4)], [value("y", 4)], [("W0", W["W0"])]),
    }
    schedule = Schedule(
        format_version=1, nodes=2,
        inputs=[TensorSpec("x", ["batch", 6], "float32")], outputs=[TensorSpec("y", ["batch", 4], "float32")],
        output_structure="*",
        messages=[message("m_in", 0, 1, "input", 3, 0, 0), message("m_out", 1, 0, "output", 4, 0, 1)],
        programs=[
            [Stage(0, "node0/stage000.onnx", [StageInput("x", "model_input", "x")],
                   [StageOutput("x_lo", "carried", "x_lo"), StageOutput("x_hi", "message", "m_in")]),
             Stage(1, "node0/stage001.onnx",
                   [StageInput("x_lo", "carried", "x_lo"), StageInput("h", "message", "m_out")],
                   [StageOutput("y", "model_output", "y")])],
            [Stage(0, "node1/stage000.onnx", [StageInput("x_hi", "message", "m_in")],
                   [StageOutput("h", "message", "m_out")])],
        ])
    return schedule, files


def two_node_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    return relu(x[:, :3] @ W["W0"]) + relu(x[:, 3:] @ W["W1"])


def three_node():
    """The 3-node toy program: (schedule, stage files)."""
    s0, c0 = sliced("x", "x0", 0, 2)
    s1, c1 = sliced("x", "x1", 2, 4)
    s2, c2 = sliced("x", "x2", 4, 6)
    mm = lambda a, w, out: helper.make_node("MatMul", [a, w], [out])  # noqa: E731
    files = {
        "node0/stage000.onnx": graph_bytes("n0s0", [s0, s1, s2], [value("x", 6)],
                                           [value("x0", 2), value("x1", 2), value("x2", 2)], c0 + c1 + c2),
        "node0/stage001.onnx": graph_bytes(
            "n0s1", [mm("x0", "V0", "p"), helper.make_node("Relu", ["p"], ["r"]),
                     helper.make_node("Add", ["r", "a"], ["ra"]), helper.make_node("Add", ["ra", "b"], ["y"]),
                     helper.make_node("Concat", ["a", "b"], ["z"], axis=1)],
            [value("x0", 2), value("a", 4), value("b", 4)], [value("y", 4), value("z", 8)], [("V0", W["V0"])]),
        "node1/stage000.onnx": graph_bytes(
            "n1s0", [mm("x1", "V1", "p"), helper.make_node("Relu", ["p"], ["a1"])],
            [value("x1", 2)], [value("a1", 4)], [("V1", W["V1"])]),
        "node1/stage001.onnx": graph_bytes(
            "n1s1", [helper.make_node("Mul", ["a1", "b"], ["a"])], [value("a1", 4), value("b", 4)], [value("a", 4)]),
        "node2/stage000.onnx": graph_bytes(
            "n2s0", [mm("x2", "V2", "p"), mm("a1", "V21", "q"), helper.make_node("Add", ["p", "q"], ["s"]),
                     helper.make_node("Relu", ["s"], ["b"])],
            [value("x2", 2), value("a1", 4)], [value("b", 4)], [("V2", W["V2"]), ("V21", W["V21"])]),
    }
    schedule = Schedule(
        format_version=1, nodes=3,
        inputs=[TensorSpec("x", ["batch", 6], "float32")],
        outputs=[TensorSpec("y", ["batch", 4], "float32"), TensorSpec("z", ["batch", 8], "float32")],
        output_structure="(*, *)",
        messages=[message("in1", 0, 1, "input", 2, 0, 0), message("in2", 0, 2, "input", 2, 0, 0),
                  message("ex_a1", 1, 2, "exchange", 4, 0, 0), message("ex_b", 2, 1, "exchange", 4, 0, 1),
                  message("out_b", 2, 0, "output", 4, 0, 1), message("out_a", 1, 0, "output", 4, 1, 1)],
        programs=[
            [Stage(0, "node0/stage000.onnx", [StageInput("x", "model_input", "x")],
                   [StageOutput("x0", "carried", "x0"), StageOutput("x1", "message", "in1"),
                    StageOutput("x2", "message", "in2")]),
             Stage(1, "node0/stage001.onnx",
                   [StageInput("x0", "carried", "x0"), StageInput("a", "message", "out_a"),
                    StageInput("b", "message", "out_b")],
                   [StageOutput("y", "model_output", "y"), StageOutput("z", "model_output", "z")])],
            [Stage(0, "node1/stage000.onnx", [StageInput("x1", "message", "in1")],
                   [StageOutput("a1", "message", "ex_a1"), StageOutput("a1", "carried", "a1")]),
             Stage(1, "node1/stage001.onnx", [StageInput("a1", "carried", "a1"), StageInput("b", "message", "ex_b")],
                   [StageOutput("a", "message", "out_a")])],
            [Stage(0, "node2/stage000.onnx", [StageInput("x2", "message", "in2"), StageInput("a1", "message", "ex_a1")],
                   [StageOutput("b", "message", "out_b"), StageOutput("b", "message", "ex_b")])],
        ])
    return schedule, files


def three_node_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    a1 = relu(x[:, 2:4] @ W["V1"])
    b = relu(x[:, 4:] @ W["V2"] + a1 @ W["V21"])
    a = a1 * b
    return relu(x[:, :2] @ W["V0"]) + a + b, np.concatenate([a, b], axis=1)


@pytest.fixture
def two(tmp_path) -> Path:
    out = tmp_path / "two"
    write_bundle(out, *two_node(), MODEL_HASH)
    return out


@pytest.fixture
def three(tmp_path) -> Path:
    out = tmp_path / "three"
    write_bundle(out, *three_node(), MODEL_HASH)
    return out


def inputs(batch: int, width: int = 6) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, width)).astype(np.float32)


def rewrite_json(path: Path, edit) -> None:
    """Edit a JSON file of an export and fix its sha256 in manifest.json, so only later checks can object."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_bytes(canonical_json(data))
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_bytes(canonical_json(manifest))


# ---------------------------------------------------------------- running

@pytest.mark.parametrize("batch", [1, 5])
def test_two_nodes_match_numpy(two, batch):
    x = inputs(batch)
    (y,) = run_local(two, x)
    assert y.dtype == np.float32 and y.shape == (batch, 4)
    np.testing.assert_allclose(y, two_node_reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 3])
def test_three_nodes_two_outputs_match_numpy(three, batch):
    x = inputs(batch)
    y, z = run_local(three, [x], timeout=5.0, threads=2)
    ref_y, ref_z = three_node_reference(x)
    np.testing.assert_allclose(y, ref_y, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(z, ref_z, rtol=RTOL, atol=ATOL)


def test_torch_tensor_input_and_repeat_runs_agree(three):
    x = inputs(2)
    first = run_local(three, torch.from_numpy(x))
    second = run_local(three, (x,))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_executors_run_twice_and_drop_carried_values(three):
    """NodeExecutors reused for two runs on one hub; carried values do not outlive their last use."""
    bundle = load_bundle(three)
    hub = InProcHub(3)
    executors = [NodeExecutor(bundle, k, hub.transport(k, bundle.schedule_hash), timeout=5.0) for k in range(3)]
    assert executors[1]._drop_after == [[], ["a1"]]
    assert executors[0]._drop_after == [[], ["x0"]]
    for batch in (2, 4):
        x = inputs(batch)
        workers = [threading.Thread(target=executors[k].run, daemon=True) for k in (1, 2)]
        for t in workers:
            t.start()
        out = executors[0].run({"x": x})
        for t in workers:
            t.join(5)
        np.testing.assert_allclose(out["y"], three_node_reference(x)[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("given, expected", [
    (lambda: inputs(2, width=5), r"input 'x': shape \(2, 5\), but the model was exported for \(batch, 6\)"),
    (lambda: inputs(2).astype(np.float64), r"input 'x': dtype float64, but the model was exported for float32"),
    (lambda: [inputs(2), inputs(2)], r"the model takes 1 input\(s\) \('x'\), 2 given"),
    (lambda: inputs(2)[0], r"input 'x': shape \(6\)"),
    (lambda: [[1.0] * 6], "input 'x' is a list; give a numpy array or a torch.Tensor"),
])
def test_wrong_model_inputs_are_refused(two, given, expected):
    with pytest.raises(InputMismatch, match=expected):
        run_local(two, given())


def test_failing_stage_stops_every_node(tmp_path):
    """Node 1's graph gathers a column that does not exist: onnxruntime raises at run time. Node 0, waiting for
    node 1's message, stops at once (not after its timeout) and the error names node 1 and its stage."""
    schedule, files = two_node()
    files["node1/stage000.onnx"] = graph_bytes(
        "n1s0", [helper.make_node("Gather", ["x_hi", "idx"], ["g"], axis=1),
                 helper.make_node("MatMul", ["g", "Wg"], ["h"])],
        [value("x_hi", 3)], [value("h", 4)], [("idx", np.array([7], dtype=np.int64)), ("Wg", W["W1"][:1])])
    write_bundle(tmp_path / "bad", schedule, files, MODEL_HASH)
    start = time.monotonic()
    with pytest.raises(NodeFailure, match=r"node 1 failed: node 1 stage 0 \(node1/stage000.onnx\): onnxruntime "
                                          r"failed: .*; the other nodes were stopped") as info:
        run_local(tmp_path / "bad", inputs(2), timeout=20.0)
    assert time.monotonic() - start < 5.0, "node 0 waited for its timeout instead of stopping"
    assert info.value.node == 1


def test_silent_peer_times_out_naming_message_and_peer(two):
    bundle = load_bundle(two)
    hub = InProcHub(2)
    node0 = NodeExecutor(bundle, 0, hub.transport(0, bundle.schedule_hash), timeout=0.2)
    with pytest.raises(PeerTimeout, match=r"node 0 waited 0.2 s for message 'm_out' \(output\) from node 1"):
        node0.run(inputs(1))  # node 1 never runs


# ---------------------------------------------------------------- transport checks

@pytest.fixture
def hub_pair(two):
    bundle = load_bundle(two)
    hub = InProcHub(2)
    msg = bundle.schedule.message("m_in")
    return hub, bundle.schedule_hash, msg


def test_transport_delivers_a_copy(hub_pair):
    hub, h, msg = hub_pair
    payload = inputs(2, width=3)
    hub.transport(0, h).send(msg, payload)
    payload[:] = 0  # changing the sender's array after send does not change what arrives
    got = hub.transport(1, h).recv(msg, timeout=1.0)
    assert got.any() and got.shape == (2, 3)


@pytest.mark.parametrize("sent, sender_hash, expected", [
    (inputs(2, width=4), None, r"message 'm_in' \(input, node 0 -> node 1\) arrived wrong: shape \(2, 4\), "
                               r"the schedule says \(batch, 3\)"),
    (inputs(2, width=3).astype(np.float64), None, r"message 'm_in' .* dtype float64, the schedule says float32"),
    (inputs(2, width=3), "f" * 64, r"message 'm_in' .* sent under schedule ffffffffffff\.\.\., this node runs "
                                   r"schedule .* the nodes hold different exports"),
])
def test_transport_refuses_a_message_that_disagrees(hub_pair, sent, sender_hash, expected):
    """A peer with another schedule sends message 'm_in': the receiver checks the header against its own."""
    hub, h, msg = hub_pair
    sender_msg = dataclasses.replace(msg, shape=["batch", sent.shape[1]], dtype=sent.dtype.name)
    hub.transport(0, sender_hash or h).send(sender_msg, sent)
    with pytest.raises(MessageError, match=expected):
        hub.transport(1, h).recv(msg, timeout=1.0)


def test_transport_times_out_naming_message_and_peer(hub_pair):
    hub, h, msg = hub_pair
    start = time.monotonic()
    with pytest.raises(PeerTimeout, match=r"node 1 waited 0.1 s for message 'm_in' \(input\) from node 0"):
        hub.transport(1, h).recv(msg, timeout=0.1)
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------- export directory integrity

def test_bundle_reads_back_what_was_written(three):
    schedule, files = three_node()
    bundle = load_bundle(three)
    assert bundle.schedule == schedule
    assert bundle.schedule_hash == schedule_hash(schedule)
    assert bundle.manifest.model_hash == MODEL_HASH and bundle.manifest.nodes == 3
    assert set(bundle.manifest.files) == {"schedule.json", *files}
    assert (three / "schedule.json").read_bytes() == canonical_json(schedule.to_json())
    changed = copy.deepcopy(schedule)
    changed.messages[0].channels = [1, 0]
    assert schedule_hash(changed) != bundle.schedule_hash


def test_changed_stage_file_is_refused(two):
    path = two / "node1" / "stage000.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"node1/stage000.onnx: sha256 mismatch, the file was changed after "
                                          r"export; re-export"):
        run_local(two, inputs(1))


def test_missing_and_unlisted_files_are_named(two):
    (two / "node0" / "stage001.onnx").unlink()
    (two / "notes.txt").write_text("x")
    with pytest.raises(BundleError) as info:
        load_bundle(two)
    assert "node0/stage001.onnx: listed in manifest.json but missing" in str(info.value)
    assert "notes.txt: not listed in manifest.json" in str(info.value)


def test_schema_violation_in_schedule_json(two):
    rewrite_json(two / "schedule.json", lambda s: s["messages"][1].update(kind="broadcast"))
    with pytest.raises(BundleError, match=r"schedule.json does not follow the schedule format .*\n  at "
                                          r"messages/1/kind: 'broadcast' is not one of"):
        load_bundle(two)


def test_edited_schedule_disagreeing_with_graph(two):
    """schedule.json edited consistently (hash fixed): the renamed graph input no longer matches node 1's graph."""
    def rename(s):
        s["programs"][1][0]["inputs"][0]["name"] = "x_high"
    rewrite_json(two / "schedule.json", rename)
    with pytest.raises(BundleError, match=r"node1/stage000.onnx \(node 1 stage 0\): graph inputs \['x_hi'\], but "
                                          r"schedule.json declares \['x_high'\]"):
        load_bundle(two)


def test_graph_with_renamed_input_is_not_written(tmp_path):
    schedule, files = two_node()
    model = onnx.load_from_string(files["node1/stage000.onnx"])
    model.graph.input[0].name = "renamed"
    model.graph.node[0].input[0] = "renamed"
    files["node1/stage000.onnx"] = model.SerializeToString()
    with pytest.raises(BundleError, match=r"(?s)not written, .* node1/stage000.onnx \(node 1 stage 0\): graph inputs "
                                          r"\['renamed'\], but schedule.json declares \['x_hi'\]"):
        write_bundle(tmp_path / "out", schedule, files, MODEL_HASH)
    assert list(tmp_path.iterdir()) == []


def test_message_payload_disagreeing_with_graph_is_named(tmp_path):
    schedule, files = two_node()
    schedule.messages[1] = dataclasses.replace(schedule.messages[1], shape=["batch", 5], bytes=20,
                                               channels=list(range(5)))
    with pytest.raises(BundleError, match=r"node1/stage000.onnx \(node 1 stage 0\): message 'm_out' sent from "
                                          r"graph output 'h': shape \(batch, 4\) in the graph, \(batch, 5\) in "
                                          r"schedule.json"):
        write_bundle(tmp_path / "out", schedule, files, MODEL_HASH)


def _mutate(edit):
    schedule, _ = two_node()
    edit(schedule)
    return schedule


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.programs[1][0].outputs.clear(), "message 'm_out': sent by 0 stage outputs, expected exactly 1"),
    (lambda s: s.programs[0][1].inputs.pop(), "message 'm_out': received by 0 stage inputs, expected exactly 1"),
    (lambda s: setattr(s.messages[0], "dst_stage", 1), "receives message 'm_in', which the messages send to node 1 "
                                                       "stage 1"),
    (lambda s: setattr(s.programs[0][1].inputs[0], "ref", "later"), "uses carried value 'later' before any earlier "
                                                                    "stage of node 0 produces it"),
    (lambda s: s.programs[1][0].inputs.append(StageInput("x", "model_input", "x")),
     "model input 'x' read on node 1; only node 0 holds the model inputs"),
    (lambda s: s.programs[0][1].outputs.clear(), "model output 'y': produced 0 times, expected exactly once"),
    (lambda s: setattr(s.messages[1], "bytes", 4), "message 'm_out': bytes 4, but shape (batch, 4) of float32 is 16"),
    (lambda s: setattr(s.messages[1], "dst", 1), "message 'm_out': from node 1 to itself"),
    # node 0 stage 0 waits for node 1's answer, which waits for node 0 stage 0's input message
    (lambda s: (setattr(s.messages[1], "dst_stage", 0),
                s.programs[0][0].inputs.append(s.programs[0][1].inputs.pop())),
     "stages that wait on each other's messages in a cycle (they would deadlock): node 0 stage 0, node 0 stage 1, "
     "node 1 stage 0"),
])
def test_inconsistent_schedule_is_named(edit, expected):
    with pytest.raises(BundleError, match="schedule.json is inconsistent") as info:
        check_schedule(_mutate(edit))
    assert expected in str(info.value)


def test_not_an_export_directory(tmp_path):
    with pytest.raises(BundleError, match="no such directory"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="no manifest.json, so this is not an export directory"):
        load_bundle(tmp_path)


# ---------------------------------------------------------------- writing safely

def test_existing_directory_refused_then_replaced_with_force(two):
    schedule, files = three_node()
    with pytest.raises(BundleError, match=rf"{two} already exists and is not empty; .* --force"):
        write_bundle(two, schedule, files, MODEL_HASH)
    assert load_bundle(two).schedule.nodes == 2
    write_bundle(two, schedule, files, MODEL_HASH, force=True)
    assert load_bundle(two).schedule.nodes == 3
    assert sorted(p.name for p in two.parent.iterdir()) == ["two"]  # no temporary or old directory left


def test_existing_empty_directory_is_used_and_a_file_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    write_bundle(tmp_path / "empty", *two_node(), MODEL_HASH)
    assert load_bundle(tmp_path / "empty").schedule.nodes == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="file exists and is not a directory"):
        write_bundle(tmp_path / "file", *two_node(), MODEL_HASH, force=True)


def test_failure_while_writing_leaves_nothing_half_written(two, monkeypatch):
    real, calls = bundle_module._write_file, []

    def fail_on_third(path, content):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, content)
    monkeypatch.setattr(bundle_module, "_write_file", fail_on_third)
    schedule, files = three_node()
    before = {p: p.read_bytes() for p in two.rglob("*") if p.is_file()}
    with pytest.raises(BundleError, match=rf"{two}: writing failed .*No space left on device.*nothing was changed"):
        write_bundle(two, schedule, files, MODEL_HASH, force=True)
    assert {p: p.read_bytes() for p in two.rglob("*") if p.is_file()} == before
    calls.clear()
    with pytest.raises(BundleError, match="writing failed"):
        write_bundle(two.parent / "fresh", schedule, files, MODEL_HASH)
    assert sorted(p.name for p in two.parent.iterdir()) == ["two"]


def test_bad_model_hash_and_missing_stage_file_are_refused(tmp_path):
    schedule, files = two_node()
    with pytest.raises(BundleError, match="at model_hash: 'abc' does not match"):
        write_bundle(tmp_path / "a", schedule, files, "abc")
    del files["node0/stage001.onnx"]
    with pytest.raises(BundleError, match="node0/stage001.onnx: node 0 stage 1 has no file in stage_files"):
        write_bundle(tmp_path / "b", schedule, files, MODEL_HASH)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- disco-run

def test_cli_simulate_one_output(two, tmp_path):
    x = inputs(3)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(disco_run, [str(two), "--simulate", "--input", str(tmp_path / "x.npy"),
                                            "--output", str(tmp_path / "y.npy")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), two_node_reference(x), rtol=RTOL, atol=ATOL)


def test_cli_simulate_several_outputs_npz(three, tmp_path):
    x = inputs(2)
    np.save(tmp_path / "x.npy", x)
    args = [str(three), "--simulate", "--input", str(tmp_path / "x.npy")]
    refused = CliRunner().invoke(disco_run, [*args, "--output", str(tmp_path / "o.npy")])
    assert refused.exit_code == 2 and "the model has 2 outputs (y, z); give a .npz file" in refused.output
    result = CliRunner().invoke(disco_run, [*args, "--output", str(tmp_path / "o.npz")])
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "o.npz")
    for name, ref in zip(("y", "z"), three_node_reference(x), strict=False):
        np.testing.assert_allclose(saved[name], ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("extra, expected", [
    ([], "give --simulate to run every node on this machine, or --node K --peers PEERS.yaml"),
    (["--simulate", "--input", "WIDE"], r"input 'x': shape (2, 5), but the model was exported for (batch, 6)"),
    (["--simulate"], "the model takes 1 input(s) ('x'), 0 given (give one --input FILE.npy per model input"),
])
def test_cli_errors_exit_2_without_traceback(two, tmp_path, extra, expected):
    np.save(tmp_path / "wide.npy", inputs(2, width=5))
    args = [str(tmp_path / "wide.npy") if a == "WIDE" else a for a in extra]
    result = CliRunner().invoke(disco_run, [str(two), *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def npy_stream(*arrays) -> bytes:
    buf = io.BytesIO()
    write_arrays(buf, arrays)
    return buf.getvalue()


def test_stream_reading_writing_and_pipelining():
    arrays = [inputs(1), inputs(3), np.arange(5, dtype=np.int64)]
    back = list(read_arrays(io.BytesIO(npy_stream(*arrays))))
    assert len(back) == 3
    for a, b in zip(arrays, back, strict=False):
        np.testing.assert_array_equal(a, b, strict=True)
    assert list(read_arrays(io.BytesIO(b""))) == []
    with pytest.raises(InputMismatch, match="record 2 of the input stream is not a .npy array"):
        list(read_arrays(io.BytesIO(npy_stream(inputs(1)) + b"garbage, not numpy")))
    with pytest.raises(InputMismatch, match="record 1 of the input stream"):
        list(read_arrays(io.BytesIO(npy_stream(inputs(4))[:-3])))  # cut short

    submitted, taken = [], []

    def submit(request):
        submitted.append(request)
        future = Future()
        future.set_result(request * 10)
        return future

    def requests():
        for r in range(7):
            assert len(submitted) - len(taken) <= 3  # never more than depth submitted and not yet taken
            yield r
    for result in pipelined(submit, requests(), depth=3):
        taken.append(result)
    assert taken == [r * 10 for r in range(7)]


def test_cli_stream_on_stdin_and_stdout(three):
    """--input - --output -: each record on stdin one request, each request's outputs records on stdout in order,
    the messages on stderr; --output FILE.npz instead concatenates the requests."""
    xs = [inputs(1), inputs(3), inputs(2)]
    result = CliRunner().invoke(disco_run, [str(three), "--simulate", "--input", "-", "--output", "-"],
                                input=npy_stream(*xs))
    assert result.exit_code == 0, result.stderr
    assert "ran 3 request(s) from the stream" in result.stderr
    records = list(read_arrays(io.BytesIO(result.stdout_bytes)))
    assert len(records) == 6
    for k, x in enumerate(xs):
        for got, ref in zip(records[2 * k:2 * k + 2], three_node_reference(x), strict=False):
            np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_cli_stream_to_a_file(three, tmp_path):
    xs = [inputs(1), inputs(3)]
    result = CliRunner().invoke(disco_run, [str(three), "--simulate", "--input", "-", "--output",
                                            str(tmp_path / "o.npz")], input=npy_stream(*xs))
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "o.npz")
    for name, ref in zip(("y", "z"), three_node_reference(np.concatenate(xs)), strict=False):
        np.testing.assert_allclose(saved[name], ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("args, stdin, expected", [
    (["--input", "-", "--output", "-"], "WIDE", "request 2 of the stream: input 'x': shape (2, 5), but the model"),
    (["--input", "-"], "GARBAGE", "record 1 of the input stream is not a .npy array"),
    (["--input", "-"], "", "the stream on stdin held no arrays"),
    (["--input", "X", "--output", "-"], "", "--output - (a stream on stdout) goes with --input -"),
    (["--input", "-", "--input", "X"], "", "--input - (a stream of .npy arrays on stdin) replaces the other"),
    (["--input", "-", "--procs"], "", "--input - (a stream) runs with --simulate or --node 0"),
    (["--input", "X", "--output", "y.txt"], "", "give a .npy file (one output), a .npz file, or - (with --input -)"),
    (["--input", "FOLDER"], "", "a folder of images is for models with one float32 input (batch, 3, H, W); "
                                "this one takes x float32 (batch, 6): give .npy files"),
])
def test_cli_stream_and_folder_errors(two, tmp_path, args, stdin, expected):
    np.save(tmp_path / "x.npy", inputs(2))
    (tmp_path / "folder").mkdir()
    args = [{"X": str(tmp_path / "x.npy"), "FOLDER": str(tmp_path / "folder")}.get(a, a) for a in args]
    data = {"WIDE": npy_stream(inputs(1), inputs(2, width=5)), "GARBAGE": b"not numpy at all"}.get(stdin, b"")
    result = CliRunner().invoke(disco_run, [str(two), "--simulate", *args], input=data)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "Traceback" not in result.output


def test_estimate_by_hand(two):
    """Two nodes: node 0's stage 0 sends 12 bytes, node 1 answers with 16, node 0's stage 1 ends the run. At a
    rate of R bytes/s and a delay d per message the latency is every stage once plus both messages."""
    bundle = load_bundle(two)
    seconds = stage_times(bundle, inputs(2), reps=3)
    assert [len(s) for s in seconds] == [2, 1] and all(t > 0 for s in seconds for t in s)
    unlimited, slow = estimate(bundle.schedule, seconds, [None, 1000.0], latency=0.01, batch=2)
    stages = seconds[0][0] + seconds[1][0] + seconds[0][1]
    assert unlimited.latency == pytest.approx(stages + 0.02)
    assert slow.latency == pytest.approx(stages + 0.02 + (24 + 32) * WIRE / 1000.0)
    assert slow.direction_bytes == {(0, 1): 24, (1, 0): 32}
    assert slow.bound == pytest.approx(max(sum(seconds[0]), 32 / 1000.0))
    assert unlimited.bound == pytest.approx(max(sum(seconds[0]), seconds[1][0]))
    assert slow.waiting[1] == pytest.approx(seconds[0][0] + 0.01 + 24 * WIRE / 1000.0)


def test_on_stage_sees_each_stage_and_run_stage_repeats_it(two):
    """NodeExecutor's on_stage hook: called once per stage, in order, with the stage's feeds and its seconds;
    run_stage on those feeds gives the same outputs again."""
    bundle = load_bundle(two)
    calls = []
    hub = InProcHub(2)
    executors = [NodeExecutor(bundle, k, hub.transport(k, bundle.schedule_hash), timeout=5.0,
                              on_stage=lambda *call: calls.append(call)) for k in range(2)]
    worker = threading.Thread(target=executors[1].run, daemon=True)
    worker.start()
    x = inputs(2)
    y = executors[0].run({"x": x})["y"]
    worker.join(5)
    assert sorted((node, stage) for node, stage, _, _ in calls) == [(0, 0), (0, 1), (1, 0)]
    assert all(seconds > 0 for *_, seconds in calls)
    (feeds,) = [f for node, stage, f, _ in calls if (node, stage) == (0, 1)]
    assert set(feeds) == {"x_lo", "h"}
    np.testing.assert_array_equal(executors[0].run_stage(1, feeds)["y"], y)


@pytest.mark.parametrize("text, rate", [("100mbit", 12.5e6), ("1gbit", 1.25e8), ("2.5gbit", 3.125e8),
                                        ("500kbit", 62500.0), ("8bit", 1.0), (" None ", None)])
def test_link_rates(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0mbit", "100mb", "1 gbps", ""])
def test_bad_link_rates(text):
    with pytest.raises(ValueError, match="write it as bits per second"):
        parse_rate(text)


def test_cli_estimate(two, tmp_path):
    result = CliRunner().invoke(disco_run, ["estimate", str(two), "--link", "none", "--link", "1kbit",
                                            "--latency-ms", "0", "--reps", "2"])
    assert result.exit_code == 0, result.output
    assert "node 0: 2 stages" in result.stdout and "0->1 0.00 MB, 1->0 0.00 MB" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["none"],
                                                                                                       ["1kbit"])}
    # at 1 kbit/s the 12 + 16 bytes of one sample take (12 + 16) x 8 x WIRE ms on the wire (234.21: printed to
    # 0.1 ms, so at least 234.2 where the compute is faster than 0.05 ms)
    assert float(rows["1kbit"][1]) >= round(28 * 8 * WIRE, 1) and float(rows["none"][1]) < float(rows["1kbit"][1])
    bad = CliRunner().invoke(disco_run, ["estimate", str(two), "--link", "fast"])
    assert bad.exit_code == 2 and "--link: link rate 'fast': write it as bits per second" in bad.output
    missing = CliRunner().invoke(disco_run, ["estimate", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_cli_help_has_an_example():
    result = CliRunner().invoke(disco_run, ["--help"])
    assert result.exit_code == 0
    assert "disco-run out/ --simulate --input x.npy --output y.npy" in result.output


@pytest.mark.skipif(not SCRIPT.exists(), reason="disco-run is not installed next to this Python (pip install -e .)")
def test_disco_run_script(two, tmp_path):
    x = inputs(2)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([str(SCRIPT), str(two), "--simulate", "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), two_node_reference(x), rtol=RTOL, atol=ATOL)
    bad = subprocess.run([str(SCRIPT), str(tmp_path / "nowhere"), "--simulate"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no such directory" in bad.stderr and "Traceback" not in bad.stderr


def test_runtime_does_not_import_torch():
    """Running an export needs onnxruntime only: disco-run starts in about a second, not torch's many."""
    check = "import sys, disco_compile.cli.run; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0
