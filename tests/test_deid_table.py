"""Every attribute of PS3.15 Table E.1-1 under every option column, checked against a copy of
the reference kept with the tests (independent of the engine's own copy and of its lookup in
node/deid/profile.py), at the top level and nested in a sequence; and every pair of options
that disagree on an attribute, in a real SOP class."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from node.config import DeidOption, DeidSettings, OutputSettings
from node.deid import Deidentifier
from node.deid import engine as engine_module
from node.uids import is_valid_uid

REFERENCE = Path(__file__).resolve().parent / "data" / "confidentiality_profile_attributes.json"
REFERENCE_SHA256 = "a99a35d1278e2bace8d90ff791b11aea2d45f1e3e1230388eb5224c9dbcd29e6"
"""PS3.15 2023b Table E.1-1 as machine-readable rows (the project's shared reference)."""
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / REFERENCE.name
PROJECT_COPY = Path(__file__).resolve().parents[1] / "node" / "deid" / "table_e1_1.json"
COLUMNS = {
    DeidOption.RETAIN_SAFE_PRIVATE: "rtnSafePrivOpt",
    DeidOption.RETAIN_UIDS: "rtnUIDsOpt",
    DeidOption.RETAIN_DEVICE_IDENTITY: "rtnDevIdOpt",
    DeidOption.RETAIN_INSTITUTION_IDENTITY: "rtnInstIdOpt",
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: "rtnPatCharsOpt",
    DeidOption.RETAIN_LONGITUDINAL_FULL_DATES: "rtnLongFullDatesOpt",
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: "rtnLongModifDatesOpt",
    DeidOption.CLEAN_DESCRIPTORS: "cleanDescOpt",
    DeidOption.CLEAN_STRUCTURED_CONTENT: "cleanStructContOpt",
    DeidOption.CLEAN_GRAPHICS: "cleanGraphOpt",
}
"""The reference's column for each option (the pixel options have none)."""
TEXT_VRS = ("LO", "SH", "LT", "ST", "UT", "UC")
SPECIAL = {0x00100010, 0x00100020}  # Patient Name and ID: pseudonyms, checked elsewhere
# A sequence that is not in the table: its items are cleaned but it is kept.
CARRIER = 0x00540220  # View Code Sequence
SAFE_CREATOR = "SAFE PRIVATE 1.0"
KEY = "table-key-Zx5Qw1Lr8Mn3Vb7Jk0Tp4Hs9Gd2Fy6Ce"
# The group-pattern rows, as one concrete attribute each (tag, VR).
PATTERNS = {
    "50xxxxxx": (0x50003000, "OB"),  # Curve Data
    "60xx3000": (0x60003000, "OW"),  # Overlay Data
    "60xx4000": (0x60004000, "LT"),  # Overlay Comments
    "ggggeeee-where-gggg-is-odd": (0x00091010, "LO"),  # in SAFE_CREATOR's block
}


def reference() -> list[dict[str, Any]]:
    """The reference rows, as kept with the tests: missing or changed fails, never skips."""
    assert REFERENCE.exists(), f"the reference copy {REFERENCE} is missing"
    data = REFERENCE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == REFERENCE_SHA256, f"{REFERENCE} was changed"
    rows: list[dict[str, Any]] = json.loads(data)
    return rows


def reference_rows() -> list[dict[str, Any]]:
    """The rows for single attributes (not the group patterns)."""
    return [r for r in reference() if re.fullmatch(r"[0-9A-Fa-f]{8}", r["id"])]


def test_project_copy_matches_the_reference() -> None:
    """The table the engine uses is the reference, row for row."""
    rows = {r["id"].upper(): r for r in reference()}
    copy = json.loads(PROJECT_COPY.read_text())
    assert "2023b" in copy["edition"]
    assert len(copy["rows"]) == len(rows) == 621
    for row in copy["rows"]:
        ref = rows[row["tag"].upper()]
        assert row["basic"] == ref["basicProfile"], row["tag"]
        assert row["options"] == {k: v for k, v in ref.items() if k.endswith("Opt")}, row["tag"]


def test_the_reference_copy_is_the_shared_one() -> None:
    """Where the shared reference lies beside the checkout, the tests' copy is the same file."""
    if not SHARED.exists():
        pytest.skip(f"no shared reference at {SHARED} (the tests' own copy is checked anyway)")
    assert SHARED.read_bytes() == REFERENCE.read_bytes()


def expected(row: dict[str, Any], options: set[DeidOption]) -> str:
    """PS3.15 E.3: an enabled option's column replaces the Basic Profile action. Where two
    enabled options disagree (the option columns only hold C and K), C beats K: keeping what
    another option cleans would undo that option."""
    chosen = [row[COLUMNS[o]] for o in options if COLUMNS.get(o) in row]
    if "C" in chosen:
        return "C"
    if "K" in chosen:
        return "K"
    return str(row["basicProfile"])


SAMPLE: dict[str, Any] = {
    "AE": "PHIAE", "AS": "042Y", "CS": "PHICS", "DA": "20190314", "DT": "20190314101010",
    "TM": "101010", "LO": "PHI-LO-VALUE PID-1", "SH": "PHI-SH PID-1",
    "LT": "PHI-LT-VALUE PID-1", "ST": "PHI-ST-VALUE PID-1", "UT": "PHI-UT-VALUE PID-1",
    "UC": "PHI-UC-VALUE PID-1", "PN": "Phi^Person",
    "UR": "http://phi.example/x", "UI": "1.2.3.4.5.6.7.8.9", "DS": "12.5", "IS": "42",
    "FL": 1.5, "FD": 2.5, "SL": -3, "SS": -4, "UL": 5, "US": 6, "SV": 7, "UV": 8,
    "OB": b"PHIB", "OW": b"PHIW", "OD": b"PHIPHIPH", "OF": b"PHIF", "OL": b"PHIL",
    "OV": b"PHIPHIPH", "UN": b"PHIU",
}


def element_for(tag: int) -> tuple[str, Any]:
    vr = dictionary_VR(tag).split(" or ")[0]
    if vr == "SQ":
        item = Dataset()
        item.CodeMeaning = "PHI-NESTED-TEXT"  # kept by the table: checks items survive
        return vr, [item]
    return vr, SAMPLE[vr]


def check(action: str, tag: int, vr: str, before: Any, after: Dataset, uid_map: dict,
          options: set[DeidOption]) -> None:
    name = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) action {action}"
    present = tag in after
    value = after[tag].value if present else None
    empty = value in (None, "", b"", []) or (vr == "SQ" and len(value) == 0)
    choices = action.split("/")
    if action == "X":
        assert not present, name
    elif action == "Z":
        assert present and empty, name
    elif action == "K":
        assert present, name
        if vr != "SQ":
            assert value == before, name
    elif action == "U":
        assert present and value != before and is_valid_uid(str(value)), name
        # One new UID per source UID and kind: Study and Frame of Reference UIDs are shared by
        # every variant of a study, the others also derive from the variant's settings.
        kind = tag in engine_module._SHARED_UIDS
        assert uid_map.setdefault((before, kind), value) == value, name
    elif action == "C" and vr in TEXT_VRS:  # cleaned: the Patient ID out, the rest kept
        assert present and value == before.replace(" PID-1", ""), name
    elif (action == "C" and vr == "TM"
          and DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in options):
        assert value == before, name  # dates move by whole days: the time of day stays
    elif action in ("D", "C"):
        assert vr == "SQ" or not present or value != before, name
        if action == "D":
            assert present, name
    else:  # compound: any of its choices, and never the original value
        assert present or "X" in choices, name
        if present and vr != "SQ" and "K" not in choices:
            assert value != before or empty, name


OPTION_SETS = {
    "basic": set(),
    "retain-all": {DeidOption.RETAIN_SAFE_PRIVATE, DeidOption.RETAIN_UIDS,
                   DeidOption.RETAIN_DEVICE_IDENTITY, DeidOption.RETAIN_INSTITUTION_IDENTITY,
                   DeidOption.RETAIN_PATIENT_CHARACTERISTICS,
                   DeidOption.RETAIN_LONGITUDINAL_FULL_DATES},
    "modified-dates": {DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
                       DeidOption.RETAIN_DEVICE_IDENTITY},
    "clean": {DeidOption.CLEAN_DESCRIPTORS, DeidOption.CLEAN_STRUCTURED_CONTENT,
              DeidOption.CLEAN_GRAPHICS},
}


def engine_for(options: set[DeidOption]) -> Deidentifier:
    return Deidentifier(DeidSettings(key=KEY, options=sorted(options),
                                     safe_private=[f"{SAFE_CREATOR}:0009,10"]), OutputSettings())


def test_every_option_column_is_exercised() -> None:
    columns = {k for row in reference() for k in row if k.endswith("Opt")}
    assert columns == set(COLUMNS.values())
    assert {COLUMNS[o] for chosen in OPTION_SETS.values() for o in chosen} == columns


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_every_table_attribute_gets_its_action(options: set[DeidOption]) -> None:
    engine = engine_for(options)
    uid_map: dict[str, str] = {}
    rows = [r for r in reference_rows() if int(r["id"], 16) not in SPECIAL]
    assert len(rows) > 600
    for row in rows:
        tag = int(row["id"], 16)
        vr, value = element_for(tag)
        action = expected(row, options)
        if tag >> 16 == 0x0000:
            # Command elements belong to a DIMSE message, never to a data set (a Part 10 file
            # cannot hold them): always removed, whatever the table's action.
            action = "X"
        ds = Dataset()
        ds.PatientID = "PID-1"
        ds.add_new(tag, vr, value)
        carrier_item = Dataset()
        carrier_item.add_new(tag, vr, value)
        ds.add_new(CARRIER, "SQ", [carrier_item])
        out = engine.deidentify(ds)
        check(action, tag, vr, value, out, uid_map, options)
        nested = out[CARRIER].value[0]
        # Nested: the same action (Types are unknown inside sequences: compound -> kept empty
        # or dummy, which the compound check accepts).
        check(action, tag, vr, value, nested, uid_map, options)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_every_group_pattern_row_gets_its_action(options: set[DeidOption]) -> None:
    """Curves, overlays and private attributes (rows by group pattern)."""
    engine = engine_for(options)
    rows = {r["id"]: r for r in reference() if r["id"] in PATTERNS}
    assert set(rows) == set(PATTERNS)
    for key, (tag, vr) in PATTERNS.items():
        action = expected(rows[key], options)
        value = SAMPLE[vr]
        ds = Dataset()
        ds.PatientID = "PID-1"
        if tag >> 16 == 0x0009:
            ds.add_new(0x00090010, "LO", SAFE_CREATOR)
        ds.add_new(tag, vr, value)
        out = engine.deidentify(ds)
        if key.startswith(("50", "60")):
            # Curves and overlays go whole, with Clean Graphics too: the engine does not clean
            # their bitmaps or text (C), it removes them, which reveals less than C may.
            assert tag not in out, key
        else:
            check(action, tag, vr, value, out, {}, options)
            assert (0x00090010 in out) == (action != "X"), key  # the creator with its block


def conflicting_pairs() -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Pairs of option columns and the rows where both hold different actions."""
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in reference():
        held = sorted(k for k in row if k.endswith("Opt"))
        for a, b in itertools.combinations(held, 2):
            if row[a] != row[b]:
                pairs.setdefault((a, b), []).append(row)
    return pairs


OPTION_OF = {column: option for option, column in COLUMNS.items()}
DATE_SAMPLE = {"DA": "20190314", "DT": "20190314101010", "TM": "101010"}


def test_every_pair_of_options_that_disagree_is_resolved() -> None:
    """For each attribute where two options' columns disagree, both options on, in a real CT
    image: the action is C (C beats K). Where the settings refuse the pair together (full
    and modified dates), that refusal is what is checked."""
    pairs = conflicting_pairs()
    assert pairs, "the reference has conflicting option columns"
    exercised = 0
    for (a, b), rows in pairs.items():
        options = {OPTION_OF[a], OPTION_OF[b]}
        try:
            engine = engine_for(options)
        except ValidationError as exc:
            assert "exclude each other" in str(exc), (a, b)
            continue
        for row in rows:
            tag = int(row["id"], 16)
            vr = dictionary_VR(tag)
            assert {row[a], row[b]} == {"C", "K"}, (a, b, row["id"])
            action = expected(row, options)
            assert action == "C"
            source = dcmread(get_testdata_file("CT_small.dcm"))
            value = DATE_SAMPLE.get(vr, SAMPLE.get(vr))
            source.add_new(tag, vr, value)
            out = engine.deidentify(source)
            check(action, tag, vr, value, out, {}, options)
            if vr in ("DA", "DT"):  # moved back as far as the Study Date: C, not K
                days = (_day(source.StudyDate) - _day(out.StudyDate)).days
                assert days > 0 and _day(out[tag].value) == _day(value) - datetime.timedelta(
                    days=days), (a, b, row["id"])
            exercised += 1
    assert exercised >= 11  # Retain Device Identity K vs Modified Dates C: 11 attributes


def _day(value: str) -> datetime.date:
    return datetime.datetime.strptime(str(value)[:8], "%Y%m%d").date()
