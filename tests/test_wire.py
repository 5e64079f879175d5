"""Wire precision (ops/wire.py, issue 19 items 1 and 3): the fake quantisation the DISCO model trains with is what
the shards send, the schedule's dtype and bytes tell the truth, and the shards compute what the DISCO model
computes with the same quantisation, up to values on a rounding tie (counted, at most one step each)."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import disco_compile as dc
from disco_compile.budget import selection
from disco_compile.budget.finetuning import finetune
from disco_compile.errors import BudgetError
from disco_compile.ops import wire as wires
from disco_compile.ops.modules import SparseExchange
from disco_compile.runtime.transport import InProcTransport

INTEGER = ("int8", "int4")


class Net(nn.Module):
    """Convs with BatchNorm, a residual add, channels not divisible by the nodes, a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 21, 3, padding=1), nn.BatchNorm2d(21)
        self.c2, self.b2 = nn.Conv2d(21, 21, 3, padding=1), nn.BatchNorm2d(21)
        self.c3 = nn.Conv2d(21, 30, 3, stride=2, padding=1)
        self.fc = nn.Linear(30, 7)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        return self.fc(torch.relu(self.c3(h)).mean((2, 3)))


def _batches(n: int, seed: int, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n)]


def _model(nodes: int, wire: str, rho: float = 0.5, allocation: str = "global") -> dc.DiscoModel:
    torch.manual_seed(0)
    dm = dc.transform(Net().eval(), nodes=nodes, example_inputs=_batches(1, 1)[0])
    selection.one_shot(dm, dc.Budget(rho, allocation=allocation, align=1, wire=wire, compute_weight=0),
                       _batches(3, 2))
    return dm.eval()


# ---------------------------------------------------------------- the quantisation itself

@pytest.mark.parametrize("wire", INTEGER)
def test_fake_quantisation_is_the_wire_round_trip(wire):
    """fake(x) == dequantise(quantise(x)) bit for bit, ties included (round half to even), values beyond the
    calibrated range saturated."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(5, generator=g) + 0.1
    x = torch.randn(3, 5, 4, 3, generator=g) * 20
    x[0, :, 0, 0] = scale * torch.tensor([0.5, 1.5, -2.5, 2.5, -0.5])  # exact ties
    fake = wires.fake(x, wire, scale.reshape(5, 1, 1))
    zero = torch.zeros(5, dtype=torch.int8)
    sent = wires.quantise(x, scale, zero, 1, wire, (1, *x.shape[1:]))
    back = wires.dequantise(sent, scale, zero, 1, wire, (1, *x.shape[1:]))
    assert torch.equal(fake, back)
    lo, hi = wires.RANGES[wire]
    q = torch.round(fake / scale.reshape(5, 1, 1))
    assert q.min() == lo and q.max() == hi  # saturated
    assert torch.equal(q[0, :, 0, 0], torch.tensor([0.0, 2.0, -2.0, 2.0, -0.0]))


def test_straight_through_gradients():
    """d fake / dx = 1 inside the range and 0 where saturated; the scales get a gradient (learned)."""
    scale = torch.tensor([0.1, 0.2], requires_grad=True)
    x = torch.tensor([[0.05, 100.0], [-0.3, -0.01]], requires_grad=True)
    wires.fake(x, "int8", scale).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert scale.grad is not None and torch.all(scale.grad != 0)


def test_int4_packing_layout():
    """Two values a byte, (q[2k] + 8) + 16 (q[2k+1] + 8), per sample, an odd count ending in a 0 nibble;
    shapes are per sample with dim 0 the rows a sample folds into dim 0 (1: dim 0 is the batch)."""
    q = torch.tensor([[-8, 7, 0, -1, 3], [1, 2, 3, 4, 5]], dtype=torch.float32)  # 5 values a sample: odd
    packed = wires.quantise(q, torch.ones(()), torch.zeros((), dtype=torch.int8), 0, "int4", (1, 5))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    assert packed[0].tolist() == [0 + 16 * 15, 8 + 16 * 7, 11 + 16 * 0]  # the padding nibble is 0
    back = wires.dequantise(packed, torch.ones(()), torch.zeros((), dtype=torch.int8), 0, "int4", (1, 5))
    assert torch.equal(back, q)
    assert wires.payload((3, 5, 1), torch.float32, "int4") == ((1, 8), torch.uint8)


@pytest.mark.parametrize("wire", INTEGER)
def test_onnx_quantise_and_dequantise_match_torch(wire):
    """The ONNX graphs (QuantizeLinear, the packing, DequantizeLinear) give torch's values; ties counted."""
    class RoundTrip(nn.Module):
        def forward(self, x, scale, zero):
            return wires.dequantise(wires.quantise(x, scale, zero, 1, wire, (1, 6, 5)), scale, zero, 1, wire, (1, 6, 5))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, 5, generator=g) * 3
    scale, zero = torch.rand(6, generator=g) / 10 + 0.01, torch.zeros(6, dtype=torch.int8)
    buffer = io.BytesIO()
    torch.onnx.export(RoundTrip(), (x, scale, zero), buffer, dynamo=False, opset_version=17,
                      input_names=["x", "scale", "zero"], dynamic_axes={"x": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "scale": scale.numpy(), "zero": zero.numpy()})[0]
    want = RoundTrip()(x, scale, zero).numpy()
    steps = np.abs(got - want) / scale.numpy()[None, :, None]
    assert steps.max() <= 1 + 1e-5
    assert np.count_nonzero(steps > 1e-5) == 0  # no value of random data lands on a tie


def test_budget_and_model_refuse_unknown_or_uncalibrated_wires(tmp_path):
    with pytest.raises(BudgetError, match="wire must be one of fp32, fp16, int8, int4"):
        dc.Budget(0.2, wire="int3")
    torch.manual_seed(0)
    dm = dc.transform(Net().eval(), nodes=2, example_inputs=_batches(1, 1)[0])
    dm.set_budget(0.3, wire="int8")  # no data: the scales are not calibrated yet
    with pytest.raises(wires.WireError, match="calibrate_wire"):
        dm(_batches(1, 1)[0])
    with pytest.raises(wires.WireError, match="calibrate_wire"):
        dc.export(dm.eval(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    dm.calibrate_wire(_batches(2, 3))
    dc.export(dm.eval(), tmp_path / "out")
    with pytest.raises(wires.WireError, match="at least one batch"):
        dm.calibrate_wire([])


# ---------------------------------------------------------------- the schedule

def _messages(out, kind: str = "exchange") -> list[dict]:
    return [m for m in json.loads((out / "schedule.json").read_text())["messages"] if m["kind"] == kind]


def test_schedule_dtype_and_bytes_per_wire(tmp_path):
    """The same selection at every wire (compute weight 0): each exchange message carries the same channels, its
    dtype and bytes those of the wire; int8 a quarter of fp32's bytes, int4 an eighth (rounded up per sample).
    The model input travels at the wire too, int8 for int4 (INPUT_WIRES), and the cost report's io bytes say so."""
    sent = {}
    for wire in wires.WIRES:
        dm = _model(2, wire)
        dc.export(dm, tmp_path / wire)
        sent[wire] = {m["channels"].__repr__() + m["tensor"]: m for m in _messages(tmp_path / wire)}
        assert dm.cost().exchange_bytes == sum(m["bytes"] for m in _messages(tmp_path / wire)) or wire == "int4"
        (given,) = _messages(tmp_path / wire, "input")
        dtype, size = {"fp32": ("float32", 4), "fp16": ("float16", 2)}.get(wire, ("int8", 1))
        assert (given["dtype"], given["bytes"], given["wire"]) == (dtype, size * 3 * 16 * 16, wires.INPUT_WIRES[wire])
        io = sum(m["bytes"] for kind in ("input", "output") for m in _messages(tmp_path / wire, kind))
        assert dm.cost().io_bytes == io
    assert sent["fp32"].keys() == sent["int8"].keys() == sent["int4"].keys() == sent["fp16"].keys()
    for key, m32 in sent["fp32"].items():
        values = math.prod(m32["shape"][1:])
        assert (sent["fp16"][key]["dtype"], sent["fp16"][key]["bytes"]) == ("float16", 2 * values)
        assert (sent["int8"][key]["dtype"], sent["int8"][key]["bytes"]) == ("int8", values)
        assert (sent["int4"][key]["dtype"], sent["int4"][key]["bytes"]) == ("uint8", math.ceil(values / 2))
        assert [sent[w][key]["wire"] for w in wires.WIRES] == list(wires.WIRES)
    total = {w: sum(m["bytes"] for m in ms.values()) for w, ms in sent.items()}
    assert total["int8"] / total["fp32"] == 0.25
    assert total["int4"] / total["fp32"] <= 0.17


# ---------------------------------------------------------------- the verification chain with quantisation

def _recorded_run(out, x: np.ndarray, monkeypatch) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """run_local's outputs and every message's payload as sent."""
    sent: dict[str, np.ndarray] = {}
    original = InProcTransport.send

    def record(self, msg, payload):
        sent[msg.id] = np.array(payload, copy=True)
        return original(self, msg, payload)

    with monkeypatch.context() as m:
        m.setattr(InProcTransport, "send", record)
        outputs = dc.run_local(out, x)
    return outputs, sent


def _forced_run(dm, x: torch.Tensor, messages: list[dict], payloads: dict[str, np.ndarray], monkeypatch
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DISCO model with each destination's sent channels taken from the shards' payloads (decoded) instead
    of its own fake quantisation: the rest of it must then compute what the shards compute. Also each
    exchange's input, to quantise as the reference of the payloads."""
    names = {id(ex): name for name, ex in dm.exchanges.items()}
    inputs: dict[str, torch.Tensor] = {}

    def forward(ex: SparseExchange, v: torch.Tensor) -> torch.Tensor:
        name = names[id(ex)]
        inputs[name] = v
        assert sum(s > 1 for s in ex.label_shape) == 1, "a test model with one channel dim"
        axis = v.dim() - len(ex.label_shape) + next(d for d, s in enumerate(ex.label_shape) if s > 1)
        shape = (ex.nodes,) + ex.label_shape
        out = v.unsqueeze(0) * ex.local.reshape(shape).to(v.dtype)
        sent = ex._sent().reshape(shape).to(v.dtype)
        for j in range(ex.nodes):
            arrived = v.clone()
            for m in messages:
                if m["tensor"] == name and m["dst"] == j:
                    units = torch.tensor(m["channels"])
                    values = (1, *v.index_select(axis, units).shape[1:])
                    arrived.index_copy_(axis, units, _decoded(ex, payloads[m["id"]], units, values))
            out[j] += arrived * sent[j]
        return out

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(SparseExchange, "forward", forward)
        return dm(x), inputs


def _decoded(ex: SparseExchange, payload: np.ndarray, units: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.from_numpy(payload)
    if ex.wire == "fp16":
        return t.float()
    zero = torch.zeros(units.numel(), dtype=torch.int8)
    return wires.dequantise(t, ex.scale.detach()[units], zero, 1, ex.wire, shape)


@pytest.mark.parametrize("wire, nodes", [("fp16", 2), ("int8", 2), ("int4", 2), ("int8", 3), ("int4", 3)])
def test_shards_compute_what_the_quantised_disco_model_computes(tmp_path, monkeypatch, nodes, wire):
    """Link 2 and 3 of the verification chain at a wire: (a) the DISCO model, given the payloads the shards sent,
    gives the shards' outputs (fp32 rtol 1e-4, atol 1e-5); (b) every payload value is the DISCO model's own
    quantisation of what it sends (within the chain's fp32 tolerance), except values on a rounding tie after a
    different summation order: those differ by one step more (one fp16 ulp) and are counted: at most 1 in 1000."""
    dm = _model(nodes, wire)
    dc.export(dm, tmp_path / "out")
    messages = _messages(tmp_path / "out")
    x = _batches(1, 7, batch=8)[0]
    outputs, payloads = _recorded_run(tmp_path / "out", x.numpy(), monkeypatch)
    forced, inputs = _forced_run(dm, x, messages, payloads, monkeypatch)
    np.testing.assert_allclose(outputs[0], forced.numpy(), rtol=1e-4, atol=1e-5)
    arrived = dm.input_wires["x"](x)
    for given in _messages(tmp_path / "out", "input"):
        got = torch.from_numpy(payloads[given["id"]])
        got = got.float() if wire == "fp16" else wires.dequantise(
            got, dm.input_wires["x"].scale.detach(), torch.zeros(3, dtype=torch.int8), 1, "int8", (1, 3, 16, 16))
        assert torch.equal(got, arrived), f"{given['id']}: node 0 did not send the DISCO model's quantised input"
    flipped = total = 0
    for m in messages:
        ex = dm.exchanges[m["tensor"]]
        units = torch.tensor(m["channels"])
        values = inputs[m["tensor"]].index_select(1, units)
        got = _decoded(ex, payloads[m["id"]], units, (1, *values.shape[1:]))
        scale = None if ex.scale is None else ex.scale.detach()[units].reshape(-1, *[1] * (values.dim() - 2))
        want = wires.fake(values, wire, scale)
        off = (got - want).abs() - (1e-5 + 1e-4 * want.abs())  # beyond the chain's fp32 tolerance
        step = _ulp16(torch.maximum(got.abs(), want.abs())) if wire == "fp16" else scale.expand_as(want)
        assert torch.all(off <= step), f"{m['id']}: a payload value {float((off / step).max()):.2f} steps off"
        flipped += int((off > 0).sum())
        total += off.numel()
    assert total > 0 and flipped <= total / 1000, f"{flipped} of {total} values on a tie"


def _ulp16(v: torch.Tensor) -> torch.Tensor:
    """The spacing of float16 values at |v| (subnormals: 2^-24)."""
    return torch.exp2(torch.floor(torch.log2(v.clamp_min(2 ** -14))) - 10)


# ---------------------------------------------------------------- fine-tuning at a wire

def test_finetune_at_int8_learns_scales_and_exports(tmp_path):
    """finetune(wire="int8") calibrates the scales on its first batches, trains them with the weights (the
    teacher sends fp32), and the result exports with the trained scales."""
    torch.manual_seed(0)
    dm = dc.transform(Net().eval(), nodes=2, example_inputs=_batches(1, 1)[0])
    data = _batches(6, 4)
    result = finetune(dm, data, budget=0.3, wire="int8", steps=6, lr=1e-2, progress=False, batchnorm_batches=2)
    assert dm.wire == "int8" and result.steps == 6
    torch.manual_seed(0)
    calibrated = dc.transform(Net().eval(), nodes=2, example_inputs=_batches(1, 1)[0])
    calibrated.set_wire("int8")
    calibrated.calibrate_wire(data[:4])
    moved = [not torch.allclose(ex.scale, calibrated.exchanges[n].scale) for n, ex in dm.exchanges.items()]
    assert any(moved), "fine-tuning left every scale where calibration put it"
    dc.export(dm.eval(), tmp_path / "out")
    assert {m["dtype"] for m in _messages(tmp_path / "out")} == {"int8"}


def test_cli_wire_int8_exports_int8_messages(tmp_path):
    """disco-compile --wire int8 (no --data): the scales are calibrated on the example input, the report and the
    manifest say so, and the schedule's exchange messages are int8."""
    from click.testing import CliRunner

    from disco_compile.cli.compile import main
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["resnet18", "--nodes", "2", "--budget", "0.2", "--wire", "int8",
                                       "--input-shape", "1,3,32,32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sent as int8 with a scale per channel" in result.output
    assert "scales are calibrated on the example input" in result.output
    assert {m["dtype"] for m in _messages(out)} == {"int8"}
    assert json.loads((out / "manifest.json").read_text())["settings"]["wire"] == "int8"
