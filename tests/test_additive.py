"""The additive part of ``nn()`` networks (``networks.Additive``, the ``additive=`` option of
``nn()``, its own learning rate in ``train._optimiser``): what it computes, which inputs it
sees, its gradients, model files with and without it, and the optimiser's groups.

Its effect on predictions is measured by ``benchmarks/neural/suite.py`` (``--nn
additive=0`` against the default), not asserted here.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula import Control, networks, ngmm
from ngmm_formula.adamw import AdamW, Plateau
from ngmm_formula.errors import FormulaError
from ngmm_formula.formula import parse_formula
from ngmm_formula.networks import (
    MLP,
    Additive,
    Ensemble,
    _HingeSum,
    network_from_data,
    network_to_data,
)
from ngmm_formula.train import ADDITIVE_LR_SCALE, _optimiser, _train_on_schedule


def _randomised(net: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()


def test_additive_is_a_sum_of_hinges_of_the_numeric_inputs() -> None:
    """sum_j sum_h v_jh max(0, a_jh x_j + c_jh) over the numeric columns only, written out
    with loops; exact up to the order of the sums (1e-12 on values of order 10)."""
    part = Additive([True, False, True], 4, torch.float64)
    assert part.weight.shape == (2, 4) and not part.weight.any()  # starts at 0
    _randomised(part)
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = torch.zeros(6, dtype=torch.float64)
    for m, j in enumerate([0, 2]):
        for h in range(4):
            expected += part.weight[m, h] * torch.relu(part.slope[m, h] * x[:, j]
                                                       + part.shift[m, h])
    # float64: 8 terms of size <= ~10 summed in two orders differ by a few ulps of 10
    # (~1e-14) on any IEEE machine, with or without fused multiply-add; 1e-12 leaves 100x
    torch.testing.assert_close(part(x).squeeze(-1), expected.detach(), rtol=0, atol=1e-12)
    assert Additive([False, False], 4, torch.float64).units == 0  # no numeric input
    assert not list(Additive([True], 0, torch.float64).parameters())
    with pytest.raises(ValueError, match="units"):
        Additive([True], -1, torch.float64)


def test_mlp_adds_the_additive_part_of_the_noisy_dense_inputs() -> None:
    """``raw = gamma' x + body(x + e) + additive(x + e)``; embedded code columns are not
    its inputs."""
    net = MLP(3, (5,), "relu", 0.0, factors=[0, 4, 0], additive=3)
    _randomised(net, 1)
    codes = torch.tensor([0.0, 3.0, 1.0, 2.0])
    x = torch.stack([torch.randn(4, dtype=torch.float64), codes.double(),
                     torch.randn(4, dtype=torch.float64)], 1)
    e = 0.1 * torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        without = net.raw(x, e)
        extra = net.additive(x[:, [0, 2]] + e[:, [0, 2]]).squeeze(-1)
        net.additive.weight.zero_()
        # float64 values of order 10: subtracting the part again leaves rounding of a few
        # ulps (~1e-14) on any IEEE machine; 1e-12 leaves 100x
        torch.testing.assert_close(without - extra, net.raw(x, e), rtol=0, atol=1e-12)
    assert net.additive.slope.shape == (2, 3)


def test_the_additive_part_sees_a_scaled_share_of_the_input_noise() -> None:
    """With ``additive_noise_scale`` s the additive part's input is ``x + s e`` while the
    body's stays ``x + e``: at s = 0.3 the network equals the one at s = 1 with the additive
    part fed ``x + 0.3 e`` by hand (float64, values of order 10: a few ulps, 1e-12 leaves
    100x); at s = 1 it is the body's input itself."""
    net = MLP(2, (5,), "relu", 0.0, additive=3)
    _randomised(net, 2)
    x = torch.randn(6, 2, dtype=torch.float64)
    e = 0.1 * torch.randn(6, 2, dtype=torch.float64)
    assert net.additive_noise_scale == 1.0
    with torch.no_grad():
        full = net.raw(x, e)
        net.additive_noise_scale = 0.3
        scaled = net.raw(x, e)
        by_hand = (full - net.additive(x + e).squeeze(-1)
                   + net.additive(x + 0.3 * e).squeeze(-1))
    torch.testing.assert_close(scaled, by_hand, rtol=0, atol=1e-12)
    assert not torch.equal(scaled, full)


@pytest.mark.parametrize("family, scale", [("gaussian", 0.3), ("poisson", 0.3),
                                           ("binomial", 1.0)])
def test_training_sets_the_additive_noise_scale_by_family(family: str, scale: float) -> None:
    """The trainer gives the networks the family's scale (train.ADDITIVE_NOISE_SCALE: the
    body's noise for binomial data, 0.3 of it otherwise), every fold network of the
    default's average too; a prediction adds no noise."""
    rng = np.random.default_rng(1)
    n = 300
    df = pd.DataFrame({"x": rng.normal(size=n), "g": (np.arange(n) % 15).astype(str)})
    eta = np.sin(2 * df.x) + rng.normal(0, 0.5, 15)[np.arange(n) % 15]
    df["y"] = {"gaussian": eta + rng.normal(0, 0.3, n),
               "poisson": rng.poisson(np.exp(eta)),
               "binomial": rng.binomial(1, 1 / (1 + np.exp(-eta)))}[family]
    fit = ngmm("y ~ nn(x, hidden=(8,)) + (1 | g)", df, family,
               control=Control(epochs=3, min_steps=0, progress=False), seed=0)
    (net,) = fit.nets
    assert isinstance(net, Ensemble) and len(net.members) == 6  # 5 folds and all groups
    assert all(isinstance(m, MLP) and m.additive_noise_scale == scale for m in net.members)


def test_additive_gradients() -> None:
    """``gradcheck`` (float64 finite differences) of the output in the input and in the
    additive part's weights, away from the hinges' kinks (a kink within the step has
    probability ~1e-5 per unit here)."""
    net = MLP(2, (4,), "tanh", 0.0, additive=3)
    _randomised(net, 2)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    names = ["additive.slope", "additive.shift", "additive.weight"]
    leaves = [dict(net.named_parameters())[n].detach().clone().requires_grad_(True)
              for n in names]

    def f(x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        params = {**dict(net.named_parameters()), **dict(zip(names, ws))}
        return torch.func.functional_call(net, params, (x,))

    assert torch.autograd.gradcheck(f, (x, *leaves))


def _broadcast_hinges(z: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """The additive part as it was first written: broadcasting, differentiated by autograd."""
    hidden = torch.relu(z.unsqueeze(-1) * a + c) * v
    return hidden.reshape(hidden.shape[0], -1).sum(-1, keepdim=True)


def _hinge_inputs(n: int, m: int, units: int, dtype: torch.dtype, seed: int
                  ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, m, dtype=dtype, generator=gen)
    a, c = (2 * torch.rand(m, units, dtype=dtype, generator=gen) - 1 for _ in range(2))
    v = torch.randn(m, units, dtype=dtype, generator=gen)
    g = torch.randn(n, 1, dtype=dtype, generator=gen)
    return z, a, c, v, g


@pytest.mark.parametrize("chunk_bytes", [networks.HINGE_CHUNK_BYTES, 250])
def test_hinge_sum_gradcheck(chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gradcheck`` of the additive part's hand-written backward (``_HingeSum``) against
    float64 finite differences in the inputs, slopes, shifts and output weights, in one chunk
    of rows and in chunks of 2 rows (250 bytes, 9 rows: the last chunk shorter); every
    pre-activation is at least 1e-3 from its kink, far beyond gradcheck's step of 1e-6."""
    monkeypatch.setattr(networks, "HINGE_CHUNK_BYTES", chunk_bytes)
    z, a, c, v, _ = _hinge_inputs(9, 3, 5, torch.float64, 4)
    assert (z.unsqueeze(-1) * a + c).abs().min() > 1e-3
    leaves = [t.clone().requires_grad_(True) for t in (z, a, c, v)]
    assert torch.autograd.gradcheck(_HingeSum.apply, leaves)
    only_weights = [z, *leaves[1:]]  # the case of training: inputs without gradient
    assert torch.autograd.gradcheck(_HingeSum.apply, only_weights)


@pytest.mark.parametrize("chunk_bytes", [networks.HINGE_CHUNK_BYTES, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hinge_sum_equals_the_broadcasting_formula(dtype: torch.dtype, chunk_bytes: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward values are the broadcasting formula's bit for bit (the same operations in
    the same order; each row's sum does not depend on the chunk of rows it is computed in:
    one chunk, or chunks of 26 or 13 rows, the last one shorter); the gradients differ only by
    the order of the sums over rows (and the split of dL/dv into a S^z + c S). The same mask
    [fl(a z + c) > 0] is used by both, so
    each gradient is a sum of K <= rows + units + 4 rounded terms computed twice, and the two
    differ by at most 2 K u T, u the unit roundoff and T the sum of the absolute values of
    the terms: the worst-case bound of any summation order on IEEE arithmetic (fused
    multiply-add only tightens it), so it holds on any machine."""
    monkeypatch.setattr(networks, "HINGE_CHUNK_BYTES", chunk_bytes)
    n, m, units = 1000, 3, 32
    z, a, c, v, g = _hinge_inputs(n, m, units, dtype, 5)
    leaves = [t.clone().requires_grad_(True) for t in (z, a, c, v)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (z, a, c, v)]
    out = _HingeSum.apply(*leaves)
    ref = _broadcast_hinges(*ref_leaves)
    assert torch.equal(out, ref)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    ag, az, ac, av = g.abs().unsqueeze(-1), z.abs().unsqueeze(-1), c.abs(), v.abs()
    aa = a.abs()
    scale = [(ag * av * aa).sum(-1),  # dL/dz
             (ag * av * az).sum(0), (ag * av).expand(n, m, units).sum(0),  # dL/da, dL/dc
             (ag * (aa * az + ac)).sum(0)]  # dL/dv
    u = torch.finfo(dtype).eps / 2
    bound = 2 * (n + units + 4) * u
    for got, want, t in zip(grads, ref_grads, scale):
        assert ((got - want).abs() <= bound * t).all()


def test_hinge_sum_ignores_alignment_and_keeps_only_the_inputs() -> None:
    """Values and gradients are the same bits for inputs starting at every 8-byte offset of a
    64-byte line (no kernel whose rounding depends on alignment:
    ``model.matvec``); between the passes only tensors of the inputs' and weights' sizes are
    kept (O(n x inputs), not O(n x inputs x units))."""
    z, a, c, v, g = _hinge_inputs(3000, 2, 32, torch.float64, 6)

    def at_offset(t: torch.Tensor, k: int) -> torch.Tensor:
        buf = torch.empty(t.numel() + 8, dtype=t.dtype)
        out = buf[k:k + t.numel()].view(t.shape)
        out.copy_(t)
        return out

    def run(z: torch.Tensor, *weights_and_g: torch.Tensor) -> list[torch.Tensor]:
        ws = [t.clone().requires_grad_(True) for t in weights_and_g[:3]]
        out = _HingeSum.apply(z, *ws)
        return [out.detach(), *torch.autograd.grad(out, ws, weights_and_g[3])]

    ref = run(z, a, c, v, g)
    for k in range(1, 8):
        got = run(*(at_offset(t, k) for t in (z, a, c, v, g)))
        assert all(torch.equal(r, o) for r, o in zip(ref, got)), k
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                  lambda t: t):
        _HingeSum.apply(z, *(t.clone().requires_grad_(True) for t in (a, c, v)))
    assert max(sizes) == z.numel() and sum(sizes) == z.numel() + 3 * a.numel()


def test_model_files_with_and_without_the_additive_part() -> None:
    """``config()`` carries ``additive``; a configuration without it (files before it) and
    a network pickled before it have no additive part and compute what they computed."""
    net = MLP(2, (4,), "relu", 0.0, additive=5)
    _randomised(net, 3)
    x = torch.randn(6, 2, dtype=torch.float64)
    data = network_to_data(net)
    assert data["config"]["additive"] == 5
    back = network_from_data(data)
    back.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    old_config = dict(data["config"])
    del old_config["additive"]
    plain = network_from_data({"type": "MLP", "config": old_config})
    assert isinstance(plain, MLP) and plain.additive.units == 0 and not plain.fast_parameters()
    old = MLP(2, (4,), "relu", 0.0)
    _randomised(old, 4)
    before = old(x)
    del old._modules["additive"]
    loaded = pickle.loads(pickle.dumps(old))
    torch.testing.assert_close(loaded(x), before, rtol=0, atol=0)
    assert loaded.additive.units == 0


def test_optimiser_trains_the_additive_part_faster_on_every_schedule() -> None:
    """The additive weights have their own group at ADDITIVE_LR_SCALE x lr; the plateau
    decay (a factor on every group) and a replayed schedule keep the ratio."""
    net = MLP(2, (4,), "relu", 0.0, additive=3)
    other = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    control = Control(lr=1e-3, progress=False)
    opt = _optimiser(list(net.parameters()), other, control, net.fast_parameters())
    fast = opt.param_groups[2]
    assert {id(p) for p in fast["params"]} == {id(p) for p in net.additive.parameters()}
    assert not {id(p) for p in fast["params"]} & {id(p) for p in opt.param_groups[0]["params"]}
    assert fast["lr"] == pytest.approx(1e-3 * ADDITIVE_LR_SCALE)
    sched = Plateau(opt, factor=0.5, patience=0)
    for score in (1.0, 0.0, 0.0):
        sched.step(score)
    assert fast["lr"] / opt.param_groups[0]["lr"] == pytest.approx(ADDITIVE_LR_SCALE)

    class Module:  # what _train_on_schedule touches of a LinearPredictor
        nets = (net,)

        def train(self) -> None:
            pass

    seen: list[tuple[float, float]] = []

    def step(o: AdamW, batch: object) -> float:
        seen.append((o.param_groups[0]["lr"], o.param_groups[2]["lr"]))
        return 0.0

    _train_on_schedule(Module(), list(net.parameters()), other,  # type: ignore[arg-type]
                       lambda order, k: [order], step, np.random.default_rng(0),
                       np.arange(3), 3, [1e-3, 5e-4], control)
    assert seen == [(1e-3, pytest.approx(1e-3 * ADDITIVE_LR_SCALE)),
                    (5e-4, pytest.approx(5e-4 * ADDITIVE_LR_SCALE))]


def test_nn_option_additive() -> None:
    """``nn(..., additive=H)`` sets the units per numeric input (default 32; 0: none); a bad
    value is an error that names the option."""
    (term,) = parse_formula("y ~ nn(x1, x2) + (1 | g)").nn_terms
    assert term.additive == 32
    (term,) = parse_formula("y ~ nn(x1, x2, additive=0) + (1 | g)").nn_terms
    assert term.additive == 0
    for bad in ("-1", "2.5", "True", "'a'"):
        with pytest.raises(FormulaError, match="additive"):
            parse_formula(f"y ~ nn(x1, additive={bad}) + (1 | g)")


def test_fit_with_and_without_the_additive_part() -> None:
    """A fit's networks get the part by default (32 units per numeric input, none for a
    factor input) and none with ``additive=0``; the summary's weight count includes it."""
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n),
                       "f": pd.Categorical(rng.choice(["a", "b", "c"], n)),
                       "g": (np.arange(n) % 20).astype(str)})
    df["y"] = np.sin(2 * df.x1) + rng.normal(0, 0.5, 20)[np.arange(n) % 20] + rng.normal(
        0, 0.3, n)
    quick = Control(epochs=5, min_steps=0, progress=False, average_folds=False)  # one network
    fit = ngmm("y ~ nn(x1, x2, f, hidden=(8,)) + (1 | g)", df, control=quick, seed=0)
    (net,) = fit.nets
    assert isinstance(net, MLP) and net.additive.slope.shape == (2, 32)
    plain = ngmm("y ~ nn(x1, x2, f, hidden=(8,), additive=0) + (1 | g)", df, control=quick,
                 seed=0)
    (pnet,) = plain.nets
    assert pnet.additive.units == 0
    assert net.n_weights - pnet.n_weights == 3 * 2 * 32
