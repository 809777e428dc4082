"""The separation check (ngmm_formula.checks) and the predict-side dtype handling."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import SeparationWarning, datasets, get_family, ngmm
from ngmm_formula.api import prepare
from ngmm_formula.checks import check_separation, column_scale_problems, separating_columns


def _signs(y: np.ndarray) -> np.ndarray:
    return np.where(y >= 1, 1.0, np.where(y <= 0, -1.0, 0.0))


def _X(n: int, p: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.c_[np.ones(n), rng.normal(size=(n, p - 1))]


@pytest.mark.parametrize("n", [200, 20_000])
def test_separating_columns_constructed(n: int) -> None:
    rng = np.random.default_rng(3)
    X = _X(n, 5)
    # complete separation by one column, threshold away from 0: the intercept takes part
    assert separating_columns(X, _signs((X[:, 1] > 0.3) * 1.0)) == [0, 1]
    # ... through 0: the column alone
    assert separating_columns(X, _signs((X[:, 2] > 0) * 1.0)) == [2]
    # a combination of two columns
    assert separating_columns(X, _signs((X[:, 1] + X[:, 3] > 0) * 1.0)) == [1, 3]
    # quasi-complete: both outcomes where the column is 0
    x = np.round(X[:, 1])
    y = np.where(x > 0, 1.0, np.where(x < 0, 0.0, (rng.random(n) < 0.5) * 1.0))
    assert separating_columns(np.c_[X[:, :1], x, X[:, 2:]], _signs(y)) == [1]
    # a rare factor level with only successes
    level = (rng.random(n) < 0.02) * 1.0
    eta = X @ np.array([0.2, 0.5, -0.5, 0.3, 0.0])
    y = np.where(level == 1, 1.0, (rng.random(n) < 1 / (1 + np.exp(-eta))) * 1.0)
    assert separating_columns(np.c_[X, level], _signs(y)) == [5]
    # proportions strictly between 0 and 1 pin their rows: no separation by the level
    y2 = np.where(level == 1, 0.5, y)
    assert separating_columns(np.c_[X, level], _signs(y2)) is None
    # ordinary binomial data
    assert separating_columns(X, _signs((rng.random(n) < 1 / (1 + np.exp(-eta))) * 1.0)) is None


def test_separation_cost_100k_rows() -> None:
    """Measured: ~0.1-0.4 s for 100,000 rows and 5-20 columns, separated or not (on two shared
    cores); the bound here leaves room for a loaded machine."""
    rng = np.random.default_rng(0)
    X = _X(100_000, 10)
    eta = X @ rng.normal(size=10) * 0.5
    y = (rng.random(100_000) < 1 / (1 + np.exp(-eta))) * 1.0
    t = time.perf_counter()
    assert separating_columns(X, _signs(y)) is None
    assert separating_columns(X, _signs((X[:, 1] + X[:, 2] > 0) * 1.0)) == [1, 2]
    assert time.perf_counter() - t < 4.0


@pytest.mark.parametrize("formula, name, family", [
    ("cbind(incidence, size - incidence) ~ period + (1 | herd)", "cbpp", "binomial"),
    ("use ~ age + I(age**2) + urban + livch + (1 | district)", "Contraception", "binomial"),
    ("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", "VerbAgg", "binomial"),
    ("TICKS ~ YEAR + HEIGHT + (1 | BROOD)", "grouseticks", "poisson"),
])
def test_no_separation_on_ordinary_data(formula: str, name: str, family: str) -> None:
    prepared = prepare(formula, datasets.load(name), family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeparationWarning)
        assert check_separation(prepared.design, prepared.family) == []


@pytest.mark.parametrize("seed", range(5))
def test_no_separation_on_simulated_binomial(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, groups = 300, 30
    g = rng.integers(0, groups, n)
    x, z = rng.normal(size=n), rng.normal(size=n)
    f = rng.choice(["a", "b", "c"], n)
    eta = -0.3 + 0.8 * x - 0.5 * z + (f == "b") * 0.4 + rng.normal(size=groups)[g]
    df = pd.DataFrame({"y": (rng.random(n) < 1 / (1 + np.exp(-eta))) * 1, "x": x, "z": z,
                       "f": f, "g": g.astype(str)})
    prepared = prepare("y ~ x + z + f + (1 | g)", df, "binomial")
    assert check_separation(prepared.design, prepared.family) == []


def test_separation_by_network_input() -> None:
    """nn() inputs are checked as linear columns (the networks' linear start uses them); the
    input is standardised, so the threshold x = 0 needs the intercept too."""
    rng = np.random.default_rng(0)
    n = 120
    x, z = rng.normal(size=n), rng.normal(size=n)
    df = pd.DataFrame({"y": (x > 0) * 1, "x": x, "z": z,
                       "g": np.repeat(np.arange(12), 10).astype(str)})
    prepared = prepare("y ~ z + nn(x) + (1 | g)", df, "binomial")
    with pytest.warns(SeparationWarning, match=r"nn\(x\): input x"):
        named = check_separation(prepared.design, prepared.family)
    assert named == ["(Intercept)", "nn(x): input x"]


def test_identity_link_poisson_is_not_checked() -> None:
    fam = get_family("poisson", "identity")
    assert fam.separation_signs(np.zeros(3), np.ones(3)) is None


def test_scale_rule() -> None:
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=50), rng.normal(size=50)
    ones = np.ones(50)
    assert column_scale_problems(np.c_[ones, x * 1e300], ["(Intercept)", "x"]) == (["x"], [])
    assert column_scale_problems(np.c_[ones, x * 1e9, z], ["i", "x", "z"]) == ([], ["x"])
    assert column_scale_problems(np.c_[ones, x * 1e-9, z], ["i", "x", "z"]) == ([], ["x"])
    assert column_scale_problems(np.c_[ones, x * 1e6, z], ["i", "x", "z"]) == ([], [])


def test_predict_factor_given_as_numbers() -> None:
    """A factor trained on text levels "1", "2" predicts from the numbers 1, 2 (same levels as
    text), as from the text; the caller's frame is not changed."""
    rng = np.random.default_rng(0)
    n = 60
    df = pd.DataFrame({"y": rng.normal(size=n), "f": np.tile(["1", "2"], n // 2),
                       "g": np.repeat(np.arange(6), 10).astype(str)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm("y ~ f + (1 | g)", df)
    new = pd.DataFrame({"f": [1, 2, 1], "g": ["0", "1", "9"]})
    before = new.copy()
    as_text = fit.predict(new.assign(f=new.f.astype(str)), allow_new_levels=True)
    np.testing.assert_allclose(fit.predict(new, allow_new_levels=True), as_text)
    pd.testing.assert_frame_equal(new, before)
