"""Query/Retrieve from a DICOM peer (a PACS), for backfill: C-FIND at study, series and image
level (Study Root), and C-GET of one series into a folder, files stored as received.

C-GET brings the instances back on the same association (the node needs no address the PACS
knows, unlike C-MOVE); the storage contexts proposed are the SOP classes the series holds
(an image-level C-FIND says which), each with every transfer syntax pydicom knows, in the SCP
role.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind as FIND,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet as GET,
)

from node.archives.dimse import TLSArgs, open_association, tls_args
from node.config import DicomDestination, NodeSettings
from node.tls import TLSError

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)


class QueryError(Exception):
    """The peer could not be queried or retrieved from; the message says why (no patient
    data: AE titles, UIDs and status codes)."""


class Peer:
    """One DICOM peer to query and retrieve from, as ``[node] ae_title``."""

    def __init__(self, destination: DicomDestination, node: NodeSettings) -> None:
        if not isinstance(destination, DicomDestination):
            raise QueryError(f'"{destination.name}" is not a DICOM peer')
        self.ae_title, self.host, self.port = destination.ae_title, destination.host, (
            destination.port)
        self.destination = destination
        self.node = node
        self.name = f"{self.ae_title}@{self.host}:{self.port}"
        try:
            self._tls: TLSArgs | None = tls_args(destination, node)
        except TLSError as exc:
            raise QueryError(str(exc)) from None

    def _ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.connection_timeout = self.node.acse_timeout_s
        ae.acse_timeout = self.node.acse_timeout_s
        ae.dimse_timeout = self.node.dimse_timeout_s
        ae.network_timeout = self.node.network_timeout_s
        return ae

    def _associate(self, ae: AE, ext_neg: list[Any] | None = None,
                   evt_handlers: list[Any] | None = None) -> Association:
        assoc, why = open_association(ae, self.destination, self._tls, ext_neg=ext_neg,
                                      evt_handlers=evt_handlers)
        if assoc is None or not assoc.is_established:
            raise QueryError(f"association with {self.name} failed: {why}")
        return assoc

    # -- C-FIND --------------------------------------------------------------------------

    def find(self, level: str, **keys: object) -> list[Dataset]:
        """Every match of a Study Root C-FIND at ``level`` (STUDY, SERIES, IMAGE); ``keys``
        are the attributes sent (matching values, or "" to have them returned)."""
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        ae = self._ae()
        ae.add_requested_context(FIND)
        assoc = self._associate(ae)
        found = []
        try:
            for status, identifier in assoc.send_c_find(query, FIND):
                code = int(status.Status) if status else -1
                if code in _PENDING and identifier is not None:
                    found.append(identifier)
                elif code == 0:
                    break
                else:
                    raise QueryError(f"C-FIND at {self.name} ({level}) failed: status "
                                     f"{code:#06x}" if code >= 0 else "no answer")
        finally:
            assoc.release()
        return found

    def studies(self, since: datetime.date, until: datetime.date | None
                ) -> list[tuple[str, str, int]]:
        """(Study Instance UID, Study Date, instances) of the studies in the date range,
        oldest first."""
        span = f"{since:%Y%m%d}-{until:%Y%m%d}" if until else f"{since:%Y%m%d}-"
        found = self.find("STUDY", StudyInstanceUID="", StudyDate=span,
                          NumberOfStudyRelatedInstances="")
        rows = [(str(d.StudyInstanceUID), str(d.get("StudyDate", "")),
                 int(d.get("NumberOfStudyRelatedInstances") or 0)) for d in found]
        return sorted(rows, key=lambda r: (r[1], r[0]))

    def series(self, study_uid: str) -> list[Dataset]:
        """The study's series with what rules look at (a stand-in header per series)."""
        return self.find("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                         Modality="", SeriesDescription="", BodyPartExamined="",
                         SeriesNumber="", NumberOfSeriesRelatedInstances="")

    # -- C-GET ---------------------------------------------------------------------------

    def get_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Retrieve one series into ``folder`` (``<SOP Instance UID>.dcm``, as received)."""
        classes = sorted({str(d.SOPClassUID) for d in self.find(
            "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
            SOPInstanceUID="", SOPClassUID="")})
        if not classes:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        ae = self._ae()
        ae.add_requested_context(GET)
        for sop_class in classes[:127]:
            ae.add_requested_context(sop_class, list(AllTransferSyntaxes))
        received: list[Path] = []

        def on_store(event: evt.Event) -> int:
            sop = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
            target = folder / f"{sop}.dcm"
            try:
                tmp = target.with_suffix(".part")
                tmp.write_bytes(event.encoded_dataset())
                os.replace(tmp, target)
            except OSError as exc:
                log.warning("C-GET from %s: instance %s not written: %s", self.name, sop,
                            exc.strerror)
                return 0xA700
            received.append(target)
            return 0x0000

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        assoc = self._associate(ae, ext_neg=[build_role(c, scp_role=True) for c in classes],
                                evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            final = -1
            for status, _identifier in _responses(assoc, query):
                final = int(status.Status) if status else -1
            if final != 0:
                raise QueryError(f"C-GET of series {series_uid} from {self.name}: "
                                 + (f"status {final:#06x}" if final >= 0 else "no answer"))
        finally:
            assoc.release()
        return received


def _responses(assoc: Association, query: Dataset) -> Iterator[tuple[Dataset, Dataset | None]]:
    yield from assoc.send_c_get(query, GET)
