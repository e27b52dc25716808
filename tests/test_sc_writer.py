"""The Secondary Capture writer: every kind of object passes dciodvfy, tags say what it is."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.config import OutputSettings, TaskKind
from node.dicom import (
    Deidentification,
    NewIdentity,
    Pixels,
    SeriesSpec,
    Synthesis,
    TemporalInformation,
    build_sc,
    carried_spacing,
    save_checked,
    validate_file,
)
from node.uids import is_valid_uid
from tests.nodeproc import sample_file

RNG = np.random.default_rng(7)


def synthesis(task: TaskKind = TaskKind.IMG2IMG, seed: int = 42) -> Synthesis:
    return Synthesis(
        task, "tiny-random-sd", "0f" * 32, "DDIMScheduler", 10, 7.5, seed,
        prompt="An X-ray of the CHEST", strength=0.6 if task.uses_source_pixels else None,
    )


DEID = Deidentification(
    "synthnode PS3.15 E.1-1 2023b",
    (
        codes.DCM.CleanPixelDataOption,
        codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
    ),
    TemporalInformation.MODIFIED,
    stamp=datetime.datetime(2001, 2, 3, 4, 5, 6),
)
IDENTITY = NewIdentity("ANON^0001", "ANON0001", "2.25.1234567890", study_id="S1")


def source(name: str) -> Dataset:
    return dcmread(sample_file(name))


def kinds() -> dict[str, tuple[list[Dataset], Pixels, object, NewIdentity | None]]:
    ct, cr = source("CT_small.dcm"), source("RG1_UNCR.dcm")
    rgb, mr = source("SC_rgb_rle.dcm"), source("emri_small.dcm")
    return {
        "8-bit": ([ct], Pixels(RNG.integers(0, 256, (1, 64, 64), dtype=np.uint8)),
                  synthesis(TaskKind.TEXT2IMG), None),
        "16-bit": ([ct], Pixels(RNG.integers(0, 4096, (1, 64, 64), dtype=np.uint16),
                                bits_stored=12, pixel_spacing=(0.5, 0.5)), synthesis(), None),
        "MONOCHROME1 source": ([cr], Pixels(cr.pixel_array[None, :128, :96], "MONOCHROME1",
                                            bits_stored=15), synthesis(), None),
        "RGB": ([rgb], Pixels(rgb.pixel_array[None], "RGB"), synthesis(), None),
        "multi-frame byte": ([mr], Pixels((mr.pixel_array >> 4).astype(np.uint8)),
                             synthesis(), None),
        "multi-frame word": ([mr], Pixels(mr.pixel_array.astype(np.uint16), bits_stored=16),
                             synthesis(), None),
        "multi-frame colour": ([rgb], Pixels(np.stack([rgb.pixel_array] * 3), "RGB"),
                               synthesis(), None),
        "de-identified": ([ct], Pixels(ct.pixel_array[None].astype(np.uint16), bits_stored=16),
                          DEID, IDENTITY),
    }


@pytest.mark.parametrize("kind", list(kinds()))
def test_every_kind_passes_dciodvfy(kind: str, tmp_path: Path) -> None:
    sources, pixels, provenance, identity = kinds()[kind]
    ds = build_sc(sources, pixels, provenance, OutputSettings(), identity=identity)  # type: ignore[arg-type]
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    verdict = validate_file(path)
    assert verdict.ok, verdict.report
    back = dcmread(path)
    frames = pixels.frames.shape[0]
    expected_class = "1.2.840.10008.5.1.4.1.1.7"
    if frames > 1:
        expected_class = (
            "1.2.840.10008.5.1.4.1.1.7.4" if pixels.color
            else "1.2.840.10008.5.1.4.1.1.7.2" if pixels.frames.dtype == np.uint8
            else "1.2.840.10008.5.1.4.1.1.7.3"
        )
        assert back.NumberOfFrames == frames
    assert back.SOPClassUID == expected_class
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    out = back.pixel_array if frames > 1 else back.pixel_array[None]
    np.testing.assert_array_equal(out, pixels.monochrome2())


def test_monochrome1_is_inverted_over_its_bits() -> None:
    cr = source("RG1_UNCR.dcm")
    raw = cr.pixel_array[None, :16, :16]
    ds = build_sc([cr], Pixels(raw, "MONOCHROME1", bits_stored=15), synthesis(), OutputSettings())
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsStored, ds.HighBit) == (15, 14)
    np.testing.assert_array_equal(ds.pixel_array, 32767 - raw[0])


def test_synthetic_flavour_tags(tmp_path: Path) -> None:
    ct = source("CT_small.dcm")
    pixels = Pixels(RNG.integers(0, 256, (1, 32, 32), dtype=np.uint8))
    ds = build_sc([ct], pixels, synthesis(), OutputSettings(),
                  series=SeriesSpec("synthetic CT", 9101))
    assert ds.SyntheticData == "YES"
    assert ds.ConversionType == "SYN"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert (ds.BurnedInAnnotation, ds.RecognizableVisualFeatures) == ("NO", "NO")
    assert ds.DerivationDescription.startswith("synthnode img2img; model tiny-random-sd;")
    for part in ("scheduler DDIMScheduler", "steps 10", "guidance 7.5", "seed 42",
                 'prompt "An X-ray of the CHEST"'):
        assert part in ds.DerivationDescription
    synth_items = [
        item for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
    ]
    (item,) = synth_items
    assert item.ManufacturerModelName == "tiny-random-sd"
    assert "0f" * 32 in item.SoftwareVersions
    assert ds.SecondaryCaptureDeviceManufacturerModelName == "tiny-random-sd"
    (ref,) = ds.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    # A new series in the source's study, for the source's patient.
    assert ds.StudyInstanceUID == ct.StudyInstanceUID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert (ds.PatientID, ds.SeriesDescription, ds.SeriesNumber) == (
        ct.PatientID, "synthetic CT", 9101)
    # text2img used no source pixels: no Source Image Sequence.
    t2i = build_sc([ct], pixels, synthesis(TaskKind.TEXT2IMG), OutputSettings())
    assert "SourceImageSequence" not in t2i and "ReferencedSeriesSequence" not in t2i


def test_deidentified_flavour_tags_and_no_source_identity(tmp_path: Path) -> None:
    ct = source("CT_small.dcm")
    ds = build_sc([ct], Pixels(ct.pixel_array[None].astype(np.uint16)), DEID, OutputSettings(),
                  identity=IDENTITY)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod == "synthnode PS3.15 E.1-1 2023b"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113101", "113107"]
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.SyntheticData == "NO"
    purposes = [i.PurposeOfReferenceCodeSequence[0].CodeValue
                for i in ds.ContributingEquipmentSequence]
    assert "109104" in purposes and "109101" not in purposes  # no source equipment copied
    assert (ds.PatientName, ds.PatientID, ds.StudyInstanceUID) == (
        "ANON^0001", "ANON0001", "2.25.1234567890")
    # Dates the writer stamps take the de-identification's value, not "now".
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20010203", "040506")
    assert ds.ContentDate == "20010203"
    assert all(i.get("ContributionDateTime", "20010203").startswith("20010203")
               for i in ds.ContributingEquipmentSequence)
    path = tmp_path / "deid.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    for value in (str(ct.PatientID), str(ct.PatientName), str(ct.InstitutionName),
                  str(ct.StationName), str(ct.StudyInstanceUID), str(ct.SOPInstanceUID)):
        assert value.encode() not in data, value
    # Removed dates when the options keep none.
    removed = Deidentification("m", temporal=TemporalInformation.REMOVED)
    ds = build_sc([ct], Pixels(ct.pixel_array[None].astype(np.uint16)), removed,
                  OutputSettings(), identity=IDENTITY)
    for kw in ("InstanceCreationDate", "DateOfSecondaryCapture", "ContentDate"):
        assert kw not in ds
    assert not any("ContributionDateTime" in i for i in ds.ContributingEquipmentSequence)


def test_deidentified_output_needs_a_new_identity() -> None:
    ct = source("CT_small.dcm")
    with pytest.raises(ValueError, match="needs a new identity"):
        build_sc([ct], Pixels(ct.pixel_array[None].astype(np.uint16)), DEID, OutputSettings())


def test_derived_from_synthetic_stays_synthetic() -> None:
    ct = source("CT_small.dcm")
    ct.SyntheticData = "YES"
    ds = build_sc([ct], Pixels(ct.pixel_array[None].astype(np.uint16)), DEID, OutputSettings(),
                  identity=IDENTITY)
    assert ds.SyntheticData == "YES"


def test_uids_are_deterministic_and_follow_the_root() -> None:
    ct = source("CT_small.dcm")
    pixels = Pixels(RNG.integers(0, 256, (1, 16, 16), dtype=np.uint8))
    a = build_sc([ct], pixels, synthesis(seed=1), OutputSettings())
    b = build_sc([ct], pixels, synthesis(seed=1), OutputSettings())
    c = build_sc([ct], pixels, synthesis(seed=2), OutputSettings())
    d = build_sc([ct], pixels, synthesis(seed=1), OutputSettings(), index=1)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.SeriesInstanceUID == c.SeriesInstanceUID == d.SeriesInstanceUID  # one series
    assert len({a.SOPInstanceUID, c.SOPInstanceUID, d.SOPInstanceUID}) == 3
    assert a.SOPInstanceUID.startswith("2.25.")
    rooted = build_sc([ct], pixels, synthesis(seed=1), OutputSettings(uid_root="1.2.826.0.1.99"))
    for uid in (rooted.SeriesInstanceUID, rooted.SOPInstanceUID, a.SOPInstanceUID):
        assert is_valid_uid(uid)
    assert rooted.SOPInstanceUID.startswith("1.2.826.0.1.99.")
    assert len(rooted.SOPInstanceUID) <= 64


def test_bad_pixels_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match='pixel data type "float32" is not supported'):
        Pixels(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"neither \(F, rows, columns\)"):
        Pixels(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="colour pixels must be uint8"):
        Pixels(np.zeros((1, 4, 4, 3), np.uint16), "RGB")


def test_invalid_objects_are_quarantined_with_the_report(tmp_path: Path) -> None:
    settings = OutputSettings(quarantine_dir=tmp_path / "quarantine")
    ct = source("CT_small.dcm")
    good = build_sc([ct], Pixels(RNG.integers(0, 256, (1, 16, 16), dtype=np.uint8)),
                    synthesis(), settings)
    saved = save_checked(good, tmp_path / "out", settings, job_id="job-1")
    assert not saved.quarantined and saved.path.exists()
    bad = build_sc([ct], Pixels(RNG.integers(0, 256, (1, 16, 16), dtype=np.uint8)),
                   synthesis(seed=9), settings)
    bad.BurnedInAnnotation = "MAYBE"  # enumerated values: YES, NO
    saved = save_checked(bad, tmp_path / "out", settings, job_id="job-1")
    assert saved.quarantined
    assert saved.path == tmp_path / "quarantine" / "job-1" / f"{bad.SOPInstanceUID}.dcm"
    assert saved.path.exists() and not (tmp_path / "out" / saved.path.name).exists()
    assert "Burned In Annotation" in saved.reason
    assert "MAYBE" not in saved.reason  # values are blanked where reasons travel ...
    note = json.loads(saved.path.with_suffix(".reason.json").read_text())
    assert note["job"] == "job-1" and note["reason"] == saved.reason
    assert "MAYBE" in note["report"]  # ... and kept in the report beside the file


def test_geometry_is_carried_where_it_holds(tmp_path: Path) -> None:
    ct = source("CT_small.dcm")  # axial: rows run to the patient's left, columns posterior
    same = Pixels(ct.pixel_array[None].astype(np.uint16), pixel_spacing=carried_spacing(ct))
    ds = build_sc([ct], same, synthesis(), OutputSettings())
    assert [float(v) for v in ds.PixelSpacing] == [float(v) for v in ct.PixelSpacing]
    assert list(ds.PatientOrientation) == ["L", "P"]
    half = carried_spacing(ct, scale=0.5)
    assert half == (2 * float(ct.PixelSpacing[0]), 2 * float(ct.PixelSpacing[1]))
    # Unknown geometry: no spacing, orientation empty.
    ds = build_sc([ct], Pixels(ct.pixel_array[None, :32, :32].astype(np.uint16)), synthesis(),
                  OutputSettings())
    assert "PixelSpacing" not in ds and not ds.PatientOrientation
    path = tmp_path / "g.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert validate_file(path).ok
    assert carried_spacing(source("RG1_UNCR.dcm")) is None  # this CR says 0\\0
