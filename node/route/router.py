"""The router: a stable study in, its jobs on the queues out (the spool's hand-off).

For each series, the rules that apply (:func:`~node.route.rules.evaluate`); for each (rule,
task), one job with a deterministic id, submitted to its queue. Idempotent: the same study and
revision name the same jobs, and jobs already made for them are not made again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.archives import SPOOL, Source
from node.config import RuleTask, Settings
from node.dicom import own_output
from node.jobs import Job, Queues, job_id
from node.route.rules import SeriesFacts, evaluate, facts_of

log = logging.getLogger(__name__)


class InstanceLike(Protocol):
    @property
    def series_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...


class StudyLike(Protocol):
    """What the router needs of a stable study (the spool's ``StableStudy``): files are
    ``path/<series UID>/<SOP Instance UID>.dcm``."""

    @property
    def study_uid(self) -> str: ...
    @property
    def revision(self) -> int: ...
    @property
    def path(self) -> Path: ...
    @property
    def aets(self) -> Mapping[str, tuple[str, str]]: ...
    @property
    def instances(self) -> Sequence[InstanceLike]: ...


@dataclass(frozen=True)
class Submitted:
    """What became of a study: the ids of its jobs (none: no rule matched) and why."""

    job_ids: tuple[str, ...]
    note: str


class Router:
    """Applies ``[[rules]]`` to stable studies and submits their jobs."""

    def __init__(self, settings: Settings, queues: Queues) -> None:
        self.settings = settings
        self.queues = queues

    def on_stable(self, study: StudyLike) -> Submitted:
        """Route ``study`` and submit its jobs; return quickly (workers do the work)."""
        members: dict[tuple[str, str], list[tuple[Path, str]]] = {}
        for row in study.instances:  # the index knows the series: one header read per series
            members.setdefault((study.study_uid, row.series_uid), []).append(
                (study.path / row.series_uid / f"{row.sop_instance_uid}.dcm",
                 row.sop_instance_uid))
        scan = facts_of(members, study.aets)
        for bad in scan.unreadable:
            log.warning("study %s: spooled file %s skipped by the router: %s",
                        study.study_uid, bad.path.name, bad.reason)
        return self.submit(study.study_uid, study.revision, scan.series)

    def submit(self, study_uid: str, revision: int, series: Sequence[SeriesFacts],
               source: Source = SPOOL, via: str = "") -> Submitted:
        """Apply the rules to ``series`` of one study and submit the jobs, whose workers read
        the study from ``source``; ``via`` names how the study came when its facts don't (for
        ``[rules.match] source``: "orthanc", "backfill")."""
        if via:
            series = [dataclasses.replace(s, source=via) for s in series]
        manufacturer = self.settings.output.manufacturer
        own = [s for s in series if own_output(s.header, manufacturer)]
        if own:
            # The node's outputs sent back to it (an auto-forward, a C-MOVE to it): never made
            # into anything again, or a synthetic of a synthetic follows, in a loop.
            series = [s for s in series if s not in own]
            log.info("study %s: %d series are synthnode's own outputs (Contributing Equipment "
                     'by "%s" with the node\'s mark): not routed again', study_uid, len(own),
                     manufacturer)
            if not series:
                return Submitted((), f"own outputs ({len(own)} series): not routed again")
        jobs: list[Job] = []
        rules_used: list[str] = []
        for evaluation in evaluate(self.settings.rules, self.settings.route.mode, series):
            for rule, series_uids in evaluation.applied():
                rules_used.append(rule.name)
                for index, task in enumerate(rule.tasks):
                    jobs.append(make_job(study_uid, revision, rule.name, index, task,
                                         series_uids,
                                         tuple(task.destinations or rule.destinations),
                                         source))
        for job in jobs:
            self.queues.submit(job)
        if jobs:
            note = f"{len(jobs)} jobs from rules {', '.join(rules_used)}"
        else:
            note = "no rule matched: nothing made of this study"
        log.info("study stable study_uid=%s revision=%d series=%d: %s", study_uid,
                 revision, len(series), note)
        return Submitted(tuple(j.id for j in jobs), note)


def make_job(study_uid: str, revision: int, rule: str, index: int, task: RuleTask,
             series_uids: tuple[str, ...], destinations: tuple[str, ...],
             source: Source = SPOOL) -> Job:
    """The job of task ``index`` of ``rule`` on these series of one study, read from
    ``source``."""
    return Job(
        id=job_id(study_uid, rule, index, task.task.value),
        study_uid=study_uid, revision=revision, rule=rule, task_index=index, task=task,
        queue=task.task.queue, series_uids=series_uids, destinations=destinations,
        source=source,
    )
