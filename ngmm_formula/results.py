r"""Results layer: :class:`NGMMResult`, built in one constructor call and never mutated.

Parameters are reported on the user's scale and in lme4's conventions:

* ``fixef`` -- :math:`\beta = A \beta_s` (undoing the internal standardisation);
* ``theta`` -- lme4's relative Cholesky factors (relative to :math:`\sigma` for Gaussian
  identity models, as ``lmer``), with each column's sign made positive;
* ``varcorr`` -- R's ``as.data.frame(VarCorr(fit))``;
* ``ranef`` -- conditional modes :math:`\hat b = \Lambda \hat u` with conditional variances
  :math:`\Lambda H^{-1} \Lambda^\top` (lme4's ``postVar``);
* ``vcov`` -- for Gaussian identity models the covariance of :math:`\hat\beta` given the
  variance parameters (``lmer``: :math:`\sigma^2 (X^\top V^{-1} X)^{-1}`); otherwise the
  :math:`\beta` block of the inverse Hessian of the approximate marginal log-likelihood over
  all parameters (``glmer``).

As lme4's ``merMod``, the result offers the tools on a fit as its methods (``confint``,
``profile``, ``predict_se``, ``plot_*``, ``save``, ``compare``, ``emmeans``, ``r2``, ``icc``,
``simulate_residuals``, ``predict(interval=...)``), but the functions that compute them live in
higher layers: they refit through ``api``, build results (``persist``) or only read one. These
methods do not import those modules (an import against the layer order, and a cycle once the
module imports this one); each calls the implementation that
:data:`~ngmm_formula.registry.RESULT_METHODS` returns for its name. The package's ``__init__``,
the top layer, declares those implementations, and their modules are imported on the first
call, so importing the package stays cheap. Moving the computations below this module was the
alternative: it fits the ones that only read a result (plots, marginal means, intervals,
simulated residuals), not those that refit or build results, and one mechanism for every
method reads more simply than two.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from ngmm_formula.approx import Approximation
from ngmm_formula.design import Design, re_effect
from ngmm_formula.errors import DataError, NGMMError
from ngmm_formula.families import Family
from ngmm_formula.model import matvec
from ngmm_formula.networks import Ensemble, additive_label, input_label
from ngmm_formula.registry import RESULT_METHODS

__all__ = ["NGMMResult", "Diagnostics", "ReducedRank"]


#: Types that hold no array (a list of them, e.g. a factor's level labels, is skipped whole).
_SCALARS = frozenset({str, int, float, bool, type(None), np.str_, np.int64, np.float64})


def _read_only(value: Any, seen: set[int]) -> None:
    """Make every numpy array reachable from ``value`` through dataclasses, tuples, lists and
    dicts read-only (the result's own arrays, its design's matrices and indices, the pandas
    objects' values), so that ``fit.eta[:] = 0`` raises instead of changing ``fitted``,
    ``residuals`` and ``simulate``."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif isinstance(value, (pd.Series, pd.DataFrame)):
        for arr in ([value.to_numpy()] if isinstance(value, pd.Series)
                    else [value[c].to_numpy() for c, dtype in zip(value.columns, value.dtypes)
                          if not _fresh_on_to_numpy(dtype)]):
            if isinstance(arr, np.ndarray) and arr.flags.writeable and arr.base is None:
                arr.setflags(write=False)
        _read_only(value.attrs, seen)  # ranef's postVar
    elif isinstance(value, (tuple, list)):
        if all(type(v) in _SCALARS for v in value):  # level labels: nothing to protect
            return
        for v in value:
            _read_only(v, seen)
    elif isinstance(value, dict):
        for v in value.values():
            _read_only(v, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _read_only(getattr(value, f.name, None), seen)


def _fresh_on_to_numpy(dtype: Any) -> bool:
    """Whether a column of this dtype gives a new array from ``to_numpy()`` every time
    (categoricals, pyarrow-backed strings), which no one else holds: marking it read-only
    protects nothing, and making it costs more than the rest of the walk (a fit's own copy
    of the caller's data frame, ``refit.data``, with its factors)."""
    return isinstance(dtype, (pd.CategoricalDtype, pd.ArrowDtype)) or (
        isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow")


@dataclass(frozen=True)
class Diagnostics:
    """Convergence and singular-fit diagnostics of a fit (data, not just warnings)."""

    converged: bool
    max_grad: float
    hessian_pd: bool
    singular: bool
    iterations: int
    evaluations: int
    optimizer_message: str
    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReducedRank:
    r"""The fitted loadings and factor scores of one reduced-rank term ``rr(expr | g, d)``.

    The term's effects of level :math:`g` are :math:`b_g = \Lambda z_g`, :math:`z_g \sim
    N(0, I_d)`; :math:`\Lambda` (q x d) is lower triangular with a positive diagonal, which
    fixes the sign of each factor (glmmTMB leaves the signs free: compare column by column
    up to a sign). Rotations of the factors beyond that are fixed by the triangular zeros.

    Attributes
    ----------
    term : str
        The term as written, ``rr(0 + item | id, d = 2)``.
    name : str
        Its grouping factor's name in ``VarCorr``.
    columns : tuple of str
        The q columns (items).
    levels : tuple of str
        Levels of the grouping factor (students).
    loadings : ndarray, shape (q, d)
        :math:`\Lambda` (absolute scale).
    loadings_se : ndarray, shape (q, d)
        Wald standard errors from the Hessian of the approximate log-likelihood (0 for the
        structural zeros, NaN where the Hessian is not positive definite).
    scores : ndarray, shape (levels, d)
        Factor scores: conditional modes of :math:`z_g`.
    scores_cov : ndarray, shape (levels, d, d)
        Their conditional covariances (inverse negative Hessian of the log-integrand).
    """

    term: str
    name: str
    columns: tuple[str, ...]
    levels: tuple[str, ...]
    loadings: np.ndarray
    loadings_se: np.ndarray
    scores: np.ndarray
    scores_cov: np.ndarray

    @property
    def d(self) -> int:
        return int(self.loadings.shape[1])

    @property
    def factor_names(self) -> list[str]:
        return [f"F{j + 1}" for j in range(self.d)]

    def loadings_frame(self) -> pd.DataFrame:
        """Loadings and standard errors, one row per (column, factor) below the diagonal."""
        rows = [(c, f"F{j + 1}", self.loadings[i, j], self.loadings_se[i, j])
                for j in range(self.d) for i, c in enumerate(self.columns) if i >= j]
        return pd.DataFrame(rows, columns=["column", "factor", "estimate", "std_error"])

    def scores_frame(self) -> pd.DataFrame:
        """Factor scores per level, their conditional covariances in ``attrs["condVar"]``."""
        out = pd.DataFrame(self.scores, index=pd.Index(self.levels, name=self.name),
                           columns=self.factor_names)
        out.attrs["condVar"] = self.scores_cov
        return out


@dataclass(frozen=True)
class NGMMResult:
    """A fitted (neural) generalized linear mixed model.

    Build it with :func:`ngmm_formula.ngmm`; every attribute is computed once at
    construction.
    """

    formula: str
    family: Family
    approximation: Approximation
    design: Design = field(repr=False)
    fixef: pd.Series
    vcov: pd.DataFrame = field(repr=False)
    theta: pd.Series = field(repr=False)
    sigma: float
    loglik: float
    npar: int
    varcorr: pd.DataFrame = field(repr=False)
    ranef: dict[str, pd.DataFrame] = field(repr=False)
    eta: np.ndarray = field(repr=False)
    diagnostics: Diagnostics = field(repr=False)
    data_name: str | None = None
    name: str | None = None
    random_coef: tuple[np.ndarray, ...] = field(repr=False, default=())
    nets: tuple[Any, ...] = field(repr=False, default=())
    history: Any = field(repr=False, default=None)
    refit: Any = field(repr=False, default=None)
    reduced_rank: tuple[ReducedRank, ...] = field(repr=False, default=())

    def __post_init__(self) -> None:
        _read_only(self, set())

    # ---------------------------------------------------------------- fit statistics
    @property
    def reml(self) -> bool:
        return self.approximation.reml

    @property
    def title(self) -> str:
        fam = self.family
        if (self.approximation.kind == "laplace" and fam.name == "gaussian"
                and fam.link.name == "identity"):
            # a Gaussian model with rr() terms goes through the Laplace path, exact there
            return "Linear mixed model fit by maximum likelihood"
        return self.approximation.title

    @property
    def nobs(self) -> int:
        """The number of observations (of all processes after a sharded read, whose
        ``design`` holds this process's rows)."""
        return self.design.nobs if self.design.nobs_all is None else self.design.nobs_all

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.npar

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + math.log(self.nobs) * self.npar

    @property
    def deviance(self) -> float:
        """-2 log-likelihood (the REML criterion for REML fits), as lme4's summary prints."""
        return -2.0 * self.loglik

    @property
    def n_weights(self) -> int:
        """Weights of the ``nn()`` networks (0 without them); ``npar`` includes them."""
        return int(sum(int(net.n_weights) for net in self.nets))

    @property
    def df_resid(self) -> int:
        """``nobs`` minus the statistical parameters (fixed effects, variance parameters,
        dispersion): for a neural fit the networks are held fixed, as for the standard
        errors, so this is ``nobs - (npar - n_weights)`` (AIC and BIC count the weights)."""
        return max(0, self.nobs - (self.npar - self.n_weights))

    @property
    def t_stat(self) -> bool:
        """Whether fixed effects are reported with t values (Gaussian identity, as lmer)."""
        return self.approximation.kind == "exact"

    @property
    def ngroups(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.design.re_terms:
            out.setdefault(t.group, t.n_levels)
        return out

    @property
    def warnings_text(self) -> list[str]:
        return list(self.diagnostics.messages)

    @property
    def nn_terms(self) -> list[dict[str, Any]]:
        """One record per ``nn()`` term: label, inputs, architecture, number of weights (of all
        the networks it averages: ``networks``, 1 for a single network; ``Control.ensemble``,
        ``Control.average_folds``) and the share of the linear predictor's variance (on the
        training data) the term explains."""
        out = []
        var_eta = float(np.var(self.eta))
        for ni, net, f in zip(self.design.nets, self.nets, self._net_outputs(
                tuple(ni.X for ni in self.design.nets))):
            arch = " -> ".join([input_label(net, ni.X.shape[1]), *map(str, ni.term.hidden),
                                "1"])
            out.append({
                "label": ni.term.label, "inputs": ", ".join(ni.term.variables),
                "architecture": f"{arch} ({ni.term.activation}) + linear{additive_label(net)}",
                "n_weights": int(net.n_weights),
                "networks": len(net.members) if isinstance(net, Ensemble) else 1,
                "variance_share": float(np.var(f)) / var_eta if var_eta > 0 else float("nan"),
            })
        return out

    def _net_outputs(self, net_X: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        with torch.no_grad():
            return [net(torch.tensor(np.asarray(x), dtype=torch.float64)).numpy()
                    for net, x in zip(self.nets, net_X)]

    def partial_dependence(self, term: int | str = 0, var: str | None = None,
                           grid: int | np.ndarray = 50) -> pd.DataFrame:
        """Partial dependence of one ``nn()`` term on one of its inputs.

        The network's output averaged over the training data with ``var`` set to each grid
        value (Friedman's partial dependence), on the linear-predictor scale.

        Parameters
        ----------
        term : int or str
            Index of the ``nn()`` term or its label (``"nn(age, livch)"``).
        var : str
            Input variable (default: the term's first).
        grid : int or array
            Number of grid points between the 1st and 99th percentiles, or the values.
        """
        if not self.nets:
            raise NGMMError("this model has no nn() terms")
        labels = [ni.term.label for ni in self.design.nets]
        k = labels.index(term) if isinstance(term, str) and term in labels else term
        if not isinstance(k, int) or not 0 <= k < len(labels):
            raise NGMMError(f"term must be one of {labels} or an index, got {term!r}")
        ni, net = self.design.nets[k], self.nets[k]
        var = var or ni.term.variables[0]
        if var not in ni.term.variables:
            raise NGMMError(f"{var!r} is not an input of {ni.term.label}")
        pos = ni.term.variables.index(var)
        enc = ni.encodings[pos]
        start = sum(len(e.columns) for e in ni.encodings[:pos])
        width = len(enc.columns)
        if enc.kind == "numeric":
            if isinstance(grid, int):
                raw = ni.X[:, start] * enc.scale + enc.center
                lo, hi = np.percentile(raw, [1, 99])
                values = np.linspace(float(lo), float(hi), grid)
            else:
                values = np.asarray(grid, dtype=float)
            codes = [np.array([(v - enc.center) / enc.scale]) for v in values]
        elif enc.kind == "embedded":  # one column of level codes
            values = np.array(enc.levels, dtype=object)
            codes = [np.array([float(j)]) for j in range(len(enc.levels))]
        else:
            values = np.array(enc.levels, dtype=object)
            codes = [np.eye(width)[j] for j in range(width)]
        effects = []
        with torch.no_grad():
            for c in codes:
                X = ni.X.copy()
                X[:, start:start + width] = c
                effects.append(float(net(torch.tensor(X)).mean()))
        return pd.DataFrame({var: values, "effect": effects})

    def plot_partial_dependence(self, term: int | str = 0, var: str | None = None,
                                ax: Any = None) -> Any:
        """Draw :meth:`partial_dependence` with a rug of the data; returns the Figure."""
        return RESULT_METHODS.implementation("plot_partial_dependence")(self, term, var, ax=ax)

    # ---------------------------------------------------------------- inference and plots
    def _reduced_rank_term(self, term: int | str | None) -> ReducedRank:
        if not self.reduced_rank:
            raise NGMMError("this model has no reduced-rank term rr(... | group, d = ...)")
        if term is None:
            if len(self.reduced_rank) > 1:
                raise NGMMError("this model has several rr() terms: name one with term= (one of "
                                f"{[r.name for r in self.reduced_rank]})")
            return self.reduced_rank[0]
        if isinstance(term, int) and not isinstance(term, bool):
            if not 0 <= term < len(self.reduced_rank):
                raise NGMMError(f"term={term} is out of range: this model has "
                                f"{len(self.reduced_rank)} rr() term(s)")
            return self.reduced_rank[term]
        for rr in self.reduced_rank:
            if term in (rr.name, rr.term):
                return rr
        raise NGMMError(f"term={term!r} is not an rr() term of this model (its rr() terms: "
                        f"{[r.name for r in self.reduced_rank]})")

    def loadings(self, term: int | str | None = None) -> pd.DataFrame:
        r"""The loadings :math:`\Lambda` of a reduced-rank term with Wald standard errors.

        Parameters
        ----------
        term : int or str, optional
            Which ``rr()`` term (position, or its grouping factor's name); needed when the
            model has several.

        Returns
        -------
        DataFrame
            One row per free loading (``column``, ``factor``, ``estimate``, ``std_error``);
            the diagonal loadings are positive (the sign convention; glmmTMB's may differ in
            sign column by column).
        """
        return self._reduced_rank_term(term).loadings_frame()

    def scores(self, term: int | str | None = None, newdata: pd.DataFrame | None = None
               ) -> pd.DataFrame:
        r"""Factor scores of a reduced-rank term: the conditional modes of :math:`z_g` for
        every level (student), with their conditional covariances in
        ``attrs["condVar"]`` (levels x d x d). Under quadrature these are the modes the
        adaptive rule is centred on.

        With ``newdata`` (rows with responses): the scores of the levels in it from those
        rows alone, at the fitted parameters -- new students scored from their answers --
        with ``attrs["logLik"]``, each level's marginal log-likelihood (its random effects
        integrated; the held-out log-likelihood of a new student)
        (:func:`ngmm_formula.scoring.score_newdata`).
        """
        rr = self._reduced_rank_term(term)
        if newdata is None:
            return rr.scores_frame()
        return RESULT_METHODS.implementation("score_newdata")(self, rr, newdata)

    def confint(self, method: str = "wald", level: float = 0.95, **kw: Any) -> pd.DataFrame:
        """Confidence intervals as lme4's ``confint(fit, oldNames = FALSE)``: method "wald",
        "profile" or "boot" (needs ``data=``); see :func:`ngmm_formula.inference.confint`."""
        return RESULT_METHODS.implementation("confint")(self, method, level, **kw)

    def profile(self, parm: Any = None, level: float = 0.95, **kw: Any) -> pd.DataFrame:
        """Likelihood-profile limits with zeta at each (:func:`ngmm_formula.inference.profile`)."""
        return RESULT_METHODS.implementation("profile")(self, parm, level, **kw)

    def predict_se(self, newdata: pd.DataFrame | None = None, re_form: str | None = None,
                   allow_new_levels: bool = False) -> np.ndarray:
        """Link-scale standard errors of predictions
        (:func:`ngmm_formula.inference.predict_se`)."""
        return RESULT_METHODS.implementation("predict_se")(self, newdata, re_form,
                                                           allow_new_levels)

    def emmeans(self, specs: str | list[str], by: str | list[str] | None = None, *,
                type: str = "link", **kw: Any) -> Any:
        """Estimated marginal means, with ``.pairs(adjust=)`` for contrasts, as R's
        ``emmeans(fit, specs, by = by, type = type)``
        (:func:`ngmm_formula.emmeans.emmeans`)."""
        return RESULT_METHODS.implementation("emmeans")(self, specs, by, type=type, **kw)

    def r2(self, data: pd.DataFrame | None = None, null_fit: Any = None) -> pd.Series:
        """Nakagawa's marginal and conditional R² (``performance::r2_nakagawa``); Poisson and
        negative binomial fits need the training ``data`` (or ``null_fit``) for the null
        model (:func:`ngmm_formula.performance.r2_nakagawa`)."""
        return RESULT_METHODS.implementation("r2")(self, data=data, null_fit=null_fit)

    def icc(self, data: pd.DataFrame | None = None, null_fit: Any = None) -> pd.Series:
        """Adjusted and conditional ICC (``performance::icc``;
        :func:`ngmm_formula.performance.icc`)."""
        return RESULT_METHODS.implementation("icc")(self, data=data, null_fit=null_fit)

    def simulate_residuals(self, nsim: int = 250, **kw: Any) -> Any:
        """DHARMa-style scaled residuals with uniformity, dispersion and zero-inflation tests
        and plots (:func:`ngmm_formula.residuals.simulate_residuals`)."""
        return RESULT_METHODS.implementation("simulate_residuals")(self, nsim, **kw)

    def plot_caterpillar(self, group: str | None = None, **kw: Any) -> Any:
        """Conditional modes with 95% conditional intervals
        (:func:`ngmm_formula.plots.caterpillar`)."""
        return RESULT_METHODS.implementation("plot_caterpillar")(self, group, **kw)

    def plot_residuals(self, type: str = "pearson", **kw: Any) -> Any:
        """Residuals against fitted values (:func:`ngmm_formula.plots.residuals_vs_fitted`)."""
        return RESULT_METHODS.implementation("plot_residuals")(self, type, **kw)

    def plot_training_curve(self, **kw: Any) -> Any:
        """Training and validation objective per epoch
        (:func:`ngmm_formula.plots.training_curve`)."""
        return RESULT_METHODS.implementation("plot_training_curve")(self, **kw)
    # ---------------------------------------------------------------- fitted values
    @property
    def fitted(self) -> np.ndarray:
        """Fitted means :math:`g^{-1}(\\eta)` including the random effects."""
        return self._mean(self.eta)

    def _mean(self, eta: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.family.mean(torch.tensor(eta)).numpy()

    def residuals(self, type: Literal["response", "pearson", "deviance", "working"] = "response"
                  ) -> np.ndarray:
        """Residuals as R's ``residuals(fit, type=)``; lme4's summary scales Pearson
        residuals by sigma for Gaussian models."""
        y, w, mu = self.design.y, self.design.weights, self.fitted
        sig = self.sigma if self.family.has_dispersion else None
        if type == "response":
            return y - mu
        if type == "pearson":
            r = np.asarray(self.family.pearson_residuals(y, mu, sig, w))
            return r
        if type == "deviance":
            return np.asarray(self.family.deviance_residuals(y, mu, sig, w))
        if type == "working":
            with torch.no_grad():
                mu_eta = self.family.link.mu_eta(torch.tensor(self.eta)).numpy()
            return (y - mu) / mu_eta
        raise NGMMError(f"residual type must be response, pearson, deviance or working; "
                        f"got {type!r}")

    # ---------------------------------------------------------------- prediction
    def predict(self, newdata: pd.DataFrame | None = None, type: str = "response",
                re_form: str | None = None, allow_new_levels: bool = False, *,
                interval: str | None = None, level: float = 0.95, **kw: Any) -> Any:
        """Predictions as lme4's ``predict.merMod``.

        Parameters
        ----------
        newdata : DataFrame or None
            None predicts the training data.
        type : {"response", "link"}
        re_form : None or "~0"
            None includes every random effect (conditional prediction); ``"~0"`` (or
            ``"~ 0"``, ``NA``-like) sets them to zero (population prediction).
        allow_new_levels : bool
            As lme4's ``allow.new.levels``: by default (False) a grouping level not in the
            training data raises :class:`~ngmm_formula.DataError` naming the factor and the
            levels; True gives such levels a zero random effect. Ignored with
            ``re_form="~0"``, which uses no random effect. Unseen levels of a factor among
            the ``nn()`` inputs raise the same way (also with ``re_form="~0"``); True predicts
            them as a level without data (:class:`~ngmm_formula.design.NetEncoding`).
        interval : None, "confidence" or "prediction"
            None returns the predictions as an array; otherwise a DataFrame with columns
            ``fit``, ``se``, ``lwr``, ``upr`` at coverage ``level`` (further keywords
            ``method="auto"|"delta"|"simulation"``, ``nsim``, ``seed``; see
            :func:`ngmm_formula.intervals.predict_interval`).
        """
        if interval is not None:
            return RESULT_METHODS.implementation("predict_interval")(
                self, newdata, interval=interval, level=level, type=type, re_form=re_form,
                allow_new_levels=allow_new_levels, **kw)
        if kw:
            raise NGMMError(f"unexpected keyword(s) {sorted(kw)} (method, nsim and seed "
                            "go with interval=)")
        if type not in ("response", "link"):
            raise NGMMError(f"type must be 'response' or 'link', got {type!r}")
        if re_form is not None and re_form.replace(" ", "") not in ("~0", "NA"):
            raise NGMMError(f"re_form must be None or '~0', got {re_form!r}")
        use_re = re_form is None
        if newdata is None:
            eta = self.eta if use_re else self._eta_fixed_train()
        else:
            nd = self.design.spec.new_data(newdata,
                                           allow_new_levels=allow_new_levels or not use_re,
                                           allow_new_input_levels=allow_new_levels)
            eta = nd.offset + matvec(nd.X, self.fixef.to_numpy())
            eta = eta + self._net_part(nd.net_X)
            if use_re:
                for Z, gi, b in zip(nd.Zraw, nd.group_index, self.random_coef):
                    eta = eta + re_effect(Z, gi, b)
        return eta if type == "link" else self._mean(eta)

    def _net_part(self, net_X: tuple[np.ndarray, ...]) -> np.ndarray | float:
        if not net_X:
            return 0.0
        return np.sum(self._net_outputs(net_X), axis=0)

    def _eta_fixed_train(self) -> np.ndarray:
        d = self.design
        return (d.offset + matvec(d.X, self.fixef.to_numpy())
                + self._net_part(tuple(ni.X for ni in d.nets)))

    # ---------------------------------------------------------------- simulation
    def simulate(self, nsim: int = 1, seed: int | None = 0, re_form: str | None = None
                 ) -> pd.DataFrame:
        """Simulate responses from the fitted model (new random effects unless
        ``re_form=None`` conditions on the fitted ones, as lme4's default ``re.form = NA``
        draws new ones; here ``re_form="~0"`` draws new random effects)."""
        rng = np.random.default_rng(seed)
        d = self.design
        sig = self.sigma if self.family.has_dispersion else None
        out = {}
        for s in range(nsim):
            if re_form is None:
                eta = self.eta
            else:
                eta = self._eta_fixed_train().copy()
                for t, L in zip(d.re_terms, self._lambda_abs()):
                    u = rng.standard_normal((t.n_levels, t.dim))
                    b = u @ L.T
                    eta = eta + re_effect(t.Zraw, t.group_index, b)
            mu = self._mean(eta)
            out[f"sim_{s + 1}"] = self.family.simulate(mu, sig, d.weights, rng)
        return pd.DataFrame(out, index=d.row_index)

    def _lambda_abs(self) -> list[np.ndarray]:
        """Absolute-scale Cholesky factors of each term's covariance (theta is relative to
        sigma for Gaussian identity models, as lme4's)."""
        from ngmm_formula.model import lambda_blocks

        scale = self.sigma if self.t_stat else 1.0
        theta = torch.as_tensor(self.theta.to_numpy() * scale)
        terms = self.design.re_terms
        return [L.numpy() for L in lambda_blocks(theta, tuple(t.q for t in terms),
                                                 tuple(t.rank for t in terms))]

    # ---------------------------------------------------------------- model comparison
    def refit_ml(self) -> NGMMResult:
        """The same model fitted by maximum likelihood (for anova of REML fits)."""
        if not self.reml:
            return self
        if self.refit is None:
            raise DataError("this result cannot be refitted")
        return self.refit(reml=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted model to a file; read it back with :func:`ngmm_formula.load`.

        See :mod:`ngmm_formula.persist` for the format and its integrity checks.
        """
        return RESULT_METHODS.implementation("save")(self, path)

    def compare(self, *others: Any, data: pd.DataFrame | None = None,
                newdata: pd.DataFrame | None = None, statsmodels: bool = True) -> Any:
        """This fit beside its linear version and statsmodels' GLMM (and ``others``).

        ``fit.compare(data)``: results do not keep the caller's DataFrame, so pass it
        (positionally or as ``data=``). See :func:`ngmm_formula.compare.compare`.
        """
        return RESULT_METHODS.implementation("compare")(self, *others, data=data,
                                                        newdata=newdata,
                                                        statsmodels=statsmodels)

    def summary(self) -> Any:
        """lme4-style summary; ``print(fit.summary())``."""
        from ngmm_formula.summary import summarize

        return summarize(self)

    def __repr__(self) -> str:
        return (f"<NGMMResult {self.formula!r} family={self.family.name} "
                f"logLik={self.loglik:.4f} nobs={self.nobs}>")
