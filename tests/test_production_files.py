"""The files shipped for production (config/systemd, config/logrotate, config/prometheus) are
valid for the tools that read them, and their commands are commands synthnode has."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "config" / "systemd").glob("*.service"))
SYNTHNODE = Path(sys.executable).parent / "synthnode"


def _exec_start(unit: Path) -> list[str]:
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_units_are_shipped() -> None:
    assert {u.name for u in UNITS} == {"synthnode.service", "synthnode-worker@.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_commands_are_synthnode_commands(unit: Path, tmp_path: Path) -> None:
    argv = _exec_start(unit)
    assert argv[0] == "/opt/synthnode/.venv/bin/synthnode"
    config = tmp_path / "node.toml"
    config.write_text("rules = []\n")
    argv = [str(SYNTHNODE), *argv[1:]]
    argv[argv.index("/etc/synthnode/node.toml")] = str(config)
    argv = [a.replace("%i", "gpu") for a in argv]
    # --help after the command's own arguments: argparse checks them, then prints the help
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: synthnode" in out.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_pass_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    text = unit.read_text().replace("/opt/synthnode/.venv/bin/synthnode", str(SYNTHNODE))
    name = unit.name.replace("@.service", "@gpu.service")
    copy = tmp_path / name
    copy.write_text(text)
    if "@" in unit.name:
        (tmp_path / unit.name).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if str(tmp_path) in line or "synthnode" in line]
    assert not problems, "\n".join(problems)


def test_logrotate_config_parses(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(logrotate).exists():
        pytest.skip("no logrotate")
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "serve.log").write_text("x\n")
    text = (ROOT / "config" / "logrotate" / "synthnode").read_text()
    text = text.replace("/var/log/synthnode", str(logs)).replace("su synthnode synthnode", "")
    conf = tmp_path / "synthnode"
    conf.write_text(text)
    out = subprocess.run([logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stderr.lower(), out.stderr
    assert str(logs / "serve.log") in out.stderr + out.stdout


def test_prometheus_scrape_config_names_the_console_port() -> None:
    from node.config import ConsoleSettings

    text = (ROOT / "config" / "prometheus" / "synthnode.yml").read_text()
    assert "metrics_path: /metrics" in text
    assert f'"127.0.0.1:{ConsoleSettings().port}"' in text
