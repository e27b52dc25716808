"""The queues: Huey, on SQLite (embedded, no server) or Redis (several machines), one code path.

Three Huey namespaces share one backend: ``<name>-cpu`` (de-identify, forward), ``<name>-gpu``
(generation) and ``<name>-jobs``, whose key-value space holds the job records
(:mod:`node.jobs.state`). A message carries only a job id; what to do is in the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from huey import Huey, RedisHuey, SqliteHuey
from huey.api import TaskWrapper

from node.audit import AuditError, AuditTrail
from node.config import JobsSettings, Queue, QueueBackend
from node.jobs.state import Job, JobState, JobStore, SeriesDecision

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

    def _in_review(self, job_id: str, revision: int | None = None) -> tuple[bytes, Job]:
        """The job's record as stored (for :meth:`_decided`) and the job, checked to be in
        review at ``revision`` (the one the reviewer was shown, when given)."""
        found = self.store.get_raw(job_id)
        if found is None:
            raise KeyError(f'no job "{job_id}"')
        raw, job = found
        if job.state is not JobState.REVIEW:
            raise ValueError(f"job {job_id} is {job.state.value}, not waiting for review")
        if revision is not None and job.revision != revision:
            raise ValueError(f"job {job_id} was staged again for revision {job.revision} of its "
                             f"study (more instances arrived) after revision {revision} was "
                             "shown: look at it again")
        return raw, job

    def _decided(self, raw: bytes, job: Job) -> None:
        """Store a decision only over the record it was made on: a second reviewer, or the
        job staged again meanwhile, makes it fail rather than both taking effect."""
        if not self.store.swap(raw, job):
            now = self.store.get(job.id)
            state = "gone" if now is None else now.state.value
            raise ValueError(f"job {job.id} changed while you decided (it is {state} now, "
                             "decided by someone else or staged again): look at it again")

    def approve(self, job_id: str, user: str, reason: str = "",
                revision: int | None = None) -> Job:
        """A reviewer approves ``job_id``'s staged outputs: it is queued again and delivers
        them (made once; not made again), less any series rejected on its own. KeyError for
        an unknown job, ValueError when it is not (or no longer) waiting for review."""
        raw, job = self._in_review(job_id, revision)
        job = self._approved(job, user, reason)
        self._decided(raw, job)
        self._release(job, user, reason)
        return job

    def _approved(self, job: Job, user: str, reason: str) -> Job:
        return job.but(state=JobState.PENDING, approved=True, decided_by=user,
                       decision_reason=reason, decided_at=time.time(), not_before=0.0)

    def _release(self, job: Job, user: str, reason: str, **data: object) -> None:
        self.enqueue(job)
        rejected = sorted(job.rejected_series)
        self.audit(job, user, "approved", event="review", decision="approve", reason=reason,
                   **({"rejected_series": rejected} if rejected else {}), **data)
        log.info("job %s approved by %s: queued for delivery%s", job.id, user,
                 f" ({len(rejected)} series rejected)" if rejected else "")

    def reject(self, job_id: str, user: str, reason: str, revision: int | None = None) -> Job:
        """A reviewer rejects ``job_id``'s staged outputs: never delivered, kept in the work
        folder with ``reason`` (required)."""
        if not reason.strip():
            raise ValueError("a rejection needs a reason")
        raw, job = self._in_review(job_id, revision)
        job = job.but(state=JobState.REJECTED, decided_by=user, decision_reason=reason,
                      decided_at=time.time())
        self._decided(raw, job)
        self._rejected(job, user, reason)
        return job

    def _rejected(self, job: Job, user: str, reason: str, **data: object) -> None:
        self.audit(job, user, "rejected", event="review", decision="reject", reason=reason,
                   **data)
        log.info("job %s rejected by %s", job.id, user)

    def decide_series(self, job_id: str, series_uid: str, approve: bool, user: str,
                      reason: str, series: Collection[str],
                      revision: int | None = None) -> Job:
        """A reviewer decides on the outputs made from one source series ``series_uid`` of
        ``job_id`` (``series``: all the series its outputs come from). The job stays in review
        until each of them is decided; then it is approved (delivering the approved series
        only) or, every series rejected, rejected. ValueError for a series the outputs do not
        come from, or a rejection without a reason."""
        if not approve and not reason.strip():
            raise ValueError("a rejection needs a reason")
        if series_uid not in series:
            raise ValueError(f"job {job_id} holds no outputs of series {series_uid}")
        raw, job = self._in_review(job_id, revision)
        job = job.with_series_decision(SeriesDecision(series_uid, approve, user, reason,
                                                      time.time()))
        verb, decision = ("approved", "approve") if approve else ("rejected", "reject")
        open_series = [s for s in series if job.series_decision(s) is None]
        if open_series:
            self._decided(raw, job)
            self.audit(job, user, "review", event="review", decision=decision,
                       reason=reason, series=series_uid, undecided=len(open_series))
            log.info("job %s: series %s %s by %s; %d series to decide", job.id, series_uid,
                     verb, user, len(open_series))
            return job
        if any(job.series_decision(s).approve for s in series):  # type: ignore[union-attr]
            job = self._approved(job, user, "")
            self._decided(raw, job)
            self._release(job, user, reason, series=series_uid, series_decision=decision)
        else:
            job = job.but(state=JobState.REJECTED, decided_by=user, decision_reason=reason,
                          decided_at=time.time())
            self._decided(raw, job)
            self._rejected(job, user, reason, series=series_uid)
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
