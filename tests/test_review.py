"""The review gate: with ``review = true`` a job's outputs are staged and reach Orthanc only
after a reviewer approves them; a rejection keeps them out (and kept); every decision and
release is in the audit trail, whose hash chain ``synthnode audit verify`` checks. Real
processes: storescu, ``synthnode serve`` with a worker, Orthanc 1.10."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from node.audit import AuditTrail
from node.config import load_settings
from node.jobs import JobState, Queues
from node.jobs.review import count_held, header_summary, staged_outputs, thumbnail_png
from node.localorthanc import OrthancProcess
from tests.console import REVIEWED
from tests.nodeproc import SYNTHNODE, NodeProcess, make_study, storescu
from tests.test_jobs import jobs_node, records, wait_for

pytestmark = pytest.mark.slow

def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SYNTHNODE, "--config", str(node.config), *args],
                          capture_output=True, text=True, timeout=120)


def in_state(node: NodeProcess, state: JobState, count: int) -> Callable[[], bool]:
    return lambda: (len(jobs := records(node)) == count
                    and all(j.state is state for j in jobs))


def audit_of(node: NodeProcess) -> AuditTrail:
    return AuditTrail(load_settings(node.config, environ={}).audit.db)


def test_nothing_leaves_before_approval_then_everything_arrives(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc, rules=REVIEWED)
    files = make_study(tmp_path / "in", series=1, per_series=3, patient_name="Planted^Review",
                       patient_id="PLANTED-REVIEW-1")
    assert storescu(node.port, files).returncode == 0
    wait_for(in_state(node, JobState.REVIEW, 1), what="the job held for review")
    time.sleep(1.0)  # a gate that leaks would have delivered by now
    assert orthanc.get_json("/instances") == []
    job = records(node)[0]
    assert job.outputs == 3

    settings = load_settings(node.config, environ={})
    queues = Queues(settings.jobs)
    assert count_held(queues.store) == 1
    outputs = staged_outputs(settings, job)
    assert len(outputs) == 3 and all(p.exists() for p in outputs)
    assert thumbnail_png(outputs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    changes = {c.keyword: c for c in header_summary(settings, job, outputs[0],
                                                     source=Path(files[0]))}
    assert changes["PatientName"].action == "replaced"
    assert "Planted" not in changes["PatientName"].value  # the output's value, not the source's

    listed = cli(node, "review", "list")
    assert listed.returncode == 0 and job.id in listed.stdout

    stale = cli(node, "review", "approve", job.id, "--revision", str(job.revision + 1))
    assert stale.returncode == 1 and "staged again" in stale.stderr
    approved = cli(node, "review", "approve", job.id, "--reason", "checked by hand",
                   "--revision", str(job.revision))
    assert approved.returncode == 0, approved.stderr
    wait_for(lambda: len(orthanc.get_json("/instances")) == 3, what="the approved outputs")
    wait_for(in_state(node, JobState.DONE, 1), what="the job done")
    done = records(node)[0]
    assert done.approved and done.decided_by.startswith("cli:")
    assert done.attempts == 2  # made once, delivered on the second run: not made again

    trail = audit_of(node)
    reviews = trail.search(event="review")
    assert [(r.subject, r.data["decision"], r.data["reason"]) for r in reviews] == [
        (job.id, "approve", "checked by hand")]
    releases = trail.search(event="release")
    assert [(r.subject, r.data["destination"], r.data["objects"]) for r in releases] == [
        (job.id, "orthanc", 3)]
    assert releases[0].seq > reviews[0].seq
    states = [r.data["state"] for r in reversed(trail.search(event="job", subject=job.id))]
    assert states[:3] == ["pending", "running", "review"] and states[-1] == "done"
    dump = json.dumps([r.as_dict() for r in trail.iter()])
    assert "Planted" not in dump and "PLANTED" not in dump


def test_rejected_outputs_never_leave_and_stay_kept(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc, rules=REVIEWED)
    files = make_study(tmp_path / "in", series=1, per_series=2)
    study = str(dcmread(files[0]).StudyInstanceUID)
    assert storescu(node.port, files).returncode == 0
    wait_for(in_state(node, JobState.REVIEW, 1), what="the job held for review")

    no_reason = cli(node, "review", "reject", study, "--reason", " ")
    assert no_reason.returncode == 1 and "reason" in no_reason.stderr
    rejected = cli(node, "review", "reject", study, "--reason", "burned-in label")
    assert rejected.returncode == 0, rejected.stderr
    job = records(node)[0]
    assert job.state is JobState.REJECTED and job.decision_reason == "burned-in label"
    again = cli(node, "review", "approve", job.id)
    assert again.returncode == 1 and "rejected, not waiting for review" in again.stderr
    time.sleep(1.5)
    assert orthanc.get_json("/instances") == []
    settings = load_settings(node.config, environ={})
    assert len(staged_outputs(settings, job)) == 2  # kept with the reason
    trail = audit_of(node)
    assert [r.data["decision"] for r in trail.search(event="review")] == ["reject"]
    assert trail.search(event="release") == []


def test_audit_verify_detects_an_edited_and_a_deleted_record(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'rules = []\n[audit]\ndb = "{tmp_path / "audit.db"}"\n')
    trail = AuditTrail(tmp_path / "audit.db")
    for n in range(5):
        trail.record("job", "node", f"job-{n}", state="done", rule="r")
    trail.close()

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SYNTHNODE, "--config", str(config), "audit", "verify"],
                              capture_output=True, text=True, timeout=60)

    ok = verify()
    assert ok.returncode == 0 and "5 records" in ok.stdout, ok.stderr
    exported = subprocess.run([*SYNTHNODE, "--config", str(config), "audit", "export"],
                              capture_output=True, text=True, timeout=60, check=True)
    assert [json.loads(x)["subject"] for x in exported.stdout.splitlines()] == [
        f"job-{n}" for n in range(5)]

    db = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET actor = 'someone' WHERE seq = 3")
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET data = '{\"rule\":\"r\",\"state\":\"dead\"}' WHERE seq = 3")
    db.commit()
    edited = verify()
    assert edited.returncode == 1 and "record 3" in edited.stderr and "edited" in edited.stderr

    # (verify opened the trail: its triggers are back, as on every open)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET data = '{\"rule\":\"r\",\"state\":\"done\"}' WHERE seq = 3")
    db.commit()
    assert verify().returncode == 0
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DELETE FROM audit WHERE seq = 2")
    db.commit()
    deleted = verify()
    assert deleted.returncode == 1 and "record 2 is missing" in deleted.stderr


FORWARD_REVIEWED = """
[[rules]]
name = "forward-reviewed"
[[rules.tasks]]
task = "forward"
review = true
"""


def test_a_reviewed_forward_sends_what_was_staged_and_a_rejected_one_keeps_it(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """A forward makes no outputs: held for review, it stages its originals (hard links in
    its work folder, with a manifest). The spool keeps a held study's source past its
    retention; a rejected study's source may go (rejected is final), its staged files stay;
    an approved one delivers exactly what was staged."""
    node = jobs_node(node_factory, tmp_path, orthanc, rules=FORWARD_REVIEWED,
                     spool={"retention_s": 0})
    kept, dropped = (make_study(tmp_path / name, series=1, per_series=2) for name in "ab")
    assert storescu(node.port, kept + dropped).returncode == 0
    wait_for(in_state(node, JobState.REVIEW, 2), what="both forwards held for review")
    settings = load_settings(node.config, environ={})
    by_study = {j.study_uid: j for j in records(node)}
    approve, reject = (by_study[str(dcmread(files[0]).StudyInstanceUID)]
                       for files in (kept, dropped))
    sops = {str(dcmread(f).SOPInstanceUID) for f in kept}
    staged = staged_outputs(settings, approve)
    assert [p.parent for p in staged] == [settings.jobs.work_dir / approve.id] * 2
    assert {str(dcmread(p).SOPInstanceUID) for p in staged} == sops
    time.sleep(1.0)  # retention 0 s: a held study's source would be gone by now
    assert len(node.spooled()) == 4
    assert orthanc.get_json("/instances") == []

    rejected = cli(node, "review", "reject", reject.id, "--reason", "wrong patient")
    assert rejected.returncode == 0, rejected.stderr
    wait_for(lambda: len(node.spooled()) == 2, what="the rejected study's source released")
    assert len(left := staged_outputs(settings, reject)) == 2 and all(p.exists() for p in left)

    approved = cli(node, "review", "approve", approve.id)
    assert approved.returncode == 0, approved.stderr
    wait_for(lambda: len(orthanc.get_json("/instances")) == 2, what="the approved forward")
    wait_for(lambda: {j.id: j.state for j in records(node)} == {
        approve.id: JobState.DONE, reject.id: JobState.REJECTED}, what="done and rejected")
    stored = {orthanc.get_json(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
              for i in orthanc.get_json("/instances")}
    assert stored == sops
    assert not (settings.jobs.work_dir / approve.id).exists()
    releases = audit_of(node).search(event="release")
    assert [(r.subject, r.data["objects"]) for r in releases] == [(approve.id, 2)]


def test_per_series_decisions_deliver_the_approved_series_only(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """Each source series of a held job decided on its own from the command line: nothing
    leaves until the last is decided; then the approved series reach Orthanc, the rejected
    one never does and is kept beside the job with its reason."""
    node = jobs_node(node_factory, tmp_path, orthanc, rules=REVIEWED)
    files = make_study(tmp_path / "in", series=3, per_series=2)
    series = [str(dcmread(f).SeriesInstanceUID) for f in files[::2]]
    assert len(set(series)) == 3
    assert storescu(node.port, files).returncode == 0
    wait_for(in_state(node, JobState.REVIEW, 1), what="the job held for review")
    job = records(node)[0]
    listed = cli(node, "review", "list")
    assert all(f"series {uid}: 2 outputs, undecided" in listed.stdout for uid in series)

    wrong = cli(node, "review", "approve", job.id, "--series", "1.2.3.4.5")
    assert wrong.returncode == 1 and "no outputs of series 1.2.3.4.5" in wrong.stderr
    first = cli(node, "review", "approve", job.id, "--series", series[0])
    assert first.returncode == 0 and "2 series still to decide" in first.stdout
    second = cli(node, "review", "reject", job.id, "--series", series[1], "--reason",
                 "burned-in label")
    assert second.returncode == 0 and "1 series still to decide" in second.stdout
    time.sleep(1.0)  # a per-series decision that released the job would have delivered
    assert orthanc.get_json("/instances") == []
    assert records(node)[0].state is JobState.REVIEW
    assert f"series {series[1]}: 2 outputs, rejected by cli:" in cli(node, "review",
                                                                      "list").stdout

    last = cli(node, "review", "approve", job.id, "--series", series[2])
    assert last.returncode == 0 and "1 series rejected, not delivered" in last.stdout
    wait_for(in_state(node, JobState.DONE, 1), what="the job done")
    stored = orthanc.get_json("/instances")
    assert len(stored) == 4
    time.sleep(1.0)
    assert len(orthanc.get_json("/instances")) == 4
    done = records(node)[0]
    assert f"series {series[1]}: 2 outputs rejected in review, not delivered" in done.notes

    settings = load_settings(node.config, environ={})
    kept = settings.jobs.work_dir / f"{job.id}.rejected"
    kept_sops = {str(dcmread(p).SOPInstanceUID) for p in kept.glob("*.dcm")}
    sent_sops = {orthanc.get_json(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
                 for i in stored}
    assert len(kept_sops) == 2 and not kept_sops & sent_sops
    decisions = json.loads((kept / "decisions.json").read_text())
    assert [(d["series_uid"], d["reason"]) for d in decisions] == [(series[1],
                                                                    "burned-in label")]
    trail = audit_of(node)
    reviews = list(reversed(trail.search(event="review")))
    assert [(r.data["series"], r.data["decision"]) for r in reviews] == [
        (series[0], "approve"), (series[1], "reject"), (series[2], "approve")]
    releases = trail.search(event="release")
    assert [(r.subject, r.data["objects"]) for r in releases] == [(job.id, 4)]
