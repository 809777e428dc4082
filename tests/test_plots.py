"""Diagnostic plots (:mod:`ngmm_formula.plots`): structure of each figure and PNG output.

Each plot is checked for the number of axes and of plotted points (which identify what was
drawn), then written to a PNG. No figure may be registered with pyplot (the functions build
``Figure`` objects directly and never show them).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ngmm_formula import Control, ngmm  # noqa: E402
from ngmm_formula.datasets import load, simulate_grouped  # noqa: E402
from ngmm_formula.errors import NGMMError  # noqa: E402
from ngmm_formula.plots import (  # noqa: E402
    caterpillar,
    partial_dependence,
    residuals_vs_fitted,
    training_curve,
)
from ngmm_formula.results import NGMMResult  # noqa: E402


def _quiet_fit(*args: Any, **kwargs: Any) -> NGMMResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ngmm(*args, **kwargs)


@pytest.fixture(scope="module")
def sleep_fit() -> NGMMResult:
    # lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
    return _quiet_fit("Reaction ~ Days + (Days | Subject)", load("sleepstudy"))


@pytest.fixture(scope="module")
def crossed_fit() -> NGMMResult:
    # lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin)
    return _quiet_fit("diameter ~ 1 + (1 | plate) + (1 | sample)", load("Penicillin"))


@pytest.fixture(scope="module")
def neural() -> tuple[NGMMResult, pd.DataFrame]:
    df = simulate_grouped(n_groups=30, n_per_group=8, family="binomial", effect="sine", seed=3)
    df["kind"] = np.where(df["x2"] > 0, "high", "low")
    fit = _quiet_fit("y ~ nn(x1, kind, hidden=(8,)) + x3 + (1 | g)", df, "binomial",
                     control=Control(epochs=6, patience=3, progress=False), seed=1)
    return fit, df


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=60)
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_pyplot_figures() -> Any:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def test_caterpillar_one_panel_per_column(sleep_fit: NGMMResult, tmp_path: Path) -> None:
    fig = caterpillar(sleep_fit)
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["(Intercept)", "Days"]
    re = sleep_fit.ranef["Subject"]
    order = np.argsort(re["(Intercept)"].to_numpy(), kind="stable")
    for ax, col in zip(axes, re.columns):
        points = ax.lines[0]  # the conditional modes, sorted by the first column's
        np.testing.assert_allclose(np.asarray(points.get_xdata()), re[col].to_numpy()[order])
        np.testing.assert_array_equal(np.asarray(points.get_ydata()), np.arange(18))
        # +-1.96 conditional SD bars: one segment per level
        (bars,) = ax.collections
        assert isinstance(bars, LineCollection)
        segs = bars.get_segments()
        assert len(segs) == 18
        c = list(re.columns).index(col)
        sd = np.sqrt(re.attrs["postVar"][c, c, order])
        np.testing.assert_allclose([s[1, 0] - s[0, 0] for s in segs], 2 * 1.959963984540054 * sd)
    assert [t.get_text() for t in axes[0].get_yticklabels()] == [str(v) for v in
                                                                 re.index[order]]
    _save(fig, tmp_path / "caterpillar.png")


def test_caterpillar_groups(crossed_fit: NGMMResult, tmp_path: Path) -> None:
    fig = caterpillar(crossed_fit)
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["plate", "sample"]
    assert [len(ax.lines[0].get_xdata()) for ax in axes] == [24, 6]
    _save(fig, tmp_path / "caterpillar_crossed.png")
    one = caterpillar(crossed_fit, group="sample")
    assert len(one.get_axes()) == 1 and len(one.get_axes()[0].lines[0].get_xdata()) == 6
    with pytest.raises(NGMMError, match="group must be one of"):
        caterpillar(crossed_fit, group="Sample")


def test_residuals_vs_fitted(sleep_fit: NGMMResult, tmp_path: Path) -> None:
    fig = residuals_vs_fitted(sleep_fit)
    (ax,) = fig.get_axes()
    pts = ax.collections[0].get_offsets()
    assert pts.shape == (180, 2)
    np.testing.assert_allclose(pts[:, 0], sleep_fit.fitted)
    np.testing.assert_allclose(pts[:, 1], sleep_fit.residuals("pearson"))
    assert any(line.get_label() == "lowess" for line in ax.lines)
    _save(fig, tmp_path / "resid.png")
    plain = residuals_vs_fitted(sleep_fit, "deviance", smooth=False)
    assert not any(line.get_label() == "lowess" for line in plain.get_axes()[0].lines)


def test_training_curve(neural: tuple[NGMMResult, pd.DataFrame], sleep_fit: NGMMResult,
                        tmp_path: Path) -> None:
    fit, _ = neural
    h = fit.history
    fig = training_curve(fit)
    (ax,) = fig.get_axes()
    curves = {line.get_label().split(" ")[0]: line for line in ax.lines}
    np.testing.assert_allclose(curves["training"].get_ydata(), h.train)
    np.testing.assert_allclose(curves["validation"].get_ydata(), h.validation)
    np.testing.assert_array_equal(curves["best"].get_xdata(), [h.best_epoch])
    _save(fig, tmp_path / "training.png")
    with pytest.raises(NGMMError, match="nn\\(\\) terms"):
        training_curve(sleep_fit)


def test_partial_dependence_with_rug(neural: tuple[NGMMResult, pd.DataFrame],
                                     tmp_path: Path) -> None:
    fit, df = neural
    fig = partial_dependence(fit, "nn(x1, kind)", "x1", grid=30)
    (ax,) = fig.get_axes()
    curve, rug = ax.lines
    pdp = fit.partial_dependence(0, "x1", 30)
    np.testing.assert_allclose(curve.get_xdata(), pdp["x1"].to_numpy(dtype=float))
    np.testing.assert_allclose(curve.get_ydata(), pdp["effect"].to_numpy())
    np.testing.assert_allclose(np.sort(rug.get_xdata()), np.sort(df["x1"].to_numpy()))
    _save(fig, tmp_path / "pdp.png")
    factor = partial_dependence(fit, 0, "kind")
    (fax,) = factor.get_axes()
    assert len(fax.lines[0].get_xdata()) == 2
    assert sorted(t.get_text() for t in fax.get_xticklabels()) == ["high", "low"]
    _save(factor, tmp_path / "pdp_factor.png")
    with pytest.raises(NGMMError):
        partial_dependence(fit, 0, "x3")
