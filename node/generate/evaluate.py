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
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from node.config import GenerateSettings
    from node.generate.copycheck import CopyScore, FeatureSpace
    from node.generate.models import Models
    from node.generate.training import TrainingSet

log = logging.getLogger(__name__)

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


# --- the evaluation ----------------------------------------------------------------------------

VAE_NOTE = ("the model's own VAE encoder is not a perceptual network: its FID compares models "
            "with each other on this data, not with published FID values (Inception)")
TORCHSCRIPT_NOTE = ("a local TorchScript network: its FID is as meaningful as its weights "
                    "(random weights measure nothing)")


def choose_prompts(count: int, available: int) -> list[int]:
    """Indices of ``count`` held-out examples whose texts become the prompts, spread evenly
    over the ``available`` ones (all of them when there are fewer)."""
    if count < 1:
        raise ValueError(f"--prompts {count}: at least 1")
    if available <= count:
        return list(range(available))
    return sorted({int(round(i)) for i in np.linspace(0, available - 1, count)})


def seeds_for(prompt: int, per_prompt: int, seed: int) -> list[int]:
    """The seeds of one prompt's images: ``seed + prompt * per_prompt + k``, k < per_prompt."""
    return [seed + prompt * per_prompt + k for k in range(per_prompt)]


def _grey3(images: np.ndarray) -> np.ndarray:
    """RGB model outputs as the node delivers text2img: grey (the mean), as 3 equal channels."""
    grey = np.asarray(images, dtype=np.float32).mean(axis=-1, keepdims=True)
    return np.ascontiguousarray(np.repeat(grey, 3, axis=-1))


@dataclass(frozen=True)
class Space:
    """A feature space FID is computed in, as the report names it."""

    features: FeatureSpace
    kind: str
    """"vae" (the model's own encoder) or "torchscript" (a local file)."""
    path: str = ""
    sha256: str = ""
    note: str = ""

    def describe(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.features.name, "kind": self.kind,
                                 "perceptual": False if self.kind == "vae" else None,
                                 "note": self.note}
        if self.path:
            found.update(path=self.path, sha256=self.sha256)
        return found


def feature_spaces(settings: GenerateSettings, folder: Path, vae: Any,
                   device: str) -> list[Space]:
    """Every feature space available offline: the model's VAE encoder (always), then each file
    of ``[generate] evaluate_features`` and ``copy_features`` (once each). ValueError naming
    the setting and the file when one is missing or not TorchScript."""
    from node.generate.copycheck import TorchScriptFeatures, feature_space, file_sha256

    spaces = [Space(feature_space(None, folder, vae=vae, device=device), "vae", note=VAE_NOTE)]
    files = [("evaluate_features", f) for f in settings.evaluate_features]
    if settings.copy_features:
        files.append(("copy_features", settings.copy_features))
    seen: set[Path] = set()
    for key, name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f'[generate] {key} "{name}": no such file (a local TorchScript '
                             "file mapping (N, 3, H, W) in [0, 1] to (N, D))")
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            features = TorchScriptFeatures(path, device)
        except ValueError as exc:
            raise ValueError(str(exc).replace("[generate] copy_features", f"[generate] {key}")
                             ) from None
        spaces.append(Space(features, "torchscript", str(path), file_sha256(path),
                            TORCHSCRIPT_NOTE))
    return spaces


def _embed(space: Space, images: np.ndarray) -> np.ndarray:
    out = np.asarray(space.features.embed(images), dtype=np.float64)
    if out.ndim != 2 or len(out) != len(images) or not np.all(np.isfinite(out)):
        raise ValueError(f"feature space {space.features.name}: gave {out.shape} (finite: "
                         f"{bool(np.all(np.isfinite(out)))}) for {len(images)} images")
    return out


def _copy_scores(
    settings: GenerateSettings, folder: Path, vae: Any, device: str, generated: np.ndarray,
    real: np.ndarray, real_uids: list[str],
) -> tuple[dict[str, Any], list[CopyScore] | None]:
    """The copy-score distributions (generated, held-out real) against the model's index, and
    the generated images' scores; ({"available": False, "reason": ...}, None) without one."""
    from node.generate.copycheck import TrainingIndex, feature_space, refusal

    index = TrainingIndex.load(folder)
    if index is None:
        return {"available": False,
                "reason": f"the model folder has no training-set index ({folder.name}/"
                          "synthnode-index.npz): a model not fine-tuned by synthnode, so no "
                          "training images to compare with"}, None
    features = feature_space(settings, folder, vae=vae, device=device)
    try:
        made = index.nearest(generated, features)
        held = index.nearest(real, features)
    except ValueError as exc:
        return {"available": False, "reason": str(exc)}, None
    ft, ht = settings.copy_feature_threshold, settings.copy_hash_threshold

    def side(scores: list[CopyScore]) -> dict[str, Any]:
        return {"feature": distribution(np.array([s.feature for s in scores]), ft),
                "hash": distribution(np.array([s.hash for s in scores]), ht),
                "refused": sum(1 for s in scores if refusal(s, ft, ht))}

    trained = set(index.uids)
    overlap = sum(1 for uid in real_uids if uid in trained)
    return {
        "available": True,
        "feature_space": index.feature_space,
        "index_images": index.images,
        "index_entries": len(index),
        "thresholds": {"feature": ft, "hash": ht},
        "generated": side(made),
        "held_out": side(held),
        "per_image": [{"feature": s.feature, "feature_uid": s.feature_uid, "hash": s.hash,
                       "hash_uid": s.hash_uid, "refused": bool(refusal(s, ft, ht))}
                      for s in made],
        "held_out_in_training_set": overlap,
    }, made


def evaluate(
    settings: GenerateSettings, held_out: Sequence[Path], *, train: Sequence[Path] = (),
    prompts: int = 8, per_prompt: int = 4, steps: int | None = None, seed: int = 0,
    sheet: Path | None = None, models: Models | None = None,
) -> dict[str, Any]:
    """Evaluate the model of ``settings`` (``[generate] model``) against the de-identified
    studies in ``held_out``: ``prompts`` of their texts, ``per_prompt`` images each (seeds
    :func:`seeds_for`), ``steps`` denoising steps (default ``[generate] steps``); FID in every
    feature space, MS-SSIM diversity, copy scores, and the sheet written to ``sheet`` (None:
    none). ``train``: the training studies, for the sheet's nearest images. Returns the report
    (JSON-ready: numbers, UIDs, paths, hashes; no report text). ValueError on bad input."""
    from node.generate.trainset import collect

    if per_prompt < 1:
        raise ValueError(f"--per-prompt {per_prompt}: at least 1")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: at least 1")
    from node.generate.models import Models, fit_prompt

    if models is None:
        models = Models(settings)
    info = models.info
    folder: Path = models._folder_path
    vae = models._text.vae
    resolution = info.resolution
    params = ms_ssim_params(resolution)  # before generating: fails fast on a tiny resolution
    spaces = feature_spaces(settings, folder, vae, info.device)

    # 1. the held-out images and the prompts from their texts
    held = collect(list(held_out), resolution, settings.prompt_templates)
    if len(held.examples) < 2:
        raise ValueError(f"the held-out set has {len(held.examples)} usable image: FID needs "
                         "at least 2 (more than 50 for a figure worth comparing)")
    real = held.images
    chosen = choose_prompts(prompts, len(held.examples))
    fitted = [fit_prompt(models._text.tokenizer, held.examples[i].text) for i in chosen]
    texts = [text for text, _ in fitted]

    # 2. generate: per_prompt images of each prompt, each its own seed
    all_prompts = [t for t in texts for _ in range(per_prompt)]
    all_seeds = [s for p in range(len(texts)) for s in seeds_for(p, per_prompt, seed)]
    log.info("generating %d images (%d prompts x %d) at %d px", len(all_prompts), len(texts),
             per_prompt, resolution)
    generated = _grey3(models.text2img(all_prompts, all_seeds, steps=steps))

    # 3. FID in each feature space
    fids = []
    for space in spaces:
        result = fid(_embed(space, generated), _embed(space, real)) if len(generated) >= 2 \
            else None
        fids.append({"feature_space": space.features.name, "kind": space.kind,
                     **(result.as_dict() if result else {"value": None,
                                                         "n_generated": len(generated)})})

    # 4. MS-SSIM within each prompt, and among held-out real images
    groups = [generated[p * per_prompt:(p + 1) * per_prompt] for p in range(len(texts))]
    pairs = real_pairs(len(real))
    real_values = ms_ssim_pairs(real, pairs, params)
    ms = {"params": asdict(params),
          "generated": diversity(groups, params),
          "held_out": {"mean": float(real_values.mean()) if len(pairs) else None,
                       "pairs": len(pairs)}}

    # 5. copy scores against the training-set index
    copies, scores = _copy_scores(settings, folder, vae, info.device, generated, real,
                                  [e.sop_instance_uid for e in held.examples])

    report: dict[str, Any] = {
        "model": {"id": info.model_id, "weights_sha256": info.weights_hash,
                  "resolution": resolution, "device": info.device, "dtype": info.dtype,
                  "training_record": info.training or None},
        "held_out": {"images": len(held.examples), "data_sha256": held.data_hash,
                     "skipped": dict(held.skipped)},
        "generation": {
            "task": "text2img", "prompts": len(texts), "per_prompt": per_prompt,
            "images": len(generated), "steps": settings.steps if steps is None else steps,
            "guidance": settings.guidance, "scheduler": settings.scheduler,
            "seeds": [min(all_seeds), max(all_seeds)],
            "prompts_cut": sum(cut for _, cut in fitted),
            "prompt_sources": [{"sop_instance_uid": held.examples[i].sop_instance_uid,
                                "study_instance_uid": held.examples[i].study_instance_uid,
                                "text_source": held.examples[i].text_source} for i in chosen],
        },
        "feature_spaces": [s.describe() for s in spaces],
        "fid": fids,
        "ms_ssim": ms,
        "copy_scores": copies,
    }

    # 6. the sheet
    if sheet is not None:
        training = collect(list(train), resolution, settings.prompt_templates) if train else None
        report["sheet"] = _sheet(sheet, groups, all_seeds, per_prompt, scores, training,
                                 copies, f"{Path(info.model_id).name} (weights sha256 "
                                 f"{info.weights_hash[:16]})")
    return report


def _sheet(
    path: Path, groups: list[np.ndarray], seeds: list[int], per_prompt: int,
    scores: list[CopyScore] | None, training: TrainingSet | None, copies: dict[str, Any],
    model: str,
) -> dict[str, Any]:
    """Each generated image (one row per prompt) beside its nearest training image."""
    from node.generate.copycheck import refusal

    by_uid = {e.sop_instance_uid: e.image for e in training.examples} if training else {}
    header = [f"synthnode model evaluate: {model}; one row per prompt, "
              f"{per_prompt} seeds each"]
    t = copies.get("thresholds", {})
    if scores is None:
        header.append(f"no copy scores: {copies.get('reason', '')}"[:160])
    else:
        header.append(f"left: generated; right: nearest training image by features. "
                      f"Red: at or above a threshold (feature {t['feature']:g}, hash "
                      f"{t['hash']:g})")
        if training is None:
            header.append("training images not shown: give --train with the training studies")
    cells: list[list[SheetCell]] = []
    for p, images in enumerate(groups):
        row = []
        for k, image in enumerate(images):
            n = p * per_prompt + k
            if scores is None:
                row.append(SheetCell(image, None, (f"prompt {p + 1} seed {seeds[n]}",)))
                continue
            s = scores[n]
            nearest = by_uid.get(s.feature_uid)
            why = "" if nearest is not None else (
                "not shown: --train not given" if training is None
                else "not shown: not in --train")
            lines = (f"prompt {p + 1} seed {seeds[n]}",
                     f"feature {s.feature:.3f} hash {s.hash:.3f}",
                     f"...{s.feature_uid[-18:]}")
            flagged = bool(refusal(s, t["feature"], t["hash"]))
            row.append(SheetCell(image, nearest, lines, flagged, why))
        cells.append(row)
    return write_sheet(path, cells, header)


# --- the text summary --------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


_NO_RECORD = "none (not made by synthnode model finetune)"


def summary(report: dict[str, Any]) -> str:
    """``report`` for people: what was measured, in what, from how many images."""
    m, g, h = report["model"], report["generation"], report["held_out"]
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(h["skipped"].items())) or "none"
    lines = [
        f"model {m['id']} (weights sha256 {m['weights_sha256'][:16]}, {m['resolution']} px, "
        f"{m['device']} {m['dtype']})",
        f"  training record: {m['training_record'] or _NO_RECORD}",
        f"held-out: {h['images']} images (other files, not used as images: {skipped})",
        f"generated: {g['prompts']} prompts x {g['per_prompt']} = {g['images']} images "
        f"(text2img, {g['steps']} steps, guidance {g['guidance']:g}, {g['scheduler']}, seeds "
        f"{g['seeds'][0]}-{g['seeds'][1]}); prompts are the texts of held-out instances "
        f"(report text not shown; {g['prompts_cut']} cut to the text encoder's length): "
        + ", ".join(p["sop_instance_uid"] for p in g["prompt_sources"]),
        "",
        "FID, generated vs held-out real (lower = closer); n generated / n real, D dimensions",
    ]
    for space, result in zip(report["feature_spaces"], report["fid"], strict=True):
        lines.append(f"  {space['name']}")
        if space.get("sha256"):
            lines.append(f"    file {space['path']} sha256 {space['sha256']}")
        if result["value"] is None:
            lines.append("    not computed: fewer than 2 generated images")
            continue
        lines.append(f"    FID {_num(result['value'], 4)}  ({result['n_generated']} / "
                     f"{result['n_real']}, D {result['dim']}); real-vs-real floor at this n "
                     f"{_num(result['real_split'], 4)}")
        if result["rank_deficient"]:
            lines.append("    fewer images than dimensions: the covariances are singular; the "
                         "distance is computed exactly but is biased upward at this n: compare "
                         "FIDs only at equal n in the same feature space")
        lines.append(f"    note: {space['note']}")
    ms = report["ms_ssim"]
    p = ms["params"]
    lines += [
        "",
        f"MS-SSIM within a prompt (lower = more diverse; {len(p['weights'])} scales, window "
        f"{p['win_size']} px, sigma {p['win_sigma']:g}, {p['channels']}, {p['resolution']} px)",
        f"  generated: {_num(ms['generated']['mean'])} (mean over {g['prompts']} prompts, "
        f"{ms['generated']['pairs_per_prompt']} pairs each)",
        f"  held-out real pairs: {_num(ms['held_out']['mean'])} ({ms['held_out']['pairs']} "
        "pairs; different studies, so not a within-prompt figure: a scale for the one above)",
        "",
    ]
    c = report["copy_scores"]
    if not c["available"]:
        lines.append(f"copy scores: not computed: {c['reason']}")
    else:
        t = c["thresholds"]
        lines.append(f"copy scores: nearest of {c['index_images']} training images "
                     f"({c['feature_space']}); refused at feature >= {t['feature']:g} or hash "
                     f">= {t['hash']:g}")
        heads = "".join(f"{q:>8}" for q in ("min", "p5", "p25", "median", "p75", "p95", "max"))
        lines.append(f"  {'':<22}{heads}  at/above")
        for who, label in (("generated", "generated"), ("held_out", "held-out real")):
            for measure in ("feature", "hash"):
                d = c[who][measure]
                qs = "".join(f"{d['quantiles'].get(k, float('nan')):>8.3f}"
                             for k in ("0", "0.05", "0.25", "0.5", "0.75", "0.95", "1"))
                lines.append(f"  {label + ' ' + measure:<22}{qs}  {d['at_or_above']}/{d['n']}")
        lines.append(f"  refused: {c['generated']['refused']} of {g['images']} generated; "
                     f"{c['held_out']['refused']} of {h['images']} held-out real images would "
                     "be (a new real image refused is a false positive of the thresholds)")
        if c["held_out_in_training_set"]:
            lines.append(f"  WARNING: {c['held_out_in_training_set']} held-out images are "
                         "training images of this model (same SOP Instance UID): not held out")
    if "sheet" in report:
        s = report["sheet"]
        lines += ["", f"sheet: {s['path']} ({s['width']} x {s['height']} px)"]
    return "\n".join(lines)
