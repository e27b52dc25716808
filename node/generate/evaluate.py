"""``synthnode model evaluate``: how a model's images compare with held-out real ones.

For a model and a held-out set of de-identified studies (never trained on), the model makes K
text2img images for each of N prompts taken from the held-out reports, and these are measured:

- **FID** (Fréchet distance between Gaussian fits of image features, generated vs held-out real)
  in every feature space available offline: the model's own VAE encoder (always; not a
  perceptual network) and each local TorchScript file in ``[generate] evaluate_features``;
- **MS-SSIM diversity**: the mean pairwise MS-SSIM among the K images of one prompt (lower =
  more diverse), next to the same for pairs of held-out real images;
- **copy scores**: each generated image's similarity to its nearest training image in the
  model's training-set index, as a distribution and counts above the copy-check thresholds; the
  held-out real images' scores beside them (what a new real image scores: the false-positive
  side of the thresholds);
- a **sheet** (PNG): each generated image beside its nearest training image, scores labelled.

Prompts are identified by the held-out instance they came from (UIDs): report text is never
printed or drawn.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
"""Quantiles reported for the copy-score distributions."""

MAX_REAL_PAIRS = 256
"""At most this many pairs of held-out real images for the MS-SSIM baseline."""

# --- FID ---------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussian fits of the rows of ``a`` (n1, D) and ``b``
    (n2, D): ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))`` with the unbiased
    sample covariances S.

    Exact for singular covariances too (fewer samples than dimensions): with centred data X,
    ``Tr((S_a S_b)^(1/2))`` is the sum of singular values of ``X_b X_a^T`` over
    ``sqrt((n1 - 1)(n2 - 1))``, since the non-zero eigenvalues of S_a S_b are those of
    ``(X_b X_a^T)^T (X_b X_a^T)`` scaled; when D is smaller than the sample counts the same
    trace comes from the D x D covariances through symmetric eigendecompositions
    (``S_a^(1/2) S_b S_a^(1/2)``). Neither route forms a non-symmetric matrix square root, so
    no imaginary parts or eigenvalue noise of a near-singular product arise."""
    x = _features(a, "a")
    y = _features(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of different dimension: {x.shape[1]} and {y.shape[1]}")
    n1, n2, dim = len(x), len(y), x.shape[1]
    mean_term = float(np.sum((x.mean(0) - y.mean(0)) ** 2))
    xc, yc = x - x.mean(0), y - y.mean(0)
    trace_a = float(np.sum(xc * xc)) / (n1 - 1)
    trace_b = float(np.sum(yc * yc)) / (n2 - 1)
    if dim <= min(n1, n2):
        sa = xc.T @ xc / (n1 - 1)
        sb = yc.T @ yc / (n2 - 1)
        root_a = _psd_sqrt(sa)
        middle = root_a @ sb @ root_a
        eig = np.linalg.eigvalsh((middle + middle.T) / 2)
        cross = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    else:
        singular = np.linalg.svd(yc @ xc.T, compute_uv=False)
        cross = float(np.sum(singular)) / math.sqrt((n1 - 1) * (n2 - 1))
    # Rounding can take a distance of identical sets a hair below 0.
    return max(0.0, mean_term + trace_a + trace_b - 2.0 * cross)


def _features(arr: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(arr, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features {name}: expected (n, D), got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"features {name}: a covariance needs at least 2 samples, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"features {name}: not all finite")
    return x


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    below 0 from rounding taken as 0)."""
    eig, vec = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


@dataclass(frozen=True)
class Fid:
    """One FID and what it was computed from."""

    value: float
    n_generated: int
    n_real: int
    dim: int
    """Feature dimension D."""
    real_split: float | None
    """FID between two halves of the real images: the floor this n allows (None with < 4)."""

    @property
    def rank_deficient(self) -> bool:
        """Fewer samples than dimensions: the covariances are singular (rank at most n - 1)."""
        return min(self.n_generated, self.n_real) - 1 < self.dim

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rank_deficient": self.rank_deficient}


def fid(generated: np.ndarray, real: np.ndarray) -> Fid:
    """FID of generated against real features (rows), with the real-vs-real floor."""
    split = None
    if len(real) >= 4:
        half = len(real) // 2
        split = frechet_distance(real[:half], real[half : 2 * half])
    return Fid(frechet_distance(generated, real), len(generated), len(real),
               int(np.asarray(real).shape[1]), split)


# --- MS-SSIM -----------------------------------------------------------------------------------

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales


@dataclass(frozen=True)
class MsSsimParams:
    """The MS-SSIM settings used at one resolution (pytorch-msssim's ``ms_ssim``)."""

    resolution: int
    win_size: int
    """Gaussian window in px: 11 (the standard) where the image allows, else the largest odd
    size that survives the 4 halvings (the smaller side must exceed (win - 1) * 16)."""
    win_sigma: float
    """1.5 for 11 px, scaled with the window below that."""
    weights: tuple[float, ...]
    data_range: float = 1.0
    channels: str = "grey (mean of RGB)"


def ms_ssim_params(resolution: int) -> MsSsimParams:
    """The MS-SSIM settings for square images of ``resolution`` px. ValueError below 33 px,
    where not even a 3 px window survives MS-SSIM's 4 halvings."""
    win = 11
    while win >= 3 and (win - 1) * 16 >= resolution:
        win -= 2
    if win < 3:
        raise ValueError(f"MS-SSIM needs images larger than 32 px (5 scales, a 3 px window at "
                         f"the coarsest); these are {resolution} px")
    return MsSsimParams(resolution, win, round(1.5 * win / 11, 4), _MS_SSIM_WEIGHTS)


def _grey_tensor(images: np.ndarray) -> Any:
    import torch

    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr.mean(axis=-1)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"images: expected (N, R, R[, 3]), got shape {np.shape(images)}")
    return torch.from_numpy(np.ascontiguousarray(arr))[:, None]


def ms_ssim_pairs(images: np.ndarray, pairs: list[tuple[int, int]],
                  params: MsSsimParams) -> np.ndarray:
    """MS-SSIM of each pair (i, j) of ``images`` ((N, R, R) or (N, R, R, 3) in [0, 1]; RGB is
    taken as its grey mean)."""
    import torch
    from pytorch_msssim import ms_ssim

    if not pairs:
        return np.zeros(0)
    grey = _grey_tensor(images)
    if grey.shape[-1] != params.resolution:
        raise ValueError(f"images are {grey.shape[-1]} px, params for {params.resolution} px")
    first = torch.tensor([i for i, _ in pairs])
    second = torch.tensor([j for _, j in pairs])
    with torch.no_grad():
        values = ms_ssim(grey[first], grey[second], data_range=params.data_range,
                         size_average=False, win_size=params.win_size,
                         win_sigma=params.win_sigma, weights=list(params.weights))
    return values.double().numpy()


def diversity(groups: list[np.ndarray], params: MsSsimParams) -> dict[str, Any]:
    """Mean pairwise MS-SSIM within each group (the K images of one prompt) and their mean.
    Groups of fewer than 2 images have none (None)."""
    per_group: list[float | None] = []
    for images in groups:
        pairs = list(itertools.combinations(range(len(images)), 2))
        per_group.append(float(ms_ssim_pairs(images, pairs, params).mean()) if pairs else None)
    known = [v for v in per_group if v is not None]
    return {"mean": float(np.mean(known)) if known else None, "per_prompt": per_group,
            "pairs_per_prompt": max((len(g) * (len(g) - 1) // 2 for g in groups), default=0)}


def real_pairs(count: int, limit: int = MAX_REAL_PAIRS, seed: int = 0) -> list[tuple[int, int]]:
    """Pairs of distinct real images for the MS-SSIM baseline: all of them, or ``limit`` drawn
    without replacement (seeded)."""
    every = list(itertools.combinations(range(count), 2))
    if len(every) <= limit:
        return every
    rng = np.random.default_rng(seed)
    return [every[i] for i in sorted(rng.choice(len(every), size=limit, replace=False))]


# --- copy-score distributions ------------------------------------------------------------------


def distribution(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Quantiles of ``scores`` and how many reach ``threshold`` (the copy check refuses at
    ``score >= threshold``)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "quantiles": {}, "threshold": threshold, "at_or_above": 0}
    return {
        "n": int(values.size),
        "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in QUANTILES},
        "mean": float(values.mean()),
        "threshold": threshold,
        "at_or_above": int(np.sum(values >= threshold)),
    }


# --- the sheet ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SheetCell:
    """One generated image on the sheet, with its nearest training image."""

    generated: np.ndarray
    """(R, R) or (R, R, 3) in [0, 1]."""
    nearest: np.ndarray | None
    """The nearest training image, or None (not available: the cell is left blank)."""
    lines: tuple[str, ...]
    """Label lines under the pair (seed, scores, the nearest instance's UID)."""
    flagged: bool = False
    """At or above a copy-check threshold: framed in red."""
    blank_reason: str = ""
    """Drawn in the blank cell when ``nearest`` is None."""


@dataclass(frozen=True)
class SheetLayout:
    """Where things go on the sheet: a header, then one row per prompt holding its K tiles;
    a tile is the generated image and (``paired``) its nearest training image side by side,
    ``label_lines`` lines of text under them."""

    rows: int
    cols: int
    cell: int
    """Displayed image size in px."""
    paired: bool
    label_lines: int = 3
    header_lines: int = 3
    pad: int = 6
    line: int = 12
    """Height of a text line in px (a 10 px font)."""

    @property
    def tile_width(self) -> int:
        return self.cell * (2 if self.paired else 1)

    @property
    def tile_height(self) -> int:
        return self.cell + self.label_lines * self.line

    @property
    def header_height(self) -> int:
        return self.pad + self.header_lines * self.line

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in px."""
        return (self.pad + self.cols * (self.tile_width + self.pad),
                self.header_height + self.pad + self.rows * (self.tile_height + self.pad))

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top left corner of the generated image of tile (row, col); its
        nearest training image starts ``cell`` px to the right."""
        return (self.pad + col * (self.tile_width + self.pad),
                self.header_height + self.pad + row * (self.tile_height + self.pad))


def sheet_cell_size(resolution: int) -> int:
    """Displayed image size: the model's resolution, at least 96 px (room for the labels) and
    at most 192 px (a sheet of dozens of images stays a few MB)."""
    return max(96, min(192, resolution))


def _to_pil(image: np.ndarray, size: int) -> Any:
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=-1)
    grey = Image.fromarray(np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8))
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return grey


def write_sheet(path: Path, cells: list[list[SheetCell]], header: list[str]) -> dict[str, Any]:
    """The sheet as a PNG at ``path``: row r holds ``cells[r]``; paired (a second image column)
    when any cell has a nearest image or a reason for its absence. Returns what was written
    (path, size, layout)."""
    from PIL import Image, ImageDraw, ImageFont

    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    if not rows or not cols:
        raise ValueError("the sheet needs at least one image")
    first = cells[0][0].generated
    cell = sheet_cell_size(int(np.shape(first)[0]))
    paired = any(c.nearest is not None or c.blank_reason for r in cells for c in r)
    layout = SheetLayout(rows, cols, cell, paired, header_lines=max(1, len(header)))
    sheet = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    for i, text in enumerate(header):
        draw.text((layout.pad, layout.pad + i * layout.line), text, fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        for c, item in enumerate(row):
            x, y = layout.origin(r, c)
            sheet.paste(_to_pil(item.generated, cell), (x, y))
            if paired:
                if item.nearest is not None:
                    sheet.paste(_to_pil(item.nearest, cell), (x + cell, y))
                else:
                    draw.rectangle((x + cell, y, x + 2 * cell - 1, y + cell - 1),
                                   fill=(200, 200, 200))
                    for k, word in enumerate(_wrap(item.blank_reason, cell)):
                        draw.text((x + cell + 3, y + 3 + k * layout.line), word,
                                  fill=(0, 0, 0), font=font)
            if item.flagged:
                draw.rectangle((x - 2, y - 2, x + layout.tile_width + 1, y + cell + 1),
                               outline=(220, 0, 0), width=2)
            for k, text in enumerate(item.lines[: layout.label_lines]):
                draw.text((x, y + cell + k * layout.line), text,
                          fill=(220, 0, 0) if item.flagged else (0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    width, height = layout.size
    return {"path": str(path), "width": width, "height": height, "rows": rows, "cols": cols,
            "cell_px": cell, "paired": paired}


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    """``text`` in lines of at most ``width_px`` at ~``char_px`` per character."""
    per_line = max(4, (width_px - 6) // char_px)
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= per_line:
            lines[-1] += " " + word
        else:
            lines.append(word[:per_line])
    return lines
