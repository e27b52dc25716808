"""Mirror benchmark: ``synthnode mirror backfill`` from a clinical to a research Orthanc, next to
Orthanc's own path (``/studies/{id}/anonymize`` plus a peer transfer) on the same studies.

What is measured
    Instances per second from a clinical Orthanc into a research Orthanc, de-identified, for
    S studies (``--studies``) x I instances (``--per-study``) that the clinical Orthanc holds
    before the clock starts. Rate = S*I / seconds.
    synthnode      ``synthnode mirror backfill --from clinical --since 1900-01-01 --quiet``
                   against a running ``synthnode serve`` with ``[jobs] cpu_workers`` W
                   (``--cpu-workers``, default 2): the command finds the studies (``POST
                   /tools/find``), routes each into a de-identify job (source ``backfill``),
                   then follows the jobs until all are done, while the workers fetch each
                   study from the clinical Orthanc (``GET /instances/{id}/file``), de-identify
                   it with the full profile and options, and upload it to the research Orthanc
                   (``POST /instances`` and the job's two user metadata). Timed: the command's
                   start to its exit (it must exit 0 and print "mirrored: S*I instances in S
                   jobs, 0 quarantined, 0 jobs failed"). Its job follower polls every 0.5 s, so
                   up to 0.5 s of the figure is the follower's wait: the seconds from the
                   command's start to the last job's "done" record are shown beside.
    orthanc-P      a script that does, for every study of the clinical Orthanc, ``POST
                   /studies/{id}/anonymize`` ``{"Asynchronous": false}`` (Orthanc's defaults
                   otherwise: its Basic Profile, private tags removed, new UIDs, a new random
                   patient per call) which makes a de-identified copy inside the clinical
                   Orthanc, then ``POST /peers/research/store`` ``{"Resources": [copy],
                   "Synchronous": true}`` (the research Orthanc is the clinical one's
                   ``OrthancPeers`` entry, with its HTTP credentials). P studies at a time
                   (``--orthanc-parallel``, default "1,2": one at a time as a plain script
                   would, and two at a time, as many as synthnode's workers); the script is
                   timed from its first request until the last transfer answered. The copies
                   are left in the clinical Orthanc (deleting them would cost Orthanc more).
    Both           after the clock stops the research Orthanc must hold S*I instances; a few
                   properties of what it holds are shown (distinct patients, studies with a
                   Study Date, original Patient IDs left), to show what each path does.

De-identification
    synthnode: ``[deid]`` defaults (the PS3.15 Basic Profile, outputs of the source's IOD) with
    the mirror task's ``options = ["retain_longitudinal_modified_dates", "clean_descriptors",
    "clean_structured_content"]`` (as bench/deid.py; ``--options`` to change): one pseudonym
    per patient across studies (a keyed hash), dates shifted per patient so intervals between
    studies are kept, descriptions cleaned, SR content cleaned, deterministic output UIDs, and
    each output marked with the job and task in the research Orthanc's user metadata.
    Orthanc 1.10: its Basic Profile (2021b); dates are emptied rather than shifted, descriptions
    removed rather than cleaned, and every anonymize call invents a new patient, so two studies
    of one patient arrive as two patients (no longitudinal research).

Setup (for every measurement, fresh; none of it timed)
    A research Orthanc and a clinical Orthanc (``node.localorthanc.OrthancProcess``: Debian's
    Orthanc 1.10, SQLite index, ``SyncStorageArea`` true, HTTP authentication, synthnode's
    user metadata declared; the clinical one has the research one as its ``OrthancPeers``
    entry ``research``) with empty temporary storage; the studies are uploaded into the
    clinical Orthanc over REST; for the synthnode path ``synthnode serve`` is started (its
    DICOM receiver idles; ``[spool] fsync`` true, ``[jobs] gpu_workers`` 0, SQLite queues, a
    fixed ``[deid] key``, ``[[destinations]]`` "clinical" and "research" with ``url``,
    ``username`` and ``password_env``) and the measurement starts once every worker process
    has said it started. Then ``sync``, and the script waits up to ``--settle`` seconds for the
    CPUs to be quiet.

Data
    Copies of pydicom's CT_small.dcm (~39 kB, CT, Explicit VR Little Endian), S studies of one
    series of I instances each, dealt to ``--patients`` patients in turn (study s to patient
    s mod P), each study one week after the one before (Study, Series, Acquisition and Content
    Date), each copy a new SOP Instance UID. The same files for every measurement.

Method
    As bench/pipeline.py: every process runs in a private network namespace (the script
    moves itself into one, ``node.netns``), every Orthanc and dcmtk process gets
    ``TCP_NODELAY=1``, the paths alternate ``--repeat`` times (default 3) in one invocation and
    medians are reported. CPU seconds are counted per process over the timed interval:
    synthnode's serve process, its workers, the backfill command, the clinical and the research
    Orthanc, this script, and "other" (the machine's busy time minus all those: someone else's
    work; a run where it exceeds 10 % of the CPUs is flagged). Everything shares this machine's
    CPUs.

Goal: synthnode's backfill >= 1.0x Orthanc's anonymize + peer transfer (instances/s from the
clinical to the research Orthanc; the better of Orthanc's one-at-a-time and parallel figures),
while applying the full profile with options.

Usage (as root): .venv/bin/python bench/mirror.py [--studies S] [--per-study I] [--patients P]
                 [--repeat R] [--cpu-workers W] [--orthanc-parallel 1,2] [--options A,B]
                 [--quick] [--node-rev REV] [--keep] [--out F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    CPUS,
    OUT_DIR,
    BenchError,
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
    print_goals,
    print_header,
    process_cpu_s,
    run_main,
    settle_or_warn,
    stop_orthanc,
    synthnode_exe,
    tail,
    tool_env,
    usage_s,
    use_node_rev,
    write_json,
)

from node.localorthanc import OrthancProcess
from node.samples import make_study

DEID_KEY = "synthnode-bench-mirror-key-0123456789abcdef"
PASSWORD_ENV = "SYNTHNODE_BENCH_MIRROR_PW"
PASSWORD = "bench-mirror-pw-1"
OPTIONS = ("retain_longitudinal_modified_dates", "clean_descriptors", "clean_structured_content")
FIRST_DAY = datetime.date(2023, 1, 2)
UPLOAD_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 300.0
BACKFILL_TIMEOUT_S = 600.0
ORTHANC_PATH_TIMEOUT_S = 600.0
GOAL_RATIO = 1.0
GOAL_TEXT = (f"goal: synthnode backfill >= {GOAL_RATIO:.1f}x Orthanc's anonymize + peer "
             "transfer (instances/s clinical -> research), full profile with options")
DEFAULT_OUT = OUT_DIR / "mirror.json"


# -- data ------------------------------------------------------------------------------------


def make_studies(folder: Path, studies: int, per_study: int, patients: int) -> list[list[Path]]:
    """``studies`` studies of ``per_study`` CT_small copies, dealt to ``patients`` patients,
    one week apart; the files, study by study."""
    out = []
    for s in range(studies):
        p = s % patients
        day = (FIRST_DAY + datetime.timedelta(days=7 * s)).strftime("%Y%m%d")
        attributes = {"AccessionNumber": f"ACC{s:06d}",
                      "StudyDescription": f"CT chest Mirror^Patient{p:03d}",
                      **dict.fromkeys(("StudyDate", "SeriesDate", "AcquisitionDate",
                                       "ContentDate"), day)}
        out.append(make_study(folder / f"{s:03d}", per_series=per_study,
                              patient_name=f"Mirror^Patient{p:03d}",
                              patient_id=f"MRN-BENCH-{p:04d}", attributes=attributes))
    return out


# -- the two Orthancs ------------------------------------------------------------------------


@dataclass
class Archives:
    clinical: OrthancProcess
    research: OrthancProcess


def start_archives(workdir: Path, files: list[Path]) -> Archives:
    """A research Orthanc, and a clinical one (research as its peer) holding ``files``."""
    research = OrthancProcess(workdir / "research", aet="RESEARCH", password=PASSWORD,
                              overrides={"Name": "bench-research"})
    launch_orthanc(research)
    clinical = OrthancProcess(workdir / "clinical", aet="CLINICAL", password=PASSWORD,
                              overrides={"Name": "bench-clinical"})
    clinical.config["OrthancPeers"] = {"research": {
        "Url": research.url + "/", "Username": research.username, "Password": PASSWORD}}
    launch_orthanc(clinical)
    archives = Archives(clinical, research)
    try:
        with ThreadPoolExecutor(4) as pool:  # not timed
            list(pool.map(lambda p: clinical.request("POST", "/instances", p.read_bytes(),
                                                     UPLOAD_TIMEOUT_S), files))
        held = clinical.count_instances()
    except (OSError, urllib.error.URLError) as exc:
        raise BenchError(f"uploading to the clinical Orthanc: {exc}\n"
                         f"{tail(clinical.log_path)}") from None
    if held != len(files):
        raise BenchError(f"the clinical Orthanc holds {held} of {len(files)} uploaded instances")
    return archives


def stop_archives(archives: Archives) -> None:
    stop_orthanc(archives.clinical)
    stop_orthanc(archives.research)


def research_summary(research: OrthancProcess, originals: set[str]) -> dict[str, Any]:
    """What the research Orthanc holds (not timed): instances, studies, distinct patients,
    studies with a Study Date, studies with a description, original Patient IDs."""
    studies = research.get_json("/studies?expand")
    ids = {str(s["PatientMainDicomTags"].get("PatientID", "")) for s in studies}
    return {
        "instances": research.count_instances(),
        "studies": len(studies),
        "patients": len(ids),
        "dated_studies": sum(1 for s in studies if s["MainDicomTags"].get("StudyDate")),
        "described_studies": sum(1 for s in studies
                                 if s["MainDicomTags"].get("StudyDescription")),
        "original_patient_ids": len(ids & originals),
    }


# -- CPU accounting ---------------------------------------------------------------------------


class CpuMeter(PartsMeter):
    """CPU seconds over a measurement, per part: synthnode's serve process, its workers, the
    backfill command (a child of this script, counted once waited for), the clinical and the
    research Orthanc, this script, and "other" (the machine's busy time minus all of those)."""

    PARTS = ("serve", "workers", "backfill", "clinical", "research", "bench", "other")

    def __init__(self, archives: Archives, node: NodeServer | None) -> None:
        node_pid = node.proc.pid if node is not None and node.proc is not None else None
        workers = children_of(node_pid) if node_pid else []
        clinical = archives.clinical.proc.pid if archives.clinical.proc else None
        research = archives.research.proc.pid if archives.research.proc else None

        super().__init__({
            "serve": lambda: process_cpu_s(node_pid),
            "workers": lambda: sum(process_cpu_s(pid) for pid in workers),
            # RUSAGE_CHILDREN: only the waited-for backfill
            "backfill": lambda: usage_s(resource.RUSAGE_CHILDREN),
            "clinical": lambda: process_cpu_s(clinical),
            "research": lambda: process_cpu_s(research),
            "bench": lambda: usage_s(resource.RUSAGE_SELF),
        })


# -- measurements ----------------------------------------------------------------------------


@dataclass
class Run:
    path: str  # "synthnode" or "orthanc-P"
    repetition: int
    instances: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    research: dict[str, Any] = field(default_factory=dict)
    jobs_done_s: float | None = None
    """synthnode: backfill start -> the last job's done record (wall clock)."""
    routed_s: float | None = None
    """synthnode: backfill start -> the last job's record created (routing finished)."""
    busy_before: float = 0.0

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def other_share(self) -> float:
        return self.cpu_s.get("other", 0.0) / (self.seconds * CPUS)


def mirror_node(workdir: Path, options: NodeOptions, archives: Archives,
                deid_options: list[str]) -> NodeServer:
    """``synthnode serve`` whose one rule mirrors studies from backfill into research."""
    tables = []
    for name, orthanc in (("research", archives.research), ("clinical", archives.clinical)):
        tables += ["[[destinations]]", f'name = "{name}"', f'url = "{orthanc.url}"',
                   f'username = "{orthanc.username}"', f'password_env = "{PASSWORD_ENV}"']
    tables += ["[[rules]]", 'name = "mirror"', 'destinations = ["research"]',
               "[rules.match]", 'source = ["backfill"]',
               "[[rules.tasks]]", 'task = "deidentify"', f"options = {json.dumps(deid_options)}"]
    node = NodeServer(workdir, options, tables)
    workdir.mkdir(parents=True)
    return node


def quiet(settle_s: float) -> float:
    os.sync()
    return settle_or_warn(settle_s)


def measure_synthnode(files: list[Path], studies: int, repetition: int, workdir: Path,
                      options: NodeOptions, deid_options: list[str], settle_s: float,
                      originals: set[str]) -> Run:
    n = len(files)
    archives = start_archives(workdir, files)
    node = mirror_node(workdir / "node", options, archives, deid_options)
    os.environ[PASSWORD_ENV] = PASSWORD  # the node and its workers inherit it
    try:
        node.start()
        meter = CpuMeter(archives, node)
        busy = quiet(settle_s)
        cmd = [synthnode_exe(), "--config", str(node.config),
               "mirror", "backfill", "--from", "clinical", "--since", "1900-01-01", "--quiet"]
        meter.start()
        wall0 = time.time()
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True,
                                  timeout=BACKFILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"synthnode mirror backfill: not done after "
                             f"{BACKFILL_TIMEOUT_S:.0f} s\n{tail(node.log_path)}") from None
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        expected = (f"mirrored: {n} instances in {studies} jobs, 0 quarantined, "
                    "0 jobs failed")
        if done.returncode != 0 or expected not in done.stdout:
            raise BenchError(f"synthnode mirror backfill exited {done.returncode}, expected "
                             f'"{expected}":\n{done.stdout[-2000:]}{done.stderr[-2000:]}\n'
                             f"{tail(node.log_path)}")
        research = research_summary(archives.research, originals)
        jobs = node.jobs()
    finally:
        status = node.stop()
        stop_archives(archives)
    if research["instances"] != n:
        raise BenchError(f"the research Orthanc holds {research['instances']} of {n} "
                         "instances after backfill said all were mirrored")
    if status != 0:
        raise BenchError(f"synthnode serve exited {status} on SIGTERM\n{tail(node.log_path)}")
    return Run("synthnode", repetition, n, seconds, cpu, research,
               jobs_done_s=max(j.updated_at for j in jobs) - wall0,
               routed_s=max(j.created_at for j in jobs) - wall0, busy_before=busy)


def measure_orthanc(files: list[Path], parallel: int, repetition: int, workdir: Path,
                    settle_s: float, originals: set[str]) -> Run:
    n = len(files)
    archives = start_archives(workdir, files)
    clinical = archives.clinical
    try:
        study_ids = [str(s) for s in clinical.get_json("/studies")]
        meter = CpuMeter(archives, None)
        busy = quiet(settle_s)
        anonymize = json.dumps({"Asynchronous": False}).encode()
        deadline = time.monotonic() + ORTHANC_PATH_TIMEOUT_S

        def mirror_one(study: str) -> int:
            timeout = max(1.0, min(REQUEST_TIMEOUT_S, deadline - time.monotonic()))
            copy = json.loads(clinical.request("POST", f"/studies/{study}/anonymize",
                                               anonymize, timeout))["ID"]
            body = json.dumps({"Resources": [copy], "Synchronous": True}).encode()
            timeout = max(1.0, min(REQUEST_TIMEOUT_S, deadline - time.monotonic()))
            answer = json.loads(clinical.request("POST", "/peers/research/store", body,
                                                 timeout))
            if answer.get("FailedInstancesCount", 0):
                raise BenchError(f"peer store of {copy}: {answer}")
            return int(answer.get("InstancesCount", 0))

        meter.start()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(parallel) as pool:
                sent = sum(pool.map(mirror_one, study_ids))
        except urllib.error.HTTPError as exc:
            raise BenchError(f"orthanc: HTTP {exc.code} on {exc.url}: "
                             f"{exc.read()[:500]!r}\n{tail(clinical.log_path)}") from None
        except (OSError, urllib.error.URLError) as exc:
            raise BenchError(f"orthanc: {exc}\n{tail(clinical.log_path)}") from None
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        research = research_summary(archives.research, originals)
    finally:
        stop_archives(archives)
    if research["instances"] != n or sent not in (0, n):
        raise BenchError(f"the research Orthanc holds {research['instances']} of {n} instances "
                         f"(peer store said {sent}) after the last transfer")
    return Run(f"orthanc-{parallel}", repetition, n, seconds, cpu, research, busy_before=busy)


# -- summary and report ----------------------------------------------------------------------


def summarize(runs: list[Run], paths: list[str]) -> dict[str, Any]:
    n = runs[0].instances
    by_path: dict[str, Any] = {}
    for path in paths:
        mine = [r for r in runs if r.path == path]
        seconds = statistics.median(r.seconds for r in mine)
        entry: dict[str, Any] = {
            "median_s": seconds,
            "per_s": n / seconds,
            "runs_s": [r.seconds for r in mine],
            "cpu_ms_per_instance": {
                part: 1000 * statistics.median(r.cpu_s[part] for r in mine) / n
                for part in CpuMeter.PARTS},
            "other_load": statistics.median(r.other_share for r in mine),
            "research": mine[-1].research,
        }
        own = sum(v for k, v in entry["cpu_ms_per_instance"].items() if k != "other")
        entry["cpu_ms_per_instance_total"] = own
        entry["cpu_ceiling_per_s"] = CPUS * 1000 / own if own else None
        entry["cpu_utilization"] = own * n / 1000 / (seconds * CPUS)
        if path == "synthnode":
            entry["jobs_done_median_s"] = statistics.median(r.jobs_done_s or 0.0 for r in mine)
            entry["routed_median_s"] = statistics.median(r.routed_s or 0.0 for r in mine)
            entry["jobs_done_per_s"] = n / entry["jobs_done_median_s"]
        by_path[path] = entry
    orthanc_paths = [p for p in paths if p.startswith("orthanc")]
    best = max(orthanc_paths, key=lambda p: by_path[p]["per_s"]) if orthanc_paths else None
    summary: dict[str, Any] = {"instances": n, "paths": by_path, "orthanc_best": best}
    if "synthnode" in by_path and best is not None:
        ratio = by_path["synthnode"]["per_s"] / by_path[best]["per_s"]
        summary["ratios"] = {p: by_path["synthnode"]["per_s"] / by_path[p]["per_s"]
                             for p in orthanc_paths}
        summary["ratio"] = ratio
        summary["goals"] = [{"what": f"synthnode/{best} >= {GOAL_RATIO:.1f}x", "value": ratio,
                             "met": ratio >= GOAL_RATIO}]
    else:
        summary["ratio"] = None
        summary["goals"] = [{"what": f"synthnode/orthanc >= {GOAL_RATIO:.1f}x", "value": None,
                             "met": None}]
    return summary


def print_report(s: dict[str, Any]) -> None:
    n = s["instances"]
    print()
    header = f"{'path':<12} {'N':>5} {'median s':>9} {'inst/s':>8}  runs (s)"
    print_header(header)
    for path, e in s["paths"].items():
        runs = " ".join(f"{x:.3f}" for x in e["runs_s"])
        print(f"{path:<12} {n:>5} {e['median_s']:>9.3f} {e['per_s']:>8.1f}  {runs}")
    syn = s["paths"].get("synthnode")
    if syn:
        print(f"\nsynthnode: routing done at {syn['routed_median_s']:.2f} s, last job done at "
              f"{syn['jobs_done_median_s']:.2f} s ({syn['jobs_done_per_s']:.1f}/s), command "
              f"exit at {syn['median_s']:.2f} s (medians, from the command's start)")
    print()
    parts = CpuMeter.PARTS
    header = (f"{'CPU ms per instance':<20} " + " ".join(f"{p:>9}" for p in parts)
              + f" {'own total':>10}  ceiling on {CPUS} CPUs  CPUs busy")
    print_header(header)
    for path, e in s["paths"].items():
        ms = e["cpu_ms_per_instance"]
        print(f"{path:<20} " + " ".join(f"{ms[p]:>9.2f}" for p in parts)
              + f" {e['cpu_ms_per_instance_total']:>10.2f}  {e['cpu_ceiling_per_s']:>8.0f}/s"
              f"{'':13}{100 * e['cpu_utilization']:>3.0f} %")
    print("(other load while timed: " + ", ".join(
        f"{p} {100 * e['other_load']:.0f} %" for p, e in s["paths"].items()) + " of the CPUs)")
    print()
    header = (f"{'in research':<12} {'instances':>9} {'studies':>7} {'patients':>8} "
              f"{'dated':>6} {'described':>9} {'orig. IDs':>9}")
    print_header(header)
    for path, e in s["paths"].items():
        r = e["research"]
        print(f"{path:<12} {r['instances']:>9} {r['studies']:>7} {r['patients']:>8} "
              f"{r['dated_studies']:>6} {r['described_studies']:>9} "
              f"{r['original_patient_ids']:>9}")
    print()
    if s.get("ratios"):
        print("ratios " + "  ".join(f"synthnode/{p} = {v:.2f}x" for p, v in s["ratios"].items()))
    print_goals(GOAL_TEXT, s["goals"], 32, "x")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--detect-text", type=detect_text_arg, default=None, metavar="true|false",
                   help="the node's [deid] detect_text (default: the node's default, on)")
    p.add_argument("--studies", type=int, default=10, help="studies (10)")
    p.add_argument("--per-study", type=int, default=40, help="instances per study (40)")
    p.add_argument("--patients", type=int, default=3, help="patients the studies belong to (3)")
    p.add_argument("--repeat", type=int, default=3, help="runs per path (3)")
    p.add_argument("--cpu-workers", type=int, default=2, help="[jobs] cpu_workers (2)")
    p.add_argument("--orthanc-parallel", default="1,2",
                   help="Orthanc path variants: studies at a time, comma-separated (1,2)")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help=f"the mirror task's de-identification options ({','.join(OPTIONS)}; "
                        "'' = none)")
    p.add_argument("--paths", default="synthnode,orthanc",
                   help="what to measure: synthnode, orthanc or both (synthnode,orthanc)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 studies x 10, 1 repeat")
    add_run_options(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.studies, args.per_study, args.repeat = 4, 10, 1
    if min(args.studies, args.per_study, args.patients, args.repeat, args.cpu_workers) < 1:
        p.error("counts must be >= 1")
    try:
        args.parallel = sorted({int(x) for x in args.orthanc_parallel.split(",") if x.strip()})
    except ValueError:
        p.error("--orthanc-parallel: comma-separated integers")
    if not args.parallel or min(args.parallel) < 1:
        p.error("--orthanc-parallel: integers >= 1")
    args.deid_options = [o.strip() for o in args.options.split(",") if o.strip()]
    wanted = {x.strip() for x in args.paths.split(",") if x.strip()}
    if not wanted or wanted - {"synthnode", "orthanc"}:
        p.error("--paths: synthnode, orthanc or both")
    args.path_names = (["synthnode"] if "synthnode" in wanted else []) + (
        [f"orthanc-{n}" for n in args.parallel] if "orthanc" in wanted else [])
    args.out = args.out.resolve()
    args.node_commit = None
    return args


def check_tools() -> None:
    dcmtk("echoscu")  # the node's readiness check (a C-ECHO) runs dcmtk's
    if shutil.which("Orthanc") is None:
        raise BenchError("`Orthanc` not found on PATH (Debian package orthanc)")
    if not Path(sys.executable).with_name("synthnode").exists():
        raise BenchError(f"no synthnode script beside {sys.executable} (pip install -e .)")


def check_options(options: list[str]) -> None:
    """The options as the node will read them: a usage error now rather than a dead job."""
    from node.config import DeidOption
    from node.config import check_options as node_check

    try:
        node_check([DeidOption(o) for o in options])
    except ValueError as exc:
        raise BenchError(f"--options: {exc}") from None


def run_benchmark(args: argparse.Namespace, root: Path) -> None:
    check_tools()
    args.node_commit = use_node_rev(args.node_rev, root / "node-rev")
    check_options(args.deid_options)
    n = args.studies * args.per_study
    print(f"mirror benchmark: {args.studies} studies x {args.per_study} CT_small = {n} "
          f"instances of {args.patients} patients, {args.repeat} runs per path "
          f"({', '.join(args.path_names)}), {args.cpu_workers} cpu workers, options "
          f"{args.deid_options or 'none'}; {GOAL_TEXT}", flush=True)
    options = NodeOptions(args.cpu_workers, 3600.0, 1.0, deid_key=DEID_KEY,  # spool unused
                          detect_text=args.detect_text)
    studies = make_studies(root / "data", args.studies, args.per_study, args.patients)
    files = [f for study in studies for f in study]
    originals = {f"MRN-BENCH-{p:04d}" for p in range(args.patients)}
    runs: list[Run] = []
    for repetition in range(1, args.repeat + 1):
        for path in args.path_names:
            workdir = root / f"{path}-{repetition}"
            workdir.mkdir(parents=True)
            if path == "synthnode":
                run = measure_synthnode(files, args.studies, repetition, workdir, options,
                                        args.deid_options, args.settle, originals)
            else:
                run = measure_orthanc(files, int(path.split("-")[1]), repetition, workdir,
                                      args.settle, originals)
            runs.append(run)
            if not args.keep:  # else the logs stay for a look
                shutil.rmtree(workdir, ignore_errors=True)
            extra = load_note(run.other_share)
            if run.jobs_done_s is not None:
                extra = f" (last job done at {run.jobs_done_s:.3f} s)" + extra
            print(f"  run {repetition}/{args.repeat} {path:<10} {n:>5} in {run.seconds:7.3f} s "
                  f"({run.per_s:7.1f}/s){extra}", flush=True)
    summary = summarize(runs, args.path_names)
    print_report(summary)
    doc = {
        "benchmark": "mirror",
        "goal": GOAL_TEXT,
        "method": "fresh clinical and research Orthanc per run (upload not timed), private "
                  "netns, TCP_NODELAY=1; synthnode: `synthnode mirror backfill` start to exit "
                  "against `synthnode serve`; orthanc-P: POST /studies/{id}/anonymize then "
                  "POST /peers/research/store per study, P studies at a time; paths "
                  "interleaved, medians",
        "settings": {"studies": args.studies, "per_study": args.per_study,
                     "patients": args.patients, "repeat": args.repeat,
                     "cpu_workers": args.cpu_workers, "orthanc_parallel": args.parallel,
                     "options": args.deid_options, "quick": args.quick,
                     "node_rev": args.node_rev, "node_commit": args.node_commit,
                     "detect_text": args.detect_text},
        "environment": dicom_environment(),
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    write_json(args.out, doc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("bench/mirror.py", lambda root: run_benchmark(args, root),
                    tmp_prefix="synthnode-bench-mirror-", keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
