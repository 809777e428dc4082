"""Speed and memory of a neural fit: binomial NGMM, one nn() term of two hidden layers of 64.

Target of the neural-terms issue: 100,000 rows, 1,000 groups, trains to early stopping in
under 60 s on the project's 2-core machine with peak memory under 2 GB.

Each size runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``, which
includes Python, torch and the data) is its own. Prints a table::

    python benchmarks/neural_speed.py                 # 100k rows x 1000 groups
    python benchmarks/neural_speed.py --rows 10000 100000 --groups-per-row 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from ngmm_formula import Control, ngmm
from ngmm_formula.datasets import simulate_grouped

rows, groups, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
df = simulate_grouped(n_groups=groups, n_per_group=rows // groups, family="binomial",
                      effect="sine", seed=seed)
t0 = time.perf_counter()
fit = ngmm("y ~ nn(x1, x2, hidden=(64, 64)) + x3 + (1 | g)", df, "binomial",
           control=Control(progress=False), seed=seed)
total = time.perf_counter() - t0
h = fit.history
print(json.dumps({
    "rows": len(df), "groups": groups, "seconds": total, "train_seconds": h.seconds,
    "epochs": len(h.train), "best_epoch": h.best_epoch, "stopped_early": h.stopped_early,
    "seconds_per_epoch": h.seconds / max(1, len(h.train)),
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "re_sd": float(fit.varcorr.sdcor.iloc[0]), "torch_threads": torch.get_num_threads(),
}))
"""


def run(rows: int, groups: int, seed: int) -> dict:
    # the package of this checkout, not whichever one is installed (as scale.py)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(groups), str(seed)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--groups-per-row", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.2f}")
    header = (f"{'rows':>9} {'groups':>7} {'total s':>8} {'train s':>8} {'epochs':>6} "
              f"{'best':>5} {'s/epoch':>8} {'peak GB':>8} {'RE SD':>6}")
    print(header)
    print("-" * len(header))
    for rows in args.rows:
        groups = max(2, int(rows * args.groups_per_row))
        r = run(rows, groups, args.seed)
        print(f"{r['rows']:>9} {r['groups']:>7} {r['seconds']:>8.1f} {r['train_seconds']:>8.1f} "
              f"{r['epochs']:>6} {r['best_epoch']:>5} {r['seconds_per_epoch']:>8.3f} "
              f"{r['peak_rss_gb']:>8.2f} {r['re_sd']:>6.3f}")
    print("target (100,000 rows, 1,000 groups): under 60 s to early stopping, under 2 GB")


if __name__ == "__main__":
    main()
