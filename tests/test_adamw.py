"""``ngmm_formula.adamw`` against ``torch.optim``: the same numbers, bit for bit.

The trainer's optimiser and learning-rate decay replace ``torch.optim.AdamW(foreach=True)``
and ``ReduceLROnPlateau(mode="max")`` (whose first construction in a process imports
``torch._dynamo``, about 1.1 s); equality is asserted with ``torch.equal`` because both run
the same elementwise kernels on the same values in the same order, so any difference would be
a change of the fits, not rounding.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from ngmm_formula.adamw import AdamW, Plateau


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    # the trainer's three groups: network weights, linear part (float64), fast weights
    return [{"params": params[:2], "weight_decay": 1e-4, "lr_scale": 1.0},
            {"params": params[2:3], "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": params[3:], "weight_decay": 1e-4, "lr_scale": 10.0, "lr": 1e-2}]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [((8, 3), torch.float32), ((8,), torch.float32), ((4,), torch.float64),
              ((5, 2), torch.float32)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=d)) for s, d in shapes]


def test_adamw_and_plateau_equal_torch_optim_bit_for_bit() -> None:
    ours_p, theirs_p = _params(0), _params(0)
    ours = AdamW(_groups(ours_p), lr=1e-3)
    theirs = torch.optim.AdamW(_groups(theirs_p), lr=1e-3, foreach=True)
    ours_s = Plateau(ours, factor=0.5, patience=2)
    theirs_s = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, mode="max", factor=0.5,
                                                          patience=2)
    g = torch.Generator().manual_seed(1)
    scores = [-0.9, -0.8, -0.85, -0.8, -0.81, -0.82, -0.83, -0.7, -0.71, -0.72, -0.73, -0.74]
    for t in range(40):
        for a, b in zip(ours_p, theirs_p):
            grad = torch.randn(a.shape, generator=g, dtype=a.dtype)
            if not (t % 7 == 3 and a is ours_p[1]):  # a parameter without gradient: skipped
                a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad(set_to_none=True)
        if t % 3 == 2:
            ours_s.step(scores[t // 3 % len(scores)])
            theirs_s.step(scores[t // 3 % len(scores)])
        for a, b in zip(ours_p, theirs_p):
            assert torch.equal(a, b), t
        assert ([gr["lr"] for gr in ours.param_groups]
                == [gr["lr"] for gr in theirs.param_groups]), t
    assert ours.param_groups[0]["lr"] < 1e-3  # the decay acted


def test_state_dict_round_trip_continues_identically() -> None:
    a_p, b_p = _params(2), _params(2)
    a, b = AdamW(_groups(a_p), lr=1e-3), AdamW(_groups(b_p), lr=1e-3)
    sa, sb = Plateau(a, 0.5, 1), Plateau(b, 0.5, 1)
    g = torch.Generator().manual_seed(3)
    for t in range(12):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in a_p]
        for p, q, grad in zip(a_p, b_p, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
        sa.step(-1.0 - t % 2)
        sb.step(-1.0 - t % 2)
        if t == 5:  # b restarts from a copy of its state, as from a checkpoint
            state, sched = b.state_dict(), sb.state_dict()
            c_p = [torch.nn.Parameter(p.detach().clone()) for p in b_p]
            b, b_p = AdamW(_groups(c_p), lr=1e-3), c_p
            b.load_state_dict(state)
            sb = Plateau(b, 0.5, 1)
            sb.load_state_dict(sched)
    for p, q in zip(a_p, b_p):
        assert torch.equal(p, q)
    assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]


def test_a_neural_fit_does_not_import_torch_dynamo() -> None:
    """The point of the module: a fit with a network in a fresh process never imports
    ``torch._dynamo`` (1.1 s of imports)."""
    code = (
        "import sys\n"
        "from ngmm_formula import Control, ngmm\n"
        "from ngmm_formula.datasets import simulate_grouped\n"
        "d = simulate_grouped(n_groups=30, n_per_group=10, family='binomial', seed=0)\n"
        "ngmm('y ~ nn(x1, x2, hidden=(4,)) + x3 + (1 | g)', d, 'binomial',\n"
        "     control=Control(epochs=3, progress=False))\n"
        "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False"
