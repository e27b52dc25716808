"""Helpers of the console tests: users made with the CLI, logged-in HTTP sessions, CSRF
tokens, and a record of every page served for the byte scans."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import requests

from tests.nodeproc import SYNTHNODE, NodeProcess

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
