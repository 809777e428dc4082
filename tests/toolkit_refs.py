"""The R reference values of ``tests/reference/toolkit_refs.json`` (made by
``make_toolkit_refs.R`` with emmeans 1.8.4, performance 0.10.2, insight 0.19.0) and the
matching fits, made once per test session for ``test_emmeans.py`` and
``test_performance.py``."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ngmm_formula import ngmm
from ngmm_formula.datasets import load
from ngmm_formula.results import NGMMResult

_PATH = Path(__file__).parent / "reference" / "toolkit_refs.json"
TOOLKIT: dict[str, dict[str, Any]] = {m["id"]: m for m in json.loads(_PATH.read_text())["models"]}

# id -> (data set, formula, family, approx); every GLMM reference is glmmTMB's Laplace fit, so
# the Python fit uses approx="laplace" (the default adaptive quadrature is a different, more
# accurate, integral).
MODELS: dict[str, tuple[str, str, str, str]] = {
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE)
    "sleep_reml": ("sleepstudy", "Reaction ~ Days + (Days | Subject)", "gaussian", "auto"),
    # glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
    "cbpp_tmb": ("cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                 "binomial", "laplace"),
    # glmmTMB(use ~ age + I(age^2) + urban + livch + (1 | district), Contraception, binomial)
    "contra_tmb": ("Contraception", "use ~ age + I(age ** 2) + urban + livch + (1 | district)",
                   "binomial", "laplace"),
    # glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), grouseticks, poisson)
    "grouse_poisson_tmb": ("grouseticks", "TICKS ~ YEAR + cHEIGHT + (1 | BROOD)", "poisson",
                           "laplace"),
    # glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), grouseticks, nbinom2)
    "grouse_nb2_tmb": ("grouseticks", "TICKS ~ YEAR + cHEIGHT + (1 | BROOD)",
                       "negative_binomial", "laplace"),
}


@functools.cache
def data(ref_id: str) -> pd.DataFrame:
    return load(MODELS[ref_id][0])


@functools.cache
def fitted(ref_id: str) -> NGMMResult:
    name, formula, family, approx = MODELS[ref_id]
    return ngmm(formula, data(ref_id), family, approx=approx)


def at_r_parameters(ref_id: str) -> NGMMResult:
    """The Python fit with R's fixed effects and their covariance put in: what remains to
    compare is the computation of emmeans from (beta, V), which must agree to rounding.

    V is the covariance R's emmeans tables were computed from: ``precise_vcov`` for the
    glmmTMB models (a Richardson-extrapolated Hessian, see ``make_toolkit_refs.R``), else
    ``vcov``."""
    fit = fitted(ref_id)
    ref = TOOLKIT[ref_id]
    names = list(ref["fixef"])
    beta = pd.Series(list(ref["fixef"].values()), index=fit.fixef.index, name=fit.fixef.name)
    V = pd.DataFrame(ref.get("precise_vcov", ref["vcov"])["data"], index=fit.vcov.index,
                     columns=fit.vcov.columns)
    assert len(names) == len(fit.fixef)
    return dataclasses.replace(fit, fixef=beta, vcov=V)
