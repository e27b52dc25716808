"""Pixel data in every transfer syntax the receiver accepts decodes (with permissively licensed
plugins only), and changed pixels are written back losslessly: in their own transfer syntax
where an encoder exists, else uncompressed with the lossy compression history kept.

Test objects are built here and compressed with dcmtk (JPEG, JPEG-LS, RLE), pydicom's encoders
(JPEG 2000) and OpenJPH's ojph_compress (HTJ2K), beside pydicom-data's samples."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import compress
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
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
    generate_uid,
)

from node.dicom import validate_file
from node.localorthanc import dcmtk
from node.pixeldata import (
    DECODING_PLUGINS,
    PixelDataError,
    can_encode,
    decode_frames,
    decoding_plugin,
    lossy_method,
    store_frames,
)
from node.receive.contexts import TRANSFER_SYNTAXES
from node.samples import sample_file

ROWS, COLUMNS = 36, 40  # OpenJPEG encodes 6 resolutions: 32 pixels at least


# -- test objects ----------------------------------------------------------------------------

def image(
    bits_stored: int = 8, signed: bool = False, frames: int = 1,
    photometric: str = "MONOCHROME2", seed: int = 0, rows: int = ROWS, columns: int = COLUMNS,
) -> tuple[Dataset, np.ndarray]:
    """An uncompressed Secondary Capture image with smooth, noisy content filling the stored
    range, and its (frames, rows, columns[, 3]) pixel values."""
    rgb = photometric == "RGB"
    allocated = 8 if bits_stored <= 8 else 16
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (
        0, 2**bits_stored - 1)
    rng = np.random.default_rng(seed)
    shape = (frames, rows, columns) + ((3,) if rgb else ())
    ramp = np.linspace(0.0, 1.0, rows * columns).reshape(rows, columns)
    ramp = ramp[None, :, :, None] if rgb else ramp[None]
    values = low + (high - low) * ramp + rng.normal(0, (high - low) / 20, shape)
    values[:, :2] = low  # both ends of the range present
    values[:, -2:] = high
    dtype = f"{'i' if signed else 'u'}{allocated // 8}"
    arr = np.clip(np.rint(values), low, high).astype(dtype)

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if photometric == "PALETTE COLOR":
        entries = 2**bits_stored
        ds.RedPaletteColorLookupTableDescriptor = [entries % 65536, 0, 16]
        ds.GreenPaletteColorLookupTableDescriptor = [entries % 65536, 0, 16]
        ds.BluePaletteColorLookupTableDescriptor = [entries % 65536, 0, 16]
        ramp16 = np.linspace(0, 65535, entries).astype("<u2")
        ds.RedPaletteColorLookupTableData = ramp16.tobytes()
        ds.GreenPaletteColorLookupTableData = ramp16[::-1].tobytes()
        ds.BluePaletteColorLookupTableData = (ramp16 // 2).tobytes()
    ds.PixelData = arr.astype(f"<{dtype}").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, arr


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def reread(ds: Dataset, path: Path) -> Dataset:
    return dcmread(save(ds, path))


def dcmtk_compressed(ds: Dataset, tmp_path: Path, tool: str, *options: str) -> Dataset:
    """``ds`` compressed by dcmtk's ``tool`` (dcmcjpeg, dcmcjpls, dcmcrle)."""
    source = save(ds, tmp_path / f"{ds.SOPInstanceUID}.in.dcm")
    target = tmp_path / f"{ds.SOPInstanceUID}.{tool}.dcm"
    subprocess.run([dcmtk(tool), *options, str(source), str(target)], check=True,
                   capture_output=True, timeout=30)
    return dcmread(target)


def pydicom_compressed(ds: Dataset, arr: np.ndarray, uid: UID, **options: object) -> Dataset:
    """``ds`` compressed by pydicom's own encoders (JPEG 2000 through OpenJPEG)."""
    out = ds.copy()
    compress(out, uid, arr if arr.shape[0] > 1 else arr[0], generate_instance_uid=False,
             **options)  # type: ignore[arg-type]
    return out


def ojph_compressed(ds: Dataset, arr: np.ndarray, tmp_path: Path, uid: UID) -> Dataset:
    """``ds`` compressed by OpenJPH's ojph_compress (HTJ2K): reversible 5-3 for the lossless
    syntaxes (RPCL for HTJ2KLosslessRPCL), irreversible 9-7 for HTJ2K."""
    tool = shutil.which("ojph_compress")
    if tool is None:
        pytest.skip("OpenJPH's ojph_compress is not installed (Debian openjph-tools: .ci/setup)")
    fragments = []
    for index, frame in enumerate(arr):
        maxval = 2 ** int(ds.BitsStored) - 1
        channels = frame.ndim == 3
        header = f"{'P6' if channels else 'P5'}\n{COLUMNS} {ROWS}\n{maxval}\n".encode()
        data = frame.astype(">u2" if maxval > 255 else "u1").tobytes()
        src = tmp_path / f"f{index}.{'ppm' if channels else 'pgm'}"
        src.write_bytes(header + data)
        out = tmp_path / f"f{index}.j2c"
        lossless = uid in (HTJ2KLossless, HTJ2KLosslessRPCL)
        options = ["-reversible", "true"] if lossless else ["-qstep", "0.01"]
        options += ["-prog_order", "RPCL" if uid == HTJ2KLosslessRPCL else "LRCP"]
        if channels:
            options += ["-colour_trans", "false"]
        subprocess.run([tool, "-i", str(src), "-o", str(out), *options], check=True,
                       capture_output=True, timeout=30)
        fragments.append(out.read_bytes())
    result = ds.copy()
    result.PixelData = encapsulate(fragments)
    result["PixelData"].is_undefined_length = True
    result["PixelData"].VR = "OB"
    result.file_meta.TransferSyntaxUID = uid
    return result


def sample(name: str) -> Dataset:
    return dcmread(sample_file(name))


def assert_stored_again(ds: Dataset, tmp_path: Path, expected_uid: UID) -> Dataset:
    """store_frames(decode(ds)) writes ``expected_uid``, and the file it saves decodes to the
    same pixels, bit for bit."""
    frames, photometric = decode_frames(ds)
    assert store_frames(ds, frames, photometric) == expected_uid
    back = reread(ds, tmp_path / "stored.dcm")
    assert back.file_meta.TransferSyntaxUID == expected_uid
    again, again_photometric = decode_frames(back)
    assert again_photometric == photometric
    np.testing.assert_array_equal(again, frames)
    assert again.dtype == frames.dtype
    return back


# -- decoders --------------------------------------------------------------------------------

def test_every_accepted_transfer_syntax_has_a_permissive_decoder_installed() -> None:
    gpl_paths = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                 JPEGLSLossless, JPEGLSNearLossless}  # where pydicom's "pylibjpeg" is libjpeg
    for uid in map(UID, TRANSFER_SYNTAXES):
        plugin = decoding_plugin(uid)
        assert plugin is not None, uid.name
        assert plugin in DECODING_PLUGINS[uid] or (plugin == "" and not DECODING_PLUGINS[uid])
        if uid in gpl_paths:
            assert "pylibjpeg" not in DECODING_PLUGINS[uid], uid.name
    assert decoding_plugin(JPEGBaseline8Bit) == "pillow"
    assert decoding_plugin(JPEGLosslessSV1) == "gdcm"
    assert decoding_plugin(JPEGLSLossless) == "pyjpegls"
    assert decoding_plugin(HTJ2K) == "pylibjpeg"


LOSSLESS_DCMTK = [
    # (tool and options, transfer syntax, bits stored, signed, frames, photometric)
    (("dcmcrle",), RLELossless, 8, False, 3, "MONOCHROME2"),
    (("dcmcrle",), RLELossless, 12, True, 1, "MONOCHROME1"),
    (("dcmcrle",), RLELossless, 16, False, 2, "MONOCHROME2"),
    (("dcmcrle",), RLELossless, 8, False, 2, "RGB"),
    (("dcmcrle",), RLELossless, 8, False, 1, "PALETTE COLOR"),
    (("dcmcjpeg", "+e1"), JPEGLosslessSV1, 8, False, 2, "MONOCHROME2"),
    (("dcmcjpeg", "+e1"), JPEGLosslessSV1, 12, False, 1, "MONOCHROME1"),
    (("dcmcjpeg", "+e1"), JPEGLosslessSV1, 16, True, 1, "MONOCHROME2"),
    (("dcmcjpeg", "+e1"), JPEGLosslessSV1, 8, False, 1, "RGB"),
    (("dcmcjpeg", "+e1"), JPEGLosslessSV1, 7, True, 1, "MONOCHROME2"),  # GDCM would abort
    (("dcmcjpeg", "+e1"), JPEGLosslessSV1, 2, False, 1, "MONOCHROME2"),
    (("dcmcjpeg", "+el", "+sv", "3"), JPEGLossless, 12, False, 2, "MONOCHROME2"),
    (("dcmcjpls", "+el"), JPEGLSLossless, 8, False, 3, "MONOCHROME2"),
    (("dcmcjpls", "+el"), JPEGLSLossless, 12, True, 1, "MONOCHROME2"),
    (("dcmcjpls", "+el"), JPEGLSLossless, 16, False, 1, "MONOCHROME1"),
    (("dcmcjpls", "+el"), JPEGLSLossless, 8, False, 2, "RGB"),
    (("dcmcjpls", "+el"), JPEGLSLossless, 8, False, 1, "PALETTE COLOR"),
]


@pytest.mark.parametrize(("tool", "uid", "bits", "signed", "frames", "photometric"),
                         LOSSLESS_DCMTK)
def test_dcmtk_lossless_objects_decode_exactly_and_are_stored_again_losslessly(
    tmp_path: Path, tool: tuple[str, ...], uid: UID, bits: int, signed: bool, frames: int,
    photometric: str,
) -> None:
    ds, arr = image(bits, signed, frames, photometric)
    compressed = dcmtk_compressed(ds, tmp_path, *tool)
    assert compressed.file_meta.TransferSyntaxUID == uid
    decoded, decoded_photometric = decode_frames(compressed)
    assert decoded_photometric == photometric
    np.testing.assert_array_equal(decoded, arr)
    # changed pixels: in the own syntax where an encoder exists, else Explicit VR LE
    decoded[:, 2:6, 3:9] = arr.min()
    store_frames(compressed, decoded, decoded_photometric)
    expected = uid if can_encode(uid) else ExplicitVRLittleEndian
    back = reread(compressed, tmp_path / "back.dcm")
    assert back.file_meta.TransferSyntaxUID == expected
    assert "LossyImageCompression" not in back
    assert back.get("NumberOfFrames", 1) == ds.get("NumberOfFrames", 1)
    np.testing.assert_array_equal(decode_frames(back)[0], decoded)
    if uid in (JPEGLossless, JPEGLosslessSV1):  # GDCM's encoding, checked by dcmtk
        np.testing.assert_array_equal(dcmtk_decoded(tmp_path / "back.dcm"), decoded)


def dcmtk_decoded(path: Path) -> np.ndarray:
    """The frames of a JPEG file as dcmtk's dcmdjpeg decodes them (colour as stored)."""
    target = path.with_suffix(".dcmdjpeg.dcm")
    subprocess.run([dcmtk("dcmdjpeg"), str(path), str(target)], check=True,
                   capture_output=True, timeout=30)
    return decode_frames(dcmread(target))[0]


@pytest.mark.parametrize("tool", [("dcmcjpeg", "+e1"), ("dcmcrle",), ("dcmcjpls", "+el")])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB"])
def test_frames_of_odd_length_are_stored_again_losslessly(
    tmp_path: Path, tool: tuple[str, ...], photometric: str,
) -> None:
    ds, arr = image(8, False, 3, photometric, rows=35, columns=33)
    compressed = dcmtk_compressed(ds, tmp_path, *tool)
    uid = compressed.file_meta.TransferSyntaxUID
    # GDCM's JPEG Lossless encoder refuses odd lengths: uncompressed then
    expected = ExplicitVRLittleEndian if uid == JPEGLosslessSV1 else uid
    assert_stored_again(compressed, tmp_path, expected)
    np.testing.assert_array_equal(decode_frames(dcmread(tmp_path / "stored.dcm"))[0], arr)


@pytest.mark.parametrize(("uid", "bits", "signed", "frames", "photometric"), [
    (JPEG2000Lossless, 16, True, 2, "MONOCHROME2"),
    (JPEG2000Lossless, 12, False, 1, "MONOCHROME1"),
    (JPEG2000Lossless, 8, False, 1, "RGB"),
    (JPEG2000Lossless, 8, False, 1, "PALETTE COLOR"),
])
def test_jpeg2000_lossless_decodes_exactly_and_keeps_its_syntax(
    tmp_path: Path, uid: UID, bits: int, signed: bool, frames: int, photometric: str,
) -> None:
    ds, arr = image(bits, signed, frames, photometric)
    compressed = pydicom_compressed(ds, arr, uid)
    decoded, decoded_photometric = decode_frames(compressed)
    np.testing.assert_array_equal(decoded, arr)
    assert lossy_method(compressed) is None
    assert_stored_again(compressed, tmp_path, uid)


@pytest.mark.parametrize(("uid", "bits", "frames", "photometric"), [
    (HTJ2KLossless, 12, 2, "MONOCHROME2"),
    (HTJ2KLosslessRPCL, 16, 1, "MONOCHROME2"),
    (HTJ2KLossless, 8, 1, "RGB"),
])
def test_htj2k_lossless_decodes_exactly_and_is_stored_uncompressed(
    tmp_path: Path, uid: UID, bits: int, frames: int, photometric: str,
) -> None:
    ds, arr = image(bits, False, frames, photometric)
    compressed = ojph_compressed(ds, arr, tmp_path, uid)
    decoded, _ = decode_frames(compressed)
    np.testing.assert_array_equal(decoded, arr)
    assert not can_encode(uid)  # no HTJ2K encoder in pydicom 3.0 / OpenJPEG 2.5
    back = assert_stored_again(compressed, tmp_path, ExplicitVRLittleEndian)
    assert "LossyImageCompression" not in back


def test_jpeg2000_part2_uids_decode_through_the_part1_decoder(tmp_path: Path) -> None:
    ds, arr = image(12, False, 2)
    compressed = pydicom_compressed(ds, arr, JPEG2000Lossless)
    compressed.file_meta.TransferSyntaxUID = JPEG2000MCLossless
    np.testing.assert_array_equal(decode_frames(compressed)[0], arr)
    assert_stored_again(compressed, tmp_path, ExplicitVRLittleEndian)


# -- lossy sources -----------------------------------------------------------------------------

def lossy_cases(tmp_path: Path) -> list[tuple[str, Dataset, np.ndarray, str, float]]:
    """(name, compressed object, original pixels, method, largest mean absolute error)."""
    cases = []
    mono8, mono8_arr = image(8, False, 2)
    cases.append(("JPEG baseline grey", dcmtk_compressed(mono8, tmp_path, "dcmcjpeg", "+eb"),
                  mono8_arr, "ISO_10918_1", 6.0))
    rgb, rgb_arr = image(8, False, 1, "RGB", seed=1)
    cases.append(("JPEG baseline colour", dcmtk_compressed(rgb, tmp_path, "dcmcjpeg", "+eb"),
                  rgb_arr, "ISO_10918_1", 10.0))
    mono12, mono12_arr = image(12, False, 1, seed=2)
    cases.append(("JPEG extended 12-bit",
                  dcmtk_compressed(mono12, tmp_path, "dcmcjpeg", "+ee"), mono12_arr,
                  "ISO_10918_1", 100.0))
    near, near_arr = image(16, False, 2, seed=3)  # dcmtk: near-lossless unsigned only
    cases.append(("JPEG-LS near-lossless",
                  dcmtk_compressed(near, tmp_path, "dcmcjpls", "+en", "+md", "3"), near_arr,
                  "ISO_14495_1", 3.0))
    j2k, j2k_arr = image(16, True, 1, seed=4)
    cases.append(("JPEG 2000 lossy", pydicom_compressed(j2k, j2k_arr, JPEG2000, j2k_cr=[8]),
                  j2k_arr, "ISO_15444_1", 2000.0))
    ht, ht_arr = image(12, False, 2, seed=5)
    cases.append(("HTJ2K lossy", ojph_compressed(ht, ht_arr, tmp_path, HTJ2K), ht_arr,
                  "ISO_15444_15", 100.0))
    return cases


def test_lossy_sources_decode_close_and_are_stored_uncompressed_marked_lossy(
    tmp_path: Path,
) -> None:
    for name, compressed, original, method, error in lossy_cases(tmp_path):
        source_uid = compressed.file_meta.TransferSyntaxUID
        decoded, photometric = decode_frames(compressed)
        assert decoded.shape == original.shape, name
        assert 0 < np.abs(decoded.astype(float) - original).mean() <= error, name
        assert lossy_method(compressed) == method, name
        frames = decoded.copy()
        frames[:, :3, :3] = original.min()
        assert store_frames(compressed, frames, photometric) == ExplicitVRLittleEndian, name
        back = reread(compressed, tmp_path / "lossy.dcm")
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, name
        assert back.LossyImageCompression == "01", name
        assert back.LossyImageCompressionMethod == method, (name, source_uid.name)
        assert float(back.LossyImageCompressionRatio) > 1, name
        np.testing.assert_array_equal(decode_frames(back)[0], frames)
        if original.ndim == 4:  # colour comes back RGB, interleaved
            assert back.PhotometricInterpretation == "RGB"
            assert back.PlanarConfiguration == 0


def test_jpeg_baseline_ybr_full_422_comes_back_rgb(tmp_path: Path) -> None:
    ds, _ = image(8, False, 1, "RGB")
    compressed = dcmtk_compressed(ds, tmp_path, "dcmcjpeg", "+eb")
    assert compressed.PhotometricInterpretation == "YBR_FULL_422"
    assert_stored_again(compressed, tmp_path, ExplicitVRLittleEndian)
    stored = dcmread(tmp_path / "stored.dcm")
    assert (stored.PhotometricInterpretation, stored.PlanarConfiguration) == ("RGB", 0)
    assert len(stored.PixelData) == ROWS * COLUMNS * 3


def test_near_lossless_with_near_zero_is_lossless_and_keeps_its_syntax(tmp_path: Path) -> None:
    ds, arr = image(12, False, 1)
    compressed = pydicom_compressed(ds, arr, JPEGLSNearLossless, jls_error=0)
    assert lossy_method(compressed) is None
    assert_stored_again(compressed, tmp_path, JPEGLSNearLossless)


def test_lossy_history_is_kept_and_the_new_method_appended(tmp_path: Path) -> None:
    ds, _ = image(8, False, 1)
    compressed = dcmtk_compressed(ds, tmp_path, "dcmcjpeg", "+eb")
    compressed.LossyImageCompression = "01"
    compressed.LossyImageCompressionMethod = "ISO_15444_1"
    compressed.LossyImageCompressionRatio = 12
    store_frames(compressed, *decode_frames(compressed))
    assert list(compressed.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    assert len(compressed.LossyImageCompressionRatio) == 2
    # the same method again (the modality's own JPEG) is not recorded twice
    again = dcmtk_compressed(ds, tmp_path, "dcmcjpeg", "+eb")
    assert again.LossyImageCompressionMethod == "ISO_10918_1"  # dcmtk records it
    store_frames(again, *decode_frames(again))
    assert again.LossyImageCompressionMethod == "ISO_10918_1"


# -- uncompressed and deflated ---------------------------------------------------------------

def test_native_syntaxes_decode_and_are_written_back_in_themselves(tmp_path: Path) -> None:
    reference = decode_frames(sample("MR_small.dcm"))[0]
    big = sample("MR_small_bigendian.dcm")
    assert big.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    np.testing.assert_array_equal(decode_frames(big)[0], reference)
    assert_stored_again(big, tmp_path, ExplicitVRBigEndian)
    implicit = sample("MR_small_implicit.dcm")
    assert implicit.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert_stored_again(implicit, tmp_path, ImplicitVRLittleEndian)
    deflated = sample("image_dfl.dcm")
    assert deflated.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    frames, photometric = decode_frames(deflated)
    assert frames.std() > 0
    back = assert_stored_again(deflated, tmp_path, DeflatedExplicitVRLittleEndian)
    raw = (tmp_path / "stored.dcm").read_bytes()
    assert len(raw) < frames.nbytes  # re-deflated, not stored raw
    assert back.Rows == deflated.Rows


# -- pydicom-data samples ------------------------------------------------------------------

@pytest.mark.parametrize(("name", "reference"), [
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_16bit.dcm"),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),
    ("JPEG-LL.dcm", None),
])
def test_pydicom_data_lossless_samples_decode_exactly(
    tmp_path: Path, name: str, reference: str | None
) -> None:
    ds = sample(name)
    frames, _ = decode_frames(ds)
    if reference is not None:
        np.testing.assert_array_equal(frames, decode_frames(sample(reference))[0])
    uid = ds.file_meta.TransferSyntaxUID
    assert_stored_again(ds, tmp_path, uid if can_encode(uid) else ExplicitVRLittleEndian)


def test_pydicom_data_lossy_samples_decode_close_to_their_originals(tmp_path: Path) -> None:
    for name, reference, method in [("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", "ISO_10918_1"),
                                    ("US1_J2KI.dcm", "US1_UNCR.dcm", "ISO_15444_1"),
                                    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb.dcm", "ISO_14495_1"),
                                    ("JPEG-lossy.dcm", None, "ISO_10918_1")]:
        ds = sample(name)
        frames, photometric = decode_frames(ds)
        if reference is not None:
            original = decode_frames(sample(reference))[0].astype(float)
            assert np.abs(frames - original).mean() <= 3.0, name
        assert lossy_method(ds) == method, name
        assert store_frames(ds, frames, photometric) == ExplicitVRLittleEndian, name
        assert ds.LossyImageCompression == "01", name
        assert _values(ds.LossyImageCompressionMethod)[-1] == method, name
    # 12-bit JPEG Extended: GDCM directly (pydicom's GDCM plugin refuses 12 bits), the values
    # dcmtk's dcmdjpeg gives (and pydicom's own tests expect)
    frames = decode_frames(sample("JPEG-lossy.dcm"))[0]
    assert (frames[0, 420, 140], frames[0, 230, 120]) == (244, 95)


def _values(value: object) -> list[object]:
    return [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]


# -- validity and errors -------------------------------------------------------------------

@pytest.mark.parametrize("how", ["dcmcjpls", "dcmcrle", "dcmcjpeg", "j2k-lossy"])
def test_re_encoded_ct_adds_no_dciodvfy_errors(tmp_path: Path, how: str) -> None:
    ct = sample("CT_small.dcm")
    if how == "j2k-lossy":
        source = pydicom_compressed(ct, decode_frames(ct)[0], JPEG2000, j2k_cr=[10])
        save(source, tmp_path / "source.dcm")
    else:
        options = {"dcmcjpls": ["+el"], "dcmcjpeg": ["+e1"], "dcmcrle": []}[how]
        source = dcmtk_compressed(ct, tmp_path, how, *options)
        save(source, tmp_path / "source.dcm")
    frames, photometric = decode_frames(source)
    frames[:, :8, :8] = frames.min()
    store_frames(source, frames, photometric)
    target = save(source, tmp_path / "target.dcm")
    before = set(validate_file(tmp_path / "source.dcm").errors)
    after = set(validate_file(target).errors)
    assert after - before == set()
    assert validate_file(target).report  # dciodvfy ran


def test_frames_that_do_not_fit_are_refused_and_the_dataset_is_unchanged() -> None:
    ds, arr = image(8, False, 2)
    before = ds.PixelData
    with pytest.raises(PixelDataError, match="shape"):
        store_frames(ds, arr[:1], "MONOCHROME2")
    with pytest.raises(PixelDataError, match="dtype"):
        store_frames(ds, arr.astype(float), "MONOCHROME2")
    assert ds.PixelData == before and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_stale_attributes_go_and_bit_depths_stay() -> None:
    ds, arr = image(12, True, 2)
    ds.SmallestImagePixelValue, ds.LargestImagePixelValue = -2048, 2047
    compressed = pydicom_compressed(ds, arr, RLELossless, encapsulate_ext=True)
    assert "ExtendedOffsetTable" in compressed
    store_frames(compressed, *decode_frames(compressed))
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue",
                    "ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        assert keyword not in compressed
    assert (compressed.BitsAllocated, compressed.BitsStored, compressed.HighBit,
            compressed.PixelRepresentation, compressed.NumberOfFrames) == (16, 12, 11, 1, 2)


def test_unsupported_transfer_syntax_is_named() -> None:
    ds, _ = image()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    with pytest.raises(PixelDataError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        decode_frames(ds)
    assert not can_encode("1.2.840.10008.1.2.4.100")
    assert can_encode(RLELossless) and can_encode(JPEG2000Lossless)
    assert can_encode(JPEGLosslessSV1) and can_encode(JPEGLossless)  # GDCM
    assert not can_encode(JPEGBaseline8Bit) and not can_encode(HTJ2KLossless)


def test_pixels_an_encoder_cannot_take_are_written_explicit_le_losslessly(
    tmp_path: Path,
) -> None:
    ds = sample("SC_rgb_rle_32bit_2frame.dcm")  # RLE, 32 bits allocated: no RLE encoder takes it
    assert ds.file_meta.TransferSyntaxUID == RLELossless and ds.BitsAllocated == 32
    assert_stored_again(ds, tmp_path, ExplicitVRLittleEndian)
