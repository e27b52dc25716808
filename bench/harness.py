"""What every benchmark shares: its main (private network namespace, temporary folder, child
process teardown), CPU accounting and quiet-machine waits, the node under test and the
reference servers (dcmtk storescp, Orthanc) as child processes, dcmtk storescu, ``node/`` at a
git revision, and the report's and JSON document's common parts.

The scenario scripts (``bench/ingest.py``, ...) keep only what they measure. Importing this
module puts the repository root on ``sys.path`` (the scripts import ``node``). The scripts are
run as ``.venv/bin/python bench/X.py``, so ``bench/`` is on ``sys.path`` and this is
``harness``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.localorthanc import HOST, OrthancProcess, free_port  # noqa: E402
from node.localorthanc import dcmtk as find_dcmtk  # noqa: E402
from node.netns import interfaces, isolate_network  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
KEY_ENV = "SYNTHNODE__DEID__KEY"
"""The node's de-identification key, from the environment."""
SCU_AET = "BENCHSCU"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 30.0
POLL_S = 0.1
WORKERS_TIMEOUT_S = 60.0
SETTLE_WINDOW_S = 2.0
SETTLE_BUSY = 0.15
FOREIGN_WARN = 0.10
"""Above this share of the CPUs used by other work while timed, a figure is suspect."""
CPUS = os.cpu_count() or 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

LIVE_PROCESSES: set[subprocess.Popen[bytes]] = set()
"""Children started and not yet stopped: ``run_main`` stops whatever is left, however it
ends."""


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


class NotAvailable(Exception):
    """This tool cannot be measured here; the message says why (reported as n/a)."""


# -- main ------------------------------------------------------------------------------------


class Network(StrEnum):
    """Where a benchmark's processes run."""

    PRIVATE = "private"
    """A private network namespace with only loopback, or the benchmark does not run."""
    PRIVATE_IF_POSSIBLE = "private-if-possible"
    """A private network namespace where the kernel allows one, else the machine's network."""
    HOST = "host"
    """The machine's network (nothing listens, nothing is fetched)."""


def isolated() -> bool:
    """Whether this process sees loopback only (a private network namespace)."""
    return interfaces() == ["lo"]


def isolate(script: str, network: Network) -> None:
    """Put this process, and the children it starts later, in a private network namespace
    (:func:`node.netns.isolate_network`) as ``network`` asks; with ``Network.PRIVATE``, exit
    naming ``script`` when that cannot be done."""
    if network is Network.HOST:
        return
    try:
        isolate_network()
    except OSError as exc:
        if network is Network.PRIVATE:
            sys.exit(f"{script}: {exc.strerror}")
        return
    if network is Network.PRIVATE and not isolated():
        sys.exit(f"{script}: not in a private network namespace (interfaces: {interfaces()}); "
                 "unset SYNTHNODE_ISOLATED so the script isolates itself")


def raise_on_sigterm(sig: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {sig}")


def run_main(script: str, body: Callable[[Path], None], *, tmp_prefix: str,
             network: Network = Network.PRIVATE, group: bool = False, keep: bool = False,
             error_lead: str = "") -> int:
    """A benchmark's ``main`` after its arguments: isolate (:func:`isolate` with ``network``),
    then run ``body`` with a new temporary folder; whatever happens, stop the children left
    (:func:`stop_leftovers` with ``group``) and remove the folder (or, with ``keep``, say where
    it is). The exit status: 0, 1 after a BenchError, 130 after SIGINT or SIGTERM.
    ``error_lead`` goes before the error message (``"\\n"``)."""
    isolate(script, network)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix=tmp_prefix))
    try:
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


# -- children --------------------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    """Environment for every child: Nagle off for dcmtk and Orthanc (else ~40 ms per
    C-STORE)."""
    return dict(os.environ, TCP_NODELAY="1")


def dcmtk(tool: str) -> str:
    """dcmtk's program by path (the venv's pynetdicom scripts of the same names differ)."""
    try:
        return find_dcmtk(tool)
    except FileNotFoundError as exc:
        raise BenchError(str(exc)) from None


def synthnode_exe() -> str:
    """The ``synthnode`` script beside this Python, else the one on PATH."""
    exe = Path(sys.executable).with_name("synthnode")
    return str(exe) if exe.exists() else "synthnode"


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


def probe(cmd: list[str], env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A short command that must not hang (``--help``, ``--version``)."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)}: not done after {PROBE_TIMEOUT_S:.0f} s") from None


def wait_until(check: Callable[[], bool], what: str, timeout_s: float,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``check`` until it is true; BenchError after ``timeout_s`` or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with status {proc.returncode}")
        if check():
            return
        time.sleep(POLL_S)
    raise BenchError(f"{what}: not done after {timeout_s:.0f} s")


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the node's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                kids.append(int(entry.name))
    return kids


# -- CPU accounting and quiet-machine waits --------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) / CLK_TCK


def process_cpu_s(pid: int | None) -> float:
    """utime + stime of one process (0.0 once it is gone, or for None)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def usage_s(who: int) -> float:
    """CPU seconds of ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN`` (those waited for)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    return usage_s(resource.RUSAGE_SELF) + usage_s(resource.RUSAGE_CHILDREN)


class PartsMeter:
    """CPU seconds per named part over one measurement (each part a function giving the CPU
    seconds it has used so far), plus "other": the machine's busy time minus all the parts
    (someone else's work)."""

    def __init__(self, parts: dict[str, Callable[[], float]]) -> None:
        self.parts = parts

    def read(self) -> dict[str, float]:
        return {**{name: part() for name, part in self.parts.items()},
                "machine": machine_busy_s()}

    def start(self) -> None:
        self.before = self.read()

    def stop(self) -> dict[str, float]:
        after = self.read()
        used = {k: after[k] - self.before[k] for k in after}
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return used


class ForeignLoad:
    """How much CPU the rest of the machine used while a tool ran: machine busy seconds minus
    this script's and its children's (plus ``extra_pid``'s, a server that is not waited for)."""

    def __init__(self, extra_pid: int | None = None) -> None:
        self.extra_pid = extra_pid

    def __enter__(self) -> ForeignLoad:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_s()
        self.own0 = own_cpu_s() + process_cpu_s(self.extra_pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        own = own_cpu_s() + process_cpu_s(self.extra_pid) - self.own0
        self.foreign_s = max(0.0, machine_busy_s() - self.busy0 - own)

    @property
    def share(self) -> float:
        """Foreign CPU as a fraction of all CPU time available during the interval."""
        return self.foreign_s / max(1e-9, self.seconds * CPUS)


def settle(max_wait_s: float, busy_below: float = SETTLE_BUSY) -> float:
    """Wait (at most ``max_wait_s``) until the machine was less than ``busy_below`` busy over
    one ``SETTLE_WINDOW_S`` window (other people's tests share these CPUs); the last busy
    fraction seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        time.sleep(SETTLE_WINDOW_S)
        busy = (machine_busy_s() - before) / (SETTLE_WINDOW_S * CPUS)
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


def settle_or_warn(max_wait_s: float) -> float:
    """:func:`settle`, saying so when the machine is still busy; the busy fraction."""
    busy = settle(max_wait_s)
    if busy >= SETTLE_BUSY:
        print(f"  (machine still {100 * busy:.0f} % busy after {max_wait_s:g} s: measuring "
              "anyway)", flush=True)
    return busy


def load_note(share: float) -> str:
    """", other load N %" for a run's line, flagged above ``FOREIGN_WARN``."""
    note = f", other load {100 * share:.0f} %"
    if share > FOREIGN_WARN:
        note += " (busy machine: figures suspect)"
    return note


# -- node/ at a git revision -----------------------------------------------------------------


def node_snapshot(rev: str, dest: Path) -> Path:
    """``node/`` as committed at ``rev``, extracted under ``dest`` (for when the working tree's
    node/ is being edited): put first on PYTHONPATH, it wins over the editable install."""
    import io
    import tarfile

    try:
        done = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "node"],
                              capture_output=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"git archive {rev}: {exc}") from None
    if done.returncode != 0:
        raise BenchError(f"git archive {rev} node: {done.stderr.decode(errors='replace')}")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def detect_text_arg(value: str) -> bool | None:
    """``--detect-text``: "true", "false", or "default" (the node's own default)."""
    if value not in ("true", "false", "default"):
        raise argparse.ArgumentTypeError('--detect-text is "true", "false" or "default"')
    return None if value == "default" else value == "true"


def use_node_rev(rev: str | None, dest: Path) -> str | None:
    """With ``rev``: put ``node/`` as committed at ``rev`` (:func:`node_snapshot` under
    ``dest``) first on this process's PYTHONPATH, which its children inherit, and say so; the
    commit (None without ``rev`` or if git cannot name it)."""
    if not rev:
        return None
    snapshot = node_snapshot(rev, dest)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(snapshot), *filter(None, [os.environ.get("PYTHONPATH")])])
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    print(f"node/ as committed at {rev} ({commit[:12]}), from {snapshot}")
    return commit or None


# -- servers: the node under test and the reference receivers ---------------------------------


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def c_echo(ae_title: str, port: int) -> bool:
    """Whether a C-ECHO (dcmtk echoscu) to ``ae_title`` on 127.0.0.1:``port`` succeeds."""
    cmd = [dcmtk("echoscu"), "-aet", SCU_AET, "-aec", ae_title, "-to", "2", "-ta", "2", HOST,
           str(port)]
    try:
        done = subprocess.run(cmd, env=tool_env(), capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def storescu(ae_title: str, port: int, files: Sequence[Path], timeout_s: float,
             to: str) -> tuple[float, float]:
    """dcmtk storescu of ``files`` (a folder: every file below it, ``+sd``) over one
    association, in order, to ``to`` (named in errors); (perf_counter at start, at exit)."""
    cmd = [dcmtk("storescu"), "-aet", SCU_AET, "-aec", ae_title,
           "-R",  # propose only the contexts the files need (with their own transfer syntax)
           "-to", "10", "-ts", "60"]
    if len(files) == 1 and files[0].is_dir():
        cmd.append("+sd")
    cmd += [HOST, str(port), *map(str, files)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"storescu to {to}: not done after {timeout_s:.0f} s") from None
    ended = time.perf_counter()
    if done.returncode != 0:
        raise BenchError(f"storescu to {to} exited {done.returncode}:\n"
                         f"{done.stderr[-2000:]}{done.stdout[-2000:]}")
    return started, ended


def launch_orthanc(orthanc: OrthancProcess, timeout_s: float = START_TIMEOUT_S
                   ) -> subprocess.Popen[bytes]:
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


class Receiver:
    """A receiving server started as a child process with its own storage under ``workdir``."""

    name = ""
    ae_title = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def count_received(self) -> int:
        raise NotImplementedError

    def prepare(self) -> None:
        self.storage.mkdir(parents=True)

    def wait_ready(self) -> None:
        """Until a C-ECHO succeeds; BenchError with the log's tail if it does not."""
        try:
            wait_until(lambda: c_echo(self.ae_title, self.port),
                       f"{self.name}: C-ECHO on port {self.port}", START_TIMEOUT_S, self.proc)
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {self.log_path} ---\n{tail(self.log_path)}") from None

    def start(self) -> None:
        self.prepare()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), env=tool_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        LIVE_PROCESSES.add(self.proc)
        self.wait_ready()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; the exit status (None if killed)."""
        proc, self.proc = self.proc, None
        return None if proc is None else terminate(proc)


class StorescpReceiver(Receiver):
    """dcmtk ``storescp``: one process, writes files, never fsyncs."""

    name = "storescp"
    ae_title = "STORESCP"

    def command(self) -> list[str]:
        return [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.storage), str(self.port)]

    def count_received(self) -> int:
        return sum(1 for p in self.storage.iterdir() if p.is_file())


class OrthancReceiver(Receiver):
    """Orthanc started by :class:`OrthancProcess` (one piece of Orthanc start-up code),
    without authentication."""

    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        http_port = free_port({self.port})
        self.orthanc = OrthancProcess(
            workdir, aet=self.ae_title, username=None, http_port=http_port,
            dicom_port=self.port, overrides={"Name": "synthnode-bench"},
        )
        assert self.orthanc.storage == self.storage and self.orthanc.log_path == self.log_path

    def start(self) -> None:
        self.proc = launch_orthanc(self.orthanc)  # once HTTP /system answers
        self.wait_ready()

    def count_received(self) -> int:
        return self.orthanc.count_instances()


READ_JOBS = """\
import json, sys
from node.config import load_settings
from node.jobs import Queues
jobs = Queues(load_settings(sys.argv[1], environ={}).jobs).store.all()
print(json.dumps([json.loads(j.to_json()) for j in jobs]))
"""


@dataclass(frozen=True)
class Job:
    """What the benchmarks read of a job record."""

    FIELDS = ("id", "state", "created_at", "updated_at", "outputs", "quarantined",
              "last_error")
    id: str
    state: str
    created_at: float
    updated_at: float
    outputs: int
    quarantined: int
    last_error: str


@dataclass(frozen=True)
class NodeOptions:
    """The node's settings a benchmark sets; None: not written (the node's default)."""

    cpu_workers: int = 0
    stable_after_s: float = 3600.0
    check_interval_s: float | None = None
    max_pdu_bytes: int | None = None
    deid_key: str | None = None
    console_port: int | None = None
    """The operator console's port; None: the console off (the receiver alone)."""
    detect_text: bool | None = None
    """``[deid] detect_text`` (text burned into pixels); None: the node's default (on)."""


class NodeServer(Receiver):
    """``synthnode serve`` (spool with ``fsync = true``, no GPU workers) with ``options``;
    ``tables``: the TOML of its rules and destinations, None for ``rules = []`` (it routes
    nothing)."""

    name = "node"
    ae_title = "SYNTHNODE"

    def __init__(self, workdir: Path, options: NodeOptions = NodeOptions(),
                 tables: list[str] | None = None) -> None:
        super().__init__(workdir)
        self.options = options
        self.tables = tables
        self.config = workdir / "node.toml"

    def prepare(self) -> None:
        super().prepare()
        o = self.options
        lines = ["rules = []"] if self.tables is None else []
        lines += ["[node]", f'ae_title = "{self.ae_title}"', f'host = "{HOST}"',
                  f"port = {self.port}"]
        if o.max_pdu_bytes is not None:
            lines.append(f"max_pdu_bytes = {o.max_pdu_bytes}")
        lines += ["[spool]", f'dir = "{self.storage}"', "fsync = true",
                  f"stable_after_s = {o.stable_after_s}"]
        if o.check_interval_s is not None:
            lines.append(f"check_interval_s = {o.check_interval_s}")
        lines += ["[jobs]", f"cpu_workers = {o.cpu_workers}", "gpu_workers = 0"]
        if o.deid_key is not None or o.detect_text is not None:
            lines.append("[deid]")
            if o.deid_key is not None:
                lines.append(f'key = "{o.deid_key}"')
            if o.detect_text is not None:
                lines.append(f"detect_text = {'true' if o.detect_text else 'false'}")
        lines += ["[console]", f"enabled = {'true' if o.console_port else 'false'}"]
        if o.console_port:
            lines += [f"port = {o.console_port}", f'db = "{self.workdir / "console.db"}"']
        self.config.write_text("\n".join(lines + (self.tables or [])) + "\n")

    def command(self) -> list[str]:
        return [synthnode_exe(), "--config", str(self.config), "serve"]

    def start(self) -> None:
        super().start()
        wanted = self.options.cpu_workers
        if not wanted:
            return
        # Worker processes inherit the node's log; measure once each has started consuming.
        deadline = time.monotonic() + WORKERS_TIMEOUT_S
        while self.log_path.read_text(errors="replace").count("worker for queue cpu") < wanted:
            if time.monotonic() > deadline:
                raise BenchError(f"node: {wanted} cpu workers not started after "
                                 f"{WORKERS_TIMEOUT_S:.0f} s\n{tail(self.log_path)}")
            time.sleep(0.1)
        time.sleep(0.5)  # let the consumers reach their first poll

    def count_received(self) -> int:
        return sum(1 for p in self.storage.rglob("*.dcm") if ".tmp" not in p.parts)

    def jobs(self) -> list[Job]:
        """The node's job records, read by the node's own code (a child process: the code
        under test, which ``--node-rev`` may have put first on PYTHONPATH)."""
        try:
            done = subprocess.run([sys.executable, "-c", READ_JOBS, str(self.config)],
                                  capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise BenchError("reading the job records: no answer after 60 s") from None
        if done.returncode != 0:
            raise BenchError(f"reading the job records failed:\n{done.stderr[-2000:]}")
        return [Job(**{k: v for k, v in record.items() if k in Job.FIELDS})
                for record in json.loads(done.stdout)]


# -- test data -------------------------------------------------------------------------------


def load_template(name: str) -> Any:
    """pydicom's test file ``name``, read (a pydicom Dataset)."""
    from pydicom import dcmread

    from node.samples import sample_file

    try:
        return dcmread(sample_file(name))
    except FileNotFoundError as exc:
        raise BenchError(str(exc)) from None


# -- report and JSON -------------------------------------------------------------------------


def first_line(cmd: list[str]) -> str:
    """The first non-blank line ``cmd`` prints (a version), "?" if none."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return next((line.strip(" $") for line in out.splitlines() if line.strip(" $")), "?")


def environment(*packages: str, dcmtk_version: bool = False, orthanc_version: bool = False,
                **extra: Any) -> dict[str, Any]:
    """What the figures were measured with: synthnode's and ``packages``' versions, Python's,
    dcmtk's and Orthanc's where asked, the kernel, the CPUs, and ``extra``."""
    env: dict[str, Any] = {"synthnode": version("synthnode")}
    env |= {name: version(name) for name in packages}
    env["python"] = platform.python_version()
    if dcmtk_version:
        env["dcmtk"] = first_line([dcmtk("storescu"), "--version"])
    if orthanc_version:
        env["orthanc"] = first_line(["Orthanc", "--version"])
    return env | {"kernel": platform.release(), "cpus": os.cpu_count()} | extra


def dicom_environment() -> dict[str, Any]:
    """:func:`environment` of the DICOM benchmarks: pynetdicom, pydicom, dcmtk, Orthanc."""
    return environment("pynetdicom", "pydicom", dcmtk_version=True, orthanc_version=True)


def print_header(header: str) -> None:
    """A table's header line, underlined."""
    print(header)
    print("-" * len(header))


def goal_state(met: bool | None) -> str:
    """A goal line's verdict: "met", "NOT met", or "n/a" (not measured)."""
    return "n/a" if met is None else "met" if met else "NOT met"


def print_goals(goal_text: str, goals: list[dict[str, Any]], width: int, unit: str = "") -> None:
    """The goal and one line per check (``what``, ``value``, ``met``): its value with ``unit``
    and its verdict."""
    print(goal_text)
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.2f}{unit}"
        print(f"  {g['what']:<{width}} {value:>6}  {goal_state(g['met'])}")


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``; "n/a" for None."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write the JSON result document, making its folder if needed, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")


# -- command line ----------------------------------------------------------------------------


def subset(parser: argparse.ArgumentParser, option: str, text: str,
           choices: tuple[str, ...]) -> list[str]:
    """The names in a comma-separated option value; a usage error if one is not in
    ``choices`` or there are none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = set(names) - set(choices)
    if unknown or not names:
        parser.error(f"{option}: unknown {sorted(unknown)}; choose from {', '.join(choices)}")
    return names


def add_out_option(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """--out: where the JSON document goes."""
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"JSON file ({default_out})")


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
    add_out_option(parser, default_out)
