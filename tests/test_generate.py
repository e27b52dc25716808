"""Generation end to end on CPU with the tiny model: every task through the SC writer."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.config import DeidSettings, OutputSettings, PixelRule, Settings, TaskKind
from node.deid import Deidentifier, Quarantined
from node.dicom import validate_file
from node.generate.pixels import display_frames, to_output
from node.generate.tasks import Generation, Request, deid_inpainter, prompt_for, synthesize
from tests.nodeproc import SYNTHNODE, sample_file, write_config

KEY = "generate-key-Wt3Qz8Lm1Rv6Xn0Pb5Kj9Hc2Gs7Fy4De"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    cache = tmp_path_factory.mktemp("models")
    # 4 steps: enough for img2img at strength 0.3 to keep one denoising step.
    return Settings.model_validate({"generate": {"cache_dir": str(cache), "steps": 4,
                                                 "batch_size": 2}})


@pytest.fixture(scope="module")
def generation(settings: Settings) -> Generation:
    return Generation(settings)


def source(name: str) -> Dataset:
    return dcmread(sample_file(name))


def assert_synthetic(
    ds: Dataset, tmp_path: Path, uses_source: bool, src: Dataset, seed: int
) -> None:
    assert ds.SyntheticData == "YES" and ds.ConversionType == "SYN"
    assert "model tiny" in ds.DerivationDescription
    assert f"; seed {seed};" in ds.DerivationDescription
    if uses_source:
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    else:
        assert "SourceImageSequence" not in ds
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    verdict = validate_file(path)
    assert verdict.ok, verdict.report


def expected_inside(src: Dataset, bits: int) -> np.ndarray:
    frames, _ = display_frames(src)
    return to_output(frames, color=frames.ndim == 4, bits=bits)[0]


def test_text2img_from_a_template_and_without_a_source(
    generation: Generation, tmp_path: Path
) -> None:
    ct = source("CT_small.dcm")
    (ds,) = generation.run(Request(TaskKind.TEXT2IMG, seed=1), ct)
    assert ds.StudyInstanceUID == ct.StudyInstanceUID  # a new series in the source's study
    assert 'prompt "A CT image of the' in ds.DerivationDescription
    assert (ds.Rows, ds.Columns) == (64, 64)
    assert_synthetic(ds, tmp_path, uses_source=False, src=ct, seed=1)
    (alone,) = generation.run(Request(TaskKind.TEXT2IMG, prompt="An X-ray of the chest"))
    assert str(alone.PatientName).startswith("SYNTHETIC^")
    assert_synthetic(alone, tmp_path, uses_source=False, src=ct, seed=0)


def test_img2img_keeps_geometry_and_is_reproducible(
    generation: Generation, tmp_path: Path
) -> None:
    ct = source("CT_small.dcm")
    a, b = (generation.run(Request(TaskKind.IMG2IMG, seed=7, strength=0.5), ct)[0]
            for _ in range(2))
    (c,) = generation.run(Request(TaskKind.IMG2IMG, seed=8, strength=0.5), ct)
    assert (a.Rows, a.Columns) == (ct.Rows, ct.Columns)
    assert [float(v) for v in a.PixelSpacing] == [float(v) for v in ct.PixelSpacing]
    assert np.array_equal(a.pixel_array, b.pixel_array)  # same seed, same pixels
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert not np.array_equal(a.pixel_array, c.pixel_array)
    assert "strength 0.5" in a.DerivationDescription
    assert_synthetic(a, tmp_path, uses_source=True, src=ct, seed=7)


def test_inpaint_changes_only_the_regions(generation: Generation, tmp_path: Path) -> None:
    ct = source("CT_small.dcm")
    region = (20, 30, 40, 24)  # x, y, w, h
    (ds,) = generation.run(Request(TaskKind.INPAINT, regions=(region,), seed=3), ct)
    out = ds.pixel_array
    inside = expected_inside(ct, int(ds.BitsStored))
    keep = np.ones(out.shape, bool)
    keep[30:54, 20:60] = False
    assert np.array_equal(out[keep], inside[keep])
    assert not np.array_equal(out[~keep], inside[~keep])
    assert "model tiny/inpaint" in ds.DerivationDescription
    assert_synthetic(ds, tmp_path, uses_source=True, src=ct, seed=3)


def test_outpaint_extends_by_the_margins_and_keeps_the_original(
    generation: Generation, tmp_path: Path
) -> None:
    ct = source("CT_small.dcm")
    top, right, bottom, left = 8, 16, 4, 12
    (ds,) = generation.run(Request(TaskKind.OUTPAINT, margins=(top, right, bottom, left),
                                   seed=5), ct)
    assert (ds.Rows, ds.Columns) == (ct.Rows + top + bottom, ct.Columns + left + right)
    assert [float(v) for v in ds.PixelSpacing] == [float(v) for v in ct.PixelSpacing]
    inner = ds.pixel_array[top:top + ct.Rows, left:left + ct.Columns]
    assert np.array_equal(inner, expected_inside(ct, int(ds.BitsStored)))
    assert_synthetic(ds, tmp_path, uses_source=True, src=ct, seed=5)


def test_monochrome1_16_bit_and_colour_sources(generation: Generation, tmp_path: Path) -> None:
    cr = source("RG1_UNCR.dcm")  # MONOCHROME1, 15 bits, 1955 x 1841
    (ds,) = generation.run(Request(TaskKind.IMG2IMG, seed=2, strength=0.3), cr)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 15
    assert (ds.Rows, ds.Columns) == (cr.Rows, cr.Columns)
    assert_synthetic(ds, tmp_path, uses_source=True, src=cr, seed=2)
    rgb = source("US1_UNCR.dcm")
    (ds,) = generation.run(Request(TaskKind.INPAINT, regions=((0, 0, 100, 40),), seed=2),
                           rgb)
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert_synthetic(ds, tmp_path, uses_source=True, src=rgb, seed=2)
    mr = source("emri_small.dcm")  # 10 frames
    (ds,) = generation.run(Request(TaskKind.IMG2IMG, seed=2, strength=0.4), mr)
    assert ds.NumberOfFrames == mr.NumberOfFrames
    assert_synthetic(ds, tmp_path, uses_source=True, src=mr, seed=2)


def test_prompt_templates_and_bad_requests() -> None:
    ct = source("CT_small.dcm")
    ct.BodyPartExamined = "CHEST"
    templates = {"default": "An X-ray of the {BodyPartExamined}",
                 "CT": "CT of the {BodyPartExamined}"}
    assert prompt_for(ct, templates) == "CT of the chest"
    ct.Modality = "DX"
    assert prompt_for(ct, templates) == "An X-ray of the chest"
    assert prompt_for(ct, templates, "big right-sided pleural effusion") == (
        "big right-sided pleural effusion")
    with pytest.raises(ValueError, match="inpaint needs at least one region"):
        Request(TaskKind.INPAINT)
    with pytest.raises(ValueError, match="outpaint needs non-negative margins"):
        Request(TaskKind.OUTPAINT)


def test_deidentification_inpaints_burned_in_text(generation: Generation) -> None:
    us = source("US1_UNCR.dcm")
    rule = PixelRule(name="test us", regions=[(0, 0, 120, 40)], fill="inpaint")
    deid = Deidentifier(DeidSettings(key=KEY, pixel_rules=[rule], detect_text=False),
                        OutputSettings(), inpainter=deid_inpainter(generation))
    out = deid.deidentify(us)
    before, after = us.pixel_array, out.pixel_array
    assert np.array_equal(after[40:, :], before[40:, :])  # outside the region: untouched
    assert np.array_equal(after[:, 120:], before[:, 120:])
    assert after[:40, :120].any()  # regenerated, not a black box
    assert out.BurnedInAnnotation == "NO"


def test_cli_generate_writes_sc_and_png(settings: Settings, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "gen.toml", {"generate": {
        "cache_dir": str(settings.generate.cache_dir), "steps": 2}})
    ct = sample_file("CT_small.dcm")
    res = subprocess.run(
        [*SYNTHNODE, "--config", str(cfg), "generate", "--task", "outpaint", "--source",
         str(ct), "--margin", "8", "--num", "2", "--seed", "11", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    dcms = sorted((tmp_path / "out").glob("*.dcm"))
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(dcms) == 2 and len(pngs) == 2
    seeds = sorted(dcmread(p).DerivationDescription.split("seed ")[1].split(";")[0] for p in dcms)
    assert seeds == ["11", "12"]
    bad = subprocess.run([*SYNTHNODE, "--config", str(cfg), "generate", "--task", "inpaint",
                          "--source", str(ct), "--region", "1,2,3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and 'region "1,2,3" is not x,y,w,h' in bad.stderr


def test_requests_batched_together_give_what_each_gives_alone(generation: Generation) -> None:
    ct, cr = source("CT_small.dcm"), source("RG1_UNCR.dcm")
    jobs = [
        (Request(TaskKind.IMG2IMG, seed=7, strength=0.5), ct),
        (Request(TaskKind.TEXT2IMG, seed=1, num=2), None),
        (Request(TaskKind.IMG2IMG, seed=9, strength=0.5), cr),
        (Request(TaskKind.INPAINT, regions=((10, 10, 20, 20),), seed=4), ct),
    ]
    together = generation.run_many(jobs)
    assert [len(outputs) for outputs in together] == [1, 2, 1, 1]
    for (request, src), outputs in zip(jobs, together, strict=True):
        alone = generation.run(request, src)
        for a, b in zip(outputs, alone, strict=True):
            assert a.SOPInstanceUID == b.SOPInstanceUID
            # Batched CPU kernels round differently (~1e-6): at most one grey level apart.
            diff = np.abs(a.pixel_array.astype(np.int64) - b.pixel_array.astype(np.int64))
            assert diff.max() <= 1


def test_cli_polygon_and_deidentify_with_inpainting(settings: Settings, tmp_path: Path) -> None:
    cache = str(settings.generate.cache_dir)
    cfg = write_config(tmp_path / "gen.toml", {"generate": {"cache_dir": cache, "steps": 2}})
    ct = sample_file("CT_small.dcm")
    res = subprocess.run(
        [*SYNTHNODE, "--config", str(cfg), "generate", "--task", "inpaint", "--source",
         str(ct), "--polygon", "10,10,50,10,30,40", "--out", str(tmp_path / "poly")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (out,) = (tmp_path / "poly").glob("*.dcm")
    inside = expected_inside(dcmread(ct), int(dcmread(out).BitsStored))
    changed = dcmread(out).pixel_array != inside
    assert changed.any() and not changed[45:, :].any()  # only inside the polygon's rows
    # De-identification with a pixel rule that inpaints: workers build the generation.
    rule = {"name": "us top", "regions": [[0, 0, 120, 40]], "fill": "inpaint"}
    cfg = tmp_path / "deid.toml"
    cfg.write_text(
        f'[generate]\ncache_dir = "{cache}"\nsteps = 2\n[deid]\ndetect_text = false\n'
        '[[deid.pixel_rules]]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())
    )
    us = sample_file("US1_UNCR.dcm")
    res = subprocess.run(
        [*SYNTHNODE, "--config", str(cfg), "deidentify", str(us), "--out",
         str(tmp_path / "deid"), "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, SYNTHNODE__DEID__KEY=KEY),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (written,) = (tmp_path / "deid").rglob("*.dcm")
    pixels = dcmread(written).pixel_array
    assert pixels[:40, :120].any()  # generated anatomy, not a black box
    assert np.array_equal(pixels[40:], dcmread(us).pixel_array[40:])


def test_task_parameters_make_distinct_outputs_and_are_recorded(generation: Generation) -> None:
    """Two inpaintings of one source with one seed but different regions are different objects:
    the same UIDs would make Orthanc keep the first and drop the second."""
    ct = source("CT_small.dcm")
    (a,) = generation.run(Request(TaskKind.INPAINT, regions=((10, 10, 20, 20),), seed=4), ct)
    (b,) = generation.run(Request(TaskKind.INPAINT, regions=((30, 30, 20, 20),), seed=4), ct)
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert "regions 10,10,20,20" in a.DerivationDescription
    (c,) = generation.run(Request(TaskKind.OUTPAINT, margins=(8, 8, 8, 8), seed=4), ct)
    (d,) = generation.run(Request(TaskKind.OUTPAINT, margins=(8, 8, 8, 16), seed=4), ct)
    assert c.SOPInstanceUID != d.SOPInstanceUID
    assert "margins 8,8,8,16 (top,right,bottom,left)" in d.DerivationDescription
    # How the source's values were mapped into the model's input is recorded too.
    assert "source values: " in a.DerivationDescription


# -- synthnode generate de-identifies its source by default ---------------------------------

PLANTED = {
    "PatientName": "Plantedname^Givenplanted", "PatientID": "PLANTED-ID-4711",
    "PatientBirthDate": "19510923", "AccessionNumber": "ACCPLANT88",
    "ReferringPhysicianName": "Referrerplanted^Docone",
    "PerformingPhysicianName": "Performerplanted^Doctwo", "StationName": "STATIONPLANT7",
    "DeviceSerialNumber": "SERIALPLANT9", "InstitutionName": "Institutionplanted",
}
TASK_ARGS = {
    "img2img": ["--strength", "0.5"], "inpaint": ["--region", "20,30,40,24"],
    "outpaint": ["--margin", "8"], "text2img": [],
}


def planted_source(path: Path) -> list[str]:
    """CT_small with an identifying value in each attribute that a leak would show, written to
    ``path``; the values (and each person name's components) to scan outputs for."""
    ds = source("CT_small.dcm")
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    values = [*PLANTED.values(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    return values + [part for v in PLANTED.values() for part in v.split("^")]


def generate_cli(
    settings: Settings, tmp_path: Path, task: str, *extra: str, key: str = "",
    deid: dict[str, object] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[Path]]:
    cfg = write_config(tmp_path / "gen.toml", {"generate": {
        "cache_dir": str(settings.generate.cache_dir), "steps": 2}, "deid": deid or {}})
    out = tmp_path / f"out-{task}"
    env = {k: v for k, v in os.environ.items() if k != "SYNTHNODE__DEID__KEY"}
    if key:
        env["SYNTHNODE__DEID__KEY"] = key
    res = subprocess.run(
        [*SYNTHNODE, "--config", str(cfg), "generate", "--task", task, *TASK_ARGS[task],
         *extra, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    return res, sorted(out.glob("*.dcm"))


def leaked(path: Path, values: list[str]) -> list[str]:
    """The planted values found anywhere in the file's bytes (an independent scan)."""
    data = path.read_bytes()
    return [v for v in values if v.encode() in data]


@pytest.mark.parametrize("task", ["img2img", "inpaint", "outpaint", "text2img"])
def test_cli_generate_outputs_carry_none_of_the_sources_identity(
    settings: Settings, tmp_path: Path, task: str
) -> None:
    values = planted_source(tmp_path / "planted.dcm")
    res, (dcm,) = generate_cli(settings, tmp_path, task, "--source", str(tmp_path / "planted.dcm"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert leaked(dcm, values) == []
    ds = dcmread(dcm)
    assert ds.PatientIdentityRemoved == "YES" and ds.SyntheticData == "YES"
    assert ds.PatientName == f"ANONYMOUS^{ds.PatientID}" and ds.PatientID.startswith("SN")
    assert "one-off random key" in res.stderr and "--keep-identity" not in res.stderr
    verdict = validate_file(dcm)
    assert verdict.ok, verdict.report


def test_cli_generate_uses_the_configured_key(settings: Settings, tmp_path: Path) -> None:
    planted_source(tmp_path / "planted.dcm")
    res, (dcm,) = generate_cli(settings, tmp_path, "img2img", "--source",
                               str(tmp_path / "planted.dcm"), key=KEY)
    assert res.returncode == 0, res.stdout + res.stderr
    deid = Deidentifier(DeidSettings(key=KEY), OutputSettings())
    assert dcmread(dcm).PatientID == deid.pseudonym(PLANTED["PatientID"])
    assert "one-off random key" not in res.stderr


def test_cli_generate_keeps_identity_only_when_told_and_warns(
    settings: Settings, tmp_path: Path
) -> None:
    values = planted_source(tmp_path / "planted.dcm")
    res, (dcm,) = generate_cli(settings, tmp_path, "img2img", "--source",
                               str(tmp_path / "planted.dcm"), "--keep-identity")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING: --keep-identity" in res.stderr and "must not be shared" in res.stderr
    found = leaked(dcm, values)
    assert PLANTED["PatientName"] in found and PLANTED["PatientID"] in found
    ds = dcmread(dcm)
    assert ds.SyntheticData == "YES" and "PatientIdentityRemoved" not in ds


def test_cli_generate_refuses_a_source_it_cannot_deidentify(
    settings: Settings, tmp_path: Path
) -> None:
    """Ultrasound burns text into its pixels: with text detection off and no pixel rule the
    source is quarantined, and nothing is generated from it."""
    res, written = generate_cli(settings, tmp_path, "img2img", "--source",
                                str(sample_file("US1_UNCR.dcm")), deid={"detect_text": False})
    assert res.returncode == 1 and "QUARANTINED, nothing written" in res.stderr
    assert "burned-in" in res.stderr
    assert written == [] and not list((tmp_path / "out-img2img").glob("*.png"))


def test_cli_text2img_without_a_source_has_a_synthetic_identity(
    settings: Settings, tmp_path: Path
) -> None:
    res, (dcm,) = generate_cli(settings, tmp_path, "text2img", "--prompt", "A chest X-ray")
    assert res.returncode == 0, res.stdout + res.stderr
    ds = dcmread(dcm)
    assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.PatientID.startswith("SYN-")
    assert ds.SyntheticData == "YES" and "one-off random key" not in res.stderr


def test_synthesize_marks_kept_burned_in_text_and_scans_what_it_made(
    generation: Generation,
) -> None:
    """Ultrasound let through with its burned-in text (marked) keeps that text in an img2img
    output, so the output says so; text2img keeps no source pixel. An identifying value that
    reaches an output by any way (here a prompt naming the patient) stops that output."""
    deid = Deidentifier(DeidSettings(key=KEY, quarantine_unmatched_burned_in=False,
                                     detect_text=False), OutputSettings())
    us = source("US1_UNCR.dcm")
    us.PatientName = PLANTED["PatientName"]
    varied, fresh, named = synthesize(generation, [
        (Request(TaskKind.IMG2IMG, seed=1, strength=0.3), copy.deepcopy(us)),
        (Request(TaskKind.TEXT2IMG, seed=1), copy.deepcopy(us)),
        (Request(TaskKind.TEXT2IMG, prompt=f"an image of {PLANTED['PatientName']}"),
         copy.deepcopy(us)),
    ], deid)
    assert not isinstance(varied, Quarantined) and not isinstance(fresh, Quarantined)
    assert varied[0].BurnedInAnnotation == "YES" and fresh[0].BurnedInAnnotation == "NO"
    assert varied[0].PatientIdentityRemoved == "YES" == fresh[0].PatientIdentityRemoved
    assert isinstance(named, Quarantined) and "PatientName" in str(named)
