"""`disco-run keygen DIR --nodes N`: CURVE key pairs for the nodes of a run across machines (runtime/net/keys.py).

Errors (a folder that holds keys already, one that cannot be written) are one message on stderr, exit code 2.
"""
from __future__ import annotations

from pathlib import Path

import click

from .common import CONTEXT, CliError, Command


@click.command(name="keygen", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--nodes", type=click.IntRange(min=1), required=True, help="How many nodes the export has.")
@click.option("--force", is_flag=True, help="Replace keys already in DIRECTORY.")
def keygen(directory: Path, nodes: int, force: bool) -> None:
    """Make CURVE keys for NODES nodes in DIRECTORY.

    \b
    Writes DIRECTORY/nodeK.key and nodeK.key_secret for every node K, and
    DIRECTORY/public_keys/ with every node's public key. Give machine K
    the public_keys folder and its own nodeK.key_secret (keep that one
    secret: it is the node's identity), then run it with --keys DIRECTORY.
    A node accepts connections only from the keys in its public_keys folder.
    """
    from ..runtime.net.keys import keygen as make_keys
    from ..runtime.net.peers import NetworkConfigError
    try:
        make_keys(directory, nodes, force=force)
    except NetworkConfigError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"{directory}: cannot write the keys ({exc})") from exc
    click.echo(f"wrote key pairs for nodes 0..{nodes - 1} to {directory}, public keys in {directory}/public_keys; "
               f"give machine K the public_keys folder and nodeK.key_secret")
