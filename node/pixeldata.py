"""Decoding and re-encoding stored pixel data, for the stages that work on pixels
(de-identification's pixel cleaning, generation): one place for pydicom's codecs, the choice of
permissively licensed plugins, and their failure modes.

Decoders are chosen per transfer syntax among plugins whose licences fit the project's
Apache-2.0 (:data:`DECODING_PLUGINS`): GDCM (BSD), pylibjpeg with pylibjpeg-openjpeg and
pylibjpeg-rle (MIT), pyjpegls (CharLS, MIT/BSD-3), Pillow (MIT-CMU). pydicom's "pylibjpeg"
plugin is never used for JPEG or JPEG-LS: there it runs pylibjpeg-libjpeg, which is GPL-3.0.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import as_pixel_options, get_decoder, get_encoder, pack_bits
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import DS, VR

log = logging.getLogger(__name__)

Region = tuple[int, int, int, int]
"""A rectangle of pixels: x (column), y (row), width, height."""


class PixelDataError(ValueError):
    """The pixel data cannot be decoded (no transfer syntax, no decoder, damaged data) or
    written back."""


DECODING_PLUGINS: dict[UID, tuple[str, ...]] = {
    # native: pydicom itself (deflate is undone when the file is read)
    ExplicitVRLittleEndian: (),
    ImplicitVRLittleEndian: (),
    DeflatedExplicitVRLittleEndian: (),
    ExplicitVRBigEndian: (),
    # JPEG: Pillow (libjpeg-turbo; 8-bit, ~5x faster than GDCM on colour and identical on
    # pydicom's samples), then GDCM (12-bit Extended: _decode_jpeg12); never "pylibjpeg"
    # (pylibjpeg-libjpeg, GPL-3.0)
    JPEGBaseline8Bit: ("pillow", "gdcm"),
    JPEGExtended12Bit: ("pillow", "gdcm"),
    JPEGLossless: ("gdcm",),
    JPEGLosslessSV1: ("gdcm",),
    # JPEG-LS: CharLS through pyjpegls, then GDCM (its own CharLS); never "pylibjpeg"
    JPEGLSLossless: ("pyjpegls", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    # JPEG 2000 and HTJ2K: OpenJPEG through pylibjpeg-openjpeg, then GDCM, then Pillow
    JPEG2000Lossless: ("pylibjpeg", "gdcm", "pillow"),
    JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
    JPEG2000MCLossless: ("pylibjpeg", "gdcm"),
    JPEG2000MC: ("pylibjpeg", "gdcm"),
    HTJ2KLossless: ("pylibjpeg",),
    HTJ2KLosslessRPCL: ("pylibjpeg",),
    HTJ2K: ("pylibjpeg",),
    # RLE: pylibjpeg-rle, then pydicom's own decoder
    RLELossless: ("pylibjpeg", "pydicom"),
}
"""The decoding plugins allowed per transfer syntax, in the order they are tried: each one is
permissively licensed."""

# pydicom has no decoder for JPEG 2000 Part 2 (multi-component); its codestreams are handed to
# the Part 1 decoders, which read Part 1 codestreams and OpenJPEG's share of Part 2 (array
# based multiple component transforms) and fail on the rest.
_DECODE_AS = {JPEG2000MCLossless: JPEG2000Lossless, JPEG2000MC: JPEG2000}

# Transfer syntaxes written back in themselves when the pixels change, and the pydicom encoder
# options that make the encoding lossless. HTJ2K has no encoder in pydicom 3.0 (OpenJPEG 2.5
# decodes HTJ2K only); JPEG Lossless is encoded by GDCM directly (pydicom offers GDCM for RLE
# only).
_LOSSLESS_ENCODING: dict[UID, dict[str, Any]] = {
    RLELossless: {},
    JPEGLSLossless: {},
    JPEGLSNearLossless: {"jls_error": 0},
    JPEG2000Lossless: {},
}
_GDCM_ENCODING = (JPEGLossless, JPEGLosslessSV1)
# pydicom's encoding plugins, the first available used. Not "gdcm" for RLE: GDCM 3.2.6's RLE
# encoder aborts the process on frames of odd length.
_ENCODING_PLUGINS: dict[UID, tuple[str, ...]] = {
    RLELossless: ("pylibjpeg", "pydicom"),
    JPEGLSLossless: ("pyjpegls",),
    JPEGLSNearLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
}
_NATIVE_KEPT = (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian,
                ExplicitVRBigEndian)

# Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1) of the transfer syntaxes that are lossy
# whatever the data, and of those that may be lossy (then told by the codestream).
_ALWAYS_LOSSY = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}
_MAYBE_LOSSY = {
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEG2000MC: "ISO_15444_1",  # Part 2 extends Part 1; PS3.3 defines no term of its own
    HTJ2K: "ISO_15444_15",
}

# Image Pixel module attributes that new pixel values or a new encoding may contradict.
_STALE = (
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "SmallestImagePixelValue", "LargestImagePixelValue",
    "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
)


def transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise PixelDataError("no Transfer Syntax UID in the file meta: the pixel data cannot "
                             "be decoded")
    return UID(uid)


# -- decoding --------------------------------------------------------------------------------

def decoding_plugin(uid: str) -> str | None:
    """The plugin :func:`decode_frames` tries first for transfer syntax ``uid`` ("" for native
    data, which pydicom decodes itself), or None when no allowed plugin is installed or the
    transfer syntax is not supported."""
    uid = UID(uid)
    allowed = DECODING_PLUGINS.get(uid)
    if allowed is None:
        return None
    if not allowed:
        return ""
    available = _decoder(uid).available_plugins
    return next((name for name in allowed if name in available), None)


def _decoder(uid: UID) -> Decoder:
    return get_decoder(_DECODE_AS.get(uid, uid))


def decode_frames(ds: Dataset) -> tuple[np.ndarray, str]:
    """All stored frames as a writable (frames, rows, columns[, samples]) array, and the
    photometric interpretation after decoding (YBR decoded to RGB; PALETTE COLOR as indices,
    MONOCHROME1 as stored).

    :class:`PixelDataError` for a transfer syntax the node does not decode, no allowed plugin
    installed, or data that no allowed plugin decodes."""
    uid = transfer_syntax(ds)
    allowed = DECODING_PLUGINS.get(uid)
    if allowed is None:
        raise PixelDataError(f'Transfer syntax "{uid.name}" ({uid}) is not supported')
    decoder = _decoder(uid)
    plugins = [p for p in allowed if p in decoder.available_plugins] if allowed else [""]
    if not plugins:
        raise PixelDataError(
            f'no permissively licensed decoder is installed for "{uid.name}" ({uid}): one of '
            f"{', '.join(allowed)}"
        )
    if uid == JPEGExtended12Bit and int(ds.get("BitsStored") or 8) > 8:
        return _decode_jpeg12(ds), str(ds.PhotometricInterpretation)
    source, narrow = ds, 0
    if uid in _DECODE_AS:  # the Part 1 decoder, told the dataset is Part 1
        source = _pixel_dataset(ds, _DECODE_AS[uid])
    bits_allocated, bits_stored = int(ds.get("BitsAllocated") or 0), int(ds.get("BitsStored") or 0)
    if uid in (JPEGLossless, JPEGLosslessSV1) and bits_allocated == 8 and 0 < bits_stored < 8:
        # GDCM 3.2.6 aborts the process (a failed assertion) on JPEG Lossless with fewer than
        # 8 of 8 bits stored: decode as 8 bits stored, keep the stored bits afterwards
        source, narrow = _pixel_dataset(ds, uid, BitsStored=8, HighBit=7), bits_stored
    failures = []
    for plugin in plugins:
        try:
            # pydicom annotates **kwargs as the DecodeOptions TypedDict, not Unpack[...]
            arr, meta = decoder.as_array(
                source, as_rgb=True, decoding_plugin=plugin  # type: ignore[arg-type]
            )
            break
        except Exception as exc:  # the decoders raise many kinds; all mean "cannot decode"
            failures.append(f"{plugin or 'pydicom'}: {exc}")
    else:
        raise PixelDataError(
            f'pixel data in transfer syntax "{uid.name}" ({uid}) cannot be decoded: '
            + "; ".join(failures)
        )
    if narrow:
        arr = _stored_bits(arr, narrow, int(ds.get("PixelRepresentation", 0)) == 1)
    samples = int(meta["samples_per_pixel"])
    shape = (int(meta["number_of_frames"]), int(meta["rows"]), int(meta["columns"]))
    frames = arr.reshape(shape + ((samples,) if samples > 1 else ()))
    if not frames.flags.writeable or not frames.flags.c_contiguous:
        frames = frames.copy()
    return frames, str(meta["photometric_interpretation"])


_PIXEL_KEYWORDS = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelData",
)


def _pixel_dataset(ds: Dataset, uid: UID, **overrides: Any) -> Dataset:
    """The Image Pixel module and Pixel Data of ``ds`` as a new dataset in transfer syntax
    ``uid``, with ``overrides``: values shared, elements not (changing one leaves ``ds``
    alone)."""
    view = Dataset()
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            elem = ds[keyword]
            view.add_new(elem.tag, elem.VR, overrides.get(keyword, elem.value))
            view[keyword].is_undefined_length = elem.is_undefined_length
    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = uid
    return view


def _stored_bits(arr: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """``arr`` reduced to its low ``bits`` bits, sign-extended when ``signed``."""
    values = arr.astype(np.int32) & ((1 << bits) - 1)
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values.astype(arr.dtype)


def _decode_jpeg12(ds: Dataset) -> np.ndarray:
    """12-bit JPEG Extended (process 4) frames decoded by GDCM directly: pydicom's GDCM plugin
    refuses 12-bit precision, and its only other 12-bit path is pylibjpeg-libjpeg (GPL-3.0).
    The standard allows monochrome only (PS3.5 Table 8.2.1-1)."""
    try:
        import gdcm  # python-gdcm, BSD; imported here as pydicom's plugin does
    except ImportError as exc:
        raise PixelDataError(f'12-bit "{JPEGExtended12Bit.name}" needs GDCM (python-gdcm), '
                             "which is not installed") from exc

    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel") or 1) != 1 or photometric not in _MONOCHROME:
        raise PixelDataError(f'12-bit JPEG Extended with Photometric Interpretation '
                             f'"{photometric}" cannot be decoded: monochrome only')
    rows, columns, count = int(ds.Rows), int(ds.Columns), _number_of_frames(ds)
    bits_stored, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype("<i2" if signed else "<u2")
    out = np.empty((count, rows, columns), dtype=dtype.newbyteorder("="))
    try:
        for index in range(count):
            fragment = gdcm.Fragment()
            fragment.SetByteStringValue(get_frame(ds.PixelData, index, number_of_frames=count))
            fragments = gdcm.SequenceOfFragments.New()
            fragments.AddFragment(fragment)
            elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
            elem.SetValue(fragments.__ref__())
            img = gdcm.Image()
            img.SetNumberOfDimensions(2)
            img.SetDimensions((columns, rows, 1))
            img.SetDataElement(elem)
            img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
                gdcm.PhotometricInterpretation.GetPIType(photometric)))
            img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
            img.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, int(signed)))
            buffer = img.GetBuffer().encode("utf-8", "surrogateescape")
            if len(buffer) != rows * columns * 2:
                raise ValueError(f"GDCM returned {len(buffer)} bytes for frame {index}, "
                                 f"expected {rows * columns * 2}")
            out[index] = np.frombuffer(buffer, dtype=dtype).reshape(rows, columns)
    except Exception as exc:  # GDCM and the encapsulation raise many kinds
        raise PixelDataError(f'pixel data in transfer syntax "{JPEGExtended12Bit.name}" '
                             f"({JPEGExtended12Bit}) cannot be decoded: {exc}") from exc
    return out


_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


# -- writing back ----------------------------------------------------------------------------

def can_encode(uid: str) -> bool:
    """Whether :func:`store_frames` writes pixels back in transfer syntax ``uid`` itself (for
    data that was not lossy compressed); otherwise they are written Explicit VR Little
    Endian."""
    uid = UID(uid)
    if uid in _NATIVE_KEPT:
        return True
    if uid in _GDCM_ENCODING:
        return _have_gdcm()
    if uid not in _LOSSLESS_ENCODING:
        return False
    available = get_encoder(uid).available_plugins
    return any(plugin in available for plugin in _ENCODING_PLUGINS[uid])


def _have_gdcm() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def store_frames(ds: Dataset, frames: np.ndarray, photometric: str) -> UID:
    """Store ``frames`` (as :func:`decode_frames` returns them: shape (frames, rows,
    columns[, samples]), ``photometric`` the interpretation after decoding) as the Pixel Data
    of ``ds``, in place, and return the transfer syntax written.

    Losslessly, always: in the dataset's own transfer syntax where :func:`can_encode` (RLE,
    JPEG Lossless, JPEG-LS, JPEG 2000 Lossless, and the uncompressed syntaxes, Deflated
    re-deflated when saved), a compressed encoding checked by decoding it again; otherwise
    (HTJ2K, JPEG 2000 Part 2, pixels an encoder does not take) and for data that was lossy
    compressed (JPEG baseline and extended; JPEG-LS near-lossless, JPEG 2000 and HTJ2K when
    their codestream or Lossy Image Compression says so), uncompressed Explicit VR Little
    Endian, never lossy again. Lossy
    data keeps Lossy Image Compression 01 with its method and ratio (PS3.3 C.7.6.1.1.5).
    Photometric Interpretation becomes ``photometric``, colour is interleaved (Planar
    Configuration 0), Extended Offset Table and the smallest/largest pixel values go; Number
    of Frames and the bit depths are kept.

    :class:`PixelDataError` for frames that do not fit the Image Pixel module of ``ds``; then
    ``ds`` is unchanged.
    """
    # 1. check everything, before any change
    source = transfer_syntax(ds)
    frames = _checked_frames(ds, frames)
    method = lossy_method(ds)
    bits_allocated = int(ds.BitsAllocated)
    native = _native_bytes(ds, frames, bits_allocated, big_endian=source == ExplicitVRBigEndian)

    # 2. encode in the source's own syntax where that stays lossless
    target, fragments = ExplicitVRLittleEndian, None
    if source in _NATIVE_KEPT:
        target = source
    elif method is None and can_encode(source):
        fragments = _lossless_fragments(ds, frames, photometric, source)
        if fragments is not None:
            target = source

    # 3. General Image module: what was lossy compressed stays marked so (PS3.3 C.7.6.1.1.5)
    if method is not None:
        _mark_lossy(ds, method, source)

    # 4. Image Pixel module and file meta
    if fragments is not None:
        ds.PixelData = encapsulate(fragments)
        elem = ds["PixelData"]
        elem.VR = VR.OB
        elem.is_undefined_length = True
    else:
        ds.PixelData = native
        elem = ds["PixelData"]
        elem.VR = VR.OB if bits_allocated <= 8 else VR.OW
        elem.is_undefined_length = False
    ds.PhotometricInterpretation = photometric
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    for keyword in _STALE:
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = target
    return target


def lossy_method(ds: Dataset) -> str | None:
    """The Lossy Image Compression Method of the encoding ``ds`` is stored in when that
    encoding lost information, else None. Whether earlier encodings did is Lossy Image
    Compression's business."""
    uid = transfer_syntax(ds)
    if uid in _ALWAYS_LOSSY:
        return _ALWAYS_LOSSY[uid]
    if uid not in _MAYBE_LOSSY:
        return None
    try:
        first = get_frame(ds.PixelData, 0, number_of_frames=_number_of_frames(ds))
    except Exception:  # damaged encapsulation: assume the worst
        return _MAYBE_LOSSY[uid]
    if uid == JPEGLSNearLossless:  # NEAR 0 is lossless, whatever came before
        return None if _jls_near(first) == 0 else _MAYBE_LOSSY[uid]
    if not _j2k_reversible(first):  # the 9-7 wavelet is always lossy
        return _MAYBE_LOSSY[uid]
    # the 5-3 wavelet is lossless unless layers were dropped: then Lossy Image Compression
    # says so, with this encoding's method last (or no method at all)
    if str(ds.get("LossyImageCompression", "")).strip() != "01":
        return None
    methods = _values(ds.get("LossyImageCompressionMethod"))
    return _MAYBE_LOSSY[uid] if not methods or methods[-1] == _MAYBE_LOSSY[uid] else None


def _checked_frames(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples = int(ds.get("SamplesPerPixel") or 1)
    expected = (_number_of_frames(ds), rows, columns) + ((samples,) if samples > 1 else ())
    if frames.shape != expected:
        raise PixelDataError(
            f"frames of shape {frames.shape} do not fit the Image Pixel module of the dataset: "
            f"expected {expected}"
        )
    if frames.dtype.kind not in "iub":
        raise PixelDataError(f"frames of dtype {frames.dtype} cannot be stored: integers only")
    return np.ascontiguousarray(frames)


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    return int(value) if value not in (None, "") and int(value) > 0 else 1


def _native_bytes(
    ds: Dataset, frames: np.ndarray, bits_allocated: int, big_endian: bool = False,
    pad: bool = True,
) -> bytes:
    """``frames`` as uncompressed Pixel Data (of even length if ``pad``)."""
    if bits_allocated == 1:
        data = pack_bits(frames, pad=False)
    elif bits_allocated in (8, 16, 32):
        kind = "i" if int(ds.get("PixelRepresentation", 0)) == 1 else "u"
        order = ">" if big_endian else "<"
        data = frames.astype(f"{order}{kind}{bits_allocated // 8}", copy=False).tobytes()
    else:
        raise PixelDataError(f"Bits Allocated {bits_allocated} is not supported for writing "
                             "pixels back")
    return data + b"\0" if pad and len(data) % 2 else data


def _lossless_fragments(
    ds: Dataset, frames: np.ndarray, photometric: str, uid: UID
) -> list[bytes] | None:
    """One lossless codestream per frame in ``uid`` (which :func:`can_encode`), checked by
    decoding them again, or None when the encoder cannot take these pixels."""
    try:
        if uid in _GDCM_ENCODING:
            fragments = [_gdcm_encode(frame, ds, photometric, uid) for frame in frames]
        else:
            opts = as_pixel_options(
                ds, photometric_interpretation=photometric, **_LOSSLESS_ENCODING[uid],
                **({"planar_configuration": 0} if frames.ndim == 4 else {}),
            )
            opts.pop("extended_offsets", None)
            arr = frames[0] if frames.shape[0] == 1 else frames
            encoder = get_encoder(uid)
            plugin = next(p for p in _ENCODING_PLUGINS[uid] if p in encoder.available_plugins)
            fragments = [bytes(f) for f in encoder.iter_encode(
                arr, encoding_plugin=plugin, **opts)]
    except Exception as exc:  # an encoding profile or bit depth the encoder does not take
        log.info('pixels not re-encoded in "%s": %s; writing Explicit VR Little Endian',
                 uid.name, exc)
        return None
    # 2b. the round trip must be exact; an encoder that is not lossless is not used
    check = _pixel_dataset(ds, uid, PhotometricInterpretation=photometric,
                           PixelData=encapsulate(fragments))
    check["PixelData"].is_undefined_length = True
    check["PixelData"].VR = VR.OB
    if frames.ndim == 4:
        check.PlanarConfiguration = 0
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in check:
            del check[keyword]
    try:
        again, _ = decode_frames(check)
    except PixelDataError as exc:
        log.warning('re-encoded pixels in "%s" do not decode (%s); writing Explicit VR '
                    "Little Endian", uid.name, exc)
        return None
    if again.shape != frames.shape or not np.array_equal(again, frames):
        log.warning('re-encoding in "%s" was not lossless; writing Explicit VR Little Endian',
                    uid.name)
        return None
    return fragments


def _gdcm_encode(frame: np.ndarray, ds: Dataset, photometric: str, uid: UID) -> bytes:
    """One frame as a JPEG Lossless codestream, by GDCM (first-order prediction, which
    JPEGLossless allows too). GDCM refuses frames of odd length (8-bit, odd rows x columns x
    samples): ValueError."""
    import gdcm

    writer = gdcm.ImageWriter()  # an Image from a writer, kept alive while in use
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((int(ds.Columns), int(ds.Rows), 1))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
        gdcm.PhotometricInterpretation.GetPIType(photometric)))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    samples, bits_stored = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsStored)
    image.SetPixelFormat(gdcm.PixelFormat(
        samples, int(ds.BitsAllocated), bits_stored, bits_stored - 1,
        int(ds.get("PixelRepresentation", 0)),
    ))
    if samples > 1:
        image.SetPlanarConfiguration(0)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetByteStringValue(_native_bytes(ds, frame[None], int(ds.BitsAllocated)))
    image.SetDataElement(elem)
    converter = gdcm.ImageChangeTransferSyntax()
    converter.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(uid))))
    converter.SetInput(image)
    if not converter.Change():
        raise ValueError("GDCM's ImageChangeTransferSyntax failed")
    fragments = converter.GetOutput().GetDataElement().GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() < 1:
        raise ValueError("GDCM returned no fragments")
    return b"".join(
        fragments.GetFragment(i).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")
        for i in range(fragments.GetNumberOfFragments())
    )


def _mark_lossy(ds: Dataset, method: str, source: UID) -> None:
    """Lossy Image Compression 01 with ``method`` (and the ratio of the stored encoding) as the
    last of the methods applied."""
    ratio = _compression_ratio(ds)
    if str(ds.get("LossyImageCompression", "")).strip() != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = method
        if ratio is not None:
            ds.LossyImageCompressionRatio = ratio
        elif "LossyImageCompressionRatio" in ds:
            del ds.LossyImageCompressionRatio
        return
    methods = _values(ds.get("LossyImageCompressionMethod"))
    if methods and methods[-1] == method:
        return  # the method already recorded is (in all likelihood) the stored encoding
    ratios = _values(ds.get("LossyImageCompressionRatio"))
    ds.LossyImageCompressionMethod = [*methods, method] if methods else method
    if ratio is not None and len(ratios) == len(methods):
        ds.LossyImageCompressionRatio = [*ratios, ratio] if ratios else ratio
    log.debug('lossy "%s" pixels marked %s', source.name, method)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str | float | int) else list(value)


def _compression_ratio(ds: Dataset) -> str | None:
    """Uncompressed size over the size of the encapsulated Pixel Data of ``ds``."""
    try:
        stored = len(ds.PixelData)
        bits = int(ds.BitsAllocated) * int(ds.get("SamplesPerPixel") or 1)
        size = int(ds.Rows) * int(ds.Columns) * bits * _number_of_frames(ds) / 8
    except (AttributeError, TypeError, ValueError):
        return None
    return str(DS(size / stored, auto_format=True)) if stored and size else None


def _jls_near(codestream: bytes) -> int | None:
    """NEAR of the first scan of a JPEG-LS codestream (0: lossless), None if not found."""
    i = 2  # after SOI
    while i + 4 <= len(codestream):
        if codestream[i] != 0xFF:
            return None
        marker = codestream[i + 1]
        length = int.from_bytes(codestream[i + 2 : i + 4], "big")
        if marker == 0xDA:  # SOS: Ls, Ns, Ns x (Ci, Tmi), NEAR, ILV, Al/Ah
            components = codestream[i + 4]
            index = i + 5 + 2 * components
            return codestream[index] if index < len(codestream) else None
        i += 2 + length
    return None


def _j2k_reversible(codestream: bytes) -> bool:
    """Whether a JPEG 2000 (or HTJ2K) codestream's main header codes with the reversible 5-3
    wavelet (the lossless one; the 9-7 wavelet is always lossy)."""
    i = codestream.find(b"\xff\x4f\xff\x51")  # SOC SIZ, also inside a JP2 wrapper
    if i < 0:
        return False
    i += 2
    while i + 4 <= len(codestream):
        marker = int.from_bytes(codestream[i : i + 2], "big")
        length = int.from_bytes(codestream[i + 2 : i + 4], "big")
        if marker == 0xFF52:  # COD: Lcod, Scod, SGcod (4), levels, xcb, ycb, style, transform
            index = i + 4 + 1 + 4 + 4
            return index < len(codestream) and codestream[index] == 1
        if marker in (0xFF90, 0xFF93):  # SOT, SOD: past the main header
            return False
        i += 2 + length
    return False
