"""What the benchmarks share: the private network namespace, child process teardown, Orthanc
start and stop, test data copies, and a few small helpers.

Importing this module puts the repository root on ``sys.path`` (the scripts import
``tests.orthancproc``: Orthanc is started by one piece of code). The scripts are run as
``.venv/bin/python bench/X.py``, so ``bench/`` is on ``sys.path`` and this is ``common``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom import Dataset

    from node.localorthanc import OrthancProcess

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NETNS_ENV = "SYNTHNODE_BENCH_NETNS"
STOP_TIMEOUT_S = 30.0

LIVE_PROCESSES: set[subprocess.Popen[bytes]] = set()
"""Children started and not yet stopped: ``main`` stops whatever is left, however it ends."""


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


# -- isolation -------------------------------------------------------------------------------


def enter_private_netns(script: str, needs: str, env_var: str = NETNS_ENV) -> None:
    """Re-execute this script inside a new network namespace with only ``lo`` up.

    ``script`` names the script in messages (``bench/ingest.py``); ``needs`` says what runs
    under ``unshare --net`` (``its servers``); ``env_var`` marks the re-executed process."""
    if os.environ.get(env_var) == "1":
        return
    if os.geteuid() != 0:
        sys.exit(f"{script}: needs root (it runs {needs} under `unshare --net`)")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"{script}: `{tool}` not found on PATH")
    os.environ[env_var] = "1"
    path = os.path.abspath(sys.argv[0])
    os.execvp(
        "unshare",
        ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, path, *sys.argv[1:]],
    )


def check_isolated(env_var: str = NETNS_ENV) -> None:
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise BenchError(f"not in a private network namespace (interfaces: {names}); "
                         f"run without {env_var}=1 so the script isolates itself")


# -- children --------------------------------------------------------------------------------


def terminate(proc: subprocess.Popen[bytes], group: bool = False) -> int | None:
    """SIGTERM (to its process group with ``group``), SIGKILL after ``STOP_TIMEOUT_S``; the
    exit status (None if killed)."""
    status: int | None = proc.poll()
    if status is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            status = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        except ProcessLookupError:
            status = proc.wait(STOP_TIMEOUT_S)
    LIVE_PROCESSES.discard(proc)
    return status


def stop_leftovers(group: bool = False) -> None:
    """Stop every child still running (after an error or an interruption); ``group``: each
    with its process group."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # finish cleaning up before going away
    for proc in list(LIVE_PROCESSES):
        terminate(proc, group=group)


def raise_on_sigterm(sig: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {sig}")


def run_isolated(script: str, needs: str, body: Callable[[Path], None], *, tmp_prefix: str,
                 group: bool = False, keep: bool = False, error_lead: str = "") -> int:
    """A benchmark's ``main`` after its arguments: re-execute in a private network namespace
    (:func:`enter_private_netns`), then run ``body`` with a new temporary folder; whatever
    happens, stop the children left (:func:`stop_leftovers` with ``group``) and remove the
    folder (or, with ``keep``, say where it is). The exit status: 0, 1 after a BenchError, 130
    after SIGINT or SIGTERM. ``error_lead`` goes before the error message (``"\n"``)."""
    enter_private_netns(script, needs)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix=tmp_prefix))
    try:
        check_isolated()
        body(root)
    except BenchError as exc:
        print(f"{error_lead}{script}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{error_lead}{script}: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_leftovers(group)
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def launch_orthanc(orthanc: OrthancProcess, timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``orthanc`` (BenchError if it does not come up) and count it among the children
    to stop; its process."""
    try:
        orthanc.start(timeout_s)
    except RuntimeError as exc:
        raise BenchError(f"orthanc: {exc}") from None
    proc = orthanc.proc
    assert proc is not None
    LIVE_PROCESSES.add(proc)
    return proc


def stop_orthanc(orthanc: OrthancProcess, kill: bool = True) -> None:
    """Stop ``orthanc``: with ``kill`` SIGKILL at once (its storage is temporary: no need for
    its ~3.5 s graceful stop), else SIGTERM, SIGKILL after ``STOP_TIMEOUT_S``."""
    proc = orthanc.proc
    orthanc.stop(STOP_TIMEOUT_S, kill=kill)
    if proc is not None:
        LIVE_PROCESSES.discard(proc)


def dcmtk(tool: str) -> str:
    """dcmtk's program by path (the venv's pynetdicom scripts of the same names differ)."""
    from node.localorthanc import dcmtk as find

    try:
        return find(tool)
    except FileNotFoundError as exc:
        raise BenchError(str(exc)) from None


# -- test data -------------------------------------------------------------------------------


def load_template(name: str) -> Dataset:
    """pydicom's test file ``name``, read."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise BenchError(f"pydicom test file {name} not found (install pydicom-data)")
    return dcmread(path)


def save_copies(ds: Dataset, count: int, path_of: Callable[[int], Path]) -> list[Path]:
    """``count`` copies of ``ds``, copy i saved as ``path_of(i)`` with a new SOP Instance UID
    and Instance Number i + 1; their paths."""
    from pydicom.uid import generate_uid

    paths = []
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = path_of(i)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- small helpers ---------------------------------------------------------------------------


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def first_line(cmd: list[str]) -> str:
    """The first non-blank line ``cmd`` prints (a version), "?" if none."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return next((line.strip(" $") for line in out.splitlines() if line.strip(" $")), "?")


def subset(parser: argparse.ArgumentParser, option: str, text: str,
           choices: tuple[str, ...]) -> list[str]:
    """The names in a comma-separated option value; a usage error if one is not in
    ``choices`` or there are none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = set(names) - set(choices)
    if unknown or not names:
        parser.error(f"{option}: unknown {sorted(unknown)}; choose from {', '.join(choices)}")
    return names


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Write the JSON result document, making its folder if needed, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")


def add_run_options(parser: argparse.ArgumentParser, default_out: Path,
                    settle_s: float = 60.0) -> None:
    """The options mirror.py and pipeline.py share: --settle, --node-rev, --keep, --out."""
    parser.add_argument("--settle", type=float, default=settle_s,
                        help="before each run, wait up to this long for the CPUs to be quiet "
                             f"({settle_s:g})")
    parser.add_argument("--node-rev", default=None,
                        help="run node/ as committed at this git revision (e.g. HEAD), not "
                             "the working tree's (for when node/ is mid-edit)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (logs)")
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"JSON file ({default_out})")
