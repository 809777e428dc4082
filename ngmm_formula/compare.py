r"""Comparison layer: this package's fits side by side with the GLMM statsmodels would fit.

:func:`compare` returns a :class:`ComparisonTable` (numbers only; ``str()``,
:meth:`~ComparisonTable.to_markdown` and :meth:`~ComparisonTable.to_latex` print it). One
column per model:

* this package's fit of the **linear** version of each model (``nn(a, b)`` replaced by
  ``a + b``, :attr:`ParsedFormula.linear_formula`): the fit itself for a GLMM, a refit with the
  same approximation, weights and offset for an NGMM;
* the NGMM itself when the model has ``nn()`` terms;
* the GLMM statsmodels offers for the family, fitted to the same rows with the linear formula:
  ``MixedLM`` for ``gaussian(identity)`` (REML or ML as the fit), ``BinomialBayesMixedGLM`` for
  ``binomial(logit)`` and ``PoissonBayesMixedGLM`` for ``poisson(log)`` (variational Bayes,
  ``fit_vb()``). Other families get a column saying that statsmodels has no GLMM for them.

Rows: the fixed effects (matched by name: statsmodels' ``period[T.2]`` is this package's and
lme4's ``period2``) with standard errors, the random-effect standard deviations (and
correlations), ``logLik``, ``AIC``, ``BIC``, ``npar``, ``nobs`` and, with ``newdata``, the
held-out log-likelihood and RMSE (gaussian, poisson, ...) or AUC (binomial).

Translation of lme4's formula for statsmodels
---------------------------------------------
* Fixed part: the linear formula's fixed part, as written, with the (possibly transformed)
  response in a column: statsmodels reads it with its default formula engine (patsy), which
  agrees with formulaic on ``C()``, ``I()``, interactions and ``0 +``. After the fit, every
  column of statsmodels' fixed-effects matrix is checked against this package's column of the
  same name; a column that differs (e.g. ``scale(x)``: patsy divides by the ``ddof = 0``
  standard deviation, formulaic by ``ddof = 1``) is reported in a note.
* ``MixedLM``, one grouping factor ``g``: ``groups="g"``; the random-effects term with the most
  columns becomes ``re_formula`` (``(Days | Subject)`` -> ``re_formula="1 + Days"``, a free
  covariance matrix); the other terms of ``g``, which must have one column each (as the terms
  of ``(Days || Subject)``), become within-group variance components (``vc_formula=
  {"Subject.1 Days": "0 + Days"}``).
* ``MixedLM``, several grouping factors (crossed or nested): one all-ones group
  (``groups="_one"``, ``re_formula="0"``) and one variance component per term column:
  ``(1 | g)`` -> ``"0 + C(g)"``, ``(0 + x | g)`` -> ``"0 + C(g):x"``. Correlated terms with
  several columns (``(x | g)``) cannot be written this way: statsmodels is then marked
  unsupported. So is a design of more than :data:`MAX_ONE_GROUP_ROWS` rows (one group means
  dense n x n matrices).
* Bayesian GLMMs: one variance component per term column, as for crossed ``MixedLM``
  (``vc_formulas={"herd (Intercept)": "0 + C(herd)"}``); crossed and nested factors are fine,
  but variance components are independent, so ``(x | g)`` is fitted as ``(x || g)`` (a note
  says so). The response must be 0/1: a ``cbind`` (or weighted) binomial response is expanded
  to Bernoulli rows **for statsmodels only**. No offsets (unsupported) and, for Poisson, no
  prior weights (unsupported).
* A grouping factor ``a:b`` and a slope that is not a numeric column go in as helper columns
  (``_g0``, ``_z0_1``).

statsmodels' Bayesian GLMMs report no log-likelihood. Their ``logLik`` is this package's
approximate marginal log-likelihood (the objective of :func:`ngmm_formula.api.objective_at`,
with the same approximation as the linear fit's column and on the same, not expanded, data) at
statsmodels' point estimates: the posterior means of the fixed effects and
:math:`\exp(\text{posterior mean of each log-SD})` as the standard deviations (:math:`\theta`
= SD for a scalar random intercept). Their AIC and BIC use that log-likelihood and
``npar`` = number of fixed effects + number of variance components.

Failures
--------
A statsmodels fit is *failed* (its column shows ``—`` and a note quotes the reason; its numbers
stay available in :attr:`ModelColumn.fixef` etc. for diagnosis, with ``ok = False``) when it
raises, emits a ``ConvergenceWarning`` (except MixedLM's "retrying with another optimiser"
when the retry converged and its "MLE on the boundary", which is a singular fit, reported as a
note), reports ``converged = False``, returns non-finite or implausibly large estimates, or
returns fixed effects that are all ~0 (the variational fit never left its starting point,
which is what ``fit_vb()`` does on unscaled covariates such as a squared age). numpy
``RuntimeWarning``\ s raised during the fit are counted in the message.

Held-out data
-------------
With ``newdata``, every column is scored in the same way: the linear predictor of each new row
is :math:`\hat\eta = x^\top\hat\beta + z^\top\hat b_g` (+ the networks for the NGMM) with the
model's estimated random effect :math:`\hat b_g` for groups seen in training (conditional modes
for this package, BLUPs for ``MixedLM``, posterior means for the Bayesian GLMMs) and
:math:`\hat b_g = 0` for new groups; the held-out log-likelihood is
:math:`\sum_i \log p(y_i \mid \hat\eta_i, \hat\sigma)` with full normalising constants, the
RMSE is :math:`\{n^{-1}\sum_i (y_i - \hat\mu_i)^2\}^{1/2}`, and the AUC is the probability that a
success has a higher :math:`\hat\mu` than a failure (ties count one half; binomial counts are
weighted by their successes and failures).
"""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ngmm_formula.api import Prepared, ngmm, objective_at, prepare
from ngmm_formula.design import Design, ReTerm, SparseRows, lme4_name, matrix_columns, re_effect
from ngmm_formula.errors import DataError, NGMMError, NGMMWarning
from ngmm_formula.families import Family
from ngmm_formula.results import NGMMResult
from ngmm_formula.summary import r_format

__all__ = [
    "ComparisonTable",
    "ModelColumn",
    "StatsmodelsSpec",
    "compare",
    "statsmodels_spec",
]

#: Largest design fitted by ``MixedLM`` with a single all-ones group (crossed factors): the
#: marginal covariance is then one dense n x n matrix.
MAX_ONE_GROUP_ROWS = 5000

#: Largest number of Bernoulli rows a binomial response is expanded to for statsmodels.
MAX_BERNOULLI_ROWS = 1_000_000

#: Fixed effects all smaller than this in absolute value mean that a fit did not move.
ZERO_FIXEF = 1e-6

#: Estimates larger than this in absolute value are implausible (a diverged optimiser).
HUGE_ESTIMATE = 1e8

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ==================================================================================== values
@dataclass(frozen=True)
class ModelColumn:
    """The numbers of one model in a :class:`ComparisonTable` (user scale).

    Attributes
    ----------
    label : str
        Column heading.
    engine : {"ngmm_formula", "statsmodels"}
    model : str
        ``"GLMM"``, ``"LMM"``, ``"NGMM"``, ``"MixedLM"``, ``"BinomialBayesMixedGLM"``,
        ``"PoissonBayesMixedGLM"`` or ``"none"``.
    method : str
        How it was fitted (``"REML"``, ``"ML (AGQ, nAGQ = 11)"``, ``"VB (fit_vb)"``).
    call : str
        The call that produced it.
    fixef, std_errors : pandas.Series
        Fixed effects under this package's (lme4's) names, and their standard errors
        (posterior standard deviations for the Bayesian GLMMs).
    random : pandas.Series
        Random-effect standard deviations (``"herd (Intercept)"``), correlations
        (``"Subject corr((Intercept), Days)"``) and the residual SD (``"Residual"``).
    loglik : float
        Log-likelihood (the REML criterion's for REML fits; see the module notes for the
        Bayesian GLMMs).
    npar, nobs : int
    heldout : dict of str to float
        ``logLik``, ``RMSE`` or ``AUC`` and ``n`` on ``newdata``.
    ok : bool
        False when the fit failed or is not available: the table then shows no numbers.
    status : str
        ``"ok"``, or why not (``"failed to converge (ConvergenceWarning: ...)"``).
    nn_terms : tuple of str
        Labels of the model's ``nn()`` terms.
    """

    label: str
    engine: str
    model: str
    method: str
    call: str
    fixef: pd.Series = field(repr=False)
    std_errors: pd.Series = field(repr=False)
    random: pd.Series = field(repr=False)
    loglik: float = math.nan
    npar: int = 0
    nobs: int = 0
    heldout: dict[str, float] = field(default_factory=dict, repr=False)
    ok: bool = True
    status: str = "ok"
    nn_terms: tuple[str, ...] = ()

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.npar

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + math.log(self.nobs) * self.npar if self.nobs else math.nan


@dataclass(frozen=True, repr=False)
class ComparisonTable:
    """Several fitted models side by side; ``print(table)`` shows it.

    Attributes
    ----------
    columns : tuple of ModelColumn
    notes : tuple of str
        Footnotes, printed numbered under the table.
    title : str

    Failed or unavailable columns (``ok = False``) show no numbers (``—``); their status row and
    a note say why.
    """

    columns: tuple[ModelColumn, ...]
    notes: tuple[str, ...] = ()
    title: str = "Model comparison"

    # ------------------------------------------------------------------ numbers
    def to_frame(self) -> pd.DataFrame:
        """The numbers: rows indexed by (section, term), one column per model.

        Sections: ``"fixed effects"``, ``"random effects"`` (SDs, correlations, residual SD),
        ``"fit"`` (``logLik``, ``AIC``, ``BIC``, ``npar``, ``nobs``) and, with ``newdata``,
        ``"held-out"``. Failed columns are NaN.
        """
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for section, names, get in self._sections():
            for name in names:
                rows[(section, name)] = {
                    c.label: (get(c, name) if c.ok else math.nan) for c in self.columns}
        index = pd.MultiIndex.from_tuples(list(rows), names=["section", "term"])
        return pd.DataFrame(list(rows.values()), index=index,
                            columns=[c.label for c in self.columns], dtype=float)

    @property
    def std_errors(self) -> pd.DataFrame:
        """Standard errors of the fixed effects (posterior SDs for the Bayesian GLMMs)."""
        names = self._fixef_names()
        return pd.DataFrame({c.label: [c.std_errors.get(n, math.nan) if c.ok else math.nan
                                       for n in names] for c in self.columns},
                            index=pd.Index(names, name="term"), dtype=float)

    def _fixef_names(self) -> list[str]:
        return _union(c.fixef.index for c in self.columns)

    def _sections(self) -> list[tuple[str, list[str], Any]]:
        fit_rows = ["logLik", "AIC", "BIC", "npar", "nobs"]
        stats = {"logLik": lambda c: c.loglik, "AIC": lambda c: c.aic,
                 "BIC": lambda c: c.bic, "npar": lambda c: float(c.npar) if c.npar else math.nan,
                 "nobs": lambda c: float(c.nobs) if c.nobs else math.nan}
        out: list[tuple[str, list[str], Any]] = [
            ("fixed effects", self._fixef_names(),
             lambda c, n: float(c.fixef.get(n, math.nan))),
            ("random effects", _union(c.random.index for c in self.columns),
             lambda c, n: float(c.random.get(n, math.nan))),
            ("fit", fit_rows, lambda c, n: float(stats[n](c))),
        ]
        held = _union([k for k in c.heldout] for c in self.columns)
        if held:
            order: list[str] = [k for k in ("logLik", "RMSE", "AUC", "n") if k in held]
            out.append(("held-out", order,
                        lambda c, n: float(c.heldout.get(n, math.nan))))
        return out

    # ------------------------------------------------------------------ printing
    def _cells(self) -> tuple[list[str], list[tuple[str, list[str], str]]]:
        """Header and body rows ``(label, cells, kind)``, kind in {"section", "row"}."""
        labels = [c.label for c in self.columns]
        body: list[tuple[str, list[str], str]] = []
        body.append(("model", [c.model for c in self.columns], "row"))
        body.append(("method", [c.method for c in self.columns], "row"))
        body.append(("status", [c.status if c.ok else _short_status(c.status)
                                for c in self.columns], "row"))
        for section, names, get in self._sections():
            body.append((_SECTION_TITLES[section], [""] * len(labels), "section"))
            if section == "fixed effects":
                for n in names:
                    est = [get(c, n) if c.ok else math.nan for c in self.columns]
                    se = [float(c.std_errors.get(n, math.nan)) if c.ok else math.nan
                          for c in self.columns]
                    cells = _format_joint(est, se, 5)
                    body.append((n, [s if c.ok else "—" for s, c in
                                     zip(cells[0], self.columns)], "row"))
                    body.append(("", [f"({s})" if s else "" for s in cells[1]], "row"))
                for label in _union([list(c.nn_terms) for c in self.columns]):
                    body.append((label, ["network" if label in c.nn_terms else ""
                                         for c in self.columns], "row"))
                continue
            for n in names:
                vals = [get(c, n) if c.ok else math.nan for c in self.columns]
                if n in ("npar", "nobs", "n"):
                    cells_ = [str(int(v)) if math.isfinite(v) else "" for v in vals]
                else:
                    cells_ = _format_row(vals, 7 if section in ("fit", "held-out") else 5)
                body.append((n, [s if c.ok else "—" for s, c in zip(cells_, self.columns)],
                             "row"))
        return labels, body

    def to_string(self) -> str:
        """Plain-text table with numbered notes (what ``str()`` gives)."""
        labels, body = self._cells()
        rn = max([len(r[0]) + 2 for r in body] + [8])
        widths = [max([len(lab)] + [len(r[1][j]) for r in body if r[2] == "row"])
                  for j, lab in enumerate(labels)]
        lines = [self.title, ""]
        lines.append(" " * rn + "".join("  " + lab.rjust(w) for lab, w in zip(labels, widths)))
        for name, cells, kind in body:
            if kind == "section":
                lines.append(name)
                continue
            indent = "  " if name not in ("model", "method", "status") else ""
            lines.append((indent + name).ljust(rn)
                         + "".join("  " + s.rjust(w) for s, w in zip(cells, widths)))
        lines += ["", "Models:"]
        for c in self.columns:
            lines += textwrap.wrap(f"{c.label}: {c.call}", 100, initial_indent="  ",
                                   subsequent_indent="      ")
        if self.notes:
            lines += ["", "Notes:"]
            for i, note in enumerate(self.notes, 1):
                lines += textwrap.wrap(note, 100, initial_indent=f"[{i}] ",
                                       subsequent_indent="    ")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return self.to_string()

    def _display_frame(self) -> pd.DataFrame:
        labels, body = self._cells()
        index = [(f"**{n}**" if kind == "section" else n) for n, _, kind in body]
        return pd.DataFrame([cells for _, cells, _ in body], index=index, columns=labels)

    def to_markdown(self) -> str:
        """A Markdown (pipe) table followed by the models and the numbered notes.

        Uses :meth:`pandas.DataFrame.to_markdown` when ``tabulate`` is installed, a small
        formatter of the same layout otherwise.
        """
        frame = self._display_frame()
        try:
            import tabulate  # noqa: F401

            table = frame.to_markdown(colalign=["left"] + ["right"] * frame.shape[1])
        except ImportError:
            table = _markdown_table(frame)
        parts = [f"**{self.title}**", "", table, "", "Models:", ""]
        parts += [f"- {c.label}: `{c.call}`" for c in self.columns]
        if self.notes:
            parts += ["", "Notes:", ""]
            parts += [f"{i}. {n}" for i, n in enumerate(self.notes, 1)]
        return "\n".join(parts)

    def to_latex(self) -> str:
        """A LaTeX ``tabular`` (``\\hline`` rules, no packages needed) and the notes."""
        labels, body = self._cells()
        ncol = len(labels) + 1
        out = [r"\begin{tabular}{l" + "r" * len(labels) + "}", r"\hline",
               " & ".join([""] + [_tex(lab) for lab in labels]) + r" \\", r"\hline"]
        for name, cells, kind in body:
            if kind == "section":
                out.append(r"\multicolumn{" + str(ncol) + r"}{l}{\textit{" + _tex(name)
                           + r"}} \\")
            else:
                out.append(" & ".join([_tex(name)] + [_tex(s) for s in cells]) + r" \\")
        out += [r"\hline", r"\end{tabular}"]
        if self.notes:
            out.append("")
            out += [rf"\par\noindent[{i}] {_tex(n)}" for i, n in enumerate(self.notes, 1)]
        return "\n".join(out)


_SECTION_TITLES = {"fixed effects": "Fixed effects", "random effects": "Random effects (SD)",
                   "fit": "Fit", "held-out": "Held-out data"}


# ==================================================================================== entry
def compare(*fits: Any, data: pd.DataFrame | None = None, newdata: pd.DataFrame | None = None,
            statsmodels: bool = True) -> ComparisonTable:
    """Compare fits of this package with each other and with statsmodels' GLMMs.

    Parameters
    ----------
    *fits : NGMMResult
        One or more fits. A DataFrame among the positional arguments is taken as ``data``
        (so ``compare(fit, df)`` and ``fit.compare(df)`` work).
    data : DataFrame, optional
        The data the fits were made on. **Needed for the statsmodels columns** (and for the
        linear refit of an NGMM): results keep the model's arrays, not the caller's frame,
        so ``fit.compare(data)`` must be given the data again. The rows used are
        ``fit.design.row_index`` (labels of ``data``'s index); they are checked against the
        fit. Without ``data`` the table holds the given fits only (and a note says so).
    newdata : DataFrame, optional
        Held-out rows with the response: adds the held-out log-likelihood and RMSE or AUC
        (defined the same way for every column, see the module notes).
    statsmodels : bool
        Add, for each fit, its linear refit (NGMMs) and statsmodels' GLMM. False gives a
        side-by-side table of the given fits only.

    Returns
    -------
    ComparisonTable
    """
    fit_list: list[NGMMResult] = []
    for f in fits:
        if isinstance(f, pd.DataFrame):
            if data is not None:
                raise NGMMError("data given twice (positionally and as data=)")
            data = f
        elif isinstance(f, NGMMResult):
            fit_list.append(f)
        else:
            raise NGMMError(f"compare() takes NGMMResult fits (and a DataFrame); got "
                            f"{type(f).__name__}")
    if not fit_list:
        raise NGMMError("compare() needs at least one fit")
    names = _fit_names(fit_list)
    notes = _Notes()
    columns: list[ModelColumn] = []
    if not statsmodels or data is None:
        if statsmodels:
            notes.add("statsmodels columns need the data: results do not keep the caller's "
                      "DataFrame, so call compare(fit, data=df) / fit.compare(df).")
        for fit, name in zip(fit_list, names):
            columns.append(_ngmm_column(fit, name, notes, newdata))
    else:
        single = len(fit_list) == 1
        seen: dict[tuple[Any, ...], str] = {}
        for fit, name in zip(fit_list, names):
            prefix = "" if single else f"{name}: "
            columns += _with_statsmodels(fit, prefix, data, newdata, notes, seen)
    if any(c.method == "REML" for c in columns):
        notes.add("REML columns: logLik is the restricted log-likelihood (lme4's REML "
                  "criterion / -2) and AIC/BIC are computed from it, as lme4 does; they are "
                  "not comparable with ML columns or across fixed-effect structures.")
    title = _title(fit_list)
    return ComparisonTable(columns=tuple(columns), notes=tuple(notes.items), title=title)


def _with_statsmodels(fit: NGMMResult, prefix: str, data: pd.DataFrame,
                      newdata: pd.DataFrame | None, notes: _Notes,
                      seen: dict[tuple[Any, ...], str]) -> list[ModelColumn]:
    """The columns of one fit: its linear version, the NGMM, statsmodels' GLMM.

    ``seen`` maps a linear model (family, approximation, design arrays) to the label of the
    column that already holds it, so that a linear model given twice (``m1`` and the linear
    version of the NGMM ``m2``) is fitted, by this package and by statsmodels, once.
    """
    frame = _model_frame(fit, data)
    linear_formula = fit.design.formula.linear_formula
    approx_kw = _approx_kwargs(fit)
    base = prepare(linear_formula, frame, fit.family, **approx_kw)  # type: ignore[arg-type]
    _check_same_data(fit, base.design)
    w_user, o_user = _user_weights_offset(fit.design, base.design)
    prepared = base
    if w_user is not None or o_user is not None:
        prepared = prepare(linear_formula, frame, fit.family, weights=w_user, offset=o_user,
                           **approx_kw)  # type: ignore[arg-type]
    key = _model_key(prepared)
    cols: list[ModelColumn] = []
    if fit.nets:
        if key in seen:
            notes.add(f"{prefix}the linear version of this NGMM is {seen[key]} (same "
                      "design, family and approximation): not fitted again.")
            cols.append(_ngmm_column(fit, f"{prefix}ngmm_formula NGMM", notes, newdata))
            return cols
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NGMMWarning)
            linear = ngmm(linear_formula, frame, fit.family, weights=w_user, offset=o_user,
                          **approx_kw)  # type: ignore[arg-type]
        label = f"{prefix}ngmm_formula linear"
        for w in caught:
            notes.add(f"{label}: {w.message}")
        cols.append(_ngmm_column(linear, label, notes, newdata))
        cols.append(_ngmm_column(fit, f"{prefix}ngmm_formula NGMM", notes, newdata))
    else:
        linear = fit
        label = f"{prefix}ngmm_formula"
        cols.append(_ngmm_column(fit, label, notes, newdata))
        if key in seen:
            notes.add(f"{label} is the same linear model as {seen[key]}: its statsmodels "
                      "fit is not repeated.")
            return cols
    seen[key] = label
    cols.append(_statsmodels_column(fit, linear, prepared, frame, f"{prefix}statsmodels",
                                    newdata, notes, w_user is not None, o_user is not None))
    return cols


def _model_key(prepared: Prepared) -> tuple[Any, ...]:
    d, a = prepared.design, prepared.approximation
    arrays = (d.y, d.weights, d.offset,
              *((d.X.values, d.X.columns) if isinstance(d.X, SparseRows) else (d.X,)),
              *(x for t in d.re_terms for x in ((t.Zraw.values, t.Zraw.columns)
                                                if isinstance(t.Zraw, SparseRows)
                                                else (t.Zraw,))),
              *(t.group_index for t in d.re_terms))
    return (prepared.family.name, prepared.family.link.name, a, d.fixed_names,
            tuple(d.theta_names), tuple(hash(np.ascontiguousarray(x).tobytes()) for x in arrays))


# ==================================================================================== our fits
def _ngmm_column(fit: NGMMResult, label: str, notes: _Notes,
                 newdata: pd.DataFrame | None) -> ModelColumn:
    se = pd.Series(np.sqrt(np.clip(np.diag(fit.vcov.to_numpy()), 0.0, None)),
                   index=fit.fixef.index)
    nn = tuple(ni.term.label for ni in fit.design.nets)
    kind = "NGMM" if nn else ("LMM" if fit.t_stat else "GLMM")
    status = "ok"
    if not fit.diagnostics.converged:
        status = "converged with warnings"
    for msg in fit.diagnostics.messages:
        notes.add(f"{label}: {msg}")
    heldout: dict[str, float] = {}
    if newdata is not None:
        nd = fit.design.spec.new_data(newdata, allow_new_levels=True)
        y, w = _new_response(fit.design, newdata)
        # held-out groups are intended here: they are scored with a zero random effect
        eta = fit.predict(newdata, type="link", allow_new_levels=True)
        _note_new_levels(nd.group_index, notes)
        heldout = _heldout(fit.family, y, w, eta, fit.sigma)
    return ModelColumn(
        label=label, engine="ngmm_formula", model=kind, method=_method(fit), call=_call(fit),
        fixef=fit.fixef.astype(float), std_errors=se, random=_varcorr_series(fit.varcorr),
        loglik=float(fit.loglik), npar=int(fit.npar), nobs=int(fit.nobs), heldout=heldout,
        ok=True, status=status, nn_terms=nn)


def _method(fit: NGMMResult) -> str:
    a = fit.approximation
    if a.kind == "exact":
        m = "REML" if a.reml else "ML"
    elif a.kind == "laplace":
        m = "ML (Laplace)"
    elif a.kind == "agq":
        m = f"ML (AGQ, nAGQ = {a.nagq})"
    elif a.kind == "variational":
        m = "ELBO (Gaussian variational)"
    else:
        m = f"ML (truncated, M = {a.truncation:g}, K = {a.points})"
    return m


def _call(fit: NGMMResult) -> str:
    fam = fit.family
    family = f'"{fam.name}"' if fam.link.name == fam.default_link else \
        f'get_family("{fam.name}", "{fam.link.name}")'
    args = [f'"{fit.formula}"', fit.data_name or "data", f"family={family}"]
    a = fit.approximation
    if a.kind == "exact":
        if fit.design.nets or not a.reml:
            args.append(f"reml={a.reml}")
    elif a.kind == "agq":
        args.append(f'approx="agq", nagq={a.nagq}')
    elif a.kind == "laplace":
        args.append('approx="laplace"')
    elif a.kind == "variational":
        args.append('approx="variational"')
    else:
        args.append(f'approx="truncated", truncation={a.truncation:g}, points={a.points}')
    return f"ngmm({', '.join(args)})"


def _varcorr_series(varcorr: pd.DataFrame) -> pd.Series:
    out: dict[str, float] = {}
    for row in varcorr.itertuples(index=False):
        group, var1, var2 = str(row.group), row.var1, row.var2
        if group == "Residual" and _missing(var1):
            out["Residual"] = float(row.sdcor)  # type: ignore[arg-type]
        elif _missing(var2):
            out[f"{group} {var1}"] = float(row.sdcor)  # type: ignore[arg-type]
        else:
            out[f"{group} corr({var1}, {var2})"] = float(row.sdcor)  # type: ignore[arg-type]
    return pd.Series(out, dtype=float)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _approx_kwargs(fit: NGMMResult) -> dict[str, Any]:
    a = fit.approximation
    if a.kind == "exact":
        return {"approx": "auto", "reml": a.reml}
    if a.kind == "laplace":
        return {"approx": "laplace"}
    if a.kind == "agq":
        return {"approx": "agq", "nagq": a.nagq}
    if a.kind == "variational":
        return {"approx": "variational"}
    return {"approx": "truncated", "truncation": a.truncation, "points": a.points}


# ==================================================================================== data
def _model_frame(fit: NGMMResult, data: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``data`` the fit used (``fit.design.row_index``), in the fit's order."""
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    idx = fit.design.row_index
    if not data.index.is_unique:
        if len(data) == fit.nobs and fit.design.n_dropped_na == 0:
            return data.reset_index(drop=True)
        raise DataError("data has a non-unique index: the fit's rows (design.row_index) "
                        "cannot be found in it; use the DataFrame the model was fitted on")
    missing = idx.difference(data.index)
    if len(missing):
        raise DataError(f"data lacks {len(missing)} of the rows the fit used (e.g. "
                        f"{list(missing[:3])}): pass the DataFrame the model was fitted on")
    return data.loc[idx].reset_index(drop=True)


def _check_same_data(fit: NGMMResult, design: Design) -> None:
    d = fit.design
    same = design.nobs == d.nobs and np.allclose(design.y, d.y, rtol=1e-10, atol=1e-12)
    if same and not d.nets and design.fixed_names == d.fixed_names:
        same = all(np.allclose(a, b, rtol=1e-10, atol=1e-12)
                   for a, b in zip(matrix_columns(design.X), matrix_columns(d.X)))
    if not same:
        raise DataError("data is not the data the fit was made on (the response or the "
                        "model matrix differs): pass the same DataFrame")


def _user_weights_offset(fit_design: Design, base: Design
                         ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Prior weights and offset given to ``ngmm`` as arguments (not in the formula)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(base.weights > 0, fit_design.weights / base.weights, 1.0)
    w = None if np.allclose(ratio, 1.0, rtol=1e-12, atol=0) else np.asarray(ratio)
    diff = fit_design.offset - base.offset
    o = None if np.allclose(diff, 0.0, atol=1e-12) else np.asarray(diff)
    return w, o


# ==================================================================================== translation
@dataclass(frozen=True)
class StatsmodelsSpec:
    """How one model is written for statsmodels (see the module notes for the rules).

    Attributes
    ----------
    model : str
        ``"MixedLM"``, ``"BinomialBayesMixedGLM"``, ``"PoissonBayesMixedGLM"``, or ``""`` when
        unsupported.
    formula : str
        Response column ``~`` fixed part (``"Reaction ~ Days"``).
    groups : str or None
        ``MixedLM``'s ``groups`` column.
    re_formula : str or None
        ``MixedLM``'s ``re_formula``.
    vc_formula : dict of str to str
        ``MixedLM``'s ``vc_formula`` or the Bayesian GLMMs' ``vc_formulas``, keyed by the
        table's random-effect labels (``"herd (Intercept)"``).
    components : dict of str to (int, int)
        Variance component -> (index of the term in ``design.re_terms``, column).
    re_term : int or None
        The term fitted by ``re_formula``.
    response : str
        Name of the response column in statsmodels' frame.
    bernoulli : bool
        Whether the binomial response is expanded to 0/1 rows.
    helper_columns : dict of str to (str, int, int)
        Columns added to statsmodels' frame: ``("group", k, 0)`` the labels of term ``k``'s
        grouping factor, ``("z", k, j)`` column ``j`` of its ``Zraw``, ``("one", 0, 0)``.
    unsupported : str or None
        Why statsmodels cannot fit this model.
    notes : tuple of str
    """

    model: str
    formula: str = ""
    groups: str | None = None
    re_formula: str | None = None
    vc_formula: dict[str, str] = field(default_factory=dict)
    components: dict[str, tuple[int, int]] = field(default_factory=dict)
    re_term: int | None = None
    response: str = ""
    bernoulli: bool = False
    helper_columns: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    unsupported: str | None = None
    notes: tuple[str, ...] = ()

    def call(self, reml: bool = True) -> str:
        """The statsmodels call, for the table's list of models."""
        if not self.model:
            return "—"
        data = "data_bernoulli" if self.bernoulli else "data"
        if self.model == "MixedLM":
            args = [f'"{self.formula}"', data, f'groups="{self.groups}"',
                    f're_formula="{self.re_formula}"']
            if self.vc_formula:
                args.append(f"vc_formula={self.vc_formula!r}")
            return f"MixedLM.from_formula({', '.join(args)}).fit(reml={reml})"
        return (f'{self.model}.from_formula("{self.formula}", {self.vc_formula!r}, {data})'
                ".fit_vb()")


#: The note of a comparison with one of statsmodels' Bayesian mixed GLMs.
_BAYES_NOTE = ("statsmodels' {model} is Bayesian (priors N(0, 2^2) on the fixed "
               "effects, N(0, 1) on the log-SDs; fit_vb(): mean-field variational "
               "Bayes): its column shows posterior means (SDs: exp of the posterior mean "
               "log-SD) and posterior SDs in parentheses. Its logLik is this package's "
               "marginal log-likelihood at those values (same approximation as the "
               "linear fit), AIC/BIC from it with npar = fixed effects + variance "
               "components.")


def _statsmodels_model(family: Family) -> str | StatsmodelsSpec:
    """statsmodels' class for ``family``, or the spec saying that it has none."""
    fam, link = family.name, family.link.name
    if fam == "gaussian" and link == "identity":
        model = "MixedLM"
    elif fam == "binomial" and link == "logit":
        model = "BinomialBayesMixedGLM"
    elif fam == "poisson" and link == "log":
        model = "PoissonBayesMixedGLM"
    elif fam == "binomial":
        return StatsmodelsSpec("", unsupported=f"statsmodels' BinomialBayesMixedGLM has the "
                               f"logit link only (this model: binomial({link}))")
    elif fam == "poisson":
        return StatsmodelsSpec("", unsupported=f"statsmodels' PoissonBayesMixedGLM has the "
                               f"log link only (this model: poisson({link}))")
    else:
        return StatsmodelsSpec("", unsupported=f"statsmodels has no GLMM for the {fam}"
                               f"({link}) family")
    return model


def _unsupported_inputs(model: str, design: Design, offset: bool, prior_weights: bool
                        ) -> StatsmodelsSpec | None:
    """The spec refusing offsets and prior weights that ``model`` cannot take, or None."""
    parsed = design.formula
    bayes = model != "MixedLM"
    rr = [t for t in design.re_terms if t.rank is not None]
    if rr:
        return StatsmodelsSpec("", unsupported=f"statsmodels has no reduced-rank random "
                               f"effects (rr({rr[0].expr} | {rr[0].group}, d = {rr[0].rank}))")
    if bayes and offset:
        return StatsmodelsSpec("", unsupported=f"statsmodels' {model} has no offset")
    if bayes and parsed.offsets:
        return StatsmodelsSpec("", unsupported=f"statsmodels' {model} has no offset "
                               f"(formula offset({parsed.offsets[0]}))")
    if model == "MixedLM" and prior_weights:
        return StatsmodelsSpec("", unsupported="statsmodels' MixedLM has no prior weights")
    if model == "PoissonBayesMixedGLM" and (prior_weights or
                                            not np.allclose(design.weights, 1.0)):
        return StatsmodelsSpec("", unsupported="statsmodels' PoissonBayesMixedGLM has no "
                               "prior weights")
    return None


def _unsupported_one_group(design: Design) -> StatsmodelsSpec | None:
    """The spec refusing crossed/nested factors that MixedLM's one all-ones group cannot
    hold (too many rows, or a correlated term), or None."""
    terms = design.re_terms
    if design.nobs > MAX_ONE_GROUP_ROWS:
        return StatsmodelsSpec("", unsupported=f"crossed/nested factors go to "
                               f"statsmodels' MixedLM as one all-ones group, whose "
                               f"{design.nobs} x {design.nobs} covariance is too "
                               f"large (limit {MAX_ONE_GROUP_ROWS} rows)")
    for t in terms:
        if t.q > 1 and t.correlated:
            return StatsmodelsSpec("", unsupported=f"statsmodels' MixedLM with "
                                   f"several grouping factors has independent "
                                   f"variance components only: the correlated term "
                                   f"({t.expr} | {t.group}) cannot be written")
    return None


def statsmodels_spec(design: Design, family: Family, frame: pd.DataFrame, *,
                     prior_weights: bool = False, offset: bool = False) -> StatsmodelsSpec:
    """Translate a (linear) design into statsmodels' formula arguments.

    Parameters
    ----------
    design : Design
        The design of the linear formula (``prepare(linear_formula, ...).design``).
    family : Family
    frame : DataFrame
        The model rows (for the column types of slopes and grouping factors).
    prior_weights, offset : bool
        Whether ``ngmm`` was given weights / an offset as arguments.

    Returns
    -------
    StatsmodelsSpec
        ``unsupported`` says why when statsmodels cannot fit the model.
    """
    model_or_refusal = _statsmodels_model(family)
    if isinstance(model_or_refusal, StatsmodelsSpec):
        return model_or_refusal
    model = model_or_refusal
    parsed = design.formula
    fixed = _patsy_fixed(parsed.fixed)
    notes: list[str] = []
    lhs = parsed.lhs
    response = lhs if (_IDENT.match(lhs) and parsed.response_cbind is None) else "_response"
    bayes = model != "MixedLM"

    refusal = _unsupported_inputs(model, design, offset, prior_weights)
    if refusal is not None:
        return refusal
    bernoulli = False
    if model == "BinomialBayesMixedGLM":
        rows = _bernoulli_rows(design)
        if isinstance(rows, StatsmodelsSpec):
            return rows
        if rows is not None:
            bernoulli = True
            notes.append(f"statsmodels' BinomialBayesMixedGLM needs 0/1 responses: {lhs} "
                         f"was expanded to {rows} Bernoulli rows (one per "
                         f"trial) for statsmodels only; logLik, AIC and BIC are on the "
                         f"{design.nobs} binomial rows for every column.")
    if parsed.offsets or offset:
        notes.append("statsmodels' MixedLM has no offset: it was fitted to the response "
                     "minus the offset.")
    if parsed.response_cbind is not None or response == "_response":
        if not bernoulli:
            notes.append(f"statsmodels' response column _response holds {lhs}.")

    refs = _HelperColumns(frame)
    if model == "MixedLM" and len({t.group for t in design.re_terms}) == 1:
        part = _one_grouping_factor(design.re_terms, refs)
    else:
        part = _variance_components(model, design, refs, notes)
    if isinstance(part, StatsmodelsSpec):
        return part
    if bayes:
        notes.append(_BAYES_NOTE.format(model=model))
    return StatsmodelsSpec(
        model=model, formula=f"{response} ~ {fixed}", groups=part.groups,
        re_formula=part.re_formula, vc_formula=part.vc, components=part.components,
        re_term=part.re_term, response=response, bernoulli=bernoulli,
        helper_columns=refs.columns, notes=tuple(notes))


def _bernoulli_rows(design: Design) -> int | StatsmodelsSpec | None:
    """The number of 0/1 rows that a binomial response with trials expands to (None when it
    is 0/1 already), or the spec refusing it (non-integer trials, too many rows).

    Parameters
    ----------
    design : Design
    """
    w, y = design.weights, design.y
    if np.allclose(w, 1.0) and np.all((y == 0) | (y == 1)):
        return None
    trials = np.round(w)
    succ = np.round(y * w)
    if not (np.allclose(trials, w, atol=1e-8) and np.allclose(succ, y * w, atol=1e-6)):
        return StatsmodelsSpec("", unsupported="statsmodels' BinomialBayesMixedGLM "
                               "needs 0/1 responses; this binomial response has "
                               "non-integer trials or successes")
    if trials.sum() > MAX_BERNOULLI_ROWS:
        return StatsmodelsSpec("", unsupported=f"the binomial response would expand "
                               f"to {int(trials.sum())} Bernoulli rows (limit "
                               f"{MAX_BERNOULLI_ROWS})")
    return int(trials.sum())


@dataclass
class _HelperColumns:
    """The columns that statsmodels' frame needs besides the data's (``helper_columns`` of
    :class:`StatsmodelsSpec`), added as the translation refers to them.

    Parameters
    ----------
    frame : DataFrame
        The model rows: a grouping factor or slope that is a column of it is used as is.
    """

    frame: pd.DataFrame
    columns: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def group(self, k: int, t: ReTerm) -> str:
        """The column of term ``k``'s grouping factor."""
        if _IDENT.match(t.group) and t.group in self.frame.columns:
            return t.group
        name = f"_g{k}"
        self.columns[name] = ("group", k, 0)
        return name

    def slope(self, k: int, t: ReTerm, j: int) -> str:
        """The column of term ``k``'s ``j``-th random-effect column (a numeric data column,
        or column ``j`` of its ``Zraw``)."""
        c = t.cnms[j]
        if (_IDENT.match(c) and c in self.frame.columns
                and pd.api.types.is_numeric_dtype(self.frame[c])
                and not pd.api.types.is_bool_dtype(self.frame[c])):
            return c
        name = f"_z{k}_{j}"
        self.columns[name] = ("z", k, j)
        return name


@dataclass
class _RandomPart:
    """The random part as statsmodels writes it: ``groups``, ``re_formula`` (of the term
    ``re_term``), ``vc`` (the variance components' formulas) and ``components`` (each
    component's term and column), as :class:`StatsmodelsSpec` names them."""

    groups: str | None = None
    re_formula: str | None = None
    re_term: int | None = None
    vc: dict[str, str] = field(default_factory=dict)
    components: dict[str, tuple[int, int]] = field(default_factory=dict)


def _component_label(t: ReTerm, j: int) -> str:
    """The table's label of column ``j`` of term ``t`` (``"herd (Intercept)"``)."""
    return f"{t.name} {t.cnms[j]}"


def _one_grouping_factor(terms: Sequence[ReTerm], refs: _HelperColumns
                         ) -> _RandomPart | StatsmodelsSpec:
    """MixedLM with one grouping factor: its term with the most columns is ``re_formula``,
    the others (one column each) variance components; refused when a second term has
    several columns.

    Parameters
    ----------
    terms : sequence of ReTerm
        The design's terms, all of one grouping factor.
    refs : _HelperColumns
    """
    part = _RandomPart(groups=refs.group(0, terms[0]))
    re_term = max(range(len(terms)), key=lambda k: (terms[k].q, -k))
    part.re_term = re_term
    main = terms[re_term]
    parts = ["1" if c == "(Intercept)" else refs.slope(re_term, main, j)
             for j, c in enumerate(main.cnms)]
    part.re_formula = " + ".join(parts if "(Intercept)" in main.cnms else ["0", *parts])
    for k, t in enumerate(terms):
        if k == re_term:
            continue
        if t.q > 1:
            return StatsmodelsSpec("", unsupported=f"statsmodels' MixedLM has one "
                                   f"covariance block per group: the second term with "
                                   f"several columns ({t.expr} | {t.group}) cannot be "
                                   "written")
        ref = "1" if t.cnms[0] == "(Intercept)" else f"0 + {refs.slope(k, t, 0)}"
        part.vc[_component_label(t, 0)] = ref
        part.components[_component_label(t, 0)] = (k, 0)
    return part


def _variance_components(model: str, design: Design, refs: _HelperColumns,
                         notes: list[str]) -> _RandomPart | StatsmodelsSpec:
    """Every random-effect column as an independent variance component: of one all-ones
    group for MixedLM (crossed or nested factors), or the Bayesian GLMMs' ``vc_formulas``.

    Parameters
    ----------
    model : str
    design : Design
    refs : _HelperColumns
    notes : list of str
        The comparison's notes; this adds its own.
    """
    part = _RandomPart()
    if model == "MixedLM":
        refusal = _unsupported_one_group(design)
        if refusal is not None:
            return refusal
        part.groups, part.re_formula = "_one", "0"
        refs.columns["_one"] = ("one", 0, 0)
        notes.append("statsmodels' MixedLM has one grouping factor: the crossed/nested "
                     "factors were fitted as variance components (vc_formula) of a single "
                     "all-ones group.")
    for k, t in enumerate(design.re_terms):
        g = refs.group(k, t)
        if model != "MixedLM" and t.q > 1 and t.correlated:
            notes.append(f"statsmodels' {model} has independent variance components: "
                         f"({t.expr} | {t.group}) was fitted without its correlations, as "
                         f"({t.expr} || {t.group}).")
        for j, c in enumerate(t.cnms):
            ref = f"0 + C({g})" if c == "(Intercept)" else \
                f"0 + C({g}):{refs.slope(k, t, j)}"
            part.vc[_component_label(t, j)] = ref
            part.components[_component_label(t, j)] = (k, j)
    return part


def _patsy_fixed(fixed: str) -> str:
    """formulaic's ``scale(x)`` divides by the ``ddof = 1`` SD, patsy's by the ``ddof = 0``
    one: write ``scale(x, ddof=1)`` for patsy (statsmodels' default formula engine)."""
    try:
        from statsmodels.formula import options

        if options.formula_engine != "patsy":
            return fixed
    except ImportError:  # pragma: no cover - older statsmodels: patsy only
        pass
    out, pos = [], 0
    for m in re.finditer(r"(?<![A-Za-z0-9_.])scale\(", fixed):
        depth, end = 0, None
        for i in range(m.end() - 1, len(fixed)):
            depth += {"(": 1, ")": -1}.get(fixed[i], 0)
            if depth == 0:
                end = i
                break
        if end is None or "ddof" in fixed[m.end():end] or end < pos:
            continue
        out.append(fixed[pos:end] + ", ddof=1")
        pos = end
    out.append(fixed[pos:])
    return "".join(out)


def _sm_name(name: str) -> str:
    """statsmodels' (patsy's) column name -> this package's (lme4's): ``period[T.2]`` ->
    ``period2``, ``Intercept`` -> ``(Intercept)``, ``scale(x, ddof=1)`` -> ``scale(x)``."""
    return lme4_name(name.replace(", ddof=1)", ")"))


def _statsmodels_frame(spec: StatsmodelsSpec, design: Design, frame: pd.DataFrame
                       ) -> tuple[pd.DataFrame, np.ndarray]:
    """statsmodels' data: the model rows with the response (and helper columns); Bernoulli
    rows for an expanded binomial response. Returns the frame and each row's model row."""
    sm = frame.copy()
    y = np.asarray(design.y, dtype=float)
    if spec.model == "MixedLM":
        y = y - design.offset
    sm[spec.response] = y
    for name, (kind, k, j) in spec.helper_columns.items():
        t = design.re_terms[k]
        if kind == "group":
            sm[name] = pd.Categorical(np.asarray(t.levels, dtype=object)[t.group_index],
                                      categories=list(t.levels))
        elif kind == "z":
            assert not isinstance(t.Zraw, SparseRows)  # rr terms are refused above
            sm[name] = t.Zraw[:, j]
        else:
            sm[name] = 1
    rows = np.arange(len(sm))
    if spec.bernoulli:
        trials = np.round(design.weights).astype(np.int64)
        succ = np.round(design.y * design.weights).astype(np.int64)
        rows = np.repeat(np.arange(len(sm)), trials)
        start = np.repeat(np.cumsum(trials) - trials, trials)
        within = np.arange(len(rows)) - start
        sm = sm.iloc[rows].reset_index(drop=True)
        sm[spec.response] = (within < succ[rows]).astype(float)
    return sm, rows


# ==================================================================================== statsmodels
@dataclass
class _SMFit:
    fixef: pd.Series
    se: pd.Series
    sds: dict[str, float]           # table label -> SD or correlation
    loglik: float
    npar: int
    converged: bool
    coefs: list[np.ndarray] | None  # random effects per term, our level order
    X: np.ndarray                   # statsmodels' fixed-effects matrix
    names: list[str]                # its columns under our names
    fail: list[str]
    info: list[str]
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _statsmodels_column(fit: NGMMResult, linear: NGMMResult, prepared: Prepared,
                        frame: pd.DataFrame, label: str, newdata: pd.DataFrame | None,
                        notes: _Notes, prior_weights: bool, offset: bool) -> ModelColumn:
    design = prepared.design
    spec = statsmodels_spec(design, fit.family, frame, prior_weights=prior_weights,
                            offset=offset)
    empty = pd.Series(dtype=float)
    if spec.unsupported:
        notes.add(f"{label}: not available: {spec.unsupported}.")
        return ModelColumn(label=label, engine="statsmodels", model="none", method="—",
                           call="—", fixef=empty, std_errors=empty, random=empty, ok=False,
                           status=f"not available ({spec.unsupported})")
    for n in spec.notes:
        notes.add(n)
    reml = bool(linear.reml)
    method = ("REML" if reml else "ML") if spec.model == "MixedLM" else "VB (fit_vb)"
    try:
        res = _fit_statsmodels(spec, design, frame, reml)
    except Exception as exc:  # statsmodels' and patsy's errors are of many types
        msg = f"failed ({type(exc).__name__}: {_one_line(str(exc))})"
        notes.add(f"{label}: {msg}")
        return ModelColumn(label=label, engine="statsmodels", model=spec.model, method=method,
                           call=spec.call(reml), fixef=empty, std_errors=empty, random=empty,
                           ok=False, status=msg)
    # every statsmodels column must be the same column of this package's design
    ours = dict(zip(design.fixed_names, matrix_columns(design.X)))
    mismatch = [n for n, col in zip(res.names, res.X.T) if n not in ours
                or not np.allclose(col, ours[n][res.rows], rtol=1e-7, atol=1e-9)]
    missing = [n for n in design.fixed_names if n not in res.names]
    fail = list(res.fail)
    ok = not fail
    status = "ok"
    if fail:
        status = fail[0]
        notes.add(f"{label}: {'; '.join(fail)}")
        hint = _scale_hint(design)
        if hint:
            notes.add(f"{label}: {hint}")
    for msg in res.info:
        notes.add(f"{label}: {msg}")
    comparable = not mismatch and not missing
    if mismatch:
        lost = "held-out numbers" if spec.model == "MixedLM" else "logLik and held-out numbers"
        notes.add(f"{label}: fixed-effect column(s) {', '.join(mismatch)} differ from this "
                  "package's column(s) of the same name (patsy and formulaic encode them "
                  f"differently): those coefficients are not comparable, and its {lost} are "
                  "not computed.")
    if missing:
        notes.add(f"{label}: no coefficient named {', '.join(missing)}.")
    loglik = res.loglik
    if spec.model != "MixedLM":
        loglik = _objective_at_statsmodels(res, spec, prepared) if (ok and comparable) \
            else math.nan
    heldout: dict[str, float] = {}
    if newdata is not None and ok:
        heldout = _heldout_statsmodels(res, linear, prepared, newdata) if comparable else {}
    return ModelColumn(
        label=label, engine="statsmodels", model=spec.model, method=method, call=spec.call(reml),
        fixef=res.fixef, std_errors=res.se, random=pd.Series(res.sds, dtype=float),
        loglik=loglik, npar=res.npar, nobs=design.nobs, heldout=heldout, ok=ok, status=status)


def _fit_statsmodels(spec: StatsmodelsSpec, design: Design, frame: pd.DataFrame, reml: bool
                     ) -> _SMFit:
    sm_frame, rows = _statsmodels_frame(spec, design, frame)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec.model == "MixedLM":
            res = _fit_mixedlm(spec, design, sm_frame, reml)
        else:
            res = _fit_bayes(spec, design, sm_frame, rows)
    res.rows = rows
    _diagnose(res, caught, mixedlm=spec.model == "MixedLM")
    return res


def _fit_mixedlm(spec: StatsmodelsSpec, design: Design, sm_frame: pd.DataFrame,
                 reml: bool) -> _SMFit:
    from statsmodels.regression.mixed_linear_model import MixedLM

    model = MixedLM.from_formula(spec.formula, sm_frame, groups=spec.groups,
                                 re_formula=spec.re_formula,
                                 vc_formula=spec.vc_formula or None)
    r = model.fit(reml=reml)
    names = [_sm_name(n) for n in model.exog_names]
    fixef = pd.Series(np.asarray(r.fe_params, dtype=float), index=names)
    se = pd.Series(np.asarray(r.bse_fe, dtype=float), index=names)
    sds: dict[str, float] = {}
    terms = design.re_terms
    k_re = model.k_re
    cov_re = np.asarray(r.cov_re, dtype=float).reshape(k_re, k_re)
    if spec.re_term is not None and k_re:
        t = terms[spec.re_term]
        if k_re != t.q:
            raise DataError(f"re_formula '{spec.re_formula}' gave {k_re} columns, the term "
                            f"has {t.q}")
        sd = np.sqrt(np.clip(np.diag(cov_re), 0.0, None))
        for j in range(t.q):
            sds[f"{t.name} {t.cnms[j]}"] = float(sd[j])
        for j in range(t.q):
            for i in range(j + 1, t.q):
                if t.correlated:
                    c = cov_re[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else math.nan
                    sds[f"{t.name} corr({t.cnms[j]}, {t.cnms[i]})"] = float(c)
    vc_names = list(model.exog_vc.names) if model.k_vc else []
    for name, v in zip(vc_names, np.asarray(r.vcomp, dtype=float)):
        sds[name] = math.sqrt(max(v, 0.0))
    sds["Residual"] = math.sqrt(max(float(r.scale), 0.0))
    npar = len(names) + k_re * (k_re + 1) // 2 + len(vc_names) + 1
    coefs = _mixedlm_ranef(model, r, spec, design)
    return _SMFit(fixef=fixef, se=se, sds=sds, loglik=float(r.llf), npar=npar,
                  converged=bool(getattr(r, "converged", True)), coefs=coefs,
                  X=np.asarray(model.exog, dtype=float), names=names, fail=[], info=[])


def _mixedlm_ranef(model: Any, r: Any, spec: StatsmodelsSpec, design: Design
                   ) -> list[np.ndarray]:
    """MixedLM's predicted random effects (BLUPs) laid out as this package's terms."""
    terms = design.re_terms
    coefs = [np.zeros((t.n_levels, t.q)) for t in terms]
    ranef = r.random_effects
    vc_names = list(model.exog_vc.names) if model.k_vc else []
    for g, idx in model.row_indices.items():
        if g not in ranef:
            continue
        values = np.asarray(ranef[g], dtype=float)
        pos = 0
        if spec.re_term is not None and model.k_re:
            k = spec.re_term
            level = terms[k].group_index[idx[0]]
            coefs[k][level, :] = values[:model.k_re]
            pos = model.k_re
        for i, name in enumerate(vc_names):
            mat = np.asarray(model.exog_vc.mats[i][model.group_labels.index(g)])
            k, j = spec.components[name]
            gi = terms[k].group_index[idx]
            for c in range(mat.shape[1]):
                nz = np.flatnonzero(mat[:, c])
                if nz.size:
                    coefs[k][gi[nz[0]], j] = values[pos + c]
            pos += mat.shape[1]
    return coefs


def _fit_bayes(spec: StatsmodelsSpec, design: Design, sm_frame: pd.DataFrame,
               rows: np.ndarray) -> _SMFit:
    from statsmodels.genmod import bayes_mixed_glm as bmg

    cls = getattr(bmg, spec.model)
    model = cls.from_formula(spec.formula, spec.vc_formula, sm_frame)
    kw: dict[str, Any] = {}
    import inspect

    if "rng" in inspect.signature(model.fit_vb).parameters:
        kw["rng"] = 0  # the starting SDs are random: seed them
    r = model.fit_vb(**kw)
    names = [_sm_name(n) for n in model.exog_names]
    fixef = pd.Series(np.asarray(r.fe_mean, dtype=float), index=names)
    se = pd.Series(np.asarray(r.fe_sd, dtype=float), index=names)
    sds = {name: float(np.exp(m)) for name, m in zip(model.vcp_names, r.vcp_mean)}
    # random effects: the posterior mean of each column, placed at the level of its rows
    terms = design.re_terms
    coefs = [np.zeros((t.n_levels, t.q)) for t in terms]
    Z = sp.csc_matrix(model.exog_vc)
    vc_mean = np.asarray(r.vc_mean, dtype=float)
    for c in range(Z.shape[1]):
        start, stop = Z.indptr[c], Z.indptr[c + 1]
        if stop == start:
            continue
        k, j = spec.components[model.vcp_names[int(model.ident[c])]]
        row = rows[Z.indices[start]]
        coefs[k][terms[k].group_index[row], j] = vc_mean[c]
    optim = getattr(r, "optim_res", None)
    converged = bool(getattr(optim, "success", True))
    return _SMFit(fixef=fixef, se=se, sds=sds, loglik=math.nan,
                  npar=len(names) + len(model.vcp_names), converged=converged, coefs=coefs,
                  X=np.asarray(model.exog, dtype=float), names=names, fail=[], info=[])


def _diagnose(res: _SMFit, caught: Sequence[warnings.WarningMessage], *, mixedlm: bool
              ) -> None:
    """Decide whether a statsmodels fit failed (fills ``res.fail`` and ``res.info``)."""
    conv: list[str] = []
    runtime: dict[str, int] = {}
    for w in caught:
        cat = w.category.__name__
        msg = _one_line(str(w.message))
        if cat == "ConvergenceWarning":
            if mixedlm and "boundary" in msg.lower():
                res.info.append(f"{cat}: {msg} (a singular fit)")
            elif mixedlm and msg.startswith("Retrying") and res.converged:
                res.info.append(f"{cat}: {msg}")
            elif f"{cat}: {msg}" not in conv:
                conv.append(f"{cat}: {msg}")
        elif issubclass(w.category, RuntimeWarning):
            runtime[msg] = runtime.get(msg, 0) + 1
    rt = ", ".join(f"{m} x{n}" for m, n in sorted(runtime.items(), key=lambda kv: -kv[1])[:3])
    rt_text = f"; {sum(runtime.values())} RuntimeWarnings ({rt})" if runtime else ""
    values = np.concatenate([res.fixef.to_numpy(), np.array(list(res.sds.values()))])
    if conv:
        res.fail.append(f"failed to converge ({'; '.join(conv)}{rt_text})")
    elif not res.converged:
        res.fail.append(f"failed to converge (the optimiser reports no convergence{rt_text})")
    elif not np.all(np.isfinite(values)):
        res.fail.append(f"failed (non-finite estimates{rt_text})")
    elif np.any(np.abs(values) > HUGE_ESTIMATE):
        res.fail.append(f"failed (implausibly large estimates, max |value| = "
                        f"{np.max(np.abs(values)):.3g}{rt_text})")
    elif len(res.fixef) and np.all(np.abs(res.fixef.to_numpy()) < ZERO_FIXEF):
        res.fail.append(f"failed to converge (all fixed effects are ~0: the fit did not move "
                        f"from its starting values{rt_text})")
    elif runtime:
        res.info.append(f"the fit emitted{rt_text[1:]}; its estimates are finite and "
                        "plausible")


def _scale_hint(design: Design) -> str | None:
    """Name the unscaled fixed-effect columns (the usual cause of statsmodels' failures)."""
    big = []
    for name, col in zip(design.fixed_names, matrix_columns(design.X)):
        s = float(np.std(col))
        if name != "(Intercept)" and (s > 10 or abs(float(np.mean(col))) > 10 * max(s, 1e-12)):
            big.append(f"{name} (SD {s:.3g})")
    if not big:
        return None
    return ("unscaled covariates are the usual cause: rescale " + ", ".join(big)
            + " (e.g. with scale()) and refit")


def _objective_at_statsmodels(res: _SMFit, spec: StatsmodelsSpec, prepared: Prepared) -> float:
    """This package's marginal log-likelihood at statsmodels' point estimates."""
    design = prepared.design
    beta = np.array([res.fixef[n] for n in design.fixed_names])
    theta: list[float] = []
    for t in design.re_terms:
        for j in range(t.q):
            for i in range(j, t.q):
                if i == j:
                    theta.append(res.sds.get(f"{t.name} {t.cnms[j]}", math.nan))
                else:
                    theta.append(0.0)
    if not np.all(np.isfinite(theta)):
        return math.nan
    return objective_at(prepared, beta, np.asarray(theta), None)


# ==================================================================================== held-out
def _heldout(family: Family, y: np.ndarray, w: np.ndarray, eta: np.ndarray,
             sigma: float) -> dict[str, float]:
    with torch.no_grad():
        eta_t = torch.as_tensor(np.array(eta, dtype=float))
        ll = family.log_prob(torch.as_tensor(np.array(y, dtype=float)), eta_t,
                             math.log(sigma) if family.has_dispersion else None,
                             torch.as_tensor(np.array(w, dtype=float)))
        mu = family.mean(eta_t).numpy()
    out = {"logLik": float(ll.sum())}
    if family.name == "binomial":
        out["AUC"] = _auc(mu, w * y, w * (1.0 - y))
    else:
        out["RMSE"] = float(np.sqrt(np.mean((y - mu) ** 2)))
    out["n"] = float(len(y))
    return out


def _auc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Weighted AUC (Mann--Whitney): P(score of a success > score of a failure), ties 1/2."""
    uniq, inv = np.unique(np.asarray(score, dtype=float), return_inverse=True)
    P = np.bincount(inv, weights=pos, minlength=len(uniq))
    N = np.bincount(inv, weights=neg, minlength=len(uniq))
    below = np.cumsum(N) - N
    denom = P.sum() * N.sum()
    return float(np.sum(P * (below + 0.5 * N)) / denom) if denom > 0 else math.nan


def _heldout_statsmodels(res: _SMFit, linear: NGMMResult, prepared: Prepared,
                         newdata: pd.DataFrame) -> dict[str, float]:
    design = prepared.design
    nd = design.spec.new_data(newdata, allow_new_levels=True)
    y, w = _new_response(design, newdata)
    beta = np.array([res.fixef[n] for n in design.fixed_names])
    eta = nd.offset + nd.X @ beta
    assert res.coefs is not None
    for Z, gi, b in zip(nd.Zraw, nd.group_index, res.coefs):
        eta = eta + re_effect(Z, gi, b)
    sigma = res.sds.get("Residual", 1.0)
    return _heldout(linear.family, y, w, eta, sigma)


def _new_response(design: Design, newdata: pd.DataFrame
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Response and binomial trials of ``newdata``, encoded as in training."""
    nd = design.spec.new_data(newdata, with_response=True, allow_new_levels=True)
    assert nd.y is not None
    return nd.y, nd.weights


def _note_new_levels(group_index: tuple[np.ndarray, ...], notes: _Notes) -> None:
    if not group_index:
        return
    new = np.zeros(len(group_index[0]), dtype=bool)
    for gi in group_index:
        new |= gi < 0
    text = ("Held-out data: every column predicts with its estimated random effects for "
            "groups seen in training")
    if new.any():
        text += (f"; {int(new.sum())} of {len(new)} rows belong to new groups and get a zero "
                 "random effect")
    notes.add(text + ". logLik sums log p(y | fitted linear predictor) with full constants.")


# ==================================================================================== helpers
class _Notes:
    """Numbered notes without repeats."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)


def _fit_names(fits: list[NGMMResult]) -> list[str]:
    names = [str(f.name) if getattr(f, "name", None) else f"m{i + 1}"
             for i, f in enumerate(fits)]
    if len(set(names)) != len(names):
        names = [f"m{i + 1}" for i in range(len(fits))]
    return names


def _title(fits: list[NGMMResult]) -> str:
    data = {f.data_name for f in fits if f.data_name}
    fams = {f"{f.family.name}({f.family.link.name})" for f in fits}
    bits = ["Model comparison"]
    if len(fits) == 1:
        bits.append(f": {fits[0].formula}")
    extra = [f"family {', '.join(sorted(fams))}"]
    if data:
        extra.insert(0, f"data {', '.join(sorted(data))}")
    return "".join(bits) + f"  [{'; '.join(extra)}]"


def _union(groups: Any) -> list[str]:
    out: dict[str, None] = {}
    for g in groups:
        for n in g:
            out.setdefault(str(n), None)
    return list(out)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short_status(status: str) -> str:
    m = re.match(r"^([^(]*)", status)
    return (m.group(1).strip() if m else status) or status


def _format_row(values: list[float], digits: int) -> list[str]:
    fin = [v for v in values if math.isfinite(v)]
    if not fin:
        return ["" for _ in values]
    strs = iter(s.strip() for s in r_format(fin, digits))
    return [next(strs) if math.isfinite(v) else "" for v in values]


def _format_joint(est: list[float], se: list[float], digits: int) -> tuple[list[str], list[str]]:
    """Estimates and standard errors with common decimals (as R's printCoefmat)."""
    both = _format_row(est + se, digits)
    return both[:len(est)], both[len(est):]


def _markdown_table(frame: pd.DataFrame) -> str:
    head = ["", *[str(c) for c in frame.columns]]
    rows = [[str(i), *[str(v) for v in r]] for i, r in zip(frame.index, frame.to_numpy())]
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    widths = [max(w, 3) for w in widths]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                 for j, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(":" + "-" * (w + 1) if j == 0 else "-" * (w + 1) + ":"
                         for j, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *[line(r) for r in rows]])


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "—": "---"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)
