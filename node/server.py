"""``synthnode serve``: start-up, main loop and graceful shutdown (the uvicorn Server shape).

Start-up: recover the spool (before any port opens), start the worker processes
(``[jobs] cpu_workers``, ``gpu_workers``), the job scheduler and the stability monitor (stable
studies -> rules -> jobs), listen.
Shutdown on SIGTERM/SIGINT: stop accepting associations, let in-flight ones finish (up to
``shutdown_timeout_s``, then abort them: nothing unacknowledged is lost, the peer resends),
stop the monitor and the scheduler, let workers finish the job in hand (up to
``shutdown_timeout_s``, then kill them: their jobs are retried on the next start), close the
index, return 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from node import __version__
from node.config import Settings
from node.jobs import Queues, Reaper, WorkerPool
from node.receive.scp import ReceiveCounters, peer_name, start_scp
from node.route import Router
from node.spool import Retention, Spool, StabilityMonitor
from node.spool.reserve import DiskReserve

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        try:
            spool = Spool(self.settings.spool)
            removed, added = spool.recover()
            if removed or added:
                log.info(
                    "spool recovered: %d partial files removed, %d instances re-indexed",
                    removed, added,
                )
            queues = Queues(self.settings.jobs)
            pool = WorkerPool(self.settings, self.config)
            pool.start()
            monitor = StabilityMonitor(
                spool, Router(self.settings, queues).on_stable,
                also=(Reaper(self.settings.jobs, queues).tick,
                      Retention(spool, queues.store).tick),
            )
            monitor.start()
            node = self.settings.node
            server = start_scp(node, spool, self.counters,
                               DiskReserve.for_settings(self.settings))
            host, port = server.server_address[:2]
            log.info(
                "synthnode %s listening as %s on %s:%d, spool %s, %d rules, queues on %s",
                __version__, node.ae_title, host, port, spool.dir, len(self.settings.rules),
                self.settings.jobs.backend.value,
            )
            try:
                while not self.should_exit.wait(0.5):
                    pool.check()
            finally:
                self._shutdown(server, monitor, spool, pool)
        finally:
            self._restore_signals()
        return 0

    def _shutdown(self, server: Any, monitor: StabilityMonitor, spool: Spool,
                  pool: WorkerPool) -> None:
        log.info("shutting down: no new associations")
        server.shutdown()  # closes the listening socket; accepted associations continue
        deadline = time.monotonic() + self.settings.node.shutdown_timeout_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = server.active_associations
        for assoc in left:
            log.warning("aborting association from %s at shutdown timeout", peer_name(assoc))
            assoc.abort()
        monitor.stop()
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
