"""The synthetic student-proficiency generator and its numpy integrals (benchmarks/irt_data.py).

* Structure, exactly: shapes, level order, each student answering ``items_per_student``
  distinct items (missing by design), the truth identified as ``rr()`` identifies a fit
  (lower-triangular loadings with a positive diagonal), the split's guarantees.
* :func:`irt_data.marginal_loglik` against scipy's adaptive quadrature of the same
  integral (``quad`` for d = 1, ``dblquad`` for d = 2, over z with the N(0, I) weight),
  relative 1e-8: the adaptive product Gauss--Hermite rule with 20 nodes per dimension is
  exact for polynomials of degree 39 around the mode; for 3-6 Bernoulli responses the
  integrand is smooth and its error is far below that (measured about 1e-12).
* :func:`irt_data.conditional_modes`: the gradient of the log posterior vanishes there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import irt_data  # noqa: E402


@pytest.mark.parametrize("d", [1, 2, 3])
def test_simulate_structure_and_identification(d: int) -> None:
    data, truth = irt_data.simulate(200, 12, 5, d=d, seed=4)
    assert data.shape == (200 * 5, 5)
    assert list(data.columns) == ["id", "item", "y", "x1", "x2"]
    assert list(data["item"].cat.categories) == truth.items == [f"i{k:02d}" for k in
                                                                range(1, 13)]
    assert list(data["id"].cat.categories) == truth.students
    assert set(np.unique(data.y)) <= {0.0, 1.0}
    # missing by design: 5 distinct items per student, covariates constant within student
    per = data.groupby("id", observed=True)
    assert (per["item"].nunique() == 5).all() and (per.size() == 5).all()
    assert (per["x1"].nunique() == 1).all() and (per["x2"].nunique() == 1).all()
    assert data["item"].nunique() == 12
    # truth: the rr() identification
    lam = truth.loadings
    assert lam.shape == (12, d) and truth.z.shape == (200, d) and truth.easiness.shape == (12,)
    assert np.all(np.triu(lam, 1) == 0.0)
    assert np.all(np.diag(lam) > 0.0)
    assert truth.d == d
    # the recorded truth generates the data: eta has the documented parts
    eta = truth.eta(data)
    np.testing.assert_allclose(eta - truth.offset(data),
                               np.einsum("nk,nk->n",
                                         lam[irt_data.item_codes(data, truth.items)],
                                         truth.z[data["id"].cat.codes.to_numpy()]))


def test_simulate_is_reproducible_and_seeded() -> None:
    a, ta = irt_data.simulate(50, 8, 4, seed=1)
    b, tb = irt_data.simulate(50, 8, 4, seed=1)
    c, _ = irt_data.simulate(50, 8, 4, seed=2)
    assert a.equals(b) and np.array_equal(ta.loadings, tb.loadings)
    assert not a.equals(c)


def test_nonlinear_effect_has_the_documented_size() -> None:
    data, truth = irt_data.simulate(20_000, 10, 1, seed=0)
    f = truth.effect(data.x1.to_numpy(), data.x2.to_numpy())
    assert abs(f.mean()) < 0.03
    assert f.var() == pytest.approx(0.81 * (1 - np.exp(-8)) / 2 + 0.36, rel=0.05)


def test_split_holds_out_students_and_responses() -> None:
    data, _ = irt_data.simulate(400, 20, 6, seed=3)
    new, held = irt_data.split(data, 0.1, 0.1, seed=3)
    assert not np.any(new & held)
    new_ids = set(data.id[new].astype(str))
    assert new_ids.isdisjoint(set(data.id[~new].astype(str)))
    train = data[~new & ~held]
    assert set(data.id[held].astype(str)) <= set(train.id.astype(str))
    assert 0.05 < new.mean() < 0.15 and 0.05 < held.sum() / (~new).sum() < 0.15


def _case(d: int):
    rng = np.random.default_rng(10 + d)
    n_items, G = 6, 3
    lam = np.tril(rng.uniform(0.5, 1.5, (n_items, d)))
    rows = [(g, j) for g in range(G) for j in rng.choice(n_items, 3 + g, replace=False)]
    groups = np.array([g for g, _ in rows])
    items = np.array([j for _, j in rows])
    offset = rng.normal(0.0, 1.0, len(rows))
    y = rng.integers(0, 2, len(rows)).astype(float)
    return y, offset, lam, items, groups


def _integrand(z: np.ndarray, y, offset, lam, items, idx) -> float:
    eta = offset[idx] + lam[items[idx]] @ z
    return float(np.exp(np.sum(y[idx] * eta - np.logaddexp(0.0, eta)) - 0.5 * z @ z)
                 / (2 * np.pi) ** (len(z) / 2))


@pytest.mark.parametrize("d", [1, 2])
def test_marginal_loglik_matches_scipy_quadrature(d: int) -> None:
    y, offset, lam, items, groups = _case(d)
    got = irt_data.marginal_loglik(y, offset, lam, items, groups, nodes=20)
    for g in range(groups.max() + 1):
        idx = np.flatnonzero(groups == g)
        if d == 1:
            val, _ = integrate.quad(lambda u, idx=idx: _integrand(np.array([u]), y, offset,
                                                                  lam, items, idx), -np.inf, np.inf,
                                    epsabs=0, epsrel=1e-12)
        else:
            val, _ = integrate.dblquad(lambda u2, u1, idx=idx: _integrand(
                                           np.array([u1, u2]), y, offset, lam, items, idx),
                                       -9, 9, -9, 9, epsabs=0, epsrel=1e-11)
        # 1e-8: a 20-node adaptive rule on this smooth integrand (at most 5 Bernoulli factors
        # times a Gaussian) is accurate to ~1e-12, scipy's to its epsrel; the margin is for
        # the round-off of either, far above any machine's float64 differences
        assert got[g] == pytest.approx(np.log(val), rel=1e-8), g


def test_conditional_modes_are_stationary() -> None:
    y, offset, lam, items, groups = _case(2)
    z = irt_data.conditional_modes(y, offset, lam, items, groups)
    p = expit(offset + np.einsum("nk,nk->n", lam[items], z[groups]))
    for g in range(z.shape[0]):
        idx = groups == g
        grad = (y[idx] - p[idx]) @ lam[items[idx]] - z[g]
        # 1e-9: Newton stops once a step is below 1e-10; convergence is quadratic, so the
        # gradient left is orders smaller, whatever the machine's rounding
        np.testing.assert_allclose(grad, 0.0, atol=1e-9)
