"""The spool on its own: real files and a real SQLite index, no network."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import DuplicatePolicy, Queue, RuleTask, SpoolSettings, TaskKind
from node.spool import InstanceRow, Spool, StabilityMonitor, StableStudy, StoreOutcome
from tests.nodeproc import make_study


def _row(path: Path) -> tuple[bytes, InstanceRow]:
    ds = dcmread(path, stop_before_pixels=True)
    data = path.read_bytes()
    return data, InstanceRow(
        str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
        str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), len(data),
    )


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(SpoolSettings(dir=tmp_path / "spool", stable_after_s=5))
    yield s
    s.close()


def test_store_writes_file_at_uid_path_and_indexes_it(spool: Spool, tmp_path: Path) -> None:
    (path,) = make_study(tmp_path / "in")
    data, row = _row(path)
    assert spool.store(data, row, "MOD", "SYNTHNODE") is StoreOutcome.STORED
    target = spool.dir / row.study_uid / row.series_uid / f"{row.sop_instance_uid}.dcm"
    assert target.read_bytes() == data
    assert spool.index.instance(row.sop_instance_uid) == row
    assert spool.store(data, row, "MOD", "SYNTHNODE") is StoreOutcome.DUPLICATE


def test_path_refuses_uids_that_are_not_uids(spool: Spool) -> None:
    with pytest.raises(ValueError, match='Study Instance UID "../x" is not a valid UID'):
        spool.instance_path("../x", "1.2", "1.3")


def test_replace_policy_overwrites_and_reopens_the_study(tmp_path: Path) -> None:
    spool = Spool(SpoolSettings(dir=tmp_path / "s", on_duplicate=DuplicatePolicy.REPLACE))
    (path,) = make_study(tmp_path / "in")
    data, row = _row(path)
    spool.store(data, row, "MOD", "SYNTHNODE")
    spool.mark_stable(time.time() + 3600)
    assert spool.hand_off(lambda study: None) == 1
    changed = data[:-4] + b"\x01\x02\x03\x04"
    assert spool.store(changed, row, "MOD", "SYNTHNODE") is StoreOutcome.REPLACED
    (summary,) = spool.summaries()
    assert (summary.state.value, summary.revision, summary.instances) == ("receiving", 2, 1)
    assert (spool.dir / row.study_uid / row.series_uid / f"{row.sop_instance_uid}.dcm"
            ).read_bytes() == changed
    spool.close()


def test_recover_removes_partial_files_and_indexes_unrecorded_ones(
    spool: Spool, tmp_path: Path
) -> None:
    paths = make_study(tmp_path / "in", per_series=2)
    data, row = _row(paths[0])
    spool.store(data, row, "MOD", "SYNTHNODE")
    # A crash mid-write leaves a .part in .tmp; a crash between rename and commit leaves a
    # complete file with no index row.
    (spool.tmp_dir / "x.dcm.1.1.part").write_bytes(b"half")
    data2, row2 = _row(paths[1])
    orphan = spool.instance_path(row2.study_uid, row2.series_uid, row2.sop_instance_uid)
    orphan.write_bytes(data2)
    assert spool.recover() == (1, 1)
    assert not list(spool.tmp_dir.iterdir())
    assert spool.index.instance(row2.sop_instance_uid) == row2
    assert spool.recover() == (0, 0)


def test_monitor_hands_each_generation_once_and_retries_failures(
    spool: Spool, tmp_path: Path
) -> None:
    (path,) = make_study(tmp_path / "in")
    data, row = _row(path)
    spool.store(data, row, "MOD", "SYNTHNODE")
    seen: list[StableStudy] = []
    fail = [True]

    def handler(study: StableStudy) -> None:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("next stage unavailable")
        seen.append(study)

    monitor = StabilityMonitor(spool, handler)
    now = time.time()
    assert monitor.tick(now) == 0  # not yet quiet for stable_after_s
    assert monitor.tick(now + 10) == 0  # stable, but the handler failed: kept for retry
    assert monitor.tick(now + 11) == 1
    assert monitor.tick(now + 12) == 0  # handed: not again
    (study,) = seen
    assert (study.study_uid, study.revision, len(study.instances)) == (row.study_uid, 1, 1)
    assert study.series_uids == (row.series_uid,)


def test_hand_off_goes_on_while_a_periodic_task_is_slow_and_retention_asks_the_job_store(
    tmp_path: Path,
) -> None:
    from node.config import JobsSettings
    from node.jobs import Job, JobState, Queues
    from node.route import Submitted
    from node.server import Schedule
    from node.spool import Retention, StudyState

    spool = Spool(SpoolSettings(dir=tmp_path / "spool", stable_after_s=0.01, retention_s=3600,
                                check_interval_s=0.05))
    (path,) = make_study(tmp_path / "in")
    data, row = _row(path)
    spool.store(data, row, "MOD", "SYNTHNODE")
    store = Queues(JobsSettings(sqlite_file=tmp_path / "queue.sqlite3")).store
    release = threading.Event()
    monitor = StabilityMonitor(spool, lambda study: Submitted(("job-1",), "1 job from rules r"))
    schedule = Schedule(0.05, (lambda now: release.wait(30), Retention(spool, store).tick))

    def state() -> StudyState:
        (summary,) = spool.summaries()
        return summary.state

    def wait_for(wanted: StudyState) -> bool:
        deadline = time.monotonic() + 10
        while state() is not wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        return state() is wanted

    schedule.start()
    monitor.start()
    try:
        assert wait_for(StudyState.HANDED)  # while the schedule's first task still blocks
        release.set()
        time.sleep(0.3)
        assert state() is StudyState.HANDED  # its job is not done: the study stays
        store.put(Job(id="job-1", study_uid=row.study_uid, revision=1, rule="r",
                      task_index=0, task=RuleTask(task=TaskKind.DEIDENTIFY), queue=Queue.CPU,
                      series_uids=(row.series_uid,), destinations=(), state=JobState.DONE))
        assert wait_for(StudyState.DONE)
    finally:
        release.set()
        monitor.stop()
        schedule.stop()
        spool.close()


def test_an_index_from_before_the_rename_keeps_its_studies_revisions(tmp_path: Path) -> None:
    """A spool made by 0.1 (columns "generation", "handed_generation") opens with its counts
    under their new names, so a study handed on twice stays at revision 2."""
    import sqlite3

    from node.spool.index import Index

    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE studies (study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, generation "
        "INTEGER NOT NULL, first_received_at REAL NOT NULL, last_received_at REAL NOT NULL, "
        "stable_at REAL, handed_generation INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO studies VALUES ('1.2.3', 'handed', 2, 0, 0, 0, 2);")
    db.close()
    index = Index(path)
    try:
        (summary,) = index.summaries()
        assert (summary.study_uid, summary.state.value, summary.revision) == ("1.2.3", "handed", 2)
        columns = {r[1] for r in index._db.execute("PRAGMA table_info(studies)")}
        assert {"revision", "handed_revision"} <= columns and "generation" not in columns
    finally:
        index.close()
