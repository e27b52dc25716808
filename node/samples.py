"""Sample studies made from pydicom's test files, for ``synthnode demo``, the tests and the
benchmarks: copies of one file under new UIDs and a made-up identity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

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
