"""Digits classification split across 2 nodes at 20% of the dense exchange bytes.

Trains a small CNN on sklearn's bundled digits (the "original model"), splits it with
`transform`, fine-tunes the split model with learned channel selection, exports the
shards and runs them with onnxruntime (`run_local`), printing accuracy at each step.

    python examples/finetune_digits.py [--nodes 2] [--budget 0.2] [--steps 300]
"""
import argparse
import tempfile
from pathlib import Path

import torch

from disco_compile import Budget, export, finetune, transform
from disco_compile.budget import tasks
from disco_compile.budget.data import loader
from disco_compile.budget.finetuning import evaluate, evaluate_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    task = tasks.digits()
    test = loader(task.test, 300, shuffle=False, seed=0)
    model = tasks.train_original(tasks.DigitsNet(width=8), task, steps=1200)
    print(f"original model: test accuracy {evaluate(model, test)[1]:.2f} %")

    disco = transform(model, args.nodes, task.example)
    disco.set_budget(Budget(args.budget, allocation="uniform", align=1))
    print(f"one-shot selection at budget {args.budget}: {evaluate(disco, test)[1]:.2f} %")
    print(disco.cost().table())

    disco = transform(model, args.nodes, task.example)
    result = finetune(disco, loader(task.train, 64, shuffle=True, seed=0),
                      budget=Budget(args.budget, align=1, compute_weight=0.0), steps=args.steps,
                      val_data=loader(task.val, 300, shuffle=False, seed=0))
    print(f"fine-tuned ({args.steps} steps, exchange ratio {result.exchange_ratio:.3f}): "
          f"test accuracy {evaluate(disco, test)[1]:.2f} %")

    with tempfile.TemporaryDirectory() as tmp:
        export(disco, Path(tmp) / "shards")
        shards = evaluate_bundle(Path(tmp) / "shards", test)[1]
    print(f"exported shards run by onnxruntime: test accuracy {shards:.2f} %")


if __name__ == "__main__":
    main()
