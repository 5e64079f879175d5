"""The cost model: hand-computed figures on a tiny model, budget selection, and
the paper's ResNet-50 headline figures (N=2, rho=0.2)."""
import pytest
import torch
import torch.nn as nn

from conftest import two_exchange_mlp
from disco_compile import Budget, transform
from disco_compile.frontend import zoo


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 2, bias=False)).eval()


def test_hand_computed_costs_all_gates_on():
    dm = transform(mlp(), 2, torch.randn(1, 4))
    c = dm.cost()
    # hidden layer: 3 features per node, each node sends its 3 to the other: 2 * 3 * 4 bytes
    assert c.exchange_bytes == c.dense_exchange_bytes == 24
    # input (4 floats) to node 1, and node 1's one logit back to node 0
    assert c.io_bytes == 4 * 4 + 1 * 4
    assert c.comm_bytes == 44
    assert c.original_macs == 4 * 6 + 6 * 2
    assert c.macs_per_node == [3 * 4 + 1 * 6, 3 * 4 + 1 * 6]
    assert c.params_per_node == [18, 18] and c.original_params == 36


def test_hand_computed_costs_no_communication():
    dm = transform(mlp(), 2, torch.randn(1, 4))
    dm.set_budget(0.0)
    c = dm.cost()
    assert c.exchange_bytes == 0 and c.dense_exchange_bytes == 24
    assert c.macs_per_node == [3 * 4 + 1 * 3, 3 * 4 + 1 * 3]
    assert c.params_per_node == [15, 15]


def test_input_on_all_nodes_drops_input_io():
    dm = transform(mlp(), 2, torch.randn(1, 4), input_on_all_nodes=True)
    assert dm.cost().io_bytes == 4


def test_costs_are_per_sample():
    one = transform(mlp(), 2, torch.randn(1, 4)).cost()
    five = transform(mlp(), 2, torch.randn(5, 4)).cost()
    assert one == five


def test_budget_keeps_largest_weight_columns():
    model = mlp()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 9.0, 2.0, 5.0, 1.0, 1.0], [3.0, 1.0, 2.0, 1.0, 8.0, 1.0]]))
    dm = transform(model, 2, torch.randn(1, 4))
    dm.set_budget(Budget(1 / 3, allocation="uniform", align=1))  # one of the three candidate columns per direction
    ex = dm.exchanges["_1"]
    # node 1 owns row 1 and reads node 0's columns 0..2: largest |W[1, c]| is column 0 (3.0)
    # node 0 owns row 0 and reads node 1's columns 3..5: largest is column 3 (5.0)
    assert (ex.keep & ex.remote).nonzero().tolist() == [[0, 3], [1, 0]]


def test_budget_ratio_tracks_rho():
    model, x = zoo.build("resnet18", size=64)
    dm = transform(model, 3, x)
    for rho in (0.0, 0.1, 0.5, 1.0):
        dm.set_budget(Budget(rho, allocation="uniform", align=1))
        assert dm.cost().exchange_ratio == pytest.approx(rho, abs=0.01)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_aligned_budget_sends_multiples_of_align_within_the_budget(allocation):
    """align=8: every (exchange, source, destination) pair keeps a multiple of 8 of its candidates or all of
    them, each pair its best by score, the total within the budget and near it."""
    from disco_compile.budget.selection import _pairs, magnitude_scores
    model, x = zoo.build("resnet18", size=64)
    dm = transform(model, 2, x)
    scores = magnitude_scores(dm)
    for rho in (0.1, 0.2, 0.5):
        dm.set_budget(Budget(rho, allocation, align=8, compute_weight=0.0))
        ratio = dm.cost().exchange_ratio
        assert rho - 0.05 <= ratio <= rho + 1e-9, (rho, ratio)
        for name, ex in dm.exchanges.items():
            flat_keep, flat_score = (ex.keep & ex.remote).reshape(-1), scores[name].reshape(-1)
            for idx in _pairs(ex):
                kept = flat_keep[idx]
                count = int(kept.sum())
                assert count % 8 == 0 or count == idx.numel(), (name, count, idx.numel())
                if 0 < count < idx.numel():
                    assert flat_score[idx][kept].min() >= flat_score[idx][~kept].max()
    dm.set_budget(Budget(0.2, allocation, align=8, compute_weight=0.0))
    aligned = {name: ex.keep.clone() for name, ex in dm.exchanges.items()}
    dm.set_budget(Budget(0.2, allocation, compute_weight=0.0))  # align 8 is the default
    assert all(torch.equal(aligned[name], ex.keep) for name, ex in dm.exchanges.items())


def test_compute_weight_prices_the_macs_a_channel_costs_its_destination():
    """Two exchanges of 4-byte units: channels of the first feed 4 output rows per node (4 MACs each), of the
    second 1 row (1 MAC). At rho = 0.25 (3 of 14 candidates) bytes alone rank the first exchange's strong
    columns first (2.45 x their pair's mean score per 4 bytes against 1 x per 4); priced at 10 bytes per MAC
    they cost 44 bytes against 14 and the second exchange wins."""
    from disco_compile.budget.selection import candidate_macs
    model = two_exchange_mlp()
    dm = transform(model, 2, torch.randn(1, 4))
    first, second = dm.exchanges["_1"], dm.exchanges["_3"]
    macs = candidate_macs(dm)
    assert macs["_1"][first.remote].unique().tolist() == [4.0]
    assert macs["_3"][second.remote].unique().tolist() == [1.0]

    def kept(weight):
        dm.set_budget(Budget(0.25, "global", align=1, compute_weight=weight))
        assert dm.cost().exchange_bytes == 12
        return int((first.keep & first.remote).sum()), int((second.keep & second.remote).sum())

    assert kept(0.0) == (2, 1)  # columns 0 and 3 (squared norm 36, their pair's mean 44/3) first
    assert kept(10.0) == (0, 3)
    assert dm.cost().macs_per_node < transform(model, 2, torch.randn(1, 4)).cost().macs_per_node


def test_compute_weight_lowers_node_macs_within_the_budget():
    model, x = zoo.build("resnet18", size=64)
    dm = transform(model, 2, x)
    macs = []
    for weight in (0.0, 0.1, 1.0):
        dm.set_budget(Budget(0.2, "global", align=8, compute_weight=weight))
        c = dm.cost()
        assert 0.15 <= c.exchange_ratio <= 0.2 + 1e-9
        macs.append(max(c.macs_per_node))
    assert macs[2] < macs[0], macs


@pytest.mark.parametrize("weight", [-1.0, float("inf"), float("nan"), "x"])
def test_compute_weight_must_be_a_finite_non_negative_number(weight):
    from disco_compile.errors import BudgetError
    dm = transform(mlp(), 2, torch.randn(1, 4))
    with pytest.raises(BudgetError, match="compute weight must be a finite number"):
        dm.set_budget(Budget(0.5, "global", compute_weight=weight))
    with pytest.raises(BudgetError, match="allocation='global'"):
        dm.set_budget(Budget(0.5, "uniform", compute_weight=0.1))


@pytest.mark.parametrize("align", [0, -8, 2.5, True])
def test_align_must_be_a_positive_whole_number(align):
    from disco_compile.errors import BudgetError
    dm = transform(mlp(), 2, torch.randn(1, 4))
    with pytest.raises(BudgetError, match="align must be a whole number"):
        dm.set_budget(Budget(0.5, align=align))


def test_stat_exchange_for_layer_norm_over_split_channels():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x)))

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(1, 5, 8)  # 5 tokens
    dm = transform(model, 2, x)
    with torch.no_grad():
        torch.testing.assert_close(dm(x), model(x), rtol=1e-4, atol=1e-5)
    c = dm.cost()
    assert c.replicated_ops == []
    # each of 2 nodes sends (sum, sum of squares) for 5 tokens to the other
    assert c.fixed_exchange_bytes == 2 * 5 * 2 * 4
    # LayerNorm weight and bias split by channel: 8 + 8 per node
    assert c.params_per_node[0] == (8 * 8 + 8) + (8 + 8) + (2 * 16 + 2)


@pytest.mark.slow
def test_resnet50_paper_figures():
    """arXiv 2302.11180: 5x less communication, about half the computation and memory per node."""
    model, x = zoo.build("resnet50", size=224)
    dm = transform(model, 2, x)
    dm.set_budget(Budget(0.2, allocation="uniform", align=1))
    c = dm.cost()
    assert c.exchange_ratio == pytest.approx(0.2, abs=0.01)
    assert c.comm_ratio <= 0.22
    assert c.macs_ratio <= 0.62
    assert max(c.macs_per_node) <= 0.31 * c.original_macs
    assert max(c.params_per_node) <= 0.31 * c.original_params


class MixerBlock(nn.Module):
    """MLP-Mixer's block: a token-mixing Linear on (B, C, T), then a channel-mixing one on (B, T, C)."""

    def __init__(self, tokens: int = 6, channels: int = 8):
        super().__init__()
        self.embed = nn.Linear(3, channels)
        self.tokens, self.channels = nn.Linear(tokens, tokens), nn.Linear(channels, 4)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.tokens(h.transpose(1, 2)).transpose(1, 2)
        return self.channels(torch.relu(h))


@pytest.mark.parametrize("nodes", [2, 3])
def test_token_mixing_runs_on_each_nodes_channels_and_counts_its_share(nodes):
    """A Linear along tokens is no exchange and no replicated op: node j applies it to its channels, and its
    MACs (tokens^2 per channel) are shared by channel, so the nodes' MACs sum to the whole."""
    from disco_compile.backend.layers import layer_records
    torch.manual_seed(0)
    model, x = MixerBlock().eval(), torch.randn(1, 6, 3)
    dm = transform(model, nodes, x)
    with torch.no_grad():
        torch.testing.assert_close(dm(x), model(x), rtol=1e-4, atol=1e-5)
    c = dm.cost()
    assert c.replicated_ops == [] and len(dm.exchanges) == 1  # embed -> channels only
    assert c.original_macs == 6 * 3 * 8 + 8 * 6 * 6 + 6 * 8 * 4
    assert sum(c.macs_per_node) == c.original_macs
    owned = [int((dm.plan.owner_of[dm.plan.layers[0].out_labels.reshape(-1)] == j).sum()) for j in range(nodes)]
    assert dm.plan.channelwise_macs == {"tokens": [k * 6 * 6 for k in owned]}
    assert [sum(row["macs"][j] for row in layer_records(dm, [])) for j in range(nodes)] == c.macs_per_node
