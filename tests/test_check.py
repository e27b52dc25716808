"""The structural check of received data sets, over pydicom's files in many syntaxes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from node.receive.check import RejectedDataset, StoreStatus, inspect_dataset
from tests.nodeproc import dataset_bytes, sample_file

SAMPLES = [
    "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "rtplan.dcm",
    "waveform_ecg.dcm",
    "RG1_UNCR.dcm",
]


@pytest.mark.parametrize("name", SAMPLES)
def test_complete_data_sets_pass_and_truncated_ones_fail(name: str) -> None:
    raw = sample_file(name).read_bytes()
    ts = dcmread(BytesIO(raw), stop_before_pixels=True).file_meta.TransferSyntaxUID
    body = dataset_bytes(raw)
    header = inspect_dataset(body, ts)
    ds = dcmread(BytesIO(raw), stop_before_pixels=True)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.sop_class_uid == ds.SOPClassUID
    # A deflated stream may be followed by a few padding bytes a short cut only removes.
    for cut in (16, 64, len(body) // 2):
        with pytest.raises(RejectedDataset) as info:
            inspect_dataset(body[:-cut], ts)
        assert info.value.status is StoreStatus.CANNOT_UNDERSTAND


def test_header_names_the_missing_uid() -> None:
    ds = dcmread(sample_file("CT_small.dcm"))
    del ds.SeriesInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer)
    with pytest.raises(RejectedDataset, match=r"Series Instance UID \(0020,000E\) is missing"):
        inspect_dataset(dataset_bytes(buffer.getvalue()), ds.file_meta.TransferSyntaxUID)


def test_uids_inside_sequences_do_not_count() -> None:
    """A referenced SOP Instance UID in a sequence must not stand in for the top-level one."""
    ds = dcmread(sample_file("SC_rgb_gdcm_KY.dcm"))
    assert "ReferencedSOPInstanceUID" in ds.SourceImageSequence[0]
    del ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer)
    with pytest.raises(RejectedDataset, match=r"SOP Instance UID \(0008,0018\) is missing"):
        inspect_dataset(dataset_bytes(buffer.getvalue()), ds.file_meta.TransferSyntaxUID)


def test_garbage_is_not_understood() -> None:
    with pytest.raises(RejectedDataset, match="truncated or malformed"):
        inspect_dataset(b"\x08\x00\x16\x00UI\xff\xff" + b"1.2" * 9, ExplicitVRLittleEndian)
    with pytest.raises(RejectedDataset, match="is missing"):
        inspect_dataset(b"", ExplicitVRLittleEndian)


def test_a_deflate_bomb_is_refused_without_inflating_it(monkeypatch) -> None:
    import zlib

    from node.receive import check

    monkeypatch.setattr(check, "MAX_INFLATED_BYTES", 1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\0" * (8 << 20)) + compressor.flush()  # 8 MiB of zeros
    assert len(bomb) < 20_000
    with pytest.raises(check.RejectedDataset, match="inflates beyond 1 MiB"):
        check.inspect_dataset(bomb, "1.2.840.10008.1.2.1.99")
