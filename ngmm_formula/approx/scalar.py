r"""The Laplace approximation for one scalar random effect per group, fused for training.

The general route (:func:`~ngmm_formula.approx.conditional.find_mode` then
:func:`~ngmm_formula.approx.adaptive.log_marginal`) handles every layout and rule with
batched Cholesky factors, and lets autograd differentiate through a Newton step and the
observed curvature. For the commonest neural model, a random intercept per group
(``(1 | g)``) in a family without dispersion, a minibatch step of that route runs a few
hundred small tensor operations forward and backward; here the same quantity takes about
sixty, with the derivative written out.

For group :math:`b` with rows :math:`i`, :math:`e_i = \eta^{\text{fixed}}_i + c_i v` (``c``
the slot value :math:`z_i^\top\Lambda`, for a random intercept the SD :math:`\sigma_b`) and
:math:`\ell_i` the family's log-likelihood of row :math:`i`, the Laplace approximation of
:math:`\log\int e^{h_b(v)}dv` at the mode :math:`\hat v` of
:math:`h_b(v) = \sum_i \ell_i(e_i) - v^2/2 - \tfrac12\log 2\pi` is

.. math::

    L_b = \sum_i \ell_i(\hat e_i) - \tfrac12 \hat v^2 - \tfrac12 \log H_b, \qquad
    H_b = 1 - \sum_i \ell''_i c_i^2 ,

(the :math:`\tfrac12\log 2\pi` of the prior and of the Gaussian integral cancel). With
:math:`T_b = \sum_i \ell'''_i c_i^3 = -\partial H_b/\partial v`, the mode's implicit
derivatives :math:`\partial\hat v/\partial\eta^{\text{fixed}}_i = \ell''_i c_i / H_b` and
:math:`\partial\hat v/\partial c_i = (\ell'_i + \ell''_i c_i \hat v)/H_b`, and the
envelope theorem for the first two terms:

.. math::

    \frac{\partial L_b}{\partial \eta^{\text{fixed}}_i}
        = \ell'_i + \frac{\ell'''_i c_i^2 + T_b \ell''_i c_i / H_b}{2 H_b}, \qquad
    \frac{\partial L_b}{\partial c_i}
        = \hat v\,\frac{\partial L_b}{\partial \eta^{\text{fixed}}_i}
          + \frac{\ell''_i c_i + T_b \ell'_i / (2 H_b)}{H_b}.

These are the derivatives the general route computes by autograd (it makes the mode
differentiable by one Newton step: the implicit-function derivative), written out;
:math:`\ell'''` is the family's :meth:`~ngmm_formula.families.Family.d3logp` (closed form
for the canonical links, autograd otherwise), so any link works.
``tests/approx/test_scalar.py`` checks value and gradient against the general route and
with ``torch.autograd.gradcheck``.

The mode is found much as the training step of the general route finds it: ``steps``
undamped Newton steps from the group's last mode, with the observed curvature (which the
families' :meth:`~ngmm_formula.families.Family.eta_derivatives` gives with the score from
one mean; Fisher scoring under a canonical link), and up to :data:`EXTRA_STEPS` more while
the last step still moves a mode by more than
:data:`~ngmm_formula.approx.conditional.FIXED_STEP_TOL`. When it still does, or a curvature
is not positive, :func:`scalar_laplace` returns None and the caller takes the general route
(with its damped search).
"""

from __future__ import annotations

from typing import Any

import torch

from ngmm_formula.approx.conditional import FIXED_STEP_TOL
from ngmm_formula.families import Family

__all__ = ["EXTRA_STEPS", "scalar_laplace"]

#: Newton steps taken beyond ``steps`` while the last one still moves a mode by more than
#: :data:`~ngmm_formula.approx.conditional.FIXED_STEP_TOL` (each costs a few passes over the
#: rows, far less than the general route's damped search that a failure falls back to).
EXTRA_STEPS = 4


def _group_sum(values: torch.Tensor, block: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return values.new_zeros(n_blocks).index_add_(0, block, values)


def scalar_laplace(family: Family, y: torch.Tensor, w: torch.Tensor, eta_fixed: torch.Tensor,
                   c: torch.Tensor, block: torch.Tensor, n_blocks: int, start: torch.Tensor,
                   steps: int, log_const: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Laplace log marginal likelihood of every group, differentiable in ``eta_fixed`` and
    ``c``, and the modes; None where the fixed Newton steps do not settle.

    Parameters
    ----------
    family : Family
        Without dispersion (:attr:`~ngmm_formula.families.Family.has_dispersion` False).
    y, w : Tensor, shape (n,)
        Responses and prior weights.
    eta_fixed : Tensor, shape (n,)
        The linear predictor without the random effect.
    c : Tensor, shape (n,)
        Each row's coefficient of its group's spherical effect :math:`v`.
    block : LongTensor, shape (n,)
        Each row's group, in ``0 .. n_blocks - 1``.
    n_blocks : int
    start : Tensor, shape (n_blocks,)
        The modes' warm start.
    steps : int
        Undamped Fisher-scoring steps from ``start``.
    log_const : Tensor, shape (n,), optional
        The family's data constant per row, added to the value.

    Returns
    -------
    (log_marginal, mode, curvature) : tuple of Tensor, each of shape (n_blocks,)
        ``mode`` and ``curvature`` (the Fisher :math:`H_b` of the last Newton step) detached;
        or None (see the module docstring).
    """
    if family.has_dispersion:
        raise ValueError("the fused scalar Laplace is for families without dispersion")
    with torch.no_grad():
        ef, cd = eta_fixed.detach(), c.detach()
        c2 = cd * cd
        v = start.detach().reshape(-1)
        move, H = float("inf"), v
        for taken in range(1, steps + EXTRA_STEPS + 1):
            d1, d2 = family.eta_derivatives(y, ef + cd * v.index_select(0, block), None, w)
            H = 1.0 - _group_sum(d2 * c2, block, n_blocks)
            step = (_group_sum(d1 * cd, block, n_blocks) - v) / H
            v = v + step
            move = float(step.abs().max()) if step.numel() else 0.0
            if taken >= steps and not move > FIXED_STEP_TOL:  # NaN goes on, then fails
                break
        # a curvature <= 0 (a family that is not log-concave) gives a NaN move
        if not move <= FIXED_STEP_TOL or not bool((H > 0).all()):
            return None
    value = _ScalarLaplace.apply(eta_fixed, c, v, y, w, block, n_blocks, family, log_const)
    if not bool(torch.isfinite(value).all()):
        return None
    return value, v, H


class _ScalarLaplace(torch.autograd.Function):
    """:math:`L_b` at the given mode and its derivative (module docstring)."""

    @staticmethod
    def forward(ctx: Any, eta_fixed: torch.Tensor, c: torch.Tensor, v: torch.Tensor,
                y: torch.Tensor, w: torch.Tensor, block: torch.Tensor, n_blocks: int,
                family: Family, log_const: torch.Tensor | None) -> torch.Tensor:
        eta = eta_fixed + c * v.index_select(0, block)
        d1, d2 = family.eta_derivatives(y, eta, None, w)
        H = 1.0 - _group_sum(d2 * c * c, block, n_blocks)
        ll = family.log_kernel(y, eta, None, w)
        if log_const is not None:
            ll = ll + log_const
        value = _group_sum(ll, block, n_blocks) - 0.5 * v * v - 0.5 * torch.log(H)
        ctx.save_for_backward(eta, c, v, y, w, block, d1, d2, H)
        ctx.family, ctx.n_blocks = family, n_blocks
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        eta, c, v, y, w, block, d1, d2, H = ctx.saved_tensors
        d3 = ctx.family.d3logp(y, eta, None, w)
        c2 = c * c
        T = _group_sum(d3 * c2 * c, block, ctx.n_blocks)
        scale = grad / H  # dL/dvalue / H_b per group
        s_obs, TH_obs = scale.index_select(0, block), (T / H).index_select(0, block)
        # dL/d eta_fixed = grad_b (d1 + (d3 c^2 + T d2 c / H) / (2 H))
        d_eta = grad.index_select(0, block) * d1 + 0.5 * s_obs * (d3 * c2 + TH_obs * d2 * c)
        d_c = None
        if ctx.needs_input_grad[1]:
            d_c = v.index_select(0, block) * d_eta + s_obs * (d2 * c + 0.5 * TH_obs * d1)
        return d_eta, d_c, None, None, None, None, None, None, None
