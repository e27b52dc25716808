"""The order that makes an acknowledgement durable, seen in the node's own system calls.

kill -9 keeps the page cache, so no crash test can tell a spool that syncs from one that does
not: only the order of the calls can. A real ``serve`` runs under strace; for each instance
sent, its spooled file must be written to a temporary file, that file fdatasync'ed, renamed to
its final name, the folder holding the final name fsync'ed, and only then the C-STORE response
(a P-DATA-TF PDU) sent on the association's socket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.localorthanc import free_port
from tests.nodeproc import NodeProcess, make_study, storescu, write_config

_TRACED = ("write,pwrite64,writev,pwritev,pwritev2,fdatasync,fsync,rename,renameat,renameat2,"
           "sendto,sendmsg,sendmmsg")


@dataclass
class Call:
    """One system call of the trace: its name, its arguments as strace printed them, its
    return value, and the trace lines where it started and ended (strace splits a call that
    another thread interrupts into "<unfinished ...>" and "<... resumed>")."""

    name: str
    args: str
    start: int
    end: int = -1
    result: str = ""

    @property
    def fd_path(self) -> str:
        """The file or socket of the descriptor it works on (strace -yy: ``7</a/b>``)."""
        m = re.match(r"\d+<(.*?)>(?:, |\)|$)", self.args)
        return m[1] if m else ""

    @property
    def strings(self) -> list[str]:
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)


def parse_trace(text: str) -> list[Call]:
    calls: list[Call] = []
    pending: dict[str, Call] = {}
    for i, line in enumerate(text.splitlines()):
        # strace pads the pid column to 5 characters: "7202  rename(...", "12345 rename(..."
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip(" ")
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            call = pending.pop(pid)
            tail = resumed[2]
        else:
            m = re.match(r"(\w+)\((.*)$", rest)
            if not m:
                continue  # "+++ exited with 0 +++" and the like
            call = Call(m[1], "", i)
            calls.append(call)
            tail = m[2]
            if tail.endswith("<unfinished ...>"):
                call.args = tail.removesuffix("<unfinished ...>")
                pending[pid] = call
                continue
        done = re.match(r"(.*)\)\s+= (.*)$", tail)
        call.args += done[1] if done else tail
        call.result = done[2] if done else ""
        call.end = i
    return calls


def assert_durable_before_response(calls: list[Call], final: Path, port: int) -> None:
    """``final`` (a spooled file) was written and synced, renamed into place and its folder
    synced before the node sent anything but association set-up on the socket of ``port``."""
    renames = [c for c in calls if c.name.startswith("rename") and c.strings
               and c.strings[-1] == str(final)]
    assert len(renames) == 1, f"expected one rename to {final}, found {len(renames)}"
    rename = renames[0]
    tmp = rename.strings[-2]
    assert tmp != str(final) and result_ok(rename)

    writes = [c for c in calls if c.name.startswith(("write", "pwrite")) and c.fd_path == tmp]
    assert writes, f"no write to the temporary file {tmp}"
    assert sum(int(c.result) for c in writes) == final.stat().st_size
    synced = [c for c in calls if c.name in ("fdatasync", "fsync") and c.fd_path == tmp]
    assert synced, f"the temporary file {tmp} was never fdatasync'ed: its bytes may be lost"
    sync = synced[-1]
    assert all(w.end < sync.start for w in writes), "a write came after the file's sync"
    assert sync.end < rename.start and result_ok(sync), "renamed before the file was synced"

    dir_syncs = [c for c in calls if c.name == "fsync" and c.fd_path == str(final.parent)
                 and c.start > rename.end]
    assert dir_syncs, f"{final.parent} was not fsync'ed after the rename: the name may be lost"
    dir_sync = dir_syncs[0]
    assert result_ok(dir_sync)

    # The association's socket: the node's port on the left of -yy's "local->peer".
    on_socket = [c for c in calls if c.name.startswith("send")
                 and c.fd_path.startswith(f"TCP:[127.0.0.1:{port}->")]
    data = [c for c in on_socket if c.args.partition(", ")[2].startswith('"\\4')]  # P-DATA-TF
    assert data, "no P-DATA-TF (the C-STORE response) sent on the association"
    early = [c for c in data if c.start < dir_sync.end]
    assert not early, "the C-STORE response went out before the spooled file was durable"


def result_ok(call: Call) -> bool:
    return call.result.split(" ")[0] == "0"


# Instances to trace, by how the node receives them. A streaming path for large instances
# adds a case here (and its sending) and the same assertion applies.
CASES = {"small": dict(per_series=1)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spool_syncs_file_renames_syncs_folder_then_answers(tmp_path: Path, case: str) -> None:
    strace = shutil.which("strace", path="/usr/bin:/usr/local/bin")
    if strace is None:
        raise FileNotFoundError("strace is not installed (Debian package strace: run .ci/setup)")
    port = free_port()
    sections = {"node": {"port": port}, "spool": {"dir": str(tmp_path / "spool"),
                                                  "stable_after_s": 3600},
                "jobs": {"cpu_workers": 0, "gpu_workers": 0}}
    config = write_config(tmp_path / "node.toml", sections)
    node = NodeProcess(config, sections, tmp_path / "node.log")
    trace = tmp_path / "trace.txt"
    # --seccomp-bpf stops the node only at the calls traced: the rest runs at full speed.
    node.wrap = [strace, "-f", "-qq", "--seccomp-bpf", "-yy", "-s", "2", "-e", "signal=none",
                 "-e", f"trace={_TRACED}", "-o", str(trace), "--"]
    files = make_study(tmp_path / "in", **CASES[case])
    node.start(timeout_s=120)
    try:
        done = storescu(port, files)
        assert done.returncode == 0, done.stderr
        spooled = node.spooled()
        assert len(spooled) == len(files)
    finally:
        _stop_traced(node)
    calls = parse_trace(trace.read_text())
    for path in spooled.values():
        assert_durable_before_response(calls, path, port)


def _stop_traced(node: NodeProcess) -> None:
    """SIGTERM to the node itself (strace does not pass it on), then strace ends with it."""
    assert node.proc is not None
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children")
    pids = children.read_text().split() if children.exists() else []
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)
    try:
        node.proc.wait(60)
    except subprocess.TimeoutExpired:
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        node.proc.kill()
        node.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
