"""A private Orthanc (Debian's package) with its own JSON config, storage and free ports: for
``synthnode demo``, the tests and the benchmarks.

Standard library only. Callers run it inside a private network namespace
(:func:`node.netns.isolate_network`): Orthanc 1.10 cannot listen on loopback only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

HOST = "127.0.0.1"


def dcmtk(tool: str) -> str:
    """dcmtk's program (Debian's package), not pynetdicom's console script of the same name
    that a virtual environment puts first on PATH; FileNotFoundError when it is missing."""
    path = shutil.which(tool, path="/usr/bin:/usr/local/bin")
    if path is None:
        raise FileNotFoundError(f"dcmtk's {tool} is not installed (Debian package dcmtk: "
                                "run .ci/setup)")
    return path


USER_METADATA = {"SynthnodeJob": 1024, "SynthnodeTask": 1025}
"""The user metadata synthnode writes ([orthanc] job_metadata / task_metadata defaults)."""

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb)."""
DICOMWEB_ROOT = "/dicom-web/"


def free_port(avoid: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 free right now, not in ``avoid``."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in (avoid or set()):
            return port


class OrthancProcess:
    """Orthanc (Debian's 1.10) as a child process; storage survives :meth:`stop`/:meth:`start`.

    With ``username`` set, HTTP authentication is on and that user is the only registered one.
    With ``dicomweb``, the DICOMweb plugin serves QIDO-RS, WADO-RS and STOW-RS at
    :attr:`dicomweb_url` (FileNotFoundError when orthanc-dicomweb is not installed).
    ``overrides`` replace or add top-level keys of the generated configuration.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        username: str | None = "synthnode",
        password: str = "s3cret-test-pw",
        http_port: int | None = None,
        dicom_port: int | None = None,
        dicomweb: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is not "
                                    "installed (Debian package orthanc-dicomweb: run .ci/setup)")
        self.workdir = workdir
        self.aet = aet
        self.username = username
        self.password = password
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port({self.http_port})
        self.storage = workdir / "storage"
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config: dict[str, Any] = {
            "Name": "synthnode-test",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": username is not None,
            "RegisteredUsers": {username: password} if username is not None else {},
            "UserMetadata": dict(USER_METADATA),
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "SyncStorageArea": True,
            "StableAge": 3600,
            **({"DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT}} if dicomweb else {}),
            **(overrides or {}),
        }

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (with ``dicomweb``)."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    started: ClassVar[set[OrthancProcess]] = set()
    """Every instance started in this process and not yet stopped (see :meth:`stop_all`)."""

    @classmethod
    def stop_all(cls) -> None:
        """Kill every Orthanc this process started and has not stopped (a test's cleanup)."""
        for proc in list(cls.started):
            proc.stop(kill=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start Orthanc and wait until ``/system`` answers; RuntimeError with its log if not."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("Orthanc is already running")
        OrthancProcess.started.add(self)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["Orthanc", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, TCP_NODELAY="1"),  # else ~40 ms per C-STORE (Nagle)
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                status, self.proc = self.proc.returncode, None
                raise RuntimeError(f"Orthanc exited with status {status}:\n{self.log()[-3000:]}")
            if self._http_up():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout_s} s:\n"
                           f"{self.log()[-3000:]}")

    def stop(self, timeout_s: float = 30.0, kill: bool = False) -> int | None:
        """SIGTERM (Orthanc takes ~3.5 s to stop), then SIGKILL after ``timeout_s``; with
        ``kill``, SIGKILL at once (a crash). The exit status (None if killed or not running).
        Storage and index are kept."""
        proc, self.proc = self.proc, None
        OrthancProcess.started.discard(self)
        if proc is None:
            return None
        status: int | None = proc.poll()
        if status is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                status = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        return status

    def restart(self, timeout_s: float = 30.0) -> None:
        self.stop(timeout_s)
        self.start(timeout_s)

    # -- REST, for checks ------------------------------------------------------------------

    def request(self, method: str, path: str, data: bytes | None = None,
                timeout_s: float = 5.0) -> bytes:
        """One HTTP request with the registered credentials; urllib.error.HTTPError on 4xx/5xx."""
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout_s) as rsp:
            return bytes(rsp.read())

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def count_instances(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        found = json.loads(self.request("POST", "/tools/lookup", sop_instance_uid.encode()))
        ids = [f["ID"] for f in found if f.get("Type") == "Instance"]
        return ids[0] if ids else None

    def _http_up(self) -> bool:
        try:
            self.request("GET", "/system", timeout_s=1.0)
        except (OSError, urllib.error.URLError):
            return False
        return True
