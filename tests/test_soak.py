"""Soak: 8 concurrent storescu associations, 250 instances each, into a real ``serve`` that
de-identifies every study into a real Orthanc, while ``serve`` is killed with SIGKILL at three
random moments and restarted, and Orthanc is restarted once. Every acknowledged instance's output
is in Orthanc exactly once, nothing is left running, serve's memory stays bounded.

``SYNTHNODE_SOAK_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread

from node.jobs import JobState
from node.localorthanc import OrthancProcess
from tests.nodeproc import NodeProcess, make_study, storescu
from tests.test_jobs import records, wait_for
from tests.test_serve import alive, recorded_workers

pytestmark = pytest.mark.slow

SENDERS = 8
PER_SENDER = 250
CHUNK = 25  # instances per study, and per storescu run: a failed run is resent whole
KILLS = 3
RSS_BOUND_MB = 600
KEY = "soak-test-key-" + "5f0c" * 12
DEID_ALL = """
[[rules]]
name = "deid-all"
[[rules.tasks]]
task = "deidentify"
"""


@dataclass
class Sender:
    """One modality sending its chunks in turn, each resent until storescu succeeds."""

    name: str
    chunks: list[list[Path]]
    port: int
    deadline: float
    runs: int = 0
    failed_runs: int = 0
    done_chunks: int = 0
    error: str = ""
    thread: threading.Thread = field(init=False)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for chunk in self.chunks:
            while True:
                if time.monotonic() > self.deadline:
                    self.error = f"{self.name}: chunk not acknowledged before the deadline"
                    return
                self.runs += 1
                try:
                    ok = storescu(self.port, chunk, calling=self.name,
                                  timeout_s=60).returncode == 0
                except Exception:  # noqa: BLE001 - a hung storescu counts as failed: resend
                    ok = False
                if ok:
                    self.done_chunks += 1
                    break
                self.failed_runs += 1
                time.sleep(1.0)  # the node is down or restarting: try again shortly


class Memory:
    """Samples serve's resident memory (VmRSS, VmHWM) from /proc, over its restarts."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            proc = self.node.proc
            if proc is None:
                continue
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            for key in ("VmHWM", "VmRSS"):
                if m := re.search(rf"^{key}:\s+(\d+) kB", status, re.M):
                    self.peak_kb = max(self.peak_kb, int(m[1]))
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Like tests.test_jobs.wait_for, polling once a second: a poll reads the job store."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def _workers_of(config: Path) -> list[int]:
    """Live ``node worker`` processes of ``config``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in args and str(config).encode() in args:
            found.append(int(entry.name))
    return found


def test_soak_kill9_and_restarts_lose_nothing_duplicate_nothing(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    seed = int(os.environ.get("SYNTHNODE_SOAK_SEED", random.SystemRandom().randrange(10**6)))
    print(f"\nsoak seed {seed} (SYNTHNODE_SOAK_SEED={seed} replays it)")
    rnd = random.Random(seed)
    began = time.monotonic()

    # 1. 8 senders x 250 small instances (CT and MR in turn), as studies of CHUNK instances.
    senders_data: list[list[list[Path]]] = []
    for s in range(SENDERS):
        source = ("CT_small.dcm", "MR_small.dcm")[s % 2]
        senders_data.append([
            make_study(tmp_path / "in" / f"s{s}" / f"c{c}", source, per_series=CHUNK,
                       patient_name=f"Soak^Sender{s}", patient_id=f"SOAK-{s}-{c}")
            for c in range(PER_SENDER // CHUNK)])
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for chunks in senders_data for chunk in chunks for p in chunk}
    assert len(sources) == SENDERS * PER_SENDER

    broker = tmp_path / "broker.jsonl"
    node = node_factory(
        rules=DEID_ALL,
        spool={"stable_after_s": 1.0, "check_interval_s": 0.2},
        deid={"key": KEY, "honest_broker_file": str(broker)},
        orthanc={"url": orthanc.url, "username": orthanc.username or "",
                 "password": orthanc.password},
        jobs={"cpu_workers": 2, "gpu_workers": 0, "heartbeat_s": 0.5,
              "heartbeat_timeout_s": 4.0, "backoff_initial_s": 0.5, "backoff_max_s": 2.0,
              "max_attempts": 100},
        dispatch={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
    )
    memory = Memory(node)
    total_chunks = SENDERS * (PER_SENDER // CHUNK)
    deadline = time.monotonic() + 420
    senders = [Sender(f"SOAK{s}", chunks, node.port, deadline)
               for s, chunks in enumerate(senders_data)]
    # 2. Three kills and one Orthanc restart at random moments of the transfer.
    kill_at = sorted(rnd.sample(range(int(total_chunks * 0.1), int(total_chunks * 0.9)), KILLS))
    orthanc_at = rnd.randrange(int(total_chunks * 0.2), int(total_chunks * 0.8))
    print(f"kills after {kill_at} of {total_chunks} chunks acknowledged, Orthanc restarted "
          f"after {orthanc_at}")
    for sender in senders:
        sender.start()

    def acknowledged() -> int:
        return sum(s.done_chunks for s in senders)

    events = sorted([(n, "kill") for n in kill_at] + [(orthanc_at, "orthanc")])
    kills = restarts = 0
    for threshold, what in events:
        wait_for(lambda t=threshold: acknowledged() >= t or any(s.error for s in senders),
                 timeout_s=300, what=f"{threshold} chunks acknowledged")
        time.sleep(rnd.uniform(0.0, 0.5))
        if what == "orthanc":
            orthanc.restart()
            continue
        workers = recorded_workers(node)
        node.kill9()
        kills += 1
        # No orphans: the killed serve's workers end with it.
        wait_for(lambda w=workers: not any(alive(p, s) for p, s in w.items()), 60,
                 "the workers of the killed serve to end")
        node.start(timeout_s=60)
        restarts += 1
    for sender in senders:
        sender.thread.join(max(1.0, deadline - time.monotonic()))
    errors = [s.error for s in senders if s.error or s.thread.is_alive()]
    assert not errors, errors
    sent_s = time.monotonic() - began

    # 3. Every acknowledged instance is in the spool, every output in Orthanc once.
    def all_delivered() -> bool:
        jobs = records(node)
        dead = [j for j in jobs if j.state is JobState.DEAD]
        assert not dead, f"job {dead[0].id} dead: {dead[0].last_error}"
        return (len({j.study_uid for j in jobs}) == total_chunks
                and all(j.state is JobState.DONE for j in jobs)
                and orthanc.count_instances() >= len(sources))
    _wait(all_delivered, 300, "every job done and delivered")
    node.stop()
    assert node.proc is not None and node.proc.returncode == 0
    memory.stop()

    mapped: dict[str, set[str]] = {}
    for line in broker.read_text().splitlines():
        row = json.loads(line)
        mapped.setdefault(row["sop_instance_uid"], set()).add(row["new_sop_instance_uid"])
    in_orthanc = [i["MainDicomTags"]["SOPInstanceUID"] for i in json.loads(
        orthanc.request("GET", "/instances?expand", timeout_s=120))]
    outputs = {sop: next(iter(new)) for sop, new in mapped.items() if len(new) == 1}
    lost = sources - {s for s, out in outputs.items() if out in set(in_orthanc)}
    two_outputs = [s for s, new in mapped.items() if len(new) > 1]
    duplicates = len(in_orthanc) - len(set(in_orthanc)) + len(two_outputs) + max(
        0, len(set(in_orthanc)) - len(sources))
    left = _workers_of(node.config)
    wall_s = time.monotonic() - began
    failed_runs = sum(s.failed_runs for s in senders)
    print(f"soak: {len(sources)} instances from {SENDERS} concurrent associations, {kills} "
          f"kills -9, {restarts} restarts of serve, 1 restart of Orthanc, {failed_runs} "
          f"storescu runs resent; lost {len(lost)}, duplicates {duplicates}; peak serve RSS "
          f"{memory.peak_kb / 1024:.0f} MB ({memory.samples} samples); sent in {sent_s:.0f} s, "
          f"wall time {wall_s:.0f} s")
    assert kills == KILLS and restarts == KILLS
    assert not lost, f"{len(lost)} acknowledged instances have no output in Orthanc"
    assert len(in_orthanc) == len(sources) and duplicates == 0
    assert set(mapped) == sources and set(outputs.values()) == set(in_orthanc)
    assert not left, f"node worker processes alive after the last stop: {left}"
    assert "Traceback" not in node.log() and "Fatal Python error" not in node.log()
    assert memory.samples > 0 and memory.peak_kb < RSS_BOUND_MB * 1024
