"""ONNX shards against the DISCO model on the core model list (verification link 3),
for N in {2, 4} and rho in {1, 0.2}: export, run with run_local (onnxruntime,
in-process transport), compare with the DISCO model in fp32 (rtol 1e-4, atol 1e-5).

For context each row also gives the DISCO model's own fp32 error against a
float64 evaluation of the same model: where the shards' difference is of that
size, it is rounding (BatchNorm folding and split partial sums reorder sums),
not a lowering error; the float64 test of the lowering (tests/test_export.py)
checks the maths itself. Writes docs/export_coverage.md.

Run: python benchmarks/export_zoo.py [--models a,b] [--size 128]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from disco_compile import DiscoError, run_local, transform, zoo
from disco_compile.exporter import export

MODELS = ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn", "mobilenet_v2",
          "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "densenet121", "shufflenet_v2_x1_0",
          "squeezenet1_1", "googlenet", "inception_v3", "convnext_tiny"]
CONFIGS = [(2, 1.0), (2, 0.2), (4, 1.0), (4, 0.2)]


def row(name: str, size: int) -> list[str]:
    model, x = zoo.build(name, size=size)
    cells = []
    for nodes, rho in CONFIGS:
        dm = transform(model, nodes, x).eval()
        dm.set_budget(rho)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            try:
                export(dm, Path(tmp) / "out")
            except DiscoError as exc:
                cells.append(f"FAILED: {str(exc).splitlines()[0]}")
                print(name, nodes, rho, cells[-1], flush=True)
                continue
            seconds = time.perf_counter() - start
            out = torch.from_numpy(run_local(Path(tmp) / "out", x.numpy())[0])
        with torch.no_grad():
            ref = dm(x)
            own = (ref - dm.double()(x.double()).float()).abs().max().item()
        ok = torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        cells.append(f"{'equal' if ok else 'DIFFERS'} {(out - ref).abs().max().item():.1e} (own {own:.0e}, {seconds:.0f} s)")
        print(name, nodes, rho, cells[-1], flush=True)
    return [name] + cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=zoo.DEFAULT_SIZE)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "export_coverage.md")
    args = parser.parse_args()
    rows = [row(name, args.size) for name in args.models.split(",")]
    head = "| model | " + " | ".join(f"N={n} rho={r}" for n, r in CONFIGS) + " |"
    lines = ["# ONNX shards against the DISCO model", "",
             f"Command: `python benchmarks/export_zoo.py --size {args.size}`; {datetime.date.today()}, "
             f"{platform.machine()} 2-core CPU, torch {torch.__version__}. Input 1x3x{args.size}x{args.size}, "
             "random calibrated weights (zoo.py).", "",
             "Each cell: equal/DIFFERS at fp32 rtol 1e-4, atol 1e-5; the largest absolute difference; the DISCO "
             "model's own fp32 error against float64 (own); export time.", "",
             head, "|" + "---|" * (len(CONFIGS) + 1)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
