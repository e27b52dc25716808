"""DICOM TLS (PS3.15 Annex B secure transport, BCP 195): SSL contexts built from settings, and
one-line reasons for handshakes that fail.

The contexts are built once per listener or peer; every problem with a file raises
:class:`TLSError` naming the setting, the file and the fix, before any port opens or any
association starts. Key passwords come only from the environment variable a setting names.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from node.config import DicomDestination, NodeSettings, NodeTLS, Settings, TLSVersion
from node.errors import describe

_VERSIONS = {TLSVersion.V1_2: ssl.TLSVersion.TLSv1_2, TLSVersion.V1_3: ssl.TLSVersion.TLSv1_3}


class TLSError(Exception):
    """A certificate, key or CA file cannot be used; the message names the setting, the file
    and how to fix it (never a password)."""


def _readable(setting: str, path: Path) -> str:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise TLSError(f"{setting} {path}: no such file (fix the path, or create it: "
                       "see the README's DICOM TLS section)") from None
    except IsADirectoryError:
        raise TLSError(f"{setting} {path}: is a folder, not a PEM file") from None
    except OSError as exc:
        raise TLSError(f"{setting} {path}: cannot be read ({exc.strerror}): make it readable "
                       "by the user the node runs as") from None
    return str(path)


def _password(setting: str, env_name: str, environ: Mapping[str, str]) -> str:
    if not env_name:
        return ""
    if env_name not in environ:
        raise TLSError(f"{setting} = {env_name!r}, but the environment has no {env_name}: set "
                       "it to the private key's password")
    return environ[env_name]


def _is_encrypted(path: Path) -> bool:
    """Whether a PEM key is password-protected (PKCS#8 or the traditional OpenSSL form)."""
    head = path.read_bytes()[:4096]
    return b"ENCRYPTED PRIVATE KEY" in head or b"Proc-Type: 4,ENCRYPTED" in head


def _load_identity(ctx: ssl.SSLContext, where: str, cert: Path, key: Path, password_env: str,
                   environ: Mapping[str, str], cert_key: str, key_key: str,
                   password_key: str) -> None:
    cert_file = _readable(f"{where} {cert_key}", cert)
    key_file = _readable(f"{where} {key_key}", key)
    password = _password(f"{where} {password_key}", password_env, environ)
    encrypted = _is_encrypted(key)
    if encrypted and not password:
        raise TLSError(f"{where} {key_key} {key} is encrypted: set {password_key} to the name "
                       "of an environment variable holding its password")
    try:
        # A password is always given (a callable), so OpenSSL never prompts on a terminal.
        ctx.load_cert_chain(cert_file, key_file, password=lambda: password)
    except ssl.SSLError as exc:
        reason = f"{exc.reason or ''} {exc}".upper()
        if "KEY_VALUES_MISMATCH" in reason:
            raise TLSError(f"{where} {key_key} {key} is not the key of {cert_key} {cert}: "
                           "give the key the certificate was issued for") from None
        if encrypted:
            raise TLSError(f"{where} {key_key} {key} cannot be decrypted: check the password "
                           f"in ${password_env}") from None
        raise TLSError(f"{where} {cert_key} {cert} / {key_key} {key} cannot be loaded "
                       f"({exc.reason or exc}): give PEM files") from None


def _load_ca(ctx: ssl.SSLContext, setting: str, path: Path) -> None:
    ca_file = _readable(setting, path)
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TLSError(f"{setting} {path}: not PEM CA certificates ({exc.reason or exc})"
                       ) from None


def server_context(tls: NodeTLS, environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The context of the TLS listener (``[node.tls]``); :class:`TLSError` naming the file."""
    env = os.environ if environ is None else environ
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    _load_identity(ctx, "[node.tls]", tls.certificate, tls.private_key, tls.key_password_env,
                   env, "certificate", "private_key", "key_password_env")
    if tls.ca_file is not None:
        _load_ca(ctx, "[node.tls] ca_file", tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify_client else ssl.CERT_NONE
    return ctx


def client_context(destination: DicomDestination, node: NodeSettings,
                   environ: Mapping[str, str] | None = None) -> tuple[ssl.SSLContext, str]:
    """``(context, server_hostname)`` for associating with ``destination`` over TLS: the peer's
    certificate is checked against ``tls_ca`` (else ``[node.tls] ca_file``, else the system's
    trust store) and, unless ``tls_verify_hostname = false``, must name ``tls_server_name``
    (else ``host``); the client certificate is ``tls_certificate`` (else ``[node.tls]``'s)."""
    env = os.environ if environ is None else environ
    where = f'destination "{destination.name}"'
    own = node.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[own.min_version if own else TLSVersion.V1_2]
    if destination.tls_ca is not None:
        _load_ca(ctx, f"{where} tls_ca", destination.tls_ca)
    elif own is not None and own.ca_file is not None:
        _load_ca(ctx, "[node.tls] ca_file", own.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = destination.tls_verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if destination.tls_certificate is not None and destination.tls_key is not None:
        _load_identity(ctx, where, destination.tls_certificate, destination.tls_key,
                       destination.tls_key_password_env, env, "tls_certificate", "tls_key",
                       "tls_key_password_env")
    elif own is not None:
        _load_identity(ctx, "[node.tls]", own.certificate, own.private_key,
                       own.key_password_env, env, "certificate", "private_key",
                       "key_password_env")
    return ctx, destination.tls_server_name or destination.host


def tls_problems(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every TLS file problem a start would meet (the listener, each TLS destination), one
    message each; [] when all load. For ``serve`` and ``synthnode check``."""
    problems: list[str] = []
    if settings.node.tls is not None:
        try:
            server_context(settings.node.tls, environ)
        except TLSError as exc:
            problems.append(str(exc))
    for destination in settings.destinations:
        if isinstance(destination, DicomDestination) and destination.tls:
            try:
                client_context(destination, settings.node, environ)
            except TLSError as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
    return problems


def describe_failure(exc: BaseException) -> str:
    """A failed TLS handshake as one line: OpenSSL's reason and what usually causes it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or "certificate verify failed"
        return (f"certificate not accepted ({why}): is it signed by the CA we trust, "
                "valid now, and (for a server) issued for the name we connect to?")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        hints = {
            "WRONG_VERSION_NUMBER": "the other side does not speak TLS (plain DICOM to a TLS "
                                    "port, or TLS to a plain one?)",
            "HTTP_REQUEST": "an HTTP request, not TLS",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate, and "
                                                 "verify_client requires one",
            "CERTIFICATE_REQUIRED": "the server requires a client certificate: set "
                                    "tls_certificate and tls_key",
            "UNKNOWN_CA": "the other side does not trust the CA that signed our certificate",
            "BAD_CERTIFICATE": "the other side refused our certificate",
            "UNSUPPORTED_PROTOCOL": "no TLS version both sides allow (min_version?)",
            "VERSION_TOO_LOW": "no TLS version both sides allow (min_version?)",
            "NO_SHARED_CIPHER": "no cipher suite both sides allow",
            "UNEXPECTED_EOF": "the other side closed the connection during the handshake",
        }
        for key, hint in hints.items():
            if key in reason.upper():
                return f"{reason.lower().replace('_', ' ')}: {hint}"
        return reason
    if isinstance(exc, TimeoutError):
        return "no handshake within the timeout (a plain TCP client, or a stalled peer)"
    return describe(exc)
