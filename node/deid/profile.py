"""PS3.15 Table E.1-1 as the project keeps it, and the action each attribute gets under the
options in force.

Action codes (:class:`Action`, PS3.15 E.1-1): D dummy, Z empty or dummy, X remove, K keep
(sequences still cleaned), C clean, U new UID; compound codes (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) are
resolved by the engine against the attribute's Type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.config import DeidOption

TABLE_FILE = "table_e1_1.json"
TYPES_FILE = "iod_types.json"

COLUMN: dict[DeidOption, str] = {  # the pixel options have no column: the pixel step does them
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
"""The table's column for each option."""

CODE: dict[DeidOption, Code] = {
    DeidOption.RETAIN_SAFE_PRIVATE: codes.DCM.RetainSafePrivateOption,
    DeidOption.RETAIN_UIDS: codes.DCM.RetainUidsOption,
    DeidOption.RETAIN_DEVICE_IDENTITY: codes.DCM.RetainDeviceIdentityOption,
    DeidOption.RETAIN_INSTITUTION_IDENTITY: codes.DCM.RetainInstitutionIdentityOption,
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: codes.DCM.RetainPatientCharacteristicsOption,
    DeidOption.RETAIN_LONGITUDINAL_FULL_DATES:
        codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption,
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
        codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
    DeidOption.CLEAN_DESCRIPTORS: codes.DCM.CleanDescriptorsOption,
    DeidOption.CLEAN_STRUCTURED_CONTENT: codes.DCM.CleanStructuredContentOption,
    DeidOption.CLEAN_GRAPHICS: codes.DCM.CleanGraphicsOption,
    DeidOption.CLEAN_PIXEL_DATA: codes.DCM.CleanPixelDataOption,
    DeidOption.CLEAN_RECOGNIZABLE_VISUAL_FEATURES: codes.DCM.CleanRecognizableVisualFeaturesOption,
}
"""CID 7050 code recorded in De-identification Method Code Sequence for each option."""


class Action(StrEnum):
    """An action code of PS3.15 Table E.1-1 (its value the code as the table writes it)."""

    DUMMY = "D"
    """D: replaced with a dummy value of the same VR (a UID: remapped)."""

    EMPTY = "Z"
    """Z: emptied (zero length), or a dummy value."""

    REMOVE = "X"
    """X: removed."""

    KEEP = "K"
    """K: kept (a sequence's items still cleaned)."""

    CLEAN = "C"
    """C: replaced with values of similar meaning that identify nobody."""

    NEW_UID = "U"
    """U: replaced with a new UID, the same for the same original."""

    REMOVE_OR_EMPTY = "X/Z"
    """X/Z: X unless Z is needed to conform to the IOD (by the attribute's Type)."""

    REMOVE_OR_DUMMY = "X/D"
    """X/D: X unless D is needed to conform to the IOD."""

    EMPTY_OR_DUMMY = "Z/D"
    """Z/D: Z unless D is needed to conform to the IOD."""

    REMOVE_EMPTY_OR_DUMMY = "X/Z/D"
    """X/Z/D: X unless Z or D is needed to conform to the IOD."""

    REMOVE_EMPTY_OR_NEW_UIDS = "X/Z/U*"
    """X/Z/U*: X unless Z, or a sequence of references with its UIDs replaced (U), is needed
    to conform to the IOD."""

    @property
    def choices(self) -> tuple[Action, ...]:
        """The single actions a compound code chooses among, the first preferred; a single
        code alone."""
        return tuple(Action(code.rstrip("*")) for code in self.value.split("/"))

    @property
    def compound(self) -> bool:
        """Whether it chooses among actions by the attribute's Type (X/Z, X/D, ...)."""
        return "/" in self.value


# Where two enabled options disagree (the table only uses C and K in option columns),
# cleaning wins over keeping.
_OPTION_RANK = {Action.CLEAN: 2, Action.KEEP: 1}


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1."""

    tag: str
    name: str
    basic: Action
    options: dict[str, Action]
    """The action per option column, where the option changes it."""


def _action(code: str, tag: str) -> Action:
    try:
        return Action(code)
    except ValueError:
        raise ValueError(f'{TABLE_FILE}: row {tag}: action "{code}" is not a code of PS3.15 '
                         f'Table E.1-1 ({", ".join(Action)})') from None


@cache
def table() -> tuple[str, tuple[Row, ...]]:
    """(edition, rows) of the project's copy of Table E.1-1."""
    raw: dict[str, Any] = json.loads(
        resources.files("node.deid").joinpath(TABLE_FILE).read_text(encoding="utf-8")
    )
    rows = tuple(
        Row(r["tag"], r["name"], _action(r["basic"], r["tag"]),
            {column: _action(code, r["tag"]) for column, code in r["options"].items()})
        for r in raw["rows"]
    )
    return str(raw["edition"]), rows


def resolve(row: Row, options: frozenset[DeidOption]) -> Action:
    """The action for ``row`` with ``options`` in force: an enabled option's column overrides
    the Basic Profile; between options, C (clean) beats K (keep)."""
    chosen = [row.options[COLUMN[o]] for o in options if COLUMN.get(o) in row.options]
    if not chosen:
        return row.basic
    return max(chosen, key=lambda a: _OPTION_RANK.get(a, 0))


class Profile:
    """Actions by tag for one set of options."""

    def __init__(self, options: frozenset[DeidOption]) -> None:
        self.options = options
        self.edition, rows = table()
        self.actions: dict[int, Action] = {}
        for row in rows:  # group-pattern rows (50xx, 60xx, odd groups): the engine's own
            if len(row.tag) == 8 and "X" not in row.tag.upper():
                self.actions[int(row.tag, 16)] = resolve(row, options)

    def action(self, tag: int) -> Action | None:
        """The action for a standard attribute, or None: not in the table, kept."""
        return self.actions.get(tag)


@cache
def _iod_types() -> dict[str, Any]:
    return dict(json.loads(
        resources.files("node.deid").joinpath(TYPES_FILE).read_text("utf-8")
    ))


def iod_type(sop_class_uid: str, tag: int, parent: int | None = None) -> str | None:
    """The Type ("1", "1C", "2", "2C" or "3") of an attribute with an X or compound action:
    at the top level of the IOD of ``sop_class_uid``, or inside the sequence ``parent``; None
    where the tables do not say (see make_iod_types.py)."""
    tables = _iod_types()
    if parent is None:
        return tables["types"].get(sop_class_uid, {}).get(f"{tag:08X}")
    return tables["nested"].get(f"{parent:08X}/{tag:08X}")
