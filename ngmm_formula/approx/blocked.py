r"""lmer's profiled objective for linear Gaussian models with crossed, nested or several
grouping factors: a blocked sparse Cholesky factorisation of
:math:`H_\theta = \Lambda_\theta^\top Z^\top W Z \Lambda_\theta + I`.

The profiled deviance is that of :mod:`~ngmm_formula.approx.profiled` (Bates et al. 2015,
*J. Stat. Softw.* 67(1), eqs. 34 and 41); only the factorisation of the random-effects block
differs. :class:`~ngmm_formula.approx.profiled.ProfiledLMM` holds :math:`H_\theta` as one dense
block when the factors are crossed or nested, :math:`O(D^3)` per evaluation; here, as in
MixedModels.jl, the coordinates are split into

* :math:`A`: the random effects of the term with the most levels (its first block: every
  observation touches one level, so :math:`H_{AA}` is block diagonal, one
  :math:`q_A \times q_A` block per level, factorised in one batched call), and
* :math:`B`: every other term,

.. math::

    H_\theta = \begin{bmatrix} R_A & 0 \\ C^\top & I \end{bmatrix}
               \begin{bmatrix} I & 0 \\ 0 & S \end{bmatrix}
               \begin{bmatrix} R_A^\top & C \\ 0 & I \end{bmatrix}, \qquad
    H_{AA} = R_A R_A^\top,\; C = R_A^{-1} H_{AB},\; S = H_{BB} - C^\top C,

with :math:`H_{AB}`, :math:`C` and :math:`S` sparse matrices (scipy.sparse: their products
are compiled sparse-sparse products, with no loop over levels in Python and no dense
observations x levels matrix). The Schur complement :math:`S` is factorised densely (LAPACK)
when it has filled in (crossed factors: InstEval's lecturers after eliminating the students,
22% nonzero) and by SuperLU with a minimum-degree ordering and no pivoting otherwise (nested
factors, or the STAR teachers after the students: 0.8% nonzero). Then

.. math::

    \log|H_\theta| = 2\sum_l \log|R_{A,l}| + \log|S|,

and every quadratic form the profiled deviance needs is :math:`K^\top H_\theta^{-1} K` for
:math:`K = [\Lambda^\top Z^\top W r_0,\; \Lambda^\top Z^\top W X]` (:math:`p + 1` columns):
:math:`K^\top H^{-1} K = V_A^\top V_A + V_B^\top S^{-1} V_B` with :math:`V_A = R_A^{-1} K_A`
and :math:`V_B = K_B - C^\top V_A`.

When every term is scalar (random intercepts, ``||`` terms), :math:`\Lambda` is diagonal
and :math:`S` is a rescaling of fixed cross-products: :class:`_ScalarSchur` fixes its
pattern at set-up and forms :math:`C^\top C` as one sparse matrix-vector product per
evaluation (past :data:`SCHUR_PAIRS_MAX` pairs, that product for the light levels of a dense
S plus a dense rank-k update of the heavy ones; past :data:`LIGHT_PAIRS_MAX` light pairs, a
sparse product of the light levels per evaluation, :class:`_Product`). The last evaluation is
kept, so that the estimates and the conditional variances at the optimum reuse its factor.

There is no gradient: the optimiser is derivative-free, lme4's BOBYQA (nlopt's, from
:meth:`~ngmm_formula.approx.blocked.BlockedLMM.moment_start` where every term is scalar;
:func:`~ngmm_formula.fit.maximise_derivative_free`). An analytic gradient needs
:math:`S^{-1}` on the pattern of :math:`S` (the derivative of :math:`\log|S|`): with a
dense :math:`S` that is LAPACK's ``dpotri``, 2 to 3 times the cost of the factor
(InstEval: 30 to 45 ms against 14 ms), and SuperLU gives no selected inverse. Measured on
InstEval, L-BFGS-B with central-difference gradients (standing in for exact ones) took 25
gradient evaluations against the 63 values of the derivative-free optimiser of then
(COBYQA from theta = 1; BOBYQA from the moment start now takes 40), about the same cost in
all, and on Chem97 it stopped at :math:`\theta_k = 0`, where the gradient of the profiled
deviance vanishes by symmetry, at a lower likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from ngmm_formula.approx.conditional import LOG_2PI
from ngmm_formula.approx.factor import ConditionalFactor
from ngmm_formula.approx.profiled import (
    PLSSolution,
    ProfiledLMM,
    gram,
    last_or_new,
    use_profiled,
)
from ngmm_formula.design import tril_pairs
from ngmm_formula.errors import NGMMError
from ngmm_formula.model import Problem, dense_fixed, lstsq_fixed_order, matvec

__all__ = ["BlockedLMM", "profiled_objective"]

#: The Schur complement is factorised densely above this fraction of nonzeros (or below
#: :data:`DENSE_DIM` coordinates); SuperLU otherwise. Measured on InstEval (22%: LAPACK 37 ms,
#: SuperLU 77 ms) and STAR (0.8%: LAPACK 89 ms, SuperLU 6 ms).
DENSE_FILL = 0.05
DENSE_DIM = 200
#: The conditional variances of the levels of a scalar first term sum over the pairs of
#: nonzeros of each row of C when there are at most this many (unordered) pairs; else dense
#: products, by pieces (faster there: the pairs read S^{-1} at random; the MovieLens-size
#: model's 1.2e8 pairs took 5.9 s in all, the dense pieces 4.8 s).
PAIRS_MAX = 10_000_000
#: Scalar terms: :math:`C^\top C` on a pattern fixed at set-up, as one sparse
#: matrix-vector product (:class:`_ScalarSchur`), when the levels of A meet at most this
#: many pairs of B coordinates (InstEval: 1.8 million); else a sparse-sparse product per
#: evaluation, densified.
SCHUR_PAIRS_MAX = 10_000_000
#: Without the pairs matrix, the levels of A with more than this fraction of B's
#: coordinates among their nonzeros enter C'C by a dense rank-k update (BLAS syrk), the
#: others by the sparse product: a sparse pair product costs about 2.8 ns, a dense level
#: about nb^2 / 3e10 s (the break-even at 0.11 nb; MovieLens-size: 299 users of 6,040
#: hold half of the pairs).
HEAVY_FRACTION = 0.1
#: ... and that dense S only up to this many B coordinates (800 MB); beyond, the sparse
#: products and the fill test of any layout (:meth:`BlockedLMM._vector_blocks`).
PRODUCT_MAX_DIM = 10_000
#: Past :data:`SCHUR_PAIRS_MAX` pairs, the light levels still enter :math:`C^\top C` by
#: the pairs matrix when they meet at most this many pairs (12 bytes a pair: 720 MB); the
#: heavy ones by the dense rank-k update. MovieLens-size (371 heavy users of 6,040):
#: 5.45e7 light pairs, a matrix-vector product of 0.13 s and 0.1 s of dense arithmetic per
#: evaluation against about 0.45 s for the sparse-sparse product with its symbolic pass.
LIGHT_PAIRS_MAX = 60_000_000
#: Pairs handled at a time while the pairs matrix is built (bounds its temporaries).
PAIRS_CHUNK = 5_000_000


@dataclass(frozen=True)
class _PLS:
    """One evaluation: -2 log-likelihood and what the estimates need."""

    m2ll: float
    rss: float
    S_X: np.ndarray  # (p, p)  R_X' R_X
    G: np.ndarray  # (p+1, p+1)  K' H^{-1} K


@dataclass(frozen=True)
class BlockedLMM:
    r"""The :math:`\theta`-independent part of the profiled objective (cross-products in
    the coordinate order A, B) and the index maps of :math:`\Lambda_\theta`.

    Build it with :meth:`of`; :meth:`value` gives :math:`\tilde\ell(\theta)`,
    :meth:`solve` the estimates.
    """

    q_a: int
    m_a: int
    dim_b: int
    a_rows: np.ndarray  # (n_theta_A,)  theta entries of Lambda_A: rows, cols, theta index
    a_cols: np.ndarray
    a_tidx: np.ndarray
    lam_rows: np.ndarray  # Lambda_B's nonzeros (B coordinates) and their theta index
    lam_cols: np.ndarray
    lam_tidx: np.ndarray
    M_aa: np.ndarray  # (m_A, q_A, q_A)
    M_ab: sp.csr_matrix  # (m_A q_A, dim_B)
    M_bb: sp.csr_matrix  # (dim_B, dim_B)
    P_a: np.ndarray  # (m_A, q_A, p + 1): Z'W [r0, X_s], A rows
    P_b: np.ndarray  # (dim_B, p + 1)
    perm: np.ndarray  # joint coordinate of each (A, B) coordinate
    schur: _ScalarSchur | None  # every term has q = 1 (Lambda diagonal): S's set-up
    ab_rows: np.ndarray  # row of each stored nonzero of M_ab (CSR)
    q: tuple[int, ...]
    n_levels: tuple[int, ...]
    XtWX: np.ndarray
    beta0: np.ndarray
    rss0: float
    n: int
    p: int
    n_theta: int
    reml: bool
    const: float
    #: the last evaluation, by theta's bytes: the estimates and the conditional variances
    #: at the optimum reuse its factor
    _last: dict[bytes, tuple[_PLS, tuple]] = field(default_factory=dict, init=False,
                                                   repr=False, compare=False)
    #: SuperLU's fill-reducing ordering of S, computed at the first sparse factorisation
    _ordering: list[_Ordering] = field(default_factory=list, init=False, repr=False,
                                       compare=False)

    @classmethod
    def of(cls, problem: Problem) -> BlockedLMM:
        """Precompute the cross-products of a linear Gaussian :class:`Problem` whose random
        effects are one joint block (several grouping factors)."""
        if problem.net_X:
            raise NGMMError("the profiled objective needs a linear predictor without nn() "
                            "terms")
        pos = problem.w > 0
        if not bool(pos.all()):
            problem = problem.subset(torch.nonzero(pos).squeeze(-1))
        y, w, Xs = problem.y, problem.w, dense_fixed(problem.Xs)
        q, levels = problem.q, problem.n_levels
        n, p = int(y.numel()), problem.p
        if problem.reml and n <= p:
            raise NGMMError(f"REML needs more observations ({n}) than fixed effects ({p})")
        D = int(sum(k * m for k, m in zip(q, levels)))
        offs = np.cumsum([0, *[k * m for k, m in zip(q, levels)][:-1]])
        with torch.no_grad():
            r = y - problem.offset
            beta0 = Xs.new_zeros(p)
            if p:
                sw = w.sqrt()
                beta0 = lstsq_fixed_order(Xs * sw[:, None], r * sw)
                r = r - matvec(Xs, beta0)
            S_slots = int(sum(q))
            slot_pos = problem.blocks.slot_pos[:, :S_slots].cpu().numpy()
            Zv = torch.cat(problem.Z, dim=1).cpu().numpy()
            w_np, r_np, X_np = w.cpu().numpy(), r.cpu().numpy(), Xs.cpu().numpy()
            rss0 = float((w * r * r).sum())
            XtWX = gram(Xs, w).cpu().numpy()
            const = -float(torch.log(w).sum())
            if problem.reml:
                const -= 2.0 * problem.standardisation.log_abs_det
        # A: the term with the most levels (ties: the first); its coordinates first
        a = int(np.argmax(levels))
        q_a, m_a = q[a], levels[a]
        in_a = np.zeros(D, dtype=bool)
        in_a[offs[a]:offs[a] + q_a * m_a] = True
        perm = np.concatenate([np.flatnonzero(in_a), np.flatnonzero(~in_a)])
        new_of = np.empty(D, dtype=np.int64)
        new_of[perm] = np.arange(D)
        Z = sp.csr_matrix((Zv.reshape(-1), new_of[slot_pos].reshape(-1),
                           np.arange(0, n * S_slots + 1, S_slots)), shape=(n, D))
        ZtW = (Z.T @ sp.diags(w_np)).tocsr()
        M = (ZtW @ Z).tocsr()
        na = q_a * m_a
        M_aa_flat = M[:na, :na]
        idx = np.arange(na)
        blk = idx // q_a * q_a
        M_aa = np.stack([np.asarray(M_aa_flat[idx, blk + c]).ravel() for c in range(q_a)],
                        axis=1).reshape(m_a, q_a, q_a)
        RX = np.concatenate([r_np[:, None], X_np], axis=1)
        P = np.asarray(ZtW @ RX)
        # Lambda's nonzeros: term k, level l, entry (i, j) of Lambda_k
        tstart = np.cumsum([0, *[k * (k + 1) // 2 for k in q][:-1]])
        rows, cols, tidx = [], [], []
        for k, (qk, mk) in enumerate(zip(q, levels)):
            if k == a:
                continue
            base = offs[k] + np.arange(mk) * qk
            for e, (i, j) in enumerate(tril_pairs(qk)):
                rows.append(new_of[base + i] - na)
                cols.append(new_of[base + j] - na)
                tidx.append(np.full(mk, tstart[k] + e))
        pa = tril_pairs(q_a)
        M_ab, M_bb = M[:na, na:].tocsr(), M[na:, na:].tocsr()
        M_ab.eliminate_zeros()  # (the pairs of _ScalarSchur are of its stored entries)
        M_ab.sort_indices()
        M_bb.sort_indices()
        lam_rows, lam_cols, lam_tidx = _cat(rows), _cat(cols), _cat(tidx)
        ab_rows = np.repeat(np.arange(na), np.diff(M_ab.indptr))
        schur = None
        if all(k == 1 for k in q):  # Lambda_B diagonal: its theta index by B coordinate
            order = np.argsort(lam_rows)
            lam_rows, lam_cols, lam_tidx = lam_rows[order], lam_cols[order], lam_tidx[order]
            counts = np.diff(M_ab.indptr).astype(np.int64)
            if ((counts * (counts + 1) // 2).sum() <= SCHUR_PAIRS_MAX
                    or D - na <= PRODUCT_MAX_DIM):
                schur = _ScalarSchur.of(M_aa.reshape(-1), M_ab, M_bb, ab_rows)
        return cls(
            q_a=q_a, m_a=m_a, dim_b=D - na, schur=schur, ab_rows=ab_rows,
            a_rows=np.array([i for i, _ in pa]), a_cols=np.array([j for _, j in pa]),
            a_tidx=tstart[a] + np.arange(len(pa)),
            lam_rows=lam_rows, lam_cols=lam_cols, lam_tidx=lam_tidx,
            M_aa=M_aa, M_ab=M_ab, M_bb=M_bb,
            P_a=P[:na].reshape(m_a, q_a, p + 1), P_b=P[na:], perm=perm, q=tuple(q),
            n_levels=tuple(levels), XtWX=XtWX,
            beta0=beta0.cpu().numpy(), rss0=rss0, n=n, p=p, n_theta=problem.n_theta,
            reml=problem.reml, const=const)

    # ----------------------------------------------------------------------------------------

    def _factor(self, theta: np.ndarray, dense: bool = False
                ) -> tuple[float, np.ndarray, sp.csr_matrix, sp.csr_matrix, object, bool,
                           np.ndarray]:
        r"""Factorise :math:`H_\theta`: :math:`\log|H|`, :math:`R_A^{-1}`, :math:`C`,
        :math:`\Lambda_B`, the factor of :math:`S` (dense Cholesky, lower triangle, or
        SuperLU; dense if ``dense``), which, and :math:`\Lambda_A`."""
        La = np.zeros((self.q_a, self.q_a))
        La[self.a_rows, self.a_cols] = theta[self.a_tidx]
        if self.schur is not None:
            lam_b = theta[self.lam_tidx]
            Ra, Ra_inv, C, S = self._scalar_blocks(float(La[0, 0]), lam_b)
            # diagonal (lam_rows = lam_cols = 0..nb-1 here): CSR directly, not sp.diags
            Lb = sp.csr_matrix((lam_b, self.lam_cols, np.arange(lam_b.size + 1)),
                               shape=(lam_b.size, lam_b.size))
        else:
            Lb = sp.csr_matrix((theta[self.lam_tidx], (self.lam_rows, self.lam_cols)),
                               shape=(self.dim_b, self.dim_b))
            Ra, Ra_inv, C, S = self._vector_blocks(La, Lb)
        log_det = 2.0 * float(np.log(np.diagonal(Ra, axis1=1, axis2=2)).sum())
        fac: object
        nb = self.dim_b
        dense = (dense or isinstance(S, np.ndarray) or nb <= DENSE_DIM
                 or S.nnz > DENSE_FILL * nb * nb)
        if dense:
            S_d = S if isinstance(S, np.ndarray) else S.toarray(order="F")
            c, info = scipy.linalg.lapack.dpotrf(S_d, lower=True, clean=False,
                                                 overwrite_a=True)
            if info != 0:
                raise np.linalg.LinAlgError("not positive definite")
            log_det += 2.0 * float(np.log(np.diagonal(c)).sum())
            fac = c
        else:
            assert not isinstance(S, np.ndarray)
            S = S.tocsc()
            if not (self._ordering and self._ordering[0].fits(S)):
                self._ordering[:] = [_Ordering.of(S)]
            lu = self._ordering[0].factor(S)
            log_det += lu.log_det
            fac = lu
        return log_det, Ra_inv, C, Lb, fac, dense, La

    def _scalar_blocks(self, lam_a: float, lam_b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix,
                                  np.ndarray | sp.csc_matrix]:
        r"""Scalar terms (:math:`\Lambda` diagonal): :math:`R_A = \operatorname{diag}(r)`,
        :math:`r_l^2 = 1 + \lambda_A^2 M_{AA,l}`, :math:`C = \operatorname{diag}(\lambda_A
        / r) M_{AB} \Lambda_B` (elementwise on the stored nonzeros of :math:`M_{AB}`) and
        :math:`S` from :class:`_ScalarSchur`."""
        assert self.schur is not None
        M_ab = self.M_ab
        ra = np.sqrt(lam_a * lam_a * self.schur.m_aa + 1.0)
        C = sp.csr_matrix((M_ab.data * (lam_a / ra)[self.ab_rows] * lam_b[M_ab.indices],
                           M_ab.indices, M_ab.indptr), shape=M_ab.shape)
        S = self.schur.assemble(lam_a, lam_b)
        return ra.reshape(-1, 1, 1), (1.0 / ra).reshape(-1, 1, 1), C, S

    def _vector_blocks(self, La: np.ndarray, Lb: sp.csr_matrix
                       ) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, sp.csr_matrix]:
        r"""Any terms: :math:`R_A` (batched Cholesky of :math:`\Lambda_A^\top M_{AA,l}
        \Lambda_A + I`), its inverse, :math:`C = R_A^{-1} (I \otimes \Lambda_A^\top)
        M_{AB} \Lambda_B` and :math:`S = \Lambda_B^\top M_{BB} \Lambda_B + I - C^\top C`,
        all sparse."""
        q, m, nb = self.q_a, self.m_a, self.dim_b
        Haa = La.T @ self.M_aa @ La + np.eye(q)
        Ra = np.linalg.cholesky(Haa)  # LinAlgError if not positive definite (round-off)
        Ra_inv = np.linalg.inv(Ra)  # lower triangular, (m, q, q)
        # C = R_A^{-1} (I (x) Lambda_A') M_AB Lambda_B: a block-diagonal sparse left factor
        left = Ra_inv @ La.T
        if q == 1:
            Lft = sp.diags(left.reshape(-1))
        else:
            Lft = sp.bsr_matrix((left, np.arange(m), np.arange(m + 1)),
                                shape=(m * q, m * q)).tocsr()
        C = (Lft @ (self.M_ab @ Lb)).tocsr()
        S = (Lb.T @ self.M_bb @ Lb + sp.identity(nb, format="csr") - C.T @ C)
        return Ra, Ra_inv, C, S

    def _solve_s(self, fac: object, dense: bool, V: np.ndarray) -> np.ndarray:
        if dense:
            assert isinstance(fac, np.ndarray)
            return scipy.linalg.cho_solve((fac, True), V, check_finite=False)
        return fac.solve(np.asfortranarray(V))  # type: ignore[attr-defined]

    def _quadratic(self, fac: object, dense: bool, V: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        r""":math:`V^\top S^{-1} V`, and :math:`S^{-1} V` where it comes on the way: with a
        dense factor :math:`S = L L^\top` the forward substitution alone,
        :math:`\|L^{-1} V\|^2` (one pass over the factor, not two)."""
        if dense:
            assert isinstance(fac, np.ndarray)
            W = scipy.linalg.solve_triangular(fac, V, lower=True, check_finite=False)
            return W.T @ W, None
        SiV = self._solve_s(fac, dense, V)
        return V.T @ SiV, SiV

    def _pls(self, theta: np.ndarray) -> tuple[_PLS, tuple]:
        """:meth:`_evaluate` at ``theta``, or the last evaluation when it was there."""
        return last_or_new(self._last, theta, self._evaluate)

    def _evaluate(self, theta: np.ndarray) -> tuple[_PLS, tuple]:
        log_det, Ra_inv, C, Lb, fac, dense, La = self._factor(theta)
        # K = Lambda' Z'W [r0, X] in (A, B) order; V_A = R_A^{-1} K_A, V_B = K_B - C' V_A
        if self.q_a == 1:
            Va = (Ra_inv.reshape(-1) * La[0, 0])[:, None, None] * self.P_a
        else:
            Va = Ra_inv @ np.matmul(La.T, self.P_a)
        Va2 = Va.reshape(-1, self.p + 1)
        Vb = np.asarray(Lb.T @ self.P_b) - C.T @ Va2
        VbSiVb, SiVb = self._quadratic(fac, dense, Vb)
        G = Va2.T @ Va2 + VbSiVb
        p = self.p
        S_X = self.XtWX - G[1:, 1:]
        rss = self.rss0 - G[0, 0]
        if p:
            rss -= float(G[0, 1:] @ np.linalg.solve(S_X, G[1:, 0]))
        dof = self.n
        if not np.isfinite(G).all():
            raise np.linalg.LinAlgError("not finite")
        if self.reml:
            if p:
                sign, ld = np.linalg.slogdet(S_X)
                if sign <= 0:
                    raise np.linalg.LinAlgError("X'V^{-1}X not positive definite")
                log_det += ld
            dof = self.n - p
        if not rss > 0:
            raise np.linalg.LinAlgError("non-positive residual sum of squares")
        m2ll = log_det + dof * (1.0 + LOG_2PI + math.log(rss / dof)) + self.const
        return _PLS(float(m2ll), float(rss), S_X, G), (Ra_inv, C, Lb, fac, dense, La, Va,
                                                         Vb, SiVb)

    def moment_start(self) -> np.ndarray | None:
        r"""A start for the relative theta by the method of moments, when every term is
        scalar (random intercepts, ``||`` terms); None otherwise (lme4's start, 1, then).

        From the cross-products already at hand: for each level :math:`l` of term
        :math:`k`, :math:`n_l = (Z^\top W Z)_{ll}` and the level's least-squares effect
        :math:`\hat b_l = (Z^\top W r_0)_l / n_l` on the OLS residuals :math:`r_0`, whose
        sampling variance is about :math:`s^2 / n_l` with :math:`s^2 = r_0^\top W r_0 / n`.
        Then

        .. math::

            \hat\sigma_k^2 = \max\Bigl(0,\; \operatorname{var}_l(\hat b_l) - s^2
            \operatorname{mean}_l(1 / n_l)\Bigr), \qquad
            \hat\sigma^2 = \max\Bigl(s^2 - \sum_k \hat\sigma_k^2,\; 0.1\, s^2\Bigr),

        and :math:`\theta_k = \max(\hat\sigma_k / \hat\sigma, 0.05)` (off the bound, where
        the optimiser's first model would be one-sided). Crossed and nested terms share
        variance in the level means, so this is a start, not an estimate: measured within
        2-50% of the optimum on InstEval's three terms and star's, and 4.5x on Chem97's
        small LEA term (0.23 against 0.05), where lme4's start of 1 is off by up to 20x
        (``benchmarks/README.md``). Costs a few vector operations.
        """
        if any(k != 1 for k in self.q):
            return None
        n_l = np.concatenate([self.M_aa.reshape(-1), self.M_bb.diagonal()])
        sums = np.concatenate([self.P_a[:, 0, 0], self.P_b[:, 0]])
        # the theta index of each coordinate (Lambda diagonal: lam_rows is a permutation)
        term = np.concatenate([np.full(self.m_a, self.a_tidx[0]),
                               self.lam_tidx[np.argsort(self.lam_rows)]])
        s2 = self.rss0 / self.n
        var = np.zeros(self.n_theta)
        for k in range(self.n_theta):  # one pass per term (a handful), not per level
            keep = (term == k) & (n_l > 0)
            if keep.sum() > 1:
                b = sums[keep] / n_l[keep]
                var[k] = max(float(b.var() - s2 * np.mean(1.0 / n_l[keep])), 0.0)
        sigma2 = max(s2 - float(var.sum()), 0.1 * s2)
        return np.maximum(np.sqrt(var / sigma2), 0.05)

    def value(self, theta: np.ndarray) -> float:
        r"""The profiled (restricted) log-likelihood :math:`\tilde\ell(\theta)` at the
        relative ``theta`` (lme4's ``devfun(theta)`` is -2 times it); ``-inf`` where the
        system is not positive definite."""
        try:
            return -0.5 * self._pls(np.asarray(theta, dtype=float))[0].m2ll
        except np.linalg.LinAlgError:
            return -math.inf

    def solve(self, theta: np.ndarray) -> PLSSolution:
        r""":math:`\hat\beta_s`, :math:`\hat u` (joint layout order, one block),
        :math:`\hat\sigma` and the covariance of :math:`\hat\beta_s` at ``theta``."""
        theta = np.asarray(theta, dtype=float)
        st, (Ra_inv, C, Lb, fac, dense, La, Va, Vb, SiVb) = self._pls(theta)
        p = self.p
        delta = -np.linalg.solve(st.S_X, st.G[1:, 0]) if p else np.zeros(0)
        # u = H^{-1} (K_0 - K_P delta): back-substitution of the same factor
        e = np.concatenate([[1.0], -delta])
        if SiVb is None:
            SiVb = self._solve_s(fac, dense, Vb)
        x_b = SiVb @ e
        w_a = (Va @ e) - (C @ x_b).reshape(self.m_a, self.q_a)
        x_a = np.einsum("lji,lj->li", Ra_inv, w_a)  # R_A^{-T}
        u_new = np.concatenate([x_a.reshape(-1), x_b])
        u = np.empty_like(u_new)
        u[self.perm] = u_new
        sigma2 = st.rss / (self.n - p if self.reml else self.n)
        cov = sigma2 * np.linalg.inv(st.S_X) if p else np.zeros((0, 0))
        return PLSSolution(loglik=-0.5 * st.m2ll, sigma=math.sqrt(sigma2),
                           beta=self.beta0 + delta, u=u[None, :], cov_beta=cov)

    def conditional(self, theta: np.ndarray, sigma: float) -> tuple[np.ndarray, ConditionalFactor]:
        r"""The conditional modes and the factor of the whole problem at the profiled
        solution, in :mod:`~ngmm_formula.model`'s joint layout (this package's
        :math:`v = u / \sigma`, then :math:`\hat\beta_s` under REML), for the results
        (:func:`~ngmm_formula.fit.Objective.all_blocks`): what the full objective's mode
        search would find there, without the search."""
        theta = np.asarray(theta, dtype=float)
        sol = self.solve(theta)
        v = sol.u[0] / sigma
        if self.reml:
            v = np.concatenate([v, sol.beta])
        return v[None, :], ConditionalFactor(self._inverse_blocks(theta), self.q,
                                             self.n_levels, sol.cov_beta, self.reml)

    def _inverse_blocks(self, theta: np.ndarray) -> list[np.ndarray]:
        r"""The diagonal blocks of :math:`H_\theta^{-1}`, one (levels, q, q) array per term:
        :math:`(H^{-1})_{AA,l} = H_{AA,l}^{-1} + \tilde C_l S^{-1} \tilde C_l^\top`
        (:math:`\tilde C = R_A^{-\top} C`) and :math:`(H^{-1})_{BB} = S^{-1}` (formed once,
        dense; from a sparse factor, on the pattern of S alone where that is all that is
        read: :meth:`_PermutedLU.on_pattern`)."""
        _, (Ra_inv, C, _, fac, dense, *_) = self._pls(theta)
        q, m, nb = self.q_a, self.m_a, self.dim_b
        counts = np.diff(C.indptr).astype(np.int64)
        scalar_pairs = self.schur is not None and self.schur.T is not None
        # every entry of S^{-1} read below lies on the pattern of S, unless the pieces of C~
        # S^{-1} C~' of the last branch are formed densely
        on_pattern = (scalar_pairs
                      or q == 1 and int((counts * (counts + 1) // 2).sum()) <= PAIRS_MAX)
        if not dense and on_pattern and isinstance(fac, _PermutedLU):
            s_inv = fac.on_pattern()
        else:
            if not dense:
                _, Ra_inv, C, _, fac, _, _ = self._factor(theta, dense=True)
            assert isinstance(fac, np.ndarray)
            inv, info = scipy.linalg.lapack.dpotri(fac, lower=True)  # lower triangle, Fortran
            if info != 0:
                raise np.linalg.LinAlgError("singular")
            inv_flat = inv.reshape(-1, order="F")

            def s_inv(i: np.ndarray, j: np.ndarray) -> np.ndarray:
                """Entries (i, j) of S^{-1}, from its lower triangle."""
                return inv_flat[np.maximum(i, j) + nb * np.minimum(i, j)]
        # C~ = R_A^{-T} C, block-diagonal left factor as in _factor
        RiT = np.transpose(Ra_inv, (0, 2, 1))
        Lft = (sp.diags(RiT.reshape(-1)) if q == 1 else
               sp.bsr_matrix((RiT, np.arange(m), np.arange(m + 1)), shape=(m * q, m * q)))
        Ct = (Lft @ C).tocsr()
        V_a = np.einsum("lji,ljk->lik", Ra_inv, Ra_inv)  # H_AA,l^{-1} = R^{-T} R^{-1}
        if scalar_pairs:
            # scalar terms: C~_l = (lambda_A / r_l^2) M_AB,l Lambda_B, and the pairs of
            # level l are column l of T: one product with S^{-1} on the pattern (twice the
            # off-diagonal entries, the pairs being unordered)
            s, lam_b = self.schur, theta[self.lam_tidx]
            assert s is not None and s.T is not None
            if s.full:  # by position in the Fortran-ordered S^{-1} (lower triangle read)
                w = inv * lam_b[:, None] * (2.0 * lam_b[None, :])
                w.flat[s.diag] *= 0.5
                w = w.reshape(-1, order="F")
            else:
                w = (s_inv(s.rows, s.cols) * lam_b[s.rows] * lam_b[s.cols]
                     * np.where(s.rows == s.cols, 1.0, 2.0))
            g = V_a[:, 0, 0] * theta[self.a_tidx[0]]  # lambda_A / r_l^2
            V_a[:, 0, 0] += g * g * (s.T.T @ w)
            if s.heavy.size:  # their rows of M_AB Lambda_B, dense: W S^{-1} W' (diagonal),
                # W S^{-1} by BLAS dsymm from dpotri's lower triangle (no symmetrised copy)
                Wl = s.W * lam_b[None, :]
                WS = scipy.linalg.blas.dsymm(1.0, inv, Wl, side=1, lower=1)
                V_a[s.heavy, 0, 0] += g[s.heavy] ** 2 * (WS * Wl).sum(1)
            m_dense = 0
        elif on_pattern:
            # sum over the pairs (b, b') of each row's nonzeros of C~_lb S^{-1}_bb' C~_lb'
            # (each unordered pair once, twice its value off the diagonal)
            row_of = np.repeat(np.arange(m), counts)
            k1, k2 = _row_pairs(Ct.indptr, row_of)
            vals = (Ct.data[k1] * Ct.data[k2] * np.where(k1 == k2, 1.0, 2.0)
                    * s_inv(Ct.indices[k1], Ct.indices[k2]))
            V_a[:, 0, 0] += np.bincount(row_of[k1], vals, minlength=m)
            m_dense = 0
        else:
            m_dense = m
        if m_dense:
            Sinv = np.tril(inv) + np.tril(inv, -1).T
        chunk = max(1, (1 << 22) // max(1, nb * q))  # levels per piece: <= 32 MB dense
        for lo in range(0, m_dense, chunk):
            hi = min(m, lo + chunk)
            Cc = Ct[lo * q:hi * q]
            T = np.asarray(Cc @ Sinv).reshape(hi - lo, q, nb)
            V_a[lo:hi] += np.einsum("lib,ljb->lij", Cc.toarray().reshape(hi - lo, q, nb), T)
        # per term, in the problem's term order; B terms from S^{-1}
        na = q * m
        out: list[np.ndarray] = []
        offs = np.cumsum([0, *[k * n for k, n in zip(self.q, self.n_levels)][:-1]])
        new_of = np.empty(self.perm.size, dtype=np.int64)
        new_of[self.perm] = np.arange(self.perm.size)
        for qk, mk, off in zip(self.q, self.n_levels, offs):
            pos = new_of[off + np.arange(mk)[:, None] * qk + np.arange(qk)[None, :]]
            if pos[0, 0] < na:
                out.append(V_a)
            else:
                b = pos - na
                out.append(s_inv(b[:, :, None], b[:, None, :]))
        return out


class _Ordering:
    """SuperLU's minimum-degree ordering of a symmetric sparse :math:`S`, computed once for
    its pattern (fixed across evaluations), so that each evaluation factorises the permuted
    matrix in its natural order: on star's 1,454-square S the factor took 2.1 ms against
    7.0 ms with the ordering recomputed (same fill, 31,294 nonzeros in L and U).

    ``perm``: :math:`S_P = S[perm][:, perm]` is the matrix SuperLU factorises as
    :math:`S P_c` after its own ordering (``perm = argsort(perm_c)``); ``source``: the
    position in ``S.data`` of each stored entry of :math:`S_P` (CSC).
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, perm: np.ndarray,
                 source: np.ndarray, p_indptr: np.ndarray, p_indices: np.ndarray):
        self.indptr, self.indices, self.perm = indptr, indices, perm
        self.source, self.p_indptr, self.p_indices = source, p_indptr, p_indices

    @classmethod
    def of(cls, S: sp.csc_matrix) -> _Ordering:
        try:
            lu = spla.splu(S, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                           options={"SymmetricMode": True})
        except RuntimeError as e:  # exactly singular (or not finite)
            raise np.linalg.LinAlgError(str(e)) from e
        perm = np.argsort(lu.perm_c)
        # the permutation of the stored entries: S's positions carried through the indexing
        tagged = sp.csc_matrix((np.arange(1, S.nnz + 1, dtype=np.float64), S.indices,
                                S.indptr), shape=S.shape)
        P = tagged[perm][:, perm].tocsc()
        P.sort_indices()
        return cls(S.indptr.copy(), S.indices.copy(), perm,
                   P.data.astype(np.int64) - 1, P.indptr, P.indices)

    def fits(self, S: sp.csc_matrix) -> bool:
        """Whether ``S`` has the pattern this ordering was computed for, stored alike."""
        return (np.array_equal(S.indptr, self.indptr)
                and np.array_equal(S.indices, self.indices))

    def factor(self, S: sp.csc_matrix) -> _PermutedLU:
        """SuperLU of :math:`S_P` in its natural order (no pivoting: S is positive
        definite); raises LinAlgError where S is not."""
        S_P = sp.csc_matrix((S.data[self.source], self.p_indices, self.p_indptr),
                            shape=S.shape)
        try:
            lu = spla.splu(S_P, permc_spec="NATURAL", diag_pivot_thresh=0.0,
                           options={"SymmetricMode": True})
        except RuntimeError as e:  # exactly singular (or not finite)
            raise np.linalg.LinAlgError(str(e)) from e
        d = lu.U.diagonal()
        if not bool((d > 0).all()):
            raise np.linalg.LinAlgError("not positive definite")
        return _PermutedLU(lu, self.perm, float(np.log(d).sum()))


class _PermutedLU:
    """:math:`S^{-1} b` from the factor of :math:`S_P = S[perm][:, perm]`:
    :math:`x[perm] = S_P^{-1} b[perm]`."""

    def __init__(self, lu: spla.SuperLU, perm: np.ndarray, log_det: float):
        self.lu, self.perm, self.log_det = lu, perm, log_det

    def solve(self, b: np.ndarray) -> np.ndarray:
        x = np.empty_like(b, dtype=np.float64)
        x[self.perm] = self.lu.solve(np.asfortranarray(b[self.perm]))
        return x

    def on_pattern(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        r"""Entries of :math:`S^{-1}` on the pattern of the factor (which holds S's), by
        Takahashi's recursion: with :math:`S_P = L D L^\top` (SuperLU's unit lower L and
        :math:`U = D L^\top`, no pivoting) and :math:`Z = S_P^{-1}`, from the last column
        to the first, over the rows :math:`c` of column j of L below the diagonal,

        .. math::  Z_{cj} = -Z_{cc} L_{cj}, \qquad Z_{jj} = 1/d_j - L_{cj}^\top Z_{cj},

        where :math:`Z_{cc}` lies on the filled pattern (c is a clique of the elimination)
        and was formed before. About the factor's own flops, against :math:`n^3` for the
        dense inverse; a loop over columns with small dense pieces (star's 1,454 columns:
        0.03 s against 0.09 s for ``dpotrf`` and ``dpotri`` of the densified S, CPU time).

        Returns ``s_inv(i, j)``, the entries of :math:`S^{-1}` at index arrays ``i, j``
        (correct only on the filled pattern).
        """
        lu, n = self.lu, self.perm.size
        if not np.array_equal(lu.perm_r, np.arange(n)):  # pivoted: no LDL' here
            raise np.linalg.LinAlgError("a pivoted factor")
        L = lu.L.tocsc()
        d = lu.U.diagonal()
        Z = np.zeros((n, n))
        for j in range(n - 1, -1, -1):
            lo, hi = L.indptr[j], L.indptr[j + 1]
            rows = L.indices[lo:hi]
            below = rows > j
            c, l_c = rows[below], L.data[lo:hi][below]
            if c.size:
                z = -(Z[np.ix_(c, c)] @ l_c)
                Z[c, j] = z
                Z[j, c] = z
                Z[j, j] = 1.0 / d[j] - float(l_c @ z)
            else:
                Z[j, j] = 1.0 / d[j]
        where = np.empty(n, dtype=np.int64)  # position of each coordinate of S in S_P
        where[self.perm] = np.arange(n)

        def s_inv(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            return Z[where[i], where[j]]
        return s_inv


@dataclass(frozen=True)
class _ScalarSchur:
    r"""The Schur complement of scalar terms, assembled from a pattern fixed at set-up.

    With every :math:`\Lambda_k` a scalar, :math:`\Lambda_A = \lambda_A I`,
    :math:`\Lambda_B = \operatorname{diag}(\lambda_B)` and :math:`H_{AA}` diagonal, so

    .. math::

        S = I + \Lambda_B \Bigl(M_{BB} - \sum_l d_l M_{BA,l} M_{AB,l}\Bigr) \Lambda_B,
        \qquad d_l = \frac{\lambda_A^2}{1 + \lambda_A^2 M_{AA,l}},

    where :math:`M_{AB,l}` is row :math:`l` of :math:`M_{AB}`. The products
    :math:`M_{BA,l} M_{AB,l}` do not depend on :math:`\theta`: their lower triangles on the
    pattern of :math:`S` are the columns of one sparse matrix ``T``, built once from the
    pairs of nonzeros of each row of :math:`M_{AB}` in the order they come (CSR by level,
    transposed: no sort), so :math:`C^\top C` costs one sparse matrix-vector product per
    evaluation (no symbolic phase, no sparse-sparse product, no conversion). Merging the
    levels with equal :math:`M_{AA,l}` (equal :math:`d_l`) would shorten the product by a
    sixth on InstEval and cost more to build (sorting the pairs: 0.16 s against 0.04 s).
    Past :data:`SCHUR_PAIRS_MAX` pairs ``T`` holds the light levels only and S is dense
    (:meth:`_light_and_heavy`; the 1M-row MovieLens-size model: 45.5 s against 60.4 s
    for the sparse product, peak memory 2.16 against 1.19 GB); past
    :data:`LIGHT_PAIRS_MAX` light pairs ``T`` is None and the product :math:`M_{BA}
    \operatorname{diag}(d) M_{AB}` is formed per evaluation, S dense. :math:`S` is dense
    (Fortran order, lower triangle, for LAPACK) when its pattern is (see
    :data:`DENSE_FILL`), else a CSC matrix of the full symmetric pattern for SuperLU.
    """

    m_aa: np.ndarray  # (m_A,) the diagonal of M_AA
    rows: np.ndarray  # lower-triangular pattern of S (B coordinates), rows >= cols
    cols: np.ndarray
    M_bb: np.ndarray  # M_BB on the pattern
    diag: np.ndarray  # positions of the diagonal in the pattern
    flat: np.ndarray  # position of each pattern entry in a Fortran-ordered (nb, nb) array
    T: sp.csc_matrix | None  # (pattern, levels of A); None: the product per evaluation
    product: _Product | None  # when T is None
    dense: bool
    csc: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # indptr, indices, source entry
    heavy: np.ndarray  # levels of A outside T (by the dense update W), with T
    W: np.ndarray  # (heavy, nb) their rows of M_AB, dense
    #: T's rows and M_bb are the positions of the Fortran-ordered (nb, nb) S
    #: (:meth:`_light_and_heavy`; rows, cols and flat then unused)
    full: bool = False

    @classmethod
    def of(cls, m_aa: np.ndarray, M_ab: sp.csr_matrix, M_bb: sp.csr_matrix,
           ab_rows: np.ndarray) -> _ScalarSchur:
        """The pattern and ``T`` (``M_ab`` with sorted indices; ``ab_rows`` the row of each
        of its nonzeros)."""
        nb = M_bb.shape[0]
        bb = sp.tril(M_bb).tocoo()
        counts = np.diff(M_ab.indptr).astype(np.int64)
        pairs = counts * (counts + 1) // 2
        n_pairs = int(pairs.sum())
        heavy = counts > HEAVY_FRACTION * nb
        if n_pairs > SCHUR_PAIRS_MAX and int(pairs[~heavy].sum()) <= LIGHT_PAIRS_MAX:
            return cls._light_and_heavy(m_aa, M_ab, bb, heavy)
        T, product = None, None
        # the pattern of S (lower triangle, sorted by row then column): M_BB, the diagonal
        # and, with T, the pattern of M_BA M_AB (of |M_AB|: no cancellation)
        pattern = M_bb + sp.identity(nb, format="csr")
        if n_pairs <= SCHUR_PAIRS_MAX:
            M_abs = abs(M_ab)
            pattern = pattern + M_abs.T @ M_abs
        pattern = sp.tril(pattern).tocsr()
        pattern.sort_indices()
        rows = np.repeat(np.arange(nb), np.diff(pattern.indptr))
        cols = pattern.indices.astype(np.int64)
        keys = rows * nb + cols
        if n_pairs > SCHUR_PAIRS_MAX:
            product = _Product.of(M_ab, counts > HEAVY_FRACTION * nb)
        else:
            # the entry (indices[k1], indices[k2]) of the lower triangle (indices sorted)
            k1, k2 = _row_pairs(M_ab.indptr, ab_rows)
            pos = _positions(keys, M_ab.indices[k1].astype(np.int64) * nb + M_ab.indices[k2],
                             nb)
            indptr = np.concatenate([[0], np.cumsum(counts * (counts + 1) // 2)])
            T = sp.csr_matrix((M_ab.data[k1] * M_ab.data[k2], pos, indptr),
                              shape=(m_aa.size, keys.size)).T
        Mbb = np.zeros(keys.size)
        Mbb[_positions(keys, bb.row.astype(np.int64) * nb + bb.col, nb)] = bb.data
        dense = T is None or nb <= DENSE_DIM or 2 * keys.size - nb > DENSE_FILL * nb * nb
        csc = None
        if not dense:  # the full symmetric pattern, by columns, and each entry's source
            strict = np.flatnonzero(rows != cols)
            r_full = np.concatenate([rows, cols[strict]])
            c_full = np.concatenate([cols, rows[strict]])
            src = np.concatenate([np.arange(keys.size), strict])
            order = np.lexsort((r_full, c_full))
            indptr = np.concatenate([[0], np.cumsum(np.bincount(c_full, minlength=nb))])
            csc = (indptr, r_full[order], src[order])
        return cls(m_aa=m_aa, rows=rows, cols=cols, M_bb=Mbb,
                   diag=np.flatnonzero(rows == cols), flat=rows + nb * cols, T=T,
                   product=product, dense=dense, csc=csc,
                   heavy=np.zeros(0, dtype=np.int64), W=np.zeros((0, nb)))

    @classmethod
    def _light_and_heavy(cls, m_aa: np.ndarray, M_ab: sp.csr_matrix, bb: sp.coo_matrix,
                         heavy: np.ndarray) -> _ScalarSchur:
        r"""Past :data:`SCHUR_PAIRS_MAX` pairs: a dense S (``full``) whose entries are
        addressed by their position in the Fortran-ordered (nb, nb) array; ``T`` of the
        light levels (the heavy ones' columns empty) by rows of that array (CSR: a
        matrix-vector product reads the small vector d at random and writes in order,
        where the pattern-ordered ``T`` above scatters its writes over S); the heavy
        levels' rows of :math:`M_{AB}` dense, for a rank-k update per evaluation. Built
        :data:`PAIRS_CHUNK` pairs at a time."""
        nb, m = M_ab.shape[1], M_ab.shape[0]
        counts = np.where(heavy, 0, np.diff(M_ab.indptr)).astype(np.int64)
        per_level = counts * (counts + 1) // 2
        indptr = np.concatenate([[0], np.cumsum(per_level)])
        data = np.empty(int(indptr[-1]))
        pos = np.empty(int(indptr[-1]), dtype=np.int32 if nb * nb < 2**31 else np.int64)
        light = np.flatnonzero(~heavy)
        ends = np.cumsum(per_level[light])
        cuts = np.searchsorted(ends, np.arange(PAIRS_CHUNK, max(int(ends[-1:].sum()), 1),
                                               PAIRS_CHUNK))
        for chunk in np.split(light, np.unique(cuts + 1)):
            if not chunk.size:
                continue
            sub = M_ab[chunk]  # rows sorted: indices[k2] <= indices[k1]
            k1, k2 = _row_pairs(sub.indptr, np.repeat(np.arange(chunk.size),
                                                      np.diff(sub.indptr)))
            lo = int(indptr[chunk[0]])
            data[lo:lo + k1.size] = sub.data[k1] * sub.data[k2]
            pos[lo:lo + k1.size] = sub.indices[k1] + nb * sub.indices[k2].astype(np.int64)
        T = sp.csr_matrix((data, pos, indptr), shape=(m, nb * nb)).T.tocsr()
        del data, pos
        Mbb = np.zeros(nb * nb)
        Mbb[bb.row + nb * bb.col.astype(np.int64)] = bb.data
        h = np.flatnonzero(heavy)
        none = np.zeros(0, dtype=np.int64)
        return cls(m_aa=m_aa, rows=none, cols=none, M_bb=Mbb,
                   diag=np.arange(nb) * (nb + 1), flat=none, T=T, product=None, dense=True,
                   csc=None, heavy=h, W=M_ab[h].toarray(), full=True)

    def assemble(self, lam_a: float, lam_b: np.ndarray) -> np.ndarray | sp.csc_matrix:
        r""":math:`S` at :math:`(\lambda_A, \lambda_B)`: a dense Fortran-ordered array
        whose lower triangle holds :math:`S`, or a CSC matrix."""
        d = lam_a * lam_a / (1.0 + lam_a * lam_a * self.m_aa)
        nb = lam_b.size
        if self.T is None:
            assert self.product is not None
            S = self.product.dense(d, lam_b)
            S[self.rows, self.cols] += self.M_bb * lam_b[self.rows] * lam_b[self.cols]
            S.flat[::nb + 1] += 1.0
            return S
        if self.full:
            S = self.T @ d
            np.subtract(self.M_bb, S, out=S)  # no fresh 8 nb^2 bytes to fault in
            S = S.reshape((nb, nb), order="F")
            S *= lam_b[:, None]
            S *= lam_b[None, :]
            S.flat[self.diag] += 1.0
            return _minus_heavy(S, self.W, d[self.heavy], lam_b) if self.heavy.size else S
        v = (self.M_bb - self.T @ d) * lam_b[self.rows] * lam_b[self.cols]
        v[self.diag] += 1.0
        if self.dense:
            S = np.zeros(nb * nb)
            S[self.flat] = v
            return S.reshape((nb, nb), order="F")
        assert self.csc is not None
        indptr, indices, src = self.csc
        return sp.csc_matrix((v[src], indices, indptr), shape=(nb, nb))


@dataclass(frozen=True)
class _Product:
    r""":math:`-\Lambda_B M_{BA} \operatorname{diag}(d) M_{AB} \Lambda_B` formed per
    evaluation (dense, lower triangle valid): the light levels of A by a sparse product,
    the heavy ones (:data:`HEAVY_FRACTION`) by a dense rank-k update,

    .. math::

        M_{BA} D M_{AB} = (D^{1/2} M_{AB,\text{light}})^\top (D^{1/2}
        M_{AB,\text{light}}) + W^\top W, \qquad W = D_\text{heavy}^{1/2}
        M_{AB,\text{heavy}} \text{ (dense)}.
    """

    light: sp.csr_matrix  # rows of M_AB of the light levels
    light_t: sp.csr_matrix  # its transpose
    light_rows: np.ndarray  # the level (of A) of each nonzero of ``light``
    light_t_rows: np.ndarray  # the B coordinate of each nonzero of ``light_t``
    heavy: np.ndarray  # the heavy levels
    W: np.ndarray  # (heavy, nb) their rows of M_AB, dense

    @classmethod
    def of(cls, M_ab: sp.csr_matrix, heavy: np.ndarray) -> _Product:
        levels = np.flatnonzero(~heavy)
        light = M_ab[levels].tocsr()
        light_t = light.T.tocsr()
        return cls(light=light, light_t=light_t,
                   light_rows=levels[np.repeat(np.arange(levels.size), np.diff(light.indptr))],
                   light_t_rows=np.repeat(np.arange(light_t.shape[0]),
                                          np.diff(light_t.indptr)),
                   heavy=np.flatnonzero(heavy),
                   W=M_ab[np.flatnonzero(heavy)].toarray())

    def dense(self, d: np.ndarray, lam_b: np.ndarray) -> np.ndarray:
        """The product's negative at level weights ``d`` and scales ``lam_b``, Fortran
        order."""
        L, Lt = self.light, self.light_t
        left = sp.csr_matrix((Lt.data * lam_b[self.light_t_rows], Lt.indices, Lt.indptr),
                             shape=Lt.shape)
        right = sp.csr_matrix((L.data * d[self.light_rows] * lam_b[L.indices], L.indices,
                               L.indptr), shape=L.shape)
        # symmetric: the C-ordered array of the product is its transpose in Fortran order
        S = (left @ right).toarray().T
        S *= -1.0
        return _minus_heavy(S, self.W, d[self.heavy], lam_b) if self.heavy.size else S


def _minus_heavy(S: np.ndarray, W: np.ndarray, d: np.ndarray, lam_b: np.ndarray
                 ) -> np.ndarray:
    r""":math:`S - \Lambda_B W^\top \operatorname{diag}(d) W \Lambda_B` on the lower
    triangle of the Fortran-ordered ``S`` (in place), by BLAS ``dsyrk``."""
    V = W * np.sqrt(d)[:, None] * lam_b[None, :]
    return scipy.linalg.blas.dsyrk(-1.0, V, beta=1.0, c=S, trans=1, lower=1, overwrite_c=1)


def _row_pairs(indptr: np.ndarray, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``(k1, k2)``, ``k2 <= k1``, of stored entries in the same row of a CSR
    matrix (``row_of``: the row of each stored entry), row by row, without a loop."""
    nnz = row_of.size
    reps = np.arange(nnz) - indptr[row_of] + 1  # entries of the row up to k1
    k1 = np.repeat(np.arange(nnz), reps)
    start = np.cumsum(reps) - reps
    k2 = indptr[row_of[k1]] + np.arange(k1.size) - np.repeat(start, reps)
    return k1, k2


def _positions(keys: np.ndarray, wanted: np.ndarray, nb: int) -> np.ndarray:
    """Position in the sorted ``keys`` (``row * nb + col``) of each of ``wanted``: a lookup
    table up to :math:`2^{25}` entries (128 MB), else a binary search."""
    if nb * nb <= 1 << 25:
        table = np.empty(nb * nb, dtype=np.int32)
        table[keys] = np.arange(keys.size, dtype=np.int32)
        return table[wanted]
    return np.searchsorted(keys, wanted)


def _cat(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)


def profiled_objective(problem: Problem) -> ProfiledLMM | BlockedLMM:
    """lmer's profiled objective of a linear Gaussian ``problem``: the dense per-group or
    small joint :class:`ProfiledLMM` (with an analytic gradient) where :func:`use_profiled`,
    else the blocked sparse :class:`~ngmm_formula.approx.blocked.BlockedLMM` (value only)."""
    return ProfiledLMM.of(problem) if use_profiled(problem) else BlockedLMM.of(problem)
