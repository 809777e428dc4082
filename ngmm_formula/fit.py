r"""Fit layer: the objective at fixed parameters and the optimiser loop.

:class:`Objective` evaluates the approximate marginal log-likelihood
:math:`\ell(\psi) = \sum_b \log \int e^{h_b(v; \psi)} dv` at the parameters of a
:class:`~ngmm_formula.model.LinearPredictor` (this is lme4's ``devFunOnly = TRUE`` path:
``-2 * objective()`` is the deviance), keeping the conditional modes of the last evaluation
as the warm start of the next.

:func:`optimise` fits a linear GLMM: all parameters jointly (``beta`` on the standardised
scale, ``theta``, ``log_sigma``) in float64, started from a GLM fit; L-BFGS (scipy's
L-BFGS-B, whose line search satisfies the strong Wolfe conditions) until the gradient is small,
then Newton steps with the Hessian from central differences of the exact gradient, which is
also the Hessian used for standard errors (as lme4 does for ``glmer``); per-group Laplace
fits of families without a dispersion parameter take the exact Hessian instead, in one pass
over the rows (:func:`laplace_hessian`). A linear Gaussian
model (exact integral, no networks) is fitted as ``lmer`` fits it: over lme4's relative
theta alone, on the profiled objective (beta and sigma in closed form given theta, standard
errors of beta from the same factorisation): the same optimiser with the analytic gradient
of :mod:`~ngmm_formula.approx.profiled` for one grouping factor and small joint blocks, and
a derivative-free one (BOBYQA from nlopt, as lmer's) on the blocked sparse factorisation of
:mod:`~ngmm_formula.approx.blocked` for larger crossed and nested factors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.optimize
import torch

from ngmm_formula.approx import Approximation
from ngmm_formula.approx.adaptive import log_marginal
from ngmm_formula.approx.blocked import profiled_objective
from ngmm_formula.approx.conditional import FIXED_STEP_TOL, ConditionalMode, find_mode
from ngmm_formula.approx.curvature import laplace_hessian_parts
from ngmm_formula.approx.factor import DenseFactor
from ngmm_formula.approx.profiled import ProfiledLMM
from ngmm_formula.approx.scalar import scalar_log_marginal, scalar_modes
from ngmm_formula.control import Control
from ngmm_formula.design import (
    WIDE_SPARSE_MIN_COLUMNS,
    theta_diagonals,
    tril_pairs,
    wide_and_sparse,
)
from ngmm_formula.errors import NGMMError
from ngmm_formula.families import Family
from ngmm_formula.model import (
    FixedTensor,
    LinearPredictor,
    Problem,
    RowsByGroup,
    SparseRowsTensor,
    lstsq_fixed_order,
    matvec,
)
from ngmm_formula.model import optimised_parameters as _params

if TYPE_CHECKING:
    from ngmm_formula.shards import Shard

__all__ = ["CHUNK_ROWS", "Control", "Objective", "Optimum", "optimise"]

#: Rows per piece of an objective evaluated piece by piece (:meth:`Objective.chunks`):
#: 2^15 rows x 11 quadrature nodes x 8 bytes = 2.9 MB per temporary, about a core's L2 cache.
#: Measured on binomial ``(1 | g)`` fits at 3 x 10^5 rows (whole processes, medians of 5
#: A/B pairs): with 11 nodes 2^15 took 0.88x the time of 2^17, 2^14 0.95x that of 2^15,
#: and 2^13 1.37x that of 2^14 (each piece's mode search has a fixed cost of a few ms per
#: evaluation); with the Laplace rule 2^15 took 0.98x the time of 2^17.
CHUNK_ROWS = 2**15


def piece_bounds(sizes: np.ndarray) -> np.ndarray:
    """Bounds ``[0, ..., len(sizes)]`` of consecutive runs of blocks (of ``sizes`` rows each,
    whole blocks) of about :data:`CHUNK_ROWS` rows: piece ``j`` is blocks
    ``bounds[j]:bounds[j + 1]``."""
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, np.arange(CHUNK_ROWS, int(ends[-1]), CHUNK_ROWS),
                           side="left")
    return np.unique(np.concatenate([[0], cuts + 1, [len(sizes)]]))


class Objective:
    """The approximate marginal log-likelihood of ``module``'s current parameters.

    Parameters
    ----------
    problem : Problem
    family : Family
    approx : Approximation
    module : LinearPredictor
    mode_tol : float
        Convergence tolerance of the Newton search for the conditional modes (the one-step
        correction of :mod:`~ngmm_formula.approx.adaptive` makes the value accurate to the
        square of this; training uses a looser one than the final fit).
    mode_steps : int, optional
        Fixed undamped Newton steps from a warm start instead of the search to ``mode_tol``
        (:func:`~ngmm_formula.approx.conditional.find_mode`'s ``steps``; training).
    shard : Shard, optional
        Data-parallel fitting (:mod:`ngmm_formula.distributed`): this process evaluates only
        its range of groups, ``problem`` is restricted to their rows, and :meth:`reduce` sums
        values and gradients over the processes. None: one process, :meth:`reduce` is the
        identity.
    """

    def __init__(self, problem: Problem, family: Family, approx: Approximation,
                 module: LinearPredictor, *, mode_tol: float = 1e-10,
                 mode_steps: int | None = None, shard: Shard | None = None):
        self.shard = shard
        self.problem = problem if shard is None else shard.local(problem)
        self.family = family
        self.approx = approx
        self.module = module
        self.rule = approx.rule(problem.blocks.dim)
        self.mode: ConditionalMode | None = None
        self.mode_tol = mode_tol
        self.mode_steps = mode_steps
        self._chunks: list[Objective] | None = None
        # (parameters, log-likelihood, modes) of a profiled fit's solution: all_blocks there
        self.solved: tuple[bytes, torch.Tensor, ConditionalMode] | None = None

    def per_block(self, *, warm: bool = True, start: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Log marginal likelihood of every block (differentiable).

        The mode search starts from ``start`` if given, else from the last evaluation's modes
        (``warm``), else from 0.
        """
        pr, m = self.problem, self.module
        eta_fixed = m.eta_fixed(pr)
        C = m.slot_values(pr)
        if start is None and warm and self.mode is not None:
            start = self.mode.v
        if self._scalar_blocks(C):
            fused = self._scalar_per_block(eta_fixed, C[:, 0], start)
            if fused is not None:
                return fused
        self.mode = find_mode(self.family, pr.y, pr.w, eta_fixed, m.log_sigma, C, pr.blocks,
                              start, tol=self.mode_tol, steps=self.mode_steps)
        ll = log_marginal(self.family, pr.y, pr.w, eta_fixed, m.log_sigma, C, pr.blocks,
                          self.mode, self.rule, pr.log_const)
        if pr.reml:
            # beta was integrated on the standardised scale: d beta = |det A| d beta_s
            ll = ll + pr.standardisation.log_abs_det
        return ll

    def _scalar_blocks(self, C: torch.Tensor) -> bool:
        """Whether :meth:`per_block` takes the fused route of
        :mod:`~ngmm_formula.approx.scalar`: one scalar random effect per group in a family
        without dispersion, under any one-dimensional rule. Measured against the general
        route (binomial ``y ~ x + (1 | g)``, 100 rows a group, 11 nodes, CPU time of whole
        fits, 2026-12-06, a shared machine): 2 x 10^4 rows 0.73 against 0.82 s, 10^5 3.6
        against 3.8 s, 10^6 29.7 against 42.2 s (22 evaluations each); cbpp with 25 nodes
        0.076 against 0.132 s (wall, medians of 5)."""
        pr = self.problem
        return (self.approx.kind in ("laplace", "agq", "truncated")
                and not self.approx.joint
                and not pr.reml and not self.family.has_dispersion and pr.blocks.dim == 1
                and C.shape[-1] == 1 and pr.blocks.split is None)

    def _scalar_per_block(self, eta_fixed: torch.Tensor, c: torch.Tensor,
                          start: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`per_block` by :mod:`~ngmm_formula.approx.scalar`; None where it does not
        apply (a curvature that is not positive: the general route takes over)."""
        pr, fam = self.problem, self.family
        block, n_blocks = pr.blocks.block_of_obs, pr.blocks.n_blocks
        offsets = pr.blocks.row_offsets  # segment sums where groups' rows are consecutive
        v = mode = None
        # from the warm modes: training's fixed steps, or (a linear fit's outer optimiser)
        # Newton steps until the last moves no mode by more than FIXED_STEP_TOL ** 2 (a mode
        # within about 1e-12), else the damped search below; from 0 likewise (outside
        # training) under a canonical link (family.newton_scoring), where h is concave (its
        # one stationary point is the mode)
        first = (start if start is not None
                 else eta_fixed.new_zeros(n_blocks)
                 if fam.newton_scoring and not self.mode_steps else None)
        if first is not None:
            v = scalar_modes(fam, pr.y, pr.w, eta_fixed, c, block, n_blocks, first,
                             self.mode_steps or 1,
                             settle=FIXED_STEP_TOL if self.mode_steps else FIXED_STEP_TOL ** 2,
                             offsets=offsets)
        if v is None:
            mode = find_mode(fam, pr.y, pr.w, eta_fixed, None, c.unsqueeze(-1), pr.blocks,
                             start, tol=self.mode_tol)
            v = mode.v[:, 0]
        out = scalar_log_marginal(fam, pr.y, pr.w, eta_fixed, c, block, n_blocks, v,
                                  self.rule, pr.log_const, offsets)
        if out is None:
            return None
        ll, H = out
        self.mode = mode if mode is not None else ConditionalMode(
            v=v.unsqueeze(-1), factor=DenseFactor(H.sqrt().reshape(-1, 1, 1), True),
            iterations=self.mode_steps or 0, converged=False)
        return ll

    def __call__(self) -> torch.Tensor:
        """This process's part of the log-likelihood (all of it without a shard)."""
        return self.per_block().sum()

    def chunks(self) -> list[Objective]:
        """This process's blocks as consecutive pieces of about :data:`CHUNK_ROWS` rows, one
        objective each (sharing the module), when the blocks are independent (one per group,
        no REML) and the problem is larger than a piece; else ``[self]``.

        The log-likelihood is a sum over independent blocks, so its value and gradient are
        the sums of the pieces'. Evaluated piece by piece (:meth:`value_and_grad`) every
        temporary (rows x quadrature nodes) stays below glibc's largest mmap threshold
        (32 MiB), and the allocator reuses its heap instead of mapping and zero-filling fresh
        pages for each large tensor: at 10^6 rows and 11 nodes one evaluation took 1.49 s
        whole and 0.57 s with the heap kept (``benchmarks/README.md``). Each piece keeps its
        own conditional modes as warm starts.
        """
        if self._chunks is None:
            pr = self.problem
            n = int(pr.y.shape[0])
            if self.approx.joint or pr.reml or n <= CHUNK_ROWS:
                # not kept: a list holding self would be a reference cycle, and a short-lived
                # objective (a finite-difference column's, _local_fd_hessian) would keep its
                # rows until the garbage collector ran (+0.6 GB at 10^5 responses)
                return [self]
            else:
                block = pr.blocks.block_of_obs.cpu().numpy().astype(np.int64)
                by_block = RowsByGroup.of(block, pr.blocks.n_blocks)
                bounds = piece_bounds(by_block.sizes)
                device = pr.y.device
                self._chunks = []
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    blocks = np.arange(lo, hi)
                    rows = by_block.rows(blocks)
                    sub = pr.subset(torch.as_tensor(rows, device=device),
                                    torch.as_tensor(blocks, device=device))
                    self._chunks.append(Objective(sub, self.family, self.approx, self.module,
                                                  mode_tol=self.mode_tol,
                                                  mode_steps=self.mode_steps))
        return self._chunks

    def forget_modes(self) -> None:
        """Start the next mode searches from 0 (after a jump of the parameters)."""
        self.mode = None
        for piece in self._chunks or []:
            piece.mode = None

    def value_and_grad(self, params: list[torch.nn.Parameter]
                       ) -> tuple[float, list[torch.Tensor]]:
        r"""This process's log-likelihood and its gradient in ``params``, piece by piece
        (:meth:`chunks`); the pieces are summed in a fixed order (reproducible bit for
        bit).

        Where a group's conditional mode cannot be computed -- its log-integrand is not
        finite, e.g. :math:`\exp(\eta)` beyond float64's range under a log link at a trial
        point of a line search -- the value is :math:`-\infty` (gradient zero): the
        optimisers step back from such points (:class:`_GradientStop`) as from any other
        non-finite value, and :func:`optimise` refuses to end at one."""
        value = 0.0
        total: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
        for piece in self.chunks():
            try:
                ll = piece()
            except torch.linalg.LinAlgError:  # find_mode: a factor not positive definite
                return -math.inf, [torch.zeros_like(p) for p in params]
            grads = torch.autograd.grad(ll, params, allow_unused=True)
            value += float(ll.detach())
            total = [t if g is None else t + g for t, g in zip(total, grads)]
        return value, total

    def score_information(self) -> np.ndarray:
        r"""The outer product of the per-block scores at the current parameters,
        :math:`\sum_g s_g s_g^\top` with :math:`s_g = \partial \ell_g / \partial x` (x in
        :func:`_params`' order): BHHH's estimate of the information, consistent for the
        observed information at the maximum-likelihood estimate of a correctly specified
        model, at the cost of one gradient (finite differences of the gradient cost 2 dim(x)).

        For per-group blocks whose parameters enter through the rows' linear predictor and
        slot values only (no REML, no dispersion parameter, no networks): each row's
        :math:`\partial \ell / \partial \eta_i` and :math:`\partial \ell / \partial C_{is}`
        belong to its block alone, and :math:`\eta = X_s \beta + \dots`, :math:`C = Z
        \Lambda(\theta)` are linear in the parameters, so the scores are sparse sums over
        rows (:func:`_block_jacobian`).
        """
        k = int(_get(self.module).size)
        info = np.zeros((k, k))
        for piece in self.chunks():
            J = _block_jacobian(piece.problem, *piece._row_gradients(), k)
            info += (J.T @ J).toarray()
        return info

    def _row_gradients(self) -> tuple[np.ndarray, np.ndarray]:
        r""":math:`\partial \ell / \partial \eta_i` (n,) and :math:`\partial \ell /
        \partial C_{is}` (n, S) at the current parameters."""
        pr, m = self.problem, self.module
        with torch.no_grad():
            eta, C = m.eta_fixed(pr), m.slot_values(pr)
        start = self.mode.v if self.mode is not None else None
        self.mode = find_mode(self.family, pr.y, pr.w, eta, m.log_sigma, C, pr.blocks, start,
                              tol=self.mode_tol)
        eta.requires_grad_()
        C.requires_grad_()
        ll = log_marginal(self.family, pr.y, pr.w, eta, m.log_sigma, C, pr.blocks, self.mode,
                          self.rule, pr.log_const)
        g_eta, g_C = torch.autograd.grad(ll.sum(), (eta, C))
        return g_eta.cpu().double().numpy(), g_C.cpu().double().numpy()

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """Sum ``x`` (values, gradients) over the processes sharing the objective."""
        return x if self.shard is None else self.shard.all_sum(x)

    def value(self) -> float:
        """The whole log-likelihood, summed over the processes (no gradient)."""
        with torch.no_grad():
            local = sum(float(piece()) for piece in self.chunks())
            return float(self.reduce(np.array([local]))[0])

    def all_blocks(self) -> tuple[torch.Tensor, ConditionalMode]:
        """Log marginal likelihood and conditional mode of every block of the whole problem at
        the current parameters (no gradient; gathered from all processes under a shard, but
        this process's own blocks after a sharded read, whose design holds only their rows);
        those of a profiled fit's solution (:attr:`solved`) while the parameters are its."""
        if self.solved is not None and self.solved[0] == _state(self.module):
            return self.solved[1], self.solved[2]
        with torch.no_grad():
            ll = self.per_block(warm=True)
        assert self.mode is not None
        if self.shard is None or self.shard.presharded:  # a sharded read: this process's
            return ll, self.mode
        return self.shard.gather_blocks(ll), self.shard.gather_mode(self.mode)


# --------------------------------------------------------------------------------------------
# flat parameter vector <-> module


def _state(module: LinearPredictor) -> bytes:
    """The linear parameters' bits (beta, theta, log_sigma)."""
    ps = [module.beta, module.theta] + ([] if module.log_sigma is None else [module.log_sigma])
    return b"".join(p.detach().cpu().numpy().tobytes() for p in ps)


def _get(module: LinearPredictor) -> np.ndarray:
    return np.concatenate([p.detach().cpu().numpy().ravel() for p in _params(module)])


def _set(module: LinearPredictor, x: np.ndarray) -> None:
    i = 0
    with torch.no_grad():
        for p in _params(module):
            k = p.numel()
            p.copy_(torch.as_tensor(x[i:i + k], dtype=p.dtype).reshape(p.shape))
            i += k


ValueAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]

#: Above this many parameter-row products (dim(x) x rows) a per-group quadrature fit (AGQ or
#: the truncated rule) without a dispersion parameter takes BHHH's score outer product
#: (:meth:`Objective.score_information`) for its Newton polish and standard errors instead of
#: the finite-difference Hessian, whose 2 dim(x) gradient evaluations dominate such fits: an
#: item-response model with 301 parameters on 10^5 responses spent about 1,200 of its
#: evaluations there. The two agree where the integral is accurate (the information
#: identity): on 1,500 simulated students x 5 items, AGQ with 9 nodes, standard errors within
#: 1.2 % (fixed effects) and 2.0 % (loadings). The Laplace approximation keeps the observed
#: Hessian: its log-likelihood is not the model's, and there BHHH's standard errors differed
#: from the Hessian's by up to 9 % (30 items per student). Every reference model of the tests
#: stays below the threshold (VerbAgg's rr fits: 71 x 7,584 = 5.4e5).
SCORE_INFORMATION_MIN_WORK = 2e7


def _row_entries(pr: Problem) -> list[tuple[int | None, np.ndarray, np.ndarray, np.ndarray]]:
    r"""How the parameters enter the rows: a list of ``(slot, row, column, value)`` arrays,
    one per fixed part (``slot`` None: :math:`\partial \eta_i / \partial \beta_j = X_{ij}`,
    unless REML integrates beta) and per slot of each term
    (:math:`\partial C_{is} / \partial \Lambda_{js} = Z_{ij}`: ``column`` the position of
    :math:`\Lambda_{js}` among the parameters, :func:`_lambda_index`; fixed zeros left out).
    Shared by the per-block scores (:func:`_block_jacobian`) and the exact Laplace Hessian
    (:func:`laplace_hessian`)."""
    out: list[tuple[int | None, np.ndarray, np.ndarray, np.ndarray]] = []
    col0 = 0
    if not pr.reml and pr.p:  # eta = X_s beta + ...
        r, c, v = _fixed_entries(pr)
        out.append((None, r, c, v))
        col0 = pr.p
    slot = 0
    zcols = pr.Zcols or (None,) * len(pr.Z)
    for Z, Zc, q, d, rank in zip(pr.Z, zcols, pr.q, pr.dims, pr.ranks):
        index = _lambda_index(q, d, rank, col0)
        Zv = Z.cpu().double().numpy()
        jcol = (np.broadcast_to(np.arange(q), Zv.shape) if Zc is None
                else Zc.cpu().numpy().astype(np.int64))
        rows = np.broadcast_to(np.arange(Zv.shape[0])[:, None], Zv.shape)
        for t in range(d):
            idx = index[jcol, t]
            keep = idx >= 0
            out.append((slot + t, rows[keep], idx[keep], Zv[keep]))
        col0 += len(tril_pairs(q, rank))
        slot += d
    return out


def _block_jacobian(pr: Problem, g_eta: np.ndarray, g_C: np.ndarray, k: int) -> Any:
    """The per-block scores (n_blocks, k) as a sparse matrix, from the rows' gradients in
    their linear predictor and slot values (:meth:`Objective.score_information`)."""
    import scipy.sparse as sp

    block = pr.blocks.block_of_obs.cpu().numpy().astype(np.int64)
    rows, cols, vals = [], [], []
    for slot, r, c, v in _row_entries(pr):
        rows.append(block[r])
        cols.append(c)
        vals.append(v * (g_eta[r] if slot is None else g_C[r, slot]))
    return sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(pr.blocks.n_blocks, k)).tocsr()


def _fixed_entries(pr: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries of :math:`X_s` as (row, column, value) arrays in row-major order: every
    (n x p) entry of a dense matrix, the stored (n x m) of a sparse-row one."""
    Xs = pr.Xs
    if isinstance(Xs, SparseRowsTensor):
        n, m = Xs.values.shape
        return (np.repeat(np.arange(n), m), Xs.columns.cpu().numpy().reshape(-1),
                Xs.values.cpu().double().numpy().reshape(-1))
    n = Xs.shape[0]
    return (np.repeat(np.arange(n), pr.p), np.tile(np.arange(pr.p), n),
            Xs.cpu().double().numpy().reshape(-1))


def _lambda_index(q: int, d: int, rank: int | None, col0: int) -> np.ndarray:
    r"""(q, d): the position among the parameters of each entry of a term's :math:`\Lambda`
    (its theta entries numbered from ``col0`` in :func:`~ngmm_formula.design.tril_pairs`'
    order), -1 where the entry is fixed at 0."""
    index = np.full((q, d), -1)
    for m, (i, j) in enumerate(tril_pairs(q, rank)):
        index[i, j] = col0 + m
    return index


def _blocks_of_parameters(pr: Problem, k: int) -> Any:
    r"""The (n_blocks, k) sparse pattern of which blocks each parameter enters: a row of the
    block with a non-zero :math:`X_{ij}` (fixed effect j) or a non-zero entry of :math:`Z`
    in a column that the :math:`\Lambda` entry multiplies (the structure of
    :func:`_block_jacobian`, from the non-zeros only: memory of their number, not n x k)."""
    import scipy.sparse as sp

    block = pr.blocks.block_of_obs.cpu().numpy().astype(np.int64)
    rows, cols = [], []
    for _, r, c, v in _row_entries(pr):
        rows.append(block[r[v != 0]])
        cols.append(c[v != 0])
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sp.coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)),
                         shape=(pr.blocks.n_blocks, k)).tocsc()


def _rows_carry_the_parameters(obj: Objective, rules: tuple[str, ...]) -> bool:
    """Whether every parameter enters the log-likelihood through the rows' linear predictor
    and slot values of per-group blocks only, with ``obj``'s rule among ``rules``: no joint
    block, no REML, no dispersion parameter, no networks, one process. Then the per-block
    scores (:func:`_block_jacobian`) and the blocks each parameter enters
    (:func:`_blocks_of_parameters`) are read off the rows."""
    pr, m = obj.problem, obj.module
    return not (obj.approx.kind not in rules or obj.approx.joint or pr.reml
                or m.log_sigma is not None or len(m.nets) or bool(pr.net_X)
                or obj.shard is not None)


def _score_information_hessian(obj: Objective, *, errors: bool = True
                               ) -> Callable[[np.ndarray], np.ndarray] | None:
    """``x -> -score_information`` where it applies and saves work
    (:data:`SCORE_INFORMATION_MIN_WORK`), else None (finite differences).

    ``errors=False``: the Hessian only steers the Newton polish (a fit that reports no
    standard errors: the GLMM start of a neural fit and the refit of its linear part before
    training), so BHHH's approximation serves wherever it applies, Laplace included and
    whatever the size: one evaluation instead of ``2 dim(x)``. The polish still ends at the
    gradient tolerance, and its steps must improve the objective.
    """
    pr, m = obj.problem, obj.module
    rules = ("agq", "truncated") if errors else ("laplace", "agq", "truncated")
    if not _rows_carry_the_parameters(obj, rules):
        return None
    if errors and _get(m).size * int(pr.y.shape[0]) < SCORE_INFORMATION_MIN_WORK:
        return None

    def hessian(x: np.ndarray) -> np.ndarray:
        _set(m, x)
        return -obj.score_information()
    return hessian


def _value_and_grad(obj: Objective, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Log-likelihood and its gradient at ``x``."""
    if obj.shard is not None:
        obj.shard.lead(x)  # the other processes evaluate their groups at the same x
    return _evaluate(obj, x)


class _LastEvaluation:
    """``value_and_grad`` that remembers its last few results.

    L-BFGS-B returns one of the last points it evaluated, and the polish starts by asking
    for it again; at 10^6 rows each evaluation costs about 0.7 s. :meth:`at` also leaves the
    objective's module (and its conditional modes) at the point, which only the last
    evaluation did. ``evaluations`` counts the evaluations made.
    """

    KEEP = 4

    def __init__(self, value_and_grad: ValueAndGrad) -> None:
        self._value_and_grad = value_and_grad
        self._seen: dict[bytes, tuple[float, np.ndarray]] = {}
        self._last: bytes | None = None
        self.evaluations = 0

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        key = np.asarray(x, dtype=np.float64).tobytes()
        if key not in self._seen:
            self._seen[key] = self._value_and_grad(x)
            self._last = key
            self.evaluations += 1
            while len(self._seen) > self.KEEP:
                del self._seen[next(iter(self._seen))]  # the oldest
        value, grad = self._seen[key]
        return value, grad.copy()

    def snap(self, x: np.ndarray) -> np.ndarray:
        """The point among the remembered ones within 8 ulp of ``max(1, |x|)`` of ``x`` in
        every coordinate, else ``x``: L-BFGS-B returns its last iterate recomputed, which
        can differ from the point it evaluated in the last bits (2e-16 absolute, measured)."""
        for key in self._seen:
            p = np.frombuffer(key, dtype=np.float64)
            if p.shape == x.shape and bool(
                    (np.abs(p - x) <= 8 * np.spacing(np.maximum(1.0, np.abs(p)))).all()):
                return p.copy()
        return x

    def at(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Value and gradient at ``x``, with the module left there."""
        if np.asarray(x, dtype=np.float64).tobytes() != self._last:
            self._seen.pop(np.asarray(x, dtype=np.float64).tobytes(), None)
        return self(x)


def _evaluate(obj: Objective, x: np.ndarray) -> tuple[float, np.ndarray]:
    """This process's value and gradient at ``x``, summed over the processes."""
    _set(obj.module, x)
    ps = _params(obj.module)
    ll, grads = obj.value_and_grad(ps)
    g = np.concatenate([gr.detach().cpu().numpy().ravel() for gr in grads])
    # the whole objective: summed over the processes of a distributed fit
    vg = obj.reduce(np.concatenate([[ll], g]))
    return float(vg[0]), vg[1:]


#: The relative step of the finite-difference Hessians: ``FD_REL_STEP * max(1, |x_j|)``.
FD_REL_STEP = 1e-4


def fd_hessian(value_and_grad: ValueAndGrad, x: np.ndarray, rel_step: float = FD_REL_STEP
               ) -> np.ndarray:
    """Hessian of the log-likelihood by central differences of the exact gradient."""
    k = x.size
    H = np.empty((k, k))
    for j in range(k):
        H[:, j] = _fd_column(value_and_grad, x, j, rel_step)
    return 0.5 * (H + H.T)


def _fd_column(value_and_grad: ValueAndGrad, x: np.ndarray, j: int, rel_step: float
               ) -> np.ndarray:
    """Column ``j`` of the Hessian: the central difference of the gradient in ``x_j``, step
    ``rel_step * max(1, |x_j|)``."""
    h = rel_step * max(1.0, abs(x[j]))
    xp, xm = x.copy(), x.copy()
    xp[j] += h
    xm[j] -= h
    return (value_and_grad(xp)[1] - value_and_grad(xm)[1]) / (2 * h)


#: A parameter that enters the rows of at most this share of the blocks (an item's intercept
#: and loadings: the students who answered it) has its finite-difference column of the
#: Hessian computed from those blocks alone (:func:`_local_fd_hessian`): the other blocks'
#: gradients do not depend on it, so their differences are zero.
LOCAL_FD_MAX_SHARE = 0.5


def _local_fd_hessian(obj: Objective) -> Callable[[ValueAndGrad, np.ndarray], np.ndarray] | None:
    r""":func:`fd_hessian` with each column of a local parameter (:data:`LOCAL_FD_MAX_SHARE`)
    from the blocks it enters only, or None where no parameter is local or the blocks'
    dependence is not read off the rows (:func:`_rows_carry_the_parameters`).

    Parameter :math:`j` enters block :math:`b` when a row of :math:`b` has a non-zero
    :math:`X_{ij}` (fixed effects) or a non-zero entry of :math:`Z` in a column that
    :math:`\Lambda`'s entry :math:`j` multiplies (:func:`_blocks_of_parameters`). The
    column is the central difference of
    the gradient of those blocks' log-likelihood (step as :func:`fd_hessian`), on the problem
    restricted to their rows (:meth:`~ngmm_formula.model.Problem.subset`, parameters sharing
    a set of blocks share one restriction); on an item-response model each item's columns
    cost the share of students who answered it instead of a whole evaluation.
    """
    pr, m = obj.problem, obj.module
    if not _rows_carry_the_parameters(obj, ("laplace", "agq", "truncated")):
        return None
    k, n_blocks = _get(m).size, pr.blocks.n_blocks
    pattern = _blocks_of_parameters(pr, k)
    blocks_of = [pattern.indices[pattern.indptr[j]:pattern.indptr[j + 1]] for j in range(k)]
    local = [b.size <= LOCAL_FD_MAX_SHARE * n_blocks for b in blocks_of]
    if not any(local):
        return None
    block_of_obs = pr.blocks.block_of_obs.cpu().numpy()

    def hessian(value_and_grad: ValueAndGrad, x: np.ndarray) -> np.ndarray:
        H = np.empty((k, k))
        by_set: dict[bytes, list[int]] = {}
        for j in range(k):
            by_set.setdefault(np.sort(blocks_of[j]).tobytes() if local[j] else b"", []).append(j)
        for key, columns in by_set.items():
            vg: ValueAndGrad = value_and_grad
            if key:
                blocks = np.frombuffer(key, dtype=blocks_of[columns[0]].dtype).copy()
                rows = np.flatnonzero(np.isin(block_of_obs, blocks))
                sub = Objective(pr.subset(torch.as_tensor(rows, device=pr.y.device),
                                          torch.as_tensor(blocks, device=pr.y.device)),
                                obj.family, obj.approx, m, mode_tol=obj.mode_tol)
                vg = functools.partial(_evaluate, sub)
            for j in columns:
                H[:, j] = _fd_column(vg, x, j, FD_REL_STEP)
        return 0.5 * (H + H.T)
    return hessian


#: Entries that :func:`laplace_hessian` holds at once per batch of blocks: their dense
#: Hessians over the parameters they touch (blocks x width^2) and a table of positions
#: (blocks x parameters), 4e6 x 8 bytes = 32 MB each.
LAPLACE_HESSIAN_BATCH_ENTRIES = 4_000_000


def laplace_hessian(obj: Objective) -> Callable[[np.ndarray], np.ndarray] | None:
    r"""The exact Hessian of the Laplace approximation, in one pass over the rows, where the
    parameters enter per-group blocks through the rows only (:func:`_rows_carry_the_parameters`
    with the Laplace rule, no split); None elsewhere (finite differences).

    The Hessian in the rows' local coordinates (:mod:`~ngmm_formula.approx.curvature`: a
    row-diagonal part :math:`P_i` and a part :math:`Y_b^\top \Omega_b Y_b` of small rank per
    block) is carried to the parameters by the rows' Jacobian :math:`J_i`
    (:func:`_row_entries`): :math:`\sum_i J_i^\top P_i J_i + \sum_b U_b^\top \Omega_b
    U_b` with :math:`U_b = \sum_{i \in b} Y_i J_i`; each block's term is a dense product over
    the parameters its rows touch (an item-response student: the intercepts and loadings of
    the items answered, and the covariates' coefficients), scattered into the whole. It
    replaces the ``2 dim(x)`` gradient evaluations of finite differences (on an
    item-response model at 10^6 responses, 1,501 parameters: 76 % of the fit) and is exact
    where those carry an error of about the step squared.
    """
    pr = obj.problem
    if not _rows_carry_the_parameters(obj, ("laplace",)) or pr.blocks.split is not None:
        return None

    def hessian(x: np.ndarray) -> np.ndarray:
        _set(obj.module, x)
        k = x.size
        H = np.zeros((k, k))
        for piece in obj.chunks():
            H += _laplace_hessian_of(piece, k)
        return 0.5 * (H + H.T)
    return hessian


def _laplace_hessian_of(piece: Objective, k: int) -> np.ndarray:
    """:func:`laplace_hessian`'s sum over the blocks of one piece."""
    import scipy.sparse as sp

    pr, m = piece.problem, piece.module
    with torch.no_grad():
        eta, C = m.eta_fixed(pr), m.slot_values(pr)
    start = piece.mode.v if piece.mode is not None else None
    piece.mode = find_mode(piece.family, pr.y, pr.w, eta, None, C, pr.blocks, start,
                           tol=piece.mode_tol)
    parts = laplace_hessian_parts(piece.family, pr.y.double(), pr.w.double(), eta.double(),
                                  C.double(), pr.blocks, piece.mode.v.double())
    n, D = C.shape[0], pr.blocks.dim
    block = pr.blocks.block_of_obs.cpu().numpy().astype(np.int64)
    # J: (n (1 + D), k), row i (1 + D) + 0 for eta_i, + 1 + pos(i, s) for slot s
    pos = pr.blocks.slot_pos.cpu().numpy()
    rows, cols, vals = [], [], []
    for slot, r, c, v in _row_entries(pr):
        keep = v != 0
        rows.append(r[keep] * (1 + D) + (0 if slot is None else 1 + pos[r[keep], slot]))
        cols.append(c[keep])
        vals.append(v[keep])
    J = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n * (1 + D), k))
    P = sp.bsr_matrix((parts.row.cpu().numpy(), np.arange(n), np.arange(n + 1)),
                      shape=(n * (1 + D), n * (1 + D)))
    H = (J.T @ (P @ J)).toarray()
    # the blocks' low-rank parts: U = Y J (n_blocks r x k)
    Y = parts.low_rank.cpu().numpy()
    r_ = Y.shape[1]
    yr = (block[:, None, None] * r_ + np.arange(r_)[None, :, None]).repeat(1 + D, 2)
    yc = (np.arange(n)[:, None, None] * (1 + D) + np.arange(1 + D)[None, None, :]).repeat(r_, 1)
    n_blocks = pr.blocks.n_blocks
    U = (sp.csr_matrix((Y.ravel(), (yr.ravel(), yc.ravel())),
                       shape=(n_blocks * r_, n * (1 + D))) @ J).tocsr()
    U.sum_duplicates()
    return H + _low_rank_blocks(U, parts.middle.cpu().numpy(), r_, k)


def _low_rank_blocks(U: Any, middle: np.ndarray, r: int, k: int) -> np.ndarray:
    r""":math:`\sum_b U_b^\top \Omega_b U_b` for ``U`` (n_blocks r x k, canonical CSR; block
    b's rows ``b r .. b r + r - 1``) and ``middle`` (n_blocks, r, r): per block, a dense
    product over the parameters the block touches, scattered into the (k, k) sum; blocks of
    similar width in batches of :data:`LAPLACE_HESSIAN_BATCH_ENTRIES`."""
    import scipy.sparse as sp

    n_blocks = middle.shape[0]
    # each block's parameters (sorted): the pattern of its r rows summed
    rows = np.arange(n_blocks * r)
    pattern = (sp.csr_matrix((np.ones(rows.size), (rows // r, rows)),
                             shape=(n_blocks, n_blocks * r))
               @ sp.csr_matrix((np.ones(U.nnz), U.indices, U.indptr), shape=U.shape))
    pattern.sort_indices()
    width, start, params = np.diff(pattern.indptr), pattern.indptr, pattern.indices
    entries = U.tocoo()
    b, kk, col, val = entries.row // r, entries.row % r, entries.col, entries.data
    order = np.argsort(width, kind="stable")
    rank = np.empty(n_blocks, dtype=np.int64)
    rank[order] = np.arange(n_blocks)
    by_rank = np.argsort(rank[b], kind="stable")
    entry_rank = rank[b][by_rank]
    flat = np.zeros((k + 1) * (k + 1))
    lo = 0
    while lo < n_blocks:
        hi = lo + 1
        while hi < n_blocks and (hi + 1 - lo) * max(int(width[order[hi]]) ** 2, k) \
                <= LAPLACE_HESSIAN_BATCH_ENTRIES:
            hi += 1
        w = max(int(width[order[hi - 1]]), 1)
        blocks = order[lo:hi]
        # the batch's parameters, padded with k; an entry's position among its block's
        cols = np.full((hi - lo, w), k)
        mask = np.arange(w)[None, :] < width[blocks][:, None]
        cols[mask] = params[(start[blocks][:, None] + np.arange(w)[None, :])[mask]]
        position = np.zeros((hi - lo, k + 1), dtype=np.int64)
        position[np.arange(hi - lo)[:, None], cols] = np.arange(w)[None, :]
        e0, e1 = np.searchsorted(entry_rank, [lo, hi])
        e = by_rank[e0:e1]
        Ud = np.zeros((hi - lo, r, w))
        Ud[rank[b[e]] - lo, kk[e], position[rank[b[e]] - lo, col[e]]] = val[e]
        Ut = torch.from_numpy(Ud)
        Hb = torch.bmm(Ut.transpose(1, 2), torch.bmm(torch.from_numpy(middle[blocks]), Ut))
        idx = cols[:, :, None] * (k + 1) + cols[:, None, :]
        flat += np.bincount(idx.ravel(), Hb.numpy().ravel(), minlength=flat.size)
        lo = hi
    return flat.reshape(k + 1, k + 1)[:k, :k]


# --------------------------------------------------------------------------------------------
# optimiser


@dataclass(frozen=True)
class Optimum:
    """What the optimiser found.

    The flat vectors follow :func:`_params`' order (beta unless REML, theta, log_sigma), or,
    for a linear Gaussian model fitted by its profiled objective (``profiled``), are lme4's
    relative theta alone: ``gradient`` and ``hessian`` are then those of the profiled
    log-likelihood, and ``cov_beta`` is the covariance of the standardised fixed effects,
    :math:`\\hat\\sigma^2 (R_X^\\top R_X)^{-1}` (None otherwise: it comes from ``hessian``).
    """

    x: np.ndarray
    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray
    iterations: int
    evaluations: int
    message: str
    converged: bool
    hessian_pd: bool
    profiled: bool = False
    cov_beta: np.ndarray | None = None


def glm_start(problem: Problem, family: Family, module: LinearPredictor,
              max_iter: int = 50, shard: Shard | None = None) -> None:
    """Set beta (and log_sigma) to the fixed-effects-only GLM fit: lme4's start for glmer.

    Iteratively reweighted least squares as R's ``glm.fit``: Fisher-scoring steps, halved
    while the linear predictor leaves the family's support or the log-likelihood drops (so a
    Gamma model with inverse link never sees a negative mean); then sigma by a
    one-dimensional search at the fitted beta. The weighted least-squares problems are solved
    by :func:`~ngmm_formula.model.lstsq_fixed_order` and every ``X beta`` by
    :func:`~ngmm_formula.model.matvec`, so that the start (and hence the fit) does not depend
    on memory alignment.

    With a ``shard`` of a sharded read (each process holds the rows of its own groups) the
    same iterations run on all processes' rows: every log-likelihood is all-reduced, and each
    weighted least-squares problem is solved from the all-reduced normal equations
    ``X'WX beta = X'Wz`` (:func:`_wls`) with rank 0's solution
    broadcast, so every process takes the same steps and the same decisions (no process
    waits in a collective that another skipped). The starting sigma is rank 0's moment
    estimate (it only brackets the search over the all-reduced log-likelihood).
    """
    y, w, off, Xs = problem.y, problem.w, problem.offset, problem.Xs
    y_np, w_np = y.cpu().numpy(), w.cpu().numpy()  # the families' starting values are numpy
    ls0 = None
    with torch.no_grad():
        if module.log_sigma is not None:
            eta_init = torch.as_tensor(family.initial_eta(y_np, w_np), dtype=y.dtype,
                                       device=y.device)
            ls0_np = family.initial_log_sigma(y_np, family.mean(eta_init).cpu().numpy(), w_np)
            if shard is not None:
                ls0_np = float(shard.same(np.array([ls0_np]))[0])
            ls0 = torch.tensor(ls0_np, dtype=y.dtype, device=y.device)
        if problem.p:
            eta = torch.as_tensor(family.initial_eta(y_np, w_np), dtype=y.dtype,
                                  device=y.device)
            beta = _wls(Xs, eta - off, None, shard)
            ll = _sum_all(family.log_prob(y, off + matvec(Xs, beta), ls0, w).sum(), shard)
            if not torch.isfinite(ll):  # least squares left the support: start from eta_init
                beta = torch.zeros_like(beta)
            for _ in range(max_iter):
                eta = off + matvec(Xs, beta)
                ll = _sum_all(family.log_prob(y, eta, ls0, w).sum(), shard)
                W = family.fisher_weight(eta, ls0, w).clamp_min(1e-12)
                z = eta - off + family.dlogp(y, eta, ls0, w) / W
                target = _wls(Xs, z, W, shard)
                if not bool(torch.isfinite(target).all()):
                    break
                step, t = target - beta, 1.0
                for _ in range(30):
                    new = beta + t * step
                    ll_new = _sum_all(family.log_prob(y, off + matvec(Xs, new), ls0, w).sum(),
                                      shard)
                    if torch.isfinite(ll_new) and (ll_new >= ll - 1e-10 * abs(float(ll))
                                                   or not torch.isfinite(ll)):
                        break
                    t *= 0.5
                else:
                    break
                beta = new
                if float((t * step).abs().max()) < 1e-10 * max(1.0, float(beta.abs().max())):
                    break
            module.beta.copy_(beta)
        if module.log_sigma is not None and ls0 is not None:
            eta = off + (matvec(Xs, module.beta) if problem.p else 0.0)

            def nll(ls: float) -> float:
                v = _sum_all(family.log_prob(y, eta, torch.tensor(ls, dtype=y.dtype,
                                                                   device=y.device), w).sum(),
                             shard)
                return float(-v) if torch.isfinite(v) else 1e300

            res = scipy.optimize.minimize_scalar(nll, bracket=(float(ls0) - 1.0, float(ls0)))
            module.log_sigma.fill_(float(res.x) if np.isfinite(res.fun) else float(ls0))


def _sum_all(v: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """A scalar summed over the processes of a sharded read (``v`` itself without one)."""
    if shard is None:
        return v
    total = shard.all_sum(np.array([float(v)]))
    return torch.tensor(float(total[0]), dtype=v.dtype, device=v.device)


def _wls(Xs: FixedTensor, z: torch.Tensor, W: torch.Tensor | None, shard: Shard | None
         ) -> torch.Tensor:
    r"""The weighted least-squares coefficients of ``z`` on ``Xs`` (weights ``W``, None: 1).

    One process: :func:`~ngmm_formula.model.lstsq_fixed_order` of the rows scaled by
    :math:`\sqrt{W}`, as R's ``glm.fit``; a sparse-row matrix (a wide factor design), or a
    dense one that is wide and sparse (:func:`_wide_and_sparse`), by its normal equations
    (:func:`_wls_sparse`). A
    sharded read: the normal equations
    :math:`X^\top W X \beta = X^\top W z` with both sides all-reduced (sums over rows, so
    they add up over the processes), solved by least squares (a singular cross-product
    gives the minimum-norm solution) and broadcast from rank 0.
    """
    if isinstance(Xs, SparseRowsTensor):  # a wide factor design (one process)
        return _wls_sparse(Xs.on_host().csr(), z, W).to(dtype=Xs.dtype, device=Xs.device)
    if shard is None:
        if _wide_and_sparse(Xs):
            import scipy.sparse as sp

            return _wls_sparse(sp.csr_matrix(Xs.detach().cpu().double().numpy()), z,
                               W).to(dtype=Xs.dtype, device=Xs.device)
        if W is None:
            return lstsq_fixed_order(Xs, z)
        sw = W.sqrt().unsqueeze(-1)
        return lstsq_fixed_order(Xs * sw, z * sw.squeeze(-1))
    X = Xs.detach().cpu().double().numpy()
    zn = z.detach().cpu().double().numpy()
    Xw = X if W is None else X * W.detach().cpu().double().numpy()[:, None]
    p = X.shape[1]
    sums = shard.all_sum(np.concatenate([(Xw.T @ X).ravel(), Xw.T @ zn]))
    G, b = sums[:p * p].reshape(p, p), sums[p * p:]
    beta = shard.same(np.linalg.lstsq(G, b, rcond=None)[0])
    return torch.as_tensor(beta, dtype=Xs.dtype, device=Xs.device)


def _wide_and_sparse(Xs: torch.Tensor) -> bool:
    """Whether a dense ``Xs`` takes the sparse weighted least squares (the rule of
    :func:`~ngmm_formula.design.wide_and_sparse`): a wide design that is dense only because
    it came another way (a sharded read's, the trainer's augmented columns). The dense
    fixed-order Householder QR's O(n p^2) elementwise passes took 4.4 s per solve on an
    item-response model's 80,884 x 103 matrix of item indicators and two covariates (seven
    solves: 31 of the Rasch fit's 45 s)."""
    n, p = Xs.shape
    if p < WIDE_SPARSE_MIN_COLUMNS or n == 0:
        return False
    return wide_and_sparse(n, p, int(torch.count_nonzero(Xs)))


def _wls_sparse(X: Any, z: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    r"""Weighted least squares from the normal equations :math:`X^\top W X \beta = X^\top W
    z`, both sides from the non-zeros of :math:`X` (scipy's compressed sparse rows: plain
    loops in a fixed order, so the result does not depend on memory alignment), cost
    O(nnz(X) x non-zeros per row + p^3); solved by
    :func:`~ngmm_formula.model.lstsq_fixed_order` of the p x p system. The normal equations
    square the condition number of :math:`X`: for a start of the iterations that is
    harmless (the IRLS loop converges to the same GLM; indicator columns of one factor are
    orthogonal)."""
    import scipy.sparse as sp

    w = (np.ones(X.shape[0]) if W is None else W.detach().cpu().double().numpy())
    XtW = (X.T @ sp.diags(w)).tocsr()
    G = (XtW @ X).toarray()
    b = XtW @ z.detach().cpu().double().numpy()
    return lstsq_fixed_order(torch.as_tensor(G), torch.as_tensor(b))


_BLAS: list[Any] = []  # threadpoolctl's controller, found once (scanning the libraries: ~1 ms)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a fit with ``threads`` intra-op threads (default 1), restoring the setting after.

    torch's intra-op threads spin while they wait: on a machine whose cores are shared with
    other work, two threads made fits here 4-20x slower than one, while on an idle 2-core
    machine they gain at most 2x on the largest operations. One thread (for torch and for
    the BLAS of numpy/scipy) is the robust default; ``Control(threads=...)`` asks for more.
    """
    from threadpoolctl import ThreadpoolController

    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        # the same for numpy's and scipy's BLAS: multi-threaded OpenBLAS made each L-BFGS-B
        # iteration 20-80x slower on these tiny vectors
        with _BLAS[0].limit(limits=threads or 1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def theta_start(obj: Objective, scales: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03)) -> None:
    """Scale the starting theta by the factor with the best objective.

    lme4 starts every relative standard deviation at 1; on links whose scale is far from
    the data's (the inverse link of a Gamma model with means near 4 has eta near 0.25) that
    start lies where most groups' integrands are degenerate, so a few smaller multiples are
    tried too (one objective evaluation each), in decreasing order until one is finite and
    worse than the best so far: the log-likelihood is taken to be unimodal along the scale,
    so the rest would not be chosen (the reference-fit tests pass unchanged with the early
    stop).
    """
    theta0 = obj.module.theta.detach().clone()
    best, best_ll = 1.0, -math.inf
    for c in scales:
        with torch.no_grad():
            obj.module.theta.copy_(theta0 * c)
        obj.forget_modes()
        ll = obj.value()
        if math.isfinite(ll) and ll > best_ll + 1e-9 * abs(ll):
            best, best_ll = c, ll
        elif math.isfinite(ll) and math.isfinite(best_ll):
            break
    with torch.no_grad():
        obj.module.theta.copy_(theta0 * best)
    obj.forget_modes()


def loadings_start(obj: Objective) -> bool:
    r"""Start the loadings of reduced-rank terms at a moment estimate; True if it set any.

    At the GLM start (random effects 0) the standardised score residual of row :math:`i`,
    :math:`r_i = \partial_\eta \log p(y_i) / \sqrt{W_i}` (W: the Fisher weight; the
    Pearson residual under a canonical link), is to first order :math:`\sqrt{W_i}\, z_i^\top
    b_{g(i)}` plus unit-variance noise, with :math:`\operatorname{Cov}(b) = \Sigma =
    \Lambda\Lambda^\top`. Summed per group and column, :math:`P_{gj} = \sum_{i \in g}
    Z_{ij} r_i` and :math:`Q_{gj} = \sum_{i \in g} Z_{ij} \sqrt{W_i}`, so

    .. math::

        \hat\Sigma_{jk} = \frac{\sum_g P_{gj} P_{gk} - [j = k] \sum_i Z_{ij}^2}
                               {\sum_g Q_{gj} Q_{gk}}

    (the noise enters the diagonal only: rows are independent given b). The loadings start
    at the d leading eigenvectors of :math:`\hat\Sigma` times the square roots of their
    eigenvalues, rotated to glmmTMB's lower-triangular form with a positive diagonal. The
    default start (:math:`\Lambda` = the first d columns of the identity) leaves every
    column past the d-th loading 0, close to the saddle at :math:`\Lambda = 0`: from it
    L-BFGS-B took 447 evaluations for a 2-dimensional model of 100 items at 30,000
    responses, and from this start, with BHHH's Newton steps first (``optimise(warm=True)``),
    116, to the same log-likelihood (``benchmarks/README.md``).

    Applies to per-group layouts (every term of the one grouping factor, so that the block
    of a row is its group) in families without a dispersion parameter (theta is then the
    loadings themselves, not relative to sigma), in one process; the terms' cost is
    O(rows x m + groups x (columns per group)^2 + q^3). Leaves a term whose estimate has
    fewer than d positive eigenvalues at the default start.
    """
    pr, fam, module = obj.problem, obj.family, obj.module
    if (all(d is None for d in pr.ranks) or obj.approx.joint or fam.has_dispersion
            or obj.shard is not None):
        return False
    with torch.no_grad():
        eta = module.eta_fixed(pr)
        W = fam.fisher_weight(eta, None, pr.w).clamp_min(1e-12)
        r = (fam.dlogp(pr.y, eta, None, pr.w) / W.sqrt()).cpu().double().numpy()
        sw = W.sqrt().cpu().double().numpy()
    group = pr.blocks.block_of_obs.cpu().numpy().astype(np.int64)
    theta = module.theta.detach().cpu().double().numpy().copy()
    start, changed = 0, False
    for Z, Zc, q, d in zip(pr.Z, pr.Zcols or (None,) * len(pr.Z), pr.q, pr.ranks):
        cells = tril_pairs(q, d)
        if d is not None:
            Zv = Z.cpu().double().numpy()
            cols = (np.broadcast_to(np.arange(q), Zv.shape) if Zc is None
                    else Zc.cpu().numpy().astype(np.int64))
            L = _moment_loadings(Zv, cols, group, pr.blocks.n_blocks, r, sw, q, d)
            if L is not None:
                theta[start:start + len(cells)] = [L[i, j] for i, j in cells]
                changed = True
        start += len(cells)
    if changed:
        with torch.no_grad():
            module.theta.copy_(torch.as_tensor(theta, dtype=module.theta.dtype))
        obj.forget_modes()
    return changed


def _moment_loadings(Zv: np.ndarray, cols: np.ndarray, group: np.ndarray, n_groups: int,
                     r: np.ndarray, sw: np.ndarray, q: int, d: int) -> np.ndarray | None:
    """The (q, d) loadings of :func:`loadings_start` for one term: its entries ``Zv`` (n, m)
    in columns ``cols`` (n, m), rows in ``group``; None when fewer than d eigenvalues of the
    moment estimate are positive."""
    import scipy.sparse as sp

    rows = np.broadcast_to(group[:, None], Zv.shape).reshape(-1)
    c = cols.reshape(-1)
    P = sp.csr_matrix(((Zv * r[:, None]).reshape(-1), (rows, c)), shape=(n_groups, q))
    Q = sp.csr_matrix(((Zv * sw[:, None]).reshape(-1), (rows, c)), shape=(n_groups, q))
    num = np.asarray((P.T @ P).toarray())
    num[np.diag_indices(q)] -= np.bincount(c, (Zv ** 2).reshape(-1), minlength=q)
    den = np.asarray((Q.T @ Q).toarray())
    S = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    lam, V = np.linalg.eigh((S + S.T) / 2)
    lam, V = lam[::-1][:d], V[:, ::-1][:, :d]
    if not lam[-1] > 0:
        return None
    L = V * np.sqrt(lam)[None, :]
    rot, _ = np.linalg.qr(L[:d].T)  # L[:d] = T' rot' (T upper): L rot's top is T'
    L = L @ rot
    return np.asarray(L * np.where(np.diag(L[:d]) < 0, -1.0, 1.0)[None, :])


def profiled(obj: Objective) -> bool:
    """Whether ``obj`` is fitted through lmer's profiled objective: an exact Gaussian integral
    (identity link) with a linear predictor free of networks, in one process (a distributed
    fit's shard holds part of the groups); any layout
    (:func:`~ngmm_formula.approx.blocked.profiled_objective`)."""
    return (obj.approx.kind == "exact" and not obj.module.nets and not obj.problem.net_X
            and obj.shard is None)


def optimise(obj: Objective, *, max_iter: int = 2000, gtol: float = 1e-6,
             newton_steps: int = 8, final_hessian: bool = True, warm: bool = False) -> Optimum:
    """Maximise the objective over beta, theta and log_sigma (float64).

    Linear Gaussian models (:func:`profiled`) are fitted as ``lmer`` fits them: over lme4's
    relative theta alone, with beta and sigma profiled out; the module is then set to the
    profiled solution. Every other model: over all of :func:`_params` jointly.

    In a distributed fit (``obj.shard``) rank 0 runs the optimiser and the other processes
    evaluate their groups wherever it asks, then receive its :class:`Optimum`: L-BFGS-B's last
    bits vary with memory alignment, so identical optimisers in several processes would drift
    apart by a few ulps and could stop at different iterations.

    ``final_hessian=False`` skips the fresh finite-difference Hessian after the Newton
    polish (the returned one is then the polish's, at the L-BFGS point): for fits whose
    standard errors are not reported (the GLMM start of a neural fit), where each Hessian
    costs ``2 k`` gradient evaluations over all the data.

    ``warm``: the module is at a nearby fit's optimum; Newton steps with BHHH's Hessian come
    first where it applies (:func:`_maximise`), L-BFGS-B only if they stop short.

    Where BHHH's information applies (per-group rules without a dispersion parameter, in one
    process; any size), fits of at least :data:`PRECONDITION_MIN_PARAMS` parameters are
    steered by it (:func:`_maximise`'s ``steer``): their Newton steps use it, a warm start
    that needs L-BFGS-B runs it preconditioned by it, and a reported finite-difference
    Hessian is computed once, at the final point. Where the exact Hessian applies
    (:func:`laplace_hessian`) it replaces the finite differences everywhere, and the Newton
    steps after L-BFGS-B and those of a warm start use it (a warm start's in Greenstadt's
    modification where it is not negative definite, :func:`_warm_matrix`).
    """
    if profiled(obj):
        return _optimise_profiled(obj, max_iter=max_iter, gtol=gtol, newton_steps=newton_steps)
    x0 = _get(obj.module)
    if obj.shard is not None and obj.shard.rank > 0:
        opt: Optimum = obj.shard.follow(x0.size, lambda x: _evaluate(obj, x))
        _set(obj.module, opt.x)
        return opt

    value_and_grad = _LastEvaluation(lambda x: _value_and_grad(obj, x))
    exact = laplace_hessian(obj)
    fd = ((lambda _, x: exact(x)) if exact is not None
          else _local_fd_hessian(obj) or fd_hessian)
    opt = _maximise(value_and_grad, x0, max_iter=max_iter, gtol=gtol, newton_steps=newton_steps,
                    final_hessian=final_hessian, warm=warm,
                    hessian=_score_information_hessian(obj, errors=final_hessian),
                    steer=_score_information_hessian(obj, errors=False),
                    fd=fd, exact=exact is not None,
                    handoff=_diagonals(obj.module) if warm else None)
    # the module (and, in a distributed fit, every process) at the optimum: already there
    # when the last evaluation was at it
    value, grad = value_and_grad.at(opt.x)
    if not math.isfinite(value):
        raise NGMMError(
            "the log-likelihood is not finite at the optimiser's last point (a group's "
            "conditional mode could not be computed: the linear predictor overflows the "
            "family's mean); check the scale of the covariates and the response, or start "
            "from other values")
    opt = dataclasses.replace(opt, loglik=value, gradient=grad,
                              evaluations=value_and_grad.evaluations)
    if obj.shard is not None:
        obj.shard.finish(x0.size, opt)
    return opt


def _optimise_profiled(obj: Objective, *, max_iter: int, gtol: float, newton_steps: int
                       ) -> Optimum:
    r"""lmer's fit: maximise the profiled log-likelihood :math:`\tilde\ell(\theta)` over
    the relative theta (started from the module's ``theta / sigma``, or for the blocked
    factorisation with scalar terms from its moment start), then set beta, theta
    (absolute: :math:`\hat\sigma\theta`) and log_sigma to the profiled solution."""
    prof = profiled_objective(obj.problem)
    m = obj.module
    sigma0 = float(m.log_sigma.detach().exp()) if m.log_sigma is not None else 1.0
    theta0 = m.theta.detach().cpu().numpy() / sigma0
    if isinstance(prof, ProfiledLMM):
        opt = _maximise(prof.value_and_grad, theta0, max_iter=max_iter, gtol=gtol,
                        newton_steps=newton_steps,
                        stop_at_gtol=theta_lower(obj.problem.q) == 0)
    else:  # the blocked sparse factorisation has no gradient: lme4's way, derivative-free,
        # from the moments of the level means where every term is scalar
        start = prof.moment_start()
        opt = maximise_derivative_free(prof.value, theta0 if start is None else start,
                                       theta_lower(obj.problem.q), max_eval=max(max_iter, 50))
    sol = prof.solve(opt.x)
    with torch.no_grad():
        m.theta.copy_(torch.as_tensor(opt.x * sol.sigma))
        if m.log_sigma is not None:
            m.log_sigma.fill_(math.log(sol.sigma))
        if not obj.problem.reml and obj.problem.p:
            m.beta.copy_(torch.as_tensor(sol.beta))
    obj.forget_modes()
    # the results' modes and conditional variances from the same factorisation (the full
    # objective would search the modes and factorise again: 1.6 ms of sleepstudy's 17)
    v, factor = prof.conditional(opt.x, sol.sigma)
    mode = ConditionalMode(v=torch.as_tensor(v), factor=factor, iterations=0, converged=True)
    obj.solved = (_state(m), torch.tensor([sol.loglik], dtype=torch.float64), mode)
    return dataclasses.replace(opt, profiled=True, cov_beta=sol.cov_beta)


#: A diagonal of a relative covariance factor below this (in absolute value) keeps
#: L-BFGS-B running to its own stagnation (:func:`_maximise`'s ``stop_at_gtol``): ten times
#: lme4's default tolerance of isSingular. (Why stop at the gradient tolerance at all: on
#: nlme's Machines, two parameters, L-BFGS-B's line searches spent 47 of 59 evaluations at
#: points equal to 9 digits; the optimum moved by 1e-9 relative.)
NEAR_BOUNDARY = 1e-3


#: A Newton polish that moves no parameter by more than this (relative to max(1, |x|)) keeps
#: the Hessian of the L-BFGS point: the Hessian then changes by about as much relatively,
#: 1e-6 at most (measured on grouseticks and VerbAgg: moves of 1e-8 to 1e-7 changed it by
#: 3e-8 to 2e-7 and the standard errors by 2e-8), far below the digits reported, where a
#: fresh one costs 2 k gradient evaluations.
REUSE_HESSIAN_MOVE = 1e-6


def _within(x: np.ndarray, x0: np.ndarray, rel: float) -> bool:
    """Whether no coordinate of ``x`` is farther from ``x0`` than ``rel * max(1, |x0|)``."""
    return bool((np.abs(x - x0) <= rel * np.maximum(1.0, np.abs(x0))).all())


def _newton_polish(vg: ValueAndGrad, x: np.ndarray, value: float, grad: np.ndarray,
                   H: np.ndarray, gtol: float, steps: int
                   ) -> tuple[np.ndarray, float, np.ndarray, bool]:
    """At most ``steps`` chord-Newton steps with the fixed Hessian ``H`` until the gradient
    is below ``gtol``; each must not lower the objective (halving up to 20 times), else
    the polish stops. A step that leaves the value where it was (within 1e-12 relative, the
    objective's rounding) must shrink the gradient: with an approximate ``H`` (BHHH's) the
    chord can wander on that flat top with a growing gradient (from 1.0e-5 to 1.1e-4 in
    six steps of a 301-parameter fit), and the polish stops instead. Returns the point, its
    value and gradient, and whether it moved."""
    moved = False
    for _ in range(steps):
        gmax = np.abs(grad).max()
        if gmax < gtol:
            break
        try:
            step = np.linalg.solve(-H, grad)
        except np.linalg.LinAlgError:
            break
        t = 1.0
        improved = False
        for _ in range(20):
            v_new, g_new = vg(x + t * step)
            flat = abs(v_new - value) <= 1e-12 * abs(value)
            if flat and np.abs(g_new).max() >= gmax:
                break
            if v_new >= value - 1e-12 * abs(value):
                x, value, grad = x + t * step, v_new, g_new
                improved = moved = True
                break
            t *= 0.5
        if not improved:
            break
    return x, value, grad, moved


#: Newton steps of a warm start (:func:`_maximise`'s ``warm``) before it falls back to
#: L-BFGS-B: with BHHH's Hessian the steps converge linearly, about 100x a step on the
#: linear starts of a neural fit (``benchmarks/README.md``).
WARM_NEWTON_STEPS = 12

#: With the exact Hessian (:func:`laplace_hessian`) a warm start's 12 Newton steps come in
#: this many rounds, each with a fresh matrix (:func:`_warm_matrix`): Newton's convergence
#: instead of the chord's.
WARM_EXACT_ROUNDS = 3


#: Fits with at least this many parameters are steered by BHHH's information where it
#: applies (:func:`_maximise`'s ``steer``): their finite-difference Hessian costs 2 k
#: gradient evaluations (602 of an item-response model's 1,524 at 30,000 responses, twice
#: when the polish moved), and a warm start's L-BFGS-B without a preconditioner needs about
#: as many iterations as there are parameters (344 evaluations for 299), while the scores'
#: Jacobian costs about one evaluation. Below it, nothing changes (the reference models of
#: the tests with a few parameters). A cold start's L-BFGS-B is not preconditioned: far
#: from the optimum (loadings of a second factor near 0 at the GLM start) BHHH's matrix is
#: nearly singular and a poor model of the Hessian; on a d = 2 item-response model (30,000
#: responses) the preconditioned L-BFGS-B from the GLM start ended at a lower local maximum
#: (logLik -17197.89 against the plain one's -17179.70).
PRECONDITION_MIN_PARAMS = 50

#: The ridge added to the unit-diagonal (Jacobi-scaled) BHHH matrix before its Cholesky
#: factor is taken: it keeps the change of variables finite for parameters the scores hardly
#: see (a loading of a factor that is not there) without changing the scaling elsewhere.
PRECONDITION_RIDGE = 1e-6


class _Preconditioner:
    r"""The change of variables :math:`x = x_0 + D^{-1} R^{-1} u` in which L-BFGS-B runs,
    with :math:`A \approx -\nabla^2 \ell` (BHHH's information at :math:`x_0`), :math:`D`
    the square roots of its diagonal and :math:`R^\top R = D^{-1} A D^{-1} + \epsilon I`:
    in :math:`u` the Hessian is close to the identity, where L-BFGS-B converges in a few
    iterations; the gradient is :math:`\partial \ell / \partial u = R^{-\top} D^{-1}
    \nabla_x \ell`. ``None`` from :meth:`of` when the matrix is not usable (not finite,
    or not positive definite after the ridge)."""

    def __init__(self, x0: np.ndarray, d: np.ndarray, R: np.ndarray) -> None:
        self.x0, self.d, self.R = x0, d, R

    @classmethod
    def of(cls, x0: np.ndarray, A: np.ndarray) -> _Preconditioner | None:
        A = 0.5 * (A + A.T)
        if not np.isfinite(A).all():
            return None
        diag = np.diag(A)
        d = np.sqrt(np.where(diag > 0, diag, 1.0))
        M = A / d[:, None] / d[None, :] + PRECONDITION_RIDGE * np.eye(A.shape[0])
        try:
            R = np.linalg.cholesky(M).T  # upper: M = R^T R
        except np.linalg.LinAlgError:
            return None
        return cls(np.asarray(x0, dtype=float).copy(), d, R)

    def x(self, u: np.ndarray) -> np.ndarray:
        import scipy.linalg
        return self.x0 + scipy.linalg.solve_triangular(self.R, u, lower=False) / self.d

    def gradient(self, g: np.ndarray) -> np.ndarray:
        import scipy.linalg
        return scipy.linalg.solve_triangular(self.R, g / self.d, trans="T", lower=False)


def _lbfgs(f: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *,
           max_iter: int, callback: Callable[..., None] | None,
           pre: _Preconditioner | None) -> tuple[np.ndarray, int, str, int]:
    """scipy's L-BFGS-B on ``f`` (to be minimised) from ``x0``, in the preconditioned
    variables of ``pre`` if given. Returns the point (in ``x``), iterations, message and
    scipy's status."""
    options = {"maxiter": max_iter, "maxcor": 20, "ftol": 1e-15, "gtol": 1e-9, "maxls": 50}
    if pre is None:
        res = scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", callback=callback,
                                      options=options)
        return np.asarray(res.x, dtype=float), int(res.nit), str(res.message), res.status

    def f_u(u: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = f(pre.x(u))
        return v, pre.gradient(g)
    res = scipy.optimize.minimize(f_u, np.zeros_like(x0), jac=True, method="L-BFGS-B",
                                  options=options)
    return pre.x(res.x), int(res.nit), str(res.message), res.status


#: Where a warm start's polish takes the finite-difference or exact Hessian
#: (:func:`_maximise`'s ``handoff``), L-BFGS-B ends at the first iterate whose gradient is
#: below this, and Newton's steps finish. At a large sum the log-likelihood's rounding hides
#: the last decreases from L-BFGS-B's line search: on the final refit of a neural fit at
#: 10^6 rows (11 nodes; 3 parameters) it reached max|gradient| 8e-6 at its 9th evaluation
#: and spent 7 more on points equal to 12 digits, where the polish's one Newton step went
#: from 8e-6 to 4e-12 (``benchmarks/README.md``). Stopping earlier moves the polish farther,
#: and past :data:`REUSE_HESSIAN_MOVE` costs a second Hessian: 1e-3 is far below what one
#: Newton step with the Hessian corrects.
HANDOFF_GTOL = 1e-3


class _GradientStop:
    r"""L-BFGS-B's objective (minimised: minus the log-likelihood) and its callback that ends
    it at the first iterate whose max|gradient| is below ``gtol``, unless a diagonal of
    lme4's :math:`\Lambda_k` (``mask``) is below :data:`NEAR_BOUNDARY` in absolute value
    (:func:`_maximise`'s ``stop_at_gtol`` and ``handoff``)."""

    def __init__(self, vg: ValueAndGrad, mask: np.ndarray, gtol: float) -> None:
        self.vg, self.mask, self.gtol = vg, mask, gtol
        self.seen: dict[bytes, float] = {}  # the gradients of the last evaluations, by point

    @staticmethod
    def _minus(x: np.ndarray, v: float, g: np.ndarray) -> tuple[float, np.ndarray]:
        """Minus the value and gradient (where the value is not finite: a large value and
        no gradient)."""
        return (-v, -g) if math.isfinite(v) else (1e300, np.zeros_like(x))

    @staticmethod
    def minimised(vg: ValueAndGrad) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        """Minus ``vg``, for L-BFGS-B without a stop."""
        return lambda x: _GradientStop._minus(x, *vg(x))

    def f(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Minus ``vg``, remembering the gradient at ``x`` (where the value is finite)."""
        v, g = self.vg(x)
        if math.isfinite(v):
            if len(self.seen) > 64:
                self.seen.clear()
            self.seen[np.asarray(x, dtype=float).tobytes()] = float(np.abs(g).max(initial=0.0))
        return self._minus(x, v, g)

    def stop(self, intermediate_result: scipy.optimize.OptimizeResult) -> None:
        x = np.asarray(intermediate_result.x, dtype=float)
        if (self.seen.get(x.tobytes(), np.inf) < self.gtol
                and bool((np.abs(x[self.mask]) > NEAR_BOUNDARY).all())):
            raise StopIteration


def _maximise(value_and_grad: ValueAndGrad, x0: np.ndarray, *, max_iter: int, gtol: float,
              newton_steps: int, final_hessian: bool = True,
              stop_at_gtol: np.ndarray | None = None,
              hessian: Callable[[np.ndarray], np.ndarray] | None = None,
              warm: bool = False,
              steer: Callable[[np.ndarray], np.ndarray] | None = None,
              fd: Callable[[ValueAndGrad, np.ndarray], np.ndarray] = fd_hessian,
              exact: bool = False, handoff: np.ndarray | None = None) -> Optimum:
    r"""L-BFGS-B to a small gradient, Newton polishing, the Hessian and the convergence check.

    Newton polishing is the chord method: the finite-difference Hessian at the L-BFGS point
    is reused and every step must improve; a fresh Hessian at the final point is the one
    reported, unless the polish moved no parameter by more than :data:`REUSE_HESSIAN_MOVE`.
    Convergence as lme4's ``check.conv.grad``: the gradient scaled by the Cholesky factor of
    the Hessian, max(min(|scaled|, |raw|)) < 0.002.

    ``stop_at_gtol`` (a mask of the diagonals of lme4's :math:`\Lambda_k`) ends L-BFGS-B at
    the first iterate whose gradient is below ``gtol`` instead of at its own round-off
    stagnation, unless one of those diagonals is below :data:`NEAR_BOUNDARY` in absolute
    value (a fit heading for a singular boundary, where the gradient can be small far from
    it).

    ``hessian``: the (approximate) Hessian in one evaluation (BHHH's,
    :func:`_score_information_hessian`) instead of ``fd``. ``warm`` (with ``hessian`` or
    ``steer``): ``x0`` is near the optimum; up to :data:`WARM_NEWTON_STEPS` Newton steps
    come first, L-BFGS-B only if they stop short of ``gtol``. ``steer`` (BHHH's;
    :data:`PRECONDITION_MIN_PARAMS`): with ``hessian`` None, the Newton steps use it and
    ``fd`` is computed once, at the final point; a warm start whose Newton steps stop short
    runs L-BFGS-B preconditioned by their matrix (:class:`_Preconditioner`), a cold start
    plain. ``exact``: ``fd`` is the exact Hessian in one pass over the rows
    (:func:`laplace_hessian`); the polish after L-BFGS-B and a warm start's Newton steps
    (:func:`_warm_newton`) take it instead of ``steer``'s. ``handoff`` (the mask of
    ``stop_at_gtol``, for a ``warm`` start whose polish takes ``fd`` or the exact Hessian):
    L-BFGS-B ends at the first iterate whose gradient is below :data:`HANDOFF_GTOL` and the
    polish's Newton steps take it to ``gtol``.
    """
    if not isinstance(value_and_grad, _LastEvaluation):
        value_and_grad = _LastEvaluation(value_and_grad)
    vg = value_and_grad
    n_hessian = 0  # evaluations of ``hessian`` (not through value_and_grad)

    def curvature(x: np.ndarray, by: Callable[[np.ndarray], np.ndarray] | None = hessian
                  ) -> np.ndarray:
        nonlocal n_hessian
        n_hessian += by is not None or exact  # one pass each; finite differences count their own
        return by(x) if by is not None else fd(vg, x)
    # the matrix of the Newton steps: BHHH's where it steers
    steered = (hessian is None and steer is not None and stop_at_gtol is None
               and np.asarray(x0).size >= PRECONDITION_MIN_PARAMS)
    step_matrix = steer if steered else hessian
    # where L-BFGS-B ends at a gradient tolerance instead of its own stagnation
    early = (_GradientStop(vg, stop_at_gtol, gtol) if stop_at_gtol is not None
             else _GradientStop(vg, handoff, max(gtol, HANDOFF_GTOL))
             if handoff is not None and warm and (exact or step_matrix is None) else None)
    done = False  # a warm start's Newton steps reached gtol: no L-BFGS-B
    iterations, message = 0, "CONVERGENCE: NEWTON STEPS FROM A WARM START"
    pre, from_fd = None, False  # from_fd: H is fd's (the Hessian reported), not steer's
    if warm and (hessian is not None or steered):
        x, value, grad, H, x_hessian, moved, from_fd = _warm_newton(
            vg, np.asarray(x0, dtype=float), curvature, step_matrix, exact, gtol)
        done = bool(np.abs(grad).max(initial=0.0) < gtol)
        if not done and x.size >= PRECONDITION_MIN_PARAMS:
            pre = _Preconditioner.of(x, -H)  # near the optimum: BHHH's is close to -H
        x0 = x
    if not done:
        x_lbfgs, iterations, message, status = _lbfgs(
            early.f if early is not None else _GradientStop.minimised(vg), x0,
            max_iter=max_iter, callback=None if early is None else early.stop, pre=pre)
        if status == 99 and early is not None:
            message = (f"CONVERGENCE: MAX|GRADIENT| < {early.gtol:g}"
                       + (", THEN NEWTON STEPS" if early.gtol > gtol else ""))
        x = x_hessian = vg.snap(x_lbfgs)
        value, grad = vg(x)
        from_fd = exact or step_matrix is None
        H = curvature(x, None if from_fd else step_matrix)
        x, value, grad, moved = _newton_polish(vg, x, value, grad, H, gtol, newton_steps)
    if steered and final_hessian and not from_fd:
        H = curvature(x)  # the reported Hessian, once, at the final point
    elif moved and final_hessian and not _within(x, x_hessian, REUSE_HESSIAN_MOVE):
        H = curvature(x)
    return _checked(x, value, grad, H, iterations=iterations,
                    evaluations=vg.evaluations + n_hessian, message=message)


def _warm_newton(vg: ValueAndGrad, x: np.ndarray, curvature: Callable[..., np.ndarray],
                 step_matrix: Callable[[np.ndarray], np.ndarray] | None, exact: bool,
                 gtol: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray,
                                       bool, bool]:
    """A warm start's Newton steps (:func:`_maximise`): :data:`WARM_NEWTON_STEPS` with
    ``step_matrix``'s matrix, or with the exact Hessian in :data:`WARM_EXACT_ROUNDS` rounds of
    a fresh matrix each (:func:`_warm_matrix`). Returns the point, its value and gradient,
    the last matrix, the point it was taken at, whether the last round moved and whether the
    matrix is the exact Hessian."""
    value, grad = vg(x)
    rounds = WARM_EXACT_ROUNDS if exact else 1
    for _ in range(rounds):
        x_hessian = x
        H, from_fd = _warm_matrix(curvature, x, step_matrix, exact)
        x, value, grad, moved = _newton_polish(vg, x, value, grad, H, gtol,
                                               WARM_NEWTON_STEPS // rounds)
        if np.abs(grad).max(initial=0.0) < gtol or not moved:
            break
    return x, value, grad, H, x_hessian, moved, from_fd


def _warm_matrix(curvature: Callable[..., np.ndarray], x: np.ndarray,
                 step_matrix: Callable[[np.ndarray], np.ndarray] | None, exact: bool
                 ) -> tuple[np.ndarray, bool]:
    """The matrix of a warm start's Newton steps (:func:`_maximise`) and whether it is the
    exact Hessian at ``x``. With ``exact``: the Hessian where it is negative definite, else
    Greenstadt's modification of it (each eigenvalue replaced by minus its absolute value,
    at least :data:`MODIFIED_NEWTON_FLOOR` of the largest: the step keeps Newton's scaling
    and turns away from the saddle directions). Measured on the item-response neural fit at
    10^6 responses, where the Hessian had one positive eigenvalue at the linear start's
    first points: the linear start 72 -> 24 evaluations against BHHH's steps there.
    Without: ``step_matrix``'s (BHHH's)."""
    if not exact:
        return curvature(x, step_matrix), False
    H = curvature(x, None)
    try:
        np.linalg.cholesky(-H)
        return H, True
    except np.linalg.LinAlgError:
        lam, V = np.linalg.eigh(-H)
        lam = np.maximum(np.abs(lam), MODIFIED_NEWTON_FLOOR * np.abs(lam).max())
        return -(V * lam) @ V.T, False


#: The smallest eigenvalue of Greenstadt's modified Hessian (:func:`_warm_matrix`), relative
#: to the largest.
MODIFIED_NEWTON_FLOOR = 1e-6


def _checked(x: np.ndarray, value: float, grad: np.ndarray, H: np.ndarray, *,
             iterations: int, evaluations: int, message: str) -> Optimum:
    """The :class:`Optimum` at ``x`` with lme4's ``check.conv.grad``: the gradient scaled by
    the Cholesky factor of ``-H``, max(min(|scaled|, |raw|)) < 0.002."""
    eig = np.linalg.eigvalsh(-H) if H.size else np.array([1.0])
    hessian_pd = bool(eig.min() > 0)
    scaled = np.abs(grad)
    if hessian_pd:
        scaled = np.abs(np.linalg.solve(np.linalg.cholesky(-H), grad))
    max_grad = float(np.max(np.minimum(scaled, np.abs(grad)))) if grad.size else 0.0
    return Optimum(
        x=x, loglik=value, gradient=grad, hessian=H, iterations=iterations,
        evaluations=evaluations, converged=max_grad < 0.002, message=message,
        hessian_pd=hessian_pd,
    )


def _diagonals(module: LinearPredictor) -> np.ndarray:
    r"""Which of the optimised parameters (:func:`_params`' order) are diagonals of lme4's
    :math:`\Lambda_k` (of a reduced-rank term's loadings too)."""
    return np.concatenate([np.zeros(p.numel(), dtype=bool) if p is not module.theta
                           else theta_diagonals(module.q, module.rank)
                           for p in _params(module)])


def theta_lower(q: tuple[int, ...]) -> np.ndarray:
    """lme4's lower bounds of theta: 0 on the diagonals of the :math:`\\Lambda_k`, none below."""
    return np.where(theta_diagonals(q), 0.0, -np.inf)


#: nlopt's BOBYQA as lme4's ``nloptwrap`` sets it (absolute tolerances 1e-8 on theta and
#: on the deviance, i.e. 5e-9 on the log-likelihood), with a relative tolerance on theta of
#: 1e-6 instead of nloptr's default 1e-4 (2-5 more evaluations; it kept InstEval's
#: log-likelihood within 1e-8 of the best found where 1e-4 stopped 7.5e-6 short).
BOBYQA_XTOL_ABS = 1e-8
BOBYQA_FTOL_ABS = 5e-9
BOBYQA_XTOL_REL = 1e-6
#: BOBYQA's initial trust radius on the relative theta: a fifth of a residual SD. From the
#: moment start (:meth:`~ngmm_formula.approx.blocked.BlockedLMM.moment_start`) it took 40
#: evaluations on InstEval (3 terms) and 53 on star, where a radius of 1 from lme4's start
#: of 1 took 63 and 52 with COBYQA, 65 to 105 with BOBYQA (benchmarks/README.md).
BOBYQA_INITIAL_STEP = 0.2
_NLOPT_MESSAGES = {1: "BOBYQA: success", 2: "BOBYQA: stopval reached",
                   3: "BOBYQA: ftol_abs reached", 4: "BOBYQA: xtol reached",
                   5: "BOBYQA: maximum number of evaluations reached",
                   6: "BOBYQA: maximum time reached"}


def maximise_derivative_free(value: Callable[[np.ndarray], float], x0: np.ndarray,
                             lower: np.ndarray, *, max_eval: int = 2000,
                             rel_step: float = 1e-4,
                             initial_step: float = BOBYQA_INITIAL_STEP) -> Optimum:
    """Maximise ``value`` without derivatives, as lmer does: BOBYQA (Powell's trust-region
    method on quadratic interpolation models, from the nlopt library as lme4's default
    ``nloptwrap``) under the bounds ``lower``, with the tolerances :data:`BOBYQA_XTOL_ABS`,
    :data:`BOBYQA_FTOL_ABS` and :data:`BOBYQA_XTOL_REL`. nlopt's C code adds no per-step
    Python (scipy's COBYQA, used before, cost about 2.5 ms a step: 0.1 s of star's 0.45).

    Then the gradient and Hessian by finite differences of values, for the convergence check
    of :func:`_maximise` (as lme4's ``deriv12`` after BOBYQA): central differences for the
    gradient and the diagonal, one-sided ones for the cross terms, ``2k + k(k-1)/2``
    evaluations for ``k`` parameters (the value at the optimum is BOBYQA's own).
    """
    import nlopt  # lazily: only crossed and nested Gaussian LMMs use it

    n_eval = 0
    x0 = np.maximum(np.asarray(x0, dtype=float), lower)
    # the best point so far (nlopt raises on round-off and loses its own) and the worst value
    x, f_best, worst = x0, math.inf, -math.inf

    def f(point: np.ndarray, grad: np.ndarray) -> float:
        # a non-finite value (a system not positive definite by round-off) counts as a
        # little worse than the worst finite one: a huge stand-in wrecks BOBYQA's quadratic
        # model (it then stopped far from a test's optimum, with "xtol reached")
        nonlocal n_eval, x, f_best, worst
        n_eval += 1
        v = value(point)
        if not math.isfinite(v):
            return worst + 1.0 + 1e-3 * abs(worst) if math.isfinite(worst) else 1e300
        worst = max(worst, -v)
        if -v < f_best:
            x, f_best = np.array(point, dtype=float), -v
        return -v

    bobyqa = nlopt.opt(nlopt.LN_BOBYQA, x0.size)
    bobyqa.set_lower_bounds(np.asarray(lower, dtype=float))
    bobyqa.set_min_objective(f)
    bobyqa.set_xtol_abs(BOBYQA_XTOL_ABS)
    bobyqa.set_ftol_abs(BOBYQA_FTOL_ABS)
    bobyqa.set_xtol_rel(BOBYQA_XTOL_REL)
    bobyqa.set_maxeval(max_eval)
    bobyqa.set_initial_step(initial_step)
    try:
        bobyqa.optimize(x0)
        message = _NLOPT_MESSAGES.get(bobyqa.last_optimize_result(), "stopped")
    except (nlopt.RoundoffLimited, RuntimeError) as err:  # its best point is still ours
        message = f"BOBYQA stopped: {type(err).__name__} {err}".strip()
    steps = n_eval  # BOBYQA's; the finite differences below add to n_eval
    k = x.size
    h = rel_step * np.maximum(1.0, np.abs(x))
    f0 = -float(f_best) if math.isfinite(f_best) else value(x)  # BOBYQA's value at its x
    up = np.array([value(x + h[i] * np.eye(k)[i]) for i in range(k)])
    down = np.array([value(x - h[i] * np.eye(k)[i]) for i in range(k)])
    grad = (up - down) / (2 * h)
    H = np.diag((up - 2 * f0 + down) / (h * h))
    for i in range(k):
        for j in range(i):
            step = x.copy()
            step[i] += h[i]
            step[j] += h[j]
            H[i, j] = H[j, i] = (value(step) - up[i] - up[j] + f0) / (h[i] * h[j])
    n_eval += 2 * k + k * (k - 1) // 2 + (not math.isfinite(f_best))
    finite = bool(np.isfinite(H).all() and np.isfinite(grad).all())
    eig = np.linalg.eigvalsh(-H) if H.size and finite else np.array([1.0 if finite else -1.0])
    hessian_pd = bool(eig.min() > 0)
    # lme4's check.conv.grad, on the parameters off their bounds (a gradient at a bound,
    # pointing out of the feasible set, is the optimum's, as lme4 drops boundary parameters)
    free = ~((x <= lower) & (grad < 0))
    g = np.where(free, grad, 0.0)
    scaled = np.abs(g)
    if hessian_pd:
        scaled = np.abs(np.linalg.solve(np.linalg.cholesky(-H), g))
    max_grad = float(np.max(np.minimum(scaled, np.abs(g)))) if g.size else 0.0
    return Optimum(x=x, loglik=f0, gradient=grad, hessian=H, iterations=steps,
                   evaluations=n_eval, message=message,
                   converged=bool(max_grad < 0.002 and finite), hessian_pd=hessian_pd)
