"""A DICOMweb server (PS3.18) through dicomweb-client: STOW-RS to store, QIDO-RS to find
studies and series, WADO-RS to read a series' header and fetch its instances.

Sending is retried as ``[dispatch]`` says, like every destination (the client's own retries are
off): connection errors, timeouts, HTTP 5xx, 408 and 429 are transient; the other 4xx are
permanent. Objects go out a few per STOW-RS request; the server's answer says which it stored
(Referenced SOP Sequence) and which it refused, with a DIMSE status (Failed SOP Sequence).

Servers differ on an instance they already hold: some answer success and keep the old one
(Orthanc), some answer 0x0111 Duplicate. So before storing, the node asks which of the
objects the server already holds (one QIDO-RS per series) and compares those with what it
stored (WADO-RS): the same content but for time stamps counts as sent ("already stored";
deterministic UIDs make retries and re-sends harmless); different content under one SOP
Instance UID is a permanent error, never a silent loss.

Requests carry HTTP basic auth (``username``, the password in ``password_env``) or a bearer
token (``token_env``); https is verified as requests does (``REQUESTS_CA_BUNDLE``). Messages
name the server's URL, the step and the HTTP status, never patient data.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from node.archives.base import Archive, ArchiveError, FoundSeries, FoundStudy, StudyGone
from node.archives.dimse import status_outcome
from node.archives.outgoing import (
    DispatchResult,
    ObjectLike,
    Outgoing,
    deliver,
    difference,
    log_outcome,
)
from node.archives.retry import Outcome, RoundFn, permanent, sent, transient
from node.config import DestinationKind, DicomWebDestination, Settings
from node.files import atomic_open

log = logging.getLogger(__name__)

BATCH_OBJECTS = 16
"""Objects per STOW-RS request at most."""
BATCH_BYTES = 32 * 1024 * 1024
"""Bytes per STOW-RS request at most (a larger object goes alone)."""

_TRANSIENT_HTTP = {408, 429}  # request timeout, too many requests
_ANY_SYNTAX = (("application/dicom", "*"),)  # as stored: the server must not transcode
_DUPLICATE = 0x0111
_FILE_UID = re.compile(r"[0-9A-Za-z._-]{1,64}")  # a UID, leniently; never a path

# DICOM JSON tags (PS3.18 F.2)
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_STUDY_DATE = "00080020"
_STUDY_INSTANCES, _SERIES_INSTANCES = "00201208", "00201209"

T = TypeVar("T")


class _Unreachable(Exception):
    """The server did not answer (connection failed, timed out): the rest of a round would
    fail the same way."""


class _HttpFailure(Exception):
    """The server answered an HTTP error; the message names the URL, step and status."""

    def __init__(self, message: str, status: int, transient: bool,
                 response: requests.Response | None) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.response = response


@dataclass
class _Item:
    """One object of a round, with the UIDs it is filed under."""

    index: int
    outgoing: Outgoing
    study_uid: str
    series_uid: str
    size: int
    """Bytes, about (what batches are cut by)."""

    @property
    def sop(self) -> str:
        return self.outgoing.sop_instance_uid

    @staticmethod
    def of(index: int, outgoing: Outgoing) -> _Item:
        """Read ``outgoing``'s Study and Series Instance UIDs (a file's header only); OSError,
        or another exception for a damaged header."""
        source = outgoing.source
        if isinstance(source, Path):
            header: Dataset = dcmread(source, stop_before_pixels=True,
                                      specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            size = source.stat().st_size
        else:
            header = source
            size = len(source.get("PixelData") or b"")
        return _Item(index, outgoing, str(header.get("StudyInstanceUID", "")),
                     str(header.get("SeriesInstanceUID", "")), size)

    def dataset(self) -> Dataset:
        """The whole object, as a Part 10 data set (what the client encodes)."""
        return dcmread(BytesIO(self.outgoing.part10_bytes()))


class DicomWebArchive(Archive):
    """A DICOMweb server: a ``[[destinations]]`` entry with ``kind = "dicomweb"``.

    Keeps one HTTP session (a connection pool) for its lifetime; close it when done, or use it
    as a context manager. Credentials are read from the environment when it is made.
    """

    kind = DestinationKind.DICOMWEB
    searchable = True

    def __init__(self, destination: DicomWebDestination, settings: Settings) -> None:
        if not isinstance(destination, DicomWebDestination):
            raise ValueError(f'destination "{destination.name}" is not a DICOMweb server')
        super().__init__(destination, settings)
        self.destination: DicomWebDestination = destination
        self.url = destination.url.rstrip("/")
        self._session = _session(destination)
        self._client = DICOMwebClient(self.url, session=self._session,
                                      timeout=destination.timeout_s,
                                      # UIDs come from the archive: take them as they are
                                      permissive_uid=True)
        self._client.set_http_retry_params(retry=False)  # ours count attempts and back off

    @property
    def label(self) -> str:
        return f"dicomweb {self.url}"

    def close(self) -> None:
        self._session.close()

    # -- STOW-RS -----------------------------------------------------------------------------

    def send(self, objects: Sequence[ObjectLike], job_id: str, task: str,
             stop: threading.Event | None = None, calling_aet: str | None = None
             ) -> list[DispatchResult]:
        """Store ``objects`` by STOW-RS; one result per object, in order. Never raises for a
        failed object: its result says why. ``stop`` set during a backoff wait cancels the
        retries. DICOMweb has nowhere to mark ``job_id`` and ``task``: they name the transfer
        in logs; ``calling_aet`` does not apply."""

        def make_round(items: list[Outgoing | None]) -> RoundFn:
            def attempt_round(pending: list[int]) -> dict[int, Outcome]:
                outcomes: dict[int, Outcome] = {}
                try:
                    self._round(items, pending, outcomes)
                except _Unreachable as exc:
                    for i in pending:  # the server is down: the rest share the attempt
                        outcomes.setdefault(i, transient(str(exc)))
                for i in pending:
                    item = items[i]
                    if item is not None and i in outcomes:
                        log_outcome(log, self.label, item, outcomes[i], job_id)
                return outcomes
            return attempt_round

        return deliver(self.label, objects, make_round, self.settings.dispatch, stop,
                       what=f"STOW-RS to {self.url} job {job_id} task {task}")

    def _round(self, items: list[Outgoing | None], pending: list[int],
               outcomes: dict[int, Outcome]) -> None:
        """One round: settle the pending objects the server already holds, store the rest in
        batches; raises _Unreachable."""
        # 1. The series each object belongs to.
        by_series: dict[tuple[str, str], list[_Item]] = {}
        for i in pending:
            outgoing = items[i]
            assert outgoing is not None
            try:
                item = _Item.of(i, outgoing)
            except OSError as exc:
                outcomes[i] = permanent(f"file cannot be read ({exc.strerror})")
                continue
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad data
                outcomes[i] = permanent(f"DICOM header cannot be parsed ({type(exc).__name__})")
                continue
            by_series.setdefault((item.study_uid, item.series_uid), []).append(item)
        # 2. Those the server holds already: the same content is sent, another is a clash.
        to_store: list[_Item] = []
        for (study_uid, series_uid), group in by_series.items():
            if not study_uid or not series_uid:
                for item in group:
                    outcomes[item.index] = permanent(
                        "object has no Study or Series Instance UID (0020,000D / 0020,000E)")
                continue
            try:
                held = self._held(study_uid, series_uid)
            except _HttpFailure as exc:
                for item in group:
                    outcomes[item.index] = _failure_outcome(exc)
                continue
            for item in group:
                if item.sop in held:
                    outcomes[item.index] = self._compare_held(item)
                else:
                    to_store.append(item)
        # 3. The others, a few per request.
        for batch in _batches(to_store):
            outcomes.update(self._store(batch))

    def _held(self, study_uid: str, series_uid: str) -> set[str]:
        """The SOP Instance UIDs the server holds in this series."""
        found = self._call("QIDO-RS instances of a series", partial(
            self._client.search_for_instances, study_uid, series_uid, get_remaining=True),
            gone_ok=True)
        return {_value(row, _SOP_UID) for row in found or []} - {""}

    def _compare_held(self, item: _Item, ds: Dataset | None = None) -> Outcome:
        """Sent ("already stored") when the server holds what ``item`` (read: ``ds``) is, else
        permanent."""
        step = "WADO-RS of the stored instance"
        try:
            stored = self._call(step, partial(
                self._client.retrieve_instance, item.study_uid, item.series_uid, item.sop,
                media_types=_ANY_SYNTAX))
        except _HttpFailure as exc:
            return _failure_outcome(exc)
        try:
            differs = difference(stored, item.dataset() if ds is None else ds)
        except OSError as exc:
            return permanent(f"file cannot be read ({exc.strerror})")
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a damaged object
            differs = "the stored object (not readable as DICOM)"
        if not differs:
            return sent("already stored")
        return permanent(
            f"DICOMweb server {self.url} already holds another object with SOP Instance UID "
            f"{item.sop} ({differs} differs): this output would be lost. If the stored one is "
            "stale (made before a settings change), delete it from the server and retry the "
            "job; if two rules make it, give them different settings or destinations")

    def _store(self, batch: list[_Item]) -> dict[int, Outcome]:
        """One STOW-RS request; an outcome per object of ``batch``; raises _Unreachable."""
        step = "STOW-RS"
        outcomes: dict[int, Outcome] = {}
        datasets: dict[int, Dataset] = {}
        for item in batch:
            try:
                datasets[item.index] = item.dataset()
            except OSError as exc:
                outcomes[item.index] = permanent(f"file cannot be read ({exc.strerror})")
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad data
                outcomes[item.index] = permanent(f"object cannot be read or encoded "
                                                 f"({type(exc).__name__})")
        batch = [item for item in batch if item.index in datasets]
        if not batch:
            return outcomes
        try:
            answer = self._call(step, partial(self._client.store_instances,
                                              [datasets[item.index] for item in batch]))
        except _HttpFailure as exc:
            answer = _json_dataset(exc.response)
            if "ReferencedSOPSequence" not in answer and "FailedSOPSequence" not in answer:
                if len(batch) > 1 and not exc.transient:
                    # One bad object may fail the whole request: try each alone.
                    for item in batch:
                        outcomes.update(self._store([item]))
                    return outcomes
                outcomes.update({item.index: _failure_outcome(exc) for item in batch})
                return outcomes
        # PS3.18 10.5.3: Referenced SOP Sequence (stored, maybe with a Warning Reason),
        # Failed SOP Sequence (with a Failure Reason)
        stored = {str(row.get("ReferencedSOPInstanceUID", "")): row.get("WarningReason")
                  for row in answer.get("ReferencedSOPSequence", [])}
        failed = {str(row.get("ReferencedSOPInstanceUID", "")): int(row.get("FailureReason", 0))
                  for row in answer.get("FailedSOPSequence", [])}
        for item in batch:
            if item.sop in stored:
                code = stored[item.sop]
                outcomes[item.index] = sent() if code is None else sent(
                    f"stored with a warning: {status_outcome(int(code)).reason}")
            elif item.sop in failed:
                code = failed[item.sop]
                if code == _DUPLICATE:
                    outcomes[item.index] = self._compare_held(item, datasets[item.index])
                else:
                    outcome = status_outcome(code)
                    outcomes[item.index] = Outcome(
                        False, f"{step} to {self.url} refused it: {outcome.reason}",
                        transient=outcome.transient)
            else:
                outcomes[item.index] = transient(f"the {step} answer of {self.url} does not "
                                                 "name this instance")
        return outcomes

    # -- QIDO-RS, WADO-RS --------------------------------------------------------------------

    def find(self, since: datetime.date, until: datetime.date | None = None
             ) -> list[FoundStudy]:
        """The studies with a Study Date in [since, until], oldest first (QIDO-RS)."""
        span = f"{since:%Y%m%d}-{until:%Y%m%d}" if until else f"{since:%Y%m%d}-"
        rows = self._search("QIDO-RS studies by date", partial(
            self._client.search_for_studies, search_filters={"StudyDate": span},
            fields=["NumberOfStudyRelatedInstances"], get_remaining=True))
        found = [FoundStudy(key=uid, study_uid=uid, study_date=_value(row, _STUDY_DATE),
                            instances=_int(_value(row, _STUDY_INSTANCES)))
                 for row in rows if (uid := _value(row, _STUDY_UID))]
        return sorted(found, key=lambda s: (s.study_date, s.study_uid))

    def series(self, study: FoundStudy) -> list[FoundSeries]:
        """The study's series (QIDO-RS), each with the header of its first instance (WADO-RS
        metadata: every attribute, sequences included, that rules and the own-output check
        read; not the pixels); :class:`StudyGone` when the study is no longer there."""
        uid = study.study_uid
        gone = StudyGone(f"DICOMweb server {self.url} no longer holds study {uid}")
        rows = self._search("QIDO-RS series of a study", partial(
            self._client.search_for_series, uid, fields=["NumberOfSeriesRelatedInstances"],
            get_remaining=True), gone=gone)
        if not rows:
            raise gone
        found = []
        for row in rows:
            series_uid = _value(row, _SERIES_UID)
            if not series_uid:
                continue
            first = self._search("QIDO-RS first instance of a series", partial(
                self._client.search_for_instances, uid, series_uid, limit=1), gone=gone)
            sop = _value(first[0], _SOP_UID) if first else ""
            if sop:
                metadata: Any = self._search("WADO-RS metadata of an instance", partial(
                    self._client.retrieve_instance_metadata, uid, series_uid, sop), gone=gone)
                header = _from_json(metadata[0] if isinstance(metadata, list) else metadata)
            else:  # a series listed without instances: its QIDO answer stands in
                header = _from_json(row)
            found.append(FoundSeries(series_uid, header,
                                     instances=_int(_value(row, _SERIES_INSTANCES))))
        return found

    def fetch(self, study: str, study_uid: str, series_uids: Sequence[str], folder: Path
              ) -> list[Path]:
        """WADO-RS each series of ``series_uids`` into ``folder/<series>/<sop>.dcm``, each
        instance in the transfer syntax the server stores it in; :class:`StudyGone` when the
        study (or a series of it) is no longer there."""
        uid = study_uid or study
        written: list[Path] = []
        for series_uid in series_uids:
            gone = StudyGone(f"DICOMweb server {self.url} no longer holds series {series_uid} "
                             f"of study {uid}")
            step = f"WADO-RS of series {series_uid}"
            target = folder / series_uid
            try:
                target.mkdir(parents=True, exist_ok=True)
                instances = self._search(step, partial(
                    self._client.iter_series, uid, series_uid, media_types=_ANY_SYNTAX),
                    gone=gone)
                # The answer streams in: each instance is read under the same error handling.
                count = 0
                while (ds := self._search(step, partial(next, instances, None),
                                          gone=gone)) is not None:
                    sop = str(ds.get("SOPInstanceUID", ""))
                    if not _FILE_UID.fullmatch(sop):  # it names a file: nothing else
                        raise ArchiveError(f"{step} from {self.url}: an instance without a "
                                           "usable SOP Instance UID", permanent=True)
                    written.append(_write(ds, target / f"{sop}.dcm"))
                    count += 1
                if not count:  # some servers answer an empty 200 rather than 404
                    raise gone
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # (the job waits for space, its attempt not counted)
                raise ArchiveError(f"{step} from {self.url}: cannot write into {target} "
                                   f"({exc.strerror})") from None
        return written

    def problems(self) -> list[ArchiveError]:
        """[] when a QIDO-RS search (one study at most) answers, else one line naming the URL,
        what failed and what to check."""
        d = self.destination
        for var in (d.password_env, d.token_env):
            if var and not os.environ.get(var):
                return [ArchiveError(
                    f"DICOMweb server {self.url}: the environment variable {var} "
                    f"({'password_env' if var == d.password_env else 'token_env'}) is not set: "
                    "export it where the node runs", permanent=True)]
        try:
            self._search("QIDO-RS studies?limit=1",
                         partial(self._client.search_for_studies, limit=1))
        except ArchiveError as exc:
            return [exc]
        return []

    # -- requests ----------------------------------------------------------------------------

    def _search(self, step: str, call: Callable[[], T], gone: StudyGone | None = None) -> T:
        """``call`` for find/series/fetch: ArchiveError (transient or permanent) naming the URL,
        step and status; ``gone`` raised on HTTP 404."""
        try:
            return self._call(step, call)
        except _Unreachable as exc:
            raise ArchiveError(str(exc)) from None
        except _HttpFailure as exc:
            if exc.status == 404 and gone is not None:
                raise gone from None
            raise ArchiveError(str(exc), permanent=not exc.transient) from None

    def _call(self, step: str, call: Callable[[], T], gone_ok: bool = False) -> T:
        """``call``, its failures as _Unreachable or _HttpFailure; with ``gone_ok``, an HTTP 404
        answers None (nothing there)."""
        where = f"DICOMweb server {self.url}"
        try:
            return call()
        except requests.HTTPError as exc:
            rsp = exc.response
            code = rsp.status_code if rsp is not None else 0
            if code == 404 and gone_ok:
                return None  # type: ignore[return-value]
            raise self._http_failure(step, code, rsp) from None
        except requests.exceptions.SSLError as exc:
            raise _HttpFailure(f"{where}: TLS handshake failed ({step}; {type(exc).__name__}):"
                               " is the server's CA in REQUESTS_CA_BUNDLE (or the system's "
                               "trust store), and does its certificate name the host?", 0,
                               False, None) from None
        except requests.Timeout:
            raise _Unreachable(f"{where} did not answer within {self.destination.timeout_s:g} s "
                               f"({step})") from None
        except requests.ConnectionError:
            raise _Unreachable(f"{where} unreachable ({step}: connection failed): is it "
                               "running, and is the url right?") from None
        except requests.RequestException as exc:
            raise _HttpFailure(f"{where}: request failed ({step}): {type(exc).__name__}", 0,
                               True, None) from None
        except (ValueError, KeyError, TypeError) as exc:  # not the answer DICOMweb gives
            raise _HttpFailure(f"{where}: unexpected answer ({step}): {type(exc).__name__}",
                               0, True, None) from None

    def _http_failure(self, step: str, code: int, rsp: requests.Response | None
                      ) -> _HttpFailure:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        reason = f"HTTP {code} {phrase}".rstrip() + f" from DICOMweb server {self.url} ({step})"
        d = self.destination
        if code in (401, 403):
            if d.token_env:
                fix = f"check the bearer token in {d.token_env} (token_env)"
            elif d.username:
                fix = (f'check username "{d.username}" and the password in '
                       f"{d.password_env or '(no password_env)'}")
            else:
                fix = "the server wants credentials: set username and password_env, or token_env"
            reason += f": {fix}"
        elif code == 404 and step.startswith("QIDO-RS studies"):
            reason += ": is url the DICOMweb service root (e.g. https://host/dicom-web)?"
        return _HttpFailure(reason, code, code >= 500 or code in _TRANSIENT_HTTP, rsp)


def _session(destination: DicomWebDestination) -> requests.Session:
    """An HTTP session with the destination's credentials from the environment."""
    session = requests.Session()
    if destination.token_env:
        token = os.environ.get(destination.token_env, "")
        session.headers["Authorization"] = f"Bearer {token}"
    elif destination.username:
        password = os.environ.get(destination.password_env, "") if destination.password_env \
            else ""
        session.auth = (destination.username, password)
    return session


def _batches(items: list[_Item]) -> Iterator[list[_Item]]:
    """``items`` in groups of at most BATCH_OBJECTS objects and BATCH_BYTES bytes."""
    batch: list[_Item] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= BATCH_OBJECTS or size + item.size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch


def _failure_outcome(exc: _HttpFailure) -> Outcome:
    return Outcome(False, str(exc), transient=exc.transient)


def _json_dataset(rsp: requests.Response | None) -> Dataset:
    """An error answer's DICOM JSON body (a STOW-RS Store Instances Response); empty when it
    has none."""
    try:
        body = rsp.json() if rsp is not None and rsp.content else None
        if isinstance(body, list) and len(body) == 1:
            body = body[0]
        return Dataset.from_json(body) if isinstance(body, dict) else Dataset()
    except Exception:  # noqa: BLE001 - not JSON, or not DICOM JSON
        return Dataset()


def _value(row: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object, as text ("" when absent)."""
    values = (row.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _from_json(row: dict[str, Any]) -> Dataset:
    """A data set from DICOM JSON; bulk data (pixels) left empty, not fetched."""
    return Dataset.from_json(row, bulk_data_uri_handler=lambda _tag, _vr, _uri: None)


def _write(ds: Dataset, target: Path) -> Path:
    """``ds`` as a Part 10 file at ``target``, as received, atomically (``.part``, then
    rename)."""
    with atomic_open(target) as f:
        dcmwrite(f, ds, enforce_file_format=True)
    return target



ARCHIVE = DicomWebArchive
