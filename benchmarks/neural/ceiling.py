#!/usr/bin/env python
"""How much of each cell's GLMM-to-oracle gap can be closed at all: the broad suite's gap
closed by the NGMM and by GPBoost beside the GLMM that knows the shape (``suite.py``'s
``known_shape``: the terms of f as fixed effects, their coefficients estimated).

The oracle is given f with its true coefficients; a method that has to find f from the
training rows pays for every quantity it estimates, and the known-shape GLMM pays only for
a few coefficients. Its gap closed is therefore a ceiling (in expectation) for any method
that does not know f, and the issue's floor of 70 % per cell is read against it::

    python benchmarks/neural/ceiling.py results/baselines_confirm5.csv \\
        results/ngmm_confirm5_stop35_new.csv results/known_shape_confirm5.csv

Gap closed per cell as ``suite.py`` computes it (the mean over seeds of each seed's share),
known groups / new groups; ``NGMM / ceiling`` is the NGMM's gap closed over the known-shape
GLMM's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "vignettes"))
import _common as C  # noqa: E402

METHODS = ("ngmm", "gpboost", "known_shape")


def ceilings(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (shape, family): gap closed by each of :data:`METHODS` present, known and
    new groups, and the NGMM's share of the known-shape GLMM's."""
    out = []
    for (shape, family), cell in runs.groupby(["shape", "family"], sort=False):
        row: dict[str, object] = {"shape": shape, "family": family}
        for where in ("known", "new"):
            w = cell.pivot_table(index="seed", columns="method", values=f"ll_{where}")
            gap = w["oracle"] - w["glmm"]
            for m in METHODS:
                if m in w:
                    row[f"{m}_{where}"] = float(((w[m] - w["glmm"]) / gap).mean() * 100)
            if {"ngmm", "known_shape"} <= set(w.columns):
                row[f"ngmm_of_ceiling_{where}"] = (row[f"ngmm_{where}"]  # type: ignore[operator]
                                                   / row[f"known_shape_{where}"] * 100)
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="runs of suite.py (baselines, NGMM, known shape)")
    a = p.parse_args(argv)
    runs = pd.concat([pd.read_csv(f) for f in a.csv], ignore_index=True)
    table = ceilings(runs[runs["shape"] != "linear"])
    print(C.header("Neural terms: gap closed against the known-shape ceiling",
                   " ".join(sys.argv)))
    print(C.md_table(table, ".1f"))


if __name__ == "__main__":
    main()
