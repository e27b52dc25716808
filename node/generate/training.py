"""What a fine-tune learns from and what it leaves in the model folder: the shared vocabulary of
``trainset`` (the pairs), ``finetune`` (the training), ``copycheck`` (the training-set index) and
``evaluate``.

A fine-tuned model folder is a plain diffusers folder (``StableDiffusionPipeline``) plus:

- ``synthnode-training.json`` (:data:`TRAINING_RECORD`): how it was made (:class:`TrainingRecord`);
- ``synthnode-index.npz`` (:data:`INDEX_FILE`): the training-set index for the copy check
  (embeddings and perceptual hashes, never pixels).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.files import atomic_write

TRAINING_RECORD = "synthnode-training.json"
"""File in a fine-tuned model folder: its :class:`TrainingRecord` as JSON."""

INDEX_FILE = "synthnode-index.npz"
"""File in a fine-tuned model folder: its training-set index (``copycheck.TrainingIndex``)."""


@dataclass(frozen=True)
class Example:
    """One training pair: an image at the model's resolution and the text it is learned with."""

    sop_instance_uid: str
    """The (de-identified) instance the image came from: what the copy check excludes when an
    output is made from that very instance (img2img, inpaint, outpaint)."""
    study_instance_uid: str
    image: np.ndarray
    """(R, R, 3) float32 in [0, 1]: display values (modality LUT, VOI, MONOCHROME1 inverted),
    fitted into the model's square keeping the aspect ratio (``pixels.to_model``)."""
    text: str
    """The cleaned text (no placeholders, pseudonyms or dummy values)."""
    text_source: str
    """Where the text came from: "sr" (the study's SR), "file" (a report file beside it) or
    "template" (the prompt template over the instance's attributes)."""


@dataclass
class TrainingSet:
    """The pairs a fine-tune trains on, and what was left out and why."""

    examples: list[Example]
    data_hash: str
    """SHA-256 (hex) over the examples' images (as float32 bytes) and texts, in order: the same
    data gives the same hash, whatever folder it was read from."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of files left out (not de-identified, synthetic, not an image, ...)."""

    @property
    def images(self) -> np.ndarray:
        """(N, R, R, 3) float32 in [0, 1]."""
        return np.stack([e.image for e in self.examples]) if self.examples else (
            np.zeros((0, 0, 0, 3), dtype=np.float32))

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]


@dataclass(frozen=True)
class TrainingRecord:
    """How a fine-tuned model was made; carried by the model folder and, in short, by every
    synthetic output made with it (its provenance)."""

    base_model: str
    """The base as given ("tiny", a folder, a single file)."""
    base_weights_hash: str
    data_hash: str
    images: int
    steps: int
    settings: dict[str, Any]
    """Method (full or lora), learning rate, batch, resolution, text encoder trained or not,
    precision, seed, ..."""
    final_loss: float | None = None
    created: str = ""
    """ISO 8601 UTC time the training finished."""
    index: dict[str, Any] = field(default_factory=dict)
    """The training-set index's feature space and size, when one was stored."""

    def save(self, folder: Path) -> Path:
        path = folder / TRAINING_RECORD
        atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, folder: Path) -> TrainingRecord | None:
        """The record in ``folder``, or None when it has none (a model not made by the node).
        ValueError naming the file when it is there but unreadable."""
        path = folder / TRAINING_RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a synthnode training record ({exc})") from None

    def describe(self) -> str:
        """One line for provenance (no patient data: hashes and counts only)."""
        return (f"fine-tuned from sha256:{self.base_weights_hash[:16]} on {self.images} images "
                f"(data sha256:{self.data_hash[:16]}), {self.steps} steps, "
                f"{self.settings.get('method', 'full')}")
