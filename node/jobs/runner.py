"""What a worker does with a job id: make the task's outputs, deliver them, record the result.

    job record -> the study's files in the spool (shared file system for remote workers)
        -> deidentify | forward | text2img | inpaint | outpaint | img2img
        -> outputs staged in ``[jobs] work_dir/<job>/`` (SC objects checked by dciodvfy)
        -> every destination of the rule (Orthanc REST, C-STORE peers), retried
        -> record: done, or pending again with a backoff, or dead after the last attempt

Exactly-once effect: output UIDs are deterministic, so a job run twice (a retry, a worker lost
after sending half) stores nothing twice. Outputs made once are kept with a manifest until
delivered, so a retry after a delivery failure does not run the model again.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from node import audit, metrics
from node.archives import ArchiveError, Outgoing, read_source, send_to
from node.archives.outgoing import Made, load
from node.config import Settings, TaskKind
from node.deid import DeidentificationError
from node.deid.job import Deidentifiers
from node.dicom import own_output
from node.errors import describe
from node.files import atomic_write
from node.generate.job import SynthesisFailed, Synthesizer
from node.generate.tasks import deidentifier
from node.jobs.manifest import Manifest, rejected_dir
from node.jobs.queue import Queues
from node.jobs.state import Job, JobState, needs_review
from node.reserve import DiskReserve

log = logging.getLogger(__name__)

SPACE_WAIT_S = 2.0
"""How long a job that would write waits before it looks at the disk reserve again (doubled
on each wait in a row, up to :data:`SPACE_WAIT_MAX_S`)."""
SPACE_WAIT_MAX_S = 30.0


class WaitForSpace(Exception):
    """A guarded file system is below the disk reserve (or filled up): the job waits, its
    attempt not counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobFailed(Exception):
    """The job did not complete; ``permanent`` when no retry can mend it."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class Runner:
    """Runs jobs in one worker process: their record, heartbeat, retries and waits for disk
    space; the outputs are made by the de-identification and synthesis stages, kept warm."""

    def __init__(self, settings: Settings, queues: Queues) -> None:
        self.settings = settings
        self.queues = queues
        self.stop = threading.Event()
        self.synthesizer = Synthesizer(settings)
        self.deidentifiers = Deidentifiers(
            settings.deid,
            lambda deid: deidentifier(deid, settings.output, self.synthesizer.generation),
            quarantine_dir=settings.output.quarantine_dir)
        self.reserve: DiskReserve = DiskReserve.for_settings(settings)
        # jobs that wait for space: how many times in a row (one log line each, and a wait
        # that grows so that a long backlog does not churn the queue every few seconds)
        self._waiting: dict[str, int] = {}

    @property
    def name(self) -> str:
        """host:pid of the process running the job (process workers are forked from one
        Runner, so this is read when needed, not kept)."""
        return f"{socket.gethostname()}:{os.getpid()}"

    # -- the record ----------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        """Huey's task body: run ``job_id`` unless it is done, dead, early or someone else's."""
        store, jobs = self.queues.store, self.settings.jobs
        job = store.get(job_id)
        now = time.time()
        if job is None:
            log.warning("job %s: no record (purged?); message dropped", job_id)
            return
        if job.state in (JobState.DONE, JobState.DEAD, JobState.REVIEW, JobState.REJECTED):
            # (in review it waits for a person: only Queues.approve queues it again; a stray
            # message, say the reaper's for a worker taken for dead, must not make it again
            # nor take a rejected job back into review)
            log.debug("job %s already %s; message dropped", job.id, job.state.value)
            return
        if job.not_before > now + 1.0:
            log.debug("job %s not due yet; its scheduled message will run it", job.id)
            return
        if job.state is JobState.RUNNING:
            beat = store.heartbeat(job.id)
            if beat is not None and now - beat.at < jobs.heartbeat_timeout_s:
                log.debug("job %s is running on %s; message dropped", job.id, beat.worker)
                return
        if (job.approved and self.needs_review(job)
                and Manifest.load(self._work(job), job.revision) is None):
            # approved outputs that are gone (a local work folder, a lost file) are never made
            # again and sent unseen: made again, they wait for a reviewer again
            log.warning("job %s: the approved outputs are no longer staged; making them again "
                        "for a new review", job.id)
            job = job.but(approved=False, decided_by="", decision_reason="", decided_at=0.0)
            store.put(job)
        if self._writes(job) and not Manifest.exists(self._work(job)):
            # (outputs made by an earlier attempt are only delivered: that frees space)
            short = self.reserve.shortfall()
            if short is not None:
                self._wait_for_space(job, f"below the disk reserve: {short}")
                return
        if job.id in self._waiting:  # (forgotten once the job ran without waiting again)
            log.info("job %s: free space is above the reserve again; resuming", job.id)
        job = job.but(state=JobState.RUNNING, attempts=job.attempts + 1, worker=self.name,
                      not_before=0.0)
        store.put(job)
        store.beat(job.id, self.name)
        self._audit(job, "running")
        log.info("job %s started: %s of rule %s on study %s (%d series), attempt %d of %d",
                 job.id, job.kind, job.rule, job.study_uid, len(job.series_uids),
                 job.attempts, jobs.max_attempts)
        beating = threading.Event()
        beat_thread = threading.Thread(target=self._beat, args=(job.id, beating),
                                       name=f"heartbeat-{job.id}", daemon=True)
        beat_thread.start()
        started = time.monotonic()
        waited = False
        final = "failed"
        try:
            made = self.execute(job)
        except WaitForSpace as exc:
            waited = True
            self._drop_partial(job)
            self._wait_for_space(job.but(attempts=job.attempts - 1), exc.reason)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.exception("job %s failed unexpectedly", job.id)
                self.queues.fail(job, f"internal error: {describe(exc)}", permanent=False)
            else:
                waited = True
                self._drop_partial(job)
                self._wait_for_space(job.but(attempts=job.attempts - 1),
                                     f"disk full writing its outputs ({exc.strerror})")
        except JobFailed as exc:
            final = self.queues.fail(job, exc.reason, exc.permanent).state.value
        except Exception as exc:  # noqa: BLE001 - a job's failure never kills the worker
            log.exception("job %s failed unexpectedly", job.id)
            final = self.queues.fail(job, f"internal error: {describe(exc)}",
                                     permanent=False).state.value
        else:
            current = store.get(job.id)
            if current is not None and current.revision > job.revision:
                log.info("job %s: study changed while it ran; the newer run follows", job.id)
            elif self._held(job):
                final = JobState.REVIEW.value
                store.put(job.but(state=JobState.REVIEW, last_error="", outputs=len(made.files),
                                  quarantined=made.quarantined, notes=tuple(made.notes[:20])))
                self._audit(job, "review", outputs=len(made.files),
                            quarantined=made.quarantined)
                log.info("job %s held for review in %.2f s: %d outputs staged, %d quarantined "
                         "(synthnode review approve %s)", job.id, time.monotonic() - started,
                         len(made.files), made.quarantined, job.id)
            else:
                final = JobState.DONE.value
                notes = self._keep_rejected(job, made)
                store.put(job.but(state=JobState.DONE, last_error="", outputs=len(made.files),
                                  quarantined=made.quarantined,
                                  notes=tuple([*notes, *made.notes][:20])))
                shutil.rmtree(self._work(job), ignore_errors=True)
                shutil.rmtree(self._source_dir(job), ignore_errors=True)
                self._audit(job, "done", outputs=len(made.files), quarantined=made.quarantined)
                log.info("job %s done in %.2f s: %d outputs delivered, %d quarantined",
                         job.id, time.monotonic() - started, len(made.files), made.quarantined)
        finally:
            if not waited:
                metrics.job_finished(job.kind, final, time.monotonic() - started)
            beating.set()
            beat_thread.join()
            store.clear_beat(job.id)
            if not waited:
                self._waiting.pop(job.id, None)

    def needs_review(self, job: Job) -> bool:
        """Whether ``job``'s outputs wait for a reviewer: its task or one of its destinations
        has ``review = true``."""
        return needs_review(self.settings, job)

    def _held(self, job: Job) -> bool:
        return self.needs_review(job) and not job.approved

    def _audit(self, job: Job, state: str, **data: object) -> None:
        audit.record(self.settings, "job", f"worker {self.name}", job.id, state=state,
                     rule=job.rule, task=job.kind, study=job.study_uid, attempts=job.attempts,
                     **data)

    def _writes(self, job: Job) -> bool:
        """Does ``job`` write to the work folder or the quarantine? (Forwarding what is in the
        spool does not.)"""
        return (job.task.task is not TaskKind.FORWARD or job.source.fetched
                or self._held(job))  # (a forward staged for review: links, else copies)

    def _check_space(self) -> None:
        # Read now, not cached: a job writes far faster than the receiver's cache period, and
        # one statvfs per output is nothing next to making it.
        short = self.reserve.check_now()
        if short is not None:
            raise WaitForSpace(f"below the disk reserve: {short}")

    def _drop_partial(self, job: Job) -> None:
        """A job stopped for disk space leaves nothing half-made behind: its partial outputs
        and fetched sources would otherwise hold the very space it waits for (made again, with
        the same UIDs, when it resumes). Outputs with a manifest are complete: they stay."""
        if not Manifest.exists(self._work(job)):
            shutil.rmtree(self._work(job), ignore_errors=True)
        shutil.rmtree(self._source_dir(job), ignore_errors=True)

    def _wait_for_space(self, job: Job, reason: str) -> None:
        """Put ``job`` back for :data:`SPACE_WAIT_S`, doubling on each wait in a row up to
        :data:`SPACE_WAIT_MAX_S`, its attempt not counted; never dead."""
        waits = self._waiting.get(job.id, 0)
        self._waiting[job.id] = waits + 1
        delay = min(SPACE_WAIT_S * 2 ** waits, SPACE_WAIT_MAX_S)
        self.queues.postpone(job, delay, f"waiting for disk space: {reason}")
        if not waits:
            log.warning("job %s waits for disk space (attempt not counted): %s", job.id, reason)
        else:
            log.debug("job %s still waits for disk space (next look in %.0f s)", job.id, delay)

    def _beat(self, job_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.settings.jobs.heartbeat_s):
            try:
                self.queues.store.beat(job_id, self.name)
            except Exception:  # noqa: BLE001 - a missed beat is retried on the next period
                log.warning("job %s: heartbeat not recorded", job_id)

    # -- the work ------------------------------------------------------------------------

    def execute(self, job: Job) -> Made:
        """Make (or reuse) the outputs and deliver them to every destination."""
        task = job.task
        work = self._work(job)
        # Outputs made by an earlier attempt (or staged for a reviewer) are delivered as they
        # are: the sources are not read, nor fetched from their archive, again.
        if task.task is TaskKind.FORWARD:
            made = self._reuse(work, job) if job.approved else None
            if made is None:
                made = self._forwarded(job, self._sources(job))
                if self._held(job):
                    made = self._stage(work, job, made)
        else:
            made = self._reuse(work, job) or self._make(job, self._sources(job), work)
        if self._held(job):
            return made  # staged: delivered once a reviewer approves (Queues.approve)
        rejected = job.rejected_series if job.approved else frozenset()
        self._deliver(job, [f for f in made.files
                            if made.series_of.get(f.sop_instance_uid, "") not in rejected])
        return made

    def _work(self, job: Job) -> Path:
        return self.settings.jobs.work_dir / job.id

    def _keep_rejected(self, job: Job, made: Made) -> list[str]:
        """An approved job's outputs of the series a reviewer rejected: moved, never sent, to
        ``<work_dir>/<job>.rejected/`` with the decisions (removed after ``[jobs]
        keep_rejected_s``); the notes saying so (UIDs and counts only)."""
        rejected = job.rejected_series if job.approved else frozenset()
        if not rejected:
            return []
        kept = rejected_dir(self.settings.jobs.work_dir, job.id)
        kept.mkdir(parents=True, exist_ok=True)
        counts = dict.fromkeys(sorted(rejected), 0)
        for item in made.files:
            series_uid = made.series_of.get(item.sop_instance_uid, "")
            if series_uid in rejected and isinstance(item.source, Path):
                os.replace(item.source, kept / item.source.name)
                counts[series_uid] += 1
        atomic_write(kept / "decisions.json", json.dumps(
            [asdict(d) for d in job.series_decisions if not d.approve]))
        return [f"series {uid}: {n} outputs rejected in review, not delivered"
                for uid, n in counts.items()]

    def _sources(self, job: Job) -> list[Path]:
        """The job's series: where they lie in the spool, or fetched from their archive."""
        try:
            return read_source(job.source, job.study_uid, job.series_uids, self.settings,
                               self._source_dir(job))
        except ArchiveError as exc:
            raise JobFailed(str(exc), exc.permanent) from None

    def _source_dir(self, job: Job) -> Path:
        """Where a study fetched for the job lies (one folder per series)."""
        return self.settings.jobs.work_dir / f"{job.id}.source"

    def _forwarded(self, job: Job, sources: list[Path]) -> Made:
        made = Made()
        fetched = job.source.fetched  # (the router may have seen no header)
        for path in sources:
            if fetched and self._own(job, _read(path, header_only=True), made):
                continue
            item = _identify(path)
            made.files.append(item)
            made.series_of[item.sop_instance_uid] = path.parent.name  # (<series>/<sop>.dcm)
        return made

    def _stage(self, work: Path, job: Job, made: Made) -> Made:
        """A forward that waits for review: its files hard-linked (copied where the spool is
        on another file system) into the work folder with a manifest. What the reviewer sees
        is then what leaves once approved, whatever the spool (instances added or replaced,
        retention after a rejection) or a fetched copy does meanwhile."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        staged = Made(quarantined=made.quarantined, notes=list(made.notes),
                      series_of=dict(made.series_of))
        for n, item in enumerate(made.files):
            target = work / f"{n:06d}.dcm"
            try:
                os.link(Path(str(item.source)), target)
            except OSError:
                self._check_space()
                shutil.copyfile(Path(str(item.source)), target)
            staged.files.append(Outgoing(target, item.sop_class_uid, item.sop_instance_uid,
                                         item.transfer_syntax_uid))
        Manifest.write(work, staged, job.revision)
        return staged

    def _reuse(self, work: Path, job: Job) -> Made | None:
        made = Manifest.load(work, job.revision)
        if made is not None:
            log.info("job %s: delivering the %d outputs made by an earlier attempt", job.id,
                     len(made.files))
        return made

    def _make(self, job: Job, sources: list[Path], work: Path) -> Made:
        """Make the task's outputs in a fresh ``work`` and record them in its manifest."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        task = job.task
        own = functools.partial(self._own, job)
        try:
            if task.task is TaskKind.DEIDENTIFY:
                made = self.deidentifiers.make(sources, work, options=task.options,
                                               job_id=job.id, read=_read, own=own,
                                               check_space=self._check_space)
            else:
                made = self.synthesizer.make(task, sources, work,
                                             deidentifiers=self.deidentifiers, job_id=job.id,
                                             rule=job.rule, task_index=job.task_index,
                                             read=_read, own=own,
                                             check_space=self._check_space)
        except (DeidentificationError, SynthesisFailed) as exc:
            raise JobFailed(str(exc), permanent=True) from None
        Manifest.write(work, made, job.revision)
        return made

    def _own(self, job: Job, source: Dataset, made: Made) -> bool:
        """Whether ``source`` is one of the node's outputs (routing on C-FIND answers, as for a
        PACS, cannot see it): noted, never processed again."""
        if not own_output(source, self.settings.output.manufacturer):
            return False
        sop = str(source.SOPInstanceUID)
        made.notes.append(f"{sop}: the node's own output, not processed again")
        log.info("job %s: instance %s is synthnode's own output: not processed again", job.id,
                 sop)
        return True

    def _deliver(self, job: Job, files: list[Outgoing]) -> None:
        if not files:
            return
        task = str(job.kind)
        for name in job.destinations:
            try:
                results = send_to(files, name, self.settings, job.id, task, stop=self.stop)
            except KeyError as exc:
                raise JobFailed(str(exc.args[0]), permanent=True) from None
            failed = [r for r in results if not r.ok]
            metrics.delivered(name, len(results) - len(failed), ok=True)
            if failed:
                metrics.delivered(name, len(failed), ok=False)
                raise JobFailed(f"{len(failed)} of {len(results)} objects not delivered to "
                                f"{failed[0].destination}: {failed[0].reason}")
            audit.record(self.settings, "release", f"worker {self.name}", job.id,
                         destination=name, rule=job.rule, task=task, study=job.study_uid,
                         objects=len(results), user=job.decided_by)


def _identify(path: Path) -> Outgoing:
    try:
        return load(path)
    except ValueError as exc:
        raise JobFailed(f"spooled instance {path.stem}: {exc}", permanent=True) from None


def _read(path: Path, header_only: bool = False) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=header_only)
    except Exception as exc:  # noqa: BLE001 - the spool holds only checked files
        raise JobFailed(f"spooled instance {path.stem} cannot be read "
                        f"({type(exc).__name__})", permanent=True) from None
