"""Launching a test's job script as two gloo processes by torchrun (``--standalone``), for
the tests that check a distributed fit against the one-process fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_two_processes(script: Path, arg: str, timeout: float = 300.0) -> None:
    """Run ``script arg`` in 2 processes with this checkout on ``PYTHONPATH`` and one thread
    each; fail the test with the log's tail if it does not finish in ``timeout`` seconds
    (torchrun and its workers are killed) or exits non-zero."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), arg], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
