"""Confidence intervals and prediction standard errors (:mod:`ngmm_formula.inference`).

Reference values: ``tests/reference/lme4_refs.json`` (``wald_ci``: lme4's
``confint(fit, method = "Wald", oldNames = FALSE)``; ``profile_ci``: lmer's
``confint(fit, method = "profile", oldNames = FALSE)``; the R call of each fit is in the JSON's
``call`` and in every assertion message).

Tolerances (chosen, not fitted to the results)
----------------------------------------------
* Wald limits: 1e-3 absolute. They are :math:`\\hat\\beta \\pm 1.96\\,\\mathrm{se}`; the
  estimates agree with lme4 to about 1e-6 and the standard errors to about 1e-5 relative on
  these fits, so 1e-3 is a loose check of the layout and the arithmetic. The grouseticks fit
  (raw ``HEIGHT``) is compared with its glmmTMB twin instead: lme4's ``vcov`` for ``glmer``
  comes from a finite-difference Hessian that is 0.5 % off there (limits 2.7e-3 apart),
  glmmTMB's from the exact one (see ``test_fit_reference.py``).
* Profile limits: 1e-3 relative (and 1e-3 absolute, for limits near 0), well inside the
  1e-2 asked for. lme4 inverts an interpolating spline through about ten profile points per
  side, so its limits solve :math:`\\zeta = \\pm z` only to about 1e-4 in :math:`\\zeta`
  (Dyestuff: :math:`\\zeta` at lme4's lower limit of the SD is -1.95984, not -1.95996), i.e.
  up to 2e-4 relative in the limits (measured maximum: 1.7e-4, Dyestuff's SD); our root
  finder solves the equation on the exact profile to 1e-7 standard errors.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from ngmm_formula.api import ngmm
from ngmm_formula.datasets import load
from ngmm_formula.errors import NGMMError
from ngmm_formula.inference import (
    _BootJob,
    _norm_inter,
    _percent_labels,
    _with_response,
    confint,
    parameter_names,
    parameters,
    predict_se,
    profile,
)
from ngmm_formula.results import NGMMResult
from tests.references import REFS

WALD_ATOL = 1e-3
PROFILE_RTOL, PROFILE_ATOL = 1e-3, 1e-3
Z975 = float(norm.ppf(0.975))

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
SLEEP = "Reaction ~ Days + (Days | Subject)"
CONTRA_URBAN = "use ~ age + I(age ** 2) + urban + livch + (1 + urban | district)"
GROUSE = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"

# id -> (data set, formula, family, ngmm keyword arguments); the R call is REFS[id]["call"]
MODELS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, gctrl)
    "cbpp_logit_laplace": ("cbpp", CBPP, "binomial", {"approx": "laplace"}),
    # glmer(..., nAGQ = 25)
    "cbpp_logit_agq25": ("cbpp", CBPP, "binomial", {"approx": "agq", "nagq": 25}),
    # glmer(use ~ age + I(age^2) + urban + livch + (1 + urban | district), Contraception,
    #       binomial, gctrl)
    "contra_urban_laplace": ("Contraception", CONTRA_URBAN, "binomial", {"approx": "laplace"}),
    # glmmTMB(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson, tctrl)
    "grouse_brood_laplace_tmb": ("grouseticks", GROUSE, "poisson", {"approx": "laplace"}),
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE, lctrl)
    "sleep_reml": ("sleepstudy", SLEEP, "gaussian", {"reml": True}),
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE, lctrl)
    "sleep_ml": ("sleepstudy", SLEEP, "gaussian", {"reml": False}),
    # lmer(Reaction ~ Days + (Days || Subject), sleepstudy, REML = FALSE, lctrl)
    "sleep_uncorr_ml": ("sleepstudy", "Reaction ~ Days + (Days || Subject)", "gaussian",
                        {"reml": False}),
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, REML = TRUE, lctrl)
    "penicillin_reml": ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "gaussian",
                        {"reml": True}),
    # lmer(strength ~ 1 + (1 | batch/cask), Pastes, REML = TRUE, lctrl)
    "pastes_reml": ("Pastes", "strength ~ 1 + (1 | batch/cask)", "gaussian", {"reml": True}),
    # lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = TRUE, lctrl)
    "dyestuff_reml": ("Dyestuff", "Yield ~ 1 + (1 | Batch)", "gaussian", {"reml": True}),
    # lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = FALSE, lctrl)
    "dyestuff_ml": ("Dyestuff", "Yield ~ 1 + (1 | Batch)", "gaussian", {"reml": False}),
}

_FITS: dict[str, NGMMResult] = {}


def fitted(ref: str) -> NGMMResult:
    """Fit once per session (several tests read the same fit)."""
    if ref not in _FITS:
        data, formula, family, kw = MODELS[ref]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _FITS[ref] = ngmm(formula, load(data), family, **kw)
    return _FITS[ref]


def ref_ci(records: list[dict[str, Any]]) -> pd.DataFrame:
    d = pd.DataFrame(records).set_index("name")
    return d[["lower", "upper"]].astype(float)  # null (lme4's NA) -> NaN


# ------------------------------------------------------------------------------------ Wald

WALD_LME4 = ["cbpp_logit_laplace", "cbpp_logit_agq25", "contra_urban_laplace", "sleep_reml",
             "sleep_ml", "sleep_uncorr_ml", "penicillin_reml", "pastes_reml", "dyestuff_reml"]


@pytest.mark.parametrize("ref", WALD_LME4)
def test_wald_matches_lme4(ref: str) -> None:
    fit = fitted(ref)
    expected = ref_ci(REFS[ref]["wald_ci"])
    ci = confint(fit, "wald")
    # R: confint(fit, method = "Wald", oldNames = FALSE): same rows in the same order,
    # the variance parameters NA
    assert list(ci.index) == list(expected.index), REFS[ref]["call"]
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    np.testing.assert_array_equal(ci.isna().to_numpy(), expected.isna().to_numpy())
    np.testing.assert_allclose(ci.to_numpy(), expected.to_numpy(), atol=WALD_ATOL,
                               equal_nan=True, err_msg=REFS[ref]["call"])


def test_wald_grouseticks_matches_glmmtmb() -> None:
    fit = fitted("grouse_brood_laplace_tmb")
    ref = REFS["grouse_brood_laplace_tmb"]
    expected = ref_ci(ref["wald_ci"]).loc[list(fit.fixef.index)]
    ci = confint(fit, "wald", parm="beta_")
    # R: confint(glmmTMB(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson),
    #            method = "wald"), fixed-effect rows
    np.testing.assert_allclose(ci.to_numpy(), expected.to_numpy(), atol=WALD_ATOL,
                               err_msg=ref["call"])


def test_wald_level_and_parm_selection() -> None:
    fit = fitted("sleep_reml")
    ci90 = confint(fit, level=0.90, parm=["Days", 0])
    assert list(ci90.columns) == ["5 %", "95 %"]
    assert list(ci90.index) == ["sd_(Intercept)|Subject", "Days"]  # lme4's order, not parm's
    se = float(np.sqrt(fit.vcov.to_numpy()[1, 1]))
    z = norm.ppf(0.95)
    np.testing.assert_allclose(ci90.loc["Days"], fit.fixef["Days"] + np.array([-z, z]) * se)
    assert list(confint(fit, parm="theta_").index) == [
        "sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject", "sigma"]
    # lme4's default oldNames = TRUE
    assert parameter_names(fit, old_names=True) == [
        ".sig01", ".sig02", ".sig03", ".sigma", "(Intercept)", "Days"]
    with pytest.raises(NGMMError, match="not a parameter"):
        confint(fit, parm="days")
    with pytest.raises(NGMMError, match="method"):
        confint(fit, "bayes")
    with pytest.raises(NGMMError, match="data="):
        confint(fit, "boot")


@pytest.mark.parametrize(("level", "labels"), [
    (0.95, ["2.5 %", "97.5 %"]), (0.9, ["5 %", "95 %"]), (0.99, ["0.5 %", "99.5 %"]),
    (0.5, ["25 %", "75 %"]), (0.955, ["2.25 %", "97.75 %"])])
def test_percent_labels_as_r(level: float, labels: list[str]) -> None:
    # R: stats:::format.perc(c(a, 1 - a), 3) with a = (1 - level) / 2
    assert _percent_labels(level) == labels


def test_parameters_on_lme4_scale() -> None:
    fit = fitted("sleep_reml")
    p = parameters(fit)
    vc = fit.varcorr
    assert p["sd_(Intercept)|Subject"] == pytest.approx(vc["sdcor"].iloc[0], rel=1e-12)
    assert p["sd_Days|Subject"] == pytest.approx(vc["sdcor"].iloc[1], rel=1e-12)
    assert p["cor_Days.(Intercept)|Subject"] == pytest.approx(vc["sdcor"].iloc[2], rel=1e-12)
    assert p["sigma"] == fit.sigma
    assert p["Days"] == fit.fixef["Days"]


# --------------------------------------------------------------------------------- profile

# about 1-3 s each; the ML twins of REML fits (identical intervals in lme4 1.1-31, checked
# below on Dyestuff) and the uncorrelated model run with -m slow
PROFILE_FITS = [
    "sleep_reml", "penicillin_reml", "pastes_reml", "dyestuff_ml",
    pytest.param("sleep_ml", marks=pytest.mark.slow),
    pytest.param("sleep_uncorr_ml", marks=pytest.mark.slow),
    pytest.param("dyestuff_reml", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("ref", PROFILE_FITS)
def test_profile_matches_lme4(ref: str) -> None:
    fit = fitted(ref)
    expected = ref_ci(REFS[ref]["profile_ci"])
    ci = confint(fit, "profile")
    # R: confint(fit, method = "profile", oldNames = FALSE) (lme4 1.1-31: the ML deviance's
    # profile for REML fits too)
    assert list(ci.index) == list(expected.index), REFS[ref]["call"]
    np.testing.assert_allclose(ci.to_numpy(), expected.to_numpy(), rtol=PROFILE_RTOL,
                               atol=PROFILE_ATOL, err_msg=REFS[ref]["call"])


def test_profile_solves_the_signed_root_equation() -> None:
    pr = profile(fitted("pastes_reml"), parm=["sd_(Intercept)|batch", "sigma", 3])
    assert list(pr.index) == ["sd_(Intercept)|batch", "sigma", "(Intercept)"]
    # every limit is a root of zeta = -+1.96 ...
    inner = pr.drop(index="sd_(Intercept)|batch")
    np.testing.assert_allclose(inner["zeta_lower"], -Z975, atol=1e-6)
    np.testing.assert_allclose(inner["zeta_upper"], Z975, atol=1e-6)
    # ... except the batch SD's lower limit: its profile stays above -1.96 down to SD = 0,
    # where lme4 reports the bound 0
    row = pr.loc["sd_(Intercept)|batch"]
    assert row["lower"] == 0.0 and -Z975 < row["zeta_lower"] < 0
    # the estimates are the ML refit's (lme4's devfun2 calls refitML)
    ml = REFS["pastes_reml"]
    assert pr.loc["(Intercept)", "estimate"] == pytest.approx(ml["fixef"]["(Intercept)"],
                                                               rel=1e-6)


def test_profile_of_reml_fit_is_the_ml_profile() -> None:
    a = profile(fitted("dyestuff_reml"), parm="sd_(Intercept)|Batch")
    b = profile(fitted("dyestuff_ml"), parm="sd_(Intercept)|Batch")
    # lme4 1.1-31: dyestuff_reml and dyestuff_ml have identical profile intervals
    np.testing.assert_allclose(a[["lower", "upper"]], b[["lower", "upper"]], rtol=1e-6)
    assert a.attrs["loglik_ml"] == pytest.approx(fitted("dyestuff_ml").loglik, abs=1e-6)


def test_profile_needs_a_linear_predictor_without_networks() -> None:
    from ngmm_formula import Control
    from ngmm_formula.datasets import simulate_grouped

    df = simulate_grouped(n_groups=12, n_per_group=5, family="gaussian", effect="sine", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm("y ~ nn(x1, hidden=(4,)) + (1 | g)", df,
                   control=Control(epochs=1, progress=False, validation=0.0))
    with pytest.raises(NGMMError, match="nn\\(\\) terms"):
        confint(fit, "profile")
    assert confint(fit).notna().sum().sum() == 2 * len(fit.fixef)  # Wald still works


# ------------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_reproducible_and_covers_the_estimate() -> None:
    fit = fitted("dyestuff_reml")
    data = load("Dyestuff")
    ci = confint(fit, "boot", data=data, nsim=20, seed=11, workers=2)
    serial = confint(fit, "boot", data=data, nsim=20, seed=11, workers=1)
    # bootMer-style percentile intervals: the same numbers in parallel and serially. Not bit
    # for bit: two fits of the same data in one process can differ by up to ~1e-7 relative
    # (sleepstudy's correlation, a flat direction), so 1e-6 relative
    pd.testing.assert_frame_equal(ci, serial, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(ci.attrs["replicates"], serial.attrs["replicates"],
                                  check_exact=False, rtol=1e-6)
    assert ci.attrs["replicates"].shape == (20, 3) and ci.attrs["n_failed"] == 0
    est = parameters(fit)
    assert list(ci.index) == list(est.index)
    assert (ci["2.5 %"] < est).all() and (est < ci["97.5 %"]).all()
    other = confint(fit, "boot", data=data, nsim=5, seed=12, workers=1, parm="beta_")
    assert list(other.index) == ["(Intercept)"]
    assert not np.allclose(other.to_numpy(), ci.loc[["(Intercept)"]].to_numpy())


def test_bootstrap_writes_binomial_responses() -> None:
    cbpp = load("cbpp")
    fit = fitted("cbpp_logit_laplace")
    from ngmm_formula.inference import _boot_job

    job = _boot_job(fit, cbpp, False, {})
    assert job.kind == "cbind" and job.response == ("incidence",)
    sim = fit.simulate(1, seed=3, re_form="~0")
    new = _with_response(job, sim.index, sim["sim_1"].to_numpy())
    np.testing.assert_array_equal(new["incidence"], np.rint(sim["sim_1"] * cbpp["size"]))
    assert (new["size"] - new["incidence"] >= 0).all()
    # a two-level factor response gets its levels back (Contraception's use: N/Y)
    contra = load("Contraception")
    cfit = fitted("contra_urban_laplace")
    cjob = _boot_job(cfit, contra, False, {})
    assert cjob.kind == "levels" and cjob.levels == ("N", "Y")
    y = np.zeros(len(contra))
    y[:5] = 1
    cnew = _with_response(cjob, contra.index, y)
    assert list(cnew["use"].iloc[:6]) == ["Y"] * 5 + ["N"]
    assert isinstance(cjob, _BootJob)


def test_bootstrap_glmm_refits() -> None:
    fit = fitted("cbpp_logit_laplace")
    ci = confint(fit, "boot", data=load("cbpp"), nsim=4, seed=2, workers=1)
    assert ci.attrs["n_failed"] == 0 and ci.attrs["errors"] == []
    assert np.isfinite(ci.to_numpy()).all()


def _half(x):  # type: ignore[no-untyped-def]
    return x / 2


def test_bootstrap_refits_with_the_fits_context() -> None:
    # a formula that calls a context= function: the refits need the same context (they used
    # to fail, every one, with "unknown function 'half()'"); the intervals equal those of the
    # same model written with a precomputed column (same parameters, same simulated responses)
    d = load("sleepstudy")
    fit = ngmm("Reaction ~ half(Days) + (1 | Subject)", d, context={"half": _half})
    ci = confint(fit, "boot", data=d, nsim=4, seed=3, workers=1)
    assert ci.attrs["n_failed"] == 0
    plain = ngmm("Reaction ~ hd + (1 | Subject)", d.assign(hd=d["Days"] / 2))
    ref = confint(plain, "boot", data=d.assign(hd=d["Days"] / 2), nsim=4, seed=3, workers=1)
    # 1e-6 relative: Days / 2 is exact in floating point, so both fits see the same numbers;
    # what separates them is the refits' optimiser paths (two fits of the same data can differ
    # by ~1e-7 relative, see test_bootstrap_is_reproducible_and_covers_the_estimate)
    np.testing.assert_allclose(ci.to_numpy(), ref.to_numpy(), rtol=1e-6)


def test_bootstrap_checks_the_data() -> None:
    fit = fitted("dyestuff_reml")
    other = load("Dyestuff").assign(Yield=lambda d: d["Yield"] + 1.0)
    with pytest.raises(NGMMError, match="not the data frame the model was fitted to"):
        confint(fit, "boot", data=other, nsim=2, workers=1)
    with pytest.raises(NGMMError, match="not the data frame"):
        confint(fit, "boot", data=load("Dyestuff").iloc[:10], nsim=2, workers=1)
    # a refit option ngmm() rejects: every refit fails, and the error says why
    with pytest.raises(NGMMError, match="every bootstrap refit failed; the first error"):
        confint(fit, "boot", data=load("Dyestuff"), nsim=2, workers=1, nagq=3)


def test_norm_inter_as_boot() -> None:
    t = np.arange(1.0, 100.0)  # R = 99
    # boot:::norm.inter(t, 0.025): rk = 2.5, between the 2nd and 3rd order statistics on the
    # normal-quantile scale
    z, z2, z3 = norm.ppf(0.025), norm.ppf(2 / 100), norm.ppf(3 / 100)
    assert _norm_inter(t, 0.025) == pytest.approx(2 + (z - z2) / (z3 - z2))
    assert _norm_inter(np.arange(1.0, 40.0), 0.025) == 1.0  # rk = 1: the minimum
    assert _norm_inter(np.arange(1.0, 21.0), 0.975) == 20.0  # rk > R: the maximum


# ---------------------------------------------------------------------- prediction errors


def test_predict_se_fixed_plus_conditional_variance() -> None:
    fit = fitted("sleep_reml")
    data = load("sleepstudy")
    se = predict_se(fit)
    se0 = predict_se(fit, re_form="~0")
    assert se.shape == (fit.nobs,) and (se > 0).all() and (se0 > 0).all()
    assert (se0 < se).all()
    # row 0: x' V x + z' postVar z with x = z = (1, Days)
    x = fit.design.X[0]
    V = fit.vcov.to_numpy()
    P = fit.ranef["Subject"].attrs["postVar"][:, :, fit.design.re_terms[0].group_index[0]]
    assert se[0] == pytest.approx(np.sqrt(x @ V @ x + x @ P @ x), rel=1e-12)
    # new data: a known subject as in training, a new one gets the fixed part only
    nd = data.iloc[[0, 1]].copy()
    nd["Subject"] = nd["Subject"].astype(str)
    nd.loc[nd.index[1], "Subject"] = "999"
    se_new = predict_se(fit, nd, allow_new_levels=True)
    assert se_new[0] == pytest.approx(se[0], rel=1e-12)
    assert se_new[1] == pytest.approx(se0[1], rel=1e-12)
    assert se_new[1] < se[1]


def test_predict_se_adds_every_term() -> None:
    # crossed factors: both conditional variances are added
    fit = fitted("penicillin_reml")
    se = predict_se(fit)
    v_beta = float(fit.vcov.to_numpy()[0, 0])
    extra = 0.0
    for t in fit.design.re_terms:
        extra += fit.ranef[t.group].attrs["postVar"][0, 0, t.group_index[0]]
    assert se[0] == pytest.approx(np.sqrt(v_beta + extra), rel=1e-12)
    # (Days || Subject): two terms of one factor share its postVar
    un = fitted("sleep_uncorr_ml")
    P = un.ranef["Subject"].attrs["postVar"][:, :, un.design.re_terms[0].group_index[5]]
    x = un.design.X[5]
    assert predict_se(un)[5] == pytest.approx(
        np.sqrt(x @ un.vcov.to_numpy() @ x + P[0, 0] + x[1] ** 2 * P[1, 1]), rel=1e-12)
    with pytest.raises(NGMMError, match="re_form"):
        predict_se(un, re_form="~(1|Subject)")


def test_predict_se_glmm_link_scale() -> None:
    fit = fitted("cbpp_logit_laplace")
    se = predict_se(fit)
    assert np.isfinite(se).all() and (se > predict_se(fit, re_form="~0")).all()
