r"""Laplace and adaptive quadrature for one scalar random effect per group, fused.

The general route (:func:`~ngmm_formula.approx.conditional.find_mode` then
:func:`~ngmm_formula.approx.adaptive.log_marginal`) handles every layout and rule with
batched Cholesky factors, and lets autograd differentiate through a Newton step and the
observed curvature. For the commonest models, one random intercept (or one scalar term) per
group in a family without dispersion (binomial, Poisson, any link), the same quantity is
computed here as one autograd Function with its derivative written out: a minibatch step
of a neural fit, or a Laplace evaluation of a linear GLMM, then runs a fraction of the
small tensor operations (``benchmarks/neural_epoch.py``). The Function takes any
one-dimensional rule, and :class:`~ngmm_formula.fit.Objective` routes every one of them
through it (its ``_scalar_blocks`` gives the timings against the general route). A linear
fit's outer optimiser finds the modes here too, from the last evaluation's (:func:`scalar_modes`
with ``settle`` = :data:`~ngmm_formula.approx.conditional.FIXED_STEP_TOL` squared).

For group :math:`b` with rows :math:`i`, :math:`e_i = \eta^{\text{fixed}}_i + c_i v` (``c``
the slot value :math:`z_i^\top\Lambda`, for a random intercept the SD :math:`\sigma_b`),
:math:`\ell_i` the family's log-likelihood of row :math:`i` and
:math:`h(v) = \sum_i \ell_i(e_i) - v^2/2 - \tfrac12\log 2\pi`, mode :math:`\hat v`,
curvature :math:`H = 1 - \sum_i \ell''_i c_i^2` there and :math:`s = H^{-1/2}`, the rule
with nodes :math:`t_k` and log weights :math:`\log\omega_k` (one node at 0: Laplace) gives

.. math::

    L_b = -\tfrac12\log H + \operatorname{logsumexp}_k a_k, \qquad
    a_k = \log\omega_k + \sum_i \ell_i(e_{ik}) - \tfrac12 v_k^2 + \tfrac12 t_k^2, \quad
    v_k = \hat v + t_k s, \; e_{ik} = e_i + c_i t_k s

(the :math:`\tfrac12\log 2\pi` of the prior and of the change of variables cancel), as
:mod:`~ngmm_formula.approx.adaptive` does. Its derivative in :math:`\psi \in
\{\eta^{\text{fixed}}_i, c_i\}`, with :math:`\pi_k` the softmax of :math:`a_k`,
:math:`h'_k = \sum_i \ell'_i(e_{ik}) c_i - v_k`, :math:`G_1 = \sum_k \pi_k h'_k`,
:math:`G_2 = \sum_k \pi_k h'_k t_k`, is

.. math::

    \frac{dL_b}{d\psi} = \sum_k \pi_k \frac{\partial h(v_k)}{\partial\psi}
        + G_1 \frac{d\hat v}{d\psi}
        - \Bigl(\frac{1}{2H} + \frac{G_2}{2 H^{3/2}}\Bigr) \frac{dH}{d\psi},

with the mode's implicit derivatives :math:`d\hat v/d\eta^{\text{fixed}}_i = \ell''_i c_i/H`,
:math:`d\hat v/dc_i = (\ell'_i + \ell''_i c_i \hat v)/H`, and, with
:math:`T = \sum_i \ell'''_i c_i^3 = -\partial H/\partial v`,
:math:`dH/d\eta^{\text{fixed}}_i = -\ell'''_i c_i^2 - T\, d\hat v/d\eta^{\text{fixed}}_i`,
:math:`dH/dc_i = -\ell'''_i c_i^2 \hat v - 2\ell''_i c_i - T\, d\hat v/dc_i`
(:math:`\ell', \ell'', \ell'''` at :math:`e_i`; the family's
:meth:`~ngmm_formula.families.Family.d3logp` is closed form for the canonical links,
autograd otherwise). These are the derivatives the general route computes by autograd (it
makes the mode differentiable by one Newton step: the implicit-function derivative), written
out; ``tests/approx/test_scalar.py`` checks value and gradient against the general route and
with ``torch.autograd.gradcheck``.

Training steps find the modes with :func:`scalar_modes`: ``steps`` undamped Newton steps
from the group's last mode, with the observed curvature (which the families'
:meth:`~ngmm_formula.families.Family.eta_derivatives` gives with the score from one mean;
Fisher scoring under a canonical link), and up to :data:`EXTRA_STEPS` more while the last
step still moves a mode by more than
:data:`~ngmm_formula.approx.conditional.FIXED_STEP_TOL` (Newton's error is then about its
square, 1e-6: the value, stationary at the mode, is within about 1e-12, and its derivative
within about 1e-6 of the exact mode's, far below a minibatch gradient's noise; the general
route's fixed steps accept the same). Until 2026-12-07 the steps went on to a move of
1e-6 (a mode within 1e-12): 3.9 steps per minibatch against 3.2 now (10 epochs at 10^5
rows). When the last move is still above the tolerance, or a
curvature is not positive, the caller takes the general route
(with its damped search); likewise :func:`scalar_log_marginal` returns None where a
curvature is not positive (the general route then uses the expected one).
"""

from __future__ import annotations

from typing import Any

import torch

from ngmm_formula.approx.conditional import FIXED_STEP_TOL
from ngmm_formula.approx.rules import Rule
from ngmm_formula.families import Family
from ngmm_formula.layout import sum_rows

__all__ = ["EXTRA_STEPS", "scalar_log_marginal", "scalar_modes"]

#: Newton steps taken beyond ``steps`` while the last one still moves a mode by more than
#: :func:`scalar_modes`'s ``settle`` (each costs a few passes over the rows, far less than the
#: general route's damped search that a failure falls back to).
EXTRA_STEPS = 4


def _no_dispersion(family: Family) -> None:
    if family.has_dispersion:
        raise ValueError("the fused scalar integrals are for families without dispersion")


def scalar_modes(family: Family, y: torch.Tensor, w: torch.Tensor, eta_fixed: torch.Tensor,
                 c: torch.Tensor, block: torch.Tensor, n_blocks: int, start: torch.Tensor,
                 steps: int, *, settle: float = FIXED_STEP_TOL,
                 offsets: torch.Tensor | None = None) -> torch.Tensor | None:
    """The modes of every group by undamped Newton steps from ``start`` (detached), or None
    where they do not settle (module docstring).

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
        Newton steps from ``start`` (up to :data:`EXTRA_STEPS` more while unsettled).
    settle : float
        The largest last move that is accepted: the steps stop once one moves no mode by
        more (after ``steps``), and None is returned when the last still does. The training
        steps' :data:`~ngmm_formula.approx.conditional.FIXED_STEP_TOL` leaves a mode within
        about 1e-6; a linear fit's outer optimiser asks for its square, about 1e-12.
    offsets : LongTensor, shape (n_blocks + 1,), optional
        With ``block`` non-decreasing, where each group's rows begin and end
        (:attr:`~ngmm_formula.layout.Blocks.row_offsets`): the sums over a group's rows are
        segment sums (:func:`~ngmm_formula.layout.sum_rows`; the same values).

    Returns
    -------
    Tensor, shape (n_blocks,), or None
    """
    _no_dispersion(family)
    with torch.no_grad():
        ef, cd = eta_fixed.detach(), c.detach()
        c2 = cd * cd
        v = start.detach().reshape(-1)
        move, H = float("inf"), torch.ones_like(v)  # both set by the first step
        for taken in range(1, max(steps, 1) + EXTRA_STEPS + 1):
            d1, d2 = family.eta_derivatives(y, ef + cd * v.index_select(0, block), None, w)
            H = 1.0 - sum_rows(d2 * c2, block, n_blocks, offsets)
            step = (sum_rows(d1 * cd, block, n_blocks, offsets) - v) / H
            v = v + step
            move = float(step.abs().max()) if step.numel() else 0.0
            # Newton's error after a step is about the square of the step (times
            # |h'''| / 2H, of order 1): a last move within settle leaves the mode within
            # about settle ** 2 (training's 1e-3: 1e-6, where the value, stationary in v, is
            # within ~1e-12 and the derivative, exact at the mode, within ~1e-6 relative;
            # the general route's fixed steps accept the same)
            if taken >= steps and not move > settle:  # NaN goes on, then fails
                break
        # a curvature <= 0 (a family that is not log-concave) gives a NaN move
        if not move <= settle or not bool((H > 0).all()):
            return None
    return v


def scalar_log_marginal(family: Family, y: torch.Tensor, w: torch.Tensor,
                        eta_fixed: torch.Tensor, c: torch.Tensor, block: torch.Tensor,
                        n_blocks: int, mode: torch.Tensor, rule: Rule,
                        log_const: torch.Tensor | None = None,
                        offsets: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:math:`L_b` of every group under ``rule`` centred at ``mode``, differentiable in
    ``eta_fixed`` and ``c``, and the curvature :math:`H_b` (detached); None where a
    curvature is not positive.

    Parameters
    ----------
    family, y, w, eta_fixed, c, block, n_blocks, offsets
        As :func:`scalar_modes`.
    mode : Tensor, shape (n_blocks,)
        The modes :math:`\\hat v` (detached).
    rule : Rule
        One-dimensional nodes and log weights (:mod:`~ngmm_formula.approx.rules`).
    log_const : Tensor, shape (n,), optional
        The family's data constant per row, added to the value.
    """
    _no_dispersion(family)
    t, logw = rule.tensors(eta_fixed.dtype, eta_fixed.device)
    value, H = _ScalarQuadrature.apply(eta_fixed, c, mode.detach().reshape(-1), t[:, 0], logw,
                                       y, w, block, n_blocks, offsets, family)
    if not bool(torch.isfinite(value).all()):
        return None
    if log_const is not None:
        value = value + sum_rows(log_const, block, n_blocks, offsets)
    return value, H


class _ScalarQuadrature(torch.autograd.Function):
    """:math:`L_b` and its derivative (module docstring)."""

    @staticmethod
    def forward(ctx: Any, eta_fixed: torch.Tensor, c: torch.Tensor, v: torch.Tensor,
                t: torch.Tensor, logw: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                block: torch.Tensor, n_blocks: int, offsets: torch.Tensor | None,
                family: Family) -> tuple[torch.Tensor, torch.Tensor]:
        eta = eta_fixed + c * v.index_select(0, block)
        d1, d2 = family.eta_derivatives(y, eta, None, w)
        H = 1.0 - sum_rows(d2 * c * c, block, n_blocks, offsets)
        s = H.rsqrt()
        laplace = t.numel() == 1 and not bool(t.any())
        if laplace:  # one node at the mode: no (n, K) temporaries
            eta_k = eta.unsqueeze(-1)
            v_k = v.unsqueeze(-1)
        else:
            ts = s.unsqueeze(-1) * t  # (n_blocks, K)
            eta_k = eta.unsqueeze(-1) + c.unsqueeze(-1) * ts.index_select(0, block)
            v_k = v.unsqueeze(-1) + ts
        ll = sum_rows(family.log_kernel(y.unsqueeze(-1), eta_k, None, w.unsqueeze(-1)),
                      block, n_blocks, offsets)
        a = logw + ll - 0.5 * v_k * v_k + 0.5 * t * t
        # one node: the log-sum-exp of one term is the term (the same bits)
        value = (a[:, 0] if laplace else torch.logsumexp(a, dim=-1)) - 0.5 * torch.log(H)
        ctx.save_for_backward(eta, c, v, t, y, w, block, d1, d2, H, eta_k, v_k, a)
        ctx.family, ctx.n_blocks, ctx.offsets, ctx.laplace = family, n_blocks, offsets, laplace
        ctx.mark_non_differentiable(H)
        return value, H

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_H: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        eta, c, v, t, y, w, block, d1, d2, H, eta_k, v_k, a = ctx.saved_tensors
        family, n_blocks, offsets = ctx.family, ctx.n_blocks, ctx.offsets

        def rows(x: torch.Tensor) -> torch.Tensor:  # per group -> per row
            return x.index_select(0, block)

        if ctx.laplace:  # one node, pi = 1 and t = 0: G1 = h'(v), G2 = 0, P = l'(e)
            G1, P, pd = sum_rows(d1 * c, block, n_blocks, offsets) - v, d1, None
            Q = 0.5 / H
        else:
            pi = torch.softmax(a, dim=-1)  # (n_blocks, K)
            # the score at every node, weighted by the node's share: pd[i, k] = pi_k l'_i(e_ik)
            d1_k = family.dlogp(y.unsqueeze(-1), eta_k, None, w.unsqueeze(-1))
            if not bool(torch.isfinite(a).all()):
                # a node outside the family's support has weight 0 (and no finite score)
                d1_k = torch.where(torch.isfinite(d1_k) & (rows(pi) > 0), d1_k, 0.0)
            pd = rows(pi) * d1_k
            h1 = sum_rows(d1_k * c.unsqueeze(-1), block, n_blocks, offsets) - v_k  # h'(v_k)
            G1, G2 = (pi * h1).sum(-1), (pi * h1 * t).sum(-1)
            P = pd.sum(-1)  # sum_k pi_k l'_i(e_ik)
            Q = 0.5 / H + 0.5 * G2 * H.pow(-1.5)
        d3 = family.d3logp(y, eta, None, w)
        c2 = c * c
        T = sum_rows(d3 * c2 * c, block, n_blocks, offsets)
        H_r, T_r, G1_r = rows(H), rows(T), rows(G1)
        Q_r = rows(Q)
        g_r = rows(grad)
        dv_de = d2 * c / H_r
        dH_de = -d3 * c2 - T_r * dv_de
        d_eta = g_r * (P + G1_r * dv_de - Q_r * dH_de)
        d_c = None
        if ctx.needs_input_grad[1]:
            v_r = rows(v)
            dv_dc = (d1 + d2 * c * v_r) / H_r
            dH_dc = -d3 * c2 * v_r - 2.0 * d2 * c - T_r * dv_dc
            # sum_k pi_k l'_i(e_ik) v_k, with v_k = v + t_k s
            R = v_r * P if pd is None else v_r * P + rows(H.rsqrt()) * (pd @ t)
            d_c = g_r * (R + G1_r * dv_dc - Q_r * dH_dc)
        return d_eta, d_c, None, None, None, None, None, None, None, None, None
