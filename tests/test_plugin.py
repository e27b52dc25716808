"""The Orthanc plugin in a real Orthanc 1.10 (Debian's orthanc-python), with the node's workers
(``synthnode serve``) beside it: Orthanc hands its studies over, results come back to it, a
restart loses nothing, users trigger work over Orthanc's REST API, and the node's own outputs
never start new jobs."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.config import load_settings
from node.jobs import JobState, Queues
from node.localorthanc import OrthancProcess
from node.route.orthanc import MARKER
from tests.nodeproc import NodeProcess, dcmtk, make_study
from tests.test_jobs import DEID_ALL, all_done, jobs_node, records, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "orthanc" / "synthnode_plugin.py"
LIBPYTHON = "/usr/share/orthanc/plugins/libOrthancPython.so"


def with_plugin(node_factory: Callable[..., NodeProcess], tmp_path: Path, rules: str,
                stable_age: int = 1, **sections: dict[str, Any]) -> tuple[OrthancProcess,
                                                                             NodeProcess]:
    """An Orthanc running the plugin, and ``synthnode serve`` (its workers and reaper) on the
    same settings file, whose [orthanc] is that Orthanc."""
    orthanc = OrthancProcess(tmp_path / "orthanc")
    node = jobs_node(node_factory, tmp_path, orthanc, rules=rules, **sections)
    orthanc.config.update({
        "Plugins": [LIBPYTHON], "PythonScript": str(PLUGIN), "StableAge": stable_age,
        "Synthnode": {"Venv": sys.prefix, "Config": str(node.config)},
    })
    orthanc.start()
    assert "synthnode plugin ready" in orthanc.log(), orthanc.log()[-2000:]
    return orthanc, node


def upload(orthanc: OrthancProcess, files: list[Path]) -> str:
    """C-STORE ``files`` into Orthanc with dcmtk's storescu; Orthanc's id of their study."""
    import subprocess

    subprocess.run([dcmtk("storescu"), "-aec", orthanc.aet, "-aet", "MODALITY",
                    "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                   check=True, capture_output=True, timeout=60)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    found = json.loads(orthanc.request("POST", "/tools/lookup", study_uid.encode()))
    return str(found[0]["ID"])


def markers(node: NodeProcess) -> dict[str, dict[str, Any]]:
    store = Queues(load_settings(node.config, environ={}).jobs).store
    return {k[len(MARKER):]: v for k, v in store.records(MARKER).items()}


def call(orthanc: OrthancProcess, method: str, path: str, body: Any = None,
         auth: bool = True) -> tuple[int, Any]:
    """(HTTP status, JSON answer) of one request to Orthanc."""
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    try:
        if auth:
            return 200, json.loads(orthanc.request(method, path, data))
        req = urllib.request.Request(orthanc.url + path, data=data, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=5) as rsp:
            return int(rsp.status), json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if text.startswith(b"{") else text


def test_stable_study_is_processed_once_and_outputs_never_again(
    node_factory, tmp_path: Path
) -> None:
    orthanc, node = with_plugin(node_factory, tmp_path, DEID_ALL)
    files = make_study(tmp_path / "in", per_series=3, patient_id="PLANTED-77")
    study_id = upload(orthanc, files)

    wait_for(all_done(node, 1), what="the plugin's job done by the node's worker")
    (job,) = records(node)
    assert job.source.study == study_id and job.outputs == 3
    wait_for(lambda: orthanc.count_instances() == 6, what="the outputs back in Orthanc")
    studies = orthanc.get_json("/studies")
    (output_study,) = [s for s in studies if s != study_id]
    for instance in orthanc.get_json(f"/studies/{output_study}/instances"):
        assert orthanc.request("GET", f"/instances/{instance['ID']}/metadata/SynthnodeTask"
                               ) == b"deidentify"
    # The outputs' study becomes stable too, and is recognised: no second job, no loop. The
    # marker is written where its STABLE_STUDY was handled, so a job made of it would exist now.
    wait_for(lambda: markers(node).get(output_study, {}).get("state") == "own-output",
             what="the output study marked as the node's own")
    assert len(records(node)) == 1 and orthanc.count_instances() == 6
    assert markers(node)[study_id]["state"] == "routed"
    assert "PLANTED-77" not in orthanc.log() + node.log()


def test_restart_before_the_stable_event_still_processes_once(
    node_factory, tmp_path: Path
) -> None:
    orthanc, node = with_plugin(node_factory, tmp_path, DEID_ALL, stable_age=60)
    files = make_study(tmp_path / "in", per_series=3)
    study_id = upload(orthanc, files)
    wait_for(lambda: markers(node).get(study_id, {}).get("state") == "seen",
             what="the study marked seen")
    orthanc.restart()  # STABLE_STUDY would only have come 60 s after the upload

    wait_for(all_done(node, 1), what="the study routed on ORTHANC_STARTED")
    wait_for(lambda: orthanc.count_instances() == 6, what="the outputs")
    wait_for(lambda: "routed" in markers(node)[study_id]["state"], what="the study's marker")
    (job,) = records(node)
    assert job.attempts == 1 and job.source.study == study_id
    assert orthanc.count_instances() == 6


def test_trigger_route_and_its_errors(node_factory, tmp_path: Path) -> None:
    orthanc, node = with_plugin(node_factory, tmp_path, "", jobs={"gpu_workers": 1})
    files = make_study(tmp_path / "in", per_series=1)
    study_id = upload(orthanc, files)

    status, job = call(orthanc, "POST", f"/synthnode/studies/{study_id}/jobs",
                       {"task": "img2img", "strength": 0.5, "series_description": "by hand"})
    assert status == 200 and job["state"] == "pending" and job["queue"] == "gpu"
    wait_for(lambda: call(orthanc, "GET", f"/synthnode/jobs/{job['id']}")[1]["state"] == "done",
             what="the triggered job")
    status, listed = call(orthanc, "GET", "/synthnode/jobs?state=done")
    assert status == 200 and [j["id"] for j in listed] == [job["id"]]
    assert orthanc.count_instances() == 2
    outputs = [i for i in orthanc.get_json("/instances")
               if orthanc.get_json(f"/instances/{i}/metadata?expand").get("SynthnodeTask")
               == "img2img"]
    assert len(outputs) == 1
    assert orthanc.get_json(f"/instances/{outputs[0]}/tags?simplify")["SeriesDescription"] == (
        "by hand")

    status, error = call(orthanc, "POST", f"/synthnode/studies/{study_id}/jobs",
                         {"task": "paint"})
    assert status == 400 and "task" in error["error"] and "img2img" in error["error"]
    status, error = call(orthanc, "POST", f"/synthnode/studies/{study_id}/jobs",
                         {"task": "img2img", "strength": 5})
    assert status == 400 and "strength" in error["error"]
    status, error = call(orthanc, "POST", f"/synthnode/studies/{study_id}/jobs", b"{nope")
    assert (status, error) == (400, {"error": "the body is not JSON"})
    status, error = call(orthanc, "POST", "/synthnode/studies/nope/jobs", {"task": "img2img"})
    assert status == 404 and "nope" in error["error"]
    status, error = call(orthanc, "GET", "/synthnode/jobs/nope")
    assert status == 404
    status, _ = call(orthanc, "GET", "/synthnode/jobs", auth=False)
    assert status == 401  # behind Orthanc's own authentication
    assert [j.state for j in records(node)] == [JobState.DONE]


def test_shipped_orthanc_config_loads_the_plugin(node_factory, tmp_path: Path) -> None:
    """config/orthanc/orthanc.json as a site would start from it (paths, ports and users
    replaced): the plugin comes up and its routes answer."""
    text = (ROOT / "config" / "orthanc" / "orthanc.json").read_text()
    shipped = json.loads("\n".join(line for line in text.splitlines()
                                   if not line.lstrip().startswith("//")))
    assert shipped["UserMetadata"] == {"SynthnodeJob": 1024, "SynthnodeTask": 1025}
    orthanc = OrthancProcess(tmp_path / "orthanc")
    node = jobs_node(node_factory, tmp_path, orthanc, rules=DEID_ALL)
    own = {"StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort", "RegisteredUsers",
           "RemoteAccessAllowed"}
    orthanc.config.update({k: v for k, v in shipped.items() if k not in own})
    orthanc.config["PythonScript"] = str(PLUGIN)
    orthanc.config["Synthnode"] = {"Venv": sys.prefix, "Config": str(node.config)}
    orthanc.start()
    assert "synthnode plugin ready: 1 rules" in orthanc.log()
    assert call(orthanc, "GET", "/synthnode/jobs") == (200, [])
