"""The review gate: jobs whose outputs are staged until a reviewer approves or rejects them
(``review = true`` on a task or a destination), and what a reviewer is shown of them.

A reviewer sees the outputs (de-identified or synthetic: what would leave the node), never the
source: thumbnails of the staged objects and a summary of what changed in their header, each
change with the output's value only.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import Settings, TaskKind
from node.jobs.manifest import Manifest
from node.jobs.queue import Queues
from node.jobs.state import Job, JobState, JobStore, needs_review

__all__ = ["needs_review", "held", "count_held", "staged_outputs", "series_groups", "output_series",
           "decide",
           "header_summary", "thumbnail_png", "HeaderChange"]


def held(store: JobStore, offset: int = 0, limit: int = 50) -> list[Job]:
    """Jobs waiting for review, newest first."""
    return store.page(JobState.REVIEW, offset, limit)


def count_held(store: JobStore) -> int:
    return store.count_by_state()[JobState.REVIEW]


def staged_outputs(settings: Settings, job: Job) -> list[Path]:
    """The files a job would deliver: its manifest's outputs (a forward held for review
    stages links to its originals there too; one staged before that: the spooled originals,
    found through the spool's folder layout)."""
    made = Manifest.load(settings.jobs.work_dir / job.id, job.revision)
    if made is None and job.task.task is TaskKind.FORWARD:
        root = settings.spool.dir / job.study_uid
        return sorted(p for s in job.series_uids for p in (root / s).glob("*.dcm"))
    return [] if made is None else [o.source for o in made.files if isinstance(o.source, Path)]


def series_groups(settings: Settings, job: Job) -> dict[str, list[int]]:
    """The staged outputs by the source series they come from: each series' outputs as
    indexes into :func:`staged_outputs` (in the job's series order; "" for outputs not made
    from one series, which only a decision on the whole job decides)."""
    made = Manifest.load(settings.jobs.work_dir / job.id, job.revision)
    if made is None:
        return {}
    groups: dict[str, list[int]] = {s: [] for s in job.series_uids}
    for n, item in enumerate(f for f in made.files if isinstance(f.source, Path)):
        groups.setdefault(made.series_of.get(item.sop_instance_uid, ""), []).append(n)
    return {s: found for s, found in groups.items() if found}


def output_series(settings: Settings, job: Job) -> dict[str, int]:
    """How many staged outputs come from each source series (see :func:`series_groups`)."""
    return {s: len(found) for s, found in series_groups(settings, job).items()}


def decide(queues: Queues, target: str, approve: bool, user: str, reason: str,
           revision: int | None = None, series: str | None = None,
           settings: Settings | None = None) -> list[Job]:
    """Approve or reject ``target``: a job id, or a study UID (every job of it in review);
    with ``series`` (a source series UID; needs ``settings``), only the outputs made from that
    series, the job staying in review until each of its series is decided. KeyError when
    nothing matches; ValueError for a job not in review or a rejection without a reason."""
    job = queues.store.get(target)
    if job is not None:
        jobs = [job]
    else:
        jobs = [j for j in queues.store.page(JobState.REVIEW, 0, 100_000, target)
                if j.study_uid == target]
        if not jobs:
            raise KeyError(f'no job "{target}" and no study of that UID in review')
    # ``revision``: the one the reviewer was shown (a job decided by its id)
    seen = revision if job is not None else None
    if series is None:
        act = queues.approve if approve else queues.reject
        return [act(j.id, user, reason, seen) for j in jobs]
    if settings is None:
        raise TypeError("a decision per series needs the settings (to read the outputs)")
    if not series:
        raise ValueError("name the source series (its UID) to decide on")
    held_series = {j.id: output_series(settings, j) for j in jobs}
    if job is None:  # a study: its jobs that hold outputs of the series
        jobs = [j for j in jobs if series in held_series[j.id]]
        if not jobs:
            raise KeyError(f"no job of study {target} in review holds outputs of series "
                           f"{series}")
    return [queues.decide_series(j.id, series, approve, user, reason, list(held_series[j.id]),
                                 seen) for j in jobs]


# -- what a reviewer sees -----------------------------------------------------------------------

@dataclass(frozen=True)
class HeaderChange:
    tag: str
    keyword: str
    action: str
    """removed, replaced, added (or kept, when asked for)."""
    value: str
    """The output's value (empty when removed); never the source's."""


def _source_of(settings: Settings, job: Job, output: Dataset) -> Path | None:
    """The spooled source an output was made from: as the job's manifest records it, else
    the same SOP Instance UID (a forward), else what its Source Image Sequence names."""
    root = settings.spool.dir / job.study_uid
    sop = str(output.get("SOPInstanceUID", ""))
    made = Manifest.load(settings.jobs.work_dir / job.id, job.revision)
    refs = [made.made_from[sop]] if made is not None and sop in made.made_from else []
    refs += [sop] + [str(item.ReferencedSOPInstanceUID) for item in
                     output.get("SourceImageSequence", [])
                     if "ReferencedSOPInstanceUID" in item]
    for series in job.series_uids:
        for sop in refs:
            candidate = root / series / f"{sop}.dcm"
            if candidate.exists():
                return candidate
    return None


def header_summary(settings: Settings, job: Job, output: Path, source: Path | None = None,
                   kept: bool = False) -> list[HeaderChange]:
    """What the output's header holds against its source: elements removed, replaced and
    added (top level; sequences compared as a whole), with the output's values. With no
    source found (the de-identified UIDs name none) every element counts as added."""
    out = dcmread(output, stop_before_pixels=True)
    src_path = source or _source_of(settings, job, out)
    src = dcmread(src_path, stop_before_pixels=True) if src_path is not None else Dataset()
    changes: list[HeaderChange] = []
    tags = sorted(set(out.keys()) | set(src.keys()))
    for tag in tags:
        if tag.group == 0x7FE0:
            continue
        a, b = src.get(tag), out.get(tag)
        if b is None:
            action = "removed"
        elif a is None:
            action = "added"
        elif a.value != b.value:
            action = "replaced"
        else:
            if not kept:
                continue
            action = "kept"
        elem = b if b is not None else a
        value = "" if b is None else _show(b)
        changes.append(HeaderChange(f"({tag.group:04X},{tag.element:04X})",
                                    elem.keyword or "(private)", action, value))
    return changes


def _show(elem: object) -> str:
    vr = getattr(elem, "VR", "")
    if vr == "SQ":
        return f"{len(getattr(elem, 'value', []))} items"
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return f"({vr}, {len(getattr(elem, 'value', b'') or b'')} bytes)"
    text = str(getattr(elem, "value", ""))
    return text if len(text) <= 80 else text[:77] + "..."


def thumbnail_png(path: Path, size: int = 256) -> bytes:
    """A PNG of the object's first frame, scaled to fit ``size`` px and windowed to 8 bits
    (MONOCHROME1 inverted); an object without pixels gives a grey square."""
    ds = dcmread(path)
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception:  # noqa: BLE001 - a thumbnail of an object without pixels is a blank
        pixels = np.full((size, size), 128, dtype=np.uint8)
        return _png(pixels)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    rgb = pixels.ndim == 3 and pixels.shape[-1] in (3, 4)
    step = max(1, int(np.ceil(max(pixels.shape[0], pixels.shape[1]) / size)))
    pixels = pixels[::step, ::step]
    if rgb:
        img = pixels[..., :3].astype(np.float64)
        if str(getattr(ds, "PhotometricInterpretation", "")).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            img = convert_color_space(pixels[..., :3], str(ds.PhotometricInterpretation),
                                      "RGB").astype(np.float64)
    else:
        img = pixels.astype(np.float64)
    lo, hi = np.percentile(img, 0.5), np.percentile(img, 99.5)
    scaled = np.clip((img - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    if not rgb and str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255 - scaled
    return _png(scaled)


def _png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale or RGB PNG (zlib: no imaging library needed)."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")
    out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)))
    out.write(chunk(b"IDAT", zlib.compress(raw, 6)))
    out.write(chunk(b"IEND", b""))
    return out.getvalue()
