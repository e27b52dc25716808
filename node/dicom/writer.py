"""The Secondary Capture writer: every object synthnode produces is built here.

Single-frame outputs are highdicom ``SCImage`` objects (SC Image Storage, .7); multi-frame ones
(Multi-frame Grayscale Byte .7.2, Grayscale Word .7.3, True Color .7.4) start from the same
highdicom object for their shared modules and are completed here, since highdicom's SCImage is
single-frame only. Then the flavour is applied: synthetic (Synthetic Data YES, Conversion Type
SYN, Source Image Sequence ...) or de-identified (Patient Identity Removed YES, CID 7050 codes
...). Every UID is derived from what the output was made from (:func:`node.uids.derive_uid`).
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

from node import __version__
from node.config import OutputSettings
from node.dicom.provenance import Deidentification, NewIdentity, Provenance, SeriesSpec, Synthesis
from node.uids import derive_uid

SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_GRAYSCALE_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
MULTIFRAME_GRAYSCALE_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
MULTIFRAME_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"

_FRAME_LABEL_VECTOR = 0x00182002


@dataclass(frozen=True)
class Pixels:
    """Output pixels and how to read them.

    ``frames`` has shape (F, rows, columns) for grayscale or (F, rows, columns, 3) for RGB;
    uint8, or uint16 for grayscale. ``photometric`` says how the values are meant: MONOCHROME1
    values are inverted into MONOCHROME2 (over ``bits_stored``) when written.
    ``pixel_spacing`` (row, column spacing in mm) is recorded only where it still holds.
    """

    frames: np.ndarray
    photometric: str = "MONOCHROME2"
    bits_stored: int | None = None
    pixel_spacing: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        f = self.frames
        if f.ndim not in (3, 4) or (f.ndim == 4 and f.shape[-1] != 3):
            raise ValueError(
                f"pixel frames of shape {f.shape} are neither (F, rows, columns) nor "
                "(F, rows, columns, 3)"
            )
        if f.shape[0] < 1 or 0 in f.shape:
            raise ValueError(f"pixel frames of shape {f.shape} are empty")
        if f.dtype not in (np.uint8, np.uint16):
            raise ValueError(f'pixel data type "{f.dtype}" is not supported: use uint8 or uint16')
        color = f.ndim == 4
        if color and (f.dtype != np.uint8 or self.photometric != "RGB"):
            raise ValueError("colour pixels must be uint8 with photometric RGB")
        if not color and self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f'photometric "{self.photometric}" is not valid for grayscale')
        width = 8 * f.dtype.itemsize
        if self.bits_stored is not None and not 1 <= self.bits_stored <= width:
            raise ValueError(f"bits_stored {self.bits_stored} does not fit {f.dtype}")

    @property
    def color(self) -> bool:
        return self.frames.ndim == 4

    @property
    def stored_bits(self) -> int:
        return self.bits_stored or 8 * self.frames.dtype.itemsize

    def monochrome2(self) -> np.ndarray:
        """The frames as MONOCHROME2 (or RGB) values, masked to ``stored_bits``."""
        top = (1 << self.stored_bits) - 1
        frames = np.minimum(self.frames, top).astype(self.frames.dtype)
        if self.photometric == "MONOCHROME1":
            frames = (top - frames).astype(self.frames.dtype)
        return frames


def carried_spacing(source: Dataset, scale: float = 1.0) -> tuple[float, float] | None:
    """The source's Pixel Spacing for an output whose pixels are the source's resampled by
    ``scale`` (output pixels per source pixel; 1 = same grid, also for outpainting, which adds
    pixels at the same spacing). None where the source has no calibrated spacing."""
    if scale <= 0:
        raise ValueError(f"scale {scale} is not positive")
    spacing = source.get("PixelSpacing")
    if not spacing or len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
        return None  # absent, or written as 0\0 (seen in the wild): not a calibration
    return float(spacing[0]) / scale, float(spacing[1]) / scale


def _references(
    sources: Sequence[Dataset], purpose: Code
) -> tuple[DicomSequence, DicomSequence]:
    """(Source Image Sequence, Referenced Series Sequence) for the given sources."""
    source_items = []
    by_series: dict[str, list[Dataset]] = {}
    for src in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
        source_items.append(item)
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        by_series.setdefault(str(src.SeriesInstanceUID), []).append(ref)
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = refs
        series_items.append(item)
    return DicomSequence(source_items), DicomSequence(series_items)


def _laterality(source: Dataset) -> str | None:
    value = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "")
    return value if value in ("R", "L") else None


_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (LPS)


def _direction(cosines: Sequence[float]) -> str:
    """Patient Orientation letters of a direction, dominant axis first (PS3.3 C.7.6.1.1.1)."""
    order = sorted(range(3), key=lambda i: -abs(cosines[i]))
    return "".join(
        _AXIS_LETTERS[i][0 if cosines[i] > 0 else 1] for i in order if abs(cosines[i]) > 0.25
    )


def _orientation(source: Dataset, pixels: Pixels) -> tuple[str, str] | None:
    """Patient Orientation where the output keeps the source's geometry (the caller says so by
    giving a pixel spacing): the source's own, or derived from Image Orientation (Patient)."""
    if pixels.pixel_spacing is None:
        return None
    value = [str(v) for v in (source.get("PatientOrientation", []) or [])]
    if len(value) == 2 and all(value):
        return value[0], value[1]
    iop = [float(v) for v in (source.get("ImageOrientationPatient", []) or [])]
    if len(iop) == 6:
        return _direction(iop[:3]), _direction(iop[3:])
    return None


def output_uids(
    sources: Sequence[Dataset], provenance: Provenance, study_uid: str, series: SeriesSpec,
    index: int, root: str,
) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of an output: the same inputs give the same
    UIDs on every run and machine."""
    kind = "synthetic" if isinstance(provenance, Synthesis) else "deidentified"
    source_series = sorted({str(s.SeriesInstanceUID) for s in sources})
    source_instances = [str(s.SOPInstanceUID) for s in sources]
    series_uid = derive_uid(
        root, "series", kind, study_uid, source_series, provenance.series_key(), series.number,
        series.description,
    )
    sop_uid = derive_uid(
        root, "instance", kind, series_uid, source_instances, provenance.instance_key(), index
    )
    return series_uid, sop_uid


def build_sc(
    sources: Sequence[Dataset],
    pixels: Pixels,
    provenance: Provenance,
    settings: OutputSettings,
    *,
    series: SeriesSpec | None = None,
    identity: NewIdentity | None = None,
    index: int = 0,
) -> Dataset:
    """Build one Secondary Capture object from ``sources`` (the first is the reference for
    patient, study and geometry) and ``pixels``, recording ``provenance``.

    With ``identity`` None the output is a new series in the source's study, for the source's
    patient; otherwise it goes into the study ``identity`` describes.
    """
    if not sources:
        raise ValueError("an SC object needs at least one source data set")
    if isinstance(provenance, Deidentification) and identity is None:
        raise ValueError("a de-identified output needs a new identity: it cannot be placed in "
                         "the source's identified study")
    series = series or SeriesSpec()
    ref = sources[0]
    study_uid = identity.study_instance_uid if identity else str(ref.StudyInstanceUID)
    series_uid, sop_uid = output_uids(
        sources, provenance, study_uid, series, index, settings.uid_root
    )
    frames = pixels.monochrome2()
    first = frames[0]
    photometric = "RGB" if pixels.color else "MONOCHROME2"
    bits_allocated = 8 * frames.dtype.itemsize
    equipment = _contributing_equipment(provenance, settings)
    common: dict[str, Any] = {
        "pixel_array": first,
        "photometric_interpretation": photometric,
        "bits_allocated": bits_allocated,
        "coordinate_system": "PATIENT",
        "series_instance_uid": series_uid,
        "series_number": series.number,
        "sop_instance_uid": sop_uid,
        "instance_number": index + 1,
        "manufacturer": settings.manufacturer,
        "pixel_spacing": pixels.pixel_spacing,
        "laterality": _laterality(ref),
        "patient_orientation": _orientation(ref, pixels),
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "series_description": series.description,
    }
    orientation = common["patient_orientation"]
    if orientation is None:
        # highdicom demands an orientation for patient images; unknown is an empty value
        # (General Image module, Type 2C), set right after construction.
        common["patient_orientation"] = ("L", "F")
    if identity is None:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref, contributing_equipment=[equipment], **common
        )
    else:
        sc = hd.sc.SCImage(
            study_instance_uid=identity.study_instance_uid,
            patient_id=identity.patient_id,
            patient_name=identity.patient_name,
            patient_birth_date=(
                identity.patient_birth_date.strftime("%Y%m%d")
                if identity.patient_birth_date else None
            ),
            patient_sex=identity.patient_sex or None,
            accession_number=identity.accession_number,
            study_id=identity.study_id,
            study_date=identity.study_date,
            study_time=identity.study_time,
            referring_physician_name=identity.referring_physician_name,
            contributing_equipment=[equipment],
            **common,
        )
        if identity.study_description:
            sc.StudyDescription = identity.study_description
    if orientation is None:
        sc.PatientOrientation = []
    if pixels.bits_stored is not None and not pixels.color:
        sc.BitsStored = pixels.bits_stored
        sc.HighBit = pixels.bits_stored - 1
    if frames.shape[0] > 1:
        _make_multiframe(sc, frames, pixels)
    _apply_flavour(sc, sources, provenance, settings)
    if "Laterality" not in sc and not sc.get("BodyPartExamined"):
        # General Series, Type 2C: without a body part nobody can tell whether it is paired,
        # so the attribute is present and empty (unknown).
        sc.Laterality = ""
    stamp_own(sc, settings.manufacturer)
    return sc


def own_mark(manufacturer: str, sop_instance_uid: str) -> str:
    """The Device Serial Number of the node's Contributing Equipment items in an output: bound
    to the manufacturer and to the object's own SOP Instance UID, so that no other object
    (a clinical image, or an image someone derived from an output) carries it by accident."""
    text = f"synthnode-output\0{manufacturer}\0{sop_instance_uid}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def stamp_own(ds: Dataset, manufacturer: str) -> None:
    """Mark ``ds`` as one of the node's outputs: each Contributing Equipment item of
    ``manufacturer`` gets :func:`own_mark` of ``ds``'s (final) SOP Instance UID."""
    mark = own_mark(manufacturer, str(ds.SOPInstanceUID))
    for item in ds.get("ContributingEquipmentSequence", []):
        if str(item.get("Manufacturer", "")) == manufacturer:
            item.DeviceSerialNumber = mark


def own_output(ds: Dataset, manufacturer: str) -> bool:
    """Whether ``ds`` is one of the node's outputs (:func:`stamp_own`), as it comes back from
    Orthanc or any archive that keeps objects as they are. Needs only the header."""
    sop = str(ds.get("SOPInstanceUID", "") or "")
    if not sop:
        return False
    mark = own_mark(manufacturer, sop)
    try:
        items = ds.get("ContributingEquipmentSequence", []) or []
        return any(str(item.get("Manufacturer", "")) == manufacturer
                   and str(item.get("DeviceSerialNumber", "")) == mark for item in items)
    except Exception:  # noqa: BLE001 - a malformed sequence is simply not our mark
        return False


def _contributing_equipment(
    provenance: Provenance, settings: OutputSettings
) -> hd.ContributingEquipment:
    if isinstance(provenance, Synthesis):
        return hd.ContributingEquipment(
            manufacturer=settings.manufacturer,
            purpose_of_reference=codes.DCM.SynthesizingEquipment,
            manufacturer_model_name=provenance.model_id[:64],
            software_versions=[f"synthnode {__version__}", provenance.weights_hash[:64]],
            contribution_description=f"synthetic image: {provenance.task.value}",
        )
    return copy.deepcopy(_deidentifying_equipment(settings.manufacturer))


def fresh(ds: Dataset) -> Dataset:
    """A plain copy of a small data set (its elements and nested items, no highdicom class):
    what each output gets of an item built once; cheaper than ``copy.deepcopy`` of a
    highdicom object, which copies its Python attributes too."""
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add(DataElement(elem.tag, "SQ", [fresh(item) for item in elem.value]))
        else:
            out.add(DataElement(elem.tag, elem.VR, copy.copy(elem.value)))
    return out


@functools.cache
def _coded(codes_: tuple[Code, ...]) -> tuple[Dataset, ...]:
    """Coded concepts, built once per set of codes (each output gets copies)."""
    return tuple(hd.sr.CodedConcept.from_code(c) for c in codes_)


@functools.cache
def _deidentifying_equipment(manufacturer: str) -> hd.ContributingEquipment:
    """The De-identifying Equipment item, built once (each output gets a copy)."""
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.DeIdentifyingEquipment,
        manufacturer_model_name="synthnode",
        software_versions=[f"synthnode {__version__}"],
        contribution_description="de-identification",
    )


def _make_multiframe(sc: Dataset, frames: np.ndarray, pixels: Pixels) -> None:
    """Turn a single-frame SC built from frame 0 into the matching multi-frame SC (PS3.3 A.8.2
    to A.8.5): SOP class, Multi-frame and SC Multi-frame Image modules, all frames."""
    if pixels.color:
        sop_class = MULTIFRAME_TRUE_COLOR
    elif frames.dtype == np.uint8:
        sop_class = MULTIFRAME_GRAYSCALE_BYTE
    else:
        sop_class = MULTIFRAME_GRAYSCALE_WORD
    sc.SOPClassUID = UID(sop_class)
    sc.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    # Multi-frame module
    sc.NumberOfFrames = frames.shape[0]
    sc.FrameIncrementPointer = _FRAME_LABEL_VECTOR
    sc.FrameLabelVector = [str(i + 1) for i in range(frames.shape[0])]
    # SC Multi-frame Image module
    sc.BurnedInAnnotation = "NO"
    if not pixels.color:
        sc.PresentationLUTShape = "IDENTITY"
        sc.RescaleIntercept = 0
        sc.RescaleSlope = 1
        sc.RescaleType = "US"
    if "PixelSpacing" in sc:
        sc.NominalScannedPixelSpacing = sc.PixelSpacing
    # The SC Image module's capture date/time belong to single-frame SC only.
    for keyword in ("PixelSpacing", "PixelSpacingCalibrationType"):
        if keyword in sc:
            delattr(sc, keyword)
    sc.PixelData = np.ascontiguousarray(frames).tobytes()


def _apply_flavour(
    sc: Dataset, sources: Sequence[Dataset], provenance: Provenance, settings: OutputSettings
) -> None:
    # Content derived from synthetic content is synthetic too.
    synthetic_source = any(str(s.get("SyntheticData", "")).upper() == "YES" for s in sources)
    sc.SecondaryCaptureDeviceManufacturer = settings.manufacturer
    sc.SecondaryCaptureDeviceSoftwareVersions = [f"synthnode {__version__}"]
    if isinstance(provenance, Synthesis):
        sc.SyntheticData = "YES"
        sc.ConversionType = "SYN"
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "NO"
        sc.RecognizableVisualFeatures = "NO"
        sc.DerivationDescription = provenance.describe()
        if sources[0].get("BodyPartExamined"):
            sc.BodyPartExamined = sources[0].BodyPartExamined
        sc.SecondaryCaptureDeviceManufacturerModelName = provenance.model_id[:64]
        sc.SecondaryCaptureDeviceSoftwareVersions = [
            f"synthnode {__version__}", provenance.weights_hash[:64],
        ]
        if provenance.task.uses_source_pixels:
            sc.SourceImageSequence, sc.ReferencedSeriesSequence = _references(
                sources, codes.DCM.SourceImageForImageProcessingOperation
            )
        return
    sc.ImageType = ["DERIVED", "SECONDARY"]
    mark_deidentified(sc, provenance, settings, synthetic=synthetic_source)
    _stamp_dates(sc, provenance.stamp)


def mark_deidentified(
    ds: Dataset, deid: Deidentification, settings: OutputSettings, *, synthetic: bool = False
) -> None:
    """Write the PS3.15 E.1.1 markers into ``ds``: Patient Identity Removed, method and CID 7050
    codes, Longitudinal Temporal Information Modified, Burned In Annotation and Recognizable
    Visual Features as the pixel step found them, Synthetic Data, and a De-identifying
    Equipment (109104) item."""
    # Patient module / SOP Common / General Image
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = deid.method[:64]
    ds.DeidentificationMethodCodeSequence = [fresh(c) for c in _coded(deid.codes())]
    ds.LongitudinalTemporalInformationModified = deid.temporal.value
    ds.BurnedInAnnotation = "YES" if deid.burned_in_annotation else "NO"
    ds.RecognizableVisualFeatures = "YES" if deid.recognizable_visual_features else "NO"
    ds.SyntheticData = "YES" if synthetic else "NO"
    items = list(ds.get("ContributingEquipmentSequence", []))
    # Ours, not any De-identifying Equipment: a source de-identified elsewhere has one too.
    if not any(i.PurposeOfReferenceCodeSequence[0].CodeValue == "109104"
               and str(i.get("Manufacturer", "")) == settings.manufacturer for i in items
               if i.get("PurposeOfReferenceCodeSequence")):
        items.append(fresh(_deidentifying_equipment(settings.manufacturer)))
        ds.ContributingEquipmentSequence = items
    if "SOPInstanceUID" in ds:
        stamp_own(ds, settings.manufacturer)


_STAMPED = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ("ContentDate", "ContentTime"),
)


def _stamp_dates(sc: Dataset, stamp: datetime.datetime | None) -> None:
    """The dates highdicom stamps (now) follow the de-identification: removed, or the stamp."""
    for item in sc.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            if stamp is None:
                del item.ContributionDateTime
            else:
                item.ContributionDateTime = stamp.strftime("%Y%m%d%H%M%S")
    for date_kw, time_kw in _STAMPED:
        if stamp is None:
            for kw in (date_kw, time_kw):
                if kw in sc:
                    delattr(sc, kw)
        elif date_kw in sc or date_kw == "ContentDate":
            setattr(sc, date_kw, stamp.strftime("%Y%m%d"))
            setattr(sc, time_kw, stamp.strftime("%H%M%S"))
