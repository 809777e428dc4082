#!/usr/bin/env python
"""The rr() reference models against glmmTMB 1.1.5, with times (issue 16).

For each model of ``tests/reference/rr_refs.json`` (written by
``tests/reference/make_rr_refs.R``): this package's log-likelihood and time, and for the
reduced-rank models the largest relative differences of the loadings (per factor, relative to
its largest loading) and of their standard errors, and of the Laplace objective at glmmTMB's
parameters (its optimum and a perturbed point). glmmTMB's times are the R script's record
(another run, the same machine), not measured here.

Usage::

    python benchmarks/rr_reference.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ngmm_formula import ngmm  # noqa: E402
from tests.test_rr_reference import (  # noqa: E402
    ALL_MODELS,
    REF,
    data,
    loading_matrix,
    loadings_from_theta,
    objective,
)


def main() -> None:
    for m in ALL_MODELS:
        ref = REF[m]
        t = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = ngmm(ref["formula"], data(ref["dataset"]), "binomial", approx="laplace")
        line = (f"{m}: logLik {fit.loglik:.6f} vs {ref['logLik']:.6f} "
                f"(diff {fit.loglik - ref['logLik']:.2e}); {time.time() - t:.2f} s "
                f"(glmmTMB's record {ref['time_sec']:.2f} s)")
        if "rr" in ref:
            theirs, ours = loading_matrix(ref["rr"]), fit.reduced_rank[0]
            rel = (np.abs(ours.loadings - theirs).max(0) / np.abs(theirs).max(0)).max()
            se = np.array(ref["rr"]["loadings_se"]["data"], dtype=float)
            free = se > 0
            se_rel = np.max(np.abs(ours.loadings_se[free] - se[free]) / se[free])
            obj = max(abs(-objective(m, ref["objective"][p]["fixef"],
                                     loadings_from_theta(ref, ref["objective"][p]["theta"]))
                          / ref["objective"][p]["value"] - 1)
                      for p in ("optimum", "perturbed"))
            line += (f"; loadings {rel:.2e}; SEs {se_rel:.2e}; objective at glmmTMB's "
                     f"parameters {obj:.1e} (relative)")
        print(line)


if __name__ == "__main__":
    main()
