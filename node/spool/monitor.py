"""The stability monitor: declares studies stable and hands them to the next stage."""

from __future__ import annotations

import logging
import time

from node.periodic import Periodic
from node.spool.spool import HandedOn, Spool, StableStudy, StableStudyHandler

log = logging.getLogger(__name__)


def log_stable_study(study: StableStudy) -> HandedOn | None:
    """The hand-off used until a later stage is plugged in: one log line (UIDs and counts)."""
    log.info(
        "study stable study_uid=%s revision=%d series=%d instances=%d",
        study.study_uid, study.revision, len(study.series_uids), len(study.instances),
    )
    return None


class StabilityMonitor(Periodic):
    """A thread that, every ``check_interval_s``, marks quiet studies stable and hands stable
    studies to ``handler``, and does nothing else (nothing slower can delay a hand-off). State
    lives in the spool index, so it survives restarts: a study that was stable before a crash
    is handed on after it, unless it was handed already."""

    def __init__(self, spool: Spool, handler: StableStudyHandler = log_stable_study) -> None:
        super().__init__("stability-monitor", spool.settings.check_interval_s)
        self.spool = spool
        self.handler = handler

    def tick(self, now: float | None = None) -> int:
        """One pass; returns the number of studies handed on."""
        now = time.time() if now is None else now
        self.spool.mark_stable(now)
        return self.spool.hand_off(self.handler)
