"""torch.export programs (.pt2) raised to modules (exported.py): same outputs as the program, the layers
named as in the source model, and the same split as the module itself."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, assert_shards_match
from disco_compile import ExportedProgramError, transform
from disco_compile.frontend import exported
from disco_compile.ops.attention import heads_attention


class ResNetLike(nn.Module):
    """Conv, BatchNorm, ReLU, a residual add, max and average pooling, flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 1, groups=2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = F.relu(x + self.bn1(self.conv1(x)))
        x = F.hardtanh(self.conv2(x), 0.0, 6.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TokenNet(nn.Module):
    """A class token expanded and concatenated, LayerNorm, GELU, a permute, a slice and a select."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, 16))
        self.norm, self.mlp, self.head = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).permute(0, 2, 1)
        t = torch.cat([self.token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + F.gelu(self.mlp(self.norm(t)))
        return self.head(t[:, 0]) + t[:, 1:3].mean(1).sum(-1, keepdim=True)


class GroupNormNet(nn.Module):
    """Conv1d, GroupNorm, SiLU, padding and a roll."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.out = nn.Conv1d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.roll(F.pad(F.silu(self.norm(self.conv(x))), (1, 2)), 1, -1))


class Upsampling(nn.Module):
    """Resizes by a scale and to a size (aten.upsample_*2d.vec: F.interpolate)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = F.interpolate(self.a(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.b(y) + F.interpolate(self.a(x), size=y.shape[-2:], mode="nearest")[:, :4]


class Cumulative(nn.Module):
    """torch.cumsum over channels has no channel rule: it stays an ATen op and runs whole on every node."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


class AttentionNet(nn.Module):
    """Tokens from a conv, LayerNorm, nn.MultiheadAttention self-attention (4 heads) with a residual, a head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed, self.norm = nn.Conv2d(3, 16, 4, stride=4), nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).permute(0, 2, 1)
        if not self.batch_first:
            t = t.transpose(0, 1)
        n = self.norm(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        return self.head(t.mean(1 if self.batch_first else 0))


NETS = [(ResNetLike, (1, 3, 32, 32)), (TokenNet, (2, 3, 16, 16)), (GroupNormNet, (1, 4, 12)),
        (Upsampling, (1, 3, 8, 8))]


def _program(net, shape):
    torch.manual_seed(0)
    model = net().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(shape)
    return model, x, torch.export.export(model, (x,))


def _layers(module: nn.Module) -> set[str]:
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    return {name for name, m in module.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("net, shape", NETS, ids=[n.__name__ for n, _ in NETS])
def test_raised_module_computes_the_program_with_the_models_layer_names(net, shape):
    model, x, program = _program(net, shape)
    raised = exported.to_module(program)
    assert raised.kept_aten_ops == []
    assert _layers(raised) == _layers(model)
    assert sum(p.numel() for p in raised.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert_close(raised(x), model(x), what="raised module")


@pytest.mark.parametrize("net, shape", NETS, ids=[n.__name__ for n, _ in NETS])
def test_transform_of_a_program_splits_as_the_module_does(net, shape):
    model, x, program = _program(net, shape)
    from_program, from_module = transform(program, 2, x), transform(model, 2, x)
    with torch.no_grad():
        assert_close(from_program(x), model(x), what="DISCO model of the program")
    for dm in (from_program, from_module):
        dm.set_budget(0.5)
    a, b = from_program.cost(), from_module.cost()
    assert (a.exchange_bytes, a.macs_per_node, a.params_per_node) == (b.exchange_bytes, b.macs_per_node,
                                                                       b.params_per_node)
    # exchanges are named after their tensors, and torch.flatten reaches a program as aten.view
    assert len(from_program.exchanges) == len(from_module.exchanges)


def test_an_op_without_a_rule_stays_aten_and_is_replicated():
    model, x, program = _program(Cumulative, (1, 3, 10, 10))
    raised = exported.to_module(program)
    assert raised.kept_aten_ops == ["aten.cumsum.default"]
    dm = transform(program, 2, x)
    assert [op.target for op in dm.cost().replicated_ops] == ["cumsum.default"]
    with torch.no_grad():
        assert_close(dm(x), model(x), what="DISCO model with a replicated op")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("nodes", [2, 4])
def test_program_attention_is_split_by_heads(batch_first, nodes):
    """torch.export writes nn.MultiheadAttention as reshapes around aten.scaled_dot_product_attention;
    raised back to heads_attention (passes/raise_attention.py) the program splits by heads as the module
    does: no ATen op kept, nothing replicated, the model's outputs."""
    torch.manual_seed(0)
    model = AttentionNet(batch_first).eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    raised = exported.to_module(program)
    assert raised.kept_aten_ops == []
    assert sum(n.target is heads_attention for n in raised.graph.nodes) == 1
    dm = transform(program, nodes, x)
    assert dm.cost().replicated_ops == []
    with torch.no_grad():
        assert_close(dm(x), model(x), what=f"DISCO model of the attention program, N={nodes}")


def test_attention_with_a_causal_mask_is_raised():
    """A causal mask (is_causal with its square subsequent mask) is raised to split heads as the plain
    self-attention is (raise_attention.py), not kept whole: nothing stays aten."""

    class Causal(AttentionNet):
        def forward(self, x):
            t = self.norm(self.embed(x).flatten(2).permute(0, 2, 1))
            return self.head(self.attn(t, t, t, need_weights=False, is_causal=True,
                                       attn_mask=nn.Transformer.generate_square_subsequent_mask(16))[0].mean(1))
    torch.manual_seed(0)
    model = Causal(True).eval()
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    assert exported.to_module(program).kept_aten_ops == []
    with torch.no_grad():
        assert_close(transform(program, 2, x)(x), model(x), what="DISCO model with a masked attention")


class WeightNormed(nn.Module):
    """Wav2Vec2's positional convolution: a grouped Conv1d and a Linear under weight_norm, whose weights the
    program computes (g * v / |v|) instead of reading them."""

    def __init__(self):
        super().__init__()
        norm = nn.utils.parametrizations.weight_norm
        self.conv, self.pos = nn.Conv1d(4, 16, 3, padding=1), norm(nn.Conv1d(16, 16, 5, padding=2, groups=4), dim=2)
        self.head = norm(nn.Linear(16, 6))

    def forward(self, x):
        h = self.conv(x)
        return self.head(F.gelu(h + self.pos(h)).transpose(1, 2))


def test_a_weight_the_program_computes_is_split_as_a_layer(tmp_path):
    """aten.conv1d and aten.linear whose weight weight_norm computes in the graph are layers
    (ComputedConv1d, ComputedLinear), not ops kept whole: nothing is replicated, and the shards compute it."""
    torch.manual_seed(0)
    model = WeightNormed().eval()
    x = torch.randn(1, 4, 12)
    program = torch.export.export(model, (x,))
    assert exported.to_module(program).kept_aten_ops == ["aten._weight_norm.default"]  # computing the weights
    dm = transform(program, 2, x)
    assert dm.cost().replicated_ops == []
    with torch.no_grad():
        assert_close(dm(x), model(x), what="DISCO model with computed weights")
    assert_shards_match(dm, x, tmp_path / "shards", rho=0.5)


def test_program_through_onnx_shards(tmp_path):
    _, x, program = _program(ResNetLike, (1, 3, 32, 32))
    assert_shards_match(transform(program, 2, x), x, tmp_path / "shards", rho=0.2)


def test_a_static_batch_is_detected():
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert exported.to_module(torch.export.export(flat, (x,))).fixed_batch == 1  # view(x, [1, 288])
    assert exported.to_module(torch.export.export(conv, (x,))).fixed_batch is None


def test_dynamic_batch_program():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert exported.example_shapes(program) == [None]
    assert exported.example_shapes(program, hinted=True) == [(2, 3, 8, 8)]
    raised = exported.to_module(program)
    assert raised.kept_aten_ops == []  # the batch size it reads (aten.sym_size) is no op to split
    assert raised.fixed_batch is None
    with torch.no_grad():
        assert_close(transform(program, 2, x)(x[:1]), model(x[:1]), what="another batch size")


def test_a_wrong_raising_is_caught_by_the_check(monkeypatch):
    _, _, program = _program(ResNetLike, (1, 3, 32, 32))
    monkeypatch.setitem(exported._FUNCTIONS, torch.ops.aten.relu.default, torch.sigmoid)
    with pytest.raises(ExportedProgramError, match="changed its output"):
        exported.to_module(program)


def test_unreadable_file(tmp_path, caplog):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ExportedProgramError, match="model.pt2 as a torch.export program: it is not the zip"):
        exported.load(path)
    torch.save(ResNetLike().state_dict(), path)  # a zip archive, but no program
    with pytest.raises(ExportedProgramError, match="cannot read .*model.pt2 as a torch.export program"):
        exported.load(path)
    assert "Traceback" not in caplog.text
