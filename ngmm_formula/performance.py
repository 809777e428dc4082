r"""Nakagawa's R² and the intraclass correlation, as R's ``performance`` package computes them.

The variance of the latent (link-scale) response is split into

.. math::

    \sigma^2_f = \widehat{\operatorname{Var}}_i\bigl(x_i^\top\hat\beta
                 + \textstyle\sum_k f_k(x_i)\bigr),
    \qquad
    \sigma^2_r = \sum_{\text{terms } t} \frac1n \sum_i z_{ti}^\top \Sigma_t z_{ti},
    \qquad
    \sigma^2_\varepsilon = \sigma^2_d + \sigma^2_e ,

the fixed part (sample variance, denominator :math:`n-1`, of the linear predictor without
random effects and offset; for a neural fit the ``nn()`` terms' outputs are part of it), the
random part (Johnson's 2014 extension to random slopes: the mean over the rows of the
variance that the term's covariance :math:`\Sigma_t = \Lambda_t\Lambda_t^\top` gives the row;
observation-level terms, with one level per row, are excluded and counted as the dispersion
:math:`\sigma^2_e` instead), and the distribution-specific variance :math:`\sigma^2_d`:

=====================  ===========================================================
family / link          :math:`\sigma^2_d`
=====================  ===========================================================
gaussian               :math:`\sigma^2`
binomial logit         :math:`\pi^2/3`
binomial probit        1
binomial cloglog       :math:`\pi^2/6`
poisson log            :math:`\log(1 + 1/\mu)`
negative binomial log  :math:`\log(1 + 1/\mu + 1/k)` (NB2 size :math:`k`)
gamma                  :math:`\sigma^2` (the coefficient of variation squared)
=====================  ===========================================================

where, for counts, :math:`\mu = \exp(\hat\beta_0^{\text{null}})` is the intercept of the *null
model* (the same random effects, intercept only), as ``insight::get_variance`` 0.19 does; it
must therefore be fitted, which needs the data (``data=``) or a fitted ``null_fit``. Then

.. math::

    R^2_m = \frac{\sigma^2_f}{\sigma^2_f + \sigma^2_r + \sigma^2_\varepsilon}, \quad
    R^2_c = \frac{\sigma^2_f + \sigma^2_r}{\sigma^2_f + \sigma^2_r + \sigma^2_\varepsilon},
    \quad
    \mathrm{ICC}_{adj} = \frac{\sigma^2_r}{\sigma^2_r + \sigma^2_\varepsilon}, \quad
    \mathrm{ICC}_{cond} = \frac{\sigma^2_r}{\sigma^2_f + \sigma^2_r + \sigma^2_\varepsilon}.

References: Nakagawa & Schielzeth (2013), Johnson (2014), Nakagawa, Johnson & Schielzeth
(2017); ``performance::r2_nakagawa`` and ``icc`` 0.10.2 with ``insight`` 0.19.0, against
which ``tests/test_performance.py`` checks these numbers
(``tests/reference/make_toolkit_refs.R``). Unlike ``performance``, a random-slope column is
taken from the term's own model matrix even when it is not a fixed-effect column
(``performance`` then drops it and warns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ngmm_formula.design import re_quadratic
from ngmm_formula.errors import NGMMError

if TYPE_CHECKING:
    from ngmm_formula.results import NGMMResult

__all__ = ["VarianceComponents", "icc", "r2_nakagawa", "variance_components"]

_BINOMIAL_LINK = {"logit": math.pi ** 2 / 3.0, "probit": 1.0, "cloglog": math.pi ** 2 / 6.0}


@dataclass(frozen=True)
class VarianceComponents:
    """The link-scale variance decomposition behind :func:`r2_nakagawa` and :func:`icc`.

    Attributes
    ----------
    fixed, random, distribution, dispersion : float
        :math:`\\sigma^2_f, \\sigma^2_r, \\sigma^2_d, \\sigma^2_e` (module docstring).
    nn : dict
        For each ``nn()`` term, the variance of its output on the training data
        (part of ``fixed``).
    null_mu : float or None
        :math:`\\exp` of the null model's intercept (counts only).
    """

    fixed: float
    random: float
    distribution: float
    dispersion: float
    nn: dict[str, float]
    null_mu: float | None = None

    @property
    def residual(self) -> float:
        return self.distribution + self.dispersion

    @property
    def total(self) -> float:
        return self.fixed + self.random + self.residual

    def nn_share(self) -> dict[str, float]:
        """Each ``nn()`` term's output variance as a share of the total latent variance."""
        return {k: v / self.total for k, v in self.nn.items()}


def _null_formula(fit: NGMMResult) -> str:
    p = fit.design.formula
    lhs = fit.formula.split("~", 1)[0].strip()
    parts = ["1", *(str(b) for b in p.bars), *(f"offset({o})" for o in p.offsets)]
    return f"{lhs} ~ {' + '.join(parts)}"


def _null_mu(fit: NGMMResult, data: pd.DataFrame | None, null_fit: NGMMResult | None
             ) -> float:
    if null_fit is None:
        if data is None:
            raise NGMMError(
                f"the distribution-specific variance of the {fit.family.name} family needs "
                "the null model's intercept (as performance::r2_nakagawa): pass the training "
                f"data as data= (the null model '{_null_formula(fit)}' is then fitted) or "
                "a fitted null model as null_fit=")
        from ngmm_formula.api import ngmm  # entry layer, imported only when called

        a = fit.approximation  # the fit's integral rule, as performance refits with it
        kw: dict[str, object] = {"approx": a.kind}
        if a.kind == "agq":
            kw["nagq"] = a.nagq
        elif a.kind == "truncated":
            kw.update(truncation=a.truncation, points=a.points)
        elif a.kind == "exact":
            kw = {}
        null_fit = ngmm(_null_formula(fit), data, fit.family, **kw)  # type: ignore[arg-type]
    if "(Intercept)" not in null_fit.fixef.index:
        raise NGMMError("null_fit has no (Intercept) coefficient")
    return float(math.exp(float(null_fit.fixef["(Intercept)"])))


def variance_components(fit: NGMMResult, *, data: pd.DataFrame | None = None,
                        null_fit: NGMMResult | None = None) -> VarianceComponents:
    """The variance decomposition of the module docstring.

    Parameters
    ----------
    fit : NGMMResult
    data : DataFrame, optional
        The training data; needed (or ``null_fit``) for the Poisson and negative binomial
        families, whose distribution-specific variance uses the null model's intercept.
    null_fit : NGMMResult, optional
        The null model ``y ~ 1 + <the same random effects>`` already fitted.
    """
    design = fit.design
    n = len(design.y)
    fixed_lp = design.X @ fit.fixef.to_numpy()
    nn: dict[str, float] = {}
    if fit.nets:
        outs = fit._net_outputs(tuple(ni.X for ni in design.nets))
        for ni, f in zip(design.nets, outs):
            nn[ni.term.label] = float(np.var(f, ddof=1))
            fixed_lp = fixed_lp + f
    var_f = float(np.var(fixed_lp, ddof=1)) if n > 1 else 0.0
    random = dispersion = 0.0
    for t, L in zip(design.re_terms, fit._lambda_abs()):
        Sigma = L @ L.T
        v = float(re_quadratic(t.Zraw, Sigma).sum()) / n
        if t.n_levels == n:  # an observation-level term: over-dispersion
            dispersion += v
        else:
            random += v
    fam, link = fit.family.name, fit.family.link.name
    null_mu = None
    if fam == "gaussian":
        dist = fit.sigma ** 2
    elif fam == "binomial":
        if link not in _BINOMIAL_LINK:
            raise NGMMError(f"no distribution-specific variance for the binomial {link} link")
        dist = _BINOMIAL_LINK[link]
    elif fam in ("poisson", "negative_binomial"):
        if link != "log":
            raise NGMMError(f"no distribution-specific variance for the {fam} {link} link "
                            "(performance defines the log link)")
        null_mu = _null_mu(fit, data, null_fit)
        extra = 1.0 / fit.sigma if fam == "negative_binomial" else 0.0
        dist = math.log1p(1.0 / null_mu + extra)
    elif fam == "gamma":
        dist = fit.sigma ** 2
    else:
        raise NGMMError(f"no distribution-specific variance for the family {fam!r}")
    return VarianceComponents(fixed=var_f, random=random, distribution=float(dist),
                              dispersion=dispersion, nn=nn, null_mu=null_mu)


def r2_nakagawa(fit: NGMMResult, *, data: pd.DataFrame | None = None,
                null_fit: NGMMResult | None = None) -> pd.Series:
    r"""Nakagawa's marginal and conditional :math:`R^2` (``performance::r2_nakagawa``).

    See the module docstring for the formulas and for ``data`` / ``null_fit``.

    Returns
    -------
    Series
        ``R2_conditional``, ``R2_marginal`` and, for each ``nn()`` term, ``R2_<label>``:
        its output variance over the total (its part of the marginal :math:`R^2`).
    """
    vc = variance_components(fit, data=data, null_fit=null_fit)
    out = {"R2_conditional": (vc.fixed + vc.random) / vc.total,
           "R2_marginal": vc.fixed / vc.total}
    out.update({f"R2_{k}": v for k, v in vc.nn_share().items()})
    return pd.Series(out, name="r2_nakagawa")


def icc(fit: NGMMResult, *, data: pd.DataFrame | None = None,
        null_fit: NGMMResult | None = None) -> pd.Series:
    r"""Adjusted and conditional intraclass correlation (``performance::icc``).

    :math:`\sigma^2_r / (\sigma^2_r + \sigma^2_\varepsilon)` and
    :math:`\sigma^2_r / (\sigma^2_f + \sigma^2_r + \sigma^2_\varepsilon)`; see the module
    docstring.
    """
    vc = variance_components(fit, data=data, null_fit=null_fit)
    return pd.Series({"ICC_adjusted": vc.random / (vc.random + vc.residual),
                      "ICC_conditional": vc.random / vc.total}, name="icc")
