"""A DICOM peer (a PACS): send by C-STORE; find by C-FIND at study, series and image level
(Study Root); fetch by C-GET of each series into a folder, files stored as received.

C-STORE: one association per round, each object in its own transfer syntax.

For every (SOP Class, Transfer Syntax) pair among the objects one presentation context is
proposed, so compressed objects travel compressed and files travel byte for byte (their data set
is sent as stored, never decoded). Status classes (PS3.4 B.2.3, PS3.7 C):

- Success and Warning (0xB000 coercion, 0xB006, 0xB007, 0x0107, 0x0116): sent.
- 0x0111 Duplicate SOP Instance: sent (the peer already holds it; our UIDs identify content).
- Out of resources (0xA7xx), 0x0213 resource limitation, 0x0110 processing failure, and no
  answer at all (timeout, abort): transient, retried.
- Everything else (0xA9xx, 0xCxxx, 0x0122 SOP class not supported, 0x0124 not authorised, ...),
  and a context the peer did not accept: permanent.

C-GET brings the instances back on the same association (the node needs no address the PACS
knows, unlike C-MOVE); the storage contexts proposed are the SOP classes the series holds
(an image-level C-FIND says which), each with every transfer syntax pydicom knows, in the SCP
role.

Files are sent raw, never decoded, in a process that set pynetdicom's process-wide
``_config.STORE_SEND_CHUNKED_DATASET`` at its start (:mod:`node.process`).
"""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
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
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from node.archives.base import Archive, ArchiveError, FoundSeries, FoundStudy, StudyGone
from node.archives.outgoing import DispatchResult, ObjectLike, Outgoing, deliver
from node.archives.retry import Outcome, RoundFn, permanent, sent, transient
from node.config import (
    DestinationKind,
    DicomDestination,
    DispatchSettings,
    NodeSettings,
    Settings,
)
from node.dicomnet import make_ae
from node.files import atomic_write
from node.tls import TLSError, client_context, describe_failure

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts per association (odd IDs 1..255, PS3.8 9.3.2.2)
_TRANSIENT_CODES = {0x0110, 0x0213}

Context = tuple[str, str]  # (SOP Class UID, Transfer Syntax UID)


def status_outcome(code: int) -> Outcome:
    """A C-STORE response status as sent / transient / permanent, with its name."""
    name = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    text = f"status {code:#06x} {name}".rstrip()
    category = code_to_category(code)
    if category == "Success":
        return sent()
    if category == "Warning":
        return sent(text)
    if code == 0x0111:
        return sent(f"peer already holds this instance ({text})")
    if code in _TRANSIENT_CODES or 0xA700 <= code <= 0xA7FF:
        return transient(text)
    return permanent(text)


def _no_delay(event: evt.Event) -> None:
    """Turn Nagle's algorithm off: with it on, each C-STORE waits ~40 ms for the peer's delayed
    ACK of the previous PDU (measured: 100 CT instances to Orthanc 5.1 s with it, 0.78 s
    without)."""
    sock = event.assoc.dul.socket
    try:
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # an event handler never raises
        log.debug("TCP_NODELAY not set: %s", exc)


TLSArgs = tuple[ssl.SSLContext, str]  # (context, server_hostname), as pynetdicom takes them


def tls_args(destination: DicomDestination, node: NodeSettings) -> TLSArgs | None:
    """What ``AE.associate`` needs to reach ``destination`` over TLS; None without TLS.
    :class:`node.tls.TLSError` naming the file when a certificate or key cannot be used."""
    return client_context(destination, node) if destination.tls else None


def open_association(ae: AE, destination: DicomDestination, tls: TLSArgs | None,
                     evt_handlers: list[Any] | None = None, **kwargs: Any
                     ) -> tuple[Association | None, str]:
    """``ae.associate`` with ``destination`` (over TLS when ``tls``), and, when no association
    results, why in one line naming the peer and what to check ("" when established). The
    association is None when the host name does not resolve."""
    opened: list[bool] = []
    handlers = [*(evt_handlers or []), (evt.EVT_CONN_OPEN, lambda _e: opened.append(True))]
    started = time.monotonic()
    assert destination.ae_title is not None and destination.port is not None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls, evt_handlers=handlers, **kwargs)
    except socket.gaierror as exc:
        return None, f"cannot resolve host {destination.host} ({exc.strerror}): check the name"
    if assoc.is_established:
        return assoc, ""
    return assoc, _why_not(assoc, ae, destination, tls, bool(opened),
                           time.monotonic() - started)


def _why_not(assoc: Association, ae: AE, d: DicomDestination, tls: TLSArgs | None, opened: bool,
             elapsed: float) -> str:
    where = f"{d.host}:{d.port}"
    peer = f"{d.ae_title}@{where}"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = str(getattr(rsp, "reason_str", "?"))
        why = (f"association rejected by {peer} ({getattr(rsp, 'result_str', '?')}: "
               f"{reason})")
        if "Calling AE" in reason:
            why += (f": does {d.ae_title} know our AE title {ae.ae_title} (and, if it binds "
                    "titles to addresses, this host's address)?")
        elif "Called AE" in reason:
            why += f": is {d.ae_title} the peer's AE title?"
        return why
    timeout = float(ae.connection_timeout or ae.acse_timeout or 30)
    if opened:
        if elapsed >= float(ae.acse_timeout or 30) * 0.95:
            return (f"no association answer from {peer} within {ae.acse_timeout:.0f} s: is "
                    f"{d.port} a DICOM port, and is the peer overloaded?")
        if tls:
            return (f"{peer} ended the TLS connection without answering the association: it "
                    "may refuse our client certificate (tls_certificate) or not be a DICOM "
                    "TLS port; see the peer's log")
        return (f"{peer} accepted the connection but ended it without answering the "
                "association: is it a TLS port (then set tls = true)? See the peer's log")
    if elapsed >= timeout * 0.95:
        return (f"no answer from {where} within {timeout:.0f} s: is the host up and the "
                f"address right, and does a firewall let port {d.port} through?")
    return _probe(d, tls, timeout)


def _probe(d: DicomDestination, tls: TLSArgs | None, timeout: float) -> str:
    """Connect again, ourselves, to name what failed (pynetdicom keeps the reason to itself)."""
    where = f"{d.host}:{d.port}"
    assert d.port is not None
    try:
        sock = socket.create_connection((d.host, d.port), timeout=min(timeout, 10.0))
    except ConnectionRefusedError:
        return (f"connection refused at {where}: nothing listens there. Is the peer running, "
                f"and is {d.port} its DICOM{' TLS' if tls else ''} port?")
    except socket.gaierror as exc:
        return f"cannot resolve host {d.host} ({exc.strerror}): check the host name"
    except TimeoutError:
        return (f"no answer from {where} within {min(timeout, 10.0):.0f} s: is the host up "
                f"and the address right, and does a firewall let port {d.port} through?")
    except OSError as exc:
        return f"cannot connect to {where} ({exc.strerror or type(exc).__name__})"
    with sock:
        if tls is None:
            return f"connection to {where} failed once, then opened: a transient failure"
        context, hostname = tls
        try:
            with context.wrap_socket(sock, server_hostname=hostname):
                pass
        except (OSError, ValueError) as exc:
            return f"TLS handshake with {where} failed: {describe_failure(exc)}"
    return f"TLS connection to {where} failed once, then opened: a transient failure"


class PeerDispatcher:
    """Sends objects to one DICOM peer as ``calling_aet``, retrying as ``[dispatch]`` says;
    timeouts are the node's (``[node] acse_timeout_s``, ``dimse_timeout_s``,
    ``network_timeout_s``)."""

    def __init__(self, destination: DicomDestination, dispatch: DispatchSettings,
                 node: NodeSettings, calling_aet: str | None = None) -> None:
        if not isinstance(destination, DicomDestination):
            raise ValueError(f'destination "{destination.name}" is not a DICOM peer')
        self.destination = destination
        self.ae_title, self.port = destination.ae_title, destination.port
        self.dispatch = dispatch
        self.node = node
        self.calling_aet = calling_aet or node.ae_title
        if not 0 < len(self.calling_aet) <= 16:
            raise ValueError(f'calling AE title "{self.calling_aet}" is not 1 to 16 characters')
        self.name = f"{destination.ae_title}@{destination.host}:{destination.port}"
        self._tls: TLSArgs | None = None

    def send(self, objects: Sequence[ObjectLike],
             stop: threading.Event | None = None) -> list[DispatchResult]:
        """C-STORE ``objects``; one result per object, in order. Never raises for a failed
        object: its result says why. ``stop`` set during a backoff wait cancels the retries."""
        # Files go out as stored (node.process): pynetdicom sends the data set bytes after the
        # file meta (only an exactly matching context will do, which is what we propose).
        def make_round(items: list[Outgoing | None]) -> RoundFn:
            def attempt_round(pending: list[int]) -> dict[int, Outcome]:
                by_context: dict[Context, list[int]] = {}
                for i in pending:
                    item = items[i]
                    assert item is not None
                    key = (item.sop_class_uid, item.transfer_syntax_uid)
                    by_context.setdefault(key, []).append(i)
                contexts = list(by_context)
                outcomes: dict[int, Outcome] = {}
                for start in range(0, len(contexts), MAX_CONTEXTS):
                    chunk = contexts[start:start + MAX_CONTEXTS]
                    indices = [i for cx in chunk for i in by_context[cx]]
                    outcomes.update(self._association(chunk, indices, items))
                return outcomes
            return attempt_round

        return deliver(self.name, objects, make_round, self.dispatch, stop,
                       what=f"C-STORE to {self.name} as {self.calling_aet}")

    def _associate(self, contexts: list[Context]) -> tuple[Association | None, str]:
        ae = make_ae(self.calling_aet, self.node)
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, [syntax])
        if self.destination.tls and self._tls is None:
            self._tls = tls_args(self.destination, self.node)
        return open_association(ae, self.destination, self._tls,
                                evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])

    def _association(self, contexts: list[Context], indices: list[int],
                     items: list[Outgoing | None]) -> dict[int, Outcome]:
        """One association: C-STORE the objects at ``indices``."""
        try:
            assoc, why = self._associate(contexts)
        except TLSError as exc:
            log.error("C-STORE to %s: %s", self.name, exc)
            return dict.fromkeys(indices, permanent(str(exc)))
        if assoc is None or not assoc.is_established:
            return self._not_established(assoc, why, indices, items)
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        outcomes: dict[int, Outcome] = {}
        try:
            for i in indices:
                item = items[i]
                assert item is not None
                if not assoc.is_established:
                    outcomes[i] = transient(f"association with {self.name} ended early")
                elif (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                    outcomes[i] = permanent(_refused_context(item))
                else:
                    outcomes[i] = self._store(assoc, item)
                self._log(item, outcomes[i])
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    def _store(self, assoc: Association, item: Outgoing) -> Outcome:
        source = item.source if isinstance(item.source, Dataset) else str(item.source)
        try:
            status = assoc.send_c_store(source)
        except RuntimeError:  # the association went away
            return transient(f"association with {self.name} ended early")
        except (AttributeError, ValueError, OSError) as exc:
            return permanent(f"object cannot be encoded or read for C-STORE "
                             f"({type(exc).__name__})")
        if "Status" not in status:
            return transient("no C-STORE response (DIMSE timeout or association aborted)")
        return status_outcome(int(status.Status))

    def _not_established(self, assoc: Association | None, why: str, indices: list[int],
                         items: list[Outgoing | None]) -> dict[int, Outcome]:
        if assoc is not None and assoc.is_rejected:
            result = getattr(assoc.acceptor.primitive, "result", None)
            log.warning("%s", why)
            return dict.fromkeys(indices, transient(why) if result == 0x02 else permanent(why))
        if assoc is not None and assoc.rejected_contexts and not assoc.accepted_contexts:
            # pynetdicom aborts when the peer accepts none of the proposed contexts.
            return {i: permanent(_refused_context(items[i])) for i in indices}
        why = f"cannot associate with {self.name} as {self.calling_aet}: {why}"
        log.warning("%s", why)
        return dict.fromkeys(indices, transient(why))

    def _log(self, item: Outgoing, outcome: Outcome) -> None:
        if outcome.ok:
            log.debug("C-STORE %s to %s: sent%s", item.sop_instance_uid, self.name,
                      f" ({outcome.reason})" if outcome.reason else "")
        else:
            log.warning("C-STORE %s to %s: %s", item.sop_instance_uid, self.name, outcome.reason)


def _refused_context(item: Outgoing | None) -> str:
    assert item is not None
    return (f"peer did not accept SOP Class {item.sop_class_uid} in transfer syntax "
            f"{item.transfer_syntax_uid}")


def send_to_peer(
    objects: Sequence[ObjectLike], destination: DicomDestination, settings: Settings,
    calling_aet: str | None = None, stop: threading.Event | None = None,
) -> list[DispatchResult]:
    """C-STORE ``objects`` to ``destination`` as ``calling_aet`` (default ``[node] ae_title``)."""
    dispatcher = PeerDispatcher(destination, settings.dispatch, settings.node, calling_aet)
    return dispatcher.send(objects, stop=stop)


# -- Query/Retrieve: C-FIND and C-GET -----------------------------------------------------

_PENDING = (0xFF00, 0xFF01)


class QueryError(ArchiveError):
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
        ae = make_ae(self.node.ae_title, self.node)
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
                    answer = f"status {code:#06x}" if code >= 0 else "no answer"
                    raise QueryError(f"C-FIND at {self.name} ({level}) failed: {answer}")
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
                atomic_write(target, event.encoded_dataset())
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


class DicomArchive(Archive):
    """A DICOM peer: C-STORE as ``[node] ae_title`` (or the caller's title), C-FIND and C-GET
    for backfill."""

    kind = DestinationKind.DICOM
    searchable = True

    def __init__(self, destination: DicomDestination, settings: Settings) -> None:
        super().__init__(destination, settings)
        self._peer: Peer | None = None

    @property
    def label(self) -> str:
        d = self.destination
        return f"{d.ae_title}@{d.host}:{d.port}"

    @property
    def peer(self) -> Peer:
        if self._peer is None:
            self._peer = Peer(self.destination, self.settings.node)
        return self._peer

    def send(self, objects: Sequence[ObjectLike], job_id: str, task: str,
             stop: threading.Event | None = None, calling_aet: str | None = None
             ) -> list[DispatchResult]:
        return send_to_peer(objects, self.destination, self.settings, calling_aet, stop=stop)

    def find(self, since: datetime.date, until: datetime.date | None = None
             ) -> list[FoundStudy]:
        return [FoundStudy(uid, uid, day, n) for uid, day, n in self.peer.studies(since, until)]

    def series(self, study: FoundStudy) -> list[FoundSeries]:
        found = [FoundSeries(str(s.SeriesInstanceUID), s,
                             int(s.get("NumberOfSeriesRelatedInstances") or 0))
                 for s in self.peer.series(study.study_uid) if s.get("SeriesInstanceUID")]
        if not found:
            raise StudyGone(f"{self.label} has no series of study {study.study_uid}")
        return found

    def fetch(self, study: str, study_uid: str, series_uids: Sequence[str], folder: Path
              ) -> list[Path]:
        return [f for s in series_uids for f in self.peer.get_series(study_uid, s, folder / s)]


ARCHIVE = DicomArchive
