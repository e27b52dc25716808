"""``synthnode deidentify``: de-identify files and folders into an output folder.

Each worker process keeps one :class:`Deidentifier`; the main process collects results, shows
progress and appends the honest-broker mapping (it alone writes that file). Outputs are laid
out by their new UIDs, ``<out>/<Study>/<Series>/<SOP Instance>.dcm``: input file names may hold
names or IDs and never reach the output. One bad file never stops the others.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from node.config import DeidOutput, Settings
from node.deid.engine import DeidentificationError, Deidentifier, Quarantined
from node.deid.pixels import Inpainter
from node.dicom import NewIdentity, Pixels, build_sc, carried_spacing
from node.errors import describe, describe_unreadable
from node.files import atomic_write


class Fate(StrEnum):
    """What became of one input file."""

    WRITTEN = "written"
    QUARANTINED = "quarantined"
    """Not written: it could not be de-identified safely (the reason says why)."""
    UNREADABLE = "unreadable"
    """Not DICOM, or damaged."""


@dataclass(frozen=True)
class Identity:
    """What identifies one instance: its patient and its UIDs."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_of_reference_uid: str | None
    """None where the instance has no Frame of Reference."""

    @classmethod
    def of(cls, ds: Dataset) -> Identity:
        return cls(str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or ""),
                   str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                   str(ds.get("SOPInstanceUID", "")),
                   str(ds.FrameOfReferenceUID) if ds.get("FrameOfReferenceUID") else None)


@dataclass(frozen=True)
class Mapping:
    """One line of the honest-broker file: an instance as it came and as it was written."""

    original: Identity
    new: Identity

    def as_json(self) -> dict[str, str | None]:
        """The line's fields: ``patient_id``, ``patient_name``, ``pseudonym``,
        ``pseudonym_name``, then for each UID its original and ``new_`` value."""
        line: dict[str, str | None] = {
            "patient_id": self.original.patient_id, "patient_name": self.original.patient_name,
            "pseudonym": self.new.patient_id, "pseudonym_name": self.new.patient_name,
        }
        for name in _UID_FIELDS:
            line[name] = getattr(self.original, name)
            line[f"new_{name}"] = getattr(self.new, name)
        return line


_UID_FIELDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid",
               "frame_of_reference_uid")


@dataclass(frozen=True)
class FileResult:
    source: str
    fate: Fate
    detail: str
    """The output path when written, else the reason (no patient data)."""
    mapping: Mapping | None = None
    """The original identity and the new one, for the honest broker."""


@dataclass
class Summary:
    results: list[FileResult] = field(default_factory=list)

    def of(self, fate: Fate) -> list[FileResult]:
        return [r for r in self.results if r.fate is fate]

    @property
    def ok(self) -> bool:
        return all(r.fate is Fate.WRITTEN for r in self.results)


def collect(paths: Sequence[Path]) -> list[Path]:
    """Files named, and every file below folders named, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def as_secondary_capture(deid: Deidentifier, ds: Dataset) -> Dataset:
    """The de-identified ``ds`` rewritten as a Secondary Capture by the SC writer."""
    if int(ds.get("PixelRepresentation", 0)) != 0:
        raise DeidentificationError(
            "SC output needs unsigned pixel data (Pixel Representation 0): use "
            '[deid] output = "source" for this image'
        )
    if "PixelData" not in ds:
        raise Quarantined("not an image (no Pixel Data): a Secondary Capture cannot be made "
                          'from it (use [deid] output = "source" to pass such objects on)')
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many kinds
        raise Quarantined(f"pixel data cannot be decoded for a Secondary Capture "
                          f"({describe(exc)})") from None
    color = int(ds.get("SamplesPerPixel", 1)) == 3
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        frames = frames[None]
    photometric = "RGB" if color else str(ds.PhotometricInterpretation)
    try:
        pixels = Pixels(frames, photometric, bits_stored=None if color else int(ds.BitsStored),
                        pixel_spacing=carried_spacing(ds))
    except ValueError as exc:  # the SC writer's: it names the property that does not fit
        raise Quarantined(f"cannot be written as a Secondary Capture: {exc}") from None
    identity = NewIdentity(
        patient_name=str(ds.PatientName), patient_id=str(ds.PatientID),
        study_instance_uid=str(ds.StudyInstanceUID), study_id=str(ds.get("StudyID", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
    )
    record = deid.record(
        burned_in=ds.get("BurnedInAnnotation") == "YES",
        recognizable=ds.get("RecognizableVisualFeatures") == "YES",
    )
    return build_sc([ds], pixels, record, deid.output, identity=identity)


def deidentify_to_bytes(deid: Deidentifier, source: Dataset, output: DeidOutput
                        ) -> tuple[Dataset, bytes]:
    """``source`` de-identified (in place: callers read it from disk) into the IOD ``output``
    asks for, and its file bytes after the safety scan; raises :class:`Quarantined`."""
    identifiers = deid.identifiers(source)
    result = deid.deidentify(source, in_place=True, identifiers=identifiers)
    if output is DeidOutput.SC:
        result = as_secondary_capture(deid, result)
    return result, deid.encode(result, identifiers)


def deidentify_to_file(deid: Deidentifier, source: Dataset, output: DeidOutput,
                       folder: Path) -> tuple[Dataset, Path]:
    """:func:`deidentify_to_bytes`, written to ``folder/<SOPInstanceUID>.dcm`` without the
    file's bytes ever in memory (a 1 GB multi-frame instance is held once, as ``source``)."""
    identifiers = deid.identifiers(source)
    result = deid.deidentify(source, in_place=True, identifiers=identifiers)
    if output is DeidOutput.SC:
        result = as_secondary_capture(deid, result)
    target = folder / f"{result.SOPInstanceUID}.dcm"
    deid.write(result, identifiers, target)
    return result, target


# -- worker side ---------------------------------------------------------------------------

_worker: dict[str, object] = {}


def _init_worker(
    settings: Settings, out_dir: Path, inpainter_factory: Callable[[], Inpainter] | None
) -> None:
    inpainter = inpainter_factory() if inpainter_factory is not None else None
    _worker["deid"] = Deidentifier(settings.deid, settings.output, inpainter=inpainter)
    _worker["settings"] = settings
    _worker["out"] = out_dir


def _process(path: Path) -> FileResult:
    deid = _worker["deid"]
    settings = _worker["settings"]
    out_dir = _worker["out"]
    assert isinstance(deid, Deidentifier) and isinstance(settings, Settings)
    assert isinstance(out_dir, Path)
    try:
        source = dcmread(path)
        source.SOPInstanceUID  # noqa: B018 - fail here on a damaged header
    except (InvalidDicomError, OSError, AttributeError, ValueError, KeyError) as exc:
        return FileResult(str(path), Fate.UNREADABLE, describe_unreadable(exc))
    original = Identity.of(source)  # before de-identification changes it in place
    try:
        output, data = deidentify_to_bytes(deid, source, settings.deid.output)
    except Quarantined as exc:
        return FileResult(str(path), Fate.QUARANTINED, str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the others
        return FileResult(str(path), Fate.QUARANTINED,
                          f"cannot be de-identified: {describe(exc)}")
    target = out_dir / str(output.StudyInstanceUID) / str(output.SeriesInstanceUID) / (
        f"{output.SOPInstanceUID}.dcm")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data)
    return FileResult(str(path), Fate.WRITTEN, str(target), Mapping(original, Identity.of(output)))


# -- main side -----------------------------------------------------------------------------

def record_mappings(path: Path, mappings: Iterable[Mapping]) -> int:
    """Append the mappings not yet in the honest-broker file ``path``, one JSON object a line
    (:meth:`Mapping.as_json`); the file is created 0600, locked while read and appended (several
    processes may call this at once) and synced. Returns how many lines were new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        seen = {_canonical(json.loads(line)) for line in f.read().splitlines() if line}
        new = []
        for mapping in dict.fromkeys(mappings):
            line = mapping.as_json()
            if _canonical(line) not in seen:
                seen.add(_canonical(line))
                new.append(line)
        for line in new:
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(new)


def _canonical(line: object) -> str:
    return json.dumps(line, sort_keys=True)


def run(paths: Sequence[Path], out_dir: Path, settings: Settings, workers: int = 1,
        progress: bool = True,
        inpainter_factory: Callable[[], Inpainter] | None = None) -> Summary:
    """De-identify every file of ``paths`` into ``out_dir``; ``inpainter_factory`` makes, in
    each worker, the generative inpainting that pixel rules with fill "inpaint" use."""
    Deidentifier(settings.deid, settings.output)  # fail fast on bad settings (e.g. no key)
    files = collect(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    bar = tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, workers), _init_worker, (settings, out_dir, inpainter_factory)) as pool:
        chunk = max(1, min(64, len(files) // (4 * max(1, workers))))
        for result in pool.imap_unordered(_process, files, chunksize=chunk):
            summary.results.append(result)
            bar.update()
    bar.close()
    broker = settings.deid.honest_broker_file
    if broker is not None:
        record_mappings(broker, (r.mapping for r in summary.results if r.mapping is not None))
    return summary
