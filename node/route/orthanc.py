"""Studies Orthanc hands over through the plugin (``plugins/orthanc/``): routed by the same
rules, run by the same workers, which fetch them from Orthanc.

Durable markers (in the job backend, beside the job records) make Orthanc's events safe to
lose: a study is marked *seen* when Orthanc receives it (NEW_STUDY) and *routed* when its jobs
are submitted (STABLE_STUDY). After a restart, STABLE_STUDY does not fire for studies that were
still arriving (Orthanc keeps stability in memory), so :meth:`OrthancStudies.reconcile`, run on
ORTHANC_STARTED, routes every study still marked seen.

The node's own outputs come back to Orthanc and fire the same events: a series whose first
instance carries the node's metadata (``[orthanc] job_metadata``) or the node's mark (a
Contributing Equipment item by ``[output] manufacturer`` whose Device Serial Number is bound to
the instance's UID, :func:`node.dicom.own_output`) is never routed: no feedback loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from node.archives import FoundStudy, Source, SourceKind, StudyGone
from node.archives.orthanc import OrthancArchive, RestGet
from node.config import ORTHANC, OrthancDestination, RuleTask, Settings
from node.dicom import own_output
from node.jobs import Job, Queues
from node.route.router import Router, Submitted, make_job
from node.route.rules import SeriesFacts

log = logging.getLogger(__name__)

MARKER = "orthanc-study:"
MANUAL_RULE = "manual"


class MarkerState(StrEnum):
    """Where a study Orthanc holds stands with the node (its marker's ``state``)."""

    SEEN = "seen"
    """Orthanc received it (NEW_STUDY); not routed yet."""

    ROUTED = "routed"
    """Its jobs were submitted when it became stable."""

    OWN_OUTPUT = "own-output"
    """It holds only the node's outputs: never routed."""


def _revision(marker: dict[str, Any]) -> int:
    """How many times the study became stable (``generation`` in markers of 0.1)."""
    return int(marker.get("revision", marker.get("generation", 0)))


class StudyNotFound(LookupError):
    """Orthanc has no such study (HTTP 404)."""


class BadRequest(ValueError):
    """A trigger request that cannot be carried out (HTTP 400); the message says why."""


@dataclass(frozen=True)
class StudyFacts:
    study_uid: str
    series: list[SeriesFacts]
    outputs: int
    """Series left out because the node made them."""


class OrthancStudies:
    """Routes the studies of one Orthanc; the plugin calls it from its own thread."""

    def __init__(self, settings: Settings, queues: Queues, rest: RestGet | None = None,
                 name: str = ORTHANC) -> None:
        """``name``: the destination that is this Orthanc ("orthanc": ``[orthanc]``); reads
        go through ``rest`` when given (the plugin), else over HTTP."""
        self.settings = settings
        self.queues = queues
        destination = settings.destination(name)
        if not isinstance(destination, OrthancDestination):
            raise ValueError(f'"{name}" is a {destination.kind.value} destination, not an '
                             "Orthanc")
        self.archive = OrthancArchive(destination, settings, rest)
        self.name = name
        self.router = Router(settings, queues)

    def close(self) -> None:
        self.archive.close()

    # -- events --------------------------------------------------------------------------

    def seen(self, study_id: str) -> None:
        """NEW_STUDY: remember the study until it is routed."""
        self.queues.store.put_record(MARKER + study_id, {"state": MarkerState.SEEN.value,
                                                         "revision": 0, "at": time.time()},
                                     if_empty=True)

    def stable(self, study_id: str) -> Submitted | None:
        """STABLE_STUDY: route the study (a new revision each time it becomes stable);
        None when it is gone or consists of the node's own outputs."""
        key = MARKER + study_id
        marker = self.queues.store.get_record(key) or {"revision": 0}
        try:
            facts = self.facts(study_id)
        except StudyNotFound:
            self.queues.store.delete_record(key)
            return None
        revision = _revision(marker) + 1
        routed = self.submit(study_id, revision, "orthanc", facts)
        state = MarkerState.OWN_OUTPUT if routed is None else MarkerState.ROUTED
        self.queues.store.put_record(key, {
            "state": state.value, "revision": revision, "at": time.time(),
            **({"jobs": list(routed.job_ids), "note": routed.note} if routed else {}),
        })
        return routed

    def submit(self, study_id: str, revision: int, via: str,
              facts: StudyFacts | None = None) -> Submitted | None:
        """Apply the rules to the study and submit its jobs (workers fetch it from this
        Orthanc); None when it holds only the node's outputs. :class:`StudyNotFound`."""
        facts = facts or self.facts(study_id)
        if not facts.series:
            log.info("orthanc study %s: only synthnode outputs (%d series); not routed",
                     study_id, facts.outputs)
            return None
        return self.router.submit(facts.study_uid, revision, facts.series,
                                  Source(SourceKind.ORTHANC, self.name, study_id), via)

    def reconcile(self) -> int:
        """ORTHANC_STARTED: route the studies seen but never routed; returns how many."""
        routed = 0
        for key, marker in self.queues.store.records(MARKER).items():
            if (marker.get("state") == MarkerState.SEEN
                    and self.stable(key[len(MARKER):]) is not None):
                routed += 1
        if routed:
            log.info("orthanc start: %d studies received before the restart were routed",
                     routed)
        return routed

    # -- what rules see ------------------------------------------------------------------

    def facts(self, study_id: str) -> StudyFacts:
        """One header per series (the node's outputs left out), with the AE titles Orthanc
        recorded; :class:`StudyNotFound` when Orthanc has no such study."""
        try:
            found = self.archive.series(FoundStudy(study_id, "", "", 0))
        except StudyGone:
            raise StudyNotFound(f'Orthanc has no study "{study_id}"') from None
        series = [SeriesFacts(str(s.header.StudyInstanceUID), s.series_uid, s.header,
                              calling_aet=s.calling_aet, called_aet=s.called_aet)
                  for s in found
                  if not (s.own or own_output(s.header, self.settings.output.manufacturer))]
        study_uid = series[0].study_uid if series else (
            str(found[0].header.StudyInstanceUID) if found else "")
        return StudyFacts(study_uid, series, len(found) - len(series))

    # -- by hand (REST) ------------------------------------------------------------------

    def trigger(self, study_id: str, body: Any) -> Job:
        """``POST /synthnode/studies/{id}/jobs``: one task (a ``[[rules.tasks]]`` entry as JSON,
        plus an optional ``"series"`` list of Series Instance UIDs) on the study.
        :class:`BadRequest` or :class:`StudyNotFound` when it cannot be."""
        if not isinstance(body, dict):
            raise BadRequest('the body must be a JSON object such as {"task": "img2img"}')
        body = dict(body)
        wanted = body.pop("series", None)
        if wanted is not None and not (isinstance(wanted, list)
                                       and all(isinstance(u, str) for u in wanted)):
            raise BadRequest('"series" must be a list of Series Instance UIDs')
        try:
            task = RuleTask.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors())
            raise BadRequest(f"not a valid task: {problems}") from None
        known = {d.name for d in self.settings.all_destinations}
        destinations = tuple(task.destinations or ["orthanc"])
        unknown = [d for d in destinations if d not in known]
        if unknown:
            raise BadRequest(f"unknown destination {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(known))})")
        facts = self.facts(study_id)
        uids = [s.series_uid for s in facts.series]
        if wanted is not None:
            missing = [u for u in wanted if u not in uids]
            if missing:
                raise BadRequest(f"the study has no series {', '.join(missing)} (that the node "
                                 "did not make)")
            uids = [u for u in uids if u in wanted]
        if not uids:
            raise BadRequest("the study holds only synthnode outputs: nothing to work on")
        marker = self.queues.store.get_record(MARKER + study_id) or {}
        spec = json.dumps([task.model_dump(mode="json"), sorted(uids)], sort_keys=True)
        rule = f"{MANUAL_RULE}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"
        job = make_job(facts.study_uid, max(1, _revision(marker)), rule, 0,
                       task, tuple(uids), destinations,
                       Source(SourceKind.ORTHANC, self.name, study_id))
        self.queues.submit(job)
        return self.queues.store.get(job.id) or job
