r"""Scores of new students: the factor scores of a reduced-rank term for the levels of new
data, from their own responses, at the fitted parameters (item-response scoring).

For each level :math:`g` of the term's grouping factor in ``newdata`` (a new student, or a
known one scored from these rows only), with the fitted loadings :math:`\Lambda`, fixed
effects, networks and the other terms' conditional modes held fixed,

.. math::

    h_g(z) = \sum_{i \in g} \log p\bigl(y_i \mid \eta^{\text{fixed}}_i
             + z_i^\top \Lambda z\bigr) + \log N(z; 0, I_d),

the score is the mode :math:`\hat z_g` (the maximum a posteriori score), its conditional
covariance :math:`(-\nabla^2 h_g(\hat z_g))^{-1}`, and the level's marginal log-likelihood
:math:`\log \int e^{h_g(z)} dz` by the fit's rule (its adaptive Gauss--Hermite or truncated
rule; Laplace for fits on a joint block, where the other terms' effects are held at their
modes): the held-out log-likelihood of a new student. The same batched Newton search and
rules as the fit (:mod:`~ngmm_formula.approx.conditional`, :mod:`~ngmm_formula.approx.
adaptive`), one block per level.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
import torch

from ngmm_formula.approx import Approximation
from ngmm_formula.approx.adaptive import log_marginal
from ngmm_formula.approx.conditional import find_mode
from ngmm_formula.design import group_labels, re_effect, re_loaded
from ngmm_formula.errors import DataError
from ngmm_formula.layout import Blocks

if TYPE_CHECKING:
    from ngmm_formula.results import NGMMResult, ReducedRank

__all__ = ["score_newdata"]


def score_newdata(fit: NGMMResult, rr: ReducedRank, newdata: pd.DataFrame) -> pd.DataFrame:
    """Factor scores of ``rr``'s term for the levels in ``newdata`` (see the module
    docstring): a frame levels x F1..Fd (levels in order of first appearance), conditional
    covariances in ``attrs["condVar"]``, the marginal log-likelihood of each level's rows in
    ``attrs["logLik"]`` (a Series)."""
    design = fit.design
    k = next(i for i, t in enumerate(design.re_terms) if t.name == rr.name)
    term = design.re_terms[k]
    nd = design.spec.new_data(newdata, with_response=True, allow_new_levels=True)
    if nd.y is None or len(nd.y) == 0:
        raise DataError("newdata has no rows to score")
    eta = nd.offset + nd.X @ fit.fixef.to_numpy() + fit._net_part(nd.net_X)
    for j, (Z, gi, b) in enumerate(zip(nd.Zraw, nd.group_index, fit.random_coef)):
        if j != k:
            eta = eta + re_effect(Z, gi, b)
    bar = design.spec.re_terms[k][0]
    labels = group_labels(newdata, bar)  # new_data refused missing values: every row is kept
    codes, levels = pd.factorize(labels)
    d = rr.d
    Z = nd.Zraw[k]
    L = rr.loadings
    C = re_loaded(Z, L)
    blocks = Blocks(n_blocks=len(levels), dim=d,
                    block_of_obs=torch.as_tensor(codes, dtype=torch.long),
                    slot_pos=torch.arange(d).repeat(len(codes), 1),
                    prior_precision=torch.ones(d, dtype=torch.float64), split=None)
    fam = fit.family
    y = torch.tensor(nd.y, dtype=torch.float64)  # copies: the design's arrays are read-only
    w = torch.tensor(nd.weights, dtype=torch.float64)
    log_sigma = (torch.tensor(math.log(fit.sigma), dtype=torch.float64)
                 if fam.has_dispersion else None)
    eta_t, C_t = torch.as_tensor(eta, dtype=torch.float64), torch.as_tensor(C)
    with torch.no_grad():
        mode = find_mode(fam, y, w, eta_t, log_sigma, C_t, blocks)
        approx = fit.approximation
        rule = (approx if approx.kind in ("agq", "truncated")
                else Approximation("laplace")).rule(d)
        ll = log_marginal(fam, y, w, eta_t, log_sigma, C_t, blocks, mode, rule,
                          fam.data_constant(y, w))
        idx = (torch.arange(len(levels))[:, None] * d + torch.arange(d)[None, :])
        cov = mode.factor.inverse_blocks(idx).double().numpy()
    names = [f"F{j + 1}" for j in range(d)]
    index = pd.Index([str(v) for v in levels], name=term.name)
    out = pd.DataFrame(mode.v.double().numpy(), index=index, columns=names)
    out.attrs["condVar"] = cov
    out.attrs["logLik"] = pd.Series(ll.double().numpy(), index=index, name="logLik")
    return out
