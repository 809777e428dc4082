"""A simulated binomial GLMM with two large crossed factors (issue 14).

:func:`simulate_binomial` draws the data of the panel's crossed binomial model
(``benchmarks/glmm_panel.py``, model ``crossed_binomial``), fitted by Laplace as
``y ~ x + (1 | a) + (1 | b)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def simulate_binomial(n: int = 100_000, n_a: int = 1500, n_b: int = 1200,
                      seed: int = 1) -> pd.DataFrame:
    """Bernoulli responses with a covariate and two crossed random intercepts.

    For row ``i``: ``x_i ~ N(0, 1)``; its levels ``a_i`` and ``b_i`` drawn uniformly from
    ``n_a`` and ``n_b`` levels, independently (so the factors are crossed, each pair of levels
    seen about ``n / (n_a n_b)`` times); ``u ~ N(0, 0.8^2)`` per level of ``a``,
    ``v ~ N(0, 0.5^2)`` per level of ``b``;

        eta_i = -0.3 + 0.5 x_i + u[a_i] + v[b_i],    y_i ~ Bernoulli(1 / (1 + exp(-eta_i))).

    All draws come from ``numpy.random.default_rng(seed)``, so a (n, n_a, n_b, seed) gives the
    same frame on every call. Returns the columns ``y`` (int 0/1), ``x`` (float), ``a`` and
    ``b`` (int level codes ``0..n_a-1`` and ``0..n_b-1``; make them categorical to fit).
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, n)
    a = rng.integers(0, n_a, n)
    b = rng.integers(0, n_b, n)
    u = rng.normal(0.0, 0.8, n_a)
    v = rng.normal(0.0, 0.5, n_b)
    eta = -0.3 + 0.5 * x + u[a] + v[b]
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(np.int64)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})
