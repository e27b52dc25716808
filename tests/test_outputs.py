"""Writer to Orthanc, end to end: what the node produces arrives tagged, marked and once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydicom import dcmread

from node.archives.orthanc import send_to_orthanc
from node.config import Settings
from node.dicom import Pixels, SeriesSpec, build_sc, save_checked
from node.localorthanc import OrthancProcess
from tests.nodeproc import sample_file
from tests.test_dispatch import settings_for
from tests.test_sc_writer import DEID, IDENTITY, synthesis


def produce(settings: Settings, folder: Path) -> list[Path]:
    """One synthetic and one de-identified output of the same CT, validated and saved."""
    ct = dcmread(sample_file("CT_small.dcm"))
    pixels = Pixels(ct.pixel_array[None].astype(np.uint16), bits_stored=16)
    outputs = [
        build_sc([ct], pixels, synthesis(), settings.output, series=SeriesSpec("synthetic", 9100)),
        build_sc([ct], pixels, DEID, settings.output, identity=IDENTITY),
    ]
    saved = [save_checked(ds, folder, settings.output, job_id="job-42") for ds in outputs]
    assert not any(s.quarantined for s in saved), [s.reason for s in saved]
    return [s.path for s in saved]


def tags(orthanc: OrthancProcess, instance: str) -> dict[str, str]:
    """Tags by number: Orthanc 1.10 predates Synthetic Data (0008,001C) and has no name for it,
    though it stores it."""
    return json.loads(orthanc.request("GET", f"/instances/{instance}/tags?short"))


def test_outputs_arrive_tagged_marked_and_once(orthanc: OrthancProcess, tmp_path: Path) -> None:
    settings = settings_for(orthanc)
    first = produce(settings, tmp_path / "run1")
    results = send_to_orthanc(first, settings, job_id="job-42", task="img2img")
    assert all(r.ok for r in results), results
    synthetic_id = orthanc.find_instance(dcmread(first[0]).SOPInstanceUID)
    deid_id = orthanc.find_instance(dcmread(first[1]).SOPInstanceUID)
    assert synthetic_id and deid_id
    synthetic = tags(orthanc, synthetic_id)
    assert (synthetic["0008,001c"], synthetic["0008,0064"]) == ("YES", "SYN")
    assert synthetic["0008,103e"] == "synthetic"
    deidentified = tags(orthanc, deid_id)
    assert deidentified["0012,0062"] == "YES"  # Patient Identity Removed
    assert deidentified["0010,0020"] == "ANON0001"
    for instance in (synthetic_id, deid_id):
        assert orthanc.request("GET", f"/instances/{instance}/metadata/SynthnodeJob") == b"job-42"
        assert orthanc.request("GET", f"/instances/{instance}/metadata/SynthnodeTask") == (
            b"img2img")
    # The same job again (a retry after a crash, say): the same UIDs, nothing duplicated.
    second = produce(settings, tmp_path / "run2")
    assert [p.name for p in second] == [p.name for p in first]
    results = send_to_orthanc(second, settings, job_id="job-42", task="img2img")
    assert all(r.ok and r.reason == "already stored" for r in results), results
    assert orthanc.count_instances() == 2
