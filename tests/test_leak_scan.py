"""The leak scan that leaves plain elements unconverted (``Identifiers.leaks(ds, as_read=True)``,
what the de-identification engine runs on each output as read back) answers exactly what the
full walk answers (every element converted and matched) and raises where it raises.

The data sets are random and hostile on purpose: identifier tokens in text of every VR, in
sequences, private blocks and binary values; non-ASCII text under nine character sets; escape
sequences and shift controls in "ASCII" text; numbers of wrong lengths; invalid IS and DS
values; both VR encodings. Each is written by pydicom and read back twice, once per scan."""

from __future__ import annotations

import random
import struct
import warnings
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.deid.identifiers import Identifiers

WORDS = ["DOE", "Jane", "SMITH", "MRN123456", "ACC-20210304", "St. Mary's", "ACME", "HOSP",
         "1.2.826.0.1.3680043.2.1143.77", "19800101", "Lee", "Li", "Müller", "Ｄｏｅ", "山田",
         "Ærø", "ı", "ß", "山田太郎", "Straße", ".125", "0.125", "CT", "HEAD", "1.5", ".5",
         "12E-44", "+7", "0005", "CLEANED"]
NEUTRAL = ["CHEST", "PA", "AXIAL", "Brain", "T1", "contrast", "LEFT", "1.25", "ROUTINE",
           "SERIES", "ORIGINAL", "PRIMARY", "3", "mm", "ISO_IR 100"]
SEPARATORS = [" ", "^", "\\", "-", ".", "_", "=", "", ",", "\x0e", "\x0f", "\x1b$B", "\x00",
              "\t"]
CONTROLS = [b"\x1b(B", b"\x1b$B", b"\x1b(J", b"\x0e", b"\x0f", b"\x1b-A", b"\x1b"]
CHARSETS = ["", "ISO_IR 100", "ISO_IR 192", "ISO_IR 13", "GB18030", "ISO_IR 148",
            "ISO 2022 IR 6\\ISO 2022 IR 87", "\\ISO 2022 IR 87", "ISO 2022 IR 87",
            "ISO 2022 IR 100", "ISO_IR 144", "utf_7", "utf_16_le"]
"""DICOM's terms, and two Python codec names, which pydicom takes too (and reads ASCII bytes
with as something else: utf_7's "+AEQATwBF-" is "DOE")."""
TEXT_TAGS = [  # (tag, VR): public text elements of every text VR
    (0x00080050, "SH"), (0x00081030, "LO"), (0x0008103E, "LO"), (0x00080080, "LO"),
    (0x00080081, "ST"), (0x00081040, "LO"), (0x00080090, "PN"), (0x00081070, "PN"),
    (0x00100010, "PN"), (0x00100020, "LO"), (0x00104000, "LT"), (0x00081010, "SH"),
    (0x00080060, "CS"), (0x00080064, "CS"), (0x00180015, "CS"), (0x00200011, "IS"),
    (0x00200013, "IS"), (0x00280030, "DS"), (0x00180050, "DS"), (0x00080020, "DA"),
    (0x00080030, "TM"), (0x0008002A, "DT"), (0x00101010, "AS"), (0x00080055, "AE"),
    (0x00081190, "UR"), (0x0040A160, "UT"), (0x00080119, "UC"),
    (0x0020000D, "UI"), (0x00080018, "UI"), (0x00321060, "LO"),
]
NUMBER_TAGS = [(0x00280010, "US"), (0x00280100, "US"), (0x00189345, "FD"),
               (0x00186020, "SL"), (0x00280106, "SS"), (0x00181150, "IS"), (0x00209057, "UL"),
               (0x00189306, "FD"), (0x00720064, "IS"), (0x00180088, "DS"), (0x00189327, "FD")]
BINARY_TAGS = [(0x00420011, "OB"), (0x00660023, "OW"), (0x00640009, "OF")]
SEQUENCE_TAGS = [0x00081110, 0x00081140, 0x00400275, 0x00081032]
PRIVATE_GROUP = 0x0011


def _text(rng: random.Random) -> str:
    words = [rng.choice(WORDS if rng.random() < 0.15 else NEUTRAL)
             for _ in range(rng.randint(1, 4))]
    out = words[0]
    for word in words[1:]:
        out += rng.choice(SEPARATORS) + word
    return out + "^" if rng.random() < 0.1 else out


def _encode(text: str, charset: str, rng: random.Random) -> bytes:
    python = {"": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf-8",
              "ISO_IR 13": "shift_jis", "GB18030": "gb18030", "ISO_IR 148": "iso8859_9",
              "ISO_IR 144": "iso8859_5", "utf_7": "utf_7",
              "utf_16_le": "utf_16_le"}.get(charset, "iso2022_jp")
    data = text.encode(python, errors="replace" if rng.random() < 0.5 else "ignore")
    if rng.random() < 0.15:  # an escape sequence or shift that a decoder acts on, in the bytes
        at = rng.randrange(len(data) + 1)
        data = data[:at] + rng.choice(CONTROLS) + data[at:]
    return data + b" " if len(data) % 2 else data


_LONG_VRS = {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR"}


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    """One element as it stands in a file (little endian), written here, not by pydicom (which
    would refuse the hostile values this test needs)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def _sequence(tag: int, items: list[bytes], implicit: bool) -> bytes:
    body = b"".join(b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item + b"\xfe\xff\x0d\xe0\0\0\0\0"
                    for item in items) + b"\xfe\xff\xdd\xe0\0\0\0\0"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    return head + (b"" if implicit else b"SQ\0\0") + b"\xff\xff\xff\xff" + body


def _data_set(rng: random.Random, charset: str, implicit: bool, depth: int) -> bytes:
    elements: dict[int, bytes] = {}

    def put(tag: int, vr: str, value: bytes) -> None:
        elements[tag] = _element(tag, vr, value, implicit)

    for tag, vr in rng.sample(TEXT_TAGS, rng.randint(4, len(TEXT_TAGS))):
        put(tag, vr, _encode(_text(rng), charset, rng))
    for tag, vr in rng.sample(NUMBER_TAGS, rng.randint(1, len(NUMBER_TAGS))):
        size = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FD": 8}.get(vr, 2)
        length = rng.choice([0, 3, 6, 8, 16]) if rng.random() < 0.04 else size
        value = bytes(rng.randrange(256) for _ in range(length))
        put(tag, vr, _encode(_text(rng), "", rng) if vr in ("IS", "DS") else value)
    if rng.random() < 0.5:
        tag, vr = rng.choice(BINARY_TAGS)
        blob = _encode(_text(rng), charset, rng) + bytes(rng.randrange(256) for _ in range(6))
        put(tag, vr, blob + (b"\0" if len(blob) % 2 else b""))
    if rng.random() < 0.6:  # a private block: creator, a text and an unknown element
        creator = (PRIVATE_GROUP << 16) | 0x0010
        put(creator, "LO", b"SOME VENDOR 1.0 ")
        put(creator + 0x1000, "LO", _encode(_text(rng), charset, rng))
        put(creator + 0x1001, "UN", _encode(_text(rng), charset, rng))
    if depth < 2:
        for tag in rng.sample(SEQUENCE_TAGS, rng.randint(0, 2)):
            elements[tag] = _sequence(tag, [_data_set(rng, charset, implicit, depth + 1)
                                            for _ in range(rng.randint(1, 2))], implicit)
    if depth == 0 and rng.random() < 0.3:  # Pixel Data: never read as text by the scan
        put(0x00280100, "US", struct.pack("<H", 16))
        put(0x7FE00010, "OW", _encode(_text(rng), "", rng) + struct.pack("<4H", 1, 2, 3, 9))
    return b"".join(elements[tag] for tag in sorted(elements))


def _source(rng: random.Random) -> Identifiers:
    src = Dataset()
    src.PatientName = f"{rng.choice(WORDS)}^{rng.choice(WORDS)}"
    src.PatientID = rng.choice(WORDS)
    src.AccessionNumber = rng.choice(WORDS)[:16]
    src.InstitutionName = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
    src.StudyInstanceUID = "1.2.826.0.1.3680043.2.1143.77"
    src.ReferringPhysicianName = rng.choice(WORDS)
    return Identifiers.collect(src, ["PatientName", "PatientID", "AccessionNumber",
                                     "InstitutionName", "ReferringPhysicianName"],
                               ["StudyInstanceUID"])


def _file(body: bytes, implicit: bool) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.3.4.5"
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + body


def _encoded(rng: random.Random) -> bytes:
    implicit = rng.random() < 0.4
    charset = rng.choice(CHARSETS)
    body = _data_set(rng, charset, implicit, 0)
    if charset:
        body = _element(0x00080005, "CS", _encode(charset, "", rng), implicit) + body
    return _file(body, implicit)


def _outcome(identifiers: Identifiers, encoded: bytes, as_read: bool) -> tuple[str, object]:
    try:
        return "leaks", sorted(identifiers.leaks(dcmread(BytesIO(encoded)), as_read=as_read))
    except Exception as exc:  # noqa: BLE001 - the same error, whatever pydicom raises
        return "error", f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("seed", range(4))
def test_unconverted_scan_answers_what_the_full_walk_answers(seed: int) -> None:
    rng = random.Random(seed)
    kinds = {"leaks": 0, "clean": 0, "error": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the hostile values, as it should
        for _ in range(300):
            identifiers = _source(rng)
            encoded = _encoded(rng)
            full = _outcome(identifiers, encoded, as_read=False)
            fast = _outcome(identifiers, encoded, as_read=True)
            assert fast == full, encoded
            kinds["clean" if full == ("leaks", []) else full[0]] += 1
    # both answers and the errors are exercised, not one of them only
    assert kinds["leaks"] >= 50 and kinds["clean"] >= 20 and kinds["error"] >= 5, kinds


def test_a_leak_in_plain_text_is_still_found() -> None:
    """The fast path's one assumption turned around: a plain ASCII value holding an identifier
    is converted and matched (a skip that ignored the identifiers would miss it)."""
    src = Dataset()
    src.PatientName = "Doe^Jane"
    src.PatientID = "MRN123456"
    identifiers = Identifiers.collect(src, ["PatientName", "PatientID"], [])
    for value, expected in [(b"seen by jane doe ", ["PatientName"]),
                            (b"ref mrn123456", ["PatientID"]), (b"CHEST PA", [])]:
        encoded = _file(_element(0x00081030, "LO", value, False), False)
        assert _outcome(identifiers, encoded, as_read=True) == ("leaks", expected)


def test_text_is_read_where_the_character_set_reads_ascii_as_something_else() -> None:
    """Under a codec outside DICOM's (pydicom takes any Python codec name), plain ASCII bytes
    may spell an identifier they do not hold: the scan converts them."""
    src = Dataset()
    src.PatientName = "Doe^John"
    identifiers = Identifiers.collect(src, ["PatientName"], [])
    body = (_element(0x00080005, "CS", b"utf_7 ", False)
            + _element(0x00080070, "LO", b"+AEQATwBF-", False))
    encoded = _file(body, False)
    assert _outcome(identifiers, encoded, as_read=False) == ("leaks", ["PatientName"])
    assert _outcome(identifiers, encoded, as_read=True) == ("leaks", ["PatientName"])


def test_the_fast_scan_leaves_plain_elements_unconverted() -> None:
    """What makes it fast (an implementation that converted everything would pass the others)."""
    src = Dataset()
    src.PatientName = "Doe^Jane"
    identifiers = Identifiers.collect(src, ["PatientName"], [])
    body = b"".join(_element(tag, vr, value, False) for tag, vr, value in [
        (0x00080060, "CS", b"CT"), (0x00081030, "LO", b"CHEST PA"),
        (0x00280010, "US", b"\x00\x02"), (0x00280030, "DS", b"0.5\\0.5 ")])
    ds = dcmread(BytesIO(_file(body, False)))
    assert identifiers.leaks(ds, as_read=True) == set()
    assert all(isinstance(e, RawDataElement) for e in ds.elements())
    assert identifiers.leaks(ds) == set()  # the full walk converts them all
    assert not any(isinstance(e, RawDataElement) for e in ds.elements())
