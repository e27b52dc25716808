"""What a synthnode process sets in pynetdicom and torch for its whole life, once, at its start.

pynetdicom keeps some switches process-wide (``pynetdicom._config``); its own apps set them in
their entry points (``qrscp.py``), and so does the node: each entry point (``synthnode serve``,
``worker``, ``send``) calls :func:`configure_pynetdicom` before anything else runs, and a
process that runs the diffusion pipelines (a gpu-queue worker, ``synthnode generate``) calls
:func:`configure_torch`; no library call of the node changes them.
"""

from __future__ import annotations

from pynetdicom import _config

from node.config import GenerateSettings, NodeSettings


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


def configure_torch(generate: GenerateSettings) -> None:
    """Set torch's process-wide switches for a process that runs the pipelines on a CUDA GPU
    (nothing changes with ``[generate] device = "cpu"`` or without CUDA): cuDNN picks the
    fastest convolution algorithm for each shape; with ``[generate] compile``, inductor runs
    1x1 convolutions (the attention blocks' projections) as matrix products."""
    if generate.device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = True
    if generate.compile:
        import torch._inductor.config

        torch._inductor.config.conv_1x1_as_mm = True
