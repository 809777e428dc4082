"""Gap closed per family of two NGMM runs of ``vignettes/nonlinear_synthetic.py`` on the same
seeds, and their paired difference (issue 19: a change of the trainer must keep the gap closed
within one standard error per family).

The gap closed of a seed is ``(ll_NGMM - ll_GLMM) / (ll_oracle - ll_GLMM)`` (the vignette's
definition), with the GLMM and oracle rows of the baseline CSV (they do not involve the
networks). Prints, per family and test set (known / new groups): the mean gap closed of both
runs with its standard error over seeds, the mean paired difference with its standard error,
and the seeds whose NGMM log-likelihoods are identical::

    python benchmarks/neural/paired_gap.py BASELINE.csv[,MORE.csv] CHANGED.csv[,MORE.csv]
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd


def gaps(runs: pd.DataFrame, reference: pd.DataFrame, family: str, test: str) -> pd.Series:
    """Gap closed per seed of ``runs``' NGMM, with ``reference``'s GLMM and oracle."""
    ref = reference[(reference.family == family) & (reference.effect == "sine")]
    tab = ref.pivot(index="seed", columns="method", values=f"ll_{test}")
    ngmm = runs[(runs.family == family) & (runs.effect == "sine") & (runs.method == "ngmm")]
    ll = ngmm.set_index("seed")[f"ll_{test}"]
    return ((ll - tab.glmm) / (tab.oracle - tab.glmm)).dropna()


def se(x: pd.Series) -> float:
    """Standard error of the mean over seeds."""
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def main() -> None:
    base, new = ([pd.concat([pd.read_csv(f) for f in arg.split(",")], ignore_index=True)
                  for arg in sys.argv[1:3]])
    print("| family | test | seeds | before (SE) | after (SE) | after - before (SE) | "
          "identical ll |")
    print("|---|---|---|---|---|---|---|")
    for family in [f for f in ("gaussian", "binomial", "poisson")
                   if f in set(new.family)]:
        for test in ("known", "new"):
            a, b = gaps(base, base, family, test), gaps(new, base, family, test)
            seeds = a.index.intersection(b.index)
            a, b = a[seeds], b[seeds]
            d = b - a
            n = len(seeds)
            ll_a = base[(base.family == family) & (base.method == "ngmm")].set_index(
                "seed")[f"ll_{test}"][seeds]
            ll_b = new[(new.family == family) & (new.method == "ngmm")].set_index(
                "seed")[f"ll_{test}"][seeds]
            same = int((ll_a == ll_b).sum())
            print(f"| {family} | {test} | {n} | {a.mean():.1%} ({se(a):.1%}) | "
                  f"{b.mean():.1%} ({se(b):.1%}) | {d.mean():+.2%} ({se(d):.2%}) | "
                  f"{same}/{n} |")


if __name__ == "__main__":
    main()
