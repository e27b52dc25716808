"""``synthnode model evaluate``: the Fréchet distance checked against independent computations,
MS-SSIM's settings and values, the sheet, and the whole evaluation on phantom studies with the
tiny model (its figures measure plumbing, not fidelity: the model is tiny and barely trained)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from node.generate.evaluate import (
    SheetCell,
    SheetLayout,
    diversity,
    fid,
    frechet_distance,
    ms_ssim_pairs,
    ms_ssim_params,
    sheet_cell_size,
    write_sheet,
)
from tests.trainingdata import phantom, write_studies

# The module fixtures build and fine-tune models: on a loaded machine their setup alone can pass
# pytest-timeout's default of 300 s per test.
pytestmark = pytest.mark.timeout(900)

R = 64  # the tiny model's resolution in px


def _brute_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with a general (non-symmetric) eigendecomposition of S_a S_b:
    Tr((S_a S_b)^(1/2)) is the sum of the square roots of its eigenvalues (real and >= 0 for
    a product of PSD matrices; rounding noise clipped). Independent of frechet_distance's
    routes (symmetric square roots, or singular values of a cross-Gram matrix)."""
    sa, sb = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    sa, sb = np.atleast_2d(sa), np.atleast_2d(sb)
    eig = np.linalg.eigvals(sa @ sb)
    cross = np.sum(np.sqrt(np.clip(eig.real, 0, None)))
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa) + np.trace(sb) - 2 * cross)


# --- FID ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, dim", [(200, 8), (12, 40)], ids=["n>D", "n<D singular"])
def test_frechet_of_a_set_with_itself_is_zero_and_a_shift_costs_its_square(n: int,
                                                                           dim: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))  # correlated features
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-8 * np.sum(x.var(0)))
    # Equal covariances: the distance is exactly the squared distance of the means.
    delta = rng.normal(size=dim)
    assert frechet_distance(x, x + delta) == pytest.approx(np.sum(delta ** 2), rel=1e-9)
    # Doubling the spread: Tr(S) + 4 Tr(S) - 2 * 2 Tr(S) = Tr(S).
    trace = np.trace(np.atleast_2d(np.cov(x, rowvar=False)))
    assert frechet_distance(x, 2 * x - x.mean(0)) == pytest.approx(trace, rel=1e-9)


@pytest.mark.parametrize("n1, n2, dim", [(300, 250, 6), (30, 25, 6), (9, 7, 50)],
                         ids=["n>D", "n~D", "n<D singular"])
def test_frechet_matches_an_independent_computation(n1: int, n2: int, dim: int) -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.5, 1.0, size=(n2, dim)) @ rng.normal(size=(dim, dim))
    expected = _brute_frechet(a, b)
    assert expected > 1
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)  # symmetric
    # An orthogonal change of feature basis changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(expected, rel=1e-6)


def test_frechet_in_one_dimension_is_the_gaussians_closed_form() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-1.0, 0.5, size=(400, 1))
    closed = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)


def test_fid_of_a_clearly_different_set_is_larger_and_reports_n() -> None:
    rng = np.random.default_rng(4)
    real = rng.normal(size=(40, 16))
    same = rng.normal(size=(30, 16))  # the same distribution, other draws
    other = rng.normal(1.0, 2.0, size=(30, 16))
    near, far = fid(same, real), fid(other, real)
    assert near.value < far.value / 5
    assert (far.n_generated, far.n_real, far.dim) == (30, 40, 16)
    assert not far.rank_deficient
    assert far.real_split is not None and far.real_split < far.value
    few = fid(rng.normal(size=(5, 16)), real)
    assert few.rank_deficient and few.as_dict()["rank_deficient"] is True


def test_frechet_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="different dimension"):
        frechet_distance(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))


# --- MS-SSIM -----------------------------------------------------------------------------------


def test_ms_ssim_window_fits_the_resolution() -> None:
    assert ms_ssim_params(512).win_size == 11 and ms_ssim_params(512).win_sigma == 1.5
    assert ms_ssim_params(R).win_size == 3  # 64 px: (3 - 1) * 16 = 32 < 64 < (5 - 1) * 16
    assert ms_ssim_params(128).win_size == 7
    with pytest.raises(ValueError, match="larger than 32 px"):
        ms_ssim_params(32)


def test_ms_ssim_is_one_for_identical_images_and_lower_for_different_ones() -> None:
    rng = np.random.default_rng(5)
    images = np.stack([phantom(rng, R, 0), phantom(rng, R, 3),
                       rng.random((R, R))]).astype(np.float32)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    params = ms_ssim_params(R)
    same, similar, unlike = ms_ssim_pairs(rgb, [(0, 0), (0, 1), (0, 2)], params)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert unlike < similar < 0.99
    # Diversity: one prompt's identical images score 1, a varied prompt's lower.
    result = diversity([np.stack([rgb[0]] * 3), rgb], params)
    assert result["per_prompt"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["per_prompt"][1] < 0.9
    assert result["pairs_per_prompt"] == 3
    assert diversity([rgb[:1]], params)["mean"] is None  # one image: no pair


# --- the sheet ---------------------------------------------------------------------------------


def test_sheet_is_a_png_of_the_layouts_size_with_each_image_in_its_cell(tmp_path) -> None:
    rng = np.random.default_rng(6)
    made = [[phantom(rng, R, (r + c) % 4) for c in range(3)] for r in range(2)]
    nearest = phantom(rng, R, 1)
    cells = [[SheetCell(made[r][c], nearest if c != 1 else None,
                        (f"seed {3 * r + c}", "feature 0.50 hash 0.60", "nearest ...1.2.3"),
                        flagged=(r, c) == (1, 2),
                        blank_reason="" if c != 1 else "not shown: --train not given")
              for c in range(3)] for r in range(2)]
    info = write_sheet(tmp_path / "sheet.png", cells, ["header one", "header two"])

    cell = sheet_cell_size(R)
    layout = SheetLayout(rows=2, cols=3, cell=cell, paired=True, header_lines=2)
    with Image.open(tmp_path / "sheet.png") as png:
        assert png.format == "PNG"
        assert png.size == layout.size == (info["width"], info["height"])
        pixels = np.asarray(png.convert("L"), dtype=np.float64) / 255
    for r in range(2):
        for c in range(3):
            x, y = layout.origin(r, c)
            shown = pixels[y : y + cell, x : x + cell]
            expected = np.asarray(Image.fromarray(np.rint(made[r][c] * 255).astype(np.uint8))
                                  .resize((cell, cell), Image.Resampling.BILINEAR)) / 255
            assert np.abs(shown - expected).max() < 2 / 255
    x, y = layout.origin(0, 0)
    assert np.corrcoef(pixels[y : y + cell, x + cell : x + 2 * cell].ravel(),
                       np.asarray(Image.fromarray(np.rint(nearest * 255).astype(np.uint8))
                                  .resize((cell, cell))).ravel())[0, 1] > 0.99
    with Image.open(tmp_path / "sheet.png") as png:  # the flagged tile has a red frame
        x, y = layout.origin(1, 2)
        assert png.convert("RGB").getpixel((x - 1, y + cell // 2)) == (220, 0, 0)


# --- the whole evaluation ----------------------------------------------------------------------

PROMPTS, PER_PROMPT, STEPS = 2, 3, 2


def _random_feature_net(path: Path) -> Path:
    """A TorchScript feature network with random weights, scripted here: it shows that a file
    listed in [generate] evaluate_features is loaded, run and named in the report (plumbing),
    and nothing about fidelity (its features mean nothing)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    ).eval()
    torch.jit.script(net).save(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Phantom training and held-out studies; a model fine-tuned (briefly) from the tiny base
    on the training studies, with its training record and training-set index; a random
    TorchScript net; a config."""
    from node.config import GenerateSettings
    from node.generate.finetune import FinetuneSettings, finetune
    from node.generate.trainset import collect

    root = tmp_path_factory.mktemp("evaluate")
    train, held = root / "train", root / "held-out"
    write_studies(train, 6, seed=11)
    write_studies(held, 6, seed=12)
    # One training study among the held-out ones: what a leak between the sets looks like.
    shutil.copytree(train / "study000", held / "study900")
    model = root / "model"
    net = _random_feature_net(root / "random-net.pt")
    settings = GenerateSettings.model_validate({
        "model": str(model), "cache_dir": str(root / "cache"), "steps": STEPS,
        "evaluate_features": [str(net)],
    })
    training = collect([train], R, settings.prompt_templates)
    finetune(str(tiny_base), training, model,
             FinetuneSettings(steps=10, batch_size=4, checkpoint_every=0, device="cpu",
                              cache_dir=root / "cache"), progress=False)
    config = root / "node.toml"
    config.write_text(f'[generate]\nmodel = "{model}"\ncache_dir = "{root / "cache"}"\n'
                      f'steps = {STEPS}\nevaluate_features = ["{net}"]\n')
    return {"root": root, "train": train, "held": held, "model": model, "net": net,
            "settings": settings, "training": training, "config": config}


@pytest.fixture(scope="module")
def evaluated(setup: dict[str, Any]) -> dict[str, Any]:
    """``synthnode model evaluate`` run once, in process, with --json FILE and --train."""
    from node.cli import main

    out = setup["root"] / "out" / "report.json"
    out.parent.mkdir()
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(["--config", str(setup["config"]), "model", "evaluate",
                     "--held-out", str(setup["held"]), "--train", str(setup["train"]),
                     "--prompts", str(PROMPTS), "--per-prompt", str(PER_PROMPT),
                     "--steps", str(STEPS), "--json", str(out)])
    seconds = time.perf_counter() - start
    assert code == 0, stdout.getvalue()
    text = stdout.getvalue()
    print(f"\n[tiny model, phantoms, {seconds:.1f} s; figures measure plumbing, not "
          f"fidelity]\n{text}")
    return {"report": json.loads(out.read_text()), "text": text, "json": out}


def test_evaluate_produces_every_metric_and_names_its_feature_spaces(
    setup: dict[str, Any], evaluated: dict[str, Any]
) -> None:
    report, text = evaluated["report"], evaluated["text"]
    n = PROMPTS * PER_PROMPT
    assert report["generation"]["images"] == n and report["held_out"]["images"] == 7
    assert report["model"]["weights_sha256"] and report["model"]["resolution"] == R
    assert report["model"]["training_record"].startswith("fine-tuned from sha256:")
    assert "on 6 images" in report["model"]["training_record"]

    # Feature spaces: the model's VAE (said not to be perceptual) and the listed TorchScript
    # file, by path and sha256.
    vae, net = report["feature_spaces"]
    assert vae["kind"] == "vae" and vae["perceptual"] is False
    assert "not a perceptual network" in vae["note"]
    assert net["kind"] == "torchscript" and net["path"] == str(setup["net"])
    assert net["sha256"] == hashlib.sha256(setup["net"].read_bytes()).hexdigest()
    assert "not a perceptual network" in text and net["sha256"] in text
    for result, space in zip(report["fid"], report["feature_spaces"], strict=True):
        assert result["feature_space"] == space["name"]
        assert result["value"] >= 0 and np.isfinite(result["value"])
        assert (result["n_generated"], result["n_real"]) == (n, 7)
        assert result["real_split"] is not None
    assert report["fid"][1]["dim"] == 32  # the random net: 8 channels x 2 x 2
    assert report["fid"][0]["rank_deficient"]  # 6 images, 128 VAE dimensions: said so
    assert "covariances are singular" in text

    # MS-SSIM: per prompt, with the parameters the resolution allows.
    ms = report["ms_ssim"]
    assert ms["params"]["win_size"] == 3 and len(ms["params"]["weights"]) == 5
    assert len(ms["generated"]["per_prompt"]) == PROMPTS
    assert ms["generated"]["pairs_per_prompt"] == 3
    assert 0 <= ms["generated"]["mean"] <= 1 and 0 <= ms["held_out"]["mean"] <= 1
    assert ms["held_out"]["pairs"] == 21

    # Copy scores: distributions and counts for generated and held-out real images.
    copies = report["copy_scores"]
    assert copies["available"] and copies["index_images"] == 6
    for side, count in (("generated", n), ("held_out", 7)):
        for measure in ("feature", "hash"):
            d = copies[side][measure]
            assert d["n"] == count and set(d["quantiles"]) == {"0", "0.05", "0.25", "0.5",
                                                               "0.75", "0.95", "1"}
            assert d["quantiles"]["0"] <= d["quantiles"]["0.5"] <= d["quantiles"]["1"]
    assert len(copies["per_image"]) == n
    # The phantom reports are longer than CLIP's 77 tokens: cut here, at a word, not by the
    # pipeline (which would log the cut-off report text).
    assert report["generation"]["prompts_cut"] == PROMPTS
    # The leaked training study: found, scored as a copy, and warned about.
    assert copies["held_out_in_training_set"] == 1
    assert copies["held_out"]["hash"]["quantiles"]["1"] == pytest.approx(1.0)
    assert copies["held_out"]["refused"] >= 1
    assert "not held out" in text
    # No report text anywhere in the output: prompts are named by their instances' UIDs.
    for example in setup["training"].examples:
        assert example.text not in text and example.text not in evaluated["json"].read_text()


def test_sheet_shows_each_generated_image_beside_its_nearest_training_image(
    setup: dict[str, Any], evaluated: dict[str, Any]
) -> None:
    report = evaluated["report"]
    sheet = report["sheet"]
    assert Path(sheet["path"]) == evaluated["json"].with_suffix(".png")  # beside the JSON
    layout = SheetLayout(rows=PROMPTS, cols=PER_PROMPT, cell=sheet_cell_size(R), paired=True,
                         header_lines=2)
    with Image.open(sheet["path"]) as png:
        assert png.format == "PNG" and png.size == layout.size
        pixels = np.asarray(png.convert("L"), dtype=np.float64) / 255
    by_uid = {e.sop_instance_uid: e.image for e in setup["training"].examples}
    cell = layout.cell
    for i, score in enumerate(report["copy_scores"]["per_image"]):
        x, y = layout.origin(i // PER_PROMPT, i % PER_PROMPT)
        shown = pixels[y : y + cell, x + cell : x + 2 * cell]
        nearest = by_uid[score["feature_uid"]].mean(axis=-1)
        expected = np.asarray(Image.fromarray(np.rint(nearest * 255).astype(np.uint8))
                              .resize((cell, cell), Image.Resampling.BILINEAR)) / 255
        assert np.abs(shown - expected).max() < 2 / 255


def test_evaluate_without_an_index_says_so_and_skips_copy_scores(
    setup: dict[str, Any], tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base model (no training-set index), --json on stdout, --config after the command."""
    from node.cli import main
    from node.generate.evaluate import summary

    config = tmp_path / "base.toml"
    config.write_text(f'[generate]\nmodel = "{tiny_base}"\n'
                      f'cache_dir = "{setup["root"] / "cache"}"\n')
    sheet = tmp_path / "sheet.png"
    assert main(["model", "evaluate", "--config", str(config), "--held-out",
                 str(setup["held"]), "--prompts", "1", "--per-prompt", "2", "--steps", "1",
                 "--json", "--sheet", str(sheet)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["copy_scores"]["available"] is False
    assert "no training-set index" in report["copy_scores"]["reason"]
    assert [s["kind"] for s in report["feature_spaces"]] == ["vae"]
    assert report["generation"]["steps"] == 1 and report["generation"]["images"] == 2
    assert {"fid", "ms_ssim", "copy_scores", "sheet"} <= set(report)
    assert "copy scores: not computed" in summary(report)
    with Image.open(sheet) as png:  # generated images only, no pairs
        assert png.size == SheetLayout(1, 2, sheet_cell_size(R), paired=False,
                                       header_lines=2).size


def test_evaluate_names_bad_input(setup: dict[str, Any], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"not dicom")
    args = ["--config", str(setup["config"]), "model", "evaluate", "--steps", "1",
            "--sheet", str(tmp_path / "s.png")]
    assert main([*args, "--held-out", str(empty)]) == 2
    assert "no training images in 1 files (1 not DICOM)" in capsys.readouterr().err
    missing = tmp_path / "no-such-net.pt"
    config = tmp_path / "bad.toml"
    config.write_text(setup["config"].read_text().replace(str(setup["net"]), str(missing)))
    assert main(["--config", str(config), *args[2:], "--held-out", str(setup["held"])]) == 2
    err = capsys.readouterr().err
    assert "[generate] evaluate_features" in err and str(missing) in err


def test_prompts_are_cut_at_a_word_to_what_the_text_encoder_reads(tiny_base: Path) -> None:
    from transformers import CLIPTokenizer

    from node.generate.models import fit_prompt

    tokenizer = CLIPTokenizer.from_pretrained(tiny_base / "tokenizer")
    text = "FINDINGS: " + " ".join(f"opacity{i}" for i in range(60)) + "."
    cut, was_cut = fit_prompt(tokenizer, text)
    count = len(tokenizer(cut, verbose=False).input_ids)
    assert was_cut and count <= tokenizer.model_max_length
    words = text.split()
    kept = cut.split()
    assert kept == words[: len(kept)]  # a prefix, whole words
    longer = " ".join(words[: len(kept) + 1])
    assert len(tokenizer(longer, verbose=False).input_ids) > tokenizer.model_max_length
    assert fit_prompt(tokenizer, "a chest x-ray") == ("a chest x-ray", False)
