r"""Tests of :mod:`ngmm_formula.approx.rules` and of the error of the truncated rule.

Part 1 checks the rules as rules for the standard normal :math:`N(0, I_D)`:

* Gauss--Hermite with ``K`` nodes integrates polynomials up to degree :math:`2K - 1`
  exactly (per axis for the product rule) and is not exact at degree :math:`2K`;
* the Laplace rule is one node at 0 with weight 1; GH weights sum to 1;
* the truncated rule's weights sum to :math:`1 - \text{tail}` with
  ``tail = tail_bound(D, M)``, up to the trapezoid's Euler--Maclaurin term.

Part 2 measures the truncated rule inside the engine on real integrands: the per-group log
marginal likelihoods of ``glmer(cbind(incidence, size - incidence) ~ period + (1 | herd),
cbpp, binomial)`` at lme4's estimates, computed independently with ``scipy.integrate.quad``
(``scipy.stats.binom`` log-densities, not the package's families). With
:math:`G(t) = e^{h(\hat u + \hat\sigma t)}` in the posterior-standardised coordinate
(:math:`\hat u` the mode, :math:`\hat\sigma^{-2} = -h''(\hat u)`), the rule with truncation
``M`` and ``K`` points per axis is the trapezoid rule for :math:`\int_{-M}^{M} G`, so

.. math::

    \text{error} = \underbrace{\log \frac{\int_{\mathbb R} G}{\int_{-M}^{M} G}}_{\text{tail}}
      + \underbrace{\log \frac{\int_{-M}^{M} G}{T_K(G)}}_{\text{grid}} .

Findings (an earlier design note claimed the rate :math:`e^{-M^2/2}` and a purely geometric
grid error; both were measured wrong and ``rules.py`` now states what these tests check):

* The tail term does **not** fall like ``tail_bound(1, M)`` (:math:`2\Phi(-M)`, DESIGN.md's
  "Gaussian-tail rate exp(-M^2/2)" taken literally): it is the posterior mass outside
  :math:`\hat u \pm M\hat\sigma`, and the posterior's tails are the prior's
  (:math:`N(0, 1)` in ``u``), wider than :math:`N(0, 1)` in ``t``. Measured on herd 1:
  error / tail_bound = 1.2, 1.1, 1.4, 2.7, 9.4, 57 for M = 1..6. It does respect
  ``truncation_bound(M, H)`` (rate :math:`e^{-M^2/(2H)}`, :math:`H = \hat\sigma^{-2}`), which
  ``rules.py`` now gives for log-concave integrands; that bound is rigorous but loose here
  (2e-3 against a measured 1.1e-7 at M = 6).
* The grid term falls geometrically in K only down to the trapezoid's Euler--Maclaurin
  endpoint term :math:`\frac{h^2}{12}(G'(M) - G'(-M))`, :math:`h = 2M/(K-1)`, and then like
  :math:`K^{-2}`: :math:`G` does not vanish at :math:`\pm M`. It stays below the tail term
  (at K = 4M + 1 it is 4 % of it at M = 1 and 44 % at M = 8; at K = 40 M under 1 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, optimize, special, stats

from ngmm_formula.api import Prepared, prepare
from ngmm_formula.approx import choose_approximation
from ngmm_formula.approx.rules import (
    gauss_hermite_rule,
    laplace_rule,
    tail_bound,
    truncated_rule,
    truncation_bound,
)
from ngmm_formula.datasets import load
from ngmm_formula.families import get_family
from ngmm_formula.fit import Objective
from ngmm_formula.model import LinearPredictor
from tests.references import REFS

# --------------------------------------------------------------------------------------------
# Part 1: the rules


def normal_moment(d: int) -> float:
    """E t^d for t ~ N(0, 1): 0 for odd d, (d - 1)!! for even d."""
    return 0.0 if d % 2 else float(special.factorial2(d - 1)) if d else 1.0


def integrate_rule(rule, powers: tuple[int, ...]) -> float:  # type: ignore[no-untyped-def]
    w = np.exp(rule.log_weights)
    return float((w * np.prod(rule.nodes ** np.array(powers), axis=1)).sum())


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_laplace_rule_is_one_node_at_zero(dim: int) -> None:
    rule = laplace_rule(dim)
    assert rule.nodes.shape == (1, dim)
    assert not rule.nodes.any()
    np.testing.assert_array_equal(rule.log_weights, [0.0])  # weight 1


@pytest.mark.parametrize("k", range(1, 16))
def test_gauss_hermite_exact_to_degree_2k_minus_1(k: int) -> None:
    rule = gauss_hermite_rule(1, k)
    assert rule.n_nodes == k
    assert np.exp(rule.log_weights).sum() == pytest.approx(1.0, rel=1e-13)
    w, t = np.exp(rule.log_weights), rule.nodes[:, 0]
    for d in range(2 * k):
        exact = normal_moment(d)
        # round-off: relative to the sum of |terms| (odd moments cancel to 0)
        scale = float((w * np.abs(t) ** d).sum())
        assert integrate_rule(rule, (d,)) == pytest.approx(exact, abs=1e-12 * scale), d
    # ... and not beyond: at degree 2K the error is exactly ||He_K||^2 = K!
    d = 2 * k
    assert normal_moment(d) - integrate_rule(rule, (d,)) == pytest.approx(
        math.factorial(k), rel=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_gauss_hermite_product_rule_2d(k: int) -> None:
    rule = gauss_hermite_rule(2, k)
    assert rule.nodes.shape == (k * k, 2)
    assert np.exp(rule.log_weights).sum() == pytest.approx(1.0, rel=1e-13)
    w = np.exp(rule.log_weights)
    for a in range(2 * k):
        for b in range(2 * k):
            exact = normal_moment(a) * normal_moment(b)
            scale = float((w * np.abs(rule.nodes[:, 0]) ** a * np.abs(rule.nodes[:, 1]) ** b)
                          .sum())
            assert integrate_rule(rule, (a, b)) == pytest.approx(exact, abs=1e-12 * scale)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("M", [1.0, 2.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("K", [21, 201])
def test_truncated_weights_sum_to_one_minus_tail(dim: int, M: float, K: int) -> None:
    rule = truncated_rule(dim, M, K)
    assert rule.nodes.shape == (K**dim, dim)
    assert rule.nodes.min() == -M and rule.nodes.max() == M
    total = np.exp(rule.log_weights).sum()
    inside = 1.0 - tail_bound(1, M)  # int_{-M}^{M} phi
    # trapezoid rule for phi on [-M, M]: error h^2/12 (phi'(M) - phi'(-M)) + O(h^4)
    # = -h^2 M phi(M) / 6 (Euler--Maclaurin)
    h = 2 * M / (K - 1)
    em = -h * h / 12 * 2 * M * math.exp(-M * M / 2) / math.sqrt(2 * math.pi)
    sum_1d = total ** (1 / dim)
    # the O(h^4) remainder: < 0.1 % of the h^2 term at K = 201, < 10 % at K = 21
    assert sum_1d - inside == pytest.approx(em, rel=1e-3 if K > 100 else 0.1, abs=2e-13)
    assert total == pytest.approx(1 - tail_bound(dim, M), abs=dim * 1.1 * abs(em) + 2e-13)
    # odd moments vanish by symmetry
    assert integrate_rule(rule, (1,) + (0,) * (dim - 1)) == pytest.approx(0.0, abs=1e-14)


def test_rule_arguments_are_validated() -> None:
    with pytest.raises(ValueError):
        gauss_hermite_rule(1, 0)
    with pytest.raises(ValueError):
        truncated_rule(1, 0.0, 11)
    with pytest.raises(ValueError):
        truncated_rule(1, 3.0, 1)


# --------------------------------------------------------------------------------------------
# Part 2: the truncated rule on real integrands

REF = REFS
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
GROUPS = (0, 1)  # herds "1" and "2"
TAIL_M = (1, 2, 3, 4, 5, 6)


@cache
def _cbpp() -> pd.DataFrame:
    return load("cbpp")


def _parameters() -> tuple[np.ndarray, float]:
    r = REF["cbpp_logit_laplace"]
    return np.array(list(r["fixef"].values())), float(next(iter(r["theta"].values())))


@cache
def _prepared_cbpp() -> Prepared:
    return prepare(CBPP, _cbpp(), "binomial", approx="laplace")


@cache
def engine_log_marginal(approx: str, truncation: float | None = None,
                        points: int | None = None, nagq: int | None = None) -> np.ndarray:
    """Per-herd log marginal likelihoods from the engine at lme4's estimates."""
    p = _prepared_cbpp()
    # the per-group block layout is the same for every rule: only the Approximation changes
    a = choose_approximation(approx, nagq=nagq, truncation=truncation, points=points,
                             reml=None, n_grouping_factors=1, block_dim=1,
                             gaussian_identity=False, has_networks=False)
    assert not a.joint and a.kind == approx
    beta, theta = _parameters()
    module = LinearPredictor(p.problem, False)
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A, beta)))
        module.theta.fill_(theta)
        return Objective(p.problem, p.family, a, module).per_block().numpy()


@dataclass(frozen=True)
class Group:
    r"""One herd's integrand :math:`h(u) = \sum_i \log \text{Bin}(y_i; n_i, p_i(u)) +
    \log\varphi(u)`, computed with scipy only."""

    y: np.ndarray
    n: np.ndarray
    eta0: np.ndarray
    theta: float

    def h(self, u: float) -> float:
        eta = self.eta0 + self.theta * u
        # log Bin(y; n, expit(eta)) = y log p + (n - y) log(1 - p) + log C(n, y)
        loglik = (self.y * special.log_expit(eta) + (self.n - self.y) * special.log_expit(-eta)
                  ).sum() + self.log_choose
        return float(loglik - 0.5 * u * u - 0.5 * math.log(2 * math.pi))

    @property
    def log_choose(self) -> float:
        return float((special.gammaln(self.n + 1) - special.gammaln(self.y + 1)
                      - special.gammaln(self.n - self.y + 1)).sum())

    def h_scipy(self, u: float) -> float:
        """The same with scipy.stats (checked once against :meth:`h`)."""
        p = special.expit(self.eta0 + self.theta * u)
        return float(stats.binom.logpmf(self.y, self.n, p).sum() + stats.norm.logpdf(u))

    def dh(self, u: float) -> float:
        p = special.expit(self.eta0 + self.theta * u)
        return float(self.theta * (self.y - self.n * p).sum() - u)

    @property
    def mode(self) -> float:
        return float(optimize.brentq(self.dh, -20, 20, xtol=1e-15))

    @property
    def sigma(self) -> float:
        """Posterior-standardising scale (observed = expected curvature for the logit)."""
        p = special.expit(self.eta0 + self.theta * self.mode)
        return 1 / math.sqrt(1 + self.theta**2 * (self.n * p * (1 - p)).sum())

    def integral(self, lo: float = -np.inf, hi: float = np.inf) -> float:
        """log of int_lo^hi exp(h(u)) du by adaptive quadrature (relative 1e-13)."""
        hm = self.h(self.mode)
        val, _ = integrate.quad(lambda u: math.exp(self.h(u) - hm), lo, hi, epsabs=0,
                                epsrel=1e-13, limit=500)
        return hm + math.log(val)

    def inside(self, M: float) -> float:
        """log of the integral over u_hat +- M sigma_hat."""
        return self.integral(self.mode - M * self.sigma, self.mode + M * self.sigma)

    def em_term(self, M: float, K: int) -> float:
        r"""Euler--Maclaurin endpoint term of the trapezoid rule for :math:`\int_{-M}^M G`,
        relative to :math:`\int_{-M}^{M} G`: :math:`\frac{h^2}{12}(G'(M) - G'(-M))`."""
        m, s = self.mode, self.sigma
        inside = math.exp(self.inside(M) - self.h(m))

        def dG(t: float) -> float:  # G(t) = s exp(h(m + s t) - h(m))
            return s * self.dh(m + s * t) * s * math.exp(self.h(m + s * t) - self.h(m))

        step = 2 * M / (K - 1)
        return step * step / 12 * (dG(M) - dG(-M)) / inside


@cache
def group(g: int) -> Group:
    d = _cbpp()
    beta, theta = _parameters()
    p = _prepared_cbpp()
    rows = p.design.re_terms[0].group_index == g
    y, n = d["incidence"].to_numpy(), d["size"].to_numpy()
    return Group(y[rows], n[rows], (p.design.X @ beta)[rows], theta)


@cache
def exact(g: int) -> float:
    return group(g).integral()


def truncated_error(g: int, M: float, K: int) -> float:
    return abs(engine_log_marginal("truncated", float(M), K)[g] - exact(g))


@pytest.mark.parametrize("g", GROUPS)
def test_reference_integrals_agree(g: int) -> None:
    """Sanity of the scipy references: 30 GH nodes agree with quad to 1e-12, Laplace not."""
    for u in (-2.0, 0.0, 1.5):
        assert group(g).h(u) == pytest.approx(group(g).h_scipy(u), rel=1e-13)
    assert engine_log_marginal("agq", nagq=30)[g] == pytest.approx(exact(g), abs=1e-11)
    assert abs(engine_log_marginal("laplace")[g] - exact(g)) > 1e-4
    # the sum over herds reproduces R's integrate (devfun.optimum.independent.exact)
    total = -2 * sum(group(k).integral() for k in range(15))
    ind = REF["cbpp_logit_laplace"]["devfun"]["optimum"]["independent"]["exact"]
    assert total == pytest.approx(ind, rel=1e-10)


@pytest.mark.parametrize("g", GROUPS)
def test_truncated_error_within_truncation_bound(g: int) -> None:
    """The bound rules.py gives for log-concave integrands (binomial-logit is one):
    error <= truncation_bound(M, H) / int_{-M}^{M} e^{g(t)} dt with H = sigma_hat^-2 the
    curvature at the mode in the prior's units (computed here independently), M = 1..8."""
    G = group(g)
    H = 1 / G.sigma**2
    for M in (*TAIL_M, 7, 8):
        err = truncated_error(g, M, 40 * M)
        inside_t = math.exp(G.inside(M) - G.h(G.mode)) / G.sigma  # in t = (u - u_hat)/sigma
        assert err <= truncation_bound(float(M), H) / inside_t, M


@pytest.mark.parametrize("g", GROUPS)
def test_truncated_error_is_the_posterior_tail_mass(g: int) -> None:
    """What the error is instead: the log of (total / mass inside u_hat +- M sigma_hat), to
    1 % (the rest is the grid's Euler--Maclaurin term, about (hM)^2/6 of it), for M = 1..8;
    so the implementation is right and only the stated rate is wrong."""
    G = group(g)
    for M in (*TAIL_M, 7, 8):
        err = engine_log_marginal("truncated", float(M), 40 * M)[g] - exact(g)
        tail = exact(g) - G.inside(M)
        assert -err == pytest.approx(tail, rel=1e-2), M
    # it decays (roughly like a Gaussian tail, just not at the rate of tail_bound)
    errors = [truncated_error(g, M, 40 * M) for M in TAIL_M]
    assert all(b < 0.2 * a for a, b in zip(errors, errors[1:]))


GRID_K = tuple(range(3, 44, 4))


def grid_errors(g: int, M: float, Ks: tuple[int, ...]) -> np.ndarray:
    """|rule - log int_{-M}^{M} G| for each K: the grid error alone."""
    inside = group(g).inside(M)
    return np.array([abs(engine_log_marginal("truncated", M, K)[g] - inside) for K in Ks])


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("M", [4.0, 6.0, 8.0])
def test_grid_error_geometric_then_endpoint_term(g: int, M: float) -> None:
    """How the grid error does behave at fixed M. Geometric phase: while it exceeds 10x the
    Euler--Maclaurin endpoint term, 4 more points per axis cut it by at least 5x (measured:
    10x to 4000x). Then it *is* that term (to 5 %, for K >= 31, where that term is above
    quad's 1e-13 precision), i.e. O(K^-2)."""
    G = group(g)
    err = grid_errors(g, M, GRID_K)
    em = np.array([G.em_term(M, K) for K in GRID_K])
    in_geometric_phase = err > 10 * np.abs(em)
    assert in_geometric_phase[0]  # the phase exists
    for i in range(len(GRID_K) - 1):
        if in_geometric_phase[i] and err[i] > 1e-12:
            assert err[i + 1] <= 0.2 * err[i], (GRID_K[i], err)
    late = [i for i, K in enumerate(GRID_K) if K >= 31 and abs(em[i]) > 1e-10]
    for i in late:
        assert err[i] == pytest.approx(abs(em[i]), rel=0.05), (GRID_K[i], err[i], em[i])
    # at K = 40 M (the tail test's choice) the grid error is < 2 % of the tail error
    K = int(40 * M)
    assert abs(engine_log_marginal("truncated", M, K)[g] - G.inside(M)) < 0.02 * (
        exact(g) - G.inside(M))


# --------------------------------------------------------------------------------------------
# Part 3: a vector random effect against scipy's dblquad

THETA_2D = np.array([0.6, 0.2, 0.4])  # Lambda = [[0.6, 0], [0.2, 0.4]] (column-major)
BETA_2D = np.array([0.5, -0.3])


@cache
def poisson_2d() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n_per, groups = 6, ("a", "b")
    x = rng.uniform(-1, 1, n_per * len(groups))
    g = np.repeat(groups, n_per)
    b = rng.standard_normal((len(groups), 2)) @ np.array([[0.6, 0.2], [0.0, 0.4]])
    idx = np.repeat(np.arange(len(groups)), n_per)
    eta = BETA_2D[0] + BETA_2D[1] * x + b[idx, 0] + b[idx, 1] * x
    return pd.DataFrame({"y": rng.poisson(np.exp(eta)).astype(float), "x": x,
                         "g": pd.Categorical(g)})


def engine_2d(**kw: object) -> np.ndarray:
    p = prepare("y ~ x + (1 + x | g)", poisson_2d(), get_family("poisson"), **kw)
    module = LinearPredictor(p.problem, False)
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A,
                                                          BETA_2D)))
        module.theta.copy_(torch.as_tensor(THETA_2D))
        return Objective(p.problem, p.family, p.approximation, module).per_block().numpy()


@cache
def exact_2d(level: str) -> float:
    d = poisson_2d()
    rows = (d["g"] == level).to_numpy()
    y, x = d["y"].to_numpy()[rows], d["x"].to_numpy()[rows]
    L = np.array([[THETA_2D[0], 0.0], [THETA_2D[1], THETA_2D[2]]])

    log_y_factorial = special.gammaln(y + 1).sum()
    assert stats.poisson.logpmf(y, 1.5).sum() == pytest.approx(  # the closed form below
        (y * math.log(1.5) - 1.5).sum() - log_y_factorial, rel=1e-13)

    def h(u1: float, u2: float) -> float:  # Poisson log-likelihood + log N(u; 0, I)
        b1, b2 = L[0, 0] * u1, L[1, 0] * u1 + L[1, 1] * u2
        eta = BETA_2D[0] + BETA_2D[1] * x + b1 + b2 * x
        return float((y * eta - np.exp(eta)).sum() - log_y_factorial
                     - 0.5 * (u1 * u1 + u2 * u2) - math.log(2 * math.pi))

    res = optimize.minimize(lambda u: -h(*u), np.zeros(2), method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-13})
    hm = -res.fun
    # N(0, I) puts < 1e-15 outside [-9, 9]^2 and the likelihood factor is bounded there
    val, _ = integrate.dblquad(lambda u2, u1: math.exp(h(u1, u2) - hm), -9, 9, -9, 9,
                               epsabs=0, epsrel=1e-11)
    return hm + math.log(val)


@pytest.mark.parametrize(("kw", "tol"), [
    ({"approx": "agq", "nagq": 20}, 1e-8),
    # M = 9: the 2-d tail falls slowly too (error 1.7e-8 at M = 7, where tail_bound is 5e-12)
    ({"approx": "truncated", "truncation": 9.0, "points": 91}, 1e-9),
    ({"approx": "agq", "nagq": 3}, 1e-2),
    ({"approx": "laplace"}, 1e-2),
], ids=["agq20", "truncated_M9_K91", "agq3", "laplace"])
def test_vector_random_effect_against_dblquad(kw: dict[str, object], tol: float) -> None:
    ours = engine_2d(**kw)
    expected = np.array([exact_2d("a"), exact_2d("b")])
    np.testing.assert_allclose(ours, expected, rtol=0, atol=tol)
    if kw.get("nagq") == 20 or kw.get("approx") == "truncated":
        return
    assert np.abs(ours - expected).max() > 1e-8  # the coarse rules are really approximations
