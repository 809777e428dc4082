r"""Simulation-based scaled residuals (the DHARMa method, Hartig 2022).

For each observation :math:`y_i` draw :math:`y_i^{(1)}, \dots, y_i^{(S)}` from the fitted
model (:meth:`NGMMResult.simulate`) and take the position of :math:`y_i` in its simulated
distribution, randomised over ties (the randomised probability integral transform):

.. math::

    r_i = \frac{\#\{s: y_i^{(s)} < y_i\} + U_i\,\bigl(\#\{s: y_i^{(s)} = y_i\} + 1\bigr)}{S + 1},
    \qquad U_i \sim \mathrm{Uniform}(0, 1).

If the model is right, :math:`y_i` and its :math:`S` draws are exchangeable, so the rank of
:math:`y_i` among the :math:`S + 1` values (ties broken at random) is uniform on
:math:`\{1, \dots, S+1\}` and :math:`r_i` is exactly :math:`\mathrm{Uniform}(0, 1)`, for
discrete responses too (DHARMa instead jitters both sides by :math:`\pm 1/2`; the two agree in
distribution). Departures show in a QQ plot against the uniform, in residuals against fitted
values, and in three tests:

* **uniformity**: Kolmogorov--Smirnov test of :math:`r` against :math:`U(0,1)`;
* **dispersion** (DHARMa's default ``testDispersion``): the statistic
  :math:`T(y) = \operatorname{var}(y - \hat\mu)` of the observed data against its values on
  the simulated data sets, ratio :math:`T(y) / \overline{T(y^{(s)})}` and a two-sided p value
  :math:`\min\{1, 2\min(P_S(T \ge T_{obs}), P_S(T \le T_{obs}))\}`;
* **zero inflation**: the same with the number of zeros.

``random`` chooses how the random effects :math:`b` enter the simulations:

* ``"posterior"`` (the default): one draw :math:`b^* \sim N(\hat b, \operatorname{Var}(b
  \mid y))` from the (Laplace) conditional distribution of the random effects, shared by all
  :math:`S` simulations, then :math:`y^{(s)} \sim p(y \mid b^*)`. If :math:`b^*` is a draw
  from the exact posterior, :math:`(b^*, y)` has the joint distribution of :math:`(b, y)`, so
  given :math:`b^*` the :math:`y_i` are independent with the distributions the simulations
  draw from: the residuals are then independent and exactly uniform, which is what the KS
  test assumes (Gelman, Meng & Stern 1996's posterior-sampled discrepancies; the sampled
  latent variables of Dunn & Smyth's randomised quantile residuals). With estimated
  parameters and the Laplace posterior this holds approximately; ``tests/test_residuals.py``
  measures it.
* ``"new"``: new random effects in each simulation (DHARMa's default for lme4,
  ``re.form = NA``). Residuals test the whole model, but those of one group share its
  effect, so they are correlated and the KS test rejects a correct model too often (we
  measured a KS p value of 1e-6 for the uniformity of 60 such p values); the dispersion
  test has little power (20% where ``"posterior"`` has 93%, DHARMa's documentation notes the
  same).
* ``"fitted"``: the conditional modes :math:`\hat b` (DHARMa's ``re.form = NULL``). The
  modes are fitted to the same data, so the residuals are too concentrated around 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from ngmm_formula.design import re_effect
from ngmm_formula.errors import NGMMError

if TYPE_CHECKING:
    from ngmm_formula.results import NGMMResult

__all__ = ["SimulatedResiduals", "ResidualTest", "simulate_residuals"]


@dataclass(frozen=True)
class ResidualTest:
    """A test's statistic (KS D, or the observed/simulated ratio) and p value."""

    name: str
    statistic: float
    pvalue: float

    def __repr__(self) -> str:
        return f"{self.name}: statistic = {self.statistic:.4g}, p = {self.pvalue:.4g}"


def _two_sided(observed: float, simulated: np.ndarray) -> float:
    ge = float(np.mean(simulated >= observed))
    le = float(np.mean(simulated <= observed))
    return min(1.0, 2.0 * min(ge, le))


@dataclass(frozen=True)
class SimulatedResiduals:
    """Scaled residuals of a fit with the simulations they come from.

    Attributes
    ----------
    residuals : ndarray, shape (n,)
        :math:`r_i \\in (0, 1)`.
    observed : ndarray, shape (n,)
        The response on the simulation's scale (counts of successes for binomial trials).
    simulated : ndarray, shape (n, nsim)
    fitted : ndarray, shape (n,)
        Fitted means (with the random effects' conditional modes) on the same scale.
    centre : ndarray, shape (n,)
        The means :math:`\\hat\\mu` the dispersion statistic is centred on: those the
        simulations were drawn from with ``random="posterior"`` (at :math:`b^*`), ``fitted``
        otherwise (DHARMa).
    """

    residuals: np.ndarray
    observed: np.ndarray = field(repr=False)
    simulated: np.ndarray = field(repr=False)
    fitted: np.ndarray = field(repr=False)
    centre: np.ndarray = field(repr=False)
    random: str = "posterior"

    def test_uniformity(self) -> ResidualTest:
        """Kolmogorov--Smirnov test of the residuals against Uniform(0, 1)."""
        ks = stats.kstest(self.residuals, "uniform")
        return ResidualTest("uniformity (KS)", float(ks.statistic), float(ks.pvalue))

    def test_dispersion(self) -> ResidualTest:
        """DHARMa's simulation test of :math:`\\operatorname{var}(y - \\hat\\mu)`; statistic:
        observed over the mean of the simulated (> 1: over-dispersion)."""
        obs = float(np.var(self.observed - self.centre, ddof=1))
        sim = np.var(self.simulated - self.centre[:, None], axis=0, ddof=1)
        return ResidualTest("dispersion", obs / float(np.mean(sim)), _two_sided(obs, sim))

    def test_zero_inflation(self) -> ResidualTest:
        """Observed number of zeros against the simulated numbers; statistic: their ratio
        (> 1: more zeros than the model expects)."""
        obs = float(np.sum(self.observed == 0))
        sim = np.sum(self.simulated == 0, axis=0).astype(float)
        mean = float(np.mean(sim))
        ratio = obs / mean if mean > 0 else float("inf") if obs > 0 else 1.0
        return ResidualTest("zero inflation", ratio, _two_sided(obs, sim))

    def plot(self, axes: Any = None) -> Any:
        """QQ plot against the uniform and residuals against the fitted values' ranks
        (DHARMa's two panels); returns the Figure."""
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        else:
            fig = axes[0].figure
        n = len(self.residuals)
        expected = (np.arange(1, n + 1) - 0.5) / n
        ax = axes[0]
        ax.plot(expected, np.sort(self.residuals), ".", ms=3)
        ax.plot([0, 1], [0, 1], color="red", lw=1)
        u = self.test_uniformity()
        ax.set(xlabel="expected (uniform)", ylabel="observed scaled residual",
               title=f"QQ plot, KS p = {u.pvalue:.3g}")
        ax = axes[1]
        rank = stats.rankdata(self.fitted) / n
        ax.plot(rank, self.residuals, ".", ms=3)
        for q in (0.25, 0.5, 0.75):
            ax.axhline(q, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="fitted value (rank-transformed)", ylabel="scaled residual",
               title="residuals vs fitted", ylim=(0, 1))
        fig.tight_layout()
        return fig


def _posterior_eta(fit: NGMMResult, rng: np.random.Generator) -> np.ndarray:
    """The training rows' linear predictor with one draw of the random effects from their
    conditional distribution N(b_hat, postVar) (per term; terms of one grouping factor are
    drawn independently of each other)."""
    eta = np.asarray(fit._eta_fixed_train(), dtype=float).copy()
    offsets: dict[str, int] = {}
    for t, b in zip(fit.design.re_terms, fit.random_coef):
        start = offsets.get(t.group, 0)
        offsets[t.group] = start + t.q
        if t.rank is not None:  # draw the factor scores u ~ N(u_hat, Var(u | y)), b = Lambda u
            rr = next(r for r in fit.reduced_rank if r.name == t.name)
            L = np.linalg.cholesky(rr.scores_cov + 1e-12 * np.eye(rr.d)[None])
            ustar = rr.scores + np.einsum("lij,lj->li", L, rng.standard_normal(rr.scores.shape))
            eta += re_effect(t.Zraw, t.group_index, ustar @ rr.loadings.T)
            continue
        P = fit.ranef[t.group].attrs.get("postVar")
        if P is None:
            raise NGMMError(f"the fit has no conditional variances for '{t.group}'")
        block = np.transpose(P[start:start + t.q, start:start + t.q, :], (2, 0, 1))
        # Cholesky of each level's q x q conditional covariance (jitter for singular fits)
        L = np.linalg.cholesky(block + 1e-12 * np.eye(t.q)[None])
        bstar = np.asarray(b) + np.einsum("lij,lj->li", L, rng.standard_normal(b.shape))
        eta += re_effect(t.Zraw, t.group_index, bstar)
    return eta


def simulate_residuals(fit: NGMMResult, nsim: int = 250, *, random: str = "posterior",
                       seed: int | None = 0) -> SimulatedResiduals:
    """Scaled residuals by simulation (see the module docstring).

    Parameters
    ----------
    fit : NGMMResult
    nsim : int
        Simulated data sets (DHARMa's default 250); at least 10.
    random : {"posterior", "new", "fitted"}
        How the random effects enter the simulations (module docstring).
    seed : int or None
        Seeds the simulations and the randomisation of ties.
    """
    if isinstance(nsim, bool) or not isinstance(nsim, (int, np.integer)) or nsim < 10:
        raise NGMMError(f"nsim must be a whole number >= 10, got {nsim!r}")
    if random not in ("posterior", "new", "fitted"):
        raise NGMMError(f"random must be 'posterior', 'new' or 'fitted', got {random!r}")
    rng = np.random.default_rng(seed)
    mu = np.asarray(fit.fitted, dtype=float)
    centre = mu
    if random == "posterior":
        mu_star = fit._mean(_posterior_eta(fit, rng))
        centre = np.asarray(mu_star, dtype=float)
        sig = fit.sigma if fit.family.has_dispersion else None
        w = np.asarray(fit.design.weights, dtype=float)
        sims = np.column_stack([fit.family.simulate(mu_star, sig, w, rng)
                                for _ in range(int(nsim))])
    else:
        sims = fit.simulate(int(nsim), seed=int(rng.integers(2**31)),
                            re_form="~0" if random == "new" else None).to_numpy()
    y = np.asarray(fit.design.y, dtype=float)
    if fit.family.name == "binomial":  # proportions -> counts of successes
        w = np.asarray(fit.design.weights, dtype=float)
        y, sims, mu, centre = np.rint(y * w), np.rint(sims * w[:, None]), mu * w, centre * w
    less = np.sum(sims < y[:, None], axis=1)
    equal = np.sum(sims == y[:, None], axis=1)
    u = rng.uniform(size=len(y))
    r = (less + u * (equal + 1)) / (nsim + 1)
    return SimulatedResiduals(residuals=r, observed=y, simulated=sims, fitted=mu,
                              centre=centre, random=random)
