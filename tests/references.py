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
