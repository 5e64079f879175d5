"""Which architecture a state_dict belongs to (torchvision's, or timm's where timm is installed), from its key
names and every tensor's shape.

A state_dict S (key -> tensor) matches architecture A built with constructor arguments c when S and
A(c).state_dict() have the same keys and every tensor the same shape. The one argument read off the shapes is
num_classes: A's head is the tensors whose shape follows it (first dimension the number of classes, every other
dimension fixed), and S matches A(num_classes=k) when its head tensors share one first dimension k.

Building architectures to compare takes seconds each (torchvision's 80 classification models about 30 s even on
the meta device, timm's 1,371 about half an hour, measured on this machine's 2 cores), so nothing is built to
match: arch_index.json (package data, written by tools/arch_index.py for the torchvision and timm versions it
names) holds for every architecture (and the variants whose keys differ, as GoogLeNet and Inception v3 without
their auxiliary heads) its tensor count, a hash of its sorted key names, a hash of the (key, shape) pairs outside
the head, the head's shapes at the default number of classes, and its first and last key. S matches an entry
when both hashes are S's and each head tensor has the entry's shape but for the shared first dimension k
(num_classes=k where k is not the default). Only the architecture found is built, once, to load the weights; an
error that names how shapes differ builds the few candidates it names.

Sources are asked in order, torchvision then timm, and the first with a match decides: timm re-implements
torchvision's ResNets, DenseNets and Inception v3 under the same names with the same keys, and they compute the
same. Exactly one match is the architecture; where the other source has networks of other names with the same
tensors (timm's resnetaa50 and resnetblur50, which add blur pooling to resnet50 without a parameter), the reason
names them and the --arch that picks one. Several matches in the deciding source (timm's efficientnet_b0 and
tf_efficientnet_b0: the same tensors, other padding; 188 of timm 1.0.31's 1,371 architectures share their
tensors with another) or none is an error listing them, or the closest entries by key names and tensor count
(with the best one's missing and extra keys).
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata, resources

import torch
import torch.nn as nn
import torchvision

from ..errors import ModelLoadError

SOURCES = ("torchvision", "timm")  # asked in this order
INDEX_FILE = "arch_index.json"
_CLOSEST = 3  # candidates listed when nothing matches
_SHOWN = 4  # keys listed of the closest one's difference

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Match:
    """The architecture a state_dict matched: `name` from `source` built with `kwargs`; `why` says so."""
    source: str
    name: str
    kwargs: dict
    why: str


def key_hash(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def shape_hash(shapes: Mapping[str, Sequence[int]]) -> str:
    return hashlib.sha256("\n".join(f"{k} {list(shapes[k])}" for k in sorted(shapes)).encode()).hexdigest()[:16]


def signature(name: str, kwargs: dict, shapes: Shapes, head: Collection[str]) -> dict:
    """The index entry of architecture `name`(**kwargs) with state_dict `shapes` and head tensors `head`."""
    keys = list(shapes)
    return {"name": name, "kwargs": kwargs, "count": len(keys), "keys": key_hash(keys),
            "body": shape_hash({k: s for k, s in shapes.items() if k not in head}),
            "head": {k: list(shapes[k]) for k in keys if k in head}, "first": keys[0], "last": keys[-1]}


@functools.cache
def index() -> dict[str, dict]:
    """arch_index.json: per source, the version indexed and the entries (`signature`)."""
    return json.loads(resources.files(__package__).joinpath(INDEX_FILE).read_text())


def installed(source: str) -> str | None:
    """The installed version of `source` (without a local '+cpu' part), or None where it is not installed."""
    try:
        return metadata.version(source).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def build(source: str, name: str, kwargs: Mapping[str, object], **extra) -> nn.Module:
    """Architecture `name` of `source` with random weights (nothing downloaded), built with `kwargs`."""
    if source == "timm":
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model_builder(name)(weights=None, **extra, **kwargs)


def shapes_of(source: str, name: str, kwargs: Mapping[str, object]) -> tuple[nn.Module, Shapes]:
    """The model and its state_dict shapes, built on the meta device when it can be (a few architectures copy
    tensors while initialising, and are built on the CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on init_weights and aux_logits defaults
        try:
            with torch.device("meta"):
                model = build(source, name, kwargs)
        except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor" (RegNet's initialisation)
            model = build(source, name, kwargs)
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(entry: dict, file: Shapes) -> dict | None:
    """The constructor arguments under which `entry` has every shape of `file` (same key names), or None."""
    head = {k: tuple(s) for k, s in entry["head"].items()}
    if shape_hash({k: s for k, s in file.items() if k not in head}) != entry["body"]:
        return None
    if any(len(file[k]) != len(s) or file[k][1:] != s[1:] for k, s in head.items()):
        return None
    classes = {file[k][0] for k in head}
    if len(classes) > 1:
        return None
    default = {s[0] for s in head.values()}
    if not classes or classes == default:
        return dict(entry["kwargs"])
    return {**entry["kwargs"], "num_classes": classes.pop()}


def _label(name: str, kwargs: Mapping) -> str:
    """resnet18, or resnet18(num_classes=3) with constructor arguments."""
    return name + (f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" if kwargs else "")


def _difference(source: str, entry: dict, file: Shapes) -> str:
    """How the shapes of `file` differ from `entry`'s architecture (built to say it)."""
    _, built = shapes_of(source, entry["name"], entry["kwargs"])
    head = entry["head"]
    differ = [k for k in built if file[k] != built[k] and not (k in head and file[k][1:] == built[k][1:])]
    label = f"{source} {_label(entry['name'], entry['kwargs'])}"
    if not differ:
        return f"{label}: its head tensors ({', '.join(head)}) hold different numbers of classes"
    first = differ[0]
    return f"{label}: {len(differ)} shape(s) differ, e.g. {first} (file {file[first]}, {entry['name']} {built[first]})"


def _closest(sources: list[str], count: int, keys: set[str]) -> str:
    """The indexed architectures nearest the file's: shared first and last key, then the tensor count."""
    def distance(item) -> tuple[int, int]:
        entry = item[1]
        shared = (entry["first"] in keys) + (entry["last"] in keys)
        return -shared, abs(entry["count"] - count)
    ranked = sorted(((s, e) for s in sources for e in index()[s]["entries"]), key=distance)[:_CLOSEST]
    _, built = shapes_of(ranked[0][0], ranked[0][1]["name"], ranked[0][1]["kwargs"])
    best = set(built)
    diff = [f"{what} {', '.join(sorted(part)[:_SHOWN])}" + (f" and {len(part) - _SHOWN} more" if len(part) > _SHOWN
                                                         else "")
            for what, part in (("missing from the file:", best - keys), ("not in it:", keys - best)) if part]
    return "; ".join(f"{s} {_label(e['name'], e['kwargs'])} ({e['count']} tensors"
                     + (f", {'; '.join(diff)}" if i == 0 else "") + ")" for i, (s, e) in enumerate(ranked))


def _versions(sources: list[str]) -> str:
    """A note for each source whose installed version is not the one indexed."""
    notes = [f"{s} {index()[s]['version']}, this is {installed(s)}" for s in sources
             if index()[s]["version"] != installed(s)]
    return f" (the index of architectures was made with {'; '.join(notes)})" if notes else ""


def match(sd: Mapping[str, torch.Tensor], path: str) -> Match:
    """The one architecture whose keys and shapes are those of `sd` (module docstring)."""
    file = {k: tuple(v.shape) for k, v in sd.items()}
    found = key_hash(file)
    sources = [s for s in SOURCES if installed(s) is not None and s in index()]
    advice = (f"say which with --arch {' or '.join(f'{s}:NAME' for s in sources)} (and --num-classes N or "
              f"--arch-arg KEY=VALUE)")
    matches: dict[str, list[tuple[dict, dict]]] = {s: [] for s in sources}
    refused = []
    for source in sources:
        for entry in index()[source]["entries"]:
            if entry["keys"] == found:
                kwargs = _fits(entry, file)
                if kwargs is None:
                    refused.append((source, entry))
                else:
                    matches[source].append((entry, kwargs))
    decided = next((s for s in sources if matches[s]), None)
    if decided is not None and len(matches[decided]) > 1:
        raise ModelLoadError(f"the {len(file)} tensors in {path} match several {decided} architectures: "
                             f"{', '.join(_label(e['name'], k) for e, k in matches[decided])}; {advice}")
    if decided is not None:
        (entry, kwargs), = matches[decided]
        others = [f"{s}:{e['name']}" for s in sources if s != decided for e, _ in matches[s]
                  if e["name"] != entry["name"]]
        note = f"; so do {', '.join(others)}, other networks: --arch picks one" if others else ""
        return Match(decided, entry["name"], kwargs,
                     f"all {len(file)} tensors match {decided} {_label(entry['name'], kwargs)}{note}")
    near = ("; ".join(_difference(s, e, file) for s, e in refused[:_CLOSEST]) if refused
            else f"none has these key names; closest: {_closest(sources, len(file), set(file))}")
    raise ModelLoadError(f"the state_dict in {path} ({len(file)} tensors) matches no {' or '.join(sources)} "
                         f"classification architecture{_versions(sources)}: {near}; {advice}")
