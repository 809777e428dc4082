r"""Model layer: the one place that combines the linear, network and random parts of

.. math::

    \eta = \text{offset} + X\beta + \sum_k f_k(x^{(k)}; w_k) + Z \Lambda(\theta) u .

:class:`Problem` holds the design as tensors (with the fixed-effects columns standardised
internally, :class:`Standardisation`; a wide factor design's as :class:`SparseRowsTensor`,
whose ``X beta`` gathers) and the block layout of the integrated coordinates;
:class:`LinearPredictor` holds the parameters -- ``beta`` (standardised scale), ``theta``
(lme4's relative Cholesky factors, column-major lower triangles; unconstrained: the likelihood
is even in the sign of each column of :math:`\Lambda`, and signs are made positive when the fit
is reported), ``log_sigma`` and the networks -- and computes :math:`\eta^{\text{fixed}}` and
the slot values :math:`C = [Z_k \Lambda_k]_k` of
:mod:`~ngmm_formula.approx.conditional`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from ngmm_formula.design import (
    Agreement,
    Design,
    ReTerm,
    SparseRows,
    theta_diagonals,
    tril_pairs,
)
from ngmm_formula.families import Family
from ngmm_formula.layout import Blocks, Split

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

__all__ = ["FixedTensor", "LinearPredictor", "Problem", "RowsByGroup", "SparseRowsTensor",
           "Standardisation", "build_problem", "dense_fixed", "index_dtype", "joint_split",
           "lambda_blocks", "linear_part", "lstsq_fixed_order", "matvec",
           "optimised_parameters", "resolve_device"]



class BlockChoice(Protocol):
    """What :func:`build_problem` reads of an approximation
    (:class:`~ngmm_formula.approx.Approximation` has both): one joint block or one block per
    group, and whether the fixed effects are integrated (REML). The model sits below the
    approximations, so it names only these two attributes."""

    @property
    def joint(self) -> bool: ...

    @property
    def reml(self) -> bool: ...


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "double": torch.float64,
           "float": torch.float32}


def resolve_device(device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
                   ) -> tuple[torch.device, torch.dtype]:
    """The torch device and floating dtype of a fit.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
    dtype : {"float32", "float64"} or torch dtype, optional
        Default float64 on the CPU (the reference precision of every test against lme4) and
        float32 on a GPU (where float64 arithmetic is many times slower). A float32 fit of
        cbpp agrees with lme4 to 4e-7 in the log-likelihood and 1e-6 in the fixed effects
        (tests/test_device.py), but in general float32 locates an optimum only to about the
        square root of its rounding, ~3e-4.

    Raises
    ------
    NGMMError
        ``device`` is not a torch device, is a kind this package does not support, or is not
        available on this machine; ``dtype`` is not float32 or float64.
    """
    from ngmm_formula.errors import NGMMError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise NGMMError(f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:0', "
                        f"'mps'): {exc}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise NGMMError(f"device={device!r}: only 'cpu', 'cuda' and 'mps' are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NGMMError(f"device={device!r}: torch.cuda.is_available() is False (no GPU "
                            "or a CPU-only build of torch); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NGMMError(f"device={device!r}: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise NGMMError(f"device={device!r}: torch.backends.mps.is_available() is False; use "
                        "device='cpu'")
    if dtype is None:
        dt = torch.float64 if dev.type == "cpu" else torch.float32
    elif isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        dt = dtype
    elif isinstance(dtype, str) and dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise NGMMError(f"dtype must be 'float32' or 'float64' (or the torch dtype), got "
                        f"{dtype!r}")
    if dev.type == "mps" and dt == torch.float64:
        raise NGMMError("device='mps' has no float64: use dtype='float32'")
    return dev, dt


def index_dtype(largest: int) -> torch.dtype:
    """int32 for indices below 2**31 (half the memory and bandwidth of int64; torch's
    ``index_add``, ``gather`` and advanced indexing accept it), else int64."""
    return torch.int32 if largest < 2**31 - 1 else torch.int64


@dataclass(frozen=True)
class SparseRowsTensor:
    """:class:`~ngmm_formula.design.SparseRows` as tensors: the standardised fixed-effects
    matrix of a wide factor design in :class:`Problem` (``m`` (value, column) pairs per row;
    :func:`matvec` gathers, its gradient in ``v`` is an ``index_add`` over the entries).

    Attributes
    ----------
    values : Tensor, shape (n, m)
    columns : Tensor of int64, shape (n, m)
        0 for the padding, whose value is 0.
    n_columns : int
    """

    values: torch.Tensor
    columns: torch.Tensor
    n_columns: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), self.n_columns)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def rows(self, take: Callable[[torch.Tensor], torch.Tensor]) -> SparseRowsTensor:
        """The rows ``take`` selects (``take`` applied to the values and the columns)."""
        return SparseRowsTensor(take(self.values), take(self.columns), self.n_columns)

    def dense(self) -> torch.Tensor:
        """The (n, p) matrix (for the Gaussian solvers and small problems: O(n p))."""
        out = self.values.new_zeros(self.shape)
        return out.scatter_add_(1, self.columns, self.values)

    def on_host(self) -> SparseRows:
        """As :class:`~ngmm_formula.design.SparseRows` (float64 numpy arrays on the CPU), for
        its scipy forms (``csr``, ``gram``)."""
        return SparseRows(self.values.detach().cpu().double().numpy(),
                          self.columns.cpu().numpy(), self.n_columns)

    def with_columns(self, extra: torch.Tensor) -> SparseRowsTensor:
        """The matrix with the dense columns ``extra`` (n, k) appended as columns p..p+k-1."""
        n, k = extra.shape
        cols = torch.arange(self.n_columns, self.n_columns + k, device=self.device)
        return SparseRowsTensor(torch.cat([self.values, extra.to(self.dtype)], dim=1),
                                torch.cat([self.columns, cols.expand(n, k)], dim=1),
                                self.n_columns + k)


#: The standardised fixed-effects matrix of a :class:`Problem`.
FixedTensor = torch.Tensor | SparseRowsTensor


def dense_fixed(Xs: FixedTensor) -> torch.Tensor:
    """``Xs`` as a dense (n, p) tensor: the Gaussian solvers' cross-products
    (:mod:`~ngmm_formula.approx.profiled`, :mod:`~ngmm_formula.approx.blocked`) and REML's
    slot values take the dense matrix (O(n p) memory, as before sparse rows existed)."""
    return Xs.dense() if isinstance(Xs, SparseRowsTensor) else Xs


def matvec(M: ArrayT | SparseRows | SparseRowsTensor, v: ArrayT) -> ArrayT:
    """``M @ v`` with a fixed summation order (numpy arrays or torch tensors, differentiable).

    BLAS kernels pick code paths by memory alignment (with or without fused multiply-add), so
    ``M @ v`` can differ in the last bit between two runs of the same script: MKL's ``dgemv``
    (torch's ``Xs @ beta``) does for 5 or more columns when the matrix starts at an odd
    multiple of 8 bytes (``tests/test_neural.py::test_fixed_order_kernels_ignore_alignment``).
    The linear predictor, the GLM start, and the reported estimates and predictions use this
    instead, so that a seed reproduces a fit bit for bit. Elementwise products followed by a
    reduction over the contiguous last axis are summed in an order fixed by the shape alone.
    """
    if isinstance(M, (SparseRows, SparseRowsTensor)):  # a wide factor design: gather, O(n m)
        return (M.values * v[M.columns]).sum(axis=1)  # type: ignore[no-any-return, call-overload]
    return (M * v[None, :]).sum(axis=1)  # type: ignore[no-any-return, call-overload]


def lstsq_fixed_order(X: torch.Tensor, y: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    r"""Least squares :math:`\arg\min_\beta \lVert y - X\beta \rVert` by Householder QR.

    For each column :math:`j` the reflection :math:`I - 2 v v^\top / v^\top v`, with
    :math:`v = x - \alpha e_1` and :math:`\alpha = -\operatorname{sign}(x_1) \lVert x
    \rVert` for the column's part :math:`x` below the diagonal, is applied to the remaining
    columns and to :math:`y`; then :math:`R \beta = Q^\top y` is solved by back
    substitution. Every inner product is an elementwise product summed along one axis, in an
    order fixed by the shape, so the result does not depend on memory alignment (LAPACK's
    ``gels`` through MKL does, see :func:`~ngmm_formula.model.matvec`). Cost
    :math:`O(n p^2)`, memory :math:`O(n p)`; a column whose diagonal element of :math:`R` is
    below ``rtol`` times the largest gets coefficient 0 (rank deficiency).

    Parameters
    ----------
    X : Tensor, shape (n, p)
    y : Tensor, shape (n,)
    rtol : float

    Returns
    -------
    Tensor, shape (p,)
    """
    n, p = X.shape
    R, b = X.clone(), y.clone()
    for j in range(min(n, p)):
        x = R[j:, j]
        norm = torch.sqrt((x * x).sum())
        if float(norm) == 0.0:
            continue
        alpha = -norm if float(x[0]) >= 0 else norm
        v = x.clone()
        v[0] = v[0] - alpha
        vv = (v * v).sum()
        scale = 2.0 / vv
        R[j:, j:] -= scale * v[:, None] * (v[:, None] * R[j:, j:]).sum(0)[None, :]
        b[j:] -= scale * v * (v * b[j:]).sum()
    diag = torch.diagonal(R[:p, :p]).abs() if n >= p else torch.zeros(p, dtype=X.dtype)
    keep = diag > rtol * float(diag.max()) if p else diag > 0
    beta = torch.zeros(p, dtype=X.dtype, device=X.device)
    for i in reversed(range(min(n, p))):
        if not bool(keep[i]):
            continue
        beta[i] = (b[i] - (R[i, i + 1:] * beta[i + 1:]).sum()) / R[i, i]
    return beta


@dataclass(frozen=True)
class RowsByGroup:
    """The rows of every group, to gather a minibatch of whole groups in O(its rows).

    Attributes
    ----------
    order : ndarray
        Row numbers sorted by group (stable: a group's rows keep their order).
    sizes : ndarray
        Rows per group.
    starts : ndarray
        Position in ``order`` of each group's first row.
    here : ndarray or None
        Rows per group among the rows held here, where they differ from ``sizes``: a
        process of a sharded read holds its own groups' rows, and ``sizes`` counts the rows
        of every process (:meth:`everywhere`). None: ``sizes``.
    """

    order: np.ndarray
    sizes: np.ndarray
    starts: np.ndarray
    here: np.ndarray | None = None

    @classmethod
    def of(cls, group_of_row: np.ndarray, n_groups: int) -> RowsByGroup:
        sizes = np.bincount(group_of_row, minlength=n_groups)
        return cls(order=np.argsort(group_of_row, kind="stable"), sizes=sizes,
                   starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]))

    def everywhere(self, sizes: np.ndarray) -> RowsByGroup:
        """The same rows, with ``sizes`` the rows per group of all processes (a sharded
        read; these rows' counts become :attr:`here`)."""
        return dataclasses.replace(self, sizes=np.asarray(sizes, dtype=np.int64),
                                   here=self.sizes)

    def rows(self, groups: np.ndarray) -> np.ndarray:
        """The rows of ``groups`` held here, group after group in the order given."""
        counts = (self.sizes if self.here is None else self.here)[groups]
        offsets = np.repeat(self.starts[groups] - np.cumsum(counts) + counts, counts)
        return self.order[offsets + np.arange(counts.sum())]


@dataclass(frozen=True)
class Standardisation:
    r"""Internal scaling of the fixed-effects columns, :math:`X_s = X A`.

    Non-constant columns are centred (when the model has an intercept) and scaled to unit
    standard deviation; :math:`\beta = A \beta_s`.
    """

    A: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray, agree: Agreement | None = None) -> Standardisation:
        r"""The standardisation of ``X``'s columns.

        With ``agree`` (a sharded read, :class:`~ngmm_formula.design.Agreement`) ``X`` holds
        this process's rows and every statistic is of all processes' rows, so that every
        process scales the columns alike: the mean from all-reduced column sums and counts,
        the standard deviation from all-reduced sums of squared deviations from that mean
        (two passes, as ``X.std``), the largest absolute value by an all-gather, and a
        column is the intercept when no process has a value away from 1.
        """
        p = X.shape[1]
        A = np.eye(p)
        if p == 0:
            return cls(A)
        if agree is None:
            sd = X.std(axis=0)
            const = sd < 1e-12 * np.maximum(1.0, np.abs(X).max(axis=0))
            intercept = [j for j in range(p) if const[j] and np.allclose(X[:, j], 1.0)]
            mean = X.mean(axis=0)
        else:
            mean, sd = agree.moments(X)
            peak = agree.max(np.abs(X).max(axis=0) if X.shape[0] else np.zeros(p))
            const = sd < 1e-12 * np.maximum(1.0, peak)
            away = agree.sum([0.0 if np.allclose(X[:, j], 1.0) else 1.0 for j in range(p)])
            intercept = [j for j in range(p) if const[j] and away[j] == 0]
        for j in range(p):
            if const[j]:
                continue
            A[j, j] = 1.0 / sd[j]
            if intercept:
                A[intercept[0], j] = -mean[j] / sd[j]
        return cls(A)

    @classmethod
    def of_sparse(cls, X: SparseRows) -> Standardisation:
        r"""The standardisation of a :class:`~ngmm_formula.design.SparseRows` matrix: the
        non-constant columns scaled to unit standard deviation, none centred (centring
        against an intercept would fill every row; the scaling is what conditions the
        optimiser, and :math:`\beta = A \beta_s` is exact either way). Moments from the
        non-zeros in two passes (mean, then squared deviations, the zeros' included)."""
        n, p = X.shape
        mean = X.column_sums() / max(n, 1)
        stored = np.bincount(X.columns.reshape(-1), (X.values != 0).reshape(-1), minlength=p)
        dev = np.bincount(X.columns.reshape(-1),
                          np.where(X.values != 0, (X.values - mean[X.columns]) ** 2,
                                   0.0).reshape(-1), minlength=p)
        sd = np.sqrt((dev + (n - stored) * mean ** 2) / max(n, 1))
        peak = np.zeros(p)
        np.maximum.at(peak, X.columns.reshape(-1), np.abs(X.values).reshape(-1))
        scale = np.where(sd < 1e-12 * np.maximum(1.0, peak), 1.0, 1.0 / np.where(sd > 0, sd, 1.0))
        return cls(np.diag(scale))

    def scaled(self, X: SparseRows) -> SparseRows:
        """:math:`X A` for the diagonal :math:`A` of :meth:`of_sparse`: each entry times its
        column's scale."""
        return SparseRows(X.values * np.diag(self.A)[X.columns], X.columns, X.n_columns)

    @property
    def log_abs_det(self) -> float:
        return float(np.linalg.slogdet(self.A)[1])


@dataclass(frozen=True)
class Problem:
    """The design as tensors, ready for the engine (float64 unless stated)."""

    y: torch.Tensor
    w: torch.Tensor
    offset: torch.Tensor
    # X A (n, p): dense, or SparseRowsTensor for a wide factor design (design.SparseRows)
    Xs: FixedTensor
    Z: tuple[torch.Tensor, ...]
    q: tuple[int, ...]
    n_levels: tuple[int, ...]
    blocks: Blocks
    standardisation: Standardisation
    reml: bool
    net_X: tuple[torch.Tensor, ...]
    log_const: torch.Tensor
    # training only: noise added to the inputs of each network's nonlinear layers (same
    # shapes as net_X; empty: none). Set on a minibatch's subproblem by the trainer.
    net_noise: tuple[torch.Tensor, ...] = ()
    # d of each reduced-rank term, None for an ordinary one (empty: no reduced-rank term)
    rank: tuple[int | None, ...] = ()
    # per term: the columns of Z's entries when Z holds a SparseRows' values (n, m), None
    # when Z is the dense (n, q) matrix (empty: every term is dense)
    Zcols: tuple[torch.Tensor | None, ...] = ()

    @property
    def ranks(self) -> tuple[int | None, ...]:
        """d per term (None: an ordinary q x q term)."""
        return self.rank or (None,) * len(self.q)

    @property
    def dims(self) -> tuple[int, ...]:
        """Integrated coordinates per level of each term: d, or q."""
        return tuple(k if d is None else d for k, d in zip(self.q, self.ranks))

    @property
    def n_theta(self) -> int:
        return sum(len(tril_pairs(k, d)) for k, d in zip(self.q, self.ranks))

    @property
    def p(self) -> int:
        return int(self.Xs.shape[1])

    def subset(self, rows: torch.Tensor, blocks: torch.Tensor | None = None) -> Problem:
        """The problem restricted to ``rows``.

        With ``blocks`` (sorted block ids that contain every row, for per-group layouts) the
        blocks are renumbered 0..len(blocks)-1, so the cost scales with the subset; without,
        every block is kept (a block without rows integrates to exactly 1).
        """
        b = self.blocks

        gather = rows.dim() == 1 and rows.dtype in (torch.int64, torch.int32)

        def take(x: torch.Tensor) -> torch.Tensor:  # x[rows]; index_select: one kernel
            return x.index_select(0, rows) if gather else x[rows]

        block_of_obs = take(b.block_of_obs)
        n_blocks = b.n_blocks
        if blocks is not None:
            # new id = position in the sorted ``blocks``: a binary search per row, O(rows log
            # len(blocks)) (a lookup table over all n_blocks would make every minibatch cost
            # O(n_blocks), an epoch O(n_blocks^2 / batch))
            block_of_obs = torch.searchsorted(blocks.to(block_of_obs.dtype), block_of_obs)
            n_blocks = int(blocks.numel())
        sub_blocks = Blocks(n_blocks=n_blocks, dim=b.dim, block_of_obs=block_of_obs,
                            slot_pos=take(b.slot_pos), prior_precision=b.prior_precision,
                            split=b.split)
        return Problem(
            y=take(self.y), w=take(self.w), offset=take(self.offset),
            Xs=self.Xs.rows(take) if isinstance(self.Xs, SparseRowsTensor) else take(self.Xs),
            Z=tuple(take(z) for z in self.Z), q=self.q, n_levels=self.n_levels,
            blocks=sub_blocks, standardisation=self.standardisation, reml=self.reml,
            net_X=tuple(take(x) for x in self.net_X), log_const=take(self.log_const),
            net_noise=tuple(take(e) for e in self.net_noise), rank=self.rank,
            Zcols=tuple(None if c is None else take(c) for c in self.Zcols),
        )

    def window(self, lo: int, hi: int, block_of_obs: torch.Tensor, n_blocks: int) -> Problem:
        """Rows ``lo:hi`` as views (no copy), in ``n_blocks`` blocks numbered by
        ``block_of_obs`` (per-group layouts): a minibatch of a problem whose rows were
        gathered in minibatch order (:meth:`subset` gathers)."""
        cut = slice(lo, hi)
        b = self.blocks
        return dataclasses.replace(
            self, y=self.y[cut], w=self.w[cut], offset=self.offset[cut],
            Xs=(self.Xs.rows(lambda x: x[cut]) if isinstance(self.Xs, SparseRowsTensor)
                else self.Xs[cut]),
            Z=tuple(z[cut] for z in self.Z), net_X=tuple(x[cut] for x in self.net_X),
            log_const=self.log_const[cut], net_noise=tuple(e[cut] for e in self.net_noise),
            Zcols=tuple(None if c is None else c[cut] for c in self.Zcols),
            blocks=Blocks(n_blocks=n_blocks, dim=b.dim, block_of_obs=block_of_obs,
                          slot_pos=b.slot_pos[cut], prior_precision=b.prior_precision,
                          split=b.split))

    def with_offset(self, extra: torch.Tensor) -> Problem:
        """The same problem with ``extra`` added to the offset and no network inputs
        (networks frozen after training enter as a known offset)."""
        return dataclasses.replace(self, offset=self.offset + extra, net_X=(), net_noise=())


def build_problem(design: Design, family: Family, approx: BlockChoice, *,
                  dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                  net_dtype: torch.dtype | None = None, agree: Agreement | None = None
                  ) -> Problem:
    """Tensors and block layout for ``design`` under ``approx``, on ``device``.

    ``agree``: a sharded read's agreement (the standardisation of all processes' rows,
    :meth:`Standardisation.of`).

    Everything the engine integrates is in ``dtype``; the network inputs are in
    ``net_dtype`` (default ``dtype``). Index tensors are int32 for one block per group when
    every flat index of the engine (up to ``n_blocks * D * D``) fits, else int64.
    """
    Xs: np.ndarray | SparseRows
    if isinstance(design.X, SparseRows):
        std = Standardisation.of_sparse(design.X)
        Xs = std.scaled(design.X)
    else:
        std = Standardisation.of(design.X, agree)
        Xs = design.X @ std.A

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(a), dtype=dtype, device=device)

    terms = design.re_terms
    n = design.nobs
    q = tuple(tm.q for tm in terms)
    dims = tuple(tm.dim for tm in terms)
    if approx.joint:
        # lme4's Zt order: term offset + level * dim + column
        cols, offset = [], 0
        for tm in terms:
            cols.append(offset + tm.group_index[:, None] * tm.dim
                        + np.arange(tm.dim)[None, :])
            offset += tm.dim * tm.n_levels
        slot_pos = np.hstack(cols) if cols else np.zeros((n, 0), dtype=np.int64)
        prior = np.ones(offset)
        if approx.reml:
            slot_pos = np.hstack([slot_pos, offset + np.arange(Xs.shape[1])[None, :]
                                  .repeat(n, axis=0)])
            prior = np.concatenate([prior, np.zeros(Xs.shape[1])])
        block_of_obs = np.zeros(n, dtype=np.int64)
        n_blocks, dim = 1, prior.shape[0]
        split = joint_split(terms, dim, device)
    else:
        groups = {tm.group for tm in terms}
        assert len(groups) == 1, "per-group blocks need a single grouping factor"
        block_of_obs = terms[0].group_index
        starts = np.cumsum([0, *dims[:-1]])
        slot_pos = np.hstack([s + np.arange(k)[None, :].repeat(n, axis=0)
                              for s, k in zip(starts, dims)])
        n_blocks, dim = terms[0].n_levels, int(sum(dims))
        prior = np.ones(dim)
        split = None
    # int32 indices for one block per group (the engine's flat indices reach
    # n_blocks * D * D); the joint layouts keep int64 for the block elimination's index maps
    idx = torch.int64 if approx.joint else index_dtype(n_blocks * dim * dim)
    blocks = Blocks(
        n_blocks=n_blocks,
        dim=dim,
        block_of_obs=torch.tensor(np.asarray(block_of_obs), dtype=idx, device=device),
        slot_pos=torch.tensor(np.asarray(slot_pos), dtype=idx, device=device),
        prior_precision=t(prior),
        split=split,
    )
    nd = dtype if net_dtype is None else net_dtype
    sparse = [isinstance(tm.Zraw, SparseRows) for tm in terms]
    return Problem(
        y=t(design.y), w=t(design.weights), offset=t(design.offset),
        Xs=(SparseRowsTensor(t(Xs.values), torch.tensor(Xs.columns, dtype=torch.long,
                                                       device=device), Xs.n_columns)
            if isinstance(Xs, SparseRows) else t(Xs)),
        Z=tuple(t(tm.Zraw.values if isinstance(tm.Zraw, SparseRows) else tm.Zraw)
                for tm in terms), q=q,
        n_levels=tuple(tm.n_levels for tm in terms), blocks=blocks, standardisation=std,
        reml=approx.reml,
        net_X=tuple(torch.tensor(np.asarray(ni.X), dtype=nd, device=device)
                    for ni in design.nets),
        log_const=family.data_constant(t(design.y), t(design.weights)),
        rank=(tuple(tm.rank for tm in terms)
              if any(tm.rank is not None for tm in terms) else ()),
        Zcols=(tuple(torch.tensor(tm.Zraw.columns, dtype=torch.long, device=device)
                     if isinstance(tm.Zraw, SparseRows) else None for tm in terms)
               if any(sparse) else ()),
    )


# Up to this joint dimension a dense Cholesky factor of the joint block costs less than the
# block elimination's extra torch operations (value and gradient timed on sleepstudy,
# Penicillin, Pastes, grouseticks, VerbAgg and simulated crossed / REML designs of 24-322
# coordinates: the elimination costs ~3 ms more per evaluation at small D, the dense factor
# catches up near D = 150)
DENSE_JOINT_MAX_DIM = 150


def joint_split(terms: tuple[ReTerm, ...] | list[ReTerm], dim: int,
                device: str | torch.device = "cpu", *,
                dense_max_dim: int | None = None) -> Split | None:
    r"""The split of a joint block's coordinates for :class:`~ngmm_formula.approx.factor.
    SchurFactor`, or None where a dense factor is cheaper.

    A holds the random effects of the grouping factor with most coordinates
    (:math:`\sum_k q_k n_k` over its terms; lme4's first term unless several terms share a
    factor): every observation touches one level of it, so :math:`H_{AA}` is block diagonal.
    B holds the rest, in the joint order (lme4's ``Zt`` order, then :math:`\beta` under REML):
    the other factors' random effects and the flat REML coordinates. The elimination costs
    :math:`O(\dim(B)^3)` instead of :math:`O(D^3)`. None (dense) when ``dim <=
    dense_max_dim`` (default :data:`DENSE_JOINT_MAX_DIM`) or when B would hold half the
    coordinates or more.
    """
    if dense_max_dim is None:
        dense_max_dim = DENSE_JOINT_MAX_DIM
    if not terms:
        return None
    size: dict[str, int] = {}
    for tm in terms:
        size[tm.group] = size.get(tm.group, 0) + tm.dim * tm.n_levels
    group = max(size, key=lambda g: size[g])  # first such factor on ties (lme4's order)
    dim_b = dim - size[group]
    if dim <= dense_max_dim or dim_b >= dim // 2:
        return None
    a_slots: list[int] = []
    a_cols: list[np.ndarray] = []
    slot = offset = 0
    for tm in terms:
        if tm.group == group:
            a_slots.extend(range(slot, slot + tm.dim))
            a_cols.append(offset + np.arange(tm.n_levels)[:, None] * tm.dim
                          + np.arange(tm.dim)[None, :])
        slot += tm.dim
        offset += tm.dim * tm.n_levels
    n_slots = slot + (dim - offset)  # the REML slots come last, one per beta coordinate
    a_coords = np.hstack(a_cols)
    in_a = np.zeros(dim, dtype=bool)
    in_a[a_coords.reshape(-1)] = True

    def long(a: np.ndarray | list[int]) -> torch.Tensor:
        return torch.tensor(np.asarray(a, dtype=np.int64), dtype=torch.long, device=device)

    return Split(a_slots=long(a_slots),
                 b_slots=long([s for s in range(n_slots) if s not in set(a_slots)]),
                 a_coords=long(a_coords), b_coords=long(np.flatnonzero(~in_a)))


@functools.cache
def _tril_index(q: int, d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each theta entry of a q x q block, or of a q x d loading matrix
    (lower triangle, column-major)."""
    pairs = tril_pairs(q, d)
    return (torch.tensor([i for i, _ in pairs], dtype=torch.long),
            torch.tensor([j for _, j in pairs], dtype=torch.long))


def lambda_blocks(theta: torch.Tensor, q: tuple[int, ...],
                  rank: tuple[int | None, ...] = ()) -> list[torch.Tensor]:
    r"""The lower-triangular blocks :math:`\Lambda_k` from ``theta`` (column-major, as lme4):
    q x q, or q x d for a reduced-rank term (``rank``: d per term, None for ordinary ones;
    empty: none is reduced-rank)."""
    out, start = [], 0
    for k, d in zip(q, rank or (None,) * len(q)):
        rows, cols = _tril_index(k, d)
        if rows.device != theta.device:
            rows, cols = rows.to(theta.device), cols.to(theta.device)
        m = theta.new_zeros(k, k if d is None else d).index_put(
            (rows, cols), theta[start:start + rows.numel()])
        out.append(m)
        start += rows.numel()
    return out


class LinearPredictor(torch.nn.Module):
    """Parameters of an NGMM and the computation of the linear predictor.

    Parameters
    ----------
    problem : Problem
    has_dispersion : bool
    nets : sequence of torch.nn.Module
        One network per ``nn()`` term (mapping its input matrix to one column).
    """

    def __init__(self, problem: Problem, has_dispersion: bool,
                 nets: tuple[torch.nn.Module, ...] = ()):
        super().__init__()
        dtype, device = problem.Xs.dtype, problem.Xs.device
        self.q = problem.q
        self.rank = problem.rank
        self.reml = problem.reml
        self.beta = torch.nn.Parameter(torch.zeros(problem.p, dtype=dtype, device=device))
        start = np.where(theta_diagonals(problem.q, problem.ranks), 1.0, 0.0)
        self.theta = torch.nn.Parameter(torch.tensor(start, dtype=dtype, device=device))
        self.log_sigma = (torch.nn.Parameter(torch.zeros((), dtype=dtype, device=device))
                          if has_dispersion else None)
        self.nets = torch.nn.ModuleList(nets)

    def eta_fixed(self, problem: Problem) -> torch.Tensor:
        """offset + X beta + sum of networks (X beta left out under REML: beta is integrated);
        the networks see ``problem.net_noise`` if it is set (training)."""
        eta = problem.offset
        if not self.reml and problem.p:
            eta = eta + matvec(problem.Xs, self.beta)
        noise = problem.net_noise or (None,) * len(problem.net_X)
        for net, x, e in zip(self.nets, problem.net_X, noise):
            eta = eta + net(x, e)
        return eta

    def network_output(self, problem: Problem,
                       outputs: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Sum of the networks' outputs on ``problem``'s rows (zeros without networks): the
        known offset of fits in which the networks are held fixed. ``outputs``: a network's
        output on these rows where the caller has it already (None: computed here), summed
        in the same order."""
        out = torch.zeros_like(problem.y)
        known = list(outputs) or [None] * len(self.nets)
        for net, x, given in zip(self.nets, problem.net_X, known):
            out = out + (net(x) if given is None else given)
        return out

    def slot_values(self, problem: Problem) -> torch.Tensor:
        """:math:`C = [Z_1 \\Lambda_1, \\dots, Z_K \\Lambda_K (, X_s)]`, shape (n, S); a
        sparse-row Z (values and columns, ``problem.Zcols``) gathers the rows of
        :math:`\\Lambda` its entries select."""
        cols = problem.Zcols or (None,) * len(problem.Z)
        parts = [Z @ L if c is None else (Z.unsqueeze(-1) * L[c]).sum(1)
                 for Z, c, L in zip(problem.Z, cols,
                                    lambda_blocks(self.theta, self.q, self.rank))]
        if self.reml:
            parts.append(dense_fixed(problem.Xs))
        return torch.cat(parts, dim=1)


def linear_part(module: LinearPredictor, problem: Problem) -> LinearPredictor:
    """A predictor that shares ``module``'s beta, theta and sigma (the same Parameter
    objects) but has no networks: the GLMM part, for fits in which the networks' output is
    zero or a known offset of ``problem``."""
    glmm = LinearPredictor(problem, module.log_sigma is not None)
    glmm.beta, glmm.theta = module.beta, module.theta
    if module.log_sigma is not None:
        glmm.log_sigma = module.log_sigma
    return glmm


def optimised_parameters(module: LinearPredictor) -> list[torch.nn.Parameter]:
    """The parameters the optimiser of a linear model moves, in its order (the order of
    :class:`~ngmm_formula.fit.Optimum`'s ``x``): beta (unless REML integrates it), theta,
    and the log residual scale where the family has one."""
    ps = [] if module.reml else [module.beta]
    ps.append(module.theta)
    if module.log_sigma is not None:
        ps.append(module.log_sigma)
    return ps
