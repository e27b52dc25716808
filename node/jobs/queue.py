"""The queues: Huey, on SQLite (embedded, no server) or Redis (several machines), one code path.

Three Huey namespaces share one backend: ``<name>-cpu`` (de-identify, forward), ``<name>-gpu``
(generation) and ``<name>-jobs``, whose key-value space holds the job records
(:mod:`node.jobs.state`). A message carries only a job id; what to do is in the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from huey import Huey, RedisHuey, SqliteHuey
from huey.api import TaskWrapper

from node.audit import AuditError, AuditTrail
from node.config import JobsSettings, Queue, QueueBackend
from node.jobs.state import Job, JobState, JobStore

log = logging.getLogger(__name__)

TASK_NAME = "synthnode.run_job"


def make_huey(settings: JobsSettings, suffix: str) -> Huey:
    """The Huey instance for one namespace of the configured backend."""
    name = f"{settings.name}-{suffix}"
    if settings.backend is QueueBackend.REDIS:
        return RedisHuey(name, url=settings.redis_url, results=False, utc=True)
    settings.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name, filename=str(settings.sqlite_file), results=False, utc=True,
                      fsync=True, timeout=30)


class Queues:
    """The cpu and gpu queues and the job store of one backend.

    ``run`` is what a worker process executes for a job id (its consumer's task body);
    producers (the router, the ``jobs`` command) leave it unset."""

    def __init__(self, settings: JobsSettings, run: Callable[[str], None] | None = None,
                 trail: AuditTrail | None = None) -> None:
        self.settings = settings
        self.run = run
        self.trail = trail
        """Where job state changes are recorded (node.audit; None: not recorded)."""
        self.huey = {q: make_huey(settings, q) for q in Queue}
        self.store = JobStore(make_huey(settings, "jobs").storage)
        self._tasks: dict[Queue, TaskWrapper] = {
            q: h.task(name=TASK_NAME)(self.run_job) for q, h in self.huey.items()
        }

    def run_job(self, job_id: str) -> None:
        """The one Huey task (registered under :data:`TASK_NAME` in producers and consumers
        alike): hands the job id to ``run``."""
        if self.run is None:
            raise RuntimeError("this process enqueues jobs; it does not run them: pass run= "
                               "to Queues in a worker")
        self.run(job_id)

    def enqueue(self, job: Job, delay_s: float = 0.0) -> None:
        """Put ``job``'s id on its queue, now or after ``delay_s`` (Huey's schedule)."""
        task = self._tasks[job.queue]
        if delay_s > 0:
            task.schedule(args=(job.id,), delay=delay_s)
        else:
            task(job.id)

    def submit(self, job: Job) -> bool:
        """Record ``job`` as pending and enqueue it, unless the same job was already made for
        this revision of its study (running, done, dead, or waiting for a retry). Returns
        whether it was enqueued."""
        existing = self.store.get(job.id)
        if existing is not None and existing.revision >= job.revision and (
            existing.state is not JobState.PENDING or existing.not_before > time.time()
        ):
            return False
        self.store.put(job)
        self.enqueue(job)
        self.audit(job, "node", "pending", revision=job.revision, queue=job.queue.value)
        log.info("job %s queued on %s: %s of rule %s, study %s revision %d", job.id,
                 job.queue, job.kind, job.rule, job.study_uid, job.revision)
        return True

    def fail(self, job: Job, reason: str, permanent: bool = False) -> Job:
        """Record a failed attempt of ``job``: pending again after a backoff (exponential from
        ``backoff_initial_s``, capped at ``backoff_max_s``), or dead when ``permanent`` or after
        the last attempt. Returns the new record."""
        s = self.settings
        if permanent or job.attempts >= s.max_attempts:
            why = "permanent failure" if permanent else f"{job.attempts} attempts"
            dead = job.but(state=JobState.DEAD, last_error=reason)
            self.store.put(dead)
            self.audit(dead, "node", "dead", reason=reason)
            log.error("job %s dead (%s): %s", job.id, why, reason)
            return dead
        delay = min(s.backoff_initial_s * 2 ** max(0, job.attempts - 1), s.backoff_max_s)
        again = job.but(state=JobState.PENDING, last_error=reason,
                        not_before=time.time() + delay)
        self.store.put(again)
        self.enqueue(again, delay)
        self.audit(again, "node", "pending", reason=reason)
        log.warning("job %s attempt %d failed, retry in %.0f s: %s", job.id, job.attempts,
                    delay, reason)
        return again

    def postpone(self, job: Job, delay_s: float, reason: str) -> Job:
        """Put ``job`` back as pending for ``delay_s`` with its attempts as they are: a job
        that could not start (the disk below the reserve) has not failed. Returns the new
        record."""
        again = job.but(state=JobState.PENDING, last_error=reason,
                        not_before=time.time() + delay_s)
        self.store.put(again)
        self.enqueue(again, delay_s)
        return again

    def retry(self, job_id: str, user: str = "") -> Job:
        """Re-queue a job by hand (``synthnode jobs retry``, the console): attempts start
        again. KeyError when there is no such job."""
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(f'no job "{job_id}"')
        job = job.but(state=JobState.PENDING, attempts=0, not_before=0.0)
        self.store.put(job)
        self.enqueue(job)
        self.audit(job, user or "node", "pending", action="retry")
        log.info("job %s re-queued by hand on queue %s", job.id, job.queue)
        return job

    # -- the review gate ---------------------------------------------------------------------

    def _in_review(self, job_id: str, revision: int | None = None) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(f'no job "{job_id}"')
        if job.state is not JobState.REVIEW:
            raise ValueError(f"job {job_id} is {job.state.value}, not waiting for review")
        if revision is not None and job.revision != revision:
            raise ValueError(f"job {job_id} was staged again for revision {job.revision} of its "
                             f"study (more instances arrived) after revision {revision} was "
                             "shown: look at it again")
        return job

    def approve(self, job_id: str, user: str, reason: str = "",
                revision: int | None = None) -> Job:
        """A reviewer approves ``job_id``'s staged outputs: it is queued again and delivers
        them (made once; not made again). KeyError for an unknown job, ValueError when it is
        not waiting for review."""
        job = self._in_review(job_id, revision).but(
            state=JobState.PENDING, approved=True, decided_by=user, decision_reason=reason,
            decided_at=time.time(), not_before=0.0)
        self.store.put(job)
        self.enqueue(job)
        self.audit(job, user, "approved", event="review", decision="approve", reason=reason)
        log.info("job %s approved by %s: queued for delivery", job.id, user)
        return job

    def reject(self, job_id: str, user: str, reason: str, revision: int | None = None) -> Job:
        """A reviewer rejects ``job_id``'s staged outputs: never delivered, kept in the work
        folder with ``reason`` (required)."""
        if not reason.strip():
            raise ValueError("a rejection needs a reason")
        job = self._in_review(job_id, revision).but(
            state=JobState.REJECTED, decided_by=user, decision_reason=reason,
            decided_at=time.time())
        self.store.put(job)
        self.audit(job, user, "rejected", event="review", decision="reject", reason=reason)
        log.info("job %s rejected by %s", job.id, user)
        return job

    def audit(self, job: Job, actor: str, state: str, event: str = "job",
              **data: object) -> None:
        """One audit record of ``job``'s change (logged, not raised, when it cannot be
        written)."""
        if self.trail is None:
            return
        try:
            self.trail.record(event, actor, job.id, state=state, rule=job.rule,
                              task=job.kind, study=job.study_uid, **data)
        except AuditError as exc:
            log.error("job %s: audit record not written: %s", job.id, exc)

    def sizes(self) -> dict[Queue, int]:
        """Messages waiting per queue (scheduled retries not counted)."""
        return {q: h.pending_count() for q, h in self.huey.items()}
