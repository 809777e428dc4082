"""ngmm_formula: neural generalized mixed-effects models with lme4's formula language.

>>> from ngmm_formula import ngmm, datasets
>>> fit = ngmm("cbind(incidence, size - incidence) ~ period + (1 | herd)",
...            datasets.load("cbpp"), family="binomial")           # doctest: +SKIP
>>> print(fit.summary())                                             # doctest: +SKIP

The public names are imported when first used (PEP 562's module ``__getattr__``), so that
``import ngmm_formula`` and ``ngmm --help`` do not pay for torch, pandas and scipy (about
2.5 s on a small machine); ``from ngmm_formula import ngmm`` imports what ``ngmm`` needs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ngmm_formula.errors import (
    ApproximationWarning,
    CheckpointError,
    ConvergenceWarning,
    DataError,
    FormulaError,
    NewLevelsError,
    NGMMError,
    NGMMWarning,
    RankDeficiencyWarning,
    ScaleWarning,
    SeparationWarning,
    SingularFitWarning,
    WorkerError,
)
from ngmm_formula.registry import RESULT_METHODS as _RESULT_METHODS
from ngmm_formula.version import __version__

if TYPE_CHECKING:
    from ngmm_formula import datasets
    from ngmm_formula.api import Control, ngmm
    from ngmm_formula.compare import ComparisonTable, compare
    from ngmm_formula.distributed import fit_distributed
    from ngmm_formula.families import Family, get_family
    from ngmm_formula.formula import parse_formula
    from ngmm_formula.persist import ModelFileError, load
    from ngmm_formula.results import NGMMResult
    from ngmm_formula.summary import AnovaTable


#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "ComparisonTable": "ngmm_formula.compare",
    "Control": "ngmm_formula.api",
    "Family": "ngmm_formula.families",
    "ModelFileError": "ngmm_formula.persist",
    "NGMMResult": "ngmm_formula.results",
    "compare": "ngmm_formula.compare",
    "fit_distributed": "ngmm_formula.distributed",
    "get_family": "ngmm_formula.families",
    "load": "ngmm_formula.persist",
    "ngmm": "ngmm_formula.api",
    "parse_formula": "ngmm_formula.formula",
}

#: NGMMResult's methods whose computation lives above the results layer -> the function that
#: computes it (its module is imported when the method is first called; see
#: :mod:`ngmm_formula.registry`). The package is the top layer, so it may name every module.
_RESULT_METHODS.declare({
    "compare": "ngmm_formula.compare:compare",
    "confint": "ngmm_formula.inference:confint",
    "emmeans": "ngmm_formula.emmeans:emmeans",
    "icc": "ngmm_formula.performance:icc",
    "plot_caterpillar": "ngmm_formula.plots:caterpillar",
    "plot_partial_dependence": "ngmm_formula.plots:partial_dependence",
    "plot_residuals": "ngmm_formula.plots:residuals_vs_fitted",
    "plot_training_curve": "ngmm_formula.plots:training_curve",
    "predict_interval": "ngmm_formula.intervals:predict_interval",
    "predict_se": "ngmm_formula.inference:predict_se",
    "profile": "ngmm_formula.inference:profile",
    "r2": "ngmm_formula.performance:r2_nakagawa",
    "save": "ngmm_formula.persist:save",
    "score_newdata": "ngmm_formula.scoring:score_newdata",
    "simulate_residuals": "ngmm_formula.residuals:simulate_residuals",
})


def __getattr__(name: str) -> Any:
    if name == "datasets":
        return importlib.import_module("ngmm_formula.datasets")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ngmm_formula' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def anova(*fits: NGMMResult, refit: bool = True, **named_fits: Any) -> AnovaTable:
    """Likelihood-ratio table of nested fits, as lme4's ``anova(m1, m2)``.

    ``anova(m0=fit0, m1=fit1)`` names the rows m0 and m1; positional fits are named by
    ``fit.name`` or their formula (:func:`ngmm_formula.summary.anova`).
    """
    from ngmm_formula.summary import anova as _anova

    return _anova(*fits, refit=refit, **named_fits)


class _Package(types.ModuleType):
    """The package's module type: the import system sets ``ngmm_formula.compare`` to the
    submodule when that is first imported; the package's ``compare`` stays the function
    (as when this file imported it eagerly)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compare" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "ApproximationWarning",
    "CheckpointError",
    "ComparisonTable",
    "Control",
    "ConvergenceWarning",
    "DataError",
    "Family",
    "FormulaError",
    "ModelFileError",
    "NGMMError",
    "NGMMResult",
    "NGMMWarning",
    "NewLevelsError",
    "RankDeficiencyWarning",
    "ScaleWarning",
    "SeparationWarning",
    "SingularFitWarning",
    "WorkerError",
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
