"""ngmm_formula: neural generalized mixed-effects models with lme4's formula language.

>>> from ngmm_formula import ngmm, datasets
>>> fit = ngmm("cbind(incidence, size - incidence) ~ period + (1 | herd)",
...            datasets.load("cbpp"), family="binomial")           # doctest: +SKIP
>>> print(fit.summary())                                             # doctest: +SKIP
"""

from __future__ import annotations

from ngmm_formula import datasets
from ngmm_formula.api import Control, ngmm
from ngmm_formula.compare import ComparisonTable, compare
from ngmm_formula.distributed import fit_distributed
from ngmm_formula.errors import (
    ConvergenceWarning,
    DataError,
    FormulaError,
    NGMMError,
    RankDeficiencyWarning,
    SingularFitWarning,
)
from ngmm_formula.families import Family, get_family
from ngmm_formula.formula import parse_formula
from ngmm_formula.persist import ModelFileError, load
from ngmm_formula.results import NGMMResult

__version__ = "0.1.0"


def anova(*fits: NGMMResult, refit: bool = True, **named_fits: NGMMResult):  # type: ignore[no-untyped-def]
    """Likelihood-ratio table of nested fits, as lme4's ``anova(m1, m2)``.

    ``anova(m0=fit0, m1=fit1)`` names the rows m0 and m1; positional fits are named by
    ``fit.name`` or their formula (:func:`ngmm_formula.summary.anova`).
    """
    from ngmm_formula.summary import anova as _anova

    return _anova(*fits, refit=refit, **named_fits)


__all__ = [
    "ComparisonTable",
    "Control",
    "ConvergenceWarning",
    "DataError",
    "Family",
    "FormulaError",
    "ModelFileError",
    "NGMMError",
    "NGMMResult",
    "RankDeficiencyWarning",
    "SingularFitWarning",
    "__version__",
    "anova",
    "compare",
    "datasets",
    "fit_distributed",
    "get_family",
    "load",
    "ngmm",
    "parse_formula",
]
