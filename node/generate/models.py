"""The diffusion pipelines of one ``[generate]`` configuration, loaded once per worker process and
kept warm: text-to-image, image-to-image and inpainting, all Stable Diffusion (RoentGen, SD 1.x/2.x
and their fine-tunes).

torch and diffusers are imported when :class:`Models` is constructed, not when this module is:
importing diffusers' pipelines takes seconds, which processes that never generate should not pay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node.config import GenerateSettings, WeightsDtype
from node.files import atomic_write
from node.generate.tiny import INPAINT_SUBFOLDER, build_tiny
from node.generate.training import TrainingRecord
from node.generate.weights import (
    SINGLE_FILE_SUFFIXES,
    config_folder,
    inpaint_config,
    read_checkpoint,
    weights_problems,
)

if TYPE_CHECKING:
    import torch

    from node.generate.copycheck import CopyCheck

log = logging.getLogger(__name__)

TINY = "tiny"
"""``[generate] model`` value naming the untrained model built locally (see ``tiny.py``)."""

HASH_CACHE = ".synthnode-weights-sha256.json"
"""File in a model folder caching its weights hash, keyed by the weight files' sizes and mtimes."""

# Components the node never loads: their weights are not part of what produces the pixels.
_NOT_LOADED = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")

_warned_tiny = False


class ModelError(RuntimeError):
    """A model cannot be found, loaded or run. The message names the model and what to change."""


@dataclass(frozen=True)
class ModelInfo:
    """What produced an output, for provenance and logs."""

    model_id: str
    """``[generate] model`` as configured: "tiny", a local folder or a hub id."""
    weights_hash: str
    """SHA-256 (hex) over the weight files the pipeline loads (see :func:`weights_hash`)."""
    device: str
    """torch device the pipeline runs on, e.g. "cpu" or "cuda:0"."""
    dtype: str
    """torch dtype of the weights: "float32", "float16" or "bfloat16"."""
    resolution: int
    """Square image size in pixels that the pipelines take and return."""
    training: str = ""
    """How the node fine-tuned it (:meth:`TrainingRecord.describe`), "" for a model the node
    did not make."""


# --- resolving settings ------------------------------------------------------------------------


def resolve_device(spec: str) -> str:
    """``[generate] device`` as a torch device string: "auto" = the first CUDA GPU if there is
    one, else the CPU. ValueError when CUDA is asked for and is not available."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f'[generate] device "{spec}": CUDA is not available here')
        device = torch.device(spec)
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f'[generate] device "{spec}": only {torch.cuda.device_count()} CUDA device(s)'
            )
        return f"cuda:{index}"
    return "cpu"


def resolve_dtype(spec: WeightsDtype, device: str) -> torch.dtype:
    """``[generate] dtype`` as a torch dtype: auto = bfloat16 on a GPU that supports it, else
    float16 on a GPU, float32 on the CPU (half precision is slow or unsupported there)."""
    import torch

    if spec is WeightsDtype.AUTO:
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = getattr(torch, spec.value, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f'[generate] dtype "{spec}" is not a torch dtype')
    return dtype


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class called ``name``; ValueError naming it otherwise."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f'[generate] scheduler "{name}" is not a diffusers scheduler class '
                         '(e.g. "DDIMScheduler", "EulerDiscreteScheduler")')
    return cls


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """No tqdm bars from diffusers and transformers while loading or saving: they would land in
    the service's logs. Their previous state is restored."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def _no_progress_bar(pipe: Any) -> Any:
    """``pipe`` with its per-call tqdm bar off (services log, they don't draw)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_single_file(cls: Any, file: Path, key: str, config: str, dtype: torch.dtype) -> Any:
    """``cls`` (a Stable Diffusion pipeline class) from an original-format checkpoint, offline:
    its component configs from :func:`~node.generate.weights.config_folder` (always a local
    folder: given none, diffusers would go to the hub), its UNet's input channels from the
    file (an inpainting checkpoint takes 9, whatever the config folder's UNet says). A
    ``.ckpt`` is unpickled safely (diffusers loads it with ``weights_only``)."""
    checkpoint = read_checkpoint(file)
    folder = config_folder(checkpoint, key, config)
    channels = checkpoint.unet_in_channels
    parts: dict[str, Any] = {}
    unet_config: dict[str, Any] = {}
    if channels:
        folder = inpaint_config(folder, channels)
        unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    # diffusers 0.42 warns "modules ... should be kept in float32: []" on every single-file
    # component it casts to the dtype it loaded it in: noise in the service's log.
    cast_warning = logging.getLogger("diffusers.models.modeling_utils")
    level = cast_warning.level
    cast_warning.setLevel(logging.ERROR)
    try:
        if channels and unet_config.get("in_channels") != channels:
            from diffusers import UNet2DConditionModel

            parts["unet"] = UNet2DConditionModel.from_single_file(
                str(file), config=str(folder), subfolder="unet", in_channels=channels,
                local_files_only=True, dtype=dtype)
        return cls.from_single_file(str(file), config=str(folder), local_files_only=True,
                                    dtype=dtype, requires_safety_checker=False, **_NOT_LOADED,
                                    **parts)
    finally:
        cast_warning.setLevel(level)


def locate(spec: str, key: str = "model") -> Path:
    """The local weights of ``[generate] <key> = spec``: a single-file checkpoint
    (``.safetensors``, ``.ckpt``), a diffusers folder, or the hub snapshot diffusers resolves for
    a hub id (from its cache, or downloaded when the hub is reachable). :class:`ModelError`
    naming ``spec`` when none exists."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelError(f'[generate] {key} "{spec}": a file, but neither a .safetensors nor '
                             "a .ckpt checkpoint: point it at a single-file Stable Diffusion "
                             "checkpoint or a diffusers folder (one with model_index.json)")
        return path.resolve()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f'[generate] {key} "{spec}": the folder has no model_index.json, '
                             "it is not a diffusers pipeline folder")
        return path.resolve()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelError(f'[generate] {key} "{spec}": no such file')
    if not _HUB_ID.match(spec):
        raise ModelError(f'[generate] {key} "{spec}": no such folder')
    from diffusers import DiffusionPipeline

    try:
        with no_progress_bars():
            return Path(DiffusionPipeline.download(spec, **_NOT_LOADED))
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelError(
            f'[generate] {key} "{spec}": no such local folder, and no hub snapshot of that id '
            f"could be downloaded or found in the local cache ({type(exc).__name__}: {reason}). "
            f"Point [generate] {key} at a local diffusers folder (one with model_index.json) "
            "or a single-file checkpoint"
        ) from exc


# --- weights hash ------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the weight files of the components a pipeline loads from
    ``folder``: those its model_index.json names, less the ones the node never loads. Nested
    pipelines (the "inpaint" variant) are not components, so they don't count."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        roots = [folder / name for name, value in index.items()
                 if not name.startswith("_") and name not in _NOT_LOADED
                 and isinstance(value, list) and value and value[0] is not None]
    except (OSError, ValueError):
        roots = [folder]
    found: list[tuple[str, Path]] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                if name.endswith(_WEIGHT_SUFFIXES):
                    path = Path(dirpath) / name
                    found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


def weights_hash(folder: Path) -> str:
    """SHA-256 (hex) over the weight files (``*.safetensors``, ``*.bin``) of the pipeline in
    ``folder``: their sorted relative paths, sizes and bytes. Computed once, then cached in
    ``folder / HASH_CACHE`` for as long as the files' sizes and mtimes stay the same.

    For a single-file checkpoint, the SHA-256 of the file itself (what ``sha256sum`` prints and
    the hub lists for it), cached beside it in ``.<name>`` + HASH_CACHE."""
    if folder.is_file():
        return _file_hash(folder)
    files = _weight_files(folder)
    stats = [(rel, path.stat()) for rel, path in files]
    key = [[rel, st.st_size, st.st_mtime_ns] for rel, st in stats]
    cache = folder / HASH_CACHE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached["files"] == key:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for rel, st in stats:
        digest.update(f"{rel}\0{st.st_size}\0".encode())
        with open(folder / rel, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    value = digest.hexdigest()
    # A read-only folder (a shared cache, a mounted image) just goes without the cache.
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps({"sha256": value, "files": key}))
    return value


def _file_hash(path: Path) -> str:
    """SHA-256 (hex) of one file's bytes, cached like :func:`weights_hash`'s."""
    st = path.stat()
    key = [path.name, st.st_size, st.st_mtime_ns]
    cache = path.with_name(f".{path.name}{HASH_CACHE}")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached["file"] == key:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps({"sha256": value, "file": key}))
    return value

def _training_line(folder: Path, spec: str, key: str) -> str:
    """The one-line training record of the model in ``folder`` ("" when the node did not make
    it, or ``folder`` is a single file); ModelError naming the model when it is unreadable."""
    if not folder.is_dir():
        return ""
    try:
        record = TrainingRecord.load(folder)
    except ValueError as exc:
        raise ModelError(f'[generate] {key} "{spec}": {exc}') from None
    return record.describe() if record is not None else ""


# --- batching ----------------------------------------------------------------------------------


def _in_batches(
    count: int, batch_size: int, run: Callable[[int, int], np.ndarray], describe: str
) -> tuple[np.ndarray, int]:
    """``run(start, end)`` over ``range(count)`` in chunks of ``batch_size``, concatenated. A GPU
    out-of-memory error halves the chunk and retries it, down to one image; then ModelError.
    Returns the outputs and the batch size that worked."""
    import torch

    outputs: list[np.ndarray] = []
    start = 0
    while start < count:
        end = min(start + batch_size, count)
        try:
            outputs.append(run(start, end))
            start = end
            continue
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the traceback and the batch's tensors it holds are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if end - start == 1:
            raise ModelError(
                f"{describe}: out of GPU memory with a batch of 1; use a smaller "
                "[generate] resolution, dtype float16/bfloat16, or a larger GPU"
            )
        batch_size = max(1, (end - start) // 2)
        log.warning("%s: out of GPU memory with a batch of %d, retrying with %d",
                    describe, end - start, batch_size)
    return np.concatenate(outputs, axis=0), batch_size


# --- CUDA speed-ups ----------------------------------------------------------------------------

def _compiled_modules(pipe: Any) -> list[Any]:
    """The modules :func:`_speed_up` compiles: the UNet (every denoising step) and the VAE's
    decoder (once per image)."""
    return [pipe.unet, pipe.vae.decoder]


def _speed_up(pipe: Any, compile: bool) -> None:
    """Make a pipeline on a CUDA GPU faster without changing what it computes (the results
    differ by rounding only): a channels-last VAE; query/key/value projections run as one
    matrix product (``fuse_qkv_projections``); and, with ``compile`` (``[generate] compile``),
    the UNet and the VAE decoder are compiled with ``torch.compile`` (static shapes).
    Compiling happens on a module's first call with a new input shape (about a minute for an
    SD-1.5 UNet: each new batch size, resolution or guidance on/off pays it once per process);
    if it fails, :meth:`Models._run` undoes it and runs eager (:func:`_uncompile`). On an H100
    (SD-1.5-sized, 512 px, 50 steps, CFG, bf16, batch 32) this took generation from 2.8 to 4.5
    images/s (the compiled UNet most of it, the compiled VAE decoder about 3 %)."""
    import torch

    # (cuDNN's benchmark mode and inductor's 1x1 convolutions are the process's:
    # node.process.configure_torch, at its start)
    pipe.vae.to(memory_format=torch.channels_last)
    with contextlib.suppress(ValueError, AttributeError):  # added-KV attention: no fusion
        pipe.fuse_qkv_projections()
    if not compile:
        return
    for module in _compiled_modules(pipe):
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(dynamic=False)


def _uncompile(pipe: Any) -> bool:
    """Undo :func:`_speed_up`'s ``torch.compile`` on ``pipe``'s modules; whether any was."""
    undone = False
    for module in _compiled_modules(pipe):
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            undone = True
    return undone


def fit_prompt(tokenizer: Any, text: str) -> tuple[str, bool]:
    """``text`` cut at a word boundary to what the text encoder reads (the tokenizer's
    ``model_max_length``, 77 for CLIP, start and end tokens included), and whether it was cut.
    The pipeline would cut it anyway, and log the cut-off words: with ``{report}`` prompts,
    report text in a log. :class:`Models` passes every prompt it runs through here."""
    limit = int(tokenizer.model_max_length)

    def length(words: list[str]) -> int:
        return len(tokenizer(" ".join(words), truncation=False, verbose=False).input_ids)

    words = text.split()
    if length(words) <= limit:
        return text, False
    low, high = 0, len(words)  # length(words[:low]) fits; length(words[:high]) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if length(words[:middle]) <= limit else (low, middle)
    return " ".join(words[:low]), True


# --- the models --------------------------------------------------------------------------------


class Models:
    """The pipelines of one configuration, loaded once per worker process and kept warm.

    ``text2img`` and ``img2img`` share one set of weights. The inpainting pipeline is loaded on
    its first use: from ``[generate] inpaint_model``, else the ``inpaint`` subfolder of a local
    model, else the model itself (a 4-channel model inpaints too, less well).

    Images are float32 arrays in [0, 1], (N, H, W, 3) RGB, H = W = ``info.resolution``; one seed
    per image, so an image depends on its seed and prompt only, not on its batch. Not thread-safe:
    one call at a time.

    ``copy_check`` is the copy check of the model's training-set index (``copycheck.py``),
    loaded with the pipelines when the model folder has one and ``[generate] copy_check`` is
    on; None otherwise. It checks every synthetic output of this configuration, inpainting
    ones included.
    """

    def __init__(self, settings: GenerateSettings) -> None:
        # 1. Validate every setting before loading anything.
        self.settings = settings
        scheduler = scheduler_class(settings.scheduler)
        if settings.resolution % 8:
            raise ValueError(f"[generate] resolution {settings.resolution} is not a multiple of 8")
        self._device = resolve_device(settings.device)
        self._dtype = resolve_dtype(settings.dtype, self._device)
        self._batch_size = settings.batch_size
        self._scheduler_cls = scheduler

        # 2. Find the weights ("tiny" is built on first use).
        folder = self._folder(settings.model, "model")
        self._folder_path = folder

        # 3. Load once; img2img reuses the same modules.
        from diffusers import StableDiffusionImg2ImgPipeline

        # Pipelines are typed Any: diffusers' lazy module confuses mypy about their methods.
        self._text: Any = self._load(folder, settings.model, "model")
        self._img: Any = _no_progress_bar(StableDiffusionImg2ImgPipeline(
            **self._text.components, requires_safety_checker=False
        ))
        native = int(self._text.unet.config.sample_size) * int(self._text.vae_scale_factor)
        resolution = settings.resolution or native
        if resolution % int(self._text.vae_scale_factor):
            raise ValueError(f"[generate] resolution {resolution} is not a multiple of the "
                             f"model's VAE scale factor {self._text.vae_scale_factor}")
        self.info = ModelInfo(
            model_id=settings.model,
            weights_hash=weights_hash(folder),
            device=self._device,
            dtype=str(self._dtype).removeprefix("torch."),
            resolution=resolution,
            training=_training_line(folder, settings.model, "model"),
        )
        # 4. The copy check, when the model carries a training-set index.
        self.copy_check: CopyCheck | None = self._load_copy_check(folder)
        self._inpaint: Any = None
        self._inpaint_info: ModelInfo | None = None
        log.info("generation model %s loaded: %s %s, %d px, weights sha256 %s",
                 settings.model, self.info.device, self.info.dtype, resolution,
                 self.info.weights_hash[:16])

    # -- loading --

    def _load_copy_check(self, folder: Path) -> CopyCheck | None:
        from node.generate.copycheck import CopyCheck

        try:
            check = CopyCheck.load(folder, self.settings, vae=self._text.vae,
                                   device=self._device)
        except ValueError as exc:
            raise ModelError(f'[generate] model "{self.settings.model}": {exc}') from None
        if check is not None:
            log.info("model %s: %s", self.settings.model, check.describe())
        return check

    def _folder(self, spec: str, key: str) -> Path:
        global _warned_tiny
        if spec != TINY:
            return locate(spec, key)
        folder = build_tiny(self.settings.cache_dir / TINY)
        if not _warned_tiny:
            _warned_tiny = True
            log.warning(
                '[generate] model = "tiny": an untrained model with random weights, every '
                "output is noise. For real images set [generate] model to a local diffusers "
                "folder or a hub id (see %s)", folder / "README.txt")
        return folder

    def _load(self, folder: Path, spec: str, key: str) -> Any:
        """The pipeline of ``[generate] <key> = spec``, from ``folder`` (a diffusers folder or a
        single-file checkpoint), on the device, with the configured scheduler."""
        import torch
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

        cls = StableDiffusionInpaintPipeline if key == "inpaint_model" else StableDiffusionPipeline
        config = self.settings.single_file_config
        # What a start checks, checked again: a clear message beats diffusers' deep one.
        problems = weights_problems(folder, key, config)
        if problems:
            raise ModelError(f'[generate] {key} "{spec}": {problems[0]}')
        try:
            with no_progress_bars():
                if folder.is_file():
                    pipe = _from_single_file(cls, folder, key, config, self._dtype)
                else:
                    pipe = cls.from_pretrained(
                        folder, dtype=self._dtype, local_files_only=True,
                        requires_safety_checker=False, **_NOT_LOADED,
                    )
        except Exception as exc:
            what = "single-file checkpoint" if folder.is_file() else "folder"
            raise ModelError(f'[generate] {key} "{spec}": cannot be loaded as a '
                             f"{cls.__name__} from the {what} {folder} "
                             f"({type(exc).__name__}: {exc})") from exc
        pipe.scheduler = self._scheduler_cls.from_config(pipe.scheduler.config)
        pipe.to(self._device)
        if self._device.startswith("cuda"):
            # SDPA attention is diffusers' default; channels_last speeds up the UNet's convs.
            pipe.unet.to(memory_format=torch.channels_last)
            _speed_up(pipe, self.settings.compile)
        return _no_progress_bar(pipe)

    def _inpaint_pipe(self) -> Any:
        if self._inpaint is not None:
            return self._inpaint
        from diffusers import StableDiffusionInpaintPipeline

        spec, key = self.settings.inpaint_model, "inpaint_model"
        sub = self._folder_path / INPAINT_SUBFOLDER
        if spec:
            folder: Path | None = self._folder(spec, key)
        elif (sub / "model_index.json").is_file():
            spec, folder = f"{self.settings.model}/{INPAINT_SUBFOLDER}", sub
        else:
            folder = None
        if folder is None:  # the model itself: no second copy of its weights
            pipe = _no_progress_bar(StableDiffusionInpaintPipeline(
                **self._text.components, requires_safety_checker=False
            ))
            info = self.info
        else:
            pipe = self._load(folder, spec, key)
            info = ModelInfo(spec, weights_hash(folder), self.info.device, self.info.dtype,
                             self.info.resolution, _training_line(folder, spec, key))
            log.info("inpainting model %s loaded: weights sha256 %s", spec,
                     info.weights_hash[:16])
        self._inpaint, self._inpaint_info = pipe, info
        return pipe

    @property
    def inpaint_info(self) -> ModelInfo:
        """What :meth:`inpaint` runs (loads the inpainting pipeline if not yet loaded)."""
        self._inpaint_pipe()
        assert self._inpaint_info is not None
        return self._inpaint_info

    # -- running --

    def text2img(
        self, prompts: list[str], seeds: list[int], *, negative_prompt: str | None = None,
        steps: int | None = None, guidance: float | None = None,
    ) -> np.ndarray:
        """One image per prompt and seed: (N, H, W, 3) float32 in [0, 1]."""
        self._check(prompts, seeds)
        return self._run(self._text, prompts, seeds, negative_prompt, steps, guidance, {})

    def img2img(
        self, images: np.ndarray, prompts: list[str], seeds: list[int], *,
        strength: float | None = None, negative_prompt: str | None = None,
        steps: int | None = None, guidance: float | None = None,
    ) -> np.ndarray:
        """Each image moved towards its prompt; ``strength`` in (0, 1] is how far (default
        ``[generate] strength``). ``images``: (N, H, W, 3) float32 in [0, 1] at the model's
        resolution. Returns the same shape."""
        self._check(prompts, seeds)
        pixels = self._check_images(images, len(prompts))
        strength = self.settings.strength if strength is None else strength
        self._check_strength(strength, steps)
        return self._run(self._img, prompts, seeds, negative_prompt, steps, guidance,
                         {"image": pixels, "strength": strength})

    def inpaint(
        self, images: np.ndarray, masks: np.ndarray, prompts: list[str], seeds: list[int], *,
        strength: float = 1.0, negative_prompt: str | None = None, steps: int | None = None,
        guidance: float | None = None, keep_unmasked: bool = True,
    ) -> np.ndarray:
        """Each image with the region where its mask is 1 generated anew. ``masks``: (N, H, W)
        float32 in [0, 1]. The model re-encodes the whole image; with ``keep_unmasked`` the
        result is blended back, ``mask * generated + (1 - mask) * image``, so pixels outside the
        mask are the source's exactly."""
        self._check(prompts, seeds)
        pixels = self._check_images(images, len(prompts))
        mask = np.asarray(masks, dtype=np.float32)
        if mask.shape != pixels.shape[:3] or not np.all((mask >= 0) & (mask <= 1)):
            raise ValueError(f"masks: expected shape {pixels.shape[:3]} with values in [0, 1], "
                             f"got {mask.shape}")
        self._check_strength(strength, steps)
        out = self._run(self._inpaint_pipe(), prompts, seeds, negative_prompt, steps, guidance,
                        {"image": pixels, "mask_image": mask[..., None], "strength": strength})
        if keep_unmasked:
            m = mask[..., None]
            out = (m * out + (1 - m) * pixels).astype(np.float32)
        return out

    def _check(self, prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per image")
        for seed in seeds:
            if not 0 <= int(seed) < 2**63:
                raise ValueError(f"seed {seed} is outside [0, 2**63)")

    def _check_images(self, images: np.ndarray, count: int) -> np.ndarray:
        r = self.info.resolution
        pixels = np.asarray(images, dtype=np.float32)
        if pixels.shape != (count, r, r, 3):
            raise ValueError(f"images: expected shape {(count, r, r, 3)} (N, H, W, RGB at the "
                             f"model resolution), got {pixels.shape}")
        if not np.all((pixels >= 0) & (pixels <= 1)):
            raise ValueError("images: values must lie in [0, 1]")
        return pixels

    def _check_strength(self, strength: float, steps: int | None) -> None:
        steps = self.settings.steps if steps is None else steps
        if not 0 < strength <= 1 or int(steps * strength) < 1:
            raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step: "
                             "strength must lie in (0, 1] and steps * strength be at least 1")

    def _run(
        self, pipe: Any, prompts: list[str], seeds: list[int], negative_prompt: str | None,
        steps: int | None, guidance: float | None, per_image: dict[str, np.ndarray | float],
    ) -> np.ndarray:
        import torch

        if not prompts:
            r = self.info.resolution
            return np.zeros((0, r, r, 3), dtype=np.float32)
        negative = self.settings.negative_prompt if negative_prompt is None else negative_prompt
        tokenizer = self._text.tokenizer
        negative = fit_prompt(tokenizer, negative)[0]
        prompts = [fit_prompt(tokenizer, p)[0] for p in prompts]
        common = {
            "num_inference_steps": self.settings.steps if steps is None else steps,
            "guidance_scale": self.settings.guidance if guidance is None else guidance,
            "height": self.info.resolution,
            "width": self.info.resolution,
            "output_type": "np",
        }

        def run(start: int, end: int) -> np.ndarray:
            sliced = {k: v[start:end] if isinstance(v, np.ndarray) else v
                      for k, v in per_image.items()}
            # One generator per image: its noise depends on its seed, not on its batch.
            generators = [torch.Generator(self._device).manual_seed(int(s))
                          for s in seeds[start:end]]
            images = pipe(prompt=prompts[start:end], negative_prompt=[negative] * (end - start),
                          generator=generators, **common, **sliced).images
            return np.asarray(images, dtype=np.float32)

        describe = (f'model "{self.info.model_id}" at {self.info.resolution} px, batch '
                    f"{min(self._batch_size, len(prompts))}")
        try:
            out, self._batch_size = _in_batches(len(prompts), self._batch_size, run, describe)
        except torch._dynamo.exc.TorchDynamoException as exc:  # compiling failed: run eager
            if not _uncompile(pipe):
                raise
            log.warning("torch.compile failed (%s: %s); generating without it",
                        type(exc).__name__, " ".join(str(exc).split())[:300])
            out, self._batch_size = _in_batches(len(prompts), self._batch_size, run, describe)
        if not np.all(np.isfinite(out)):
            raise ModelError(f'model "{self.info.model_id}" produced NaN pixels in '
                             f"{self.info.dtype} (a known float16 VAE overflow): set "
                             "[generate] dtype to bfloat16 or float32")
        return out
