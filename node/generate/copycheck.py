"""The copy check: every synthetic output compared with its model's training-set index before it
is released, so that a fine-tuned model that reproduces a training image (memorization) cannot
pass that image off as synthetic.

The index (``synthnode-index.npz`` in the model folder, :data:`training.INDEX_FILE`) holds, for
each training image and for its reconstruction by the model's own VAE (what the model outputs
were it to reproduce the image: every output comes out of that decoder), a feature embedding and
a perceptual hash, with the training instance's SOP Instance UID. It holds no pixels: the
embeddings are summary statistics of the VAE latent on a coarse grid (:class:`VaeFeatures`) or a
TorchScript network's output, the hashes are signs of low-frequency DCT coefficients.

Two measures, each with its threshold (``[generate] copy_feature_threshold``,
``copy_hash_threshold``); an output at or above either is refused:

- feature similarity: cosine similarity in the feature space, both vectors centred on (a shrunk)
  mean of the training embeddings, so that what every image of the domain shares (a chest, two
  lungs) does not count as likeness;
- hash similarity: 1 - Hamming distance / bits between 255-bit DCT perceptual hashes of the
  images as 32 x 32 grayscale (:func:`perceptual_hash`): pixel likeness after resizing.

Building an index (the fine-tune does this once the model folder is saved)::

    from node.generate import copycheck
    index = copycheck.build_index(model_folder, training_set, settings.generate)
    record = TrainingRecord(..., index=index.summary())   # then record.save(model_folder)

Checking (generation does this for every output when the model folder has an index and
``[generate] copy_check`` is on; ``Models.copy_check``)::

    check = copycheck.CopyCheck.load(model_folder, settings.generate, vae=pipe.vae)  # or None
    (score,) = check.score(images, exclude=[source_sop_uid_or_None])
    reason = check.refusal(score)            # "" = passes; else "possible copy of a training ..."

An output made from a source instance (img2img, inpaint, outpaint) is not compared with that
same instance (being like its own source is what those tasks do): ``exclude`` names it.

Default thresholds (feature 0.99, hash 0.95), calibrated with ``bench/copycheck.py`` in the VAE
of the tiny model fitted to phantoms (the tests' ``tiny_base``); min / max over the cases:

- copies of training images, refused: exact 1.000 / 1.000 (hash 1.000); Gaussian noise sigma
  0.05 feature >= 0.998, 0.10 >= 0.995 (hash 0.89-0.95); the VAE's reconstruction 1.000;
  decoded latents with 0.1 std of noise >= 0.993; outputs of a model fine-tuned on one phantom
  for 1500 steps 0.988-0.998 (7 of 8 refused; after 300 steps 0.81-0.93: not yet a copy);
- different images, passed: 400 held-out phantoms against 48 training phantoms, feature max
  0.975, hash max 0.929; against 400, feature max 0.987 (phantoms come from one generator with
  a few shape parameters: far more alike than patients); outputs of a model fine-tuned on 32
  varied phantoms 0.23-0.64; two real radiographs of pydicom-data (RG1, RG3) 0.33, hash 0.56.
- not caught: copies shifted by 1 px of 64 (feature 0.91-0.99) or more.

Real VAEs reconstruct far better than the tiny one, which moves copies closer to 1; a site
should still look at its own distribution (``synthnode model evaluate``) before trusting them.

What the check guarantees and what it does not: it refuses outputs close to a training image
in the chosen feature space or in low-frequency pixel structure, at the thresholds set. It does
not prove an output reveals nothing: a copy shifted, flipped or cropped, or a training image
recombined from parts, can score below the thresholds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from node.files import atomic_open
from node.generate.training import INDEX_FILE, TrainingSet

if TYPE_CHECKING:
    from node.config import GenerateSettings

log = logging.getLogger(__name__)

GRID = 4
"""The VAE latent is summarised on a GRID x GRID grid per channel (mean and spread in each
cell), whatever the resolution: 2 * 4 * 16 = 128 numbers for an SD VAE. Too coarse to decode
into an image (an SD latent at 512 px is 64 x 64)."""

HASH_SIZE = 32
"""Images are hashed as HASH_SIZE x HASH_SIZE grayscale."""

HASH_KEEP = 16
"""The lowest HASH_KEEP x HASH_KEEP DCT coefficients, less the DC term, make the hash's bits."""

HASH_BITS = HASH_KEEP * HASH_KEEP - 1

SHRINK = 4.0
"""Embeddings are centred on ``N / (N + SHRINK)`` times the mean of the N training embeddings:
with a handful of training images their mean is mostly each image's own signal, and centring on
it fully would leave nothing to compare (with one image, a zero vector)."""

INDEX_VERSION = 1

REASON = "possible copy of a training image"
"""How a refusal begins (what ``synthnode jobs`` and ``mirror status`` show)."""

ORIGINAL, RECONSTRUCTION = 0, 1
"""Entry kinds: a training image, or its reconstruction by the model's VAE."""

_BATCH = 16  # images per encoder call


# --- feature spaces ----------------------------------------------------------------------------


class FeatureSpace(Protocol):
    """Maps images to embeddings: (N, H, W, 3) float32 in [0, 1] -> (N, D) float32."""

    name: str
    """What it is, in plain words (recorded in the index and in reports)."""
    key: str
    """What must match between an index and a check: the feature definition and the sha256 of
    the weights that compute it."""

    def embed(self, images: np.ndarray) -> np.ndarray: ...


class VaeFeatures:
    """A model's own VAE encoder: per latent channel, the mean and the spread (standard
    deviation) of the latent means in each cell of a :data:`GRID` x :data:`GRID` grid."""

    def __init__(self, vae: Any, weights_sha256: str, *, batch_size: int = _BATCH) -> None:
        self.vae = vae
        self.name = (f"vae encoder sha256:{weights_sha256[:16]} (latent mean and spread on a "
                     f"{GRID}x{GRID} grid per channel)")
        self.key = f"vae-latent-moments-{GRID}x{GRID}:{weights_sha256}"
        self._batch = batch_size

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        pixels = _check_images(images)
        param = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), self._batch):
                x = torch.from_numpy(pixels[start:start + self._batch]).permute(0, 3, 1, 2)
                x = (x * 2 - 1).to(param.device, param.dtype)
                latent = self.vae.encode(x).latent_dist.mean.float()
                mean = F.adaptive_avg_pool2d(latent, GRID)
                spread = (F.adaptive_avg_pool2d(latent * latent, GRID) - mean * mean).clamp(
                    min=0).sqrt()
                out.append(torch.cat([mean.flatten(1), spread.flatten(1)], 1).cpu().numpy())
        return _stacked(out, 2 * GRID * GRID * int(self.vae.config.latent_channels))


class TorchScriptFeatures:
    """A local TorchScript file (``[generate] copy_features``) mapping (N, 3, H, W) float32 in
    [0, 1] to (N, D). Random weights prove plumbing, not fidelity: use a trained network."""

    def __init__(self, path: Path, device: str = "cpu", *, batch_size: int = _BATCH) -> None:
        import torch

        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f'[generate] copy_features "{path}": no such file (a TorchScript '
                             'file, or "" for the model\'s own VAE encoder)')
        digest = file_sha256(path)
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f'[generate] copy_features "{path}": not a TorchScript file '
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                             ) from None
        self.device = device
        self.name = f"torchscript {path} sha256:{digest[:16]}"
        self.key = f"torchscript:{digest}"
        self._path = path
        self._batch = batch_size

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch

        pixels = _check_images(images)
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), self._batch):
                x = torch.from_numpy(pixels[start:start + self._batch]).permute(0, 3, 1, 2)
                y = self.net(x.to(self.device))
                if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != x.shape[0]:
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(f"[generate] copy_features {self._path}: maps "
                                     f"{tuple(x.shape)} to {shape}, not to (N, D)")
                out.append(y.float().cpu().numpy())
        return _stacked(out, None)


def feature_space(
    settings: GenerateSettings | None, folder: Path, *, vae: Any = None, device: str = "cpu"
) -> FeatureSpace:
    """The copy check's feature space for the model in ``folder``: ``[generate]
    copy_features`` (a TorchScript file) when set, else the model's VAE encoder (``vae``, the
    loaded one, else loaded from ``folder / "vae"``)."""
    from node.generate.models import weights_hash

    if settings is not None and settings.copy_features:
        return TorchScriptFeatures(Path(settings.copy_features), device)
    vae_folder = folder / "vae"
    if not vae_folder.is_dir():
        raise ValueError(f"{folder}: no vae folder, so no VAE features for the copy check "
                         "(set [generate] copy_features to a TorchScript file)")
    if vae is None:
        vae = load_vae(folder, device)
    return VaeFeatures(vae, weights_hash(vae_folder))


def load_vae(folder: Path, device: str = "cpu") -> Any:
    """The VAE of the diffusers folder ``folder``, float32, in eval mode on ``device``."""
    from diffusers import AutoencoderKL

    from node.generate.models import no_progress_bars

    with no_progress_bars():
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    return vae.to(device).eval()


def vae_reconstruct(vae: Any, images: np.ndarray, batch_size: int = _BATCH) -> np.ndarray:
    """``images`` through the VAE (encoded to the latent mean, decoded): (N, H, W, 3) in [0, 1],
    what the model's decoder makes of them."""
    import torch

    pixels = _check_images(images)
    param = next(vae.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(pixels[start:start + batch_size]).permute(0, 3, 1, 2)
            x = (x * 2 - 1).to(param.device, param.dtype)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
            out.append(((y + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else pixels


# --- perceptual hash ---------------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT = _dct_matrix(HASH_SIZE)
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint16)


def perceptual_hash(images: np.ndarray) -> np.ndarray:
    """DCT perceptual hashes of ``images`` ((N, H, W, 3) or (N, H, W) in [0, 1]): each image as
    :data:`HASH_SIZE` x :data:`HASH_SIZE` grayscale (box filter), its lowest :data:`HASH_KEEP` x
    :data:`HASH_KEEP` DCT coefficients less the DC term, one bit per coefficient (above their
    median or not). (N, 32) uint8, :data:`HASH_BITS` bits packed (the last bit always 0)."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr.mean(axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"images: expected (N, H, W[, 3]), got shape {arr.shape}")
    bits = np.zeros((len(arr), HASH_BITS + 1), dtype=bool)
    for n, gray in enumerate(arr):
        small = Image.fromarray(gray, mode="F").resize((HASH_SIZE, HASH_SIZE), Image.Resampling.BOX)
        coeffs = (_DCT @ np.asarray(small, dtype=np.float64) @ _DCT.T)[:HASH_KEEP, :HASH_KEEP]
        low = coeffs.ravel()[1:]
        bits[n, :HASH_BITS] = low > np.median(low)
    return np.packbits(bits, axis=1)


def hash_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - Hamming distance / bits between each hash of ``a`` (N, 32) and each of ``b``
    (M, 32): (N, M) float32 in [0, 1]."""
    out = np.empty((len(a), len(b)), dtype=np.float32)
    for i, h in enumerate(a):
        out[i] = 1.0 - _POPCOUNT[np.bitwise_xor(b, h)].sum(axis=1) / HASH_BITS
    return out


# --- scores ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyScore:
    """How close one output came to the training set: its nearest training image by each
    measure (the two may be different images)."""

    feature: float
    """Highest centred cosine similarity to an index entry, in [-1, 1]."""
    feature_uid: str
    """SOP Instance UID of the training image of that entry ("" when nothing was compared)."""
    hash: float
    """Highest perceptual-hash similarity to an index entry, in [0, 1]."""
    hash_uid: str
    feature_entry: int = -1
    """Index entry of the nearest by features (-1: none)."""
    hash_entry: int = -1

    def describe(self) -> str:
        """For provenance: "copy check: nearest training image feature 0.41, hash 0.62"."""
        if not self.feature_uid:
            return "copy check: no training image to compare with"
        return (f"copy check: nearest training image feature {self.feature:.3f}, "
                f"hash {self.hash:.3f}")

    @staticmethod
    def worst(scores: Sequence[CopyScore]) -> CopyScore:
        """The highest of each measure over ``scores`` (e.g. the frames of one output)."""
        if not scores:
            raise ValueError("no scores")
        f = max(scores, key=lambda s: s.feature if s.feature_uid else -2.0)
        h = max(scores, key=lambda s: s.hash if s.hash_uid else -1.0)
        return CopyScore(f.feature, f.feature_uid, h.hash, h.hash_uid, f.feature_entry,
                         h.hash_entry)


def refusal(score: CopyScore, feature_threshold: float, hash_threshold: float) -> str:
    """Why ``score`` is refused (UIDs and numbers only), or "" when it passes: at or above
    either threshold. E.g. "possible copy of a training image: feature similarity 0.997
    (threshold 0.980), hash similarity 0.961 (threshold 0.950) to training instance 1.2.3"."""
    over_f = bool(score.feature_uid) and score.feature >= feature_threshold
    over_h = bool(score.hash_uid) and score.hash >= hash_threshold
    if not (over_f or over_h):
        return ""
    f = f"feature similarity {score.feature:.3f} (threshold {feature_threshold:.3f})"
    h = f"hash similarity {score.hash:.3f} (threshold {hash_threshold:.3f})"
    if score.feature_uid == score.hash_uid:
        return f"{REASON}: {f}, {h} to training instance {score.feature_uid}"
    if over_f and over_h:
        return (f"{REASON}: {f} to training instance {score.feature_uid}, {h} to training "
                f"instance {score.hash_uid}")
    if over_f:
        return f"{REASON}: {f} to training instance {score.feature_uid}; {h}"
    return f"{REASON}: {h} to training instance {score.hash_uid}; {f}"


@dataclass(frozen=True)
class Refused:
    """A synthetic output the copy check stopped: never to be delivered, only quarantined."""

    dataset: Dataset
    """The output as it would have been sent (its provenance holds the score)."""
    score: CopyScore
    reason: str
    """:func:`refusal`'s text."""

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


# --- the index ---------------------------------------------------------------------------------


class TrainingIndex:
    """Embeddings and perceptual hashes of a model's training images (each image and its VAE
    reconstruction), with their SOP Instance UIDs; never pixels."""

    def __init__(
        self, *, feature_space: str, feature_key: str, embeddings: np.ndarray,
        centre: np.ndarray, hashes: np.ndarray, uids: Sequence[str], kinds: np.ndarray,
        images: int,
    ) -> None:
        emb = np.asarray(embeddings, dtype=np.float32)
        count = len(uids)
        if emb.ndim != 2 or len(emb) != count:
            raise ValueError(f"embeddings: expected ({count}, D), got {emb.shape}")
        if np.asarray(centre).shape != (emb.shape[1],):
            raise ValueError(f"centre: expected ({emb.shape[1]},), got {np.asarray(centre).shape}")
        if np.asarray(hashes).shape != (count, (HASH_BITS + 8) // 8):
            raise ValueError(f"hashes: expected ({count}, {(HASH_BITS + 8) // 8}), got "
                             f"{np.asarray(hashes).shape}")
        if np.asarray(kinds).shape != (count,):
            raise ValueError(f"kinds: expected ({count},), got {np.asarray(kinds).shape}")
        self.feature_space = feature_space
        self.feature_key = feature_key
        self.embeddings = emb
        self.centre = np.asarray(centre, dtype=np.float32)
        self.hashes = np.asarray(hashes, dtype=np.uint8)
        self.uids = [str(u) for u in uids]
        self.kinds = np.asarray(kinds, dtype=np.uint8)
        self.images = int(images)
        self._unit = _unit_rows(self.embeddings - self.centre)
        self._uid_array = np.asarray(self.uids, dtype=object)

    def __len__(self) -> int:
        return len(self.uids)

    @classmethod
    def build(
        cls, images: np.ndarray, uids: Sequence[str], features: FeatureSpace, *,
        reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> TrainingIndex:
        """The index of ``images`` ((N, R, R, 3) float32 in [0, 1]) and their SOP Instance
        UIDs in ``features``; with ``reconstruct`` (the model's VAE round trip,
        :func:`vae_reconstruct`) each image's reconstruction is indexed too, under the same
        UID."""
        pixels = _check_images(images)
        uids = [str(u) for u in uids]
        if len(uids) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(uids)} UIDs")
        if not uids:
            raise ValueError("no training images to index")
        own = features.embed(pixels)
        entries, hashes = [own], [perceptual_hash(pixels)]
        kinds = [np.full(len(uids), ORIGINAL, np.uint8)]
        all_uids = list(uids)
        if reconstruct is not None:
            again = reconstruct(pixels)
            entries.append(features.embed(again))
            hashes.append(perceptual_hash(again))
            kinds.append(np.full(len(uids), RECONSTRUCTION, np.uint8))
            all_uids += uids
        centre = own.mean(axis=0) * (len(own) / (len(own) + SHRINK))
        return cls(feature_space=features.name, feature_key=features.key,
                   embeddings=np.concatenate(entries), centre=centre,
                   hashes=np.concatenate(hashes), uids=all_uids, kinds=np.concatenate(kinds),
                   images=len(uids))

    # -- file --

    def save(self, folder: Path) -> Path:
        """Write ``folder / INDEX_FILE`` (an uncompressed npz: no pickles, no pixels)."""
        path = Path(folder) / INDEX_FILE
        with atomic_open(path) as f:
            np.savez(
                f, version=np.int64(INDEX_VERSION), feature_space=np.str_(self.feature_space),
                feature_key=np.str_(self.feature_key), embeddings=self.embeddings,
                centre=self.centre, hashes=self.hashes, hash_bits=np.int64(HASH_BITS),
                uids=np.asarray(self.uids, dtype=str), kinds=self.kinds,
                images=np.int64(self.images),
            )
        return path

    @classmethod
    def load(cls, folder: Path) -> TrainingIndex | None:
        """The index in ``folder``, or None when it has none. ValueError naming the file when
        it is there but unreadable or of another version."""
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["version"])
                if version != INDEX_VERSION or int(data["hash_bits"]) != HASH_BITS:
                    raise ValueError(f"version {version} with {int(data['hash_bits'])}-bit "
                                     f"hashes; this node reads version {INDEX_VERSION}")
                return cls(feature_space=str(data["feature_space"]),
                           feature_key=str(data["feature_key"]),
                           embeddings=data["embeddings"], centre=data["centre"],
                           hashes=data["hashes"], uids=[str(u) for u in data["uids"]],
                           kinds=data["kinds"], images=int(data["images"]))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a synthnode training-set index ({exc}); rebuild it "
                             "with copycheck.build_index, or remove it to go without the "
                             "copy check") from None

    def summary(self) -> dict[str, Any]:
        """What a training record notes about the index (``TrainingRecord.index``)."""
        return {"file": INDEX_FILE, "feature_space": self.feature_space,
                "feature_key": self.feature_key, "images": self.images, "entries": len(self),
                "dimensions": int(self.embeddings.shape[1]), "hash_bits": HASH_BITS}

    # -- search --

    def nearest(
        self, images: np.ndarray, features: FeatureSpace,
        exclude: Sequence[str | None] | None = None,
    ) -> list[CopyScore]:
        """For each image ((N, R, R, 3) float32 in [0, 1]) its nearest training image by each
        measure, leaving out the entries of ``exclude[i]`` (a SOP Instance UID, or None) for
        image i. ValueError when ``features`` is not the index's feature space."""
        if features.key != self.feature_key:
            raise ValueError(f"the training-set index was built in feature space "
                             f'"{self.feature_space}", not "{features.name}"')
        pixels = _check_images(images)
        skip = list(exclude) if exclude is not None else [None] * len(pixels)
        if len(skip) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(skip)} exclusions")
        if not len(pixels):
            return []
        feature = _unit_rows(features.embed(pixels) - self.centre) @ self._unit.T
        hashed = hash_similarity(perceptual_hash(pixels), self.hashes)
        scores = []
        for i, uid in enumerate(skip):
            f, h = feature[i], hashed[i]
            if uid:
                keep = self._uid_array != uid
                f, h = np.where(keep, f, -np.inf), np.where(keep, h, -np.inf)
            fi, hi = int(np.argmax(f)), int(np.argmax(h))
            if not np.isfinite(f[fi]):
                scores.append(CopyScore(0.0, "", 0.0, ""))
                continue
            scores.append(CopyScore(float(f[fi]), self.uids[fi], float(h[hi]), self.uids[hi],
                                    fi, hi))
        return scores


def build_index(
    folder: Path, training: TrainingSet, settings: GenerateSettings | None = None, *,
    device: str | None = None,
) -> TrainingIndex:
    """Index the training images of the model saved in ``folder`` (a diffusers folder: call
    this after saving the fine-tuned model) and write ``folder / INDEX_FILE``. The feature space
    is what generation will use for this model: ``settings.copy_features`` when set, else the
    folder's own VAE encoder; each image's VAE reconstruction is indexed beside it. ``device``:
    default ``settings.device`` resolved ("cpu" without settings). Returns the index (note its
    :meth:`TrainingIndex.summary` in the training record)."""
    from node.generate.models import resolve_device

    folder = Path(folder)
    if device is None:
        device = resolve_device(settings.device) if settings is not None else "cpu"
    vae = load_vae(folder, device)
    features = feature_space(settings, folder, vae=vae, device=device)
    index = TrainingIndex.build(training.images, [e.sop_instance_uid for e in training.examples],
                                features, reconstruct=lambda x: vae_reconstruct(vae, x))
    index.save(folder)
    log.info("training-set index of %s: %d images (%d entries) in %s", folder, index.images,
             len(index), index.feature_space)
    return index


class CopyCheck:
    """A model's index, the feature space it was built in, and the thresholds: what generation
    runs on every output."""

    def __init__(self, index: TrainingIndex, features: FeatureSpace, feature_threshold: float,
                 hash_threshold: float) -> None:
        if features.key != index.feature_key:
            raise ValueError(f'the training-set index was built in feature space '
                             f'"{index.feature_space}", but the copy check would use '
                             f'"{features.name}": set [generate] copy_features to what the '
                             "index was built with, or rebuild the index")
        self.index = index
        self.features = features
        self.feature_threshold = feature_threshold
        self.hash_threshold = hash_threshold

    @classmethod
    def load(cls, folder: Path, settings: GenerateSettings, *, vae: Any = None,
             device: str = "cpu") -> CopyCheck | None:
        """The check for the model in ``folder``: None when ``[generate] copy_check`` is off or
        the folder has no index. ValueError naming the problem when the index is unreadable or
        was built in another feature space than the settings give."""
        if not settings.copy_check or not Path(folder).is_dir():
            return None
        index = TrainingIndex.load(folder)
        if index is None:
            return None
        features = feature_space(settings, Path(folder), vae=vae, device=device)
        return cls(index, features, settings.copy_feature_threshold,
                   settings.copy_hash_threshold)

    def score(self, images: np.ndarray, exclude: Sequence[str | None] | None = None
              ) -> list[CopyScore]:
        """:meth:`TrainingIndex.nearest` in this check's feature space."""
        return self.index.nearest(images, self.features, exclude)

    def refusal(self, score: CopyScore) -> str:
        """:func:`refusal` at this check's thresholds: "" = passes."""
        return refusal(score, self.feature_threshold, self.hash_threshold)

    def describe(self) -> str:
        return (f"copy check against {self.index.images} training images in "
                f"{self.index.feature_space}, thresholds feature {self.feature_threshold:g}, "
                f"hash {self.hash_threshold:g}")


# --- helpers -----------------------------------------------------------------------------------


def _check_images(images: np.ndarray) -> np.ndarray:
    pixels = np.ascontiguousarray(images, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3) float in [0, 1], got {pixels.shape}")
    return pixels


def _stacked(parts: list[np.ndarray], dims: int | None) -> np.ndarray:
    if parts:
        return np.concatenate(parts).astype(np.float32)
    return np.zeros((0, dims or 0), dtype=np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes (a feature network's, in its feature space's name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
