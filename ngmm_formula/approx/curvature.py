r"""The exact second derivatives of the Laplace approximation of per-group blocks.

For one block with rows :math:`i`, linear predictor
:math:`\eta_i = e_i + c_i^\top v` (:math:`e_i` the fixed part, :math:`c_i \in R^D` the row's
slot values placed at their coordinates), log-likelihood terms :math:`f_i(\eta_i)` with
derivatives :math:`f_i', \dots, f_i''''` and spherical prior, the Laplace approximation is

.. math::

    \ell = \sum_i f_i(\eta_i(\hat v)) - \tfrac12 \hat v^\top \hat v
           - \tfrac12 \log|A| + \text{const}, \qquad
    A = I + \sum_i w_i c_i c_i^\top,\; w_i = -f_i'',

at the mode :math:`\hat v` (:math:`\sum_i f_i' c_i = \hat v`). Its Hessian with respect to
the rows' *local coordinates* :math:`\psi_i = (e_i, c_i)` is the second derivative of the
Lagrangian :math:`\mathcal L = \ell(\psi, v) + \lambda^\top(\sum_i f_i' c_i - v)` along the
tangent of the mode, :math:`\delta v = R \sum_i (f_i'' \xi_i c_i + f_i' \delta c_i)`, with
:math:`R = A^{-1}`, :math:`\xi_i = \delta e_i + \hat v^\top \delta c_i`, and the adjoint
:math:`\lambda = R a`, :math:`a = \tfrac12 \sum_i f_i''' h_i c_i`, :math:`h_i = c_i^\top R
c_i` (the derivative of :math:`-\frac12\log|A|` in :math:`v`). Written out, with
:math:`\dot\eta_i = \xi_i + c_i^\top\delta v` and :math:`\dot A = \sum_i [-f_i'''\dot\eta_i
c_i c_i^\top - f_i''(\delta c_i c_i^\top + c_i \delta c_i^\top)]`,

.. math::

    \delta\psi^\top \nabla^2\ell\,\delta\psi = \sum_i \bigl[\alpha_i \dot\eta_i^2
        + \beta_i\, \delta c_i^\top \delta v + \dot\eta_i\, g_i^\top \delta c_i
        + f_i''\, \delta c_i^\top R\, \delta c_i\bigr] - \delta v^\top \delta v
        + \tfrac12 \operatorname{tr}(R \dot A R \dot A),

    \alpha_i = f_i'' + \tfrac12 f_i'''' h_i + f_i''' \lambda^\top c_i, \quad
    \beta_i = 2 f_i' + f_i''' h_i + 2 f_i'' \lambda^\top c_i, \quad
    g_i = 2 f_i''' R c_i + 2 f_i'' \lambda.

Every term is a product of a row's own coordinates or of a few per-block sums of them
(:math:`\delta v`, the part of :math:`\dot A` without :math:`\delta v`, and the sum
:math:`m = \sum_i M_i \psi_i` of the terms that multiply :math:`\delta v`), so the Hessian of
a block is a row-diagonal part plus a part of rank at most :math:`r = 2D + D^2`:

.. math::

    \nabla^2_\psi \ell = \operatorname{blockdiag}_i(P_i) + Y^\top \Omega\, Y,
    \qquad Y = [Y_1, \dots, Y_n] \in R^{r \times n(1+D)}.

:func:`laplace_hessian_parts` returns :math:`P_i`, :math:`Y_i` and :math:`\Omega` of every
block; :func:`ngmm_formula.fit.laplace_hessian` maps them to the parameters. One pass over
the rows replaces the ``2 dim(x)`` gradient evaluations of finite differences. Checked
against finite differences of the exact gradient (``tests/test_laplace_hessian.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngmm_formula.approx.conditional import Blocks, block_sum, neg_hessian, random_part
from ngmm_formula.families import Family

__all__ = ["LaplaceHessianParts", "eta_derivatives_to_fourth", "laplace_hessian_parts"]


@dataclass
class LaplaceHessianParts:
    r"""The Hessian of the Laplace approximation of every block in the rows' local
    coordinates :math:`\psi_i = (e_i, c_{i1}, \dots, c_{iD})` (module docs).

    Attributes
    ----------
    row : Tensor, shape (n, 1 + D, 1 + D)
        :math:`P_i`, the row-diagonal part (symmetric).
    low_rank : Tensor, shape (n, r, 1 + D)
        :math:`Y_i`: row i's contribution to its block's r small coordinates.
    middle : Tensor, shape (n_blocks, r, r)
        :math:`\Omega_b` (symmetric).
    """

    row: torch.Tensor
    low_rank: torch.Tensor
    middle: torch.Tensor


def eta_derivatives_to_fourth(family: Family, y: torch.Tensor, eta: torch.Tensor,
                              w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:math:`f', f'', f''', f''''` of every row's log-likelihood in :math:`\\eta` (the
    last two by autograd on the family's :meth:`~ngmm_formula.families.Family.d2logp`)."""
    with torch.enable_grad():
        e = eta.detach().requires_grad_(True)
        f2 = family.d2logp(y, e, None, w)
        (f3,) = torch.autograd.grad(f2.sum(), e, create_graph=True)
        (f4,) = torch.autograd.grad(f3.sum(), e)
    return (family.dlogp(y, eta, None, w), f2.detach(), f3.detach(), f4)


def laplace_hessian_parts(family: Family, y: torch.Tensor, w: torch.Tensor,
                          eta_fixed: torch.Tensor, C: torch.Tensor, blocks: Blocks,
                          v: torch.Tensor) -> LaplaceHessianParts:
    r"""The parts of the Laplace approximation's Hessian (module docs) at the modes ``v``
    (n_blocks, D) of per-group blocks (no split, unit prior precisions), for a family
    without a dispersion parameter. Everything detached, in ``C``'s dtype."""
    n, D = C.shape[0], blocks.dim
    b = blocks.block_of_obs
    c = C.new_zeros(n, D).scatter_add_(1, blocks.slot_pos, C)  # c_i at its coordinates
    vb = v[b]
    eta = eta_fixed + random_part(C, v, blocks)
    f1, f2, f3, f4 = eta_derivatives_to_fourth(family, y, eta, w)
    eye = torch.eye(D, dtype=C.dtype, device=C.device)
    cc = c[:, :, None] * c[:, None, :]
    R = torch.cholesky_inverse(torch.linalg.cholesky(neg_hessian(-f2, C, blocks)))  # A^-1
    Rb = R[b]
    Rc = (Rb @ c[:, :, None])[..., 0]
    h = (c * Rc).sum(1)
    lam = (R @ block_sum(0.5 * (f3 * h)[:, None] * c, blocks)[:, :, None])[..., 0]
    lc = (lam[b] * c).sum(1)
    alpha = f2 + 0.5 * f4 * h + f3 * lc
    beta = 2 * f1 + f3 * h + 2 * f2 * lc
    g = 2 * f3[:, None] * Rc + 2 * f2[:, None] * lam[b]
    # xi_i = e_i + v'c_i: coordinates (xi, c) -> (e, c) by T_v
    Tv = torch.eye(1 + D, dtype=C.dtype, device=C.device).repeat(n, 1, 1)
    Tv[:, 0, 1:] = vb
    P = C.new_zeros(n, 1 + D, 1 + D)
    P[:, 0, 0] = alpha
    P[:, 0, 1:] = P[:, 1:, 0] = 0.5 * g
    P[:, 1:, 1:] = f2[:, None, None] * Rb
    P = Tv.transpose(1, 2) @ P @ Tv
    # the small coordinates: s (delta v = R s), m (multiplies delta v), vec of A's part
    r = 2 * D + D * D
    Y = C.new_zeros(n, r, 1 + D)
    Y[:, :D, 0] = f2[:, None] * c
    Y[:, :D, 1:] = f1[:, None, None] * eye
    Y[:, D:2 * D, 0] = 2 * alpha[:, None] * c
    Y[:, D:2 * D, 1:] = beta[:, None, None] * eye + c[:, :, None] * g[:, None, :]
    Y[:, 2 * D:, 0] = -(f3[:, None, None] * cc).reshape(n, D * D)
    # d(delta c c' + c delta c') / d delta c_k = e_k c' + c e_k'
    E = eye[None, :, :, None] * c[:, None, None, :] + c[:, None, :, None] * eye[None, :, None, :]
    Y[:, 2 * D:, 1:] = -(f2[:, None, None, None] * E).permute(0, 2, 3, 1).reshape(n, D * D, D)
    Y = Y @ Tv
    T = -block_sum(f3[:, None, None, None] * cc[:, :, :, None] * c[:, None, None, :], blocks)
    N = block_sum(alpha[:, None, None] * cc, blocks)
    B = R.shape[0]
    Om = C.new_zeros(B, r, r)
    Om[:, :D, D:2 * D] = Om[:, D:2 * D, :D] = 0.5 * R
    Om[:, :D, :D] = R @ (N - eye) @ R
    # vec(A_dot) = a + T~ R s; 1/2 tr(R A_dot R A_dot) = 1/2 vec' (R kron R) vec
    L = C.new_zeros(B, D * D, r)
    L[:, :, :D] = T.reshape(B, D * D, D) @ R
    L[:, :, 2 * D:] = torch.eye(D * D, dtype=C.dtype, device=C.device)
    K2 = (R[:, :, None, :, None] * R[:, None, :, None, :]).reshape(B, D * D, D * D)
    Om = Om + 0.5 * L.transpose(1, 2) @ K2 @ L
    return LaplaceHessianParts(row=P, low_rank=Y, middle=Om)
