"""Large crossed and nested linear mixed models against lme4 (issue 14).

The reference values are lme4's, from the committed R script ``benchmarks/lmm_speed.R`` (its
output ``benchmarks/results/lmm_speed_lme4.json``: lmer with its default control, lme4
1.1-31): mlmRev's Chem97 with school and lea (local education authority) as crossed
intercepts, ML, 31,022 rows; and InstEval with three crossed terms, REML, 73,421 rows. Both
data sets are bundled. Tolerances (the issue's): log-likelihood within 1e-4, every standard
deviation within 1e-3 relative. They hold on any machine: both optimisers (BOBYQA, lme4's
from theta = 1 and this package's from a moment start) stop where the profiled deviance is
flat to ~1e-8 (measured differences 7.6e-10 and 2.3e-8 in the log-likelihood, 1.8e-5 and
3.9e-5 in the SDs: ``benchmarks/results/lmm_speed_stop28.md``), and a different BLAS or
rounding moves the optimum by orders of magnitude less than the tolerances.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from ngmm_formula import ngmm
from ngmm_formula.datasets import load

LME4 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lmm_speed_lme4.json"

MODELS = {
    "chem97": ("Chem97", "score ~ gcsecnt + (1|school) + (1|lea)", False),
    "insteval": ("InstEval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", True),
}


def lme4(key: str) -> dict:
    rows = [json.loads(line) for line in LME4.read_text().splitlines() if line.startswith("{")]
    return next(r for r in rows if r["id"] == key)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_large_crossed_lmm_equals_lme4(key: str) -> None:
    name, formula, reml = MODELS[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lme4's own fits are not singular; nothing to hide
        fit = ngmm(formula, load(name), reml=reml)
    ref = lme4(key)
    assert fit.nobs == ref["nobs"]
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-4)
    vc = fit.varcorr[fit.varcorr["var2"].isna()]
    ours = {f"{g}:{'' if g == 'Residual' else v}": s
            for g, v, s in zip(vc["group"], vc["var1"], vc["sdcor"])}
    assert set(ours) == set(ref["sd"])
    for term, sd in ref["sd"].items():
        assert ours[term] == pytest.approx(sd, rel=1e-3), term
