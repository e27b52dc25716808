"""The spool on its own: real files and a real SQLite index, no network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import DuplicatePolicy, SpoolSettings
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
    assert (summary.state.value, summary.generation, summary.instances) == ("receiving", 2, 1)
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
    assert (study.study_uid, study.generation, len(study.instances)) == (row.study_uid, 1, 1)
    assert study.series_uids == (row.series_uid,)
