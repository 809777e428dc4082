"""Scale of the Gaussian variational approximation: a crossed binomial model at 1M rows.

Issue "Scale", item 2: ``y ~ x + (1 | student) + (1 | item)`` with 100,000 students, fitted
with ``approx="variational"`` (minibatches of whole students, see
:mod:`ngmm_formula.approx.variational`), without a dense Hessian. Simulated with
:func:`ngmm_formula.datasets.simulate_crossed` (student SD 1, item SD 0.5, intercept -0.5,
slope 0.5). A smaller design is also fitted with the Laplace approximation (joint dense
Cholesky) and the variational full-batch fit, back to back, for the accuracy and time ratio.

Each fit runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``:
Python, torch, data and fit) is its own. Prints a markdown table::

    python benchmarks/variational.py                      # 100k students x 10 items (1M rows)
    python benchmarks/variational.py --students 20000     # quicker
    python benchmarks/variational.py --small 2000         # size of the Laplace comparison
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
from ngmm_formula import Control, ngmm
from ngmm_formula.datasets import simulate_crossed

students, items, per, approx, patience, seed = sys.argv[1:7]
df = simulate_crossed(int(students), int(items), int(per), "binomial", seed=int(seed))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
fit = ngmm("y ~ x + (1 | student) + (1 | item)", df, "binomial", approx=approx,
           control=Control(progress=False, patience=int(patience)), seed=int(seed))
seconds = time.perf_counter() - t0
vc = fit.varcorr.set_index("group")["sdcor"]
print(json.dumps({
    "approx": approx, "rows": len(df), "students": int(students), "items": int(items),
    "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "rss_before_fit_gb": rss0 / 1e6,
    "sd_student": float(vc["student"]), "sd_item": float(vc["item"]),
    "intercept": float(fit.fixef["(Intercept)"]), "x": float(fit.fixef["x"]),
    "loglik": fit.loglik, "message": fit.diagnostics.optimizer_message,
    "truth": {k: df.attrs[k] for k in ("student_sd", "item_sd", "intercept", "beta_x",
                                       "student_sd_realised", "item_sd_realised",
                                       "item_mean_realised")},
}))
"""


def run(students: int, items: int, per: int, approx: str, patience: int, seed: int
        ) -> dict[str, object]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(students), str(items), str(per),
                          approx, str(patience), str(seed)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--per-student", type=int, default=10)
    ap.add_argument("--small", type=int, default=2000,
                    help="students of the Laplace-vs-variational comparison (0: skip)")
    ap.add_argument("--patience", type=int, default=6,
                    help="Control.patience of the minibatch fit (epochs without improvement)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    if args.small:
        for approx in ("laplace", "variational"):
            rows.append(run(args.small, min(args.items, 100), args.per_student, approx,
                            args.patience, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(run(args.students, args.items, args.per_student, "variational",
                    args.patience, args.seed))
    print(json.dumps(rows[-1]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    t = rows[-1]["truth"]
    print(f"\ntruth of the largest design: student SD {t['student_sd']} (drawn: "
          f"{t['student_sd_realised']:.4f}), item SD {t['item_sd']} (drawn: "
          f"{t['item_sd_realised']:.4f}), intercept {t['intercept']} (+ drawn item mean "
          f"{t['item_mean_realised']:.4f}), x {t['beta_x']}")
    print("\n| approx | rows | students x items | time (s) | peak RSS (GB) | SD student | "
          "SD item | intercept | x | logLik / ELBO |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['approx']} | {r['rows']:,} | {r['students']:,} x {r['items']} | "
              f"{r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['sd_student']:.4f} | "
              f"{r['sd_item']:.4f} | {r['intercept']:.4f} | {r['x']:.4f} | {r['loglik']:.1f} |")


if __name__ == "__main__":
    main()
