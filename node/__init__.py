"""synthnode: a DICOM node that makes de-identified and synthetic counterparts of studies.

Data flows one way through the subpackages, and a stage imports only the stages after it::

    receive (DIMSE SCP) -> spool (durable files + index; hands stable studies on)
        -> route (rules; studies an Orthanc hands over; backfill) -> jobs (queues, records,
        workers) -> deid | generate (make a task's outputs) -> dicom (SC writer, UIDs,
        validation) -> archives (where a study comes from and goes: Orthanc REST, DICOM
        peers, DICOMweb; one module per kind with its send, find and fetch)

Shared by every stage: ``config`` (settings, validated once), ``uids``, ``tls``, ``keys``.

The library only adds a NullHandler; the command line configures logging.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
