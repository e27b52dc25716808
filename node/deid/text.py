"""Finding text burned into pixels: display views, a text detector and a recognizer that ship
inside a package (RapidOCR's PP-OCR models on onnxruntime), and the decision what each piece
of text is (allowlisted, identifying, other).

Nothing here downloads anything: the models are read from the ``rapidocr`` wheel's own folder.
Nothing here logs or returns patient data except :attr:`Found.text`, which callers must treat
as patient data (it is never logged, and reasons name regions by coordinates only).

How text is found in one frame:

1. the frame is rendered to 8-bit display values three ways (:func:`views`): the header's VOI
   window (or a percentile stretch), a full min-max stretch (text beyond the window), and a
   local-contrast (CLAHE) stretch of the first (low-contrast text inside the anatomy); the
   three are stacked as the detector's three colour channels, so one pass sees all three;
2. the frame is scaled so that small images are enlarged (text a few pixels high becomes
   detectable) and large ones reduced (:func:`detection_scale`);
3. the detector's probability map is cut into text lines (:func:`_lines`): connected regions
   above a threshold, each kept when it is shaped like text (height within bounds), and a
   region too big for a line (the detector marks smooth anatomy as one big "text block") is
   cut again at higher thresholds, so text inside such a blob is not lost;
4. each line is straightened and read by the recognizer (vertical lines turned both ways), in
   batches; a line counts as text when it reads as letters or digits with some confidence and
   the reading fits its length (:func:`is_text`): what the detector marks in anatomy reads as
   nothing, or as one or two characters without confidence;
5. the reading decides the line's :class:`TextKind` (:class:`Policy`).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from node.deid.identifiers import Identifiers
from node.pixeldata import Region

DETECT_MIN_SIDE = 384
"""Frames whose shorter side is below this are enlarged to it (at most :data:`MAX_UPSCALE`)."""
DETECT_MAX_SIDE = 1024
"""Frames whose longer side is above this are reduced to it."""
MAX_UPSCALE = 2.0

_THRESHOLDS = (0.3, 0.5, 0.7, 0.85)
"""Probability levels at which the detector's map is cut into lines, lowest first."""
_MIN_LINE_PX = 5
"""A line lower than this (detection pixels) is noise."""
_MAX_LINE_FRACTION = 0.12
"""A line taller than this fraction of the frame's shorter side (and than 64 px) is a blob."""
_MIN_SCORE = 0.45
"""Mean probability a line must reach to count as text."""
_UNCLIP = 0.5
"""Lines are grown by this fraction of their height on each side (the DB map is tight)."""


class TextKind(StrEnum):
    """What a piece of found text is, for the policy."""

    IDENTIFYING = "identifying"
    """It matches one of the source's own identifying values: always hidden."""

    ALLOWED = "allowed"
    """Every token of it is on the allowlist (laterality, view, ruler): kept."""

    OTHER = "other"
    """Anything else (including text that could not be read): hidden."""


@dataclass(frozen=True)
class Found:
    """A line of text in one frame: the rectangle that holds it and its (rotated) outline, in
    stored-pixel coordinates; what was read there (patient data: never log it), how sure the
    recognizer was, and its kind."""

    frame: int
    region: Region
    outline: tuple[tuple[int, int], ...]
    text: str
    score: float
    kind: TextKind


def _models_dir() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).resolve().parent / "models"


DET_MODEL = "PP-OCRv6_det_small.onnx"
REC_MODEL = "PP-OCRv6_rec_small.onnx"


class TextFinder:
    """Detects and reads text lines in frames. Loads its models on first use (~0.3 s); one
    instance per process, used from one thread at a time (a lock guards it)."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._lock = threading.Lock()
        self._det: Any = None
        self._rec: Any = None

    def _detector(self) -> Any:
        if self._det is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._det = ort.InferenceSession(str(_models_dir() / DET_MODEL), options,
                                             providers=["CPUExecutionProvider"])
        return self._det

    def _recognizer(self) -> Any:
        if self._rec is None:
            from rapidocr import RapidOCR

            models = _models_dir()
            ocr = RapidOCR(params={
                "Global.log_level": "error",
                "Global.use_det": False, "Global.use_cls": False, "Global.use_rec": True,
                "Det.model_path": str(models / DET_MODEL),
                "Rec.model_path": str(models / REC_MODEL),
                "EngineConfig.onnxruntime.intra_op_num_threads": self.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                # crops are padded to the widest in their batch, not to 320 px: a short
                # line costs what its width costs
                "Rec.rec_img_shape": [3, 48, 48],
            })
            self._rec = ocr._load_rec_model()  # the recognizer alone, to read crops in batches
        return self._rec

    def lines(self, stacked: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Text lines in a (rows, columns, 3) uint8 image already at detection scale: each
        as its 4 corner points (float32, x/y in that image) and its mean probability."""
        rows, columns = stacked.shape[:2]
        height, width = -(-rows // 32) * 32, -(-columns // 32) * 32
        x = np.zeros((1, 3, height, width), np.float32)
        x[0, :, :rows, :columns] = np.moveaxis(stacked, -1, 0).astype(np.float32) / 127.5 - 1
        with self._lock:
            session = self._detector()
            prob = session.run(None, {session.get_inputs()[0].name: x})[0][0, 0]
        return _lines(prob[:rows, :columns])

    def read(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """The text of each straightened line crop (uint8, 2D) and the recognizer's
        confidence; a vertical crop is read turned left and turned right."""
        if not crops:
            return []
        from rapidocr.ch_ppocr_rec import TextRecInput

        images, owner = [], []
        for i, crop in enumerate(crops):
            turned = ((np.rot90(crop), np.rot90(crop, 3)) if crop.shape[0] > 1.5 * crop.shape[1]
                      else (crop,))
            for t in turned:
                images.append(np.repeat(np.ascontiguousarray(t)[..., None], 3, axis=-1))
                owner.append(i)
        with self._lock:
            result = self._recognizer()(TextRecInput(img=images))
        best: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for i, text, score in zip(owner, result.txts or (), result.scores, strict=True):
            if float(score) > best[i][1]:
                best[i] = (str(text), float(score))
        return best


@functools.cache
def shared_finder(threads: int = 1) -> TextFinder:
    """The process's one :class:`TextFinder` (models are loaded once per process)."""
    return TextFinder(threads)


# -- the probability map into lines ------------------------------------------------------------

def _lines(prob: np.ndarray) -> list[tuple[np.ndarray, float]]:
    rows, columns = prob.shape
    max_height = max(64.0, _MAX_LINE_FRACTION * min(rows, columns))
    found: list[tuple[np.ndarray, float]] = []

    def cut(mask: np.ndarray, level: int) -> None:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(
            mask.astype(np.uint8), connectivity=8)
        for label in range(1, count):
            x, y, w, h, area = stats[label]
            if min(w, h) < 2 or area < 6:
                continue
            component = labels[y:y + h, x:x + w] == label
            points = (np.argwhere(component)[:, ::-1] + np.array([x, y])).astype(np.int32)
            (cx, cy), (rw, rh), angle = cv2.minAreaRect(points)
            short = min(rw, rh)
            score = float(prob[y:y + h, x:x + w][component].mean())
            if short > max_height:
                if level + 1 < len(_THRESHOLDS):  # a blob: cut it again, higher
                    inner = np.zeros_like(mask)
                    sub = prob[y:y + h, x:x + w] > _THRESHOLDS[level + 1]
                    inner[y:y + h, x:x + w] = component & sub
                    cut(inner, level + 1)
                continue
            if short < _MIN_LINE_PX * 0.5 or score < _MIN_SCORE:
                continue
            grow = _UNCLIP * short + 1
            box = cv2.boxPoints(((cx, cy), (rw + 2 * grow, rh + 2 * grow), angle))
            found.append((box.astype(np.float32), score))

    cut(prob > _THRESHOLDS[0], 0)
    return found


def _crop(image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """The line ``box`` of ``image`` straightened (perspective transform to an upright
    rectangle)."""
    pts = _order(box)
    width = int(round(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3]))))
    height = int(round(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2]))))
    if width < 2 or height < 2:
        return None
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    matrix = cv2.getPerspectiveTransform(pts, target)
    return cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REPLICATE)


def _order(box: np.ndarray) -> np.ndarray:
    """4 points as top-left, top-right, bottom-right, bottom-left."""
    pts = np.asarray(box, np.float32).reshape(4, 2)
    s, d = pts.sum(axis=1), np.diff(pts, axis=1).ravel()
    return np.array([pts[np.argmin(s)], pts[np.argmin(d)], pts[np.argmax(s)],
                     pts[np.argmax(d)]], np.float32)


# -- display views ---------------------------------------------------------------------------

def detection_scale(rows: int, columns: int) -> float:
    """How much a frame is enlarged (> 1) or reduced (< 1) before detection."""
    short, long = min(rows, columns), max(rows, columns)
    if short < DETECT_MIN_SIDE:
        return min(MAX_UPSCALE, DETECT_MIN_SIDE / short, DETECT_MAX_SIDE / long)
    if long > DETECT_MAX_SIDE:
        return DETECT_MAX_SIDE / long
    return 1.0


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        high = low + 1
    out = (values - low) * (255.0 / (high - low))
    return np.clip(out, 0, 255).astype(np.uint8)


def _luminance(frame: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """A frame's values as one float channel: palette colour through its LUT, colour as
    luminance (decoded colour is RGB), grey through the modality LUT (rescale)."""
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
    if frame.ndim == 3:
        rgb = frame.astype(np.float32)
        return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    values = frame.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return values * slope + intercept


def _window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str)
                  else center)
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str)
                  else width)
    except (TypeError, ValueError):
        return None
    if w <= 1:
        return None
    return c - w / 2, c + w / 2


_CLAHE = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8))


@dataclass(frozen=True)
class Levels:
    """How a frame's values map to display values: its whole range and its window."""

    low: float
    high: float
    window: tuple[float, float]


def levels_of(values: np.ndarray, ds: Dataset, photometric: str, colour: bool) -> Levels:
    """The levels of one frame's values (:func:`_luminance`): the header's VOI window, else a
    1-99 percentile stretch."""
    window = None if colour or photometric == "PALETTE COLOR" else _window(ds)
    low, high = float(values.min()), float(values.max())
    if window is None:
        p1, p99 = np.percentile(values, (1, 99))
        window = (float(p1), float(p99)) if p99 > p1 else (low, high)
    return Levels(low, high, window)


def views(frame: np.ndarray, ds: Dataset, photometric: str, levels: Levels | None = None
          ) -> np.ndarray:
    """One frame in display space for the detector, (rows, columns, 3) uint8: the VOI window
    (or a 1-99 percentile stretch), a min-max stretch with the extreme values set apart, and a
    local-contrast stretch; MONOCHROME1 inverted so that every view shows what a reader
    sees. ``levels`` (:func:`levels_of`) fixes the mapping: a frame searched again after
    text was blanked in it is rendered as it was the first time."""
    values = _luminance(frame, ds, photometric)
    if levels is None:
        levels = levels_of(values, ds, photometric, frame.ndim == 3)
    lo, hi = levels.low, levels.high
    windowed = _stretch(values, *levels.window)
    # the whole range, with the extremes set apart: devices burn text at the highest (or
    # lowest) value, which may differ from bright anatomy around it by a few values only
    full = (_stretch(values, lo, hi) * (160 / 255) + 48).astype(np.uint8)
    full[values >= hi] = 255
    full[values <= lo] = 0
    if photometric == "MONOCHROME1":
        windowed, full = 255 - windowed, 255 - full
    local = _CLAHE.apply(windowed)
    return np.stack([windowed, full, local], axis=-1)


# -- what the text is --------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")
_DATE_OR_TIME = re.compile(
    r"\d{1,4}\s*[/.,-]\s*\d{1,2}\s*[/.,-]\s*\d{1,4}|\d{1,2}\s*:\s*\d{2}")
"""Short numbers are allowlisted (ruler labels), but not as a date or a time of day; a line of
three numbers or more (``12 03 80``) is not allowlisted either."""


def words(text: str) -> list[str]:
    """Upper-case runs of letters and digits of ``text``, in any script (what the allowlist's
    patterns match)."""
    return [t.upper() for t in _WORD.findall(text)]


class Policy:
    """Decides the :class:`TextKind` of read text: the source's identifying values first
    (:meth:`Identifiers.found_in`, the leak scan's matching), then the allowlist (regular
    expressions over whole words of the reading)."""

    def __init__(self, allowlist: Iterable[str], identifiers: Identifiers | None = None,
                 min_allowed_score: float = 0.8) -> None:
        self.allowed = [re.compile(p, re.IGNORECASE) for p in allowlist]
        self.identifiers = identifiers if identifiers is not None else Identifiers()
        self.min_allowed_score = min_allowed_score

    def kind(self, text: str, score: float, box_aspect: float) -> TextKind:
        """``box_aspect``: the line's length over its height, to refuse a reading that is far
        too short for the line (a long name misread as "L")."""
        if self.identifiers.found_in(text):
            return TextKind.IDENTIFYING
        parts = words(text)
        if not parts or score < self.min_allowed_score or _DATE_OR_TIME.search(text) or sum(
                p.isdigit() for p in parts) >= 3:
            return TextKind.OTHER
        if box_aspect > 2.0 * (len(text.strip()) + 1):
            return TextKind.OTHER
        if all(any(p.fullmatch(t) for p in self.allowed) for t in parts):
            return TextKind.ALLOWED
        return TextKind.OTHER


def outline_mask(found: Iterable[Found], rows: int, columns: int) -> np.ndarray:
    """The union of the outlines of ``found`` (grown by a pixel) as a (rows, columns) bool
    mask: what hiding them covers."""
    mask = np.zeros((rows, columns), np.uint8)
    for f in found:
        cv2.fillPoly(mask, [np.asarray(f.outline, np.int32)], 1)
    return cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(bool)


def region_of(box: np.ndarray, scale: float, rows: int, columns: int) -> Region | None:
    """The stored-pixel rectangle that covers ``box`` (detection coordinates), clipped."""
    pts = np.asarray(box, np.float32).reshape(4, 2) / scale
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
    x0, y0 = max(0, int(x0) - 1), max(0, int(y0) - 1)
    x1, y1 = min(columns, int(x1) + 1), min(rows, int(y1) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def aspect(box: np.ndarray) -> float:
    pts = _order(box)
    width = float(np.linalg.norm(pts[0] - pts[1]))
    height = float(np.linalg.norm(pts[0] - pts[3]))
    if height > width:
        width, height = height, width
    return width / max(height, 1.0)


AROUND_MARGIN = 96
"""A search limited to what changed (:func:`find_text`'s ``around``) looks this far (detection
pixels) beyond it: the detector's view of a pixel depends on its neighbourhood, and what lies
further away is unchanged since the last search of the whole frame (rendered with the same
levels, it is the same input to the detector)."""


def find_text(frames: np.ndarray, indices: Iterable[int], ds: Dataset, photometric: str,
              finder: TextFinder, policy: Policy, around: np.ndarray | None = None,
              levels: dict[int, Levels] | None = None) -> list[Found]:
    """Every text line in the frames ``indices`` of ``frames`` (as decoded: (n, rows,
    columns[, 3])), with what it is. With ``around`` (a (rows, columns) bool mask of pixels
    changed since these frames were last searched whole), only the rectangles around the
    changes, grown by :data:`AROUND_MARGIN`, are searched again. ``levels`` keeps each
    frame's display mapping from its first search (filled in here), so that a search again
    renders every unchanged pixel exactly as before."""
    rows, columns = frames.shape[1], frames.shape[2]
    scale = detection_scale(rows, columns)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    windows = None if around is None else _windows(around, scale, size)
    found: list[Found] = []
    for index in indices:
        frame = frames[index]
        if levels is not None and index not in levels:
            levels[index] = levels_of(_luminance(frame, ds, photometric), ds, photometric,
                                      frame.ndim == 3)
        stacked = views(frame, ds, photometric, None if levels is None else levels[index])
        if scale != 1.0:
            stacked = cv2.resize(stacked, size, interpolation=cv2.INTER_AREA if scale < 1
                                 else cv2.INTER_CUBIC)
        detected = _search(finder, stacked, windows)
        lines = []
        for box, line_score in detected:
            region = region_of(box, scale, rows, columns)
            crop = _crop(_clearest(stacked, box), box)
            if region is not None and crop is not None:
                lines.append((box, line_score, region, crop))
        readings = finder.read([crop for *_, crop in lines])
        for (box, line_score, region, _), (text, score) in zip(lines, readings, strict=True):
            shape = aspect(box)
            if is_text(text, score, line_score, shape):
                outline = tuple((int(round(x)), int(round(y)))
                                for x, y in np.asarray(box).reshape(4, 2) / scale)
                found.append(Found(int(index), region, outline, text, score,
                                   policy.kind(text, score, shape)))
    return found


READ_MIN_SCORE = 0.6
"""A detected line whose reading is less sure than this is not taken for text, unless the
detector is sure of it (:data:`LINE_MIN_SCORE`) and it is shaped like a line
(:data:`LINE_MIN_ASPECT`)."""
SHORT_READ_MIN_SCORE = 0.97
"""Readings of one or two characters (blobs of anatomy read as "2") need more confidence."""
LINE_MIN_SCORE = 0.9
LINE_MIN_ASPECT = 2.5


def is_text(text: str, score: float, line_score: float, shape: float) -> bool:
    """Whether a detected line is text: read as letters or digits (of any script) with some
    confidence, or a confident line-shaped detection whatever it reads as (hidden all the
    same: unreadable is not clean). The detector alone also marks edges and blobs of anatomy;
    what it marks there is not line-shaped, or not confidently, and reads as nothing, as no
    letter or digit, or as one or two characters without confidence."""
    read = "".join(words(text))
    if len(read) <= 2 and read.isdigit():
        read = ""  # a lone "5" or "10" is noise in anatomy, or a ruler label: nobody's name
    if read and score >= (SHORT_READ_MIN_SCORE if len(read) <= 2 else READ_MIN_SCORE):
        return True  # a reading that does not fit the line's length is hidden (Policy.kind)
    # unreadable (another script, a font the recognizer does not know), but a confident,
    # line-shaped detection: hidden all the same
    return line_score >= LINE_MIN_SCORE and shape >= LINE_MIN_ASPECT


def _windows(around: np.ndarray, scale: float, size: tuple[int, int]
             ) -> list[tuple[int, int, int, int]]:
    """Rectangles (x0, y0, x1, y1, detection pixels) that cover the changed pixels ``around``
    with :data:`AROUND_MARGIN` to spare: one per group of nearby changes."""
    changed = cv2.resize(around.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    side = 2 * AROUND_MARGIN + 1
    grown = cv2.dilate(changed, cv2.getStructuringElement(cv2.MORPH_RECT, (side, side)))
    count, _, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
    width, height = size
    out = []
    for x, y, w, h, _area in stats[1:count]:
        out.append((max(0, int(x) - 2), max(0, int(y) - 2), min(width, int(x + w) + 2),
                    min(height, int(y + h) + 2)))
    return out


def _search(finder: TextFinder, stacked: np.ndarray,
            windows: list[tuple[int, int, int, int]] | None) -> list[tuple[np.ndarray, float]]:
    """The finder's lines in ``stacked``, or in its ``windows`` (x0, y0, x1, y1) only."""
    if windows is None:
        return finder.lines(stacked)
    found = []
    for x0, y0, x1, y1 in windows:
        shift = np.array([x0, y0], np.float32)
        window = np.ascontiguousarray(stacked[y0:y1, x0:x1])
        found += [(box + shift, score) for box, score in finder.lines(window)]
    return found


def _clearest(stacked: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The view in which the line ``box`` stands out most (highest contrast inside it)."""
    pts = np.asarray(box).reshape(4, 2)
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
    patch = stacked[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3).astype(np.float32)
    best = int(np.argmax(patch.std(axis=0))) if patch.size else 0
    return np.ascontiguousarray(stacked[..., best])
