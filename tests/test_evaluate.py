"""``synthnode model evaluate``: the Fréchet distance checked against independent computations,
MS-SSIM's settings and values, the sheet, and the whole evaluation on phantom studies with the
tiny model (its figures measure plumbing, not fidelity: the model is tiny and barely trained)."""

from __future__ import annotations

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
from tests.trainingdata import phantom

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
