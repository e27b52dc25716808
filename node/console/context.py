"""What the console's routes share: the settings, the spool, the queues, the receive counters,
the audit trail and how a request is authenticated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from starlette.requests import Request

from node.audit import AuditTrail
from node.config import Settings
from node.jobs import Queues
from node.receive.scp import ReceiveCounters
from node.spool import Spool


class Role(StrEnum):
    """What a console user may do; each role may do what the ones before it may."""

    VIEWER = "viewer"
    """Sees counts, states, UIDs and job ids: never images or patient data."""
    REVIEWER = "reviewer"
    """Also sees the outputs held for review (de-identified or synthetic), approves and rejects
    them, and may upload by STOW-RS."""
    ADMIN = "admin"
    """Also sees quarantined images (identifiable data), releases or discards them, manages
    users."""

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    via: str = "session"
    """How the request was authenticated: "session", "basic", "header" (single sign-on)."""


@dataclass
class ConsoleContext:
    settings: Settings
    config: Path | None
    spool: Spool
    queues: Queues
    counters: ReceiveCounters
    audit: AuditTrail | None
    authenticate: Callable[[Request], User | None] = field(default=lambda request: None)
    """The request's user (session cookie, HTTP Basic, or the trusted proxy header); None when
    it carries none that holds. Set by the app (node.console.app)."""
