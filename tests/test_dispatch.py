"""Dispatch against real destinations: Orthanc 1.10 over REST, dcmtk's storescp and pynetdicom
SCPs by C-STORE, and the ``synthnode send`` command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage

from node.archives import DispatchResult
from node.archives.dimse import send_to_peer, status_outcome
from node.archives.orthanc import has_labels, send_to_orthanc
from node.archives.retry import Outcome, backoff_delays, run_rounds, transient
from node.config import DicomDestination, DispatchSettings, NodeSettings, Settings
from node.localorthanc import OrthancProcess
from node.process import configure_pynetdicom
from tests.conftest import free_port
from tests.nodeproc import SYNTHNODE, StoreSCP, dataset_bytes, make_study, sample_file

FAST_RETRIES = {"max_attempts": 8, "backoff_initial_s": 0.2, "backoff_max_s": 1.0}


@pytest.fixture(autouse=True)
def _sending_process() -> Iterator[None]:
    # Set up as the node's sending processes are at their start (files sent raw); other tests
    # expect pynetdicom's default.
    before = _config.STORE_SEND_CHUNKED_DATASET
    configure_pynetdicom(NodeSettings(), scp=False)
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def settings_for(server: OrthancProcess | None = None, **sections: dict[str, Any]) -> Settings:
    """Settings with fast retries, the given Orthanc's URL and credentials, and overrides."""
    data: dict[str, Any] = {"dispatch": dict(FAST_RETRIES)}
    if server is not None:
        data["orthanc"] = {"url": server.url, "username": server.username,
                           "password": server.password, "timeout_s": 5}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Settings.model_validate(data)


def compressed_copy(folder: Path) -> Path:
    """pydicom's JPEG2000.dcm (JPEG 2000, lossy) with a fresh SOP Instance UID."""
    ds = dcmread(sample_file("JPEG2000.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jpeg2000.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_all_sent(results: list[DispatchResult], files: list[Path]) -> None:
    assert [r.sop_instance_uid for r in results] == [sop_uid(f) for f in files]
    failed = [r for r in results if not r.ok]
    assert not failed, failed


# -- Orthanc over REST ------------------------------------------------------------------------


def test_upload_keeps_bytes_and_marks_job_and_task(orthanc: OrthancProcess, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", series=2, per_series=2)
    results = send_to_orthanc(files, settings_for(orthanc), job_id="job-42", task="deid")
    assert_all_sent(results, files)
    assert all(r.attempts == 1 and r.reason == "" for r in results)
    assert all(r.destination == f"orthanc {orthanc.url}" for r in results)
    assert orthanc.count_instances() == len(files)
    for path in files:
        ds = dcmread(path)
        instance = orthanc.find_instance(str(ds.SOPInstanceUID))
        assert instance is not None
        tags = orthanc.get_json(f"/instances/{instance}/simplified-tags")
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                        "PatientID", "PatientName"):
            assert tags[keyword] == str(ds[keyword].value), keyword
        assert orthanc.request("GET", f"/instances/{instance}/file") == path.read_bytes()
        metadata = orthanc.get_json(f"/instances/{instance}/metadata?expand")
        assert metadata["SynthnodeJob"] == "job-42"
        assert metadata["SynthnodeTask"] == "deid"


def test_sending_twice_keeps_one_copy_and_succeeds(orthanc: OrthancProcess, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=3)
    settings = settings_for(orthanc)
    first = send_to_orthanc(files, settings, job_id="job-1", task="deid")
    again = send_to_orthanc(files, settings, job_id="job-2", task="deid")
    assert_all_sent(first, files)
    assert_all_sent(again, files)
    assert all(r.attempts == 1 and r.reason == "already stored" for r in again)
    assert orthanc.count_instances() == len(files)
    # The metadata follows the latest job that produced the instance.
    instance = orthanc.find_instance(sop_uid(files[0]))
    assert orthanc.request("GET", f"/instances/{instance}/metadata/SynthnodeJob") == b"job-2"


def counted(dispatcher: Any) -> list[tuple[str, str]]:
    """The HTTP requests ``dispatcher`` makes from now on, (method, path), as its session
    sends them (a response hook: what went over the wire, not what the code meant to do)."""
    seen: list[tuple[str, str]] = []

    def hook(response: Any, *args: Any, **kwargs: Any) -> None:
        request = response.request
        seen.append((request.method, request.path_url.split("?", 1)[0]))

    dispatcher._client._http_session.hooks["response"].append(hook)
    return seen


def test_a_job_goes_up_in_zip_batches_and_a_conflict_falls_back_alone(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """70 objects with upload_batch 32: three POSTs (32, 32, 6), each object then marked. A
    batch holding one object Orthanc already holds with other content is sent again one by
    one: that object fails (permanent, naming the conflict), the rest of the batch is sent,
    and what was already stored the same counts as sent."""
    from node.archives.orthanc import OrthancDispatcher

    files = make_study(tmp_path / "study", series=2, per_series=35)
    settings = settings_for(orthanc)
    with OrthancDispatcher(settings.orthanc, settings.dispatch) as dispatcher:
        seen = counted(dispatcher)
        results = dispatcher.send(files, "job-zip", "deid")
    assert_all_sent(results, files)
    assert orthanc.count_instances() == 70
    posts = [r for r in seen if r == ("POST", "/instances")]
    assert len(posts) == 3, seen[:5]
    assert sum(1 for m, _ in seen if m == "PUT") == 2 * 70
    for path in (files[0], files[40], files[69]):
        instance = orthanc.find_instance(sop_uid(path))
        assert orthanc.request("GET", f"/instances/{instance}/file") == path.read_bytes()
        assert orthanc.get_json(f"/instances/{instance}/metadata?expand")["SynthnodeJob"] == (
            "job-zip")

    # a second study: one of its objects is already in Orthanc with other content, one the
    # same; the batch falls back to one request per object
    more = make_study(tmp_path / "more", series=1, per_series=5)
    same, other = more[0], more[1]
    assert send_to_orthanc([same], settings, "job-0", "deid")[0].ok
    changed = dcmread(other)
    changed.SeriesDescription = "another content, the same SOP Instance UID"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    assert send_to_orthanc([changed_path], settings, "job-0", "deid")[0].ok
    with OrthancDispatcher(settings.orthanc, settings.dispatch) as dispatcher:
        seen = counted(dispatcher)
        results = dispatcher.send(more, "job-more", "deid")
    assert [r.ok for r in results] == [True, False, True, True, True]
    assert results[0].reason == "already stored"
    assert "already holds another object" in results[1].reason
    assert "SeriesDescription differs" in results[1].reason
    # (the ZIP stored these; sent again one by one, Orthanc holds them the same: sent)
    assert [r.reason for r in results[2:]] == ["already stored"] * 3
    assert sum(1 for r in seen if r == ("POST", "/instances")) == 1 + 5  # the ZIP, then each
    assert orthanc.count_instances() == 70 + 5


def test_upload_batch_1_sends_one_request_per_object(orthanc: OrthancProcess,
                                                      tmp_path: Path) -> None:
    from node.archives.orthanc import OrthancDispatcher

    files = make_study(tmp_path / "study", series=1, per_series=4)
    settings = settings_for(orthanc, orthanc={"upload_batch": 1})
    with OrthancDispatcher(settings.orthanc, settings.dispatch) as dispatcher:
        seen = counted(dispatcher)
        assert_all_sent(dispatcher.send(files, "job-one", "deid"), files)
    assert sum(1 for r in seen if r == ("POST", "/instances")) == 4


def wait_for_retry(caplog: pytest.LogCaptureFixture, rounds: int = 1) -> None:
    """Until dispatch has logged ``rounds`` failed rounds ("... to retry in ..."): the positive
    event that the destination's absence was seen, whatever the machine's load."""
    deadline = time.monotonic() + 60
    while sum("to retry in" in r.getMessage() for r in caplog.records) < rounds:
        assert time.monotonic() < deadline, "no failed round logged within 60 s"
        time.sleep(0.02)


# Retries enough to outlast an Orthanc (re)start on a loaded machine (the backoff stays 1 s).
PATIENT_RETRIES = {"max_attempts": 100}


@pytest.mark.slow
def test_orthanc_down_then_back_gets_everything_once(
    orthanc: OrthancProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.archives.retry")
    files = make_study(tmp_path / "study", per_series=5)
    orthanc.stop(kill=True)
    results: list[DispatchResult] = []
    settings = settings_for(orthanc, dispatch=PATIENT_RETRIES)
    worker = threading.Thread(
        target=lambda: results.extend(
            send_to_orthanc(files, settings, job_id="job-7", task="generate")))
    worker.start()
    wait_for_retry(caplog, rounds=2)  # rounds 1 and 2 found Orthanc down
    orthanc.start()
    # The backoff is capped at 1 s: done soon after Orthanc is back (bound generous for load).
    worker.join(timeout=30)
    assert not worker.is_alive(), "dispatch did not finish within 30 s of Orthanc's return"
    assert_all_sent(results, files)
    assert all(r.attempts > 2 for r in results), [r.attempts for r in results]
    assert orthanc.count_instances() == len(files)
    for path in files:
        instance = orthanc.find_instance(sop_uid(path))
        assert orthanc.request("GET", f"/instances/{instance}/metadata/SynthnodeTask") == (
            b"generate")


@pytest.mark.slow
def test_orthanc_killed_mid_dispatch_then_restarted_gets_everything_once(
    orthanc: OrthancProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.archives.retry")
    files = make_study(tmp_path / "study", per_series=250)
    results: list[DispatchResult] = []
    settings = settings_for(orthanc, dispatch=PATIENT_RETRIES)
    worker = threading.Thread(
        target=lambda: results.extend(
            send_to_orthanc(files, settings, job_id="job-8", task="deid")))
    worker.start()
    deadline = time.monotonic() + 60
    # inside the second ZIP of 32: the first is stored and marked, the second half stored
    while orthanc.count_instances() < 45:
        assert time.monotonic() < deadline, "uploads did not start"
        time.sleep(0.01)
    orthanc.stop(kill=True)  # in the middle of the set
    assert worker.is_alive(), "dispatch finished before Orthanc was killed"
    wait_for_retry(caplog)  # a round met the dead Orthanc
    orthanc.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "dispatch did not finish within 60 s"
    assert_all_sent(results, files)
    attempts = [r.attempts for r in results]
    assert min(attempts) == 1 and max(attempts) > 1, attempts  # some before, some after
    assert orthanc.count_instances() == len(files)  # each exactly once


def test_wrong_password_fails_at_once_naming_http_401(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", per_series=2)
    # A 60 s backoff: a 401 taken for a transient failure would wait it out.
    settings = settings_for(orthanc, orthanc={"password": "wrong"},
                            dispatch={"backoff_initial_s": 60.0, "backoff_max_s": 60.0})
    started = time.monotonic()
    results = send_to_orthanc(files, settings, job_id="job-1", task="deid")
    assert time.monotonic() - started < 30  # no backoff wait
    assert [r.ok for r in results] == [False, False]
    assert all(r.attempts == 1 for r in results)
    assert all("HTTP 401" in r.reason and "password" in r.reason for r in results), results
    assert orthanc.count_instances() == 0


def test_undeclared_metadata_is_a_permanent_failure(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study")
    settings = settings_for(orthanc, orthanc={"job_metadata": "NotDeclared"})
    [result] = send_to_orthanc(files, settings, job_id="job-1", task="deid")
    assert not result.ok and result.attempts == 1
    assert "HTTP 404" in result.reason and "UserMetadata" in result.reason


def test_unreadable_file_fails_alone(orthanc: OrthancProcess, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file" * 20)
    results = send_to_orthanc([files[0], junk, files[1]], settings_for(orthanc), "job-1", "deid")
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].attempts == 0 and "not a DICOM file" in results[1].reason
    assert orthanc.count_instances() == 2


def test_unreachable_orthanc_gives_up_after_max_attempts(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=2)
    settings = Settings.model_validate({
        "orthanc": {"url": f"http://127.0.0.1:{free_port()}"},
        "dispatch": {"max_attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.1},
    })
    results = send_to_orthanc(files, settings, job_id="job-1", task="deid")
    assert all(not r.ok and r.attempts == 3 for r in results)
    assert all("unreachable" in r.reason and "gave up after 3 attempts" in r.reason
               for r in results), results


def test_labels_only_from_orthanc_1_12() -> None:
    assert not has_labels("1.10.1")
    assert not has_labels("1.11.3")
    assert has_labels("1.12.0") and has_labels("1.12.10") and has_labels("2.0.0")
    assert has_labels("mainline-20250101")
    assert not has_labels("")


# -- C-STORE ----------------------------------------------------------------------------------


def test_cstore_sends_data_sets_byte_identical_in_their_own_syntax(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    files = [*make_study(tmp_path / "study", per_series=3), compressed_copy(tmp_path / "j2k")]
    destination = DicomDestination(name="scp", ae_title=storescp.ae_title, host="127.0.0.1",
                              port=storescp.port)
    results = send_to_peer(files, destination, settings_for(), calling_aet="SYNTHTEST")
    assert_all_sent(results, files)
    assert all(r.attempts == 1 for r in results)
    assert results[0].destination == f"STORESCP@127.0.0.1:{storescp.port}"
    received = {sop_uid(p): p for p in storescp.received()}
    assert set(received) == {sop_uid(f) for f in files}
    for path in files:
        got = received[sop_uid(path)]
        assert dataset_bytes(got.read_bytes()) == dataset_bytes(path.read_bytes()), path.name
        assert (dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID
                == dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert dcmread(received[sop_uid(files[-1])]).file_meta.TransferSyntaxUID == JPEG2000


def test_dead_peer_fails_after_max_attempts(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=2)
    destination = DicomDestination(name="dead", ae_title="NOBODY", host="127.0.0.1",
                              port=free_port())
    settings = settings_for(dispatch={"max_attempts": 3, "backoff_initial_s": 0.05})
    started = time.monotonic()
    results = send_to_peer(files, destination, settings)
    assert time.monotonic() - started < 30  # a refused connection fails at once, no timeout
    assert all(not r.ok and r.attempts == 3 for r in results)
    assert all("cannot associate with NOBODY@127.0.0.1" in r.reason
               and "gave up after 3 attempts" in r.reason for r in results), results


class StatusSCP:
    """A pynetdicom Storage SCP that accepts CT in Explicit VR Little Endian only and answers
    each C-STORE with the next status of a script (then Success)."""

    ae_title = "STATUSSCP"

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[str] = []
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.statuses.pop(0) if self.statuses else 0x0000

    def destination(self, ae_title: str | None = None) -> DicomDestination:
        return DicomDestination(name="status", ae_title=ae_title or self.ae_title, host="127.0.0.1",
                           port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def status_scp() -> Iterator[Any]:
    servers: list[StatusSCP] = []

    def start(statuses: list[int]) -> StatusSCP:
        servers.append(StatusSCP(statuses))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_cstore_statuses_decide_retry(status_scp: Any, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=4)
    # Out of resources (transient), cannot understand (permanent), coercion warning, success.
    scp = status_scp([0xA700, 0xC000, 0xB000, 0x0000])
    results = send_to_peer(files, scp.destination(), settings_for())
    assert [r.ok for r in results] == [True, False, True, True]
    assert [r.attempts for r in results] == [2, 1, 1, 1]
    assert "0xc000" in results[1].reason and "Cannot Understand" in results[1].reason
    assert "0xb000" in results[2].reason
    first = sop_uid(files[0])
    assert scp.received.count(first) == 2 and len(scp.received) == 5


def test_cstore_refused_context_and_rejected_association_are_permanent(
    status_scp: Any, tmp_path: Path
) -> None:
    scp = status_scp([])
    ct = make_study(tmp_path / "study")
    j2k = compressed_copy(tmp_path / "j2k")  # CT in JPEG 2000: the SCP takes only Explicit VR
    results = send_to_peer([*ct, j2k], scp.destination(), settings_for())
    assert [r.ok for r in results] == [True, False]
    assert results[1].attempts == 1
    assert f"transfer syntax {JPEG2000}" in results[1].reason
    [rejected] = send_to_peer(ct, scp.destination(ae_title="WRONGAE"), settings_for())
    assert not rejected.ok and rejected.attempts == 1
    assert "association rejected" in rejected.reason and "Permanent" in rejected.reason


def test_status_classes() -> None:
    assert status_outcome(0x0000).ok
    assert status_outcome(0xB007).ok and "0xb007" in status_outcome(0xB007).reason
    assert status_outcome(0x0111).ok  # duplicate: the peer has it already
    for code in (0xA700, 0xA7FF, 0x0213, 0x0110):
        assert not status_outcome(code).ok and status_outcome(code).transient, hex(code)
    for code in (0xA900, 0xC123, 0x0122, 0x0124, 0x0211):
        assert not status_outcome(code).ok and not status_outcome(code).transient, hex(code)


# -- synthnode send ---------------------------------------------------------------------------


def run_send(config: Path, *args: str, password: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYNTHNODE__ORTHANC__PASSWORD=password)
    return subprocess.run([*SYNTHNODE, "--config", str(config), "send", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_cli_send_to_orthanc_peer_and_named_destination(
    orthanc: OrthancProcess, storescp: StoreSCP, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", per_series=2)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[orthanc]\nurl = "{orthanc.url}"\nusername = "{orthanc.username}"\n'
        f"[dispatch]\nmax_attempts = 2\nbackoff_initial_s = 0.1\n"
        f'[[destinations]]\nname = "archive"\nae_title = "{storescp.ae_title}"\n'
        f'host = "127.0.0.1"\nport = {storescp.port}\n'
    )
    paths = list(map(str, files))

    done = run_send(config, *paths, "--to", "orthanc", "--job", "cli-1", "--task", "manual",
                    password=orthanc.password)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"2 of 2 sent to orthanc {orthanc.url}, 0 failed"
    assert all(line.startswith("sent") for line in lines[:2])
    assert orthanc.count_instances() == 2
    instance = orthanc.find_instance(sop_uid(files[0]))
    assert orthanc.request("GET", f"/instances/{instance}/metadata/SynthnodeJob") == b"cli-1"

    done = run_send(config, *paths, "--to", f"{storescp.ae_title}@127.0.0.1:{storescp.port}")
    assert done.returncode == 0, done.stderr
    assert "2 of 2 sent to STORESCP@127.0.0.1" in done.stdout
    done = run_send(config, *paths, "--to", "archive")
    assert done.returncode == 0, done.stderr
    assert len(storescp.received()) == 2  # storescp overwrites a re-sent instance's file

    junk = tmp_path / "junk.dcm"
    junk.write_text("junk")
    done = run_send(config, paths[0], str(junk), "--to", "orthanc", password=orthanc.password)
    assert done.returncode == 1
    assert f"FAILED {junk}  -  (0 attempts): not a DICOM file" in done.stdout
    assert done.stdout.splitlines()[-1].endswith("1 of 2 sent to orthanc " + orthanc.url
                                                 + ", 1 failed")

    done = run_send(config, paths[0], "--to", "nowhere")
    assert done.returncode == 2
    assert 'no destination "nowhere" (known: orthanc, archive)' in done.stderr
    done = run_send(config, paths[0], "--to", "orthanc", password="wrong")
    assert done.returncode == 1 and "HTTP 401" in done.stdout


def test_orthanc_process_rest_needs_credentials(orthanc: OrthancProcess) -> None:
    """The harness really runs Orthanc with authentication on."""
    good = orthanc.get_json("/system")
    assert good["Version"].startswith("1.") and good["DicomAet"] == orthanc.aet
    orthanc.password, password = "wrong", orthanc.password
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            orthanc.get_json("/system")
        assert err.value.code == 401
    finally:
        orthanc.password = password
    assert json.loads(orthanc.request("GET", "/statistics"))["CountInstances"] == 0


def test_cstore_to_orthanc_dicom_port(orthanc: OrthancProcess, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=40)
    destination = DicomDestination(name="orthanc-dimse", ae_title=orthanc.aet, host="127.0.0.1",
                              port=orthanc.dicom_port)
    results = send_to_peer(files, destination, settings_for())
    assert_all_sent(results, files)
    assert orthanc.count_instances() == len(files)


def test_data_sets_in_memory_go_to_orthanc_and_peers(
    orthanc: OrthancProcess, storescp: StoreSCP, tmp_path: Path
) -> None:
    [path] = make_study(tmp_path / "study")
    ds = dcmread(path)
    [result] = send_to_orthanc([ds], settings_for(orthanc), job_id="job-ds", task="generate")
    assert result.ok and result.sop_instance_uid == ds.SOPInstanceUID
    instance = orthanc.find_instance(str(ds.SOPInstanceUID))
    stored = dcmread(BytesIO(orthanc.request("GET", f"/instances/{instance}/file")))
    assert stored.PixelData == ds.PixelData

    destination = DicomDestination(name="scp", ae_title=storescp.ae_title, host="127.0.0.1",
                              port=storescp.port)
    [result] = send_to_peer([ds], destination, settings_for())
    assert result.ok
    [received] = storescp.received()
    assert dataset_bytes(received.read_bytes()) == dataset_bytes(path.read_bytes())

    no_meta = dcmread(path)
    del no_meta.file_meta
    [result] = send_to_peer([no_meta], destination, settings_for())
    assert not result.ok and result.attempts == 0 and "Transfer Syntax UID" in result.reason


def test_backoff_doubles_up_to_its_cap_and_stop_cancels_retries() -> None:
    settings = DispatchSettings(max_attempts=5, backoff_initial_s=0.5, backoff_max_s=3.0)
    delays = backoff_delays(settings)
    assert [next(delays) for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]

    stop = threading.Event()
    rounds: list[list[int]] = []

    def always_down(pending: list[int]) -> dict[int, Outcome]:
        rounds.append(pending)
        stop.set()  # e.g. SIGTERM arrives while the destination is down
        return dict.fromkeys(pending, transient("down"))

    # A 60 s backoff: a wait that ignored the stop would take it.
    patient = DispatchSettings(max_attempts=5, backoff_initial_s=60.0, backoff_max_s=60.0)
    started = time.monotonic()
    progress = run_rounds(2, always_down, patient, stop=stop)
    assert time.monotonic() - started < 30 and rounds == [[0, 1]]
    assert all(not p.ok and p.attempts == 1 and "cancelled" in p.reason for p in progress)
