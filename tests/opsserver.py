"""A real uvicorn in a thread serving the console's ops and STOW-RS routers over a real spool,
real queues (SQLite) and an audit trail, with HTTP Basic against fixed test users: what
tests/test_stow.py and tests/test_metrics.py talk to with ``requests``."""

from __future__ import annotations

import base64
import binascii
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.requests import Request

from node.audit import trail_for
from node.config import Settings
from node.console.context import ConsoleContext, Role, User
from node.console.ops import ops_router
from node.console.stow import stow_router
from node.jobs import Queues
from node.localorthanc import free_port
from node.receive.scp import ReceiveCounters
from node.spool import Spool

USERS = {"rita": ("rita-pw", Role.REVIEWER), "ada": ("ada-pw", Role.ADMIN),
         "vic": ("vic-pw", Role.VIEWER)}
"""Test credentials: name -> (password, role)."""


def basic_user(request: Request) -> User | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        name, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    known = USERS.get(name)
    if known is None or known[0] != password:
        return None
    return User(name, known[1], via="basic")


def settings_in(folder: Path, **sections: dict[str, Any]) -> Settings:
    """Settings whose every file lives under ``folder``; ``sections`` override."""
    base: dict[str, dict[str, Any]] = {
        "spool": {"dir": folder / "spool", "reserve_bytes": 0, "reserve_percent": 0},
        "jobs": {"sqlite_file": folder / "queue.sqlite3", "work_dir": folder / "work",
                 "cpu_workers": 0, "gpu_workers": 0},
        "output": {"quarantine_dir": folder / "quarantine"},
        "audit": {"db": folder / "audit.sqlite3"},
        "console": {"db": folder / "console.sqlite3"},
        "orthanc": {"url": f"http://127.0.0.1:{free_port()}"},  # nobody there
        "generate": {"cache_dir": folder / "models"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings.model_validate(base)


@dataclass
class OpsServer:
    url: str
    ctx: ConsoleContext

    @property
    def spool(self) -> Spool:
        return self.ctx.spool


@contextmanager
def ops_server(settings: Settings) -> Iterator[OpsServer]:
    spool = Spool(settings.spool)
    queues = Queues(settings.jobs)
    ctx = ConsoleContext(settings, None, spool, queues, ReceiveCounters(), trail_for(settings),
                         authenticate=basic_user)
    app = FastAPI()
    app.include_router(ops_router(ctx))
    app.include_router(stow_router(ctx))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{uuid.uuid4().hex[:6]}",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield OpsServer(f"http://127.0.0.1:{port}", ctx)
    finally:
        server.should_exit = True
        thread.join(10)
        spool.close()


def multipart(files: list[bytes], boundary: str = "synthnode-test-boundary",
              part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A ``multipart/related`` STOW-RS body of ``files`` and its Content-Type."""
    chunks = []
    for data in files:
        chunks.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return (b"".join(chunks),
            f'multipart/related; type="application/dicom"; boundary={boundary}')
