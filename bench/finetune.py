"""Fine-tune benchmark: training images/s of ``synthnode model finetune`` next to diffusers'
``train_text_to_image`` recipe, and the copy check's cost next to generation.

What is measured
    One base model folder, one device, the same N (image, text) pairs (phantom chest
    radiographs, ``node/samples.py``, with report-like texts), resolution R, batch B, S steps,
    learning rate, AdamW settings, gradient clipping and precision on two paths, one after the
    other, each a whole run: load the base, train S steps of the full UNet (text encoder and VAE
    frozen), save a diffusers folder.

    synthnode  ``node.generate.finetune.finetune(FOLDER, data, out, FinetuneSettings(...))``:
               the node's fine-tune (latent distributions and text embeddings computed once,
               sampled every step), including its training record, loss log and training-set
               index.
    reference  the loop of diffusers' ``examples/text_to_image/train_text_to_image.py``
               (Apache-2.0) without accelerate and without its optional parts (EMA, SNR
               weighting, validation): every step tokenises the batch's texts, runs the frozen
               text encoder and the frozen VAE encoder (``latent_dist.sample()``), adds DDPM
               noise, predicts it with the UNet under the same autocast, MSE, backward, clip
               1.0, AdamW; at the end ``StableDiffusionPipeline(...).save_pretrained``.

    The rate is B * S / seconds of the whole run (loading and saving included, as a user
    waits for them); the reference's training loop alone is reported aside. On CUDA the
    reference keeps the VAE and text encoder in the autocast dtype, as the example does with
    ``--mixed_precision``; both paths run the UNet in float32 weights under autocast.

    Copy check: with the synthnode result (it has a training-set index), ``Models.text2img``
    of G images at the model's resolution and ``[generate] steps`` is timed, then the copy
    check of the same images (``CopyCheck`` on the model's index): its cost per image as a
    share of generation's.

Models (random weights: speed does not depend on weight values)
    tiny   synthnode's tiny model (``node/generate/tiny.py``), 64 px.
    sd15   Stable Diffusion 1.5's architecture (``bench/generate.py`` ``build_sd15``), 512 px.

Goal: synthnode >= 1.0x the reference at equal settings; the copy check < 5 % of generation
time per image.

Usage: .venv/bin/python bench/finetune.py [--arch tiny|sd15] [--device auto|cpu|cuda]
           [--steps S] [--batch B] [--images N] [--precision auto|no|bf16|fp16] [--out F]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from generate import build_sd15, pick_device, release, run_environment, timed
from harness import (  # puts the repo root on sys.path
    OUT_DIR,
    BenchError,
    Network,
    goal_state,
    run_main,
    settle_or_warn,
    write_json,
)

ARCHES = ("tiny", "sd15")
DEFAULTS = {"tiny": (64, 200, 8, 32), "sd15": (512, 30, 8, 32)}
"""arch -> (resolution, steps, batch, images)."""
LEARNING_RATE = 1e-5
GEN_STEPS = 30
GEN_IMAGES = 8
GOAL_TEXT = ("Goal: synthnode fine-tune >= 1.0x diffusers' train_text_to_image recipe at equal "
             "settings; the copy check < 5 % of generation time per image.")


@dataclass
class PathResult:
    path: str
    images: int
    seconds: float
    train_s: float | None
    final_loss: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def training_data(count: int, resolution: int) -> Any:
    """``count`` phantom radiographs at ``resolution`` with report-like texts, as a
    TrainingSet (the same one for both paths)."""
    import numpy as np

    from node.generate.training import Example, TrainingSet
    from node.samples import FINDINGS, phantom_radiograph

    rng = np.random.default_rng(0)
    examples, digest = [], hashlib.sha256()
    for i in range(count):
        finding = i % len(FINDINGS)
        gray = phantom_radiograph(rng, resolution, finding).astype(np.float32)
        image = np.repeat(gray[..., None], 3, axis=-1)
        text = f"chest radiograph, {FINDINGS[finding]}"
        digest.update(image.tobytes())
        digest.update(text.encode())
        examples.append(Example(f"2.25.{i + 1}", "2.25.999", image, text, "template"))
    return TrainingSet(examples, digest.hexdigest())


def run_synthnode(folder: Path, data: Any, args: argparse.Namespace, device: str,
                  out: Path) -> PathResult:
    from node.generate.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        steps=args.steps, batch_size=args.batch, learning_rate=LEARNING_RATE,
        resolution=args.resolution, mixed_precision=args.precision, device=device,
        checkpoint_every=0, cache_dir=out.parent / "cache")
    record, seconds = timed(device, lambda: finetune(str(folder), data, out, settings,
                                                     progress=False))
    return PathResult("synthnode", args.steps * args.batch, seconds, None, record.final_loss)


def run_reference(folder: Path, data: Any, args: argparse.Namespace, device: str,
                  out: Path) -> PathResult:
    """diffusers' train_text_to_image loop (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from node.generate.models import no_progress_bars

    cuda = device.startswith("cuda")
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        "bf16" if args.precision == "auto" and cuda else args.precision)
    weight_dtype = precision if cuda and precision is not None else torch.float32
    losses: list[float] = []
    train_s = 0.0

    def whole() -> None:
        nonlocal train_s
        with no_progress_bars():
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        vae.to(device, dtype=weight_dtype)
        text_encoder.to(device, dtype=weight_dtype)
        unet.to(device)
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                      weight_decay=1e-2, eps=1e-8)
        images = data.images  # (N, R, R, 3) in [0, 1]
        texts = data.texts
        rng = np.random.default_rng(0)
        autocast = (torch.autocast("cuda", dtype=precision) if cuda and precision is not None
                    else torch.autocast("cpu", enabled=False))
        started = time.perf_counter()
        for _ in range(args.steps):
            idx = rng.integers(0, len(images), args.batch)
            pixel_values = torch.from_numpy(images[idx]).permute(0, 3, 1, 2) * 2 - 1
            pixel_values = pixel_values.to(device, dtype=weight_dtype)
            input_ids = tokenizer([texts[i] for i in idx], max_length=tokenizer.model_max_length,
                                  padding="max_length", truncation=True,
                                  return_tensors="pt").input_ids.to(device)
            latents = vae.encode(pixel_values).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                      (latents.shape[0],), device=device).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            if scheduler.config.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            with autocast:
                pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        if cuda:
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - started
        pipe: Any = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
        with no_progress_bars():
            pipe.save_pretrained(out)

    _, seconds = timed(device, whole)
    tail = losses[-max(1, len(losses) // 10):]
    return PathResult("reference", args.steps * args.batch, seconds, train_s,
                      sum(tail) / len(tail))


def copy_check_cost(model: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Seconds per image of generation and of the copy check on the same images."""
    import numpy as np

    from node.config import GenerateSettings
    from node.generate.models import Models

    settings = GenerateSettings(model=str(model), steps=GEN_STEPS, device=device,
                                batch_size=GEN_IMAGES, cache_dir=model.parent / "cache")
    models = Models(settings)
    check = getattr(models, "copy_check", None)
    if check is None:
        return {"available": False, "why": "the model has no training-set index"}
    prompts = ["chest radiograph"] * GEN_IMAGES
    seeds = list(range(GEN_IMAGES))
    models.text2img(prompts[:1], seeds[:1])  # warm-up
    images, gen_s = timed(device, lambda: models.text2img(prompts, seeds))
    check.score(images[:1])  # warm-up
    _, check_s = timed(device, lambda: check.score(np.asarray(images)))
    return {"available": True, "images": GEN_IMAGES, "generation_steps": GEN_STEPS,
            "generation_s_per_image": gen_s / GEN_IMAGES,
            "check_s_per_image": check_s / GEN_IMAGES, "share": check_s / gen_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--arch", choices=ARCHES, default="tiny")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=int, help="training steps (tiny 200, sd15 30)")
    p.add_argument("--batch", type=int, help="batch size (8)")
    p.add_argument("--images", type=int, help="training pairs (32)")
    p.add_argument("--resolution", type=int, help="pixels (tiny 64, sd15 512)")
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="mixed precision on CUDA (auto = bf16); the CPU trains float32")
    p.add_argument("--model-dir", type=Path, help="build the base model here and keep it")
    p.add_argument("--out", type=Path, help="JSON file (bench/out/finetune-ARCH.json)")
    args = p.parse_args(argv)
    resolution, steps, batch, images = DEFAULTS[args.arch]
    args.resolution = args.resolution or resolution
    args.steps = args.steps or steps
    args.batch = args.batch or batch
    args.images = args.images or images
    args.out = (args.out or OUT_DIR / f"finetune-{args.arch}.json").resolve()
    if min(args.steps, args.batch, args.images) < 1 or args.resolution % 8:
        p.error("--steps, --batch, --images must be >= 1, --resolution a multiple of 8")
    return args


def run_benchmark(args: argparse.Namespace, device: str, root: Path) -> None:
    print(f"fine-tune benchmark: {args.arch}, {args.resolution} px, batch {args.batch}, "
          f"{args.steps} steps, {args.images} pairs, precision {args.precision}, "
          f"device {device}")
    print(GOAL_TEXT)
    folder = args.model_dir or root / "base"
    if not (folder / "model_index.json").is_file():
        print(f"building the {args.arch} base (random weights) ...", flush=True)
        if args.arch == "tiny":
            from node.generate.tiny import build_tiny

            build_tiny(folder)
        else:
            build_sd15(folder)
    data = training_data(args.images, args.resolution)
    results: list[PathResult] = []
    outs = {"synthnode": root / "synthnode-out", "reference": root / "reference-out"}
    for name, run in (("synthnode", run_synthnode), ("reference", run_reference)):
        settle_or_warn(30.0)
        print(f"{name}: load, {args.steps} steps of batch {args.batch}, save ...", flush=True)
        result = run(folder, data, args, device, outs[name])
        release(device)
        print(f"  {result.images} images in {result.seconds:.2f} s "
              f"({result.images_per_s:.2f}/s)", flush=True)
        results.append(result)
    ratio = results[0].images_per_s / results[1].images_per_s
    cost = copy_check_cost(outs["synthnode"], args, device)
    shutil.rmtree(outs["reference"], ignore_errors=True)
    print()
    print(f"{'path':<10} {'images/s':>9} {'run s':>8} {'loop s':>8} {'final loss':>10}")
    for r in results:
        loop = "-" if r.train_s is None else f"{r.train_s:.2f}"
        loss = "-" if r.final_loss is None else f"{r.final_loss:.4f}"
        print(f"{r.path:<10} {r.images_per_s:>9.2f} {r.seconds:>8.2f} {loop:>8} {loss:>10}")
    print(f"ratio synthnode / reference: {ratio:.2f}x  ({goal_state(ratio >= 1.0)})")
    if cost["available"]:
        print(f"copy check: {cost['check_s_per_image'] * 1e3:.2f} ms per image against "
              f"{cost['generation_s_per_image'] * 1e3:.1f} ms of generation "
              f"({GEN_STEPS} steps): {cost['share'] * 100:.2f} % "
              f"({goal_state(cost['share'] < 0.05)})")
    else:
        print(f"copy check: n/a ({cost['why']})")
    write_json(args.out, {
        "benchmark": "finetune", "goal": GOAL_TEXT,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": run_environment(device),
        "results": [{**asdict(r), "images_per_s": r.images_per_s} for r in results],
        "ratio_synthnode_over_reference": ratio,
        "copy_check": cost,
    })


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = pick_device(args.device)
    if device is None:
        print("bench/finetune.py: --device cuda, but no CUDA device here", file=sys.stderr)
        return 2
    if device == "cpu" and args.arch == "sd15" and args.resolution > 128:
        raise SystemExit("bench/finetune.py: sd15 at 512 px on a CPU takes hours; give "
                         "--resolution 64 --steps 2 for a smoke run")

    def body(root: Path) -> None:
        try:
            run_benchmark(args, device, root)
        except (ValueError, RuntimeError) as exc:
            raise BenchError(str(exc)) from exc

    return run_main("bench/finetune.py", body, tmp_prefix="synthnode-bench-finetune-",
                    network=Network.PRIVATE_IF_POSSIBLE)


if __name__ == "__main__":
    sys.exit(main())
