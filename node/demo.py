"""``synthnode demo``: the whole product on the embedded default, in one command.

1. a private network namespace (nothing listens on a real interface);
2. a private Orthanc (Debian's package) with its own config and temporary storage;
3. ``synthnode serve`` with the tiny untrained model and the default rules (de-identify every
   study; a synthetic counterpart of every CR/DX series), a de-identification key made for
   this run only;
4. sample studies (a CT and a CR from pydicom's test data, under a made-up patient) sent with
   dcmtk's storescu;
5. wait until every job of these studies is done, print what arrived in Orthanc (series,
   counts, the tags that mark them), then stop the node and Orthanc.

``--workdir DIR`` keeps everything; run again on the same folder, the demo first clears what
the previous run left there (its spool, queue, outputs, Orthanc storage, samples and log; the
model cache stays), so each run shows its own jobs only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from node.config import load_settings
from node.localorthanc import OrthancProcess, dcmtk, free_port
from node.netns import isolate_network
from node.samples import make_study

SAMPLES = (("CT_small.dcm", 4), ("RG1_UNCR.dcm", 1))  # (pydicom test file, instances)
DEMO_PATIENT = ("DEMO^PATIENT", "DEMO-0001")
PREVIOUS_RUN = ("spool", "var", "samples", "orthanc/storage", "orthanc/index", "node.log")
"""What a demo run leaves in its workdir besides the model cache (relative to the workdir)."""


def _say(text: str) -> None:
    print(text, flush=True)


def _samples(folder: Path) -> list[list[Path]]:
    """One study per sample file under the demo patient."""
    studies = []
    for name, count in SAMPLES:
        try:
            studies.append(make_study(folder / name[:-4], name, per_series=count,
                                      patient_name=DEMO_PATIENT[0],
                                      patient_id=DEMO_PATIENT[1]))
        except FileNotFoundError:  # RG1_UNCR comes with pydicom-data (.ci/setup installs it)
            _say(f"  (sample {name} not installed: skipped)")
    return studies


def _clear_previous_run(work: Path) -> bool:
    """Remove what an earlier run left in ``work`` (only the paths a run makes); whether there
    was any."""
    found = False
    for name in PREVIOUS_RUN:
        path = work / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            found = True
        elif path.exists() or path.is_symlink():
            path.unlink()
            found = True
    return found


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def _report(orthanc: OrthancProcess) -> list[str]:
    lines = []
    for study in orthanc.get_json("/studies?expand"):
        patient = study["PatientMainDicomTags"]
        lines.append(f"  study {study['MainDicomTags'].get('StudyInstanceUID')}  patient "
                     f"{patient.get('PatientName')} / {patient.get('PatientID')}")
        for series_id in study["Series"]:
            series = orthanc.get_json(f"/series/{series_id}")
            first = series["Instances"][0]
            tags = orthanc.get_json(f"/instances/{first}/tags?short")
            task = orthanc.request("GET", f"/instances/{first}/metadata/SynthnodeTask").decode()
            job = orthanc.request("GET", f"/instances/{first}/metadata/SynthnodeJob").decode()
            lines.append(
                f"    series {series['MainDicomTags'].get('SeriesDescription', '')!r:28} "
                f"{series['MainDicomTags'].get('Modality', ''):3} "
                f"{len(series['Instances'])} instance(s)  task {task}  job {job}")
            lines.append(
                f"      Patient Identity Removed {tags.get('0012,0062', '-')}, "
                f"Synthetic Data {tags.get('0008,001c', '-')}, "
                f"De-identification Method {tags.get('0012,0063', '-')!r}, "
                f"SOP Class {tags.get('0008,0016')}")
    return lines


def _demo_key(work: Path) -> str:
    """The demo's [deid] key: random, kept in ``work`` (mode 0600) so that a second run in the
    same folder gives the same pseudonyms and meets the fingerprint the first one recorded."""
    path = work / "deid.key"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key


def run_demo(workdir: Path | None = None, timeout_s: float = 300.0) -> int:
    """Run the demonstration; 0 when every output arrived, 1 otherwise."""
    try:
        isolate_network()
    except OSError as exc:
        print(f"synthnode demo: {exc.strerror}", file=sys.stderr)
        return 2
    keep = workdir is not None
    work = workdir or Path(tempfile.mkdtemp(prefix="synthnode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TCP_NODELAY"] = "1"
    _say(f"synthnode demo in {work} (private network namespace: nothing is reachable from "
         "outside)")
    if keep and _clear_previous_run(work):
        _say("   (cleared what the previous demo run left there; the model cache stays)")
    orthanc = OrthancProcess(work / "orthanc", password=secrets.token_urlsafe(16))
    node: subprocess.Popen[bytes] | None = None
    node_log = work / "node.log"
    try:
        _say("1. starting a private Orthanc (Debian's orthanc, own config and storage)")
        orthanc.start()
        port = free_port({orthanc.http_port, orthanc.dicom_port})
        config = work / "node.toml"
        models = Path(os.environ.get("SYNTHNODE_DEMO_MODELS", work / "models"))
        config.write_text(
            f'[node]\nport = {port}\n[spool]\ndir = "spool"\nstable_after_s = 1.0\n'
            f'check_interval_s = 0.2\n[orthanc]\nurl = "{orthanc.url}"\n'
            f'username = "{orthanc.username}"\n[generate]\nmodel = "tiny"\n'
            f'cache_dir = "{models}"\nsteps = 10\n[jobs]\nheartbeat_timeout_s = 10.0\n'
        )
        env = dict(os.environ, SYNTHNODE__ORTHANC__PASSWORD=orthanc.password,
                   SYNTHNODE__DEID__KEY=_demo_key(work))
        settings = load_settings(config, environ=env)
        _say(f"2. starting synthnode serve on port {port} with the tiny UNTRAINED model "
             f"and the default rules: {', '.join(r.name for r in settings.rules)}")
        with node_log.open("wb") as out:
            node = subprocess.Popen([sys.executable, "-m", "node", "--config", str(config),
                                     "serve"], stdout=out, stderr=subprocess.STDOUT, env=env)
        _wait(lambda: " listening as " in node_log.read_text(errors="replace"), 60,
              "the node did not start (see node.log)")

        samples = work / "samples"
        samples.mkdir(exist_ok=True)
        studies = _samples(samples)
        files = [p for s in studies for p in s]
        from pydicom import dcmread

        ours = {str(dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies}
        _say(f"3. sending {len(studies)} sample studies ({len(files)} instances, patient "
             f"{DEMO_PATIENT[0]}) with dcmtk storescu")
        sent = subprocess.run([dcmtk("storescu"), "-aec", "SYNTHNODE", "127.0.0.1", str(port),
                               *map(str, files)], capture_output=True, text=True, env=env,
                              timeout=120)
        if sent.returncode != 0:
            print(f"storescu failed:\n{sent.stderr}", file=sys.stderr)
            return 1

        _say("4. waiting for the jobs (de-identification, then generation on the CR)")
        from node.jobs import Job, JobState, Queues
        from node.spool.index import Index, StudyState
        from node.spool.spool import INDEX_NAME

        queues = Queues(settings.jobs)
        started = time.monotonic()

        def this_run() -> list[Job]:
            return [j for j in queues.store.all() if j.study_uid in ours]

        def finished() -> bool:
            jobs = this_run()
            dead = [j for j in jobs if j.state is JobState.DEAD]
            if dead:
                raise RuntimeError(f"job {dead[0].id} failed: {dead[0].last_error}")
            index = Index(settings.spool.dir / INDEX_NAME)
            try:
                done = {s.study_uid for s in index.summaries() if s.state is StudyState.DONE}
            finally:
                index.close()
            return ours <= done and all(j.state is JobState.DONE for j in jobs)

        _wait(finished, timeout_s, "the jobs did not finish (see node.log)")
        jobs = this_run()
        _say(f"   {len(jobs)} jobs done in {time.monotonic() - started:.1f} s: " + ", ".join(
            f"{j.kind} ({j.outputs} outputs)" for j in jobs))
        _say("5. what arrived in Orthanc:")
        for line in _report(orthanc):
            _say(line)
        _say(f"\nWhere to look: node log {node_log}, Orthanc log {orthanc.log_path}"
             + (f", storage {orthanc.storage}" if keep else "")
             + ". `synthnode jobs` and `synthnode status` read the same state with "
               f"--config {config}." + ("" if keep else " (--workdir DIR keeps all of it.)"))
        return 0
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"synthnode demo: {exc}", file=sys.stderr)
        if node_log.exists():
            print(node_log.read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        orthanc.stop()
        _say("stopped the node and Orthanc")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

