"""The reaper: running jobs whose worker stopped beating are retried; old done and rejected jobs
forgotten, with the outputs they kept.

Huey removes a message when a worker takes it, so a worker killed mid-job takes the message
with it; its job record still says running, and its heartbeat stops. ``serve`` calls
:meth:`Reaper.tick` every ``[spool] check_interval_s``.
"""

from __future__ import annotations

import logging
import shutil

from node.config import JobsSettings
from node.jobs.manifest import rejected_dir
from node.jobs.queue import Queues
from node.jobs.state import JobState

log = logging.getLogger(__name__)


class Reaper:
    """Finds jobs lost with their worker and puts them back on their queue."""

    def __init__(self, settings: JobsSettings, queues: Queues) -> None:
        self.settings = settings
        self.queues = queues

    def tick(self, now: float) -> int:
        """One pass; returns how many lost jobs were retried (or dead-lettered)."""
        store = self.queues.store
        keep = self.settings.keep_done_s
        # Through the job store's index: done jobs created before the horizon (updated_at is
        # never before created_at), and running jobs, not every record on every pass.
        work = self.settings.work_dir
        for job in store.of_state(JobState.DONE, created_before=now - keep):
            if now - job.updated_at > keep:
                shutil.rmtree(rejected_dir(work, job.id), ignore_errors=True)
                store.delete(job.id)
        keep = self.settings.keep_rejected_s
        for job in store.of_state(JobState.REJECTED, created_before=now - keep):
            if now - (job.decided_at or job.updated_at) > keep:
                # (outputs a reviewer refused, and a forward's copies of its originals, are
                # not kept for ever; the audit trail keeps the decision)
                shutil.rmtree(work / job.id, ignore_errors=True)
                shutil.rmtree(rejected_dir(work, job.id), ignore_errors=True)
                store.delete(job.id)
                self.queues.audit(job, "node", "purged", action="keep_rejected_s passed")
                log.info("job %s: rejected %.0f days ago; its staged outputs and record "
                         "removed", job.id, (now - (job.decided_at or job.updated_at)) / 86400)
        lost = 0
        for job in store.of_state(JobState.RUNNING):
            beat = store.heartbeat(job.id)
            last = beat.at if beat is not None else job.updated_at
            if now - last < self.settings.heartbeat_timeout_s:
                continue
            current = store.get(job.id)  # it may have finished since the listing
            if current is None or current.state is not JobState.RUNNING or (
                current.attempts != job.attempts
            ):
                continue
            store.clear_beat(job.id)
            self.queues.fail(current, f"worker {current.worker} stopped (no heartbeat for "
                                      f"{now - last:.0f} s)")
            lost += 1
        return lost
