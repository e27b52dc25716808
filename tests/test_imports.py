"""The import graph follows the data flow.

    receive -> spool -> route -> jobs -> generate -> deid -> dicom -> archives

A stage (a subpackage of ``node/``) may import the stages after it, never one before it.
``deid | generate`` are alternatives in the flow; generate comes first here because generating
de-identifies its sources (and rules that de-identify name deid too: route imports it, which
the order allows). The top-level modules of ``node/`` are of two kinds:

- shared utilities (:data:`SHARED`: settings, UIDs, keys, TLS, pixel data, samples, the local
  Orthanc, network isolation, atomic files, the AE builder, error descriptions, the disk
  reserve, a periodic thread, the audit trail, the metrics, the package itself): any stage may
  import them; they import no stage and no entry point;
- entry points (:data:`ENTRY`: the command line, ``serve``, the process set-up, the preflight,
  the demo, the operator console): they wire the stages together and may import any of them;
  no stage imports them.

Every import counts: module-level, function-level and ``TYPE_CHECKING`` ones.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "node"
STAGES = ("receive", "spool", "route", "jobs", "generate", "deid", "dicom", "archives")
SHARED = {"__init__", "config", "uids", "keys", "tls", "pixeldata", "samples", "localorthanc",
          "files", "dicomnet", "errors", "reserve", "netns", "periodic", "audit", "metrics"}
ENTRY = {"__main__", "cli", "server", "process", "preflight", "demo", "console"}

PENDING: dict[tuple[str, str], str] = {}
"""Known imports against the flow, each waiting for its fix; a fixed one must leave this list."""


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved)."""
    package = ".".join(("node", *path.relative_to(NODE).parent.parts))
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            if module == "node":  # `from node import jobs` imports a stage
                found.update(f"node.{alias.name}" for alias in node.names)
    return found


def _part(module: str) -> str | None:
    """The stage or top-level module of ``node`` that ``module`` belongs to (None: not node)."""
    parts = module.split(".")
    if parts[0] != "node":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1] if (NODE / parts[1]).is_dir() or (NODE / f"{parts[1]}.py").is_file() \
        else None


def _against_the_flow() -> set[tuple[str, str]]:
    """(file under node/, module it imports) for every import the flow forbids."""
    bad: set[tuple[str, str]] = set()
    for path in sorted(NODE.rglob("*.py")):
        rel = path.relative_to(NODE)
        mine = rel.parts[0] if len(rel.parts) > 1 else path.stem
        for module in _imports(path):
            other = _part(module)
            if other is None or other == mine:
                continue
            if mine in STAGES:
                allowed = other in SHARED or (
                    other in STAGES and STAGES.index(other) > STAGES.index(mine))
            elif mine in SHARED:
                allowed = other in SHARED
            else:
                allowed = True  # an entry point wires everything
            if not allowed:
                bad.add((rel.as_posix(), module))
    return bad


def test_every_part_of_node_is_a_stage_a_shared_module_or_an_entry_point() -> None:
    parts = {p.name for p in NODE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    parts |= {p.stem for p in NODE.glob("*.py")}
    assert parts == set(STAGES) | SHARED | ENTRY


def test_no_stage_imports_one_before_it() -> None:
    bad = _against_the_flow()
    assert bad - set(PENDING) == set()
    assert set(PENDING) <= bad, f"fixed, remove from PENDING: {set(PENDING) - bad}"


LATER = ("node.route", "node.jobs", "node.deid", "node.generate", "node.dicom", "node.archives",
         "highdicom", "huey", "torch", "diffusers", "orthanc_api_client")


@pytest.mark.parametrize("stage", ["node.receive", "node.spool"])
def test_importing_an_early_stage_loads_nothing_after_it(stage: str) -> None:
    code = (f"import sys, {stage}; "
            f"print(sorted(m for m in {LATER!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]", out.stdout
