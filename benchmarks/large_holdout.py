"""Held-out quality and time of the binomial NGMM at 10^6 rows, for settings of ``Control``.

The sine benchmark (``vignettes/nonlinear_synthetic.py``) scores fits of 4,000 rows; this
script scores the same generator at scale, to check that a setting which changes how the
large fits train (issue 19: ``Control.steps_per_epoch``) keeps what they learn. Data:
``make_data`` of that vignette with ``--groups`` training groups of 20 rows, 4 test rows per
training group and 2,000 new groups of 20 rows (seed ``--seed``). Methods: the NGMM
``y ~ nn(x1, x2, hidden=(64, 64)) + x3 + (1 | g)`` once per ``--control`` setting (JSON
objects of ``Control`` fields, ``{}`` the defaults), the linear GLMM and the oracle (the true
function as an offset). Held-out log-likelihood per observation as in the vignette
(``_common.score``: conditional on the predicted random effect for known groups, marginal for
new groups) and the gap closed ``(ll - ll_GLMM) / (ll_oracle - ll_GLMM)``. One thread, each
fit in this process, one after the other::

    python benchmarks/large_holdout.py --seed 1 --control '{"steps_per_epoch": null}' '{}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "vignettes")]

import _common as C  # noqa: E402
import nonlinear_synthetic as V  # noqa: E402

from ngmm_formula import Control, ngmm  # noqa: E402

FORMULAS = {"glmm": "y ~ x1 + x2 + x3 + (1 | g)", "oracle": "y ~ x3 + offset(f_true) + (1 | g)"}
NGMM = "y ~ nn(x1, x2, hidden=(64, 64)) + x3 + (1 | g)"


def score(fit, known, new) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    est = C.ngmm_estimates(fit, "g")
    sk = C.score("binomial", est, known, known["y"].to_numpy(), "g", known=True)
    sn = C.score("binomial", est, new, new["y"].to_numpy(), "g", known=False)
    return sk["loglik"], sn["loglik"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--control", nargs="+", default=["{}"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = {"groups": args.groups, "per_group": 20, "test_per_group": 4, "new": 2000}
    train, known, new, _ = V.make_data("binomial", "sine", args.seed, sizes)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {}
        for name, formula in FORMULAS.items():
            ref[name] = score(ngmm(formula, train, "binomial", seed=args.seed), known, new)
        for setting in args.control:
            t0 = time.perf_counter()
            fit = ngmm(NGMM, train, "binomial", seed=args.seed,
                       control=Control(progress=False, **json.loads(setting)))
            seconds = time.perf_counter() - t0
            ll = score(fit, known, new)
            gap = [100 * (ll[i] - ref["glmm"][i]) / (ref["oracle"][i] - ref["glmm"][i])
                   for i in (0, 1)]
            h = fit.history
            rows.append(f"| `{setting}` | {seconds:.1f} | {h.seconds:.1f} | {h.epochs} "
                        f"({h.passes:.1f}) | {h.best_epoch} | {ll[0]:.6f} / {ll[1]:.6f} | "
                        f"{gap[0]:.2f} / {gap[1]:.2f} | "
                        f"{float(fit.varcorr.sdcor.iloc[0]):.3f} |")
    print(f"{len(train):,} training rows, {args.groups:,} groups, seed {args.seed}; GLMM "
          f"{ref['glmm'][0]:.6f} / {ref['glmm'][1]:.6f}, oracle {ref['oracle'][0]:.6f} / "
          f"{ref['oracle'][1]:.6f} (known / new groups)\n")
    print("| Control | total s | train s | epochs (passes) | best epoch | NGMM ll known / new "
          "| gap closed % known / new | RE SD |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
