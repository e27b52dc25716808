"""The generation models: the tiny model built offline, loaded by plain diffusers and by Models;
text2img, img2img and inpainting run for real (2 steps, 64 px, CPU)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from node.config import GenerateSettings
from node.generate.models import (
    ModelError,
    Models,
    _compiled_modules,
    _in_batches,
    _speed_up,
    _uncompile,
    weights_hash,
)
from node.generate.tiny import build_tiny

R = 64  # the tiny model's resolution in px
# The same seed gives the same noise in any batch, but batched kernels may round differently
# (~3e-6 seen on this CPU): below a 16-bit grey level (1.5e-5). Identical calls are bit-identical.
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache_dir whose "tiny" model is built once for the module (the build is timed)."""
    cache = tmp_path_factory.mktemp("models")
    start = time.perf_counter()
    build_tiny(cache / "tiny")
    cache.joinpath("build_s").write_text(str(time.perf_counter() - start))
    return cache


def settings(cache_dir: Path, **kw: object) -> GenerateSettings:
    return GenerateSettings.model_validate({"cache_dir": cache_dir, "steps": 2, **kw})


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> Models:
    return Models(settings(cache_dir, batch_size=2))


def smooth_images(n: int) -> np.ndarray:
    y, x = np.mgrid[0:R, 0:R] / (R - 1)
    base = np.stack([x, y, (x + y) / 2], axis=-1)
    return np.stack([np.roll(base, 7 * i, axis=1) for i in range(n)]).astype(np.float32)


# --- the tiny model ---------------------------------------------------------------------------


def test_tiny_builds_fast_and_loads_with_plain_diffusers(cache_dir: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    assert float(cache_dir.joinpath("build_s").read_text()) < 30
    folder = cache_dir / "tiny"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == R
    assert pipe.unet.config.in_channels == 4 and pipe.vae.config.in_channels == 3
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("An X-ray of the chest").input_ids
    assert ids[0] == pipe.text_encoder.config.bos_token_id
    assert ids[-1] == pipe.text_encoder.config.eos_token_id
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None

    inpaint = StableDiffusionInpaintPipeline.from_pretrained(folder / "inpaint")
    assert inpaint.unet.config.in_channels == 9

    readme = (folder / "README.txt").read_text()
    assert "RANDOM WEIGHTS" in readme and "NOISE" in readme and "[generate]" in readme


def test_tiny_is_idempotent_and_deterministic(cache_dir: Path, tmp_path: Path) -> None:
    folder = cache_dir / "tiny"
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = unet.stat().st_mtime_ns
    assert build_tiny(folder) == folder
    assert unet.stat().st_mtime_ns == mtime  # not rebuilt

    same = build_tiny(tmp_path / "same")
    other = build_tiny(tmp_path / "other", seed=1)
    assert weights_hash(same) == weights_hash(folder)
    assert weights_hash(other) != weights_hash(folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="junk"):
        build_tiny(tmp_path / "junk")


def test_importing_models_does_not_import_torch() -> None:
    code = ("import sys, node.generate, node.generate.models, node.generate.tiny; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- Models -----------------------------------------------------------------------------------


def test_info(models: Models, cache_dir: Path) -> None:
    info = models.info
    assert (info.model_id, info.device, info.dtype, info.resolution) == ("tiny", "cpu",
                                                                          "float32", R)
    assert len(info.weights_hash) == 64
    assert info.weights_hash == weights_hash(cache_dir / "tiny")


def test_text2img_shape_range_and_seeds(models: Models) -> None:
    prompts = ["An X-ray of the chest"] * 3
    out = models.text2img(prompts, [1, 2, 1])
    assert out.shape == (3, R, R, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    np.testing.assert_array_equal(models.text2img(prompts, [1, 2, 1]), out)  # bit for bit
    assert np.abs(out[1] - out[0]).mean() > 0.01  # another seed, another image
    # Same seed in another batch position: the same image (up to float rounding, see below).
    np.testing.assert_allclose(out[2], out[0], atol=ROUNDING)
    other_prompt = models.text2img(["A CT image of the head"], [1])
    assert np.abs(other_prompt[0] - out[0]).mean() > 0.001


def test_a_long_prompt_leaves_no_report_words_in_the_output(cache_dir: Path) -> None:
    """A prompt longer than the text encoder reads (a {report} prompt) is cut at a word before
    the pipeline sees it: diffusers would otherwise print the cut-off words (report text) on
    stderr, past the node's logging. Checked on what a fresh process actually printed."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from node.config import GenerateSettings\n"
        "from node.generate.models import Models\n"
        "m = Models(GenerateSettings(cache_dir=Path(sys.argv[1]), steps=1))\n"
        "words = ' '.join(f'finding{i}' for i in range(80))\n"
        "print(m.text2img([words + ' zqxmarker'], [0]).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(cache_dir)], capture_output=True,
                          text=True, timeout=120, check=True)
    printed = done.stdout + done.stderr
    assert "(1, 64, 64, 3)" in done.stdout
    assert "zqxmarker" not in printed and "truncated" not in printed, printed


def test_batching_does_not_change_an_image(models: Models, cache_dir: Path) -> None:
    prompts, seeds = ["a", "b", "c"], [5, 6, 7]
    one_by_one = Models(settings(cache_dir, batch_size=1)).text2img(prompts, seeds)
    in_pairs = models.text2img(prompts, seeds)
    np.testing.assert_allclose(one_by_one, in_pairs, atol=ROUNDING)
    assert np.abs(one_by_one[0] - one_by_one[1]).mean() > 0.01


def test_img2img_strength_orders_distance_from_source(models: Models) -> None:
    source = smooth_images(4)
    prompts, seeds = ["An X-ray of the chest"] * 4, [1, 2, 3, 4]
    low = models.img2img(source, prompts, seeds, strength=0.3, steps=10)
    high = models.img2img(source, prompts, seeds, strength=0.9, steps=10)
    assert low.shape == (4, R, R, 3) and low.dtype == np.float32
    assert low.min() >= 0 and low.max() <= 1
    assert np.abs(low - source).mean() < np.abs(high - source).mean()
    np.testing.assert_allclose(
        models.img2img(source[:1], prompts[:1], [1], strength=0.3, steps=10), low[:1],
        atol=ROUNDING)


def test_img2img_rejects_bad_input(models: Models) -> None:
    with pytest.raises(ValueError, match="expected shape"):
        models.img2img(np.zeros((1, 32, 32, 3), np.float32), ["a"], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        models.img2img(np.full((1, R, R, 3), 2, np.float32), ["a"], [1])
    with pytest.raises(ValueError, match="no denoising step"):
        models.img2img(smooth_images(1), ["a"], [1], strength=0.3, steps=2)
    with pytest.raises(ValueError, match="one seed per image"):
        models.text2img(["a", "b"], [1])


def test_inpaint(models: Models) -> None:
    source = smooth_images(2)
    prompts, seeds = ["An X-ray of the chest"] * 2, [1, 2]
    nothing = np.zeros((2, R, R), np.float32)
    region = nothing.copy()
    region[:, 16:48, 8:40] = 1
    inside = region.astype(bool)

    unchanged = models.inpaint(source, nothing, prompts, seeds)
    np.testing.assert_array_equal(unchanged, source)

    out = models.inpaint(source, region, prompts, seeds)
    assert out.shape == (2, R, R, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out[~inside], source[~inside])
    assert np.abs(out[inside] - source[inside]).mean() > 0.01

    # Raw model output: the whole image is re-encoded; the masked region still depends on it.
    raw = models.inpaint(source, region, prompts, seeds, keep_unmasked=False)
    raw_nothing = models.inpaint(source, nothing, prompts, seeds, keep_unmasked=False)
    assert raw.shape == (2, R, R, 3)
    assert not np.allclose(raw[inside], raw_nothing[inside])
    np.testing.assert_array_equal(raw[inside], out[inside])
    assert models.inpaint_info.model_id == "tiny/inpaint"
    assert models.inpaint_info.weights_hash != models.info.weights_hash


def test_weights_hash_stable_and_sensitive(models: Models, cache_dir: Path,
                                           tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = cache_dir / "tiny"
    assert Models(settings(cache_dir)).info.weights_hash == models.info.weights_hash
    # The cache is only a shortcut: recomputed from the bytes, the hash is the same.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / ".synthnode-weights-sha256.json").unlink()
    assert weights_hash(copy) == models.info.weights_hash

    # The inpainting variant is another pipeline: not part of this one's hash.
    inpaint_vae = copy / "inpaint" / "vae" / "diffusion_pytorch_model.safetensors"
    inpaint_vae.write_bytes(inpaint_vae.read_bytes() + b" ")
    assert weights_hash(copy) == models.info.weights_hash

    # One changed weight, same file size: the cached hash must not be reused.
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    size = unet.stat().st_size
    save_file(tensors, unet, metadata={"format": "pt"})
    assert unet.stat().st_size == size
    changed = Models(settings(tmp_path, model=str(copy))).info
    assert changed.weights_hash != models.info.weights_hash
    assert changed.model_id == str(copy)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers'
def test_scheduler_by_name(cache_dir: Path, models: Models) -> None:
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        Models(settings(cache_dir, scheduler="NoSuchScheduler"))
    euler = Models(settings(cache_dir, scheduler="EulerDiscreteScheduler"))
    assert euler.info.weights_hash == models.info.weights_hash
    a = euler.text2img(["a"], [1])
    assert not np.allclose(a, models.text2img(["a"], [1]))


def test_missing_model_names_it(cache_dir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(ModelError, match="no-such-folder"):
        Models(settings(cache_dir, model=missing))
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        Models(settings(cache_dir, model=str(not_a_pipeline)))
    # No hub is reachable from the tests' private network namespace.
    with pytest.raises(ModelError, match=r'model "nobody/no-such-model".*local diffusers folder'):
        Models(settings(cache_dir, model="nobody/no-such-model"))


def test_out_of_memory_halves_the_batch() -> None:
    import torch

    calls: list[tuple[int, int]] = []

    def run(start: int, end: int) -> np.ndarray:
        # The one edge CPU tests cannot reach for real: a GPU out of memory above 1 image.
        calls.append((start, end))
        if end - start > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return np.full((1, 2), start, np.float32)

    out, batch = _in_batches(5, 4, run, "model m")
    assert batch == 1 and out[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert calls[:3] == [(0, 4), (0, 2), (0, 1)]

    def never(start: int, end: int) -> np.ndarray:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(ModelError, match="model m: out of GPU memory with a batch of 1"):
        _in_batches(3, 2, never, "model m")


def test_compile_setting_decides_whether_the_cuda_speed_ups_compile(cache_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    assert GenerateSettings().compile is True
    assert settings(cache_dir, compile=False).compile is False
    # What Models applies to a pipeline on CUDA, run on the CPU here: compiling is only marked
    # on the modules (it happens on their first call), so nothing is compiled in this test.
    for compile in (False, True):
        pipe = StableDiffusionPipeline.from_pretrained(cache_dir / "tiny")
        _speed_up(pipe, compile)
        assert [getattr(m, "_compiled_call_impl", None) is not None
                for m in _compiled_modules(pipe)] == [compile, compile]
        assert _uncompile(pipe) is compile
