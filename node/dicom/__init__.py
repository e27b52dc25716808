"""Secondary Capture objects: the writer, provenance records, UIDs and validation."""

from node.dicom.provenance import (
    Deidentification,
    NewIdentity,
    SeriesSpec,
    Synthesis,
    TemporalInformation,
)
from node.dicom.validate import Saved, Validation, quarantine, save_checked, validate_file
from node.dicom.writer import (
    Pixels,
    build_sc,
    carried_spacing,
    mark_deidentified,
    output_uids,
    own_output,
    stamp_own,
)

__all__ = [
    "Deidentification",
    "NewIdentity",
    "Pixels",
    "Saved",
    "SeriesSpec",
    "Synthesis",
    "TemporalInformation",
    "Validation",
    "build_sc",
    "carried_spacing",
    "mark_deidentified",
    "output_uids",
    "own_output",
    "quarantine",
    "save_checked",
    "stamp_own",
    "validate_file",
]
