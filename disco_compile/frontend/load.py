"""`load_model`: a model as a user names it -> an nn.Module, a description and an example input.

Sources, tried in this order:

- a torch.export program (a `.pt2` file, or any zip archive torch.export.save wrote: its `archive_format`
  member, so a program read from stdin is one too): its layers raised to modules (exported.py), at the input
  shape it was exported with. torch.export.load falls back to full unpickling where a weights-only read fails
  (the example inputs, pickled weights), so without `trust_pickle` the program is read with every torch.load
  forced to weights only (`_weights_only`) and an archive holding pickled objects (custom or opaque constants,
  read with pickle itself) is refused;
- another file: read with `torch.load(weights_only=True)`. A state_dict is built as `arch` (a torchvision
  model name, or timm:NAME), or without it as the one torchvision or timm architecture whose keys and shapes
  it matches (arch_match.py): that model is built with random weights (and `arch_args`) and given the weights
  (a "module." prefix from DataParallel is removed; every key and shape must match). A pickled whole module
  runs code stored in the file when unpickled, so it is read only with `trust_pickle=True`;
- a torchvision model name: built with random weights, its BatchNorm statistics calibrated on images of
  the input shape (zoo.py). Nothing is downloaded.

A model read from a file is refused if a parameter holds NaN or infinite values, or a buffer NaN (an
infinite buffer can be an attention mask), naming the tensors. An example input of more than
MAX_EXAMPLE_VALUES values is refused before anything is allocated.

Every failure is a ModelLoadError (or, for a program, an ExportedProgramError) naming the file and what to
do; the advice names disco-compile's options (--arch, --trust-pickle, --input-shape), which are this
function's `arch`, `trust_pickle` and `input_shape`. `stage(what)` is a context manager around each slow
step (disco-compile prints progress with it).
"""
from __future__ import annotations

import math
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision

from . import arch_match, exported, zoo
from ..errors import ExportedProgramError, ModelLoadError

DEFAULT_SHAPE = (1, 3, 224, 224)
LIST_MODELS = 'python -c "import torchvision; print(torchvision.models.list_models())"'
RANDOM_WEIGHTS = "random weights (no pretrained weights are downloaded)"
_FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".pkl", ".bin", ".ckpt", ".tar")
_SHOWN_KEYS = 8  # keys listed in a state_dict mismatch before "... and N more"
MAX_EXAMPLE_VALUES = 1 << 28  # values in one example input (1 GiB of float32); 1,3,224,224 has 150,528
_PICKLED_CONSTANTS = ("custom_obj_", "opaque_obj_")  # .pt2 constants read with pickle, not torch.load
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it on every call
_FORCING = threading.Lock()  # held while this process sets it (`_weights_only`)

Stage = Callable[[str], AbstractContextManager]


@dataclass
class LoadedModel:
    model: nn.Module
    description: str
    shape: tuple[int, ...]
    detector: bool = False  # a torchvision detection model: called with a list of images

    def example(self):
        """The example input for tracing: random normal of `shape`, or for a detector a list of images
        uniform in [0, 1]; the same every call."""
        g = torch.Generator().manual_seed(0)
        return list(torch.rand(self.shape, generator=g)) if self.detector else torch.randn(self.shape, generator=g)


def _quiet(what: str) -> AbstractContextManager:
    return nullcontext()


def load_model(model: str | os.PathLike, *, arch: str | None = None, arch_args: Mapping[str, object] | None = None,
               trust_pickle: bool = False,
               input_shape: tuple[int, ...] | None = None, stage: Stage = _quiet) -> LoadedModel:
    """The model in file `model`, or the torchvision model named `model` (module docstring).

    arch: the architecture of a state_dict file's weights: a torchvision model name (or torchvision:NAME), or
      timm:NAME; without it, the one torchvision or timm architecture whose keys and shapes are the file's
      (arch_match.py).
    arch_args: constructor arguments of that architecture (num_classes=3, ...).
    trust_pickle: allow a file holding a pickled whole nn.Module (unpickling runs code stored in it).
    input_shape: the example input's shape, batch first (default 1,3,224,224; a program's: its example's).
    """
    model = os.fspath(model)
    if input_shape is not None:
        _check_shape(input_shape)
    if arch is not None:
        arch = arch_name(arch, f"arch {arch!r}")
    if os.path.isfile(model):
        return _from_file(model, arch, arch_args or {}, trust_pickle, input_shape, stage)
    if os.path.exists(model):
        raise ModelLoadError(f"{model} is not a file; MODEL is a model file or a torchvision model name")
    if os.sep in model or "/" in model or model.endswith(_FILE_SUFFIXES):
        raise ModelLoadError(f"file not found: {model}")
    if arch is not None:
        raise ModelLoadError(f"--arch is only for state_dict files, but MODEL {model!r} is a name; leave --arch out")
    return _from_zoo(torchvision_name(model, f"MODEL {model!r} is not an existing file, and it"), input_shape, stage)


def _check_shape(shape: tuple[int, ...]) -> None:
    """Refuse an example input too large to allocate, before anything is."""
    values = math.prod(shape)
    if values > MAX_EXAMPLE_VALUES:
        raise ModelLoadError(f"--input-shape {','.join(map(str, shape))} is {values:.3g} values ({values * 4:.3g} "
                             f"bytes of float32) for one example input, more than {MAX_EXAMPLE_VALUES} values: give "
                             f"the shape of one real input, e.g. --input-shape 1,3,224,224")


def _check_finite(module: nn.Module, path: str) -> nn.Module:
    """`module`, or ModelLoadError naming its parameters with NaN or infinite values and buffers with NaN."""
    bad = [f"{name} (parameter)" for name, t in module.named_parameters()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    bad += [f"{name} (buffer)" for name, t in module.named_buffers()
            if t.is_floating_point() and bool(torch.isnan(t).any())]
    if bad:
        raise ModelLoadError(f"{path}: tensors with NaN or infinite values: {_key_list(bad)}; the file is damaged "
                             f"or the training that wrote it diverged: save the weights again from a good state")
    return module


def torchvision_name(name: str, what: str) -> str:
    """`name` if torchvision knows it; `what` says where the name came from."""
    if name not in torchvision.models.list_models():
        raise ModelLoadError(f"{what} is not a torchvision model name; to see the names: {LIST_MODELS}")
    return name


def arch_name(arch: str, what: str) -> str:
    """`arch` (NAME or torchvision:NAME, timm:NAME) as load_model takes it: a torchvision name bare, timm:NAME;
    `what` says where it came from."""
    source, _, name = arch.rpartition(":")
    if source in ("", "torchvision"):
        return torchvision_name(name, what)
    if source != "timm":
        raise ModelLoadError(f"{what}: expected torchvision:NAME or timm:NAME, got {arch!r}")
    if arch_match.installed("timm") is None:
        raise ModelLoadError(f"{what}: timm is not installed here (pip install timm), or give a torchvision name")
    import timm
    if not timm.is_model(name):
        raise ModelLoadError(f"{what}: {name!r} is not a timm model name; to see the names: python -c \"import "
                             f"timm; print(timm.list_models())\"")
    return arch


def _source(arch: str) -> tuple[str, str]:
    """(source, name) of an `arch_name` result."""
    source, _, name = arch.rpartition(":")
    return source or "torchvision", name


def _from_zoo(name: str, shape: tuple[int, ...] | None, stage: Stage) -> LoadedModel:
    shape = shape or DEFAULT_SHAPE
    if len(shape) < 3:
        raise ModelLoadError(f"--input-shape {','.join(map(str, shape))} has no height: a torchvision model takes "
                             f"images, e.g. --input-shape 1,3,224,224")
    detector = name in zoo.detection_models()
    with stage(f"building {name} with {RANDOM_WEIGHTS}"):
        try:
            model, _ = (zoo.build_detection if detector else zoo.build)(name, shape[-2])
        except Exception as exc:  # any failure of a torchvision builder or its first forward pass
            raise ModelLoadError(f"building {name} with random weights and calibrating it on {shape[-2]}x"
                                 f"{shape[-2]} images failed: {type(exc).__name__}: {exc}; disco-compile builds "
                                 f"image models taking N,3,H,W inputs; for another kind give a model file "
                                 f"instead") from None
    return LoadedModel(model, f"{name} (torchvision), {RANDOM_WEIGHTS}", shape, detector)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.:])\s", text.strip(), maxsplit=1)[0].rstrip(".:")


def _load_file(path: str, trust_pickle: bool) -> object:
    """The object in a torch.save file: weights-only loading first; full unpickling only if trusted."""
    safer = ("save the weights with torch.save(model.state_dict(), 'model.pt') and give that file with "
             "--arch torchvision:NAME")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:  # the file holds more than tensors, or is no pickle at all
        if not trust_pickle:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            if found:
                raise ModelLoadError(f"{path} holds a pickled {found.group(1)}, not just weights: loading it runs "
                                     f"code stored in the file. If you trust the file, pass --trust-pickle; "
                                     f"otherwise {safer}") from None
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise ModelLoadError(f"{path} cannot be read as a state_dict (torch.load with weights_only=True: "
                                 f"{reason.group(1) if reason else _first_sentence(str(exc))}). If it is a "
                                 f"pickled whole module from a source you trust, pass --trust-pickle (loading it "
                                 f"runs code stored in the file); otherwise {safer}") from None
    except Exception as exc:  # torch.load raises many types for files it cannot read
        raise ModelLoadError(f"cannot read {path} as a PyTorch file saved with torch.save: {type(exc).__name__}: "
                             f"{_first_sentence(str(exc))}; disco-compile reads a state_dict "
                             f"(with --arch) or a pickled nn.Module (with --trust-pickle)") from None
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # unpickling can fail in any way, e.g. a class that is not importable here
        raise ModelLoadError(f"cannot read {path}, even unpickling it fully: {type(exc).__name__}: "
                             f"{_first_sentence(str(exc))}; for a pickled module, the classes it was pickled "
                             f"with must be importable here") from None


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _as_state_dict(obj: Mapping, path: str) -> dict[str, torch.Tensor]:
    if not _is_tensor_dict(obj):
        inner = next((k for k, v in obj.items() if _is_tensor_dict(v) and v), None)
        hint = (f"it looks like a training checkpoint; save its weights alone, e.g. "
                f"torch.save(checkpoint[{inner!r}], 'model.pt')" if inner is not None
                else "save model.state_dict() itself")
        raise ModelLoadError(f"{path} holds a dict whose entries are not all tensors (keys: "
                             f"{_key_list(list(obj))}); {hint}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel / DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_into(arch: str, sd: dict[str, torch.Tensor], path: str, arch_args: Mapping[str, object]) -> nn.Module:
    """Architecture `arch` (`arch_name`) built with random weights and `arch_args`, then given the weights `sd`
    (all keys must match)."""
    source, name = _source(arch)
    # a torchvision detection model's builder downloads its backbone's weights unless told not to
    detection = {"weights_backbone": None} if source == "torchvision" and name in zoo.detection_models() else {}
    try:
        model = arch_match.build(source, name, arch_args, **detection)
    except (TypeError, ValueError) as exc:  # an argument the builder does not take, or a value it refuses
        raise ModelLoadError(f"{source} {name} cannot be built with {dict(arch_args)} (--num-classes, "
                             f"--arch-arg): {exc}") from None
    expected = model.state_dict()
    wrong = [f"{k} (file {tuple(v.shape)}, {name} {tuple(expected[k].shape)})"
             for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ModelLoadError(f"the weights in {path} do not fit {source} {name}: shapes differ for "
                             f"{_key_list(wrong)}; check --arch (and the number of classes the model was trained "
                             f"for)")
    result = model.load_state_dict(sd, strict=False)
    parts = [f"{what}: {_key_list(keys)}" for what, keys in (("missing from the file", result.missing_keys),
                                                             ("unexpected in the file", result.unexpected_keys))
             if keys]
    if parts:
        raise ModelLoadError(f"the keys in {path} do not match {source} {name}: {'; '.join(parts)}; check --arch")
    return model


@contextmanager
def _weights_only() -> Iterator[None]:
    """Every torch.load inside reads weights only, even where its caller asks for full unpickling.

    torch has no per-call switch that reaches the torch.load calls inside torch.export.load, only the process
    environment (TORCH_FORCE_WEIGHTS_ONLY_LOAD), so it is set for the load and put back as it was in `finally`.
    Threads: `_FORCING` makes program loads take turns, so one load's restore never ends another's forcing
    while it reads; a torch.load by another thread in that window reads weights only too, which fails closed
    (it may refuse a full unpickling it asked for, never unpickle more than asked)."""
    with _FORCING:
        before = os.environ.get(_FORCE_WEIGHTS_ONLY)
        os.environ[_FORCE_WEIGHTS_ONLY] = "1"
        try:
            yield
        finally:
            if before is None:
                del os.environ[_FORCE_WEIGHTS_ONLY]
            else:
                os.environ[_FORCE_WEIGHTS_ONLY] = before


def _is_program(path: str) -> bool:
    """Whether `path` is an archive torch.export.save wrote (it has an `archive_format` member; torch.save's
    zip files have none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "archive_format" or n.endswith("/archive_format") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _read_program(path: str, trust_pickle: bool):
    """exported.load of `path`; without `trust_pickle`, with nothing unpickled beyond tensors (module docstring)."""
    if trust_pickle:
        return exported.load(path)
    trust = ("If you trust the file, pass --trust-pickle; otherwise save the program again with "
             "torch.export.save from a source you trust")
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = [n for n in archive.namelist() if os.path.basename(n).startswith(_PICKLED_CONSTANTS)]
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path} as a torch.export program (torch.export.save writes a zip "
                             f"archive): {exc}") from None
    if pickled:
        raise ModelLoadError(f"{path} holds pickled objects ({', '.join(pickled[:3])}): loading them runs code "
                             f"stored in the file. {trust}")
    try:
        with _weights_only():
            return exported.load(path)
    except ExportedProgramError as exc:
        if "Weights only load failed" not in str(exc):
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        held = f"a pickled {found.group(1)}" if found else "pickled objects beyond tensors"
        raise ModelLoadError(f"{path} holds {held}: loading it runs code stored in the file. {trust}") from None


def _from_program(path: str, arch: str | None, trust_pickle: bool, shape: tuple[int, ...] | None,
                  stage: Stage) -> LoadedModel:
    """A torch.export program, its layers raised to modules (exported.py)."""
    if arch is not None:
        raise ModelLoadError(f"{path} is a torch.export program, which holds its architecture; --arch is only "
                             f"for state_dict files: leave it out")
    with stage(f"reading the torch.export program {path}"):
        program = _read_program(path, trust_pickle)
        _check_finite(program.module(), path)
        shapes = exported.example_shapes(program)
        if len(shapes) != 1:
            raise ModelLoadError(f"{path} takes {len(shapes)} tensor inputs; on the command line a model takes "
                                 f"one (--input-shape); for more, call disco_compile.transform in Python")
        if shape is not None and shapes[0] is not None and shape != shapes[0]:
            raise ModelLoadError(f"{path} was exported for input shape {','.join(map(str, shapes[0]))}, not "
                                 f"--input-shape {','.join(map(str, shape))}: leave --input-shape out, or export "
                                 f"the program again with an input of that shape")
        module = exported.to_module(program)
    kept = module.kept_aten_ops
    note = f"; ATen ops without a channel rule, run whole on every node: {', '.join(kept)}" if kept else ""
    return LoadedModel(module, f"torch.export program {path}, layers raised to modules{note}",
                       shape or exported.example_shapes(program, hinted=True)[0] or DEFAULT_SHAPE)


def _from_file(path: str, arch: str | None, arch_args: Mapping[str, object], trust_pickle: bool,
               shape: tuple[int, ...] | None, stage: Stage) -> LoadedModel:
    if path.endswith(".pt2") or _is_program(path):
        return _from_program(path, arch, trust_pickle, shape, stage)
    shape = shape or DEFAULT_SHAPE
    with stage(f"loading {path}"):
        obj = _load_file(path, trust_pickle)
        if isinstance(obj, nn.Module):
            if arch is not None:
                raise ModelLoadError(f"{path} holds a whole module ({type(obj).__name__}); --arch is only for "
                                     f"state_dict files: leave it out")
            return LoadedModel(_check_finite(obj, path), f"{type(obj).__name__} pickled in {path} (loaded with "
                               f"--trust-pickle)", shape)
        if not isinstance(obj, Mapping):
            raise ModelLoadError(f"{path} holds a {type(obj).__name__}, neither a state_dict nor an nn.Module")
        sd = _as_state_dict(obj, path)
        why = ""
        if arch is None:  # the one architecture whose keys and shapes are the file's (arch_match.py)
            found = arch_match.match(sd, path)
            arch = found.name if found.source == "torchvision" else f"{found.source}:{found.name}"
            arch_args, why = {**found.kwargs, **arch_args}, f" ({found.why})"
        source, name = _source(arch)
        return LoadedModel(_check_finite(_load_into(arch, sd, path, arch_args), path),
                           f"{name} ({source}) with the state_dict in {path}{why}", shape,
                           source == "torchvision" and name in zoo.detection_models())
