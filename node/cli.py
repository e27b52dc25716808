"""The ``synthnode`` command line."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node import __version__
from node.config import (
    ENV_CONFIG,
    ConfigError,
    DicomDestination,
    Queue,
    Settings,
    TaskKind,
    load_settings,
)

log = logging.getLogger("node")

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def configure_logging(level: str) -> None:
    """Plain lines on stderr. pynetdicom stays at WARNING: its INFO/DEBUG output can dump data
    sets, which may hold patient data."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # A logger's filters see only its own records, not its children's: on the one that logs.
    logging.getLogger("pynetdicom.transport").addFilter(_no_tls_traceback)


_CONNECT_FAILED = ("Association request failed: unable to connect", "TCP Initialisation Error")


def _no_tls_traceback(record: logging.LogRecord) -> bool:
    """pynetdicom logs a failed connection in two lines and a TLS one with a traceback too; the
    node says why in one line of its own (node.archives.dimse.open_association, its only
    requestor), so those go."""
    import ssl

    if record.exc_info and isinstance(record.exc_info[1], ssl.SSLError):
        return False
    return not str(record.msg).startswith(_CONNECT_FAILED)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _generation_settings(args: argparse.Namespace) -> Settings:
    """The settings of a command that generates (``--model`` overrides ``[generate] model``),
    with its logging and torch configured."""
    from node.process import configure_torch

    settings = _settings(args)
    if args.model:
        settings = settings.model_copy(update={
            "generate": settings.generate.model_copy(update={"model": args.model}),
        })
    configure_logging(settings.log.level)
    configure_torch(settings.generate)
    return settings


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config).resolve()
    env = os.environ.get(ENV_CONFIG)
    return Path(env).resolve() if env else None


def cmd_serve(args: argparse.Namespace) -> int:
    from node.process import configure_pynetdicom
    from node.server import Server

    settings = _settings(args)
    configure_logging(settings.log.level)
    configure_pynetdicom(settings.node, scp=True)
    return Server(settings, _config_path(args)).run()


def cmd_check(args: argparse.Namespace) -> int:
    from node.preflight import preflight

    try:
        settings = _settings(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"FATAL    config: {line}")
        print("the configuration does not load: fix it first (other checks need it)")
        return 2
    where = _config_path(args)
    print(f"ok       config: {where or 'built-in defaults'} loads")
    report = preflight(settings)
    for finding in report.findings:
        print(finding)
    print(f"{report.summary()}: " + ("synthnode serve would refuse to start"
                                     if report.fatal else "synthnode serve can start"))
    return report.exit_status


def cmd_key(args: argparse.Namespace) -> int:
    from node.keys import KeyRecord, key_fingerprint, key_problem

    settings = _settings(args)
    key = settings.deid.key
    problem = key_problem(key)
    record = KeyRecord(settings.spool.dir)
    try:
        recorded = record.recorded()
    except ValueError as exc:
        if args.key_command != "rotate":
            print(f"synthnode key: {exc}", file=sys.stderr)
            return 2
        recorded = None
    if args.key_command == "fingerprint":
        if not key:
            print(f"synthnode key fingerprint: {problem}", file=sys.stderr)
            return 2
        current = key_fingerprint(key)
        print(f"[deid] key fingerprint: {current}" + (f" (WEAK: {problem})" if problem else ""))
        if recorded is None:
            print(f"recorded: none yet in {record.path} (the first synthnode serve records it)")
        elif recorded == current:
            print(f"recorded: {recorded} in {record.path}: the same key")
        else:
            print(f"recorded: {recorded} in {record.path}: a DIFFERENT key; synthnode serve "
                  "refuses to start until the key is restored or synthnode key rotate is run")
            return 1
        return 0
    # rotate
    if problem:
        print(f"synthnode key rotate: {problem}", file=sys.stderr)
        return 2
    current = key_fingerprint(key)
    if recorded == current:
        print(f"[deid] key fingerprint {current} is already the recorded one: nothing changed")
        return 0
    record.record(key)
    print(f"recorded [deid] key fingerprint {current} in {record.path}"
          + (f" (was {recorded})" if recorded else "") + ". From now on every patient gets "
          "the pseudonyms and UIDs of this key: studies de-identified with the previous key "
          "will not link to new ones, and studies sent again are stored again under new UIDs.")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from node.jobs import run_worker
    from node.keys import KeyRecord, key_problem
    from node.process import configure_pynetdicom, configure_torch

    settings = _settings(args)
    configure_logging(settings.log.level)
    configure_pynetdicom(settings.node, scp=False)
    if args.queue == Queue.GPU:
        configure_torch(settings.generate)
    if settings.deid.key:
        # A worker on another machine sees the spool's record where the spool is shared; where
        # it is not, serve's own check stands for the node.
        try:
            problem = key_problem(settings.deid.key) or KeyRecord(
                settings.spool.dir).mismatch(settings.deid.key)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            print(f"synthnode worker: {problem}", file=sys.stderr)
            return 2
    if args.queue == Queue.GPU or settings.deid.needs_inpainter:
        # The model this worker would load on its first job, checked now (cheaply: its files,
        # not a load; loading here, before Huey forks its worker processes, would put CUDA in
        # the parent): a missing or damaged model stops the start, not the first job.
        from node.preflight import Level, check_model

        fatal = [f for f in check_model(settings) if f.level is Level.FATAL]
        for finding in fatal:
            print(f"synthnode worker: {finding.check}: {finding.message}", file=sys.stderr)
        if fatal:
            return 2
    server, folder = None, None
    if args.metrics_port is not None and args.parent is None:
        import shutil
        import tempfile

        from node import metrics

        # this worker's processes count into a folder of their own, summed at each scrape
        folder = Path(tempfile.mkdtemp(prefix="synthnode-worker-metrics-"))
        metrics.setup(folder)
        try:
            server = metrics.MetricsServer(args.metrics_host, args.metrics_port)
        except OSError as exc:
            print(f"synthnode worker: --metrics-port {args.metrics_port} on "
                  f"{args.metrics_host}: {exc.strerror} (another server there?)",
                  file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
            return 2
        server.start()
        log.info("worker metrics on http://%s:%d/metrics", args.metrics_host, server.port)
    try:
        return run_worker(settings, args.queue, args.workers, args.nice, parent=args.parent)
    finally:
        if server is not None and folder is not None:
            import shutil

            server.stop()
            shutil.rmtree(folder, ignore_errors=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    configure_logging("WARNING")
    return run_demo(args.workdir, args.timeout)


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a date YYYY-MM-DD') from None


def cmd_mirror_backfill(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from node.audit import trail_for
    from node.jobs import JobState, Queues
    from node.route.backfill import Backfill, BackfillError, Step, follow

    settings = _settings(args)
    configure_logging("WARNING")
    queues = Queues(settings.jobs, trail=trail_for(settings))
    try:
        backfill = Backfill(settings, queues, args.source)
        try:
            studies = backfill.find(args.since, args.until)
            bar = tqdm(total=len(studies), unit="study", desc="routing", file=sys.stderr,
                       disable=args.quiet)
            walk = backfill.walk(studies, lambda _study, _step: bar.update())
            bar.close()
        finally:
            backfill.close()
    except BackfillError as exc:
        print(f"synthnode mirror backfill: {exc}", file=sys.stderr)
        return 2
    print(f"{len(studies)} studies from {args.source}: {walk.count(Step.QUEUED)} queued, "
          f"{walk.count(Step.DONE)} done before, {walk.count(Step.OWN_OUTPUT)} synthnode "
          f"outputs (skipped), {walk.count(Step.GONE)} gone")
    if args.no_wait or not walk.jobs:
        return 0
    bar = tqdm(total=len(walk.jobs), unit="job", desc="mirroring", file=sys.stderr,
               disable=args.quiet)
    jobs: dict = {}
    last_change, seen = time.monotonic(), -1
    for jobs in follow(queues, walk.jobs):
        finished = sum(1 for j in jobs.values() if j.state in (JobState.DONE, JobState.DEAD))
        bar.update(finished - bar.n)
        if finished != seen:
            last_change, seen = time.monotonic(), finished
        elif time.monotonic() - last_change > args.stall_s:
            bar.close()
            print(f"no job finished in {args.stall_s:.0f} s: are workers running "
                  "(synthnode serve, or synthnode worker --queue cpu)? Re-run to go on "
                  "watching; nothing is lost.", file=sys.stderr)
            return 1
    bar.close()
    done = [j for j in jobs.values() if j.state is JobState.DONE]
    dead = [j for j in jobs.values() if j.state is JobState.DEAD]
    print(f"mirrored: {sum(j.outputs for j in done)} instances in {len(done)} jobs, "
          f"{sum(j.quarantined for j in done)} quarantined, {len(dead)} jobs failed")
    for j in dead:
        print(f"  failed: {j.id} study {j.study_uid}: {j.last_error}")
    return 0 if not dead else 1


def cmd_mirror_status(args: argparse.Namespace) -> int:
    from node.jobs import Queues
    from node.jobs.report import by_day

    settings = _settings(args)
    days = by_day(Queues(settings.jobs).store.all())[: args.days]
    if args.json:
        print(json.dumps([{
            "day": d.day.isoformat(), "studies": d.studies, "instances": d.instances,
            "quarantined": d.quarantined, "failed": d.failed, "waiting": d.waiting,
            "quarantine_reasons": dict(d.quarantine_reasons),
            "failure_reasons": dict(d.failure_reasons)} for d in days], indent=2))
        return 0
    if not days:
        print("nothing mirrored yet")
        return 0
    print(f"{'day':<10}  {'studies':>7}  {'instances':>9}  {'quarantined':>11}  {'failed':>6}"
          f"  {'waiting':>7}")
    for d in days:
        print(f"{d.day}  {d.studies:>7}  {d.instances:>9}  {d.quarantined:>11}  {d.failed:>6}"
              f"  {d.waiting:>7}")
        for reason, n in d.quarantine_reasons.most_common():
            print(f"    quarantined {n}: {reason}")
        for reason, n in d.failure_reasons.most_common():
            print(f"    failed {n}: {reason}")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.audit import trail_for
    from node.jobs import JobState, Queues

    settings = _settings(args)
    queues = Queues(settings.jobs, trail=trail_for(settings))
    if args.jobs_command == "retry":
        code = 0
        ids = list(args.ids)
        if args.dead:
            ids += [j.id for j in queues.store.all() if j.state is JobState.DEAD]
        if not ids:
            print("synthnode jobs retry: no job named (give IDs or --dead)", file=sys.stderr)
            return 2
        for job_id in ids:
            try:
                job = queues.retry(job_id, user=cli_user())
            except KeyError as exc:
                print(f"synthnode jobs retry: {exc.args[0]}", file=sys.stderr)
                code = 1
                continue
            print(f"{job.id} re-queued on {job.queue}")
        return code
    jobs = queues.store.all()
    if args.state:
        jobs = [j for j in jobs if j.state.value == args.state]
    if args.json:
        print(json.dumps([json.loads(j.to_json()) for j in jobs], indent=2))
        return 0
    counts = {s.value: sum(1 for j in jobs if j.state is s) for s in JobState}
    waiting = queues.sizes()
    print(f"jobs on {settings.jobs.backend.value}: " + ", ".join(
        f"{n} {state}" for state, n in counts.items()) + "; queued messages: " + ", ".join(
        f"{q} {n}" for q, n in waiting.items()))
    now = time.time()
    for state in JobState:
        group = [j for j in jobs if j.state is state]
        if not group:
            continue
        print(f"{state.value}:")
        for j in group:
            extra = f"  last error: {j.last_error}" if j.last_error else ""
            if j.state is JobState.DONE:
                extra = f"  {j.outputs} outputs, {j.quarantined} quarantined"
            elif j.state is JobState.REVIEW:
                extra = f"  {j.outputs} outputs staged for review"
            elif j.state is JobState.REJECTED:
                extra = f"  rejected by {j.decided_by}: {j.decision_reason}"
            elif j.state is JobState.PENDING and j.not_before > now:
                extra += f"  (retry in {_age(j.not_before - now)})"
            print(f"  {j.id}  {j.kind:<10} rule {j.rule}  study {j.study_uid}  "
                  f"rev {j.revision}  attempts {j.attempts}  {_age(now - j.updated_at)} ago"
                  f"{extra}")
            for note in j.notes if j.state is JobState.DONE else ():
                print(f"      {note}")  # why outputs were quarantined or skipped
    return 0


def cli_user() -> str:
    """How the audit trail names a person at the command line: ``cli:<login>``, the login of
    the process's user id (not $LOGNAME or $USER, which anyone can set)."""
    import pwd

    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"cli:uid{os.getuid()}"


def cmd_review(args: argparse.Namespace) -> int:
    from node.audit import trail_for
    from node.jobs import JobState, Queues
    from node.jobs.review import count_held, decide, held, output_series

    settings = _settings(args)
    queues = Queues(settings.jobs, trail=trail_for(settings))
    if args.review_command == "list":
        jobs = held(queues.store, 0, 10_000)
        if args.json:
            print(json.dumps([json.loads(j.to_json()) for j in jobs], indent=2))
            return 0
        print(f"{count_held(queues.store)} jobs wait for review")
        now = time.time()
        for j in jobs:
            print(f"  {j.id}  {j.kind:<10} rule {j.rule}  study {j.study_uid}  "
                  f"rev {j.revision}  {j.outputs} outputs  to {', '.join(j.destinations)}  "
                  f"{_age(now - j.updated_at)} ago")
            for uid, n in output_series(settings, j).items():
                d = j.series_decision(uid)
                said = "undecided" if d is None else (
                    f"{'approved' if d.approve else 'rejected'} by {d.user}")
                print(f"      series {uid or '(not from one series)'}: {n} outputs, {said}")
        return 0
    approve = args.review_command == "approve"
    reason = args.reason or ""
    try:
        jobs = decide(queues, args.id, approve, cli_user(), reason, args.revision,
                      series=args.series, settings=settings)
    except (KeyError, ValueError) as exc:
        print(f"synthnode review {args.review_command}: {exc.args[0]}", file=sys.stderr)
        return 1
    for j in jobs:
        if j.state is JobState.REVIEW:
            left = sum(1 for s in output_series(settings, j) if j.series_decision(s) is None)
            print(f"{j.id}: series {args.series} {'approved' if approve else 'rejected'}; "
                  f"{left} series still to decide")
        elif j.state is JobState.REJECTED:
            print(f"{j.id} rejected")
        else:
            rejected = len(j.rejected_series)
            print(f"{j.id} approved: queued for delivery"
                  + (f" ({rejected} series rejected, not delivered)" if rejected else ""))
    return 0


def _read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password (at least 12 characters): ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def cmd_user(args: argparse.Namespace) -> int:
    from node.audit import record
    from node.console.auth import UserError, Users
    from node.console.context import Role

    settings = _settings(args)
    users = Users(settings.console.db, settings.console.session_timeout_s)
    me = cli_user()
    try:
        if args.user_command == "list":
            for name, role, since in users.list():
                when = datetime.datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M")
                print(f"{name:<24} {role.value:<9} since {when}")
            return 0
        if args.user_command == "add":
            users.add(args.name, Role(args.role), _read_password(args))
            record(settings, "user", me, args.name, action="add", role=args.role)
            print(f"user {args.name} added ({args.role})")
        elif args.user_command == "password":
            users.set_password(args.name, _read_password(args))
            record(settings, "user", me, args.name, action="password")
            print(f"password of {args.name} changed (their sessions end)")
        elif args.user_command == "role":
            users.set_role(args.name, Role(args.role))
            record(settings, "user", me, args.name, action="role", role=args.role)
            print(f"user {args.name} is now {args.role}")
        elif args.user_command == "remove":
            users.remove(args.name)
            record(settings, "user", me, args.name, action="remove")
            print(f"user {args.name} removed (their sessions end)")
    except (UserError, ValueError) as exc:
        print(f"synthnode user {args.user_command}: {exc}", file=sys.stderr)
        return 1
    finally:
        users.close()
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    from node.audit import trail_for
    from node.jobs import Queues
    from node.jobs import quarantine as q

    settings = _settings(args)
    if args.quarantine_command == "list":
        found = q.entries(settings)
        if args.json:
            print(json.dumps([{"id": e.id, "job": e.job, "sop": e.sop, "study": e.study,
                               "series": e.series, "kind": e.kind, "reason": e.reason,
                               "at": e.at, "size": e.size} for e in found], indent=2))
            return 0
        print(f"{len(found)} quarantined (kept until released or discarded)")
        now = time.time()
        for e in found:
            print(f"  {e.id}  {e.kind:<6} study {e.study}  {_age(now - e.at)} ago: {e.reason}")
        return 0
    configure_logging(settings.log.level)
    try:
        if args.quarantine_command == "release":
            queues = Queues(settings.jobs, trail=trail_for(settings))
            print(f"{args.id}: {q.release(settings, queues, args.id, cli_user())}")
        else:
            q.discard(settings, args.id, cli_user(), args.reason)
            print(f"{args.id}: discarded")
    except (KeyError, ValueError) as exc:
        print(f"synthnode quarantine {args.quarantine_command}: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0


def cmd_broker_lookup(args: argparse.Namespace) -> int:
    """The honest broker's re-identification: which patient and studies a pseudonym stands for
    (from ``[deid] honest_broker_file``), printed here only; the lookup is audited with the
    pseudonym and the count, never what was found."""
    from node.audit import record

    settings = _settings(args)
    path = settings.deid.honest_broker_file
    if path is None:
        print("synthnode broker lookup: no [deid] honest_broker_file is set: the node keeps no "
              "mapping to look up", file=sys.stderr)
        return 2
    try:
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except OSError as exc:
        print(f"synthnode broker lookup: {path}: {exc.strerror}", file=sys.stderr)
        return 2
    found = [x for x in lines if x.get("pseudonym") == args.pseudonym]
    record(settings, "broker", cli_user(), args.pseudonym, pseudonym=args.pseudonym,
           count=len(found), action="lookup")
    if not found:
        print(f"synthnode broker lookup: no mapping for pseudonym {args.pseudonym}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    first = found[0]
    print(f"{args.pseudonym}: patient {first.get('patient_id')} ({first.get('patient_name')})")
    for x in found:
        print(f"  study {x.get('study_instance_uid')} -> {x.get('new_study_instance_uid')}  "
              f"sop {x.get('sop_instance_uid')} -> {x.get('new_sop_instance_uid')}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from node.audit import AuditTrail, export

    settings = _settings(args)
    trail = AuditTrail(settings.audit.db)
    if args.audit_command == "verify":
        if not settings.audit.db.exists():
            print(f"synthnode audit verify: no audit trail at {settings.audit.db}",
                  file=sys.stderr)
            return 1
        result = trail.verify()
        if result.ok:
            print(f"audit trail holds: {result.count} records, head {result.head}")
            return 0
        print(f"audit trail BROKEN at record {result.broken_at}: {result.reason} "
              f"({result.count} records read; the chain holds up to {result.head})",
              file=sys.stderr)
        return 1
    since = None
    if args.since:
        since = datetime.datetime.combine(args.since, datetime.time(),
                                          datetime.UTC).timestamp()
    if args.output:
        with open(args.output, "w", newline="") as out:
            n = export(trail, out, args.format, since)
        print(f"{n} records written to {args.output}", file=sys.stderr)
    else:
        export(trail, sys.stdout, args.format, since)
    return 0


def parse_peer(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae, host, port); ValueError naming the problem."""
    m = _PEER.match(text)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f'peer "{text}" is not of the form AE@HOST:PORT')
    return m["ae"], m["host"], int(m["port"])


def _peer_destination(text: str, settings: Settings, args: argparse.Namespace
                      ) -> DicomDestination:
    """``AE@HOST:PORT`` (TLS as the ``--tls*`` options say) or a ``[[destinations]]`` DICOM
    peer's name (TLS as it is configured); ValueError or KeyError naming the problem."""

    if "@" not in text:
        destination = settings.destination(text)
        if not isinstance(destination, DicomDestination):
            raise ValueError(f'"{text}" is a {destination.kind.value} destination, not a '
                             "DICOM peer")
        return destination
    from pydantic import ValidationError

    ae_title, host, port = parse_peer(text)
    files = {"tls_ca": args.tls_ca, "tls_certificate": args.tls_certificate,
             "tls_key": args.tls_key}
    try:
        return DicomDestination(
            name="command-line", ae_title=ae_title, host=host, port=port,
            tls=args.tls or any(files.values()),
            tls_verify_hostname=not args.tls_no_verify_hostname,
            **{k: v.resolve() if v else None for k, v in files.items()},
        )
    except ValidationError as exc:
        msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ValueError(msg.replace("tls_certificate and tls_key",
                                     "--tls-certificate and --tls-key")) from None


def cmd_echo(args: argparse.Namespace) -> int:
    from node.archives.dimse import open_association, tls_args
    from node.dicomnet import make_ae
    from node.receive.contexts import VERIFICATION
    from node.tls import TLSError

    settings = _settings(args)
    configure_logging(settings.log.level)
    try:
        destination = _peer_destination(args.peer, settings, args)
        tls = tls_args(destination, settings.node)
    except (KeyError, ValueError, TLSError) as exc:
        print(f"synthnode echo: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    ae = make_ae(args.calling_aet or settings.node.ae_title, settings.node,
                 timeout_s=args.timeout)
    ae.add_requested_context(VERIFICATION)
    started = time.monotonic()
    assoc, why = open_association(ae, destination, tls)
    if assoc is None or not assoc.is_established:
        print(f"C-ECHO {args.peer}: {why}", file=sys.stderr)
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    elapsed_ms = (time.monotonic() - started) * 1000
    if code != 0:
        print(f"C-ECHO {args.peer}: status {code:#06x}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer}: success in {elapsed_ms:.0f} ms"
          + (" over TLS" if tls else ""))
    return 0


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then "DICM"."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def send_files(paths: Sequence[Path]) -> tuple[list[Path], int]:
    """The files to send: files named as they are (an unreadable one fails on its own line),
    folders walked recursively for DICOM files in a stable order, as dcmtk's ``storescu +sd``
    does; with how many non-DICOM files in folders were skipped."""
    files: list[Path] = []
    skipped = 0
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        for found in sorted(p for p in path.rglob("*") if p.is_file()):
            if _is_dicom_file(found):
                files.append(found)
            else:
                skipped += 1
    return files, skipped


def cmd_send(args: argparse.Namespace) -> int:
    from node.archives import send_to
    from node.archives.dimse import send_to_peer
    from node.process import configure_pynetdicom

    settings = _settings(args)
    configure_logging(settings.log.level)
    configure_pynetdicom(settings.node, scp=False)
    args.files, skipped = send_files(args.files)
    if skipped:
        print(f"skipped {skipped} non-DICOM file{'s' if skipped != 1 else ''} in folders",
              file=sys.stderr)
    if not args.files:
        print("synthnode send: no DICOM file found", file=sys.stderr)
        return 2
    try:
        if "@" in args.to:
            destination = _peer_destination(args.to, settings, args)
            results = send_to_peer(args.files, destination, settings, args.calling_aet)
        else:
            results = send_to(args.files, args.to, settings, args.job, args.task,
                              calling_aet=args.calling_aet)
    except (KeyError, ValueError) as exc:
        print(f"synthnode send: --to {args.to}: {exc.args[0] if exc.args else exc}",
              file=sys.stderr)
        return 2
    for path, r in zip(args.files, results, strict=True):
        tries = f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}"
        state = "sent  " if r.ok else "FAILED"
        note = f": {r.reason}" if r.reason else ""
        print(f"{state} {path}  {r.sop_instance_uid or '-'}  ({tries}){note}")
    failed = sum(1 for r in results if not r.ok)
    where = results[0].destination if results else args.to
    print(f"{len(results) - failed} of {len(results)} sent to {where}, {failed} failed")
    return 0 if failed == 0 else 1


def cmd_deidentify(args: argparse.Namespace) -> int:
    from node.deid import DeidentificationError
    from node.deid.batch import Fate, run

    settings = _settings(args)
    configure_logging(settings.log.level)
    inpainter = None
    if settings.deid.needs_inpainter:
        from node.generate.tasks import deid_inpainter_factory

        inpainter = functools.partial(deid_inpainter_factory, settings)
    try:
        summary = run(args.paths, args.out, settings, workers=args.workers,
                      progress=not args.quiet, inpainter_factory=inpainter)
    except DeidentificationError as exc:
        print(f"synthnode deidentify: {exc}", file=sys.stderr)
        return 2
    written = summary.of(Fate.WRITTEN)
    print(f"{len(written)} written to {args.out}, {len(summary.of(Fate.QUARANTINED))} "
          f"quarantined, {len(summary.of(Fate.UNREADABLE))} unreadable")
    for fate in (Fate.QUARANTINED, Fate.UNREADABLE):
        for r in sorted(summary.of(fate), key=lambda r: r.source):
            print(f"  {fate.value}: {r.source}: {r.detail}")
    return 0 if summary.ok else 1


def _region(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f'region "{text}" is not x,y,w,h (pixels)')
    x, y, w, h = (int(p) for p in parts)
    if w == 0 or h == 0:
        raise argparse.ArgumentTypeError(f'region "{text}" is empty')
    return x, y, w, h


def _polygon(text: str) -> tuple[tuple[float, float], ...]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) < 6 or len(values) % 2:
        raise argparse.ArgumentTypeError(f'polygon "{text}" is not x1,y1,x2,y2,x3,y3[,...]')
    return tuple(zip(values[0::2], values[1::2], strict=True))


def _margins(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) == 1:
        parts *= 4
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f'margins "{text}" are not PX or top,right,bottom,left')
    top, right, bottom, left = (int(p) for p in parts)
    return top, right, bottom, left


def _one_off_key(settings: Settings) -> Settings:
    """``settings`` with a random [deid] key where none is set, and a note saying so."""
    if settings.deid.key:
        return settings
    print("synthnode generate: note: no [deid] key is set, so this run de-identifies with a "
          "one-off random key: its pseudonyms and UIDs will not match other runs' (set "
          "SYNTHNODE__DEID__KEY for consistent pseudonyms)", file=sys.stderr)
    return settings.model_copy(update={
        "deid": settings.deid.model_copy(update={"key": secrets.token_hex(32)}),
    })


def cmd_generate(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np
    from PIL import Image
    from pydicom import dcmread
    from tqdm import tqdm

    from node.deid import DeidentificationError, Deidentifier, Quarantined
    from node.dicom import SeriesSpec, quarantine, save_checked
    from node.generate.copycheck import Refused
    from node.generate.tasks import REPORT_FIELD, Generation, Request, deidentifier, synthesize
    from node.generate.trainset import clean_report, read_report, subject_identifiers

    settings = _generation_settings(args)
    try:
        request = Request(
            TaskKind(args.task), prompt=args.prompt or "",
            negative_prompt=args.negative_prompt, regions=tuple(args.region or ()),
            polygons=tuple(args.polygon or ()),
            margins=args.margins or (0, 0, 0, 0), strength=args.strength, seed=args.seed,
            num=1, series=SeriesSpec(args.series_description, args.series_number),
        )
        source = dcmread(args.source) if args.source else None
        report, document = read_report(args.report) if args.report else ("", None)
        if args.report and args.prompt and REPORT_FIELD not in args.prompt:
            raise ValueError(f"--prompt has no {REPORT_FIELD}: put {REPORT_FIELD} where the "
                             "report's text goes, or leave --prompt out to prompt with the "
                             "report alone")
    except (ValueError, OSError) as exc:
        print(f"synthnode generate: {exc}", file=sys.stderr)
        return 2
    # Outputs are for sharing: they carry the source's pseudonym, unless told otherwise.
    deidentified = source is not None and not args.keep_identity
    if deidentified:
        settings = _one_off_key(settings)
    elif source is not None:
        print("synthnode generate: WARNING: --keep-identity: the outputs carry the source "
              "patient's identity (name, IDs, dates, UIDs, institution). They are for local "
              "experiments only and must not be shared.", file=sys.stderr)
    generation = Generation(settings)
    deid: Deidentifier | None = None
    if deidentified:
        try:
            deid = deidentifier(settings.deid, settings.output, lambda: generation)
        except DeidentificationError as exc:
            print(f"synthnode generate: {exc}", file=sys.stderr)
            return 2
    if args.report:
        # Cleaned of placeholders and of the report's and the source's original identifiers.
        subjects = [ds for ds in (document, source) if ds is not None]
        try:
            report = clean_report(report, [
                deid.identifiers(ds) if deid is not None else subject_identifiers(ds)
                for ds in subjects])
        except ValueError as exc:
            print(f"synthnode generate: {args.report}: {exc}", file=sys.stderr)
            return 2
        if not report:
            print(f"synthnode generate: {args.report}: no report text is left once "
                  "placeholders and identifying values are taken out", file=sys.stderr)
            return 2
        request = dataclasses.replace(request, prompt=args.prompt or REPORT_FIELD,
                                      report=report)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for index in tqdm(range(args.num), unit="image", disable=args.num < 2, file=sys.stderr):
        one = dataclasses.replace(request, seed=args.seed + index)
        try:  # each seed de-identifies its own copy: synthesize works in place
            (made,) = synthesize(generation, [(one, copy.deepcopy(source))], deid)
        except DeidentificationError as exc:
            print(f"synthnode generate: the source cannot be de-identified: {exc}",
                  file=sys.stderr)
            return 2
        except (ValueError, RuntimeError) as exc:
            print(f"FAILED seed {one.seed}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if isinstance(made, Quarantined):
            print(f"synthnode generate: QUARANTINED, nothing written: {made}", file=sys.stderr)
            return 1
        (ds,) = made
        if isinstance(ds, Refused):  # never written where outputs go: to quarantine only
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                held = Path(tmp) / f"{ds.sop_instance_uid}.dcm"
                ds.dataset.save_as(held, enforce_file_format=True)
                moved = quarantine(held, settings.output.quarantine_dir, ds.reason,
                                   f"generate-{args.task}")
            print(f"REFUSED seed {one.seed}: {ds.reason}; quarantined in {moved}, nothing "
                  f"written to {args.out}", file=sys.stderr)
            failed += 1
            continue
        saved = save_checked(ds, args.out, settings.output, job_id=f"generate-{args.task}")
        if saved.quarantined:
            print(f"QUARANTINED {saved.path}: {saved.reason}")
            failed += 1
            continue
        frame = ds.pixel_array if int(ds.get("NumberOfFrames", 1) or 1) == 1 else (
            ds.pixel_array[0])
        top = float((1 << int(ds.BitsStored)) - 1)
        preview = np.clip(np.rint(frame.astype(np.float64) / top * 255), 0, 255)
        png = saved.path.with_suffix(".png")
        Image.fromarray(preview.astype(np.uint8)).save(png)
        print(f"wrote {saved.path} (+ {png.name}) seed {one.seed}")
    return 0 if failed == 0 else 1


def cmd_model_init_tiny(args: argparse.Namespace) -> int:
    from node.generate.tiny import build_tiny

    configure_logging("INFO")
    folder = build_tiny(args.dir)
    print(f"built an UNTRAINED tiny model (random weights: its images are noise) in {folder}; "
          "point [generate] model at real weights (a diffusers folder) for real images")
    return 0


def cmd_model_finetune(args: argparse.Namespace) -> int:
    from collections import Counter

    from node.generate.finetune import (
        FinetuneSettings,
        LossSummary,
        base_weights,
        finetune,
        native_resolution,
    )
    from node.generate.models import ModelError
    from node.generate.trainset import collect, default_sources
    from node.process import configure_torch

    settings = _settings(args)
    configure_logging(settings.log.level)
    generate = settings.generate
    if args.device:
        generate = generate.model_copy(update={"device": args.device})
    configure_torch(generate)
    try:
        tune = FinetuneSettings(
            method=args.method, rank=args.rank, text_encoder=args.text_encoder,
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
            text_encoder_learning_rate=args.text_encoder_lr, seed=args.seed,
            resolution=args.resolution, mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=args.checkpoint_every,
            empty_prompt_fraction=args.empty_prompt_fraction, device=generate.device,
            single_file_config=generate.single_file_config,
            copy_features=generate.copy_features, cache_dir=generate.cache_dir,
        )
        sources = args.data or default_sources(settings)
        if not sources:
            raise ValueError(f"no --data given, and the node's work folder "
                             f"({settings.jobs.work_dir}) holds no job outputs: give --data "
                             "folders of de-identified studies (e.g. exported from the research "
                             "PACS, or written by synthnode deidentify --out)")
        weights = base_weights(args.base, tune.cache_dir, tune.single_file_config)
        resolution = tune.resolution or native_resolution(weights, tune.single_file_config)
        data = collect(sources, resolution, generate.prompt_templates)
        record = finetune(args.base, data, args.out, tune, progress=not args.quiet,
                          resume=args.resume)
    except (ValueError, ModelError, OSError) as exc:
        print(f"synthnode model finetune: {exc}", file=sys.stderr)
        return 2
    # Counts, hashes and settings only: no text, no patient data.
    texts = Counter(str(e.text_source) for e in data.examples)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(data.skipped.items())) or "none"
    loss = LossSummary.of(args.out)
    trained = record.settings["method"] + (" + text encoder" if tune.text_encoder else "")
    print(f"fine-tuned on {record.images} images (texts: "
          + ", ".join(f"{n} {src}" for src, n in sorted(texts.items()))
          + f"; files left out: {skipped})")
    print(f"{record.steps} steps, {trained}, batch {tune.batch_size}, {resolution} px, "
          f"{record.settings['mixed_precision']} precision on {record.settings['device']}")
    if loss is not None:
        print(f"loss {loss.first:.4f} -> {loss.last:.4f} (means over the first and last tenth "
              "of the steps)")
    print(f"data sha256 {record.data_hash}; base sha256 {record.base_weights_hash[:16]}")
    if record.index:
        print(f"training-set index for the copy check: {record.index['images']} images in "
              f"{record.index['feature_space']}")
    print(f'model: {args.out} (use it as [generate] model = "{Path(args.out).resolve()}")')
    return 0


def cmd_model_evaluate(args: argparse.Namespace) -> int:
    from node.generate.evaluate import evaluate, summary
    from node.generate.models import ModelError

    settings = _generation_settings(args)
    to_stdout = args.json == "-"
    if args.sheet is not None:
        sheet = args.sheet
    elif args.json not in (None, "-"):
        sheet = Path(args.json).with_suffix(".png")
    else:
        sheet = Path.cwd() / "synthnode-evaluate.png"
    try:
        report = evaluate(
            settings.generate, args.held_out, train=args.train or (), prompts=args.prompts,
            per_prompt=args.per_prompt, steps=args.steps, seed=args.seed, sheet=sheet,
        )
    except (ValueError, ModelError, OSError) as exc:
        print(f"synthnode model evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json is None:
        print(summary(report))
    elif to_stdout:
        print(json.dumps(report, indent=2))
    else:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(summary(report))
        print(f"JSON: {args.json}")
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from node.route import evaluate, series_facts

    settings = _settings(args)
    configure_logging(settings.log.level)
    scan = series_facts(args.paths, calling_aet=args.calling_aet, called_aet=args.called_aet)
    evaluations = evaluate(settings.rules, settings.route.mode, scan.series)
    origin = "configured" if "rules" in settings.model_fields_set else "default"
    print(f"{len(settings.rules)} {origin} rules, mode {settings.route.mode.value}")
    for evaluation in evaluations:
        print("\n".join(evaluation.explain()))
    for item in scan.unreadable:
        print(f"unreadable: {item.path}: {item.reason}")
    if not evaluations:
        print("synthnode rules test: no DICOM file found", file=sys.stderr)
        return 2
    unmatched = sum(1 for r in evaluations if not r.applied())
    print(f"{len(evaluations)} stud{'y' if len(evaluations) == 1 else 'ies'}, {unmatched} matched "
          f"by no rule, {len(scan.unreadable)} unreadable files")
    return 0 if unmatched == 0 else 1


def _reserve_report(settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """The disk reserve as ``status`` shows it: JSON, and lines of text."""
    from node.reserve import DiskReserve

    levels = DiskReserve.for_settings(settings).levels()
    paused = any(level.short for level in levels)
    data = {"paused": paused, "file_systems": [
        {"path": str(level.path), "free_bytes": level.free_bytes,
         "reserve_bytes": level.reserve_bytes, "short": level.short} for level in levels]}
    lines = [("disk reserve: RECEIVING PAUSED (free space below the reserve; C-STOREs are "
              "refused with 0xA700 and jobs that write wait)") if paused else
             "disk reserve: receiving (free space above the reserve)"]
    lines += [f"  {level.path}: {level.free_bytes / 1048576:.0f} MiB free, reserve "
              f"{level.reserve_bytes / 1048576:.0f} MiB" + ("  BELOW" if level.short else "")
              for level in levels]
    return data, lines


def cmd_status(args: argparse.Namespace) -> int:
    from node.spool import Spool

    settings = _settings(args)
    reserve, reserve_lines = _reserve_report(settings)
    if not settings.spool.dir.exists():
        if args.json:
            print(json.dumps({"spool": str(settings.spool.dir), "studies": [],
                              "reserve": reserve}, indent=2))
            return 0
        print(f"spool {settings.spool.dir} does not exist yet: no study received")
        print("\n".join(reserve_lines))
        return 0
    spool = Spool(settings.spool)
    try:
        studies = spool.summaries()
    finally:
        spool.close()
    if args.json:
        print(json.dumps(
            {
                "spool": str(settings.spool.dir),
                "studies": [
                    {
                        "study_uid": s.study_uid, "state": s.state.value,
                        "revision": s.revision, "series": s.series,
                        "instances": s.instances, "size_bytes": s.size_bytes,
                        "last_received_at": s.last_received_at, "note": s.note,
                    }
                    for s in studies
                ],
                "reserve": reserve,
            },
            indent=2,
        ))
        return 0
    by_state: dict[str, int] = {}
    for s in studies:
        by_state[s.state.value] = by_state.get(s.state.value, 0) + 1
    total = sum(s.instances for s in studies)
    size = sum(s.size_bytes for s in studies)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "none"
    print(f"spool {settings.spool.dir}: {len(studies)} studies ({counts}), "
          f"{total} instances, {size / 1e6:.1f} MB")
    print("\n".join(reserve_lines))
    now = time.time()
    for s in studies:
        print(f"  {s.study_uid}  {s.state.value:<9} rev {s.revision}  {s.series} series  "
              f"{s.instances} instances  {s.size_bytes / 1e6:.1f} MB  "
              f"last {now - s.last_received_at:.0f} s ago" + (f"  {s.note}" if s.note else ""))
    return 0


def _tls_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM TLS, for AE@HOST:PORT (a [[destinations]] name brings its "
                             "own tls settings)")
    g.add_argument("--tls", action="store_true", help="associate over TLS")
    g.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="CA certificates to trust (default: [node.tls] ca_file, else the "
                        "system's)")
    g.add_argument("--tls-certificate", type=Path, default=None, metavar="PEM",
                   help="our client certificate (default: [node.tls] certificate)")
    g.add_argument("--tls-key", type=Path, default=None, metavar="PEM",
                   help="its private key (default: [node.tls] private_key)")
    g.add_argument("--tls-no-verify-hostname", action="store_true",
                   help="accept a certificate signed by the CA whatever name it carries")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthnode",
        description="A DICOM node that makes de-identified and synthetic counterparts of studies.",
    )
    parser.add_argument("--version", action="version", version=f"synthnode {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None,
        help="TOML settings file (default: $SYNTHNODE_CONFIG, else built-in defaults)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="receive studies (DICOM SCP), route them into jobs and run "
                                     "the workers ([jobs] cpu_workers, gpu_workers)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="preflight: what serve would meet (config, secrets, key, "
                       "ports, disk, queues, destinations, dciodvfy, model); exit 0 when "
                       "nothing is fatal, 1 when something is, 2 when the config does not load")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("key", help="the [deid] key's fingerprint, kept in the spool folder")
    key_sub = p.add_subparsers(dest="key_command", required=True, metavar="SUBCOMMAND")
    q = key_sub.add_parser("fingerprint", help="the key's fingerprint and the recorded one")
    q.set_defaults(func=cmd_key)
    q = key_sub.add_parser("rotate", help="record the current key's fingerprint: accept a new "
                           "key (every patient then gets new pseudonyms and UIDs)")
    q.set_defaults(func=cmd_key)

    p = sub.add_parser("demo", help="the whole product on the embedded default: a private "
                       "Orthanc, the node, sample studies in, what arrived out")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep everything here (default: a temporary folder, removed after)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the jobs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("worker", help="run jobs of one queue against the shared backend")
    p.add_argument("--queue", required=True, choices=[q.value for q in Queue],
                   help="cpu: de-identify and forward; gpu: generation")
    p.add_argument("--workers", type=int, default=1,
                   help="jobs at once (processes when > 1; default 1)")
    p.add_argument("--nice", type=int, default=0, help="add this much niceness (default 0)")
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)  # serve's pid
    port = os.environ.get("SYNTHNODE_WORKER_METRICS_PORT", "")
    p.add_argument("--metrics-port", type=int, default=int(port) if port.isdigit() else None,
                   metavar="PORT",
                   help="serve this worker's Prometheus /metrics on PORT (a worker serve did "
                        "not start: its counts are not in the console's /metrics); default "
                        "$SYNTHNODE_WORKER_METRICS_PORT, else none")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                   help="the address of --metrics-port (default 127.0.0.1)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("mirror", help="mirror a clinical archive, de-identified, into a "
                       "research archive: backfill and status")
    mirror_sub = p.add_subparsers(dest="mirror_command", required=True, metavar="SUBCOMMAND")
    q = mirror_sub.add_parser("backfill", help="route the studies an archive (an Orthanc, or a "
                              "PACS by C-FIND/C-GET) already holds")
    q.add_argument("--from", dest="source", required=True, metavar="NAME",
                   help='the clinical archive: "orthanc" ([orthanc]), or a [[destinations]] '
                        "name: an Orthanc (url, REST) or a DICOM peer (ae_title, host, port: "
                        "C-FIND, then C-GET)")
    q.add_argument("--since", type=_date, required=True, metavar="YYYY-MM-DD",
                   help="first Study Date")
    q.add_argument("--until", type=_date, default=None, metavar="YYYY-MM-DD",
                   help="last Study Date (default: no end)")
    q.add_argument("--no-wait", action="store_true",
                   help="queue the jobs and return (default: follow them to the end)")
    q.add_argument("--stall-s", type=float, default=120.0,
                   help="give up watching when no job finishes for this long (default 120)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_mirror_backfill)
    q = mirror_sub.add_parser("status", help="per day: mirrored, quarantined, failed, and why")
    q.add_argument("--days", type=int, default=14, help="days shown (default 14)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_mirror_status)

    p = sub.add_parser("jobs", help="jobs by state with their last error; retry dead ones")
    p.add_argument("--state", choices=["pending", "running", "done", "dead"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs, jobs_command="list")
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    q = jobs_sub.add_parser("retry", help="re-queue jobs (attempts start again)")
    q.add_argument("ids", nargs="*", metavar="ID")
    q.add_argument("--dead", action="store_true", help="every dead job")
    q.set_defaults(func=cmd_jobs)

    p = sub.add_parser("review", help="outputs held for a reviewer (review = true): list, "
                       "approve, reject")
    review_sub = p.add_subparsers(dest="review_command", required=True)
    q = review_sub.add_parser("list", help="jobs whose outputs wait for review")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_review)
    q = review_sub.add_parser("approve", help="deliver a job's staged outputs")
    q.add_argument("id", help="a job id, or a study UID (every job of it in review)")
    q.add_argument("--reason", default="", help="recorded in the audit trail")
    q.add_argument("--revision", type=int, default=None,
                   help="the study revision you reviewed (review list shows it): refused if "
                        "the job was staged again since")
    q.add_argument("--series", default=None, metavar="UID",
                   help="only the outputs made from this source series (review list shows "
                        "them); the job is delivered once each of its series is decided")
    q.set_defaults(func=cmd_review)
    q = review_sub.add_parser("reject", help="never deliver a job's outputs (they are kept)")
    q.add_argument("id", help="a job id, or a study UID (every job of it in review)")
    q.add_argument("--reason", required=True, help="why (recorded with the job and audited)")
    q.add_argument("--revision", type=int, default=None,
                   help="the study revision you reviewed (review list shows it): refused if "
                        "the job was staged again since")
    q.add_argument("--series", default=None, metavar="UID",
                   help="only the outputs made from this source series: never delivered, "
                        "the job's other series delivered once approved")
    q.set_defaults(func=cmd_review)

    p = sub.add_parser("quarantine", help="what was quarantined, kept until a person "
                       "releases or discards it")
    quarantine_sub = p.add_subparsers(dest="quarantine_command", required=True)
    q = quarantine_sub.add_parser("list", help="every entry with its reason")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quarantine)
    q = quarantine_sub.add_parser("release", help="de-identify a refused source again with the "
                                  "settings as they are now and deliver it if it passes (an "
                                  "output: deliver it as is)")
    q.add_argument("id", help="JOB/NAME as quarantine list shows it")
    q.set_defaults(func=cmd_quarantine)
    q = quarantine_sub.add_parser("discard", help="delete an entry for good")
    q.add_argument("id", help="JOB/NAME as quarantine list shows it")
    q.add_argument("--reason", required=True, help="why (audited)")
    q.set_defaults(func=cmd_quarantine)

    p = sub.add_parser("user", help="console users: add, list, remove, role, password")
    user_sub = p.add_subparsers(dest="user_command", required=True)
    roles = ["viewer", "reviewer", "admin"]
    q = user_sub.add_parser("add", help="a console user (password from a prompt, or stdin)")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=roles,
                   help="viewer: counts and states; reviewer: also review and audit; admin: "
                        "also quarantined images and users")
    q.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    q.set_defaults(func=cmd_user)
    q = user_sub.add_parser("list", help="every user and role")
    q.set_defaults(func=cmd_user)
    q = user_sub.add_parser("remove", help="remove a user (their sessions end)")
    q.add_argument("name")
    q.set_defaults(func=cmd_user)
    q = user_sub.add_parser("role", help="change a user's role")
    q.add_argument("name")
    q.add_argument("role", choices=roles)
    q.set_defaults(func=cmd_user)
    q = user_sub.add_parser("password", help="set a user's password (their sessions end)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true")
    q.set_defaults(func=cmd_user)

    p = sub.add_parser("broker", help="the honest broker's mapping ([deid] "
                       "honest_broker_file)")
    broker_sub = p.add_subparsers(dest="broker_command", required=True)
    q = broker_sub.add_parser("lookup", help="who a pseudonym stands for (audited)")
    q.add_argument("pseudonym")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_broker_lookup)

    p = sub.add_parser("audit", help="the audit trail: export it, verify its hash chain")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    q = audit_sub.add_parser("export", help="every record (from --since) as JSON lines or CSV")
    q.add_argument("--since", type=_date, default=None, help="YYYY-MM-DD (UTC)")
    q.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    q.add_argument("--output", default=None, help="a file (default: standard output)")
    q.set_defaults(func=cmd_audit)
    q = audit_sub.add_parser("verify", help="check every record's hash and link; exit 1 at "
                             "the first broken one")
    q.set_defaults(func=cmd_audit)

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("peer", help="AE@HOST:PORT, or a [[destinations]] DICOM peer's name")
    p.add_argument("--calling-aet", default=None, help="our AE title (default: [node] ae_title)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    _tls_options(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", help="send DICOM files and folders to Orthanc or a DICOM peer, "
                                    "with retries")
    p.add_argument("files", nargs="+", type=Path, metavar="PATH",
                   help="DICOM files, or folders (searched recursively; non-DICOM files in "
                        "them are skipped and counted)")
    p.add_argument(
        "--to", required=True, metavar="TARGET",
        help='"orthanc" (the [orthanc] REST API), AE@HOST:PORT (C-STORE), or the name of a '
             "[[destinations]] entry",
    )
    p.add_argument("--job", default="manual", help='job id marked in Orthanc (default "manual")')
    p.add_argument("--task", default="send", help='task name marked in Orthanc (default "send")')
    p.add_argument("--calling-aet", default=None,
                   help="our AE title for C-STORE (default: [node] ae_title)")
    _tls_options(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "deidentify", help="de-identify DICOM files and folders (PS3.15 Annex E) into a folder"
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes (default: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_deidentify)

    p = sub.add_parser("generate", help="make synthetic images with a diffusion model (SC + PNG)")
    p.add_argument("--task", required=True, choices=[t.value for t in TaskKind if t.synthetic])
    p.add_argument("--prompt", default="", help="default: the template for the source's modality; "
                   "{report} in it stands for --report's text")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="a report (text file or DICOM SR) as the prompt, or for {report} in "
                        "--prompt: cleaned of de-identification placeholders, pseudonyms and "
                        "identifying values first")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--source", type=Path, help="source DICOM file (needed except for text2img)")
    p.add_argument("--region", type=_region, action="append", metavar="X,Y,W,H",
                   help="inpaint: a rectangle in source pixels (repeatable)")
    p.add_argument("--polygon", type=_polygon, action="append", metavar="X1,Y1,X2,Y2,...",
                   help="inpaint: a polygon in source pixels (repeatable)")
    p.add_argument("--margin", "--margins", dest="margins", type=_margins,
                   metavar="PX|T,R,B,L", help="outpaint: pixels to add (all sides, or each)")
    p.add_argument("--strength", type=float, default=None, help="img2img: 0..1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    p.add_argument("--model", default=None, help="override [generate] model")
    p.add_argument("--series-description", default="synthnode synthetic")
    p.add_argument("--series-number", type=int, default=9000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--keep-identity", action="store_true",
                   help="keep the source patient's identity in the outputs (default: "
                        "de-identified, PS3.15 Annex E): local experiments only, never share")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("model", help="model management")
    model_sub = p.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    q = model_sub.add_parser("init-tiny", help="build the tiny untrained model (no network)")
    q.add_argument("dir", type=Path)
    q.set_defaults(func=cmd_model_init_tiny)
    q = model_sub.add_parser(
        "finetune", help="fine-tune a model on de-identified studies (images + report texts) "
                         "into a diffusers folder usable as [generate] model")
    q.add_argument("--base", required=True,
                   help='"tiny", a local diffusers folder, a single-file checkpoint (its configs: '
                        "[generate] single_file_config), or a hub id in the local cache")
    q.add_argument("--data", type=Path, nargs="+", default=None, metavar="PATH",
                   help="folders or files of de-identified DICOM studies, with their reports "
                        "(default: the job outputs in the node's work folder)")
    q.add_argument("--out", type=Path, required=True, help="the new model folder")
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-5 full, 1e-4 lora)")
    q.add_argument("--text-encoder-lr", type=float, default=None, help="default: --lr")
    q.add_argument("--method", choices=("full", "lora"), default="full")
    q.add_argument("--rank", type=int, default=4, help="LoRA rank")
    q.add_argument("--text-encoder", action="store_true", help="train the text encoder too")
    q.add_argument("--resolution", type=int, default=0, help="px; 0 = the base model's own")
    q.add_argument("--mixed-precision", choices=("auto", "bf16", "fp16", "no"), default="auto",
                   help="autocast on CUDA (auto: bf16 where supported); the CPU trains float32")
    q.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto: on with CUDA")
    q.add_argument("--checkpoint-every", type=int, default=500, help="steps; 0 = none")
    q.add_argument("--empty-prompt-fraction", type=float, default=0.0,
                   help="share of captions replaced by the empty prompt (trains the "
                        "unconditional prediction classifier-free guidance uses)")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the newest checkpoint in --out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None, help="default: [generate] device")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_model_finetune)
    q = model_sub.add_parser(
        "evaluate", help="a model against held-out studies: FID in each offline feature space, "
                         "MS-SSIM diversity within a prompt, copy scores against its "
                         "training-set index, and a PNG sheet")
    q.add_argument("--model", default=None, help="override [generate] model")
    q.add_argument("--held-out", dest="held_out", nargs="+", type=Path, required=True,
                   metavar="PATH", help="de-identified studies the model was not trained on "
                                        "(DICOM files and folders; their report texts are the "
                                        "prompts)")
    q.add_argument("--train", nargs="+", type=Path, default=None, metavar="PATH",
                   help="the model's training studies: shown on the sheet beside the "
                        "generated images nearest to them (default: UIDs and scores only)")
    q.add_argument("--prompts", type=int, default=8, metavar="N",
                   help="prompts, from N held-out texts spread over the set (default 8)")
    q.add_argument("--per-prompt", dest="per_prompt", type=int, default=4, metavar="K",
                   help="images per prompt, each its own seed (default 4)")
    q.add_argument("--steps", type=int, default=None, metavar="S",
                   help="denoising steps (default [generate] steps)")
    q.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    q.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="the report as JSON: on stdout, or into FILE (then the summary on "
                        "stdout and the sheet beside FILE)")
    q.add_argument("--sheet", type=Path, default=None, metavar="PNG",
                   help="where the sheet goes (default: beside the JSON file, else "
                        "./synthnode-evaluate.png)")
    q.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                   help="TOML settings file (as before the command)")
    q.set_defaults(func=cmd_model_evaluate)

    p = sub.add_parser("rules", help="routing rules")
    rules_sub = p.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    q = rules_sub.add_parser(
        "test", help="which rule applies to which series of the studies in files and folders, "
                     "and why the others don't"
    )
    q.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    q.add_argument("--calling-aet", default="", metavar="AE",
                   help="the sender's AE title to assume (default: unknown)")
    q.add_argument("--called-aet", default="", metavar="AE",
                   help="the called AE title to assume (default: unknown)")
    q.set_defaults(func=cmd_rules_test)

    p = sub.add_parser("status", help="studies in the spool, stable or not, and counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return parser


def _stdout_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except ConfigError as exc:
        print(f"synthnode: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a socket or a child's pipe, not our output: a real error
        # The reader went away (`synthnode status | head`): end quietly, like a command killed
        # by SIGPIPE. stdout is pointed at /dev/null so that the interpreter's final flush of
        # what is still buffered cannot raise again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # 141, as a shell reports a command ended by SIGPIPE
