"""The DICOMweb archive against a real Orthanc 1.10 with its DICOMweb plugin: STOW-RS exactly
once, QIDO-RS by date, series headers and WADO-RS fetches as stored, failures by kind."""

from __future__ import annotations

import datetime
import json
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.archives.base import ArchiveError, FoundStudy, StudyGone
from node.archives.dicomweb import DicomWebArchive
from node.config import DestinationKind, DicomWebDestination, DispatchSettings, Settings
from node.localorthanc import OrthancProcess, free_port
from node.samples import make_study

PASSWORD_ENV = "SYNTHNODE_TEST_DICOMWEB_PASSWORD"
FAST = DispatchSettings(max_attempts=2, backoff_initial_s=0.1, backoff_max_s=0.1)


def archive(url: str, username: str = "synthnode", **keys: str) -> DicomWebArchive:
    destination = DicomWebDestination(name="research-web", kind=DestinationKind.DICOMWEB,
                                      url=url, username=username, password_env=PASSWORD_ENV,
                                      timeout_s=10, **keys)
    return DicomWebArchive(destination, Settings(destinations=[destination], dispatch=FAST))


@pytest.fixture
def web(dicomweb_orthanc: OrthancProcess, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(PASSWORD_ENV, dicomweb_orthanc.password)
    with archive(dicomweb_orthanc.dicomweb_url) as a:
        yield a


def dated_study(folder: Path, date: str, source: str = "CT_small.dcm", series: int = 1,
                per_series: int = 1) -> list[Path]:
    """make_study's files, with this Study Date."""
    paths = make_study(folder, source=source, series=series, per_series=per_series)
    for path in paths:
        ds = dcmread(path)
        ds.StudyDate = date
        ds.save_as(path)
    return paths


def study_files(tmp_path: Path) -> list[Path]:
    """One study: a CT series of 2 (the first with Contributing Equipment, as the node's
    outputs carry) and an RLE-compressed MR series of 1."""
    ct = make_study(tmp_path / "ct", per_series=2)
    mr = make_study(tmp_path / "mr", source="MR_small_RLE.dcm")
    study_uid = dcmread(ct[0]).StudyInstanceUID
    for path in mr:
        ds = dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20040119"
        ds.SeriesNumber = 2
        ds.save_as(path)
    ds = dcmread(ct[0])
    item = Dataset()
    item.Manufacturer = "synthnode"
    item.PurposeOfReferenceCodeSequence = DicomSequence()
    ds.ContributingEquipmentSequence = DicomSequence([item])
    ds.save_as(ct[0])
    return ct + mr


def stored_file(orthanc: OrthancProcess, sop: str) -> Dataset:
    instance = orthanc.find_instance(sop)
    assert instance is not None, sop
    return dcmread(BytesIO(orthanc.request("GET", f"/instances/{instance}/file")))


def test_stow_stores_each_object_exactly_once(web: DicomWebArchive,
                                              dicomweb_orthanc: OrthancProcess,
                                              tmp_path: Path) -> None:
    files = study_files(tmp_path)
    results = web.send(files, job_id="job-1", task="deidentify")
    assert [r.ok for r in results] == [True] * 3, results
    assert all(r.attempts == 1 and r.reason == "" for r in results), results
    assert {r.destination for r in results} == {f"dicomweb {dicomweb_orthanc.dicomweb_url}"}
    assert dicomweb_orthanc.count_instances() == 3
    for path, result in zip(files, results, strict=True):
        sent = dcmread(path)
        assert result.sop_instance_uid == sent.SOPInstanceUID
        stored = stored_file(dicomweb_orthanc, sent.SOPInstanceUID)
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert stored.PixelData == sent.PixelData

    # Sending again (a retried job) stores nothing twice: each is found already stored.
    again = web.send(files, job_id="job-1", task="deidentify")
    assert [(r.ok, r.reason) for r in again] == [(True, "already stored")] * 3, again
    assert dicomweb_orthanc.count_instances() == 3

    # Other content under a stored SOP Instance UID is a permanent failure, not a silent loss.
    changed = dcmread(files[1])
    changed.WindowCenter = 123
    changed.save_as(tmp_path / "changed.dcm")
    (clash,) = web.send([tmp_path / "changed.dcm"], job_id="job-2", task="deidentify")
    assert not clash.ok and clash.attempts == 1, clash
    assert changed.SOPInstanceUID in clash.reason and "WindowCenter differs" in clash.reason
    assert dicomweb_orthanc.dicomweb_url in clash.reason
    assert stored_file(dicomweb_orthanc, changed.SOPInstanceUID).get("WindowCenter") != 123
    assert dicomweb_orthanc.count_instances() == 3


def test_stow_of_an_unreadable_object_fails_it_alone(web: DicomWebArchive,
                                                     tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", per_series=2)
    (tmp_path / "junk.dcm").write_bytes(b"not DICOM")
    results = web.send([files[0], tmp_path / "junk.dcm", files[1]], job_id="j", task="t")
    assert [r.ok for r in results] == [True, False, True], results
    assert results[1].attempts == 0 and "not a DICOM file" in results[1].reason


def test_find_by_study_date_oldest_first(web: DicomWebArchive, tmp_path: Path) -> None:
    late = dated_study(tmp_path / "late", "20210101")
    spring = dated_study(tmp_path / "spring", "20200315", per_series=3)
    new_year = dated_study(tmp_path / "new_year", "20200101", series=2)
    assert all(r.ok for r in web.send(late + spring + new_year, job_id="j", task="t"))
    uid = {name: str(dcmread(files[0]).StudyInstanceUID)
           for name, files in (("late", late), ("spring", spring), ("new_year", new_year))}

    found = web.find(datetime.date(2020, 1, 1), datetime.date(2020, 12, 31))
    assert found == [FoundStudy(uid["new_year"], uid["new_year"], "20200101", 2),
                     FoundStudy(uid["spring"], uid["spring"], "20200315", 3)]
    assert [s.key for s in web.find(datetime.date(2020, 3, 1))] == [uid["spring"], uid["late"]]
    assert web.find(datetime.date(2022, 1, 1)) == []


def test_series_carry_the_first_instance_header_and_a_deleted_study_is_gone(
    web: DicomWebArchive, dicomweb_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    files = study_files(tmp_path)
    assert all(r.ok for r in web.send(files, job_id="j", task="t"))
    (study,) = web.find(datetime.date(2004, 1, 1), datetime.date(2004, 12, 31))
    assert study.instances == 3
    series = {s.series_uid: s for s in web.series(study)}
    ct, mr = dcmread(files[0]), dcmread(files[2])
    assert set(series) == {ct.SeriesInstanceUID, mr.SeriesInstanceUID}
    ct_series, mr_series = series[ct.SeriesInstanceUID], series[mr.SeriesInstanceUID]
    assert (ct_series.instances, mr_series.instances) == (2, 1)
    assert mr_series.header.Modality == "MR" and mr_series.header.SeriesNumber == 2
    assert ct_series.header.Modality == "CT"
    assert ct_series.header.SeriesInstanceUID == ct.SeriesInstanceUID
    # A real header (WADO-RS metadata), not a QIDO answer: what the own-output check reads.
    assert ct_series.header.SOPInstanceUID in {ct.SOPInstanceUID, dcmread(files[1]).SOPInstanceUID}
    assert ct_series.header.Rows == 128

    # Deleted from the server: series says it is gone, and so does fetch.
    orthanc_study = json.loads(dicomweb_orthanc.request(
        "POST", "/tools/lookup", study.study_uid.encode()))[0]["ID"]
    dicomweb_orthanc.request("DELETE", f"/studies/{orthanc_study}")
    with pytest.raises(StudyGone, match=study.study_uid):
        web.series(study)
    with pytest.raises(StudyGone, match=ct.SeriesInstanceUID):
        web.fetch(study.key, study.study_uid, [ct.SeriesInstanceUID], tmp_path / "gone")
    assert web.find(datetime.date(2004, 1, 1)) == []


def test_contributing_equipment_reaches_the_series_header(web: DicomWebArchive,
                                                          tmp_path: Path) -> None:
    files = study_files(tmp_path)[:1]  # the CT with Contributing Equipment, alone
    assert all(r.ok for r in web.send(files, job_id="j", task="t"))
    (study,) = web.find(datetime.date(2004, 1, 1))
    (series,) = web.series(study)
    assert series.header.ContributingEquipmentSequence[0].Manufacturer == "synthnode"


def test_fetch_writes_each_instance_as_stored(web: DicomWebArchive, tmp_path: Path) -> None:
    files = study_files(tmp_path)
    assert all(r.ok for r in web.send(files, job_id="j", task="t"))
    originals = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    series_uids = sorted({str(ds.SeriesInstanceUID) for ds in originals.values()})

    folder = tmp_path / "fetched"
    fetched = web.fetch(study_uid, study_uid, series_uids, folder)
    assert len(fetched) == 3
    assert sorted(p.stem for p in fetched) == sorted(originals)
    assert not list(folder.rglob("*.part"))
    for path in fetched:
        got, original = dcmread(path), originals[path.stem]
        assert path == folder / str(original.SeriesInstanceUID) / f"{path.stem}.dcm"
        assert got.SOPInstanceUID == original.SOPInstanceUID
        # The server's stored form: RLE stays RLE (no transcoding), the same pixel bytes.
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert got.PixelData == original.PixelData


def test_a_dead_server_is_a_transient_failure_naming_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "x")
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    files = make_study(tmp_path / "in", per_series=2)
    with archive(url) as dead:
        results = dead.send(files, job_id="j", task="t")
        assert [r.ok for r in results] == [False, False]
        for r in results:
            assert r.attempts == FAST.max_attempts, r
            assert url in r.reason and "unreachable" in r.reason, r
            assert "gave up after 2 attempts" in r.reason, r
        with pytest.raises(ArchiveError, match="unreachable") as failed:
            dead.find(datetime.date(2020, 1, 1))
        assert not failed.value.permanent and url in str(failed.value)
        (problem,) = dead.problems()
        assert url in str(problem) and "is it running" in str(problem)
        assert not problem.permanent  # (a server not up yet: preflight only warns)


def test_a_wrong_password_is_permanent_and_the_right_one_works(
    dicomweb_orthanc: OrthancProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_study(tmp_path / "in")
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with archive(dicomweb_orthanc.dicomweb_url) as wrong:
        (result,) = wrong.send(files, job_id="j", task="t")
        assert not result.ok and result.attempts == 1, result  # no retry mends it
        assert "HTTP 401" in result.reason and PASSWORD_ENV in result.reason, result
        assert dicomweb_orthanc.dicomweb_url in result.reason
        (problem,) = wrong.problems()
        assert "HTTP 401" in str(problem) and PASSWORD_ENV in str(problem)
        assert problem.permanent
        with pytest.raises(ArchiveError, match="HTTP 401") as failed:
            wrong.find(datetime.date(2000, 1, 1))
        assert failed.value.permanent
    assert dicomweb_orthanc.count_instances() == 0

    monkeypatch.delenv(PASSWORD_ENV)
    with archive(dicomweb_orthanc.dicomweb_url) as unset:
        (problem,) = unset.problems()
        assert PASSWORD_ENV in str(problem) and "not set" in str(problem) and problem.permanent

    monkeypatch.setenv(PASSWORD_ENV, dicomweb_orthanc.password)
    with archive(dicomweb_orthanc.dicomweb_url) as right:
        assert right.problems() == []
        (result,) = right.send(files, job_id="j", task="t")
        assert result.ok and result.attempts == 1, result
    assert dicomweb_orthanc.count_instances() == 1
