r"""The Gaussian variational approximation (``approx="variational"``) for large crossed designs.

Model (spherical random effects, see :mod:`~ngmm_formula.approx.conditional`):
:math:`\eta_i = \eta^{\text{fixed}}_i + \sum_s C_{is} u_{\text{slot}(i,s)}`,
:math:`u \sim N(0, I)`. Instead of integrating :math:`u` out (Laplace needs the joint mode and
the Cholesky factor of the joint Hessian, which for crossed factors is not block diagonal:
the block elimination of :mod:`~ngmm_formula.approx.factor` costs the cube of the smaller
factors' dimension, too much when two crossed factors are both large),
the log marginal likelihood is bounded from below by the evidence lower bound (ELBO) of a
*mean-field* Gaussian family, one Gaussian per level :math:`l` of each term,

.. math::

    q(u) = \prod_l N(u_l;\, m_l,\, S_l), \qquad S_l = R_l R_l^\top
    \quad (q_k \times q_k,\ R_l \text{ lower triangular with positive diagonal}),

.. math::

    \log p(y) \;\ge\; \mathcal{L}(\psi, m, R)
      = \sum_i w_i\, E_q[\log p(y_i \mid \eta_i)]
        - \sum_l \operatorname{KL}\bigl(N(m_l, S_l)\,\|\,N(0, I)\bigr),

(the prior weights :math:`w_i` enter through the family's ``log_prob``). Under :math:`q`,
:math:`\eta_i` is Gaussian with mean and variance

.. math::

    \mu_i = \eta^{\text{fixed}}_i + \sum_k c_{ik}^\top m_{l_k(i)}, \qquad
    s_i^2 = \sum_k \lVert R_{l_k(i)}^\top c_{ik} \rVert^2,

where :math:`c_{ik} = (Z_k \Lambda_k)_{i\cdot}` are the observation's slot values of term
:math:`k` (levels of different terms are independent under :math:`q`), so every expectation
is one-dimensional, :math:`E_q[\log p(y_i \mid \eta_i)] \approx \sum_j \omega_j
\log p(y_i \mid \mu_i + s_i t_j)` with the ``K``-node Gauss--Hermite rule for
:math:`N(0, 1)` (:func:`~ngmm_formula.approx.rules.gauss_hermite_rule`). The rule is exact
for polynomials of degree :math:`2K - 1` in :math:`t`, so for a Gaussian response with
identity link (quadratic log-likelihood) it is the closed form. The KL term is

.. math::

    \operatorname{KL}_l = \tfrac12\bigl(\operatorname{tr} S_l + m_l^\top m_l - q_k
        - 2 \textstyle\sum_d \log R_{l,dd}\bigr).

Everything is computed by index gathers over observations (never a dense Hessian, never an
observations x levels matrix): the cost of one evaluation is :math:`O(n K + \sum_k L_k q_k^2)`.

Fitting (:func:`fit_variational`): the model parameters (:math:`\beta, \theta, \log\sigma`,
networks) and the variational parameters :math:`(m_l, R_l)` maximise :math:`\mathcal L`
jointly.

* Up to :data:`FULL_BATCH_MAX_ROWS` observations (100,000), and without networks:
  full-batch L-BFGS in float64 on all parameters, then the profiled Hessian for standard
  errors. Where the switch lies: one evaluation with gradient took 3.0 s at 1M rows (16
  nodes, load average 9 on 2 cores) and L-BFGS needs a few hundred (250 on VerbAgg), while
  the stochastic fit below reached the truth of a 1M-row crossed model in 25 epochs
  (``benchmarks/README.md``: stopping too early, after 6, left the slope 3% low).
* Above it, or with ``nn()`` terms: stochastic optimisation on minibatches of observations
  made of **whole levels of the term with the most levels** (the "students"), about
  ``Control.batch_size`` rows each. For a batch :math:`B` of those levels

  1. their Gaussians are set by three Newton steps of the ELBO, which given everything
     else separates over these levels (:func:`local_update`) -- so each level's Gaussian is
     fitted to its own data whenever it is visited, rather than nudged by noisy gradients;
  2. AdamW (learning rate ``max(Control.lr, 0.01)``) steps the model parameters and the
     Gaussians of the other terms along the gradient of the unbiased estimate
     :math:`\tfrac{L}{|B|} \sum_{i \in B} E_q[\log p(y_i)] - \sum_{l \notin \text{largest}}
     \operatorname{KL}_l` (:math:`L` levels; the data term is scaled by about
     :math:`n / |B|`). The other terms' Gaussians are stored *centred*, as
     :math:`q(b_l) = N(\mu_l, T_l T_l^\top)` with :math:`b = \Lambda u`: their levels have
     many observations, which pin :math:`b_l`; in the spherical coordinates :math:`u` a step
     in :math:`\theta` then had to be undone by the means and the item SD of a crossed
     model drifted past its optimum (measured), in the centred ones :math:`\theta` only
     meets the KL term.

  An epoch is one pass over the levels; the score is the ELBO per observation (with
  networks: the held-out ELBO of a fraction ``Control.validation`` of the levels, whose
  Gaussians are fitted by step 1). The learning rate is halved after each epoch without
  improvement and the fit stops after ``Control.patience`` epochs without a relative
  improvement of ``Control.min_delta`` or after ``Control.epochs``. With networks these are
  then frozen (centred, as in the Laplace path) and, up to :data:`FULL_BATCH_MAX_ROWS`, the
  rest is refitted by full-batch L-BFGS.

What is reported (see :func:`~ngmm_formula.api.variational_result`): ``loglik`` is the ELBO
(a lower bound on the log-likelihood; AIC and BIC are computed from it and are comparable only
between variational fits); ``ranef`` are the variational means :math:`\Lambda m_l` with
``postVar`` :math:`\Lambda S_l \Lambda^\top`; standard errors come from the Hessian of the
ELBO *profiled* over the variational parameters,
:math:`\tilde{\mathcal L}(\psi) = \max_{m,R} \mathcal L(\psi, m, R)`, by central differences
of its gradient (by the envelope theorem :math:`\nabla\tilde{\mathcal L}(\psi) =
\partial_\psi \mathcal L(\psi, \hat m(\psi), \hat R(\psi))`), computed in the full-batch case;
after minibatch fitting they are not available (NaN).

References: Ormerod and Wand (2012), "Gaussian variational approximate inference for
generalized linear mixed models", JCGS 21(1); Blei, Kucukelbir and McAuliffe (2017),
"Variational inference: a review for statisticians", JASA 112(518).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import scipy.optimize
import torch

from ngmm_formula.adamw import AdamW, Plateau
from ngmm_formula.approx.rules import gauss_hermite_rule
from ngmm_formula.families import Family
from ngmm_formula.model import (
    LinearPredictor,
    Problem,
    RowsByGroup,
    lambda_blocks,
    optimised_parameters,
)
from ngmm_formula.networks import CentredNetwork

if TYPE_CHECKING:
    from ngmm_formula.control import Control

__all__ = ["FULL_BATCH_MAX_ROWS", "GH_NODES", "Collectives", "Levels", "VariationalFit",
           "VariationalObjective", "VariationalParameters", "expected_log_prob",
           "fit_variational", "initial_log_sd", "kl_standard_normal", "profiled_elbo",
           "profiled_hessian"]

#: Observations up to which linear models are fitted by full-batch L-BFGS.
FULL_BATCH_MAX_ROWS = 100_000

#: Gauss--Hermite nodes of the one-dimensional expectations (exact up to degree 2K - 1).
GH_NODES = 16


class Collectives(Protocol):
    """What a distributed variational fit needs of its process group
    (:class:`~ngmm_formula.shards.Shard`, over the levels of the term with the most levels:
    this process evaluates the rows of its range of those levels). Declared here, below the
    layer of :mod:`~ngmm_formula.shards`, which provides it."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def owned(self, n_blocks: int) -> np.ndarray:
        """Mask over the levels: this process's."""

    def all_sum(self, x: np.ndarray) -> np.ndarray:
        """Elementwise sum over the processes, the same bits everywhere."""

    def all_sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the parameters' ``.grad`` over the processes."""

    def lead(self, x: np.ndarray) -> None:
        """Rank 0: the others evaluate at ``x``."""

    def finish(self, k: int, result: Any) -> None:
        """Rank 0: end the evaluations and send ``result``."""

    def follow(self, k: int, evaluate: Callable[[np.ndarray], Any]) -> Any:
        """Other ranks: evaluate where rank 0 asks; its result."""


@dataclass(frozen=True)
class Levels:
    """Which level of each term every observation belongs to.

    Derived from the joint block layout of :func:`~ngmm_formula.model.build_problem` (lme4's
    ``Zt`` order: term offset + level * q + column).

    Attributes
    ----------
    q, n_levels : tuple of int
        Columns and levels of each term.
    slot_start : tuple of int
        First column of ``C`` of each term.
    level_of_obs : tuple of LongTensor, shape (n,)
    """

    q: tuple[int, ...]
    n_levels: tuple[int, ...]
    slot_start: tuple[int, ...]
    level_of_obs: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, problem: Problem) -> Levels:
        pos = problem.blocks.slot_pos
        starts, levels, offset, s = [], [], 0, 0
        for k, n_l in zip(problem.q, problem.n_levels):
            starts.append(s)
            levels.append(torch.div(pos[:, s] - offset, k, rounding_mode="floor"))
            offset += k * n_l
            s += k
        return cls(problem.q, problem.n_levels, tuple(starts), tuple(levels))

    def rows(self, rows: torch.Tensor) -> Levels:
        return Levels(self.q, self.n_levels, self.slot_start,
                      tuple(lv[rows] for lv in self.level_of_obs))


_TRIL: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _tril(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    if q not in _TRIL:
        r, c = torch.tril_indices(q, q)
        _TRIL[q] = (r, c)
    return _TRIL[q]


class VariationalParameters(torch.nn.Module):
    r"""Means :math:`m_l` and Cholesky factors :math:`R_l` of every level's Gaussian.

    ``raw[k]`` holds the lower triangle of :math:`R_l` (row-major) with the diagonal on the
    log scale, so that :math:`R_l` has a positive diagonal for any raw value.

    Parameters
    ----------
    levels : Levels
    dtype : torch.dtype
    log_sd : sequence of Tensor, optional
        Starting :math:`\log R_{l,dd}` per term, shape (L_k,); 0 (the prior) if omitted.
    """

    def __init__(self, levels: Levels, dtype: torch.dtype,
                 log_sd: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        self.q = levels.q
        self.mean = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(n, k, dtype=dtype))
             for k, n in zip(levels.q, levels.n_levels)])
        raws = []
        for j, (k, n) in enumerate(zip(levels.q, levels.n_levels)):
            r = torch.zeros(n, k * (k + 1) // 2, dtype=dtype)
            if log_sd is not None:
                rows, cols = _tril(k)
                r[:, (rows == cols).nonzero().squeeze(-1)] = log_sd[j].to(dtype)[:, None]
            raws.append(torch.nn.Parameter(r))
        self.raw = torch.nn.ParameterList(raws)
        self.centred = [False] * len(levels.q)

    def chol(self, k: int) -> torch.Tensor:
        """:math:`R_l` of every level of term ``k``, shape (L_k, q_k, q_k)."""
        q = self.q[k]
        rows, cols = _tril(q)
        raw = self.raw[k]
        vals = torch.where(rows == cols, raw.exp(), raw)
        flat = raw.new_zeros(raw.shape[0], q * q).index_copy(1, rows * q + cols, vals)
        return flat.reshape(-1, q, q)

    def log_diag(self, k: int) -> torch.Tensor:
        rows, cols = _tril(self.q[k])
        return self.raw[k][:, rows == cols]

    def spherical(self, k: int, Lam: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r""":math:`m_l`, :math:`R_l` and :math:`\log R_{l,dd}` of term ``k`` in the spherical
        coordinates :math:`u`, given the term's :math:`\Lambda` (``Lam``).

        A *centred* term stores :math:`q(b_l) = N(\mu_l, T_l T_l^\top)` instead, and then
        :math:`m_l = \Lambda^{-1}\mu_l`, :math:`R_l = \Lambda^{-1} T_l` (see
        :func:`_stochastic` for why).
        """
        m, R, ld = self.mean[k], self.chol(k), self.log_diag(k)
        if not self.centred[k]:
            return m, R, ld
        m = torch.linalg.solve_triangular(Lam, m.T, upper=False).T
        R = torch.linalg.solve_triangular(Lam, R, upper=False)
        return m, R, ld - torch.diagonal(Lam).abs().log()

    def set_centred(self, k: int, centred: bool, Lam: torch.Tensor) -> None:
        """Switch term ``k`` between spherical and centred storage, keeping :math:`q`."""
        if self.centred[k] == centred:
            return
        with torch.no_grad():
            if centred:
                m, R = self.mean[k] @ Lam.T, Lam @ self.chol(k)
            else:
                m, R, _ = self.spherical(k, Lam)
            rows, cols = _tril(self.q[k])
            vals = R[:, rows, cols]
            self.mean[k].copy_(m)
            self.raw[k].copy_(torch.where(rows == cols, vals.abs().clamp_min(1e-300).log(),
                                          vals * torch.sign(torch.diagonal(R, dim1=-2,
                                                                           dim2=-1))[:, cols]))
        self.centred[k] = centred


def kl_standard_normal(m: torch.Tensor, R: torch.Tensor, log_diag: torch.Tensor
                       ) -> torch.Tensor:
    r""":math:`\operatorname{KL}(N(m, RR^\top) \,\|\, N(0, I))` per level, shape (L,)."""
    q = m.shape[-1]
    return 0.5 * ((R * R).sum((-1, -2)) + (m * m).sum(-1) - q) - log_diag.sum(-1)


def expected_log_prob(family: Family, y: torch.Tensor, w: torch.Tensor, mu: torch.Tensor,
                      sd: torch.Tensor, log_sigma: torch.Tensor | None, n_nodes: int = GH_NODES
                      ) -> torch.Tensor:
    r""":math:`E[\log p(y_i \mid \eta)]` for :math:`\eta \sim N(\mu_i, s_i^2)`, shape (n,).

    Gauss--Hermite with ``n_nodes`` nodes in the family's ``log_kernel`` (the data constant
    is left out, as in :func:`~ngmm_formula.approx.adaptive.log_marginal`):
    :math:`\sum_j \omega_j \log p(y_i \mid \mu_i + s_i t_j)`.
    """
    rule = gauss_hermite_rule(1, n_nodes)
    t, logw = rule.tensors(mu.dtype, mu.device)
    eta = mu.unsqueeze(-1) + sd.unsqueeze(-1) * t[:, 0]  # (n, K)
    ll = family.log_kernel(y.unsqueeze(-1), eta, log_sigma, w.unsqueeze(-1))
    return (ll * logw.exp()).sum(-1)


class VariationalObjective:
    """The ELBO of ``module`` (model parameters) and ``params`` (variational parameters).

    Parameters
    ----------
    problem : Problem
        Built with the joint block layout (``Approximation("variational", joint=True)``).
    family : Family
    module : LinearPredictor
    params : VariationalParameters
    shard : Collectives, optional
        A distributed fit: this process's data term covers the rows of its levels of the term
        with the most levels (:attr:`own_rows`), the KL term is counted by rank 0, and the
        values and gradients are summed over the processes (:meth:`value`,
        :func:`_value_and_grad`). Every process holds every row and every level's Gaussian.
    """

    def __init__(self, problem: Problem, family: Family, module: LinearPredictor,
                 params: VariationalParameters, *, n_nodes: int = GH_NODES,
                 shard: Collectives | None = None):
        self.problem = problem
        self.family = family
        self.module = module
        self.params = params
        self.levels = Levels.of(problem)
        self.n_nodes = n_nodes
        self.shard = shard if shard is not None and shard.world_size > 1 else None
        #: the rows this process evaluates (None: all)
        self.own_rows: torch.Tensor | None = None
        if self.shard is not None:
            k = self.largest_term
            owned = torch.as_tensor(self.shard.owned(self.levels.n_levels[k]))
            self.own_rows = torch.nonzero(owned[self.levels.level_of_obs[k].cpu()]).squeeze(1)

    @property
    def largest_term(self) -> int:
        """The term with the most levels (the "students": minibatches and shards are made of
        its levels)."""
        return int(np.argmax(self.levels.n_levels))

    def counts_kl(self) -> bool:
        """Whether this process adds the KL term (rank 0 of a distributed fit)."""
        return self.shard is None or self.shard.rank == 0

    def value(self) -> float:
        """The ELBO without gradients, summed over the processes of a distributed fit."""
        with torch.no_grad():
            v = float(self())
        return v if self.shard is None else float(self.shard.all_sum(np.array([v]))[0])

    @property
    def nobs(self) -> int:
        return int(self.problem.y.shape[0])

    def moments(self, problem: Problem, levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\mu_i` and :math:`s_i` of :math:`\eta_i` under :math:`q`, shape (n,) each."""
        m = self.module
        mu = m.eta_fixed(problem)
        C = m.slot_values(problem)
        var = torch.zeros_like(mu)
        Lams = lambda_blocks(m.theta, levels.q)
        for k, (q, s0, lv) in enumerate(zip(levels.q, levels.slot_start, levels.level_of_obs)):
            c = C[:, s0:s0 + q]  # (n, q)
            mean, R, _ = self.params.spherical(k, Lams[k])
            mu = mu + (c * mean[lv]).sum(-1)
            Rt_c = (R[lv] * c.unsqueeze(-1)).sum(-2)  # R' c, (n, q)
            var = var + (Rt_c * Rt_c).sum(-1)
        return mu, var.clamp_min(0.0).sqrt()

    def expected_loglik(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`E_q[\log p(y_i \mid \eta_i)]` with full constants, shape (n,) or (|rows|,)."""
        pr, levels = self.problem, self.levels
        if rows is not None:
            pr, levels = pr.subset(rows), levels.rows(rows)
        mu, sd = self.moments(pr, levels)
        m = self.module
        return (expected_log_prob(self.family, pr.y, pr.w, mu, sd, m.log_sigma, self.n_nodes)
                + pr.log_const)

    def kl(self) -> torch.Tensor:
        """Sum of the KL divergences of every level's Gaussian from the prior."""
        return self.kl_terms(range(len(self.params.q)))

    def kl_terms(self, terms: Iterable[int]) -> torch.Tensor:
        """Sum of the KL divergences of the levels of ``terms``."""
        Lams = lambda_blocks(self.module.theta, self.params.q)
        total = torch.zeros((), dtype=self.problem.y.dtype)
        for k in terms:
            total = total + kl_standard_normal(*self.params.spherical(k, Lams[k])).sum()
        return total

    def __call__(self, rows: torch.Tensor | None = None, chunk: int = 500_000) -> torch.Tensor:
        """The ELBO; with ``rows`` its unbiased minibatch estimate (data term scaled by
        n / len(rows)). Without ``rows`` and gradients off, evaluated in chunks of rows. In
        a distributed fit (``shard``), without ``rows``: this process's part (its rows, and
        the KL term on rank 0), which :meth:`value` sums over the processes."""
        if rows is not None:
            return self.expected_loglik(rows).sum() * (self.nobs / rows.numel()) - self.kl()
        own = self.own_rows
        n = self.nobs if own is None else own.numel()
        if torch.is_grad_enabled() or n <= chunk:
            total = self.expected_loglik(own).sum()
        else:
            total = torch.zeros((), dtype=self.problem.y.dtype)
            for s in range(0, n, chunk):
                part = torch.arange(s, min(s + chunk, n))
                total = total + self.expected_loglik(part if own is None else own[part]).sum()
        # after the data term: autograd sums the two terms' gradients in the order of
        # their graphs (the same bits as before distributed fits existed)
        return total - self.kl() if self.counts_kl() else total


def initial_log_sd(levels: Levels, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    r"""Starting :math:`\log R_{l,dd} = -\tfrac12 \log(1 + n_l / 4)`: the posterior SD of a
    binomial-logit level effect with :math:`n_l` observations near :math:`p = 1/2` and unit
    prior SD; any positive start works, this one spares the optimiser a long first phase."""
    out = []
    for lv, n_l in zip(levels.level_of_obs, levels.n_levels):
        counts = torch.bincount(lv, minlength=n_l).to(dtype)
        out.append(-0.5 * torch.log1p(counts / 4.0))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# fitting


@dataclass(frozen=True)
class VariationalFit:
    """What :func:`fit_variational` found.

    ``x`` (model parameters in :func:`~ngmm_formula.model.optimised_parameters` order),
    ``hessian`` (of the profiled ELBO in them; NaN when not computed) and ``gradient`` follow
    :class:`~ngmm_formula.fit.Optimum`; ``method`` is "lbfgs" or "adam".
    """

    x: np.ndarray
    elbo: float
    gradient: np.ndarray
    hessian: np.ndarray
    iterations: int
    evaluations: int
    message: str
    converged: bool
    method: str
    seconds: float
    history: tuple[float, ...] = ()


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in tensors]) \
        if tensors else np.zeros(0)


def _assign(tensors: list[torch.Tensor], x: np.ndarray) -> None:
    i = 0
    with torch.no_grad():
        for p in tensors:
            k = p.numel()
            p.copy_(torch.as_tensor(x[i:i + k], dtype=p.dtype).reshape(p.shape))
            i += k


def _lbfgs(obj: VariationalObjective, tensors: list[torch.Tensor], max_iter: int,
           gtol: float = 1e-9) -> tuple[scipy.optimize.OptimizeResult, int]:
    """Maximise the full-batch ELBO over ``tensors`` by L-BFGS-B (others held fixed).

    In a distributed fit rank 0 runs the optimiser on the summed values and gradients and
    the other processes evaluate their rows wherever it asks, then take its result (as
    :func:`~ngmm_formula.fit.optimise`: identical optimisers in every process could end 1
    ulp apart and stop at different iterations)."""
    n_eval = 0

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal n_eval
        n_eval += 1
        _assign(tensors, x)
        v, g = _value_and_grad(obj, tensors)
        if not math.isfinite(v):
            return 1e300, np.zeros_like(x)
        return -v, -g

    shard, x0 = obj.shard, _flat(tensors)
    if shard is not None and shard.rank != 0:
        res = shard.follow(x0.size, f)
    else:
        def lead(x: np.ndarray) -> tuple[float, np.ndarray]:
            if shard is not None:
                shard.lead(x)
            return f(x)

        res = scipy.optimize.minimize(
            lead, x0, jac=True, method="L-BFGS-B",
            options={"maxiter": max_iter, "maxcor": 20, "ftol": 1e-15, "gtol": gtol,
                     "maxls": 50})
        if shard is not None:
            shard.finish(x0.size, res)
    _assign(tensors, res.x)
    return res, n_eval


def _model_tensors(module: LinearPredictor) -> list[torch.Tensor]:
    return list(optimised_parameters(module))


def _value_and_grad(obj: VariationalObjective, tensors: list[torch.Tensor]
                    ) -> tuple[float, np.ndarray]:
    """The ELBO and its gradient in ``tensors`` (summed over the processes of a distributed
    fit, in one all-reduce)."""
    value = obj()
    grads = torch.autograd.grad(value, tensors, allow_unused=True)
    g = _flat([gr if gr is not None else torch.zeros_like(p) for gr, p in zip(grads, tensors)])
    v = float(value.detach())
    if obj.shard is None:
        return v, g
    both = obj.shard.all_sum(np.concatenate([[v], g]))
    return float(both[0]), both[1:]


def _gradient(obj: VariationalObjective, tensors: list[torch.Tensor]) -> np.ndarray:
    return _value_and_grad(obj, tensors)[1]


def profiled_elbo(problem: Problem, family: Family, module: LinearPredictor,
                  max_iter: int = 2000) -> float:
    r"""The ELBO maximised over the variational parameters at ``module``'s parameters,
    :math:`\tilde{\mathcal L}(\psi)` (full-batch L-BFGS from the default start): the
    objective of a variational fit at fixed model parameters."""
    levels = Levels.of(problem)
    params = VariationalParameters(levels, problem.y.dtype,
                                   initial_log_sd(levels, problem.y.dtype))
    obj = VariationalObjective(problem, family, module, params)
    _lbfgs(obj, list(params.parameters()), max_iter)
    return obj.value()


def profiled_hessian(obj: VariationalObjective, max_iter: int, rel_step: float = 1e-4
                     ) -> np.ndarray:
    r"""Hessian of the ELBO profiled over the variational parameters, in the model parameters.

    Central differences of :math:`\partial_\psi \mathcal L(\psi, \hat m(\psi), \hat R(\psi))`,
    the variational parameters re-optimised (warm-started L-BFGS) at each shifted
    :math:`\psi`; restores the parameters on exit.
    """
    model = _model_tensors(obj.module)
    var: list[torch.Tensor] = list(obj.params.parameters())
    x0, v0 = _flat(model), _flat(var)
    k = x0.size
    H = np.empty((k, k))
    for j in range(k):
        h = rel_step * max(1.0, abs(x0[j]))
        cols = []
        for sign in (1.0, -1.0):
            x = x0.copy()
            x[j] += sign * h
            _assign(model, x)
            _assign(var, v0)
            _lbfgs(obj, var, max_iter)
            cols.append(_gradient(obj, model))
        H[:, j] = (cols[0] - cols[1]) / (2 * h)
    _assign(model, x0)
    _assign(var, v0)
    return 0.5 * (H + H.T)


def expected_derivatives(family: Family, y: torch.Tensor, w: torch.Tensor, mu: torch.Tensor,
                         sd: torch.Tensor, log_sigma: torch.Tensor | None,
                         n_nodes: int = GH_NODES) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`E[\partial_\eta \log p]` and :math:`E[\partial^2_\eta \log p]` for
    :math:`\eta \sim N(\mu_i, s_i^2)` (Gauss--Hermite, as :func:`expected_log_prob`)."""
    rule = gauss_hermite_rule(1, n_nodes)
    t, logw = rule.tensors(mu.dtype, mu.device)
    eta = mu.unsqueeze(-1) + sd.unsqueeze(-1) * t[:, 0]
    y_, w_, omega = y.unsqueeze(-1), w.unsqueeze(-1), logw.exp()
    return ((family.dlogp(y_, eta, log_sigma, w_) * omega).sum(-1),
            (family.d2logp(y_, eta, log_sigma, w_) * omega).sum(-1))


def local_update(obj: VariationalObjective, k: int, rows: torch.Tensor, n_iter: int = 3
                 ) -> None:
    r"""Update the Gaussians of the levels of term ``k`` that own ``rows`` (all their rows).

    Given everything else, the ELBO separates over the levels of one term, and its
    stationary point satisfies (Opper and Archambeau, 2009)

    .. math::

        S_l^{-1} = I + \sum_{i \in l} \tilde w_i\, c_i c_i^\top, \qquad
        \tilde w_i = -E_q[\partial^2_\eta \log p(y_i \mid \eta_i)], \qquad
        m_l = \sum_{i \in l} c_i\, E_q[\partial_\eta \log p(y_i \mid \eta_i)],

    iterated as Newton steps :math:`m_l \leftarrow m_l + S_l (\sum_i c_i E_q[\partial_\eta
    \log p] - m_l)` (the exact Newton step in :math:`m_l`: :math:`E_q` commutes with
    :math:`\partial_{m}`). :math:`\tilde w_i` is clamped at 0 for families whose
    log-likelihood is not concave in :math:`\eta`. Batched over levels by scatter-adds;
    no gradients. The :math:`S`-equation rests on Stein's identity
    :math:`\partial_s E[f(\mu + s t)] = s\, E[f''(\mu + s t)]`, exact for the integral,
    so this fixed point differs from the stationary point of the Gauss--Hermite ELBO by the
    rule's error (measured in ``tests/test_variational.py``).
    """
    with torch.no_grad():
        pr, levels = obj.problem.subset(rows), obj.levels.rows(rows)
        q, s0 = levels.q[k], levels.slot_start[k]
        ids, inv = torch.unique(levels.level_of_obs[k], return_inverse=True)
        c = obj.module.slot_values(pr)[:, s0:s0 + q]
        cc = (c.unsqueeze(-1) * c.unsqueeze(-2)).reshape(-1, q * q)
        eye = torch.eye(q, dtype=c.dtype, device=c.device)
        mean, raw = obj.params.mean[k], obj.params.raw[k]
        tr, tc = _tril(q)
        diag = tr == tc
        log_sigma = obj.module.log_sigma
        for _ in range(n_iter):
            mu, sd = obj.moments(pr, levels)
            e1, e2 = expected_derivatives(obj.family, pr.y, pr.w, mu, sd, log_sigma,
                                          obj.n_nodes)
            W = (-e2).clamp_min(0.0)
            P = c.new_zeros(ids.numel(), q * q).index_add(0, inv, W[:, None] * cc)
            P = P.reshape(-1, q, q) + eye
            g = c.new_zeros(ids.numel(), q).index_add(0, inv, e1[:, None] * c) - mean[ids]
            chol_P = torch.linalg.cholesky(P)
            mean[ids] = mean[ids] + torch.cholesky_solve(g.unsqueeze(-1), chol_P).squeeze(-1)
            R = torch.linalg.cholesky(torch.cholesky_inverse(chol_P))
            vals = R[:, tr, tc]
            raw[ids] = torch.where(diag, vals.clamp_min(1e-300).log(), vals)


def _stochastic(obj: VariationalObjective, control: Control, seed: int
                ) -> tuple[int, tuple[float, ...], bool]:
    """Stochastic fit on minibatches of whole levels of the largest term (module docs).

    Returns (optimiser steps, score per epoch, stopped before ``Control.epochs``). With
    networks, levels are held out for early stopping and the best state is restored.

    In a distributed fit (``obj.shard``) every process draws the same minibatches of levels,
    sets the Gaussians of its own levels among them and evaluates their rows; the gradients
    (the KL and prior terms counted by rank 0) and the scores are summed over the processes,
    and at the end every process gets every level's Gaussian (:func:`_share_levels`).
    """
    rng = np.random.default_rng(seed)
    levels, shard = obj.levels, obj.shard
    k_loc = obj.largest_term
    n_loc = levels.n_levels[k_loc]
    owner = levels.level_of_obs[k_loc].cpu().numpy()
    mine = shard.owned(n_loc) if shard is not None else np.ones(n_loc, dtype=bool)
    module, params = obj.module, obj.params
    present = np.flatnonzero(np.bincount(owner, minlength=n_loc))
    n_val = (int(round(control.validation * present.size))
             if module.nets and present.size >= 10 else 0)
    held = rng.choice(present, size=n_val, replace=False) if n_val else np.zeros(0, int)
    train_levels = np.setdiff1d(present, held)
    by_level = RowsByGroup.of(owner, n_loc)
    sizes = by_level.sizes

    def rows_of(ls: np.ndarray) -> torch.Tensor:
        """The rows of this process's levels among ``ls``."""
        return torch.as_tensor(np.sort(by_level.rows(ls[mine[ls]])), dtype=torch.long)

    val_rows = rows_of(np.sort(held)) if n_val else None
    n_val_rows = int(sizes[held].sum())
    per_batch = max(1, int(round(control.batch_size / max(1.0, obj.nobs / present.size))))
    n_train = int(sizes[train_levels].sum())
    others = [p for j in range(len(levels.q)) if j != k_loc
              for p in (params.mean[j], params.raw[j])]
    net_params = [p for net in module.nets for p in net.parameters() if p.requires_grad]
    groups: list[dict[str, object]] = [
        {"params": _model_tensors(module) + others, "weight_decay": 0.0}]
    if net_params:
        groups.append({"params": net_params, "weight_decay": float(control.weight_decay)})
    opt = AdamW(groups, lr=max(float(control.lr), 1e-2))
    stepped = [p for g in groups for p in g["params"]]  # type: ignore[attr-defined]
    sched = Plateau(opt, factor=0.5, patience=0)

    others_k = [j for j in range(len(levels.q)) if j != k_loc]

    def kl_others() -> torch.Tensor:
        return obj.kl_terms(others_k)

    def lambdas() -> list[torch.Tensor]:
        return [L.detach() for L in lambda_blocks(module.theta, levels.q)]

    for j, L in zip(others_k, [lambdas()[j] for j in others_k]):
        params.set_centred(j, True, L)

    best, best_state, wait, steps = -math.inf, None, 0, 0
    curve: list[float] = []
    stopped = False
    for _epoch in range(int(control.epochs)):
        order = rng.permutation(train_levels)
        module.train()
        for s in range(0, order.size, per_batch):
            batch = order[s:s + per_batch]
            elbo = _minibatch_elbo(obj, k_loc, rows_of(batch), train_levels.size / batch.size,
                                   kl_others)
            opt.zero_grad(set_to_none=True)
            if elbo.requires_grad:
                (-elbo / n_train).backward()
            if shard is not None:
                shard.all_sum_grads(stepped)
            opt.step()
            steps += 1
        module.eval()
        score = _epoch_score(obj, k_loc, val_rows, n_val_rows)
        curve.append(score)
        sched.step(score)
        if best_state is None or score > best + float(control.min_delta) * max(1.0, abs(best)):
            best, wait = score, 0
            best_state = (copy.deepcopy(module.state_dict()), copy.deepcopy(params.state_dict()))
        else:
            wait += 1
            if wait >= control.patience:
                stopped = True
                break
    if best_state is not None:
        module.load_state_dict(best_state[0])
        params.load_state_dict(best_state[1])
    Lams = lambdas()
    for j in others_k:
        params.set_centred(j, False, Lams[j])
    # the local term's Gaussians at the final parameters, in one pass over all rows
    local_update(obj, k_loc, torch.arange(obj.nobs) if obj.own_rows is None else obj.own_rows)
    if shard is not None:
        _share_levels(obj, k_loc, mine)
    return steps, tuple(curve), stopped


def _minibatch_elbo(obj: VariationalObjective, k: int, rows: torch.Tensor, scale: float,
                    kl_others: Callable[[], torch.Tensor]) -> torch.Tensor:
    """This process's part of a minibatch's ELBO estimate: the Gaussians of the levels of
    term ``k`` owning ``rows`` set by :func:`local_update`, their data term times ``scale``
    (unbiased for the training levels'), and (rank 0) the other terms' KL and the networks'
    priors. The local term's KL has no gradient in the parameters stepped with it (its
    Gaussians were just set)."""
    elbo = obj.problem.y.new_zeros(())
    if rows.numel():
        local_update(obj, k, rows)
        elbo = obj.expected_loglik(rows).sum() * scale
    if obj.counts_kl():
        elbo = elbo - kl_others()
        for net in obj.module.nets:  # the embeddings' prior (networks.MLP.penalty)
            if isinstance(net, CentredNetwork):
                elbo = elbo - net.penalty()
    return elbo


def _epoch_score(obj: VariationalObjective, k: int, val_rows: torch.Tensor | None,
                 n_val_rows: int) -> float:
    """The ELBO per observation, or with validation levels (``val_rows``: this process's
    rows of them, ``n_val_rows``: all processes') their expected log-likelihood per
    observation after :func:`local_update` of their Gaussians (term ``k``)."""
    with torch.no_grad():
        if val_rows is None:
            return obj.value() / obj.nobs
        vll = 0.0
        if val_rows.numel():
            local_update(obj, k, val_rows)
            vll = float(obj.expected_loglik(val_rows).sum())
        if obj.shard is not None:
            vll = float(obj.shard.all_sum(np.array([vll]))[0])
        return vll / n_val_rows


def _share_levels(obj: VariationalObjective, k: int, mine: np.ndarray) -> None:
    """Every process's Gaussians of its own levels of term ``k`` (``mine``) into every
    process (an all-reduce of the tensors with the other levels' rows zeroed: exact)."""
    assert obj.shard is not None
    keep = torch.as_tensor(mine)
    with torch.no_grad():
        for t in (obj.params.mean[k], obj.params.raw[k]):
            own = torch.where(keep.reshape(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))
            t.copy_(torch.as_tensor(obj.shard.all_sum(own.numpy()), dtype=t.dtype))


def fit_variational(problem: Problem, family: Family, module: LinearPredictor, control: Control,
                    seed: int, *, full_batch_max_rows: int = FULL_BATCH_MAX_ROWS,
                    on_trained: Callable[[VariationalObjective],
                                         VariationalObjective] | None = None,
                    shard: Collectives | None = None
                    ) -> tuple[VariationalObjective, VariationalFit]:
    """Maximise the ELBO over the model and variational parameters (see the module docs).

    Parameters
    ----------
    problem : Problem
        Joint block layout.
    family : Family
    module : LinearPredictor
        Starting values set (e.g. by :func:`~ngmm_formula.fit.glm_start`); fitted in place.
    control : Control
        ``max_iter``, ``gtol`` (full batch); ``epochs``, ``lr``, ``batch_size``,
        ``weight_decay``, ``validation``, ``patience``, ``min_delta`` (minibatches).
    seed : int
    full_batch_max_rows : int
    on_trained : callable, optional
        Called with the objective after the networks are trained; returns the objective of
        the refit (the networks frozen into the offset), as the Laplace path does.
    shard : Collectives, optional
        A distributed fit (:class:`VariationalObjective`): every process returns the same
        fit, equal to the one-process fit up to the order of summation.

    Returns
    -------
    (VariationalObjective, VariationalFit)
        The objective the final parameters belong to and the fit's record.
    """
    t0 = time.perf_counter()
    levels = Levels.of(problem)
    params = VariationalParameters(levels, problem.y.dtype, initial_log_sd(levels,
                                                                          problem.y.dtype))
    obj = VariationalObjective(problem, family, module, params, shard=shard)
    full_batch = obj.nobs <= full_batch_max_rows
    max_iter = int(control.max_iter)
    steps = 0
    history: tuple[float, ...] = ()
    message, converged = "", True
    if module.nets or not full_batch:
        steps, history, stopped = _stochastic(obj, control, seed)
        message = (f"Adam: {steps} steps, {len(history)} epochs, "
                   + ("stopped: no improvement" if stopped else "epoch limit reached"))
        converged = stopped
        if module.nets and on_trained is not None:
            obj = on_trained(obj)
    model = _model_tensors(obj.module)
    if full_batch:
        var: list[torch.Tensor] = list(obj.params.parameters())
        res, n_eval = _lbfgs(obj, model + var, max_iter)
        H = profiled_hessian(obj, max_iter)
        gtol = float(control.gtol)
        grad = _gradient(obj, model)
        g_var = _gradient(obj, var)
        H_pd = bool(H.size == 0 or np.linalg.eigvalsh(-H).min() > 0)
        # lme4's check.conv.grad on the model parameters, and the variational gradient small
        scaled = np.abs(grad)
        if H_pd and grad.size:
            scaled = np.abs(np.linalg.solve(np.linalg.cholesky(-H), grad))
        max_grad = float(np.max(np.minimum(scaled, np.abs(grad)))) if grad.size else 0.0
        converged = max_grad < 0.002 and float(np.abs(g_var).max(initial=0.0)) < max(gtol, 1e-3)
        message = (message + "; " if message else "") + str(res.message)
        iterations, evaluations, method = int(res.nit), n_eval, "lbfgs"
    else:
        grad = np.full(_flat(model).size, np.nan)
        H = np.full((grad.size, grad.size), np.nan)
        iterations, evaluations, method = steps, steps, "adam"
    elbo = obj.value()
    return obj, VariationalFit(
        x=_flat(model), elbo=elbo, gradient=grad, hessian=H, iterations=iterations,
        evaluations=evaluations, message=message, converged=converged, method=method,
        seconds=time.perf_counter() - t0, history=history)
