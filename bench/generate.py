"""Generation benchmark: text-to-image images/s of synthnode next to plain diffusers.

What is measured
    One model folder, one device, the same N prompts and seeds, resolution R, S steps and
    guidance G (classifier-free guidance on when G > 1) on two paths, one after the other:

    synthnode  ``Models(settings).text2img(prompts, seeds)``: the node's generation path
               (batches of ``[generate] batch_size``, one generator per seed, dtype "auto" =
               bfloat16/float16 on a GPU and float32 on the CPU, channels_last UNet on CUDA),
               with ``GenerateSettings(model=FOLDER, steps=S, guidance=G, batch_size=B,
               device=..., dtype=..., resolution=R, scheduler="DDIMScheduler")``.
    plain      ``StableDiffusionPipeline.from_pretrained(FOLDER)`` with its defaults (the
               folder's scheduler, DDIM here; float32), moved to the device and called once per
               image: ``pipe(prompt, num_inference_steps=S, guidance_scale=G, height=R, width=R,
               generator=torch.Generator(device).manual_seed(seed))``. Only its progress bar is
               turned off.

    The rate is N / seconds of the timed region: the synthnode call, or the N plain calls.
    Loading is not timed (reported aside). Before timing, each path makes one untimed warm-up
    call of the timed shape (synthnode: one batch; plain: one image) with min(S, 2) steps.
    On CUDA the timed region is bracketed by ``torch.cuda.synchronize()``.

Models (random weights: speed does not depend on weight values; every output is noise)
    tiny   synthnode's own tiny model (``node/generate/tiny.py``, ~1.3 M parameters), 64 px.
    sd15   Stable Diffusion 1.5's architecture built here: UNet2DConditionModel with SD 1.5's
           config (block_out_channels 320/640/1280/1280, 2 layers per block, cross-attention
           768, 8 heads, sample size 64; ~860 M parameters), AutoencoderKL with SD's config
           (128/256/512/512, 4 latent channels, scaling 0.18215), a CLIPTextModel of SD's size
           (768 hidden, 12 layers, 12 heads, 3072 intermediate, 77 positions, quick_gelu) with
           the tiny model's byte-level tokenizer (its vocabulary is ~0.5 k tokens, not 49 k: an
           embedding lookup, no difference in speed), and SD's DDIM scheduler settings. Saved
           with ``save_pretrained`` (float32 safetensors, ~4.3 GB) into a temporary folder that
           both paths load (``--model-dir`` keeps and reuses it).

Goal (H100, SD-1.5-sized, 512 px, 50 steps, CFG): >= 4.7 images/s and >= 2x plain diffusers.
The goal applies only to ``--arch sd15`` on CUDA at 512 px, 50 steps, guidance > 1; other runs
print their figures with the goal marked n/a.

Usage: .venv/bin/python bench/generate.py [--arch tiny|sd15] [--device auto|cpu|cuda]
           [--dtype D] [--batch B] [--steps S] [--count N] [--resolution R] [--out F]
  CPU smoke of the sd15 path:
       .venv/bin/python bench/generate.py --arch sd15 --steps 1 --count 1 --resolution 128 --batch 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (  # puts the repo root on sys.path
    OUT_DIR,
    BenchError,
    Network,
    environment,
    goal_state,
    print_header,
    run_main,
    write_json,
)

ARCHES = ("tiny", "sd15")
DEFAULTS = {  # arch: (resolution, steps, count)
    "tiny": (64, 10, 16),
    "sd15": (512, 50, 32),
}
DEFAULT_BATCH = 8
DEFAULT_GUIDANCE = 7.5
WARMUP_STEPS = 2
GOAL_RATE = 4.7
GOAL_RATIO = 2.0
GOAL_TEXT = ("goal (H100, SD-1.5-sized, 512 px, 50 steps, CFG): >= 4.7 images/s and >= 2x "
             "plain diffusers")
MARKER = "synthnode-bench.json"
"""File in a ``--model-dir`` folder saying which architecture was built there."""
PROMPTS = (
    "An X-ray of the CHEST",
    "A CT image of the ABDOMEN",
    "An MRI of the BRAIN",
    "An X-ray of the HAND",
)

# -- models ----------------------------------------------------------------------------------


def build_sd15(folder: Path, seed: int = 0) -> None:
    """An SD-1.5-sized StableDiffusionPipeline with random weights, saved into ``folder``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from node.generate.models import no_progress_bars
    from node.generate.tiny import SD_SCHEDULER, clip_text_config, write_tokenizer

    tokenizer_dir = folder.parent / f".{folder.name}.tokenizer"
    ids = write_tokenizer(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(  # SD 1.5's unet/config.json
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                            "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            norm_eps=1e-5,
            act_fn="silu",
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        vae = AutoencoderKL(  # SD's vae/config.json
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            act_fn="silu",
            sample_size=512,
            scaling_factor=0.18215,
        )
        # openai/clip-vit-large-patch14's text tower (SD 1.5's text encoder)
        text_encoder = CLIPTextModel(clip_text_config(
            ids, hidden=768, intermediate=3072, layers=12, heads=12))
    scheduler = DDIMScheduler(**SD_SCHEDULER)  # SD's (its folder names PNDM: see README)
    pipe: Any = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    with no_progress_bars():
        pipe.save_pretrained(folder)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)


def parameters(folder: Path) -> dict[str, int]:
    """Parameter count per component, from the safetensors headers (nothing is loaded)."""
    counts: dict[str, int] = {}
    for path in sorted(folder.glob("*/*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        n = 0
        for name, entry in header.items():
            if name != "__metadata__":
                size = 1
                for dim in entry["shape"]:
                    size *= dim
                n += size
        counts[path.parent.name] = counts.get(path.parent.name, 0) + n
    return counts


def prepare_model(arch: str, model_dir: Path | None, root: Path) -> tuple[Path, float, bool]:
    """The model folder (built, or reused from ``model_dir``), the build seconds and whether it
    was reused."""
    folder = model_dir if model_dir is not None else root / arch
    marker = folder / MARKER
    if model_dir is not None and marker.is_file():
        built = json.loads(marker.read_text()).get("arch")
        if built != arch:
            raise BenchError(f"--model-dir {folder} holds a {built!r} build, not {arch!r}")
        return folder, 0.0, True
    if folder.exists() and any(folder.iterdir()):
        raise BenchError(f"--model-dir {folder} is not empty and holds no benchmark build")
    started = time.perf_counter()
    if arch == "tiny":
        from node.generate.tiny import build_tiny

        build_tiny(folder)
    else:
        build_sd15(folder)
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"arch": arch}) + "\n")
    return folder, seconds, False


# -- timing ----------------------------------------------------------------------------------


@dataclass
class PathResult:
    path: str
    images: int
    seconds: float
    load_s: float
    warmup_s: float
    dtype: str
    batch: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds, the GPU's queue drained on both sides."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - started


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_synthnode(folder: Path, args: argparse.Namespace, device: str, prompts: list[str],
                  seeds: list[int]) -> PathResult:
    from node.config import GenerateSettings
    from node.generate.models import Models

    settings = GenerateSettings(
        model=str(folder), steps=args.steps, guidance=args.guidance, batch_size=args.batch,
        device=device, dtype=args.dtype, resolution=args.resolution, scheduler="DDIMScheduler",
    )
    models, load_s = timed(device, lambda: Models(settings))
    first = min(args.batch, len(prompts))
    _, warmup_s = timed(device, lambda: models.text2img(
        prompts[:first], seeds[:first], steps=min(args.steps, WARMUP_STEPS)))
    images, seconds = timed(device, lambda: models.text2img(prompts, seeds))
    r = args.resolution
    if images.shape != (len(prompts), r, r, 3):
        raise BenchError(f"synthnode returned {images.shape}, expected {(len(prompts), r, r, 3)}")
    # models._batch_size: the batch that worked (halved after a GPU out-of-memory error)
    return PathResult("synthnode", len(prompts), seconds, load_s, warmup_s, models.info.dtype,
                      int(models._batch_size))


def run_plain(folder: Path, args: argparse.Namespace, device: str, prompts: list[str],
              seeds: list[int]) -> PathResult:
    import torch
    from diffusers import StableDiffusionPipeline

    from node.generate.models import no_progress_bars

    def load() -> Any:
        with no_progress_bars():  # the loading bars only; the pipeline keeps its defaults
            pipe = StableDiffusionPipeline.from_pretrained(folder)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe, load_s = timed(device, load)
    r = args.resolution

    def one(prompt: str, seed: int, steps: int) -> Any:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=args.guidance, height=r,
                    width=r, generator=torch.Generator(device).manual_seed(seed)).images

    _, warmup_s = timed(device, lambda: one(prompts[0], seeds[0], min(args.steps, WARMUP_STEPS)))
    images, seconds = timed(device, lambda: [
        image for prompt, seed in zip(prompts, seeds, strict=True)
        for image in one(prompt, seed, args.steps)])
    if len(images) != len(prompts) or images[0].size != (r, r):
        raise BenchError(f"plain diffusers returned {len(images)} images of {images[0].size}")
    return PathResult("plain", len(prompts), seconds, load_s, warmup_s,
                      str(pipe.unet.dtype).removeprefix("torch."), 1)


# -- report ----------------------------------------------------------------------------------


def goal_check(args: argparse.Namespace, device: str, synthnode: PathResult,
               ratio: float) -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    mismatch = [what for what, ok in (
        ("arch sd15", args.arch == "sd15"), ("CUDA", device.startswith("cuda")),
        ("512 px", args.resolution == 512), ("50 steps", args.steps == 50),
        ("CFG", args.guidance > 1),
    ) if not ok]
    rate_met = synthnode.images_per_s >= GOAL_RATE
    ratio_met = ratio >= GOAL_RATIO
    return {
        "applies": not mismatch, "not_the_goal_setup": mismatch, "gpu": gpu,
        "on_h100": "H100" in gpu,
        "images_per_s": synthnode.images_per_s, "minimum_images_per_s": GOAL_RATE,
        "images_per_s_met": rate_met if not mismatch else None,
        "ratio": ratio, "minimum_ratio": GOAL_RATIO,
        "ratio_met": ratio_met if not mismatch else None,
    }


def print_report(results: list[PathResult], ratio: float, goal: dict[str, Any]) -> None:
    print()
    header = (f"{'path':<10} {'dtype':<9} {'batch':>5} {'images':>6} {'seconds':>9} "
              f"{'images/s':>9}   {'load s':>7} {'warm-up s':>9}")
    print_header(header)
    for r in results:
        print(f"{r.path:<10} {r.dtype:<9} {r.batch:>5} {r.images:>6} {r.seconds:>9.3f} "
              f"{r.images_per_s:>9.3f}   {r.load_s:>7.2f} {r.warmup_s:>9.2f}")
    print()
    print(f"ratio synthnode/plain = {ratio:.2f}x")
    print()
    print(GOAL_TEXT)
    if goal["applies"]:
        for label, value, minimum, met, unit in (
            ("images/s", goal["images_per_s"], GOAL_RATE, goal["images_per_s_met"], ""),
            ("synthnode/plain", goal["ratio"], GOAL_RATIO, goal["ratio_met"], "x"),
        ):
            print(f"  {label:<16} >= {minimum}{unit}: {value:.2f}{unit}  {goal_state(met)}")
        if not goal["on_h100"]:
            print(f"  (measured on {goal['gpu']}, not an H100: compare with care)")
    else:
        needs = ", ".join(goal["not_the_goal_setup"])
        print(f"  n/a: this run is not the goal's setup (needs {needs})")


def run_environment(device: str) -> dict[str, Any]:
    """:func:`harness.environment` with torch's and the device's."""
    import torch

    extra: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                             "device": device}
    if device.startswith("cuda"):
        extra |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    else:
        extra["cpu"] = platform.processor() or platform.machine()
    return environment("diffusers", "transformers", **extra)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--arch", choices=ARCHES, default="tiny",
                   help="tiny (synthnode's tiny model, default) or sd15 (SD-1.5-sized, random)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = CUDA if available, else CPU")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="synthnode's [generate] dtype (auto); plain diffusers keeps its default")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"synthnode's [generate] batch_size ({DEFAULT_BATCH})")
    p.add_argument("--steps", type=int, help="inference steps (tiny 10, sd15 50)")
    p.add_argument("--count", type=int, help="images per path (tiny 16, sd15 32)")
    p.add_argument("--resolution", type=int, help="pixels, multiple of 8 (tiny 64, sd15 512)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"guidance scale ({DEFAULT_GUIDANCE}; > 1 = classifier-free guidance)")
    p.add_argument("--model-dir", type=Path,
                   help="build the model here and keep it, or reuse the build found there")
    p.add_argument("--out", type=Path, help="JSON file (bench/out/generate-ARCH.json)")
    args = p.parse_args(argv)
    resolution, steps, count = DEFAULTS[args.arch]
    args.defaulted = [name for name in ("steps", "count", "resolution")
                      if getattr(args, name) is None]
    args.resolution = resolution if args.resolution is None else args.resolution
    args.steps = steps if args.steps is None else args.steps
    args.count = count if args.count is None else args.count
    if args.out is None:
        args.out = OUT_DIR / f"generate-{args.arch}.json"
    if args.count < 1 or args.steps < 1 or not 1 <= args.batch <= 256:
        p.error("--count and --steps must be >= 1, --batch in [1, 256]")
    if args.resolution < 8 or args.resolution % 8:
        p.error("--resolution must be a positive multiple of 8")
    if not 0 <= args.guidance <= 50:
        p.error("--guidance must lie in [0, 50]")
    return args


def pick_device(spec: str) -> str | None:
    """The torch device string, or None when CUDA is asked for and missing."""
    import torch

    from node.generate.models import resolve_device

    if spec == "cuda" and not torch.cuda.is_available():
        return None
    return resolve_device(spec)


def run_benchmark(args: argparse.Namespace, device: str, root: Path) -> None:
    guidance = "CFG" if args.guidance > 1 else "no CFG"
    print(f"generation benchmark: {args.arch}, {args.resolution} px, {args.steps} steps, "
          f"guidance {args.guidance:g} ({guidance}), {args.count} images, synthnode batch "
          f"{args.batch}, device {device}")
    print(GOAL_TEXT)
    print(f"building the {args.arch} model (random weights) ...", flush=True)
    folder, build_s, reused = prepare_model(args.arch, args.model_dir, root)
    sizes = parameters(folder)
    print(f"  {'reused' if reused else f'built in {build_s:.1f} s'}: {folder} "
          f"({', '.join(f'{k} {v / 1e6:.3g} M' for k, v in sizes.items())} parameters)",
          flush=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.count)]
    seeds = list(range(args.count))
    results: list[PathResult] = []
    for name, run in (("synthnode", run_synthnode), ("plain", run_plain)):
        print(f"{name}: loading, warm-up, {args.count} images ...", flush=True)
        result = run(folder, args, device, prompts, seeds)
        release(device)  # the path's pipelines are gone with its function: free their memory
        print(f"  {result.images} images in {result.seconds:.3f} s "
              f"({result.images_per_s:.3f}/s)", flush=True)
        results.append(result)
    ratio = results[0].images_per_s / results[1].images_per_s
    goal = goal_check(args, device, results[0], ratio)
    print_report(results, ratio, goal)
    write_json(args.out, {
        "benchmark": "generate",
        "goal": GOAL_TEXT,
        "method": "text2img, same folder/prompts/seeds/resolution/steps/guidance on both paths; "
                  "synthnode: one Models.text2img call (batched); plain: "
                  "StableDiffusionPipeline.from_pretrained defaults, one call per image; "
                  f"one untimed warm-up call per path ({WARMUP_STEPS} steps at most); "
                  "cuda synchronized around the timed region",
        "settings": {"arch": args.arch, "device": device, "dtype": args.dtype,
                     "batch": args.batch, "steps": args.steps, "count": args.count,
                     "resolution": args.resolution, "guidance": args.guidance,
                     "scheduler": "DDIMScheduler"},
        "model": {"folder": str(folder), "reused": reused, "build_s": build_s,
                  "parameters": sizes},
        "environment": run_environment(device),
        "results": [{**asdict(r), "images_per_s": r.images_per_s} for r in results],
        "ratio_synthnode_over_plain": ratio,
        "goal_check": goal,
    })


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the hub
    import torch

    device = pick_device(args.device)
    if device is None:
        print(f"bench/generate.py: --device cuda, but torch {torch.__version__} sees no CUDA "
              "device here; use --device cpu or auto", file=sys.stderr)
        return 2
    if device == "cpu":
        if args.device == "auto":
            print("no GPU here: CPU figures only")
        if args.arch == "sd15" and args.defaulted:
            print("bench/generate.py: --arch sd15 at full size takes hours on a CPU (~17 s per "
                  "guided step at 512 px); give --steps, --count and --resolution explicitly "
                  f"(defaulted: {', '.join(args.defaulted)}), e.g. a smoke run: --arch sd15 "
                  "--steps 1 --count 1 --resolution 128 --batch 1", file=sys.stderr)
            return 2
    return run_main("bench/generate.py", lambda root: run_benchmark(args, device, root),
                    tmp_prefix="synthnode-bench-generate-", network=Network.HOST)


if __name__ == "__main__":
    sys.exit(main())
