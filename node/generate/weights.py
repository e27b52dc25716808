"""Model weights on disk, checked without loading them: diffusers folders and single-file
checkpoints (an original Stable Diffusion / RoentGen ``.safetensors`` or ``.ckpt``).

What a start can afford to check (``synthnode check``, ``serve`` and ``worker`` at start, and
:class:`node.generate.models.Models` before it loads): every config parses, every weight file a
pipeline loads is there, each safetensors header is readable and its file as long as the header
says (a cut-short download or copy is found here, not at the first job). A single file must hold
a Stable Diffusion UNet, VAE and text encoder whose sizes match the component configs it is
loaded with. Only ``.ckpt`` files need torch (a pickle's contents cannot be listed otherwise);
nothing here reads tensor data.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
"""How a single-file checkpoint's name ends."""

NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")
"""Components the node never loads: their weights are not part of what produces the pixels."""

# Prefixes of the tensors of an original (LDM) Stable Diffusion checkpoint, per component.
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_TEXT = "cond_stage_model."
_LDM_PARTS = {"UNet": LDM_UNET, "VAE": LDM_VAE, "text encoder": LDM_TEXT}
# Tensors whose shapes tell the architecture (diffusers' infer_diffusers_model_type reads the
# same ones, single_file_utils.CHECKPOINT_KEY_NAMES).
_CONV_IN = LDM_UNET + "input_blocks.0.0.weight"
_V2_ATTN = LDM_UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL = "conditioner.embedders."
_VAE_CONV_IN = LDM_VAE + "encoder.conv_in.weight"
_CLIP_POSITIONS = LDM_TEXT + "transformer.text_model.embeddings.position_embedding.weight"
_OPEN_CLIP_POSITIONS = LDM_TEXT + "model.positional_embedding"

# The diffusers repos whose configs diffusers itself would take for an SD checkpoint without a
# config (single_file_utils.DIFFUSERS_DEFAULT_PIPELINE_PATHS), by what the checkpoint is.
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONFIG_REPOS = {
    "v1": SD15_REPO,
    "v2": "stabilityai/stable-diffusion-2-1",
    "inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "inpainting_v2": "stabilityai/stable-diffusion-2-inpainting",
}

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header (100 MB)
_MODEL_WEIGHTS = ("diffusion_pytorch_model", "model", "pytorch_model")
_NOT_WEIGHTS_SUFFIXES = ("Scheduler", "Tokenizer", "TokenizerFast", "Processor",
                         "FeatureExtractor")


class WeightsError(ValueError):
    """Weights on disk that cannot be loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint holds, read without its tensor data."""

    path: Path
    shapes: Mapping[str, tuple[int, ...]]
    """Every tensor's name and shape (a ``state_dict`` nesting already unwrapped)."""

    def has(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.shapes)

    @property
    def unet_in_channels(self) -> int | None:
        """4 for text-to-image, 9 for an inpainting UNet (None without the tensor)."""
        shape = self.shapes.get(_CONV_IN)
        return shape[1] if shape is not None and len(shape) > 1 else None

    @property
    def kind(self) -> str:
        """What diffusers would take it for, of the Stable Diffusion family: "v1", "v2",
        "inpainting", "inpainting_v2" (the rule of diffusers' infer_diffusers_model_type)."""
        v2 = self.shapes.get(_V2_ATTN, (0,))[-1] == 1024
        if self.unet_in_channels == 9:
            return "inpainting_v2" if v2 else "inpainting"
        return "v2" if v2 else "v1"


# --- reading files -----------------------------------------------------------------------------


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in a safetensors file's header. WeightsError when the header
    does not parse or the file is shorter than its header says (cut short)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER):
            raise WeightsError(f"{path} is not a readable safetensors file ({size} bytes, no "
                               "valid header): the download or copy was cut short, or it is "
                               "another format; download or copy it again")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        tensors = {name: (tuple(int(n) for n in entry["shape"]),
                          int(entry["data_offsets"][1]))
                   for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise WeightsError(f"{path}: its safetensors header does not parse "
                           f"({type(exc).__name__}): the file is damaged; download or copy it "
                           "again") from None
    needed = 8 + length + max((end for _, end in tensors.values()), default=0)
    if size < needed:
        raise WeightsError(f"{path} is truncated: {size} bytes, its header describes {needed}: "
                           "the download or copy was cut short; download or copy it again")
    return {name: shape for name, (shape, _) in tensors.items()}


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` (a torch.save zip archive) is damaged, read from its central directory and
    member sizes only; None when it looks whole. Legacy (pre-zip) pickles are not checked."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x80\x02":  # torch.save's legacy format: a bare pickle
        return None
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        return (f"{path} is not a readable PyTorch checkpoint ({size} bytes; "
                f"{exc}): truncated, or not a torch.save file; download or copy it again")
    end = max((m.header_offset + m.compress_size for m in members), default=0)
    if end > size:
        return f"{path} is truncated ({size} bytes, its members need {end}): copy it again"
    return None


def ckpt_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a ``.ckpt`` (torch.save) checkpoint, read safely: the
    Python objects its pickle names are listed first and refused unless torch's safe loading
    (``weights_only``) allows them; tensor data stays on disk (memory-mapped)."""
    if problem := _zip_problem(path):
        raise WeightsError(problem)
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy pickle: torch.load below says what is wrong
        unsafe = []
    if unsafe:
        raise WeightsError(
            f"{path} pickles Python objects besides tensors ({', '.join(unsafe[:5])}), which "
            "safe loading (torch.load weights_only) refuses: use the model's .safetensors "
            "release, or convert this file to .safetensors on a machine where you trust it "
            "(README: Real weights)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise WeightsError(f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}"
                           f": {reason}): convert it to .safetensors, or download it again"
                           ) from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    return {str(k): tuple(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)}


def read_checkpoint(path: Path) -> Checkpoint:
    """The tensor names and shapes of a single-file checkpoint; WeightsError naming the file
    and the fix when it cannot be read or is not a Stable Diffusion checkpoint."""
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise WeightsError(f"{path} is neither a .safetensors nor a .ckpt checkpoint: point it "
                           "at a single-file checkpoint or a diffusers folder")
    shapes = safetensors_shapes(path) if suffix == ".safetensors" else ckpt_shapes(path)
    checkpoint = Checkpoint(path, shapes)
    if checkpoint.has(_SDXL):
        raise WeightsError(f"{path} is a Stable Diffusion XL checkpoint: the node runs SD 1.x "
                           "and 2.x pipelines (RoentGen, SD 1.5, SD 2.x and their fine-tunes)")
    missing = [part for part, prefix in _LDM_PARTS.items() if not checkpoint.has(prefix)]
    if missing:
        hint = (" If it is one component of a diffusers folder, point the setting at the "
                "folder (the one with model_index.json)." if len(missing) == len(_LDM_PARTS)
                else "")
        raise WeightsError(f"{path} holds no Stable Diffusion {' or '.join(missing)} "
                           f"({', '.join(_LDM_PARTS[p] + '*' for p in missing)} tensors): it is "
                           "not a complete original-format Stable Diffusion checkpoint." + hint)
    return checkpoint


# --- diffusers folders -------------------------------------------------------------------------


def _component_weights(sub: Path) -> list[Path]:
    """The weight files ``from_pretrained`` (no variant) would read in a component folder:
    one file, or the shards its index lists; [] when there are none."""
    for stem in _MODEL_WEIGHTS:
        for suffix in (".safetensors", ".bin"):
            single = sub / f"{stem}{suffix}"
            if single.is_file():
                return [single]
            index = sub / f"{stem}{suffix}.index.json"
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))
                                        ["weight_map"].values()))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise WeightsError(f"{index} does not parse: download the model "
                                       "again") from None
                return [sub / str(name) for name in shards] or [index]
    return []


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing: {fix}") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} does not parse ({type(exc).__name__}): {fix}") from None


def folder_problems(folder: Path) -> list[str]:
    """What stops ``from_pretrained`` loading the diffusers folder: an unreadable
    model_index.json, a component without its config or weights, a damaged weight file."""
    fix = ("the download or copy is incomplete: download the model again "
           "(README: Real weights), or point the setting at a complete folder")
    try:
        index = _read_json(folder / "model_index.json", fix)
        if not isinstance(index, dict):
            raise WeightsError(f"{folder / 'model_index.json'} is not a JSON object: {fix}")
    except WeightsError as exc:
        return [str(exc)]
    problems: list[str] = []
    for name, value in sorted(index.items()):
        if (name.startswith("_") or name in NOT_LOADED or not isinstance(value, list)
                or len(value) != 2 or value[0] is None):
            continue
        sub = folder / name
        cls = str(value[1])
        try:
            if not sub.is_dir():
                raise WeightsError(f"{sub} is missing (model_index.json names the component "
                                   f"{name}, a {cls}): {fix}")
            if cls.endswith("Scheduler"):
                _read_json(sub / "scheduler_config.json", fix)
                continue
            if cls.endswith(_NOT_WEIGHTS_SUFFIXES):
                if not any(sub.iterdir()):
                    raise WeightsError(f"{sub} is empty: {fix}")
                continue
            _read_json(sub / "config.json", fix)
            files = _component_weights(sub)
            if not files:
                variants = sorted(p.name for p in sub.glob("*.*.safetensors"))
                also = (f" (only {', '.join(variants)}: the node loads the full-precision "
                        "files, download those too)") if variants else ""
                raise WeightsError(f"{sub} has no weight file (diffusion_pytorch_model"
                                   f".safetensors or .bin, model.safetensors){also}: {fix}")
            for file in files:
                if not file.is_file():
                    raise WeightsError(f"{file} is missing (a shard its index lists): {fix}")
                if file.suffix == ".safetensors":
                    safetensors_shapes(file)
                elif file.suffix == ".bin" and (problem := _zip_problem(file)):
                    raise WeightsError(problem)
        except WeightsError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"{sub}: {exc.strerror or exc}")
    return problems


# --- single files and their configs ------------------------------------------------------------


def _hub_snapshot(repo: str) -> Path | None:
    """The local hub cache's snapshot of ``repo`` holding its model_index.json, if any."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def config_folder(checkpoint: Checkpoint, key: str, config: str) -> Path:
    """The local diffusers folder whose component configs (no weights needed) describe
    ``checkpoint``: ``[generate] single_file_config``, else the local hub cache's copy of the
    repo diffusers would guess from the checkpoint's keys. Never downloads; WeightsError
    naming the fix otherwise."""
    if config:
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise WeightsError(
                f'[generate] single_file_config "{config}" (the component configs of {key} '
                f"{checkpoint.path}) is not a diffusers folder (no model_index.json): point it "
                "at a local diffusers folder of the checkpoint's architecture (README: Real "
                "weights)")
        return folder.resolve()
    repo = DEFAULT_CONFIG_REPOS[checkpoint.kind]
    cached = _hub_snapshot(repo)
    if cached is None:
        raise WeightsError(
            f"{key} {checkpoint.path} is a single-file checkpoint, which needs the component "
            "configs of its architecture: set [generate] single_file_config to a local "
            f'diffusers folder of it (diffusers would take the configs of "{repo}", which are '
            "not in the local hub cache; on a connected machine: hf download "
            f"{repo} --include '*.json' --include '*.txt' --local-dir DIR, then copy DIR; "
            "README: Real weights)")
    return cached


def inpaint_config(folder: Path, in_channels: int) -> Path:
    """``folder``, or its "inpaint" subfolder where only that one's UNet takes
    ``in_channels`` (a tiny-model-style folder used as the config of an inpainting file)."""
    if _unet_config(folder).get("in_channels") == in_channels:
        return folder
    sub = folder / "inpaint"
    if (sub / "model_index.json").is_file() and (
            _unet_config(sub).get("in_channels") == in_channels):
        return sub
    return folder


def _unet_config(folder: Path) -> dict[str, Any]:
    try:
        found = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _component_config(folder: Path, name: str, fix: str) -> dict[str, Any]:
    found = _read_json(folder / name / "config.json", fix)
    if not isinstance(found, dict):
        raise WeightsError(f"{folder / name / 'config.json'} is not a JSON object: {fix}")
    return found


def mismatches(checkpoint: Checkpoint, folder: Path) -> list[str]:
    """Where ``checkpoint``'s sizes differ from the component configs in ``folder`` (UNet
    channels and cross-attention width, VAE channels, text encoder kind and width): each would
    fail the load. The UNet's input channels may differ (4 vs 9): the loader takes the
    checkpoint's."""
    fix = ("point [generate] single_file_config at a diffusers folder of the checkpoint's "
           "architecture (README: Real weights)")
    found: list[str] = []
    try:
        unet = _component_config(folder, "unet", fix)
        vae = _component_config(folder, "vae", fix)
        text = _component_config(folder, "text_encoder", fix)
    except WeightsError as exc:
        return [str(exc)]
    shapes = checkpoint.shapes

    def differs(what: str, in_file: int | None, in_config: object) -> None:
        if in_file is not None and in_config is not None and in_file != in_config:
            found.append(f"{checkpoint.path}: its {what} is {in_file}, the configs in {folder} "
                         f"say {in_config}: {fix}")

    conv_in = shapes.get(_CONV_IN)
    channels = unet.get("block_out_channels")
    differs("UNet's first block width", conv_in[0] if conv_in else None,
            channels[0] if isinstance(channels, list) and channels else None)
    attn = next((s for n, s in sorted(shapes.items()) if n.startswith(LDM_UNET)
                 and n.endswith("attn2.to_k.weight") and len(s) == 2), None)
    differs("UNet's cross-attention width", attn[1] if attn else None,
            unet.get("cross_attention_dim"))
    vae_in = shapes.get(_VAE_CONV_IN)
    vae_channels = vae.get("block_out_channels")
    differs("VAE's first block width", vae_in[0] if vae_in else None,
            vae_channels[0] if isinstance(vae_channels, list) and vae_channels else None)
    open_clip = _OPEN_CLIP_POSITIONS in shapes
    clip = shapes.get(_CLIP_POSITIONS)
    if not open_clip and clip is None:
        found.append(f"{checkpoint.path} has no text encoder the loader knows (neither CLIP "
                     f"{_CLIP_POSITIONS} nor OpenCLIP {_OPEN_CLIP_POSITIONS})")
    else:
        width = (shapes[_OPEN_CLIP_POSITIONS] if open_clip else clip or (0,))[-1]
        differs("text encoder's width" + (" (OpenCLIP, SD 2.x)" if open_clip else " (CLIP)"),
                width, text.get("hidden_size"))
    return found


def single_file_problems(path: Path, key: str, config: str) -> list[str]:
    """What stops the single-file checkpoint at ``path`` loading as ``[generate] key`` with
    ``[generate] single_file_config = config``; [] when nothing does."""
    try:
        checkpoint = read_checkpoint(path)
        if key == "model" and checkpoint.unet_in_channels == 9:
            raise WeightsError(f"{path} is an inpainting checkpoint (its UNet takes 9 channels): "
                               "set it as [generate] inpaint_model, and a text-to-image "
                               "checkpoint as [generate] model")
        folder = config_folder(checkpoint, key, config)
    except WeightsError as exc:
        return [str(exc)]
    except OSError as exc:
        return [f"{path}: {exc.strerror or exc}"]
    if checkpoint.unet_in_channels:
        folder = inpaint_config(folder, checkpoint.unet_in_channels)
    return mismatches(checkpoint, folder)


def weights_problems(path: Path, key: str = "model", config: str = "") -> list[str]:
    """What stops the weights at ``path`` (a diffusers folder, or a single-file checkpoint with
    the component configs of ``config``) loading as ``[generate] key``, found without loading
    them; [] when nothing does."""
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            return [f"{path} has no model_index.json: it is not a diffusers pipeline folder"]
        return folder_problems(path)
    if path.is_file():
        return single_file_problems(path, key, config)
    return [f"{path}: no such file or folder"]
