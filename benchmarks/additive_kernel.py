"""The additive part of ``nn()`` alone: ``networks._HingeSum`` against autograd through the
broadcasting formula ``relu(z a + c) v`` it replaced (issue 19).

One thread, 32 units per input, float32 as the fits' networks: milliseconds of process CPU
time per minibatch of 4,096 rows, forward pass (gradients on) and forward plus backward, for
2, 5 and 20 numeric inputs; then the peak memory (growth of the maximum resident set, each in
a fresh process) of one pass over 10^6 rows x 2 inputs, without and with the backward pass::

    python benchmarks/additive_kernel.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ngmm_formula.networks import _HingeSum  # noqa: E402


def broadcasting(z: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    hidden = torch.relu(z.unsqueeze(-1) * a + c) * v
    return hidden.reshape(hidden.shape[0], -1).sum(-1, keepdim=True)


KERNELS = {"autograd, broadcasting": broadcasting, "_HingeSum": _HingeSum.apply}


def inputs(n: int, m: int, units: int = 32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, m, generator=gen)
    a, c = ((2 * torch.rand(m, units, generator=gen) - 1).requires_grad_() for _ in range(2))
    v = (0.1 * torch.randn(m, units, generator=gen)).requires_grad_()
    return z, a, c, v, torch.randn(n, 1, generator=gen)


def timing(kernel, m: int, reps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    z, a, c, v, g = inputs(4096, m)
    for _ in range(10):
        kernel(z, a, c, v).backward(g)
    t = time.process_time()
    for _ in range(reps):
        kernel(z, a, c, v)
    forward = (time.process_time() - t) / reps
    t = time.process_time()
    for _ in range(reps):
        kernel(z, a, c, v).backward(g)
    return forward * 1e3, (time.process_time() - t) / reps * 1e3


MEMORY = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.additive_kernel import KERNELS, inputs
torch.set_num_threads(1)
z, a, c, v, g = inputs(10**6, 2)
kernel, backward = KERNELS[sys.argv[2]], sys.argv[3] == "backward"
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if backward:
    kernel(z, a, c, v).backward(g)
else:
    with torch.no_grad():
        kernel(z, a, c, v)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def memory(name: str, backward: bool) -> float:
    """MB by which one pass over 10^6 rows x 2 inputs raises the peak resident set."""
    out = subprocess.run([sys.executable, "-c", MEMORY, str(ROOT), name,
                          "backward" if backward else "forward"], check=True,
                         capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.set_num_threads(1)
    print("| inputs | kernel | forward ms | forward + backward ms |\n|---:|---|---:|---:|")
    for m in (2, 5, 20):
        for name, kernel in KERNELS.items():
            fwd, both = timing(kernel, m, 200 if m < 20 else 50)
            print(f"| {m} | {name} | {fwd:.3f} | {both:.3f} |")
    print("\n| 10^6 rows x 2 inputs | peak memory MB, no gradient | with backward |")
    print("|---|---:|---:|")
    for name in KERNELS:
        print(f"| {name} | {memory(name, False):.0f} | {memory(name, True):.0f} |")


if __name__ == "__main__":
    main()
