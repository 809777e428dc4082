r"""Confidence and prediction intervals for predictions (``predict(..., interval=)``).

For a row with fixed-effect row :math:`x`, random-effect row :math:`z` of grouping level
:math:`g` and linear predictor :math:`\hat\eta = x^\top\hat\beta + f(x) + z^\top\hat b_g`, the
link-scale variance used is

.. math::

    s^2 = \underbrace{x^\top \widehat V(\hat\beta)\, x
          + z^\top \operatorname{Var}(b_g \mid y)\, z}_{\text{known level (predict\_se)}}
          \qquad\text{or}\qquad
          x^\top \widehat V(\hat\beta)\, x + z^\top \Sigma\, z \quad\text{(new level)},

with :math:`\Sigma = \Lambda\Lambda^\top` the fitted covariance of the random effects: a level
that the training data did not have has an unknown effect drawn from :math:`N(0, \Sigma)`.
``re_form="~0"`` predicts the population mean (:math:`b = 0`): its confidence interval uses
:math:`x^\top\widehat V x` only, its prediction interval (a new observation of an unknown
group) adds :math:`z^\top\Sigma z` of every term.

* **Confidence** (the mean): :math:`g^{-1}(\hat\eta \pm z_{1-\alpha/2}\, s)` (the link is
  monotone, so the end points transform; decreasing links swap them).
* **Prediction** (a new observation :math:`y`), Gaussian identity link, delta method:
  :math:`\hat\eta \pm z_{1-\alpha/2}\sqrt{s^2 + \sigma^2/w}`.
* **Simulation** (any family): draw :math:`\eta^* \sim N(\hat\eta, s^2)`, then for prediction
  :math:`y^* \sim p(y \mid g^{-1}(\eta^*), \sigma)` from the family; the interval is the
  :math:`\alpha/2` and :math:`1-\alpha/2` quantiles of the draws. For discrete responses
  the quantiles are values the response can take, so coverage is at least the level (up to
  Monte Carlo error), not exact.

What is ignored, as in :func:`ngmm_formula.inference.predict_se`: the uncertainty of the
variance parameters and of ``nn()`` networks (held fixed), and the covariance between
:math:`\hat\beta` and the conditional modes. For a neural fit the interval is therefore
conditional on the fitted network; the coverage test in ``tests/test_intervals.py`` measures
what that costs on simulated data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ngmm_formula.design import re_quadratic
from ngmm_formula.errors import NGMMError

if TYPE_CHECKING:
    from ngmm_formula.results import NGMMResult

__all__ = ["predict_interval"]


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) \
            or not 0.0 < float(level) < 1.0:
        raise NGMMError(f"level must be a number strictly between 0 and 1, got {level!r}")
    return float(level)


def _population(re_form: str | None) -> bool:
    if re_form is None:
        return False
    if re_form.replace(" ", "") in ("~0", "NA"):
        return True
    raise NGMMError(f"re_form must be None or '~0', got {re_form!r}")


def _random_variance(fit: NGMMResult, newdata: pd.DataFrame | None, population: bool,
                     allow_new_levels: bool) -> np.ndarray:
    r""":math:`\sum_k z_{ik}^\top \Sigma_k z_{ik}` over the terms whose level is unknown for
    row i (all terms when ``population``)."""
    design = fit.design
    if newdata is None:
        Zs = [t.Zraw for t in design.re_terms]
        gis = [t.group_index for t in design.re_terms]
    else:
        nd = design.spec.new_data(newdata, allow_new_levels=allow_new_levels or population)
        Zs, gis = list(nd.Zraw), list(nd.group_index)
    n = len(gis[0]) if gis else 0
    out = np.zeros(n)
    for Z, gi, L in zip(Zs, gis, fit._lambda_abs()):
        Sigma = L @ L.T
        rows = np.ones(n, dtype=bool) if population else gi < 0
        if rows.any():
            out[rows] += re_quadratic(Z, Sigma)[rows]
    return out


def predict_interval(fit: NGMMResult, newdata: pd.DataFrame | None = None, *,
                     interval: Literal["confidence", "prediction"] = "confidence",
                     level: float = 0.95, type: Literal["response", "link"] = "response",
                     method: Literal["auto", "delta", "simulation"] = "auto",
                     re_form: str | None = None, allow_new_levels: bool = False,
                     nsim: int = 2000, seed: int | None = 0) -> pd.DataFrame:
    r"""Predictions with confidence or prediction intervals (R's ``predict(fit, interval=)``).

    Parameters
    ----------
    fit : NGMMResult
    newdata : DataFrame or None
        None: the training rows.
    interval : {"confidence", "prediction"}
        An interval for the conditional mean :math:`g^{-1}(\eta)` or for a new observation.
    level : float
        Coverage probability, strictly between 0 and 1.
    type : {"response", "link"}
        Scale of ``fit``, ``lwr`` and ``upr``; prediction intervals are on the response
        scale (``"link"`` only where the link is the identity).
    method : {"auto", "delta", "simulation"}
        ``"delta"``: normal intervals on the link scale (see the module docstring); a
        prediction interval by the delta method needs a Gaussian family with the identity
        link. ``"simulation"``: quantiles of ``nsim`` draws. ``"auto"``: delta where it
        applies, simulation otherwise.
    re_form : None or "~0"
        As :meth:`NGMMResult.predict`.
    allow_new_levels : bool
        As :meth:`NGMMResult.predict`: unseen grouping levels raise unless True; then their
        random effect is unknown and its variance enters the interval.
    nsim : int
        Draws per row for ``method="simulation"``.
    seed : int or None
        Seed of the simulation.

    Returns
    -------
    DataFrame
        Columns ``fit`` (the prediction, as :meth:`NGMMResult.predict`), ``se`` (the
        link-scale standard deviation :math:`s` used; for a delta prediction interval
        :math:`\sqrt{s^2+\sigma^2/w}`), ``lwr`` and ``upr``; indexed as ``newdata``.
    """
    method, level, population = _checked_arguments(fit, interval, type, method, level, nsim,
                                                   re_form)
    eta = fit.predict(newdata, type="link", re_form=re_form, allow_new_levels=allow_new_levels)
    var = fit.predict_se(newdata, re_form=re_form, allow_new_levels=allow_new_levels) ** 2
    if interval == "prediction" or not population:
        var = var + _random_variance(fit, newdata, population, allow_new_levels)
    index = fit.design.row_index if newdata is None else newdata.index
    # prior weights (binomial: trials) of the training rows; new rows count as weight 1
    weights = (np.asarray(fit.design.weights, dtype=float) if newdata is None
               else np.ones(len(eta)))
    sigma = fit.sigma if fit.family.has_dispersion else None
    alpha = 1.0 - level
    zq = float(stats.norm.ppf(1.0 - alpha / 2.0))

    def inv(e: np.ndarray) -> np.ndarray:
        return e if type == "link" else fit._mean(e)

    centre = inv(eta)
    if method == "delta":
        if interval == "prediction":
            w = np.where(weights > 0, weights, 1.0)
            var = var + float(fit.sigma) ** 2 / w
        s = np.sqrt(var)
        a, b = inv(eta - zq * s), inv(eta + zq * s)
        return pd.DataFrame({"fit": centre, "se": s, "lwr": np.minimum(a, b),
                             "upr": np.maximum(a, b)}, index=index)

    s = np.sqrt(var)
    lwr, upr = _simulated_limits(fit, eta, s, weights, sigma, interval, inv, alpha, nsim,
                                 seed)
    return pd.DataFrame({"fit": centre, "se": s, "lwr": lwr, "upr": upr}, index=index)


def _checked_arguments(fit: NGMMResult, interval: str, type: str,
                       method: Literal["auto", "delta", "simulation"], level: float, nsim: int,
                       re_form: str | None
                       ) -> tuple[Literal["auto", "delta", "simulation"], float, bool]:
    """Check the arguments of :func:`predict_interval` (same names) and resolve
    ``method="auto"``: delta for confidence intervals and Gaussian identity-link prediction
    intervals, simulation otherwise.

    Returns
    -------
    method : {"delta", "simulation"}
    level : float
    population : bool
        Whether ``re_form`` predicts the population mean (random effects at zero).
    """
    if interval not in ("confidence", "prediction"):
        raise NGMMError(f"interval must be 'confidence' or 'prediction', got {interval!r}")
    if type not in ("response", "link"):
        raise NGMMError(f"type must be 'response' or 'link', got {type!r}")
    if method not in ("auto", "delta", "simulation"):
        raise NGMMError(f"method must be 'auto', 'delta' or 'simulation', got {method!r}")
    level = _check_level(level)
    if isinstance(nsim, bool) or not isinstance(nsim, (int, np.integer)) or nsim < 100:
        raise NGMMError(f"nsim must be a whole number >= 100, got {nsim!r}")
    population = _population(re_form)
    identity = fit.family.link.name == "identity"
    gaussian = fit.family.name == "gaussian" and identity
    if interval == "prediction" and type == "link" and not identity:
        raise NGMMError("type='link' has no prediction interval (a new observation lives on "
                        "the response scale); use type='response'")
    if method == "auto":
        method = "delta" if interval == "confidence" or gaussian else "simulation"
    if method == "delta" and interval == "prediction" and not gaussian:
        raise NGMMError(f"method='delta' gives prediction intervals for the Gaussian family "
                        f"with the identity link only (this fit: {fit.family!r}); use "
                        "method='simulation'")
    return method, level, population


def _simulated_limits(fit: NGMMResult, eta: np.ndarray, s: np.ndarray, weights: np.ndarray,
                      sigma: float | None, interval: str,
                      inv: Callable[[np.ndarray], np.ndarray], alpha: float, nsim: int,
                      seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    r"""The interval limits by simulation: the :math:`\alpha/2` and :math:`1-\alpha/2`
    quantiles of ``nsim`` draws per row of :math:`\eta^* \sim N(\hat\eta, s^2)` mapped by
    ``inv`` (confidence) or of new responses drawn from the family at
    :math:`g^{-1}(\eta^*)` (prediction), rows in chunks of about 200,000 draws.

    Parameters
    ----------
    fit : NGMMResult
    eta, s : ndarray
        The link-scale predictions and standard deviations.
    weights : ndarray
        Prior weights of the rows (binomial: trials).
    sigma : float or None
        The dispersion parameter (None for families without one).
    interval : {"confidence", "prediction"}
    inv : callable
        From the link scale to the reported scale.
    alpha : float
        One minus the level.
    nsim : int
    seed : int or None
    """
    rng = np.random.default_rng(seed)
    lwr = np.empty(len(eta))
    upr = np.empty(len(eta))
    chunk = max(1, 200_000 // nsim)
    for start in range(0, len(eta), chunk):
        sl = slice(start, start + chunk)
        e = eta[sl, None] + s[sl, None] * rng.standard_normal((len(eta[sl]), nsim))
        if interval == "confidence":
            draws = inv(e)
        else:
            with torch.no_grad():
                mu = fit.family.mean(torch.as_tensor(e)).numpy()
            w = np.broadcast_to(weights[sl, None], mu.shape)
            draws = fit.family.simulate(mu.ravel(), sigma, w.ravel(), rng).reshape(mu.shape)
        q = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0], axis=1)
        lwr[sl], upr[sl] = q[0], q[1]
    return lwr, upr
