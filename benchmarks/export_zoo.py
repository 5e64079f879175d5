"""ONNX shards against the DISCO model (verification link 3): export, run with
run_local (onnxruntime, in-process transport), compare every output with the
DISCO model's in fp32 (rtol 1e-4, atol 1e-5). Two model sets, each a section
of docs/export_coverage.md: `core`, the core issue's classifiers at N in {2, 4}
and rho in {1, 0.2}; `tasks`, the transformers and segmentation models of the
task-range issue at N in {2, 4}, rho=0.2, each at the input side
benchmarks/zoo.py uses for it (ViTs and MaxViT 224, Swin 64, others 128).

For context each row also gives the DISCO model's own fp32 error against a
float64 evaluation of the same model: where the shards' difference is of that
size, it is rounding (BatchNorm folding and split partial sums reorder sums),
not a lowering error; the float64 test of the lowering (tests/test_export.py)
checks the maths itself. Writes docs/export_coverage.md.

Run: python benchmarks/export_zoo.py [--set core|tasks] [--models a,b] [--size SIDE]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

import _perfdoc
from disco_compile import Budget, DiscoError, run_local, transform
from disco_compile.frontend import zoo
from disco_compile.backend.exporter import export
from zoo import SIZES

MODELS = ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn", "mobilenet_v2",
          "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "densenet121", "shufflenet_v2_x1_0",
          "squeezenet1_1", "googlenet", "inception_v3", "convnext_tiny"]
TASK_MODELS = ["vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "fcn_resnet50", "deeplabv3_mobilenet_v3_large",
               "lraspp_mobilenet_v3_large"]
SETS = {"core": (MODELS, [(2, 1.0), (2, 0.2), (4, 1.0), (4, 0.2)]), "tasks": (TASK_MODELS, [(2, 0.2), (4, 0.2)])}
DOC = Path(__file__).resolve().parents[1] / "docs" / "export_coverage.md"
HEADER = """# ONNX shards against the DISCO model

Written by `benchmarks/export_zoo.py`, one section per model set (each run rewrites only its own).
Each cell: equal/DIFFERS at fp32 rtol 1e-4, atol 1e-5 over every output; the largest absolute
difference; the DISCO model's own fp32 error against float64 (own); export time. Random calibrated
weights (`disco_compile.frontend.zoo`). The lowering itself is checked in float64 by the tests; the
detectors' backbone shards at rho=0.2 (tests/test_submodule.py, examples/detection.py) and the
super-resolution model's shards (tests/test_export.py) are checked there too.
"""


def _max_abs(a, b) -> float:
    pairs = zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=False)  # out and ref may differ in length
    return max(float((x - y).abs().max()) for x, y in pairs)


def row(name: str, size: int, configs) -> list[str]:
    model, x = zoo.build(name, size=size)
    cells = []
    for nodes, rho in configs:
        dm = transform(model, nodes, x).eval()
        dm.set_budget(Budget(rho, allocation="uniform", align=1))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            try:
                export(dm, Path(tmp) / "out")
            except DiscoError as exc:
                cells.append(f"FAILED: {str(exc).splitlines()[0]}")
                print(name, nodes, rho, cells[-1], flush=True)
                continue
            seconds = time.perf_counter() - start
            out = [torch.from_numpy(a) for a in run_local(Path(tmp) / "out", x.numpy())]
        with torch.no_grad():
            ref = pytree.tree_leaves(dm(x))
            own = _max_abs(ref, pytree.tree_map(lambda t: t.float(), dm.double()(x.double())))
        ok = len(out) == len(ref) and all(torch.allclose(o, r, rtol=1e-4, atol=1e-5)
                                          for o, r in zip(out, ref, strict=True))
        cells.append(f"{'equal' if ok else 'DIFFERS'} {_max_abs(out, ref):.1e} (own {own:.0e}, {seconds:.0f} s)")
        print(name, nodes, rho, cells[-1], flush=True)
    return [name] + cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="core", help="model set and configurations")
    parser.add_argument("--models", help="comma-separated subset (default: the whole set)")
    parser.add_argument("--size", type=int, help="input side for every model (default: per model, as zoo.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names, configs = SETS[args.set]
    names = args.models.split(",") if args.models else names
    sides = {name: args.size or SIZES.get(name) or zoo.DEFAULT_SIZE for name in names}
    rows = [row(name, sides[name], configs) for name in names]
    lines = [f"## {args.set}", "",
             f"Command: `{_perfdoc.command()}`; {datetime.date.today()}, {platform.machine()} 2-core CPU, torch "
             f"{torch.__version__}, one thread.", "",
             "| model | input | " + " | ".join(f"N={n} rho={r}" for n, r in configs) + " |",
             "|" + "---|" * (len(configs) + 2)]
    lines += [f"| {r[0]} | {sides[r[0]]}×{sides[r[0]]} | " + " | ".join(r[1:]) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    _perfdoc.write_section(args.set, text, DOC, HEADER, tuple(SETS))


if __name__ == "__main__":
    main()
