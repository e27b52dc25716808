"""Processes a test run leaves behind: servers and clients it started (Orthanc, Redis, dcmtk,
``python -m node``) still alive when it ends.

A process counts as the run's when it descends from the test process, or when it carries the
run's mark in its environment (:data:`MARK`, set once at the start and inherited by every
child): an orphan whose parent died is re-parented away from the test process, but keeps the
mark.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from pathlib import Path

MARK = "SYNTHNODE_TEST_RUN"

PROGRAMS = ("Orthanc", "redis-server", "storescp", "storescu", "echoscu", "findscu", "getscu",
            "movescu", "dcmqrscp")
"""Programs the tests start, by the base name of their executable."""


def mark_run() -> str:
    """Mark this process's environment (so the children started from now on) with a token
    of this run."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    os.environ[MARK] = token
    return token


def _watched(args: list[str]) -> bool:
    if not args:
        return False
    if os.path.basename(args[0]) in PROGRAMS:
        return True
    # python -m node ... (serve, worker, demo, ...)
    return any(a == "-m" and args[i + 1:i + 2] == ["node"] for i, a in enumerate(args))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def find(token: str, root: int | None = None) -> dict[int, str]:
    """pid -> command line of the watched processes alive now that descend from ``root``
    (default: this process) or carry ``token``; zombies (already ended) excluded."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    states: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            states[int(entry.name)], parents[int(entry.name)] = st
    found: dict[int, str] = {}
    for pid, state in states.items():
        if pid == root or state == "Z":
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        argv = args.rstrip("\0").split("\0")
        if not _watched(argv):
            continue
        if _descends(pid, root, parents) or _marked(pid, token):
            found[pid] = " ".join(argv)
    return found


def _descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    for _ in range(64):  # bounded: the process tree is never that deep
        pid = parents.get(pid, 0)
        if pid == root:
            return True
        if pid <= 1:
            return False
    return False


def _marked(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARK}={token}".encode() in environ.split(b"\0")


def collect(token: str, grace_s: float = 5.0) -> dict[int, str]:
    """The run's leftovers after ``grace_s`` for processes that are just ending; each is then
    killed (SIGKILL). pid -> command line."""
    deadline = time.monotonic() + grace_s
    while (left := find(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left
