"""The de-identified object is encoded once (node.deid.engine.Deidentifier._encoded_once): the
file bytes written, and every refusal with its reason, are exactly those of the two passes of
before (the leak scan of an encoding without the pixel data, then the encoding written), on
every corpus at hand: the planted-PHI studies and reports, with and without options, and every
DICOM file of pydicom's test data (character sets, sequences, private blocks, compressed and
odd files) under 2 MB."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_files

from node.config import DeidOption, DeidSettings, OutputSettings
from node.deid import DeidentificationError, Deidentifier, engine
from node.deid.encoding import write_file
from node.deid.engine import _save
from tests.phi_corpus import make_planted_sr, make_planted_study
from tests.test_deid import KEY

OPTION_SETS = [
    [DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES],
    [DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES, DeidOption.CLEAN_DESCRIPTORS,
     DeidOption.CLEAN_STRUCTURED_CONTENT, DeidOption.RETAIN_SAFE_PRIVATE],
    [DeidOption.RETAIN_UIDS, DeidOption.RETAIN_DEVICE_IDENTITY,
     DeidOption.RETAIN_INSTITUTION_IDENTITY],
]


def _outcome(deid: Deidentifier, path: Path, single: bool) -> tuple[str, bytes | str]:
    """("bytes", file bytes) or ("refused", reason) for ``path`` through ``deid``: one pass
    (``encode``, as the worker writes: the leak scan leaving plain elements unconverted, the
    file written by node.deid.encoding) or the two passes of before (the full leak scan, the
    file written by pydicom alone)."""
    try:
        source = dcmread(path)
        identifiers = deid.identifiers(source)
        output = deid.deidentify(source, in_place=True, identifiers=identifiers)
        if single:
            return "bytes", deid.encode(output, identifiers)
        deid.check_encoded(output, identifiers)
        buffer = BytesIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "write_file", lambda ds, f: False)
            _save(output, buffer)
        return "bytes", buffer.getvalue()
    except DeidentificationError as exc:
        return "refused", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - pydicom's own, for an odd test file
        return "error", type(exc).__name__


def _corpus(tmp_path: Path) -> list[Path]:
    files: list[Path] = []
    for seed in (1, 2, 3):
        study = make_planted_study(tmp_path / f"study{seed}", n_series=3, per_series=2,
                                   seed=seed)
        files += study.files
        files += make_planted_sr(tmp_path / f"sr{seed}", study=study, seed=seed).files
    found = {Path(p) for p in get_testdata_files("*") + get_charset_files("*")}
    files += sorted(p for p in found if p.is_file() and p.stat().st_size < 2 * 1024**2
                    and p.suffix.lower() not in (".json", ".txt", ".gz", ".bz2", ".py"))
    return files


@pytest.mark.parametrize("options", OPTION_SETS, ids=["modified-dates", "clean-all", "retain"])
def test_one_pass_writes_what_two_passes_wrote(tmp_path: Path,
                                               options: list[DeidOption]) -> None:
    deid = Deidentifier(DeidSettings(key=KEY, options=options, detect_text=False),
                        OutputSettings())
    files = _corpus(tmp_path)
    kinds = {"bytes": 0, "refused": 0, "error": 0}
    for path in files:
        before = _outcome(deid, path, single=False)
        after = _outcome(deid, path, single=True)
        assert after == before, path.name
        kinds[before[0]] += 1
    # the corpus exercises both written outputs and refusals
    assert kinds["bytes"] >= 40 and kinds["refused"] >= 3, kinds


def _written(path: Path, deid: Deidentifier | None, ours: bool) -> tuple[str, object]:
    """("bytes", ...) as node.deid.encoding (``ours``) or pydicom writes ``path``, as read or
    de-identified by ``deid``; ("error", kind) where writing raises; ("ours declined", None)
    where write_file leaves it to pydicom."""
    try:
        ds = dcmread(path)
        if deid is not None:
            ds = deid.deidentify(ds, in_place=True, identifiers=deid.identifiers(ds))
    except Exception:  # noqa: BLE001 - not this test's subject
        return "unreadable", None
    buffer = BytesIO()
    try:
        if ours:
            if not write_file(ds, buffer):
                return "ours declined", None
        else:
            ds.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - the same kind of error as pydicom's
        return "error", type(exc).__name__
    return "bytes", buffer.getvalue()


def test_the_fast_writer_writes_what_pydicom_writes(tmp_path: Path) -> None:
    """Every corpus file, as read and de-identified under each option set: where write_file
    takes it, its bytes (or its error) are pydicom's."""
    deids = [None] + [Deidentifier(DeidSettings(key=KEY, options=options, detect_text=False),
                                   OutputSettings()) for options in OPTION_SETS]
    taken = declined = 0
    for path in _corpus(tmp_path):
        for deid in deids:
            ours = _written(path, deid, ours=True)
            if ours[0] == "ours declined":
                declined += 1
                continue
            if ours[0] != "unreadable":
                taken += 1
            assert ours == _written(path, deid, ours=False), (path.name, deid is None)
    # the fast path is the common one (Explicit and Implicit VR Little Endian), not a rarity
    assert taken >= 150 and declined >= 10, (taken, declined)
