"""Pipeline benchmark: storescu -> node -> de-identify job -> Orthanc, next to plain ingest.

What is measured
    throughput  N instances (``--studies`` x ``--per-study``, one series each) sent by ONE dcmtk
                ``storescu`` run over one association, the studies one after another, to:
                plain     a node with ``rules = []`` (it receives and routes nothing): seconds
                          from storescu's start to its exit, as in bench/ingest.py;
                pipeline  a node with one de-identify-only rule whose outputs go to Orthanc over
                          REST: seconds from storescu's start until Orthanc's ``/statistics``
                          counts all N de-identified instances (polled every 50 ms).
                Rates are N / seconds. The pipeline's seconds include one stable-age wait
                (``[spool] stable_after_s``, default 0.5 s: the last study can only be handed on
                that long after its last instance); the rate without it, N / (seconds -
                stable_after_s), is shown beside. Also shown: storescu's own rate in the
                pipeline run (ingest while jobs run on the same CPUs), and per-job seconds
                from the job records (created -> done).
    latency     studies of ``--latency-instances`` (4) sent by one storescu run each, one after
                another, each once the one before is in Orthanc: latency = (time Orthanc
                counts the study's outputs, polled every 20 ms) - (storescu exit) -
                stable_after_s. The first study is a warm-up (each worker builds its
                de-identifier on its first job) and is shown apart; the median and maximum of
                the next ``--latency-studies`` (5) are reported. Each latency is split from the
                job record: "handoff" (storescu exit + stable wait -> job record created: the
                stability check and routing) and "job" (record created -> done: queue wait,
                de-identification, upload).

Node settings (both nodes alike but for the rule)
    ``[spool] fsync = true`` (as in production), ``stable_after_s`` 0.5, ``check_interval_s`` 0.1;
    ``[jobs] cpu_workers`` 2 (``--cpu-workers``), ``gpu_workers`` 0, SQLite queues; ``[deid] key``
    a fixed benchmark key, other [deid] and [output] settings default (outputs of the source's
    IOD are not run through dciodvfy); ``[orthanc]`` the private Orthanc below, with HTTP
    authentication and synthnode's user metadata (``node.localorthanc.OrthancProcess``:
    SQLite index, ``SyncStorageArea`` true). Measurements start once every worker process has
    said it started.

Data
    Copies of pydicom's CT_small.dcm (~39 kB, CT, Explicit VR Little Endian): each study its
    own patient, Study and Series UID, each copy a new SOP Instance UID. The same files for
    every repetition; every measurement gets a fresh node and Orthanc with empty temporary
    storage, so outputs (whose UIDs are deterministic) are new to Orthanc every time.

Method
    As bench/ingest.py: every process runs in a private network namespace (the script
    moves itself into one, ``node.netns``), every dcmtk and Orthanc process gets
    ``TCP_NODELAY=1``, ``sync`` runs before each measurement, plain and pipeline throughput
    alternate ``--repeat`` times (default 3) in one invocation and medians are reported. dcmtk's
    ``/usr/bin/storescu`` is called by path (the venv's pynetdicom ``storescu`` shadows it on a
    venv PATH), with the files in study order on its command line. Everything runs on this
    machine's CPUs: the sender, the node's receiver and workers, and Orthanc.

Goal: the de-identify path sustains >= 0.8x plain ingest (instances/s, stable wait included),
and latency is under one second per study of a few (4) instances (stable wait excluded).

Usage (as root): .venv/bin/python bench/pipeline.py [--studies S] [--per-study N] [--repeat R]
                 [--cpu-workers W] [--latency-studies K] [--quick] [--keep] [--out F]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    CPUS,
    OUT_DIR,
    BenchError,
    Job,
    NodeOptions,
    NodeServer,
    PartsMeter,
    add_run_options,
    children_of,
    dcmtk,
    detect_text_arg,
    dicom_environment,
    launch_orthanc,
    load_note,
    own_cpu_s,
    print_goals,
    print_header,
    process_cpu_s,
    run_main,
    settle_or_warn,
    stop_orthanc,
    storescu,
    tail,
    use_node_rev,
    write_json,
)

from node.localorthanc import OrthancProcess
from node.samples import make_study

DEID_KEY = "synthnode-bench-pipeline-key-0123456789abcdef"
RULE = ['[[rules]]', 'name = "deid-only"', '[[rules.tasks]]', 'task = "deidentify"']
SEND_TIMEOUT_S = 600.0
OUTPUTS_TIMEOUT_S = 300.0
THROUGHPUT_POLL_S = 0.05
LATENCY_POLL_S = 0.02
RATIO_GOAL = 0.8
LATENCY_GOAL_S = 1.0
GOAL_TEXT = (f"goal: pipeline >= {RATIO_GOAL}x plain ingest (instances/s), and latency "
             f"< {LATENCY_GOAL_S:g} s per study of a few instances (stable wait excluded)")
DEFAULT_OUT = OUT_DIR / "pipeline.json"


# -- helpers ---------------------------------------------------------------------------------


def send(files: list[Path], node: NodeServer) -> tuple[float, float]:
    """dcmtk storescu of ``files`` to ``node`` over one association, in order; (perf_counter
    at start, perf_counter at exit)."""
    return storescu(node.ae_title, node.port, files, SEND_TIMEOUT_S, node.name)


def make_studies(folder: Path, studies: int, per_study: int, tag: str) -> list[list[Path]]:
    """``studies`` studies of ``per_study`` CT_small copies each, each its own patient; the
    files, study by study."""
    return [make_study(folder / f"{tag}{s:03d}", per_series=per_study,
                       patient_name=f"Bench^{tag}{s:03d}", patient_id=f"BENCH-{tag}-{s:03d}")
            for s in range(studies)]


# -- the node and its Orthanc ----------------------------------------------------------------


def pipeline_node(workdir: Path, options: NodeOptions,
                  orthanc: OrthancProcess | None) -> NodeServer:
    """``synthnode serve`` with workers; with ``orthanc``, one de-identify rule to it."""
    tables = None if orthanc is None else [
        "[orthanc]", f'url = "{orthanc.url}"', f'username = "{orthanc.username}"',
        f'password = "{orthanc.password}"', *RULE]
    node = NodeServer(workdir, options, tables)
    workdir.mkdir(parents=True)
    return node


def start_orthanc(workdir: Path) -> OrthancProcess:
    orthanc = OrthancProcess(workdir / "orthanc", overrides={"Name": "synthnode-bench"})
    launch_orthanc(orthanc)
    return orthanc


def wait_outputs(orthanc: OrthancProcess, expected: int, poll_s: float,
                 node: NodeServer) -> float:
    """perf_counter when Orthanc first counts ``expected`` instances (polled every
    ``poll_s``); BenchError after ``OUTPUTS_TIMEOUT_S`` or if the node exits."""
    deadline = time.perf_counter() + OUTPUTS_TIMEOUT_S
    count = -1
    while time.perf_counter() < deadline:
        try:
            count = orthanc.count_instances()
        except OSError:
            count = -1
        if count >= expected:
            return time.perf_counter()
        if node.proc is not None and node.proc.poll() is not None:
            raise BenchError(f"node exited {node.proc.returncode}\n{tail(node.log_path)}")
        time.sleep(poll_s)
    states = ", ".join(f"{j.id}: {j.state} {j.last_error}" for j in node.jobs())
    raise BenchError(f"Orthanc holds {count} of {expected} outputs after "
                     f"{OUTPUTS_TIMEOUT_S:.0f} s; jobs: {states}\n{tail(node.log_path)}")


def check_jobs(jobs: list[Job], studies: int, instances: int, log_path: Path) -> None:
    done = [j for j in jobs if j.state == "done"]
    outputs = sum(j.outputs for j in done)
    if len(done) != studies or outputs != instances or any(j.quarantined for j in jobs):
        raise BenchError(f"expected {studies} done jobs with {instances} outputs, got "
                         f"{len(done)} of {len(jobs)} done with {outputs} outputs\n"
                         f"{tail(log_path)}")


# -- CPU accounting ---------------------------------------------------------------------------


class CpuMeter(PartsMeter):
    """CPU seconds spent during a measurement, per part: the node's receiver process, its
    worker processes, Orthanc, this script with the storescu it ran (and its polling), and
    "other" (the machine's busy time minus all of those: someone else's work)."""

    PARTS = ("node", "workers", "orthanc", "storescu+bench", "other")

    def __init__(self, node: NodeServer, orthanc: OrthancProcess | None) -> None:
        assert node.proc is not None
        node_pid = node.proc.pid
        workers = children_of(node_pid)
        orthanc_pid = None if orthanc is None or orthanc.proc is None else orthanc.proc.pid
        super().__init__({
            "node": lambda: process_cpu_s(node_pid),
            "workers": lambda: sum(process_cpu_s(pid) for pid in workers),
            "orthanc": lambda: 0.0 if orthanc_pid is None else process_cpu_s(orthanc_pid),
            "storescu+bench": own_cpu_s,
        })


# -- measurements ----------------------------------------------------------------------------


@dataclass
class ThroughputRun:
    path: str  # "plain" or "pipeline"
    repetition: int
    instances: int
    storescu_s: float
    total_s: float
    """plain: storescu's wall clock; pipeline: storescu start -> all outputs in Orthanc."""
    job_s: list[float] = field(default_factory=list)
    """pipeline: each job's record created -> done."""
    first_job_created_s: float | None = None
    last_job_done_s: float | None = None
    """pipeline: from storescu's start (wall clock)."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per part (:class:`CpuMeter`) over ``total_s``."""


def measure_plain(files: list[Path], repetition: int, workdir: Path,
                  options: NodeOptions) -> ThroughputRun:
    node = pipeline_node(workdir / "node", options, None)
    try:
        node.start()
        meter = CpuMeter(node, None)
        os.sync()
        meter.start()
        started, ended = send(files, node)
        cpu = meter.stop()
        received = node.count_received()
    finally:
        status = node.stop()
    if received != len(files):
        raise BenchError(f"plain node holds {received} of {len(files)} instances after "
                         f"storescu succeeded\n{tail(node.log_path)}")
    if status != 0:
        raise BenchError(f"synthnode serve exited {status} on SIGTERM\n{tail(node.log_path)}")
    return ThroughputRun("plain", repetition, len(files), ended - started, ended - started,
                         cpu_s=cpu)


def measure_pipeline(studies: list[list[Path]], repetition: int, workdir: Path,
                     options: NodeOptions) -> ThroughputRun:
    files = [f for study in studies for f in study]
    orthanc = start_orthanc(workdir)
    node = pipeline_node(workdir / "node", options, orthanc)
    try:
        node.start()
        meter = CpuMeter(node, orthanc)
        os.sync()
        meter.start()
        wall0 = time.time()
        started, ended = send(files, node)
        done = wait_outputs(orthanc, len(files), THROUGHPUT_POLL_S, node)
        cpu = meter.stop()
        time.sleep(0.3)  # the last record is written just after the last upload
        jobs = node.jobs()
    finally:
        node.stop()
        stop_orthanc(orthanc)
    check_jobs(jobs, len(studies), len(files), node.log_path)
    return ThroughputRun(
        "pipeline", repetition, len(files), ended - started, done - started,
        job_s=[j.updated_at - j.created_at for j in jobs],
        first_job_created_s=min(j.created_at for j in jobs) - wall0,
        last_job_done_s=max(j.updated_at for j in jobs) - wall0,
        cpu_s=cpu,
    )


@dataclass
class LatencyRun:
    study: int  # 0 = warm-up
    instances: int
    storescu_s: float
    latency_s: float
    """Orthanc holds the outputs - storescu exit - stable_after_s."""
    handoff_s: float
    """storescu exit + stable_after_s -> job record created."""
    job_s: float
    """Job record created -> done."""


def measure_latency(studies: list[list[Path]], workdir: Path,
                    options: NodeOptions) -> list[LatencyRun]:
    orthanc = start_orthanc(workdir)
    node = pipeline_node(workdir / "node", options, orthanc)
    runs = []
    expected = 0
    try:
        node.start()
        for n, files in enumerate(studies):
            os.sync()
            time.sleep(0.2)
            expected += len(files)
            started, ended = send(files, node)
            exit_wall = time.time()
            done = wait_outputs(orthanc, expected, LATENCY_POLL_S, node)
            time.sleep(0.2)
            jobs = node.jobs()
            check_jobs(jobs, n + 1, expected, node.log_path)
            job = jobs[-1]  # oldest first: this study's
            runs.append(LatencyRun(
                n, len(files), ended - started,
                done - ended - options.stable_after_s,
                job.created_at - exit_wall - options.stable_after_s,
                job.updated_at - job.created_at,
            ))
            print(f"  latency study {n}{' (warm-up)' if n == 0 else ''}: "
                  f"{runs[-1].latency_s:.3f} s (handoff {runs[-1].handoff_s:.3f} s, "
                  f"job {runs[-1].job_s:.3f} s)", flush=True)
    finally:
        node.stop()
        stop_orthanc(orthanc)
    return runs


# -- summary and report ----------------------------------------------------------------------


def median_of(runs: list[ThroughputRun], path: str, value: Callable[[ThroughputRun], float]
              ) -> float:
    return statistics.median(value(r) for r in runs if r.path == path)


def summarize(runs: list[ThroughputRun], latency: list[LatencyRun],
              stable_s: float) -> dict[str, Any]:
    n = runs[0].instances
    plain_s = median_of(runs, "plain", lambda r: r.total_s)
    pipe_s = median_of(runs, "pipeline", lambda r: r.total_s)
    pipe_scu_s = median_of(runs, "pipeline", lambda r: r.storescu_s)
    measured = [r.latency_s for r in latency if r.study > 0]
    summary: dict[str, Any] = {
        "instances": n,
        "stable_after_s": stable_s,
        "plain_s": plain_s,
        "plain_per_s": n / plain_s,
        "pipeline_s": pipe_s,
        "pipeline_per_s": n / pipe_s,
        "pipeline_excl_stable_per_s": n / (pipe_s - stable_s),
        "pipeline_storescu_per_s": n / pipe_scu_s,
        "pipeline_job_s_median": statistics.median(
            s for r in runs if r.path == "pipeline" for s in r.job_s),
        "ratio": (n / pipe_s) / (n / plain_s),
        "ratio_excl_stable": (n / (pipe_s - stable_s)) / (n / plain_s),
        "latency_median_s": statistics.median(measured) if measured else None,
        "latency_max_s": max(measured) if measured else None,
        "latency_warmup_s": next((r.latency_s for r in latency if r.study == 0), None),
        "latency_handoff_median_s": statistics.median(
            r.handoff_s for r in latency if r.study > 0) if measured else None,
        "latency_job_median_s": statistics.median(
            r.job_s for r in latency if r.study > 0) if measured else None,
    }
    own = [part for part in CpuMeter.PARTS if part != "other"]
    summary["cpu_ms_per_instance"] = {
        path: {part: 1000 * statistics.median(r.cpu_s[part] for r in runs if r.path == path) / n
               for part in CpuMeter.PARTS}
        for path in ("plain", "pipeline")
    }
    summary["cpu_ceiling_per_s"] = {  # what the CPUs allow if nothing else ran and none idled
        path: CPUS * 1000 / sum(ms[part] for part in own)
        for path, ms in summary["cpu_ms_per_instance"].items()
    }
    summary["other_load"] = {
        path: median_of(runs, path, lambda r: r.cpu_s["other"] / (r.total_s * CPUS))
        for path in ("plain", "pipeline")
    }
    summary["goals"] = [
        {"what": f"pipeline/plain >= {RATIO_GOAL}x", "value": summary["ratio"],
         "met": summary["ratio"] >= RATIO_GOAL},
        {"what": f"latency max < {LATENCY_GOAL_S:g} s", "value": summary["latency_max_s"],
         "met": None if not measured else summary["latency_max_s"] < LATENCY_GOAL_S},
    ]
    return summary


def print_report(runs: list[ThroughputRun], latency: list[LatencyRun],
                 s: dict[str, Any]) -> None:
    def runs_of(path: str, value: Callable[[ThroughputRun], float]) -> str:
        return " ".join(f"{value(r):.3f}" for r in runs if r.path == path)

    n = s["instances"]
    print()
    header = f"{'throughput':<34} {'N':>5} {'median s':>9} {'inst/s':>8}  runs (s)"
    print_header(header)
    rows = [
        ("plain ingest (storescu)", s["plain_s"], runs_of("plain", lambda r: r.total_s)),
        ("pipeline (storescu -> Orthanc)", s["pipeline_s"],
         runs_of("pipeline", lambda r: r.total_s)),
        (f"pipeline - stable wait {s['stable_after_s']:g} s",
         s["pipeline_s"] - s["stable_after_s"], ""),
        ("pipeline run, storescu alone", n / s["pipeline_storescu_per_s"],
         runs_of("pipeline", lambda r: r.storescu_s)),
    ]
    for name, seconds, text in rows:
        print(f"{name:<34} {n:>5} {seconds:>9.3f} {n / seconds:>8.1f}  {text}")
    last = [r for r in runs if r.path == "pipeline"]
    print(f"\npipeline jobs: median {s['pipeline_job_s_median']:.3f} s created -> done; first "
          f"created at {statistics.median(r.first_job_created_s or 0 for r in last):.2f} s, "
          f"last done at {statistics.median(r.last_job_done_s or 0 for r in last):.2f} s "
          "after storescu started (medians)")
    print(f"ratio pipeline/plain = {s['ratio']:.2f}x  "
          f"(without the stable wait: {s['ratio_excl_stable']:.2f}x)")
    print()
    parts = CpuMeter.PARTS
    header = (f"{'CPU ms per instance':<20} " + " ".join(f"{p:>14}" for p in parts)
              + f" {'own total':>10}  ceiling on {CPUS} CPUs")
    print_header(header)
    for path, ms in s["cpu_ms_per_instance"].items():
        own = sum(v for k, v in ms.items() if k != "other")
        print(f"{path:<20} " + " ".join(f"{ms[p]:>14.2f}" for p in parts)
              + f" {own:>10.2f}  {s['cpu_ceiling_per_s'][path]:.0f}/s")
    print(f"(other load while timed: plain {100 * s['other_load']['plain']:.0f} %, pipeline "
          f"{100 * s['other_load']['pipeline']:.0f} % of the CPUs)")
    if latency:
        measured = [r for r in latency if r.study > 0]
        print(f"\nlatency, studies of {latency[0].instances} (storescu exit -> outputs in "
              f"Orthanc, minus stable wait {s['stable_after_s']:g} s):")
        if measured:
            print(f"  median {s['latency_median_s']:.3f} s, max {s['latency_max_s']:.3f} s "
                  f"over {len(measured)} studies: "
                  + " ".join(f"{r.latency_s:.3f}" for r in measured))
            print(f"  of which handoff (stable check, routing) median "
                  f"{s['latency_handoff_median_s']:.3f} s, job (queue, de-identify, upload) "
                  f"median {s['latency_job_median_s']:.3f} s")
        print(f"  warm-up study: {s['latency_warmup_s']:.3f} s")
    print()
    print_goals(GOAL_TEXT, s["goals"], 26)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--detect-text", type=detect_text_arg, default=None, metavar="true|false",
                   help="the node's [deid] detect_text (default: the node's default, on)")
    p.add_argument("--studies", type=int, default=8, help="studies in the throughput run (8)")
    p.add_argument("--per-study", type=int, default=50, help="instances per study (50)")
    p.add_argument("--repeat", type=int, default=3, help="throughput runs per path (3)")
    p.add_argument("--cpu-workers", type=int, default=2, help="[jobs] cpu_workers (2)")
    p.add_argument("--stable-after", type=float, default=0.5,
                   help="[spool] stable_after_s (0.5)")
    p.add_argument("--check-interval", type=float, default=0.1,
                   help="[spool] check_interval_s (0.1)")
    p.add_argument("--latency-studies", type=int, default=5,
                   help="measured latency studies, after one warm-up (5; 0 = none)")
    p.add_argument("--latency-instances", type=int, default=4,
                   help="instances per latency study (4)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 studies x 20, 1 repeat, 2 latency studies")
    add_run_options(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.studies, args.per_study, args.repeat, args.latency_studies = 2, 20, 1, 2
    if min(args.studies, args.per_study, args.repeat, args.cpu_workers,
           args.latency_instances) < 1 or args.latency_studies < 0:
        p.error("counts must be >= 1 (--latency-studies >= 0)")
    if args.stable_after <= 0 or args.check_interval <= 0:
        p.error("--stable-after and --check-interval must be > 0")
    args.out = args.out.resolve()
    args.node_commit = None
    return args


def check_tools() -> None:
    for tool in ("storescu", "echoscu"):
        dcmtk(tool)
    if shutil.which("Orthanc") is None:
        raise BenchError("`Orthanc` not found on PATH (Debian package orthanc)")


def run_benchmark(args: argparse.Namespace, root: Path) -> None:
    check_tools()
    options = NodeOptions(args.cpu_workers, args.stable_after, args.check_interval,
                          deid_key=DEID_KEY, detect_text=args.detect_text)
    n = args.studies * args.per_study
    print(f"pipeline benchmark: {args.studies} studies x {args.per_study} CT_small = {n} "
          f"instances, {args.repeat} runs per path, {args.cpu_workers} cpu workers, stable "
          f"after {args.stable_after:g} s; {GOAL_TEXT}")
    args.node_commit = use_node_rev(args.node_rev, root / "node-rev")
    print(f"making data in {root} ...", flush=True)
    studies = make_studies(root / "data" / "throughput", args.studies, args.per_study, "T")
    files = [f for study in studies for f in study]
    runs: list[ThroughputRun] = []
    for repetition in range(1, args.repeat + 1):
        for path in ("plain", "pipeline"):
            settle_or_warn(args.settle)
            workdir = root / f"{path}-{repetition}"
            run = (measure_plain(files, repetition, workdir, options) if path == "plain"
                   else measure_pipeline(studies, repetition, workdir, options))
            runs.append(run)
            if not args.keep:  # else the logs stay for a look
                shutil.rmtree(workdir, ignore_errors=True)
            extra = (f" (storescu {run.storescu_s:.3f} s)" if path == "pipeline" else "")
            extra += load_note(run.cpu_s["other"] / (run.total_s * CPUS))
            print(f"  run {repetition}/{args.repeat} {path:<8} {n:>5} in {run.total_s:7.3f} s "
                  f"({n / run.total_s:7.1f}/s){extra}", flush=True)
    latency: list[LatencyRun] = []
    if args.latency_studies:
        lat_studies = make_studies(root / "data" / "latency", args.latency_studies + 1,
                                   args.latency_instances, "L")
        latency = measure_latency(lat_studies, root / "latency", options)
        if not args.keep:
            shutil.rmtree(root / "latency", ignore_errors=True)
    summary = summarize(runs, latency, args.stable_after)
    print_report(runs, latency, summary)
    doc = {
        "benchmark": "pipeline",
        "goal": GOAL_TEXT,
        "method": "dcmtk storescu, one association per run, loopback in a private netns, "
                  "TCP_NODELAY=1, fresh node (and Orthanc) per throughput run, plain and "
                  "pipeline interleaved, medians; latency polled on Orthanc /statistics",
        "settings": {"studies": args.studies, "per_study": args.per_study,
                     "repeat": args.repeat, "cpu_workers": args.cpu_workers,
                     "stable_after_s": args.stable_after,
                     "check_interval_s": args.check_interval, "node_fsync": True,
                     "latency_studies": args.latency_studies,
                     "latency_instances": args.latency_instances, "quick": args.quick,
                     "node_rev": args.node_rev, "node_commit": args.node_commit,
                     "detect_text": args.detect_text},
        "environment": dicom_environment(),
        "summary": summary,
        "throughput_runs": [asdict(r) for r in runs],
        "latency_runs": [asdict(r) for r in latency],
    }
    write_json(args.out, doc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("bench/pipeline.py", lambda root: run_benchmark(args, root),
                    tmp_prefix="synthnode-bench-pipeline-", keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
