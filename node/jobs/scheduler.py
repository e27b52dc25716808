"""The scheduler (in ``synthnode serve``): stable studies become jobs, lost jobs are retried,
finished studies leave the spool.

- :meth:`Scheduler.on_stable` is the spool's hand-off: route the study, write one job record per
  (rule, task) and enqueue it. Idempotent: the same study and generation name the same jobs.
- :meth:`Scheduler.tick` (every ``[spool] check_interval_s``): re-enqueue running jobs whose
  heartbeat stopped (their worker died), mark studies whose jobs are all done, remove the files
  of done studies after ``[spool] retention_s`` and forget done jobs after ``keep_done_s``.
"""

from __future__ import annotations

import logging
import threading
import time

from node.config import RuleTask, Settings
from node.jobs.queue import Queues
from node.jobs.state import Job, JobState, job_id
from node.route import route, series_facts
from node.spool import Spool, StableStudy

log = logging.getLogger(__name__)


class Scheduler:
    """Turns stable studies into jobs and watches them until the study can leave the spool."""

    def __init__(self, settings: Settings, spool: Spool, queues: Queues) -> None:
        self.settings = settings
        self.spool = spool
        self.queues = queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-scheduler", daemon=True)

    # -- hand-off ------------------------------------------------------------------------

    def on_stable(self, study: StableStudy) -> None:
        """Route ``study`` and enqueue its jobs (the spool's StableStudyHandler)."""
        aets = self.spool.index.instance_aets(study.study_uid)
        scan = series_facts([study.path], aets)
        series = [s for s in scan.series if s.study_uid == study.study_uid]
        for bad in scan.unreadable:
            log.warning("study %s: spooled file %s skipped by the router: %s",
                        study.study_uid, bad.path.name, bad.reason)
        jobs: list[Job] = []
        rules_used = []
        for routing in route(self.settings.rules, self.settings.route.mode, series):
            for rule, series_uids in routing.applied():
                rules_used.append(rule.name)
                for index, task in enumerate(rule.tasks):
                    jobs.append(self._job(study, rule.name, index, task, series_uids,
                                          tuple(task.destinations or rule.destinations)))
        for job in jobs:
            self._submit(job)
        if jobs:
            note = f"{len(jobs)} jobs from rules {', '.join(rules_used)}"
        else:
            note = "no rule matched: nothing made of this study"
        self.spool.index.set_routed(study.study_uid, [j.id for j in jobs], note)
        log.info("study stable study_uid=%s generation=%d series=%d instances=%d: %s",
                 study.study_uid, study.generation, len(study.series_uids),
                 len(study.instances), note)

    def _job(self, study: StableStudy, rule: str, index: int, task: RuleTask,
             series_uids: tuple[str, ...], destinations: tuple[str, ...]) -> Job:
        return Job(
            id=job_id(study.study_uid, rule, index, task.task.value),
            study_uid=study.study_uid, generation=study.generation, rule=rule,
            task_index=index, task=task.model_dump(mode="json"), queue=task.task.queue,
            series_uids=series_uids, destinations=destinations,
        )

    def _submit(self, job: Job) -> None:
        store = self.queues.store
        existing = store.get(job.id)
        if existing is not None and existing.generation >= job.generation and (
            existing.state is not JobState.PENDING or existing.not_before > time.time()
        ):
            return  # already made for this generation: running, done, dead or awaiting retry
        store.put(job)
        self.queues.enqueue(job)
        log.info("job %s queued on %s: %s of rule %s, study %s generation %d", job.id,
                 job.queue, job.task["task"], job.rule, job.study_uid, job.generation)

    # -- the periodic pass ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.spool.check_interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("scheduler pass failed; retrying")

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        jobs = self.queues.store.all()
        self.reap(jobs, now)
        self.finish(now)
        self.clean(jobs, now)

    def reap(self, jobs: list[Job], now: float) -> int:
        """Retry running jobs whose worker stopped beating; returns how many."""
        timeout = self.settings.jobs.heartbeat_timeout_s
        lost = 0
        for job in jobs:
            if job.state is not JobState.RUNNING:
                continue
            beat = self.queues.store.heartbeat(job.id)
            last = beat.at if beat is not None else job.updated_at
            if now - last < timeout:
                continue
            current = self.queues.store.get(job.id)  # it may have finished since the listing
            if current is None or current.state is not JobState.RUNNING or (
                current.attempts != job.attempts
            ):
                continue
            self.queues.store.clear_beat(job.id)
            self.queues.fail(current, f"worker {current.worker} stopped (no heartbeat for "
                                      f"{now - last:.0f} s)")
            lost += 1
        return lost

    def finish(self, now: float) -> None:
        """Studies whose jobs are all done for their generation become done."""
        for study_uid, generation, ids in self.spool.index.handed():
            found = self.queues.store.get_many(ids)
            if all(j in found and found[j].state is JobState.DONE
                   and found[j].generation >= generation for j in ids
                   ) and self.spool.index.mark_done(study_uid, generation, now):
                    log.info("study %s generation %d: all %d jobs done", study_uid,
                             generation, len(ids))

    def clean(self, jobs: list[Job], now: float) -> None:
        """Remove done studies after retention; forget old done jobs."""
        for study_uid, generation in self.spool.index.removable(
            now - self.settings.spool.retention_s
        ):
            removed = self.spool.remove_study(study_uid, generation)
            log.info("study %s generation %d: %d files removed from the spool after retention",
                     study_uid, generation, removed)
        keep = self.settings.jobs.keep_done_s
        for job in jobs:
            if job.state is JobState.DONE and now - job.updated_at > keep:
                self.queues.store.delete(job.id)
