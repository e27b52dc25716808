"""What identifies the subject of one data set, and where it shows again.

One set of values, one way of matching them, for two uses: the leak scan of a de-identified
output (:meth:`Identifiers.leaks`) and the cleaning of descriptor text (:meth:`Identifiers.clean`,
the "C" action on text, PS3.15 E.3.5).

Matching is by whole values and whole tokens, never by substrings inside a token: a token is a
maximal run of letters and digits, joined by ``.``, ``_`` or ``-`` (``TOSHIBA_MEC`` is one
token, ``DOE^JANE`` two, a UID one). An identifier matches a value when it equals the whole
value (after stripping, per backslash-separated value) or when its tokens occur as a contiguous
run of the value's tokens, case-insensitively; UIDs match whole values only. A person's name
also matches by any one of its family or given name components (of 3 letters or more) standing
as a token in free text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

TOKEN = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")

MIN_LENGTH = 4
"""Shorter values ("M", "1", "CT") occur anywhere by chance: they identify nobody."""

MIN_NAME_LETTERS = 3
"""A name component matches on its own from this many letters ("Li" does not, "Lee" does)."""

FREE_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC", "PN"})
"""Where a lone name component counts (besides text found in OB and UN values)."""

TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})
"""Text that the "C" action cleans rather than empties."""

_BINARY_TEXT_VRS = frozenset({"OB", "UN"})
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_PIXEL_GROUP = 0x7FE0  # Pixel Data, Float and Double Float Pixel Data, offset tables: bulk

PLACEHOLDERS = frozenset({"ANONYMOUS", "ANONYMIZED", "CLEANED", "19000101", "19000101000000",
                          "000000", "000Y"})
"""The engine's own dummy values: never identifiers (a re-de-identified file holds them)."""

# -- what the Clean Descriptors option removes besides the identifiers ------------------------

_MONTH = (r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?")
_DATES = re.compile(
    r"(?<![\w.])(?:"
    r"(?:19|20)\d{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])"  # 2021-03-04
    r"|(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|[12]\d|3[01])[-/.](?:\d{4}|\d{2})"  # 03/04/2021
    rf"|(?:0?[1-9]|[12]\d|3[01])[- ]{_MONTH}[- ,]*(?:\d{{4}}|\d{{2}})"  # 4-Mar-2021
    rf"|{_MONTH} (?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?,? \d{{4}}"  # March 4, 2021
    r")(?![\w.])",
    re.IGNORECASE,
)
_TIMES = re.compile(r"(?<![\w.:])(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?(?![\w:])")
_LONG_DIGITS = re.compile(r"\d{6,}")
"""Inside a token: an MRN, accession or phone number (``MRN123456``, ``20210304``)."""
_DIGIT_GROUPS = re.compile(r"(?<![\w.])\+?\(?\d+\)?(?:[ ./-]\(?\d+\)?)+(?![\w])")


def tokens(text: str) -> tuple[str, ...]:
    """The tokens of ``text``, upper case."""
    return tuple(m.group().upper() for m in TOKEN.finditer(text))


def _phone_like(text: str) -> bool:
    """Digit groups with separators totalling >= 7 digits, one group of 4 or more digits or a
    leading "+" or "(": phone and ID numbers, not lists of sizes ("120 140 160 180")."""
    groups = re.findall(r"\d+", text)
    return (sum(map(len, groups)) >= 7
            and (max(map(len, groups)) >= 4 or text.startswith(("+", "("))))


@dataclass
class Identifiers:
    """The identifying values of one source data set, taken before de-identification."""

    whole: dict[str, str] = field(default_factory=dict)
    """Whole value, upper case (UIDs too: they have no letters) -> the keyword it came from."""
    runs: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Token run of a value (not of a UID) -> keyword."""
    names: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Token run of one person name component -> keyword; matched in free text only."""

    @classmethod
    def collect(cls, source: Dataset, keywords: Iterable[str], uid_keywords: Iterable[str]
                ) -> Identifiers:
        """The values of ``keywords`` and ``uid_keywords`` at the top level of ``source``, and
        of every person name anywhere in it (sequences included)."""
        found = cls()
        for keyword in uid_keywords:
            for value in _values(source.data_element(keyword) if keyword in source else None):
                if len(value.strip()) >= MIN_LENGTH:
                    found.whole.setdefault(value.strip(), keyword)
        for keyword in keywords:
            for value in _values(source.data_element(keyword) if keyword in source else None):
                found._add(value, keyword)
        for elem in _person_names(source):
            for value in _values(elem):
                found._add(value, elem.keyword or "a person name")
                found._add_name(PersonName(value), elem.keyword or "a person name")
        return found

    def _add(self, value: str, keyword: str) -> None:
        value = value.strip()
        if (len(value) < MIN_LENGTH or value.upper() in PLACEHOLDERS
                or not TOKEN.search(value)):
            return
        self.whole.setdefault(value.upper(), keyword)
        run = tuple(t for t in tokens(value) if t not in PLACEHOLDERS)
        if run and len("".join(run)) >= MIN_LENGTH:
            self.runs.setdefault(run, keyword)

    def _add_name(self, name: PersonName, keyword: str) -> None:
        for component in (name.family_name, name.given_name):
            run = tokens(component)
            letters = sum(c.isalpha() for c in component)
            if run and letters >= MIN_NAME_LETTERS and " ".join(run) not in PLACEHOLDERS:
                self.names.setdefault(run, keyword)

    # -- matching --------------------------------------------------------------------------

    def found_in(self, text: str, *, free_text: bool = True) -> set[str]:
        """The keywords whose values ``text`` holds (lone name components too, in
        ``free_text``: text people wrote, as opposed to coded values)."""
        hits = {self.whole[v] for v in _split(text) if v in self.whole}
        found = tokens(text)
        if not found:
            return hits
        hits |= {kw for run, kw in self.runs.items() if _contains(found, run)}
        if free_text:
            hits |= {kw for run, kw in self.names.items() if _contains(found, run)}
        return hits

    def leaks(self, ds: Dataset) -> set[str]:
        """The keywords whose values occur in ``ds`` (sequences included; file meta, which
        is not part of a data set, and bulk pixel data excluded)."""
        leaked: set[str] = set()
        for elem in _walk(ds):
            if elem.tag.group == _PIXEL_GROUP or elem.VR in _NUMBER_VRS or elem.value is None:
                continue
            if elem.VR in _BINARY_VRS:
                # Text in binary: each run of printable characters is a value of its own.
                raw = elem.value if isinstance(elem.value, bytes) else b""
                for text in _CONTROL.split(raw.decode("latin-1")):
                    if text:
                        leaked |= self.found_in(text, free_text=elem.VR in _BINARY_TEXT_VRS)
            else:
                leaked |= self.found_in("\\".join(_values(elem)),
                                        free_text=elem.VR in FREE_TEXT_VRS)
        return leaked

    def clean(self, text: str) -> str:
        """Descriptor ``text`` without its identifying parts: the identifiers, dates, times,
        phone and ID numbers; the rest kept, whitespace tidied ("" when nothing is left)."""
        if any(v in self.whole for v in _split(text)):
            return ""
        text = _DATES.sub(" ", text)
        text = _TIMES.sub(" ", text)
        text = _DIGIT_GROUPS.sub(lambda m: " " if _phone_like(m.group()) else m.group(), text)
        spans = list(TOKEN.finditer(text))
        drop: set[int] = set()
        upper = [m.group().upper() for m in spans]
        for run in (*self.runs, *self.names):
            n = len(run)
            for i in range(len(upper) - n + 1):
                if tuple(upper[i:i + n]) == run:
                    drop.update(range(i, i + n))
        drop.update(i for i, t in enumerate(upper) if _LONG_DIGITS.search(t))
        out, at = [], 0
        for i, m in enumerate(spans):
            if i in drop:
                out.append(text[at:m.start()])
                out.append(" ")
                at = m.end()
        out.append(text[at:])
        return _tidy("".join(out))


def _split(text: str) -> list[str]:
    """Backslash-separated values, stripped, upper case, empty ones left out."""
    return [v for v in (s.strip().upper() for s in text.split("\\")) if v]


def _contains(found: tuple[str, ...], run: tuple[str, ...]) -> bool:
    n = len(run)
    if n == 1:
        return run[0] in found
    return any(found[i:i + n] == run for i in range(len(found) - n + 1))


def _tidy(text: str) -> str:
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" ([,;:])", r"\1", text)
    text = re.sub(r"([,;:])(?:[,;:]|\s)+", r"\1 ", text)
    return text.strip(" ,;:")


def _values(elem: DataElement | None) -> list[str]:
    """The element's values as text, one per value ([] when absent, empty or a sequence)."""
    if elem is None or elem.VR == "SQ" or elem.value is None:
        return []
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def _person_names(ds: Dataset) -> Iterator[DataElement]:
    """The PN elements of ``ds`` and its sequences, converting no other element from its raw
    form (most elements are written as they were read)."""
    for raw in ds.elements():
        vr = raw.VR
        if not vr:
            try:
                vr = dictionary_VR(raw.tag)
            except KeyError:
                continue
        if vr == "PN":
            yield ds[raw.tag]
        elif vr == "SQ":
            for item in ds[raw.tag].value or []:
                yield from _person_names(item)


def _walk(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk(item)
        else:
            yield elem
