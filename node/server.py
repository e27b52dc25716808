"""``synthnode serve``: start-up, main loop and graceful shutdown (the uvicorn Server shape).

Start-up: lock the spool (one node per spool; a second ``serve`` stops at once), the preflight
(:mod:`node.preflight`; a fatal problem stops the start here, before anything runs), kill
workers a previous run left alive, recover the spool (before any port opens), listen (a port in
use stops the start here, before any worker exists), then start the worker processes (``[jobs]
cpu_workers``, ``gpu_workers``), the stability monitor (stable studies -> rules -> jobs) and,
on a thread of its own, the schedule (the job reaper and the spool's retention). Fatal start
problems print one line naming the fix and return 2.
Shutdown on SIGTERM/SIGINT: stop accepting associations, let in-flight ones finish (up to
``shutdown_timeout_s``, then abort them: nothing unacknowledged is lost, the peer resends),
stop the monitor and the schedule, let workers finish the job in hand (up to
``shutdown_timeout_s``, then kill them: their jobs are retried on the next start), close the
index, return 0.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from node import __version__, metrics
from node.audit import config_hash, trail_for
from node.audit import record as audit_record
from node.config import Settings
from node.console.context import ConsoleContext
from node.console.web import Console, ConsoleError
from node.jobs import Queues, Reaper, WorkerPool
from node.jobs.worker import WORKERS_NAME, kill_leftovers
from node.periodic import Periodic
from node.preflight import startup_check
from node.receive.scp import (
    ListenError,
    NodeServer,
    ReceiveCounters,
    peer_name,
    start_listeners,
)
from node.reserve import DiskReserve
from node.route import Router
from node.spool import Retention, Spool, SpoolInUse, SpoolLock, StabilityMonitor
from node.tls import TLSError

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartError(Exception):
    """A problem that stops ``serve`` before it starts; the message names the fix."""


def _listen_error(exc: ListenError) -> StartError | None:
    where = f"port {exc.port} on {exc.host}"
    code = exc.error.errno
    if code == errno.EADDRINUSE:
        return StartError(f"{where} is in use (another DICOM server?): stop it or set "
                          f"{exc.setting}")
    if code == errno.EACCES:
        return StartError(f"{where}: permission denied (ports below 1024 need root or "
                          f"CAP_NET_BIND_SERVICE): set {exc.setting}")
    if code == errno.EADDRNOTAVAIL:
        return StartError(f"{where}: {exc.host} is not an address of this machine: set "
                          "[node] host")
    return None


class Schedule(Periodic):
    """A thread that runs ``tasks`` (the job reaper, the spool's retention) with the time, every
    ``interval_s``: apart from the stability monitor, so that a slow job store (Redis) delays
    them, never a stable study's hand-off. A task that fails is logged and run again on the
    next pass."""

    def __init__(self, interval_s: float, tasks: Sequence[Callable[[float], object]]) -> None:
        super().__init__("schedule", interval_s)
        self.tasks = tuple(tasks)

    def tick(self, now: float | None = None) -> None:
        """One pass of every task."""
        now = time.time() if now is None else now
        for task in self.tasks:
            try:
                task(now)
            except Exception:
                log.exception("periodic task %s failed; retrying on the next pass",
                              getattr(task, "__qualname__", task))


class Server:
    """The node's long-running process."""

    def __init__(self, settings: Settings, config: Path | None = None) -> None:
        self.settings = settings
        self.config = config
        self.counters = ReceiveCounters()
        self.should_exit = threading.Event()
        self._saved: dict[int, Any] = {}

    def run(self) -> int:
        """Serve until a signal asks us to stop; return the process exit status."""
        self._capture_signals()
        lock = SpoolLock(self.settings.spool.dir)
        try:
            return self._run(lock)
        except StartError as exc:
            print(f"synthnode serve: {exc}", file=sys.stderr)
            return 2
        finally:
            lock.release()
            self._restore_signals()

    def _run(self, lock: SpoolLock) -> int:
        # 1. One node per spool, checked before anything else, and nothing of a previous run
        #    left taking jobs.
        try:
            lock.acquire()
        except SpoolInUse as exc:
            raise StartError(str(exc)) from None
        # 2. The preflight: a fatal problem (a missing, weak or changed key, an Orthanc that
        #    refuses us, a generation model missing or damaged, ...) stops the start before
        #    anything runs. The model is checked from its files (configs, weight files, their
        #    headers and lengths), not loaded: serve never generates, its GPU workers load it.
        #    Ports are not probed here: binding them below says the same, before any worker
        #    starts.
        if not startup_check(self.settings, ports=False):
            return 2
        # Metrics of this process and of the workers it starts (they inherit the folder),
        # summed at /metrics; emptied here: counters start at 0 with the process.
        metrics.setup(self.settings.console.db.parent / "metrics")
        audit_record(self.settings, "config", "node", str(self.config or "(embedded default)"),
                     sha256=config_hash(self.config), version=__version__, process="serve")
        record = lock.dir / WORKERS_NAME
        kill_leftovers(record, self.config)
        # 3. Recover the spool before any port opens.
        spool = Spool(self.settings.spool)
        removed, added = spool.recover()
        if removed or added:
            log.info(
                "spool recovered: %d partial files removed, %d instances re-indexed",
                removed, added,
            )
        # 4. Listen before any worker starts: a port in use stops the start here.
        node = self.settings.node
        try:
            servers = start_listeners(node, spool, self.counters,
                                      DiskReserve.for_settings(self.settings),
                                      audit_settings=self.settings)
        except (ListenError, TLSError) as exc:
            spool.close()
            error = _listen_error(exc) if isinstance(exc, ListenError) else StartError(str(exc))
            if error is None:
                raise
            raise error from None
        # 5. Workers, the stability monitor and the schedule.
        queues = Queues(self.settings.jobs, trail=trail_for(self.settings))
        pool = WorkerPool(self.settings, self.config, record)
        monitor = StabilityMonitor(spool, Router(self.settings, queues).on_stable)
        schedule = Schedule(self.settings.spool.check_interval_s, (
            Reaper(self.settings.jobs, queues).tick, Retention(spool, queues.store).tick))
        console: Console | None = None
        try:
            console = self._console(spool, queues)
            if console is not None:
                console.start()
            pool.start()
            monitor.start()
            schedule.start()
            ports = ", ".join(f"{s.server_address[0]}:{s.server_address[1]}"
                              + (" (TLS)" if s.is_tls else "") for s in servers)
            log.info(
                "synthnode %s listening as %s on %s, spool %s, %d rules, queues on %s",
                __version__, node.ae_title, ports, spool.dir, len(self.settings.rules),
                self.settings.jobs.backend.value,
            )
            while not self.should_exit.wait(0.5):
                pool.check()
        except ConsoleError as exc:
            raise StartError(str(exc)) from None
        finally:
            if console is not None:
                console.stop()
            self._shutdown(servers, monitor, schedule, spool, pool)
        return 0

    def _console(self, spool: Spool, queues: Queues) -> Console | None:
        """The operator console (``[console] enabled``), not started yet."""
        if not self.settings.console.enabled:
            return None
        ctx = ConsoleContext(self.settings, self.config, spool, queues, self.counters,
                             trail_for(self.settings))
        return Console(ctx)

    def _shutdown(self, servers: list[NodeServer], monitor: StabilityMonitor,
                  schedule: Schedule, spool: Spool, pool: WorkerPool) -> None:
        log.info("shutting down: no new associations")
        for server in servers:
            server.shutdown()  # closes the listening socket; accepted associations continue
        deadline = time.monotonic() + self.settings.node.shutdown_timeout_s
        while any(s.active_associations for s in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [assoc for s in servers for assoc in s.active_associations]
        for assoc in left:
            log.warning("aborting association from %s at shutdown timeout", peer_name(assoc))
            assoc.abort()
        monitor.stop()
        schedule.stop()
        pool.stop(self.settings.node.shutdown_timeout_s)
        spool.close()
        c = self.counters
        log.info(
            "stopped: %d stored, %d duplicates, %d refused, %d failed, %d refused below the disk "
            "reserve over %d associations",
            c.stored, c.duplicates, c.rejected, c.failed, c.below_reserve, c.associations,
        )

    def _capture_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in HANDLED_SIGNALS:
            self._saved[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        self._saved.clear()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit.is_set():
            return
        log.info("received %s", signal.Signals(sig).name)
        self.should_exit.set()
