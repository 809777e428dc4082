"""Tests of :class:`ngmm_formula.results.NGMMResult` and of what ``ngmm`` promises around a fit.

Small fits (cbpp, sleepstudy) against ``tests/reference/lme4_refs.json``:

* ``varcorr``: the columns and rows of R's ``as.data.frame(VarCorr(fit))`` (names exactly,
  values to 1e-3 relative as in ``tests/test_fit_reference.py``'s variance tolerance);
* ``ranef``: conditional modes and conditional variances (``postVar``) to 1e-3 relative
  (absolute for modes near 0: 1e-3 of the largest mode);
* fitted values (R's ``fitted(fit)[1:10]``) to 1e-5 relative;
* predictions: training data, new levels, ``re_form="~0"``, ``allow_new_levels=False``;
* immutability of the result and of the caller's data; one warning per outcome;
* errors for bad input.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import warnings
import weakref
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula.api import ngmm
from ngmm_formula.datasets import load
from ngmm_formula.errors import (
    DataError,
    NGMMError,
    NGMMWarning,
    RankDeficiencyWarning,
    SingularFitWarning,
)
from ngmm_formula.families import get_family
from ngmm_formula.results import NGMMResult
from tests.references import REFS

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
SLEEP = "Reaction ~ Days + (Days | Subject)"


@cache
def fit_of(ref_id: str) -> NGMMResult:
    if ref_id == "cbpp_logit_laplace":
        # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
        return ngmm(CBPP, load("cbpp"), "binomial", approx="laplace")
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE / FALSE)
    return ngmm(SLEEP, load("sleepstudy"), reml=ref_id == "sleep_reml")


SMALL = ["cbpp_logit_laplace", "sleep_reml", "sleep_ml"]


# ------------------------------------------------------------------------------------------
# varcorr, ranef, fitted


@pytest.mark.parametrize("ref_id", SMALL)
def test_varcorr_layout_and_values(ref_id: str) -> None:
    fit = fit_of(ref_id)
    ref = pd.DataFrame(REFS[ref_id]["varcorr"])
    vc = fit.varcorr
    assert list(vc.columns) == ["group", "var1", "var2", "vcov", "sdcor"]
    # R: as.data.frame(VarCorr(fit)) -- grp, var1, var2 (NA as missing), row order
    assert _labels(vc, ["group", "var1", "var2"]) == _labels(ref, ["grp", "var1", "var2"])
    np.testing.assert_allclose(vc["vcov"], ref["vcov"], rtol=1e-3)
    np.testing.assert_allclose(vc["sdcor"], ref["sdcor"], rtol=1e-3)


def _labels(frame: pd.DataFrame, cols: list[str]) -> list[list[str | None]]:
    return [[None if pd.isna(v) else v for v in row] for row in frame[cols].values.tolist()]


def _ranef_ref(ref_id: str, factor: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    by = REFS[ref_id]["ranef"]["by_factor"][factor]
    cols = by["columns"]
    levels = [r["level"] for r in by["levels"]]
    modes = np.array([[r["condval"][c] for c in cols] for r in by["levels"]])
    condvar = np.array([r["condvar"] for r in by["levels"]])  # (levels, q, q)
    return levels, cols, modes, condvar


RANEF = [
    pytest.param("cbpp_logit_laplace", "herd", id="cbpp_logit_laplace"),
    pytest.param("sleep_ml", "Subject", id="sleep_ml"),
    pytest.param("sleep_reml", "Subject", id="sleep_reml"),
]


@pytest.mark.parametrize(("ref_id", "factor"), RANEF)
def test_ranef_conditional_modes(ref_id: str, factor: str) -> None:
    fit = fit_of(ref_id)
    levels, cols, modes, _ = _ranef_ref(ref_id, factor)
    re = fit.ranef[factor]
    assert list(re.index.astype(str)) == levels
    assert list(re.columns) == cols
    # R: ranef(fit)[[factor]]
    np.testing.assert_allclose(re.to_numpy(), modes, rtol=1e-3,
                               atol=1e-3 * np.abs(modes).max())


@pytest.mark.parametrize(("ref_id", "factor"), RANEF)
def test_ranef_conditional_variances(ref_id: str, factor: str) -> None:
    """lme4's postVar is conditional on beta_hat: sigma^2 Lambda (Lambda' Z' Z Lambda + I)^-1
    Lambda' for lmer, i.e. the inverse of the u-block of the Hessian, not the u-block of the
    inverse (regression test: REML fits used the latter, +18 % on sleepstudy)."""
    fit = fit_of(ref_id)
    _, _, _, condvar = _ranef_ref(ref_id, factor)
    post = fit.ranef[factor].attrs["postVar"]  # (q, q, levels) as R's attr(, "postVar")
    assert post.shape == (condvar.shape[1], condvar.shape[2], condvar.shape[0])
    # R: attr(ranef(fit, condVar = TRUE)[[factor]], "postVar")
    np.testing.assert_allclose(np.transpose(post, (2, 0, 1)), condvar, rtol=1e-3,
                               atol=1e-3 * np.abs(condvar).max())


@pytest.mark.parametrize("ref_id", SMALL)
def test_fitted_and_residual_shapes(ref_id: str) -> None:
    fit = fit_of(ref_id)
    n = REFS[ref_id]["nobs"]
    assert fit.nobs == n
    assert fit.fitted.shape == (n,)
    assert fit.eta.shape == (n,)
    for kind in ("response", "pearson", "deviance", "working"):
        r = fit.residuals(kind)
        assert r.shape == (n,)
        assert np.isfinite(r).all()
    np.testing.assert_allclose(fit.residuals("response"), fit.design.y - fit.fitted)
    # R: fitted(fit)[1:10]
    np.testing.assert_allclose(fit.fitted[:10], REFS[ref_id]["fitted_head"], rtol=1e-5)


# ------------------------------------------------------------------------------------------
# prediction


@pytest.mark.parametrize("ref_id", SMALL)
def test_predict_training_data_equals_fitted(ref_id: str) -> None:
    fit = fit_of(ref_id)
    np.testing.assert_allclose(fit.predict(), fit.fitted, rtol=1e-12)
    np.testing.assert_allclose(fit.predict(type="link"), fit.eta, rtol=1e-12)
    data = load("cbpp" if ref_id.startswith("cbpp") else "sleepstudy")
    # the same rows passed as newdata
    np.testing.assert_allclose(fit.predict(data), fit.fitted, rtol=1e-10)
    np.testing.assert_allclose(fit.predict(data, type="link"), fit.eta, rtol=1e-10, atol=1e-12)


def test_predict_new_level_is_population_prediction() -> None:
    fit = fit_of("sleep_ml")
    data = load("sleepstudy")
    new = data.iloc[[0, 1, 15]].copy()
    new["Subject"] = new["Subject"].cat.add_categories(["new"])
    new.iloc[2, new.columns.get_loc("Subject")] = "new"
    pred = fit.predict(new, allow_new_levels=True)
    beta = fit.fixef
    # R: predict(fit, newdata, allow.new.levels = TRUE): the new level gets b = 0
    assert pred[2] == pytest.approx(beta["(Intercept)"] + beta["Days"] * new["Days"].iloc[2],
                                    rel=1e-12)
    np.testing.assert_allclose(pred[:2], fit.fitted[[0, 1]], rtol=1e-10)


@pytest.mark.parametrize("ref_id", SMALL)
def test_predict_without_random_effects_is_x_beta(ref_id: str) -> None:
    fit = fit_of(ref_id)
    x_beta = fit.design.offset + fit.design.X @ fit.fixef.to_numpy()
    # R: predict(fit, re.form = NA, type = "link")
    np.testing.assert_allclose(fit.predict(re_form="~0", type="link"), x_beta, rtol=1e-12)
    np.testing.assert_allclose(fit.predict(re_form="~ 0"), fit._mean(x_beta), rtol=1e-12)
    data = load("cbpp" if ref_id.startswith("cbpp") else "sleepstudy")
    np.testing.assert_allclose(fit.predict(data, re_form="~0", type="link"), x_beta,
                               rtol=1e-10, atol=1e-12)


def test_predict_new_level_raises_when_not_allowed() -> None:
    fit = fit_of("cbpp_logit_laplace")
    new = load("cbpp").iloc[:2].copy()
    new["herd"] = new["herd"].cat.add_categories(["99"])
    new.iloc[1, new.columns.get_loc("herd")] = "99"
    # as lme4's allow.new.levels = FALSE: the default raises, naming the factor, the unseen
    # level and the argument that allows it
    for call in (lambda: fit.predict(new), lambda: fit.predict(new, allow_new_levels=False),
                 lambda: fit.predict_se(new)):
        with pytest.raises(DataError, match=r"'herd' has 1 level\(s\) not in the training "
                           r"data: '99'; use allow_new_levels=True"):
            call()
    assert np.isfinite(fit.predict(new, allow_new_levels=True)).all()
    assert np.isfinite(fit.predict_se(new, allow_new_levels=True)).all()
    # population-level predictions use no random effect: new levels do not matter
    np.testing.assert_array_equal(fit.predict(new, re_form="~0"),
                                  fit.predict(new, re_form="~0", allow_new_levels=True))
    assert np.isfinite(fit.predict_se(new, re_form="~0")).all()


def test_predict_new_levels_message_lists_at_most_five() -> None:
    fit = fit_of("cbpp_logit_laplace")
    new = pd.concat([load("cbpp").iloc[:1]] * 7, ignore_index=True)
    new["herd"] = [f"new{i}" for i in range(7)]
    with pytest.raises(DataError, match=r"7 level\(s\) .*'new0', 'new1', 'new2', 'new3', "
                       r"'new4' and 2 more; use allow_new_levels=True"):
        fit.predict(new)


def test_predict_bad_arguments() -> None:
    fit = fit_of("cbpp_logit_laplace")
    with pytest.raises(NGMMError):
        fit.predict(type="probability")
    with pytest.raises(NGMMError):
        fit.predict(re_form="~(1|herd)")


# ------------------------------------------------------------------------------------------
# immutability and warnings


def test_result_is_immutable() -> None:
    fit = fit_of("cbpp_logit_laplace")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.loglik = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.fixef = fit.fixef * 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.diagnostics.converged = False  # type: ignore[misc]


@pytest.mark.parametrize(("name", "formula", "family", "kw"), [
    ("cbpp", CBPP, "binomial", {"approx": "laplace"}),
    ("sleepstudy", SLEEP, "gaussian", {}),
    ("Contraception", "use ~ age + I(age ** 2) + urban + (1 | district)", "binomial",
     {"approx": "laplace"}),
], ids=["cbpp", "sleepstudy", "Contraception"])
def test_caller_data_unchanged(name: str, formula: str, family: str,
                               kw: dict[str, Any]) -> None:
    data = load(name)
    if name == "Contraception":  # a subset (with a non-default index)
        data = data[data["district"].cat.codes < 10].copy()
        data["district"] = data["district"].cat.remove_unused_categories()
    if name == "sleepstudy":  # a missing covariate: the row is dropped from the fit only
        data.loc[data.index[3], "Days"] = np.nan
    before = copy.deepcopy(data)
    ngmm(formula, data, family, **kw)
    pd.testing.assert_frame_equal(data, before, check_exact=True)
    assert list(data.index) == list(before.index)
    for c in data.columns:
        assert data[c].dtype == before[c].dtype


def _singular_data() -> pd.DataFrame:
    """Every group has the same responses (in a different order): the between-group
    variance estimate is exactly 0 (ML and REML)."""
    base = np.array([1.0, 2.5, 3.0, 4.5, 6.0])
    rng = np.random.default_rng(3)
    ys = np.concatenate([rng.permutation(base) for _ in range(6)])
    return pd.DataFrame({"y": ys, "g": pd.Categorical(np.repeat(list("abcdef"), 5))})


@pytest.mark.parametrize("reml", [True, False])
def test_singular_fit_warns_once(reml: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = ngmm("y ~ 1 + (1 | g)", _singular_data(), reml=reml)
    ours = [w for w in caught if issubclass(w.category, NGMMWarning)]
    assert [w.category for w in ours] == [SingularFitWarning], [str(w.message) for w in ours]
    assert fit.diagnostics.singular
    assert fit.varcorr["sdcor"].iloc[0] < 1e-3 * fit.sigma
    assert fit.fixef["(Intercept)"] == pytest.approx(3.4, rel=1e-8)


def test_regular_fit_does_not_warn() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = ngmm("Yield ~ 1 + (1 | Batch)", load("Dyestuff"))
    assert [w for w in caught if issubclass(w.category, NGMMWarning)] == []
    assert not fit.diagnostics.singular


# ------------------------------------------------------------------------------------------
# bad input


def _small(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 40
    g = np.repeat(list("abcde"), n // 5)
    x = rng.standard_normal(n)
    eta = 0.2 + 0.5 * x + rng.normal(0, 0.5, 5)[np.repeat(np.arange(5), n // 5)]
    return pd.DataFrame({
        "x": x, "g": pd.Categorical(g),
        "ybin": rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float),
        "succ": rng.binomial(5, 1 / (1 + np.exp(-eta))).astype(float),
        "count": rng.poisson(np.exp(eta)).astype(float),
        "ygauss": eta + rng.normal(0, 0.3, n),
    })


def test_binomial_response_outside_unit_interval() -> None:
    d = _small()
    d.loc[3, "ybin"] = 2.0
    with pytest.raises(DataError, match="ybin"):
        ngmm("ybin ~ x + (1 | g)", d, "binomial")
    d.loc[3, "ybin"] = -0.5
    with pytest.raises(DataError, match="ybin"):
        ngmm("ybin ~ x + (1 | g)", d, "binomial")


def test_binomial_negative_failure_count() -> None:
    d = _small()
    d["fail"] = 5 - d["succ"]
    d.loc[7, "fail"] = -1.0
    with pytest.raises(DataError):
        ngmm("cbind(succ, fail) ~ x + (1 | g)", d, "binomial")


def test_poisson_non_integer_counts() -> None:
    d = _small()
    d.loc[2, "count"] = 1.5
    with pytest.raises(DataError, match="count"):
        ngmm("count ~ x + (1 | g)", d, "poisson")


def test_nan_covariate_rows_are_dropped() -> None:
    d = _small()
    d.loc[[4, 9], "x"] = np.nan
    fit = ngmm("ygauss ~ x + (1 | g)", d)
    assert fit.nobs == len(d) - 2
    assert any("2 observations deleted" in m for m in fit.diagnostics.messages)
    clean = ngmm("ygauss ~ x + (1 | g)", d.dropna())
    assert fit.loglik == pytest.approx(clean.loglik, rel=1e-10)


def test_infinite_covariate_raises() -> None:
    d = _small()
    d.loc[4, "x"] = np.inf
    with pytest.raises(DataError, match="infinite"):
        ngmm("ygauss ~ x + (1 | g)", d)


def test_aliased_column_dropped_with_warning() -> None:
    d = _small()
    d["x2"] = 2.0 * d["x"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = ngmm("ygauss ~ x + x2 + (1 | g)", d)
    rank = [w for w in caught if issubclass(w.category, RankDeficiencyWarning)]
    assert len(rank) == 1
    assert "x2" in str(rank[0].message)
    assert list(fit.fixef.index) == ["(Intercept)", "x"]
    same = ngmm("ygauss ~ x + (1 | g)", d)
    assert fit.loglik == pytest.approx(same.loglik, rel=1e-10)


@pytest.mark.parametrize(("family", "link"), [("poisson", "probit"), ("gamma", "logit"),
                                              ("binomial", "inverse")])
def test_family_link_pair_that_does_not_exist(family: str, link: str) -> None:
    with pytest.raises(DataError, match=link):
        get_family(family, link)


def test_unknown_family() -> None:
    with pytest.raises(DataError, match="unknown family"):
        ngmm("count ~ x + (1 | g)", _small(), "quasipoisson")


def test_ranef_and_fitted_do_not_depend_on_the_sign_of_theta() -> None:
    """The likelihood is even in the sign of each column of Lambda, so the optimiser may end at
    a negative diagonal; the conditional modes u then carry the opposite sign and
    b = Lambda u, the fitted values and the reported (positive-diagonal) theta must be the
    same as from the positive solution. Here column 2 of a correlated (1 + urban | district)
    term is flipped after the fit."""
    from ngmm_formula.api import _module, make_result, prepare
    from ngmm_formula.fit import Control, Objective, glm_start, optimise

    data = load("Contraception")
    formula = "use ~ age + urban + (1 + urban | district)"
    control = Control()
    prepared = prepare(formula, data, "binomial", approx="laplace")
    module = _module(prepared)
    obj = Objective(prepared.problem, prepared.family, prepared.approximation, module)
    glm_start(prepared.problem, prepared.family, module)
    opt = optimise(obj)
    kw: dict[str, Any] = dict(formula=formula, data_name=None, refit=None)
    reference = make_result(prepared, obj, opt, control, **kw)
    with torch.no_grad():
        module.theta[2].neg_()  # theta = (L11, L21, L22), column-major: column 2 is L22
    obj.mode = None
    flipped = make_result(prepared, obj, opt, control, **kw)
    assert float(module.theta.detach()[2]) < 0
    np.testing.assert_allclose(flipped.theta.to_numpy(), reference.theta.to_numpy(), rtol=1e-12)
    for a, b in zip(flipped.ranef.values(), reference.ranef.values()):
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(a.attrs["postVar"], b.attrs["postVar"], rtol=1e-6,
                                   atol=1e-12)
    np.testing.assert_allclose(flipped.fitted, reference.fitted, rtol=1e-9)


def _arrays(fit: NGMMResult) -> dict[str, np.ndarray]:
    """Every numpy array a result holds, by where it is (design, terms, postVar, ...)."""
    out: dict[str, np.ndarray] = {"eta": fit.eta}
    out.update({f"random_coef[{k}]": a for k, a in enumerate(fit.random_coef)})
    d = fit.design
    for f in dataclasses.fields(d):
        if isinstance(getattr(d, f.name), np.ndarray):
            out[f"design.{f.name}"] = getattr(d, f.name)
    for k, term in enumerate(d.re_terms):
        for f in dataclasses.fields(term):
            if isinstance(getattr(term, f.name), np.ndarray):
                out[f"design.re_terms[{k}].{f.name}"] = getattr(term, f.name)
    for g, frame in fit.ranef.items():
        out[f"ranef[{g}].postVar"] = frame.attrs["postVar"]
    return out


@pytest.mark.parametrize("ref_id", SMALL)
def test_arrays_of_a_result_are_read_only(ref_id: str) -> None:
    fit = fit_of(ref_id)
    fitted = fit.fitted.copy()
    arrays = _arrays(fit)
    assert len(arrays) >= 8
    for where, arr in arrays.items():
        with pytest.raises(ValueError, match="read-only"):
            arr.reshape(-1)[:1] = 0  # noqa: B018 - the assignment is the test
        assert not arr.flags.writeable, where
    for series in (fit.fixef, fit.theta):
        with pytest.raises(ValueError, match="read-only"):
            series.to_numpy()[:1] = 0
    np.testing.assert_array_equal(fit.fitted, fitted)


def test_result_keeps_no_reference_to_the_callers_data_frame() -> None:
    data = load("sleepstudy").copy()
    alive = weakref.ref(data)
    fit = ngmm(SLEEP, data, reml=False)
    del data
    gc.collect()
    assert alive() is None
    assert fit.refit is not None and fit.refit.formula == SLEEP
    assert fit.refit(reml=False).loglik == pytest.approx(fit.loglik, abs=1e-9)
