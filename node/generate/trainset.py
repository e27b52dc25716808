"""The pairs a fine-tune learns from, and report text as a prompt: from de-identified studies to
(image, text) examples, with every de-identification remnant taken out of the text.

    files and folders -> DICOM headers -> de-identified, not synthetic -> per study:
        report text (SR documents, else a report file beside the image, else the prompt
        template over the image's attributes) -> :func:`clean_text`
        image (display values, model square) -> :class:`Example`

Why the text is cleaned even though the studies are de-identified: de-identification leaves
placeholders (``___``, ``[** ... **]``, ``ANONYMIZED``, ``19000101``) and pseudonyms
(``SN...``) in report text, and a model trained on them learns to write them, and to tie them
to images: memorisation of training images is worse with such prompts. None of it says
anything about the image.

The same cleaning makes ``{report}`` in a generation prompt (:func:`study_report`,
:func:`read_report`): there the text is cleaned with the source's original identifiers too, and
checked with the de-identification matcher afterwards (:func:`clean_report`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

# The de-identification engine's own patterns and values: one definition of a date, a phone
# or ID number, a token and a dummy value for both the engine and the training text.
from node.deid.engine import _IDENTIFYING, _INSTITUTION, _ORIGINAL_UIDS, _SR_CLASSES
from node.deid.identifiers import (
    _DATES,
    _DIGIT_GROUPS,
    _LONG_DIGITS,
    _TIMES,
    PLACEHOLDERS,
    TOKEN,
    Identifiers,
    _phone_like,
    tokens,
)
from node.generate.pixels import display_frames, to_model
from node.generate.tasks import prompt_for
from node.generate.training import Example, TrainingSet

if TYPE_CHECKING:
    from node.config import Settings

# -- cleaning ----------------------------------------------------------------------------------

_GONE = "\x00"
"""Stands where something was taken out, until the words that only named it go too."""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MIMIC = re.compile(r"\[\*\*.*?\*\*\]", re.DOTALL)  # MIMIC-III: [**Known lastname 123**]
_BRACKETED = re.compile(
    r"\[\s*(?:REDACTED|REMOVED|ANONYMI[SZ]ED|DE-?IDENTIFIED|HIDDEN|CENSORED|PHI|NAME|DATE|"
    r"ID|MRN|ADDRESS|PHONE|LOCATION|HOSPITAL|AGE)(?:[\s_:-][^\]\n]{0,40})?\s*\]",
    re.IGNORECASE,
)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9_:.-]{0,40}/?>")  # <NAME>, <DATE>, </PHI>: no spaces
_UNDERSCORES = re.compile(r"_{2,}")  # MIMIC-CXR: ___
_XXX = re.compile(r"(?<![A-Za-z0-9])(?:[Xx]{1,4}(?:[-/.:][Xx]{1,4})+|[Xx]{3,})(?![A-Za-z0-9])")
_PSEUDONYM = re.compile(r"(?<![A-Za-z0-9])SN[A-Z0-9]{14}(?![A-Za-z0-9])")
"""The node's Patient IDs (``Deidentifier.pseudonym``: "SN" and 14 base32 characters; digits
0, 1, 8 and 9 too, so that near misses go as well)."""

_DUMMY_ANY_CASE = frozenset({"ANONYMOUS", "ANONYMIZED", "ANONYMISED", "REDACTED",
                             "DEIDENTIFIED", "DE-IDENTIFIED"})
_DUMMY_UPPER = PLACEHOLDERS | {"REMOVED"}
"""The engine's dummy values (``CLEANED`` is its Text Value dummy), matched in capitals only
where they are also English words ("the catheter was removed")."""

_LABEL_WORDS = ("dr", "prof", "doctor", "patient", "pt", "name", "mrn", "id", "dob", "accession",
                "acc", "radiologist", "physician", "attending", "referring", "by", "on", "at",
                "dated", "from", "to", "with", "for",
                # who did what to the report, and when: with the person gone, nothing is left
                "seen", "reviewed", "dictated", "signed", "reported", "verified", "discussed",
                "notified", "electronically")
_LABELS = "|".join([*(v for w in _LABEL_WORDS for v in (w, w.capitalize(), w.upper())),
                    "Mr", "Mrs", "Ms", "Mx", "ID"])  # not MR, MRS, MS: MRI, spectroscopy, MS
_LABEL_BEFORE = re.compile(rf"(?:(?<![\w])(?:{_LABELS})\.?[ \t]*[:#]?[ \t]*)+{_GONE}")
"""A salutation, label, connector or workflow verb naming only what was removed: "Dr. ___",
"MRN: ___", "on <date>", "Patient <pseudonym>", "seen by ___"."""
_JOINED = re.compile(rf"{_GONE}[\s,/-]*(?:(?:and|or|&)[\s,]*)?{_GONE}", re.IGNORECASE)
_CREDENTIAL = re.compile(rf"{_GONE}[\s,]*(?:M\.D\.|MD|Ph\.D\.|PhD|RN)(?![\w])")
_NAME_WORD = r"(?:[A-Z]\.(?![A-Za-z])|[A-Z][A-Za-z'-]*(?![\w'-])(?!\s*:))"
_TITLED = re.compile(
    rf"(?<![\w])(?:(?:Dr|DR|Mr|Mrs|Ms|Mx|Prof|PROF)\.|(?:Dr|Mr|Mrs|Ms|Mx|Prof)(?=\s+[A-Z]))"
    rf"(?:\s+{_NAME_WORD}){{0,3}}"
)
"""A title and the name after it ("Dr. J. Smith"), known or not: in report text a title
only ever introduces a person."""
_PUNCTUATION_RUN = re.compile(r"\s*([,;:.!?])(?:\s*[,;:.!?])+")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}|<\s*>")
_LETTERS = re.compile(r"[A-Za-z]{2,}")


def clean_text(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with the remnants of de-identification and every identifying value taken out,
    the report language kept: "" when nothing readable is left.

    Taken out: placeholders (``___`` runs, MIMIC ``[** ... **]``, ``<...>`` tags, ``XXX``
    masks, ``[REDACTED]`` and the like), the node's dummy values (``ANONYMIZED``,
    ``ANONYMOUS``, ``CLEANED``, ``19000101`` ...) and pseudonyms (``SN`` + 14 characters),
    every ``known`` value (whole tokens, case-insensitive; a DICOM person name's components
    each on their own), dates, times, phone and ID numbers, tokens with 6 or more digits; then
    the titles, labels and connectors that named only what went ("Dr. ___", "MRN: ___",
    "Patient <pseudonym>,", "on <date>") and titled names ("Dr. Smith"). Whitespace is
    collapsed to single spaces and stray punctuation tidied."""
    text = _CONTROL.sub(" ", text)
    # 1. placeholders of de-identification tools
    for pattern in (_MIMIC, _BRACKETED, _TAG, _UNDERSCORES, _XXX, _PSEUDONYM):
        text = pattern.sub(_GONE, text)
    # 2. the node's dummy values; the known values, as runs of whole tokens
    text = _drop_tokens(text, _known_runs(known))
    # 3. dates, times, phone and ID numbers (the Clean Descriptors patterns)
    text = _DATES.sub(_GONE, text)
    text = _TIMES.sub(_GONE, text)
    text = _DIGIT_GROUPS.sub(lambda m: _GONE if _phone_like(m.group()) else m.group(), text)
    # 4. what named only what was removed; titled names
    text = _TITLED.sub(_GONE, text)
    previous = None
    while previous != text:
        previous = text
        text = _LABEL_BEFORE.sub(_GONE, text)
        text = _JOINED.sub(_GONE, text)
        text = _CREDENTIAL.sub(_GONE, text)
    return _tidy(text.replace(_GONE, " "))


def _known_runs(known: Iterable[str]) -> set[tuple[str, ...]]:
    """Token runs (upper case) of the known values and of each person name component."""
    runs: set[tuple[str, ...]] = set()
    for value in known:
        for one in str(value).split("\\"):
            parts = [one, *re.split(r"[\^=]", one)] if "^" in one else [one]
            for part in parts:
                run = tokens(part)
                if run and len("".join(run)) >= 3:
                    runs.add(run)
    return runs


def _drop_tokens(text: str, runs: set[tuple[str, ...]]) -> str:
    """Dummy values, tokens with long digit runs and every occurrence of ``runs`` replaced by
    :data:`_GONE`."""
    spans = list(TOKEN.finditer(text))
    upper = [m.group().upper() for m in spans]
    drop = {i for i, m in enumerate(spans)
            if m.group() in _DUMMY_UPPER or upper[i] in _DUMMY_ANY_CASE
            or _LONG_DIGITS.search(m.group())}
    for run in runs:
        n = len(run)
        for i in range(len(upper) - n + 1):
            if tuple(upper[i:i + n]) == run:
                drop.update(range(i, i + n))
    if not drop:
        return text
    out, at = [], 0
    for i in sorted(drop):
        out.append(text[at:spans[i].start()])
        out.append(_GONE)
        at = spans[i].end()
    out.append(text[at:])
    return "".join(out)


def _strongest(m: re.Match[str]) -> str:
    marks = re.sub(r"\s", "", m.group())
    for mark in ".?!;:,":
        if mark in marks:
            return f"{mark} "
    return " "


def _tidy(text: str) -> str:
    text = text.replace("^", " ")
    previous = None
    while previous != text:
        previous = text
        text = _EMPTY_BRACKETS.sub(" ", text)
        text = _PUNCTUATION_RUN.sub(_strongest, text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" ([,;:.!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = text.strip().lstrip(",;:.!?- ").rstrip(",;:- ")
    return text if _LETTERS.search(text) else ""


# -- identifying values ------------------------------------------------------------------------

def known_values(identifiers: Identifiers) -> list[str]:
    """The values :class:`~node.deid.identifiers.Identifiers` matches, as :func:`clean_text`'s
    ``known`` (whole values, their token runs, person name components)."""
    return sorted({*identifiers.whole, *(" ".join(r) for r in identifiers.runs),
                   *(" ".join(r) for r in identifiers.names)})


def subject_identifiers(ds: Dataset) -> Identifiers:
    """What identifies the subject of ``ds`` as it is: the de-identification engine's
    identifying attributes (institution included), its UIDs and person names anywhere in it.
    For a de-identified instance: its pseudonym, dummy names, accession, other IDs. Where a
    de-identifier is at hand, its own ``identifiers`` (which follow its options) serve too."""
    return Identifiers.collect(ds, (*_IDENTIFYING, *_INSTITUTION), _ORIGINAL_UIDS)


def clean_report(text: str, identifiers: Sequence[Identifiers] = ()) -> str:
    """Report ``text`` for a prompt or a training pair: :func:`clean_text` with the values of
    ``identifiers`` (the sources', e.g. ``Deidentifier.identifiers`` of the originals) as
    ``known``; then checked with the de-identification matcher: ValueError naming the
    attribute (never the value) when one of them is still found."""
    cleaned = clean_text(text, [v for ids in identifiers for v in known_values(ids)])
    for ids in identifiers:
        left = sorted(ids.found_in(cleaned))
        if left:
            raise ValueError(f"the report's cleaned text still holds the original "
                             f"{', '.join(left)}: it is not used")
    return cleaned


# -- report text -------------------------------------------------------------------------------

class TextSource(StrEnum):
    """Where an example's text came from (:attr:`Example.text_source`)."""

    SR = "sr"
    """The study's report documents (SR)."""
    FILE = "file"
    """A report file beside the image."""
    TEMPLATE = "template"
    """The prompt template over the image's attributes: the study has no report."""


def is_report(ds: Dataset) -> bool:
    """Whether ``ds`` is a report document (a Structured Report, or a document tree with a
    CONTAINER root and no pixels) rather than an image."""
    if str(ds.get("SOPClassUID", "")).startswith(_SR_CLASSES) or ds.get("Modality") == "SR":
        return True
    return (str(ds.get("ValueType", "")).upper() == "CONTAINER" and "ContentSequence" in ds
            and "PixelData" not in ds)


def report_text(ds: Dataset) -> str:
    """The Text Values of ``ds``'s TEXT content items (the root's too), recursively, in
    document order, joined by spaces: "" when it has none. Not cleaned."""
    parts: list[str] = []

    def walk(item: Dataset) -> None:
        if str(item.get("ValueType", "")).upper() == "TEXT":
            value = str(item.get("TextValue", "") or "").strip()
            if value:
                parts.append(value)
        for child in item.get("ContentSequence", None) or []:
            walk(child)

    walk(ds)
    return " ".join(parts)


def report_files(image: Path) -> list[Path]:
    """The report files that may lie beside an image file: ``<stem>.txt``, then
    ``report.txt`` in its folder (those that exist)."""
    return [p for p in (image.with_suffix(".txt"), image.parent / "report.txt") if p.is_file()]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def study_report(documents: Sequence[Dataset], image: Path | None = None,
                 identifiers: Sequence[Identifiers] = ()) -> tuple[str, TextSource | None]:
    """(cleaned text, where it came from) of a study's report: the text of its report
    ``documents`` (each text once, in the order given), else a report file beside ``image``
    (:func:`report_files`); ("", None) when neither has text left once cleaned
    (:func:`clean_report` with ``identifiers``, which may raise ValueError). A de-identified
    SR holds ``CLEANED`` as its text unless its text was kept: that counts as none."""
    texts: list[str] = []
    for doc in documents:
        text = report_text(doc)
        if text and text not in texts:
            texts.append(text)
    cleaned = clean_report(" ".join(texts), identifiers) if texts else ""
    if cleaned:
        return cleaned, TextSource.SR
    for path in report_files(image) if image is not None else []:
        cleaned = clean_report(_read_text(path), identifiers)
        if cleaned:
            return cleaned, TextSource.FILE
    return "", None


def read_report(path: Path) -> tuple[str, Dataset | None]:
    """The raw text of a report given as a file: a DICOM structured report (its text items)
    or a text file (UTF-8); and the SR's data set (None for a text file), whose identifying
    values the caller cleans the text of. ValueError (naming the file) for a DICOM file that
    is not a report, a report without text, or a file that cannot be read."""
    try:
        ds = dcmread(path)
    except InvalidDicomError:
        ds = None
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: the report cannot be read ({type(exc).__name__})") from None
    if ds is None:
        try:
            text = _read_text(path)
        except OSError as exc:
            raise ValueError(f"{path}: the report cannot be read ({exc.strerror})") from None
    elif not is_report(ds):
        raise ValueError(f"{path}: a DICOM file but not a report (SR): give a structured "
                         "report or a text file")
    else:
        text = report_text(ds)
    if not text.strip():
        raise ValueError(f"{path}: the report holds no text")
    return text, ds


def split_reports(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(report documents, the others) among ``paths``, in their order: told apart by the SOP
    Class UID of each file's meta information (by its header where that has none). A file
    that cannot be read stays among the others (reading it fails where it is used)."""
    reports: list[Path] = []
    others: list[Path] = []
    for path in paths:
        try:
            sop_class = str(read_file_meta_info(path).get("MediaStorageSOPClassUID", ""))
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for unreadable files
            sop_class = ""
        if sop_class:
            report = sop_class.startswith(_SR_CLASSES)
        else:
            try:
                report = is_report(dcmread(path, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - as above
                report = False
        (reports if report else others).append(path)
    return reports, others


def uses_report(prompt: str, templates: dict[str, str]) -> bool:
    """Whether a task with ``prompt`` ("" = the templates) would put ``{report}`` in it."""
    return "{report}" in prompt or (not prompt and any("{report}" in t
                                                       for t in templates.values()))


# -- the training set --------------------------------------------------------------------------

class Skip(StrEnum):
    """Why a file is left out of a training set (the keys of :attr:`TrainingSet.skipped`)."""

    NOT_DICOM = "not DICOM"
    """Not a DICOM file (or its header cannot be read)."""
    NOT_DEIDENTIFIED = "not de-identified"
    """Patient Identity Removed is not YES: the fine-tune reads de-identified studies only."""
    SYNTHETIC = "synthetic"
    """Synthetic Data YES: never train on generated images."""
    NO_PIXELS = "no pixel data"
    """Reports (their text is used) and other objects without an image."""
    UNREADABLE_PIXELS = "unreadable pixels"
    """Pixel data the node cannot decode or display."""
    UNCLEAN_TEXT = "text not cleanable"
    """Its text still held one of its identifying values after cleaning."""
    DUPLICATE = "duplicate instance"
    """A SOP Instance UID already read from another file."""


@dataclass
class _Found:
    path: Path
    header: Dataset


def _files(paths: Sequence[Path]) -> list[Path]:
    """Every file under ``paths`` (folders recursively), each once, sorted; report text files
    (``.txt``) are read beside their images, not as instances."""
    found: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.add(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return sorted(p for p in found if p.suffix.lower() != ".txt")


def _headers(files: Iterable[Path], skipped: dict[str, int]) -> Iterator[_Found]:
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for what is not DICOM
            _count(skipped, Skip.NOT_DICOM)
            continue
        if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
            _count(skipped, Skip.NOT_DEIDENTIFIED)
        elif str(ds.get("SyntheticData", "")).upper() == "YES":
            _count(skipped, Skip.SYNTHETIC)
        else:
            yield _Found(path, ds)


def _count(skipped: dict[str, int], reason: Skip) -> None:
    skipped[reason.value] = skipped.get(reason.value, 0) + 1


def collect(paths: Sequence[Path], resolution: int, templates: dict[str, str]) -> TrainingSet:
    """The training pairs in ``paths`` (DICOM files and folders, recursively): one
    :class:`Example` per de-identified, non-synthetic image instance (a multi-frame instance
    gives its middle frame), at ``resolution``.

    The image: display values (Modality LUT, VOI, MONOCHROME1 inverted) fitted into the
    square with its aspect kept (:func:`~node.generate.pixels.display_frames`,
    :func:`~node.generate.pixels.to_model`). The text: the study's report documents among
    ``paths``, else a report file beside the image (:func:`report_files`), else the prompt
    template for its Modality over its attributes (``templates``: ``[generate]
    prompt_templates``); cleaned (:func:`clean_text`) of placeholders, pseudonyms and dummy
    values and of the instance's own identifying values (and its reports').

    Left out, counted by reason (:class:`Skip`): what is not DICOM, not de-identified,
    synthetic, without pixel data (reports: read for their text only), with pixels that
    cannot be read, whose text cannot be cleaned, or an instance already read. Examples are
    ordered by SOP Instance UID, so :attr:`TrainingSet.data_hash` does not depend on the
    folders' names or layout.
    ValueError, with the counts, when no example is found."""
    skipped: dict[str, int] = {}
    files = _files(paths)
    images: list[_Found] = []
    reports: dict[str, list[Dataset]] = {}
    for found in _headers(files, skipped):
        if is_report(found.header):
            _count(skipped, Skip.NO_PIXELS)
            study = str(found.header.get("StudyInstanceUID", ""))
            reports.setdefault(study, []).append(found.header)
        else:
            images.append(found)
    examples: dict[str, Example] = {}
    for found in images:
        sop = str(found.header.get("SOPInstanceUID", ""))
        if sop in examples:
            _count(skipped, Skip.DUPLICATE)
            continue
        try:
            ds = dcmread(found.path)
            if "PixelData" not in ds:
                _count(skipped, Skip.NO_PIXELS)
                continue
            frames, _ = display_frames(ds)
            image = to_model(frames[len(frames) // 2], resolution).image
        except (ValueError, AttributeError, KeyError, TypeError, IndexError, OSError):
            _count(skipped, Skip.UNREADABLE_PIXELS)
            continue
        study = str(ds.get("StudyInstanceUID", ""))
        documents = reports.get(study, [])
        identifiers = [subject_identifiers(d) for d in (ds, *documents)]
        try:
            text, source = study_report(documents, found.path, identifiers)
            if source is None:
                text = clean_report(prompt_for(ds, templates), identifiers)
                source = TextSource.TEMPLATE
        except ValueError:
            _count(skipped, Skip.UNCLEAN_TEXT)
            continue
        examples[sop] = Example(sop, study, image, text, source)
    ordered = [examples[sop] for sop in sorted(examples)]
    if not ordered:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
        raise ValueError(
            f"no training images in {len(files)} files ({counts}): give folders of "
            "de-identified studies (Patient Identity Removed YES, not synthetic) with images")
    return TrainingSet(ordered, data_hash(ordered), skipped)


def data_hash(examples: Sequence[Example]) -> str:
    """SHA-256 (hex) over the examples' images (float32 bytes) and texts (UTF-8), in order."""
    digest = hashlib.sha256()
    for example in examples:
        image = np.ascontiguousarray(example.image, dtype=np.float32)
        digest.update(f"{image.shape}".encode())
        digest.update(image.tobytes())
        text = example.text.encode("utf-8")
        digest.update(len(text).to_bytes(8, "big"))
        digest.update(text)
    return digest.hexdigest()


def default_sources(settings: Settings) -> list[Path]:
    """Where the node keeps the de-identified outputs it made: its jobs' work folders
    (``[jobs] work_dir/<job id>/``), those that exist.

    A job's work folder is deleted once its outputs are delivered (``node.jobs.runner``), and
    fetched sources (``<job id>.source/``) are originals: so on a running node this holds
    only outputs not yet delivered (waiting for a destination, or dead), often nothing. The
    delivered studies are in the destinations (Orthanc, the research PACS): export them to a
    folder, or de-identify a folder with ``synthnode deidentify --out``, and train on that."""
    work = settings.jobs.work_dir
    if not work.is_dir():
        return []
    return sorted(p for p in work.iterdir() if p.is_dir() and not p.name.endswith(".source"))
