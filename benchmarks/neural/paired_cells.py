"""Two NGMM runs of ``suite.py`` on the same seeds, cell by cell: the paired difference of the
held-out log-likelihood per observation (candidate - reference), its standard error over
seeds, and the cells where the candidate is lower by more than two standard errors (the
"no cell falls by more than two paired SEs" part of a pre-registered rule).

    python benchmarks/neural/paired_cells.py REFERENCE.csv CANDIDATE.csv

Prints a markdown table (every (shape, family), known and new groups) and the count of
comparisons below -2 SE among the nonlinear cells (shape ``linear`` excluded).
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


if __name__ == "__main__":
    main(sys.argv[1:])
