"""Real weights, as users have them: original-format single-file checkpoints (``.safetensors``,
``.ckpt``) made from the tiny model in code, loaded by the node and generating the same pixels
as the diffusers folder they came from; damaged or missing weights refused at start (``synthnode
check``, ``serve``, ``worker``) with a message naming the file and the fix, never at the first
job; a ``.ckpt`` that pickles code refused without being unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.config import GenerateSettings
from node.generate.models import ModelError, Models, weights_hash
from node.generate.tiny import INPAINT_SUBFOLDER, build_tiny
from node.generate.weights import SD15_REPO, weights_problems
from node.localorthanc import free_port
from tests.nodeproc import SYNTHNODE, write_config

KEY = "model-weights-key-Vb3Nq8Lx1Tz6Wm4Rk9Pj2Hs7Gc5Fd0Ae"
PROMPTS = ["chest x-ray, small left pleural effusion", "chest x-ray, no acute findings"]
SEEDS = [11, 12]
TEXT2IMG = '[[rules]]\nname = "gen"\n[[rules.tasks]]\ntask = "text2img"\n'


# --- the reverse of diffusers' single-file conversion, for the tiny architecture ---------------
#
# Adapted from diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py (Copyright The
# HuggingFace Team, Apache License 2.0, https://github.com/huggingface/diffusers), whose block
# numbering is hard-coded for SD's 4 blocks of 2 layers; here it follows the model's config
# (blocks, layers per block, which blocks attend). On SD 1.5's architecture (a meta-device UNet and
# VAE) this mapping gives the script's names for every tensor, checked once when it was written.

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection"))


def _renamed(key: str, prefixes: dict[str, str]) -> str:
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    return key if best is None else prefixes[best] + key[len(best):]


def _unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    per, blocks = config["layers_per_block"] + 1, len(config["down_block_types"])
    prefixes = {"time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "conv_in.": "input_blocks.0.0.",
                "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.0.": "middle_block.0.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i in range(blocks):
        for j in range(per - 1):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{per * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{per * i + j + 1}.1."
        for j in range(per):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{per * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{per * i + j}.1."
        if i < blocks - 1:  # the last block neither down- nor upsamples
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (
                f"input_blocks.{per * (i + 1)}.0.op.")
            attends = "CrossAttn" in config["up_block_types"][i]
            prefixes[f"up_blocks.{i}.upsamplers.0."] = (
                f"output_blocks.{per * i + per - 1}.{2 if attends else 1}.")
    out = {}
    for key, value in state.items():
        name = _renamed(key, prefixes)
        if "resnets" in key:
            for ours, theirs in _RESNET:
                name = name.replace(f".{ours}.", f".{theirs}.")
        out["model.diffusion_model." + name] = value
    return out


def _vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    blocks, layers = len(config["down_block_types"]), config["layers_per_block"]
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.",
                "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for j in range(2):
            prefixes[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(blocks):
        up = blocks - 1 - i  # the original numbers the decoder's blocks the other way round
        for j in range(layers):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(layers + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{up}.upsample."
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                 "to_out.0.": "proj_out."}
    out = {}
    for key, value in state.items():
        name = _renamed(key, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in name:
            head, tail = name.split(".mid.attn_1.")
            name = f"{head}.mid.attn_1.{_renamed(tail, attention)}"
            if value.ndim == 2:  # the original's attention projections are 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + name] = value
    return out


def _text_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 saves CLIPTextModel without its "text_model." level; SD 1.x files have it.
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.")
                                               else "text_model." + k): v
            for k, v in state.items()}


def to_original(folder: Path) -> dict[str, Any]:
    """The state dict of an original-format SD checkpoint holding ``folder``'s UNet, VAE and
    CLIP text encoder (a diffusers StableDiffusionPipeline folder)."""
    from safetensors.torch import load_file

    def config(name: str) -> dict[str, Any]:
        return json.loads((folder / name / "config.json").read_text())

    return {
        **_unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                       config("unet")),
        **_vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                      config("vae")),
        **_text_to_ldm(load_file(folder / "text_encoder" / "model.safetensors")),
    }


def save_safetensors(state: dict[str, Any], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_ckpt(state: dict[str, Any], path: Path, **extra: Any) -> Path:
    import torch

    torch.save({"state_dict": state, "global_step": 1, **extra}, path)  # as SD's own .ckpt
    return path


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def files(tiny: Path) -> dict[str, Path]:
    """The tiny model as single files: text-to-image (.safetensors and .ckpt) and inpainting."""
    where = tiny.parent
    state = to_original(tiny)
    return {
        "safetensors": save_safetensors(state, where / "tiny.safetensors"),
        "ckpt": save_ckpt(state, where / "tiny.ckpt"),
        "inpaint": save_safetensors(to_original(tiny / INPAINT_SUBFOLDER),
                                    where / "tiny-inpainting.safetensors"),
    }


def settings(tmp_path: Path, **kw: object) -> GenerateSettings:
    return GenerateSettings.model_validate({"cache_dir": tmp_path / "cache", "steps": 2, **kw})


def smooth(n: int) -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64] / 63
    base = np.stack([x, y, (x + y) / 2], axis=-1)
    return np.stack([np.roll(base, 9 * i, axis=1) for i in range(n)]).astype(np.float32)


# --- loading single files ----------------------------------------------------------------------


def test_single_files_generate_the_same_pixels_as_their_folder(
        tiny: Path, files: dict[str, Path], tmp_path: Path) -> None:
    folder = Models(settings(tmp_path, model=str(tiny)))
    images, masks = smooth(2), np.zeros((2, 64, 64), np.float32)
    masks[:, 16:48, 16:48] = 1
    expected = (folder.text2img(PROMPTS, SEEDS), folder.img2img(images, PROMPTS, SEEDS),
                folder.inpaint(images, masks, PROMPTS, SEEDS))
    for kind in ("safetensors", "ckpt"):
        single = Models(settings(tmp_path, model=str(files[kind]), single_file_config=str(tiny),
                                 inpaint_model=str(files["inpaint"])))
        got = (single.text2img(PROMPTS, SEEDS), single.img2img(images, PROMPTS, SEEDS),
               single.inpaint(images, masks, PROMPTS, SEEDS))
        # No tolerance: the files hold the folder's tensors bit for bit, and the same weights
        # through the same kernels give the same floats.
        for want, have in zip(expected, got, strict=True):
            assert np.array_equal(want, have), kind
        # The weights hash is the file's own SHA-256 (what sha256sum and the hub show).
        assert single.info.weights_hash == hashlib.sha256(files[kind].read_bytes()).hexdigest()
        assert single.info.model_id == str(files[kind])
        assert single.inpaint_info.weights_hash == weights_hash(files["inpaint"])
    assert not np.array_equal(expected[0], np.zeros_like(expected[0]))


def test_a_single_file_inpaints_with_itself_when_no_inpaint_model_is_set(
        tiny: Path, files: dict[str, Path], tmp_path: Path) -> None:
    models = Models(settings(tmp_path, model=str(files["safetensors"]),
                             single_file_config=str(tiny)))
    assert models.inpaint_info == models.info  # no second copy of the weights
    masks = np.zeros((1, 64, 64), np.float32)
    masks[:, 8:24, 8:24] = 1
    out = models.inpaint(smooth(1), masks, PROMPTS[:1], SEEDS[:1])
    assert np.array_equal(out[0][masks[0] == 0], smooth(1)[0][masks[0] == 0])


def test_without_a_config_the_hub_cache_of_the_repo_diffusers_would_pick_is_used(
        tiny: Path, files: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # No config folder and an empty hub cache: the fix is named (and nothing is downloaded).
    (problem,) = weights_problems(files["safetensors"], "model", "")
    assert "single_file_config" in problem and SD15_REPO in problem
    with pytest.raises(ModelError, match="set \\[generate\\] single_file_config"):
        Models(settings(tmp_path, model=str(files["safetensors"])))
    # The repo's configs in the hub cache's own layout (here the tiny model's, under SD 1.5's
    # name: what the checkpoint's keys make diffusers pick) are found and used.
    repo = tmp_path / "hub" / f"models--{SD15_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny, repo / "snapshots" / ("0" * 40),
                    ignore=shutil.ignore_patterns("*.safetensors", INPAINT_SUBFOLDER))
    assert weights_problems(files["safetensors"], "model", "") == []
    models = Models(settings(tmp_path, model=str(files["safetensors"])))
    assert models.text2img(PROMPTS[:1], SEEDS[:1]).shape == (1, 64, 64, 3)


def test_a_ckpt_that_pickles_code_is_refused_without_running_it(
        tiny: Path, tmp_path: Path) -> None:
    marker = tmp_path / "the-pickle-ran"

    class Payload:  # unpickling it would call open(marker, "w")
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    bad = save_ckpt(to_original(tiny), tmp_path / "lightning.ckpt", callbacks=Payload())
    (problem,) = weights_problems(bad, "model", str(tiny))
    assert "io.open" in problem and "weights_only" in problem and ".safetensors" in problem
    with pytest.raises(ModelError, match="pickles Python objects"):
        Models(settings(tmp_path, model=str(bad), single_file_config=str(tiny)))
    assert not marker.exists()


def test_what_the_check_finds_in_single_files_names_the_fix(
        tiny: Path, files: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    def problem(path: Path, key: str = "model", config: Path | str = tiny) -> str:
        (found,) = weights_problems(path, key, str(config))
        return found

    # A config folder of another architecture: found before loading, and diffusers would fail.
    other = tmp_path / "other-config"
    shutil.copytree(tiny, other, ignore=shutil.ignore_patterns("*.safetensors"))
    unet = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**unet, "cross_attention_dim": 768}))
    message = problem(files["safetensors"], config=other)
    assert "cross-attention width is 32" in message and "say 768" in message
    with pytest.raises(Exception, match="size"):
        StableDiffusionPipeline.from_single_file(
            str(files["safetensors"]), config=str(other), local_files_only=True,
            safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False)
    # One component of a diffusers folder is not a checkpoint of the whole pipeline.
    message = problem(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    assert "no Stable Diffusion UNet or VAE or text encoder" in message
    assert "point the setting at the folder" in message
    # An inpainting checkpoint as the text-to-image model.
    assert "set it as [generate] inpaint_model" in problem(files["inpaint"])
    # A config setting that is no diffusers folder.
    assert "no model_index.json" in problem(files["safetensors"], config=tmp_path)
    # A file of another kind.
    other_file = tmp_path / "weights.pt"
    other_file.write_bytes(b"\0" * 64)
    assert "neither a .safetensors nor a .ckpt" in problem(other_file)
    # Cut short: safetensors (its header says how long it is) and .ckpt (a zip archive).
    for kind in ("safetensors", "ckpt"):
        cut = tmp_path / f"cut.{kind}"
        cut.write_bytes(files[kind].read_bytes()[: files[kind].stat().st_size // 2])
        assert "truncated" in problem(cut) and str(cut) in problem(cut)


def test_a_folder_with_a_damaged_component_is_found_before_loading(
        tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    assert weights_problems(broken) == []
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(broken / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    (problem,) = weights_problems(broken)
    assert f"{broken / 'vae'} has no weight file" in problem
    assert "only diffusion_pytorch_model.fp16.safetensors" in problem
    with pytest.raises(ModelError, match="has no weight file"):
        Models(settings(tmp_path, model=str(broken)))
    (broken / "text_encoder" / "config.json").write_text("{not json")
    assert len(weights_problems(broken)) == 2


# --- at start: synthnode check, serve, worker --------------------------------------------------


def node_config(tmp_path: Path, model: Path, **generate: object) -> Path:
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "node": {"port": port, "shutdown_timeout_s": 5},
        "spool": {"dir": str(tmp_path / "spool")},
        "jobs": {"sqlite_file": str(tmp_path / "q.sqlite3"), "work_dir": str(tmp_path / "w"),
                 "cpu_workers": 0, "gpu_workers": 0},
        "output": {"quarantine_dir": str(tmp_path / "quarantine")},
        "orthanc": {"url": f"http://127.0.0.1:{free_port({port})}"},
        "generate": {"model": str(model), "cache_dir": str(tmp_path / "cache"), **generate},
    }
    return write_config(tmp_path / "node.toml", sections, TEXT2IMG)


def synthnode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SYNTHNODE, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, SYNTHNODE__DEID__KEY=KEY))


def serve_until_started(config: Path, log: Path) -> int | None:
    """Run ``synthnode serve``: its exit status when it refuses to start, None once it listens
    (it is stopped then)."""
    with log.open("wb") as out:
        proc = subprocess.Popen([*SYNTHNODE, "--config", str(config), "serve"], stdout=out,
                                stderr=subprocess.STDOUT,
                                env=dict(os.environ, SYNTHNODE__DEID__KEY=KEY))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode
            if " listening as " in log.read_text():
                return None
            time.sleep(0.1)
        raise AssertionError(f"serve neither started nor stopped:\n{log.read_text()}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def test_a_truncated_checkpoint_stops_check_serve_and_the_gpu_worker(
        tiny: Path, files: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "roentgen.safetensors"
    model.write_bytes(files["safetensors"].read_bytes()[:-4096])  # a copy cut short
    config = node_config(tmp_path, model, single_file_config=str(tiny))
    check = synthnode(config, "check")
    assert check.returncode == 1, check.stdout + check.stderr
    (fatal,) = [line for line in check.stdout.splitlines() if line.startswith("FATAL")]
    assert "[generate] model" in fatal and str(model) in fatal and "truncated" in fatal
    assert "copy it again" in fatal and "rules gen generate with it" in fatal
    status = serve_until_started(config, tmp_path / "serve.log")
    text = (tmp_path / "serve.log").read_text()
    assert status == 2, text
    assert str(model) in text and "truncated" in text and "not started" in text
    assert "started workers" not in text
    worker = synthnode(config, "worker", "--queue", "gpu")
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert str(model) in worker.stderr and "truncated" in worker.stderr
    # Whole again: the same configuration checks clean and serve starts.
    shutil.copyfile(files["safetensors"], model)
    check = synthnode(config, "check")
    assert check.returncode == 0, check.stdout
    assert f"ok       [generate] model: {model} (a single-file checkpoint" in check.stdout
    assert serve_until_started(config, tmp_path / "serve-again.log") is None


def test_a_folder_missing_a_weight_file_stops_check_and_serve(
        tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "sd15"
    shutil.copytree(tiny, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    config = node_config(tmp_path, model)
    check = synthnode(config, "check")
    assert check.returncode == 1, check.stdout + check.stderr
    (fatal,) = [line for line in check.stdout.splitlines() if line.startswith("FATAL")]
    assert f"{model / 'unet'} has no weight file" in fatal and "download the model again" in fatal
    status = serve_until_started(config, tmp_path / "serve.log")
    text = (tmp_path / "serve.log").read_text()
    assert status == 2 and f"{model / 'unet'} has no weight file" in text, text
    assert " listening as " not in text
