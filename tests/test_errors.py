"""Bad input gets a clear DiscoError naming what is wrong and what to do."""
import pytest
import torch
import torch.nn as nn

from disco_compile import BudgetError, ExampleInputError, PartitionError, TraceFailure, transform


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: not traceable
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = DataDependent()
        self.out = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.out(self.gate(self.conv(x)))


@pytest.mark.parametrize("nodes", [0, -1, 1.5, "2", True])
def test_bad_node_count(nodes):
    with pytest.raises(PartitionError, match="nodes must be a whole number >= 1"):
        transform(small(), nodes, torch.randn(1, 3, 8, 8))


def test_more_nodes_than_channels():
    with pytest.raises(PartitionError, match=r"nodes=9 is more than the widest layer's 8 channels.*at most 8"):
        transform(small(), 9, torch.randn(1, 3, 8, 8))


def test_model_without_mixing_layers():
    with pytest.raises(PartitionError, match="no Conv or Linear"):
        transform(nn.ReLU(), 2, torch.randn(1, 3))


@pytest.mark.parametrize("weights, match", [([1], "one weight per node"), ([1, 0], "positive"), ([1, -2], "positive")])
def test_bad_node_weights(weights, match):
    with pytest.raises(PartitionError, match=match):
        transform(small(), 2, torch.randn(1, 3, 8, 8), node_weights=weights)


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(TraceFailure) as info:
        transform(Net(), 2, torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "module 'gate' (DataDependent)" in msg
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=['gate']" in msg


def test_leaf_module_makes_it_compile_with_a_replicated_op():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    for leaves in (["gate"], [DataDependent]):
        dm = transform(model, 2, x, leaf_modules=leaves)
        with torch.no_grad():
            torch.testing.assert_close(dm(x), model(x), rtol=1e-4, atol=1e-5)
        report = dm.cost()
        assert [(r.node, r.target) for r in report.replicated_ops] == [("gate", "DataDependent")]
        assert report.fixed_exchange_bytes == 8 * 6 * 6 * 4  # each node's 4 channels of 6x6 go to the other
        assert "gate [DataDependent]: no channel rule" in report.table()


def test_unknown_leaf_module_name():
    with pytest.raises(TraceFailure, match="not submodules of the model"):
        transform(Net(), 2, torch.randn(1, 3, 8, 8), leaf_modules=["nope"])


def test_example_input_of_wrong_shape_names_the_node():
    with pytest.raises(ExampleInputError) as info:
        transform(small(), 2, torch.randn(1, 4, 8, 8))
    msg = str(info.value)
    assert "node '_0'" in msg and "(1, 4, 8, 8)" in msg and "what to do" in msg


def test_wrong_number_of_example_inputs():
    with pytest.raises(ExampleInputError, match=r"do not fit Sequential.forward\(input\): too many positional"):
        transform(small(), 2, (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)))


def test_example_input_must_be_a_batched_tensor():
    with pytest.raises(ExampleInputError, match="batched tensor"):
        transform(small(), 2, (3,))


@pytest.mark.parametrize("rho", [-0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval(rho):
    dm = transform(small(), 2, torch.randn(1, 3, 8, 8))
    with pytest.raises(BudgetError, match=r"must be in \[0, 1\]"):
        dm.set_budget(rho)
