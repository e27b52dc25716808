"""STOW-RS ingest (PS3.18 10.5): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}``
on the console port, into the same spool with the same guarantee as C-STORE.

The request body (``multipart/related; type="application/dicom"``) is streamed, never held in
memory: each part is written into a file in the spool's temporary folder as it arrives, then
checked as a C-STORE data set is (:func:`node.receive.check.inspect_part10`: a file meta naming
a storage SOP class and transfer syntax the node accepts, a complete data set whose UIDs are
the meta's), then moved into the spool (:meth:`node.spool.Spool.store_file`: fsynced, renamed,
indexed, under the spool's duplicates policy). A part is counted stored only then, and the
response goes only after the last part. A bad part fails alone: the response's Failed SOP
Sequence gives its PS3.18 failure reason and an HTTP ``Warning`` header the reason in words.

Only reviewers and admins may upload. The index records the calling AE title ``STOW-RS`` and
the node's own AE title as called. The Retrieve URLs of the response name where the instances
are in the DICOMweb URL space; the node itself serves no WADO-RS (it forwards, it is no
archive).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from node import audit
from node.console.context import ConsoleContext, Role, User
from node.errors import describe
from node.receive.check import RejectedDataset, StoreStatus, inspect_part10, meta_uids
from node.receive.scp import RESERVE_COMMENT
from node.reserve import DiskReserve
from node.spool import InstanceRow, SpoolError, StoreOutcome
from node.uids import is_valid_uid

log = logging.getLogger(__name__)

CALLING_AET = "STOW-RS"
"""The calling AE title the spool index records for instances received by STOW-RS."""

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
REALM = 'Basic realm="synthnode"'
_BATCH_BYTES = 1 << 20
"""Body bytes gathered before they are parsed and written (in a worker thread, off the event
loop): bounds memory and the number of thread hops."""
_MAX_WARNINGS = 50
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")
"""What a part's Content-Type may be for a refusal (a log line) to repeat it."""


@dataclass
class _Part:
    number: int
    headers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    fd: int = -1
    size: int = 0
    failure: tuple[StoreStatus, str] | None = None
    """Known before its data is checked (wrong content type, below the reserve, a write
    failed, the body ended inside it)."""
    write_error: OSError | None = None


@dataclass
class _Result:
    """What became of one part."""

    number: int
    sop_class: str
    sop_instance: str
    study: str = ""
    series: str = ""
    outcome: StoreOutcome | None = None
    status: StoreStatus | None = None
    reason: str = ""


class _Upload:
    """One STOW-RS request: the multipart parser's callbacks writing parts into files, each
    part stored as soon as it is complete. Runs in a worker thread (blocking I/O)."""

    def __init__(self, ctx: ConsoleContext, reserve: DiskReserve, boundary: bytes,
                 study: str | None, user: User) -> None:
        self.ctx = ctx
        self.reserve = reserve
        self.study = study
        self.user = user
        self.results: list[_Result] = []
        self.part: _Part | None = None
        self.parts = 0
        self.ended = False
        self._field = b""
        self._value = b""
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data,
            "on_part_end": self._end, "on_end": self._all_done,
        })

    # -- the parser's callbacks ----------------------------------------------------------

    def _begin(self) -> None:
        self.parts += 1
        self.part = _Part(self.parts)
        self._field = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self.part is not None:
            name = self._field.decode("latin-1").strip().lower()
            self.part.headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _headers_done(self) -> None:
        part = self.part
        assert part is not None
        kind = part.headers.get("content-type", "")
        media = parse_options_header(kind)[0].decode("latin-1").lower() if kind else DICOM
        if media != DICOM:
            shown = media if _MEDIA_TYPE.match(media) else "(not a media type)"
            part.failure = (StoreStatus.CANNOT_UNDERSTAND,
                            f"part Content-Type {shown} is not {DICOM}")
        elif self.reserve.shortfall() is not None:
            part.failure = (StoreStatus.OUT_OF_RESOURCES, RESERVE_COMMENT)
        else:
            try:
                part.fd, name = tempfile.mkstemp(suffix=".dcm", dir=self.ctx.spool.tmp_dir)
                part.path = Path(name)
            except OSError as exc:
                part.failure = (StoreStatus.OUT_OF_RESOURCES, SpoolError.of(exc).reason)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        assert part is not None
        part.size += end - start
        if part.fd < 0 or part.write_error is not None:
            return  # refused already: the data goes nowhere
        view = memoryview(data)[start:end]
        try:
            while view:
                view = view[os.write(part.fd, view):]
        except OSError as exc:
            part.write_error = exc
            os.ftruncate(part.fd, 0)  # give the space back now

    def _end(self) -> None:
        part, self.part = self.part, None
        assert part is not None
        self._close(part)
        self._store(part)

    def _all_done(self) -> None:
        self.ended = True

    # -- storing ---------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Parse (and store what completes in) ``chunk``; raises MultipartParseError."""
        self.parser.write(chunk)

    def finish(self, why: str | None) -> None:
        """The body ended (``why``: it was cut short or malformed): a part in progress fails."""
        part, self.part = self.part, None
        if part is not None:
            self._close(part)
            if part.failure is None:
                part.failure = (StoreStatus.CANNOT_UNDERSTAND,
                                why or "the request body ended inside this part")
            self._store(part)

    def discard(self) -> None:
        """The request is abandoned (over the size limit, client gone): the part in progress
        is removed, not stored."""
        part, self.part = self.part, None
        if part is not None:
            self._close(part)
            if part.path is not None:
                part.path.unlink(missing_ok=True)

    @staticmethod
    def _close(part: _Part) -> None:
        if part.fd >= 0:
            os.close(part.fd)
            part.fd = -1

    def _store(self, part: _Part) -> None:
        counters = self.ctx.counters
        path = part.path
        result = _Result(part.number, "", "")
        try:
            if part.write_error is not None:
                raise SpoolError.of(part.write_error)
            if part.failure is not None:
                raise RejectedDataset(*part.failure)
            assert path is not None
            checked = inspect_part10(path)
            header = checked.header
            result.sop_class, result.sop_instance = header.sop_class_uid, header.sop_instance_uid
            result.study, result.series = header.study_uid, header.series_uid
            if self.study is not None and header.study_uid != self.study:
                raise RejectedDataset(
                    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    f"Study Instance UID {header.study_uid} is not the study of the request "
                    f"URL ({self.study})")
            row = InstanceRow(header.sop_instance_uid, header.study_uid, header.series_uid,
                              header.sop_class_uid, checked.transfer_syntax, part.size)
            result.outcome = self.ctx.spool.store_file(
                path, row, calling_aet=CALLING_AET, called_aet=self.ctx.settings.node.ae_title)
        except RejectedDataset as exc:
            result.status, result.reason = exc.status, exc.reason
            counters.add("below_reserve" if exc.reason == RESERVE_COMMENT else "rejected",
                         part.size, source="stow")
        except SpoolError as exc:
            result.status, result.reason = StoreStatus.OUT_OF_RESOURCES, exc.reason
            counters.add("failed", part.size, source="stow")
        except Exception as exc:  # noqa: BLE001 - one part's failure must not fail the others
            log.exception("STOW-RS part %d from %s: unexpected %s", part.number, self.user.name,
                          type(exc).__name__)
            result.status = StoreStatus.PROCESSING_FAILURE
            result.reason = f"internal error ({describe(exc)})"
            counters.add("failed", part.size, source="stow")
        else:
            counters.add("stored" if result.outcome is StoreOutcome.STORED else "duplicates",
                         part.size, source="stow")
        finally:
            if path is not None:
                if result.status is not None and not result.sop_instance:
                    # what the refusal names, read only when refused
                    result.sop_class, result.sop_instance = meta_uids(path)
                path.unlink(missing_ok=True)  # moved into the spool, or refused
        if result.status is not None:
            log.warning("STOW-RS part %d from %s refused sop_instance=%s status=0x%04X: %s",
                        part.number, self.user.name, result.sop_instance or "unknown",
                        result.status, result.reason)
        elif result.outcome is StoreOutcome.DUPLICATE_DISCARDED:
            log.warning("STOW-RS duplicate SOP Instance UID from %s sop_instance=%s: %s",
                        self.user.name, result.sop_instance, result.outcome.value)
        self.results.append(result)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _attr(vr: str, *value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(value)} if value else {"vr": vr}


def _warning(text: str) -> str:
    """An HTTP Warning header value (RFC 7234): code 299, the text quoted, ASCII only."""
    clean = text.replace("\\", "/").replace('"', "'").encode("ascii", "replace").decode()
    return f'299 synthnode "{clean}"'


def response_body(results: list[_Result], base: str, study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) in DICOM JSON."""
    body: dict[str, Any] = {}
    stored = [r for r in results if r.status is None]
    failed = [r for r in results if r.status is not None]
    studies = {r.study for r in stored}
    top = study or (next(iter(studies)) if len(studies) == 1 else None)
    if top:
        body["00081190"] = _attr("UR", f"{base}/studies/{top}")
    if stored:
        body["00081199"] = _attr("SQ", *[{
            "00081150": _attr("UI", r.sop_class),
            "00081155": _attr("UI", r.sop_instance),
            "00081190": _attr("UR", f"{base}/studies/{r.study}/series/{r.series}/instances/"
                                    f"{r.sop_instance}"),
        } for r in stored])
    if failed:
        items = []
        for r in failed:
            item: dict[str, Any] = {}
            if r.sop_class:
                item["00081150"] = _attr("UI", r.sop_class)
            if r.sop_instance:
                item["00081155"] = _attr("UI", r.sop_instance)
            item["00081197"] = _attr("US", int(r.status or StoreStatus.PROCESSING_FAILURE))
            items.append(item)
        body["00081198"] = _attr("SQ", *items)
    return body


async def _stow(ctx: ConsoleContext, reserve: DiskReserve, request: Request,
                study: str | None) -> Response:
    user = ctx.authenticate(request)
    if user is None:
        return _error(401, "log in: STOW-RS needs a reviewer's or admin's credentials",
                      {"WWW-Authenticate": REALM})
    if not user.role.allows(Role.REVIEWER):
        return _error(403, f"user {user.name} is a {user.role.value}: STOW-RS needs the "
                           "reviewer or admin role")
    if study is not None and not is_valid_uid(study):
        return _error(400, "the study in the URL is not a valid UID")
    media, params = parse_options_header(request.headers.get("content-type", ""))
    kind = params.get(b"type", b"").decode("latin-1").strip('"').lower()
    if media.decode("latin-1").lower() != "multipart/related" or kind not in ("", DICOM):
        return _error(415, f'send Content-Type: multipart/related; type="{DICOM}"; '
                           "boundary=... (one DICOM file per part)")
    boundary = params.get(b"boundary", b"").strip(b'"')
    if not boundary:
        return _error(400, "the Content-Type has no boundary parameter")
    limit = ctx.settings.console.stow_max_bytes
    too_big = _error(413, f"the request body is over {limit} bytes ([console] stow_max_bytes): "
                          "send the study in several requests")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return too_big
    try:
        upload = _Upload(ctx, reserve, boundary, study, user)
    except ValueError as exc:  # e.g. a boundary longer than multipart allows
        return _error(400, f"bad boundary ({describe(exc)})")

    received = 0
    batch: list[bytes] = []
    batched = 0
    why: str | None = None
    outcome: Response | None = None

    def feed(chunks: list[bytes]) -> None:
        for chunk in chunks:
            upload.feed(chunk)

    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                outcome = too_big
                break
            batch.append(chunk)
            batched += len(chunk)
            if batched >= _BATCH_BYTES:
                chunks, batch, batched = batch, [], 0
                await anyio.to_thread.run_sync(feed, chunks)
        if outcome is None and batch:
            await anyio.to_thread.run_sync(feed, batch)
    except MultipartParseError as exc:
        why = f"the multipart body is malformed ({describe(exc)})"
    except ClientDisconnect:
        upload.discard()
        log.warning("STOW-RS from %s: the client went away after %d bytes", user.name, received)
        return Response(status_code=400)
    if outcome is not None:
        await anyio.to_thread.run_sync(upload.discard)
    else:
        if not upload.ended and why is None and upload.parts:
            why = "the request body ended before the closing boundary: the part is truncated"
        await anyio.to_thread.run_sync(upload.finish, why)
    results = upload.results
    _audit(ctx, user, study, results, received)
    if outcome is not None:
        return outcome
    if not results:
        return _error(400, why or f"no part found in the body (boundary "
                                  f"{boundary.decode('latin-1')[:70]})")
    base = str(request.base_url).rstrip("/") + "/dicomweb"
    failed = [r for r in results if r.status is not None]
    code = 200 if not failed else 409 if len(failed) == len(results) else 202
    response = JSONResponse(response_body(results, base, study), status_code=code,
                            media_type=DICOM_JSON)
    for r in failed[:_MAX_WARNINGS]:
        response.headers.append("Warning", _warning(
            f"part {r.number} ({r.sop_instance or 'SOP Instance UID unknown'}): {r.reason}"))
    for r in results:
        if r.outcome is StoreOutcome.DUPLICATE_DISCARDED:
            response.headers.append("Warning", _warning(
                f"part {r.number} ({r.sop_instance}): already in the spool with other bytes; "
                "the first copy is kept ([spool] on_duplicate)"))
    log.info("STOW-RS from %s: %d stored, %d failed", user.name,
             len(results) - len(failed), len(failed))
    return response


def _audit(ctx: ConsoleContext, user: User, study: str | None, results: list[_Result],
           nbytes: int) -> None:
    def count(*outcomes: StoreOutcome) -> int:
        return sum(1 for r in results if r.outcome in outcomes)

    below = sum(1 for r in results if r.reason == RESERVE_COMMENT)
    refused = sum(1 for r in results if r.status is not None
                  and r.status is not StoreStatus.OUT_OF_RESOURCES
                  and r.status is not StoreStatus.PROCESSING_FAILURE)
    failed = sum(1 for r in results if r.status is not None) - refused - below
    audit.record(ctx.settings, "stow", user.name, subject=study or "", user=user.name,
                 via=user.via, stored=count(StoreOutcome.STORED),
                 duplicates=count(StoreOutcome.DUPLICATE, StoreOutcome.DUPLICATE_DISCARDED,
                                  StoreOutcome.REPLACED),
                 refused=refused, failed=failed, below_reserve=below, bytes=nbytes)


def stow_router(ctx: ConsoleContext) -> APIRouter:
    """``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}`` (reviewer or admin;
    HTTP Basic or the console's session, whatever ``ctx.authenticate`` accepts)."""
    router = APIRouter()
    reserve = DiskReserve.for_settings(ctx.settings)

    @router.post("/dicomweb/studies")
    async def store_instances(request: Request) -> Response:
        return await _stow(ctx, reserve, request, None)

    @router.post("/dicomweb/studies/{study}")
    async def store_study_instances(study: str, request: Request) -> Response:
        return await _stow(ctx, reserve, request, study)

    return router
