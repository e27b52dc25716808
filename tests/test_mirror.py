"""Research PACS mirroring with two real Orthancs: a clinical one (running the plugin, or walked
by backfill) and a research one, and the node's workers between them."""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.localorthanc import OrthancProcess
from tests import ocr
from tests.nodeproc import SYNTHNODE, NodeProcess, make_study
from tests.phi_corpus import make_planted_sr, make_planted_study
from tests.test_jobs import all_done, jobs_node, records, wait_for
from tests.test_plugin import LIBPYTHON, PLUGIN, upload

pytestmark = pytest.mark.slow

PASSWORD_ENV = "SYNTHNODE_TEST_RESEARCH_PW"
OPTIONS = '["retain_longitudinal_modified_dates", "clean_descriptors"]'


def mirror_rules(research: OrthancProcess, clinical: OrthancProcess | None = None) -> str:
    """The research Orthanc (and the clinical one, for backfill) as destinations, and one
    mirror rule: everything the plugin hands over or backfill finds, de-identified."""
    text = (f'[[destinations]]\nname = "research"\nurl = "{research.url}"\n'
            f'username = "{research.username}"\npassword_env = "{PASSWORD_ENV}"\n')
    if clinical is not None:
        text += (f'[[destinations]]\nname = "clinical"\nurl = "{clinical.url}"\n'
                 f'username = "{clinical.username}"\npassword_env = "{PASSWORD_ENV}"\n')
    return text + f"""
[[rules]]
name = "mirror"
destinations = ["research"]
[rules.match]
source = ["orthanc", "backfill"]
[[rules.tasks]]
task = "deidentify"
options = {OPTIONS}
"""


@pytest.fixture
def research(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    proc = OrthancProcess(tmp_path / "research", aet="RESEARCH", password="research-pw-1")
    monkeypatch.setenv(PASSWORD_ENV, proc.password)
    proc.start()
    yield proc
    proc.stop(kill=True)


def mirror(node_factory: Callable[..., NodeProcess], tmp_path: Path, research: OrthancProcess,
           **sections: dict[str, Any]) -> tuple[OrthancProcess, NodeProcess]:
    """A clinical Orthanc running the plugin, and the node mirroring it into ``research``."""
    clinical = OrthancProcess(tmp_path / "clinical", password=research.password)
    node = jobs_node(node_factory, tmp_path, clinical, rules=mirror_rules(research),
                     **sections)
    clinical.config.update({
        "Plugins": [LIBPYTHON], "PythonScript": str(PLUGIN), "StableAge": 1,
        "Synthnode": {"Venv": sys.prefix, "Config": str(node.config)},
    })
    clinical.start()
    return clinical, node


def dated(files: list[Path], day: datetime.date) -> list[Path]:
    for path in files:
        ds = dcmread(path)
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, keyword, day.strftime("%Y%m%d"))
        ds.save_as(path)
    return files


US_HEADER, US_HEADER_BOX = "BAPTIST MED CTR", (15, 21, 156, 20)
"""Text burned into the top left of pydicom's US1_UNCR.dcm, the planted study's ultrasound,
and where (x, y, width, height)."""


def research_tags(research: OrthancProcess) -> list[dict[str, Any]]:
    return [research.get_json(f"/instances/{i}/simplified-tags")
            for i in research.get_json("/instances")]


def test_clinical_studies_appear_deidentified_with_one_pseudonym_and_their_interval(
    node_factory, tmp_path: Path, research: OrthancProcess
) -> None:
    clinical, node = mirror(node_factory, tmp_path, research)
    first = dated(make_study(tmp_path / "a", per_series=2, patient_id="MRN-123456",
                             patient_name="Smith^Alice"), datetime.date(2024, 3, 1))
    second = dated(make_study(tmp_path / "b", per_series=3, patient_id="MRN-123456",
                              patient_name="Smith^Alice"), datetime.date(2024, 3, 11))
    upload(clinical, first)
    upload(clinical, second)

    wait_for(lambda: research.count_instances() == 5, what="both studies in research")
    wait_for(all_done(node, 2), what="two mirror jobs done")
    tags = research_tags(research)
    assert {t["PatientID"] for t in tags} == {tags[0]["PatientID"]}  # one pseudonym
    assert tags[0]["PatientID"] != "MRN-123456" and "Smith" not in str(tags)
    dates = {t["StudyInstanceUID"]: datetime.date.fromisoformat(
        f"{t['StudyDate'][:4]}-{t['StudyDate'][4:6]}-{t['StudyDate'][6:]}") for t in tags}
    assert len(dates) == 2
    early, late = sorted(dates.values())
    assert (late - early).days == 10  # the interval kept, the dates shifted
    assert early != datetime.date(2024, 3, 1)
    assert not {str(dcmread(first[0]).StudyInstanceUID),
                str(dcmread(second[0]).StudyInstanceUID)} & set(dates)

    out = subprocess.run([*SYNTHNODE, "--config", str(node.config), "mirror", "status",
                          "--json"], capture_output=True, text=True, check=True).stdout
    (today,) = json.loads(out)
    assert (today["studies"], today["instances"], today["failed"]) == (2, 5, 0)


def test_research_down_then_back_everything_arrives_once(
    node_factory, tmp_path: Path, research: OrthancProcess
) -> None:
    clinical, node = mirror(node_factory, tmp_path, research)
    research.stop(kill=True)
    files = make_study(tmp_path / "in", per_series=6)
    upload(clinical, files)

    def retrying() -> bool:
        jobs = records(node)
        return bool(jobs) and jobs[0].attempts >= 2 and "unreachable" in jobs[0].last_error
    wait_for(retrying, what="the mirror job retrying while research is down")
    research.start()
    wait_for(all_done(node, 1), what="the job once research is back")
    assert research.count_instances() == len(files)
    assert len(research.get_json("/series")) == 1


def test_backfill_interrupted_and_resumed_completes_without_duplicates(
    node_factory, tmp_path: Path, research: OrthancProcess
) -> None:
    clinical = OrthancProcess(tmp_path / "clinical", password=research.password)
    clinical.start()
    days = [datetime.date(2023, 1, 1) + datetime.timedelta(days=7 * n) for n in range(12)]
    for n, day in enumerate(days):
        upload(clinical, dated(make_study(tmp_path / f"s{n}", per_series=2,
                                          patient_id=f"MRN-{n % 3}"), day))
    old = dated(make_study(tmp_path / "old", per_series=1), datetime.date(2019, 5, 5))
    upload(clinical, old)  # before --since: not mirrored
    node = jobs_node(node_factory, tmp_path, None, rules=mirror_rules(research, clinical),
                     jobs={"cpu_workers": 0})
    backfill = [*SYNTHNODE, "--config", str(node.config), "mirror", "backfill", "--from",
                "clinical", "--since", "2023-01-01", "--quiet"]

    first = subprocess.Popen(backfill, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: records(node), timeout_s=60, what="the first jobs")
    first.send_signal(signal.SIGKILL)  # interrupted: part routed, nothing mirrored yet
    first.wait(10)
    interrupted_at = len(records(node))
    assert 1 <= interrupted_at <= 12

    worker = subprocess.Popen([*SYNTHNODE, "--config", str(node.config), "worker", "--queue",
                               "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        again = subprocess.run(backfill, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "12 studies from clinical" in again.stdout
        assert "mirrored: 24 instances in 12 jobs, 0 quarantined, 0 jobs failed" in again.stdout
        assert research.count_instances() == 24  # every instance once
        assert len(research.get_json("/studies")) == 12
        assert len(records(node)) == 12
        third = subprocess.run(backfill, capture_output=True, text=True, timeout=120)
        assert "0 queued, 12 done before" in third.stdout
        assert research.count_instances() == 24
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(30)
        clinical.stop(kill=True)


def test_planted_phi_never_reaches_the_research_archive(
    node_factory, tmp_path: Path, research: OrthancProcess
) -> None:
    broker = tmp_path / "protected" / "broker.jsonl"
    clinical, node = mirror(node_factory, tmp_path, research,
                            deid={"honest_broker_file": str(broker)})
    study = make_planted_study(tmp_path / "in", n_series=3, per_series=2, seed=11)
    sr = make_planted_sr(tmp_path / "in" / "sr", study=study, seed=11)
    upload(clinical, study.files + sr.files)

    wait_for(all_done(node, 1), what="the mirror job")
    (job,) = records(node)
    # CT, MR and US are mirrored, the US with the text burned into its pixels hidden; the SR
    # (free text without clean_structured_content) is quarantined, never sent.
    assert (job.outputs, job.quarantined) == (6, 1)
    assert research.count_instances() == 6
    assert {t["Modality"] for t in research_tags(research)} == {"CT", "MR", "US"}
    stored = b"".join(p.read_bytes() for p in research.storage.rglob("*") if p.is_file())
    leaks = [x.where for x in study.planted + sr.planted if x.value.encode() in stored]
    assert not leaks, leaks
    assert not [d for d in study.dates + sr.dates if len(d) >= 8 and d.encode() in stored]
    logs = node.log() + clinical.log() + research.log()  # UIDs may be logged; nothing else
    assert not [x.where for x in study.planted + sr.planted
                if x.value in logs and not x.where.startswith("UID")]

    out = subprocess.run([*SYNTHNODE, "--config", str(node.config), "mirror", "status"],
                         capture_output=True, text=True, check=True).stdout
    assert "burned-in" not in out
    assert "quarantined 1: structured report with free text" in out
    # The ultrasound's burned-in header, read by tesseract (not the node's OCR): in the
    # clinical images, and in none of the research ones.
    us_in = [ds for ds in map(dcmread, study.files) if ds.Modality == "US"]
    stored_files = [dcmread(BytesIO(research.request("GET", f"/instances/{i}/file")))
                    for i in research.get_json("/instances")]
    us_out = [ds for ds in stored_files if ds.Modality == "US"]
    assert len(us_in) == len(us_out) == 2
    assert all(ocr.reads(US_HEADER, ocr.read(ocr.display(ds)[0], US_HEADER_BOX)) for ds in us_in)
    assert not any(ocr.reads(US_HEADER, ocr.read(ocr.display(ds)[0], US_HEADER_BOX))
                   for ds in us_out)
    assert all(ds.BurnedInAnnotation == "NO" for ds in us_out)
    # The honest broker: the one place original and pseudonym meet, readable by its owner only.
    assert stat.S_IMODE(broker.stat().st_mode) == 0o600
    mappings = [json.loads(line) for line in broker.read_text().splitlines()]
    stored_tags = research_tags(research)
    assert len(mappings) == 6  # one per instance mirrored
    assert {m["patient_id"] for m in mappings} == {study.patient_id}
    assert {m["pseudonym"] for m in mappings} == {stored_tags[0]["PatientID"]}
    by_sop = {t["SOPInstanceUID"]: t for t in stored_tags}
    sources = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, study.files)}
    assert {m["new_sop_instance_uid"] for m in mappings} == set(by_sop)
    for m in mappings:  # every UID kind, from the source file to the stored instance
        stored, source = by_sop[m["new_sop_instance_uid"]], sources[m["sop_instance_uid"]]
        for kind, keyword in [("study_instance_uid", "StudyInstanceUID"),
                              ("series_instance_uid", "SeriesInstanceUID"),
                              ("frame_of_reference_uid", "FrameOfReferenceUID")]:
            assert m[kind] == source.get(keyword), kind
            if m[kind] is None:  # the ultrasound has no Frame of Reference
                assert m[f"new_{kind}"] is None and keyword not in stored, kind
                continue
            assert m[f"new_{kind}"] == stored.get(keyword) != m[kind], kind
    assert os.environ.get(PASSWORD_ENV) not in node.log()


def test_backfill_from_a_pacs_by_cfind_and_cget(
    node_factory, tmp_path: Path, research: OrthancProcess
) -> None:
    clinical = OrthancProcess(tmp_path / "pacs", aet="PACS", password=research.password)
    days = [datetime.date(2022, 6, 1), datetime.date(2022, 6, 9), datetime.date(2022, 7, 1)]
    modalities = [("CT",), ("MR", "CT"), ("CT",)]
    studies = [dated(make_study(tmp_path / f"s{n}", series=len(m), per_series=2,
                                modalities=m, patient_id="MRN-77"), day)
               for n, (day, m) in enumerate(zip(days, modalities, strict=True))]
    peer = (f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
            f"port = {clinical.dicom_port}\n")
    rules = mirror_rules(research) + '[rules.match]\nmodality = ["CT"]\n'
    rules = rules.replace('[rules.match]\nsource = ["orthanc", "backfill"]\n', "")
    node = jobs_node(node_factory, tmp_path, None, rules=peer + rules)
    # The PACS knows the node (C-FIND and C-GET allowed); the node needs no address of its own.
    clinical.config["DicomModalities"] = {"synthnode": {
        "AET": "SYNTHNODE", "Host": "127.0.0.1", "Port": node.port, "AllowFind": True,
        "AllowGet": True}}
    clinical.start()
    try:
        for files in studies:
            upload(clinical, files)
        backfill = [*SYNTHNODE, "--config", str(node.config), "mirror", "backfill", "--from",
                    "pacs", "--since", "2022-06-05", "--quiet"]
        done = subprocess.run(backfill, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 studies from pacs: 2 queued" in done.stdout  # 1 June is before --since
        # The CT series are mirrored (the rule's filter); the MR series is not.
        assert research.count_instances() == 4
        assert {t["Modality"] for t in research_tags(research)} == {"CT"}
        again = subprocess.run(backfill, capture_output=True, text=True, timeout=120)
        assert "0 queued, 2 done before" in again.stdout and research.count_instances() == 4
    finally:
        clinical.stop(kill=True)


def test_backfill_from_a_pacs_skips_the_nodes_own_outputs(
    node_factory, tmp_path: Path, research: OrthancProcess
) -> None:
    """C-FIND answers cannot show the node's mark, so a PACS holding the node's outputs gets a
    job queued for them; the worker recognises every instance as the node's own output, notes
    it and delivers nothing, while the clinical study beside it is mirrored."""
    clinical = OrthancProcess(tmp_path / "pacs", aet="PACS", password=research.password)
    day = datetime.date(2022, 6, 9)
    source = dated(make_study(tmp_path / "clinical", series=1, per_series=2,
                              patient_id="MRN-78"), day)
    peer = (f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
            f"port = {clinical.dicom_port}\n")
    rules = mirror_rules(research).replace('[rules.match]\nsource = ["orthanc", "backfill"]\n',
                                           "")
    node = jobs_node(node_factory, tmp_path, None, rules=peer + rules)
    # The node's own outputs, made from another study; dates kept (shifted) so that the
    # backfill's date-range C-FIND finds them.
    other = dated(make_study(tmp_path / "other", series=1, per_series=2, patient_id="MRN-79"),
                  day)
    made = subprocess.run([*SYNTHNODE, "--config", str(node.config), "deidentify", *map(str, other),
                           "--out", str(tmp_path / "own"), "--workers", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300, env={
                              **os.environ, "SYNTHNODE__DEID__OPTIONS": OPTIONS})
    assert made.returncode == 0, made.stdout + made.stderr
    own = sorted((tmp_path / "own").rglob("*.dcm"))
    assert len(own) == 2
    clinical.config["DicomModalities"] = {"synthnode": {
        "AET": "SYNTHNODE", "Host": "127.0.0.1", "Port": node.port, "AllowFind": True,
        "AllowGet": True}}
    clinical.start()
    try:
        upload(clinical, source)
        upload(clinical, own)
        backfill = [*SYNTHNODE, "--config", str(node.config), "mirror", "backfill", "--from",
                    "pacs", "--since", "2020-01-01", "--quiet"]  # shifted dates included
        done = subprocess.run(backfill, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 studies from pacs: 2 queued" in done.stdout
        wait_for(all_done(node, 2), what="both backfilled studies' jobs done")
        jobs = {j.study_uid: j for j in records(node)}
        own_study = str(dcmread(own[0], stop_before_pixels=True).StudyInstanceUID)
        skipped = jobs[own_study]
        assert skipped.outputs == 0
        assert [n for n in skipped.notes if "own output, not processed again" in n] != []
        assert len([n for n in skipped.notes if "own output" in n]) == 2
        mirrored = jobs[str(dcmread(source[0], stop_before_pixels=True).StudyInstanceUID)]
        assert mirrored.outputs == 2 and not mirrored.notes
        # Only the clinical study's two outputs reach the research archive.
        assert research.count_instances() == 2
        sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in own}
        assert not sent & {t["SOPInstanceUID"] for t in research_tags(research)}
    finally:
        clinical.stop(kill=True)


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def test_backfill_from_dicomweb_and_delivery_by_stow_rs_exactly_once(
    node_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clinical archive that speaks only DICOMweb (found by QIDO-RS, fetched by WADO-RS)
    mirrored into a research archive by STOW-RS: every series once, the planted identifiers
    nowhere in the research archive's storage or the logs, a re-run sending nothing."""
    password = "dicomweb-pw-1"
    monkeypatch.setenv(PASSWORD_ENV, password)
    web = {"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    clinical = OrthancProcess(tmp_path / "clinical-web", password=password)
    research = OrthancProcess(tmp_path / "research-web", aet="RESEARCH", password=password)
    destinations = "".join(
        f'[[destinations]]\nname = "{name}"\nkind = "dicomweb"\nurl = "{proc.url}/dicom-web"\n'
        f'username = "{proc.username}"\npassword_env = "{PASSWORD_ENV}"\n'
        for name, proc in (("clinical-web", clinical), ("research-web", research)))
    rules = destinations + f"""
[[rules]]
name = "mirror"
destinations = ["research-web"]
[rules.match]
source = ["backfill"]
[[rules.tasks]]
task = "deidentify"
options = {OPTIONS}
"""
    node = jobs_node(node_factory, tmp_path, None, rules=rules)
    study = make_planted_study(tmp_path / "in", n_series=3, per_series=2, seed=12)
    for proc in (clinical, research):
        proc.config.update(web)
        proc.start()
    try:
        upload(clinical, study.files)
        backfill = [*SYNTHNODE, "--config", str(node.config), "mirror", "backfill", "--from",
                    "clinical-web", "--since", "1900-01-01", "--quiet"]
        done = subprocess.run(backfill, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 studies from clinical-web: 1 queued" in done.stdout, done.stdout
        (job,) = records(node)
        assert job.source.kind.value == "dicomweb" and job.source.archive == "clinical-web"
        assert (job.state.value, job.outputs, job.attempts) == ("done", 6, 1)
        assert research.count_instances() == 6
        tags = research_tags(research)
        assert {t["Modality"] for t in tags} == {"CT", "MR", "US"}
        assert not {str(dcmread(p).SOPInstanceUID) for p in study.files} & {
            t["SOPInstanceUID"] for t in tags}
        stored = b"".join(p.read_bytes() for p in research.storage.rglob("*") if p.is_file())
        leaks = [x.where for x in study.planted if x.value.encode() in stored]
        assert not leaks, leaks
        assert not [d for d in study.dates if len(d) >= 8 and d.encode() in stored]
        logs = node.log() + research.log()
        assert not [x.where for x in study.planted
                    if x.value in logs and not x.where.startswith("UID")]
        assert password not in node.log()

        again = subprocess.run(backfill, capture_output=True, text=True, timeout=120)
        assert "0 queued, 1 done before" in again.stdout, again.stdout
        assert research.count_instances() == 6
    finally:
        clinical.stop(kill=True)
        research.stop(kill=True)
