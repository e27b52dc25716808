"""Files written whole or not at all (node.files): the old file or the new one, never part of
one, and with ``durable`` the system calls in the order that survives a power loss."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.files import atomic_open, atomic_write
from tests.test_durability_trace import parse_trace, result_ok


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("old")
    atomic_write(path, '{"new": "ü"}')
    assert path.read_text(encoding="utf-8") == '{"new": "ü"}'
    atomic_write(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_atomic_write_in_a_temporary_folder_with_a_mode(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "a.dcm"
    old = os.umask(0o022)
    try:
        atomic_write(path, b"x" * 10, durable=True, mode=0o640, tmp_dir=tmp_path / "tmp")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"x" * 10
    assert path.stat().st_mode & 0o777 == 0o640
    assert not list((tmp_path / "tmp").iterdir())


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.dcm"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("the writer failed midway")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]
    with pytest.raises(FileNotFoundError):  # the folder is gone: nothing is left behind
        atomic_write(tmp_path / "missing" / "x.json", "{}")
    with atomic_open(path, durable=True) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_durable_write_syncs_the_file_renames_then_syncs_the_folder(tmp_path: Path) -> None:
    strace = shutil.which("strace", path="/usr/bin:/usr/local/bin")
    if strace is None:
        raise FileNotFoundError("strace is not installed (Debian package strace: run .ci/setup)")
    path = tmp_path / "key.json"
    trace = tmp_path / "trace.txt"
    code = ("import sys; from pathlib import Path; from node.files import atomic_write; "
            "atomic_write(Path(sys.argv[1]), b'0123456789', durable=True)")
    subprocess.run([strace, "-f", "-qq", "-yy", "-s", "2", "-e", "signal=none",
                    "-e", "trace=write,fdatasync,fsync,rename,renameat,renameat2",
                    "-o", str(trace), sys.executable, "-c", code, str(path)],
                   check=True, env=dict(os.environ, PYTHONPATH=str(Path.cwd())), timeout=60)
    calls = parse_trace(trace.read_text())
    [rename] = [c for c in calls if c.name.startswith("rename") and c.strings
                and c.strings[-1] == str(path)]
    tmp = rename.strings[-2]
    assert tmp != str(path) and result_ok(rename)
    writes = [c for c in calls if c.name == "write" and c.fd_path == tmp]
    assert sum(int(c.result) for c in writes) == 10
    [sync] = [c for c in calls if c.name in ("fdatasync", "fsync") and c.fd_path == tmp]
    assert writes[-1].end < sync.start and sync.end < rename.start and result_ok(sync)
    assert [c for c in calls if c.name == "fsync" and c.fd_path == str(tmp_path)
            and c.start > rename.end and result_ok(c)], "the folder was not synced after"
