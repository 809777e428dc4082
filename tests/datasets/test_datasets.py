"""Tests of the bundled data sets and of the synthetic-data generator.

Expected shapes and levels are R's: ``dim(lme4::cbpp)``, ``levels(lme4::cbpp$herd)``, ...
(lme4 1.1-31, mlmRev 1.0-8, the versions ``datasets/export_datasets.R`` was run with).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ngmm_formula.datasets import available, load, simulate_grouped
from ngmm_formula.errors import DataError

# name: (dim(d), names of the factor columns, names of the ordered factors)
SHAPES = {
    "cbpp": ((56, 4), ["herd", "period"], []),
    "sleepstudy": ((180, 3), ["Subject"], []),
    "grouseticks": ((403, 7), ["INDEX", "BROOD", "YEAR", "LOCATION"], []),
    "VerbAgg": ((7584, 9), ["Gender", "item", "resp", "id", "btype", "situ", "mode", "r2"],
                ["resp"]),
    "Penicillin": ((144, 3), ["plate", "sample"], []),
    "Pastes": ((60, 4), ["batch", "cask", "sample"], []),
    "Dyestuff": ((30, 2), ["Batch"], []),
    "InstEval": ((73421, 7), ["s", "d", "studage", "lectage", "service", "dept"],
                 ["studage", "lectage"]),
    "Contraception": ((1934, 6), ["woman", "district", "use", "livch", "urban"], []),
    "Exam": ((4059, 10), ["school", "schgend", "vr", "intake", "sex", "type", "student"], []),
    # mlmRev::Chem97 without its column student (the row number)
    "Chem97": ((31022, 7), ["lea", "school", "gender"], []),
    "guImmun": ((2159, 13), ["kid", "mom", "comm", "immun", "kid2p", "mom25p", "ord", "ethn",
                            "momEd", "husEd", "momWork", "rural"], []),
    # psych::lsat7 (psych 2.2.9) reshaped to long format by datasets/export_datasets.R
    "lsat7": ((5000, 3), ["id", "item"], []),
}

# (name, column): (nlevels(d[[column]]), head(levels(d[[column]]), 3))
LEVELS = {
    ("cbpp", "herd"): (15, ["1", "2", "3"]),
    ("cbpp", "period"): (4, ["1", "2", "3"]),
    ("sleepstudy", "Subject"): (18, ["308", "309", "310"]),
    ("grouseticks", "BROOD"): (118, ["501", "502", "503"]),
    ("grouseticks", "YEAR"): (3, ["95", "96", "97"]),
    ("VerbAgg", "resp"): (3, ["no", "perhaps", "yes"]),
    ("VerbAgg", "mode"): (2, ["want", "do"]),
    ("InstEval", "d"): (1128, ["1", "6", "7"]),
    ("InstEval", "dept"): (14, ["15", "5", "10"]),
    ("InstEval", "studage"): (4, ["2", "4", "6"]),
    ("Contraception", "district"): (60, ["1", "2", "3"]),
    ("Contraception", "livch"): (4, ["0", "1", "2"]),
    ("Exam", "vr"): (3, ["bottom 25%", "mid 50%", "top 25%"]),
    ("Exam", "schgend"): (3, ["mixed", "boys", "girls"]),
    ("Chem97", "school"): (2410, ["1", "2", "3"]),
    ("Chem97", "gender"): (2, ["M", "F"]),
    ("guImmun", "comm"): (161, ["1", "36", "38"]),
    ("guImmun", "kid"): (2159, ["2", "269", "272"]),
    ("lsat7", "id"): (1000, ["1", "2", "3"]),
    ("lsat7", "item"): (5, ["Q1", "Q2", "Q3"]),
}


def test_available_lists_every_data_set() -> None:
    assert sorted(available()) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_and_column_types(name: str) -> None:
    shape, factors, ordered = SHAPES[name]
    df = load(name)
    assert df.shape == shape
    assert isinstance(df.index, pd.RangeIndex)
    for column in df.columns:
        dtype = df[column].dtype
        if column in factors:
            assert isinstance(dtype, pd.CategoricalDtype), column
            assert dtype.ordered == (column in ordered), column
        else:
            assert dtype in (np.float64, np.int64), (column, dtype)
    assert not df.isna().any().any()


@pytest.mark.parametrize(("key", "expected"), sorted(LEVELS.items()))
def test_factor_levels_in_r_order(key: tuple[str, str], expected: tuple[int, list[str]]) -> None:
    name, column = key
    n_levels, first = expected
    categories = load(name)[column].cat.categories
    assert len(categories) == n_levels
    assert list(categories[:3]) == first


def test_values_match_r() -> None:
    # R: head(cbpp, 2); sleepstudy$Reaction[2]; table(VerbAgg$resp)
    cbpp = load("cbpp")
    assert cbpp.loc[:1, "herd"].tolist() == ["1", "1"]
    assert cbpp.loc[:1, "incidence"].tolist() == [2.0, 3.0]
    assert cbpp["herd"].cat.codes.iloc[-1] == 14  # herd "15", not "9" as sorted strings
    assert load("sleepstudy")["Reaction"].iloc[1] == 258.7047
    counts = load("VerbAgg")["resp"].value_counts(sort=False)
    assert counts.tolist() == [3973, 2081, 1530]
    # R: head(mlmRev::Chem97$score, 2); head(Chem97$gcsescore, 2); table(guImmun$immun)
    chem = load("Chem97")
    assert chem["score"].iloc[:2].tolist() == [4.0, 10.0]
    assert chem["gcsescore"].iloc[:2].tolist() == [6.625, 7.625]
    assert load("guImmun")["immun"].value_counts(sort=False).tolist() == [1195, 964]


def test_name_lookup_is_case_insensitive() -> None:
    pd.testing.assert_frame_equal(load("contraception"), load("Contraception"))
    pd.testing.assert_frame_equal(load("CBPP"), load("cbpp"))


def test_each_load_returns_an_independent_frame() -> None:
    first = load("cbpp")
    first.loc[0, "incidence"] = -1.0
    first["herd"] = first["herd"].cat.rename_categories(lambda s: "h" + s)
    second = load("cbpp")
    assert second.loc[0, "incidence"] == 2.0
    assert second["herd"].cat.categories[0] == "1"
    assert first is not second


def test_unknown_name_lists_available() -> None:
    with pytest.raises(DataError, match="unknown data set 'nosuch'.*cbpp.*sleepstudy"):
        load("nosuch")


# ---------------------------------------------------------------------------------------------
# simulate_grouped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gaussian", "binomial", "poisson"])
@pytest.mark.parametrize("effect", ["linear", "sine", "interaction"])
def test_simulate_is_reproducible_and_has_requested_size(family: str, effect: str) -> None:
    a = simulate_grouped(30, 7, family, effect, n_noise=2, seed=11)
    b = simulate_grouped(30, 7, family, effect, n_noise=2, seed=11)
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs == b.attrs
    assert not a.equals(simulate_grouped(30, 7, family, effect, n_noise=2, seed=12))
    assert len(a) == 30 * 7
    assert list(a.columns) == ["y", "x1", "x2", "x3", "noise1", "noise2", "g", "f_true",
                               "eta_true", "b_true", "b_x3_true"]
    assert list(a["g"].cat.categories[:2]) == ["g0001", "g0002"]
    assert a["g"].value_counts().eq(7).all()
    assert abs(a["f_true"].mean()) < 1e-12
    assert a.attrs["family"] == family and a.attrs["effect"] == effect
    assert a.attrs["seed"] == 11 and a.attrs["re_sd"] == 1.0
    if family != "gaussian":
        assert a["y"].dtype == np.int64 and (a["y"] >= 0).all()
        assert a.attrs["sigma"] is None


def test_simulate_eta_decomposes() -> None:
    df = simulate_grouped(20, 5, effect="linear", intercept=0.3, slope_sd=0.4, seed=2)
    eta = 0.3 + df.f_true + 0.5 * df.x3 + df.b_true + df.b_x3_true * df.x3
    np.testing.assert_allclose(df.eta_true, eta, rtol=0, atol=1e-12)
    raw = 0.8 * df.x1 - 0.5 * df.x2
    np.testing.assert_allclose(df.f_true, raw - raw.mean(), rtol=0, atol=1e-12)


def test_noise_covariates_leave_other_columns_unchanged() -> None:
    plain = simulate_grouped(10, 4, "poisson", seed=5)
    noisy = simulate_grouped(10, 4, "poisson", n_noise=3, seed=5)
    pd.testing.assert_frame_equal(plain, noisy[plain.columns])


def test_simulate_callable_effect() -> None:
    def bump(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        return np.exp(-(x1**2 + x2**2))

    df = simulate_grouped(10, 3, effect=bump, seed=0)
    raw = np.exp(-(df.x1**2 + df.x2**2))
    np.testing.assert_allclose(df.f_true, raw - raw.mean(), atol=1e-12)
    assert df.attrs["effect"] == "bump"


def test_random_effect_sd_is_recovered() -> None:
    # 4000 groups: the sample SD of J iid N(0, re_sd^2) draws has relative standard error
    # 1/sqrt(2(J-1)) ~ 0.011, so a 6 % tolerance is more than 5 standard errors (it fails
    # for a wrong variance, e.g. re_sd^2 used as the SD, but not by chance).
    re_sd, m, sigma = 1.5, 20, 1.0
    df = simulate_grouped(4000, m, "gaussian", re_sd=re_sd, slope_sd=0.7, sigma=sigma, seed=7)
    per_group = df.groupby("g", observed=True)
    assert per_group["b_true"].first().std() == pytest.approx(re_sd, rel=0.06)
    assert per_group["b_x3_true"].first().std() == pytest.approx(0.7, rel=0.06)
    # The response carries it too. Without the slope part, the group means of
    # y - f - 0.5 x3 - s_j x3 are b_j + mean of m N(0, sigma^2) errors, so
    # var(group means) - sigma^2/m estimates re_sd^2 (relative SE of the SD ~ 0.012).
    resid = df.y - df.f_true - 0.5 * df.x3 - df.b_x3_true * df.x3
    means = resid.groupby(df.g, observed=True).mean()
    assert np.sqrt(means.var() - sigma**2 / m) == pytest.approx(re_sd, rel=0.06)
    # and the residual SD within groups is sigma
    assert (df.y - df.eta_true).std() == pytest.approx(sigma, rel=0.02)


def test_default_poisson_and_binomial_scales_are_reasonable() -> None:
    counts = simulate_grouped(500, 20, "poisson", seed=3)["y"]
    assert 1.5 < counts.mean() < 6 and counts.max() < 1000
    coin = simulate_grouped(500, 20, "binomial", seed=3)["y"]
    assert set(coin.unique()) == {0, 1} and 0.3 < coin.mean() < 0.7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_groups": 0}, "n_groups"),
        ({"n_groups": 2.5}, "n_groups"),
        ({"n_groups": True}, "n_groups"),
        ({"n_per_group": -1}, "n_per_group"),
        ({"family": "gamma"}, "family"),
        ({"family": None}, "family"),
        ({"effect": "cosine"}, "effect"),
        ({"effect": 3}, "effect"),
        ({"effect": lambda x1, x2: x1[:3]}, "shape"),
        ({"effect": lambda x1, x2: np.full_like(x1, np.nan)}, "non-finite"),
        ({"re_sd": -1.0}, "re_sd"),
        ({"slope_sd": float("nan")}, "slope_sd"),
        ({"sigma": 0.0}, "sigma"),
        ({"intercept": "1"}, "intercept"),
        ({"n_noise": -2}, "n_noise"),
        ({"seed": -1}, "seed"),
        ({"family": "poisson", "intercept": 25.0}, "Poisson linear predictor"),
    ],
)
def test_simulate_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_grouped(**kwargs)  # type: ignore[arg-type]
