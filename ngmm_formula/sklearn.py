r"""scikit-learn estimators: :class:`NGMMRegressor` and :class:`NGMMClassifier`.

They wrap :func:`ngmm_formula.ngmm` so that a mixed model can go through scikit-learn's
model selection::

    from sklearn.model_selection import GroupKFold, cross_val_score
    est = NGMMRegressor("Reaction ~ Days + (Days | Subject)")
    cross_val_score(est, X, y, groups=X["Subject"], cv=GroupKFold(5))

``X`` is a DataFrame holding every column the formula uses except the response, which is
``y`` (the formula's left-hand side names the column that ``fit`` creates from ``y``; a
formula without one, ``"~ Days + (1 | Subject)"``, gets the name ``y``). A NumPy array is
accepted too; its columns are named ``x0, x1, ...``. With ``formula=None`` the formula is
``y ~ <all columns but group> + (1 | group)``.

Prediction for rows of groups that the training data did not have (as every row is under
``GroupKFold``) uses a zero random effect (``allow_new_levels=True``, the population
prediction for an unknown group); set it to False to get lme4's error instead.

Parameters are stored verbatim by ``__init__`` and validated in ``fit`` (scikit-learn's
convention, so ``clone``, ``get_params`` and ``set_params`` work); fitted attributes end
in ``_``: ``fit_`` (the :class:`~ngmm_formula.NGMMResult`), ``n_features_in_``,
``feature_names_in_`` (DataFrame input), ``classes_`` (classifier). A fitted estimator
pickles (as the data-only model file of :mod:`ngmm_formula.persist`, so the unpickled
model can predict but not refit itself, e.g. for ``refit_ml``).

``score`` is the coefficient of determination :math:`R^2 = 1 - \sum(y-\hat y)^2/\sum(y-\bar y)^2`
(regressor) or the accuracy (classifier), scikit-learn's defaults.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from ngmm_formula.errors import NGMMError

__all__ = ["NGMMClassifier", "NGMMRegressor"]


class _NGMMEstimator(BaseEstimator):
    _family_default = "gaussian"

    def __init__(self, formula: str | None = None, group: str | None = None, *,
                 family: Any = None, approx: str = "auto", control: Any = None,
                 seed: int = 0, re_form: str | None = None,
                 allow_new_levels: bool = True) -> None:
        self.formula = formula
        self.group = group
        self.family = family
        self.approx = approx
        self.control = control
        self.seed = seed
        self.re_form = re_form
        self.allow_new_levels = allow_new_levels

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """Pickle the fitted model as a model file (:func:`ngmm_formula.persist.dumps`,
        data only): an :class:`~ngmm_formula.NGMMResult` holds a refit closure that pickle
        cannot store, and the model file is the package's portable form."""
        state = dict(super().__getstate__())
        if "fit_" in state:
            from ngmm_formula.persist import dumps

            state["fit_"] = dumps(state["fit_"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("fit_"), bytes):
            from ngmm_formula.persist import loads

            state = {**state, "fit_": loads(state["fit_"])}
        super().__setstate__(state)

    # ------------------------------------------------------------------ helpers
    def _frame(self, X: Any, fitting: bool) -> pd.DataFrame:
        if isinstance(X, pd.DataFrame):
            frame = X
        else:
            from sklearn.utils.validation import check_array

            # numeric arrays: scikit-learn's own checks and messages (2-d, finite, not
            # sparse, at least one row and column)
            arr = check_array(X, accept_sparse=False, dtype="numeric",
                              ensure_all_finite=True)
            frame = pd.DataFrame(arr, columns=[f"x{j}" for j in range(arr.shape[1])])
        if frame.shape[0] == 0:
            raise ValueError("X has 0 samples; at least one is required")
        if fitting:
            self.n_features_in_ = frame.shape[1]
            if isinstance(X, pd.DataFrame):
                self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
        elif frame.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {frame.shape[1]} features, but {type(self).__name__} "
                             f"is expecting {self.n_features_in_} features as input")
        return frame

    def _formula(self, frame: pd.DataFrame) -> tuple[str, str]:
        """(formula with a response, response column name)."""
        if self.formula is None:
            if self.group is None:
                raise ValueError("give formula= (with its random-effects terms) or group= "
                                 "(the grouping column for a random intercept)")
            if self.group not in frame.columns:
                raise ValueError(f"group={self.group!r} is not a column of X "
                                 f"(columns: {list(map(str, frame.columns))[:10]})")
            rhs = [str(c) for c in frame.columns if c != self.group]
            formula = f"y ~ {' + '.join(rhs) if rhs else '1'} + (1 | {self.group})"
        elif not isinstance(self.formula, str):
            raise ValueError(f"formula must be a string, got {type(self.formula).__name__}")
        else:
            formula = self.formula.strip()
            if formula.startswith("~"):
                formula = "y " + formula
            if self.group is not None:
                formula = f"{formula} + (1 | {self.group})"
        lhs = formula.split("~", 1)[0].strip()
        if not lhs.isidentifier():
            raise ValueError(f"the formula's response must be a plain column name (it is "
                             f"created from y), got {lhs!r}")
        return formula, lhs

    def _fit(self, X: Any, y: Any, family: Any) -> Any:
        from ngmm_formula.api import ngmm

        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y "
                             "is None")
        frame = self._frame(X, fitting=True)
        formula, lhs = self._formula(frame)
        yv = np.asarray(y)
        if yv.ndim != 1 or yv.shape[0] != frame.shape[0]:
            raise ValueError(f"y must be 1-d with one value per row of X ({frame.shape[0]}), "
                             f"got shape {yv.shape}")
        data = frame.assign(**{lhs: yv})
        try:
            return ngmm(formula, data, family=family, approx=self.approx,
                        control=self.control, seed=self.seed)
        except NGMMError as e:
            raise ValueError(str(e)) from e

    def _link(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "fit_")
        frame = self._frame(X, fitting=False)
        eta: np.ndarray = self.fit_.predict(frame, type="link", re_form=self.re_form,
                                           allow_new_levels=self.allow_new_levels)
        return eta


class NGMMRegressor(RegressorMixin, _NGMMEstimator):
    """A (neural) GLMM as a scikit-learn regressor; ``predict`` returns the conditional mean.

    Parameters
    ----------
    formula : str or None
        lme4 formula (``nn()`` terms allowed); its response is the name given to ``y``.
    group : str or None
        A grouping column: appends ``+ (1 | group)`` to the formula (or, with
        ``formula=None``, builds ``y ~ <other columns> + (1 | group)``).
    family : str or Family, default "gaussian"
        As :func:`ngmm_formula.ngmm` (for counts: "poisson", "negative_binomial").
    approx : str
        As :func:`ngmm_formula.ngmm`.
    control : Control or None
        :class:`ngmm_formula.Control`; a grid of Control objects can be searched.
    seed : int
    re_form : None or "~0"
        Prediction with (None) or without ("~0") the fitted random effects.
    allow_new_levels : bool
        Unseen grouping levels get a zero random effect (True) or raise (False).
    """

    def fit(self, X: Any, y: Any) -> NGMMRegressor:
        """Fit the model to the rows of ``X`` with response ``y``; returns ``self``."""
        family = "gaussian" if self.family is None else self.family
        self.fit_ = self._fit(X, y, family)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Conditional means :math:`g^{-1}(\\hat\\eta)` of the rows of ``X``."""
        eta = self._link(X)
        mu: np.ndarray = self.fit_._mean(eta)
        return mu


class NGMMClassifier(ClassifierMixin, _NGMMEstimator):
    """A binomial (neural) GLMM as a scikit-learn binary classifier.

    ``y`` may hold any two labels; ``classes_`` sorts them and the second is the success
    (probability ``predict_proba(X)[:, 1]``). ``family`` may give another binomial link,
    e.g. ``get_family("binomial", "probit")``. Other parameters as :class:`NGMMRegressor`.
    """

    def fit(self, X: Any, y: Any) -> NGMMClassifier:
        """Fit the binomial model; returns ``self``."""
        from sklearn.utils.multiclass import check_classification_targets

        if y is None:
            raise ValueError("NGMMClassifier requires y to be passed, but the target y is None")
        self._frame(X, fitting=True)  # X's errors first, as scikit-learn's estimators
        check_classification_targets(y)
        classes, codes = np.unique(np.asarray(y), return_inverse=True)
        if len(classes) != 2:
            raise ValueError(f"NGMMClassifier is a binary classifier: y must have 2 classes, "
                             f"got {len(classes)} class(es)")
        family = "binomial" if self.family is None else self.family
        if getattr(family, "name", family) != "binomial":
            raise ValueError(f"family must be binomial for a classifier, got {family!r}")
        self.classes_ = classes
        self.fit_ = self._fit(X, codes.astype(float), family)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities of ``classes_`` (columns), shape (n, 2)."""
        eta = self._link(X)
        p = self.fit_._mean(eta)
        return np.column_stack([1.0 - p, p])

    def decision_function(self, X: Any) -> np.ndarray:
        """The linear predictor (log-odds for the logit link) of the second class."""
        return self._link(X)

    def predict(self, X: Any) -> np.ndarray:
        """The more probable class of each row."""
        p = self.predict_proba(X)[:, 1]
        out: np.ndarray = self.classes_[(p > 0.5).astype(int)]
        return out
