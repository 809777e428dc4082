"""Launching a test's job script as two gloo processes by torchrun (``--standalone``, or as
two "machines" meeting by the c10d rendezvous), for the tests that check a distributed fit
against the one-process fit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_nodes(script: Path, *args: str, timeout: float = 300.0) -> None:
    """Run ``script *args`` as two "machines" on this host: two ``torchrun`` launches, each
    ``--nnodes=2 --nproc_per_node=1``, meeting by the elastic c10d rendezvous on a free
    localhost port (the README's multi-machine command with ``127.0.0.1`` for the first
    machine's address; the first launch to bind the port hosts the rendezvous store). Fails
    the test with both logs' tails if either does not finish in ``timeout`` seconds (both
    launches and their workers are then killed) or exits non-zero."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
         "--rdzv_id=ngmm-two-nodes", str(script), *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    logs: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for proc in launches:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in launches:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the two torchrun launches did not finish in {timeout:.0f} s:\n"
                    + "\n".join(p.communicate()[0][-2000:] for p in launches))
    for proc in launches:
        assert proc.returncode == 0, "\n".join(x[-2000:] for x in logs)
