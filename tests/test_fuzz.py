"""The fuzz targets (tests/fuzz/): every input that once broke one is replayed, and each
target runs under libFuzzer (atheris) for a bounded time from its seed corpus without a
finding."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import REGRESSIONS, replay

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("walker", "deid", "config")

# Seconds of fuzzing per target (the CI budget is 75 s for all three), the longest one input
# may take, and the memory a run may hold.
BUDGET_S = {"walker": 10, "deid": 25, "config": 10}
INPUT_TIMEOUT_S = {"walker": 10, "deid": 20, "config": 10}
RSS_LIMIT_MB = 3072


@pytest.mark.parametrize("target", TARGETS)
def test_saved_findings_stay_fixed(target: str) -> None:
    module = importlib.import_module(f"tests.fuzz.fuzz_{target}")
    replayed = replay(module.one_input, target)
    assert replayed, f"no regression inputs under {REGRESSIONS / target}"


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzzing_finds_nothing(target: str, tmp_path: Path) -> None:
    import atheris  # noqa: F401 - a missing fuzzer fails the run (the test extra has it)
    corpus, artifacts = tmp_path / "corpus", tmp_path / "findings"
    artifacts.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    budget = BUDGET_S[target]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / f"fuzz_{target}.py"),
         f"--seeds={corpus}", f"-max_total_time={budget}",
         f"-timeout={INPUT_TIMEOUT_S[target]}", f"-rss_limit_mb={RSS_LIMIT_MB}",
         f"-artifact_prefix={artifacts}/"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=budget + 180,
    )
    found = sorted(artifacts.iterdir())
    tail = "\n".join(
        line for line in (proc.stdout + proc.stderr).splitlines()
        if not line.startswith("INFO: Instrumenting")
    )[-4000:]
    assert not found and proc.returncode == 0, (
        f"fuzz_{target} found {[p.name for p in found]} (rc {proc.returncode}): save the "
        f"input under {REGRESSIONS / target}/ and fix the bug\n{tail}"
    )
    assert "Done " in tail, tail  # libFuzzer ran its time out, it did not stop at start
    assert any(corpus.iterdir()), "no seed corpus was written"
