"""The free-space reserve: below it the node stops taking in work instead of failing halfway.

One reserve (``[spool] reserve_bytes`` and ``reserve_percent``, the larger applies) guards every
file system the node writes to: the spool's, the work folder's and the quarantine's. Checking is
a ``statvfs`` per distinct file system, cached for a fraction of a second so a busy receiver
does not pay it per instance.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.config import Settings, SpoolSettings


@dataclass(frozen=True)
class Level:
    """A guarded file system's free space and the reserve kept on it."""

    path: Path
    free_bytes: int
    reserve_bytes: int

    @property
    def short(self) -> bool:
        return self.free_bytes < self.reserve_bytes


@dataclass(frozen=True)
class Shortfall(Level):
    """A file system below the reserve."""

    def __str__(self) -> str:
        return (f"{self.path}: {_mib(self.free_bytes)} free, below the reserve of "
                f"{_mib(self.reserve_bytes)} ([spool] reserve_bytes / reserve_percent); "
                "free space there or lower the reserve")


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a folder not made yet lives on its parent's
    file system)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class DiskReserve:
    """Answers "is every guarded file system above the reserve?"."""

    def __init__(self, settings: SpoolSettings, paths: Iterable[Path],
                 cache_s: float = 0.25) -> None:
        self.reserve_bytes = settings.reserve_bytes
        self.reserve_percent = settings.reserve_percent
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._checked = -1e9
        self._last: Shortfall | None = None

    @classmethod
    def for_settings(cls, settings: Settings, cache_s: float = 0.25) -> DiskReserve:
        """The reserve over the spool, the work folder and the quarantine."""
        return cls(settings.spool, (settings.spool.dir, settings.jobs.work_dir,
                                    settings.output.quarantine_dir), cache_s)

    def needed(self, path: Path) -> int:
        """The reserve in bytes on ``path``'s file system."""
        st = os.statvfs(_existing(path))
        total = st.f_blocks * st.f_frsize
        return max(self.reserve_bytes, int(total * self.reserve_percent / 100))

    def levels(self) -> list[Level]:
        """Free space and reserve of each distinct guarded file system."""
        seen: set[int] = set()
        levels = []
        for path in self.paths:
            where = _existing(path)
            device = os.stat(where).st_dev
            if device in seen:
                continue
            seen.add(device)
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
            total = st.f_blocks * st.f_frsize
            needed = max(self.reserve_bytes, int(total * self.reserve_percent / 100))
            levels.append(Level(path, free, needed))
        return levels

    def check_now(self) -> Shortfall | None:
        """The first guarded file system below the reserve, or None."""
        for level in self.levels():
            if level.short:
                return Shortfall(level.path, level.free_bytes, level.reserve_bytes)
        return None

    def shortfall(self) -> Shortfall | None:
        """:meth:`check_now`, at most once per ``cache_s``."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.cache_s:
                self._last = self.check_now()
                self._checked = now
            return self._last
