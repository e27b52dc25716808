"""A thread that does one pass of something every so often, until stopped."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)


class Periodic(ABC):
    """Runs :meth:`tick` every ``interval_s`` on its own daemon thread, from :meth:`start` to
    :meth:`stop`; a pass that fails is logged and the next one runs as planned."""

    def __init__(self, name: str, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @abstractmethod
    def tick(self, now: float | None = None) -> object:
        """One pass."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("%s: pass failed; retrying on the next one", self._thread.name)
            self._stop.wait(self.interval_s)
