"""Speed and memory of an ``nn()`` over a factor with many levels: embeddings against one-hot.

Target of issue 13: an ``nn()`` over a 10,000-level factor at 20,000 rows fits in under 20 s
and 1 GB (measured before embeddings, with one-hot inputs: 129 s and 5.1 GB, 20 epochs).

Data (binomial): 20 rows per group, ``eta = sin(2 x1) + a_h + 0.5 x3 + b_g`` with
``x1 ~ U(-2, 2)``, ``x3 ~ N(0, 1)``, ``b_g ~ N(0, 1)`` and a factor ``h`` of ``L`` levels drawn
uniformly per row with effects ``a_h ~ N(0, 0.5^2)``; the model is
``y ~ nn(x1, h) + x3 + (1 | g)`` (two hidden layers of 64). ``--epochs 20`` (the default) runs
exactly 20 epochs (``Control(epochs=20, patience=10**6)``: the issue's measurement);
``--epochs 0`` uses the default Control (early stopping).

Each fit runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``: Python,
torch, the data and the fit) is its own. ``embedded`` is the package's encoding of a factor
input; ``onehot`` forces the old one-hot columns (``design.EMBED_MIN_LEVELS`` raised above
the number of levels) for the comparison in the same run. Also printed: the held-out
log-likelihood per observation on 2,000 new rows of the training groups and levels.

    python benchmarks/neural_factor.py                                # 10,000 levels, 20,000 rows
    python benchmarks/neural_factor.py --levels 1000 10000 --encodings embedded onehot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, pandas as pd, torch
import ngmm_formula.design as design
from ngmm_formula import Control, ngmm

levels, rows, epochs, encoding, seed = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                        sys.argv[4], int(sys.argv[5]))
if encoding == "onehot":
    design.EMBED_MIN_LEVELS = levels + 1
rng = np.random.default_rng(seed)
n = rows + 2000
groups = max(2, rows // 20)
g = np.arange(n) % groups
h = rng.integers(0, levels, n)
a = rng.normal(0, 0.5, levels)
b = rng.normal(0, 1, groups)
x1, x3 = rng.uniform(-2, 2, n), rng.normal(size=n)
eta = np.sin(2 * x1) + a[h] + 0.5 * x3 + b[g]
y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
df = pd.DataFrame({"y": y, "x1": x1, "x3": x3, "g": g.astype(str),
                   "h": pd.Categorical([f"L{v}" for v in h])})
train, test = df.iloc[:rows], df.iloc[rows:]
control = (Control(progress=False) if epochs == 0
           else Control(epochs=epochs, patience=10**6, progress=False))
t0 = time.perf_counter()
fit = ngmm("y ~ nn(x1, h) + x3 + (1 | g)", train, "binomial", control=control, seed=seed)
total = time.perf_counter() - t0
p = fit.predict(test, allow_new_levels=True)
yt = test["y"].to_numpy()
ll = float(np.mean(yt * np.log(p) + (1 - yt) * np.log1p(-p)))
h_ = fit.history
print(json.dumps({
    "levels": levels, "rows": rows, "encoding": encoding, "seconds": total,
    "train_seconds": h_.seconds, "epochs": len(h_.train), "best_epoch": h_.best_epoch,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "net_X_mb": sum(ni.X.nbytes for ni in fit.design.nets) / 1e6,
    "n_weights": int(sum(net.n_weights for net in fit.nets)), "heldout_ll": ll,
    "torch_threads": torch.get_num_threads(),
}))
"""


def run(levels: int, rows: int, epochs: int, encoding: str, seed: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(levels), str(rows), str(epochs),
                          encoding, str(seed)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[10_000])
    ap.add_argument("--rows-per-level", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=20, help="0: default Control")
    ap.add_argument("--encodings", nargs="+", default=["embedded"],
                    choices=["embedded", "onehot"])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"epochs {args.epochs or 'default Control'}")
    header = (f"{'levels':>7} {'rows':>7} {'encoding':>9} {'total s':>8} {'train s':>8} "
              f"{'epochs':>6} {'peak GB':>8} {'net_X MB':>9} {'weights':>8} {'ll/obs':>8}")
    print(header)
    print("-" * len(header))
    for levels in args.levels:
        rows = int(levels * args.rows_per_level)
        for enc in args.encodings:
            r = run(levels, rows, args.epochs, enc, args.seed)
            print(f"{r['levels']:>7} {r['rows']:>7} {r['encoding']:>9} {r['seconds']:>8.1f} "
                  f"{r['train_seconds']:>8.1f} {r['epochs']:>6} {r['peak_rss_gb']:>8.2f} "
                  f"{r['net_X_mb']:>9.2f} {r['n_weights']:>8} {r['heldout_ll']:>8.4f}",
                  flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("target (10,000 levels, 20,000 rows): under 20 s and 1 GB")


if __name__ == "__main__":
    main()
