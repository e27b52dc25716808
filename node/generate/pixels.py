"""Medical pixels in and out of the diffusion models.

    source Dataset --display_frames--> (F, rows, cols[, 3]) float32 in [0, 1], as displayed
        --to_model--> Frame: (R, R, 3) float32, aspect kept, centre padded, + its Placement
        --(the model)--> (R, R, 3) in [0, 1]
        --from_model--> the source geometry again
        --composite--> the source's own values wherever the task keeps them, bit for bit
        --to_output--> uint8 / uint16 / RGB uint8 for :class:`node.dicom.Pixels`

Values are "as displayed" (PS3.4 Grayscale Standard Display pipeline up to the Presentation
LUT): Modality LUT or Rescale Slope/Intercept, then VOI (window or LUT), and MONOCHROME1
inverted, so that bright means dense for every source. The outputs of :func:`to_output` are
therefore MONOCHROME2 (or RGB) values: give them to the SC writer with photometric
"MONOCHROME2", never "MONOCHROME1", or they are inverted twice.

Exactness: :func:`to_output` is elementwise and computes in float64 (exact for float32 input),
and :func:`composite` copies the kept values of the original unchanged, in the original's
dtype; so ``to_output(composite(canvas, generated, keep))`` equals ``to_output(canvas)``
wherever ``keep`` is True, whatever the model did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

from node.pixeldata import Region, decode_frames

"""A rectangle: x (first column), y (first row), width (columns), height (rows)."""

Polygon = Sequence[tuple[float, float]]
"""A polygon's vertices as (x, y) = (column, row) pixel coordinates."""


class VoiKind(StrEnum):
    """Which Value Of Interest transformation made the display values."""

    WINDOW = "window"
    """Window Center / Width (the first pair), with the VOI LUT Function (PS3.3 C.11.2.1.2)."""
    LUT = "lut"
    """The first VOI LUT Sequence item, its output range scaled to [0, 1]."""
    MIN_MAX = "min-max"
    """No VOI in the object: each frame's own lowest..highest value (Pixel Padding Value
    excluded) mapped to 0..1."""
    COLOR = "color"
    """Colour pixels (RGB, YBR, PALETTE COLOR): no VOI (PS3.4 N.2); values scaled to [0, 1]."""


@dataclass(frozen=True)
class WindowInfo:
    """What :func:`display_frames` applied, for provenance text (:meth:`describe`)."""

    kind: VoiKind
    photometric: str
    """The source's Photometric Interpretation."""
    windows: tuple[tuple[float, float], ...] = ()
    """WINDOW: per frame (center, width), in modality units."""
    ranges: tuple[tuple[float, float], ...] = ()
    """MIN_MAX: per frame (low, high) modality values that became 0 and 1."""
    function: str = "LINEAR"
    """WINDOW: the VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID)."""
    rescale: tuple[float, float] = (1.0, 0.0)
    """Rescale Slope and Intercept of the first frame (identity where absent)."""
    modality_lut: bool = False
    """True where a Modality LUT Sequence was applied instead of rescaling."""
    inverted: bool = False
    """True for MONOCHROME1 sources: the values were inverted to read as MONOCHROME2."""

    def describe(self) -> str:
        """One line naming the transformations, e.g. for Derivation Description."""
        parts: list[str] = []
        if self.modality_lut:
            parts.append("Modality LUT Sequence")
        elif self.rescale != (1.0, 0.0):
            parts.append(f"Rescale Slope {self.rescale[0]:g}, Intercept {self.rescale[1]:g}")
        if self.kind is VoiKind.WINDOW:
            (center, width), *rest = self.windows
            same = all(w == (center, width) for w in rest)
            parts.append(
                f"Window Center {center:g}, Width {width:g} ({self.function})"
                + ("" if same else f" in frame 1, per-frame windows in {len(self.windows)} frames")
            )
        elif self.kind is VoiKind.LUT:
            parts.append("VOI LUT Sequence (first LUT)")
        elif self.kind is VoiKind.MIN_MAX:
            (low, high), *rest = self.ranges
            same = all(r == (low, high) for r in rest)
            parts.append(
                f"no VOI: frame range {low:g}..{high:g}"
                + ("" if same else f" in frame 1, each of {len(self.ranges)} frames its own")
            )
        else:
            parts.append(f"colour ({self.photometric}), no VOI")
        if self.inverted:
            parts.append("MONOCHROME1 inverted to MONOCHROME2")
        return "; ".join(parts)


# -- from DICOM to display values -----------------------------------------------------------

def display_frames(ds: Dataset) -> tuple[np.ndarray, WindowInfo]:
    """All frames of ``ds`` as displayed: (F, rows, columns) grayscale or (F, rows, columns, 3)
    RGB, float32 in [0, 1], and what was applied.

    Grayscale: Modality LUT Sequence or Rescale Slope/Intercept (per frame in enhanced
    objects), then Window Center/Width (first values; per frame in enhanced objects), else the
    first VOI LUT, else each frame's min..max; MONOCHROME1 is inverted so that bright means
    dense, as in MONOCHROME2. Colour: RGB (YBR converted, PALETTE COLOR looked up) scaled by
    its bit depth.
    """
    stored, photometric = decode_frames(ds)
    if photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = apply_color_lut(stored, ds).astype(np.float64) / float((1 << bits) - 1)
        return _unit(rgb), WindowInfo(VoiKind.COLOR, photometric)
    if stored.ndim == 4:
        bits = int(ds.get("BitsStored", 8))
        rgb = stored.astype(np.float64) / float((1 << bits) - 1)
        return _unit(rgb), WindowInfo(VoiKind.COLOR, photometric)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f'Photometric Interpretation "{photometric}" is not supported')

    # 1. Modality LUT (PS3.3 C.11.1): the LUT, else Rescale Slope/Intercept per frame.
    modality_lut = "ModalityLUTSequence" in ds
    rescales = [_rescale(ds, i) for i in range(len(stored))]
    if modality_lut:
        values = apply_modality_lut(stored, ds).astype(np.float64)
    else:
        values = np.stack([
            frame.astype(np.float64) * slope + intercept
            for frame, (slope, intercept) in zip(stored, rescales, strict=True)
        ])

    # 2. VOI LUT (PS3.3 C.11.2): window, else LUT, else the frame's own range.
    windows = [_window(ds, i) for i in range(len(stored))]
    info: WindowInfo
    if all(w is not None for w in windows):
        item = _frame_item(ds, 0, "FrameVOILUTSequence")
        function = str(item.get("VOILUTFunction") or "LINEAR").upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            function = "LINEAR"  # unknown functions: LINEAR is the default (C.11.2.1.3)
        pairs = tuple(w for w in windows if w is not None)
        display = np.stack([
            _apply_window(frame, center, width, function)
            for frame, (center, width) in zip(values, pairs, strict=True)
        ])
        info = WindowInfo(VoiKind.WINDOW, photometric, windows=pairs, function=function)
    elif ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        indices = np.rint(values).astype(np.int64)  # the LUT is indexed by modality values
        display = apply_voi(indices, ds, index=0).astype(np.float64) / float((1 << bits) - 1)
        info = WindowInfo(VoiKind.LUT, photometric)
    else:
        padding = ds.get("PixelPaddingValue")
        ranges = []
        frames = []
        for raw, frame in zip(stored, values, strict=True):
            real = frame if padding is None else frame[raw != int(padding)]
            low, high = (float(real.min()), float(real.max())) if real.size else (0.0, 0.0)
            frames.append((frame - low) / (high - low) if high > low else np.zeros_like(frame))
            ranges.append((low, high))
        display = np.stack(frames)
        info = WindowInfo(VoiKind.MIN_MAX, photometric, ranges=tuple(ranges))

    # 3. MONOCHROME1: minimum is white; inverted so that every output reads as MONOCHROME2.
    inverted = photometric == "MONOCHROME1"
    if inverted:
        display = 1.0 - display
    info = WindowInfo(
        info.kind, photometric, windows=info.windows, ranges=info.ranges,
        function=info.function, rescale=rescales[0], modality_lut=modality_lut,
        inverted=inverted,
    )
    return _unit(display), info


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset:
    """The first item of functional group ``sequence`` for frame ``index`` (per-frame, else
    shared), or ``ds`` itself where the object has none (the attributes are top-level)."""
    for groups_keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        item = groups[min(index, len(groups) - 1)]
        inner = item.get(sequence)
        if inner:
            return inner[0]
    return ds


def _first(value: object) -> float | None:
    """The first value of a possibly multi-valued numeric element, or None."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    return float(value)  # type: ignore[arg-type]


def _rescale(ds: Dataset, index: int) -> tuple[float, float]:
    item = _frame_item(ds, index, "PixelValueTransformationSequence")
    slope = _first(item.get("RescaleSlope"))
    intercept = _first(item.get("RescaleIntercept"))
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _window(ds: Dataset, index: int) -> tuple[float, float] | None:
    """Frame ``index``'s (center, width), or None where it has no usable window."""
    item = _frame_item(ds, index, "FrameVOILUTSequence")
    center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def _apply_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window ``x`` into [0, 1] (PS3.3 C.11.2.1.2.1-3)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with width 1: a threshold at the centre
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _unit(values: np.ndarray) -> np.ndarray:
    return np.clip(values, 0.0, 1.0).astype(np.float32)


# -- into and out of the model's square ------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where a source image sits in the model's R x R square: resized by ``scale`` (aspect
    kept) to :attr:`size` and placed at ``offset`` (row, column), the rest padded with 0;
    and the inverse.

    For outputs kept at model resolution, the content's pixel spacing is the source's divided
    by ``scale`` (:func:`node.dicom.carried_spacing`); outputs brought back by
    :meth:`to_source` keep the source's spacing.
    """

    source_shape: tuple[int, int]
    scale: float
    offset: tuple[int, int]
    resolution: int
    color: bool = False
    """The source is RGB: :func:`from_model` gives RGB back by default."""

    def __post_init__(self) -> None:
        _check_resolution(self.resolution)
        rows, cols = self.source_shape
        if rows < 1 or cols < 1:
            raise ValueError(f"source_shape {self.source_shape} is empty")
        if not self.scale > 0:
            raise ValueError(f"scale {self.scale} is not positive")
        (height, width), (top, left) = self.size, self.offset
        if top < 0 or left < 0 or top + height > self.resolution or (
            left + width > self.resolution
        ):
            raise ValueError(
                f"offset {self.offset} puts the {height}x{width} image outside the "
                f"{self.resolution}x{self.resolution} square"
            )

    @classmethod
    def fit(cls, source_shape: tuple[int, int], resolution: int, *,
            color: bool = False) -> Placement:
        """The largest aspect-preserving fit of ``source_shape`` into the square, centred."""
        _check_resolution(resolution)
        rows, cols = int(source_shape[0]), int(source_shape[1])
        if rows < 1 or cols < 1:
            raise ValueError(f"source_shape {source_shape} is empty")
        scale = resolution / max(rows, cols)
        height, width = _scaled(rows, cols, scale, resolution)
        offset = ((resolution - height) // 2, (resolution - width) // 2)
        return cls((rows, cols), scale, offset, resolution, color)

    @property
    def size(self) -> tuple[int, int]:
        """(rows, columns) the source occupies in the square."""
        return _scaled(*self.source_shape, self.scale, self.resolution)

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """``array`` of the source's rows x columns (with or without a trailing channel axis)
        placed into the R x R square: float32, padded with 0. A bool array (a mask) comes back
        bool, True wherever any part of a square pixel was True, so a mask never shrinks."""
        arr = np.asarray(array)
        if arr.shape[:2] != self.source_shape or arr.ndim not in (2, 3):
            raise ValueError(
                f"array of shape {arr.shape} does not have the source shape {self.source_shape}"
            )
        mask = arr.dtype == np.bool_
        resized = _resize(arr, self.size, mask)
        out = np.zeros((self.resolution, self.resolution) + arr.shape[2:], resized.dtype)
        (top, left), (height, width) = self.offset, self.size
        out[top : top + height, left : left + width] = resized
        return out

    def to_source(self, model_array: np.ndarray) -> np.ndarray:
        """An R x R (x channels) array back in the source geometry: the padding cropped, the
        rest resized to the source's rows x columns. float32 (bool for a bool mask, which
        never shrinks)."""
        arr = np.asarray(model_array)
        if arr.shape[:2] != (self.resolution, self.resolution) or arr.ndim not in (2, 3):
            raise ValueError(
                f"model array of shape {arr.shape} is not {self.resolution}x{self.resolution}"
            )
        (top, left), (height, width) = self.offset, self.size
        crop = arr[top : top + height, left : left + width]
        return _resize(crop, self.source_shape, arr.dtype == np.bool_)


@dataclass(frozen=True)
class Frame:
    """One source frame prepared for a model."""

    image: np.ndarray
    """(R, R, 3) float32 in [0, 1]."""
    mapping: Placement
    """How to get back to the source geometry."""


def to_model(frame: np.ndarray, resolution: int) -> Frame:
    """One display frame (rows, columns) or (rows, columns, 3) in [0, 1] as the model's input:
    RGB (grayscale as 3 equal channels), resized without distortion to fit R x R, centred,
    padded with 0. ``resolution`` must be a positive multiple of 8."""
    arr = _frame01(frame, "frame")
    placement = Placement.fit((arr.shape[0], arr.shape[1]), resolution, color=arr.ndim == 3)
    image = np.clip(placement.to_model(arr), 0.0, 1.0)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return Frame(np.ascontiguousarray(image, dtype=np.float32), placement)


def from_model(image: np.ndarray, placement: Placement, *, color: bool | None = None
               ) -> np.ndarray:
    """A model output (R, R, 3) in [0, 1] back in the source geometry, float32 in [0, 1]:
    (rows, columns) as the channel mean, or (rows, columns, 3) where ``color`` is True
    (default: as the source was, ``placement.color``)."""
    arr = np.asarray(image)
    size = placement.resolution
    if arr.shape not in ((size, size, 3), (size, size)):
        raise ValueError(f"model image of shape {arr.shape} is not ({size}, {size}, 3)")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f'model image of dtype "{arr.dtype}" is not numeric')
    back = _unit(placement.to_source(arr.astype(np.float32, copy=False)))
    want_color = placement.color if color is None else color
    if want_color and back.ndim == 2:
        back = np.repeat(back[..., None], 3, axis=-1)
    elif not want_color and back.ndim == 3:
        back = back.mean(axis=-1)
    return _unit(back)


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or (
        resolution < 8 or resolution % 8
    ):
        raise ValueError(f"resolution {resolution!r} is not a positive multiple of 8")


def _scaled(rows: int, cols: int, scale: float, limit: int) -> tuple[int, int]:
    return (min(limit, max(1, round(rows * scale))), min(limit, max(1, round(cols * scale))))


def _resize(arr: np.ndarray, shape: tuple[int, int], mask: bool) -> np.ndarray:
    """``arr`` (rows, columns[, channels]) resized to ``shape``: bicubic (area-averaged when
    shrinking) for values, area coverage > 0 for masks."""
    if arr.shape[:2] == shape:
        return arr.copy() if mask else arr.astype(np.float32)
    method = Image.Resampling.BOX if mask else Image.Resampling.BICUBIC
    size = (shape[1], shape[0])  # Pillow sizes are (width, height)
    planes = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(arr.shape[2])]
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32)).resize(size, method))
        for p in planes
    ]
    result = out[0] if arr.ndim == 2 else np.stack(out, axis=-1)
    return result > 0 if mask else result


# -- regions, canvas, composite, output ------------------------------------------------------

def region_mask(
    shape: tuple[int, int],
    regions: Sequence[Region] = (),
    polygons: Sequence[Polygon] = (),
) -> np.ndarray:
    """A bool (rows, columns) mask, True inside any of ``regions`` (x, y, width, height; x is
    the column) and ``polygons`` ([(x, y), ...], filled, edges included). Parts outside the
    image are ignored."""
    if len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
        raise ValueError(f"shape {tuple(shape)} is not a (rows, columns) pair of positive sizes")
    rows, cols = int(shape[0]), int(shape[1])
    mask = np.zeros((rows, cols), dtype=bool)
    for region in regions:
        if len(region) != 4:
            raise ValueError(f"region {region} is not (x, y, width, height)")
        x, y, width, height = (int(v) for v in region)
        if width < 0 or height < 0:
            raise ValueError(f"region {region} has a negative width or height")
        mask[max(y, 0) : max(y + height, 0), max(x, 0) : max(x + width, 0)] = True
    if polygons:
        canvas = Image.new("L", (cols, rows), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in polygons:
            points = [(float(x), float(y)) for x, y in polygon]
            if len(points) < 3:
                raise ValueError(f"polygon {list(polygon)} has fewer than 3 vertices")
            draw.polygon(points, fill=1, outline=1)
        mask |= np.asarray(canvas, dtype=np.uint8) > 0
    return mask


def outpaint_canvas(
    frame01: np.ndarray, margins: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(canvas, mask): ``frame01`` (rows, columns[, 3], floating) placed unchanged in a canvas
    larger by ``margins`` (top, right, bottom, left) px, the new border filled with the mean of
    the frame's edge pixels (per channel); ``mask`` is True on the new border."""
    arr = _frame01(frame01, "frame01", convert=False)
    if len(margins) != 4:
        raise ValueError(f"margins {margins} are not (top, right, bottom, left)")
    top, right, bottom, left = (int(m) for m in margins)
    if min(top, right, bottom, left) < 0:
        raise ValueError(f"margins {tuple(margins)} are negative")
    rows, cols = arr.shape[:2]
    edge = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    fill = edge.astype(np.float64).mean(axis=0)
    canvas = np.empty((rows + top + bottom, cols + left + right) + arr.shape[2:], arr.dtype)
    canvas[...] = fill
    canvas[top : top + rows, left : left + cols] = arr
    mask = np.ones(canvas.shape[:2], dtype=bool)
    mask[top : top + rows, left : left + cols] = False
    return canvas, mask


def composite(original01: np.ndarray, generated01: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``original01`` where ``keep`` is True (its values bit for bit, in its dtype), else
    ``generated01`` cast to that dtype. ``keep`` is (rows, columns) or the original's shape;
    ``generated01`` has the original's shape."""
    original, generated, keep_arr = np.asarray(original01), np.asarray(generated01), \
        np.asarray(keep)
    if generated.shape != original.shape:
        raise ValueError(
            f"generated01 of shape {generated.shape} does not match original01 {original.shape}"
        )
    if keep_arr.dtype != np.bool_:
        raise ValueError(f'keep of dtype "{keep_arr.dtype}" is not bool')
    if keep_arr.shape != original.shape:
        if keep_arr.shape != original.shape[:2] or original.ndim != 3:
            raise ValueError(
                f"keep of shape {keep_arr.shape} does not match original01 {original.shape}"
            )
        keep_arr = keep_arr[..., None]
    return np.where(keep_arr, original, generated.astype(original.dtype, copy=False))


def to_output(frames01: np.ndarray, *, color: bool, bits: int) -> np.ndarray:
    """Display values in [0, 1] (clipped) as output integers for :class:`node.dicom.Pixels`:
    grayscale uint8 (``bits`` 8) or uint16 scaled to 2**bits - 1 (``bits`` 9..16); RGB uint8
    (``color``, ``bits`` 8). Grayscale is MONOCHROME2 whatever the source was: write it with
    photometric "MONOCHROME2" (MONOCHROME1 sources were inverted by :func:`display_frames`)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 8 <= bits <= 16:
        raise ValueError(f"bits {bits!r} is not in 8..16")
    arr = np.asarray(frames01)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f'frames01 of dtype "{arr.dtype}" is not numeric')
    if color:
        if bits != 8:
            raise ValueError(f"bits {bits} for colour: RGB output is 8 bits")
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError(f"frames01 of shape {arr.shape} is not RGB (..., rows, columns, 3)")
    elif arr.ndim not in (2, 3):
        raise ValueError(f"frames01 of shape {arr.shape} is not grayscale ([F,] rows, columns)")
    # float64 is exact for float32 input: equal inputs give equal outputs, element by element.
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("frames01 has NaN or infinite values")
    top = float((1 << bits) - 1)
    return np.rint(np.clip(values, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


def _frame01(frame: np.ndarray, name: str, *, convert: bool = True) -> np.ndarray:
    """``frame`` checked to be one frame, (rows, columns) or (rows, columns, 3), floating."""
    arr = np.asarray(frame)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        raise ValueError(f"{name} of shape {arr.shape} is not (rows, columns) or "
                         "(rows, columns, 3)")
    if arr.dtype.kind != "f":
        raise ValueError(f'{name} of dtype "{arr.dtype}" is not floating: expected values in '
                         "[0, 1]")
    return arr.astype(np.float32, copy=False) if convert else arr
