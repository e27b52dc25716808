"""One node per spool: ``synthnode serve`` holds an exclusive lock on its spool for its lifetime.

Two processes receiving into one spool, recovering it and routing from one index would hand
studies on twice (and each would remove the other's partial files as "left over"). The lock is
``fcntl.flock`` on a file in the spool folder: the kernel drops it when the holder ends, however
it ends (kill -9 included), so a stale lock never blocks a restart. The file holds the holder's
pid, for the message a second ``serve`` prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = ".serve.lock"


class SpoolInUse(Exception):
    """Another process holds the spool's lock."""

    def __init__(self, spool_dir: Path, pid: int | None) -> None:
        holder = f"serve pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"the spool {spool_dir} is in use by {holder} (lock {spool_dir / LOCK_NAME}): stop "
            "it, or give this one another [spool] dir")
        self.pid = pid


class SpoolLock:
    """The exclusive lock of one spool folder, held from :meth:`acquire` to :meth:`release`
    (or the end of the process)."""

    def __init__(self, spool_dir: Path) -> None:
        self.dir = spool_dir
        self.path = spool_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock without waiting and write our pid into it; :class:`SpoolInUse` when
        another process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            f.close()
            raise SpoolInUse(self.dir, int(text) if text.isdigit() else None) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the only descriptor drops the flock
            self._file = None
