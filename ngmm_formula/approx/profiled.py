r"""lmer's profiled objective for linear Gaussian mixed models (ML and REML), as a function of
the relative covariance parameters :math:`\theta` only.

For :math:`y \mid u \sim N(o + X\beta + Z\Lambda_\theta u, \sigma^2 W^{-1})`,
:math:`u \sim N(0, \sigma^2 I)` (lme4's parameterisation: :math:`\Lambda_\theta` relative to
:math:`\sigma`; this package's exact-Gaussian ``theta`` is :math:`\sigma\theta`), the integral
over :math:`u` is exact and, given :math:`\theta`, :math:`\beta` and :math:`\sigma` have closed
forms (Bates, Maechler, Bolker & Walker 2015, *J. Stat. Softw.* 67(1), section 3). With the
joint penalised least-squares (PLS) problem

.. math::

    r^2(\theta) = \min_{u, \beta}\; \lVert W^{1/2}(y - o - X\beta - Z\Lambda_\theta u)\rVert^2
                  + \lVert u\rVert^2

solved by the block Cholesky factorisation (their eq. 18)

.. math::

    \begin{bmatrix} \Lambda^\top Z^\top W Z \Lambda + I & \Lambda^\top Z^\top W X \\
                    X^\top W Z \Lambda & X^\top W X \end{bmatrix}
    = \begin{bmatrix} L_\theta & 0 \\ R_{ZX}^\top & R_X^\top \end{bmatrix}
      \begin{bmatrix} L_\theta^\top & R_{ZX} \\ 0 & R_X \end{bmatrix},

the profiled deviances are (their eqs. 34 and 41, plus the weights' constant
:math:`-\sum_i \log w_i` of the variance :math:`\sigma^2/w_i`)

.. math::

    -2\tilde\ell(\theta) &= \log|L_\theta|^2 + n\Bigl[1 + \log\frac{2\pi r^2(\theta)}{n}\Bigr]
                            - \textstyle\sum_i \log w_i, \qquad
                            \hat\sigma^2 = r^2/n, \\
    -2\tilde\ell_R(\theta) &= \log|L_\theta|^2 + \log|R_X|^2
        + (n-p)\Bigl[1 + \log\frac{2\pi r^2(\theta)}{n-p}\Bigr] - \textstyle\sum_i \log w_i
        - 2\log|\det A|, \qquad \hat\sigma^2 = r^2/(n-p),

where :math:`X = X_s` is the internally standardised fixed-effects matrix (:math:`\beta = A
\beta_s`; REML integrates :math:`\beta` on the user's scale, hence :math:`\log|\det A|`, as
:class:`~ngmm_formula.fit.Objective` does) and :math:`n` counts the observations with positive
weight. :math:`\hat\beta` and :math:`\hat u` come from the same factorisation, and
:math:`\widehat{\operatorname{Var}}(\hat\beta) = \hat\sigma^2 (R_X^\top R_X)^{-1}` (lme4's
``vcov``).

Cost. Everything that does not depend on :math:`\theta` is computed once
(:meth:`ProfiledLMM.of`): the cross-products :math:`M = Z^\top W Z` per block,
:math:`P = Z^\top W X`, :math:`Z^\top W r_0` and the residual sum of squares :math:`r_0^\top W
r_0` of the weighted least-squares fit :math:`\beta_0` (the PLS problem is solved for
:math:`\beta - \beta_0`, so :math:`X^\top W r_0 = 0` and :math:`r^2 = r_0^\top W r_0 - \lVert
c\rVert^2` loses no digits to a large mean of :math:`y`). An evaluation then never touches the
observations: it applies :math:`\Lambda_\theta` to the cross-products term by term and
factorises, a few dozen small tensor operations, differentiable by autograd.

Block layout. With one grouping factor the :math:`u` of different groups are independent given
:math:`\beta`, so :math:`L_\theta` is block diagonal with one :math:`D \times D` block per
group (:math:`D = \sum_k q_k`), also under REML (whose full-likelihood layout in
:mod:`~ngmm_formula.model` is one joint block holding :math:`\beta`); :math:`\beta` enters
through the Schur complement :math:`R_X^\top R_X = X^\top W X - \sum_b R_{ZX,b}^\top R_{ZX,b}`.
Crossed or nested factors keep the problem's single joint block of all :math:`u`, dense:
:func:`use_profiled` sends the large ones (those with a block-elimination split) to the blocked
sparse factorisation of :mod:`~ngmm_formula.approx.blocked` instead (the same profiled
deviance, :func:`~ngmm_formula.approx.blocked.profiled_objective`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch

from ngmm_formula.approx.conditional import LOG_2PI, Blocks, gradient, neg_hessian
from ngmm_formula.approx.factor import ConditionalFactor, DenseFactor, Factor
from ngmm_formula.design import tril_pairs
from ngmm_formula.errors import NGMMError
from ngmm_formula.model import Problem, dense_fixed, lstsq_fixed_order, matvec

#: Joint blocks of up to this many random effects keep the dense factorisation (with its
#: analytic gradient) even when the full objective splits them: on ScotsSec's crossed model
#: (167 coordinates) a whole fit took 0.17 s against 0.27 s by the blocked factorisation,
#: whose derivative-free optimiser costs a few ms per step however small the model.
DENSE_MAX_DIM = 500

__all__ = ["DENSE_MAX_DIM", "PLSSolution", "ProfiledLMM", "gram", "use_profiled"]


T = TypeVar("T")


def last_or_new(last: dict[bytes, T], theta: np.ndarray,
                evaluate: Callable[[np.ndarray], T]) -> T:
    """``evaluate(theta)``, or the result kept in ``last`` when the last evaluation was at
    ``theta``; ``last`` keeps the latest one only (the optimum's solve and conditional modes
    then reuse the optimiser's last factorisation)."""
    key = theta.tobytes()
    if key not in last:
        out = evaluate(theta)
        last.clear()
        last[key] = out
    return last[key]


@dataclass(frozen=True)
class PLSSolution:
    r"""The profiled quantities at one :math:`\theta` (standardised scale).

    Attributes
    ----------
    loglik : float
        The profiled (restricted) log-likelihood :math:`\tilde\ell(\theta)`.
    sigma : float
        :math:`\hat\sigma(\theta)`.
    beta : ndarray, shape (p,)
        :math:`\hat\beta_s(\theta)`.
    u : ndarray, shape (n_blocks, D)
        lme4's spherical conditional modes (:math:`b = \Lambda_\theta u`; this package's
        :math:`u` is :math:`u / \sigma`), in the blocks of the profiled layout.
    cov_beta : ndarray, shape (p, p)
        :math:`\hat\sigma^2 (R_X^\top R_X)^{-1}`.
    """

    loglik: float
    sigma: float
    beta: np.ndarray
    u: np.ndarray
    cov_beta: np.ndarray


@dataclass(frozen=True)
class _Term:
    r"""Where a random-effects term's coordinates sit in a block: ``n_levels`` consecutive
    groups of ``q`` coordinates from ``start`` (``n_levels`` is 1 in the per-group layout),
    and where its theta entries sit in :math:`\Lambda_k` (lme4's column-major order)."""

    start: int
    n_levels: int
    q: int
    rows: np.ndarray
    cols: np.ndarray


@dataclass(frozen=True)
class _State:
    """Intermediate results of one evaluation (all numpy, shapes as in :meth:`ProfiledLMM._pls`)."""

    Lams: list[np.ndarray]
    MLam: np.ndarray
    H: np.ndarray
    Hinv: np.ndarray
    HiLP: np.ndarray
    Sinv: np.ndarray
    delta: np.ndarray
    u: np.ndarray
    rss: float
    m2ll: float


@dataclass(frozen=True)
class ProfiledLMM:
    r"""The :math:`\theta`-independent part of the profiled objective of one problem.

    Build it with :meth:`of`; :meth:`value_and_grad` gives :math:`\tilde\ell(\theta)` and
    its exact gradient, :meth:`solve` the estimates.

    Gradient. With :math:`f = -2\tilde\ell`, :math:`S = R_X^\top R_X`,
    :math:`B = H^{-1}\Lambda^\top P` (:math:`H = L_\theta L_\theta^\top`) and the PLS
    solution :math:`(\hat u, \hat\delta)`, summing over blocks,

    .. math::

        \frac{\partial f}{\partial \Lambda} = 2\, M\Lambda H^{-1}
          \;[-\, 2 (P - M\Lambda B) S^{-1} B^\top \text{ (REML)}]
          \;-\, \frac{2 d}{r^2}\, (Z^\top W r_0 - P\hat\delta - M\Lambda\hat u)\,
          \hat u^\top,

    from :math:`d\log|H| = \operatorname{tr}(H^{-1} dH)`, the same for :math:`\log|S|`, and
    the envelope theorem for :math:`r^2` (its derivative at fixed :math:`(\hat u, \hat\delta)`);
    :math:`d = n` or :math:`n - p`. The derivative in an entry :math:`\theta_j =
    (\Lambda_k)_{rc}` sums the :math:`(r, c)` entries of the term's diagonal blocks (one per
    level). The test suite checks it against finite differences and against autograd of the
    full objective (:class:`~ngmm_formula.fit.Objective`) at :math:`(\hat\beta, \hat\sigma)`.
    """

    terms: tuple[_Term, ...]
    n_theta: int
    n_blocks: int
    dim: int
    per_group: bool
    M: np.ndarray  # (n_blocks, D, D)  Z'WZ
    P: np.ndarray  # (n_blocks, D, p)  Z'W X_s
    zr: np.ndarray  # (n_blocks, D)    Z'W r0
    XtWX: np.ndarray  # (p, p)
    beta0: np.ndarray  # (p,)  weighted least squares
    rss0: float  # r0' W r0
    n: int
    p: int
    reml: bool
    const: float  # -sum log w (+ 2 log|det A| under REML), in -2 loglik units
    #: the last evaluation, by theta's bytes: the estimates and the results' modes and factor
    #: at the optimum (:meth:`solve`, :meth:`conditional`) reuse it
    _last: dict[bytes, _State] = field(default_factory=dict, init=False, repr=False,
                                       compare=False)

    @classmethod
    def of(cls, problem: Problem) -> ProfiledLMM:
        """Precompute the cross-products of a :class:`~ngmm_formula.model.Problem` (a linear
        Gaussian one: identity link, no network inputs)."""
        if problem.net_X:
            raise NGMMError("the profiled objective needs a linear predictor without nn() "
                            "terms")
        pos = problem.w > 0
        if not bool(pos.all()):  # zero weights drop out of the likelihood (as Objective)
            problem = problem.subset(torch.nonzero(pos).squeeze(-1))
        y, w, Xs = problem.y, problem.w, dense_fixed(problem.Xs)
        blocks, terms, per_group = _u_layout(problem)
        n, p = int(y.numel()), problem.p
        if problem.reml and n <= p:
            raise NGMMError(f"REML needs more observations ({n}) than fixed effects ({p})")
        with torch.no_grad():
            Zs = torch.cat(problem.Z, dim=1)  # raw Z in slot order: C with Lambda = I
            sw = w.sqrt()
            r = y - problem.offset
            beta0 = Xs.new_zeros(p)
            if p:
                # fixed-order kernels: the same bits whatever the memory alignment (a seed
                # reproduces a Gaussian NGMM, whose final refit comes here, bit for bit)
                beta0 = lstsq_fixed_order(Xs * sw[:, None], r * sw)
                r = r - matvec(Xs, beta0)
            D, nb = blocks.dim, blocks.n_blocks
            zero_prior = Blocks(n_blocks=nb, dim=D, block_of_obs=blocks.block_of_obs,
                                slot_pos=blocks.slot_pos,
                                prior_precision=torch.zeros_like(blocks.prior_precision))
            M = neg_hessian(w, Zs, zero_prior)
            zr = gradient(w * r, Zs, Zs.new_zeros(nb, D), zero_prior)
            # P = Z'W X per block: scatter w_i Z_is X_ij into (block, pos(i, s), j)
            P = Zs.new_zeros(nb * D, p).index_add(
                0, blocks.flat_index().reshape(-1),
                ((w[:, None] * Zs)[:, :, None] * Xs[:, None, :]).reshape(Zs.numel(), p))
            const = -float(torch.log(w).sum())
            if problem.reml:
                const -= 2.0 * problem.standardisation.log_abs_det
            return cls(terms=terms, n_theta=problem.n_theta, n_blocks=nb, dim=D,
                       per_group=per_group, M=M.cpu().numpy(),
                       P=P.reshape(nb, D, p).cpu().numpy(), zr=zr.cpu().numpy(),
                       XtWX=gram(Xs, w).cpu().numpy(),
                       beta0=beta0.cpu().numpy(), rss0=float((w * r * r).sum()), n=n, p=p,
                       reml=problem.reml, const=const)

    # ----------------------------------------------------------------------------------------

    def _lambdas(self, theta: np.ndarray) -> list[np.ndarray]:
        r"""The :math:`\Lambda_k` of the terms; in the per-group layout with several terms
        their block-diagonal :math:`\Lambda` of one group as the only item (what
        :meth:`_right` multiplies by, built once per evaluation)."""
        out, k = [], 0
        for t in self.terms:
            L = np.zeros((t.q, t.q))
            L[t.rows, t.cols] = theta[k:k + t.rows.size]
            k += t.rows.size
            out.append(L)
        if self.per_group and len(out) > 1:
            full = np.zeros((self.dim, self.dim))
            for t, L in zip(self.terms, out):  # scipy's block_diag costs 30 us a call
                full[t.start:t.start + t.q, t.start:t.start + t.q] = L
            return [full]
        return out

    def _right(self, A: np.ndarray, Lams: list[np.ndarray]) -> np.ndarray:
        r""":math:`A \Lambda` for ``A`` of shape (..., D), term by term on the last axis."""
        if self.per_group:  # one block-diagonal Lambda (:meth:`_lambdas`)
            return A @ Lams[0]
        out = np.empty(A.shape)
        for t, L in zip(self.terms, Lams):
            sl = slice(t.start, t.start + t.n_levels * t.q)
            if t.q == 1:  # a scalar: no batch of 1 x 1 products
                np.multiply(A[..., sl], L[0, 0], out=out[..., sl])
                continue
            a = A[..., sl]
            a = a.reshape(*a.shape[:-1], t.n_levels, t.q) @ L
            out[..., sl] = a.reshape(*a.shape[:-2], t.n_levels * t.q)
        return out

    def _diag_blocks(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        r"""For each theta entry :math:`(\Lambda_k)_{rc}`: the sum over blocks and levels of
        the :math:`(r, c)` entries of the diagonal blocks of :math:`A B`, with ``A`` of shape
        (n_blocks, D, m) and ``B`` of shape (n_blocks, m, D)."""
        out = []
        nb, m = A.shape[0], A.shape[2]
        for t in self.terms:
            sl = slice(t.start, t.start + t.n_levels * t.q)
            a = A[:, sl, :].reshape(nb, t.n_levels, t.q, m)
            b = B[:, :, sl].reshape(nb, m, t.n_levels, t.q)
            G = np.einsum("blrm,bmlc->rc", a, b)
            out.append(G[t.rows, t.cols])
        return np.concatenate(out)

    def _pls(self, theta: np.ndarray) -> _State:
        """:meth:`_evaluate` at ``theta``, or the last evaluation when it was there."""
        return last_or_new(self._last, theta, self._evaluate)

    def _evaluate(self, theta: np.ndarray) -> _State:
        """Solve the PLS problem at relative ``theta``; -2 loglik with it."""
        Lams = self._lambdas(theta)
        MLam = self._right(self.M, Lams)
        H = self._right(MLam.transpose(0, 2, 1), Lams)  # Lambda' M Lambda
        H[:, np.arange(self.dim), np.arange(self.dim)] += 1.0
        first = self.terms[0]
        if (not self.per_group and len(self.terms) > 1 and self.dim > 64
                and 2 * first.n_levels * first.q >= self.dim):
            log_det, Hinv = _schur_log_det_and_inverse(H, first.n_levels, first.q)
        else:
            log_det, Hinv = _log_det_and_inverse(H)
        zu = self._right(self.zr, Lams)  # (n_blocks, D): Lambda' Z'W r0
        Hizu = np.einsum("bij,bj->bi", Hinv, zu)
        p = self.p
        if p:
            LamP = self._right(self.P.transpose(0, 2, 1), Lams).transpose(0, 2, 1)
            HiLP = Hinv @ LamP  # (n_blocks, D, p)
            S = self.XtWX - np.einsum("bdi,bdj->ij", LamP, HiLP)
            Sinv = np.linalg.inv(S)
            delta = Sinv @ -np.einsum("bdi,bd->i", LamP, Hizu)
            u = Hizu - HiLP @ delta
        else:
            HiLP = np.zeros((self.n_blocks, self.dim, 0))
            Sinv, delta, u = np.zeros((0, 0)), np.zeros(0), Hizu
        rss = self.rss0 - float((zu * u).sum())
        dof = self.n
        if self.reml:
            log_det += np.linalg.slogdet(S)[1] if p else 0.0
            dof = self.n - p
        m2ll = log_det + dof * (1.0 + LOG_2PI + math.log(rss / dof)) + self.const
        return _State(Lams, MLam, H, Hinv, HiLP, Sinv, delta, u, rss, float(m2ll))

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        r"""The profiled (restricted) log-likelihood :math:`\tilde\ell(\theta)` and its
        gradient in the relative ``theta`` (lme4's ``devfun(theta)`` is -2 times the value);
        ``-inf`` where the system is not positive definite."""
        try:
            st = self._pls(np.asarray(theta, dtype=float))
        except np.linalg.LinAlgError:
            return -math.inf, np.zeros(self.n_theta)
        if not (st.rss > 0 and math.isfinite(st.m2ll)):
            return -math.inf, np.zeros(self.n_theta)
        dof = self.n - self.p if self.reml else self.n
        g = 2.0 * self._diag_blocks(st.MLam, st.Hinv)
        if self.reml and self.p:
            A = (self.P - st.MLam @ st.HiLP) @ st.Sinv
            g -= 2.0 * self._diag_blocks(A, st.HiLP.transpose(0, 2, 1))
        res = (self.zr - self.P @ st.delta - np.einsum("bij,bj->bi", st.MLam, st.u))
        g -= (2.0 * dof / st.rss) * self._diag_blocks(res[:, :, None], st.u[:, None, :])
        return -0.5 * st.m2ll, -0.5 * g

    def solve(self, theta: np.ndarray) -> PLSSolution:
        r""":math:`\hat\beta_s`, :math:`\hat u`, :math:`\hat\sigma` and the covariance of
        :math:`\hat\beta_s` at ``theta``."""
        st = self._pls(np.asarray(theta, dtype=float))
        sigma2 = st.rss / (self.n - self.p if self.reml else self.n)
        return PLSSolution(loglik=-0.5 * st.m2ll, sigma=math.sqrt(sigma2),
                           beta=self.beta0 + st.delta, u=st.u, cov_beta=sigma2 * st.Sinv)


    def conditional(self, theta: np.ndarray, sigma: float) -> tuple[np.ndarray, Factor]:
        r"""The conditional modes and the factor at the profiled solution, in the problem's
        layout (this package's :math:`v = u / \sigma`), for the results
        (:meth:`~ngmm_formula.fit.Objective.all_blocks`): what the full objective's mode
        search would find there, without the search. Per group (ML with one grouping
        factor): the modes (groups, D) and the Cholesky factors of :math:`H_b`. Otherwise
        one joint block in lme4's Zt order (term, level, column), then
        :math:`\hat\beta_s` under REML, with a
        :class:`~ngmm_formula.approx.factor.ConditionalFactor`."""
        st = self._pls(np.asarray(theta, dtype=float))
        if self.per_group and not self.reml:
            return st.u / sigma, DenseFactor.of(torch.as_tensor(st.H))
        if self.per_group:  # one grouping factor: term k at columns start..start+q of each
            parts = [(st.u[:, t.start:t.start + t.q].reshape(-1),
                      st.Hinv[:, t.start:t.start + t.q, t.start:t.start + t.q])
                     for t in self.terms]
            n_levels = tuple(self.n_blocks for _ in self.terms)
        else:  # joint layout: term k's level l at start + l q + (0..q-1)
            parts = []
            for t in self.terms:
                idx = t.start + np.arange(t.n_levels)[:, None] * t.q + np.arange(t.q)
                parts.append((st.u[0, idx].reshape(-1),
                              st.Hinv[0][idx[:, :, None], idx[:, None, :]]))
            n_levels = tuple(t.n_levels for t in self.terms)
        v = np.concatenate([u for u, _ in parts]) / sigma
        if self.reml:
            v = np.concatenate([v, self.beta0 + st.delta])
        cov_beta = sigma * sigma * st.Sinv  # as solve()'s, at sigma = solve()'s sigma
        return v[None, :], ConditionalFactor([b for _, b in parts],
                                             tuple(t.q for t in self.terms), n_levels,
                                             cov_beta, self.reml)


def _log_det_and_inverse(H: np.ndarray) -> tuple[float, np.ndarray]:
    """:math:`\\sum_b \\log|H_b|` and :math:`H_b^{-1}` of symmetric positive definite blocks
    (n_blocks, D, D); ``LinAlgError`` if one is not positive definite (round-off only: every
    block is :math:`\\Lambda^\\top M \\Lambda + I`).

    Small blocks: numpy's batched Cholesky factorisation and inverse. One large (joint) block:
    LAPACK's ``potrf`` + ``potri``, the inverse from the Cholesky factor in :math:`D^3`
    flops, half of a general inverse after a separate factorisation.
    """
    if H.shape[0] > 1 or H.shape[1] <= 64:
        chol = np.linalg.cholesky(H)
        return float(2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum()), np.linalg.inv(H)
    c, info = scipy.linalg.lapack.dpotrf(H[0], lower=True, clean=True)
    if info != 0:
        raise np.linalg.LinAlgError("not positive definite")
    log_det = float(2.0 * np.log(np.diagonal(c)).sum())
    inv, info = scipy.linalg.lapack.dpotri(c, lower=True)
    if info != 0:
        raise np.linalg.LinAlgError("singular")
    inv = np.tril(inv)
    inv = inv + np.tril(inv, -1).T
    return log_det, inv[None]


def _schur_log_det_and_inverse(H: np.ndarray, n1: int, q1: int) -> tuple[float, np.ndarray]:
    r"""As :func:`_log_det_and_inverse` for one joint block whose first ``n1`` q1 x q1
    diagonal blocks are all its first ``n1 * q1`` rows hold (the first term's levels do not
    interact: :math:`Z_1^\top W Z_1` is block diagonal), by eliminating them first:

    .. math::

        H = \begin{bmatrix} A & B \\ B^\top & C \end{bmatrix},\quad
        S = C - B^\top A^{-1} B,\quad \log|H| = \log|A| + \log|S|,\quad
        H^{-1} = \begin{bmatrix} A^{-1} + X S^{-1} X^\top & -X S^{-1} \\
                                  -S^{-1} X^\top & S^{-1} \end{bmatrix},\ X = A^{-1} B.

    ScotsSec's crossed model (148 + 19 coordinates): 6 times fewer flops than the
    Cholesky factor and inverse of the whole block."""
    Hm = H[0]
    k = n1 * q1
    diag = np.arange(n1)
    A = Hm[:k, :k].reshape(n1, q1, n1, q1)[diag, :, diag, :]  # (n1, q1, q1)
    log_det = float(2.0 * np.log(np.diagonal(np.linalg.cholesky(A), axis1=1, axis2=2)).sum())
    Ainv = np.linalg.inv(A)
    B = Hm[:k, k:]
    X = (Ainv @ B.reshape(n1, q1, -1)).reshape(k, -1)
    S = Hm[k:, k:] - B.T @ X
    log_S, Sinv = _log_det_and_inverse(S[None])
    XS = X @ Sinv[0]
    top = XS @ X.T
    top.reshape(n1, q1, n1, q1)[diag, :, diag, :] += Ainv
    inv = np.empty_like(Hm)
    inv[:k, :k] = top
    inv[:k, k:] = -XS
    inv[k:, :k] = -XS.T
    inv[k:, k:] = Sinv[0]
    return log_det + log_S, inv[None]


def gram(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:math:`X^\top W X` column by column with :func:`~ngmm_formula.model.matvec` (a sum
    in an order fixed by the shape; BLAS's ``gemm`` rounds by memory alignment)."""
    Xw_T = (X * w[:, None]).T.contiguous()
    cols = [matvec(Xw_T, X[:, j].contiguous()) for j in range(X.shape[1])]
    return torch.stack(cols, dim=1) if cols else X.new_zeros(0, 0)


def use_profiled(problem: Problem) -> bool:
    """Whether this module's :class:`ProfiledLMM` is the route for ``problem``'s layout.

    Yes with one grouping factor (blocks of :math:`D = \\sum_k q_k`, also under REML) and
    for joint blocks that :mod:`~ngmm_formula.model` factorises densely anyway
    (``blocks.split`` is None: small, or no block elimination pays); no for joint blocks
    with a split (crossed or nested factors with more than :data:`DENSE_MAX_DIM` random
    effects), where this module would
    factorise the whole dense :math:`L_\\theta` at every evaluation (InstEval: 4,100
    coordinates): those take the blocked sparse factorisation of
    :class:`~ngmm_formula.approx.blocked.BlockedLMM`
    (:func:`~ngmm_formula.approx.blocked.profiled_objective`).
    """
    if problem.blocks.split is None:
        return True
    blocks, _, per_group = _u_layout(problem)
    return per_group or blocks.dim <= DENSE_MAX_DIM


def _u_layout(problem: Problem) -> tuple[Blocks, tuple[_Term, ...], bool]:
    """Blocks of the random effects alone (no REML coordinates), per group when the problem
    has a single grouping factor (also when its REML layout is one joint block)."""
    b, q = problem.blocks, problem.q
    D = int(sum(q))
    starts = np.cumsum([0, *q[:-1]]).tolist()
    per_group_terms = tuple(_term(s, 1, k) for s, k in zip(starts, q))
    if b.n_blocks > 1 or not problem.reml and b.dim == D:
        # already one block per group (or a single group)
        return b, per_group_terms, True
    # joint layout, lme4's Zt order: coordinate of term k, level l, column c is
    # off_k + l * q_k + c; the REML coordinates of beta (if any) come after all of them
    slot_pos = b.slot_pos[:, :D]
    offs = np.cumsum([0, *[k * m for k, m in zip(q, problem.n_levels)][:-1]]).tolist()
    levels = [(slot_pos[:, s] - o) // k for s, o, k in zip(starts, offs, q)]
    same = all(bool(torch.equal(levels[0], lv)) for lv in levels[1:])
    if same and len(set(problem.n_levels)) == 1:
        n_groups = problem.n_levels[0]
        pos = torch.tensor([s + c for s, k in zip(starts, q) for c in range(k)],
                           dtype=torch.long, device=slot_pos.device)
        blocks = Blocks(n_blocks=n_groups, dim=D, block_of_obs=levels[0],
                        slot_pos=pos[None, :].expand(slot_pos.shape[0], -1),
                        prior_precision=b.prior_precision.new_ones(D))
        return blocks, per_group_terms, True
    dim_u = int(sum(k * m for k, m in zip(q, problem.n_levels)))
    blocks = Blocks(n_blocks=1, dim=dim_u, block_of_obs=b.block_of_obs, slot_pos=slot_pos,
                    prior_precision=b.prior_precision[:dim_u])
    terms = tuple(_term(o, m, k) for o, m, k in zip(offs, problem.n_levels, q))
    return blocks, terms, False


def _term(start: int, n_levels: int, q: int) -> _Term:
    pairs = tril_pairs(q)
    return _Term(start, n_levels, q, np.array([i for i, _ in pairs], dtype=np.intp),
                 np.array([j for _, j in pairs], dtype=np.intp))
