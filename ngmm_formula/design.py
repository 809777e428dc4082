"""Design layer: :class:`ParsedFormula` + DataFrame -> :class:`Design`.

The design holds everything the engine needs as arrays, in lme4's notation:

* ``y`` (the response; for binomial models the proportion of successes), ``weights`` (prior
  weights; for ``cbind`` responses the number of trials), ``offset``;
* ``X`` (n x p fixed-effects model matrix, full column rank, with lme4-like column names);
* ``re_terms``: one :class:`ReTerm` per random-effects term in lme4's order (terms sorted by
  decreasing number of levels), each with its grouping index ``group_index`` (n,), its raw
  model matrix ``Zraw`` (n x q; a reduced-rank term ``rr(... | g, d = K)`` keeps it as
  :class:`SparseRows`, its nonzeros by row) and the names ``cnms``; the sparse ``Zt`` of lme4
  is assembled from them (:meth:`Design.Zt`) and never stored densely;
* the layout of the covariance parameters ``theta`` (lower-triangular relative Cholesky
  factor of each term, column-major, as lme4's ``theta``/``Lind``; the q x d loading matrix
  of a reduced-rank term in the same order, :func:`tril_pairs`);
* ``nets``: the standardised input matrix of every ``nn()`` term with its encoding state.

``formulaic`` is imported only here. Its ``ModelSpec`` objects, the grouping-factor levels and
the standardisation of network inputs are kept in :class:`DesignSpec` so that
:meth:`DesignSpec.new_data` encodes new data exactly as the training data were encoded;
unseen grouping levels are flagged with index ``-1``.

Formula expressions are evaluated by formulaic on the data, with the formula transforms and the
names of ``context=`` (never the caller's variables): before anything is materialised the
formula is checked again with the data's column names (:func:`parse_formula` with ``names=``)
and every Python factor formulaic parsed is checked by :func:`~ngmm_formula.safety.check_python`
(:func:`_checked_formula`), so that nothing but the data, the transforms and ``context=`` is
reachable.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from formulaic import Formula
from formulaic.errors import DataMismatchWarning
from formulaic.formula import SimpleFormula

from ngmm_formula.errors import DataError, FormulaError, NewLevelsError, ScaleWarning
from ngmm_formula.formula import BarTerm, NNTerm, ParsedFormula, parse_formula
from ngmm_formula.safety import EXTRA_TRANSFORMS, IDENTIFIER, check_python
from ngmm_formula.scaling import SCALE_RATIO, column_scale_problems, sparse_column_scale_problems

__all__ = [
    "Agreement",
    "Design",
    "tril_pairs",
    "theta_diagonals",
    "reapply_spec",
    "DesignSpec",
    "EMBED_MIN_LEVELS",
    "NetEncoding",
    "NetInput",
    "NewData",
    "ReTerm",
    "SparseRows",
    "FixedMatrix",
    "WIDE_SPARSE_MAX_DENSITY",
    "WIDE_SPARSE_MIN_COLUMNS",
    "wide_and_sparse",
    "matrix_column",
    "re_loaded",
    "matrix_columns",
    "ZMatrix",
    "group_labels",
    "re_effect",
    "re_quadratic",
    "build_design",
    "full_rank_columns",
    "full_rank_columns_gram",
    "required_columns",
    "check_reduced_rank_response",
    "check_spec_formula",
    "spec_from_data",
    "spec_to_data",
]

NaAction = Literal["omit", "raise"]


@functools.cache
def tril_pairs(q: int, d: int | None = None) -> tuple[tuple[int, int], ...]:
    """Positions ``(row, column)`` of a term's theta entries in lme4's order: the lower
    triangle of the q x q relative Cholesky factor, column by column; with ``d`` (a
    reduced-rank term) the lower triangle of the q x d loading matrix in the same order,
    glmmTMB's order for ``rr()``."""
    return tuple((i, j) for j in range(q if d is None else d) for i in range(j, q))


def theta_diagonals(q: Sequence[int], ranks: Sequence[int | None] = ()) -> np.ndarray:
    """Which entries of theta (terms of sizes ``q``, reduced to rank ``ranks[k]`` where not
    None; empty: none is) are diagonals of lme4's :math:`\\Lambda_k`, in
    :func:`tril_pairs`' order: the entries bounded below by 0 and started at 1."""
    return np.array([i == j for k, d in zip(q, ranks or (None,) * len(q))
                     for i, j in tril_pairs(k, d)], dtype=bool)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


# --------------------------------------------------------------------------------------------
# value types


@dataclass(frozen=True)
class SparseRows:
    """A model matrix with few nonzeros per row, as ``m`` (value, column) pairs per row: the
    indicator columns of a factor (``rr(0 + item | id)`` has one nonzero in each row,
    whatever the number of items), in O(n m) memory instead of O(n q). A reduced-rank
    term's Z, and the fixed-effects X of a wide factor design (:func:`wide_and_sparse`).

    Attributes
    ----------
    values : ndarray of float64, shape (n, m)
        The nonzero values of each row (padded with zeros).
    columns : ndarray of int32, shape (n, m)
        Their columns, 0..n_columns-1 (0 for the padding).
    n_columns : int
        q, the number of columns of the matrix.
    """

    values: np.ndarray
    columns: np.ndarray
    n_columns: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), self.n_columns)

    @classmethod
    def of(cls, Z: Any) -> SparseRows:
        """From a dense array, a scipy sparse matrix or formulaic's sparse model matrix."""
        M = sp.csr_matrix(Z, dtype=float)
        M.eliminate_zeros()
        n, q = M.shape
        nnz = np.diff(M.indptr)
        m = max(int(nnz.max()) if n else 0, 1)
        values = np.zeros((n, m))
        columns = np.zeros((n, m), dtype=np.int32)
        slot = np.arange(M.nnz) - np.repeat(M.indptr[:-1], nnz)
        rows = np.repeat(np.arange(n), nnz)
        values[rows, slot] = M.data
        columns[rows, slot] = M.indices
        return cls(_frozen(values), _frozen(columns), int(q))

    def dense(self) -> np.ndarray:
        """The (n, q) matrix (for small problems and checks only)."""
        out = np.zeros(self.shape)
        np.add.at(out, (np.arange(self.shape[0])[:, None], self.columns), self.values)
        return out

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        """:math:`M v` for a vector ``v`` (q,), by a gather and a sum over each row's
        entries (fixed order): O(n m)."""
        return (self.values * np.asarray(v)[self.columns]).sum(axis=1)  # type: ignore[no-any-return]

    def csr(self) -> sp.csr_matrix:
        """As a scipy CSR matrix (m stored entries per row, padding included)."""
        n, m = self.values.shape
        return sp.csr_matrix((self.values.reshape(-1), self.columns.reshape(-1).astype(np.int64),
                              np.arange(0, n * m + 1, m)), shape=self.shape)

    def gram(self) -> np.ndarray:
        r""":math:`M^\top M`, dense (q, q)."""
        M = self.csr()
        return np.asarray((M.T @ M).toarray())

    def keep_columns(self, kept: list[int] | tuple[int, ...]) -> SparseRows:
        """The matrix of the columns ``kept`` (in that order), as ``M[:, kept]``: entries in
        other columns become padding (value 0, column 0)."""
        new = np.full(self.n_columns, -1, dtype=np.int64)
        new[list(kept)] = np.arange(len(kept))
        cols = new[self.columns]
        gone = cols < 0
        return SparseRows(_frozen(np.where(gone, 0.0, self.values)),
                          _frozen(np.where(gone, 0, cols).astype(np.int32)), len(kept))

    def column_sums(self) -> np.ndarray:
        r""":math:`\sum_i M_{ij}` per column, from the non-zeros."""
        return np.bincount(self.columns.reshape(-1), weights=self.values.reshape(-1),
                           minlength=self.n_columns)


#: A fixed-effects model matrix of at least this many columns with at most
#: :data:`WIDE_SPARSE_MAX_DENSITY` of its entries non-zero (the indicator columns of a factor
#: with many levels: an item-response model's ``0 + item``) is held as :class:`SparseRows`:
#: memory O(n m) for m non-zeros per row instead of O(n p), ``X beta`` by a gather (the dense
#: 809,983 x 503 matrix of 10^6 responses was 3.3 GB, and each ``X beta`` made a temporary of
#: that size). Smaller or denser designs stay dense, bit for bit as before.
WIDE_SPARSE_MIN_COLUMNS = 50
WIDE_SPARSE_MAX_DENSITY = 0.1


def wide_and_sparse(n_rows: int, n_columns: int, nnz: int) -> bool:
    """Whether a matrix of this shape and number of non-zeros is held sparse
    (:data:`WIDE_SPARSE_MIN_COLUMNS`, :data:`WIDE_SPARSE_MAX_DENSITY`)."""
    return (n_columns >= WIDE_SPARSE_MIN_COLUMNS
            and nnz <= WIDE_SPARSE_MAX_DENSITY * n_rows * n_columns)


#: A fixed-effects model matrix: dense (n, p), or :class:`SparseRows` for a wide factor design
#: (:func:`wide_and_sparse`).
FixedMatrix = np.ndarray | SparseRows


def matrix_column(X: FixedMatrix, j: int) -> np.ndarray:
    """Column ``j`` of ``X`` as a dense (n,) array (a :class:`SparseRows` one's from its
    entries in that column: O(n m))."""
    if isinstance(X, SparseRows):
        return (X.values * (X.columns == j)).sum(axis=1)  # type: ignore[no-any-return]
    return X[:, j]


def matrix_columns(X: FixedMatrix) -> Iterator[np.ndarray]:
    """The columns of ``X`` one at a time, as dense (n,) arrays: ``X.T``'s rows, or a
    :class:`SparseRows` matrix's columns from its compressed-column form (O(n) memory each,
    never the (n, p) matrix)."""
    if isinstance(X, SparseRows):
        C = X.csr().tocsc()
        for j in range(X.n_columns):
            yield np.asarray(C[:, j].toarray()).ravel()
    else:
        yield from X.T


#: A term's raw model matrix: dense (n, q), or :class:`SparseRows` (reduced-rank terms).
ZMatrix = np.ndarray | SparseRows


def re_loaded(Z: ZMatrix, L: np.ndarray) -> np.ndarray:
    r""":math:`Z_i \Lambda` per row (n, d) for a (q, d) matrix ``L``: a reduced-rank term's
    rows in the coordinates of its factor scores (never n x q for :class:`SparseRows`)."""
    if isinstance(Z, SparseRows):
        return (Z.values[:, :, None] * L[Z.columns]).sum(1)  # type: ignore[no-any-return]
    return np.asarray(Z) @ L


def re_effect(Z: ZMatrix, group_index: np.ndarray, b: np.ndarray) -> np.ndarray:
    r""":math:`\sum_j Z_{ij} b_{g(i), j}` per row for per-level effects ``b`` (levels, q);
    0 for rows whose level is unknown (``group_index`` -1). Never forms ``b[g]`` (n x q) for
    a :class:`SparseRows` matrix."""
    known = group_index >= 0
    gi = np.where(known, group_index, 0)
    if isinstance(Z, SparseRows):
        out = (Z.values * b[gi[:, None], Z.columns]).sum(1)
    else:
        out = (Z * b[gi]).sum(1)
    return np.where(known, out, 0.0)


def re_quadratic(Z: ZMatrix, M: np.ndarray, group_index: np.ndarray | None = None
                 ) -> np.ndarray:
    r""":math:`z_i^\top M z_i` per row, with one (q, q) matrix ``M`` or, with ``group_index``,
    one per level (levels, q, q) taken at each row's level (rows with index -1 give 0)."""
    if group_index is not None:
        known = group_index >= 0
        gi = np.where(known, group_index, 0)
    if isinstance(Z, SparseRows):
        c, v = Z.columns, Z.values
        if group_index is None:
            Mr = M[c[:, :, None], c[:, None, :]]  # (n, m, m)
        else:
            Mr = M[gi[:, None, None], c[:, :, None], c[:, None, :]]
        out = np.einsum("ij,ijk,ik->i", v, Mr, v)
    elif group_index is None:
        out = np.einsum("ij,jk,ik->i", Z, M, Z)
    else:
        out = np.einsum("ij,ijk,ik->i", Z, M[gi], Z)
    return out if group_index is None else np.where(known, out, 0.0)



@dataclass(frozen=True)
class ReTerm:
    """One random-effects term ``(expr | group)`` evaluated on the data.

    Attributes
    ----------
    name : str
        Label of the term's grouping factor in tables: the factor name, made unique as lme4's
        ``VarCorr`` does when two terms share a factor (``Subject``, ``Subject.1``).
    group : str
        Grouping factor (``"BROOD:LOCATION"`` for a nested term).
    expr : str
        The term's formula.
    correlated : bool
        False for the terms of a ``||`` expansion.
    cnms : tuple of str
        Names of the term's q columns, lme4's ``cnms`` (``("(Intercept)", "Days")``).
    levels : tuple of str
        The grouping factor's levels (lme4's order).
    group_index : ndarray of int32, shape (n,)
        Level of each observation (int32: half the memory of int64; torch's index_add,
        gather and advanced indexing accept it).
    Zraw : ndarray, shape (n, q), or SparseRows
        Values of the term's columns for each observation; a reduced-rank term keeps them
        as :class:`SparseRows` (an item factor's indicators: one nonzero per row).
    rank : int or None
        d of a reduced-rank term ``rr(expr | group, d = d)``: its q effects per level are
        :math:`\\Lambda z` with a q x d loading matrix :math:`\\Lambda` (lower triangular,
        positive diagonal) and :math:`z \\sim N(0, I_d)`, so each level integrates over d
        coordinates; None for an ordinary term (:math:`\\Lambda` q x q).
    """

    name: str
    group: str
    expr: str
    correlated: bool
    cnms: tuple[str, ...]
    levels: tuple[str, ...]
    group_index: np.ndarray
    Zraw: ZMatrix
    rank: int | None = None

    @property
    def q(self) -> int:
        """Number of random-effect columns."""
        return len(self.cnms)

    @property
    def dim(self) -> int:
        """Number of integrated coordinates per level: d for a reduced-rank term, else q."""
        return self.q if self.rank is None else self.rank

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_theta(self) -> int:
        """Number of covariance parameters: q(q+1)/2 (lower triangle of Lambda's block), or
        qd - d(d-1)/2 loadings of a reduced-rank term."""
        return len(tril_pairs(self.q, self.rank))

    def theta_names(self) -> list[str]:
        """lme4's names, lower triangle column by column (``Subject.Days.(Intercept)``); a
        reduced-rank term's loadings are ``id.itemA.F1`` (column of item A on factor 1)."""
        if self.rank is not None:
            return [f"{self.group}.{self.cnms[i]}.F{j + 1}"
                    for i, j in tril_pairs(self.q, self.rank)]
        return [f"{self.group}.{self.cnms[i]}" if i == j
                else f"{self.group}.{self.cnms[i]}.{self.cnms[j]}"
                for i, j in tril_pairs(self.q)]


#: Factors of ``nn()`` inputs with more levels than this enter their network through a learnt
#: embedding (kind ``"embedded"``: one column of integer codes) instead of one-hot columns
#: (kind ``"categorical"``); see :class:`NetEncoding`. 0: every factor. One-hot input
#: showed no advantage where measured: on ``benchmarks/neural/suite.py``'s ``factor`` shape
#: (a 60-level factor; dev half, 5 seeds) embeddings closed more of the GLMM-to-oracle gap
#: in every family (known / new groups: gaussian 78.6 / 82.2 % against 75.2 / 80.9 %,
#: binomial 53.5 / 54.0 against 19.8 / 29.6, poisson 93.3 / 93.1 against 92.1 / 92.3), and
#: one code column costs O(n) where one-hot columns cost O(n x levels). Kept as a constant
#: so that the one-hot encoding stays reachable (and model files written before embeddings,
#: whose factors are one-hot, load and predict as they did).
EMBED_MIN_LEVELS = 0


@dataclass(frozen=True)
class NetEncoding:
    """How one ``nn()`` input variable is encoded (learnt on the training data).

    Numeric variables are standardised, ``(x - center) / scale``. Factors are either one-hot
    encoded over ``levels`` (kind ``"categorical"``: all levels, no reference level) or, with
    more than :data:`EMBED_MIN_LEVELS` levels (kind ``"embedded"``), held as one column of
    integer codes ``0 .. len(levels) - 1`` (stored as floats in the input matrix, exact up to
    :data:`MAX_EMBEDDED_LEVELS`) that the network looks up in a learnt embedding table
    (:class:`~ngmm_formula.networks.MLP`): memory O(n + levels x dim) instead of
    O(n x levels).

    **New levels.** A level absent from the training data raises
    :class:`~ngmm_formula.errors.NewLevelsError` unless ``allow_new_levels`` (the flag of
    ``predict``); then an embedded factor gets the code ``len(levels)``, the network's
    reserved *unseen* row, which is zero -- the value the embeddings' shrinkage pulls every
    level towards, i.e. the estimate for a level without data -- and a one-hot factor gets an
    all-zero row (the same thing for a one-hot first layer).
    """

    variable: str
    kind: Literal["numeric", "categorical", "embedded"]
    center: float = 0.0
    scale: float = 1.0
    levels: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        if self.kind in ("numeric", "embedded"):
            return [self.variable]
        return [f"{self.variable}[{lv}]" for lv in self.levels]

    @property
    def unseen_code(self) -> int:
        """The code of a level not in the training data (embedded factors)."""
        return len(self.levels)

    def encode(self, values: pd.Series, *, allow_new_levels: bool = False) -> np.ndarray:
        """The input columns of ``values``, shape (n, len(columns)).

        Raises
        ------
        DataError
            A numeric variable that is not numeric here.
        NewLevelsError
            A factor level absent from the training data, unless ``allow_new_levels``.
        """
        if self.kind == "numeric":
            try:
                x = np.asarray(values, dtype=float)
            except (TypeError, ValueError):
                raise DataError(f"nn() input '{self.variable}' is {values.dtype} but was "
                                "numeric in the training data") from None
            return ((x - self.center) / self.scale)[:, None]
        codes = pd.Index(list(self.levels)).get_indexer(pd.Index(values.astype(str)))  # -1: unseen
        unseen = codes < 0
        if unseen.any() and not allow_new_levels:
            raise NewLevelsError(self.variable, list(set(values.astype(str)[unseen])),
                                 what="nn() input", advice=NEW_INPUT_LEVELS_ADVICE)
        if self.kind == "embedded":
            return np.where(unseen, self.unseen_code, codes).astype(float)[:, None]
        out = np.zeros((len(values), len(self.levels)))
        seen = np.flatnonzero(~unseen)
        out[seen, codes[seen]] = 1.0
        return out


#: Levels of one embedded factor up to which its float32 codes are exact integers (2^24).
MAX_EMBEDDED_LEVELS = 1 << 24

#: What :class:`~ngmm_formula.errors.NewLevelsError` advises for new levels of an ``nn()``
#: input factor.
NEW_INPUT_LEVELS_ADVICE = ("use allow_new_levels=True to predict them as a level without "
                           "data (the network's zero 'unseen' embedding)")


@dataclass(frozen=True)
class NetInput:
    """Input matrix of one ``nn()`` term: standardised numeric, one-hot and code columns
    (:class:`NetEncoding`)."""

    term: NNTerm
    encodings: tuple[NetEncoding, ...]
    X: np.ndarray

    @property
    def columns(self) -> list[str]:
        return [c for e in self.encodings for c in e.columns]


@dataclass(frozen=True)
class NewData:
    """New data encoded with a training :class:`DesignSpec` (for prediction).

    ``group_index`` holds -1 for levels that the training data did not have (``new_levels``
    says which term saw them); prediction gives those a zero random effect or raises.
    """

    X: FixedMatrix
    offset: np.ndarray
    Zraw: tuple[ZMatrix, ...]
    group_index: tuple[np.ndarray, ...]
    net_X: tuple[np.ndarray, ...]
    new_levels: tuple[bool, ...]
    y: np.ndarray | None
    weights: np.ndarray
    row_index: pd.Index


@dataclass(frozen=True)
class DesignSpec:
    """What was learnt from the training data, to encode new data the same way.

    Holds formulaic's ``ModelSpec`` of the fixed part and of each term's columns, the levels of
    the grouping factors, the network input encodings and the fixed-effect columns kept after
    the rank check.

    ``context`` is the mapping passed as ``ngmm(..., context=)``: functions are code, not
    data, so a model file may not be able to keep it; encoding new data for a formula that
    uses a name of ``context`` then raises a :class:`FormulaError` that names it.
    """

    formula: ParsedFormula
    fixed_spec: Any
    fixed_columns: tuple[str, ...]
    kept_columns: tuple[int, ...]
    re_specs: tuple[Any, ...]
    re_terms: tuple[tuple[BarTerm, tuple[str, ...]], ...]
    net_encodings: tuple[tuple[NetEncoding, ...], ...]
    binomial_levels: tuple[str, str] | None
    binomial: bool = False
    context: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def new_data(self, data: pd.DataFrame, *, with_response: bool = False,
                 allow_new_levels: bool = True,
                 allow_new_input_levels: bool = False) -> NewData:
        """Encode ``data`` as the training data were encoded.

        Parameters
        ----------
        data : DataFrame
            Must hold every column the formula uses (the response only if
            ``with_response``). Rows with missing values are an error here: predictions are
            returned row for row.
        with_response : bool
            Also evaluate the response (for held-out log-likelihoods).
        allow_new_levels : bool
            If False, a grouping level absent from the training data raises DataError; if
            True it gets index -1. (``NGMMResult.predict`` passes False by default, as lme4.)
        allow_new_input_levels : bool
            The same for the levels of factors among the ``nn()`` inputs: False (default)
            raises :class:`~ngmm_formula.errors.NewLevelsError`, True gives them the fallback
            of :meth:`NetEncoding.encode` (``NGMMResult.predict`` passes its
            ``allow_new_levels``).
        """
        _check_frame(data, "newdata")
        context = getattr(self, "context", None)  # absent in files written before it existed
        needed = required_columns(self.formula, with_response=with_response, context=context)
        missing = [v for v in needed if v not in data.columns]
        if missing:
            raise DataError(f"newdata is missing the column(s) {missing} used by the formula "
                            f"'{self.formula.formula}'")
        parse_formula(self.formula.formula, names=_known_names(data, context))
        na = _na_rows(data, needed)
        if na.any():
            cols = [c for c in needed if data[c].isna().any()]
            raise DataError(f"newdata has missing values in {cols} ({int(na.sum())} rows); "
                            "drop or impute them before predicting")
        data = self._conform(data, needed)
        X_full = reapply_spec(self.fixed_spec, data, context)
        X = (X_full.keep_columns(self.kept_columns) if isinstance(X_full, SparseRows)
             else X_full[:, list(self.kept_columns)])
        zs, gis, flags = [], [], []
        for (bar, levels), spec in zip(self.re_terms, self.re_specs, strict=True):
            zs.append(reapply_spec(spec, data, context))
            labels = group_labels(data, bar)
            # -1: unseen
            idx = pd.Index(list(levels)).get_indexer(pd.Index(labels)).astype(np.int64)
            new = bool((idx < 0).any())
            if new and not allow_new_levels:
                raise NewLevelsError(bar.group, list(set(np.asarray(labels)[idx < 0])))
            gis.append(idx)
            flags.append(new)
        nets = tuple(
            np.hstack([e.encode(data[e.variable], allow_new_levels=allow_new_input_levels)
                       for e in encs])
            for encs in self.net_encodings
        )
        offset = _offset_terms(self.formula, data, None, context)
        y, w = (None, np.ones(len(data)))
        if with_response:
            y, w = _response(self.formula, data, self.binomial, self.binomial_levels, context)
        return NewData(X=X, offset=offset, Zraw=tuple(zs), group_index=tuple(gis),
                       net_X=nets, new_levels=tuple(flags), y=y, weights=w,
                       row_index=data.index)


    def _conform(self, data: pd.DataFrame, needed: list[str]) -> pd.DataFrame:
        """Check ``data``'s columns against the kinds the training data had, and give a
        factor that arrives as numbers its training levels' type (strings: ``1`` -> ``"1"``);
        returns a new frame where a column was converted (the caller's is never changed).

        Raises DataError for a column that was numeric in training but is not here (a CSV
        column with a stray string reads as text) and for infinite values.
        """
        kinds: dict[str, tuple[Any, Any]] = {}
        for spec in (self.fixed_spec, *self.re_specs):
            for var, (kind, state) in spec.encoder_state.items():
                if var in data.columns:
                    kinds[var] = (getattr(kind, "value", kind), state)
        for encs in self.net_encodings:
            for e in encs:
                kinds.setdefault(e.variable, ("numerical" if e.kind == "numeric"
                                              else "categorical", {}))
        converted: dict[str, pd.Series] = {}
        for var, (kind, state) in kinds.items():
            col = data[var]
            numeric = (pd.api.types.is_numeric_dtype(col)
                       and not isinstance(col.dtype, pd.CategoricalDtype))
            if kind == "numerical" and not numeric and not pd.api.types.is_bool_dtype(col):
                raise DataError(f"newdata column '{var}' is {col.dtype} but was numeric in the "
                                "training data; convert it (e.g. pd.to_numeric(newdata"
                                f"['{var}'])) before predicting")
            if kind == "categorical" and numeric and isinstance(state, dict):
                levels = state.get("categories") or []
                if levels and all(isinstance(c, str) for c in levels):
                    converted[var] = col.astype(str)
        for var in needed:
            col = data[var]
            if (pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
                    and not isinstance(col.dtype, pd.CategoricalDtype)):
                n_inf = int(np.isinf(np.asarray(col, dtype=float)).sum())
                if n_inf:
                    raise DataError(f"newdata column '{var}' has infinite values in {n_inf} "
                                    "row(s)")
        return data.assign(**converted) if converted else data


@dataclass(frozen=True)
class Design:
    """Everything the engine needs, as arrays (see the module docstring).

    Attributes
    ----------
    formula : ParsedFormula
    y, weights, offset : ndarray, shape (n,)
    X : ndarray, shape (n, p), or SparseRows
        The fixed-effects model matrix; :class:`SparseRows` for a wide factor design
        (:func:`wide_and_sparse`: ``0 + item`` of an item-response model).
    fixed_names : tuple of str
        lme4-like column names of ``X`` (``(Intercept)``, ``period2``).
    dropped_columns : tuple of str
        Aliased fixed-effect columns removed by the rank check (as lme4 does).
    re_terms : tuple of ReTerm
        In lme4's order: by decreasing number of levels.
    nets : tuple of NetInput
    n_dropped_na : int
        Rows removed because of missing values (na.omit).
    row_index : pandas.Index
        Labels of the rows used, in the caller's DataFrame.
    response_name : str
    spec : DesignSpec
    nobs_all : int or None
        A sharded read (:class:`Agreement`): the number of observations of all processes
        (``nobs`` is this process's rows). None otherwise.
    """

    formula: ParsedFormula
    y: np.ndarray
    weights: np.ndarray
    offset: np.ndarray
    X: FixedMatrix
    fixed_names: tuple[str, ...]
    dropped_columns: tuple[str, ...]
    re_terms: tuple[ReTerm, ...]
    nets: tuple[NetInput, ...]
    n_dropped_na: int
    row_index: pd.Index
    response_name: str
    spec: DesignSpec
    #: the observations of every process of a sharded read (None: this design holds all)
    nobs_all: int | None = None

    def __repr__(self) -> str:
        # the arrays are fields; a printed Design showed all of them (kB)
        terms = ", ".join(f"{t.name}: {t.n_levels} levels x {t.q}" for t in self.re_terms)
        nets = f", {len(self.nets)} nn() terms" if self.nets else ""
        return (f"<Design {self.formula.formula!r}: {self.nobs} rows, {self.X.shape[1]} "
                f"fixed-effect columns, random effects {{{terms}}}{nets}>")

    @property
    def nobs(self) -> int:
        return int(self.y.shape[0])

    @property
    def theta_lower(self) -> np.ndarray:
        """Lower bounds of theta: 0 for diagonal entries, -inf off the diagonal (lme4)."""
        return np.where(theta_diagonals([t.q for t in self.re_terms],
                                        [t.rank for t in self.re_terms]), 0.0, -np.inf)

    @property
    def theta_start(self) -> np.ndarray:
        """lme4's starting value: identity relative covariance."""
        return np.where(np.isfinite(self.theta_lower), 1.0, 0.0)

    @property
    def theta_names(self) -> list[str]:
        return [n for t in self.re_terms for n in t.theta_names()]

    @property
    def grouping_factors(self) -> tuple[str, ...]:
        """Distinct grouping factors, in term order (lme4's ``flist``)."""
        seen: dict[str, None] = {}
        for t in self.re_terms:
            seen.setdefault(t.group, None)
        return tuple(seen)

    def Zt(self) -> sp.csc_matrix:
        """lme4's sparse transposed random-effects model matrix.

        Rows are grouped by term, and within a term by level then column:
        row ``offset_k + level * q_k + j`` of term ``k`` (lme4's ``Gp`` offsets).
        """
        rows, cols, vals = [], [], []
        n = self.nobs
        offset = 0
        for t in self.re_terms:
            Z = t.Zraw.dense() if isinstance(t.Zraw, SparseRows) else t.Zraw
            for j in range(t.q):
                rows.append(offset + t.group_index * t.q + j)
                cols.append(np.arange(n))
                vals.append(Z[:, j])
            offset += t.q * t.n_levels
        if not rows:
            return sp.csc_matrix((0, n))
        Zt = sp.csc_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(offset, n),
        )
        Zt.eliminate_zeros()  # as lme4's Zt: zero values (e.g. Days = 0) are not stored
        return Zt


# --------------------------------------------------------------------------------------------
# helpers


def reapply_spec(spec: Any, data: pd.DataFrame, context: Mapping[str, Any] | None = None
                 ) -> Any:
    """Apply a training ModelSpec to new data: an array, or :class:`SparseRows` for a spec
    with sparse output (a reduced-rank term's). A factor level that the training data did not
    have is an error: formulaic only warns and encodes such rows as the reference level."""
    _check_factors(spec.formula, data, context)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataMismatchWarning)
        try:
            mm = spec.get_model_matrix(data, na_action="raise",
                                       context=_formulaic_context(context))
            if sp.issparse(mm):
                return SparseRows.of(mm)
            return np.asarray(mm, dtype=float)
        except DataMismatchWarning as exc:
            mismatch = str(exc)
    bad = []
    for var, (_, state) in spec.encoder_state.items():
        if var in data.columns and isinstance(state, dict) and "categories" in state:
            unseen = sorted(set(data[var].astype(str)) - {str(c) for c in state["categories"]})
            if unseen:
                bad.append(f"'{var}' {unseen[:5]}")
    raise DataError("newdata has factor levels not seen in the training data: "
                    f"{'; '.join(bad) or mismatch}")


def _check_frame(data: Any, what: str) -> None:
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"{what} must be a pandas DataFrame, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{what} has no rows")
    duplicated = data.columns[data.columns.duplicated()]
    if len(duplicated):
        names = sorted({str(c) for c in duplicated})
        raise DataError(f"{what} has duplicate column names {names}: rename or drop the "
                        "copies (e.g. data.loc[:, ~data.columns.duplicated()])")


def _formulaic_names(expr: str, exclude: Mapping[str, Any] | None = None) -> set[str]:
    """The data columns formulaic needs for ``expr``: its required variables less the
    functions it calls (transforms, ``context=`` functions) and the names of ``exclude``."""
    try:
        variables = _formula_variables(expr)
    except Exception as exc:  # formulaic's own parser errors
        raise FormulaError(f"cannot read the expression '{expr}': {exc}", None) from None
    return {v for v in variables if v not in (exclude or {}) and v not in EXTRA_TRANSFORMS}


@functools.lru_cache(maxsize=256)
def _formula_variables(expr: str) -> frozenset[str]:
    """The names formulaic reads in ``expr`` less those it only calls (parsing evaluates
    nothing and depends on the text alone: cached, as a fit reads each part several times)."""
    return frozenset(str(v) for v in _parsed_formula(expr).required_variables
                     if v.roles != {v.Role.CALLABLE})


@functools.lru_cache(maxsize=256)
def _parsed_formula(expr: str) -> Formula:
    """``Formula(expr)``, parsed once per text (formulaic's parser costs about 0.2 ms a
    call; a formula object is not changed by materialising it)."""
    return Formula(expr)


def _formulaic_context(context: Mapping[str, Any] | None) -> dict[str, Any]:
    """What formulaic may look names up in besides the data: this package's transforms
    (:data:`~ngmm_formula.safety.EXTRA_TRANSFORMS`) and the user's ``context=``."""
    return {**EXTRA_TRANSFORMS, **(context or {})}


def _known_names(data: pd.DataFrame, context: Mapping[str, Any] | None) -> set[str]:
    """Names a formula on ``data`` may use besides the transforms: columns and context."""
    return {str(c) for c in data.columns} | set(context or {})


def _check_context(context: Any) -> Mapping[str, Any] | None:
    if context is None:
        return None
    if not isinstance(context, Mapping):
        raise FormulaError(f"context must be a mapping of names to values, got "
                           f"{type(context).__name__}")
    for key in context:
        if not isinstance(key, str) or not IDENTIFIER.fullmatch(key) or key.startswith("__"):
            raise FormulaError(f"context name {key!r} is not a plain identifier (no dunder "
                               "names)")
    return context


def _check_factors(formula: Any, data: pd.DataFrame, context: Mapping[str, Any] | None
                   ) -> None:
    """Check every Python factor of a formulaic formula (as formulaic parsed it) before it is
    materialised: a second line behind the checks of :func:`parse_formula`."""
    names = _known_names(data, context)
    for term in _terms(formula):
        for factor in term.factors:
            if getattr(factor.eval_method, "value", None) == "python":
                check_python(str(factor.expr), None, 0, names)


def _terms(formula: Any) -> list[Any]:
    """The terms of a formulaic formula: each part of a model formula is a one-sided
    ``SimpleFormula`` (bars and the response were split out by the parser)."""
    if not isinstance(formula, SimpleFormula):
        raise FormulaError(f"unexpected structured formula '{formula}' (a '~' or '|' in a "
                           "part of the formula)")
    return list(formula)


def _checked_formula(expr: str, data: pd.DataFrame, context: Mapping[str, Any] | None
                     ) -> Formula:
    """``Formula(expr)`` after :func:`_check_factors` (parsing evaluates nothing)."""
    formula = _parsed_formula(expr)
    _check_factors(formula, data, context)
    return formula


def required_columns(formula: ParsedFormula, *, with_response: bool = True,
                     context: Mapping[str, Any] | None = None) -> list[str]:
    """The data columns ``formula`` uses (what a file reader needs to read), in formula order.

    Response (if ``with_response``), fixed part, offsets, random-effects terms and their
    grouping factors, ``nn()`` inputs. Functions called in the formula and the names of
    ``context`` are not columns.
    """
    names: list[str] = []

    def add(ns: set[str] | tuple[str, ...]) -> None:
        ns = {v for v in ns if v not in (context or {})} if isinstance(ns, set) else ns
        for v in sorted(ns) if isinstance(ns, set) else ns:
            if v not in names:
                names.append(v)

    if with_response:
        if formula.response_cbind is not None:
            for e in formula.response_cbind:
                add(_formulaic_names(f"I({e})"))
        elif formula.response is not None:
            add(_formulaic_names(formula.response))
    add(_formulaic_names(formula.fixed))
    for o in formula.offsets:
        add(_formulaic_names(f"I({o})"))
    for b in formula.bars:
        add(_formulaic_names(b.expr))
        add(b.group_factors)
    for t in formula.nn_terms:
        add(t.variables)
    return names


def _na_rows(data: pd.DataFrame, columns: list[str]) -> np.ndarray:
    if not columns:
        return np.zeros(len(data), dtype=bool)
    # column by column (a sub-frame costs more than the test on 50 rows); a new, writable array
    na = np.zeros(len(data), dtype=bool)
    for c in columns:
        na |= np.asarray(data[c].isna(), dtype=bool)
    return na


def _evaluate(expr: str, data: pd.DataFrame, context: Mapping[str, Any] | None = None
              ) -> np.ndarray:
    """Evaluate one R/formulaic expression (``log(t)``, ``size - incidence``) to a vector."""
    check_python(expr, None, 0, _known_names(data, context))
    plain = _arithmetic(expr, data, context)
    if plain is not None:
        return plain
    mm = _checked_formula(f"0 + I({expr})", data, context).get_model_matrix(
        data, na_action="ignore", context=_formulaic_context(context))
    return np.asarray(mm, dtype=float)[:, 0]


_ARITHMETIC = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply,
               ast.Div: np.true_divide}


def _arithmetic(expr: str, data: pd.DataFrame, context: Mapping[str, Any] | None
                ) -> np.ndarray | None:
    """``expr`` evaluated directly when it is a numeric column or +, -, *, / of numeric
    columns and numbers (``incidence``, ``size - incidence``): what ``I(expr)`` gives,
    without materialising a formula (about 5 ms of a 70 ms cbpp fit); None otherwise."""
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return None

    def value(node: ast.expr) -> np.ndarray | float | None:
        if isinstance(node, ast.Name):
            col = (data[node.id] if node.id in data.columns and node.id not in (context or {})
                   else None)
            if (col is None or not isinstance(col.dtype, np.dtype)
                    or col.dtype.kind not in "iuf"):
                return None
            return np.array(col, dtype=float)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not (
                isinstance(node.value, bool)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = value(node.operand)
            return None if inner is None else -inner
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            left, right = value(node.left), value(node.right)
            if left is None or right is None:
                return None
            with np.errstate(divide="ignore", invalid="ignore"):
                return _ARITHMETIC[type(node.op)](left, right)  # type: ignore[no-any-return]
        return None

    out = value(tree)
    if not isinstance(out, np.ndarray):  # a constant alone: formulaic's way
        return None
    return out


def _offset_terms(formula: ParsedFormula, data: pd.DataFrame,
                  offset: np.ndarray | None, context: Mapping[str, Any] | None = None
                  ) -> np.ndarray:
    total = np.zeros(len(data)) if offset is None else np.asarray(offset, dtype=float).copy()
    for o in formula.offsets:
        total += _evaluate(o, data, context)
    return total


def _response(formula: ParsedFormula, data: pd.DataFrame, binomial: bool,
              binomial_levels: tuple[str, str] | None = None,
              context: Mapping[str, Any] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Return (y, weights multiplier): cbind -> proportion and trials; factor -> 0/1."""
    n = len(data)
    if formula.response_cbind is not None:
        s_expr, f_expr = formula.response_cbind
        if not binomial:
            raise DataError("a cbind(successes, failures) response needs family='binomial'")
        s, f = _evaluate(s_expr, data, context), _evaluate(f_expr, data, context)
        if (f < 0).any():
            raise DataError(f"binomial response cbind({s_expr}, {f_expr}): failure count "
                            f"'{f_expr}' is below zero in {int((f < 0).sum())} rows")
        if (s < 0).any():
            raise DataError(f"binomial response cbind({s_expr}, {f_expr}): success count "
                            f"'{s_expr}' is below zero in {int((s < 0).sum())} rows")
        m = s + f
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.where(m > 0, s / np.where(m > 0, m, 1.0), 0.0)
        return y, m
    assert formula.response is not None
    name = formula.response
    col = data[name] if name in data.columns else None
    if col is not None and not pd.api.types.is_numeric_dtype(col) or (
        col is not None and isinstance(col.dtype, pd.CategoricalDtype)
    ):
        assert col is not None
        if not binomial:
            raise DataError(f"response '{name}' is not numeric ({col.dtype}); a numeric "
                            "family needs a numeric response")
        if pd.api.types.is_bool_dtype(col):
            return col.to_numpy(dtype=float), np.ones(n)
        cat = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype("category")
        levels = binomial_levels or tuple(str(c) for c in cat.cat.categories)
        if len(levels) != 2:
            raise DataError(f"binomial response '{name}' is a factor with {len(levels)} "
                            f"levels {list(levels)[:5]}; it needs exactly two (the second "
                            "counts as success, as in R)")
        y = (np.asarray(cat.astype(str)) == levels[1]).astype(float)
        return y, np.ones(n)
    y = _evaluate(name, data, context) if col is None else np.asarray(col, dtype=float)
    return y, np.ones(n)


def group_labels(data: pd.DataFrame, bar: BarTerm) -> np.ndarray:
    factors = bar.group_factors
    if len(factors) == 1:
        return np.asarray(data[factors[0]].astype(str))
    parts = [np.asarray(data[f].astype(str)) for f in factors]
    out = parts[0].astype(object)
    for p in parts[1:]:
        out = out + ":" + p.astype(object)
    return out


def _factor_levels(col: pd.Series) -> list[str]:
    """Levels as R's ``factor()`` gives them: factor order (unused dropped) or sorted values."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        # the used categories in their order, from the integer codes (a set of the values
        # as strings iterated over every row: 0.09 s of Chem97's 31,022 rows)
        codes = np.asarray(col.cat.codes)
        cats = col.cat.categories
        return [str(c) for c in cats[np.unique(codes[codes >= 0])].tolist()]
    values = col.dropna().unique()
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def _interaction_levels(data: pd.DataFrame, bar: BarTerm) -> list[str]:
    """Levels of ``a:b`` as R's ``factor(a:b)``: first factor varying slowest, unused dropped."""
    factors = bar.group_factors
    per = [_factor_levels(data[f]) for f in factors]
    if len(per) == 1:
        return per[0]
    # R's `:` on factors gives levels "a1:b1", "a1:b2", ...: the first factor varies slowest
    combos = per[0]
    for lv in per[1:]:
        combos = [f"{a}:{b}" for a in combos for b in lv]
    present = set(group_labels(data, bar))
    return [c for c in combos if c in present]


def _group_index(data: pd.DataFrame, bar: BarTerm) -> tuple[list[str], np.ndarray]:
    """The levels of ``bar``'s grouping factor (as :func:`_interaction_levels`) and each row's
    level (int32).

    Factors given as pandas categoricals without missing values are coded from their integer
    codes (each factor's used levels, the first factor varying slowest): the same levels and
    indices as labelling every row with strings, which costs more than the rest of a 50-row
    design. Anything else (or level names that could run together with ``:``) is labelled
    row by row."""
    cols = [data[f] for f in bar.group_factors]
    if not all(isinstance(c.dtype, pd.CategoricalDtype) for c in cols):
        return _labelled_index(data, bar)
    combined = np.zeros(len(data), dtype=np.int64)
    per: list[list[str]] = []
    for col in cols:
        cat = col.array
        assert isinstance(cat, pd.Categorical)
        codes = np.asarray(cat.codes, dtype=np.int64)
        used = np.unique(codes)
        categories = cat.categories.tolist()
        lv = [str(categories[k]) for k in used.tolist() if k >= 0]
        if (used < 0).any() or len(set(lv)) < len(lv) or (
                len(cols) > 1 and any(":" in v for v in lv)):
            return _labelled_index(data, bar)
        position = np.zeros(len(categories), dtype=np.int64)
        position[used] = np.arange(len(used))
        combined = combined * len(used) + position[codes]
        per.append(lv)
    if len(per) == 1:  # one factor: every used level is present, in the categories' order
        return per[0], combined.astype(np.int32)
    present, gidx = np.unique(combined, return_inverse=True)
    parts = np.unravel_index(present, tuple(len(lv) for lv in per))
    levels = [":".join(lv[i] for lv, i in zip(per, idx)) for idx in zip(*(p.tolist()
                                                                          for p in parts))]
    return levels, gidx.reshape(-1).astype(np.int32)


def _labelled_index(data: pd.DataFrame, bar: BarTerm) -> tuple[list[str], np.ndarray]:
    """:func:`_group_index` by labelling every row (``a:b`` as strings)."""
    levels = _interaction_levels(data, bar)
    labels = group_labels(data, bar)
    return levels, pd.Categorical(labels, categories=levels).codes.astype(np.int32)


_T_LEVEL = re.compile(r"\[T\.([^\]]*)\]")
_LEVEL = re.compile(r"\[([^\]]*)\]")


def lme4_name(name: str) -> str:
    """Translate formulaic's column names to R's: ``Intercept`` -> ``(Intercept)``,
    ``period[T.2]`` -> ``period2``, ``f[a]`` -> ``fa``, ``I(x ** 2)`` -> ``I(x^2)``."""
    if name == "Intercept":
        return "(Intercept)"
    name = _T_LEVEL.sub(lambda m: m.group(1), name)
    name = _LEVEL.sub(lambda m: m.group(1), name)
    return name.replace(" ** ", "^").replace("**", "^")


def full_rank_columns(X: np.ndarray, tol: float = 1e-7) -> list[int]:
    """Columns kept by R's pivoting QR (dqrdc2): a column is dropped when, after projecting
    out the kept columns before it, less than ``tol`` of its norm remains."""
    kept: list[int] = []
    # the orthonormal basis so far: columns 0..len(kept)-1 of a preallocated array (stacking
    # a new array per column copied O(n p^2) values: 3 s of a 10^6 x 50 design)
    basis = np.zeros((X.shape[1], X.shape[0]))
    for j in range(X.shape[1]):
        x = X[:, j]
        norm = np.linalg.norm(x)
        if norm == 0:
            continue
        Qt = basis[:len(kept)]
        r = x - Qt.T @ (Qt @ x)
        r = r - Qt.T @ (Qt @ r)  # re-orthogonalise for stability
        rn = np.linalg.norm(r)
        if rn > tol * norm:
            basis[len(kept)] = r / rn
            kept.append(j)
    return kept


def _encode_net(term: NNTerm, data: pd.DataFrame, agree: Agreement | None = None
                ) -> NetInput:
    """The input matrix of an ``nn()`` term: numeric inputs standardised by their mean and
    (population) standard deviation, factors over their levels. Under ``agree`` (a sharded
    read) both are of every process's rows: :meth:`Agreement.moments`,
    :func:`_agreed_levels`, the same collectives in the same order in every process."""
    encs = []
    for v in term.variables:
        col = data[v]
        if pd.api.types.is_bool_dtype(col) or (
            pd.api.types.is_numeric_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype)
        ):
            x = np.asarray(col, dtype=float)
            if not np.isfinite(x).all():
                raise DataError(f"nn() input '{v}' has infinite values")
            if agree is None:
                mean, sd = float(x.mean()), float(x.std())
            else:
                means, sds = agree.moments(x[:, None])
                mean, sd = float(means[0]), float(sds[0])
            encs.append(NetEncoding(v, "numeric", mean, sd if sd > 0 else 1.0))
        else:
            levels = tuple(_factor_levels(col) if agree is None else _agreed_levels(col, agree))
            if len(levels) > MAX_EMBEDDED_LEVELS:
                raise DataError(f"nn() input '{v}' has {len(levels)} levels; at most "
                                f"{MAX_EMBEDDED_LEVELS} are supported")
            encs.append(NetEncoding(v, "embedded" if len(levels) > EMBED_MIN_LEVELS
                                    else "categorical", levels=levels))
    X = np.hstack([e.encode(data[e.variable]) for e in encs])
    return NetInput(term, tuple(encs), _frozen(X))


# --------------------------------------------------------------------------------------------
# several processes, each with part of the rows


@dataclass(frozen=True)
class Agreement:
    r"""How the processes of a distributed fit, each holding the rows of its own groups,
    agree on the encodings that must be the same everywhere (a sharded read).

    The one-process design learns these from all rows; here each is computed from sums or
    sets that every process contributes to, so each process builds the design of its rows
    exactly as the one-process design encodes them (up to the order of summation):

    - the **levels of the fixed part's factors**: the union of every process's levels, sorted
      as :func:`_factor_levels` sorts them (a level present in one process's rows only still
      gets its column in every process, so ``X`` has the same columns everywhere);
    - the **full-rank columns**: R's pivoting-QR rule applied to the all-reduced
      :math:`X^\top X` (:func:`full_rank_columns_gram`), since whether a column is aliased is a
      property of all rows;
    - the **number of observations** (``Design.nobs_all``, for AIC, BIC and the residual
      degrees of freedom);
    - the **standardisation** of the fixed-effects columns (means and standard deviations
      from all-reduced sums, :meth:`ngmm_formula.model.Standardisation.of`);
    - the **inputs of the networks**: the means and standard deviations of numeric inputs
      (:meth:`moments`) and the levels of factor inputs (:func:`_agreed_levels`).

    Grouping-factor levels stay local: each process owns whole groups (they are checked to be
    disjoint), and its random-effect blocks are its own.

    Attributes
    ----------
    all_sum : callable
        ``all_sum(x)``: the elementwise sum of the float64 array ``x`` over the processes, the
        same bits in every process. It may write into ``x``; :meth:`sum` passes a copy.
    all_gather : callable
        ``all_gather(obj)``: the list of every process's (picklable) ``obj``, in rank order.
    """

    all_sum: Callable[[np.ndarray], np.ndarray]
    all_gather: Callable[[Any], list[Any]]

    def sum(self, x: Any) -> np.ndarray:
        """The sum of ``x`` over the processes (``x`` itself is never modified)."""
        return np.asarray(self.all_sum(np.array(x, dtype=np.float64, copy=True)))

    def moments(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column means and population standard deviations of every process's rows of the
        2-D ``X``: the mean from all-reduced column sums and counts, then the all-reduced
        sums of squared deviations from it (two passes, as ``X.std``)."""
        n = self.sum([X.shape[0]])[0]
        mean = self.sum(X.sum(axis=0)) / n
        return mean, np.sqrt(self.sum(((X - mean) ** 2).sum(axis=0)) / n)

    def max(self, x: Any) -> np.ndarray:
        """The elementwise maximum of ``x`` over the processes."""
        return np.max(np.stack([np.asarray(v, dtype=np.float64)
                                for v in self.all_gather(np.asarray(x, dtype=np.float64))]),
                      axis=0)


def _agree_levels(formula: ParsedFormula, frame: pd.DataFrame,
                  context: Mapping[str, Any] | None, agree: Agreement) -> pd.DataFrame:
    """``frame`` with the fixed part's factor columns (strings, objects, categoricals) as
    categoricals whose categories are the union of every process's levels.

    Categoricals with the same categories in every process are kept as they are (their order
    is the one-process order); otherwise the union is sorted as :func:`_factor_levels` sorts
    string levels, which is also how formulaic orders the levels of a string column.
    """
    names = sorted(n for n in _formulaic_names(formula.fixed, context) if n in frame.columns)
    factors = [n for n in names if not (pd.api.types.is_numeric_dtype(frame[n])
                                        or pd.api.types.is_bool_dtype(frame[n]))
               or isinstance(frame[n].dtype, pd.CategoricalDtype)]
    if not factors:
        agree.all_gather(None)  # every process takes part in the same collectives
        return frame
    mine = {n: (list(frame[n].cat.categories) if isinstance(frame[n].dtype, pd.CategoricalDtype)
                else list(pd.unique(frame[n].dropna()))) for n in factors}
    everyone = agree.all_gather(mine)
    if any(sorted(e) != factors for e in everyone):
        raise DataError("the fixed part's factor columns differ in type across processes "
                        f"(here: {factors}); give every process the same column types")
    converted = {}
    for n in factors:
        lists = [e[n] for e in everyone]
        if isinstance(frame[n].dtype, pd.CategoricalDtype) and all(v == lists[0] for v in lists):
            continue
        union = sorted({v for lv in lists for v in lv}, key=str)
        converted[n] = pd.Categorical(frame[n], categories=union)
    return frame.assign(**converted) if converted else frame


def _agreed_levels(col: pd.Series, agree: Agreement) -> list[str]:
    """:func:`_factor_levels` of the union of every process's values of ``col``: the same
    rule applied to the values of all rows (a categorical's order where every process has
    the same categories; else sorted, numerically for numbers)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        mine: Any = ("categorical", list(col.cat.categories), _factor_levels(col))
    else:
        mine = ("values", col.dropna().unique().tolist(), None)
    everyone = agree.all_gather(mine)
    if all(e[0] == "categorical" and e[1] == everyone[0][1] for e in everyone):
        used = {lv for e in everyone for lv in e[2]}
        return [str(c) for c in everyone[0][1] if str(c) in used]
    values = [v for e in everyone for v in (e[2] if e[0] == "categorical" else e[1])]
    return _factor_levels(pd.Series(values).drop_duplicates())


def full_rank_columns_gram(G: np.ndarray, tol: float = 1e-7) -> list[int]:
    r""":func:`full_rank_columns` from the cross-product :math:`G = X^\top X` alone.

    Column :math:`j` is kept when the norm of its residual after projecting out the kept
    columns before it, :math:`\sqrt{G_{jj} - g_j^\top G_{KK}^{-1} g_j}` (the next diagonal
    entry of the Cholesky factor of :math:`G_{KK}` bordered by :math:`j`), exceeds ``tol``
    times its norm :math:`\sqrt{G_{jj}}`: the same rule as R's dqrdc2, from a matrix that a
    distributed fit sums over the processes' rows. Less accurate than the QR for nearly
    aliased columns (the squares lose half the digits), which is why the one-process design
    keeps the QR.
    """
    kept: list[int] = []
    R = np.zeros((0, 0))  # upper Cholesky factor of G[kept][:, kept]
    for j in range(G.shape[0]):
        gjj = float(G[j, j])
        if gjj <= 0:
            continue
        r = (np.linalg.solve(R.T, G[kept, j]) if kept else np.zeros(0))
        resid = gjj - float(r @ r)
        if resid > (tol ** 2) * gjj:
            k = len(kept)
            R2 = np.zeros((k + 1, k + 1))
            R2[:k, :k], R2[:k, k], R2[k, k] = R, r, np.sqrt(resid)
            R, kept = R2, [*kept, j]
    return kept


def _agreed_columns(agree: Agreement, formula: ParsedFormula,
                    re_levels: list[tuple[str, tuple[str, ...]]], X_full: np.ndarray,
                    names_full: list[str]) -> list[int]:
    """The full-rank columns of all processes' ``X_full`` (:func:`full_rank_columns_gram` of
    the all-reduced cross-product); checks first that every process has the same
    fixed-effect columns and that no group's rows are split between processes."""
    names = agree.all_gather(names_full)
    if any(nm != names_full for nm in names):
        raise DataError(f"the fixed part '{formula.fixed}' gives different columns in different "
                        f"processes ({names[0]} and {next(nm for nm in names if nm != names[0])})"
                        ": a transform learnt from the rows (C() of a number, poly(), scale()) "
                        "cannot be agreed across processes; compute it before the fit")
    everyone = agree.all_gather(re_levels)
    for k, (group, _) in enumerate(re_levels):
        seen: dict[str, int] = {}
        for rank, levels in enumerate(e[k][1] for e in everyone):
            for lv in levels:
                if seen.setdefault(lv, rank) != rank:
                    raise DataError(
                        f"group '{lv}' of '{group}' has rows in processes {seen[lv]} and "
                        f"{rank}: each process must hold whole groups (read the data with "
                        "ngmm_formula.io.read_shard, or partition it with write_partitioned)")
    G = agree.sum(X_full.T @ X_full)
    return full_rank_columns_gram(G) if X_full.shape[1] else []


# --------------------------------------------------------------------------------------------
# entry point


def build_design(
    formula: ParsedFormula,
    data: pd.DataFrame,
    *,
    binomial: bool = False,
    weights: np.ndarray | pd.Series | str | None = None,
    offset: np.ndarray | pd.Series | str | None = None,
    na_action: NaAction = "omit",
    context: Mapping[str, Any] | None = None,
    agree: Agreement | None = None,
) -> Design:
    """Evaluate a parsed formula on a data frame.

    Parameters
    ----------
    formula : ParsedFormula
    data : DataFrame
        Never modified.
    binomial : bool
        Whether the family is binomial: allows ``cbind`` and two-level factor responses (the
        second level is a success, as in R), and makes ``weights`` the number of trials.
    weights, offset : array, Series, column name or None
        Prior weights and an offset added to the linear predictor (besides ``offset()``
        terms of the formula).
    na_action : {"omit", "raise"}
        Drop rows with missing values in any variable the model uses (and report how many, as
        R's ``na.omit``), or raise.
    context : mapping, optional
        Extra names the formula may use (functions or values), as formulaic's ``context``;
        besides them only the data's columns and the formula transforms are reachable.
    agree : Agreement, optional
        A sharded read: ``data`` holds this process's groups, and the fixed part's factor
        levels, full-rank columns and number of observations are agreed with the other
        processes (:class:`Agreement`). None (default): ``data`` is all the data.

    Returns
    -------
    Design

    Raises
    ------
    FormulaError
        A name of the formula that is neither a column, a transform nor a ``context`` name,
        or an expression that reaches Python's internals (before anything is evaluated).
    """
    _check_frame(data, "data")
    context = _check_context(context)
    needed = _checked_columns(formula, data, na_action, context)
    n_all = len(data)
    w_user = _vector_arg(weights, data, "weights")
    o_user = _vector_arg(offset, data, "offset")
    _check_net_inputs_complete(formula, data)
    frame, w_user, o_user = _complete_rows(formula, data, needed, w_user, o_user, na_action)
    n = len(frame)

    # response
    response_name = formula.lhs
    y, trials = _response(formula, frame, binomial, None, context)
    if not np.isfinite(y).all():
        raise DataError(f"response '{response_name}' has infinite values")
    w = trials if w_user is None else trials * w_user
    if (w < 0).any():
        raise DataError("weights must be non-negative")
    binomial_levels = _binomial_levels(formula, frame) if binomial else None

    fixed_spec, X, names_full, kept, raw_terms = _model_matrices(formula, frame, context,
                                                                 agree)
    nets = tuple(_encode_net(t, frame, agree) for t in formula.nn_terms)
    spec = DesignSpec(
        formula=formula,
        fixed_spec=fixed_spec,
        fixed_columns=tuple(names_full),
        kept_columns=tuple(kept),
        re_specs=tuple(rt[5] for rt in raw_terms),
        re_terms=tuple((rt[0], rt[1]) for rt in raw_terms),
        net_encodings=tuple(ni.encodings for ni in nets),
        binomial_levels=binomial_levels,
        binomial=binomial,
        context=context,
    )
    off = _offset_terms(formula, frame, o_user, context)
    if not np.isfinite(off).all():
        raise DataError("the offset has infinite values")
    return Design(
        formula=formula,
        y=_frozen(y),
        weights=_frozen(np.asarray(w, dtype=float)),
        offset=_frozen(off),
        X=X if isinstance(X, SparseRows) else _frozen(X),
        fixed_names=tuple(names_full[j] for j in kept),
        dropped_columns=tuple(names_full[j] for j in range(len(names_full)) if j not in kept),
        re_terms=_named_re_terms(raw_terms),
        nets=nets,
        n_dropped_na=n_all - n,
        row_index=frame.index,
        response_name=response_name,
        spec=spec,
        nobs_all=None if agree is None else int(agree.sum([n])[0]),
    )


def _model_matrices(formula: ParsedFormula, frame: pd.DataFrame,
                    context: Mapping[str, Any] | None, agree: Agreement | None
                    ) -> tuple[Any, FixedMatrix, list[str], list[int], list[_RawTerm]]:
    """:func:`_fixed_matrix` and :func:`_random_terms` of ``frame``; under ``agree`` with the
    factor levels and the full-rank columns agreed across processes (the same collectives
    in the same order in every process)."""
    if agree is None:
        fixed_spec, X, names_full, kept = _fixed_matrix(formula, frame, context)
        return fixed_spec, X, names_full, kept, _random_terms(formula, frame, context)
    frame = _agree_levels(formula, frame, context, agree)
    raw_terms = _random_terms(formula, frame, context)
    select = functools.partial(_agreed_columns, agree, formula,
                               [(rt[0].group, rt[1]) for rt in raw_terms])
    fixed_spec, X, names_full, kept = _fixed_matrix(formula, frame, context, select)
    return fixed_spec, X, names_full, kept, raw_terms


def _checked_columns(formula: ParsedFormula, data: pd.DataFrame, na_action: str,
                     context: Mapping[str, Any] | None) -> list[str]:
    """The columns the model uses (response included), after checking that they exist, that
    the formula's names are columns or ``context`` names, and that none is all missing.

    Parameters
    ----------
    formula : ParsedFormula
    data : DataFrame
    na_action : str
        Checked to be "omit" or "raise".
    context : mapping or None
        As :func:`build_design`.

    Returns
    -------
    list of str
    """
    if na_action not in ("omit", "raise"):
        raise DataError(f"na_action must be 'omit' or 'raise', got {na_action!r}")
    needed = required_columns(formula, with_response=True, context=context)
    missing = [v for v in needed if v not in data.columns]
    if missing:
        raise DataError(f"variable(s) {missing} in the formula '{formula.formula}' are not "
                        f"columns of the data (columns: {list(data.columns)[:12]})")
    # the names of the formula against the data's columns, with a caret, before any evaluation
    parse_formula(formula.formula, names=_known_names(data, context))

    empty = [c for c in needed if data[c].isna().all()]
    if empty:
        raise DataError(f"column(s) {empty} used by the formula have no non-missing values: "
                        "no rows left to fit")
    return needed


def _check_net_inputs_complete(formula: ParsedFormula, data: pd.DataFrame) -> None:
    """DataError when an ``nn()`` input has missing values (they are never dropped).

    Parameters
    ----------
    formula : ParsedFormula
    data : DataFrame
    """
    for term in formula.nn_terms:
        for var in term.variables:
            n_na = int(data[var].isna().sum())
            if n_na:
                raise DataError(f"{term.label}: input '{var}' has {n_na} missing values; a "
                                "network needs complete inputs: drop or impute those rows "
                                f"first (e.g. data.dropna(subset=['{var}']))")


def _complete_rows(formula: ParsedFormula, data: pd.DataFrame, needed: list[str],
                   w_user: np.ndarray | None, o_user: np.ndarray | None, na_action: str,
                   ) -> tuple[pd.DataFrame, np.ndarray | None, np.ndarray | None]:
    """The rows without missing values in ``needed``, the weights or the offset (R's
    ``na.omit``), with their weights and offset; DataError with ``na_action="raise"``.

    Parameters
    ----------
    formula : ParsedFormula
    data : DataFrame
    needed : list of str
        The columns the model uses.
    w_user, o_user : ndarray or None
        The user's weights and offset, one per row of ``data``.
    na_action : {"omit", "raise"}

    Returns
    -------
    frame : DataFrame
        ``data`` itself when no row is missing.
    w_user, o_user : ndarray or None
        Restricted to the rows of ``frame``.
    """
    na = _na_rows(data, needed)
    for name, v in (("weights", w_user), ("offset", o_user)):
        if v is not None:
            na |= ~np.isfinite(v)
            if na_action == "raise" and (~np.isfinite(v)).any():
                raise DataError(f"{name} has missing values in "
                                f"{int((~np.isfinite(v)).sum())} row(s)")
    if not na.any():
        return data, w_user, o_user
    if na_action == "raise":
        cols = [c for c in needed if data[c].isna().any()]
        raise DataError(f"missing values in column(s) {cols} ({int(na.sum())} rows); "
                        "use na_action='omit' to drop them")
    frame = data.loc[~na]
    _check_groups_survive(formula, data, frame, needed)
    if len(frame) == 0:
        raise DataError("no rows left after removing rows with missing values")
    return (frame, None if w_user is None else w_user[~na],
            None if o_user is None else o_user[~na])


def _binomial_levels(formula: ParsedFormula, frame: pd.DataFrame) -> tuple[str, str] | None:
    """The (failure, success) levels of a binomial factor response (None for a numeric one).

    Parameters
    ----------
    formula : ParsedFormula
    frame : DataFrame
    """
    if formula.response is None or formula.response not in frame.columns:
        return None
    col = frame[formula.response]
    if isinstance(col.dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
    ):
        cats = col.astype("category").cat.categories
        return (str(cats[0]), str(cats[1]))
    return None


def _full_rank(X: np.ndarray, names: list[str]) -> list[int]:
    return full_rank_columns(X)


def _fixed_matrix(formula: ParsedFormula, frame: pd.DataFrame,
                  context: Mapping[str, Any] | None,
                  select: Callable[[np.ndarray, list[str]], list[int]] = _full_rank,
                  ) -> tuple[Any, FixedMatrix, list[str], list[int]]:
    """The fixed-effects model matrix, its columns of full rank, and their lme4 names.

    Parameters
    ----------
    formula : ParsedFormula
    frame : DataFrame
        The complete rows.
    context : mapping or None
    select : callable
        ``select(X_full, names)``: the columns of full rank (:func:`full_rank_columns`, or
        the processes' agreed choice of a sharded read).

    Returns
    -------
    spec : formulaic ModelSpec
        Of every column (it re-evaluates them on new data).
    X : ndarray or SparseRows
        The columns ``kept``, as floats; :class:`SparseRows` when the part can be wide
        (:func:`_may_be_wide`) and is (:func:`wide_and_sparse`), its full-rank columns then
        by :func:`full_rank_columns_gram` (the QR would need the dense matrix).
    names : list of str
        The lme4 names of every column.
    kept : list of int
        The columns kept by R's pivoting QR (:func:`full_rank_columns`).
    """
    for name in _formulaic_names(formula.fixed, context):
        _check_finite_numeric(frame[name], name)
    # a sharded read agrees on dense columns (select is then the processes' choice)
    sparse = select is _full_rank and _may_be_wide(formula.fixed, frame)
    try:  # formulaic's default ensure_full_rank=True (dropping a reference level)
        X_full, columns, spec = _term_matrix(formula.fixed, frame, context, sparse=sparse)
        if sparse and not wide_and_sparse(len(frame), X_full.n_columns,
                                          int(np.count_nonzero(X_full.values))):
            X_full, columns, spec = _term_matrix(formula.fixed, frame, context)
    except FormulaError:
        raise
    except Exception as exc:
        raise FormulaError(f"formulaic could not build the fixed part '{formula.fixed}': "
                           f"{exc}", formula.formula) from None
    names_full = [lme4_name(c) for c in columns]
    if isinstance(X_full, SparseRows):
        _check_sparse_scales(X_full, names_full, "fixed-effect")
        kept = full_rank_columns_gram(X_full.gram())
        return spec, X_full.keep_columns(kept), names_full, kept
    _check_scales(X_full, names_full, "fixed-effect")
    kept = select(X_full, names_full) if X_full.shape[1] else []
    return spec, X_full[:, kept], names_full, kept


def _may_be_wide(expr: str, frame: pd.DataFrame) -> bool:
    """Whether the fixed part ``expr`` can have :data:`WIDE_SPARSE_MIN_COLUMNS` columns: the
    product of its factor columns' numbers of levels, times one more than its other
    variables, reaches it (a bound: interactions multiply levels). Only such a part is
    built sparse first (:func:`wide_and_sparse` then decides); every other stays on the
    dense path it always took."""
    bound, others = 1, 1
    for v in _formula_variables(expr):
        if v not in frame.columns:
            continue
        col = frame[v]
        if (isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(col)
                or not pd.api.types.is_numeric_dtype(col)):
            bound *= max(int(col.nunique()), 1)
        else:
            others += 1
    return bound * others >= WIDE_SPARSE_MIN_COLUMNS and bound > 1


#: A random-effects term as evaluated: its bar, grouping levels, each row's level, its model
#: matrix, column names and formulaic model spec.
_RawTerm = tuple[BarTerm, tuple[str, ...], np.ndarray, ZMatrix, tuple[str, ...], Any]


def _random_terms(formula: ParsedFormula, frame: pd.DataFrame,
                  context: Mapping[str, Any] | None) -> list[_RawTerm]:
    """Every ``(expr | group)`` term evaluated on ``frame``, in lme4's order: decreasing
    number of levels (stable for ties).

    Parameters
    ----------
    formula : ParsedFormula
    frame : DataFrame
        The complete rows.
    context : mapping or None
    """
    raw_terms: list[_RawTerm] = []
    for bar in formula.bars:
        for f in bar.group_factors:
            if frame[f].nunique() < 1:
                raise DataError(f"grouping factor '{f}' has no levels")
        levels, gidx = _group_index(frame, bar)
        if len(levels) < 2:
            raise DataError(f"grouping factor '{bar.group}' in ({bar.expr} | {bar.group}) has "
                            f"{len(levels)} level; a random effect needs at least 2")
        for name in _formulaic_names(bar.expr, context):
            _check_finite_numeric(frame[name], name)
        Z, columns, term_spec = _term_matrix(bar.expr, frame, context,
                                             sparse=bar.rank is not None)
        cnms = tuple(lme4_name(c) for c in columns)
        if isinstance(Z, SparseRows):  # the same check on the nonzeros, column by column
            overflow, _ = sparse_column_scale_problems(Z.values, Z.columns, cnms)
        else:
            overflow, _ = column_scale_problems(Z, list(cnms))
        if overflow:
            raise DataError(_overflow_message(overflow, f"random-effects term ({bar.expr} | "
                                                        f"{bar.group})"))
        if not cnms:
            raise DataError(f"random-effects term {bar} has no columns")
        if bar.rank is not None:
            _check_reduced_rank(bar, len(cnms), len(levels))
        raw_terms.append((bar, tuple(levels), gidx, Z, cnms, term_spec))
    # lme4: terms ordered by decreasing number of levels (stable for ties)
    order = sorted(range(len(raw_terms)), key=lambda k: -len(raw_terms[k][1]))
    return [raw_terms[k] for k in order]


#: formulaic's ModelSpec of an expression over the intercept and plain numeric columns, by the
#: expression and its variables (such a spec holds no state from the data: formulaic gives
#: an equal one for any data whose variables are numeric)
_PLAIN_SPECS: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Any, str]] = {}


def _term_matrix(expr: str, frame: pd.DataFrame, context: Mapping[str, Any] | None,
                 sparse: bool = False) -> tuple[Any, list[str], Any]:
    """The model matrix of a right-hand side (the fixed part, a random-effects expression),
    its formulaic column names and ModelSpec.

    An expression whose columns are the intercept and plain numeric columns of the data
    (``1``, ``age``, ``0 + Days``) is materialised by formulaic once and then taken from the
    data directly with the spec formulaic gave (about 1 ms a term saved on a 50-row model),
    in the memory order formulaic's matrix had (torch picks its kernels, and so the last
    bits of a fit, by the strides: a seed must reproduce a fit); anything else (factors,
    transforms, ``context`` names) goes through formulaic each time. ``sparse``: formulaic's
    sparse output, returned as :class:`SparseRows` (a reduced-rank term's items: O(n)
    memory, never n x items).
    """
    formula = _checked_formula(expr, frame, context)
    if sparse:
        mm = formula.get_model_matrix(frame, na_action="raise", output="sparse",
                                      context=_formulaic_context(context))
        return SparseRows.of(mm), [str(c) for c in mm.model_spec.column_names], mm.model_spec
    variables = tuple(sorted(_formula_variables(expr)))
    plain = ("Intercept" not in variables and not set(variables) & set(context or {})
             and all(v in frame.columns and isinstance(frame[v].dtype, np.dtype)
                     and frame[v].dtype.kind in "iuf" for v in variables))
    key = (expr, tuple((v, str(frame[v].dtype)) for v in variables)) if plain else None
    cached = _PLAIN_SPECS.get(key) if key is not None else None
    if cached is not None:
        spec, order = cached
        columns = [c for term in spec.structure for c in term.columns]
        Z = np.empty((len(frame), len(columns)), order=order)  # type: ignore[call-overload]
        for j, c in enumerate(columns):
            Z[:, j] = 1.0 if c == "Intercept" else np.asarray(frame[c], dtype=float)
        return Z, columns, spec
    mm = formula.get_model_matrix(frame, na_action="raise",
                                  context=_formulaic_context(context))
    columns = [str(c) for c in mm.columns]
    out = np.asarray(mm, dtype=float)
    contiguous = out.ndim == 2 and (out.flags.c_contiguous or out.flags.f_contiguous)
    if (key is not None and contiguous and len(frame) > 1
            and all(c == "Intercept" or c in variables for c in columns)):
        if len(_PLAIN_SPECS) >= 256:
            _PLAIN_SPECS.clear()
        order = "C" if out.shape[1] == 0 or out.strides[1] == out.itemsize else "F"
        _PLAIN_SPECS[key] = (mm.model_spec, order)
    return out, columns, mm.model_spec


def _named_re_terms(raw_terms: list[_RawTerm]) -> tuple[ReTerm, ...]:
    """The terms as :class:`ReTerm`, named as lme4 names them: the grouping factor, then
    ``g.1``, ``g.2``, ... for its further terms.

    Parameters
    ----------
    raw_terms : list
        From :func:`_random_terms`.
    """
    re_terms = []
    used: dict[str, int] = {}
    for bar, term_levels, gidx, Zraw, cnms, _ in raw_terms:
        count = used.get(bar.group, 0)
        used[bar.group] = count + 1
        name = bar.group if count == 0 else f"{bar.group}.{count}"
        re_terms.append(ReTerm(name, bar.group, bar.expr, bar.correlated, cnms, term_levels,
                               _frozen(gidx),
                               Zraw if isinstance(Zraw, SparseRows) else _frozen(Zraw),
                               bar.rank))
    return tuple(re_terms)


def _check_reduced_rank(bar: BarTerm, q: int, n_levels: int) -> None:
    """A reduced-rank term needs d <= q loadings columns and at least q levels."""
    assert bar.rank is not None
    if bar.rank > q:
        raise DataError(f"d = {bar.rank} in {bar} is larger than the term's {q} column(s); "
                        f"use d <= {q}")
    if n_levels < q:
        raise DataError(f"{bar} has {q} columns but its grouping factor '{bar.group}' has "
                        f"only {n_levels} level(s): the loadings of a reduced-rank term need "
                        "at least as many levels as columns")


def check_reduced_rank_response(design: Design) -> None:
    """Every column of a reduced-rank term (an item of ``rr(0 + item | id)``) must see more
    than one response value: an item that everybody answers alike has no information on
    its loadings (its maximum-likelihood loadings are unbounded).

    Raises
    ------
    DataError
        Naming the term and the column.
    """
    for t in design.re_terms:
        if t.rank is None:
            continue
        # every nonzero (row, column) of the term at once: the smallest and largest response
        # of each column, O(nonzeros) without a pass over the rows per column
        if isinstance(t.Zraw, SparseRows):
            rows, slot = np.nonzero(t.Zraw.values)
            cols = t.Zraw.columns[rows, slot]
        else:
            rows, cols = np.nonzero(t.Zraw)
        ys = design.y[rows]
        low, high = np.full(t.q, np.inf), np.full(t.q, -np.inf)
        np.minimum.at(low, cols, ys)
        np.maximum.at(high, cols, ys)
        count = np.bincount(cols, minlength=t.q)
        constant = np.flatnonzero((count > 0) & (low == high))
        if constant.size:
            j = constant[0]
            raise DataError(f"column '{t.cnms[j]}' of rr({t.expr} | {t.group}, d = {t.rank}) "
                            f"has the same response ({low[j]:g}) in all its {count[j]} "
                            "rows: its loadings cannot be estimated; drop it from the "
                            "term or the data")


def _overflow_message(columns: list[str], where: str) -> str:
    return (f"{where} column(s) {columns} have values so large that their squares overflow "
            "(beyond about 1e154): the fit cannot use them; rescale them (e.g. divide by "
            "their standard deviation or use another unit)")


def _check_sparse_scales(X: SparseRows, names: list[str], where: str) -> None:
    """:func:`_check_scales` of a :class:`SparseRows` matrix, from its non-zeros."""
    overflow, extreme = sparse_column_scale_problems(X.values, X.columns, names)
    if overflow:
        raise DataError(_overflow_message(overflow, where))
    _warn_extreme(extreme, where)


def _warn_extreme(extreme: list[str], where: str) -> None:
    if extreme:
        warnings.warn(f"{where} column(s) {extreme} are on a scale more than "
                      f"{SCALE_RATIO:.0e} times larger or smaller than the other columns': "
                      "rescale them (e.g. divide by their standard deviation) to keep the fit "
                      "accurate", ScaleWarning, stacklevel=5)


def _check_scales(X: np.ndarray, names: list[str], where: str) -> None:
    """DataError for columns whose squares overflow, :class:`ScaleWarning` for columns on an
    extreme scale (see :func:`ngmm_formula.scaling.column_scale_problems`)."""
    overflow, extreme = column_scale_problems(X, names)
    if overflow:
        raise DataError(_overflow_message(overflow, where))
    _warn_extreme(extreme, where)


def _check_groups_survive(formula: ParsedFormula, before: pd.DataFrame, after: pd.DataFrame,
                          needed: list[str]) -> None:
    """A grouping level that had rows before NA removal but none after is an error: its
    random effect would silently vanish from the model."""
    for bar in formula.bars:
        lost = sorted(set(group_labels(before.dropna(subset=list(bar.group_factors)), bar))
                      - set(group_labels(after, bar)))
        if lost:
            cols = [c for c in needed if before[c].isna().any()]
            raise DataError(f"grouping factor '{bar.group}': level(s) {lost[:5]} have no rows "
                            f"left after removing rows with missing values in {cols}; drop "
                            "those levels or impute the missing values")


def _check_finite_numeric(col: pd.Series, name: str) -> None:
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        values = np.asarray(col, dtype=float)
        if np.isinf(values).any():
            raise DataError(f"column '{name}' has infinite values")


def _vector_arg(value: Any, data: pd.DataFrame, what: str) -> np.ndarray | None:
    if value is None:
        return None
    label = what
    if isinstance(value, str):
        if value not in data.columns:
            raise DataError(f"{what}='{value}' is not a column of the data")
        label = f"{what}='{value}' (column '{value}')"
        value = data[value]
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        kind = getattr(value, "dtype", type(value).__name__)
        raise DataError(f"{label} must be numeric, got {kind} values") from None
    if arr.shape != (len(data),):
        raise DataError(f"{label} must have one value per row of data ({len(data)}), got "
                        f"shape {arr.shape}")
    n_inf = int(np.isinf(arr).sum())
    if n_inf:
        raise DataError(f"{label} has infinite values in {n_inf} row(s) (first at row "
                        f"{int(np.flatnonzero(np.isinf(arr))[0])}); give finite values (NaN "
                        "counts as missing and drops the row)")
    if what == "weights" and (arr < 0).any():
        n_neg = int((arr < 0).sum())
        raise DataError(f"{label} must be non-negative; {n_neg} row(s) are negative (first "
                        f"at row {int(np.flatnonzero(arr < 0)[0])}: "
                        f"{arr[arr < 0][0]:.6g})")
    return arr


# --------------------------------------------------------------------------------------------
# formulaic's ModelSpec <-> plain data (for model files: data, not code)
#
# A ModelSpec is written field by field as JSON-compatible data (dicts with string keys,
# lists, strings, numbers, booleans, None). Values inside it (transform and encoder state,
# factor metadata) are tagged ``{"$": tag, ...}`` when JSON has no plain form for them; only
# the formulaic value types named below are accepted, anything else is refused when writing
# (a model file stores nothing that it cannot rebuild from data).

#: Version of the plain-data layout of a ModelSpec written by :func:`spec_to_data`.
SPEC_DATA_VERSION = 1


def _contrast_classes() -> dict[str, type]:
    from formulaic.transforms import contrasts as fc

    return {"treatment": fc.TreatmentContrasts, "sas": fc.SASContrasts, "sum": fc.SumContrasts,
            "helmert": fc.HelmertContrasts, "diff": fc.DiffContrasts, "poly": fc.PolyContrasts,
            "custom": fc.CustomContrasts}


def _float_to_data(x: float) -> Any:
    if np.isfinite(x):
        return x
    return {"$": "float", "value": "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")}


def _value_to_data(v: Any, where: str) -> Any:
    """A formulaic state value as JSON-compatible data (see :func:`spec_to_data`)."""
    from formulaic.parser.types import Factor
    from formulaic.transforms.contrasts import ContrastsState
    from formulaic.utils.sentinels import UNSET

    if v is None or type(v) in (bool, str, int):
        return v
    if type(v) is float:
        return _float_to_data(v)
    if isinstance(v, np.generic) and v.dtype.kind in "biuf":
        return {"$": "numpy", "dtype": v.dtype.str, "value": _value_to_data(v.item(), where)}
    if type(v) is np.ndarray and v.dtype.kind in "biufU":
        return {"$": "array", "dtype": v.dtype.str, "shape": list(v.shape),
                "data": [_value_to_data(x, where) for x in v.ravel().tolist()]}
    if type(v) is list:
        return [_value_to_data(x, f"{where}[{k}]") for k, x in enumerate(v)]
    if type(v) is tuple:
        return {"$": "tuple", "items": [_value_to_data(x, f"{where}[{k}]")
                                        for k, x in enumerate(v)]}
    if type(v) is dict:
        return {"$": "dict", "items": [[_value_to_data(k, where), _value_to_data(x, f"{where}"
                                                                                 f"[{k!r}]")]
                                       for k, x in v.items()]}
    if v is UNSET:
        return {"$": "UNSET"}
    if type(v) is Factor.Kind:
        return {"$": "Kind", "value": v.value}
    if type(v) is ContrastsState:
        return {"$": "ContrastsState",
                "contrasts": _value_to_data(v.contrasts, f"{where}.contrasts"),
                "levels": _value_to_data(v.levels, f"{where}.levels")}
    for tag, cls in _contrast_classes().items():
        if type(v) is cls:
            c: Any = v
            if tag == "custom":
                params = {"contrasts": c.contrasts, "names": getattr(c, "contrast_names", None)}
            else:
                params = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
            return {"$": "Contrasts", "kind": tag,
                    "params": {k: _value_to_data(x, f"{where}.{k}") for k, x in params.items()}}
    raise TypeError(f"cannot store {where}: a value of type {type(v).__module__}."
                    f"{type(v).__qualname__} is not one of the formulaic values that a model "
                    "file can hold")


def _value_from_data(d: Any) -> Any:
    """Inverse of :func:`_value_to_data`; raises ValueError on anything else."""
    if d is None or type(d) in (bool, str, int, float):
        return d
    if type(d) is list:
        return [_value_from_data(x) for x in d]
    if type(d) is not dict or not isinstance(d.get("$"), str):
        raise ValueError(f"unexpected value {str(d)[:60]!r}")
    tag = d["$"]
    if tag == "float":
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}.get(d["value"])
        if value is None:
            raise ValueError(f"unexpected float {d['value']!r}")
        return value
    if tag == "numpy":
        dtype = np.dtype(str(d["dtype"]))
        if dtype.kind not in "biuf":
            raise ValueError(f"unexpected numpy scalar type {dtype}")
        return dtype.type(_value_from_data(d["value"]))
    if tag == "array":
        dtype = np.dtype(str(d["dtype"]))
        if dtype.kind not in "biufU":
            raise ValueError(f"unexpected array type {dtype}")
        return np.array([_value_from_data(x) for x in d["data"]],
                        dtype=dtype).reshape([int(n) for n in d["shape"]])
    if tag == "tuple":
        return tuple(_value_from_data(x) for x in d["items"])
    if tag == "dict":
        return {_hashable(_value_from_data(k)): _value_from_data(x) for k, x in d["items"]}
    if tag == "UNSET":
        from formulaic.utils.sentinels import UNSET

        return UNSET
    if tag == "Kind":
        from formulaic.parser.types import Factor

        return Factor.Kind(d["value"])
    if tag == "ContrastsState":
        from formulaic.transforms.contrasts import ContrastsState

        return ContrastsState(contrasts=_value_from_data(d["contrasts"]),
                              levels=_value_from_data(d["levels"]))
    if tag == "Contrasts":
        classes = _contrast_classes()
        if d["kind"] not in classes:
            raise ValueError(f"unknown contrasts {d['kind']!r}")
        params = {str(k): _value_from_data(x) for k, x in dict(d["params"]).items()}
        return classes[d["kind"]](**params)
    raise ValueError(f"unknown value type {tag!r}")


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        raise ValueError("a dictionary key cannot be a list")
    return k


def _factor_to_data(f: Any, where: str) -> dict[str, Any]:
    return {"expr": str(f.expr), "eval_method": f.eval_method.value, "kind": f.kind.value,
            "metadata": _value_to_data(f.metadata, f"{where} metadata")}


def _factor_from_data(d: dict[str, Any]) -> Any:
    from formulaic.parser.types import Factor

    return Factor(str(d["expr"]), eval_method=str(d["eval_method"]), kind=str(d["kind"]),
                  metadata=_value_from_data(d["metadata"]))


def _term_to_data(t: Any, where: str) -> dict[str, Any]:
    from formulaic.parser.types import Term

    if type(t) is not Term:
        raise TypeError(f"cannot store {where}: a term of type {type(t).__qualname__}")
    return {"factors": [_factor_to_data(f, f"{where} {t}") for f in t.factors],
            "origin": None if t.origin is None else _term_to_data(t.origin, where)}


def _term_from_data(d: dict[str, Any]) -> Any:
    from formulaic.parser.types import Term

    origin = None if d["origin"] is None else _term_from_data(d["origin"])
    return Term([_factor_from_data(f) for f in d["factors"]], origin=origin)


def _scoped_term_to_data(st: Any, where: str) -> dict[str, Any]:
    from formulaic.materializers.types import EvaluatedFactor, ScopedFactor, ScopedTerm
    from formulaic.parser.types import Factor

    if type(st) is not ScopedTerm:
        raise TypeError(f"cannot store {where}: a scoped term of type {type(st).__qualname__}")
    factors = []
    for sf in st.factors:
        ef = sf.factor
        if type(sf) is not ScopedFactor or type(ef) is not EvaluatedFactor \
                or type(ef.factor) is not Factor:
            raise TypeError(f"cannot store {where}: a scoped factor of type "
                            f"{type(sf).__qualname__}")
        variables = None if ef.variables is None else [
            {"name": str(v), "roles": sorted(r.value for r in v.roles), "source": v.source}
            for v in sorted(ef.variables, key=str)]
        factors.append({"factor": _factor_to_data(ef.factor, where), "variables": variables,
                        "reduced": bool(sf.reduced)})
    return {"factors": factors, "scale": _value_to_data(st.scale, f"{where} scale")}


def _scoped_term_from_data(d: dict[str, Any]) -> Any:
    from formulaic.materializers.types import EvaluatedFactor, ScopedFactor, ScopedTerm
    from formulaic.utils.variables import Variable

    factors = []
    for f in d["factors"]:
        variables = None if f["variables"] is None else {
            Variable(str(v["name"]), roles=[str(r) for r in v["roles"]],
                     source=None if v["source"] is None else str(v["source"]))
            for v in f["variables"]}
        ef = EvaluatedFactor(factor=_factor_from_data(f["factor"]), values=None,
                             variables=variables)
        factors.append(ScopedFactor(ef, reduced=bool(f["reduced"])))
    return ScopedTerm(factors, scale=_value_from_data(d["scale"]))


def spec_to_data(spec: Any) -> dict[str, Any]:
    """formulaic's ``ModelSpec`` as JSON-compatible plain data (for model files).

    Every field is written: the formula (its terms and factors), materializer, rank, NA and
    output options, the structure (each term's scoped terms and columns), the state of the
    stateful transforms (``scale``, ``center``, ``poly``, ...) and of the categorical
    encoders (levels and contrasts). Only formulaic's own value types are accepted (terms,
    factors, the built-in contrasts, ``UNSET``, numbers, strings, numpy scalars and arrays of
    numbers or strings, and containers of them).

    Parameters
    ----------
    spec : formulaic.ModelSpec

    Returns
    -------
    dict
        Rebuilt by :func:`spec_from_data`; ``json.dumps`` writes it as it is.

    Raises
    ------
    TypeError
        For a value outside those types, naming where it is in the spec.
    """
    from formulaic.formula import SimpleFormula
    from formulaic.materializers.base import EncodedTermStructure
    from formulaic.model_spec import ModelSpec

    if type(spec) is not ModelSpec or type(spec.formula) is not SimpleFormula:
        raise TypeError(f"cannot store a model spec of type {type(spec).__qualname__}")
    structure = None
    if spec.structure is not None:
        structure = []
        for s in spec.structure:
            if type(s) is not EncodedTermStructure:
                raise TypeError(f"cannot store a term structure of type "
                                f"{type(s).__qualname__}")
            structure.append({
                "term": _term_to_data(s.term, "structure"),
                "scoped_terms": [_scoped_term_to_data(st, f"the structure of term {s.term}")
                                 for st in s.scoped_terms],
                "columns": [str(c) for c in s.columns]})
    encoder_state = []
    for name, state in spec.encoder_state.items():
        kind, values = state
        encoder_state.append([str(name), _value_to_data(kind, f"encoder_state[{name!r}]"),
                              _value_to_data(values, f"encoder_state[{name!r}]")])
    return {
        "version": SPEC_DATA_VERSION,
        "formula": str(spec.formula),
        "terms": [_term_to_data(t, "formula") for t in spec.formula],
        "ordering": spec.formula.ordering.value,
        "materializer": spec.materializer,
        "materializer_params": _value_to_data(spec.materializer_params, "materializer_params"),
        "ensure_full_rank": bool(spec.ensure_full_rank),
        "na_action": spec.na_action.value,
        "output": spec.output,
        "cluster_by": spec.cluster_by.value,
        "structure": structure,
        "transform_state": _value_to_data(spec.transform_state, "transform_state"),
        "encoder_state": encoder_state,
    }


def spec_from_data(data: dict[str, Any]) -> Any:
    """Rebuild the formulaic ``ModelSpec`` written by :func:`spec_to_data`.

    Parameters
    ----------
    data : dict

    Returns
    -------
    formulaic.ModelSpec
        Encodes new data exactly as the spec that was written.

    Raises
    ------
    ValueError
        If ``data`` is not such a description (a damaged or foreign model file).
    """
    from formulaic.formula import SimpleFormula
    from formulaic.materializers.base import EncodedTermStructure
    from formulaic.model_spec import ModelSpec

    try:
        if not isinstance(data, dict) or data.get("version") != SPEC_DATA_VERSION:
            raise ValueError("not a model-spec description of version "
                             f"{SPEC_DATA_VERSION}")
        formula = SimpleFormula([_term_from_data(t) for t in data["terms"]],
                                _ordering=str(data["ordering"]))
        if str(formula) != data["formula"]:
            raise ValueError(f"its terms give the formula '{formula}', not "
                             f"'{data['formula']}'")
        structure = None
        if data["structure"] is not None:
            structure = [EncodedTermStructure(
                _term_from_data(s["term"]),
                [_scoped_term_from_data(st) for st in s["scoped_terms"]],
                [str(c) for c in s["columns"]]) for s in data["structure"]]
        encoder_state = {str(name): (_value_from_data(kind), _value_from_data(values))
                         for name, kind, values in data["encoder_state"]}
        transform_state = _value_from_data(data["transform_state"])
        if not isinstance(transform_state, dict):
            raise ValueError("its transform state is not a dictionary")
        output = data["output"]
        return ModelSpec(
            formula=formula,
            materializer=None if data["materializer"] is None else str(data["materializer"]),
            materializer_params=_value_from_data(data["materializer_params"]),
            ensure_full_rank=bool(data["ensure_full_rank"]),
            na_action=str(data["na_action"]),
            output=None if output is None else str(output),
            cluster_by=str(data["cluster_by"]),
            structure=structure,
            transform_state=transform_state,
            encoder_state=encoder_state,
        )
    except ValueError:
        raise
    except Exception as exc:  # a KeyError, TypeError, ... of a malformed description
        raise ValueError(f"malformed model-spec description ({type(exc).__name__}: {exc})") \
            from None


def check_spec_formula(spec: Any, expr: str) -> None:
    """Check that a ModelSpec evaluates only the factors of the formula ``expr``.

    Predicting new data evaluates the spec's factor expressions (Python code for ``log(x)``,
    ``I(x**2)``); for a spec read from a model file this checks that they are exactly those
    formulaic reads in the model's formula, so that what predicting evaluates is what the
    formula (shown by the file's header) says.

    Raises
    ------
    ValueError
        Naming the first term or factor that the formula does not have.
    """
    expected = Formula(expr)
    terms = [str(t) for t in expected]
    if [str(t) for t in spec.formula] != terms:
        raise ValueError(f"its terms {[str(t) for t in spec.formula][:6]} are not those of "
                         f"'{expr}' {terms[:6]}")
    allowed = {(f.expr, f.eval_method) for t in expected for f in t.factors}
    used = [(f.expr, f.eval_method) for t in spec.formula for f in t.factors]
    for s in spec.structure or ():
        used += [(f.expr, f.eval_method) for f in s.term.factors]
        used += [(sf.factor.factor.expr, sf.factor.factor.eval_method)
                 for st in s.scoped_terms for sf in st.factors]
    for factor, method in used:
        if (factor, method) not in allowed:
            raise ValueError(f"it evaluates '{factor[:60]}' ({method.value}), which is not a "
                             f"factor of '{expr}'")
