"""The console's HTTP server: uvicorn on ``[console] host:port`` (HTTPS with
``tls_certificate``/``tls_private_key``) on a thread of ``serve``, with the sampler of the
overview's history. The socket is bound before the thread starts, so a port in use stops
``serve``'s start with a message naming the setting."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from pathlib import Path

import uvicorn

from node.console.app import make_app
from node.console.auth import UserError, Users
from node.console.context import ConsoleContext
from node.console.samples import Samples

log = logging.getLogger(__name__)


class ConsoleError(Exception):
    """The console cannot start; the message names the setting to change."""


class Console:
    """The console of one ``serve``: start() binds and serves, stop() ends it."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        s = ctx.settings.console
        self.users = Users(s.db, s.session_timeout_s)
        self.samples = Samples(ctx, s.db)
        try:
            self.app = make_app(ctx, self.users, self.samples)
        except UserError as exc:
            self.samples.close()
            self.users.close()
            raise ConsoleError(str(exc)) from None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.sock: socket.socket | None = None

    @property
    def url(self) -> str:
        s = self.ctx.settings.console
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        scheme = "https" if s.tls_certificate else "http"
        return f"{scheme}://{host}:{port}"

    def start(self) -> None:
        s = self.ctx.settings.console
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError as exc:
            sock.close()
            raise ConsoleError(f"console port {s.port} on {s.host}: {exc.strerror} (another "
                               "server there?): set [console] port, or [console] enabled = "
                               "false") from None
        sock.listen(128)
        self.sock = sock
        if s.tls_certificate is not None:
            try:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(s.tls_certificate, s.tls_private_key)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConsoleError(f"console TLS: {exc} ([console] tls_certificate / "
                                   "tls_private_key)") from None
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=str(s.tls_certificate) if s.tls_certificate else None,
            ssl_keyfile=str(s.tls_private_key) if s.tls_private_key else None,
            timeout_keep_alive=5, limit_concurrency=256, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="console", daemon=True)
        self._thread.start()
        self.samples.start()
        log.info("console on %s", self.url)

    def _serve(self) -> None:
        assert self._server is not None and self.sock is not None
        try:
            asyncio.run(self._server.serve(sockets=[self.sock]))
        except Exception:  # noqa: BLE001 - the console ends; DICOM receiving goes on
            log.exception("the console stopped")

    def stop(self, timeout_s: float = 5.0) -> None:
        self.samples.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout_s)
        if self.sock is not None:
            self.sock.close()
        self.samples.close()
        self.users.close()


def users_for(db: Path, session_timeout_s: float = 8 * 3600.0) -> Users:
    return Users(db, session_timeout_s)
