"""What disco-compile and disco-run share: their error kinds, how they end on a signal, `-` for stdin/stdout,
logging, and the click Group of each (lazy subcommands and a default one). Imports no torch (`disco-compile
--help` stays fast, `disco-run` runs without it).

Signals: SIGINT (Ctrl-C) and SIGTERM end a command with one line on stderr, 'PROG: interrupted (SIGINT)', and
exit status 128 + the signal number (130, 143), as a shell reports a process killed by it; never click's
'Aborted!'. A step that must finish what it is doing first (a fine-tuning step, then its checkpoint) asks
with `deferred_signals`: inside it a signal is only recorded, and the step polls `Deferred.received`.
"""
from __future__ import annotations

import importlib
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

STDIO = "-"  # a file name meaning stdin or stdout
SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_LEVELS = ("debug", "info", "warning", "error")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CliError(click.ClickException):
    """A user error: printed as 'Error: <message>' on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2


class RunError(click.ClickException):
    """A run that failed (a peer, a message, a stage): 'Error: <message>' on stderr, exit code 1."""
    exit_code = 1


class Stopped(BaseException):
    """A signal ended the command (SIGINT or SIGTERM); `what` says where, when known."""

    def __init__(self, signum: int, what: str = ""):
        super().__init__(signum, what)
        self.signum, self.what = signum, what


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


@contextmanager
def _handlers(handler) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM meanwhile (main thread only: elsewhere Python refuses handlers)."""
    try:
        old = {s: signal.signal(s, handler) for s in SIGNALS}
    except ValueError:  # not the main thread (a command invoked from a worker thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Deferred:
    """The first SIGINT or SIGTERM received inside `deferred_signals` (None: none yet)."""

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            raise Stopped(signum, "a second signal while stopping")
        self.received = signum


@contextmanager
def deferred_signals() -> Iterator[Deferred]:
    """Record SIGINT and SIGTERM instead of stopping; the caller polls `.received` and stops cleanly."""
    deferred = Deferred()
    with _handlers(deferred):
        yield deferred


def _stop_in(exc: BaseException) -> Stopped | None:
    """The signal that caused `exc`, if any: itself, or anywhere in its chain of causes (an extension module
    whose initialisation a signal interrupted raises ImportError from the Stopped, as onnxruntime's does)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return Stopped(signal.SIGINT)
        if isinstance(exc, Stopped):
            return exc
        exc = exc.__cause__
    return None


class CleanSignals:
    """Mixin for a click Command or Group: SIGINT and SIGTERM end it with one line and status 130 or 143."""

    def invoke(self, ctx: click.Context):
        with _handlers(_raise_stopped):
            try:
                return super().invoke(ctx)
            except (Exception, KeyboardInterrupt, Stopped) as exc:
                stopped = _stop_in(exc)
                if stopped is None:
                    raise
        name = signal.Signals(stopped.signum).name
        click.echo(f"{ctx.find_root().info_name}: interrupted ({name})"
                   + (f": {stopped.what}" if stopped.what else ""), err=True)
        ctx.exit(128 + stopped.signum)


class Command(CleanSignals, click.Command):
    """A click Command ending cleanly on SIGINT and SIGTERM."""


class Group(CleanSignals, click.Group):
    """A command line of subcommands with a default one, ending cleanly on SIGINT and SIGTERM.

    `lazy` maps a subcommand's name to 'module:attribute' in cli/, imported only when that subcommand is named (so
    `--help` and completion import no more than their listing needs); any first argument that is neither a
    subcommand nor the group's own option runs the `default` subcommand (`disco-run OUT ...` is
    `disco-run run OUT ...`, `disco-compile MODEL ...` is `disco-compile compile MODEL ...`).
    """

    def __init__(self, *args, lazy: dict[str, str], default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy, self.default = lazy, default

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.lazy, *self.commands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, _, attribute = self.lazy[name].partition(":")
            return getattr(importlib.import_module(f".{module}", __package__), attribute)
        return super().get_command(ctx, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own = {*self.list_commands(ctx), *(o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts))}
        if args and args[0] not in own:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def setup_logging(level: str) -> None:
    """Log records on stderr with time, level and source: '2026-12-02 01:02:03,456 WARNING disco_compile...'."""
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def log_level_option(f):
    return click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
                        help="Least severe log messages shown on stderr (each with its time and level).")(f)


def positive_finite(ctx, param, value: float | None) -> float | None:
    """A click callback: a number above 0 and finite (nan and inf are refused by name)."""
    if value is not None and not (value > 0 and value < float("inf")):
        raise click.BadParameter(f"must be a finite number of seconds above 0, got {value}")
    return value
