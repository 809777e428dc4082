#!/usr/bin/env python
"""From lme4 to ngmm_formula: the same models side by side.

For each model the R call, the Python call, and lme4's numbers next to this package's
(log-likelihood, fixed effects, random-effect standard deviations). lme4's numbers are the
committed reference values of ``tests/reference/lme4_refs.json`` (made by
``tests/reference/make_refs.R`` with lme4 1.1-31 / glmmTMB 1.1.5), so this runs without R.

Run ``python vignettes/lme4_to_ngmm.py [--quick] [--output DIR]``; writes
``lme4_to_ngmm.md`` (the side-by-side tables and this package's summaries) to DIR
(default ``vignettes/output``).

Conventions worth knowing when moving from lme4:

* R's ``I(age^2)`` is ``I(age ** 2)`` here (the fixed part is read by formulaic, whose
  ``I()`` is Python); the coefficient is still named ``I(age^2)``.
* ``ngmm()`` chooses the approximation like this: exact (REML by default) for Gaussian
  identity models, as ``lmer``; adaptive Gauss-Hermite quadrature where the integral
  factorises by group; Laplace otherwise. ``approx="laplace"`` gives ``glmer``'s default.
* Log-likelihoods always carry the full normalising constants; lme4's ``nAGQ > 1``
  log-likelihood omits the saturated model's, so it is converted here before comparing.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from ngmm_formula import datasets, get_family, ngmm

ROOT = Path(__file__).resolve().parents[1]
REFS = {f["id"]: f for f in json.loads(
    (ROOT / "tests" / "reference" / "lme4_refs.json").read_text())["fits"]}

# (reference id, R call, data set, formula for this package, family, keyword arguments)
PANEL = [
    ("cbpp_logit_laplace",
     'glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)',
     "cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial",
     {"approx": "laplace"}),
    ("cbpp_logit_agq25",
     'glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, '
     'nAGQ = 25)',
     "cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial",
     {"approx": "agq", "nagq": 25}),
    ("sleep_reml", 'lmer(Reaction ~ Days + (Days | Subject), sleepstudy)',
     "sleepstudy", "Reaction ~ Days + (Days | Subject)", "gaussian", {}),
    ("sleep_ml", 'lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE)',
     "sleepstudy", "Reaction ~ Days + (Days | Subject)", "gaussian", {"reml": False}),
    ("grouse_brood_laplace",
     'glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD), grouseticks, poisson)',
     "grouseticks", "TICKS ~ YEAR + HEIGHT + (1 | BROOD)", "poisson", {"approx": "laplace"}),
    ("contra_int_laplace",
     'glmer(use ~ age + I(age^2) + urban + livch + (1 | district), Contraception, binomial)',
     "Contraception", "use ~ age + I(age ** 2) + urban + livch + (1 | district)", "binomial",
     {"approx": "laplace"}),
    ("penicillin_reml", 'lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin)',
     "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "gaussian", {}),
    ("verbagg_laplace",
     'glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial)',
     "VerbAgg", "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", "binomial",
     {"approx": "laplace"}),
]
QUICK = {"cbpp_logit_laplace", "sleep_reml", "grouse_brood_laplace"}


def lme4_loglik(ref: dict) -> float:
    """lme4's log-likelihood with the full constants (nAGQ > 1 omits the saturated one)."""
    return float(ref.get("logLik_full", ref["logLik"]))


def side_by_side(ref: dict, fit) -> list[str]:  # type: ignore[no-untyped-def]
    rows = ["| quantity | lme4 | ngmm_formula | difference |", "|---|---:|---:|---:|"]
    ll = lme4_loglik(ref)
    rows.append(f"| logLik | {ll:.4f} | {fit.loglik:.4f} | {fit.loglik - ll:+.1e} |")
    for name, value in ref["fixef"].items():
        ours = float(fit.fixef[name])
        rows.append(f"| {name} | {value:.5g} | {ours:.5g} | {ours - value:+.1e} |")
    for r_row, ours in zip(ref["varcorr"], fit.varcorr.itertuples(index=False)):
        label = f"{r_row['grp']} {r_row['var1'] or ''} {r_row['var2'] or ''}".strip()
        kind = "cor" if r_row["var2"] else "sd"
        rows.append(f"| {kind}: {label} | {r_row['sdcor']:.5g} | {float(ours.sdcor):.5g} | "
                    f"{float(ours.sdcor) - r_row['sdcor']:+.1e} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few small models only")
    ap.add_argument("--output", type=Path, default=ROOT / "vignettes" / "output")
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    lines = ["# From lme4 to ngmm_formula", "",
             "lme4's numbers come from `tests/reference/lme4_refs.json` (lme4 1.1-31, "
             "glmmTMB 1.1.5); this package's from the calls shown.", ""]
    worst = 0.0
    for ref_id, r_call, data_name, formula, family, kw in PANEL:
        if args.quick and ref_id not in QUICK:
            continue
        ref = REFS[ref_id]
        fam = get_family(family, ref.get("link") if family != "gaussian" else None)
        data = datasets.load(data_name)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = ngmm(formula, data, fam, **kw)
        seconds = time.perf_counter() - t0
        args_txt = "".join(f", {k}={v!r}" for k, v in kw.items())
        lines += [f"## {ref_id}", "", "```r", r_call, "```", "", "```python",
                  f'ngmm("{formula}", datasets.load("{data_name}"), "{family}"{args_txt})',
                  "```", "", *side_by_side(ref, fit), "",
                  f"Fit time: {seconds:.2f} s (lme4 with tightened tolerances: "
                  f"{ref.get('time_sec', float('nan')):.2f} s).", "", "```",
                  str(fit.summary()), "```", ""]
        worst = max(worst, abs(fit.loglik - lme4_loglik(ref)))
        print(f"{ref_id:24s} logLik {fit.loglik:12.4f}  lme4 {lme4_loglik(ref):12.4f}  "
              f"{seconds:6.2f} s")
    lines.append(f"Largest log-likelihood difference: {worst:.1e}.")
    (args.output / "lme4_to_ngmm.md").write_text("\n".join(lines) + "\n")
    print(f"largest |logLik difference| {worst:.1e}; wrote {args.output / 'lme4_to_ngmm.md'}")
    if not np.isfinite(worst) or worst > 1e-3:
        raise SystemExit("log-likelihoods differ from lme4's by more than 1e-3")


if __name__ == "__main__":
    main()
