"""Studies with planted identifying values, for de-identification tests.

Every identifying value is a distinct token, ``PHI-<code>-<8 hex digits>`` (at most 16 characters,
so it fits SH and AE), derived from the seed: a test de-identifies the files and byte-scans the
output for every :class:`Planted` value; any hit is a leak. The original UIDs are planted too (the
profile replaces them). Dates (DA, DT) are listed apart in ``dates``: a date shift changes them,
removal drops them, and the Retain Longitudinal Temporal Information options keep them.

The images are the pydicom test samples (CT, MR, US) with their pixel data intact: new UIDs
consistent within the study, one series per sample, and references between series (Referenced
Image Sequence, Source Image Sequence) so that ``dcentvfy`` has something to check. The same
arguments give byte-identical files.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SAMPLES = ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm")
"""One series per sample, in turn; CT_small and MR_small carry a Frame of Reference."""

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
DETACHED_PATIENT = "1.2.840.10008.3.1.2.1.1"
"""Referenced SOP Class in Referenced Patient Sequence (retired, still what modalities send)."""
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"
"""Referenced SOP Class in Referenced Study Sequence."""

CREATOR_ACME = "ACME PHI 1.0"
CREATOR_CSA = "SIEMENS CSA HEADER"
CREATOR_ITEM = "ACME PHI ITEM 1.0"

OUTSIDE_TABLE_E1_1 = ("ProcedureCodeSequence[0].CodeMeaning",)
"""Fragments of ``Planted.where`` for places no row of PS3.15 Table E.1-1 names: Procedure Code
Sequence is not listed (so the Basic Profile keeps it), yet a local code's meaning may identify
(PS3.15 E.1.1 on "C" for code sequences). Only an engine that cleans code meanings removes these.
Overlay Description and Label are not rows either, but PS3.15 E.3.3 has the Profile remove
overlays, so they are not here."""


@dataclass(frozen=True)
class Planted:
    """One identifying value planted in the corpus."""

    value: str
    """The planted string: unique, >= 8 ASCII characters."""
    where: str
    """Where it was planted, for people: "PatientName family", "UID StudyInstanceUID", ..."""


@dataclass
class PlantedStudy:
    """Files written and every identifying value planted in them."""

    files: list[Path]
    """Part 10 files, Explicit VR Little Endian."""
    planted: list[Planted]
    """Every value that must not survive de-identification (each in some file's bytes)."""
    dates: list[str]
    """Every planted DA value (YYYYMMDD) and DT value (YYYYMMDDHHMMSS.ffffff), each once."""
    study_uid: str
    patient_id: str
    times: list[str] = field(default_factory=list)
    """Every planted TM value (HHMMSS), each once; too short to byte-scan reliably."""


class _Planter:
    """Makes the tokens, UIDs, dates and times of one corpus and records them."""

    def __init__(self, seed: int, salt: str) -> None:
        self.seed = seed
        self.salt = salt
        self.planted: list[Planted] = []
        self.dates: list[str] = []
        self.times: list[str] = []
        self._values: set[str] = set()
        self.rng = random.Random(f"synthnode phi corpus|{salt}|{seed}")

    def _record(self, value: str, where: str) -> str:
        if len(value) < 8 or not value.isascii():
            raise ValueError(f'Planted value "{value}" ({where}) is not >= 8 ASCII characters')
        if value in self._values:
            raise ValueError(f'Planted value "{value}" ({where}) is planted twice')
        self._values.add(value)
        self.planted.append(Planted(value, where))
        return value

    def given(self, value: str, where: str) -> str:
        """Plants a value chosen by the caller."""
        return self._record(value, where)

    def token(self, code: str, where: str) -> str:
        """A new token ``PHI-<code>-<8 hex>``; ``code`` is 1 to 3 capitals or digits."""
        if not (1 <= len(code) <= 3 and code.isalnum() and code.upper() == code):
            raise ValueError(f'Token code "{code}" is not 1 to 3 capitals or digits')
        n = len(self.planted)
        while True:
            text = f"{self.salt}|{self.seed}|{code}|{n}"
            value = f"PHI-{code}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
            if value not in self._values:
                return self._record(value, where)
            n += 1

    def number(self, where: str) -> str:
        """A new phone number ``555-ddd-dddd``: what descriptors get. Clean Descriptors keeps a
        descriptor's text but for the identifiers, dates, times and numbers in it (PS3.15
        E.3.5, "values of similar meaning"), so a random token there would rightly stay."""
        n = len(self.planted)
        while True:
            text = f"{self.salt}|{self.seed}|number|{n}"
            digits = int(hashlib.sha256(text.encode()).hexdigest(), 16)
            value = f"555-{digits % 900 + 100}-{digits // 1000 % 10000:04d}"
            if value not in self._values:
                return self._record(value, where)
            n += 1

    def uid(self, where: str) -> str:
        """A new UID under pydicom's root, determined by the seed and ``where``."""
        # With prefix=None generate_uid ignores entropy_srcs (random UUID): keep the prefix.
        value = generate_uid(
            entropy_srcs=["synthnode phi corpus", self.salt, str(self.seed), where]
        )
        return self._record(value, f"UID {where}")

    def date(self, value: str) -> str:
        if value not in self.dates:
            self.dates.append(value)
        return value

    def time(self, value: str) -> str:
        if value not in self.times:
            self.times.append(value)
        return value

    def random_date(self, first_year: int, last_year: int) -> datetime.date:
        first = datetime.date(first_year, 1, 1).toordinal()
        last = datetime.date(last_year, 12, 31).toordinal()
        return datetime.date.fromordinal(self.rng.randint(first, last))

    def random_time(self, first_hour: int = 7, last_hour: int = 18) -> str:
        h = self.rng.randint(first_hour, last_hour)
        return self.time(f"{h:02d}{self.rng.randint(0, 59):02d}{self.rng.randint(0, 59):02d}")


def _da(day: datetime.date) -> str:
    return day.strftime("%Y%m%d")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _check_person(kind: str, value: str) -> None:
    if not value or not value.isascii():
        raise ValueError(f'{kind} "{value}" is not a non-empty ASCII string')


# -- Patient module and the Patient Identification/Demographic attributes -----------------------


def _patient(
    p: _Planter, patient_id: str | None, patient_name: str | None, detached_refs: bool
) -> Dataset:
    ds = Dataset()
    if patient_name is None:
        patient_name = f"{p.token('PN', 'PatientName family')}^{p.token('PG', 'PatientName given')}"
    else:
        _check_person("patient_name", patient_name)
        parts = [c for c in patient_name.replace("=", "^").split("^") if len(c) >= 8]
        if not parts:
            raise ValueError(f'patient_name "{patient_name}" has no component >= 8 characters')
        for i, part in enumerate(parts):
            p.given(part, f"PatientName component {i}")
    ds.PatientName = patient_name
    if patient_id is None:
        patient_id = p.token("PID", "PatientID")
    else:
        _check_person("patient_id", patient_id)
        p.given(patient_id, "PatientID")
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = p.token("ISS", "IssuerOfPatientID")
    ds.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDs = [p.token("OID", f"OtherPatientIDs[{i}]") for i in range(2)]
    ds.OtherPatientNames = [f"{p.token('ON', 'OtherPatientNames family')}^Alias"]
    items = []
    for i in range(2):
        item = Dataset()
        item.PatientID = p.token("OPI", f"OtherPatientIDsSequence[{i}].PatientID")
        item.IssuerOfPatientID = p.token("OPS", f"OtherPatientIDsSequence[{i}].IssuerOfPatientID")
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    ds.OtherPatientIDsSequence = Sequence(items)
    ds.PatientBirthDate = p.date(_da(p.random_date(1940, 1990)))
    ds.PatientBirthTime = p.random_time(0, 23)
    ds.PatientSex = "O"
    ds.PatientBirthName = f"{p.token('PBN', 'PatientBirthName family')}^Maiden"
    ds.PatientMotherBirthName = f"{p.token('PMN', 'PatientMotherBirthName family')}^Mother"
    ds.PatientAddress = p.token("ADR", "PatientAddress") + " Main Street, Springfield"
    ds.PatientTelephoneNumbers = [p.token("TEL", "PatientTelephoneNumbers")]
    ds.MilitaryRank = p.token("MR", "MilitaryRank")
    ds.BranchOfService = p.token("BOS", "BranchOfService")
    ds.MedicalRecordLocator = p.token("MRL", "MedicalRecordLocator")
    ds.CountryOfResidence = p.token("COR", "CountryOfResidence")
    ds.RegionOfResidence = p.token("ROR", "RegionOfResidence")
    ds.EthnicGroup = p.token("ETH", "EthnicGroup")
    ds.Occupation = p.number("Occupation")
    ds.PatientReligiousPreference = p.token("REL", "PatientReligiousPreference")
    ds.ResponsiblePerson = f"{p.token('RP', 'ResponsiblePerson family')}^Guardian"
    ds.ResponsiblePersonRole = "PARENT"
    ds.ResponsibleOrganization = p.token("RO", "ResponsibleOrganization")
    ds.AdditionalPatientHistory = f"Seen in 2012, call {p.number('AdditionalPatientHistory')}"
    ds.PatientComments = f"Prefers to be called at {p.number('PatientComments')}"
    if detached_refs:
        uid = p.uid("ReferencedPatientSequence[0].ReferencedSOPInstanceUID")
        ds.ReferencedPatientSequence = Sequence([_ref(DETACHED_PATIENT, uid)])
    return ds


# -- General Study module, Imaging Service Request, Visit ---------------------------------------


def _study(p: _Planter, study_uid: str, day: datetime.date, birth: str, family: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    # Patient Study module: the same in every instance, as dcentvfy wants.
    born = datetime.datetime.strptime(birth, "%Y%m%d").date()
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    ds.PatientAge = f"{years:03d}Y"
    ds.PatientSize = "1.72"
    ds.PatientWeight = "68"
    ds.StudyDate = p.date(_da(day))
    ds.StudyTime = p.random_time()
    ds.AccessionNumber = p.token("ACC", "AccessionNumber")
    ds.StudyID = p.token("SID", "StudyID")
    # Descriptors hold what people type there: the patient's name, a date, a phone number.
    said = p.given(day.strftime("%d-%b-%Y"), "StudyDescription date")
    ds.StudyDescription = f"CT chest {family} {said} {p.number('StudyDescription')}"
    ds.ReferringPhysicianName = f"{p.token('REF', 'ReferringPhysicianName family')}^Rex"
    ds.ReferringPhysicianAddress = p.token("RPA", "ReferringPhysicianAddress") + " Hill Road"
    ds.ReferringPhysicianTelephoneNumbers = [p.token("RPT", "ReferringPhysicianTelephoneNumbers")]
    ds.PhysiciansOfRecord = [f"{p.token('POR', 'PhysiciansOfRecord family')}^Ada"]
    ds.NameOfPhysiciansReadingStudy = [
        f"{p.token('RDR', 'NameOfPhysiciansReadingStudy family')}^Bo"
    ]
    ds.AdmissionID = p.token("ADM", "AdmissionID")
    ds.RequestingPhysician = f"{p.token('RQP', 'RequestingPhysician family')}^Cy"
    ds.RequestingService = p.token("RQS", "RequestingService")
    ds.RequestedProcedureDescription = f"CT chest {p.number('RequestedProcedureDescription')}"
    ds.ReasonForTheRequestedProcedure = f"Cough, {p.number('ReasonForTheRequestedProcedure')}"
    ds.StudyComments = f"Called {p.number('StudyComments')} about results"
    proc = _code(
        "CTCHEST",
        "99ACME",
        f"CT chest for {p.token('PCM', 'ProcedureCodeSequence[0].CodeMeaning')}",
    )
    ds.ProcedureCodeSequence = Sequence([proc])
    return ds


def _request_attributes(
    p: _Planter, study_uid: str, accession: str, detached_refs: bool
) -> Sequence:
    item = Dataset()
    item.AccessionNumber = accession
    item.RequestedProcedureID = p.token("RPI", "RequestAttributesSequence[0].RequestedProcedureID")
    item.ScheduledProcedureStepID = p.token(
        "SPS", "RequestAttributesSequence[0].ScheduledProcedureStepID"
    )
    item.ScheduledProcedureStepDescription = p.number(
        "RequestAttributesSequence[0].ScheduledProcedureStepDescription"
    )
    if detached_refs:
        item.ReferencedStudySequence = Sequence([_ref(DETACHED_STUDY, study_uid)])
    block = item.private_block(0x0011, CREATOR_ITEM, create=True)
    block.add_new(
        0x01, "LO", p.token("PRQ", f"private {CREATOR_ITEM} in RequestAttributesSequence[0]")
    )
    return Sequence([item])


# -- Series, equipment, performed procedure step ------------------------------------------------


def _series(p: _Planter, s: int, day: datetime.date) -> Dataset:
    ds = Dataset()
    at = f"series {s} "
    ds.SeriesDate = p.date(_da(day))
    ds.SeriesTime = p.random_time()
    ds.SeriesNumber = s + 1
    ds.SeriesDescription = f"Axial {p.number(at + 'SeriesDescription')}"
    ds.ProtocolName = f"Protocol {p.number(at + 'ProtocolName')}"
    ds.PerformingPhysicianName = [f"{p.token('PPN', at + 'PerformingPhysicianName family')}^Di"]
    ds.OperatorsName = [
        f"{p.token('OPN', at + f'OperatorsName[{i}] family')}^Op{i}" for i in range(2)
    ]
    ds.PerformedProcedureStepID = p.token("PPI", at + "PerformedProcedureStepID")
    ds.PerformedProcedureStepStartDate = p.date(_da(day))
    ds.PerformedProcedureStepStartTime = p.random_time()
    ds.PerformedProcedureStepDescription = p.number(at + "PerformedProcedureStepDescription")
    ds.PerformedStationAETitle = p.token("AE", at + "PerformedStationAETitle")
    ds.PerformedStationName = p.token("PSN", at + "PerformedStationName")
    ds.PerformedLocation = p.token("PL", at + "PerformedLocation")
    # General Equipment module
    ds.InstitutionName = f"{p.token('INS', at + 'InstitutionName')} Hospital"
    ds.InstitutionAddress = f"{p.token('IAD', at + 'InstitutionAddress')} Harbour Road"
    ds.InstitutionalDepartmentName = p.token("DEP", at + "InstitutionalDepartmentName")
    ds.StationName = p.token("STN", at + "StationName")
    ds.DeviceSerialNumber = p.token("DSN", at + "DeviceSerialNumber")
    ds.DeviceUID = p.uid(at + "DeviceUID")
    # Acquisition Context (X in the Basic Profile) with a TEXT item
    ctx = Dataset()
    ctx.ValueType = "TEXT"
    ctx.ConceptNameCodeSequence = Sequence([_code("121106", "DCM", "Comment")])
    ctx.TextValue = f"Acquired for {p.token('ACX', at + 'AcquisitionContextSequence TextValue')}"
    ds.AcquisitionContextSequence = Sequence([ctx])
    return ds


# -- Private blocks, overlays, curves -----------------------------------------------------------


def _csa2(tags: Iterable[tuple[str, str, str]]) -> bytes:
    """A Siemens CSA2 ("SV10") header with one string item per tag."""
    tags = list(tags)
    out = bytearray(b"SV10\x04\x03\x02\x01")
    out += struct.pack("<II", len(tags), 77)
    for name, vr, value in tags:
        out += struct.pack("<64si4siii", name.encode(), 1, vr.encode(), 0, 1, 77)
        data = value.encode() + b"\0"
        out += struct.pack("<4i", len(data), len(data), 77, len(data))
        out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def _private(p: _Planter, ds: Dataset, at: str) -> None:
    acme = ds.private_block(0x0009, CREATOR_ACME, create=True)
    where = f"{at}private ({acme.group:04X},{acme.block_start >> 8:02X}xx) creator {CREATOR_ACME}"
    acme.add_new(0x01, "LO", p.token("PLO", f"{where} LO"))
    acme.add_new(0x02, "LT", f"Note: call {p.token('PLT', f'{where} LT')} after scan")
    un = f"id={p.token('PUN', f'{where} UN')};".encode()
    acme.add_new(0x03, "UN", un + b"\0" * (len(un) % 2))
    acme.add_new(0x04, "PN", f"{p.token('PPN', f'{where} PN family')}^Tech")
    item = Dataset()
    inner = item.private_block(0x0009, CREATOR_ACME, create=True)
    inner.add_new(0x01, "LO", p.token("PSQ", f"{where} SQ item LO"))
    acme.add_new(0x05, "SQ", Sequence([item]))

    csa = ds.private_block(0x0029, CREATOR_CSA, create=True)
    where = f"{at}private ({csa.group:04X},{csa.block_start >> 8:02X}xx) creator {CREATOR_CSA}"
    csa.add_new(0x08, "CS", "IMAGE NUM 4")
    csa.add_new(0x09, "LO", "20050723")
    header = _csa2(
        [
            ("ImaCoilString", "LO", "C:BO1"),
            ("PatientComment", "LT", f"Patient {p.token('CSA', f'{where} CSA2 image header')}"),
        ]
    )
    csa.add_new(0x10, "OB", header)
    series = _csa2([("OperatorName", "PN", p.token("CSS", f"{where} CSA2 series header"))])
    csa.add_new(0x20, "OB", series)

    # A private element in a public sequence item that no profile row removes.
    region = _code("T-D3000", "SRT", "Chest")
    block = region.private_block(0x0011, CREATOR_ITEM, create=True)
    block.add_new(
        0x01, "LO", p.token("PAR", f"{at}private {CREATOR_ITEM} in AnatomicRegionSequence[0]")
    )
    ds.AnatomicRegionSequence = Sequence([region])


def _overlay(p: _Planter, ds: Dataset, at: str) -> None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = np.zeros((rows, cols), dtype=np.uint8)
    bits[rows // 4 : rows // 2, cols // 4] = 1
    bits[rows // 4, cols // 4 : cols // 2] = 1
    data = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(
        0x60000022, "LO", f"Marked by {p.token('OVD', at + 'overlay (6000) OverlayDescription')}"
    )
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60001500, "LO", p.token("OVL", at + "overlay (6000) OverlayLabel"))
    ds.add_new(0x60003000, "OW", data + b"\0" * (len(data) % 2))
    ds.add_new(
        0x60004000, "LT", f"Drawn by {p.token('OVC', at + 'overlay (6000) OverlayComments')}"
    )


def _curve(p: _Planter, ds: Dataset, at: str) -> None:
    points = np.array([[0, 10], [1, 12], [2, 9], [3, 15]], dtype="<u2")
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50000010, "US", len(points))
    ds.add_new(0x50000020, "CS", "TAC")
    ds.add_new(0x50000022, "LO", f"Curve of {p.token('CVD', at + 'curve (5000) CurveDescription')}")
    ds.add_new(0x50000030, "SH", ["S", "HU"])
    ds.add_new(0x50000103, "US", 0)
    ds.add_new(0x50002500, "LO", p.token("CVL", at + "curve (5000) CurveLabel"))
    ds.add_new(0x50003000, "OW", points.tobytes())


# -- Writing ------------------------------------------------------------------------------------


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _merge(target: Dataset, source: Dataset) -> None:
    for elem in source:
        target.add(elem)


def make_planted_study(
    folder: Path,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    n_series: int = 2,
    per_series: int = 3,
    seed: int = 0,
    detached_refs: bool = True,
) -> PlantedStudy:
    """Writes one study of ``n_series`` series of ``per_series`` images with planted values.

    Series ``s`` is built from ``SAMPLES[s % 3]``; every image of series >= 1 references an image
    of series 0 (Referenced Image Sequence) and of series ``s - 1`` (Source Image Sequence).
    ``patient_id`` and ``patient_name`` default to tokens; given, they are planted as they are
    (``patient_name`` components of >= 8 characters each).

    ``detached_refs`` adds a Referenced Patient Sequence and, in Request Attributes, a
    Referenced Study Sequence (the study's own UID), as modalities send them; dcentvfy reports
    their UIDs as referenced instances missing from the set, so pass False for a study that
    dcentvfy passes without errors.
    """
    if n_series < 1:
        raise ValueError(f'n_series "{n_series}" is not >= 1')
    if per_series < 1:
        raise ValueError(f'per_series "{per_series}" is not >= 1')
    folder = Path(folder)
    p = _Planter(seed, "study")

    # 1. Identities: patient, study, then every UID, so references can point forward.
    patient = _patient(p, patient_id, patient_name, detached_refs)
    study_uid = p.uid("StudyInstanceUID")
    day = p.random_date(2015, 2022)
    study = _study(p, study_uid, day, str(patient.PatientBirthDate),
                   patient.PatientName.family_name)
    request = _request_attributes(p, study_uid, study.AccessionNumber, detached_refs)
    creator_uid = p.uid("InstanceCreatorUID")
    samples = [
        pydicom.dcmread(get_testdata_file(SAMPLES[s % len(SAMPLES)])) for s in range(n_series)
    ]
    series_uids = [p.uid(f"series {s} SeriesInstanceUID") for s in range(n_series)]
    frame_uids = [
        p.uid(f"series {s} FrameOfReferenceUID") if "FrameOfReferenceUID" in samples[s] else None
        for s in range(n_series)
    ]
    sop_uids = [
        [p.uid(f"instance {s}.{i} SOPInstanceUID") for i in range(per_series)]
        for s in range(n_series)
    ]
    classes = [str(sample.SOPClassUID) for sample in samples]

    # 2. The images.
    files: list[Path] = []
    for s in range(n_series):
        series = _series(p, s, day)
        series.RequestAttributesSequence = request
        for i in range(per_series):
            at = f"instance {s}.{i} "
            ds = pydicom.dcmread(get_testdata_file(SAMPLES[s % len(SAMPLES)]))
            for tag in (0xFFFCFFFC, 0x00101002):  # trailing padding; the sample's other IDs
                if tag in ds:
                    del ds[tag]
            if "Laterality" in ds and not ds.Laterality:
                del ds.Laterality  # Type 2C, empty in CT_small and MR_small: dciodvfy errs
            for source in (patient, study, series):
                _merge(ds, source)
            ds.SOPInstanceUID = sop_uids[s][i]
            ds.SeriesInstanceUID = series_uids[s]
            if frame_uids[s] is not None:
                ds.FrameOfReferenceUID = frame_uids[s]
            ds.InstanceCreatorUID = creator_uid
            ds.InstanceNumber = i + 1
            ds.InstanceCreationDate = p.date(_da(day + datetime.timedelta(days=1)))
            ds.InstanceCreationTime = p.random_time()
            ds.AcquisitionDate = p.date(_da(day))
            ds.AcquisitionTime = p.random_time()
            ds.AcquisitionDateTime = p.date(f"{ds.AcquisitionDate}{ds.AcquisitionTime}.250000")
            ds.ContentDate = p.date(_da(day))
            ds.ContentTime = p.random_time()
            ds.ImageComments = f"Reviewed, call {p.number(at + 'ImageComments')}"
            ds.AcquisitionComments = f"Patient moved, {p.number(at + 'AcquisitionComments')}"
            ds.DerivationDescription = f"Windowed, {p.number(at + 'DerivationDescription')}"
            ds.ContentCreatorName = f"{p.token('CCN', at + 'ContentCreatorName family')}^Eve"
            if s >= 1:
                first = i % per_series
                ds.ReferencedImageSequence = Sequence([_ref(classes[0], sop_uids[0][first])])
                ds.SourceImageSequence = Sequence([_ref(classes[s - 1], sop_uids[s - 1][first])])
            _private(p, ds, at)
            _overlay(p, ds, at)
            _curve(p, ds, at)
            files.append(_save(ds, folder / f"{s + 1:02d}-{i + 1:03d}.dcm"))
    return PlantedStudy(files, p.planted, p.dates, study_uid, str(patient.PatientID), p.times)


# -- Comprehensive SR ---------------------------------------------------------------------------


_STUDY_KEYWORDS = frozenset(
    {
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "StudyDescription",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "AdmissionID",
        "RequestingPhysician",
        "RequestingService",
        "StudyComments",
        "ProcedureCodeSequence",
        "ReferencedPatientSequence",
    }
)
"""The General Study, Patient Study and Visit attributes an SR copies from the study it joins."""


def _content(relationship: str, value_type: str, concept: Dataset, **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([concept])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def make_planted_sr(
    folder: Path,
    *,
    study: PlantedStudy | None = None,
    patient_id: str | None = None,
    patient_name: str | None = None,
    seed: int = 0,
    detached_refs: bool = True,
) -> PlantedStudy:
    """Writes one Comprehensive SR document with planted text, names, dates and UIDs.

    With ``study``, the SR joins it (its Patient and General Study attributes are copied from
    the study's first file) and references two of its images (IMAGE item, Current Requested
    Procedure Evidence); ``planted`` then also lists the study's values found in the SR's bytes.
    Without, it is a study of its own (``patient_id``, ``patient_name``, ``detached_refs`` as in
    :func:`make_planted_study`).
    """
    folder = Path(folder)
    p = _Planter(seed, "sr")
    ds = Dataset()
    evidence: list[Dataset] = []
    if study is None:
        study_uid = p.uid("StudyInstanceUID")
        day = p.random_date(2015, 2022)
        patient = _patient(p, patient_id, patient_name, detached_refs)
        _merge(ds, patient)
        _merge(ds, _study(p, study_uid, day, str(patient.PatientBirthDate),
                          patient.PatientName.family_name))
    else:
        if patient_id is not None or patient_name is not None:
            raise ValueError("patient_id and patient_name come from the study when one is given")
        first = pydicom.dcmread(study.files[0], stop_before_pixels=True)
        for elem in first:
            if elem.tag.group == 0x0010 or elem.keyword in _STUDY_KEYWORDS:
                ds.add(elem)
        study_uid = str(first.StudyInstanceUID)
        day = datetime.datetime.strptime(str(first.StudyDate), "%Y%m%d").date()
        p.date(str(first.StudyDate))
        p.time(str(first.StudyTime))
        for path in study.files[:2]:
            ref = pydicom.dcmread(path, stop_before_pixels=True)
            evidence.append(ref)
    at = "SR "

    # SR Document Series, General Equipment, SOP Common
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = p.uid("SR SOPInstanceUID")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = p.uid("SR SeriesInstanceUID")
    ds.SeriesNumber = 900
    ds.SeriesDate = p.date(_da(day))
    ds.SeriesTime = p.random_time()
    ds.SeriesDescription = f"Report {p.number(at + 'SeriesDescription')}"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer = "ACME"
    ds.InstitutionName = f"{p.token('INS', at + 'InstitutionName')} Clinic"
    ds.StationName = p.token("STN", at + "StationName")
    ds.InstanceCreationDate = p.date(_da(day + datetime.timedelta(days=2)))
    ds.InstanceCreationTime = p.random_time()
    ds.InstanceCreatorUID = p.uid("SR InstanceCreatorUID")
    ds.SpecificCharacterSet = "ISO_IR 100"

    # SR Document General module
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    ds.ContentDate = p.date(_da(day + datetime.timedelta(days=1)))
    ds.ContentTime = p.random_time()
    verifier = Dataset()
    verifier.VerifyingObserverName = f"{p.token('VON', at + 'VerifyingObserverName family')}^Vic"
    verifier.VerifyingOrganization = p.token("VOR", at + "VerifyingOrganization")
    verifier.VerificationDateTime = p.date(f"{ds.ContentDate}{p.random_time()}")
    observer_id = _code(
        p.token("VOI", at + "VerifyingObserverIdentificationCodeSequence[0].CodeValue"),
        "99ACME",
        "Staff number",
    )
    verifier.VerifyingObserverIdentificationCodeSequence = Sequence([observer_id])
    ds.VerifyingObserverSequence = Sequence([verifier])
    author = Dataset()
    author.ObserverType = "PSN"
    author.PersonName = f"{p.token('AUN', at + 'AuthorObserverSequence[0].PersonName family')}^Al"
    author.PersonIdentificationCodeSequence = Sequence()
    author.InstitutionName = p.token("AUI", at + "AuthorObserverSequence[0].InstitutionName")
    author.InstitutionCodeSequence = Sequence()
    ds.AuthorObserverSequence = Sequence([author])
    request = Dataset()
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = p.token("RAN", at + "ReferencedRequestSequence[0].AccessionNumber")
    request.ReferencedStudySequence = Sequence()
    request.RequestedProcedureDescription = p.number(
        at + "ReferencedRequestSequence[0].RequestedProcedureDescription"
    )
    request.RequestedProcedureCodeSequence = Sequence()
    request.RequestedProcedureID = p.token(
        "RRI", at + "ReferencedRequestSequence[0].RequestedProcedureID"
    )
    request.PlacerOrderNumberImagingServiceRequest = p.token(
        "PON", at + "ReferencedRequestSequence[0].PlacerOrderNumberImagingServiceRequest"
    )
    request.FillerOrderNumberImagingServiceRequest = p.token(
        "FON", at + "ReferencedRequestSequence[0].FillerOrderNumberImagingServiceRequest"
    )
    ds.ReferencedRequestSequence = Sequence([request])
    ds.PerformedProcedureCodeSequence = Sequence()
    if evidence:
        series_items = []
        for ref in evidence:
            series_item = Dataset()
            series_item.SeriesInstanceUID = ref.SeriesInstanceUID
            series_item.ReferencedSOPSequence = Sequence(
                [_ref(str(ref.SOPClassUID), str(ref.SOPInstanceUID))]
            )
            series_items.append(series_item)
        hierarchy = Dataset()
        hierarchy.StudyInstanceUID = study_uid
        hierarchy.ReferencedSeriesSequence = Sequence(series_items)
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence([hierarchy])

    # SR Document Content module: TID 2000-like report
    name = f"{p.token('TPN', at + 'TEXT Finding patient name')}"
    doctor = f"{p.token('TDR', at + 'TEXT Finding doctor name')}"
    mrn = f"{p.token('TMR', at + 'TEXT Finding record number')}"
    finding = _content(
        "CONTAINS",
        "TEXT",
        _code("121071", "DCM", "Finding"),
        TextValue=f"Mr {name} seen on {_da(day)} by Dr {doctor} (MRN {mrn}): nodule, 4 mm.",
        ObservationDateTime=p.date(f"{_da(day)}{p.random_time()}"),
    )
    impression = _content(
        "CONTAINS",
        "TEXT",
        _code("121073", "DCM", "Impression"),
        TextValue=f"Follow up with {p.token('TIM', at + 'TEXT Impression')} in 6 months.",
    )
    impressions = _content(
        "CONTAINS",
        "CONTAINER",
        _code("121072", "DCM", "Impressions"),
        ContinuityOfContent="SEPARATE",
        ContentSequence=Sequence([impression]),
    )
    findings_items = [
        finding,
        _content(
            "CONTAINS",
            "PNAME",
            _code("113870", "DCM", "Person Name"),
            PersonName=f"{p.token('NPN', at + 'nested PNAME PersonName family')}^Kin",
        ),
        _content(
            "CONTAINS",
            "DATETIME",
            _code("111526", "DCM", "DateTime Started"),
            DateTime=p.date(f"{_da(day)}{p.random_time()}"),
        ),
        _content(
            "CONTAINS",
            "UIDREF",
            _code("121018", "DCM", "Procedure Study Instance UID"),
            UID=study_uid,
        ),
        impressions,
    ]
    if evidence:
        image = _content("CONTAINS", "IMAGE", _code("121112", "DCM", "Source of Measurement"))
        image.ReferencedSOPSequence = Sequence(
            [_ref(str(evidence[0].SOPClassUID), str(evidence[0].SOPInstanceUID))]
        )
        findings_items.append(image)
    findings = _content(
        "CONTAINS",
        "CONTAINER",
        _code("121070", "DCM", "Findings"),
        ContinuityOfContent="SEPARATE",
        ContentSequence=Sequence(findings_items),
    )
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2000"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ContentSequence = Sequence(
        [
            _content(
                "HAS OBS CONTEXT",
                "PNAME",
                _code("121008", "DCM", "Person Observer Name"),
                PersonName=f"{p.token('OBN', at + 'PNAME Person Observer Name family')}^Obs",
            ),
            _content(
                "HAS OBS CONTEXT",
                "TEXT",
                _code("121009", "DCM", "Person Observer's Organization Name"),
                TextValue=p.token("OBO", at + "TEXT Person Observer's Organization Name"),
            ),
            _content(
                "HAS OBS CONTEXT",
                "DATE",
                _code("111060", "DCM", "Study Date"),
                Date=p.date(_da(day)),
            ),
            findings,
            _content(
                "CONTAINS",
                "TEXT",
                _code("121106", "DCM", "Comment"),
                TextValue=f"Discussed with {p.token('TCM', at + 'TEXT Comment')} by phone.",
            ),
        ]
    )

    path = _save(ds, folder / "sr.dcm")
    planted = list(p.planted)
    dates = list(p.dates)
    if study is not None:
        # What the SR copied from the study (patient, study, referenced UIDs) is planted here too.
        data = path.read_bytes()
        seen = {item.value for item in planted}
        planted += [
            item for item in study.planted if item.value not in seen and item.value.encode() in data
        ]
        dates += [d for d in study.dates if d not in dates and d.encode() in data]
    return PlantedStudy([path], planted, dates, study_uid, str(ds.PatientID), p.times)
