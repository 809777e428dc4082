#!/usr/bin/env python
r"""Neural terms on synthetic data with a known nonlinear effect (issue "Neural terms").

Data: ``ngmm_formula.datasets.simulate_grouped`` with the ``"sine"`` effect
:math:`f(x_1, x_2) = \sin(2 x_1) + 0.5 x_2^2` (centred), :math:`0.5\, x_3`, a random
intercept with SD 1 (and residual SD 1 for Gaussian responses), for gaussian, binomial and
poisson responses; and the ``"linear"`` effect :math:`0.8 x_1 - 0.5 x_2` as a control.

Split (per seed): ``simulate_grouped(G + G_new, m + m_test)``; the first ``G`` groups with
their first ``m`` observations are the training data; their last ``m_test`` observations
are the **known-group** test set (new observations of training groups); the last ``G_new``
groups, ``m`` observations each, are the **new-group** test set. Full size: G = 200, m = 20
(4000 training rows), m_test = 10 (2000 rows), G_new = 50 (1000 rows), 60 seeds: on the
binomial data the gap closed varies by about 4 points (SD) from seed to seed, so 20 seeds
leave a standard error of 0.9 points on its mean and 60 seeds 0.5.

Methods:

(a) NGMM    ``y ~ nn(x1, x2) + x3 + (1 | g)`` (this package, default Control);
(b) GLMM    ``y ~ x1 + x2 + x3 + (1 | g)`` (this package);
(c) statsmodels: ``MixedLM`` (ML) for gaussian, ``BinomialBayesMixedGLM`` /
    ``PoissonBayesMixedGLM`` ``.fit_vb()`` otherwise, same linear formula; point estimates
    = MixedLM's estimates and BLUPs, or the variational posterior means (fixed effects
    ``fe_mean``, random effects ``vc_mean``, SD ``exp(vcp_mean)``: statsmodels
    parameterises the variance component by its log SD);
(d) GPBoost: tree boosting of ``x1, x2, x3`` with a grouped random intercept on ``g``
    (``likelihood`` gaussian / bernoulli_logit / poisson), learning rate 0.1, max_depth 3,
    min_data_in_leaf 20, number of rounds chosen by ``gpb.cv`` (4 folds, early stopping
    after 20 rounds without improvement of the fold's test negative log-likelihood, up to
    1000 rounds); point estimates = the ensemble's latent prediction ``fixed_effect``, the
    predicted random effects of the training groups, the fitted variances
    (``get_cov_pars()``);
(e) oracle  ``y ~ x3 + offset(f_true) + (1 | g)`` (this package, true function known).

Gaussian fits of this package use ML (``reml=False``) so that all Gaussian fits are ML.

Metrics (see ``_common.py`` for the exact definitions, identical for every method):
held-out log-likelihood per observation -- **conditional** on the predicted random effect for
known groups, **marginal** (group-wise Gauss--Hermite over N(0, sd_b^2)) for new groups --,
RMSE of the predicted mean against y (gaussian, poisson) or AUC (binomial), the RMSE of the
predicted linear predictor against the true one on the known-group test set (``eta_rmse``),
and the fitted random-intercept SD (truth: 1). The gap closed is
``(ll_NGMM - ll_GLMM) / (ll_oracle - ll_GLMM)``, per seed, then averaged.

Usage::

    python vignettes/nonlinear_synthetic.py            # full: 60 seeds, 3 families, 2 effects
    python vignettes/nonlinear_synthetic.py --quick    # CI: 1 seed, small data
    python vignettes/nonlinear_synthetic.py --seeds 1 --families binomial \
        --methods ngmm,glmm,oracle --control lr=0.01,patience=30
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from ngmm_formula import Control, datasets, ngmm  # noqa: E402

FAMILIES = ("gaussian", "binomial", "poisson")
METHODS = ("ngmm", "glmm", "statsmodels", "gpboost", "oracle")
LABELS = {"ngmm": "NGMM", "glmm": "GLMM (ngmm)", "statsmodels": "statsmodels",
          "gpboost": "GPBoost", "oracle": "oracle"}
GPB_PARAMS = C.GPB_PARAMS
GPB_EFFECTS = {"sine"}  # GPBoost is compared on the nonlinear truth only (--gpboost-effects)
GPB_CV = {"nfold": 4, "max_rounds": 1000}  # quick mode: 2 folds, 300 rounds


# ---------------------------------------------------------------------------- data

def make_data(family: str, effect: str, seed: int, sizes: dict[str, int]
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, float]:
    G, m, mt, Gn = sizes["groups"], sizes["per_group"], sizes["test_per_group"], sizes["new"]
    df = datasets.simulate_grouped(G + Gn, m + mt, family, effect=effect, seed=seed)
    gi = df["g"].cat.codes.to_numpy()
    pos = df.groupby("g", observed=True).cumcount().to_numpy()
    train = df[(gi < G) & (pos < m)].reset_index(drop=True)
    train["g"] = train["g"].cat.remove_unused_categories()
    known = df[(gi < G) & (pos >= m)].reset_index(drop=True)
    new = df[(gi >= G) & (pos < m)].reset_index(drop=True)
    b_sample_sd = float(train.groupby("g", observed=True)["b_true"].first().std(ddof=1))
    return train, known, new, b_sample_sd


# ---------------------------------------------------------------------------- methods

def fit_package(formula: str, train: pd.DataFrame, family: str, seed: int,
                control: Control | None = None) -> tuple[C.Estimates, dict]:
    kw = {"reml": False} if family == "gaussian" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm(formula, train, family, control=control or Control(progress=False),
                   seed=seed, **kw)
    info: dict = {}
    if fit.history is not None:
        h = fit.history
        info = {"epochs": len(h.train), "best_epoch": h.best_epoch,
                "stopped_early": h.stopped_early}
    info["fit"] = fit
    return C.ngmm_estimates(fit, "g"), info


def fit_statsmodels(train: pd.DataFrame, family: str, seed: int) -> tuple[C.Estimates, dict]:
    fixed = "y ~ x1 + x2 + x3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "gaussian":
            import statsmodels.formula.api as smf

            res = smf.mixedlm(fixed, train, groups=train["g"].astype(str)).fit(reml=False)
            fe = res.fe_params
            b_hat = {str(k): float(v.iloc[0]) for k, v in res.random_effects.items()}
            sd_b, sigma = float(np.sqrt(res.cov_re.iloc[0, 0])), float(np.sqrt(res.scale))
            names = list(fe.index)
            beta = fe.to_numpy()
        else:
            from statsmodels.genmod.bayes_mixed_glm import (
                BinomialBayesMixedGLM,
                PoissonBayesMixedGLM,
            )

            cls = BinomialBayesMixedGLM if family == "binomial" else PoissonBayesMixedGLM
            model = cls.from_formula(fixed, {"g": "0 + C(g)"}, train)
            res = model.fit_vb()
            names, beta = list(model.exog_names), np.asarray(res.fe_mean)
            b_hat = {n[len("C(g)["):-1]: float(v) for n, v in zip(model.vc_names, res.vc_mean)}
            sd_b, sigma = float(np.exp(res.vcp_mean[0])), None

    def eta_fixed(d: pd.DataFrame) -> np.ndarray:
        X = np.column_stack([np.ones(len(d)) if n in ("Intercept", "(Intercept)")
                             else d[n].to_numpy(float) for n in names])
        return X @ beta

    return C.Estimates(eta_fixed, b_hat, sd_b, sigma), {}


def gpboost_available() -> str | None:
    try:
        import gpboost

        return str(gpboost.__version__)
    except Exception:  # ImportError, or a broken shared library
        return None


def fit_gpboost(train: pd.DataFrame, family: str, seed: int) -> tuple[C.Estimates, dict]:
    return C.fit_gpboost(train, family, seed, lambda d: d[["x1", "x2", "x3"]].to_numpy(),
                         nfold=GPB_CV["nfold"], max_rounds=GPB_CV["max_rounds"])


def run_method(method: str, train: pd.DataFrame, family: str, seed: int, control: Control,
               hidden: str) -> tuple[C.Estimates, dict]:
    if method == "ngmm":
        return fit_package(f"y ~ nn(x1, x2{hidden}) + x3 + (1 | g)", train, family, seed,
                           control)
    if method == "glmm":
        return fit_package("y ~ x1 + x2 + x3 + (1 | g)", train, family, seed)
    if method == "oracle":
        return fit_package("y ~ x3 + offset(f_true) + (1 | g)", train, family, seed)
    if method == "statsmodels":
        return fit_statsmodels(train, family, seed)
    if method == "gpboost":
        return fit_gpboost(train, family, seed)
    raise ValueError(method)


# ---------------------------------------------------------------------------- experiment

def one_run(family: str, effect: str, seed: int, sizes: dict[str, int], methods: list[str],
            control: Control, hidden: str, pd_fits: dict) -> list[dict]:
    train, known, new, b_sd = make_data(family, effect, seed, sizes)
    rows = []
    for method in methods:
        if method == "gpboost" and effect not in GPB_EFFECTS:
            continue
        with C.Timer() as t:
            est, info = run_method(method, train, family, seed, control, hidden)
        fit = info.pop("fit", None)
        if method == "ngmm" and fit is not None and seed == pd_fits.get("seed"):
            pd_fits[(family, effect)] = fit
        sk = C.score(family, est, known, known["y"].to_numpy(), "g", known=True)
        sn = C.score(family, est, new, new["y"].to_numpy(), "g", known=False)
        b = np.array([est.b_hat.get(s, 0.0) for s in known["g"].astype(str)])
        eta_rmse = C.rmse(known["eta_true"].to_numpy(), est.eta_fixed(known) + b)
        metric = "auc" if family == "binomial" else "rmse"
        rows.append({"family": family, "effect": effect, "seed": seed, "method": method,
                     "ll_known": sk["loglik"], "ll_new": sn["loglik"],
                     f"{metric}_known": sk[metric], f"{metric}_new": sn[metric],
                     "eta_rmse": eta_rmse, "sd_b": est.sd_b, "sd_b_true": 1.0,
                     "sd_b_sample": b_sd, "sigma": est.sigma, "seconds": t.seconds,
                     "info": json.dumps(info)})
        print(f"  {family:8s} {effect:6s} seed {seed} {method:11s} ll_known {sk['loglik']:.4f}"
              f"  ll_new {sn['loglik']:.4f}  {metric} {sk[metric]:.4f}  sd_b {est.sd_b:.3f}"
              f"  eta_rmse {eta_rmse:.3f}  {t.seconds:6.1f}s {info}", flush=True)
    return rows


def gap_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per family and effect: gap closed (known and new groups) and relative differences."""
    out = []
    for (fam, eff), d in runs.groupby(["family", "effect"], sort=False):
        w = {k: d.pivot(index="seed", columns="method", values=k) for k in ("ll_known",
                                                                           "ll_new")}
        rec: dict = {"family": fam, "effect": eff, "seeds": d.seed.nunique()}
        for k, tab in w.items():
            suffix = k.split("_")[1]
            if {"ngmm", "glmm", "oracle"} <= set(tab.columns) and eff != "linear":
                # with a linear truth the GLMM is the oracle's model: no gap to close
                gap = (tab.ngmm - tab.glmm) / (tab.oracle - tab.glmm)
                rec[f"gap_closed_{suffix}"] = f"{gap.mean():.1%} ± {gap.std(ddof=1):.1%}" \
                    if len(gap) > 1 else f"{gap.mean():.1%}"
                rec[f"_gap_{suffix}"] = gap.mean()
            if {"ngmm", "glmm"} <= set(tab.columns):
                rel = (tab.ngmm - tab.glmm) / tab.glmm.abs()
                rec[f"ngmm_vs_glmm_{suffix}"] = f"{rel.mean():+.2%}"
                rec[f"_rel_{suffix}"] = rel.mean()
                rec[f"_relmin_{suffix}"] = rel.min()
            if {"ngmm", "gpboost"} <= set(tab.columns):
                diff = tab.ngmm - tab.gpboost
                rec[f"ngmm_minus_gpboost_{suffix}"] = f"{diff.mean():+.4f} ({(diff > 0).sum()}" \
                    f"/{len(diff)} seeds > 0)"
                rec[f"_gpb_{suffix}"] = diff.mean()
        out.append(rec)
    return pd.DataFrame(out)


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    metric_cols = [c for c in ("ll_known", "ll_new", "auc_known", "auc_new", "rmse_known",
                               "rmse_new", "eta_rmse", "sd_b", "seconds") if c in runs]
    out = []
    for (fam, eff, meth), d in runs.groupby(["family", "effect", "method"], sort=False):
        rec = {"family": fam, "effect": eff, "method": LABELS[meth]}
        for c in metric_cols:
            v = d[c].dropna()
            if v.empty:
                rec[c] = ""
            elif len(v) > 1:
                rec[c] = f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if c != "seconds" \
                    else f"{v.mean():.1f}"
            else:
                rec[c] = f"{v.mean():.4f}" if c != "seconds" else f"{v.mean():.1f}"
        out.append(rec)
    return pd.DataFrame(out)


def targets(runs: pd.DataFrame, gaps: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, g in gaps.iterrows():
        fam, eff = g["family"], g["effect"]
        d = runs[(runs.family == fam) & (runs.effect == eff) & (runs.method == "ngmm")]
        if eff == "sine":
            if "_gap_known" in g and pd.notna(g.get("_gap_known")):
                rows.append((fam, "NGMM closes >= 95% of the held-out ll gap (known groups)",
                             f"{g['_gap_known']:.1%}", g["_gap_known"] >= 0.95))
                rows.append((fam, "same, new groups (marginal ll)", f"{g['_gap_new']:.1%}",
                             g["_gap_new"] >= 0.95))
            if "_gpb_known" in g and pd.notna(g.get("_gpb_known")):
                rows.append((fam, "NGMM beats GPBoost on held-out ll (known groups)",
                             g["ngmm_minus_gpboost_known"], g["_gpb_known"] > 0))
                rows.append((fam, "same, new groups", g["ngmm_minus_gpboost_new"],
                             g["_gpb_new"] > 0))
            if not d.empty:
                err = (d.sd_b / 1.0 - 1).abs()
                o = runs[(runs.family == fam) & (runs.effect == eff) & (runs.method == "oracle")]
                oerr = (o.sd_b - 1).abs().max() if not o.empty else float("nan")
                rows.append((fam, "NGMM random-intercept SD within 10% of the truth (1), "
                                  "mean over seeds",
                             f"mean {d.sd_b.mean():.3f} ({d.sd_b.mean() - 1:+.1%})",
                             bool(abs(d.sd_b.mean() - 1) <= 0.10)))
                rows.append((fam, "same, every seed",
                             f"worst seed off by {err.max():.1%} (oracle's worst seed: "
                             f"{oerr:.1%})", bool(err.max() <= 0.10)))
                if not o.empty:
                    rel = (d.set_index("seed").sd_b / o.set_index("seed").sd_b - 1).abs()
                    rows.append((fam, "NGMM SD within 10% of the oracle's fitted SD, every "
                                      "seed", f"worst seed off by {rel.max():.1%}",
                                 bool(rel.max() <= 0.10)))
        elif eff == "linear" and "_rel_known" in g and pd.notna(g.get("_rel_known")):
            rows.append((fam, "linear truth: NGMM held-out ll within 0.5% of the GLMM "
                              "(known groups)",
                         f"mean {g['_rel_known']:+.3%}, worst seed {g['_relmin_known']:+.3%}",
                         abs(g["_relmin_known"]) <= 0.005))
            rows.append((fam, "same, new groups",
                         f"mean {g['_rel_new']:+.3%}, worst seed {g['_relmin_new']:+.3%}",
                         abs(g["_relmin_new"]) <= 0.005))
    return pd.DataFrame(rows, columns=["family", "target", "measured", "holds"])


def plot_partial_dependence(pd_fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in pd_fits if isinstance(k, tuple) and k[1] == "sine"]
    if not keys:
        return
    fig, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 6), squeeze=False)
    truths = {"x1": lambda x: np.sin(2 * x), "x2": lambda x: 0.5 * x**2}
    for j, key in enumerate(keys):
        fit = pd_fits[key]
        for i, var in enumerate(("x1", "x2")):
            ax = axes[i, j]
            pdp = fit.partial_dependence(0, var)
            true = truths[var](pdp[var].to_numpy())
            # both curves centred on the grid: partial dependence is defined up to a constant
            ax.plot(pdp[var], pdp.effect - pdp.effect.mean(), label="NGMM")
            ax.plot(pdp[var], true - true.mean(), "--", label="truth")
            ax.set_title(f"{key[0]}: partial dependence on {var}")
            ax.set_xlabel(var)
            if j == 0:
                ax.set_ylabel("effect (link scale, centred)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


parse_control = C.parse_control


def _ranges(seeds: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0..2, 5"``."""
    parts, start = [], seeds[0]
    for a, b in zip(seeds, seeds[1:] + [None]):
        if b != a + 1:
            parts.append(str(a) if a == start else f"{start}..{a}")
            start = b
    return ", ".join(parts)


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[1], [
        (("--seeds",), {"type": int, "default": None, "help": "number of seeds (60; quick 1)"}),
        (("--first-seed",), {"type": int, "default": 0,
                             "help": "seeds first, first + 1, ... (to add seeds to a run)"}),
        (("--families",), {"default": ",".join(FAMILIES)}),
        (("--effects",), {"default": "sine,linear"}),
        (("--methods",), {"default": ",".join(METHODS)}),
        (("--control",), {"default": "", "help": "Control options, e.g. lr=0.01,patience=30"}),
        (("--hidden",), {"default": "", "help": "e.g. '32,32' for nn(x1, x2, hidden=(32, 32))"}),
        (("--gpboost-effects",), {"default": "sine",
                                  "help": "effects on which GPBoost is fitted (its cross-"
                                          "validation dominates the run time)"}),
        (("--from-csv",), {"default": None,
                           "help": "rebuild the tables from runs CSVs (comma-separated, "
                                   "concatenated)"}),
        (("--tag",), {"default": "", "help": "suffix of the output files"}),
    ])
    sizes = ({"groups": 60, "per_group": 10, "test_per_group": 5, "new": 15} if args.quick
             else {"groups": 200, "per_group": 20, "test_per_group": 10, "new": 50})
    n_seeds = args.seeds or (1 if args.quick else 60)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    families = args.families.split(",")
    effects = args.effects.split(",")
    methods = args.methods.split(",")
    if args.quick:  # GPBoost's cross-validation dominates the quick run
        effects = effects[:1] if args.effects == "sine,linear" else effects
        GPB_CV.update(nfold=2, max_rounds=300)
    GPB_EFFECTS.clear()
    GPB_EFFECTS.update(args.gpboost_effects.split(","))
    ctl_kw = parse_control(args.control)
    control = Control(progress=False, **ctl_kw)
    hidden = f", hidden=({args.hidden},)" if args.hidden else ""
    gpb_version = gpboost_available()
    if "gpboost" in methods and gpb_version is None:
        print("GPBoost is not installed: its rows are skipped (pip install gpboost)")
        methods = [m for m in methods if m != "gpboost"]
    print(f"sizes {sizes}, seeds {n_seeds}, control {ctl_kw or 'defaults'}, hidden "
          f"{args.hidden or 'default'}", flush=True)

    pd_fits: dict = {"seed": seeds[0]}
    rows = []
    with C.Timer() as total:
        if args.from_csv:  # rebuild the tables of an earlier run
            runs = pd.concat([pd.read_csv(p) for p in args.from_csv.split(",")],
                             ignore_index=True)
            seeds = sorted(runs.seed.unique())
        else:
            for effect in effects:
                for family in families:
                    for seed in seeds:
                        rows += one_run(family, effect, seed, sizes, methods, control,
                                        hidden, pd_fits)
            runs = pd.DataFrame(rows)
    tag = f"_{args.tag}" if args.tag else ""
    out = args.output
    if not args.from_csv:
        runs.to_csv(out / f"synthetic_runs{tag}.csv", index=False)
    gaps = gap_table(runs)
    summ = summary_table(runs)
    tgt = targets(runs, gaps)
    plot_partial_dependence(pd_fits, out / f"synthetic_partial_dependence{tag}.png")

    cmd = "python vignettes/nonlinear_synthetic.py" + " ".join(["", *sys.argv[1:]])
    gpb_note = (f"GPBoost {gpb_version}: {GPB_PARAMS}, rounds by gpb.cv ({GPB_CV['nfold']} "
                f"folds, early stopping 20, at most {GPB_CV['max_rounds']})." if gpb_version else
                "GPBoost: not installed, its rows are missing (pip install gpboost).")
    text = C.header(
        "Neural terms on synthetic data", cmd,
        f"Sizes: {sizes['groups']} groups x {sizes['per_group']} training observations; "
        f"known-group test: {sizes['test_per_group']} new observations per training group; "
        f"new-group test: {sizes['new']} groups x {sizes['per_group']}. Seeds {_ranges(seeds)}."
        f" Control: {ctl_kw or 'defaults'}; hidden: {args.hidden or 'default'}. "
        f"{gpb_note} "
        + (f"Tables rebuilt from {args.from_csv}. " if args.from_csv else
           f"Total time {total.seconds:.0f} s. ")
        + "\n\n"
        "ll_known: mean held-out log-likelihood per observation of new observations of "
        "training groups, conditional on the predicted random effect; ll_new: per observation,"
        " marginal over the random effect, of new groups. Mean ± SD over seeds.\n\n")
    text += "## Metrics\n\n" + C.md_table(summ) + "\n"
    show = gaps[[c for c in gaps.columns if not c.startswith("_")]]
    text += "## Gap closed and comparisons\n\n" + C.md_table(show) + "\n"
    text += "## Targets of the issue\n\n" + C.md_table(tgt) + "\n"
    (out / f"synthetic_summary{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
