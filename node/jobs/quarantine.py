"""What is quarantined, kept until a person decides: ``[output] quarantine_dir/<job>/``.

Two kinds of entries, each a DICOM file beside ``<name>.reason.json``:

- ``deid``: a source de-identification refused (burned-in text without a pixel rule, a likely
  face, an SR with free text, ...): the identifiable original, copied from the spool when it
  was refused, so that it outlives the spool's retention;
- ``output``: an output the node made and refused to send (dciodvfy errors, a synthetic image
  too close to a training image).

A person (an admin: the files may be identifiable) releases or discards each entry. Releasing a
``deid`` entry de-identifies it again with the settings as they are now (after, say, a new
pixel rule) and delivers it to its job's destinations if it passes; if it is refused again it
stays, with the new reason. Releasing an ``output`` entry delivers it as it is: an admin's
override. Every decision is in the audit trail.

One decision on an entry at a time: a release or discard holds an exclusive ``flock`` on the
entry's note while it works (released by the kernel if the process dies), so two admins
releasing the same entry at once send and audit it once; the other is told to look again. An
entry of a job a reviewer rejected (or of a series rejected on its own) is not released: the
rejection stands over the quarantine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from node import audit, metrics
from node.archives import send_to
from node.archives.outgoing import load
from node.config import Settings
from node.files import atomic_write
from node.jobs.queue import Queues
from node.jobs.state import JobState

log = logging.getLogger(__name__)

_PART = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class Entry:
    id: str
    """``<job>/<name>``"""
    job: str
    sop: str
    study: str
    series: str
    kind: str
    """deid (a refused source) or output (a refused output)."""
    reason: str
    at: float
    path: Path
    size: int

    @property
    def note(self) -> Path:
        return self.path.with_suffix(".reason.json")


def _entry(note: Path) -> Entry | None:
    try:
        data = json.loads(note.read_text())
    except (OSError, ValueError):
        return None
    name = note.name.removesuffix(".reason.json")
    path = note.parent / Path(str(data.get("file") or f"{name}.dcm")).name
    if not path.exists():
        return None
    study, series, sop = (str(data.get(k, "")) for k in ("study", "series", "sop"))
    if not (study and series and sop):
        try:  # outputs' notes name the file only: their header has the rest
            ds = dcmread(path, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
            study = study or str(ds.get("StudyInstanceUID", ""))
            series = series or str(ds.get("SeriesInstanceUID", ""))
            sop = sop or str(ds.get("SOPInstanceUID", ""))
        except Exception:  # noqa: BLE001 - an unreadable entry is still listed
            pass
    at = float(data.get("at") or note.stat().st_mtime)
    return Entry(f"{note.parent.name}/{name}", str(data.get("job", note.parent.name)),
                 sop or name, study, series, str(data.get("kind", "output")),
                 str(data.get("reason", "")), at, path, path.stat().st_size)


def entries(settings: Settings) -> list[Entry]:
    """Every entry, newest first."""
    folder = settings.output.quarantine_dir
    if not folder.is_dir():
        return []
    found = [e for note in folder.glob("*/*.reason.json") if (e := _entry(note)) is not None]
    return sorted(found, key=lambda e: (-e.at, e.id))


def find(settings: Settings, entry_id: str) -> Entry | None:
    job, _, name = entry_id.partition("/")
    if not (_PART.match(job) and _PART.match(name)):
        return None
    note = settings.output.quarantine_dir / job / f"{name}.reason.json"
    return _entry(note) if note.exists() else None


def _found(settings: Settings, entry_id: str) -> Entry:
    entry = find(settings, entry_id)
    if entry is None:
        raise KeyError(f'no quarantine entry "{entry_id}" (synthnode quarantine list)')
    return entry


@contextlib.contextmanager
def _claimed(entry: Entry) -> Iterator[None]:
    """Hold ``entry`` for one decision (see the module); ValueError when someone else holds
    it or has decided it meanwhile."""
    try:
        fd = os.open(entry.note, os.O_RDONLY)
    except FileNotFoundError:
        raise ValueError(f"quarantine entry {entry.id} was decided meanwhile (synthnode "
                         "quarantine list)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"quarantine entry {entry.id} is being decided by someone else "
                             "now: look again in a moment") from None
        if not (entry.note.exists() and entry.path.exists()):
            raise ValueError(f"quarantine entry {entry.id} was decided meanwhile (synthnode "
                             "quarantine list)")
        yield
    finally:
        os.close(fd)


def _forget(entry: Entry) -> None:
    entry.path.unlink(missing_ok=True)
    entry.note.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other entries of the job remain
        entry.path.parent.rmdir()


def discard(settings: Settings, entry_id: str, user: str, reason: str) -> None:
    """Delete an entry for good (audited with ``reason``)."""
    if not reason.strip():
        raise ValueError("discarding needs a reason")
    entry = _found(settings, entry_id)
    with _claimed(entry):
        _forget(entry)
    audit.record(settings, "quarantine", user, entry.id, action="discard", kind=entry.kind,
                 job=entry.job, sop=entry.sop, reason=reason)
    log.info("quarantine entry %s discarded by %s", entry.id, user)


def release(settings: Settings, queues: Queues, entry_id: str, user: str) -> str:
    """Release an entry to its job's destinations (see the module); returns what happened.
    KeyError for an unknown entry; ValueError when its job record (its destinations) is gone,
    the job (or the entry's series) was rejected in review, someone else decides the entry at
    the same time, or a destination fails (the entry stays)."""
    entry = _found(settings, entry_id)
    with _claimed(entry):
        return _release(settings, queues, entry, user)


def _release(settings: Settings, queues: Queues, entry: Entry, user: str) -> str:
    job = queues.store.get(entry.job)
    if job is None:
        raise ValueError(f"job {entry.job} has no record any more: its destinations are "
                         "unknown (send the file with synthnode send, then discard it)")
    if job.state is JobState.REJECTED or (entry.kind == "deid"
                                          and entry.series in job.rejected_series):
        raise ValueError(f"job {job.id} was rejected in review ({job.decided_by}): its "
                         "quarantined objects are not released either (discard the entry)")
    with tempfile.TemporaryDirectory(prefix="synthnode-release-") as tmp:
        if entry.kind == "deid":
            from node.deid import Quarantined
            from node.deid.batch import Identity, Mapping, deidentify_to_file, record_mappings
            from node.generate.tasks import Generation, deidentifier

            deid_settings = settings.deid
            if job.task.options is not None:
                deid_settings = deid_settings.model_copy(update={"options": job.task.options})
            deid = deidentifier(deid_settings, settings.output, lambda: Generation(settings))
            source = dcmread(entry.path)
            original = Identity.of(source)
            try:
                output, target = deidentify_to_file(deid, source, settings.deid.output,
                                                    Path(tmp))
            except Quarantined as exc:
                data = json.loads(entry.note.read_text())
                data.update(reason=str(exc), at=time.time())
                atomic_write(entry.note, json.dumps(data, indent=2), durable=True)
                audit.record(settings, "quarantine", user, entry.id, action="release",
                             ok=False, kind=entry.kind, job=entry.job, sop=entry.sop,
                             reason=str(exc))
                return f"quarantined again: {exc}"
            outgoing = [load(target)]
            if settings.deid.honest_broker_file is not None:
                record_mappings(settings.deid.honest_broker_file,
                                [Mapping(original, Identity.of(output))])
        else:
            copy = Path(tmp) / entry.path.name
            shutil.copyfile(entry.path, copy)
            outgoing = [load(copy)]
        for name in job.destinations:
            results = send_to(outgoing, name, settings, job.id, job.kind)
            failed = [r for r in results if not r.ok]
            metrics.delivered(name, len(results) - len(failed), ok=True)
            if failed:
                metrics.delivered(name, len(failed), ok=False)
                raise ValueError(f"not delivered to {name}: {failed[0].reason} (the entry "
                                 "stays; try again)")
            audit.record(settings, "release", user, job.id, destination=name, rule=job.rule,
                         task=job.kind, study=job.study_uid, objects=len(results),
                         kind="quarantine")
    _forget(entry)
    audit.record(settings, "quarantine", user, entry.id, action="release", ok=True,
                 kind=entry.kind, job=entry.job, sop=entry.sop)
    log.info("quarantine entry %s released by %s to %s", entry.id, user,
             ", ".join(job.destinations))
    return f"released to {', '.join(job.destinations)}"
