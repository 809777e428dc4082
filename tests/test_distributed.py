"""Data-parallel fitting (``ngmm(..., distributed=True)``, ``fit_distributed``).

In one process: the shards' objectives add up to the whole objective (values, per-group
values, gradients), the ranges of groups are balanced and never empty, a one-process group
gives the ordinary fit, and models whose random effects form one joint block
raise a clear error. With two local CPU processes (gloo): one ``torchrun --standalone`` launch
runs several fits with ``distributed=True`` (both ranks must return identical numbers, equal to
the single-process fit), and :func:`~ngmm_formula.fit_distributed` is run once.

Tolerances. The distributed fit maximises the same objective; only the order of summation
differs (relative round-off ~1e-16), which moves the optimiser's path by as much, and both
fits stop at max|gradient| < 1e-6 with Newton steps, so estimates and log-likelihoods of
linear GLMMs agree to 1e-6 (measured: 1e-13 or less). An NGMM's training amplifies round-off
through ~100 AdamW steps (and could in principle flip an early-stopping decision), so there
the target is 1e-3 (measured: 1e-8 on the linear predictor, the same best epoch).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from ngmm_formula import Control, NGMMError, datasets, fit_distributed, ngmm
from ngmm_formula.api import _module, prepare
from ngmm_formula.datasets import simulate_crossed, simulate_grouped
from ngmm_formula.fit import Objective
from ngmm_formula.shards import Shard, _bounds
from tests.torchrun import run_two_processes

ROOT = Path(__file__).resolve().parents[1]

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
SLEEP = "Reaction ~ Days + (Days | Subject)"
NEURAL = "y ~ nn(x1, x2, hidden=(8, 8)) + x3 + (1 | g)"
# small batches (4 of 40 groups): many batches hold groups of one process only, so the
# other process contributes a zero gradient to the all-reduce
# one validation split: a distributed fit trains with one (train.folds_for), and the one-process
# fit it is compared with must too
NEURAL_CONTROL = dict(epochs=10, patience=5, batch_groups=4, progress=False, folds=1)
CROSSED = "y ~ x + (1 | a) + (1 | b)"
# crossed binomial item response, variational: full-batch L-BFGS (linear) and minibatches of
# students (with a network: the stochastic fit, then the full-batch refit of the linear part)
STUDENTS = "y ~ x + (1 | student) + (1 | item)"
STUDENTS_NN = "y ~ nn(x, hidden=(8,)) + (1 | student) + (1 | item)"
STUDENTS_CONTROL = dict(epochs=8, patience=4, batch_size=200, progress=False)


def students_data() -> pd.DataFrame:
    return simulate_crossed(n_students=150, n_items=20, items_per_student=8, seed=2)


def neural_data() -> pd.DataFrame:
    return simulate_grouped(n_groups=40, n_per_group=10, family="binomial", effect="sine",
                            seed=3)


def crossed_data() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 120
    return pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n),
                         "a": pd.Categorical(rng.integers(0, 8, n)),
                         "b": pd.Categorical(rng.integers(0, 6, n))})


def close(a: Any, b: Any, tol: float) -> bool:
    """|a - b| <= tol * max(1, |a|) elementwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(a.shape == b.shape and np.all(np.abs(a - b) <= tol * np.maximum(1, np.abs(a))))


# --------------------------------------------------------------------------------------------
# one process: the sharding itself


@pytest.mark.parametrize("sizes, world, bounds", [
    ([10] * 10, 2, (0, 5, 10)),
    ([10] * 10, 1, (0, 10)),
    ([100, 1, 1, 1], 2, (0, 1, 4)),          # one large group: a range of its own
    ([1, 1, 1, 100], 2, (0, 3, 4)),
    ([5, 5, 5], 3, (0, 1, 2, 3)),            # as many groups as processes
    ([1, 1, 1, 1, 1000], 4, (0, 2, 3, 4, 5)),  # cuts pushed apart: no empty range
])
def test_ranges_of_groups(sizes: list[int], world: int, bounds: tuple[int, ...]) -> None:
    assert _bounds(np.array(sizes), world) == bounds


def test_ranges_are_balanced_and_never_empty() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        n, world = int(rng.integers(1, 60)), int(rng.integers(1, 9))
        if n < world:
            continue
        sizes = rng.integers(1, 50, n)
        b = np.array(_bounds(sizes, world))
        assert b[0] == 0 and b[-1] == n and np.all(np.diff(b) >= 1)
        load = np.add.reduceat(sizes, b[:-1])
        # each cut is within half a group of its quantile, or pushed to give a range of one
        assert load.max() <= sizes.sum() / world + sizes.max()


@pytest.mark.parametrize("formula, data, family, kw", [
    (CBPP, "cbpp", "binomial", {"approx": "agq", "nagq": 5}),
    (CBPP, "cbpp", "binomial", {"approx": "laplace"}),
    (SLEEP, "sleepstudy", "gaussian", {"reml": False}),
])
def test_shards_add_up_to_the_whole_objective(formula: str, data: str, family: str,
                                               kw: dict[str, Any]) -> None:
    """Three shards at fixed parameters: per-group values in block order, and the sums of
    values and gradients, equal the one-process objective (1e-10: the Newton searches stop on
    a tolerance over the groups they hold, so the modes differ below 1e-10)."""
    p = prepare(formula, datasets.load(data), family, **kw)
    module = _module(p)
    with torch.no_grad():
        module.beta.copy_(torch.linspace(-1.0, 0.5, module.beta.numel(), dtype=torch.float64))
        module.theta.mul_(0.7)
        if module.log_sigma is not None:
            module.log_sigma.fill_(3.0)
    params = [module.beta, module.theta] + ([module.log_sigma] if module.log_sigma is not None
                                           else [])

    def value_and_grad(obj: Objective) -> tuple[torch.Tensor, np.ndarray]:
        per = obj.per_block()
        grads = torch.autograd.grad(per.sum(), params)
        return per.detach(), torch.cat([g.reshape(-1) for g in grads]).numpy()

    whole, g_whole = value_and_grad(Objective(p.problem, p.family, p.approximation, module))
    shards = [Shard.of(p.problem.blocks, r, 3) for r in range(3)]
    parts = [value_and_grad(Objective(p.problem, p.family, p.approximation, module, shard=s))
             for s in shards]
    assert sum(part[0].numel() for part in parts) == p.problem.blocks.n_blocks
    assert sum(s.local(p.problem).y.numel() for s in shards) == p.problem.y.numel()
    np.testing.assert_allclose(torch.cat([v for v, _ in parts]).numpy(), whole.numpy(),
                               rtol=1e-10)
    np.testing.assert_allclose(sum(g for _, g in parts), g_whole, rtol=1e-10, atol=1e-10)


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A gloo group of one process (this one), torn down afterwards."""
    hook = sys.excepthook
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def test_distributed_needs_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not dist.is_initialized()
    with pytest.raises(NGMMError, match="torchrun"):
        ngmm(CBPP, datasets.load("cbpp"), "binomial", distributed=True)


def test_one_process_group_gives_the_ordinary_fit_and_rejects_joint_blocks() -> None:
    cbpp = datasets.load("cbpp")
    single = ngmm(CBPP, cbpp, "binomial")
    with one_process_group():
        one = ngmm(CBPP, cbpp, "binomial", distributed=True)
        with pytest.raises(NGMMError, match="2 grouping factors .crossed or nested."):
            ngmm(CROSSED, crossed_data(), distributed=True, reml=False)
        with pytest.raises(NGMMError, match="REML .* use reml=False"):
            ngmm(SLEEP, datasets.load("sleepstudy"), distributed=True)
    # the same computation; 1e-10 rather than bit for bit because BLAS kernels may take
    # other code paths for other memory alignments (see model.matvec)
    assert close(single.loglik, one.loglik, 1e-10)
    assert close(single.fixef, one.fixef, 1e-10)
    assert close(single.theta, one.theta, 1e-10)


# --------------------------------------------------------------------------------------------
# two processes launched by torchrun: ngmm(..., distributed=True) from torchrun's environment

_JOB = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch.distributed as dist
from ngmm_formula import Control, NGMMError, datasets, ngmm
sys.path.insert(0, {tests!r})
from test_distributed import (CBPP, CROSSED, NEURAL, NEURAL_CONTROL, SLEEP, STUDENTS,
                              STUDENTS_CONTROL, STUDENTS_NN, crossed_data, neural_data,
                              students_data)

def record(fit):
    return {{"loglik": fit.loglik, "fixef": fit.fixef.tolist(), "theta": fit.theta.tolist(),
            "sigma": fit.sigma, "eta": fit.predict(type="link").tolist(),
            "ranef": [f.to_numpy().ravel().tolist() for f in fit.ranef.values()],
            "postvar": [f.attrs["postVar"].ravel().tolist() for f in fit.ranef.values()],
            "vcov": fit.vcov.to_numpy().ravel().tolist(),
            "best_epoch": fit.history.best_epoch if fit.history else None}}

out = {{"world": dist.get_world_size() if dist.is_initialized() else None}}
out["cbpp"] = record(ngmm(CBPP, datasets.load("cbpp"), "binomial", distributed=True))
out["world"] = dist.get_world_size()
out["sleep"] = record(ngmm(SLEEP, datasets.load("sleepstudy"), reml=False, distributed=True))
out["neural"] = record(ngmm(NEURAL, neural_data(), "binomial", seed=1, distributed=True,
                            control=Control(**NEURAL_CONTROL)))
out["students"] = record(ngmm(STUDENTS, students_data(), "binomial", approx="variational",
                              distributed=True))
out["students_nn"] = record(ngmm(STUDENTS_NN, students_data(), "binomial", seed=1,
                                 approx="variational", distributed=True,
                                 control=Control(**STUDENTS_CONTROL)))
try:
    ngmm(CROSSED, crossed_data(), reml=False, distributed=True)
except NGMMError as e:
    out["crossed_error"] = str(e)
with open(sys.argv[1] + "." + str(dist.get_rank()) + ".json", "w") as fh:
    json.dump(out, fh)
"""


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    d = tmp_path_factory.mktemp("torchrun")
    script = d / "job.py"
    script.write_text(_JOB.format(tests=str(ROOT / "tests")))
    run_two_processes(script, str(d / "out"))
    return [json.loads((d / f"out.{r}.json").read_text()) for r in range(2)]


def test_torchrun_ranks_return_identical_results(torchrun: list[dict[str, Any]]) -> None:
    assert torchrun[0]["world"] == 2
    assert torchrun[0] == torchrun[1]


@pytest.mark.parametrize("name, formula, data, kw", [
    ("cbpp", CBPP, "cbpp", {"family": "binomial"}),
    ("sleep", SLEEP, "sleepstudy", {"reml": False}),
])
def test_torchrun_glmm_equals_single_process(torchrun: list[dict[str, Any]], name: str,
                                             formula: str, data: str,
                                             kw: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ngmm(formula, datasets.load(data), **kw)
    got = torchrun[0][name]
    assert close(single.loglik, got["loglik"], 1e-6)
    assert close(single.fixef, got["fixef"], 1e-6)
    assert close(single.theta, got["theta"], 1e-6)
    assert close(single.sigma, got["sigma"], 1e-6)
    # the conditional modes and variances of every group, gathered from both processes
    assert close(np.concatenate([f.to_numpy().ravel() for f in single.ranef.values()]),
                 np.concatenate(got["ranef"]), 1e-6)
    assert close(np.concatenate([f.attrs["postVar"].ravel() for f in single.ranef.values()]),
                 np.concatenate(got["postvar"]), 1e-6)
    # from the finite-difference Hessian (step 1e-4 relative), so 1e-5
    assert close(single.vcov.to_numpy().ravel(), got["vcov"], 1e-5)


def test_torchrun_ngmm_equals_single_process(torchrun: list[dict[str, Any]]) -> None:
    single = ngmm(NEURAL, neural_data(), "binomial", seed=1,
                  control=Control(**NEURAL_CONTROL))
    got = torchrun[0]["neural"]
    assert single.history is not None and got["best_epoch"] == single.history.best_epoch
    assert close(single.loglik, got["loglik"], 1e-3)
    assert close(single.fixef, got["fixef"], 1e-3)
    assert close(single.theta, got["theta"], 1e-3)
    assert close(single.predict(type="link"), got["eta"], 1e-3)  # networks included


@pytest.mark.parametrize("name, formula, kw, tol", [
    ("students", STUDENTS, {}, 1e-6),
    ("students_nn", STUDENTS_NN, {"seed": 1, "control": Control(**STUDENTS_CONTROL)}, 1e-3),
])
def test_torchrun_crossed_variational_fit_equals_single_process(
        torchrun: list[dict[str, Any]], name: str, formula: str, kw: dict[str, Any],
        tol: float) -> None:
    """A crossed model's variational fit split over processes by students (each evaluates
    its students' rows; the item Gaussians, model parameters and networks get the summed
    gradients; every student's Gaussian is shared at the end) equals the one-process fit:
    the linear model's full-batch L-BFGS and profiled Hessian to 1e-6 as the GLMMs above
    (measured: 1e-7), the network's minibatch fit to 1e-3 as the NGMM above."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ngmm(formula, students_data(), "binomial", approx="variational", **kw)
    got = torchrun[0][name]
    assert close(single.loglik, got["loglik"], tol)
    assert close(single.fixef, got["fixef"], tol)
    assert close(single.theta, got["theta"], tol)
    assert close(np.concatenate([f.to_numpy().ravel() for f in single.ranef.values()]),
                 np.concatenate(got["ranef"]), tol)
    assert close(np.concatenate([f.attrs["postVar"].ravel() for f in single.ranef.values()]),
                 np.concatenate(got["postvar"]), tol)
    assert close(single.vcov.to_numpy().ravel(), got["vcov"], tol)


def test_torchrun_crossed_model_is_a_clear_error(torchrun: list[dict[str, Any]]) -> None:
    msg = torchrun[0]["crossed_error"]
    assert "one joint block" in msg and "crossed or nested" in msg and "distributed=False" in msg


# --------------------------------------------------------------------------------------------
# two "machines" on this host: two torchrun launches meeting by the c10d rendezvous

TICKS = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"

_NODE_JOB = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch.distributed as dist
from ngmm_formula import datasets, ngmm

out = {{"rank": dist.get_rank() if dist.is_initialized() else None}}
fit = ngmm({cbpp!r}, datasets.load("cbpp"), "binomial", distributed=True)
out.update(world=dist.get_world_size(), rank=dist.get_rank(), cbpp={{
    "loglik": fit.loglik, "fixef": fit.fixef.tolist(), "theta": fit.theta.tolist()}})
# each "machine" reads only its partitions of a partitioned dataset
fit = ngmm({ticks!r}, sys.argv[2], "poisson", distributed=True)
out["ticks"] = {{"loglik": fit.loglik, "fixef": fit.fixef.tolist(),
                "theta": fit.theta.tolist(), "rows_read": fit.design.nobs,
                "nobs": fit.nobs}}
with open(sys.argv[1] + "." + str(dist.get_rank()) + ".json", "w") as fh:
    json.dump(out, fh)
"""


def test_two_torchrun_nodes_with_the_c10d_rendezvous_equal_single_process(
        tmp_path: Path) -> None:
    """The README's multi-machine command run as two "machines" on localhost (two
    ``torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=...``
    launches): both ranks return the one-process fit of a GLMM given as a DataFrame, and of
    one read from a partitioned dataset where each reads only its own partitions (rows read
    add up to the whole). Tolerance 1e-6 as the other linear GLMMs here (module docstring)."""
    from ngmm_formula.io import write_partitioned
    from tests.torchrun import run_two_nodes

    ticks = datasets.load("grouseticks")
    write_partitioned(ticks, tmp_path / "ticks", group="BROOD", n_parts=8)
    script = tmp_path / "job.py"
    script.write_text(_NODE_JOB.format(cbpp=CBPP, ticks=TICKS))
    run_two_nodes(script, str(tmp_path / "out"), str(tmp_path / "ticks"))
    got = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    assert [g["world"] for g in got] == [2, 2] and sorted(g["rank"] for g in got) == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = {"cbpp": ngmm(CBPP, datasets.load("cbpp"), "binomial"),
                  "ticks": ngmm(TICKS, ticks, "poisson")}
    for name, fit in single.items():
        for g in got:
            assert close(fit.loglik, g[name]["loglik"], 1e-6), name
            assert close(fit.fixef, g[name]["fixef"], 1e-6), name
            assert close(fit.theta, g[name]["theta"], 1e-6), name
    assert sum(g["ticks"]["rows_read"] for g in got) == len(ticks)
    assert all(g["ticks"]["nobs"] == len(ticks) for g in got)
    assert all(0 < g["ticks"]["rows_read"] < len(ticks) for g in got)


# --------------------------------------------------------------------------------------------
# fit_distributed: this process is rank 0, one worker process (forkserver)


def test_fit_distributed_equals_single_process() -> None:
    ticks = datasets.load("grouseticks")
    formula = "TICKS ~ YEAR + HEIGHT + (1 | BROOD)"
    single = ngmm(formula, ticks, "poisson")
    hook = sys.excepthook
    fit = fit_distributed(formula, ticks, "poisson", nprocs=2, timeout=120)
    assert not dist.is_initialized() and sys.excepthook is hook  # nothing left behind
    assert close(single.loglik, fit.loglik, 1e-6)
    assert close(single.fixef, fit.fixef, 1e-6)
    assert close(single.theta, fit.theta, 1e-6)
    assert fit.refit is not None


@pytest.mark.parametrize("formula, kw", [
    ("y ~ 0 + item + rr(0 + item | id, d = 1)", {}),
    ("y ~ 0 + item + rr(0 + item | id, d = 2)", {"approx": "agq", "nagq": 3}),
])
def test_reduced_rank_item_response_across_processes_equals_one_process(
        formula: str, kw: dict[str, Any]) -> None:
    """An item-response model (students' loadings on d latent proficiencies, items as fixed
    effects) integrates each student's d coordinates on its own, so its students split over
    processes like any groups, and the shared item parameters (fixed effects and loadings)
    get the all-reduced gradient: equal to the one-process fit within 1e-6, as the linear
    GLMMs above (measured: 5e-13)."""
    lsat7 = datasets.load("lsat7")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ngmm(formula, lsat7, "binomial", **kw)
        fit = fit_distributed(formula, lsat7, "binomial", nprocs=2, timeout=120, **kw)
    assert close(single.loglik, fit.loglik, 1e-6)
    assert close(single.fixef, fit.fixef, 1e-6)
    assert close(single.theta, fit.theta, 1e-6)
    assert close(single.reduced_rank[0].loadings, fit.reduced_rank[0].loadings, 1e-6)


def test_fit_distributed_error_in_every_process_is_raised_without_hanging() -> None:
    """Both processes raise the clear error of a crossed model; the worker is reaped."""
    children = set(torch.multiprocessing.active_children())
    with pytest.raises(NGMMError, match="one joint block"):
        fit_distributed(CROSSED, crossed_data(), nprocs=2, reml=False, timeout=60)
    assert set(torch.multiprocessing.active_children()) == children
    assert not dist.is_initialized()


def test_fit_distributed_bad_input() -> None:
    cbpp = datasets.load("cbpp")
    with pytest.raises(NGMMError, match="nprocs"):
        fit_distributed(CBPP, cbpp, "binomial", nprocs=0)
    with pytest.raises(NGMMError, match="distributed="):
        fit_distributed(CBPP, cbpp, "binomial", distributed=False)


# --------------------------------------------------------------------------------------------
# faults: a worker that dies or stops (issue 17). Real signals sent to the worker process
# from a thread of this one (rank 0), once the fit has run for a while.

SLOW_NEURAL_CONTROL = dict(epochs=5000, patience=5000, min_steps=10**6, batch_groups=4,
                           progress=False)


def _signal_worker_later(sig: int, delay: float, sent: dict[str, float]) -> None:
    """Send ``sig`` to every worker process ``delay`` seconds after the first one starts."""
    import threading
    import time

    before = set(torch.multiprocessing.active_children())

    def run() -> None:
        t = time.monotonic()
        while time.monotonic() - t < 60:
            workers = set(torch.multiprocessing.active_children()) - before
            if workers:
                break
            time.sleep(0.02)
        time.sleep(delay)
        for w in workers:
            if w.pid is not None:
                os.kill(w.pid, sig)
        sent["at"] = time.monotonic()

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("sig, timeout, match, within", [
    # a killed worker resets its connections: rank 0 fails at its next all-reduce
    pytest.param(signal.SIGKILL, 600.0, "rank 1 died during the fit .killed by signal SIGKILL",
                 60.0, id="kill"),
    # a stopped worker never reaches the all-reduce: rank 0 gives up after `timeout`
    pytest.param(signal.SIGSTOP, 5.0, "rank 1 did not take part .* within timeout=5 s", 30.0,
                 id="stop"),
])
def test_fit_distributed_worker_that_dies_or_stops_is_a_clear_error(
        sig: int, timeout: float, match: str, within: float) -> None:
    """Killing (or stopping) rank 1 mid-fit: fit_distributed raises WorkerError naming rank 1
    within ``within`` seconds of the signal (measured: 0.1 s after SIGKILL, the whole test 5 s;
    12 s after SIGSTOP with timeout=5: the timeout, 5 s for the others to stop, 2 s for the
    stopped one to be killed), and no worker process is left behind."""
    import time

    from ngmm_formula import WorkerError

    children = set(torch.multiprocessing.active_children())
    sent: dict[str, float] = {}
    _signal_worker_later(sig, 3.0, sent)
    with pytest.raises(WorkerError, match=match) as info:
        fit_distributed(NEURAL, neural_data(), "binomial", nprocs=2, timeout=timeout,
                        control=Control(**SLOW_NEURAL_CONTROL))
    elapsed = time.monotonic() - sent["at"]
    assert info.value.rank == 1
    assert elapsed < within, elapsed
    assert set(torch.multiprocessing.active_children()) == children
    assert not dist.is_initialized()
