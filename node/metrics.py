"""Prometheus metrics of every process of a node (serve, its workers), gathered at ``/metrics``.

SKELETON: the signatures below are the interface the receiver, the runner and the console
call; their bodies are filled in by the metrics work (h3) before this reaches a release.
"""

from __future__ import annotations

from pathlib import Path


def setup(directory: Path) -> None:
    """Make this process (and the workers it starts later) record into ``directory``
    (prometheus-client's multiprocess mode); serve calls it first, emptying the folder."""


def received(status: str, nbytes: int = 0) -> None:
    """One instance received (C-STORE or STOW-RS) with its outcome: "stored", "duplicate",
    "refused", "failed", "below_reserve"."""


def association(outcome: str) -> None:
    """One association: "accepted", "rejected", "aborted"."""


def job_finished(task: str, state: str, seconds: float) -> None:
    """A job attempt ended in ``state`` (done, review, pending (retry), dead) after
    ``seconds``."""


def delivered(destination: str, objects: int, ok: bool) -> None:
    """``objects`` sent to ``destination`` (ok) or not delivered (failed)."""


def quarantined(kind: str, count: int = 1) -> None:
    """``count`` instances or outputs quarantined; ``kind`` is a short fixed word (e.g.
    "deid", "validation", "copy", "burned_in"), never a free text."""
