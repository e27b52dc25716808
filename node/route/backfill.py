"""Backfill: the studies a clinical archive already holds, routed into jobs like new ones.

``synthnode mirror backfill --from NAME --since DATE [--until DATE]`` finds the studies of
``NAME`` by Study Date, oldest first, and routes each with source ``backfill``:

- an Orthanc (a ``[[destinations]]`` entry with a ``url``, or ``orthanc`` for ``[orthanc]``):
  found with ``/tools/find``, one header per series read over REST; the workers fetch the
  series from it;
- a PACS (a ``[[destinations]]`` DICOM peer): found with C-FIND (study, then series level;
  the rules see what the series-level answer holds: Modality, Series Description, Body Part
  Examined); the workers retrieve the series with C-GET.

Resumable: each study gets a marker (``backfill:<source>:<study id>``) with the jobs made of it
and its instance count, which is also the jobs' generation. A re-run skips studies whose jobs
are done for that many instances, re-submits the others (jobs already queued or running are
left alone), and routes a study again when it has gained instances since. Job ids and output
UIDs are deterministic, so nothing reaches the research archive twice.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from orthanc_api_client import exceptions as orthanc_errors
from pydicom.dataset import Dataset

from node.archives import orthanc_client
from node.archives.qr import Peer, QueryError
from node.config import DicomDestination, Settings
from node.jobs import Job, JobState, Queues
from node.route.orthanc import OrthancStudies, StudyNotFound
from node.route.router import Routed, Router
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
    """It disappeared from the Orthanc between the search and its turn."""


@dataclass
class Walk:
    """What one backfill run found and did."""

    steps: dict[str, Step] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)

    def count(self, step: Step) -> int:
        return sum(1 for s in self.steps.values() if s is step)


class BackfillError(Exception):
    """The source cannot be walked (unknown name, not an Orthanc, unreachable)."""


class Backfill:
    """Walks one archive's studies by date (an Orthanc, or a PACS) and routes them."""

    def __init__(self, settings: Settings, queues: Queues, source: str) -> None:
        self.source = source
        self.queues = queues
        self.peer: Peer | None = None
        self._instances: dict[str, int] = {}
        if source != "orthanc":
            try:
                destination = settings.destination(source)
            except KeyError as exc:
                raise BackfillError(str(exc.args[0])) from None
            if isinstance(destination, DicomDestination):
                self.peer = Peer(destination, settings.node)
                self.router = Router(settings, queues)
                return
        self.orthanc = settings.orthanc_named(source)
        self.client = orthanc_client(self.orthanc)
        self.studies = OrthancStudies(settings, queues, self._get,
                                      source_name="" if source == "orthanc" else source)

    def close(self) -> None:
        if self.peer is None:
            self.client.close()

    def _get(self, path: str) -> bytes:
        try:
            return bytes(self.client.get_binary(path.lstrip("/")))
        except orthanc_errors.ResourceNotFound:
            raise LookupError(path) from None
        except orthanc_errors.OrthancApiException as exc:
            raise BackfillError(f"Orthanc at {self.orthanc.url}: {type(exc).__name__} "
                                f"({path})") from None

    def find(self, since: datetime.date, until: datetime.date | None = None) -> list[str]:
        """The studies with a Study Date in [since, until], oldest first: Orthanc ids, or
        Study Instance UIDs for a PACS."""
        if self.peer is not None:
            try:
                rows = self.peer.studies(since, until)
            except QueryError as exc:
                raise BackfillError(str(exc)) from None
            self._instances = {uid: n for uid, _day, n in rows}
            return [uid for uid, _day, _n in rows]
        span = f"{since:%Y%m%d}-{until:%Y%m%d}" if until else f"{since:%Y%m%d}-"
        query = {"Level": "Study", "Query": {"StudyDate": span}, "Expand": True}
        try:
            found = self.client.post("tools/find", json=query).json()
        except orthanc_errors.OrthancApiException as exc:
            raise BackfillError(f"Orthanc at {self.orthanc.url}: {type(exc).__name__} "
                                "(POST /tools/find)") from None
        except AttributeError:  # the client answers None when the request itself failed
            raise BackfillError(f"Orthanc at {self.orthanc.url} is unreachable") from None
        found.sort(key=lambda s: (s["MainDicomTags"].get("StudyDate", ""), s["ID"]))
        return [str(s["ID"]) for s in found]

    def step(self, study_id: str) -> tuple[Step, tuple[str, ...]]:
        """Route one study unless its jobs are done already; (what happened, its job ids)."""
        key = f"{MARKER}{self.source}:{study_id}"
        store = self.queues.store
        series: list[Dataset] = []
        try:
            if self.peer is not None:
                series = self.peer.series(study_id)
                instances = self._instances.get(study_id) or sum(
                    int(s.get("NumberOfSeriesRelatedInstances") or 0) for s in series)
                if not series:
                    return Step.GONE, ()
            else:
                instances = len(json.loads(self._get(f"/studies/{study_id}/instances")))
        except LookupError:
            return Step.GONE, ()
        except QueryError as exc:
            raise BackfillError(str(exc)) from None
        marker = store.get_record(key)
        if marker is not None and int(marker.get("generation", 0)) >= instances:
            if marker.get("state") == Step.OWN_OUTPUT.value:
                return Step.OWN_OUTPUT, ()
            ids = tuple(marker.get("jobs", ()))
            jobs = store.get_many(ids)
            if all(j in jobs and jobs[j].state is JobState.DONE for j in ids):
                return Step.DONE, ids
        try:
            routed = (self._route_pacs(study_id, instances, series) if self.peer is not None
                      else self.studies.route(study_id, instances, "backfill"))
        except StudyNotFound:
            return Step.GONE, ()
        step = Step.QUEUED if routed is not None else Step.OWN_OUTPUT
        ids = routed.job_ids if routed is not None else ()
        store.put_record(key, {"state": step.value, "generation": instances,
                               "jobs": list(ids), "at": time.time()})
        return step, ids

    def _route_pacs(self, study_uid: str, instances: int, series: list[Dataset]) -> Routed:
        """Rules over the series-level C-FIND answers (each stands in for a header)."""
        facts = [SeriesFacts(study_uid, str(s.SeriesInstanceUID), s, source="backfill")
                 for s in series if s.get("SeriesInstanceUID")]
        return self.router.route_series(study_uid, instances, facts, source="backfill",
                                        pacs_source=self.source)

    def walk(self, study_ids: list[str],
             progress: Callable[[str, Step], None] | None = None) -> Walk:
        walk = Walk()
        for study_id in study_ids:
            step, ids = self.step(study_id)
            walk.steps[study_id] = step
            walk.jobs.extend(ids)
            if progress is not None:
                progress(study_id, step)
        log.info("backfill from %s: %d studies: %d queued, %d done already, %d own outputs, "
                 "%d gone", self.source, len(study_ids), walk.count(Step.QUEUED),
                 walk.count(Step.DONE), walk.count(Step.OWN_OUTPUT), walk.count(Step.GONE))
        return walk


def follow(queues: Queues, job_ids: list[str], interval_s: float = 0.2
           ) -> Iterator[dict[str, Job]]:
    """The jobs' records, again every ``interval_s``, until none is pending or running."""
    while True:
        jobs = queues.store.get_many(job_ids)
        yield jobs
        if all(j.state in (JobState.DONE, JobState.DEAD) for j in jobs.values()):
            return
        time.sleep(interval_s)
