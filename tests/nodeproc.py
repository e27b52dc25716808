"""A ``synthnode serve`` subprocess for tests, and the data helpers tests share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, _config

from node.localorthanc import dcmtk as dcmtk  # re-exported for the tests
from node.samples import make_study as make_study  # re-exported for the tests
from node.samples import sample_file as sample_file

SYNTHNODE = [sys.executable, "-m", "node"]


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_config(path: Path, sections: dict[str, dict[str, Any]], rules: str = "") -> Path:
    """A TOML file of ``sections`` (key = value tables) and, after them, ``rules``: TOML text
    of ``[[rules]]`` tables, or "" for ``rules = []`` (a node that routes nothing)."""
    lines = [] if rules else ["rules = []"]
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n" + rules)
    return path


class NodeProcess:
    """One node process; its log goes to a file the test can read."""

    def __init__(self, config: Path, sections: dict[str, dict[str, Any]], log: Path) -> None:
        self.config = config
        self.sections = sections
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.wrap: list[str] = []  # a command the node runs under (strace ... --)

    @property
    def port(self) -> int:
        return int(self.sections["node"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.sections["node"].get("ae_title", "SYNTHNODE"))

    @property
    def spool(self) -> Path:
        return Path(self.sections["spool"]["dir"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 30.0) -> None:
        offset = len(self.log())
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.wrap, *SYNTHNODE, "--config", str(self.config), "serve"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if " listening as " in self.log()[offset:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"node did not start listening within {timeout_s} s:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def spooled(self) -> dict[str, Path]:
        """SOP Instance UID -> spooled file."""
        return {p.stem: p for p in self.spool.glob("*/*/*.dcm")}

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [*SYNTHNODE, "--config", str(self.config), "status", "--json"],
            check=True, capture_output=True, text=True,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]


def echo(port: int, ae_title: str = "SYNTHNODE", calling: str = "TESTSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def frames_of(ds: Dataset) -> np.ndarray:
    """Stored values with a frame axis, decoded by pydicom itself (YBR as RGB)."""
    arr = ds.pixel_array
    samples = int(ds.SamplesPerPixel)
    return arr.reshape((int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns)
                       + ((samples,) if samples > 1 else ()))


def dataset_bytes(file_bytes: bytes) -> bytes:
    """The encoded data set of a DICOM file, without preamble and file meta."""
    f = BytesIO(file_bytes)
    read_preamble(f, False)
    _read_file_meta_info(f)
    return file_bytes[f.tell() :]


def send_raw(port: int, files: list[Path], sop_classes: list[str] | None = None,
             ae_title: str = "SYNTHNODE", calling: str = "RAWSCU") -> list[int]:
    """C-STORE files exactly as they are on disk (never re-encoded, so broken files stay
    broken) over one pynetdicom association; their statuses. ``sop_classes`` default to the
    files' own (read from their headers)."""
    if sop_classes is None:
        sop_classes = [str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files]
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=calling)
        for sop_class in dict.fromkeys(sop_classes):
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(f).Status) for f in files]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def storescu(
    port: int, files: list[Path], ae_title: str = "SYNTHNODE", calling: str = "STORESCU",
    extra: list[str] | None = None, timeout_s: float = 120,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu over one association, proposing each file's own transfer syntax."""
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [dcmtk("storescu"), "-R", "-aet", calling, "-aec", ae_title, *(extra or []), "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout_s, env=env,
    )


class StoreSCP:
    """dcmtk's storescp in bit-preserving mode: the reference for what a peer sent."""

    ae_title = "STORESCP"

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "+B", "+xa", "-aet", self.ae_title, "-od", str(folder), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        deadline = time.monotonic() + 20
        while not echo(port, self.ae_title):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("storescp did not start")
            time.sleep(0.1)

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
