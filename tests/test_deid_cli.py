"""``synthnode deidentify`` end to end: planted identifiers never survive, bad files never stop
the others, the honest broker keeps the mapping apart."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from pydicom import dcmread

from node.dicom import validate_file
from tests.nodeproc import SYNTHNODE, make_study, sample_file, write_config
from tests.phi_corpus import make_planted_sr, make_planted_study

KEY = "cli-key-Rw3Jt8Zq1Mv6Xp0Ln5Hb9Ks2Gd7Fy4Ce"


def deidentify(
    paths: list[Path], out: Path, tmp: Path, **deid: object
) -> subprocess.CompletedProcess[str]:
    cfg = write_config(tmp / f"deid-{len(list(tmp.glob('deid-*.toml')))}.toml", {
        "output": {"quarantine_dir": str(tmp / "quarantine")},
        "deid": {"options": ["retain_longitudinal_modified_dates", "clean_descriptors",
                             "clean_structured_content"], **deid},
    })
    return subprocess.run(
        [*SYNTHNODE, "--config", str(cfg), "deidentify", *map(str, paths), "--out", str(out),
         "--workers", "2", "--quiet"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, SYNTHNODE__DEID__KEY=KEY),
    )


def outputs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


UIDS = {"study_instance_uid": "StudyInstanceUID", "series_instance_uid": "SeriesInstanceUID",
        "sop_instance_uid": "SOPInstanceUID", "frame_of_reference_uid": "FrameOfReferenceUID"}


def check_broker(broker: Path, sources: list[Path], written: list[Path]) -> None:
    """One line per written instance; each maps the source's patient and UIDs to those the
    output file holds, and nothing else is in it."""
    assert stat.S_IMODE(broker.stat().st_mode) == 0o600
    lines = [json.loads(x) for x in broker.read_text().splitlines()]
    before = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, sources)}
    after = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, written)}
    assert len(lines) == len(written)
    assert {x["new_sop_instance_uid"] for x in lines} == set(after)
    for line in lines:
        src, out = before[line["sop_instance_uid"]], after[line["new_sop_instance_uid"]]
        assert set(line) == {"patient_id", "patient_name", "pseudonym", "pseudonym_name",
                             *UIDS, *(f"new_{k}" for k in UIDS)}
        assert (line["patient_id"], line["patient_name"]) == (src.PatientID, str(src.PatientName))
        assert (line["pseudonym"], line["pseudonym_name"]) == (out.PatientID, str(out.PatientName))
        for field, keyword in UIDS.items():
            assert line[field] == src.get(keyword), field
            assert line[f"new_{field}"] == out.get(keyword), field
        assert line["study_instance_uid"] != line["new_study_instance_uid"]


def test_no_planted_value_survives(tmp_path: Path) -> None:
    study = make_planted_study(tmp_path / "in" / "study", seed=3)
    sr = make_planted_sr(tmp_path / "in" / "sr", study=study, seed=3)
    res = deidentify([tmp_path / "in"], tmp_path / "out", tmp_path)
    written = outputs(tmp_path / "out")
    assert len(written) == len(study.files) + len(sr.files), res.stdout + res.stderr
    blobs = {p: p.read_bytes() for p in written}
    planted = study.planted + sr.planted
    assert len(planted) > 200
    survivors = [(x.where, p.name) for x in planted for p, data in blobs.items()
                 if x.value.encode() in data]
    assert not survivors, survivors
    dates = [d for d in study.dates + sr.dates if len(d) >= 8]
    assert not [(d, p.name) for d in dates for p, data in blobs.items() if d.encode() in data]
    for path in written:
        ds = dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        verdict = validate_file(path)
        assert verdict.ok, (path.name, verdict.errors)
    # The command's own output names no planted value either.
    assert not [x.where for x in planted if x.value in res.stdout + res.stderr]


def test_bad_files_are_reported_and_the_rest_written(tmp_path: Path) -> None:
    good = make_study(tmp_path / "in" / "ct", per_series=3, patient_id="PID-4242")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    truncated = tmp_path / "in" / "cut.dcm"
    truncated.write_bytes(good[0].read_bytes()[:300])
    us = tmp_path / "in" / "us.dcm"
    us.write_bytes(sample_file("US1_UNCR.dcm").read_bytes())  # burned-in text, no pixel rule
    broker = tmp_path / "secret" / "broker.jsonl"
    # text detection off: the ultrasound falls back to "no rule for burned-in text"
    res = deidentify([tmp_path / "in"], tmp_path / "out", tmp_path,
                     honest_broker_file=str(broker), detect_text=False)
    assert res.returncode == 1
    assert "3 written" in res.stdout and "1 quarantined" in res.stdout
    assert "2 unreadable" in res.stdout
    assert f"quarantined: {us}: burned-in annotation likely" in res.stdout
    assert f"unreadable: {tmp_path / 'in' / 'notes.txt'}: not a DICOM file" in res.stdout
    assert "PID-4242" not in res.stdout + res.stderr
    written = outputs(tmp_path / "out")
    assert len(written) == 3
    assert all(b"PID-4242" not in p.read_bytes() for p in written)
    # Outputs are named by their new UIDs, never by input names.
    assert all(p.stem == str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in written)
    # The honest broker: mode 0600, one line per instance (every UID kind, the patient's ID
    # and name), the same after a re-run.
    check_broker(broker, good, written)
    assert all(dcmread(p).get("FrameOfReferenceUID") for p in good)  # CT: all four kinds
    lines = broker.read_text()
    # (the same settings: text detection is one of those that make another variant)
    again = deidentify([tmp_path / "in" / "ct"], tmp_path / "out2", tmp_path,
                       honest_broker_file=str(broker), detect_text=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [p.name for p in outputs(tmp_path / "out2")] == [p.name for p in written]
    assert broker.read_text() == lines


def test_secondary_capture_output(tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", per_series=2, source="emri_small.dcm")
    broker = tmp_path / "broker.jsonl"
    res = deidentify(files, tmp_path / "out", tmp_path, output="sc",
                     honest_broker_file=str(broker))
    written = outputs(tmp_path / "out")
    assert len(written) == 2, res.stdout + res.stderr
    check_broker(broker, files, written)  # the SC writer's UIDs, as written
    for path in written:
        ds = dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word
        assert ds.PatientIdentityRemoved == "YES"
        assert validate_file(path).ok


def test_missing_key_stops_before_any_work(tmp_path: Path) -> None:
    (path,) = make_study(tmp_path / "in")
    res = subprocess.run([*SYNTHNODE, "deidentify", str(path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if "DEID" not in k})
    assert res.returncode == 2
    assert "SYNTHNODE__DEID__KEY" in res.stderr
    assert not (tmp_path / "out").exists() or not outputs(tmp_path / "out")
