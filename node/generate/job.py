"""Synthesizing a job's outputs: a worker's warm generation, run over the job's sources in
chunks, each output written and checked.

The job stage hands in how a source is read, whether it is the node's own output and whether
there is disk space for the next chunk; what those raise passes through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from node import metrics
from node.archives.outgoing import Made
from node.config import RuleTask, Settings, TaskKind
from node.deid import Deidentifier, Quarantined
from node.deid.job import Deidentifiers
from node.dicom import SeriesSpec, quarantine, save_checked
from node.files import atomic_open
from node.generate.copycheck import Refused
from node.generate.tasks import Generation, Request, synthesize
from node.generate.trainset import split_reports, study_report, subject_identifiers, uses_report

log = logging.getLogger(__name__)

GENERATION_CHUNK = 16  # sources per model call: bounds memory on long series


class SynthesisFailed(Exception):
    """The task cannot make outputs from these sources (its settings, or the model refused
    them); no retry mends it. The message says why and holds no patient data."""


class Synthesizer:
    """A worker's generation, its models loaded on first use and kept warm from job to job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._generation: Generation | None = None

    def generation(self) -> Generation:
        """The worker's generation (made on first call)."""
        if self._generation is None:
            self._generation = Generation(self.settings)
        return self._generation

    def make(
        self,
        task: RuleTask,
        sources: list[Path],
        work: Path,
        *,
        deidentifiers: Deidentifiers,
        job_id: str,
        rule: str,
        task_index: int,
        read: Callable[[Path], Dataset],
        own: Callable[[Dataset, Made], bool],
        check_space: Callable[[], None],
    ) -> Made:
        """``task`` (a synthesis task, the ``task_index``-th of ``rule``) run on ``sources``
        (text2img: the first instance of each series), de-identified first when the task says
        so; the outputs are written to ``work``. A source that cannot be passed on is
        quarantined (counted, with a note); the node's own outputs are skipped (``own`` notes
        them). An output the copy check refuses (a possible copy of a training image) is
        quarantined with its score, never delivered. ``check_space`` runs before each chunk.
        SynthesisFailed when the task cannot run; DeidentificationError when its
        de-identification cannot.

        Report documents (SR) among the sources are never image sources: their text is what
        {report} in the prompt stands for (cleaned of placeholders and of the original
        identifiers, :func:`~node.generate.trainset.study_report`; else a report file beside
        the first image). A text2img task whose sources are reports only makes one request
        from the report, with a synthetic identity."""
        kind = task.task
        series = SeriesSpec(task.series_description or f"synthnode {kind.value}",
                            9000 + task_index if task.series_number is None
                            else task.series_number)
        deid = deidentifiers.get(task.options) if task.deidentified_source else None
        made = Made()
        reports, sources = split_reports(sources)
        if reports:
            made.notes.append(f"{len(reports)} report instance(s) (SR): read for their text, "
                              "not image sources")
        report = ""
        if uses_report(task.prompt, self.settings.generate.prompt_templates):
            report = self._report(reports, sources, deid, read, f"rule {rule} task {task_index}")
            if not report:
                made.notes.append("no report text in the study: {report} left empty")
                log.info("job %s: no report text in the study for {report}", job_id)
        if kind is TaskKind.TEXT2IMG:  # one request per series: its first instance
            seen: set[str] = set()
            firsts = []
            for p in sources:
                if p.parent.name not in seen:
                    seen.add(p.parent.name)
                    firsts.append(p)
            sources = firsts
        try:
            request = Request(kind, prompt=task.prompt, negative_prompt=task.negative_prompt,
                              regions=tuple(task.regions), margins=task.margins,
                              strength=task.strength, seed=task.seed,
                              num=task.num if kind is TaskKind.TEXT2IMG else 1,
                              series=series, report=report)
        except ValueError as exc:
            raise SynthesisFailed(f"rule {rule} task {task_index}: {exc}") from None
        if kind is TaskKind.TEXT2IMG and not sources and reports:
            check_space()
            self._write(self._synthesize([(request, None)], deid)[0], "report", work, made,
                        job_id)
        for start in range(0, len(sources), GENERATION_CHUNK):
            check_space()
            batch = [ds for ds in (read(path) for path in sources[start:start + GENERATION_CHUNK])
                     if not own(ds, made)]
            if not batch:
                continue
            # (before de-identification)
            origins = [(str(ds.SOPInstanceUID), str(ds.get("SeriesInstanceUID", "")))
                       for ds in batch]
            results = self._synthesize([(request, ds) for ds in batch], deid)
            for (sop, series_uid), outputs in zip(origins, results, strict=True):
                self._write(outputs, sop, work, made, job_id, series_uid)
        return made

    def _synthesize(self, jobs: list[tuple[Request, Dataset | None]],
                    deid: Deidentifier | None) -> list[list[Dataset | Refused] | Quarantined]:
        try:
            return synthesize(self.generation(), jobs, deid)
        except ValueError as exc:
            raise SynthesisFailed(f"generation failed: {exc}") from None

    def _write(self, outputs: list[Dataset | Refused] | Quarantined, sop: str, work: Path,
               made: Made, job_id: str, series_uid: str = "") -> None:
        """One source's outputs (of the instance ``sop`` of ``series_uid``) written to
        ``work`` and counted in ``made`` (or its quarantine noted)."""
        if isinstance(outputs, Quarantined):
            made.quarantined += 1
            made.notes.append(f"{sop}: not synthesized: {outputs}")
            log.warning("job %s: instance %s quarantined: %s", job_id, sop, outputs)
            return
        for out in outputs:
            if isinstance(out, Refused):
                self._refuse(out, work, job_id)
                metrics.quarantined("copy")
                made.quarantined += 1
                made.notes.append(f"{out.sop_instance_uid}: {out.reason}")
                continue
            saved = save_checked(out, work, self.settings.output, job_id)
            if saved.quarantined:
                metrics.quarantined("validation")
                made.quarantined += 1
                made.notes.append(f"{saved.sop_instance_uid}: {saved.reason}")
            else:
                made.add(saved.path, out, sop, series_uid)

    @staticmethod
    def _report(reports: list[Path], images: list[Path], deid: Deidentifier | None,
                read: Callable[[Path], Dataset], task: str) -> str:
        """The study's report text for {report}: cleaned of placeholders and of the original
        identifying values of its report documents and of its first image (as the
        de-identifier takes them, or all of them without one). SynthesisFailed when the
        cleaned text would still hold one."""
        documents = [read(path) for path in reports]
        subjects = [*documents, *([read(images[0])] if images else [])]
        identifiers = [deid.identifiers(ds) if deid is not None else subject_identifiers(ds)
                       for ds in subjects]
        try:
            text, _ = study_report(documents, images[0] if images else None, identifiers)
        except ValueError as exc:
            raise SynthesisFailed(f"{task}: {exc}") from None
        return text

    def _refuse(self, out: Refused, work: Path, job_id: str) -> Path:
        """Write a refused output to ``[output] quarantine_dir/<job_id>/`` beside its reason."""
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"{out.sop_instance_uid}.dcm"
        with atomic_open(path) as f:
            out.dataset.save_as(f, enforce_file_format=True)
        log.warning("job %s: output %s not delivered: %s", job_id, out.sop_instance_uid,
                    out.reason)
        return quarantine(path, self.settings.output.quarantine_dir, out.reason, job_id)
