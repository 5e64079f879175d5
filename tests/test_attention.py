"""Multi-head attention split by heads and the class token (link 1, cost, gradients; links 2 and 3
through lowering and ONNX): a small torchvision VisionTransformer, hand-built attention blocks,
and vit_b_16."""
import pytest
import torch
import torch.nn as nn

from conftest import assert_close, assert_shards_match, assert_split_exact
from disco_compile import Budget, transform
from disco_compile.frontend import zoo
from disco_compile.backend.lower import lower_model
from disco_compile.backend.stages import cut_all, run_python
from torchvision.models import VisionTransformer


def small_vit() -> tuple[nn.Module, torch.Tensor]:
    """4 heads of 8 channels, 2 layers, 17 tokens; every parameter perturbed, so the zero-initialised
    head, class token and attention biases are not zero."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, torch.randn(2, 3, 32, 32)


def head_owners(dm, layer: int) -> list[list[int]]:
    """Owner of every in_proj row, per head: [q_h rows, k_h rows, v_h rows] flattened."""
    name = f"encoder.layers.encoder_layer_{layer}.self_attention.in_proj"
    in_proj = next(lay for lay in dm.plan.layers if lay.module == name)
    owner = dm.plan.owner_of[in_proj.out_labels.flatten()].reshape(3, 4, 8)  # (q|k|v, head, channel)
    return owner.permute(1, 0, 2).reshape(4, -1).tolist()


def nodes_by_name(dm) -> dict:
    return {n.name: n for n in dm.graph_module.graph.nodes}


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 8])  # 8 nodes, 4 heads: four nodes own no head
def test_small_vit_is_exact_with_no_replicated_op(nodes):
    model, x = small_vit()
    dm = assert_split_exact(model, nodes, x)
    report = dm.cost()
    assert report.replicated_ops == []
    assert sum(report.macs_per_node) == report.original_macs  # in_proj and out_proj split, not duplicated
    for layer in (0, 1):
        heads = head_owners(dm, layer)
        assert all(len(set(h)) == 1 for h in heads)  # each head's q, k and v rows on one node
        assert sorted({h[0] for h in heads}) == list(range(min(nodes, 4)))
        name = f"encoder.layers.encoder_layer_{layer}.self_attention.out_proj"
        out_proj = next(lay for lay in dm.plan.layers if lay.module == name)
        out = nodes_by_name(dm)[out_proj.in_node].meta["disco"].owner.flatten().reshape(4, 8)
        assert out.tolist() == [[h[0]] * 8 for h in heads]  # the out_proj's input columns belong to the head's node


def test_class_token_channels_are_owned_like_the_patch_tokens():
    model, x = small_vit()
    dm = transform(model, 3, x)
    nodes = nodes_by_name(dm)
    cat, patches = nodes["cat"], nodes["permute"]
    assert cat.meta["disco"].labels.shape == (1, 1, 32)  # one channel id per embedding channel, for every token
    assert torch.equal(cat.meta["disco"].owner, patches.meta["disco"].owner)


def test_budget_and_gradients_reach_gates():
    model, x = small_vit()
    dm = transform(model, 2, x)
    dense = dm.cost()
    dm.set_budget(Budget(0.2, allocation="uniform", align=1))
    report = dm.cost()
    gated = report.exchange_bytes - report.fixed_exchange_bytes
    # floor(0.2 * n) of the n = 16 or 32 units of every exchange and pair, remainders filled up to 0.2 of the
    # gated bytes; LayerNorm statistics are ungated
    assert 0.19 <= gated / (dense.exchange_bytes - dense.fixed_exchange_bytes) <= 0.2
    assert sum(report.macs_per_node) < 0.75 * report.original_macs  # 1.0 with every gate on
    dm.train()
    dm(x).square().sum().backward()
    assert all(ex.gate.grad[ex.remote & ex.keep].abs().sum() > 0 for ex in dm.exchanges.values())


def test_gradients_match_original():
    model, x = small_vit()
    dm = transform(model, 3, x)
    model(x).square().sum().backward()
    dm(x).square().sum().backward()
    original = dict(model.named_parameters())
    for name, p in dm.graph_module.named_parameters():
        if not name.startswith("exchanges."):
            # the packed projection becomes a Linear: in_proj.weight is the original in_proj_weight
            assert_close(p.grad, original[name.replace("in_proj.", "in_proj_")].grad, what=f"grad of {name}")


class Blocks(nn.Module):
    """Sequence-first self-attention, then cross-attention and masked attention (not split: replicated)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.seq_first = nn.MultiheadAttention(12, 3, bias=False)
        self.cross = nn.MultiheadAttention(12, 2, batch_first=True)
        self.masked = nn.MultiheadAttention(12, 2, batch_first=True)
        self.out = nn.Linear(12, 3)
        self.register_buffer("mask", torch.ones(7, 7, dtype=torch.bool).triu(1))  # for 7 tokens

    def forward(self, x):
        h = self.inp(x)
        t = h.transpose(0, 1)
        h = h + self.seq_first(t, t, t)[0].transpose(0, 1)
        h = h + self.cross(h, h[:, :3], h[:, :3])[0]
        return self.out(h + self.masked(h, h, h, attn_mask=self.mask, need_weights=False)[0])


@pytest.mark.parametrize("nodes", [2, 3])
def test_other_attention_forms(nodes):
    torch.manual_seed(0)
    model = Blocks().eval()
    x = torch.randn(2, 7, 5)
    dm = assert_split_exact(model, nodes, x)
    reasons = {r.node: r.reason for r in dm.cost().replicated_ops}
    assert reasons == {"cross": "not split by heads: not self-attention (query, key and value differ)",
                       "masked": "not split by heads: an attention mask"}


def lowered_outputs(dm, x):
    lowered = lower_model(dm)
    return run_python(cut_all(lowered), lowered, [x])[0]


@pytest.mark.parametrize("nodes, rho", [(2, 1.0), (3, 0.3), (4, 0.2), (8, 0.3)])
def test_small_vit_lowered_float64(nodes, rho):
    model, x = small_vit()
    model, x = model.double(), x.double()
    dm = transform(model, nodes, x).eval()
    dm.set_budget(Budget(rho, allocation="uniform", align=1))
    with torch.no_grad():
        assert_close(lowered_outputs(dm, x), dm(x), rtol=1e-9, atol=1e-11, what=f"N={nodes} rho={rho}")


@pytest.mark.parametrize("nodes, rho, overlap", [(2, 1.0, True), (2, 0.2, True), (4, 1.0, True), (4, 0.2, True),
                                                  (3, 0.3, False)])
def test_small_vit_through_onnx(tmp_path, nodes, rho, overlap):
    model, x = small_vit()
    assert_shards_match(transform(model, nodes, x), x, tmp_path / "out", rho, overlap)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [2, 4])
def test_vit_b_16(nodes):
    torch.set_num_threads(2)
    model, x = zoo.build("vit_b_16", size=32)  # 2x2 patches of 16 and the class token
    dm = assert_split_exact(model, nodes, x)
    assert dm.cost().replicated_ops == []
    dm.set_budget(Budget(0.2, allocation="uniform", align=1))
    assert dm.cost().exchange_ratio < 0.21
