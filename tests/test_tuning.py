"""The pynetdicom receive adjustments keep pynetdicom's contract, and each kind of process gets
pynetdicom's process-wide switches at its start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pynetdicom
from pynetdicom.transport import AssociationSocket

from node.receive.tuning import _recv_whole, tune_pynetdicom

ROOT = Path(__file__).resolve().parent.parent


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


def test_process_set_up_is_what_each_kind_of_process_gets(tmp_path: Path) -> None:
    # A fresh interpreter: these switches are process-wide.
    code = f"""
from pynetdicom import _config
from pynetdicom.transport import AssociationSocket
from node.config import NodeSettings, SpoolSettings
from node.process import configure_pynetdicom
from node.receive import start_scp
from node.receive.chunked import receives_chunked
from node.receive.tuning import _recv_whole
from node.spool import Spool

def state():
    print(_config.STORE_SEND_CHUNKED_DATASET, receives_chunked(),
          AssociationSocket.recv is _recv_whole)

state()
try:
    start_scp(NodeSettings(), Spool(SpoolSettings(dir={str(tmp_path)!r})))
except RuntimeError as exc:
    print(exc)
configure_pynetdicom(NodeSettings(), scp=False)  # a worker, synthnode send
state()
configure_pynetdicom(NodeSettings(), scp=True)  # synthnode serve
state()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = out.stdout.splitlines()
    assert lines[0] == "False False False"
    assert "call node.process.configure_pynetdicom(settings.node, scp=True) first" in lines[1]
    assert lines[2:] == ["True False False", "True True True"]
