"""What every kind of archive offers: it takes objects (send), and where it can, it lists its
studies (find, series) and hands their files over (fetch).

One subclass of :class:`Archive` per kind, each in its own module beside this one, built from
its ``[[destinations]]`` entry (a member of :data:`node.config.Destination`) by
:func:`node.archives.open_archive`. A job's :class:`Source` names the archive a study is
fetched from, or the spool.
"""

from __future__ import annotations

import datetime
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from pydicom.dataset import Dataset

from node.archives.outgoing import DispatchResult, ObjectLike
from node.config import DestinationKind, Settings


class SourceKind(StrEnum):
    """Where a job's study is read from."""

    SPOOL = "spool"
    """The node's own spool: the files lie in ``[spool] dir``."""

    ORTHANC = "orthanc"
    """An Orthanc, over REST (or in-process, from the plugin)."""

    DICOM = "dicom"
    """A DICOM peer (a PACS), by C-GET."""

    DICOMWEB = "dicomweb"
    """A DICOMweb server, by WADO-RS."""


@dataclass(frozen=True)
class Source:
    """Where a job's study comes from: the spool, or one archive (a ``[[destinations]]``
    entry, ``orthanc`` for ``[orthanc]``) and that archive's own id of the study."""

    kind: SourceKind = SourceKind.SPOOL
    archive: str = ""
    """The destination name; "" for the spool."""
    study: str = ""
    """The archive's id of the study (Orthanc's id; the Study Instance UID elsewhere)."""

    def __post_init__(self) -> None:
        kind = SourceKind(self.kind)  # (a record read back from JSON holds a str)
        object.__setattr__(self, "kind", kind)
        if kind is SourceKind.SPOOL and self.archive:
            raise ValueError("a spool source has no archive name")
        if kind is not SourceKind.SPOOL and not self.archive:
            raise ValueError(f"a {kind.value} source needs an archive name")
        if kind is not SourceKind.SPOOL and not self.study:
            raise ValueError(f'a source in "{self.archive}" needs the archive\'s id of the study')

    @property
    def fetched(self) -> bool:
        """Whether the study is downloaded for the job (not read in place from the spool)."""
        return self.kind is not SourceKind.SPOOL


SPOOL = Source()


@dataclass(frozen=True)
class FoundStudy:
    """A study an archive holds, as its search answered."""

    key: str
    """The archive's id of the study (what :meth:`Archive.fetch` and :class:`Source` take)."""
    study_uid: str
    study_date: str
    instances: int
    """Instances it holds now (0: not said by the search; the series then tell)."""


@dataclass(frozen=True)
class FoundSeries:
    """One series of a found study, with what rules look at."""

    series_uid: str
    header: Dataset
    """A stand-in header: a real one (Orthanc, DICOMweb metadata) or a series-level C-FIND
    answer (Modality, Series Description, Body Part Examined)."""
    instances: int = 0
    calling_aet: str = ""
    called_aet: str = ""
    own: bool = False
    """The archive knows it for the node's output (e.g. Orthanc's job metadata); the mark in
    the header (:func:`node.dicom.own_output`) is for the reader to check."""


class ArchiveError(Exception):
    """An archive could not be searched, read or written; the message names the archive and
    what failed (AE titles, URLs, UIDs, status codes: no patient data). ``permanent`` when no
    retry can mend it."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class StudyGone(ArchiveError):
    """The archive no longer holds the study."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class Archive(ABC):
    """One archive the node exchanges studies with: a ``[[destinations]]`` entry of one kind."""

    kind: ClassVar[DestinationKind]
    searchable: ClassVar[bool] = False
    """Whether :meth:`find`, :meth:`series` and :meth:`fetch` work for this kind."""

    def __init__(self, destination: Any, settings: Settings) -> None:
        self.destination = destination
        self.settings = settings
        self.name: str = destination.name

    @property
    @abstractmethod
    def label(self) -> str:
        """How results and logs name it: ``orthanc <url>``, ``AE@HOST:PORT``, ..."""

    @abstractmethod
    def send(self, objects: Sequence[ObjectLike], job_id: str, task: str,
             stop: threading.Event | None = None, calling_aet: str | None = None
             ) -> list[DispatchResult]:
        """Store ``objects``, retried as ``[dispatch]`` says; one result per object."""

    def find(self, since: datetime.date, until: datetime.date | None = None
             ) -> list[FoundStudy]:
        """The studies with a Study Date in [since, until], oldest first."""
        raise ArchiveError(f'"{self.name}" ({self.kind.value}) cannot be searched',
                           permanent=True)

    def count(self, study: FoundStudy) -> int:
        """How many instances the study holds, where the archive says so cheaply; 0 when only
        :meth:`series` can tell."""
        return 0

    def series(self, study: FoundStudy) -> list[FoundSeries]:
        """The study's series; :class:`StudyGone` when it is no longer there."""
        raise ArchiveError(f'"{self.name}" ({self.kind.value}) cannot be searched',
                           permanent=True)

    def fetch(self, study: str, study_uid: str, series_uids: Sequence[str], folder: Path
              ) -> list[Path]:
        """Download the study's ``series_uids`` (``study``: the archive's id of it) into
        ``folder/<Series Instance UID>/``, one Part 10 file per instance (``*.dcm``, named by
        the archive's id of the instance), its data set and transfer syntax as stored."""
        raise ArchiveError(f'"{self.name}" ({self.kind.value}) cannot be fetched from',
                           permanent=True)

    def problems(self) -> list[ArchiveError]:
        """What keeps it from working, checked now (``synthnode check``), each ``permanent``
        when it will not mend by itself (credentials, configuration); [] when fine."""
        return []

    def close(self) -> None:  # noqa: B027 - most kinds hold no connection
        """Free connections."""

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
