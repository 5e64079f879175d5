"""One-shot selection that respects activations (selection.magnitude_scores with calibration batches,
selection.one_shot, scores.activation_power)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from disco_compile import Budget, transform
from disco_compile.budget import selection
from disco_compile.budget.scores import activation_power
from disco_compile.errors import DataError

# conv1's 8 output channels: node 0 owns 0-3, node 1 owns 4-7 (even split at N=2). In each node's half, the first
# two channels pass a BatchNorm with gamma 0.01 (almost nothing reaches conv2) but feed conv2 through columns ten
# times larger than the other two.
QUIET = [0, 1, 4, 5]
LOUD = [2, 3, 6, 7]


class BNScaled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1, bias=False)
        with torch.no_grad():
            self.bn.weight.fill_(1.0)
            self.bn.weight[QUIET] = 0.01
            self.conv2.weight[:, QUIET] *= 10.0

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


def _model_and_data():
    model = BNScaled()
    batches = [torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    model.bn.momentum = None  # BatchNorm statistics: the plain average over the batches, as one_shot re-estimates
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval(), batches


def _sent(dm) -> set[int]:
    ex = next(iter(dm.exchanges.values()))
    return set((ex.keep & ex.remote).any(0).nonzero().flatten().tolist())


def test_weight_norm_alone_sends_the_quiet_channels_and_calibration_the_loud_ones():
    model, batches = _model_and_data()
    budget = Budget(0.5, "uniform", align=1)  # two of each pair's four candidates
    dm = transform(model, 2, batches[0][:1])
    selection.one_shot(dm, budget)
    assert _sent(dm) == set(QUIET)
    x = batches[0]
    weights_error = (dm(x) - model(x)).abs().max().item()
    selection.one_shot(dm, budget, batches)
    assert _sent(dm) == set(LOUD)
    calibrated_error = (dm(x) - model(x)).abs().max().item()
    assert calibrated_error < 0.5 * weights_error, (calibrated_error, weights_error)


def test_activation_power_is_the_mean_square_at_the_exchange_with_every_candidate_sent():
    model, batches = _model_and_data()
    dm = transform(model, 2, batches[0][:1])
    dm.set_budget(0.0)
    keep = {name: ex.keep.clone() for name, ex in dm.exchanges.items()}
    power = activation_power(dm, batches)
    with torch.no_grad():
        want = torch.stack([model.bn(model.conv1(x)).double().pow(2).mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(next(iter(power.values())), want, rtol=1e-4, atol=1e-8)
    assert all(torch.equal(keep[name], ex.keep) for name, ex in dm.exchanges.items())  # selection left as it was


def test_one_shot_with_batches_reestimates_batchnorm_and_refuses_no_batches():
    model, batches = _model_and_data()
    dm = transform(model, 2, batches[0][:1])
    dm.graph_module.bn.running_var.fill_(1.0)
    selection.one_shot(dm, Budget(0.5, "uniform", align=1), batches)
    torch.testing.assert_close(dm.graph_module.bn.running_var, model.bn.running_var, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="no batches"):
        activation_power(dm, [])
