#!/usr/bin/env python
"""Large data: minibatches of whole groups, early stopping, time and memory.

A binomial NGMM ``y ~ nn(x1, x2) + x3 + (1 | g)`` on synthetic grouped data of growing
size. The objective is a sum over groups, so training takes AdamW steps on minibatches of
whole groups (``Control.batch_size`` observations, rounded to whole groups: a group's
integral is never split), keeps every group's conditional mode as the warm start of its next
Newton search, and stops early on held-out groups. Then the linear and variance parameters
are refitted by L-BFGS on all the data with the networks fixed.

What to tune on large data (all in ``Control``):

* ``batch_size`` -- observations per step (default 4096); larger batches give smoother
  steps and fewer of them per epoch;
* ``validation`` / ``patience`` / ``min_steps`` -- early stopping on held-out groups;
* ``threads`` -- torch and BLAS threads (default 1: spinning threads on a shared machine cost
  far more than they gain; on an idle many-core machine more threads help large batches);
* ``progress=True`` -- a progress bar with the training and validation objective.

Devices: the fit runs on the CPU (``device="cpu"``); GPUs and data-parallel fitting over
several processes are the subject of the scale issue and not part of this version.

Run ``python vignettes/large_data.py [--quick] [--output DIR]``: writes ``large_data.md``
(a table of rows, groups, seconds, epochs, steps, peak memory, fitted SD) and
``large_data_training_curve.png`` to DIR (default ``vignettes/output``).
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

from ngmm_formula import Control, ngmm
from ngmm_formula.datasets import simulate_grouped

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (for the test suite)")
    ap.add_argument("--output", type=Path, default=ROOT / "vignettes" / "output")
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    sizes = [(2_000, 40), (10_000, 200)] if args.quick else [(10_000, 100), (100_000, 1_000)]
    rows_out = ["| rows | groups | seconds | epochs | best epoch | steps/epoch | peak RSS (GB) "
                "| RE SD (truth 1) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fit = None
    for n, groups in sizes:
        df = simulate_grouped(n_groups=groups, n_per_group=n // groups, family="binomial",
                              effect="sine", seed=1)
        control = Control(progress=False)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = ngmm("y ~ nn(x1, x2) + x3 + (1 | g)", df, "binomial", control=control,
                       seed=1)
        seconds = time.perf_counter() - t0
        h = fit.history
        train_rows = n * (1 - control.validation)
        steps = max(1, round(train_rows / control.batch_size))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        sd = float(fit.varcorr.sdcor.iloc[0])
        rows_out.append(f"| {n} | {groups} | {seconds:.1f} | {len(h.train)} | {h.best_epoch} "
                        f"| ~{steps} | {peak:.2f} | {sd:.3f} |")
        print(rows_out[-1])
    assert fit is not None
    fig = fit.plot_training_curve()
    fig.savefig(args.output / "large_data_training_curve.png", dpi=100)
    text = ["# Large data", "", "Binomial NGMM `y ~ nn(x1, x2) + x3 + (1 | g)`, default "
            "`Control()`, one torch thread. Peak RSS is the process's maximum so far.", "",
            *rows_out, ""]
    (args.output / "large_data.md").write_text("\n".join(text))
    print(f"wrote {args.output / 'large_data.md'}")


if __name__ == "__main__":
    main()
