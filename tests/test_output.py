"""What a user sees: the short reprs of result objects, the progress bar's end on early
stopping, and the summary of a (small) neural fit within 80 columns."""

from __future__ import annotations

import re
from functools import cache

import pytest

from ngmm_formula import Control, anova, ngmm
from ngmm_formula.datasets import load, simulate_grouped
from ngmm_formula.results import NGMMResult

FORMULA = "y ~ nn(x1, x2, hidden=(8,)) + x3 + (1 | g)"


def _neural(**control: object) -> NGMMResult:
    data = simulate_grouped(20, 10, "binomial", seed=0)
    return ngmm(FORMULA, data, "binomial", control=Control(**control), seed=0)  # type: ignore[arg-type]


@cache
def neural_fit() -> NGMMResult:
    return _neural(progress=False, epochs=5)


def _last_bar(err: str) -> str:
    return [s for s in re.split(r"[\r\n]", err) if s.strip()][-1]


def test_progress_bar_ends_at_100_percent_on_early_stopping(
        capsys: pytest.CaptureFixture[str]) -> None:
    fit = _neural(progress=True, epochs=200, patience=2, min_steps=1, folds=1)
    h = fit.history
    assert h.stopped_early and h.epochs < 200
    last = _last_bar(capsys.readouterr().err)
    assert "100%" in last and f" {h.epochs}/{h.epochs} " in last, last
    assert f"early stopping at epoch {h.epochs} (best {h.best_epoch})" in last


def test_progress_bars_of_the_folds(capsys: pytest.CaptureFixture[str]) -> None:
    """The default on little data trains five folds, then one network on all groups: a bar
    for each, named, each ending at 100 % (the last at the epochs the folds chose)."""
    fit = _neural(progress=True, epochs=200, patience=2, min_steps=1)
    h = fit.history
    bars = [s for s in re.split(r"[\r\n]", capsys.readouterr().err) if s.strip()]
    for k in range(1, 6):
        ends = [b for b in bars if b.startswith(f"ngmm fold {k}/5:")]
        assert ends and "100%" in ends[-1], bars
    last = _last_bar("\n".join(bars))
    assert last.startswith("ngmm, all groups:") and "100%" in last, last
    assert f" {h.best_epoch}/{h.best_epoch} " in last, last


def test_progress_bar_without_early_stopping(capsys: pytest.CaptureFixture[str]) -> None:
    _neural(progress=True, epochs=3, min_steps=1000, folds=1)
    last = _last_bar(capsys.readouterr().err)
    assert "100%" in last and " 3/3 " in last and "early stopping" not in last


def test_training_history_repr_is_short() -> None:
    h = _neural(progress=False, epochs=200, patience=2, min_steps=1, folds=1).history
    text = repr(h)
    assert len(text) < 300, text
    assert text.startswith(f"<TrainingHistory: {h.epochs} epochs, stopped early, best epoch "
                           f"{h.best_epoch}, validation {h.best_score:.4f}/obs at best")
    assert h.best_score == h.validation[h.best_epoch - 1]
    assert len(h.train) == h.epochs  # the curves are still there


def test_neural_summary_counts_weights_apart_and_fits_80_columns() -> None:
    fit = neural_fit()
    text = str(fit.summary())
    stat = fit.npar - fit.n_weights
    assert fit.n_weights == sum(t["n_weights"] for t in fit.nn_terms) > 0
    assert fit.df_resid == fit.nobs - stat > 0
    assert (f"npar = {stat} + {fit.n_weights:,} network weights: AIC, BIC count all; "
            f"df.resid = nobs - {stat}") in text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    i = text.splitlines().index("Neural terms:")
    header, row = text.splitlines()[i + 1:i + 3]
    assert header.split() == ["Term", "Architecture", "Weights", "Var", "share"]
    # the default on 200 rows: the average of 5 fold networks and one on all groups
    per_network = fit.n_weights // 6
    assert re.match(r" nn\(x1, x2\) 2 -> 8 -> 1 \(relu\) \+ linear \+ additive 2x32 +"
                    rf"6 x {per_network:,} ", row), row
    assert "Weights k x n: the term averages k networks of n weights each" in text


def test_user_facing_reprs_are_compact() -> None:
    sleep = load("sleepstudy")
    m1 = ngmm("Reaction ~ Days + (Days | Subject)", sleep, reml=False)
    m0 = ngmm("Reaction ~ Days + (1 | Subject)", sleep, reml=False)
    fit = neural_fit()
    for obj in (m1, fit, fit.history, m1.design, fit.design, Control(), m1.diagnostics,
                anova(m0=m0, m1=m1)):
        assert len(repr(obj)) < 1000, (type(obj).__name__, len(repr(obj)))
