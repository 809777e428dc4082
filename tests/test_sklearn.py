"""The scikit-learn estimators (ngmm_formula.sklearn).

``sklearn.utils.estimator_checks`` (scikit-learn 1.9): the checks run on both estimators; the
ones listed in ``EXPECTED_FAILED`` are expected to fail, each with its reason, and the
behaviour most of them test is checked by hand on grouped data in
``test_contract_on_grouped_data``. The common reason: those checks fit the estimator to a
plain numeric array with no grouping column, and a mixed model cannot be fitted without
groups (``fit`` then raises ``ValueError: give formula= ... or group= ...``).
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from ngmm_formula import Control, datasets
from ngmm_formula.sklearn import NGMMClassifier, NGMMRegressor

NO_GROUP = ("fits a numeric array with no grouping column: a mixed model needs groups "
            "(checked by hand on grouped data in test_contract_on_grouped_data)")
BINARY = "binary classifier (y has 3 classes in this check), and needs groups as above"
_COMMON = ["check_dict_unchanged", "check_dtype_object", "check_estimators_dtypes",
           "check_estimators_nan_inf", "check_estimators_pickle",
           "check_f_contiguous_array_estimator",
           "check_fit2d_1feature", "check_fit2d_predict1d", "check_fit_check_is_fitted",
           "check_fit_idempotent", "check_methods_sample_order_invariance",
           "check_methods_subset_invariance", "check_n_features_in",
           "check_n_features_in_after_fitting", "check_pipeline_consistency",
           "check_positive_only_tag_during_fit", "check_readonly_memmap_input",
           "check_supervised_y_2d", "check_dont_overwrite_parameters",
           "check_estimators_fit_returns_self", "check_estimators_overwrite_params",
           "check_fit_score_takes_y"]
_MULTICLASS = {"check_dict_unchanged", "check_dtype_object",
               "check_f_contiguous_array_estimator",
               "check_fit2d_predict1d", "check_methods_sample_order_invariance",
               "check_methods_subset_invariance", "check_n_features_in_after_fitting",
               "check_readonly_memmap_input", "check_supervised_y_2d",
               "check_dont_overwrite_parameters", "check_estimators_fit_returns_self",
               "check_estimators_overwrite_params", "check_fit_score_takes_y"}
EXPECTED_FAILED: dict[str, dict[str, str]] = {
    "NGMMRegressor": {
        **{c: NO_GROUP for c in _COMMON},
        "check_fit2d_1sample": NO_GROUP,
        "check_regressor_data_not_an_array": NO_GROUP,
        "check_regressors_int": NO_GROUP,
        "check_regressors_no_decision_function": NO_GROUP,
        "check_regressors_train": NO_GROUP,
    },
    "NGMMClassifier": {
        **{c: (BINARY if c in _MULTICLASS else NO_GROUP) for c in _COMMON},
        "check_classifier_data_not_an_array": NO_GROUP,
        "check_classifiers_classes": NO_GROUP,
        "check_classifiers_train": NO_GROUP,
        "check_decision_proba_consistency": NO_GROUP,
    },
}


def _expected(est: Any) -> dict[str, str]:
    return EXPECTED_FAILED[type(est).__name__]


@parametrize_with_checks([NGMMRegressor(), NGMMClassifier()], expected_failed_checks=_expected)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


@pytest.fixture(scope="module")
def sleep() -> tuple[pd.DataFrame, pd.Series]:
    d = datasets.load("sleepstudy")
    return d[["Days", "Subject"]], d["Reaction"]


def test_cross_val_score_with_group_kfold(sleep) -> None:  # type: ignore[no-untyped-def]
    X, y = sleep
    est = NGMMRegressor("Reaction ~ Days + (Days | Subject)")
    scores = cross_val_score(est, X, y, groups=X["Subject"], cv=GroupKFold(5))
    # held-out subjects are new levels: population predictions (allow_new_levels=True);
    # R^2 of each fold is finite and the average better than the mean-only model's 0 is
    # not guaranteed for 3-4 new subjects, so only finiteness and the fold count are checked
    assert scores.shape == (5,) and np.isfinite(scores).all()
    # with the group's own random effect known (the same subjects), R^2 is high
    assert est.fit(X, y).score(X, y) > 0.75


def test_classifier_cross_val_score() -> None:
    rng = np.random.default_rng(3)
    G, m = 30, 20
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=G * m)
    p = 1 / (1 + np.exp(-(0.3 + 1.2 * x + rng.normal(0, 1, G)[g])))
    y = np.where(rng.uniform(size=G * m) < p, "yes", "no")
    X = pd.DataFrame({"x": x, "g": [f"g{i}" for i in g]})
    est = NGMMClassifier(group="g")  # formula None: y ~ x + (1 | g)
    acc = cross_val_score(est, X, y, groups=X["g"], cv=GroupKFold(5))
    assert acc.shape == (5,) and (acc > 0.6).all()
    est.fit(X, y)
    assert list(est.classes_) == ["no", "yes"]
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert set(est.predict(X)) <= {"no", "yes"}


def test_grid_search_over_a_control_option() -> None:
    rng = np.random.default_rng(0)
    G, m = 30, 10
    g = np.repeat(np.arange(G), m)
    x = rng.uniform(-2, 2, G * m)
    y = np.sin(2 * x) + rng.normal(0, 0.7, G)[g] + rng.normal(0, 0.3, G * m)
    X = pd.DataFrame({"x": x, "g": [f"g{i}" for i in g]})
    est = NGMMRegressor("y ~ nn(x, hidden=[8]) + (1 | g)")
    grid = {"control": [Control(epochs=1, progress=False), Control(epochs=60, progress=False)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gs = GridSearchCV(est, grid, cv=GroupKFold(3)).fit(X, y, groups=X["g"])
    # one epoch leaves the network untrained: the search must prefer the trained one
    assert gs.best_params_["control"].epochs == 60
    assert np.isfinite(gs.cv_results_["mean_test_score"]).all()


def test_contract_on_grouped_data(sleep) -> None:  # type: ignore[no-untyped-def]
    X, y = sleep
    est = NGMMRegressor("Reaction ~ Days + (Days | Subject)")
    with pytest.raises(NotFittedError):
        est.predict(X)
    params = est.get_params()
    assert est.fit(X, y) is est                                   # fit returns self
    assert est.get_params() == params                             # parameters not changed
    assert est.n_features_in_ == 2 and list(est.feature_names_in_) == ["Days", "Subject"]
    pred = est.predict(X)
    state = dict(est.__dict__)
    est.predict(X)
    assert est.__dict__.keys() == state.keys()                    # predict changes nothing
    perm = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_allclose(est.predict(X.iloc[perm]), pred[perm])  # row order
    np.testing.assert_allclose(est.predict(X.iloc[:7]), pred[:7])      # subsets
    np.testing.assert_allclose(clone(est).fit(X, y).predict(X), pred)  # idempotent refit
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(restored.predict(X), pred)
    assert not hasattr(clone(est), "fit_")
    assert clone(est.set_params(control=Control(max_iter=50))).control.max_iter == 50
    with pytest.raises(ValueError, match="features"):
        est.predict(X[["Days"]])
    with pytest.raises(ValueError, match="formula="):
        NGMMRegressor().fit(X, y)
    with pytest.raises(ValueError, match="group='nope'"):
        NGMMRegressor(group="nope").fit(X, y)
