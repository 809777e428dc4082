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


class ApproximationWarning(NGMMWarning):
    """The estimates lie where the integral approximation is known to be unreliable.

    Emitted when a reduced-rank loading exceeds 10 in absolute value on the link scale
    (:data:`ngmm_formula.assemble.LARGE_LOADING`): the item's responses are then close to a
    step function of the latent scores. The Laplace approximation treats such an item's
    cliff as almost free (it ignores the mass of each student's posterior cut off by the
    step) and can have a spurious maximum there, higher than the regular one: glmmTMB's
    Laplace objective has the same maximum. Refit with ``approx="agq"`` (or compare the
    fits' log-likelihoods under AGQ); under AGQ such a loading means a near-deterministic
    item (check the estimate with a larger ``nagq``).
    """


class RankDeficiencyWarning(NGMMWarning):
    """Columns of the fixed-effects model matrix were aliased and dropped."""


class NewLevelsError(DataError):
    """New data have levels of a grouping factor (or of a factor among the ``nn()`` inputs)
    that the training data did not have, and prediction was asked not to allow them
    (``allow_new_levels=False``).

    Attributes
    ----------
    group : str
        The grouping factor (or the ``nn()`` input).
    levels : list of str
        The unseen levels (the message shows five).
    what : str
        "grouping factor" or "nn() input".
    """

    def __init__(self, group: str, levels: list[str],
                 advice: str = "use allow_new_levels=True to predict them with a zero random "
                               "effect (lme4's allow.new.levels), or re_form=\"~0\" for "
                               "population-level predictions",
                 what: str = "grouping factor"):
        self.group = group
        self.levels = sorted(levels, key=str)
        self.what = what
        shown = ", ".join(repr(v) for v in self.levels[:5])
        more = f" and {len(self.levels) - 5} more" if len(self.levels) > 5 else ""
        super().__init__(f"{what} '{group}' has {len(self.levels)} level(s) not in "
                         f"the training data: {shown}{more}; {advice}")


class SeparationWarning(NGMMWarning):
    r"""The response is (quasi-)completely separated by fixed-effect columns.

    Some direction :math:`b` of the fixed effects fits every observation at least as well the
    further it goes (see :mod:`ngmm_formula.checks`): the estimates of the columns named are
    infinite, and the fit returns huge values with huge standard errors. A warning, not an
    error, as lme4 and glmmTMB fit such data too (with convergence warnings at most): the
    other estimates can still be of use, and quasi-complete separation by a rare factor level
    is common. Remedies: drop or merge the column (level), or use a penalised (Firth) or
    Bayesian fit with a proper prior on the fixed effects.
    """


class ScaleWarning(NGMMWarning):
    """A fixed-effect column is on an extreme scale compared with the others (lme4's "Some
    predictor variables are on very different scales"): rescale it (e.g. divide by its
    standard deviation) to keep the optimiser accurate."""


class WorkerError(NGMMError):
    """A process of a distributed fit died or stopped responding, and every process was
    stopped (:func:`~ngmm_formula.distributed.fit_distributed`).

    Attributes
    ----------
    rank : int
        The rank of the (first) process that failed.
    """

    def __init__(self, message: str, rank: int):
        self.rank = rank
        super().__init__(message)


class CheckpointError(NGMMError):
    """A training checkpoint (``Control.checkpoint``) belongs to another fit (other data,
    formula, options or seed) or cannot be read; the message names what differs."""
