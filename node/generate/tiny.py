"""The tiny model: an untrained Stable Diffusion pipeline built locally, for tests and for trying
the node without real weights (``[generate] model = "tiny"``).

Its weights are random: every output is noise. It has the real architecture's shape where the node
depends on it (RGB, VAE scale factor 8, a CLIP tokenizer with 77 positions, a 9-channel inpainting
variant) and is small enough (~1.3 M parameters, ~5 MB) to build and run on a CPU in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INPAINT_SUBFOLDER = "inpaint"
"""Where the inpainting variant of a local model lives, by this project's convention."""

RESOLUTION = 64
"""Pixel resolution of the tiny model (latent 8 x 8)."""

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"

README = """\
synthnode tiny model: UNTRAINED, RANDOM WEIGHTS. EVERY OUTPUT IS NOISE.

This Stable Diffusion pipeline was built locally by synthnode (node/generate/tiny.py, seed {seed})
so that tests and first trials run without downloading anything. It has the shape of a real model
(RGB, {resolution} px, VAE scale factor 8, CLIP tokenizer, 9-channel inpainting variant in
"{inpaint}/") but has never been trained: it produces noise, never anatomy.

For real images, point the node at real weights in the configuration file:

    [generate]
    model = "/path/to/a/diffusers/folder"    # a local StableDiffusionPipeline folder
    # model = "StanfordAIMI/roent-gen-v1-0"  # or a hub id (needs network or a filled HF cache)
    inpaint_model = ""                       # "" = the folder's "{inpaint}/" subfolder, else the
                                             # model itself; or a separate inpainting model

This folder can be deleted at any time; synthnode rebuilds it (identically) on next use.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level CLIP tokenizer with no merges: one token per byte (the last byte of a word
    carries ``</w>``), plus the start and end tokens. Returns the special token ids."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        # Without it, transformers takes a huge default and overflows converting it to an int.
        "model_max_length": 77,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}),
        encoding="utf-8",
    )
    return {"vocab_size": len(vocab), "bos": vocab[_BOS], "eos": vocab[_EOS]}


SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""Stable Diffusion's DDIM settings (steps_offset=1 also avoids diffusers' deprecation warning),
for the tiny model and the SD-1.5-sized benchmark model alike."""


def clip_text_config(
    ids: dict[str, int], *, hidden: int, intermediate: int, layers: int, heads: int
) -> Any:
    """A CLIP text tower of the given size over the tokenizer ``write_tokenizer`` made (the
    tiny model's, and the SD-1.5-sized benchmark's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        layer_norm_eps=1e-5,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
    )


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished tiny build (text2img and inpainting variants)."""
    return (folder / "model_index.json").is_file() and (
        folder / INPAINT_SUBFOLDER / "model_index.json"
    ).is_file()


def _components(tokenizer_dir: Path, ids: dict[str, int]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def unet(in_channels: int) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=RESOLUTION // 8,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
        )

    text_config = clip_text_config(ids, hidden=32, intermediate=37, layers=2, heads=4)
    return {
        "unet": unet(4),
        "unet_inpaint": unet(9),
        "vae": AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Four blocks: three downsamplings, the scale factor 8 of real SD checkpoints.
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=RESOLUTION,
        ),
        "text_encoder": CLIPTextModel(text_config),
        "tokenizer": CLIPTokenizer.from_pretrained(tokenizer_dir),
        "scheduler": DDIMScheduler(**SD_SCHEDULER),
    }


def _calibrate(vae: Any) -> None:
    """Set the VAE's scaling factor so that latents of smooth images have unit variance, as SD's
    0.18215 does for its trained VAE. A random VAE's latents are ~20x smaller: with SD's factor,
    img2img would drown the source in noise at any strength."""
    import torch

    ramp = torch.linspace(-1.0, 1.0, RESOLUTION)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    images = torch.stack([
        torch.stack([x, y, (x + y) / 2]),
        torch.stack([y, -x, x * y]),
        torch.stack([torch.sin(3 * x), torch.cos(3 * y), x.abs() - y.abs()]),
        torch.stack([-x, -y, torch.zeros_like(x)]),
    ])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))


def build_tiny(folder: Path, seed: int = 0) -> Path:
    """Build the tiny model into ``folder`` (a diffusers folder for ``StableDiffusionPipeline``,
    its inpainting variant in ``folder / "inpaint"``) and return ``folder``.

    Deterministic for a given ``seed``; does nothing when ``folder`` already holds a complete
    build. The build happens in a sibling temporary folder renamed into place at the end, so an
    interrupted build leaves nothing half-written and concurrent builders don't collide.
    """
    folder = Path(folder)
    if is_complete(folder):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(
            f'"{folder}" is neither empty nor a complete tiny model: remove it or choose another '
            "[generate] cache_dir"
        )
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from node.generate.models import no_progress_bars

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        ids = write_tokenizer(work / "tokenizer-src")
        # A private RNG: building must not disturb the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = _components(work / "tokenizer-src", ids)
            _calibrate(parts["vae"])
        unet_inpaint = parts.pop("unet_inpaint")
        optional: dict[str, Any] = {
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        }
        text2img: Any = StableDiffusionPipeline(**parts, **optional)
        inpaint: Any = StableDiffusionInpaintPipeline(**{**parts, "unet": unet_inpaint}, **optional)
        with no_progress_bars():
            text2img.save_pretrained(work / "model")
            inpaint.save_pretrained(work / "model" / INPAINT_SUBFOLDER)
        (work / "model" / "README.txt").write_text(
            README.format(seed=seed, resolution=RESOLUTION, inpaint=INPAINT_SUBFOLDER),
            encoding="utf-8",
        )
        try:
            if folder.exists():
                folder.rmdir()  # empty (checked above); rename cannot replace a directory
            os.rename(work / "model", folder)
        except OSError:
            if not is_complete(folder):  # another process won the race: its build is ours
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built the tiny model (seed %d) in %s", seed, folder)
    return folder
