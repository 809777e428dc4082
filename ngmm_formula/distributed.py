r"""Data-parallel fitting on one machine: :func:`fit_distributed` starts local worker
processes, each of which calls ``ngmm(..., distributed=True)``, and returns rank 0's result.

An entry point beside :func:`~ngmm_formula.api.ngmm`; the shards of groups, the process group
and the all-reduces the fit uses are in :mod:`ngmm_formula.shards` (which documents the
scheme), re-exported here.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import queue
import sys
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from ngmm_formula.api import FitCall, ngmm, own_copy
from ngmm_formula.errors import NGMMError
from ngmm_formula.runtime import mp_context
from ngmm_formula.shards import Shard, connect, shard_groups

if TYPE_CHECKING:
    import pandas as pd

    from ngmm_formula.families import Family
    from ngmm_formula.results import NGMMResult

__all__ = ["Shard", "connect", "fit_distributed", "shard_groups"]


def fit_distributed(formula: str, data: pd.DataFrame, family: str | Family = "gaussian", *,
                    nprocs: int = 2, timeout: float = 1800.0, **options: Any) -> NGMMResult:
    """Fit with ``nprocs`` local processes (this one is rank 0) and return rank 0's result.

    Starts ``nprocs - 1`` worker processes (from a ``forkserver`` that imports the package
    once per session, or ``spawn``), joins them in a process group (gloo
    on the CPU, nccl for ``device="cuda"``) whose rendezvous is a TCP store on a free port of
    127.0.0.1, and runs ``ngmm(formula, data, family, distributed=True, **options)`` in every
    process; the process group is torn down afterwards. The result equals the
    single-process fit up to the order of floating-point summation (module
    :mod:`ngmm_formula.shards`).

    Parameters
    ----------
    formula, data, family
        As :func:`ngmm_formula.ngmm`; ``data`` is sent to every worker.
    nprocs : int
        Number of processes, this one included (each gets a contiguous range of groups).
    timeout : float
        Seconds a process waits for the others at the rendezvous or in a collective before
        giving up with an error (nothing hangs forever when a process dies).
    **options
        Keyword arguments of :func:`ngmm_formula.ngmm` (``approx``, ``control``, ``seed``,
        ``device``, ...). Fits use ``Control.threads`` torch threads per process (1 by
        default): with ``nprocs`` processes, keep ``nprocs * threads`` at most the number of
        cores.

    Returns
    -------
    NGMMResult
        Its ``refit`` (used by ``refit_ml``) calls :func:`fit_distributed` again.

    Notes
    -----
    Across machines, launch the same script on every machine with ``torchrun`` and call
    ``ngmm(..., distributed=True)`` in it, e.g. two machines with two processes each::

        # on machine 0 (address 10.0.0.1) and on machine 1, changing --node_rank to 1:
        torchrun --nnodes=2 --nproc_per_node=2 --node_rank=0 \\
                 --master_addr=10.0.0.1 --master_port=29500 fit.py
        # or elastic rendezvous, the same command on every machine:
        torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d \\
                 --rdzv_endpoint=10.0.0.1:29500 --rdzv_id=ngmm1 fit.py

    Every process reads the whole data set (the design is built on each, so encodings
    agree) and returns the same result.

    Worker processes import the caller's main module (``forkserver`` and ``spawn`` do): in a
    script, call :func:`fit_distributed` under ``if __name__ == "__main__":``.
    """
    _check_arguments(nprocs, timeout, options)
    cuda = str(options.get("device", "cpu")).startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    wait = datetime.timedelta(seconds=timeout)

    ctx = mp_context()  # forkserver (imports the package once per session) or spawn
    store = dist.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False,
                          timeout=wait)
    errors = ctx.Queue()
    workers = [ctx.Process(target=_worker, daemon=True,
                           args=(rank, nprocs, store.port, backend, timeout, formula, data,
                                 family, options, errors))
               for rank in range(1, nprocs)]
    for w in workers:
        w.start()
    excepthook = sys.excepthook  # init_process_group replaces it and never restores it
    try:
        dist.init_process_group(backend, store=store, rank=0, world_size=nprocs,
                                timeout=wait)
        try:
            result = ngmm(formula, data, family, distributed=True, **options)
        finally:
            dist.destroy_process_group()
            sys.excepthook = excepthook
    except BaseException as exc:
        failures = _stop(workers, errors, grace=10.0)
        # a worker's own error (bad data, ...) explains a broken connection here
        if isinstance(exc, RuntimeError):
            for _, err in failures:
                if isinstance(err, Exception) and not isinstance(err, RuntimeError):
                    raise err from exc
        raise
    failures = _stop(workers, errors, grace=60.0)
    if failures:
        rank, err = failures[0]
        raise NGMMError(f"worker process {rank} failed after the fit: {err!r}")

    refit = FitCall(formula, own_copy(data), family,
                    {**options, "nprocs": nprocs, "timeout": timeout}, fitter=fit_distributed)
    return dataclasses.replace(result, refit=refit)


def _check_arguments(nprocs: int, timeout: float, options: dict[str, Any]) -> None:
    """Refuse what :func:`fit_distributed` cannot run before any process starts."""
    if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
        raise NGMMError(f"nprocs must be a positive integer, got {nprocs!r}")
    if not timeout > 0:
        raise NGMMError(f"timeout must be positive, got {timeout!r}")
    if "distributed" in options:
        raise NGMMError("fit_distributed always fits with distributed=True: drop the "
                        "distributed= argument")
    if not dist.is_available():
        raise NGMMError("fit_distributed needs a PyTorch build with torch.distributed")
    if dist.is_initialized():
        raise NGMMError("fit_distributed starts its own process group, but this process is "
                        "already in one: call ngmm(..., distributed=True) on every process "
                        "instead")


def _worker(rank: int, world_size: int, port: int, backend: str, timeout: float, formula: str,
            data: pd.DataFrame, family: Any, options: dict[str, Any], errors: Any) -> None:
    """A worker of :func:`fit_distributed`: join the group, fit, report any error."""

    os.environ["LOCAL_RANK"] = str(rank)
    try:
        wait = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=wait)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=wait)
        try:
            ngmm(formula, data, family, distributed=True, **options)
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            pickle.dumps(exc)
            errors.put((rank, exc))
        except Exception:
            errors.put((rank, RuntimeError(repr(exc))))
        raise SystemExit(1) from None


def _stop(workers: list[Any], errors: Any, grace: float) -> list[tuple[int, BaseException]]:
    """Wait up to ``grace`` seconds for the workers, terminate the rest, collect errors."""
    import time

    deadline = time.monotonic() + grace
    failures: list[tuple[int, BaseException]] = []
    # drain the queue while waiting (a worker exits only once its message is flushed)
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        try:
            failures.append(errors.get(timeout=0.1))
        except queue.Empty:
            pass
    for w in workers:
        if w.is_alive():
            w.terminate()
        w.join(5.0)
    while True:
        try:
            failures.append(errors.get(timeout=0.05))
        except queue.Empty:
            break
    return failures
