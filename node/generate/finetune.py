"""Fine-tuning a Stable Diffusion model on (image, text) pairs from the site's own de-identified
studies: RoentGen's recipe, in the shape of diffusers' ``train_text_to_image`` examples.

What is trained: the UNet (every weight, or LoRA adapters on its attention projections) and,
optionally, the text encoder (every weight, or LoRA on its attention projections); the VAE stays
frozen, as RoentGen keeps it. The loss is the denoising MSE against the base scheduler's
prediction type (epsilon or v-prediction) under a DDPM noise schedule with the base's betas.

Two costs the examples pay every step are paid once here, computing the same thing: each image's
latent distribution (the VAE encoder's mean and standard deviation) is computed once and sampled
every step, which draws from exactly the distribution re-encoding would; and with the text
encoder frozen, each distinct text's embedding is computed once.

The result is a plain diffusers folder (``StableDiffusionPipeline``; LoRA merged into the weights,
so nothing needs peft to load it) carrying its :class:`~node.generate.training.TrainingRecord`,
usable as ``[generate] model``. It is written into a temporary sibling and renamed into place:
a reader finds a whole model or none. Checkpoints (every ``checkpoint_every`` steps, in
``<out>/checkpoints/step-N``, each written whole or not at all) let an interrupted run continue
where it stopped; they are removed once the model is in place.

Randomness is a function of (seed, step): the batch drawn at a step, its timesteps, noise, latent
samples and dropped captions are the same whether the run was interrupted before or not, so a
resumed run on the CPU ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node.files import atomic_write, fsync_dir
from node.generate.models import (
    TINY,
    ModelError,
    _from_single_file,
    locate,
    no_progress_bars,
    resolve_device,
    weights_hash,
)
from node.generate.tiny import build_tiny
from node.generate.training import TrainingRecord, TrainingSet
from node.generate.weights import WeightsError, config_folder, read_checkpoint, weights_problems

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
"""Folder in the output folder holding the run's checkpoints (``step-N``) until it finishes."""

LOSS_LOG = "synthnode-loss.json"
"""File in a fine-tuned model folder: the training loss of every step, in order."""

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""UNet modules LoRA adapts: the attention projections (diffusers' LoRA example)."""

TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP text encoder modules LoRA adapts: its attention projections."""

# diffusers' train_text_to_image defaults: AdamW betas, weight decay, eps; gradient clipping.
_ADAMW: dict[str, Any] = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
_MAX_GRAD_NORM = 1.0
_DEFAULT_LR = {"full": 1e-5, "lora": 1e-4}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE = "state.json"
_OPTIMIZER = "optimizer.pt"
_LOSS_WINDOW = 0.1  # final loss: the mean over the last tenth of the steps (at least one)


class Method(StrEnum):
    """What of the UNet (and the text encoder, when it is trained) is trained."""

    FULL = "full"
    """Every weight."""

    LORA = "lora"
    """Low-rank adapters on the attention projections (peft), merged into the weights at the
    end: far fewer trainable parameters and optimizer state, the same kind of folder out."""


class MixedPrecision(StrEnum):
    """Autocast during training. Weights and optimizer state stay float32 (master weights)."""

    AUTO = "auto"
    """bf16 on a CUDA GPU that supports it, else fp16 on CUDA; none on the CPU."""

    BF16 = "bf16"
    """bfloat16 autocast (CUDA only)."""

    FP16 = "fp16"
    """float16 autocast with a gradient scaler (CUDA only)."""

    NO = "no"
    """float32 throughout."""


class GradientCheckpointing(StrEnum):
    """Recompute activations in the backward pass instead of keeping them: less memory, ~30 %
    more compute. It changes only rounding, not what is learned."""

    AUTO = "auto"
    """On with CUDA (where memory is what limits batch and resolution), off on the CPU."""

    ON = "on"
    OFF = "off"


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune. Converted and validated on construction (ValueError naming the
    setting and its value)."""

    method: Method = Method.FULL
    rank: int = 4
    """LoRA rank (``method = lora``)."""
    alpha: int = 0
    """LoRA alpha; 0 = the rank (scale 1, as diffusers' example)."""
    text_encoder: bool = False
    """Train the text encoder too (full or LoRA, as ``method``): RoentGen's finding is that
    radiology text needs it."""
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float | None = None
    """None = 1e-5 for full fine-tuning, 1e-4 for LoRA (diffusers' example recipes)."""
    text_encoder_learning_rate: float | None = None
    """None = ``learning_rate``."""
    seed: int = 0
    resolution: int = 0
    """Training resolution in px; 0 = the base model's own. The training set's images must be
    at this size (``trainset.collect(paths, resolution, ...)``)."""
    mixed_precision: MixedPrecision = MixedPrecision.AUTO
    gradient_checkpointing: GradientCheckpointing = GradientCheckpointing.AUTO
    checkpoint_every: int = 500
    """Steps between checkpoints; 0 = none."""
    empty_prompt_fraction: float = 0.0
    """Fraction of captions replaced by the empty prompt (diffusers' ``proportion_empty_prompts``),
    which also teaches the unconditional prediction classifier-free guidance uses; 0 = none."""
    device: str = "auto"
    """"auto" (the first CUDA GPU, else the CPU), "cpu", "cuda" or "cuda:N"."""
    single_file_config: str = ""
    """A single-file base's component configs (``[generate] single_file_config``)."""
    cache_dir: Path = Path("var/models")
    """Where the base "tiny" is built (``[generate] cache_dir``); not recorded (nor is
    ``single_file_config``: the base's hash says what it was)."""

    def __post_init__(self) -> None:
        def coerce(name: str, enum: type[StrEnum]) -> None:
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(m.value for m in enum)
                raise ValueError(f'fine-tune {name} "{value}": expected one of {choices}') from None

        coerce("method", Method)
        coerce("mixed_precision", MixedPrecision)
        coerce("gradient_checkpointing", GradientCheckpointing)
        for name, low in (("steps", 1), ("batch_size", 1), ("rank", 1), ("alpha", 0),
                          ("checkpoint_every", 0), ("resolution", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"fine-tune {name} {value!r}: expected an integer >= {low}")
        if self.seed >= 2**63:
            raise ValueError(f"fine-tune seed {self.seed}: expected less than 2**63")
        if self.resolution % 8:
            raise ValueError(f"fine-tune resolution {self.resolution}: not a multiple of 8")
        for name in ("learning_rate", "text_encoder_learning_rate"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"fine-tune {name} {value!r}: expected a number in (0, 1)")
        if not 0 <= self.empty_prompt_fraction < 1:
            raise ValueError(f"fine-tune empty_prompt_fraction {self.empty_prompt_fraction!r}: "
                             "expected a number in [0, 1)")
        if not _DEVICE.match(self.device):
            raise ValueError(f'fine-tune device "{self.device}": expected auto, cpu, cuda or '
                             "cuda:N")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @property
    def lr(self) -> float:
        return self.learning_rate or _DEFAULT_LR[self.method.value]

    @property
    def text_lr(self) -> float:
        return self.text_encoder_learning_rate or self.lr


# --- the base model ----------------------------------------------------------------------------


def base_weights(base: str, cache_dir: Path, single_file_config: str = "") -> Path:
    """The weights of the base model, checked without loading them: "tiny" (built in
    ``cache_dir / "tiny"``), a local diffusers folder, a single-file checkpoint (``.safetensors``,
    ``.ckpt``, its component configs from ``single_file_config``, as ``[generate]
    single_file_config``), or a hub id in the local cache. :class:`ModelError` naming ``base``
    and the fix otherwise."""
    if base == TINY:
        return build_tiny(Path(cache_dir) / TINY)
    try:
        path = locate(base, "model")
    except ModelError as exc:  # named as the base, not as the [generate] setting
        raise ModelError(f"base model {str(exc).removeprefix('[generate] model ')}") from None
    problems = weights_problems(path, "model", single_file_config)
    if problems:
        raise ModelError(f'base model "{base}": ' + "; ".join(problems))
    return path


def _config_folder(path: Path, single_file_config: str) -> Path:
    """The diffusers folder holding the component configs of the weights at ``path``."""
    if path.is_dir():
        return path
    try:
        return config_folder(read_checkpoint(path), "base model", single_file_config)
    except WeightsError as exc:
        raise ModelError(str(exc)) from None


def native_resolution(path: Path, single_file_config: str = "") -> int:
    """The base model's own resolution in px (UNet sample size x VAE scale factor), read from
    its configs without loading weights."""
    folder = _config_folder(path, single_file_config)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{folder}: cannot read the UNet and VAE configs ({exc})") from None


# --- resolving the run -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """The settings as they apply on this machine."""

    device: str
    precision: MixedPrecision
    """BF16, FP16 or NO (AUTO resolved)."""
    checkpointing: bool
    resolution: int

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return {MixedPrecision.BF16: torch.bfloat16,
                MixedPrecision.FP16: torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type="cuda", dtype=dtype)


def _resolve(settings: FinetuneSettings, weights: Path) -> _Run:
    import torch

    device = resolve_device(settings.device)
    cuda = device.startswith("cuda")
    precision = settings.mixed_precision
    if precision is MixedPrecision.AUTO:
        if not cuda:
            precision = MixedPrecision.NO
        else:
            precision = (MixedPrecision.BF16 if torch.cuda.is_bf16_supported()
                         else MixedPrecision.FP16)
    elif precision is not MixedPrecision.NO and not cuda:
        raise ValueError(f"fine-tune mixed_precision {precision.value}: autocast needs a CUDA "
                         f'device, this run is on "{device}" (use auto or no on the CPU)')
    checkpointing = {GradientCheckpointing.AUTO: cuda, GradientCheckpointing.ON: True,
                     GradientCheckpointing.OFF: False}[settings.gradient_checkpointing]
    resolution = settings.resolution or native_resolution(weights, settings.single_file_config)
    return _Run(device, precision, checkpointing, resolution)


def _record_settings(settings: FinetuneSettings, run: _Run, prediction_type: str) -> dict[str, Any]:
    """The settings as recorded in the model's training record (and checked on resume)."""
    out: dict[str, Any] = {
        "method": settings.method.value,
        "text_encoder": settings.text_encoder,
        "learning_rate": settings.lr,
        "batch_size": settings.batch_size,
        "resolution": run.resolution,
        "mixed_precision": run.precision.value,
        "gradient_checkpointing": run.checkpointing,
        "seed": settings.seed,
        "empty_prompt_fraction": settings.empty_prompt_fraction,
        "prediction_type": prediction_type,
        "noise_scheduler": "DDPMScheduler",
        "optimizer": "AdamW",
        "device": run.device,
    }
    if settings.text_encoder:
        out["text_encoder_learning_rate"] = settings.text_lr
    if settings.method is Method.LORA:
        out["lora_rank"] = settings.rank
        out["lora_alpha"] = settings.alpha or settings.rank
    return out


# Recorded settings that must match for a checkpoint to be continued (not device, gradient
# checkpointing or steps: those change the speed or the length, not what each step computes).
_RESUME_KEYS = ("method", "text_encoder", "learning_rate", "text_encoder_learning_rate",
                "batch_size", "resolution", "mixed_precision", "seed", "empty_prompt_fraction",
                "prediction_type", "lora_rank", "lora_alpha")


# --- randomness as a function of (seed, step) --------------------------------------------------


def _seed(seed: int, *path: int) -> int:
    """A torch seed (< 2**63) derived from the run's seed and a path: (0, step) for a step's
    draws, (1, module) for a module's LoRA initialisation."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, np.uint64)[0] >> 1)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, epoch, count])
    return tuple(int(i) for i in rng.permutation(count))


def batch_indices(seed: int, step: int, batch_size: int, count: int) -> list[int]:
    """The examples of step ``step`` (0-based): consecutive slices of one shuffled order of
    the training set per epoch, as a shuffling data loader gives, without state."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, count)
        take = min(batch_size - len(out), count - offset)
        out.extend(_permutation(seed, epoch, count)[offset:offset + take])
        position += take
    return out


# --- the trainer -------------------------------------------------------------------------------


class _Trainer:
    """The modules, the precomputed data and the optimizer of one run; :meth:`step` trains on
    one batch."""

    def __init__(self, pipe: Any, data: TrainingSet, settings: FinetuneSettings, run: _Run) -> None:
        import torch
        from diffusers import DDPMScheduler

        self.settings, self.run = settings, run
        device = torch.device(run.device)
        self.device = device
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = str(self.noise.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"base model scheduler: prediction_type {self.prediction_type!r} "
                             "is not supported for training (epsilon or v_prediction)")
        self.noise.alphas_cumprod = self.noise.alphas_cumprod.to(device)

        vae, unet, text_encoder, tokenizer = (pipe.vae, pipe.unet, pipe.text_encoder,
                                              pipe.tokenizer)
        for module in (vae, unet, text_encoder):
            module.requires_grad_(False)

        # 1. Latent distributions, once (VAE frozen, float32: no half-precision VAE overflow).
        vae.to(device).eval()
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(data.examples), settings.batch_size):
                end = start + settings.batch_size
                chunk = np.stack([e.image for e in data.examples[start:end]])
                pixels = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(device, torch.float32)
                dist = vae.encode(pixels * 2 - 1).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        self.latent_mean = torch.cat(means)
        self.latent_std = torch.cat(stds)
        self.scaling = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift = float(shift) if shift is not None else 0.0
        vae.to("cpu")

        # 2. Texts: token ids, and embeddings once when the text encoder is frozen.
        texts = sorted(set(data.texts) | {""})
        number = {text: i for i, text in enumerate(texts)}
        self.text_of = torch.tensor([number[t] for t in data.texts], device=device)
        self.empty_text = number[""]
        ids = tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids
        self.ids = ids.to(device)
        self.embeddings: torch.Tensor | None = None
        text_encoder.to(device)
        if not settings.text_encoder:
            text_encoder.eval()
            with torch.no_grad():
                self.embeddings = torch.cat([
                    text_encoder(self.ids[i:i + 64], return_dict=False)[0]
                    for i in range(0, len(texts), 64)
                ])

        # 3. What is trained: all weights, or LoRA adapters (initialised from the seed).
        unet.to(device)
        if run.checkpointing:
            unet.enable_gradient_checkpointing()
            if settings.text_encoder:
                _text_checkpointing(text_encoder, True)
        self.unet = self._trainable(unet, UNET_LORA_TARGETS, 0)
        self.text_encoder = (self._trainable(text_encoder, TEXT_LORA_TARGETS, 1)
                             if settings.text_encoder else text_encoder)
        groups: list[dict[str, Any]] = [{"params": self._params(self.unet), "lr": settings.lr}]
        if settings.text_encoder:
            groups.append({"params": self._params(self.text_encoder), "lr": settings.text_lr})
        self.optimizer = torch.optim.AdamW(groups, **_ADAMW)
        self.params = [p for g in groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=run.precision is MixedPrecision.FP16)

    def _trainable(self, module: Any, targets: tuple[str, ...], which: int) -> Any:
        import torch

        if self.settings.method is Method.FULL:
            module.requires_grad_(True)
            module.train()
            return module
        from peft import LoraConfig, get_peft_model

        rank = self.settings.rank
        config = LoraConfig(r=rank, lora_alpha=self.settings.alpha or rank,
                            init_lora_weights="gaussian", target_modules=list(targets))
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(_seed(self.settings.seed, 1, which))  # the adapters' init
            # peft asks transformers 5 for a renamed attribute: its deprecation is not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            wrapped = get_peft_model(module, config)
        wrapped.to(self.device)
        wrapped.train()
        return wrapped

    @staticmethod
    def _params(module: Any) -> list[Any]:
        return [p for p in module.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, dict[str, Any]]:
        """name -> tensor of every trained parameter, per module ("unet", "text_encoder")."""
        modules = {"unet": self.unet}
        if self.settings.text_encoder:
            modules["text_encoder"] = self.text_encoder
        return {name: {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
                for name, m in modules.items()}

    def step(self, step: int) -> float:
        """Train on the batch of ``step``; its loss."""
        import torch
        import torch.nn.functional as F

        s = self.settings
        index = torch.tensor(batch_indices(s.seed, step, s.batch_size, len(self.latent_mean)),
                             device=self.device)
        gen = torch.Generator(self.device).manual_seed(_seed(s.seed, 0, step))
        mean, std = self.latent_mean[index], self.latent_std[index]
        latents = mean + std * torch.randn(mean.shape, generator=gen, device=self.device)
        latents = (latents - self.shift) * self.scaling
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        t = torch.randint(0, int(self.noise.config.num_train_timesteps), (len(index),),
                          generator=gen, device=self.device)
        texts = self.text_of[index]
        if s.empty_prompt_fraction:
            drop = torch.rand(len(index), generator=gen, device=self.device)
            texts = torch.where(drop < s.empty_prompt_fraction, self.empty_text, texts)
        noisy = self.noise.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else (
            self.noise.get_velocity(latents, noise, t))

        with self.run.autocast():
            if self.embeddings is not None:
                hidden = self.embeddings[texts]
            else:
                hidden = self.text_encoder(self.ids[texts], return_dict=False)[0]
            pred = self.unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, _MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    # -- checkpoints --

    def save_checkpoint(self, folder: Path, step: int, losses: list[float],
                        fingerprint: dict[str, Any]) -> Path:
        """Checkpoint ``step`` (steps done) into ``folder / "step-N"``, written whole or not at
        all; older checkpoints are removed once it is in place."""
        import torch
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"step-{step}"
        work = Path(tempfile.mkdtemp(prefix=f".step-{step}.writing-", dir=folder))
        try:
            for name, tensors in self.trainable_state().items():
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                          work / f"{name}.safetensors")
            rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict(), "rng": rng}, work / _OPTIMIZER)
            (work / _STATE).write_text(json.dumps(
                {"step": step, "losses": losses, "fingerprint": fingerprint}), encoding="utf-8")
            for path in work.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # an earlier run wrote this step and was stopped before its next
                shutil.rmtree(final)
            os.rename(work, final)
            fsync_dir(folder)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        for older in _checkpoints(folder):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> tuple[int, list[float]]:
        """Weights, optimizer, scaler and RNG states from checkpoint ``path``; (step, losses)."""
        import torch
        from safetensors.torch import load_file

        state = json.loads((path / _STATE).read_text(encoding="utf-8"))
        for name, tensors in self.trainable_state().items():
            saved = load_file(path / f"{name}.safetensors", device=str(self.device))
            if set(saved) != set(tensors):
                raise ValueError(f"{path}: its {name} weights do not match this run's trainable "
                                 "parameters (another method, rank or base model)")
            with torch.no_grad():
                for key, tensor in tensors.items():
                    tensor.copy_(saved[key])
        extra = torch.load(path / _OPTIMIZER, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["rng"]["cpu"].cpu())
        if "cuda" in extra["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in extra["rng"]["cuda"]])
        return int(state["step"]), [float(x) for x in state["losses"]]

    def merged(self) -> tuple[Any, Any]:
        """The UNet and text encoder as plain modules (LoRA merged into the weights), float32
        on the CPU, in eval mode."""
        unet, text = self.unet, self.text_encoder
        if self.settings.method is Method.LORA:
            unet = unet.merge_and_unload()
            if self.settings.text_encoder:
                text = text.merge_and_unload()
        for module in (unet, text):
            module.requires_grad_(False)
            module.to("cpu").float().eval()
        if self.run.checkpointing:
            unet.disable_gradient_checkpointing()
            if self.settings.text_encoder:
                _text_checkpointing(text, False)
        return unet, text


def _text_checkpointing(model: Any, on: bool) -> None:
    """Gradient checkpointing of a transformers model on or off: ``activation_checkpointing_*``
    where this transformers has it (5.x renamed it), else ``gradient_checkpointing_*``.
    Non-reentrant, so that gradients reach LoRA adapters behind frozen embeddings."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def _checkpoints(folder: Path) -> list[Path]:
    """The finished checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / _STATE).is_file()]
    return [p for _, p in sorted(found)]


def _check_out(out: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from (``resume``), or None; ValueError when ``out`` is a
    finished model, or holds an interrupted run and ``resume`` is not set, or holds anything
    else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    if (out / "model_index.json").is_file():
        raise ValueError(f"--out {out}: already holds a model; choose another folder or remove it")
    found = _checkpoints(out / CHECKPOINTS)
    others = [p.name for p in out.iterdir() if p.name != CHECKPOINTS]
    if others:
        raise ValueError(f"--out {out}: not empty ({', '.join(sorted(others)[:3])}); choose an "
                         "empty or new folder")
    if found and not resume:
        raise ValueError(f"--out {out}: holds checkpoints of an interrupted run (newest "
                         f"{found[-1].name}); continue it with --resume, or remove the folder")
    return found[-1] if found else None


# --- the whole run -----------------------------------------------------------------------------


def _load_pipeline(weights: Path, base: str, single_file_config: str) -> Any:
    """The base pipeline in float32 on the CPU (a folder, or a single file)."""
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        with no_progress_bars():
            if weights.is_file():
                return _from_single_file(StableDiffusionPipeline, weights, "base model",
                                         single_file_config, torch.float32)
            return StableDiffusionPipeline.from_pretrained(
                weights, local_files_only=True, safety_checker=None, feature_extractor=None,
                image_encoder=None, requires_safety_checker=False)
    except Exception as exc:
        raise ModelError(f'base model "{base}": cannot be loaded as a StableDiffusionPipeline '
                         f"from {weights} ({type(exc).__name__}: {exc})") from exc


def _check_data(data: TrainingSet, resolution: int) -> None:
    if not data.examples:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(data.skipped.items())) or "none"
        raise ValueError(f"no training pairs to fine-tune on (files left out: {skipped}); give "
                         "folders of de-identified studies with images")
    shape = data.examples[0].image.shape
    for example in data.examples:
        if example.image.shape != (resolution, resolution, 3):
            raise ValueError(
                f"training image of instance {example.sop_instance_uid}: shape "
                f"{example.image.shape}, expected ({resolution}, {resolution}, 3); collect the "
                f"training set at the training resolution {resolution} (first image: {shape})")


@contextlib.contextmanager
def _progress(enabled: bool, total: int, initial: int) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="fine-tune", unit="step", file=sys.stderr,
               disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def finetune(
    base: str, data: TrainingSet, out: Path, settings: FinetuneSettings, *,
    progress: bool = True, resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingRecord:
    """Fine-tune ``base`` ("tiny", a local diffusers folder, a single-file checkpoint, or a hub
    id in the local cache; see :func:`base_weights`) on ``data`` into the diffusers folder
    ``out``; the training record it carries.

    ``out`` must be new or empty, or (``resume``) hold the checkpoints of an interrupted run
    of the same base, data and settings, which then continues from the newest. ``on_step``
    is called after each step with (steps done, loss). ``progress`` shows a tqdm bar with the
    running loss on stderr."""
    import torch

    # 1. Validate everything before any heavy work or any write.
    out = Path(out)
    weights = base_weights(base, settings.cache_dir, settings.single_file_config)
    run = _resolve(settings, weights)
    _check_data(data, run.resolution)
    checkpoint = _check_out(out, resume)
    if resume and checkpoint is None:
        log.info("fine-tune: no checkpoint in %s, starting from the base model", out)
    base_hash = weights_hash(weights)

    # 2. Load the base; precompute latents and texts; set up what is trained.
    pipe = _load_pipeline(weights, base, settings.single_file_config)
    trainer = _Trainer(pipe, data, settings, run)
    recorded = _record_settings(settings, run, trainer.prediction_type)
    fingerprint = {"base_weights_hash": base_hash, "data_hash": data.data_hash,
                   **{k: recorded.get(k) for k in _RESUME_KEYS}}
    start, losses = 0, list[float]()
    if checkpoint is not None:
        state = json.loads((checkpoint / _STATE).read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            theirs = state.get("fingerprint") or {}
            differ = sorted(k for k in fingerprint if theirs.get(k) != fingerprint[k])
            raise ValueError(f"--resume: checkpoint {checkpoint} was made with another "
                             f"{', '.join(differ)}; resume with the same base, data and "
                             "settings, or start in a new folder")
        start, losses = trainer.load_checkpoint(checkpoint)
        if start >= settings.steps:
            raise ValueError(f"--resume: checkpoint {checkpoint.name} already has {start} steps, "
                             f"not fewer than --steps {settings.steps}")
        log.info("fine-tune: resuming from %s", checkpoint.name)
    log.info("fine-tune: %d images, steps %d..%d, batch %d, %s%s on %s, %s precision, base "
             "sha256 %s, data sha256 %s", len(data.examples), start, settings.steps,
             settings.batch_size, settings.method.value,
             " + text encoder" if settings.text_encoder else "", run.device, run.precision.value,
             base_hash[:16], data.data_hash[:16])

    # 3. Train.
    window = max(1, min(50, settings.steps // 10))
    with _progress(progress, settings.steps, start) as bar:
        for step in range(start, settings.steps):
            loss = trainer.step(step)
            if not np.isfinite(loss):
                raise ValueError(f"fine-tune: the loss became {loss} at step {step + 1}; lower "
                                 "the learning rate, or use bf16 rather than fp16")
            losses.append(loss)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-window:]):.4f}", refresh=False)
            if settings.checkpoint_every and done % settings.checkpoint_every == 0 and (
                    done < settings.steps):
                trainer.save_checkpoint(out / CHECKPOINTS, done, losses, fingerprint)
            if on_step is not None:
                on_step(done, loss)

    # 4. Write the model whole, with its record (and the training-set index), then swap it in.
    unet, text_encoder = trainer.merged()
    del trainer
    if run.device.startswith("cuda"):
        torch.cuda.empty_cache()
    tail = losses[-max(1, round(len(losses) * _LOSS_WINDOW)):]
    record = TrainingRecord(
        base_model=base, base_weights_hash=base_hash, data_hash=data.data_hash,
        images=len(data.examples), steps=settings.steps, settings=recorded,
        final_loss=float(np.mean(tail)),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return _write_model(out, pipe, unet, text_encoder, data, record, losses, run.device)


def _write_model(out: Path, pipe: Any, unet: Any, text_encoder: Any, data: TrainingSet,
                 record: TrainingRecord, losses: list[float], device: str) -> TrainingRecord:
    """Save the fine-tuned pipeline into a temporary sibling of ``out`` and rename it into
    place (the checkpoints go with the old folder)."""
    from diffusers import StableDiffusionPipeline

    model: Any = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    old: Path | None = None
    try:
        with no_progress_bars():
            model.save_pretrained(work, safe_serialization=True)
        # The training-set index for the copy check (embeddings and hashes, no pixels), in
        # the model's own VAE feature space; its summary goes into the record.
        from node.generate.copycheck import build_index

        index: dict[str, Any] = build_index(work, data, device=device).summary()
        record = TrainingRecord(**{**asdict(record), "index": index})
        record.save(work)
        atomic_write(work / LOSS_LOG, json.dumps([round(x, 6) for x in losses]))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(work, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if old is not None and not out.exists():  # put the checkpoints back
            os.rename(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info("fine-tuned model written to %s (%d images, %d steps, final loss %.4f)", out,
             record.images, record.steps, record.final_loss or 0.0)
    return record


@dataclass
class LossSummary:
    """The loss at the start and the end of a run: means over its first and last tenth."""

    first: float
    last: float
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, folder: Path) -> LossSummary | None:
        """From a fine-tuned model's loss log; None when it has none."""
        try:
            values = [float(x) for x in json.loads((folder / LOSS_LOG).read_text("utf-8"))]
        except (OSError, ValueError, TypeError):
            return None
        if not values:
            return None
        n = max(1, round(len(values) * _LOSS_WINDOW))
        return cls(float(np.mean(values[:n])), float(np.mean(values[-n:])), values)
