r"""Factorisations of the negative Hessian :math:`H = C^\top W C + \operatorname{diag}(\pi)` of a
block's log-integrand: the one object behind every log-determinant, Newton solve and
conditional variance of :mod:`~ngmm_formula.approx`.

Two implementations of one interface (:class:`Factor`: ``half_logdet``, ``solve``,
``inverse_blocks``, ``detach``) for the objective:

* :class:`DenseFactor` -- a batched dense Cholesky factor :math:`H_b = R_b R_b^\top` of every
  block (n_blocks, D, D). Used for the per-group blocks of a single grouping factor (small D)
  and for small joint blocks, where it is the cheaper of the two.
* :class:`SchurFactor` -- a joint block (crossed or nested factors, REML) whose coordinates are
  split as :math:`v = (v_A, v_B)`: :math:`A` holds the random effects of one grouping factor
  (by default the one with most coordinates), :math:`B` everything else (the other factors'
  random effects and, under REML, :math:`\beta`). Every observation touches the :math:`q_A`
  coordinates of one level of the factor of :math:`A`, so :math:`H_{AA}` is block diagonal,
  one :math:`q_A \times q_A` block per level, and with the Schur complement

  .. math::

      S = H_{BB} - H_{BA} H_{AA}^{-1} H_{AB}
        = H_{BB} - \sum_l H_{B,l}\, H_{AA,l}^{-1} H_{l,B},

  the block elimination gives

  .. math::

      \log|H| = \sum_l \log|H_{AA,l}| + \log|S|, \qquad
      H^{-1} g = \begin{pmatrix} H_{AA}^{-1}(g_A - H_{AB} x_B) \\ x_B \end{pmatrix},\;
      x_B = S^{-1}(g_B - H_{BA} H_{AA}^{-1} g_A),

  and the diagonal blocks of the inverse
  :math:`(H^{-1})_{AA,l} = H_{AA,l}^{-1} + M_l S^{-1} M_l^\top`,
  :math:`M_l = H_{AA,l}^{-1} H_{l,B}`, :math:`(H^{-1})_{BB} = S^{-1}`.

  :math:`H_{AB}` is sparse: it is held on the distinct (level of A, coordinate of B) *pairs*
  that observations touch, built by scatter-adds over observations, and the correction
  :math:`\sum_l H_{B,l} H_{AA,l}^{-1} H_{l,B}` is a scatter-add over the *pairs of pairs*
  sharing a level of A (:math:`\sum_l n_{\text{pairs}}(l)^2` products); when those are
  nearly dense the same sum is one matrix product instead. The index maps depend only on
  the layout and the observations, so they are computed once per problem
  (:class:`SchurMaps`). The cost of a factorisation is :math:`O(\dim(B)^3)` for :math:`S`
  plus the scatter-adds, instead of :math:`O(D^3)`; with InstEval's crossed students and
  lecturers (:math:`D = 4100`) :math:`\dim(B) = 1129`.

A third, :class:`ConditionalFactor`, holds only what the results ask of the factor of a
linear Gaussian model fitted by its profiled objective (the diagonal blocks of
:math:`H^{-1}` and, under REML, the covariance of :math:`\hat\beta`), so that the results
need not search the modes and factorise again.

Everything is differentiable with torch autograd (the approximations differentiate
``half_logdet`` of the factor at the one-step-corrected mode) and vectorised over levels.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np
import torch

from ngmm_formula.layout import SchurMaps, Split, pairs_of_pairs

__all__ = ["ConditionalFactor", "DenseFactor", "Factor", "SchurFactor", "SchurMaps", "Split",
           "cholesky"]


def cholesky(H: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Batched lower Cholesky factor of (..., D, D) and whether every matrix is positive
    definite; a square root for D = 1 (far cheaper than LAPACK's batched call)."""
    if H.shape[-1] == 1:
        ok = bool((H > 0).all())
        return torch.sqrt(H.clamp_min(1e-300)), ok
    L, info = torch.linalg.cholesky_ex(H)
    return L, bool((info == 0).all())


def _chol_inverse(L: torch.Tensor) -> torch.Tensor:
    """:math:`(L L^\\top)^{-1}` of a batch (..., q, q) of lower Cholesky factors."""
    if L.shape[-1] == 1:
        return 1.0 / (L * L)
    return torch.cholesky_inverse(L)


def _half_logdet(L: torch.Tensor) -> torch.Tensor:
    """:math:`\\tfrac12 \\log|L L^\\top| = \\sum_d \\log L_{dd}` over the last two axes."""
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


class _HalfLogdet(torch.autograd.Function):
    r""":math:`\tfrac12 \log|S|` from :math:`S` and its (detached) Cholesky factor
    :math:`L`, with the gradient :math:`\tfrac12 S^{-1}` by one ``cholesky_inverse``: about a
    third of the work of differentiating through the Cholesky factorisation (two triangular
    solves with a full right-hand side and a product), which dominated a crossed fit."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, S: torch.Tensor,  # type: ignore[override]
                L: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(L)
        return _half_logdet(L)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (L,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * 0.5 * torch.cholesky_inverse(L), None


class Factor(abc.ABC):
    """A factorisation of the negative Hessian of every block (see the module docstring).

    Attributes
    ----------
    ok : bool
        Whether every block was positive definite (a failed factor holds garbage).
    """

    ok: bool

    @abc.abstractmethod
    def half_logdet(self) -> torch.Tensor:
        r""":math:`\tfrac12 \log|H_b|` of every block, shape (n_blocks,)."""

    @abc.abstractmethod
    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """:math:`H_b^{-1} g_b` for ``g`` of shape (n_blocks, D)."""

    @abc.abstractmethod
    def inverse_blocks(self, coords: torch.Tensor, given: torch.Tensor | None = None
                       ) -> torch.Tensor:
        r"""Diagonal blocks of :math:`H^{-1}`, the conditional covariance of :math:`v`.

        Parameters
        ----------
        coords : LongTensor, shape (G, k)
            Each row lists k coordinates of one block, as indices into the flattened
            (n_blocks * D) coordinate vector.
        given : LongTensor, optional
            Coordinates (within a block) to condition on: the blocks of
            :math:`(H_{-g,-g})^{-1}`, the inverse of :math:`H` without those rows and
            columns (lme4's conditional variances of :math:`u` at fixed :math:`\hat\beta`
            under REML).

        Returns
        -------
        Tensor, shape (G, k, k)
        """

    @abc.abstractmethod
    def detach(self) -> Factor:
        """The same factor without autograd history (for the Newton steps)."""


@dataclass
class DenseFactor(Factor):
    """Batched dense Cholesky factors ``chol`` (n_blocks, D, D), :math:`H_b = R_b R_b^\\top`."""

    chol: torch.Tensor
    ok: bool
    # the inverse by conditioning set (make_result asks once per term)
    _inverses: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False,
                                                           compare=False)

    @classmethod
    def of(cls, H: torch.Tensor) -> DenseFactor:
        L, ok = cholesky(H)
        return cls(L, ok)

    def half_logdet(self) -> torch.Tensor:
        return _half_logdet(self.chol)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(g.unsqueeze(-1), self.chol).squeeze(-1)

    def scale_nodes(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`R_b^{-\top} t_k` for nodes ``t`` (K, D): shape (n_blocks, D, K), the
        quadrature nodes of :mod:`~ngmm_formula.approx.adaptive` in the block's coordinates
        (:math:`R^{-\top} R^{-1} = H^{-1}`)."""
        n_blocks = self.chol.shape[0]
        return torch.linalg.solve_triangular(self.chol.transpose(-1, -2),
                                             t.T.expand(n_blocks, -1, -1), upper=True)

    def inverse_blocks(self, coords: torch.Tensor, given: torch.Tensor | None = None
                       ) -> torch.Tensor:
        D = self.chol.shape[-1]
        block, local = coords // D, coords % D
        key = () if given is None else tuple(int(i) for i in given.tolist())
        Hinv = self._inverses.get(key)
        if Hinv is None:
            if not key:
                Hinv = torch.cholesky_inverse(self.chol)
            else:
                assert given is not None
                keep = torch.ones(D, dtype=torch.bool, device=coords.device)
                keep[given] = False
                H = self.chol @ self.chol.transpose(-1, -2)
                Hinv = torch.zeros_like(H)
                kk = torch.nonzero(keep).squeeze(-1)
                Hinv[:, kk[:, None], kk[None, :]] = torch.linalg.inv(
                    H[:, kk[:, None], kk[None, :]])
            self._inverses[key] = Hinv
        b = block[:, 0]
        return Hinv[b[:, None, None], local[:, :, None], local[:, None, :]]

    def detach(self) -> DenseFactor:
        return DenseFactor(self.chol.detach(), self.ok)


@dataclass
class SchurFactor(Factor):
    r"""Block elimination of a joint block's :math:`H` over the split :math:`(A, B)`.

    Attributes
    ----------
    maps : SchurMaps
    chol_aa : Tensor, shape (n_levels, q, q)
        Cholesky factors of the diagonal blocks of :math:`H_{AA}`.
    h_ab : Tensor, shape (n_pairs, q)
        :math:`H_{AB}` on the pairs.
    m_ab : Tensor, shape (n_pairs, q)
        :math:`M = H_{AA}^{-1} H_{AB}` on the pairs.
    chol_s : Tensor, shape (dim_B, dim_B)
        Cholesky factor of the Schur complement :math:`S`.
    ok : bool
    schur : Tensor, shape (dim_B, dim_B)
        :math:`S` itself (its log-determinant is differentiated through it, see
        :class:`_HalfLogdet`).
    """

    maps: SchurMaps
    chol_aa: torch.Tensor
    h_ab: torch.Tensor
    m_ab: torch.Tensor
    chol_s: torch.Tensor
    ok: bool
    schur: torch.Tensor
    # inverse blocks already computed, by conditioning set (make_result asks once per term)
    _inverses: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, W: torch.Tensor, C: torch.Tensor, prior: torch.Tensor, maps: SchurMaps,
           jitter: float = 0.0) -> SchurFactor:
        """Factor :math:`H = C^\\top \\operatorname{diag}(W) C + \\operatorname{diag}(\\pi)
        (+ \\text{jitter}\\, I)` of the single joint block.

        ``W`` (n,) are the curvature weights, ``C`` (n, S) the slot values, ``prior`` (D,)
        the prior precisions :math:`\\pi`.
        """
        sp = maps.split
        n_a, q, dim_b = sp.n_levels, sp.q, sp.dim_b
        CA = C[:, sp.a_slots]
        CB = C[:, sp.b_slots]
        WA = W[:, None] * CA
        h_aa = C.new_zeros(n_a * q * q).index_add(
            0, maps.aa_index.reshape(-1), (WA[:, :, None] * CA[:, None, :]).reshape(-1))
        h_aa = h_aa.reshape(n_a, q, q) + torch.diag_embed(prior[sp.a_coords] + jitter)
        h_ab = C.new_zeros(maps.n_pairs * q).index_add(
            0, maps.ab_index.reshape(-1), (WA[:, :, None] * CB[:, None, :]).reshape(-1))
        h_ab = h_ab.reshape(maps.n_pairs, q)
        h_bb = C.new_zeros(dim_b * dim_b).index_add(
            0, maps.bb_index.reshape(-1),
            ((W[:, None] * CB)[:, :, None] * CB[:, None, :]).reshape(-1))
        h_bb = h_bb.reshape(dim_b, dim_b) + torch.diag(prior[sp.b_coords] + jitter)
        chol_aa, ok_a = cholesky(h_aa)
        aa_inv = _chol_inverse(chol_aa)  # (n_a, q, q)
        if q == 1:  # scalar blocks (random intercepts): elementwise, no batched matmul
            m_ab = aa_inv.reshape(-1)[maps.pair_level, None] * h_ab
        else:
            m_ab = (aa_inv[maps.pair_level] @ h_ab.unsqueeze(-1)).squeeze(-1)
        if maps.dense_correction:
            dense_h = C.new_zeros(n_a, dim_b, q).index_put(
                (maps.pair_level, maps.pair_b), h_ab)
            dense_m = C.new_zeros(n_a, dim_b, q).index_put(
                (maps.pair_level, maps.pair_b), m_ab)
            hb = dense_h.transpose(1, 2).reshape(n_a * q, dim_b)
            correction = hb.T @ dense_m.transpose(1, 2).reshape(n_a * q, dim_b)
        else:
            assert maps.left is not None and maps.right is not None
            assert maps.pp_index is not None
            # sum_{p<r} x_pr (E_pr + E_rp) + sum_p x_pp E_pp, x_pr = H_AB,p' M_r
            if q == 1:
                prods = h_ab[:, 0][maps.left] * m_ab[:, 0][maps.right]
            else:
                prods = (h_ab[maps.left] * m_ab[maps.right]).sum(-1)
            upper = C.new_zeros(dim_b * dim_b).index_add(0, maps.pp_index, prods)
            upper = upper.reshape(dim_b, dim_b)
            diag = C.new_zeros(dim_b * dim_b).index_add(0, maps.diag_index,
                                                        (h_ab * m_ab).sum(-1))
            correction = upper + upper.T + diag.reshape(dim_b, dim_b)
        S = h_bb - correction
        if dim_b:
            chol_s, ok_s = cholesky(S)
        else:
            chol_s, ok_s = S, True
        return cls(maps, chol_aa, h_ab, m_ab, chol_s, ok_a and ok_s, S)

    def half_logdet(self) -> torch.Tensor:
        logdet_s = (_HalfLogdet.apply(self.schur, self.chol_s.detach()) if self.maps.split.dim_b
                    else self.schur.new_zeros(()))
        return (_half_logdet(self.chol_aa).sum() + logdet_s).reshape(1)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        sp, mp = self.maps.split, self.maps
        flat = g.reshape(-1)
        g_a = flat[sp.a_coords]  # (n_a, q)
        g_b = flat[sp.b_coords]
        y_a = (_chol_inverse(self.chol_aa) @ g_a.unsqueeze(-1)).squeeze(-1)
        # r_B = g_B - H_BA H_AA^{-1} g_A = g_B - sum_p [b_p = b] M_p . g_A[l_p]
        r_b = g_b.index_add(0, mp.pair_b, -(self.m_ab * g_a[mp.pair_level]).sum(-1))
        x_b = (torch.cholesky_solve(r_b[:, None], self.chol_s).squeeze(-1) if sp.dim_b
               else r_b)
        # x_A = H_AA^{-1} g_A - sum_p [l_p = l] M_p x_B[b_p]
        x_a = y_a.index_add(0, mp.pair_level, -self.m_ab * x_b[mp.pair_b][:, None])
        out = g.new_zeros(sp.dim)
        out = out.index_put((sp.a_coords.reshape(-1),), x_a.reshape(-1))
        out = out.index_put((sp.b_coords,), x_b)
        return out.reshape(1, -1)

    def _inverses_given(self, given: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The diagonal blocks :math:`(H^{-1})_{AA,l}` of every level (n_levels, q, q) and
        :math:`(H^{-1})_{BB} = S^{-1}` (dim_B, dim_B), computed once per conditioning set.

        With the coordinates ``given`` (of B) conditioned on, the same blocks of the inverse
        of :math:`H` without those rows and columns: the Schur complement of :math:`H_{AA}`
        there is :math:`S` without them, whose inverse is padded with zeros.
        """
        key = () if given is None else tuple(int(i) for i in given.tolist())
        if key in self._inverses:
            return self._inverses[key]
        sp, mp = self.maps.split, self.maps
        level_of, local_of = sp.coord_maps
        if not key:
            s_inv = torch.cholesky_inverse(self.chol_s) if sp.dim_b else self.chol_s
        else:
            assert given is not None
            if bool((level_of[given] >= 0).any()):
                raise ValueError("conditioning is only supported on coordinates of B")
            keep = torch.ones(sp.dim_b, dtype=torch.bool, device=given.device)
            keep[local_of[given]] = False
            kk = torch.nonzero(keep).squeeze(-1)
            s_inv = torch.zeros_like(self.schur)
            if kk.numel():
                s_inv[kk[:, None], kk[None, :]] = torch.cholesky_inverse(
                    torch.linalg.cholesky(self.schur[kk[:, None], kk[None, :]]))
        # (H^{-1})_{AA,l} = H_AA,l^{-1} + sum_{p, r at level l} M_p S^{-1}[b_p, b_r] M_r'
        v_aa = _chol_inverse(self.chol_aa)
        if sp.dim_b and mp.dense_correction:
            dense_m = s_inv.new_zeros(sp.n_levels, sp.dim_b, sp.q).index_put(
                (mp.pair_level, mp.pair_b), self.m_ab)  # M_l' per level
            v_aa = v_aa + (dense_m.transpose(1, 2) @ s_inv) @ dense_m
        elif sp.dim_b:
            left, right = pairs_of_pairs(mp.pair_level, sp.n_levels)
            w = s_inv[mp.pair_b[left], mp.pair_b[right]]
            vals = w[:, None, None] * self.m_ab[left][:, :, None] * self.m_ab[right][:, None, :]
            v_aa = v_aa.index_add(0, mp.pair_level[left], vals)
        self._inverses[key] = (v_aa, s_inv)
        return v_aa, s_inv

    def inverse_blocks(self, coords: torch.Tensor, given: torch.Tensor | None = None
                       ) -> torch.Tensor:
        sp = self.maps.split
        if bool((coords >= sp.dim).any()):
            raise ValueError("a joint layout has a single block")
        level_of, local_of = sp.coord_maps
        lev, loc = level_of[coords], local_of[coords]
        in_a = lev >= 0
        rows_a = in_a.all(-1)
        rows_b = (~in_a).all(-1)
        if bool((~(rows_a | rows_b)).any()):
            raise ValueError("each row of coords must lie entirely in A or in B")
        if bool(rows_a.any()) and bool((lev[rows_a] != lev[rows_a][:, :1]).any()):
            raise ValueError("each row of coords in A must lie in one level")
        v_aa, s_inv = self._inverses_given(given)
        out = s_inv.new_zeros(coords.shape + coords.shape[-1:])
        lb = loc[rows_b]
        out[rows_b] = s_inv[lb[:, :, None], lb[:, None, :]]
        la, ca = lev[rows_a][:, 0], loc[rows_a]
        out[rows_a] = v_aa[la[:, None, None], ca[:, :, None], ca[:, None, :]]
        return out

    def detach(self) -> SchurFactor:
        return SchurFactor(self.maps, self.chol_aa.detach(), self.h_ab.detach(),
                           self.m_ab.detach(), self.chol_s.detach(), self.ok,
                           self.schur.detach())


class ConditionalFactor(Factor):
    r"""The parts of the factor of the whole problem's :math:`H` that the results ask for
    (:meth:`inverse_blocks`): the diagonal blocks of :math:`H_\theta^{-1}` (the
    conditional covariance of :math:`v`, given :math:`\hat\beta` under REML) and, under
    REML, the :math:`\beta` block of the joint inverse, :math:`\hat\sigma^2 (R_X^\top
    R_X)^{-1}`. Not for evaluating the objective (:meth:`half_logdet` and :meth:`solve`
    raise)."""

    def __init__(self, blocks: list[np.ndarray], q: tuple[int, ...], n_levels: tuple[int, ...],
                 cov_beta: np.ndarray, reml: bool):
        self.blocks = blocks
        self.ok = True
        self.cov_beta = cov_beta
        self.reml = reml
        dim_u = int(sum(k * m for k, m in zip(q, n_levels)))
        self.dim_u = dim_u
        # per u coordinate: its term, level and column
        self.term = np.repeat(np.arange(len(q)), [k * m for k, m in zip(q, n_levels)])
        offs = np.cumsum([0, *[k * m for k, m in zip(q, n_levels)][:-1]])
        qq = np.asarray(q)[self.term]
        local = np.arange(dim_u) - offs[self.term]
        self.level, self.col = local // qq, local % qq

    def half_logdet(self) -> torch.Tensor:
        raise NotImplementedError("ConditionalFactor only gives inverse blocks")

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ConditionalFactor only gives inverse blocks")

    def detach(self) -> ConditionalFactor:
        return self

    def inverse_blocks(self, coords: torch.Tensor, given: torch.Tensor | None = None
                       ) -> torch.Tensor:
        c = coords.cpu().numpy()
        p = self.cov_beta.shape[0]
        if self.reml and c.size and bool((c >= self.dim_u).all()):
            if given is not None and given.numel():
                raise ValueError("the beta block is available unconditionally only")
            b = c - self.dim_u
            return torch.as_tensor(self.cov_beta[b[:, :, None], b[:, None, :]])
        if bool((c >= self.dim_u).any()):
            raise ValueError("each row of coords must lie in the random effects or in beta")
        if self.reml and (given is None or given.numel() != p):
            raise ValueError("random-effect blocks are available given beta only (REML)")
        term, level, col = self.term[c], self.level[c], self.col[c]
        if bool((term != term[:, :1]).any() or (level != level[:, :1]).any()):
            raise ValueError("each row of coords must lie in one level of one term")
        out = np.empty(c.shape + c.shape[-1:])
        for k, V in enumerate(self.blocks):
            rows = term[:, 0] == k
            if rows.any():
                lv, cc = level[rows, 0], col[rows]
                out[rows] = V[lv[:, None, None], cc[:, :, None], cc[:, None, :]]
        return torch.as_tensor(out)
