"""The copy check: the training-set index holds no pixels; copies of training images are refused
and different images pass; an output is not compared with its own source; refused outputs never
reach Orthanc and are reported with their score.

Features are the ``tiny_base`` VAE's (fitted to phantoms, tests/trainingdata.py): they show
the check's plumbing and its behaviour on phantoms, not its fidelity on real radiographs.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.config import DeidSettings, GenerateSettings, OutputSettings, Settings, TaskKind
from node.deid import Deidentifier
from node.generate import copycheck
from node.generate.copycheck import CopyCheck, Refused, TorchScriptFeatures, TrainingIndex
from node.generate.models import ModelError, Models
from node.generate.pixels import display_frames, to_model
from node.generate.tasks import Generation, Request, synthesize
from node.generate.training import INDEX_FILE, Example, TrainingRecord, TrainingSet
from node.localorthanc import OrthancProcess
from tests.nodeproc import SYNTHNODE, NodeProcess, storescu, write_config
from tests.test_jobs import jobs_node, records, wait_for
from tests.trainingdata import phantom, write_study

# The module fixtures build and fine-tune models: on a loaded machine their setup alone can pass
# pytest-timeout's default of 300 s per test.
pytestmark = pytest.mark.timeout(900)

R = 64  # the tiny model's resolution
KEY = "copycheck-key-Q4w8Er2Ty6Ui0Op3As7Df1Gh5Jk9Lz"


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


def phantoms(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rgb(phantom(rng, R, i % 4)) for i in range(count)])


def training_set(images: np.ndarray) -> TrainingSet:
    return TrainingSet([Example(generate_uid(), generate_uid(), image, "chest x-ray", "sr")
                        for image in images], data_hash="0" * 64)


def noisy(images: np.ndarray, sigma: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def model(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fitted tiny model with no index (tests add theirs to their own copies)."""
    folder = tmp_path_factory.mktemp("copycheck") / "model"
    shutil.copytree(tiny_base, folder)
    return folder


@pytest.fixture(scope="module")
def indexed(model: Path) -> tuple[Path, TrainingSet, TrainingIndex]:
    """A copy of the model whose index holds 24 training phantoms."""
    folder = model.parent / "indexed"
    shutil.copytree(model, folder)
    training = training_set(phantoms(24, seed=0))
    return folder, training, copycheck.build_index(folder, training)


@pytest.fixture(scope="module")
def check(indexed: tuple[Path, TrainingSet, TrainingIndex]) -> CopyCheck:
    folder, _, _ = indexed
    made = CopyCheck.load(folder, GenerateSettings())  # the default thresholds
    assert made is not None
    return made


def copy_of(folder: Path, name: str) -> Path:
    target = folder.parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    (target / INDEX_FILE).unlink(missing_ok=True)
    return target


def test_the_index_holds_no_pixels(indexed: tuple[Path, TrainingSet, TrainingIndex]) -> None:
    folder, training, index = indexed
    path = folder / INDEX_FILE
    n = len(training.examples)
    with np.load(path, allow_pickle=False) as data:
        shapes = {name: data[name].shape for name in data.files}
    # Each image and its VAE reconstruction: 128 numbers (mean and spread of 4 latent channels
    # on a 4x4 grid) and a 256-bit hash; no array has an image's size.
    assert shapes["embeddings"] == (2 * n, 2 * 4 * 4 * 4)
    assert shapes["hashes"] == (2 * n, 32) and shapes["uids"] == (2 * n,)
    assert max(int(np.prod(s)) // max(s[0], 1) if s else 1 for s in shapes.values()) < R * R
    assert set(index.uids) == {e.sop_instance_uid for e in training.examples}
    size = path.stat().st_size
    assert size < 0.15 * training.images.nbytes, size  # 64x64x3 float32 images: 1.2 MB
    # No run of 16 bytes of any training image, as float32, uint8 or uint16 pixels, is in it.
    blob = path.read_bytes()
    for image in training.images:
        for rendition in (image, np.rint(image * 255).astype(np.uint8),
                          np.rint(image * 65535).astype(np.uint16),
                          image[..., 0].copy(), np.rint(image[..., 0] * 255).astype(np.uint8)):
            raw = rendition.tobytes()
            for start in range(0, len(raw) - 16, 16):
                window = raw[start:start + 16]
                if len(set(window)) >= 6:  # (runs of one value, e.g. black, say nothing)
                    assert window not in blob


def test_copies_are_refused_and_different_phantoms_pass(
    indexed: tuple[Path, TrainingSet, TrainingIndex], check: CopyCheck
) -> None:
    _, training, _ = indexed
    images, uids = training.images[:8], [e.sop_instance_uid for e in training.examples[:8]]
    vae = copycheck.load_vae(indexed[0])
    for name, copies in {
        "exact": images, "noise 0.05": noisy(images, 0.05), "noise 0.10": noisy(images, 0.10),
        "VAE reconstruction": copycheck.vae_reconstruct(vae, images),
    }.items():
        for uid, score in zip(uids, check.score(copies), strict=True):
            reason = check.refusal(score)
            assert reason.startswith("possible copy of a training image: "), (name, score)
            assert score.feature_uid == uid and uid in reason, (name, score)
    # The false-positive side: 100 phantoms not in the training set, as drawn and as the VAE
    # reconstructs them (what a model that copies nothing outputs), pass at the defaults.
    held = phantoms(100, seed=12345)
    for name, others in {"held out": held,
                         "reconstructed": copycheck.vae_reconstruct(vae, held)}.items():
        scores = check.score(others)
        refused = [s for s in scores if check.refusal(s)]
        assert refused == [], (name, refused[:3])
        assert max(s.feature for s in scores) < check.feature_threshold
        assert max(s.hash for s in scores) < check.hash_threshold


def test_an_output_is_not_compared_with_its_own_source(
    indexed: tuple[Path, TrainingSet, TrainingIndex], check: CopyCheck
) -> None:
    _, training, _ = indexed
    image, uid = training.images[:1], training.examples[0].sop_instance_uid
    (alone,) = check.score(image)
    (excluded,) = check.score(image, exclude=[uid])
    assert alone.feature_uid == uid and check.refusal(alone)
    assert excluded.feature_uid != uid and excluded.hash_uid != uid
    assert check.refusal(excluded) == ""
    # Per image: the second is excluded from its own training image only.
    both = check.score(np.concatenate([image, image]), exclude=[None, uid])
    assert [bool(check.refusal(s)) for s in both] == [True, False]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_torchscript_feature_space_and_a_mismatch_named(
    indexed: tuple[Path, TrainingSet, TrainingIndex], tmp_path: Path
) -> None:
    _, training, _ = indexed
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))  # random weights: plumbing, not fidelity
    features = TorchScriptFeatures(path)
    assert features.name.startswith(f"torchscript {path} sha256:")
    index = TrainingIndex.build(training.images, [e.sop_instance_uid for e in training.examples],
                                features)
    assert index.embeddings.shape == (len(training.examples), 8 * 4 * 4)
    (score,) = index.nearest(training.images[3:4], features)
    assert score.feature == pytest.approx(1.0, abs=1e-5)
    assert score.feature_uid == training.examples[3].sop_instance_uid
    # An index built in one feature space is never compared in another.
    folder = copy_of(indexed[0], "torchscript-model")
    index.save(folder)
    with pytest.raises(ModelError, match="feature space") as info:
        Models(GenerateSettings(model=str(folder), steps=2))
    assert "torchscript" in str(info.value) and "vae encoder" in str(info.value)
    with pytest.raises(ValueError, match="no such file"):
        TorchScriptFeatures(tmp_path / "missing.pt")


# --- generation ---------------------------------------------------------------------------------

PROMPT = "A chest X-ray"
SEED = 5


def generate_settings(folder: Path, **over: Any) -> dict[str, Any]:
    return {"model": str(folder), "steps": 4, **over}


def index_own_outputs(folder: Path, seeds: list[int]) -> list[str]:
    """Index the model's own text2img outputs for PROMPT at ``seeds`` (an overfit model's
    memory, by construction); their made-up training UIDs."""
    models = Models(GenerateSettings(**generate_settings(folder)))
    images = models.text2img([PROMPT] * len(seeds), seeds)
    uids = [generate_uid() for _ in seeds]
    vae = copycheck.load_vae(folder)
    features = copycheck.feature_space(None, folder, vae=vae)
    TrainingIndex.build(images, uids, features,
                        reconstruct=lambda x: copycheck.vae_reconstruct(vae, x)).save(folder)
    return uids


def test_generation_refuses_copies_and_records_the_check_in_provenance(model: Path) -> None:
    folder = copy_of(model, "own-outputs")
    uids = index_own_outputs(folder, [SEED])
    TrainingRecord("tiny", "a" * 64, "b" * 64, 1, 10, {"method": "full"}).save(folder)
    generation = Generation(Settings.model_validate({"generate": generate_settings(folder)}))
    copied, fresh = generation.run(Request(TaskKind.TEXT2IMG, prompt=PROMPT, seed=SEED, num=2))
    assert isinstance(copied, Refused), copied
    assert uids[0] in copied.reason and copied.score.feature > 0.999
    assert "possible copy of a training image: feature similarity 1.000 (threshold 0.990)" in (
        copied.reason)
    assert "copy check: nearest training image feature 1.000" in (
        copied.dataset.DerivationDescription)
    assert not isinstance(fresh, Refused), fresh.score  # type: ignore[attr-defined]
    text = fresh.DerivationDescription
    assert "copy check: nearest training image feature" in text
    assert "training: fine-tuned from sha256:aaaaaaaaaaaaaaaa on 1 images" in text
    # Off: the same output is made and returned as any other.
    off = Generation(Settings.model_validate(
        {"generate": generate_settings(folder, copy_check=False)}))
    assert off.models.copy_check is None
    (made,) = off.run(Request(TaskKind.TEXT2IMG, prompt=PROMPT, seed=SEED))
    assert not isinstance(made, Refused)
    assert made.SOPInstanceUID == copied.dataset.SOPInstanceUID
    assert "copy check" not in made.DerivationDescription


def test_img2img_is_not_compared_with_its_own_deidentified_source(
    model: Path, tmp_path: Path
) -> None:
    """The index holds the model's img2img output for this very source, under the source's
    de-identified UID (as a training set of the node's de-identified studies knows it): the
    output passes; under another instance's UID the same index refuses it."""
    path, _ = write_study(tmp_path / "study", 0, np.random.default_rng(3), sr=False)
    source = dcmread(path)
    deid = Deidentifier(DeidSettings(key=KEY, detect_text=False), OutputSettings())
    deidentified = deid.deidentify(copy.deepcopy(source))
    own = str(deidentified.SOPInstanceUID)
    folder = copy_of(model, "img2img-source")
    models = Models(GenerateSettings(**generate_settings(folder)))
    frames, _ = display_frames(deidentified)
    prepared = to_model(frames[0], R).image[None]
    made = models.img2img(prepared, [PROMPT], [SEED], strength=0.5)
    features = copycheck.feature_space(None, folder)
    settings = Settings.model_validate({"generate": generate_settings(folder),
                                        "deid": {"key": KEY, "detect_text": False}})
    request = Request(TaskKind.IMG2IMG, prompt=PROMPT, seed=SEED, strength=0.5)
    for uid, refused in ((own, False), (generate_uid(), True)):
        TrainingIndex.build(made, [uid], features).save(folder)
        generation = Generation(settings)
        (outputs,) = synthesize(generation, [(request, copy.deepcopy(source))], deid)
        assert not isinstance(outputs, Exception)
        (out,) = outputs
        assert isinstance(out, Refused) is refused, uid
        if refused:
            assert isinstance(out, Refused) and out.dataset.PatientIdentityRemoved == "YES"


def test_cli_generate_refuses_a_copy_and_writes_it_to_quarantine_only(
    model: Path, tmp_path: Path
) -> None:
    folder = copy_of(model, "cli-model")
    (uid,) = index_own_outputs(folder, [SEED])
    cfg = write_config(tmp_path / "gen.toml", {
        "generate": generate_settings(folder),
        "output": {"quarantine_dir": str(tmp_path / "quarantine")}})
    out = tmp_path / "out"
    res = subprocess.run([*SYNTHNODE, "--config", str(cfg), "generate", "--task", "text2img",
                          "--prompt", PROMPT, "--seed", str(SEED), "--num", "2", "--out",
                          str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"REFUSED seed {SEED}: possible copy of a training image: feature similarity" in (
        res.stderr) and uid in res.stderr and "nothing written to" in res.stderr
    (held,) = (tmp_path / "quarantine" / "generate-text2img").glob("*.dcm")
    assert json.loads(held.with_suffix(".reason.json").read_text())["reason"].startswith(
        "possible copy of a training image")
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and held.name not in written  # seed 6's .dcm and .png only
    assert f"seed {SEED + 1}" in res.stdout


# --- through a node to Orthanc ----------------------------------------------------------------

TEXT2IMG = f"""
[[rules]]
name = "synthetic"
[[rules.tasks]]
task = "text2img"
prompt = "{PROMPT}"
seed = {SEED}
num = 2
"""


def node_for(node_factory: Any, tmp_path: Path, orthanc: OrthancProcess, folder: Path,
             name: str, **generate: Any) -> NodeProcess:
    return jobs_node(
        node_factory, tmp_path, orthanc, rules=TEXT2IMG, jobs={
            "gpu_workers": 1, "cpu_workers": 0, "sqlite_file": str(tmp_path / name / "q.db")},
        spool={"dir": str(tmp_path / name / "spool")},
        output={"quarantine_dir": str(tmp_path / name / "quarantine")},
        generate=generate_settings(folder, cache_dir=str(tmp_path / "models"), **generate))


def cli(node: NodeProcess, *args: str) -> str:
    return subprocess.run([*SYNTHNODE, "--config", str(node.config), *args],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_copies_never_reach_orthanc_and_are_reported_with_their_score(
    node_factory: Any, orthanc: OrthancProcess, model: Path, tmp_path: Path
) -> None:
    """A model whose index holds its own text2img outputs at the job's seeds (what an overfit
    model reproduces): the job's outputs are refused, quarantined with the reason, counted and
    shown; with the copy check off the same outputs are delivered."""
    folder = copy_of(model, "node-model")
    uids = index_own_outputs(folder, [SEED, SEED + 1])
    study, _ = write_study(tmp_path / "in", 0, np.random.default_rng(4), sr=False)

    node = node_for(node_factory, tmp_path, orthanc, folder, "on")
    assert storescu(node.port, [study]).returncode == 0
    wait_for(lambda: [j for j in records(node) if j.state.value == "done"], timeout_s=120,
             what="the text2img job")
    (job,) = records(node)
    assert (job.outputs, job.quarantined) == (0, 2), job
    assert orthanc.count_instances() == 0
    assert all("possible copy of a training image: feature similarity 1.000" in n
               for n in job.notes) and {n.rsplit(" ", 1)[1] for n in job.notes} == set(uids)
    held = sorted((tmp_path / "on" / "quarantine" / job.id).glob("*.dcm"))
    assert len(held) == 2
    for dcm in held:
        reason = json.loads(dcm.with_suffix(".reason.json").read_text())["reason"]
        assert reason.startswith("possible copy of a training image: feature similarity")
        ds = dcmread(dcm)
        assert ds.SyntheticData == "YES" and "copy check: nearest" in ds.DerivationDescription
    listing = cli(node, "jobs")
    assert "0 outputs, 2 quarantined" in listing
    assert f"{held[0].stem}: possible copy of a training image: feature similarity" in listing
    (today,) = json.loads(cli(node, "mirror", "status", "--json"))
    assert (today["instances"], today["quarantined"]) == (0, 2)
    reasons = today["quarantine_reasons"]  # UIDs out, scores kept
    assert sum(reasons.values()) == 2 and all(
        r.startswith("possible copy of a training image: feature similarity 1.000 (threshold")
        and r.endswith("to training instance <uid>") for r in reasons)
    assert ": possible copy of a training image: feature similarity" in cli(
        node, "mirror", "status")
    node.stop()

    off = node_for(node_factory, tmp_path, orthanc, folder, "off", copy_check=False)
    assert storescu(off.port, [study]).returncode == 0
    wait_for(lambda: orthanc.count_instances() == 2, timeout_s=120, what="delivered outputs")
    # the outputs are in Orthanc a moment before the job records them
    wait_for(lambda: [j for j in records(off) if j.state.value == "done"], timeout_s=60,
             what="the job done")
    (job,) = records(off)
    assert (job.outputs, job.quarantined) == (2, 0)
    delivered = {i["MainDicomTags"]["SOPInstanceUID"]
                 for i in orthanc.get_json("/instances?expand")}
    assert delivered == {p.stem for p in held}  # the very outputs refused before
