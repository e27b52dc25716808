"""Archives: the systems the node exchanges studies with, one module per kind, each with its
send and, where the kind can, its find, series and fetch (:class:`Archive`):

- ``orthanc``: an Orthanc over REST (``[orthanc]`` is the one named "orthanc");
- ``dimse``: a DICOM peer, a PACS (C-STORE; C-FIND and C-GET);
- ``dicomweb``: a DICOMweb server (STOW-RS; QIDO-RS and WADO-RS).

A ``[[destinations]]`` entry's kind (:data:`node.config.Destination`) names its module; a job's
:class:`Source` says where its study is read from (the spool, or an archive). Every object the
node produces leaves through an archive's send, with retries of transient failures
(``[dispatch]``) and one :class:`DispatchResult` per object. Logs and results name SOP Instance
UIDs, job ids and AE titles, never patient data.
"""

from __future__ import annotations

import importlib
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from node.archives.base import (
    SPOOL,
    Archive,
    ArchiveError,
    FoundSeries,
    FoundStudy,
    Source,
    SourceKind,
    StudyGone,
)
from node.archives.outgoing import DispatchResult, ObjectLike, Outgoing
from node.config import Destination, Settings


def open_archive(destination: str | Destination, settings: Settings) -> Archive:
    """The archive of ``destination`` (a name: "orthanc" or a ``[[destinations]]`` entry);
    KeyError naming the known ones for an unknown name."""
    if isinstance(destination, str):
        destination = settings.destination(destination)
    module = importlib.import_module(destination.module)
    archive: Archive = module.ARCHIVE(destination, settings)
    return archive


def send_to(
    objects: Sequence[ObjectLike], name: str, settings: Settings, job_id: str, task: str,
    stop: threading.Event | None = None, calling_aet: str | None = None,
) -> list[DispatchResult]:
    """Send ``objects`` to the destination called ``name`` (an Orthanc: marked with ``job_id``
    and ``task``; a DICOM peer: C-STORE as ``calling_aet``). KeyError for an unknown name."""
    with open_archive(name, settings) as archive:
        return archive.send(objects, job_id, task, stop=stop, calling_aet=calling_aet)


def read_source(source: Source, study_uid: str, series_uids: Sequence[str],
                settings: Settings, folder: Path) -> list[Path]:
    """The files of a job's series: in the spool where they lie, else fetched from the
    source's archive into ``folder`` (emptied first). :class:`ArchiveError` (``permanent``
    when no retry can mend it) naming where and why."""
    if source.kind is SourceKind.SPOOL:
        study = settings.spool.dir / study_uid
        files = [f for s in series_uids for f in sorted((study / s).glob("*.dcm"))]
        if not files:
            raise ArchiveError(f"study {study_uid}: no instance of its series in the spool "
                               f"{settings.spool.dir} (removed, or not shared with this "
                               "worker)", permanent=True)
        return files
    try:
        destination = settings.destination(source.archive)
    except KeyError as exc:
        raise ArchiveError(str(exc.args[0]), permanent=True) from None
    if destination.kind.value != source.kind.value:
        raise ArchiveError(f'the job reads study {study_uid} from "{source.archive}" as a '
                           f"{source.kind.value} archive, which is now configured as "
                           f"{destination.kind.value}", permanent=True)
    shutil.rmtree(folder, ignore_errors=True)
    with open_archive(destination, settings) as archive:
        files = archive.fetch(source.study, study_uid, series_uids, folder)
        if not files:
            raise ArchiveError(f"study {study_uid}: {archive.label} holds none of the job's "
                               "series", permanent=True)
    return files


__all__ = [
    "SPOOL",
    "Archive",
    "ArchiveError",
    "DispatchResult",
    "FoundSeries",
    "FoundStudy",
    "ObjectLike",
    "Outgoing",
    "Source",
    "SourceKind",
    "StudyGone",
    "open_archive",
    "read_source",
    "send_to",
]
