"""Quarantined sources are kept until a person decides: a planted SR de-identification refuses
is kept (the original, beside its reason) past the spool's retention; after the admin enables
the option that fixes it, ``synthnode quarantine release`` de-identifies it again and delivers
it to a real Orthanc; ``discard`` deletes one; each decision is in the audit trail."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from node.audit import AuditTrail
from node.config import load_settings
from node.jobs import JobState
from node.jobs.quarantine import entries
from node.localorthanc import OrthancProcess
from tests.nodeproc import SYNTHNODE, storescu
from tests.phi_corpus import make_planted_sr, make_planted_study
from tests.test_jobs import jobs_node, records, wait_for

pytestmark = pytest.mark.slow


def test_kept_released_after_the_fix_and_discarded(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc, spool={"retention_s": 0})
    study = make_planted_study(tmp_path / "in", n_series=1, per_series=1, seed=3)
    srs = [make_planted_sr(tmp_path / "in" / f"sr{n}", study=study, seed=3 + n)
           for n in (1, 2)]
    files = study.files + [f for sr in srs for f in sr.files]
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: (jobs := records(node)) and jobs[0].state is JobState.DONE,
             what="the job done")
    (job,) = records(node)
    assert (job.outputs, job.quarantined) == (1, 2)
    settings = load_settings(node.config, environ={})
    kept = entries(settings)
    assert len(kept) == 2 and {e.kind for e in kept} == {"deid"}
    assert all("structured report with free text" in e.reason for e in kept)
    # the original itself (identifiable: admins only), element for element as received
    originals = {str(dcmread(f).SOPInstanceUID): dcmread(f) for sr in srs for f in sr.files}
    assert {e.sop: dcmread(e.path) for e in kept} == originals
    # ... and it outlives the spool's retention (0 s here: the study's files are gone)
    wait_for(lambda: not any(node.spool.glob("*/*/*.dcm")), what="the spool's retention")
    assert len(entries(settings)) == 2
    assert len(orthanc.get_json("/instances")) == 1

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SYNTHNODE, "--config", str(node.config), "quarantine", *args],
                              capture_output=True, text=True, timeout=120)

    listed = cli("list")
    assert listed.returncode == 0 and kept[0].id in listed.stdout
    first, second = kept
    again = cli("release", first.id)  # nothing fixed yet: refused again, kept
    assert again.returncode == 0 and "quarantined again" in again.stdout, again.stderr
    assert len(entries(settings)) == 2

    # the fix: the option that cleans structured content, in the config file
    text = node.config.read_text().replace(
        "[deid]\n", '[deid]\noptions = ["clean_structured_content"]\n')
    node.config.write_text(text)
    released = cli("release", first.id)
    assert released.returncode == 0 and "released to orthanc" in released.stdout, (
        released.stdout + released.stderr)
    wait_for(lambda: len(orthanc.get_json("/instances")) == 2, what="the released SR")
    stored = b"".join(orthanc.request("GET", f"/instances/{i}/file")
                      for i in orthanc.get_json("/instances"))
    leaks = [p.where for p in srs[0].planted if p.value.encode() in stored]
    assert not leaks, leaks

    no_reason = cli("discard", second.id, "--reason", "")
    assert no_reason.returncode == 1 and "reason" in no_reason.stderr
    gone = cli("discard", second.id, "--reason", "duplicate of a released report")
    assert gone.returncode == 0, gone.stderr
    assert entries(settings) == []
    assert not second.path.exists() and not first.path.exists()

    trail = AuditTrail(settings.audit.db)
    decisions = [(r.subject, r.data["action"], r.data.get("ok"))
                 for r in reversed(trail.search(event="quarantine"))]
    assert decisions == [(first.id, "release", False), (first.id, "release", True),
                         (second.id, "discard", None)]
    assert trail.verify().ok
    dump = json.dumps([r.as_dict() for r in trail.iter()])
    assert not [p.where for sr in srs for p in sr.planted
                if not p.where.startswith("UID") and p.value in dump]


def test_one_decision_per_entry_and_none_past_a_rejection(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """An entry someone else is deciding (its note locked, as a release in another process
    holds it) is not released twice; an entry of a job a reviewer rejected is not released
    at all (it may still be discarded)."""
    import fcntl

    from tests.console import REVIEWED

    node = jobs_node(node_factory, tmp_path, orthanc, rules=REVIEWED)
    study = make_planted_study(tmp_path / "in", n_series=1, per_series=1, seed=4)
    sr = make_planted_sr(tmp_path / "in" / "sr", study=study, seed=4)
    assert storescu(node.port, study.files + sr.files).returncode == 0
    wait_for(lambda: (jobs := records(node)) and jobs[0].state is JobState.REVIEW,
             what="the job held for review")
    settings = load_settings(node.config, environ={})
    (entry,) = entries(settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SYNTHNODE, "--config", str(node.config), *args],
                              capture_output=True, text=True, timeout=120)

    with entry.note.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = cli("quarantine", "release", entry.id)
        assert busy.returncode == 1 and "being decided by someone else" in busy.stderr
        busy = cli("quarantine", "discard", entry.id, "--reason", "x")
        assert busy.returncode == 1 and "being decided by someone else" in busy.stderr
    assert entries(settings) == [entry]

    (job,) = records(node)
    assert cli("review", "reject", job.id, "--reason", "wrong study").returncode == 0
    refused = cli("quarantine", "release", entry.id)
    assert refused.returncode == 1 and "rejected in review" in refused.stderr
    assert entries(settings) == [entry]
    assert orthanc.get_json("/instances") == []
    assert cli("quarantine", "discard", entry.id, "--reason", "study rejected").returncode == 0
    assert entries(settings) == []
    trail = AuditTrail(settings.audit.db)
    assert [(r.data["action"], r.data.get("ok")) for r in trail.search(event="quarantine")] == [
        ("discard", None)]
