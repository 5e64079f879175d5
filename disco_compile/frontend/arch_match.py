"""Which torchvision architecture a state_dict belongs to, from its key names and every tensor's shape.

A state_dict S (key -> tensor) matches architecture A built with constructor arguments c when S and
A(c).state_dict() have the same keys and every tensor the same shape. c is read off the shapes: A is first
built with its defaults; if the only differing shapes are tensors whose first dimension is the same number k
(and every other dimension equal), that is the classifier head of k classes, and A is built again with
num_classes=k. S matches when exactly one (A, c) does; several or none is an error listing the closest.

Building each of torchvision's 80 classification models to compare takes about 30 s even on the meta device
(measured on this machine's 2 cores), so the candidates are looked up in an index first: for every
architecture (and the variants whose keys differ, as GoogLeNet and Inception v3 without their auxiliary heads)
the number of tensors and a hash of the sorted key names, which num_classes does not change (arch_index.py,
written by `python -m disco_compile.frontend.arch_match` for the torchvision version it names). Only the
architectures with the file's key hash are built, on the meta device (no memory, no initialisation work).
timm's architectures are not indexed (over 1300 of them): their state_dicts need --arch-free Python use
(disco_compile.load_model of a built module) or a torchvision twin.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torchvision

from ..errors import ModelLoadError

_VARIANTS = {"googlenet": [{}, {"aux_logits": False}], "inception_v3": [{}, {"aux_logits": False}]}
_CLOSEST = 3  # candidates listed when nothing matches
_SHOWN = 4  # keys listed of the closest one's difference


@dataclass(frozen=True)
class Match:
    """The architecture a state_dict matched: torchvision `name` built with `kwargs`; `why` says so."""
    name: str
    kwargs: dict
    why: str


def key_hash(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def _shapes(name: str, kwargs: Mapping) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of torchvision `name`(weights=None, **kwargs), built on the meta device when it can
    be (a few architectures copy tensors while initialising, and are built on the CPU)."""
    builder = torchvision.models.get_model_builder(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on init_weights and aux_logits defaults
        try:
            with torch.device("meta"):
                model = builder(weights=None, **kwargs)
        except NotImplementedError:  # "Cannot copy out of meta tensor" (RegNet's initialisation)
            model = builder(weights=None, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _classes(file: dict[str, tuple[int, ...]], built: dict[str, tuple[int, ...]]) -> int | None:
    """k when the only differing shapes are a head's: the same first dimension k, every other one equal."""
    differ = [k for k in built if file[k] != built[k]]
    heads = {file[k][0] for k in differ if len(file[k]) == len(built[k]) and file[k][1:] == built[k][1:]}
    return heads.pop() if differ and len(heads) == 1 and all(file[k] for k in differ) else None


def _fits(name: str, kwargs: dict, file: dict[str, tuple[int, ...]]) -> tuple[dict | None, str]:
    """(the constructor arguments under which `name` matches every shape, or None; what differs)."""
    built = _shapes(name, kwargs)
    k = _classes(file, built)
    if k is not None and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": k}
        built = _shapes(name, kwargs)
    differ = [key for key in built if file[key] != built[key]]
    if not differ:
        return kwargs, ""
    first = differ[0]
    return None, (f"{len(differ)} shape(s) differ, e.g. {first} (file {file[first]}, {name} {built[first]})")


def _label(name: str, kwargs: Mapping) -> str:
    """resnet18, or resnet18(num_classes=3) with constructor arguments."""
    return name + (f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" if kwargs else "")


def _closest(count: int, keys: set[str]) -> str:
    """The indexed architectures nearest the file's: shared first and last key, then the tensor count."""
    def distance(entry) -> tuple[int, int]:
        shared = (entry["first"] in keys) + (entry["last"] in keys)
        return -shared, abs(entry["count"] - count)
    from .arch_index import INDEX
    ranked = sorted(INDEX, key=distance)[:_CLOSEST]
    best = set(_shapes(ranked[0]["name"], ranked[0]["kwargs"]))
    diff = [f"{what} {', '.join(sorted(part)[:_SHOWN])}" + (f" and {len(part) - _SHOWN} more" if len(part) > _SHOWN
                                                         else "")
            for what, part in (("missing from the file:", best - keys), ("not in it:", keys - best)) if part]
    return "; ".join(f"{_label(e['name'], e['kwargs'])} ({e['count']} tensors"
                     + (f", {'; '.join(diff)}" if e is ranked[0] else "") + ")" for e in ranked)


def match(sd: Mapping[str, torch.Tensor], path: str) -> Match:
    """The one torchvision architecture whose keys and shapes are those of `sd` (module docstring)."""
    from .arch_index import INDEX, TORCHVISION
    file = {k: tuple(v.shape) for k, v in sd.items()}
    found = key_hash(file)
    candidates = [e for e in INDEX if e["hash"] == found]
    matched, refused = [], []
    for entry in candidates:
        kwargs, why = _fits(entry["name"], dict(entry["kwargs"]), file)
        if kwargs is None:
            refused.append(f"{_label(entry['name'], entry['kwargs'])}: {why}")
        else:
            matched.append((entry["name"], kwargs))
    advice = "say which with --arch torchvision:NAME (and --num-classes N or --arch-arg KEY=VALUE)"
    if len(matched) == 1:
        name, kwargs = matched[0]
        return Match(name, kwargs, f"all {len(file)} tensors match torchvision {_label(name, kwargs)}")
    if matched:
        raise ModelLoadError(f"the {len(file)} tensors in {path} match several torchvision architectures: "
                             f"{', '.join(_label(n, k) for n, k in matched)}; {advice}")
    version = "" if TORCHVISION == torchvision.__version__.split("+")[0] else \
        f" (the index of architectures was made with torchvision {TORCHVISION}, this is " \
        f"{torchvision.__version__})"
    near = "; ".join(refused) if refused else f"none has these key names; closest: {_closest(len(file), set(file))}"
    raise ModelLoadError(f"the state_dict in {path} ({len(file)} tensors) matches no torchvision classification "
                         f"architecture{version}: {near}; {advice}")


def build_index() -> list[dict]:
    """Every torchvision classification architecture (and variant): name, kwargs, tensor count, key hash,
    first and last key."""
    index = []
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        for kwargs in _VARIANTS.get(name, [{}]):
            keys = list(_shapes(name, kwargs))
            index.append({"name": name, "kwargs": kwargs, "count": len(keys), "hash": key_hash(keys),
                          "first": keys[0], "last": keys[-1]})
    return index


def _write_index() -> None:
    import pprint
    from pathlib import Path
    text = (f'"""Generated by `python -m disco_compile.frontend.arch_match` (arch_match.build_index): every '
            f'torchvision classification\narchitecture\'s tensor count, key hash, first and last key."""\n'
            f"TORCHVISION = {torchvision.__version__.split('+')[0]!r}\n"
            f"INDEX = {pprint.pformat(build_index(), width=110, sort_dicts=False)}\n")
    Path(__file__).with_name("arch_index.py").write_text(text)


if __name__ == "__main__":
    _write_index()
