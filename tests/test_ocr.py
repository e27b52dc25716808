"""The independent text oracle: its rendering shows what a viewer shows, tesseract reads the
planted text in the corpus's inputs, and reads none of it where nothing was drawn."""

from __future__ import annotations

import numpy as np
import pytest

from tests import ocr
from tests.text_corpus import Case, Expect, build_corpus

READ_AT_LEAST = 36
"""Of the 41 identifying strings planted in the HIDDEN cases (measured: 38; the misses are
low-contrast text over texture, which tesseract does not read here: a CT's two strings at +15 %
and +12 % of the window, and one of the chest's two at +10 %). The form's 17 lines are read
too (17 of 17 region by region, measured)."""


@pytest.fixture(scope="module")
def corpus() -> dict[str, Case]:
    return {c.name: c for c in build_corpus()}


def test_display_shows_ink_as_a_viewer_would(corpus: dict[str, Case]) -> None:
    cr = corpus["cr_header_name_mrn"]  # MONOCHROME1, black ink
    frame = ocr.display(cr.dataset)[0]
    assert frame.dtype == np.uint8 and frame.shape == (cr.dataset.Rows, cr.dataset.Columns)
    assert frame[cr.planted[0].mask].max() < 20
    ct = corpus["ct_corner_name"]  # signed, rescaled, windowed 40/400; white ink
    assert (ocr.display(ct.dataset)[0][ct.planted[0].mask] == 255).all()
    assert ocr.display(ct.dataset)[0][200:300, 200:300].std() > 10  # anatomy, not saturated
    palette = corpus["us_palette_header"]
    assert (ocr.display(palette.dataset)[0][palette.planted[0].mask] == 255).all()
    cine = corpus["us_cine_rle"]
    frames = ocr.display(cine.dataset)
    assert len(frames) == int(cine.dataset.NumberOfFrames)
    assert all((f[cine.planted[0].mask] == 255).all() for f in frames)


def test_reads_matches_tokens_and_near_misses() -> None:
    assert ocr.tokens("DOE^JANE  MRN 1234567") == ["DOE", "JANE", "MRN", "1234567"]
    assert ocr.reads("DOE^JANE", "doe, jane")
    assert ocr.reads("DOB 01/01/1980", "1980")
    assert ocr.reads("A10042917", "10042917")  # one character lost
    assert ocr.reads("19920229", "39920229")  # one character wrong
    assert not ocr.reads("19920229", "39920Z2S")
    assert not ocr.reads("Dr SMITH", "Dr sityl")
    assert not ocr.reads("DOE^JANE", "")


def test_tesseract_reads_the_planted_text_of_the_inputs(corpus: dict[str, Case]) -> None:
    read, missed = 0, []
    for case in corpus.values():
        if case.expect is not Expect.HIDDEN:
            continue
        frame = ocr.display(case.dataset)[0]
        for p in case.planted:
            if p.keep:
                continue
            if ocr.reads(p.text, ocr.read(frame, p.box)):
                read += 1
            else:
                missed.append(f"{case.name}: {p.text}")
    assert read + len(missed) == 41
    assert read >= READ_AT_LEAST, missed
    assert all("lowcontrast" in m for m in missed), missed


def test_tesseract_reads_the_form_and_the_whole_frame(corpus: dict[str, Case]) -> None:
    form = corpus["sc_requisition_form"]
    text = ocr.read(ocr.display(form.dataset)[0])
    assert sum(ocr.reads(p.text, text) for p in form.planted) >= 15
    us = corpus["us_rgb_header"]
    text = ocr.read(ocr.display(us.dataset)[0])
    assert all(ocr.reads(p.text, text) for p in us.planted)


def test_tesseract_reads_nothing_where_nothing_was_drawn(corpus: dict[str, Case]) -> None:
    """The planted boxes, read in the same image without the text."""
    pairs = [("cr_header_name_mrn", "clean_cr"), ("ct_corner_name", "clean_ct"),
             ("us_rgb_header", "clean_us_rgb"), ("dx_institution_vertical_id", "clean_dx_rle")]
    for texted, clean in pairs:
        frame = ocr.display(corpus[clean].dataset)[0]
        for p in corpus[texted].planted:
            assert not ocr.reads(p.text, ocr.read(frame, p.box)), (clean, p.text)
