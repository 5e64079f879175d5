"""`disco-compile`: the command line.

Loads a model (a torchvision name built with random weights, a state_dict with
an architecture name, a torch.export program, or a trusted pickled module),
runs `transform`, applies `set_budget` when asked, and prints the cost report.
Every user error is one message on stderr and exit code 2; nothing is
downloaded.

Torchvision detectors do not trace whole: `--submodule backbone` splits their
backbone alone (the rest runs on node 0), and their example input is a list of
images (the batch of --input-shape), uniform in [0, 1].
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn as nn
import torchvision

from tqdm import tqdm

from ..budget import data, finetuning, selection
from ..frontend import exported, zoo

from ..budget.cost import CostReport
from ..errors import DiscoError, ExampleInputError, TraceFailure
from ..artifact.bundle import refuse_existing
from ..backend.exporter import export
from ..budget.finetuning import FinetuneResult
from ..model import transform
from ..passes.partition import check_weights

DEFAULT_SHAPE = (1, 3, 224, 224)
LIST_MODELS = 'python -c "import torchvision; print(torchvision.models.list_models())"'
RANDOM_WEIGHTS = "random weights (no pretrained weights are downloaded)"
_FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".pkl", ".bin", ".ckpt", ".tar")
_SHOWN_KEYS = 8  # keys listed in a state_dict mismatch before "... and N more"

# what a library error's advice means on the command line
_CLI_HINTS = {TraceFailure: "on the command line, mark a submodule with --leaf-module NAME",
              ExampleInputError: "on the command line, give the input shape with --input-shape N,C,H,W"}


class CliError(click.ClickException):
    """A user error: printed as 'Error: <message>' on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2


@dataclass
class Loaded:
    model: nn.Module
    description: str
    shape: tuple[int, ...]
    detector: bool = False  # a torchvision detection model: called with a list of images

    def example(self):
        g = torch.Generator().manual_seed(0)
        return list(torch.rand(self.shape, generator=g)) if self.detector else torch.randn(self.shape, generator=g)


# ---------------------------------------------------------------- argument parsing

def _torchvision_name(name: str, what: str) -> str:
    """`name` if torchvision knows it; `what` says where the name came from."""
    if name not in torchvision.models.list_models():
        raise CliError(f"{what} is not a torchvision model name; to see the names: {LIST_MODELS}")
    return name


def _parse_shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(x) for x in value.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"expected comma-separated positive whole numbers, batch first, "
                                 f"e.g. 1,3,224,224; got {value!r}")
    return shape


def _parse_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, one per node, e.g. 2,1; got {value!r}") from None


def _check_budget(ctx, param, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise click.BadParameter(f"must be between 0 and 1 (the fraction of exchanged channels to keep; "
                                 f"1 keeps them all), got {value}")
    return value


def _check_nodes(ctx, param, value: int) -> int:
    if value < 1:
        raise click.BadParameter(f"must be at least 1 (the number of devices the model is split across), got {value}")
    return value


def _parse_arch(ctx, param, value: str | None) -> str | None:
    """The torchvision model name in 'torchvision:NAME'."""
    if value is None:
        return None
    source, _, name = value.partition(":")
    if source != "torchvision" or not name:
        raise click.BadParameter(f"expected torchvision:NAME (the only architecture source so far), "
                                 f"e.g. torchvision:resnet50; got {value!r}")
    return _torchvision_name(name, f"--arch {value}: {name!r}")


def _check_json_path(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isdir(value):
        raise click.BadParameter(f"{value} is a folder; give a file name, e.g. {os.path.join(value, 'cost.json')}")
    parent = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(parent):
        raise click.BadParameter(f"the folder {parent} does not exist; create it first")
    return value


# ---------------------------------------------------------------- loading models

@contextmanager
def _stage(what: str) -> Iterator[None]:
    """Progress on stderr: 'what ... done (1.2 s)', then the warnings raised meanwhile (kept off that line)."""
    click.echo(f"{what} ...", err=True, nl=False)
    start = time.perf_counter()
    outcome = "failed"
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
        outcome = f"done ({time.perf_counter() - start:.1f} s)"
    finally:
        click.echo(f" {outcome}", err=True)
        for w in caught:
            click.echo(f"  warning: {w.category.__name__}: {w.message}", err=True)


def _from_zoo(name: str, shape: tuple[int, ...] | None) -> Loaded:
    shape = shape or DEFAULT_SHAPE
    if len(shape) < 3:
        raise CliError(f"--input-shape {','.join(map(str, shape))} has no height: a torchvision model takes "
                       f"images, e.g. --input-shape 1,3,224,224")
    detector = name in zoo.detection_models()
    with _stage(f"building {name} with {RANDOM_WEIGHTS}"):
        try:
            model, _ = (zoo.build_detection if detector else zoo.build)(name, shape[-2])
        except Exception as exc:  # any failure of a torchvision builder or its first forward pass
            raise CliError(f"building {name} with random weights and calibrating it on {shape[-2]}x{shape[-2]} "
                           f"images failed: {type(exc).__name__}: {exc}; disco-compile builds image models "
                           f"taking N,3,H,W inputs; for another kind give a model file instead") from None
    return Loaded(model, f"{name} (torchvision), {RANDOM_WEIGHTS}", shape, detector)


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
                raise CliError(f"{path} holds a pickled {found.group(1)}, not just weights: loading it runs code "
                               f"stored in the file. If you trust the file, pass --trust-pickle; otherwise "
                               f"{safer}") from None
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise CliError(f"{path} cannot be read as a state_dict (torch.load with weights_only=True: "
                           f"{reason.group(1) if reason else _first_sentence(str(exc))}). If it is a pickled "
                           f"whole module from a source you trust, pass --trust-pickle (loading it runs code "
                           f"stored in the file); otherwise {safer}") from None
    except Exception as exc:  # torch.load raises many types for files it cannot read
        raise CliError(f"cannot read {path} as a PyTorch file saved with torch.save: {type(exc).__name__}: "
                       f"{_first_sentence(str(exc))}; disco-compile reads a state_dict "
                       f"(with --arch) or a pickled nn.Module (with --trust-pickle)") from None
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # unpickling can fail in any way, e.g. a class that is not importable here
        raise CliError(f"cannot read {path}, even unpickling it fully: {type(exc).__name__}: "
                       f"{_first_sentence(str(exc))}; for a pickled module, the classes it was pickled with "
                       f"must be importable here") from None


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def _as_state_dict(obj: Mapping, path: str) -> dict[str, torch.Tensor]:
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k, v in obj.items() if isinstance(v, Mapping) and v
                      and all(isinstance(t, torch.Tensor) for t in v.values())), None)
        hint = (f"it looks like a training checkpoint; save its weights alone, e.g. "
                f"torch.save(checkpoint[{inner!r}], 'model.pt')" if inner is not None
                else "save model.state_dict() itself")
        raise CliError(f"{path} holds a dict whose entries are not all tensors (keys: {_key_list(list(obj))}); "
                       f"{hint}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel / DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_into(name: str, sd: dict[str, torch.Tensor], path: str) -> nn.Module:
    """torchvision model `name` built with weights=None, then given the weights `sd` (all keys must match)."""
    detection = {"weights_backbone": None} if name in zoo.detection_models() else {}  # else it downloads
    model = torchvision.models.get_model_builder(name)(weights=None, **detection)
    expected = model.state_dict()
    wrong = [f"{k} (file {tuple(v.shape)}, {name} {tuple(expected[k].shape)})"
             for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CliError(f"the weights in {path} do not fit torchvision {name}: shapes differ for "
                       f"{_key_list(wrong)}; check --arch (and the number of classes the model was trained for)")
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = [f"missing from the file: {_key_list(result.missing_keys)}" if result.missing_keys else "",
                 f"unexpected in the file: {_key_list(result.unexpected_keys)}" if result.unexpected_keys else ""]
        raise CliError(f"the keys in {path} do not match torchvision {name}: "
                       f"{'; '.join(p for p in parts if p)}; check --arch")
    return model


def _from_program(path: str, arch: str | None, shape: tuple[int, ...] | None) -> Loaded:
    """A torch.export program, its layers raised to modules (exported.py)."""
    if arch is not None:
        raise CliError(f"{path} is a torch.export program, which holds its architecture; --arch is only for "
                       f"state_dict files: leave it out")
    with _stage(f"reading the torch.export program {path}"):
        program = exported.load(path)
        shapes = exported.example_shapes(program)
        if len(shapes) != 1:
            raise CliError(f"{path} takes {len(shapes)} tensor inputs; on the command line a model takes one "
                           f"(--input-shape); for more, call disco_compile.transform in Python")
        if shape is not None and shapes[0] is not None and shape != shapes[0]:
            raise CliError(f"{path} was exported for input shape {','.join(map(str, shapes[0]))}, not "
                           f"--input-shape {','.join(map(str, shape))}: leave --input-shape out, or export the "
                           f"program again with an input of that shape")
        module = exported.to_module(program)
    kept = module.kept_aten_ops
    note = f"; ATen ops without a channel rule, run whole on every node: {', '.join(kept)}" if kept else ""
    return Loaded(module, f"torch.export program {path}, layers raised to modules{note}",
                  shape or exported.example_shapes(program, hinted=True)[0] or DEFAULT_SHAPE)


def _from_file(path: str, arch: str | None, trust_pickle: bool, shape: tuple[int, ...] | None) -> Loaded:
    if path.endswith(".pt2"):
        return _from_program(path, arch, shape)
    shape = shape or DEFAULT_SHAPE
    with _stage(f"loading {path}"):
        obj = _load_file(path, trust_pickle)
        if isinstance(obj, nn.Module):
            if arch is not None:
                raise CliError(f"{path} holds a whole module ({type(obj).__name__}); --arch is only for "
                               f"state_dict files: leave it out")
            return Loaded(obj, f"{type(obj).__name__} pickled in {path} (loaded with --trust-pickle)", shape)
        if not isinstance(obj, Mapping):
            raise CliError(f"{path} holds a {type(obj).__name__}, neither a state_dict nor an nn.Module")
        sd = _as_state_dict(obj, path)
        if arch is None:
            raise CliError(f"{path} holds a state_dict ({len(sd)} tensors: weights without the architecture); "
                           f"say which model they belong to with --arch torchvision:NAME, e.g. "
                           f"--arch torchvision:resnet50")
        return Loaded(_load_into(arch, sd, path), f"{arch} (torchvision) with the state_dict in {path}", shape,
                      arch in zoo.detection_models())


def _load(model: str, arch: str | None, trust_pickle: bool, shape: tuple[int, ...] | None) -> Loaded:
    if os.path.isfile(model):
        return _from_file(model, arch, trust_pickle, shape)
    if os.path.exists(model):
        raise CliError(f"{model} is not a file; MODEL is a model file or a torchvision model name")
    if os.sep in model or "/" in model or model.endswith(_FILE_SUFFIXES):
        raise CliError(f"file not found: {model}")
    if arch is not None:
        raise CliError(f"--arch is only for state_dict files, but MODEL {model!r} is a name; leave --arch out")
    return _from_zoo(_torchvision_name(model, f"MODEL {model!r} is not an existing file, and it"), shape)


# ---------------------------------------------------------------- output

def _stage_counts(manifest) -> dict[int, int]:
    counts: dict[int, int] = {}
    for rel in manifest.files:
        if rel.startswith("node"):
            k = int(rel.split("/")[0][4:])
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def _summary(loaded: Loaded, nodes: int, node_weights: list[float] | None, budget: float | None, align: int,
             allocation: str, compute_weight: float, report: CostReport, submodule: str | None,
             tuned: FinetuneResult | None = None) -> str:
    shares = "equal shares" if node_weights is None else \
        "shares " + ", ".join(f"{w / sum(node_weights):.3f}" for w in node_weights)
    per = f"(bytes + {compute_weight:g} x MACs at the destination, --compute-weight)" if compute_weight else "byte"
    kept = ("each node keeps that fraction of the channels it could receive from each other node"
            if allocation == "uniform" else "that fraction of the bytes the nodes would exchange with every channel, "
            f"the channels ranked over the whole model by score per {per} (--allocation global; score: weight "
            "magnitude, or as learned by fine-tuning)")
    rho = "none: every exchange gate on (rho = 1)" if budget is None else \
        f"{budget:g}: {kept}" + (f", in multiples of {align} per message (--align)" if align > 1 else "")
    lines = [f"model    {loaded.description}",
             f"input    {'x'.join(map(str, loaded.shape))}, "
             + ("a list of random images, uniform in [0, 1]" if loaded.detector else "random normal"),
             f"nodes    {nodes} ({shares})",
             f"budget   {rho}"]
    if submodule is not None:
        lines += [f"split    submodule {submodule!r} only; the rest of the model runs whole on node 0 and is not "
                  f"counted below (the figures are the submodule's)"]
    lines += ["",
              report.table(),
              "",
              f"exchange ratio  {report.exchange_ratio:.3f}  (bytes exchanged between nodes / with every gate on)",
              f"comm ratio      {report.comm_ratio:.3f}  (exchange plus input/output bytes / with every gate on)",
              f"per node, as fractions of the original {'submodule' if submodule else 'model'}:"]
    lines += [f"  node {k}: MACs {m / report.original_macs:.3f}, parameters {p / report.original_params:.3f}"
              for k, (m, p) in enumerate(zip(report.macs_per_node, report.params_per_node))]
    if tuned is not None:
        v = tuned.validation
        quality = "" if v is None else f"; validation {v['metric']}: {v['student']:.2f}" + \
            (f" (original {v['teacher']:.2f})" if "teacher" in v else "")
        lines += ["", f"fine-tuned {tuned.steps} steps at budget {tuned.budget:g}{quality}; "
                      f"checkpoint {tuned.checkpoint}"]
    elif budget is not None and budget < 1:
        lines += ["", f"note: budget {budget:g} is a one-shot selection of the exchanged channels by weight "
                      f"magnitude, without training: the model's accuracy at this budget is not measured and "
                      f"needs fine-tuning to recover: give --data DIR (images like the model's inputs)."]
    return "\n".join(lines)


def _write_json(path: str, report: CostReport, run: dict) -> None:
    """Write the report (and what produced it) so that `path` is either as before or complete:
    a temp file beside it, then a rename."""
    text = json.dumps({"run": run, **report.as_dict()}, indent=2, allow_nan=False) + "\n"
    umask = os.umask(0)
    os.umask(umask)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes the file private; give the usual mode
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise CliError(f"cannot write the JSON report to {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- fine-tuning

def _finetune(disco, loaded: Loaded, data_dir: str, val_dir: str | None, budget: float, out_dir: str | None, *,
              val_fraction: float, steps: int, batch_size: int, lr: float, method: str, allocation: str,
              align: int, compute_weight: float, use_labels: bool, checkpoint_dir: str | None, resume: bool,
              device: str, seed: int, workers: int) -> FinetuneResult:
    size = tuple(loaded.shape[-2:])
    fixed = getattr(loaded.model, "fixed_batch", None)
    if fixed is not None:
        raise CliError(f"the torch.export program computes batches of {fixed} only (it was exported with a "
                       f"static batch size, and shapes such as a flatten's view keep it); fine-tuning trains on "
                       f"batches of --batch-size: export the model again with a dynamic batch dimension, "
                       f"torch.export.export(model, (x,), dynamic_shapes=({{0: torch.export.Dim('batch')}},)), "
                       f"or compile without --data")
    if len(loaded.shape) != 4 or loaded.shape[1] != 3:
        raise CliError(f"--data holds RGB images, but the model's input shape is {loaded.shape}: fine-tuning "
                       f"from an image folder needs N,3,H,W")
    if val_dir is None:
        train_set, val_set = data.image_split(data_dir, size, val_fraction, seed)
    else:
        train_set, val_set = data.image_folder(data_dir, size, train=True), data.image_folder(val_dir, size, False)
    if not use_labels:
        train_set.labels = val_set.labels = None
    if checkpoint_dir is None:
        checkpoint_dir = f"{out_dir.rstrip('/')}.ckpt" if out_dir is not None else "disco-checkpoints"
    train_loader = data.loader(train_set, batch_size, shuffle=True, seed=seed, workers=workers)
    val_loader = data.loader(val_set, batch_size, shuffle=False, seed=seed, workers=workers)
    click.echo(f"fine-tuning on {len(train_set)} images of {data_dir} ({len(val_set)} for validation), "
               f"{steps} steps, budget {budget:g}, {method} selection, checkpoints in {checkpoint_dir}", err=True)
    return finetuning.finetune(disco, train_loader, budget=budget, steps=steps, val_data=val_loader,
                                 method=method, allocation=allocation, align=align,
                                 compute_weight=compute_weight, lr=lr, seed=seed, device=device,
                                 checkpoint_dir=checkpoint_dir, resume=resume)


# ---------------------------------------------------------------- command

@click.command(name="disco-compile", context_settings={"help_option_names": ["-h", "--help"],
                                                       "max_content_width": 100})
@click.argument("model", metavar="MODEL")
@click.option("--nodes", type=int, required=True, callback=_check_nodes,
              help="Number of nodes (devices) to split every Conv/Linear layer's channels across.")
@click.option("--budget", type=float, callback=_check_budget, metavar="RHO",
              help="Fraction in [0, 1] of the exchanged channels to keep, chosen once by weight magnitude. "
                   "Default: no budget, every exchange on (RHO = 1).")
@click.option("--align", type=click.IntRange(min=1), default=8, show_default=True, metavar="G",
              help="With --budget: every message carries a multiple of G channels (within the budget). "
                   "onnxruntime's fastest convolution kernels take inputs whose channel count is a multiple of 8 "
                   "(AVX2; 16 on AVX-512 CPUs); 1 keeps exactly the budget's share of each exchange.")
@click.option("--input-shape", callback=_parse_shape, metavar="N,C,H,W",
              help="Shape of the random normal example input used for tracing, batch first "
                   "(default 1,3,224,224; a .pt2 program's: the shape of its example). A torchvision "
                   "name's BatchNorm statistics are calibrated on images of this size.")
@click.option("--arch", callback=_parse_arch, metavar="torchvision:NAME",
              help="Architecture of a state_dict MODEL file: a torchvision model built with weights=None, "
                   "then loaded with the file's weights (a 'module.' prefix from DataParallel is removed).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a MODEL file that holds a pickled whole nn.Module. Unpickling runs code stored in "
                   "the file: use only for files you trust.")
@click.option("--node-weights", callback=_parse_weights, metavar="W0,W1,...",
              help="Relative speed of each node, one per node (e.g. 2,1): a node gets that share of every "
                   "layer's channels. Default: equal shares.")
@click.option("--leaf-module", "leaf_modules", multiple=True, metavar="NAME",
              help="Qualified name of a submodule (as in model.named_modules(), e.g. layer1.0) that is not "
                   "traced into but run whole as one op; repeat for several.")
@click.option("--submodule", metavar="NAME",
              help="Split only this submodule (qualified name, e.g. backbone: a torchvision detector's backbone "
                   "with its FPN; detectors do not trace whole); the rest of the model runs whole on node 0. "
                   "The report and --out cover the submodule.")
@click.option("--input-on-all-nodes", is_flag=True,
              help="The input is already present on every node, so sending it costs nothing.")
@click.option("--json", "json_path", callback=_check_json_path, metavar="FILE",
              help="Also write the cost report to FILE as JSON (written whole or not at all).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Export the split model to DIR: one ONNX graph per node and stage, schedule.json (every "
                   "message between nodes) and manifest.json (sha256 of every file). Run it with "
                   "`disco-run DIR --simulate --input x.npy`.")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="With --out: each node computes its own channels' share of a layer while the other nodes' "
                   "channels are in flight (best on slow links), or waits for them and runs the layer as one "
                   "product (fewer, faster kernels, half the stages: best on fast links).")
@click.option("--force", is_flag=True, help="Replace DIR if it exists and is not empty (only once the new export "
                                            "is complete).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Fine-tune at the budget on the images in DIR (class subfolders as torchvision's ImageFolder, "
                   "or images directly: labels are not needed), distilling from the original model.")
@click.option("--val-data", "val_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Validation images (default: hold out --val-fraction of --data).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of --data held out for validation when --val-data is not given.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Fine-tuning optimiser steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate of the weights and gates (Adam).")
@click.option("--method", type=click.Choice(finetuning.METHODS), default="learned", show_default=True,
              help="How exchanged channels are chosen: learned scores, fixed weight magnitude, or random.")
@click.option("--allocation", type=click.Choice(selection.ALLOCATIONS), default="global", show_default=True,
              help="With --budget: the budget applied to every exchange alike (uniform: lighter nodes, best on slow "
                   "links), or the channels ranked over the whole model by score per byte (global: exchanges whose "
                   "channels rank low send nothing, so fewer layers wait for messages: best on fast links; see "
                   "docs/latency.md). Used by the one-shot selection and by fine-tuning.")
@click.option("--compute-weight", type=click.FloatRange(min=0), default=None, metavar="W",
              help="With --allocation global: rank channels by score per (bytes + W x the multiply-accumulates "
                   "a received channel costs its destination), so the budget's bytes go to channels that are "
                   "cheaper to compute. W is bytes per MAC: your link's bytes per second over a node's MACs per "
                   f"second. Default {selection.DEFAULT_COMPUTE_WEIGHT:g} (1 Gbit/s against 30 GMAC/s; ResNet-50 "
                   "at --budget 0.2: the slowest node takes 0.39 of the whole model's time instead of 0.43 at 0, "
                   "with quality after fine-tuning level with 0 on ResNet-50 and MobileNetV2, docs/accuracy.md); "
                   "0 ranks by bytes alone; 0.1 leaves 0.34 and cost MobileNetV2 about one point. "
                   "docs/performance.md.")
@click.option("--use-labels", is_flag=True,
              help="Add the cross-entropy against the class subfolders of --data (their sorted order must be "
                   "the model's class order) to the distillation loss, and report accuracy.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where fine-tuning writes last.pt every 100 steps (default: OUT.ckpt beside --out, else "
                   "./disco-checkpoints).")
@click.option("--resume", is_flag=True, help="Continue fine-tuning from the checkpoint in --checkpoint-dir.")
@click.option("--device", default="cpu", show_default=True, help="Where to fine-tune: cpu, cuda, cuda:1, ...")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and initialisation.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Processes decoding images for fine-tuning.")
@click.version_option(package_name="disco-compile")
def main(model: str, nodes: int, budget: float | None, input_shape: tuple[int, ...] | None, arch: str | None,
         trust_pickle: bool, node_weights: list[float] | None, leaf_modules: tuple[str, ...],
         submodule: str | None, input_on_all_nodes: bool, json_path: str | None, out_dir: str | None,
         overlap: bool, force: bool, data_dir: str | None, val_dir: str | None, **train) -> None:
    """Split MODEL across NODES devices in DISCO form and report what it costs.

    Every Conv and Linear layer's output channels are divided among the nodes, and a
    sparse exchange is inserted wherever a layer needs channels another node computed.
    The report gives the bytes sent between nodes per sample, the MACs and the parameters
    on each node; --budget keeps only a fraction of the exchanged channels. With --data, the
    split model is fine-tuned at the budget to recover the original's outputs before export.

    MODEL is a torchvision model name (built with random weights: nothing is downloaded),
    a state_dict file with --arch, a torch.export program (.pt2, from torch.export.save;
    its input shape is the one it was exported with), or a pickled whole module with
    --trust-pickle.

    \b
    Examples:
      disco-compile resnet50 --nodes 2 --budget 0.2
      disco-compile resnet50 --nodes 2 --budget 0.2 --out shards/
      disco-compile resnet50 --nodes 2 --budget 0.2 --data images/ --steps 2000 --out shards/
      disco-compile weights.pt --arch torchvision:resnet18 --nodes 4 --json cost.json
      disco-compile model.pt2 --nodes 2 --budget 0.2 --out shards/
      disco-compile retinanet_resnet50_fpn --submodule backbone --nodes 2 --input-shape 1,3,512,512
    """
    try:
        if node_weights is not None:
            check_weights(nodes, node_weights)  # before the slow steps
        if out_dir is not None:
            refuse_existing(Path(out_dir), force)
        if data_dir is None and (val_dir is not None or train["resume"]):
            raise CliError("--val-data and --resume belong to fine-tuning: give --data DIR as well")
        if submodule is None and (arch or model) in zoo.detection_models():
            raise CliError(f"{arch or model} is a detection model: its pre- and post-processing do not trace; "
                           f"split its backbone with --submodule backbone")
        if train["compute_weight"] and train["allocation"] != "global":
            raise CliError("--compute-weight prices MACs in the global allocation's ranking: use it with "
                           "--allocation global (the default)")
        if train["compute_weight"] is None:
            train["compute_weight"] = selection.default_compute_weight(train["allocation"])
        if submodule is not None and data_dir is not None:
            raise CliError("--data (fine-tuning) is not supported with --submodule yet")
        loaded = _load(model, arch, trust_pickle, input_shape)
        with _stage(f"tracing and splitting across {nodes} node{'s' if nodes > 1 else ''}"):
            disco = transform(loaded.model, nodes, loaded.example(), node_weights=node_weights,
                              leaf_modules=leaf_modules, input_on_all_nodes=input_on_all_nodes, submodule=submodule)
        tuned = None
        if data_dir is not None:
            tuned = _finetune(disco, loaded, data_dir, val_dir, 1.0 if budget is None else budget, out_dir, **train)
            if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                return  # under torchrun, process 0 alone reports and exports
        elif budget is not None:
            with _stage(f"selecting exchanged channels for budget {budget:g}"):
                disco.set_budget(budget, train["allocation"], align=train["align"],
                                 compute_weight=train["compute_weight"])
        with _stage("computing the cost"):
            report = disco.cost()
        click.echo(_summary(loaded, nodes, node_weights, budget, train["align"], train["allocation"],
                            train["compute_weight"], report, submodule, tuned))
        if out_dir is not None:
            if input_on_all_nodes:
                raise CliError("--input-on-all-nodes is not supported with --out yet: the export sends the input "
                               "from node 0 to the other nodes")
            disco.cpu()
            with tqdm(desc="exporting stages to ONNX", unit="stage", file=sys.stderr) as bar:
                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)
                manifest = export(disco, out_dir, force=force, overlap=overlap, progress=progress)
            stages = len(manifest.files) - 1
            click.echo(f"\nwrote {out_dir}: manifest.json, schedule.json and {stages} ONNX stage graphs "
                       f"({', '.join(f'node {k}: {n}' for k, n in _stage_counts(manifest).items())})"
                       + (f" of submodule {submodule!r}; the rest of the model is not exported" if submodule else "")
                       + f"\nrun it: disco-run {out_dir} --simulate --input x.npy --output y.npy"
                       + f"\nits latency at your link: disco-run estimate {out_dir} --link 1gbit")
    except DiscoError as exc:
        hint = next((h for cls, h in _CLI_HINTS.items() if isinstance(exc, cls)), None)
        raise CliError(str(exc) + (f"\n  {hint}" if hint else "")) from None
    if json_path is not None:
        _write_json(json_path, report, {"model": loaded.description, "input_shape": list(loaded.shape),
                                        "nodes": nodes, "node_weights": node_weights, "budget": budget,
                                        "align": train["align"], "allocation": train["allocation"],
                                        "compute_weight": train["compute_weight"],
                                        "submodule": submodule})
        click.echo(f"cost report written to {json_path}", err=True)


if __name__ == "__main__":
    main()
