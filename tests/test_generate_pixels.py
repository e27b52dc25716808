"""Medical pixels in and out of the models: display values from real DICOM (rescale, window,
MONOCHROME1, colour, multi-frame), the model's square without distortion and back, masks, and
outputs that keep every source pixel they promise to keep, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.sequence import Sequence as DicomSequence

from node.config import OutputSettings, TaskKind
from node.dicom import Pixels, Synthesis, build_sc, carried_spacing
from node.generate.pixels import (
    Placement,
    VoiKind,
    composite,
    display_frames,
    from_model,
    outpaint_canvas,
    region_mask,
    to_model,
    to_output,
)
from tests.nodeproc import frames_of, sample_file

RESOLUTION = 64


def read(name: str) -> Dataset:
    return dcmread(sample_file(name))



def model(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Stand-in for a diffusion model (another module's concern): RGB noise in [0, 1]."""
    return np.random.default_rng(seed).random(image.shape, dtype=np.float32)


def smooth(rows: int, cols: int) -> np.ndarray:
    """A smooth test image in [0, 1]: a broad Gaussian blob plus a gentle ramp."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    blob = np.exp(-(((y - rows * 0.4) / (rows * 0.3)) ** 2
                    + ((x - cols * 0.6) / (cols * 0.3)) ** 2))
    return (0.7 * blob + 0.3 * x / cols).astype(np.float32)


def blocks(image: np.ndarray, size: int) -> np.ndarray:
    """Means of ``size`` x ``size`` blocks (the edge remainder dropped)."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    cut = image[: rows * size, : cols * size].astype(np.float64)
    return cut.reshape(rows, size, cols, size).mean(axis=(1, 3))


# -- display_frames --------------------------------------------------------------------------

def test_monochrome1_cr_is_inverted_so_dense_is_bright() -> None:
    ds = read("RG1_UNCR.dcm")  # MONOCHROME1, 15 bits stored, window 15000/30000
    stored = frames_of(ds)[0]
    display, info = display_frames(ds)
    assert display.shape == (1, 1955, 1841) and display.dtype == np.float32
    assert info.inverted and info.kind is VoiKind.WINDOW and info.windows == ((15000.0, 30000.0),)
    # MONOCHROME1: the lowest stored values are the densest (shown white).
    raw, shown = blocks(stored, 64), blocks(display[0], 64)
    densest, lightest = np.unravel_index(raw.argmin(), raw.shape), np.unravel_index(
        raw.argmax(), raw.shape)
    assert shown[densest] > 0.5 > shown[lightest]
    # Exactly the inverted LINEAR window of PS3.3 C.11.2.1.2.1.
    expected = 1 - np.clip((stored - 14999.5) / 29999 + 0.5, 0, 1)
    np.testing.assert_allclose(display[0], expected, atol=1e-6)
    assert "MONOCHROME1 inverted" in info.describe()


def test_monochrome1_output_is_monochrome2_through_the_writer() -> None:
    ds = read("RG1_UNCR.dcm")
    display, _ = display_frames(ds)
    out = to_output(display, color=False, bits=15)
    assert out.dtype == np.uint16 and int(out.max()) <= 2**15 - 1
    sc = build_sc([ds], Pixels(out, "MONOCHROME2", bits_stored=15), Synthesis(
        TaskKind.IMG2IMG, "tiny", "0f" * 32, "DDIMScheduler", 2, 7.5, 1, prompt="x",
        strength=0.5), OutputSettings())
    assert sc.PhotometricInterpretation == "MONOCHROME2"
    written = sc.pixel_array
    raw = blocks(frames_of(ds)[0], 64)
    densest = np.unravel_index(raw.argmin(), raw.shape)
    lightest = np.unravel_index(raw.argmax(), raw.shape)
    shown = blocks(written, 64)
    assert shown[densest] > 2**14 > shown[lightest]  # dense is bright: inverted once, not twice
    np.testing.assert_array_equal(written, out[0])


def test_ct_window_is_applied_after_rescale() -> None:
    ds = read("CT_small.dcm")  # signed 16-bit, Rescale Intercept -1024, no window of its own
    ds.WindowCenter, ds.WindowWidth = 40, 400
    hu = frames_of(ds)[0].astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept)
    display, info = display_frames(ds)
    assert info.kind is VoiKind.WINDOW and info.windows == ((40.0, 400.0),)
    assert info.rescale == (1.0, -1024.0) and not info.inverted
    np.testing.assert_allclose(display[0], np.clip((hu - 39.5) / 399 + 0.5, 0, 1), atol=1e-6)
    assert (display == 0).sum() > 0 and (display == 1).sum() > 0  # the window clips both ends
    assert "Window Center 40, Width 400 (LINEAR)" in info.describe()
    assert "Intercept -1024" in info.describe()


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(function: str) -> None:
    ds = read("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, function
    hu = frames_of(ds)[0].astype(np.float64) - 1024
    expected = (np.clip((hu - 40) / 400 + 0.5, 0, 1) if function == "LINEAR_EXACT"
                else 1 / (1 + np.exp(-4 * (hu - 40) / 400)))
    display, info = display_frames(ds)
    assert info.function == function
    np.testing.assert_allclose(display[0], expected, atol=1e-6)


def test_first_window_of_several_is_used() -> None:
    ds = read("MR-SIEMENS-DICOM-WithOverlays.dcm")  # Window Center [450, 200], Width [790, 443]
    display, info = display_frames(ds)
    assert info.windows == ((450.0, 790.0),)
    stored = frames_of(ds)[0].astype(np.float64)
    np.testing.assert_allclose(display[0], np.clip((stored - 449.5) / 789 + 0.5, 0, 1),
                               atol=1e-6)


def test_without_window_each_frame_spans_its_own_range() -> None:
    ds = read("CT_small.dcm")
    hu = frames_of(ds)[0].astype(np.float64) - 1024
    display, info = display_frames(ds)
    assert info.kind is VoiKind.MIN_MAX and info.ranges == ((hu.min(), hu.max()),)
    np.testing.assert_allclose(display[0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_pixel_padding_is_left_out_of_the_range() -> None:
    ds = read("CT_small.dcm")
    stored = frames_of(ds)[0]
    ds.PixelPaddingValue = int(stored.min())
    _, info = display_frames(ds)
    low = info.ranges[0][0]
    assert low == float(stored[stored != stored.min()].min()) - 1024


def test_multiframe_frame_by_frame() -> None:
    ds = read("emri_small.dcm")  # 10 frames of 64 x 64, 12 bits, no window
    stored = frames_of(ds).astype(np.float64)
    display, info = display_frames(ds)
    assert display.shape == (10, 64, 64) and len(info.ranges) == 10
    for frame, raw in zip(display, stored, strict=True):
        np.testing.assert_allclose(frame, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_enhanced_per_frame_windows() -> None:
    ds = read("emri_small.dcm")
    shared = Dataset()
    shared.FrameVOILUTSequence = [Dataset()]
    shared.FrameVOILUTSequence[0].WindowCenter = 200
    shared.FrameVOILUTSequence[0].WindowWidth = 400
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = [Dataset() for _ in range(10)]
    per_frame[3].FrameVOILUTSequence = [Dataset()]
    per_frame[3].FrameVOILUTSequence[0].WindowCenter = 100
    per_frame[3].FrameVOILUTSequence[0].WindowWidth = 50
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    display, info = display_frames(ds)
    assert info.windows[0] == (200.0, 400.0) and info.windows[3] == (100.0, 50.0)
    stored = frames_of(ds).astype(np.float64)
    np.testing.assert_allclose(display[3], np.clip((stored[3] - 99.5) / 49 + 0.5, 0, 1),
                               atol=1e-6)


def test_modality_and_voi_lut_sequences() -> None:
    _, info = display_frames(read("mlut_18.dcm"))
    assert info.modality_lut and "Modality LUT Sequence" in info.describe()
    display, info = display_frames(read("vlut_04.dcm"))
    assert info.kind is VoiKind.LUT and display.min() == 0 and display.max() == 1


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "SC_rgb_rle.dcm",
                                  "SC_ybr_full_422_uncompressed.dcm"])
def test_colour_as_rgb(name: str) -> None:
    ds = read(name)
    display, info = display_frames(ds)
    assert info.kind is VoiKind.COLOR and display.ndim == 4 and display.shape[-1] == 3
    np.testing.assert_allclose(display, frames_of(ds) / 255.0, atol=1e-6)


def test_palette_colour_is_looked_up() -> None:
    ds = read("OBXXXX1A.dcm")  # PALETTE COLOR, 16-bit LUT entries
    display, info = display_frames(ds)
    assert info.kind is VoiKind.COLOR and display.shape == (1, 600, 800, 3)
    np.testing.assert_allclose(display[0], apply_color_lut(ds.pixel_array, ds) / 65535.0,
                               atol=1e-6)


def test_undecodable_is_a_value_error() -> None:
    ds = read("CT_small.dcm")
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(ValueError, match="Transfer Syntax UID"):
        display_frames(ds)


# -- the model's square and back -------------------------------------------------------------

def test_to_model_is_square_rgb_in_unit_range() -> None:
    frame = display_frames(read("CT_small.dcm"))[0][0]
    prepared = to_model(frame, RESOLUTION)
    image = prepared.image
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize(("rows", "cols"), [(40, 80), (80, 40)])
def test_aspect_is_kept_with_padding(rows: int, cols: int) -> None:
    prepared = to_model(np.ones((rows, cols), np.float32), RESOLUTION)
    content = prepared.image[..., 0] > 0.5
    r, c = np.nonzero(content)
    height, width = r.max() - r.min() + 1, c.max() - c.min() + 1
    assert height * cols == width * rows  # 2:1 stays 2:1
    assert max(height, width) == RESOLUTION
    assert prepared.mapping.size == (height, width)
    assert (r.min(), c.min()) == prepared.mapping.offset
    assert prepared.mapping.offset == ((RESOLUTION - height) // 2, (RESOLUTION - width) // 2)
    assert prepared.image[~content].max() == 0  # the rest is padding


def test_aspect_of_a_real_tall_image() -> None:
    frame = display_frames(read("JPEG2000.dcm"))[0][0]  # 1024 x 256
    placement = to_model(frame, 512).mapping
    assert placement.size == (512, 128) and placement.offset == (0, 192)
    assert placement.scale == 0.5


@pytest.mark.parametrize(("rows", "cols"), [(77, 131), (30, 50), (64, 64), (203, 61)])
def test_round_trip_of_a_smooth_image(rows: int, cols: int) -> None:
    frame = smooth(rows, cols)
    prepared = to_model(frame, RESOLUTION)
    back = from_model(prepared.image, prepared.mapping)
    assert back.shape == (rows, cols) and back.dtype == np.float32
    assert np.abs(back - frame).mean() < 0.01


def test_round_trip_of_real_sources() -> None:
    for name in ("RG1_UNCR.dcm", "emri_small.dcm", "CT_small.dcm"):
        for frame in display_frames(read(name))[0][:2]:
            prepared = to_model(frame, 512)
            back = from_model(prepared.image, prepared.mapping)
            assert back.shape == frame.shape
            assert np.abs(back - frame).mean() < 0.02, name


def test_round_trip_keeps_colour() -> None:
    frame = display_frames(read("US1_UNCR.dcm"))[0][0]  # 480 x 640 RGB
    prepared = to_model(frame, 256)
    assert prepared.mapping.color
    back = from_model(prepared.image, prepared.mapping)
    assert back.shape == (480, 640, 3)
    gray = from_model(prepared.image, prepared.mapping, color=False)
    assert gray.shape == (480, 640)
    np.testing.assert_allclose(gray, back.mean(axis=-1), atol=1e-6)


def test_masks_never_shrink_through_the_square() -> None:
    placement = Placement.fit((1955, 1841), 512)
    mask = np.zeros((1955, 1841), bool)
    mask[1000, 700] = True  # one source pixel, far smaller than a model pixel
    into = placement.to_model(mask)
    assert into.dtype == np.bool_ and 1 <= into.sum() <= 4
    back = placement.to_source(into)
    assert back.shape == (1955, 1841) and back[1000, 700]


@pytest.mark.parametrize("resolution", [0, 60, -8, 12])
def test_resolution_must_be_a_multiple_of_8(resolution: int) -> None:
    with pytest.raises(ValueError, match="resolution"):
        to_model(np.zeros((8, 8), np.float32), resolution)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="frame of shape"):
        to_model(np.zeros((4, 8, 8), np.float32), RESOLUTION)
    with pytest.raises(ValueError, match="not floating"):
        to_model(np.zeros((8, 8), np.uint16), RESOLUTION)
    prepared = to_model(np.zeros((8, 8), np.float32), RESOLUTION)
    with pytest.raises(ValueError, match="model image of shape"):
        from_model(np.zeros((32, 32, 3)), prepared.mapping)


# -- to_output -------------------------------------------------------------------------------

def test_to_output_scales_to_the_bit_depth() -> None:
    values = np.array([[0.0, 0.25, 1.0, 1.5, -0.2]], np.float32)
    np.testing.assert_array_equal(to_output(values, color=False, bits=8),
                                  [[0, 64, 255, 255, 0]])
    twelve = to_output(values, color=False, bits=12)
    assert twelve.dtype == np.uint16
    np.testing.assert_array_equal(twelve, [[0, 1024, 4095, 4095, 0]])
    assert to_output(values, color=False, bits=16).max() == 65535
    rgb = to_output(np.ones((2, 4, 5, 3), np.float32), color=True, bits=8)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 5, 3) and rgb.min() == 255


@pytest.mark.parametrize(("shape", "color", "bits", "match"), [
    ((4, 4), False, 7, "bits 7"),
    ((4, 4), False, 17, "bits 17"),
    ((4, 4, 3), True, 12, "bits 12 for colour"),
    ((1, 4, 4, 3), False, 8, "not grayscale"),
    ((1, 4, 4), True, 8, "not RGB"),
])
def test_to_output_rejects(shape: tuple[int, ...], color: bool, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_output(np.zeros(shape, np.float32), color=color, bits=bits)


def test_to_output_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        to_output(np.full((2, 2), np.nan, np.float32), color=False, bits=8)


# -- masks -----------------------------------------------------------------------------------

def test_rectangles_are_x_y_width_height() -> None:
    mask = region_mask((20, 30), [(5, 2, 10, 4), (25, 15, 10, 10)])
    expected = np.zeros((20, 30), bool)
    expected[2:6, 5:15] = True
    expected[15:20, 25:30] = True  # clipped at the image edge
    np.testing.assert_array_equal(mask, expected)


def test_polygons_are_filled() -> None:
    square = region_mask((10, 10), polygons=[[(2, 2), (6, 2), (6, 6), (2, 6)]])
    expected = np.zeros((10, 10), bool)
    expected[2:7, 2:7] = True  # vertices are pixel centres; edges included
    np.testing.assert_array_equal(square, expected)
    triangle = region_mask((40, 40), polygons=[[(0, 0), (39, 0), (0, 39)]])
    assert triangle[5, 5] and triangle[0, 39] and not triangle[39, 39] and not triangle[30, 30]
    assert abs(int(triangle.sum()) - 40 * 41 // 2) <= 40
    both = region_mask((40, 40), [(30, 30, 5, 5)], [[(0, 0), (39, 0), (0, 39)]])
    np.testing.assert_array_equal(both, triangle | region_mask((40, 40), [(30, 30, 5, 5)]))


def test_mask_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="negative"):
        region_mask((10, 10), [(1, 1, -2, 3)])
    with pytest.raises(ValueError, match="fewer than 3 vertices"):
        region_mask((10, 10), polygons=[[(1, 1), (2, 2)]])
    with pytest.raises(ValueError, match="shape"):
        region_mask((0, 10))


# -- outpainting -----------------------------------------------------------------------------

def test_outpaint_canvas_geometry() -> None:
    frame = smooth(30, 50)
    canvas, mask = outpaint_canvas(frame, (3, 4, 5, 6))
    assert canvas.shape == (30 + 3 + 5, 50 + 6 + 4) and canvas.dtype == frame.dtype
    assert mask.sum() == canvas.size - frame.size
    np.testing.assert_array_equal(canvas[3:33, 6:56], frame)
    assert not mask[3:33, 6:56].any()
    edge = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).mean()
    np.testing.assert_allclose(canvas[mask], edge, rtol=1e-6)


def test_outpaint_canvas_colour_fills_per_channel() -> None:
    frame = np.zeros((10, 10, 3), np.float32)
    frame[..., 1] = 1.0
    canvas, _ = outpaint_canvas(frame, (2, 0, 0, 0))
    np.testing.assert_array_equal(canvas[0, 0], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("margins", [(-1, 0, 0, 0), (0, 0, 0)])
def test_outpaint_margins_are_checked(margins: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="margins"):
        outpaint_canvas(np.zeros((4, 4), np.float32), margins)


@pytest.mark.parametrize(("name", "bits"), [
    ("CT_small.dcm", 16), ("RG1_UNCR.dcm", 15), ("US1_UNCR.dcm", 8), ("emri_small.dcm", 12),
])
def test_outpainting_keeps_every_original_pixel(name: str, bits: int) -> None:
    ds = read(name)
    margins = (5, 17, 9, 3)  # top, right, bottom, left
    display, _ = display_frames(ds)
    color = display.ndim == 4
    outputs = []
    for i, frame in enumerate(display):
        canvas, border = outpaint_canvas(frame, margins)
        prepared = to_model(canvas, 128)
        back = from_model(model(prepared.image, i), prepared.mapping)
        outputs.append(composite(canvas, back, ~border))
    out = to_output(np.stack(outputs), color=color, bits=bits)
    rows, cols = display.shape[1:3]
    assert out.shape[1:3] == (rows + 5 + 9, cols + 3 + 17)
    inside = out[:, 5 : 5 + rows, 3 : 3 + cols]
    assert np.array_equal(inside, to_output(display, color=color, bits=bits))
    assert not np.array_equal(out[:, :5], np.broadcast_to(out[:, :1], out[:, :5].shape))
    # Same grid, more pixels: the source's pixel spacing still holds.
    spacing = carried_spacing(ds)
    pixels = Pixels(out, "RGB" if color else "MONOCHROME2",
                    bits_stored=None if color else bits, pixel_spacing=spacing)
    if "PixelSpacing" in ds and float(ds.PixelSpacing[0]) > 0:
        assert pixels.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)


# -- inpainting and composite ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["CT_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm"])
def test_inpainting_keeps_everything_outside(name: str) -> None:
    ds = read(name)
    frame = display_frames(ds)[0][0]
    color = frame.ndim == 3
    rows, cols = frame.shape[:2]
    regions = [(cols // 4, rows // 3, cols // 5, rows // 6)]
    polygons = [[(cols * 0.6, rows * 0.6), (cols * 0.9, rows * 0.7), (cols * 0.7, rows * 0.95)]]
    mask = region_mask((rows, cols), regions, polygons)
    prepared = to_model(frame, 128)
    back = from_model(model(prepared.image), prepared.mapping)
    made = composite(frame, back, ~mask)
    bits = 8 if color else int(ds.BitsStored)
    out = to_output(made, color=color, bits=bits)
    original = to_output(frame, color=color, bits=bits)
    assert np.array_equal(out[~mask], original[~mask])
    assert not np.array_equal(out[mask], original[mask])  # the regions were regenerated


def test_composite_is_exact_in_the_original_dtype() -> None:
    original = np.random.default_rng(1).random((16, 16), dtype=np.float32)
    generated = np.random.default_rng(2).random((16, 16))  # float64, as a model may give
    keep = region_mask((16, 16), [(0, 0, 8, 16)])
    made = composite(original, generated, keep)
    assert made.dtype == np.float32
    assert np.array_equal(made[keep], original[keep])
    np.testing.assert_array_equal(made[~keep], generated[~keep].astype(np.float32))


def test_composite_colour_and_checks() -> None:
    original = np.zeros((4, 5, 3), np.float32)
    keep = np.zeros((4, 5), bool)
    keep[0] = True
    made = composite(original, np.ones((4, 5, 3)), keep)
    assert made[0].max() == 0 and made[1:].min() == 1
    with pytest.raises(ValueError, match="generated01 of shape"):
        composite(original, np.ones((4, 5)), keep)
    with pytest.raises(ValueError, match="keep of shape"):
        composite(original, original, np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="not bool"):
        composite(original, original, np.zeros((4, 5), np.uint8))
