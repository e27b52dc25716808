"""Writing a de-identified data set: byte for byte what pydicom 3.0's ``save_as(f,
enforce_file_format=True)`` writes, in less time where that is simple to get right.

A de-identified object keeps most of its elements as they were read (raw: tag, VR and the value's
bytes). pydicom writes each of them through its generic element writer, about 15 µs an element;
:func:`write_file` writes such an element as its header and its bytes, and hands every other
element (converted, undefined length, too long for its VR, deferred) to pydicom's own element
writer, in the same order, inside the same error context. It takes only the simple case: the
data set as it was read (same encoding, same character set; otherwise pydicom re-encodes every
element, and so does this), Explicit or Implicit VR Little Endian; anything else is left to
pydicom (:func:`write_file` returns False having written nothing).

tests/test_deid_single_pass.py compares the bytes with pydicom's on every corpus at hand.
"""

from __future__ import annotations

import struct
from copy import deepcopy
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomIO
from pydicom.filewriter import (
    _determine_encoding,
    validate_file_meta,
    write_data_element,
    write_dataset,
    write_file_meta_info,
)
from pydicom.tag import tag_in_exception
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_LONG = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_UNDEFINED = 0xFFFFFFFF
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def write_file(ds: Dataset, f: BinaryIO) -> bool:
    """Write ``ds`` to ``f`` as ``ds.save_as(f, enforce_file_format=True)`` would, if it is the
    simple case (see the module); False, nothing written, otherwise, and where pydicom would
    refuse the file meta (it then says why). An element that pydicom's writer refuses raises
    what pydicom raises, the file half written, as pydicom leaves it."""
    meta = getattr(ds, "file_meta", None)
    if not isinstance(meta, FileMetaDataset):
        return False
    syntax = meta.get("TransferSyntaxUID")
    if syntax not in _SYNTAXES or any(t >> 16 in (0, 2) for t in ds._dict):
        return False
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        return False
    try:
        encoding = _determine_encoding(ds, syntax, None, None, False)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    if encoding != (syntax.is_implicit_VR, True) or not _as_read(ds, encoding):
        return False
    file_meta: FileMetaDataset = deepcopy(meta)
    sop_class, sop_instance = ds.get("SOPClassUID", None), ds.get("SOPInstanceUID", None)
    meta_class = file_meta.get("MediaStorageSOPClassUID", None)
    if meta_class is None or (sop_class and sop_class != meta_class):
        file_meta.MediaStorageSOPClassUID = sop_class
    meta_instance = file_meta.get("MediaStorageSOPInstanceUID", None)
    if meta_instance is None or (sop_instance and sop_instance != meta_instance):
        file_meta.MediaStorageSOPInstanceUID = sop_instance
    try:
        validate_file_meta(file_meta, enforce_standard=True)
    except (ValueError, AttributeError):
        return False
    if "PixelData" in ds:
        ds["PixelData"].is_undefined_length = syntax.is_compressed
    fp = DicomIO(f)  # straight into f, as pydicom writes (a large value is not held twice)
    fp.is_implicit_VR, fp.is_little_endian = encoding
    fp.write(preamble or b"\x00" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, file_meta, enforce_standard=True)
    _write_dataset(fp, ds, default_encoding)
    return True


def _as_read(ds: Dataset, encoding: tuple[bool, bool]) -> bool:
    """Whether pydicom's ``write_dataset`` would write ``ds``'s raw elements as they are."""
    return (ds.original_encoding == encoding
            and ds.original_character_set == ds._character_set)


def _write_dataset(fp: DicomIO, ds: Dataset, parent_encoding: str | list[str]) -> None:
    """pydicom's ``write_dataset`` for a data set written in the encoding it was read in."""
    encoding = (fp.is_implicit_VR, fp.is_little_endian)
    if not _as_read(ds, encoding):
        write_dataset(fp, ds, parent_encoding)  # every element re-encoded: pydicom's
        return
    charset = ds.get("SpecificCharacterSet", parent_encoding)
    implicit = fp.is_implicit_VR
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths, as pydicom leaves them out
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            head = _raw_header(elem, implicit)
            if head is not None:
                fp.write(head)
                fp.write(elem.value)
                continue
        elif elem.VR == "SQ" and not elem.is_buffered:
            with tag_in_exception(tag):
                _write_sequence(fp, elem, charset)
            continue
        with tag_in_exception(tag):
            write_data_element(fp, elem, charset)


def _raw_header(elem: RawDataElement, implicit: bool) -> bytes | None:
    """The tag and length (and VR) pydicom writes before a raw element's bytes; None where it
    does more than that (undefined length, a deferred value, a VR that is not written as read,
    a value too long for a 16-bit length)."""
    value = elem.value
    if value is None or elem.length == _UNDEFINED:
        return None
    tag = struct.pack("<HH", elem.tag >> 16, elem.tag & 0xFFFF)
    if implicit:
        return tag + struct.pack("<I", len(value))
    vr = elem.VR
    if not isinstance(vr, str) or len(vr) != 2:
        return None
    if vr in _LONG:
        return tag + vr.encode(default_encoding) + b"\x00\x00" + struct.pack("<I", len(value))
    if len(value) > 0xFFFF:
        return None  # pydicom warns and writes it as UN
    return tag + vr.encode(default_encoding) + struct.pack("<H", len(value))


def _write_sequence(fp: DicomIO, elem: DataElement, charset: str | list[str] | None) -> None:
    """pydicom's ``write_data_element`` for a sequence, its items written by
    :func:`_write_dataset`."""
    encodings = convert_encodings(charset or [default_encoding])
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = fp.is_implicit_VR, fp.is_little_endian
    if not elem.is_empty:
        for item in elem.value:
            content = DicomBytesIO()
            content.is_implicit_VR, content.is_little_endian = body.is_implicit_VR, True
            _write_dataset(content, item, encodings)
            data = content.getvalue()
            if getattr(item, "is_undefined_length_sequence_item", False):
                body.write(_ITEM + struct.pack("<I", _UNDEFINED) + data + _ITEM_DELIMITER)
            else:
                body.write(_ITEM + struct.pack("<I", len(data)) + data)
    undefined = elem.is_undefined_length
    head = struct.pack("<HH", elem.tag >> 16, elem.tag & 0xFFFF)
    if not fp.is_implicit_VR:
        head += b"SQ\x00\x00"
    data = body.getvalue()
    fp.write(head + struct.pack("<I", _UNDEFINED if undefined else len(data)))
    fp.write(data)
    if undefined:
        fp.write(SEQUENCE_DELIMITER)
