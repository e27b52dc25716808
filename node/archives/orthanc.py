"""An Orthanc over REST: send (upload, then mark), find (``/tools/find``), series (one header
per series) and fetch (download each instance's file).

Sending uploads each object, then marks it with the job and task that produced it. A job's
objects go up ``[orthanc] upload_batch`` at a time as one ZIP archive in one ``POST
/instances`` (Orthanc 1.8.2 and later store each file of it, answering one status per file);
a batch whose answer is anything but a new store for every file (an error, one already
stored, another count) is sent again one object per request, which gives each object its own
outcome: a batch changes how many requests are made, never what counts as sent.

Each instance gets two user metadata (``[orthanc] job_metadata``, ``task_metadata``; Orthanc must
declare them in its ``UserMetadata``), and on Orthanc 1.12+ the job id and task as labels too.
Uploading an instance Orthanc already holds answers ``"Status": "AlreadyStored"`` and changes
nothing. That counts as sent only when what Orthanc holds is what was sent (the MD5 of the
stored file, else the same attributes and pixels but for the time stamps a re-made output gets
anew, and but for generated pixels, which a model need not reproduce bit for bit while the
header records every parameter): retries and re-sends are harmless, and different content under
one SOP Instance UID is a permanent error, never a silent loss.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import threading
import zipfile
from collections.abc import Callable, Sequence
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as orthanc_errors
from pydicom import dcmread
from requests.adapters import HTTPAdapter

from node.archives.base import Archive, ArchiveError, FoundSeries, FoundStudy, StudyGone
from node.archives.outgoing import (
    DispatchResult,
    ObjectLike,
    Outgoing,
    deliver,
    difference,
    log_outcome,
)
from node.archives.retry import Outcome, RoundFn, permanent, sent, transient
from node.config import (
    DestinationKind,
    DispatchSettings,
    OrthancDestination,
    OrthancSettings,
    Settings,
)
from node.files import atomic_write

log = logging.getLogger(__name__)

_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what Orthanc 1.12 accepts as a label
_TRANSIENT_HTTP = {408, 409, 429}  # timeout, concurrent upload of the same instance, busy
_PENDING = transient("not offered yet")
"""The outcome an object of a round has until it is offered (what a lost Orthanc leaves)."""


class _Unreachable(Exception):
    """Orthanc itself did not answer: the rest of the round would fail the same way."""


class _TimeoutAdapter(HTTPAdapter):
    """No retries of its own (ours count attempts and back off) and a default timeout, so that
    every request the client makes is bounded."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(max_retries=0)
        self.timeout_s = timeout_s

    def send(
        self, request: requests.PreparedRequest, stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True, cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        return super().send(request, stream, self.timeout_s if timeout is None else timeout,
                            verify, cert, proxies)


def orthanc_client(orthanc: OrthancSettings) -> OrthancApiClient:
    """An orthanc-api-client for ``[orthanc]`` whose every request is bounded by ``timeout_s``
    and not retried behind our back."""
    client = OrthancApiClient(orthanc.url, user=orthanc.username or None,
                              pwd=orthanc.password or None)
    # The client mounts urllib3 retries (3 connects, backoff) and sets no timeout: replace
    # them, or attempts multiply invisibly and a hung Orthanc hangs us.
    adapter = _TimeoutAdapter(orthanc.timeout_s)
    session = client._http_session
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # DICOM files hardly compress, yet gzip costs both ends CPU (measured: a 39 kB download
    # 3.6 -> 1.05 ms, Orthanc's CPU 1.8 -> 0.15 ms without it).
    session.headers["Accept-Encoding"] = "identity"
    # requests reads proxy and CA settings from the environment on every call (~5 % of a
    # worker's CPU): read them once, here.
    session.proxies.update(requests.utils.get_environ_proxies(orthanc.url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return client


class OrthancDispatcher:
    """Sends objects to the Orthanc of ``[orthanc]``, retrying as ``[dispatch]`` says.

    One instance may serve many :meth:`send` calls (it keeps an HTTP connection pool); close it
    when done, or use it as a context manager.
    """

    def __init__(self, orthanc: OrthancSettings, dispatch: DispatchSettings) -> None:
        self.settings = orthanc
        self.dispatch = dispatch
        self.name = f"orthanc {orthanc.url}"
        self._client = orthanc_client(orthanc)
        self._labels: bool | None = None  # Orthanc >= 1.12, known after the first contact

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OrthancDispatcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def send(
        self, objects: Sequence[ObjectLike], job_id: str, task: str,
        stop: threading.Event | None = None,
    ) -> list[DispatchResult]:
        """Upload ``objects`` and mark them with ``job_id`` and ``task``; one result per object,
        in order. Never raises for a failed object: its result says why. ``stop`` set during a
        backoff wait cancels the remaining retries."""
        if not job_id or not task:
            raise ValueError(f'job id "{job_id}" and task "{task}" must both be non-empty')
        def make_round(items: list[Outgoing | None]) -> RoundFn:
            def attempt_round(pending: list[int]) -> dict[int, Outcome]:
                outcomes: dict[int, Outcome] = {}
                for batch in self._batches(items, pending, outcomes):
                    try:
                        self._send_batch(items, batch, job_id, task, outcomes)
                    except _Unreachable as exc:
                        # The destination is down: the others of this round share the attempt.
                        for j in pending:
                            if j not in outcomes or outcomes[j] is _PENDING:
                                outcomes[j] = transient(str(exc))
                        break
                return outcomes
            return attempt_round

        return deliver(self.name, objects, make_round, self.dispatch, stop,
                       what=f"{self.name} job {job_id} task {task}")

    # -- batches ---------------------------------------------------------------------------

    def _batches(self, items: list[Outgoing | None], pending: list[int],
                 outcomes: dict[int, Outcome]) -> list[list[tuple[int, bytes]]]:
        """``pending`` read and cut into batches of ``upload_batch`` objects and at most
        ``upload_batch_bytes`` (an object bigger alone); one that cannot be read fails here."""
        batches: list[list[tuple[int, bytes]]] = [[]]
        size = 0
        for i in pending:
            item = items[i]
            assert item is not None
            try:
                data = item.part10_bytes()
            except OSError as exc:
                outcomes[i] = permanent(f"file cannot be read ({exc.strerror})")
                continue
            outcomes[i] = _PENDING
            current = batches[-1]
            if current and (len(current) >= self.settings.upload_batch
                            or size + len(data) > self.settings.upload_batch_bytes):
                batches.append(current := [])
                size = 0
            current.append((i, data))
            size += len(data)
        return [b for b in batches if b]

    def _send_batch(self, items: list[Outgoing | None], batch: list[tuple[int, bytes]],
                    job_id: str, task: str, outcomes: dict[int, Outcome]) -> None:
        """One batch: one ZIP upload where it stores every file anew, else (or for a batch of
        one) one request per object; each object's outcome into ``outcomes``. Raises
        _Unreachable."""
        stored = self._upload_zip(batch) if len(batch) > 1 else None
        for n, (i, data) in enumerate(batch):
            item = items[i]
            assert item is not None
            if stored is not None:
                outcomes[i] = self._mark(item, stored[n], "Success", data, job_id, task)
            else:
                outcomes[i] = self._send_one(item, job_id, task, data)
            log_outcome(log, self.name, item, outcomes[i], job_id)

    def _upload_zip(self, batch: list[tuple[int, bytes]]) -> list[str] | None:
        """The Orthanc ids of ``batch``'s objects uploaded in one ZIP archive, in order; None
        when the answer is not one new store per file (each is then sent on its own: what
        Orthanc holds, an error, a file it refused, are then told apart per object)."""
        buffer = BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for n, (_, data) in enumerate(batch):
                archive.writestr(f"{n:06d}.dcm", data)
        try:
            answer = self._call("post", "instances", "POST /instances (ZIP)",
                                data=buffer.getvalue(),
                                headers={"Content-Type": "application/zip"}).json()
        except orthanc_errors.HttpError as exc:
            log.info("%s: a batch of %d objects was refused as a whole (%s): one at a time",
                     self.name, len(batch), exc.http_status_code)
            return None
        except ValueError:  # not JSON
            return None
        if not isinstance(answer, list) or len(answer) != len(batch):
            return None
        try:
            if all(a["Status"] == "Success" for a in answer):
                return [str(a["ID"]) for a in answer]
        except (KeyError, TypeError):
            pass
        return None

    # -- one object ------------------------------------------------------------------------

    def _send_one(self, item: Outgoing, job_id: str, task: str,
                  data: bytes | None = None) -> Outcome:
        """Upload, then set the metadata (and labels); raises _Unreachable."""
        if data is None:
            try:
                data = item.part10_bytes()
            except OSError as exc:
                return permanent(f"file cannot be read ({exc.strerror})")
        step = "POST /instances"
        try:
            answer = self._call("post", "instances", step, data=data).json()
            instance_id, status = str(answer["ID"]), answer.get("Status")
        except orthanc_errors.HttpError as exc:
            return _http_outcome(exc, step)
        except (ValueError, KeyError, TypeError):  # not the JSON Orthanc answers
            return transient(f"unexpected answer from Orthanc to {step}")
        return self._mark(item, instance_id, str(status), data, job_id, task)

    def _mark(self, item: Outgoing, instance_id: str, status: str, data: bytes, job_id: str,
              task: str) -> Outcome:
        """After the upload of ``item`` (``data``) as ``instance_id``: check what Orthanc held
        already, then set the metadata (and labels); raises _Unreachable."""
        step = "POST /instances"
        try:
            if status == "AlreadyStored":
                conflict = self._check_stored(instance_id, data)
                if conflict:
                    return permanent(
                        f"Orthanc at {self.settings.url} already holds another object with SOP "
                        f"Instance UID {item.sop_instance_uid} ({conflict} differs; Orthanc id "
                        f"{instance_id}): this output would be lost. If the stored one is stale "
                        "(made before a settings change), delete it from Orthanc and retry the "
                        "job; if two rules make it, give them different settings or "
                        "destinations")
            for name, value in ((self.settings.job_metadata, job_id),
                                (self.settings.task_metadata, task)):
                step = f"PUT metadata {name}"
                self._call("put", f"instances/{instance_id}/metadata/{name}", step,
                           data=value.encode("utf-8"))
            if self._labels is None:
                step = "GET /system"
                version = self._call("get", "system", step).json().get("Version", "")
                self._labels = has_labels(str(version))
            if self._labels:
                for label in (job_id, task):
                    if _LABEL.match(label):
                        step = f"PUT label {label}"
                        self._call("put", f"instances/{instance_id}/labels/{label}", step)
        except orthanc_errors.HttpError as exc:
            return _http_outcome(exc, step)
        except (ValueError, KeyError, TypeError):  # not the JSON Orthanc answers
            return transient(f"unexpected answer from Orthanc to {step}")
        return sent("already stored" if status == "AlreadyStored" else "")

    def _check_stored(self, instance_id: str, data: bytes) -> str:
        """What differs between the object Orthanc holds under this id and ``data`` ("" when
        nothing that matters); raises as :meth:`_call` does."""
        md5 = self._call("get", f"instances/{instance_id}/attachments/dicom/md5",
                         "GET stored MD5").text.strip()
        if md5 == hashlib.md5(data, usedforsecurity=False).hexdigest():
            return ""
        stored = self._call("get", f"instances/{instance_id}/file", "GET stored file").content
        try:
            return difference(dcmread(BytesIO(stored)), dcmread(BytesIO(data)))
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
            return "the stored file (not readable as DICOM)"

    def _call(self, method: str, endpoint: str, step: str, **kwargs: Any) -> requests.Response:
        try:
            response = getattr(self._client, method)(endpoint, **kwargs)
        except orthanc_errors.ConnectionError:
            raise _Unreachable(f"Orthanc at {self.settings.url} unreachable ({step}: "
                               "connection failed)") from None
        except orthanc_errors.TimeoutError:
            raise _Unreachable(f"Orthanc at {self.settings.url} did not answer within "
                               f"{self.settings.timeout_s:g} s ({step})") from None
        except orthanc_errors.HttpError:
            raise
        except orthanc_errors.OrthancApiException as exc:  # e.g. SSLError
            raise orthanc_errors.HttpError(http_status_code=None, msg=exc.msg) from None
        if response is None:  # the client swallows request errors it does not translate
            raise _Unreachable(f"Orthanc at {self.settings.url}: HTTP request failed ({step})")
        return response


def has_labels(version: str) -> bool:
    """Whether an Orthanc of this ``/system`` Version has labels (1.12+, or a mainline build)."""
    if version.startswith("mainline"):
        return True
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) >= (1, 12)


def _http_outcome(exc: orthanc_errors.HttpError, step: str) -> Outcome:
    """HTTP errors: 5xx and a few 4xx are transient, the other 4xx permanent."""
    code = exc.http_status_code
    if code is None:
        return permanent(f"Orthanc request failed ({step}): {exc.msg}")
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    message = ""
    rsp = exc.request_response
    if rsp is not None:
        try:
            message = str(rsp.json().get("Message", ""))  # Orthanc's error name, no data
        except ValueError:
            message = ""
    reason = f"HTTP {code} {phrase} from Orthanc ({step})" + (f": {message}" if message else "")
    if code in (401, 403):
        return permanent(f"{reason}: check [orthanc] username and password")
    if code == 404 and step.startswith("PUT metadata"):
        return permanent(f"{reason}: Orthanc's configuration must declare this metadata in "
                         "UserMetadata (index >= 1024)")
    if code >= 500 or code in _TRANSIENT_HTTP:
        return transient(reason)
    return permanent(reason)


RestGet = Callable[[str], bytes]
"""GET on Orthanc's REST API (in the plugin: ``orthanc.RestApiGet``, no network); raises
:class:`LookupError` for an unknown resource."""


class OrthancArchive(Archive):
    """One Orthanc: a ``[[destinations]]`` entry with a ``url``, or ``[orthanc]``. Reads go over
    HTTP, or through ``rest`` when given (the plugin, inside Orthanc)."""

    kind = DestinationKind.ORTHANC
    searchable = True

    def __init__(self, destination: OrthancDestination, settings: Settings,
                 rest: RestGet | None = None) -> None:
        super().__init__(destination, settings)
        self.rest_settings = settings.orthanc_named(destination.name)
        self._rest = rest
        self._client: OrthancApiClient | None = None
        self._dispatcher: OrthancDispatcher | None = None

    @property
    def label(self) -> str:
        return f"Orthanc at {self.rest_settings.url}"

    @property
    def client(self) -> OrthancApiClient:
        if self._client is None:
            self._client = orthanc_client(self.rest_settings)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._dispatcher is not None:
            self._dispatcher.close()

    def send(self, objects: Sequence[ObjectLike], job_id: str, task: str,
             stop: threading.Event | None = None, calling_aet: str | None = None
             ) -> list[DispatchResult]:
        if self._dispatcher is None:
            self._dispatcher = OrthancDispatcher(self.rest_settings, self.settings.dispatch)
        return self._dispatcher.send(objects, job_id, task, stop=stop)

    # -- reading -------------------------------------------------------------------------

    def _get(self, path: str) -> bytes:
        """GET ``path``; LookupError for an unknown resource, ArchiveError otherwise."""
        if self._rest is not None:
            return self._rest(path)
        try:
            return bytes(self.client.get_binary(path.lstrip("/")))
        except orthanc_errors.ResourceNotFound:
            raise LookupError(path) from None
        except orthanc_errors.OrthancApiException as exc:
            raise ArchiveError(f"{self.label}: {type(exc).__name__} (GET {path})") from None
        except (requests.RequestException, TypeError, AttributeError) as exc:
            # (the client answers None for request errors it does not translate)
            raise ArchiveError(f"{self.label}: {type(exc).__name__} (GET {path})") from None

    def _json(self, path: str) -> Any:
        return json.loads(self._get(path))

    def find(self, since: datetime.date, until: datetime.date | None = None
             ) -> list[FoundStudy]:
        span = f"{since:%Y%m%d}-{until:%Y%m%d}" if until else f"{since:%Y%m%d}-"
        query = {"Level": "Study", "Query": {"StudyDate": span}, "Expand": True}
        try:
            found = self.client.post("tools/find", json=query).json()
        except orthanc_errors.OrthancApiException as exc:
            raise ArchiveError(f"{self.label}: {type(exc).__name__} (POST /tools/find)") \
                from None
        except (requests.RequestException, AttributeError):
            # (the client answers None when the request itself failed)
            raise ArchiveError(f"{self.label} is unreachable") from None
        studies = [FoundStudy(str(s["ID"]), str(s["MainDicomTags"].get("StudyInstanceUID", "")),
                              str(s["MainDicomTags"].get("StudyDate", "")), 0) for s in found]
        return sorted(studies, key=lambda s: (s.study_date, s.key))

    def count(self, study: FoundStudy) -> int:
        try:
            return len(self._json(f"/studies/{study.key}/instances"))
        except LookupError:
            raise StudyGone(f'{self.label} has no study "{study.key}"') from None

    def series(self, study: FoundStudy) -> list[FoundSeries]:
        """One header per series (its first instance's), with the AE titles Orthanc recorded;
        series the node sent with its job metadata are marked ``own``."""
        try:
            found = self._json(f"/studies/{study.key}")
        except LookupError:
            raise StudyGone(f'{self.label} has no study "{study.key}"') from None
        series: list[FoundSeries] = []
        for series_id in found["Series"]:
            try:
                instances = self._json(f"/series/{series_id}")["Instances"]
                first = instances[0]
                metadata = self._json(f"/instances/{first}/metadata?expand")
                header = dcmread(BytesIO(self._get(f"/instances/{first}/file")),
                                 stop_before_pixels=True)
            except LookupError:  # (deleted between the two reads)
                continue
            series.append(FoundSeries(
                str(header.SeriesInstanceUID), header, len(instances),
                calling_aet=str(metadata.get("RemoteAET", "")),
                called_aet=str(metadata.get("CalledAET", "")),
                own=self.rest_settings.job_metadata in metadata,
            ))
        return series

    def fetch(self, study: str, study_uid: str, series_uids: Sequence[str], folder: Path
              ) -> list[Path]:
        files = []
        wanted = set(series_uids)
        try:
            found = self._json(f"/studies/{study}")
            for series_id in found["Series"]:
                series = self._json(f"/series/{series_id}")
                series_uid = series["MainDicomTags"].get("SeriesInstanceUID")
                if series_uid not in wanted:
                    continue
                (folder / series_uid).mkdir(parents=True, exist_ok=True)
                for instance in series["Instances"]:
                    path = folder / series_uid / f"{instance}.dcm"
                    atomic_write(path, self._get(f"/instances/{instance}/file"))
                    files.append(path)
        except LookupError:
            raise StudyGone(f"study {study} is no longer in {self.label}") from None
        except ArchiveError as exc:
            raise ArchiveError(f"cannot fetch study {study} from {exc}") from None
        except (TypeError, KeyError) as exc:
            raise ArchiveError(f"cannot fetch study {study} from {self.label}: "
                               f"{type(exc).__name__}") from None
        return files


ARCHIVE = OrthancArchive


def send_to_orthanc(
    objects: Sequence[ObjectLike], settings: Settings, job_id: str, task: str,
    stop: threading.Event | None = None, orthanc: OrthancSettings | None = None,
) -> list[DispatchResult]:
    """Upload ``objects`` to ``orthanc`` (default: ``[orthanc]``), marked with ``job_id`` and
    ``task``."""
    with OrthancDispatcher(orthanc or settings.orthanc, settings.dispatch) as dispatcher:
        return dispatcher.send(objects, job_id, task, stop=stop)
