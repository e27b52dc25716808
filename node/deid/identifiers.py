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

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom import config as pydicom_config
from pydicom import hooks as pydicom_hooks
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
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

# -- what the leak scan may leave unconverted (Identifiers.leaks with the encoded bytes) -------
_PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "LO", "LT", "SH", "ST", "TM",
                             "UC", "UI", "UR", "UT"})
"""Text VRs whose values, read from plain ASCII bytes under any character set pydicom knows,
are substrings of those bytes and never raise (PN and IS are not: pydicom may raise on a PN under
ISO 2022, and reads an invalid IS such as ".5" as a float, "0.5")."""
_PLAIN_ASCII = re.compile(rb"[\x00\t\n\r\x0c\x20-\x7e]*\Z")
"""Printable ASCII, NUL padding and the white space controls: no escape sequence (ESC) and no
shift (SO, SI) that a decoder would act on, no byte a decoder would turn into non-ASCII."""
_ASCII_IDENTITY = frozenset({
    "euc_kr", "gb18030", "gb2312", "gbk", "iso2022_jp", "iso2022_jp_2", "iso8859-1", "iso8859-2",
    "iso8859-3", "iso8859-4", "iso8859-5", "iso8859-6", "iso8859-7", "iso8859-8", "iso8859-9",
    "shift_jis", "tis-620", "utf-8"})
"""The codecs of DICOM's character sets (pydicom's table), which read plain ASCII as itself;
pydicom also takes any other codec name Python knows (utf_7 reads "+AEQATwBF-" as "DOE",
utf_16 reads "D\\0O\\0E\\0" so), and under those no text is left unconverted."""
_NUMBER_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8}
"""Numbers whose conversion fails only on a length that is not a multiple of the value size."""
_BULK_VRS = frozenset({"OB", "OW"})

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

    def leaks(self, ds: Dataset, *, as_read: bool = False) -> set[str]:
        """The keywords whose values occur in ``ds`` (sequences included; file meta, which
        is not part of a data set, and bulk pixel data excluded).

        With ``as_read`` (``ds`` was just read and nothing in it converted since) the same
        answer and the same errors, faster: an element that pydicom would read as text from
        plain ASCII bytes holding none of the identifiers' ASCII strings (whole values, and one
        token of each run) can hold no identifier, and is left unconverted; so is a number of a
        valid length (:meth:`_leaks_unconverted`). Every other element is read and matched as
        without ``as_read``."""
        if not as_read or not _default_conversion():
            return self._leaks_converted(ds)
        return self._leaks_unconverted(ds, self._ascii_pattern())

    def _leaks_converted(self, ds: Dataset) -> set[str]:
        leaked: set[str] = set()
        for elem in _walk(ds):
            leaked |= self._element_leaks(elem)
        return leaked

    def _element_leaks(self, elem: DataElement) -> set[str]:
        if elem.tag.group == _PIXEL_GROUP or elem.VR in _NUMBER_VRS or elem.value is None:
            return set()
        if elem.VR in _BINARY_VRS:
            # Text in binary: each run of printable characters is a value of its own.
            leaked: set[str] = set()
            raw = elem.value if isinstance(elem.value, bytes) else b""
            for text in _CONTROL.split(raw.decode("latin-1")):
                if text:
                    leaked |= self.found_in(text, free_text=elem.VR in _BINARY_TEXT_VRS)
            return leaked
        return self.found_in("\\".join(_values(elem)), free_text=elem.VR in FREE_TEXT_VRS)

    def _leaks_unconverted(self, ds: Dataset, pattern: re.Pattern[bytes] | None) -> set[str]:
        """:meth:`_leaks_converted` in the same order, converting only what may raise or may
        match: why leaving the rest raw changes nothing is said at :data:`_PLAIN_TEXT_VRS` and
        :data:`_NUMBER_SIZES` (tests/test_leak_scan.py checks it against the full walk)."""
        leaked: set[str] = set()
        plain = _reads_ascii_as_itself(ds)
        for item in ds.elements():
            if isinstance(item, RawDataElement) and item.value is not None:
                vr = item.VR
                if vr is None or vr == "UN":
                    data: dict[str, object] = {}
                    pydicom_hooks.hooks.raw_element_vr(item, data, ds=ds)
                    vr = str(data["VR"])
                value = item.value
                if plain and vr in _PLAIN_TEXT_VRS and _PLAIN_ASCII.match(value) and (
                        pattern is None or not pattern.search(value.upper())):
                    continue
                size = _NUMBER_SIZES.get(vr)
                if size is not None and len(value) % size == 0:
                    continue
                if vr in _BULK_VRS and item.tag >> 16 == _PIXEL_GROUP:
                    continue
            elem = ds[item.tag]
            if elem.VR == "SQ":
                for child in elem.value or []:
                    leaked |= self._leaks_unconverted(child, pattern)
            else:
                leaked |= self._element_leaks(elem)
        return leaked

    def _ascii_pattern(self) -> re.Pattern[bytes] | None:
        """Any of the ASCII strings one of which a value must hold to match: every whole value
        (a non-ASCII one cannot equal text read from ASCII), the longest token of every run;
        upper case, as matching is. None when there is none."""
        strings = {w for w in self.whole if w.isascii()}
        strings |= {max(run, key=len) for run in (*self.runs, *self.names)}
        if not strings:
            return None
        ordered = sorted((s.encode("ascii") for s in strings), key=len, reverse=True)
        return re.compile(b"|".join(re.escape(s) for s in ordered))

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


def _reads_ascii_as_itself(ds: Dataset) -> bool:
    """Whether every codec pydicom reads ``ds``'s text with (as ``Dataset.__getitem__`` picks
    them) is in :data:`_ASCII_IDENTITY`."""
    found = ds.original_character_set or ds._character_set
    names = [found] if isinstance(found, str) else list(found or [])
    try:
        return all(codecs.lookup(name).name in _ASCII_IDENTITY for name in names)
    except LookupError:
        return False


def _default_conversion() -> bool:
    """Whether pydicom reads raw elements as :data:`_PLAIN_TEXT_VRS` assumes: its own hooks,
    no element callback, validation that warns rather than raises, DS and IS as Python
    numbers (numpy's would print differently)."""
    return (pydicom_config.data_element_callback is None
            and pydicom_config.settings.reading_validation_mode != pydicom_config.RAISE
            and not pydicom_config.use_DS_numpy and not pydicom_config.use_IS_numpy
            and pydicom_hooks.hooks.raw_element_vr is pydicom_hooks.raw_element_vr
            and pydicom_hooks.hooks.raw_element_value is pydicom_hooks.raw_element_value)


def _walk(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk(item)
        else:
            yield elem
