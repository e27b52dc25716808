"""Decoding stored pixel data, for the stages that work on pixels (de-identification's pixel
cleaning, generation): one place for pydicom's decoders and their failure modes."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

Region = tuple[int, int, int, int]
"""A rectangle of pixels: x (column), y (row), width, height."""


class PixelDataError(ValueError):
    """The pixel data cannot be decoded (no transfer syntax, no decoder, damaged data)."""


def transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise PixelDataError("no Transfer Syntax UID in the file meta: the pixel data cannot "
                             "be decoded")
    return UID(uid)


def decode_frames(ds: Dataset) -> tuple[np.ndarray, str]:
    """All stored frames as a writable (frames, rows, columns[, samples]) array, and the
    photometric interpretation after decoding (YBR decoded to RGB)."""
    uid = transfer_syntax(ds)
    try:
        # pydicom annotates **kwargs as the DecodeOptions TypedDict rather than Unpack[...]
        arr, meta = get_decoder(uid).as_array(ds, as_rgb=True)  # type: ignore[arg-type]
    except Exception as exc:  # the decoders raise many kinds; all mean "cannot decode"
        raise PixelDataError(
            f'pixel data in transfer syntax "{uid.name}" ({uid}) cannot be decoded: {exc}'
        ) from exc
    samples = int(meta["samples_per_pixel"])
    shape = (int(meta["number_of_frames"]), int(meta["rows"]), int(meta["columns"]))
    frames = arr.reshape(shape + ((samples,) if samples > 1 else ()))
    if not frames.flags.writeable or not frames.flags.c_contiguous:
        frames = frames.copy()
    return frames, str(meta["photometric_interpretation"])
