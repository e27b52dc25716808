"""``synthnode serve``: start-up, main loop and graceful shutdown (the uvicorn Server shape).

Start-up: recover the spool (before any port opens), start the stability monitor, listen.
Shutdown on SIGTERM/SIGINT: stop accepting associations, let in-flight ones finish (up to
``shutdown_timeout_s``, then abort them: nothing unacknowledged is lost, the peer resends),
stop the monitor, close the index, return 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from node import __version__
from node.config import Settings
from node.receive.scp import ReceiveCounters, start_scp
from node.spool import Spool, StabilityMonitor, StableStudyHandler, log_stable_study

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server:
    """The node's long-running process."""

    def __init__(self, settings: Settings, handler: StableStudyHandler = log_stable_study) -> None:
        self.settings = settings
        self.handler = handler
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
            monitor = StabilityMonitor(spool, self.handler)
            monitor.start()
            node = self.settings.node
            server = start_scp(node, spool, self.counters)
            host, port = server.server_address[:2]
            log.info(
                "synthnode %s listening as %s on %s:%d, spool %s",
                __version__, node.ae_title, host, port, spool.dir,
            )
            try:
                while not self.should_exit.wait(0.5):
                    pass
            finally:
                self._shutdown(server, monitor, spool)
        finally:
            self._restore_signals()
        return 0

    def _shutdown(self, server: Any, monitor: StabilityMonitor, spool: Spool) -> None:
        log.info("shutting down: no new associations")
        server.shutdown()  # closes the listening socket; accepted associations continue
        deadline = time.monotonic() + self.settings.node.shutdown_timeout_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = server.active_associations
        for assoc in left:
            log.warning("aborting association from %s at shutdown timeout",
                        assoc.requestor.ae_title)
            assoc.abort()
        monitor.stop()
        spool.close()
        c = self.counters
        log.info(
            "stopped: %d stored, %d duplicates, %d refused, %d failed over %d associations",
            c.stored, c.duplicates, c.rejected, c.failed, c.associations,
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
