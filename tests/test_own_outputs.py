"""The node's own outputs and their UIDs: outputs sent back to the node are recognised and never
routed again; two rules that make different objects of one image give them different UIDs, both
delivered; a delivery Orthanc answers "already stored" is checked against what was sent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.archives.orthanc import send_to_orthanc
from node.config import DeidOption, Settings
from node.deid import Deidentifier
from node.deid.batch import deidentify_to_bytes
from node.dicom import Pixels, SeriesSpec, build_sc, own_output
from node.jobs import JobState
from node.localorthanc import OrthancProcess, free_port
from tests.nodeproc import SYNTHNODE, make_study, sample_file, storescu
from tests.test_dispatch import settings_for
from tests.test_jobs import KEY, all_done, jobs_node, records, wait_for
from tests.test_sc_writer import DEID, IDENTITY, synthesis

TWO_VARIANTS = """
[[rules]]
name = "plain"
[[rules.tasks]]
task = "deidentify"

[[rules]]
name = "with-dates"
[[rules.tasks]]
task = "deidentify"
options = ["retain_longitudinal_full_dates"]
"""


def deid_settings(options: list[str]) -> Settings:
    return Settings.model_validate({"deid": {"key": KEY, "options": options,
                                             "detect_text": False}})


def test_outputs_carry_the_mark_and_nothing_else_does(tmp_path: Path) -> None:
    settings = deid_settings([])
    ct = dcmread(sample_file("CT_small.dcm"))
    pixels = Pixels(ct.pixel_array[None].astype(np.uint16), bits_stored=16)
    synthetic = build_sc([ct], pixels, synthesis(), settings.output, series=SeriesSpec("s", 9100))
    deid_sc = build_sc([ct], pixels, DEID, settings.output, identity=IDENTITY)
    deid, _ = deidentify_to_bytes(Deidentifier(settings.deid, settings.output),
                                  dcmread(sample_file("CT_small.dcm")), settings.deid.output)
    for output in (synthetic, deid_sc, deid):
        assert own_output(output, "synthnode")
        assert not own_output(output, "another-node")  # the mark is the manufacturer's
    assert not own_output(ct, "synthnode")  # a clinical image (with its own equipment items)
    # An image someone derives from an output (a new SOP Instance UID, the items copied) is a
    # new object: not the node's.
    derived = synthetic.copy()
    derived.SOPInstanceUID = generate_uid()
    assert not own_output(derived, "synthnode")
    # The mark survives a round trip through the file (what Orthanc keeps and sends).
    path = tmp_path / "out.dcm"
    deid.save_as(path, enforce_file_format=True)
    assert own_output(dcmread(path, stop_before_pixels=True), "synthnode")


def test_other_options_other_uids_the_study_and_pseudonym_shared() -> None:
    plain, dates = deid_settings([]), deid_settings(["retain_longitudinal_full_dates"])
    out = {}
    for name, settings in (("plain", plain), ("dates", dates), ("again", plain)):
        ds, _ = deidentify_to_bytes(Deidentifier(settings.deid, settings.output),
                                    dcmread(sample_file("CT_small.dcm")), settings.deid.output)
        out[name] = ds
    assert out["plain"].SOPInstanceUID != out["dates"].SOPInstanceUID
    assert out["plain"].SeriesInstanceUID != out["dates"].SeriesInstanceUID
    assert out["plain"].StudyInstanceUID == out["dates"].StudyInstanceUID
    assert out["plain"].FrameOfReferenceUID == out["dates"].FrameOfReferenceUID
    assert out["plain"].PatientID == out["dates"].PatientID
    assert out["plain"].SOPInstanceUID == out["again"].SOPInstanceUID  # deterministic
    assert DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in dates.deid.options


def test_already_stored_is_checked_against_what_was_sent(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    settings = settings_for(orthanc)
    ds = dcmread(sample_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    first, other = tmp_path / "first.dcm", tmp_path / "other.dcm"
    ds.save_as(first, enforce_file_format=True)
    ds.WindowCenter = 123  # other content under the same SOP Instance UID
    ds.save_as(other, enforce_file_format=True)

    (sent,) = send_to_orthanc([first], settings, job_id="job-1", task="deidentify")
    assert sent.ok and sent.reason == "", sent
    (clash,) = send_to_orthanc([other], settings, job_id="job-2", task="deidentify")
    assert not clash.ok and clash.attempts == 1, clash  # permanent: no retry mends it
    assert ds.SOPInstanceUID in clash.reason and "WindowCenter differs" in clash.reason
    assert "delete it from Orthanc" in clash.reason
    (again,) = send_to_orthanc([first], settings, job_id="job-1", task="deidentify")
    assert again.ok and again.reason == "already stored", again
    assert orthanc.count_instances() == 1
    # The clash left the stored object's marks alone.
    instance = orthanc.find_instance(str(ds.SOPInstanceUID))
    assert orthanc.request("GET", f"/instances/{instance}/metadata/SynthnodeJob") == b"job-1"


@pytest.mark.slow
def test_two_variants_delivered_and_own_outputs_sent_back_start_no_job(
    node_factory, tmp_path: Path
) -> None:
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", overrides={
        "DicomModalities": {"synthnode": ["SYNTHNODE", "127.0.0.1", node_port]}})
    orthanc.start()
    try:
        node = jobs_node(node_factory, tmp_path, orthanc, rules=TWO_VARIANTS,
                         node={"port": node_port}, deid={"detect_text": False})
        files = make_study(tmp_path / "in", per_series=2)
        assert storescu(node.port, files).returncode == 0
        wait_for(all_done(node, 2), what="the two de-identification jobs")

        # 1. Two rules, two objects per image, all four delivered: distinct SOP Instance UIDs
        # in one research study under one pseudonym.
        instances = orthanc.get_json("/instances?expand")
        assert len(instances) == 4
        tags = [i["MainDicomTags"] for i in instances]
        assert len({t["SOPInstanceUID"] for t in tags}) == 4
        (research_study,) = {orthanc.get_json(f"/instances/{i['ID']}/tags?short")["0020,000d"]
                             for i in instances}
        assert len({orthanc.get_json(f"/instances/{i['ID']}/tags?short")["0010,0020"]
                    for i in instances}) == 1
        # The same UIDs from another process (this one) with the same settings and key.
        stored = {t["SOPInstanceUID"] for t in tags}
        for options in ([], ["retain_longitudinal_full_dates"]):
            settings = deid_settings(options)
            for path in files:
                ds, _ = deidentify_to_bytes(Deidentifier(settings.deid, settings.output),
                                            dcmread(path), settings.deid.output)
                assert str(ds.SOPInstanceUID) in stored

        # 2. The same job run again (by hand; its outputs made anew): the same UIDs, "already
        # stored" with the same content, nothing duplicated.
        job = records(node)[0]
        subprocess.run([*SYNTHNODE, "--config", str(node.config), "jobs", "retry", job.id],
                       check=True, capture_output=True)
        wait_for(lambda: node.log().count(f"job {job.id} done in") == 2, what="the re-run")
        assert orthanc.count_instances() == 4
        assert next(j for j in records(node) if j.id == job.id).state is JobState.DONE

        # 3. The outputs sent back to the node from Orthanc by C-STORE, and a clinical study
        # beside them: the clinical one is routed, the outputs are not.
        answer = orthanc.request("POST", "/modalities/synthnode/store", json.dumps(
            {"Resources": [i["ID"] for i in instances], "Synchronous": True}).encode())
        assert json.loads(answer)["InstancesCount"] == 4
        clinical = make_study(tmp_path / "in2", per_series=1, patient_id="PID-0002")
        clinical_study = str(dcmread(clinical[0]).StudyInstanceUID)
        assert storescu(node.port, clinical).returncode == 0

        def handled() -> bool:
            notes = {s["study_uid"]: s.get("note") or "" for s in node.status()["studies"]}
            return ("not routed again" in notes.get(research_study, "")
                    and "2 jobs" in notes.get(clinical_study, ""))

        wait_for(handled, what="both studies handled by the router")
        jobs = records(node)
        assert len(jobs) == 4 and not any(j.study_uid == research_study for j in jobs)
        lines = [line for line in node.log().splitlines()
                 if research_study in line and "not routed again" in line]
        assert len(lines) == 1, lines
    finally:
        orthanc.stop(kill=True)


def test_the_variant_ignores_order_and_names_but_not_content() -> None:
    """Renaming a pixel rule or reordering a list changes no output UID (a PACS would get
    every study again otherwise); changing what a rule blanks does."""
    from node.config import DeidSettings, OutputSettings, PixelRule
    from node.deid.engine import variant_of

    rule = {"manufacturer": "ACME", "regions": [(0, 0, 10, 10)]}
    other = {"manufacturer": "X", "regions": [(1, 1, 2, 2)]}
    base = DeidSettings(key=KEY, burned_in_modalities=["US", "SC"],
                        pixel_rules=[PixelRule(name="acme-us", **rule),
                                     PixelRule(name="other", **other)])
    same = DeidSettings(key=KEY, burned_in_modalities=["SC", "US"],
                        pixel_rules=[PixelRule(name="other-renamed", **other),
                                     PixelRule(name="renamed", **rule)])
    moved = DeidSettings(key=KEY, burned_in_modalities=["US", "SC"],
                         pixel_rules=[PixelRule(name="acme-us", manufacturer="ACME",
                                                regions=[(0, 0, 20, 10)]),
                                      PixelRule(name="other", **other)])
    out = OutputSettings()
    assert variant_of(base, out) == variant_of(same, out)
    assert variant_of(base, out) != variant_of(moved, out)


def test_an_rt_structure_sets_study_reference_follows_the_study_uid() -> None:
    """RT Referenced Study Sequence holds the Study Instance UID as a Referenced SOP Instance
    UID: it is shared as the study's own UID is, so the reference still resolves."""
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    (study,) = frame.RTReferencedStudySequence
    study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    settings = deid_settings(["retain_longitudinal_full_dates"])
    out = Deidentifier(settings.deid, settings.output).deidentify(ds)
    (frame,) = out.ReferencedFrameOfReferenceSequence
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == out.StudyInstanceUID != ds.StudyInstanceUID
