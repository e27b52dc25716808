"""Rule matching: the facts of each series, every rule's verdict on them, and the explanation.

:func:`series_facts` reads what rules look at (one instance's header per series, how the
series arrived); :func:`evaluate` is pure. Explanations print UIDs, AE titles, Modality,
BodyPartExamined and SOP Class UIDs, never other values: descriptions and arbitrary
attributes can hold names and free text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from node.config import RouteMode, Rule, RuleMatch
from node.deid.batch import collect
from node.errors import describe_unreadable

_GROUPING = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
# RuleMatch lists and regular expressions: (field, attribute keyword).
_ONE_OF = (("modality", "Modality"), ("body_part", "BodyPartExamined"),
           ("sop_class", "SOPClassUID"))
_SEARCH = (("study_description", "StudyDescription"),
           ("series_description", "SeriesDescription"))


@dataclass(frozen=True)
class SeriesFacts:
    """What rules match on for one series."""

    study_uid: str
    series_uid: str
    header: Dataset
    """One instance's header, without pixel data."""
    calling_aet: str = ""
    """The AE title that sent it ("" = unknown, e.g. a file given on the command line)."""
    called_aet: str = ""
    """The AE title it was sent to ("" = unknown)."""
    files: tuple[Path, ...] = ()
    """Every instance file of the series, sorted."""
    source: str = "dicom"
    """How the node got it: "dicom" (C-STORE), "orthanc" (the plugin), "backfill"."""


class Unreadable(NamedTuple):
    """A file that is not DICOM, or whose header cannot be used; the reason holds no value."""

    path: Path
    reason: str


class Scan(NamedTuple):
    """The series found in files and folders, and the files skipped."""

    series: list[SeriesFacts]
    unreadable: list[Unreadable]


@dataclass(frozen=True)
class Criterion:
    """One criterion of a rule checked against one series."""

    name: str
    """The ``[rules.match]`` key, ``tags.<Keyword>`` for a tag."""
    ok: bool
    detail: str
    """Why it holds or not, e.g. ``Modality "MR" is not one of CR, DX``."""


@dataclass(frozen=True)
class Verdict:
    """One rule's verdict on one series."""

    rule: str
    series_uid: str
    matched: bool
    """Every criterion holds."""
    criteria: tuple[Criterion, ...]
    applied: bool
    """The rule's tasks run on the series."""
    shadowed_by: str | None = None
    """Mode first: the earlier rule that took the series although this one matched."""


@dataclass(frozen=True)
class Evaluation:
    """Every rule's verdict on every series of one study."""

    study_uid: str
    rules: tuple[Rule, ...]
    series: tuple[SeriesFacts, ...]
    verdicts: tuple[Verdict, ...]

    def applied(self) -> list[tuple[Rule, tuple[str, ...]]]:
        """In rule order, each rule that applies to a series, with the UIDs of its series."""
        out: list[tuple[Rule, tuple[str, ...]]] = []
        for rule in self.rules:
            uids = tuple(v.series_uid for v in self.verdicts if v.rule == rule.name and v.applied)
            if uids:
                out.append((rule, uids))
        return out

    def explain(self) -> list[str]:
        """Human-readable lines: for each rule, the series it applies to and why, and for the
        other series the criteria that fail. No patient data."""
        labels = {s.series_uid: f"series {s.series_uid} ({s.header.get('Modality') or '?'}, "
                                f"{len(s.files)} file{'s' if len(s.files) != 1 else ''})"
                  for s in self.series}
        lines = [f"study {self.study_uid} ({len(self.series)} series)"]
        for rule in self.rules:
            verdicts = [v for v in self.verdicts if v.rule == rule.name]
            taken = sum(v.applied for v in verdicts)
            if taken:
                tasks = "; ".join(f"{t.task.value} -> "
                                  f"{', '.join(t.destinations or rule.destinations)}"
                                  for t in rule.tasks)
                lines.append(f'  rule "{rule.name}" applies to {taken} of {len(verdicts)} series: '
                             f"{tasks}")
            else:
                lines.append(f'  rule "{rule.name}" applies to no series')
            for v in verdicts:
                if v.shadowed_by is not None:
                    why = f'matches, but rule "{v.shadowed_by}" took it first (mode first)'
                elif v.matched:
                    why = "; ".join(c.detail for c in v.criteria) or "the rule matches any series"
                else:
                    why = "no: " + "; ".join(c.detail for c in v.criteria if not c.ok)
                lines.append(f"    {labels[v.series_uid]}: {why}")
        if not any(v.applied for v in self.verdicts):
            lines.append("  no rule matches this study: nothing will be made of it")
        return lines


def series_facts(
    paths: Sequence[Path], aets: Mapping[str, tuple[str, str]] | None = None, *,
    calling_aet: str = "", called_aet: str = "",
) -> Scan:
    """The series in ``paths`` (files, and folders searched recursively), sorted by Study then
    Series Instance UID. ``aets`` maps a SOP Instance UID to (calling, called) AE titles; an
    instance it lacks gets ``calling_aet`` and ``called_aet``."""
    members: dict[tuple[str, str], list[tuple[Path, str]]] = {}
    unreadable: list[Unreadable] = []
    for path in collect(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_GROUPING)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the others
            unreadable.append(Unreadable(path, describe_unreadable(exc)))
            continue
        key = (str(ds.get("StudyInstanceUID") or ""), str(ds.get("SeriesInstanceUID") or ""))
        if not all(key):
            unreadable.append(Unreadable(path, "no Study or Series Instance UID"))
            continue
        members.setdefault(key, []).append((path, str(ds.get("SOPInstanceUID") or "")))
    scan = facts_of(members, aets, calling_aet=calling_aet, called_aet=called_aet)
    return Scan(scan.series, unreadable + scan.unreadable)


Members = Mapping[tuple[str, str], Sequence[tuple[Path, str]]]
"""(Study Instance UID, Series Instance UID) -> its instances as (file, SOP Instance UID)."""


def facts_of(
    members: Members, aets: Mapping[str, tuple[str, str]] | None = None, *,
    calling_aet: str = "", called_aet: str = "",
) -> Scan:
    """The facts of series whose instances are already known (e.g. from the spool's index):
    one header read per series, sorted by Study then Series Instance UID."""
    series = []
    unreadable: list[Unreadable] = []
    for (study_uid, series_uid), files in sorted(members.items()):
        header, aet, kept = None, (calling_aet, called_aet), []
        for path, sop_uid in sorted(files):
            if header is None:  # the full header of the first file that has a sound one
                try:
                    header = dcmread(path, stop_before_pixels=True)
                except Exception as exc:  # noqa: BLE001
                    unreadable.append(Unreadable(path, describe_unreadable(exc)))
                    continue
                aet = (aets or {}).get(sop_uid, aet)
            kept.append(path)
        if header is not None:
            series.append(SeriesFacts(study_uid, series_uid, header, *aet, files=tuple(kept)))
    return Scan(series, unreadable)


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    if tag >> 16 == 0x0002:  # File Meta Information
        ds = getattr(ds, "file_meta", Dataset())
    element: DataElement | None = ds.get(tag)  # by tag: the element, not its value
    return element


def _text(element: DataElement | None) -> str | None:
    """The value as text, the values of a multi-valued attribute joined by a backslash; None
    when absent or empty."""
    if element is None or element.VM == 0:
        return None
    if element.VM > 1:
        return "\\".join(str(v) for v in element.value)
    return str(element.value)


def _one_of(name: str, label: str, value: str | None, allowed: list[str]) -> Criterion:
    wanted = ", ".join(allowed)
    if value is None:
        return Criterion(name, False, f"{label} is absent (wanted one of {wanted})")
    ok = value.strip().casefold() in {a.strip().casefold() for a in allowed}
    return Criterion(name, ok, f'{label} "{value}" is {"" if ok else "not "}one of {wanted}')


def _search(name: str, label: str, value: str | None, pattern: str) -> Criterion:
    if value is None:
        return Criterion(name, False, f"{label} is absent (wanted /{pattern}/)")
    ok = re.search(pattern, value, re.IGNORECASE) is not None
    return Criterion(name, ok, f"{label} {'matches' if ok else 'does not match'} /{pattern}/")


def criteria(match: RuleMatch, facts: SeriesFacts) -> tuple[Criterion, ...]:
    """Every criterion ``match`` gives, checked against ``facts``."""
    ds, out = facts.header, []
    for field, keyword in _ONE_OF:
        if allowed := getattr(match, field):
            out.append(_one_of(field, keyword, _text(_element(ds, keyword)), allowed))
    for field, keyword in _SEARCH:
        if pattern := getattr(match, field):
            out.append(_search(field, keyword, _text(_element(ds, keyword)), pattern))
    for field, label, value in (("calling_aet", "calling AE title", facts.calling_aet),
                                ("called_aet", "called AE title", facts.called_aet),
                                ("source", "source", facts.source)):
        if allowed := getattr(match, field):
            out.append(_one_of(field, label, value.strip() or None, allowed))
    for keyword, pattern in match.tags.items():
        element = _element(ds, keyword)
        if element is not None and element.VR == "SQ":
            out.append(Criterion(f"tags.{keyword}", False,
                                 f"{keyword} is a sequence: a sequence cannot be matched"))
        else:
            out.append(_search(f"tags.{keyword}", keyword, _text(element), pattern))
    return tuple(out)


def evaluate(rules: Sequence[Rule], mode: RouteMode, series: Sequence[SeriesFacts]
             ) -> list[Evaluation]:
    """Every rule's verdict on every series, one :class:`Evaluation` per study (in the order the
    studies first appear). Mode first: a series gets only the first rule that matches it."""
    studies: dict[str, list[SeriesFacts]] = {}
    for facts in series:
        studies.setdefault(facts.study_uid, []).append(facts)
    evaluations = []
    for study_uid, members in studies.items():
        taken: dict[str, str] = {}  # series UID -> the first rule that matched it
        verdicts = []
        for rule in rules:
            for facts in members:
                checked = criteria(rule.match, facts)
                matched = all(c.ok for c in checked)
                first = taken.setdefault(facts.series_uid, rule.name) if matched else rule.name
                shadowed_by = first if mode is RouteMode.FIRST and first != rule.name else None
                verdicts.append(Verdict(rule.name, facts.series_uid, matched, checked,
                                        matched and shadowed_by is None, shadowed_by))
        evaluations.append(Evaluation(study_uid, tuple(rules), tuple(members), tuple(verdicts)))
    return evaluations
