"""The overview's history: one row of the node's figures every ``[console] sample_interval_s``,
kept ``history_h`` hours in the console database, drawn as small inline SVG charts. UIDs and
counts only."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from node.config import Queue
from node.console.context import ConsoleContext
from node.jobs import JobState
from node.periodic import Periodic
from node.reserve import DiskReserve

log = logging.getLogger(__name__)

COLUMNS = ("stored", "associations", "refused", "spool_instances", "spool_bytes", "free_bytes",
           "queue_cpu", "queue_gpu", "pending", "running", "done", "dead", "review",
           "quarantined")


@dataclass(frozen=True)
class Now:
    """The node's figures at one moment."""

    at: float
    values: dict[str, int]


def quarantine_count(ctx: ConsoleContext) -> int:
    folder = ctx.settings.output.quarantine_dir
    return sum(1 for _ in folder.glob("*/*.reason.json")) if folder.is_dir() else 0


def measure(ctx: ConsoleContext) -> Now:
    """The figures now (one index query, one job-count query, statvfs)."""
    c = ctx.counters
    _, instances, size = ctx.spool.index.totals()
    levels = DiskReserve.for_settings(ctx.settings).levels()
    sizes = ctx.queues.sizes()
    states = ctx.queues.store.count_by_state()
    values = {
        "stored": c.stored, "associations": c.associations,
        "refused": c.rejected + c.failed + c.below_reserve,
        "spool_instances": instances, "spool_bytes": size,
        "free_bytes": min((lv.free_bytes for lv in levels), default=0),
        "queue_cpu": sizes.get(Queue.CPU, 0), "queue_gpu": sizes.get(Queue.GPU, 0),
        **{s.value: states.get(s, 0) for s in (JobState.PENDING, JobState.RUNNING,
                                                JobState.DONE, JobState.DEAD,
                                                JobState.REVIEW)},
        "quarantined": quarantine_count(ctx),
    }
    return Now(time.time(), values)


class Samples(Periodic):
    """Writes :func:`measure` into the console database every ``sample_interval_s``."""

    def __init__(self, ctx: ConsoleContext, path: Path) -> None:
        super().__init__("console-samples", ctx.settings.console.sample_interval_s)
        self.ctx = ctx
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{c} INTEGER NOT NULL" for c in COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS samples (at REAL PRIMARY KEY, {cols})")

    def tick(self, now: float | None = None) -> None:
        try:
            sample = measure(self.ctx)
        except Exception:  # noqa: BLE001 - a missed sample is taken again on the next period
            log.exception("console sample not taken")
            return
        keep = self.ctx.settings.console.history_h * 3600
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO samples VALUES (?, "
                             f"{', '.join('?' * len(COLUMNS))})",
                             (sample.at, *(sample.values[c] for c in COLUMNS)))
            self._db.execute("DELETE FROM samples WHERE at < ?", (sample.at - keep,))

    def history(self) -> list[Now]:
        since = time.time() - self.ctx.settings.console.history_h * 3600
        with self._lock:
            rows = self._db.execute(f"SELECT at, {', '.join(COLUMNS)} FROM samples "
                                    "WHERE at >= ? ORDER BY at", (since,)).fetchall()
        return [Now(r[0], dict(zip(COLUMNS, r[1:], strict=True))) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def spark(points: list[tuple[float, float]], width: int = 260, height: int = 48) -> str:
    """An SVG polyline of (t, value) points, scaled to the box (empty box for < 2 points)."""
    if len(points) < 2:
        return (f'<svg class="spark" width="{width}" height="{height}" role="img">'
                f'<text x="4" y="{height // 2}">collecting…</text></svg>')
    t0, t1 = points[0][0], points[-1][0]
    vmax = max(v for _, v in points) or 1.0
    span = (t1 - t0) or 1.0
    coords = " ".join(f"{(t - t0) / span * (width - 2) + 1:.1f},"
                      f"{height - 1 - v / vmax * (height - 2):.1f}" for t, v in points)
    return (f'<svg class="spark" width="{width}" height="{height}" role="img">'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" '
            f'points="{coords}"/><text x="4" y="12">max {vmax:,.0f}</text></svg>')


def rate(history: list[Now], column: str) -> list[tuple[float, float]]:
    """Per-minute rate of a counter column (restarts of the counter read as 0)."""
    out = []
    for a, b in zip(history, history[1:], strict=False):
        dt = b.at - a.at
        d = b.values[column] - a.values[column]
        out.append((b.at, max(d, 0) / dt * 60 if dt > 0 else 0.0))
    return out


def series(history: list[Now], column: str) -> list[tuple[float, float]]:
    return [(s.at, float(s.values[column])) for s in history]
