"""STOW-RS ingest against a real uvicorn: uploads land in the real spool byte for byte, a bad
part fails alone with its reason, and the request is refused whole where it must be."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from node.audit import trail_for
from node.spool import StudyState
from tests.nodeproc import make_study
from tests.opsserver import OpsServer, multipart, ops_server, settings_in

REVIEWER = ("rita", "rita-pw")


@pytest.fixture
def server(tmp_path: Path):
    with ops_server(settings_in(tmp_path)) as s:
        yield s


def _post(server: OpsServer, files: list[bytes], path: str = "/dicomweb/studies",
          auth: tuple[str, str] | None = REVIEWER, **kwargs) -> requests.Response:
    body, content_type = multipart(files, **kwargs)
    return requests.post(server.url + path, data=body, auth=auth, timeout=30,
                         headers={"Content-Type": content_type,
                                  "Accept": "application/dicom+json"})


def _uids(path: Path) -> tuple[str, str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID))


def _referenced(body: dict) -> list[str]:
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]


def test_upload_of_a_study_lands_in_the_spool_byte_identical(server: OpsServer,
                                                             tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", series=2, per_series=3)
    answer = _post(server, [f.read_bytes() for f in files])
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    body = answer.json()
    sops = [_uids(f)[1] for f in files]
    assert _referenced(body) == sops
    study = _uids(files[0])[2]
    assert body["00081190"]["Value"] == [f"{server.url}/dicomweb/studies/{study}"]
    assert "00081198" not in body
    for f in files:
        cls, sop, st, se = _uids(f)
        spooled = server.spool.instance_path(st, se, sop)
        assert spooled.read_bytes() == f.read_bytes(), f.name
        row = server.spool.index.instance(sop)
        assert row is not None and row.sop_class_uid == cls and row.size_bytes == f.stat().st_size
    assert server.spool.index.instance_aets(study) == {s: ("STOW-RS", "SYNTHNODE") for s in sops}
    (summary,) = server.spool.summaries()
    assert (summary.study_uid, summary.state, summary.series, summary.instances) == (
        study, StudyState.RECEIVING, 2, len(files))
    assert list(server.spool.tmp_dir.iterdir()) == []
    # The same upload again: duplicates (identical bytes), answered as stored, nothing written.
    again = _post(server, [f.read_bytes() for f in files])
    assert again.status_code == 200 and _referenced(again.json()) == sops
    assert server.ctx.counters.stored == len(files)
    assert server.ctx.counters.duplicates == len(files)
    trail = trail_for(server.ctx.settings)
    assert trail is not None
    second, first = trail.search(event="stow")  # newest first
    for record, stored, duplicates in ((first, len(files), 0), (second, 0, len(files))):
        assert record.actor == "rita"
        assert (record.data["stored"], record.data["duplicates"], record.data["failed"],
                record.data["refused"]) == (stored, duplicates, 0, 0)


def test_a_truncated_part_fails_alone_with_its_reason(server: OpsServer, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=3)
    data = [f.read_bytes() for f in files]
    cut = data[1][: len(data[1]) - 1000]
    answer = _post(server, [data[0], cut, data[2], b"not dicom at all"])
    assert answer.status_code == 202, answer.text
    body = answer.json()
    uids = [_uids(f) for f in files]
    assert _referenced(body) == [uids[0][1], uids[2][1]]
    failed = body["00081198"]["Value"]
    assert len(failed) == 2
    assert failed[0]["00081155"]["Value"] == [uids[1][1]]
    assert failed[0]["00081150"]["Value"] == [uids[1][0]]
    assert failed[0]["00081197"]["Value"] == [0xC000]
    assert "00081155" not in failed[1] and failed[1]["00081197"]["Value"] == [0xC000]
    warnings = answer.headers["warning"]
    assert f"part 2 ({uids[1][1]}): data set is truncated" in warnings
    assert "part 4 (SOP Instance UID unknown): not a DICOM file" in warnings
    assert server.spool.index.instance(uids[1][1]) is None
    assert server.spool.index.instance(uids[0][1]) is not None
    assert server.spool.index.instance(uids[2][1]) is not None
    assert list(server.spool.tmp_dir.iterdir()) == []
    assert server.ctx.counters.rejected == 2


def test_study_url_refuses_instances_of_another_study(server: OpsServer, tmp_path: Path) -> None:
    mine = make_study(tmp_path / "a")[0]
    other = make_study(tmp_path / "b")[0]
    study = _uids(mine)[2]
    answer = _post(server, [other.read_bytes()], path=f"/dicomweb/studies/{study}")
    assert answer.status_code == 409
    (failed,) = answer.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert f"is not the study of the request URL ({study})" in answer.headers["warning"]
    answer = _post(server, [mine.read_bytes()], path=f"/dicomweb/studies/{study}")
    assert answer.status_code == 200
    assert answer.json()["00081190"]["Value"] == [f"{server.url}/dicomweb/studies/{study}"]


def test_a_body_cut_short_stores_the_whole_parts_before_it(server: OpsServer,
                                                           tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=2)
    body, content_type = multipart([f.read_bytes() for f in files])
    cut = body[: len(body) - 3000]  # inside the second part: no closing boundary
    answer = requests.post(server.url + "/dicomweb/studies", data=cut, auth=REVIEWER,
                           headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == 202, answer.text
    assert _referenced(answer.json()) == [_uids(files[0])[1]]
    assert "ended before the closing boundary" in answer.headers["warning"]
    assert list(server.spool.tmp_dir.iterdir()) == []


def test_who_may_upload_and_what_content_type(server: OpsServer, tmp_path: Path) -> None:
    data = [make_study(tmp_path / "study")[0].read_bytes()]
    answer = _post(server, data, auth=None)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Basic realm="synthnode"'
    assert _post(server, data, auth=("rita", "wrong")).status_code == 401
    answer = _post(server, data, auth=("vic", "vic-pw"))
    assert answer.status_code == 403 and "viewer" in answer.json()["error"]
    assert _post(server, data, auth=("ada", "ada-pw")).status_code == 200
    body, _ = multipart(data)
    for content_type, code in (("application/dicom", 415),
                               ('multipart/related; type="application/dicom+json"; boundary=x',
                                415),
                               ('multipart/related; type="application/dicom"', 400)):
        answer = requests.post(server.url + "/dicomweb/studies", data=body, auth=REVIEWER,
                               headers={"Content-Type": content_type}, timeout=30)
        assert answer.status_code == code, (content_type, answer.text)
    # A part that is not application/dicom fails alone.
    answer = _post(server, data, part_type="image/jpeg")
    assert answer.status_code == 409
    assert "part Content-Type image/jpeg is not application/dicom" in answer.headers["warning"]


def test_over_the_size_limit_is_413(tmp_path: Path) -> None:
    data = make_study(tmp_path / "study")[0].read_bytes()
    with ops_server(settings_in(tmp_path / "n", console={"stow_max_bytes": 10000})) as server:
        answer = _post(server, [data])
        assert answer.status_code == 413
        assert "[console] stow_max_bytes" in answer.json()["error"]
        # Without a Content-Length (chunked): cut off while streaming.
        body, content_type = multipart([data])
        answer = requests.post(server.url + "/dicomweb/studies", auth=REVIEWER,
                               data=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                               headers={"Content-Type": content_type}, timeout=30)
        assert answer.status_code == 413
        assert server.spool.summaries() == []
        assert list(server.spool.tmp_dir.iterdir()) == []
