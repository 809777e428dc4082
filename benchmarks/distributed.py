"""One process against ``fit_distributed(nprocs=2)`` on a large linear GLMM (one run).

Prints the wall time of each (the worker's start-up excluded: one untimed warm-up call first
starts the forkserver) and the largest differences between the two fits, with the load
average: on a shared machine only the ratio measured in the same run means anything.

    python benchmarks/distributed.py                 # 4000 groups x 25 = 100k rows, binomial
    python benchmarks/distributed.py --groups 400    # quicker
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from ngmm_formula import datasets, fit_distributed, ngmm
from ngmm_formula.datasets import simulate_grouped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4000)
    ap.add_argument("--per-group", type=int, default=25)
    ap.add_argument("--family", default="binomial", choices=["binomial", "poisson", "gaussian"])
    ap.add_argument("--nprocs", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    df = simulate_grouped(n_groups=args.groups, n_per_group=args.per_group,
                          family=args.family, effect="linear", seed=1)
    formula = "y ~ x1 + x2 + x3 + (1 | g)"
    kw = {"reml": False} if args.family == "gaussian" else {}
    # warm-up: imports, and the forkserver the workers are forked from
    ngmm(formula, df.head(200), args.family, **kw)
    fit_distributed("TICKS ~ YEAR + (1 | BROOD)", datasets.load("grouseticks"), "poisson",
                    nprocs=args.nprocs)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    one = ngmm(formula, df, args.family, **kw)
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    dist = fit_distributed(formula, df, args.family, nprocs=args.nprocs, **kw)
    t_dist = time.perf_counter() - t
    load1 = os.getloadavg()[0]
    print(f"{len(df)} rows, {args.groups} groups, {args.family}, approx {one.approximation.kind}"
          f"; load average (1 min) {load0:.2f} before, {load1:.2f} after")
    print(f"{'fit':<22}{'wall s':>9}{'ratio':>8}{'evaluations':>13}")
    print(f"{'one process':<22}{t_one:9.2f}{1.0:8.2f}{one.diagnostics.evaluations:13d}")
    print(f"{f'fit_distributed({args.nprocs})':<22}{t_dist:9.2f}{t_dist / t_one:8.2f}"
          f"{dist.diagnostics.evaluations:13d}")
    print(f"max |difference|: loglik {abs(one.loglik - dist.loglik):.2g}, fixef "
          f"{np.abs(one.fixef - dist.fixef).max():.2g}, theta "
          f"{np.abs(one.theta - dist.theta).max():.2g}")


if __name__ == "__main__":
    main()
