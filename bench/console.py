"""Console benchmark: does the operator console slow the node, and are its pages fast?

What is measured
    ingest   The wall clock of one dcmtk ``storescu`` run sending N small instances (CT_small
             copies, ~39 kB) over one association to ``synthnode serve`` (fsync on, no rules, no
             workers), with the console off, and with the console on while a logged-in client
             GETs the overview page once a second. Interleaved ``--repeat`` times, medians.
             Goal: console on >= 0.97x console off (within 3 %).
    jobs     The jobs page with ``--jobs`` (100 000) job records in the job store (SQLite
             backend): the first page, a page of one state, a page far back and a search, each
             requested ``--requests`` times by a logged-in client on loopback; median and p95
             of the whole request (server render plus HTTP). Goal: every median < 300 ms.
             The records are written straight into Huey's key-value table (one transaction),
             as a store that grew over months holds them; the node indexes them on first use
             (that first request is reported apart).

Usage (as root): .venv/bin/python bench/console.py [--small N] [--repeat R] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from harness import (
    OUT_DIR,
    BenchError,
    NodeOptions,
    NodeServer,
    add_out_option,
    environment,
    goal_state,
    run_main,
    settle_or_warn,
    storescu,
    synthnode_exe,
)

from node.localorthanc import free_port
from node.samples import make_study

PASSWORD = "bench-admin-password"
SEND_TIMEOUT_S = 600.0


def add_admin(node: NodeServer) -> None:
    node.prepare()
    done = subprocess.run([synthnode_exe(), "--config", str(node.config), "user", "add",
                           "bench", "--role", "admin", "--password-stdin"],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"user add: {done.stderr}")


def login(port: int) -> requests.Session:
    s = requests.Session()
    deadline = time.monotonic() + 30
    while True:  # the console starts just after the DICOM port (which C-ECHO found ready)
        try:
            s.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise BenchError("the console does not answer") from None
            time.sleep(0.1)
    r = s.post(f"http://127.0.0.1:{port}/login", timeout=30,
               data={"username": "bench", "password": PASSWORD, "next": "/"})
    if r.status_code != 200 or "whoami" not in r.text:
        raise BenchError(f"login to the console failed: {r.status_code}")
    return s


class Poller(threading.Thread):
    """GETs a page once a second until stopped; counts the answers."""

    def __init__(self, session: requests.Session, url: str) -> None:
        super().__init__(daemon=True)
        self.session, self.url = session, url
        self.stop = threading.Event()
        self.answers = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            if self.session.get(self.url, timeout=30).status_code == 200:
                self.answers += 1


def start_node(workdir: Path, console: bool) -> NodeServer:
    """A fresh node that routes nothing (``prepare`` would replace the users: done once)."""
    options = NodeOptions(console_port=free_port() if console else None)
    node = NodeServer(workdir, options)
    if console:
        add_admin(node)
        node.prepare = lambda: None  # type: ignore[method-assign]  (config and users made)
    node.start()
    return node


def ingest_run(root: Path, data: Path, n: int, console: bool, rep: int) -> dict[str, Any]:
    work = root / f"ingest-{'on' if console else 'off'}-{rep}"
    work.mkdir(parents=True)
    node = start_node(work, console)
    poller = None
    try:
        if console:
            port = node.options.console_port
            assert port is not None
            poller = Poller(login(port), f"http://127.0.0.1:{port}/")
            poller.start()
            time.sleep(1.2)  # the first poll has happened
        settle_or_warn(10)
        started, ended = storescu(node.ae_title, node.port, [data], SEND_TIMEOUT_S, node.name)
        held = node.count_received()
    finally:
        if poller is not None:
            poller.stop.set()
            poller.join(5)
        node.stop()
    if held != n:
        raise BenchError(f"node holds {held} of {n}")
    seconds = ended - started
    return {"console": console, "rep": rep, "seconds": seconds, "rate": n / seconds,
            "polls": poller.answers if poller else 0}


def fill_jobs(config: Path, count: int) -> None:
    """``count`` job records written straight into the job store's key-value table."""
    from node.config import Queue, RuleTask, TaskKind, load_settings
    from node.jobs import Job, JobState

    settings = load_settings(config, environ={})
    from node.jobs import Queues

    Queues(settings.jobs)  # creates the tables
    states = [JobState.DONE] * 90 + [JobState.DEAD] * 4 + [JobState.PENDING] * 3 + [
        JobState.REVIEW] * 3
    task = RuleTask(task=TaskKind.DEIDENTIFY)
    now = time.time() - count
    rows = []
    for i in range(count):
        study = f"1.2.826.0.1.3680043.10.{i}"
        job = Job(f"deidentify-{i:020d}", study, 1, "deid-all", 0, task, Queue.CPU,
                  (f"{study}.1",), ("orthanc",), state=states[i % len(states)], attempts=1,
                  created_at=now + i, updated_at=now + i)
        rows.append((f"{settings.jobs.name}-jobs", f"job:{job.id}", job.to_json()))
    db = sqlite3.connect(settings.jobs.sqlite_file)
    with db:
        db.executemany("INSERT OR REPLACE INTO kv (queue, key, value) VALUES (?, ?, ?)", rows)
    db.close()


def jobs_pages(root: Path, count: int, requests_n: int) -> dict[str, Any]:
    work = root / "jobs"
    work.mkdir(parents=True)
    options = NodeOptions(console_port=free_port())
    node = NodeServer(work, options)
    add_admin(node)
    t = time.monotonic()
    fill_jobs(node.config, count)
    filled_s = time.monotonic() - t
    node.prepare = lambda: None  # type: ignore[method-assign]
    node.start()
    try:
        assert options.console_port is not None
        base = f"http://127.0.0.1:{options.console_port}"
        s = login(options.console_port)
        t = time.monotonic()
        first = s.get(base + "/jobs", timeout=600)
        first_s = time.monotonic() - t
        if first.status_code != 200 or "deidentify-" not in first.text:
            raise BenchError(f"jobs page: {first.status_code}")
        pages = {"first page": "/jobs", "state dead": "/jobs?state=dead",
                 "page 1000": "/jobs?page_no=1000",
                 "search a study": f"/jobs?q=1.2.826.0.1.3680043.10.{count // 2}"}
        out: dict[str, Any] = {"jobs": count, "fill_s": filled_s, "first_request_s": first_s}
        for name, path in pages.items():
            times = []
            for _ in range(requests_n):
                t = time.monotonic()
                r = s.get(base + path, timeout=120)
                times.append(time.monotonic() - t)
                if r.status_code != 200:
                    raise BenchError(f"{path}: {r.status_code}")
            times.sort()
            out[name] = {"median_ms": statistics.median(times) * 1000,
                         "p95_ms": times[max(0, int(len(times) * 0.95) - 1)] * 1000}
        return out
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="instances per ingest run")
    parser.add_argument("--repeat", type=int, default=3, help="ingest runs per setting")
    parser.add_argument("--jobs", type=int, default=100_000, help="job records")
    parser.add_argument("--requests", type=int, default=20, help="GETs per page")
    parser.add_argument("--skip-ingest", action="store_true")
    add_out_option(parser, OUT_DIR / "console.json")
    args = parser.parse_args()

    def body(root: Path) -> None:
        result: dict[str, Any] = {"environment": environment("fastapi", "uvicorn")}
        if not args.skip_ingest:
            data = root / "data"
            make_study(data, "CT_small.dcm", per_series=args.small)
            runs = []
            for rep in range(args.repeat):
                for console in (False, True):
                    runs.append(ingest_run(root, data, args.small, console, rep))
            off = statistics.median(r["rate"] for r in runs if not r["console"])
            on = statistics.median(r["rate"] for r in runs if r["console"])
            result["ingest"] = {"runs": runs, "off": off, "on": on, "ratio": on / off}
            print(f"ingest, {args.small} small instances, one association, median of "
                  f"{args.repeat}: console off {off:.0f} inst/s, console on + overview polled "
                  f"every second {on:.0f} inst/s: {on / off:.3f}x "
                  f"(goal >= 0.97x: {goal_state(on / off >= 0.97)})")
        jobs = jobs_pages(root, args.jobs, args.requests)
        result["jobs_page"] = jobs
        print(f"jobs page with {args.jobs} jobs (filled in {jobs['fill_s']:.1f} s; first "
              f"request, which indexes them, {jobs['first_request_s'] * 1000:.0f} ms):")
        ok = True
        for name in ("first page", "state dead", "page 1000", "search a study"):
            m = jobs[name]
            ok &= m["median_ms"] < 300
            print(f"  {name:<16} median {m['median_ms']:7.1f} ms  p95 {m['p95_ms']:7.1f} ms")
        print(f"goal: every median < 300 ms: {goal_state(ok)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    return run_main("bench/console.py", body, tmp_prefix="synthnode-bench-console-")


if __name__ == "__main__":
    sys.exit(main())
