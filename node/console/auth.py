"""Console users, sessions and CSRF tokens, kept by the node in ``[console] db`` (SQLite).

Passwords are hashed with Argon2id (argon2-cffi's defaults; rehashed on login when those
change). A session is a random 256-bit token in an HttpOnly, SameSite=Strict cookie; the
database keeps only its SHA-256, with the user, a CSRF token and the expiry. Every
state-changing request made with a session must carry that CSRF token (form field ``csrf`` or
header ``X-CSRF-Token``). HTTP Basic is believed only on the DICOMweb routes (STOW-RS clients),
where a browser form cannot forge the request (multipart/related). With
``[console] trusted_user_header`` a reverse proxy names the user: believed only from
``trusted_proxies`` with the shared secret in :data:`PROXY_SECRET_HEADER` (from the environment
variable ``trusted_proxy_secret_env``), and only for a user that exists here (the role is
ours); such a browser gets a session too, so CSRF protection holds for it as well.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.requests import Request

from node.config import ConsoleSettings
from node.console.context import Role, User

COOKIE = "synthnode_session"
PROXY_SECRET_HEADER = "X-Synthnode-Proxy-Secret"
"""The header in which a trusted proxy proves itself (``[console] trusted_proxy_secret_env``)."""
PROXY_SECRET_MIN = 16
NAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
FAILED_LOGIN_DELAY_S = 1.0
"""How long a failed login waits before it answers (slows guessing)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
"""


class UserError(Exception):
    """A user cannot be added, changed or removed; the message says why."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """The users and sessions of one console database; safe across threads and processes."""

    def __init__(self, path: Path, session_timeout_s: float = 8 * 3600.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.session_timeout_s = session_timeout_s
        self.hasher = PasswordHasher()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        # a hash to verify against when the user does not exist: the same time either way
        self._dummy = self.hasher.hash(secrets.token_urlsafe(16))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- users ---------------------------------------------------------------------------

    def add(self, name: str, role: Role, password: str) -> None:
        import re

        if not re.match(NAME_PATTERN, name):
            raise UserError(f'"{name}" is not a user name (letters, digits, _ . @ -, at most '
                            "64)")
        if len(password) < 12:
            raise UserError("a password has at least 12 characters")
        with self._lock:
            try:
                self._db.execute("INSERT INTO users VALUES (?, ?, ?, ?)",
                                 (name, role.value, self.hasher.hash(password), time.time()))
            except sqlite3.IntegrityError:
                raise UserError(f'user "{name}" exists (synthnode user remove {name} first, '
                                "or user role / user password)") from None

    def set_password(self, name: str, password: str) -> None:
        if len(password) < 12:
            raise UserError("a password has at least 12 characters")
        with self._lock:
            cur = self._db.execute("UPDATE users SET hash = ? WHERE name = ?",
                                   (self.hasher.hash(password), name))
            self._db.execute("DELETE FROM sessions WHERE name = ?", (name,))
        if not cur.rowcount:
            raise UserError(f'no user "{name}"')

    def set_role(self, name: str, role: Role) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE users SET role = ? WHERE name = ?", (role.value, name))
        if not cur.rowcount:
            raise UserError(f'no user "{name}"')

    def remove(self, name: str) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM users WHERE name = ?", (name,))
            self._db.execute("DELETE FROM sessions WHERE name = ?", (name,))
        if not cur.rowcount:
            raise UserError(f'no user "{name}"')

    def get(self, name: str) -> User | None:
        with self._lock:
            row = self._db.execute("SELECT name, role FROM users WHERE name = ?",
                                   (name,)).fetchone()
        return None if row is None else User(row[0], Role(row[1]))

    def credential(self, name: str) -> tuple[User, str] | None:
        """The user and their stored password hash (what a cached credential is bound to: a
        new password makes every cached one stale)."""
        with self._lock:
            row = self._db.execute("SELECT name, role, hash FROM users WHERE name = ?",
                                   (name,)).fetchone()
        return None if row is None else (User(row[0], Role(row[1])), str(row[2]))

    def list(self) -> list[tuple[str, Role, float]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, role, created_at FROM users ORDER BY name").fetchall()
        return [(r[0], Role(r[1]), float(r[2])) for r in rows]

    def check_password(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs; None otherwise (in about the same time)."""
        with self._lock:
            row = self._db.execute("SELECT role, hash FROM users WHERE name = ?",
                                   (name,)).fetchone()
        stored = row[1] if row else self._dummy
        try:
            self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if self.hasher.check_needs_rehash(stored):
            with self._lock:
                self._db.execute("UPDATE users SET hash = ? WHERE name = ?",
                                 (self.hasher.hash(password), name))
        return User(name, Role(row[0]))

    # -- sessions ------------------------------------------------------------------------

    def start_session(self, name: str) -> tuple[str, str]:
        """A new session of ``name``: (cookie token, CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                             (_digest(token), name, csrf, now, now + self.session_timeout_s))
        return token, csrf

    def session(self, token: str) -> tuple[User, str] | None:
        """(user, CSRF token) of a live session; None for an unknown or expired one, or one
        whose user is gone."""
        with self._lock:
            row = self._db.execute(
                "SELECT u.name, u.role, s.csrf FROM sessions s JOIN users u ON u.name = s.name"
                " WHERE s.token_hash = ? AND s.expires_at > ?",
                (_digest(token), time.time())).fetchone()
        return None if row is None else (User(row[0], Role(row[1])), str(row[2]))

    def end_session(self, token: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE token_hash = ?", (_digest(token),))


class Authenticator:
    """Who a request is: its session, its HTTP Basic credentials (DICOMweb routes only) or the
    trusted proxy's header."""

    BASIC_CACHE_S = 60.0
    """How long a verified HTTP Basic credential is believed without Argon2 again (a STOW
    client sends one with every request; Argon2 costs tens of milliseconds by design). The
    user's existence and role are read from the table on every request all the same."""

    def __init__(self, users: Users, settings: ConsoleSettings, proxy_secret: str = "") -> None:
        self.users = users
        self.settings = settings
        self._proxy_secret = proxy_secret.encode()
        """What the trusted proxy sends in :data:`PROXY_SECRET_HEADER` (empty: the proxy
        header is never believed)."""
        self._verified: dict[str, float] = {}
        """HMAC of a verified (name, password) -> when it was verified."""
        self._key = secrets.token_bytes(32)

    def __call__(self, request: Request) -> User | None:
        found = self.with_csrf(request)
        return None if found is None else found[0]

    def with_csrf(self, request: Request) -> tuple[User, str] | None:
        """(user, the CSRF token its state-changing requests must carry; "" for Basic)."""
        token = request.cookies.get(COOKIE)
        if token:
            found = self.users.session(token)
            if found is not None:
                user, csrf = found
                if self._header_user(request) in (None, user.name):
                    return user, csrf
                # the proxy now names someone else: that session is not theirs; the header's
                # user gets a session of their own below
                self.users.end_session(token)
        if request.url.path.startswith("/dicomweb/"):
            basic = self._basic(request)
            if basic is not None:
                return basic, ""
        name = self._header_user(request)
        if name is not None:
            known = self.users.get(name)
            if known is not None:
                token, csrf = self.users.start_session(known.name)
                request.state.new_session = token  # the response sets the cookie
                return User(known.name, known.role, via="header"), csrf
        return None

    def _header_user(self, request: Request) -> str | None:
        header = self.settings.trusted_user_header
        if not header or request.client is None:
            return None
        if request.client.host not in self.settings.trusted_proxies:
            return None
        given = request.headers.get(PROXY_SECRET_HEADER, "").encode()
        if not self._proxy_secret or not hmac.compare_digest(given, self._proxy_secret):
            return None
        value = request.headers.get(header, "").strip()
        return value or None

    def _basic(self, request: Request) -> User | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("basic "):
            return None
        try:
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        now = time.monotonic()
        # (as the table says now: removed since, another role, a new password)
        known = self.users.credential(name)
        if known is not None:
            at = self._verified.get(self._mac(name, password, known[1]))
            if at is not None and now - at < self.BASIC_CACHE_S:
                return User(known[0].name, known[0].role, via="basic")
        user = self.users.check_password(name, password)  # (an unknown name: as long)
        if user is None:
            return None
        rehashed = self.users.credential(name)  # (a login may rehash the password)
        if rehashed is None:
            return None
        if len(self._verified) > 1000:
            self._verified.clear()
        self._verified[self._mac(name, password, rehashed[1])] = now
        return User(user.name, user.role, via="basic")

    def _mac(self, name: str, password: str, stored_hash: str) -> str:
        """What the cache keeps of a verified credential: an HMAC (key of this process) of
        the name, the password and the hash it was verified against."""
        return hmac.new(self._key, f"{name}\0{password}\0{stored_hash}".encode(),
                        "sha256").hexdigest()


def proxy_secret(settings: ConsoleSettings, environ: Mapping[str, str] | None = None) -> str:
    """The trusted proxy's secret from ``[console] trusted_proxy_secret_env`` ("" when the
    proxy header is off); UserError naming the variable when it is unset or too short."""
    if not settings.trusted_user_header:
        return ""
    env = os.environ if environ is None else environ
    name = settings.trusted_proxy_secret_env
    secret = env.get(name, "")
    if len(secret) < PROXY_SECRET_MIN:
        raise UserError(f"[console] trusted_proxy_secret_env: the environment variable {name} "
                        f"is {'unset' if not secret else 'too short'}: set it to a secret of "
                        f"at least {PROXY_SECRET_MIN} characters that your proxy sends in "
                        f"{PROXY_SECRET_HEADER}, or set [console] trusted_user_header = \"\"")
    return secret


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected, given)
