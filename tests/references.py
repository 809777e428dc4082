"""The R reference values of ``tests/reference/`` (made by ``make_refs.R``), loaded once for
every test module that compares with lme4 or glmmTMB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ngmm_formula.datasets import load

REF_DIR = Path(__file__).parent / "reference"
_ALL = json.loads((REF_DIR / "lme4_refs.json").read_text())

#: Reference fits by id (``cbpp_logit_laplace``, ``sleep_reml``, ...).
REFS: dict[str, dict[str, Any]] = {f["id"]: f for f in _ALL["fits"]}


def gamma_sim() -> pd.DataFrame:
    """The Gamma data set simulated by make_refs.R."""
    d = pd.read_csv(REF_DIR / "gamma_sim.csv")
    d["g"] = d["g"].astype("category")
    return d


def dataset(name: str) -> pd.DataFrame:
    """A bundled data set, or ``gamma_sim``."""
    return gamma_sim() if name == "gamma_sim" else load(name)


# The linear Gaussian reference fits of tests/reference/make_refs.R: (reference id, data set,
# formula, REML), shared by the devfun tests of the full and the profiled objective.
SLEEP = "Reaction ~ Days + (Days | Subject)"
LMER = [
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE) / REML = FALSE
    ("sleep_reml", "sleepstudy", SLEEP, True),
    ("sleep_ml", "sleepstudy", SLEEP, False),
    # lmer(Reaction ~ Days + (Days || Subject), sleepstudy, REML = FALSE)
    ("sleep_uncorr_ml", "sleepstudy", "Reaction ~ Days + (Days || Subject)", False),
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, REML = TRUE)
    ("penicillin_reml", "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", True),
    # lmer(strength ~ 1 + (1 | batch/cask), Pastes, REML = TRUE)
    ("pastes_reml", "Pastes", "strength ~ 1 + (1 | batch/cask)", True),
    # lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = TRUE) / REML = FALSE
    ("dyestuff_reml", "Dyestuff", "Yield ~ 1 + (1 | Batch)", True),
    ("dyestuff_ml", "Dyestuff", "Yield ~ 1 + (1 | Batch)", False),
]
