"""The command line's rough edges: a closed pipe, folders to send, what the help promises."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from node.config import SpoolSettings
from node.localorthanc import free_port
from node.spool import InstanceRow, Spool
from tests.nodeproc import SYNTHNODE, StoreSCP, make_study, write_config


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the command with stdout a pipe whose reader is already gone (`... | head`, once
    head has read its lines)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*SYNTHNODE, *args], stdout=write, stderr=subprocess.PIPE,
                              timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize("studies", [0, 400], ids=["flush-at-exit", "mid-output"])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, studies: int) -> None:
    spool_dir = tmp_path / "spool"
    if studies:  # enough lines (~60 kB) that a write in the middle of the listing fails
        spool = Spool(SpoolSettings(dir=spool_dir, fsync=False))
        try:
            for i in range(studies):
                row = InstanceRow(f"1.2.3.{i}.1", f"1.2.3.{i}", f"1.2.3.{i}.0", "1.2.840.1",
                                  "1.2.840.10008.1.2.1", 4)
                spool.store(b"DICM", row, "MOD", "SYNTHNODE")
        finally:
            spool.close()
    config = write_config(tmp_path / "node.toml", {"spool": {"dir": str(spool_dir)}})
    done = _run_into_closed_pipe("--config", str(config), "status")
    assert done.stderr == b""  # no BrokenPipeError traceback, no "Exception ignored"
    assert done.returncode == 141  # as a shell reports a command ended by SIGPIPE


def test_send_walks_folders_for_dicom_files_and_counts_the_rest(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study" / "a", per_series=2)
    files += make_study(tmp_path / "study" / "b" / "deeper", per_series=1)
    (tmp_path / "study" / "DICOMDIR.txt").write_text("not DICOM")
    (tmp_path / "study" / "b" / "notes.bin").write_bytes(b"\0" * 200)
    config = write_config(tmp_path / "node.toml", {})
    scp = StoreSCP(tmp_path / "storescp", free_port())
    try:
        done = subprocess.run(
            [*SYNTHNODE, "--config", str(config), "send", str(tmp_path / "study"),
             "--to", f"{scp.ae_title}@127.0.0.1:{scp.port}"],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "skipped 2 non-DICOM files in folders" in done.stderr
        sent = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("sent")]
        assert sorted(sent) == sorted(map(str, files))
        assert done.stdout.splitlines()[-1].startswith(f"{len(files)} of {len(files)} sent")
        assert len(scp.received()) == len(files)
    finally:
        scp.stop()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    done = subprocess.run([*SYNTHNODE, "--config", str(config), "send", str(empty),
                           "--to", "orthanc"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "skipped 1 non-DICOM file in folders" in done.stderr
    assert "no DICOM file found" in done.stderr


def test_backfill_help_names_both_kinds_of_source() -> None:
    done = subprocess.run([*SYNTHNODE, "mirror", "backfill", "--help"], capture_output=True,
                          text=True, timeout=60)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "an Orthanc" in text and "C-FIND" in text and "C-GET" in text
    assert "the clinical Orthanc:" not in text

