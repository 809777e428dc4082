"""The workflow vignettes ("From lme4 to ngmm_formula", "Large data") run in quick mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, out: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "vignettes" / name), "--quick",
                           "--output", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lme4_to_ngmm_quick(tmp_path: Path) -> None:
    run("lme4_to_ngmm.py", tmp_path)  # exits 1 if a logLik differs from lme4's by > 1e-3
    text = (tmp_path / "lme4_to_ngmm.md").read_text()
    assert "## sleep_reml" in text and "Linear mixed model fit by REML" in text


def test_large_data_quick(tmp_path: Path) -> None:
    run("large_data.py", tmp_path)
    table = (tmp_path / "large_data.md").read_text()
    assert "| 10000 | 200 |" in table
    assert (tmp_path / "large_data_training_curve.png").stat().st_size > 0
