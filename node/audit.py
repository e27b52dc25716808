"""The audit trail: append-only, tamper-evident, never patient data.

Every record is one row of an SQLite table (``[audit] db``) holding its sequence number, time,
event, actor (a console user, ``cli:<login>``, an AE title, ``node``), subject (a job id, a
UID, a user name) and a small JSON object of further facts (counts, destinations, reasons the
node wrote). Each record's ``hash`` is SHA-256 over the previous record's hash and its own
canonical JSON, so editing, deleting or reordering a record breaks the chain from there on:
``synthnode audit verify`` finds the first broken record. Triggers refuse UPDATE and DELETE
through SQLite; someone with the file can still rewrite it whole, which is why ``verify``
prints the head hash: kept elsewhere (a ticket, a log shipper) it pins the trail up to then.

Writers are several processes (serve, its workers, the CLI): each append is one ``BEGIN
IMMEDIATE`` transaction that reads the last hash and inserts the next record, so the chain
has one order whatever the number of writers.

What goes in: UIDs, job ids, AE titles, user names, counts, destinations, rule names, the
node's own reason texts. Never a patient's name, ID, birth date, accession number or report
text: callers pass only those kinds of values, and :func:`record` refuses keys it does not
know the meaning of, so that a new caller has to think about what it stores.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import Settings

log = logging.getLogger(__name__)

GENESIS = "0" * 64
"""The ``prev`` of the first record."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    event   TEXT NOT NULL,
    actor   TEXT NOT NULL,
    subject TEXT NOT NULL,
    data    TEXT NOT NULL,
    prev    TEXT NOT NULL,
    hash    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_event ON audit (event, seq);
CREATE INDEX IF NOT EXISTS audit_subject ON audit (subject, seq);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""

EVENTS = {
    "association": "a DICOM association ended: calling/called AE, peer, counts by outcome",
    "stow": "a STOW-RS request ended: user, counts by outcome",
    "job": "a job changed state: state, rule, task, attempts, reason",
    "release": "outputs left the node: job, destination, rule, task, object count",
    "review": "a reviewer approved or rejected a job's outputs: who, why",
    "quarantine": "an instance or output was quarantined, released or discarded",
    "login": "a console login succeeded or failed; a logout",
    "user": "a console user was added, removed or changed role",
    "config": "a process loaded its configuration: the file's hash",
    "broker": "an honest-broker lookup: who, which pseudonym",
}

FIELDS = {
    # identifiers the node makes or that name no person
    "study", "series", "sop", "job", "rule", "task", "destination", "queue", "state",
    "attempts", "objects", "outputs", "quarantined", "revision",
    # peers, users, processes
    "calling", "called", "peer", "address", "user", "role", "process", "via",
    # counts of an association or upload
    "stored", "duplicates", "refused", "failed", "below_reserve", "bytes",
    # the node's own texts and settings
    "reason", "decision", "action", "ok", "path", "sha256", "version", "kind", "count",
    "pseudonym", "series_uids",
    # review decisions per series
    "rejected_series", "series_decision", "undecided",
}
"""Keys :func:`AuditTrail.record` accepts in ``data``."""


class AuditError(Exception):
    """The audit trail cannot be written or read; the message names the file and the fix."""


@dataclass(frozen=True)
class Record:
    seq: int
    at: float
    event: str
    actor: str
    subject: str
    data: dict[str, Any]
    prev: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "time": _iso(self.at), "event": self.event,
                "actor": self.actor, "subject": self.subject, "data": self.data,
                "prev": self.prev, "hash": self.hash}


@dataclass(frozen=True)
class Verified:
    """What :meth:`AuditTrail.verify` found."""

    count: int
    head: str
    """The last record's hash (GENESIS for an empty trail)."""
    broken_at: int | None = None
    """The first record whose hash or link does not hold; None when the chain holds."""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def digest(prev: str, seq: int, at: float, event: str, actor: str, subject: str,
           data: str) -> str:
    """A record's hash: SHA-256 of the previous hash and the record's canonical JSON."""
    body = json.dumps([seq, repr(at), event, actor, subject, data], separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(prev.encode() + b"\n" + body.encode()).hexdigest()


class AuditTrail:
    """One audit database; safe to share between threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(SCHEMA)
            except sqlite3.Error as exc:
                raise AuditError(f"audit trail {self.path}: {exc} (check [audit] db and its "
                                 "folder's permissions)") from None
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def record(self, event: str, actor: str, subject: str = "", **data: Any) -> Record:
        """Append one record; returns it. ``data`` keys must be in :data:`FIELDS` and values
        plain JSON (str, int, float, bool, None, lists of those)."""
        if event not in EVENTS:
            raise ValueError(f'unknown audit event "{event}" (known: {", ".join(EVENTS)})')
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise ValueError(f"audit fields not allowed: {', '.join(unknown)} (see "
                             "node.audit.FIELDS: never patient data)")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        with self._lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    row = conn.execute(
                        "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
                    at = time.time()
                    h = digest(prev, seq, at, event, actor, subject, text)
                    conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (seq, at, event, actor, subject, text, prev, h))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise AuditError(f"audit trail {self.path}: {exc}") from None
        return Record(seq, at, event, actor, subject, dict(data), prev, h)

    # -- reading ---------------------------------------------------------------------------

    def search(self, *, since: float | None = None, until: float | None = None,
               event: str = "", actor: str = "", subject: str = "", text: str = "",
               limit: int = 100, before_seq: int | None = None) -> list[Record]:
        """Records newest first, filtered; ``before_seq`` pages on (the last seq shown).
        ``text`` matches the subject, the actor or the data."""
        where: list[str] = []
        args: list[float | int | str] = []
        for clause, bound in (("at >= ?", since), ("at < ?", until), ("seq < ?", before_seq)):
            if bound is not None:
                where.append(clause)
                args.append(bound)
        for column, value in (("event", event), ("actor", actor), ("subject", subject)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if text:
            where.append("(subject LIKE ? OR actor LIKE ? OR data LIKE ?)")
            args += [f"%{text}%"] * 3
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(max(1, min(limit, 10000)))
        with self._lock:
            rows = self._connect().execute(sql, args).fetchall()
        return [_record(r) for r in rows]

    def iter(self, since: float | None = None) -> Iterator[Record]:
        """Every record in order (from ``since``), in batches."""
        last = 0
        while True:
            with self._lock:
                rows = self._connect().execute(
                    "SELECT * FROM audit WHERE seq > ? AND at >= ? ORDER BY seq LIMIT 1000",
                    (last, since or 0.0)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            last = rows[-1][0]

    def count(self) -> int:
        with self._lock:
            return int(self._connect().execute("SELECT count(*) FROM audit").fetchone()[0])

    def verify(self) -> Verified:
        """Walk the whole chain: each record's link to the one before and its own hash."""
        prev, count, expected = GENESIS, 0, 1
        for r in self.iter():
            count += 1
            if r.seq != expected:
                return Verified(count, prev, r.seq, f"record {expected} is missing (next is "
                                f"{r.seq})")
            if r.prev != prev:
                return Verified(count, prev, r.seq, "its link to the previous record does not "
                                "match that record's hash")
            text = json.dumps(r.data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            if digest(r.prev, r.seq, r.at, r.event, r.actor, r.subject, text) != r.hash:
                return Verified(count, prev, r.seq, "its contents do not match its hash (the "
                                "record was edited)")
            prev, expected = r.hash, r.seq + 1
        return Verified(count, prev)


def _record(row: tuple[Any, ...]) -> Record:
    seq, at, event, actor, subject, data, prev, h = row
    return Record(int(seq), float(at), str(event), str(actor), str(subject), json.loads(data),
                  str(prev), str(h))


def export(trail: AuditTrail, out: io.TextIOBase | Any, fmt: str = "jsonl",
           since: float | None = None) -> int:
    """Write the records (from ``since``) as JSON lines or CSV; returns how many."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["seq", "time", "event", "actor", "subject", "data", "prev", "hash"])
        for r in trail.iter(since):
            writer.writerow([r.seq, _iso(r.at), r.event, r.actor, r.subject,
                             json.dumps(r.data, sort_keys=True), r.prev, r.hash])
            n += 1
        return n
    for r in trail.iter(since):
        out.write(json.dumps(r.as_dict(), sort_keys=True) + "\n")
        n += 1
    return n


# -- the process's trail ----------------------------------------------------------------------

_trails: dict[Path, AuditTrail] = {}
_trails_lock = threading.Lock()


def trail_for(settings: Settings) -> AuditTrail | None:
    """The process's trail for ``settings`` (None when ``[audit] enabled = false``)."""
    if not settings.audit.enabled:
        return None
    path = settings.audit.db
    with _trails_lock:
        found = _trails.get(path)
        if found is None:
            found = _trails[path] = AuditTrail(path)
        return found


def record(settings: Settings, event: str, actor: str, subject: str = "", **data: Any) -> None:
    """Append a record to ``settings``' trail, if it has one. A trail that cannot be written
    is logged as an error, not raised: a locked or full audit file must not stop a study
    that is already accepted."""
    trail = trail_for(settings)
    if trail is None:
        return
    try:
        trail.record(event, actor, subject, **data)
    except AuditError as exc:
        log.error("audit record %s not written: %s", event, exc)


def config_hash(path: Path | None) -> str:
    """SHA-256 of a configuration file's bytes ("" for the embedded default)."""
    if path is None or not path.exists():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()
