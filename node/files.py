"""Files written whole or not at all: a reader, or the node after a crash, finds the old file
or the new one at a path, never part of one.

Every write goes to a temporary file first (``<name>.<pid>.<thread>.part``, beside the file or
in a folder given on the same file system) and is renamed over the file. Asked to be durable, it
also survives a power loss once the call returns: the temporary file is fdatasync'ed, renamed,
and the folder holding the name fsync'ed, in that order (what makes the spool's acknowledgement
safe; ``tests/test_durability_trace.py`` checks the order in the node's system calls).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (names created, renamed or removed in it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path, tmp_dir: Path | None = None) -> Path:
    """Where a file for ``path`` is written before it is renamed into place: beside it, or in
    ``tmp_dir``; unique to this process and thread, and never ending in ``path``'s suffix (a
    search for ``*.dcm`` or ``*.json`` does not find it)."""
    folder = path.parent if tmp_dir is None else tmp_dir
    return folder / f"{path.name}.{os.getpid()}.{threading.get_ident()}.part"


def write_file(path: Path, data: bytes | str, durable: bool = False, *,
               mode: int = 0o666) -> None:
    """Create (or truncate) ``path`` with ``mode`` (less the umask) holding ``data`` (a str
    as UTF-8); ``durable``: fdatasync it before it is closed. Not atomic by itself: the first
    half of :func:`atomic_write`."""
    view = memoryview(data.encode() if isinstance(data, str) else data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def move_into_place(source: Path, path: Path, durable: bool = False, *,
                    synced: bool = False) -> None:
    """Rename the complete file ``source`` to ``path`` (replacing what is there; both on one
    file system); ``durable``: fdatasync ``source`` first (unless its writer did: ``synced``)
    and fsync ``path``'s folder after. The second half of :func:`atomic_write`."""
    if durable and not synced:
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    os.replace(source, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str, durable: bool = False, *,
                 mode: int = 0o666, tmp_dir: Path | None = None) -> None:
    """Replace the file at ``path`` with ``data`` (a str as UTF-8), whole or not at all; the
    temporary file is written in ``tmp_dir`` when given (it must be on ``path``'s file system)
    and removed when anything fails. ``durable``: the new file survives a power loss once this
    returns. ``mode`` as for :func:`os.open` (less the umask)."""
    tmp = temporary_path(path, tmp_dir)
    try:
        write_file(tmp, data, durable, mode=mode)
        move_into_place(tmp, path, durable, synced=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: Path, durable: bool = False, *, mode: int = 0o666,
                tmp_dir: Path | None = None) -> Iterator[BinaryIO]:
    """:func:`atomic_write` for a writer that streams: a binary file to write, which becomes
    the file at ``path`` when the block ends without an exception (else it is removed)."""
    tmp = temporary_path(path, tmp_dir)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fdatasync(f.fileno())
        move_into_place(tmp, path, durable, synced=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
