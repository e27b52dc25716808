"""Prometheus metrics of every process of a node (serve, its workers), gathered at ``/metrics``.

``serve`` calls :func:`setup` first: prometheus-client's multiprocess mode, each process writing
its counters into its own memory-mapped file in one folder (``PROMETHEUS_MULTIPROC_DIR``, which
the worker processes inherit), summed at scrape time by :func:`exposition`. A process that never
called :func:`setup` (a test, a one-off command) counts in its own memory, and the same
functions work. Only counters and histograms live here: what is a level (queue depth, jobs by
state, disk free) is computed at scrape time by a collector the console passes to
:func:`exposition`, so no gauge needs multiprocess bookkeeping and a dead process leaves
nothing stale.

Labels are fixed words and destination names, never free text: no UID, no patient data.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

ENV = "PROMETHEUS_MULTIPROC_DIR"

RECEIVE_OUTCOMES = ("stored", "duplicate", "refused", "failed", "below_reserve")
"""Outcomes of one received instance."""
SOURCES = ("dicom", "stow")
"""How an instance arrived: C-STORE, or STOW-RS."""
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "aborted")

JOB_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Job attempt durations: a de-identification takes a second, a generation minutes."""

_lock = threading.Lock()

RECEIVED = Counter("synthnode_received_instances", "Instances received, by outcome and source",
                   ("outcome", "source"), registry=None)
RECEIVED_BYTES = Counter("synthnode_received_bytes",
                         "Bytes of the instances received, by outcome and source",
                         ("outcome", "source"), registry=None)
ASSOCIATIONS = Counter("synthnode_associations", "DICOM associations, by outcome",
                       ("outcome",), registry=None)
DELIVERED = Counter("synthnode_delivered_objects",
                    "Objects sent to a destination (result ok) or given up on (failed)",
                    ("destination", "result"), registry=None)
QUARANTINED = Counter("synthnode_quarantined", "Instances or outputs quarantined, by kind",
                      ("kind",), registry=None)
JOB_SECONDS = Histogram("synthnode_job_duration_seconds",
                        "Job attempt durations, by task and the state the attempt ended in",
                        ("task", "state"), buckets=JOB_BUCKETS_S, registry=None)

METRICS = (RECEIVED, RECEIVED_BYTES, ASSOCIATIONS, DELIVERED, QUARANTINED, JOB_SECONDS)


def setup(directory: Path) -> None:
    """Make this process (and the workers it starts later) record into ``directory``
    (prometheus-client's multiprocess mode); serve calls it first, emptying the folder."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():  # what processes of an earlier run counted
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    with _lock:
        # prometheus-client picks its value class (in memory, or memory-mapped files) when it
        # is imported; this module was imported before: drop the children made so far (before
        # the switch: clearing is not implemented in multiprocess mode) so that each label set
        # is made anew, then pick the multiprocess value class.
        for metric in METRICS:
            metric.clear()
        os.environ[ENV] = str(directory)
        values.ValueClass = values.get_value_class()


def multiprocess_dir() -> Path | None:
    """The folder of multiprocess mode, None when this process counts in memory."""
    value = os.environ.get(ENV, "")
    return Path(value) if value and values.ValueClass is not values.MutexValue else None


def _word(value: str, allowed: Iterable[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f'{what} "{value}" is not one of {", ".join(allowed)}')
    return value


def received(status: str, nbytes: int = 0, source: str = "dicom") -> None:
    """One instance received (C-STORE or STOW-RS) with its outcome: "stored", "duplicate",
    "refused", "failed", "below_reserve"; ``source``: "dicom" (C-STORE) or "stow"."""
    labels = (_word(status, RECEIVE_OUTCOMES, "receive outcome"),
              _word(source, SOURCES, "source"))
    RECEIVED.labels(*labels).inc()
    if nbytes > 0:
        RECEIVED_BYTES.labels(*labels).inc(nbytes)


def association(outcome: str) -> None:
    """One association: "accepted", "rejected", "aborted"."""
    ASSOCIATIONS.labels(_word(outcome, ASSOCIATION_OUTCOMES, "association outcome")).inc()


def job_finished(task: str, state: str, seconds: float) -> None:
    """A job attempt ended in ``state`` (done, review, pending (retry), dead) after
    ``seconds``."""
    JOB_SECONDS.labels(task, state).observe(max(0.0, seconds))


def delivered(destination: str, objects: int, ok: bool) -> None:
    """``objects`` sent to ``destination`` (ok) or not delivered (failed)."""
    if objects > 0:
        DELIVERED.labels(destination, "ok" if ok else "failed").inc(objects)


def quarantined(kind: str, count: int = 1) -> None:
    """``count`` instances or outputs quarantined; ``kind`` is a short fixed word (e.g.
    "deid", "validation", "copy", "burned_in"), never a free text."""
    if count > 0:
        QUARANTINED.labels(kind).inc(count)


class _Local(Collector):
    """This process's own metrics (no multiprocess mode)."""

    def collect(self) -> Iterable[Any]:
        for metric in METRICS:
            yield from metric.collect()


def exposition(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition of every process's metrics (multiprocess mode), or of this process's
    (without :func:`setup`), followed by ``extra`` collectors (levels computed now)."""
    registry = CollectorRegistry(auto_describe=False)
    folder = multiprocess_dir()
    if folder is not None:
        MultiProcessCollector(registry, str(folder))
    else:
        registry.register(_Local())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class MetricsServer:
    """``/metrics`` on its own port, for a process without the console: a worker started by
    hand on another machine (``synthnode worker --metrics-port``), whose counts serve's
    console cannot see. Loopback by default; the text holds no patient data (labels are fixed
    words and destination names)."""

    def __init__(self, host: str, port: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = exposition()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # (a scrape every few seconds is not worth a log line)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
