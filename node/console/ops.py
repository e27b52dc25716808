"""Operations endpoints of the console port: ``/metrics`` (Prometheus), ``/healthz`` (the
process answers) and ``/readyz`` (the node can take in and hand on work).

None of the three asks for a login: they carry counts, states, queue and destination names,
free bytes and the node's own check texts, never a UID of a study or patient data, and the
console listens on localhost unless told otherwise (``[console] host``). A Prometheus on another
machine scrapes it through TLS (``[console] tls_certificate``) or a reverse proxy; see
``config/prometheus/synthnode.yml``.

``/metrics`` sums the counters and histograms of every process of the node (serve and its
workers: :mod:`node.metrics`) and adds levels computed at scrape time (:class:`NodeCollector`):
queue depth per queue, jobs by state, spool instances and bytes, free bytes and reserve of the
spool's, work folder's and quarantine's file systems.

``/readyz`` answers 200 only when every check holds (spool writable: a probe written, fsynced
and removed; every guarded file system above the reserve; the queue backend answers; Orthanc
answers ``/system`` with the node's credentials within 2 s; the generation model's files are
whole where a rule generates), else 503 with a JSON object naming each failing check and its
fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests
from fastapi import APIRouter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, PlainTextResponse, Response

from node import metrics
from node.archives.orthanc import orthanc_client
from node.config import Settings
from node.console.context import ConsoleContext
from node.preflight import Level, check_model
from node.reserve import DiskReserve
from node.spool import SpoolError
from node.spool.spool import INDEX_NAME

log = logging.getLogger(__name__)

ORTHANC_TIMEOUT_S = 2.0
PROBE_NAME = "readyz.probe"
"""The file ``/readyz`` writes, fsyncs and removes in the spool's temporary folder."""
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _areas(settings: Settings) -> tuple[tuple[str, Path], ...]:
    return (("spool", settings.spool.dir), ("work", settings.jobs.work_dir),
            ("quarantine", settings.output.quarantine_dir))


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class NodeCollector(Collector):
    """The node's levels, computed at each scrape. A source that fails (a backend down) leaves
    its metrics out and is logged; the others are still reported."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self.reserve = DiskReserve.for_settings(ctx.settings)

    def collect(self) -> Iterable[Any]:
        for source in (self._queues, self._jobs, self._spool, self._disks):
            try:
                yield from source()
            except Exception as exc:  # noqa: BLE001 - one source down must not hide the rest
                log.warning("metrics: %s not collected (%s: %s)", source.__name__.strip("_"),
                            type(exc).__name__, exc)

    def _queues(self) -> Iterable[Any]:
        family = GaugeMetricFamily("synthnode_queue_depth", "Jobs waiting per queue (scheduled "
                                   "retries not counted)", labels=["queue"])
        for queue, size in sorted(self.ctx.queues.sizes().items()):
            family.add_metric([str(queue)], size)
        yield family

    def _jobs(self) -> Iterable[Any]:
        family = GaugeMetricFamily("synthnode_jobs", "Jobs by state", labels=["state"])
        for state, n in sorted(self.ctx.queues.store.count_by_state().items()):
            family.add_metric([str(state)], n)
        yield family

    def _spool(self) -> Iterable[Any]:
        # A read-only connection of its own: a scrape never waits for the receiver's writer.
        index = self.ctx.spool.dir / INDEX_NAME
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=2.0)
        try:
            count, size = db.execute(
                "SELECT count(*), total(size_bytes) FROM instances").fetchone()
        finally:
            db.close()
        yield GaugeMetricFamily("synthnode_spool_instances", "Instances in the spool",
                                value=count)
        yield GaugeMetricFamily("synthnode_spool_bytes", "Bytes of the instances in the spool",
                                value=size)

    def _disks(self) -> Iterable[Any]:
        free = GaugeMetricFamily("synthnode_disk_free_bytes", "Free bytes (for the node's user) "
                                 "of the file system of each area", labels=["area"])
        kept = GaugeMetricFamily("synthnode_disk_reserve_bytes", "The reserve kept free on each "
                                 "area's file system ([spool] reserve_bytes, reserve_percent)",
                                 labels=["area"])
        for area, path in _areas(self.ctx.settings):
            st = os.statvfs(_existing(path))
            free.add_metric([area], st.f_bavail * st.f_frsize)
            kept.add_metric([area], self.reserve.needed(path))
        yield free
        yield kept


# -- readiness --------------------------------------------------------------------------------

Check = Callable[[], str | None]
"""A readiness check: None when it holds, else what is wrong and how to fix it."""


def check_spool(ctx: ConsoleContext) -> str | None:
    probe = ctx.spool.tmp_dir / PROBE_NAME
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"synthnode readyz\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return (f"{ctx.spool.tmp_dir} cannot be written ({SpoolError.of(exc).reason}): fix the "
                "spool's disk or permissions ([spool] dir); instances are refused meanwhile")
    return None


def check_disk(reserve: DiskReserve) -> str | None:
    short = reserve.check_now()
    return str(short) if short is not None else None


def check_queues(ctx: ConsoleContext) -> str | None:
    try:
        ctx.queues.sizes()
    except Exception as exc:  # noqa: BLE001 - any backend error means not ready
        return (f"the {ctx.settings.jobs.backend.value} queue backend does not answer "
                f"({type(exc).__name__}): start it or fix [jobs] sqlite_file / redis_url")
    return None


def check_orthanc(settings: Settings) -> str | None:
    orthanc = settings.orthanc
    client = orthanc_client(orthanc.model_copy(update={"timeout_s": ORTHANC_TIMEOUT_S}))
    url = orthanc.url.rstrip("/")
    try:
        answer = client._http_session.get(f"{url}/system")
    except requests.RequestException as exc:
        return (f"Orthanc at {url} does not answer /system within {ORTHANC_TIMEOUT_S:g} s "
                f"({type(exc).__name__}): start it or fix [orthanc] url; outputs wait "
                "meanwhile")
    finally:
        client.close()
    if answer.status_code in (401, 403):
        return (f"Orthanc at {url} refuses the node's credentials (HTTP {answer.status_code}): "
                "fix [orthanc] username and SYNTHNODE__ORTHANC__PASSWORD")
    if not answer.ok:
        return f"Orthanc at {url} answers /system with HTTP {answer.status_code}: fix [orthanc] url"
    return None


def check_generation_model(settings: Settings) -> str | None:
    fatal = [f for f in check_model(settings) if f.level is Level.FATAL]
    if not fatal:
        return None
    return "; ".join(f"{f.check}: {f.message}" for f in fatal)


def readiness(ctx: ConsoleContext, reserve: DiskReserve) -> dict[str, str]:
    """Each failing check's name and its message (empty: ready)."""
    checks: dict[str, Check] = {
        "spool": lambda: check_spool(ctx),
        "disk": lambda: check_disk(reserve),
        "queues": lambda: check_queues(ctx),
        "orthanc": lambda: check_orthanc(ctx.settings),
        "model": lambda: check_generation_model(ctx.settings),
    }
    failing = {}
    for name, check in checks.items():
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failing check
            problem = f"the check itself failed ({type(exc).__name__})"
        if problem is not None:
            failing[name] = problem
    return failing


def ops_router(ctx: ConsoleContext) -> APIRouter:
    """``GET /metrics``, ``/healthz``, ``/readyz``: no login (see the module docstring)."""
    router = APIRouter()
    collector = NodeCollector(ctx)
    reserve = DiskReserve.for_settings(ctx.settings)

    @router.get("/healthz")
    def healthz() -> Response:
        return PlainTextResponse("ok")

    @router.get("/readyz")
    def readyz() -> Response:
        failing = readiness(ctx, reserve)
        if failing:
            return JSONResponse({"ready": False, "failing": failing}, status_code=503)
        return JSONResponse({"ready": True, "failing": {}})

    @router.get("/metrics")
    def scrape() -> Response:
        return Response(metrics.exposition([collector]), media_type=METRICS_TYPE)

    return router
