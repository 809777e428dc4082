#!/usr/bin/env python
r"""The NGMM as a latent-variable (item-response) model: VerbAgg (issue "Neural terms").

VerbAgg (lme4): 316 persons answer 24 items about verbally aggressive reactions; ``r2`` is
the dichotomised response (N/Y). With crossed random intercepts for persons (the latent
trait) and items (item easiness) the binomial GLMM is a Rasch-type explanatory item-response
model; the NGMM replaces the linear person covariates by a network:

* NGMM  ``r2 ~ nn(Anger, Gender) + btype + situ + mode + (1 | id) + (1 | item)``
* GLMM  ``r2 ~ Anger + Gender + btype + situ + mode + (1 | id) + (1 | item)``

Both are fitted by this package (crossed factors: Laplace approximation on the joint random
effects; the NGMM's minibatches are whole persons). Held out: a random 20% of the person-item
responses (every person and every item keeps responses in training), scored conditionally on
the fitted conditional modes of the person and the item, ``fit.predict(test, type="link")``:
held-out log-likelihood per response and AUC. Repeated over several random splits (split
seed = fit seed). Then both models are fitted to all responses: fitted SDs of persons and
items, and the partial dependence of the network on Anger by Gender
(``item_response_partial_dependence.png``).

Usage::

    python vignettes/item_response.py            # full: 5 random splits
    python vignettes/item_response.py --quick    # CI: 1 split, 30 epochs
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from ngmm_formula import Control, datasets, ngmm  # noqa: E402

MODELS = (
    ("NGMM", "r2 ~ nn(Anger, Gender) + btype + situ + mode + (1 | id) + (1 | item)"),
    ("GLMM", "r2 ~ Anger + Gender + btype + situ + mode + (1 | id) + (1 | item)"),
)


def split(data: pd.DataFrame, seed: int, frac: float = 0.2) -> np.ndarray:
    """Boolean test mask: a random ``frac`` of the rows, redrawn until every person and every
    item keeps at least one training response."""
    rng = np.random.default_rng(seed)
    while True:
        test = rng.random(len(data)) < frac
        tr = data[~test]
        if (tr.id.nunique() == data.id.nunique()
                and tr.item.nunique() == data.item.nunique()):
            return test


def sds(fit) -> dict[str, float]:
    vc = fit.varcorr
    return {f"sd_{g}": float(vc[(vc.group == g) & vc.var2.isna()].sdcor.iloc[0])
            for g in ("id", "item")}


def fit_model(formula: str, data: pd.DataFrame, control: Control, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ngmm(formula, data, "binomial", control=control, seed=seed)


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[1], [
        (("--splits",), {"type": int, "default": None, "help": "random splits (5; quick 1)"}),
    ])
    n_splits = args.splits or (1 if args.quick else 5)
    control = Control(progress=False, epochs=30) if args.quick else Control(progress=False)
    data = datasets.load("VerbAgg")
    y_all = (data.r2.astype(str) == "Y").to_numpy(float)
    rows = []
    with C.Timer() as total:
        for seed in range(n_splits):
            test = split(data, seed)
            train, held = data[~test].reset_index(drop=True), data[test].reset_index(drop=True)
            y = y_all[test]
            for label, formula in MODELS:
                with C.Timer() as t:
                    fit = fit_model(formula, train, control, seed)
                eta = np.asarray(fit.predict(held, type="link"))
                ll = C.log_density("binomial", y, eta)
                rec = {"split": seed, "model": label, "ll_per_obs": float(ll.mean()),
                       "auc": C.auc(y, eta), **sds(fit), "seconds": t.seconds}
                if fit.history is not None:
                    rec["epochs"] = len(fit.history.train)
                rows.append(rec)
                print(f"  split {seed} {label}: ll/obs {rec['ll_per_obs']:.4f} auc "
                      f"{rec['auc']:.4f} sd_id {rec['sd_id']:.3f} sd_item {rec['sd_item']:.3f}"
                      f" {t.seconds:.1f}s", flush=True)
        full = {label: fit_model(formula, data, control, 0) for label, formula in MODELS}
    runs = pd.DataFrame(rows)
    out = args.output
    runs.to_csv(out / "item_response_runs.csv", index=False)

    summ = []
    for label, d in runs.groupby("model", sort=False):
        rec = {"model": label}
        for c in ("ll_per_obs", "auc", "sd_id", "sd_item", "seconds"):
            rec[c] = (f"{d[c].mean():.4f} ± {d[c].std(ddof=1):.4f}" if len(d) > 1
                      else f"{d[c].mean():.4f}")
        summ.append(rec)
    piv = runs.pivot(index="split", columns="model", values="ll_per_obs")
    diff = piv["NGMM"] - piv["GLMM"]
    summ_df = pd.DataFrame(summ)
    fits_df = pd.DataFrame([{"model": k, "loglik (all data)": f.loglik, **sds(f),
                             "fixed/network parameters": f.npar} for k, f in full.items()])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ngm, glm = full["NGMM"], full["GLMM"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    grid = np.arange(int(data.Anger.min()), int(data.Anger.max()) + 1)
    for gender, style in (("F", "-"), ("M", "--")):
        d = data.copy()
        d["Gender"] = pd.Categorical([gender] * len(d), categories=data.Gender.cat.categories)
        for fit, lab, col in ((ngm, "NGMM", "C0"), (glm, "GLMM", "C1")):
            curve = []
            for a in grid:
                d["Anger"] = int(a)
                curve.append(float(np.mean(fit.predict(d, type="link", re_form="~0"))))
            ax.plot(grid, curve, style, color=col, label=f"{lab}, Gender {gender}")
    ax.set_xlabel("Anger (trait anger score)")
    ax.set_ylabel("mean linear predictor (no random effects)")
    ax.set_title("VerbAgg: effect of Anger and Gender")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "item_response_partial_dependence.png", dpi=110)
    plt.close(fig)

    cmd = "python vignettes/item_response.py" + " ".join(["", *sys.argv[1:]])
    text = C.header(
        "Item response: VerbAgg", cmd,
        f"{n_splits} random splits (20% of the 7584 responses held out; split seed = fit "
        f"seed), Control: {'epochs=30 (quick)' if args.quick else 'defaults'}. Total time "
        f"{total.seconds:.0f} s.\n\nll_per_obs: held-out log-likelihood per response, "
        "conditional on the conditional modes of the person and the item. Mean ± SD over "
        "splits.\n\n")
    text += "## Held-out responses\n\n" + C.md_table(summ_df) + "\n"
    text += (f"NGMM - GLMM held-out log-likelihood per response: {diff.mean():+.5f} "
             f"(SD {diff.std(ddof=1) if len(diff) > 1 else float('nan'):.5f} over splits; "
             f"NGMM better in {(diff > 0).sum()} of {len(diff)} splits); relative "
             f"{(diff / piv['GLMM'].abs()).mean():+.3%}.\n\n")
    text += "## Fits to all responses\n\n" + C.md_table(fits_df) + "\n"
    (out / "item_response_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
