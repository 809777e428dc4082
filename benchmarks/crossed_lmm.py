"""A simulated MovieLens-1M-size crossed LMM (issue 14): 6,040 users x 3,706 items,
``y ~ 1 + (1 | user) + (1 | item)`` by ML, user and item activity log-normal (a few very
active users and popular items, as in MovieLens).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/crossed_lmm.py --rows 100000 1000209
    OMP_NUM_THREADS=1 python benchmarks/crossed_lmm.py --rows 100000 --lme4   # also lme4

Each size runs in a fresh subprocess (peak resident memory of its own); with ``--lme4`` the
same data are written to a CSV and fitted by ``benchmarks/crossed_lmm.R`` (Rscript, lme4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import pandas as pd
from ngmm_formula import Control, ngmm
df = pd.read_parquet(sys.argv[1])
df["user"] = df["user"].astype("category"); df["item"] = df["item"].astype("category")
t = time.perf_counter()
fit = ngmm("y ~ 1 + (1 | user) + (1 | item)", df, reml=False, control=Control(progress=False))
print(json.dumps({"seconds": time.perf_counter() - t, "loglik": fit.loglik,
                  "sd": [float(v) for v in fit.varcorr.sdcor],
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def simulate(n: int, seed: int = 1) -> pd.DataFrame:
    """MovieLens-1M's numbers of users and items; SDs 0.4 (users), 0.5 (items), 0.9."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 6040, 3706
    p_user = rng.lognormal(0, 1.0, n_users)
    p_item = rng.lognormal(0, 1.3, n_items)
    user = rng.choice(n_users, n, p=p_user / p_user.sum())
    item = rng.choice(n_items, n, p=p_item / p_item.sum())
    b_user, b_item = rng.normal(0, 0.4, n_users), rng.normal(0, 0.5, n_items)
    y = 3.5 + b_user[user] + b_item[item] + rng.normal(0, 0.9, n)
    return pd.DataFrame({"y": y, "user": user, "item": item})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_209])
    ap.add_argument("--lme4", action="store_true", help="fit the same data with lme4 too")
    args = ap.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    print("| rows | ngmm_formula s | peak GB | logLik | SDs (user, item, residual) | lme4 s "
          "| lme4 logLik |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            df = simulate(n)
            path = os.path.join(tmp, f"crossed_{n}.parquet")
            df.to_parquet(path)
            out = subprocess.run([sys.executable, "-c", CHILD, path], check=True,
                                 capture_output=True, text=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            lme4 = ("", "")
            if args.lme4:
                csv = os.path.join(tmp, f"crossed_{n}.csv")
                df.to_csv(csv, index=False)
                rout = subprocess.run(["Rscript", str(HERE / "crossed_lmm.R"), csv],
                                      check=True, capture_output=True, text=True)
                res = json.loads(rout.stdout.strip().splitlines()[-1])
                lme4 = (f"{res['seconds']:.1f}", f"{res['loglik']:.3f}")
            sds = ", ".join(f"{v:.4f}" for v in r["sd"])
            print(f"| {n:,} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['loglik']:.3f} | "
                  f"{sds} | {lme4[0]} | {lme4[1]} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
