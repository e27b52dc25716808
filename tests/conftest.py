"""Test harness: real servers, isolated.

The whole test process moves into a private network namespace (and a private mount namespace)
before any test runs, so every server a test starts (the node, dcmtk, Orthanc, Redis) listens
only on that namespace's loopback and tmpfs mounts stay private. Subprocesses inherit both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from node.localorthanc import OrthancProcess, free_port
from node.netns import isolate_network
from tests import leftovers
from tests.nodeproc import NodeProcess, StoreSCP, write_config

_RUN: dict[str, str] = {}


def _isolate() -> None:
    try:
        isolate_network()
    except OSError as exc:
        raise pytest.UsageError(str(exc.strerror)) from None


def pytest_configure(config: pytest.Config) -> None:
    _isolate()
    # dcmtk and Orthanc leave Nagle on unless told: ~40 ms per C-STORE otherwise.
    os.environ["TCP_NODELAY"] = "1"
    _RUN["token"] = leftovers.mark_run()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run leaves no process behind: any server or client it started that is still alive
    now is named, killed, and fails the run."""
    if "token" not in _RUN:
        return
    left = leftovers.collect(_RUN["token"])
    if left:
        lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
        print(f"\nthe test run left {len(left)} process(es) behind (now killed):\n{lines}",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _no_orthanc_left_behind():
    """Orthancs that helpers start (with the plugin, a clinical one) end with their test."""
    yield
    OrthancProcess.stop_all()


@pytest.fixture
def node_factory(tmp_path: Path):
    """Start ``synthnode serve`` subprocesses with a private config; all are stopped after."""
    started: list[NodeProcess] = []

    def start(rules: str = "", **sections: dict) -> NodeProcess:
        """``rules``: TOML ``[[rules]]`` text ("" = none); workers only where ``[jobs]`` asks."""
        sections.setdefault("node", {})
        sections["node"].setdefault("port", free_port())
        sections.setdefault("spool", {})
        sections["spool"].setdefault("dir", str(tmp_path / "spool"))
        sections["spool"].setdefault("stable_after_s", 3600)
        sections.setdefault("console", {})
        sections["console"].setdefault("port", free_port())
        sections.setdefault("jobs", {})
        sections["jobs"].setdefault("cpu_workers", 0)
        sections["jobs"].setdefault("gpu_workers", 0)
        cfg = write_config(tmp_path / f"node{len(started)}.toml", sections, rules)
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


@pytest.fixture
def dicomweb_orthanc(tmp_path: Path):
    """A real Orthanc 1.10 with its DICOMweb plugin: QIDO-RS, WADO-RS and STOW-RS at
    ``.dicomweb_url``, HTTP basic auth for ``.username`` / ``.password`` (its REST API at
    ``.url`` for checks); killed after the test."""
    proc = OrthancProcess(tmp_path / "dicomweb", dicomweb=True)
    proc.start()
    yield proc
    proc.stop(kill=True)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny model with its VAE fitted to phantom radiographs (tests/trainingdata.py), built
    once per test session: the base the fine-tune, copy-check and evaluate tests start from."""
    from tests.trainingdata import fitted_tiny

    return fitted_tiny(tmp_path_factory.mktemp("tiny-base") / "model")
