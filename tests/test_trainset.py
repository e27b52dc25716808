"""The training pairs of a fine-tune and report text as a prompt: real DICOM studies written by
tests/trainingdata.py, the cleaned texts checked by scanning their bytes for what was planted."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import RuleTask, Settings
from node.deid import Deidentifier
from node.deid.job import Deidentifiers
from node.generate.job import Synthesizer
from node.generate.tasks import prompt_for
from node.generate.trainset import (
    Skip,
    TextSource,
    clean_text,
    collect,
    default_sources,
    read_report,
    split_reports,
)
from tests.nodeproc import SYNTHNODE, write_config
from tests.trainingdata import FINDINGS, write_studies, write_study

KEY = "trainset-key-Hq7Lm2Zx9Rv4Tn6Pb1Kj8Wc3Gs5Fy0De"
TEMPLATES = {"default": "An X-ray of the {BodyPartExamined}"}
NAME, PATIENT_ID, ACCESSION = "Plantedname^Givenplanted", "PLANTED-ID-4711", "ACCPLANT88"
REPORT = ("EXAMINATION: CHEST PA. Patient GIVENPLANTED plantedname (MRN planted-id-4711, "
          "accession ACCPLANT88), seen by Dr. ___ on 19000101 at 10:30. [**Known lastname**] "
          "<NAME> XXX-XX-XXXX. FINDINGS: small left pleural effusion. IMPRESSION: small left "
          "pleural effusion.")
PLANTED = ("___", "19000101", "Dr.", "Plantedname", "Givenplanted", PATIENT_ID, ACCESSION,
           "10:30", "[**", "<NAME>", "XXX")


def scan(text: str | Path, values: list[str] | tuple[str, ...]) -> list[str]:
    """The values found in the bytes of ``text`` or of a DICOM file (but its pixel data, where
    short values occur by chance), case-insensitively: an independent check, not the cleaning
    code run again."""
    if isinstance(text, Path):
        data = text.read_bytes().replace(dcmread(text).PixelData, b"")
    else:
        data = text.encode()
    return [v for v in values if v.lower().encode() in data.lower()]


def rewrite(path: Path, **values: object) -> Dataset:
    """The DICOM file at ``path`` with ``values`` set (None: removed), saved in place."""
    ds = dcmread(path)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return ds


def planted_study(folder: Path, index: int, *, original: bool = False) -> tuple[Path, Path]:
    """A study whose CR and SR carry the planted name, ID and accession and whose report names
    them (``original``: as the modality sent it, not de-identified). (CR, SR) files."""
    image, _ = write_study(folder, index, np.random.default_rng(index), finding=1, report=REPORT)
    sr = image.parent / "report.dcm"
    marks: dict[str, object] = {"PatientName": NAME, "PatientID": PATIENT_ID,
                                "AccessionNumber": ACCESSION}
    if original:
        marks.update(PatientIdentityRemoved=None, DeidentificationMethod=None,
                     PatientBirthDate="19510923")
    for path in (image, sr):
        rewrite(path, **marks)
    return image, sr


def test_clean_text_takes_out_remnants_and_keeps_report_language() -> None:
    cases = {
        "Patient SNABCDEFGHIJKL23, seen by Dr. ___ on 19000101. Small left pleural effusion.":
            "Small left pleural effusion.",
        "INDICATION: ___ year old woman with cough. Compared to [**2101-3-4**].":
            "INDICATION: year old woman with cough. Compared.",
        "MRN: 12345678. Name: <NAME>. No pneumothorax. Heart < 15 cm and > 3 cm.":
            "No pneumothorax. Heart < 15 cm and > 3 cm.",
        "Discussed with Dr. J. Smith at 14:20 on 03/04/2021. RUL opacity 2.3 x 1.1 cm.":
            "RUL opacity 2.3 x 1.1 cm.",
        "ANONYMOUS^SNABCDEFGHIJKL23 [REDACTED] XXX-XX-XXXX ANONYMIZED CLEANED": "",
        "MR brain: no mass. History of MS. The catheter was removed. Nodes 120 140 160 mm.":
            "MR brain: no mass. History of MS. The catheter was removed. Nodes 120 140 160 mm.",
    }
    for text, expected in cases.items():
        assert clean_text(text) == expected, text
    # known values go whole-token and case-insensitively, a person name by its components
    assert clean_text("Patient DOE jane (ID AB-123) has cardiomegaly; Doesburg normal.",
                      ["Doe^Jane", "AB-123"]) == "has cardiomegaly; Doesburg normal."


def test_prompts_from_reports_hold_no_placeholder_pseudonym_or_planted_value(
    tmp_path: Path,
) -> None:
    images = write_studies(tmp_path / "data", 4)
    planted, _ = planted_study(tmp_path / "data", 9)
    training = collect([tmp_path / "data"], 64, TEMPLATES)
    assert len(training.examples) == 5 and training.skipped == {Skip.NO_PIXELS: 5}
    pseudonyms = [str(dcmread(p).PatientID) for p in images]
    assert all(p.startswith("SN") for p in pseudonyms)
    findings = {str(dcmread(p).SOPInstanceUID): FINDINGS[i % 4] for i, p in enumerate(images)}
    findings[str(dcmread(planted).SOPInstanceUID)] = FINDINGS[1]
    for example in training.examples:
        assert example.text_source == TextSource.SR
        assert scan(example.text, [*pseudonyms, *PLANTED]) == [], example.text
        # the report's language survives, twice (findings and impression)
        assert example.text.count(findings[example.sop_instance_uid]) == 2, example.text
        assert example.text.startswith("EXAMINATION: CHEST PA.")
    assert b"\x00" not in "".join(training.texts).encode()


def test_sr_beats_a_report_file_which_beats_the_template(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    with_sr, _ = write_study(data, 0, rng, report="FINDINGS: right upper lobe opacity.")
    with_sr.with_suffix(".txt").write_text("FINDINGS: cardiomegaly.")
    by_stem, _ = write_study(data, 1, rng, sr=False)
    by_stem.with_suffix(".txt").write_text("Dr. ___: cardiomegaly without edema.")
    (by_stem.parent / "report.txt").write_text("not this one")
    by_folder, _ = write_study(data, 2, rng, sr=False)
    (by_folder.parent / "report.txt").write_text("No acute process. Reported by ___.")
    bare, _ = write_study(data, 3, rng, sr=False)
    # An SR the node de-identified without keeping its text holds "CLEANED": no report.
    cleaned, _ = write_study(data, 4, rng, report="CLEANED")
    (cleaned.parent / "report.txt").write_text("Small left pleural effusion.")
    got = {e.sop_instance_uid: (e.text_source, e.text)
           for e in collect([data], 64, TEMPLATES).examples}
    expected = {
        with_sr: (TextSource.SR, "FINDINGS: right upper lobe opacity."),
        by_stem: (TextSource.FILE, "cardiomegaly without edema."),
        by_folder: (TextSource.FILE, "No acute process."),
        bare: (TextSource.TEMPLATE, "An X-ray of the chest"),
        cleaned: (TextSource.FILE, "Small left pleural effusion."),
    }
    assert got == {str(dcmread(p).SOPInstanceUID): v for p, v in expected.items()}


def test_files_that_must_not_train_are_left_out_with_their_reason(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(5)
    kept, _ = write_study(data, 0, rng)
    original, _ = write_study(data, 1, rng, sr=False)
    rewrite(original, PatientIdentityRemoved=None)
    synthetic, _ = write_study(data, 2, rng, sr=False)
    rewrite(synthetic, SyntheticData="YES")
    (data / "notes.bin").write_bytes(b"not a DICOM file")
    training = collect([data], 64, TEMPLATES)
    assert [e.sop_instance_uid for e in training.examples] == [str(dcmread(kept).SOPInstanceUID)]
    assert training.skipped == {Skip.NOT_DICOM: 1, Skip.NOT_DEIDENTIFIED: 1, Skip.SYNTHETIC: 1,
                                Skip.NO_PIXELS: 1}
    with pytest.raises(ValueError, match=r"no training images in 3 files \(1 not DICOM, 1 not "
                                         r"de-identified, 1 synthetic\)"):
        collect([original, synthetic, data / "notes.bin"], 64, TEMPLATES)
    with pytest.raises(ValueError, match="no such file or folder"):
        collect([tmp_path / "missing"], 64, TEMPLATES)


def test_monochrome1_is_inverted_aspect_kept_and_the_middle_frame_taken(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(7)
    wide, _ = write_study(tmp_path, 0, rng, sr=False)
    stored = np.zeros((32, 64), np.uint16)
    stored[:, 32:] = 4095  # MONOCHROME1: the left half (0) is white, the right half black
    rewrite(wide, Rows=32, Columns=64, PhotometricInterpretation="MONOCHROME1",
            WindowCenter=2048, WindowWidth=4096, PixelData=stored.tobytes())
    frames, _ = write_study(tmp_path, 1, rng, sr=False)
    stack = np.zeros((3, 64, 64), np.uint16)
    stack[1, :, :16] = 4095  # only the middle frame has a bright left quarter
    stack[0, :, 48:] = stack[2, :, 48:] = 4095
    rewrite(frames, NumberOfFrames=3, WindowCenter=2048, WindowWidth=4096,
            PixelData=stack.tobytes())
    images = {e.sop_instance_uid: e.image for e in collect([tmp_path], 64, TEMPLATES).examples}
    image = images[str(dcmread(wide).SOPInstanceUID)]
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    # 32 x 64 fitted into 64 x 64: rows 16..47, padded with 0 above and below
    assert image[18:46, 2:30].min() > 0.95 and image[18:46, 34:62].max() < 0.05
    assert image[:15].max() == 0 and image[49:].max() == 0
    middle = images[str(dcmread(frames).SOPInstanceUID)][..., 0]
    assert middle[:, :14].min() > 0.95 and middle[:, 18:].max() < 0.05


def test_data_hash_follows_the_data_not_the_folder(tmp_path: Path) -> None:
    write_studies(tmp_path / "a", 3)
    first = collect([tmp_path / "a"], 64, TEMPLATES)
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert collect([tmp_path / "elsewhere"], 64, TEMPLATES).data_hash == first.data_hash
    assert len(first.data_hash) == 64
    sr = tmp_path / "elsewhere" / "b" / "study001" / "report.dcm"
    doc = dcmread(sr)
    doc.ContentSequence[0].TextValue = "FINDINGS: a different finding."
    doc.save_as(sr, enforce_file_format=True)
    assert collect([tmp_path / "elsewhere"], 64, TEMPLATES).data_hash != first.data_hash


def test_default_sources_are_the_work_folders_that_still_exist(tmp_path: Path) -> None:
    settings = Settings.model_validate({"jobs": {"work_dir": str(tmp_path / "work")}})
    assert default_sources(settings) == []
    for name in ("job-b", "job-a", "job-a.source"):
        (tmp_path / "work" / name).mkdir(parents=True)
    assert default_sources(settings) == [tmp_path / "work" / "job-a", tmp_path / "work" / "job-b"]


def test_report_in_prompts_and_templates() -> None:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    templates = {"default": "An X-ray of the {BodyPartExamined}", "CR": "{BodyPartExamined}: "
                 "{report}"}
    assert prompt_for(ds, templates, "A radiograph. {report}", "small effusion") == (
        "A radiograph. small effusion")
    assert prompt_for(ds, templates, report="small effusion") == "chest: small effusion"
    assert prompt_for(ds, templates) == "chest:"
    assert prompt_for(ds, templates, "{report}") == "chest:"  # blank: the template instead
    assert prompt_for(ds, templates, "no field here", "ignored") == "no field here"


def test_read_report_takes_text_files_and_srs_only(tmp_path: Path) -> None:
    image, sr = planted_study(tmp_path, 0)
    text, doc = read_report(sr)
    assert text == REPORT and doc is not None and doc.PatientID == PATIENT_ID
    (tmp_path / "r.txt").write_text("FINDINGS: cardiomegaly.\n")
    assert read_report(tmp_path / "r.txt") == ("FINDINGS: cardiomegaly.\n", None)
    with pytest.raises(ValueError, match="not a report"):
        read_report(image)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_report(tmp_path / "empty.txt")


# -- {report} in generation: a job and synthnode generate ------------------------------------

@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    cache = tmp_path_factory.mktemp("models")
    return Settings.model_validate({
        "generate": {"cache_dir": str(cache), "steps": 2, "batch_size": 2},
        "deid": {"key": KEY, "detect_text": False},
    })


def run_job(settings: Settings, synthesizer: Synthesizer, task: RuleTask, sources: list[Path],
            work: Path):
    deidentifiers = Deidentifiers(settings.deid, lambda d: Deidentifier(d, settings.output))
    return synthesizer.make(task, sources, work, deidentifiers=deidentifiers, job_id="job-1",
                            rule="r", task_index=0, read=dcmread, own=lambda ds, made: False,
                            check_space=lambda: None)


def test_a_job_prompts_from_the_study_report_and_never_takes_an_sr_as_image(
    settings: Settings, tmp_path: Path
) -> None:
    image, sr = planted_study(tmp_path / "study", 0, original=True)
    # as in the spool: one folder per series
    (tmp_path / "study" / "sr-series").mkdir()
    sr = sr.rename(tmp_path / "study" / "sr-series" / sr.name)
    originals = [str(dcmread(image).SOPInstanceUID), str(dcmread(sr).SOPInstanceUID),
                 str(dcmread(image).StudyInstanceUID)]
    assert split_reports([sr, image]) == ([sr], [image])
    synthesizer = Synthesizer(settings)
    text2img = RuleTask(task="text2img", prompt="A chest X-ray. {report}")
    made = run_job(settings, synthesizer, text2img, [image, sr], tmp_path / "t2i")
    # one request, from the image series (before, the SR series made a second, quarantined)
    assert made.quarantined == 0
    (out,) = made.files
    ds = dcmread(out.source)
    assert "prompt \"A chest X-ray. EXAMINATION: CHEST PA. FINDINGS: small left pleural " \
           "effusion." in ds.DerivationDescription
    assert scan(out.source, [*PLANTED, "19510923", *originals]) == []
    assert ds.PatientIdentityRemoved == "YES" and ds.SyntheticData == "YES"
    assert any("report instance(s) (SR)" in n for n in made.notes)
    # img2img over a study with its report: the SR is read for text, never made an image
    # (before, the Basic Profile quarantined it, and with clean_structured_content its missing
    # pixel data failed the whole job)
    for options in (None, ["clean_structured_content"]):
        made = run_job(settings, synthesizer, RuleTask(task="img2img", strength=0.5,
                                                       options=options),
                       [image, sr], tmp_path / f"i2i-{options}")
        assert len(made.files) == 1 and made.quarantined == 0
        source = dcmread(made.files[0].source).SourceImageSequence[0].ReferencedSOPClassUID
        assert source == dcmread(image).SOPClassUID
    # text2img over the report alone: one image from it, with a synthetic identity
    made = run_job(settings, synthesizer, RuleTask(task="text2img", prompt="{report}"), [sr],
                   tmp_path / "report-only")
    (alone,) = made.files
    ds = dcmread(alone.source)
    assert str(ds.PatientName).startswith("SYNTHETIC^")
    assert "small left pleural effusion" in ds.DerivationDescription
    assert scan(alone.source, [*PLANTED, "19510923", *originals]) == []


def test_cli_generate_with_a_report_records_the_cleaned_findings(
    settings: Settings, tmp_path: Path
) -> None:
    _, sr = planted_study(tmp_path / "study", 0, original=True)
    cfg = write_config(tmp_path / "gen.toml", {"generate": {
        "cache_dir": str(settings.generate.cache_dir), "steps": 2}})
    env = {k: v for k, v in os.environ.items() if k != "SYNTHNODE__DEID__KEY"}
    base = [*SYNTHNODE, "--config", str(cfg), "generate", "--task", "text2img", "--report",
            str(sr)]
    bad = subprocess.run([*base, "--prompt", "no field", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--prompt has no {report}" in bad.stderr
    res = subprocess.run([*base, "--prompt", "A chest X-ray. {report}", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    (dcm,) = (tmp_path / "out").glob("*.dcm")
    assert "FINDINGS: small left pleural effusion. IMPRESSION: small left pleural effusion." \
        in dcmread(dcm).DerivationDescription
    assert scan(dcm, [*PLANTED, "19510923", str(dcmread(sr).SOPInstanceUID)]) == []
