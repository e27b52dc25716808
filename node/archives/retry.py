"""Retries shared by every destination: rounds over the objects still pending, exponential
backoff between rounds, transient failures retried, permanent ones recorded once.

A *round* offers every pending object to the destination once (one association, or one pass of
HTTP requests). Each object's ``attempts`` counts the rounds it was pending in: when the
destination itself fails (connection refused, association rejected), the objects it did not
get to share that failure and that attempt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from node.config import DispatchSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one attempt at one object gave."""

    ok: bool
    reason: str = ""
    """Why it failed; for a success, a note worth keeping (e.g. already stored), else ""."""
    transient: bool = False
    """A failure that may go away (destination down, busy, timed out): retried."""


def sent(note: str = "") -> Outcome:
    return Outcome(True, note)


def transient(reason: str) -> Outcome:
    return Outcome(False, reason, transient=True)


def permanent(reason: str) -> Outcome:
    return Outcome(False, reason, transient=False)


@dataclass
class Progress:
    """One object's state across rounds."""

    ok: bool = False
    done: bool = False
    attempts: int = 0
    reason: str = ""


def backoff_delays(settings: DispatchSettings) -> Iterator[float]:
    """Seconds to wait before each retry: initial, doubling, capped at ``backoff_max_s``."""
    delay = settings.backoff_initial_s
    while True:
        yield min(delay, settings.backoff_max_s)
        delay = min(delay * 2, settings.backoff_max_s)


RoundFn = Callable[[list[int]], dict[int, Outcome]]
"""Offers the objects at these indices to the destination once; an Outcome for each index."""


def run_rounds(
    count: int,
    attempt_round: RoundFn,
    settings: DispatchSettings,
    *,
    first: dict[int, Outcome] | None = None,
    stop: threading.Event | None = None,
    what: str = "dispatch",
) -> list[Progress]:
    """Run rounds until every object succeeded or failed for good, at most
    ``settings.max_attempts`` rounds per object; backoff starts over after a round with a
    success. ``first`` holds outcomes known before any round (objects that cannot be sent at
    all); ``stop`` set during a wait ends the retries ("cancelled")."""
    progress = [Progress() for _ in range(count)]
    for i, outcome in (first or {}).items():
        progress[i] = Progress(outcome.ok, True, 0, outcome.reason)
    delays = backoff_delays(settings)
    while True:
        pending = [i for i, p in enumerate(progress) if not p.done]
        if not pending:
            return progress
        outcomes = attempt_round(pending)
        any_sent = False
        for i in pending:
            p = progress[i]
            p.attempts += 1
            outcome = outcomes.get(i) or transient("not attempted")
            p.reason = outcome.reason
            if outcome.ok:
                p.ok = p.done = any_sent = True
            elif not outcome.transient:
                p.done = True
            elif p.attempts >= settings.max_attempts:
                p.done = True
                p.reason = f"{outcome.reason} (gave up after {p.attempts} attempts)"
        left = sum(1 for p in progress if not p.done)
        if not left:
            return progress
        if any_sent:
            delays = backoff_delays(settings)
        delay = next(delays)
        log.info("%s: %d object(s) to retry in %.1f s", what, left, delay)
        if (stop or threading.Event()).wait(delay):
            for p in progress:
                if not p.done:
                    p.done, p.reason = True, f"{p.reason} (cancelled before retrying)"
            return progress
