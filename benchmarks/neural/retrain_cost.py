"""CPU time of the neural fit with ``Control.retrain`` and ``Control.folds`` against the default.

The data of ``benchmarks/neural_speed.py`` (binomial, 100,000 rows, 1,000 groups, seed 1), fitted
in one process with each setting in turn; prints process CPU seconds (one torch thread, so CPU
time is what the wall time is on an idle machine), wall seconds, epochs and the retraining's
optimiser steps::

    python benchmarks/neural/retrain_cost.py                 # default, retrain, folds=3
    python benchmarks/neural/retrain_cost.py --rows 10000
"""

from __future__ import annotations

import argparse
import time
import warnings

from ngmm_formula import Control, ngmm
from ngmm_formula.datasets import simulate_grouped

SETTINGS = {"default": {}, "retrain": {"retrain": True}, "folds=3": {"folds": 3}}


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--groups-per-row", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    groups = int(args.rows * args.groups_per_row)
    df = simulate_grouped(n_groups=groups, n_per_group=args.rows // groups, family="binomial",
                          effect="sine", seed=args.seed)
    base = None
    print("| setting | CPU s | ratio to default | wall s | epochs (first network) | best epoch "
          "| retrained steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, kw in SETTINGS.items():
        c0, w0 = time.process_time(), time.perf_counter()
        fit = ngmm("y ~ nn(x1, x2, hidden=(64, 64)) + x3 + (1 | g)", df, "binomial",
                   control=Control(progress=False, **kw), seed=args.seed)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        base = base or cpu
        h = fit.history
        first = h.members[0] if h.members else h
        print(f"| {name} | {cpu:.1f} | {cpu / base:.2f} | {wall:.1f} | {len(first.train)} | "
              f"{h.best_epoch} | {h.retrained_steps} |", flush=True)


if __name__ == "__main__":
    main()
