"""Files written whole or not at all: a temporary file beside the target, flushed to disk, then renamed over it.

`os.replace` is atomic on POSIX within one filesystem, so a reader (or a crash, or a full disk) sees either
the earlier file or the complete new one, never a truncated one; the temporary file is removed on any failure.
The new file gets the mode an ordinary open() would give it (0666 less the umask), not mkstemp's 0600.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` with a binary file object, then put what it wrote at `path` in one rename. OSError as raised."""
    target = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
