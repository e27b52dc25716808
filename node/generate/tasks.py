"""The generation tasks: from a source instance (or none, for text2img) to synthetic SC objects.

    source pixels -> display values in [0, 1] -> the model's square -> the model
        -> back to the source geometry -> source pixels kept exactly where the task keeps them
        -> 8/16-bit grayscale or RGB -> SC writer (with the full provenance)

Tasks (PS3.3 provenance in :class:`node.dicom.Synthesis`):

- text2img: a prompt from the job, or from a template over the source's attributes;
- inpaint: regions (rectangles, polygons) regenerated, every other pixel kept;
- outpaint: the image extended by margins, every original pixel kept inside;
- img2img: a variation of the whole image at a strength.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from node.config import Settings
from node.dicom import (
    NewIdentity,
    Pixels,
    SeriesSpec,
    Synthesis,
    SynthesisTask,
    build_sc,
    carried_spacing,
)
from node.generate.pixels import (
    composite,
    display_frames,
    from_model,
    outpaint_canvas,
    region_mask,
    to_model,
    to_output,
)
from node.uids import derive_uid

if TYPE_CHECKING:
    from node.deid.pixels import Inpainter
    from node.generate.models import Models

Region = tuple[int, int, int, int]


@dataclass(frozen=True)
class Request:
    """One generation task on one source (or none, for text2img)."""

    task: SynthesisTask
    prompt: str = ""
    """The prompt; "" = the template for the source's Modality over its attributes."""
    negative_prompt: str | None = None
    regions: tuple[Region, ...] = ()
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()
    margins: tuple[int, int, int, int] = (0, 0, 0, 0)
    """Outpainting: px added at (top, right, bottom, left)."""
    strength: float | None = None
    seed: int = 0
    num: int = 1
    series: SeriesSpec = field(default_factory=lambda: SeriesSpec("synthnode synthetic"))

    def __post_init__(self) -> None:
        if self.task is SynthesisTask.INPAINT and not (self.regions or self.polygons):
            raise ValueError("inpaint needs at least one region or polygon")
        if self.task is SynthesisTask.OUTPAINT and (
            min(self.margins) < 0 or not any(self.margins)
        ):
            raise ValueError(f"outpaint needs non-negative margins, not all zero: {self.margins}")
        if self.num < 1:
            raise ValueError(f"num {self.num} is not positive")


_FIELD = re.compile(r"\{([A-Za-z0-9]+)\}")


def prompt_for(source: Dataset | None, templates: dict[str, str], explicit: str = "") -> str:
    """The explicit prompt, else the template for the source's Modality (or "default") with
    each {Keyword} replaced by the source's value in lower case ("body" when absent)."""
    if explicit:
        return explicit
    modality = str(source.get("Modality", "")) if source is not None else ""
    template = templates.get(modality) or templates.get("default", "")

    def value(m: re.Match[str]) -> str:
        text = str(source.get(m[1], "") or "") if source is not None else ""
        return text.strip().lower() or "body"

    return _FIELD.sub(value, template)


def synthetic_source(request: Request, prompt: str, modality: str = "OT") -> Dataset:
    """A stand-in source for text2img without one: a new synthetic patient and study, its UIDs
    derived from the prompt and seed (the same request gives the same identity)."""
    key = hashlib.sha256(f"{prompt}\0{request.seed}".encode()).hexdigest()[:12].upper()
    ds = Dataset()
    ds.PatientName = f"SYNTHETIC^{key}"
    ds.PatientID = f"SYN-{key}"
    ds.Modality = modality
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.StudyInstanceUID = derive_uid("", "synthetic-study", key)
    ds.SeriesInstanceUID = derive_uid("", "synthetic-series", key)
    ds.SOPInstanceUID = derive_uid("", "synthetic-instance", key)
    ds.SyntheticData = "YES"
    return ds


class Generation:
    """Runs requests with one set of warm models; one instance per worker process."""

    def __init__(self, settings: Settings, models: Models | None = None) -> None:
        if models is None:
            from node.generate.models import Models

            models = Models(settings.generate)
        self.settings = settings
        self.models = models

    def run(self, request: Request, source: Dataset | None = None) -> list[Dataset]:
        """The SC objects of ``request``: ``num`` outputs (seeds seed, seed+1, ...)."""
        gen = self.settings.generate
        prompt = prompt_for(source, gen.prompt_templates, request.prompt)
        negative = gen.negative_prompt if request.negative_prompt is None else (
            request.negative_prompt)
        identity: NewIdentity | None = None
        if source is None:
            if request.task is not SynthesisTask.TEXT2IMG:
                raise ValueError(f"{request.task.value} needs a source image")
            reference = synthetic_source(request, prompt)
            identity = NewIdentity(str(reference.PatientName), str(reference.PatientID),
                                   str(reference.StudyInstanceUID))
        else:
            reference = source
        outputs = []
        for index in range(request.num):
            seed = request.seed + index
            pixels = self._pixels(request, source, prompt, negative, seed)
            uses_inpainting = request.task in (SynthesisTask.INPAINT, SynthesisTask.OUTPAINT)
            info = self.models.inpaint_info if uses_inpainting else self.models.info
            provenance = Synthesis(
                task=request.task, model_id=info.model_id, weights_hash=info.weights_hash,
                scheduler=gen.scheduler, steps=gen.steps, guidance=gen.guidance, seed=seed,
                prompt=prompt, negative_prompt=negative,
                strength=(request.strength or gen.strength)
                if request.task is SynthesisTask.IMG2IMG else None,
            )
            outputs.append(build_sc(
                [reference], pixels, provenance, self.settings.output,
                series=request.series, identity=identity, index=index,
            ))
        return outputs

    # -- pixels ----------------------------------------------------------------------------

    def _pixels(
        self, request: Request, source: Dataset | None, prompt: str, negative: str, seed: int
    ) -> Pixels:
        models = self.models
        resolution = models.info.resolution
        if request.task is SynthesisTask.TEXT2IMG:
            image = models.text2img([prompt], [seed], negative_prompt=negative)[0]
            gray = source is None or int(source.get("SamplesPerPixel", 1)) == 1
            frames01 = image.mean(axis=-1)[None] if gray else image[None]
            bits = _output_bits(source)
            return _as_pixels(frames01, gray, bits, spacing=None)
        assert source is not None
        frames01, _window = display_frames(source)
        color = frames01.ndim == 4
        results = []
        for i, frame in enumerate(frames01):
            frame_seed = seed + 1000 * i  # each frame its own noise, reproducibly
            results.append(self._frame(request, frame, prompt, negative, frame_seed, resolution))
        bits = _output_bits(source)
        out = np.stack(results)
        return _as_pixels(out, not color, bits, spacing=carried_spacing(source))

    def _frame(
        self, request: Request, frame: np.ndarray, prompt: str, negative: str, seed: int,
        resolution: int,
    ) -> np.ndarray:
        models = self.models
        if request.task is SynthesisTask.IMG2IMG:
            prepared = to_model(frame, resolution)
            made = models.img2img(prepared.image[None], [prompt], [seed],
                                  strength=request.strength, negative_prompt=negative)[0]
            return _like(from_model(made, prepared.mapping), frame)
        if request.task is SynthesisTask.INPAINT:
            keep = ~region_mask(frame.shape[:2], request.regions, request.polygons)
            canvas = frame
        else:  # OUTPAINT
            canvas, border = outpaint_canvas(frame, request.margins)
            keep = ~border
        prepared = to_model(canvas, resolution)
        # The placement maps a boolean mask so that no masked pixel is lost when shrinking.
        mask = prepared.mapping.to_model(~keep).astype(np.float32)
        made = models.inpaint(prepared.image[None], mask[None], [prompt], [seed],
                              negative_prompt=negative)[0]
        back = _like(from_model(made, prepared.mapping), canvas)
        return composite(canvas, back, keep)


def _like(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Grayscale or RGB as the reference is."""
    if reference.ndim == 2 and image.ndim == 3:
        return image.mean(axis=-1)
    if reference.ndim == 3 and image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    return image


def _output_bits(source: Dataset | None) -> int:
    """8 bits for 8-bit and colour sources, else the source's stored bits (at most 16)."""
    if source is None or int(source.get("SamplesPerPixel", 1)) == 3:
        return 8
    return max(8, min(16, int(source.get("BitsStored", 8))))


def _as_pixels(
    frames01: np.ndarray, gray: bool, bits: int, spacing: tuple[float, float] | None
) -> Pixels:
    frames = to_output(frames01, color=not gray, bits=bits)
    return Pixels(frames, "MONOCHROME2" if gray else "RGB",
                  bits_stored=bits if gray else None, pixel_spacing=spacing)


def deid_inpainter(generation: Generation, prompt: str = "") -> Inpainter:
    """The de-identification pixel step's inpainting hook: regions of burned-in text (already
    blanked) regenerated by the inpainting model, every other pixel kept exactly."""

    def inpaint(frames: np.ndarray, regions: Sequence[Region], ds: Dataset) -> np.ndarray:
        if frames.dtype.kind != "u":
            raise ValueError("generative inpainting of burned-in text needs unsigned pixels")
        bits = 8 if frames.dtype == np.uint8 else int(ds.get("BitsStored", 16))
        top = float((1 << bits) - 1)
        out = frames.copy()
        request = Request(SynthesisTask.INPAINT, prompt=prompt or prompt_for(
            ds, generation.settings.generate.prompt_templates), regions=tuple(regions))
        for i, frame in enumerate(frames):
            frame01 = frame.astype(np.float32) / top
            made = generation._frame(request, frame01, request.prompt, "", i,
                                     generation.models.info.resolution)
            out[i] = np.clip(np.rint(made * top), 0, top).astype(frames.dtype)
        return out

    return inpaint


def deid_inpainter_factory(settings: Settings) -> Inpainter:
    """For the de-identification workers: a warm generation and its inpainting hook."""
    return deid_inpainter(Generation(settings))
