"""`disco-run`: run an exported DISCO model.

    disco-run OUT --simulate ...            every node in this process (threads, in-process transport)
    disco-run OUT --simulate --procs ...    every node as an OS process on 127.0.0.1, over TCP
    disco-run OUT --node K --peers P ...    node K of a run across machines (ZeroMQ over TCP)
    disco-run OUT --simulate --benchmark K  also K timed requests: latency median and p90, throughput
    disco-run keygen DIR --nodes N          CURVE keys for the nodes (keygen.py)
    disco-run estimate OUT --link 1gbit     the latency OUT's schedule allows at a link rate (estimate.py)
    disco-run info OUT                      the settings and per-layer split of an export (info.py)

`main` is a click group whose subcommands are imported when named, and the run command imports the runtime
(numpy, onnxruntime, jsonschema) only once it runs, so `--help`, `--version` and shell completion load click
alone; any other first argument runs an export (the `run` command), so `disco-run OUT ...` reads as before. SIGINT
and SIGTERM end any of them with one line and status 130 or 143 (common.py).

User errors (bad files, options, peers, keys) are one message on stderr and exit
code 2; a run that fails (a peer lost, a message or handshake refused, a stage
failing) is one message naming the node and exit code 1.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import BundleError, DataError, DiscoError, InputMismatch, NodeFailure
from . import benchmark
from .common import CONTEXT, STDIO, CliError, Command, Group, RunError, log_level_option, positive_finite
from .common import setup_logging

if TYPE_CHECKING:
    import numpy as np

STREAM = Path(STDIO)
# The runtime's defaults (executor.DEFAULT_TIMEOUT, zmq_transport.DEFAULT_CONNECT_TIMEOUT), written out here: the
# runtime loads numpy and onnxruntime, which --help and completion must not wait for. A test keeps them equal.
TIMEOUT = 10.0
CONNECT_TIMEOUT = 60.0


def _load_inputs(paths: tuple[Path, ...], schedule) -> tuple[list[np.ndarray], list[Path] | None]:
    """The model inputs from --input paths, and the image files in batch order when the input is a folder."""
    loaded = [_load_input(p, schedule) for p in paths]
    return [a for a, _ in loaded], (loaded[0][1] if len(loaded) == 1 else None)


def _load_input(path: Path, schedule) -> tuple[np.ndarray, list[Path] | None]:
    """One model input from a .npy file, or from a folder of images (images.py) for a model whose one input
    is a float32 image batch (batch, 3, H, W); with the image files, in batch order, for a folder."""
    from ..runtime import images
    from ..runtime.stream import load_npy
    if path.is_dir():
        spec = schedule.inputs[0]
        if len(schedule.inputs) != 1 or spec.dtype != "float32" or len(spec.shape) != 4 or spec.shape[1] != 3:
            takes = ", ".join(f"{t.name} {t.dtype} ({', '.join(map(str, t.shape))})" for t in schedule.inputs)
            raise CliError(f"--input {path}: a folder of images is for models with one float32 input (batch, 3, H, "
                           f"W); this one takes {takes}: give .npy files")
        try:
            files, batch = images.read_folder(path, (int(spec.shape[2]), int(spec.shape[3])))
        except DataError as exc:
            raise CliError(f"--input {path}: {exc}") from exc
        click.echo(f"read {len(files)} image(s) from {path} (in name order), resized and centre-cropped to "
                   f"{spec.shape[2]}x{spec.shape[3]}, ImageNet normalisation", err=True)
        return batch, files
    if path.suffix != ".npy":
        raise CliError(f"--input {path}: give a .npy file per model input (numpy.save(path, array)), a folder of "
                       f"images, or - for a stream of .npy arrays on stdin")
    try:
        return load_npy(path), None
    except InputMismatch as exc:
        raise CliError(str(exc)) from exc


def _check_stream(input_files: tuple[Path, ...], output_file: Path | None, schedule) -> bool:
    """Whether the inputs are a stream (--input -); refuses a stream mixed with files, or for several inputs."""
    if STREAM not in input_files:
        if output_file == STREAM:
            raise CliError("--output - (a stream on stdout) goes with --input - (a stream on stdin)")
        return False
    if len(input_files) != 1:
        raise CliError("--input - (a stream of .npy arrays on stdin) replaces the other --input files: give it alone")
    if len(schedule.inputs) != 1:
        raise CliError(f"--input -: a stream carries one array per request, and this model takes "
                       f"{len(schedule.inputs)} inputs; give one --input FILE.npy per input")
    return True


def _run_stream(submit, depth: int, names: list[str], output_file: Path | None) -> None:
    """Run every array on stdin as a request (up to `depth` in flight); each request's outputs go to stdout
    as they come (--output -), or are concatenated into --output FILE."""
    from ..runtime.stream import pipelined, read_arrays, write_arrays
    out = sys.stdout.buffer if output_file == STREAM else None
    collected, count = [], 0
    try:
        for outputs in pipelined(submit, ([a] for a in read_arrays(sys.stdin.buffer)), depth):
            count += 1
            if out is not None:
                write_arrays(out, outputs)
            else:
                collected.append(outputs)
    except InputMismatch as exc:
        raise CliError(f"request {count + 1} of the stream: {exc}") from exc
    click.echo(f"ran {count} request(s) from the stream", err=True)
    if out is None:
        if not collected:
            raise CliError("--input -: the stream on stdin held no arrays")
        _report(output_file, names, _joined(collected))


def _joined(requests: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The outputs of several requests as one batch: each output concatenated over the requests, in order."""
    import numpy as np
    return [np.concatenate(parts) for parts in zip(*requests, strict=True)]


def _save(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    """Write the outputs whole or not at all (an earlier file stays as it was if writing fails)."""
    import numpy as np

    from ..artifact.atomic import write_atomic
    try:
        if path.suffix == ".npy":
            write_atomic(path, lambda f: np.save(f, arrays[0]))
        else:
            write_atomic(path, lambda f: np.savez(f, **dict(zip(names, arrays, strict=True))))
    except OSError as exc:
        raise CliError(f"--output {path}: cannot be written ({exc})") from exc


def _fail(exc: DiscoError) -> click.ClickException:
    from ..runtime.net.peers import NetworkConfigError
    if isinstance(exc, (BundleError, NetworkConfigError)):
        return CliError(str(exc))
    if isinstance(exc, InputMismatch):
        return CliError(f"{exc} (give one --input FILE.npy per model input, in order)")
    return RunError(str(exc))


def check_threads(ctx, param, value: int) -> int:
    """A click callback: onnxruntime threads per node, from 1 to this machine's cores."""
    cores = os.cpu_count() or 1
    if not 1 <= value <= cores:
        raise click.BadParameter(f"must be between 1 and {cores} (this machine's cores: more threads than cores "
                                 f"only slow onnxruntime down), got {value}")
    return value


def provider_option(f):
    return click.option("--provider", default="cpu", show_default=True, metavar="NAME[,NAME...]",
                        help="onnxruntime execution providers for the stage graphs, in order of preference: cpu, "
                             "cuda, tensorrt, openvino, ... (as this onnxruntime build offers them; CPU stays "
                             "last, for the ops the others do not take).")(f)


def use_provider(text: str) -> list[str]:
    """--provider: every stage session of this process on those execution providers (executor.use_providers)."""
    from ..runtime.executor import use_providers
    try:
        return use_providers([name.strip() for name in text.split(",") if name.strip()])
    except DiscoError as exc:
        raise CliError(f"--provider {text}: {exc}") from exc


@click.command(name="run", cls=Command, context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--simulate", is_flag=True,
              help="Run every node on this machine: in this process, one thread each (messages checked as between "
                   "machines), or with --procs one OS process each, over TCP on 127.0.0.1.")
@click.option("--procs", is_flag=True, help="With --simulate: one OS process per node, over TCP on 127.0.0.1 "
                                            "(free ports; fresh CURVE keys unless --insecure).")
@click.option("--node", "node", type=click.IntRange(min=0), default=None, metavar="K",
              help="Run node K of a run across machines (needs --peers, and --keys or --insecure).")
@click.option("--peers", "peers_file", type=click.Path(dir_okay=False, path_type=Path), metavar="PEERS.yaml",
              help="Every node's address: one line 'K: HOST:PORT' per node, the same file on every machine.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="CURVE keys from 'disco-run keygen': DIR/nodeK.key_secret and DIR/public_keys/ (every node's "
                   "public key; only those may connect).")
@click.option("--insecure", is_flag=True, help="Run over the network without keys: no authentication, no "
                                               "encryption. Needed explicitly when there are no --keys.")
@click.option("--bind", metavar="HOST:PORT", help="Listen here instead of at this node's address in --peers.")
@click.option("--stay", is_flag=True, help="Nodes 1..N-1: keep serving after a failure (once the peers are back) "
                                           "and after node 0 leaves; stop with SIGTERM.")
@click.option("--input", "input_files", multiple=True, type=click.Path(path_type=Path, allow_dash=True),
              metavar="FILE.npy|FOLDER|-",
              help="One per model input, in the model's input order (numpy.save files); a folder of images for a "
                   "model with one image input (resized and centre-cropped to the exported size, ImageNet "
                   "normalisation; in name order); or - : a stream of .npy arrays on stdin, each one request, "
                   "run as they come. On node 0; on every node for an export compiled with "
                   "--input-on-all-nodes (each device's own input, its i-th request taken by node 0's i-th).")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
              metavar="FILE|-",
              help="Where to save the outputs: FILE.npy for a model with one output; FILE.npz (arrays named "
                   "as the model outputs) for any number; with --input -, also - : each request's outputs "
                   "to stdout as .npy arrays, as they come. Without it, the outputs' shapes are printed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Node 0: split the inputs into requests of this many samples, all in flight together (a node "
                   "with its own --input splits them alike).")
@click.option("--timeout", type=float, callback=positive_finite, default=TIMEOUT, show_default=True,
              help="Seconds a node waits for one message, and seconds of silence after which a peer is lost; then "
                   "every node stops with an error.")
@click.option("--connect-timeout", type=float, callback=positive_finite, default=CONNECT_TIMEOUT,
              show_default=True,
              help="Seconds a node waits at start for every peer to answer the handshake.")
@click.option("--threads", type=int, default=1, show_default=True, callback=check_threads,
              help="onnxruntime threads per node (at most this machine's cores).")
@provider_option
@click.option("--benchmark", "requests", type=click.IntRange(min=1), default=None, metavar="K",
              help=f"With --simulate (threads) or --node 0: after {benchmark.WARMUP} untimed requests, run the "
                   f"inputs K times, one request at a time, and print the latency median and p90 and the "
                   f"throughput.")
@log_level_option
def run(out: Path, simulate: bool, procs: bool, node: int | None, peers_file: Path | None, keys_dir: Path | None,
        insecure: bool, bind: str | None, stay: bool, input_files: tuple[Path, ...], output_file: Path | None,
        batch_size: int | None, timeout: float, connect_timeout: float, threads: int, provider: str,
        requests: int | None, log_level: str) -> None:
    """Run the exported DISCO model in directory OUT.

    \b
    Example: all nodes in this process, input from x.npy, output to y.npy:
      disco-run out/ --simulate --input x.npy --output y.npy
    All nodes as processes on this machine, over TCP with fresh keys:
      disco-run out/ --simulate --procs --input x.npy --output y.npy
    Across machines (the same OUT, peers.yaml and keys folder on each):
      disco-run keygen keys/ --nodes 2
      disco-run out/ --node 1 --peers peers.yaml --keys keys/
      disco-run out/ --node 0 --peers peers.yaml --keys keys/ --input x.npy --output y.npy
    Before deploying, the latency the split allows at a link rate
    (disco-run estimate --help):
      disco-run estimate out/ --link 1gbit
    Latency and throughput of 100 requests:
      disco-run out/ --simulate --input x.npy --benchmark 100

    Each --input file holds one model input, batch first; the other dimensions
    and the dtype must be those the model was exported with. A folder of
    images is one batch for an image model; - reads requests from stdin, each
    one numpy.save record, and --output - writes their outputs as records:

    \b
      disco-run out/ --node 0 --peers peers.yaml --keys keys/ --input photos/ --output y.npy
      camera | disco-run out/ --node 0 --peers peers.yaml --keys keys/ --input - --output - | consumer

    A peers.yaml has one line per node: '0: 10.0.0.1:5550'.
    """
    run = _RunOptions(out=out, simulate=simulate, procs=procs, node=node, peers_file=peers_file, keys_dir=keys_dir,
                      insecure=insecure, bind=bind, stay=stay, input_files=input_files, output_file=output_file,
                      batch_size=batch_size, timeout=timeout, connect_timeout=connect_timeout, threads=threads,
                      provider=provider, requests=requests, log_level=log_level)
    _check_mode(run)
    if run.provider != "cpu":
        use_provider(run.provider)
    if simulate:
        _check_simulate(run)
        _simulate(run)
    else:
        _check_node(run)
        _run_node(run)


@dataclass(frozen=True)
class _RunOptions:
    """The options of `disco-run OUT ...` (see `main`)."""
    out: Path
    simulate: bool
    procs: bool
    node: int | None
    peers_file: Path | None
    keys_dir: Path | None
    insecure: bool
    bind: str | None
    stay: bool
    input_files: tuple[Path, ...]
    output_file: Path | None
    batch_size: int | None
    timeout: float
    connect_timeout: float
    threads: int
    provider: str = "cpu"
    requests: int | None = None  # --benchmark K
    log_level: str = "info"


def _check_mode(run: _RunOptions) -> None:
    """Refuse --output of another kind, and options that do not choose one mode: --simulate or --node K."""
    output_file = run.output_file
    if output_file is not None and output_file != STREAM and output_file.suffix not in (".npy", ".npz"):
        raise CliError(f"--output {output_file}: give a .npy file (one output), a .npz file, or - (with --input -)")
    if run.simulate and run.node is not None:
        raise CliError("give --simulate (every node on this machine) or --node K (one node), not both")
    if run.procs and not run.simulate:
        raise CliError("--procs goes with --simulate")
    if not run.simulate and run.node is None:
        raise CliError("give --simulate to run every node on this machine, or --node K --peers PEERS.yaml to run "
                       "node K of a run across machines")
    if run.keys_dir is not None and run.insecure:
        raise CliError("give --keys DIR or --insecure, not both")
    if run.requests is not None and (run.procs or run.node not in (None, 0) or STREAM in run.input_files):
        raise CliError("--benchmark K times requests of the --input files: with --simulate (threads) or --node 0, "
                       "not with --procs, a stream (--input -) or a worker node")
    if run.procs and run.provider != "cpu":
        raise CliError("--provider: --simulate --procs runs its nodes on the CPU provider; give --provider to each "
                       "--node K process instead, or use --simulate alone")


def _check_simulate(run: _RunOptions) -> None:
    """Refuse the options of runs over the network (but --insecure with --procs) and --batch-size."""
    network = {"--peers": run.peers_file, "--keys": run.keys_dir, "--insecure": run.insecure or None,
               "--bind": run.bind, "--stay": run.stay or None}
    given = [name for name, v in network.items() if v is not None and not (run.procs and name in ("--insecure",))]
    if given:
        raise CliError(f"{', '.join(given)}: only for runs over the network (--node K)"
                       + ("" if run.procs else "; --simulate --procs takes --insecure"))
    if run.batch_size is not None:
        raise CliError("--batch-size: only with --node 0")


def _check_node(run: _RunOptions) -> None:
    """Refuse --node K without a peers file or keys, and the options of the other nodes."""
    node = run.node
    if run.peers_file is None:
        raise CliError(f"--node {node}: give --peers PEERS.yaml (one line 'K: HOST:PORT' per node)")
    if run.keys_dir is None and not run.insecure:
        raise CliError("give --keys DIR (made with 'disco-run keygen DIR --nodes N') or, to run without "
                       "authentication and encryption, --insecure")
    if node == 0 and not run.input_files:
        raise CliError("--node 0 takes the model inputs: give --input FILE.npy (one per model input), a folder "
                       "of images, or - (a stream of .npy arrays on stdin)")
    if node != 0 and run.output_file:
        raise CliError(f"--output is for node 0 (it gathers the outputs); node {node} has none")
    if node != 0 and run.batch_size and not run.input_files:
        raise CliError(f"--batch-size goes with --input: node {node} splits its own inputs (an export with the "
                       f"input on all nodes) as node 0 does")
    if node == 0 and run.stay:
        raise CliError("--stay is for nodes 1..N-1 (node 0 runs its inputs and ends)")


def _run_node(run: _RunOptions) -> None:
    """--node K: node 0 runs the inputs (`_node0`), the others serve (`_serve`), logging at --log-level;
    SIGINT or SIGTERM stops either (telling the peers), as every command (common.CleanSignals)."""
    setup_logging(run.log_level)
    try:
        if run.node == 0:
            _node0(run)
        else:
            _serve(run)
    except DiscoError as exc:
        raise _fail(exc) from exc


def _check_output_file(output_file: Path | None, names: list[str]) -> None:
    if output_file is not None and output_file.suffix == ".npy" and len(names) != 1:
        raise CliError(f"--output {output_file}: the model has {len(names)} outputs ({', '.join(names)}); "
                       f"give a .npz file to save them all")


def _report(output_file: Path | None, names: list[str], outputs: list[np.ndarray],
            files: list[Path] | None = None) -> None:
    """Save or describe the outputs; for a folder of images and a model with one (batch, classes) output, also
    each image's top-1 class."""
    if files is not None and len(outputs) == 1 and outputs[0].ndim == 2 and len(outputs[0]) == len(files):
        for f, row in zip(files, outputs[0], strict=True):
            click.echo(f"{f.name}: top-1 class {int(row.argmax())} ({names[0]} {float(row.max()):.4g})")
    if output_file is not None:
        _save(output_file, names, outputs)
        click.echo(f"wrote {len(outputs)} output(s) to {output_file}")
    else:
        for name, value in zip(names, outputs, strict=True):
            click.echo(f"{name}: {value.dtype.name} {'x'.join(str(d) for d in value.shape)}")
        click.echo("(give --output FILE to save them)")


def _simulate(run: _RunOptions) -> None:
    """--simulate: every node on this machine, as threads of this process or (--procs) as processes."""
    from ..artifact.bundle import load_bundle
    from ..runtime.executor import local_runner, run_bundle
    try:
        bundle = load_bundle(run.out)
        names = [t.name for t in bundle.schedule.outputs]
        _check_output_file(run.output_file, names)
        if _check_stream(run.input_files, run.output_file, bundle.schedule):
            if run.procs:
                raise CliError("--input - (a stream) runs with --simulate or --node 0, not --simulate --procs")
            _simulate_stream(run, bundle, names)
            return
        inputs, files = _load_inputs(run.input_files, bundle.schedule)
        if run.procs:
            outputs = _procs(run, bundle, names, inputs)
        elif run.requests is not None:
            outputs = _benchmarked(local_runner(bundle, timeout=run.timeout, threads=run.threads), inputs,
                                   run.requests)
        else:
            outputs = run_bundle(bundle, inputs, timeout=run.timeout, threads=run.threads)
    except InputMismatch as exc:
        raise CliError(f"{exc} (give one --input FILE.npy per model input, in order)") from exc
    except DiscoError as exc:
        # a node that failed while running is a failed run (exit 1), as with --procs
        raise (_fail(exc) if run.procs or isinstance(exc, NodeFailure) else CliError(str(exc))) from exc
    _report(run.output_file, names, outputs, files)


def _simulate_stream(run: _RunOptions, bundle, names: list[str]) -> None:
    """--simulate --input -: every array on stdin a request, run in this process, one after another."""
    from ..runtime.executor import run_bundle

    def submit(inputs) -> Future:
        done = Future()
        done.set_result(run_bundle(bundle, inputs, timeout=run.timeout, threads=run.threads))
        return done
    _run_stream(submit, 1, names, run.output_file)


def _procs(run: _RunOptions, bundle, names: list[str], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """--simulate --procs: every node as an OS process over TCP on 127.0.0.1; the outputs in `names` order."""
    from ..runtime.executor import check_inputs
    from ..runtime.net.network import run_processes
    check_inputs(bundle.schedule, inputs)  # refuse bad inputs before starting anything
    by_name = run_processes(bundle, run.input_files, insecure=run.insecure, timeout=run.timeout,
                            connect_timeout=run.connect_timeout, threads=run.threads)
    return [by_name[n] for n in names]


def _node0(run: _RunOptions) -> None:
    """--node 0: run the inputs (files, a folder of images, or a stream on stdin) as node 0 of the network."""
    from ..artifact.bundle import load_bundle
    from ..runtime.executor import check_inputs
    from ..runtime.net.network import DiscoClient
    bundle = load_bundle(run.out)
    names = [t.name for t in bundle.schedule.outputs]
    _check_output_file(run.output_file, names)
    stream = _check_stream(run.input_files, run.output_file, bundle.schedule)
    if stream and run.batch_size is not None:
        raise CliError("--batch-size: a stream's arrays are requests already (--input -); leave it out")
    inputs, files = ([], None) if stream else _load_inputs(run.input_files, bundle.schedule)
    if not stream:
        check_inputs(bundle.schedule, inputs)
    with DiscoClient(bundle, run.peers_file, keys=run.keys_dir, insecure=run.insecure, timeout=run.timeout,
                     connect_timeout=run.connect_timeout, threads=run.threads, bind=run.bind) as client:
        if stream:
            _run_stream(client.submit, client.max_in_flight, names, run.output_file)
            return
        if run.requests is not None:
            outputs = _benchmarked(lambda x: _batched(client, x, run.batch_size), inputs, run.requests)
        else:
            outputs = _batched(client, inputs, run.batch_size)
    _report(run.output_file, names, outputs, files)


def _benchmarked(call, inputs: list[np.ndarray], requests: int) -> list[np.ndarray]:
    """--benchmark K: the outputs of one run of `call(inputs)`, then K timed runs after warm-up (benchmark.py)."""
    outputs = call(inputs)
    seconds = benchmark.measure(lambda: call(inputs), requests)
    click.echo(benchmark.summary(seconds, int(inputs[0].shape[0])))
    return outputs


def _batched(client, inputs: list[np.ndarray], batch_size: int | None) -> list[np.ndarray]:
    """The outputs of `inputs`: one request, or (--batch-size) requests of that many samples, all in flight."""
    total = inputs[0].shape[0]
    if batch_size is None or batch_size >= total:
        return client(inputs)
    return _joined(client.map(_requests(inputs, batch_size)))


def _requests(inputs: list[np.ndarray], batch_size: int | None) -> list[list[np.ndarray]]:
    """`inputs` as requests: one, or (--batch-size) of that many samples each, in order."""
    total = inputs[0].shape[0]
    step = total if batch_size is None else batch_size
    return [[a[i:i + step] for a in inputs] for i in range(0, total, step)]


def _serve(run: _RunOptions) -> None:
    """--node K, K > 0: serve node 0's requests until it says goodbye (or, with --stay, until SIGTERM). With
    --input (an export with the input on all nodes), request i takes the i-th request of this node's own inputs
    (split by --batch-size as node 0 splits its own), cycling, so that repeated runs (--benchmark) line up."""
    from ..runtime.net.network import serve
    own: list[list[np.ndarray]] = []
    if run.input_files:
        from ..artifact.bundle import load_bundle
        if STREAM in run.input_files:
            raise CliError(f"--input -: node {run.node} reads its own inputs from files, not a stream")
        own = _requests(_load_inputs(run.input_files, load_bundle(run.out).schedule)[0], run.batch_size)

    def feed(i: int) -> list[np.ndarray]:
        return own[i % len(own)]
    served = serve(run.out, run.node, run.peers_file, keys=run.keys_dir, insecure=run.insecure, timeout=run.timeout,
                   connect_timeout=run.connect_timeout, threads=run.threads, stay=run.stay, bind=run.bind,
                   inputs=feed if own else None)
    click.echo(f"node {run.node}: served {served} request(s)")


@click.group(cls=Group, context_settings=CONTEXT, subcommand_metavar="OUT [OPTIONS] | COMMAND [ARGS]...",
             lazy={"keygen": "keygen:keygen", "estimate": "estimate:estimate", "info": "info:info"}, default="run")
@click.version_option(package_name="disco-compile", prog_name="disco-run")
def main() -> None:
    """Run an exported DISCO model, or prepare and inspect one (the commands below).

    \b
    disco-run OUT ...             run the export in folder OUT (disco-run run --help)
    disco-run keygen DIR ...      CURVE keys for a run across machines
    disco-run estimate OUT ...    its latency at link rates, from stages timed here
    disco-run info OUT            the settings and the per-layer split of OUT

    \b
    Example: disco-run out/ --simulate --input x.npy --output y.npy
    """


main.add_command(run)


if __name__ == "__main__":
    main(prog_name="disco-run")
