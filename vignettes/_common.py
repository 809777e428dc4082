r"""Shared helpers of the vignettes: run mode, output folder, held-out likelihoods, metrics.

Held-out log-likelihood
-----------------------
Every method is reduced to the same four point estimates, and every held-out number is
computed from them by the functions below, identically for all methods:

* ``eta_fixed``: the linear predictor of a held-out row *without* its random effect
  (fixed effects, networks, trees, offsets);
* ``b_hat``: the predicted random intercept of every training group (the conditional mode
  for this package, the BLUP / posterior mean for statsmodels, GPBoost's predicted random
  effect);
* ``sd_b``: the fitted standard deviation of the random intercept;
* ``sigma``: the residual standard deviation (Gaussian responses only).

New observations of **known groups** are scored conditionally on the group's predicted
random effect (plug-in of the conditional mode):

.. math::

    \ell^{\text{cond}} = \frac{1}{n} \sum_i \log p(y_i \mid \hat\eta_i + \hat b_{g(i)})

Observations of **new groups** are scored by the marginal likelihood of each whole new group,
its random effect integrated over the fitted :math:`N(0, \hat\sigma_b^2)`:

.. math::

    \ell^{\text{marg}} = \frac{1}{n} \sum_{g} \log \int \prod_{i \in g}
    p(y_i \mid \hat\eta_i + b)\, N(b; 0, \hat\sigma_b^2)\, db ,

computed by adaptive Gauss--Hermite quadrature with 30 nodes centred at each group's mode
(exact to many digits for these smooth, log-concave integrands). Both are per observation,
with all normalising constants (:math:`-\log y!` for Poisson counts, :math:`-\tfrac12
\log(2\pi\sigma^2)` for Gaussian responses), so the numbers of all methods are comparable.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, gammaln, logsumexp

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "output"
REPO = HERE.parent

if str(REPO) not in sys.path:  # run from a plain checkout without installing the package
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------- run mode

def parse_args(description: str, extra: list[tuple[tuple[str, ...], dict]] | None = None
               ) -> argparse.Namespace:
    """``--quick`` (or ``NGMM_QUICK=1``), ``--seeds``, ``--output``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes for CI (also with the environment variable NGMM_QUICK=1)")
    p.add_argument("--output", type=Path, default=OUTPUT, help="folder for tables and figures")
    for args, kw in extra or []:
        p.add_argument(*args, **kw)
    ns = p.parse_args()
    ns.quick = ns.quick or os.environ.get("NGMM_QUICK", "") not in ("", "0")
    ns.output.mkdir(parents=True, exist_ok=True)
    return ns


def parse_control(text: str) -> dict:
    """``"lr=0.01,patience=30,refit=False,train_approx=laplace"`` -> keyword arguments of
    ``Control`` (numbers, None / True / False, else the string)."""
    out: dict = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        if v in ("None", "True", "False"):
            out[k] = {"None": None, "True": True, "False": False}[v]
        elif v.lstrip("-").isdigit():
            out[k] = int(v)
        else:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def machine() -> str:
    """One line describing the machine and the library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}")


def commit() -> str:
    """Short hash of HEAD, noting uncommitted changes to the package."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "ngmm_formula"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes to ngmm_formula/)" if dirty else "")


def header(title: str, command: str, extra: str = "") -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# {title}\n\nRun {now} at commit {commit()}; {machine()}.\n\n"
            f"Command: `{command}`\n\n{extra}")


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------- likelihoods

def log_density(family: str, y: np.ndarray, eta: np.ndarray, sigma: float | None = None
                ) -> np.ndarray:
    """log p(y | eta) with all constants (Bernoulli responses for "binomial")."""
    y = np.asarray(y, dtype=float)
    if family == "gaussian":
        assert sigma is not None
        return -0.5 * ((y - eta) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    if family == "binomial":
        return y * eta - np.logaddexp(0.0, eta)
    if family == "poisson":
        return y * eta - np.exp(eta) - gammaln(y + 1.0)
    raise ValueError(family)


def _derivatives(family: str, y: np.ndarray, eta: np.ndarray, sigma: float | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    if family == "gaussian":
        assert sigma is not None
        return (y - eta) / sigma**2, np.full_like(eta, -1.0 / sigma**2)
    if family == "binomial":
        p = expit(eta)
        return y - p, -p * (1 - p)
    mu = np.exp(eta)
    return y - mu, -mu


def inverse_link(family: str, eta: np.ndarray) -> np.ndarray:
    return {"gaussian": lambda e: e, "binomial": expit, "poisson": np.exp}[family](eta)


def conditional_loglik(family: str, y: np.ndarray, eta_fixed: np.ndarray, b: np.ndarray,
                       sigma: float | None = None) -> np.ndarray:
    """Per-observation log p(y_i | eta_fixed_i + b_i) (b: the row's predicted effect)."""
    return log_density(family, y, eta_fixed + b, sigma)


def marginal_group_loglik(family: str, y: np.ndarray, eta_fixed: np.ndarray,
                          groups: np.ndarray, sd_b: float, sigma: float | None = None,
                          nodes: int = 30) -> np.ndarray:
    """log of each group's likelihood with its random intercept integrated over N(0, sd_b^2).

    Adaptive Gauss--Hermite: Newton steps to each group's mode of
    h(b) = sum_i log p(y_i | eta_i + b) + log N(b; 0, sd_b^2), then ``nodes`` nodes scaled by
    the curvature there. ``groups``: integer codes 0..G-1. Returns an array of length G.
    """
    y = np.asarray(y, dtype=float)
    groups = np.asarray(groups)
    G = int(groups.max()) + 1
    if not sd_b > 1e-8:
        return np.bincount(groups, log_density(family, y, eta_fixed, sigma), minlength=G)
    s2 = sd_b**2
    b = np.zeros(G)
    for _ in range(100):
        d1, d2 = _derivatives(family, y, eta_fixed + b[groups], sigma)
        g1 = np.bincount(groups, d1, minlength=G) - b / s2
        g2 = np.bincount(groups, d2, minlength=G) - 1.0 / s2
        step = np.clip(-g1 / g2, -1.0, 1.0)
        b += step
        if np.max(np.abs(step)) < 1e-10:
            break
    _, d2 = _derivatives(family, y, eta_fixed + b[groups], sigma)
    scale = 1.0 / np.sqrt(-(np.bincount(groups, d2, minlength=G) - 1.0 / s2))
    x, w = np.polynomial.hermite.hermgauss(nodes)
    terms = np.empty((G, nodes))
    for k in range(nodes):
        bk = b + np.sqrt(2.0) * scale * x[k]
        h = np.bincount(groups, log_density(family, y, eta_fixed + bk[groups], sigma),
                        minlength=G)
        h += -0.5 * bk**2 / s2 - 0.5 * np.log(2 * np.pi * s2)
        terms[:, k] = np.log(w[k]) + x[k] ** 2 + h
    return np.log(np.sqrt(2.0) * scale) + logsumexp(terms, axis=1)


def marginal_mean(family: str, eta_fixed: np.ndarray, sd_b: float, nodes: int = 30
                  ) -> np.ndarray:
    """E[y] for a new group: the inverse link averaged over b ~ N(0, sd_b^2)."""
    if family == "gaussian":
        return eta_fixed
    x, w = np.polynomial.hermite.hermgauss(nodes)
    vals = inverse_link(family, eta_fixed[:, None] + np.sqrt(2.0) * sd_b * x[None, :])
    return vals @ w / np.sqrt(np.pi)


# ---------------------------------------------------------------------------- metrics

def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann--Whitney, ties counted one half)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def rmse(y: np.ndarray, mu: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(y, float) - mu) ** 2)))


# ---------------------------------------------------------------------------- point estimates

class Estimates:
    """The point estimates of a fitted model that the held-out metrics need.

    With a random slope (``slope_of``: the covariate it multiplies) ``slope`` holds each
    training group's predicted slope and ``cov`` the 2 x 2 covariance of (intercept, slope).
    """

    def __init__(self, eta_fixed, b_hat: dict, sd_b: float, sigma: float | None = None, *,
                 slope: dict | None = None, slope_of: str | None = None,
                 cov: np.ndarray | None = None):
        self.eta_fixed = eta_fixed  # callable: DataFrame -> array
        self.b_hat = b_hat          # level -> predicted random intercept
        self.sd_b = float(sd_b)
        self.sigma = None if sigma is None else float(sigma)
        self.slope = slope          # level -> predicted random slope, or None
        self.slope_of = slope_of
        self.cov = cov


def ngmm_estimates(fit, group: str, slope_of: str | None = None) -> Estimates:
    """Point estimates of an NGMMResult with a random intercept on ``group`` (and, with
    ``slope_of``, a correlated random slope of that covariate: ``(1 + x | group)``)."""
    vc = fit.varcorr[fit.varcorr.group == group]
    row = vc[(vc.var1 == "(Intercept)") & vc.var2.isna()]
    re = fit.ranef[group]
    sigma = fit.sigma if fit.family.name == "gaussian" else None
    levels = re.index.astype(str)
    slope, cov = None, None
    if slope_of is not None:
        var_s = float(vc[(vc.var1 == slope_of) & vc.var2.isna()].vcov.iloc[0])
        cross = vc[vc.var2.notna()]
        cov_is = float(cross.vcov.iloc[0]) if len(cross) else 0.0
        cov = np.array([[float(row.vcov.iloc[0]), cov_is], [cov_is, var_s]])
        slope = dict(zip(levels, re[slope_of].to_numpy()))
    return Estimates(lambda d: np.asarray(fit.predict(d, type="link", re_form="~0")),
                     dict(zip(levels, re["(Intercept)"].to_numpy())),
                     float(row.sdcor.iloc[0]), sigma, slope=slope, slope_of=slope_of, cov=cov)


def gaussian_group_loglik(y: np.ndarray, mean: np.ndarray, Z: np.ndarray, S: np.ndarray,
                          sigma: float, groups: np.ndarray) -> np.ndarray:
    r"""Exact log-likelihood of each group of a Gaussian response with its random effects
    integrated out: :math:`y_g \sim N(\mu_g, Z_g S Z_g' + \sigma^2 I)`. ``groups``:
    integer codes 0..G-1; returns an array of length G."""
    from scipy.stats import multivariate_normal

    groups = np.asarray(groups)
    out = np.empty(int(groups.max()) + 1)
    for g, idx in pd.Series(np.arange(len(groups))).groupby(groups).indices.items():
        Zg = Z[idx]
        cov = Zg @ S @ Zg.T + sigma**2 * np.eye(idx.size)
        out[g] = multivariate_normal(mean[idx], cov).logpdf(y[idx])
    return out


def score(family: str, est: Estimates, data: pd.DataFrame, y: np.ndarray, group: str,
          *, known: bool) -> dict[str, float]:
    """Held-out metrics of ``data`` (known groups: conditional; new groups: marginal).

    A group unseen in training (known=True) gets a zero random effect. With a random slope
    (``est.slope``), known groups add their predicted slope times ``data[est.slope_of]``, and
    new groups integrate intercept and slope exactly (Gaussian responses only)."""
    eta = est.eta_fixed(data)
    labels = data[group].astype(str).to_numpy()
    out: dict[str, float] = {}
    if known:
        b = np.array([est.b_hat.get(lab, 0.0) for lab in labels])
        if est.slope is not None:
            b = b + (np.array([est.slope.get(lab, 0.0) for lab in labels])
                     * data[est.slope_of].to_numpy(float))
        ll = conditional_loglik(family, y, eta, b, est.sigma)
        mu = inverse_link(family, eta + b)
        out["loglik"] = float(ll.mean())
    else:
        codes = pd.factorize(labels)[0]
        if est.cov is not None:
            if family != "gaussian" or est.sigma is None:
                raise ValueError("a random slope is integrated for Gaussian responses only")
            Z = np.column_stack([np.ones(len(y)), data[est.slope_of].to_numpy(float)])
            ll = gaussian_group_loglik(y, eta, Z, est.cov, est.sigma, codes)
        else:
            ll = marginal_group_loglik(family, y, eta, codes, est.sd_b, est.sigma)
        mu = marginal_mean(family, eta, est.sd_b)
        out["loglik"] = float(ll.sum() / len(y))
    if family == "binomial":
        out["auc"] = auc(y, mu)
    else:
        out["rmse"] = rmse(y, mu)
    return out


# ---------------------------------------------------------------------------- folds

def within_group_folds(groups: pd.Series, k: int, rng: np.random.Generator) -> np.ndarray:
    """Grouped CV within groups: each group's rows shuffled and dealt to the ``k`` folds in
    turn from a random starting fold, so every test fold holds new rows of known groups."""
    fold = np.empty(len(groups), dtype=int)
    for _, idx in groups.groupby(groups, observed=True).indices.items():
        idx = rng.permutation(idx)
        fold[idx] = (rng.integers(k) + np.arange(idx.size)) % k
    return fold


def group_folds(groups: pd.Series, k: int, rng: np.random.Generator) -> np.ndarray:
    """Grouped CV by groups: the groups shuffled and dealt to the ``k`` folds."""
    levels = rng.permutation(pd.unique(groups.astype(str)))
    of = {lev: i % k for i, lev in enumerate(levels)}
    return groups.astype(str).map(of).to_numpy()


# ---------------------------------------------------------------------------- GPBoost

GPB_PARAMS = {"learning_rate": 0.1, "max_depth": 3, "num_leaves": 8, "min_data_in_leaf": 20,
              "verbose": -1}


def fit_gpboost(train: pd.DataFrame, family: str, seed: int,
                features: Callable[[pd.DataFrame], np.ndarray], *, nfold: int = 4,
                max_rounds: int = 1000, group: str = "g", slope_of: str | None = None
                ) -> tuple[Estimates, dict]:
    """GPBoost with a grouped random intercept on ``group``: trees of ``features(data)``
    (:data:`GPB_PARAMS`), the number of rounds chosen by ``gpb.cv`` (``nfold`` folds, early
    stopping after 20 rounds without improvement of the folds' test negative
    log-likelihood, at most ``max_rounds``); point estimates = the ensemble's latent
    prediction, the training groups' predicted random effects and the fitted variances.
    With ``slope_of`` the group also gets a random slope of that column (GPBoost's
    ``group_rand_coef_data``; independent of the intercept, GPBoost has no correlation)."""
    import gpboost as gpb

    lik = {"gaussian": "gaussian", "binomial": "bernoulli_logit", "poisson": "poisson"}[family]
    X, y = features(train), train["y"].to_numpy(float)
    g = train[group].astype(str).to_numpy()
    z = None if slope_of is None else train[slope_of].to_numpy(float)

    def model() -> gpb.GPModel:
        if z is None:
            return gpb.GPModel(group_data=g, likelihood=lik)
        return gpb.GPModel(group_data=g, group_rand_coef_data=z, ind_effect_group_rand_coef=[1],
                           likelihood=lik)

    params = dict(GPB_PARAMS, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = gpb.cv(params=params, train_set=gpb.Dataset(X, y), gp_model=model(),
                    use_gp_model_for_validation=True, nfold=nfold,
                    num_boost_round=max_rounds,
                    early_stopping_rounds=20, verbose_eval=False, seed=seed)
        key = next(k for k in cv if k.endswith("-mean"))
        rounds = int(np.argmin(cv[key])) + 1
        gp = model()
        bst = gpb.train(params=params, train_set=gpb.Dataset(X, y), gp_model=gp,
                        num_boost_round=rounds)
        cp = gp.get_cov_pars()
        sd_b = float(np.sqrt(cp["Group_1"].iloc[0]))
        sigma = float(np.sqrt(cp["Error_var"].iloc[0])) if family == "gaussian" else None
        if z is None:
            p = bst.predict(data=X, group_data_pred=g, pred_latent=True)
            re = pd.Series(np.asarray(p["random_effect_mean"]), index=g)
            b_hat = re.groupby(level=0).first().to_dict()
            slope, cov = None, None
        else:
            # the random intercept and slope of each training group: predict at z = 0 and 1
            lev, first = np.unique(g, return_index=True)
            X1 = X[first]
            r0, r1 = (np.asarray(bst.predict(data=X1, group_data_pred=lev,
                                             group_rand_coef_data_pred=np.full(len(lev), v),
                                             pred_latent=True)["random_effect_mean"])
                      for v in (0.0, 1.0))
            b_hat, slope = dict(zip(lev, r0)), dict(zip(lev, r1 - r0))
            cov = np.diag([cp["Group_1"].iloc[0], cp.iloc[0, -1]]).astype(float)

    def eta_fixed(d: pd.DataFrame) -> np.ndarray:
        kw = {} if slope_of is None else {"group_rand_coef_data_pred": d[slope_of]
                                          .to_numpy(float)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = bst.predict(data=features(d), group_data_pred=d[group].astype(str)
                              .to_numpy(), pred_latent=True, **kw)
        return np.asarray(out["fixed_effect"])

    return (Estimates(eta_fixed, b_hat, sd_b, sigma, slope=slope, slope_of=slope_of, cov=cov),
            {"rounds": rounds, "cv_metric": key})


# ---------------------------------------------------------------------------- no groups

def _gaussian_sigma(family: str, y: np.ndarray, eta: np.ndarray) -> float | None:
    return float(np.std(y - eta)) if family == "gaussian" else None


def fit_lightgbm(train: pd.DataFrame, family: str, seed: int,
                 features: Callable[[pd.DataFrame], np.ndarray]) -> tuple[Estimates, dict]:
    """LightGBM without groups on ``features(data)`` (the trees of :data:`GPB_PARAMS`),
    rounds by 4-fold CV with early stopping after 20; scored with b = 0 (a Gaussian
    response's sigma: the SD of the training residuals)."""
    import lightgbm as lgb

    objective = {"gaussian": "regression", "binomial": "binary", "poisson": "poisson"}[family]
    X, y = features(train), train["y"].to_numpy(float)
    params = {"objective": objective, "learning_rate": 0.1, "max_depth": 3, "num_leaves": 8,
              "min_data_in_leaf": 20, "verbose": -1, "seed": seed}
    cv = lgb.cv(params, lgb.Dataset(X, y), num_boost_round=1000, nfold=4, seed=seed,
                stratified=family == "binomial",
                callbacks=[lgb.early_stopping(20, verbose=False)])
    key = next(k for k in cv if k.endswith("-mean"))
    rounds = len(cv[key])
    bst = lgb.train(params, lgb.Dataset(X, y), num_boost_round=rounds)

    def eta_fixed(d: pd.DataFrame) -> np.ndarray:
        return np.asarray(bst.predict(features(d), raw_score=True))

    sigma = _gaussian_sigma(family, y, eta_fixed(train))
    return Estimates(eta_fixed, {}, 0.0, sigma), {"rounds": rounds}


def fit_mlp(train: pd.DataFrame, family: str, seed: int,
            features: Callable[[pd.DataFrame], np.ndarray]) -> tuple[Estimates, dict]:
    """A plain MLP without random effects, what hand-written torch code would do: 2 x 64,
    ReLU, Adam (lr 1e-3, batches of 256), early stopping on 20 % of the rows (patience 20,
    at most 500 epochs); scored with b = 0."""
    import torch

    torch.manual_seed(seed)
    X = features(train)
    mean, sd = X.mean(0), X.std(0) + 1e-12
    y = torch.tensor(train["y"].to_numpy(float), dtype=torch.float32)
    Xt = torch.tensor((X - mean) / sd, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = {
        "gaussian": torch.nn.functional.mse_loss,
        "binomial": torch.nn.functional.binary_cross_entropy_with_logits,
        "poisson": lambda e, t: torch.nn.functional.poisson_nll_loss(e, t, log_input=True),
    }[family]
    perm = torch.randperm(len(y))
    n_val = max(1, len(y) // 5)
    val, tr = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state, since = np.inf, None, 0
    epochs = 0
    for epochs in range(1, 501):  # noqa: B007 (the count is reported)
        for idx in tr[torch.randperm(len(tr))].split(256):
            opt.zero_grad()
            loss_fn(net(Xt[idx]).squeeze(1), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            v = float(loss_fn(net(Xt[val]).squeeze(1), y[val]))
        if v < best - 1e-6:
            best, since = v, 0
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        else:
            since += 1
            if since >= 20:
                break
    assert best_state is not None
    net.load_state_dict(best_state)

    def eta_fixed(d: pd.DataFrame) -> np.ndarray:
        with torch.no_grad():
            xd = torch.tensor((features(d) - mean) / sd, dtype=torch.float32)
            return net(xd).squeeze(1).numpy().astype(float)

    sigma = _gaussian_sigma(family, train["y"].to_numpy(float), eta_fixed(train))
    return Estimates(eta_fixed, {}, 0.0, sigma), {"epochs": epochs}


def md_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A DataFrame as a GitHub markdown table (no tabulate dependency)."""
    cols = list(df.columns)

    def fmt(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(False)]
    return "\n".join(lines) + "\n"
