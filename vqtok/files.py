"""Writing files so that nobody ever sees half of one. Imports nothing of vqtok; every layer may use it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread
    os.umask(mask)
    return mask


UMASK = _read_umask()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], durable: bool = True) -> None:
    """write(temporary path) in path's folder, then rename it to path: readers see the whole file or none.

    The temporary name, `.NAME.XXXX.tmp`, is skipped by dataset readers and globs of `*.parquet` alike.
    With durable, the data reaches the disk before the rename and the rename before this returns, so a power
    cut can neither leave an empty file under the real name nor undo a file that a later one depends on.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes files only their owner can read; give the usual mode
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        if durable:
            sync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(path.parent)


def sync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sync_folder(path: str | os.PathLike) -> None:
    """fsync a folder: the names created or renamed in it survive a power cut (a file's own fsync keeps only
    its data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
