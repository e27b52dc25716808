"""synthnode's Orthanc plugin: Orthanc hands its studies to synthnode, and users trigger work from
Orthanc's REST API.

Loaded by Orthanc's Python plugin (Debian's ``orthanc-python``) through ``PythonScript``; reads
the ``"Synthnode"`` section of Orthanc's configuration:

    "Synthnode": {
      "Venv": "/opt/synthnode/.venv",         // synthnode's virtual environment (Python 3.11)
      "Config": "/etc/synthnode/node.toml"    // the node's settings (rules, queue, [orthanc])
    }

What it does, and what it never does on Orthanc's threads:

- NEW_STUDY, STABLE_STUDY: the study id goes to the plugin's own thread, and the callback
  returns at once (no decoding, no generation, no network). That thread marks the study seen,
  then, once stable, evaluates the node's rules and puts the jobs on the node's queue. Workers
  (``synthnode serve`` or ``synthnode worker``) fetch the study from Orthanc and write results
  back to it (or to the rule's destinations).
- ORTHANC_STARTED: studies seen but never routed (Orthanc stopped before they were stable) are
  routed now: a restart loses nothing.
- The node's own outputs (its metadata, or its Contributing Equipment) are never routed again.
- REST, behind Orthanc's own authentication:
  ``POST /synthnode/studies/{id}/jobs`` (a task as JSON: ``{"task": "img2img", "strength":
  0.5}``), ``GET /synthnode/jobs`` (``?state=dead``), ``GET /synthnode/jobs/{job}``; errors
  are JSON ``{"error": ...}`` with 400 (bad task or parameter), 404 (unknown study or job).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import site
import sys
import threading
import traceback
from typing import Any

import orthanc

_SETTINGS_KEY = "Synthnode"
_UNKNOWN_RESOURCE = 17  # Orthanc's error code for an unknown resource


class _OrthancLog(logging.Handler):
    """The node's log lines into Orthanc's log (they carry UIDs and job ids, no patient data)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = f"synthnode: {record.name}: {self.format(record)}"
        if record.levelno >= logging.ERROR:
            orthanc.LogError(text)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(text)
        else:
            orthanc.LogInfo(text)


def _configure() -> tuple[Any, Any]:
    """Put the node's venv on sys.path, load its settings; (settings, OrthancStudies)."""
    section = json.loads(orthanc.GetConfiguration()).get(_SETTINGS_KEY, {})
    venv = section.get("Venv") or os.environ.get("SYNTHNODE_VENV", "")
    if not venv:
        raise RuntimeError(f'set "{_SETTINGS_KEY}": {{"Venv": ...}} in Orthanc\'s configuration '
                           "(synthnode's virtual environment)")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = os.path.join(venv, "lib", version, "site-packages")
    if not os.path.isdir(packages):
        raise RuntimeError(f"{packages} does not exist: Venv must be a {version} virtual "
                           "environment with synthnode installed")
    site.addsitedir(packages)  # processes .pth files: editable installs work too

    from node.audit import trail_for
    from node.config import load_settings
    from node.jobs import Queues
    from node.route.orthanc import OrthancStudies

    logger = logging.getLogger("node")
    logger.addHandler(_OrthancLog())
    logger.setLevel(logging.INFO)
    settings = load_settings(section.get("Config") or None)
    queues = Queues(settings.jobs, trail=trail_for(settings))
    return settings, OrthancStudies(settings, queues, _rest_get)


def _rest_get(path: str) -> bytes:
    """Orthanc's REST API in-process; LookupError for an unknown resource."""
    try:
        return bytes(orthanc.RestApiGet(path))
    except orthanc.OrthancException as exc:
        if exc.args and exc.args[0] == _UNKNOWN_RESOURCE:
            raise LookupError(path) from None
        raise


try:
    _settings, _studies = _configure()
except Exception as exc:  # the plugin stays inert; Orthanc keeps running
    orthanc.LogError(f"synthnode plugin disabled: {exc}")
    _studies = None

_events: queue.Queue[tuple[str, str] | None] = queue.Queue()


def _work() -> None:
    """The plugin's own thread: everything slower than a queue put happens here."""
    assert _studies is not None
    while True:
        item = _events.get()
        if item is None:
            return
        kind, study_id = item
        try:
            if kind == "seen":
                _studies.seen(study_id)
            elif kind == "stable":
                _studies.stable(study_id)
            else:
                _studies.reconcile()
        except Exception:  # noqa: BLE001 - the marker stays: the next start routes it
            orthanc.LogError(f"synthnode: {kind} of study {study_id} failed:\n"
                             f"{traceback.format_exc(limit=5)}")


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    if change_type == orthanc.ChangeType.NEW_STUDY:
        _events.put(("seen", resource_id))
    elif change_type == orthanc.ChangeType.STABLE_STUDY:
        _events.put(("stable", resource_id))
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        threading.Thread(target=_work, name="synthnode", daemon=True).start()
        _events.put(("reconcile", ""))
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        _events.put(None)


# -- REST ----------------------------------------------------------------------------------

def _answer(output: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload, indent=2)
    if status == 200:
        output.AnswerBuffer(body, "application/json")
    else:  # orthanc-python 4.0 takes the body of an error as str, with its length
        output.SetHttpHeader("Content-Type", "application/json")
        output.SendHttpStatus(status, body, len(body))


def _job_json(job: Any) -> Any:
    return json.loads(job.to_json())


def _on_study_jobs(output: Any, uri: str, **request: Any) -> None:
    from node.route.orthanc import BadRequest, StudyNotFound

    assert _studies is not None
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    try:
        body = json.loads(request.get("body") or b"null")
    except ValueError:
        _answer(output, 400, {"error": "the body is not JSON"})
        return
    try:
        job = _studies.trigger(request["groups"][0], body)
    except BadRequest as exc:
        _answer(output, 400, {"error": str(exc)})
    except StudyNotFound as exc:
        _answer(output, 404, {"error": str(exc)})
    else:
        _answer(output, 200, _job_json(job))


def _on_jobs(output: Any, uri: str, **request: Any) -> None:
    assert _studies is not None
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    state = request.get("get", {}).get("state")
    jobs = [j for j in _studies.queues.store.all() if state is None or j.state.value == state]
    _answer(output, 200, [_job_json(j) for j in jobs])


def _on_job(output: Any, uri: str, **request: Any) -> None:
    assert _studies is not None
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    job_id = request["groups"][0]
    job = _studies.queues.store.get(job_id)
    if job is None:
        _answer(output, 404, {"error": f'no job "{job_id}"'})
    else:
        _answer(output, 200, _job_json(job))


if _studies is not None:
    orthanc.RegisterOnChangeCallback(_on_change)
    orthanc.RegisterRestCallback("/synthnode/studies/([^/]+)/jobs", _on_study_jobs)
    orthanc.RegisterRestCallback("/synthnode/jobs", _on_jobs)
    orthanc.RegisterRestCallback("/synthnode/jobs/([^/]+)", _on_job)
    orthanc.LogWarning(f"synthnode plugin ready: {len(_settings.rules)} rules, queues on "
                       f"{_settings.jobs.backend.value}")
