"""The "From lme4 to ngmm_formula" vignette runs in quick mode and agrees with lme4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIGNETTE = ROOT / "vignettes" / "lme4_to_ngmm.py"


def test_lme4_to_ngmm_quick(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(VIGNETTE), "--quick", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # exits 1 if |dlogLik| > 1e-3
    text = (tmp_path / "lme4_to_ngmm.md").read_text()
    assert "## sleep_reml" in text and "Linear mixed model fit by REML" in text
