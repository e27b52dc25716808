"""Fine-tuning for real on the CPU: the tiny model (its VAE fitted to phantoms, ``tiny_base``)
trained on phantom radiographs with report-like texts; the results loaded by plain diffusers and
by the node; LoRA merged into plain weights; an interrupted run resumed to the same weights."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from safetensors.torch import load_file

from node.config import GenerateSettings, Settings, TaskKind
from node.generate.copycheck import Refused, TrainingIndex
from node.generate.finetune import (
    CHECKPOINTS,
    LOSS_LOG,
    FinetuneSettings,
    LossSummary,
    batch_indices,
    finetune,
)
from node.generate.models import ModelError, Models, weights_hash
from node.generate.tasks import Generation, Request
from node.generate.training import INDEX_FILE, TRAINING_RECORD, TrainingRecord, TrainingSet
from node.generate.trainset import collect
from tests.trainingdata import write_studies

# The module fixtures build and fine-tune models: on a loaded machine their setup alone can pass
# pytest-timeout's default of 300 s per test.
pytestmark = pytest.mark.timeout(900)

R = 64  # the tiny model's resolution in px
UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"


def training_set(folder: Path, count: int, seed: int = 1) -> TrainingSet:
    """``count`` phantom CR studies with SR reports (all four findings) written into ``folder``
    and read back as training pairs, as ``synthnode model finetune`` reads them."""
    write_studies(folder, count, seed)
    return collect([folder], R, GenerateSettings().prompt_templates)


def cpu(**kw: object) -> FinetuneSettings:
    values: dict[str, object] = {"device": "cpu", "checkpoint_every": 0, "batch_size": 8}
    return FinetuneSettings(**{**values, **kw})  # type: ignore[arg-type]


def weights(folder: Path, rel: str) -> dict[str, torch.Tensor]:
    return load_file(folder / rel)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert set(a) == set(b)
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def data32(tmp_path_factory: pytest.TempPathFactory) -> TrainingSet:
    return training_set(tmp_path_factory.mktemp("studies32"), 32)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> TrainingSet:
    return training_set(tmp_path_factory.mktemp("studies8"), 8, seed=2)


# How hard the copy-check tests train: 150 steps of 8 at 3e-3. Measured here: one image trained
# so makes text2img outputs at its own prompt that the check refuses for every seed tried (VAE
# features 0.98-0.996, threshold 0.95); 120 steps, only 5 of 8 seeds; 100 steps, none. 32 varied
# images trained the same way give outputs at most 0.78.
STEPS, LR = 150, 3e-3
OVERFIT_STEPS = 300  # one image: at 150 steps 2 of 4 outputs reach the 0.99 default, at 300 all 4


@pytest.fixture(scope="module")
def tuned(tiny_base: Path, data32: TrainingSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base fully fine-tuned (UNet only) on 32 varied phantom studies."""
    out = tmp_path_factory.mktemp("tuned") / "model"
    finetune(str(tiny_base), data32, out, cpu(steps=STEPS, learning_rate=LR), progress=False)
    return out


def generation(model: Path) -> Generation:
    return Generation(Settings.model_validate(
        {"generate": {"model": str(model), "device": "cpu", "steps": 30}}))


def text2img(model: Path, prompt: str, seeds: range) -> list[Dataset | Refused]:
    gen = generation(model)
    return [out for seed in seeds
            for out in gen.run(Request(TaskKind.TEXT2IMG, prompt=prompt, seed=seed))]


# --- the full fine-tune ------------------------------------------------------------------------


def test_loss_falls_and_only_the_unet_changes(tuned: Path, tiny_base: Path) -> None:
    loss = LossSummary.of(tuned)
    assert loss is not None and len(loss.values) == STEPS
    assert loss.last < 0.5 * loss.first, (loss.first, loss.last)
    assert changed(weights(tuned, UNET), weights(tiny_base, UNET))
    # Without text_encoder the text encoder is the base's; the VAE is always frozen.
    assert not changed(weights(tuned, TEXT), weights(tiny_base, TEXT))
    assert not changed(weights(tuned, VAE), weights(tiny_base, VAE))
    # Nothing left over: no checkpoints in the model, no temporary siblings.
    assert not (tuned / CHECKPOINTS).exists()
    assert [p.name for p in tuned.parent.iterdir()] == ["model"]


def test_result_loads_with_plain_diffusers(tuned: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tuned, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("chest pa", num_inference_steps=2, height=R, width=R, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, R, R, 3) and np.isfinite(image).all()


def test_node_generates_with_it_and_differs_from_the_base(tuned: Path, tiny_base: Path) -> None:
    prompt = ["chest pa. findings: small left pleural effusion."]
    out = {}
    for name, folder in (("tuned", tuned), ("base", tiny_base)):
        models = Models(GenerateSettings(model=str(folder), device="cpu", steps=10))
        assert models.info.weights_hash == weights_hash(folder)
        out[name] = models.text2img(prompt, [7])
    assert models.info.resolution == R
    assert float(np.abs(out["tuned"] - out["base"]).mean()) > 0.02


def test_training_record(tuned: Path, tiny_base: Path, data32: TrainingSet) -> None:
    record = TrainingRecord.load(tuned)
    assert record is not None
    assert record.base_model == str(tiny_base)
    assert record.base_weights_hash == weights_hash(tiny_base)
    assert record.data_hash == data32.data_hash
    assert (record.images, record.steps) == (32, STEPS)
    assert record.settings["method"] == "full" and record.settings["text_encoder"] is False
    assert record.settings["learning_rate"] == LR and record.settings["batch_size"] == 8
    assert record.settings["resolution"] == R
    assert record.settings["mixed_precision"] == "no"  # the CPU trains float32
    assert record.settings["gradient_checkpointing"] is False  # auto: off on the CPU
    assert record.settings["prediction_type"] == "epsilon"
    losses = json.loads((tuned / LOSS_LOG).read_text())
    assert record.final_loss == pytest.approx(np.mean(losses[-15:]), rel=1e-5)
    assert record.created.endswith("+00:00")
    assert record.data_hash[:16] in record.describe()
    # The record is not a weight file: the model's hash covers the weights only.
    assert TRAINING_RECORD not in {p.name for p in (tuned / "unet").iterdir()}
    # The training-set index: every training image (and its VAE reconstruction), no pixels.
    index = TrainingIndex.load(tuned)
    assert index is not None and index.images == 32 and len(index) == 64
    assert set(index.uids) == {e.sop_instance_uid for e in data32.examples}
    assert record.index == index.summary() and record.index["file"] == INDEX_FILE
    assert record.index["feature_space"].startswith("vae encoder sha256:")


def test_the_record_reaches_the_outputs_provenance(tuned: Path, data32: TrainingSet) -> None:
    record = TrainingRecord.load(tuned)
    assert record is not None
    (made,) = text2img(tuned, "chest pa", range(1))
    assert isinstance(made, Dataset), made
    assert made.SyntheticData == "YES"
    described = str(made.DerivationDescription)
    assert f"data sha256:{record.data_hash[:16]}" in described
    assert f"fine-tuned from sha256:{record.base_weights_hash[:16]} on 32 images" in described
    assert "copy check: nearest training image" in described


# --- the copy check on what fine-tuning makes --------------------------------------------------


def test_an_overfit_model_makes_copies_the_check_refuses(tiny_base: Path, tmp_path: Path) -> None:
    one = training_set(tmp_path / "one", 1, seed=5)
    model = tmp_path / "overfit"
    finetune(str(tiny_base), one, model, cpu(steps=OVERFIT_STEPS, learning_rate=LR),
             progress=False)
    uid = one.examples[0].sop_instance_uid
    outputs = text2img(model, one.examples[0].text, range(4))
    for out in outputs:
        assert isinstance(out, Refused), out
        assert out.reason.startswith("possible copy of a training image")
        assert out.score.feature_uid == uid and out.score.feature >= 0.95
        # Refused outputs still carry their score in their provenance (quarantine shows it).
        assert "copy check: nearest training image" in str(out.dataset.DerivationDescription)


def test_a_model_trained_on_varied_images_makes_outputs_the_check_passes(
    tuned: Path, data32: TrainingSet
) -> None:
    prompts = sorted({e.text for e in data32.examples})
    assert len(prompts) == 4
    outputs = [out for prompt in prompts for out in text2img(tuned, prompt, range(2))]
    refused = [out.reason for out in outputs if isinstance(out, Refused)]
    assert not refused, refused


def test_out_must_not_hold_a_model(tuned: Path, tiny_base: Path, small: TrainingSet) -> None:
    with pytest.raises(ValueError, match="already holds a model"):
        finetune(str(tiny_base), small, tuned, cpu(steps=1), progress=False)


# --- LoRA, the text encoder, gradient checkpointing ---------------------------------------------


def test_lora_with_text_encoder_merges_into_plain_weights(
    tiny_base: Path, small: TrainingSet, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel

    out = tmp_path / "lora"
    record = finetune(str(tiny_base), small, out,
                      cpu(method="lora", rank=4, text_encoder=True, steps=10, learning_rate=1e-2,
                          gradient_checkpointing="on"), progress=False)
    assert record.settings["lora_rank"] == 4 and record.settings["gradient_checkpointing"]
    unet, base = weights(out, UNET), weights(tiny_base, UNET)
    assert not [k for k in unet if "lora" in k]  # merged: the base's parameter names only
    moved = changed(unet, base)
    # LoRA adapts the attention projections only, and every one of them.
    assert moved and all(k.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0"))
                         for k in moved), sorted(moved)
    assert {k.rsplit(".", 1)[0] for k in moved} == {
        k.rsplit(".", 1)[0] for k in base if ".to_" in k and k.endswith("weight")}
    text = changed(weights(out, TEXT), weights(tiny_base, TEXT))
    assert text and all(k.rsplit(".", 1)[0].endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
                        for k in text), sorted(text)
    # Loads without peft adapters: a plain UNet with the merged weights.
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not getattr(loaded, "peft_config", None)


def test_gradient_checkpointing_changes_only_rounding(
    tiny_base: Path, small: TrainingSet, tmp_path: Path
) -> None:
    data = small
    for mode in ("on", "off"):
        finetune(str(tiny_base), data, tmp_path / mode,
                 cpu(steps=3, text_encoder=True, learning_rate=1e-3, gradient_checkpointing=mode),
                 progress=False)
    on, off = (json.loads((tmp_path / m / LOSS_LOG).read_text()) for m in ("on", "off"))
    assert on == pytest.approx(off, rel=1e-4)
    a, b = weights(tmp_path / "on", UNET), weights(tmp_path / "off", UNET)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# --- resuming ----------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumed_ends_with_the_same_weights(
    tiny_base: Path, tmp_path: Path
) -> None:
    data = training_set(tmp_path / "studies", 12)
    settings = cpu(steps=9, batch_size=4, checkpoint_every=4, text_encoder=True,
                   learning_rate=1e-3)
    whole = tmp_path / "whole"
    finetune(str(tiny_base), data, whole, settings, progress=False)

    def stop_at_6(step: int, loss: float) -> None:
        if step == 6:
            raise Interrupted

    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        finetune(str(tiny_base), data, part, settings, progress=False, on_step=stop_at_6)
    # What an interruption leaves: the newest checkpoint (steps 1-4), no model.
    assert [p.name for p in (part / CHECKPOINTS).iterdir()] == ["step-4"]
    assert not (part / "model_index.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        finetune(str(tiny_base), data, part, settings, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        finetune(str(tiny_base), data, part, cpu(steps=9, batch_size=4, checkpoint_every=4,
                                                 text_encoder=True, learning_rate=2e-3),
                 progress=False, resume=True)

    record = finetune(str(tiny_base), data, part, settings, progress=False, resume=True)
    assert record.steps == 9 and not (part / CHECKPOINTS).exists()
    # Bit for bit, on the CPU: weights, and the loss of every step.
    for rel in (UNET, TEXT):
        assert not changed(weights(part, rel), weights(whole, rel)), rel
    assert json.loads((part / LOSS_LOG).read_text()) == json.loads((whole / LOSS_LOG).read_text())
    assert record.final_loss == TrainingRecord.load(whole).final_loss  # type: ignore[union-attr]


def test_batches_are_a_function_of_seed_and_step() -> None:
    # Every epoch visits every example once, in an order that depends on the seed.
    first_epoch = [i for step in range(3) for i in batch_indices(5, step, 4, 12)]
    assert sorted(first_epoch) == list(range(12))
    assert first_epoch != [i for step in range(3) for i in batch_indices(6, step, 4, 12)]
    # A batch straddling two epochs takes the end of one and the start of the next.
    assert batch_indices(5, 2, 5, 12) == (
        [i for s in range(3) for i in batch_indices(5, s, 4, 12)][10:12]
        + [i for s in range(3, 6) for i in batch_indices(5, s, 4, 12)][:3])


# --- settings and bad input --------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "match"), [
    ({"method": "qlora"}, 'method "qlora"'),
    ({"steps": 0}, "steps 0"),
    ({"resolution": 60}, "resolution 60"),
    ({"learning_rate": 2.0}, "learning_rate 2.0"),
    ({"empty_prompt_fraction": 1.0}, "empty_prompt_fraction"),
    ({"device": "tpu"}, 'device "tpu"'),
])
def test_settings_are_validated(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FinetuneSettings(**kw)  # type: ignore[arg-type]


def test_bad_input_fails_before_anything_is_written(
    tiny_base: Path, small: TrainingSet, tmp_path: Path
) -> None:
    out = tmp_path / "never"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="autocast needs a CUDA device"):
            finetune(str(tiny_base), small, out, cpu(mixed_precision="bf16"))
    with pytest.raises(ValueError, match="collect the training set at the training resolution"):
        finetune(str(tiny_base), small, out, cpu(resolution=128))
    with pytest.raises(ValueError, match="no training pairs"):
        finetune(str(tiny_base), TrainingSet([], "0" * 64, {"not de-identified": 3}), out, cpu())
    with pytest.raises(ModelError, match='base model ".*missing": no such folder'):
        finetune(str(tmp_path / "missing"), small, out, cpu())
    assert not out.exists()


def test_v_prediction_base_trains_against_the_velocity(
    tiny_base: Path, small: TrainingSet, tmp_path: Path
) -> None:
    v_base = tmp_path / "v-base"
    shutil.copytree(tiny_base, v_base)
    config = v_base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "prediction_type": "v_prediction"}))
    data = small
    records = {name: finetune(str(folder), data, tmp_path / name, cpu(steps=2), progress=False)
               for name, folder in (("v", v_base), ("eps", tiny_base))}
    assert records["v"].settings["prediction_type"] == "v_prediction"
    # Same batches, noise and timesteps (same seed): only the target differs. With the same
    # target the losses agree to 1e-5 (test_a_single_file_base_trains_as_its_folder_does); at
    # small timesteps the velocity is close to the noise, so the difference can be small.
    v, eps = (json.loads((tmp_path / n / LOSS_LOG).read_text()) for n in ("v", "eps"))
    assert v != pytest.approx(eps, rel=1e-5)


def test_a_single_file_base_trains_as_its_folder_does(
    tiny_base: Path, small: TrainingSet, tmp_path: Path
) -> None:
    from tests.test_model_weights import save_safetensors, to_original

    file = save_safetensors(to_original(tiny_base), tmp_path / "base.safetensors")
    single = finetune(str(file), small, tmp_path / "from-file",
                      cpu(steps=3, single_file_config=str(tiny_base)), progress=False)
    assert single.base_model == str(file)
    assert single.base_weights_hash == hashlib.sha256(file.read_bytes()).hexdigest()
    finetune(str(tiny_base), small, tmp_path / "from-folder", cpu(steps=3), progress=False)
    # The same model, whichever form it came in: the same losses, the same result.
    a, b = (json.loads((tmp_path / n / LOSS_LOG).read_text()) for n in ("from-file", "from-folder"))
    assert a == pytest.approx(b, rel=1e-5)
    with pytest.raises(ModelError, match="single_file_config"):
        finetune(str(file), small, tmp_path / "never", cpu(steps=1, single_file_config=str(
            tmp_path)), progress=False)


# --- the command line --------------------------------------------------------------------------


def test_cli_trains_and_prints_a_summary_without_patient_data(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from node.cli import main

    monkeypatch.delenv("SYNTHNODE_CONFIG", raising=False)
    studies = tmp_path / "studies"
    write_studies(studies, 6, seed=3)
    out = tmp_path / "model"
    code = main(["model", "finetune", "--base", str(tiny_base), "--data", str(studies),
                 "--out", str(out), "--steps", "4", "--batch-size", "2", "--checkpoint-every",
                 "2", "--device", "cpu", "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = TrainingRecord.load(out)
    assert record is not None and (record.images, record.steps) == (6, 4)
    assert "fine-tuned on 6 images (texts: 6 sr; files left out: 6 no pixel data)" in printed.out
    assert f"data sha256 {record.data_hash}" in printed.out
    assert re.search(r"loss \d+\.\d{4} -> \d+\.\d{4}", printed.out)
    assert str(out.resolve()) in printed.out
    # Counts and hashes only: no pseudonym, placeholder or report text, on either stream.
    for leak in ("SNA", "___", "pleural", "cardiomegaly", "19000101"):
        assert leak not in printed.out + printed.err
    # A second run into the finished model is refused with the fix.
    code = main(["model", "finetune", "--base", str(tiny_base), "--data", str(studies),
                 "--out", str(out), "--steps", "4", "--device", "cpu", "--quiet"])
    assert code == 2 and "already holds a model" in capsys.readouterr().err


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_lora_text_encoder_checkpointing(
    tiny_base: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    data = training_set(tmp_path / "studies", 16)
    runs = {
        "bf16-lora-te": {"method": "lora", "text_encoder": True, "mixed_precision": "bf16",
                         "learning_rate": 1e-2},
        "fp16-full-te": {"method": "full", "text_encoder": True, "mixed_precision": "fp16",
                         "learning_rate": 1e-3},
    }
    for name, kw in runs.items():
        out = tmp_path / name
        record = finetune(str(tiny_base), data, out,
                          FinetuneSettings(device="cuda", steps=20, checkpoint_every=0, **kw),
                          progress=False)
        assert record.settings["mixed_precision"] == kw["mixed_precision"]
        assert record.settings["gradient_checkpointing"] is True  # auto: on with CUDA
        assert record.settings["device"].startswith("cuda")
        assert np.isfinite(record.final_loss)  # type: ignore[arg-type]
        assert changed(weights(out, UNET), weights(tiny_base, UNET))
        assert changed(weights(out, TEXT), weights(tiny_base, TEXT))
        pipe = StableDiffusionPipeline.from_pretrained(out).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        image = pipe("chest pa", num_inference_steps=2, height=R, width=R,
                     output_type="np").images
        assert np.isfinite(image).all()
