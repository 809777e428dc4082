r"""The conditional distribution of the spherical random effects, shared by every approximation.

With :math:`b = \Lambda(\theta) u`, :math:`u \sim N(0, I)`, the linear predictor is

.. math::

    \eta_i = \eta^{\text{fixed}}_i + \sum_s C_{is}\, v_{\text{block}(i), \text{pos}(i, s)},
    \qquad C_{i\cdot} = z_i^\top \Lambda \;\text{(per term)},

where :math:`v` collects the integrated coordinates in independent *blocks*: one block per
level of the grouping factor when every term shares one factor (the integral factorises by
group, each block has dimension :math:`D = \sum_k q_k`), otherwise a single block holding all
:math:`u` (crossed or nested factors, lme4's ``Zt`` order) and, for REML, the fixed effects
:math:`\beta` with a flat prior. Each observation touches ``S`` *slots*.

For each block the log-integrand is

.. math::

    h(v) = \sum_{i \in \text{block}} w_i \log p(y_i \mid \eta_i)
           - \tfrac12 \sum_d \pi_d v_d^2 - \tfrac{\sum_d \pi_d}{2} \log 2\pi,

with prior precisions :math:`\pi_d \in \{0, 1\}` (0 for the flat REML coordinates). This
module finds the mode :math:`\hat v` of every block by batched Newton steps (Fisher-scoring
directions with step halving, so every step increases :math:`h`), and evaluates :math:`h`, its
gradient and its negative Hessian :math:`H = C^\top W C + \operatorname{diag}(\pi)` -- all by
scatter-adds over observations, never with a dense observations x levels matrix -- and
factorises :math:`H` (:func:`factorise`): densely per block, or, for a joint block with a
:class:`~ngmm_formula.approx.factor.Split`, by block elimination over one grouping factor
(:mod:`~ngmm_formula.approx.factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ngmm_formula.approx.factor import DenseFactor, Factor, SchurFactor
from ngmm_formula.families import Family
from ngmm_formula.layout import Blocks, sum_rows

__all__ = ["Blocks", "ConditionalMode", "block_sum", "factorise", "find_mode", "log_integrand",
           "neg_hessian", "gradient"]

LOG_2PI = math.log(2.0 * math.pi)


def block_sum(values: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """Sum per-observation values (n, ...) into blocks (n_blocks, ...) (by segments where
    the rows are laid out block by block: :attr:`~ngmm_formula.layout.Blocks.row_offsets`)."""
    return sum_rows(values, blocks.block_of_obs, blocks.n_blocks, blocks.row_offsets)


def _scalar(C: torch.Tensor, blocks: Blocks) -> bool:
    """One slot per observation in blocks of dimension 1 (a random intercept per group): the
    scatter and gather of every helper here reduce to one index per row (same values, bit
    for bit, in fewer operations)."""
    return blocks.dim == 1 and C.shape[-1] == 1 and blocks.split is None


def random_part(C: torch.Tensor, v: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """:math:`\\sum_s C_{is} v_{b(i), pos(i,s)}` for v of shape (n_blocks, D) -> (n,)."""
    if _scalar(C, blocks):
        return C[:, 0] * v.reshape(-1).index_select(0, blocks.block_of_obs)
    index = blocks.flat_index()  # index_select: the same gather as v[index], 3x cheaper
    return (C * v.reshape(-1).index_select(0, index.reshape(-1)).reshape(index.shape)).sum(-1)


def log_integrand(family: Family, y: torch.Tensor, w: torch.Tensor, eta: torch.Tensor,
                  log_sigma: torch.Tensor | None, v: torch.Tensor, blocks: Blocks,
                  log_const: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`h` per block, shape (n_blocks,), at the linear predictor ``eta`` (n,).

    ``log_const`` is the family's data constant per observation; left out (None) it gives
    :math:`h` up to a per-block constant, which is all the mode search needs.
    """
    ll = family.log_kernel(y, eta, log_sigma, w)
    if log_const is not None:
        ll = ll + log_const
    loglik = block_sum(ll, blocks)
    prior = -0.5 * (blocks.prior_precision * v * v).sum(-1) - 0.5 * blocks.n_prior * LOG_2PI
    return loglik + prior


def gradient(d1: torch.Tensor, C: torch.Tensor, v: torch.Tensor, blocks: Blocks
             ) -> torch.Tensor:
    """:math:`\\nabla h = C^\\top d_1 - \\pi v`, shape (n_blocks, D)."""
    if _scalar(C, blocks):
        flat = v.new_zeros(blocks.n_blocks).index_add(0, blocks.block_of_obs, d1 * C[:, 0])
        return flat.unsqueeze(-1) - blocks.prior_precision * v
    flat = v.new_zeros(blocks.n_blocks * blocks.dim)
    flat = flat.index_add(0, blocks.flat_index().reshape(-1), (d1[:, None] * C).reshape(-1))
    return flat.reshape(blocks.n_blocks, blocks.dim) - blocks.prior_precision * v


def neg_hessian(W: torch.Tensor, C: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """:math:`H = C^\\top \\operatorname{diag}(W) C + \\operatorname{diag}(\\pi)`.

    Shape (n_blocks, D, D).
    """
    if _scalar(C, blocks):
        c = C[:, 0]
        flat = C.new_zeros(blocks.n_blocks).index_add(0, blocks.block_of_obs, W * c * c)
        return flat.reshape(blocks.n_blocks, 1, 1) + torch.diag(blocks.prior_precision)
    D = blocks.dim
    vals = W[:, None, None] * C[:, :, None] * C[:, None, :]
    flat = C.new_zeros(blocks.n_blocks * D * D).index_add(0, blocks.pair_index, vals.reshape(-1))
    return flat.reshape(blocks.n_blocks, D, D) + torch.diag(blocks.prior_precision)


def factorise(W: torch.Tensor, C: torch.Tensor, blocks: Blocks, *, jitter: float = 0.0
              ) -> Factor:
    r"""Factor :math:`H = C^\top \operatorname{diag}(W) C + \operatorname{diag}(\pi)`
    (plus ``jitter`` on the diagonal) of every block; differentiable.

    Dense Cholesky factors per block, or the block elimination of
    :class:`~ngmm_formula.approx.factor.SchurFactor` when the layout has a split.
    """
    if blocks.split is not None:
        return SchurFactor.of(W, C, blocks.prior_precision, blocks.schur_maps, jitter)
    H = neg_hessian(W, C, blocks)
    if jitter:
        H = H + jitter * torch.eye(blocks.dim, dtype=H.dtype, device=H.device)
    return DenseFactor.of(H)


@dataclass
class ConditionalMode:
    r"""The mode of every block and the factor of H there (both detached).

    ``curvature`` is, for a family whose log-likelihood is quadratic in :math:`\eta` (where
    :math:`H` does not depend on :math:`v`), the same factor *with* its autograd graph, so that
    the approximation differentiates its log-determinant without factorising :math:`H` again;
    None otherwise.
    """

    v: torch.Tensor
    factor: Factor
    iterations: int
    converged: bool
    curvature: Factor | None = None


def find_mode(family: Family, y: torch.Tensor, w: torch.Tensor, eta_fixed: torch.Tensor,
              log_sigma: torch.Tensor | None, C: torch.Tensor, blocks: Blocks,
              start: torch.Tensor | None = None, *, tol: float = 1e-10, max_iter: int = 200,
              steps: int | None = None) -> ConditionalMode:
    """Batched Newton (Fisher-scoring direction, step halving) for the mode of each block.

    Everything here is detached: the mode is a fixed point, and the approximations make it
    differentiable with one Newton step (see :mod:`ngmm_formula.approx.adaptive`).

    With ``steps`` and a warm ``start`` (training: the modes of the group's last visit),
    exactly ``steps`` undamped Fisher-scoring steps are taken, without step halving and
    without the convergence test (each costs evaluations of :math:`h` over all rows), when
    the last of them moves no coordinate by more than :data:`FIXED_STEP_TOL` (Newton's
    quadratic convergence then leaves an error of about its square, which the
    approximation's own Newton step squares again); otherwise, or when a factor is not
    positive definite, the search above runs from ``start``. Families whose :math:`h` is
    quadratic always take the search above (one step, exact).
    """
    if steps is not None and start is not None and not family.quadratic:
        fast = _fixed_steps(family, y, w, eta_fixed, log_sigma, C, blocks, start, steps)
        if fast is not None:
            return fast
    # a float32 fit (the default on a GPU) cannot resolve steps below its rounding: stop there
    # instead of running max_iter Newton steps
    tol = max(tol, 8 * torch.finfo(C.dtype).eps)
    curvature = None
    if family.quadratic:
        # h is quadratic in v: H does not depend on v, and one factor of it serves the Newton
        # step here and the (differentiable) log-determinant of the approximation
        curvature = factorise(family.fisher_weight(eta_fixed, log_sigma, w), C, blocks)
        if not curvature.ok:
            curvature = None
    with torch.no_grad():
        eta_fixed = eta_fixed.detach()
        C = C.detach()
        ls = None if log_sigma is None else log_sigma.detach()
        v = (torch.zeros(blocks.n_blocks, blocks.dim, dtype=C.dtype, device=C.device)
             if start is None else start.detach().clone())
        eta = eta_fixed + random_part(C, v, blocks)
        h = log_integrand(family, y, w, eta, ls, v, blocks)
        if start is not None and not bool(torch.isfinite(h).all()):
            # a warm start outside the family's support (e.g. eta <= 0 for an inverse link):
            # restart those blocks from u = 0
            v, eta, h = _restart(family, y, w, eta_fixed, ls, C, blocks, v, torch.isfinite(h))
        converged = False
        # where Fisher scoring is Newton's method (family.newton_scoring), after a full step
        # of size s the error is about s^2, so a full step below FIXED_STEP_TOL ** 2 leaves
        # the mode within ~1e-12 and ends the search one factorisation early (the
        # approximation's own Newton step squares the error again); otherwise scoring
        # converges linearly and runs to ``tol``
        newton = family.newton_scoring
        it = 0
        for it in range(1, max_iter + 1):  # noqa: B007
            d1 = family.dlogp(y, eta, ls, w)
            W = family.fisher_weight(eta, ls, w)
            factor = curvature.detach() if curvature is not None else factorise(W, C, blocks)
            if not factor.ok:
                factor = factorise(W, C, blocks, jitter=1e-8)
            if not factor.ok and it == 1 and bool(v.any()):
                # the warm start's curvature cannot be factorised: after a line search's jump
                # of the parameters its eta can reach exp(eta) ~ 1e38, and a block's
                # I + C'WC, dominated by one row, is singular to round-off; from u = 0
                none = torch.zeros_like(h, dtype=torch.bool)
                v, eta, h = _restart(family, y, w, eta_fixed, ls, C, blocks, v, none)
                d1, W = family.dlogp(y, eta, ls, w), family.fisher_weight(eta, ls, w)
                factor = factorise(W, C, blocks, jitter=1e-8)
            factor = _checked(factor)
            g = gradient(d1, C, v, blocks)
            step = factor.solve(g)
            scale = torch.ones(blocks.n_blocks, 1, dtype=v.dtype, device=v.device)
            for _ in range(40):
                v_new = v + scale * step
                eta_new = eta_fixed + random_part(C, v_new, blocks)
                h_new = log_integrand(family, y, w, eta_new, ls, v_new, blocks)
                worse = ~(h_new >= h - 1e-12 * h.abs().clamp_min(1.0))
                if not bool(worse.any()):
                    break
                scale = torch.where(worse[:, None], scale * 0.5, scale)
            accept = ~worse
            v = torch.where(accept[:, None], v_new, v)
            h = torch.where(accept, h_new, h)
            eta = eta_fixed + random_part(C, v, blocks)
            scale = torch.where(accept[:, None], scale, torch.zeros_like(scale))
            if family.quadratic and bool(accept.all()) and bool((scale == 1).all()):
                # h is quadratic in v: a full Newton step lands on the mode, and the Fisher
                # weights are the observed curvature
                return ConditionalMode(v=v, factor=factor, iterations=it, converged=True,
                                       curvature=curvature)
            move = float((scale * step).abs().max())
            size = max(1.0, float(v.abs().max()))
            if move < tol * size or (newton and move < FIXED_STEP_TOL ** 2 * size
                                     and bool((scale == 1).all())):
                converged = True
                break
        # Final negative Hessian: the observed one (true Laplace), Fisher weights as fallback.
        d2 = family.d2logp(y, eta, ls, w)
        factor = factorise(-d2, C, blocks)
        if not factor.ok:
            factor = _checked(factorise(family.fisher_weight(eta, ls, w), C, blocks))
    return ConditionalMode(v=v, factor=factor, iterations=it, converged=converged)


def _restart(family: Family, y: torch.Tensor, w: torch.Tensor, eta_fixed: torch.Tensor,
             log_sigma: torch.Tensor | None, C: torch.Tensor, blocks: Blocks, v: torch.Tensor,
             keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`find_mode`'s iterate with the blocks not in ``keep`` (bool, per block) back at
    u = 0: ``(v, eta, h)``."""
    v = torch.where(keep[:, None], v, torch.zeros_like(v))
    eta = eta_fixed + random_part(C, v, blocks)
    return v, eta, log_integrand(family, y, w, eta, log_sigma, v, blocks)


#: Largest move of the last of :func:`find_mode`'s fixed ``steps`` that is accepted as
#: converged (else the damped search runs).
FIXED_STEP_TOL = 1e-3


def _fixed_steps(family: Family, y: torch.Tensor, w: torch.Tensor, eta_fixed: torch.Tensor,
                 log_sigma: torch.Tensor | None, C: torch.Tensor, blocks: Blocks,
                 start: torch.Tensor, steps: int) -> ConditionalMode | None:
    """``steps`` undamped Fisher-scoring steps from ``start`` and the observed factor at the
    end, or None when a factor fails, a value is not finite or the last step moved a
    coordinate by more than :data:`FIXED_STEP_TOL`."""
    with torch.no_grad():
        eta_fixed = eta_fixed.detach()
        C = C.detach()
        ls = None if log_sigma is None else log_sigma.detach()
        v = start.detach()
        eta = eta_fixed + random_part(C, v, blocks)
        move = math.inf
        for _ in range(steps):
            factor = factorise(family.fisher_weight(eta, ls, w), C, blocks)
            if not factor.ok:
                return None
            step = factor.solve(gradient(family.dlogp(y, eta, ls, w), C, v, blocks))
            v = v + step
            eta = eta_fixed + random_part(C, v, blocks)
            move = float(step.abs().max()) if step.numel() else 0.0
        if not move <= FIXED_STEP_TOL:  # also NaN
            return None
        factor = factorise(-family.d2logp(y, eta, ls, w), C, blocks)
        if not factor.ok:
            factor = factorise(family.fisher_weight(eta, ls, w), C, blocks)
            if not factor.ok:
                return None
    return ConditionalMode(v=v, factor=factor, iterations=steps, converged=False)


def _checked(factor: Factor) -> Factor:
    """``factor`` if positive definite, else the error a failed Cholesky raises."""
    if not factor.ok:
        raise torch.linalg.LinAlgError("the negative Hessian of the log-integrand is not "
                                       "positive definite")
    return factor
