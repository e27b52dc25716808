"""Helpers of the console tests: users made with the CLI, logged-in HTTP sessions, CSRF
tokens, and a record of every page served for the byte scans."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import requests

from node.localorthanc import OrthancProcess
from tests.nodeproc import SYNTHNODE, NodeProcess, write_config

PASSWORDS = {"ada": "ada-admin-password-1", "rita": "rita-reviewer-pass-2",
             "victor": "victor-viewer-pass-3"}
ROLES = {"ada": "admin", "rita": "reviewer", "victor": "viewer"}


def console_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.sections['console']['port']}"


def add_users(config: Path) -> None:
    for name, password in PASSWORDS.items():
        out = subprocess.run([*SYNTHNODE, "--config", str(config), "user", "add", name,
                              "--role", ROLES[name], "--password-stdin"], input=password + "\n",
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr


class Client:
    """A requests session against the console that keeps every page body it got."""

    def __init__(self, base: str, seen: list[str]) -> None:
        self.base = base
        self.http = requests.Session()
        self.seen = seen

    def get(self, path: str, **kw: object) -> requests.Response:
        r = self.http.get(self.base + path, timeout=30, **kw)  # type: ignore[arg-type]
        self.seen.append(r.text)
        return r

    def post(self, path: str, data: dict[str, str], **kw: object) -> requests.Response:
        r = self.http.post(self.base + path, data=data, timeout=30, **kw)  # type: ignore[arg-type]
        self.seen.append(r.text)
        return r

    def login(self, name: str, password: str | None = None) -> requests.Response:
        return self.post("/login", {"username": name,
                                    "password": password or PASSWORDS[name], "next": "/"})

    def csrf(self, path: str = "/") -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.get(path).text)
        assert m, f"no CSRF token on {path}"
        return m.group(1)


REVIEWED = """
[[rules]]
name = "deid-reviewed"
[[rules.tasks]]
task = "deidentify"
review = true
"""
"""A rule whose de-identified outputs wait for a reviewer."""


def console_node(node_factory: Any, tmp_path: Path, rules: str,
                 orthanc: OrthancProcess | None = None,
                 **over: dict[str, Any]) -> NodeProcess:
    """A ``serve`` with the console on a free port, a worker, the test users (made with the
    CLI before the start) and, with ``orthanc``, outputs going there; ``over`` changes
    sections."""
    from tests.conftest import free_port
    from tests.test_jobs import KEY

    sections: dict[str, dict[str, Any]] = {
        "node": {"port": free_port()},
        "spool": {"dir": str(tmp_path / "spool"), "stable_after_s": 0.5,
                  "check_interval_s": 0.2},
        "deid": {"key": KEY},
        "jobs": {"cpu_workers": 1, "heartbeat_s": 0.3, "heartbeat_timeout_s": 8.0},
        "console": {"port": free_port(), "sample_interval_s": 0.5},
    }
    if orthanc is not None:
        sections["orthanc"] = {"url": orthanc.url, "username": orthanc.username or "",
                               "password": orthanc.password}
    for name, keys in over.items():
        sections.setdefault(name, {}).update(keys)
    write_config(tmp_path / "node0.toml", sections, rules)
    add_users(tmp_path / "node0.toml")
    return node_factory(rules=rules, **sections)
