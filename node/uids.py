"""UID syntax (PS3.5 9.1): components of digits separated by dots, no leading zeros, <= 64 chars."""

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    """True if ``value`` is a syntactically valid DICOM UID (safe as a file name too)."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None
