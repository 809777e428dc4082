"""ngmm_formula: neural generalized mixed-effects models with lme4's formula language."""

from __future__ import annotations

from ngmm_formula.errors import (
    ConvergenceWarning,
    DataError,
    FormulaError,
    NGMMError,
    RankDeficiencyWarning,
    SingularFitWarning,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "DataError",
    "FormulaError",
    "NGMMError",
    "RankDeficiencyWarning",
    "SingularFitWarning",
    "__version__",
]
