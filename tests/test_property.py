"""Property: any small random network, split over any valid number of nodes with
any channel counts, computes the original's outputs with every gate on."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close
from disco_compile import transform


class RandomNet(nn.Module):
    """Blocks of: conv (maybe grouped), optional residual add, optional two-branch concatenation;
    then global pooling and a Linear head."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.convs, self.branches, self.residual = nn.ModuleList(), nn.ModuleList(), []
        c = 3
        for width, kernel, groups, bias, residual, branch in spec["blocks"]:
            groups = groups if c % groups == 0 and width % groups == 0 else 1
            self.convs.append(nn.Conv2d(c, width, kernel, padding=kernel // 2, groups=groups, bias=bias))
            self.branches.append(nn.Conv2d(width, branch, 1) if branch else nn.Identity())
            self.residual.append(residual and width == c)
            c = width + branch
        self.head = nn.Linear(c, spec["classes"], bias=spec["head_bias"])

    def forward(self, x):
        for conv, branch, residual, block in zip(self.convs, self.branches, self.residual, self.spec["blocks"],
                                                 strict=False):
            y = F.relu(conv(x))
            if residual:
                y = y + x
            extra = block[-1]
            x = torch.cat([y, branch(y)], 1) if extra else y
        return self.head(x.mean((2, 3)))


block = st.tuples(st.integers(1, 17), st.sampled_from([1, 3]), st.sampled_from([1, 2, 3]), st.booleans(),
                  st.booleans(), st.sampled_from([0, 0, 5]))
spec = st.fixed_dictionaries({"blocks": st.lists(block, min_size=1, max_size=4), "classes": st.integers(1, 12),
                              "head_bias": st.booleans()})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=spec, nodes=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_random_networks_equal_original(spec, nodes, seed):
    torch.manual_seed(seed)
    model = RandomNet(spec).eval()
    widest = max(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    nodes = min(nodes, widest)
    x = torch.randn(2, 3, 5, 5)
    dm = transform(model, nodes, x)
    with torch.no_grad():
        assert_close(dm(x), model(x))
    report = dm.cost()
    assert report.replicated_ops == []
    assert sum(report.macs_per_node) == report.original_macs
