"""What ``synthnode serve`` survives and refuses: its workers end with it however it ends (kill -9
included: a parent-death signal and a watched pipe, each tested alone), a leftover worker of a
previous run is killed on start, one node per spool, a port in use stops the start before any
worker exists."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.jobs import JobState
from node.jobs.worker import PARENT_GONE, WORKERS_NAME, process_start
from node.localorthanc import OrthancProcess, free_port
from tests.nodeproc import SYNTHNODE, NodeProcess, echo, make_study, storescu, write_config
from tests.test_jobs import all_done, jobs_node, records, wait_for


def alive(pid: int, start: int | None) -> bool:
    """The process ``pid`` started at ``start`` runs (a zombie does not: it has ended)."""
    if start is None or process_start(pid) != start:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def recorded_workers(node: NodeProcess) -> dict[int, int | None]:
    """pid -> start time of the workers serve recorded beside its spool lock."""
    record = json.loads((node.spool / WORKERS_NAME).read_text())
    return {int(w["pid"]): w["start"] for w in record["workers"]}


def wait_workers_started(log: Path | NodeProcess, count: int, timeout_s: float = 60) -> None:
    def text() -> str:
        return log.log() if isinstance(log, NodeProcess) else (
            log.read_text(errors="replace") if log.exists() else "")
    wait_for(lambda: text().count("worker for queue cpu") >= count, timeout_s,
             f"{count} worker(s) started")


def worker_config(tmp_path: Path) -> Path:
    """A config for a bare ``synthnode worker`` on a private SQLite queue."""
    return write_config(tmp_path / "worker.toml", {
        "spool": {"dir": str(tmp_path / "spool")},
        "jobs": {"sqlite_file": str(tmp_path / "queue.sqlite3"),
                 "work_dir": str(tmp_path / "work")},
    })


def worker_cmd(config: Path, parent: int | None = None) -> list[str]:
    return [*SYNTHNODE, "--config", str(config), "worker", "--queue", "cpu",
            *(["--parent", str(parent)] if parent is not None else [])]


# -- no orphans ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_of_serve_ends_its_workers_and_the_job_in_hand_is_retried(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = jobs_node(node_factory, tmp_path, orthanc, jobs={"cpu_workers": 2})
    workers = recorded_workers(node)
    assert len(workers) == 2 and all(alive(p, s) for p, s in workers.items())
    wait_workers_started(node, 2)
    files = make_study(tmp_path / "in", per_series=150)
    assert storescu(node.port, files).returncode == 0

    def half_delivered() -> bool:
        jobs = records(node)
        return bool(jobs) and jobs[0].state is JobState.RUNNING and (
            orthanc.count_instances() >= 10)
    wait_for(half_delivered, what="a job half delivered")
    node.kill9()
    assert orthanc.count_instances() < len(files), "the job finished before the kill"
    wait_for(lambda: not any(alive(p, s) for p, s in workers.items()), 60,
             "the workers of the killed serve to end")
    assert node.log().count("is gone: worker pid") >= 1

    node.start()
    assert not set(recorded_workers(node)) & set(workers)
    wait_for(all_done(node, 1), what="the job retried by the new serve")
    (job,) = records(node)
    assert job.attempts == 2 and job.outputs == len(files)
    assert "stopped (no heartbeat" in node.log()
    assert orthanc.count_instances() == len(files)  # deterministic UIDs: nothing twice
    node.stop()
    assert "Fatal Python error" not in node.log() and "Traceback" not in node.log()


def test_parent_death_signal_alone_ends_a_worker(tmp_path: Path) -> None:
    """The parent dies but the worker's stdin pipe stays open (this test holds it): only
    PR_SET_PDEATHSIG can end the worker."""
    config = worker_config(tmp_path)
    log = tmp_path / "worker.log"
    spawner = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen({worker_cmd(config)!r} + ['--parent', str(os.getpid())], "
        f"stdin=sys.stdin, stdout=open({str(log)!r}, 'wb'), stderr=subprocess.STDOUT)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", spawner], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        start = process_start(pid)
        wait_workers_started(log, 1)
        assert alive(pid, start)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not alive(pid, start), 60, "the worker to end with its parent")
        assert "Received SIGTERM" in log.read_text() or "SIGTERM" in log.read_text()
    finally:
        parent.kill()
        parent.wait(10)
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)


def test_serve_pipe_alone_ends_a_worker(tmp_path: Path) -> None:
    """The parent (this test) lives, so no parent-death signal comes: only the pipe's
    end-of-file ends the worker."""
    worker = subprocess.Popen(worker_cmd(worker_config(tmp_path), parent=os.getpid()),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert worker.stdout is not None and worker.stdin is not None
        deadline = time.monotonic() + 60
        for line in worker.stdout:
            assert time.monotonic() < deadline, "the worker did not start"
            if "worker for queue cpu" in line:
                break
        assert worker.poll() is None
        worker.stdin.close()
        assert worker.wait(60) == PARENT_GONE
        assert f"serve pid {os.getpid()} is gone" in worker.stdout.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_worker_whose_serve_is_already_gone_does_not_start(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = subprocess.run(worker_cmd(worker_config(tmp_path), parent=dead.pid),
                         stdin=subprocess.PIPE, capture_output=True, text=True, timeout=60)
    assert out.returncode == PARENT_GONE, out.stderr
    assert f"serve pid {dead.pid} is gone before worker" in out.stderr
    assert "Huey consumer started" not in out.stderr


@pytest.mark.slow
def test_leftover_worker_of_a_previous_serve_is_killed_on_start(tmp_path: Path) -> None:
    sections = {
        "node": {"port": free_port()},
        "spool": {"dir": str(tmp_path / "spool"), "stable_after_s": 3600},
        "jobs": {"cpu_workers": 0, "gpu_workers": 0,
                 "sqlite_file": str(tmp_path / "queue.sqlite3")},
    }
    config = write_config(tmp_path / "node.toml", sections).resolve()
    # A worker of this config, and an unrelated process, both recorded as a previous run's.
    leftover = subprocess.Popen(worker_cmd(config), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bystander = subprocess.Popen(["sleep", "300"])
    node = NodeProcess(config, sections, tmp_path / "node.log")
    try:
        starts = {p.pid: process_start(p.pid) for p in (leftover, bystander)}
        (tmp_path / "spool").mkdir()
        (tmp_path / "spool" / WORKERS_NAME).write_text(json.dumps({
            "serve": 4194301, "workers": [{"pid": p, "start": s} for p, s in starts.items()]}))
        node.start()
        assert leftover.wait(60) == -signal.SIGKILL
        assert (f"worker pid {leftover.pid} of a previous serve (pid 4194301) is still "
                "running: killed") in node.log()
        assert bystander.poll() is None  # not a node worker: never touched
    finally:
        node.stop()
        for proc in (leftover, bystander):
            proc.kill()
            proc.wait(10)


# -- one node per spool, a port in use -----------------------------------------------------------

def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SYNTHNODE, "--config", str(config), "serve"], capture_output=True,
                          text=True, timeout=60)


def test_second_serve_on_the_same_spool_stops_at_once(node_factory, tmp_path: Path) -> None:
    first = node_factory(jobs={"cpu_workers": 1})
    assert first.proc is not None
    workers = recorded_workers(first)
    port = free_port({first.port})
    second = write_config(tmp_path / "second.toml", {
        "node": {"port": port},
        "spool": {"dir": str(first.spool)},
        "jobs": {"cpu_workers": 1, "gpu_workers": 0},
    })
    out = _serve(second)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"synthnode serve: the spool {first.spool} is in use by serve pid {first.proc.pid} "
        f"(lock {first.spool / '.serve.lock'}): stop it, or give this one another [spool] dir"
    ]
    assert not echo(port)  # it never listened
    assert echo(first.port)  # and the first one goes on
    assert first.proc.poll() is None
    assert all(alive(p, s) for p, s in workers.items())  # its workers were left alone


def test_port_in_use_stops_serve_with_one_line_before_any_worker(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        config = write_config(tmp_path / "node.toml", {
            "node": {"port": port},
            "spool": {"dir": str(tmp_path / "spool")},
            "jobs": {"cpu_workers": 1, "gpu_workers": 0},
        })
        out = _serve(config)
    finally:
        busy.close()
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"synthnode serve: port {port} on 127.0.0.1 is in use (another DICOM server?): stop "
        "it or set [node] port"
    ]
    assert not (tmp_path / "spool" / WORKERS_NAME).exists()  # no worker was started
