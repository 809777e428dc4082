"""benchmarks/neural/real.py: its scoring has the known answers, its tables add up, and its
quick mode runs end to end.

Known answers: a held-out group's score is its marginal likelihood with the random effects
integrated out, so scoring a fitted GLMM's own training data as "new groups" must give back
the fit's log-likelihood (exactly for a Gaussian response, to quadrature accuracy for a
binomial one fitted by Gauss--Hermite); scoring it as "known groups" must give the
conditional log-density at the fitted linear predictor, random intercept and slope
included.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import ngmm
from ngmm_formula.datasets import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("benchmarks_neural_real",
                                                  ROOT / "benchmarks/neural/real.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fit(formula: str, data: pd.DataFrame, family: str, **kw):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ngmm(formula, data, family, **kw)


@pytest.mark.parametrize("formula, slope_of", [
    ("Reaction ~ Days + (Days | Subject)", "Days"),   # exact normal, intercept and slope
    ("Reaction ~ Days + (1 | Subject)", None),         # Gauss-Hermite (exact for a normal)
])
def test_new_group_score_of_the_training_data_is_the_ml_loglik(real, formula: str,
                                                               slope_of: str | None) -> None:
    C = real.C
    d = load("sleepstudy")
    fit = _fit(formula, d, "gaussian", reml=False)
    est = C.ngmm_estimates(fit, "Subject", slope_of)
    y = d["Reaction"].to_numpy(float)
    s = C.score("gaussian", est, d, y, "Subject", known=False)
    # R: logLik(lmer(formula, sleepstudy, REML = FALSE)); the same integral in closed form,
    # so agreement to rounding (1e-8 relative; the fit's own value is what is compared)
    assert s["loglik"] * len(y) == pytest.approx(fit.loglik, rel=1e-8)


def test_new_group_score_of_a_binomial_glmm_is_its_agq_loglik(real) -> None:
    C = real.C
    d = load("Contraception")
    fit = _fit("use ~ age + livch + urban + (1 | district)", d, "binomial", approx="agq",
               nagq=25)
    est = C.ngmm_estimates(fit, "district")
    y = (d["use"].astype(str) == "Y").to_numpy(float)
    s = C.score("binomial", est, d, y, "district", known=False)
    # 25-node adaptive Gauss-Hermite (the fit) against 30 nodes (the score): both converged
    # far below 1e-6 for 60 districts of about 30 Bernoulli rows
    assert s["loglik"] * len(y) == pytest.approx(fit.loglik, abs=1e-5)


def test_known_group_score_is_the_conditional_density(real) -> None:
    C = real.C
    d = load("sleepstudy")
    fit = _fit("Reaction ~ Days + (Days | Subject)", d, "gaussian", reml=False)
    est = C.ngmm_estimates(fit, "Subject", "Days")
    y = d["Reaction"].to_numpy(float)
    s = C.score("gaussian", est, d, y, "Subject", known=True)
    eta = np.asarray(fit.predict(d, type="link"))  # fixed + intercept + slope x Days
    expected = C.log_density("gaussian", y, eta, fit.sigma).mean()
    assert s["loglik"] == pytest.approx(expected, rel=1e-10)


def test_tables_pool_and_pair_over_folds(real) -> None:
    # two folds of 10 and 30 rows; NGMM beats the GLMM by 1.0 and 0.5 per row, loses to
    # GPBoost by 0.2 per row in both
    rows = []
    for fold, n in ((0, 10), (1, 30)):
        for method, ll in (("glmm", -2.0), ("ngmm", -1.0 if fold == 0 else -1.5),
                           ("gpboost", -0.8 if fold == 0 else -1.3)):
            rows.append({"data": "toy", "scheme": "within groups", "fold": fold,
                         "method": method, "n": n, "ll_sum": ll * n, "seconds": 1.0})
    cells = real.cell_table(pd.DataFrame(rows))
    c = cells.iloc[0]
    assert c.n == 40
    assert c.glmm == pytest.approx(-2.0)
    assert c.ngmm == pytest.approx((-10 - 45) / 40)
    assert c["ngmm-glmm"] == pytest.approx((10 + 15) / 40)
    assert c.se_glmm == pytest.approx(np.std([1.0, 0.5], ddof=1) / np.sqrt(2))
    assert c.pct_vs_glmm == pytest.approx(100 * (25 / 40) / 2.0)
    assert c["ngmm-gpboost"] == pytest.approx(-0.2)
    assert c.se_gpboost == pytest.approx(0.0, abs=1e-12)
    t = real.targets(cells).set_index("target").met
    assert t.iloc[0] and not t.iloc[1] and not t.iloc[2]


def test_quick_run_writes_its_tables(real, tmp_path: Path) -> None:
    runs = real.main(["--quick", "--output", str(tmp_path), "--tag", "t",
                      "--control", '{"epochs": 5}'])
    # gpboost and lightgbm are optional (the "vignettes" extra): the benchmark skips a
    # method whose package does not import, so the expected set follows what is installed
    methods = {"ngmm", "glmm", "mlp"} | {m for m in ("gpboost", "lightgbm")
                                         if real.available(m)}
    assert set(runs.method) == methods
    assert len(runs) == 2 * 2 * len(methods)  # 2 schemes x 2 folds
    assert np.isfinite(runs.ll_sum).all() and (runs.n.groupby(
        [runs.scheme, runs.method]).sum() == 180).all()
    text = (tmp_path / "t.md").read_text()
    assert "## Targets" in text and "sleepstudy" in text
    again = real.main(["--from-csv", str(tmp_path / "t.csv")])
    pd.testing.assert_frame_equal(real.cell_table(again), real.cell_table(runs))
