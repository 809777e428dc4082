"""``benchmarks/gpu_check.py`` on a machine without a GPU: it says so and exits with the
documented code 2 (the comparison itself needs a CUDA GPU and is skipped here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: run the script")
def test_gpu_check_without_a_gpu_says_so_and_exits_2() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(SCRIPT), "--rows", "1000"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no CUDA GPU is present" in r.stdout and "exit code 2" in r.stdout
    # the exit codes are documented where a user looks: the script's docstring, the READMEs
    assert "- 2: no CUDA GPU is present" in SCRIPT.read_text(encoding="utf-8")
    for readme in ("README.md", "benchmarks/README.md"):
        assert "gpu_check.py" in (ROOT / readme).read_text(encoding="utf-8"), readme
