"""Whole fits against R: every reference fit of ``tests/reference/lme4_refs.json``.

Each row of :data:`CASES` fits one model with :func:`ngmm_formula.api.ngmm` and names the R fit
it is compared with (the R call is in the comment above the row and in every assertion
message; ``tests/reference/README.md`` explains the JSON fields).

Which R fit
-----------
* lme4 where lme4 computes the same quantity as this package.
* glmmTMB for non-canonical links (probit, cloglog, Gamma log/inverse, Gaussian log) and for
  the negative binomial: lme4's Laplace puts the *expected* (Fisher) curvature in the
  log-determinant, glmmTMB and this package the *observed* one, so the likelihoods differ by
  0.04-0.14 in log L (README, "Objective at fixed parameters").
* Standard errors of GLMMs: lme4's ``vcov`` for ``glmer`` comes from a finite-difference
  Hessian of the deviance, about 1 % away from the exact one; glmmTMB's come from the exact
  (automatic-differentiation) Hessian. Standard errors are therefore compared with the glmmTMB
  twin where one exists (``se_ref``) and otherwise with lme4 at the looser 2e-2. ``lmer``'s
  standard errors are exact (:math:`\\sigma^2 (X^\\top V^{-1} X)^{-1}`), compared at 1e-2.
* nAGQ > 1: lme4's ``logLik`` omits the saturated-model constant; it is added back
  (``logLik - saturated_m2ll / 2``, the JSON's ``saturated_m2ll``) and the comparison is made
  on the full-constant convention this package reports.
* lme4's Gamma GLMM (``gamma_log_lme4``) is not a maximum-likelihood Gamma fit (README,
  "Gamma") and is not used.

Tolerances (chosen, not fitted to the results)
----------------------------------------------
* fitted log-likelihood: 1e-3 absolute. Both programs maximise the same function; a 1e-3
  change in log L is far below anything a likelihood-ratio test or an AIC comparison can see,
  and far above the optimisers' stopping noise (typically < 1e-6 here).
* fixed effects: 1e-3 relative (``atol`` 1e-4 for coefficients near 0). Near the optimum
  parameter errors scale like the square root of the log-likelihood error over the curvature;
  the R optimisers stop with gradients up to 1e-1 (glmmTMB NB2) on badly scaled covariates
  (raw ``HEIGHT``, ``I(age^2)``).
* random-effect standard deviations (``sdcor`` of the variance rows of ``varcorr``): 5e-3
  relative; correlations 5e-3 absolute. The likelihood is flat in the variance parameters,
  so the optimisers' stopping rules move them more than the fixed effects.
* sigma (residual SD, Gamma CV, NB size): 5e-3 relative, as a variance parameter.
* standard errors: 1e-2 relative (ours come from central differences of the exact gradient
  with relative step 1e-4, the reference's from an exact Hessian at a slightly different
  optimum), 2e-2 against lme4's finite-difference glmer Hessian (see above).

Timing: every fit of the default run takes about 1 s or less on the 2-core test machine
(about 20 s for the file); fits longer than about 5 s are marked ``slow``. Only VerbAgg
(7584 binary responses, a joint 340-dimensional crossed block: 316 persons + 24 items) is:
3.6 s now, 45-70 s before the engine's performance work. Every family and every
approximation (Laplace per group and joint, AGQ, exact ML/REML per group and joint) has
unmarked rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ngmm_formula.api import ngmm
from ngmm_formula.errors import NGMMWarning
from ngmm_formula.families import Family, get_family
from ngmm_formula.results import NGMMResult
from tests.references import REFS, dataset

LOGLIK_ATOL = 1e-3
FIXEF_RTOL, FIXEF_ATOL = 1e-3, 1e-4
SD_RTOL, CORR_ATOL = 5e-3, 5e-3
SIGMA_RTOL = 5e-3
SE_RTOL_EXACT = 1e-2  # glmmTMB's exact Hessian, lmer's closed form
SE_RTOL_LME4_GLMER = 2e-2  # lme4's finite-difference Hessian for glmer


@dataclass(frozen=True)
class Case:
    """One fit and the R fits it is compared with."""

    ref: str  # id of the R fit for logLik, fixef, varcorr and sigma
    data: str
    formula: str
    family: Family
    kwargs: dict[str, Any] = field(default_factory=dict)
    se_ref: str | None = None  # id of the R fit for standard errors (default: ref)

    @property
    def se_rtol(self) -> float:
        r = REFS[self.se_ref or self.ref]
        glmer = r["engine"] == "lme4" and r["family"] != "gaussian"
        return SE_RTOL_LME4_GLMER if glmer else SE_RTOL_EXACT


CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
GROUSE = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"
CONTRA = "use ~ age + I(age ** 2) + urban + livch + (1 | district)"
SLEEP = "Reaction ~ Days + (Days | Subject)"
LOGIT, PROBIT, CLOGLOG = (get_family("binomial", k) for k in ("logit", "probit", "cloglog"))
POISSON, GAUSS = get_family("poisson"), get_family("gaussian")

slow = pytest.mark.slow
CASES = [
    # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, gctrl)
    # SEs: glmmTMB(same, binomial(link = "logit"))
    pytest.param(Case("cbpp_logit_laplace", "cbpp", CBPP, LOGIT, {"approx": "laplace"},
                      se_ref="cbpp_logit_laplace_tmb"), id="cbpp_logit_laplace"),
    # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial,
    #       nAGQ = 25, gctrl)
    pytest.param(Case("cbpp_logit_agq25", "cbpp", CBPP, LOGIT, {"approx": "agq", "nagq": 25}),
                 id="cbpp_logit_agq25"),
    # glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp,
    #         binomial(link = "probit"), tctrl)
    pytest.param(Case("cbpp_probit_laplace_tmb", "cbpp", CBPP, PROBIT, {"approx": "laplace"}),
                 id="cbpp_probit_laplace_tmb"),
    # glmmTMB(..., binomial(link = "cloglog"), tctrl)
    pytest.param(Case("cbpp_cloglog_laplace_tmb", "cbpp", CBPP, CLOGLOG,
                      {"approx": "laplace"}), id="cbpp_cloglog_laplace_tmb"),
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE, lctrl)
    pytest.param(Case("sleep_reml", "sleepstudy", SLEEP, GAUSS, {"reml": True}),
                 id="sleep_reml"),
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE, lctrl)
    pytest.param(Case("sleep_ml", "sleepstudy", SLEEP, GAUSS, {"reml": False}),
                 id="sleep_ml"),
    # lmer(Reaction ~ Days + (Days || Subject), sleepstudy, REML = FALSE, lctrl)
    pytest.param(Case("sleep_uncorr_ml", "sleepstudy", "Reaction ~ Days + (Days || Subject)",
                      GAUSS, {"reml": False}), id="sleep_uncorr_ml"),
    # glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson, gctrl)
    # SEs: glmmTMB(same, poisson)
    pytest.param(Case("grouse_brood_laplace", "grouseticks", GROUSE, POISSON,
                      {"approx": "laplace"}, se_ref="grouse_brood_laplace_tmb"),
                 id="grouse_brood_laplace"),
    # glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson, nAGQ = 10, gctrl)
    pytest.param(Case("grouse_brood_agq10", "grouseticks", GROUSE, POISSON,
                      {"approx": "agq", "nagq": 10}), id="grouse_brood_agq10"),
    # glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION), grouseticks, poisson, gctrl)
    pytest.param(Case("grouse_brood_location_laplace", "grouseticks",
                      "TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", POISSON,
                      {"approx": "laplace"}), id="grouse_brood_location_laplace"),
    # glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial,
    #       gctrl); SEs: glmmTMB(same)
    pytest.param(Case("verbagg_laplace", "VerbAgg",
                      "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", LOGIT,
                      {"approx": "laplace"}, se_ref="verbagg_laplace_tmb"),
                 id="verbagg_laplace", marks=slow),
    # glmer(use ~ age + I(age^2) + urban + livch + (1 | district), Contraception, binomial,
    #       gctrl); SEs: glmmTMB(same)
    pytest.param(Case("contra_int_laplace", "Contraception", CONTRA, LOGIT,
                      {"approx": "laplace"}, se_ref="contra_int_laplace_tmb"),
                 id="contra_int_laplace"),
    # glmer(use ~ age + I(age^2) + urban + livch + (1 | district), Contraception, binomial,
    #       nAGQ = 20, gctrl)
    pytest.param(Case("contra_int_agq20", "Contraception", CONTRA, LOGIT,
                      {"approx": "agq", "nagq": 20}), id="contra_int_agq20"),
    # glmer(use ~ age + I(age^2) + urban + livch + (1 + urban | district), Contraception,
    #       binomial, gctrl); SEs: glmmTMB(same)
    pytest.param(Case("contra_urban_laplace", "Contraception",
                      "use ~ age + I(age ** 2) + urban + livch + (1 + urban | district)", LOGIT,
                      {"approx": "laplace"}, se_ref="contra_urban_laplace_tmb"),
                 id="contra_urban_laplace"),
    # glmmTMB(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, nbinom2(link = "log"), tctrl)
    pytest.param(Case("grouse_nb2_tmb", "grouseticks", GROUSE, get_family("negative_binomial"),
                      {"approx": "laplace"}), id="grouse_nb2_tmb"),
    # glmmTMB(y ~ x + (1 | g), gamma_sim, Gamma(link = "log"), tctrl)
    pytest.param(Case("gamma_log_tmb", "gamma_sim", "y ~ x + (1 | g)", get_family("gamma", "log"),
                      {"approx": "laplace"}), id="gamma_log_tmb"),
    # glmmTMB(y ~ x + (1 | g), gamma_sim, Gamma(link = "inverse"), tctrl)
    pytest.param(Case("gamma_inverse_tmb", "gamma_sim", "y ~ x + (1 | g)",
                      get_family("gamma", "inverse"), {"approx": "laplace"}),
                 id="gamma_inverse_tmb"),
    # glmmTMB(Reaction ~ Days + (1 | Subject), sleepstudy, gaussian(link = "log"), tctrl)
    pytest.param(Case("sleep_gausslog_tmb", "sleepstudy", "Reaction ~ Days + (1 | Subject)",
                      get_family("gaussian", "log"), {"approx": "laplace"}),
                 id="sleep_gausslog_tmb"),
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, REML = TRUE, lctrl)
    pytest.param(Case("penicillin_reml", "Penicillin",
                      "diameter ~ 1 + (1 | plate) + (1 | sample)", GAUSS, {"reml": True}),
                 id="penicillin_reml"),
    # lmer(strength ~ 1 + (1 | batch/cask), Pastes, REML = TRUE, lctrl)
    pytest.param(Case("pastes_reml", "Pastes", "strength ~ 1 + (1 | batch/cask)", GAUSS,
                      {"reml": True}), id="pastes_reml"),
    # lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = TRUE, lctrl)
    pytest.param(Case("dyestuff_reml", "Dyestuff", "Yield ~ 1 + (1 | Batch)", GAUSS,
                      {"reml": True}), id="dyestuff_reml"),
    # lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = FALSE, lctrl)
    pytest.param(Case("dyestuff_ml", "Dyestuff", "Yield ~ 1 + (1 | Batch)", GAUSS,
                      {"reml": False}), id="dyestuff_ml"),
]

_FITS: dict[str, tuple[NGMMResult, list[warnings.WarningMessage]]] = {}


def fitted(case: Case) -> tuple[NGMMResult, list[warnings.WarningMessage]]:
    """Fit once per session (several tests read the same fit)."""
    if case.ref not in _FITS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = ngmm(case.formula, dataset(case.data), case.family, **case.kwargs)
        _FITS[case.ref] = (fit, [w for w in caught if issubclass(w.category, NGMMWarning)])
    return _FITS[case.ref]


def full_loglik(ref: dict[str, Any]) -> float:
    """The reference log-likelihood with all normalising constants."""
    if ref["engine"] == "lme4" and (ref["nAGQ"] or 1) > 1:
        # lme4's nAGQ > 1 logLik omits the saturated-model constant -2 sum log p(y | mu = y)
        full = ref["logLik"] - ref["saturated_m2ll"] / 2
        assert full == pytest.approx(ref["logLik_full"], abs=1e-9)
        return full
    return ref["logLik"]


@pytest.mark.parametrize("case", CASES)
def test_converged_without_warnings(case: Case) -> None:
    fit, caught = fitted(case)
    assert fit.diagnostics.converged, REFS[case.ref]["call"]
    assert [str(w.message) for w in caught] == [], REFS[case.ref]["call"]


@pytest.mark.parametrize("case", CASES)
def test_loglik(case: Case) -> None:
    fit, _ = fitted(case)
    ref = REFS[case.ref]
    assert fit.nobs == ref["nobs"]
    assert fit.npar == ref["logLik_df"]
    # R: logLik(fit) (full constants, see full_loglik)
    assert fit.loglik == pytest.approx(full_loglik(ref), abs=LOGLIK_ATOL), ref["call"]


@pytest.mark.parametrize("case", CASES)
def test_fixef(case: Case) -> None:
    fit, _ = fitted(case)
    ref = REFS[case.ref]
    expected = pd.Series(ref["fixef"])
    assert list(fit.fixef.index) == list(expected.index)
    # R: fixef(fit) (glmmTMB: fixef(fit)$cond)
    np.testing.assert_allclose(fit.fixef.to_numpy(), expected.to_numpy(), rtol=FIXEF_RTOL,
                               atol=FIXEF_ATOL, err_msg=ref["call"])


def _re_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    d = pd.DataFrame(records)
    d = d.rename(columns={"grp": "group"})
    return d[d["group"] != "Residual"].reset_index(drop=True)


@pytest.mark.parametrize("case", CASES)
def test_varcorr(case: Case) -> None:
    fit, _ = fitted(case)
    ref = REFS[case.ref]
    ours = fit.varcorr[fit.varcorr["group"] != "Residual"].reset_index(drop=True)
    theirs = _re_rows(ref["varcorr"])
    # rows in as.data.frame(VarCorr(fit)) order: (group, var1, var2) exactly
    key = ["group", "var1", "var2"]
    assert ours[key].fillna("NA").values.tolist() == theirs[key].fillna("NA").values.tolist()
    is_sd = theirs["var2"].isna().to_numpy()
    # R: as.data.frame(VarCorr(fit))$sdcor, standard deviations
    np.testing.assert_allclose(ours["sdcor"].to_numpy()[is_sd], theirs["sdcor"].to_numpy()[is_sd],
                               rtol=SD_RTOL, err_msg=ref["call"])
    # ... and correlations
    np.testing.assert_allclose(ours["sdcor"].to_numpy()[~is_sd],
                               theirs["sdcor"].to_numpy()[~is_sd], atol=CORR_ATOL,
                               err_msg=ref["call"])


@pytest.mark.parametrize("case", CASES)
def test_sigma(case: Case) -> None:
    fit, _ = fitted(case)
    ref = REFS[case.ref]
    # R: sigma(fit): residual SD (gaussian), CV (glmmTMB Gamma), size (nbinom2), 1 otherwise
    assert fit.sigma == pytest.approx(ref["sigma"], rel=SIGMA_RTOL), ref["call"]


@pytest.mark.parametrize("case", CASES)
def test_standard_errors(case: Case) -> None:
    fit, _ = fitted(case)
    ref = REFS[case.se_ref or case.ref]
    with np.errstate(invalid="ignore"):  # a failed fit may have negative variances: NaN
        se = np.sqrt(np.diag(fit.vcov.to_numpy()))
    assert list(fit.vcov.index) == list(ref["se"])
    # R: sqrt(diag(vcov(fit))) (glmmTMB: vcov(fit)$cond)
    np.testing.assert_allclose(se, np.array(list(ref["se"].values())), rtol=case.se_rtol,
                               err_msg=ref["call"])
