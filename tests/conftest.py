"""Shared test helpers: tight fp32 comparison that says where tensors differ."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils import _pytree as pytree

from disco_compile.frontend import zoo

# DESIGN.md verification chain tolerances for fp32
RTOL, ATOL = 1e-4, 1e-5


def assert_close(actual, expected, rtol: float = RTOL, atol: float = ATOL, what: str = "output") -> None:
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"{what}: structure differs: {a_spec} vs {e_spec}"
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        assert a.shape == e.shape, f"{what}[{k}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            diff = (a - e).abs()
            worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
            pytest.fail(f"{what}[{k}]: {int(bad.sum())}/{a.numel()} elements differ (rtol={rtol}, atol={atol}); "
                        f"first at {idx}: {a[idx].item():.7g} vs {e[idx].item():.7g}; "
                        f"largest at {worst}: {a[worst].item():.7g} vs {e[worst].item():.7g}")


def two_exchange_mlp() -> torch.nn.Module:
    """Linear 4 -> 6 -> 8 -> 2: exchanges "_1" (6 features, each read by 4 output rows per node at N=2) and
    "_3" (8 features, 1 row per node); features 0 and 3 of "_1" have the strongest weight columns."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 8, bias=False), nn.ReLU(),
                          nn.Linear(8, 2, bias=False)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([3.0, 1.0, 1.0, 3.0, 1.0, 1.0]).expand(8, 6))
        model[4].weight.fill_(1.0)
    return model


def assert_split_exact(model, nodes, x, **kwargs):
    """transform(model, nodes, x) and check it computes what the model computes; returns the DISCO model."""
    from disco_compile import transform
    dm = transform(model, nodes, x, **kwargs)
    with torch.no_grad():
        assert_close(dm(x), model(x), what=f"{type(model).__name__} N={nodes}")
    return dm


def assert_shards_match(dm, x, out_dir, rho: float, overlap: bool = True) -> None:
    """Set dm's budget to rho, export it to out_dir (with or without overlap) and check that its ONNX shards,
    run by run_local, give dm's output (verification link 3)."""
    from disco_compile import Budget, export, run_local
    dm.eval().set_budget(Budget(rho, allocation="uniform", align=1))
    export(dm, out_dir, overlap=overlap)
    with torch.no_grad():
        ref = dm(x)
    assert_close(torch.from_numpy(run_local(out_dir, x.numpy())[0]), ref, what=f"onnx shards at rho={rho}")


@functools.lru_cache(maxsize=2)
def built(name: str):
    """A zoo model and example input, with its reference output (cached across N)."""
    torch.set_num_threads(2)
    model, x = zoo.build(name)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref
