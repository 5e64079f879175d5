"""`disco-compile`: the command line.

Loads a model (`load_model`: a torchvision name built with random weights, a
state_dict with an architecture name, a torch.export program, or a trusted
pickled module), runs `transform`, applies the `Budget` when asked (a one-shot
selection, or fine-tuning with --data), prints the cost report and exports.
`main` runs those steps in that order; each is a function below. Every user
error is one message on stderr and exit code 2; nothing is downloaded.

torch is imported only once a model is loaded, so `--help` and shell completion
take a fraction of a second, and without torch (the plain install is the device
runtime) the command says which install it needs. SIGINT and SIGTERM end it with
one line and status 130 or 143 (common.py); during fine-tuning they stop it
between two steps, after writing the checkpoint that --resume continues from.

Torchvision detectors do not trace whole: `--submodule backbone` splits their
backbone alone (the rest runs on node 0), and their example input is a list of
images (the batch of --input-shape), uniform in [0, 1].
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..artifact.wire import DEFAULT_WIRE, WIRES, is_integer
from ..budget.budget import ALLOCATIONS, DEFAULT_COMPUTE_WEIGHT, METHODS, Budget
from ..errors import DiscoError, FinetuneInterrupted
from .common import CONTEXT, STDIO, CliError, Command, Stopped, deferred_signals
from .options import check_json_path, cli_error, parse_arch, parse_shape, require_torch, stage, write_json

if TYPE_CHECKING:
    from ..budget.cost import CostReport
    from ..budget.finetuning import FinetuneResult
    from ..frontend.load import LoadedModel

# ---------------------------------------------------------------- argument parsing

def _parse_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        weights = [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, one per node, e.g. 2,1; got {value!r}") from None
    if not all(0 < w < math.inf for w in weights) or not math.isfinite(sum(weights)):
        raise click.BadParameter(f"each weight is a node's relative speed: a finite number above 0, and their sum "
                                 f"finite too (a share is weight / sum), e.g. 2,1; got {value!r}")
    return weights


def _check_budget(ctx, param, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise click.BadParameter(f"must be between 0 and 1 (the fraction of exchanged channels to keep; "
                                 f"1 keeps them all), got {value}")
    return value


def _check_nodes(ctx, param, value: int) -> int:
    if value < 1:
        raise click.BadParameter(f"must be at least 1 (the number of devices the model is split across), got {value}")
    return value


def _parse_arch_args(ctx, param, values: tuple[str, ...]) -> dict[str, object]:
    """KEY=VALUE pairs; a value is a Python literal (3, 0.5, True, None, 'text') or else the text itself."""
    import ast
    args = {}
    for text in values:
        key, eq, raw = text.partition("=")
        if not eq or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE with KEY a constructor argument's name, e.g. "
                                     f"num_classes=10 or aux_logits=False; got {text!r}")
        try:
            args[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            args[key] = raw
    return args


@contextmanager
def _model_file(model: str) -> Iterator[str]:
    """MODEL as a path: itself, or for - a temporary copy of stdin (a torch.save file or a torch.export program,
    told apart by its contents: load.py), removed afterwards."""
    if model != STDIO:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="disco-stdin-") as folder:
        path = os.path.join(folder, "stdin.pt")
        with open(path, "wb") as f:
            f.write(sys.stdin.buffer.read())
        yield path


# ---------------------------------------------------------------- output

def _stage_counts(manifest) -> dict[int, int]:
    counts: dict[int, int] = {}
    for rel in manifest.files:
        if rel.startswith("node"):
            k = int(rel.split("/")[0][4:])
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def _budget_text(budget: Budget | None) -> str:
    """The report's budget line: None is no --budget."""
    if budget is None:
        return "none: every exchange gate on (rho = 1)"
    weight = budget.compute_weight
    per = f"(bytes + {weight:g} x MACs at the destination, --compute-weight)" if weight else "byte"
    kept = ("each node keeps that fraction of the channels it could receive from each other node"
            if budget.allocation == "uniform" else "that fraction of the bytes the nodes would exchange with every "
            f"channel, the channels ranked over the whole model by score per {per} (--allocation global; score: "
            "weight magnitude, or as learned by fine-tuning)")
    wire = "" if budget.wire == DEFAULT_WIRE else \
        f"; sent as {budget.wire} with a scale per channel" if budget.wire != "fp16" else "; sent as fp16"
    return f"{budget.rho:g}: {kept}" + (f", in multiples of {budget.align} per message (--align)"
                                        if budget.align > 1 else "") + wire


def _outcome_lines(budget: Budget | None, tuned: FinetuneResult | None) -> list[str]:
    """After the figures: what fine-tuning reached, or the note that a one-shot budget is untrained."""
    if tuned is not None:
        v = tuned.validation
        quality = "" if v is None else f"; validation {v['metric']}: {v['student']:.2f}" + \
            (f" (original {v['teacher']:.2f})" if "teacher" in v else "")
        return ["", f"fine-tuned {tuned.steps} steps at budget {tuned.budget:g}{quality}; "
                    f"checkpoint {tuned.checkpoint}"]
    scales = [] if budget is None or budget.wire in (DEFAULT_WIRE, "fp16") else \
        ["", f"note: the {budget.wire} wire's scales are calibrated on the example input (random values): give --data "
             f"DIR to calibrate and fine-tune them on your data."]
    if budget is not None and budget.rho < 1:
        return scales + ["", f"note: budget {budget.rho:g} is a one-shot selection of the exchanged channels by weight "
                    f"magnitude, without training: the model's accuracy at this budget is not measured and "
                    f"needs fine-tuning to recover: give --data DIR (images like the model's inputs)."]
    return scales


def _summary(loaded: LoadedModel, nodes: int, node_weights: list[float] | None, budget: Budget | None,
             report: CostReport, submodule: str | None, tuned: FinetuneResult | None = None) -> str:
    """The printed report; `budget` None: no --budget."""
    shares = "equal shares" if node_weights is None else \
        "shares " + ", ".join(f"{w / sum(node_weights):.3f}" for w in node_weights)
    lines = [f"model    {loaded.description}",
             f"input    {'x'.join(map(str, loaded.shape))}, "
             + ("a list of random images, uniform in [0, 1]" if loaded.detector else "random normal"),
             f"nodes    {nodes} ({shares})",
             f"budget   {_budget_text(budget)}"]
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
              for k, (m, p) in enumerate(zip(report.macs_per_node, report.params_per_node, strict=True))]
    return "\n".join(lines + _outcome_lines(budget, tuned))


# ---------------------------------------------------------------- fine-tuning

def _finetune(disco, loaded: LoadedModel, data_dir: str, val_dir: str | None, budget: Budget, out_dir: str | None,
              *, val_fraction: float, steps: int, batch_size: int, lr: float, method: str, use_labels: bool,
              checkpoint_dir: str | None, checkpoint_every: int, resume: bool, device: str, seed: int,
              workers: int) -> FinetuneResult:
    """Fine-tune on the images of --data; SIGINT or SIGTERM stops it after the step running, checkpoint first."""
    from ..budget import data, finetuning
    from ..budget.resumable import StepBatches
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
    train_batches = StepBatches(train_set, batch_size, seed, workers)
    val_loader = data.loader(val_set, batch_size, shuffle=False, seed=seed, workers=workers)
    click.echo(f"fine-tuning on {len(train_set)} images of {data_dir} ({len(val_set)} for validation), "
               f"{steps} steps, budget {budget.rho:g}, {method} selection, checkpoints in {checkpoint_dir} every "
               f"{checkpoint_every} steps", err=True)
    with deferred_signals() as deferred:
        try:
            return finetuning.finetune(disco, train_batches, budget=budget, steps=steps, val_data=val_loader,
                                       method=method, lr=lr, seed=seed, device=device, checkpoint_dir=checkpoint_dir,
                                       checkpoint_every=checkpoint_every, resume=resume,
                                       stop=lambda: deferred.received is not None)
        except FinetuneInterrupted as exc:
            raise Stopped(deferred.received, f"{exc}; to continue, run the same command with --resume") from None


# ---------------------------------------------------------------- steps of the command

def _check_options(model: str, nodes: int, arch: str | None, node_weights: list[float] | None,
                   submodule: str | None, out_dir: str | None, force: bool, data_dir: str | None,
                   val_dir: str | None, resume: bool) -> None:
    """What can be refused before the slow steps."""
    from ..artifact.bundle import refuse_existing
    from ..frontend import zoo
    from ..passes.partition import check_weights
    if node_weights is not None:
        check_weights(nodes, node_weights)
    if out_dir is not None:
        refuse_existing(Path(out_dir), force)
    if data_dir is None and (val_dir is not None or resume):
        raise CliError("--val-data and --resume belong to fine-tuning: give --data DIR as well")
    if submodule is None and (arch or model) in zoo.detection_models():
        raise CliError(f"{arch or model} is a detection model: its pre- and post-processing do not trace; "
                       f"split its backbone with --submodule backbone")
    if submodule is not None and data_dir is not None:
        raise CliError("--data (fine-tuning) is not supported with --submodule yet")


def _budget(rho: float | None, allocation: str, align: int, compute_weight: float | None, wire: str) -> Budget:
    """The Budget of the options (rho 1 without --budget: fine-tuning then keeps every channel)."""
    if compute_weight and allocation != "global":
        raise CliError("--compute-weight prices MACs in the global allocation's ranking: use it with "
                       "--allocation global (the default)")
    return Budget(1.0 if rho is None else rho, allocation, align, compute_weight, wire)


def _split(loaded: LoadedModel, nodes: int, node_weights: list[float] | None, leaf_modules: tuple[str, ...],
           input_on_all_nodes: bool, submodule: str | None):
    from ..model import transform
    with stage(f"tracing and splitting across {nodes} node{'s' if nodes > 1 else ''}"):
        return transform(loaded.model, nodes, loaded.example(), node_weights=node_weights,
                         leaf_modules=leaf_modules, input_on_all_nodes=input_on_all_nodes, submodule=submodule)


def _other_process() -> bool:
    """Under torchrun, whether this is a process other than 0."""
    import torch
    return torch.distributed.is_initialized() and torch.distributed.get_rank() != 0


def _recorded(model: str, loaded: LoadedModel, submodule: str | None, budget: Budget | None,
              tuned: FinetuneResult | None, data_dir: str | None) -> dict:
    """What manifest.json records of how the export was made (artifact/schemas/manifest.schema.json, settings)."""
    described = {"description": loaded.description, "source": model, "input_shape": list(loaded.shape),
                 "submodule": submodule}
    if os.path.isfile(model):
        digest = hashlib.sha256()
        with open(model, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        described["weights_sha256"] = digest.hexdigest()
    recorded = {"model": described, "budget": None if budget is None else {
        "rho": budget.rho, "allocation": budget.allocation, "align": budget.align,
        "compute_weight": budget.compute_weight}, "wire": DEFAULT_WIRE if budget is None else budget.wire}
    recorded["finetune"] = None if tuned is None else {
        "steps": tuned.steps, "data": data_dir, "exchange_ratio": tuned.exchange_ratio, "quality": tuned.validation}
    return recorded


def _export(disco, out_dir: str, force: bool, overlap: bool, submodule: str | None, recorded: dict) -> None:
    from tqdm import tqdm

    from ..backend.exporter import export
    disco.cpu()
    with tqdm(desc="exporting stages to ONNX", unit="stage", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        manifest = export(disco, out_dir, force=force, overlap=overlap, progress=progress, settings=recorded)
    stages = len(manifest.files) - 1
    click.echo(f"\nwrote {out_dir}: manifest.json, schedule.json and {stages} ONNX stage graphs "
               f"({', '.join(f'node {k}: {n}' for k, n in _stage_counts(manifest).items())})"
               + (f" of submodule {submodule!r}; the rest of the model is not exported" if submodule else "")
               + f"\nrun it: disco-run {out_dir} --simulate --input x.npy --output y.npy"
               + f"\nits latency at your link: disco-run estimate {out_dir} --link 1gbit")


# ---------------------------------------------------------------- command

@click.command(name="disco-compile", cls=Command, context_settings=CONTEXT)
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
@click.option("--input-shape", callback=parse_shape, metavar="N,C,H,W",
              help="Shape of the random normal example input used for tracing, batch first "
                   "(default 1,3,224,224; a .pt2 program's: the shape of its example). A torchvision "
                   "name's BatchNorm statistics are calibrated on images of this size.")
@click.option("--arch", callback=parse_arch, metavar="torchvision:NAME|timm:NAME",
              help="Architecture of a state_dict MODEL file: a torchvision (or timm) model built with random "
                   "weights, then loaded with the file's weights (a 'module.' prefix from DataParallel is "
                   "removed). Without it, the one architecture whose keys and shapes are the file's.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, metavar="N",
              help="With a state_dict MODEL file: build the architecture for N classes (num_classes=N; without "
                   "--arch it is read off the classifier's shapes).")
@click.option("--arch-arg", "arch_args", multiple=True, callback=_parse_arch_args, metavar="KEY=VALUE",
              help="With a state_dict MODEL file: a constructor argument of the architecture, a Python literal "
                   "(e.g. aux_logits=False, dropout=0.2); repeat for several.")
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
              help="Every node has the input itself (each device its own camera, say): nothing is sent. Run "
                   "each node of the export with its own --input (disco-run --help).")
@click.option("--json", "json_path", callback=check_json_path, metavar="FILE|-",
              help="Also write the cost report to FILE as JSON (written whole or not at all); - writes it to "
                   "stdout, and the printed report goes to stderr.")
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
@click.option("--method", type=click.Choice(METHODS), default="learned", show_default=True,
              help="How exchanged channels are chosen: learned scores, fixed weight magnitude, or random.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="global", show_default=True,
              help="With --budget: the budget applied to every exchange alike (uniform: lighter nodes, best on slow "
                   "links), or the channels ranked over the whole model by score per byte (global: exchanges whose "
                   "channels rank low send nothing, so fewer layers wait for messages: best on fast links; see "
                   "docs/latency.md). Used by the one-shot selection and by fine-tuning.")
@click.option("--compute-weight", type=click.FloatRange(min=0), default=None, metavar="W",
              help="With --allocation global: rank channels by score per (bytes + W x the multiply-accumulates "
                   "a received channel costs its destination), so the budget's bytes go to channels that are "
                   "cheaper to compute. W is bytes per MAC: your link's bytes per second over a node's MACs per "
                   f"second. Default {DEFAULT_COMPUTE_WEIGHT:g} (1 Gbit/s against 30 GMAC/s; ResNet-50 "
                   "at --budget 0.2: the slowest node takes 0.39 of the whole model's time instead of 0.43 at 0, "
                   "with quality after fine-tuning level with 0 on ResNet-50 and MobileNetV2, docs/accuracy.md); "
                   "0 ranks by bytes alone; 0.1 leaves 0.34 and cost MobileNetV2 about one point. "
                   "docs/performance.md.")
@click.option("--wire", type=click.Choice(WIRES), default=DEFAULT_WIRE, show_default=True,
              help="What exchange messages carry: fp32 as computed, fp16, or int8 / int4 integers with a scale per "
                   "channel (a quarter / an eighth of fp32's bytes for the same channels: --budget chooses the "
                   "channels, --wire their bits). The split model computes with the same rounding; with --data "
                   "the scales are calibrated on the first batches and fine-tuned, else calibrated on the example "
                   "input (random values: give --data for scales from your data).")
@click.option("--use-labels", is_flag=True,
              help="Add the cross-entropy against the class subfolders of --data (their sorted order must be "
                   "the model's class order) to the distillation loss, and report accuracy.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where fine-tuning writes last.pt every --checkpoint-every steps, after the last one and when "
                   "stopped by Ctrl-C or SIGTERM (default: OUT.ckpt beside --out, else ./disco-checkpoints).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True, metavar="STEPS",
              help="Fine-tuning steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue fine-tuning from the checkpoint in --checkpoint-dir: from "
                                             "the step it was written at, with the batches an uninterrupted run "
                                             "would have seen (none of the earlier ones is read again).")
@click.option("--device", default="cpu", show_default=True, help="Where to fine-tune: cpu, cuda, cuda:1, ...")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and initialisation.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Processes decoding images for fine-tuning.")
@click.version_option(package_name="disco-compile")
def main(model: str, nodes: int, budget: float | None, input_shape: tuple[int, ...] | None, arch: str | None,
         num_classes: int | None, arch_args: dict[str, object], trust_pickle: bool, node_weights: list[float] | None,
         leaf_modules: tuple[str, ...],
         submodule: str | None, input_on_all_nodes: bool, json_path: str | None, out_dir: str | None,
         overlap: bool, force: bool, data_dir: str | None, val_dir: str | None, allocation: str, align: int,
         compute_weight: float | None, wire: str, **train) -> None:
    """Split MODEL across NODES devices in DISCO form and report what it costs.

    Every Conv and Linear layer's output channels are divided among the nodes, and a
    sparse exchange is inserted wherever a layer needs channels another node computed.
    The report gives the bytes sent between nodes per sample, the MACs and the parameters
    on each node; --budget keeps only a fraction of the exchanged channels. With --data, the
    split model is fine-tuned at the budget to recover the original's outputs before export.

    MODEL is a torchvision model name (built with random weights: nothing is downloaded),
    a state_dict file (its architecture: --arch, or the one torchvision or timm
    architecture whose keys and shapes it matches), a torch.export program (.pt2, from
    torch.export.save; its input shape is the one it was exported with), or a pickled
    whole module with --trust-pickle; - reads any of these files from stdin (a program
    is told from a torch.save file by its contents).

    \b
    Examples:
      disco-compile resnet50 --nodes 2 --budget 0.2
      disco-compile resnet50 --nodes 2 --budget 0.2 --out shards/
      disco-compile resnet50 --nodes 2 --budget 0.2 --data images/ --steps 2000 --out shards/
      disco-compile resnet50.pt --nodes 2 --out shards/
      disco-compile weights.pt --arch torchvision:resnet18 --num-classes 10 --nodes 4 --json cost.json
      disco-compile model.pt2 --nodes 2 --budget 0.2 --out shards/
      disco-compile retinanet_resnet50_fpn --submodule backbone --nodes 2 --input-shape 1,3,512,512
      disco-compile plan resnet50 --link 100mbit --node-speed 4.6   (which split to make: plan --help)
    """
    require_torch()
    from ..frontend.load import load_model
    if num_classes is not None:
        arch_args = {**arch_args, "num_classes": num_classes}
    if arch_args and not (os.path.isfile(model) or model == STDIO):
        raise CliError(f"--num-classes and --arch-arg build the architecture of a state_dict file; MODEL {model!r} "
                       f"is not a file")
    try:
        _check_options(model, nodes, arch, node_weights, submodule, out_dir, force, data_dir, val_dir,
                       train["resume"])
        settings = _budget(budget, allocation, align, compute_weight, wire)
        budget = None if budget is None and wire == DEFAULT_WIRE else settings.rho
        with _model_file(model) as path:
            loaded = load_model(path, arch=arch, arch_args=arch_args, trust_pickle=trust_pickle,
                                input_shape=input_shape, stage=stage)
            if model == STDIO:
                loaded.description = loaded.description.replace(path, "stdin")
        disco = _split(loaded, nodes, node_weights, leaf_modules, input_on_all_nodes, submodule)
        tuned = None
        if data_dir is not None:
            tuned = _finetune(disco, loaded, data_dir, val_dir, settings, out_dir, **train)
            if _other_process():
                return  # under torchrun, process 0 alone reports and exports
        elif budget is not None:
            with stage(f"selecting exchanged channels for budget {settings.rho:g}, {wire} wire"):
                disco.set_budget(settings)
                if is_integer(settings.wire):
                    disco.calibrate_wire([loaded.example()])
        with stage("computing the cost"):
            report = disco.cost()
        click.echo(_summary(loaded, nodes, node_weights, None if budget is None else settings, report, submodule,
                            tuned), err=json_path == STDIO)  # stdout carries the JSON with --json -
        if out_dir is not None:
            _export(disco, out_dir, force, overlap, submodule,
                    _recorded(model, loaded, submodule, None if budget is None else settings, tuned, data_dir))
    except DiscoError as exc:
        raise cli_error(exc) from None
    if json_path is not None:
        write_json(json_path, report, {"model": loaded.description, "input_shape": list(loaded.shape),
                                       "nodes": nodes, "node_weights": node_weights, **settings.settings(),
                                       "budget": budget, "submodule": submodule})
        if json_path != STDIO:
            click.echo(f"cost report written to {json_path}", err=True)


if __name__ == "__main__":
    main(prog_name="disco-compile")
