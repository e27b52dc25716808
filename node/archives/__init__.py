"""Dispatch: every object the node produces leaves through here, to Orthanc over REST or to any
DICOM peer by C-STORE, with retries of transient failures (``[dispatch]``) and one
:class:`DispatchResult` per object.

Logs and results name SOP Instance UIDs, job ids and AE titles, never patient data.
"""

from node.archives.dimse import PeerDispatcher, send_to_peer
from node.archives.orthanc import OrthancDispatcher, orthanc_client, send_to_orthanc
from node.archives.outgoing import DispatchResult, ObjectLike, Outgoing
from node.archives.send import send_to

__all__ = [
    "DispatchResult",
    "ObjectLike",
    "OrthancDispatcher",
    "Outgoing",
    "orthanc_client",
    "PeerDispatcher",
    "send_to",
    "send_to_orthanc",
    "send_to_peer",
]

