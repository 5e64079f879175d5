"""`disco-run info OUT`: the settings that made an export and its per-layer table (runtime/info.py), torch-free.

    disco-run info OUT                      settings, per-layer table, totals and io bytes
    disco-run info OUT --plot split.png     also bytes per layer and direction, MACs per node (needs matplotlib)
    disco-run info OUT --json -             the same as JSON on stdout (or --json FILE)

A device holding only its own nodeK/ (with manifest.json and schedule.json) can run it. Errors are one message on
stderr and exit code 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import DiscoError
from .common import CONTEXT, STDIO, CliError, Command


@click.command(name="info", cls=Command, context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Draw bytes sent per layer and direction and MACs per layer and node (needs matplotlib).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
              metavar="FILE|-", help="Write everything shown as JSON to FILE, or to stdout with - (then no text).")
def info(out: Path, plot_file: Path | None, json_file: Path | None) -> None:
    """Show what the export in OUT was made from and how it splits the model: the settings (model, nodes,
    budget, fine-tuning), then per layer of the original model the channels each node owns, the MACs each
    node computes and the bytes sent in each direction; totals and the input/output bytes.

    \b
    Example:
      disco-run info shards/ --plot shards.png
    """
    from ..artifact import info as report  # here, not at the top: disco-run's --help lists this command
    from ..artifact.bundle import load_bundle
    try:
        summary = report.summarize(load_bundle(out, graphs=False))
        if plot_file is not None:
            report.plot(summary, plot_file)
    except DiscoError as exc:
        raise CliError(str(exc)) from None
    if json_file == Path(STDIO):
        click.echo(json.dumps(summary.as_json(), indent=2))
        return
    click.echo(report.render(summary))
    if json_file is not None:
        try:
            json_file.write_text(json.dumps(summary.as_json(), indent=2) + "\n")
        except OSError as exc:
            raise CliError(f"--json {json_file}: cannot be written ({exc.strerror or exc})") from None
        click.echo(f"wrote {json_file}", err=True)
    if plot_file is not None:
        click.echo(f"wrote {plot_file}", err=True)


if __name__ == "__main__":
    info()
