"""Nothing acknowledged is ever lost: kill -9, restarts, SIGTERM, a full disk."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node.localorthanc import free_port
from node.receive.check import StoreStatus, inspect_dataset
from tests.nodeproc import (
    SYNTHNODE,
    NodeProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk,
    make_study,
    send_raw,
)


def _reference_bytes(storescp: StoreSCP, files: list[Path]) -> dict[str, bytes]:
    """What storescu puts on the wire for each file, as dcmtk's bit-preserving storescp saw it."""
    env = dict(os.environ, TCP_NODELAY="1")
    res = subprocess.run(
        [dcmtk("storescu"), "-aec", storescp.ae_title, "127.0.0.1", str(storescp.port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr
    out = {}
    for path in storescp.received():
        data = path.read_bytes()
        out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(data)
    return out


def _assert_spool_consistent(node: NodeProcess) -> None:
    """Every spooled file is complete and indexed, every indexed instance has its file."""
    files = node.spooled()
    assert not list((node.spool / ".tmp").iterdir()), "partial files survived a restart"
    for path in files.values():
        ds = dcmread(path, stop_before_pixels=True)
        header = inspect_dataset(dataset_bytes(path.read_bytes()), ds.file_meta.TransferSyntaxUID)
        assert header.sop_instance_uid == path.stem
    indexed = sum(s["instances"] for s in node.status()["studies"])
    assert indexed == len(files)


@pytest.mark.slow
def test_kill9_during_transfer_loses_no_acknowledged_instance(
    node: NodeProcess, storescp: StoreSCP, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", series=2, per_series=100)
    reference = _reference_bytes(storescp, files)
    sop_of = {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    acknowledged: list[Path] = []
    current: Path | None = None
    assert sender.stdout is not None
    killed = False
    deadline = time.monotonic() + 120
    for line in sender.stdout:
        assert time.monotonic() < deadline, "storescu did not progress"
        if m := re.match(r"I: Sending file: (.*)$", line.rstrip()):
            current = Path(m[1])
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            if len(acknowledged) == 60 and not killed:
                node.kill9()
                killed = True
    sender.wait(30)
    assert killed, "the transfer finished before the kill"
    assert 60 <= len(acknowledged) < len(files)

    node.start()  # same config and spool: recovery runs before the port opens
    _assert_spool_consistent(node)
    spooled = node.spooled()
    for path in acknowledged:
        sop = sop_of[path]
        assert sop in spooled, f"acknowledged instance {sop} lost"
        assert dataset_bytes(spooled[sop].read_bytes()) == reference[sop]

    # The modality resends everything: the rest arrives, nothing is duplicated.
    res = subprocess.run(
        [dcmtk("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"),
    )
    assert res.returncode == 0, res.stderr
    spooled = node.spooled()
    assert len(spooled) == len(files)
    for sop, data in reference.items():
        assert dataset_bytes(spooled[sop].read_bytes()) == data
    _assert_spool_consistent(node)


def _handed(log: str, study_uid: str) -> int:
    return log.count(f"study stable study_uid={study_uid} ")


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.mark.slow
def test_stable_state_survives_kill9_neither_lost_nor_handed_twice(
    node_factory, tmp_path: Path
) -> None:
    node = node_factory(spool={"stable_after_s": 1.5, "check_interval_s": 0.2})
    first = make_study(tmp_path / "a", per_series=3)
    second = make_study(tmp_path / "b", per_series=3)
    uid_a = str(dcmread(first[0]).StudyInstanceUID)
    uid_b = str(dcmread(second[0]).StudyInstanceUID)

    assert _store(node.port, first) == [0, 0, 0]
    _wait_for(lambda: _handed(node.log(), uid_a) == 1)
    assert _store(node.port, second) == [0, 0, 0]
    node.kill9()  # B is received but not yet stable; A was handed on

    node.start()
    _wait_for(lambda: _handed(node.log(), uid_b) == 1)
    # A sentinel study received after the restart: once it is handed on, the monitor has made
    # every pass of its stable_after_s since B (a fixed sleep would not say so on a loaded box).
    sentinel = make_study(tmp_path / "s", per_series=1)
    uid_s = str(dcmread(sentinel[0]).StudyInstanceUID)
    assert _store(node.port, sentinel) == [0]
    _wait_for(lambda: _handed(node.log(), uid_s) == 1)
    log = node.log()
    assert _handed(log, uid_a) == 1, "a study handed before the crash was handed again"
    assert _handed(log, uid_b) == 1
    states = {s["study_uid"]: (s["state"], s["revision"]) for s in node.status()["studies"]}
    # rules = []: handed on, nothing made of them, and status says so.
    assert states == {uid_a: ("unrouted", 1), uid_b: ("unrouted", 1), uid_s: ("unrouted", 1)}
    notes = {s["note"] for s in node.status()["studies"]}
    assert notes == {"no rule matched: nothing made of this study"}

    # More instances for a handed study start a new revision, handed on once more.
    extra = make_study(tmp_path / "c", per_series=1)
    ds = dcmread(extra[0])
    ds.StudyInstanceUID = uid_a
    ds.save_as(extra[0])
    assert _store(node.port, extra) == [0]
    _wait_for(lambda: _handed(node.log(), uid_a) == 2)
    assert "revision=2" in node.log()


def _store(port: int, files: list[Path], ae_title: str = "SYNTHNODE") -> list[int]:
    return send_raw(port, files, ae_title=ae_title, calling="PYSCU")


@pytest.mark.slow
def test_sigterm_finishes_in_flight_stores_and_exits_zero(node, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", per_series=150)
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    assert sender.stdout is not None
    acked = 0
    for line in sender.stdout:
        if "Received Store Response (Success)" in line:
            acked += 1
            if acked == 20:
                assert node.proc is not None
                node.proc.terminate()
                break
    out = sender.communicate(timeout=120)[0]
    assert node.proc is not None
    assert node.proc.wait(60) == 0
    # The association in flight was allowed to finish: every instance acknowledged and stored.
    assert sender.returncode == 0, out
    assert len(node.spooled()) == len(files)
    log = node.log()
    assert "received SIGTERM" in log and "stopped: 150 stored" in log


def test_full_disk_answers_out_of_resources_and_keeps_what_was_stored(
    node_factory, tmp_path: Path
) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    # The tests run in a private mount namespace: this tmpfs is invisible to the host.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        # No reserve: this is what happens when the disk fills up all the same.
        node = node_factory(spool={"dir": str(mount / "spool"), "reserve_bytes": 0,
                                   "reserve_percent": 0})
        small = make_study(tmp_path / "small_study", per_series=2)
        big = make_study(tmp_path / "big_study", source="RG1_UNCR.dcm")
        assert _store(node.port, small[:1]) == [0]
        assert _store(node.port, big) == [StoreStatus.OUT_OF_RESOURCES]
        assert "no space left on the spool's disk" in node.log()
        assert "C-STORE failed from PYSCU@127.0.0.1" in node.log()
        assert not list((node.spool / ".tmp").iterdir())
        assert len(node.spooled()) == 1
        # Still up, and what fits still goes in.
        assert _store(node.port, small[1:]) == [0]
        assert len(node.spooled()) == 2
        assert node.terminate() == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_bad_config_exits_nonzero_before_listening(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[node]\nport = {port}\nmax_associations = 0\n[spool]\nfsync = "often"\n')
    started = time.monotonic()
    res = subprocess.run(
        [*SYNTHNODE, "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert f"{cfg}: [node] max_associations = 0: Input should be greater than or equal to 1" in (
        res.stderr
    )
    assert f"{cfg}: [spool] fsync = 'often'" in res.stderr
    assert "listening" not in res.stderr
    assert time.monotonic() - started < 30
    # The same through SYNTHNODE_CONFIG.
    res = subprocess.run(
        [*SYNTHNODE, "serve"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, SYNTHNODE_CONFIG=str(cfg)),
    )
    assert res.returncode == 2 and "max_associations" in res.stderr

