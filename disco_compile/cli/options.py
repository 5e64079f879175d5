"""What disco-compile and disco-compile plan share: the options both take (--input-shape, --arch, --json), a
library error in command-line terms, the install torch needs, progress lines and the JSON report.

Imports no torch (`--help` and completion of both commands stay fast): --arch and `require_torch` import it only
once an option is parsed or a command runs. Every user error is a CliError (one line on stderr, exit code 2) or,
in an option's callback, a click.BadParameter naming the option.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from ..artifact.atomic import write_atomic
from ..errors import DiscoError, ExampleInputError, TraceFailure
from . import COMPILE_EXTRA
from .common import STDIO, CliError

if TYPE_CHECKING:
    from ..budget.cost import CostReport
    from ..budget.plan import Plan

# what a library error's advice means on the command line
_CLI_HINTS = {TraceFailure: "on the command line, mark a submodule with --leaf-module NAME",
              ExampleInputError: "on the command line, give the input shape with --input-shape N,C,H,W"}


def cli_error(exc: DiscoError) -> CliError:
    """A library error as the command line shows it, with the advice in command-line terms."""
    hint = next((h for cls, h in _CLI_HINTS.items() if isinstance(exc, cls)), None)
    return CliError(str(exc) + (f"\n  {hint}" if hint else ""))


def require_torch() -> None:
    """ImportError of torch or torchvision as the install that brings them."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise CliError(f"disco-compile needs torch and torchvision ({exc}); the plain install of disco-compile is "
                       f"the device runtime (disco-run) without them: install the compiler with {COMPILE_EXTRA}"
                       ) from None


def parse_shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """--input-shape N,C,H,W: positive whole numbers, batch first."""
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


def parse_arch(ctx, param, value: str | None) -> str | None:
    """'torchvision:NAME' or 'timm:NAME' as load_model takes it (a torchvision name bare, timm:NAME)."""
    if value is None:
        return None
    source, _, name = value.partition(":")
    if source not in ("torchvision", "timm") or not name:
        raise click.BadParameter(f"expected torchvision:NAME or timm:NAME, e.g. torchvision:resnet50; got {value!r}")
    require_torch()
    from ..frontend.load import arch_name
    try:
        return arch_name(value, f"--arch {value}: {name!r}")
    except DiscoError as exc:
        raise cli_error(exc) from None


def check_json_path(ctx, param, value: str | None) -> str | None:
    """--json FILE|-: a file name in a folder that exists (written later, by `write_json`), or - for stdout."""
    if value is None or value == STDIO:
        return value
    if os.path.isdir(value):
        raise click.BadParameter(f"{value} is a folder; give a file name, e.g. {os.path.join(value, 'cost.json')}")
    parent = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(parent):
        raise click.BadParameter(f"the folder {parent} does not exist; create it first")
    return value


@contextmanager
def stage(what: str) -> Iterator[None]:
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


def write_json(path: str, report: CostReport | Plan, run: dict) -> None:
    """Write the report (and what produced it, `run`) so that `path` is either as before or complete:
    a temp file beside it, then a rename; - writes it to stdout."""
    text = json.dumps({"run": run, **report.as_dict()}, indent=2, allow_nan=False) + "\n"
    if path == STDIO:
        click.echo(text, nl=False)
        return
    try:
        write_atomic(os.path.abspath(path), lambda f: f.write(text.encode()))
    except OSError as exc:
        raise CliError(f"cannot write the JSON report to {path}: {exc.strerror or exc}") from None
