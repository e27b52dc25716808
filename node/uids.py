"""UIDs: syntax checks and deterministic derivation.

Every UID the node makes is derived from what it was made from (source UIDs, task, parameters,
seed), so the same job run twice, on any machine, yields the same UIDs: a retry never
duplicates anything in Orthanc or a PACS.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

UUID_ROOT = "2.25"
"""PS3.5 B.2: a UID made of 2.25 and the integer value of a UUID needs no registered root."""

MAX_ROOT_LENGTH = 40
"""Roots are kept short enough that a derived UID always has >= 23 digits of hash."""


def is_valid_uid(value: str) -> bool:
    """True if ``value`` is a syntactically valid DICOM UID (safe as a file name too)."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None


def _canonical(parts: tuple[Any, ...]) -> bytes:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()


def derive_uid(root: str, *parts: Any) -> str:
    """A UID determined by ``parts`` (any JSON-serialisable values, order significant).

    With ``root`` empty: ``2.25.<int>`` of a name-based UUID (SHA-256 of the parts, UUID
    version 8 layout). With a root: ``<root>.<int>``, the integer taken from the same hash and
    sized to fill up to 64 characters.
    """
    digest = hashlib.sha256(_canonical(parts)).digest()
    if not root:
        # RFC 9562 version 8 (custom, here SHA-256 based) with the RFC 4122 variant bits.
        raw = bytearray(digest[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80
        raw[8] = (raw[8] & 0x3F) | 0x80
        return f"{UUID_ROOT}.{uuid.UUID(bytes=bytes(raw)).int}"
    if not is_valid_uid(root) or len(root) > MAX_ROOT_LENGTH:
        raise ValueError(f'UID root "{root}" is not a valid UID of at most {MAX_ROOT_LENGTH} '
                         "characters")
    digits = 64 - len(root) - 1
    number = int.from_bytes(digest, "big") % (10**digits)
    return f"{root}.{number}"
