#!/usr/bin/env python
r"""Neural terms on real data: Contraception, grouseticks and sleepstudy (issue "Neural terms").

For each data set an NGMM with a network on the covariate(s) whose effect may be nonlinear is
compared with linear GLMMs fitted by this package (the first GLMM listed is the reference
model named in the issue):

=============  ========  ===========================================================
data           family    models
=============  ========  ===========================================================
Contraception  binomial  NGMM ``use ~ nn(age, livch) + urban + (1 | district)``
                         GLMM ``use ~ age + I(age ** 2) + urban + livch + (1 | district)``
                         GLMM ``use ~ age + urban + livch + (1 | district)``
grouseticks    poisson   NGMM ``TICKS ~ nn(HEIGHT) + YEAR + (1 | BROOD)``
                         GLMM ``TICKS ~ HEIGHT + YEAR + (1 | BROOD)``
                         GLMM ``TICKS ~ HEIGHT + I(HEIGHT ** 2) + YEAR + (1 | BROOD)``
sleepstudy     gaussian  NGMM ``Reaction ~ nn(Days) + (Days | Subject)``
                         GLMM ``Reaction ~ Days + (Days | Subject)``
                         GLMM ``Reaction ~ Days + I(Days ** 2) + (Days | Subject)``
=============  ========  ===========================================================

Cross-validation, 5 folds each (fold assignment seeded, identical for all models):

* **within groups**: every group's rows are shuffled and dealt to the folds in turn (a
  random starting fold per group), so each test fold holds new observations of groups
  present in training; they are scored conditionally on the fitted conditional modes
  (``fit.predict(test, type="link", allow_new_levels=True)``; a group with a single row
  has no training rows in the fold that holds it and gets a zero random effect -- this
  affects 3 grouseticks broods and no other group);
* **held-out groups**: the groups are dealt to 5 folds, and each test fold is scored by the
  marginal log-likelihood of each whole held-out group (random effects integrated over the
  fitted distribution: Gauss--Hermite for a random intercept, the exact multivariate normal
  for sleepstudy's random intercept and slope).

Both are pooled over folds: held-out log-likelihood per observation (sum over all test rows /
rows), AUC (binomial) or RMSE (poisson, gaussian) of the pooled predictions; the paired
per-fold difference NGMM - reference GLMM is given with its standard error over folds.
Gaussian fits use ML. Finally every model is fitted to all the data and the partial dependence
of the NGMM's network is drawn against the GLMM's polynomial (figure
``real_partial_dependence.png``).

Usage::

    python vignettes/contraception.py            # full: 5 folds, all three data sets
    python vignettes/contraception.py --quick    # CI: Contraception only, 2 folds, 40 epochs
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from ngmm_formula import Control, datasets, ngmm  # noqa: E402


@dataclass(frozen=True)
class Spec:
    data: str
    family: str
    group: str
    response: str
    positive: str | None  # level of a factor response that counts as 1
    models: tuple[tuple[str, str], ...]  # (label, formula); first: NGMM, second: reference
    nn_vars: tuple[str, ...]
    poly: tuple[str, str] | None  # (variable, label of the GLMM with its polynomial)


SPECS = (
    Spec("Contraception", "binomial", "district", "use", "Y", (
        ("NGMM", "use ~ nn(age, livch) + urban + (1 | district)"),
        ("GLMM quadratic age", "use ~ age + I(age ** 2) + urban + livch + (1 | district)"),
        ("GLMM linear age", "use ~ age + urban + livch + (1 | district)"),
    ), ("age", "livch"), ("age", "GLMM quadratic age")),
    Spec("grouseticks", "poisson", "BROOD", "TICKS", None, (
        ("NGMM", "TICKS ~ nn(HEIGHT) + YEAR + (1 | BROOD)"),
        ("GLMM linear HEIGHT", "TICKS ~ HEIGHT + YEAR + (1 | BROOD)"),
        ("GLMM quadratic HEIGHT", "TICKS ~ HEIGHT + I(HEIGHT ** 2) + YEAR + (1 | BROOD)"),
    ), ("HEIGHT",), ("HEIGHT", "GLMM quadratic HEIGHT")),
    Spec("sleepstudy", "gaussian", "Subject", "Reaction", None, (
        ("NGMM", "Reaction ~ nn(Days) + (Days | Subject)"),
        ("GLMM linear Days", "Reaction ~ Days + (Days | Subject)"),
        ("GLMM quadratic Days", "Reaction ~ Days + I(Days ** 2) + (Days | Subject)"),
    ), ("Days",), ("Days", "GLMM quadratic Days")),
)


# ---------------------------------------------------------------------------- folds

within_group_folds = C.within_group_folds  # shared with benchmarks/neural/real.py
group_folds = C.group_folds


# ---------------------------------------------------------------------------- scoring

def response(spec: Spec, d: pd.DataFrame) -> np.ndarray:
    y = d[spec.response]
    return (y.astype(str) == spec.positive).to_numpy(float) if spec.positive \
        else y.to_numpy(float)


def gaussian_marginal(fit, d: pd.DataFrame, y: np.ndarray, group: str) -> np.ndarray:
    """Exact log-likelihood of each new group: y_g ~ N(mean, Z S Z' + sigma^2 I)."""
    mean = np.asarray(fit.predict(d, type="link", re_form="~0"))
    vc = fit.varcorr
    rows = vc[vc.group == group]
    names = list(rows[rows.var2.isna()].var1)
    S = np.zeros((len(names), len(names)))
    for _, r in rows.iterrows():
        i = names.index(r.var1)
        if pd.isna(r.var2):
            S[i, i] = r.vcov
        else:
            j = names.index(r.var2)
            S[i, j] = S[j, i] = r.vcov
    cols = [np.ones(len(d)) if n == "(Intercept)" else d[n].to_numpy(float) for n in names]
    codes = pd.factorize(d[group].astype(str))[0]
    return C.gaussian_group_loglik(y, mean, np.column_stack(cols), S, fit.sigma, codes)


def score(spec: Spec, fit, test: pd.DataFrame, known: bool) -> dict[str, np.ndarray]:
    """Summed held-out log-likelihood, predictions (mean scale) and the response."""
    y = response(spec, test)
    sigma = fit.sigma if spec.family == "gaussian" else None
    if known:
        eta = np.asarray(fit.predict(test, type="link", allow_new_levels=True))
        ll = C.log_density(spec.family, y, eta, sigma)
        mu = C.inverse_link(spec.family, eta)
    else:
        vc = fit.varcorr
        if spec.family == "gaussian":
            ll_g = gaussian_marginal(fit, test, y, spec.group)
            mu = np.asarray(fit.predict(test, type="link", re_form="~0"))
        else:
            sd_b = float(vc[(vc.group == spec.group) & vc.var2.isna()].sdcor.iloc[0])
            eta = np.asarray(fit.predict(test, type="link", re_form="~0"))
            codes = pd.factorize(test[spec.group].astype(str))[0]
            ll_g = C.marginal_group_loglik(spec.family, y, eta, codes, sd_b)
            mu = C.marginal_mean(spec.family, eta, sd_b)
        ll = ll_g  # one value per held-out group; only the sum is used
    return {"ll_sum": np.array([ll.sum()]), "mu": mu, "y": y, "n": np.array([len(y)])}


def fit_model(spec: Spec, formula: str, train: pd.DataFrame, control: Control, seed: int):
    kw = {"reml": False} if spec.family == "gaussian" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ngmm(formula, train, spec.family, control=control, seed=seed, **kw)


def cross_validate(spec: Spec, data: pd.DataFrame, k: int, control: Control, seed: int
                   ) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    schemes = {"within groups": within_group_folds(data[spec.group], k, rng),
               "held-out groups": group_folds(data[spec.group], k, rng)}
    rows = []
    for scheme, folds in schemes.items():
        known = scheme == "within groups"
        for f in range(k):
            train = data[folds != f].reset_index(drop=True)
            test = data[folds == f].reset_index(drop=True)
            for label, formula in spec.models:
                with C.Timer() as t:
                    fit = fit_model(spec, formula, train, control, seed)
                s = score(spec, fit, test, known)
                rows.append({"data": spec.data, "scheme": scheme, "fold": f, "model": label,
                             "ll_sum": float(s["ll_sum"][0]), "n": int(s["n"][0]),
                             "mu": s["mu"], "y": s["y"], "seconds": t.seconds})
                print(f"  {spec.data:13s} {scheme:15s} fold {f} {label:22s} "
                      f"ll/obs {s['ll_sum'][0] / s['n'][0]:.4f}  {t.seconds:5.1f}s", flush=True)
    return pd.DataFrame(rows)


def summarise(spec: Spec, cv: pd.DataFrame) -> pd.DataFrame:
    out = []
    ref = spec.models[1][0]
    for (scheme, label), d in cv.groupby(["scheme", "model"], sort=False):
        y = np.concatenate(list(d.y))
        mu = np.concatenate(list(d.mu))
        rec = {"data": spec.data, "scheme": scheme, "model": label,
               "ll_per_obs": d.ll_sum.sum() / d.n.sum()}
        if spec.family == "binomial":
            rec["auc"] = C.auc(y, mu)
        else:
            rec["rmse"] = C.rmse(y, mu)
        r = cv[(cv.scheme == scheme) & (cv.model == ref)].set_index("fold")
        m = d.set_index("fold")
        diff = (m.ll_sum - r.ll_sum) / m.n  # per observation, per fold
        rec["diff_vs_ref"] = (f"{(m.ll_sum.sum() - r.ll_sum.sum()) / m.n.sum():+.4f} ± "
                              f"{diff.std(ddof=1) / np.sqrt(len(diff)):.4f}"
                              if label != ref and len(diff) > 1 else "")
        rec["seconds_per_fit"] = d.seconds.mean()
        out.append(rec)
    return pd.DataFrame(out)


def full_fits(spec: Spec, data: pd.DataFrame, control: Control, seed: int) -> dict:
    fits = {label: fit_model(spec, formula, data, control, seed)
            for label, formula in spec.models}
    return fits


def fit_table(spec: Spec, fits: dict) -> pd.DataFrame:
    rows = []
    for label, fit in fits.items():
        vc = fit.varcorr
        sds = "; ".join(f"{r.group} {r.var1 if isinstance(r.var1, str) else ''} "
                        f"{r.sdcor:.3f}".replace("  ", " ") for r in vc.itertuples()
                        if pd.isna(r.var2))
        rows.append({"data": spec.data, "model": label, "loglik (train)": fit.loglik,
                     "random-effect SDs": sds})
    return pd.DataFrame(rows)


def model_partial_dependence(fit, data: pd.DataFrame, var: str, values: list) -> np.ndarray:
    """Friedman's partial dependence of any fitted model on ``var`` (link scale, no random
    effects): the population prediction averaged over the data with ``var`` set to each value."""
    out = []
    for v in values:
        d = data.copy()
        if isinstance(d[var].dtype, pd.CategoricalDtype):
            d[var] = pd.Categorical([v] * len(d), categories=d[var].cat.categories)
        else:
            d[var] = float(v)
        out.append(float(np.mean(fit.predict(d, type="link", re_form="~0"))))
    return np.array(out)


def plot(specs_fits: list[tuple[Spec, dict, pd.DataFrame]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, f, d, v) for s, f, d in specs_fits for v in s.nn_vars]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (spec, fits, data, var) in zip(axes[0], panels):
        pdp = fits["NGMM"].partial_dependence(0, var)
        numeric = pd.api.types.is_numeric_dtype(pdp[var])
        values = list(pdp[var])
        x = np.asarray(values, float) if numeric else np.arange(len(values))
        ngmm_curve = pdp.effect.to_numpy() - pdp.effect.mean()
        ax.plot(x, ngmm_curve, "-" if numeric else "o-", label="NGMM (network)")
        glmm_label = spec.poly[1] if spec.poly and spec.poly[0] == var else spec.models[1][0]
        glmm_curve = model_partial_dependence(fits[glmm_label], data, var, values)
        ax.plot(x, glmm_curve - glmm_curve.mean(), "--" if numeric else "s--",
                label=glmm_label)
        if numeric:
            raw = data[var].to_numpy(float)
            ax.plot(raw, np.full_like(raw, ax.get_ylim()[0]), "|", color="k", alpha=0.15)
        else:
            ax.set_xticks(x, [str(v) for v in values])
        ax.set_title(f"{spec.data}: {var}")
        ax.set_xlabel(var)
        ax.set_ylabel("partial effect (link scale, centred)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[1], [
        (("--folds",), {"type": int, "default": None}),
        (("--data",), {"default": None, "help": "comma-separated subset of the data sets"}),
        (("--seed",), {"type": int, "default": 0}),
        (("--control",), {"default": "", "help": "Control options, e.g. lr=0.01,patience=30"}),
        (("--tag",), {"default": "", "help": "suffix of the output files"}),
    ])
    k = args.folds or (2 if args.quick else 5)
    ctl_kw = C.parse_control(args.control)
    if args.quick:
        ctl_kw.setdefault("epochs", 40)
    control = Control(progress=False, **ctl_kw)
    wanted = args.data.split(",") if args.data else (["Contraception"] if args.quick else
                                                     [s.data for s in SPECS])
    specs = [s for s in SPECS if s.data in wanted]
    tables, fit_tabs, for_plot = [], [], []
    with C.Timer() as total:
        for spec in specs:
            data = datasets.load(spec.data)
            cv = cross_validate(spec, data, k, control, args.seed)
            tables.append(summarise(spec, cv))
            fits = full_fits(spec, data, control, args.seed)
            fit_tabs.append(fit_table(spec, fits))
            for_plot.append((spec, fits, data))
    summ = pd.concat(tables, ignore_index=True)
    fitt = pd.concat(fit_tabs, ignore_index=True)
    out = args.output
    tag = f"_{args.tag}" if args.tag else ""
    summ.to_csv(out / f"real_cv{tag}.csv", index=False)
    fitt.to_csv(out / f"real_fits{tag}.csv", index=False)
    plot(for_plot, out / f"real_partial_dependence{tag}.png")
    cmd = "python vignettes/contraception.py" + " ".join(["", *sys.argv[1:]])
    text = C.header(
        "Neural terms on real data", cmd,
        f"{k}-fold cross-validation (fold seed {args.seed}), Control: "
        f"{ctl_kw or 'defaults'}. Total time {total.seconds:.0f} s."
        "\n\nll_per_obs: held-out log-likelihood per observation pooled over folds "
        "(within groups: conditional on the conditional modes; held-out groups: marginal over "
        "the random effects); diff_vs_ref: NGMM or other GLMM minus the reference GLMM (the "
        "first GLMM of each data set), per observation, ± its standard error over folds.\n\n")
    text += "## Cross-validation\n\n" + C.md_table(summ) + "\n"
    text += "## Fits to all the data\n\n" + C.md_table(fitt, ".2f") + "\n"
    (out / f"real_summary{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
