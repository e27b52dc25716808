"""Clean Pixel Data with text detection off: rules blank exactly their rectangles, in every
frame, black on screen; unmatched burned-in images are held back; outputs keep their transfer
syntax where it is lossless, and are decodable and valid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from node.config import DeidSettings, PixelRule
from node.deid.pixels import (
    PixelDataError,
    PixelVerdict,
    Region,
    check_rules,
    clean_pixels,
    likely_recognizable,
    match_rule,
)
from node.dicom import validate_file
from tests.nodeproc import frames_of, sample_file

KEY = "pixel-key-Hn4Vb8Zq2Lr6Tx1Pm5Kw9Jc3Gy7Fd0Ae"
BOX = (10, 20, 30, 15)  # x (column), y (row), width, height


def settings(*rules: PixelRule, **deid: object) -> DeidSettings:
    """Rules alone (text detection off: it is tested in test_deid_text.py)."""
    deid.setdefault("detect_text", False)
    return DeidSettings(key=KEY, pixel_rules=list(rules), **deid)


def rule(name: str = "box", regions: list[tuple[int, int, int, int]] | None = None,
         **criteria: object) -> PixelRule:
    return PixelRule(name=name, regions=regions or [BOX], **criteria)


def read(name: str) -> Dataset:
    return dcmread(sample_file(name))



def inside(box: Region, rows: int, columns: int) -> np.ndarray:
    x, y, w, h = box
    mask = np.zeros((rows, columns), dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


def roundtrip(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path)


def assert_blanked(before: np.ndarray, after: np.ndarray, box: Region, black: int) -> None:
    mask = inside(box, before.shape[1], before.shape[2])
    assert before.shape == after.shape and before.dtype == after.dtype
    assert mask.any() and (after[:, mask] == black).all()
    assert (before[:, mask] != black).any(), "the test box must hold something to blank"
    np.testing.assert_array_equal(after[:, ~mask], before[:, ~mask])


# -- rules blank their regions -----------------------------------------------------------------

def test_matching_rule_blanks_exactly_the_rectangle(tmp_path: Path) -> None:
    ds = read("US1_UNCR.dcm")
    before = frames_of(ds)
    logiq = rule("logiq", manufacturer=r"g\.e\. medical", model="^LOGIQ", rows=480,
                 columns=640, sop_class=["1.2.840.10008.5.1.4.1.1.6.1"], regions=[BOX])
    result = clean_pixels(ds, settings(logiq))
    assert (result.verdict, result.rule) == (PixelVerdict.CLEANED, "logiq")
    assert ds.BurnedInAnnotation == "NO"
    out = roundtrip(ds, tmp_path / "us.dcm")
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (out.PhotometricInterpretation, out.PlanarConfiguration) == ("RGB", 0)
    assert_blanked(before, frames_of(out), BOX, 0)


def test_every_frame_of_a_multiframe_is_blanked(tmp_path: Path) -> None:
    ds = read("emri_small.dcm")
    before = frames_of(ds)
    result = clean_pixels(ds, settings(rule("mr", rows=64, columns=64)))
    assert result.verdict is PixelVerdict.CLEANED and "10 frame(s)" in result.reason
    out = roundtrip(ds, tmp_path / "mr.dcm")
    assert int(out.NumberOfFrames) == 10
    assert (out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation) == (
        16, 12, 11, 0)
    assert_blanked(before, frames_of(out), BOX, 0)


def test_monochrome1_is_filled_with_the_maximum(tmp_path: Path) -> None:
    ds = read("RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    before = frames_of(ds)
    box = (100, 200, 300, 40)
    clean_pixels(ds, settings(rule(regions=[box], manufacturer="Philips")))
    out = roundtrip(ds, tmp_path / "cr.dcm")
    assert out.PhotometricInterpretation == "MONOCHROME1"
    assert_blanked(before, frames_of(out), box, 2**15 - 1)


@pytest.mark.parametrize(
    ("name", "photometric", "black", "syntax"),
    [
        ("SC_rgb_rle.dcm", "RGB", 0, RLELossless),                      # RLE
        ("SC_rgb_jpeg_dcmtk.dcm", "RGB", 0, ExplicitVRLittleEndian),    # JPEG baseline, lossy
        ("US1_J2KR.dcm", "RGB", 0, JPEG2000Lossless),                   # J2K lossless, YBR_RCT
        ("JPEG2000.dcm", "MONOCHROME2", -(2**15), ExplicitVRLittleEndian),  # J2K, signed 16-bit
        ("SC_ybr_full_422_uncompressed.dcm", "RGB", 0, ExplicitVRLittleEndian),  # native YBR
        ("SC_rgb_rle_2frame.dcm", "RGB", 0, RLELossless),               # RLE, two frames
        pytest.param("color3d_jpeg_baseline.dcm", "RGB", 0, ExplicitVRLittleEndian,  # 120 frames
                     marks=pytest.mark.slow),
        ("MR_small_implicit.dcm", "MONOCHROME2", -(2**15), ImplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", "MONOCHROME2", -(2**15), ExplicitVRBigEndian),
    ],
)
def test_encoded_input_keeps_its_syntax_where_it_is_lossless(
    name: str, photometric: str, black: int, syntax: str, tmp_path: Path
) -> None:
    """Cleaned pixels go back in the source's own transfer syntax where a lossless encoder
    exists; once-lossy data (JPEG baseline, lossy J2K) comes out Explicit VR Little Endian."""
    ds = read(name)
    source_ts = ds.file_meta.TransferSyntaxUID
    before = frames_of(ds)
    image_pixel = (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation,
                   ds.get("NumberOfFrames"))
    assert clean_pixels(ds, settings(rule())).verdict is PixelVerdict.CLEANED
    out = roundtrip(ds, tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == syntax
    assert out.PhotometricInterpretation == photometric
    assert (out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation,
            out.get("NumberOfFrames")) == image_pixel
    if out.SamplesPerPixel == 3:
        assert out.PlanarConfiguration == 0
    assert out.BurnedInAnnotation == "NO"
    assert "SmallestImagePixelValue" not in out  # the fill may lie outside the old extremes
    if source_ts.name.startswith("JPEG Baseline"):
        assert out.LossyImageCompression == "01"
    assert_blanked(before, frames_of(out), BOX, black)


def test_regions_are_clipped_to_the_image(tmp_path: Path) -> None:
    ds = read("US1_UNCR.dcm")
    before = frames_of(ds)
    result = clean_pixels(ds, settings(rule(regions=[(610, 400, 100, 100), (700, 0, 5, 5)])))
    assert "1 region(s)" in result.reason  # the second lies wholly outside
    assert_blanked(before, frames_of(roundtrip(ds, tmp_path / "o.dcm")), (610, 400, 30, 80), 0)


def test_palette_colour_is_filled_with_its_darkest_entry(tmp_path: Path) -> None:
    ds = read("OBXXXX1A.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    before = frames_of(ds)
    clean_pixels(ds, settings(rule()))
    out = roundtrip(ds, tmp_path / "p.dcm")
    after = frames_of(out)
    x, y, w, h = BOX
    colour = apply_color_lut(after[0, y : y + h, x : x + w], out).astype(int).sum(axis=-1)
    lut = apply_color_lut(np.arange(256, dtype=np.uint8), out).astype(int).sum(axis=-1)
    assert (colour == lut.min()).all()
    assert_blanked(before, after, BOX, int(after[0, y, x]))


def test_single_bit_pixels_are_packed_again(tmp_path: Path) -> None:
    ds = read("liver_1frame.dcm")  # a Segmentation: Bits Allocated 1
    before = frames_of(ds)
    box = (250, 250, 40, 40)
    assert before[0, 250:290, 250:290].any()
    clean_pixels(ds, settings(rule(regions=[box])))
    out = roundtrip(ds, tmp_path / "seg.dcm")
    assert out.BitsAllocated == 1
    assert_blanked(before, frames_of(out), box, 0)


def test_cleaned_outputs_add_no_dciodvfy_errors(tmp_path: Path) -> None:
    for name in ("US1_UNCR.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "RG1_UNCR.dcm",
                 "emri_small.dcm", "color3d_jpeg_baseline.dcm"):
        source = sample_file(name)
        ds = dcmread(source)
        assert clean_pixels(ds, settings(rule())).verdict is PixelVerdict.CLEANED
        target = tmp_path / name
        ds.save_as(target, enforce_file_format=True)
        new = set(validate_file(target).errors) - set(validate_file(source).errors)
        assert not new, f"{name}: {sorted(new)}"


# -- inpainting -------------------------------------------------------------------------------

def test_inpaint_rule_hands_the_blanked_regions_to_the_inpainter(tmp_path: Path) -> None:
    ds = read("emri_small.dcm")
    before = frames_of(ds)
    calls: list[tuple[tuple[int, ...], list[Region], bool]] = []

    def gradient(frames: np.ndarray, regions: list[Region], source: Dataset) -> np.ndarray:
        x, y, w, h = regions[0]
        calls.append((frames.shape, regions, bool((frames[:, y : y + h, x : x + w] == 0).all())))
        ramp = np.arange(w, dtype=frames.dtype) * 100 + 7
        frames[:, y : y + h, x : x + w] = ramp
        return frames

    result = clean_pixels(ds, settings(rule("regen", fill="inpaint", regions=[(50, 60, 30, 9)])),
                          inpainter=gradient)
    assert (result.verdict, result.rule) == (PixelVerdict.CLEANED, "regen")
    # clipped to 64x64; the text was already blanked when the generator saw it
    assert calls == [((10, 64, 64), [(50, 60, 14, 4)], True)]
    after = frames_of(roundtrip(ds, tmp_path / "i.dcm"))
    np.testing.assert_array_equal(after[:, 60:64, 50:64],
                                  np.broadcast_to(np.arange(14) * 100 + 7, (10, 4, 14)))
    mask = inside((50, 60, 14, 4), 64, 64)
    np.testing.assert_array_equal(after[:, ~mask], before[:, ~mask])


def test_inpaint_without_inpainter_is_a_misconfiguration() -> None:
    ds = read("US1_UNCR.dcm")
    original = ds.PixelData
    with pytest.raises(ValueError, match='"regen-us"'):
        clean_pixels(ds, settings(rule("regen-us", fill="inpaint")))
    assert ds.PixelData is original and "BurnedInAnnotation" not in ds


def test_inpainter_returning_the_wrong_shape_is_refused() -> None:
    ds = read("US1_UNCR.dcm")
    original = ds.PixelData
    with pytest.raises(ValueError, match="regen.*inpainter returned"):
        clean_pixels(ds, settings(rule("regen", fill="inpaint")),
                     inpainter=lambda frames, regions, source: frames[0])
    assert ds.PixelData is original and "BurnedInAnnotation" not in ds


# -- no rule ----------------------------------------------------------------------------------

def test_unmatched_ultrasound_is_quarantined_without_patient_data() -> None:
    ds = read("US1_UNCR.dcm")
    original = ds.PixelData
    other = rule("other-vendor", manufacturer="ACME")
    result = clean_pixels(ds, settings(other))
    assert result.verdict is PixelVerdict.QUARANTINE and result.rule == ""
    assert "Modality US" in result.reason and "G.E. Medical Systems" in result.reason
    assert "480 rows x 640 columns" in result.reason
    for phi in (str(ds.PatientName), str(ds.PatientID), "CompressedSamples"):
        assert phi not in result.reason
    assert ds.PixelData is original and "BurnedInAnnotation" not in ds


def test_unmatched_ultrasound_passes_marked_when_configured() -> None:
    ds = read("US1_UNCR.dcm")
    original = ds.PixelData
    result = clean_pixels(ds, settings(quarantine_unmatched_burned_in=False))
    assert result.verdict is PixelVerdict.PASSED_MARKED and "Modality US" in result.reason
    assert ds.BurnedInAnnotation == "YES" and ds.PixelData is original


def test_ct_without_annotation_is_clean_and_untouched() -> None:
    ds = read("CT_small.dcm")
    original = ds.PixelData
    result = clean_pixels(ds, settings(rule(manufacturer="ACME")))
    assert result.verdict is PixelVerdict.CLEAN and "Modality CT" in result.reason
    assert ds.PixelData is original and ds.PixelData == read("CT_small.dcm").PixelData
    assert "BurnedInAnnotation" not in ds
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize(
    ("name", "change", "cue"),
    [
        ("CT_small.dcm", {"BurnedInAnnotation": "YES"}, "Burned In Annotation YES"),
        ("SC_rgb_rle.dcm", {}, "Secondary Capture SOP class"),  # Modality OT
        ("color3d_jpeg_baseline.dcm", {"Modality": "OT"}, "Ultrasound SOP class"),
        ("CT_small.dcm", {"Modality": "XC"}, "Modality XC"),
    ],
)
def test_each_cue_for_burned_in_text(name: str, change: dict[str, str], cue: str) -> None:
    ds = read(name)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    result = clean_pixels(ds, settings())
    assert result.verdict is PixelVerdict.QUARANTINE and cue in result.reason


def test_modalities_come_from_the_settings() -> None:
    ds = read("CT_small.dcm")
    assert clean_pixels(ds, settings(burned_in_modalities=["CT"])).verdict is (
        PixelVerdict.QUARANTINE)
    us = read("US1_UNCR.dcm")
    us.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # no longer an Ultrasound SOP class
    assert clean_pixels(us, settings(burned_in_modalities=[])).verdict is PixelVerdict.CLEAN


# -- matching ---------------------------------------------------------------------------------

def test_criteria_that_do_not_match_fall_through() -> None:
    ds = read("US1_UNCR.dcm")
    misses = [
        rule("size", rows=480, columns=641),
        rule("rows", rows=481),
        rule("maker", manufacturer="^GE "),  # the source says "G.E. Medical Systems"
        rule("model", model="LOGIQ 9"),
        rule("class", sop_class=["1.2.840.10008.5.1.4.1.1.7"]),
    ]
    for miss in misses:
        assert match_rule(ds, [miss]) is None, miss.name
    hit = rule("hit", manufacturer="medical systems", model="logiq 7\\d\\d", rows=480)
    assert match_rule(ds, [*misses, hit, rule("later")]) is hit
    assert match_rule(ds, []) is None
    # A region rule with no criteria matches anything with pixels.
    assert match_rule(read("CT_small.dcm"), [rule("any")]) is not None


def test_bad_rules_are_named() -> None:
    with pytest.raises(ValueError, match=r'"broken".*manufacturer "\(GE"'):
        match_rule(read("US1_UNCR.dcm"), [rule("broken", manufacturer="(GE")])
    with pytest.raises(ValueError, match=r'"empty".*region \[1, 2, 0, 5\]'):
        check_rules([rule("fine"), rule("empty", regions=[(1, 2, 0, 5)])])
    check_rules([rule("fine")])


def test_undecodable_pixel_data_is_a_pixel_data_error() -> None:
    ds = read("US1_UNCR.dcm")
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PixelDataError, match="Transfer Syntax UID"):
        clean_pixels(ds, settings(rule()))


# -- Recognizable Visual Features -------------------------------------------------------------

def test_likely_recognizable() -> None:
    mr = read("emri_small.dcm")  # MR, HEAD, 10 frames, no slice thickness
    assert likely_recognizable(mr) is None
    mr.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    reason = likely_recognizable(mr)
    assert reason is not None and "Modality MR" in reason and "VOLUME" in reason
    mr.ImageType = ["ORIGINAL", "PRIMARY"]
    mr.NumberOfFrames = 120
    assert "120 frames" in (likely_recognizable(mr) or "")

    thin = read("MR_small.dcm")  # 0.8 mm slices, no body part
    assert likely_recognizable(thin) is None
    thin.BodyPartExamined = "BRAIN"
    assert "slice thickness 0.8 mm" in (likely_recognizable(thin) or "")
    thin.BodyPartExamined = "CHEST"
    assert likely_recognizable(thin) is None

    ct = read("CT_small.dcm")  # 5 mm
    ct.BodyPartExamined = "HEAD"
    assert likely_recognizable(ct) is None
    ct.SliceThickness = "1.25"
    assert "1.25 mm" in (likely_recognizable(ct) or "")
    assert str(ct.PatientName) not in (likely_recognizable(ct) or "")

    us = read("US1_UNCR.dcm")
    us.BodyPartExamined = "HEAD"
    us.SliceThickness = "1"
    assert likely_recognizable(us) is None  # not CT or MR
    us.RecognizableVisualFeatures = "YES"
    assert likely_recognizable(us) == "Recognizable Visual Features is YES in the source"
