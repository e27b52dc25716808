"""Copy check benchmark: where its default thresholds come from, and what it costs per image.

What is measured
    calibration  The similarities the check computes (``node/generate/copycheck.py``: centred
                 cosine of VAE latent moments, 255-bit DCT hash) for copies of training images
                 and for different images, in the VAE of the tiny model fitted to phantoms
                 (``tests/trainingdata.fitted_tiny``, the tests' ``tiny_base``). Training sets of
                 48 and 400 phantoms; copies of 32 of their images: exact, Gaussian noise
                 (sigma 0.02 / 0.05 / 0.10 on [0, 1]), the VAE's reconstruction (what a model
                 that memorized the image outputs), that plus noise, decoded latents with noise
                 (0.1 / 0.2 of the latent's std), shifted 1 and 2 px (of 64); different images:
                 400 held-out phantoms as drawn and as the VAE reconstructs them. Then 10 real
                 images of pydicom-data (two radiographs, CT, MR, US, ...), each against the
                 others, and lossy-compressed copies of the radiographs against the originals.
                 Phantoms come from one generator with a few shape parameters: they are far
                 more alike than different patients' radiographs, a hard case for the
                 false-positive side.
    finetuned    (``--finetune``) outputs of models fine-tuned by ``node.generate.finetune``
                 on the tiny base: 32 varied phantoms (60 steps) and one phantom (overfit,
                 ``--overfit-steps``), each checked against its own index.
    cost         Per image on this machine's CPU, tiny model, ``--steps`` (30) DDIM steps, CFG:
                 ``Generation.run_many`` of ``--count`` text2img outputs with the copy check
                 on and off (the check: VAE encoding of the model's output, hash, search), and
                 the search alone in a 20 000-entry index. Goal: the check < 5 % of generation.

Usage: .venv/bin/python bench/copycheck.py [--finetune] [--count 16] [--steps 30]
       [--out bench/out/copycheck.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.config import GenerateSettings, Settings, TaskKind  # noqa: E402
from node.generate import copycheck  # noqa: E402
from node.generate.copycheck import CopyScore, TrainingIndex  # noqa: E402
from node.generate.training import Example, TrainingSet  # noqa: E402

R = 64
DEFAULTS = GenerateSettings()
REAL = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm",
        "emri_small.dcm", "SC_rgb.dcm", "OBXXXX1A.dcm", "JPEG2000.dcm", "mlut_18.dcm")
LOSSY = (("RG1_J2KI.dcm", "RG1_UNCR.dcm"), ("RG3_J2KI.dcm", "RG3_UNCR.dcm"))


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


def phantoms(count: int, seed: int) -> np.ndarray:
    from tests.trainingdata import phantom

    rng = np.random.default_rng(seed)
    return np.stack([rgb(phantom(rng, R, i % 4)) for i in range(count)])


def noisy(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0, sigma, x.shape), 0, 1).astype(np.float32)


def stats(scores: list[CopyScore]) -> dict[str, Any]:
    f = np.array([s.feature for s in scores])
    h = np.array([s.hash for s in scores])
    refused = [bool(copycheck.refusal(s, DEFAULTS.copy_feature_threshold,
                                      DEFAULTS.copy_hash_threshold)) for s in scores]
    return {"n": len(scores),
            "feature": [round(float(v), 4) for v in (f.min(), np.median(f), f.max())],
            "hash": [round(float(v), 4) for v in (h.min(), np.median(h), h.max())],
            "refused": round(float(np.mean(refused)), 4)}


def calibration(folder: Path) -> dict[str, Any]:
    import torch

    vae = copycheck.load_vae(folder)
    features = copycheck.feature_space(None, folder, vae=vae)
    out: dict[str, Any] = {}
    for n in (48, 400):
        train = phantoms(n, seed=0)
        uids = [f"2.25.{i + 1}" for i in range(n)]
        index = TrainingIndex.build(train, uids, features,
                                    reconstruct=lambda x: copycheck.vae_reconstruct(vae, x))
        rng = np.random.default_rng(7)
        t = train[:32]
        rt = copycheck.vae_reconstruct(vae, t)
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(t).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean

        def decoded(sigma: float, z: Any = z) -> np.ndarray:
            with torch.no_grad():
                y = vae.decode(z + sigma * z.std() * torch.randn_like(z)).sample.clamp(-1, 1)
            return ((y + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float32)

        torch.manual_seed(0)
        copies = {"exact": t, "noise 0.02": noisy(t, 0.02, rng), "noise 0.05": noisy(t, 0.05, rng),
                  "noise 0.10": noisy(t, 0.10, rng), "VAE reconstruction": rt,
                  "VAE reconstruction + noise 0.05": noisy(rt, 0.05, rng),
                  "decoded latent + 0.1 std": decoded(0.1),
                  "decoded latent + 0.2 std": decoded(0.2),
                  "shifted 1 px": np.roll(t, 1, axis=2), "shifted 2 px": np.roll(t, 2, axis=2)}
        held = phantoms(400, seed=12345)
        different = {"held-out phantoms": held,
                     "held-out, VAE reconstruction": copycheck.vae_reconstruct(vae, held)}
        out[f"train {n}"] = {
            "copies": {k: stats(index.nearest(v, features)) for k, v in copies.items()},
            "different": {k: stats(index.nearest(v, features)) for k, v in different.items()}}
    out["real images"] = real_images(vae, features)
    return out


def real_images(vae: Any, features: copycheck.FeatureSpace) -> dict[str, Any]:
    from pydicom import dcmread

    from node.generate.pixels import display_frames, to_model
    from node.samples import sample_file

    def image(name: str) -> np.ndarray:
        frames, _ = display_frames(dcmread(sample_file(name)))
        return to_model(frames[0], R).image

    images = np.stack([image(n) for n in REAL])
    index = TrainingIndex.build(images, list(REAL), features,
                                reconstruct=lambda x: copycheck.vae_reconstruct(vae, x))
    each = index.nearest(images, features, exclude=list(REAL))
    lossy = index.nearest(np.stack([image(a) for a, _ in LOSSY]), features)
    return {
        "each vs the others": {n: {"feature": round(s.feature, 4), "nearest": s.feature_uid,
                                   "hash": round(s.hash, 4), "hash nearest": s.hash_uid}
                               for n, s in zip(REAL, each, strict=True)},
        "lossy copies": {a: {"feature": round(s.feature, 4), "hash": round(s.hash, 4),
                             "nearest": s.feature_uid}
                         for (a, _), s in zip(LOSSY, lossy, strict=True)},
    }


def finetuned(base: Path, root: Path, overfit_steps: int) -> dict[str, Any]:
    from node.generate.finetune import FinetuneSettings, finetune
    from node.generate.models import Models
    from node.generate.trainset import collect
    from tests.trainingdata import write_studies

    out: dict[str, Any] = {}
    for name, count, steps in (("varied 32 phantoms", 32, 60),
                               ("overfit 1 phantom", 1, overfit_steps)):
        studies = root / f"studies-{count}"
        write_studies(studies, count, seed=0)
        data = collect([studies], R, GenerateSettings().prompt_templates)
        model = root / f"tuned-{count}"
        started = time.monotonic()
        finetune(str(base), data, model, FinetuneSettings(
            device="cpu", checkpoint_every=0, batch_size=min(8, count), steps=steps,
            learning_rate=1e-3), progress=False)
        trained_s = time.monotonic() - started
        models = Models(GenerateSettings(model=str(model), device="cpu", steps=30))
        assert models.copy_check is not None
        prompts = [data.examples[i % count].text for i in range(16)]
        images = models.text2img(prompts, list(range(16)))
        out[name] = {"steps": steps, "train_s": round(trained_s, 1),
                     **stats(models.copy_check.score(images))}
    return out


def cost(base: Path, root: Path, count: int, steps: int) -> dict[str, Any]:
    from node.generate.tasks import Generation, Request

    folder = root / "cost-model"
    shutil.copytree(base, folder)
    train = phantoms(48, seed=0)
    copycheck.build_index(folder, TrainingSet(
        [Example(f"2.25.{i + 1}", "2.25.9", im, "x", "sr") for i, im in enumerate(train)],
        data_hash="0" * 64))
    settings = Settings.model_validate({"generate": {"model": str(folder), "steps": steps}})
    generation = Generation(settings)
    check = generation.models.copy_check
    assert check is not None
    jobs = [(Request(TaskKind.TEXT2IMG, prompt="An X-ray of the chest", seed=100 + i), None)
            for i in range(count)]
    generation.run_many(jobs[:2])  # warm
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(3):
        for mode in ("on", "off"):
            generation.models.copy_check = check if mode == "on" else None
            started = time.perf_counter()
            generation.run_many(jobs)
            runs[mode].append((time.perf_counter() - started) / count)
    generation.models.copy_check = check
    images = generation.models.text2img(["An X-ray of the chest"] * count, list(range(count)))
    started = time.perf_counter()
    for _ in range(5):
        check.score(images)
    check_s = (time.perf_counter() - started) / 5 / count
    # The search alone in a large index (random entries: timing only).
    rng = np.random.default_rng(0)
    big = TrainingIndex(
        feature_space=check.index.feature_space, feature_key=check.index.feature_key,
        embeddings=rng.normal(size=(20000, check.index.embeddings.shape[1])).astype(np.float32),
        centre=check.index.centre, hashes=rng.integers(0, 256, (20000, 32), dtype=np.uint8),
        uids=[f"2.25.{i}" for i in range(20000)], kinds=np.zeros(20000, np.uint8), images=10000)
    started = time.perf_counter()
    big.nearest(images, check.features)
    big_s = (time.perf_counter() - started) / count
    on, off = float(np.median(runs["on"])), float(np.median(runs["off"]))
    return {"count": count, "steps": steps, "generation_s_per_image": round(off, 4),
            "with_check_s_per_image": round(on, 4),
            "difference_share": round((on - off) / off, 4),
            "check_alone_s_per_image": round(check_s, 5),
            "check_alone_share": round(check_s / off, 4),
            "search_20000_entries_s_per_image": round(big_s, 5),
            "search_20000_share": round(big_s / off, 4)}


def print_report(doc: dict[str, Any]) -> None:
    th = (f"(defaults: feature {DEFAULTS.copy_feature_threshold}, "
          f"hash {DEFAULTS.copy_hash_threshold})")
    print(f"copy check calibration, tiny model VAE fitted to phantoms {th}")
    print(f"{'case':<44} {'feature min/med/max':>22} {'hash min/med/max':>22} {'refused':>8}")
    for train, groups in doc["calibration"].items():
        if train == "real images":
            continue
        print(f"-- training set: {train} phantoms")
        for group in ("copies", "different"):
            for case, s in groups[group].items():
                f = "/".join(f"{v:.3f}" for v in s["feature"])
                h = "/".join(f"{v:.3f}" for v in s["hash"])
                print(f"{group[:4]} {case:<39} {f:>22} {h:>22} {s['refused']:>8.0%}")
    real = doc["calibration"]["real images"]
    print("-- real images (pydicom-data), each against the other nine:")
    for name, s in real["each vs the others"].items():
        print(f"   {name:<16} feature {s['feature']:.3f} ({s['nearest']}), hash {s['hash']:.3f}")
    for name, s in real["lossy copies"].items():
        print(f"   lossy {name:<10} feature {s['feature']:.3f}, hash {s['hash']:.3f} "
              f"(nearest {s['nearest']})")
    for name, s in doc.get("finetuned", {}).items():
        print(f"fine-tuned, {name} ({s['steps']} steps): 16 outputs, feature "
              f"{'/'.join(f'{v:.3f}' for v in s['feature'])}, hash "
              f"{'/'.join(f'{v:.3f}' for v in s['hash'])}, refused {s['refused']:.0%}")
    c = doc["cost"]
    print(f"cost (CPU, tiny, {c['steps']} steps, {c['count']} text2img images): generation "
          f"{c['generation_s_per_image'] * 1e3:.0f} ms/image, with the check "
          f"{c['with_check_s_per_image'] * 1e3:.0f} ms/image ({c['difference_share']:+.1%}); "
          f"the check alone {c['check_alone_s_per_image'] * 1e3:.2f} ms/image "
          f"({c['check_alone_share']:.1%}); search of a 20000-entry index "
          f"{c['search_20000_entries_s_per_image'] * 1e3:.2f} ms/image "
          f"({c['search_20000_share']:.1%}). Goal < 5 %: "
          f"{'met' if c['check_alone_share'] < 0.05 else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--finetune", action="store_true", help="also fine-tune (minutes on a CPU)")
    p.add_argument("--overfit-steps", type=int, default=1500)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--base", type=Path, help="a fitted tiny model folder to reuse")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "copycheck.json")
    args = p.parse_args(argv)
    from tests.trainingdata import fitted_tiny

    with tempfile.TemporaryDirectory(prefix="synthnode-copycheck-") as tmp:
        root = Path(tmp)
        base = fitted_tiny(args.base or root / "tiny-base")
        doc: dict[str, Any] = {"calibration": calibration(base)}
        if args.finetune:
            doc["finetuned"] = finetuned(base, root, args.overfit_steps)
        doc["cost"] = cost(base, root, args.count, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print_report(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
