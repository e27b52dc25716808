"""What the fuzz targets share: the seed corpus from pydicom's test files, the transfer syntax
chosen by an input's first byte, the libFuzzer entry point and the replay of saved inputs.

A target is a script (``python tests/fuzz/fuzz_walker.py --seeds=DIR [libFuzzer options]``)
and a module whose ``one_input(data)`` the regression tests replay without atheris.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import uid as tsuid
from pydicom.data import get_testdata_file
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble

REGRESSIONS = Path(__file__).resolve().parents[1] / "data" / "fuzz"
"""Inputs that once crashed a target, one folder per target: replayed by tests/test_fuzz.py."""

SYNTAXES = (
    tsuid.ImplicitVRLittleEndian,
    tsuid.ExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
)
"""The uncompressed encodings of a data set; an input's first byte picks one (low 2 bits).
Encapsulated syntaxes share Explicit VR Little Endian's element encoding."""

# Named, never globbed: pydicom's glob form tries to download the pydicom-data set.
SEED_FILES = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
    "ExplVR_BigEnd.dcm", "image_dfl.dcm", "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm",
    "MR_small_RLE.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm", "SC_rgb_small_odd.dcm",
    "SC_rgb_rle.dcm", "SC_jpeg_no_color_transform.dcm", "nested_priv_SQ.dcm", "reportsi.dcm",
    "test-SR.dcm", "liver_1frame.dcm",
)


def split_file(data: bytes) -> tuple[str, bytes]:
    """DICOM file bytes -> (transfer syntax, the data set's bytes after the file meta)."""
    from io import BytesIO

    f = BytesIO(data)
    read_preamble(f, False)
    meta = _read_file_meta_info(f)
    return str(meta.TransferSyntaxUID), data[f.tell():]


def syntax_byte(transfer_syntax: str) -> int:
    """The first byte that selects ``transfer_syntax`` (encapsulated ones: explicit LE)."""
    if transfer_syntax in SYNTAXES:
        return SYNTAXES.index(transfer_syntax)
    return SYNTAXES.index(tsuid.ExplicitVRLittleEndian)


def decode_input(data: bytes) -> tuple[int, str, bytes]:
    """An input -> (its first byte, the transfer syntax it picks, the data set bytes)."""
    if not data:
        return 0, SYNTAXES[0], b""
    return data[0], SYNTAXES[data[0] & 3], data[1:]


def seed_inputs(extra: Callable[[Path], list[Path]] | None = None,
                work: Path | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, input) for each seed file: its syntax byte, then its data set bytes."""
    paths = [Path(str(p)) for name in SEED_FILES if (p := get_testdata_file(name))]
    if extra is not None and work is not None:
        paths += extra(work)
    for path in paths:
        try:
            ts, dataset = split_file(path.read_bytes())
        except InvalidDicomError:  # no file meta: its transfer syntax is unknown
            continue
        yield path.stem, bytes([syntax_byte(ts)]) + dataset


def sample_study(work: Path) -> list[Path]:
    """Files made by node.samples: a made-up identity long enough to be searched for."""
    from node.samples import make_study

    files = []
    for source in ("CT_small.dcm", "MR_small.dcm"):
        files += make_study(work / source, source=source, patient_name="Fuzzington^Patricia",
                            patient_id="FUZZ-PID-0123456")
    return files


def instrument(*modules: str) -> None:
    """Import ``modules`` with atheris's coverage and comparison tracing, after patching the
    instrumenter's known fault (below)."""
    import importlib

    import atheris

    _patch_atheris()
    with atheris.instrument_imports(include=list(modules)):
        for name in modules:
            importlib.import_module(name)


def _patch_atheris() -> None:
    """atheris 2.3.0 on Python 3.11: when a function's *last* instruction is a backward jump
    (a ``while True:`` loop left only by return or raise, as in the element walker) and the
    inserted tracing makes it need an EXTENDED_ARG, ``_handle_size_changes`` (which compares
    each instruction with the next) never sees it grow, and the jump lands 2 bytes past the
    loop's first instruction: ``self`` is skipped and the fuzzer reports an AttributeError the
    code cannot raise. Recompute that one jump's argument from its target."""
    from atheris import instrument_bytecode as ib

    if getattr(ib.Instrumentor, "_synthnode_patched", False):
        return
    original = ib.Instrumentor._handle_size_changes

    def handle_size_changes(self: Any) -> None:
        original(self)
        for _ in range(4):  # the argument's size settles within a few rounds
            last = self._get_linear_instruction_listing()[-1]
            if not last._is_relative or last.mnemonic not in ib.REL_REFERENCE_IS_INVERTED:
                return
            needed = (last.offset + last.get_size() - last.reference) // 2
            if needed == last.arg:
                return
            last.arg = needed

    ib.Instrumentor._handle_size_changes = handle_size_changes
    ib.Instrumentor._synthnode_patched = True


def run(one_input: Callable[[bytes], None], write_seeds: Callable[[Path], None],
        argv: list[str]) -> None:
    """Fuzz ``one_input`` under libFuzzer's options in ``argv``; ``--seeds=DIR`` names the
    corpus folder, filled with the seeds first when empty."""
    import atheris

    args = [argv[0]]
    corpora = []
    for arg in argv[1:]:
        if arg.startswith("--seeds="):
            corpus = Path(arg.split("=", 1)[1])
            corpus.mkdir(parents=True, exist_ok=True)
            if not any(corpus.iterdir()):
                write_seeds(corpus)
            corpora.append(str(corpus))
        else:
            args.append(arg)
    warnings.simplefilter("ignore")  # pydicom warns on every odd value: noise, not findings
    atheris.Setup(args + corpora, one_input)
    atheris.Fuzz()


def replay(one_input: Callable[[bytes], None], target: str) -> list[Path]:
    """Run every saved regression input of ``target``; return the files replayed."""
    files = sorted((REGRESSIONS / target).glob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            one_input(path.read_bytes())
    return files


def repo_on_path() -> None:
    """Run as a script, the worktree's ``node`` and ``tests`` come first."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
