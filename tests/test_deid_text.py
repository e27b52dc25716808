"""Text burned into pixels, through the whole de-identification step, on a corpus built in code
(tests/text_corpus.py): every planted string hidden (its stroke pixels changed, and tesseract —
an OCR engine independent of the node's — reads none of it in the output), clean images
bit-identical, an allowlisted laterality marker kept, Burned In Annotation right, a document
that cannot be cleaned quarantined."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import DEFAULT_TEXT_ALLOWLIST, DeidSettings, OutputSettings, PixelRule
from node.deid import Deidentifier, Quarantined
from node.deid.pixels import SAMPLED_FRAMES, PixelVerdict, clean_pixels
from node.deid.text import Policy, TextFinder, TextKind, is_text
from node.pixeldata import decode_frames, store_frames
from tests import ocr
from tests.text_corpus import Case, Expect, build_corpus, text_mask

KEY = "text-key-Bq6Wm2Zr9Ln4Xv8Jt1Ks5Hp0Gd3Fy7Ce"
CHANGED = 0.98
"""Share of a planted string's stroke pixels that must differ in the output."""


@pytest.fixture(scope="module")
def corpus() -> list[Case]:
    return build_corpus("test")


@pytest.fixture(scope="module")
def deid() -> Deidentifier:
    return Deidentifier(DeidSettings(key=KEY), OutputSettings())


def _file(ds: Dataset) -> Dataset:
    """``ds`` as a receiving stage would have it: written and read back."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def _run(deid: Deidentifier, case: Case) -> tuple[Dataset, Dataset]:
    """(the source as read, the de-identified output as read back from its encoded bytes)."""
    source = _file(case.dataset)
    identifiers = deid.identifiers(source)
    out = deid.deidentify(_file(case.dataset))
    data = deid.encode(out, identifiers)
    return source, dcmread(BytesIO(data))


def _frames(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        arr = arr[None]
    return arr


def _changed(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    diff = before != after
    if diff.ndim == 4:
        diff = diff.any(axis=-1)
    return float(diff[:, mask].mean())


def _burned_into_clean_ct(corpus: list[Case], text: str, font: str, size: int, at: str
                          ) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """The clean CT with ``text`` burned in white: (data set, its frames, the strokes)."""
    (case,) = [c for c in corpus if c.name == "clean_ct"]
    ds = _file(case.dataset)
    frames, photometric = decode_frames(ds)
    mask = text_mask(frames.shape[1:3], text, font, size, at)
    frames[:, mask] = frames.max()
    store_frames(ds, frames, photometric)
    return ds, frames, mask


def _cases(corpus: list[Case], expect: Expect) -> list[Case]:
    chosen = [c for c in corpus if c.expect is expect]
    assert chosen, f"the corpus has no {expect} case"
    return chosen


def test_every_planted_string_is_hidden(corpus: list[Case], deid: Deidentifier) -> None:
    failures = []
    for case in _cases(corpus, Expect.HIDDEN):
        try:
            source, out = _run(deid, case)
        except Quarantined as exc:
            failures.append(f"{case.name}: quarantined: {exc}")
            continue
        before, after = _frames(source), _frames(out)
        for planted in case.planted:
            frames = list(planted.frames)
            share = _changed(before[frames], after[frames], planted.mask)
            if planted.keep:
                continue
            if share < CHANGED:
                failures.append(f"{case.name}: {planted.text!r}: {share:.0%} of its strokes "
                                "changed")
        if out.BurnedInAnnotation != ("YES" if any(p.keep for p in case.planted) else "NO"):
            failures.append(f"{case.name}: Burned In Annotation {out.BurnedInAnnotation}")
    assert not failures, "\n".join(failures)


def test_an_independent_ocr_reads_none_of_them(corpus: list[Case], deid: Deidentifier) -> None:
    """tesseract, on its own rendering, reads planted strings in the inputs (so this test can
    fail) and none of them in the outputs."""
    read_before, left = [], []
    for case in _cases(corpus, Expect.HIDDEN):
        source, out = _run(deid, case)
        before, after = ocr.display(source), ocr.display(out)
        for planted in case.planted:
            if planted.keep:
                continue
            frame = planted.frames[0]
            if ocr.reads(planted.text, ocr.read(before[frame], planted.box)):
                read_before.append(f"{case.name}: {planted.text}")
            if ocr.reads(planted.text, ocr.read(after[frame], planted.box)):
                left.append(f"{case.name}: {planted.text!r}")
    assert len(read_before) >= 20, f"tesseract reads too few inputs to judge: {read_before}"
    assert not left, left


def test_clean_images_keep_their_pixel_data_bytes(corpus: list[Case],
                                                  deid: Deidentifier) -> None:
    for case in _cases(corpus, Expect.CLEAN):
        source, out = _run(deid, case)
        assert out.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, case.name
        assert out.PixelData == source.PixelData, case.name
        assert out.BurnedInAnnotation == "NO", case.name


def test_a_laterality_marker_is_kept_and_marked(corpus: list[Case], deid: Deidentifier) -> None:
    for case in _cases(corpus, Expect.KEPT):
        source, out = _run(deid, case)
        assert out.PixelData == source.PixelData, case.name
        assert out.BurnedInAnnotation == "YES", case.name  # allowlisted text remains


def test_text_that_cannot_be_hidden_is_quarantined(corpus: list[Case],
                                                   deid: Deidentifier) -> None:
    for case in _cases(corpus, Expect.QUARANTINE):
        with pytest.raises(Quarantined, match="a document|text covers") as caught:
            _run(deid, case)
        # the reason names regions, never what was read: none of the patient's values
        ds = case.dataset
        values = [*str(ds.PatientName).split("^"), str(ds.PatientID), str(ds.PatientBirthDate),
                  str(ds.get("AccessionNumber", "")), str(ds.get("InstitutionName", ""))]
        assert not [v for v in values if len(v) >= 3 and v in str(caught.value)]


def test_identifying_text_is_hidden_even_when_allowlisted(corpus: list[Case]) -> None:
    """"LONG" is an allowlisted view word; burned into the image of a patient named LONG it
    is the patient's name, and the header wins."""
    ds, frames, mask = _burned_into_clean_ct(corpus, "LONG", "bold", 18, "tr")
    ds.PatientName = "MILLER^ANNA"
    kept = Deidentifier(DeidSettings(key=KEY), OutputSettings()).deidentify(_file(ds))
    assert _changed(frames, _frames(kept), mask) == 0 and kept.BurnedInAnnotation == "YES"
    ds.PatientName = "LONG^ANNA"
    hidden = Deidentifier(DeidSettings(key=KEY), OutputSettings()).deidentify(_file(ds))
    assert _changed(frames, _frames(hidden), mask) >= CHANGED
    assert hidden.BurnedInAnnotation == "NO"


def test_detection_off_leaves_pixels_to_the_rules(corpus: list[Case]) -> None:
    case = _cases(corpus, Expect.HIDDEN)[0]
    settings = DeidSettings(key=KEY, detect_text=False, burned_in_modalities=[])
    source = _file(case.dataset)
    out = Deidentifier(settings, OutputSettings()).deidentify(_file(case.dataset))
    assert out.PixelData == source.PixelData


def test_a_long_cine_is_searched_on_a_sample_and_verified_in_every_frame(
    corpus: list[Case],
) -> None:
    (case,) = [c for c in corpus if c.name == "us_cine_rle"]
    source = _file(case.dataset)
    frames, _ = decode_frames(source)
    long = np.concatenate([frames, frames, frames])[:20]  # the header in all 20 frames
    cine = _file(case.dataset)
    cine.NumberOfFrames = len(long)
    store_frames(cine, long, "RGB")
    searched: list[int] = []

    class Counting(TextFinder):  # the real finder, counting the frames it is shown
        def lines(self, stacked: np.ndarray) -> list[tuple[np.ndarray, float]]:
            searched.append(1)
            return super().lines(stacked)

    settings = DeidSettings(key=KEY)
    identifiers = Deidentifier(settings, OutputSettings()).identifiers(source)
    result = clean_pixels(cine, settings, identifiers=identifiers, finder=Counting())
    assert result.verdict is PixelVerdict.CLEANED and result.verified
    after, _ = decode_frames(cine)
    for planted in case.planted:
        assert _changed(long, after, planted.mask) >= CHANGED, planted.text
    assert len(searched) == SAMPLED_FRAMES + len(long)  # a sample, then every frame


def test_pixel_rules_combine_with_detection(corpus: list[Case]) -> None:
    """A device rule blanks its rectangle exactly; detection still hides the rest."""
    (case,) = [c for c in corpus if c.name == "ct_corner_name"]
    box = (200, 480, 60, 20)
    rule = PixelRule(name="ct footer", regions=[box])
    ds = _file(case.dataset)
    before, _ = decode_frames(ds)
    settings = DeidSettings(key=KEY, pixel_rules=[rule])
    result = clean_pixels(ds, settings,
                          identifiers=Deidentifier(settings, OutputSettings()).identifiers(ds))
    assert result.verdict is PixelVerdict.CLEANED and result.rule == "ct footer"
    after, _ = decode_frames(ds)
    x, y, w, h = box
    assert (after[:, y:y + h, x:x + w] == after.min()).all()
    for planted in case.planted:
        assert _changed(before, after, planted.mask) >= CHANGED, planted.text


def test_detection_can_be_turned_off_per_modality(corpus: list[Case]) -> None:
    us = next(c for c in corpus if c.name == "us_rgb_header")
    ct = next(c for c in corpus if c.name == "ct_corner_name")
    settings = DeidSettings(key=KEY, detect_text_skip_modalities=["US"])
    deid = Deidentifier(settings, OutputSettings())
    with pytest.raises(Quarantined, match="text detection is off"):
        deid.deidentify(_file(us.dataset))  # US falls back to burned_in_modalities
    source = _file(ct.dataset)
    out = deid.deidentify(_file(ct.dataset))
    assert out.PixelData != source.PixelData and out.BurnedInAnnotation == "NO"


def test_text_of_any_script_is_hidden(corpus: list[Case]) -> None:
    """A name in Cyrillic letters is text like any other: hidden."""
    ds, frames, mask = _burned_into_clean_ct(corpus, "ИВАНОВ ИВАН", "sans", 16, "tl")
    out = Deidentifier(DeidSettings(key=KEY), OutputSettings()).deidentify(_file(ds))
    assert _changed(frames, _frames(out), mask) >= CHANGED
    assert out.BurnedInAnnotation == "NO"


def test_without_verification_burned_in_annotation_is_never_no(corpus: list[Case]) -> None:
    case = next(c for c in corpus if c.name == "ct_corner_name")
    settings = DeidSettings(key=KEY, verify_text=False)
    ds = _file(case.dataset)
    identifiers = Deidentifier(settings, OutputSettings()).identifiers(ds)
    result = clean_pixels(ds, settings, identifiers=identifiers)
    assert result.verdict is PixelVerdict.CLEANED and not result.verified
    assert ds.BurnedInAnnotation == "YES" and "not verified" in result.reason


@pytest.mark.parametrize(("text", "shape", "kind"), [
    ("L", 1.2, TextKind.ALLOWED),             # a laterality marker
    ("2 cm", 2.5, TextKind.ALLOWED),          # a ruler label
    ("AP SUPINE", 5.0, TextKind.ALLOWED),
    ("L", 10.0, TextKind.OTHER),              # a long line read as "L": not what is there
    ("45 F", 2.5, TextKind.OTHER),            # age and sex
    ("12 03 80", 4.0, TextKind.OTHER),        # a date with spaces
    ("12,03,1980", 5.0, TextKind.OTHER),
    ("L 张三", 3.0, TextKind.OTHER),           # a marker beside a name in another script
    ("LONG", 3.0, TextKind.IDENTIFYING),      # allowlisted, but the patient's name
])
def test_what_read_text_is(text: str, shape: float, kind: TextKind) -> None:
    source = Dataset()
    source.PatientName = "LONG^ANNA"
    identifiers = Deidentifier(DeidSettings(key=KEY), OutputSettings()).identifiers(source)
    policy = Policy(DEFAULT_TEXT_ALLOWLIST, identifiers)
    assert is_text(text, 0.97, 0.95, shape)  # read with confidence: text, whatever its shape
    assert policy.kind(text, 0.97, shape) is kind
