"""What the SC writer records about how an output was made, and where it is placed.

The writer takes exactly one provenance record per output: :class:`Synthesis` for generated
pixels, :class:`Deidentification` for de-identified ones. Both are plain data, built by the
stages before the writer (generation, de-identification) and never holding patient data.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.config import SYNTHESIS_TASKS, TaskKind


@dataclass(frozen=True)
class Synthesis:
    """A diffusion model made these pixels (PS3.3: Synthetic Data YES, Conversion Type SYN)."""

    task: TaskKind
    """One of the synthesis tasks (:attr:`TaskKind.synthetic`)."""
    model_id: str
    weights_hash: str
    scheduler: str
    steps: int
    guidance: float
    seed: int
    prompt: str = ""
    negative_prompt: str = ""
    strength: float | None = None
    parameters: tuple[tuple[str, str], ...] = ()
    """Task parameters as (name, value) text, e.g. ("regions", "10,10,20,20"): recorded, and
    part of the output's UIDs (other regions or margins make another object)."""
    source_values: str = ""
    """How the source's stored values were mapped into the model's input (rescale, window,
    MONOCHROME1 inversion): recorded only."""
    training: str = ""
    """How the node fine-tuned the model (its training record in one line; "" for a model the
    node did not make): recorded only (the weights hash already names the model)."""
    copy_check: str = ""
    """The copy check's result, e.g. "copy check: nearest training image feature 0.41, hash
    0.62" ("" when the model has no training-set index): recorded only."""

    def __post_init__(self) -> None:
        task = TaskKind(self.task)
        if not task.synthetic:
            raise ValueError(f'task "{task}" makes no synthetic pixels: a synthesis is one of '
                             f'{", ".join(sorted(SYNTHESIS_TASKS))}')
        object.__setattr__(self, "task", task)

    def series_key(self) -> dict[str, Any]:
        """Parameters shared by every output of one series (all but the seed)."""
        return {
            "task": self.task.value, "model": self.model_id, "weights": self.weights_hash,
            "scheduler": self.scheduler, "steps": self.steps, "guidance": self.guidance,
            "prompt": self.prompt, "negative": self.negative_prompt, "strength": self.strength,
            "parameters": [list(p) for p in self.parameters],
        }

    def instance_key(self) -> dict[str, Any]:
        return {**self.series_key(), "seed": self.seed}

    def describe(self) -> str:
        """Derivation Description (ST, at most 1024 characters)."""
        parts = [
            f"synthnode {self.task.value}", f"model {self.model_id}",
            f"weights sha256:{self.weights_hash[:16]}", f"scheduler {self.scheduler}",
            f"steps {self.steps}", f"guidance {self.guidance:g}", f"seed {self.seed}",
        ]
        if self.strength is not None:
            parts.append(f"strength {self.strength:g}")
        parts += [f"{name} {value}"[:200] for name, value in self.parameters]
        if self.source_values:
            parts.append(f"source values: {self.source_values}"[:200])
        if self.training:
            parts.append(f"training: {self.training}"[:200])
        if self.copy_check:
            parts.append(self.copy_check[:120])
        text = "; ".join(parts)
        if self.prompt:
            room = 1024 - len(text) - len('; prompt ""')
            prompt = self.prompt if len(self.prompt) <= room else self.prompt[: room - 3] + "..."
            text += f'; prompt "{prompt}"'
        return text


class TemporalInformation(StrEnum):
    """Longitudinal Temporal Information Modified (0028,0303)."""

    REMOVED = "REMOVED"
    """Dates and times were removed (no temporal option)."""

    UNMODIFIED = "UNMODIFIED"
    """Retain Longitudinal Temporal Information with Full Dates (113106)."""

    MODIFIED = "MODIFIED"
    """Retain Longitudinal Temporal Information with Modified Dates (113107)."""


BASIC_PROFILE: Code = codes.DCM.BasicApplicationConfidentialityProfile


@dataclass(frozen=True)
class Deidentification:
    """The pixels and attributes went through de-identification (PS3.15 Annex E)."""

    method: str
    """De-identification Method (0012,0063), LO: e.g. "synthnode PS3.15 E.1-1 2023b"."""

    options: tuple[Code, ...] = ()
    """CID 7050 option codes applied beyond the Basic Profile (113100, always recorded)."""

    temporal: TemporalInformation = TemporalInformation.REMOVED

    stamp: datetime.datetime | None = None
    """What the dates the writer stamps (instance creation, secondary capture) become: None
    removes them; with modified dates, the shifted time the de-identification chose."""

    burned_in_annotation: bool = False
    recognizable_visual_features: bool = False

    def codes(self) -> tuple[Code, ...]:
        return (BASIC_PROFILE, *self.options)

    def series_key(self) -> dict[str, Any]:
        return {"method": self.method, "options": [c.value for c in self.options]}

    def instance_key(self) -> dict[str, Any]:
        return self.series_key()


Provenance = Synthesis | Deidentification


@dataclass(frozen=True)
class NewIdentity:
    """Patient and study for outputs placed in a new study (e.g. a de-identified one), instead
    of a new series in the source's own study."""

    patient_name: str
    patient_id: str
    study_instance_uid: str
    study_id: str = ""
    accession_number: str = ""
    study_date: datetime.date | None = None
    study_time: datetime.time | None = None
    patient_birth_date: datetime.date | None = None
    patient_sex: str = ""
    study_description: str = ""
    referring_physician_name: str = ""


@dataclass(frozen=True)
class SeriesSpec:
    """Series Description and Number of the output series."""

    description: str = "synthnode"
    number: int = 9000
