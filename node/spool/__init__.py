"""Durable spool of received instances: files by UID, an index, and the stable-study hand-off."""

from node.spool.index import InstanceRow, StudyState, StudySummary
from node.spool.lock import SpoolInUse, SpoolLock
from node.spool.monitor import StabilityMonitor, log_stable_study
from node.spool.retention import Retention
from node.spool.spool import (
    HandedOn,
    Spool,
    SpoolError,
    StableStudy,
    StableStudyHandler,
    StoreOutcome,
)

__all__ = [
    "HandedOn",
    "InstanceRow",
    "Retention",
    "Spool",
    "SpoolError",
    "SpoolInUse",
    "SpoolLock",
    "StabilityMonitor",
    "StableStudy",
    "StableStudyHandler",
    "StoreOutcome",
    "StudyState",
    "StudySummary",
    "log_stable_study",
]
