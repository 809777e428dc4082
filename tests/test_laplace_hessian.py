"""The exact Hessian of the Laplace approximation (``fit.laplace_hessian``,
:mod:`ngmm_formula.approx.curvature`) against central finite differences of the exact
(autograd) gradient, and the fits that use it.

Tolerances: central differences with the fits' relative step 1e-4 carry a truncation error
of about the step squared times the third derivative, measured at most 5e-8 of the largest
entry on these models (and 4e-11 with a step of 1e-5: the closed form is exact, the
differences are not); asserted 1e-6 of the largest entry. Everything is float64 with the
conditional modes to 1e-10, so the margin does not depend on the machine.
"""

from __future__ import annotations

import numpy as np
import pytest

import ngmm_formula.fit as fit_module
from ngmm_formula import ngmm
from ngmm_formula.api import prepare
from ngmm_formula.families import Binomial
from ngmm_formula.fit import Objective
from ngmm_formula.model import LinearPredictor
from tests.test_reduced_rank import irt_data


def _students(seed: int = 7, n_students: int = 150, n_items: int = 12, per: int = 5):
    """Simulated item responses, each student answering ``per`` of ``n_items`` items, with a
    row covariate ``x`` and a count response ``k``."""
    rng = np.random.default_rng(seed)
    df, _, _ = irt_data(n_students=n_students, n_items=n_items, d=2, seed=seed)
    keep = np.concatenate([rng.choice(n_items, per, replace=False) + n_items * s
                           for s in range(n_students)])
    df = df.iloc[np.sort(keep)].reset_index(drop=True)
    df["x"] = rng.normal(size=len(df))
    df["k"] = rng.poisson(np.exp(0.3 + 0.5 * df["y"]))
    return df


def _objective(formula: str, df, family):  # type: ignore[no-untyped-def]
    """The Laplace objective at the GLM and theta start, moved off the maximum."""
    p = prepare(formula, df, family, approx="laplace")
    module = LinearPredictor(p.problem, False)
    obj = Objective(p.problem, p.family, p.approximation, module)
    fit_module.glm_start(p.problem, p.family, module)
    fit_module.theta_start(obj)
    x = fit_module._get(module)
    return obj, x + 0.05 * np.random.default_rng(1).normal(size=x.size)


@pytest.mark.parametrize(("formula", "family"), [
    ("y ~ 0 + item + rr(0 + item | id, d = 2)", "binomial"),
    ("y ~ 0 + item + x + rr(0 + item | id, d = 2)", "binomial"),
    ("y ~ 0 + item + rr(0 + item | id, d = 1)", "binomial"),
    ("y ~ 0 + item + (1 | id)", "binomial"),
    ("y ~ x + (1 + x | id)", "binomial"),
    ("y ~ x + (1 | id) + (0 + x | id)", "binomial"),
    ("k ~ x + (1 + x | id)", "poisson"),
    ("k ~ 0 + item + rr(0 + item | id, d = 2)", "poisson"),
    ("y ~ 0 + item + rr(0 + item | id, d = 2)", "probit"),
])
def test_the_exact_laplace_hessian_equals_finite_differences(formula: str, family: str) -> None:
    """Vector, reduced-rank and scalar random effects (the fused scalar route), a covariate
    beside item indicators, two terms of one factor, canonical and non-canonical links
    (the probit's third and fourth derivatives by autograd). Measured: at most 5e-8 of the
    largest entry."""
    df = _students()
    fam = Binomial(link="probit") if family == "probit" else family
    obj, x = _objective(formula, df, fam)
    exact = fit_module.laplace_hessian(obj)
    assert exact is not None
    H = fit_module.fd_hessian(lambda z: fit_module._evaluate(obj, z), x)
    np.testing.assert_allclose(exact(x), H, rtol=0, atol=1e-6 * np.abs(H).max())


def test_prior_weights_and_offsets() -> None:
    """Binomial totals as prior weights (cbpp) and a Poisson offset: measured 3e-9 and 3e-8
    of the largest entry, against 1e-6 asserted. The gap is the central differences'
    truncation error (step 1e-4); another machine's rounding of these float64 sums moves
    either side by about 1e-16 relative, 1e-12 after the differences' division by the step,
    far inside the margin."""
    from ngmm_formula import datasets

    cases = [("cbind(incidence, size - incidence) ~ period + (1 | herd)",
              datasets.load("cbpp"), "binomial")]
    df = datasets.simulate_grouped(n_groups=60, n_per_group=20, family="poisson", seed=1)
    cases.append(("y ~ x1 + offset(off) + (1 + x1 | g)", df.assign(off=0.3 * df["x2"]),
                  "poisson"))
    for formula, data, family in cases:
        obj, x = _objective(formula, data, family)
        H = fit_module.fd_hessian(lambda z, obj=obj: fit_module._evaluate(obj, z), x)
        np.testing.assert_allclose(fit_module.laplace_hessian(obj)(x),  # type: ignore[misc]
                                   H, rtol=0, atol=1e-6 * np.abs(H).max())


def test_pieces_add_up(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An objective evaluated in pieces of whole blocks (``fit.CHUNK_ROWS``) gives the same
    Hessian as in one piece: each block's part belongs to its piece (float64 sums in another
    order: measured 1e-15 relative, asserted 1e-12 of the largest entry, a margin of 1,000
    that no machine's rounding of these few hundred terms per entry approaches)."""
    df = _students()
    formula = "y ~ 0 + item + x + rr(0 + item | id, d = 2)"
    obj, x = _objective(formula, df, "binomial")
    whole = fit_module.laplace_hessian(obj)(x)  # type: ignore[misc]
    monkeypatch.setattr(fit_module, "CHUNK_ROWS", 200)
    obj, x = _objective(formula, df, "binomial")
    assert len(obj.chunks()) > 3
    pieces = fit_module.laplace_hessian(obj)(x)  # type: ignore[misc]
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-12 * np.abs(whole).max())


def test_a_batch_holds_blocks_of_different_widths(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Students answering 2 to 9 items touch different numbers of parameters; tiny batches
    (``LAPLACE_HESSIAN_BATCH_ENTRIES``) split them by width: the same Hessian (each entry the
    same float64 terms summed in another order: rounding of about 1e-16 per term times a
    few hundred terms, far below the asserted 1e-12 of the largest entry)."""
    rng = np.random.default_rng(3)
    df, _, _ = irt_data(n_students=120, n_items=10, d=2, seed=3)
    keep = np.concatenate([rng.choice(10, rng.integers(2, 10), replace=False) + 10 * s
                           for s in range(120)])
    df = df.iloc[np.sort(keep)].reset_index(drop=True)
    obj, x = _objective("y ~ 0 + item + rr(0 + item | id, d = 2)", df, "binomial")
    H = fit_module.laplace_hessian(obj)(x)  # type: ignore[misc]
    monkeypatch.setattr(fit_module, "LAPLACE_HESSIAN_BATCH_ENTRIES", 50)
    np.testing.assert_allclose(fit_module.laplace_hessian(obj)(x), H,  # type: ignore[misc]
                               rtol=0, atol=1e-12 * np.abs(H).max())


def test_fits_with_the_exact_hessian_end_where_finite_differences_end(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The fit's Newton polish and standard errors from the exact Hessian against those of
    finite differences (the exact one switched off): both end below the gradient tolerance
    at a strictly concave maximum, so the log-likelihoods agree to second order in the
    gradients (measured 6e-12; asserted 1e-8, a margin that another machine's optimiser
    path, stopping anywhere below the same gradient tolerance, keeps) and the standard
    errors to the differences' error (measured 1.1e-8 relative;
    asserted 1e-6); the exact one took 71 evaluations, the other 222 (two Hessians of
    finite differences). 400 students answering all of 25 items: fewer items per student
    let an item's loadings run off (a warning) to maxima that differ between paths."""
    df, _, _ = irt_data(n_students=400, n_items=25, d=2, seed=5)
    df["x"] = np.random.default_rng(0).normal(size=len(df))
    formula = "y ~ 0 + item + x + rr(0 + item | id, d = 2)"
    exact = ngmm(formula, df, "binomial", approx="laplace")
    monkeypatch.setattr(fit_module, "laplace_hessian", lambda obj: None)
    fd = ngmm(formula, df, "binomial", approx="laplace")
    assert exact.diagnostics.converged and fd.diagnostics.converged
    assert exact.diagnostics.evaluations < fd.diagnostics.evaluations
    assert exact.loglik == pytest.approx(fd.loglik, abs=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(exact.vcov.to_numpy())),
                               np.sqrt(np.diag(fd.vcov.to_numpy())), rtol=1e-6)
    np.testing.assert_allclose(exact.loadings()["std_error"], fd.loadings()["std_error"],
                               rtol=1e-6)


@pytest.mark.parametrize(("formula", "family", "approx"), [
    ("y ~ 0 + item + rr(0 + item | id, d = 2)", "binomial", "agq"),  # quadrature
    ("y ~ x + (1 | id) + (1 | item)", "binomial", "laplace"),  # crossed: a joint block
    ("k ~ x + (1 | id)", "negative_binomial", "laplace"),  # a dispersion parameter
])
def test_where_the_exact_hessian_does_not_apply(formula: str, family: str, approx: str
                                                ) -> None:
    """Quadrature rules, joint blocks and families with a dispersion parameter keep finite
    differences (or BHHH's information): None."""
    df = _students()
    p = prepare(formula, df, family, approx=approx)
    module = LinearPredictor(p.problem, p.family.has_dispersion)
    obj = Objective(p.problem, p.family, p.approximation, module)
    assert fit_module.laplace_hessian(obj) is None


def test_warm_steps_turn_away_from_a_saddle() -> None:
    """Greenstadt's modification (``fit._warm_matrix``) of an indefinite Hessian keeps its
    eigenvectors and the absolute values of its eigenvalues (floored), so the Newton step
    ascends; a negative definite Hessian is used as it is (and reported as exact). The
    eigenvalues are compared to 1e-9 relative plus 1e-13 absolute: an eigensolver's absolute
    error is a few times machine epsilon times the matrix's norm (5), about 1e-15 on any
    machine (measured 4e-17 here), which for the floored 5e-6 is up to about 1e-9 relative,
    so that one needs the absolute term."""
    rng = np.random.default_rng(0)
    V, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    H = (V * np.array([-5.0, -1.0, 0.5, -1e-12])) @ V.T  # one direction curves up

    def curvature(x: np.ndarray, by: object) -> np.ndarray:
        assert by is None
        return H
    M, exact = fit_module._warm_matrix(curvature, np.zeros(4), None, True)
    assert not exact
    lam = np.sort(np.linalg.eigvalsh(-M))
    np.testing.assert_allclose(lam, [5e-6, 0.5, 1.0, 5.0], rtol=1e-9, atol=1e-13)
    g = rng.normal(size=4)
    assert g @ np.linalg.solve(-M, g) > 0  # an ascent direction
    D = -(V * np.array([5.0, 1.0, 0.5, 2.0])) @ V.T
    M, exact = fit_module._warm_matrix(lambda x, by: D, np.zeros(4), None, True)
    assert exact and M is D
