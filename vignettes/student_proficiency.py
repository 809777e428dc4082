#!/usr/bin/env python
r"""Student proficiency: reduced-rank random effects ``rr()`` as multidimensional IRT (issue 16).

A reduced-rank random effect ``rr(0 + item | id, d = K)`` gives student :math:`i` the item
effects :math:`b_i = \Lambda z_i`, :math:`z_i \sim N(0, I_K)`, with an items x K loading
matrix :math:`\Lambda` (lower triangular, positive diagonal: glmmTMB's identification). With
``y ~ 0 + item + rr(0 + item | id, d = K)`` and a logit link this is the K-dimensional
two-parameter logistic (2PL) item-response model; ``(1 | id)`` is the Rasch model (all
loadings equal).

1. **Real data.** lsat7 (1,000 examinees x 5 LSAT items, psych) and VerbAgg (316 persons x
   24 items, lme4; ``r = r2 == "Y"``): Rasch vs ``rr`` with d = 1 and d = 2, compared by
   ``anova()`` (likelihood-ratio tests) and AIC, with glmmTMB 1.1.5's log-likelihoods of the
   same models beside ours where ``tests/reference/rr_refs.json`` has them (all fits use
   the Laplace approximation, glmmTMB's); the loadings table of the chosen model.
2. **Synthetic data** (``benchmarks/irt_data.py``: a 2-dimensional 2PL, each student
   answering 20 of 40 items, covariates ``x1, x2`` entering nonlinearly; 2,000 students):
   Rasch vs d = 1 vs d = 2 (all with ``+ x1 + x2``) vs d = 2 with ``nn(x1, x2)``. Held out:
   10% of the students entirely (**new students**: each one's marginal log-likelihood with
   :math:`z \sim N(0, I_d)` integrated by an adaptive 20-node-per-dimension product
   Gauss--Hermite rule, from ``fit.predict(rows, type="link", re_form="NA")`` and the fitted
   loadings) and 10% of the other students' responses (**held-out responses**: scored
   conditionally on the fitted scores, ``fit.predict(rows, type="response")``); both per
   response. The oracle row uses the true parameters. Recovered loadings are compared with
   the truth (Pearson correlation per factor) and the students' scores (conditional modes,
   ``fit.scores()``) with the true proficiencies; ``student_proficiency.png`` plots both.

Usage::

    python vignettes/student_proficiency.py            # full (a few minutes)
    python vignettes/student_proficiency.py --quick    # CI: lsat7, VerbAgg d <= 1, 300 students
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO / "benchmarks"))
import irt_data  # noqa: E402

from ngmm_formula import Control, anova, datasets, ngmm  # noqa: E402

REFS = C.REPO / "tests" / "reference" / "rr_refs.json"
REAL = {  # data set -> (response, [(label, random part, glmmTMB reference id)])
    "lsat7": ("y", [("Rasch", "(1 | id)", "lsat_rasch"),
                    ("rr d=1", "rr(0 + item | id, d = 1)", "lsat_rr1"),
                    ("rr d=2", "rr(0 + item | id, d = 2)", None)]),
    "VerbAgg": ("r", [("Rasch", "(1 | id)", "vb_rasch"),
                      ("rr d=1", "rr(0 + item | id, d = 1)", "vb_rr1"),
                      ("rr d=2", "rr(0 + item | id, d = 2)", "vb_rr2")]),
}
SYNTH = {
    "Rasch": "y ~ 0 + item + x1 + x2 + (1 | id)",
    "rr d=1": "y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 1)",
    "rr d=2": "y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 2)",
    "rr d=2 + nn": "y ~ 0 + item + nn(x1, x2) + rr(0 + item | id, d = 2)",
}


def fit(formula: str, data: pd.DataFrame, control: Control):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ngmm(formula, data, "binomial", approx="laplace", control=control, seed=0)


def real_data(quick: bool, control: Control) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    refs = json.loads(REFS.read_text())["fits"]
    rows, text, loadings = [], "", None
    for name, (yname, models) in REAL.items():
        data = datasets.load(name)
        if name == "VerbAgg":
            data["r"] = (data.r2.astype(str) == "Y").astype(float)
            if quick:
                models = models[:2]
        fits = []
        for label, random, ref in models:
            formula = f"{yname} ~ 0 + item + {random}"
            with C.Timer() as t:
                f = fit(formula, data, control)
            fits.append(f)
            rows.append({"data": name, "model": label, "formula": formula, "npar": f.npar,
                         "logLik": f.loglik, "AIC": f.aic,
                         "glmmTMB logLik": refs[ref]["logLik"] if ref else np.nan,
                         "seconds": t.seconds})
            print(f"  {name} {label}: logLik {f.loglik:.3f} AIC {f.aic:.1f} "
                  f"({t.seconds:.1f} s)", flush=True)
        text += f"### {name}: anova\n\n```\n{anova(*fits)}\n```\n\n"
        if name == "VerbAgg":
            loadings = fits[-1].loadings()
    return pd.DataFrame(rows), text, loadings


def synthetic(quick: bool, control: Control, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_students, n_items, per = (300, 15, 10) if quick else (2000, 40, 20)
    data, truth = irt_data.simulate(n_students, n_items, per, d=2, seed=1)
    new, held = irt_data.split(data, 0.1, 0.1, seed=1)
    train = data[~new & ~held].reset_index(drop=True)
    held_df, new_df = data[held].reset_index(drop=True), data[new].reset_index(drop=True)
    yh, yn = held_df.y.to_numpy(), new_df.y.to_numpy()
    new_groups = pd.factorize(new_df["id"].astype(str))[0]
    items_new = irt_data.item_codes(new_df, truth.items)

    def per_response_ll(y: np.ndarray, mu: np.ndarray) -> float:
        mu = np.clip(mu, 1e-15, 1 - 1e-15)
        return float(np.mean(y * np.log(mu) + (1 - y) * np.log1p(-mu)))

    def new_ll(offset: np.ndarray, lam: np.ndarray) -> float:
        return float(irt_data.marginal_loglik(yn, offset, lam, items_new, new_groups).sum()
                     / len(yn))

    # the oracle: true parameters, conditional modes of z from the training responses
    codes = train["id"].cat.codes.to_numpy()
    z_or = irt_data.conditional_modes(train.y.to_numpy(), truth.offset(train), truth.loadings,
                                      irt_data.item_codes(train, truth.items), codes)
    trained = np.unique(codes)
    z_true = truth.z[trained]
    students = [truth.students[k] for k in trained]
    rmse_or = float(np.sqrt(np.mean((z_or[trained] - z_true) ** 2)))
    mu_or = expit(truth.eta(held_df, z=z_or))
    rows = [{"model": "oracle", "logLik": np.nan, "npar": np.nan,
             "held-out responses": per_response_ll(yh, mu_or),
             "new students": new_ll(truth.offset(new_df), truth.loadings),
             "cor F1": 1.0, "cor F2": 1.0, "score RMSE": rmse_or, "seconds": np.nan}]
    kept = {}
    for label, formula in SYNTH.items():
        with C.Timer() as t:
            f = fit(formula, train, control)
        if f.reduced_rank:
            rr = f.reduced_rank[0]
            pos = {c: k for k, c in enumerate(rr.columns)}
            lam = np.asarray(rr.loadings)[[pos["item" + it] for it in truth.items]]
        else:
            vc = f.varcorr
            sd = float(vc[(vc.group == "id") & vc.var2.isna()].sdcor.iloc[0])
            lam = np.full((n_items, 1), sd)
        rec = {"model": label, "logLik": f.loglik, "npar": f.npar,
               "held-out responses": per_response_ll(
                   yh, np.asarray(f.predict(held_df, type="response"), float)),
               "new students": new_ll(np.asarray(f.predict(new_df, type="link",
                                                           re_form="NA"), float), lam),
               "cor F1": np.nan, "cor F2": np.nan, "score RMSE": np.nan,
               "seconds": t.seconds}
        if lam.shape[1] == 2:
            for k in range(2):
                rec[f"cor F{k + 1}"] = float(np.corrcoef(lam[:, k], truth.loadings[:, k])[0, 1])
            sc = f.scores()
            zhat = sc.loc[students, ["F1", "F2"]].to_numpy(float)
            rec["score RMSE"] = float(np.sqrt(np.mean((zhat - z_true) ** 2)))
            kept[label] = (lam, zhat)
        rows.append(rec)
        print(f"  synthetic {label}: held {rec['held-out responses']:.4f} new "
              f"{rec['new students']:.4f} ({t.seconds:.1f} s)", flush=True)
    plot(kept, truth.loadings, z_true, out / "student_proficiency.png")
    lam_tab = pd.DataFrame({"item": truth.items,
                            **{f"true F{k + 1}": truth.loadings[:, k] for k in range(2)},
                            **{f"{lab} F{k + 1}": v[0][:, k] for lab, v in kept.items()
                               for k in range(2)}})
    return pd.DataFrame(rows), lam_tab


def plot(kept: dict, lam_true: np.ndarray, z_true: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    lim = [0, float(max(lam_true.max(), *(v[0].max() for v in kept.values()))) * 1.05]
    for (label, (lam, zhat)), marker in zip(kept.items(), ("o", "x")):
        for k, col in ((0, "C0"), (1, "C1")):
            axes[0].scatter(lam_true[:, k], lam[:, k], s=18, marker=marker, color=col,
                            label=f"{label}, F{k + 1}")
            axes[k + 1].scatter(z_true[:, k], zhat[:, k], s=4, alpha=0.4, marker=marker,
                                label=label)
    axes[0].plot(lim, lim, "k:", lw=1)
    axes[0].set(xlabel="true loading", ylabel="fitted loading", title="Item loadings")
    axes[0].legend(fontsize=7)
    for k in range(2):
        ax = axes[k + 1]
        r = [float(z_true[:, k].min()), float(z_true[:, k].max())]
        ax.plot(r, r, "k:", lw=1)
        ax.set(xlabel=f"true z (F{k + 1})", ylabel="conditional mode",
               title=f"Student scores, F{k + 1}")
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[1])
    control = Control(progress=False, epochs=30) if args.quick else Control(progress=False)
    out = args.output
    with C.Timer() as total:
        real, anova_text, loadings = real_data(args.quick, control)
        synth, lam_tab = synthetic(args.quick, control, out)
    real.to_csv(out / "student_proficiency_real.csv", index=False)
    synth.to_csv(out / "student_proficiency_synthetic.csv", index=False)
    lam_tab.to_csv(out / "student_proficiency_loadings.csv", index=False)
    cmd = "python vignettes/student_proficiency.py" + " ".join(["", *sys.argv[1:]])
    text = C.header(
        "Student proficiency: reduced-rank random effects", cmd,
        f"All fits: approx=\"laplace\"; Control: "
        f"{'epochs=30 (quick)' if args.quick else 'defaults'}. Total time "
        f"{total.seconds:.0f} s.\n\n")
    text += "## Real data: Rasch vs rr()\n\n" + C.md_table(real.drop(columns="formula"),
                                                         ".3f") + "\n" + anova_text
    if loadings is not None:
        text += ("### VerbAgg: loadings of the last model fitted\n\n"
                 + C.md_table(loadings, ".3f") + "\n")
    text += ("## Synthetic: held-out log-likelihood per response, recovery\n\n"
             "Held-out responses: conditional on the fitted scores; new students: marginal "
             "(20 x 20 adaptive Gauss--Hermite). cor: Pearson correlation of fitted and true "
             "loadings over items; score RMSE: conditional modes vs the true z (training "
             "students, both factors).\n\n" + C.md_table(synth, ".4f") + "\n")
    (out / "student_proficiency_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
