"""synthnode: a DICOM node that makes de-identified and synthetic counterparts of studies.

Data flows one way through the subpackages::

    receive (DIMSE SCP) -> spool (durable files + index) -> ... later stages

The library only adds a NullHandler; the command line configures logging.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
