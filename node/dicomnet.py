"""The node's DICOM application entities, built one way for every stage that opens or accepts
associations (receive, archives, the command line, preflight)."""

from __future__ import annotations

from pynetdicom import AE

from node.config import NodeSettings


def make_ae(ae_title: str, node: NodeSettings, timeout_s: float | None = None) -> AE:
    """An application entity named ``ae_title`` with ``[node]``'s timeouts: connecting (TCP,
    as a requestor) and ACSE ``acse_timeout_s``, DIMSE ``dimse_timeout_s``, network
    ``network_timeout_s``; or every one of them ``timeout_s`` when given (a probe such as
    ``synthnode echo``). No presentation contexts yet: the caller adds its own."""
    ae = AE(ae_title=ae_title)
    if timeout_s is not None:
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = timeout_s
        ae.network_timeout = timeout_s
        return ae
    ae.connection_timeout = node.acse_timeout_s
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    return ae
