"""Prediction and confidence intervals (``predict(..., interval=)``, ngmm_formula.intervals).

Coverage is measured on held-out data simulated from a known model,
:math:`y = 1 + f(x) + b_g + \\varepsilon`, :math:`b_g \\sim N(0, 1)`,
:math:`\\varepsilon \\sim N(0, 0.5^2)`, for new observations of the training groups (known
levels) and for groups the fit has not seen (new levels). The target band, 93-97% for 95%
intervals, is the issue's.

Measured (pooled over the held-out rows): linear fits, 50 data sets x 400 rows per kind,
95.9% (known groups) and 94.4% (new groups), with between-data-set standard deviations of
1.5 and 3.0 points, i.e. standard errors of the pooled coverage of 0.2 and 0.4 points: the
band is 5 and 3.4 standard errors away. Neural fits (``nn(x)``, 3 data sets x 600 rows):
96.0% and 94.8%, standard errors 0.55 and 0.95 points, so about 1.8 standard errors inside the
band. The data are seeded, so a machine can only change the numbers through floating-point
differences in the fit, which move a coverage by a few held-out rows (0.1-0.2 points), not
by the margins above. The slight over-coverage for known groups comes from counting the
conditional variance of the group's mode fully and ignoring its (negative) covariance with
the fixed effects (``predict_se``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import Control, NGMMError, datasets, ngmm


def _simulate(rng: np.random.Generator, G: int, m: int, neural: bool,
              b: np.ndarray | None = None, prefix: str = "g") -> tuple[pd.DataFrame, np.ndarray]:
    g = np.repeat(np.arange(G), m)
    x = rng.uniform(-2, 2, G * m)
    b = rng.normal(0, 1.0, G) if b is None else b
    f = np.sin(2 * x) if neural else 0.5 * x
    y = 1.0 + f + b[g] + rng.normal(0, 0.5, G * m)
    return pd.DataFrame({"y": y, "x": x, "g": [f"{prefix}{i}" for i in g]}), b


def _coverage(seed: int, neural: bool) -> tuple[int, int, int]:
    """(rows, covered among known-group rows, covered among new-group rows)."""
    rng = np.random.default_rng(seed)
    G, m = (60, 10) if neural else (40, 8)
    train, b = _simulate(rng, G, m, neural)
    known, _ = _simulate(rng, G, 10, neural, b=b)
    new, _ = _simulate(rng, G, 10, neural, prefix="new")
    formula = "y ~ nn(x, hidden=[16]) + (1 | g)" if neural else "y ~ x + (1 | g)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm(formula, train, control=Control(progress=False), seed=seed)
    hits = []
    for nd in (known, new):
        pi = fit.predict(nd, interval="prediction", level=0.95, allow_new_levels=True)
        hits.append(int(((nd.y >= pi.lwr) & (nd.y <= pi.upr)).sum()))
    return len(known), hits[0], hits[1]


@pytest.mark.parametrize(("neural", "n_sets"), [(False, 50), (True, 3)],
                         ids=["linear", "neural"])
def test_prediction_interval_coverage(neural: bool, n_sets: int) -> None:
    res = np.array([_coverage(s, neural) for s in range(n_sets)])
    n = res[:, 0].sum()
    known, new = res[:, 1].sum() / n, res[:, 2].sum() / n
    assert 0.93 <= known <= 0.97, known
    assert 0.93 <= new <= 0.97, new


@pytest.fixture(scope="module")
def sleep() -> tuple[object, pd.DataFrame]:
    d = datasets.load("sleepstudy")
    return ngmm("Reaction ~ Days + (Days | Subject)", d), d


def test_simulation_agrees_with_delta_method(sleep) -> None:  # type: ignore[no-untyped-def]
    fit, d = sleep
    nd = pd.concat([d.head(5), d.head(5).assign(Subject="new")])
    for interval in ("confidence", "prediction"):
        a = fit.predict(nd, interval=interval, allow_new_levels=True, method="delta")
        s = fit.predict(nd, interval=interval, allow_new_levels=True, method="simulation",
                        nsim=40_000, seed=1)
        # Monte Carlo error of a 2.5% quantile with 40,000 draws: sd ~ 0.012 s (s = the
        # interval's sd); 0.05 s is over 4 Monte Carlo standard deviations
        tol = 0.05 * a["se"].to_numpy()
        assert np.all(np.abs(s["lwr"] - a["lwr"]) < tol), interval
        assert np.all(np.abs(s["upr"] - a["upr"]) < tol), interval
        np.testing.assert_allclose(a["fit"], fit.predict(nd, allow_new_levels=True))


def test_interval_widths_are_ordered(sleep) -> None:  # type: ignore[no-untyped-def]
    fit, d = sleep
    nd = d.head(3)
    ci = fit.predict(nd, interval="confidence")
    pi = fit.predict(nd, interval="prediction")
    new = fit.predict(nd.assign(Subject="new"), interval="prediction", allow_new_levels=True)
    pop_ci = fit.predict(nd, interval="confidence", re_form="~0")
    # a new observation is less certain than its mean, and a new group than a known one
    assert np.all(pi.upr - pi.lwr > ci.upr - ci.lwr)
    assert np.all(new.upr - new.lwr > pi.upr - pi.lwr)
    # the population-mean interval uses the fixed part's variance only: x' V x
    X = np.column_stack([np.ones(3), nd.Days])
    se = np.sqrt(np.einsum("ij,jk,ik->i", X, fit.vcov.to_numpy(), X))
    np.testing.assert_allclose(pop_ci["se"], se, rtol=1e-10)
    # delta prediction interval: sqrt(s^2 + sigma^2)
    np.testing.assert_allclose(pi["se"] ** 2, ci["se"] ** 2 + fit.sigma ** 2, rtol=1e-10)


def test_glmm_intervals() -> None:
    d = datasets.load("cbpp")
    fit = ngmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", d, "binomial")
    ci = fit.predict(d.head(4), interval="confidence")
    assert np.all((ci.lwr < ci.fit) & (ci.fit < ci.upr) & (ci.lwr > 0) & (ci.upr < 1))
    pi = fit.predict(None, interval="prediction", nsim=500)  # simulation: binomial counts
    assert np.all((pi.lwr <= pi.fit) & (pi.fit <= pi.upr))
    with pytest.raises(NGMMError, match="method='delta'"):
        fit.predict(d.head(2), interval="prediction", method="delta")
    with pytest.raises(NGMMError, match="level must be"):
        fit.predict(d.head(2), interval="confidence", level=95)
    with pytest.raises(NGMMError, match="interval must be"):
        fit.predict(d.head(2), interval="tolerance")
    with pytest.raises(NGMMError, match="unexpected keyword"):
        fit.predict(d.head(2), nsim=10)
