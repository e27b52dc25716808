"""Exceptions described without patient data, for logs, job records, DIMSE error comments and
reports.

A library's message may quote what it failed on: pydicom's quote element values (a patient's
name, a date), so only the node's own messages are passed on whole; of any other exception the
description keeps the operating system's reason or the exception's kind.
"""

from __future__ import annotations

from pydicom.errors import InvalidDicomError


class NodeError(Exception):
    """An error whose message the node wrote: it may name settings, files, UIDs, AE titles and
    the fix, never patient data, so :func:`describe` passes it on whole."""


def describe(exc: BaseException) -> str:
    """``exc`` in words that carry no patient data: a :class:`NodeError`'s message, an
    OSError's reason (``strerror``: "No space left on device"), else its kind
    (``ValueError``)."""
    if isinstance(exc, NodeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def describe_unreadable(exc: BaseException) -> str:
    """Why a file could not be read as DICOM, from what reading it raised, without patient
    data: "not a DICOM file", "cannot be read (<reason>)" or "DICOM header cannot be parsed
    (<kind>)"."""
    if isinstance(exc, InvalidDicomError):
        return "not a DICOM file"
    if isinstance(exc, OSError):
        return f"cannot be read ({describe(exc)})"
    return f"DICOM header cannot be parsed ({describe(exc)})"  # pydicom raises many kinds
