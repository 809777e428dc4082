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
from ngmm_formula.errors import NGMMError, WorkerError
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
    :mod:`ngmm_formula.shards`); for a neural fit of up to 10,000 training rows, with
    ``Control(folds=1)``: by default one process trains five folds of early stopping there,
    and a distributed fit one split (:func:`~ngmm_formula.train.folds_for`).

    Parameters
    ----------
    formula, data, family
        As :func:`ngmm_formula.ngmm`; ``data`` is sent to every worker.
    nprocs : int
        Number of processes, this one included (each gets a contiguous range of groups).
    timeout : float
        Seconds a process waits for the others at the rendezvous or in a collective before
        giving up with an error (nothing hangs forever when a process dies or stops).
    **options
        Keyword arguments of :func:`ngmm_formula.ngmm` (``approx``, ``control``, ``seed``,
        ``device``, ...). Fits use ``Control.threads`` torch threads per process (1 by
        default): with ``nprocs`` processes, keep ``nprocs * threads`` at most the number of
        cores.

    Returns
    -------
    NGMMResult
        Its ``refit`` (used by ``refit_ml``) calls :func:`fit_distributed` again.

    Raises
    ------
    WorkerError
        A worker process died during the fit (killed, out of memory, ``os._exit``): rank 0's
        next collective operation fails at once (the connection is reset) and the error names
        the rank and its signal or exit code; or a worker stopped responding (stuck, or
        stopped by ``SIGSTOP``): the others give up after ``timeout`` seconds and the error
        names the rank that never reached the collective. Every worker is ended before it is
        raised (at most about ``2 * timeout`` + 4 s after the failure), and a worker whose rank 0
        dies exits at once (it watches its parent process).

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

    store, workers, errors = _start_workers(nprocs, backend, timeout, formula, data, family,
                                            options)
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
        failures, died, stuck = _stop(workers, errors, grace=min(10.0, timeout))
        if isinstance(exc, Exception):
            cause = _worker_failure(exc, failures, died, stuck, timeout)
            if cause is not None:
                raise cause from exc
        raise
    failures, died, _ = _stop(workers, errors, grace=60.0)
    if died:
        rank, code = died[0]
        raise WorkerError(f"worker process rank {rank} died after the fit "
                          f"({_exit_reason(code)})", rank)
    if failures:
        rank, err = failures[0]
        raise NGMMError(f"worker process {rank} failed after the fit: {err!r}")

    refit = FitCall(formula, own_copy(data), family,
                    {**options, "nprocs": nprocs, "timeout": timeout}, fitter=fit_distributed)
    return dataclasses.replace(result, refit=refit)


def _start_workers(nprocs: int, backend: str, timeout: float, formula: str, data: Any,
                   family: Any, options: dict[str, Any]) -> tuple[Any, list[Any], Any]:
    """The TCP store of the rendezvous (this process is its server), the started worker
    processes (ranks 1 to ``nprocs - 1``) and the queue on which they report errors."""
    ctx = mp_context()  # forkserver (imports the package once per session) or spawn
    store = dist.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    errors = ctx.Queue()
    workers = [ctx.Process(target=_worker, daemon=True,
                           args=(rank, nprocs, store.port, backend, timeout, formula, data,
                                 family, options, errors))
               for rank in range(1, nprocs)]
    for w in workers:
        w.start()
    return store, workers, errors


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
    _exit_with_parent()
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


def _exit_with_parent() -> None:
    """End this worker as soon as its parent (rank 0) dies, rather than at the collective
    timeout: a thread waits on the parent's sentinel."""
    import multiprocessing
    import multiprocessing.connection
    import threading

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        sys.stderr.write("ngmm_formula worker: rank 0's process died; exiting\n")
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="ngmm-parent-watch").start()


def _stop(workers: list[Any], errors: Any, grace: float
          ) -> tuple[list[tuple[int, BaseException]], list[tuple[int, int]], list[int]]:
    """Wait up to ``grace`` seconds for the workers, end the rest, collect errors.

    Returns
    -------
    failures : list of (rank, exception)
        The errors the workers reported.
    died : list of (rank, exit code)
        Workers that ended with a non-zero exit code without reporting an error (killed by a
        signal, ``os._exit``): they died rather than failed.
    stuck : list of int
        Ranks still running after ``grace`` seconds (terminated, then killed: a stopped
        process ignores ``SIGTERM`` until it is continued, so it is killed after 2 s).
    """
    import time

    deadline = time.monotonic() + grace
    failures: list[tuple[int, BaseException]] = []
    # drain the queue while waiting (a worker exits only once its message is flushed)
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        try:
            failures.append(errors.get(timeout=0.1))
        except queue.Empty:
            pass
    stuck = [rank for rank, w in enumerate(workers, 1) if w.is_alive()]
    for w in workers:
        if w.is_alive():
            w.terminate()
            w.join(2.0)
        if w.is_alive():
            w.kill()
        w.join(5.0)
    while True:
        try:
            failures.append(errors.get(timeout=0.05))
        except queue.Empty:
            break
    reported = {rank for rank, _ in failures}
    died = [(rank, w.exitcode) for rank, w in enumerate(workers, 1)
            if rank not in stuck and rank not in reported and w.exitcode]
    return failures, died, stuck


def _exit_reason(code: int) -> str:
    """``exit code 3`` or ``killed by signal SIGKILL`` from a process's exit code."""
    import signal

    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _worker_failure(exc: Exception, failures: list[tuple[int, BaseException]],
                    died: list[tuple[int, int]], stuck: list[int], timeout: float
                    ) -> BaseException | None:
    """The error that explains why rank 0's fit failed with ``exc``, or None (``exc`` is).

    In this order: a worker's own error that is not a broken connection (bad data, ...); a
    worker that died without reporting an error (``died``); a worker that was still running
    when the others had given up (``stuck``: it never reached the collective operation the
    others waited ``timeout`` seconds in, so they timed out and reported it).
    """
    if isinstance(exc, RuntimeError):
        for _, err in failures:
            if isinstance(err, Exception) and not isinstance(err, RuntimeError):
                return err
    if died:
        rank, code = died[0]
        return WorkerError(
            f"worker process rank {rank} died during the fit ({_exit_reason(code)}); every "
            f"process was stopped. Rank 0 saw: {_first_line(exc)}", rank)
    if stuck and isinstance(exc, RuntimeError):
        ranks = ", ".join(str(r) for r in stuck)
        return WorkerError(
            f"worker process rank {ranks} did not take part in a collective operation "
            f"within timeout={timeout:g} s (stuck or stopped) and was terminated; every "
            f"process was stopped. Rank 0 saw: {_first_line(exc)}", stuck[0])
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
