"""De-identification benchmark: instances/s of synthnode next to pydicom/deid, dicognito, Orthanc.

What is measured
    One corpus, one machine, one run per tool, the tools one after another (never two at once).
    Each tool de-identifies every instance of the corpus and writes the results; the rate is
    instances written / seconds.

    synthnode      ``synthnode --config F deidentify CORPUS --out OUT --workers 2`` (the key from
                   ``SYNTHNODE__DEID__KEY``): the wall clock of the process, start to exit.
                   Reported "n/a" while the command does not exist.
    synthnode-api  the engine through its Python API in a 2-process ``multiprocessing.Pool``
                   (``Deidentifier.deidentify`` + ``save_as``), run as a child process of this
                   script: the wall clock of that process (interpreter start, imports, pool).
    deid           pydicom/deid, its default recipe: ``replace_identifiers(files, save=True,
                   output_folder=OUT)`` in one process (the library's documented use; the
                   ``deid identifiers --action all`` command reads every file once more first).
    dicognito      ``python -m dicognito --quiet --output-directory OUT CORPUS``, one process.
    orthanc        Orthanc 1.10: the corpus is uploaded first (not timed), then only the
                   ``POST /studies/{id}/anonymize`` calls (synchronous, body ``{}``: Force is
                   needed only to Replace/Keep identifiers) are timed, one after another.

    synthnode runs with the full PS3.15 Annex E Basic Profile plus the options
    retain_longitudinal_modified_dates, clean_descriptors and clean_structured_content; the
    others with their defaults. Only synthnode gets 2 worker processes; the others run as they
    come (deid and dicognito in one process, Orthanc one request at a time).

Corpus
    Copies of pydicom's CT_small.dcm (CT 128x128, ~39 kB, with GE private tags) and MR_small.dcm
    (MR 64x64, ~10 kB), Explicit VR Little Endian, ``--count`` instances (default 2000) in
    studies of ``--study-size`` (default 50: a CT and an MR series) spread over ``--patients``
    (default 5) patients, so a patient has several studies and consistent pseudonyms matter.
    Every copy has new UIDs. Planted identifying values, one token per patient or study, each
    beginning with a per-kind prefix (``PHI-SD-`` for Study Description...): Patient Name and
    ID, Accession Number, Study Description, Institution Name, Operators' Name and a private
    attribute (creator "BENCH PHI 1.0", (0011,1010) LO).

Side results (not timed)
    survived: per tool and kind, how many output files still hold a planted value (a byte scan
    of the output files for the kind's prefix; for Orthanc, of the anonymized instances
    downloaded after timing). patients: how many distinct Patient IDs the outputs carry (the
    corpus has ``--patients``; more means one patient got several pseudonyms).

Method
    As bench/ingest.py: the script moves itself into a private network namespace (only ``lo``
    up, ``node.netns``) so Orthanc listens on nothing real; ``sync`` before each tool;
    every wait is bounded; temporary folders are removed at the end. deid and dicognito come
    from their own environment ``bench/.venv-deid`` (see bench/README.md), never the node's.
    Orthanc runs with ``SyncStorageArea`` false, like the other tools, which never fsync.
    The CPUs may be shared with other work (test runs): before each tool the script waits
    (``--settle``, at most 120 s) for the machine to be under 15 % busy, and it reports, per
    tool, the share of CPU time other processes used while the tool was timed ("other%"),
    with a warning above 10 %.

Goal: synthnode >= 1.0x Orthanc and >= 1.5x dicognito (full profile with options, writing files,
2 workers).

Text in pixels
    ``--detect-text true|false`` sets synthnode's ``[deid] detect_text`` (detection and removal
    of burned-in text) in the generated config and in the API run's settings, so the rate can be
    read with it on and off; a node without that key runs with its defaults, and the report says
    so. Without the option, the node's default. (This corpus has no text in its pixels: the
    figure is the cost of looking; bench/pixels.py measures what is found.)

Usage (as root): .venv/bin/python bench/deid.py [--count N] [--tools a,b] [--out F]
                 [--detect-text true|false]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    FOREIGN_WARN,
    KEY_ENV,
    LIVE_PROCESSES,
    OUT_DIR,
    REPO,
    SETTLE_BUSY,
    BenchError,
    ForeignLoad,
    NotAvailable,
    add_out_option,
    environment,
    fmt,
    goal_state,
    launch_orthanc,
    load_template,
    node_snapshot,
    print_header,
    probe,
    run_main,
    settle,
    stop_orthanc,
    subset,
    synthnode_exe,
    terminate,
    write_json,
)
from harness import tail as _tail

from node.localorthanc import OrthancProcess
from node.samples import save_copies

DETECT_TEXT_ENV = "SYNTHNODE_BENCH_DETECT_TEXT"
"""The API run's ``[deid] detect_text`` ("true"/"false"), from ``--detect-text``; unset: the
node's default."""
BENCH_VENV = Path(__file__).resolve().parent / ".venv-deid"
BENCH_REQUIREMENTS = Path(__file__).resolve().parent / "requirements-deid.txt"
DEFAULT_OUT = OUT_DIR / "deid.json"

TOOL_TIMEOUT_S = 1800.0
REQUEST_TIMEOUT_S = 600.0
UPLOAD_TIMEOUT_S = 30.0

TOOLS = ("synthnode", "synthnode-api", "deid", "dicognito", "orthanc")
OTHERS = ("deid", "dicognito", "orthanc")
OPTIONS = ["retain_longitudinal_modified_dates", "clean_descriptors", "clean_structured_content"]
WORKERS = 2
GOALS = (("orthanc", 1.0), ("dicognito", 1.5))  # (other tool, minimum synthnode/other ratio)
GOAL_TEXT = ("goal: synthnode >= 1.0x Orthanc and >= 1.5x dicognito "
             "(full profile with options, writing files, 2 workers)")

TEMPLATES = ("CT_small.dcm", "MR_small.dcm")  # one series of each per study, in turn
PRIVATE_CREATOR = "BENCH PHI 1.0"
PRIVATE_GROUP = 0x0011
PLANTED = {  # kind -> token prefix; every token is prefix + 8 hex digits (<= 16 chars: fits SH),
    # but the study description's, 8 decimal digits (see token)
    "PatientName": "PHI-PN-",
    "PatientID": "PHI-ID-",
    "AccessionNumber": "PHI-AN-",
    "StudyDescription": "PHI-SD-",
    "InstitutionName": "PHI-IN-",
    "OperatorsName": "PHI-OP-",
    "private": "PHI-PV-",
}

DEID_RUNNER = """\
import sys
from deid.dicom import get_files, replace_identifiers
files = sorted(get_files(sys.argv[1]))
done = replace_identifiers(dicom_files=files, save=True, output_folder=sys.argv[2])
print(f"deid: {len(done)} files")
"""

# -- children --------------------------------------------------------------------------------


@dataclass
class Done:
    seconds: float
    returncode: int
    output: str
    foreign_share: float = 0.0


def run_timed(cmd: list[str], env: dict[str, str], log_path: Path,
              timeout_s: float = TOOL_TIMEOUT_S) -> Done:
    """Run ``cmd`` in its own process group (its worker processes are stopped with it),
    stdout and stderr to ``log_path``; the wall clock from start to exit."""
    with log_path.open("wb") as log, ForeignLoad() as load:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=log_path.parent,
                                start_new_session=True)
        LIVE_PROCESSES.add(proc)
        try:
            returncode = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            terminate(proc, group=True)
            raise BenchError(f"{cmd[0]}: not done after {timeout_s:.0f} s\n"
                             f"{tail(log_path)}") from None
        seconds = time.perf_counter() - started
    LIVE_PROCESSES.discard(proc)
    return Done(seconds, returncode, tail(log_path), load.share)


def tail(path: Path, lines: int = 15) -> str:
    """The last 15 lines of a log (common.tail, whose default is 20)."""
    return _tail(path, lines)


# -- corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    folder: Path
    instances: int
    studies: int
    patients: int
    total_bytes: int


def token(kind: str) -> str:
    if kind == "StudyDescription":
        # an order number inside the description: what Clean Descriptors removes while it
        # keeps the wording ("CT CHEST"); a random word would rightly be kept
        return f"{secrets.randbelow(10**8):08d}"
    return f"{PLANTED[kind]}{secrets.token_hex(4)}"


def make_corpus(root: Path, count: int, study_size: int, patients: int) -> Corpus:
    """``count`` instances, ``study_size`` to a study (two series, CT then MR), studies dealt
    to ``patients`` patients in turn; planted tokens per patient and per study."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    templates = []
    for name in TEMPLATES:
        ds = load_template(name)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        templates.append(ds)
    people = [{kind: token(kind) for kind in ("PatientName", "PatientID", "InstitutionName")}
              for _ in range(patients)]
    folder = root / "corpus"
    total = 0
    n = 0
    study = 0
    while n < count:
        size = min(study_size, count - n)
        person = people[study % patients]
        study_uid = generate_uid()
        per_study = {kind: token(kind) for kind in
                     ("AccessionNumber", "StudyDescription", "OperatorsName", "private")}
        study_dir = folder / f"study{study:04d}"
        study_dir.mkdir(parents=True)
        series_sizes = [size - size // 2, size // 2]
        for series, (ds, series_size) in enumerate(zip(templates, series_sizes, strict=True)):
            ds.PatientName = person["PatientName"]
            ds.PatientID = person["PatientID"]
            ds.InstitutionName = person["InstitutionName"]
            ds.StudyInstanceUID = study_uid
            ds.StudyID = str(study + 1)
            ds.AccessionNumber = per_study["AccessionNumber"]
            ds.StudyDescription = f"CT CHEST {per_study['StudyDescription']}"
            ds.OperatorsName = per_study["OperatorsName"]
            ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(
                0x10, "LO", per_study["private"])
            ds.SeriesInstanceUID = generate_uid()
            ds.SeriesNumber = series + 1
            ds.FrameOfReferenceUID = generate_uid()
            # unique names: deid writes flat by basename
            names = [study_dir / f"{n + i:06d}.dcm" for i in range(series_size)]
            save_copies(ds, series_size, names.__getitem__)
            total += sum(path.stat().st_size for path in names)
            n += series_size
        study += 1
    return Corpus(folder, count, study, min(patients, study), total)


# -- checking outputs ------------------------------------------------------------------------


@dataclass
class Outputs:
    files: int
    survived: dict[str, int]
    patients: int


def is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def check_outputs(folder: Path) -> Outputs:
    """Count the DICOM files under ``folder``, byte-scan them for planted tokens, and count
    the distinct Patient IDs they carry."""
    from pydicom import dcmread

    survived = dict.fromkeys(PLANTED, 0)
    patient_ids: set[str] = set()
    files = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not is_dicom(path):
            continue
        files += 1
        data = path.read_bytes()
        for kind, prefix in PLANTED.items():
            if prefix.encode() in data:
                survived[kind] += 1
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
            patient_ids.add(str(ds.get("PatientID", "")))
        except Exception:  # noqa: BLE001 - a side result: an unreadable file counts as ""
            patient_ids.add("")
    return Outputs(files, survived, len(patient_ids))


# -- tools -----------------------------------------------------------------------------------


@dataclass
class Result:
    tool: str
    instances: int | None = None
    seconds: float | None = None
    outputs: Outputs | None = None
    note: str = ""
    foreign: float | None = None
    """Share of the machine's CPU time used by other processes while this tool was timed."""
    busy_before: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        if self.instances is None or not self.seconds:
            return None
        return self.instances / self.seconds


def bench_python() -> Path:
    return BENCH_VENV / "bin" / "python"


def bench_versions() -> dict[str, str]:
    """{distribution: version} in the bench venv; {} if there is none."""
    py = bench_python()
    if not py.exists():
        return {}
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for d in ('deid', 'dicognito', 'pydicom'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    done = probe([str(py), "-c", code])
    try:
        return dict(json.loads(done.stdout))
    except ValueError:
        return {}


def pinned_versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    if BENCH_REQUIREMENTS.exists():
        for line in BENCH_REQUIREMENTS.read_text().splitlines():
            name, sep, ver = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.lower()] = ver
    return pins


def finish(result: Result, done: Done, out_dir: Path, expected: int) -> Result:
    """Count and scan what the tool wrote. A tool that fails is reported, not fatal: with no
    output its rate is n/a, with some it is what it wrote per second (the note says so)."""
    result.detail["returncode"] = done.returncode
    result.foreign = done.foreign_share
    result.detail["output_tail"] = done.output.splitlines()[-5:]
    result.outputs = check_outputs(out_dir) if out_dir.exists() else None
    written = 0 if result.outputs is None else result.outputs.files
    notes = []
    if done.returncode != 0:
        last = next((ln for ln in reversed(done.output.splitlines()) if ln.strip()), "")
        notes.append(f"exited {done.returncode}: {last.strip()[:120]}")
    if written != expected:
        notes.append(f"wrote {written} of {expected}")
    result.note = "; ".join(notes)
    if written:
        result.instances = written
        result.seconds = done.seconds
    else:
        result.note = "n/a: " + result.note
        print(f"\n--- {result.tool} output ---\n{done.output}\n---", flush=True)
    return result


def node_has_detect_text(env: dict[str, str]) -> bool:
    """Whether the node the children import has ``[deid] detect_text``."""
    done = probe([sys.executable, "-c", "from node.config import DeidSettings; "
                  "print('detect_text' in DeidSettings.model_fields)"], env, Path("/"))
    return done.stdout.strip() == "True"


def detect_text_line(detect_text: str | None) -> str:
    """``[deid]`` TOML for ``--detect-text`` ("" for the node's default)."""
    return "" if detect_text is None else f"detect_text = {detect_text}\n"


def run_synthnode(corpus: Corpus, work: Path, env: dict[str, str],
                  config_file: Path | None, detect_text: str | None = None) -> Result:
    result = Result("synthnode")
    helped = probe([synthnode_exe(), "deidentify", "--help"], env, work)
    if helped.returncode != 0:
        raise NotAvailable("`synthnode deidentify` does not exist yet")
    config = config_file or work / "synthnode.toml"
    if config_file is None:
        config.write_text(
            "[deid]\n"
            f"options = {json.dumps(OPTIONS)}\n"
            + detect_text_line(detect_text) +
            "[output]\n"
            f'quarantine_dir = "{work / "quarantine"}"\n'
        )
    out_dir = work / "out-synthnode"
    cmd = [synthnode_exe(), "--config", str(config), "deidentify", str(corpus.folder),
           "--out", str(out_dir), "--workers", str(WORKERS)]
    result.detail["command"] = " ".join(cmd)
    os.sync()
    done = run_timed(cmd, env, work / "synthnode.log")
    return finish(result, done, out_dir, corpus.instances)


def node_origin(env: dict[str, str]) -> str:
    """Where the synthnode children import ``node`` from."""
    done = probe([sys.executable, "-c", "import node; print(node.__file__)"], env, Path("/"))
    return done.stdout.strip() or " ".join(done.stderr.strip().splitlines()[-1:])


def run_synthnode_api(corpus: Corpus, work: Path, env: dict[str, str]) -> Result:
    result = Result("synthnode-api")
    out_dir = work / "out-synthnode-api"
    cmd = [sys.executable, os.path.abspath(__file__), "--api-run", str(corpus.folder),
           str(out_dir)]
    result.detail["command"] = f"{' '.join(cmd)}  (multiprocessing.Pool({WORKERS}))"
    os.sync()
    done = run_timed(cmd, env, work / "synthnode-api.log")
    return finish(result, done, out_dir, corpus.instances)


def require_bench_venv(tool: str) -> Path:
    py = bench_python()
    if not py.exists():
        raise NotAvailable(f"no {BENCH_VENV.relative_to(REPO)} (see bench/README.md)")
    done = probe([str(py), "-c", f"import {tool}"])
    if done.returncode != 0:
        raise NotAvailable(f"{tool} not installed in {BENCH_VENV.relative_to(REPO)}: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    return py


def run_deid(corpus: Corpus, work: Path, env: dict[str, str]) -> Result:
    result = Result("deid", note="")
    py = require_bench_venv("deid")
    out_dir = work / "out-deid"
    out_dir.mkdir()
    cmd = [str(py), "-c", DEID_RUNNER, str(corpus.folder), str(out_dir)]
    result.detail["command"] = (f"{py} -c 'replace_identifiers(sorted(get_files(CORPUS)), "
                                "save=True, output_folder=OUT)'")
    os.sync()
    done = run_timed(cmd, dict(env, MESSAGELEVEL="ERROR"), work / "deid.log")
    return finish(result, done, out_dir, corpus.instances)


def run_dicognito(corpus: Corpus, work: Path, env: dict[str, str]) -> Result:
    result = Result("dicognito")
    py = require_bench_venv("dicognito")
    out_dir = work / "out-dicognito"
    # `python -m`: the console script of dicognito 0.19.0 calls main() without its argument
    cmd = [str(py), "-m", "dicognito", "--quiet", "--output-directory", str(out_dir),
           str(corpus.folder)]
    result.detail["command"] = " ".join(cmd)
    os.sync()
    done = run_timed(cmd, env, work / "dicognito.log")
    return finish(result, done, out_dir, corpus.instances)


def run_orthanc(corpus: Corpus, work: Path, parallel: int) -> Result:
    from concurrent.futures import ThreadPoolExecutor

    result = Result("orthanc")
    if shutil.which("Orthanc") is None:
        raise NotAvailable("`Orthanc` not found on PATH (Debian package orthanc)")
    orthanc = OrthancProcess(work / "orthanc", username=None,
                             overrides={"Name": "synthnode-bench", "SyncStorageArea": False})
    proc = launch_orthanc(orthanc)
    try:
        for path in sorted(corpus.folder.rglob("*.dcm")):  # upload: not timed
            orthanc.request("POST", "/instances", path.read_bytes(), UPLOAD_TIMEOUT_S)
        held = orthanc.count_instances()
        if held != corpus.instances:
            raise BenchError(f"orthanc holds {held} of {corpus.instances} uploaded instances")
        studies = orthanc.get_json("/studies")
        body = json.dumps({"Asynchronous": False}).encode()

        def anonymize(study: str) -> str:
            answer = json.loads(orthanc.request("POST", f"/studies/{study}/anonymize", body,
                                                REQUEST_TIMEOUT_S))
            return str(answer["ID"])

        os.sync()
        with ForeignLoad(proc.pid) as load:
            started = time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                new_studies = list(pool.map(anonymize, studies))
            seconds = time.perf_counter() - started
        result.foreign = load.share
        instances = [i for s in new_studies for i in orthanc.get_json(f"/studies/{s}/instances")]
        out_dir = work / "out-orthanc"  # for the byte scan, not timed
        out_dir.mkdir()
        for n, inst in enumerate(instances):
            data = orthanc.request("GET", f"/instances/{inst['ID']}/file",
                                   timeout_s=UPLOAD_TIMEOUT_S)
            (out_dir / f"{n:06d}.dcm").write_bytes(data)
    except urllib.error.HTTPError as exc:
        raise BenchError(f"orthanc: HTTP {exc.code} on {exc.url}\n{tail(orthanc.log_path)}") \
            from None
    except (OSError, urllib.error.URLError) as exc:
        raise BenchError(f"orthanc: {exc}\n{tail(orthanc.log_path)}") from None
    finally:
        stop_orthanc(orthanc, kill=False)
    result.seconds = seconds
    result.outputs = check_outputs(out_dir)
    result.instances = len(instances)
    result.detail["command"] = (f"POST /studies/{{id}}/anonymize {body.decode()} x "
                                f"{len(studies)} studies, {parallel} at a time")
    if result.instances != corpus.instances:
        result.note = f"anonymized {result.instances} of {corpus.instances} instances"
    return result


# -- the API run (a child process of this script) --------------------------------------------

_DEIDENTIFIER: Any = None


def _api_init() -> None:
    global _DEIDENTIFIER
    from node.config import DeidSettings, OutputSettings
    from node.deid import Deidentifier

    extra: dict[str, Any] = {}
    if DETECT_TEXT_ENV in os.environ and "detect_text" in DeidSettings.model_fields:
        extra["detect_text"] = os.environ[DETECT_TEXT_ENV] == "true"
    settings = DeidSettings(key=os.environ[KEY_ENV], options=OPTIONS,  # type: ignore[arg-type]
                            **extra)
    _DEIDENTIFIER = Deidentifier(settings, OutputSettings())


def _api_one(job: tuple[str, str]) -> int:
    import pydicom

    source, target = job
    out = _DEIDENTIFIER.deidentify(pydicom.dcmread(source))
    out.save_as(target, enforce_file_format=True)
    return 1


def api_run(corpus: Path, out: Path) -> int:
    """De-identify every file under ``corpus`` into ``out`` (same relative paths) with the
    engine in a Pool of ``WORKERS`` processes."""
    import multiprocessing

    if os.environ.get("PYTHONPATH"):  # --node-rev: the snapshot, not the working tree (REPO)
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    import node.deid  # before the fork: the workers inherit it

    print(f"synthnode-api: node from {node.deid.__file__}", flush=True)

    jobs = []
    for path in sorted(corpus.rglob("*.dcm")):
        target = out / path.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), str(target)))
    with multiprocessing.get_context("fork").Pool(WORKERS, initializer=_api_init) as pool:
        done = sum(pool.imap_unordered(_api_one, jobs, chunksize=16))
    print(f"synthnode-api: {done} files")
    return 0


# -- report ----------------------------------------------------------------------------------


def synthnode_reference(results: dict[str, Result]) -> Result | None:
    """The synthnode figure the ratios use: the command, else the API run."""
    for name in ("synthnode", "synthnode-api"):
        r = results.get(name)
        if r is not None and r.rate is not None:
            return r
    return None


def ratios(results: dict[str, Result]) -> dict[str, dict[str, float | None]]:
    """{synthnode flavour: {other tool: synthnode rate / other rate}}."""
    out: dict[str, dict[str, float | None]] = {}
    for mine in ("synthnode", "synthnode-api"):
        r = results.get(mine)
        if r is None or r.rate is None:
            continue
        out[mine] = {}
        for other in OTHERS:
            o = results.get(other)
            out[mine][other] = None if o is None or not o.rate else r.rate / o.rate
    return out


def goal_checks(results: dict[str, Result]) -> list[dict[str, Any]]:
    ref = synthnode_reference(results)
    checks = []
    for other, minimum in GOALS:
        o = results.get(other)
        ratio = None
        if ref is not None and ref.rate and o is not None and o.rate:
            ratio = ref.rate / o.rate
        checks.append({"versus": other, "minimum": minimum, "ratio": ratio,
                       "synthnode": None if ref is None else ref.tool,
                       "met": None if ratio is None else ratio >= minimum})
    return checks


def print_report(corpus: Corpus, results: dict[str, Result],
                 by_tool: dict[str, dict[str, float | None]],
                 checks: list[dict[str, Any]]) -> None:
    print()
    print(f"corpus: {corpus.instances} instances, {corpus.studies} studies, "
          f"{corpus.patients} patients, {corpus.total_bytes / 1e6:.1f} MB")
    header = f"{'tool':<14} {'instances':>9} {'seconds':>8} {'inst/s':>8} {'other%':>6}  note"
    print_header(header)
    for name in TOOLS:
        r = results.get(name)
        if r is None:
            continue
        inst = "n/a" if r.instances is None else str(r.instances)
        other = "-" if r.foreign is None else f"{100 * r.foreign:.0f}"
        print(f"{name:<14} {inst:>9} {fmt(r.seconds, '.2f'):>8} {fmt(r.rate, '.1f'):>8} "
              f"{other:>6}  {r.note}")
    print("other% = CPU used by other processes while the tool was timed, in % of the "
          "machine")
    noisy = [n for n, r in results.items() if r.foreign is not None and r.foreign > FOREIGN_WARN]
    if noisy:
        print(f"WARNING: other work ran during {', '.join(noisy)}: figures are not clean; run "
              "again on a quiet machine")
    print()
    for mine, per_other in by_tool.items():
        text = "  ".join(f"{mine}/{o} = {fmt(v, '.2f', 'x')}" for o, v in per_other.items())
        print(f"ratios {text}")
    print()
    kinds = list(PLANTED)
    print("planted values surviving (output files holding a value of that kind):")
    header = f"{'tool':<14} {'files':>6} {'patients':>8}  " + " ".join(f"{k:>16}" for k in kinds)
    print_header(header)
    for name in TOOLS:
        r = results.get(name)
        if r is None or r.outputs is None or not r.outputs.files:
            continue
        o = r.outputs
        print(f"{name:<14} {o.files:>6} {o.patients:>8}  "
              + " ".join(f"{o.survived[k]:>16}" for k in kinds))
    print(f"(the corpus has {corpus.patients} patients; 'patients' = distinct output Patient IDs)")
    print()
    print(GOAL_TEXT)
    for c in checks:
        state = goal_state(c["met"])
        print(f"  {c['synthnode'] or 'synthnode'}/{c['versus']:<10} >= {c['minimum']:.1f}x: "
              f"{fmt(c['ratio'], '.2f', 'x'):>6}  {state}")
    if results.get("synthnode") is not None and results["synthnode"].rate is None:
        print("  (synthnode command n/a: the goal lines use synthnode-api)")


def result_doc(args: argparse.Namespace, corpus: Corpus, results: dict[str, Result],
               by_tool: dict[str, dict[str, float | None]], checks: list[dict[str, Any]],
               bench: dict[str, str]) -> dict[str, Any]:
    """The JSON result document."""
    return {
        "benchmark": "deid",
        "goal": GOAL_TEXT,
        "method": "one run per tool, sequential, wall clock of the tool's process (Orthanc: "
                  "the anonymize calls only), outputs written to files, private netns",
        "settings": {"count": args.count, "study_size": args.study_size,
                     "patients": args.patients, "synthnode_workers": WORKERS,
                     "synthnode_options": OPTIONS, "orthanc_parallel": args.orthanc_parallel,
                     "node_rev": args.node_rev, "settle_s": args.settle,
                     "detect_text": getattr(args, "detect_text_applied", "node default"),
                     "tools": args.tools},
        "environment": environment("pydicom", bench_venv=bench, orthanc_version=True),
        "corpus": asdict(corpus) | {"folder": None, "templates": list(TEMPLATES)},
        "results": [
            {"tool": r.tool, "instances": r.instances, "seconds": r.seconds,
             "instances_per_s": r.rate, "note": r.note, "foreign_cpu_share": r.foreign,
             "busy_before": r.busy_before,
             "outputs": None if r.outputs is None else asdict(r.outputs), **r.detail}
            for r in results.values()
        ],
        "ratios": by_tool,
        "goals": checks,
    }


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=2000, help="instances in the corpus (2000)")
    p.add_argument("--study-size", type=int, default=50, help="instances per study (50)")
    p.add_argument("--patients", type=int, default=5, help="patients (5)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated subset of {','.join(TOOLS)}")
    p.add_argument("--orthanc-parallel", type=int, default=1,
                   help="anonymize calls in flight at once (1)")
    p.add_argument("--synthnode-config", type=Path, default=None,
                   help="TOML for `synthnode deidentify` instead of the generated one")
    p.add_argument("--node-rev", default=None, metavar="REV",
                   help="measure synthnode from `git archive REV node` instead of the working "
                        "tree (when node/ is mid-edit)")
    p.add_argument("--settle", type=float, default=120.0, metavar="S",
                   help=f"before each tool, wait up to S seconds for the machine to be under "
                        f"{100 * SETTLE_BUSY:.0f}%% busy (120)")
    p.add_argument("--detect-text", choices=("true", "false"), default=None,
                   help="synthnode's [deid] detect_text (burned-in text detection); default: "
                        "the node's")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    add_out_option(p, DEFAULT_OUT)
    p.add_argument("--api-run", nargs=2, type=Path, metavar=("CORPUS", "OUT"),
                   help=argparse.SUPPRESS)  # the synthnode-api child process
    args = p.parse_args(argv)
    args.tools = subset(p, "--tools", args.tools, TOOLS)
    if args.count < 1 or args.study_size < 2 or args.patients < 1 or args.orthanc_parallel < 1:
        p.error("--count, --patients, --orthanc-parallel must be >= 1, --study-size >= 2")
    return args


def run_benchmark(args: argparse.Namespace, root: Path) -> None:
    bench = bench_versions()
    pins = pinned_versions()
    print(f"deid benchmark: {', '.join(args.tools)}")
    print(GOAL_TEXT)
    print(f"bench venv {BENCH_VENV.relative_to(REPO)}: "
          + (", ".join(f"{k} {v}" for k, v in bench.items()) or "missing"))
    for name, ver in bench.items():
        if name in pins and pins[name] != ver:
            print(f"  warning: {name} {ver} is not the pinned {pins[name]} "
                  f"({BENCH_REQUIREMENTS.name})")
    print(f"making {args.count} instances in {root} ...", flush=True)
    corpus = make_corpus(root, args.count, args.study_size, args.patients)
    env = dict(os.environ, **{KEY_ENV: secrets.token_hex(32)})
    if args.node_rev:
        env["PYTHONPATH"] = str(node_snapshot(args.node_rev, root / "node-src"))
    print(f"synthnode: node from {node_origin(env)}"
          + (f" (git {args.node_rev})" if args.node_rev else " (working tree)"), flush=True)
    detect_text = args.detect_text
    if detect_text is not None:
        if node_has_detect_text(env):
            env[DETECT_TEXT_ENV] = detect_text
            args.detect_text_applied = detect_text
            print(f"synthnode: [deid] detect_text = {detect_text}", flush=True)
        else:
            detect_text = None
            args.detect_text_applied = "n/a: this node has no [deid] detect_text"
            print("synthnode: --detect-text ignored: this node has no [deid] detect_text",
                  flush=True)
    runners: dict[str, Callable[[], Result]] = {
        "synthnode": lambda: run_synthnode(corpus, root, env, args.synthnode_config,
                                           detect_text),
        "synthnode-api": lambda: run_synthnode_api(corpus, root, env),
        "deid": lambda: run_deid(corpus, root, env),
        "dicognito": lambda: run_dicognito(corpus, root, env),
        "orthanc": lambda: run_orthanc(corpus, root, args.orthanc_parallel),
    }
    results: dict[str, Result] = {}
    for name in TOOLS:
        if name not in args.tools:
            continue
        busy = settle(args.settle)
        print(f"  {name:<14} (machine {100 * busy:.0f}% busy before) ...", end=" ", flush=True)
        try:
            r = runners[name]()
        except NotAvailable as exc:
            r = Result(name, note=f"n/a: {exc}")
            print(r.note, flush=True)
        else:
            if r.rate is None:
                print(r.note, flush=True)
            else:
                print(f"{r.instances} in {r.seconds:.2f} s ({r.rate:.1f}/s) {r.note}",
                      flush=True)
        r.busy_before = busy
        results[name] = r
        for out_dir in root.glob("out-*"):  # free the disk for the next tool
            if not args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
    by_tool = ratios(results)
    checks = goal_checks(results)
    print_report(corpus, results, by_tool, checks)
    write_json(args.out, result_doc(args, corpus, results, by_tool, checks, bench))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.api_run:
        return api_run(*args.api_run)
    args.out = args.out.resolve()
    return run_main("bench/deid.py", lambda root: run_benchmark(args, root),
                    tmp_prefix="synthnode-bench-deid-", group=True, keep=args.keep,
                    error_lead="\n")


if __name__ == "__main__":
    sys.exit(main())
