"""Screen a Control setting on a few cells of the broad benchmark (``suite.py``), against the
development baselines (``results/baselines_dev.csv``).

Usage::

    python benchmarks/neural/screen_suite.py TAG CONTROL_JSON SHAPES FAMILIES FIRST:LAST [HIDDEN]

e.g. ``screen_suite.py lr3e4 '{"lr": 3e-4}' sparse20 gaussian,binomial 0:3`` or, for a
network of 16 units, ``screen_suite.py h16 '{}' sparse20 gaussian 0:3 "(16,)"``. Writes
``/tmp/screen_TAG.csv`` (not a results file: a screen is never a figure to report) and prints,
per cell, the mean gap closed (%) and the mean difference to GPBoost (per observation) on
known and new groups. Only development seeds (0-9) have baselines here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite as S  # noqa: E402


def main(argv: list[str]) -> pd.DataFrame:
    tag, control, shapes, families, seeds = argv[:5]
    hidden = argv[5] if len(argv) > 5 else None
    S.NGMM_CONTROL.update(json.loads(control))
    if hidden:
        fit = S._quiet_fit

        def with_hidden(formula: str, *args, **kwargs):  # type: ignore[no-untyped-def]
            return fit(formula.replace(") + x3", f", hidden={hidden}) + x3", 1), *args,
                       **kwargs)
        S._quiet_fit = with_hidden
    first, last = map(int, seeds.split(":"))
    rows = [r for shape in shapes.split(",") for family in families.split(",")
            for seed in range(first, last)
            for r in S.one_cell(S.SHAPES[shape], family, seed, ["ngmm"])]
    runs = pd.DataFrame(rows)
    runs.to_csv(f"/tmp/screen_{tag}.csv", index=False)
    base = pd.read_csv(HERE / "results" / "baselines_dev.csv")
    wide = base[base.method.isin(["glmm", "oracle", "gpboost"])].pivot_table(
        index=["shape", "family", "seed"], columns="method", values=["ll_known", "ll_new"])
    wide.columns = [f"{score}_{method}" for score, method in wide.columns]
    m = runs.merge(wide.reset_index(), on=["shape", "family", "seed"])
    for k in ("known", "new"):
        m[f"gap_{k}"] = 100 * (m[f"ll_{k}"] - m[f"ll_{k}_glmm"]) / (
            m[f"ll_{k}_oracle"] - m[f"ll_{k}_glmm"])
        m[f"vs_gpboost_{k}"] = m[f"ll_{k}"] - m[f"ll_{k}_gpboost"]
    table = m.groupby(["shape", "family"])[
        ["gap_known", "gap_new", "vs_gpboost_known", "vs_gpboost_new", "seconds"]].mean()
    print(table.round(3).to_string())
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
