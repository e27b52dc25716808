"""Sample studies made from pydicom's test files, for ``synthnode demo``, the tests and the
benchmarks: copies of one file under new UIDs and a made-up identity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def sample_file(name: str) -> Path:
    """A pydicom test file (pydicom's own, or pydicom-data's); FileNotFoundError if absent."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed (pydicom-data?)")
    return Path(str(path))


def save_copies(ds: Dataset, count: int, path_of: Callable[[int], Path]) -> list[Path]:
    """``count`` copies of ``ds``, copy i saved as ``path_of(i)`` with a new SOP Instance UID
    and Instance Number i + 1 (``ds`` keeps the last copy's); their paths."""
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = path_of(i)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_study(
    folder: Path, source: str = "CT_small.dcm", series: int = 1, per_series: int = 1,
    patient_name: str = "Doe^Jane", patient_id: str = "PID-0001",
    modalities: tuple[str, ...] = (), attributes: Mapping[str, object] | None = None,
) -> list[Path]:
    """Copies of a pydicom test file as one study: new UIDs, the given identity and
    ``attributes`` (by keyword); series ``s`` gets Modality ``modalities[s]`` when given.
    Files ``s<series>_i<instance>.dcm``."""
    folder.mkdir(parents=True, exist_ok=True)
    template = dcmread(sample_file(source))
    study_uid = generate_uid()
    paths = []
    for s in range(series):
        ds: Dataset = template.copy()
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        for keyword, value in (attributes or {}).items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = s + 1
        if s < len(modalities):
            ds.Modality = modalities[s]
        names = [folder / f"s{s:02d}_i{i:04d}.dcm" for i in range(per_series)]
        paths += save_copies(ds, per_series, names.__getitem__)
    return paths


FINDINGS = ("no acute cardiopulmonary process", "small left pleural effusion",
            "right upper lobe opacity", "cardiomegaly without edema")
"""The findings :func:`phantom_radiograph` can draw, by number."""


def phantom_radiograph(rng: np.random.Generator, size: int = 64, finding: int = 0) -> np.ndarray:
    """A phantom chest radiograph in [0, 1] (rows, cols): body, two lungs, ribs, a finding."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = np.zeros((size, size))
    a, b = rng.uniform(0.7, 0.95), rng.uniform(0.75, 0.95)
    img[(x / a) ** 2 + (y / b) ** 2 < 1] = 0.6
    for s in (-1, 1):
        cx, cy = s * rng.uniform(0.3, 0.45), rng.uniform(-0.2, 0.1)
        lung = ((x - cx) / rng.uniform(0.2, 0.3)) ** 2 + ((y - cy) / rng.uniform(0.4, 0.6)) ** 2
        img[lung < 1] = 0.25
    for k in range(int(rng.integers(4, 8))):
        yy = -0.6 + k * 0.2 + rng.uniform(-0.05, 0.05)
        img[np.abs(y - yy - 0.1 * x ** 2) < 0.03] += 0.2
    if finding == 1:  # effusion: the lower left lung whitens
        img[(x > 0.1) & (y > 0.25) & (img < 0.3)] = 0.55
    elif finding == 2:  # an opacity in the right upper lobe
        img[((x + 0.35) ** 2 + (y + 0.25) ** 2) < 0.02] = 0.7
    elif finding == 3:  # a large heart
        img[((x - 0.05) / 0.35) ** 2 + ((y - 0.3) / 0.25) ** 2 < 1] = 0.65
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1)
