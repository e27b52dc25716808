"""What the Storage SCP accepts: every storage SOP class pynetdicom knows, in the uncompressed
and the common compressed transfer syntaxes. Pixel data is stored as sent, never decoded."""

from __future__ import annotations

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts

UNCOMPRESSED = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
)

COMPRESSED = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEG2000MCLossless,
    uid.JPEG2000MC,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)

TRANSFER_SYNTAXES: tuple[str, ...] = UNCOMPRESSED + COMPRESSED

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class
