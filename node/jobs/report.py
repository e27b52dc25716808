"""``synthnode mirror status``: per day, what was mirrored, quarantined and failed, and why.

Built from the job records of the jobs whose outputs may go to a research archive
(de-identification and synthesis: :data:`MIRRORED`), by the day (UTC) a job last changed.
Reasons carry no UIDs (so that they group) and no patient data (the records never hold any);
they keep their numbers (a copy check's score).
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from node.config import SYNTHESIS_TASKS, TaskKind
from node.jobs.state import Job, JobState

MIRRORED = frozenset({TaskKind.DEIDENTIFY.value, *(t.value for t in SYNTHESIS_TASKS)})
"""Job kinds the mirror status counts: what makes de-identified or synthetic outputs."""

_UID_PREFIX = re.compile(r"^[^\s:]+: ")  # the instance a note is about
_UIDS = re.compile(r"\b\d+(?:\.\d+){3,}\b")


@dataclass
class Day:
    """One day of the mirror."""

    day: datetime.date
    studies: int = 0
    """Studies whose de-identified (or synthetic) counterparts were delivered."""
    instances: int = 0
    quarantined: int = 0
    """Instances set aside (never sent)."""
    failed: int = 0
    """Jobs dead after their last attempt."""
    waiting: int = 0
    """Jobs pending or running."""
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    failure_reasons: Counter[str] = field(default_factory=Counter)


def _reason(text: str) -> str:
    return _UIDS.sub("<uid>", _UID_PREFIX.sub("", text))


def by_day(jobs: Iterable[Job], tasks: Collection[str] = MIRRORED) -> list[Day]:
    """The days on which jobs of the kinds ``tasks`` changed, newest first."""
    days: dict[datetime.date, Day] = {}
    studies: dict[datetime.date, set[str]] = {}
    for job in jobs:
        if job.kind not in tasks:
            continue
        when = datetime.datetime.fromtimestamp(job.updated_at, datetime.UTC).date()
        day = days.setdefault(when, Day(when))
        if job.state is JobState.DONE:
            if job.outputs:
                studies.setdefault(when, set()).add(job.study_uid)
            day.instances += job.outputs
            day.quarantined += job.quarantined
            day.quarantine_reasons.update(_reason(n) for n in job.notes)
        elif job.state is JobState.DEAD:
            day.failed += 1
            day.failure_reasons[_reason(job.last_error)] += 1
        else:
            day.waiting += 1
    for when, uids in studies.items():
        days[when].studies = len(uids)
    return sorted(days.values(), key=lambda d: d.day, reverse=True)
