"""The pynetdicom receive adjustments keep pynetdicom's contract."""

from __future__ import annotations

import socket
import threading

import pynetdicom
from pynetdicom.transport import AssociationSocket

from node.receive.tuning import _recv_whole, tune_pynetdicom


class _Holder:
    """The one attribute of AssociationSocket that recv uses."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_recv_reads_exactly_across_fragments_and_returns_partial_on_close() -> None:
    left, right = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB

    def send() -> None:
        for offset in range(0, len(payload), 1000):  # many small segments
            right.sendall(payload[offset : offset + 1000])
        right.sendall(b"tail")
        right.close()

    sender = threading.Thread(target=send)
    sender.start()
    holder = _Holder(left)
    assert _recv_whole(holder, len(payload)) == payload  # type: ignore[arg-type]
    assert _recv_whole(holder, 100) == b"tail"  # type: ignore[arg-type]
    assert _recv_whole(holder, 100) == b""  # type: ignore[arg-type]
    sender.join()
    left.close()


def test_adjustments_apply_to_the_pinned_pynetdicom() -> None:
    assert pynetdicom.__version__.startswith("3.0.")
    assert tune_pynetdicom(0.0002)
    assert AssociationSocket.recv is _recv_whole
