"""Exceptions and warning classes raised by ngmm_formula.

Every user-facing error derives from :class:`NGMMError` (itself a ``ValueError`` so that
generic ``except ValueError`` code keeps working); warnings are classes so that users can
filter them (``warnings.simplefilter("ignore", SingularFitWarning)``).
"""

from __future__ import annotations


class NGMMError(ValueError):
    """Base class of the errors this package raises for bad input."""


class FormulaError(NGMMError):
    """A model formula that cannot be parsed.

    The message quotes the formula and puts a caret under the offending position::

        FormulaError: unbalanced parenthesis in formula
          y ~ x + (1 | g
                  ^
    """

    def __init__(self, message: str, formula: str | None = None, position: int | None = None):
        self.formula = formula
        self.position = position
        self.reason = message
        text = message
        if formula is not None:
            text += f"\n  {formula}"
            if position is not None:
                text += "\n  " + " " * max(0, min(position, len(formula))) + "^"
        super().__init__(text)


class DataError(NGMMError):
    """The data do not fit the model: a missing column, a bad response, NaN values, ..."""


class NGMMWarning(UserWarning):
    """Base class of the warnings this package emits."""


class ConvergenceWarning(NGMMWarning):
    """The optimiser stopped without meeting its convergence criteria."""


class SingularFitWarning(NGMMWarning):
    """A variance at zero or a correlation at +/-1 (lme4's 'boundary (singular) fit')."""


class RankDeficiencyWarning(NGMMWarning):
    """Columns of the fixed-effects model matrix were aliased and dropped."""
