"""Joint blocks: block elimination against the dense factor (one evaluation) and whole fits.

A single grouping factor under REML integrates beta jointly with every group's random
effects: one joint block of ``q * groups + p`` coordinates. This script simulates
``y ~ x + (1 + x | g)`` with ``--groups`` groups of ``--per-group`` rows, fits it by REML (the
joint block factorised by block elimination, B = beta) and by ML (per-group blocks), and
times one objective evaluation (value only) with the block elimination and, unless
``--no-dense``, with the dense Cholesky factor of the whole joint block.

    python benchmarks/joint_blocks.py                 # 5,000 groups x 4 rows
    python benchmarks/joint_blocks.py --groups 500 --no-dense

Prints one line per measurement with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import pandas as pd
import torch

from ngmm_formula import ngmm
from ngmm_formula.api import objective_at, prepare


def simulate(groups: int, per_group: int, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per_group)
    x = rng.standard_normal(g.size)
    y = (1 + 0.5 * x + rng.normal(0, 0.7, groups)[g] + rng.normal(0, 0.3, groups)[g] * x
         + rng.normal(0, 0.5, g.size))
    return pd.DataFrame({"y": y, "x": x, "g": pd.Categorical(g)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=5000)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense evaluation (minutes for 10,000 coordinates)")
    args = ap.parse_args()
    data = simulate(args.groups, args.per_group)
    formula = "y ~ x + (1 + x | g)"

    def load() -> str:
        return f"load {os.getloadavg()[0]:.2f}"

    t = time.perf_counter()
    reml = ngmm(formula, data, reml=True)
    print(f"REML fit (joint block, block elimination): {time.perf_counter() - t:.2f} s, "
          f"logLik {reml.loglik:.4f}, {reml.diagnostics.evaluations} evaluations, {load()}")
    t = time.perf_counter()
    ml = ngmm(formula, data, reml=False)
    print(f"ML fit (per-group blocks): {time.perf_counter() - t:.2f} s, "
          f"logLik {ml.loglik:.4f}, {load()}")

    p = prepare(formula, data, reml=True)
    blocks = p.problem.blocks
    assert blocks.split is not None
    print(f"joint block: {blocks.dim} coordinates, B = {blocks.split.dim_b}")
    theta, sigma = reml.theta.to_numpy(), reml.sigma
    torch.set_num_threads(1)
    t = time.perf_counter()
    value = objective_at(p, None, theta, sigma)
    print(f"one evaluation, block elimination: {time.perf_counter() - t:.3f} s "
          f"({value:.6f}), {load()}")
    if not args.no_dense:
        dense = dataclasses.replace(p, problem=dataclasses.replace(
            p.problem, blocks=dataclasses.replace(blocks, split=None)))
        t = time.perf_counter()
        value = objective_at(dense, None, theta, sigma)
        print(f"one evaluation, dense joint factor: {time.perf_counter() - t:.3f} s "
              f"({value:.6f}), {load()}")


if __name__ == "__main__":
    main()
