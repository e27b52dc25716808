"""Workers: ``synthnode worker --queue cpu|gpu`` (a Huey consumer running :class:`Runner`), and
the pool of such processes that ``synthnode serve`` starts and restarts.

Each worker is its own process: a ``kill -9`` takes one job with it, which the reaper (its
heartbeat check) retries; the pool starts a new process in its place.

No orphans: a worker of ``serve`` ends when ``serve`` ends, however it ends (kill -9 included),
by two independent means: a parent-death signal (``prctl(PR_SET_PDEATHSIG)``) and its stdin, a
pipe from ``serve`` that reads end-of-file once ``serve`` is gone. Its job in hand stops beating
and is retried by the next ``serve``'s reaper. ``serve`` also records its workers' pids beside
the spool lock and, on start, kills any still alive from a previous run (:func:`kill_leftovers`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from node.audit import trail_for
from node.config import ENV_CONFIG, Queue, Settings
from node.files import atomic_write
from node.jobs.queue import Queues
from node.jobs.runner import Runner

log = logging.getLogger(__name__)

NICE = 5
"""Niceness that ``serve``'s worker processes add to their own."""

WORKERS_NAME = ".serve.workers"
"""The file beside the spool lock where ``serve`` records its workers (pid, start time)."""

PARENT_GONE = 75
"""A worker's exit status when its ``serve`` is gone."""

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> bool:
    """Arrange for this worker to end when ``parent`` (its ``serve``) ends: the kernel sends
    SIGTERM at the parent's death (Huey's "stop now"), and a daemon thread ends the process
    when stdin, serve's pipe, reads end-of-file. False when the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): only serve's pipe ends this worker",
                    os.strerror(ctypes.get_errno()))
    # The parent may have died before prctl: then we were already handed to another parent.
    if os.getppid() != parent:
        return False

    def watch() -> None:
        # The bare descriptor, not sys.stdin: a thread blocked in a buffered read holds its
        # lock, and the interpreter's shutdown (a normal stop) would abort on it.
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        log.warning("serve pid %d is gone: worker pid %d stops now (its job in hand is retried "
                    "when serve starts again)", parent, os.getpid())
        logging.shutdown()
        os._exit(PARENT_GONE)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True


def run_worker(settings: Settings, queue: Queue | str, workers: int = 1, nice: int = 0,
               parent: int | None = None) -> int:
    """Consume ``queue`` until SIGINT (finish the jobs in hand, then stop) or SIGTERM (stop
    now: the jobs in hand are retried elsewhere), at ``nice`` more niceness. Returns the exit
    status. With ``parent`` (``serve``'s pid; stdin a pipe from it), end when it ends."""
    try:
        queue = Queue(queue)
    except ValueError:
        raise ValueError(f'queue "{queue}" is not one of {", ".join(Queue)}') from None
    if parent is not None and not _die_with_parent(parent):
        log.warning("serve pid %d is gone before worker pid %d started: not starting", parent,
                    os.getpid())
        return PARENT_GONE
    if nice:
        os.nice(nice)
    queues = Queues(settings.jobs, trail=trail_for(settings))
    queues.run = Runner(settings, queues).run  # the runner needs the queues it takes jobs from
    consumer = queues.huey[queue].create_consumer(
        workers=workers, worker_type="thread" if workers == 1 else "process", periodic=False,
        # Poll an idle SQLite queue every 0.25 s at most (Huey's default grows to 10 s):
        # a study's latency is worth more than a few idle queries. Redis blocks instead.
        initial_delay=0.05, backoff=1.2, max_delay=0.25,
    )
    log.info("worker for queue %s (%s backend, %d worker%s) started", queue,
             settings.jobs.backend.value, workers, "s" if workers != 1 else "")
    consumer.run()
    return 0


class WorkerPool:
    """Child worker processes of ``synthnode serve``: ``[jobs] cpu_workers`` for the cpu queue
    and ``gpu_workers`` for the gpu queue, restarted when they exit."""

    def __init__(self, settings: Settings, config: Path | None,
                 record: Path | None = None) -> None:
        self.settings = settings
        self.config = config
        self.record = record
        """Where the workers' pids are kept (:data:`WORKERS_NAME` in the spool), or None."""
        self.wanted = {Queue.CPU: settings.jobs.cpu_workers, Queue.GPU: settings.jobs.gpu_workers}
        self.procs: dict[tuple[Queue, int], subprocess.Popen[bytes]] = {}
        self._restarts: dict[tuple[Queue, int], float] = {}

    def _spawn(self, queue: Queue) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.config is not None:
            env[ENV_CONFIG] = str(self.config)
        # Beside the receiver, workers yield the CPU to it: a C-STORE is answered first, the
        # queue catches up when the senders pause. --config names the config in the command
        # line, so that a later serve recognises a leftover worker of this node.
        cmd = [sys.executable, "-m", "node",
               *(["--config", str(self.config)] if self.config is not None else []),
               "worker", "--queue", queue, "--nice", str(NICE), "--parent", str(os.getpid())]
        # stdin: a pipe only this process holds (close_fds), read to EOF when we are gone.
        # Spawned from serve's main thread only: PR_SET_PDEATHSIG fires when the *thread*
        # that started the child ends.
        return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE)

    def start(self) -> None:
        for queue, count in self.wanted.items():
            for n in range(count):
                self.procs[(queue, n)] = self._spawn(queue)
        if self.procs:
            log.info("started workers: %s", ", ".join(
                f"{q} pid {p.pid}" for (q, _), p in sorted(self.procs.items())))
        self._write_record()

    def _write_record(self) -> None:
        if self.record is None:
            return
        workers = [{"pid": p.pid, "start": process_start(p.pid)} for p in self.procs.values()]
        atomic_write(self.record, json.dumps({"serve": os.getpid(), "workers": workers}))

    def check(self) -> None:
        """Restart workers that exited (at most one restart per slot every 2 s)."""
        now = time.monotonic()
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or now - self._restarts.get(slot, 0.0) < 2.0:
                continue
            log.warning("%s worker pid %d exited with status %d; starting another", slot[0],
                        proc.pid, code)
            self._restarts[slot] = now
            if proc.stdin is not None:
                proc.stdin.close()
            self.procs[slot] = self._spawn(slot[0])
            self._write_record()

    def stop(self, timeout_s: float) -> None:
        """SIGINT (Huey's graceful stop: finish the job in hand), then SIGKILL after
        ``timeout_s``; a killed job is retried on the next start."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for slot, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s worker pid %d still busy at shutdown: killed (its job is "
                            "retried on the next start)", slot[0], proc.pid)
                proc.kill()
                proc.wait()
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        if self.record is not None:
            self.record.unlink(missing_ok=True)


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22): with the pid,
    it names one process even after the pid is reused. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_node_worker(pid: int, config: Path | None) -> bool:
    """Whether ``pid`` runs ``python -m node [--config CONFIG] worker ...`` (of ``config``)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    try:
        at = args.index("-m")
    except ValueError:
        return False
    rest = args[at + 1:]
    if rest[:1] != ["node"] or "worker" not in rest:
        return False
    return config is None or str(config) in rest[:rest.index("worker")]


def kill_leftovers(record: Path, config: Path | None, timeout_s: float = 10.0) -> list[int]:
    """Kill the workers a previous ``serve`` recorded in ``record`` that are still alive (the
    same pid and start time, still a ``node worker`` of ``config``), so that nothing of the
    previous run takes jobs beside ours; their jobs in hand are retried by the reaper. Returns
    the pids killed."""
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    killed = []
    for worker in previous.get("workers", []):
        pid, start = int(worker.get("pid", 0)), worker.get("start")
        if pid <= 0 or start is None or process_start(pid) != start:
            continue
        if not is_node_worker(pid, config):
            continue
        log.warning("worker pid %d of a previous serve (pid %s) is still running: killed (its "
                    "job in hand is retried)", pid, previous.get("serve"))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(
            process_start(p) is not None and not _zombie(p) for p in killed):
        time.sleep(0.05)
    record.unlink(missing_ok=True)
    return killed


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
