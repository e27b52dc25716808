"""Retention: a study leaves the spool once every job made of it is done.

Handed studies whose jobs are all done (for their revision) become done, or unrouted when no
rule matched; ``[spool] retention_s`` later their files are removed. A dead job keeps its study
until it is retried and done. Retention asks the jobs stage through :class:`JobLedger`, which
``serve`` gives it (the job store), and runs on ``serve``'s schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from node.spool.spool import Spool

log = logging.getLogger(__name__)


class JobLedger(Protocol):
    """What retention asks of the stage that runs a study's jobs."""

    def all_done(self, job_ids: Sequence[str], revision: int) -> bool:
        """Whether every one of ``job_ids`` is done, for ``revision`` of its study or a
        later one (a job that is unknown, pending, running or dead is not)."""
        ...


class Retention:
    """Marks studies done as their jobs finish, and removes them after retention."""

    def __init__(self, spool: Spool, jobs: JobLedger) -> None:
        self.spool = spool
        self.jobs = jobs

    def tick(self, now: float) -> None:
        self.finish(now)
        self.clean(now)

    def finish(self, now: float) -> None:
        """Studies whose jobs are all done for their revision become done."""
        for study_uid, revision, ids in self.spool.index.handed():
            if self.jobs.all_done(ids, revision) and self.spool.index.mark_done(
                    study_uid, revision, now):
                log.info("study %s revision %d: all %d jobs done", study_uid, revision,
                         len(ids))

    def clean(self, now: float) -> None:
        """Remove the files of studies done for longer than ``retention_s``."""
        for study_uid, revision in self.spool.index.removable(
            now - self.spool.settings.retention_s
        ):
            removed = self.spool.remove_study(study_uid, revision)
            log.info("study %s revision %d: %d files removed from the spool after retention",
                     study_uid, revision, removed)
