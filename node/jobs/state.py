"""Job states, kept by the node beside the queue.

Huey removes a message from its queue when a worker takes it: a worker killed mid-task takes the
message with it. So every job also has a record here (pending, running with a heartbeat, done,
dead), in the key-value store of the same Huey storage as the queues (SQLite file or Redis: one
code path), and the reaper re-enqueues running jobs whose heartbeat stopped.

Records are JSON under ``job:<id>``; heartbeats are separate keys (``hb:<id>``) so that a
heartbeat never overwrites a state change made by someone else.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from huey.constants import EmptyData
from huey.storage import BaseStorage

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

    @property
    def kind(self) -> str:
        """The task's kind, as logs and listings show it."""
        return self.task.task.value

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
    """Job records and heartbeats in a Huey storage's key-value space."""

    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage

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

    def put(self, job: Job) -> None:
        self.storage.put_data(_JOB + job.id, job.to_json())

    def delete(self, job_id: str) -> None:
        self.storage.delete_data(_JOB + job_id)
        self.storage.delete_data(_BEAT + job_id)

    def all(self) -> list[Job]:
        """Every job, oldest first."""
        jobs = [Job.from_json(v) for k, v in self.storage.result_items().items()
                if str(k).startswith(_JOB)]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def page(self, state: JobState | None = None, offset: int = 0, limit: int = 50,
             text: str = "") -> list[Job]:
        """Jobs newest first (by ``created_at``), of ``state`` (None: all), whose id, study UID
        or rule contains ``text``; ``limit`` of them from ``offset``."""
        jobs = [j for j in reversed(self.all()) if (state is None or j.state is state)
                and (not text or text in j.id or text in j.study_uid or text in j.rule)]
        return jobs[offset:offset + limit]

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 when none)."""
        counts = dict.fromkeys(JobState, 0)
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
