"""What the torchvision examples share: split a model, export its shards, run them, compare.

classify_resnet50.py, vit.py, segmentation.py and detection.py each build a model and call `run`, which

1. splits it across `nodes` with `transform` (with `submodule`, that submodule alone: the rest of the
   model runs whole on node 0);
2. keeps a fraction `budget` of the exchanged channels of every link and layer with `set_budget`
   (`Budget(budget, allocation="uniform", align=1)`): a one-shot selection by weight magnitude,
   without training, so the outputs move away from the original model's (`finetune` recovers its
   quality: see finetune_digits.py);
3. prints the cost report: exchange and comm bytes with their ratio to dense, MACs and parameters
   per node;
4. exports per-node ONNX shards to a temporary folder with `export` and runs them with onnxruntime,
   every node in a thread of this process (`run_local`, wrapped as a module by `BundleModule`; for a
   submodule, `with_bundle` puts the shards in its place and the rest of the model runs in PyTorch);
5. compares the shards' outputs with the DISCO model's in PyTorch, printing the max abs difference:
   both compute the same thing, so it is fp32 rounding.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from disco_compile import Budget, export, transform
from disco_compile.frontend.submodule import BundleModule, capture_inputs, with_bundle

RANDOM_WEIGHTS = ("random weights (nothing is downloaded); to split a trained model, load its weights with "
                  "model.load_state_dict(...) before transform")


def parser(doc: str, size: int, models: list[str] | None = None, model: str | None = None) -> argparse.ArgumentParser:
    """--nodes, --budget and --size (the input side, default `size`), and --model among `models`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if models:
        p.add_argument("--model", choices=models, default=model, help="torchvision model (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=2, help="devices to split across (default: %(default)s)")
    p.add_argument("--budget", type=float, default=0.2,
                   help="fraction of the exchanged channels kept, 0 to 1 (default: %(default)s)")
    p.add_argument("--size", type=int, default=size, help="side of the square input image (default: %(default)s)")
    return p


@dataclass
class Comparison:
    """The same input through the exported shards (onnxruntime) and the DISCO model (PyTorch)."""
    what: str
    shards: object
    disco: object

    def max_abs(self) -> float | None:
        """The largest absolute difference over every output tensor; None if some shapes differ."""
        pairs = list(zip(pytree.tree_leaves(self.shards), pytree.tree_leaves(self.disco), strict=False))
        if any(a.shape != b.shape for a, b in pairs):
            return None
        return max((float((a.double() - b.double()).abs().max()) for a, b in pairs if a.numel()), default=0.0)

    def line(self) -> str:
        d = self.max_abs()
        if d is None:
            shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in
                      zip(pytree.tree_leaves(self.shards), pytree.tree_leaves(self.disco), strict=False)
                      if a.shape != b.shape]
            return f"{self.what}: shapes differ (shards, DISCO model): {shapes}"
        return f"{self.what}: max abs difference {d:.2g}"


def run(name: str, model: nn.Module, example, args: argparse.Namespace,
        submodule: str | None = None) -> list[Comparison]:
    """Split, budget, report, export, run the shards and compare them with the DISCO model (steps above).
    `example`: what the model is called with (a tensor, or a detector's list of images); `args`: from
    `parser`; `name`: the model's, for the printout."""
    print(f"{name} on a {args.size}x{args.size} image, {RANDOM_WEIGHTS}")
    nodes, budget = args.nodes, args.budget
    start = time.perf_counter()
    dm = transform(model, nodes, example, submodule=submodule)
    dm.set_budget(Budget(budget, allocation="uniform", align=1))
    part = f"its {submodule!r} submodule (the rest of the model on node 0)" if submodule else "it"
    print(f"transform: split {part} across {nodes} nodes, budget {budget:g} "
          f"(one-shot selection, no fine-tuning): {time.perf_counter() - start:.1f} s\n")
    print(dm.cost().table() + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        start = time.perf_counter()
        manifest = export(dm, out)
        graphs = sum(f.endswith(".onnx") for f in manifest.files)
        print(f"export: {graphs} ONNX stage graphs for {nodes} nodes: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        shards = BundleModule(out) if submodule is None else with_bundle(model, submodule, out)
        with torch.no_grad():
            comparisons = [Comparison("shards vs DISCO model, outputs", shards(example), dm(example))]
            if submodule is not None:
                inputs = capture_inputs(model, submodule, example)
                comparisons.insert(0, Comparison(f"shards vs DISCO model, {submodule} outputs",
                                                 shards.get_submodule(submodule)(*inputs), dm.disco(*inputs)))
        print(f"run_local and the DISCO model on the example: {time.perf_counter() - start:.1f} s")
    for c in comparisons:
        print(c.line())
    return comparisons


def top_class(logits: Comparison) -> str:
    return f"top-1 class: shards {int(logits.shards.argmax())}, DISCO model {int(logits.disco.argmax())}"
