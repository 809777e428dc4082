"""Models with nn() terms: training, reproducibility, prediction, the truncated rule's error
bound with a trained network in the predictor, and bad input.

Small data and few epochs keep these fast; the statistical performance of the NGMM against
GLMMs, GPBoost and the oracle is measured by the vignettes (``vignettes/``), not here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.stats
import torch

from ngmm_formula import Control, DataError, FormulaError, NGMMError, get_family, ngmm
from ngmm_formula.api import _module, prepare
from ngmm_formula.approx.factor import DenseFactor
from ngmm_formula.datasets import simulate_grouped
from ngmm_formula.fit import Objective

QUICK = Control(epochs=25, patience=5, progress=False)


@pytest.fixture(scope="module")
def binary() -> pd.DataFrame:
    return simulate_grouped(n_groups=60, n_per_group=15, family="binomial", effect="sine",
                            seed=3)


@pytest.fixture(scope="module")
def binary_fit(binary: pd.DataFrame):  # type: ignore[no-untyped-def]
    return ngmm("y ~ nn(x1, x2, hidden=(16, 16)) + x3 + (1 | g)", binary, "binomial",
                control=QUICK, seed=1)


def test_fit_has_networks_and_counts_their_weights(binary_fit) -> None:  # type: ignore[no-untyped-def]
    (term,) = binary_fit.nn_terms
    assert term["label"] == "nn(x1, x2)"
    # 2 -> 16 -> 16 -> 1 without output bias: 2*16 + 16 + 16*16 + 16 + 16 = 336
    assert term["n_weights"] == 336
    assert binary_fit.npar == 2 + 1 + 336
    assert 0 < term["variance_share"] < 1
    assert binary_fit.history.best_epoch >= 1
    text = str(binary_fit.summary())
    assert "Neural terms" in text and "nn(x1, x2)" in text


def test_network_is_centred_on_training_data(binary_fit, binary) -> None:  # type: ignore[no-untyped-def]
    nets = binary_fit._net_outputs(tuple(ni.X for ni in binary_fit.design.nets))
    assert abs(float(np.mean(nets[0]))) < 1e-10


_REPRO = """
import warnings; warnings.simplefilter("ignore")
from ngmm_formula import Control, ngmm
from ngmm_formula.datasets import simulate_grouped
df = simulate_grouped(n_groups=40, n_per_group=10, family="binomial", effect="sine", seed=3)
fit = ngmm("y ~ nn(x1, x2, hidden=(8, 8)) + x3 + (1 | g)", df, "binomial",
           control=Control(epochs=10, patience=5, progress=False), seed={seed})
print(*map(repr, fit.history.train), *map(repr, fit.history.validation))
print(repr(fit.loglik), *map(repr, fit.fixef.to_numpy()), *map(repr, fit.theta.to_numpy()),
      *map(repr, fit.fitted[:20]))
"""


def _run_fit(seed: int) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REPRO.format(seed=seed)], check=True,
                         capture_output=True, text=True)
    return out.stdout


def _numbers(line: str) -> np.ndarray:
    return np.array([float(v.split("(")[-1].rstrip(")")) for v in line.split()])


def test_same_seed_same_fit_across_runs() -> None:
    """Two runs of the same script with the same seed give the same training curve and the
    same estimates to 1e-12 relative; another seed gives another fit.

    Not bit for bit: LAPACK/BLAS kernels (torch's least squares in the GLM start, scipy's
    L-BFGS-B, numpy's solves) round the last bit depending on memory alignment, which differs
    between runs; measured differences are a few ulp (about 1e-16 relative).
    """
    first, second = _run_fit(1).splitlines(), _run_fit(1).splitlines()
    for a, b in zip(first, second):
        np.testing.assert_allclose(_numbers(a), _numbers(b), rtol=1e-12, atol=1e-14)
    assert not np.allclose(_numbers(_run_fit(2).splitlines()[0])[:3], _numbers(first[0])[:3])


def test_same_seed_same_fit_in_one_process(binary: pd.DataFrame, binary_fit) -> None:  # type: ignore[no-untyped-def]
    """Within one process the torch computations are identical; numpy's reductions on the
    reporting side may round the last bit differently with memory alignment, hence 1e-14."""
    again = ngmm("y ~ nn(x1, x2, hidden=(16, 16)) + x3 + (1 | g)", binary, "binomial",
                 control=QUICK, seed=1)
    assert again.loglik == binary_fit.loglik
    np.testing.assert_allclose(again.fixef.to_numpy(), binary_fit.fixef.to_numpy(),
                               rtol=1e-14, atol=1e-15)


def test_predict_new_data_uses_stored_standardisation(binary_fit, binary) -> None:  # type: ignore[no-untyped-def]
    # predicting the training rows as new data reproduces the fitted values
    np.testing.assert_allclose(binary_fit.predict(binary), binary_fit.fitted, rtol=1e-10)
    new = binary.iloc[:5].copy()
    new["g"] = "unseen"
    pop = binary_fit.predict(binary.iloc[:5], re_form="~0")
    np.testing.assert_allclose(binary_fit.predict(new), pop, rtol=1e-10)
    with pytest.raises(DataError, match="x2"):
        binary_fit.predict(binary.drop(columns="x2"))


def test_partial_dependence(binary_fit) -> None:  # type: ignore[no-untyped-def]
    pdp = binary_fit.partial_dependence("nn(x1, x2)", "x1", grid=11)
    assert list(pdp.columns) == ["x1", "effect"] and len(pdp) == 11
    assert np.isfinite(pdp["effect"]).all()
    with pytest.raises(NGMMError):
        binary_fit.partial_dependence(0, "x3")


@pytest.mark.parametrize(
    ("family", "approx", "kw"),
    [
        ("gaussian", "auto", {}),
        ("poisson", "laplace", {}),
        ("poisson", "agq", {"nagq": 5}),
        ("binomial", "truncated", {"truncation": 4.0, "points": 15}),
        (get_family("gamma", "log"), "laplace", {}),
        ("negative_binomial", "laplace", {}),
    ],
    ids=["gaussian-exact", "poisson-laplace", "poisson-agq", "binomial-truncated",
         "gamma-log", "nb2"],
)
def test_every_family_and_approximation_trains(family, approx, kw) -> None:  # type: ignore[no-untyped-def]
    fam_name = family if isinstance(family, str) else family.name
    sim_family = {"gamma": "poisson", "negative_binomial": "poisson"}.get(fam_name, fam_name)
    df = simulate_grouped(n_groups=30, n_per_group=10, family=sim_family, effect="sine",
                          seed=5)
    if fam_name == "gamma":
        df["y"] = df["y"] + 0.5
    fit = ngmm("y ~ nn(x1, hidden=(8,)) + x3 + (1 | g)", df, family, approx=approx,
               control=Control(epochs=5, progress=False), **kw)
    assert np.isfinite(fit.loglik)
    assert np.isfinite(fit.predict(df.iloc[:3])).all()


def test_crossed_random_effects_with_network() -> None:
    rng = np.random.default_rng(0)
    n_id, n_item = 30, 12
    df = pd.DataFrame([(i, j) for i in range(n_id) for j in range(n_item)], columns=["id", "item"])
    df["x"] = rng.uniform(-2, 2, len(df))
    eta = np.sin(2 * df["x"]) + rng.normal(0, 1, n_id)[df["id"]] + rng.normal(0, 0.5, n_item)[
        df["item"]]
    df["y"] = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    df["id"] = df["id"].astype(str)
    df["item"] = df["item"].astype(str)
    fit = ngmm("y ~ nn(x, hidden=(8,)) + (1 | id) + (1 | item)", df, "binomial",
               control=Control(epochs=5, progress=False))
    assert fit.approximation.joint
    assert set(fit.ranef) == {"id", "item"}


def _exact_group_logliks(fit, data: pd.DataFrame, groups: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """log of int prod_i p(y_i | eta0_i + b) N(b; 0, s^2) db by scipy.integrate.quad."""
    eta0 = fit.predict(data, type="link", re_form="~0")
    sd = float(fit.varcorr.sdcor.iloc[0])
    out = []
    for g in groups:
        rows = (data["g"] == g).to_numpy()
        y, e = data["y"].to_numpy()[rows], eta0[rows]
        # integrate in b with the integrand scaled by its value at the mode (for accuracy)
        def logf(b: float, y: np.ndarray = y, e: np.ndarray = e) -> float:
            return float(scipy.stats.binom.logpmf(y, 1, 1 / (1 + np.exp(-(e + b)))).sum()
                         + scipy.stats.norm.logpdf(b, scale=sd))
        grid = np.linspace(-8 * sd, 8 * sd, 2001)
        peak = max(logf(b) for b in grid)
        val, _ = scipy.integrate.quad(lambda b, p=peak, f=logf: np.exp(f(b) - p), -12 * sd,
                                      12 * sd, epsabs=0, epsrel=1e-13, limit=400)
        out.append(np.log(val) + peak)
    return np.array(out)


def test_truncated_rule_error_bound_with_a_trained_network(binary_fit, binary) -> None:  # type: ignore[no-untyped-def]
    """The truncated rule on the groups of a trained NGMM: its error against scipy quadrature
    falls at least as fast as the Gaussian-tail bound of ``rules.truncation_bound`` (mass
    outside [-M, M] of a log-concave integrand with mode curvature H: 2 sqrt(2 pi H)
    Phi(-M / sqrt(H))) as M grows; the grid error is made negligible with K = 40 M points."""
    from ngmm_formula.approx.rules import truncation_bound

    groups = list(binary["g"].cat.categories[:4])
    data = binary[binary["g"].isin(groups)].copy()
    data["g"] = data["g"].cat.remove_unused_categories()
    exact = _exact_group_logliks(binary_fit, data, groups)
    data["eta0"] = binary_fit.predict(data, type="link", re_form="~0")
    sd = float(binary_fit.varcorr.sdcor.iloc[0])
    errors, curvature = [], 1.0
    Ms = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    for M in Ms:
        prep = prepare("y ~ 0 + offset(eta0) + (1 | g)", data, "binomial", approx="truncated",
                       truncation=M, points=int(40 * M) + 1)
        module = _module(prep)
        with torch.no_grad():
            module.theta.fill_(sd)
            obj = Objective(prep.problem, prep.family, prep.approximation, module)
            approx = obj.per_block().numpy()
        assert obj.mode is not None
        assert isinstance(obj.mode.factor, DenseFactor)
        curvature = float((obj.mode.factor.chol[:, 0, 0] ** 2).max())  # H at each group's mode
        errors.append(np.max(np.abs(approx - exact)))
    errors_a = np.array(errors)
    bounds = np.array([truncation_bound(M, curvature) for M in Ms])
    assert np.all(np.diff(errors_a) < 0), errors
    # error <= C * bound for every M, with C fixed by M = 1: the Gaussian-tail rate holds
    C = errors_a[0] / bounds[0]
    assert np.all(errors_a <= 1.05 * C * bounds + 1e-12), (errors, bounds)
    assert errors_a[-1] < 1e-6


def test_bad_input() -> None:
    df = simulate_grouped(n_groups=20, n_per_group=5, family="gaussian", effect="sine", seed=0)
    with_na = df.copy()
    with_na.loc[3, "x1"] = np.nan
    with pytest.raises(DataError, match="nn\\(x1, x2\\).*'x1'.*1 missing"):
        ngmm("y ~ nn(x1, x2) + (1 | g)", with_na, control=QUICK)
    lost = df.copy()
    lost.loc[lost["g"] == lost["g"].iloc[0], "x3"] = np.nan
    with pytest.raises(DataError, match="no rows left"):
        ngmm("y ~ nn(x1) + x3 + (1 | g)", lost, control=QUICK)
    with pytest.raises(FormulaError, match="positive integers"):
        ngmm("y ~ nn(x1, hidden=(16, -2)) + (1 | g)", df, control=QUICK)
    with pytest.raises(FormulaError, match="positive integers"):
        ngmm("y ~ nn(x1, hidden=(16.5,)) + (1 | g)", df, control=QUICK)
    with pytest.raises(NGMMError, match="reml"):
        ngmm("y ~ nn(x1) + (1 | g)", df, reml=True, control=QUICK)
    with pytest.raises(NGMMError, match="lr"):
        Control(lr=-1.0)
