"""Models with nn() terms: training, reproducibility, prediction, the truncated rule's error
bound with a trained network in the predictor, and bad input.

Small data and few epochs keep these fast; the statistical performance of the NGMM against
GLMMs, GPBoost and the oracle is measured by the vignettes (``vignettes/``), not here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.stats
import torch

from ngmm_formula import Control, DataError, FormulaError, NGMMError, get_family, load, ngmm, train
from ngmm_formula.api import _module, prepare
from ngmm_formula.approx.factor import DenseFactor
from ngmm_formula.datasets import simulate_grouped
from ngmm_formula.fit import Objective
from ngmm_formula.model import lstsq_fixed_order, matvec
from ngmm_formula.networks import MLP, Ensemble

QUICK = Control(epochs=25, patience=5, progress=False, ensemble=2)


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
    # 2 -> 16 -> 16 -> 1 without output bias: 2*16 + 16 + 16*16 + 16 + 16 = 336, plus the
    # linear path's 2 and the additive part's 2 inputs x 32 units x 3, twice (an ensemble of
    # two networks)
    assert term["n_weights"] == 2 * (338 + 192)
    assert term["architecture"] == "2 -> 16 -> 16 -> 1 (relu) + linear + additive 2x32"
    assert term["networks"] == 2
    assert binary_fit.npar == 2 + 1 + 2 * (338 + 192)
    assert 0 < term["variance_share"] < 1
    assert binary_fit.history.best_epoch >= 1
    text = str(binary_fit.summary())
    assert "Neural terms" in text and "nn(x1, x2)" in text


def test_network_is_centred_on_training_data(binary_fit, binary) -> None:  # type: ignore[no-untyped-def]
    nets = binary_fit._net_outputs(tuple(ni.X for ni in binary_fit.design.nets))
    assert abs(float(np.mean(nets[0]))) < 1e-10


_REPRO = """
import sys, warnings; warnings.simplefilter("ignore")
import numpy as np
pad = [np.empty(k) for k in range(int(sys.argv[1]))]  # a different heap layout per process
from ngmm_formula import Control, ngmm
from ngmm_formula.datasets import simulate_grouped
df = simulate_grouped(n_groups=40, n_per_group=10, family="{family}", effect="sine", seed=3)
rng = np.random.default_rng(0)
for k in range(4, 8):  # enough fixed-effect columns for MKL's alignment-dependent dgemv
    df[f"x{{k}}"] = rng.normal(size=len(df))
fit = ngmm("y ~ nn(x1, x2, hidden=(8, 8)) + x3 + x4 + x5 + x6 + x7 + (1 | g)", df,
           "{family}", control=Control(epochs=10, patience=5, progress=False, ensemble=2),
           seed={seed})
curves = [c for h in fit.history.members for c in (h.train, h.validation)]
print(*[v.hex() for c in curves for v in c])
print(fit.loglik.hex(), *[v.hex() for v in fit.fixef.to_numpy()],
      *[v.hex() for v in fit.theta.to_numpy()], *[v.hex() for v in fit.fitted])
"""


def _run_fit(seed: int, pad: int = 0, family: str = "binomial") -> list[str]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REPRO.format(seed=seed, family=family),
                          str(pad)],
                         check=True, capture_output=True, text=True)
    return out.stdout.splitlines()


def test_same_seed_same_fit_across_runs() -> None:
    """Two processes (with different heap layouts) fitting with the same seed give the same
    training curves (of both networks of an ensemble), log-likelihood, fixed effects, theta
    and fitted values bit for bit; another seed gives another fit.

    Before the fit path avoided them, MKL's alignment-dependent kernels (``dgemv`` for
    ``X beta`` with 5 or more columns, ``gels`` in the GLM start) made 2 of 12 runs of the
    same script differ in the last bits (measured with hashes of every stage's values).
    """
    first, second = _run_fit(1, pad=0), _run_fit(1, pad=7)
    assert first == second
    assert _run_fit(2)[0].split()[:3] != first[0].split()[:3]


def test_same_seed_same_gaussian_fit_across_runs() -> None:
    """The same for a Gaussian NGMM, whose final refit goes through lmer's profiled objective
    (approx/profiled.py): its cross-products and least-squares start used BLAS's gemm and
    LAPACK's gels, and 3 of 6 processes (pads 7, 11, 5) gave other last bits than pads 0, 3, 1
    before they were replaced by the fixed-order kernels."""
    assert _run_fit(1, pad=0, family="gaussian") == _run_fit(1, pad=7, family="gaussian")


def test_fixed_order_kernels_ignore_alignment() -> None:
    """``matvec`` (torch, with its gradient) and ``lstsq_fixed_order`` give the same bits for
    copies of their inputs starting at every 8-byte offset within a 64-byte line, and agree
    with ``@`` and LAPACK's least squares to rounding."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 7, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen)
    y = torch.randn(3000, dtype=torch.float64, generator=gen)

    def at_offset(t: torch.Tensor, k: int) -> torch.Tensor:
        buf = torch.empty(t.numel() + 8, dtype=t.dtype)
        v = buf[k:k + t.numel()].view(t.shape)
        v.copy_(t)
        return v

    def kernels(X: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        bb = b.clone().requires_grad_(True)
        eta = matvec(X, bb)
        (grad,) = torch.autograd.grad((eta * y).sum(), bb)
        return [eta.detach(), grad, lstsq_fixed_order(X, y)]

    ref = kernels(X, b, y)
    for k in range(1, 8):
        out = kernels(at_offset(X, k), at_offset(b, k), at_offset(y, k))
        assert all(torch.equal(r, o) for r, o in zip(ref, out)), k
    torch.testing.assert_close(ref[0], X @ b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ref[1], X.T @ y, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(ref[2], torch.linalg.lstsq(X, y.unsqueeze(-1)).solution[:, 0],
                               rtol=1e-10, atol=1e-14)


def test_lstsq_fixed_order_rank_deficient() -> None:
    """A column equal to a multiple of another gets coefficient 0; the fitted values are the
    least-squares projection (equal to LAPACK's minimum-norm solution's)."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(200, 3, dtype=torch.float64, generator=gen)
    X = torch.cat([X, 2 * X[:, :1]], dim=1)
    y = torch.randn(200, dtype=torch.float64, generator=gen)
    beta = lstsq_fixed_order(X, y)
    assert beta[3] == 0
    lapack = torch.linalg.lstsq(X, y.unsqueeze(-1), driver="gelsd").solution[:, 0]
    torch.testing.assert_close(X @ beta, X @ lapack, rtol=1e-10, atol=1e-12)


def test_ensemble_averages_its_members(binary_fit, binary) -> None:  # type: ignore[no-untyped-def]
    """``Control(ensemble=2)``: each nn() term is the centred average of two networks that
    were trained on different validation splits from different initial weights."""
    (net,) = binary_fit.nets
    assert isinstance(net, Ensemble) and len(net.members) == 2
    a, b = net.members
    assert all(isinstance(m, MLP) for m in (a, b))
    assert not torch.equal(a.body[0].weight, b.body[0].weight)
    x = torch.tensor(binary_fit.design.nets[0].X)  # a copy: result arrays are read-only
    with torch.no_grad():  # the same operations in the same order, one process: equal
        np.testing.assert_allclose(net(x).numpy(), ((a(x) + b(x)) / 2 - net.centre_value)
                                   .numpy(), rtol=0, atol=1e-15)
    h = binary_fit.history
    assert len(h.members) == 2 and h.members[0].train == h.train
    assert h.members[0].validation != h.members[1].validation
    single = ngmm("y ~ nn(x1, x2, hidden=(16, 16)) + x3 + (1 | g)", binary, "binomial",
                  control=Control(epochs=3, progress=False, ensemble=1, folds=1), seed=1)
    assert isinstance(single.nets[0], MLP) and single.history.members == ()


def test_same_seed_same_fit_in_one_process(binary: pd.DataFrame, binary_fit) -> None:  # type: ignore[no-untyped-def]
    again = ngmm("y ~ nn(x1, x2, hidden=(16, 16)) + x3 + (1 | g)", binary, "binomial",
                 control=QUICK, seed=1)
    assert again.loglik == binary_fit.loglik
    np.testing.assert_array_equal(again.fixef.to_numpy(), binary_fit.fixef.to_numpy())
    np.testing.assert_array_equal(again.theta.to_numpy(), binary_fit.theta.to_numpy())
    assert again.history.members[1].train == binary_fit.history.members[1].train


FORMULA = "y ~ nn(x1, x2, hidden=(16, 16)) + x3 + (1 | g)"


def test_retrain_is_training_on_all_groups_for_the_selected_epochs() -> None:
    """``Control.retrain``: the network early-stopped on a validation split is discarded and
    one is trained from the same initial weights on all 60 groups for the selected number of
    epochs. On these data an epoch is a single minibatch (whose order does not matter) and the
    learning rate is constant up to the best epoch, so this equals a fit without validation
    for that many epochs, up to the conditional modes' warm starts (Newton tolerance 1e-7).
    Without input noise: the retraining draws its noise after the first run's, the direct
    fit from the start of the stream."""
    data = simulate_grouped(n_groups=60, n_per_group=40, family="binomial", effect="sine",
                            seed=3)
    ctl = Control(epochs=60, patience=30, min_steps=0, lr=0.03, progress=False, input_noise=0,
                  folds=1)
    # Without the additive part: at 10x the learning rate, Adam's normalised steps turn the
    # warm starts' 1e-7 differences in near-zero gradients into full-size steps, and the
    # two trainings drift apart (0.07 on a probability, measured); the schedule logic tested
    # here is the same with or without it.
    formula = FORMULA.replace("hidden=(16, 16)", "hidden=(16, 16), additive=0")
    fit = ngmm(formula, data, "binomial", control=replace(ctl, retrain=True), seed=1)
    plain = ngmm(formula, data, "binomial", control=ctl, seed=1)
    best = plain.history.best_epoch
    assert fit.history.best_epoch == best < 60 and fit.history.retrained_steps == best
    assert len(set(plain.history.lr[:best])) == 1
    assert fit.history.validation == plain.history.validation
    direct = ngmm(formula, data, "binomial",
                  control=replace(ctl, validation=0.0, epochs=best), seed=1)
    # Not bit for bit: the two fits warm-start the conditional modes differently (Newton
    # tolerance 1e-7 on u), and the float32 network (eps 1.2e-7) carries those differences
    # through `best` Adam steps; measured 1.6e-7 on the fitted probabilities, and 1.24e-6
    # relative on a probability near 0.13 on another machine. 2e-5 absolute on a
    # probability leaves a factor >100 for machines and is still 5x below the difference
    # from the early-stopped network asserted next.
    np.testing.assert_allclose(fit.fitted, direct.fitted, rtol=0, atol=2e-5)
    assert np.abs(fit.fitted - plain.fitted).max() > 1e-4  # not the early-stopped network


def test_folds_pool_validation_curves_then_retrain(binary) -> None:  # type: ignore[no-untyped-def]
    """``Control.folds = 3``: three networks with disjoint validation folds covering the 60
    groups; the number of epochs maximises their pooled (observation-weighted) validation
    curve; one network is then trained on all groups for that many epochs."""
    fit = ngmm(FORMULA, binary, "binomial",
               control=Control(epochs=25, patience=5, progress=False, folds=3), seed=1)
    h = fit.history
    assert len(h.members) == 3 and sum(m.n_validation_groups for m in h.members) == 60
    length = min(len(m.validation) for m in h.members)
    # every group has 15 observations, so the observation weights are the group counts
    w = np.array([m.n_validation_groups for m in h.members], dtype=float)[:, None]
    pooled = (w * np.array([m.validation[:length] for m in h.members])).sum(0) / w.sum()
    np.testing.assert_allclose(h.validation, pooled, rtol=1e-14)
    assert h.best_epoch == int(np.argmax(pooled)) + 1 == h.retrained_steps
    assert np.isfinite(fit.loglik)
    with pytest.raises(NGMMError, match="folds"):
        Control(folds=3, ensemble=2)


@pytest.mark.parametrize(("options", "rows", "distributed", "expected"), [
    ({}, 900, False, 5),                          # the default on little data: 5 folds
    ({}, train.AUTO_FOLDS_MAX_ROWS, False, 5),    # up to the limit
    ({}, train.AUTO_FOLDS_MAX_ROWS + 1, False, 1),  # above it: one split
    ({"folds": 1}, 900, False, 1),                # a number given is kept
    ({"folds": 3}, 10**6, False, 3),
    ({"ensemble": 3}, 900, False, 1),             # an ensemble has its own splits
    ({"validation": 0.0}, 900, False, 1),         # no early stopping
    ({}, 900, True, 1),                           # a distributed fit: one split
])
def test_folds_by_default_on_little_data(options: dict, rows: int, distributed: bool,
                                         expected: int) -> None:
    """``Control.folds = None`` (the default): ``train.AUTO_FOLDS`` folds of early stopping
    on at most ``train.AUTO_FOLDS_MAX_ROWS`` training rows, for one network in one process
    with a validation split; else one split; an explicit number is kept."""
    control = Control(progress=False, **options)
    assert train.folds_for(control, rows, distributed=distributed) == expected


def test_a_default_fit_of_little_data_trains_five_folds(binary) -> None:  # type: ignore[no-untyped-def]
    """The default Control on 900 rows trains 5 fold networks and one on all groups; with
    ``folds=1`` the same fit trains one network on 90 % of the groups."""
    quick = {"epochs": 12, "min_steps": 0, "patience": 3, "progress": False}
    fit = ngmm(FORMULA, binary, "binomial", control=Control(**quick), seed=1)
    assert len(fit.history.members) == train.AUTO_FOLDS
    assert sum(m.n_validation_groups for m in fit.history.members) == 60
    one = ngmm(FORMULA, binary, "binomial", control=Control(folds=1, **quick), seed=1)
    assert one.history.members == () and one.history.n_validation_groups == 6


def test_average_folds_averages_the_fold_networks_and_the_last(binary, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``Control.average_folds`` (the default): the fit's network is the centred average of
    the K fold networks and the network retrained on all groups; training is that of the fit
    without it (the same seed trains the same networks, so the last member equals that fit's
    network bit for bit), and the averaged fit saves and loads with its members. With one
    split there is nothing to average and the fit is the plain one."""
    quick = {"epochs": 12, "min_steps": 0, "patience": 3, "progress": False, "folds": 3}
    plain = ngmm(FORMULA, binary, "binomial", control=Control(average_folds=False, **quick),
                 seed=1)
    fit = ngmm(FORMULA, binary, "binomial", control=Control(**quick), seed=1)  # the default
    net = fit.nets[0]
    assert isinstance(net, Ensemble) and len(net.members) == 3 + 1
    assert fit.nn_terms[0]["networks"] == 4 and plain.nn_terms[0]["networks"] == 1
    assert fit.history.best_epoch == plain.history.best_epoch
    last = net.members[-1].state_dict()
    for name, value in plain.nets[0].state_dict().items():
        if name != "centre_value":  # each network is centred where it is used
            assert torch.equal(last[name], value), name
    assert not np.allclose(fit.fitted, plain.fitted)
    back = load(fit.save(tmp_path / "averaged.ngmm"))
    np.testing.assert_array_equal(back.predict(binary), fit.predict(binary))
    one = dict(quick, folds=1)
    np.testing.assert_array_equal(
        ngmm(FORMULA, binary, "binomial", control=Control(**one), seed=1).fitted,
        ngmm(FORMULA, binary, "binomial", control=Control(average_folds=False, **one),
             seed=1).fitted)


def test_predict_new_data_uses_stored_standardisation(binary_fit, binary) -> None:  # type: ignore[no-untyped-def]
    # predicting the training rows as new data reproduces the fitted values
    np.testing.assert_allclose(binary_fit.predict(binary), binary_fit.fitted, rtol=1e-10)
    new = binary.iloc[:5].copy()
    new["g"] = "unseen"
    pop = binary_fit.predict(binary.iloc[:5], re_form="~0")
    np.testing.assert_allclose(binary_fit.predict(new, allow_new_levels=True), pop,
                               rtol=1e-10)
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
    with pytest.raises(NGMMError, match="ensemble"):
        Control(ensemble=0)
    with pytest.raises(NGMMError, match="average_folds"):
        Control(average_folds="yes")  # type: ignore[arg-type]


def test_training_starts_from_the_glmm_of_the_training_groups() -> None:
    """Before the first epoch the linear part is refitted to the training groups alone
    (``train._fit_linear_part``): beta and the random-intercept SD then equal an ordinary
    GLMM fit to those groups' rows (networks at their zero start), to the optimiser's
    tolerance (1e-6). The validation groups are thereby out of sample from the first epoch."""
    from ngmm_formula.train import _fit_linear_part

    df = simulate_grouped(60, 10, "binomial", seed=4)
    prepared = prepare("y ~ nn(x1, x2, hidden=(8,)) + x3 + (1 | g)", df, "binomial")
    module = _module(prepared)
    codes = df["g"].cat.codes.to_numpy()
    train_groups = np.arange(0, 60, 3) + 1  # 20 of the 60 groups
    rows = np.flatnonzero(np.isin(codes, train_groups))
    _fit_linear_part(prepared.problem, prepared.family, prepared.approximation, module, rows,
                     Control(), None)
    beta = prepared.problem.standardisation.A @ module.beta.detach().numpy()
    sub = df.iloc[rows].reset_index(drop=True)
    sub["g"] = sub["g"].cat.remove_unused_categories()
    ref = ngmm("y ~ x3 + (1 | g)", sub, "binomial", approx=prepared.approximation.kind,
               nagq=prepared.approximation.nagq)
    # both stop at max|gradient| <= 1e-6 (the reference; this one 1e-10), so parameters agree
    # to Var x 1e-6 <= ~3e-8 on 200 rows of 20 groups (measured 2e-9): 1e-6 on any machine
    np.testing.assert_allclose(beta, ref.fixef.to_numpy(), rtol=1e-6, atol=1e-6)
    assert float(module.theta.detach()[0]) == pytest.approx(float(ref.varcorr.sdcor.iloc[0]),
                                                            rel=1e-6)


def test_networks_start_from_the_glmm_with_their_inputs_linear() -> None:
    """``train.fit_linear_start``: the NGMM's starting linear predictor is the GLMM's in which
    the network's inputs enter linearly -- the same fixed effects, random-intercept SD and
    linear predictor as ``y ~ x1 + x2 + x3 + (1 | g)`` fitted by ``ngmm``, to the
    optimisers' tolerance (1e-6), with the coefficients of x1 and x2 (on the standardised
    inputs) in the network's linear path and its output layer at zero."""
    from ngmm_formula.train import fit_linear_start

    df = simulate_grouped(60, 10, "binomial", seed=4)
    prepared = prepare("y ~ nn(x1, x2, hidden=(8,)) + x3 + (1 | g)", df, "binomial")
    module = _module(prepared)
    kept = fit_linear_start(prepared.problem, prepared.family, prepared.approximation, module,
                            Control())
    assert kept == [[0, 1]]
    ref = ngmm("y ~ x1 + x2 + x3 + (1 | g)", df, "binomial",
               approx=prepared.approximation.kind, nagq=prepared.approximation.nagq)
    (net,) = module.nets
    gamma = net.linear.weight.detach().double().numpy().ravel()
    sd = np.array([e.scale for e in prepared.design.nets[0].encodings])
    # as above: Var x 1e-6 <= ~1e-8 on 600 rows (measured 5e-8 on eta, 1e-9 on the rest)
    np.testing.assert_allclose(gamma / sd, ref.fixef[["x1", "x2"]].to_numpy(), rtol=1e-6)
    with torch.no_grad():
        eta = module.eta_fixed(prepared.problem).numpy()
    np.testing.assert_allclose(eta, ref.predict(type="link", re_form="NA"), rtol=1e-6,
                               atol=1e-6)
    assert float(module.theta.detach()[0]) == pytest.approx(float(ref.varcorr.sdcor.iloc[0]),
                                                            rel=1e-6)


def test_linear_start_leaves_out_aliased_inputs() -> None:
    """An input that is also a linear term, and the last level of a one-hot factor (aliased
    with the intercept and the other levels), get no coefficient in the linear path (the
    pivoting rank check of the fixed effects), and the fit runs."""
    from ngmm_formula.train import fit_linear_start

    df = simulate_grouped(60, 10, "binomial", seed=4)
    df["f"] = pd.Categorical(np.array(["a", "b", "c"])[np.arange(len(df)) % 3])
    prepared = prepare("y ~ nn(x1, x2, hidden=(8,)) + nn(x3, f, hidden=(8,)) + x1 + (1 | g)",
                       df, "binomial")
    module = _module(prepared)
    kept = fit_linear_start(prepared.problem, prepared.family, prepared.approximation, module,
                            Control())
    # x1 is a linear term; f[c] = intercept - f[a] - f[b]
    assert kept == [[1], [0, 1, 2]]
    gamma = [net.linear_coefficients().numpy() for net in module.nets]
    assert gamma[0][0] == 0 and gamma[0][1] != 0 and gamma[1][3] == 0
    fit = ngmm("y ~ nn(x1, x2, hidden=(8,)) + nn(x3, f, hidden=(8,)) + x1 + (1 | g)", df,
               "binomial", control=Control(epochs=5, progress=False))
    assert np.isfinite(fit.loglik)


def test_mlp_is_a_linear_path_plus_a_body_that_sees_the_noise() -> None:
    """``MLP.raw(x, noise) = gamma' x + body(x + noise)``; evaluation without noise."""
    torch.manual_seed(0)
    net = MLP(3, (5,), "relu", 0.0)
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64))
        net.body[-1].weight.normal_()
    x = torch.randn(7, 3, dtype=torch.float64)
    e = 0.1 * torch.randn(7, 3, dtype=torch.float64)
    expected = (x @ net.linear.weight.T + net.body(x + e)).squeeze(-1)
    torch.testing.assert_close(net.raw(x, e), expected, rtol=0, atol=0)
    torch.testing.assert_close(net.raw(x), (x @ net.linear.weight.T + net.body(x)).squeeze(-1),
                               rtol=0, atol=0)
    assert net.n_weights == 3 * 5 + 5 + 5 + 3


def test_input_noise_perturbs_numeric_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """During training the networks' numeric inputs get N(0, input_noise^2) noise, one-hot
    columns none, and validation sees clean inputs. The noise is drawn in the network's
    dtype (float32: no cast in the step). The SD is checked to 10% on 8,000 draws (its
    relative standard error is 0.8%)."""
    seen: list[torch.Tensor | None] = []
    raw = MLP.raw

    def spy(self: MLP, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(None if noise is None else noise.detach().clone())
        return raw(self, x, noise)

    monkeypatch.setattr(MLP, "raw", spy)
    df = simulate_grouped(80, 10, "binomial", seed=4)
    df["f"] = pd.Categorical(np.array(["a", "b"])[np.arange(len(df)) % 2])
    ngmm("y ~ nn(x1, f, hidden=(4,)) + (1 | g)", df, "binomial",
         control=Control(epochs=10, min_steps=0, progress=False, input_noise=0.3))
    noises = [e for e in seen if e is not None]
    assert noises and any(e is None for e in seen)  # training steps noisy, validation clean
    e = torch.cat(noises)
    assert e.dtype == torch.float32
    assert float(e[:, 1:].abs().max()) == 0.0
    assert float(e[:, 0].std()) == pytest.approx(0.3, rel=0.1)


def test_control_rejects_bad_input_noise() -> None:
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(NGMMError, match="input_noise"):
            Control(input_noise=bad)


def test_networks_pickled_without_a_linear_path_still_load() -> None:
    """Model files written before the linear path existed hold MLPs without it: unpickled,
    they get a zero linear path and compute what they computed."""
    import pickle

    torch.manual_seed(0)
    net = MLP(2, (4,), "relu", 0.0)
    with torch.no_grad():
        net.body[-1].weight.normal_()
    x = torch.randn(6, 2, dtype=torch.float64)
    before = net.body(x).squeeze(-1)
    del net._modules["linear"]
    del net.__dict__["numeric"]
    old = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(old(x), before, rtol=0, atol=0)
    assert old.numeric == (True, True)


def test_linear_start_leaves_wide_factors_to_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ``LINEAR_START_COLUMNS`` input columns only the numeric inputs join the GLMM
    start (its cost is quadratic in the columns); the one-hot columns' linear paths stay 0."""
    from ngmm_formula import train
    from ngmm_formula.train import fit_linear_start

    monkeypatch.setattr(train, "LINEAR_START_COLUMNS", 3)
    df = simulate_grouped(60, 10, "binomial", seed=4)
    df["f"] = pd.Categorical(np.array(["a", "b", "c"])[np.arange(len(df)) % 3])
    prepared = prepare("y ~ nn(x1, f, hidden=(8,)) + (1 | g)", df, "binomial")
    module = _module(prepared)
    kept = fit_linear_start(prepared.problem, prepared.family, prepared.approximation, module,
                            Control())
    assert kept == [[0]]
    gamma = module.nets[0].linear_coefficients().numpy()
    assert gamma[0] != 0 and not gamma[1:].any()


def test_epochs_cut_passes_into_steps_per_epoch_minibatches() -> None:
    """``train._Epochs``: a pass visits every group once; with ``steps`` an epoch is the next
    ``steps`` minibatches of the pass (the last one shorter), never two passes' worth; with
    None an epoch is the pass, drawn exactly as the loop drew it before (one permutation of
    the groups per epoch, from the same generator)."""
    from ngmm_formula.train import _Batch, _Epochs

    def batches(order: np.ndarray, k: int) -> list[_Batch]:
        return [_Batch(order[s:s + k]) for s in range(0, order.size, k)]

    groups = np.arange(23)
    cut = _Epochs(batches, np.random.default_rng(5), groups, 4, steps=2)
    sizes = [len(cut.next()) for _ in range(8)]
    assert sizes == [2, 2, 2, 2, 2, 2, 2, 2]  # 6 minibatches a pass: 3 epochs each
    cut = _Epochs(batches, np.random.default_rng(5), groups, 5, steps=2)
    epochs = [cut.next() for _ in range(6)]  # 5 minibatches a pass: epochs of 2, 2, 1
    assert [len(e) for e in epochs] == [2, 2, 1, 2, 2, 1]
    for one_pass in (epochs[:3], epochs[3:]):
        seen = np.concatenate([b.groups for e in one_pass for b in e])
        assert np.array_equal(np.sort(seen), groups)
    whole = _Epochs(batches, np.random.default_rng(5), groups, 5, steps=None)
    rng = np.random.default_rng(5)
    for _ in range(3):
        assert [b.groups.tolist() for b in whole.next()] == [
            b.groups.tolist() for b in batches(rng.permutation(groups), 5)]
    # a checkpoint's state mid-pass continues the same pass
    cut = _Epochs(batches, np.random.default_rng(5), groups, 5, steps=2)
    cut.next()
    again = _Epochs(batches, np.random.default_rng(99), groups, 5, steps=2)
    again.restore(cut.state())
    assert [b.groups.tolist() for b in again.next()] == [b.groups.tolist() for b in cut.next()]
    with pytest.raises(NGMMError, match="steps_per_epoch"):
        Control(steps_per_epoch=0)


def test_steps_per_epoch_at_least_a_pass_is_the_same_fit(binary: pd.DataFrame) -> None:
    """Where a pass has no more minibatches than ``steps_per_epoch``, the epochs are the
    passes and the fit is the same bit for bit; with fewer the validation score is taken
    more often (one value per epoch of at most that many steps)."""
    ctl = Control(epochs=12, patience=5, progress=False, batch_groups=10,
                  folds=1)  # 6 steps a pass, one validation split
    base = ngmm(FORMULA, binary, "binomial", control=ctl, seed=1)
    same = ngmm(FORMULA, binary, "binomial", control=replace(ctl, steps_per_epoch=6), seed=1)
    assert same.history.validation == base.history.validation
    assert np.array_equal(same.fixef.to_numpy(), base.fixef.to_numpy())
    assert np.array_equal(same.predict(type="link"), base.predict(type="link"))
    cut = ngmm(FORMULA, binary, "binomial",
               control=replace(ctl, steps_per_epoch=3, epochs=24), seed=1)
    # 54 training groups in minibatches of 10: 6 steps a pass, two epochs of 3
    assert len(cut.history.validation) == 24
    assert (cut.history.steps, cut.history.pass_steps, cut.history.passes) == (72, 6, 12.0)
    assert (base.history.steps, base.history.pass_steps) == (72, 6)
    assert "24 epochs (12.0 passes)" in repr(cut.history)
    assert cut.history.validation != base.history.validation


def test_centre_returns_the_centred_output_of_its_own_pass() -> None:
    """:meth:`~ngmm_formula.networks.CentredNetwork.centre` returns the shift and the
    centred output on its rows from the one pass that finds the shift: exactly what the
    network gives afterwards in evaluation mode (the same operations on the same rows), with
    mean 0 to the output's precision (float32 here: 1e-6 of its scale), and the shift is the
    mean of the output before (the same float operations on the same tensors in one
    process: equal bit for bit on any machine, so the 1e-12 is a formality)."""
    torch.manual_seed(0)
    net = MLP(3, (16, 16), "relu", 0.1, torch.float32)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(500, 3, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        before = net(x).double()
    net.train()
    shift, out = net.centre(x)
    assert net.training  # the mode is restored
    assert shift == pytest.approx(float(before.mean()), rel=1e-12)
    net.eval()
    assert torch.equal(out, net(x))
    assert abs(float(out.double().mean())) < 1e-6 * float(out.abs().mean())


@pytest.mark.parametrize("large", [False, True])
def test_large_fits_start_on_a_subsample_and_score_with_the_training_rule(
        monkeypatch: pytest.MonkeyPatch, large: bool) -> None:
    """Above :data:`~ngmm_formula.train.START_MAX_ROWS` rows a neural fit's GLM start and
    theta's scale use the linear starts' subsample of groups (:func:`~ngmm_formula.train.
    start_problem`: every k-th group), and above :data:`~ngmm_formula.train.
    VALIDATION_TRAINING_RULE_ROWS` its validation score takes the training rule (one node)
    instead of the fit's 11 nodes; below them, all rows and the fit's rule (the thresholds
    lowered here to a data set of 2,400 rows)."""
    import ngmm_formula.api as api
    from ngmm_formula import train

    if large:
        monkeypatch.setattr(train, "START_MAX_ROWS", 500)
        monkeypatch.setattr(train, "VALIDATION_TRAINING_RULE_ROWS", 500)
    starts: list[int] = []
    glm_start = api.glm_start
    monkeypatch.setattr(api, "glm_start", lambda pr, *a, **k: (
        starts.append(int(pr.y.shape[0])), glm_start(pr, *a, **k))[1])
    scored: set[str] = set()
    objective = train.Objective

    def spy(problem, family, approx, *a, **k):  # type: ignore[no-untyped-def]
        if not torch.is_grad_enabled():
            scored.add(approx.kind)
        return objective(problem, family, approx, *a, **k)
    monkeypatch.setattr(train, "Objective", spy)
    df = simulate_grouped(120, 20, "binomial", effect="sine", seed=2)
    fit = ngmm("y ~ nn(x1, x2, hidden=(8,)) + x3 + (1 | g)", df, "binomial",
               control=Control(epochs=2, progress=False), seed=0)
    assert np.isfinite(fit.loglik)
    if large:  # every 5th group: 24 groups of 20 rows
        assert starts == [480] and scored == {"laplace"}
    else:
        assert starts == [2400] and scored == {"agq"}
