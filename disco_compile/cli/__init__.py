"""Command lines: disco-compile (`main` here: compile.py, and plan.py for `disco-compile plan`) and disco-run
(run.py, torch-free).

`main` is a click group (common.Group) whose subcommands are imported when named: `compile`, the default, so
`disco-compile MODEL ...` is `disco-compile compile MODEL ...`, and `plan`, the planner; a model file named plan is
`./plan`. `compile_main` is the disco-compile entry point: on a device (the plain install, without torch) it says
which install the compiler needs instead of failing on `import torch`.
"""
import sys
from importlib.util import find_spec

import click

from .common import CONTEXT, Group

COMPILE_EXTRA = "pip install 'disco-compile[compile]'"


@click.group(cls=Group, context_settings=CONTEXT, subcommand_metavar="MODEL [OPTIONS] | COMMAND [ARGS]...",
             lazy={"compile": "compile:main", "plan": "plan:plan"}, default="compile")
@click.version_option(package_name="disco-compile", prog_name="disco-compile")
def main() -> None:
    """Split a PyTorch model across devices in DISCO form, or plan the split first (the commands below).

    \b
    disco-compile MODEL --nodes N ...       split MODEL, report its cost, export it with --out
                                            (disco-compile compile --help: every option)
    disco-compile plan MODEL --link RATE    which split runs fastest on devices joined by that link

    \b
    Example: disco-compile resnet50.pt --nodes 2 --budget 0.2 --out shards/
    """


def compile_main() -> None:
    """disco-compile: the group above, where torch and torchvision are installed."""
    absent = [name for name in ("torch", "torchvision") if find_spec(name) is None]
    if absent:
        sys.stderr.write(f"Error: disco-compile needs {' and '.join(absent)}, which this install lacks (the plain "
                         f"install is the device runtime, disco-run); install the compiler with {COMPILE_EXTRA}\n")
        sys.exit(2)
    main(prog_name="disco-compile")
