"""Writes ``poisson_slope.csv``: a Poisson random-slope data set whose default fit once failed.

``y ~ t1 + x3 + (1 + x3 | g)``, 200 groups of 20 rows, t1 = |x1|, counts up to 141 (the
``slope`` shape of ``benchmarks/neural/suite.py``, poisson, seed 3002, with f's term as the
column ``t1``). Its default fit (adaptive quadrature, 7 x 7 nodes) raised a LinAlgError when a
line search's trial point made a group's warm-started curvature singular to round-off
(``tests/test_objective.py::test_poisson_random_slope_after_a_long_line_search_step``).
``make_poisson_slope_ref.R`` fits it with lme4. Run from the repository root::

    python tests/reference/poisson_slope.py
"""

from pathlib import Path

import numpy as np
import pandas as pd


def poisson_slope(seed: int = 3002, groups: int = 200, per_group: int = 20) -> pd.DataFrame:
    """The training rows of suite.py's ``slope`` shape, poisson (the same draws)."""
    rng = np.random.default_rng([seed, 6, 2])  # 6: 'slope' among the sorted shapes
    n_groups = groups + 50  # and 50 new groups, drawn but not kept
    size = np.full(n_groups, per_group)
    rows = size + np.where(np.arange(n_groups) < groups, size // 2, 0)
    g = np.repeat(np.arange(n_groups), rows)
    pos = np.concatenate([np.arange(r) for r in rows])
    n = len(g)
    x1, _x2, x3 = rng.uniform(-2, 2, n), rng.uniform(-2, 2, n), rng.normal(size=n)
    f = 1.2 * np.abs(x1) - 1.0
    b, s = rng.normal(0.0, 1.0, n_groups), rng.normal(0.0, 0.5, n_groups)
    eta = f - f.mean() + 0.5 * x3 + b[g] + s[g] * x3
    y = rng.poisson(np.exp(np.minimum(eta, 8.0)))
    keep = (g < groups) & (pos < size[g])
    return pd.DataFrame({"y": y, "t1": np.abs(x1), "x3": x3,
                         "g": [f"g{k:03d}" for k in g]})[keep].reset_index(drop=True)


if __name__ == "__main__":
    poisson_slope().to_csv(Path(__file__).with_name("poisson_slope.csv"), index=False,
                           float_format="%.17g")
