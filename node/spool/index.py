"""The spool's index: SQLite in WAL mode, one writer connection behind a lock.

Durability argument: an instance file is fsynced and renamed into place before its row is
committed, and the row is committed before the C-STORE response says Success. WAL with
``synchronous=NORMAL`` survives a killed process (the WAL is in the page cache); after a power
loss the last commits may be missing, which :meth:`Spool.recover` repairs by indexing every
complete ``.dcm`` file found on disk. The files are the truth, the index a fast view of them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    size_bytes       INTEGER NOT NULL,
    received_at      REAL NOT NULL,
    calling_aet      TEXT NOT NULL,
    called_aet       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid        TEXT PRIMARY KEY,
    state            TEXT NOT NULL,
    revision         INTEGER NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    stable_at        REAL,
    handed_revision  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state);
CREATE INDEX IF NOT EXISTS studies_last ON studies (last_received_at);
CREATE TABLE IF NOT EXISTS study_jobs (
    study_uid        TEXT NOT NULL,
    job_id           TEXT NOT NULL,
    PRIMARY KEY (study_uid, job_id)
);
"""
# Columns renamed after the first release: (table, old name, new name).
RENAMED = (
    ("studies", "generation", "revision"),
    ("studies", "handed_generation", "handed_revision"),
)
# Columns added after the first release: (table, column, definition).
MIGRATIONS = (
    ("studies", "note", "TEXT NOT NULL DEFAULT ''"),
    ("studies", "done_at", "REAL"),
)


class StudyState(StrEnum):
    """Where a study stands in the spool."""

    RECEIVING = "receiving"
    """Instances arrived within the last ``stable_after_s`` seconds; more may come."""

    STABLE = "stable"
    """No instance for ``stable_after_s`` seconds; waiting to be handed to the next stage."""

    HANDED = "handed"
    """Handed to the next stage for its current revision (its jobs are queued or running);
    a new instance starts a new revision."""

    DONE = "done"
    """Every job of the current revision is done; the files go after ``retention_s``."""

    UNROUTED = "unrouted"
    """No rule matched: nothing was made of it; the files go after ``retention_s``."""

    REMOVED = "removed"
    """Its files were removed after retention; the row keeps the revision count, so a
    study sent again is a new revision and its jobs run again."""


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size_bytes: int


@dataclass(frozen=True)
class StudySummary:
    """What ``synthnode status`` shows of one study (no patient data: UIDs and counts)."""

    study_uid: str
    state: StudyState
    revision: int
    series: int
    instances: int
    size_bytes: int
    first_received_at: float
    last_received_at: float
    note: str = ""
    """What the router decided (rules and job count, or that no rule matched)."""


class Index:
    """Thread-safe access to the spool index database."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        for table, old, new in RENAMED:  # (before the schema: its indexes name new columns)
            columns = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if old in columns:
                self._db.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
        self._db.executescript(SCHEMA)
        for table, column, definition in MIGRATIONS:
            columns = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
                " size_bytes FROM instances WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return InstanceRow(*row) if row else None

    def known_instances(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT sop_instance_uid FROM instances")}

    def record_instance(
        self, row: InstanceRow, calling_aet: str, called_aet: str, now: float | None = None
    ) -> None:
        """Insert or replace an instance row and mark its study as receiving (a new revision
        if the study had become stable)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.sop_instance_uid, row.study_uid, row.series_uid, row.sop_class_uid,
                    row.transfer_syntax, row.size_bytes, now, calling_aet, called_aet,
                ),
            )
            db.execute(
                "INSERT INTO studies (study_uid, state, revision, first_received_at,"
                " last_received_at) VALUES (?, 'receiving', 1, ?, ?)"
                " ON CONFLICT (study_uid) DO UPDATE SET"
                "  revision = revision + (state != 'receiving'),"
                "  state = 'receiving', stable_at = NULL,"
                "  last_received_at = excluded.last_received_at",
                (row.study_uid, now, now),
            )

    def mark_stable(self, older_than: float, now: float | None = None) -> list[str]:
        """Studies whose last instance is older than ``older_than`` become stable."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE studies SET state = 'stable', stable_at = ?"
                " WHERE state = 'receiving' AND last_received_at <= ? RETURNING study_uid",
                (now, older_than),
            ).fetchall()
        return [r[0] for r in rows]

    def pending_handoffs(self) -> list[tuple[str, int]]:
        """(study UID, revision) of stable studies not yet handed on, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT study_uid, revision FROM studies WHERE state = 'stable'"
                " ORDER BY stable_at"
            ).fetchall()

    def mark_handed(self, study_uid: str, revision: int) -> bool:
        """Record the hand-off of one revision; False if the study changed meanwhile."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE studies SET state = 'handed', handed_revision = revision"
                " WHERE study_uid = ? AND revision = ? AND state = 'stable'",
                (study_uid, revision),
            )
            return cur.rowcount == 1

    def study_instances(self, study_uid: str) -> list[InstanceRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
                " size_bytes FROM instances WHERE study_uid = ? ORDER BY series_uid,"
                " sop_instance_uid",
                (study_uid,),
            ).fetchall()
        return [InstanceRow(*r) for r in rows]

    def summaries(self) -> list[StudySummary]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.study_uid, s.state, s.revision, COUNT(DISTINCT i.series_uid),"
                " COUNT(i.sop_instance_uid), COALESCE(SUM(i.size_bytes), 0),"
                " s.first_received_at, s.last_received_at, s.note"
                " FROM studies s LEFT JOIN instances i ON i.study_uid = s.study_uid"
                " GROUP BY s.study_uid ORDER BY s.last_received_at"
            ).fetchall()
        return [
            StudySummary(r[0], StudyState(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8])
            for r in rows
        ]

    def study_page(self, offset: int = 0, limit: int = 50) -> list[StudySummary]:
        """Studies newest first (by their last instance), ``limit`` from ``offset``: the
        studies are paged first (indexed), their instances counted after."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.study_uid, s.state, s.revision, COUNT(DISTINCT i.series_uid),"
                " COUNT(i.sop_instance_uid), COALESCE(SUM(i.size_bytes), 0),"
                " s.first_received_at, s.last_received_at, s.note"
                " FROM (SELECT * FROM studies ORDER BY last_received_at DESC LIMIT ? OFFSET ?)"
                " s LEFT JOIN instances i ON i.study_uid = s.study_uid"
                " GROUP BY s.study_uid ORDER BY s.last_received_at DESC",
                (limit, offset),
            ).fetchall()
        return [
            StudySummary(r[0], StudyState(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8])
            for r in rows
        ]

    def totals(self) -> tuple[int, int, int]:
        """(studies, instances, bytes) in the spool."""
        with self._lock:
            studies = self._db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
            instances, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM instances").fetchone()
        return int(studies), int(instances), int(size)

    # -- jobs ------------------------------------------------------------------------------

    def instance_aets(self, study_uid: str) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (calling AE, called AE) of a study's instances."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, calling_aet, called_aet FROM instances"
                " WHERE study_uid = ?", (study_uid,),
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def set_routed(self, study_uid: str, job_ids: list[str], note: str) -> None:
        """Record the jobs the router made for a study (replacing earlier ones) and why."""
        with self.transaction() as db:
            db.execute("DELETE FROM study_jobs WHERE study_uid = ?", (study_uid,))
            db.executemany("INSERT INTO study_jobs VALUES (?, ?)",
                           [(study_uid, j) for j in job_ids])
            db.execute("UPDATE studies SET note = ? WHERE study_uid = ?", (note, study_uid))

    def handed(self) -> list[tuple[str, int, list[str]]]:
        """(study UID, revision, job ids) of studies whose jobs are under way."""
        with self._lock:
            studies = self._db.execute(
                "SELECT study_uid, revision FROM studies WHERE state = 'handed'"
            ).fetchall()
            jobs: dict[str, list[str]] = {}
            for study_uid, job in self._db.execute(
                "SELECT j.study_uid, j.job_id FROM study_jobs j JOIN studies s"
                " ON s.study_uid = j.study_uid WHERE s.state = 'handed'"
            ):
                jobs.setdefault(study_uid, []).append(job)
        return [(s, g, jobs.get(s, [])) for s, g in studies]

    def mark_done(self, study_uid: str, revision: int, now: float | None = None) -> bool:
        """Jobs of this revision all done (or none made): done, or unrouted."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE studies SET done_at = ?, state = CASE WHEN EXISTS (SELECT 1 FROM"
                " study_jobs j WHERE j.study_uid = studies.study_uid) THEN 'done'"
                " ELSE 'unrouted' END WHERE study_uid = ? AND revision = ?"
                " AND state = 'handed'",
                (now, study_uid, revision),
            )
            return cur.rowcount == 1

    def removable(self, done_before: float) -> list[tuple[str, int]]:
        """(study UID, revision) of done or unrouted studies done before ``done_before``."""
        with self._lock:
            return self._db.execute(
                "SELECT study_uid, revision FROM studies WHERE state IN ('done', 'unrouted')"
                " AND done_at <= ?", (done_before,),
            ).fetchall()

    def forget_instance(self, study_uid: str, revision: int, sop_instance_uid: str) -> bool:
        """Delete an instance row if its study is still done/unrouted at ``revision``."""
        with self.transaction() as db:
            still = db.execute(
                "SELECT 1 FROM studies WHERE study_uid = ? AND revision = ?"
                " AND state IN ('done', 'unrouted')", (study_uid, revision),
            ).fetchone()
            if still is None:
                return False
            db.execute("DELETE FROM instances WHERE sop_instance_uid = ? AND study_uid = ?",
                       (sop_instance_uid, study_uid))
            return True

    def mark_removed(self, study_uid: str, revision: int) -> bool:
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE studies SET state = 'removed' WHERE study_uid = ? AND revision = ?"
                " AND state IN ('done', 'unrouted')", (study_uid, revision),
            )
            return cur.rowcount == 1
