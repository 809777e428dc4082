"""Two NGMM runs of ``suite.py`` on the same seeds, cell by cell: the paired difference of the
held-out log-likelihood per observation (candidate - reference), its standard error over
seeds, and the cells where the candidate is lower by more than two standard errors (the
"no cell falls by more than two paired SEs" part of a pre-registered rule).

    python benchmarks/neural/paired_cells.py REFERENCE.csv CANDIDATE.csv [BASELINES.csv]

Prints a markdown table (every (shape, family), known and new groups) and the count of
comparisons below -2 SE among the nonlinear cells (shape ``linear`` excluded). With the
baselines of the same seeds (their GLMM and oracle) it also prints the **pooled** paired
difference in points of gap closed: per seed-case
:math:`\Delta_{cs} = 100\,(\ell^{cand}_{cs} - \ell^{ref}_{cs}) / (\ell^{oracle}_{cs} -
\ell^{glmm}_{cs})` (the difference of the suite's per-seed gap closed), averaged over the
seeds of a cell and then over the nonlinear cells that the suite does not exclude (gap within
two SEs of zero): the difference of the suite's mean gap closed over cells, with the
standard error :math:`\sqrt{\sum_c s_c^2 / n_c} / C` (cells independent, :math:`s_c` the
SD of :math:`\Delta_{cs}` over a cell's seeds).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd


def paired(reference: pd.DataFrame, candidate: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, family): mean and SE of candidate - reference, known and new groups."""
    keys = ["shape", "family", "seed"]
    ref = reference[reference.method == "ngmm"]
    cand = candidate[candidate.method == "ngmm"]
    both = ref.merge(cand, on=keys, suffixes=("_ref", "_cand"))
    rows = []
    for (shape, family), cell in both.groupby(["shape", "family"], sort=False):
        row: dict[str, object] = {"shape": shape, "family": family, "seeds": len(cell)}
        for test in ("known", "new"):
            d = cell[f"ll_{test}_cand"] - cell[f"ll_{test}_ref"]
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
            row[f"{test}_diff"] = float(d.mean())
            row[f"{test}_se"] = se
            row[f"{test}_better"] = int((d > 0).sum())
            row[f"{test}_below_2se"] = bool(d.mean() < -2 * se)
        rows.append(row)
    return pd.DataFrame(rows)


def pooled(reference: pd.DataFrame, candidate: pd.DataFrame, baselines: pd.DataFrame
           ) -> dict[str, tuple[float, float, int]]:
    """Known / new: pooled paired difference in points of gap closed, its SE, the cells."""
    keys = ["shape", "family", "seed"]
    ref = reference[reference.method == "ngmm"]
    cand = candidate[candidate.method == "ngmm"]
    base = {m: baselines[baselines.method == m] for m in ("glmm", "oracle")}
    both = ref.merge(cand, on=keys, suffixes=("_ref", "_cand"))
    both = both.merge(base["glmm"][keys + ["ll_known", "ll_new"]], on=keys)
    both = both.merge(base["oracle"][keys + ["ll_known", "ll_new"]], on=keys,
                      suffixes=("_glmm", "_oracle"))
    out = {}
    for test in ("known", "new"):
        means, variances = [], []
        for (shape, _), cell in both.groupby(["shape", "family"], sort=False):
            gap = cell[f"ll_{test}_oracle"] - cell[f"ll_{test}_glmm"]
            if shape == "linear" or abs(gap.mean()) <= 2 * gap.std(ddof=1) / np.sqrt(len(gap)):
                continue  # the suite's exclusion
            d = 100 * (cell[f"ll_{test}_cand"] - cell[f"ll_{test}_ref"]) / gap
            means.append(float(d.mean()))
            variances.append(float(d.var(ddof=1) / len(d)))
        out[test] = (float(np.mean(means)), float(np.sqrt(np.sum(variances)) / len(means)),
                     len(means))
    return out


def main(argv: list[str]) -> None:
    table = paired(pd.read_csv(argv[0]), pd.read_csv(argv[1]))
    cols = list(table.columns)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for _, r in table.iterrows():
        print("| " + " | ".join(f"{v:.5f}" if isinstance(v, float) else str(v)
                                for v in r.tolist()) + " |")
    nonlinear = table[table["shape"] != "linear"]
    below = int(nonlinear["known_below_2se"].sum() + nonlinear["new_below_2se"].sum())
    print(f"\nnonlinear comparisons below -2 SE: {below} of {2 * len(nonlinear)}")
    if len(argv) > 2:
        for test, (m, se, cells) in pooled(pd.read_csv(argv[0]), pd.read_csv(argv[1]),
                                           pd.read_csv(argv[2])).items():
            print(f"pooled difference in gap closed, {test} groups: {m:+.2f} points "
                  f"(SE {se:.2f}) over {cells} nonlinear cells")


if __name__ == "__main__":
    main(sys.argv[1:])
