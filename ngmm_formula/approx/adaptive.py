r"""Adaptive integration of each block: Laplace, Gauss--Hermite and the truncated rule.

For a block with log-integrand :math:`h(v)` (see :mod:`ngmm_formula.approx.conditional`), mode
:math:`\hat v` and :math:`H = -\nabla^2 h(\hat v) = R R^\top` (Cholesky), put
:math:`L = R^{-\top}` (so :math:`L L^\top = H^{-1}`) and substitute :math:`v = \hat v + L t`:

.. math::

    \log \int e^{h(v)} dv = \log|L| + \tfrac{D}{2}\log 2\pi
        + \log \int e^{h(\hat v + L t) + \|t\|^2/2}\, N(t; 0, I)\, dt
    \approx -\sum_d \log R_{dd} + \tfrac{D}{2}\log 2\pi
        + \operatorname{logsumexp}_k \bigl[\log\omega_k + h(\hat v + L t_k)
        + \|t_k\|^2/2\bigr].

With the one-node rule this is the Laplace approximation
:math:`h(\hat v) + \tfrac D2 \log 2\pi - \tfrac12\log|H|`.

Gradients (DESIGN.md, point 4). The mode and the curvature are made differentiable without
differentiating through the Newton iterations: with :math:`\hat v_0`, :math:`H_0^{-1}` held
fixed,

.. math::  v^* = \hat v_0 + H_0^{-1} \nabla h(\hat v_0)

equals :math:`\hat v` in value and has exactly the implicit-function derivative
:math:`d\hat v/d\psi = H^{-1} \partial_\psi \nabla h`. :math:`H` is then recomputed at
:math:`v^*` with autograd (observed second derivatives), so the value and the gradient are
those of the approximation with centre and scale at the mode, for every rule.

Factorisations. :math:`\log|H|` and the solves come from one
:class:`~ngmm_formula.approx.factor.Factor` (:func:`~ngmm_formula.approx.conditional.factorise`):
dense Cholesky factors per group, or, for a large joint block (crossed or nested factors,
REML), block elimination over one grouping factor, where
:math:`\log|H| = \sum_l \log|H_{AA,l}| + \log|S|`. The quadrature rules need :math:`R` itself
and run on per-group blocks only.

Cost: the network (if any) is evaluated once per observation; each node costs O(n S) cheap
arithmetic, O(n K^D) in all.
"""

from __future__ import annotations

import torch

from ngmm_formula.approx.conditional import (
    LOG_2PI,
    Blocks,
    ConditionalMode,
    block_sum,
    factorise,
    gradient,
    log_integrand,
    random_part,
)
from ngmm_formula.approx.factor import DenseFactor
from ngmm_formula.approx.rules import Rule
from ngmm_formula.families import Family

__all__ = ["log_marginal"]


def log_marginal(family: Family, y: torch.Tensor, w: torch.Tensor, eta_fixed: torch.Tensor,
                 log_sigma: torch.Tensor | None, C: torch.Tensor, blocks: Blocks,
                 mode: ConditionalMode, rule: Rule, log_const: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Approximate :math:`\\log \\int e^{h(v)} dv` of every block, shape (n_blocks,).

    ``mode`` comes from :func:`~ngmm_formula.approx.conditional.find_mode` at the same
    parameters (detached); the result is differentiable in ``eta_fixed``, ``C`` and
    ``log_sigma``. ``log_const`` is the family's data constant per observation
    (:meth:`~ngmm_formula.families.Family.data_constant`), added once per block rather than
    at every node.
    """
    v0 = mode.v
    # one differentiable Newton step: v* == v0 in value, implicit-function derivative
    eta0 = eta_fixed + random_part(C, v0, blocks)
    g = gradient(family.dlogp(y, eta0, log_sigma, w), C, v0, blocks)
    step = mode.factor.solve(g)
    v_star = v0 + step
    eta_star = eta_fixed + random_part(C, v_star, blocks)
    # H at v* with autograd (for a quadratic h, H does not depend on v: the mode search's)
    factor = (mode.curvature if mode.curvature is not None
              else factorise(-family.d2logp(y, eta_star, log_sigma, w), C, blocks))
    if not factor.ok:
        # observed curvature not positive definite (non-log-concave family far from the
        # data): use the expected curvature, as PIRLS does
        factor = factorise(family.fisher_weight(eta_star, log_sigma, w), C, blocks)
        if not factor.ok:
            raise torch.linalg.LinAlgError("the expected negative Hessian of the "
                                           "log-integrand is not positive definite")
    log_det_L = -factor.half_logdet()
    const = log_det_L + 0.5 * blocks.dim * LOG_2PI
    if rule.n_nodes == 1 and not rule.nodes.any():
        h = log_integrand(family, y, w, eta_star, log_sigma, v_star, blocks, log_const)
        return const + h + float(rule.log_weights[0])
    if log_const is not None:
        const = const + block_sum(log_const, blocks)
    if not isinstance(factor, DenseFactor):
        raise ValueError("quadrature rules need per-group blocks (a dense factor)")
    t, logw = rule.tensors(C.dtype, C.device)  # (K, D), (K,)
    # L t_k = R^{-T} t_k for every block: (n_blocks, D, K)
    Lt = factor.scale_nodes(t)
    nodes = v_star.unsqueeze(-1) + Lt  # (n_blocks, D, K)
    # eta at every node: eta_star + sum_s C_is (L t_k)[b(i), pos(i,s)]
    Lt_obs = Lt[blocks.block_of_obs.unsqueeze(-1), blocks.slot_pos]  # (n, S, K)
    eta_nodes = eta_star.unsqueeze(-1) + (C.unsqueeze(-1) * Lt_obs).sum(1)  # (n, K)
    y_, w_ = y.unsqueeze(-1), w.unsqueeze(-1)
    ll = block_sum(family.log_kernel(y_, eta_nodes, log_sigma, w_), blocks)  # (n_blocks, K)
    prior = (-0.5 * (blocks.prior_precision[:, None] * nodes * nodes).sum(1)
             - 0.5 * blocks.n_prior * LOG_2PI)
    terms = logw + ll + prior + 0.5 * (t * t).sum(-1)
    return const + torch.logsumexp(terms, dim=-1)
