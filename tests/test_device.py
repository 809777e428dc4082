"""Devices and precision: ``ngmm(device=, dtype=)``, index dtypes, and tests that need a GPU
(skipped cleanly on machines without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ngmm_formula import Control, NGMMError, ngmm
from ngmm_formula.api import _module, prepare
from ngmm_formula.datasets import simulate_grouped
from ngmm_formula.model import resolve_device
from tests.references import REFS, dataset

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
NEURAL = "y ~ nn(x1, x2, hidden=(8, 8)) + x3 + (1 | g)"
QUICK = Control(epochs=6, patience=3, min_steps=0, progress=False)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resolve_device_table() -> None:
    cases = {
        ("cpu", None): (torch.device("cpu"), torch.float64),
        ("cpu", "float32"): (torch.device("cpu"), torch.float32),
        ("cpu", torch.float64): (torch.device("cpu"), torch.float64),
        (torch.device("cpu"), "float64"): (torch.device("cpu"), torch.float64),
    }
    for (device, dtype), want in cases.items():
        assert resolve_device(device, dtype) == want


@pytest.mark.parametrize(("device", "dtype", "message"), [
    ("gpu", None, "device='gpu' is not a torch device"),
    ("cuda:x", None, "is not a torch device"),
    ("meta", None, "only 'cpu', 'cuda' and 'mps' are supported"),
    ("cpu", "float16", "dtype must be 'float32' or 'float64'"),
    ("cpu", torch.int64, "dtype must be 'float32' or 'float64'"),
    pytest.param("cuda", None, "torch.cuda.is_available\\(\\) is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_bad_device_or_dtype(device: str, dtype: object, message: str) -> None:
    with pytest.raises(NGMMError, match=message):
        resolve_device(device, dtype)  # type: ignore[arg-type]
    # ngmm refuses before doing any work
    with pytest.raises(NGMMError, match=message):
        ngmm(CBPP, dataset("cbpp"), "binomial", device=device, dtype=dtype)  # type: ignore[arg-type]


def test_index_and_input_dtypes() -> None:
    prep = prepare(NEURAL, simulate_grouped(n_groups=20, n_per_group=5, family="binomial"),
                   "binomial")
    pr = prep.problem
    assert prep.design.re_terms[0].group_index.dtype == np.int32
    assert pr.blocks.block_of_obs.dtype == torch.int32
    assert pr.blocks.slot_pos.dtype == torch.int32
    assert pr.y.dtype == torch.float64 and pr.Xs.dtype == torch.float64
    assert pr.net_X[0].dtype == torch.float32  # networks train in float32 by default
    net = _module(prep).nets[0]
    assert next(net.parameters()).dtype == torch.float32
    # ... with a float64 output (so centring holds to double precision)
    assert net(pr.net_X[0]).dtype == torch.float64
    full = prepare(NEURAL, simulate_grouped(n_groups=20, n_per_group=5, family="binomial"),
                   "binomial", dtype="float64")
    assert full.problem.net_X[0].dtype == torch.float64


def test_subset_renumbers_blocks() -> None:
    prep = prepare(NEURAL, simulate_grouped(n_groups=30, n_per_group=4, family="binomial"),
                   "binomial")
    pr = prep.problem
    groups = torch.tensor([2, 7, 11, 29])
    rows = torch.nonzero(torch.isin(pr.blocks.block_of_obs, groups.int())).squeeze(-1)
    sub = pr.subset(rows, groups)
    assert sub.blocks.n_blocks == 4
    # block k of the subset is groups[k]
    np.testing.assert_array_equal(groups[sub.blocks.block_of_obs].numpy(),
                                  pr.blocks.block_of_obs[rows].numpy())


def test_cpu_float64_explicit_is_the_default() -> None:
    df = dataset("cbpp")
    a = ngmm(CBPP, df, "binomial", approx="laplace")
    b = ngmm(CBPP, df, "binomial", approx="laplace", device="cpu", dtype="float64")
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)


def test_cpu_float32_linear_glmm() -> None:
    """The whole fit in float32 (what a GPU runs by default), on the CPU.

    Measured here: log-likelihood 4e-7 from lme4's, fixed effects 1e-6, the SD 4e-6
    relative with BLAS's X beta; 2.7e-4 in the fixed effects with the fixed-order
    ``model.matvec`` (bit-for-bit reproducibility), whose float32 rounding ends L-BFGS at
    another point of the flat float32 optimum. Tolerances: the fitted log-likelihood's usual
    1e-3; 1e-3 for the fixed effects and the SD (relative), since float32 resolves the
    objective to ~1e-7 relative and so the optimum only to about its square root (3e-4,
    times the curvature's scale) in the worst case.
    """
    ref = REFS["cbpp_logit_laplace"]
    fit = ngmm(CBPP, dataset("cbpp"), "binomial", approx="laplace", device="cpu",
               dtype="float32")
    # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-3)
    np.testing.assert_allclose(fit.fixef.to_numpy(), list(ref["fixef"].values()), atol=1e-3)
    assert float(fit.varcorr.sdcor.iloc[0]) == pytest.approx(ref["theta"]["herd.(Intercept)"],
                                                             rel=1e-3)
    assert isinstance(fit.fixef.to_numpy()[0], np.float64)


def test_cpu_float32_neural_fit_predicts() -> None:
    df = simulate_grouped(n_groups=30, n_per_group=10, family="binomial", seed=2)
    fit = ngmm(NEURAL, df, "binomial", control=QUICK, device="cpu", dtype="float32")
    p = fit.predict(df.head(7))
    assert p.shape == (7,) and np.all((p > 0) & (p < 1))
    assert np.isfinite(fit.loglik)


@needs_cuda
def test_cuda_linear_glmm_matches_cpu() -> None:
    df = dataset("cbpp")
    cpu = ngmm(CBPP, df, "binomial", approx="laplace")
    gpu = ngmm(CBPP, df, "binomial", approx="laplace", device="cuda")  # float32
    # tolerances as test_cpu_float32_linear_glmm
    assert gpu.loglik == pytest.approx(cpu.loglik, abs=1e-3)
    np.testing.assert_allclose(gpu.fixef.to_numpy(), cpu.fixef.to_numpy(), atol=1e-4)
    gpu64 = ngmm(CBPP, df, "binomial", approx="laplace", device="cuda", dtype="float64")
    assert gpu64.loglik == pytest.approx(cpu.loglik, abs=1e-6)


@needs_cuda
def test_cuda_neural_fit_returns_cpu_results() -> None:
    df = simulate_grouped(n_groups=30, n_per_group=10, family="binomial", seed=2)
    fit = ngmm(NEURAL, df, "binomial", control=QUICK, device="cuda")
    assert all(p.device.type == "cpu" for net in fit.nets for p in net.parameters())
    assert fit.predict(df.head(3)).shape == (3,)
