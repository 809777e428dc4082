r"""The fitted object assembled from an optimum: lme4's ``mkMerMod``, in the results layer.

:func:`make_result` turns an :class:`~ngmm_formula.fit.Optimum` of the marginal likelihood (and
:func:`variational_result` a :class:`~ngmm_formula.approx.variational.VariationalFit`) into an
:class:`~ngmm_formula.results.NGMMResult` on the user's scale: fixed effects, ``vcov``, lme4's
theta, ``VarCorr``, conditional modes with ``postVar``, diagnostics, one warning per outcome.
:class:`Prepared` is what the stages before the optimiser hand on (design, family,
approximation, problem; :func:`ngmm_formula.api.prepare` builds it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ngmm_formula.approx import Approximation
from ngmm_formula.approx.factor import Factor
from ngmm_formula.approx.variational import (
    VariationalFit,
    VariationalObjective,
)
from ngmm_formula.design import Design, re_effect, tril_pairs
from ngmm_formula.errors import (
    ApproximationWarning,
    ConvergenceWarning,
    RankDeficiencyWarning,
    SingularFitWarning,
)
from ngmm_formula.families import Family
from ngmm_formula.fit import (
    Control,
    Objective,
    Optimum,
)
from ngmm_formula.model import (
    Problem,
    lambda_blocks,
    matvec,
)
from ngmm_formula.networks import CentredNetwork
from ngmm_formula.results import Diagnostics, NGMMResult, ReducedRank
from ngmm_formula.train import TrainingHistory

__all__ = ["Prepared", "make_result", "variational_result"]


@dataclass(frozen=True)
class Prepared:
    """Everything up to the objective: the stages before optimisation."""

    design: Design
    family: Family
    approximation: Approximation
    problem: Problem


def variational_result(prepared: Prepared, obj: VariationalObjective, vfit: VariationalFit,
                       control: Control, *, formula: str, data_name: str | None, refit: Any,
                       nets: tuple[CentredNetwork, ...] = (), net_offset: torch.Tensor | None = None
                       ) -> NGMMResult:
    r"""An :class:`NGMMResult` from a variational fit (warns once).

    ``loglik`` is the ELBO (a lower bound; AIC, BIC and the deviance follow from it);
    ``ranef`` holds the variational means :math:`\Lambda m_l` with ``postVar``
    :math:`\Lambda S_l \Lambda^\top`; ``vcov`` is the inverse of the negative Hessian of
    the ELBO profiled over the variational parameters (NaN after a minibatch fit, where it is
    not computed). ``theta`` is on the absolute scale for every family (as ``glmer``'s; the
    relative-to-sigma convention of ``lmer`` belongs to the exact Gaussian integral).
    """
    design, fam, approx, pr = (prepared.design, prepared.family, prepared.approximation,
                               prepared.problem)
    module, params = obj.module, obj.params
    A = pr.standardisation.A
    sigma = float(module.log_sigma.detach().exp()) if module.log_sigma is not None else 1.0
    H = vfit.hessian
    beta_s = module.beta.detach().numpy().copy()
    cov_s = (_inv(-H)[:pr.p, :pr.p] if np.isfinite(H).all()
             else np.full((pr.p, pr.p), np.nan))
    beta = matvec(A, beta_s)
    names = list(design.fixed_names)
    fixef = pd.Series(beta, index=names, name="Estimate")
    vcov = pd.DataFrame(A @ cov_s @ A.T, index=names, columns=names)

    L_fit = [L.numpy() for L in lambda_blocks(module.theta.detach(), pr.q)]
    # b = Lambda m is unchanged by the sign of a column of Lambda (u's sign flips with it)
    with torch.no_grad():
        coefs = [params.mean[k].numpy() @ L.T for k, L in enumerate(L_fit)]
        condvar = []
        for k, L in enumerate(L_fit):
            R = params.chol(k).numpy()
            LR = np.einsum("ij,gjk->gik", L, R)
            condvar.append(LR @ np.transpose(LR, (0, 2, 1)))
    Ls = [L * np.where(np.diag(L) < 0, -1.0, 1.0)[None, :] for L in L_fit]
    theta = pd.Series([L[i, j] for L in Ls for i, j in tril_pairs(L.shape[0])],
                      index=design.theta_names, name="theta")
    varcorr = _varcorr(design, Ls, sigma if fam.name in ("gaussian", "gamma") else None)
    ranef = _ranef_frames(design, coefs, condvar)

    eta = design.offset + matvec(design.X, beta)
    if net_offset is not None:
        eta = eta + net_offset.cpu().numpy()
    for t, b in zip(design.re_terms, coefs):
        eta = eta + re_effect(t.Zraw, t.group_index, b)

    singular = _is_singular(Ls, 1.0, control.singular_tol)
    hessian_pd = bool(np.isfinite(H).all() and (H.size == 0
                                                or np.linalg.eigvalsh(-H).min() > 0))
    grad = vfit.gradient
    max_grad = float(np.max(np.abs(grad))) if grad.size else 0.0
    messages = _fit_messages(
        design, singular,
        None if vfit.converged else f"Variational fit did not converge ({vfit.message})",
        notes=["minibatch fit: standard errors not available"] if vfit.method == "adam" else [])
    diagnostics = Diagnostics(
        converged=vfit.converged, max_grad=max_grad, hessian_pd=hessian_pd, singular=singular,
        iterations=vfit.iterations, evaluations=vfit.evaluations,
        optimizer_message=vfit.message, messages=messages)
    npar = (pr.p + pr.n_theta + (1 if fam.has_dispersion else 0)
            + sum(net.n_weights for net in nets))
    return NGMMResult(
        formula=formula, family=fam, approximation=approx, design=design, fixef=fixef,
        vcov=vcov, theta=theta, sigma=sigma, loglik=vfit.elbo, npar=npar, varcorr=varcorr,
        ranef=ranef, eta=eta, diagnostics=diagnostics, data_name=data_name,
        random_coef=tuple(coefs), refit=refit, nets=nets)


def make_result(prepared: Prepared, obj: Objective, opt: Optimum, control: Control, *,
                formula: str, data_name: str | None, refit: Any,
                nets: tuple[CentredNetwork, ...] = (), net_offset: torch.Tensor | None = None,
                history: TrainingHistory | None = None) -> NGMMResult:
    """Turn the optimum into an :class:`NGMMResult` on the user's scale (warns once)."""
    design, fam, approx, pr = (prepared.design, prepared.family, prepared.approximation,
                               prepared.problem)
    module = obj.module
    A = pr.standardisation.A
    ll_blocks, mode = obj.all_blocks()  # every group's, also in a distributed fit
    loglik = float(ll_blocks.double().sum())
    if obj.shard is not None and obj.shard.presharded:  # a sharded read: this process's groups
        loglik = float(obj.reduce(np.array([loglik]))[0])
    sigma = float(module.log_sigma.detach().exp()) if module.log_sigma is not None else 1.0
    exact = approx.kind == "exact"

    # fixed effects and their covariance
    k_beta = 0 if pr.reml else pr.p
    H = opt.hessian
    D = pr.blocks.dim
    dev = mode.v.device
    beta_coords = (torch.arange(D - pr.p, D, device=dev) if pr.reml
                   else torch.zeros(0, dtype=torch.long, device=dev))
    # every tensor leaves the device here (and in float64): the result lives on the CPU
    mode_v = mode.v.cpu().double().numpy()
    if pr.reml:
        # beta is integrated with a flat prior: its covariance is the beta block of H^{-1}
        beta_s = mode_v[0, D - pr.p:]
        cov_s = (mode.factor.inverse_blocks(beta_coords[None, :])[0].cpu().double().numpy()
                 if pr.p else np.zeros((0, 0)))
    else:
        beta_s = module.beta.detach().cpu().double().numpy().copy()
        if opt.cov_beta is not None:
            cov_s = opt.cov_beta
        elif exact:
            cov_s = _inv(-H[:k_beta, :k_beta])
        else:
            cov_s = _inv(-H)[:k_beta, :k_beta]
    beta = matvec(A, beta_s)
    cov = A @ cov_s @ A.T
    names = list(design.fixed_names)
    fixef = pd.Series(beta, index=names, name="Estimate")
    vcov = pd.DataFrame(cov, index=names, columns=names)

    # covariance parameters: canonical signs, lme4's relative scale for Gaussian models
    theta_abs = module.theta.detach().cpu().double().clone()
    # L_fit carries the fit's signs (the conditional modes u belong to it); Ls the reported
    # ones (positive diagonal)
    L_fit = [L.numpy() for L in lambda_blocks(theta_abs, pr.q, pr.rank)]
    Ls = [L * np.where(np.diag(L) < 0, -1.0, 1.0)[None, :] for L in L_fit]
    rel = sigma if exact else 1.0
    theta_vals = [L[i, j] / rel for L in Ls for i, j in tril_pairs(*L.shape)]
    theta = pd.Series(theta_vals, index=design.theta_names, name="theta")

    # lme4 shows a Residual row for families with a scale parameter in VarCorr: gaussian and
    # Gamma (whose sigma is the coefficient of variation); not for the NB size
    varcorr = _varcorr(design, Ls, sigma if fam.name in ("gaussian", "gamma") else None)
    # lme4's postVar under REML is conditional on beta-hat: blocks of the inverse of the
    # u-block of H, not the u-blocks of the joint (u, beta) inverse (which would add the
    # uncertainty of beta)
    ranef, coefs, scores = _ranef(design, pr, approx, mode_v, mode.factor, beta_coords,
                                  L_fit)
    reduced = _reduced_rank(design, Ls, L_fit, scores, H, k_beta, opt.hessian_pd)

    eta = design.offset + matvec(design.X, beta)
    if net_offset is not None:
        eta = eta + net_offset.cpu().double().numpy()
    for t, b in zip(design.re_terms, coefs):
        eta = eta + re_effect(t.Zraw, t.group_index, b)

    # diagnostics: recorded on the result, one warning per outcome
    singular = _is_singular(Ls, rel, control.singular_tol)
    grad = opt.gradient
    scaled = np.abs(grad)
    if opt.hessian_pd and grad.size:
        scaled = np.abs(np.linalg.solve(np.linalg.cholesky(-H), grad))
    max_grad = float(np.max(np.minimum(scaled, np.abs(grad)))) if grad.size else 0.0
    convergence = None
    if not opt.converged:
        convergence = f"Model failed to converge with max|grad| = {max_grad:.6g} (tol = 0.002)"
    elif not opt.hessian_pd and not singular:
        convergence = "Model is nearly unidentifiable: the Hessian is not positive definite"
    messages = _fit_messages(design, singular, convergence,
                             approximation=_large_loadings(reduced, approx, fam))
    diagnostics = Diagnostics(
        converged=opt.converged, max_grad=max_grad, hessian_pd=opt.hessian_pd,
        singular=singular, iterations=opt.iterations, evaluations=opt.evaluations,
        optimizer_message=opt.message, messages=messages)
    npar = (pr.p + pr.n_theta + (1 if fam.has_dispersion else 0)
            + sum(net.n_weights for net in nets))
    return NGMMResult(
        formula=formula, family=fam, approximation=approx, design=design, fixef=fixef,
        vcov=vcov, theta=theta, sigma=sigma, loglik=loglik, npar=npar,
        varcorr=varcorr, ranef=ranef, eta=eta, diagnostics=diagnostics, data_name=data_name,
        random_coef=tuple(coefs), refit=refit, nets=tuple(net.cpu() for net in nets),
        history=history, reduced_rank=reduced,
    )


def _fit_messages(design: Design, singular: bool, convergence: str | None,
                  notes: Sequence[str] = (), approximation: str | None = None
                  ) -> tuple[str, ...]:
    """The messages of a fit in lme4's words and order (rank deficiency, singular fit,
    convergence, then ``approximation`` (:func:`_large_loadings`), ``notes`` and the rows
    dropped for missing values); each but the last two is also warned, once, with its
    class."""
    messages: list[str] = []

    def warn(msg: str, category: type[Warning]) -> None:
        messages.append(msg)
        warnings.warn(msg, category, stacklevel=5)

    if design.dropped_columns:
        warn(f"fixed-effect model matrix is rank deficient so dropping "
             f"{len(design.dropped_columns)} column / coefficient: "
             f"{', '.join(design.dropped_columns)}", RankDeficiencyWarning)
    if singular:
        warn("boundary (singular) fit: see help('isSingular')", SingularFitWarning)
    if convergence is not None:
        warn(convergence, ConvergenceWarning)
    if approximation is not None:
        warn(approximation, ApproximationWarning)
    messages.extend(notes)
    if design.n_dropped_na:
        messages.append(f"{design.n_dropped_na} observations deleted due to missingness")
    return tuple(messages)


#: a reduced-rank loading above this (link scale) makes the item a near-step function of the
#: scores, where the Laplace approximation is unreliable (:class:`ApproximationWarning`)
LARGE_LOADING = 10.0


def _large_loadings(reduced: Sequence[ReducedRank], approx: Approximation, family: Family
                    ) -> str | None:
    """The :class:`ApproximationWarning` message when a loading of an ``rr()`` term exceeds
    :data:`LARGE_LOADING` in absolute value (not for a Gaussian response with the identity
    link: its integral is exact -- through the Laplace path, the one Gaussian ``rr()`` models
    take -- and its loadings are on the data's scale, not a link scale), else None."""
    if family.name == "gaussian" and family.link.name == "identity":
        return None
    big = [(rr.columns[i], float(np.abs(rr.loadings[i]).max())) for rr in reduced
           for i in np.flatnonzero(np.abs(rr.loadings).max(axis=1) > LARGE_LOADING)]
    if not big:
        return None
    shown = ", ".join(f"{c} ({v:.3g})" for c, v in big[:5])
    more = f" and {len(big) - 5} more" if len(big) > 5 else ""
    advice = ("the Laplace approximation is unreliable there and may have a spurious "
              "maximum: refit with approx='agq'" if approx.kind == "laplace" else
              f"check the estimate with a larger nagq than {approx.nagq}"
              if approx.kind == "agq" else "check the fit with approx='agq'")
    return (f"implausibly large reduced-rank loading(s) (|loading| > {LARGE_LOADING:g} on the "
            f"link scale) for {shown}{more}: the responses are near-deterministic steps in "
            f"the scores; {advice}")


def _is_singular(Ls: list[np.ndarray], rel: float, tol: float) -> bool:
    """lme4's ``isSingular``: a relative SD (theta diagonal) below ``tol`` or a correlation
    of +-1. A reduced-rank term (q x d loadings, d < q) is rank-deficient by construction:
    only its diagonal loadings count."""
    singular = any(abs(L[i, i]) / rel < tol for L in Ls for i in range(min(L.shape)))
    for L in Ls:
        if L.shape[1] < L.shape[0]:
            continue
        S = L @ L.T
        d = np.sqrt(np.clip(np.diag(S), 1e-300, None))
        corr = S / np.outer(d, d)
        if L.shape[0] > 1 and np.any(np.abs(corr[np.tril_indices(L.shape[0], -1)]) > 1 - 1e-6):
            singular = True
    return singular


def _inv(M: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(M)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(M)


def _varcorr(design: Design, Ls: list[np.ndarray], residual_sd: float | None) -> pd.DataFrame:
    """R's ``as.data.frame(VarCorr(fit))``: variances, then covariances, per term."""
    rows: list[tuple[str, str | None, str | None, float, float]] = []
    for t, L in zip(design.re_terms, Ls):
        S = L @ L.T
        sd = np.sqrt(np.diag(S))
        for i in range(t.q):
            rows.append((t.name, t.cnms[i], None, S[i, i], sd[i]))
        for j in range(t.q):
            for i in range(j + 1, t.q):
                corr = S[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                rows.append((t.name, t.cnms[j], t.cnms[i], S[i, j], corr))
    if residual_sd is not None:
        rows.append(("Residual", None, None, residual_sd**2, residual_sd))
    return pd.DataFrame(rows, columns=["group", "var1", "var2", "vcov", "sdcor"])


#: The most entries (levels x q^2) of a reduced-rank term's conditional covariances of
#: :math:`b = \Lambda u` that ``ranef``'s ``postVar`` holds (400 MB); above, its grouping
#: factor has no ``postVar`` and the tools take the factored form
#: :math:`\Lambda \operatorname{Var}(u \mid y) \Lambda^\top` from ``fit.reduced_rank``.
POSTVAR_MAX_ENTRIES = 50_000_000


def _ranef(design: Design, pr: Problem, approx: Approximation, v: np.ndarray,
           factor: Factor, given: torch.Tensor, L_fit: list[np.ndarray]
           ) -> tuple[dict[str, pd.DataFrame], list[np.ndarray],
                      list[tuple[np.ndarray, np.ndarray]]]:
    r"""Conditional modes :math:`b = \Lambda u` and variances
    :math:`\Lambda (H^{-1})_{ll} \Lambda^\top` per grouping factor and level, the
    diagonal blocks of :math:`H^{-1}` from the factor (conditional on the coordinates
    ``given``: beta under REML). ``L_fit`` are the fitted :math:`\Lambda_k` with the signs
    the modes ``v`` belong to (b is unchanged when a column of both flips sign, but not when
    only one does). Also returns, per term, the modes :math:`u` and their conditional
    covariances (the factor scores of a reduced-rank term)."""
    coefs: list[np.ndarray] = []
    condvar: list[np.ndarray | None] = []
    scores: list[tuple[np.ndarray, np.ndarray]] = []
    start = 0
    D = pr.blocks.dim
    for t, L in zip(design.re_terms, L_fit):
        # a reduced-rank term integrates d coordinates per level (its factor scores)
        levels, cols = np.arange(t.n_levels)[:, None], np.arange(t.dim)[None, :]
        if approx.joint:  # lme4's Zt order: term offset + level * dim + column
            idx = start + levels * t.dim + cols
            u = v[0, idx]
            start += t.n_levels * t.dim
        else:  # one block per level, the term's coordinates at start..start+dim-1
            idx = levels * D + start + cols
            u = v[:, start:start + t.dim]
            start += t.dim
        with torch.no_grad():
            Vu = factor.inverse_blocks(torch.as_tensor(idx, device=given.device), given
                                       ).cpu().double().numpy()  # (levels, q, q)
        coefs.append(u @ L.T)
        # a reduced-rank term's (levels, q, q) can be far too large (30,000 students x 500^2
        # items: 60 GB): its factored form (Lambda, Vu) is in the fit's reduced_rank
        small = t.rank is None or t.n_levels * t.q ** 2 <= POSTVAR_MAX_ENTRIES
        condvar.append(np.einsum("ij,gjk,lk->gil", L, Vu, L) if small else None)
        scores.append((u, Vu))
    return _ranef_frames(design, coefs, condvar), coefs, scores


def _reduced_rank(design: Design, Ls: list[np.ndarray], L_fit: list[np.ndarray],
                  scores: list[tuple[np.ndarray, np.ndarray]], H: np.ndarray, k_beta: int,
                  hessian_pd: bool) -> tuple[ReducedRank, ...]:
    """The loadings (positive diagonal), their Wald standard errors from the inverse negative
    Hessian ``H`` over (beta, theta, ...) and the factor scores of each ``rr()`` term; a
    factor whose sign was flipped to make its diagonal loading positive flips its scores."""
    out = []
    start = k_beta
    cov = _inv(-H) if hessian_pd and H.size else None
    for t, L, L0, (u, Vu) in zip(design.re_terms, Ls, L_fit, scores):
        cells = tril_pairs(*L.shape)
        if t.rank is not None:
            se = np.zeros_like(L)
            for m, (i, j) in enumerate(cells):
                var = cov[start + m, start + m] if cov is not None else np.nan
                se[i, j] = np.sqrt(var) if var >= 0 else np.nan
            sign = np.where(np.diag(L0) < 0, -1.0, 1.0)
            out.append(ReducedRank(
                term=f"rr({t.expr} | {t.group}, d = {t.rank})", name=t.name, columns=t.cnms,
                levels=t.levels, loadings=L, loadings_se=se, scores=u * sign[None, :],
                scores_cov=Vu * sign[None, :, None] * sign[None, None, :]))
        start += len(cells)
    return tuple(out)


def _ranef_frames(design: Design, coefs: list[np.ndarray], condvar: list[np.ndarray | None]
                  ) -> dict[str, pd.DataFrame]:
    """lme4's ``ranef``: one frame per grouping factor (the terms of a factor side by side)
    with the conditional variances of each level as ``attrs["postVar"]`` (q, q, levels)."""
    ranef: dict[str, pd.DataFrame] = {}
    postvar: dict[str, list[np.ndarray | None]] = {}
    parts: dict[str, list[tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]]] = {}
    for t, b, V in zip(design.re_terms, coefs, condvar):
        parts.setdefault(t.group, []).append((b, t.cnms, t.levels))
        postvar.setdefault(t.group, []).append(V)
    for g, terms in parts.items():  # the terms of a factor side by side (the same levels)
        ranef[g] = pd.DataFrame(np.hstack([b for b, _, _ in terms]),
                                index=pd.Index(terms[0][2], name=g),
                                columns=[c for _, cnms, _ in terms for c in cnms])
    for g, maybe in postvar.items():
        Vs = [V for V in maybe if V is not None]
        if len(Vs) < len(maybe):  # a large reduced-rank term: see _ranef
            continue
        q = sum(V.shape[1] for V in Vs)
        P = np.zeros((q, q, Vs[0].shape[0]))
        k = 0
        for V in Vs:
            m = V.shape[1]
            P[k:k + m, k:k + m, :] = np.transpose(V, (1, 2, 0))
            k += m
        ranef[g].attrs["postVar"] = P
    return ranef
