r"""Student-proficiency benchmark: reduced-rank (multidimensional IRT) fits, 10^5 to 3 x 10^6.

Data: :func:`irt_data.simulate` (a 2-dimensional 2PL model, student covariates entering
nonlinearly, each student answering 30 random items; model and math in
``benchmarks/irt_data.py``), students = responses / 30. Item banks: 500 items at 10^6 and
above (issue 16's shape: 100,000 students x 500 items at 3 x 10^6), 100 items at 10^5 (so
each item keeps about 900 responses rather than 180; the dense rr design is n x items),
15 items and 10 per student with ``--quick``.

Split (:func:`irt_data.split`, seed = data seed): 10% of the students are held out entirely
(**new students**); of the others, a random 10% of the responses is held out (**held-out
responses**); the fits see the remaining responses.

Models (all ``family="binomial"``, ``approx="laplace"`` -- the engine's AGQ for d = 2 is a
product rule, several times the Laplace cost per evaluation at these sizes; ``--approx``
changes it):

* ``rasch``   ``y ~ 0 + item + x1 + x2 + (1 | id)``
* ``rr1``     ``y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 1)``  (2PL)
* ``rr2``     ``y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 2)``
* ``rr2_nn``  ``y ~ 0 + item + nn(x1, x2) + rr(0 + item | id, d = 2)``

(the linear covariates are in all three linear models, so that they differ only in the
latent structure), and the **oracle**: the true item parameters, loadings and covariate
effect, with the students' conditional modes computed from them
(:func:`irt_data.conditional_modes`, Newton per student in numpy).

Each fit runs in a fresh subprocess (``ru_maxrss`` is then the fit's own peak resident
memory: Python, torch, the training data and the fit; measured right after ``ngmm()``
returns, before any prediction).

Figures reported, fixed before the first run (issue 16, "Done when"):

1. fit time (wall s, and CPU s of the process) and peak RSS (GB) of every model and size;
   the target is the 3 x 10^6 ``rr2_nn`` fit: < 10 min and < 8 GB;
2. ``logLik`` of every fit (on its training responses);
3. loadings correlation with the truth, per factor (Pearson over items), for the d = 2
   models; target >= 0.98 at 3 x 10^6;
4. student-score RMSE against the true z (training students, all factors pooled:
   :math:`\sqrt{\mathrm{mean}(\hat z - z)^2}` with :math:`\hat z` = ``fit.scores()``, the
   conditional modes) for the d = 2 models, and the oracle's RMSE (the conditional modes
   under the true parameters from the same responses); target: within 10% of the oracle;
5. held-out log-likelihood per response of (a) held-out responses of training students,
   conditional on the fitted scores: :math:`\log p(y \mid \hat\mu)` with
   :math:`\hat\mu` = ``fit.predict(rows, type="response")``; (b) new students: each new
   student's marginal log-likelihood,
   :math:`\log \int \prod_i p(y_i \mid \hat o_i + \hat\lambda_{j(i)}^\top z)\,\phi_d(z)\,dz`
   with :math:`\hat o` = ``fit.predict(rows, type="link", re_form="NA")`` and the fitted
   loadings (the Rasch model: :math:`\hat\lambda_j = \hat\sigma_{id}`), computed by
   :func:`irt_data.marginal_loglik` (adaptive product Gauss--Hermite rule, 20 nodes per
   dimension, centred at each student's mode and scaled by the Cholesky factor of the
   inverse negative Hessian), summed over new students and divided by their responses.
   Targets: ``rr2_nn`` > ``rr2`` on (a) and (b); ``rr2`` > ``rasch`` on both.

Usage::

    python benchmarks/irt.py --responses 100000            # -> results/irt.md
    python benchmarks/irt.py --responses 100000 1000000 3000000
    python benchmarks/irt.py --quick                       # CI-sized, -> results/irt_quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import irt_data  # noqa: E402

MODELS = {
    "rasch": "y ~ 0 + item + x1 + x2 + (1 | id)",
    "rr1": "y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 1)",
    "rr2": "y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 2)",
    "rr2_nn": "y ~ 0 + item + nn(x1, x2) + rr(0 + item | id, d = 2)",
}
ITEMS_PER_STUDENT = 30

CHILD = r"""
import json, pickle, resource, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
from ngmm_formula import Control, ngmm

path, formula, approx, out, epochs = sys.argv[1:6]
with open(path, "rb") as fh:
    train, held, new = pickle.load(fh)
control = Control(progress=False) if epochs == "0" else Control(progress=False,
                                                                epochs=int(epochs))
t0, c0 = time.perf_counter(), time.process_time()
fit = ngmm(formula, train, "binomial", approx=approx, control=control, seed=0)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
mu = np.asarray(fit.predict(held, type="response"), float)
o_new = np.asarray(fit.predict(new, type="link", re_form="NA"), float)
res = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gb": rss, "loglik": fit.loglik,
       "aic": fit.aic, "npar": int(fit.npar),
       "epochs": len(fit.history.train) if fit.history is not None else None}
arrays = {"mu": mu, "o_new": o_new}
if fit.reduced_rank:
    rr = fit.reduced_rank[0]
    res["columns"] = list(rr.columns)
    res["levels"] = [str(v) for v in rr.levels]
    arrays["loadings"] = np.asarray(rr.loadings, float)
    arrays["scores"] = np.asarray(rr.scores, float)
else:
    vc = fit.varcorr
    res["sd_id"] = float(vc[(vc.group == "id") & vc.var2.isna()].sdcor.iloc[0])
np.savez(out, **arrays)
print(json.dumps(res))
"""


def bernoulli_ll(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    mu = np.clip(mu, 1e-15, 1 - 1e-15)
    return y * np.log(mu) + (1 - y) * np.log1p(-mu)


def prepare(responses: int, n_items: int, per_student: int, seed: int):
    """Data, truth, split and the oracle's numbers for one size."""
    n_students = responses // per_student
    data, truth = irt_data.simulate(n_students, n_items, per_student, d=2, seed=seed)
    new, held = irt_data.split(data, 0.1, 0.1, seed=seed)
    train = data[~new & ~held].reset_index(drop=True)
    held_df = data[held].reset_index(drop=True)
    new_df = data[new].reset_index(drop=True)
    # oracle: conditional modes of the training students under the true parameters
    s_codes = train["id"].cat.codes.to_numpy()
    z_or_all = irt_data.conditional_modes(train.y.to_numpy(), truth.offset(train),
                                          truth.loadings, irt_data.item_codes(train, truth.items),
                                          s_codes)
    trained = np.unique(s_codes)
    oracle = {
        "z_true": truth.z[trained], "z_oracle": z_or_all[trained],
        "students": [truth.students[k] for k in trained],
    }
    eta_held = truth.offset(held_df) + np.einsum(
        "nk,nk->n", truth.loadings[irt_data.item_codes(held_df, truth.items)],
        z_or_all[held_df["id"].cat.codes.to_numpy()])
    from scipy.special import expit

    oracle["ll_held"] = float(bernoulli_ll(held_df.y.to_numpy(), expit(eta_held)).mean())
    oracle["ll_new"] = new_student_ll(new_df, truth.offset(new_df), truth.loadings,
                                      truth.items)
    oracle["rmse"] = float(np.sqrt(np.mean((oracle["z_oracle"] - oracle["z_true"]) ** 2)))
    return data, truth, train, held_df, new_df, oracle


def new_student_ll(new_df: pd.DataFrame, offset: np.ndarray, loadings: np.ndarray,
                   items: list[str]) -> float:
    """Marginal log-likelihood of the new students per response (20 nodes per dimension)."""
    groups = pd.factorize(new_df["id"].astype(str))[0]
    ll = irt_data.marginal_loglik(new_df.y.to_numpy(), offset, loadings,
                                  irt_data.item_codes(new_df, items), groups, nodes=20)
    return float(ll.sum() / len(new_df))


def fit_one(name: str, path: str, folder: str, approx: str, epochs: int) -> dict:
    out = os.path.join(folder, f"{name}.npz")
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, path, MODELS[name], approx, out,
                           str(epochs)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        res.update({k: z[k] for k in z.files})
    return res


def metrics(name: str, res: dict, truth: irt_data.Truth, held_df: pd.DataFrame,
            new_df: pd.DataFrame, oracle: dict) -> dict:
    row = {"model": name, "seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"],
           "peak_rss_gb": res["peak_rss_gb"], "loglik": res["loglik"], "npar": res["npar"],
           "epochs": res["epochs"]}
    row["ll_held"] = float(bernoulli_ll(held_df.y.to_numpy(), res["mu"]).mean())
    if "loadings" in res:
        pos = {c: k for k, c in enumerate(res["columns"])}
        lam = res["loadings"][[pos["item" + it] for it in truth.items]]
    else:
        lam = np.full((len(truth.items), 1), res["sd_id"])
    row["ll_new"] = new_student_ll(new_df, res["o_new"], lam, truth.items)
    for k in range(2):
        row[f"cor_F{k + 1}"] = (float(np.corrcoef(lam[:, k], truth.loadings[:, k])[0, 1])
                                if lam.shape[1] == truth.d else np.nan)
    if "scores" in res and res["scores"].shape[1] == truth.d:
        where = {s: k for k, s in enumerate(res["levels"])}
        zhat = res["scores"][[where[s] for s in oracle["students"]]]
        row["rmse"] = float(np.sqrt(np.mean((zhat - oracle["z_true"]) ** 2)))
    else:
        row["rmse"] = np.nan
    row["rmse_ratio"] = row["rmse"] / oracle["rmse"]
    return row


def table(rows: list[dict]) -> str:
    head = ("| responses | students | items | model | wall s | CPU s | peak RSS GB | epochs "
            "| logLik | npar | cor F1 | cor F2 | score RMSE | / oracle | held-out resp. ll "
            "| new students ll |")
    lines = [head, "|" + "|".join(["---:"] * (head.count("|") - 1)) + "|"]

    def f(v: object, fmt: str) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "-"
        return format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r['responses']:,} | {r['students']:,} | {r['items']} | {r['model']} "
            f"| {f(r.get('seconds'), '.1f')} | {f(r.get('cpu_seconds'), '.1f')} "
            f"| {f(r.get('peak_rss_gb'), '.2f')} | {f(r.get('epochs'), 'd')} "
            f"| {f(r.get('loglik'), '.1f')} | {f(r.get('npar'), 'd')} "
            f"| {f(r.get('cor_F1'), '.4f')} | {f(r.get('cor_F2'), '.4f')} "
            f"| {f(r.get('rmse'), '.4f')} | {f(r.get('rmse_ratio'), '.3f')} "
            f"| {f(r['ll_held'], '.5f')} | {f(r['ll_new'], '.5f')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--responses", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    p.add_argument("--quick", action="store_true", help="CI-sized: 3,000 responses, 15 items")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--approx", default="laplace")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path, default=None,
                   help="markdown file (default results/irt.md, quick results/irt_quick.md)")
    args = p.parse_args()
    output = args.output or HERE / "results" / ("irt_quick.md" if args.quick else "irt.md")
    sizes = [3_000] if args.quick else args.responses
    rows: list[dict] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            n_items = 15 if args.quick else (100 if n <= 100_000 else 500)
            per = 10 if args.quick else ITEMS_PER_STUDENT
            _, truth, train, held_df, new_df, oracle = prepare(n, n_items, per, args.seed)
            base = {"responses": n, "students": n // per, "items": n_items}
            rows.append({**base, "model": "oracle", "rmse": oracle["rmse"],
                         "rmse_ratio": 1.0, "ll_held": oracle["ll_held"],
                         "ll_new": oracle["ll_new"], "cor_F1": 1.0, "cor_F2": 1.0})
            path = os.path.join(folder, f"data_{n}.pkl")
            with open(path, "wb") as fh:
                pickle.dump((train, held_df, new_df), fh)
            print(f"{n:,} responses: {len(train):,} training, {len(held_df):,} held-out "
                  f"responses, {new_df['id'].nunique():,} new students", flush=True)
            for name in args.models:
                res = fit_one(name, path, folder, args.approx, 30 if args.quick else 0)
                row = {**base, **metrics(name, res, truth, held_df, new_df, oracle)}
                rows.append(row)
                print(f"  {name}: {row['seconds']:.1f} s, {row['peak_rss_gb']:.2f} GB, "
                      f"logLik {row['loglik']:.1f}, cor {row['cor_F1']:.3f}/"
                      f"{row['cor_F2']:.3f}, rmse ratio {row['rmse_ratio']:.3f}, held "
                      f"{row['ll_held']:.5f}, new {row['ll_new']:.5f}", flush=True)
    text = table(rows)
    print(text)
    load = os.getloadavg()[0]
    cmd = "python benchmarks/irt.py " + " ".join(sys.argv[1:])
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        head = "unknown"
    import torch

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        f"# Student proficiency (reduced-rank random effects)\n\n"
        f"Command: `{cmd}` at commit {head}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average (1 min) {load:.2f} at the end, torch "
        f"{torch.__version__}; approx={args.approx}; total {time.perf_counter() - t_all:.0f} s."
        f"\n\nModels and metrics: the docstring of `benchmarks/irt.py`. Linear models have "
        f"`+ x1 + x2`; the oracle row uses the true parameters (its cor = 1 by definition). "
        f"Held-out log-likelihoods are per response (higher is better).\n\n{text}\n")
    print(f"written {output}")


if __name__ == "__main__":
    main()
