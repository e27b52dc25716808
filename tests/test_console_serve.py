"""The console's machine endpoints inside a real ``synthnode serve`` with a worker process and a
real Orthanc: STOW-RS uploads flow through the rules like C-STORE ones, a truncated part fails
alone, a ``kill -9`` right after a 200 answer loses nothing; ``/metrics`` (parsed by
prometheus-client) sums serve's and the worker's counters as instances arrive and leave."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from node.jobs import JobState
from node.localorthanc import OrthancProcess
from tests.console import PASSWORDS, console_node, console_url
from tests.nodeproc import SYNTHNODE, NodeProcess, make_study, storescu
from tests.opsserver import multipart
from tests.test_jobs import DEID_ALL, records, wait_for

pytestmark = pytest.mark.slow


def _node(node_factory, tmp_path: Path, orthanc: OrthancProcess) -> NodeProcess:
    return console_node(node_factory, tmp_path, DEID_ALL, orthanc,
                        console={"sample_interval_s": 60.0})


def stow(node: NodeProcess, files: list[bytes]) -> requests.Response:
    body, content_type = multipart(files)
    return requests.post(console_url(node) + "/dicomweb/studies", data=body, timeout=60,
                         auth=("rita", PASSWORDS["rita"]),
                         headers={"Content-Type": content_type,
                                  "Accept": "application/dicom+json"})


def scrape(node: NodeProcess | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = node if isinstance(node, str) else console_url(node) + "/metrics"
    text = requests.get(url, timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_stow_flows_through_the_rules_and_survives_kill_9_after_200(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = _node(node_factory, tmp_path, orthanc)
    first = make_study(tmp_path / "a", series=1, per_series=3)
    second = make_study(tmp_path / "b", series=1, per_series=2)
    truncated = first[0].read_bytes()[:600]
    r = stow(node, [*(p.read_bytes() for p in first), truncated])
    assert r.status_code == 202, r.text
    body = r.json()
    assert len(body["00081199"]["Value"]) == 3 and len(body["00081198"]["Value"]) == 1

    r = stow(node, [p.read_bytes() for p in second])
    assert r.status_code == 200, r.text
    node.kill9()  # right after the answer: what it acknowledged is on disk and indexed
    spooled = node.spooled()
    sent = {str(dcmread(p).SOPInstanceUID): p for p in first + second}
    assert set(spooled) == set(sent)

    node.start()
    wait_for(lambda: len(jobs := records(node)) == 2
             and all(j.state is JobState.DONE for j in jobs), what="both studies' jobs")
    assert len(orthanc.get_json("/instances")) == 5


def test_metrics_sum_serve_and_its_worker(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = _node(node_factory, tmp_path, orthanc)
    before = scrape(node)
    stored = ("synthnode_received_instances_total", (("outcome", "stored"),
                                                     ("source", "dicom")))
    delivered = ("synthnode_delivered_objects_total", (("destination", "orthanc"),
                                                       ("result", "ok")))
    assert before.get(stored, 0.0) == 0.0 and before.get(delivered, 0.0) == 0.0
    files = make_study(tmp_path / "in", series=2, per_series=2)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: (jobs := records(node)) and jobs[0].state is JobState.DONE,
             what="the job")
    after = scrape(node)
    assert after[stored] == 4.0
    assert after[delivered] == 4.0  # counted in the worker process, summed by serve
    done = ("synthnode_job_duration_seconds_count", (("state", "done"),
                                                     ("task", "deidentify")))
    assert after[done] == 1.0
    assert after[("synthnode_associations_total", (("outcome", "accepted"),))] >= 1.0
    assert after[("synthnode_jobs", (("state", "done"),))] == 1.0
    assert requests.get(console_url(node) + "/healthz", timeout=30).status_code == 200
    ready = requests.get(console_url(node) + "/readyz", timeout=30)
    assert ready.status_code == 200, ready.text


def test_a_worker_started_by_hand_serves_its_own_metrics(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """``synthnode worker --metrics-port`` (a worker serve did not start, as on a GPU machine):
    its jobs and deliveries are counted on its own /metrics, parsed by prometheus-client."""
    import signal

    from node.localorthanc import free_port

    node = console_node(node_factory, tmp_path, DEID_ALL, orthanc, jobs={"cpu_workers": 0})
    port = free_port()
    worker = subprocess.Popen([*SYNTHNODE, "--config", str(node.config), "worker", "--queue",
                               "cpu", "--metrics-port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _answers(url), what="the worker's /metrics")
        files = make_study(tmp_path / "in", series=1, per_series=3)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: (jobs := records(node)) and jobs[0].state is JobState.DONE,
                 what="the job, on the worker started by hand")
        own = scrape(url)
        assert own[("synthnode_delivered_objects_total", (("destination", "orthanc"),
                                                          ("result", "ok")))] == 3.0
        assert own[("synthnode_job_duration_seconds_count", (("state", "done"),
                                                             ("task", "deidentify")))] == 1.0
        assert requests.get(url.replace("/metrics", "/"), timeout=30).status_code == 404
        # serve counted what it received; the deliveries are the worker's alone
        served = scrape(node)
        assert served[("synthnode_received_instances_total", (("outcome", "stored"),
                                                              ("source", "dicom")))] == 3.0
        assert served.get(("synthnode_delivered_objects_total", (("destination", "orthanc"),
                                                                 ("result", "ok"))), 0.0) == 0
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(30)
    assert not _answers(url)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_cached_basic_credential_follows_removals_and_role_changes(
    node_factory, tmp_path: Path
) -> None:
    """A STOW client's verified credentials are believed for a while without Argon2 again;
    the user's existence and role are still read on every request."""
    node = console_node(node_factory, tmp_path, "", jobs={"cpu_workers": 0})
    files = make_study(tmp_path / "in", series=1, per_series=3)
    assert stow(node, [files[0].read_bytes()]).status_code == 200
    wrong = requests.post(console_url(node) + "/dicomweb/studies", data=b"", timeout=30,
                          auth=("rita", "not-her-password"),
                          headers={"Content-Type": 'multipart/related; type="application/dicom";'
                                                   " boundary=b"})
    assert wrong.status_code == 401
    cli = [*SYNTHNODE, "--config", str(node.config), "user"]
    subprocess.run([*cli, "role", "rita", "viewer"], check=True, timeout=60,
                   capture_output=True)
    assert stow(node, [files[1].read_bytes()]).status_code == 403
    subprocess.run([*cli, "role", "rita", "reviewer"], check=True, timeout=60,
                   capture_output=True)
    assert stow(node, [files[1].read_bytes()]).status_code == 200
    # a new password: the old one, verified and cached a moment ago, is refused at once
    subprocess.run([*cli, "password", "rita", "--password-stdin"],
                   input="a-new-password-for-rita\n", text=True, check=True, timeout=60,
                   capture_output=True)
    assert stow(node, [files[2].read_bytes()]).status_code == 401
    subprocess.run([*cli, "remove", "rita"], check=True, timeout=60, capture_output=True)
    assert stow(node, [files[2].read_bytes()]).status_code == 401
