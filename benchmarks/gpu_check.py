"""Check the CUDA path against the CPU: the same fits on both, differences and times.

Run as is on a machine with one NVIDIA GPU and a CUDA build of torch::

    python benchmarks/gpu_check.py                 # 10^6-row NGMM (the full check)
    python benchmarks/gpu_check.py --rows 100000   # a shorter NGMM

Three fits, each once with ``device="cpu"`` (float64 integrals, float32 networks) and once
with ``device="cuda"`` (everything float32, the package's GPU default), then one table of
the differences of the log-likelihood and of the estimates, and the times:

1. linear GLMM: cbpp, ``cbind(incidence, size - incidence) ~ period + (1 | herd)``
   (binomial, adaptive Gauss--Hermite);
2. crossed LMM: Penicillin, ``diameter ~ 1 + (1 | plate) + (1 | sample)`` (one joint block:
   the sparse/dense factorisation on the GPU);
3. NGMM: simulated binomial ``y ~ nn(x1, x2) + x3 + (1 | g)`` with ``--rows`` rows (default
   10^6) in groups of 20, ``Control(epochs=--epochs)``.

Tolerances (float32 has a relative rounding of 6e-8; the CPU fit is the reference):

- linear models, log-likelihood: ``|diff| <= 1e-3 + 1e-6 |loglik|``. 1e-3 is the package's
  tolerance for a fitted log-likelihood (lme4 against glmmTMB); the relative term covers
  the float32 rounding of a sum of n terms (about ``sqrt(n) * 6e-8 * |loglik|``, far less).
- linear models, estimates (fixed effects, theta): ``|diff| <= 2e-3 max(1, |value|)``. At a
  float32 optimum the gradient is known to about ``1e-7 |loglik|``, which moves an estimate
  by that over the curvature (1e-5 on cbpp); 2e-3 leaves room for the optimiser stopping
  at a slightly different point of a flat likelihood, and is still far below any standard
  error (cbpp's smallest: 0.23).
- NGMM: training follows AdamW through hundreds of steps, and float32 rounding makes the
  two trajectories part (the same seed, minibatches and input noise on both: only the
  arithmetic differs), so the check is statistical, not numerical: log-likelihood per
  observation ``|diff| <= 2e-3`` (on the synthetic benchmark the network gains about 0.02
  per observation over the GLMM, so this is a tenth of it), fixed effects and theta
  ``|diff| <= 0.05 max(1, |value|)`` (the slope of x3 is estimated with a standard error of
  about 0.003 at 10^6 rows; the networks' centring moves the intercept by a few 1e-2).

Exit codes:

- 0: every difference within its tolerance;
- 1: a difference beyond its tolerance (the table marks it ``FAIL``);
- 2: no CUDA GPU is present (``torch.cuda.is_available()`` is false, e.g. a CPU build of
  torch): nothing was fitted;
- 3: a fit raised an error (printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_DISAGREE, EXIT_NO_GPU, EXIT_ERROR = 0, 1, 2, 3


@dataclass(frozen=True)
class Check:
    """One model fitted on both devices, with its tolerances."""

    name: str
    fit: Callable[[str], Any]  # device -> NGMMResult
    loglik_tol: Callable[[float, int], float]  # (loglik, nobs) -> tolerance of the difference
    estimate_tol: float  # relative to max(1, |value|)


def _linear_loglik_tol(loglik: float, nobs: int) -> float:
    return 1e-3 + 1e-6 * abs(loglik)


def _ngmm_loglik_tol(loglik: float, nobs: int) -> float:
    return 2e-3 * nobs


def checks(rows: int, epochs: int) -> list[Check]:
    """The three fits (data built once, before any timing)."""
    from ngmm_formula import Control, datasets, ngmm
    from ngmm_formula.datasets import simulate_grouped

    cbpp = datasets.load("cbpp")
    penicillin = datasets.load("Penicillin")
    sim = simulate_grouped(n_groups=max(10, rows // 20), n_per_group=20, family="binomial",
                           effect="sine", seed=1)
    control = Control(epochs=epochs, progress=False)
    return [
        Check("cbpp GLMM",
              lambda d: ngmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp,
                             "binomial", device=d),
              _linear_loglik_tol, 2e-3),
        Check("Penicillin crossed",
              lambda d: ngmm("diameter ~ 1 + (1 | plate) + (1 | sample)", penicillin,
                             reml=False, device=d),
              _linear_loglik_tol, 2e-3),
        Check(f"NGMM {len(sim):,} rows",
              lambda d: ngmm("y ~ nn(x1, x2) + x3 + (1 | g)", sim, "binomial", device=d,
                             control=control, seed=0),
              _ngmm_loglik_tol, 0.05),
    ]


def compare(check: Check) -> tuple[list[str], bool]:
    """Fit on both devices; the table rows and whether everything agreed."""
    import numpy as np
    import torch

    times, fits = {}, {}
    for device in ("cpu", "cuda"):
        t0 = time.perf_counter()
        fits[device] = check.fit(device)
        if device == "cuda":
            torch.cuda.synchronize()
        times[device] = time.perf_counter() - t0
    cpu, gpu = fits["cpu"], fits["cuda"]
    rows, ok = [], True
    quantities = [("logLik", np.array([cpu.loglik]), np.array([gpu.loglik]),
                   check.loglik_tol(float(cpu.loglik), int(cpu.nobs)))]
    for label, a, b in [("fixef", cpu.fixef.to_numpy(), gpu.fixef.to_numpy()),
                        ("theta", np.asarray(cpu.theta), np.asarray(gpu.theta))]:
        scale = np.maximum(1.0, np.abs(a))
        worst = int(np.argmax(np.abs(a - b) / scale))
        quantities.append((label, a[[worst]], b[[worst]], check.estimate_tol * scale[worst]))
    for label, a, b, tol in quantities:
        diff = float(np.abs(a - b).max())
        good = bool(np.isfinite(diff) and diff <= tol)
        ok &= good
        rows.append(f"| {check.name} | {label} | {float(a[0]):.6g} | {float(b[0]):.6g} | "
                    f"{diff:.2e} | {tol:.2e} | {'ok' if good else 'FAIL'} | "
                    f"{times['cpu']:.2f} | {times['cuda']:.2f} |")
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows of the simulated NGMM (groups of 20; default 10^6)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="maximum training epochs of the NGMM (default 30)")
    args = parser.parse_args(argv)

    import torch  # before the package: the answer on a CPU-only machine comes fast

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        print(f"gpu_check: no CUDA GPU is present (torch {torch.__version__}, CUDA runtime "
              f"{built}, torch.cuda.is_available() is False): nothing was checked; exit code "
              f"{EXIT_NO_GPU}")
        return EXIT_NO_GPU
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    print("| model | quantity | CPU | CUDA | abs. diff | tolerance | verdict | CPU s | CUDA s |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    all_ok = True
    try:
        for check in checks(args.rows, args.epochs):
            rows, ok = compare(check)
            all_ok &= ok
            print("\n".join(rows), flush=True)
    except Exception as exc:  # a failing fit is a result of the check, not a crash
        import traceback

        traceback.print_exc()
        print(f"gpu_check: a fit raised {type(exc).__name__}: {exc}; exit code {EXIT_ERROR}")
        return EXIT_ERROR
    verdict = "all within tolerance" if all_ok else "DIFFERENCES BEYOND TOLERANCE"
    print(f"gpu_check: {verdict}; exit code {EXIT_OK if all_ok else EXIT_DISAGREE}")
    return EXIT_OK if all_ok else EXIT_DISAGREE


if __name__ == "__main__":
    sys.exit(main())
