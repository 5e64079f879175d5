"""Verification links 2 and 3 of the design, and the export command.

Link 2: the DISCO model with hardened gates == the per-node lowered programs run
together (stages.run_python), checked in float64 so that the check tests the
maths of the lowering, not fp32 rounding (BatchNorm folding and split partial
sums change the rounding; on random-weight inception_v3 the original model's
own fp32 error against float64 is 7e-4, above the fp32 tolerance).
Link 3: the ONNX shards run by onnxruntime (run_local) == the DISCO model, fp32.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, assert_shards_match
from disco_compile import Budget, run_local, transform
from disco_compile.frontend import zoo
from disco_compile.backend.exporter import export
from disco_compile.backend.lower import lower_model
from disco_compile.ops.pooling import adaptive_pool_matrix, pool_by_matrices
from disco_compile.backend.stages import cut_all, run_python
from test_equivalence_zoo import MODELS
from test_small_models import OddNet, ScaledSoftmax

SIZE = 64


def lowered_outputs(dm, x, overlap: bool = True):
    lowered = lower_model(dm, overlap=overlap)
    return run_python(cut_all(lowered), lowered, [x])[0]


# every zoo model once, alternating (N=2, all gates on) and (N=4, rho=0.2); the full matrix through ONNX
# is benchmarks/export_zoo.py (docs/export_coverage.md)
LINK2 = [(name, *((2, 1.0) if k % 2 == 0 else (4, 0.2))) for k, name in enumerate(MODELS)]


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes, rho", LINK2)
def test_lowered_programs_equal_disco_model_float64(name, nodes, rho):
    model, x = zoo.build(name, size=SIZE if name != "inception_v3" else 96)
    model, x = model.double(), x.double()
    dm = transform(model, nodes, x).eval()
    dm.set_budget(Budget(rho, allocation="uniform", align=1))
    with torch.no_grad():
        assert_close(lowered_outputs(dm, x), dm(x), rtol=1e-9, atol=1e-11, what=f"{name} N={nodes} rho={rho}")


class LayerNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class ResizeBack(nn.Module):
    """Reads the input's size first and resizes to it last, as FCN and DeepLabV3 do: the size is used
    stages after the input arrived."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))

    def forward(self, x):
        size = x.shape[-2:]
        return nn.functional.interpolate(self.down(x), size=size, mode="bilinear", align_corners=False)


class L2Norm(nn.Module):
    """SSD's L2Norm: channels scaled by their L2 norm at each position, then a learned scale."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 10, 3, padding=1), nn.Conv2d(10, 4, 1)
        self.scale = nn.Parameter(torch.rand(10))

    def forward(self, x):
        return self.head(self.scale.view(1, -1, 1, 1) * F.normalize(self.conv(x)))


SMALL = [(OddNet, (2, 3, 8, 8), 2, 1.0), (OddNet, (2, 3, 8, 8), 3, 0.3), (OddNet, (2, 3, 8, 8), 4, 0.3),
         (ScaledSoftmax, (2, 3, 4, 4), 2, 1.0), (ScaledSoftmax, (2, 3, 4, 4), 3, 0.3),
         (LayerNormBlock, (2, 5, 8), 2, 0.3), (LayerNormBlock, (2, 5, 8), 3, 1.0),
         (ResizeBack, (2, 3, 8, 8), 2, 0.3), (ResizeBack, (2, 3, 8, 8), 3, 1.0),
         (L2Norm, (2, 3, 6, 6), 2, 1.0), (L2Norm, (2, 3, 6, 6), 3, 0.3)]


@pytest.mark.parametrize("net, shape, nodes, rho", SMALL, ids=[f"{n.__name__}-N{k}-rho{r}" for n, _, k, r in SMALL])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_small_models_through_onnx(tmp_path, net, shape, nodes, rho, overlap):
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(shape)
    dm = transform(model, nodes, x).eval()
    dm.set_budget(Budget(rho, allocation="uniform", align=1))
    export(dm, tmp_path / "out", overlap=overlap)
    with torch.no_grad():
        ref = dm(x)
        assert_close(lowered_outputs(dm, x, overlap), ref, what="lowered programs")
        assert_close(lowered_outputs(dm.double(), x.double(), overlap), dm(x.double()), rtol=1e-9, atol=1e-11,
                     what="lowered programs, float64")
    assert_close(torch.from_numpy(run_local(tmp_path / "out", x.numpy())[0]), ref, what="onnx shards")


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes, rho", [("resnet18", 2, 1.0), ("resnet18", 4, 0.2),
                                              ("mobilenet_v3_small", 2, 0.2), ("shufflenet_v2_x1_0", 4, 1.0),
                                              ("convnext_tiny", 2, 0.2), ("googlenet", 2, 0.2)])
def test_onnx_shards_equal_disco_model(tmp_path, name, nodes, rho):
    model, x = zoo.build(name, size=SIZE)
    dm = transform(model, nodes, x).eval()
    dm.set_budget(Budget(rho, allocation="uniform", align=1))
    export(dm, tmp_path / "out")
    batch = torch.cat([x, torch.randn_like(x)])  # the exported batch dimension is symbolic
    with torch.no_grad():
        ref = dm(batch)
    assert_close(torch.from_numpy(run_local(tmp_path / "out", batch.numpy())[0]), ref,
                 what=f"{name} N={nodes} rho={rho}")
    if rho == 1.0:
        with torch.no_grad():
            assert_close(torch.from_numpy(run_local(tmp_path / "out", x.numpy())[0]), model(x), what="vs original")


def test_export_files_and_schedule(tmp_path):
    torch.manual_seed(0)
    model = OddNet().eval()
    x = torch.randn(1, 3, 8, 8)
    dm = transform(model, 2, x).eval()
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    export(dm, tmp_path / "out")
    schedule = json.loads((tmp_path / "out" / "schedule.json").read_text())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["nodes"] == 2 and len(manifest["model_hash"]) == 64
    kinds = {m["kind"] for m in schedule["messages"]}
    assert {"input", "exchange", "output"} <= kinds
    exchanged = sum(m["bytes"] for m in schedule["messages"] if m["kind"] == "exchange")
    # the schedule sends what cost() counts
    assert exchanged == dm.cost().exchange_bytes - dm.cost().fixed_exchange_bytes
    for m in schedule["messages"]:
        assert m["src_stage"] >= 0 and m["dst_stage"] >= 0 and m["src"] != m["dst"]
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.onnx"))
    assert files == sorted(k for k in manifest["files"] if k.endswith(".onnx"))


def test_export_refuses_non_empty_directory_and_force_replaces(tmp_path):
    from disco_compile import BundleError
    torch.manual_seed(0)
    dm = transform(OddNet().eval(), 2, torch.randn(1, 3, 8, 8)).eval()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(BundleError, match="not empty.*--force"):
        export(dm, out)
    with pytest.raises(BundleError, match="not an export of disco-compile .*no manifest.json; it holds keep.txt"):
        export(dm, out, force=True)  # --force replaces only an earlier export
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    export(dm, out)
    export(dm, out, force=True)
    assert (out / "manifest.json").exists()


def test_cli_exports_and_disco_run_reproduces(tmp_path):
    out = tmp_path / "shards"
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-m", "disco_compile.cli.compile", "resnet18", "--nodes", "2",
                           "--budget", "0.2", "--input-shape", "1,3,64,64", "--no-overlap", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "run it: disco-run" in done.stdout
    ran = subprocess.run([sys.executable, "-m", "disco_compile.cli.run", str(out), "--simulate",
                          "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert f"disco-run estimate {out} --link 1gbit" in done.stdout
    estimated = subprocess.run([sys.executable, "-m", "disco_compile.cli.run", "estimate", str(out), "--link",
                                "1gbit", "--link", "10mbit", "--reps", "1"], capture_output=True, text=True)
    assert estimated.returncode == 0, estimated.stderr
    rows = {line.split()[0]: float(line.split()[1]) for line in estimated.stdout.splitlines()
            if line.split()[:1] in (["1gbit"], ["10mbit"])}
    assert rows["10mbit"] > rows["1gbit"] > 0
    model, _ = zoo.build("resnet18", size=64)
    dm = transform(model, 2, torch.from_numpy(x)).eval()
    # disco-compile's defaults, which are Budget's: --allocation global --align 8 --compute-weight 0.004
    dm.set_budget(0.2)
    with torch.no_grad():
        assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), dm(torch.from_numpy(x)))
    schedule = json.loads((out / "schedule.json").read_text())
    assert all(len(m["channels"]) % 8 == 0 for m in schedule["messages"] if m["kind"] == "exchange")
    again = subprocess.run([sys.executable, "-m", "disco_compile.cli.compile", "resnet18", "--nodes", "2",
                            "--input-shape", "1,3,64,64", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_stage_torch_onnx_cannot_export_is_a_clear_error(tmp_path):
    from disco_compile.backend.exporter import ExportError
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.AdaptiveMaxPool2d(3), nn.Flatten(), nn.Linear(72, 4)).eval()
    dm = transform(model, 2, torch.randn(1, 3, 4, 4)).eval()
    with pytest.raises(ExportError,
                       match=r"(?s)node\d/stage\d+\.onnx: torch.onnx cannot export this stage.*what to do"):
        export(dm, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), oh=st.integers(1, 9), ow=st.integers(1, 9))
def test_adaptive_pool_matrices_average_as_adaptive_avg_pool2d(h, w, oh, ow):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    got = pool_by_matrices(x, adaptive_pool_matrix(h, oh, x.dtype), adaptive_pool_matrix(w, ow, x.dtype))
    assert_close(got, F.adaptive_avg_pool2d(x, (oh, ow)), rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(d=st.integers(1, 12), h=st.integers(1, 6), od=st.integers(1, 9), oh=st.integers(1, 5))
def test_adaptive_pool_matrices_average_a_signal_and_a_volume(d, h, od, oh):
    x = torch.randn(2, 3, d, h, 4, dtype=torch.float64)
    got = pool_by_matrices(x, *(adaptive_pool_matrix(i, o, x.dtype) for i, o in ((d, od), (h, oh), (4, 3))))
    assert_close(got, F.adaptive_avg_pool3d(x, (od, oh, 3)), rtol=1e-12, atol=1e-12)
    got = pool_by_matrices(x[..., 0, 0], adaptive_pool_matrix(d, od, x.dtype))
    assert_close(got, F.adaptive_avg_pool1d(x[..., 0, 0], od), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nodes, rho, dims", [(2, 1.0, 2), (3, 0.3, 2), (2, 0.3, 1), (3, 0.5, 3)])
def test_uneven_adaptive_avg_pool_exports(tmp_path, nodes, rho, dims):
    """4x4 -> 7x7 (VGG's pooling on a 128 input) and 5x5 -> 3x3: sizes torch.onnx cannot pool between; the
    same for a signal and a volume."""
    torch.manual_seed(0)
    conv, pool, size, first = {1: (nn.Conv1d, nn.AdaptiveAvgPool1d, (5,), 3),
                               2: (nn.Conv2d, nn.AdaptiveAvgPool2d, (4, 5), (7, 3)),
                               3: (nn.Conv3d, nn.AdaptiveAvgPool3d, (3, 4, 5), (2, 3, 3))}[dims]
    model = nn.Sequential(conv(3, 8, 3, padding=1), pool(first), conv(8, 6, 1), pool(2), nn.Flatten(),
                          nn.Linear(6 * 2 ** dims, 4)).eval()
    x = torch.randn(2, 3, *size)
    assert_shards_match(transform(model, nodes, x), x, tmp_path / "out", rho)


class ResidualBlock(nn.Module):
    def __init__(self, c: int = 40):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def test_after_each_wait_onnxruntime_runs_one_fused_conv(tmp_path):
    """A received partial sum's Conv has a bias and the residual is added before the wait, so what runs after
    the message, Conv + Add + Relu, is one FusedConv kernel in onnxruntime (no separate Add or Relu)."""
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    model = ResidualBlock(72).eval()
    x = torch.randn(1, 72, 8, 8)
    dm = transform(model, 2, x).eval()
    # 18 of a node's 36 channels sent: more than onnxruntime's NCHWc block (8 with AVX2, 16 with AVX-512) and no
    # multiple of it, so the Conv stays in NCHW, where onnxruntime fuses the Add and Relu into it. On an AVX-512 CPU
    # 10 and 20 channels took the blocked path, which leaves the Add and Relu apart; 18 and 26 fused.
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    export(dm, tmp_path / "out")
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(tmp_path / "out", x.numpy())[0]), dm(x), what="onnx shards")
    schedule = json.loads((tmp_path / "out" / "schedule.json").read_text())
    exchanges = {m["id"] for m in schedule["messages"] if m["kind"] == "exchange"}
    checked = 0
    for prog in schedule["programs"]:
        for stage in prog:
            if not any(i["source"] == "message" and i["ref"] in exchanges for i in stage["inputs"]):
                continue
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
            ort.InferenceSession(str(tmp_path / "out" / stage["file"]), options, providers=["CPUExecutionProvider"])
            ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
            assert ops.count("FusedConv") == 1 and "Add" not in ops and "Relu" not in ops, (stage["file"], ops)
            checked += 1
    assert checked == 2  # conv2's received channels, on each node


def _stage_ops(out_dir) -> list[list[tuple[list[str], list[str]]]]:
    """Per node, per stage: (op types, message inputs) of the stage graph as exported."""
    import onnx
    schedule = json.loads((out_dir / "schedule.json").read_text())
    return [[([n.op_type for n in onnx.load(str(out_dir / st["file"])).graph.node],
              [i["ref"] for i in st["inputs"] if i["source"] == "message"]) for st in prog]
            for prog in schedule["programs"]]


def test_without_overlap_each_layer_is_one_conv_over_local_and_received_channels(tmp_path):
    """overlap=False: a node waits for a layer's messages, then runs one Conv over its own and the received
    channels (a Concat feeds it; no Add of partial sums), so it has fewer stages than with overlap; the
    outputs are the DISCO model's either way."""
    torch.manual_seed(0)
    model = ResidualBlock().eval()
    x = torch.randn(1, 40, 8, 8)
    dm = transform(model, 2, x).eval()
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    for overlap in (True, False):
        export(dm, tmp_path / str(overlap), overlap=overlap)
        with torch.no_grad():
            assert_close(torch.from_numpy(run_local(tmp_path / str(overlap), x.numpy())[0]), dm(x),
                         what=f"onnx shards, overlap={overlap}")
    with_overlap, without = _stage_ops(tmp_path / "True"), _stage_ops(tmp_path / "False")
    for k in range(2):
        assert len(without[k]) < len(with_overlap[k])
        waits = [ops for ops, received in without[k] if any(m.startswith("exchange") for m in received)]
        assert len(waits) == 1 and waits[0].count("Conv") == 1 and waits[0].count("Concat") == 1, waits  # conv2
        assert sum(ops.count("Conv") for ops, _ in without[k]) == 2  # conv1 and conv2: one Conv each
        assert sum(ops.count("Conv") for ops, _ in with_overlap[k]) > 2  # local and received terms apart


@pytest.mark.parametrize("nodes,rho", [(2, 1.0), (2, 0.2), (4, 0.2)])
def test_pixel_shuffle_super_resolution_shards(tmp_path, nodes, rho):
    """Shuffle-aligned ownership: every output colour lies whole on one node. At N=4 one node owns no
    colour, and at rho=0.2 nothing it computes for the last layer is sent: its dead work and the messages
    feeding it are pruned from the programs, and the shards still equal the DISCO model."""
    from disco_compile.budget.tasks import SRNet
    torch.manual_seed(0)
    model = SRNet(scale=4, width=16).eval()
    x = torch.rand(2, 3, 12, 12)
    dm = transform(model, nodes, x[:1])
    assert not dm.cost().replicated_ops
    with torch.no_grad():
        assert_close(dm(x), model(x), what="DISCO vs original")
    dm.set_budget(Budget(rho, allocation="uniform", align=1))
    dm.eval()
    export(dm, tmp_path / "sr")
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(tmp_path / "sr", [x.numpy()])[0]), dm(x), what="shards vs DISCO")
    lowered = lower_model(dm)
    for prog in lowered.programs:
        used = {n.args[0] for n in prog.graph.nodes if n.op == "call_function" and n.target.__name__ == "recv"}
        assert all(m.id in used for m in lowered.messages if m.dst == prog.node), "a message nobody uses"


def test_onnx_forms_for_ops_opset_17_lacks():
    """exporter.py gives aten::rms_norm, torch.export's functional aten::copy, F.fold (aten::col2im), torch.diff
    and the cumsum of a bool (torch sums it in int64) their opset-17 ONNX forms."""
    import io

    import onnxruntime

    class Uses(nn.Module):
        def forward(self, x, y):
            a = F.rms_norm(x, (4,), torch.linspace(0.5, 2, 4), eps=1e-5) + F.rms_norm(x.double(), (3, 4)).float()
            folded = F.fold(x.reshape(2, 4, 3), (4, 1), (2, 1), padding=(1, 0), stride=(2, 1))  # (2, 2, 4, 1)
            folded = folded.reshape(2, 8)[:, :4].unsqueeze(1) * folded.reshape(2, 8)[:, 4:].unsqueeze(1)
            steps = torch.diff(x, n=2, dim=1, prepend=x[:, :1] + 1, append=x[:, :1]) + torch.diff(x > 0, dim=-1).sum(-1,
                                                                                                     keepdim=True)
            counted = (x > 0).cumsum(-1) + x.long().cumsum(1, dtype=torch.int32)
            return a + torch.ops.aten.copy.default(x, y.double()) + folded + steps[:, :3] + counted

    x, y = torch.randn(2, 3, 4), torch.randn(1, 4)
    buffer = io.BytesIO()
    torch.onnx.export(Uses(), (x, y), buffer, dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    got = session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), (x, y), strict=True)})[0]
    assert_close(torch.from_numpy(got), Uses()(x, y), what="onnx forms")

