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
    Every process runs in a private network namespace (the script moves itself into one with
    ``node.netns.isolate_network``), so nothing listens on a real interface. Every dcmtk and
    Orthanc process gets ``TCP_NODELAY=1`` (else Nagle's algorithm costs ~40 ms per C-STORE). Each
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
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    OUT_DIR,
    BenchError,
    NodeOptions,
    NodeServer,
    OrthancReceiver,
    Receiver,
    StorescpReceiver,
    add_out_option,
    dicom_environment,
    goal_state,
    print_header,
    run_main,
    storescu,
    subset,
    tail,
    write_json,
)

from node.samples import make_study

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
DEFAULT_OUT = OUT_DIR / "ingest.json"

# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    size_class: str
    folder: Path
    instances: int
    total_bytes: int


def make_dataset(size_class: str, template_name: str, count: int, root: Path) -> DataSet:
    """``count`` copies of a pydicom test file as one study and series."""
    folder = root / size_class
    try:
        paths = make_study(folder, template_name, per_series=count)
    except FileNotFoundError as exc:
        raise BenchError(str(exc)) from None
    total = sum(path.stat().st_size for path in paths)
    return DataSet(size_class, folder, count, total)


# -- receivers -------------------------------------------------------------------------------


def make_receiver(name: str, workdir: Path, node_max_pdu: int) -> Receiver:
    workdir.mkdir(parents=True)
    if name == "node":
        # The receiver alone: no rules (it routes nothing and needs no key), no worker
        # processes (their start-up would share the CPUs with the first C-STOREs).
        return NodeServer(workdir, NodeOptions(max_pdu_bytes=node_max_pdu))
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
    started, ended = storescu(receiver.ae_title, receiver.port, [data.folder], SEND_TIMEOUT_S,
                              receiver.name)
    return ended - started


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
    print_header(header)
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
        state = goal_state(c["met"])
        ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        print(f"  {c['size_class']:<6} node/{c['versus']:<9} >= {c['minimum']:.1f}x: "
              f"{ratio:>6}  {state}")


def result_doc(args: argparse.Namespace, datasets: dict[str, DataSet],
               runs: list[Run], results: dict[tuple[str, str], Result],
               node_ratios: dict[str, dict[str, float]], checks: list[dict[str, Any]]
               ) -> dict[str, Any]:
    """The JSON result document."""
    return {
        "benchmark": "ingest",
        "goal": GOAL_TEXT,
        "method": "dcmtk storescu, one association per run, loopback in a private netns, "
                  "TCP_NODELAY=1, fresh receiver per run, median of repetitions",
        "settings": {"repeat": args.repeat, "node_max_pdu_bytes": args.node_max_pdu,
                     "node_fsync": True, "receivers": args.receivers},
        "environment": dicom_environment(),
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
    add_out_option(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    args.receivers = subset(p, "--receivers", args.receivers, RECEIVERS)
    if args.repeat < 1 or args.small < 0 or args.large < 0 or args.small + args.large == 0:
        p.error("--repeat must be >= 1 and --small/--large >= 0, not both 0")
    args.out = args.out.resolve()
    return args


def check_tools() -> None:
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            raise BenchError(f"`{tool}` not found on PATH (Debian packages dcmtk, orthanc)")


def run_benchmark(args: argparse.Namespace, root: Path) -> None:
    check_tools()
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
    write_json(args.out, result_doc(args, datasets, runs, results, node_ratios, checks))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("bench/ingest.py", lambda root: run_benchmark(args, root),
                    tmp_prefix="synthnode-bench-")


if __name__ == "__main__":
    sys.exit(main())
