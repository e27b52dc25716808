"""/metrics, /healthz and /readyz against a real uvicorn: the counters parsed with
prometheus-client's own parser move as instances arrive (STOW-RS and C-STORE to a real SCP),
the levels are there, every process's counters are summed in multiprocess mode, and /readyz
names what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.audit import trail_for
from node.config import NodeSettings
from node.localorthanc import free_port
from node.receive.scp import start_listeners
from tests.nodeproc import make_study
from tests.opsserver import OpsServer, multipart, ops_server, settings_in

REVIEWER = ("rita", "rita-pw")


def scrape(server: OpsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    answer = requests.get(server.url + "/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def received(samples: dict, outcome: str, source: str, what: str = "instances") -> float:
    return samples.get((f"synthnode_received_{what}_total",
                        (("outcome", outcome), ("source", source))), 0.0)


def test_counters_move_as_instances_arrive_by_stow_and_c_store(tmp_path: Path) -> None:
    settings = settings_in(tmp_path / "node")
    with ops_server(settings) as server:
        before = scrape(server)
        files = make_study(tmp_path / "stow", per_series=3)
        body, content_type = multipart([f.read_bytes() for f in files] + [b"junk"])
        answer = requests.post(server.url + "/dicomweb/studies", data=body, auth=REVIEWER,
                               headers={"Content-Type": content_type}, timeout=30)
        assert answer.status_code == 202
        after_stow = scrape(server)
        assert (received(after_stow, "stored", "stow")
                - received(before, "stored", "stow")) == len(files)
        assert (received(after_stow, "stored", "stow", "bytes")
                - received(before, "stored", "stow", "bytes")) == sum(
                    f.stat().st_size for f in files)
        assert (received(after_stow, "refused", "stow")
                - received(before, "refused", "stow")) == 1

        # C-STORE to the node's real SCP over the same spool and counters.
        node = NodeSettings(port=free_port())
        (scp,) = start_listeners(node, server.spool, server.ctx.counters, chunked=False,
                                 audit_settings=settings)
        try:
            sent = make_study(tmp_path / "dimse", per_series=4)
            ae = AE(ae_title="METRICSCU")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            assert assoc.is_established
            try:
                statuses = [assoc.send_c_store(dcmread(f)).Status for f in sent]
                statuses.append(assoc.send_c_store(dcmread(sent[0])).Status)  # a duplicate
            finally:
                assoc.release()
            assert statuses == [0] * (len(sent) + 1)
            rejected = ae.associate("127.0.0.1", node.port, ae_title="NOT-THE-NODE")
            assert rejected.is_rejected
            trail = trail_for(settings)
            assert trail is not None
            deadline = time.monotonic() + 10
            while not trail.search(event="association") and time.monotonic() < deadline:
                time.sleep(0.05)
            (record,) = trail.search(event="association")
        finally:
            scp.shutdown()
        after = scrape(server)
        assert (received(after, "stored", "dicom")
                - received(after_stow, "stored", "dicom")) == len(sent)
        assert (received(after, "duplicate", "dicom")
                - received(after_stow, "duplicate", "dicom")) == 1
        assert received(after, "stored", "stow") == received(after_stow, "stored", "stow")
        for outcome in ("accepted", "rejected"):
            key = ("synthnode_associations_total", (("outcome", outcome),))
            assert after.get(key, 0) - before.get(key, 0) == 1, outcome
        assert record.actor == "METRICSCU"
        assert (record.data["calling"], record.data["called"], record.data["stored"],
                record.data["duplicates"], record.data["refused"], record.data["failed"],
                record.data["action"]) == ("METRICSCU", "SYNTHNODE", len(sent), 1, 0, 0,
                                           "released")

        # The levels, computed at the scrape.
        total = len(files) + len(sent)
        assert after[("synthnode_spool_instances", ())] == total
        assert after[("synthnode_spool_bytes", ())] == sum(
            server.spool.index.instance(dcmread(f).SOPInstanceUID).size_bytes
            for f in [*files, *sent])
        assert after[("synthnode_queue_depth", (("queue", "cpu"),))] == 0
        assert after[("synthnode_jobs", (("state", "pending"),))] == 0
        for area in ("spool", "work", "quarantine"):
            free = after[("synthnode_disk_free_bytes", (("area", area),))]
            st = os.statvfs(server.spool.dir)
            assert free > 0 and abs(free - st.f_bavail * st.f_frsize) < 64 << 20
            assert ("synthnode_disk_reserve_bytes", (("area", area),)) in after


MULTIPROCESS = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from node import metrics

    folder = Path(sys.argv[1])
    folder.mkdir()
    (folder / "stale.db").write_bytes(b"from an earlier run")
    metrics.received("stored", 100, "stow")        # before setup: in memory, then dropped
    metrics.setup(folder)
    assert not (folder / "stale.db").exists()
    metrics.received("stored", 10, "dicom")
    metrics.delivered("orthanc", 3, ok=True)
    metrics.job_finished("deid", "done", 1.5)
    child = "from node import metrics; metrics.received('stored', 20, 'dicom'); " \\
            "metrics.delivered('orthanc', 2, ok=False); metrics.quarantined('deid', 4)"
    subprocess.run([sys.executable, "-c", child], check=True)
    sys.stdout.write(metrics.exposition().decode())
""")


def test_multiprocess_mode_sums_every_process(tmp_path: Path) -> None:
    """serve calls setup after prometheus_client is imported; a worker it starts counts into
    the same folder; the scrape sums both."""
    run = subprocess.run([sys.executable, "-c", MULTIPROCESS, str(tmp_path / "prom")],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert run.returncode == 0, run.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(run.stdout) for s in f.samples}
    assert samples[("synthnode_received_instances_total",
                    (("outcome", "stored"), ("source", "dicom")))] == 2
    assert samples[("synthnode_received_bytes_total",
                    (("outcome", "stored"), ("source", "dicom")))] == 30
    assert ("synthnode_received_instances_total",
            (("outcome", "stored"), ("source", "stow"))) not in samples
    assert samples[("synthnode_delivered_objects_total",
                    (("destination", "orthanc"), ("result", "ok")))] == 3
    assert samples[("synthnode_delivered_objects_total",
                    (("destination", "orthanc"), ("result", "failed")))] == 2
    assert samples[("synthnode_quarantined_total", (("kind", "deid"),))] == 4
    assert samples[("synthnode_job_duration_seconds_count",
                    (("state", "done"), ("task", "deid")))] == 1
    assert len(list((tmp_path / "prom").glob("counter_*.db"))) == 2  # one file per process


@contextmanager
def read_only(folder: Path):
    """``folder`` read-only for everyone, root too: a read-only bind mount over it (the test
    session has a mount namespace of its own: tests/conftest.py)."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        # lazily: SQLite keeps a closed connection's file open while another connection of
        # the process holds locks on it (the spool's writer), and the scrape opened one here
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_readyz_names_what_is_wrong(tmp_path: Path, orthanc) -> None:
    good = {"url": orthanc.url, "username": orthanc.username, "password": orthanc.password}
    with ops_server(settings_in(tmp_path / "a", orthanc=good)) as server:
        assert requests.get(server.url + "/healthz", timeout=10).text == "ok"
        answer = requests.get(server.url + "/readyz", timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"ready": True, "failing": {}}
        with read_only(server.spool.dir):
            answer = requests.get(server.url + "/readyz", timeout=10)
            assert answer.status_code == 503
            failing = answer.json()["failing"]
            assert list(failing) == ["spool"]
            assert "read-only" in failing["spool"] and "[spool] dir" in failing["spool"]
            # /metrics still answers while the spool cannot be written.
            assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
        assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
    wrong = dict(good, password="not-the-password")
    with ops_server(settings_in(tmp_path / "b", orthanc=wrong)) as server:
        failing = requests.get(server.url + "/readyz", timeout=10).json()["failing"]
        assert list(failing) == ["orthanc"] and "refuses the node's credentials" in \
            failing["orthanc"]
    closed = f"http://127.0.0.1:{free_port()}"
    with ops_server(settings_in(tmp_path / "c", orthanc={"url": closed})) as server:
        started = time.monotonic()
        answer = requests.get(server.url + "/readyz", timeout=10)
        assert time.monotonic() - started < 5
        assert answer.status_code == 503
        failing = answer.json()["failing"]
        assert list(failing) == ["orthanc"]
        assert f"Orthanc at {closed} does not answer" in failing["orthanc"]
        assert "[orthanc] url" in failing["orthanc"]


def test_readyz_names_the_disk_below_its_reserve(tmp_path: Path) -> None:
    with ops_server(settings_in(tmp_path, spool={"reserve_bytes": 1 << 60})) as server:
        failing = requests.get(server.url + "/readyz", timeout=10).json()["failing"]
        assert "below the reserve" in failing["disk"]
