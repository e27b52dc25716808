"""Large objects: a ~1 GB multi-frame instance goes through the receiver in bounded memory,
is acknowledged once on disk, and arrives byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.receive.chunked import dataset_offset
from tests.nodeproc import storescu

pytestmark = pytest.mark.slow

XA = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage: multi-frame, 8-bit
MB = 1_000_000


def write_multiframe(path: Path, rows: int, cols: int, frames: int) -> str:
    """An uncompressed 8-bit multi-frame XA instance, its pixel data streamed to the file frame
    by frame (never held whole); returns the SHA-256 of the encoded data set."""
    ds = Dataset()
    ds.SOPClassUID = XA
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "XA"
    ds.PatientName = "Large^Object"
    ds.PatientID = "LARGE-1"
    ds.StudyDate = "20240101"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = XA
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    with path.open("rb") as f:
        start = dataset_offset(f.fileno())
    digest = hashlib.sha256(path.read_bytes()[start:])
    size = rows * cols * frames
    base = np.random.default_rng(7).integers(0, 256, rows * cols, dtype=np.uint8)
    with path.open("ab") as f:
        header = b"\xe0\x7f\x10\x00OB\x00\x00" + size.to_bytes(4, "little")
        f.write(header)
        digest.update(header)
        for i in range(frames):
            frame = (base + np.uint8(i % 256)).tobytes()  # each frame different (wraps)
            f.write(frame)
            digest.update(frame)
    return digest.hexdigest()


def dataset_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(dataset_offset(f.fileno()))
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_mb(pid: int) -> float:
    """The process's resident-memory high-water mark (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_one_gigabyte_instance_is_received_in_bounded_memory(node_factory, tmp_path: Path) -> None:
    big = tmp_path / "big.dcm"
    sent = write_multiframe(big, 1024, 1024, 1000)
    size = big.stat().st_size
    assert size > 1_000 * MB
    node = node_factory()
    assert node.proc is not None
    before = peak_rss_mb(node.proc.pid)

    done = storescu(node.port, [big], timeout_s=300)
    assert done.returncode == 0, done.stderr

    peak = peak_rss_mb(node.proc.pid)
    print(f"\n1 GB receive: {size / MB:.0f} MB instance, serve peak RSS {before:.0f} MB at start, "
          f"{peak:.0f} MB after")
    assert peak < 300, f"serve's resident memory peaked at {peak:.0f} MB"
    (spooled,) = node.spooled().values()
    assert dataset_sha256(spooled) == sent
    assert not list((node.spool / ".tmp").iterdir())
    assert node.status()["studies"][0]["size_bytes"] == spooled.stat().st_size


def test_one_gigabyte_instance_is_deidentified_holding_it_once(
    node_factory, storescp, tmp_path: Path
) -> None:
    """A real job de-identifies the 1 GB instance and delivers it: the worker reads it once
    and writes the output straight to its file (the leak scan reads back everything but the
    bulk pixel data), so its memory peaks near one copy, not three or four. Text detection is
    off here (1000 noise frames would take minutes of OCR, and decoding them is a copy of its
    own); what is measured is the de-identification and the delivery."""
    import json
    import time

    from tests.test_jobs import KEY, all_done, records, wait_for

    big = tmp_path / "big.dcm"
    write_multiframe(big, 1024, 1024, 1000)
    size = big.stat().st_size
    rules = (f'[[destinations]]\nname = "peer"\nae_title = "{storescp.ae_title}"\n'
             f'host = "127.0.0.1"\nport = {storescp.port}\n'
             '[[rules]]\nname = "deid"\ndestinations = ["peer"]\n'
             '[[rules.tasks]]\ntask = "deidentify"\n')
    node = node_factory(rules, spool={"stable_after_s": 0.5, "check_interval_s": 0.2},
                        deid={"key": KEY, "detect_text": False},
                        jobs={"cpu_workers": 1, "gpu_workers": 0, "heartbeat_timeout_s": 120})
    done = storescu(node.port, [big], timeout_s=300)
    assert done.returncode == 0, done.stderr
    wait_for(all_done(node, 1), timeout_s=600, what="the 1 GB instance de-identified")
    (job,) = records(node)
    assert job.outputs == 1 and job.attempts == 1, job
    record = json.loads((node.spool / ".serve.workers").read_text())
    (worker,) = record["workers"]
    peak = peak_rss_mb(worker["pid"])
    deadline = time.monotonic() + 60
    while not storescp.received() and time.monotonic() < deadline:
        time.sleep(0.2)
    (received,) = storescp.received()
    print(f"\n1 GB de-identification: {size / MB:.0f} MB instance, worker peak RSS {peak:.0f} MB "
          f"({peak * MB / size:.2f}x the instance)")
    assert received.stat().st_size > 1_000 * MB
    assert peak * MB < 1.5 * size, f"the worker's memory peaked at {peak:.0f} MB"


def test_a_transfer_cut_off_midway_leaves_nothing_behind(node_factory, tmp_path: Path) -> None:
    """The sender dies halfway through a large instance: nothing is acknowledged, nothing is
    spooled, and its partial file in the spool's ``.tmp`` is removed at once (not at the next
    start); the node goes on receiving."""
    import os
    import signal
    import subprocess
    import time

    from tests.nodeproc import dcmtk, echo, make_study

    big = tmp_path / "big.dcm"
    write_multiframe(big, 1024, 1024, 400)
    node = node_factory()
    tmp = node.spool / ".tmp"
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-R", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1",
         str(node.port), str(big)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, TCP_NODELAY="1"))
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 20 * MB for p in tmp.glob("*")):
            assert sender.poll() is None, "the transfer ended before it could be cut off"
            assert time.monotonic() < deadline, "no partial file appeared in .tmp"
            time.sleep(0.02)
        sender.send_signal(signal.SIGKILL)
    finally:
        sender.wait(30)
    deadline = time.monotonic() + 30
    while "aborted" not in node.log():
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(tmp.iterdir()), "the partial file stayed in .tmp"
    assert node.spooled() == {}
    # Still receiving.
    assert echo(node.port, node.ae_title)
    files = make_study(tmp_path / "small", series=1, per_series=1)
    assert storescu(node.port, files).returncode == 0
    assert len(node.spooled()) == 1
