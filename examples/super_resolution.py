"""x4 super-resolution (PixelShuffle) split across nodes, fine-tuned at a budget.

Trains an ESPCN-style network on crops of scikit-image's bundled photos, splits it with
shuffle-aligned ownership (each output colour on one node), fine-tunes at the budget,
exports the shards and runs them with onnxruntime, printing PSNR on a held-out photo.

    python examples/super_resolution.py [--nodes 2] [--budget 0.2] [--steps 300]
"""
import argparse
import tempfile
from pathlib import Path

import torch

from disco_compile import Budget, export, finetune, transform
from disco_compile.budget import tasks
from disco_compile.budget.data import loader
from disco_compile.budget.distill import Loss
from disco_compile.budget.finetuning import evaluate, evaluate_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    task = tasks.super_resolution(scale=4)
    test = loader(task.test, 256, shuffle=False, seed=0)
    bicubic = evaluate(torch.nn.Upsample(scale_factor=4, mode="bicubic"), test)[1]
    model = tasks.train_original(tasks.SRNet(scale=4, width=32), task, steps=1200, batch_size=32, lr=1e-3)
    print(f"bicubic upsampling {bicubic:.2f} dB; original model {evaluate(model, test)[1]:.2f} dB")

    disco = transform(model, args.nodes, task.example)
    print(disco.cost().table())
    result = finetune(disco, loader(task.train, 32, shuffle=True, seed=0),
                      budget=Budget(args.budget, align=1, compute_weight=0.0), steps=args.steps, loss=Loss(dense="l1"))
    print(f"fine-tuned ({args.steps} steps, exchange ratio {result.exchange_ratio:.3f}): "
          f"{evaluate(disco, test)[1]:.2f} dB")

    with tempfile.TemporaryDirectory() as tmp:
        export(disco, Path(tmp) / "shards")
        shards = evaluate_bundle(Path(tmp) / "shards", test)[1]
    print(f"exported shards run by onnxruntime: {shards:.2f} dB")


if __name__ == "__main__":
    main()
