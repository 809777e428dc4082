#!/usr/bin/env python
"""Standard errors of a large quadrature fit: finite-difference Hessian vs BHHH's information.

``rr(0 + item | id, d = 2)`` with ``x1 + x2`` on 10^5 simulated responses (3,333 students x 30
of 100 items, ``benchmarks/irt_data.py``, seed 0), ``approx="auto"`` (AGQ, 7 nodes per axis),
301 parameters. ``fd``: the finite-difference Hessian (2 x 301 gradient evaluations per
Hessian, as below ``fit.SCORE_INFORMATION_MIN_WORK``); ``bhhh``: the outer product of the
per-student scores (one evaluation; the default above that threshold).

Usage (one thread each; the two can run side by side on two cores)::

    OMP_NUM_THREADS=1 python benchmarks/irt_information.py bhhh
    OMP_NUM_THREADS=1 python benchmarks/irt_information.py fd

Measured (2026-12-06, 2 shared cores, both at once): bhhh 478.1 s, 334 evaluations,
logLik -56067.802; fd did not finish within 1,500 s (killed by ``timeout 1500``).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import irt_data  # noqa: E402

import ngmm_formula.fit as fit_module  # noqa: E402
from ngmm_formula import ngmm  # noqa: E402


def main(mode: str) -> None:
    if mode not in ("fd", "bhhh"):
        raise SystemExit("usage: irt_information.py {fd,bhhh}")
    df, _ = irt_data.simulate(3333, 100, 30, d=2, seed=0)
    if mode == "fd":
        fit_module.SCORE_INFORMATION_MIN_WORK = float("inf")
    t = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm("y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 2)", df, "binomial")
    print(f"{mode}: {fit.approximation.title}; {time.time() - t:.1f} s, "
          f"{fit.diagnostics.evaluations} evaluations, logLik {fit.loglik:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bhhh")
