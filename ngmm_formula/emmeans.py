r"""Estimated marginal means and their pairwise contrasts, as R's ``emmeans`` computes them.

**Reference grid.** Every factor of the fixed part (and of the ``nn()`` inputs) at each of its
training levels, every numeric variable at its training mean (or at the values given in
``at``), all combinations. A transformed covariate is evaluated at the mean of the variable
(``I(age**2)`` at ``mean(age)**2``), as emmeans does. The grid's fixed-effect rows
:math:`x_r` give the link-scale predictions :math:`\hat\eta_r = x_r^\top\hat\beta + \sum_k
f_k(x_r)` (random effects at zero).

**Marginal means.** For each combination of the ``specs`` (and ``by``) variables, the
equally weighted mean over the other factors' levels:

.. math::

    \hat m = \frac1{|R|}\sum_{r\in R}\hat\eta_r = \ell^\top\hat\beta + \bar f, \qquad
    \ell = \frac1{|R|}\sum_{r\in R} x_r, \qquad
    \operatorname{se}(\hat m) = \sqrt{\ell^\top \widehat V(\hat\beta)\,\ell} ,

with :math:`\widehat V` = ``fit.vcov``. For a neural term :math:`\bar f` is the average over the
grid rows of the network's prediction, and the network is held fixed (its weights add no
variance), as for ``fit.vcov`` and :meth:`~ngmm_formula.NGMMResult.predict_se`.

**Degrees of freedom.** Asymptotic (:math:`z`, ``df = inf``) for every family, emmeans'
convention for lme4's GLMMs (for ``lmer`` fits emmeans would use Kenward--Roger df;
``lmer.df = "asymptotic"`` gives these numbers). Intervals are
:math:`\hat m \pm z_{1-\alpha/2}\operatorname{se}`.

**Response scale.** ``type="response"`` reports :math:`g^{-1}(\hat m)` with the delta-method
standard error :math:`|d\mu/d\eta|\operatorname{se}` and the back-transformed link interval
(emmeans' ``regrid``-free ``type = "response"``); the column is named ``prob`` (binomial),
``rate`` (Poisson, negative binomial log link) or ``response``.

**Contrasts.** :meth:`EMMeans.pairs` gives every difference :math:`\hat m_i - \hat m_j`,
:math:`i<j` in level order (within each ``by`` group), on the link scale, with standard error
:math:`\sqrt{c^\top L \widehat V L^\top c}` and :math:`z = \text{estimate}/\text{se}`; p values
are adjusted by Tukey's method (the studentized range of :math:`k` means with
:math:`\infty` df: :math:`p = P(Q_{k,\infty} > \sqrt2 |z|)`), Holm's or not at all.

Checked against emmeans 1.8.4 in ``tests/test_emmeans.py``
(``tests/reference/make_toolkit_refs.R``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ngmm_formula.design import matrix_column, reapply_spec
from ngmm_formula.errors import NGMMError

if TYPE_CHECKING:
    from ngmm_formula.families import Family
    from ngmm_formula.results import NGMMResult

__all__ = ["EMMeans", "emmeans"]


def _as_list(x: str | list[str] | tuple[str, ...] | None, name: str) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        x = x.replace("~", " ").replace("|", " ").replace("+", " ").split()
        return list(x)
    if isinstance(x, (list, tuple)) and all(isinstance(v, str) for v in x):
        return list(x)
    raise NGMMError(f"{name} must be a variable name or a list of names, got {x!r}")


def _variables(fit: NGMMResult) -> dict[str, tuple[str, Any]]:
    """Data variables of the fixed part and nn() inputs: name -> ("factor", levels) or
    ("numeric", training mean or None when it cannot be read off the design)."""
    spec = fit.design.spec
    fs = spec.fixed_spec
    out: dict[str, tuple[str, Any]] = {}
    state = fs.encoder_state
    columns = list(spec.fixed_columns)
    kept = [columns[j] for j in spec.kept_columns] if len(spec.kept_columns) else columns
    X = fit.design.X
    for var in sorted(fs.variables_by_source.get("data", set())):
        kind, st = state.get(var, (None, {}))
        kind = getattr(kind, "value", kind)
        if kind == "categorical" and isinstance(st, dict):
            out[var] = ("factor", [str(c) if not isinstance(c, str) else c
                                   for c in st.get("categories", [])])
        else:
            mean = float(matrix_column(X, kept.index(var)).mean()) if var in kept else None
            out[var] = ("numeric", mean)
    for ni in fit.design.nets:
        for e in ni.encodings:
            if e.kind == "categorical":
                out.setdefault(e.variable, ("factor", list(e.levels)))
            else:
                out.setdefault(e.variable, ("numeric", float(e.center)))
    return out


def _grid_frame(fit: NGMMResult, variables: dict[str, tuple[str, Any]],
                at: dict[str, Any], data: pd.DataFrame | None) -> pd.DataFrame:
    axes: dict[str, list[Any]] = {}
    for var, (kind, info) in variables.items():
        if var in at:
            vals = at[var]
            axes[var] = list(vals) if isinstance(vals, (list, tuple, np.ndarray, pd.Index)) \
                else [vals]
        elif kind == "factor":
            axes[var] = list(info)
        elif data is not None and var in data.columns:
            axes[var] = [float(pd.to_numeric(data[var]).mean())]
        elif info is not None:
            axes[var] = [info]
        else:
            raise NGMMError(f"the mean of the numeric variable '{var}' cannot be read off the "
                            "fitted design (it enters only through a transformation): pass "
                            f"the training data as data= or its value as at={{'{var}': ...}}")
    names = list(axes)
    rows = list(itertools.product(*(axes[v] for v in names)))
    frame = pd.DataFrame(rows, columns=names)
    for var, (kind, info) in variables.items():
        if kind == "factor" and var not in at:
            frame[var] = pd.Categorical(frame[var], categories=info)
    return frame


def _level_text(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _contrast_labels(rows: pd.DataFrame, specs: tuple[str, ...]) -> list[str]:
    """emmeans' level labels: a variable whose levels all look like numbers is prefixed with
    its name (``period1``); a label with an operator character is parenthesised (``(3+)``)."""
    parts = []
    for s in specs:
        texts = [_level_text(v) for v in rows[s]]
        if all(_is_number(t) for t in texts):
            texts = [f"{s}{t}" for t in texts]
        parts.append(texts)
    labels = [" ".join(p) for p in zip(*parts)]
    return [f"({lab})" if any(ch in lab for ch in "+-*/ ") else lab for lab in labels]


@dataclass(frozen=True)
class EMMeans:
    """Estimated marginal means of a fit (see the module docstring).

    Attributes
    ----------
    table : DataFrame
        One row per combination of ``specs`` and ``by``: the variables, then ``emmean`` (or
        ``prob``/``rate``/``response``), ``SE``, ``df`` (inf), ``asymp.LCL``, ``asymp.UCL``.
    L : ndarray, shape (rows, p)
        The averaged fixed-effect rows :math:`\\ell` of the means.
    """

    table: pd.DataFrame
    L: np.ndarray = field(repr=False)
    offset: np.ndarray = field(repr=False)
    vcov: np.ndarray = field(repr=False)
    specs: tuple[str, ...]
    by: tuple[str, ...]
    level: float

    def pairs(self, adjust: Literal["tukey", "holm", "none"] = "tukey") -> pd.DataFrame:
        """All pairwise differences of the means on the link scale, within each ``by`` group.

        Returns a DataFrame with ``contrast`` ("a - b"), the ``by`` variables, ``estimate``,
        ``SE``, ``df`` (inf), ``z.ratio`` and ``p.value`` adjusted by ``adjust``.
        """
        if adjust not in ("tukey", "holm", "none"):
            raise NGMMError(f"adjust must be 'tukey', 'holm' or 'none', got {adjust!r}")
        tab = self.table
        groups = (tab.groupby(list(self.by), sort=False, observed=True).indices
                  if self.by else {(): np.arange(len(tab))})
        out = []
        for key, idx in groups.items():
            idx = np.sort(np.asarray(idx))
            k = len(idx)
            labels = _contrast_labels(tab.iloc[idx], self.specs)
            rows = []
            for a, b in itertools.combinations(range(k), 2):
                c = self.L[idx[a]] - self.L[idx[b]]
                est = float(c @ self._beta + self.offset[idx[a]] - self.offset[idx[b]])
                se = float(np.sqrt(c @ self.vcov @ c))
                rows.append((f"{labels[a]} - {labels[b]}", est, se))
            if not rows:
                continue
            est_v = np.array([r[1] for r in rows])
            se_v = np.array([r[2] for r in rows])
            z = est_v / se_v
            p_raw: np.ndarray = 2.0 * stats.norm.sf(np.abs(z))
            p: np.ndarray
            if adjust == "tukey":
                p = np.asarray(stats.studentized_range.sf(np.sqrt(2.0) * np.abs(z), k, np.inf))
            elif adjust == "holm":
                order = np.argsort(p_raw)
                m = len(p_raw)
                adj = np.maximum.accumulate((m - np.arange(m)) * p_raw[order])
                p = np.empty(m)
                p[order] = np.minimum(adj, 1.0)
            else:
                p = p_raw
            key_t = key if isinstance(key, tuple) else (key,)
            for (lab, e, s), zz, pp in zip(rows, z, p):
                rec: dict[str, Any] = {"contrast": lab}
                rec.update(dict(zip(self.by, key_t)))
                rec.update({"estimate": e, "SE": s, "df": np.inf, "z.ratio": zz,
                            "p.value": float(pp)})
                out.append(rec)
        return pd.DataFrame(out)

    @property
    def _beta(self) -> np.ndarray:
        return np.asarray(self.table.attrs["beta"])

    def __repr__(self) -> str:
        return self.table.to_string(index=False)


def emmeans(fit: NGMMResult, specs: str | list[str], by: str | list[str] | None = None, *,
            type: Literal["link", "response"] = "link", at: dict[str, Any] | None = None,
            level: float = 0.95, data: pd.DataFrame | None = None) -> EMMeans:
    r"""Estimated marginal means (R's ``emmeans(fit, specs, by = by, type = type)``).

    Parameters
    ----------
    fit : NGMMResult
    specs : str or list of str
        The variable(s) whose levels the means are for (``"period"``, ``"~ livch"``,
        ``["livch", "urban"]``).
    by : str or list of str, optional
        Variables to condition on: separate means (and contrasts) per level.
    type : {"link", "response"}
        Scale of the reported means (see the module docstring).
    at : dict, optional
        Values of variables in the reference grid, e.g. ``{"Days": [0, 3, 6, 9]}`` (numeric
        variables are otherwise held at their mean).
    level : float
        Confidence level of the intervals.
    data : DataFrame, optional
        The training data: needed only for the mean of a numeric variable that enters the
        formula only through a transformation (``log(x)``).

    Returns
    -------
    EMMeans
        ``.table`` and ``.pairs(adjust=)``.
    """
    if type not in ("link", "response"):
        raise NGMMError(f"type must be 'link' or 'response', got {type!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise NGMMError(f"level must be a number strictly between 0 and 1, got {level!r}")
    specs_l = _as_list(specs, "specs")
    by_l = _as_list(by, "by")
    if not specs_l:
        raise NGMMError("specs must name at least one variable")
    at = dict(at or {})
    if not isinstance(at, dict):
        raise NGMMError(f"at must be a dict of variable -> values, got {at!r}")
    variables = _variables(fit)
    for v in [*specs_l, *by_l, *at]:
        if v not in variables:
            raise NGMMError(f"'{v}' is not a variable of the fixed part or of an nn() term "
                            f"(variables: {sorted(variables)})")
    grid = _grid_frame(fit, variables, at, data)
    X, f = _grid_predictors(fit, grid)
    beta = fit.fixef.to_numpy()
    V = fit.vcov.to_numpy()
    recs, L, off = _marginal_rows(grid, specs_l, by_l, variables, at, X, f)
    est = L @ beta + off
    se = np.sqrt(np.einsum("ij,jk,ik->i", L, V, L))
    zq = float(stats.norm.ppf(0.5 + level / 2.0))
    lo, hi = est - zq * se, est + zq * se
    table = pd.DataFrame(recs)
    name = "emmean"
    if type == "response":
        name, est, se, lo, hi = _response_scale(fit.family, est, se, lo, hi)
    table[name] = est
    table["SE"] = se
    table["df"] = np.inf
    table["asymp.LCL"] = lo
    table["asymp.UCL"] = hi
    table.attrs["beta"] = beta
    return EMMeans(table=table, L=L, offset=off, vcov=V, specs=tuple(specs_l),
                   by=tuple(by_l), level=float(level))


def _grid_predictors(fit: NGMMResult, grid: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    r"""The reference grid's fixed-effect rows :math:`x_r` and the sum of the networks'
    outputs :math:`\sum_k f_k(x_r)` (zeros without ``nn()`` terms).

    Parameters
    ----------
    fit : NGMMResult
    grid : DataFrame
        From :func:`_grid_frame`.
    """
    spec = fit.design.spec
    context = getattr(spec, "context", None)
    X = reapply_spec(spec.fixed_spec, grid, context)[:, list(spec.kept_columns)]
    f = np.zeros(len(grid))
    if fit.nets:
        net_X = tuple(np.hstack([e.encode(grid[e.variable]) for e in encs])
                      for encs in spec.net_encodings)
        f = np.sum(fit._net_outputs(net_X), axis=0)
    return X, f


def _marginal_rows(grid: pd.DataFrame, specs: list[str], by: list[str],
                   variables: dict[str, tuple[str, Any]], at: dict[str, Any], X: np.ndarray,
                   f: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    r"""Average the grid rows of each combination of the ``specs`` and ``by`` levels: the
    rows :math:`\ell` of :math:`L` and the networks' means :math:`\bar f`, in emmeans' order
    (``specs`` varying fastest within each ``by`` combination).

    Parameters
    ----------
    grid : DataFrame
    specs, by : list of str
    variables : dict
        From :func:`_variables`.
    at : dict
    X, f : ndarray
        From :func:`_grid_predictors`.

    Returns
    -------
    records : list of dict
        The levels of each mean.
    L : ndarray, shape (n_means, n_fixed)
    offset : ndarray, shape (n_means,)
    """
    keys = [*specs, *by]
    key_df = grid[keys].astype(object)
    grouped = key_df.groupby(keys, sort=False).indices
    # order: by levels outermost? emmeans orders rows with specs varying fastest within by
    order_levels = []
    for v in keys:
        kind, info = variables[v]
        order_levels.append(list(at[v]) if v in at and isinstance(at[v], (list, tuple,
                            np.ndarray)) else (info if kind == "factor" else [None]))
    recs, Ls, offs = [], [], []
    by_combos = list(itertools.product(*order_levels[len(specs):])) if by else [()]
    spec_combos = list(itertools.product(*order_levels[:len(specs)]))
    for bc in by_combos:
        for sc in spec_combos:
            key = tuple(sc) + tuple(bc)
            idx = None
            for gk, gi in grouped.items():
                gk_t = gk if isinstance(gk, tuple) else (gk,)
                if all(g == k or k is None or str(g) == str(k) for g, k in zip(gk_t, key)):
                    idx = gi
                    break
            if idx is None:
                continue
            ell = X[idx].mean(axis=0)
            fbar = float(f[idx].mean())
            gk_row = key_df.iloc[idx[0]]
            recs.append({v: gk_row[v] for v in keys})
            Ls.append(ell)
            offs.append(fbar)
    return recs, np.vstack(Ls), np.asarray(offs)


def _response_scale(family: Family, est: np.ndarray, se: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, np.ndarray,
                                             np.ndarray]:
    r"""The means on the response scale: :math:`g^{-1}(\hat m)`, the delta-method standard
    error :math:`|d\mu/d\eta|\operatorname{se}` and the back-transformed interval, with the
    column's name (``prob``, ``rate``, ``response``; ``emmean`` for the identity link).

    Parameters
    ----------
    family : Family
    est, se, lo, hi : ndarray
        The link-scale means, standard errors and interval limits.
    """
    with torch.no_grad():
        mu = family.mean(torch.as_tensor(est)).numpy()
        dmu = family.link.mu_eta(torch.as_tensor(est)).numpy()
        a, b = family.mean(torch.as_tensor(lo)).numpy(), family.mean(torch.as_tensor(hi)).numpy()
    name = {"binomial": "prob", "poisson": "rate"}.get(family.name, "response")
    if family.name == "negative_binomial" and family.link.name == "log":
        name = "rate"
    if family.link.name == "identity":
        name = "emmean"
    return name, mu, np.abs(dmu) * se, np.minimum(a, b), np.maximum(a, b)
