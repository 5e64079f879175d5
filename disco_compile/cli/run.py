"""`disco-run`: run an exported DISCO model.

    disco-run OUT --simulate ...            every node in this process (threads, in-process transport)
    disco-run OUT --simulate --procs ...    every node as an OS process on 127.0.0.1, over TCP
    disco-run OUT --node K --peers P ...    node K of a run across machines (ZeroMQ over TCP)
    disco-run keygen DIR --nodes N          CURVE keys for the nodes
    disco-run estimate OUT --link 1gbit     the latency OUT's schedule allows at a link rate

User errors (bad files, options, peers, keys) are one message on stderr and exit
code 2; a run that fails (a peer lost, a message or handshake refused, a stage
failing) is one message naming the node and exit code 1.
"""
from __future__ import annotations

import logging
import signal
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from ..runtime import images
from ..artifact.bundle import load_bundle
from ..errors import BundleError, DataError, DiscoError, InputMismatch
from ..runtime.executor import DEFAULT_TIMEOUT, run_bundle
from ..runtime.stream import pipelined, read_arrays, write_arrays


class CliError(click.ClickException):
    """A user error: printed as 'Error: <message>' on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2


class RunError(click.ClickException):
    """A run that failed (a peer, a message, a stage): 'Error: <message>' on stderr, exit code 1."""
    exit_code = 1


class _Terminated(BaseException):
    """SIGTERM: stop, telling the peers."""


STREAM = Path("-")


def _load_inputs(paths: tuple[Path, ...], schedule) -> tuple[list[np.ndarray], list[Path] | None]:
    """The model inputs from --input paths, and the image files in batch order when the input is a folder."""
    loaded = [_load_input(p, schedule) for p in paths]
    return [a for a, _ in loaded], (loaded[0][1] if len(loaded) == 1 else None)


def _load_input(path: Path, schedule) -> tuple[np.ndarray, list[Path] | None]:
    """One model input from a .npy file, or from a folder of images (images.py) for a model whose one input
    is a float32 image batch (batch, 3, H, W); with the image files, in batch order, for a folder."""
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
        return np.load(path, allow_pickle=False), None
    except (OSError, ValueError) as exc:
        raise CliError(f"--input {path}: cannot be read as a .npy array ({exc})") from exc


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
    return [np.concatenate(parts) for parts in zip(*requests, strict=True)]


def _save(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    try:
        if path.suffix == ".npy":
            np.save(path, arrays[0])
        else:
            np.savez(path, **dict(zip(names, arrays, strict=True)))
    except OSError as exc:
        raise CliError(f"--output {path}: cannot be written ({exc})") from exc


def _fail(exc: DiscoError) -> click.ClickException:
    from ..runtime.net.peers import NetworkConfigError
    if isinstance(exc, (BundleError, NetworkConfigError)):
        return CliError(str(exc))
    if isinstance(exc, InputMismatch):
        return CliError(f"{exc} (give one --input FILE.npy per model input, in order)")
    return RunError(str(exc))


class _DiscoRun(click.Command):
    """`disco-run OUT ...`, `disco-run keygen DIR ...` and `disco-run estimate OUT ...` (OUT cannot be named
    keygen or estimate: write ./keygen)."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["keygen"]:
            return keygen_main.main(args[1:], prog_name=f"{prog_name or 'disco-run'} keygen", **extra)
        if args[:1] == ["estimate"]:
            return estimate_main.main(args[1:], prog_name=f"{prog_name or 'disco-run'} estimate", **extra)
        return super().main(args, prog_name=prog_name, **extra)


@click.command(cls=_DiscoRun, context_settings={"help_option_names": ["-h", "--help"]})
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
                   "run as they come. On node 0 only.")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
              metavar="FILE|-",
              help="Where to save the outputs: FILE.npy for a model with one output; FILE.npz (arrays named "
                   "as the model outputs) for any number; with --input -, also - : each request's outputs "
                   "to stdout as .npy arrays, as they come. Without it, the outputs' shapes are printed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Node 0: split the inputs into requests of this many samples, all in flight together.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds a node waits for one message, and seconds of silence after which a peer is lost; then "
                   "every node stops with an error.")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds a node waits at start for every peer to answer the handshake.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime threads per node.")
def main(out: Path, simulate: bool, procs: bool, node: int | None, peers_file: Path | None, keys_dir: Path | None,
         insecure: bool, bind: str | None, stay: bool, input_files: tuple[Path, ...], output_file: Path | None,
         batch_size: int | None, timeout: float, connect_timeout: float, threads: int) -> None:
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
                      batch_size=batch_size, timeout=timeout, connect_timeout=connect_timeout, threads=threads)
    _check_mode(run)
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
    if node != 0 and (run.input_files or run.output_file or run.batch_size):
        raise CliError(f"--input, --output and --batch-size are for node 0; node {node} gets its inputs from node 0")
    if node == 0 and run.stay:
        raise CliError("--stay is for nodes 1..N-1 (node 0 runs its inputs and ends)")


def _run_node(run: _RunOptions) -> None:
    """--node K: node 0 runs the inputs (`_node0`), the others serve (`_serve`); SIGTERM stops either."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if run.node == 0:
            _node0(run)
        else:
            _serve(run)
    except DiscoError as exc:
        raise _fail(exc) from exc
    except _Terminated:
        click.echo(f"node {run.node}: stopped by SIGTERM", err=True)
        sys.exit(143)


def _on_sigterm(signum, frame):
    raise _Terminated()


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
        else:
            outputs = run_bundle(bundle, inputs, timeout=run.timeout, threads=run.threads)
    except InputMismatch as exc:
        raise CliError(f"{exc} (give one --input FILE.npy per model input, in order)") from exc
    except DiscoError as exc:
        raise (_fail(exc) if run.procs else CliError(str(exc))) from exc
    _report(run.output_file, names, outputs, files)


def _simulate_stream(run: _RunOptions, bundle, names: list[str]) -> None:
    """--simulate --input -: every array on stdin a request, run in this process, one after another."""
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
        outputs = _batched(client, inputs, run.batch_size)
    _report(run.output_file, names, outputs, files)


def _batched(client, inputs: list[np.ndarray], batch_size: int | None) -> list[np.ndarray]:
    """The outputs of `inputs`: one request, or (--batch-size) requests of that many samples, all in flight."""
    total = inputs[0].shape[0]
    if batch_size is None or batch_size >= total:
        return client(inputs)
    return _joined(client.map([[a[i:i + batch_size] for a in inputs] for i in range(0, total, batch_size)]))


def _serve(run: _RunOptions) -> None:
    """--node K, K > 0: serve node 0's requests until it says goodbye (or, with --stay, until SIGTERM)."""
    from ..runtime.net.network import serve
    served = serve(run.out, run.node, run.peers_file, keys=run.keys_dir, insecure=run.insecure, timeout=run.timeout,
                   connect_timeout=run.connect_timeout, threads=run.threads, stay=run.stay, bind=run.bind)
    click.echo(f"node {run.node}: served {served} request(s)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--nodes", type=click.IntRange(min=1), required=True, help="How many nodes the export has.")
@click.option("--force", is_flag=True, help="Replace keys already in DIRECTORY.")
def keygen_main(directory: Path, nodes: int, force: bool) -> None:
    """Make CURVE keys for NODES nodes in DIRECTORY.

    \b
    Writes DIRECTORY/nodeK.key and nodeK.key_secret for every node K, and
    DIRECTORY/public_keys/ with every node's public key. Give machine K
    the public_keys folder and its own nodeK.key_secret (keep that one
    secret: it is the node's identity), then run it with --keys DIRECTORY.
    A node accepts connections only from the keys in its public_keys folder.
    """
    from ..runtime.net.keys import keygen
    from ..runtime.net.peers import NetworkConfigError
    try:
        keygen(directory, nodes, force=force)
    except NetworkConfigError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"{directory}: cannot write the keys ({exc})") from exc
    click.echo(f"wrote key pairs for nodes 0..{nodes - 1} to {directory}, public keys in {directory}/public_keys; "
               f"give machine K the public_keys folder and nodeK.key_secret")


DEFAULT_LINKS = ("none", "1gbit", "100mbit")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime threads per node.")
def estimate_main(out: Path, links: tuple[str, ...], latency_ms: float, input_files: tuple[Path, ...], reps: int,
                  threads: int) -> None:
    """Estimate how fast export OUT runs at link rates, from its stages timed on this machine.

    \b
    Example: disco-run estimate out/ --link 1gbit --link 100mbit

    Every stage is timed on this machine (one onnxruntime thread per node,
    the median of --reps runs, on the inputs it gets in a real run); then the
    schedule is laid out in time at each link: each node runs its stages in
    order, each waiting for the messages it reads; each direction carries one
    message at a time at the rate (with Ethernet, IP and TCP headers), plus
    --latency-ms per message. Not counted: the runtime's own cost (Python,
    ZeroMQ, TCP work on the nodes' cores: 20-50 ms per request measured for
    ResNet-50 on 2 nodes with one core each, docs/latency.md) and any
    difference between these cores and the target's.
    """
    from tqdm import tqdm

    from ..runtime.estimate import estimate, parse_rate, stage_times
    try:
        links = links or DEFAULT_LINKS
        rates = [parse_rate(t) for t in links]
    except ValueError as exc:
        raise CliError(f"--link: {exc}") from exc
    try:
        bundle = load_bundle(out)
        schedule = bundle.schedule
        if input_files:
            inputs, _ = _load_inputs(input_files, schedule)
        else:
            odd = [t.name for t in schedule.inputs if not t.dtype.startswith("float")]
            if odd:
                raise CliError(f"the model's inputs {', '.join(odd)} are not floating point: random values may "
                               f"not be valid for them; give --input FILE.npy per model input")
            rng = np.random.default_rng(0)
            inputs = [rng.standard_normal([1, *t.shape[1:]]).astype(t.dtype) for t in schedule.inputs]
        batch = int(np.asarray(inputs[0]).shape[0])
        with tqdm(total=reps + 1, desc="timing stages", unit="pass", leave=False) as bar:
            seconds = stage_times(bundle, inputs, reps=reps, threads=threads,
                                  progress=lambda done, total: bar.update(done - bar.n))
        results = estimate(schedule, seconds, rates, latency=latency_ms / 1e3, batch=batch)
    except InputMismatch as exc:
        raise CliError(f"{exc} (give one --input FILE.npy per model input, in order)") from exc
    except DiscoError as exc:
        raise _fail(exc) from exc
    mb = ", ".join(f"{i}->{j} {b / 1e6:.2f} MB" for (i, j), b in sorted(results[0].direction_bytes.items()))
    click.echo(f"{out}: {schedule.nodes} nodes, batch {batch}; stages timed here ({threads} onnxruntime "
               f"thread(s), median of {reps}):")
    click.echo("  " + "; ".join(f"node {k}: {len(p)} stages, {c * 1e3:.1f} ms"
                                for k, (p, c) in enumerate(zip(schedule.programs, results[0].compute, strict=True))))
    click.echo(f"  messages per inference: {mb or 'none'}")
    click.echo(f"{'link':>10} {'latency ms':>11} {'bound ms':>9} {'latency/bound':>14}  waiting per node ms")
    for text, r in zip(links, results, strict=True):
        waits = ", ".join(f"{w * 1e3:.1f}" for w in r.waiting)
        click.echo(f"{text:>10} {r.latency * 1e3:>11.1f} {r.bound * 1e3:>9.1f} {r.latency / r.bound:>14.2f}  {waits}")
    click.echo("bound: max(busiest node's compute, busiest direction's bytes / rate). Not counted: the runtime's "
               "own cost per request and the target's core speed (see --help).")


if __name__ == "__main__":
    main()
