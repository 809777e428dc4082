"""Tests of :mod:`ngmm_formula.compare`: the side-by-side table with statsmodels' GLMMs.

* the translation of lme4 formulas into statsmodels' arguments, as a table;
* sleepstudy (``MixedLM``, REML and ML): both fits are exact, so fixed effects and SDs agree to
  1e-4 relative and the log-likelihoods to 1e-3 absolute; Penicillin and Pastes (crossed and
  nested factors: variance components of one all-ones group) likewise;
* cbpp (``BinomialBayesMixedGLM`` on Bernoulli rows): statsmodels' column is filled, its
  log-likelihood is this package's objective at its estimates, and it cannot exceed the
  maximum-likelihood fit's;
* Contraception with an unscaled ``I(age ** 2)`` and grouseticks with an unscaled ``HEIGHT``:
  statsmodels' variational fit fails, and the table says so instead of showing its numbers;
* an NGMM: its linear version is refitted and is what statsmodels fits;
* held-out log-likelihood, RMSE and AUC; tables of this package's fits only; output formats.

statsmodels' successful Poisson fit (variational Bayes on grouseticks, ~10 s) is marked slow.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import Control, DataError, NGMMError, get_family, ngmm
from ngmm_formula.api import objective_at, prepare
from ngmm_formula.compare import (
    ComparisonTable,
    _auc,
    _diagnose,
    _markdown_table,
    _patsy_fixed,
    _SMFit,
    compare,
    statsmodels_spec,
)
from ngmm_formula.datasets import load
from ngmm_formula.results import NGMMResult

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
SLEEP = "Reaction ~ Days + (Days | Subject)"
CONTRA = "use ~ age + I(age ** 2) + urban + livch + (1 | district)"
GROUSE = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"
QUICK = Control(epochs=20, patience=5, progress=False)


@cache
def data(name: str) -> pd.DataFrame:
    return load(name)


@cache
def fit_of(formula: str, name: str, family: str = "gaussian", reml: bool | None = None
           ) -> NGMMResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ngmm(formula, data(name), family, reml=reml)


@cache
def table_of(formula: str, name: str, family: str = "gaussian", reml: bool | None = None
             ) -> ComparisonTable:
    return compare(fit_of(formula, name, family, reml), data=data(name))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ============================================================================== translation
def _spec(formula: str, name: str, family: str = "gaussian", frame: pd.DataFrame | None = None):  # type: ignore[no-untyped-def]
    df = data(name) if frame is None else frame
    p = prepare(formula, df, family)
    return statsmodels_spec(p.design, p.family, df)


def _sleep_with_half() -> pd.DataFrame:
    df = data("sleepstudy").copy()
    df["half"] = np.where(df["Days"] < 5, "early", "late")
    return df


# formula, data, family -> (model, formula, groups, re_formula, vc_formula)
TRANSLATIONS = {
    (SLEEP, "sleepstudy", "gaussian"):
        ("MixedLM", "Reaction ~ Days", "Subject", "1 + Days", {}),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy", "gaussian"):
        ("MixedLM", "Reaction ~ Days", "Subject", "1", {"Subject.1 Days": "0 + Days"}),
    ("Reaction ~ Days + (0 + Days | Subject)", "sleepstudy", "gaussian"):
        ("MixedLM", "Reaction ~ Days", "Subject", "0 + Days", {}),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin", "gaussian"):
        ("MixedLM", "diameter ~ 1", "_one", "0",
         {"plate (Intercept)": "0 + C(plate)", "sample (Intercept)": "0 + C(sample)"}),
    ("strength ~ 1 + (1 | batch/cask)", "Pastes", "gaussian"):
        ("MixedLM", "strength ~ 1", "_one", "0",
         {"cask:batch (Intercept)": "0 + C(_g0)", "batch (Intercept)": "0 + C(batch)"}),
    (CBPP, "cbpp", "binomial"):
        ("BinomialBayesMixedGLM", "_response ~ period", None, None,
         {"herd (Intercept)": "0 + C(herd)"}),
    (CONTRA, "Contraception", "binomial"):
        ("BinomialBayesMixedGLM", "use ~ age + I(age ** 2) + urban + livch", None, None,
         {"district (Intercept)": "0 + C(district)"}),
    (GROUSE, "grouseticks", "poisson"):
        ("PoissonBayesMixedGLM", "TICKS ~ YEAR + HEIGHT", None, None,
         {"BROOD (Intercept)": "0 + C(BROOD)"}),
    ("TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | LOCATION)", "grouseticks", "poisson"):
        ("PoissonBayesMixedGLM", "TICKS ~ YEAR + scale(HEIGHT, ddof=1)", None, None,
         {"BROOD (Intercept)": "0 + C(BROOD)", "LOCATION (Intercept)": "0 + C(LOCATION)"}),
}


@pytest.mark.parametrize("key", list(TRANSLATIONS), ids=lambda k: k[0])
def test_translation(key: tuple[str, str, str]) -> None:
    model, formula, groups, re_formula, vc = TRANSLATIONS[key]
    spec = _spec(*key)
    assert spec.unsupported is None
    assert (spec.model, spec.formula, spec.groups, spec.re_formula, spec.vc_formula) == \
        (model, formula, groups, re_formula, vc)


def test_translation_bernoulli_and_independent_components() -> None:
    assert _spec(CBPP, "cbpp", "binomial").bernoulli
    assert not _spec(CONTRA, "Contraception", "binomial").bernoulli
    # (Days | Subject) in a Bayesian GLMM: one variance component per column, no correlation
    df = data("sleepstudy").assign(y=lambda d: np.round(d["Reaction"] / 10))
    spec = _spec("y ~ Days + (Days | Subject)", "sleepstudy", "poisson", frame=df)
    assert spec.vc_formula == {"Subject (Intercept)": "0 + C(Subject)",
                               "Subject Days": "0 + C(Subject):Days"}
    assert any("without its correlations" in n for n in spec.notes)


@pytest.mark.parametrize("formula, family, name, frame, reason", [
    (CBPP, get_family("binomial", "probit"), "cbpp", None, "logit link only"),
    ("TICKS ~ YEAR + (1 | BROOD)", "negative_binomial", "grouseticks", None,
     "no GLMM for the negative_binomial"),
    # a correlated term with a second grouping factor: MixedLM's variance components are
    # independent
    ("Reaction ~ Days + (Days | Subject) + (1 | half)", "gaussian", "sleepstudy",
     _sleep_with_half(), "cannot be written"),
])
def test_translation_unsupported(formula: str, family: object, name: str,
                                 frame: pd.DataFrame | None, reason: str) -> None:
    df = data(name) if frame is None else frame
    p = prepare(formula, df, family)  # type: ignore[arg-type]
    spec = statsmodels_spec(p.design, p.family, df)
    assert spec.model == "" and spec.unsupported is not None and reason in spec.unsupported


@pytest.mark.parametrize("fixed, expected", [
    ("YEAR + scale(HEIGHT)", "YEAR + scale(HEIGHT, ddof=1)"),
    ("scale(x) + I(scale(x) ** 2)", "scale(x, ddof=1) + I(scale(x, ddof=1) ** 2)"),
    ("rescale(x)", "rescale(x)"),
    ("scale(x, ddof=0)", "scale(x, ddof=0)"),
    ("age + I(age ** 2)", "age + I(age ** 2)"),
])
def test_patsy_scale_uses_formulaics_ddof(fixed: str, expected: str) -> None:
    assert _patsy_fixed(fixed) == expected


# ============================================================================== MixedLM
@pytest.mark.parametrize("reml", [True, False])
def test_sleepstudy_matches_mixedlm(reml: bool) -> None:
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = reml) and statsmodels'
    # MixedLM(...).fit(reml=reml) both maximise the exact (restricted) likelihood: estimates
    # agree to the optimisers' precision (1e-4 relative), log-likelihoods to 1e-3
    tab = table_of(SLEEP, "sleepstudy", reml=reml)
    ours, sm = tab.columns
    assert (ours.engine, sm.engine, sm.model) == ("ngmm_formula", "statsmodels", "MixedLM")
    assert sm.ok and sm.status == "ok" and sm.method == ("REML" if reml else "ML")
    assert list(sm.fixef.index) == ["(Intercept)", "Days"]  # statsmodels' Intercept mapped
    for n in ours.fixef.index:
        assert rel(sm.fixef[n], ours.fixef[n]) < 1e-4
        assert rel(sm.std_errors[n], ours.std_errors[n]) < 1e-3
    for n in ["Subject (Intercept)", "Subject Days", "Residual"]:
        assert rel(sm.random[n], ours.random[n]) < 1e-4
    assert abs(sm.random["Subject corr((Intercept), Days)"]
               - ours.random["Subject corr((Intercept), Days)"]) < 1e-3
    assert abs(sm.loglik - ours.loglik) < 1e-3
    assert sm.npar == ours.npar == 6
    frame = tab.to_frame()
    assert frame.loc[("fit", "AIC"), sm.label] == pytest.approx(ours.aic, abs=1e-2)


@pytest.mark.parametrize("formula, name", [
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
    ("strength ~ 1 + (1 | batch/cask)", "Pastes"),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy"),
])
def test_variance_components_match_mixedlm(formula: str, name: str) -> None:
    # lmer(<formula>, <data>): crossed / nested factors as variance components of one group,
    # and a || term as a within-group component; REML both, 1e-3 relative (statsmodels'
    # optimiser stops a little earlier on these flat criteria)
    ours, sm = table_of(formula, name).columns
    assert sm.ok, sm.status
    for n in ours.random.index:
        assert rel(sm.random[n], ours.random[n]) < 1e-3
    # tight for two optimisers: these designs are balanced, so the GLS intercept is the grand
    # mean whatever the variance components (measured: 1e-13)
    assert rel(sm.fixef["(Intercept)"], ours.fixef["(Intercept)"]) < 1e-6
    assert abs(sm.loglik - ours.loglik) < 1e-3


@pytest.mark.parametrize("formula, name", [
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
    ("strength ~ 1 + (1 | batch/cask)", "Pastes"),
])
def test_heldout_random_effects_of_variance_components(formula: str, name: str) -> None:
    # statsmodels' BLUPs of crossed / nested components are mapped to their levels: the
    # held-out scores agree with this package's (conditional modes at nearly equal estimates)
    df = data(name)
    test = df.sample(frac=0.2, random_state=2)
    train = df.drop(test.index)
    ours, sm = compare(ngmm(formula, train), train, newdata=test).columns
    assert sm.heldout["logLik"] == pytest.approx(ours.heldout["logLik"], abs=1e-2)
    assert sm.heldout["RMSE"] == pytest.approx(ours.heldout["RMSE"], rel=1e-3)


# ============================================================================== Bayesian GLMMs
def test_cbpp_binomial_bernoulli_rows() -> None:
    tab = table_of(CBPP, "cbpp", "binomial")
    ours, sm = tab.columns
    assert sm.ok and sm.model == "BinomialBayesMixedGLM" and sm.method == "VB (fit_vb)"
    assert list(sm.fixef.index) == ["(Intercept)", "period2", "period3", "period4"]
    text = str(tab)
    assert "expanded to 842 Bernoulli rows" in text and "for statsmodels only" in text
    assert "posterior means" in text
    # logLik: this package's objective (same AGQ rule) at statsmodels' posterior means and
    # exp(posterior mean log-SD); tight, it is the same computation
    fit = fit_of(CBPP, "cbpp", "binomial")
    p = prepare(fit.design.formula.linear_formula, data("cbpp"), "binomial", approx="agq",
                nagq=fit.approximation.nagq)
    beta = sm.fixef[list(p.design.fixed_names)].to_numpy()
    ll = objective_at(p, beta, np.array([sm.random["herd (Intercept)"]]))
    assert sm.loglik == pytest.approx(ll, rel=1e-10)
    # the maximum-likelihood fit cannot be beaten at the same approximation; VB with weak
    # priors lands close to it (the VB estimates differ from ML by less than 0.1 here)
    assert sm.loglik <= ours.loglik + 1e-6
    assert ours.loglik - sm.loglik < 0.5
    assert np.max(np.abs(sm.fixef - ours.fixef)) < 0.1
    assert sm.nobs == ours.nobs == 56  # likelihood on the binomial rows, not the 842


def _failure_or_numbers(tab: ComparisonTable, unscaled: str) -> None:
    sm = tab.columns[-1]
    frame = tab.to_frame()
    text = str(tab)
    if sm.ok:  # statsmodels happened to converge: its numbers must be in the table
        assert frame[sm.label].loc["fixed effects"].notna().all()
        return
    assert sm.status.startswith("failed")
    assert frame[sm.label].isna().all()  # no numbers shown as if valid
    assert "statsmodels: failed" in text
    assert any(n.startswith("statsmodels: failed to converge (") or
               n.startswith("statsmodels: failed (") for n in tab.notes)
    assert f"rescale {unscaled}" in text  # the hint names the unscaled column
    block = text.split("Fixed effects")[1].split("Random effects")[0]
    assert "—" in block


def test_contraception_unscaled_square_fails_in_statsmodels() -> None:
    # statsmodels 0.14-0.15: fit_vb() on the unscaled I(age ** 2) (SD 89) either stops with
    # "VB fitting did not converge" or never leaves its all-zero start
    tab = table_of(CONTRA, "Contraception", "binomial")
    _failure_or_numbers(tab, "I(age^2)")
    ours = tab.columns[0]
    assert ours.ok and math.isfinite(ours.loglik)


def test_grouseticks_unscaled_height_fails_in_statsmodels() -> None:
    tab = table_of(GROUSE, "grouseticks", "poisson")
    assert tab.columns[-1].model == "PoissonBayesMixedGLM"
    _failure_or_numbers(tab, "HEIGHT")


@pytest.mark.slow
def test_grouseticks_poisson_converges_without_the_covariate() -> None:
    # glmer(TICKS ~ YEAR + (1 | BROOD), grouseticks, poisson); statsmodels' VB takes ~10 s
    ours, sm = table_of("TICKS ~ YEAR + (1 | BROOD)", "grouseticks", "poisson").columns
    assert sm.ok, sm.status
    assert sm.loglik <= ours.loglik + 1e-6 and ours.loglik - sm.loglik < 0.5
    assert np.max(np.abs(sm.fixef - ours.fixef)) < 0.1


class ConvergenceWarning(UserWarning):
    """Stands for statsmodels' ConvergenceWarning (matched by class name)."""


def _warning(category: type[Warning], message: str) -> warnings.WarningMessage:
    return warnings.WarningMessage(message, category, "x.py", 1)


_OVERFLOW = _warning(RuntimeWarning, "overflow encountered in exp")


# fixed effects, SDs, converged, warnings, MixedLM? -> failed?, text in the message
DIAGNOSES = [
    ([-1.4, -1.0], [0.6], True, [], False, False, None),
    ([-1.4, -1.0], [0.6], True, [_OVERFLOW, _OVERFLOW], False, False,
     "2 RuntimeWarnings (overflow encountered in exp x2)"),
    ([0.0, 0.0, 0.0], [1.0], True, [_OVERFLOW], False, True, "all fixed effects are ~0"),
    ([-5.5e34, 4.9e36], [0.0], True, [], False, True, "implausibly large"),
    ([np.nan, 1.0], [0.5], True, [], False, True, "non-finite"),
    ([-1.4, -1.0], [0.6], True, [_warning(ConvergenceWarning, "VB fitting did not converge")],
     False, True, "failed to converge (ConvergenceWarning: VB fitting did not converge"),
    ([-1.4, -1.0], [0.6], False, [], False, True, "reports no convergence"),
    # MixedLM: a boundary estimate is a singular fit, a successful retry is not a failure
    ([250.0, 10.0], [0.0, 25.0], True,
     [_warning(ConvergenceWarning, "The MLE may be on the boundary of the parameter space."),
      _warning(ConvergenceWarning, "Retrying MixedLM optimization with lbfgs")],
     True, False, "a singular fit"),
]


@pytest.mark.parametrize("fe, sds, converged, caught, mixedlm, failed, text", DIAGNOSES)
def test_failure_detection(fe: list[float], sds: list[float], converged: bool,
                           caught: list[warnings.WarningMessage], mixedlm: bool, failed: bool,
                           text: str | None) -> None:
    res = _SMFit(fixef=pd.Series(fe), se=pd.Series(fe), sds=dict(enumerate(map(float, sds))),  # type: ignore[arg-type]
                 loglik=math.nan, npar=0, converged=converged, coefs=None, X=np.zeros((1, 1)),
                 names=[], fail=[], info=[])
    _diagnose(res, caught, mixedlm=mixedlm)
    assert bool(res.fail) == failed
    if text is not None:
        assert text in " ".join(res.fail + res.info)
    else:
        assert not res.fail and not res.info


def test_unsupported_family_says_so() -> None:
    fit = fit_of(CBPP, "cbpp", "binomial")
    probit = ngmm(CBPP, data("cbpp"), get_family("binomial", "probit"))
    tab = compare(probit, data("cbpp"))
    sm = tab.columns[-1]
    assert not sm.ok and sm.model == "none" and "not available" in sm.status
    assert tab.to_frame()[sm.label].isna().all()
    assert "logit link only" in str(tab)
    assert fit.loglik != probit.loglik


# ============================================================================== NGMM
@cache
def sleep_split() -> tuple[pd.DataFrame, pd.DataFrame]:
    df = data("sleepstudy")
    test = df.sample(frac=0.2, random_state=1)
    return df.drop(test.index), test


@cache
def ngmm_fit() -> NGMMResult:
    train, _ = sleep_split()
    return ngmm("Reaction ~ nn(Days, hidden=(8,)) + (1 | Subject)", train, control=QUICK,
                seed=0)


def test_ngmm_linear_version_is_what_statsmodels_fits() -> None:
    train, test = sleep_split()
    tab = compare(ngmm_fit(), train, newdata=test)
    linear, neural, sm = tab.columns
    assert [c.model for c in tab.columns] == ["LMM", "NGMM", "MixedLM"]
    assert linear.method == neural.method == sm.method == "ML"  # the NGMM is fitted by ML
    assert "Reaction ~ 1 + Days" in sm.call and "fit(reml=False)" in sm.call
    assert neural.nn_terms == ("nn(Days)",) and "Days" not in neural.fixef.index
    for n in linear.fixef.index:
        assert rel(sm.fixef[n], linear.fixef[n]) < 1e-4
    assert abs(sm.loglik - linear.loglik) < 1e-3
    assert neural.npar > linear.npar
    text = str(tab)
    assert "network" in text and "Held-out data" in text
    # held-out: the same definition in every column; MixedLM's BLUPs are this package's
    # conditional modes at the same estimates
    for c in tab.columns:
        assert c.heldout["n"] == len(test) and math.isfinite(c.heldout["logLik"])
    assert sm.heldout["logLik"] == pytest.approx(linear.heldout["logLik"], abs=1e-2)
    assert sm.heldout["RMSE"] == pytest.approx(linear.heldout["RMSE"], rel=1e-4)


def test_heldout_definition_by_hand() -> None:
    train, test = sleep_split()
    fit = fit_of("Reaction ~ Days + (1 | Subject)", "sleepstudy", reml=False)
    # the full-data fit scored on a subset of its own rows, by hand
    (col,) = compare(fit, newdata=test, statsmodels=False).columns
    mu = fit.predict(test)
    y = test["Reaction"].to_numpy()
    ll = np.sum(-0.5 * np.log(2 * np.pi * fit.sigma**2) - 0.5 * (y - mu) ** 2 / fit.sigma**2)
    assert col.heldout["logLik"] == pytest.approx(ll, rel=1e-10)
    assert col.heldout["RMSE"] == pytest.approx(np.sqrt(np.mean((y - mu) ** 2)), rel=1e-12)


def test_heldout_binomial_auc_and_new_groups() -> None:
    df = data("cbpp")
    test = df[df["herd"].isin(["1", "2", "3"]) | (df.index % 5 == 0)]
    train = df.drop(test.index)
    train = train.assign(herd=train["herd"].cat.remove_unused_categories())
    fit = ngmm(CBPP, train, "binomial")
    tab = compare(fit, train, newdata=test)
    ours, sm = tab.columns
    assert sm.ok
    for c in (ours, sm):
        assert 0.0 <= c.heldout["AUC"] <= 1.0 and "RMSE" not in c.heldout
        assert math.isfinite(c.heldout["logLik"])
    assert "belong to new groups and get a zero random effect" in str(tab)


@pytest.mark.parametrize("score, pos, neg, auc", [
    ([0.1, 0.9], [0, 1], [1, 0], 1.0),
    ([0.9, 0.1], [0, 1], [1, 0], 0.0),
    ([0.5, 0.5], [0, 1], [1, 0], 0.5),           # a tie counts one half
    ([0.2, 0.4, 0.6], [1, 0, 1], [0, 1, 0], 0.5),
    # weighted: 3 successes at 0.7 beat 2 failures at 0.3, tie with 1 failure at 0.7; the
    # success at 0.3 ties with 2 failures there
    ([0.3, 0.7], [1, 3], [2, 1], (3 * 2 + 0.5 * 3 * 1 + 0.5 * 1 * 2) / (4 * 3)),
])
def test_auc(score: list[float], pos: list[float], neg: list[float], auc: float) -> None:
    assert _auc(np.array(score), np.array(pos, float), np.array(neg, float)) == \
        pytest.approx(auc)


# ============================================================================== several fits
def test_fits_side_by_side_without_statsmodels() -> None:
    m0 = fit_of("Reaction ~ Days + (1 | Subject)", "sleepstudy", reml=False)
    m1 = fit_of(SLEEP, "sleepstudy", reml=False)
    tab = compare(m0, m1, statsmodels=False)
    assert [c.label for c in tab.columns] == ["m1", "m2"]
    frame = tab.to_frame()
    assert list(frame.columns) == ["m1", "m2"]
    assert frame.loc[("fit", "logLik"), "m2"] == pytest.approx(m1.loglik)
    assert math.isnan(float(frame.loc[("random effects", "Subject Days"), "m1"]))  # type: ignore[arg-type]
    assert frame.xs(("fit", "npar")).to_numpy().tolist() == [4.0, 6.0]
    # without data the table holds the fits and says how to add statsmodels
    tab2 = compare(m0, m1)
    assert len(tab2.columns) == 2 and "need the data" in str(tab2)


def test_same_linear_model_is_fitted_once() -> None:
    train, _ = sleep_split()
    m0 = ngmm("Reaction ~ Days + (1 | Subject)", train, reml=False)
    tab = compare(m0, ngmm_fit(), data=train)
    labels = [c.label for c in tab.columns]
    assert labels == ["m1: ngmm_formula", "m1: statsmodels", "m2: ngmm_formula NGMM"]
    assert "not fitted again" in str(tab)


def test_data_must_match_the_fit() -> None:
    fit = fit_of(SLEEP, "sleepstudy")
    other = data("sleepstudy").assign(Reaction=lambda d: d["Reaction"] + 1.0)
    with pytest.raises(DataError, match="not the data the fit was made on"):
        compare(fit, other)
    with pytest.raises(DataError, match="lacks"):
        compare(fit, data("sleepstudy").iloc[:50])
    with pytest.raises(NGMMError, match="NGMMResult"):
        compare(fit, "sleepstudy")


# ============================================================================== formats
def test_output_formats() -> None:
    tab = table_of(CBPP, "cbpp", "binomial")
    text = str(tab)
    assert text.startswith("Model comparison: " + CBPP)
    assert "Fixed effects" in text and "Random effects (SD)" in text and "Models:" in text
    md = tab.to_markdown()
    assert "| period2" in md and "**Fixed effects**" in md and "1. statsmodels'" in md
    tex = tab.to_latex()
    assert tex.startswith(r"\begin{tabular}{lrr}") and r"ngmm\_formula" in tex
    assert r"\end{tabular}" in tex


def test_markdown_fallback_formatter() -> None:
    frame = pd.DataFrame([["1.5", ""], ["(0.2)", "x"]], index=["a", "bb"], columns=["c1", "c2"])
    assert _markdown_table(frame).splitlines() == [
        "|     |    c1 |  c2 |",
        "|:----|------:|----:|",
        "| a   |   1.5 |     |",
        "| bb  | (0.2) |   x |",
    ]
