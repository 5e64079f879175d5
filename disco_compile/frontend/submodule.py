"""DISCO on one submodule of a model that does not trace whole.

A torchvision detector's pre-processing (resize, batching) and
post-processing (top-k, NMS, box decoding) hold data-dependent control flow
that torch.fx cannot trace, but its backbone (with its FPN) is an ordinary
convolutional network that holds most of the compute. `transform(model,
nodes, example_inputs, submodule="backbone")` splits that submodule alone:

    x --[model, up to the submodule, node 0]--> s --[DISCO submodule, N nodes]--> f
      --[rest of the model, node 0]--> y

1. The submodule's example inputs are captured by a forward hook while the
   whole model runs once on the user's example inputs (the first call).
2. The submodule is traced and split as any model (`model.transform`).
3. `DiscoSubmodel` holds a copy of the whole model whose submodule is the
   DISCO model, so calling it runs the whole model with the split submodule.
   cost() and set_budget() act on the submodule: the bytes, MACs and
   parameters reported are the submodule's, and its io bytes are the
   submodule's input sent from node 0 and its outputs collected on node 0,
   where the rest of the model runs.

`export` writes the submodule's shards; `with_bundle(model, name, out_dir)`
puts a module that runs them with onnxruntime (`run_local`) in place of the
submodule, the rest still running in PyTorch: the check that the shards'
outputs, fed into the rest of the model, reproduce its outputs.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..artifact.bundle import load_bundle
from ..errors import ExampleInputError, SubmoduleError
from ..runtime import run_bundle

if TYPE_CHECKING:
    from ..budget.budget import Budget
    from ..budget.cost import CostReport
    from ..model import DiscoModel

_SHOWN_NAMES = 6  # candidate names listed when a submodule name is unknown


def find_submodule(model: nn.Module, name: str) -> nn.Module:
    """`model`'s submodule called `name` (as in named_modules()); an unknown name is a SubmoduleError
    listing the closest names and the model's children."""
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=_SHOWN_NAMES)
        children = [n for n, _ in model.named_children()][:_SHOWN_NAMES]
        raise SubmoduleError(f"the model ({type(model).__name__}) has no submodule {name!r}; "
                             f"closest names: {close or 'none'}; top-level submodules: {children}; "
                             f"use a qualified name as in model.named_modules(), e.g. 'backbone'")
    return model.get_submodule(name)


def _call_args(example_inputs) -> tuple:
    """The positional arguments of a call: a tuple is the arguments, anything else (a tensor, a
    detector's list of images) is the one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@torch.no_grad()
def capture_inputs(model: nn.Module, name: str, example_inputs) -> tuple:
    """The positional arguments of the first call of submodule `name` while `model` (in eval mode)
    runs on `example_inputs`."""
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        if not captured:
            if kwargs:
                raise ExampleInputError(f"submodule {name!r} is called with keyword arguments {sorted(kwargs)}; "
                                        f"only positional arguments can be traced")
            captured.append(args)

    handle = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    training = model.training
    try:
        model.eval()(*_call_args(example_inputs))
    finally:
        handle.remove()
        model.train(training)
    if not captured:
        raise ExampleInputError(f"submodule {name!r} was not called when the model ran on the example inputs")
    return captured[0]


def replaced(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose submodule `name` is `module` (that submodule is not copied)."""
    whole = copy.deepcopy(model, {id(model.get_submodule(name)): module})  # the memo puts `module` in its place
    return whole.eval()


class DiscoSubmodel(nn.Module):
    """A model whose submodule `submodule` is split across nodes (`disco`, a DiscoModel); the rest of the
    model runs whole, on node 0. Calling it runs the whole model."""

    def __init__(self, model: nn.Module, submodule: str, disco: DiscoModel):
        super().__init__()
        self.submodule = submodule
        self.model = replaced(model, submodule, disco)

    @property
    def disco(self) -> DiscoModel:
        return self.model.get_submodule(self.submodule)

    @property
    def nodes(self) -> int:
        return self.disco.nodes

    @property
    def exchanges(self):
        return self.disco.exchanges

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def wired(self):
        return self.disco.wired()

    def set_wire(self, wire: str) -> None:
        self.disco.set_wire(wire)

    def cost(self) -> CostReport:
        """The split submodule's cost report (the rest of the model runs on node 0 and is not counted)."""
        return self.disco.cost()

    def set_budget(self, budget: Budget | float, *, wire: str | None = None) -> None:
        """The split submodule's one-shot selection (DiscoModel.set_budget)."""
        self.disco.set_budget(budget, wire=wire)

    def calibrate_wire(self, inputs) -> None:
        """The split submodule's wire scales (DiscoModel.calibrate_wire), each of `inputs` being what the whole
        model is called with."""
        self.disco.calibrate_wire(inputs, model=self)


class BundleModule(nn.Module):
    """Runs an export directory with onnxruntime (`run_local`, every node in a thread of this process)
    and returns its outputs as torch tensors in the exported model's output structure."""

    def __init__(self, out_dir: str | os.PathLike):
        super().__init__()
        self.bundle = load_bundle(out_dir)
        self.structure = pytree.treespec_loads(self.bundle.schedule.output_structure)

    def forward(self, *args):
        outputs = run_bundle(self.bundle, [a.detach().cpu().numpy() for a in args])
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outputs], self.structure)


def with_bundle(model: nn.Module, submodule: str, out_dir: str | os.PathLike) -> nn.Module:
    """A copy of `model` whose submodule runs the exported shards in `out_dir` (onnxruntime); the rest
    of the model runs in PyTorch."""
    find_submodule(model, submodule)
    return replaced(model, submodule, BundleModule(out_dir))
