"""The durable spool: instance files laid out by UID, plus the index.

Layout::

    <dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <dir>/.index.sqlite3      the index (WAL)
    <dir>/.tmp/               files being written; never indexed, emptied at start

UIDs cannot start with a dot, so the spool's own entries never collide with a study.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from pydicom.filereader import read_file_meta_info

from node.config import DuplicatePolicy, SpoolSettings
from node.files import fsync_dir, move_into_place, temporary_path, write_file
from node.spool.index import Index, InstanceRow, StudySummary
from node.uids import is_valid_uid

log = logging.getLogger(__name__)

INDEX_NAME = ".index.sqlite3"
TMP_NAME = ".tmp"
_CHUNK = 1 << 20


class StoreOutcome(Enum):
    """What :meth:`Spool.store` did with an instance."""

    STORED = "stored"
    """A new instance, now on disk and indexed."""

    DUPLICATE = "duplicate"
    """Already spooled with identical bytes; nothing written."""

    DUPLICATE_DISCARDED = "duplicate-discarded"
    """Already spooled with different bytes; policy keep_first kept the old copy."""

    REPLACED = "replaced"
    """Already spooled with different bytes; policy replace wrote the new copy."""


class SpoolError(Exception):
    """The spool could not persist an instance (disk full, permissions, I/O error)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @classmethod
    def of(cls, exc: OSError) -> SpoolError:
        """The error for a failed write to the spool, its reason in words."""
        return cls({
            errno.ENOSPC: "no space left on the spool's disk",
            errno.EDQUOT: "disk quota exceeded on the spool's disk",
            errno.EACCES: "permission denied writing to the spool",
            errno.EROFS: "the spool's file system is read-only",
            errno.EFBIG: "file too large for the spool's file system",
        }.get(exc.errno or 0, f"I/O error writing to the spool ({exc.strerror})"))


@dataclass(frozen=True)
class StableStudy:
    """A study handed to the next stage: no new instance for ``stable_after_s`` seconds."""

    study_uid: str
    revision: int
    path: Path
    instances: tuple[InstanceRow, ...]
    aets: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """SOP Instance UID -> (calling AE title, called AE title) it arrived with."""

    @property
    def series_uids(self) -> tuple[str, ...]:
        return tuple(sorted({i.series_uid for i in self.instances}))


class HandedOn(Protocol):
    """What the next stage made of a stable study, recorded with it (the router's ``Submitted``):
    the ids of its jobs (none: no rule matched) and why."""

    @property
    def job_ids(self) -> Sequence[str]: ...

    @property
    def note(self) -> str: ...


StableStudyHandler = Callable[[StableStudy], HandedOn | None]
"""The interface later stages plug into (the router). Called at least once for each revision
of a stable study, from the spool's monitor thread; it must be idempotent on (study_uid,
revision) and return quickly (enqueue, don't process). What it returns (the study's jobs, or
None when it made none to track) is recorded with the study. If it raises, the hand-off is
retried on the next tick."""


def _same_file(path: Path, other: Path) -> bool:
    """Do ``path`` and ``other`` hold the same bytes? (read in chunks: never a whole file)"""
    try:
        if path.stat().st_size != other.stat().st_size:
            return False
        with path.open("rb") as f, other.open("rb") as g:
            while True:
                a = f.read(_CHUNK)
                if a != g.read(_CHUNK):
                    return False
                if not a:
                    return True
    except FileNotFoundError:
        return False


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        with path.open("rb") as f:
            for offset in range(0, len(data), _CHUNK):
                # bytes == bytes is a memcmp; against a memoryview it compares item by item.
                if f.read(_CHUNK) != data[offset : offset + _CHUNK]:
                    return False
        return True
    except FileNotFoundError:
        return False


class Spool:
    """Durable storage of received instances; see the module docstring for the layout."""

    def __init__(self, settings: SpoolSettings) -> None:
        self.settings = settings
        self.dir = settings.dir
        self.tmp_dir = self.dir / TMP_NAME
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        self.index = Index(self.dir / INDEX_NAME)
        # Striped locks: two associations storing the same SOP Instance UID at once are
        # serialised; different UIDs proceed in parallel.
        self._locks = [threading.Lock() for _ in range(64)]
        self._dirs_made: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def close(self) -> None:
        self.index.close()

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        for name, uid in (
            ("Study Instance UID", study_uid),
            ("Series Instance UID", series_uid),
            ("SOP Instance UID", sop_instance_uid),
        ):
            if not is_valid_uid(uid):
                raise ValueError(f'{name} "{uid}" is not a valid UID')
        return self.dir / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    # -- writing -------------------------------------------------------------------------

    def store(
        self, data: bytes, row: InstanceRow, calling_aet: str, called_aet: str
    ) -> StoreOutcome:
        """Persist one encoded instance (DICOM file bytes: preamble, meta, data set).

        Returns only once the file is durable and indexed; raises :class:`SpoolError` when it
        cannot be, leaving no partial file behind.
        """
        return self._store(data, len(data), row, calling_aet, called_aet)

    def store_file(
        self, path: Path, row: InstanceRow, calling_aet: str, called_aet: str
    ) -> StoreOutcome:
        """:meth:`store` for an instance already written to ``path`` (a DICOM file, e.g. one
        received in chunks into :attr:`tmp_dir`), never read into memory: moved into place when
        it lies on the spool's file system, else copied in chunks. ``path`` is gone (moved) or
        left as it was (duplicates, errors); the caller removes what is left."""
        return self._store(path, path.stat().st_size, row, calling_aet, called_aet)

    def _store(
        self, data: bytes | Path, size: int, row: InstanceRow, calling_aet: str,
        called_aet: str,
    ) -> StoreOutcome:
        final = self.instance_path(row.study_uid, row.series_uid, row.sop_instance_uid)
        lock = self._locks[hash(row.sop_instance_uid) % len(self._locks)]
        with lock:
            existing = self.index.instance(row.sop_instance_uid)
            outcome = StoreOutcome.STORED
            if existing is not None:
                old = self.instance_path(
                    existing.study_uid, existing.series_uid, existing.sop_instance_uid
                )
                if (_same_file(old, data) if isinstance(data, Path)
                        else _same_bytes(old, data)):
                    return StoreOutcome.DUPLICATE
                if self.settings.on_duplicate is DuplicatePolicy.KEEP_FIRST and old.exists():
                    return StoreOutcome.DUPLICATE_DISCARDED
                outcome = StoreOutcome.REPLACED
            if isinstance(data, Path):
                self._move_file(final, data)
            else:
                self._write_file(final, data)
            if existing is not None and old != final:
                old.unlink(missing_ok=True)
            self.index.record_instance(
                InstanceRow(
                    row.sop_instance_uid, row.study_uid, row.series_uid, row.sop_class_uid,
                    row.transfer_syntax, size,
                ),
                calling_aet,
                called_aet,
            )
        return outcome

    def _make_dirs(self, folder: Path) -> None:
        """Create the study/series folders, making the new entries durable."""
        with self._dirs_lock:
            if folder in self._dirs_made:
                return
            missing = []
            p = folder
            while p != self.dir and not p.exists():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                d.mkdir(exist_ok=True)
                if self.settings.fsync:
                    fsync_dir(d.parent)
            self._dirs_made.add(folder)

    def _write_file(self, final: Path, data: bytes) -> None:
        tmp = temporary_path(final, self.tmp_dir)
        try:
            write_file(tmp, data, self.settings.fsync, mode=0o640)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError.of(exc) from exc
        self._commit(tmp, final, synced=True)

    def _move_file(self, final: Path, source: Path) -> None:
        """Put the file at ``source`` in place: renamed when it lies on the spool's file
        system, else copied (in chunks) into :attr:`tmp_dir` first."""
        try:
            same_fs = os.stat(source).st_dev == os.stat(self.tmp_dir).st_dev
            if not same_fs:
                tmp = temporary_path(final, self.tmp_dir)
                try:
                    shutil.copyfile(source, tmp)
                except OSError:
                    tmp.unlink(missing_ok=True)
                    raise
                source = tmp
            else:
                os.chmod(source, 0o640)  # as _write_file makes them (temporary files are 0600)
        except OSError as exc:
            raise SpoolError.of(exc) from exc
        self._commit(source, final, synced=False, remove_on_error=not same_fs)

    def _commit(self, tmp: Path, final: Path, synced: bool,
                remove_on_error: bool = True) -> None:
        """Make the complete file ``tmp`` the instance at ``final``, durably, in this order:
        fdatasync the file (unless the writer did: ``synced``), rename it into place, fsync
        the folder (only then may the caller acknowledge it)."""
        try:
            self._make_dirs(final.parent)
            try:
                move_into_place(tmp, final, self.settings.fsync, synced=synced)
            except FileNotFoundError:  # retention removed the folder meanwhile: make it again
                if not tmp.exists():
                    raise
                with self._dirs_lock:
                    self._dirs_made.discard(final.parent)
                self._make_dirs(final.parent)
                move_into_place(tmp, final, self.settings.fsync, synced=True)  # synced above
        except OSError as exc:
            if remove_on_error:
                tmp.unlink(missing_ok=True)
            with self._dirs_lock:
                self._dirs_made.discard(final.parent)
            raise SpoolError.of(exc) from exc

    # -- start-up --------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Make the index match the disk after a crash.

        Removes half-written temporary files and indexes complete instance files whose row was
        never committed (a crash between rename and commit; such an instance was never
        acknowledged, so the sender resends and the duplicate check absorbs it).
        Returns (temporary files removed, instances indexed).
        """
        removed = 0
        for tmp in self.tmp_dir.iterdir():
            tmp.unlink(missing_ok=True)
            removed += 1
        known = self.index.known_instances()
        added = 0
        for study in self.dir.iterdir():
            if study.name.startswith(".") or not study.is_dir():
                continue
            for series in study.iterdir():
                if not series.is_dir():
                    continue
                for f in series.glob("*.dcm"):
                    sop = f.name[: -len(".dcm")]
                    if sop in known:
                        continue
                    try:
                        meta = read_file_meta_info(f)
                    except Exception:  # noqa: BLE001 - a file we cannot read is set aside
                        log.warning("spool recovery: unreadable file %s set aside", f)
                        f.rename(f.with_suffix(".unreadable"))
                        continue
                    row = InstanceRow(
                        sop, study.name, series.name, str(meta.MediaStorageSOPClassUID),
                        str(meta.TransferSyntaxUID), f.stat().st_size,
                    )
                    self.index.record_instance(row, "", "")
                    added += 1
        return removed, added

    # -- hand-off --------------------------------------------------------------------------

    def mark_stable(self, now: float) -> list[str]:
        return self.index.mark_stable(now - self.settings.stable_after_s, now)

    def hand_off(self, handler: StableStudyHandler) -> int:
        """Hand every stable study not yet handed on to ``handler``; return how many were."""
        handed = 0
        for study_uid, revision in self.index.pending_handoffs():
            study = StableStudy(
                study_uid,
                revision,
                self.dir / study_uid,
                tuple(self.index.study_instances(study_uid)),
                self.index.instance_aets(study_uid),
            )
            try:
                routed = handler(study)
                if routed is not None:
                    self.index.set_routed(study_uid, list(routed.job_ids), routed.note)
            except Exception:
                log.exception("hand-off of study %s revision %d failed; will retry",
                              study_uid, revision)
                continue
            if self.index.mark_handed(study_uid, revision):
                handed += 1
        return handed

    def remove_study(self, study_uid: str, revision: int) -> int:
        """Remove the files of a done (or unrouted) study, instance by instance, each under its
        store lock so that a resend of the same instance cannot be acknowledged and then
        removed. Stops if the study receives something meanwhile. Returns files removed."""
        removed = 0
        for row in self.index.study_instances(study_uid):
            with self._locks[hash(row.sop_instance_uid) % len(self._locks)]:
                if not self.index.forget_instance(study_uid, revision, row.sop_instance_uid):
                    return removed  # a new revision began: it keeps what is left
                self.instance_path(row.study_uid, row.series_uid,
                                   row.sop_instance_uid).unlink(missing_ok=True)
                removed += 1
        if self.index.mark_removed(study_uid, revision):
            study = self.dir / study_uid
            with self._dirs_lock:
                for folder in [*(p for p in study.glob("*") if p.is_dir()), study]:
                    self._dirs_made.discard(folder)
                    with contextlib.suppress(OSError):  # not empty: something arrived
                        folder.rmdir()
        return removed

    def summaries(self) -> list[StudySummary]:
        return self.index.summaries()

