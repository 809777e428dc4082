"""The vignettes run end to end in quick mode and write their outputs.

Each vignette runs in a subprocess with ``--quick`` (reduced sizes) and a temporary output
folder; the checks are structural (exit status, files written, finite numbers), never about
the experiments' outcomes, which ``benchmarks/neural/README.md`` reports from full runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

VIGNETTES = Path(__file__).resolve().parents[1] / "vignettes"

pytest.importorskip("matplotlib")


def run_vignette(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NGMM_QUICK="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(VIGNETTES / name), "--quick", "--output",
                           str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_finite(frame: pd.DataFrame, columns: list[str]) -> None:
    for c in columns:
        values = pd.to_numeric(frame[c], errors="coerce").to_numpy(float)
        assert values.size and np.isfinite(values).all(), (c, values)


def test_nonlinear_synthetic(tmp_path: Path) -> None:
    run_vignette("nonlinear_synthetic.py", tmp_path)
    runs = pd.read_csv(tmp_path / "synthetic_runs.csv")
    assert {"ngmm", "glmm", "statsmodels", "oracle"} <= set(runs.method)
    assert set(runs.family) == {"gaussian", "binomial", "poisson"}
    assert_finite(runs, ["ll_known", "ll_new", "eta_rmse", "sd_b", "seconds"])
    text = (tmp_path / "synthetic_summary.md").read_text()
    assert "## Targets of the issue" in text
    assert (tmp_path / "synthetic_partial_dependence.png").stat().st_size > 0


def test_gpboost_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without GPBoost the synthetic vignette drops its rows instead of failing."""
    monkeypatch.syspath_prepend(str(VIGNETTES))
    import nonlinear_synthetic

    monkeypatch.setitem(sys.modules, "gpboost", None)  # import gpboost raises ImportError
    assert nonlinear_synthetic.gpboost_available() is None


@pytest.mark.slow
def test_contraception(tmp_path: Path) -> None:
    run_vignette("contraception.py", tmp_path)
    cv = pd.read_csv(tmp_path / "real_cv.csv")
    assert set(cv.scheme) == {"within groups", "held-out groups"}
    assert_finite(cv, ["ll_per_obs", "auc"])
    assert (tmp_path / "real_partial_dependence.png").stat().st_size > 0
    assert (tmp_path / "real_summary.md").exists()


@pytest.mark.slow
def test_item_response(tmp_path: Path) -> None:
    run_vignette("item_response.py", tmp_path)
    runs = pd.read_csv(tmp_path / "item_response_runs.csv")
    assert set(runs.model) == {"NGMM", "GLMM"}
    assert_finite(runs, ["ll_per_obs", "auc", "sd_id", "sd_item"])
    assert (tmp_path / "item_response_partial_dependence.png").stat().st_size > 0
    assert (tmp_path / "item_response_summary.md").exists()


@pytest.mark.slow
def test_student_proficiency(tmp_path: Path) -> None:
    run_vignette("student_proficiency.py", tmp_path)
    real = pd.read_csv(tmp_path / "student_proficiency_real.csv")
    assert set(real.data) == {"lsat7", "VerbAgg"}
    assert_finite(real, ["logLik", "AIC"])
    synth = pd.read_csv(tmp_path / "student_proficiency_synthetic.csv")
    assert set(synth.model) == {"oracle", "Rasch", "rr d=1", "rr d=2", "rr d=2 + nn"}
    assert_finite(synth, ["held-out responses", "new students"])
    assert (tmp_path / "student_proficiency.png").stat().st_size > 0
    assert "## Synthetic" in (tmp_path / "student_proficiency_summary.md").read_text()
