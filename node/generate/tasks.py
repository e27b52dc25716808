"""The generation tasks: from a source instance (or none, for text2img) to synthetic SC objects.

    source pixels -> display values in [0, 1] -> the model's square -> the model
        -> back to the source geometry -> source pixels kept exactly where the task keeps them
        -> 8/16-bit grayscale or RGB -> SC writer (with the full provenance)

Tasks (PS3.3 provenance in :class:`node.dicom.Synthesis`):

- text2img: a prompt from the job, or from a template over the source's attributes;
- inpaint: regions (rectangles, polygons) regenerated, every other pixel kept;
- outpaint: the image extended by margins, every original pixel kept inside;
- img2img: a variation of the whole image at a strength.

Every path that makes outputs for people (a job, ``synthnode generate``) goes through
:func:`synthesize`: the source de-identified first, the outputs marked and scanned after.

When the model has a training-set index, every output's images as the model made them (in its
square, before they are mapped back to the source's geometry) are compared with it
(``copycheck.py``); an output too close to a training image comes back as a
:class:`~node.generate.copycheck.Refused` in place of its data set: never to be delivered.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from node.config import (
    SYNTHESIS_TASKS,
    DeidOption,
    DeidSettings,
    OutputSettings,
    Settings,
    TaskKind,
)
from node.deid import Deidentifier, Quarantined
from node.deid.identifiers import Identifiers
from node.deid.profile import CODE
from node.dicom import (
    NewIdentity,
    Pixels,
    SeriesSpec,
    Synthesis,
    build_sc,
    carried_spacing,
    mark_deidentified,
)
from node.generate.copycheck import CopyScore, Refused
from node.generate.pixels import (
    Region,
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



@dataclass(frozen=True)
class Request:
    """One generation task on one source (or none, for text2img)."""

    task: TaskKind
    prompt: str = ""
    """The prompt; "" = the template for the source's Modality over its attributes."""
    report: str = ""
    """The source study's report text, cleaned: what {report} in the prompt stands for."""
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
        object.__setattr__(self, "task", TaskKind(self.task))
        if not self.task.synthetic:
            raise ValueError(f'task "{self.task}" is not a generation task: one of '
                             f'{", ".join(sorted(SYNTHESIS_TASKS))}')
        if self.task is TaskKind.INPAINT and not (self.regions or self.polygons):
            raise ValueError("inpaint needs at least one region or polygon")
        if self.task is TaskKind.OUTPAINT and (
            min(self.margins) < 0 or not any(self.margins)
        ):
            raise ValueError(f"outpaint needs non-negative margins, not all zero: {self.margins}")
        if self.num < 1:
            raise ValueError(f"num {self.num} is not positive")


_FIELD = re.compile(r"\{([A-Za-z0-9]+)\}")


REPORT_FIELD = "{report}"
"""In a prompt or template: the source study's report text, cleaned
(:mod:`node.generate.trainset`)."""


def prompt_for(source: Dataset | None, templates: dict[str, str], explicit: str = "",
               report: str = "") -> str:
    """The explicit prompt, else the template for the source's Modality (or "default") with
    each {Keyword} replaced by the source's value in lower case ("body" when absent). In
    either, {report} is replaced by ``report`` (the study's cleaned report text; "" when it
    has none); an explicit prompt that an empty report leaves blank gives way to the
    template."""
    if explicit:
        text = _with_report(explicit, report) if REPORT_FIELD in explicit else explicit
        if text:
            return text
    modality = str(source.get("Modality", "")) if source is not None else ""
    template = templates.get(modality) or templates.get("default", "")

    def value(m: re.Match[str]) -> str:
        if m[0] == REPORT_FIELD:
            return report
        text = str(source.get(m[1], "") or "") if source is not None else ""
        return text.strip().lower() or "body"

    text = _FIELD.sub(value, template)
    return _collapsed(text) if REPORT_FIELD in template else text


def _with_report(text: str, report: str) -> str:
    return _collapsed(text.replace(REPORT_FIELD, report))


def _collapsed(text: str) -> str:
    """Whitespace collapsed: an empty report leaves no gap."""
    return re.sub(r"\s+", " ", text).strip()


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


@dataclass
class _Unit:
    """One image through the model: a frame of one output of one request."""

    kind: TaskKind
    prompt: str
    negative: str
    seed: int
    strength: float | None
    image: np.ndarray | None  # model input (R, R, 3); None for text2img
    mask: np.ndarray | None  # inpainting mask (R, R); 1 = regenerate
    finish: Callable[[np.ndarray], np.ndarray]  # model output -> frame in [0, 1]
    result: np.ndarray | None = None
    made: np.ndarray | None = None  # the model's output (R, R, 3), what the copy check scores

    def group(self) -> tuple[TaskKind, str, float | None]:
        """Units with the same group share model calls (batched by [generate] batch_size):
        the pipeline (text2img, img2img or inpaint), the negative prompt, the strength."""
        pipeline = TaskKind.INPAINT if self.kind.inpaints else self.kind
        return pipeline, self.negative, self.strength


@dataclass
class _Output:
    request: Request
    source: Dataset | None
    prompt: str
    negative: str
    index: int
    seed: int
    units: list[_Unit]
    source_values: str = ""  # how the source's values became model input (provenance)


class Generation:
    """Runs requests with one set of warm models; one instance per worker process."""

    def __init__(self, settings: Settings, models: Models | None = None) -> None:
        if models is None:
            from node.generate.models import Models

            models = Models(settings.generate)
        self.settings = settings
        self.models = models

    def run(self, request: Request, source: Dataset | None = None) -> list[Dataset | Refused]:
        """The SC objects of ``request``: ``num`` outputs (seeds seed, seed+1, ...); an output
        the copy check refuses is a :class:`Refused` (never to be delivered)."""
        return self.run_many([(request, source)])[0]

    def run_many(
        self, jobs: Sequence[tuple[Request, Dataset | None]]
    ) -> list[list[Dataset | Refused]]:
        """Several requests at once (e.g. from several jobs): their images go through the model
        together, batched by task and sampling parameters; each request's outputs are the same
        as :meth:`run` would give (same seeds), refusals included."""
        plans = [self._plan(request, source) for request, source in jobs]
        self._execute([u for outputs in plans for out in outputs for u in out.units])
        scores = iter(self._copy_scores([out for outputs in plans for out in outputs]))
        return [[self._checked(out, next(scores)) for out in outputs] for outputs in plans]

    # -- planning --------------------------------------------------------------------------

    def _plan(self, request: Request, source: Dataset | None) -> list[_Output]:
        gen = self.settings.generate
        if source is None and request.task is not TaskKind.TEXT2IMG:
            raise ValueError(f"{request.task.value} needs a source image")
        prompt = prompt_for(source, gen.prompt_templates, request.prompt, request.report)
        negative = gen.negative_prompt if request.negative_prompt is None else (
            request.negative_prompt)
        frames01, values = None, ""
        if request.task is not TaskKind.TEXT2IMG:
            assert source is not None
            frames01, window = display_frames(source)  # once per request, not per output
            values = window.describe()
        outputs = []
        for index in range(request.num):
            seed = request.seed + index
            if frames01 is None:
                units = [_Unit(request.task, prompt, negative, seed, None, None, None,
                               _identity)]
            else:
                units = [self._frame_unit(request, frame, prompt, negative, seed + 1000 * i)
                         for i, frame in enumerate(frames01)]  # each frame its own noise
            outputs.append(_Output(request, source, prompt, negative, index, seed, units,
                                   values))
        return outputs

    def _frame_unit(
        self, request: Request, frame: np.ndarray, prompt: str, negative: str, seed: int
    ) -> _Unit:
        resolution = self.models.info.resolution
        if request.task is TaskKind.IMG2IMG:
            prepared = to_model(frame, resolution)
            strength = request.strength or self.settings.generate.strength

            def finish_variation(made: np.ndarray) -> np.ndarray:
                return from_model(made, prepared.mapping)  # grey or RGB as the frame

            return _Unit(request.task, prompt, negative, seed, strength, prepared.image, None,
                         finish_variation)
        if request.task is TaskKind.INPAINT:
            keep = ~region_mask(frame.shape[:2], request.regions, request.polygons)
            canvas = frame
        else:  # OUTPAINT
            canvas, border = outpaint_canvas(frame, request.margins)
            keep = ~border
        prepared = to_model(canvas, resolution)
        # The placement maps a boolean mask so that no masked pixel is lost when shrinking.
        mask = prepared.mapping.to_model(~keep).astype(np.float32)

        def finish_fill(made: np.ndarray) -> np.ndarray:
            return composite(canvas, from_model(made, prepared.mapping), keep)

        return _Unit(request.task, prompt, negative, seed, None, prepared.image, mask,
                     finish_fill)

    # -- the model -------------------------------------------------------------------------

    def _execute(self, units: list[_Unit]) -> None:
        groups: dict[tuple[TaskKind, str, float | None], list[_Unit]] = {}
        for unit in units:
            groups.setdefault(unit.group(), []).append(unit)
        models = self.models
        for (pipeline, negative, strength), members in groups.items():
            prompts = [u.prompt for u in members]
            seeds = [u.seed for u in members]
            if pipeline is TaskKind.TEXT2IMG:
                made = models.text2img(prompts, seeds, negative_prompt=negative)
            elif pipeline is TaskKind.IMG2IMG:
                images = np.stack([u.image for u in members])  # type: ignore[misc]
                made = models.img2img(images, prompts, seeds, strength=strength,
                                      negative_prompt=negative)
            else:
                images = np.stack([u.image for u in members])  # type: ignore[misc]
                masks = np.stack([u.mask for u in members])  # type: ignore[misc]
                # keep_unmasked off: finish_fill composites the kept pixels exactly, in the
                # source's geometry, so a blend in the model's square would be work thrown away.
                made = models.inpaint(images, masks, prompts, seeds, negative_prompt=negative,
                                      keep_unmasked=False)
            for unit, image in zip(members, made, strict=True):
                unit.made = image
                unit.result = unit.finish(image)

    # -- the copy check --------------------------------------------------------------------

    def _copy_scores(self, outputs: list[_Output]) -> list[CopyScore | None]:
        """Each output's nearest training image (the highest over its frames), None without a
        copy check. An output made from a source instance is not compared with that instance
        (its de-identified UID, as the training set knows it): being like its own source is
        what img2img, inpaint and outpaint do."""
        check = self.models.copy_check
        if check is None or not outputs:
            return [None] * len(outputs)
        images, exclude = [], []
        for out in outputs:
            own = (str(out.source.SOPInstanceUID) if out.source is not None
                   and out.request.task.uses_source_pixels else None)
            for unit in out.units:
                assert unit.made is not None
                images.append(unit.made)
                exclude.append(own)
        scores = iter(check.score(np.stack(images), exclude))
        return [CopyScore.worst([next(scores) for _ in out.units]) for out in outputs]

    def _checked(self, out: _Output, score: CopyScore | None) -> Dataset | Refused:
        """``out`` written, with its copy score recorded; a :class:`Refused` when the check
        refuses it."""
        ds = self._write(out, score)
        check = self.models.copy_check
        if score is None or check is None:
            return ds
        reason = check.refusal(score)
        return Refused(ds, score, reason) if reason else ds

    # -- output ----------------------------------------------------------------------------

    def _write(self, out: _Output, score: CopyScore | None = None) -> Dataset:
        gen = self.settings.generate
        request, source = out.request, out.source
        identity: NewIdentity | None = None
        if source is None:
            reference = synthetic_source(request, out.prompt)
            identity = NewIdentity(str(reference.PatientName), str(reference.PatientID),
                                   str(reference.StudyInstanceUID))
        else:
            reference = source
        frames01 = np.stack([u.result for u in out.units])  # type: ignore[misc]
        bits = _output_bits(source)
        if request.task is TaskKind.TEXT2IMG:
            gray = source is None or int(source.get("SamplesPerPixel", 1)) == 1
            if gray:
                frames01 = frames01.mean(axis=-1)
            pixels = _as_pixels(frames01, gray, bits, spacing=None)
        else:
            assert source is not None
            pixels = _as_pixels(frames01, frames01.ndim == 3, bits, carried_spacing(source))
        info = self.models.inpaint_info if request.task.inpaints else self.models.info
        provenance = Synthesis(
            task=request.task, model_id=info.model_id, weights_hash=info.weights_hash,
            scheduler=gen.scheduler, steps=gen.steps, guidance=gen.guidance, seed=out.seed,
            prompt=out.prompt, negative_prompt=out.negative,
            strength=out.units[0].strength if request.task is TaskKind.IMG2IMG else None,
            parameters=_parameters(request), source_values=out.source_values,
            training=info.training, copy_check=score.describe() if score is not None else "",
        )
        return build_sc([reference], pixels, provenance, self.settings.output,
                        series=request.series, identity=identity, index=out.index)


def _parameters(request: Request) -> tuple[tuple[str, str], ...]:
    """The task's own parameters, as recorded in the output (and part of its UIDs)."""
    if request.task is TaskKind.INPAINT:
        found = []
        if request.regions:
            found.append(("regions", " ".join(",".join(map(str, r)) for r in request.regions)))
        if request.polygons:
            found.append(("polygons", " ".join(
                ",".join(f"{x:g},{y:g}" for x, y in polygon) for polygon in request.polygons)))
        return tuple(found)
    if request.task is TaskKind.OUTPAINT:
        return (("margins", ",".join(map(str, request.margins)) + " (top,right,bottom,left)"),)
    return ()


def _identity(image: np.ndarray) -> np.ndarray:
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


def synthesize(
    generation: Generation, jobs: Sequence[tuple[Request, Dataset | None]],
    deid: Deidentifier | None,
) -> list[list[Dataset | Refused] | Quarantined]:
    """Each job's outputs, made from its source de-identified by ``deid`` (in place: the
    caller's data set becomes the de-identified one) and marked de-identified and synthetic
    (PS3.15 E.1.1). A job whose source ``deid`` quarantines (burned-in text it cannot clean, a
    likely face), or whose outputs would hold an original identifying value, gives that
    :class:`Quarantined` instead: nothing is generated from, or returned for, it. An output
    the copy check refuses is a :class:`Refused` (marked too: it goes to quarantine).

    ``deid`` None keeps the sources' identity in the outputs: local experiments only, never to
    be shared. A job without a source (text2img) has a synthetic identity either way."""
    if deid is None:
        return list(generation.run_many(jobs))
    results: list[list[Dataset | Refused] | Quarantined] = [[] for _ in jobs]
    # 1. de-identify the sources, noting what must not survive into the outputs
    ready: list[tuple[int, Request, Dataset | None, Identifiers]] = []
    for i, (request, source) in enumerate(jobs):
        if source is None:
            ready.append((i, request, None, Identifiers()))
            continue
        identifiers = deid.identifiers(source)
        try:
            ready.append((i, request, deid.deidentify(source, in_place=True,
                                                       identifiers=identifiers), identifiers))
        except Quarantined as exc:
            results[i] = exc
    # 2. generate, all jobs batched together
    made = generation.run_many([(request, source) for _, request, source, _ in ready])
    # 3. mark the outputs (their identity is the pseudonymous one) and scan their bytes
    for (i, request, source, identifiers), outputs in zip(ready, made, strict=True):
        results[i] = outputs
        if source is None:
            continue
        carried = request.task.uses_source_pixels  # burned-in text or a face may be kept
        # Clean Pixel Data (113101) holds for the output as it held for its source
        clean = CODE[DeidOption.CLEAN_PIXEL_DATA].value
        source_clean = any(str(item.get("CodeValue", "")) == clean for item in
                           source.get("DeidentificationMethodCodeSequence", []))
        record = deid.record(
            burned_in=carried and source.get("BurnedInAnnotation") == "YES",
            recognizable=carried and source.get("RecognizableVisualFeatures") == "YES",
            pixels_clean=not carried or source_clean,
        )
        try:
            for out in outputs:
                ds = out.dataset if isinstance(out, Refused) else out
                mark_deidentified(ds, record, generation.settings.output, synthetic=True)
                deid.encode(ds, identifiers)
        except Quarantined as exc:
            results[i] = exc
    return results


def deid_inpainter(generation: Generation, prompt: str = "") -> Inpainter:
    """The de-identification pixel step's inpainting hook: regions of burned-in text (already
    blanked) regenerated by the inpainting model, every other pixel kept exactly."""

    def inpaint(frames: np.ndarray, regions: Sequence[Region], ds: Dataset) -> np.ndarray:
        if frames.dtype.kind != "u":
            raise ValueError("generative inpainting of burned-in text needs unsigned pixels")
        bits = 8 if frames.dtype == np.uint8 else int(ds.get("BitsStored", 16))
        top = float((1 << bits) - 1)
        out = np.empty_like(frames)  # every frame is written below
        request = Request(TaskKind.INPAINT, prompt=prompt or prompt_for(
            ds, generation.settings.generate.prompt_templates), regions=tuple(regions))
        units = [generation._frame_unit(request, frame.astype(np.float32) / top,
                                        request.prompt, "", i)
                 for i, frame in enumerate(frames)]
        generation._execute(units)
        for i, unit in enumerate(units):
            assert unit.result is not None
            out[i] = np.clip(np.rint(unit.result * top), 0, top).astype(frames.dtype)
        return out

    return inpaint


def deidentifier(
    deid: DeidSettings, output: OutputSettings, generation: Callable[[], Generation]
) -> Deidentifier:
    """A de-identifier for ``deid``; where a pixel rule fills with generated anatomy, its hook
    runs on ``generation()`` (called only then: the models load on first use)."""
    inpainter = deid_inpainter(generation()) if deid.needs_inpainter else None
    return Deidentifier(deid, output, inpainter=inpainter)


def deid_inpainter_factory(settings: Settings) -> Inpainter:
    """For the de-identification workers: a warm generation and its inpainting hook."""
    return deid_inpainter(Generation(settings))
