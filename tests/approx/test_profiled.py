"""lmer's profiled objective (:mod:`ngmm_formula.approx.profiled`).

* Values: ``-2 * value`` against lme4's ``devfun(theta)`` recorded by
  ``tests/reference/make_refs.R`` at each fit's optimum and at a perturbed theta, and
  ``beta_hat(theta)``, ``sigma_hat(theta)`` against the recorded ones. Both sides evaluate the
  same closed form, so the tolerance is round-off: 1e-10 relative (measured: below 1e-14).
* Gradient: against central differences (1e-6 relative: the differences' truncation error at
  a step of 1e-5 on functions whose third derivatives are O(1)) and, independently, against
  autograd of the full objective (:class:`~ngmm_formula.fit.Objective`) at
  :math:`(\\hat\\beta(\\theta), \\hat\\sigma(\\theta))`, where by the envelope theorem
  :math:`\\partial\\tilde\\ell/\\partial\\theta = \\hat\\sigma\\,
  \\partial\\ell/\\partial\\theta_{\\text{abs}}` (1e-8 relative: two exact computations).
* The profiled value equals the full objective at the profiled solution on data with prior
  weights (some zero), an offset, two terms of one factor and no fixed effects.
* ``vcov`` of a profiled ML fit equals the inverse of minus the autograd Hessian of the full
  objective in beta (lmer's :math:`\\sigma^2 (X^\\top V^{-1} X)^{-1}`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula import ngmm
from ngmm_formula.api import Prepared, prepare
from ngmm_formula.approx.profiled import ProfiledLMM
from ngmm_formula.fit import Objective
from ngmm_formula.model import LinearPredictor
from tests.references import LMER, REFS, SLEEP, dataset

IDS = [c[0] for c in LMER]
_PREPARED: dict[tuple[Any, ...], Prepared] = {}


def prepared(data: str | pd.DataFrame, formula: str, **kw: Any) -> Prepared:
    if not isinstance(data, str):
        return prepare(formula, data, **kw)
    key = (data, formula, tuple(sorted(kw.items())))
    if key not in _PREPARED:
        _PREPARED[key] = prepare(formula, dataset(data), **kw)
    return _PREPARED[key]


def values(named: dict[str, float]) -> np.ndarray:
    return np.array(list(named.values()), dtype=float)


@pytest.mark.parametrize("point", ["optimum", "perturbed"])
@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), LMER, ids=IDS)
def test_devfun_and_profiled_estimates_match_lme4(ref_id: str, data: str, formula: str,
                                                  reml: bool, point: str) -> None:
    rec = REFS[ref_id]["devfun"][point]
    p = prepared(data, formula, reml=reml)
    prof = ProfiledLMM.of(p.problem)
    theta = values(rec["theta"])
    value, _ = prof.value_and_grad(theta)
    # R: dd <- update(fit, devFunOnly = TRUE); dd(theta)
    assert -2 * value == pytest.approx(rec["value"], rel=1e-10)
    sol = prof.solve(theta)
    assert sol.loglik == pytest.approx(value, rel=1e-14)
    # R: environment(dd)$pp$beta(1), sigma from the profiled pwrss (make_refs.R)
    assert sol.sigma == pytest.approx(rec["sigma_hat"], rel=1e-10)
    beta = p.problem.standardisation.A @ sol.beta
    if "beta_hat" in rec:
        np.testing.assert_allclose(beta, values(rec["beta_hat"]), rtol=1e-10)


@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), LMER, ids=IDS)
def test_block_layout(ref_id: str, data: str, formula: str, reml: bool) -> None:
    """One block per group with one grouping factor (REML too); crossed and nested factors
    keep one joint block of all random effects (and no REML coordinates)."""
    p = prepared(data, formula, reml=reml)
    prof = ProfiledLMM.of(p.problem)
    n_levels = p.problem.n_levels
    if len(p.design.grouping_factors) == 1:
        assert prof.per_group
        assert (prof.n_blocks, prof.dim) == (n_levels[0], sum(p.problem.q))
    else:
        assert not prof.per_group
        assert (prof.n_blocks, prof.dim) == (1, sum(q * m for q, m in zip(p.problem.q,
                                                                           n_levels)))
    assert prof.M.shape == (prof.n_blocks, prof.dim, prof.dim)
    assert prof.P.shape == (prof.n_blocks, prof.dim, p.problem.p)


def _objective_gradient(p: Prepared, prof: ProfiledLMM, theta: np.ndarray
                        ) -> tuple[float, np.ndarray]:
    """The full objective and sigma-hat x its autograd gradient in the absolute theta, at
    (beta_hat(theta), sigma_hat(theta))."""
    sol = prof.solve(theta)
    module = LinearPredictor(p.problem, True)
    with torch.no_grad():
        module.theta.copy_(torch.as_tensor(theta * sol.sigma))
        module.log_sigma.fill_(float(np.log(sol.sigma)))
        if not p.problem.reml and p.problem.p:
            module.beta.copy_(torch.as_tensor(sol.beta))
    ll = Objective(p.problem, p.family, p.approximation, module)()
    (g,) = torch.autograd.grad(ll, module.theta)
    return float(ll.detach()), sol.sigma * g.numpy()


@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), LMER, ids=IDS)
def test_gradient(ref_id: str, data: str, formula: str, reml: bool) -> None:
    theta = values(REFS[ref_id]["devfun"]["perturbed"]["theta"])
    p = prepared(data, formula, reml=reml)
    prof = ProfiledLMM.of(p.problem)
    value, grad = prof.value_and_grad(theta)
    h = 1e-5
    fd = np.array([(prof.value_and_grad(theta + h * e)[0]
                    - prof.value_and_grad(theta - h * e)[0]) / (2 * h)
                   for e in np.eye(theta.size)])
    scale = np.abs(grad).max()
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-6 * scale)
    full, g_full = _objective_gradient(p, prof, theta)
    assert full == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(grad, g_full, rtol=0, atol=1e-8 * scale)


def _weighted_data() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n, G = 240, 12
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    b0, b1 = rng.normal(0, 1.5, G), rng.normal(0, 0.7, G)
    w = rng.uniform(0.5, 2.0, n)
    w[:5] = 0.0
    off = rng.normal(0, 0.3, n)
    y = 100.0 + 2.0 * x + b0[g] + b1[g] * x + off + rng.normal(size=n) / np.sqrt(
        np.where(w > 0, w, 1.0))
    h = rng.integers(0, 60, n)  # crossed with g: a joint block of 72 (LAPACK's potri path)
    y = y + rng.normal(0, 0.5, 60)[h]
    return pd.DataFrame({"y": y, "x": x, "g": pd.Categorical(g), "h": pd.Categorical(h),
                         "w": w, "off": off})


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula", ["y ~ x + (1 | g) + (0 + x | g)", "y ~ x + (x | g)",
                                     "y ~ 0 + (1 | g)", "y ~ x + (x | g) + (1 | h)",
                                     "y ~ x + (x | h) + (1 | g)"])
def test_weights_offset_and_layouts_match_the_full_objective(formula: str, reml: bool) -> None:
    """Prior weights (five of them zero), an offset, two terms of one factor (a block-diagonal
    Lambda), a model without fixed effects and crossed factors with a correlated term (one
    joint block of 84; and of 132 whose first term is vector-valued, both factorised by
    eliminating the first term's diagonal blocks first): the profiled value and gradient
    equal those of the full objective at the profiled solution."""
    p = prepared(_weighted_data(), formula, reml=reml, weights="w", offset="off")
    prof = ProfiledLMM.of(p.problem)
    assert prof.n == 235  # zero weights drop out
    theta = np.full(p.problem.n_theta, 0.8)
    if "(x | g)" in formula:
        theta[1] = 0.3
    value, grad = prof.value_and_grad(theta)
    full, g_full = _objective_gradient(p, prof, theta)
    assert value == pytest.approx(full, rel=1e-12)
    np.testing.assert_allclose(grad, g_full, rtol=0, atol=1e-8 * np.abs(grad).max())


def test_vcov_of_an_ml_fit_is_the_inverse_hessian_in_beta() -> None:
    """lmer's vcov, sigma^2 (R_X' R_X)^{-1}, is the inverse of minus the Hessian of the full
    log-likelihood in beta at the fitted (theta, sigma) (1e-8 relative: both exact)."""
    fit = ngmm(SLEEP, dataset("sleepstudy"), reml=False)
    p = prepared("sleepstudy", SLEEP, reml=False)
    module = LinearPredictor(p.problem, True)
    A = p.problem.standardisation.A
    with torch.no_grad():
        module.theta.copy_(torch.as_tensor(fit.theta.to_numpy() * fit.sigma))
        module.log_sigma.fill_(float(np.log(fit.sigma)))
    obj = Objective(p.problem, p.family, p.approximation, module)
    beta_s = torch.as_tensor(np.linalg.solve(A, fit.fixef.to_numpy()))
    H = torch.autograd.functional.hessian(lambda b: _obj_at_beta(obj, b), beta_s).numpy()
    cov = A @ np.linalg.inv(-H) @ A.T
    np.testing.assert_allclose(fit.vcov.to_numpy(), cov, rtol=1e-8)


def _obj_at_beta(obj: Objective, beta_s: torch.Tensor) -> torch.Tensor:
    """The objective as a function of beta_s (the module's beta replaced by ``beta_s``)."""
    m = obj.module
    saved = m.beta
    try:
        del m.beta
        m.beta = beta_s  # type: ignore[assignment]
        return obj()
    finally:
        del m.beta
        m.beta = saved


def test_fit_reports_the_profiled_solution() -> None:
    """A profiled fit's reported log-likelihood is the full objective's (not recomputed
    differently) and equals the profiled maximum; theta is lme4's relative one."""
    fit = ngmm(SLEEP, dataset("sleepstudy"), reml=True)
    p = prepared("sleepstudy", SLEEP, reml=True)
    prof = ProfiledLMM.of(p.problem)
    value, grad = prof.value_and_grad(fit.theta.to_numpy())
    assert fit.loglik == pytest.approx(value, rel=1e-12)
    assert np.abs(grad).max() < 1e-4
    assert fit.sigma == pytest.approx(prof.solve(fit.theta.to_numpy()).sigma, rel=1e-12)


@pytest.mark.parametrize(("ref_id", "data", "formula", "reml"), LMER, ids=IDS)
def test_profiled_fit_matches_lmer_tightly(ref_id: str, data: str, formula: str,
                                           reml: bool) -> None:
    """The whole lmer fit, far tighter than test_fit_reference's cross-engine tolerances:
    both programs maximise the same profiled function of theta, and make_refs.R fits with
    tightened optimiser tolerances. Measured: log-likelihood within 1e-12, theta within
    3e-7, sigma and standard errors within 2e-7 relative, fixed effects within 1e-12
    relative; the tolerances below leave 10-100x room for the optimisers' stopping points."""
    ref = REFS[ref_id]
    fit = ngmm(formula, dataset(data), reml=reml)
    # R: logLik(fit); getME(fit, "theta"); sigma(fit); fixef(fit); sqrt(diag(vcov(fit)))
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-8)
    np.testing.assert_allclose(fit.theta.to_numpy(), values(ref["theta"]), rtol=0, atol=1e-5)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=1e-6)
    # 1e-8 on two fits: every LMER design is balanced, so beta-hat(theta) is the OLS estimate
    # whatever theta, and the fits' different stopping points in theta do not move it
    np.testing.assert_allclose(fit.fixef.to_numpy(), values(ref["fixef"]), rtol=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov.to_numpy())), values(ref["se"]),
                               rtol=1e-5)
    assert fit.diagnostics.converged and fit.diagnostics.hessian_pd


def test_large_crossed_blocks_take_the_blocked_factorisation() -> None:
    """Every linear Gaussian model is fitted through the profiled objective: with one
    grouping factor (any size, REML too) and small crossed blocks (up to DENSE_MAX_DIM
    coordinates) by the dense :class:`ProfiledLMM`; a larger crossed block (640 coordinates,
    40 outside the largest factor) by the blocked sparse factorisation of approx/blocked.py,
    which does not factorise the whole dense joint block."""
    from ngmm_formula.approx.blocked import BlockedLMM, profiled_objective
    from ngmm_formula.approx.profiled import use_profiled
    from ngmm_formula.fit import profiled

    rng = np.random.default_rng(11)
    n = 3000
    g, h = rng.integers(0, 600, n), rng.integers(0, 40, n)
    d = pd.DataFrame({"y": rng.normal(size=n) + rng.normal(size=600)[g] + rng.normal(size=40)[h],
                      "g": pd.Categorical(g), "h": pd.Categorical(h)})
    crossed = prepare("y ~ 1 + (1 | g) + (1 | h)", d, reml=True)
    assert crossed.problem.blocks.split is not None
    assert not use_profiled(crossed.problem)
    assert isinstance(profiled_objective(crossed.problem), BlockedLMM)
    module = LinearPredictor(crossed.problem, True)
    assert profiled(Objective(crossed.problem, crossed.family, crossed.approximation, module))
    small = prepare("y ~ 1 + (1 | g) + (1 | h)", d[d["g"].astype(int) < 150], reml=True)
    assert small.problem.blocks.split is not None  # 190 coordinates: dense, as a whole
    assert isinstance(profiled_objective(small.problem), ProfiledLMM)
    one_factor = prepare("y ~ 1 + (1 | g)", d, reml=True)  # a joint REML block of 601
    assert one_factor.problem.blocks.split is not None
    assert use_profiled(one_factor.problem)
    assert isinstance(profiled_objective(one_factor.problem), ProfiledLMM)
    for ref_id, data, formula, reml in LMER:
        assert use_profiled(prepared(data, formula, reml=reml).problem), ref_id


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula", ["y ~ x + (x | g)", "y ~ x + (1 | g) + (0 + x | g)",
                                     "y ~ x + (1 | g) + (1 | h)"])
def test_results_from_the_profiled_solution_equal_the_mode_search(
        formula: str, reml: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The modes and factor that a profiled fit hands the results
    (:meth:`ProfiledLMM.conditional`: per group under ML with one factor, one joint block in
    lme4's order otherwise, beta appended under REML) give the results of the full
    objective's own mode search at the same parameters (weights with zeros and an offset).
    Both are exact for a Gaussian model and differ only in the order of float64 operations
    (the profiled closed form against a Newton step and a Cholesky factor of H), so on any
    machine they agree to round-off: measured on 8 models below 3e-11 absolute in the
    log-likelihood (rel 4e-15, asserted 1e-12) and 3e-11 relative elsewhere (asserted 1e-9);
    the absolute floors (1e-12, 1e-14) cover entries that are zero up to round-off."""
    data = _weighted_data()
    direct = ngmm(formula, data, weights="w", offset="off", reml=reml)
    found = Objective.all_blocks

    def search(self: Objective) -> Any:
        self.solved = None  # the full objective's mode search
        return found(self)

    monkeypatch.setattr(Objective, "all_blocks", search)
    searched = ngmm(formula, data, weights="w", offset="off", reml=reml)
    assert direct.loglik == pytest.approx(searched.loglik, rel=1e-12)
    np.testing.assert_allclose(direct.fixef, searched.fixef, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(direct.vcov, searched.vcov, rtol=1e-9, atol=1e-14)
    for g, re in direct.ranef.items():
        other = searched.ranef[g]
        np.testing.assert_allclose(re.to_numpy(), other.to_numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(re.attrs["postVar"], other.attrs["postVar"], rtol=1e-9,
                                   atol=1e-14)
