r"""Diagnostic plots of a fit; each function returns a :class:`matplotlib.figure.Figure`.

The figures are built with matplotlib's object-oriented API (``Figure`` directly, never
``pyplot``): nothing is shown, no backend is selected or changed and no global figure
state is touched, so the functions work headless (``fig.savefig("x.png")`` renders with Agg)
and in notebooks (the returned figure displays itself) alike.

* :func:`caterpillar` -- conditional modes with :math:`\pm 1.96` conditional SDs, as
  lattice's ``dotplot(ranef(fit, condVar = TRUE))``;
* :func:`residuals_vs_fitted` -- Pearson residuals against fitted values, as lme4's
  ``plot(fit)``, with a lowess smooth;
* :func:`training_curve` -- training and validation objective per epoch of a neural fit;
* :func:`partial_dependence` -- an ``nn()`` term's partial dependence with a rug of the data.

matplotlib is an optional dependency (``pip install ngmm_formula[plot]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ngmm_formula.errors import NGMMError
from ngmm_formula.results import NGMMResult

__all__ = ["caterpillar", "partial_dependence", "residuals_vs_fitted", "training_curve"]

_Z95 = 1.959963984540054


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise NGMMError("plots need matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), layout="constrained")


def _axes(ax: Any, width: float, height: float) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig = _figure(width, height)
    return fig, fig.add_subplot()


def caterpillar(fit: NGMMResult, group: str | None = None, *, level: float = 0.95,
                max_labels: int = 60) -> Any:
    """Caterpillar plot of the conditional modes, one panel per random-effect column.

    As lattice's ``dotplot(ranef(fit, condVar = TRUE))``: for each level the conditional mode
    :math:`\\hat b` with the interval :math:`\\hat b \\pm z \\sqrt{\\operatorname{postVar}}`
    (``z = 1.96`` at ``level=0.95``), levels sorted by the mode of the first column (the
    same order in every panel of a grouping factor).

    Parameters
    ----------
    fit : NGMMResult
    group : str or None
        One grouping factor (``"Subject"``); None draws every factor, one row of panels each.
    level : float
        Coverage of the intervals under the normal approximation.
    max_labels : int
        Level names are written on the axis when there are at most this many.

    Returns
    -------
    matplotlib.figure.Figure
        With one axes per (grouping factor, column).
    """
    from scipy.stats import norm

    groups = list(fit.ranef) if group is None else [group]
    for g in groups:
        if g not in fit.ranef:
            raise NGMMError(f"group must be one of {list(fit.ranef)}, got {g!r}")
    z = float(norm.ppf(1 - (1 - level) / 2)) if level != 0.95 else _Z95
    ncol = max(fit.ranef[g].shape[1] for g in groups)
    heights = [min(10.0, max(1.8, 0.16 * min(fit.ranef[g].shape[0], max_labels) + 1.0))
               for g in groups]
    fig = _figure(max(4.5, 3.2 * ncol), sum(heights))
    grid = fig.add_gridspec(len(groups), ncol, height_ratios=heights)
    for r, g in enumerate(groups):
        re = fit.ranef[g]
        P = re.attrs.get("postVar")
        if P is None and any(t.group == g and t.rank is not None for t in fit.design.re_terms):
            raise NGMMError(f"'{g}' has a reduced-rank term too large for per-level "
                            "conditional variances of every column (assemble."
                            "POSTVAR_MAX_ENTRIES): plot its factor scores (fit.scores()) "
                            "instead")
        order = np.argsort(re.iloc[:, 0].to_numpy(), kind="stable")
        pos = np.arange(len(order))
        first = None
        for c, col in enumerate(re.columns):
            ax = fig.add_subplot(grid[r, c], sharey=first)
            first = first or ax
            mode = re[col].to_numpy()[order]
            sd = (np.sqrt(np.clip(P[c, c, :], 0.0, None))[order] if P is not None
                  else np.zeros_like(mode))
            ax.errorbar(mode, pos, xerr=z * sd, fmt="o", ms=3, color="C0", ecolor="0.5",
                        elinewidth=1, capsize=0)
            ax.axvline(0.0, color="0.3", lw=0.8, ls=":")
            ax.set_title(col, fontsize=9)
            ax.set_xlabel("conditional mode")
            if c == 0:
                ax.set_ylabel(g)
                if len(order) <= max_labels:
                    ax.set_yticks(pos, [str(v) for v in re.index[order]], fontsize=7)
                else:
                    ax.set_yticks([])
            else:
                ax.tick_params(labelleft=False)
    return fig


def residuals_vs_fitted(fit: NGMMResult, type: str = "pearson", *, smooth: bool = True,
                        ax: Any = None) -> Any:
    """Residuals against fitted values (lme4's ``plot(fit)``), with a lowess smooth.

    Parameters
    ----------
    fit : NGMMResult
    type : {"pearson", "deviance", "response", "working"}
        Residual type (:meth:`NGMMResult.residuals`).
    smooth : bool
        Add a lowess curve (statsmodels; ``frac = 2/3``, as R's ``lowess``).
    ax : matplotlib Axes, optional
        Draw into this axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fitted = np.asarray(fit.fitted, dtype=float)
    resid = np.asarray(fit.residuals(type), dtype=float)  # type: ignore[arg-type,type-var]
    fig, ax = _axes(ax, 5.0, 3.8)
    ax.scatter(fitted, resid, s=8, alpha=0.6, color="C0", linewidths=0)
    ax.axhline(0.0, color="0.3", lw=0.8, ls=":")
    if smooth and fitted.size >= 10:
        from statsmodels.nonparametric.smoothers_lowess import lowess

        sm = lowess(resid, fitted, frac=2 / 3, it=3)
        ax.plot(sm[:, 0], sm[:, 1], color="C3", lw=1.5, label="lowess")
    ax.set_xlabel("fitted values")
    ax.set_ylabel(f"{type} residuals")
    ax.set_title(fit.formula, fontsize=9)
    return fig


def training_curve(fit: NGMMResult, *, ax: Any = None) -> Any:
    """Training and validation objective per epoch of a neural fit, best epoch marked.

    The objective is the approximate marginal log-likelihood per observation (higher is
    better) on the training groups and on the held-out (validation) groups; the networks
    are restored to the best validation epoch.

    Raises
    ------
    NGMMError
        For fits without ``nn()`` terms (they are fitted by L-BFGS, without epochs).
    """
    h = fit.history
    if h is None:
        raise NGMMError("training_curve needs a fit with nn() terms; a linear model is fitted "
                        "by L-BFGS and has no training history")
    fig, ax = _axes(ax, 5.0, 3.5)
    epochs = np.arange(1, len(h.train) + 1)
    ax.plot(epochs, h.train, "-", color="C0", label="training")
    best_curve = h.train
    if len(h.validation):
        ax.plot(np.arange(1, len(h.validation) + 1), h.validation, "-", color="C1",
                label=f"validation ({h.n_validation_groups} groups)")
        best_curve = h.validation
    b = int(h.best_epoch)
    if 1 <= b <= len(best_curve):
        ax.axvline(b, color="0.4", lw=0.8, ls="--")
        ax.plot([b], [best_curve[b - 1]], "o", color="C3", label=f"best epoch ({b})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("log-likelihood per observation")
    title = "training curve" + (" (stopped early)" if h.stopped_early else "")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def partial_dependence(fit: NGMMResult, term: int | str = 0, var: str | None = None, *,
                       grid: int | np.ndarray = 50, ax: Any = None) -> Any:
    """An ``nn()`` term's partial dependence on one input, with a rug of the data.

    The curve is :meth:`NGMMResult.partial_dependence` (the network's output averaged over
    the training data with ``var`` set to each grid value, link scale); a numeric input gets
    a rug of its training values, a factor input one point per level.

    Parameters
    ----------
    fit : NGMMResult
    term : int or str
        Index or label of the ``nn()`` term.
    var : str, optional
        Input variable (default: the term's first).
    grid : int or array
        As :meth:`NGMMResult.partial_dependence`.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    pdp = fit.partial_dependence(term, var, grid)
    var = str(pdp.columns[0])
    labels = [ni.term.label for ni in fit.design.nets]
    k = labels.index(term) if isinstance(term, str) else int(term)
    ni = fit.design.nets[k]
    fig, ax = _axes(ax, 5.0, 3.5)
    pos = ni.term.variables.index(var)
    enc = ni.encodings[pos]
    if enc.kind == "numeric":
        ax.plot(pdp[var].to_numpy(dtype=float), pdp["effect"].to_numpy(), "-", color="C0")
        start = sum(len(e.columns) for e in ni.encodings[:pos])
        raw = ni.X[:, start] * enc.scale + enc.center
        ax.plot(raw, np.zeros_like(raw), "|", color="k", alpha=0.25, ms=10,
                transform=ax.get_xaxis_transform(), label="data")
    else:
        x = np.arange(len(pdp))
        ax.plot(x, pdp["effect"].to_numpy(), "o-", color="C0")
        ax.set_xticks(x, [str(v) for v in pdp[var]])
    ax.set_xlabel(var)
    ax.set_ylabel("partial effect (link scale)")
    ax.set_title(labels[k], fontsize=9)
    return fig
