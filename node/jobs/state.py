"""Job states, kept by the node beside the queue.

Huey removes a message from its queue when a worker takes it: a worker killed mid-task takes the
message with it. So every job also has a record here (pending, running with a heartbeat, done,
dead), in the key-value store of the same Huey storage as the queues (SQLite file or Redis: one
code path), and the reaper re-enqueues running jobs whose heartbeat stopped.

Records are JSON under ``job:<id>``; heartbeats are separate keys (``hb:<id>``) so that a
heartbeat never overwrites a state change made by someone else.

An index beside the records answers the console's paged listings and counts without reading
every record (:class:`JobStore` ``page``/``count``/``count_by_state``):

- SQLite: the table ``synthnode_jobs`` (queue name, id, state, created_at, study UID, rule) in
  the same database file as Huey's ``kv`` table, kept by triggers on ``kv``: every write of a
  ``job:`` row, by this module or anyone else (the raw storage API, an older synthnode), updates
  the index in the same statement, hence the same transaction. A store made before the index
  gets it built on first use, in one exclusive transaction with the triggers' creation.
- Redis: per Huey name, a sorted set of all job ids by created_at, one per state, and a hash of
  each job's search text (id, study UID, rule), written with the record by one Lua script call
  (atomic as a MULTI/EXEC, at half its cost: put is on every job's path); deletes use
  MULTI/EXEC.
  A store made before the index is indexed on first use, by a Lua script that reads and indexes
  each chunk of records atomically.
- Any other Huey storage (memory, tests): full scans, as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from huey.constants import EmptyData
from huey.storage import BaseStorage, RedisStorage, SqliteStorage

from node.archives.base import SPOOL, Source, SourceKind
from node.config import ORTHANC, Queue, RuleTask, Settings

_JOB = "job:"
_BEAT = "hb:"


class JobState(StrEnum):
    """Where a job stands."""

    PENDING = "pending"
    """Queued (or waiting for its retry time)."""

    RUNNING = "running"
    """A worker has it and beats its heartbeat."""

    DONE = "done"
    """Outputs made and delivered (quarantined outputs are counted, not sent)."""

    DEAD = "dead"
    """Failed ``[jobs] max_attempts`` times, or failed in a way no retry mends; kept with its
    reason until ``synthnode jobs retry`` re-queues it."""

    REVIEW = "review"
    """Outputs made and staged (``[jobs] work_dir/<job>/``), waiting for a reviewer: the task
    or one of its destinations has ``review = true``. Approval re-queues it for delivery."""

    REJECTED = "rejected"
    """A reviewer rejected the outputs: never delivered, kept in the work folder with the
    reason."""


FINAL = (JobState.DONE, JobState.REJECTED)
"""States after which a job never needs its study's source again (a rejected job's outputs stay
in its work folder; a job in review still needs the source: it may be approved)."""


def job_id(study_uid: str, rule: str, task_index: int, task: str) -> str:
    """The job's id: the same for the same (study, rule, task), so a study handed on again
    (a crash, more instances) names the same job and never a second one."""
    digest = hashlib.sha256(f"{study_uid}\0{rule}\0{task_index}\0{task}".encode()).hexdigest()
    return f"{task}-{digest[:20]}"


@dataclass(frozen=True)
class SeriesDecision:
    """A reviewer's decision on the outputs made from one source series of a job."""

    series_uid: str
    approve: bool
    user: str
    reason: str
    at: float


@dataclass(frozen=True)
class Job:
    """One task of one rule on the series of one study that the rule matched."""

    id: str
    study_uid: str
    revision: int
    """The spool revision of the study it was made for."""
    rule: str
    task_index: int
    task: RuleTask
    """The rule's task as configured when the job was made."""
    queue: Queue
    series_uids: tuple[str, ...]
    destinations: tuple[str, ...]
    state: JobState = JobState.PENDING
    attempts: int = 0
    last_error: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    not_before: float = 0.0
    worker: str = ""
    outputs: int = 0
    quarantined: int = 0
    notes: tuple[str, ...] = ()
    """Per-object reasons worth showing (quarantine reasons), UIDs only."""
    source: Source = SPOOL
    """Where the worker reads the study: the spool, or the archive it came from (the Orthanc
    plugin, backfill)."""
    approved: bool = False
    """A reviewer approved the staged outputs (jobs that need review deliver only then)."""
    decided_by: str = ""
    """Who approved or rejected it (a console user, or ``cli:<login>``)."""
    decision_reason: str = ""
    decided_at: float = 0.0
    series_decisions: tuple[SeriesDecision, ...] = ()
    """Decisions on single series of its outputs (by their source series; one per series): a
    rejected series is never delivered when the job is approved; one left undecided follows
    the job's decision."""

    @property
    def kind(self) -> str:
        """The task's kind, as logs and listings show it."""
        return self.task.task.value

    def series_decision(self, series_uid: str) -> SeriesDecision | None:
        """The decision on ``series_uid`` (None: it follows the job's decision)."""
        return next((d for d in self.series_decisions if d.series_uid == series_uid), None)

    @property
    def rejected_series(self) -> frozenset[str]:
        """Source series whose outputs a reviewer rejected (never delivered)."""
        return frozenset(d.series_uid for d in self.series_decisions if not d.approve)

    def with_series_decision(self, decision: SeriesDecision) -> Job:
        """A copy with ``decision`` in place of any earlier one on that series."""
        kept = tuple(d for d in self.series_decisions if d.series_uid != decision.series_uid)
        return self.but(series_decisions=(*kept, decision))

    def to_json(self) -> bytes:
        data = asdict(self)
        data["task"] = self.task.model_dump(mode="json")
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        data = json.loads(raw)
        data["state"] = JobState(data["state"])
        data["task"] = RuleTask.model_validate(data["task"])
        data["queue"] = Queue(data["queue"])
        for name in ("series_uids", "destinations", "notes"):
            data[name] = tuple(data.get(name, ()))
        data["source"] = _source(data)
        data["series_decisions"] = tuple(SeriesDecision(**d)
                                         for d in data.get("series_decisions", ()))
        if "generation" in data:  # (its name in records of 0.1)
            data["revision"] = data.pop("generation")
        return cls(**data)

    def but(self, **changes: Any) -> Job:
        """A copy with ``changes`` and a fresh ``updated_at``."""
        return replace(self, updated_at=time.time(), **changes)


def _source(data: dict[str, Any]) -> Source:
    """A record's source; records written before sources were typed name it in three fields
    (``orthanc_study`` with ``orthanc_source``, or ``pacs_source``)."""
    orthanc_study = data.pop("orthanc_study", "")
    orthanc_source = data.pop("orthanc_source", "")
    pacs_source = data.pop("pacs_source", "")
    if "source" in data:
        return Source(**data["source"])
    if orthanc_study:
        return Source(SourceKind.ORTHANC, orthanc_source or ORTHANC, orthanc_study)
    if pacs_source:
        return Source(SourceKind.DICOM, pacs_source, str(data["study_uid"]))
    return SPOOL


def needs_review(settings: Settings, job: Job) -> bool:
    """Whether ``job``'s outputs wait for a reviewer: its task or one of its destinations has
    ``review = true``."""
    if job.task.review:
        return True
    for name in job.destinations:
        try:
            if settings.destination(name).review:
                return True
        except KeyError:
            continue  # an unknown destination fails the delivery, with its own message
    return False


@dataclass(frozen=True)
class Heartbeat:
    worker: str
    at: float


class JobStore:
    """Job records and heartbeats in a Huey storage's key-value space, with an index for paged
    listings (see the module's docstring)."""

    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage
        self._index: _SqliteIndex | _RedisIndex | None = None
        if isinstance(storage, SqliteStorage):
            self._index = _SqliteIndex(storage)
        elif isinstance(storage, RedisStorage):
            self._index = _RedisIndex(storage)

    def get(self, job_id: str) -> Job | None:
        raw = self.storage.peek_data(_JOB + job_id)
        return None if raw is EmptyData else Job.from_json(raw)

    def get_many(self, job_ids: Iterable[str]) -> dict[str, Job]:
        keys = [_JOB + j for j in job_ids]
        found = self.storage.peek_many(keys) if keys else {}
        return {k[len(_JOB):]: Job.from_json(v) for k, v in found.items()}

    def all_done(self, job_ids: Sequence[str], revision: int) -> bool:
        """Whether every one of ``job_ids`` is done (or rejected), for ``revision`` of its
        study or a later one (the spool's retention asks this:
        :class:`node.spool.retention.JobLedger`)."""
        found = self.get_many(job_ids)
        return all(j in found and found[j].state in FINAL
                   and found[j].revision >= revision for j in job_ids)

    def get_raw(self, job_id: str) -> tuple[bytes, Job] | None:
        """The record as stored (what :meth:`swap` compares) and the job it holds."""
        raw = self.storage.peek_data(_JOB + job_id)
        return None if raw is EmptyData else (bytes(raw), Job.from_json(raw))

    def swap(self, expected: bytes, job: Job) -> bool:
        """Store ``job`` only if its record is still ``expected`` (read by :meth:`get_raw`),
        in one atomic step: whether it was stored. Two reviewers deciding one job at once, or a
        decision racing a worker, cannot both win."""
        if isinstance(self._index, _RedisIndex):
            return self._index.put(job, expected)
        if isinstance(self.storage, SqliteStorage):
            with self.storage.db(commit=True) as curs:  # (begin exclusive)
                curs.execute("update kv set value = ? where queue = ? and key = ? and value = ?",
                             (job.to_json(), self.storage.name, _JOB + job.id, expected))
                return bool(curs.rowcount == 1)
        current = self.storage.peek_data(_JOB + job.id)  # (a test's memory storage)
        if current is EmptyData or bytes(current) != expected:
            return False
        self.storage.put_data(_JOB + job.id, job.to_json())
        return True

    def put(self, job: Job) -> None:
        if isinstance(self._index, _RedisIndex):
            self._index.put(job)
        else:  # SQLite: the triggers on kv index it in the same statement
            self.storage.put_data(_JOB + job.id, job.to_json())

    def delete(self, job_id: str) -> None:
        if isinstance(self._index, _RedisIndex):
            self._index.delete(job_id)
        else:
            self.storage.delete_data(_JOB + job_id)
            self.storage.delete_data(_BEAT + job_id)

    def all(self) -> list[Job]:
        """Every job, oldest first."""
        jobs = [Job.from_json(v) for k, v in self.storage.result_items().items()
                if str(k).startswith(_JOB)]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def page(self, state: JobState | None = None, offset: int = 0, limit: int = 50,
             text: str = "") -> list[Job]:
        """Jobs newest first (by ``created_at``, then id), of ``state`` (None: all), whose id,
        study UID or rule contains ``text``; ``limit`` of them from ``offset``."""
        offset, limit = max(0, offset), max(0, limit)
        if self._index is not None:
            return [Job.from_json(raw) for raw in self._index.page(state, offset, limit, text)]
        return _scan(self.all(), state, text)[offset:offset + limit]

    def of_state(self, state: JobState, created_before: float | None = None,
                 chunk: int = 500) -> Iterator[Job]:
        """Jobs of ``state`` (created before ``created_before``, if given), oldest first, read
        ``chunk`` records at a time: what the reaper walks (running jobs; done jobs old
        enough to forget) without reading every record. A job that changes state or goes
        away meanwhile is skipped."""
        if self._index is not None:
            ids = self._index.ids_of(state, created_before)
        else:
            ids = [j.id for j in self.all() if j.state is state
                   and (created_before is None or j.created_at < created_before)]
        for i in range(0, len(ids), chunk):
            found = self.get_many(ids[i:i + chunk])
            yield from (found[j] for j in ids[i:i + chunk]
                        if j in found and found[j].state is state)

    def count(self, state: JobState | None = None, text: str = "") -> int:
        """How many jobs :meth:`page` pages through for ``state`` and ``text``."""
        if self._index is not None:
            return self._index.count(state, text)
        return len(_scan(self.all(), state, text))

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 when none)."""
        counts = dict.fromkeys(JobState, 0)
        if self._index is not None:
            counts.update(self._index.count_by_state())
            return counts
        for job in self.all():
            counts[job.state] += 1
        return counts

    def beat(self, job_id: str, worker: str, now: float | None = None) -> None:
        at = time.time() if now is None else now
        self.storage.put_data(_BEAT + job_id, json.dumps([worker, at]).encode())

    def heartbeat(self, job_id: str) -> Heartbeat | None:
        raw = self.storage.peek_data(_BEAT + job_id)
        if raw is EmptyData:
            return None
        worker, at = json.loads(raw)
        return Heartbeat(str(worker), float(at))

    def clear_beat(self, job_id: str) -> None:
        self.storage.delete_data(_BEAT + job_id)

    # -- small records of other stages (e.g. the Orthanc plugin's study markers) -----------

    def get_record(self, key: str) -> dict[str, Any] | None:
        raw = self.storage.peek_data(key)
        return None if raw is EmptyData else dict(json.loads(raw))

    def put_record(self, key: str, value: dict[str, Any], if_empty: bool = False) -> bool:
        """Store ``value`` at ``key`` (only if nothing is there, with ``if_empty``); whether
        it was stored."""
        data = json.dumps(value).encode()
        if if_empty:
            return bool(self.storage.put_if_empty(key, data))
        self.storage.put_data(key, data)
        return True

    def delete_record(self, key: str) -> None:
        self.storage.delete_data(key)

    def records(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every record whose key starts with ``prefix``, by key."""
        return {str(k): dict(json.loads(v)) for k, v in self.storage.result_items().items()
                if str(k).startswith(prefix)}


def _scan(jobs: list[Job], state: JobState | None, text: str) -> list[Job]:
    """``jobs`` (oldest first) newest first, of ``state``, matching ``text``: the listing
    without an index."""
    return [j for j in reversed(jobs) if (state is None or j.state is state)
            and (not text or text in j.id or text in j.study_uid or text in j.rule)]


# -- SQLite: an index table kept by triggers on Huey's kv table ---------------------------

_SQL_RECORD = "CAST(new.value AS TEXT)"
_SQLITE_DDL = (
    "create table if not exists synthnode_jobs ("
    " queue_name text not null, id text not null, state text not null,"
    " created_at real not null, study_uid text not null, rule text not null,"
    " primary key (queue_name, id)) without rowid",
    # Covering indexes (study UID and rule in them): a text search walks one index in page
    # order and stops at the page's end, never reading the table.
    "create index if not exists synthnode_jobs_by_state"
    " on synthnode_jobs (queue_name, state, created_at, id, study_uid, rule)",
    "create index if not exists synthnode_jobs_by_created"
    " on synthnode_jobs (queue_name, created_at, id, study_uid, rule)",
    "create table if not exists synthnode_jobs_built ("
    " queue_name text not null primary key, built_at real not null)",
    # An insert (Huey's "insert or replace": REPLACE deletes without firing delete triggers)
    # or update of a job record indexes it; a record that is not JSON is left out, never
    # refused (the write must not fail because of the index).
    "create trigger if not exists synthnode_jobs_insert after insert on kv"
    " when substr(new.key, 1, 4) = 'job:' and json_valid(" + _SQL_RECORD + ") begin"
    " insert or replace into synthnode_jobs"
    " (queue_name, id, state, created_at, study_uid, rule) values (new.queue,"
    " substr(new.key, 5),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.state'), ''),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.created_at'), 0),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.study_uid'), ''),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.rule'), '')); end",
    "create trigger if not exists synthnode_jobs_update after update on kv"
    " when substr(old.key, 1, 4) = 'job:' or substr(new.key, 1, 4) = 'job:' begin"
    " delete from synthnode_jobs where queue_name = old.queue and id = substr(old.key, 5)"
    " and substr(old.key, 1, 4) = 'job:';"
    " insert or replace into synthnode_jobs"
    " (queue_name, id, state, created_at, study_uid, rule) select new.queue,"
    " substr(new.key, 5),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.state'), ''),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.created_at'), 0),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.study_uid'), ''),"
    " coalesce(json_extract(" + _SQL_RECORD + ", '$.rule'), '')"
    " where substr(new.key, 1, 4) = 'job:' and json_valid(" + _SQL_RECORD + "); end",
    "create trigger if not exists synthnode_jobs_delete after delete on kv"
    " when substr(old.key, 1, 4) = 'job:' begin"
    " delete from synthnode_jobs where queue_name = old.queue and id = substr(old.key, 5);"
    " end",
)
_SQLITE_BUILD = (
    "insert or replace into synthnode_jobs"
    " (queue_name, id, state, created_at, study_uid, rule)"
    " select queue, substr(key, 5),"
    " coalesce(json_extract(CAST(value AS TEXT), '$.state'), ''),"
    " coalesce(json_extract(CAST(value AS TEXT), '$.created_at'), 0),"
    " coalesce(json_extract(CAST(value AS TEXT), '$.study_uid'), ''),"
    " coalesce(json_extract(CAST(value AS TEXT), '$.rule'), '')"
    " from kv where queue = ? and substr(key, 1, 4) = 'job:'"
    " and json_valid(CAST(value AS TEXT))"
)
_SQLITE_TEXT = "(instr(j.id, ?) > 0 or instr(j.study_uid, ?) > 0 or instr(j.rule, ?) > 0)"


class _SqliteIndex:
    """``synthnode_jobs`` in the Huey SQLite file: the triggers keep it; this reads it."""

    def __init__(self, storage: SqliteStorage) -> None:
        self.storage = storage
        self.name = storage.name
        self._ready = False

    def _ensure(self) -> None:
        """Create the index (table, triggers) and fill it from the records already there,
        once per Huey name: all in one exclusive transaction, so that no record is written
        between the filling and the triggers."""
        if self._ready:
            return
        try:
            built = self.storage.sql("select 1 from synthnode_jobs_built where queue_name = ?",
                                     (self.name,), results=True)
        except sqlite3.OperationalError:  # no such table: a store from before the index
            built = []
        if not built:
            with self.storage.db(commit=True) as curs:
                for ddl in _SQLITE_DDL:
                    curs.execute(ddl)
                curs.execute("select 1 from synthnode_jobs_built where queue_name = ?",
                             (self.name,))
                if curs.fetchone() is None:
                    curs.execute(_SQLITE_BUILD, (self.name,))
                    curs.execute("insert into synthnode_jobs_built (queue_name, built_at)"
                                 " values (?, ?)", (self.name, time.time()))
        self._ready = True

    def _where(self, state: JobState | None, text: str) -> tuple[str, list[Any]]:
        where, params = ["j.queue_name = ?"], [self.name]
        if state is not None:
            where.append("j.state = ?")
            params.append(state.value)
        if text:
            where.append(_SQLITE_TEXT)
            params += [text, text, text]
        return " and ".join(where), params

    def page(self, state: JobState | None, offset: int, limit: int,
             text: str) -> list[bytes]:
        self._ensure()
        where, params = self._where(state, text)
        rows = self.storage.sql(  # the page's ids from the index, then their records
            "select kv.value from (select j.queue_name, j.id, j.created_at"
            f" from synthnode_jobs j where {where}"
            " order by j.created_at desc, j.id desc limit ? offset ?) p"
            " join kv on kv.queue = p.queue_name and kv.key = 'job:' || p.id"
            " order by p.created_at desc, p.id desc",
            (*params, limit, offset), results=True)
        return [bytes(r[0]) for r in rows]

    def ids_of(self, state: JobState, created_before: float | None) -> list[str]:
        self._ensure()
        rows = self.storage.sql(
            "select id from synthnode_jobs where queue_name = ? and state = ?"
            " and created_at < ? order by created_at, id",
            (self.name, state.value, math.inf if created_before is None else created_before),
            results=True)
        return [str(r[0]) for r in rows]

    def count(self, state: JobState | None, text: str) -> int:
        self._ensure()
        where, params = self._where(state, text)
        rows = self.storage.sql(f"select count(*) from synthnode_jobs j where {where}",
                                params, results=True)
        return int(rows[0][0])

    def count_by_state(self) -> dict[JobState, int]:
        """One count per state, each a range of the (queue_name, state, ...) index."""
        self._ensure()
        counts = {}
        for state in JobState:
            rows = self.storage.sql("select count(*) from synthnode_jobs"
                                    " where queue_name = ? and state = ?",
                                    (self.name, state.value), results=True)
            counts[state] = int(rows[0][0])
        return counts


# -- Redis: sorted sets by created_at, written with the record in one MULTI/EXEC ----------

_REDIS_INDEX_LUA = r"""
-- KEYS: the records' hash, the all-jobs zset, the search-text hash, one zset per state
-- ARGV: the state names (as many as state zsets), then job ids
local nstates = #KEYS - 3
local indexed = 0
for i = nstates + 1, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], 'job:' .. id)
  for s = 1, nstates do redis.call('ZREM', KEYS[3 + s], id) end
  if raw then
    local ok, job = pcall(cjson.decode, raw)
    if ok and type(job) == 'table' then
      local at = string.format('%.17g', tonumber(job.created_at) or 0)
      redis.call('ZADD', KEYS[2], at, id)
      for s = 1, nstates do
        if ARGV[s] == job.state then redis.call('ZADD', KEYS[3 + s], at, id) end
      end
      redis.call('HSET', KEYS[3], id, id .. '\0' .. tostring(job.study_uid or '') .. '\0'
                 .. tostring(job.rule or ''))
      indexed = indexed + 1
    end
  else
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
return indexed
"""

_REDIS_PUT_LUA = r"""
-- KEYS: the records' hash, the all-jobs zset, the search-text hash, one zset per state
-- ARGV: id, record, created_at, the number of its state (1 = the first state zset), text,
-- and optionally the record expected there now (nothing is written, and 0 returned, if not)
if #ARGV >= 6 and redis.call('HGET', KEYS[1], 'job:' .. ARGV[1]) ~= ARGV[6] then
  return 0
end
redis.call('HSET', KEYS[1], 'job:' .. ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local mine = 3 + tonumber(ARGV[4])
for s = 4, #KEYS do
  if s == mine then redis.call('ZADD', KEYS[s], ARGV[3], ARGV[1])
  else redis.call('ZREM', KEYS[s], ARGV[1]) end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
return 1
"""

_REDIS_SEARCH_LUA = r"""
-- KEYS: a zset of job ids, the search-text hash; ARGV: start, stop, text
-- Returns how many ids the range held, then those whose search text contains the text.
local ids = redis.call('ZREVRANGE', KEYS[1], ARGV[1], ARGV[2])
local out = {#ids}
if #ids == 0 then return out end
local texts = redis.call('HMGET', KEYS[2], unpack(ids))
for i = 1, #ids do
  local t = texts[i]
  if t and string.find(t, ARGV[3], 1, true) then out[#out + 1] = ids[i] end
end
return out
"""


class _RedisIndex:
    """Sorted sets per Huey name, beside the records in Huey's results hash:
    ``synthnode.jobs.<name>`` (every job id, scored by created_at) and
    ``synthnode.jobs.<name>.<state>``; ``synthnode.jobs.<name>.text`` holds each id's search
    text. Equal scores sort by id, as the listing wants.

    Text search walks the candidates newest first in chunks of :attr:`text_chunk`, filtered by
    a Lua script (Redis is held a few milliseconds per chunk), and stops after
    :attr:`text_scan_limit` candidates: with more jobs of that state than that, a text search
    pages and counts among the newest ``text_scan_limit`` of them only. The console's request
    stays bounded whatever the store holds."""

    text_chunk = 2000
    text_scan_limit = 100_000
    build_chunk = 500

    def __init__(self, storage: RedisStorage) -> None:
        self.storage = storage
        self.conn = storage.conn
        self.records = storage.result_key
        prefix = f"synthnode.jobs.{storage.name}"
        self.all_key = prefix
        self.text_key = prefix + ".text"
        self.built_key = prefix + ".built"
        self.state_keys = {s: f"{prefix}.{s.value}" for s in JobState}
        self._script = self.conn.register_script(_REDIS_INDEX_LUA)
        self._search = self.conn.register_script(_REDIS_SEARCH_LUA)
        self._put = self.conn.register_script(_REDIS_PUT_LUA)
        self._put_keys = [self.records, self.all_key, self.text_key, *self.state_keys.values()]
        self._state_number = {s: n for n, s in enumerate(self.state_keys, start=1)}
        self._ready = False

    def _ensure(self) -> None:
        """Index the records written before the index (once per Huey name)."""
        if self._ready:
            return
        if not self.conn.exists(self.built_key):
            ids = [k[len(_JOB):] for k in (
                key.decode() if isinstance(key, bytes) else str(key)
                for key in self.conn.hkeys(self.records)) if k.startswith(_JOB)]
            self.reindex(ids)
            self.conn.set(self.built_key, str(time.time()))
        self._ready = True

    def reindex(self, job_ids: Sequence[str]) -> int:
        """Index ``job_ids`` from their records (each chunk read and indexed atomically, so a
        put between chunks is never undone); how many were found."""
        keys = [self.records, self.all_key, self.text_key, *self.state_keys.values()]
        states = [s.value for s in self.state_keys]
        found = 0
        for i in range(0, len(job_ids), self.build_chunk):
            found += int(self._script(keys=keys, args=[*states,
                                                         *job_ids[i:i + self.build_chunk]]))
        return found

    def put(self, job: Job, expected: bytes | None = None) -> bool:
        """The record and its index entries in one atomic script call (like MULTI/EXEC, and
        half its cost on this hot path: one command, one reply); with ``expected``, only if
        the record is that now. Whether it was written. No :meth:`_ensure` here: a store not
        indexed yet gets every record indexed when it is first read."""
        args: list[Any] = [job.id, job.to_json(), repr(job.created_at),
                           self._state_number[job.state],
                           f"{job.id}\0{job.study_uid}\0{job.rule}"]
        if expected is not None:
            args.append(expected)
        return bool(self._put(keys=self._put_keys, args=args))

    def delete(self, job_id: str) -> None:
        pipe = self.conn.pipeline(transaction=True)
        pipe.hdel(self.records, _JOB + job_id, _BEAT + job_id)
        pipe.zrem(self.all_key, job_id)
        for key in self.state_keys.values():
            pipe.zrem(key, job_id)
        pipe.hdel(self.text_key, job_id)
        pipe.execute()

    def _key(self, state: JobState | None) -> str:
        return self.all_key if state is None else self.state_keys[state]

    def _matching(self, state: JobState | None, text: str) -> Iterator[str]:
        """Ids of ``state`` whose id, study UID or rule contains ``text``, newest first, among
        the newest :attr:`text_scan_limit`: filtered inside Redis, one short script call per
        :attr:`text_chunk` candidates (the search text joins the fields with NUL, which a
        search text cannot hold)."""
        if "\0" in text:
            return
        key = self._key(state)
        for start in range(0, self.text_scan_limit, self.text_chunk):
            stop = min(start + self.text_chunk, self.text_scan_limit) - 1
            found = self._search(keys=[key, self.text_key], args=[start, stop, text])
            yield from (i.decode() for i in found[1:])
            if int(found[0]) < stop - start + 1:
                return

    def page(self, state: JobState | None, offset: int, limit: int,
             text: str) -> list[bytes]:
        self._ensure()
        if limit == 0:
            return []
        if text:
            ids: list[str] = []
            for n, job_id in enumerate(self._matching(state, text)):
                if n >= offset + limit:
                    break
                if n >= offset:
                    ids.append(job_id)
        else:
            ids = [i.decode() for i in self.conn.zrevrange(self._key(state), offset,
                                                           offset + limit - 1)]
        if not ids:
            return []
        values = self.conn.hmget(self.records, [_JOB + i for i in ids])
        return [v for v in values if v is not None]

    def ids_of(self, state: JobState, created_before: float | None) -> list[str]:
        self._ensure()
        top = "+inf" if created_before is None else f"({created_before!r}"
        return [i.decode() for i in self.conn.zrangebyscore(self.state_keys[state], "-inf",
                                                             top)]

    def count(self, state: JobState | None, text: str) -> int:
        self._ensure()
        if text:
            return sum(1 for _ in self._matching(state, text))
        return int(self.conn.zcard(self._key(state)))

    def count_by_state(self) -> dict[JobState, int]:
        self._ensure()
        pipe = self.conn.pipeline(transaction=False)
        for key in self.state_keys.values():
            pipe.zcard(key)
        return {s: int(n) for s, n in zip(self.state_keys, pipe.execute(), strict=True)}
