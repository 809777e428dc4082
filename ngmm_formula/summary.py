r"""Summary layer: lme4-style summary tables and the likelihood-ratio ``anova``.

Computing is kept apart from printing:

* :func:`summarize` reads a fitted model and returns a frozen :class:`Summary` holding numbers
  only (pandas tables); its ``__str__`` renders them in the layout of lme4's
  ``print(summary(glmer(...)))`` / ``print(summary(lmer(...)))``.
* :func:`anova` returns lme4's likelihood-ratio table of ``anova(m1, m2, ...)`` as an
  :class:`AnovaTable` (a ``pandas.DataFrame`` that prints as R prints it).

The printing helpers at the end of the module re-implement the few pieces of R's printing that
lme4's layout depends on: ``format()`` of a numeric vector (``formatReal``: a common number of
decimals chosen from ``digits`` significant digits, fixed or scientific notation, whichever is
narrower), ``zapsmall``, ``format.pval``, ``printCoefmat``, ``abbreviate`` and the printing of
character matrices and named vectors. They take strings and floats and know no statistics.

The likelihood-ratio statistic of two nested models fitted by maximum likelihood is

.. math::

    \chi^2 = 2\,\{\ell(\hat\theta_1) - \ell(\hat\theta_0)\}, \qquad
    \mathrm{df} = p_1 - p_0,

referred to a :math:`\chi^2_{\mathrm{df}}` distribution (lme4's ``anova.merMod``; the test is
conservative when a variance parameter is tested on the boundary of its space).
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ngmm_formula.errors import NGMMError

__all__ = ["AnovaTable", "Summary", "anova", "format_anova", "r_format", "summarize"]

#: Marks the package in the title line, as lme4 marks the class (``['lmerMod']``).
PACKAGE_TAG = "ngmm_formula"

#: lme4's ``getOption("lme4.summary.cor.max")``: the correlation of the fixed effects is shown
#: by default only up to this many coefficients.
COR_MAX = 12

#: R's ``getOption("width")``.
WIDTH = 80

#: print.summary.merMod: ``digits = max(3, getOption("digits") - 3)``.
_DIGITS = 4

#: Longest formula used as an anova row name (the table's columns take 58 characters).
_ANOVA_ROWNAME_MAX = WIDTH - 59

_SIGNIF_LEGEND = "0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"
_REFIT_MESSAGE = "refitting model(s) with ML (instead of REML)"


# ==================================================================================== summary
@dataclass(frozen=True, repr=False)
class Summary:
    r"""The numbers of lme4's ``summary(fit)``; ``str(summary)`` gives lme4's layout.

    Attributes
    ----------
    title : str
        e.g. ``"Generalized linear mixed model fit by maximum likelihood (Laplace
        Approximation)"``; the package tag is added when printing.
    header : tuple of str
        The lines under the title: `` Family: binomial  ( logit )`` (not for Gaussian identity
        models, as lmer), ``Formula: ...`` and ``   Data: ...``.
    reml : bool
        Whether the fit is REML (then ``fit_stats`` holds the REML criterion only).
    fit_stats : pandas.Series
        ``AIC, BIC, logLik, -2*log(L), df.resid``; for REML fits ``REML`` (the REML criterion
        :math:`-2\ell_R`).
    residual_quantiles : pandas.Series
        ``Min, 1Q, Median, 3Q, Max`` of the scaled Pearson residuals (R's quantile type 7).
    random_effects : pandas.DataFrame
        One row per variance: ``Groups, Name, Variance, Std.Dev.`` and, when some term has
        correlated effects, ``Corr.1 ... Corr.(q-1)``: row ``i`` of a block holds the
        correlations of its effect with the block's effects ``1 ... i-1`` (NaN elsewhere), as
        lme4 prints the lower triangle. The Gaussian residual is the last row (``Residual``).
    random_effects_blocks : tuple of int
        Number of rows of each covariance block of ``random_effects``, in order.
    ngroups : dict of str to int
        Grouping factor -> number of levels.
    nobs : int
        Number of observations.
    fixed_effects : pandas.DataFrame
        ``Estimate, Std. Error, z value, Pr(>|z|)``; ``t value`` and no p-values for Gaussian
        identity models (as lmer).
    correlation : pandas.DataFrame
        Correlation matrix of the fixed-effects estimates.
    show_correlation : bool
        Whether the correlation table is printed (default: ``p <= 12``, as lme4).
    neural_terms : pandas.DataFrame or None
        ``Term, Inputs, Architecture, Weights, Networks, Share of var(eta)`` per ``nn()``
        term (the weights of all the networks the term averages, their number, and the
        share of the variance of the linear predictor explained by the term), or None.
        Printed as ``Term, Architecture, Weights, Var share`` (the inputs are in the term's
        label; the weights as ``k x n`` for an average of k networks of n weights), or one
        line per term when that table would pass the width.
    notes : tuple of str
        Notes printed after the neural-terms table.
    warnings : tuple of str
        The fit's diagnostics messages, printed last.
    npar : int
        Parameters that AIC and BIC count (``fit.npar``: network weights included).
    network_weights : int
        Weights of all the networks (0 without ``nn()`` terms). With networks a line under
        the fit statistics says what AIC, BIC and df.resid count: the ``npar -
        network_weights`` statistical parameters (fixed effects, variance parameters,
        dispersion) and the weights; ``df.resid`` is ``nobs`` minus the statistical
        parameters (the networks held fixed, as the standard errors are), never negative.
    """

    title: str
    header: tuple[str, ...]
    reml: bool
    fit_stats: pd.Series
    residual_quantiles: pd.Series
    random_effects: pd.DataFrame
    random_effects_blocks: tuple[int, ...]
    ngroups: dict[str, int]
    nobs: int
    fixed_effects: pd.DataFrame
    correlation: pd.DataFrame
    show_correlation: bool
    neural_terms: pd.DataFrame | None
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    npar: int = 0
    network_weights: int = 0

    def to_string(self, width: int = WIDTH) -> str:
        """The summary in lme4's layout, wrapped (where lme4 wraps) at ``width`` columns."""
        return _render_summary(self, width)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return self.to_string()


def summarize(fit: Any, correlation: bool | None = None) -> Summary:
    r"""Compute the tables of lme4's ``summary()`` for a fitted model.

    Parameters
    ----------
    fit : NGMMResult
        Uses ``title, reml, family (.name, .link.name), formula, data_name, loglik, aic, bic,
        deviance, df_resid, nobs, residuals(type="pearson"), varcorr, ngroups, fixef, vcov,
        t_stat, warnings_text, nn_terms``.
    correlation : bool, optional
        Print the correlation of the fixed effects; by default when there are at most
        ``COR_MAX`` (12) coefficients, as lme4.

    Returns
    -------
    Summary

    Notes
    -----
    The scaled residuals are the Pearson residuals divided by :math:`\sigma`, lme4's
    ``residuals(fit, "pearson", scaled = TRUE)``; :math:`\sigma` is the standard deviation of
    the ``Residual`` row of ``varcorr`` (1 when there is none). Wald statistics are
    :math:`z = \hat\beta / \mathrm{se}(\hat\beta)` with two-sided normal p-values
    :math:`2\{1 - \Phi(|z|)\}`.
    """
    fam = fit.family
    fam_name = str(fam.name)
    link_name = str(fam.link.name)
    header: list[str] = []
    if not (fam_name == "gaussian" and link_name == "identity"):
        header.append(f" Family: {fam_name}  ( {link_name} )")
    header.append(f"Formula: {fit.formula}")
    if fit.data_name:
        header.append(f"   Data: {fit.data_name}")

    nn = list(fit.nn_terms or [])
    npar = int(fit.npar)
    network_weights = sum(int(t["n_weights"]) for t in nn)
    df_resid = float(fit.df_resid)
    if network_weights:  # nobs minus the statistical parameters, as NGMMResult.df_resid
        df_resid = float(max(0, int(fit.nobs) - (npar - network_weights)))

    reml = bool(fit.reml)
    if reml:
        fit_stats = pd.Series({"REML": -2.0 * float(fit.loglik)})
    else:
        fit_stats = pd.Series({
            "AIC": float(fit.aic), "BIC": float(fit.bic), "logLik": float(fit.loglik),
            "-2*log(L)": float(fit.deviance), "df.resid": df_resid,
        })

    varcorr = fit.varcorr
    random_effects, blocks, sigma = _random_effects_table(varcorr)
    resid = np.asarray(fit.residuals(type="pearson"), dtype=float) / sigma
    resid = resid[np.isfinite(resid)]
    q = np.quantile(resid, [0.0, 0.25, 0.5, 0.75, 1.0]) if resid.size else np.full(5, np.nan)
    residual_quantiles = pd.Series(q, index=["Min", "1Q", "Median", "3Q", "Max"])

    fixed_effects, corr = _fixed_effects_table(fit.fixef, fit.vcov, bool(fit.t_stat))
    p = len(fixed_effects)
    show_corr = (p <= COR_MAX) if correlation is None else bool(correlation)

    neural, notes = _neural_terms_table(nn, list(fixed_effects.index))

    return Summary(
        title=str(fit.title),
        header=tuple(header),
        reml=reml,
        fit_stats=fit_stats,
        residual_quantiles=residual_quantiles,
        random_effects=random_effects,
        random_effects_blocks=blocks,
        ngroups={str(k): int(v) for k, v in dict(fit.ngroups).items()},
        nobs=int(fit.nobs),
        fixed_effects=fixed_effects,
        correlation=corr,
        show_correlation=show_corr,
        neural_terms=neural,
        notes=tuple(notes),
        warnings=tuple(str(w) for w in (fit.warnings_text or [])),
        npar=npar,
        network_weights=network_weights,
    )


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _random_effects_table(varcorr: pd.DataFrame
                          ) -> tuple[pd.DataFrame, tuple[int, ...], float]:
    """Random-effects table from R's ``as.data.frame(VarCorr(fit))`` layout.

    A covariance block is a run of variance rows of one group followed by the covariance rows
    among them; a variance row after a covariance row, or of another group, starts a new block.
    A run of several variances without covariances (a diagonal term) is split into one block per
    variance, as lme4 prints ``(x || g)``.
    """
    blocks: list[dict[str, Any]] = []
    residual: tuple[float, float] | None = None
    cur: dict[str, Any] | None = None
    for row in varcorr.itertuples(index=False):
        group, var1, var2 = row.group, row.var1, row.var2
        vcov, sdcor = float(row.vcov), float(row.sdcor)  # type: ignore[arg-type]
        if group == "Residual" and _is_missing(var1):
            residual = (vcov, sdcor)
            cur = None
            continue
        if _is_missing(var2):
            if cur is None or cur["group"] != group or cur["cov"]:
                cur = {"group": group, "names": [], "var": [], "sd": [], "cov": {}}
                blocks.append(cur)
            cur["names"].append(str(var1))
            cur["var"].append(vcov)
            cur["sd"].append(sdcor)
        else:
            if cur is None or cur["group"] != group:
                raise NGMMError(f"varcorr: covariance row ({group}, {var1}, {var2}) does not "
                                "follow the variances of its group")
            cur["cov"][(str(var1), str(var2))] = sdcor

    split: list[dict[str, Any]] = []
    for b in blocks:
        if len(b["names"]) > 1 and not b["cov"]:
            for n, v, s in zip(b["names"], b["var"], b["sd"]):
                split.append({"group": b["group"], "names": [n], "var": [v], "sd": [s],
                              "cov": {}})
        else:
            split.append(b)

    maxq = max((len(b["names"]) for b in split), default=1)
    ncorr = maxq - 1
    rows: list[dict[str, Any]] = []
    sizes: list[int] = []
    for b in split:
        names = b["names"]
        sizes.append(len(names))
        for i, name in enumerate(names):
            r: dict[str, Any] = {"Groups": b["group"], "Name": name,
                                 "Variance": b["var"][i], "Std.Dev.": b["sd"][i]}
            for j in range(ncorr):
                c = np.nan
                if j < i:
                    key1, key2 = (names[j], name), (name, names[j])
                    c = b["cov"].get(key1, b["cov"].get(key2, np.nan))
                r[f"Corr.{j + 1}"] = c
            rows.append(r)
    sigma = 1.0
    if residual is not None:
        sizes.append(1)
        r = {"Groups": "Residual", "Name": "", "Variance": residual[0],
             "Std.Dev.": residual[1]}
        for j in range(ncorr):
            r[f"Corr.{j + 1}"] = np.nan
        rows.append(r)
        sigma = residual[1] if residual[1] > 0 else 1.0
    columns = ["Groups", "Name", "Variance", "Std.Dev."] + [f"Corr.{j + 1}"
                                                            for j in range(ncorr)]
    return pd.DataFrame(rows, columns=columns), tuple(sizes), sigma


def _fixed_effects_table(fixef: pd.Series, vcov: pd.DataFrame, t_stat: bool
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    names = [str(n) for n in fixef.index]
    est = np.asarray(fixef, dtype=float)
    V = np.asarray(vcov, dtype=float).reshape(len(est), len(est))
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(np.diag(V))
        stat = est / se
        corr = V / np.outer(se, se)
    table = pd.DataFrame({"Estimate": est, "Std. Error": se}, index=names)
    if t_stat:
        table["t value"] = stat
    else:
        table["z value"] = stat
        table["Pr(>|z|)"] = 2.0 * stats.norm.sf(np.abs(stat))
    return table, pd.DataFrame(corr, index=names, columns=names)


def _neural_terms_table(nn: list[dict[str, Any]], fixef_names: list[str]
                        ) -> tuple[pd.DataFrame | None, list[str]]:
    if not nn:
        return None, []
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    inputs_lists: list[list[str]] = []
    for t in nn:
        inputs = t.get("inputs", ())
        inputs_list = [inputs] if isinstance(inputs, str) else [str(v) for v in inputs]
        inputs_lists.append(inputs_list)
        rows.append({
            "Term": str(t["label"]),
            "Inputs": ", ".join(inputs_list),
            "Architecture": str(t.get("architecture", "")),
            "Weights": int(t["n_weights"]),
            "Networks": int(t.get("networks", 1)),
            "Share of var(eta)": float(t.get("variance_share", np.nan)),
        })
    table = pd.DataFrame(rows, columns=["Term", "Inputs", "Architecture", "Weights",
                                        "Networks", "Share of var(eta)"])
    notes.append("Var share: the term's share of var(eta), the variance of the linear "
                 "predictor on the training data.")
    if any(r["Networks"] > 1 for r in rows):
        notes.append("Weights k x n: the term averages k networks of n weights each (the "
                     "fold networks and the one trained on all groups: Control.average_folds; "
                     "or Control.ensemble).")
    for inputs_list, r in zip(inputs_lists, rows):
        both = [v for v in inputs_list
                if v and any(_coef_uses(name, v) for name in fixef_names)]
        if len(both) == 1:
            notes.append(f"Note: {both[0]} enters {r['Term']} and the linear part; its linear "
                         "coefficient is not interpretable on its own.")
        elif both:
            notes.append(f"Note: {', '.join(both)} enter {r['Term']} and the linear part; their "
                         "linear coefficients are not interpretable on their own.")
    return table, notes


def _coef_uses(coef_name: str, variable: str) -> bool:
    """Whether a fixed-effect column name involves ``variable`` (``x``, ``x[T.b]``, ``x:z``)."""
    for part in coef_name.split(":"):
        if part == variable or part.startswith(variable + "["):
            return True
    return False


# ------------------------------------------------------------------------ summary rendering
def _render_summary(s: Summary, width: int) -> str:
    out: list[str] = []
    out += _title_lines(s.title, PACKAGE_TAG, width)
    out += list(s.header)
    out.append("")
    if s.reml:
        crit = r_format([_r_round(float(s.fit_stats["REML"]), 1)], 7)[0].strip()
        out.append(f"REML criterion at convergence: {crit}")
    else:
        # .prt.aictab: format(round(x, 1)) together, then df.resid on its own
        values = [_r_round(float(v), 1) for v in s.fit_stats]
        cells = r_format(values, 7)
        cells[-1] = r_format([values[-1]], 7)[0]
        out += _named_vector_lines(cells, [str(k) for k in s.fit_stats.index], width)
    if s.network_weights and not s.reml:
        stat = s.npar - s.network_weights
        out += _strwrap(f"npar = {stat} + {s.network_weights:,} network weights: AIC, BIC "
                        f"count all; df.resid = nobs - {stat}", width, exdent=2)
    out.append("")

    out.append("Scaled residuals: ")
    rq = _zapsmall(np.asarray(s.residual_quantiles, dtype=float), _DIGITS + 1)
    out += _named_vector_lines(r_format(list(rq), _DIGITS), list(s.residual_quantiles.index),
                               width)
    out.append("")

    out.append("Random effects:")
    out += _random_effects_lines(s.random_effects, s.random_effects_blocks, width)
    groups = "; ".join(f"{g}, {n}" for g, n in s.ngroups.items())
    out += _cat_fill([f"Number of obs: {s.nobs}, groups: ", groups] if groups
                     else [f"Number of obs: {s.nobs}"], " ", width)

    if len(s.fixed_effects):
        out.append("")
        out.append("Fixed effects:")
        fe = s.fixed_effects
        pv = fe.shape[1] == 4
        out += _coefmat_lines(fe, digits=_DIGITS, cs_ind=[0, 1], tst_ind=[2], zap_ind=[],
                              has_pvalue=pv, width=width)
        p = len(fe)
        if s.show_correlation and p > 1:
            out.append("")
            out.append("Correlation of Fixed Effects:")
            out += _correlation_lines(s.correlation, width)
        elif p > COR_MAX and not s.show_correlation:
            out.append("")
            out.append(f"Correlation matrix not shown by default, as p = {p} > {COR_MAX}.")
            out.append("Use summarize(fit, correlation=True) or fit.vcov if you need it")

    if s.neural_terms is not None and len(s.neural_terms):
        out.append("")
        out.append("Neural terms:")
        out += _neural_terms_lines(s.neural_terms, width)
    for note in s.notes:
        out += _strwrap(note, width, exdent=2)
    out += list(s.warnings)
    return "\n".join(out)


def _neural_terms_lines(nt: pd.DataFrame, width: int) -> list[str]:
    """The neural-terms table (the inputs are in each term's label), or one wrapped line
    per term when the table would pass ``width``."""
    terms = [str(v) for v in nt["Term"]]
    labelled = all(str(i) in t or not str(i) for t, i in zip(terms, nt["Inputs"]))
    if not labelled:
        terms = [f"{t} [{i}]" for t, i in zip(terms, nt["Inputs"])]
    arch = [str(v) for v in nt["Architecture"]]
    weights = [f"{int(v):,}" if k == 1 else f"{int(k)} x {int(v) // int(k):,}"
               for v, k in zip(nt["Weights"], nt["Networks"])]
    share = [c.strip() for c in r_format(list(nt["Share of var(eta)"]), 3)]
    rows = [list(r) for r in zip(terms, arch, weights, share)]
    lines = _matrix_lines(rows, [""] * len(rows), ["Term", "Architecture", "Weights",
                                                   "Var share"],
                          right=[False, False, True, True], width=width)
    if len(lines) == len(rows) + 1 and max(len(x) for x in lines) <= width:
        return lines
    out: list[str] = []
    for t, a, w, v in rows:
        out += _strwrap(f" {t}: {a}; {w} weights; var share {v}", width, exdent=4)
    return out


def _title_lines(title: str, tag: str, width: int) -> list[str]:
    """lme4's ``.prt.methTit``: one line ``title ['tag']`` or, when too long, wrapped."""
    if len(title) + 5 + len(tag) <= width:
        return [f"{title} ['{tag}']"]
    wrapped = _strwrap(title, width - 2, exdent=2)
    return _cat_fill(wrapped + [" [", tag, "]"], "", width)


def _strwrap(text: str, width: int, exdent: int = 0) -> list[str]:
    """R's ``strwrap``: greedy word wrap to lines shorter than ``width``."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        if not cur:
            cur = (" " * exdent if lines else "") + word
        elif len(cur) + 1 + len(word) < width:
            cur += " " + word
        else:
            lines.append(cur)
            cur = " " * exdent + word
    if cur:
        lines.append(cur)
    return lines


def _cat_fill(items: list[str], sep: str, width: int) -> list[str]:
    """R's ``cat(..., sep = sep, fill = TRUE)``: a new line before an item that would pass
    ``width``."""
    lines: list[str] = []
    cur = ""
    used = 0
    for i, item in enumerate(items):
        if i > 0:
            cur += sep
            if used + len(item) + len(sep) > width:
                lines.append(cur)
                cur, used = "", 0
        cur += item
        used += len(item) + len(sep)
    lines.append(cur)
    return lines


def _random_effects_lines(re_table: pd.DataFrame, blocks: tuple[int, ...], width: int
                          ) -> list[str]:
    """lme4's ``formatVC`` + ``print(quote = FALSE)``: left-justified character matrix."""
    n = len(re_table)
    if n == 0:
        return [" (none)"]
    variance = r_format(list(re_table["Variance"]), _DIGITS)
    stddev = r_format(list(re_table["Std.Dev."]), _DIGITS)
    corr_cols = [c for c in re_table.columns if str(c).startswith("Corr.")]
    rows: list[list[str]] = []
    start = 0
    for size in blocks:
        block = re_table.iloc[start:start + size]
        corr_cells = [[""] * len(corr_cols) for _ in range(size)]
        if corr_cols and size > 1:
            # format(round(x, 2), nsmall = 2) over the block's whole correlation matrix
            C = np.eye(size)
            for i in range(size):
                for j in range(i):
                    C[i, j] = C[j, i] = float(block.iloc[i][corr_cols[j]])
            dig = max(2, _DIGITS - 2)
            f = r_format([_r_round(v, dig) for v in C.ravel()], 7, nsmall=dig)
            for i in range(size):
                for j in range(i):
                    corr_cells[i][j] = f[i * size + j]
        for i in range(size):
            k = start + i
            rows.append([str(block.iloc[i]["Groups"]) if i == 0 else "",
                         str(block.iloc[i]["Name"]), variance[k], stddev[k]] + corr_cells[i])
        start += size
    colnames = ["Groups", "Name", "Variance", "Std.Dev."]
    if corr_cols:
        colnames += ["Corr"] + [""] * (len(corr_cols) - 1)
    return _matrix_lines(rows, [""] * n, colnames, right=False, width=width)


def _correlation_lines(corr: pd.DataFrame, width: int) -> list[str]:
    """lme4's correlation of fixed effects: lower triangle, abbreviated names."""
    names = [str(n) for n in corr.index]
    p = len(names)
    C = np.asarray(corr, dtype=float)
    f = r_format([_r_round(v, 3) for v in C.ravel()], 7, nsmall=3)
    rows = [[f[i * p + j] if j < i else "" for j in range(p - 1)] for i in range(1, p)]
    rn = _abbreviate(names, 11)[1:]
    cn = _abbreviate(names, 6)[:-1]
    return _matrix_lines(rows, rn, cn, right=False, width=width)


# ===================================================================================== anova
class AnovaTable(pd.DataFrame):
    """lme4's ``anova(m1, m2, ...)`` table: a DataFrame that prints as R prints it.

    The heading (``Data: ...``, ``Models:`` and one ``name: formula`` line per model) is kept
    in ``attrs["heading"]``. Operations on the table return plain DataFrames.
    """

    def __repr__(self) -> str:
        return format_anova(self)

    def __str__(self) -> str:
        return format_anova(self)


def _check_same_data(mods: list[Any]) -> None:
    """anova's models must share their data: the same number of observations, response and
    data set (as lme4 checks)."""
    nobs = [int(m.nobs) for m in mods]
    if len(set(nobs)) > 1:
        raise NGMMError("models were not all fitted to the same size of dataset "
                        f"(nobs: {', '.join(map(str, nobs))})")
    responses = [_response(str(m.formula)) for m in mods]
    known = [r for r in responses if r is not None]
    if len(set(known)) > 1:
        raise NGMMError("models have different responses ("
                        + " vs ".join(dict.fromkeys(known))
                        + "); anova compares models of one response fitted to the same data")
    data_names = [m.data_name for m in mods if getattr(m, "data_name", None)]
    if len(set(data_names)) > 1:
        raise NGMMError("all models must be fit to the same data object (data: "
                        + ", ".join(dict.fromkeys(data_names)) + ")")


def _model_names(fits: Sequence[Any], named_fits: dict[str, Any],
                 model_names: Sequence[str] | None, n_models: int) -> list[str]:
    """Row names of anova's table: ``model_names``, else each fit's name or formula (``m1``,
    ``m2``, ... when those clash or are too long), then the keywords of ``named_fits``."""
    if model_names is not None:
        names = [str(n) for n in model_names]
        if len(names) != n_models:
            raise NGMMError(f"model_names has {len(names)} names for {n_models} models")
    else:
        names = [str(m.name) if getattr(m, "name", None) else " ".join(str(m.formula).split())
                 for m in fits] + list(named_fits)
        # positional names when formulas clash (one formula, two families) or are too long
        # for the table to fit in WIDTH columns (the heading lists the formulas anyway)
        longest = max(len(n) for n in names[:len(fits)]) if fits else 0
        if len(set(names)) != len(names) or longest > _ANOVA_ROWNAME_MAX:
            names = [str(m.name) if getattr(m, "name", None) else f"m{i + 1}"
                     for i, m in enumerate(fits)] + list(named_fits)
    if len(set(names)) != len(names):
        # stacklevel 3: the warning points at the caller of anova, as before
        warnings.warn("duplicate model names; assigning generic names", stacklevel=3)
        names = [f"MODEL{i + 1}" for i in range(n_models)]
    return names


def anova(*fits: Any, model_names: Sequence[str] | None = None,
          refit: bool = True, **named_fits: Any) -> AnovaTable:
    r"""Likelihood-ratio tests of nested models, as lme4's ``anova(m1, m2, ...)``.

    ``anova(m0=fit0, m1=fit1)`` names the rows ``m0`` and ``m1`` (lme4 takes the names of
    the variables, which Python cannot see: keywords are the way to give them).

    Parameters
    ----------
    *fits : NGMMResult
        Two or more models fitted to the same data (same ``nobs``, response and data).
        Each needs ``npar, aic, bic, loglik, nobs, formula, data_name, name, reml`` and
        ``refit_ml()``.
    model_names : sequence of str, optional
        Row names of all the models, positional ones first.
    refit : bool
        Refit REML fits by maximum likelihood first (lme4's default), with the message
        ``refitting model(s) with ML (instead of REML)`` on stderr.
    **named_fits : NGMMResult
        Models named by their keyword (after the positional ones). A positional model is
        named by ``fit.name`` or else by its formula (what lme4 prints under "Models:");
        when those names clash, ``"m1", "m2", ...`` by position.

    Returns
    -------
    AnovaTable
        Rows sorted by ``npar`` (stable), columns ``npar, AIC, BIC, logLik, -2*log(L), Chisq,
        Df, Pr(>Chisq)``; ``Chisq`` and ``Df`` compare each row with the previous one:

        .. math::

            \chi^2_k = 2 \max(0, \ell_k - \ell_{k-1}), \quad
            \mathrm{Df}_k = p_k - p_{k-1}, \quad
            \Pr(>\chi^2) = P(\chi^2_{\mathrm{Df}_k} > \chi^2_k)

        (NaN when ``Df`` is 0).

    Raises
    ------
    NGMMError
        Fewer than two fits, or fits not on the same data.
    """
    if len(fits) == 1 and isinstance(fits[0], (list, tuple)):
        fits = tuple(fits[0])
    mods = list(fits) + list(named_fits.values())
    if len(mods) < 2:
        raise NGMMError(f"anova needs at least two fitted models to compare; got {len(mods)}")

    _check_same_data(mods)
    names = _model_names(fits, named_fits, model_names, len(mods))

    is_reml = [bool(getattr(m, "reml", False)) for m in mods]
    if refit:
        if any(is_reml):
            print(_REFIT_MESSAGE, file=sys.stderr)
            mods = [m.refit_ml() if r else m for m, r in zip(mods, is_reml)]
    elif any(is_reml) and not all(is_reml):
        warnings.warn("some models fit with REML = TRUE, some not", stacklevel=2)

    npar = np.array([float(m.npar) for m in mods])
    order = np.argsort(npar, kind="stable")
    mods = [mods[i] for i in order]
    names = [names[i] for i in order]
    npar = npar[order]
    llk = np.array([float(m.loglik) for m in mods])
    chisq = np.concatenate([[np.nan], 2.0 * np.maximum(0.0, np.diff(llk))])
    df = np.concatenate([[np.nan], np.diff(npar)])
    with np.errstate(invalid="ignore"):
        pval = np.where(df == 0, np.nan, stats.chi2.sf(chisq, np.where(df > 0, df, np.nan)))
    table = AnovaTable({
        "npar": npar.astype(int),
        "AIC": [float(m.aic) for m in mods],
        "BIC": [float(m.bic) for m in mods],
        "logLik": llk,
        "-2*log(L)": -2.0 * llk,
        "Chisq": chisq,
        "Df": df,
        "Pr(>Chisq)": pval,
    }, index=names)
    heading = []
    data_name = next((m.data_name for m in mods if getattr(m, "data_name", None)), None)
    if data_name:
        heading.append(f"Data: {data_name}")
    heading.append("Models:")
    heading += [str(m.formula) if n == " ".join(str(m.formula).split()) else f"{n}: {m.formula}"
                for n, m in zip(names, mods)]
    table.attrs["heading"] = heading
    return table


def _response(formula: str) -> str | None:
    """Left-hand side of a formula with white space removed (None without ``~``)."""
    if "~" not in formula:
        return None
    return re.sub(r"\s+", "", formula.split("~", 1)[0]) or None


def format_anova(table: pd.DataFrame, width: int = WIDTH) -> str:
    """R's ``print.anova`` of an lme4 ``anova()`` table (heading, table, significance codes)."""
    heading = list(table.attrs.get("heading", []))
    cols = [str(c) for c in table.columns]
    nc = len(cols)
    has_p = nc > 0 and re.match(r"^(P|Pr)\(", cols[-1]) is not None
    zap = list(range(nc - 1 if has_p else nc))
    tst = [i for i, c in enumerate(cols) if c[1:7] == " value" or c in ("F", "Cp", "Chisq")]
    zap = [i for i in zap if i not in tst and not cols[i].endswith("Df")]
    lines = _coefmat_lines(table, digits=5, cs_ind=[], tst_ind=tst, zap_ind=zap,
                           has_pvalue=has_p, na_print="", width=width)
    return "\n".join(heading + lines)


# ================================================================ R's printing, in Python
def _r_round(x: float, digits: float) -> float:
    """R's ``round(x, digits)``; non-integer ``digits`` are rounded as R does."""
    if not math.isfinite(x):
        return x
    d = int(math.floor(digits + 0.5))
    return float(round(x, d))


def _zapsmall(x: np.ndarray, digits: int) -> np.ndarray:
    """R's ``zapsmall``: round to ``digits - log10(max|x|)`` decimals (R 4.2's rule)."""
    x = np.asarray(x, dtype=float)
    fin = x[~np.isnan(x)]
    if fin.size == 0:
        return x
    mx = float(np.max(np.abs(fin)))
    d = max(0.0, digits - math.log10(mx)) if mx > 0 else float(digits)
    return np.array([_r_round(float(v), d) for v in x])


def _scientific(x: float, digits: int) -> tuple[int, int, int, bool]:
    """R's ``scientific()``: sign, exponent, significant digits (<= digits), rounding widens."""
    if x == 0.0:
        return 0, 0, 1, False
    neg = 1 if x < 0 else 0
    r = abs(x)
    mant, exp = f"{r:.{digits - 1}e}".split("e")
    kpower = int(exp)
    sig = mant.replace(".", "").rstrip("0")
    nsig = max(1, len(sig))
    rgt = min(max(digits - kpower, 0), 22)
    widens = 0 < kpower <= 22 and r < 10.0**kpower - 0.5 / 10.0**rgt
    return neg, kpower, nsig, widens


def r_format(values: Sequence[float], digits: int = 7, nsmall: int = 0,
              na: str = "NA") -> list[str]:
    """R's ``format(x, digits = digits, nsmall = nsmall)`` of a numeric vector.

    One notation and number of decimals for all elements (``formatReal``): fixed notation
    with enough decimals to show every element to ``digits`` significant digits, unless
    scientific notation is narrower; all strings right-justified to a common width.
    """
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    width = 0
    fixed = True
    rgt = 0
    d_sci = 0
    if finite:
        neg = 0
        rgt_max = mxsl = mxns = -(10**9)
        mxe, mne = -(10**9), 10**9
        for v in finite:
            neg_i, kp, nsig, widens = _scientific(v, digits)
            left = kp + 1 - (1 if widens else 0)
            sleft = neg_i + (1 if left <= 0 else left)
            rgt_max = max(rgt_max, nsig - left)
            mxsl = max(mxsl, sleft)
            mxns = max(mxns, nsig)
            mxe, mne = max(mxe, kp), min(mne, kp)
            neg = max(neg, neg_i)
        rgt = max(rgt_max, 0)
        w_fixed = mxsl + rgt + (1 if rgt else 0)
        e = 2 if (mxe >= 100 or mne <= -99) else 1
        d_sci = mxns - 1
        w_sci = neg + (1 if d_sci > 0 else 0) + d_sci + 4 + e
        fixed = w_fixed <= w_sci
        if fixed:
            rgt = max(rgt, nsmall)
            width = mxsl + rgt + (1 if rgt else 0)
        else:
            width = w_sci
    out: list[str] = []
    for v in vals:
        if math.isnan(v):
            s = na
        elif math.isinf(v):
            s = "Inf" if v > 0 else "-Inf"
        elif fixed:
            s = f"{v:.{rgt}f}"
        else:
            s = f"{v:.{d_sci}e}"
        out.append(s)
    width = max([width] + [len(s) for s in out])
    return [s.rjust(width) for s in out]


def _format_pval(pv: Sequence[float], digits: int,
                 eps: float = float(np.finfo(float).eps)) -> list[str]:
    """R's ``format.pval``."""
    pv = [float(v) for v in pv]
    out = [""] * len(pv)
    is0 = [v < eps for v in pv]
    idx = [i for i, z in enumerate(is0) if not z]
    rr: list[str] = []
    if idx:
        expo = [math.floor(math.log10(pv[i] if pv[i] > 0 else 1e-50)) for i in idx]
        fixp = [e >= -3 or (e == -4 and digits > 1) for e in expo]
        for flag in (True, False):
            sub = [i for i, f in zip(idx, fixp) if f == flag]
            if sub:
                for i, s in zip(sub, r_format([pv[i] for i in sub], digits)):
                    out[i] = s
        rr = [out[i] for i in idx]
    if any(is0):
        d = max(1, digits - 2)
        if idx:
            nc = max(len(s) for s in rr)
            if d > 1 and d + 6 > nc:
                d = max(1, nc - 7)
            sep = "" if (d == 1 and nc <= 6) else " "
        else:
            sep = "" if d == 1 else " "
        text = "<" + sep + r_format([eps], d)[0].strip()
        for i, z in enumerate(is0):
            if z:
                out[i] = text
    return out


def _stars(p: float) -> str:
    """``symnum`` with lme4's cut points; intervals closed on the right."""
    if math.isnan(p):
        return ""
    for cut, sym in ((0.001, "***"), (0.01, "**"), (0.05, "*"), (0.1, ".")):
        if p <= cut:
            return sym
    return " "


def _coefmat_lines(x: pd.DataFrame, *, digits: int, cs_ind: list[int], tst_ind: list[int],
                   zap_ind: list[int], has_pvalue: bool, na_print: str = "NA",
                   signif_stars: bool = True, width: int = WIDTH) -> list[str]:
    """R's ``printCoefmat`` (coefficients and standard errors share their decimals; test
    statistics rounded to ``digits - 1``; p-values by ``format.pval``; significance stars)."""
    xm = np.asarray(x, dtype=float).copy()
    n, nc = xm.shape
    dig_tst = max(1, min(5, digits - 1))
    cf = [["" for _ in range(nc)] for _ in range(n)]
    ina = np.isnan(xm)
    ok = ~ina
    for j in zap_ind:
        xm[:, j] = _zapsmall(xm[:, j], digits)
    if cs_ind:
        coef_se = xm[:, cs_ind]
        acs = np.abs(coef_se)
        fin = np.isfinite(acs)
        if fin.any():
            nz = acs[fin & (acs != 0)]
            digmin = 1 + math.floor(math.log10(float(nz.min()))) if nz.size else 1
            dd = max(1, digits - digmin)
            f = r_format([_r_round(float(v), dd) for v in coef_se.ravel()], digits)
            k = 0
            for i in range(n):
                for j in cs_ind:
                    cf[i][j] = f[k]
                    k += 1
    if tst_ind:
        f = r_format([_r_round(float(v), dig_tst) for v in xm[:, tst_ind].ravel()], digits)
        k = 0
        for i in range(n):
            for j in tst_ind:
                cf[i][j] = f[k]
                k += 1
    last = nc - 1 if has_pvalue else nc
    for j in range(nc):
        if j not in cs_ind and j not in tst_ind and j < last:
            f = r_format(list(xm[:, j]), digits)
            for i in range(n):
                cf[i][j] = f[i]
    ok[:, tst_ind] = False
    # values that are not 0 but print as 0 are reformatted with one digit less
    bad = [(i, j) for i in range(n) for j in range(last)
           if ok[i, j] and (xm[i, j] == 0) != (_as_float(cf[i][j]) == 0)]
    if bad:
        f = r_format([xm[i, j] for i, j in bad], max(1, digits - 1))
        for (i, j), s in zip(bad, f):
            cf[i][j] = s
    for i in range(n):
        for j in range(nc):
            if ina[i, j]:
                cf[i][j] = na_print
    colnames = [str(c) for c in x.columns]
    show_stars = False
    if has_pvalue:
        okp = [i for i in range(n) if ok[i, nc - 1]]
        if okp:
            pv = xm[:, nc - 1]
            for i, s in zip(okp, _format_pval([pv[i] for i in okp], dig_tst)):
                cf[i][nc - 1] = s
            show_stars = signif_stars and any(pv[i] < 0.1 for i in okp)
            if show_stars:
                st = [_stars(float(p)) for p in pv]
                w = max(len(s) for s in st)
                for i in range(n):
                    cf[i].append(st[i].ljust(w))
                colnames.append("")
    lines = _matrix_lines(cf, [str(r) for r in x.index], colnames, right=True, width=width)
    if show_stars:
        lines += ["---", "Signif. codes:  " + _SIGNIF_LEGEND]
    return lines


def _as_float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def _matrix_lines(rows: list[list[str]], rownames: list[str], colnames: list[str],
                  right: bool | Sequence[bool], width: int = WIDTH) -> list[str]:
    """R's ``print.default`` of a character matrix with ``quote = FALSE``.

    Row names left-justified; cells and column names right- or left-justified per column;
    one space between columns; columns that do not fit in ``width`` go to further blocks.
    """
    ncol = len(colnames)
    just = [right] * ncol if isinstance(right, bool) else list(right)
    rn_w = max((len(r) for r in rownames), default=0)
    col_w = [max([len(colnames[j])] + [len(r[j]) for r in rows]) for j in range(ncol)]
    lines: list[str] = []
    j0 = 0
    while j0 < ncol or (ncol == 0 and not lines):
        used = rn_w
        j1 = j0
        while j1 < ncol and (j1 == j0 or used + 1 + col_w[j1] <= width):
            used += 1 + col_w[j1]
            j1 += 1

        def cell(text: str, j: int) -> str:
            return text.rjust(col_w[j]) if just[j] else text.ljust(col_w[j])

        lines.append(" " * rn_w + "".join(" " + cell(colnames[j], j) for j in range(j0, j1)))
        for rname, r in zip(rownames, rows):
            lines.append(rname.ljust(rn_w) + "".join(" " + cell(r[j], j)
                                                       for j in range(j0, j1)))
        if ncol == 0:
            break
        j0 = j1
    return lines


def _named_vector_lines(cells: list[str], names: list[str], width: int = WIDTH) -> list[str]:
    """R's printing of a named vector: names over values, common width, right-justified."""
    w = max([len(c) for c in cells] + [len(n) for n in names])
    per_line = max(1, width // (w + 1))
    lines: list[str] = []
    for k in range(0, len(cells), per_line):
        lines.append("".join(n.rjust(w) + " " for n in names[k:k + per_line]))
        lines.append("".join(c.rjust(w) + " " for c in cells[k:k + per_line]))
    return lines


def _abbreviate_one(name: str, minlength: int) -> str:
    """R's C-level ``stripchars`` (``abbreviate(..., use.classes = TRUE)``)."""
    b = list(name.strip())
    if len(b) < minlength:
        return "".join(b)
    upper = len(b) - 1

    def at(i: int) -> str:
        return b[i] if 0 <= i < len(b) else "\0"

    def first_char(i: int) -> bool:
        return at(i - 1).isspace()

    def last_char(i: int) -> bool:
        return (not at(i - 1).isspace()) and (at(i + 1) == "\0" or at(i + 1).isspace())

    def vowel(i: int) -> bool:
        return at(i) in "aeiou"

    def lower(i: int) -> bool:
        return at(i).islower()

    nspace = sum(1 for c in b if c.isspace())

    def done() -> bool:
        return len(b) - nspace <= minlength

    def sweep(pred: Any) -> bool:
        for i in range(upper, 0, -1):
            if i < len(b) and pred(i):
                del b[i]
            if done():
                return True
        return False

    finished = done()
    if not finished:
        finished = sweep(lambda i: vowel(i) and last_char(i))
    if not finished:
        finished = sweep(lambda i: vowel(i) and not first_char(i))
    if not finished:
        finished = sweep(lambda i: lower(i) and last_char(i))
    if not finished:
        finished = sweep(lambda i: lower(i) and not first_char(i))
    if not finished:
        upper = len(b) - 1
        sweep(lambda i: not first_char(i) and not at(i).isspace())
    text = "".join(b)
    if len(text) > minlength:
        text = text.replace(" ", "")
    return text


def _abbreviate(names: list[str], minlength: int) -> list[str]:
    """R's ``abbreviate(names, minlength)``: lower-case vowels, then lower-case letters, are
    dropped from the right until ``minlength`` characters remain; clashing abbreviations are
    redone with a larger ``minlength``."""
    uniq = list(dict.fromkeys(n.strip() for n in names))
    abbr = {n: _abbreviate_one(n, minlength) for n in uniq}
    ml = minlength
    while True:
        values = list(abbr.values())
        dup = {v for v in values if values.count(v) > 1}
        if not dup or ml > max(len(n) for n in uniq):
            break
        ml += 1
        for n in uniq:
            if abbr[n] in dup:
                abbr[n] = _abbreviate_one(n, ml)
    return [abbr[n.strip()] for n in names]
