"""The PHI corpus itself: every planted value is really in the files, so that a de-identification
test finding none of them in its output means something; the files are valid and coherent."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian

from node.dicom import validate_file
from tests.phi_corpus import (
    COMPREHENSIVE_SR,
    CREATOR_ACME,
    CREATOR_CSA,
    OUTSIDE_TABLE_E1_1,
    PlantedStudy,
    make_planted_sr,
    make_planted_study,
)


def strict(make: Callable[..., PlantedStudy], *args: Any, **kwargs: Any) -> PlantedStudy:
    """Any pydicom warning (a value too long for its VR, a bad character) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make(*args, **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlantedStudy, PlantedStudy]:
    """Three series (CT, MR, US) of two images, and an SR in the same study."""
    folder = tmp_path_factory.mktemp("corpus")
    study = strict(make_planted_study, folder, n_series=3, per_series=2, seed=3)
    sr = strict(make_planted_sr, folder, study=study, seed=3)
    return study, sr


@pytest.fixture(scope="module")
def lone_sr(tmp_path_factory: pytest.TempPathFactory) -> PlantedStudy:
    return strict(make_planted_sr, tmp_path_factory.mktemp("sr"), seed=3)


def all_bytes(planted: PlantedStudy) -> bytes:
    return b"\0".join(path.read_bytes() for path in planted.files)


def dcentvfy(files: list[Path]) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "dcentvfy"
    return subprocess.run(
        [str(tool), *map(str, files)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("which", ["study", "sr", "lone_sr"])
def test_every_planted_value_and_date_is_in_the_bytes(
    which: str, corpus: tuple[PlantedStudy, PlantedStudy], lone_sr: PlantedStudy
) -> None:
    planted = {"study": corpus[0], "sr": corpus[1], "lone_sr": lone_sr}[which]
    data = all_bytes(planted)
    missing = [p for p in planted.planted if p.value.encode() not in data]
    assert not missing
    assert [d for d in planted.dates if d.encode() not in data] == []
    assert [t for t in planted.times if t.encode() not in data] == []
    assert planted.patient_id.encode() in data and planted.study_uid.encode() in data


def test_planted_values_are_distinct_tokens(corpus: tuple[PlantedStudy, PlantedStudy]) -> None:
    study, sr = corpus
    values = [p.value for p in study.planted]
    assert len(values) == len(set(values)) > 150
    for value in values:
        assert len(value) >= 8 and value.isascii()
        # Tokens and UIDs; descriptors get phone numbers and a spoken date (see _Planter.number).
        assert value.startswith(("PHI-", PYDICOM_ROOT_UID)) or re.fullmatch(
            r"555-\d{3}-\d{4}|\d\d-[A-Z][a-z]{2}-\d{4}", value), value
    # No value inside another: a hit names exactly one planted place.
    joined = "\n".join(values)
    assert all(joined.count(v) == 1 for v in values)
    # The SR's own tokens are new; what it shares with the study is the patient and study.
    shared = {p.value for p in sr.planted} & set(values)
    assert study.patient_id in shared and study.study_uid in shared
    assert all(p.value in shared for p in sr.planted if not p.where.startswith(("SR ", "UID SR ")))


def test_places_planted(corpus: tuple[PlantedStudy, PlantedStudy]) -> None:
    study, sr = corpus
    where = " | ".join(p.where for p in study.planted)
    for place in [
        "PatientName family", "OtherPatientIDsSequence[1].IssuerOfPatientID", "PatientAddress",
        "AccessionNumber", "ProcedureCodeSequence[0].CodeMeaning",
        "RequestAttributesSequence[0].ScheduledProcedureStepID",
        "UID ReferencedPatientSequence[0].ReferencedSOPInstanceUID",
        f"creator {CREATOR_ACME} SQ item LO", f"creator {CREATOR_CSA} CSA2 image header",
        "in AnatomicRegionSequence[0]", "in RequestAttributesSequence[0]",
        "overlay (6000) OverlayDescription", "overlay (6000) OverlayLabel",
        "overlay (6000) OverlayComments",
        "curve (5000) CurveLabel", "series 2 InstitutionName", "instance 2.1 ImageComments",
        "UID instance 1.0 SOPInstanceUID", "UID series 0 FrameOfReferenceUID", "DeviceUID",
    ]:
        assert place in where, place
    assert all(fragment in where for fragment in OUTSIDE_TABLE_E1_1)
    sr_where = " | ".join(p.where for p in sr.planted)
    for place in ["SR TEXT Finding", "SR nested PNAME", "SR VerifyingObserverName", "Impression"]:
        assert place in sr_where, place


def test_files_reread_with_valid_pixels_and_overlays(
    corpus: tuple[PlantedStudy, PlantedStudy],
) -> None:
    study, sr = corpus
    for path in study.files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.pixel_array.shape[:2] == (ds.Rows, ds.Columns)
        overlay = ds.overlay_array(0x6000)
        assert overlay.shape == (ds.Rows, ds.Columns) and 0 < overlay.sum() < overlay.size
        creators = {e.value for e in ds if e.tag.is_private_creator}
        assert {CREATOR_ACME, CREATOR_CSA} <= creators
        assert ds[0x50002500].VR == "LO"
    ds = pydicom.dcmread(sr.files[0])
    assert ds.SOPClassUID == COMPREHENSIVE_SR
    assert (ds.ValueType, ds.CompletionFlag, ds.VerificationFlag) == (
        "CONTAINER", "COMPLETE", "VERIFIED",
    )
    types = [item.ValueType for item in ds.ContentSequence]
    assert types == ["PNAME", "TEXT", "DATE", "CONTAINER", "TEXT"]
    nested = ds.ContentSequence[3].ContentSequence
    assert "CONTAINER" in [item.ValueType for item in nested]
    assert "IMAGE" in [item.ValueType for item in nested]


def test_uids_are_new_and_consistent(corpus: tuple[PlantedStudy, PlantedStudy]) -> None:
    study, sr = corpus
    sets = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.files + sr.files]
    assert {ds.StudyInstanceUID for ds in sets} == {study.study_uid}
    assert {str(ds.PatientID) for ds in sets} == {study.patient_id}
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for ds in sets:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert sorted(len(v) for v in by_series.values()) == [1, 2, 2, 2]
    frames = [{ds.get("FrameOfReferenceUID") for ds in v} for v in by_series.values()]
    assert all(len(f) == 1 for f in frames)
    assert len({f.pop() for f in frames} - {None}) == 2  # CT and MR; US and SR have none
    instances = {ds.SOPInstanceUID for ds in sets}
    assert len(instances) == len(sets)
    assert not any(uid.startswith("1.3.6.1.4.1.5962") for uid in instances)  # the samples' root
    referenced = [
        item.ReferencedSOPInstanceUID
        for ds in sets[2:6]
        for item in [*ds.ReferencedImageSequence, *ds.SourceImageSequence]
    ]
    assert len(referenced) == 8 and set(referenced) <= instances


def test_same_seed_same_bytes_other_seed_other_values(tmp_path: Path) -> None:
    a = make_planted_study(tmp_path / "a", n_series=2, per_series=1, seed=5)
    b = make_planted_study(tmp_path / "b", n_series=2, per_series=1, seed=5)
    c = make_planted_study(tmp_path / "c", n_series=2, per_series=1, seed=6)
    assert [p.read_bytes() for p in a.files] == [p.read_bytes() for p in b.files]
    assert a.planted == b.planted and a.dates == b.dates
    assert not {p.value for p in a.planted} & {p.value for p in c.planted}
    sr_a = make_planted_sr(tmp_path / "a", study=a, seed=5)
    sr_b = make_planted_sr(tmp_path / "b", study=b, seed=5)
    assert sr_a.files[0].read_bytes() == sr_b.files[0].read_bytes()


def test_given_identity_is_planted_and_checked(tmp_path: Path) -> None:
    planted = make_planted_study(
        tmp_path, patient_id="MRN-00012345", patient_name="HOLLOWAY-SMITH^JONATHAN^Q",
        n_series=1, per_series=1,
    )
    values = {p.value: p.where for p in planted.planted}
    assert values["MRN-00012345"] == "PatientID" and planted.patient_id == "MRN-00012345"
    assert "HOLLOWAY-SMITH" in values and "JONATHAN" in values and "Q" not in values
    with pytest.raises(ValueError, match="MRN1"):
        make_planted_study(tmp_path / "x", patient_id="MRN1")
    with pytest.raises(ValueError, match="n_series"):
        make_planted_study(tmp_path / "x", n_series=0)


def test_images_and_sr_pass_dciodvfy(
    corpus: tuple[PlantedStudy, PlantedStudy], lone_sr: PlantedStudy
) -> None:
    study, sr = corpus
    for path in [*study.files[::2], *sr.files, *lone_sr.files]:
        result = validate_file(path)
        assert result.ok, (path.name, result.errors)


def test_dcentvfy_coherent_without_detached_references(tmp_path: Path) -> None:
    """The detached Patient/Study references point outside the set: dcentvfy says so, and only
    that; without them the set passes."""
    study = make_planted_study(tmp_path / "a", n_series=3, per_series=2)
    sr = make_planted_sr(tmp_path / "a", study=study)
    res = dcentvfy(study.files + sr.files)
    errors = [x for x in res.stderr.splitlines() if x.startswith("Error")]
    assert errors and all("Missing SOPInstanceUID that was referenced" in x for x in errors)
    study = make_planted_study(tmp_path / "b", n_series=3, per_series=2, detached_refs=False)
    sr = make_planted_sr(tmp_path / "b", study=study)
    res = dcentvfy(study.files + sr.files)
    assert res.returncode == 0 and "Error" not in res.stderr, res.stderr


def test_dates_are_plausible(corpus: tuple[PlantedStudy, PlantedStudy]) -> None:
    study, sr = corpus
    for value in study.dates + sr.dates:
        day = datetime.datetime.strptime(value[:8], "%Y%m%d").date()
        assert datetime.date(1940, 1, 1) <= day <= datetime.date(2023, 1, 31), value
    ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    for keyword in ["PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDateTime"]:
        assert ds.data_element(keyword).value in study.dates, keyword
