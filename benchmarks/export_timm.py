"""Export timm models (random weights): transform, then ONNX shards at rho 1 and 0.5, run by run_local.

For each model: `transform(model, N, x)` must equal the model, the shards at rho 1 must equal the model and the
shards at rho 0.5 the DISCO model (fp32, rtol 1e-4, atol 1e-5, as the tests); the ops run whole on every node
(replicated) are listed. Needs timm (`pip install -e '.[bench]'`); nothing is downloaded (pretrained=False).

    python benchmarks/export_timm.py efficientnet_b0 regnety_002 mobilenetv4_conv_small poolformer_s12
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from disco_compile import Budget, export, run_local, transform

RTOL, ATOL = 1e-4, 1e-5


def _max_error(got, want) -> float:
    return float((got - want).abs().max())


def check(name: str, nodes: int, size: int) -> str:
    import timm  # a benchmark dependency only

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    dm = transform(model, nodes, x).eval()
    with torch.no_grad():
        want = model(x)
        if not torch.allclose(dm(x), want, rtol=RTOL, atol=ATOL):
            return f"transform differs by {_max_error(dm(x), want):.3g}"
    errors = []
    for rho in (1.0, 0.5):
        dm.set_budget(Budget(rho, allocation="uniform", align=1))
        with tempfile.TemporaryDirectory() as out, torch.no_grad():
            export(dm, out)
            ref = want if rho == 1.0 else dm(x)
            got = torch.from_numpy(run_local(out, x.numpy())[0])
        if not torch.allclose(got, ref, rtol=RTOL, atol=ATOL):
            return f"shards at rho {rho} differ by {_max_error(got, ref):.3g}"
        errors.append(_max_error(got, ref))
    replicated = sorted({r.target for r in dm.cost().replicated_ops}) or ["none"]
    return (f"exports; shards equal (max error {errors[0]:.1e} at rho 1 against the model, {errors[1]:.1e} at "
            f"rho 0.5 against the DISCO model); replicated: {', '.join(replicated)}; "
            f"{time.perf_counter() - start:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="timm model names")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="side of the square input (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        try:
            result = check(name, args.nodes, args.size)
        except Exception as exc:  # a model that fails is reported, the others still run
            result = f"FAILS: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"{name} N={args.nodes} {args.size}x{args.size}: {result}", flush=True)


if __name__ == "__main__":
    main()
