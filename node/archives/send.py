"""Sending by destination name: what rules and ``synthnode send --to`` name."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from node.archives.dimse import send_to_peer
from node.archives.orthanc import send_to_orthanc
from node.archives.outgoing import DispatchResult, ObjectLike
from node.config import DicomDestination, Settings


def send_to(
    objects: Sequence[ObjectLike], name: str, settings: Settings, job_id: str, task: str,
    stop: threading.Event | None = None, calling_aet: str | None = None,
) -> list[DispatchResult]:
    """Send ``objects`` to the destination called ``name``: "orthanc" (``[orthanc]``) or a
    ``[[destinations]]`` entry, an Orthanc (REST, marked with ``job_id`` and ``task``) or a
    DICOM peer (C-STORE as ``calling_aet``). KeyError naming the known ones for another name."""
    if name != "orthanc":
        destination = settings.destination(name)
        if isinstance(destination, DicomDestination):
            return send_to_peer(objects, destination, settings, calling_aet, stop=stop)
    return send_to_orthanc(objects, settings, job_id, task, stop=stop,
                           orthanc=settings.orthanc_named(name))
