r"""Inference after the fit: confidence intervals and standard errors of predictions.

:func:`confint` gives lme4's three kinds of interval, in lme4's layout (variance parameters
first, then the fixed effects; rows ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``,
``sd_Days|Subject``, ``sigma``, ``(Intercept)``, ... as ``confint(fit, oldNames = FALSE)``):

* ``"wald"`` -- :math:`\hat\beta_j \pm z_{1-\alpha/2} \sqrt{V_{jj}}` with :math:`V` = ``fit.vcov``;
  the variance parameters are ``NaN``, as lme4's ``confint(fit, method = "Wald")``.
* ``"profile"`` -- likelihood-profile intervals, as lme4's ``profile`` + ``confint.thpr``.
  For each parameter :math:`\phi_j` on lme4's scale (standard deviations, correlations,
  sigma, fixed effects) the deviance :math:`d(\phi_j) = -2 \max_{\phi_{-j}} \ell(\phi)` is
  computed by re-optimising every other parameter, and the interval is where the signed root

  .. math::

      \zeta(\phi_j) = \operatorname{sign}(\phi_j - \hat\phi_j)\sqrt{d(\phi_j) - d(\hat\phi)}

  crosses :math:`\pm z_{1-\alpha/2}`. lme4 evaluates :math:`\zeta` on a grid and inverts an
  interpolating spline; here a root finder (Brent's method) solves
  :math:`\zeta(\phi_j) = \pm z` on the exact profile. As lme4 1.1-31 the profile is of the
  *maximum-likelihood* deviance also for REML fits (lme4's ``devfun2`` calls ``refitML``);
  a standard deviation whose profile does not reach :math:`-z` before 0 gets the lower limit 0,
  a correlation the limit :math:`\pm 1` (lme4's ``lower``/``upper``).
* ``"boot"`` -- parametric bootstrap, as lme4's ``bootMer`` with new random effects
  (``use.u = FALSE``) and percentile intervals (``boot.ci(type = "perc")``, whose
  interpolation between order statistics :func:`_norm_inter` reproduces). The responses are
  simulated in this process (so a seed gives the same intervals whatever the number of
  workers) and refitted with :func:`ngmm_formula.ngmm` in worker processes started from a
  ``forkserver`` that imports torch and the package once (a few seconds, paid on the first
  call of a session only); each worker fits with one torch and one BLAS thread.

:func:`predict_se` gives standard errors of the linear predictor.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.optimize
import torch
from scipy.stats import norm

from ngmm_formula.approx import Approximation
from ngmm_formula.design import re_loaded, re_quadratic, tril_pairs
from ngmm_formula.errors import ConvergenceWarning, DataError, NGMMError
from ngmm_formula.fit import Control, Objective, torch_threads
from ngmm_formula.model import LinearPredictor, build_problem
from ngmm_formula.results import NGMMResult
from ngmm_formula.runtime import mp_context

__all__ = ["confint", "parameter_names", "parameters", "predict_se", "profile"]

_COR_EPS = 1e-9  # correlations are kept inside (-1, 1) where the Cholesky factor exists


# ============================================================================================
# parameters on lme4's scale


def _has_sigma_row(fit: NGMMResult) -> bool:
    """lme4 lists sigma for families with a scale parameter (gaussian, Gamma), not for NB."""
    return fit.family.name in ("gaussian", "gamma")


def _vc_names(fit: NGMMResult, old_names: bool = False) -> list[str]:
    """Names of the variance parameters, as lme4's ``tnames(fit, old = FALSE)`` + sigma.

    Per term, the lower triangle column by column: ``sd_<column>|<group>`` on the diagonal,
    ``cor_<row>.<column>|<group>`` below it. ``old_names=True`` gives ``.sig01``, ...,
    ``.sigma`` (lme4's default ``oldNames = TRUE``).
    """
    names = [f"load_{t.cnms[i]}.F{j + 1}|{t.group}" if t.rank is not None
             else f"sd_{t.cnms[i]}|{t.group}" if i == j
             else f"cor_{t.cnms[i]}.{t.cnms[j]}|{t.group}"
             for t in fit.design.re_terms for i, j in tril_pairs(t.q, t.rank)]
    if old_names:
        names = [f".sig{k + 1:02d}" for k in range(len(names))]
    if _has_sigma_row(fit):
        names.append(".sigma" if old_names else "sigma")
    return names


def parameter_names(fit: NGMMResult, old_names: bool = False) -> list[str]:
    """Row names of :func:`confint`: variance parameters, then fixed effects."""
    return _vc_names(fit, old_names) + list(fit.fixef.index)


def _sdcor(L: np.ndarray) -> np.ndarray:
    """Standard deviations and correlations of :math:`L L^\\top`, lme4's theta order."""
    S = L @ L.T
    sd = np.sqrt(np.clip(np.diag(S), 0.0, None))
    return np.array([sd[i] if i == j else (S[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0
                                           else 0.0)
                     for i, j in tril_pairs(L.shape[0])])


def _abs_cholesky(fit: NGMMResult) -> list[np.ndarray]:
    """Absolute-scale Cholesky factor of each term's covariance (from lme4's relative theta);
    a reduced-rank term's q x d loadings."""
    scale = fit.sigma if fit.approximation.kind == "exact" else 1.0
    theta = fit.theta.to_numpy()
    out, start = [], 0
    for t in fit.design.re_terms:
        L = np.zeros((t.q, t.dim))
        for (r, c), v in zip(tril_pairs(t.q, t.rank), theta[start:start + t.n_theta]):
            L[r, c] = v * scale
        start += t.n_theta
        out.append(L)
    return out


def parameters(fit: NGMMResult, old_names: bool = False) -> pd.Series:
    """The estimates in :func:`confint`'s order: SDs and correlations (the loadings of a
    reduced-rank term), sigma, fixed effects.

    What lme4's ``bootMer`` collects by default (its ``confint`` ``bootFun``).
    """
    vals = [v for L in _abs_cholesky(fit) for v in _vc_values(L)]
    if _has_sigma_row(fit):
        vals.append(fit.sigma)
    vals.extend(fit.fixef.to_numpy())
    return pd.Series(vals, index=parameter_names(fit, old_names), name="estimate")


def _vc_values(L: np.ndarray) -> list[float]:
    """A term's variance parameters: SDs and correlations of :math:`L L^\top`, or the free
    loadings of a reduced-rank term (q x d, d < q)."""
    if L.shape[1] < L.shape[0]:
        return [float(L[i, j]) for i, j in tril_pairs(*L.shape)]
    return list(_sdcor(L))


def _select(names: list[str], parm: Any, n_vc: int) -> list[str]:
    """lme4's ``parm``: None (all), names, 0-based positions, or "theta_" / "beta_"."""
    if parm is None:
        return list(names)
    items = [parm] if isinstance(parm, (str, int)) else list(parm)
    out: list[str] = []
    for p in items:
        if isinstance(p, str) and p == "theta_":
            out.extend(names[:n_vc])
        elif isinstance(p, str) and p == "beta_":
            out.extend(names[n_vc:])
        elif isinstance(p, str):
            if p not in names:
                raise NGMMError(f"parm {p!r} is not a parameter; the parameters are {names}")
            out.append(p)
        elif isinstance(p, (int, np.integer)) and not isinstance(p, bool):
            if not 0 <= p < len(names):
                raise NGMMError(f"parm position {p} is out of range 0..{len(names) - 1}")
            out.append(names[int(p)])
        else:
            raise NGMMError(f"parm must hold names, positions or 'theta_'/'beta_'; got {p!r}")
    return [n for n in names if n in set(out)]


def _percent_labels(level: float) -> list[str]:
    """R's ``format.perc(c(a, 1 - a), 3)``: "2.5 %", "97.5 %"."""
    if not 0 < level < 1:
        raise NGMMError(f"level must be between 0 and 1, got {level!r}")
    a = (1 - level) / 2
    probs = [100 * a, 100 * (1 - a)]
    decimals = 0
    for p in probs:  # decimals needed to show each at 3 significant digits
        d = max(0, 3 - 1 - int(math.floor(math.log10(abs(p))))) if p else 0
        s = f"{p:.{d}f}".rstrip("0").rstrip(".") if d else f"{p:.0f}"
        decimals = max(decimals, len(s.split(".")[1]) if "." in s else 0)
    return [f"{p:.{decimals}f} %" for p in probs]


def _frame(names: list[str], lo: npt.ArrayLike, hi: npt.ArrayLike, level: float
           ) -> pd.DataFrame:
    cols = _percent_labels(level)
    return pd.DataFrame({cols[0]: np.asarray(lo, dtype=float),
                         cols[1]: np.asarray(hi, dtype=float)}, index=pd.Index(names))


# ============================================================================================
# confint


def confint(fit: NGMMResult, method: str = "wald", level: float = 0.95, *,
            parm: Any = None, data: pd.DataFrame | None = None, nsim: int = 500,
            seed: int | None = 0, old_names: bool = False, workers: int = 2,
            **fit_kwargs: Any) -> pd.DataFrame:
    """Confidence intervals for the parameters, as lme4's ``confint(fit, oldNames = FALSE)``.

    Parameters
    ----------
    fit : NGMMResult
    method : {"wald", "profile", "boot"}
        See the module documentation. ``"profile"`` needs a model without ``nn()`` terms;
        ``"boot"`` needs ``data``.
    level : float
        Confidence level.
    parm : None, str, int or sequence
        Parameters: names (``"Days"``, ``"sd_Days|Subject"``), 0-based positions, or lme4's
        ``"theta_"`` (all variance parameters) and ``"beta_"`` (all fixed effects).
    data : DataFrame
        The data the model was fitted to (``"boot"`` only: each simulated response replaces
        the response column(s) and the model is refitted with :func:`ngmm_formula.ngmm`).
    nsim : int
        Number of bootstrap samples.
    seed : int or None
        Seed of the bootstrap simulations (the intervals are reproducible for a given seed).
    old_names : bool
        lme4's ``oldNames = TRUE`` row names (``.sig01``, ``.sigma``).
    workers : int
        Worker processes for the bootstrap refits (1 refits in this process). The workers
        import the main script again, as every Python multiprocessing program: in a script
        the call must sit under ``if __name__ == "__main__":``; a script without that block
        gets an NGMMError that says so (before any worker starts) rather than being re-run
        in every worker.
    **fit_kwargs
        Extra arguments of the refits (``weights=``, ``offset=``, ``control=``), which
        results do not record; ``approx``, ``nagq``, ``truncation``, ``points`` and ``reml``
        default to the fit's.

    Returns
    -------
    DataFrame
        One row per parameter, columns ``"2.5 %"`` and ``"97.5 %"`` (for ``level=0.95``).
        Profile and bootstrap intervals carry the estimates in ``.attrs["estimate"]``;
        bootstrap ones also the replicates (``.attrs["replicates"]``, one row per simulation,
        NaN for a refit that failed), ``.attrs["n_failed"]``, ``.attrs["errors"]`` (their
        messages) and ``.attrs["n_not_converged"]`` (refits kept despite a convergence
        warning, as lme4's ``bootMer`` keeps them).
    """
    m = method.lower()
    if m in ("profile", "boot") and fit.reduced_rank:
        raise NGMMError(f"method={method!r} intervals are not available for reduced-rank terms "
                        f"({fit.reduced_rank[0].term}) yet; use method='wald' (Wald intervals "
                        "of the loadings from their standard errors)")
    names = parameter_names(fit, old_names)
    n_vc = len(names) - len(fit.fixef)
    chosen = _select(names, parm, n_vc)
    if m == "wald":
        return _wald(fit, level, names, n_vc).loc[chosen]
    if m == "profile":
        pr = profile(fit, parm=[names.index(c) for c in chosen], level=level)
        out = _frame(chosen, pr["lower"].to_numpy(), pr["upper"].to_numpy(), level)
        out.attrs["estimate"] = pr["estimate"].to_numpy()
        return out
    if m == "boot":
        if data is None:
            raise NGMMError("method='boot' refits the model to simulated responses: pass "
                            "data= (the data frame the model was fitted to)")
        return _boot(fit, data, level, nsim, seed, old_names, workers, fit_kwargs).loc[chosen]
    raise NGMMError(f"method must be 'wald', 'profile' or 'boot'; got {method!r}")


def _wald(fit: NGMMResult, level: float, names: list[str], n_vc: int) -> pd.DataFrame:
    """Wald intervals of the fixed effects (NaN for SDs and correlations, as lme4) and of the
    loadings of reduced-rank terms (from :meth:`~ngmm_formula.results.NGMMResult.loadings`)."""
    z = norm.ppf(1 - (1 - level) / 2)
    se = np.sqrt(np.diag(fit.vcov.to_numpy()))
    beta = fit.fixef.to_numpy()
    vc_lo, vc_hi = np.full(n_vc, np.nan), np.full(n_vc, np.nan)
    reduced = {rr.name: rr for rr in fit.reduced_rank}
    start = 0
    for t in fit.design.re_terms:
        if t.name in reduced:
            rr = reduced[t.name]
            est = np.array([rr.loadings[i, j] for i, j in tril_pairs(t.q, t.rank)])
            s = np.array([rr.loadings_se[i, j] for i, j in tril_pairs(t.q, t.rank)])
            vc_lo[start:start + t.n_theta] = est - z * s
            vc_hi[start:start + t.n_theta] = est + z * s
        start += t.n_theta
    lo = np.concatenate([vc_lo, beta - z * se])
    hi = np.concatenate([vc_hi, beta + z * se])
    return _frame(names, lo, hi, level)


# ============================================================================================
# profile


class _NotPositiveDefinite(Exception):
    pass


class _ProfileObjective:
    r"""The (approximate) maximum-likelihood log-likelihood on lme4's profiling scale.

    :math:`\phi` = (per term: SDs and correlations in theta order; sigma when the family has
    a dispersion parameter; the fixed effects on the user's scale). The map to the engine's
    parameters is :math:`\Lambda_k = \operatorname{diag}(s_k)\,\operatorname{chol}(R_k)`
    (absolute scale), :math:`\log\sigma`, :math:`\beta_s = A^{-1}\beta`; gradients are the
    engine's exact ones pulled back through this map by autograd.
    """

    def __init__(self, fit: NGMMResult):
        if fit.nets:
            raise NGMMError("profile intervals need a model without nn() terms (the networks "
                            "are not re-optimised); use method='wald' or 'boot'")
        design, fam = fit.design, fit.family
        approx = fit.approximation
        if approx.kind == "variational":
            raise NGMMError("profile intervals of a variational fit are not available (the "
                            "profile would need the ELBO maximised over the variational "
                            "parameters at every point); use method='wald' or 'boot'")
        if approx.reml:  # lme4 1.1-31 profiles the ML deviance (devfun2 calls refitML)
            approx = Approximation("exact", reml=False,
                                   joint=len(design.grouping_factors) != 1)
        self.fit = fit
        self.problem = build_problem(design, fam, approx)
        self.module = LinearPredictor(self.problem, fam.has_dispersion)
        self.obj = Objective(self.problem, fam, approx, self.module)
        self.A_inv = torch.as_tensor(np.linalg.inv(self.problem.standardisation.A))
        self.q = self.problem.q
        self.n_vc = sum(k * (k + 1) // 2 for k in self.q)
        self.has_dispersion = fam.has_dispersion
        self.p = self.problem.p
        lower, upper, is_cor = [], [], []
        for k in self.q:
            for i, j in tril_pairs(k):
                lower.append(0.0 if i == j else -1.0 + _COR_EPS)
                upper.append(math.inf if i == j else 1.0 - _COR_EPS)
                is_cor.append(i != j)
        if self.has_dispersion:
            lower.append(1e-10 * max(fit.sigma, 1e-300))
            upper.append(math.inf)
            is_cor.append(False)
        lower.extend([-math.inf] * self.p)
        upper.extend([math.inf] * self.p)
        is_cor.extend([False] * self.p)
        self.lower, self.upper = np.array(lower), np.array(upper)
        self.is_cor = np.array(is_cor)
        self.n_eval = 0

    @property
    def size(self) -> int:
        return self.n_vc + int(self.has_dispersion) + self.p

    def start(self) -> np.ndarray:
        """The fit's estimates as phi (for NB fits the dispersion is the fit's sigma)."""
        fit = self.fit
        vals = [v for L in _abs_cholesky(fit) for v in _sdcor(L)]
        if self.has_dispersion:
            vals.append(fit.sigma)
        vals.extend(fit.fixef.to_numpy())
        return np.clip(np.array(vals, dtype=float), self.lower, self.upper)

    def _engine(self, phi: torch.Tensor) -> list[torch.Tensor]:
        """[beta_s, theta, log_sigma] (the order of the module's parameters)."""
        thetas, k = [], 0
        for q in self.q:
            n = q * (q + 1) // 2
            vals = phi[k:k + n]
            k += n
            if q == 1:
                thetas.append(vals)
                continue
            pairs = tril_pairs(q)
            diag = [m for m, (i, j) in enumerate(pairs) if i == j]
            sd = vals[diag]
            R = torch.eye(q, dtype=phi.dtype)
            off = [(m, i, j) for m, (i, j) in enumerate(pairs) if i != j]
            idx_m = torch.tensor([m for m, _, _ in off])
            rows = torch.tensor([i for _, i, _ in off])
            cols = torch.tensor([j for _, _, j in off])
            R = R.index_put((rows, cols), vals[idx_m]).index_put((cols, rows), vals[idx_m])
            C, info = torch.linalg.cholesky_ex(R)
            if int(info) != 0:
                raise _NotPositiveDefinite
            L = sd[:, None] * C
            r_all = torch.tensor([i for i, _ in pairs])
            c_all = torch.tensor([j for _, j in pairs])
            thetas.append(L[r_all, c_all])
        out = [self.A_inv @ phi[k + int(self.has_dispersion):], torch.cat(thetas)]
        if self.has_dispersion:
            out.append(torch.log(phi[k]))
        return out

    def value_and_grad(self, phi_np: np.ndarray) -> tuple[float, np.ndarray]:
        """Log-likelihood at phi and its gradient (-inf outside the parameter space)."""
        self.n_eval += 1
        phi = torch.tensor(phi_np, dtype=torch.float64, requires_grad=True)
        try:
            engine = self._engine(phi)
        except _NotPositiveDefinite:
            return -math.inf, np.zeros_like(phi_np)
        m = self.module
        params = [m.beta, m.theta] + ([m.log_sigma] if m.log_sigma is not None else [])
        with torch.no_grad():
            for p, v in zip(params, engine):
                p.copy_(v)
        ll = self.obj()
        if not torch.isfinite(ll):
            self.obj.mode = None  # a failed mode search must not warm-start the next one
            return -math.inf, np.zeros_like(phi_np)
        grads = torch.autograd.grad(ll, params, allow_unused=True)
        # pull back through phi -> engine: the gradient of sum(engine * grad) in phi (a
        # scalar backward, no grad_outputs)
        pulled = sum(((e * g.detach()).sum() for e, g in zip(engine, grads)
                      if g is not None and e.numel()), torch.zeros((), dtype=phi.dtype))
        g = np.zeros_like(phi_np)
        if pulled.requires_grad:
            (g_phi,) = torch.autograd.grad(pulled, phi, allow_unused=True)
            if g_phi is not None:
                g = g_phi.detach().numpy()
        return float(ll.detach()), g

    def maximise(self, phi0: np.ndarray, free: np.ndarray, scale: np.ndarray
                 ) -> tuple[float, np.ndarray]:
        """Maximise over the ``free`` entries of phi from ``phi0`` (L-BFGS-B, box bounds)."""
        phi0 = np.clip(phi0, self.lower, self.upper)
        if not free.any():
            return self.value_and_grad(phi0)[0], phi0
        s = scale[free]

        def f(x: np.ndarray) -> tuple[float, np.ndarray]:
            phi = phi0.copy()
            phi[free] = x * s
            v, g = self.value_and_grad(phi)
            if not math.isfinite(v):
                return 1e300, np.zeros_like(x)
            return -v, -g[free] * s

        bounds = list(zip(self.lower[free] / s, self.upper[free] / s))
        res = scipy.optimize.minimize(
            f, phi0[free] / s, jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": 2000, "maxcor": 20, "ftol": 1e-15, "gtol": 1e-9,
                     "maxls": 50})
        phi = phi0.copy()
        phi[free] = res.x * s
        return -float(res.fun), phi

    def curvature_se(self, phi: np.ndarray) -> np.ndarray:
        """Standard errors from a central-difference Hessian of the exact gradient (NaN where
        the Hessian is not positive definite); used to scale and to start the search."""
        k = phi.size
        H = np.empty((k, k))
        for j in range(k):
            h = 1e-5 * max(abs(phi[j]), 1e-2)
            up, dn = phi.copy(), phi.copy()
            up[j] = min(phi[j] + h, self.upper[j])
            dn[j] = max(phi[j] - h, self.lower[j])
            H[:, j] = ((self.value_and_grad(up)[1] - self.value_and_grad(dn)[1])
                       / (up[j] - dn[j]))
        H = 0.5 * (H + H.T)
        try:
            cov = np.linalg.inv(-H)
            se = np.sqrt(np.where(np.diag(cov) > 0, np.diag(cov), np.nan))
        except np.linalg.LinAlgError:
            se = np.full(k, np.nan)
        return se


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread and, when threadpoolctl is installed, one BLAS thread.

    scipy's L-BFGS-B makes many tiny BLAS calls; with a multi-threaded OpenBLAS each costs
    thread hand-offs (measured: 2-8 ms per iteration instead of 0.1 ms on a 2-core machine).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(1))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: only a speed-up
            pass
        else:
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        yield


def profile(fit: NGMMResult, parm: Any = None, level: float = 0.95, *,
            xtol: float = 1e-7) -> pd.DataFrame:
    r"""Likelihood-profile confidence limits (see the module documentation).

    Parameters
    ----------
    fit : NGMMResult
        A model without ``nn()`` terms (any family; the reference comparisons are for
        ``lmer`` models, the only ones lme4 profiles with a free scale parameter).
    parm : None or sequence
        As :func:`confint`'s.
    level : float
    xtol : float
        Tolerance of the root, relative to the parameter's standard error.

    Returns
    -------
    DataFrame
        Index: the parameter names; columns ``estimate`` (at the maximum-likelihood
        optimum), ``lower``, ``upper``, ``zeta_lower``/``zeta_upper`` (the signed root at
        each limit: :math:`\mp z` unless the limit is a boundary) and ``evaluations``.
    """
    with _one_thread():
        return _profile(fit, parm, level, xtol)


def _profile(fit: NGMMResult, parm: Any, level: float, xtol: float) -> pd.DataFrame:
    po = _ProfileObjective(fit)
    # phi always carries the dispersion; lme4 reports it for gaussian and Gamma only
    vc_names = _vc_names(fit)
    if po.has_dispersion and not _has_sigma_row(fit):
        vc_names.append("dispersion")  # the NB size: profiled out, not reported
    names_all = vc_names + list(fit.fixef.index)
    reported = parameter_names(fit)
    chosen = _select(reported, parm, len(reported) - len(fit.fixef))
    z = float(norm.ppf(1 - (1 - level) / 2))

    # the maximum-likelihood optimum on this scale (the ML refit of a REML fit)
    free_all = np.ones(po.size, dtype=bool)
    phi_hat = po.start()
    se = po.curvature_se(phi_hat)
    scale = _scales(phi_hat, se, po.is_cor)
    ll_hat, phi_hat = po.maximise(phi_hat, free_all, scale)
    se = po.curvature_se(phi_hat)
    scale = _scales(phi_hat, se, po.is_cor)

    rows = []
    excess = [0.0]  # largest log-likelihood found above the optimum (should be ~0)
    for name in chosen:
        j = names_all.index(name)
        free = free_all.copy()
        free[j] = False
        start_evals = po.n_eval
        cache: dict[float, tuple[float, np.ndarray]] = {float(phi_hat[j]): (0.0, phi_hat)}

        def zeta(v: float, j: int = j, free: np.ndarray = free,
                 cache: dict[float, tuple[float, np.ndarray]] = cache) -> float:
            if v in cache:
                return cache[v][0]
            # warm start from the nearest point already profiled
            near = min(cache, key=lambda u: abs(u - v))
            phi0 = cache[near][1].copy()
            phi0[j] = v
            ll, phi = po.maximise(phi0, free, scale)
            excess[0] = max(excess[0], ll - ll_hat)
            dev = max(0.0, 2.0 * (ll_hat - ll))
            zz = math.copysign(math.sqrt(dev), v - phi_hat[j])
            cache[v] = (zz, phi)
            return zz

        limits, zetas = [], []
        for direction in (-1.0, 1.0):
            lim, zz = _limit(zeta, float(phi_hat[j]), direction, z,
                             float(se[j]) if np.isfinite(se[j]) else float(scale[j]),
                             float(po.lower[j]), float(po.upper[j]), xtol)
            if po.is_cor[j] and abs(lim) >= 1.0 - 2 * _COR_EPS:
                lim = math.copysign(1.0, lim)  # the bound lme4 reports
            limits.append(lim)
            zetas.append(zz)
        rows.append((name, phi_hat[j], limits[0], limits[1], zetas[0], zetas[1],
                     po.n_eval - start_evals))
    out = pd.DataFrame(rows, columns=["parameter", "estimate", "lower", "upper", "zeta_lower",
                                      "zeta_upper", "evaluations"]).set_index("parameter")
    out.index.name = None
    out.attrs["loglik_ml"] = ll_hat
    if excess[0] > 1e-6:
        # lme4 stops here ("profiling detected new, lower deviance"); the limits are still
        # those of a profile, relative to a log-likelihood that was not the maximum
        warnings.warn(f"profiling found a log-likelihood {excess[0]:.3g} above the fit's "
                      "maximum: the fit had not converged; refit before trusting the "
                      "intervals", ConvergenceWarning, stacklevel=3)
    return out


def _scales(phi: np.ndarray, se: np.ndarray, is_cor: np.ndarray) -> np.ndarray:
    """Variable scaling of the inner optimisations: the standard errors where available."""
    fallback = np.where(is_cor, 0.1, np.maximum(0.1 * np.abs(phi), 1e-3))
    ok = np.isfinite(se) & (se > 0)
    return np.where(ok, se, fallback)


def _limit(zeta: Any, est: float, direction: float, z: float, step: float, lower: float,
           upper: float, xtol: float) -> tuple[float, float]:
    """Solve zeta(v) = direction * z on one side of the estimate.

    Steps out from the estimate (a first guess at the Wald limit, then secant
    extrapolations of zeta, at most 10x the distance covered) until zeta passes the target
    or the bound is reached, then Brent's method on the bracket. Returns the limit and zeta
    there (the bound itself, with its zeta, when the target is not reached: lme4's
    ``lower``/``upper``).
    """
    target = direction * z
    bound = lower if direction < 0 else upper
    if (direction < 0 and est <= lower) or (direction > 0 and est >= upper):
        return bound, 0.0
    inside_v, inside_z = est, 0.0
    v = est + direction * z * step
    for _ in range(60):
        v = min(max(v, lower), upper)
        zv = zeta(v)
        if direction * zv >= z:
            f = lambda u: zeta(u) - target  # noqa: E731
            tol = xtol * step
            root = scipy.optimize.brentq(f, min(inside_v, v), max(inside_v, v), xtol=tol,
                                         rtol=4 * np.finfo(float).eps)
            return float(root), zeta(float(root))
        if v == bound:
            return bound, zv
        # secant extrapolation through the last two points, aiming slightly past the target
        slope = (zv - inside_z) / (v - inside_v) if v != inside_v else 0.0
        dist = abs(v - est)
        if slope * direction > 0:
            nxt = v + 1.05 * (target - zv) / slope
        else:
            nxt = v + direction * dist
        nxt = v + direction * min(abs(nxt - v), 10 * dist)
        nxt = v + direction * max(abs(nxt - v), 1e-3 * dist)
        inside_v, inside_z = v, zv
        v = nxt
        if math.isinf(v):
            break
    raise NGMMError(f"the profile did not reach zeta = {target:.3g} (last value "
                    f"{inside_z:.3g} at {inside_v:.6g})")


# ============================================================================================
# parametric bootstrap


@dataclass(frozen=True)
class _BootJob:
    """What every bootstrap worker needs once (sent with the worker's initialiser)."""

    formula: str
    data: pd.DataFrame
    family: Any
    kwargs: dict[str, Any]
    response: tuple[str, ...]  # the column(s) written: (name,) or (successes[, failures])
    kind: str  # "numeric", "binary", "levels", "cbind"
    levels: tuple[str, str] | None
    trials: np.ndarray | None
    old_names: bool
    n_params: int


_JOB: _BootJob | None = None


def _init_worker(job: _BootJob) -> None:
    global _JOB
    _JOB = job
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up (see _one_thread)
        pass
    else:
        threadpool_limits(limits=1, user_api="blas")


def _refit_one(args: tuple[pd.Index, np.ndarray]) -> tuple[np.ndarray, bool, str | None]:
    """Refit the model to one simulated response: (parameters, converged, error).

    A refit that raises gives NaN parameters and its error message (lme4's ``bootMer``
    likewise records failed refits as NA); non-converged refits are kept and counted.
    """
    from ngmm_formula.api import ngmm

    job = _JOB
    assert job is not None
    rows, ysim = args
    data = _with_response(job, rows, ysim)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refit = ngmm(job.formula, data, job.family, **job.kwargs)
        return (parameters(refit, job.old_names).to_numpy(), refit.diagnostics.converged,
                None)
    except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError) as e:
        return np.full(job.n_params, np.nan), False, f"{type(e).__name__}: {e}"


def _with_response(job: _BootJob, rows: pd.Index, ysim: np.ndarray) -> pd.DataFrame:
    """The data with the simulated response written into the response column(s)."""
    data = job.data.copy()
    if job.kind == "numeric":
        col = job.response[0]
        data[col] = data[col].astype(float)
        data.loc[rows, col] = ysim
    elif job.kind == "binary":
        col = job.response[0]
        data.loc[rows, col] = ysim.astype(bool) if data[col].dtype == bool else ysim
    elif job.kind == "levels":
        assert job.levels is not None
        col = job.response[0]
        values = np.where(ysim > 0.5, job.levels[1], job.levels[0])
        new = data[col].astype(object)
        new.loc[rows] = values
        data[col] = (new.astype(pd.CategoricalDtype(list(job.levels)))
                     if isinstance(data[col].dtype, pd.CategoricalDtype) else new)
    else:  # cbind(successes, failures)
        assert job.trials is not None
        successes = np.rint(ysim * job.trials)
        data[job.response[0]] = data[job.response[0]].astype(float)
        data.loc[rows, job.response[0]] = successes
        if len(job.response) > 1:
            data[job.response[1]] = data[job.response[1]].astype(float)
            data.loc[rows, job.response[1]] = job.trials - successes
    return data


def _boot_job(fit: NGMMResult, data: pd.DataFrame, old_names: bool,
              fit_kwargs: dict[str, Any]) -> _BootJob:
    if fit.nets:
        # a neural refit per simulation is possible but slow; keep the user in charge
        warnings.warn("bootstrapping a neural fit retrains the networks for every "
                      "simulation", stacklevel=3)
    design = fit.design
    if not data.index.is_unique:
        raise NGMMError("method='boot' needs data with a unique index (the simulated "
                        "responses are written by row label)")
    rows = design.row_index
    if not rows.isin(data.index).all():
        raise NGMMError("data= is not the data frame the model was fitted to (rows are "
                        "missing)")
    pf = design.spec.formula
    trials = None
    levels = None
    if pf.response_cbind is not None:
        s, f = pf.response_cbind
        if s not in data.columns:
            raise NGMMError(f"method='boot' writes simulated successes into the column '{s}' "
                            f"of cbind({s}, {f}); the success count must be a data column")
        if "weights" in fit_kwargs and fit_kwargs["weights"] is not None:
            raise NGMMError("method='boot' with a cbind() response and weights= is not "
                            "supported: the number of trials is not recoverable")
        trials = np.rint(design.weights)
        response: tuple[str, ...] = (s, f) if f in data.columns else (s,)
        kind = "cbind"
    else:
        name = pf.response
        if name is None or name not in data.columns:
            raise NGMMError(f"method='boot' writes simulated responses into the response "
                            f"column; the response '{pf.lhs}' is not a column of data "
                            "(transform it in the data frame first)")
        response = (name,)
        col = data[name]
        if design.spec.binomial_levels is not None:
            kind, levels = "levels", design.spec.binomial_levels
        elif fit.family.name == "binomial" and pd.api.types.is_bool_dtype(col):
            kind = "binary"
        else:
            kind = "numeric"
    # the response in data must be the fit's (y: proportions for binomial, 0/1 for factors)
    col = data.loc[rows, response[0]]
    if kind == "cbind":
        assert trials is not None
        same = np.allclose(col.to_numpy(dtype=float), design.y * trials)
    elif kind == "levels":
        assert levels is not None
        same = np.array_equal((col.astype(str) == levels[1]).to_numpy(), design.y == 1.0)
    else:
        same = np.allclose(col.to_numpy(dtype=float), design.y)
    if not same:
        raise NGMMError(f"data= is not the data frame the model was fitted to: its response "
                        f"'{pf.lhs}' differs from the fit's")
    kwargs = _refit_options(fit)
    kwargs["control"] = Control(threads=1, progress=False)
    kwargs.update(fit_kwargs)
    return _BootJob(formula=fit.formula, data=data, family=fit.family, kwargs=kwargs,
                    response=response, kind=kind, levels=levels, trials=trials,
                    old_names=old_names, n_params=len(parameter_names(fit, old_names)))


def _refit_options(fit: NGMMResult) -> dict[str, Any]:
    """ngmm() arguments that reproduce the fit's approximation, with the fit's ``context=``
    (the functions its formula calls) when it had one."""
    context = getattr(fit.design.spec, "context", None)  # absent in files written before it
    return {**_approx_options(fit), **({"context": context} if context else {})}


def _approx_options(fit: NGMMResult) -> dict[str, Any]:
    """ngmm() arguments that reproduce the fit's approximation."""
    a = fit.approximation
    if a.kind == "exact":
        return {"approx": "auto", "reml": a.reml}
    if a.kind == "agq":
        return {"approx": "agq", "nagq": a.nagq}
    if a.kind == "truncated":
        return {"approx": "truncated", "truncation": a.truncation, "points": a.points}
    if a.kind == "variational":
        return {"approx": "variational"}
    return {"approx": "laplace"}


def _boot(fit: NGMMResult, data: pd.DataFrame, level: float, nsim: int, seed: int | None,
          old_names: bool, workers: int, fit_kwargs: dict[str, Any]) -> pd.DataFrame:
    if nsim < 2:
        raise NGMMError(f"nsim must be at least 2, got {nsim}")
    job = _boot_job(fit, data, old_names, fit_kwargs)
    names = parameter_names(fit, old_names)
    # lme4's bootMer default: new random effects for every simulation (use.u = FALSE)
    sims = fit.simulate(nsim, seed=seed, re_form="~0")
    rows = sims.index
    tasks = [(rows, sims[c].to_numpy()) for c in sims.columns]
    if workers <= 1:
        global _JOB
        _JOB = job
        try:
            with _one_thread():
                reps = [_refit_one(t) for t in tasks]
        finally:
            _JOB = None
    else:
        _check_main_guard(workers)
        try:
            with ProcessPoolExecutor(max_workers=min(workers, nsim), mp_context=mp_context(),
                                     initializer=_init_worker, initargs=(job,)) as ex:
                reps = list(ex.map(_refit_one, tasks,
                                   chunksize=max(1, nsim // (4 * workers))))
        except BrokenProcessPool:
            raise NGMMError("a bootstrap worker process died; if this runs from a script, "
                            "check its guard" + _GUARD_HINT.format(what="the script")) from None
    replicates = pd.DataFrame(np.vstack([r[0] for r in reps]), columns=names)
    errors = [r[2] for r in reps if r[2] is not None]
    ok = replicates.notna().all(axis=1)
    if (~ok).sum() == nsim:
        raise NGMMError(f"every bootstrap refit failed; the first error: {errors[0]}")
    a = (1 - level) / 2
    lo, hi = [], []
    for c in names:
        t = replicates.loc[ok, c].to_numpy()
        lo.append(_norm_inter(t, a))
        hi.append(_norm_inter(t, 1 - a))
    out = _frame(names, lo, hi, level)
    out.attrs["replicates"] = replicates
    out.attrs["n_failed"] = int((~ok).sum())
    out.attrs["errors"] = errors
    out.attrs["n_not_converged"] = int(sum(not r[1] for r in reps if r[2] is None))
    out.attrs["estimate"] = parameters(fit, old_names).to_numpy()
    return out


_GUARD_HINT = (
    ": the worker processes import {what} again (Python's multiprocessing does) and would "
    "re-run its code; put that code under 'if __name__ == \"__main__\":', or pass "
    "workers=1 to refit in this process")

_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__""")


def _check_main_guard(workers: int) -> None:
    """Raise NGMMError, before any worker starts, where the workers would re-run the caller's
    script: a worker process imports the main module (as ``__mp_main__``), so a script whose
    ``confint("boot")`` is not under ``if __name__ == "__main__":`` would be fitted again in
    every worker and fail there with multiprocessing's "bootstrapping phase" error. Also
    raises when called from such a re-import (inside a worker)."""
    import multiprocessing as mp

    if getattr(mp.current_process(), "_inheriting", False) or (
            mp.parent_process() is not None and __import__("__main__").__name__ == "__mp_main__"):
        raise NGMMError(f"confint('boot', workers={workers}) was called in a worker process "
                        "that was importing the main script" + _GUARD_HINT.format(
                            what="the script"))
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")):
        return  # `python -m package`: multiprocessing does not re-import it
    path = getattr(main, "__file__", None)
    if path is None:  # interactive, `python -c`, notebooks: nothing is re-imported
        return
    try:
        source = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    if _GUARD.search(source) is None:
        raise NGMMError(f"confint('boot', workers={workers}) refits in worker processes, and "
                        f"the script {Path(path).name} has no 'if __name__ == "
                        "\"__main__\":' block" + _GUARD_HINT.format(what="it"))


def _norm_inter(t: np.ndarray, alpha: float) -> float:
    """boot's ``norm.inter``: the percentile at (R + 1) alpha, interpolated between order
    statistics on the normal-quantile scale (boot.ci's "perc" intervals, used by lme4)."""
    t = np.sort(t[np.isfinite(t)])
    R = t.size
    if R == 0:
        return math.nan
    rk = (R + 1) * alpha
    k = int(math.trunc(rk))
    if k == rk and 1 <= k <= R:
        return float(t[k - 1])
    if k <= 0:
        return float(t[0])
    if k >= R:
        return float(t[-1])
    z, zk, zk1 = norm.ppf(alpha), norm.ppf(k / (R + 1)), norm.ppf((k + 1) / (R + 1))
    return float(t[k - 1] + (z - zk) / (zk1 - zk) * (t[k] - t[k - 1]))


# ============================================================================================
# standard errors of predictions


def predict_se(fit: NGMMResult, newdata: pd.DataFrame | None = None,
               re_form: str | None = None, allow_new_levels: bool = False) -> np.ndarray:
    r"""Standard errors of the linear predictor :math:`\hat\eta = x^\top\hat\beta + z^\top\hat b`.

    .. math::

        \operatorname{se}(\hat\eta_i)^2 = x_i^\top \widehat{V}(\hat\beta)\, x_i
            + z_i^\top \operatorname{Var}(b_{g(i)} \mid y)\, z_i ,

    with :math:`\widehat V(\hat\beta)` = ``fit.vcov`` and the conditional covariance of the
    random effects of the observation's level (lme4's ``postVar``, ``fit.ranef[g].attrs``),
    summed over the random-effect terms.

    This is the usual approximation of lme4-based tools (``merTools``, ``ggeffects``,
    ``predictInterval``-style): it ignores the covariance between :math:`\hat\beta` and the
    conditional modes, the covariance between the modes of different grouping factors
    (crossed or nested terms), the uncertainty of the variance parameters and of ``nn()``
    networks (treated as fixed). Levels absent from the training data (with
    ``allow_new_levels=True``; otherwise they raise, as lme4) and ``re_form="~0"`` get the
    fixed part only. The scale is the link's; a response-scale interval is
    :math:`g^{-1}(\hat\eta \pm z\,\operatorname{se})`.

    Parameters
    ----------
    fit : NGMMResult
    newdata : DataFrame or None
        None: the training rows.
    re_form : None or "~0"
        As :meth:`NGMMResult.predict`.
    allow_new_levels : bool
        As :meth:`NGMMResult.predict`.

    Returns
    -------
    ndarray, shape (n,)
    """
    if re_form is not None and re_form.replace(" ", "") not in ("~0", "NA"):
        raise NGMMError(f"re_form must be None or '~0', got {re_form!r}")
    design = fit.design
    if newdata is None:
        X = design.X
        Zs = [t.Zraw for t in design.re_terms]
        gis = [t.group_index for t in design.re_terms]
    else:
        nd = design.spec.new_data(newdata,
                                  allow_new_levels=allow_new_levels or re_form is not None,
                                  allow_new_input_levels=allow_new_levels)
        X, Zs, gis = nd.X, list(nd.Zraw), list(nd.group_index)
    V = fit.vcov.to_numpy()
    var = re_quadratic(X, V)  # x_i' V x_i (a wide factor design's sparse rows: O(n m^2))
    if re_form is None:
        offsets: dict[str, int] = {}
        for t, Z, gi in zip(design.re_terms, Zs, gis):
            start = offsets.get(t.group, 0)
            offsets[t.group] = start + t.q
            if t.rank is not None:  # (Z Lambda) Var(u | y) (Z Lambda)': d x d per level
                rr = next(r for r in fit.reduced_rank if r.name == t.name)
                var += re_quadratic(re_loaded(Z, rr.loadings), rr.scores_cov, gi)
                continue
            P = fit.ranef[t.group].attrs.get("postVar")
            if P is None:
                raise DataError(f"the fit has no conditional variances for '{t.group}'")
            block = np.transpose(P[start:start + t.q, start:start + t.q, :], (2, 0, 1))
            var += re_quadratic(Z, block, gi)  # 0 where the level is new
    return np.sqrt(np.clip(var, 0.0, None))

