"""Fuzz target: the de-identification engine (node.deid) on mutated data sets.

An input is one byte (low 2 bits: the transfer syntax; the others: options and output IOD),
then a data set. What the receiver refuses (``inspect_dataset``) and what pydicom cannot
read is skipped; the rest, wrapped in file meta as the spool holds it, is de-identified the
way a job does it (``deidentify_to_bytes``). It must give bytes or raise the engine's own
DeidentificationError (Quarantined included: the runner quarantines or fails the job with
its message); nothing else may escape. An output never holds the source's Patient Name or
Patient ID where those are long enough to be unique. Text detection is off (slow); a pixel
rule for CT and MR images exercises pixel decoding and writing back.

    PYTHONPATH=$PWD .venv/bin/python tests/fuzz/fuzz_deid.py --seeds=/tmp/deid \\
        -max_total_time=600 -timeout=20 -rss_limit_mb=3072
"""

from __future__ import annotations

import sys
import tempfile
from io import BytesIO
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fuzz.harness import instrument

    instrument("node.deid", "node.receive.check")

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filewriter import write_file_meta_info  # noqa: E402
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID  # noqa: E402

from node.config import DeidOption, DeidOutput, DeidSettings, OutputSettings, PixelRule  # noqa: E402,E501
from node.deid import DeidentificationError, Deidentifier  # noqa: E402
from node.deid.batch import deidentify_to_bytes  # noqa: E402
from node.receive.check import RejectedDataset, inspect_dataset  # noqa: E402
from tests.fuzz.harness import decode_input, run, sample_study, seed_inputs  # noqa: E402

TARGET = "deid"
KEY = "fuzz-only-zVHeMArZw-VWGBFzXZdBF6xeSD2y6HdpJ2oQczc_BPw"  # strong enough (node.keys)

OPTIONS = (
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
    DeidOption.CLEAN_DESCRIPTORS,
    DeidOption.RETAIN_SAFE_PRIVATE,
    DeidOption.CLEAN_STRUCTURED_CONTENT,
    DeidOption.RETAIN_UIDS,
)
"""Bits 2..6 of an input's first byte switch these on; bit 7 asks for Secondary Capture."""

RULE = PixelRule(name="fuzz corner", sop_class=["1.2.840.10008.5.1.4.1.1.2",
                                                "1.2.840.10008.5.1.4.1.1.4"],
                 regions=[(0, 0, 4, 4)])

_engines: dict[int, Deidentifier] = {}


def engine(bits: int) -> Deidentifier:
    if bits not in _engines:
        settings = DeidSettings(
            key=KEY, options=[o for i, o in enumerate(OPTIONS) if bits >> i & 1],
            detect_text=False, pixel_rules=[RULE], safe_private=["SIEMENS CSA HEADER:0029,08"],
        )
        _engines[bits] = Deidentifier(settings, OutputSettings())
    return _engines[bits]


def file_bytes(dataset: bytes, transfer_syntax: str, sop_class: str, sop_instance: str
               ) -> bytes:
    """What the spool keeps: preamble, file meta, the data set as received."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + dataset


def parsed(data: bytes) -> Dataset | None:
    """The data set as pydicom reads it, every element decoded; None where pydicom cannot."""
    try:
        ds = dcmread(BytesIO(data))
        for elem in ds.iterall():
            str(elem.value)
    except Exception:  # noqa: BLE001 - pydicom's refusals are not the engine's findings
        return None
    return ds


def _unique(source: bytes, value: object) -> bytes | None:
    """``value`` as bytes when it is long and occurs once in the source (only as itself)."""
    text = str(value or "").strip()
    raw = text.encode("latin-1", "ignore")
    if len(raw) < 8 or raw.replace(b".", b"").isdigit() or source.count(raw) != 1:
        return None
    return raw


def one_input(data: bytes) -> None:
    first, transfer_syntax, dataset = decode_input(data)
    try:
        header = inspect_dataset(dataset, transfer_syntax)
    except RejectedDataset:
        return  # the receiver refuses it: it never reaches a job
    raw = file_bytes(dataset, transfer_syntax, header.sop_class_uid, header.sop_instance_uid)
    source = parsed(raw)
    if source is None:
        return
    secrets = [v for v in (_unique(raw, source.get("PatientName")),
                           _unique(raw, source.get("PatientID"))) if v]
    deid = engine(first >> 2 & 0x1F)
    output = DeidOutput.SC if first & 0x80 else DeidOutput.SOURCE
    try:
        result, encoded = deidentify_to_bytes(deid, source, output)
    except DeidentificationError as exc:
        assert str(exc), "a DeidentificationError without a reason"
        return
    own = (str(result.get("PatientName", "")) + str(result.get("PatientID", ""))).encode()
    for value in secrets:
        assert value in own or value not in encoded, f"{value!r} survived de-identification"
    dcmread(BytesIO(encoded))


def write_seeds(corpus: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        for name, data in seed_inputs(sample_study, Path(work)):
            (corpus / name).write_bytes(data)
            # the same data set under other options and as Secondary Capture
            (corpus / f"{name}-options").write_bytes(bytes([data[0] | 0x7C]) + data[1:])
            (corpus / f"{name}-sc").write_bytes(bytes([data[0] | 0x84]) + data[1:])


if __name__ == "__main__":
    run(one_input, write_seeds, sys.argv)
