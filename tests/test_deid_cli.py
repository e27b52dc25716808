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

KEY = "k" * 40


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
    # The honest broker: mode 0600, one line per patient and study, the same after a re-run.
    assert stat.S_IMODE(broker.stat().st_mode) == 0o600
    lines = [json.loads(x) for x in broker.read_text().splitlines()]
    pseudonym = str(dcmread(written[0]).PatientID)
    assert lines == [{"patient_id": "PID-4242", "pseudonym": pseudonym,
                      "study_instance_uid": str(dcmread(good[0]).StudyInstanceUID),
                      "new_study_instance_uid": str(dcmread(written[0]).StudyInstanceUID)}]
    again = deidentify([tmp_path / "in" / "ct"], tmp_path / "out2", tmp_path,
                       honest_broker_file=str(broker))
    assert again.returncode == 0, again.stdout + again.stderr
    assert [p.name for p in outputs(tmp_path / "out2")] == [p.name for p in written]
    assert len(broker.read_text().splitlines()) == 1


def test_secondary_capture_output(tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", per_series=2, source="emri_small.dcm")
    res = deidentify(files, tmp_path / "out", tmp_path, output="sc")
    written = outputs(tmp_path / "out")
    assert len(written) == 2, res.stdout + res.stderr
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
