r"""Data checks run before a fit: separation and the scale of the model-matrix columns.

Separation
----------
A fixed effect has an infinite maximum-likelihood estimate when some direction :math:`b \ne 0`
of the coefficients moves every observation's fitted value towards its response without ever
moving one away (Albert & Anderson 1984). For a 0/1 response :math:`y_i` that is

.. math::

    x_i^\top b \ge 0 \ (y_i = 1), \qquad x_i^\top b \le 0 \ (y_i = 0),
    \qquad \text{with } x_i^\top b \ne 0 \text{ for at least one } i,

(complete separation when every inequality is strict, quasi-complete otherwise). The log-
likelihood then increases without bound along :math:`b` -- also once the random effects are
integrated out, since each conditional likelihood increases along it -- and an optimiser
returns huge estimates with huge standard errors instead of stopping. As R's
``detectseparation`` (Konis 2007), the search is a linear programme. Writing the constraints
of each row as :math:`s_i x_i^\top b \ge 0` with :math:`s_i = \pm 1`, and :math:`x_i^\top b = 0`
for rows with :math:`s_i = 0` (a row that must not move: a binomial proportion strictly
between 0 and 1, a positive Poisson count), the programme

.. math::

    \min_b \ \|D b\|_1 \quad\text{subject to}\quad s_i x_i^\top b \ge 0,\quad
    x_j^\top b = 0 \ (s_j = 0),\quad \sum_i s_i x_i^\top b \ge 1,

with :math:`D` the columns' root mean squares, is feasible exactly when the data are
separated; the :math:`\ell_1` objective makes the direction sparse, so that its non-zero
entries name the few columns that separate rather than every column the cone happens to
contain. Which constraints the response gives (:math:`s_i`) is the family's business
(:meth:`~ngmm_formula.families.Family.separation_signs`).

The programme is solved by constraint generation: first on a subset of rows (every row of the
rarer kind up to :data:`SUBSET_ROWS` / 2, and random others), then adding the rows the
candidate direction violates, until it satisfies every row or the subset programme is
infeasible. An infeasible subset programme proves that the full data are not separated (fewer
constraints admit more directions); a direction that satisfies every row proves that they
are. Ordinary (not separated) data thus cost one small programme: about 10 ms for
100,000 rows and 5 columns, against 1.4 s for the programme on all rows.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from ngmm_formula.design import Design, SparseRows, full_rank_columns, full_rank_columns_gram
from ngmm_formula.errors import SeparationWarning
from ngmm_formula.scaling import SCALE_RATIO, column_scale_problems

if TYPE_CHECKING:
    from ngmm_formula.families import Family

__all__ = ["SCALE_RATIO", "SUBSET_ROWS", "check_separation", "column_scale_problems",
           "separating_columns"]

#: Rows in the first linear programme of the separation check (and rows added per round).
SUBSET_ROWS = 2000
#: Most violated rows added to the programme per round of constraint generation.
ADD_ROWS = 5000
#: Rows of each sign per column in the first programme of a sparse (wide factor) design.
ROWS_PER_COLUMN = 10


def _solve(A_ub: Any, A_eq: Any, total: np.ndarray) -> np.ndarray | None:
    r"""The programme of the module docstring on the rows given (already signed: ``A_ub`` rows
    are :math:`s_i x_i`), normalised by ``total`` (:math:`\sum_i s_i x_i` over *every*
    row); returns the direction or None when infeasible. Dense arrays or scipy sparse
    matrices (a wide factor design's: HiGHS takes them sparse)."""
    p = total.size
    # variables b = b_plus - b_minus, both >= 0; objective sum(b_plus + b_minus)
    c = np.ones(2 * p)
    stack, side = (sp.vstack, sp.hstack) if sp.issparse(A_ub) else (np.vstack, np.hstack)
    ub = stack([side([-A_ub, A_ub]),                                   # s_i x_i b >= 0
                np.hstack([-total, total])[None, :]])                  # sum_i s_i x_i b >= 1
    b_ub = np.zeros(ub.shape[0])
    b_ub[-1] = -1.0
    eq = side([A_eq, -A_eq]) if A_eq.shape[0] else None
    res = linprog(c, A_ub=ub, b_ub=b_ub, A_eq=eq,
                  b_eq=np.zeros(A_eq.shape[0]) if eq is not None else None,
                  bounds=(0, None), method="highs")
    if res.status != 0:  # 2: infeasible (no separation); anything else: treat as none found
        return None
    return np.asarray(res.x[:p] - res.x[p:])


def _direction(Xs: Any, s: np.ndarray, cols: np.ndarray, first: np.ndarray,
               max_rounds: int) -> tuple[np.ndarray | None, np.ndarray]:
    """A separating direction on the columns ``cols`` of the scaled matrix, by constraint
    generation from the rows ``first``; returns it (None: no separation) and the rows used."""
    Xc = Xs[:, cols]
    if sp.issparse(Xc):  # a wide factor design: sparse programmes
        Xc = Xc.tocsr()
        A = (sp.diags(s) @ Xc).tocsr()
        total = np.asarray(A.sum(0)).ravel()
        row_norm = np.sqrt(np.asarray(Xc.multiply(Xc).sum(1)).ravel())
    else:
        A = Xc * s[:, None]
        total = A.sum(0)  # the normalisation over every row: see the module docstring
        row_norm = np.linalg.norm(Xc, axis=1)
    n = len(s)
    chosen = first
    for _ in range(max_rounds):
        b = _solve(A[chosen[s[chosen] != 0]], Xc[chosen[s[chosen] == 0]], total)
        if b is None:
            return None, chosen
        # HiGHS meets the constraints to about 1e-7: a row of the programme "violated" by
        # less is satisfied, and so is any row already in it
        tol = 1e-6 * float(np.abs(b).max()) * np.maximum(row_norm, 1.0)
        slack = np.where(s != 0, A @ b, -np.abs(Xc @ b))
        violated = np.setdiff1d(np.flatnonzero(slack < -tol), chosen, assume_unique=True)
        if violated.size == 0:
            return b, chosen
        if chosen.size >= n:
            break
        worst = violated[np.argsort(slack[violated])[:ADD_ROWS]]
        chosen = np.union1d(chosen, worst)
    every = np.arange(n)
    return _solve(A[s != 0], Xc[s == 0], total), every


def _rows_of_every_column(X: Any, s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to :data:`ROWS_PER_COLUMN` random rows of each sign (+1, -1, 0) among the rows
    with a non-zero in each column of the sparse ``X``: the first programme of a wide factor
    design then constrains every level (2,000 random rows of 810,000 leave most of 500 items
    with a handful of rows, and the programme keeps finding directions that the other rows
    violate: 20 rounds, then all rows). O(nnz log nnz)."""
    C = X.tocoo()
    rows, cols = C.row[C.data != 0], C.col[C.data != 0]
    order = np.lexsort((rng.permutation(X.shape[0])[rows], s[rows], cols))
    rows, key = rows[order], cols[order] * 3 + (s[rows[order]] + 1).astype(np.int64)
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    rank = np.arange(key.size) - np.repeat(start, np.diff(np.r_[start, key.size]))
    return np.unique(rows[rank < ROWS_PER_COLUMN])


def separating_columns(X: Any, signs: np.ndarray, *, seed: int = 0,
                       max_rounds: int = 20) -> list[int] | None:
    r"""The columns of a separating direction of ``X``, or None if the data are not separated.

    Parameters
    ----------
    X : ndarray or scipy sparse matrix, shape (n, p)
        Full-rank fixed-effects model matrix (finite values); sparse for a wide factor
        design (the linear programmes then take the rows they use as dense arrays).
    signs : ndarray, shape (n,)
        :math:`s_i`: +1 where the fitted value may only increase (:math:`x_i^\top b \ge 0`),
        -1 where it may only decrease, 0 where it must stay (:math:`x_i^\top b = 0`), NaN for
        rows that carry no information (zero weight) and are left out.
    seed : int
        Seeds the choice of the first subset of rows (the answer does not depend on it).
    max_rounds : int
        Rounds of constraint generation before a programme is solved on every row.

    Returns
    -------
    list of int or None
        Indices of the columns that separate: the support of the sparsest direction found
        (columns scaled to unit root mean square; :math:`|b_j| > 10^{-6} \max_k |b_k|`),
        pruned greedily -- smallest :math:`|b_j|` first, a column goes when the others still
        separate without it -- so that no named column is superfluous.
    """
    s = np.asarray(signs, dtype=float)
    keep = np.isfinite(s)
    X = X.tocsr()[keep] if sp.issparse(X) else np.asarray(X, dtype=float)[keep]
    s = s[keep]
    n, p = X.shape
    if p == 0 or n == 0 or not (s != 0).any():
        return None
    if sp.issparse(X):
        rms = np.sqrt(np.asarray(X.multiply(X).mean(axis=0)).ravel())
        rms[rms == 0] = 1.0
        Xs = (X @ sp.diags(1.0 / rms)).tocsc()
    else:
        rms = np.sqrt(np.mean(X * X, axis=0))
        rms[rms == 0] = 1.0
        Xs = X / rms
    if n <= SUBSET_ROWS:
        first = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        half = SUBSET_ROWS // 2
        first = np.unique(np.concatenate([rng.permutation(np.flatnonzero(s == k))[:half]
                                          for k in (1.0, -1.0, 0.0)]))
        if sp.issparse(Xs):
            first = np.union1d(first, _rows_of_every_column(Xs, s, rng))
    cols = np.arange(p)
    b, rows = _direction(Xs, s, cols, first, max_rounds)
    if b is None:
        return None
    support = cols[np.abs(b) > 1e-6 * float(np.abs(b).max())]
    weights = dict(zip(cols.tolist(), np.abs(b).tolist()))
    for j in sorted(support.tolist(), key=lambda k: weights[k]):
        if support.size == 1:
            break
        rest = support[support != j]
        b_rest, rows = _direction(Xs, s, rest, rows, max_rounds)
        if b_rest is not None:
            support = rest[np.abs(b_rest) > 1e-6 * float(np.abs(b_rest).max())]
    return [int(j) for j in support]


def _checked_columns(design: Design) -> tuple[Any, list[int]]:
    """The fixed effects and the networks' input columns, of full rank, and their positions
    among all of them: dense, or scipy's compressed sparse columns for a wide factor design
    (its rank then from the cross-product, :func:`full_rank_columns_gram`)."""
    if isinstance(design.X, SparseRows):
        X = sp.hstack([design.X.csr(), *(sp.csr_matrix(ni.X) for ni in design.nets)]).tocsc()
        cols = (full_rank_columns_gram(np.asarray((X.T @ X).toarray())) if design.nets
                else list(range(X.shape[1])))
        return X[:, cols], cols
    blocks = [design.X, *(ni.X for ni in design.nets)]
    X = np.hstack(blocks) if len(blocks) > 1 else design.X
    cols = list(range(X.shape[1]))
    if len(blocks) > 1:
        cols = full_rank_columns(X)
        X = X[:, cols]
    return X, cols


def check_separation(design: Design, family: Family, *, stacklevel: int = 2) -> list[str]:
    r"""Warn (:class:`~ngmm_formula.errors.SeparationWarning`) when the response is separated.

    The family gives the row constraints
    (:meth:`~ngmm_formula.families.Family.separation_signs`: binomial families, and Poisson
    and negative binomial with the log link); the columns are the fixed effects :math:`X`
    and the standardised input columns of the ``nn()`` terms, taken linearly. The networks'
    inputs are included because the fit of a neural model starts from the GLMM in which they
    enter linearly (:func:`~ngmm_formula.train.fit_linear_start`), whose coefficients
    diverge along a separating input just like a fixed effect's; a network can separate in
    nonlinear ways too, which no linear check sees (its weights are kept finite by the
    weight decay and early stopping of the training). Input columns aliased with earlier
    ones (an input that is also a fixed effect, a level of a one-hot factor) are left out as
    the linear start leaves them out.

    A warning, not an error: see :class:`~ngmm_formula.errors.SeparationWarning`.

    Returns
    -------
    list of str
        The separating columns named in the warning (empty when there is none).
    """
    signs = family.separation_signs(design.y, design.weights)
    if signs is None or design.nobs == 0:
        return []
    names = list(design.fixed_names)
    for ni in design.nets:
        names += [f"{ni.term.label}: input {c}" for c in ni.columns]
    X, cols = _checked_columns(design)
    found = separating_columns(X, signs)
    if not found:
        return []
    named = [names[cols[j]] for j in found]
    warnings.warn(
        f"the {family.name} response '{design.response_name}' is separated by the fixed-effect "
        f"column(s) {named}: some combination of them fits every observation at least as well "
        "the further it goes, so their estimates are infinite (not identifiable) and the fit "
        "reports huge values with huge standard errors; drop or merge the column(s) (a factor "
        "level with only one outcome), or use a penalised (Firth) or Bayesian fit",
        SeparationWarning, stacklevel=stacklevel)
    return named
