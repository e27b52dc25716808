"""Images with text burned into their pixels, for the detection and removal of burned-in text.

Every :class:`Case` is one Part 10 data set built here from the pydicom test samples' anatomy (a
chest CR, a leg radiograph, a CT and an MR slice, an ultrasound and an echo cine, each cropped so
that none of their own burned-in text is left) with text drawn in by PIL: several DejaVu fonts
and sizes, full white or black, low-contrast text lifted by a fraction of the displayed range over
the anatomy, horizontal, vertical (90 degrees) and rotated (30 degrees). The text is written into
the stored values *before* compression, and each :class:`Planted` keeps the stroke mask it was
drawn with, so a test can check that the strokes changed, whatever the transfer syntax (for lossy
JPEG too: the mask is the drawn text, not what the codec left).

The identifying strings equal the case's own header values (Patient's Name as ``DOE^JANE`` or
``DOE, JANE``, Patient ID, Patient's Birth Date as ``19800101`` or ``01/01/1980``, Accession
Number, Institution Name), plus text no header holds ("Dr SMITH", a date). Clean controls carry
no text at all; marker images only an allowlisted laterality letter; one Secondary Capture is a
scanned form whose lines cover most of the page. What a node must do with each is its
:class:`Expect`.

The same ``size`` gives the same cases, UIDs and pixels on every run (byte-identical files for
the lossless syntaxes; dcmtk's baseline JPEG encoder is deterministic too).
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {
    "sans": "DejaVuSans.ttf",
    "mono": "DejaVuSansMono.ttf",
    "serif": "DejaVuSerif.ttf",
    "bold": "DejaVuSans-Bold.ttf",
}
"""Debian's fonts-dejavu-core, by the short names the cases use."""

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SC = "1.2.840.10008.5.1.4.1.1.7"

UID_ROOT = "corpus-text-1"
"""Name prefix of every UID (2.25 form): changing it changes every UID, nothing else."""


class Expect(StrEnum):
    """What a node must do with a case's pixels."""

    HIDDEN = "hidden"
    """Identifying text planted: every planted (non-``keep``) string hidden, the image released."""
    CLEAN = "clean"
    """No text at all: released with Pixel Data bytes and transfer syntax bit-identical."""
    KEPT = "kept"
    """Only an allowlisted laterality marker ("L" or "R"): released unchanged."""
    QUARANTINE = "quarantine"
    """Text that cannot be hidden without destroying the image (a scanned form): held back."""


@dataclass(frozen=True)
class Planted:
    """One string drawn into the pixels."""

    text: str
    """The string as drawn."""
    frames: tuple[int, ...]
    """Frame indices (0-based) it was drawn in."""
    box: tuple[int, int, int, int]
    """x (column), y (row), width, height: the smallest rectangle enclosing the strokes."""
    mask: np.ndarray
    """bool (rows, columns): the stroke pixels, the same in every frame of ``frames``."""
    keep: bool = False
    """An allowlisted marker (laterality "L"/"R"): must survive."""


@dataclass(frozen=True)
class Case:
    """One image, what was planted in it and what must become of it."""

    name: str
    dataset: Dataset
    """With file_meta, ready for ``save_as(path, enforce_file_format=True)``."""
    planted: tuple[Planted, ...]
    expect: Expect

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.dataset.file_meta.TransferSyntaxUID)


@dataclass(frozen=True)
class Patient:
    """Header values of one patient; the text drawn into the pixels repeats them."""

    name: str  # PN, "FAMILY^GIVEN"
    id: str
    birth: str  # DA
    accession: str
    institution: str

    @property
    def comma_name(self) -> str:
        family, given = self.name.split("^")
        return f"{family}, {given}"

    @property
    def slash_birth(self) -> str:
        return f"{self.birth[4:6]}/{self.birth[6:8]}/{self.birth[:4]}"


PATIENTS = (
    Patient("DOE^JANE", "1234567", "19800101", "A10042917", "ST MARY HOSPITAL"),
    Patient("ROE^RICHARD", "7654321", "19650712", "A20240315", "MERCY GENERAL"),
    Patient("NGUYEN^THANH", "5550123", "19920229", "ACC88213", "NORTHSIDE CLINIC"),
    Patient("MULLER^HANS", "9081726", "19471103", "X3310457", "KLINIKUM WEST"),
)

NON_HEADER = ("Dr SMITH", "2024-03-05", "12/07/2023")
"""Identifying-looking text that no header element holds."""


# -- anatomy: the samples' pixels, cropped free of their own text ------------------------------

@cache
def _sample(name: str) -> np.ndarray:
    arr = dcmread(get_testdata_file(name)).pixel_array
    arr.flags.writeable = False
    return arr


def _resize(arr: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resample one 2D array (any integer or float dtype) to (rows, cols), bicubic."""
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.Resampling.BICUBIC))


def chest(rows: int, cols: int, crop: tuple[int, int, int, int] = (0, 0, 1955, 1841),
          bits: int = 15) -> np.ndarray:
    """RG1_UNCR's chest (MONOCHROME1 stored values), cropped (y0, x0, y1, x1), resized, scaled
    to ``bits`` stored bits. The sample has no text."""
    y0, x0, y1, x1 = crop
    out = _resize(_sample("RG1_UNCR.dcm")[y0:y1, x0:x1], rows, cols) * (2**bits / 2**15)
    return np.clip(np.rint(out), 0, 2**bits - 1).astype(np.uint16)


def leg(rows: int, cols: int, bits: int = 14) -> np.ndarray:
    """RG3_UNCR's leg as MONOCHROME2 values (inverted), above its lead "R" marker (rows from
    1260 on are left out), scaled to ``bits`` stored bits."""
    arr = 1023.0 - _sample("RG3_UNCR.dcm")[60:1260, 380:1260]
    out = _resize(arr, rows, cols) * (2**bits / 1024)
    return np.clip(np.rint(out), 0, 2**bits - 1).astype(np.uint16)


def ct_slice(size: int = 512, shift: int = 0, flip: bool = False) -> np.ndarray:
    """CT_small's vertebra (stored values; Rescale Intercept -1024) upscaled to size x size,
    optionally rolled and mirrored for variety."""
    arr = _resize(_sample("CT_small.dcm"), size, size)
    if flip:
        arr = arr[:, ::-1]
    if shift:
        arr = np.roll(arr, shift, axis=1)
    return np.clip(np.rint(arr), 0, 4095).astype(np.int16)


def mr_slice(size: int = 256) -> np.ndarray:
    arr = _resize(_sample("MR_small.dcm"), size, size)
    return np.clip(np.rint(arr), 0, 4095).astype(np.int16)


def us_rgb() -> np.ndarray:
    """US1_UNCR's Doppler region (rows 105-345, columns 50-590: none of the sample's header,
    side bars or caption) on a black 480 x 640 screen, header space left empty at the top."""
    screen = np.zeros((480, 640, 3), np.uint8)
    screen[120:360, 50:590] = _sample("US1_UNCR.dcm")[105:345, 50:590]
    return screen


def echo_cine(frames: int) -> np.ndarray:
    """``frames`` frames of examples_ybr_color's echo (the sector only: rows 22-218, columns
    44-286), upscaled 2x onto a black 480 x 640 screen, as RGB."""
    src = _sample("examples_ybr_color.dcm")  # decoded to RGB by pydicom
    out = np.zeros((frames, 480, 640, 3), np.uint8)
    for i in range(frames):
        crop = src[i % src.shape[0], 22:218, 44:286]
        big = Image.fromarray(crop).resize((484, 392), Image.Resampling.BILINEAR)
        out[i, 64:456, 78:562] = np.asarray(big)
    return out


# -- drawing -------------------------------------------------------------------------------

@cache
def _font(font: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(DEJAVU / FONTS[font]), size)


def text_mask(shape: tuple[int, int], text: str, font: str, size: int,
              at: tuple[int, int] | str, angle: float = 0.0, margin: int = 8) -> np.ndarray:
    """The stroke pixels of ``text`` drawn in ``font`` at ``size`` px, rotated ``angle`` degrees
    counter-clockwise, with its top-left corner at ``at`` = (x, y) or in a corner named "tl",
    "tr", "bl", "br" (``margin`` px from the edges)."""
    f = _font(font, size)
    left, top, right, bottom = f.getbbox(text)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, font=f, fill=255)
    if angle:
        canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    strokes = np.asarray(canvas) >= 128
    ys, xs = np.nonzero(strokes)
    strokes = strokes[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = strokes.shape
    rows, cols = shape
    if isinstance(at, str):
        x = margin if at[1] == "l" else cols - margin - w
        y = margin if at[0] == "t" else rows - margin - h
    else:
        x, y = at
    if not (0 <= x <= cols - w and 0 <= y <= rows - h):
        raise ValueError(f'Text "{text}" ({w}x{h} px at {x},{y}) does not fit in {cols}x{rows}')
    mask = np.zeros(shape, bool)
    mask[y: y + h, x: x + w] = strokes
    return mask


def ring(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """Pixels within ``width`` (4-connected steps) of the strokes, not on them: what the
    strokes stand out against."""
    grown = mask.copy()
    for _ in range(width):
        g = grown.copy()
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        grown = g
    return grown & ~mask


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


@dataclass(frozen=True)
class Text:
    """One string to draw: where, how, and how bright."""

    text: str
    at: tuple[int, int] | str
    font: str = "sans"
    size: int = 16
    angle: float = 0.0
    ink: str | float = "white"
    """"white" or "black" (of the displayed range), or a fraction: lift the anatomy's values by
    that fraction of the displayed range (brighter on screen), keeping its texture."""
    keep: bool = False


@dataclass(frozen=True)
class Grey:
    """How stored values map to the screen, enough to draw white, black and lifted text."""

    black: float  # stored value shown black
    white: float  # stored value shown white (below ``black`` for MONOCHROME1)
    lo: int  # storable range
    hi: int


def _burn(pixels: np.ndarray, texts: Sequence[Text], grey: Grey | None,
          frames: Sequence[int] | None = None) -> tuple[Planted, ...]:
    """Draw every text into ``pixels`` (frames, rows, cols[, 3]) in place; their Planted."""
    nframes = pixels.shape[0]
    frames = tuple(range(nframes)) if frames is None else tuple(frames)
    shape = pixels.shape[1:3]
    out = []
    for t in texts:
        mask = text_mask(shape, t.text, t.font, t.size, t.at, t.angle)
        for i in frames:
            frame = pixels[i]
            if pixels.ndim == 4:  # RGB, 8-bit
                if not isinstance(t.ink, str):
                    raise ValueError(f"Lifted ink {t.ink!r} is for greyscale images")
                frame[mask] = 255 if t.ink == "white" else 0
                continue
            assert grey is not None
            if t.ink == "white":
                frame[mask] = grey.white
            elif t.ink == "black":
                frame[mask] = grey.black
            else:
                lifted = frame[mask].astype(np.float64) + float(t.ink) * (grey.white - grey.black)
                frame[mask] = np.clip(np.rint(lifted), grey.lo, grey.hi)
        out.append(Planted(t.text, frames, box_of(mask), mask, keep=t.keep))
    return tuple(out)


# -- data sets -----------------------------------------------------------------------------

def _uid(*parts: object) -> UID:
    """A 2.25 UID from a name-based UUID (PS3.5 B.2): the same parts, the same UID."""
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join([UID_ROOT, *map(str, parts)])).int}")


def _dataset(name: str, sop_class: str, modality: str, patient: Patient,
             pixels: np.ndarray, photometric: str, bits_stored: int, **extra: object) -> Dataset:
    """An uncompressed Part 10 data set: Patient, General Study/Series/Equipment, General Image
    and Image Pixel modules, pixels (frames, rows, cols[, samples]) as given."""
    nframes, rows, cols = pixels.shape[:3]
    samples = pixels.shape[3] if pixels.ndim == 4 else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = "20240305"
    ds.StudyTime = "101500"
    ds.AccessionNumber = patient.accession
    ds.Modality = modality
    if modality not in ("CR", "DX"):  # General Series 2C: dciodvfy wants it empty here
        ds.Laterality = ""
    ds.Manufacturer = "SYNTHNODE CORPUS"
    ds.InstitutionName = patient.institution
    ds.ReferringPhysicianName = "SMITH^JOHN"
    ds.PatientName = patient.name
    ds.PatientID = patient.id
    ds.PatientBirthDate = patient.birth
    ds.PatientSex = "F" if patient.name.endswith(("JANE", "THANH")) else "M"
    ds.StudyInstanceUID = _uid(patient.id, "study")
    ds.SeriesInstanceUID = _uid(name, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if sop_class != SC else ["DERIVED", "SECONDARY"]
    if sop_class == SC:
        ds.ConversionType = "WSD"
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if nframes > 1:
        ds.NumberOfFrames = nframes
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063
    ds.Rows, ds.Columns = rows, cols
    signed = pixels.dtype.kind == "i"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _grey(ds: Dataset) -> Grey:
    """Black and white stored values from the header's window (or the storable range); for
    PALETTE COLOR the indices of the darkest and brightest entries."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        lum = sum(np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2").astype(float)
                  for c in ("Red", "Green", "Blue"))
        return Grey(float(lum.argmin()), float(lum.argmax()), 0, 255)
    bits, signed = int(ds.BitsStored), bool(ds.PixelRepresentation)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(ds.get("RescaleSlope", 1))
    intercept = float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        black = max(lo, min(hi, (c - w / 2 - intercept) / slope))
        white = max(lo, min(hi, (c + w / 2 - intercept) / slope))
    else:
        black, white = lo, hi
    if ds.PhotometricInterpretation == "MONOCHROME1":
        black, white = white, black
    return Grey(black, white, lo, hi)


_DCMTK = {
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb", "+un", "+q", "90"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    RLELossless: ["dcmcrle"],
}


def _encode(ds: Dataset, syntax: str) -> Dataset:
    """``ds`` in ``syntax``: dcmtk for JPEG, JPEG-LS and RLE, pydicom (openjpeg) for JPEG 2000."""
    if syntax == ExplicitVRLittleEndian:
        return ds
    if syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        return ds
    with tempfile.TemporaryDirectory(prefix="text-corpus-") as tmp:
        src, dst = Path(tmp, "in.dcm"), Path(tmp, "out.dcm")
        ds.save_as(src, enforce_file_format=True)
        subprocess.run([*_DCMTK[UID(syntax)], str(src), str(dst)], check=True,
                       capture_output=True)
        out = dcmread(dst)
    if out.file_meta.TransferSyntaxUID != syntax:
        raise RuntimeError(f'dcmtk wrote "{out.file_meta.TransferSyntaxUID}", not "{syntax}"')
    return out


# -- the cases -----------------------------------------------------------------------------

class _Corpus:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def add(self, name: str, ds: Dataset, texts: Sequence[Text], expect: Expect,
            syntax: str = ExplicitVRLittleEndian, frames: Sequence[int] | None = None) -> None:
        if ds.Modality == "DX":  # Type 1 in the DX Image module; a lead marker is no annotation
            ds.BurnedInAnnotation = "YES" if any(not t.keep for t in texts) else "NO"
        pixels = _frames(ds)
        grey = _grey(ds) if ds.SamplesPerPixel == 1 else None
        planted = _burn(pixels, texts, grey, frames)
        ds.PixelData = pixels.tobytes()
        self.cases.append(Case(name, _encode(ds, syntax), planted, expect))


def _frames(ds: Dataset) -> np.ndarray:
    """A writable copy of an uncompressed data set's stored values, with a frame axis."""
    dtype = np.dtype(("i" if ds.PixelRepresentation else "u") + str(ds.BitsAllocated // 8))
    shape = (int(ds.get("NumberOfFrames", 1)), ds.Rows, ds.Columns) + (
        (3,) if ds.SamplesPerPixel == 3 else ())
    return np.frombuffer(ds.PixelData, dtype.newbyteorder("<")).reshape(shape).copy()


def _cr(name: str, p: Patient, pixels: np.ndarray, bits: int) -> Dataset:
    window = 2**bits
    return _dataset(name, CR, "CR", p, pixels[None], "MONOCHROME1", bits,
                    WindowCenter=window // 2, WindowWidth=window - window // 8,
                    BodyPartExamined="CHEST", ViewPosition="PA", PatientOrientation=["L", "F"])


def _dx(name: str, p: Patient, pixels: np.ndarray, bits: int = 14) -> Dataset:
    ds = _dataset(name, DX, "DX", p, pixels[None], "MONOCHROME2", bits,
                  WindowCenter=int(0.55 * 2**bits), WindowWidth=2**bits,
                  PresentationIntentType="FOR PRESENTATION", BodyPartExamined="LEG",
                  RescaleSlope=1, RescaleIntercept=0, RescaleType="US",
                  ImageLaterality="R", PatientOrientation=["L", "F"],
                  # DX Image, DX Detector, Acquisition Context (PS3.3 C.8.11)
                  PixelIntensityRelationship="LIN", PixelIntensityRelationshipSign=1,
                  PresentationLUTShape="IDENTITY", LossyImageCompression="00",
                  DetectorType="SCINTILLATOR", ImagerPixelSpacing=[0.3, 0.3],
                  AcquisitionContextSequence=[])
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator = "30021000", "SCT"
    region.CodeMeaning = "Lower leg"
    ds.AnatomicRegionSequence = [region]
    return ds


def _plane(name: str, size: int, spacing: float) -> dict[str, object]:
    """Frame of Reference and Image Plane attributes of one axial slice."""
    return dict(FrameOfReferenceUID=_uid(name, "frame"), PositionReferenceIndicator="",
                PixelSpacing=[spacing, spacing], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                ImagePositionPatient=[-size * spacing / 2, -size * spacing / 2, 0],
                SliceThickness=2.5, PatientPosition="HFS", AcquisitionNumber=1)


def _ct(name: str, p: Patient, pixels: np.ndarray) -> Dataset:
    ds = _dataset(name, CT, "CT", p, pixels[None], "MONOCHROME2", 16,
                  RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU",
                  WindowCenter=40, WindowWidth=400, KVP=120, **_plane(name, pixels.shape[0], 0.7))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    return ds


def _mr(name: str, p: Patient, pixels: np.ndarray) -> Dataset:
    ds = _dataset(name, MR, "MR", p, pixels[None], "MONOCHROME2", 16,
                  WindowCenter=600, WindowWidth=1600, MagneticFieldStrength=1.5,
                  ScanningSequence="SE", SequenceVariant="NONE", ScanOptions="",
                  MRAcquisitionType="2D", RepetitionTime=500, EchoTime=15, EchoTrainLength=1,
                  **_plane(name, pixels.shape[0], 0.9))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    return ds


def _us(name: str, p: Patient, pixels: np.ndarray) -> Dataset:
    sop = US_MULTIFRAME if pixels.ndim == 4 else US
    frames = pixels if pixels.ndim == 4 else pixels[None]
    return _dataset(name, sop, "US", p, frames, "RGB", 8, PatientOrientation="")


def _us_palette(name: str, p: Patient) -> Dataset:
    """The US screen quantized to a 254-entry palette; index 254 grey, 255 white (for text)."""
    quant = Image.fromarray(us_rgb()).quantize(254, Image.Quantize.MEDIANCUT,
                                               dither=Image.Dither.NONE)
    index = np.asarray(quant).astype(np.uint8)
    lut = np.zeros((256, 3), np.uint16)
    palette = quant.getpalette()[: 254 * 3]
    lut[: len(palette) // 3] = np.asarray(palette, np.uint16).reshape(-1, 3)
    lut[254], lut[255] = (160, 160, 160), (255, 255, 255)
    lut = lut * 257  # 16-bit entries
    ds = _dataset(name, US, "US", p, index[None], "PALETTE COLOR", 8, PatientOrientation="")
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut[:, i].astype("<u2").tobytes())
    return ds


def _sc(name: str, p: Patient, pixels: np.ndarray) -> Dataset:
    return _dataset(name, SC, "OT", p, pixels[None], "RGB", 8, PatientOrientation="")


def key_image(rows: int = 480, cols: int = 640) -> np.ndarray:
    """A colour key image with no text: the CT slice through a bone-and-tissue colour map."""
    ct = ct_slice(min(rows, cols)).astype(np.float64)
    t = np.clip((ct - 800) / 800, 0, 1)
    rgb = np.stack([t ** 0.7, t ** 1.4, 0.3 + 0.5 * t], -1) * 255
    out = np.full((rows, cols, 3), 24, np.uint8)
    x0 = (cols - ct.shape[1]) // 2
    out[:, x0: x0 + ct.shape[1]] = np.rint(rgb).astype(np.uint8)
    return out


def form_page(p: Patient, rows: int = 880, cols: int = 680) -> tuple[np.ndarray, list[Text]]:
    """A scanned requisition form: grey paper with a little noise, and the lines to print."""
    rng = np.random.default_rng(7)
    page = np.clip(rng.normal(236, 4, (rows, cols, 3)), 0, 255).astype(np.uint8)
    filler = [
        "Clinical history: cough for three weeks, low grade fever",
        "Question: consolidation? effusion? compare prior imaging",
        "Exam requested: chest two views, PA and lateral",
        "Allergies: none known     Pregnancy: not applicable",
        "Contrast: no     Transport: walking     Isolation: none",
        "Priority: routine     Location: outpatient clinic 3",
        "Previous exams: chest PA 2021, CT thorax 2022",
        "Signature of requesting clinician:",
        "Please send report to the referring department",
        "Form RAD-REQ-7 revision 4, printed on recycled paper",
    ]
    texts = [
        Text("RADIOLOGY REQUISITION", (40, 30), "bold", 34, ink="black"),
        Text(p.institution, (40, 84), "serif", 24, ink="black"),
        Text(f"Patient: {p.comma_name}", (40, 140), "sans", 24, ink="black"),
        Text(f"MRN: {p.id}", (40, 184), "sans", 24, ink="black"),
        Text(f"DOB: {p.slash_birth}", (360, 184), "sans", 24, ink="black"),
        Text(f"Accession: {p.accession}", (40, 228), "sans", 24, ink="black"),
        Text("Referring: Dr SMITH", (40, 272), "sans", 24, ink="black"),
    ]
    y = 330
    for line in filler:
        texts.append(Text(line, (40, y), "serif", 19, ink="black"))
        y += 50
    return page, texts


def build_corpus(size: str = "test") -> list[Case]:
    """The cases: "test" (about 30, built in seconds) or "bench" (those plus 512 x 512 CT and
    chest frames with and without text, and a longer cine)."""
    if size not in ("test", "bench"):
        raise ValueError(f'Corpus size "{size}" is not "test" or "bench"')
    jane, richard, thanh, hans = PATIENTS
    c = _Corpus()

    # 1. CR, MONOCHROME1, no Burned In Annotation attribute: name and MRN top-left.
    c.add("cr_header_name_mrn", _cr("cr_header_name_mrn", jane, chest(736, 782), 15),
          [Text(f"{jane.name}  MRN {jane.id}", "tl", "sans", 28, ink="black"),
           Text(jane.institution, "br", "bold", 22, ink="black")], Expect.HIDDEN)
    c.add("cr12_jpegls_comma_name_birth",
          _cr("cr12_jpegls_comma_name_birth", richard,
              chest(640, 640, (300, 200, 1500, 1400), 12), 12),
          [Text(richard.comma_name, (16, 14), "mono", 24),
           Text(richard.slash_birth, (16, 46), "mono", 24),
           Text(richard.accession, "br", "serif", 20)], Expect.HIDDEN, JPEGLSLossless)
    # Low contrast over the lung's texture: +12 % and +10 % of the displayed range.
    c.add("cr12_lowcontrast_lung_jpegll",
          _cr("cr12_lowcontrast_lung_jpegll", thanh, chest(640, 600, bits=12), 12),
          [Text(thanh.name, (120, 230), "bold", 30, ink=0.12),
           Text(thanh.id, (360, 300), "sans", 28, ink=0.10)], Expect.HIDDEN, JPEGLosslessSV1)

    # 2. DX, MONOCHROME2: institution at the bottom, a vertical label, a rotated stamp.
    c.add("dx_institution_vertical_id",
          _dx("dx_institution_vertical_id", hans, leg(720, 528)),
          [Text(hans.institution, "bl", "bold", 24),
           Text(f"ID {hans.id}", (490, 200), "sans", 22, angle=90),
           Text(hans.name, (200, 16), "serif", 20, ink="black")], Expect.HIDDEN)
    c.add("dx_rotated30_j2k", _dx("dx_rotated30_j2k", jane, leg(720, 528)),
          [Text("Dr SMITH 2024-03-05", (150, 280), "sans", 26, angle=30),
           Text(jane.accession, "tr", "mono", 18)], Expect.HIDDEN, JPEG2000Lossless)
    c.add("dx_marker_and_name_rle", _dx("dx_marker_and_name_rle", richard, leg(720, 528)),
          [Text("L", (40, 560), "bold", 40, keep=True),
           Text(richard.comma_name, "tr", "sans", 20)], Expect.HIDDEN, RLELossless)

    # 3. CT 512 x 512, signed, rescaled, windowed: small text in the corners.
    c.add("ct_corner_name", _ct("ct_corner_name", jane, ct_slice()),
          [Text(jane.name, "tl", "mono", 14), Text(jane.id, (8, 28), "mono", 14),
           Text(jane.birth, "tr", "mono", 14), Text("12/07/2023", "bl", "sans", 12)],
          Expect.HIDDEN)
    c.add("ct_jpegll_institution", _ct("ct_jpegll_institution", thanh, ct_slice(flip=True)),
          [Text(thanh.institution, "tr", "sans", 16),
           Text(thanh.comma_name, "bl", "serif", 16)], Expect.HIDDEN, JPEGLosslessSV1)
    c.add("ct_rle_accession_9px", _ct("ct_rle_accession_9px", hans, ct_slice(shift=40)),
          [Text(f"{hans.accession} {hans.id}", "br", "sans", 10),
           Text(hans.name, "tl", "sans", 11)], Expect.HIDDEN, RLELossless)
    c.add("ct_lowcontrast_tissue_jpegls",
          _ct("ct_lowcontrast_tissue_jpegls", richard, ct_slice()),
          [Text(richard.id, (200, 380), "bold", 24, ink=0.15),
           Text("Dr SMITH", (170, 420), "sans", 22, ink=0.12)], Expect.HIDDEN, JPEGLSLossless)

    # 4. MR 256 x 256: 9-11 px text.
    c.add("mr_small_text", _mr("mr_small_text", thanh, mr_slice()),
          [Text(thanh.name, "tl", "sans", 11), Text(thanh.birth, "tr", "mono", 10),
           Text(thanh.institution, "bl", "sans", 9)], Expect.HIDDEN)
    c.add("mr_j2k_name", _mr("mr_j2k_name", hans, mr_slice()),
          [Text(hans.comma_name, "bl", "bold", 12), Text(hans.id, "tr", "sans", 12)],
          Expect.HIDDEN, JPEG2000Lossless)

    # 5. Ultrasound: palette, RGB, RGB cine with the header in every frame.
    c.add("us_palette_header", _us_palette("us_palette_header", jane),
          [Text(jane.institution, (16, 12), "sans", 16),
           Text(jane.comma_name, (16, 34), "sans", 16),
           Text(f"DOB {jane.slash_birth}", (16, 56), "sans", 16),
           Text(jane.accession, (500, 12), "mono", 15)], Expect.HIDDEN)
    c.add("us_rgb_header", _us("us_rgb_header", richard, us_rgb()),
          [Text(richard.institution, (16, 12), "sans", 16),
           Text(richard.name, (16, 34), "sans", 16),
           Text(richard.id, (16, 56), "sans", 16),
           Text("2024-03-05", (500, 12), "mono", 15)], Expect.HIDDEN)
    cine_frames = 8 if size == "test" else 16
    c.add("us_cine_rle", _us("us_cine_rle", thanh, echo_cine(cine_frames)),
          [Text(thanh.comma_name, (12, 10), "sans", 15),
           Text(f"ID: {thanh.id}", (12, 32), "sans", 15),
           Text(thanh.institution, (440, 10), "bold", 14)], Expect.HIDDEN, RLELossless)

    # 6. Secondary Capture, RGB, JPEG baseline: mask from the drawn text.
    c.add("sc_rgb_jpeg_baseline", _sc("sc_rgb_jpeg_baseline", hans, key_image()),
          [Text(hans.name, (20, 16), "bold", 26),
           Text(f"{hans.slash_birth}  {hans.accession}", (20, 440), "sans", 20)],
          Expect.HIDDEN, JPEGBaseline8Bit)

    # 7. A scanned form: text over most of the page.
    page, lines = form_page(jane)
    c.add("sc_requisition_form", _sc("sc_requisition_form", jane, page), lines,
          Expect.QUARANTINE)

    # 8. Markers only.
    c.add("dx_marker_r", _dx("dx_marker_r", thanh, leg(720, 528)),
          [Text("R", (460, 40), "bold", 44, keep=True)], Expect.KEPT)
    c.add("cr_marker_l_jpegll", _cr("cr_marker_l_jpegll", hans, chest(640, 600, bits=12), 12),
          [Text("L", "tr", "sans", 40, keep=True)], Expect.KEPT, JPEGLosslessSV1)

    # 9. Clean controls, one per kind of image and several syntaxes.
    clean: list[tuple[str, Dataset, str]] = [
        ("clean_cr", _cr("clean_cr", jane, chest(736, 782), 15), ExplicitVRLittleEndian),
        ("clean_cr_jpegll", _cr("clean_cr_jpegll", richard,
                                chest(640, 640, (300, 200, 1500, 1400), 12), 12),
         JPEGLosslessSV1),
        ("clean_dx_rle", _dx("clean_dx_rle", hans, leg(720, 528)), RLELossless),
        ("clean_ct", _ct("clean_ct", jane, ct_slice()), ExplicitVRLittleEndian),
        ("clean_ct_jpegls", _ct("clean_ct_jpegls", thanh, ct_slice(flip=True)), JPEGLSLossless),
        ("clean_ct_j2k", _ct("clean_ct_j2k", hans, ct_slice(shift=40)), JPEG2000Lossless),
        ("clean_mr_j2k", _mr("clean_mr_j2k", richard, mr_slice()), JPEG2000Lossless),
        ("clean_us_rgb", _us("clean_us_rgb", jane, us_rgb()), ExplicitVRLittleEndian),
        ("clean_us_palette", _us_palette("clean_us_palette", richard), RLELossless),
        ("clean_us_cine", _us("clean_us_cine", hans, echo_cine(cine_frames)),
         ExplicitVRLittleEndian),
        ("clean_sc_key_image", _sc("clean_sc_key_image", thanh, key_image()), JPEGBaseline8Bit),
        ("clean_sc_key_image_rgb", _sc("clean_sc_key_image_rgb", jane, key_image()),
         ExplicitVRLittleEndian),
    ]
    for name, ds, syntax in clean:
        c.add(name, ds, [], Expect.CLEAN, syntax)

    if size == "bench":
        _bench_frames(c)
    return c.cases


def _bench_frames(c: _Corpus, count: int = 24) -> None:
    """``count`` 512 x 512 CT and chest frames with header text and as many without."""
    rng = random.Random(12)
    corners = ("tl", "tr", "bl", "br")
    for i in range(count):
        p = PATIENTS[i % len(PATIENTS)]
        if i % 2:
            kind = "ct"
            ds = _ct(f"bench_ct_text_{i}", p, ct_slice(shift=rng.randrange(0, 120),
                                                       flip=bool(i % 4 == 1)))
        else:
            kind = "cr"
            y0, x0 = rng.randrange(0, 700), rng.randrange(0, 600)
            ds = _cr(f"bench_cr_text_{i}", p,
                     chest(512, 512, (y0, x0, y0 + 1200, x0 + 1200), 12), 12)
        font = ("sans", "mono", "serif", "bold")[i % 4]
        size = 12 + (i * 5) % 14
        first, second = rng.sample(corners, 2)
        texts = [Text(p.name if i % 3 else p.comma_name, first, font, size),
                 Text(p.id if i % 2 else p.slash_birth, second, font, size)]
        syntax = (ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, RLELossless)[i % 4]
        c.add(f"bench_{kind}_text_{i}", ds, texts, Expect.HIDDEN, syntax)
    for i in range(count):
        p = PATIENTS[i % len(PATIENTS)]
        if i % 2:
            ds = _ct(f"bench_ct_clean_{i}", p, ct_slice(shift=rng.randrange(0, 120)))
        else:
            y0, x0 = rng.randrange(0, 700), rng.randrange(0, 600)
            ds = _cr(f"bench_cr_clean_{i}", p,
                     chest(512, 512, (y0, x0, y0 + 1200, x0 + 1200), 12), 12)
        syntax = (ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, RLELossless)[i % 4]
        c.add(f"bench_{ds.Modality.lower()}_clean_{i}", ds, [], Expect.CLEAN, syntax)


def write_corpus(cases: Sequence[Case], folder: Path) -> dict[str, Path]:
    """Write every case as ``folder/<name>.dcm``; case name to path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        path = folder / f"{case.name}.dcm"
        case.dataset.save_as(path, enforce_file_format=True)
        paths[case.name] = path
    return paths


if __name__ == "__main__":  # look at the corpus: PNGs of every case's first frame
    import sys
    import time

    start = time.perf_counter()
    corpus = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "test")
    print(f"{len(corpus)} cases in {time.perf_counter() - start:.1f} s")
