"""The de-identification engine: PS3.15 Annex E, Basic Profile plus options, applied recursively.

What it does to a data set (a copy; the input is untouched):

1. every attribute of Table E.1-1 gets its action (:mod:`node.deid.profile`), inside sequences
   too; attributes not in the table are kept, sequences among them still cleaned;
2. private attributes are removed, except those on the ``safe_private`` allowlist with Retain
   Safe Private (their text cleaned, as C asks); curves (50xx) and overlays (60xx) are
   removed whole, Clean Graphics or not, as are group lengths;
3. Patient ID and Name become keyed HMAC pseudonyms; every UID with action U becomes a UID
   derived from an HMAC of the original, so the same source UID maps to the same new UID on
   every run and every machine sharing the key, and references stay coherent; but for Study
   and Frame of Reference UIDs, shared by every variant of a study, the new UID also derives
   from the configuration's variant (:func:`variant_of`): other options make other objects;
4. with Retain Longitudinal Temporal Information with Modified Dates, dates move back by a
   per-patient number of days (1..``date_shift_max_days``), the same in all of that patient's
   studies;
5. Code Meanings of codes from private coding schemes (designator "99..." or "L", PS3.16 8.2)
   become their Code Value: standard schemes' meanings are public vocabulary, a private
   scheme's are site text, which can name people ("CT chest for <name>");
6. the values of structured content items (Text Value, Person Name, Date, Time, DateTime, UID of
   a content item, 0040,A1xx) are cleaned wherever they occur: the table names the sequences
   that hold them (Content Sequence, Acquisition Context Sequence) but not the values, and
   keeping or cleaning a sequence by recursion would keep its free text;
7. C on text (the descriptors of Clean Descriptors, kept safe private text) takes out the
   source's identifying values, dates, times and phone or ID numbers and keeps the rest
   (:meth:`node.deid.identifiers.Identifiers.clean`);
8. the PS3.15 E.1.1 markers are written (:func:`node.dicom.mark_deidentified`) and the file meta
   follows the new SOP Instance UID.

Compound actions (X/Z, X/D, Z/D, X/Z/D) need the attribute's Type: ``type_of`` (by default
the PS3.3 tables in ``iod_types.json``) gives it at the top level of the IOD or inside the
enclosing sequence, and the action is the weakest that Type allows (Type 3: removed; 2: empty;
1: dummy). Where the Type is unknown the engine keeps the attribute with an empty or dummy
value, which conforms whatever the Type and reveals nothing. An X attribute that the IOD
requires (Type 1 or 2 where it stands) is kept as a dummy or empty value instead: as private,
and the output stays valid. X/Z/U* sequences are kept with their references remapped.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.config import DeidOption, DeidSettings, OutputSettings
from node.deid.encoding import SEQUENCE_DELIMITER, write_file
from node.deid.identifiers import TEXT_VRS, Identifiers
from node.deid.pixels import (
    Inpainter,
    PixelDataError,
    PixelVerdict,
    check_rules,
    clean_pixels,
    likely_recognizable,
)
from node.deid.profile import CODE, Action, Profile, iod_type
from node.deid.text import shared_finder
from node.dicom import Deidentification, TemporalInformation, mark_deidentified
from node.errors import NodeError, describe
from node.keys import key_problem
from node.uids import derive_uid

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
SOP_INSTANCE_UID = 0x00080018

# UIDs every variant of a study shares (PS3.3: the study, and the patient's geometry in it):
# remapped from the original alone, whatever the options. Every other UID (series, instances,
# references to them) also depends on the variant, so that two rules de-identifying the same
# image differently make two objects, not one UID for two contents.
_SHARED_UIDS = frozenset({
    0x0020000D,  # Study Instance UID
    0x00200052,  # Frame of Reference UID
    0x30060024,  # Referenced Frame of Reference UID
    0x300600C2,  # Related Frame of Reference UID
})
_STUDY_REFERENCES = frozenset({
    0x00081110,  # Referenced Study Sequence
    0x30060012,  # RT Referenced Study Sequence
})
"""Sequences whose Referenced SOP Instance UID is a Study Instance UID (shared, like it)."""
_REFERENCED_SOP_INSTANCE_UID = 0x00081155

# Settings that do not change what an output holds: left out of its variant.
_NOT_IN_VARIANT = {"key", "honest_broker_file"}

TypeOf = Callable[[str, int, int | None], str | None]
"""(SOP Class UID, tag, enclosing sequence tag or None) -> the attribute's Type there ("1",
"2", "3") or None when unknown."""

# Attributes only allowed while another is present (Type 1C on its presence).
_DEPENDENTS = {0x00102298: 0x00102297}  # Responsible Person Role -> Responsible Person


_TEXT_DUMMY = "ANONYMIZED"
_DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101",
    "DT": "19000101000000", "TM": "000000", "LO": _TEXT_DUMMY, "SH": _TEXT_DUMMY,
    "LT": _TEXT_DUMMY, "ST": _TEXT_DUMMY, "UT": _TEXT_DUMMY, "UC": _TEXT_DUMMY,
    "PN": "ANONYMIZED", "UR": "ANONYMIZED", "DS": "0", "IS": "0", "FL": 0.0, "FD": 0.0,
    "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "OB": b"\0\0", "OW": b"\0\0", "OD": b"\0" * 8, "OF": b"\0" * 4, "OL": b"\0" * 4,
    "OV": b"\0" * 8, "UN": b"\0\0",
}
_DATE_VRS = ("DA", "DT")


_SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
"""Structured Report storage SOP classes (PS3.4 B.5): a document tree in Content Sequence."""


class DeidentificationError(NodeError):
    """De-identification cannot run (bad settings, unusable data); the message says why and
    holds no patient data."""


class Quarantined(DeidentificationError):
    """This data set must not be passed on (burned-in text without a rule, a likely face, an
    identifier that survived); the message gives the reason, without patient data."""


# Values of these attributes are what a leak would look like: after de-identification, none
# may occur in the output (unless an option keeps it on purpose), nor in cleaned descriptors.
# Person names anywhere in the source count too (Identifiers.collect).
_IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
    "MedicalRecordLocator", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "RequestingPhysician", "PatientBirthDate",
)
_INSTITUTION = ("InstitutionName", "InstitutionAddress")
_ORIGINAL_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                  "FrameOfReferenceUID")

# Content item values (PS3.3 C.17.3): what replaces them; dates follow the date options.
_CONTENT_VALUES = {
    0x0040A160: "CLEANED",  # Text Value
    0x0040A123: "ANONYMIZED",  # Person Name
    0x0040A121: "DA",  # Date
    0x0040A120: "DT",  # DateTime
    0x0040A122: "TM",  # Time
    0x0040A124: "UI",  # UID
}

@dataclass(frozen=True)
class _Pass:
    """What every step of one data set's cleaning needs."""

    sop_class: str
    shift: datetime.timedelta
    """How far dates move back (Modified Dates)."""
    identifiers: Identifiers
    """The source's identifying values, which cleaned text must not hold."""


_BULK_PIXELS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
"""Float Pixel Data, Double Float Pixel Data, Pixel Data."""


BULK_MIN_BYTES = 1 << 20
"""Pixel Data at least this big is written from its value directly (:func:`_save_bulk_last`)."""

_PIXEL_DATA = 0x7FE00010
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010


def _save_bulk_last(ds: Dataset, f: BinaryIO) -> bool:
    """Write ``ds`` to ``f`` with its Pixel Data written straight from the value (pydicom
    encodes each element into a buffer first: a second copy of a 1 GB multi-frame object);
    byte for byte what pydicom writes. Only where that is simple to get right: a little-endian,
    not deflated transfer syntax, Pixel Data of at least :data:`BULK_MIN_BYTES` and the data
    set's last element. False (nothing written) otherwise."""
    if _PIXEL_DATA not in ds or max(ds.keys()) != _PIXEL_DATA:
        return False
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_deflated or not syntax.is_little_endian:
        return False
    elem = ds[_PIXEL_DATA]
    value = elem.value
    if not isinstance(value, bytes) or len(value) < BULK_MIN_BYTES:
        return False
    encapsulated = syntax.is_encapsulated
    if encapsulated != elem.is_undefined_length or (
            encapsulated and not value.startswith(b"\xfe\xff\x00\xe0")):
        return False  # (pydicom refuses encapsulated data without its item tag: quarantined)
    vr = str(elem.VR)
    if vr not in ("OB", "OW"):
        vr = "OB" if encapsulated or int(ds.get("BitsAllocated", 8) or 8) <= 8 else "OW"
    del ds[_PIXEL_DATA]
    try:
        if not write_file(ds, f):
            ds.save_as(f, enforce_file_format=True)
    finally:
        ds[_PIXEL_DATA] = elem
    pad = b"\x00" if len(value) % 2 else b""
    length = 0xFFFFFFFF if encapsulated else len(value) + len(pad)
    head = struct.pack("<HH", 0x7FE0, 0x0010)
    if not syntax.is_implicit_VR:
        head += vr.encode() + b"\x00\x00"
    f.write(head + struct.pack("<I", length))
    f.write(value)
    f.write(pad)
    if encapsulated:
        f.write(SEQUENCE_DELIMITER)
    return True


def _save(ds: Dataset, f: BinaryIO) -> None:
    try:
        if not _save_bulk_last(ds, f) and not write_file(ds, f):
            ds.save_as(f, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        # pydicom's: a value that its VR cannot encode; never passed on half-written
        raise Quarantined(f"the de-identified data set cannot be encoded "
                          f"({describe(exc)})") from None


class Deidentifier:
    """De-identifies data sets under one configuration (key, options, UID root)."""

    def __init__(
        self, settings: DeidSettings, output: OutputSettings, type_of: TypeOf = iod_type,
        inpainter: Inpainter | None = None,
    ) -> None:
        problem = key_problem(settings.key)
        if problem:
            raise DeidentificationError(problem)
        self.settings = settings
        self.output = output
        self.options = frozenset(settings.options)
        self.profile = Profile(self.options)
        self.type_of = type_of
        self.inpainter = inpainter
        self.finder = shared_finder() if settings.detect_text else None
        try:
            check_rules(settings.pixel_rules)
        except ValueError as exc:
            raise DeidentificationError(f"[[deid.pixel_rules]]: {exc}") from None
        self._key = settings.key.encode("utf-8")
        self._safe_private = {_private_spec(s) for s in settings.safe_private}
        self.variant = variant_of(settings, output)

    # -- keyed derivations -----------------------------------------------------------------

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, subject: str) -> str:
        """The Patient ID that stands for ``subject`` (the original Patient ID)."""
        return "SN" + base64.b32encode(self._mac("patient-id", subject)).decode()[:14]

    def date_shift_days(self, subject: str) -> int:
        """How many days this patient's dates move back (1..date_shift_max_days)."""
        n = int.from_bytes(self._mac("date-shift", subject)[:8], "big")
        return 1 + n % self.settings.date_shift_max_days

    def new_uid(self, uid: str, shared: bool = False) -> str:
        """The UID that stands for ``uid``: for a ``shared`` one (a Study or Frame of
        Reference UID) the same under every configuration with this key; else one of this
        configuration's :attr:`variant` (other options, another object)."""
        mac = self._mac("uid", uid).hex()
        if shared:
            return derive_uid(self.output.uid_root, "deid-uid", mac)
        return derive_uid(self.output.uid_root, "deid-uid", mac, self.variant)

    @property
    def temporal(self) -> TemporalInformation:
        if DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in self.options:
            return TemporalInformation.UNMODIFIED
        if DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options:
            return TemporalInformation.MODIFIED
        return TemporalInformation.REMOVED

    def record(
        self, *, burned_in: bool = False, recognizable: bool = False, pixels_clean: bool = True
    ) -> Deidentification:
        """The provenance written into an output: the options that hold for it (the pixel
        options only where its pixels are clean)."""
        edition = self.profile.edition.split(",")[0].replace("DICOM ", "")
        claimed = set(self.options)
        if not pixels_clean:
            claimed.discard(DeidOption.CLEAN_PIXEL_DATA)
        if recognizable:
            claimed.discard(DeidOption.CLEAN_RECOGNIZABLE_VISUAL_FEATURES)
        return Deidentification(
            method=f"synthnode {edition} E.1-1",
            options=tuple(CODE[o] for o in sorted(claimed)),
            temporal=self.temporal,
            burned_in_annotation=burned_in,
            recognizable_visual_features=recognizable,
        )

    # -- the data set ----------------------------------------------------------------------

    def deidentify(self, source: Dataset, *, in_place: bool = False,
                   identifiers: Identifiers | None = None) -> Dataset:
        """A de-identified copy of ``source`` in its own IOD: tags, pixels, markers; with
        ``in_place``, ``source`` itself becomes it (no copy: faster, for callers that reread
        the file anyway; take :meth:`identifiers` first and pass them, as :meth:`encode` needs
        them too).

        Raises :class:`Quarantined` when it must not be passed on: a likely face with Clean
        Recognizable Visual Features, burned-in text with no pixel rule (unless the settings
        let it pass, marked), an identifier still present (see :meth:`encode`)."""
        # What identifies the subject, taken before anything changes (cleaning works in place).
        identifiers = self.identifiers(source) if identifiers is None else identifiers
        recognizable = likely_recognizable(source)
        if recognizable and DeidOption.CLEAN_RECOGNIZABLE_VISUAL_FEATURES in self.options:
            raise Quarantined(f"recognizable visual features likely: {recognizable}")
        if (str(source.get("SOPClassUID", "")).startswith(_SR_CLASSES)
                and "ContentSequence" in source
                and DeidOption.CLEAN_STRUCTURED_CONTENT not in self.options):
            # The Basic Profile removes Content Sequence: what would be left is an empty report.
            raise Quarantined("structured report with free text: its content would be removed "
                              "(enable the clean_structured_content option to keep it, cleaned)")
        synthetic = str(source.get("SyntheticData", "")).upper() == "YES"
        ds = source if in_place else copy.deepcopy(source)
        subject = str(ds.get("PatientID", "") or ds.get("PatientName", "") or
                      ds.get("StudyInstanceUID", ""))
        if not subject:
            raise DeidentificationError("no Patient ID, Patient Name or Study Instance UID to "
                                        "derive a pseudonym from")
        shift = datetime.timedelta(days=self.date_shift_days(subject))
        work = _Pass(str(ds.get("SOPClassUID", "")), shift, identifiers)
        self._clean(ds, work, parent=None)
        pseudonym = self.pseudonym(subject)
        for tag, value in ((_PATIENT_ID, pseudonym), (_PATIENT_NAME, f"ANONYMOUS^{pseudonym}")):
            if tag in ds and dictionary_VR(tag) != ds[tag].VR:
                del ds[tag]  # sent with another VR (IS, say): written anew with its own
            if tag in ds:
                ds[tag].value = value
            else:
                ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        try:
            pixels = clean_pixels(ds, self.settings, self.inpainter, identifiers=identifiers,
                                  finder=self.finder) if "PixelData" in ds else None
        except PixelDataError as exc:
            raise Quarantined(f"pixel data cannot be cleaned: {exc}") from None
        if pixels is not None and pixels.verdict is PixelVerdict.QUARANTINE:
            raise Quarantined(pixels.reason)
        record = self.record(
            burned_in=str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
            recognizable=bool(recognizable),
            pixels_clean=pixels is None or (
                pixels.verdict in (PixelVerdict.CLEAN, PixelVerdict.CLEANED) and pixels.verified),
        )
        mark_deidentified(ds, record, self.output, synthetic=synthetic)
        if hasattr(ds, "file_meta") and "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def identifiers(self, source: Dataset) -> Identifiers:
        """Values of ``source`` that must not appear in its de-identified output nor in its
        cleaned text (those an enabled option keeps on purpose excepted)."""
        keywords = list(_IDENTIFYING)
        if DeidOption.RETAIN_INSTITUTION_IDENTITY not in self.options:
            keywords += _INSTITUTION
        if DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in self.options:
            keywords.remove("PatientBirthDate")
        uids = () if DeidOption.RETAIN_UIDS in self.options else _ORIGINAL_UIDS
        return Identifiers.collect(source, keywords, uids)

    def encode(self, output: Dataset, identifiers: Identifiers) -> bytes:
        """``output`` as DICOM file bytes, after checking that none of the source's
        ``identifiers`` (:meth:`identifiers`, taken before de-identification) survived in the
        data set they encode, read back (raises :class:`Quarantined` naming the attributes).
        Whole values and whole tokens match, never a substring inside a token
        (:mod:`node.deid.identifiers`)."""
        encoded = self._encoded_once(output, identifiers)
        if encoded is not None:
            return encoded
        self.check_encoded(output, identifiers)
        buffer = BytesIO()
        _save(output, buffer)
        return buffer.getvalue()

    def write(self, output: Dataset, identifiers: Identifiers, path: Path) -> None:
        """:meth:`encode`, straight into the file ``path`` (never the whole object in memory
        twice: what a large multi-frame instance needs); the file is removed on failure."""
        encoded = self._encoded_once(output, identifiers)
        if encoded is None:
            self.check_encoded(output, identifiers)
        try:
            with path.open("wb") as f:
                if encoded is None:
                    _save(output, f)
                else:
                    f.write(encoded)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _encoded_once(self, output: Dataset, identifiers: Identifiers) -> bytes | None:
        """For an object whose pixel data is small (under :data:`BULK_MIN_BYTES`): its file
        bytes, encoded once and scanned as read back (what :meth:`check_encoded` scans: the
        scan skips the pixel group, so reading it back changes nothing), instead of encoded
        twice; the same bytes :func:`_save` writes. None for a large object (scanned without
        its pixels, then written from their value) and for one that does not encode or read
        back (the two passes then refuse it as they always did, with the same reason)."""
        bulk = sum(len(output[t].value or b"") for t in _BULK_PIXELS
                   if t in output and isinstance(output[t].value, bytes))
        if bulk >= BULK_MIN_BYTES:
            return None
        buffer = BytesIO()
        try:
            _save(output, buffer)
            encoded = buffer.getvalue()
            read_back = dcmread(BytesIO(encoded))
        except Exception:  # noqa: BLE001 - the two-pass path says what is wrong, as before
            return None
        leaked = sorted(identifiers.leaks(read_back, as_read=True))
        if leaked:
            raise Quarantined(f"original values of {', '.join(leaked)} survived "
                              "de-identification")
        return encoded

    def check_encoded(self, output: Dataset, identifiers: Identifiers) -> None:
        """The leak scan of :meth:`encode`: ``output`` is encoded and read back, and no
        identifier may occur in what is read. Bulk pixel data (which the scan never reads as
        text) is left out of that encoding, so a large object is not held twice more."""
        bulk = [output.pop(tag) for tag in _BULK_PIXELS if tag in output]
        try:
            buffer = BytesIO()
            _save(output, buffer)
        finally:
            for elem in bulk:
                output[elem.tag] = elem
        buffer.seek(0)
        leaked = sorted(identifiers.leaks(dcmread(buffer)))
        if leaked:
            raise Quarantined(f"original values of {', '.join(leaked)} survived "
                              "de-identification")

    def _clean(self, ds: Dataset, work: _Pass, parent: int | None) -> None:
        scheme = str(ds.get("CodingSchemeDesignator", "") or "")
        if (scheme.startswith("99") or scheme == "L") and "CodeMeaning" in ds:
            ds.CodeMeaning = str(ds.get("CodeValue", "") or "private code")
        kept_blocks: set[tuple[int, int]] = set()
        private_creators: list[int] = []
        for key in list(ds.keys()):
            tag = int(key)
            group, element = tag >> 16, tag & 0xFFFF
            if element == 0x0000 or group == 0x0000:
                # group lengths: recomputed on write, or absent; command elements (0000,eeee)
                # belong to a DIMSE message, never to a data set (no file may hold them)
                del ds[tag]
                continue
            if group % 2 == 1:
                if 0x0010 <= element <= 0x00FF:
                    private_creators.append(tag)
                elif self._keep_private(ds, group, element):
                    # Retain Safe Private: C; a safe value that is not text is kept as it is.
                    kept_blocks.add((group, element >> 8))
                    if ds[tag].VR == "SQ" or ds[tag].VR in TEXT_VRS:
                        self._clean_value(ds[tag], work, tag)
                else:
                    del ds[tag]
                continue
            if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
                del ds[tag]  # curves and overlays, whole (PS3.15 E.1-1: 50xx, 60xx)
                continue
            action = self.profile.action(tag)
            if action is None and tag in _CONTENT_VALUES:
                self._clean_content_value(ds, tag, work.shift)
                continue
            if action is None or action is Action.KEEP:
                if self._is_sequence(ds, tag):
                    self._descend(ds[tag], work, tag)
                continue
            self._apply(ds, tag, self._resolve(action, work.sop_class, tag, parent), work,
                        parent)
        for tag in private_creators:
            if (tag >> 16, tag & 0xFF) not in kept_blocks:
                del ds[tag]
        for dependent, condition in _DEPENDENTS.items():
            if dependent in ds and condition not in ds:
                del ds[dependent]

    @staticmethod
    def _is_sequence(ds: Dataset, tag: int) -> bool:
        """Without converting the raw element (most elements are kept as read)."""
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if not vr:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                return False
        return vr == "SQ"

    def _keep_private(self, ds: Dataset, group: int, element: int) -> bool:
        if DeidOption.RETAIN_SAFE_PRIVATE not in self.options:
            return False
        creator_tag = (group << 16) | (element >> 8)
        creator = ds.get(creator_tag)
        if creator is None:
            return False
        return (str(creator.value).strip(), group, element & 0xFF) in self._safe_private

    def _resolve(self, action: Action, sop_class: str, tag: int,
                 parent: int | None) -> Action:
        """The single action (D, Z, X, K, C or U) that ``action`` comes to for this attribute
        where it stands, by its Type."""
        if action is Action.REMOVE:  # conditional Types (1C, 2C) do not require it: removed
            required = self.type_of(sop_class, tag, parent)
            return (Action.DUMMY if required == "1" else Action.EMPTY if required == "2"
                    else Action.REMOVE)
        if not action.compound:
            return action
        if action is Action.REMOVE_EMPTY_OR_NEW_UIDS:
            return Action.KEEP  # a reference sequence: kept, its UIDs remapped inside
        choices = action.choices
        attr_type = self.type_of(sop_class, tag, parent)
        if attr_type and attr_type.startswith("1") and Action.DUMMY in choices:
            return Action.DUMMY
        if attr_type and attr_type.startswith("2") and Action.EMPTY in choices:
            return Action.EMPTY
        if attr_type and attr_type.startswith("3"):
            return choices[0]
        # Type unknown: present, empty or dummy
        return Action.DUMMY if Action.DUMMY in choices else Action.EMPTY

    def _descend(self, elem: DataElement, work: _Pass, tag: int) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self._clean(item, work, parent=tag)

    def _apply(self, ds: Dataset, tag: int, action: Action, work: _Pass,
               parent: int | None = None) -> None:
        elem = ds[tag]
        vr = elem.VR
        if action is Action.KEEP:
            self._descend(elem, work, tag)
        elif action is Action.REMOVE:
            del ds[tag]
        elif action is Action.EMPTY:
            elem.value = DicomSequence() if vr == "SQ" else None
        elif action is Action.DUMMY:
            if vr == "SQ":
                self._descend(elem, work, tag)
            elif vr == "UI":
                self._remap(elem, parent)
            else:
                elem.value = _DUMMY.get(vr)
        elif action is Action.CLEAN:
            self._clean_value(elem, work, tag)
        elif action is Action.NEW_UID:
            self._remap(elem, parent)
        else:
            raise DeidentificationError(f'action "{action}" is not a single action, for '
                                        f"({tag >> 16:04X},{tag & 0xFFFF:04X})")

    def _clean_value(self, elem: DataElement, work: _Pass, tag: int) -> None:
        """C: replace with values of similar meaning that identify nobody."""
        if elem.VR == "SQ":
            self._descend(elem, work, tag)
        elif elem.VR in _DATE_VRS and self.temporal is TemporalInformation.MODIFIED:
            elem.value = _shift_dates(elem, work.shift)
        elif elem.VR == "TM" and self.temporal is TemporalInformation.MODIFIED:
            pass  # a day shift leaves the time of day as it was
        elif elem.VR in TEXT_VRS and elem.value:
            # Descriptors (Clean Descriptors, PS3.15 E.3.5): their identifying parts out, the
            # rest kept; emptied, never removed, so the attribute's Type still holds.
            if elem.VM > 1:
                elem.value = [work.identifiers.clean(str(v)) for v in elem.value]
            else:
                elem.value = work.identifiers.clean(str(elem.value))
        else:
            elem.value = None

    def _clean_content_value(self, ds: Dataset, tag: int, shift: datetime.timedelta) -> None:
        elem = ds[tag]
        replacement = _CONTENT_VALUES[tag]
        if replacement == "UI":
            self._remap(elem)
        elif replacement in _DATE_VRS or replacement == "TM":
            if self.temporal is TemporalInformation.UNMODIFIED:
                return
            if self.temporal is TemporalInformation.MODIFIED:
                if replacement != "TM":
                    elem.value = _shift_dates(elem, shift)
                return
            elem.value = _DUMMY[replacement]
        else:
            elem.value = replacement

    def _remap(self, elem: DataElement, parent: int | None = None) -> None:
        if elem.value in (None, ""):
            return
        shared = elem.tag in _SHARED_UIDS or (
            elem.tag == _REFERENCED_SOP_INSTANCE_UID and parent in _STUDY_REFERENCES)
        if elem.VM > 1:
            elem.value = [self.new_uid(str(v), shared) for v in elem.value]
        else:
            elem.value = self.new_uid(str(elem.value), shared)


def variant_of(settings: DeidSettings, output: OutputSettings) -> str:
    """What makes this configuration's outputs differ from another's (options, pixel rules,
    text handling, output IOD, manufacturer...), as a short hash: part of every output UID
    but the shared ones. Neither the key (it keys the UIDs anyway) nor where the honest broker
    writes is part of it."""
    values = settings.model_dump(mode="json", exclude=_NOT_IN_VARIANT)
    # Order and names change nothing in an output: a list reordered or a pixel rule renamed
    # keeps every UID (else a PACS would get every study again under new ones).
    for name, value in values.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            values[name] = sorted(value)
    rules = [{k: v for k, v in rule.items() if k != "name"} for rule in values["pixel_rules"]]
    values["pixel_rules"] = sorted(rules, key=lambda r: json.dumps(r, sort_keys=True))
    values["manufacturer"] = output.manufacturer
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _private_spec(spec: str) -> tuple[str, int, int]:
    """ "CREATOR:gggg,ee" (validated by the settings) -> (creator, group, element offset)."""
    creator, place = spec.rsplit(":", 1)
    group, offset = place.split(",")
    return creator.strip(), int(group, 16), int(offset, 16)


def _shift_dates(elem: DataElement, shift: datetime.timedelta) -> Any:
    values = elem.value if elem.VM > 1 else [elem.value]
    out = []
    for value in values:
        text = str(value or "")
        if len(text) < 8 or not text[:8].isdigit():
            out.append("")  # not a date we can shift: nothing of it may survive
            continue
        try:
            day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])) - shift
        except ValueError:
            out.append("")
            continue
        out.append(day.strftime("%Y%m%d") + (text[8:] if elem.VR == "DT" else ""))
    return out if elem.VM > 1 else out[0]
