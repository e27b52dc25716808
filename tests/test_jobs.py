"""The whole path: storescu -> node -> rules -> jobs on queues -> workers -> Orthanc, with real
processes: dcmtk storescu, ``synthnode serve`` and its worker processes, Orthanc 1.10, and a
redis-server for the networked backend. Workers are killed, Orthanc goes away, and every output
still arrives exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from node.config import load_settings
from node.dicom import validate_file
from node.jobs import Job, JobState, Queues
from node.localorthanc import OrthancProcess, free_port
from tests.nodeproc import (
    SYNTHNODE,
    NodeProcess,
    StoreSCP,
    dataset_bytes,
    make_study,
    storescu,
)

pytestmark = pytest.mark.slow

KEY = "test-only-deid-key-0123456789abcdef"
DEID_ALL = """
[[rules]]
name = "deid-all"
[[rules.tasks]]
task = "deidentify"
"""
SYNTHETIC_CR = """
[[rules]]
name = "synthetic-cr"
[rules.match]
modality = ["CR"]
[[rules.tasks]]
task = "img2img"
series_description = "synthetic variation"
"""


def jobs_node(node_factory: Callable[..., NodeProcess], tmp_path: Path,
              orthanc: OrthancProcess | None, rules: str = DEID_ALL,
              **over: dict[str, Any]) -> NodeProcess:
    sections: dict[str, dict[str, Any]] = {
        "spool": {"stable_after_s": 0.5, "check_interval_s": 0.2},
        "deid": {"key": KEY},
        "generate": {"model": "tiny", "steps": 2, "cache_dir": str(tmp_path / "models")},
        # A worker is taken for dead after 8 s without a beat (~27 missed): on a loaded 2-core
        # box a 3 s gap happens to a live worker, and a spurious retry would spoil the tests'
        # exact attempt counts.
        "jobs": {"cpu_workers": 1, "gpu_workers": 0, "heartbeat_s": 0.3,
                 "heartbeat_timeout_s": 8.0, "backoff_initial_s": 0.3, "backoff_max_s": 1.0,
                 "max_attempts": 20},
        "dispatch": {"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.4},
    }
    if orthanc is not None:
        sections["orthanc"] = {"url": orthanc.url, "username": orthanc.username or "",
                               "password": orthanc.password}
    for name, keys in over.items():
        sections.setdefault(name, {}).update(keys)
    return node_factory(rules=rules, **sections)


def records(node: NodeProcess) -> list[Job]:
    queues = Queues(load_settings(node.config, environ={}).jobs)
    return queues.store.all()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 90.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def all_done(node: NodeProcess, count: int) -> Callable[[], bool]:
    def check() -> bool:
        jobs = records(node)
        return len(jobs) == count and all(j.state is JobState.DONE for j in jobs)
    return check


class Tags(dict[str, Any]):
    """An instance's tags as Orthanc's ``?short`` gives them (by number: Orthanc 1.10 has no
    name for Synthetic Data), read by keyword."""

    def kw(self, keyword: str) -> Any:
        tag = Tag(tag_for_keyword(keyword))
        return self.get(f"{tag.group:04x},{tag.element:04x}")


def orthanc_instances(orthanc: OrthancProcess) -> Iterator[tuple[Tags, dict[str, Any]]]:
    """(tags, metadata) of every instance Orthanc holds."""
    for instance in orthanc.get_json("/instances"):
        tags = Tags(orthanc.get_json(f"/instances/{instance}/tags?short"))
        metadata = orthanc.get_json(f"/instances/{instance}/metadata?expand")
        yield tags, metadata


def test_study_in_deidentified_and_synthetic_series_out(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc, rules=DEID_ALL + SYNTHETIC_CR,
                     jobs={"gpu_workers": 1})
    files = make_study(tmp_path / "in", series=2, per_series=2, modalities=("CR", "CT"),
                       patient_name="Planted^Patient", patient_id="PLANTED-ID-77")
    source_study = str(dcmread(files[0]).StudyInstanceUID)
    assert storescu(node.port, files).returncode == 0

    wait_for(all_done(node, 2), what="the deidentify and img2img jobs")
    jobs = {j.kind: j for j in records(node)}
    assert jobs["deidentify"].outputs == 4 and jobs["img2img"].outputs == 2
    assert jobs["img2img"].series_uids == (str(dcmread(files[0]).SeriesInstanceUID),)

    found = list(orthanc_instances(orthanc))
    assert len(found) == 6
    by_task: dict[str, list[Tags]] = {}
    for tags, metadata in found:
        by_task.setdefault(metadata["SynthnodeTask"], []).append(tags)
        assert metadata["SynthnodeJob"] == jobs[metadata["SynthnodeTask"]].id
        assert tags.kw("PatientID").startswith("SN") and "PLANTED" not in str(tags)
        assert tags.kw("StudyInstanceUID") != source_study
        assert tags.kw("PatientIdentityRemoved") == "YES"
    assert len(by_task["deidentify"]) == 4 and len(by_task["img2img"]) == 2
    # One research study: the synthetic series sits beside the de-identified ones, under the
    # same pseudonym.
    assert len({t.kw("StudyInstanceUID") for ts in by_task.values() for t in ts}) == 1
    for tags in by_task["img2img"]:
        assert tags.kw("SOPClassUID") == "1.2.840.10008.5.1.4.1.1.7"
        assert tags.kw("SyntheticData") == "YES"
        assert tags.kw("SeriesDescription") == "synthetic variation"
    for tags in by_task["deidentify"]:
        assert tags.kw("SyntheticData") == "NO"
    sc = next(i for i in orthanc.get_json("/instances")
              if orthanc.request("GET", f"/instances/{i}/metadata/SynthnodeTask") == b"img2img")
    out = tmp_path / "sc.dcm"
    out.write_bytes(orthanc.request("GET", f"/instances/{sc}/file"))
    assert validate_file(out).ok

    (study,) = node.status()["studies"]
    assert study["state"] == "done" and study["note"] == (
        "2 jobs from rules deid-all, synthetic-cr")


def test_worker_killed_mid_job_then_one_set_of_outputs(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc)
    files = make_study(tmp_path / "in", per_series=300)
    assert storescu(node.port, files).returncode == 0

    def running_and_sending() -> int | None:
        jobs = records(node)
        if jobs and jobs[0].state is JobState.RUNNING and orthanc.count_instances() >= 10:
            return int(jobs[0].worker.rsplit(":", 1)[1])
        return None

    # (all 300 outputs are made before the first is sent: ~50 s on a quiet 2-core machine)
    pid = wait_for(running_and_sending, timeout_s=240.0, what="a job half delivered")
    killed = records(node)[0].worker
    os.kill(pid, signal.SIGKILL)
    assert orthanc.count_instances() < len(files), "the job finished before the kill"

    wait_for(all_done(node, 1), what="the retried job")
    (job,) = records(node)
    assert job.attempts == 2 and job.outputs == len(files)
    assert f"worker {job.worker}" not in node.log()  # the new worker finished it
    assert f"worker {killed} stopped (no heartbeat" in node.log()
    assert f"pid {pid} exited" in node.log()
    # Deterministic UIDs: the retry re-sent what the killed worker had sent, adding nothing.
    assert orthanc.count_instances() == len(files)
    assert len(orthanc.get_json("/series")) == 1


def test_orthanc_down_then_back_everything_arrives_once(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc)
    orthanc.stop(kill=True)
    files = make_study(tmp_path / "in", per_series=20)
    assert storescu(node.port, files).returncode == 0

    def retrying() -> bool:
        jobs = records(node)
        return bool(jobs) and jobs[0].attempts >= 2 and "unreachable" in jobs[0].last_error
    wait_for(retrying, what="a job retrying while Orthanc is down")
    out = subprocess.run([*SYNTHNODE, "--config", str(node.config), "jobs"],
                         capture_output=True, text=True, check=True).stdout
    assert "unreachable" in out

    orthanc.start()
    wait_for(all_done(node, 1), what="the job once Orthanc is back")
    assert orthanc.count_instances() == len(files)


def test_rule_matching_nothing_leaves_the_study_untouched(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    only_mr = DEID_ALL.replace('name = "deid-all"', 'name = "mr-only"\n[rules.match]\n'
                               'modality = ["MR"]')
    node = jobs_node(node_factory, tmp_path, orthanc, rules=only_mr)
    files = make_study(tmp_path / "in", per_series=3)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.status()["studies"][0]["state"] == "unrouted", what="unrouted")
    (study,) = node.status()["studies"]
    assert study["note"] == "no rule matched: nothing made of this study"
    assert study["instances"] == 3 and len(node.spooled()) == 3  # kept for retention
    assert records(node) == [] and orthanc.count_instances() == 0
    out = subprocess.run([*SYNTHNODE, "--config", str(node.config), "status"],
                         capture_output=True, text=True, check=True).stdout
    assert "unrouted" in out and "no rule matched" in out


def test_dead_letter_then_retry_by_hand_and_spool_cleanup(
    node_factory, tmp_path: Path
) -> None:
    port = free_port()
    peer = (f'[[destinations]]\nname = "peer"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
            f"port = {port}\n")
    node = jobs_node(
        node_factory, tmp_path, None, rules=peer + DEID_ALL + 'destinations = ["peer"]\n',
        jobs={"max_attempts": 2}, spool={"retention_s": 0}, dispatch={"max_attempts": 1},
    )
    files = make_study(tmp_path / "in", per_series=4)
    assert storescu(node.port, files).returncode == 0

    wait_for(lambda: [j for j in records(node) if j.state is JobState.DEAD], what="dead job")
    (job,) = records(node)
    assert job.attempts == 2 and "STORESCP@127.0.0.1" in job.last_error
    out = subprocess.run([*SYNTHNODE, "--config", str(node.config), "jobs", "--state", "dead"],
                         capture_output=True, text=True, check=True).stdout
    assert job.id in out and "last error" in out
    assert len(node.spooled()) == 4  # a dead job keeps its study in the spool

    scp = StoreSCP(tmp_path / "peer", port)
    try:
        subprocess.run([*SYNTHNODE, "--config", str(node.config), "jobs", "retry", job.id],
                       check=True, capture_output=True)
        wait_for(all_done(node, 1), what="the job retried by hand")
        assert len(scp.received()) == 4
    finally:
        scp.stop()
    wait_for(lambda: node.status()["studies"][0]["state"] == "removed", what="cleanup")
    assert node.spooled() == {}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on loopback (in the tests' private network namespace)."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        wait_for(lambda: _ping(client), timeout_s=10, what="redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_redis_backend_two_worker_processes_share_the_work(
    node_factory, orthanc: OrthancProcess, tmp_path: Path, redis_url: str
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc,
                     jobs={"backend": "redis", "redis_url": redis_url, "cpu_workers": 0})
    workers = [
        subprocess.Popen([*SYNTHNODE, "--config", str(node.config), "worker", "--queue", "cpu"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        studies = [make_study(tmp_path / f"in{n}", per_series=40, patient_id=f"P{n}")
                   for n in range(6)]
        for files in studies:
            assert storescu(node.port, files).returncode == 0
        wait_for(all_done(node, len(studies)), what="six jobs on two workers")
        jobs = records(node)
        pids = {j.worker.rsplit(":", 1)[1] for j in jobs}
        assert pids == {str(w.pid) for w in workers}, "both workers should have taken jobs"
        assert orthanc.count_instances() == sum(len(f) for f in studies)
    finally:
        for w in workers:
            w.send_signal(signal.SIGINT)
        for w in workers:
            w.wait(30)


def test_every_task_kind_through_the_queues(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    rules = """
[[rules]]
name = "everything"
[[rules.tasks]]
task = "forward"
[[rules.tasks]]
task = "text2img"
num = 2
prompt = "A CT image of the chest"
[[rules.tasks]]
task = "inpaint"
regions = [[10, 10, 20, 20]]
[[rules.tasks]]
task = "outpaint"
margins = [8, 0, 8, 0]
"""
    node = jobs_node(node_factory, tmp_path, orthanc, rules=rules, jobs={"gpu_workers": 1})
    files = make_study(tmp_path / "in", per_series=1)
    assert storescu(node.port, files).returncode == 0
    wait_for(all_done(node, 4), what="forward, text2img, inpaint and outpaint jobs")
    outputs = {j.kind: j.outputs for j in records(node)}
    assert outputs == {"forward": 1, "text2img": 2, "inpaint": 1, "outpaint": 1}
    assert orthanc.count_instances() == 5
    source = dcmread(files[0])
    forwarded = orthanc.find_instance(str(source.SOPInstanceUID))
    assert forwarded is not None  # the original, byte for byte as the node received it
    assert dataset_bytes(orthanc.request("GET", f"/instances/{forwarded}/file")) == (
        dataset_bytes(node.spooled()[str(source.SOPInstanceUID)].read_bytes()))
    for tags, metadata in orthanc_instances(orthanc):
        if metadata["SynthnodeTask"] == "outpaint":
            assert (int(tags.kw("Rows")), int(tags.kw("Columns"))) == (
                source.Rows + 16, source.Columns)
        if metadata["SynthnodeTask"] in ("text2img", "inpaint", "outpaint"):
            assert tags.kw("SyntheticData") == "YES"
            assert tags.kw("PatientID").startswith("SN")  # made from the de-identified source
