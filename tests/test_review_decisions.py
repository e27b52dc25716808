"""Review decisions in the job store (node.jobs.queue, node.jobs.state) on a real SQLite file
and a real redis-server: a decision is stored only over the record it was made on (two
reviewers, or a reviewer and a worker, cannot both win); decisions per source series keep a
job in review until each series is decided; the reaper removes what a rejection kept once
``keep_rejected_s`` has passed."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from node.audit import AuditTrail
from node.config import JobsSettings
from node.jobs import JobState, Queues, Reaper
from node.jobs.manifest import rejected_dir
from node.jobs.state import Job, JobStore
from tests.test_jobstore_index import make_jobs, redis_url, settings, storage  # noqa: F401


def held(queues: Queues, series: tuple[str, ...] = ("1.2.3.1",)) -> Job:
    job = replace(make_jobs(1, seed=11)[0], state=JobState.REVIEW, series_uids=series,
                  created_at=time.time(), updated_at=time.time())
    queues.store.put(job)
    return job


def test_a_stale_record_is_never_written_over(settings: JobsSettings) -> None:  # noqa: F811
    store = JobStore(storage(settings))
    job = held(Queues(settings))
    found = store.get_raw(job.id)
    assert found is not None and found[1] == job
    raw = found[0]
    # someone else (another process: a second reviewer) decides first
    JobStore(storage(settings)).put(job.but(state=JobState.REJECTED, decided_by="bob"))
    approved = job.but(state=JobState.PENDING, approved=True, decided_by="ada")
    assert store.swap(raw, approved) is False
    now = store.get(job.id)
    assert now is not None and now.state is JobState.REJECTED and now.decided_by == "bob"
    assert store.count_by_state()[JobState.REJECTED] == 1  # the index follows the record
    assert store.count_by_state()[JobState.PENDING] == 0
    # over the record as it is now, the write goes through (and is indexed)
    raw_now, _ = store.get_raw(job.id)  # type: ignore[misc]
    assert store.swap(raw_now, approved) is True
    assert store.get(job.id) == approved
    assert store.count_by_state()[JobState.PENDING] == 1


def test_two_reviewers_at_once_one_decision(settings: JobsSettings,  # noqa: F811
                                            tmp_path: Path) -> None:
    """Eight reviewers (each its own Queues, as its own process would be) approve or reject
    one job at the same moment: exactly one decision stands, one audit record says so."""
    trail = AuditTrail(tmp_path / "audit.sqlite3")
    job = held(Queues(settings))
    start = threading.Barrier(8)
    outcomes: list[tuple[str, str]] = []

    def decide(n: int) -> None:
        queues = Queues(settings, trail=trail)
        start.wait()
        try:
            if n % 2:
                queues.reject(job.id, f"r{n}", "not for release")
            else:
                queues.approve(job.id, f"r{n}")
            outcomes.append(("ok", f"r{n}"))
        except ValueError as exc:
            outcomes.append(("refused", str(exc)))

    threads = [threading.Thread(target=decide, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [who for what, who in outcomes if what == "ok"]
    assert len(outcomes) == 8 and len(winners) == 1, outcomes
    final = Queues(settings).store.get(job.id)
    assert final is not None and final.decided_by == winners[0]
    assert final.state is (JobState.REJECTED if int(winners[0][1:]) % 2 else JobState.PENDING)
    assert [r.actor for r in trail.search(event="review")] == winners
    assert all("not waiting for review" in why or "changed while you decided" in why
               for what, why in outcomes if what == "refused")


def test_series_decided_one_by_one(settings: JobsSettings, tmp_path: Path) -> None:  # noqa: F811
    queues = Queues(settings, trail=AuditTrail(tmp_path / "audit.sqlite3"))
    series = ("1.2.3.1", "1.2.3.2", "1.2.3.3")
    job = held(queues, series)
    with pytest.raises(ValueError, match="needs a reason"):
        queues.decide_series(job.id, series[1], False, "ada", " ", series)
    with pytest.raises(ValueError, match="no outputs of series 9.9"):
        queues.decide_series(job.id, "9.9", True, "ada", "", series)
    one = queues.decide_series(job.id, series[0], True, "ada", "", series)
    two = queues.decide_series(job.id, series[1], False, "bob", "burned-in label", series)
    assert one.state is two.state is JobState.REVIEW and not two.approved
    # a second look changes a series' decision (one per series)
    two = queues.decide_series(job.id, series[1], True, "bob", "", series)
    two = queues.decide_series(job.id, series[1], False, "bob", "label after all", series)
    assert [d.series_uid for d in two.series_decisions] == [series[0], series[1]]
    stored = queues.store.get(job.id)
    assert stored == two and stored.rejected_series == {series[1]}  # survives JSON
    three = queues.decide_series(job.id, series[2], True, "ada", "", series)
    assert three.state is JobState.PENDING and three.approved
    assert three.rejected_series == {series[1]}
    with pytest.raises(ValueError, match="not waiting for review"):
        queues.decide_series(job.id, series[0], False, "eve", "late", series)
    reviews = list(reversed(queues.trail.search(event="review")))  # type: ignore[union-attr]
    assert [(r.actor, r.data.get("series"), r.data["decision"]) for r in reviews] == [
        ("ada", series[0], "approve"), ("bob", series[1], "reject"),
        ("bob", series[1], "approve"), ("bob", series[1], "reject"),
        ("ada", series[2], "approve")]
    assert reviews[-1].data["rejected_series"] == [series[1]]

    # every series rejected: the job is rejected; a job-level approval after some series
    # were rejected delivers the rest and keeps those rejected
    other = replace(held(queues, series[:2]), id="deidentify-other")
    queues.store.put(other)
    for uid in series[:2]:
        last = queues.decide_series(other.id, uid, False, "ada", "no", series[:2])
    assert last.state is JobState.REJECTED
    third = replace(held(queues, series), id="deidentify-third")
    queues.store.put(third)
    queues.decide_series(third.id, series[0], False, "ada", "no", series)
    whole = queues.approve(third.id, "ada", "rest is fine")
    assert whole.approved and whole.rejected_series == {series[0]}


def test_the_reaper_removes_what_rejections_kept(settings: JobsSettings,  # noqa: F811
                                                 tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = settings.model_copy(update={"keep_rejected_s": 3600.0, "keep_done_s": 7200.0,
                                            "work_dir": work})
    queues = Queues(settings)
    now = time.time()
    old, recent, done = make_jobs(3, seed=5)
    old = replace(old, state=JobState.REJECTED, created_at=now - 9000, decided_at=now - 4000)
    recent = replace(recent, state=JobState.REJECTED, created_at=now - 9000,
                     decided_at=now - 60)
    done = replace(done, state=JobState.DONE, created_at=now - 9000, updated_at=now - 8000)
    for job in (old, recent, done):
        queues.store.put(job)
        (work / job.id).mkdir(parents=True)
        (work / job.id / "000000.dcm").write_bytes(b"staged")
    rejected_dir(work, done.id).mkdir()
    Reaper(settings, queues).tick(now)
    assert queues.store.get(old.id) is None and not (work / old.id).exists()
    assert queues.store.get(recent.id) == recent and (work / recent.id).exists()
    assert queues.store.get(done.id) is None and not rejected_dir(work, done.id).exists()
