"""The blocked sparse profiled objective (:mod:`ngmm_formula.approx.blocked`).

Both it and the dense :class:`~ngmm_formula.approx.profiled.ProfiledLMM` evaluate the same
closed form, so values, estimates and the diagonal blocks of :math:`H_\\theta^{-1}` agree to
round-off (1e-10 relative; measured below 1e-12) on layouts with weights, an offset, a vector
term in the first block or after it, and either factorisation of the Schur complement (dense
LAPACK or SuperLU, forced by the thresholds). Against lme4: ``devfun(theta)`` of the crossed
and nested reference fits (as test_profiled.py, 1e-10 relative).
"""

from __future__ import annotations

import numpy as np
import pytest

import ngmm_formula.approx.blocked as blocked
from ngmm_formula.approx.blocked import BlockedLMM
from ngmm_formula.approx.profiled import ProfiledLMM
from tests.approx.test_profiled import _weighted_data, prepared, values
from tests.references import REFS

FORMULAS = ["y ~ x + (1 | g) + (1 | h)", "y ~ x + (x | g) + (1 | h)", "y ~ 0 + (1 | g) + (x | h)",
            "y ~ x + (x | h) + (x || g)"]


def _theta(n: int) -> np.ndarray:
    theta = np.linspace(0.3, 1.2, n)
    if n > 2:
        theta[1] = -0.2
    return theta


@pytest.mark.parametrize("pairs", [True, False, "heavy", "mixed", "product", "sparse"])
@pytest.mark.parametrize("sparse_schur", [False, True])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula", FORMULAS)
def test_equals_the_dense_profiled_objective(formula: str, reml: bool, sparse_schur: bool,
                                             pairs: bool | str, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    if pairs is not True:  # past the pairs limits: the conditional variances by dense
        # products; C'C of scalar terms by the pairs matrix of the light levels plus a dense
        # rank-k update of the heavy ones (False: every level light, "heavy": every level
        # heavy, "mixed": 25 of the first term's 59 levels heavy), or by a sparse product per
        # evaluation ("product", with heavy levels too; "sparse": of any layout)
        monkeypatch.setattr(blocked, "PAIRS_MAX", -1)
        monkeypatch.setattr(blocked, "SCHUR_PAIRS_MAX", -1)
        monkeypatch.setattr(blocked, "HEAVY_FRACTION",
                            {"heavy": -1.0, "mixed": 0.3, "product": 0.3}.get(str(pairs), 2.0))
        if pairs == "product":
            monkeypatch.setattr(blocked, "LIGHT_PAIRS_MAX", -1)
        if pairs == "sparse":  # scalar terms through the sparse products of any layout
            monkeypatch.setattr(blocked, "PRODUCT_MAX_DIM", -1)
    if sparse_schur:  # SuperLU for every Schur complement
        monkeypatch.setattr(blocked, "DENSE_DIM", 0)
        monkeypatch.setattr(blocked, "DENSE_FILL", 2.0)
    else:
        monkeypatch.setattr(blocked, "DENSE_DIM", 10**9)
    p = prepared(_weighted_data(), formula, reml=reml, weights="w", offset="off").problem
    dense, blk = ProfiledLMM.of(p), BlockedLMM.of(p)
    theta = _theta(p.n_theta)
    value, _ = dense.value_and_grad(theta)
    assert blk.value(theta) == pytest.approx(value, rel=1e-10)
    a, b = dense.solve(theta), blk.solve(theta)
    assert b.loglik == pytest.approx(a.loglik, rel=1e-10)
    assert b.sigma == pytest.approx(a.sigma, rel=1e-10)
    np.testing.assert_allclose(b.beta, a.beta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.cov_beta, a.cov_beta, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(b.u, a.u.reshape(1, -1), rtol=1e-9, atol=1e-12)
    # the conditional variances: diagonal blocks of H^{-1}, term by term
    st = dense._pls(theta)
    Hinv = st.Hinv[0]
    _, factor = blk.conditional(theta, b.sigma)
    start = 0
    for k, (q, m) in enumerate(zip(p.q, p.n_levels)):
        idx = start + np.arange(m)[:, None] * q + np.arange(q)[None, :]
        start += q * m
        expect = Hinv[idx[:, :, None], idx[:, None, :]]
        np.testing.assert_allclose(factor.blocks[k], expect, rtol=1e-9, atol=1e-13)


def test_a_nonpositive_definite_point_is_minus_infinity() -> None:
    p = prepared(_weighted_data(), FORMULAS[1], reml=True, weights="w", offset="off").problem
    blk = BlockedLMM.of(p)
    assert blk.value(np.full(p.n_theta, np.nan)) == -np.inf


@pytest.mark.parametrize("point", ["optimum", "perturbed"])
@pytest.mark.parametrize(("ref_id", "data", "formula"), [
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, REML = TRUE)
    ("penicillin_reml", "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    # lmer(strength ~ 1 + (1 | batch/cask), Pastes, REML = TRUE)
    ("pastes_reml", "Pastes", "strength ~ 1 + (1 | batch/cask)"),
])
def test_devfun_matches_lme4(ref_id: str, data: str, formula: str, point: str) -> None:
    rec = REFS[ref_id]["devfun"][point]
    blk = BlockedLMM.of(prepared(data, formula, reml=True).problem)
    theta = values(rec["theta"])
    # R: dd <- update(fit, devFunOnly = TRUE); dd(theta)
    assert -2 * blk.value(theta) == pytest.approx(rec["value"], rel=1e-10)
    # R: sigma from the profiled pwrss (make_refs.R)
    assert blk.solve(theta).sigma == pytest.approx(rec["sigma_hat"], rel=1e-10)


@pytest.mark.parametrize(("ref_id", "data", "formula"), [
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, REML = TRUE)
    ("penicillin_reml", "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    # lmer(strength ~ 1 + (1 | batch/cask), Pastes, REML = TRUE)
    ("pastes_reml", "Pastes", "strength ~ 1 + (1 | batch/cask)"),
])
def test_whole_fit_matches_lme4(ref_id: str, data: str, formula: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit through the blocked route (forced: these blocks are small enough for the dense
    one) and its derivative-free optimiser, with the results' modes and conditional
    variances from the blocked factor, against lme4 at test_joint_blocks.py's tolerances
    (log-likelihood 1e-3 absolute, SDs 5e-3 and standard errors 1e-2 relative, modes and
    conditional variances 1e-3); measured: log-likelihood within 1e-8."""
    import pandas as pd

    from ngmm_formula import ngmm
    from ngmm_formula.approx import profiled
    from tests.references import dataset

    monkeypatch.setattr(profiled, "DENSE_MAX_DIM", 0)
    monkeypatch.setattr("ngmm_formula.model.DENSE_JOINT_MAX_DIM", 0)
    fit = ngmm(formula, dataset(data), reml=True)
    ref = REFS[ref_id]
    assert fit.diagnostics.converged and fit.diagnostics.hessian_pd
    # R: logLik(fit)
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-3)
    ours = fit.varcorr[fit.varcorr["group"] != "Residual"]
    theirs = pd.DataFrame(ref["varcorr"])
    theirs = theirs[(theirs["grp"] != "Residual") & theirs["var2"].isna()]
    # R: as.data.frame(VarCorr(fit))$sdcor
    np.testing.assert_allclose(ours["sdcor"], theirs["sdcor"], rtol=5e-3)
    # R: sqrt(diag(vcov(fit)))
    np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov.to_numpy())),
                               list(ref["se"].values()), rtol=1e-2)
    for factor, rec in ref["ranef"]["by_factor"].items():
        cols = rec["columns"]
        modes = np.array([[r["condval"][c] for c in cols] for r in rec["levels"]])
        condvar = np.array([r["condvar"] for r in rec["levels"]])
        re = fit.ranef[factor]
        # R: ranef(fit, condVar = TRUE)[[factor]] and its "postVar"
        np.testing.assert_allclose(re.to_numpy(), modes, rtol=1e-3,
                                   atol=1e-3 * np.abs(modes).max(), err_msg=factor)
        post = np.transpose(re.attrs["postVar"], (2, 0, 1))
        np.testing.assert_allclose(post, condvar, rtol=1e-3,
                                   atol=1e-3 * np.abs(condvar).max(), err_msg=factor)


@pytest.mark.parametrize("reml", [True, False])
def test_whole_fit_with_a_vector_first_block_equals_the_dense_route(
        reml: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights, an offset and a correlated (x | h) term in the first block: the fit through
    the blocked route (forced) equals the one through the dense profiled objective, which has
    an analytic gradient: log-likelihood 1e-6 absolute, fixed effects, SDs and standard
    errors 1e-3 relative (the derivative-free optimiser stops within 1e-5 in theta), and the
    modes and conditional variances 1e-3."""
    from ngmm_formula import ngmm
    from ngmm_formula.approx import profiled

    d = _weighted_data()
    formula = "y ~ x + (x | h) + (1 | g)"
    dense = ngmm(formula, d, reml=reml, weights="w", offset="off")
    monkeypatch.setattr(profiled, "DENSE_MAX_DIM", 0)
    monkeypatch.setattr("ngmm_formula.model.DENSE_JOINT_MAX_DIM", 0)
    forced = prepared(d, formula, reml=reml, weights="w", offset="off").problem
    assert isinstance(blocked.profiled_objective(forced), BlockedLMM)
    blk = ngmm(formula, d, reml=reml, weights="w", offset="off")
    assert blk.diagnostics.converged
    assert blk.loglik == pytest.approx(dense.loglik, abs=1e-6)
    np.testing.assert_allclose(blk.fixef, dense.fixef, rtol=1e-3)
    np.testing.assert_allclose(blk.varcorr["sdcor"], dense.varcorr["sdcor"], rtol=1e-3)
    np.testing.assert_allclose(np.diag(blk.vcov), np.diag(dense.vcov), rtol=2e-3)
    for g in ("h", "g"):
        a, b = dense.ranef[g].to_numpy(), blk.ranef[g].to_numpy()
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
        pa, pb = dense.ranef[g].attrs["postVar"], blk.ranef[g].attrs["postVar"]
        np.testing.assert_allclose(pb, pa, rtol=1e-3, atol=1e-3 * np.abs(pa).max())


def test_the_moment_start_of_scalar_terms() -> None:
    """The derivative-free optimiser's start for crossed and nested scalar terms
    (:meth:`BlockedLMM.moment_start`): the level means of the OLS residuals. On a simulated
    crossed model with many levels per term (1,500 and 300; true relative SDs 0.5, 0.3 and
    one of 0: the third term has no variance) it lies within 15% of the truth on the first
    two (the sampling error of 300 level means is about 8%; seed fixed, so the check is
    deterministic) and at the floor 0.05 for the third, off the bound; a vector-valued term
    gives None (lme4's start of 1 then)."""
    import pandas as pd

    rng = np.random.default_rng(3)
    n = 60_000
    a, b, c = rng.integers(0, 1500, n), rng.integers(0, 300, n), rng.integers(0, 50, n)
    x = rng.normal(size=n)
    y = x + rng.normal(0, 0.5, 1500)[a] + rng.normal(0, 0.3, 300)[b] + rng.normal(size=n)
    d = pd.DataFrame({"y": y, "x": x, "a": pd.Categorical(a), "b": pd.Categorical(b),
                      "c": pd.Categorical(c)})
    blk = BlockedLMM.of(prepared(d, "y ~ x + (1 | a) + (1 | b) + (1 | c)", reml=True).problem)
    start = blk.moment_start()
    assert start is not None
    np.testing.assert_allclose(start[:2], [0.5, 0.3], rtol=0.15)
    assert start[2] == 0.05
    vector = BlockedLMM.of(prepared(_weighted_data(), FORMULAS[1], reml=True, weights="w",
                                    offset="off").problem)
    assert vector.moment_start() is None


def test_the_derivative_free_optimiser_on_known_functions() -> None:
    """:func:`~ngmm_formula.fit.maximise_derivative_free` (nlopt's BOBYQA): a concave
    quadratic with its maximum inside the bounds is found to 1e-5 (BOBYQA's tolerances on
    theta are 1e-6 relative and 1e-8 absolute; the finite-difference Hessian of 1e-4 steps
    is exact on a quadratic but for round-off); one whose maximum lies beyond the lower
    bound stops on the bound and still counts as converged (lme4 drops the gradient of a
    parameter at its bound); -inf in part of the domain (a non-positive-definite system) is
    avoided and the maximum found (a stand-in of 1e300 there made BOBYQA stop far away)."""
    from ngmm_formula.fit import maximise_derivative_free

    centre = np.array([0.7, -0.4, 1.3])
    A = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])

    def quadratic(x: np.ndarray) -> float:
        return -float((x - centre) @ A @ (x - centre))

    lower = np.array([0.0, -np.inf, 0.0])
    opt = maximise_derivative_free(quadratic, np.ones(3), lower)
    np.testing.assert_allclose(opt.x, centre, atol=1e-5)
    assert opt.converged and opt.hessian_pd
    # round-off of the differences: 1e-16 |f| / h^2 with h = 1e-4, about 1e-8
    np.testing.assert_allclose(opt.hessian, -2 * A, atol=1e-6)

    def beyond(x: np.ndarray) -> float:  # maximum at x0 = -0.5 < 0
        return -float((x[0] + 0.5) ** 2 + (x[1] - 0.2) ** 2)

    opt = maximise_derivative_free(beyond, np.ones(2), np.zeros(2))
    # BOBYQA projects its steps onto the bounds, so it lands on 0 exactly here; 1e-8 is its
    # xtol_abs, room for a last step stopping short on other arithmetic
    assert opt.x[0] == pytest.approx(0.0, abs=1e-8)
    assert opt.x[1] == pytest.approx(0.2, abs=1e-5)
    assert opt.converged

    def walled(x: np.ndarray) -> float:  # -inf past 2 in the first coordinate
        return -np.inf if x[0] > 2.0 else quadratic(x)

    opt = maximise_derivative_free(walled, np.array([1.9, 0.0, 1.0]), lower)
    np.testing.assert_allclose(opt.x, centre, atol=1e-5)
