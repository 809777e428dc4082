r"""Integration rules for the standard normal, :math:`\int f(t)\, N(t; 0, I_D)\, dt \approx
\sum_k \omega_k f(t_k)`.

* :func:`laplace_rule` -- one node at 0 with weight 1: the Laplace approximation (lme4's
  ``nAGQ = 1``).
* :func:`gauss_hermite_rule` -- the product Gauss--Hermite rule with ``K`` nodes per axis
  (lme4's ``nAGQ = K`` in one dimension; here also for vector random effects).
* :func:`truncated_rule` -- the truncated rule of Slavutsky, Salazar and Blei (2026): a uniform
  (trapezoid) grid of ``K`` points per axis on :math:`[-M, M]^D`.

Error of the truncated rule. In the posterior-standardised coordinates the integrand is
:math:`f(t) N(t; 0, I)` with :math:`f` smooth and close to constant (exactly constant for a
Gaussian response). The rule's error has two parts:

.. math::

    |E| \le \underbrace{\int_{\|t\|_\infty > M} f N}_{\text{tail}}
        + \underbrace{|E_{\text{grid}}|}_{\text{trapezoid}},
    \qquad \text{tail} \lesssim \sup f \cdot 2D\,\Phi(-M)
        \le \sup f \cdot D \sqrt{2/\pi}\, e^{-M^2/2} / M,

the Gaussian-tail rate in the user's :math:`M`, and the trapezoid error, which for an
integrand analytic in a strip decays geometrically in :math:`K` (like
:math:`e^{-c (K-1)^2 / M^2}` for the Gaussian factor). ``tests/approx/test_rules.py`` measures
both against ``scipy.integrate.quad``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Rule", "laplace_rule", "gauss_hermite_rule", "truncated_rule", "tail_bound"]


@dataclass(frozen=True)
class Rule:
    """Nodes ``(K^D, D)`` and log weights ``(K^D,)`` for the standard normal in D dims."""

    name: str
    nodes: np.ndarray
    log_weights: np.ndarray

    @property
    def n_nodes(self) -> int:
        return int(self.nodes.shape[0])

    def tensors(self, dtype: torch.dtype, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(self.nodes, dtype=dtype, device=device),
                torch.as_tensor(self.log_weights, dtype=dtype, device=device))


def _product(name: str, t: np.ndarray, logw: np.ndarray, dim: int) -> Rule:
    nodes = np.array(list(itertools.product(t, repeat=dim)), dtype=float).reshape(-1, dim)
    lw = np.array([sum(c) for c in itertools.product(logw, repeat=dim)], dtype=float)
    return Rule(name, nodes, lw)


def laplace_rule(dim: int) -> Rule:
    """One node at the mode: the Laplace approximation."""
    return Rule("laplace", np.zeros((1, dim)), np.zeros(1))


def gauss_hermite_rule(dim: int, k: int) -> Rule:
    """Product Gauss--Hermite rule with ``k`` nodes per axis (probabilists' Hermite)."""
    if k < 1:
        raise ValueError(f"nagq must be a positive integer, got {k}")
    t, w = np.polynomial.hermite_e.hermegauss(k)
    w = w / math.sqrt(2.0 * math.pi)
    return _product(f"agq{k}", t, np.log(w), dim)


def truncated_rule(dim: int, truncation: float, points: int) -> Rule:
    r"""Trapezoid grid of ``points`` nodes per axis on :math:`[-M, M]`, :math:`M` =
    ``truncation``; weights :math:`\omega_j = \Delta\, c_j\, \varphi(t_j)` with
    :math:`c_j = 1/2` at the two ends."""
    if not truncation > 0:
        raise ValueError(f"truncation (M) must be positive, got {truncation}")
    if points < 2:
        raise ValueError(f"points (K) must be at least 2, got {points}")
    t = np.linspace(-truncation, truncation, points)
    delta = t[1] - t[0]
    c = np.ones(points)
    c[[0, -1]] = 0.5
    logw = np.log(delta * c) - 0.5 * t * t - 0.5 * math.log(2.0 * math.pi)
    return _product(f"truncated(M={truncation:g}, K={points})", t, logw, dim)


def tail_bound(dim: int, truncation: float) -> float:
    r"""Standard-normal mass outside :math:`[-M, M]^D`: :math:`1 - (1 - 2\Phi(-M))^D`."""
    from scipy.special import ndtr

    inside = 1.0 - 2.0 * float(ndtr(-truncation))
    return 1.0 - inside**dim
