"""An attempt that made its outputs but did not deliver them: the next attempt delivers those
very files (no second generation); and where they are gone (the work folder wiped), a new
process makes outputs with the same UIDs, so the destination never holds two versions."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import load_settings
from node.jobs import JobState
from node.localorthanc import free_port
from tests.nodeproc import NodeProcess, StoreSCP, make_study, storescu
from tests.test_jobs import DEID_ALL, SYNTHETIC_CR, jobs_node, records, wait_for

pytestmark = pytest.mark.slow

MANIFEST = "manifest.json"


def _start(node_factory: Callable[..., NodeProcess], tmp_path: Path, port: int,
           generate: bool) -> NodeProcess:
    """A node whose rules deliver to a DICOM peer at ``port`` (down until the test starts it):
    de-identification, and with ``generate`` img2img of the CR series too."""
    peer = (f'[[destinations]]\nname = "peer"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
            f"port = {port}\n")
    rules = peer + DEID_ALL + 'destinations = ["peer"]\n'
    if generate:
        rules += SYNTHETIC_CR + 'destinations = ["peer"]\n'
    # Many attempts, backing off to 2 s: a job that failed to deliver must not go dead while
    # a loaded machine takes its time over the other (generation) job.
    return jobs_node(node_factory, tmp_path, None, rules=rules,
                     jobs={"gpu_workers": int(generate), "max_attempts": 100,
                           "backoff_max_s": 2.0}, dispatch={"max_attempts": 1})


def _work_dir(node: NodeProcess) -> Path:
    return load_settings(node.config, environ={}).jobs.work_dir


def _outputs(work: Path) -> dict[str, tuple[int, int, int]]:
    """file name -> (inode, mtime ns, size) of the outputs a job's manifest lists."""
    manifest = json.loads((work / MANIFEST).read_text())
    out = {}
    for name, *_uids in manifest["files"]:
        st = os.stat(work / name)
        out[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _uids(files: list[Path]) -> set[tuple[str, str, str]]:
    return {(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            for ds in (dcmread(f, stop_before_pixels=True) for f in files)}


def _failed_delivery(node: NodeProcess, attempts: int, count: int) -> Callable[[], bool]:
    """All ``count`` jobs have made their outputs (their manifests are written) and have failed
    ``attempts`` times to deliver them."""
    def check() -> bool:
        jobs = records(node)
        return len(jobs) == count and all(
            j.attempts >= attempts and j.state is not JobState.RUNNING and "STORESCP" in
            j.last_error and (_work_dir(node) / j.id / MANIFEST).exists() for j in jobs)
    return check


def _send_study(node: NodeProcess, tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", series=2, per_series=2, modalities=("CR", "CT"))
    assert storescu(node.port, files).returncode == 0


def test_a_retry_delivers_the_outputs_the_failed_attempt_made(
    node_factory, tmp_path: Path
) -> None:
    port = free_port()
    node = _start(node_factory, tmp_path, port, generate=False)
    _send_study(node, tmp_path)
    wait_for(_failed_delivery(node, 1, count=1), what="outputs made, delivery failed")
    work = _work_dir(node)
    (job,) = records(node)
    first = _outputs(work / job.id)
    made = {sop for _name, _class, sop, _ts in
            json.loads((work / job.id / MANIFEST).read_text())["files"]}
    assert len(first) == len(made) == 4
    wait_for(_failed_delivery(node, 3, count=1), what="two more failed attempts")
    # Attempts 2 and 3 delivered the files attempt 1 made: not one was written again.
    assert _outputs(work / job.id) == first
    assert node.log().count(f"job {job.id}: delivering the 4 outputs made by an earlier "
                            "attempt") >= 2

    scp = StoreSCP(tmp_path / "peer", port)
    try:
        wait_for(lambda: all(j.state is JobState.DONE for j in records(node)), what="done")
        assert {sop for _study, _series, sop in _uids(scp.received())} == made
    finally:
        scp.stop()


def test_outputs_made_again_in_a_new_process_keep_their_uids(
    node_factory, tmp_path: Path
) -> None:
    port = free_port()
    node = _start(node_factory, tmp_path, port, generate=True)
    _send_study(node, tmp_path)
    wait_for(_failed_delivery(node, 1, count=2), what="both jobs made outputs, delivery failed")
    work = _work_dir(node)
    before = {j.id: j.worker for j in records(node)}
    first = _uids([work / j / name for j in before for name in _outputs(work / j)])
    assert len(first) == 6
    assert node.terminate() == 0

    shutil.rmtree(work)  # nothing left to reuse: the outputs are made again
    scp = StoreSCP(tmp_path / "peer", port)
    try:
        offset = len(node.log())
        node.start()
        wait_for(lambda: all(j.state is JobState.DONE for j in records(node)), what="done")
        after = records(node)
        assert all(j.worker != before[j.id] for j in after)  # other processes made them
        assert "made by an earlier attempt" not in node.log()[offset:]
        assert _uids(scp.received()) == first
    finally:
        scp.stop()


def test_outputs_recorded_before_the_rename_are_delivered_not_made_again(tmp_path: Path) -> None:
    """A manifest written by 0.1 (its study counter named "generation") still describes the
    outputs an earlier attempt made: they are reused for that revision only."""
    from node.jobs.manifest import MANIFEST, Manifest

    (tmp_path / "out.dcm").write_bytes(b"made")
    (tmp_path / MANIFEST).write_text(json.dumps({
        "generation": 3,
        "files": [["out.dcm", "1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2.840.10008.1.2.1"]],
        "quarantined": 1, "notes": ["1.2.4: quarantined"]}))
    made = Manifest.load(tmp_path, 3)
    assert made is not None and [f.sop_instance_uid for f in made.files] == ["1.2.3"]
    assert made.quarantined == 1 and Manifest.load(tmp_path, 4) is None
