"""Ingest benchmark: how fast does synthnode receive C-STOREs, next to dcmtk storescp and Orthanc?

What is measured
    The wall clock of one dcmtk ``storescu`` run that sends N files over ONE association to a
    receiver on 127.0.0.1, from process start to exit (association set-up and release included:
    a few milliseconds). storescu must exit 0 and the receiver must then hold all N instances.
    Rates are N / seconds and bytes of the sent files / seconds (MB = 10^6 bytes).

Receivers, one after another, each started fresh with empty temporary storage for every run
    node      ``synthnode serve`` (pynetdicom SCP; spool with ``fsync = true``: each instance is
              fdatasync'ed and its folder fsync'ed before Success is answered)
    storescp  dcmtk ``storescp`` (single process, writes files, never fsyncs)
    orthanc   Orthanc with a minimal config (SQLite index, ``SyncStorageArea`` true, no plugins)

Data
    small: N copies of pydicom's CT_small.dcm (~39 kB, CT, Explicit VR Little Endian)
    large: N copies of pydicom-data's RG1_UNCR.dcm (~7.2 MB, CR, Explicit VR Little Endian)
    Each copy has a new SOP Instance UID; each size class one Study and Series UID.

Method
    Every process runs in a private network namespace (the script re-executes itself under
    ``unshare --net``), so nothing listens on a real interface. Every dcmtk and Orthanc process
    gets ``TCP_NODELAY=1`` (else Nagle's algorithm costs ~40 ms per C-STORE). Each
    (receiver, size) pair is measured ``--repeat`` times (default 3), interleaved, and the
    median is reported; ``sync`` runs before each measurement so that one receiver's dirty pages
    are not written back during the next one's run.

PDU sizes (what storescu sends is bounded by the receiver's announced maximum)
    storescp and Orthanc announce 16384 bytes (their defaults); the node's default
    ``max_pdu_bytes = 0`` announces no limit, so storescu sends it its own maximum of 131072-byte
    PDUs. ``--node-max-pdu 16382`` measures the node under the same fragmentation as the others.

Goal: node >= 0.8x storescp on large objects, and node >= 1.0x Orthanc on both sizes.

Usage (as root): .venv/bin/python bench/ingest.py [--small N] [--large N] [--repeat R] [--out F]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from common import (
    LIVE_PROCESSES,
    BenchError,
    dcmtk,
    first_line,
    launch_orthanc,
    load_template,
    run_isolated,
    save_copies,
    subset,
    tail,
    terminate,
    write_doc,
)

from node.localorthanc import OrthancProcess, free_port

HOST = "127.0.0.1"
SCU_AET = "BENCHSCU"
START_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 900.0
COUNT_TIMEOUT_S = 10.0
POLL_S = 0.1
RECEIVERS = ("node", "storescp", "orthanc")
SIZES = {"small": "CT_small.dcm", "large": "RG1_UNCR.dcm"}
GOALS = (  # (size class, other receiver, minimum node/other ratio)
    ("large", "storescp", 0.8),
    ("small", "orthanc", 1.0),
    ("large", "orthanc", 1.0),
)
GOAL_TEXT = "goal: node >= 0.8x storescp on large objects and >= 1.0x Orthanc on both sizes"
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "ingest.json"

# -- helpers ---------------------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    """Environment for every child: Nagle off for dcmtk and Orthanc."""
    return dict(os.environ, TCP_NODELAY="1")


def wait_until(check: Callable[[], bool], what: str, timeout_s: float,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``check`` until it is true; BenchError after ``timeout_s`` or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with status {proc.returncode}")
        if check():
            return
        time.sleep(POLL_S)
    raise BenchError(f"{what}: not done after {timeout_s:.0f} s")


def c_echo(ae_title: str, port: int) -> bool:
    cmd = [dcmtk("echoscu"), "-aet", SCU_AET, "-aec", ae_title, "-to", "2", "-ta", "2", HOST,
           str(port)]
    try:
        done = subprocess.run(cmd, env=tool_env(), capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    size_class: str
    folder: Path
    instances: int
    total_bytes: int


def make_dataset(size_class: str, template_name: str, count: int, root: Path) -> DataSet:
    """``count`` copies of a pydicom test file, each with a new SOP Instance UID."""
    from pydicom.uid import generate_uid

    ds = load_template(template_name)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    folder = root / size_class
    folder.mkdir(parents=True)
    paths = save_copies(ds, count, lambda i: folder / f"{i:05d}.dcm")
    total = sum(path.stat().st_size for path in paths)
    return DataSet(size_class, folder, count, total)


# -- receivers -------------------------------------------------------------------------------


class Receiver:
    """A receiving server started as a child process with its own storage under ``workdir``."""

    name = ""
    ae_title = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def count_received(self) -> int:
        raise NotImplementedError

    def prepare(self) -> None:
        self.storage.mkdir(parents=True)

    def wait_ready(self) -> None:
        wait_until(lambda: c_echo(self.ae_title, self.port),
                   f"{self.name}: C-ECHO on port {self.port}", START_TIMEOUT_S, self.proc)

    def start(self) -> None:
        self.prepare()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), env=tool_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        LIVE_PROCESSES.add(self.proc)
        try:
            self.wait_ready()
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {self.log_path} ---\n{tail(self.log_path)}") from None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; the exit status (None if killed)."""
        proc, self.proc = self.proc, None
        return None if proc is None else terminate(proc)


class NodeReceiver(Receiver):
    name = "node"
    ae_title = "SYNTHNODE"

    def __init__(self, workdir: Path, max_pdu_bytes: int = 0) -> None:
        super().__init__(workdir)
        self.max_pdu_bytes = max_pdu_bytes
        self.config = workdir / "node.toml"

    def prepare(self) -> None:
        super().prepare()
        # The receiver alone: no rules (it routes nothing and needs no key), no worker
        # processes (their start-up would share the CPUs with the first C-STOREs).
        self.config.write_text(
            "rules = []\n"
            "[node]\n"
            f'ae_title = "{self.ae_title}"\n'
            f'host = "{HOST}"\n'
            f"port = {self.port}\n"
            f"max_pdu_bytes = {self.max_pdu_bytes}\n"
            "[spool]\n"
            f'dir = "{self.storage}"\n'
            "fsync = true\n"
            "stable_after_s = 3600\n"
            "[jobs]\n"
            "cpu_workers = 0\n"
            "gpu_workers = 0\n"
        )

    def command(self) -> list[str]:
        exe = Path(sys.executable).with_name("synthnode")
        return [str(exe) if exe.exists() else "synthnode", "--config", str(self.config), "serve"]

    def count_received(self) -> int:
        return sum(1 for p in self.storage.rglob("*.dcm") if ".tmp" not in p.parts)


class StorescpReceiver(Receiver):
    name = "storescp"
    ae_title = "STORESCP"

    def command(self) -> list[str]:
        return [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.storage), str(self.port)]

    def count_received(self) -> int:
        return sum(1 for p in self.storage.iterdir() if p.is_file())


class OrthancReceiver(Receiver):
    """Orthanc started by the tests' :class:`OrthancProcess` (one piece of Orthanc start-up
    code), without authentication."""

    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        http_port = free_port({self.port})
        self.orthanc = OrthancProcess(
            workdir, aet=self.ae_title, username=None, http_port=http_port,
            dicom_port=self.port, overrides={"Name": "synthnode-bench"},
        )
        assert self.orthanc.storage == self.storage and self.orthanc.log_path == self.log_path

    def start(self) -> None:
        self.proc = launch_orthanc(self.orthanc, START_TIMEOUT_S)  # once HTTP /system answers
        try:
            self.wait_ready()
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {self.log_path} ---\n{tail(self.log_path)}") from None

    def count_received(self) -> int:
        return self.orthanc.count_instances()


def make_receiver(name: str, workdir: Path, node_max_pdu: int) -> Receiver:
    workdir.mkdir(parents=True)
    if name == "node":
        return NodeReceiver(workdir, node_max_pdu)
    if name == "storescp":
        return StorescpReceiver(workdir)
    return OrthancReceiver(workdir)


# -- measurement -----------------------------------------------------------------------------


@dataclass
class Run:
    receiver: str
    size_class: str
    repetition: int
    seconds: float
    received: int
    receiver_exit_status: int | None


def send_all(data: DataSet, receiver: Receiver) -> float:
    """storescu every file of ``data`` over one association; seconds of wall clock."""
    cmd = [dcmtk("storescu"), "-aet", SCU_AET, "-aec", receiver.ae_title,
           "-R",  # propose only the contexts the files need (with their own transfer syntax)
           "-to", "10", "-ts", "60",
           "+sd", HOST, str(receiver.port), str(data.folder)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True,
                              timeout=SEND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"storescu to {receiver.name}: not done after {SEND_TIMEOUT_S:.0f} s") from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"storescu to {receiver.name} exited {done.returncode}:\n"
                         f"{done.stderr[-2000:]}{done.stdout[-2000:]}")
    return seconds


def wait_for_count(receiver: Receiver, expected: int) -> int:
    """What the receiver holds, polled briefly (every receiver acknowledges after storing)."""
    deadline = time.monotonic() + COUNT_TIMEOUT_S
    while True:
        count = receiver.count_received()
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(POLL_S)


def measure(name: str, data: DataSet, repetition: int, workdir: Path, node_max_pdu: int) -> Run:
    receiver = make_receiver(name, workdir, node_max_pdu)
    try:
        receiver.start()
        os.sync()
        seconds = send_all(data, receiver)
        received = wait_for_count(receiver, data.instances)
    finally:
        status = receiver.stop()
    if received != data.instances:
        raise BenchError(f"{name} holds {received} of {data.instances} {data.size_class} "
                         f"instances after storescu succeeded\n{tail(receiver.log_path)}")
    if name == "node" and status != 0:
        raise BenchError(f"synthnode serve exited {status} on SIGTERM (expected 0)\n"
                         f"{tail(receiver.log_path)}")
    shutil.rmtree(workdir, ignore_errors=True)
    return Run(name, data.size_class, repetition, seconds, received, status)


@dataclass
class Result:
    receiver: str
    size_class: str
    instances: int
    total_bytes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.median_s

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.median_s


def summarize(runs: list[Run], datasets: dict[str, DataSet]) -> dict[tuple[str, str], Result]:
    results: dict[tuple[str, str], Result] = {}
    for run in runs:
        data = datasets[run.size_class]
        key = (run.receiver, run.size_class)
        result = results.setdefault(
            key, Result(run.receiver, run.size_class, data.instances, data.total_bytes))
        result.seconds.append(run.seconds)
    return results


def ratios(results: dict[tuple[str, str], Result]) -> dict[str, dict[str, float]]:
    """{size class: {"node/storescp": x, "node/orthanc": y}} from instances/s."""
    out: dict[str, dict[str, float]] = {}
    for (receiver, size_class), result in results.items():
        node = results.get(("node", size_class))
        if receiver != "node" and node is not None:
            out.setdefault(size_class, {})[f"node/{receiver}"] = (
                node.instances_per_s / result.instances_per_s)
    return out


def goal_checks(node_ratios: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    checks = []
    for size_class, other, minimum in GOALS:
        ratio = node_ratios.get(size_class, {}).get(f"node/{other}")
        checks.append({
            "size_class": size_class, "versus": other, "minimum": minimum, "ratio": ratio,
            "met": None if ratio is None else ratio >= minimum,
        })
    return checks


# -- report ----------------------------------------------------------------------------------


def print_report(results: dict[tuple[str, str], Result], node_ratios: dict[str, dict[str, float]],
                 checks: list[dict[str, Any]]) -> None:
    print()
    header = (f"{'receiver':<9} {'size':<6} {'N':>4} {'MB':>7} {'median s':>9} "
              f"{'inst/s':>8} {'MB/s':>8}  runs (s)")
    print(header)
    print("-" * len(header))
    for size_class in SIZES:
        for receiver in RECEIVERS:
            r = results.get((receiver, size_class))
            if r is None:
                continue
            runs = " ".join(f"{s:.3f}" for s in r.seconds)
            print(f"{receiver:<9} {size_class:<6} {r.instances:>4} {r.total_bytes / 1e6:>7.1f} "
                  f"{r.median_s:>9.3f} {r.instances_per_s:>8.1f} {r.mb_per_s:>8.1f}  {runs}")
    print()
    for size_class, by_other in node_ratios.items():
        text = "  ".join(f"{name} = {value:.2f}x" for name, value in sorted(by_other.items()))
        print(f"ratios {size_class:<6} {text}")
    print()
    print(GOAL_TEXT)
    for c in checks:
        state = "n/a" if c["met"] is None else "met" if c["met"] else "NOT met"
        ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        print(f"  {c['size_class']:<6} node/{c['versus']:<9} >= {c['minimum']:.1f}x: "
              f"{ratio:>6}  {state}")


def environment() -> dict[str, Any]:
    return {
        "synthnode": version("synthnode"),
        "pynetdicom": version("pynetdicom"),
        "pydicom": version("pydicom"),
        "python": platform.python_version(),
        "dcmtk": first_line([dcmtk("storescu"), "--version"]),
        "orthanc": first_line(["Orthanc", "--version"]),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }


def write_json(path: Path, args: argparse.Namespace, datasets: dict[str, DataSet],
               runs: list[Run], results: dict[tuple[str, str], Result],
               node_ratios: dict[str, dict[str, float]], checks: list[dict[str, Any]]) -> None:
    doc = {
        "benchmark": "ingest",
        "goal": GOAL_TEXT,
        "method": "dcmtk storescu, one association per run, loopback in a private netns, "
                  "TCP_NODELAY=1, fresh receiver per run, median of repetitions",
        "settings": {"repeat": args.repeat, "node_max_pdu_bytes": args.node_max_pdu,
                     "node_fsync": True, "receivers": args.receivers},
        "environment": environment(),
        "datasets": {k: {"instances": d.instances, "total_bytes": d.total_bytes,
                         "template": SIZES[k]} for k, d in datasets.items()},
        "results": [
            {"receiver": r.receiver, "size_class": r.size_class, "instances": r.instances,
             "total_bytes": r.total_bytes, "seconds": r.seconds, "median_s": r.median_s,
             "instances_per_s": r.instances_per_s, "mb_per_s": r.mb_per_s}
            for r in results.values()
        ],
        "ratios": node_ratios,
        "goals": checks,
        "runs": [asdict(run) for run in runs],
    }
    write_doc(path, doc)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--small", type=int, default=200, help="small (CT 39 kB) instances (200)")
    p.add_argument("--large", type=int, default=30, help="large (CR 7.2 MB) instances (30)")
    p.add_argument("--repeat", type=int, default=3, help="runs per receiver and size (3)")
    p.add_argument("--receivers", default=",".join(RECEIVERS),
                   help="comma-separated subset of node,storescp,orthanc")
    p.add_argument("--node-max-pdu", type=int, default=0,
                   help="the node's [node] max_pdu_bytes (default 0 = unlimited)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    args = p.parse_args(argv)
    args.receivers = subset(p, "--receivers", args.receivers, RECEIVERS)
    if args.repeat < 1 or args.small < 0 or args.large < 0 or args.small + args.large == 0:
        p.error("--repeat must be >= 1 and --small/--large >= 0, not both 0")
    return args


def check_tools() -> None:
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            raise BenchError(f"`{tool}` not found on PATH (Debian packages dcmtk, orthanc)")


def run_benchmark(args: argparse.Namespace, root: Path) -> None:
    counts = {"small": args.small, "large": args.large}
    print(f"ingest benchmark: {', '.join(args.receivers)}; {GOAL_TEXT}")
    print(f"making data in {root} ...", flush=True)
    datasets = {size: make_dataset(size, template, counts[size], root / "data")
                for size, template in SIZES.items() if counts[size] > 0}
    runs: list[Run] = []
    for repetition in range(1, args.repeat + 1):
        for size_class, data in datasets.items():
            for name in args.receivers:
                workdir = root / f"{name}-{size_class}-{repetition}"
                run = measure(name, data, repetition, workdir, args.node_max_pdu)
                runs.append(run)
                print(f"  run {repetition}/{args.repeat} {name:<8} {size_class:<5} "
                      f"{data.instances:>4} in {run.seconds:7.3f} s "
                      f"({data.instances / run.seconds:7.1f}/s)", flush=True)
    results = summarize(runs, datasets)
    node_ratios = ratios(results)
    checks = goal_checks(node_ratios)
    print_report(results, node_ratios, checks)
    write_json(args.out, args, datasets, runs, results, node_ratios, checks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()

    def body(root: Path) -> None:
        check_tools()
        run_benchmark(args, root)

    return run_isolated("bench/ingest.py", "its servers", body, tmp_prefix="synthnode-bench-")


if __name__ == "__main__":
    sys.exit(main())
