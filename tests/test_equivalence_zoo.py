"""Verification link 1 on torchvision models: the DISCO model with every gate on
computes the original model's outputs (fp32, rtol 1e-4, atol 1e-5)."""
import pytest
import torch

from conftest import assert_close, built
from disco_compile import transform

MODELS = ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn", "mobilenet_v2",
          "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "densenet121", "shufflenet_v2_x1_0",
          "squeezenet1_1", "googlenet", "inception_v3", "convnext_tiny"]


# every model at N=2 and at one of 3, 4, 8 in turn (five models each); benchmarks/zoo.py runs the
# torchvision zoo, 98 models, at N=2 and 4 (docs/coverage.md)
PAIRS = [(name, n) for k, name in enumerate(MODELS) for n in (2, (3, 4, 8)[k % 3])]


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes", PAIRS)
def test_all_gates_on_equals_original(name, nodes):
    model, x, ref = built(name)
    dm = transform(model, nodes, x)
    assert dm.exchanges, "a split model must exchange some channels"
    with torch.no_grad():
        out = dm(x)
    assert_close(out, ref, what=f"{name} N={nodes}")
    report = dm.cost()
    assert report.replicated_ops == [], [f"{r.node}: {r.target} ({r.reason})" for r in report.replicated_ops]
    assert report.exchange_bytes == report.dense_exchange_bytes
    assert sum(report.macs_per_node) == report.original_macs  # all gates on: the work is split, not duplicated
