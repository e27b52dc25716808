"""Identifying values in text: the leak scan after encoding (whole values and whole tokens,
never a substring inside a token) and Clean Descriptors (identifying parts out, the rest kept).

Privacy is checked here by scanning the output bytes with regular expressions of the test's
own, not through :mod:`node.deid.identifiers`."""

from __future__ import annotations

import re
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.config import DeidOption, DeidOutput, DeidSettings, OutputSettings
from node.deid import Deidentifier, Quarantined
from node.deid.batch import deidentify_to_bytes

KEY = "text-key-Pd5Wq1Zr8Ln3Xv7Jb0Ks4Hm9Gt2Fy6Ce"


def engine(*options: DeidOption) -> Deidentifier:
    return Deidentifier(DeidSettings(key=KEY, options=list(options)), OutputSettings())


def sample(name: str) -> Dataset:
    return dcmread(get_testdata_file(name))


def has_token(data: bytes, word: str) -> bool:
    """``word`` in ``data`` as a token of its own: not inside a run of letters, digits, or
    ``._-`` joining them (the test's own scan)."""
    pattern = rb"(?<![A-Za-z0-9])(?<![A-Za-z0-9][._-])" + re.escape(word.encode()) + (
        rb"(?![A-Za-z0-9])(?![._-][A-Za-z0-9])")
    return re.search(pattern, data, re.IGNORECASE) is not None


def unscanned(deid: Deidentifier, ds: Dataset) -> bytes:
    """The output's bytes as they would be written without the leak scan."""
    buffer = BytesIO()
    deid.deidentify(ds).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- the leak scan ---------------------------------------------------------------------------


def test_institution_inside_the_manufacturer_token_is_not_a_leak() -> None:
    """MR_small: Institution Name TOSHIBA, Manufacturer TOSHIBA_MEC (kept: not in Table
    E.1-1). The institution is removed; the manufacturer is not the institution."""
    source = sample("MR_small.dcm")
    assert (source.InstitutionName, source.Manufacturer) == ("TOSHIBA", "TOSHIBA_MEC")
    output, data = deidentify_to_bytes(engine(), source, DeidOutput.SOURCE)
    assert output.Manufacturer == "TOSHIBA_MEC"
    assert b"TOSHIBA_MEC" in data and not has_token(data, "TOSHIBA")
    assert dcmread(BytesIO(data)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"


def test_a_value_inside_a_longer_token_is_not_a_leak() -> None:
    """Patient ID 4MR1 inside the token 4MR10 of a kept text is another value."""
    source = sample("MR_small.dcm")
    source.WindowCenterWidthExplanation = "4MR10 soft tissue"
    _, data = deidentify_to_bytes(engine(), source, DeidOutput.SOURCE)
    assert b"4MR10" in data and not has_token(data, "4MR1")


# Attributes the profile keeps on purpose, each holding one planted identifier: Window Center &
# Width Explanation and Manufacturer's Model Name are not rows of Table E.1-1 (kept); Station
# Name and Device Serial Number are kept by Retain Device Identity; Scan Options is kept (CS).
PLANTED = [
    ("WindowCenterWidthExplanation", "BRAIN WINDOW Nakamura", "PatientName", ()),
    ("WindowCenterWidthExplanation", "nakamura hiro", "PatientName", ()),
    ("ManufacturerModelName", "MRT 200 MRN-5566778", "PatientID", ()),
    ("StationName", "MRN-5566778", "PatientID",
     (DeidOption.RETAIN_DEVICE_IDENTITY,)),
    ("DeviceSerialNumber", "A99123-X", "AccessionNumber",
     (DeidOption.RETAIN_DEVICE_IDENTITY,)),
    ("ScanOptions", "19610407", "PatientBirthDate", ()),
    ("ManufacturerModelName", "JFK IMAGING CENTER MR", "InstitutionName", ()),
]


@pytest.mark.parametrize(("keyword", "value", "leaked", "options"), PLANTED,
                         ids=[f"{k}-{x}" for k, _, x, _ in PLANTED])
def test_a_planted_identifier_in_a_kept_attribute_is_quarantined(
    keyword: str, value: str, leaked: str, options: tuple[DeidOption, ...]
) -> None:
    source = sample("MR_small.dcm")
    source.PatientName = "Nakamura^Hiroshi"
    source.PatientID = "MRN-5566778"
    source.AccessionNumber = "A99123-X"
    source.PatientBirthDate = "19610407"
    source.InstitutionName = "JFK Imaging Center"
    setattr(source, keyword, value)
    deid = engine(*options)
    # Without the scan the value would be written: the profile keeps this attribute.
    assert value.encode() in unscanned(deid, source.copy())
    with pytest.raises(Quarantined, match=f"original values of .*{leaked}") as caught:
        deidentify_to_bytes(deid, source, DeidOutput.SOURCE)
    message = str(caught.value)
    assert not [w for w in ("Nakamura", "MRN-5566778", "A99123", "19610407", "JFK")
                if w.lower() in message.lower()]


def test_a_name_in_a_nested_kept_item_is_quarantined() -> None:
    """Inside a sequence: a Code Meaning (kept) naming a person of the source header."""
    source = sample("CT_small.dcm")
    source.ReferringPhysicianName = "Okonkwo^Chidi"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "T-D3000", "SRT"
    item.CodeMeaning = "Chest for Dr Okonkwo"
    source.AnatomicRegionSequence = [item]
    deid = engine()
    assert has_token(unscanned(deid, source.copy()), "Okonkwo")
    with pytest.raises(Quarantined, match="ReferringPhysicianName"):
        deidentify_to_bytes(deid, source, DeidOutput.SOURCE)


def test_an_original_uid_in_a_kept_binary_value_is_quarantined() -> None:
    """A private OB value kept by Retain Safe Private (allowlisted) holding the original Study
    UID, read as text."""
    source = sample("CT_small.dcm")
    uid = str(source.StudyInstanceUID)
    source.private_block(0x0009, "ACME 1.0", create=True).add_new(
        0x10, "OB", b"\x01\x02" + uid.encode() + b"\0")
    deid = Deidentifier(DeidSettings(key=KEY, options=[DeidOption.RETAIN_SAFE_PRIVATE],
                                     safe_private=["ACME 1.0:0009,10"]), OutputSettings())
    assert uid.encode() in unscanned(deid, source.copy())
    with pytest.raises(Quarantined, match="StudyInstanceUID"):
        deidentify_to_bytes(deid, source, DeidOutput.SOURCE)


# -- Clean Descriptors -----------------------------------------------------------------------


def test_descriptors_lose_identifying_parts_and_keep_the_rest() -> None:
    source = sample("MR_small.dcm")
    source.PatientName = "Doe^John"
    source.PatientID = "MRN-0042"
    source.AccessionNumber = "ACC77123"
    item = Dataset()
    item.VerifyingObserverName = "Kowalski^Anna"  # a person named only inside a sequence
    source.VerifyingObserverSequence = [item]
    source.SeriesDescription = "AX T2 FSE JOHN DOE"
    source.StudyDescription = "MRI BRAIN MRN-0042 ACC77123 read by Kowalski"
    source.ProtocolName = "T1W_MPRAGE 2021-03-04 12:34"
    source.ImageComments = ("Scanned 03/04/2021, 04.03.2021, 4-Mar-2021, March 4, 2021 "
                            "at 12:34:56; call 555-867-5309 or (555) 867 5309, ref 20210304")
    source.AcquisitionComments = "DWI b1000, Ax T1 +C 3mm, CT CHEST W/O 5.0 MM"
    source.StudyComments = "John Doe"
    output, data = deidentify_to_bytes(
        engine(DeidOption.CLEAN_DESCRIPTORS), source, DeidOutput.SOURCE)
    written = dcmread(BytesIO(data))
    assert written.SeriesDescription == "AX T2 FSE"
    assert written.StudyDescription == "MRI BRAIN read by"
    assert written.ProtocolName == "T1W_MPRAGE"
    assert written.ImageComments == "Scanned, at; call or, ref"
    assert written.AcquisitionComments == "DWI b1000, Ax T1 +C 3mm, CT CHEST W/O 5.0 MM"
    assert "StudyComments" in written and written.StudyComments == ""  # emptied, kept
    for word in ("John", "Doe", "Kowalski", "MRN-0042", "ACC77123"):
        assert not has_token(data, word), word
    for text in (b"03/04/2021", b"04.03.2021", b"4-Mar-2021", b"March 4", b"2021-03-04",
                 b"20210304", b"12:34", b"555-867", b"867 5309"):
        assert text not in data, text


def test_without_the_option_descriptors_follow_the_basic_profile() -> None:
    source = sample("CT_small.dcm")
    source.SeriesDescription = "CT CHEST W/O 5.0 MM"
    source.StudyDescription = "CHEST"
    _, data = deidentify_to_bytes(engine(), source, DeidOutput.SOURCE)
    written = dcmread(BytesIO(data))
    assert b"CT CHEST W/O" not in data  # Series Description: X in the Basic Profile
    assert "SeriesDescription" not in written
