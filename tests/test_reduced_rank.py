"""Reduced-rank random effects ``rr(expr | group, d = K)`` (item-response models).

* Grammar and bad input: the term's syntax (glmmTMB's), ``d`` checked, the clear errors of
  issue 16.
* Integrals: for d = 1 and 2, the per-student log marginal likelihood of the engine's
  adaptive Gauss--Hermite and truncated rules against a brute-force integral computed with
  scipy alone (``quad`` / ``dblquad`` over the latent z with N(0, I) weight, relative 1e-11),
  at fixed parameters. AGQ is exact for polynomials of degree 2K - 1 times the Gaussian and
  converges geometrically for these smooth integrands; the truncated rule's error is the
  log of the integrand's mass outside the box u_hat + L [-M, M]^d, which the test computes
  with scipy in the same coordinates, to 1 % (the rest is the trapezoid's endpoint term, as
  for scalar effects in tests/approx/test_rules.py: about h^2/12 G'(M), under 0.5 % of the
  tail at M <= 2.5 and K = 41).
* Results: loadings with a positive diagonal and standard errors, factor scores, save/load.

Gradients of the rr objective (Laplace, AGQ, truncated, d = 2) are checked by gradcheck in
tests/test_objective.py (GRAD_CASES ``*_rr_*``).
"""

from __future__ import annotations

import math
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, special

from ngmm_formula import ngmm
from ngmm_formula.api import Prepared, prepare
from ngmm_formula.errors import (
    ApproximationWarning,
    DataError,
    FormulaError,
    NGMMError,
    NGMMWarning,
)
from ngmm_formula.fit import Objective
from ngmm_formula.formula import parse_formula
from ngmm_formula.model import LinearPredictor


def irt_data(n_students: int = 60, n_items: int = 5, d: int = 2, seed: int = 3
             ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Binary responses of every student to every item from a d-dimensional 2PL model."""
    rng = np.random.default_rng(seed)
    loadings = np.tril(rng.uniform(0.5, 1.5, (n_items, d)))
    easiness = rng.normal(0.0, 1.0, n_items)
    z = rng.standard_normal((n_students, d))
    eta = easiness[None, :] + z @ loadings.T
    y = rng.binomial(1, special.expit(eta))
    student = np.repeat(np.arange(n_students), n_items)
    item = np.tile(np.arange(n_items), n_students)
    df = pd.DataFrame({"id": pd.Categorical([f"s{s:03d}" for s in student]),
                       "item": pd.Categorical([f"i{i}" for i in item]),
                       "y": y.reshape(-1).astype(float)})
    return df, loadings, easiness


# ------------------------------------------------------------------------------------------
# grammar and bad input


def test_rr_term_is_parsed_with_its_rank() -> None:
    p = parse_formula("y ~ 0 + item + rr(0 + item | id, d = 1) + (1 | school)")
    rr, plain = p.bars
    assert (rr.expr, rr.group, rr.rank) == ("0 + item", "id", 1)
    assert plain.rank is None
    assert str(rr) == "rr(0 + item | id, d = 1)"
    assert parse_formula("y ~ rr(0 + item | id)").bars[0].rank == 2  # glmmTMB's default


@pytest.mark.parametrize(("formula", "message"), [
    ("y ~ rr(0 + item | id, d = 0)", r"d in rr\(\) must be a positive integer"),
    ("y ~ rr(0 + item | id, d = 1.5)", r"d in rr\(\) must be a positive integer"),
    ("y ~ rr(0 + item | id, d = k)", r"d in rr\(\) must be a positive integer"),
    ("y ~ rr(0 + item | id, k = 2)", r"second argument is d"),
    ("y ~ rr(0 + item || id)", "exactly one '|'"),
    ("y ~ rr(0 + item | a/b)", "single grouping factor"),
    ("y ~ rr(0 + item)", "exactly one '|'"),
    ("y ~ x - rr(0 + item | id)", "cannot be subtracted"),
])
def test_bad_rr_syntax_names_the_problem(formula: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message):
        parse_formula(formula)


def test_d_larger_than_the_number_of_columns() -> None:
    df, _, _ = irt_data(n_items=3)
    with pytest.raises(DataError, match=r"d = 4 in rr\(0 \+ item \| id, d = 4\).*3 column"):
        ngmm("y ~ 0 + item + rr(0 + item | id, d = 4)", df, "binomial")


def test_fewer_levels_than_columns() -> None:
    df, _, _ = irt_data(n_students=3, n_items=5)
    with pytest.raises(DataError, match="'id' has only 3 level"):
        ngmm("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial")


def test_item_with_identical_responses() -> None:
    df, _, _ = irt_data()
    df.loc[df["item"] == "i2", "y"] = 1.0
    with pytest.raises(DataError, match=r"column 'itemi2' of rr\(0 \+ item \| id, d = 1\)"):
        ngmm("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial")


def test_variational_and_reml_refused() -> None:
    df, _, _ = irt_data()
    with pytest.raises(NGMMError, match="variational.*reduced-rank"):
        ngmm("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial", approx="variational")
    df["g"] = df["y"] + np.random.default_rng(0).standard_normal(len(df))
    with pytest.raises(NGMMError, match="REML is not available with reduced-rank"):
        ngmm("g ~ 0 + item + rr(0 + item | id, d = 1)", df, "gaussian", reml=True)


# ------------------------------------------------------------------------------------------
# integrals against a brute-force quadrature


PARAMS = {1: (np.array([0.4, -0.3, 0.8, 0.1, -0.6]), np.array([1.1, 0.7, 1.4, 0.9, 0.5])),
          2: (np.array([0.4, -0.3, 0.8, 0.1, -0.6]),
              np.array([[1.1, 0.0], [0.7, 0.9], [1.4, -0.4], [0.6, 1.2], [0.5, 0.3]]))}
STUDENTS = (0, 7, 19)


@cache
def _prepared(d: int, approx: str, nagq: int | None = None, truncation: float | None = None,
              points: int | None = None) -> Prepared:
    df, _, _ = irt_data(d=2)
    return prepare(f"y ~ 0 + item + rr(0 + item | id, d = {d})", df, "binomial",
                   approx=approx, nagq=nagq, truncation=truncation, points=points)


def _engine(p: Prepared, d: int) -> tuple[np.ndarray, Objective]:
    """Per-student log marginal likelihoods at PARAMS[d], and the objective (its modes)."""
    beta, loadings = PARAMS[d]
    L = loadings.reshape(5, d)
    module = LinearPredictor(p.problem, False)
    theta = [L[i, j] for j in range(d) for i in range(j, 5)]
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A, beta)))
        module.theta.copy_(torch.as_tensor(theta))
        obj = Objective(p.problem, p.family, p.approximation, module)
        return obj.per_block().numpy(), obj


def _log_integrand(d: int, student: int):  # type: ignore[no-untyped-def]
    """z -> log p(y_s | z) + log N(z; 0, I), with numpy only."""
    df, _, _ = irt_data(d=2)
    y = df["y"].to_numpy()[student * 5:(student + 1) * 5]
    beta, loadings = PARAMS[d]
    L = loadings.reshape(5, d)

    def h(*z: float) -> float:
        eta = beta + L @ np.array(z)
        return float(np.sum(y * eta - np.logaddexp(0.0, eta))
                     - 0.5 * np.dot(z, z) - 0.5 * d * math.log(2 * math.pi))
    return h


@cache
def brute_force(d: int, student: int) -> float:
    """log of the integral over all of R^d (scipy, relative 1e-11)."""
    h = _log_integrand(d, student)
    if d == 1:
        val, _ = integrate.quad(lambda a: math.exp(h(a)), -12, 12, epsabs=0, epsrel=1e-12,
                                limit=200)
    else:
        val, _ = integrate.dblquad(lambda b, a: math.exp(h(a, b)), -12, 12, -12, 12,
                                   epsabs=0, epsrel=1e-11)
    return math.log(val)


@pytest.mark.parametrize("d", [1, 2])
def test_agq_converges_to_the_brute_force_integral(d: int) -> None:
    errors = []
    for k in (1, 3, 5, 9, 15):
        approx = "laplace" if k == 1 else "agq"
        ll, _ = _engine(_prepared(d, approx, nagq=None if k == 1 else k), d)
        errors.append(max(abs(ll[s] - brute_force(d, s)) for s in STUDENTS))
    assert errors[0] > 1e-3  # Laplace is an approximation here
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors


def _inside_box(d: int, student: int, centre: np.ndarray, Lt: np.ndarray, M: float) -> float:
    """log of the integral over centre + Lt [-M, M]^d (scipy, in the box's coordinates)."""
    h = _log_integrand(d, student)
    det = abs(np.linalg.det(Lt))
    if d == 1:
        val, _ = integrate.quad(lambda t: math.exp(h(*(centre + Lt @ [t]))), -M, M,
                                epsabs=0, epsrel=1e-12)
    else:
        val, _ = integrate.dblquad(lambda b, a: math.exp(h(*(centre + Lt @ [a, b]))),
                                   -M, M, -M, M, epsabs=0, epsrel=1e-11)
    return math.log(val * det)


@pytest.mark.parametrize("d", [1, 2])
def test_truncated_rule_converges_and_its_error_is_the_mass_outside_the_box(d: int) -> None:
    errors = []
    for M in (1.5, 2.5, 3.5, 5.0, 7.0):
        ll, obj = _engine(_prepared(d, "truncated", truncation=M, points=41), d)
        errors.append(max(abs(ll[s] - brute_force(d, s)) for s in STUDENTS))
        if M > 3.0:
            continue
        # the error is log(mass inside u_hat + L [-M, M]^d / total), L L' = H^{-1}
        assert obj.mode is not None
        v = obj.mode.v.numpy()
        for s in STUDENTS:
            R = obj.mode.factor.chol[s].numpy()  # H = R R'
            inside = _inside_box(d, s, v[s], np.linalg.inv(R).T, M)
            tail = brute_force(d, s) - inside
            err = brute_force(d, s) - ll[s]
            assert err == pytest.approx(tail, rel=1e-2), (M, s)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors


# ------------------------------------------------------------------------------------------
# results


@pytest.fixture(scope="module")
def irt_fit():  # type: ignore[no-untyped-def]
    df, loadings, easiness = irt_data(n_students=400, n_items=6, d=1, seed=5)
    return ngmm("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial", approx="laplace"), \
        loadings, easiness


def test_loadings_have_a_positive_diagonal_and_standard_errors(irt_fit) -> None:  # type: ignore[no-untyped-def]
    fit, loadings, _ = irt_fit
    lt = fit.loadings()
    assert list(lt.columns) == ["column", "factor", "estimate", "std_error"]
    assert len(lt) == 6 and lt["estimate"].iloc[0] > 0
    assert (lt["std_error"] > 0).all()
    # 400 students: the estimates are within 4 standard errors of the truth
    z = (lt["estimate"].to_numpy() - loadings[:, 0]) / lt["std_error"].to_numpy()
    assert np.all(np.abs(z) < 4), z
    # the implied covariance of the item effects is Lambda Lambda'
    est = lt["estimate"].to_numpy()
    vc = fit.varcorr[fit.varcorr["var2"].isna() & (fit.varcorr["group"] == "id")]
    np.testing.assert_allclose(vc["vcov"].to_numpy(), est**2, rtol=1e-12)


def test_prediction_errors_from_the_factored_conditional_covariance(  # type: ignore[no-untyped-def]
        irt_fit, monkeypatch) -> None:
    """predict_se and the posterior draws of a reduced-rank term take
    (Z Lambda) Var(u | y) (Z Lambda)', which equals z' postVar z (postVar = Lambda Var(u | y)
    Lambda'); above POSTVAR_MAX_ENTRIES the fit stores no postVar and still gives them."""
    import ngmm_formula.assemble as assemble
    from ngmm_formula.residuals import simulate_residuals

    fit, _, _ = irt_fit
    df, _, _ = irt_data(n_students=400, n_items=6, d=1, seed=5)
    P = fit.ranef["id"].attrs["postVar"]  # (q, q, levels)
    t = fit.design.re_terms[0]
    Z = t.Zraw.dense()
    X = fit.design.X
    explicit = np.einsum("ij,jk,ik->i", X, fit.vcov.to_numpy(), X) + np.einsum(
        "ij,ijk,ik->i", Z, np.transpose(P, (2, 0, 1))[t.group_index], Z)
    # the same quadratic forms in another order: float64 rounding of sums of 6^2 terms
    np.testing.assert_allclose(fit.predict_se(), np.sqrt(explicit), rtol=1e-12)
    monkeypatch.setattr(assemble, "POSTVAR_MAX_ENTRIES", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = ngmm("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial",
                   approx="laplace")
    assert "postVar" not in big.ranef["id"].attrs
    # the same fit (the stored postVar does not enter it) and the same factored arithmetic:
    # equal bits on any machine; 1e-12 leaves room for nothing but that
    np.testing.assert_allclose(big.predict_se(), fit.predict_se(), rtol=1e-12)
    assert simulate_residuals(big, nsim=20).residuals.shape == (len(df),)
    with pytest.raises(NGMMError, match="reduced-rank term too large"):
        big.plot_caterpillar()


def test_scores_and_new_students(irt_fit) -> None:  # type: ignore[no-untyped-def]
    fit, _, _ = irt_fit
    sc = fit.scores()
    assert sc.shape == (400, 1) and list(sc.columns) == ["F1"]
    assert sc.attrs["condVar"].shape == (400, 1, 1)
    assert (sc.attrs["condVar"] > 0).all()
    # the random effects of the items are the scores times the loadings
    b = fit.ranef["id"].to_numpy()
    np.testing.assert_allclose(b, sc.to_numpy() @ fit.loadings()["estimate"].to_numpy()[None, :],
                               rtol=1e-10, atol=1e-12)
    # a new student gets the population prediction (z = 0)
    df, _, _ = irt_data(n_students=400, n_items=6, d=1, seed=5)
    new = df.head(6).assign(id="new student")
    pop = fit.predict(new, re_form="NA")
    np.testing.assert_allclose(fit.predict(new, allow_new_levels=True), pop, rtol=1e-12)


def test_regular_fit_has_no_large_loading_warning(irt_fit) -> None:  # type: ignore[no-untyped-def]
    assert not [m for m in irt_fit[0].diagnostics.messages if "large reduced-rank" in m]


@pytest.mark.parametrize("approx", ["laplace", "agq"])
def test_step_item_warns_of_its_large_loading(approx: str) -> None:
    """An item answered 1 exactly by the students above a cut in z (a Guttman item): its
    loading runs off (Laplace 36, AGQ 17 on this draw); one ApproximationWarning per fit,
    naming the item (the Laplace one recommends AGQ), recorded on the diagnostics."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal(150)
    eta = np.array([0.0, -0.5, 0.5, 0.0, 0.3]) + z[:, None] * np.array([1.0, 1.2, 0.8, 1, 1])
    y = (rng.random((150, 5)) < special.expit(eta)).astype(float)
    y[:, 3] = z > 0.3  # the step item
    df = pd.DataFrame({"id": pd.Categorical(np.repeat([f"s{s:03d}" for s in range(150)], 5)),
                       "item": pd.Categorical(np.tile([f"i{i}" for i in range(5)], 150)),
                       "y": y.reshape(-1)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = ngmm("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial", approx=approx)
    ours = [w for w in caught if issubclass(w.category, NGMMWarning)]
    assert [w.category for w in ours] == [ApproximationWarning], [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "i3 (" in message and "|loading| > 10" in message
    assert ("approx='agq'" in message) == (approx == "laplace")
    assert message in fit.diagnostics.messages
    assert np.abs(fit.reduced_rank[0].loadings[3]).max() > 10


def test_reduced_rank_fit_round_trips(irt_fit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ngmm_formula import load

    fit, _, _ = irt_fit
    fit.save(tmp_path / "rr.ngmm")
    back = load(tmp_path / "rr.ngmm")
    pd.testing.assert_frame_equal(back.loadings(), fit.loadings())
    pd.testing.assert_frame_equal(back.scores(), fit.scores())
    df, _, _ = irt_data(n_students=400, n_items=6, d=1, seed=5)
    np.testing.assert_array_equal(back.predict(df), fit.predict(df))


def test_no_rr_term() -> None:
    df, _, _ = irt_data()
    fit = ngmm("y ~ 0 + item + (1 | id)", df, "binomial")
    with pytest.raises(NGMMError, match="no reduced-rank term"):
        fit.loadings()


# ------------------------------------------------------------------------------------------
# the sparse-row design of reduced-rank terms


def test_rr_design_is_stored_by_rows_not_n_by_items() -> None:
    from ngmm_formula.design import SparseRows, re_effect, re_quadratic

    df, _, _ = irt_data(n_students=50, n_items=40, d=1)
    p = prepare("y ~ 0 + item + rr(0 + item | id, d = 1)", df, "binomial")
    Z = p.design.re_terms[0].Zraw
    assert isinstance(Z, SparseRows)
    assert Z.values.shape == (len(df), 1) and Z.n_columns == 40  # one item per response
    dense = Z.dense()
    np.testing.assert_array_equal(dense, pd.get_dummies(df["item"]).to_numpy(dtype=float))
    rng = np.random.default_rng(0)
    gi = p.design.re_terms[0].group_index.astype(np.int64).copy()
    gi[:7] = -1  # unknown levels contribute nothing
    b = rng.standard_normal((50, 40))
    expected = np.where(gi >= 0, (dense * b[np.maximum(gi, 0)]).sum(1), 0.0)
    np.testing.assert_allclose(re_effect(Z, gi, b), expected, rtol=1e-14)
    S = rng.standard_normal((40, 40))
    np.testing.assert_allclose(re_quadratic(Z, S), np.einsum("ij,jk,ik->i", dense, S, dense),
                               rtol=1e-14)
    V = rng.standard_normal((50, 40, 40))
    np.testing.assert_allclose(
        re_quadratic(Z, V, gi),
        np.where(gi >= 0, np.einsum("ij,ijk,ik->i", dense, V[np.maximum(gi, 0)], dense), 0.0),
        rtol=1e-13)


def test_confint_gives_wald_intervals_of_the_loadings(irt_fit) -> None:  # type: ignore[no-untyped-def]
    fit, _, _ = irt_fit
    ci = fit.confint()
    lt = fit.loadings()
    rows = [f"load_{c}.F1|id" for c in lt["column"]]
    np.testing.assert_allclose(ci.loc[rows, "2.5 %"],
                               lt["estimate"] - 1.959963984540054 * lt["std_error"], rtol=1e-12)
    with pytest.raises(NGMMError, match="not available for reduced-rank terms"):
        fit.confint(method="profile")


def test_scores_of_new_students_from_their_responses(irt_fit) -> None:  # type: ignore[no-untyped-def]
    """Scoring the training rows again at the fitted parameters gives the fit's own scores,
    conditional variances and, summed over students, its log-likelihood (the same mode
    search and rule); renamed students answering alike get the same scores."""
    fit, _, _ = irt_fit
    df, _, _ = irt_data(n_students=400, n_items=6, d=1, seed=5)
    again = fit.scores(newdata=df)
    own = fit.scores()
    np.testing.assert_allclose(again.loc[own.index].to_numpy(), own.to_numpy(), atol=1e-10)
    np.testing.assert_allclose(again.attrs["condVar"], own.attrs["condVar"], rtol=1e-9)
    assert again.attrs["logLik"].sum() == pytest.approx(fit.loglik, rel=1e-10)
    new = df[df["id"].isin(["s000", "s001"])].assign(id=lambda d: "new " + d["id"].astype(str))
    scored = fit.scores(newdata=new)
    assert list(scored.index) == ["new s000", "new s001"]
    np.testing.assert_allclose(scored.to_numpy(), own.loc[["s000", "s001"]].to_numpy(),
                               atol=1e-10)


# ------------------------------------------------------------------------------------------
# BHHH information for large per-group fits


@pytest.mark.parametrize("formula", ["y ~ 0 + item + rr(0 + item | id, d = 2)",
                                     "y ~ 1 + item + (1 + item | id)"])
def test_score_information_is_the_sum_of_per_student_score_products(formula: str) -> None:
    """Objective.score_information against the per-block gradients by autograd, block by
    block (exact up to round-off: both differentiate the same per-block approximation)."""
    from ngmm_formula.fit import _get, _params

    df, _, _ = irt_data(n_students=12, n_items=3, d=2, seed=4)
    p = prepare(formula, df, "binomial", approx="agq", nagq=3)
    module = LinearPredictor(p.problem, False)
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for par in _params(module):
            par.copy_(0.5 + 0.3 * torch.as_tensor(rng.standard_normal(par.shape)))
    obj = Objective(p.problem, p.family, p.approximation, module)
    info = obj.score_information()
    ll = obj.per_block(warm=False)
    params = _params(module)
    scores = np.array([np.concatenate([g.numpy().ravel() for g in torch.autograd.grad(
        ll[b], params, retain_graph=True)]) for b in range(ll.numel())])
    assert info.shape == (_get(module).size,) * 2
    np.testing.assert_allclose(info, scores.T @ scores, rtol=1e-9, atol=1e-12)


def test_large_per_group_fits_take_the_score_information(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Above SCORE_INFORMATION_MIN_WORK a quadrature fit's standard errors come from BHHH's
    information: close to the observed Hessian's on 1,500 simulated students where the
    integral is accurate (AGQ, 9 nodes; measured within 1.2 % and 2.0 %; asserted 5 %: the
    two estimate the same information, their difference is of order 1/sqrt(students) and
    fixed by the seed), with far fewer evaluations. A Laplace fit keeps the Hessian."""
    import ngmm_formula.fit as fit_module

    df, _, _ = irt_data(n_students=1500, n_items=5, d=1, seed=8)
    formula = "y ~ 0 + item + rr(0 + item | id, d = 1)"
    observed = ngmm(formula, df, "binomial", approx="agq", nagq=9)
    monkeypatch.setattr(fit_module, "SCORE_INFORMATION_MIN_WORK", 0)
    bhhh = ngmm(formula, df, "binomial", approx="agq", nagq=9)
    lap = prepare(formula, df, "binomial", approx="laplace")
    lap_obj = Objective(lap.problem, lap.family, lap.approximation,
                        LinearPredictor(lap.problem, False))
    assert fit_module._score_information_hessian(lap_obj) is None
    assert bhhh.loglik == pytest.approx(observed.loglik, abs=1e-6)
    assert bhhh.diagnostics.evaluations < observed.diagnostics.evaluations
    se_obs = np.sqrt(np.diag(observed.vcov.to_numpy()))
    se_bhhh = np.sqrt(np.diag(bhhh.vcov.to_numpy()))
    np.testing.assert_allclose(se_bhhh, se_obs, rtol=0.05)
    np.testing.assert_allclose(bhhh.loadings()["std_error"], observed.loadings()["std_error"],
                               rtol=0.05)


def test_many_parameter_quadrature_fits_are_steered_by_bhhh(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A 9-node AGQ fit of 74 parameters (25 items, d = 2), below the size where BHHH's
    information replaces its Hessian, is steered by BHHH's information (its Newton polish;
    the finite-difference Hessian once, at the end) and ends where the unsteered fit ends:
    both stop at a gradient below 1e-6 at a strictly concave maximum, so the
    log-likelihoods agree to second order in it (measured 6e-11) and the standard errors,
    from finite-difference Hessians of points within about 1e-6 of each other, to about
    1e-6 relative (measured 1.6e-6; asserted 1e-4), with fewer evaluations (330 against
    478). (Laplace fits take the exact Hessian in one pass over the rows instead of finite
    differences: ``tests/test_laplace_hessian.py``.) (200 students are too few for 74
    parameters: an item's loading runs off to a near-deterministic step and neither fit
    converges.) Both from the default start of the loadings (the moment start is tested
    below)."""
    import ngmm_formula.api as api_module
    import ngmm_formula.fit as fit_module

    monkeypatch.setattr(api_module, "loadings_start", lambda obj: False)
    df, _, _ = irt_data(n_students=400, n_items=25, d=2, seed=5)
    formula = "y ~ 0 + item + rr(0 + item | id, d = 2)"
    steered = ngmm(formula, df, "binomial", approx="agq", nagq=3)
    assert steered.fixef.size + 49 >= fit_module.PRECONDITION_MIN_PARAMS
    monkeypatch.setattr(fit_module, "PRECONDITION_MIN_PARAMS", 10**9)
    plain = ngmm(formula, df, "binomial", approx="agq", nagq=3)
    assert steered.diagnostics.converged and plain.diagnostics.converged
    assert steered.loglik == pytest.approx(plain.loglik, abs=1e-6)
    np.testing.assert_allclose(np.sqrt(np.diag(steered.vcov.to_numpy())),
                               np.sqrt(np.diag(plain.vcov.to_numpy())), rtol=1e-4)
    np.testing.assert_allclose(steered.loadings()["std_error"],
                               plain.loadings()["std_error"], rtol=1e-4)
    assert steered.diagnostics.evaluations < plain.diagnostics.evaluations


def test_the_moment_start_of_the_loadings(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """fit.loadings_start: the implied covariance of the item effects at the start tracks
    the truth's (on 2,000 students x 10 items; the GLM start ignores the random effects, so
    the moments are attenuated, the more the further an item's easiness is from 0:
    correlation of the entries asserted > 0.9, measured 0.93, against -0.16 for the
    default start; the data and the arithmetic are fixed by the seed),
    the loadings have glmmTMB's form (lower-triangular, positive diagonal); and the fit from
    it, which starts with BHHH's Newton steps, ends where the fit from the default start
    ends (log-likelihood within 1e-6: the same maximum to a gradient of 1e-6; measured 1e-10;
    standard errors 1e-4, measured 1.2e-7) with fewer evaluations (234 against 346)."""
    import ngmm_formula.api as api_module
    from ngmm_formula.fit import glm_start, loadings_start
    from ngmm_formula.model import lambda_blocks

    df, truth, _ = irt_data(n_students=2000, n_items=10, d=2, seed=6)
    prepared = prepare("y ~ 0 + item + rr(0 + item | id, d = 2)", df, "binomial",
                       approx="laplace")
    module = LinearPredictor(prepared.problem, False)
    obj = Objective(prepared.problem, prepared.family, prepared.approximation, module)
    glm_start(prepared.problem, prepared.family, module)
    assert loadings_start(obj)
    L = lambda_blocks(module.theta.detach(), module.q, module.rank)[0].numpy()
    assert L[0, 1] == 0.0 and (np.diag(L[:2]) > 0).all()
    upper = np.triu_indices(10)
    r = np.corrcoef((L @ L.T)[upper], (truth @ truth.T)[upper])[0, 1]
    default = np.eye(10)[:, :2]
    r_default = np.corrcoef((default @ default.T)[upper], (truth @ truth.T)[upper])[0, 1]
    assert r > 0.9 and r_default < 0.5, (r, r_default)

    df, _, _ = irt_data(n_students=400, n_items=25, d=2, seed=5)
    formula = "y ~ 0 + item + rr(0 + item | id, d = 2)"
    moment = ngmm(formula, df, "binomial", approx="laplace")
    monkeypatch.setattr(api_module, "loadings_start", lambda obj: False)
    default = ngmm(formula, df, "binomial", approx="laplace")
    assert moment.diagnostics.converged and default.diagnostics.converged
    assert moment.loglik == pytest.approx(default.loglik, abs=1e-6)
    np.testing.assert_allclose(np.sqrt(np.diag(moment.vcov.to_numpy())),
                               np.sqrt(np.diag(default.vcov.to_numpy())), rtol=1e-4)
    assert moment.diagnostics.evaluations < default.diagnostics.evaluations


def test_no_moment_start_where_it_does_not_apply() -> None:
    """Gaussian (theta relative to sigma) and models without rr terms keep the default."""
    from ngmm_formula.fit import loadings_start

    df, _, _ = irt_data(n_students=100, n_items=5, d=1, seed=2)
    for formula, family in [("y ~ 0 + item + (1 | id)", "binomial"),
                            ("y ~ 0 + item + rr(0 + item | id, d = 1)", "gaussian")]:
        prepared = prepare(formula, df, family, approx="laplace")
        module = LinearPredictor(prepared.problem, prepared.family.has_dispersion)
        before = module.theta.detach().clone()
        obj = Objective(prepared.problem, prepared.family, prepared.approximation, module)
        assert not loadings_start(obj)
        assert torch.equal(module.theta.detach(), before)


@pytest.mark.parametrize("formula", ["y ~ 0 + item + rr(0 + item | id, d = 2)",
                                     "y ~ 0 + item + (1 | id)"])
def test_local_finite_differences_equal_the_whole_objective_ones(formula: str) -> None:
    """fit._local_fd_hessian (each local parameter's column from the blocks it enters) equals
    fd_hessian on the whole objective: the other blocks' gradients do not depend on that
    parameter, so both difference the same numbers up to the order of summation and the
    conditional modes' tolerance (1e-10; measured 1e-13 relative at 30,000 responses;
    asserted 1e-7 of the largest entry). Students answer 5 of 12 items, so each item is
    local; a Gaussian model (a dispersion parameter) takes the plain differences."""
    import ngmm_formula.fit as fit_module

    rng = np.random.default_rng(7)
    df, _, _ = irt_data(n_students=150, n_items=12, d=2, seed=7)
    keep = np.concatenate([rng.choice(12, 5, replace=False) + 12 * s for s in range(150)])
    df = df.iloc[np.sort(keep)].reset_index(drop=True)
    p = prepare(formula, df, "binomial", approx="laplace")
    module = LinearPredictor(p.problem, False)
    obj = Objective(p.problem, p.family, p.approximation, module)
    fit_module.glm_start(p.problem, p.family, module)
    fit_module.theta_start(obj)
    x = fit_module._get(module)
    local = fit_module._local_fd_hessian(obj)
    assert local is not None

    def whole(z: np.ndarray) -> tuple[float, np.ndarray]:
        return fit_module._evaluate(obj, z)
    H = fit_module.fd_hessian(whole, x)
    np.testing.assert_allclose(local(whole, x), H, rtol=0, atol=1e-7 * np.abs(H).max())
    gaussian = prepare(formula, df, "gaussian", approx="laplace")
    assert fit_module._local_fd_hessian(Objective(
        gaussian.problem, gaussian.family, gaussian.approximation,
        LinearPredictor(gaussian.problem, True))) is None


def test_gaussian_rr_model_is_fitted_exactly_by_ml() -> None:
    """A Gaussian identity model with an rr() term takes the Laplace path, exact for a
    quadratic log-integrand: the same log-likelihood as 5-node AGQ at the same parameters."""
    df, _, _ = irt_data(n_students=80, n_items=4, d=1, seed=2)
    df["score"] = df["y"] + np.random.default_rng(0).normal(0, 0.5, len(df))
    fit = ngmm("score ~ 0 + item + rr(0 + item | id, d = 1)", df, "gaussian")
    assert fit.title == "Linear mixed model fit by maximum likelihood"
    p = prepare("score ~ 0 + item + rr(0 + item | id, d = 1)", df, "gaussian", approx="agq",
                nagq=5)
    module = LinearPredictor(p.problem, True)
    L = fit.reduced_rank[0].loadings
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A,
                                                          fit.fixef.to_numpy())))
        module.theta.copy_(torch.tensor(L[:, 0]))
        module.log_sigma.fill_(math.log(fit.sigma))
        agq = float(Objective(p.problem, p.family, p.approximation, module)())
    assert agq == pytest.approx(fit.loglik, rel=1e-10)
