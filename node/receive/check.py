"""Check a received data set before it is spooled, without decoding its pixel data.

One pass over the bytes the peer sent: a walk of the element headers (tag, VR, length;
sequences and encapsulated pixel data item by item) proving every value lies inside the data and
every undefined-length element is closed (this catches truncation, which pydicom tolerates
silently), collecting on the way the four top-level UIDs the spool path and the checks need.
No value is decoded but those four; it costs a fraction of a pydicom parse.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom import uid as tsuid
from pydicom.filereader import _read_file_meta_info, read_preamble

from node.errors import describe
from node.receive.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from node.uids import is_valid_uid


class StoreStatus(IntEnum):
    """C-STORE response statuses the node sends (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    """Stored durably, or an identical copy already was."""

    OUT_OF_RESOURCES = 0xA700
    """The instance could not be persisted (disk full, I/O error); the sender may retry."""

    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """The data set's SOP Class UID differs from the presentation context's abstract syntax."""

    CANNOT_UNDERSTAND = 0xC000
    """The data set is unparsable, truncated, or lacks (or has invalid) identifying UIDs."""

    # STOW-RS failure reasons (PS3.18 Table 10.5.3-1) that C-STORE never needs: there the
    # association's negotiation already refuses an unknown SOP class or transfer syntax.

    PROCESSING_FAILURE = 0x0110
    """An unexpected error while storing (STOW-RS)."""

    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """The SOP class is not a storage SOP class the node accepts (STOW-RS)."""

    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    """The transfer syntax is not one the node accepts (STOW-RS)."""


class RejectedDataset(Exception):
    """A received data set that is not spooled; carries the status and a reason for the peer."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """The identifying UIDs of a received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str


_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})


class _Truncated(Exception):
    pass


# Top-level attributes collected by the walk: (group, element) -> keyword.
_WANTED = {
    (0x0008, 0x0016): "SOPClassUID",
    (0x0008, 0x0018): "SOPInstanceUID",
    (0x0020, 0x000D): "StudyInstanceUID",
    (0x0020, 0x000E): "SeriesInstanceUID",
}
_NAMES = {
    "SOPClassUID": "SOP Class UID (0008,0016)",
    "SOPInstanceUID": "SOP Instance UID (0008,0018)",
    "StudyInstanceUID": "Study Instance UID (0020,000D)",
    "SeriesInstanceUID": "Series Instance UID (0020,000E)",
}


MAX_DEPTH = 64
"""Deepest nesting of sequence (and encapsulated pixel data) items accepted: real objects nest
a few levels; each level is a recursion here and in pydicom's reader."""


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool) -> None:
        self.found: dict[str, bytes] = {}
        self.depth = 0
        self.buf = memoryview(data)
        self.end = len(self.buf)
        self.implicit = implicit
        e = "<" if little else ">"
        self.tag = struct.Struct(f"{e}HH")
        self.u16 = struct.Struct(f"{e}H")
        self.u32 = struct.Struct(f"{e}L")

    def _need(self, pos: int, n: int) -> None:
        if pos + n > self.end:
            raise _Truncated(f"data ends at byte {self.end}, {pos + n - self.end} bytes early")

    def dataset(self, pos: int, in_item: bool) -> int:
        top = not in_item
        while pos < self.end:
            self._need(pos, 8)
            tag = self.tag.unpack_from(self.buf, pos)
            if tag == _ITEM_END:
                return pos + 8
            if self.implicit or tag[0] == 0xFFFE:
                length, pos = self.u32.unpack_from(self.buf, pos + 4)[0], pos + 8
            else:
                vr = bytes(self.buf[pos + 4 : pos + 6])
                if vr in _LONG_VRS:
                    self._need(pos, 12)
                    length, pos = self.u32.unpack_from(self.buf, pos + 8)[0], pos + 12
                else:
                    length, pos = self.u16.unpack_from(self.buf, pos + 6)[0], pos + 8
            if length == _UNDEFINED:
                pos = self.items(pos)
            else:
                self._need(pos, length)
                if top and tag in _WANTED:
                    self.found[_WANTED[tag]] = bytes(self.buf[pos : pos + length])
                pos += length
        if in_item:
            raise _Truncated("an item of undefined length is not closed")
        return pos

    def items(self, pos: int) -> int:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Truncated(f"sequences are nested more than {MAX_DEPTH} deep")
        while True:
            self._need(pos, 8)
            tag = self.tag.unpack_from(self.buf, pos)
            length = self.u32.unpack_from(self.buf, pos + 4)[0]
            pos += 8
            if tag == _SEQ_END:
                self.depth -= 1
                return pos
            if tag != _ITEM:
                raise _Truncated(f"expected an item tag, found ({tag[0]:04X},{tag[1]:04X})")
            if length == _UNDEFINED:
                pos = self.dataset(pos, in_item=True)
            else:
                self._need(pos, length)
                pos += length


MAX_INFLATED_BYTES = 1 << 31
"""Largest inflated Deflated Explicit VR data set accepted (2 GiB)."""


def inspect_file(path: Path, offset: int, transfer_syntax: str) -> Header:
    """:func:`inspect_dataset` over the data set that begins at byte ``offset`` of the file at
    ``path``, mapped into memory rather than read: a gigabyte costs page cache, not heap."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if size <= offset:
            return inspect_dataset(b"", transfer_syntax)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return inspect_dataset(memoryview(mapped)[offset:], transfer_syntax)
    finally:
        # A view may outlive the call in a traceback; the mapping then closes when it goes.
        with contextlib.suppress(BufferError):
            mapped.close()


def inspect_dataset(dataset: bytes | memoryview, transfer_syntax: str) -> Header:
    """Check that every element of ``dataset`` (encoded without file meta, in
    ``transfer_syntax``) is complete, and return its identifying UIDs; raise
    :class:`RejectedDataset` naming the problem otherwise."""
    data: bytes | memoryview = dataset
    ts = tsuid.UID(transfer_syntax)
    if ts == tsuid.DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            # Bounded: a few kB of deflate can claim gigabytes (a decompression bomb).
            data = inflater.decompress(dataset, MAX_INFLATED_BYTES)
        except zlib.error as exc:
            raise RejectedDataset(
                StoreStatus.CANNOT_UNDERSTAND, f"deflated data set cannot be inflated ({exc})"
            ) from None
        if inflater.unconsumed_tail:
            raise RejectedDataset(
                StoreStatus.CANNOT_UNDERSTAND,
                f"deflated data set inflates beyond {MAX_INFLATED_BYTES >> 20} MiB",
            )
        if not inflater.eof:
            raise RejectedDataset(StoreStatus.CANNOT_UNDERSTAND, "deflated data set is truncated")
    implicit = ts == tsuid.ImplicitVRLittleEndian
    little = ts != tsuid.ExplicitVRBigEndian
    walker = _Walker(data, implicit, little)
    try:
        walker.dataset(0, in_item=False)
    except (_Truncated, struct.error) as exc:
        raise RejectedDataset(
            StoreStatus.CANNOT_UNDERSTAND, f"data set is truncated or malformed: {exc}"
        ) from None
    values = {}
    for keyword, name in _NAMES.items():
        raw = walker.found.get(keyword, b"")
        value = raw.decode("ascii", "replace").strip("\0 ")
        if not value:
            raise RejectedDataset(StoreStatus.CANNOT_UNDERSTAND, f"{name} is missing")
        if not is_valid_uid(value):
            raise RejectedDataset(StoreStatus.CANNOT_UNDERSTAND, f"{name} is not a valid UID")
        values[keyword] = value
    return Header(
        values["SOPClassUID"], values["SOPInstanceUID"], values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
    )


def check_against_request(header: Header, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The data set must be the one the C-STORE request and presentation context announce."""
    if header.sop_class_uid != sop_class_uid:
        raise RejectedDataset(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Class UID {header.sop_class_uid} does not match the presentation "
            f"context's {sop_class_uid}",
        )
    if header.sop_instance_uid != sop_instance_uid:
        raise RejectedDataset(
            StoreStatus.CANNOT_UNDERSTAND,
            f"data set SOP Instance UID {header.sop_instance_uid} differs from the request's "
            f"Affected SOP Instance UID {sop_instance_uid}",
        )


_STORAGE = frozenset(STORAGE_SOP_CLASSES)
_SYNTAXES = frozenset(TRANSFER_SYNTAXES)


@dataclass(frozen=True)
class Part10:
    """A checked DICOM file (PS3.10: preamble, ``DICM``, file meta, data set)."""

    header: Header
    transfer_syntax: str
    dataset_offset: int
    """Where the data set begins, after the file meta."""


def meta_uids(path: Path) -> tuple[str, str]:
    """(Media Storage SOP Class UID, SOP Instance UID) from the file meta of ``path``, "" for
    each that cannot be read: what a failure report can name."""
    try:
        with path.open("rb") as f:
            read_preamble(f, force=False)
            meta = _read_file_meta_info(f)
        return (str(meta.get("MediaStorageSOPClassUID", "")),
                str(meta.get("MediaStorageSOPInstanceUID", "")))
    except Exception:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
        return "", ""


def inspect_part10(path: Path) -> Part10:
    """The checks of a C-STORE, for a whole DICOM file (a STOW-RS part): a file meta that
    names a storage SOP class and transfer syntax the node accepts (what the presentation
    context settles for C-STORE), a complete data set (:func:`inspect_dataset`, the file
    mapped, never read into memory) whose SOP Class and Instance UIDs are those of the meta.
    Raises :class:`RejectedDataset` naming the problem."""
    with path.open("rb") as f:
        if f.read(132)[128:] != b"DICM":
            raise RejectedDataset(
                StoreStatus.CANNOT_UNDERSTAND,
                "not a DICOM file: no 128-byte preamble and \"DICM\" (PS3.10) at its start")
        try:
            meta = _read_file_meta_info(f)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
            raise RejectedDataset(
                StoreStatus.CANNOT_UNDERSTAND,
                f"the file meta group (0002) cannot be read ({describe(exc)})") from None
        offset = f.tell()
    sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip("\0 ")
    sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "")).strip("\0 ")
    syntax = str(meta.get("TransferSyntaxUID", "")).strip("\0 ")
    for name, value in (("Media Storage SOP Class UID (0002,0002)", sop_class),
                        ("Media Storage SOP Instance UID (0002,0003)", sop_instance),
                        ("Transfer Syntax UID (0002,0010)", syntax)):
        if not value:
            raise RejectedDataset(StoreStatus.CANNOT_UNDERSTAND,
                                  f"the file meta lacks its {name}")
    if syntax not in _SYNTAXES:
        raise RejectedDataset(StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED,
                              f"transfer syntax {syntax} is not one the node accepts")
    if sop_class not in _STORAGE:
        raise RejectedDataset(StoreStatus.SOP_CLASS_NOT_SUPPORTED,
                              f"SOP class {sop_class} is not a storage SOP class the node "
                              "accepts")
    header = inspect_file(path, offset, syntax)
    if header.sop_class_uid != sop_class:
        raise RejectedDataset(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Class UID {header.sop_class_uid} does not match the file meta's "
            f"{sop_class}")
    if header.sop_instance_uid != sop_instance:
        raise RejectedDataset(
            StoreStatus.CANNOT_UNDERSTAND,
            f"data set SOP Instance UID {header.sop_instance_uid} differs from the file meta's "
            f"{sop_instance}")
    return Part10(header, syntax, offset)
