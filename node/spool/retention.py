"""Retention: a study leaves the spool once every job made of it is done.

Handed studies whose jobs are all done (for their generation) become done, or unrouted when no
rule matched; ``[spool] retention_s`` later their files are removed. A dead job keeps its study
until it is retried and done.
"""

from __future__ import annotations

import logging

from node.jobs import JobState, JobStore
from node.spool.spool import Spool

log = logging.getLogger(__name__)


class Retention:
    """Marks studies done as their jobs finish, and removes them after retention."""

    def __init__(self, spool: Spool, store: JobStore) -> None:
        self.spool = spool
        self.store = store

    def tick(self, now: float) -> None:
        self.finish(now)
        self.clean(now)

    def finish(self, now: float) -> None:
        """Studies whose jobs are all done for their generation become done."""
        for study_uid, generation, ids in self.spool.index.handed():
            found = self.store.get_many(ids)
            if all(j in found and found[j].state is JobState.DONE
                   and found[j].generation >= generation for j in ids
                   ) and self.spool.index.mark_done(study_uid, generation, now):
                log.info("study %s generation %d: all %d jobs done", study_uid, generation,
                         len(ids))

    def clean(self, now: float) -> None:
        """Remove the files of studies done for longer than ``retention_s``."""
        for study_uid, generation in self.spool.index.removable(
            now - self.spool.settings.retention_s
        ):
            removed = self.spool.remove_study(study_uid, generation)
            log.info("study %s generation %d: %d files removed from the spool after retention",
                     study_uid, generation, removed)
