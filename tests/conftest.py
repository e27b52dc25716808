"""Test harness: real servers, isolated.

The whole test process moves into a private network namespace (and a private mount namespace)
before any test runs, so every server a test starts (the node, dcmtk, Orthanc, Redis) listens
only on that namespace's loopback and tmpfs mounts stay private. Subprocesses inherit both.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, StoreSCP, write_config
from tests.orthancproc import OrthancProcess, free_port

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000


def _isolate() -> None:
    if os.environ.get("SYNTHNODE_TEST_ISOLATED") == "1":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET | CLONE_NEWNS
    if uid != 0:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise pytest.UsageError(
            f"cannot create a private network namespace ({os.strerror(err)}): run the tests as "
            "root, or where unprivileged user namespaces are allowed"
        )
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    # Mounts made by tests must not leak to the host.
    subprocess.run(["mount", "--make-rprivate", "/"], check=False, capture_output=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["SYNTHNODE_TEST_ISOLATED"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    _isolate()
    # dcmtk and Orthanc leave Nagle on unless told: ~40 ms per C-STORE otherwise.
    os.environ["TCP_NODELAY"] = "1"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def node_factory(tmp_path: Path):
    """Start ``synthnode serve`` subprocesses with a private config; all are stopped after."""
    started: list[NodeProcess] = []

    def start(**sections: dict) -> NodeProcess:
        sections.setdefault("node", {})
        sections["node"].setdefault("port", free_port())
        sections.setdefault("spool", {})
        sections["spool"].setdefault("dir", str(tmp_path / "spool"))
        sections["spool"].setdefault("stable_after_s", 3600)
        cfg = write_config(tmp_path / f"node{len(started)}.toml", sections)
        proc = NodeProcess(cfg, sections, tmp_path / f"node{len(started)}.log")
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    """A node with default settings (no allowlist, keep_first duplicates)."""
    return node_factory()


@pytest.fixture
def storescp(tmp_path: Path):
    scp = StoreSCP(tmp_path / "storescp", free_port())
    yield scp
    scp.stop()


@pytest.fixture
def orthanc(tmp_path: Path):
    """A real Orthanc 1.10 with HTTP authentication and synthnode's user metadata declared;
    killed after the test (its storage is temporary: no need for its 3.5 s graceful stop)."""
    proc = OrthancProcess(tmp_path / "orthanc")
    proc.start()
    yield proc
    proc.stop(kill=True)
