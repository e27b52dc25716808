"""The README's run command: ``synthnode demo`` runs the whole product on the embedded default."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.nodeproc import SYNTHNODE


@pytest.mark.slow
def test_demo_shows_deidentified_and_synthetic_series_in_orthanc(tmp_path: Path) -> None:
    out = subprocess.run([*SYNTHNODE, "demo", "--workdir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = out.stdout.split("5. what arrived in Orthanc:")[1]
    assert "3 jobs done" in out.stdout
    assert report.count("task deidentify") == 2 and report.count("task img2img") == 1
    assert "Synthetic Data YES" in report and "Patient Identity Removed YES" in report
    assert "DEMO" not in report  # the sample patient's name and ID never reach Orthanc
    assert "stopped the node and Orthanc" in out.stdout
    # Stopped cleanly: the node's log ends with its shutdown summary, no traceback.
    log = (tmp_path / "demo" / "node.log").read_text()
    assert "stopped:" in log and "Traceback" not in log
