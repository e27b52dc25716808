"""Workers: ``synthnode worker --queue cpu|gpu`` (a Huey consumer running :class:`Runner`), and
the pool of such processes that ``synthnode serve`` starts and restarts.

Each worker is its own process: a ``kill -9`` takes one job with it, which the reaper (its
heartbeat check) retries; the pool starts a new process in its place.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from node.config import ENV_CONFIG, Settings
from node.jobs.queue import QUEUES, Queues
from node.jobs.runner import Runner

log = logging.getLogger(__name__)

NICE = 5
"""Niceness that ``serve``'s worker processes add to their own."""


def run_worker(settings: Settings, queue: str, workers: int = 1, nice: int = 0) -> int:
    """Consume ``queue`` until SIGINT (finish the jobs in hand, then stop) or SIGTERM (stop
    now: the jobs in hand are retried elsewhere), at ``nice`` more niceness. Returns the exit
    status."""
    if queue not in QUEUES:
        raise ValueError(f'queue "{queue}" is not one of {", ".join(QUEUES)}')
    if nice:
        os.nice(nice)
    runner: Runner | None = None

    def run(job_id: str) -> None:
        assert runner is not None
        runner.run(job_id)

    queues = Queues(settings.jobs, run=run)
    runner = Runner(settings, queues)
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

    def __init__(self, settings: Settings, config: Path | None) -> None:
        self.settings = settings
        self.config = config
        self.wanted = {"cpu": settings.jobs.cpu_workers, "gpu": settings.jobs.gpu_workers}
        self.procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self._restarts: dict[tuple[str, int], float] = {}

    def _spawn(self, queue: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.config is not None:
            env[ENV_CONFIG] = str(self.config)
        # Beside the receiver, workers yield the CPU to it: a C-STORE is answered first, the
        # queue catches up when the senders pause.
        cmd = [sys.executable, "-m", "node", "worker", "--queue", queue, "--nice", str(NICE)]
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        for queue, count in self.wanted.items():
            for n in range(count):
                self.procs[(queue, n)] = self._spawn(queue)
        if self.procs:
            log.info("started workers: %s", ", ".join(
                f"{q} pid {p.pid}" for (q, _), p in sorted(self.procs.items())))

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
            self.procs[slot] = self._spawn(slot[0])

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
