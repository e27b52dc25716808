"""The de-identification key: how strong it must be, and its fingerprint kept with the node.

Every pseudonym, date shift and remapped UID is an HMAC under ``[deid] key``. A weak key lets
anyone who guesses it re-link pseudonyms to patients; a changed key gives every patient new
pseudonyms and UIDs, so studies de-identified before and after no longer link. So:

- :func:`key_problem` refuses keys shorter than :data:`MIN_KEY_CHARS` characters, with fewer
  than :data:`MIN_DISTINCT_CHARS` distinct characters, or whose estimated entropy is below
  :data:`MIN_KEY_BITS` (runs such as ``aaaa``/``abcd`` and repeated chunks count for nothing);
- :class:`KeyRecord` keeps a fingerprint of the key in the spool folder (an HMAC of a fixed label
  under the key, truncated: it identifies the key without revealing it); ``serve`` stops when the
  key differs from the recorded one, and ``synthnode key rotate`` records a new one.

Standard library only (imported by the configuration and the de-identification engine).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path

from node.files import atomic_write

MIN_KEY_CHARS = 32
MIN_DISTINCT_CHARS = 12
MIN_KEY_BITS = 128
MAKE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
"""The command the messages recommend (43 characters, 256 random bits)."""

FINGERPRINT_FILE = "deid-key.json"
"""The fingerprint's file in ``[spool] dir``."""
_FINGERPRINT_LABEL = b"synthnode deid key fingerprint v1"
_FINGERPRINT_HEX = 16  # 64 bits: tells keys apart, says nothing about the key

_POOLS = (
    (set(string.ascii_lowercase), 26),
    (set(string.ascii_uppercase), 26),
    (set(string.digits), 10),
    (set(string.punctuation) | {" "}, 33),
)


def _pool_bits(key: str) -> float:
    """log2 of the alphabet the key appears to be drawn from (character classes it uses)."""
    chars = set(key)
    if chars <= set(string.hexdigits.lower()) or chars <= set(string.digits + "ABCDEF"):
        return 4.0  # a hex key
    size = sum(n for pool, n in _POOLS if chars & pool)
    if any(c not in set().union(*(p for p, _ in _POOLS)) for c in chars):
        size += 100  # beyond printable ASCII
    return math.log2(size)


def _fresh_chars(key: str) -> int:
    """Characters that carry new information: not the third or later of a run with a step of
    -1, 0 or +1 (``aaaa``, ``abcd``, ``9876``), not the end of a 4-character chunk seen
    before (``pass...pass``)."""
    fresh = 0
    for i, c in enumerate(key):
        if i >= 2:
            step = ord(c) - ord(key[i - 1])
            if step in (-1, 0, 1) and ord(key[i - 1]) - ord(key[i - 2]) == step:
                continue
        if i >= 3 and key[i - 3 : i + 1] in key[: i]:
            continue
        fresh += 1
    return fresh


def estimated_bits(key: str) -> float:
    """A conservative estimate of the key's entropy in bits."""
    return _fresh_chars(key) * _pool_bits(key)


def key_problem(key: str) -> str | None:
    """What makes ``key`` unfit for pseudonyms (the rule it breaks and how to make a good one),
    or None. Never quotes the key."""
    if not key:
        return ("[deid] key is empty: set SYNTHNODE__DEID__KEY to a long random secret, the "
                "same on every machine that must give the same pseudonyms; make one with "
                f"{MAKE_KEY}")
    reason = ""
    if len(key) < MIN_KEY_CHARS:
        reason = f"it has {len(key)} characters, at least {MIN_KEY_CHARS} are needed"
    elif len(set(key)) < MIN_DISTINCT_CHARS:
        reason = (f"it has {len(set(key))} distinct characters, at least "
                  f"{MIN_DISTINCT_CHARS} are needed")
    elif (bits := estimated_bits(key)) < MIN_KEY_BITS:
        reason = (f"its estimated entropy is {bits:.0f} bits (runs and repeats count for "
                  f"nothing), at least {MIN_KEY_BITS} are needed")
    if not reason:
        return None
    return (f"[deid] key is too weak: {reason}. Anyone who guesses it can re-link pseudonyms "
            f"to patients. Make a random one with {MAKE_KEY} and set it in "
            "SYNTHNODE__DEID__KEY (every pseudonym and UID changes with the key)")


def key_fingerprint(key: str) -> str:
    """A short fingerprint of ``key`` (an HMAC-SHA256 of a fixed label under the key, 64 bits
    in hex): equal keys give equal fingerprints; it cannot be turned back into the key."""
    mac = hmac.new(key.encode("utf-8"), _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
    return mac[:_FINGERPRINT_HEX]


@dataclass(frozen=True)
class KeyRecord:
    """The fingerprint of the key the node's state was made with, in ``folder`` (the spool)."""

    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / FINGERPRINT_FILE

    def recorded(self) -> str | None:
        """The recorded fingerprint, or None when none is (a node that has not started yet).
        ValueError naming the file when it is unreadable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return str(data["fingerprint"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: not a key fingerprint record ({exc}); remove it "
                             "and run synthnode key rotate to record the current key") from None

    def record(self, key: str) -> str:
        """Record ``key``'s fingerprint (atomically, durably); return it."""
        fingerprint = key_fingerprint(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        body = json.dumps({
            "fingerprint": fingerprint,
            "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "about": "fingerprint of [deid] key (HMAC-SHA256 of a fixed label, truncated; not "
                     "the key). synthnode serve refuses to start when the key differs; "
                     "synthnode key rotate records a new one.",
        }, indent=2) + "\n"
        atomic_write(self.path, body, durable=True)
        return fingerprint

    def mismatch(self, key: str) -> str | None:
        """Why ``key`` is not the recorded one (what changed, what it means, what to run), or
        None when it is, or nothing is recorded yet."""
        recorded = self.recorded()
        current = key_fingerprint(key)
        if recorded is None or hmac.compare_digest(recorded, current):
            return None
        return (f"[deid] key changed since this node last ran (fingerprint recorded in "
                f"{self.path}: {recorded}, the key now: {current}). With a new key every "
                "patient gets new pseudonyms and UIDs: studies de-identified before and after "
                "would not link, and re-sent studies would be duplicated. Restore the previous "
                "key, or, to change it on purpose, run: synthnode key rotate")
