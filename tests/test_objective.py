"""The objective at fixed parameters (lme4's ``devFunOnly = TRUE``) and its gradients.

Values: ``-2 * objective_at(prepare(...), fixef, theta, sigma)`` against the deviance
functions recorded by ``tests/reference/make_refs.R`` at each fit's optimum and at a perturbed
point (``tests/reference/README.md``, "Objective at fixed parameters"), to 1e-6 relative: both
sides evaluate the same closed-form or Laplace expression, so anything larger than round-off
and the inner mode searches' tolerance is a convention error (a missing constant, the wrong
curvature, a scale mix-up).

* lmer: ``devfun(theta)`` profiles out beta and sigma. It is evaluated here at the recorded
  ``beta_hat(theta)`` and ``sigma_hat(theta)``. Under REML ``devfun`` is the REML criterion,
  -2 x the restricted log-likelihood (beta integrated out with a flat prior) at
  ``sigma_hat_REML(theta)``; this package's REML objective is the same function of
  (theta, sigma), so ``fixef`` is not an argument there.
* glmer, Laplace (nAGQ = 1): ``devfun(c(theta, beta))`` is -2 log L with all constants. For
  non-canonical links lme4's Laplace uses the expected curvature, this package (and glmmTMB)
  the observed one: those are compared with glmmTMB's ``obj$fn`` and with the independent R
  value ``laplace_observed``.
* glmer, nAGQ > 1: ``devfun`` omits the saturated constant; ``m2ll_full = value +
  saturated_m2ll`` is compared.
* glmmTMB: ``obj$fn(par) = -log L``; ``par`` holds log-SDs (and, for 2 x 2 terms, the
  correlation parameter rho / sqrt(1 - rho^2)) and ``betad``, whose scale depends on the family
  (checked here: Gaussian ``log(sigma^2)``, Gamma ``log(1/sigma^2)`` = log shape, nbinom2
  ``log(size)``).

Gradients: :func:`torch.autograd.gradcheck` in float64 of the objective as a function of the
raw parameters (beta on the internal standardised scale, theta, log_sigma) on small simulated
data, for every rule and block layout. The objective runs a Newton mode search at every call
(to a step of 1e-10), so finite differences see the implicit dependence of the mode on the
parameters; the analytic gradient gets it from the one differentiable Newton step.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula import ngmm
from ngmm_formula.api import Prepared, objective_at, prepare
from ngmm_formula.design import tril_pairs
from ngmm_formula.errors import NGMMError
from ngmm_formula.families import get_family
from ngmm_formula.fit import Objective, optimise
from ngmm_formula.model import LinearPredictor, joint_split
from tests.references import LMER, REF_DIR, REFS, SLEEP, dataset

RTOL = 1e-6
POINTS = ("optimum", "perturbed")


def values(named: dict[str, float]) -> np.ndarray:
    return np.array(list(named.values()), dtype=float)


_PREPARED: dict[tuple[Any, ...], Prepared] = {}


def prepared(data: str, formula: str, family: tuple[str, str | None], **kw: Any) -> Prepared:
    key = (data, formula, family, tuple(sorted(kw.items())))
    if key not in _PREPARED:
        _PREPARED[key] = prepare(formula, dataset(data), get_family(*family), **kw)
    return _PREPARED[key]


# ------------------------------------------------------------------------------------------
# lmer: devfun(theta) with beta and sigma profiled out


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), LMER,
                         ids=[c[0] for c in LMER])
def test_lmer_devfun(ref_id: str, data: str, formula: str, reml: bool, point: str) -> None:
    rec = REFS[ref_id]["devfun"][point]
    p = prepared(data, formula, ("gaussian", None), reml=reml)
    fixef = None if reml else values(rec["beta_hat"])
    # R: dd <- update(fit, devFunOnly = TRUE); dd(theta)
    ours = -2 * objective_at(p, fixef, values(rec["theta"]), rec["sigma_hat"])
    assert ours == pytest.approx(rec["value"], rel=RTOL)
    assert ours == pytest.approx(rec["dense_check"], rel=RTOL)


JOINT_LMER = [c for c in LMER if c[0] in ("penicillin_reml", "pastes_reml", "sleep_reml")]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), JOINT_LMER,
                         ids=[c[0] for c in JOINT_LMER])
def test_lmer_devfun_block_elimination(ref_id: str, data: str, formula: str, reml: bool,
                                       point: str) -> None:
    """The same deviance with the joint block (crossed, nested, or beta under REML)
    factorised by block elimination instead of densely."""
    rec = REFS[ref_id]["devfun"][point]
    p = _force_split(prepared(data, formula, ("gaussian", None), reml=reml))
    # R: dd <- update(fit, devFunOnly = TRUE); dd(theta)
    ours = -2 * objective_at(p, None, values(rec["theta"]), rec["sigma_hat"])
    assert ours == pytest.approx(rec["value"], rel=RTOL)


@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), LMER,
                         ids=[c[0] for c in LMER])
def test_lmer_profiled_parameters_are_stationary(ref_id: str, data: str, formula: str,
                                                 reml: bool) -> None:
    """lme4's beta_hat(theta), sigma_hat(theta) maximise our objective at fixed theta: the
    derivatives in beta (ML) and sigma vanish there (perturbed theta, not the optimum)."""
    rec = REFS[ref_id]["devfun"]["perturbed"]
    p = prepared(data, formula, ("gaussian", None), reml=reml)
    module = LinearPredictor(p.problem, True)
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A,
                                                          values(rec["beta_hat"]))))
        module.theta.copy_(torch.as_tensor(values(rec["theta"]) * rec["sigma_hat"]))
        module.log_sigma.fill_(float(np.log(rec["sigma_hat"])))
    ll = Objective(p.problem, p.family, p.approximation, module)()
    g_beta, g_theta, g_ls = torch.autograd.grad(ll, [module.beta, module.theta, module.log_sigma],
                                                allow_unused=True)
    # module.theta is absolute (sigma x lme4's theta): lme4 profiles sigma at fixed *relative*
    # theta, i.e. along d/d log sigma + sum_j theta_j d/d theta_j
    g = [float((g_ls + (module.theta * g_theta).sum()).detach())]
    if not reml:
        g += g_beta.tolist()
    # scale: these derivatives are O(n) away from the profiled values
    assert np.abs(g).max() < 1e-6 * p.problem.y.numel()


# ------------------------------------------------------------------------------------------
# glmer: devfun(c(theta, beta))

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
GROUSE = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"
CONTRA = "use ~ age + I(age ** 2) + urban + livch + (1 | district)"
GLMER = [
    # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
    ("cbpp_logit_laplace", "cbpp", CBPP, ("binomial", "logit"), {"approx": "laplace"}),
    # ... nAGQ = 25 (devfun without the saturated constant)
    ("cbpp_logit_agq25", "cbpp", CBPP, ("binomial", "logit"), {"approx": "agq", "nagq": 25}),
    # glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson)
    ("grouse_brood_laplace", "grouseticks", GROUSE, ("poisson", None), {"approx": "laplace"}),
    # ... nAGQ = 10
    ("grouse_brood_agq10", "grouseticks", GROUSE, ("poisson", None),
     {"approx": "agq", "nagq": 10}),
    # glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION), grouseticks, poisson)
    ("grouse_brood_location_laplace", "grouseticks",
     "TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", ("poisson", None),
     {"approx": "laplace"}),
    # glmer(use ~ age + I(age^2) + urban + livch + (1 | district), Contraception, binomial)
    ("contra_int_laplace", "Contraception", CONTRA, ("binomial", "logit"), {"approx": "laplace"}),
    # ... nAGQ = 20
    ("contra_int_agq20", "Contraception", CONTRA, ("binomial", "logit"),
     {"approx": "agq", "nagq": 20}),
    # glmer(use ~ age + I(age^2) + urban + livch + (1 + urban | district), Contraception, ...)
    ("contra_urban_laplace", "Contraception",
     "use ~ age + I(age ** 2) + urban + livch + (1 + urban | district)", ("binomial", "logit"),
     {"approx": "laplace"}),
    # glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial)
    ("verbagg_laplace", "VerbAgg", "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
     ("binomial", "logit"), {"approx": "laplace"}),
]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("ref_id", "data", "formula", "family", "kw"), GLMER,
                         ids=[c[0] for c in GLMER])
def test_glmer_devfun(ref_id: str, data: str, formula: str, family: tuple[str, str | None],
                      kw: dict[str, Any], point: str) -> None:
    dv = REFS[ref_id]["devfun"]
    rec = dv[point]
    p = prepared(data, formula, family, **kw)
    ours = -2 * objective_at(p, values(rec["beta"]), values(rec["theta"]))
    expected = rec["value"]
    if dv["nAGQ"] > 1:
        # lme4's AGQ devfun omits -2 sum log p(y_i | mu_i = y_i); add it back
        expected = rec["value"] + dv["saturated_m2ll"]
    # R: dd <- update(fit, devFunOnly = TRUE); dd(c(theta, beta))
    assert ours == pytest.approx(expected, rel=RTOL)
    assert ours == pytest.approx(rec["m2ll_full"], rel=RTOL)


SCALAR = [
    ("cbpp_logit_laplace", "cbpp", CBPP, ("binomial", "logit")),
    ("cbpp_probit_laplace", "cbpp", CBPP, ("binomial", "probit")),
    ("cbpp_cloglog_laplace", "cbpp", CBPP, ("binomial", "cloglog")),
    ("grouse_brood_laplace", "grouseticks", GROUSE, ("poisson", None)),
    ("contra_int_laplace", "Contraception", CONTRA, ("binomial", "logit")),
]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("ref_id", "data", "formula", "family"), SCALAR,
                         ids=[c[0] for c in SCALAR])
def test_laplace_uses_observed_curvature(ref_id: str, data: str, formula: str,
                                         family: tuple[str, str | None], point: str) -> None:
    """Against R's independent per-group Laplace with the observed curvature -h''(u_hat);
    for non-canonical links this differs from lme4's devfun (expected curvature)."""
    rec = REFS[ref_id]["devfun"][point]
    p = prepared(data, formula, family, approx="laplace")
    ours = -2 * objective_at(p, values(rec["beta"]), values(rec["theta"]))
    ind = rec["independent"]
    assert ours == pytest.approx(ind["laplace_observed"], rel=RTOL)
    if family[1] in ("probit", "cloglog"):
        assert abs(ind["laplace_fisher"] - ind["laplace_observed"]) > 1e-2
        assert ours != pytest.approx(rec["value"], rel=1e-5)  # lme4: Fisher curvature


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("ref_id", "data", "formula", "family"), SCALAR,
                         ids=[c[0] for c in SCALAR])
@pytest.mark.parametrize(("approx", "kw"), [("agq", {"nagq": 30}),
                                            ("truncated", {"truncation": 8.0, "points": 81})],
                         ids=["agq30", "truncated_M8_K81"])
def test_quadrature_matches_exact_integral(ref_id: str, data: str, formula: str,
                                           family: tuple[str, str | None], point: str,
                                           approx: str, kw: dict[str, Any]) -> None:
    """Many Gauss-Hermite nodes or a wide truncated grid reproduce R's per-group
    ``integrate`` (rel.tol 1e-12) of the exact marginal likelihood."""
    rec = REFS[ref_id]["devfun"][point]
    p = prepared(data, formula, family, approx=approx, **kw)
    ours = -2 * objective_at(p, values(rec["beta"]), values(rec["theta"]))
    assert ours == pytest.approx(rec["independent"]["exact"], rel=1e-8)


# ------------------------------------------------------------------------------------------
# glmmTMB: obj$fn(par) = -log L

def _tmb_sigma(family: str, betad: float) -> float:
    # glmmTMB's dispersion parameter betad on its own scale, per family
    return {"gaussian": np.exp(betad / 2), "gamma": np.exp(-betad / 2),
            "negative_binomial": np.exp(betad)}[family]


def _tmb_lambda(theta: np.ndarray, q: int) -> np.ndarray:
    """glmmTMB's theta (log SDs, then correlation parameters) of one q <= 2 term -> lme4's
    column-major lower Cholesky entries of the covariance (absolute scale)."""
    sd = np.exp(theta[:q])
    if q == 1:
        return sd
    rho = theta[2] / np.sqrt(1 + theta[2] ** 2)
    S = np.array([[sd[0] ** 2, rho * sd[0] * sd[1]], [rho * sd[0] * sd[1], sd[1] ** 2]])
    L = np.linalg.cholesky(S)
    return np.array([L[0, 0], L[1, 0], L[1, 1]])


TMB = [
    # glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial(link))
    ("cbpp_logit_laplace_tmb", "cbpp", CBPP, ("binomial", "logit"), {}),
    ("cbpp_probit_laplace_tmb", "cbpp", CBPP, ("binomial", "probit"), {}),
    ("cbpp_cloglog_laplace_tmb", "cbpp", CBPP, ("binomial", "cloglog"), {}),
    # glmmTMB(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson / nbinom2)
    ("grouse_brood_laplace_tmb", "grouseticks", GROUSE, ("poisson", None), {}),
    ("grouse_nb2_tmb", "grouseticks", GROUSE, ("negative_binomial", None), {}),
    # glmmTMB(y ~ x + (1 | g), gamma_sim, Gamma(link = "log" / "inverse"))
    ("gamma_log_tmb", "gamma_sim", "y ~ x + (1 | g)", ("gamma", "log"), {}),
    ("gamma_inverse_tmb", "gamma_sim", "y ~ x + (1 | g)", ("gamma", "inverse"), {}),
    # glmmTMB(Reaction ~ Days + (1 | Subject), sleepstudy, gaussian(link = "log"))
    ("sleep_gausslog_tmb", "sleepstudy", "Reaction ~ Days + (1 | Subject)", ("gaussian", "log"),
     {}),
    # glmmTMB(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE / TRUE)
    ("sleep_ml_tmb", "sleepstudy", SLEEP, ("gaussian", None), {"reml": False}),
    ("sleep_reml_tmb", "sleepstudy", SLEEP, ("gaussian", None), {"reml": True}),
]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("ref_id", "data", "formula", "family", "kw"), TMB,
                         ids=[c[0] for c in TMB])
def test_glmmtmb_objective(ref_id: str, data: str, formula: str,
                           family: tuple[str, str | None], kw: dict[str, Any],
                           point: str) -> None:
    obj = REFS[ref_id]["objective"]
    names = np.array(obj["par_names"])
    par = np.array(obj[point]["par"], dtype=float)
    gaussian_identity = family == ("gaussian", None)
    p = prepared(data, formula, family, **({"approx": "laplace"} if not gaussian_identity
                                            else kw))
    beta = par[names == "beta"] if (names == "beta").any() else None
    sigma = (_tmb_sigma(p.family.name, float(par[names == "betad"][0]))
             if (names == "betad").any() else None)
    q = p.problem.q[0]
    theta = _tmb_lambda(par[names == "theta"], q)
    if gaussian_identity:
        theta = theta / sigma  # objective_at takes lmer's relative theta there
    # R: fit$obj$fn(par)
    ours = objective_at(p, beta, theta, sigma)
    assert ours == pytest.approx(-obj[point]["value"], rel=RTOL)


@pytest.mark.parametrize(("ref_id", "family"), [
    ("cbpp_logit_laplace_tmb", ("binomial", "logit")),
    ("cbpp_probit_laplace_tmb", ("binomial", "probit")),
    ("cbpp_cloglog_laplace_tmb", ("binomial", "cloglog")),
])
def test_glmmtmb_at_lme4_perturbed_point(ref_id: str, family: tuple[str, str | None]) -> None:
    """Three-way check at lme4's perturbed point: ours = glmmTMB = R's observed-curvature
    Laplace."""
    at = REFS[ref_id]["objective"]["at_lme4_perturbed"]
    par = np.array(at["par"])
    p = prepared("cbpp", CBPP, family, approx="laplace")
    ours = -2 * objective_at(p, par[:-1], np.exp(par[-1:]))
    # R: 2 * fit$obj$fn(c(beta_p, log(theta_p)))
    assert ours == pytest.approx(at["twice_value"], rel=RTOL)
    assert ours == pytest.approx(at["independent"]["laplace_observed"], rel=RTOL)


# ------------------------------------------------------------------------------------------
# gradients


def small_data(seed: int = 1, n_groups: int = 6, n_per: int = 8) -> pd.DataFrame:
    """Small simulated data: x, a grouping factor g and a crossed factor h, and a response
    column per family (Bernoulli, Poisson, NB2, Gaussian, Gamma)."""
    rng = np.random.default_rng(seed)
    n = n_groups * n_per
    g = np.repeat(np.arange(n_groups), n_per)
    h = np.tile(np.arange(4), n // 4 + 1)[:n]
    x = rng.standard_normal(n)
    b = rng.normal(0, 0.7, n_groups)[g] + rng.normal(0, 0.3, n_groups)[g] * x
    c = rng.normal(0, 0.5, 4)[h]
    eta = 0.3 - 0.5 * x + b + c
    mu = np.exp(eta)
    return pd.DataFrame({
        "x": x,
        "g": pd.Categorical([f"g{i}" for i in g]),
        "h": pd.Categorical([f"h{i}" for i in h]),
        "ybin": rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float),
        "ycount": rng.poisson(mu).astype(float),
        "ynb": rng.negative_binomial(3, 3 / (3 + mu)).astype(float),
        "ygauss": eta + rng.normal(0, 0.8, n),
        "ygamma": rng.gamma(4.0, mu / 4.0),
    })


class _Wrapped(torch.nn.Module):
    """Calls the objective so that :func:`torch.func.functional_call` can substitute the
    LinearPredictor's parameters with gradcheck's inputs."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.lp = objective.module
        self.objective = objective

    def forward(self) -> torch.Tensor:
        return self.objective()


GRAD_CASES = [
    # (id, formula, family, prepare kwargs)
    ("laplace_group_probit_2d", "ybin ~ x + (1 + x | g)", ("binomial", "probit"),
     {"approx": "laplace"}),
    ("laplace_group_negbin", "ynb ~ x + (1 | g)", ("negative_binomial", None),
     {"approx": "laplace"}),
    ("laplace_group_gamma", "ygamma ~ x + (1 | g)", ("gamma", "log"), {"approx": "laplace"}),
    ("laplace_joint_crossed_poisson", "ycount ~ x + (1 | g) + (1 | h)", ("poisson", None),
     {"approx": "laplace"}),
    ("laplace_joint_crossed_nb", "ynb ~ x + (1 | g) + (1 | h)", ("negative_binomial", None),
     {"approx": "laplace"}),
    ("agq_scalar_logit", "ybin ~ x + (1 | g)", ("binomial", "logit"),
     {"approx": "agq", "nagq": 7}),
    ("agq_2d_poisson", "ycount ~ x + (1 + x | g)", ("poisson", None),
     {"approx": "agq", "nagq": 4}),
    ("agq_scalar_gamma", "ygamma ~ x + (1 | g)", ("gamma", "log"), {"approx": "agq", "nagq": 5}),
    ("truncated_scalar_poisson", "ycount ~ x + (1 | g)", ("poisson", None),
     {"approx": "truncated", "truncation": 4.0, "points": 15}),
    ("truncated_2d_logit", "ybin ~ x + (1 + x | g)", ("binomial", "logit"),
     {"approx": "truncated", "truncation": 3.0, "points": 7}),
    ("exact_ml_group_2d", "ygauss ~ x + (1 + x | g)", ("gaussian", None), {"reml": False}),
    ("exact_ml_joint_crossed", "ygauss ~ x + (1 | g) + (1 | h)", ("gaussian", None),
     {"reml": False}),
    ("exact_reml", "ygauss ~ x + (1 + x | g)", ("gaussian", None), {"reml": True}),
    # reduced-rank terms: 4 columns, 2 factors (7 loadings), per-group 2-d integrals
    ("laplace_rr_d2", "ybin ~ x + rr(0 + h | g, d = 2)", ("binomial", "logit"),
     {"approx": "laplace"}),
    ("agq_rr_d2", "ybin ~ x + rr(0 + h | g, d = 2)", ("binomial", "logit"),
     {"approx": "agq", "nagq": 4}),
    ("truncated_rr_d2", "ybin ~ x + rr(0 + h | g, d = 2)", ("binomial", "logit"),
     {"approx": "truncated", "truncation": 3.0, "points": 7}),
    ("laplace_rr_d2_poisson_crossed", "ycount ~ x + rr(0 + h | g, d = 2) + (1 | h)",
     ("poisson", None), {"approx": "laplace"}),
    ("gaussian_rr_d1", "ygauss ~ x + rr(0 + h | g, d = 1)", ("gaussian", None), {}),
]


@pytest.mark.parametrize(("formula", "family", "kw"), [c[1:] for c in GRAD_CASES],
                         ids=[c[0] for c in GRAD_CASES])
def test_gradcheck(formula: str, family: tuple[str, str | None], kw: dict[str, Any]) -> None:
    p = prepare(formula, small_data(), get_family(*family), **kw)
    expected_kind = {"laplace": "laplace", "agq": "agq", "truncated": "truncated"}.get(
        kw.get("approx", ""), "exact")
    if "rr(" in formula and expected_kind == "exact":
        expected_kind = "laplace"  # exact for a Gaussian response; the profiled path is q x q
    assert p.approximation.kind == expected_kind
    _gradcheck(p)


# joint blocks factorised by block elimination (approx/factor.py's SchurFactor); these small
# blocks would be factorised densely by default, so the split is forced
SCHUR_GRAD_CASES = [
    ("laplace_crossed_poisson", "ycount ~ x + (1 | g) + (1 | h)", ("poisson", None),
     {"approx": "laplace"}),
    ("laplace_crossed_slope_logit", "ybin ~ x + (1 + x | g) + (1 | h)", ("binomial", "logit"),
     {"approx": "laplace"}),
    ("exact_ml_crossed", "ygauss ~ x + (1 | g) + (1 | h)", ("gaussian", None), {"reml": False}),
    ("exact_reml_crossed", "ygauss ~ x + (1 | g) + (1 | h)", ("gaussian", None), {"reml": True}),
    ("exact_reml_single_factor", "ygauss ~ x + (1 + x | g)", ("gaussian", None),
     {"reml": True}),
]


@pytest.mark.parametrize(("formula", "family", "kw"), [c[1:] for c in SCHUR_GRAD_CASES],
                         ids=[c[0] for c in SCHUR_GRAD_CASES])
def test_gradcheck_block_elimination(formula: str, family: tuple[str, str | None],
                                     kw: dict[str, Any]) -> None:
    p = _force_split(prepare(formula, small_data(n_groups=12), get_family(*family), **kw))
    _gradcheck(p)


def _force_split(p: Prepared) -> Prepared:
    """``p`` with its joint block factorised by block elimination whatever its size."""
    split = joint_split(p.design.re_terms, p.problem.blocks.dim, dense_max_dim=0)
    assert split is not None
    blocks = dataclasses.replace(p.problem.blocks, split=split)
    return dataclasses.replace(p, problem=dataclasses.replace(p.problem, blocks=blocks))


def _gradcheck(p: Prepared) -> None:
    module = LinearPredictor(p.problem, p.family.has_dispersion)
    wrapped = _Wrapped(Objective(p.problem, p.family, p.approximation, module))
    theta0 = []
    for k, d in zip(p.problem.q, p.problem.ranks):
        # a generic point: diagonal 0.6..0.8, off-diagonal 0.2 (loadings: the same pattern)
        theta0.extend(0.8 - 0.2 * j if i == j else 0.2 for i, j in tril_pairs(k, d))
    inputs: dict[str, torch.Tensor] = {
        "lp.theta": torch.tensor(theta0, dtype=torch.float64, requires_grad=True)}
    if not p.problem.reml:
        inputs["lp.beta"] = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    if module.log_sigma is not None:
        ls = {"gaussian": np.log(0.8), "gamma": np.log(0.5), "negative_binomial": np.log(3.0)}
        inputs["lp.log_sigma"] = torch.tensor(ls[p.family.name], dtype=torch.float64,
                                              requires_grad=True)
    names = list(inputs)

    def f(*args: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapped, dict(zip(names, args)), ())

    value = f(*inputs.values())
    assert torch.isfinite(value)
    assert torch.autograd.gradcheck(f, tuple(inputs.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# the objective is a function of the parameters


def _set_user_parameters(p: Prepared, module: LinearPredictor, beta: np.ndarray, theta: float,
                         sigma: float) -> None:
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A, beta)))
        module.theta.fill_(theta)
        module.log_sigma.fill_(float(np.log(sigma)))


def test_objective_does_not_depend_on_history() -> None:
    """The same parameters give the same value whatever was evaluated before. Regression
    test: the mode search used to warm-start from a previous failed search whose modes had
    left the support (Gamma inverse link, eta <= 0) and then returned -inf at good points."""
    p = prepared("gamma_sim", "y ~ x + (1 | g)", ("gamma", "inverse"), approx="laplace")
    module = LinearPredictor(p.problem, True)
    obj = Objective(p.problem, p.family, p.approximation, module)
    good = (np.array([0.45, -0.09]), 0.1, 1.0)
    _set_user_parameters(p, module, *good)
    with torch.no_grad():
        first = float(obj())
    assert np.isfinite(first)
    # a point where eta = 0.35 - 0.5 x + 0.35 u is negative for x > 0.7 at u = 0
    _set_user_parameters(p, module, np.array([0.35, -0.5]), 0.35, 0.5)
    with torch.no_grad():
        obj()
    _set_user_parameters(p, module, *good)
    with torch.no_grad():
        again = float(obj())
    assert again == pytest.approx(first, rel=1e-10)


def _poisson_slope() -> tuple[pd.DataFrame, dict[str, Any]]:
    """``tests/reference/poisson_slope.csv`` (200 groups of 20 counts, up to 141) and lme4's
    Laplace fit of ``y ~ t1 + x3 + (1 + x3 | g)`` to it (``make_poisson_slope_ref.R``)."""
    return (pd.read_csv(REF_DIR / "poisson_slope.csv"),
            json.loads((REF_DIR / "poisson_slope_ref.json").read_text()))


def _set_standardised(module: LinearPredictor, beta_s: np.ndarray, theta: np.ndarray) -> None:
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(beta_s, dtype=module.beta.dtype))
        module.theta.copy_(torch.as_tensor(theta, dtype=module.theta.dtype))


def test_a_warm_start_whose_curvature_is_singular_restarts_from_zero() -> None:
    """Regression test: a line search's trial point (the one L-BFGS-B reached on this data
    set, slope SD 15.6) warm-started from the optimum's modes puts a group's eta at 89.5,
    where exp(eta) ~ 1e38 makes the group's I + C'WC singular to round-off, and the mode
    search raised a LinAlgError. It now restarts from u = 0: the value is the one a fresh
    objective finds there, to 1e-10 relative. Why it holds on any machine: both searches run
    from u = 0 to the same convergence test (a last step below 1e-10 of max(1, |u|)), the
    restarted one with a jitter of 1e-8 in its first factor only, so their modes differ by
    about that tolerance; the Laplace / quadrature value is stationary in the mode, so it
    moves by about the square of that, far below 1e-10 of |value| ~ 3.5e4."""
    df, ref = _poisson_slope()
    p = prepare("y ~ t1 + x3 + (1 + x3 | g)", df, "poisson")  # 7 x 7 adaptive nodes
    module = LinearPredictor(p.problem, False)
    obj = Objective(p.problem, p.family, p.approximation, module)
    _set_standardised(module, np.linalg.solve(p.problem.standardisation.A, ref["fixef"]),
                      np.array(ref["theta"]))
    far = (np.array([-7.324, 0.808, -0.722]), np.array([0.297, 0.362, -15.608]))
    with torch.no_grad():
        obj()  # the optimum: its modes are the next search's warm start
        _set_standardised(module, *far)
        warm = float(obj())
    fresh_module = LinearPredictor(p.problem, False)
    _set_standardised(fresh_module, *far)
    with torch.no_grad():
        fresh = float(Objective(p.problem, p.family, p.approximation, fresh_module)())
    assert np.isfinite(warm) and warm == pytest.approx(fresh, rel=1e-10)


def test_a_point_whose_modes_cannot_be_computed_has_minus_infinite_value() -> None:
    """Where no mode can be found (an intercept of 800: exp(eta) overflows at u = 0 already)
    the objective's value is -inf with a zero gradient, which the optimisers step back from,
    instead of the mode search's LinAlgError."""
    df, _ = _poisson_slope()
    p = prepare("y ~ t1 + x3 + (1 + x3 | g)", df, "poisson")
    module = LinearPredictor(p.problem, False)
    _set_standardised(module, np.array([800.0, 0.0, 0.0]), np.array([1.0, 0.0, 1.0]))
    params = [module.beta, module.theta]
    obj = Objective(p.problem, p.family, p.approximation, module)
    value, grads = obj.value_and_grad(params)
    assert value == -np.inf and all(bool((g == 0).all()) for g in grads)
    # an optimiser that can leave no such point ends with a clear error, not an estimate
    with pytest.raises(NGMMError, match="not finite"):
        optimise(obj)


def test_poisson_random_slope_after_a_long_line_search_step() -> None:
    """The fits of this data set end converged, without warnings: the default (adaptive
    quadrature, 7 x 7 nodes, whose line search passes the point above) and Laplace, whose
    log-likelihood is lme4's to 1e-3 and not below it (lme4 stops 6.2e-4 lower, at its own
    tolerance; ours is at max|gradient| < 1e-6, and equals lme4's deviance function where
    both evaluate the same point: ``test_glmer_devfun``)."""
    df, ref = _poisson_slope()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning
        fit = ngmm("y ~ t1 + x3 + (1 + x3 | g)", df, "poisson")
        laplace = ngmm("y ~ t1 + x3 + (1 + x3 | g)", df, "poisson", approx="laplace")
    assert fit.diagnostics.converged and laplace.diagnostics.converged
    assert ref["loglik"] - 1e-6 <= laplace.loglik <= ref["loglik"] + 1e-3
    np.testing.assert_allclose(laplace.fixef.to_numpy(), ref["fixef"], atol=1e-3)


def test_objective_at_is_repeatable() -> None:
    """objective_at builds a fresh objective every call: same value twice, and the same
    value as a warm-started Objective at the same point (cbpp)."""
    rec = REFS["cbpp_logit_laplace"]["devfun"]["perturbed"]
    p = prepared("cbpp", CBPP, ("binomial", "logit"), approx="laplace")
    beta, theta = values(rec["beta"]), values(rec["theta"])
    a = objective_at(p, beta, theta)
    assert objective_at(p, beta, theta) == a
    module = LinearPredictor(p.problem, False)
    obj = Objective(p.problem, p.family, p.approximation, module)
    with torch.no_grad():
        module.theta.fill_(0.3)
        obj()  # a different point first: warm start from its modes
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A, beta)))
        module.theta.copy_(torch.as_tensor(theta))
        assert float(obj()) == pytest.approx(a, rel=1e-12)


# ------------------------------------------------------------------------------------------
# evaluation piece by piece (large problems)


@pytest.mark.parametrize("family, approx", [
    (("binomial", "logit"), "agq"), (("poisson", "log"), "laplace"),
    (("gaussian", "log"), "laplace"),
])
def test_chunked_value_and_gradient_equal_whole(monkeypatch: pytest.MonkeyPatch,
                                                family: tuple[str, str | None],
                                                approx: str) -> None:
    """The objective evaluated in pieces of whole groups (:meth:`Objective.chunks`, forced
    here with pieces of 37 rows, so that pieces end inside the target size and groups of
    unequal size straddle it) gives the whole evaluation's value and gradient to round-off
    (1e-12 relative: the same terms summed in another order)."""
    from ngmm_formula import fit as fit_module
    from ngmm_formula.datasets import simulate_grouped

    df = simulate_grouped(40, 9, family[0] if family[0] != "gaussian" else "poisson",
                          seed=3, slope_sd=0.3)
    df = df[df.index % 7 != 0]  # unequal group sizes
    if family[0] == "gaussian":
        df = df.assign(y=df["y"] + 1.0)
    kw = {"nagq": 7} if approx == "agq" else {}
    p = prepare("y ~ x1 + x3 + (1 | g)", df, get_family(*family), approx=approx, **kw)
    module = LinearPredictor(p.problem, p.family.has_dispersion)
    with torch.no_grad():
        module.theta.fill_(0.7)
        module.beta[0] = 0.2
    params = [module.beta, module.theta] + (
        [module.log_sigma] if module.log_sigma is not None else [])
    whole = Objective(p.problem, p.family, p.approximation, module)
    ll = whole()
    g_whole = torch.autograd.grad(ll, params)
    monkeypatch.setattr(fit_module, "CHUNK_ROWS", 37)
    pieces = Objective(p.problem, p.family, p.approximation, module)
    assert len(pieces.chunks()) == pytest.approx(len(df) / 37, abs=2)
    assert sum(int(c.problem.y.shape[0]) for c in pieces.chunks()) == len(df)
    value, g_pieces = pieces.value_and_grad(params)
    assert value == pytest.approx(float(ll.detach()), rel=1e-12)
    for a, b in zip(g_whole, g_pieces):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-10, atol=1e-10)
    assert pieces.value() == pytest.approx(float(ll.detach()), rel=1e-12)


def test_chunked_fit_equals_whole_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit with the objective in pieces of 50 rows gives the same estimates as one in a
    single piece (cbpp-sized simulated binomial, adaptive quadrature): the pieces change
    the order of the sums only, so the optimiser stops at the same point to its tolerance
    (log-likelihood 1e-9 relative, parameters 1e-6)."""
    from ngmm_formula import fit as fit_module
    from ngmm_formula import ngmm
    from ngmm_formula.datasets import simulate_grouped

    df = simulate_grouped(60, 8, "binomial", effect="linear", seed=5)
    a = ngmm("y ~ x1 + x2 + (1 | g)", df, "binomial", nagq=9)
    monkeypatch.setattr(fit_module, "CHUNK_ROWS", 50)
    b = ngmm("y ~ x1 + x2 + (1 | g)", df, "binomial", nagq=9)
    assert b.loglik == pytest.approx(a.loglik, rel=1e-9)
    np.testing.assert_allclose(b.fixef.to_numpy(), a.fixef.to_numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b.varcorr.sdcor.to_numpy(), a.varcorr.sdcor.to_numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(b.ranef["g"].to_numpy(), a.ranef["g"].to_numpy(), atol=1e-6)


def test_a_warm_start_takes_newton_steps_before_lbfgs() -> None:
    """:func:`~ngmm_formula.fit._maximise` with ``warm=True`` (the refit of a neural fit's
    linear part from a nearby optimum): a smooth concave function whose given Hessian is 10 %
    off (as BHHH's can be) converges by chord-Newton steps alone, linearly at about 0.1 a
    step, to the gradient tolerance, without L-BFGS-B (iterations 0); from a start where
    those steps stop short it falls back to L-BFGS-B and ends at the same maximum. Both to
    within 1e-9: the maximum is unique and the curvature near it is at least 1.9 (A's
    smallest eigenvalue 0.91 plus log-cosh's 1 at the centre), so a gradient below 1e-10
    puts the point within 1e-10 / 1.9 of it on any machine's arithmetic."""
    from ngmm_formula.fit import _maximise

    centre = np.array([0.3, -1.2, 2.0])
    A = np.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        d = x - centre
        # concave and smooth, not quadratic: log-cosh terms flatten far from the centre
        return (-float(d @ A @ d) / 2 - float(np.log(np.cosh(d)).sum()),
                -(A @ d) - np.tanh(d))

    def hessian(x: np.ndarray) -> np.ndarray:  # the true one at the centre, 10 % too large
        return -1.1 * (A + np.eye(3))

    near = _maximise(value_and_grad, centre + 0.01, max_iter=200, gtol=1e-10,
                     newton_steps=8, final_hessian=False, hessian=hessian, warm=True)
    assert near.iterations == 0 and "WARM START" in near.message
    assert np.abs(near.gradient).max() < 1e-10
    np.testing.assert_allclose(near.x, centre, atol=1e-9)
    far = _maximise(value_and_grad, centre + 40.0, max_iter=200, gtol=1e-10,
                    newton_steps=8, final_hessian=False, hessian=hessian, warm=True)
    assert far.iterations > 0  # the Newton steps from 40 away stopped short
    np.testing.assert_allclose(far.x, centre, atol=1e-9)


def test_a_warm_start_hands_lbfgs_over_to_newton() -> None:
    """:func:`~ngmm_formula.fit._maximise`'s ``handoff``: a warm start without a Newton
    matrix (the final refit of a neural fit: finite differences) ends L-BFGS-B at the first
    iterate below :data:`~ngmm_formula.fit.HANDOFF_GTOL` and reaches ``gtol`` by the polish's
    Newton steps with the finite-difference Hessian, at the same maximum as L-BFGS-B run to
    its own end and in no more evaluations (on the refit of a neural fit at 10^6 rows, where
    the sum's rounding hid the last decreases from the line search, 15 against 22:
    ``benchmarks/README.md``). Where a masked coordinate (a diagonal of a
    :math:`\\Lambda_k`) is near 0 it runs on, as ``stop_at_gtol`` does. The tolerances hold
    on any machine: the maximum is unique with curvature at least 10^5, so a gradient below
    1e-6 puts the point within 1e-11 of it."""
    from ngmm_formula.fit import HANDOFF_GTOL, _maximise

    centre = np.array([0.3, -1.2, 2.0])
    A = 1e5 * np.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        d = x - centre
        return (-5e5 - float(d @ A @ d) / 2 - 1e5 * float(np.log(np.cosh(d)).sum()),
                -(A @ d) - 1e5 * np.tanh(d))

    start = centre + np.array([0.02, -0.01, 0.015])
    common: dict[str, Any] = dict(max_iter=200, gtol=1e-6, newton_steps=8, warm=True)
    plain = _maximise(value_and_grad, start, **common)
    handed = _maximise(value_and_grad, start, handoff=np.array([False, False, True]), **common)
    assert f"< {HANDOFF_GTOL:g}, THEN NEWTON STEPS" in handed.message
    assert np.abs(handed.gradient).max() < 1e-6
    np.testing.assert_allclose(handed.x, centre, atol=1e-10)
    np.testing.assert_allclose(plain.x, centre, atol=1e-10)
    assert handed.evaluations <= plain.evaluations
    # a masked coordinate at 0 at the maximum (a variance heading for the boundary): L-BFGS-B
    # runs to its own end
    at_zero = centre * np.array([0.0, 1.0, 1.0])
    shifted = _maximise(lambda x: value_and_grad(x + centre - at_zero), start - centre + at_zero,
                        handoff=np.array([True, False, False]), **common)
    assert "NEWTON" not in shifted.message
    np.testing.assert_allclose(shifted.x, at_zero, atol=1e-10)


def _ill_conditioned(k: int = 60, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    """A smooth concave function of ``k`` parameters whose Hessian at its maximum ``centre``
    is ``-(A + I)``, A with eigenvalues from 1 to 10^5 (as item parameters of very different
    precision): ``value_and_grad``, ``centre`` and ``A``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    A = (Q * np.logspace(0, 5, k)) @ Q.T
    centre = rng.standard_normal(k)

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        d = x - centre
        return (-float(d @ A @ d) / 2 - float(np.log(np.cosh(d)).sum()),
                -(A @ d) - np.tanh(d))
    return value_and_grad, centre, A


def test_lbfgs_in_the_variables_a_bhhh_matrix_preconditions() -> None:
    """:class:`~ngmm_formula.fit._Preconditioner`: the gradient in the new variables is the
    chain rule's (against central differences of the value, step 1e-5: error of order
    1e-10 relative to the gradient's size), and L-BFGS-B in them, with a matrix 5 % off the
    Hessian (as BHHH's near an optimum), needs a fraction of the iterations of plain
    L-BFGS-B on a Hessian of condition number 10^5 and ends at the same point. Within 1e-6
    of the centre on any machine: both stop at a gradient of 1e-9 in their variables or at
    a relative decrease of 1e-15 of a function whose minimum is 0 (a distance of order
    sqrt(1e-15) = 3e-8 where the curvature is 2, its least)."""
    from ngmm_formula.fit import _lbfgs, _Preconditioner

    value_and_grad, centre, A = _ill_conditioned()

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = value_and_grad(x)
        return -v, -g
    x0 = centre + 1.0
    pre = _Preconditioner.of(x0, 1.05 * (A + np.eye(A.shape[0])))
    assert pre is not None
    u = np.random.default_rng(1).standard_normal(centre.size) * 1e-3
    g_u = pre.gradient(f(pre.x(u))[1])
    h = 1e-5
    fd = np.array([(f(pre.x(u + h * e))[0] - f(pre.x(u - h * e))[0]) / (2 * h)
                   for e in np.eye(u.size)])
    np.testing.assert_allclose(g_u, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
    x_pre, it_pre, _, _ = _lbfgs(f, x0, max_iter=2000, callback=None, pre=pre)
    x_plain, it_plain, _, _ = _lbfgs(f, x0, max_iter=2000, callback=None, pre=None)
    np.testing.assert_allclose(x_pre, centre, atol=1e-6)
    np.testing.assert_allclose(x_plain, centre, atol=1e-6)
    assert it_pre * 3 < it_plain


def test_a_steered_fit_reports_the_finite_difference_hessian_at_its_end() -> None:
    """With ``steer`` (BHHH's) and no ``hessian`` (a Laplace fit's standard errors come from
    finite differences), a fit of at least PRECONDITION_MIN_PARAMS parameters takes its
    Newton steps with ``steer``'s matrix (here 10 % off) but reports the finite-difference
    Hessian of the final point (the true one within 1e-5 relative: central differences of an
    exact gradient, step 1e-4 relative, on a function whose third derivatives are O(1)), and
    computes it once: 2k gradient evaluations at the final point's coordinate steps and no
    other point's, where a polish that moved paid for two.

    The point within 1e-6 of the centre on any machine: the polish ends below a gradient of
    1e-7 (max norm), and the curvature is at least 2 (A's smallest eigenvalue 1 plus
    log-cosh's 1 near the centre), so |x - centre| <= sqrt(60) 1e-7 / 2 = 3.9e-7 (measured
    7e-9 at gtol 1e-6)."""
    from ngmm_formula.fit import PRECONDITION_MIN_PARAMS, _maximise

    value_and_grad, centre, A = _ill_conditioned()
    k = centre.size
    assert k >= PRECONDITION_MIN_PARAMS
    points: list[np.ndarray] = []
    steered: list[np.ndarray] = []

    def counted(x: np.ndarray) -> tuple[float, np.ndarray]:
        points.append(np.array(x, dtype=float))
        return value_and_grad(x)

    def steer(x: np.ndarray) -> np.ndarray:
        steered.append(np.array(x, dtype=float))
        return -1.1 * (A + np.eye(k))
    opt = _maximise(counted, centre + 0.5, max_iter=5000, gtol=1e-7, newton_steps=8,
                    steer=steer)
    np.testing.assert_allclose(opt.x, centre, atol=1e-6)
    true = -(A + np.diag(1 / np.cosh(opt.x - centre) ** 2))
    np.testing.assert_allclose(opt.hessian, true, rtol=1e-5, atol=1e-5 * np.abs(true).max())
    assert len(steered) == 1  # the polish's matrix, at the L-BFGS point
    def steps_around(x: np.ndarray, among: list[np.ndarray]) -> int:
        """Points of ``among`` one finite-difference step (1e-4 max(1, |x_j|), one
        coordinate) from ``x``."""
        h = 1e-4 * np.maximum(1.0, np.abs(x))
        return sum(int(np.count_nonzero(p != x) == 1
                       and np.isclose(np.abs(p - x).max(), h[np.argmax(np.abs(p - x))],
                                      rtol=1e-6)) for p in among)
    # the last 2k evaluations are the final point's steps; before them no point has more
    # than one neighbour at a step's distance (a Hessian would give its point 2k)
    assert steps_around(opt.x, points[-2 * k:]) == 2 * k
    before = points[:-2 * k]
    assert max(steps_around(p, before) for p in before) <= 1


def test_wide_sparse_weighted_least_squares_equals_the_dense_qr() -> None:
    """The GLM start's weighted least squares of a wide, sparse fixed-effects matrix (item
    indicators and two covariates, as ``0 + item + x1 + x2``) from its normal equations
    (:func:`~ngmm_formula.fit._wls_sparse`) equals the dense fixed-order QR's within 1e-9
    relative: the matrix is well conditioned (orthogonal indicator columns of about 100 rows
    each, standard normal covariates), so squaring its condition number in the normal
    equations loses a few digits of the 16 at most. A dense matrix keeps the QR."""
    from ngmm_formula.fit import _wide_and_sparse, _wls
    from ngmm_formula.model import lstsq_fixed_order

    rng = np.random.default_rng(3)
    n, items = 6000, 60
    X = np.zeros((n, items + 2))
    X[np.arange(n), rng.integers(0, items, n)] = 1.0
    X[:, items:] = rng.standard_normal((n, 2))
    Xs = torch.as_tensor(X)
    z = torch.as_tensor(X @ rng.normal(size=items + 2) + rng.standard_normal(n))
    W = torch.as_tensor(rng.uniform(0.05, 0.25, n))
    assert _wide_and_sparse(Xs)
    assert not _wide_and_sparse(torch.as_tensor(rng.standard_normal((n, items + 2))))
    for weights in (None, W):
        sparse = _wls(Xs, z, weights, None).numpy()
        sw = torch.ones(n) if weights is None else weights.sqrt()
        dense = lstsq_fixed_order(Xs * sw[:, None].double(), z * sw.double()).numpy()
        np.testing.assert_allclose(sparse, dense, rtol=1e-9, atol=1e-12)
