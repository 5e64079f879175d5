"""Windowed attention split by heads (Swin V1 and V2 with shifted, padded windows; MaxViT's block and grid
attention): link 1 with no replicated op, links 2 and 3 through lowering (float64) and ONNX at a budget,
the windowing ops against torchvision's, and the torchvision models themselves."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models import MaxVit, SwinTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2, shifted_window_attention

from conftest import assert_close, assert_shards_match, assert_split_exact
from disco_compile import Budget, transform
from disco_compile.frontend import zoo
from disco_compile.backend.lower import lower_model
from disco_compile.backend.stages import cut_all, run_python
from disco_compile.ops.window_attention import (shifted_window_mask, window_heads_attention, window_partition,
    window_reverse)

KINDS = ["swin", "swin_v2", "maxvit"]


def small(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """Two stages; Swin: 2x2 patches of a 20x20 input, so 10x10 then 5x5 maps in 3x3 windows (padded,
    shifted, masked); MaxViT: 2x2 block and grid partitions, heads of 4 channels. Every parameter perturbed
    (the zero-initialised biases and Swin V2's logit scale are not left at their initial values)."""
    torch.manual_seed(0)
    if kind == "maxvit":
        model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                       block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10)
        x = torch.randn(2, 3, 32, 32)
    else:
        v2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if kind == "swin_v2" else {}
        model = SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[3, 3],
                                stochastic_depth_prob=0.0, num_classes=10, **v2)
        x = torch.randn(2, 3, 20, 20)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, x


def heads_on_one_node(dm) -> None:
    """Every attention core's q, k and v channels of each head belong to one node."""
    cores = [n for n in dm.graph_module.graph.nodes if n.target is window_heads_attention]
    assert cores
    for core in cores:
        q, k, v, heads = core.args[:4]
        owners = torch.stack([a.meta["disco"].owner.flatten() for a in (q, k, v)])  # (3, H*d)
        per_head = owners.reshape(3, heads, -1).permute(1, 0, 2).reshape(heads, -1)
        assert (per_head == per_head[:, :1]).all(), f"{core.name}: a head straddles nodes"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
def test_small_models_are_exact_with_no_replicated_op(kind, nodes):
    model, x = small(kind)
    dm = assert_split_exact(model, nodes, x)
    assert dm.cost().replicated_ops == []
    heads_on_one_node(dm)


def test_swin_v2_bias_mlp_runs_whole():
    """The relative position bias depends on no input: its MLP is not split (no exchange before it)."""
    model, x = small("swin_v2")
    dm = transform(model, 2, x)
    assert not any("cpb_mlp" in layer.module for layer in dm.plan.layers)
    assert any("attn.qkv" in layer.module for layer in dm.plan.layers)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nodes, rho", [(2, 1.0), (3, 0.3)])
def test_lowered_float64(kind, nodes, rho):
    model, x = small(kind)
    model, x = model.double(), x.double()
    dm = transform(model, nodes, x).eval()
    dm.set_budget(Budget(rho, allocation="uniform", align=1))
    lowered = lower_model(dm)
    with torch.no_grad():
        assert_close(run_python(cut_all(lowered), lowered, [x])[0], dm(x), rtol=1e-9, atol=1e-11,
                     what=f"{kind} N={nodes} rho={rho}")


@pytest.mark.parametrize("kind, nodes, overlap", [("swin", 4, True), ("swin_v2", 2, True), ("maxvit", 2, True),
                                                  ("swin", 3, False)])
def test_through_onnx_at_a_budget(tmp_path, kind, nodes, overlap):
    model, x = small(kind)
    dm = transform(model, nodes, x)
    assert_shards_match(dm, x, tmp_path / "out", 0.2, overlap)
    assert dm.cost().exchange_ratio < 0.3


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 12), width=st.integers(1, 12), wh=st.integers(1, 5), ww=st.integers(1, 5),
       heads=st.sampled_from([1, 2]), v2=st.booleans(), data=st.data())
def test_windowing_matches_torchvision(height, width, wh, ww, heads, v2, data):
    """window_partition -> qkv -> core -> proj -> window_reverse is torchvision's shifted_window_attention
    (padding, shift dropped for a window as large as the map, mask) for any map and window size."""
    shift = [data.draw(st.integers(0, wh - 1)), data.draw(st.integers(0, ww - 1))]
    torch.manual_seed(0)
    c = 4 * heads
    x = torch.randn(2, height, width, c, dtype=torch.float64)
    qkv, proj = nn.Linear(c, 3 * c).double(), nn.Linear(c, c).double()
    bias = torch.randn(1, heads, wh * ww, wh * ww, dtype=torch.float64)
    logit_scale = torch.randn(heads, 1, 1, dtype=torch.float64) if v2 else None
    if v2:
        with torch.no_grad():
            qkv.bias[c:2 * c].zero_()
    want = shifted_window_attention(x, qkv.weight, proj.weight, bias, [wh, ww], heads, shift, qkv_bias=qkv.bias,
                                    proj_bias=proj.bias, logit_scale=logit_scale, training=False)
    padded = (height + -height % wh, width + -width % ww)
    shift = tuple(0 if w >= p else s for w, p, s in zip((wh, ww), padded, shift, strict=False))
    mask = shifted_window_mask(height, width, (wh, ww), shift, x.dtype) if any(shift) else None
    q, k, v = qkv(window_partition(x, (wh, ww), shift)).chunk(3, -1)
    o = window_heads_attention(q, k, v, heads, bias, scale=None if v2 else (c // heads) ** -0.5, mask=mask,
                               logit_scale=logit_scale)
    got = window_reverse(proj(o), (wh, ww), shift, height, width)
    assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes", [("swin_t", 4), ("swin_v2_t", 2)])
def test_torchvision_models(name, nodes):
    """maxvit_t (224 only, about a minute per N here) and the larger Swins are in benchmarks/zoo.py."""
    torch.set_num_threads(2)
    model, x = zoo.build(name, size=64)  # 16x16 then 8x8 maps in 7x7 windows, padded and shifted
    dm = assert_split_exact(model, nodes, x)
    assert dm.cost().replicated_ops == []
    heads_on_one_node(dm)
