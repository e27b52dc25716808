"""The DIMSE SCP: Verification and Storage, writing what peers send into the spool.

Handlers get their dependencies as extra arguments, return named DIMSE statuses and never raise
(pynetdicom's qrscp pattern). Every refusal is one log line naming the peer and the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from threading import Lock
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node import audit, metrics
from node.config import NodeSettings, Settings
from node.dicomnet import make_ae
from node.errors import describe
from node.receive.check import (
    RejectedDataset,
    StoreStatus,
    check_against_request,
    inspect_dataset,
    inspect_file,
)
from node.receive.chunked import (
    Incoming,
    ReceiveTarget,
    dataset_offset,
    discard_partial,
    receive_into,
)
from node.receive.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION
from node.reserve import DiskReserve, Shortfall
from node.spool import InstanceRow, Spool, SpoolError, StoreOutcome
from node.tls import describe_failure, server_context

log = logging.getLogger(__name__)


_OUTCOMES = {"stored": "stored", "duplicates": "duplicate", "rejected": "refused",
             "failed": "failed", "below_reserve": "below_reserve"}
"""ReceiveCounters field -> the outcome label of :func:`node.metrics.received`."""


@dataclass
class ReceiveCounters:
    """Counts since start, for logs and ``status``; every instance counted here (C-STORE or
    STOW-RS) is counted in the metrics too."""

    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    below_reserve: int = 0
    """Refused with 0xA700 because free disk space was below the reserve."""
    associations: int = 0
    _lock: Lock = field(default_factory=Lock, repr=False)

    def add(self, name: str, nbytes: int = 0, source: str = "dicom") -> None:
        """One more ``name`` (a field); an instance's outcome also goes to the metrics with its
        size in bytes and ``source`` ("dicom": C-STORE, "stow": STOW-RS)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
        outcome = _OUTCOMES.get(name)
        if outcome is not None:
            metrics.received(outcome, nbytes, source)


@dataclass
class AssociationTally:
    """What one association brought: its ``association`` audit record when it ends."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0
    below_reserve: int = 0
    accepted: bool = False


_tallies: weakref.WeakKeyDictionary[Association, AssociationTally] = (
    weakref.WeakKeyDictionary())
_tallies_lock = Lock()


def tally_of(assoc: Association) -> AssociationTally:
    """The counts of ``assoc`` (made on first use)."""
    with _tallies_lock:
        found = _tallies.get(assoc)
        if found is None:
            found = _tallies[assoc] = AssociationTally()
        return found


RESERVE_COMMENT = "free disk below the reserve ([spool] reserve_bytes); retry later"
"""The Error Comment (LO, at most 64 characters) of a refusal for want of space."""


class Intake:
    """Whether the SCP takes new instances: not while a guarded file system is below the disk
    reserve. Logs one line when receiving pauses and one when it resumes, not one per
    instance."""

    def __init__(self, reserve: DiskReserve | None) -> None:
        self.reserve = reserve
        self.paused = False
        self._lock = Lock()

    def shortfall(self) -> Shortfall | None:
        short = self.reserve.shortfall() if self.reserve is not None else None
        if (short is not None) != self.paused:
            with self._lock:
                if (short is not None) != self.paused:
                    self.paused = short is not None
                    if short is not None:
                        log.warning("receiving paused: %s", short)
                    else:
                        log.info("receiving resumed: free space is above the reserve again")
        return short


def peer_name(assoc: Association) -> str:
    """``CALLING@address:port``: how logs name a peer (AE titles are not patient data)."""
    req = assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


def _status(status: StoreStatus, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = int(status)
    # Error Comment is LO: at most 64 characters.
    rsp.ErrorComment = comment[:64]
    return rsp


def handle_store(event: Event, spool: Spool, counters: ReceiveCounters,
                 intake: Intake | None = None) -> int | Dataset:
    """EVT_C_STORE: check the data set, persist it durably, then (only then) answer Success."""
    assoc = event.assoc
    req = cast(C_STORE, event.request)
    sop_instance = str(req.AffectedSOPInstanceUID or "")
    tally = tally_of(assoc)
    nbytes = 0
    try:
        received = getattr(req, "_dataset_path", None)  # set when received in chunks
        incoming = getattr(req, "_dataset_file", None)
        if isinstance(incoming, Incoming) and incoming.error is not None:
            raise SpoolError.of(incoming.error)
        if (intake is not None and intake.shortfall() is not None) or (
                isinstance(incoming, Incoming) and incoming.refused):
            counters.add("below_reserve")
            tally.below_reserve += 1
            log.debug("C-STORE refused from %s sop_instance=%s: below the disk reserve",
                      peer_name(assoc), sop_instance)
            return _status(StoreStatus.OUT_OF_RESOURCES, RESERVE_COMMENT)
        context = event.context
        transfer_syntax = str(context.transfer_syntax)
        calling, called = assoc.requestor.ae_title, assoc.acceptor.ae_title
        if received is not None:
            path = Path(received)
            with path.open("rb") as f:
                offset = dataset_offset(f.fileno())
            header = inspect_file(path, offset, transfer_syntax)
            check_against_request(header, str(context.abstract_syntax), sop_instance)
            nbytes = path.stat().st_size
            row = InstanceRow(header.sop_instance_uid, header.study_uid, header.series_uid,
                              header.sop_class_uid, transfer_syntax, nbytes)
            outcome = spool.store_file(path, row, calling_aet=calling, called_aet=called)
        else:
            header = inspect_dataset(event.encoded_dataset(include_meta=False), transfer_syntax)
            check_against_request(header, str(context.abstract_syntax), sop_instance)
            file_bytes = event.encoded_dataset(include_meta=True)
            nbytes = len(file_bytes)
            outcome = spool.store(
                file_bytes,
                InstanceRow(
                    header.sop_instance_uid, header.study_uid, header.series_uid,
                    header.sop_class_uid, transfer_syntax, len(file_bytes),
                ),
                calling_aet=calling,
                called_aet=called,
            )
    except RejectedDataset as exc:
        counters.add("rejected", nbytes)
        tally.refused += 1
        log.warning(
            "C-STORE refused from %s sop_instance=%s status=0x%04X: %s",
            peer_name(assoc), sop_instance, exc.status, exc.reason,
        )
        return _status(exc.status, exc.reason)
    except SpoolError as exc:
        counters.add("failed", nbytes)
        tally.failed += 1
        log.error(
            "C-STORE failed from %s sop_instance=%s status=0x%04X: %s",
            peer_name(assoc), sop_instance, StoreStatus.OUT_OF_RESOURCES, exc.reason,
        )
        return _status(StoreStatus.OUT_OF_RESOURCES, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a handler must answer, never raise
        counters.add("failed", nbytes)
        tally.failed += 1
        log.exception(
            "C-STORE failed from %s sop_instance=%s: unexpected %s",
            peer_name(assoc), sop_instance, type(exc).__name__,
        )
        return _status(StoreStatus.OUT_OF_RESOURCES, f"internal error ({describe(exc)})")
    if outcome is StoreOutcome.STORED:
        counters.add("stored", nbytes)
        tally.stored += 1
    else:
        counters.add("duplicates", nbytes)
        tally.duplicates += 1
        level = logging.DEBUG if outcome is StoreOutcome.DUPLICATE else logging.WARNING
        log.log(
            level,
            "duplicate SOP Instance UID from %s sop_instance=%s: %s",
            peer_name(assoc), sop_instance, outcome.value,
        )
    return int(StoreStatus.SUCCESS)


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: always Success."""
    return 0x0000


def handle_accepted(event: Event, counters: ReceiveCounters) -> None:
    counters.add("associations")
    metrics.association("accepted")
    tally_of(event.assoc).accepted = True
    log.debug("association accepted from %s", peer_name(event.assoc))


def handle_closed(event: Event, settings: Settings | None) -> None:
    """EVT_CONN_CLOSE: an accepted association ended (released or aborted): its ``association``
    audit record, with what it brought."""
    assoc = event.assoc
    with _tallies_lock:
        tally = _tallies.pop(assoc, None)
    if settings is None or tally is None or not tally.accepted:
        return
    req = assoc.requestor
    audit.record(settings, "association", str(req.ae_title).strip(), subject=peer_name(assoc),
                 calling=str(req.ae_title).strip(), called=str(assoc.acceptor.ae_title).strip(),
                 peer=f"{req.address}:{req.port}", stored=tally.stored,
                 duplicates=tally.duplicates, refused=tally.refused, failed=tally.failed,
                 below_reserve=tally.below_reserve,
                 action="aborted" if assoc.is_aborted else "released")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CallingPolicy:
    """Who may associate: ``[node] allowed_calling_aets`` (titles; empty = any) and
    ``[node] peers`` (a title bound to the addresses and networks it may call from)."""

    allowed: tuple[str, ...] = ()
    peers: Mapping[str, tuple[IPNetwork, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: NodeSettings) -> CallingPolicy:
        return cls(tuple(settings.allowed_calling_aets), {
            title: tuple(ipaddress.ip_network(n) for n in networks)
            for title, networks in settings.peers.items()})

    def wrong_address(self, title: str, address: str) -> str | None:
        """Why ``title`` may not call from ``address`` under ``[node] peers``; None if it may."""
        networks = self.peers.get(title.strip())
        if networks is None:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is not None and any(ip in n for n in networks if n.version == ip.version):
            return None
        return (f"calling AE title {title.strip()} is bound in [node] peers to "
                f"{', '.join(map(str, networks))}, not {address}")


class _PeerCheckingACSE(ACSE):
    """The acceptor's ACSE, refusing a calling AE title bound ([node] peers) to other
    addresses with A-ASSOCIATE-RJ (rejected permanent, service user, calling AE title not
    recognised), before anything else is negotiated."""

    def __init__(self, assoc: Association, policy: CallingPolicy) -> None:
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        rq = cast(A_ASSOCIATE, self.requestor.primitive)
        if self._policy.wrong_address(str(rq.calling_ae_title), self.requestor.address):
            self.requestor.ae_title = rq.calling_ae_title
            self.send_reject(0x01, 0x01, 0x03)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


def handle_rejected(event: Event, policy: CallingPolicy) -> None:
    assoc = event.assoc
    called = assoc.acceptor.ae_title
    calling = assoc.requestor.ae_title
    why = "association rejected"
    wrong_address = policy.wrong_address(calling, assoc.requestor.address)
    if policy.allowed and calling not in policy.allowed:
        why = "calling AE title not in allowed_calling_aets"
    elif wrong_address:
        why = wrong_address
    elif assoc.requestor.primitive and assoc.requestor.primitive.called_ae_title != called:
        why = f"called AE title is not {called}"
    metrics.association("rejected")
    log.warning("association from %s rejected: %s", peer_name(assoc), why)


def handle_aborted(event: Event) -> None:
    metrics.association("aborted")
    log.warning("association from %s aborted; data in flight was not stored",
                peer_name(event.assoc))
    discard_partial(event.assoc.dimse.message)


def build_ae(settings: NodeSettings) -> AE:
    """An application entity accepting Verification and every storage SOP class."""
    ae = make_ae(settings.ae_title, settings)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class _RequestHandler(RequestHandler):
    server: NodeServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if self.server.policy.peers:
            assoc.acse = _PeerCheckingACSE(assoc, self.server.policy)
        return assoc


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the checks of ``[node] peers`` and, on a TLS port,
    the TLS handshake done in the connection's own thread (pynetdicom does it in the accepting
    thread, where one silent client would stall every other): bounded by ``acse_timeout_s``,
    a failure is one log line naming the peer's address and the reason."""

    def __init__(self, *args: Any, policy: CallingPolicy, handshake_timeout_s: float,
                 **kwargs: Any) -> None:
        self.policy = policy
        self.handshake_timeout_s = handshake_timeout_s
        kwargs["request_handler"] = _RequestHandler
        super().__init__(*args, **kwargs)

    @property
    def is_tls(self) -> bool:
        return self.ssl_context is not None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, address: tuple[str, int]) -> bool:
        previous = sock.gettimeout()
        try:
            sock.settimeout(self.handshake_timeout_s)
            sock.do_handshake()
            sock.settimeout(previous)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s:%d failed: %s", address[0], address[1],
                        describe_failure(exc))
            return False
        return True


def _serve(ae: AE, settings: NodeSettings, port: int, handlers: list[Any],
           tls: ssl.SSLContext | None) -> NodeServer:
    server = cast(NodeServer, ae.make_server(
        (settings.host, port), ssl_context=tls, evt_handlers=handlers,
        server_class=NodeServer, policy=CallingPolicy.of(settings),
        handshake_timeout_s=settings.acse_timeout_s,
    ))
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it
    return server


class ListenError(Exception):
    """A port the node should listen on cannot be opened."""

    def __init__(self, setting: str, host: str, port: int, error: OSError) -> None:
        super().__init__(f"port {port} on {host}: {error.strerror}")
        self.setting = setting
        self.host = host
        self.port = port
        self.error = error


def start_listeners(
    settings: NodeSettings, spool: Spool, counters: ReceiveCounters | None = None,
    reserve: DiskReserve | None = None, chunked: bool = True,
    audit_settings: Settings | None = None,
) -> list[NodeServer]:
    """Start listening (non-blocking): on ``port`` without TLS unless ``[node.tls] plain =
    false``, and on ``[node.tls] port`` with TLS. The TLS files are loaded before any port
    opens (:class:`node.tls.TLSError` naming the file otherwise).

    ``reserve``: refuse new instances (0xA700) while it is short. ``chunked``: receive data
    sets into files in the spool's temporary folder as they arrive (bounded memory whatever
    the size) rather than in memory; the process must have been set up for it at its start
    (:func:`node.receive.chunked.receive_chunked`), RuntimeError otherwise. ``audit_settings``: the
    settings whose audit trail gets an ``association`` record as each association ends."""
    tls = server_context(settings.tls) if settings.tls is not None else None
    counters = counters or ReceiveCounters()
    ae = build_ae(settings)
    policy = CallingPolicy.of(settings)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, counters, Intake(reserve)]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, handle_accepted, [counters]),
        (evt.EVT_REJECTED, handle_rejected, [policy]),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_CONN_CLOSE, handle_closed, [audit_settings]),
    ]
    if chunked:
        receive_into(ae, ReceiveTarget(spool.tmp_dir, reserve))
    ports: list[tuple[str, int, ssl.SSLContext | None]] = []
    if settings.listens_plain:
        ports.append(("[node] port", settings.port, None))
    if settings.tls is not None:
        ports.append(("[node.tls] port", settings.tls.port, tls))
    servers = []
    try:
        for setting, port, context in ports:
            try:
                servers.append(_serve(ae, settings, port, handlers, context))
            except OSError as exc:
                raise ListenError(setting, settings.host, port, exc) from exc
    except BaseException:
        for server in servers:
            server.shutdown()
        raise
    return servers


def start_scp(
    settings: NodeSettings, spool: Spool, counters: ReceiveCounters | None = None,
    reserve: DiskReserve | None = None, chunked: bool = True,
    audit_settings: Settings | None = None,
) -> ThreadedAssociationServer:
    """Start the node's one listener (non-blocking) and return it; with ``[node.tls]`` beside
    a plain port there are two: use :func:`start_listeners`."""
    if settings.tls is not None and settings.listens_plain:
        raise ValueError("[node.tls] with plain = true gives two listeners: "
                         "use start_listeners")
    return start_listeners(settings, spool, counters, reserve, chunked, audit_settings)[0]
