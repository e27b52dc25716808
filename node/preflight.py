"""Preflight: what a start would meet, checked before anything starts (``synthnode check``).

Each check gives one :class:`Finding`: ok, a warning (the node can run; something will wait or
fail later), or fatal (a start would fail or do harm; the message names the fix). ``synthnode
serve`` runs the same checks first (:func:`startup_check`): a fatal finding stops it before any
worker starts or port opens; warnings are logged.

What is checked, in order:

1. the de-identification key: present when a rule de-identifies, strong enough
   (:mod:`node.keys`), the one the node's state was made with (its recorded fingerprint);
2. the secrets rules need: each destination's ``password_env`` variable;
3. the listening ports are free (:func:`listen_addresses`) and the TLS certificates, keys and
   CA files load (listener and TLS destinations);
4. the spool, work and quarantine folders are writable and above the free-space reserve;
5. the queue backend: the SQLite file's folder writable, or Redis answering PING;
6. every destination: an Orthanc answers ``/system`` with its credentials and declares the user
   metadata the node writes; a DICOM peer answers C-ECHO. A destination no rule sends to is
   checked too, its problems as warnings;
7. dciodvfy when ``[output] validate`` is on;
8. the generation model when a rule generates (or a pixel rule inpaints): found, and its
   weights whole (configs parse, weight files present and as long as their headers say).

Messages never hold a secret: keys, passwords and credentials inside URLs are left out.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from node.config import (
    Destination,
    DicomDestination,
    OrthancDestination,
    OrthancSettings,
    QueueBackend,
    Settings,
    TaskKind,
)
from node.keys import KeyRecord, key_fingerprint, key_problem

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""The longest any one network probe waits."""
_PROBE_INSTANCE = "synthnode-preflight-probe"
"""An Orthanc instance id that never exists (Orthanc's ids are SHA-1 digests in hex)."""
# Orthanc's error codes (OrthancFramework Enumerations.h) answering
# GET /instances/<unknown id>/metadata/<name>: 17 when the name is a declared (or built-in)
# metadata and only the instance is unknown; 7 when the name itself is unknown. Measured on
# Debian's Orthanc 1.10.1.
_UNKNOWN_RESOURCE, _INEXISTENT_ITEM = 17, 7


class Level(StrEnum):
    """How bad a finding is."""

    OK = "ok"
    """Nothing to do."""

    WARNING = "warning"
    """The node can start; something will wait or fail later (the message says what)."""

    FATAL = "FATAL"
    """A start would fail or do harm: ``serve`` refuses to start; the message names the fix."""


@dataclass(frozen=True)
class Finding:
    """One check's verdict."""

    check: str
    level: Level
    message: str

    def __str__(self) -> str:
        return f"{self.level.value:<7}  {self.check}: {self.message}"


@dataclass
class Report:
    """Every finding of one preflight."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def fatal(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.FATAL]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.WARNING]

    @property
    def exit_status(self) -> int:
        """0 when nothing is fatal (warnings allowed), 1 otherwise."""
        return 1 if self.fatal else 0

    def summary(self) -> str:
        ok = len(self.findings) - len(self.fatal) - len(self.warnings)
        return f"{ok} ok, {len(self.warnings)} warnings, {len(self.fatal)} fatal"


def needs_deid_key(settings: Settings) -> list[str]:
    """The rules whose tasks de-identify (and so need ``[deid] key``)."""
    return [r.name for r in settings.rules
            if any(t.task is TaskKind.DEIDENTIFY or (
                t.task is not TaskKind.FORWARD and t.deidentified_source) for t in r.tasks)]


def needs_model(settings: Settings) -> list[str]:
    """The rules whose tasks generate images (and so need ``[generate] model``)."""
    return [r.name for r in settings.rules
            if any(t.task.synthetic for t in r.tasks)]


def destinations_in_use(settings: Settings) -> set[str]:
    """The destination names rules send to ("orthanc" for ``[orthanc]``)."""
    return {target for rule in settings.rules
            for target in [*rule.destinations,
                           *(t for task in rule.tasks for t in task.destinations or ())]}


def listen_addresses(settings: Settings) -> list[tuple[str, str, int]]:
    """(setting, host, port) of every socket ``serve`` listens on."""
    node = settings.node
    found = [("[node] port", node.host, node.port)] if node.listens_plain else []
    if node.tls is not None:
        found.append(("[node.tls] port", node.host, node.tls.port))
    return found


def check_tls(settings: Settings) -> list[Finding]:
    """Every certificate, key and CA file the listener and the TLS destinations use loads."""
    from node.tls import tls_problems

    uses_tls = settings.node.tls is not None or any(
        isinstance(d, DicomDestination) and d.tls for d in settings.destinations)
    if not uses_tls:
        return []
    problems = tls_problems(settings)
    if problems:
        return [Finding("TLS", Level.FATAL, problem) for problem in problems]
    return [Finding("TLS", Level.OK, "certificates, keys and CA files load")]


def _safe_url(url: str) -> str:
    """``url`` without the credentials it may carry."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _writable_place(path: Path) -> Path | None:
    """The nearest existing folder at or above ``path`` if we may create and write there,
    else None."""
    where = path.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    if where.is_file():
        return where if os.access(where, os.W_OK) else None
    return where if os.access(where, os.W_OK | os.X_OK) else None


# -- 1, 2: key and secrets ---------------------------------------------------------------------


def check_key(settings: Settings) -> list[Finding]:
    """The de-identification key: present, strong, and the one the node's state was made with."""
    key = settings.deid.key
    rules = needs_deid_key(settings)
    name = "deid key"
    if not rules:
        if key and (problem := key_problem(key)):
            return [Finding(name, Level.WARNING, f"no rule de-identifies, but {problem}")]
        return [Finding(name, Level.OK, "no rule de-identifies")]
    if not key:
        return [Finding(name, Level.FATAL, f"rules {', '.join(rules)} de-identify, and "
                        f"{key_problem(key)}")]
    if problem := key_problem(key):
        return [Finding(name, Level.FATAL, problem)]
    record = KeyRecord(settings.spool.dir)
    try:
        changed = record.mismatch(key)
        recorded = record.recorded()
    except ValueError as exc:
        return [Finding(name, Level.FATAL, str(exc))]
    if changed:
        return [Finding(name, Level.FATAL, changed)]
    fingerprint = key_fingerprint(key)
    if recorded is None:
        return [Finding(name, Level.OK, f"strong; fingerprint {fingerprint}, recorded in "
                        f"{record.path} at the first start")]
    return [Finding(name, Level.OK, f"strong; fingerprint {fingerprint} matches the recorded one")]


def check_secrets(settings: Settings, environ: Mapping[str, str]) -> list[Finding]:
    """The password variables destinations name (values never shown)."""
    used = destinations_in_use(settings)
    found: list[Finding] = []
    for d in settings.destinations:
        secret_env = "" if isinstance(d, DicomDestination) else d.password_env
        if not secret_env:
            continue
        name = f"secret {secret_env}"
        if environ.get(secret_env):
            found.append(Finding(name, Level.OK, f'set (destination "{d.name}")'))
            continue
        level = Level.FATAL if d.name in used else Level.WARNING
        found.append(Finding(name, level, f'destination "{d.name}" takes its password from '
                             f"${secret_env}, which is not set: export it before starting"))
    if "orthanc" in used and settings.orthanc.username and not settings.orthanc.password:
        found.append(Finding("secret SYNTHNODE__ORTHANC__PASSWORD", Level.WARNING,
                             "[orthanc] username is set but no password: set "
                             "SYNTHNODE__ORTHANC__PASSWORD if Orthanc asks for one"))
    return found


# -- 3, 4, 5: ports, folders, queues -----------------------------------------------------------


def check_ports(addresses: Iterable[tuple[str, str, int]]) -> list[Finding]:
    """Each address can be bound as the SCP binds it (SO_REUSEADDR: only a listener blocks)."""
    found: list[Finding] = []
    for setting, host, port in addresses:
        name = f"port {host}:{port}"
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
        except OSError as exc:
            why = ("in use (another synthnode serve, or another DICOM server?)"
                   if exc.errno == 98 else exc.strerror or str(exc))
            found.append(Finding(name, Level.FATAL, f"cannot listen: {why}; stop what holds it "
                                 f"or choose another {setting}"))
            continue
        found.append(Finding(name, Level.OK, "free"))
    return found


def check_folders(settings: Settings) -> list[Finding]:
    """The spool, work and quarantine folders can be written, with room above the reserve."""
    from node.reserve import DiskReserve

    found: list[Finding] = []
    for setting, path in (("[spool] dir", settings.spool.dir),
                          ("[jobs] work_dir", settings.jobs.work_dir),
                          ("[output] quarantine_dir", settings.output.quarantine_dir)):
        if _writable_place(path) is None:
            found.append(Finding(f"folder {setting}", Level.FATAL,
                                 f"{path} cannot be created or written by this user: fix its "
                                 f"permissions or point {setting} elsewhere"))
    shortfall = DiskReserve.for_settings(settings).check_now()
    if shortfall is not None:
        found.append(Finding("disk reserve", Level.WARNING,
                             f"{shortfall}. Until then new instances are refused (0xA700) and "
                             "jobs that write wait"))
    else:
        found.append(Finding("disk reserve", Level.OK, "every folder's file system is above "
                             "the reserve"))
    return found


def check_queue(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> list[Finding]:
    """The queue backend: the SQLite file can be written, or Redis answers PING."""
    jobs = settings.jobs
    name = f"queue {jobs.backend.value}"
    if jobs.backend is QueueBackend.SQLITE:
        if _writable_place(jobs.sqlite_file) is None:
            return [Finding(name, Level.FATAL, f"{jobs.sqlite_file} cannot be created or "
                            "written by this user: fix its permissions or set [jobs] "
                            "sqlite_file")]
        return [Finding(name, Level.OK, f"{jobs.sqlite_file} writable")]
    import redis

    url = _safe_url(jobs.redis_url)
    try:
        client = redis.Redis.from_url(jobs.redis_url, socket_connect_timeout=timeout_s,
                                      socket_timeout=timeout_s)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as exc:
        return [Finding(name, Level.FATAL, f"Redis at {url} does not answer PING "
                        f"({type(exc).__name__}: {exc}): start redis-server there, or fix "
                        "[jobs] redis_url (a password belongs in SYNTHNODE__JOBS__REDIS_URL)")]
    return [Finding(name, Level.OK, f"Redis at {url} answers PING")]


# -- 6: destinations ---------------------------------------------------------------------------


def check_orthanc(orthanc: OrthancSettings, label: str, how_to_log_in: str,
                  timeout_s: float = PROBE_TIMEOUT_S) -> list[Finding]:
    """``/system`` answers with these credentials, and both user metadata are declared."""
    import requests

    from node.archives.orthanc import orthanc_client

    name = f"destination {label}"
    url = _safe_url(orthanc.url)
    client = orthanc_client(orthanc.model_copy(update={
        "timeout_s": min(orthanc.timeout_s, timeout_s)}))
    session = client._http_session
    base = orthanc.url.rstrip("/")
    try:
        try:
            answer = session.get(f"{base}/system")
        except requests.RequestException as exc:
            return [Finding(name, Level.WARNING, f"Orthanc at {url} does not answer "
                            f"({type(exc).__name__}): outputs wait and are retried; start it "
                            "or fix its url")]
        if answer.status_code in (401, 403):
            return [Finding(name, Level.FATAL, f"Orthanc at {url} refuses the credentials "
                            f"(HTTP {answer.status_code}): the username or password is wrong; "
                            f"{how_to_log_in}")]
        try:
            version = str(answer.json()["Version"]) if answer.ok else ""
        except (ValueError, KeyError, TypeError):
            version = ""
        if not version:
            return [Finding(name, Level.FATAL, f"{url}/system answers HTTP "
                            f"{answer.status_code} without an Orthanc version: is this "
                            "Orthanc's REST API? Fix the url")]
        found = [Finding(name, Level.OK, f"Orthanc {version} at {url} accepts the credentials")]
        missing: list[str] = []
        unsure: list[str] = []
        for metadata in (orthanc.job_metadata, orthanc.task_metadata):
            probe = session.get(f"{base}/instances/{_PROBE_INSTANCE}/metadata/{metadata}")
            try:
                code = int(probe.json().get("OrthancStatus", -1))
            except (ValueError, AttributeError, TypeError):
                code = -1
            if code == _INEXISTENT_ITEM:
                missing.append(metadata)
            elif code != _UNKNOWN_RESOURCE:
                unsure.append(f"{metadata} (HTTP {probe.status_code})")
        if missing:
            declare = ", ".join(f'"{m}": {1024 + i}' for i, m in enumerate(missing))
            found.append(Finding(name, Level.FATAL, f"Orthanc at {url} does not declare the "
                                 f"user metadata {', '.join(missing)} the node writes on every "
                                 "output (each delivery would fail, retried until "
                                 "dead-lettered): add \"UserMetadata\": {" + declare + "} "
                                 "(indices 1024-65535) to Orthanc's configuration and restart "
                                 "it, or set [orthanc] job_metadata / task_metadata to names "
                                 "it declares"))
        elif unsure:
            found.append(Finding(name, Level.WARNING, f"could not tell whether Orthanc at {url} "
                                 f"declares the user metadata {', '.join(unsure)}"))
        else:
            found.append(Finding(name, Level.OK, f"declares the user metadata "
                                 f"{orthanc.job_metadata}, {orthanc.task_metadata}"))
        return found
    except requests.RequestException as exc:
        return [Finding(name, Level.WARNING, f"Orthanc at {url} stopped answering "
                        f"({type(exc).__name__})")]
    finally:
        client.close()


def check_peer(destination: DicomDestination, settings: Settings,
               timeout_s: float = PROBE_TIMEOUT_S) -> list[Finding]:
    """The DICOM peer accepts an association from ``[node] ae_title`` and answers C-ECHO."""
    from pynetdicom import evt

    from node.archives.dimse import open_association, tls_args
    from node.dicomnet import make_ae
    from node.receive.contexts import VERIFICATION
    from node.tls import TLSError

    d = destination
    name = f'destination "{d.name}"'
    where = f"{d.ae_title}@{d.host}:{d.port}"
    ae = make_ae(settings.node.ae_title, settings.node, timeout_s=timeout_s)
    ae.add_requested_context(VERIFICATION)
    answers: list[object] = []
    try:
        tls = tls_args(d, settings.node)
    except TLSError as exc:
        return [Finding(name, Level.FATAL, str(exc))]
    assoc, why_not = open_association(ae, d, tls, evt_handlers=[
        (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))])
    if assoc is None:
        return [Finding(name, Level.WARNING, f"{why_not}: outputs wait and are retried")]
    if not assoc.is_established:
        permanent = any(getattr(a, "result", None) == 0x01 for a in answers)
        if assoc.is_rejected and permanent:
            return [Finding(name, Level.FATAL, f"{where} rejects associations from "
                            f"{settings.node.ae_title} permanently: register that AE title "
                            "(and this host) at the peer, or fix the destination's ae_title")]
        return [Finding(name, Level.WARNING, f"{why_not or where}: outputs wait and are "
                        "retried; start it or fix its host and port")]
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code != 0:
        return [Finding(name, Level.WARNING, f"{where} accepts associations but C-ECHO "
                        f"answers {code:#06x}")]
    return [Finding(name, Level.OK, f"{where} answers C-ECHO as {settings.node.ae_title}")]


def check_archive(destination: Destination, settings: Settings) -> list[Finding]:
    """Any other kind: what its archive's own probe finds."""
    from node.archives import ArchiveError, open_archive

    name = f'destination "{destination.name}"'
    try:
        with open_archive(destination, settings) as archive:
            problems = archive.problems()
            label = archive.label
    except ArchiveError as exc:
        problems, label = [exc], destination.name
    if problems:  # (one that mends by itself, a server not up yet, only delays: a warning)
        return [Finding(name, Level.FATAL if p.permanent else Level.WARNING, str(p))
                for p in problems]
    return [Finding(name, Level.OK, f"{label} answers")]


def check_destinations(settings: Settings, environ: Mapping[str, str]) -> list[Finding]:
    """Every destination; problems of one no rule sends to are only warnings."""
    used = destinations_in_use(settings)
    found: list[Finding] = []

    def add(results: list[Finding], in_use: bool) -> None:
        for f in results:
            if f.level is Level.FATAL and not in_use:
                f = Finding(f.check, Level.WARNING, f"{f.message} (no rule sends there)")
            found.append(f)

    if "orthanc" in used:
        add(check_orthanc(settings.orthanc, "orthanc ([orthanc])",
                          "set [orthanc] username and SYNTHNODE__ORTHANC__PASSWORD"), True)
    for d in settings.destinations:
        if isinstance(d, OrthancDestination):
            login = (f'set the destination\'s username and ${d.password_env}' if d.password_env
                     else 'set the destination\'s username and password_env')
            add(check_orthanc(d.orthanc_settings(settings.orthanc, dict(environ)),
                              f'"{d.name}"', login), d.name in used)
        elif isinstance(d, DicomDestination):
            add(check_peer(d, settings), d.name in used)
        else:
            add(check_archive(d, settings), d.name in used)
    return found


# -- 7, 8: validator and model -----------------------------------------------------------------


def check_validator(settings: Settings) -> list[Finding]:
    """dciodvfy, where ``[output] validate`` is on."""
    if not settings.output.validate_objects:
        return [Finding("dciodvfy", Level.OK, "[output] validate is off")]
    from node.dicom.validate import dciodvfy_path

    try:
        path = dciodvfy_path()
    except FileNotFoundError as exc:
        return [Finding("dciodvfy", Level.FATAL, f"{exc}: every output would fail validation")]
    return [Finding("dciodvfy", Level.OK, path)]


def _hub_snapshot(spec: str) -> Path | None:
    """The local hub cache's snapshot folder of ``spec`` (one holding its model_index.json)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def needs_inpainting(settings: Settings) -> bool:
    """Whether anything runs the inpainting model: a rule that inpaints or outpaints, or a pixel
    rule that fills with generated anatomy."""
    return settings.deid.needs_inpainter or any(
        t.task.inpaints for r in settings.rules for t in r.tasks)


def check_model(settings: Settings,
                hub_snapshot: Callable[[str], Path | None] = _hub_snapshot) -> list[Finding]:
    """The generation model(s) can be loaded, where a rule generates or a pixel rule inpaints:
    each one found, and its weights whole (:func:`node.generate.weights.weights_problems`:
    configs parse, weight files present, safetensors headers readable and files as long as
    they say; nothing is loaded, and only a ``.ckpt`` needs torch)."""
    from node.generate.models import _HUB_ID, TINY
    from node.generate.tiny import INPAINT_SUBFOLDER
    from node.generate.weights import SINGLE_FILE_SUFFIXES, weights_problems

    rules = needs_model(settings)
    if not rules and not settings.deid.needs_inpainter:
        return [Finding("model", Level.OK, "no rule generates")]
    gen = settings.generate
    found: list[Finding] = []

    needed_by = (f"rules {', '.join(rules)} generate with it" if rules
                 else "pixel rules inpaint with it")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")

    def weights(name: str, key: str, path: Path, what: str, level: Level = Level.FATAL) -> None:
        problems = weights_problems(path, key, gen.single_file_config)
        for problem in problems:
            found.append(Finding(name, level, f"{problem} ({needed_by})"))
        if not problems:
            found.append(Finding(name, Level.OK, f"{path} ({what}; weights whole, not loaded)"))

    for key, spec in (("model", gen.model), ("inpaint_model", gen.inpaint_model)):
        if key == "inpaint_model" and not spec:
            continue
        name = f"[generate] {key}"
        if spec == TINY:
            missing = [m for m in ("torch", "diffusers", "transformers")
                       if importlib.util.find_spec(m) is None]
            if missing:
                found.append(Finding(name, Level.FATAL, f'"tiny" needs {", ".join(missing)}: '
                                     "install the node with its generation extras"))
            elif (not (gen.cache_dir / TINY / "model_index.json").is_file()
                  and _writable_place(gen.cache_dir) is None):
                found.append(Finding(name, Level.FATAL, f'"tiny" is built in {gen.cache_dir}, '
                                     "which this user cannot write: fix it or set [generate] "
                                     "cache_dir"))
            else:
                found.append(Finding(name, Level.WARNING, '"tiny": an untrained model, every '
                                     "output is noise; point it at real weights"))
            continue
        path = Path(spec).expanduser()
        if path.is_file():
            weights(name, key, path, "a single-file checkpoint, configs from "
                    + (gen.single_file_config or "the hub cache"))
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                found.append(Finding(name, Level.FATAL, f"{path} has no model_index.json: point "
                                     f"{name} at a diffusers pipeline folder or a single-file "
                                     "checkpoint (.safetensors, .ckpt)"))
                continue
            weights(name, key, path, "a diffusers folder")
            sub = path / INPAINT_SUBFOLDER
            if (key == "model" and not gen.inpaint_model and needs_inpainting(settings)
                    and (sub / "model_index.json").is_file()):
                weights(f"{name} (inpainting)", "inpaint_model", sub, "its inpainting variant")
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            found.append(Finding(name, Level.FATAL, f"{spec}: no such file: point {name} at "
                                 "a single-file checkpoint that exists, or a diffusers folder"))
        elif not _HUB_ID.match(spec):
            found.append(Finding(name, Level.FATAL, f"{spec}: no such folder: point {name} at a "
                                 "diffusers folder (one with model_index.json) or a single-file "
                                 "checkpoint (.safetensors, .ckpt), or build the test model "
                                 "with synthnode model init-tiny DIR"))
        elif (snapshot := hub_snapshot(spec)) is not None:
            # Online, a job's download fetches what the cache lacks.
            weights(name, key, snapshot, f'hub id "{spec}" in the local cache',
                    Level.FATAL if offline else Level.WARNING)
        else:
            found.append(Finding(
                name, Level.FATAL if offline else Level.WARNING,
                f'"{spec}": no such local folder, and not in the local hub cache: '
                + ("HF_HUB_OFFLINE is set, so it cannot be downloaded; " if offline else
                   "generation jobs will try to download it (network, and a token for gated "
                   "models); ")
                + "download it first or point it at a local diffusers folder"))
    return found


# -- all ---------------------------------------------------------------------------------------


def preflight(settings: Settings, environ: Mapping[str, str] | None = None,
              ports: bool = True) -> Report:
    """Every check, in the order of the module docstring (``ports=False``: all but the
    listening ports)."""
    env = os.environ if environ is None else environ
    report = Report()
    for check in (
        lambda: check_key(settings),
        lambda: check_secrets(settings, env),
        lambda: check_ports(listen_addresses(settings) if ports else []),
        lambda: check_tls(settings),
        lambda: check_folders(settings),
        lambda: check_queue(settings),
        lambda: check_destinations(settings, env),
        lambda: check_validator(settings),
        lambda: check_model(settings),
    ):
        report.findings.extend(check())
    return report


def startup_check(settings: Settings, ports: bool = True) -> bool:
    """``serve``'s preflight: log warnings and fatal findings; False when a fatal one stops the
    start. When it passes and a rule de-identifies, record the key's fingerprint if none is.
    ``ports=False`` leaves the listening ports to the caller (``serve`` binds them itself)."""
    report = preflight(settings, ports=ports)
    for finding in report.warnings:
        log.warning("preflight: %s", finding)
    for finding in report.fatal:
        log.error("preflight: %s", finding)
    if report.fatal:
        log.error("synthnode serve not started: %d fatal problem%s (fix %s; synthnode check "
                  "lists every check)", len(report.fatal), "" if len(report.fatal) == 1 else "s",
                  "it" if len(report.fatal) == 1 else "them")
        return False
    if needs_deid_key(settings):
        record = KeyRecord(settings.spool.dir)
        if record.recorded() is None:
            fingerprint = record.record(settings.deid.key)
            log.info("recorded the [deid] key's fingerprint %s in %s (a later start with "
                     "another key stops)", fingerprint, record.path)
    return True
