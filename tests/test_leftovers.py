"""The test suite leaves no process behind: a run that does fails, naming and killing it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from node.localorthanc import dcmtk, free_port


def test_a_run_that_leaves_a_process_behind_fails_naming_it(tmp_path: Path) -> None:
    port = free_port()
    # An orphan (its shell exits at once: it is no longer a descendant of the run, only its
    # environment says whose it is) and a child started with a clean environment.
    (tmp_path / "test_leaky.py").write_text(
        "import subprocess\n"
        "def test_leaks():\n"
        f"    subprocess.run(['sh', '-c', '{dcmtk('storescp')} {port} >/dev/null 2>&1 &'], "
        "check=True)\n"
        f"    subprocess.Popen(['{dcmtk('storescp')}', '{free_port({port})}'], env={{}})\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider",
         str(tmp_path / "test_leaky.py")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed" in out.stdout
    assert "the test run left 2 process(es) behind (now killed)" in out.stderr
    assert out.stderr.count(f"{dcmtk('storescp')} ") == 2
    found = subprocess.run(["pgrep", "-f", f"storescp {port}$"], capture_output=True)
    assert found.returncode == 1, "the leftover was not killed"

