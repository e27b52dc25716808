"""The SCP against real peers: dcmtk's echoscu/storescu and pynetdicom SCUs."""

from __future__ import annotations

import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from node.receive.check import StoreStatus
from tests.nodeproc import (
    SYNTHNODE,
    StoreSCP,
    dataset_bytes,
    dcmtk,
    echo,
    make_study,
    sample_file,
    send_raw,
    storescu,
)

# One file per transfer syntax family the SCP must accept without decoding pixel data, with the
# storescu option that proposes that syntax.
TRANSFER_SYNTAX_FILES = {
    "CT_small.dcm": "-x=",  # Explicit VR Little Endian
    "MR_small_implicit.dcm": "-xi",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm": "-xb",  # Explicit VR Big Endian
    "image_dfl.dcm": "-xd",  # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",  # JPEG Baseline
    "JPEG-LL.dcm": "-xs",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS Lossless
    "emri_small_jpeg_2k_lossless.dcm": "-xv",  # JPEG 2000 Lossless
    "JPEG2000.dcm": "-xw",  # JPEG 2000
    "SC_rgb_rle.dcm": "-xr",  # RLE Lossless
}


def assert_spooled_identical(spooled: dict[str, Path], sent: list[Path]) -> None:
    """Every sent file is in the spool under its UIDs, data set byte-identical, same syntax."""
    for path in sent:
        ds = dcmread(path, stop_before_pixels=True)
        sop = str(ds.SOPInstanceUID)
        assert sop in spooled, f"{path.name} ({sop}) is not in the spool"
        target = spooled[sop]
        assert target.parts[-3:-1] == (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        assert dataset_bytes(target.read_bytes()) == dataset_bytes(path.read_bytes()), path.name
        meta = dcmread(target, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_echo_with_echoscu_and_synthnode_echo(node) -> None:
    res = subprocess.run(
        [dcmtk("echoscu"), "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [*SYNTHNODE, "echo", f"{node.ae_title}@127.0.0.1:{node.port}"],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert "success" in res.stdout
    # A peer that is not there: a clear non-zero answer, not a hang.
    res = subprocess.run(
        [*SYNTHNODE, "echo", "NOBODY@127.0.0.1:9", "--timeout", "2"],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 1
    assert "NOBODY@127.0.0.1:9" in res.stderr


def _with_new_uid(name: str, folder: Path) -> Path:
    """A copy of a sample file under a fresh SOP Instance UID (several samples share one)."""
    ds = dcmread(sample_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(exist_ok=True)
    ds.save_as(folder / name)
    return folder / name


def test_storescu_every_transfer_syntax_arrives_byte_identical(
    node, storescp: StoreSCP, tmp_path: Path
) -> None:
    """storescu may re-encode a file while sending it, so the reference for "the bytes the peer
    sent" is dcmtk's storescp in bit-preserving mode, fed the same files the same way."""
    for name, propose in TRANSFER_SYNTAX_FILES.items():
        path = _with_new_uid(name, tmp_path / "samples")
        for port, aet in ((node.port, node.ae_title), (storescp.port, storescp.ae_title)):
            res = storescu(port, [path], ae_title=aet, extra=[propose])
            assert res.returncode == 0, f"{name}: {res.stderr}"
    received = storescp.received()
    assert len(received) == len(TRANSFER_SYNTAX_FILES)
    assert_spooled_identical(node.spooled(), received)


def test_multi_series_study_arrives_complete_with_pynetdicom(node, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", series=3, per_series=12)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(dcmread(f)).Status for f in files]
    finally:
        assoc.release()
    assert statuses == [0] * len(files)
    spooled = node.spooled()
    assert len(spooled) == len(files)
    assert_spooled_identical(spooled, files)
    status = node.status()
    (study,) = status["studies"]
    assert (study["series"], study["instances"], study["state"]) == (3, 36, "receiving")


def test_calling_aet_outside_allowlist_is_rejected(node_factory, tmp_path: Path) -> None:
    node = node_factory(node={"allowed_calling_aets": ["MODALITY1"]})
    files = make_study(tmp_path / "study")
    res = storescu(node.port, files, calling="INTRUDER")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stderr
    assert node.spooled() == {}
    res = storescu(node.port, files, calling="MODALITY1")
    assert res.returncode == 0, res.stderr
    assert len(node.spooled()) == 1
    assert "INTRUDER@127.0.0.1" in node.log()
    assert "calling AE title not in allowed_calling_aets" in node.log()


def test_wrong_called_aet_is_rejected(node) -> None:
    assert not echo(node.port, ae_title="NOTTHENODE")
    # (the handler logs after the rejection has gone out: give it a moment on a busy box)
    deadline = time.monotonic() + 5
    while "called AE title is not SYNTHNODE" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "called AE title is not SYNTHNODE" in node.log()


def test_association_limit(node_factory) -> None:
    node = node_factory(node={"max_associations": 2})
    held = []
    for _ in range(2):
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        held.append(assoc)
    try:
        assert not echo(node.port)  # the third is refused (local limit exceeded)
    finally:
        for assoc in held:
            assoc.release()
    assert echo(node.port)


def test_duplicate_identical_is_acknowledged_without_second_copy(node, tmp_path: Path) -> None:
    files = make_study(tmp_path / "study")
    for _ in range(2):
        res = storescu(node.port, files)
        assert res.returncode == 0, res.stderr
    assert len(node.spooled()) == 1
    assert node.status()["studies"][0]["instances"] == 1
    assert not list((node.spool / ".tmp").iterdir())


def _changed_copy(path: Path, folder: Path) -> Path:
    ds = dcmread(path)
    ds.SeriesDescription = "changed"
    folder.mkdir(exist_ok=True)
    out = folder / path.name
    ds.save_as(out)
    return out


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_duplicate_with_different_bytes_follows_policy(
    node_factory, tmp_path: Path, policy: str
) -> None:
    node = node_factory(spool={"on_duplicate": policy})
    (first,) = make_study(tmp_path / "study")
    second = _changed_copy(first, tmp_path / "changed")
    assert storescu(node.port, [first]).returncode == 0
    assert storescu(node.port, [second]).returncode == 0
    (spooled,) = node.spooled().values()
    expected = "" if policy == "keep_first" else "changed"
    assert dcmread(spooled).get("SeriesDescription", "") == expected
    word = "duplicate-discarded" if policy == "keep_first" else "replaced"
    assert "duplicate SOP Instance UID from STORESCU@127.0.0.1" in node.log()
    assert word in node.log()


def _send_raw(port: int, path: Path, sop_class: str, ae_title: str = "SYNTHNODE") -> int:
    (status,) = send_raw(port, [path], [sop_class], ae_title)
    return status


def test_bad_data_sets_get_clear_statuses_and_node_stays_up(node, tmp_path: Path) -> None:
    (good,) = make_study(tmp_path / "study", patient_name="Secret^Name", patient_id="PID-SECRET")
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:-5000])

    ds = dcmread(good)
    del ds.StudyInstanceUID
    no_study = tmp_path / "no_study.dcm"
    ds.save_as(no_study)

    ds = dcmread(good)
    ds.SOPClassUID = MRImageStorage
    wrong_class = tmp_path / "wrong_class.dcm"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(wrong_class)

    ds = dcmread(good)
    ds.StudyInstanceUID = "1.2.3/../../etc"
    bad_uid = tmp_path / "bad_uid.dcm"
    ds.save_as(bad_uid)

    assert _send_raw(node.port, truncated, CTImageStorage) == StoreStatus.CANNOT_UNDERSTAND
    assert _send_raw(node.port, no_study, CTImageStorage) == StoreStatus.CANNOT_UNDERSTAND
    # The data set says MR while it travels in a CT context.
    assert (
        _send_raw(node.port, wrong_class, CTImageStorage)
        == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert _send_raw(node.port, bad_uid, CTImageStorage) == StoreStatus.CANNOT_UNDERSTAND
    assert node.spooled() == {}
    assert not list((node.spool / ".tmp").iterdir())
    log = node.log()
    assert "data set is truncated or malformed" in log
    assert "Study Instance UID (0020,000D) is missing" in log
    assert "does not match the presentation context" in log
    assert "is not a valid UID" in log
    assert log.count("C-STORE refused from RAWSCU@127.0.0.1") == 4
    # The node stays up and a good instance still goes in.
    assert _send_raw(node.port, good, CTImageStorage) == StoreStatus.SUCCESS
    assert len(node.spooled()) == 1
    # Privacy: no patient name or ID in the log, whatever happened.
    log = node.log()
    assert "Secret" not in log and "PID-SECRET" not in log


def test_peer_abort_mid_transfer_stores_nothing_partial(node) -> None:
    """A peer that aborts while a data set is on the wire leaves no trace in the spool."""
    ds = dcmread(sample_file("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = BytesIO()
    ds.save_as(buffer)
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    # The C-STORE request and the first fragments of its data set, then an A-ABORT.
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(dataset_bytes(buffer.getvalue()))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    context_id = assoc.accepted_contexts[0].context_id
    for n, pdata in enumerate(message.encode_msg(context_id, 16382)):
        if n == 40:  # ~640 kB of 7.2 MB sent
            break
        assoc.dul.send_pdu(pdata)
    assoc.abort()
    deadline = time.monotonic() + 10
    while "aborted" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "association from ABORTER@127.0.0.1" in node.log()
    assert "aborted; data in flight was not stored" in node.log()
    assert node.spooled() == {}
    assert not list((node.spool / ".tmp").iterdir())
    assert echo(node.port)
