"""The disk reserve, on a real small disk (a tmpfs in the tests' private mount namespace): below
it the node refuses new instances with 0xA700 and jobs wait; freeing space resumes both, and
nothing acknowledged before is lost."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, _config

from node.jobs.state import JobState
from node.receive.check import StoreStatus
from node.receive.scp import RESERVE_COMMENT
from tests.nodeproc import StoreSCP, dataset_bytes, make_study
from tests.test_jobs import KEY, records, wait_for

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def store(port: int, files: list[Path]) -> list[tuple[int, str]]:
    """C-STORE ``files`` as they are on disk over one association: (status, error comment)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="RESERVESCU")
        ae.add_requested_context(str(dcmread(files[0], stop_before_pixels=True).SOPClassUID),
                                 ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHNODE")
        assert assoc.is_established
        try:
            answers = [assoc.send_c_store(f) for f in files]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return [(int(a.Status), str(a.get("ErrorComment", ""))) for a in answers]


def fill(ballast: Path, disk: Path, leave_bytes: int) -> None:
    """Write a ballast file until ``leave_bytes`` are free on ``disk``."""
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave_bytes
    with ballast.open("wb") as f:
        for _ in range(size // MiB):
            f.write(b"\0" * MiB)
        f.write(b"\0" * (size % MiB))


def deid_to(storescp: StoreSCP) -> str:
    """One rule: de-identify everything and deliver it to ``storescp``."""
    return f"""
[[destinations]]
name = "archive"
ae_title = "{storescp.ae_title}"
host = "127.0.0.1"
port = {storescp.port}

[[rules]]
name = "deid-all"
destinations = ["archive"]
[[rules.tasks]]
task = "deidentify"
"""


def test_below_the_reserve_refuses_and_waits_then_resumes_losing_nothing(
    node_factory, storescp: StoreSCP, small_disk: Path, tmp_path: Path
) -> None:
    rules = deid_to(storescp)
    node = node_factory(
        rules=rules,
        spool={"dir": str(small_disk / "spool"), "stable_after_s": 2.0, "check_interval_s": 0.2,
               "reserve_bytes": 16 * MiB, "reserve_percent": 0},
        output={"quarantine_dir": str(small_disk / "quarantine")},
        deid={"key": KEY},
        jobs={"work_dir": str(small_disk / "work"), "cpu_workers": 1, "heartbeat_s": 0.3,
              "heartbeat_timeout_s": 5.0, "backoff_initial_s": 0.3, "backoff_max_s": 1.0,
              "max_attempts": 2},
        dispatch={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.4},
    )
    study_a = make_study(tmp_path / "a", per_series=2)
    study_b = make_study(tmp_path / "b", per_series=2)
    study_c = make_study(tmp_path / "c", per_series=3)

    # 1. Above the reserve: stored, de-identified, delivered.
    assert store(node.port, study_a) == [(0, "")] * 2
    wait_for(lambda: len(storescp.received()) == 2, what="study A's outputs at storescp")

    # 2. B is acknowledged; then the disk fills below the reserve before B's job can start.
    assert store(node.port, study_b) == [(0, "")] * 2
    ballast = small_disk / "ballast"
    fill(ballast, small_disk, leave_bytes=8 * MiB)

    # 3. New instances are refused, naming the reserve; one log line, however many refusals.
    time.sleep(0.6)  # the node reads free space at most every 0.25 s
    assert store(node.port, study_c) == [(StoreStatus.OUT_OF_RESOURCES, RESERVE_COMMENT)] * 3
    assert node.log().count("receiving paused:") == 1
    assert "below the reserve of 16 MiB ([spool] reserve_bytes / reserve_percent)" in node.log()
    assert not list((node.spool / ".tmp").iterdir())  # refused data sets were never written
    status = node.status()
    assert status["reserve"]["paused"] is True
    assert len(status["studies"]) == 2

    # 4. B's job waits, its attempts not counted (max_attempts = 2 would have killed it).
    wait_for(lambda: " waits for disk space (attempt not counted)" in node.log(),
             what="B's job waiting for space")
    time.sleep(5)  # two wait periods and more: still pending, never dead
    study_b_uid = str(dcmread(study_b[0]).StudyInstanceUID)
    (job_b,) = [j for j in records(node) if j.study_uid == study_b_uid]
    assert job_b.state is JobState.PENDING and job_b.attempts == 0, job_b
    assert job_b.last_error.startswith("waiting for disk space: below the disk reserve")
    assert len(storescp.received()) == 2

    # 5. Space is freed: receiving and B's job resume by themselves.
    ballast.unlink()
    wait_for(lambda: store(node.port, study_c[:1])[0][0] == 0, timeout_s=10,
             what="receiving to resume")
    assert store(node.port, study_c[1:]) == [(0, "")] * 2
    wait_for(lambda: len(records(node)) == 3 and all(
        j.state is JobState.DONE for j in records(node)), what="all three jobs done")
    assert len(storescp.received()) == 7  # one output per source instance
    assert "receiving resumed" in node.log()
    assert f"job {job_b.id}: free space is above the reserve again; resuming" in node.log()
    done_b = next(j for j in records(node) if j.id == job_b.id)
    assert done_b.attempts == 1 and done_b.outputs == 2

    # 6. Every acknowledged instance is in the spool, byte for byte.
    spooled = node.spooled()
    for f in study_a + study_b + study_c:
        sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(spooled[sop].read_bytes()) == dataset_bytes(f.read_bytes())
    assert node.terminate() == 0
    (stopped,) = re.findall(r"stopped: .* (\d+) refused below the disk reserve", node.log())
    assert int(stopped) >= 3  # study C's, and those of the resumption awaited


def test_a_job_that_crosses_the_reserve_midway_leaves_nothing_half_made(
    node_factory, storescp: StoreSCP, small_disk: Path, tmp_path: Path
) -> None:
    """The reserve is crossed while a job writes its outputs: the job stops, removes what it
    had half made (else those files would hold the very space it waits for, and it would wait
    forever), waits without counting the attempt, and completes once space is freed."""
    from pydicom.uid import generate_uid

    from tests.test_large import write_multiframe

    base = tmp_path / "base.dcm"
    write_multiframe(base, 1024, 1024, 2)  # 2 MiB
    study = []
    for n in range(10):
        ds = dcmread(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / f"i{n}.dcm")
        study.append(tmp_path / f"i{n}.dcm")
    rules = deid_to(storescp)
    node = node_factory(
        rules=rules,
        spool={"dir": str(small_disk / "spool"), "stable_after_s": 3.0, "check_interval_s": 0.2,
               "reserve_bytes": 16 * MiB, "reserve_percent": 0},
        output={"quarantine_dir": str(small_disk / "quarantine")},
        deid={"key": KEY, "detect_text": False},
        jobs={"work_dir": str(small_disk / "work"), "cpu_workers": 1, "heartbeat_s": 0.3,
              "heartbeat_timeout_s": 30.0, "max_attempts": 2},
    )
    assert store(node.port, study) == [(0, "")] * 10
    # Room for two or three of the ten 2 MiB outputs above the reserve, no more.
    ballast = small_disk / "ballast"
    fill(ballast, small_disk, leave_bytes=16 * MiB + 5 * MiB)
    wait_for(lambda: " waits for disk space (attempt not counted)" in node.log(), timeout_s=60,
             what="the job stopping for space")
    work = small_disk / "work"

    def in_a_long_wait() -> bool:
        (job,) = records(node)
        return job.state is JobState.PENDING and job.not_before - time.time() > 3.0

    wait_for(in_a_long_wait, timeout_s=60, what="a wait of several seconds")
    assert not list(work.rglob("*.dcm")), "half-made outputs kept while the job waits"
    (job,) = records(node)
    assert job.attempts == 0 and job.last_error.startswith("waiting for disk space"), job
    assert not storescp.received()

    ballast.unlink()
    wait_for(lambda: records(node)[0].state is JobState.DONE, timeout_s=90, what="the job done")
    (job,) = records(node)
    assert job.attempts == 1 and job.outputs == 10, job
    assert len(storescp.received()) == 10
