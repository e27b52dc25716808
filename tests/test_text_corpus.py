"""The burned-in text corpus holds what it says: strokes where the masks are, headers that match
the text, the intended transfer syntaxes, files pydicom reads back, the same bytes every build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.text_corpus import Case, Expect, build_corpus, ring, write_corpus


@pytest.fixture(scope="module")
def corpus() -> list[Case]:
    return build_corpus()


@pytest.fixture(scope="module")
def files(corpus: list[Case], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(corpus, tmp_path_factory.mktemp("text-corpus"))


def grey(ds: Dataset) -> np.ndarray:
    """Stored values as one float grey level per pixel, with a frame axis (brighter = higher,
    MONOCHROME1 turned around)."""
    arr = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim > 2 and arr.shape[-1] == 3 and (
            ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"):
        arr = arr.astype(float) @ np.array([0.299, 0.587, 0.114])
    arr = arr.astype(float).reshape((int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns))
    return -arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr




def test_the_corpus_has_every_kind_of_case(corpus: list[Case]) -> None:
    assert 25 <= len(corpus) <= 35
    assert len({c.name for c in corpus}) == len(corpus)
    assert {c.expect for c in corpus} == set(Expect)
    assert {c.transfer_syntax for c in corpus} == {
        ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless,
        JPEGBaseline8Bit}
    kinds = {(c.dataset.Modality, c.dataset.PhotometricInterpretation) for c in corpus}
    assert {("CR", "MONOCHROME1"), ("DX", "MONOCHROME2"), ("CT", "MONOCHROME2"),
            ("MR", "MONOCHROME2"), ("US", "PALETTE COLOR"), ("US", "RGB"),
            ("OT", "RGB")} <= kinds
    assert any(int(c.dataset.get("NumberOfFrames", 1)) >= 8 and c.planted for c in corpus)
    clean = {c.dataset.Modality for c in corpus if c.expect is Expect.CLEAN}
    assert {"CR", "DX", "CT", "MR", "US", "OT"} <= clean
    assert len({c.transfer_syntax for c in corpus if c.expect is Expect.CLEAN}) >= 5


def test_expectations_match_what_was_planted(corpus: list[Case]) -> None:
    for case in corpus:
        hidden = [p for p in case.planted if not p.keep]
        kept = [p for p in case.planted if p.keep]
        assert all(p.text in ("L", "R") for p in kept), case.name
        if case.expect is Expect.CLEAN:
            assert not case.planted, case.name
        elif case.expect is Expect.KEPT:
            assert kept and not hidden, case.name
        else:
            assert hidden, case.name
    form = next(c for c in corpus if c.expect is Expect.QUARANTINE)
    rows = np.zeros(form.dataset.Rows, bool)
    for p in form.planted:
        rows[p.box[1]: p.box[1] + p.box[3]] = True
    assert len(form.planted) >= 12 and rows.mean() > 0.2


def test_planted_text_repeats_the_header(corpus: list[Case]) -> None:
    for case in (c for c in corpus if c.expect is Expect.HIDDEN):
        ds = case.dataset
        family, given = str(ds.PatientName).split("^")
        birth = ds.PatientBirthDate
        header = {str(ds.PatientName), f"{family}, {given}", ds.PatientID, birth,
                  f"{birth[4:6]}/{birth[6:]}/{birth[:4]}", ds.AccessionNumber, ds.InstitutionName}
        assert any(v in p.text for p in case.planted for v in header), case.name
    cr = [c for c in corpus if c.dataset.Modality == "CR"]
    assert cr and all("BurnedInAnnotation" not in c.dataset for c in cr)
    first = next(c for c in cr if c.expect is Expect.HIDDEN)
    assert first.planted[0].text == "DOE^JANE  MRN 1234567" and first.planted[0].box[:2] < (
        40, 40)
    texts = " ".join(p.text for c in corpus for p in c.planted)
    assert "Dr SMITH" in texts and "2024-03-05" in texts


def test_masks_lie_in_their_boxes_and_strokes_stand_out(
    corpus: list[Case], files: dict[str, Path]
) -> None:
    for case in corpus:
        if not case.planted:
            continue
        ds = dcmread(files[case.name])
        values = grey(ds)
        # The displayed range: the window's width in stored values, else the stored spread.
        if "WindowWidth" in ds:
            span = float(ds.WindowWidth) / float(ds.get("RescaleSlope", 1))
        else:
            span = float(np.percentile(values, 99.5) - np.percentile(values, 0.5))
        for p in case.planted:
            x, y, w, h = p.box
            assert p.mask.shape == (ds.Rows, ds.Columns)
            assert p.mask.any() and p.mask[y: y + h, x: x + w].sum() == p.mask.sum()
            assert p.mask[y].any() and p.mask[y + h - 1].any()
            assert p.mask[:, x].any() and p.mask[:, x + w - 1].any()
            near = ring(p.mask)
            for f in p.frames:
                inside, around = values[f][p.mask].mean(), values[f][near].mean()
                assert abs(inside - around) > 0.04 * span, (case.name, p.text, f)


def test_files_round_trip_in_their_transfer_syntax(
    corpus: list[Case], files: dict[str, Path]
) -> None:
    for case in corpus:
        ds = dcmread(files[case.name])
        assert ds.file_meta.TransferSyntaxUID == case.transfer_syntax, case.name
        assert ds.SOPInstanceUID.startswith("2.25.")
        assert ds.PixelData == case.dataset.PixelData
        np.testing.assert_array_equal(ds.pixel_array, case.dataset.pixel_array)
    assert len({dcmread(f).SOPInstanceUID for f in files.values()}) == len(files)


def test_lossless_cases_hold_the_ink_exactly(corpus: list[Case]) -> None:
    """Where text was drawn white or black, a lossless file stores exactly one value."""
    case = next(c for c in corpus if c.name == "cr_header_name_mrn")
    arr = case.dataset.pixel_array
    assert len(np.unique(arr[case.planted[0].mask])) == 1
    cine = next(c for c in corpus if c.name == "us_cine_rle")
    frames = cine.dataset.pixel_array
    for p in cine.planted:
        assert p.frames == tuple(range(frames.shape[0]))
        assert (frames[:, p.mask] == 255).all()


def test_the_same_corpus_every_build(corpus: list[Case]) -> None:
    again = build_corpus()
    assert [c.name for c in again] == [c.name for c in corpus]
    for a, b in zip(corpus, again, strict=True):
        assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
        assert a.dataset.PixelData == b.dataset.PixelData, a.name


def test_every_input_is_a_valid_object(files: dict[str, Path]) -> None:
    """dciodvfy finds no error: a node that validates its outputs holds nothing back for what
    the corpus lacks."""
    from node.dicom import validate_file

    try:
        errors = {name: validate_file(path).errors for name, path in files.items()}
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert not {name: e for name, e in errors.items() if e}
