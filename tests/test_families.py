"""Tests of ngmm_formula.families: links, families, derivatives, validation, the factory.

Reference values come from scipy.stats (the same densities as R's dnorm/dbinom/dpois/dnbinom/
dgamma) and from statsmodels; derivatives are checked against torch.autograd in float64.
Tolerances: closed-form values 1e-10 relative (float64 round-off of lgamma sums), exact
expectations 1e-8 (quadrature error of scipy.integrate.quad), Monte-Carlo means 5 standard
errors (a false alarm about once in 1.7 million runs per comparison).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from ngmm_formula.errors import DataError
from ngmm_formula.families import (
    Binomial,
    CloglogLink,
    Family,
    Gamma,
    Gaussian,
    IdentityLink,
    InverseLink,
    LogitLink,
    LogLink,
    NegativeBinomial,
    NGMMFamilyWarning,
    Poisson,
    ProbitLink,
    get_family,
    get_link,
)

F64 = torch.float64

# Every family x allowed link.
COMBOS = [
    ("gaussian", "identity"),
    ("gaussian", "log"),
    ("gaussian", "inverse"),
    ("binomial", "logit"),
    ("binomial", "probit"),
    ("binomial", "cloglog"),
    ("poisson", "log"),
    ("poisson", "identity"),
    ("negative_binomial", "log"),
    ("gamma", "inverse"),
    ("gamma", "log"),
    ("gamma", "identity"),
]

# Ranges of eta where every link gives a mean inside the family's support.
ETA_RANGE = {
    "identity": (0.5, 5.0),
    "log": (-1.0, 2.0),
    "inverse": (0.2, 2.0),
    "logit": (-3.0, 3.0),
    "probit": (-2.5, 2.5),
    "cloglog": (-3.0, 1.5),
}

# Inverse links written independently of the package, in numpy/scipy.
NP_INVERSE = {
    "identity": lambda eta: eta,
    "log": np.exp,
    "inverse": lambda eta: 1.0 / eta,
    "logit": special.expit,
    "probit": stats.norm.cdf,
    "cloglog": lambda eta: -np.expm1(-np.exp(eta)),
}


def t64(x: object) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=F64)


def random_point(
    family: str, link: str, n: int, seed: int
) -> tuple[Family, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Family, y, eta, log_sigma, weights at random points inside the support."""
    rng = np.random.default_rng(seed)
    fam = get_family(family, link)
    lo, hi = ETA_RANGE[link]
    eta = rng.uniform(lo, hi, n)
    mu = NP_INVERSE[link](eta)
    log_sigma = float(rng.uniform(-0.7, 0.7))
    sigma = float(np.exp(log_sigma))
    if family == "binomial":
        w = rng.integers(1, 12, n).astype(float)
    else:
        w = rng.uniform(0.3, 3.0, n)
    y = fam.simulate(mu, sigma if fam.has_dispersion else None, w, rng)
    if family == "gamma":
        y = np.maximum(y, 1e-3)
    ls = t64(log_sigma) if fam.has_dispersion else None
    return fam, t64(y), t64(eta), ls, t64(w)


# ---------------------------------------------------------------------------------------------
# log_prob against scipy.stats
# ---------------------------------------------------------------------------------------------


def scipy_logpdf(family: str, y: np.ndarray, mu: np.ndarray, sigma: float, w: np.ndarray):
    if family == "gaussian":  # dnorm(y, mu, sigma / sqrt(w), log = TRUE)
        return stats.norm.logpdf(y, mu, sigma / np.sqrt(w))
    if family == "binomial":  # dbinom(w * y, w, mu, log = TRUE)
        return stats.binom.logpmf(np.round(w * y), w, mu)
    if family == "poisson":  # w * dpois(y, mu, log = TRUE)
        return w * stats.poisson.logpmf(y, mu)
    if family == "negative_binomial":  # w * dnbinom(y, size = k, mu = mu, log = TRUE)
        k = sigma
        return w * stats.nbinom.logpmf(y, k, k / (k + mu))
    if family == "gamma":  # w * dgamma(y, shape = 1/sigma^2, scale = mu sigma^2, log = TRUE)
        return w * stats.gamma.logpdf(y, a=1.0 / sigma**2, scale=mu * sigma**2)
    raise AssertionError(family)


LOG_PROB_CASES = [
    # family, link, y, eta, sigma, weights
    ("gaussian", "identity", [0.3, -1.2, 4.0, 2.5], [0.0, -1.0, 3.0, 1.0], 0.7, [1, 1, 2.5, 0.2]),
    ("gaussian", "log", [0.3, 1.2, 4.0], [-1.0, 0.5, 1.2], 1.3, [1, 3, 0.5]),
    ("gaussian", "inverse", [0.3, 1.2, 4.0], [2.0, 0.9, 0.3], 0.2, [1, 1, 1]),
    (
        "binomial",
        "logit",
        [0.0, 0.25, 1.0, 0.6, 1.0],
        [-2.0, 0.1, 3.0, 0.5, -1.0],
        1,
        [1, 8, 3, 5, 1],
    ),
    ("binomial", "probit", [0.0, 0.25, 1.0, 0.5], [-2.0, 0.1, 1.5, -0.3], 1, [1, 4, 7, 10]),
    ("binomial", "cloglog", [0.0, 0.25, 1.0, 0.5], [-2.0, 0.1, 1.5, -0.3], 1, [1, 4, 7, 10]),
    ("poisson", "log", [0, 1, 5, 20, 3], [-1.0, 0.0, 1.5, 3.0, 1.0], 1, [1, 1, 2, 0.5, 1]),
    ("poisson", "identity", [0, 1, 5, 20], [0.3, 1.0, 4.5, 18.0], 1, [1, 2, 1, 1]),
    (
        "negative_binomial",
        "log",
        [0, 1, 5, 20, 3],
        [-1.0, 0.0, 1.5, 3.0, 1.0],
        2.5,
        [1, 1, 2, 1, 0.5],
    ),
    ("negative_binomial", "log", [0, 7, 40], [0.0, 2.0, 3.5], 0.3, [1, 1, 1]),
    ("negative_binomial", "log", [0, 7, 40], [0.0, 2.0, 3.5], 5000.0, [1, 1, 1]),
    ("gamma", "inverse", [0.2, 1.0, 3.5], [2.0, 1.0, 0.4], 0.5, [1, 1, 1]),
    ("gamma", "log", [0.2, 1.0, 3.5, 10.0], [-1.0, 0.2, 1.0, 2.0], 1.2, [1, 2, 0.5, 1]),
    ("gamma", "identity", [0.2, 1.0, 3.5], [0.3, 1.5, 2.5], 0.1, [1, 1, 3]),
]


@pytest.mark.parametrize(("family", "link", "y", "eta", "sigma", "w"), LOG_PROB_CASES)
def test_log_prob_matches_scipy(family, link, y, eta, sigma, w):
    fam = get_family(family, link)
    y, eta, w = (np.asarray(v, dtype=float) for v in (y, eta, w))
    mu = NP_INVERSE[link](eta)
    ls = t64(np.log(sigma)) if fam.has_dispersion else None
    got = fam.log_prob(t64(y), t64(eta), ls, t64(w)).numpy()
    want = scipy_logpdf(family, y, mu, float(sigma), w)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("family", "link"), COMBOS)
def test_log_prob_shape_dtype_and_float32(family, link):
    fam, y, eta, ls, w = random_point(family, link, 7, seed=11)
    lp64 = fam.log_prob(y, eta, ls, w)
    assert lp64.shape == (7,) and lp64.dtype == F64
    ls32 = None if ls is None else ls.float()
    lp32 = fam.log_prob(y.float(), eta.float(), ls32, w.float())
    assert lp32.dtype == torch.float32
    np.testing.assert_allclose(lp32.numpy(), lp64.numpy(), rtol=1e-4, atol=1e-4)
    for fn in (fam.dlogp, fam.d2logp):
        assert fn(y.float(), eta.float(), ls32, w.float()).dtype == torch.float32


@pytest.mark.parametrize(("family", "link"), COMBOS)
def test_zero_weights_contribute_nothing(family, link):
    fam, y, eta, ls, w = random_point(family, link, 5, seed=3)
    w = w.clone()
    w[[1, 3]] = 0.0
    for fn in (fam.log_prob, fam.dlogp, fam.d2logp):
        out = fn(y, eta, ls, w)
        assert torch.all(torch.isfinite(out))
        assert out[1] == 0 and out[3] == 0
    assert fam.fisher_weight(eta, ls, w)[1] == 0


def test_weights_default_to_one():
    fam, y, eta, ls, _ = random_point("gamma", "log", 4, seed=5)
    torch.testing.assert_close(
        fam.log_prob(y, eta, ls), fam.log_prob(y, eta, ls, torch.ones(4, dtype=F64))
    )


@pytest.mark.parametrize("family", ["gaussian", "gamma", "negative_binomial"])
def test_dispersion_families_need_log_sigma(family):
    fam, y, eta, _, w = random_point(family, get_family(family).link.name, 3, seed=1)
    with pytest.raises(ValueError, match="log_sigma"):
        fam.log_prob(y, eta, None, w)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_families_without_dispersion_ignore_log_sigma(family):
    fam, y, eta, _, w = random_point(family, get_family(family).link.name, 4, seed=1)
    a = fam.log_prob(y, eta, None, w)
    b = fam.log_prob(y, eta, t64(1.7), w)
    torch.testing.assert_close(a, b)
    assert fam.sigma(1.7) == 1.0 and not fam.has_dispersion


# ---------------------------------------------------------------------------------------------
# Derivatives in eta
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "link"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dlogp_d2logp_match_autograd(family, link, seed):
    fam, y, eta, ls, w = random_point(family, link, 25, seed=seed)
    e = eta.clone().requires_grad_(True)
    lp = fam.log_prob(y, e, ls, w)
    (g,) = torch.autograd.grad(lp.sum(), e, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), e)
    torch.testing.assert_close(fam.dlogp(y, eta, ls, w), g.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fam.d2logp(y, eta, ls, w), h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("family", "link"), COMBOS)
def test_derivatives_are_differentiable(family, link):
    """gradcheck d2logp (and dlogp) in eta and log_sigma: the Laplace log-det needs this."""
    fam, y, eta, ls, w = random_point(family, link, 6, seed=4)
    e = eta.clone().requires_grad_(True)
    if ls is None:
        for fn in (fam.dlogp, fam.d2logp):
            assert torch.autograd.gradcheck(lambda e_, fn=fn: fn(y, e_, None, w), (e,))
        assert torch.autograd.gradcheck(lambda e_: fam.fisher_weight(e_, None, w), (e,))
    else:
        s = ls.clone().requires_grad_(True)
        for fn in (fam.dlogp, fam.d2logp):
            assert torch.autograd.gradcheck(lambda e_, s_, fn=fn: fn(y, e_, s_, w), (e, s))
        assert torch.autograd.gradcheck(lambda e_, s_: fam.fisher_weight(e_, s_, w), (e, s))


def _expected_neg_d2(fam: Family, eta: float, log_sigma: float | None, w: float) -> float:
    """E[-d2logp(Y)] by summing over the support or by quadrature (no Monte Carlo)."""
    e = t64([eta])
    ls = None if log_sigma is None else t64(log_sigma)
    wt = t64([w])
    mu = float(NP_INVERSE[fam.link.name](np.array(eta)))

    def neg_d2(yv: np.ndarray) -> np.ndarray:
        yt = t64(yv)
        return -fam.d2logp(yt, e.expand_as(yt), ls, wt.expand_as(yt)).numpy()

    if fam.name == "binomial":
        m = int(w)
        k = np.arange(m + 1)
        return float(np.sum(stats.binom.pmf(k, m, mu) * neg_d2(k / m)))
    if fam.name in ("poisson", "negative_binomial"):
        if fam.name == "poisson":
            dist = stats.poisson(mu)
        else:
            k_size = float(np.exp(log_sigma))
            dist = stats.nbinom(k_size, k_size / (k_size + mu))
        ys = np.arange(int(mu + 60 * dist.std() + 100))
        pmf = dist.pmf(ys)
        assert pmf.sum() == pytest.approx(1.0, abs=1e-14)  # the support is covered
        return float(np.sum(pmf * neg_d2(ys.astype(float))))
    sigma = float(np.exp(log_sigma))
    if fam.name == "gaussian":
        dist = stats.norm(mu, sigma / np.sqrt(w))
    else:
        dist = stats.gamma(a=1.0 / sigma**2, scale=mu * sigma**2)
    lo, hi = dist.ppf(1e-15), dist.ppf(1 - 1e-15)
    val, _ = integrate.quad(
        lambda v: dist.pdf(v) * neg_d2(np.array([v]))[0], lo, hi, epsabs=0, epsrel=1e-12, limit=200
    )
    return float(val)


@pytest.mark.parametrize(("family", "link"), COMBOS)
def test_fisher_weight_is_the_exact_expected_information(family, link):
    rng = np.random.default_rng(7)
    fam = get_family(family, link)
    lo, hi = ETA_RANGE[link]
    for _ in range(3):
        eta = float(rng.uniform(lo, hi))
        ls = float(rng.uniform(-0.5, 0.5)) if fam.has_dispersion else None
        w = float(rng.integers(1, 9)) if family == "binomial" else float(rng.uniform(0.5, 2.0))
        got = fam.fisher_weight(t64([eta]), None if ls is None else t64(ls), t64([w])).item()
        want = _expected_neg_d2(fam, eta, ls, w)
        assert got >= 0
        np.testing.assert_allclose(got, want, rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------

LINKS = [IdentityLink(), LogLink(), LogitLink(), ProbitLink(), CloglogLink(), InverseLink()]
MU_RANGE = {
    "identity": (-3.0, 3.0),
    "log": (0.01, 20.0),
    "inverse": (0.1, 10.0),
    "logit": (1e-6, 1 - 1e-6),
    "probit": (1e-6, 1 - 1e-6),
    "cloglog": (1e-6, 1 - 1e-6),
}


@pytest.mark.parametrize("link", LINKS, ids=lambda lk: lk.name)
def test_link_round_trip(link):
    rng = np.random.default_rng(0)
    mu = t64(rng.uniform(*MU_RANGE[link.name], 50))
    torch.testing.assert_close(link.inverse(link.link(mu)), mu, rtol=1e-12, atol=1e-14)
    # and the independent numpy inverse agrees
    eta = link.link(mu)
    np.testing.assert_allclose(
        link.inverse(eta).numpy(), NP_INVERSE[link.name](eta.numpy()), rtol=1e-13
    )


@pytest.mark.parametrize("link", LINKS, ids=lambda lk: lk.name)
def test_mu_eta_and_mu_eta2_match_autograd(link):
    rng = np.random.default_rng(1)
    eta = t64(rng.uniform(*ETA_RANGE[link.name], 40)).requires_grad_(True)
    mu = link.inverse(eta)
    (d1,) = torch.autograd.grad(mu.sum(), eta, create_graph=True)
    if d1.requires_grad:
        (d2,) = torch.autograd.grad(d1.sum(), eta)
    else:  # identity link: mu' is constant
        d2 = torch.zeros_like(d1)
    torch.testing.assert_close(link.mu_eta(eta).detach(), d1.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(link.mu_eta2(eta).detach(), d2, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        link.log_inverse(eta).detach(), torch.log(mu).detach(), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("link", [LogitLink(), ProbitLink(), CloglogLink()], ids=lambda lk: lk.name)
def test_probability_link_log_p_and_derivatives(link):
    rng = np.random.default_rng(2)
    eta = t64(rng.uniform(-4.0, 2.5, 40)).requires_grad_(True)
    p = link.inverse(eta)
    torch.testing.assert_close(link.log_p(eta), torch.log(p), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(link.log_q(eta), torch.log1p(-p), rtol=1e-10, atol=1e-14)
    for f, d1f, d2f in (
        (link.log_p, link.dlog_p, link.d2log_p),
        (link.log_q, link.dlog_q, link.d2log_q),
    ):
        (d1,) = torch.autograd.grad(f(eta).sum(), eta, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), eta)
        torch.testing.assert_close(d1f(eta).detach(), d1.detach(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(d2f(eta).detach(), d2, rtol=1e-9, atol=1e-14)
    info = link.mu_eta(eta) ** 2 / (p * (1 - p))
    torch.testing.assert_close(link.information(eta), info, rtol=1e-10, atol=1e-14)


def test_cloglog_small_t_series_is_continuous_and_accurate():
    # d2 log p at t = exp(eta) around the series threshold 0.05, against mpmath-free
    # high-precision reference: t - (1 - e^-t) summed with Python's math.fsum over many terms.
    import math

    link = CloglogLink()
    for t in (1e-9, 1e-4, 0.02, 0.0499999, 0.0500001, 0.3, 3.0):
        terms = [(-1) ** (j % 2) * t**j / math.factorial(j) for j in range(2, 40)]
        g = math.fsum(terms)  # t + expm1(-t)
        em = -math.expm1(-t)
        s = t * math.exp(-t) / em
        want = -s * g / em
        got = link.d2log_p(t64([math.log(t)])).item()
        assert got == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Numerical stability far in the tails
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "etas"),
    [
        ("logit", [-40.0, 40.0, -800.0, 800.0]),
        ("probit", [-40.0, 40.0]),
        ("cloglog", [-30.0, 5.0, -700.0, 30.0]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_binomial_tails_are_finite(link, etas, dtype):
    fam = Binomial(link)
    eta = torch.tensor(etas, dtype=dtype).repeat_interleave(2).requires_grad_(True)
    y = torch.tensor([0.0, 1.0] * len(etas), dtype=dtype)
    w = torch.full_like(y, 3.0)
    for fn in (fam.log_prob, fam.dlogp, fam.d2logp):
        out = fn(y, eta, None, w)
        assert torch.all(torch.isfinite(out)), (fn.__name__, out)
        (g,) = torch.autograd.grad(out.sum(), eta)
        assert torch.all(torch.isfinite(g)), (fn.__name__, g)
    assert torch.all(torch.isfinite(fam.fisher_weight(eta, None, w)))
    assert torch.all(fam.fisher_weight(eta, None, w) >= 0)


def test_binomial_tail_values():
    fam = Binomial("logit")
    lp = fam.log_prob(t64([0.0, 1.0]), t64([40.0, -40.0]), None, t64([1.0, 1.0]))
    np.testing.assert_allclose(lp.numpy(), [-40.0, -40.0], rtol=1e-14)
    # cloglog: log(1-p) = -exp(eta) exactly; log p ~ eta for eta -> -inf
    fam = Binomial("cloglog")
    lp = fam.log_prob(t64([0.0, 1.0]), t64([5.0, -30.0]), None, t64([1.0, 1.0]))
    np.testing.assert_allclose(lp.numpy(), [-np.exp(5.0), -30.0 - 0.5 * np.exp(-30.0)], rtol=1e-14)


def test_poisson_and_nb_log_link_far_eta_finite():
    for fam, ls in ((Poisson(), None), (NegativeBinomial(), t64(0.5))):
        eta = t64([-50.0, 30.0])
        y = t64([0.0, 3.0])
        for fn in (fam.log_prob, fam.dlogp, fam.d2logp):
            assert torch.all(torch.isfinite(fn(y, eta, ls, None)))


# ---------------------------------------------------------------------------------------------
# Mean, variance, residuals, starting values, statsmodels
# ---------------------------------------------------------------------------------------------


def test_variance_functions():
    mu = t64([0.2, 0.5, 3.0])
    ls = t64(np.log(0.7))
    torch.testing.assert_close(Gaussian().variance(mu, ls), torch.full_like(mu, 0.49))
    torch.testing.assert_close(Binomial().variance(mu[:2]), mu[:2] * (1 - mu[:2]))
    torch.testing.assert_close(Poisson().variance(mu), mu)
    torch.testing.assert_close(NegativeBinomial().variance(mu, ls), mu + mu**2 / 0.7)
    torch.testing.assert_close(Gamma().variance(mu, ls), 0.49 * mu**2)
    torch.testing.assert_close(Gamma("log").mean(t64([0.0, 1.0])), t64([1.0, np.e]))


RESID_CASES = [
    # family, link, y, mu, sigma, w
    ("gaussian", "identity", [0.3, -1.2, 4.0], [0.0, -1.0, 3.0], 0.7, [1, 2.5, 0.2]),
    ("binomial", "logit", [0.0, 0.25, 1.0, 0.6], [0.1, 0.4, 0.8, 0.6], None, [1, 8, 3, 5]),
    ("poisson", "log", [0, 1, 5, 20], [0.5, 1.5, 4.0, 18.0], None, [1, 1, 2, 0.5]),
    ("negative_binomial", "log", [0, 1, 5, 20], [0.5, 1.5, 4.0, 18.0], 2.5, [1, 1, 2, 0.5]),
    ("gamma", "inverse", [0.2, 1.0, 3.5], [0.5, 1.1, 2.0], 0.5, [1, 2, 1]),
]


@pytest.mark.parametrize(("family", "link", "y", "mu", "sigma", "w"), RESID_CASES)
def test_residuals_match_statsmodels(family, link, y, mu, sigma, w):
    fam = get_family(family, link)
    y, mu, w = (np.asarray(v, dtype=float) for v in (y, mu, w))
    smf = fam.statsmodels_family(sigma)
    # R: residuals(glm_fit, type = "deviance") / type = "pearson"
    np.testing.assert_allclose(
        fam.deviance_residuals(y, mu, sigma, w), smf.resid_dev(y, mu, var_weights=w), rtol=1e-10
    )
    pearson = (y - mu) * np.sqrt(w) / np.sqrt(smf.variance(mu))
    np.testing.assert_allclose(fam.pearson_residuals(y, mu, sigma, w), pearson, rtol=1e-12)


@pytest.mark.parametrize(("family", "link"), COMBOS)
def test_statsmodels_family_types(family, link):
    from statsmodels.genmod import families as smf

    fam = get_family(family, link)
    sm_fam = fam.statsmodels_family(4.0)
    expected_family = {
        "gaussian": smf.Gaussian,
        "binomial": smf.Binomial,
        "poisson": smf.Poisson,
        "negative_binomial": smf.NegativeBinomial,
        "gamma": smf.Gamma,
    }[family]
    expected_link = {
        "identity": smf.links.Identity,
        "log": smf.links.Log,
        "logit": smf.links.Logit,
        "probit": smf.links.Probit,
        "cloglog": smf.links.CLogLog,
        "inverse": smf.links.InversePower,
    }[link]
    assert type(sm_fam) is expected_family
    assert type(sm_fam.link) is expected_link
    if family == "negative_binomial":
        assert sm_fam.alpha == pytest.approx(0.25)


INIT_CASES = [
    ("gaussian", "identity", [-1.0, 0.0, 2.0], [1, 1, 1]),
    ("gaussian", "log", [-1.0, 0.0, 2.0], [1, 1, 1]),
    ("gaussian", "inverse", [0.5, 0.0, 2.0], [1, 1, 1]),
    ("binomial", "logit", [0.0, 1.0, 0.5], [1, 1, 4]),
    ("binomial", "probit", [0.0, 1.0, 0.5], [1, 1, 4]),
    ("binomial", "cloglog", [0.0, 1.0, 0.5], [1, 1, 4]),
    ("poisson", "log", [0.0, 3.0, 10.0], [1, 1, 1]),
    ("poisson", "identity", [0.0, 3.0, 10.0], [1, 1, 1]),
    ("negative_binomial", "log", [0.0, 3.0, 10.0], [1, 1, 1]),
    ("gamma", "inverse", [0.1, 3.0, 10.0], [1, 1, 1]),
    ("gamma", "log", [0.1, 3.0, 10.0], [1, 1, 1]),
    ("gamma", "identity", [0.1, 3.0, 10.0], [1, 1, 1]),
]


@pytest.mark.parametrize(("family", "link", "y", "w"), INIT_CASES)
def test_initial_eta_is_finite_and_in_the_support(family, link, y, w):
    fam = get_family(family, link)
    y, w = np.asarray(y, dtype=float), np.asarray(w, dtype=float)
    eta = fam.initial_eta(y, w)
    assert eta.dtype == np.float64 and eta.shape == y.shape
    assert np.all(np.isfinite(eta))
    ls = t64(0.0) if fam.has_dispersion else None
    lp = fam.log_prob(t64(y), t64(eta), ls, t64(w))
    assert torch.all(torch.isfinite(lp))


def test_initial_eta_binomial_is_r_mustart():
    # R: binomial()$initialize sets mustart <- (weights * y + 0.5) / (weights + 1)
    y, w = np.array([0.0, 1.0, 0.25]), np.array([1.0, 1.0, 4.0])
    np.testing.assert_allclose(Binomial().initial_eta(y, w), special.logit((w * y + 0.5) / (w + 1)))


@pytest.mark.parametrize(
    ("family", "sigma", "rtol"),
    [("gaussian", 0.8, 0.05), ("gamma", 0.4, 0.05), ("negative_binomial", 3.0, 0.25)],
)
def test_initial_log_sigma_recovers_sigma(family, sigma, rtol):
    rng = np.random.default_rng(12)
    fam = get_family(family)
    n = 4000
    mu = rng.uniform(1.0, 6.0, n)
    w = np.ones(n)
    y = fam.simulate(mu, sigma, w, rng)
    assert np.exp(fam.initial_log_sigma(y, mu, w)) == pytest.approx(sigma, rel=rtol)
    assert Poisson().initial_log_sigma(y, mu, w) == 0.0


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------

SIM_CASES = [
    # family, mu, sigma, weights, sd of one draw
    ("gaussian", 2.0, 0.5, 4.0, 0.5 / 2.0),
    ("binomial", 0.3, None, 7.0, np.sqrt(0.3 * 0.7 / 7.0)),
    ("poisson", 3.5, None, 1.0, np.sqrt(3.5)),
    ("negative_binomial", 3.5, 2.0, 1.0, np.sqrt(3.5 + 3.5**2 / 2.0)),
    ("gamma", 2.5, 0.6, 1.0, 0.6 * 2.5),
    ("gamma", 2.5, 0.6, 3.0, 0.6 * 2.5 / np.sqrt(3.0)),
]


@pytest.mark.parametrize(("family", "mu", "sigma", "w", "sd"), SIM_CASES)
def test_simulate_mean_and_variance(family, mu, sigma, w, sd):
    rng = np.random.default_rng(2024)
    fam = get_family(family)
    n = 200_000
    draws = fam.simulate(np.full(n, mu), sigma, np.full(n, w), rng)
    # the mean is within 5 Monte-Carlo standard errors, sd / sqrt(n)
    assert abs(draws.mean() - mu) < 5 * sd / np.sqrt(n)
    # the standard deviation within 2% (its MC relative error is ~0.3% even for the skewed NB)
    assert draws.std() == pytest.approx(sd, rel=0.02)
    if family == "binomial":
        np.testing.assert_allclose(draws * w, np.round(draws * w), atol=1e-12)


def test_simulate_zero_weight_returns_mu_and_is_seeded():
    fam = Binomial()
    mu = np.array([0.2, 0.7, 0.5])
    w = np.array([3.0, 0.0, 10.0])
    a = fam.simulate(mu, None, w, np.random.default_rng(5))
    b = fam.simulate(mu, None, w, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a[1] == 0.7


# ---------------------------------------------------------------------------------------------
# Response validation
# ---------------------------------------------------------------------------------------------

VALIDATION_ERRORS = [
    # family, y, weights, fragments of the message
    ("binomial", [0.0, 1.5, 1.0], [4, 2, 4], ["'incidence'", "failure count below zero", "row 1"]),
    (
        "binomial",
        [0.0, 1.5, 1.0],
        [1, 1, 1],
        ["'incidence'", "exceeds 1", "cbind(successes, failures)"],
    ),
    ("binomial", [0.0, -0.5, 1.0], [1, 1, 1], ["'incidence'", "negative", "row 1"]),
    ("binomial", [0.0, 0.3, 1.0], [4, 4, 4], ["'incidence'", "whole number of successes", "1.2"]),
    ("binomial", [0.0, np.nan, 1.0], [4, 0, 4], ["'incidence'", "non-finite", "zero trials"]),
    ("poisson", [0, -1, 3], [1, 1, 1], ["'incidence'", "non-negative counts", "-1"]),
    ("poisson", [0, 1.5, 3], [1, 1, 1], ["'incidence'", "whole-number counts", "1.5"]),
    ("negative_binomial", [0, 2.5, 3], [1, 1, 1], ["'incidence'", "whole-number counts"]),
    (
        "negative_binomial",
        [0, -2, -3],
        [1, 1, 1],
        ["'incidence'", "2 values are negative", "rows 1, 2"],
    ),
    ("gamma", [1.0, 0.0, 3], [1, 1, 1], ["'incidence'", "strictly positive", "row 1"]),
    ("gamma", [1.0, -2.0, 3], [1, 1, 1], ["'incidence'", "strictly positive"]),
    ("gaussian", [1.0, np.inf, 3], [1, 1, 1], ["'incidence'", "non-finite", "row 1"]),
    ("gaussian", [1.0, 2.0, 3], [1, -1, 1], ["'incidence'", "non-negative"]),
    ("gaussian", [1.0, 2.0, 3], [1, np.nan, 1], ["'incidence'", "finite"]),
    ("gaussian", [1.0, 2.0, 3], [1, 1], ["'incidence'", "shape"]),
]


@pytest.mark.parametrize(("family", "y", "w", "fragments"), VALIDATION_ERRORS)
def test_validate_response_errors(family, y, w, fragments):
    fam = get_family(family)
    with pytest.raises(DataError) as info:
        fam.validate_response(np.asarray(y, dtype=float), np.asarray(w, dtype=float), "incidence")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("family", "y", "w"),
    [
        ("binomial", [0.0, 1.0, 0.25, 0.0], [1, 1, 4, 0]),
        ("binomial", [0.0, 1.0, 1.0], [0.5, 0.5, 1]),  # 0/1 with fractional case weights
        ("poisson", [0, 1, 7], [1, 1, 1]),
        ("negative_binomial", [0, 1, 7], [1, 2, 1]),
        ("gamma", [0.1, 1, 7], [1, 1, 1]),
        ("gaussian", [-3.0, 0.0, 7], [1, 1, 0]),
    ],
)
def test_validate_response_accepts_valid_data(family, y, w):
    get_family(family).validate_response(
        np.asarray(y, dtype=float), np.asarray(w, dtype=float), "y"
    )


def test_binomial_proportions_without_trials_warn():
    with pytest.warns(NGMMFamilyWarning, match="'prop'"):
        Binomial().validate_response(np.array([0.2, 0.5]), np.ones(2), "prop")


# ---------------------------------------------------------------------------------------------
# Factory, identity, immutability
# ---------------------------------------------------------------------------------------------

FACTORY_CASES = [
    (("gaussian",), Gaussian, "identity"),
    (("Binomial",), Binomial, "logit"),
    (("binomial", "probit"), Binomial, "probit"),
    (("POISSON",), Poisson, "log"),
    (("poisson", "identity"), Poisson, "identity"),
    (("negative_binomial",), NegativeBinomial, "log"),
    (("nbinom2",), NegativeBinomial, "log"),
    (("gamma",), Gamma, "inverse"),
    (("Gamma", "log"), Gamma, "log"),
    (("gaussian", "inverse"), Gaussian, "inverse"),
]


@pytest.mark.parametrize(("args", "cls", "link"), FACTORY_CASES)
def test_get_family(args, cls, link):
    fam = get_family(*args)
    assert type(fam) is cls and fam.link.name == link
    assert fam.link is get_link(link)
    assert repr(fam) == f"{cls.__name__}(link={link!r})"


def test_family_attributes():
    table = {
        Gaussian: ("gaussian", True, ("identity", "log", "inverse")),
        Binomial: ("binomial", False, ("logit", "probit", "cloglog")),
        Poisson: ("poisson", False, ("log", "identity")),
        NegativeBinomial: ("negative_binomial", True, ("log",)),
        Gamma: ("gamma", True, ("inverse", "log", "identity")),
    }
    for cls, (name, disp, links) in table.items():
        assert cls.name == name and cls.has_dispersion is disp and cls.allowed_links == links


FACTORY_ERRORS = [
    (("poisson", "probit"), "family 'poisson' has no link 'probit'; allowed: log, identity"),
    (("binomial", "log"), "family 'binomial' has no link 'log'; allowed: logit, probit, cloglog"),
    (
        ("negative_binomial", "identity"),
        "family 'negative_binomial' has no link 'identity'; allowed: log",
    ),
    (("gamma", "logit"), "family 'gamma' has no link 'logit'; allowed: inverse, log, identity"),
    (("tweedie",), "unknown family 'tweedie'"),
    ((Poisson(), "log"), "already has a link"),
    ((3,), "family must be a string or a Family object"),
]


@pytest.mark.parametrize(("args", "message"), FACTORY_ERRORS)
def test_get_family_errors(args, message):
    with pytest.raises(DataError) as info:
        get_family(*args)
    assert message in str(info.value)


def test_family_object_returned_as_is_and_link_errors():
    fam = Binomial("cloglog")
    assert get_family(fam) is fam
    with pytest.raises(DataError, match="unknown link 'loglog'"):
        get_link("loglog")
    assert get_link(LogLink()) == LogLink()


def test_families_are_immutable_hashable_and_picklable():
    fam = Gamma("log")
    with pytest.raises(AttributeError):
        fam.link = LogitLink()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        fam.foo = 1  # type: ignore[attr-defined]
    assert fam == Gamma("log") and fam != Gamma() and fam != Gaussian("log")
    assert len({fam, Gamma("log"), Gamma()}) == 2
    clone = pickle.loads(pickle.dumps(fam))
    assert clone == fam and repr(clone) == "Gamma(link='log')"
    assert pickle.loads(pickle.dumps(ProbitLink())) == ProbitLink()


def test_sigma_reporting():
    assert Gaussian().sigma(np.log(2.0)) == pytest.approx(2.0)
    assert NegativeBinomial().sigma(t64(np.log(3.0))) == pytest.approx(3.0)
    assert Binomial().sigma(None) == 1.0


@pytest.mark.parametrize(
    ("family", "link", "bad_eta"),
    [
        ("poisson", "identity", -0.5),
        ("gamma", "identity", 0.0),
        ("gamma", "inverse", -0.3),
        ("gamma", "inverse", 0.0),
    ],
)
def test_eta_outside_the_support_gives_minus_inf_with_finite_gradient(family, link, bad_eta):
    # R's glm halves such steps ("step size truncated: out of bounds"); -inf lets line searches
    # and the mode finder's step halving do the same.
    fam = get_family(family, link)
    ls = t64(-0.3) if fam.has_dispersion else None
    eta = t64([bad_eta, 1.0]).requires_grad_(True)
    lp = fam.log_prob(t64([2.0, 2.0]), eta, ls, None)
    assert lp[0].item() == -np.inf and np.isfinite(lp[1].item())
    (g,) = torch.autograd.grad(lp[1] + torch.where(torch.isfinite(lp[0]), lp[0], 0.0), eta)
    assert torch.all(torch.isfinite(g))
    assert fam.mean(eta)[0].item() > 0


def test_valid_eta():
    eta = t64([-1.0, 0.0, 0.5, np.inf, np.nan])
    table = {
        ("gaussian", "identity"): [True, True, True, False, False],
        ("binomial", "logit"): [True, True, True, False, False],
        ("poisson", "log"): [True, True, True, False, False],
        ("poisson", "identity"): [False, False, True, False, False],
        ("gamma", "inverse"): [False, False, True, False, False],
        ("gamma", "identity"): [False, False, True, False, False],
    }
    for (family, link), want in table.items():
        got = get_family(family, link).valid_eta(eta)
        assert got.dtype == torch.bool and got.tolist() == want, (family, link)
    lp = Gamma("inverse").log_prob(t64([1.0]), t64([np.nan]), t64(0.0))
    assert torch.isnan(lp).all()  # a NaN eta is a bug upstream, not a rejected step
