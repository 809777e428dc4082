"""Marginal-likelihood approximations: which one a fit uses and how its blocks are laid out.

Every approximation computes :math:`\\log p(y) = \\sum_b \\log \\int e^{h_b(v)} dv` over the
independent blocks ``b`` of :mod:`~ngmm_formula.approx.conditional` with one interface,
:func:`~ngmm_formula.approx.adaptive.log_marginal`; they differ only in the integration rule
(:mod:`~ngmm_formula.approx.rules`) and in the block layout:

============  ===========================================  =====================================
``approx``    rule                                         blocks
============  ===========================================  =====================================
laplace       one node (lme4's nAGQ = 1)                   per group, or one joint block
agq           Gauss--Hermite, ``nagq`` nodes per axis       per group (single grouping factor)
truncated     trapezoid grid on [-M, M], K points per axis  per group (single grouping factor)
exact         (Gaussian response, identity link)           Laplace is exact: h is quadratic;
                                                           REML integrates beta too (flat prior)
variational   ELBO of one Gaussian per level (a lower      joint layout (any factors); see
              bound, not an approximation of log p(y))     :mod:`~ngmm_formula.approx.variational`
============  ===========================================  =====================================

Laplace and the quadrature rules share one evaluation (one node is Laplace), so they live in
one module, :mod:`~ngmm_formula.approx.adaptive`, rather than one file each: the rules are
the only thing that differs and they are data (:class:`~ngmm_formula.approx.rules.Rule`).
The same evaluation for one scalar random effect per group in a family without dispersion
(the commonest GLMM and neural fits) is fused into one autograd Function with its derivative
written out, :mod:`~ngmm_formula.approx.scalar`; :class:`~ngmm_formula.fit.Objective` takes
it for the Laplace rule (every training step of a neural fit).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from ngmm_formula.approx.rules import Rule, gauss_hermite_rule, laplace_rule, truncated_rule
from ngmm_formula.errors import NGMMError

__all__ = ["Approximation", "choose_approximation"]

ApproxName = Literal["auto", "laplace", "agq", "truncated", "variational"]
_AUTO_NAGQ = {1: 11, 2: 7, 3: 5}


@dataclass(frozen=True)
class Approximation:
    """The approximation a fit uses.

    Attributes
    ----------
    kind : {"exact", "laplace", "agq", "truncated", "variational"}
    nagq : int
        Gauss--Hermite nodes per axis (``agq``).
    truncation, points : float, int
        ``M`` and ``K`` of the truncated rule.
    reml : bool
        Restricted likelihood (linear Gaussian models only).
    joint : bool
        One joint block (crossed or nested factors, or REML) instead of one block per group.
    """

    kind: Literal["exact", "laplace", "agq", "truncated", "variational"]
    nagq: int = 1
    truncation: float = 0.0
    points: int = 0
    reml: bool = False
    joint: bool = False

    def rule(self, dim: int) -> Rule:
        """The integration rule in ``dim`` dimensions (built once per approximation and
        dimension: training builds an objective per minibatch)."""
        return _rule(self.kind, dim, self.nagq, self.truncation, self.points)

    @property
    def title(self) -> str:
        """The method line of the summary, in lme4's words where lme4 has them."""
        if self.kind == "exact":
            return ("Linear mixed model fit by REML" if self.reml
                    else "Linear mixed model fit by maximum likelihood")
        if self.kind == "laplace":
            return "Generalized linear mixed model fit by maximum likelihood (Laplace " \
                   "Approximation)"
        if self.kind == "agq":
            return ("Generalized linear mixed model fit by maximum likelihood (Adaptive "
                    f"Gauss-Hermite Quadrature, nAGQ = {self.nagq})")
        if self.kind == "variational":
            return ("Generalized linear mixed model fit by maximum likelihood (Gaussian "
                    "variational approximation)")
        return ("Generalized linear mixed model fit by maximum likelihood (truncated "
                f"quadrature, M = {self.truncation:g}, K = {self.points})")


@functools.lru_cache(maxsize=64)
def _rule(kind: str, dim: int, nagq: int, truncation: float, points: int) -> Rule:
    if kind == "agq":
        return gauss_hermite_rule(dim, nagq)
    if kind == "truncated":
        return truncated_rule(dim, truncation, points)
    return laplace_rule(dim)


def choose_approximation(
    approx: str,
    *,
    nagq: int | None,
    truncation: float | None,
    points: int | None,
    reml: bool | None,
    n_grouping_factors: int,
    block_dim: int,
    gaussian_identity: bool,
    has_networks: bool,
    reduced_rank: str | None = None,
) -> Approximation:
    """Resolve the user's ``approx=`` and friends into an :class:`Approximation`.

    ``"auto"`` takes the exact integral for a Gaussian response with identity link (REML for
    linear models unless ``reml=False``, as ``lmer``), adaptive Gauss--Hermite quadrature
    where the integral factorises by group (one grouping factor, block dimension <= 3) and the
    Laplace approximation otherwise. ``"variational"`` (never chosen by ``"auto"``) maximises
    the evidence lower bound of one Gaussian per level
    (:mod:`~ngmm_formula.approx.variational`); it takes no ``nagq``, ``truncation``,
    ``points`` or ``reml=True``.

    ``reduced_rank``: the first ``rr()`` term of the model, if any. Its d coordinates per
    level take the quadrature rules and the Laplace approximation as any vector random
    effect; the profiled Gaussian objective (square relative factors) and the variational
    fit do not take them yet, so a Gaussian model with the identity link goes through the
    Laplace approximation, which is exact there (the log-integrand is quadratic), by maximum
    likelihood (glmmTMB's default; ``reml=True`` is refused).
    """
    allowed = ("auto", "laplace", "agq", "truncated", "variational")
    if approx not in allowed:
        raise NGMMError(f"approx must be one of {', '.join(allowed)}; got {approx!r}")
    if approx == "variational":
        for name, value in (("nagq", nagq), ("truncation", truncation), ("points", points)):
            if value is not None:
                raise NGMMError(f"{name} is not used with approx='variational' (the expectations "
                                f"of the evidence lower bound use their own Gauss-Hermite rule); "
                                f"got {name}={value!r}")
        if reml:
            raise NGMMError("reml=True is not available with approx='variational' (the evidence "
                            "lower bound is a maximum-likelihood criterion); use reml=False or "
                            "approx='auto'")
        if reduced_rank is not None:
            raise NGMMError(f"approx='variational' does not take reduced-rank terms "
                            f"({reduced_rank}) yet; use approx='laplace', 'agq' or "
                            "'truncated'")
        return Approximation("variational", joint=True)
    factorises = n_grouping_factors == 1
    if reml and not gaussian_identity:
        raise NGMMError("reml=True needs family='gaussian' with the identity link (as lmer)")
    if reml and has_networks:
        raise NGMMError("reml=True is only defined for linear models (no nn() terms)")
    if nagq is not None and (not isinstance(nagq, int) or isinstance(nagq, bool) or nagq < 1):
        raise NGMMError(f"nagq must be a positive integer, got {nagq!r}")
    if nagq is not None and approx not in ("agq", "auto"):
        raise NGMMError(f"nagq is used with approx='agq', not approx={approx!r}")
    if (truncation is not None or points is not None) and approx not in ("truncated", "auto"):
        raise NGMMError(f"truncation and points are used with approx='truncated', not "
                        f"approx={approx!r}")
    if approx == "auto" and (truncation is not None or points is not None):
        approx = "truncated"
    if approx == "auto" and nagq is not None:
        approx = "agq" if nagq > 1 else "laplace"

    if gaussian_identity and approx in ("auto", "laplace") and reduced_rank is not None:
        if reml:
            raise NGMMError(f"REML is not available with reduced-rank terms "
                            f"({reduced_rank}); use reml=False")
        return Approximation("laplace", joint=not factorises)
    if gaussian_identity and approx in ("auto", "laplace"):
        use_reml = bool(reml) if reml is not None else not has_networks
        return Approximation("exact", reml=use_reml, joint=use_reml or not factorises)
    if reml:
        raise NGMMError("reml=True is available with the exact Gaussian integral only "
                        "(approx='auto' or 'laplace')")
    if approx == "laplace":
        return Approximation("laplace", joint=not factorises)
    if approx == "auto":
        if factorises and block_dim in _AUTO_NAGQ:
            return Approximation("agq", nagq=_AUTO_NAGQ[block_dim])
        return Approximation("laplace", joint=not factorises)
    if not factorises:
        raise NGMMError(f"approx={approx!r} needs an integral that factorises by group (a single "
                        f"grouping factor); this model has {n_grouping_factors}: use "
                        "approx='laplace'")
    if approx == "agq":
        k = 10 if nagq is None else nagq
        if block_dim ** 1 * k ** block_dim > 100_000:
            raise NGMMError(f"nagq={k} in {block_dim} dimensions needs {k ** block_dim} nodes "
                            "per group; lower nagq")
        return Approximation("agq", nagq=k)
    M = 5.0 if truncation is None else float(truncation)
    K = 21 if points is None else points
    if not M > 0:
        raise NGMMError(f"truncation (M) must be positive, got {truncation!r}")
    if not isinstance(K, int) or isinstance(K, bool) or K < 2:
        raise NGMMError(f"points (K) must be an integer >= 2, got {points!r}")
    return Approximation("truncated", truncation=M, points=K)
