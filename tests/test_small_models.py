"""Verification link 1 on small hand-built networks: odd channel counts, bias on/off,
groups, residual adds, concatenation, reshapes, node weights; gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, assert_split_exact
from disco_compile import transform
from disco_compile.ops.modules import SparseExchange


class OddNet(nn.Module):
    """Channel counts that 2, 3, 4 and 8 do not all divide, bias on and off, groups, a residual
    add, a concatenation (non-contiguous ownership), a channel shuffle and a flatten into Linear."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 13, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(13)
        self.a = nn.Conv2d(13, 11, 1, bias=not bias)
        self.b = nn.Conv2d(13, 11, 3, padding=1, bias=bias)
        self.grouped = nn.Conv2d(22, 22, 3, padding=1, groups=2, bias=bias)
        self.depthwise = nn.Conv2d(22, 44, 3, padding=1, groups=22, bias=bias)
        self.squeeze = nn.Conv2d(44, 22, 1, bias=bias)
        self.head = nn.Linear(22 * 4 * 4, 10, bias=bias)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = y + self.grouped(y)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        y = self.squeeze(F.relu(self.depthwise(y))) * torch.sigmoid(y.mean((2, 3), keepdim=True))
        y = F.adaptive_avg_pool2d(y, 4)
        return self.head(torch.flatten(y, 1))


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_odd_channel_counts(nodes, bias):
    torch.manual_seed(0)
    model = OddNet(bias).eval()
    x = torch.randn(2, 3, 8, 8)
    dm = assert_split_exact(model, nodes, x)
    assert dm.cost().replicated_ops == []
    assert bool(dm.exchanges) == (nodes > 1)


def test_residual_add_forces_equal_ownership():
    torch.manual_seed(0)
    model = OddNet().eval()
    dm = transform(model, 3, torch.randn(1, 3, 8, 8))
    nodes = {n.name: n for n in dm.graph_module.graph.nodes}
    add = next(n for n in nodes.values() if n.op == "call_function" and "add" in n.name)
    left, right = add.all_input_nodes
    assert torch.equal(left.meta["disco"].owner, right.meta["disco"].owner)
    assert torch.equal(add.meta["disco"].owner, left.meta["disco"].owner)


def test_concatenation_gives_non_contiguous_owners():
    torch.manual_seed(0)
    dm = transform(OddNet().eval(), 3, torch.randn(1, 3, 8, 8))
    nodes = {n.name: n for n in dm.graph_module.graph.nodes}
    owner = nodes["cat"].meta["disco"].owner.flatten()
    parts = torch.cat([nodes["a"].meta["disco"].owner.flatten(), nodes["b"].meta["disco"].owner.flatten()])
    assert torch.equal(owner, parts)  # a concatenation's channels keep their producers' owners
    assert not bool((owner[1:] >= owner[:-1]).all())  # so ownership is not one contiguous block per node
    counts = torch.bincount(owner, minlength=3)
    assert int(counts.max() - counts.min()) <= 1


def test_groups_at_least_nodes_keep_each_group_on_one_node():
    torch.manual_seed(0)
    dm = transform(OddNet().eval(), 2, torch.randn(1, 3, 8, 8))
    cat = next(n for n in dm.graph_module.graph.nodes if n.name == "cat")
    # the 2-group conv reads the concatenation: group 0 (channels 0..10) and group 1 each stay on one node
    assert cat.meta["disco"].owner.flatten().tolist() == [0] * 11 + [1] * 11


def test_groups_at_least_nodes_are_aligned_and_exchange_free():
    torch.manual_seed(0)
    dm = transform(OddNet().eval(), 2, torch.randn(1, 3, 8, 8))
    consumers = {layer.module: layer.exchange for layer in dm.plan.layers}
    assert consumers["depthwise"] is None  # 22 groups >= 2 nodes: input group and output group share a node
    assert consumers["grouped"] is None    # 2 groups >= 2 nodes


def test_groups_fewer_than_nodes_exchange_within_group():
    torch.manual_seed(0)
    model = OddNet().eval()
    x = torch.randn(1, 3, 8, 8)
    dm = transform(model, 4, x)
    assert {layer.module: layer.exchange for layer in dm.plan.layers}["grouped"] is not None
    with torch.no_grad():
        assert_close(dm(x), model(x))


def test_node_weights_give_faster_nodes_more_channels():
    torch.manual_seed(0)
    model = OddNet().eval()
    x = torch.randn(1, 3, 8, 8)
    dm = assert_split_exact(model, 2, x, node_weights=[3, 1])
    stem = next(layer for layer in dm.plan.layers if layer.module == "stem")
    owner = dm.plan.owner_of[stem.out_labels.flatten()]
    assert torch.bincount(owner).tolist() == [10, 3]  # round(13 * 3/4) = 10
    macs = dm.cost().macs_per_node
    assert macs[0] > 2 * macs[1]


def test_gradients_match_original_and_reach_gates():
    torch.manual_seed(0)
    model = OddNet().eval()
    x = torch.randn(2, 3, 8, 8)
    dm = transform(model, 3, x)
    model(x).square().sum().backward()
    dm(x).square().sum().backward()
    original = dict(model.named_parameters())
    for name, p in dm.graph_module.named_parameters():
        if name.startswith("exchanges."):
            continue
        assert_close(p.grad, original[name].grad, what=f"grad of {name}")
    gates = [ex.gate for ex in dm.exchanges.values()]
    assert gates and all(g.grad is not None for g in gates)
    assert all(g.grad[ex.remote].abs().sum() > 0 for g, ex in zip(gates, dm.exchanges.values(), strict=False))


def test_one_optimiser_step_matches_original():
    torch.manual_seed(0)
    model = OddNet().eval()
    x = torch.randn(2, 3, 8, 8)
    dm = transform(model, 2, x)
    weights = [p for n, p in dm.graph_module.named_parameters() if not n.startswith("exchanges.")]
    for params, net in ((model.parameters(), model), (weights, dm)):
        opt = torch.optim.SGD(params, lr=0.1)
        net(x).square().mean().backward()
        opt.step()
    original = dict(model.named_parameters())
    for name, p in dm.graph_module.named_parameters():
        if not name.startswith("exchanges."):
            assert_close(p, original[name], what=name)


def test_transform_leaves_original_untouched_and_keeps_parameter_names():
    torch.manual_seed(0)
    model = OddNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = transform(model, 2, torch.randn(1, 3, 8, 8))
    for p in dm.parameters():
        p.data.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    names = {k for k in dm.graph_module.state_dict() if not k.startswith("exchanges.")}
    assert names == set(before)


def test_exchange_gate_zero_removes_remote_contribution():
    """A gate at 0 means the destination computes with zeros in place of that channel."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 2, bias=False)).eval()
    x = torch.randn(1, 4)
    dm = transform(lin, 2, x)
    ex: SparseExchange = dm.exchanges["_1"]
    with torch.no_grad():
        ex.gate.zero_()
        hidden = torch.relu(lin[0](x))
        w = lin[2].weight
        expected = torch.stack([hidden[0, :3] @ w[0, :3], hidden[0, 3:] @ w[1, 3:]])[None]
        assert_close(dm(x), expected)


def test_shared_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv2d(3, 8, 1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(F.relu(self.conv(self.inp(x))))

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(1, 3, 6, 6)
    assert_split_exact(model, 2, x)


class ScaledSoftmax(nn.Module):
    """A constant times a replicated tensor, and softmax over split channels (its traced call
    carries a None argument: dtype=None)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(16 * torch.sigmoid(x))
        return self.b(F.softmax(y, dim=1))


def test_constants_and_none_arguments_beside_tensors():
    torch.manual_seed(0)
    model = ScaledSoftmax().eval()
    x = torch.randn(1, 3, 4, 4)
    dm = assert_split_exact(model, 2, x)
    report = dm.cost()
    assert report.replicated_ops == []
    # softmax over split channels: each node sends (max, sum) for its 16 positions to the other
    assert report.fixed_exchange_bytes == 2 * 16 * 2 * 4
