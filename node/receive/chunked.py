"""Receiving C-STORE data sets straight into files in the spool's temporary folder.

pynetdicom's ``_config.STORE_RECV_CHUNKED_DATASET`` writes each incoming data set fragment by
fragment to a temporary file (preamble, file meta, data set) instead of memory, so a 1 GB
instance costs the receiver a PDU's worth of memory, not a gigabyte (and not two: the bytes
are never joined). pynetdicom creates that file in the process's default temporary folder;
here it goes into the spool's own ``.tmp`` (same file system, so the spool renames it into
place; emptied at every start). While the disk reserve is short nothing is written at all: the
data set goes to a sink and the handler refuses it, so refused instances cannot eat the
reserve the spool's own writes need.

The spool folder of each SCP is found through the association's application entity, so several
SCPs in one process (tests) each write into their own spool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pynetdicom.dimse_messages
from pynetdicom import AE, _config
from pynetdicom.dul import DULServiceProvider

from node.reserve import DiskReserve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiveTarget:
    """Where one SCP's incoming data sets are written, and the reserve that gates it."""

    tmp_dir: Path
    reserve: DiskReserve | None = None


_targets: weakref.WeakKeyDictionary[AE, ReceiveTarget] = (
    weakref.WeakKeyDictionary())
_real_temporary_file = tempfile.NamedTemporaryFile


class Incoming:
    """Stands in for pynetdicom's temporary file: the data set as it arrives, in a file in the
    spool's temporary folder written without buffering (``flush`` has nothing to do), or, while
    the disk reserve is short, nowhere (``refused``). A failed write (the disk filled up) is
    kept in ``error`` and the file emptied at once; pynetdicom goes on receiving and the handler
    answers the failure."""

    def __init__(self, tmp_dir: Path, refused: bool) -> None:
        self.refused = refused
        self.error: OSError | None = None
        self.file = self  # pynetdicom flushes ``.file``
        self._fd = -1
        # An abort closes the file from another thread (discard_partial) while the receiving
        # thread may be writing: never write to a descriptor closed (and maybe reused) meanwhile.
        self._lock = threading.Lock()
        self.name = str(tmp_dir / f"unmade-{uuid.uuid4().hex}.dcm")  # until made
        if not refused:
            try:
                self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=tmp_dir)
            except OSError as exc:
                self.error = exc

    def write(self, data: bytes) -> int:
        with self._lock:
            if self._fd < 0 or self.error is not None:
                return len(data)
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self.error = exc
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)  # give the space back now, not at close
            return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _target() -> ReceiveTarget | None:
    thread = threading.current_thread()  # pynetdicom decodes P-DATA on the DUL's thread
    if not isinstance(thread, DULServiceProvider):
        return None
    ae = getattr(thread.assoc, "ae", None)
    return _targets.get(ae) if ae is not None else None


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    target = _target()
    if target is None:  # another SCP in this process: pynetdicom's own behaviour
        return _real_temporary_file(*args, **kwargs)
    short = target.reserve is not None and target.reserve.shortfall() is not None
    return Incoming(target.tmp_dir, refused=short)


def receive_chunked() -> None:
    """Process-wide, once, at the start of a process that runs the node's SCP (see
    :mod:`node.process`): pynetdicom's chunked-receive switch, and its temporary files made
    here. Every pynetdicom SCP in the process (a C-GET's storage sub-operations included) then
    gets its data sets as files (``event.dataset_path``), not in memory; those of an SCP given
    to :func:`receive_into` land in its spool."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    messages: ModuleType = pynetdicom.dimse_messages
    messages.NamedTemporaryFile = _temporary_file  # type: ignore[attr-defined]


def receives_chunked() -> bool:
    """Whether this process was set up by :func:`receive_chunked`."""
    messages: ModuleType = pynetdicom.dimse_messages
    return bool(_config.STORE_RECV_CHUNKED_DATASET) and (
        getattr(messages, "NamedTemporaryFile", None) is _temporary_file)


def receive_into(ae: AE, target: ReceiveTarget) -> None:
    """From now on, data sets ``ae`` receives are written into ``target.tmp_dir``.
    RuntimeError when the process was not set up for it (:func:`receive_chunked`)."""
    if not receives_chunked():
        raise RuntimeError("receiving data sets into files needs the process set up for it "
                           "at its start: call node.process.configure_pynetdicom(settings.node, "
                           "scp=True) first, or start the listeners with chunked=False")
    _targets[ae] = target


def dataset_offset(fd: int) -> int:
    """Where the data set begins in a file pynetdicom wrote: after the 128-byte preamble,
    ``DICM`` and the file meta, whose (0002,0000) group length it always writes first."""
    head = os.pread(fd, 144, 0)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a DICOM file with a file meta group length")
    (length,) = struct.unpack_from("<L", head, 140)
    return 144 + int(length)


def discard_partial(dimse_message: object) -> None:
    """Remove the temporary file of a data set whose association ended before it was
    complete (it would stay in the spool's ``.tmp`` until the next start otherwise)."""
    f = getattr(dimse_message, "_data_set_file", None)
    if isinstance(f, Incoming):
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(f.name)
