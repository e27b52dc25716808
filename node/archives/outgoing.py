"""What leaves the node: objects identified by their header, and one result per object sent."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite

from node.archives.retry import Outcome, RoundFn, permanent, run_rounds
from node.config import DispatchSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchResult:
    """The fate of one object at one destination."""

    destination: str
    """``orthanc <url>`` or ``AE@HOST:PORT``."""
    sop_instance_uid: str
    """"" when the object could not even be read."""
    ok: bool
    attempts: int
    """Times the object was offered to the destination (0: never, it could not be read)."""
    reason: str = ""
    """Why it failed; for a success, a note worth keeping (e.g. already stored), else ""."""


@dataclass(frozen=True)
class Outgoing:
    """One object to send, with the identifiers a destination negotiates on."""

    source: Path | Dataset
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    def part10_bytes(self) -> bytes:
        """The object as a DICOM file (preamble, File Meta Information, data set)."""
        if isinstance(self.source, Path):
            return self.source.read_bytes()
        buffer = BytesIO()
        dcmwrite(buffer, self.source, enforce_file_format=True)
        return buffer.getvalue()


@dataclass
class Made:
    """A job's outputs: files to deliver, and what was set aside and why."""

    files: list[Outgoing] = field(default_factory=list)
    """Identified as they were made, so that dispatch need not read their headers again."""
    quarantined: int = 0
    notes: list[str] = field(default_factory=list)
    made_from: dict[str, str] = field(default_factory=dict)
    """Output SOP Instance UID -> the source instance's, where one source made it (what a
    reviewer's header summary compares)."""
    series_of: dict[str, str] = field(default_factory=dict)
    """Output SOP Instance UID -> the source series it was made from (what a reviewer decides
    per series on)."""

    def add(self, path: Path, ds: Dataset, source_sop: str = "", source_series: str = "") -> None:
        """Add the output written to ``path`` from ``ds``, identified by ``ds``'s header
        (made from the instance ``source_sop`` of the series ``source_series``, when given)."""
        self.files.append(Outgoing(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                   str(ds.file_meta.TransferSyntaxUID)))
        if source_sop:
            self.made_from[str(ds.SOPInstanceUID)] = source_sop
        if source_series:
            self.series_of[str(ds.SOPInstanceUID)] = source_series


def log_outcome(logger: logging.Logger, where: str, item: Outgoing, outcome: Outcome,
                job_id: str) -> None:
    """One line for one object's fate at ``where``: debug when sent, a warning when not."""
    if outcome.ok:
        logger.debug("%s: %s sent (job %s)%s", where, item.sop_instance_uid, job_id,
                     f": {outcome.reason}" if outcome.reason else "")
    else:
        logger.warning("%s: %s not sent (job %s): %s", where, item.sop_instance_uid, job_id,
                       outcome.reason)


ObjectLike = str | os.PathLike[str] | Dataset | Outgoing
"""A DICOM file (path to a Part 10 file), a data set with File Meta Information, or an
:class:`Outgoing` (a file already identified by its producer: its header is not read again)."""


def load(obj: ObjectLike) -> Outgoing:
    """Identify ``obj`` from its header (a file's pixel data is not read); ValueError naming
    what is missing or inconsistent. Messages never contain element values other than UIDs."""
    if isinstance(obj, Outgoing):
        return obj
    if isinstance(obj, Dataset):
        ts = obj.file_meta.get("TransferSyntaxUID") if hasattr(obj, "file_meta") else None
        sop_class, sop_instance = obj.get("SOPClassUID"), obj.get("SOPInstanceUID")
        if not ts:
            raise ValueError("data set has no File Meta Information Transfer Syntax UID "
                             "(0002,0010)")
        if not sop_class or not sop_instance:
            raise ValueError("data set has no SOP Class UID (0008,0016) or SOP Instance UID "
                             "(0008,0018)")
        return Outgoing(obj, str(sop_class), str(sop_instance), str(ts))

    path = Path(obj)
    try:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except OSError as exc:
        raise ValueError(f"file cannot be read ({exc.strerror})") from None
    except InvalidDicomError:
        raise ValueError("not a DICOM file (no DICM prefix)") from None
    except Exception as exc:  # pydicom raises many kinds on a damaged header
        raise ValueError(f"DICOM header cannot be parsed ({type(exc).__name__})") from None
    meta = ds.file_meta
    missing = [k for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID",
                           "MediaStorageSOPInstanceUID") if not meta.get(k)]
    if missing:
        raise ValueError(f"File Meta Information lacks {', '.join(missing)}")
    for meta_kw, ds_kw in (("MediaStorageSOPClassUID", "SOPClassUID"),
                           ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if ds.get(ds_kw) and str(ds[ds_kw].value) != str(meta[meta_kw].value):
            raise ValueError(f"{meta_kw} {meta[meta_kw].value} differs from the data set's "
                             f"{ds_kw} {ds[ds_kw].value}")
    return Outgoing(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID))


def load_all(objects: list[ObjectLike]) -> tuple[list[Outgoing | None], dict[int, str]]:
    """:func:`load` each object; the unreadable ones are None, with their reason by index."""
    loaded: list[Outgoing | None] = []
    errors: dict[int, str] = {}
    for i, obj in enumerate(objects):
        try:
            loaded.append(load(obj))
        except ValueError as exc:
            loaded.append(None)
            errors[i] = str(exc)
    return loaded, errors


def deliver(
    destination: str,
    objects: Sequence[ObjectLike],
    make_round: Callable[[list[Outgoing | None]], RoundFn],
    settings: DispatchSettings,
    stop: threading.Event | None,
    what: str,
) -> list[DispatchResult]:
    """Identify ``objects``, offer the readable ones to a destination in retried rounds
    (``make_round(items)`` gives the function that offers them once), and return one result per
    object in the order given; unreadable objects fail with 0 attempts. ``what`` names the
    transfer in logs."""
    items, unreadable = load_all(list(objects))
    progress = run_rounds(
        len(items), make_round(items), settings,
        first={i: permanent(reason) for i, reason in unreadable.items()},
        stop=stop, what=what,
    )
    results = [
        DispatchResult(destination, item.sop_instance_uid if item else "", p.ok, p.attempts,
                       p.reason)
        for item, p in zip(items, progress, strict=True)
    ]
    failed = sum(1 for r in results if not r.ok)
    log.info("%s: %d sent, %d failed", what, len(results) - failed, failed)
    return results


# Stamped with the time an output is made, so a re-made output differs there only.
_STAMPS = frozenset({
    0x00080012, 0x00080013,  # Instance Creation Date, Time
    0x00080023, 0x00080033,  # Content Date, Time
    0x00181012, 0x00181014,  # Date, Time of Secondary Capture
    0x0018A002,  # Contribution DateTime (in Contributing Equipment items)
})
_PIXEL_DATA = 0x7FE00010


def difference(stored: Dataset, sent: Dataset) -> str:
    """The first attribute (keyword, or tag) in which ``sent`` differs from ``stored``, ""
    when none does: the time stamps of :data:`_STAMPS` aside, and Pixel Data aside where both
    are generated (Synthetic Data YES, Conversion Type SYN), whose Derivation Description
    records the model, weights, seed and every parameter."""
    generated = all(str(d.get("SyntheticData", "")).upper() == "YES"
                    and str(d.get("ConversionType", "")).upper() == "SYN" for d in (stored, sent))
    return _first_difference(stored, sent, skip_pixels=generated)


def _first_difference(a: Dataset, b: Dataset, skip_pixels: bool) -> str:
    tags = sorted(set(a.keys()) | set(b.keys()))
    for tag in tags:
        if tag in _STAMPS or (skip_pixels and tag == _PIXEL_DATA) or tag.element == 0:
            continue
        name = (a[tag] if tag in a else b[tag]).keyword or str(tag)
        if tag not in a or tag not in b:
            return name
        x, y = a[tag], b[tag]
        if x.VR == "SQ" and y.VR == "SQ":
            if len(x.value) != len(y.value):
                return name
            for p, q in zip(x.value, y.value, strict=True):
                inner = _first_difference(p, q, skip_pixels)
                if inner:
                    return f"{name} > {inner}"
        elif x.value != y.value:
            return name
    return ""
