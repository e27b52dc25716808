"""Backfill: the studies a clinical archive already holds, routed into jobs like new ones.

``synthnode mirror backfill --from NAME --since DATE [--until DATE]`` finds the studies of the
archive ``NAME`` (any searchable kind: an Orthanc, ``orthanc`` for ``[orthanc]``; a PACS by
C-FIND; a DICOMweb server by QIDO-RS) by Study Date, oldest first, and routes each with source
``backfill``. The rules see one stand-in header per series, as the archive's
:meth:`~node.archives.Archive.series` gives it (an Orthanc or a DICOMweb server: a real header;
a PACS: the series-level C-FIND answer, with Modality, Series Description, Body Part
Examined); the workers fetch the series from the archive.

Resumable: each study gets a marker (``backfill:<source>:<study id>``) with the jobs made of it
and its instance count, which is also the jobs' revision. A re-run skips studies whose jobs
are done for that many instances, re-submits the others (jobs already queued or running are
left alone), and routes a study again when it has gained instances since. Job ids and output
UIDs are deterministic, so nothing reaches the research archive twice.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from node.archives import ArchiveError, FoundStudy, Source, SourceKind, StudyGone, open_archive
from node.config import Settings
from node.dicom import own_output
from node.jobs import Job, JobState, Queues
from node.route.router import Router
from node.route.rules import SeriesFacts

log = logging.getLogger(__name__)

MARKER = "backfill:"


class Step(StrEnum):
    """What backfill did with one study."""

    QUEUED = "queued"
    """Its jobs were submitted (the first time, or again after an interruption)."""

    DONE = "done"
    """Its jobs were done already, for as many instances as it has now: skipped."""

    OWN_OUTPUT = "own-output"
    """It holds only the node's outputs: not mirrored."""

    GONE = "gone"
    """It disappeared from the archive between the search and its turn."""


@dataclass
class Walk:
    """What one backfill run found and did."""

    steps: dict[str, Step] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)

    def count(self, step: Step) -> int:
        return sum(1 for s in self.steps.values() if s is step)


class BackfillError(Exception):
    """The source cannot be walked (unknown name, a kind that cannot be searched,
    unreachable)."""


class Backfill:
    """Walks one archive's studies by date and routes them: one loop, whatever the kind."""

    def __init__(self, settings: Settings, queues: Queues, source: str) -> None:
        self.source = source
        self.queues = queues
        try:
            self.archive = open_archive(source, settings)
        except (KeyError, ArchiveError) as exc:
            raise BackfillError(str(exc.args[0])) from None
        if not self.archive.searchable:
            self.archive.close()
            raise BackfillError(f'"{source}" is a {self.archive.kind.value} destination, '
                                "which cannot be searched")
        self.kind = SourceKind(self.archive.kind.value)
        self.settings = settings
        self.router = Router(settings, queues)

    def close(self) -> None:
        self.archive.close()

    def find(self, since: datetime.date, until: datetime.date | None = None
             ) -> list[FoundStudy]:
        """The studies with a Study Date in [since, until], oldest first."""
        try:
            return self.archive.find(since, until)
        except ArchiveError as exc:
            raise BackfillError(str(exc)) from None

    def step(self, study: FoundStudy) -> tuple[Step, tuple[str, ...]]:
        """Route one study unless its jobs are done already; (what happened, its job ids)."""
        key = f"{MARKER}{self.source}:{study.key}"
        marker = self.queues.store.get_record(key)
        try:
            # (a study counted cheaply and done already is skipped without reading its series)
            instances = study.instances or self.archive.count(study)
            if instances and (done := self._done(marker, instances)) is not None:
                return done
            series = self.archive.series(study)
        except StudyGone:
            return Step.GONE, ()
        except ArchiveError as exc:
            raise BackfillError(str(exc)) from None
        if not instances:
            instances = sum(s.instances for s in series)
            if (done := self._done(marker, instances)) is not None:
                return done
        facts = [SeriesFacts(study.study_uid or str(s.header.get("StudyInstanceUID", "")),
                             s.series_uid, s.header, calling_aet=s.calling_aet,
                             called_aet=s.called_aet)
                 for s in series
                 if not (s.own or own_output(s.header, self.settings.output.manufacturer))]
        if facts:
            log.debug("backfill from %s: study %s: %d series, %d the node's own",
                      self.source, facts[0].study_uid, len(series), len(series) - len(facts))
            routed = self.router.submit(facts[0].study_uid, instances, facts,
                                        Source(self.kind, self.source, study.key),
                                        via="backfill")
            step, ids = Step.QUEUED, routed.job_ids
        else:
            log.info("backfill from %s: study %s holds only synthnode outputs (%d series); "
                     "not routed", self.source, study.key, len(series))
            step, ids = Step.OWN_OUTPUT, ()
        self.queues.store.put_record(key, {"state": step.value, "instances": instances,
                                           "jobs": list(ids), "at": time.time()})
        return step, ids

    def _done(self, marker: dict[str, Any] | None, instances: int
              ) -> tuple[Step, tuple[str, ...]] | None:
        """What the marker says when the study's jobs are done for ``instances`` (or it holds
        only the node's outputs); None when it must be routed (again)."""
        if marker is None or _instances(marker) < instances:
            return None
        if marker.get("state") == Step.OWN_OUTPUT:
            return Step.OWN_OUTPUT, ()
        ids = tuple(marker.get("jobs", ()))
        jobs = self.queues.store.get_many(ids)
        if all(j in jobs and jobs[j].state is JobState.DONE for j in ids):
            return Step.DONE, ids
        return None

    def walk(self, studies: list[FoundStudy],
             progress: Callable[[FoundStudy, Step], None] | None = None) -> Walk:
        walk = Walk()
        for study in studies:
            step, ids = self.step(study)
            walk.steps[study.key] = step
            walk.jobs.extend(ids)
            if progress is not None:
                progress(study, step)
        log.info("backfill from %s: %d studies: %d queued, %d done already, %d own outputs, "
                 "%d gone", self.source, len(studies), walk.count(Step.QUEUED),
                 walk.count(Step.DONE), walk.count(Step.OWN_OUTPUT), walk.count(Step.GONE))
        return walk


def _instances(marker: dict[str, Any]) -> int:
    """The instance count a marker was made for (``generation`` in markers of 0.1)."""
    return int(marker.get("instances", marker.get("generation", 0)))


def follow(queues: Queues, job_ids: list[str], interval_s: float = 0.2
           ) -> Iterator[dict[str, Job]]:
    """The jobs' records, again every ``interval_s``, until none is pending or running."""
    while True:
        jobs = queues.store.get_many(job_ids)
        yield jobs
        if all(j.state in (JobState.DONE, JobState.DEAD) for j in jobs.values()):
            return
        time.sleep(interval_s)
