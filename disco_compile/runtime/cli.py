"""`disco-run`: run an exported DISCO model.

With --simulate every node runs in this process (one thread each, messages
through the in-process transport, checked as between machines). Every user
error is one message on stderr and exit code 2.
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..bundle import load_bundle
from ..errors import DiscoError, InputMismatch
from .executor import DEFAULT_TIMEOUT, run_bundle


class CliError(click.ClickException):
    """A user error: printed as 'Error: <message>' on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2


def _load_input(path: Path) -> np.ndarray:
    if path.suffix != ".npy":
        raise CliError(f"--input {path}: give one .npy file per model input (numpy.save(path, array))")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"--input {path}: cannot be read as a .npy array ({exc})") from exc


def _save(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    try:
        if path.suffix == ".npy":
            np.save(path, arrays[0])
        else:
            np.savez(path, **dict(zip(names, arrays)))
    except OSError as exc:
        raise CliError(f"--output {path}: cannot be written ({exc})") from exc


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--simulate", is_flag=True,
              help="Run every node in this process, one thread each; messages are checked as between machines.")
@click.option("--input", "input_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.npy", help="One per model input, in the model's input order (numpy.save files).")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to save the outputs: FILE.npy for a model with one output; FILE.npz (arrays named "
                   "as the model outputs) for any number. Without it, the outputs' shapes are printed.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds a node waits for one message before every node stops with an error.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime threads per node.")
def main(out: Path, simulate: bool, input_files: tuple[Path, ...], output_file: Path | None, timeout: float,
         threads: int) -> None:
    """Run the exported DISCO model in directory OUT.

    \b
    Example: all nodes in this process, input from x.npy, output to y.npy:
      disco-run out/ --simulate --input x.npy --output y.npy

    Each --input file holds one model input, batch first; the other dimensions
    and the dtype must be those the model was exported with.
    """
    if not simulate:
        raise CliError("running the nodes on separate machines is not built yet; add --simulate to run every "
                       "node in this process")
    if output_file is not None and output_file.suffix not in (".npy", ".npz"):
        raise CliError(f"--output {output_file}: give a .npy file (one output) or a .npz file")
    try:
        bundle = load_bundle(out)
        names = [t.name for t in bundle.schedule.outputs]
        if output_file is not None and output_file.suffix == ".npy" and len(names) != 1:
            raise CliError(f"--output {output_file}: the model has {len(names)} outputs ({', '.join(names)}); "
                           f"give a .npz file to save them all")
        inputs = [_load_input(p) for p in input_files]
        outputs = run_bundle(bundle, inputs, timeout=timeout, threads=threads)
    except InputMismatch as exc:
        raise CliError(f"{exc} (give one --input FILE.npy per model input, in order)") from exc
    except DiscoError as exc:
        raise CliError(str(exc)) from exc
    if output_file is not None:
        _save(output_file, names, outputs)
        click.echo(f"wrote {len(outputs)} output(s) to {output_file}")
    else:
        for name, value in zip(names, outputs):
            click.echo(f"{name}: {value.dtype.name} {'x'.join(str(d) for d in value.shape)}")
        click.echo("(give --output FILE to save them)")


if __name__ == "__main__":
    main()
