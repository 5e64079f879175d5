"""`disco-compile plan MODEL --link RATE`: which split to compile for a device and link, predicted before compiling.

The command line of budget/plan.py (`plan`, where the maths and what it leaves out are stated): it loads MODEL as
disco-compile does, exports every candidate (nodes x budgets x overlap) to a temporary folder, times the stages
and the whole model here, and prints each candidate at every wire precision asked for, fastest first, with the
disco-compile command line that makes the fastest. The defaults are the API's (budget/plan.py); the options it shares
with disco-compile are options.py's. It is `disco-compile plan` (cli/__init__.py); a model file named plan is
`./plan`.

Errors are one message on stderr and exit code 2 (a bad option, a model that does not load or split).
"""
from __future__ import annotations

import os
import shlex
import sys

import click

from ..budget.budget import DEFAULT_COMPUTE_WEIGHT
from ..errors import DiscoError
from .common import CONTEXT, STDIO, CliError, Command
from .options import check_json_path, cli_error, parse_arch, parse_shape, require_torch, stage, write_json

# the API's defaults (budget/plan.py NODES, BUDGETS, WIRES, OVERLAPS, LATENCY, REPS), written out here: that module
# imports torch, which --help must not wait for; tests/test_plan.py keeps them equal
NODES, BUDGETS, WIRES, LATENCY_MS, REPS = "2", "0.2,0.1,0.05", "fp32,int8", 0.1, 5
OVERLAP_CHOICES = {"both": (True, False), "yes": (True,), "no": (False,)}
# the planner's keywords (budget/plan.py check_candidates) as options
_OPTIONS = {"link": "--link", "nodes": "--nodes", "budgets": "--budgets", "wires": "--wire",
            "node_speed": "--node-speed", "compute_weight": "--compute-weight"}


def _listed(kind, example: str):
    """A click callback reading a comma-separated list of `kind` values."""
    def parse(ctx, param, value: str) -> tuple:
        try:
            return tuple(kind(v.strip()) for v in value.split(","))
        except ValueError:
            raise click.BadParameter(f"expected comma-separated values, e.g. {example}; got {value!r}") from None
    return parse


def _arch(ctx, param, value: str | None) -> str | None:
    """--arch as disco-compile parses it; the text as given is kept for the command line printed at the end."""
    ctx.meta["plan.arch"] = value
    return parse_arch(ctx, param, value)


@click.command(name="plan", cls=Command, context_settings=CONTEXT)
@click.argument("model", metavar="MODEL")
@click.option("--link", required=True, metavar="RATE",
              help="The link between the devices, in bits per second (100mbit, 1gbit, 2.5gbit) or none (no limit).")
@click.option("--nodes", default=NODES, show_default=True, callback=_listed(int, "2,3,4"), metavar="N,...",
              help="Node counts to try.")
@click.option("--budgets", default=BUDGETS, show_default=True, callback=_listed(float, "0.2,0.1,0.05"),
              metavar="RHO,...", help="Budgets to try (disco-compile --budget: the fraction of exchanged bytes kept).")
@click.option("--wire", "wires", default=WIRES, show_default=True, callback=_listed(str, "fp32,int8"),
              metavar="PRECISION,...",
              help="Wire precisions to try, of fp32, fp16, int8, int4 (disco-compile --wire): an estimate, the fp32 "
                   "export's exchange messages at 16, 8 or 4 bits a value (the quantisation kernels not timed).")
@click.option("--overlap", type=click.Choice(list(OVERLAP_CHOICES)), default="both", show_default=True,
              help="Try exports with overlap (disco-compile --overlap), without (--no-overlap), or both.")
@click.option("--node-speed", type=float, default=1.0, show_default=True, metavar="F",
              help="How many times slower a device's core is than this machine's (1: as fast; about 4.6: a "
                   "Raspberry Pi 4 class core); every time measured here is multiplied by F.")
@click.option("--compute-weight", type=click.FloatRange(min=0), default=None, metavar="W",
              help=f"The selection's compute weight, as disco-compile --compute-weight (default "
                   f"{DEFAULT_COMPUTE_WEIGHT:g}, disco-compile's).")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=LATENCY_MS, show_default=True,
              help="One-way delay per message besides its time on the wire, milliseconds.")
@click.option("--reps", type=click.IntRange(min=1), default=REPS, show_default=True,
              help="Timed passes over every export's stages and the whole model; the median counts.")
@click.option("--input-shape", callback=parse_shape, metavar="N,C,H,W",
              help="Shape of the random normal example input, batch first, as for disco-compile "
                   "(default 1,3,224,224).")
@click.option("--arch", callback=_arch, metavar="torchvision:NAME|timm:NAME",
              help="Architecture of a state_dict MODEL file, as for disco-compile.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a MODEL file that holds a pickled whole nn.Module (it runs code stored in the file).")
@click.option("--json", "json_path", callback=check_json_path, metavar="FILE|-",
              help="Also write the predictions to FILE as JSON; - writes them to stdout, the table to stderr.")
def plan(model: str, link: str, nodes: tuple[int, ...], budgets: tuple[float, ...], wires: tuple[str, ...],
         overlap: str, node_speed: float, compute_weight: float | None, latency_ms: float, reps: int,
         input_shape: tuple[int, ...] | None, arch: str | None, trust_pickle: bool, json_path: str | None) -> None:
    """Predict which split of MODEL runs fastest on devices joined by a link, before compiling it.

    For every candidate (node count, budget, overlap) MODEL is split and exported to a temporary folder
    with the one-shot selection disco-compile makes; every stage is timed on this machine with one
    onnxruntime thread, and so is the whole model (one ONNX graph) in the same passes. The times are
    multiplied by --node-speed and the schedule is laid out over the link (each node runs its stages in
    order, each waiting for its messages; one message at a time per direction, with TCP/IP headers and
    --latency-ms). Printed for each candidate and wire precision, fastest first: the predicted latency, the
    speedup against the whole model on ONE such node, and the bytes between the nodes per sample; then the
    disco-compile command line that makes the fastest.

    \b
    Examples:
      disco-compile plan resnet50 --link 100mbit --node-speed 4.6
      disco-compile plan resnet50 --link 1gbit --nodes 2,3,4 --budgets 0.2,0.1 --wire fp32,int8,int4
      disco-compile plan weights.pt --arch torchvision:resnet18 --link 100mbit --json plan.json

    Estimates, not measurements: a wire precision below fp32 is the fp32 export's exchange messages at 16, 8
    or 4 bits a value, and its float model input's at the input wire (8 bits for int4), as with
    disco-compile --wire (the outputs travel as computed; the quantisation kernels are not timed); the runtime's
    own cost per request is not counted (20-50 ms for ResNet-50 on 2 one-core nodes, docs/latency.md);
    --node-speed scales every stage alike. The times are this machine's as it is while they are measured:
    plan on an idle machine (a warning says when it was busy).
    """
    from ..budget.plan import check_candidates
    from ..errors import PlanError
    try:
        check_candidates(link, nodes, budgets, wires, OVERLAP_CHOICES[overlap], node_speed, compute_weight)
    except PlanError as exc:
        setting, _, what = str(exc).partition(": ")
        raise CliError(f"{_OPTIONS.get(setting, setting)}: {what}") from None
    require_torch()
    result, loaded = _plan(model, link, nodes, budgets, wires, overlap, node_speed, compute_weight, latency_ms,
                           reps, input_shape, arch, trust_pickle)
    command = _compile_line(model, input_shape, click.get_current_context().meta["plan.arch"], trust_pickle,
                            compute_weight, result.best)
    click.echo(_table(loaded, result, command), err=json_path == STDIO)  # stdout carries the JSON with --json -
    if json_path is not None:
        write_json(json_path, result, {"model": loaded.description, "input_shape": list(loaded.shape),
                                       "command": command})
        if json_path != STDIO:
            click.echo(f"predictions written to {json_path}", err=True)


def _plan(model: str, link: str, nodes, budgets, wires, overlap: str, node_speed: float,
          compute_weight: float | None, latency_ms: float, reps: int, input_shape, arch, trust_pickle: bool):
    """Load MODEL and run the planner with a progress bar on stderr; (the Plan, the LoadedModel)."""
    from tqdm import tqdm

    from ..budget.plan import plan as predict_all
    from ..frontend.load import load_model
    try:
        loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape, stage=stage)
        if loaded.detector:
            raise CliError(f"{model} is a detection model: the planner times whole models that take one input "
                           f"tensor; plan a classification or dense-prediction model")
        with tqdm(desc="planning", unit="step", file=sys.stderr) as bar:
            def progress(done: int, total: int, what: str) -> None:
                bar.total = total
                bar.set_description(what)
                bar.update(done - bar.n)
            result = predict_all(loaded.model, loaded.example(), link=link, nodes=nodes, budgets=budgets,
                                 wires=wires, overlaps=OVERLAP_CHOICES[overlap], node_speed=node_speed,
                                 latency=latency_ms / 1e3, reps=reps, compute_weight=compute_weight,
                                 progress=progress)
    except DiscoError as exc:
        raise cli_error(exc) from None
    return result, loaded


def _compile_line(model: str, input_shape, arch: str | None, trust_pickle: bool, compute_weight: float | None,
                  best) -> str:
    """The disco-compile command line that exports the candidate `best` (a Prediction); `arch`: --arch as given."""
    words = ["disco-compile", model]
    if input_shape is not None:
        words += ["--input-shape", ",".join(map(str, input_shape))]
    if arch is not None:
        words += ["--arch", arch]
    if trust_pickle:
        words.append("--trust-pickle")
    words += ["--nodes", str(best.nodes), "--budget", f"{best.budget:g}"]
    if not best.overlap:
        words.append("--no-overlap")
    if best.wire != "fp32":
        words += ["--wire", best.wire]
    if compute_weight is not None:
        words += ["--compute-weight", f"{compute_weight:g}"]
    return shlex.join([*words, "--out", "OUT"])


def _table(loaded, result, command: str) -> str:
    """The printed predictions (result: a Plan), fastest first, and the command line of the fastest."""
    speed = "as fast as this machine" if result.node_speed == 1 else f"{result.node_speed:g}x slower than this machine"
    lines = [f"model    {loaded.description}, input {'x'.join(map(str, loaded.shape))}",
             f"target   devices {speed}, link {result.link}, {result.latency * 1e3:g} ms per message",
             f"whole    the model on one such device: {result.whole * 1e3:.1f} ms "
             f"({result.whole_here * 1e3:.1f} ms here, one onnxruntime thread, median of {result.reps})"]
    if result.busy:
        lines.append(f"warning  this machine was busy while timing (load average {max(result.load):.1f} on "
                     f"{os.cpu_count()} cores): its times, and --node-speed's multiples of them, are slower than its "
                     f"cores; plan on an idle machine")
    lines += ["",
              f"{'nodes':>5} {'budget':>6} {'wire':>5} {'overlap':>7} {'latency ms':>10} {'speedup':>8} "
              f"{'exchange KB':>11} {'comm KB':>8} {'slowest node ms':>15}"]
    for p in result.predictions:
        lines.append(f"{p.nodes:>5} {p.budget:>6g} {p.wire:>5} {'yes' if p.overlap else 'no':>7} "
                     f"{p.latency * 1e3:>10.1f} {p.speedup:>7.2f}x {p.exchange_bytes / 1e3:>11.1f} "
                     f"{p.comm_bytes / 1e3:>8.1f} {max(p.compute) * 1e3:>15.1f}")
    best = result.best
    lines += ["",
              f"fastest: {best.nodes} nodes, budget {best.budget:g}, {best.wire} wire, "
              f"{'overlap' if best.overlap else 'no overlap'}: {best.latency * 1e3:.1f} ms, {best.speedup:.2f}x "
              f"the whole model on one device",
              f"compile it: {command}"]
    lines += ["speedup: the whole model on one device / the latency. Bytes per sample, the exchanges at the wire "
              "precision. Not counted: the runtime's own cost per request, quantisation kernels (plan --help)."]
    return "\n".join(lines)
