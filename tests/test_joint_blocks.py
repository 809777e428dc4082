"""Whole fits whose joint block is factorised by block elimination, against lme4.

The crossed, nested and REML layouts integrate one joint block; beyond
``model.DENSE_JOINT_MAX_DIM`` coordinates it is factorised by block elimination over one
grouping factor (:class:`~ngmm_formula.approx.factor.SchurFactor`). Here the small lme4
reference fits (Penicillin crossed, Pastes nested, sleepstudy REML) are refitted with the
threshold at 0 so that they take that path, and grouseticks' crossed Poisson model (181
coordinates) takes it by default. Compared with ``tests/reference/lme4_refs.json`` at the
tolerances of ``tests/test_fit_reference.py`` (log-likelihood 1e-3 absolute, SDs 5e-3
relative, standard errors 1e-2 relative) and of ``tests/test_results.py`` for the conditional
modes and variances (1e-3 relative; absolute 1e-3 of the largest value), which come from the
factor's diagonal blocks of :math:`H^{-1}` -- lme4's ``postVar`` is conditional on
:math:`\\hat\\beta`, the blocks of :math:`(H_{uu})^{-1}`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import model
from ngmm_formula.api import ngmm
from ngmm_formula.results import NGMMResult
from tests.references import REFS, dataset

CASES = [
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, REML = TRUE)
    ("penicillin_reml", "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "gaussian",
     {"reml": True}, True),
    # lmer(strength ~ 1 + (1 | batch/cask), Pastes, REML = TRUE)
    ("pastes_reml", "Pastes", "strength ~ 1 + (1 | batch/cask)", "gaussian", {"reml": True},
     True),
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE)
    ("sleep_reml", "sleepstudy", "Reaction ~ Days + (Days | Subject)", "gaussian",
     {"reml": True}, True),
    # glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION), grouseticks, poisson)
    ("grouse_brood_location_laplace", "grouseticks",
     "TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", "poisson", {"approx": "laplace"},
     False),
]
IDS = [c[0] for c in CASES]
_FITS: dict[str, NGMMResult] = {}


def _fit(case: tuple, monkeypatch: pytest.MonkeyPatch) -> NGMMResult:
    ref_id, data, formula, family, kw, force = case
    if ref_id not in _FITS:
        if force:
            monkeypatch.setattr(model, "DENSE_JOINT_MAX_DIM", 0)
        fit = ngmm(formula, dataset(data), family, **kw)
        assert fit.diagnostics.converged
        _FITS[ref_id] = fit
    return _FITS[ref_id]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fit_takes_block_elimination(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    from ngmm_formula.api import prepare

    ref_id, data, formula, family, kw, force = case
    if force:
        monkeypatch.setattr(model, "DENSE_JOINT_MAX_DIM", 0)
    blocks = prepare(formula, dataset(data), family, **kw).problem.blocks
    assert blocks.n_blocks == 1 and blocks.split is not None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loglik_sd_se(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    fit = _fit(case, monkeypatch)
    ref = REFS[case[0]]
    # R: logLik(fit)
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-3)
    ours = fit.varcorr[fit.varcorr["group"] != "Residual"]
    theirs = pd.DataFrame(ref["varcorr"])
    theirs = theirs[(theirs["grp"] != "Residual") & theirs["var2"].isna()]
    # R: as.data.frame(VarCorr(fit))$sdcor (standard deviations)
    np.testing.assert_allclose(ours[ours["var2"].isna()]["sdcor"], theirs["sdcor"], rtol=5e-3)
    # R: sqrt(diag(vcov(fit))); under REML beta's block of the joint H^{-1}
    se = np.sqrt(np.diag(fit.vcov.to_numpy()))
    rtol = 1e-2 if ref["family"] == "gaussian" else 2e-2  # glmer: finite-difference Hessian
    np.testing.assert_allclose(se, list(ref["se"].values()), rtol=rtol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conditional_modes_and_variances(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    fit = _fit(case, monkeypatch)
    by = REFS[case[0]]["ranef"]["by_factor"]
    for factor, rec in by.items():
        cols = rec["columns"]
        modes = np.array([[r["condval"][c] for c in cols] for r in rec["levels"]])
        condvar = np.array([r["condvar"] for r in rec["levels"]])
        re = fit.ranef[factor]
        assert list(re.index.astype(str)) == [r["level"] for r in rec["levels"]]
        # R: ranef(fit)[[factor]]
        np.testing.assert_allclose(re.to_numpy(), modes, rtol=1e-3,
                                   atol=1e-3 * np.abs(modes).max(), err_msg=factor)
        # R: attr(ranef(fit, condVar = TRUE)[[factor]], "postVar")
        post = np.transpose(re.attrs["postVar"], (2, 0, 1))
        np.testing.assert_allclose(post, condvar, rtol=1e-3,
                                   atol=1e-3 * np.abs(condvar).max(), err_msg=factor)


def test_network_training_on_minibatches_of_a_split_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Training a network with crossed factors evaluates the joint block on minibatches of
    rows (``Problem.subset``): each subset keeps the split and builds its own index maps;
    the linear refit after training is the full-data objective with the same split."""
    from ngmm_formula import Control

    monkeypatch.setattr(model, "DENSE_JOINT_MAX_DIM", 0)
    rng = np.random.default_rng(0)
    n_id, n_item = 30, 12
    df = pd.DataFrame([(i, j) for i in range(n_id) for j in range(n_item)],
                      columns=["id", "item"])
    df["x"] = rng.uniform(-2, 2, len(df))
    eta = (np.sin(2 * df["x"]) + rng.normal(0, 1, n_id)[df["id"]]
           + rng.normal(0, 0.5, n_item)[df["item"]])
    df["y"] = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    df["id"] = df["id"].astype(str)
    df["item"] = df["item"].astype(str)
    fit = ngmm("y ~ nn(x, hidden=(8,)) + (1 | id) + (1 | item)", df, "binomial",
               control=Control(epochs=5, progress=False, batch_size=100))
    assert fit.approximation.joint
    assert np.isfinite(fit.loglik)
    assert fit.ranef["id"].shape == (n_id, 1)
    post = fit.ranef["item"].attrs["postVar"]
    assert post.shape == (1, 1, n_item) and np.all(post > 0)
