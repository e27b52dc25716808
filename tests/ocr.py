"""An independent reader of burned-in text: its own display rendering and Debian's tesseract.

Nothing here comes from the node: the node detects text with PP-OCR (RapidOCR) on its own
rendering, so a test or bench that checks the node's output with this module checks it with a
second pair of eyes. :func:`display` turns stored values into what a viewer shows (Modality LUT,
the header's window or a percentile stretch, MONOCHROME1 turned around, palettes applied, colour
to grey); :func:`read` runs tesseract on a frame or on one region of it (several renderings of
the region, upscaled when the text is small, turned upright when it is vertical or at an angle,
read in one run); :func:`reads` says
whether an OCR result contains a planted string or any significant token of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import cv2
import numpy as np
import pytesseract
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # tesseract's own threads: one per call

Box = tuple[int, int, int, int]  # x (column), y (row), width, height

_LUMA = np.array([0.299, 0.587, 0.114])


def _first(value: object) -> float:
    """The first of a multi-valued DS (Window Center/Width may hold several)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def display(ds: Dataset) -> list[np.ndarray]:
    """Each frame as a viewer would show it, uint8 grey (0 black, 255 white)."""
    arr = ds.pixel_array  # YBR is converted to RGB by pydicom's decoders
    nframes = int(ds.get("NumberOfFrames") or 1)
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float64)
        scale = 255.0 / (65535.0 if rgb.max() > 255 else 255.0)
        grey = rgb @ _LUMA * scale
    elif int(ds.SamplesPerPixel) == 3:
        grey = arr.astype(np.float64) @ _LUMA
    else:
        # Modality LUT (PS3.3 C.11.1), then a linear VOI window (C.11.2.1.2) or a stretch.
        values = arr.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            c, w = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
            grey = np.clip(((values - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
        else:
            lo, hi = np.percentile(values, (0.5, 99.5))
            grey = np.clip((values - lo) / max(hi - lo, 1e-9) * 255, 0, 255)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
    grey = np.rint(grey).astype(np.uint8).reshape((nframes, int(ds.Rows), int(ds.Columns)))
    return list(grey)


def _tesseract(img: Image.Image, psm: int) -> str:
    return str(pytesseract.image_to_string(img, lang="eng", config=f"--psm {psm} --oem 1"))


def _views(crop: np.ndarray) -> list[np.ndarray]:
    """Renderings of one region that each make some kind of text dark on light: the region
    stretched; its brightest and its darkest level alone (full-contrast text); white and black
    top-hat (text lighter or darker than a background that varies)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    stretch = np.asarray(ImageOps.autocontrast(Image.fromarray(crop), cutoff=0.5))
    top = np.where(crop >= int(crop.max()) - 3, 0, 255).astype(np.uint8)
    bottom = np.where(crop <= int(crop.min()) + 3, 0, 255).astype(np.uint8)
    white = cv2.morphologyEx(crop, cv2.MORPH_TOPHAT, kernel)
    black = cv2.morphologyEx(crop, cv2.MORPH_BLACKHAT, kernel)
    hats = [255 - np.asarray(ImageOps.autocontrast(Image.fromarray(h), cutoff=0.5))
            for h in (white, black)]
    return [stretch, top, bottom, *hats]


def _stack(images: list[Image.Image], gap: int = 24) -> Image.Image:
    """One white page with the images one under another (one tesseract run reads them all)."""
    width = max(i.width for i in images) + 2 * gap
    page = Image.new("L", (width, sum(i.height for i in images) + gap * (len(images) + 1)), 255)
    y = gap
    for img in images:
        page.paste(img, (gap, y))
        y += img.height + gap
    return page


def _angles(box: Box) -> tuple[int, ...]:
    """Rotations that bring a region's text upright: 90/270 for a tall box (a vertical label),
    +-30 for a box neither tall nor flat (text at an angle), none for a line."""
    _, _, w, h = box
    if h > 1.5 * w:
        return (270, 90)
    if h > 0.35 * w:
        return (0, 330, 30)
    return (0,)


def _scale(img: Image.Image, target: int = 40) -> Image.Image:
    """Upscaled so that a short side of ``target`` px or less becomes about 3x that height."""
    factor = max(1, min(4, round(3 * target / max(min(img.size), 1))))
    if factor == 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.LANCZOS)


def read(frame: np.ndarray, box: Box | None = None, margin: int = 12) -> str:
    """What tesseract reads in ``frame`` (uint8 grey, as :func:`display` gives).

    With ``box``, only that region grown by ``margin``: its renderings from :func:`_views`,
    upscaled, turned upright by :func:`_angles`, stacked on one page and read in one run (sparse
    text mode). Without, the whole frame, stretched, upscaled when small, read upright and
    turned 90 and 270 degrees. Readings are joined by newlines."""
    if box is None:
        img = ImageOps.autocontrast(Image.fromarray(frame), cutoff=0.5)
        if min(img.size) < 700:
            img = img.resize((img.width * 2, img.height * 2), Image.Resampling.LANCZOS)
        return "\n".join(_tesseract(img.rotate(a, expand=True) if a else img, 11)
                         for a in (0, 90, 270))
    x, y, w, h = box
    crop = frame[max(0, y - margin): y + h + margin, max(0, x - margin): x + w + margin]
    pages = []
    for view in _views(crop):
        img = _scale(Image.fromarray(view), min(h, w) if _angles(box) != (0,) else h)
        for angle in _angles(box):
            pages.append(img.rotate(angle, expand=True, fillcolor=255,
                                    resample=Image.Resampling.BICUBIC) if angle else img)
    return _tesseract(_stack(pages), 11)


def _squash(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


def tokens(planted: str) -> list[str]:
    """The significant tokens of a planted string: runs of >= 3 letters or digits."""
    return [t for t in re.split(r"[^0-9A-Z]+", planted.upper()) if len(t) >= 3]


def _near(token: str, text: str, errors: int) -> bool:
    """Whether some substring of ``text`` is within ``errors`` edits of ``token`` (Sellers'
    approximate substring match)."""
    previous = [0] * (len(text) + 1)  # a match may start anywhere in text
    for i, ch in enumerate(token, 1):
        current = [i] + [0] * len(text)
        for j, other in enumerate(text, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1,
                             previous[j - 1] + (ch != other))
        previous = current
    return min(previous) <= errors


def reads(planted: str, ocr_text: str) -> bool:
    """Whether ``ocr_text`` holds ``planted`` or any of its significant tokens, ignoring case,
    spaces and punctuation; a token of 6 or more characters counts when read with one wrong,
    missing or extra character (two from 12): "10042917" is a leak of "A10042917"."""
    seen = _squash(ocr_text)
    whole = _squash(planted)
    if whole and whole in seen:
        return True
    return any(_near(t, seen, len(t) // 6) for t in tokens(planted))
