"""Two throughput adjustments to pynetdicom's acceptor, applied once at the start of the process
that runs the node's SCP (:mod:`node.process`), never by a library call.

pynetdicom (3.0) moves data between the socket and our handler through two polling loops per
association, and measured here they, not our code, bounded ingest (pynetdicom issues #120 and
#650 discuss the same trade-off):

1. ``AssociationSocket.recv`` reads a PDU 4 KiB per ``recv()`` call, growing a ``bytearray``
   each time: ~1,800 calls and copies for a 7 MB instance. Replaced by ``recv_into`` a buffer
   of the PDU's size, same contract (blocks until ``nr_bytes`` are read or the peer closes,
   returning what arrived; socket timeouts propagate as before).
2. Both loops sleep 1 ms whenever they find nothing to do, so each C-STORE waits up to ~2 ms
   for its request to be noticed and its response to leave. While an association is busy (a
   PDU arrived in the last ``ACTIVE_WINDOW_S``), both now wait at most ``poll_interval_s``, and
   the DUL loop (reading the socket) waits in ``select()`` on its socket instead of sleeping,
   so it wakes the moment data arrives. An idle association keeps pynetdicom's 1 ms pace, so
   it costs no more CPU than before (measured: ~8 % of a core per idle association either way,
   against ~21 % with a fixed 0.2 ms interval). Both loops run in ``threading.Thread``
   subclasses, so the stand-in ``time`` each module sees knows whose sleep it is.

Applied only to the pynetdicom series this was measured on (pinned in pyproject.toml); with
another version the node logs a warning and runs unadjusted.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

MEASURED_SERIES = "3.0."


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from the socket with as few system calls as the network allows."""
    sock = self.socket
    assert sock is not None
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        n = sock.recv_into(view[received:], nr_bytes - received)
        if not n:  # the peer closed the connection: return what we have, as pynetdicom does
            del view
            return buffer[:received]
        received += n
    return buffer


ACTIVE_WINDOW_S = 0.05


def _active(dul: DULServiceProvider) -> bool:
    """Did this association's DUL receive a PDU within the last ``ACTIVE_WINDOW_S``? (pynetdicom
    restarts the DUL's idle timer on every incoming PDU.)"""
    started = getattr(dul._idle_timer, "_start_time", None)
    return started is not None and time.time() - started < ACTIVE_WINDOW_S


class _PollTime:
    """Stands in for ``time`` inside a pynetdicom module: the polling loops' sleeps shorten to
    ``cap_s`` while their association is busy; everything else is the real ``time``."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, Association) and _active(thread.dul):
            seconds = min(seconds, self.cap_s)
        time.sleep(seconds)


class _SocketWaitTime(_PollTime):
    """For ``pynetdicom.dul``: the DUL thread's idle sleep becomes a wait for its socket to be
    readable, bounded by the same interval."""

    def sleep(self, seconds: float) -> None:
        dul = threading.current_thread()
        if not isinstance(dul, DULServiceProvider) or dul.socket is None:
            time.sleep(seconds)
            return
        if _active(dul):
            seconds = min(seconds, self.cap_s)
        sock = dul.socket.socket
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes already
        if sock is not None and sock.fileno() >= 0 and not (pending and pending()):
            try:
                select.select([sock], [], [], seconds)
                return
            except (OSError, ValueError):
                pass  # closed under us: fall back to a plain sleep
        time.sleep(seconds)


def tune_pynetdicom(poll_interval_s: float) -> bool:
    """Apply both adjustments (idempotent); False if this pynetdicom is not the measured one."""
    if not pynetdicom.__version__.startswith(MEASURED_SERIES):
        log.warning(
            "pynetdicom %s is not the %sx series the receive adjustments were measured on: "
            "running without them (slower ingest)", pynetdicom.__version__, MEASURED_SERIES,
        )
        return False
    AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]
    association: ModuleType = pynetdicom.association
    association.time = _PollTime(poll_interval_s)  # type: ignore[attr-defined]
    dul: ModuleType = pynetdicom.dul
    dul.time = _SocketWaitTime(poll_interval_s)  # type: ignore[attr-defined]
    return True
