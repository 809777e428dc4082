"""Columns on a scale the fit cannot handle.

Below the design layer (:mod:`ngmm_formula.design` warns with it while it builds the model
matrices); :mod:`ngmm_formula.checks` re-exports it beside the separation check.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCALE_RATIO", "column_scale_problems", "sparse_column_scale_problems"]

#: A column whose root mean square differs from the median of the others' by more than this
#: factor is reported as on an extreme scale.
SCALE_RATIO = 1e8


def column_scale_problems(X: np.ndarray, names: list[str] | tuple[str, ...]
                          ) -> tuple[list[str], list[str]]:
    r"""Columns whose scale the fit cannot handle, and columns on an extreme scale.

    Parameters
    ----------
    X : ndarray, shape (n, p)
        A model matrix (finite values).
    names : sequence of str
        The columns' names.

    Returns
    -------
    overflow : list of str
        Columns whose sum of squares overflows float64 (:math:`\max_i |x_{ij}| >
        \sqrt{\text{DBL\_MAX} / n}`): cross-products and norms of them are infinite, so the
        rank check and the fit cannot use them.
    extreme : list of str
        Non-constant columns whose root mean square is more than :data:`SCALE_RATIO` times
        the lower median of all columns' root mean squares (the intercept's is 1), or less
        than the upper median divided by it (lme4 warns
        "Some predictor variables are on very different scales" from a ratio of 1e3; here only
        ratios that cost the optimiser accuracy are reported).
    """
    X = np.asarray(X, dtype=float)
    n, p = X.shape
    if n == 0 or p == 0:
        return [], []
    peak = np.abs(X).max(axis=0)
    safe = np.where(peak > 0, peak, 1.0)
    with np.errstate(over="ignore", under="ignore"):
        rms = safe * np.sqrt(np.mean((X / safe) ** 2, axis=0))  # no overflow in the squares
    return _scale_problems(n, peak, rms, np.ptp(X, axis=0) == 0, names)


def sparse_column_scale_problems(values: np.ndarray, columns: np.ndarray,
                                 names: list[str] | tuple[str, ...]
                                 ) -> tuple[list[str], list[str]]:
    """:func:`column_scale_problems` of a matrix given by its rows' non-zeros: ``values``
    (n, m) in ``columns`` (n, m) (a :class:`~ngmm_formula.design.SparseRows`), the other
    entries 0; O(n m), never the (n, p) matrix."""
    n, p = values.shape[0], len(names)
    if n == 0 or p == 0:
        return [], []
    cols, v = columns.reshape(-1), np.asarray(values, dtype=float).reshape(-1)
    peak = np.zeros(p)
    np.maximum.at(peak, cols, np.abs(v))
    safe = np.where(peak > 0, peak, 1.0)
    with np.errstate(over="ignore", under="ignore"):
        rms = safe * np.sqrt(np.bincount(cols, (v / safe[cols]) ** 2, minlength=p) / n)
    stored = np.bincount(cols, v != 0, minlength=p)
    high, low = np.zeros(p), np.zeros(p)  # a column with fewer than n non-zeros holds a 0
    np.maximum.at(high, cols, v)
    np.minimum.at(low, cols, v)
    full = stored == n
    if full.any():
        high[full], low[full] = -np.inf, np.inf
        at = full[cols] & (v != 0)
        np.maximum.at(high, cols[at], v[at])
        np.minimum.at(low, cols[at], v[at])
    return _scale_problems(n, peak, rms, high == low, names)


def _scale_problems(n: int, peak: np.ndarray, rms: np.ndarray, constant: np.ndarray,
                    names: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The decision of :func:`column_scale_problems` from each column's largest absolute
    value, root mean square and constancy."""
    p = len(names)
    limit = np.sqrt(np.finfo(float).max / max(n, 1))
    overflow = [names[j] for j in range(p) if peak[j] > limit]
    rms = np.where(peak > 0, rms, 0.0)
    finite = rms[rms > 0]
    if finite.size < 2:
        return overflow, []
    ordered = np.sort(finite)
    lower, upper = ordered[(ordered.size - 1) // 2], ordered[ordered.size // 2]
    extreme = [names[j] for j in range(p)
               if not constant[j] and names[j] not in overflow and rms[j] > 0
               and (rms[j] > SCALE_RATIO * lower or rms[j] < upper / SCALE_RATIO)]
    return overflow, extreme
