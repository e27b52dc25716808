"""What a synthnode process sets in pynetdicom for its whole life, once, at its start.

pynetdicom keeps some switches process-wide (``pynetdicom._config``); its own apps set them in
their entry points (``qrscp.py``), and so does the node: each entry point (``synthnode serve``,
``worker``, ``send``) calls :func:`configure_pynetdicom` before anything else runs, and no
library call of the node changes them.
"""

from __future__ import annotations

from pynetdicom import _config

from node.config import NodeSettings


def configure_pynetdicom(node: NodeSettings, *, scp: bool) -> None:
    """Set pynetdicom's process-wide switches for a synthnode process (idempotent).

    Every process: files sent by C-STORE go out as stored, their data set never decoded
    (``STORE_SEND_CHUNKED_DATASET``; :mod:`node.archives.dimse` proposes each file's own
    transfer syntax). With ``scp``, a process that runs the node's Storage SCP (``synthnode
    serve``): the acceptor's throughput adjustments at ``[node] poll_interval_s``
    (:mod:`node.receive.tuning`) and data sets received into files
    (``STORE_RECV_CHUNKED_DATASET``; :mod:`node.receive.chunked`). Not in workers: their C-GET
    keeps each retrieved data set in memory."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    if not scp:
        return
    from node.receive.chunked import receive_chunked
    from node.receive.tuning import tune_pynetdicom

    tune_pynetdicom(node.poll_interval_s)
    receive_chunked()
