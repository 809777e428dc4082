"""The Gaussian variational approximation (``approx="variational"``).

Pieces checked against independent computations (scipy quadrature, closed forms, gradcheck,
the adaptive Gauss--Hermite marginal likelihood), then whole fits against this package's
Laplace fit and lme4's (tests/reference), on VerbAgg and on simulated crossed data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import torch

from ngmm_formula import Control, load, ngmm
from ngmm_formula.api import _module, objective_at, prepare
from ngmm_formula.approx import choose_approximation
from ngmm_formula.approx.variational import (
    Levels,
    VariationalObjective,
    VariationalParameters,
    _lbfgs,
    expected_log_prob,
    fit_variational,
    initial_log_sd,
    kl_standard_normal,
    local_update,
)
from ngmm_formula.datasets import load as load_data
from ngmm_formula.datasets import simulate_crossed
from ngmm_formula.errors import NGMMError
from ngmm_formula.families import get_family
from ngmm_formula.fit import glm_start
from ngmm_formula.model import lambda_blocks
from tests.references import REFS

VERBAGG = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"


def _choose(**kw: object):  # type: ignore[no-untyped-def]
    args = dict(nagq=None, truncation=None, points=None, reml=None, n_grouping_factors=2,
                block_dim=2, gaussian_identity=False, has_networks=False)
    args.update(kw)
    return choose_approximation("variational", **args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ arguments


def test_choose_variational() -> None:
    a = _choose()
    assert (a.kind, a.joint, a.reml) == ("variational", True, False)
    assert a.title == ("Generalized linear mixed model fit by maximum likelihood (Gaussian "
                       "variational approximation)")
    # also for a linear Gaussian model (no REML: the ELBO is an ML criterion)
    assert _choose(gaussian_identity=True, reml=False).kind == "variational"


@pytest.mark.parametrize("kw, name", [({"nagq": 5}, "nagq"), ({"truncation": 4.0}, "truncation"),
                                      ({"points": 11}, "points"),
                                      ({"reml": True, "gaussian_identity": True}, "reml")])
def test_bad_arguments(kw: dict[str, object], name: str) -> None:
    with pytest.raises(NGMMError, match=name):
        _choose(**kw)


# ------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize("family, y, w", [("binomial", 0.3, 10.0), ("binomial", 1.0, 1.0),
                                          ("poisson", 4.0, 1.0)])
@pytest.mark.parametrize("mu, sd", [(0.4, 0.1), (-1.0, 1.0), (1.5, 2.0)])
def test_expected_log_prob_matches_quadrature(family: str, y: float, w: float, mu: float,
                                              sd: float) -> None:
    fam = get_family(family)
    t = torch.tensor

    def integrand(e: float) -> float:
        lp = fam.log_prob(t([y], dtype=torch.float64), t([e], dtype=torch.float64), None,
                          t([w], dtype=torch.float64))
        return float(lp) * math.exp(-0.5 * ((e - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    ref = scipy.integrate.quad(integrand, mu - 12 * sd, mu + 12 * sd, epsabs=1e-13,
                               epsrel=1e-13)[0]
    yy, ww = t([y], dtype=torch.float64), t([w], dtype=torch.float64)
    got = float(expected_log_prob(fam, yy, ww, t([mu], dtype=torch.float64),
                                  t([sd], dtype=torch.float64), None)
                + fam.data_constant(yy, ww))
    # 16 Gauss-Hermite nodes. The binomial's softplus has complex poles at i*pi, so the
    # error grows with sd: measured 3e-15 (sd 0.1), 3e-9 (sd 1), 1.2e-5 (sd 2, 10 trials);
    # the sd of a linear predictor under q is rarely above 1
    tol = {0.1: 1e-12, 1.0: 1e-8, 2.0: 2e-5}[sd]
    assert got == pytest.approx(ref, abs=tol)


def test_expected_log_prob_gaussian_closed_form() -> None:
    # E log N(y; eta, sigma^2) = log N(y; mu, sigma^2) - s^2 / (2 sigma^2): GH is exact here
    fam = get_family("gaussian")
    y = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    mu = torch.tensor([0.1, 0.5, -1.0], dtype=torch.float64)
    sd = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    ls = torch.tensor(math.log(1.7), dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    got = expected_log_prob(fam, y, w, mu, sd, ls) + fam.data_constant(y, w)
    want = fam.log_prob(y, mu, ls, w) - sd**2 / (2 * 1.7**2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 2, generator=g, dtype=torch.float64)
    R = torch.tril(torch.randn(5, 2, 2, generator=g, dtype=torch.float64))
    R.diagonal(dim1=-2, dim2=-1).copy_(R.diagonal(dim1=-2, dim2=-1).abs() + 0.1)
    got = kl_standard_normal(m, R, R.diagonal(dim1=-2, dim2=-1).log())
    q = torch.distributions.MultivariateNormal(m, scale_tril=R)
    p = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                               torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(got, torch.distributions.kl_divergence(q, p), rtol=1e-12,
                               atol=1e-12)


def _small_crossed(slope: bool = False, family: str = "binomial", students: int = 60,
                   items: int = 8):  # type: ignore[no-untyped-def]
    d = simulate_crossed(students, items, 6, family, slope_sd=0.5 if slope else 0.0, seed=3)
    f = ("y ~ x + (1 + x | student) + (1 | item)" if slope
         else "y ~ x + (1 | student) + (1 | item)")
    p = prepare(f, d, family, approx="variational")
    module = _module(p)
    glm_start(p.problem, p.family, module)
    levels = Levels.of(p.problem)
    params = VariationalParameters(levels, torch.float64, initial_log_sd(levels, torch.float64))
    return p, module, VariationalObjective(p.problem, p.family, module, params)


def test_levels_follow_the_design() -> None:
    p, _, obj = _small_crossed(slope=True)
    for term, lv in zip(p.design.re_terms, obj.levels.level_of_obs):
        np.testing.assert_array_equal(lv.numpy(), term.group_index)
    assert obj.levels.q == (2, 1)
    assert obj.levels.slot_start == (0, 2)


def test_elbo_gradient_matches_finite_differences() -> None:
    # the autograd gradient of the ELBO (through the Gauss-Hermite expectations, the Cholesky
    # factors of a random slope term and the KL) against central differences, float64
    _, module, obj = _small_crossed(slope=True, students=12, items=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in obj.params.parameters():
            t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        module.theta.copy_(torch.tensor([0.8, 0.2, 0.4, 0.6], dtype=torch.float64))
    tensors = [module.beta, module.theta, *obj.params.parameters()]
    grads = torch.autograd.grad(obj(), tensors)
    eps = 1e-6
    with torch.no_grad():
        for t, gr in zip(tensors, grads):
            flat = t.view(-1)
            for j in range(flat.numel()):
                old = float(flat[j])
                flat[j] = old + eps
                up = float(obj())
                flat[j] = old - eps
                down = float(obj())
                flat[j] = old
                # central differences: truncation error O(eps^2), rounding 1e-16 * |ELBO| / eps
                assert (up - down) / (2 * eps) == pytest.approx(float(gr.view(-1)[j]),
                                                                rel=1e-5, abs=1e-6)


def test_local_update_is_a_stationary_point() -> None:
    # Opper-Archambeau fixed point: after the Newton updates the ELBO's gradient in the
    # updated term's Gaussians vanishes (other terms held fixed)
    # (other terms held fixed). The S-equation is Stein's identity, exact for the integral
    # and not for the Gauss-Hermite sum: the raw-scale gradient left over is the rule's
    # error, measured 1.7e-4 with 16 nodes and 1.6e-7 with 40 on this random-slope model
    _, _, obj = _small_crossed(slope=True)
    obj.n_nodes = 40
    local_update(obj, 0, torch.arange(obj.nobs), n_iter=30)
    g = torch.autograd.grad(obj(), [obj.params.mean[0], obj.params.raw[0]])
    assert float(g[0].abs().max()) < 1e-10
    assert float(g[1].abs().max()) < 1e-6


def test_centred_storage_round_trip() -> None:
    _, module, obj = _small_crossed(slope=True)
    with torch.no_grad():
        module.theta.copy_(torch.tensor([0.8, 0.2, 0.4, -0.6], dtype=torch.float64))
        obj.params.mean[1].normal_()
    with torch.no_grad():
        before = float(obj())
    m0, R0 = obj.params.mean[0].detach().clone(), obj.params.chol(0).detach().clone()
    Lams = [L.detach() for L in lambda_blocks(module.theta, (2, 1))]
    for k in (0, 1):
        obj.params.set_centred(k, True, Lams[k])
    with torch.no_grad():
        assert float(obj()) == pytest.approx(before, rel=1e-12)
    for k in (0, 1):
        obj.params.set_centred(k, False, Lams[k])
    torch.testing.assert_close(obj.params.mean[0].detach(), m0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(obj.params.chol(0).detach(), R0, rtol=1e-12, atol=1e-12)


def test_elbo_is_a_lower_bound_close_to_the_marginal_likelihood() -> None:
    # one grouping factor: the marginal likelihood at fixed parameters is known to high
    # accuracy by adaptive Gauss-Hermite (nAGQ = 25); the ELBO maximised over q must stay
    # below it, and close (q is Gaussian per herd, the posterior nearly so)
    cbpp = load_data("cbpp")
    f = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    fit = ngmm(f, cbpp, "binomial", approx="agq", nagq=25)
    exact = objective_at(prepare(f, cbpp, "binomial", approx="agq", nagq=25),
                         fit.fixef.to_numpy(), fit.theta.to_numpy())
    p = prepare(f, cbpp, "binomial", approx="variational")
    module = _module(p)
    with torch.no_grad():
        module.beta.copy_(torch.as_tensor(np.linalg.solve(p.problem.standardisation.A,
                                                          fit.fixef.to_numpy())))
        module.theta.copy_(torch.tensor(fit.theta.to_numpy()))
    levels = Levels.of(p.problem)
    params = VariationalParameters(levels, torch.float64)
    obj = VariationalObjective(p.problem, p.family, module, params)
    _lbfgs(obj, list(params.parameters()), 2000)
    with torch.no_grad():
        elbo = float(obj())
    assert elbo <= exact
    # measured gap 0.02 for 15 herds (about 1e-3 per herd)
    assert exact - elbo < 0.1


# ------------------------------------------------------------------------------ fits


@pytest.fixture(scope="module")
def verbagg_fits():  # type: ignore[no-untyped-def]
    d = load_data("VerbAgg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        va = ngmm(VERBAGG, d, "binomial", approx="variational")
    return ngmm(VERBAGG, d, "binomial", approx="laplace"), va


def test_verbagg_matches_laplace(verbagg_fits) -> None:  # type: ignore[no-untyped-def]
    lap, va = verbagg_fits
    assert va.diagnostics.converged and va.diagnostics.hessian_pd
    # Done-when of issue "Scale": random-effect SDs within 2% of the Laplace fit
    # (measured: +0.25% for id, -0.22% for item)
    np.testing.assert_allclose(va.varcorr["sdcor"], lap.varcorr["sdcor"], rtol=0.02)
    # fixed effects: measured max |difference| 0.0014 (intercept), 1% of its SE
    np.testing.assert_allclose(va.fixef, lap.fixef, atol=0.01)
    # SEs from the profiled ELBO's Hessian: measured within 0.3% of Laplace's
    np.testing.assert_allclose(np.sqrt(np.diag(va.vcov)), np.sqrt(np.diag(lap.vcov)),
                               rtol=0.01)
    # the ELBO bounds log p(y) from below; here it exceeds the Laplace value (Laplace is
    # biased low for crossed binary data), measured by 2.0: they are not comparable
    assert abs(va.loglik - lap.loglik) < 5


def test_verbagg_matches_lme4(verbagg_fits) -> None:  # type: ignore[no-untyped-def]
    _, va = verbagg_fits
    ref = REFS["verbagg_laplace"]
    # glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial):
    # id SD 1.3397, item SD 0.4953; SDs within 2%, fixed effects within 0.01
    sds = {row["grp"]: row["sdcor"] for row in ref["varcorr"]}
    got = va.varcorr.set_index("group")["sdcor"]
    assert got["id"] == pytest.approx(sds["id"], rel=0.02)
    assert got["item"] == pytest.approx(sds["item"], rel=0.02)
    want = np.array([ref["fixef"][name] for name in va.fixef.index])
    np.testing.assert_allclose(va.fixef.to_numpy(), want, atol=0.01)


def test_verbagg_result_layout(verbagg_fits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, va = verbagg_fits
    assert va.summary().__str__().startswith("Generalized linear mixed model fit by maximum "
                                             "likelihood (Gaussian")
    assert set(va.ranef) == {"id", "item"}
    assert va.ranef["id"].shape == (316, 1)
    assert va.ranef["id"].attrs["postVar"].shape == (1, 1, 316)
    assert (va.ranef["id"].attrs["postVar"] > 0).all()
    # ranef are Lambda m: the fitted linear predictor is rebuilt from them
    eta = va.predict(type="link")
    np.testing.assert_allclose(eta, va.eta, rtol=0, atol=1e-10)
    # the objective at the fitted parameters is the profiled ELBO, i.e. the reported loglik
    prep = prepare(VERBAGG, load_data("VerbAgg"), "binomial", approx="variational")
    assert objective_at(prep, va.fixef.to_numpy(), va.theta.to_numpy()) == pytest.approx(
        va.loglik, abs=1e-3)
    # Wald intervals of the fixed effects from the profiled-ELBO Hessian (NA for the SDs, as
    # lme4's confint(method = "Wald")); no likelihood profile of an ELBO
    ci = va.confint("wald")
    assert np.isfinite(ci.loc[list(va.fixef.index)].to_numpy()).all()
    with pytest.raises(NGMMError, match="variational"):
        va.confint("profile")
    path = va.save(tmp_path / "va.ngmm")
    back = load(path)
    assert back.approximation == va.approximation
    assert back.title == va.title
    assert back.loglik == va.loglik
    np.testing.assert_array_equal(back.predict(type="link"), va.predict(type="link"))


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_simulated_crossed_matches_laplace_and_truth(family: str) -> None:
    d = simulate_crossed(400, 40, 10, family, seed=5)
    f = "y ~ x + (1 | student) + (1 | item)"
    lap = ngmm(f, d, family, approx="laplace")
    va = ngmm(f, d, family, approx="variational")
    assert va.diagnostics.converged
    np.testing.assert_allclose(va.varcorr["sdcor"], lap.varcorr["sdcor"], rtol=0.02)
    np.testing.assert_allclose(va.fixef, lap.fixef, atol=0.02)
    # truth (student SD 1, item SD 0.5, intercept -0.5, slope 0.5) within sampling error:
    # 400 students, 40 items -> SE of the item SD about 0.06
    sd = va.varcorr.set_index("group")["sdcor"]
    assert sd["student"] == pytest.approx(1.0, abs=0.15)
    assert sd["item"] == pytest.approx(0.5, abs=0.2)
    assert va.fixef["x"] == pytest.approx(0.5, abs=0.1)


def test_random_slope_matches_laplace() -> None:
    d = simulate_crossed(300, 30, 12, "poisson", slope_sd=0.5, seed=7)
    f = "y ~ x + (1 + x | student) + (1 | item)"
    lap = ngmm(f, d, "poisson", approx="laplace")
    va = ngmm(f, d, "poisson", approx="variational")
    assert va.diagnostics.converged
    a, b = va.varcorr, lap.varcorr
    sds = a["var2"].isna()
    # SDs within 3% (measured ...); the correlation (truth 0) within 0.1
    np.testing.assert_allclose(a.loc[sds, "sdcor"], b.loc[sds, "sdcor"], rtol=0.03)
    np.testing.assert_allclose(a.loc[~sds, "sdcor"], b.loc[~sds, "sdcor"], atol=0.1)
    assert va.ranef["student"].attrs["postVar"].shape == (2, 2, 300)
    np.testing.assert_allclose(va.fixef, lap.fixef, atol=0.02)


def test_minibatch_path_agrees_with_full_batch() -> None:
    d = simulate_crossed(400, 40, 10, "binomial", seed=2)
    f = "y ~ x + (1 | student) + (1 | item)"
    full = ngmm(f, d, "binomial", approx="variational")
    p = prepare(f, d, "binomial", approx="variational")
    module = _module(p)
    glm_start(p.problem, p.family, module)
    obj, vfit = fit_variational(p.problem, p.family, module,
                                Control(batch_size=500, patience=3), 0,
                                full_batch_max_rows=0)
    assert vfit.method == "adam" and np.isnan(vfit.hessian).all()
    theta = module.theta.detach().abs().numpy()
    np.testing.assert_allclose(theta, full.theta.to_numpy(), rtol=0.05)
    # the stochastic optimum is within a nat of the full-batch one (4,000 rows)
    assert abs(vfit.elbo - full.loglik) < 1.0


def test_nn_term() -> None:
    d = simulate_crossed(200, 20, 10, "binomial", seed=4)
    fit = ngmm("y ~ nn(x, hidden=(8,)) + (1 | student) + (1 | item)", d, "binomial",
               approx="variational", control=Control(epochs=60, patience=5, progress=False))
    assert fit.title.endswith("(Gaussian variational approximation)")
    assert math.isfinite(fit.loglik)
    pd_ = fit.partial_dependence(0, "x", grid=np.linspace(-1.5, 1.5, 7))
    # the truth is linear in x with slope 0.5: the learnt effect increases
    assert np.corrcoef(pd_["x"], pd_["effect"])[0, 1] > 0.9


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from ngmm_formula import cli

    # ngmm fit ... --approx variational: the summary names the approximation
    assert cli.main(["fit", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                     "--data", "cbpp", "--family", "binomial", "--approx", "variational"]) == 0
    out = capsys.readouterr().out
    assert "(Gaussian" in out and "variational approximation)" in out
    assert cli.main(["fit", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                     "--data", "cbpp", "--family", "binomial", "--approx", "variational",
                     "--nagq", "5"]) == 2
    assert "nagq" in capsys.readouterr().err


def test_gaussian_single_factor_is_exact() -> None:
    # with one grouping factor and a Gaussian response the posterior of u is Gaussian and
    # independent across subjects, so the mean-field family contains it: the ELBO equals
    # log p(y) and the fit is the ML fit (lmer(..., REML = FALSE)); the Gauss-Hermite
    # expectation is exact for the quadratic log-likelihood. Measured: equal to 1e-10.
    sleep = load_data("sleepstudy")
    f = "Reaction ~ Days + (Days | Subject)"
    ml = ngmm(f, sleep, reml=False)
    va = ngmm(f, sleep, approx="variational")
    # Two optimisers, each stopped at max|gradient| ~1e-6 (ML: gtol; the ELBO's L-BFGS-B:
    # gtol 1e-9 or ftol 1e-15, the latter ~1e-12 in log L), on any machine; measured with
    # ATEN_CPU_CAPABILITY=avx2: 1.7e-7 relative on an SD (0.2 of the old 1e-6), 2e-11 on the
    # fixed effects, 2e-13 in log L. log L is flat at the optimum, so
    # 1e-6 on it; a parameter is within Var x gradient of the optimum: <= 47 x 1e-6 on the
    # intercept 251 (2e-7 relative, so 1e-6, was 1e-8), ~0.07 x 1e-6 on the correlation 0.066
    # (1e-6 relative, so 1e-5 on sdcor and theta, were 1e-6).
    assert va.loglik == pytest.approx(ml.loglik, abs=1e-6)
    np.testing.assert_allclose(va.varcorr["sdcor"], ml.varcorr["sdcor"], rtol=1e-5)
    np.testing.assert_allclose(va.fixef, ml.fixef, rtol=1e-6)
    # theta of a variational fit is on the absolute scale (results simulate with it so)
    np.testing.assert_allclose(va.theta.to_numpy(), ml.theta.to_numpy() * ml.sigma, rtol=1e-5)
