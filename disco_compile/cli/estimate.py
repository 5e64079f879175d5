"""`disco-run estimate OUT --link RATE`: the latency an export's schedule allows at link rates, from its stages
timed on this machine (runtime/estimate.py), beside the same work on one node alone.

One node alone: the export holds the split model only (one graph per node and stage, no single-model graph), so
the single-device figure is every node's stages run one after another on this machine with no messages. That is
the work of the split model, which equals the original model's at budget 1 (every exchanged channel sent) and
leaves out the dropped channels' work below it; it also counts each stage's kernel overheads, which a
single-model graph would not have. The speedup column is that figure over the split's latency at each link.

Errors are one message on stderr: exit code 2 for bad files and options, 1 for a run that failed.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import DiscoError, InputMismatch
from .common import CONTEXT, CliError, Command
from .run import _fail, _load_inputs, check_threads, provider_option, use_provider

if TYPE_CHECKING:
    import numpy as np

DEFAULT_LINKS = ("none", "1gbit", "100mbit")


def _inputs(input_files: tuple[Path, ...], schedule) -> list[np.ndarray]:
    """The --input files, or one sample of random normal values per (floating point) model input."""
    import numpy as np

    if input_files:
        return _load_inputs(input_files, schedule)[0]
    odd = [t.name for t in schedule.inputs if not t.dtype.startswith("float")]
    if odd:
        raise CliError(f"the model's inputs {', '.join(odd)} are not floating point: random values may "
                       f"not be valid for them; give --input FILE.npy per model input")
    rng = np.random.default_rng(0)
    return [rng.standard_normal([1, *t.shape[1:]]).astype(t.dtype) for t in schedule.inputs]


@click.command(name="estimate", cls=Command, context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--link", "links", multiple=True, metavar="RATE",
              help="A link rate to estimate at, in bits per second (100mbit, 1gbit, 2.5gbit) or none (no limit); "
                   f"repeat for several. Default: {', '.join(DEFAULT_LINKS)}.")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="One-way delay per message besides its time on the wire, milliseconds.")
@click.option("--input", "input_files", multiple=True, type=click.Path(path_type=Path), metavar="FILE.npy|FOLDER",
              help="Model inputs to time the stages on (as for disco-run); default: one sample of random normal "
                   "values per float input.")
@click.option("--reps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs of every stage; the median counts.")
@click.option("--threads", type=int, default=1, show_default=True, callback=check_threads,
              help="onnxruntime threads per node (at most this machine's cores).")
@provider_option
def estimate(out: Path, links: tuple[str, ...], latency_ms: float, input_files: tuple[Path, ...], reps: int,
             threads: int, provider: str) -> None:
    """Estimate how fast export OUT runs at link rates, from its stages timed on this machine.

    \b
    Example: disco-run estimate out/ --link 1gbit --link 100mbit

    Every stage is timed on this machine (--threads onnxruntime threads per
    node, the median of --reps runs, on the inputs it gets in a real run); then
    the schedule is laid out in time at each link: each node runs its stages in
    order, each waiting for the messages it reads; each direction carries one
    message at a time at the rate (with Ethernet, IP and TCP headers), plus
    --latency-ms per message. Beside it: every stage run on one node alone (the
    export has no single-model graph; at a budget below 1 this is less work
    than the original model). Not counted: the runtime's own cost (Python,
    ZeroMQ, TCP work on the nodes' cores: 20-50 ms per request measured for
    ResNet-50 on 2 nodes with one core each, docs/latency.md) and any
    difference between these cores and the target's.
    """
    from ..artifact.bundle import load_bundle  # here, not at the top: disco-run's --help lists this command
    from ..runtime.estimate import estimate as lay_out, parse_rate, stage_times
    try:
        links = links or DEFAULT_LINKS
        rates = [parse_rate(t) for t in links]
    except ValueError as exc:
        raise CliError(f"--link: {exc}") from exc
    use_provider(provider)
    try:
        bundle = load_bundle(out)
        schedule = bundle.schedule
        inputs = _inputs(input_files, schedule)
        batch = int(inputs[0].shape[0])
        click.echo(f"timing the stages ({reps + 1} passes) ...", err=True)
        seconds = stage_times(bundle, inputs, reps=reps, threads=threads)
        results = lay_out(schedule, seconds, rates, latency=latency_ms / 1e3, batch=batch)
    except InputMismatch as exc:
        raise CliError(f"{exc} (give one --input FILE.npy per model input, in order)") from exc
    except DiscoError as exc:
        raise _fail(exc) from exc
    _print(out, schedule, results, links, seconds, threads, reps, batch)


def _print(out: Path, schedule, results, links, seconds: list[list[float]], threads: int, reps: int,
           batch: int) -> None:
    mb = ", ".join(f"{i}->{j} {b / 1e6:.2f} MB" for (i, j), b in sorted(results[0].direction_bytes.items()))
    one = sum(sum(node) for node in seconds)
    click.echo(f"{out}: {schedule.nodes} nodes, batch {batch}; stages timed here ({threads} onnxruntime "
               f"thread(s), median of {reps}):")
    click.echo("  " + "; ".join(f"node {k}: {len(p)} stages, {c * 1e3:.1f} ms"
                                for k, (p, c) in enumerate(zip(schedule.programs, results[0].compute, strict=True))))
    click.echo(f"  one node alone, every node's stages in turn, no messages: {one * 1e3:.1f} ms "
               f"(the split model's work; no single-model graph is exported)")
    click.echo(f"  messages per inference: {mb or 'none'}")
    click.echo(f"{'link':>10} {'latency ms':>11} {'bound ms':>9} {'latency/bound':>14} {'vs one node':>12}  "
               f"waiting per node ms")
    for text, r in zip(links, results, strict=True):
        waits = ", ".join(f"{w * 1e3:.1f}" for w in r.waiting)
        click.echo(f"{text:>10} {r.latency * 1e3:>11.1f} {r.bound * 1e3:>9.1f} {r.latency / r.bound:>14.2f} "
                   f"{one / r.latency:>11.2f}x  {waits}")
    click.echo("bound: max(busiest node's compute, busiest direction's bytes / rate); vs one node: one node "
               "alone / the split's latency. Not counted: the runtime's own cost per request and the target's "
               "core speed (see --help).")
