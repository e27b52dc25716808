"""The job store's index (node.jobs.state): paged listings and counts from the index equal a
full scan of the records, on a real SQLite file and a real redis-server, through state changes,
deletes, an upgrade from a store that has records but no index, and 100 000 jobs."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from huey.storage import BaseStorage

from node.config import JobsSettings, Queue, QueueBackend, RuleTask, TaskKind
from node.jobs.queue import make_huey
from node.jobs.state import Job, JobState, JobStore
from node.localorthanc import free_port

STATES = list(JobState)
RULES = ("ct-deid", "mr-synth", "cr-forward", "us-deid-strict")
TASK = RuleTask(task=TaskKind.DEIDENTIFY)


def make_jobs(n: int, seed: int = 7, base: float = 1_764_000_000.0) -> list[Job]:
    """``n`` jobs over a few studies and rules, mixed states, some with equal created_at
    (ties sort by id) and created_at not in id order."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        study = f"1.2.826.0.1.3680043.10.{rng.randrange(n // 3 + 1)}"
        at = base + rng.randrange(n) * 0.5 if i % 5 else base + 42.0
        jobs.append(Job(id=f"deidentify-{i:05d}{rng.randrange(16**6):06x}", study_uid=study,
                        revision=1, rule=rng.choice(RULES), task_index=0, task=TASK,
                        queue=Queue.CPU, series_uids=(study + ".1",), destinations=("o",),
                        state=rng.choice(STATES), created_at=at, updated_at=at))
    return jobs


@dataclass(frozen=True)
class Row:
    """What the listing looks at in a job (the 100 000 are not made Job objects)."""

    id: str
    state: JobState
    study_uid: str
    rule: str
    created_at: float


def reference(jobs: Mapping[str, Job | Row], state: JobState | None, text: str) -> list[str]:
    """The full-scan answer (what page() did before the index): ids newest first."""
    chosen = [j for j in jobs.values() if (state is None or j.state is state)
              and (not text or text in j.id or text in j.study_uid or text in j.rule)]
    return [j.id for j in sorted(chosen, key=lambda j: (j.created_at, j.id), reverse=True)]


def check(store: JobStore, jobs: dict[str, Job], texts: tuple[str, ...]) -> None:
    """page(), count() and count_by_state() of ``store`` equal the reference over ``jobs``."""
    expected_counts = {s: sum(j.state is s for j in jobs.values()) for s in JobState}
    assert store.count_by_state() == expected_counts
    for state in (None, *STATES):
        for text in texts:
            want = reference(jobs, state, text)
            assert store.count(state, text) == len(want), (state, text)
            for offset, limit in ((0, 50), (7, 13), (len(want) - 3, 10), (len(want) + 5, 5)):
                got = store.page(state, max(offset, 0), limit, text)
                assert [j.id for j in got] == want[max(offset, 0):max(offset, 0) + limit], (
                    state, text, offset, limit)
            if want:  # whole records, not just ids
                assert store.page(state, 0, 1, text)[0] == jobs[want[0]]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on loopback (in the tests' private network namespace)."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer PING"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["sqlite", "redis"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> JobsSettings:
    if request.param == "sqlite":
        return JobsSettings(backend=QueueBackend.SQLITE, sqlite_file=tmp_path / "q.sqlite3")
    url = request.getfixturevalue("redis_url")
    return JobsSettings(backend=QueueBackend.REDIS, redis_url=url)


def storage(settings: JobsSettings) -> BaseStorage:
    """The job store's Huey storage, opened as the node opens it (node.jobs.queue)."""
    return make_huey(settings, "jobs").storage


def test_pages_and_counts_equal_a_full_scan_through_changes_and_deletes(
    settings: JobsSettings,
) -> None:
    store = JobStore(storage(settings))
    jobs = {j.id: j for j in make_jobs(300)}
    for job in jobs.values():
        store.put(job)
    some = next(iter(jobs.values()))
    texts = ("", "ct-", "deid", some.study_uid, some.id[:14], "1.2.826", "no-such-text")
    check(store, jobs, texts)

    rng = random.Random(3)
    for job_id in rng.sample(sorted(jobs), 120):  # state changes, as workers make them
        jobs[job_id] = jobs[job_id].but(state=rng.choice(STATES), attempts=1)
        store.put(jobs[job_id])
    for job_id in rng.sample(sorted(jobs), 60):
        store.delete(job_id)
        del jobs[job_id]
    check(store, jobs, texts)

    # A second store on the same backend (another process: a worker) sees the same index.
    other = JobStore(storage(settings))
    moved = replace(jobs[next(iter(jobs))], state=JobState.REJECTED)
    other.put(moved)
    jobs[moved.id] = moved
    check(store, jobs, ("", "mr-"))
    assert store.page(JobState.REJECTED, 0, 500)[0:0] == [] and moved in store.page(
        JobState.REJECTED, 0, 500)


def put_raw(settings: JobsSettings, jobs: list[Job]) -> None:
    """Records written as the job store wrote them before the index: raw kv rows (the
    storage's own key-value API), no index anywhere."""
    raw = storage(settings)
    for job in jobs:
        raw.put_data("job:" + job.id, job.to_json())
    raw.put_data("hb:" + jobs[0].id, b'["w", 1.0]')  # other keys stay out of the index
    raw.put_data("orthanc-study:x", b'{"state": "seen"}')


def test_a_store_without_an_index_gets_one_built_on_first_use(settings: JobsSettings) -> None:
    jobs = {j.id: j for j in make_jobs(250, seed=11)}
    put_raw(settings, list(jobs.values()))
    if settings.backend is QueueBackend.SQLITE:
        with sqlite3.connect(settings.sqlite_file) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master")}
        assert not any(t.startswith("synthnode_jobs") for t in tables)

    store = JobStore(storage(settings))
    check(store, jobs, ("", "cr-", next(iter(jobs))[:13]))
    changed = next(iter(jobs.values())).but(state=JobState.DEAD)
    store.put(changed)
    jobs[changed.id] = changed
    check(store, jobs, ("",))


def test_sqlite_index_follows_every_writer_in_the_records_transaction(tmp_path: Path) -> None:
    """The triggers index what the raw storage API writes too, and a write that is rolled
    back leaves neither record nor index row behind."""
    settings = JobsSettings(backend=QueueBackend.SQLITE, sqlite_file=tmp_path / "q.sqlite3")
    store = JobStore(storage(settings))
    jobs = {j.id: j for j in make_jobs(40, seed=5)}
    for job in jobs.values():
        store.put(job)
    check(store, jobs, ("",))
    late = make_jobs(41, seed=6)[-1]
    put_raw(settings, [late])  # after the index: a raw write is indexed all the same
    jobs[late.id] = late
    storage(settings).delete_data("job:" + next(iter(jobs)))
    del jobs[next(iter(jobs))]
    check(store, jobs, ("",))

    raw = storage(settings)
    doomed = replace(late, id="deidentify-rolled-back", state=JobState.DEAD)
    with pytest.raises(RuntimeError), raw.db(commit=True) as curs:
        curs.execute("insert or replace into kv (queue, key, value) values (?, ?, ?)",
                     (raw.name, "job:" + doomed.id, doomed.to_json()))
        raise RuntimeError("crash between the write and the commit")
    check(store, jobs, ("",))
    with sqlite3.connect(settings.sqlite_file) as db:
        index = db.execute("select count(*) from synthnode_jobs where queue_name = ?",
                           (raw.name,)).fetchone()[0]
        records = db.execute("select count(*) from kv where queue = ? and key like 'job:%'",
                             (raw.name,)).fetchone()[0]
    assert index == records == len(jobs)


def fill_fast(settings: JobsSettings, n: int) -> tuple[dict[str, Row], dict[str, bytes]]:
    """``n`` job records written in bulk (one executemany / a few pipelines): what put()
    writes (a real record's JSON with its id, study, rule, state and times varied), without
    100 000 put() calls; the index then comes from the first-use build. Returns the jobs'
    rows and records."""
    template = json.loads(make_jobs(1)[0].to_json())
    rng = random.Random(1)
    records, rows = {}, {}
    for i in range(n):
        at = 1_764_000_000.0 + rng.randrange(n) * 0.25 if i % 7 else 1_764_000_000.0
        study = f"1.2.826.0.1.3680043.10.{rng.randrange(n // 3)}"
        job_id = f"deidentify-{rng.randrange(16**20):020x}"
        rows[job_id] = Row(job_id, rng.choice(STATES), study, rng.choice(RULES), at)
        records[job_id] = json.dumps(dict(
            template, id=job_id, study_uid=study, rule=rows[job_id].rule, created_at=at,
            updated_at=at, state=rows[job_id].state.value, series_uids=[study + ".1"]),
            separators=(",", ":")).encode()
    raw: Any = storage(settings)
    if settings.backend is QueueBackend.SQLITE:
        with raw.db(commit=True) as curs:
            curs.executemany("insert or replace into kv (queue, key, value) values (?, ?, ?)",
                             [(raw.name, "job:" + k, v) for k, v in records.items()])
    else:
        items = list(records.items())
        for i in range(0, n, 5000):
            raw.conn.hset(raw.result_key, mapping={"job:" + k: v for k, v in items[i:i + 5000]})
    return rows, records


def test_a_hundred_thousand_jobs(settings: JobsSettings) -> None:
    by_id, records = fill_fast(settings, 100_000)
    store = JobStore(storage(settings))
    expected = {s: sum(j.state is s for j in by_id.values()) for s in JobState}
    assert store.count_by_state() == expected
    probe = Job.from_json(records[list(by_id)[77_777]])
    for state, text in ((None, ""), (JobState.DEAD, ""), (JobState.RUNNING, "mr-"),
                        (None, probe.study_uid), (probe.state, probe.id), (None, "no-such")):
        want = reference(by_id, state, text)
        assert [j.id for j in store.page(state, 0, 50, text)] == want[:50]
        assert [j.id for j in store.page(state, 950, 50, text)] == want[950:1000]
        assert store.count(state, text) == len(want)
    assert store.page(None, 0, 5, probe.id) == [probe]
    # puts after the build keep the counts (the hot path writes the index itself)
    moved = probe.but(state=JobState.DONE if probe.state is not JobState.DONE else JobState.DEAD)
    store.put(moved)
    expected[probe.state] -= 1
    expected[moved.state] += 1
    assert store.count_by_state() == expected
    assert store.page(moved.state, 0, 1, probe.id) == [moved]


WRITER = """
import random, sys
from node.config import JobsSettings
from node.jobs.queue import make_huey
from node.jobs.state import JobState, JobStore
from tests.test_jobstore_index import make_jobs

store = JobStore(make_huey(JobsSettings.model_validate_json(sys.argv[1]), "jobs").storage)
jobs, rng = make_jobs(400, seed=9), random.Random(9)
for n in range(10**9):
    job = jobs[n % len(jobs)]
    if n % 17 == 0:
        store.delete(job.id)
    else:
        store.put(job.but(state=rng.choice(list(JobState))))
    if n == 300:
        print("going", flush=True)
"""


def test_the_index_agrees_with_the_records_after_the_writer_is_killed(
    settings: JobsSettings,
) -> None:
    """kill -9 of a process in the middle of its puts and deletes: the index and the records
    still agree (the index is written in the record's own transaction or script call)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, settings.model_dump_json()],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "going\n"
        time.sleep(0.3)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    store = JobStore(storage(settings))
    records = {j.id: j for j in store.all()}
    assert len(records) > 300
    check(store, records, ("", "ct-"))


def test_of_state_walks_one_state_oldest_first(settings: JobsSettings) -> None:
    store = JobStore(storage(settings))
    jobs = {j.id: j for j in make_jobs(200, seed=4)}
    for job in jobs.values():
        store.put(job)
    cut = sorted(j.created_at for j in jobs.values())[120]
    for state in (JobState.DONE, JobState.RUNNING):
        want = list(reversed(reference(jobs, state, "")))
        assert [j.id for j in store.of_state(state, chunk=7)] == want
        assert [j.id for j in store.of_state(state, created_before=cut)] == [
            i for i in want if jobs[i].created_at < cut]


def test_the_reaper_reads_running_and_old_done_jobs_through_the_index(
    settings: JobsSettings,
) -> None:
    """The reaper (node.jobs.reaper), which walks the index now: a running job whose worker
    stopped beating is retried, one that beats is left alone; done jobs past keep_done_s are
    forgotten, newer ones and other states kept."""
    from node.jobs import Queues, Reaper

    settings = settings.model_copy(update={"keep_done_s": 3600.0, "heartbeat_timeout_s": 30.0})
    queues = Queues(settings)
    store = queues.store
    now = time.time()
    old, lost, alive, recent, dead = make_jobs(5, seed=8)
    made = {
        "old": replace(old, state=JobState.DONE, created_at=now - 9000, updated_at=now - 8000),
        "lost": replace(lost, state=JobState.RUNNING, attempts=1, worker="w:1",
                        created_at=now - 500, updated_at=now - 400),
        "alive": replace(alive, state=JobState.RUNNING, attempts=1, worker="w:2",
                         created_at=now - 500, updated_at=now - 400),
        "recent": replace(recent, state=JobState.DONE, created_at=now - 9000,
                          updated_at=now - 60),  # made long ago, done lately: kept
        "dead": replace(dead, state=JobState.DEAD, created_at=now - 9000,
                        updated_at=now - 8000),
    }
    for job in made.values():
        store.put(job)
    store.beat(made["alive"].id, "w:2", now - 5)
    assert Reaper(settings, queues).tick(now) == 1
    assert store.get(made["old"].id) is None
    assert store.get(made["lost"].id).state is JobState.PENDING  # type: ignore[union-attr]
    for name in ("alive", "recent", "dead"):
        assert store.get(made[name].id) == made[name], name
    assert store.count_by_state()[JobState.DONE] == 1
