"""The README's run command: ``synthnode demo`` runs the whole product on the embedded default."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.nodeproc import SYNTHNODE


def _demo(workdir: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*SYNTHNODE, "demo", "--workdir", str(workdir), "--timeout",
                          str(timeout_s)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _check_report(out: subprocess.CompletedProcess[str]) -> None:
    report = out.stdout.split("5. what arrived in Orthanc:")[1]
    assert "3 jobs done" in out.stdout
    assert report.count("task deidentify") == 2 and report.count("task img2img") == 1
    assert "Synthetic Data YES" in report and "Patient Identity Removed YES" in report
    assert "DEMO" not in report  # the sample patient's name and ID never reach Orthanc
    assert "stopped the node and Orthanc" in out.stdout


@pytest.mark.slow
def test_demo_shows_deidentified_and_synthetic_series_in_orthanc(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    first = _demo(workdir, 300)
    _check_report(first)
    # Stopped cleanly: the node's log ends with its shutdown summary, no traceback.
    log = (workdir / "node.log").read_text()
    assert "stopped:" in log and "Traceback" not in log

    # Again on the same folder: this run's jobs and outputs only (not the first run's, and no
    # wait for studies that are not this run's: a stuck wait fails at the 120 s timeout).
    second = _demo(workdir, 120)
    assert "cleared what the previous demo run left" in second.stdout
    assert "cleared" not in first.stdout
    _check_report(second)
    assert not _job_ids(first) & _job_ids(second)


def _job_ids(out: subprocess.CompletedProcess[str]) -> set[str]:
    """The job ids the report shows for the series in Orthanc."""
    ids = set(re.findall(r"  job (\S+)", out.stdout.split("5. what arrived in Orthanc:")[1]))
    assert ids
    return ids
