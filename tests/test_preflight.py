"""Key safety and the preflight (``synthnode check``, and ``serve`` refusing to start): each
planted problem is found and its fix named, against real Orthancs, sockets, mounts and serve."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from node.config import Settings, load_settings
from node.keys import MAKE_KEY, KeyRecord, key_fingerprint, key_problem
from node.localorthanc import OrthancProcess, free_port
from node.preflight import Level, Report, preflight
from tests.nodeproc import SYNTHNODE, write_config

KEY = "preflight-key-Tq4Wz9Lm2Rv7Xn1Pb6Kj0Hc3Gs8Fy5De"
OTHER_KEY = "preflight-other-Ns2Vb7Zq4Lr9Tx3Pm8Kw1Jc6Gy0Fd5Ae"
DEID_TO_ORTHANC = '[[rules]]\nname = "deid"\n[[rules.tasks]]\ntask = "deidentify"\n'
WEAK = ["short", "k" * 40, "test-key-" + "0" * 32, "passwordpasswordpasswordpassword",
        "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF"]


def test_weak_keys_are_refused_naming_the_rule_and_never_quoting_the_key() -> None:
    for key in WEAK:
        problem = key_problem(key)
        assert problem is not None, key
        assert "too weak" in problem and MAKE_KEY in problem
        assert key not in problem
    # What the message recommends passes, every time.
    assert all(key_problem(secrets.token_urlsafe(32)) is None for _ in range(200))
    assert all(key_problem(secrets.token_hex(32)) is None for _ in range(200))


def test_the_fingerprint_tells_keys_apart_and_reveals_nothing(tmp_path: Path) -> None:
    a, b = key_fingerprint(KEY), key_fingerprint(OTHER_KEY)
    assert a == key_fingerprint(KEY) and a != b and len(a) == 16
    record = KeyRecord(tmp_path)
    assert record.recorded() is None and record.mismatch(KEY) is None
    record.record(KEY)
    stored = record.path.read_text()
    assert KEY not in stored and json.loads(stored)["fingerprint"] == a
    assert record.mismatch(KEY) is None
    changed = record.mismatch(OTHER_KEY)
    assert changed is not None and "synthnode key rotate" in changed and "pseudonyms" in changed


# -- synthnode check, each planted problem ----------------------------------------------------


def settings_for(tmp_path: Path, rules: str = DEID_TO_ORTHANC, key: str | None = KEY,
                 **sections: dict[str, Any]) -> Settings:
    sections.setdefault("node", {}).setdefault("port", free_port())
    sections.setdefault("spool", {}).setdefault("dir", str(tmp_path / "spool"))
    sections.setdefault("jobs", {}).setdefault("sqlite_file", str(tmp_path / "queue.sqlite3"))
    sections["jobs"].setdefault("work_dir", str(tmp_path / "work"))
    sections.setdefault("output", {}).setdefault("quarantine_dir", str(tmp_path / "quarantine"))
    sections.setdefault("orthanc", {}).setdefault("url", f"http://127.0.0.1:{free_port()}")
    if key is not None:
        sections.setdefault("deid", {})["key"] = key
    return load_settings(write_config(tmp_path / "node.toml", sections, rules), environ={})


def orthanc_section(orthanc: OrthancProcess, **over: str) -> dict[str, Any]:
    return {"url": orthanc.url, "username": orthanc.username, "password": orthanc.password,
            **over}


def fatal(report: Report, check: str) -> str:
    """The one fatal finding whose check name contains ``check``."""
    found = [f for f in report.fatal if check in f.check]
    assert len(found) == 1, report.findings
    return found[0].message


def test_a_missing_key_is_fatal_naming_the_variable_and_how_to_make_one(tmp_path: Path) -> None:
    message = fatal(preflight(settings_for(tmp_path, key=None)), "deid key")
    assert "SYNTHNODE__DEID__KEY" in message and MAKE_KEY in message
    assert "rules deid de-identify" in message


def test_a_weak_key_is_fatal_without_printing_it(tmp_path: Path) -> None:
    weak = "Short-but-not-tiny-key"
    message = fatal(preflight(settings_for(tmp_path, key=weak)), "deid key")
    assert "at least 32" in message and weak not in message


def test_a_changed_key_is_fatal_until_rotated(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, key=OTHER_KEY)
    KeyRecord(settings.spool.dir).record(KEY)
    message = fatal(preflight(settings), "deid key")
    assert "changed" in message and "new pseudonyms and UIDs" in message
    assert "synthnode key rotate" in message and OTHER_KEY not in message
    env = dict(os.environ, SYNTHNODE__DEID__KEY=OTHER_KEY)
    before = subprocess.run([*SYNTHNODE, "--config", str(tmp_path / "node.toml"), "key",
                             "fingerprint"], capture_output=True, text=True, env=env, timeout=60)
    assert before.returncode == 1 and "DIFFERENT" in before.stdout
    rotated = subprocess.run([*SYNTHNODE, "--config", str(tmp_path / "node.toml"), "key",
                              "rotate"], capture_output=True, text=True, env=env, timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    assert key_fingerprint(OTHER_KEY) in rotated.stdout and "will not link" in rotated.stdout
    assert not preflight(settings).fatal


def test_an_orthanc_without_the_user_metadata_is_fatal(tmp_path: Path) -> None:
    plain = OrthancProcess(tmp_path / "plain", overrides={"UserMetadata": {}})
    plain.start()
    try:
        report = preflight(settings_for(tmp_path, orthanc=orthanc_section(plain)))
    finally:
        plain.stop(kill=True)
    message = fatal(report, "destination orthanc")
    assert "SynthnodeJob, SynthnodeTask" in message and '"UserMetadata"' in message
    assert "job_metadata" in message


def test_an_orthanc_with_a_wrong_password_is_fatal(tmp_path: Path,
                                                   orthanc: OrthancProcess) -> None:
    wrong = "not-the-password-4711"
    report = preflight(settings_for(tmp_path, orthanc=orthanc_section(orthanc, password=wrong)))
    message = fatal(report, "destination orthanc")
    assert "HTTP 401" in message and "SYNTHNODE__ORTHANC__PASSWORD" in message
    assert wrong not in message
    # The right password, and the declared metadata, pass.
    good = preflight(settings_for(tmp_path, orthanc=orthanc_section(orthanc)))
    assert not good.fatal, good.findings
    assert any("declares the user metadata" in f.message for f in good.findings)


def test_a_missing_model_folder_is_fatal(tmp_path: Path) -> None:
    rules = '[[rules]]\nname = "gen"\n[[rules.tasks]]\ntask = "text2img"\n'
    missing = tmp_path / "no-such-model"
    message = fatal(preflight(settings_for(tmp_path, rules=rules,
                                           generate={"model": str(missing)})), "model")
    assert str(missing) in message and "model_index.json" in message
    missing.mkdir()
    message = fatal(preflight(settings_for(tmp_path, rules=rules,
                                           generate={"model": str(missing)})), "model")
    assert "has no model_index.json" in message


def test_a_port_in_use_is_fatal(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = fatal(preflight(settings_for(tmp_path, node={"port": port})), "port")
    assert "in use" in message and "[node] port" in message


def test_a_full_disk_is_a_warning_naming_the_reserve(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        report = preflight(settings_for(tmp_path, spool={"dir": str(small / "spool")}))
        found = [f for f in report.warnings if f.check == "disk reserve"]
        assert len(found) == 1, report.findings
        assert "below the reserve" in found[0].message and "reserve_bytes" in found[0].message
        assert "0xA700" in found[0].message
        # Below a reserve of 1 MiB, 4 MiB free is fine.
        fine = preflight(settings_for(tmp_path, spool={"dir": str(small / "spool"),
                                                        "reserve_bytes": 1 << 20,
                                                        "reserve_percent": 0}))
        assert [f.level for f in fine.findings if f.check == "disk reserve"] == [Level.OK]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_unreachable_redis_is_fatal(tmp_path: Path) -> None:
    url = f"redis://:hidden-pw@127.0.0.1:{free_port()}/0"
    message = fatal(preflight(settings_for(tmp_path, jobs={"backend": "redis",
                                                           "redis_url": url})), "queue redis")
    assert "does not answer PING" in message and "redis_url" in message
    assert "hidden-pw" not in message


def test_a_missing_destination_password_is_fatal_where_a_rule_sends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESEARCH_PW", raising=False)
    rules = DEID_TO_ORTHANC + 'destinations = ["research"]\n'
    destination = '[[destinations]]\nname = "research"\nurl = "http://127.0.0.1:1"\n' \
                  'username = "u"\npassword_env = "RESEARCH_PW"\n'
    message = fatal(preflight(settings_for(tmp_path, rules=destination + rules)), "RESEARCH_PW")
    assert "export it" in message


# -- the command, and serve --------------------------------------------------------------------


def run_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SYNTHNODE, "--config", str(config), "check"], capture_output=True,
                          text=True, env=dict(os.environ, **env), timeout=120)


def test_check_passes_a_clean_config_and_fails_a_broken_one(
        tmp_path: Path, orthanc: OrthancProcess, storescp: Any) -> None:
    sections = {
        "node": {"port": free_port()}, "spool": {"dir": str(tmp_path / "spool")},
        "jobs": {"sqlite_file": str(tmp_path / "q.sqlite3"), "work_dir": str(tmp_path / "w")},
        "output": {"quarantine_dir": str(tmp_path / "quarantine")},
        "orthanc": {"url": orthanc.url, "username": orthanc.username},
    }
    peer = (f'[[destinations]]\nname = "peer"\nae_title = "{storescp.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {storescp.port}\n')
    config = write_config(tmp_path / "clean.toml", sections, peer + DEID_TO_ORTHANC)
    env = {"SYNTHNODE__DEID__KEY": KEY, "SYNTHNODE__ORTHANC__PASSWORD": orthanc.password}
    clean = run_check(config, env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 fatal" in clean.stdout and "answers C-ECHO" in clean.stdout
    assert KEY not in clean.stdout and orthanc.password not in clean.stdout
    broken = run_check(config, {"SYNTHNODE__DEID__KEY": "too-short",
                                "SYNTHNODE__ORTHANC__PASSWORD": "wrong-pw"})
    assert broken.returncode == 1
    lines = [line for line in broken.stdout.splitlines() if line.startswith("FATAL")]
    assert len(lines) == 2, broken.stdout
    assert "too weak" in lines[0] and "HTTP 401" in lines[1]
    assert "too-short" not in broken.stdout and "wrong-pw" not in broken.stdout
    unloadable = run_check(config, {"SYNTHNODE__NODE__PORT": "0"})
    assert unloadable.returncode == 2 and unloadable.stdout.startswith("FATAL    config:")


def serve(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*SYNTHNODE, "--config", str(config), "serve"], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, **env))


def test_serve_refuses_a_fatal_problem_before_any_worker_starts(tmp_path: Path) -> None:
    port = free_port()
    sections = {"node": {"port": port, "shutdown_timeout_s": 5},
                "spool": {"dir": str(tmp_path / "spool")},
                "jobs": {"sqlite_file": str(tmp_path / "q.sqlite3"),
                         "work_dir": str(tmp_path / "w"), "cpu_workers": 1, "gpu_workers": 0},
                "output": {"quarantine_dir": str(tmp_path / "quarantine")},
                "orthanc": {"url": f"http://127.0.0.1:{free_port({port})}"}}
    config = write_config(tmp_path / "node.toml", sections, DEID_TO_ORTHANC)
    # A weak key: refused, the fix on stderr, no worker, no port.
    log = tmp_path / "weak.log"
    proc = serve(config, {"SYNTHNODE__DEID__KEY": "weak-key"}, log)
    assert proc.wait(120) == 2
    text = log.read_text()
    assert "too weak" in text and MAKE_KEY in text and "not started" in text
    assert "started workers" not in text and " listening as " not in text
    # The good key starts (workers, port), and its fingerprint is recorded.
    log = tmp_path / "good.log"
    proc = serve(config, {"SYNTHNODE__DEID__KEY": KEY}, log)
    try:
        deadline = time.monotonic() + 60
        while " listening as " not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "started workers" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(60)
    assert KeyRecord(tmp_path / "spool").recorded() == key_fingerprint(KEY)
    # Another key on the same spool: refused, naming what changed and the command.
    log = tmp_path / "changed.log"
    proc = serve(config, {"SYNTHNODE__DEID__KEY": OTHER_KEY}, log)
    assert proc.wait(120) == 2
    text = log.read_text()
    assert "key changed" in text and "synthnode key rotate" in text and OTHER_KEY not in text
    assert "started workers" not in text and " listening as " not in text
