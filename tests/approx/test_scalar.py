"""The fused integrals for one scalar random effect per group
(:mod:`ngmm_formula.approx.scalar`), which every fit of a ``(1 | g)``-type model in a family
without dispersion takes.

They compute the same quantity as the general route (:func:`find_mode`, then
:func:`log_marginal`) for the Laplace, adaptive Gauss-Hermite and truncated rules, in
float64: values and gradients agree to round-off (1e-10 relative asserted; about 1e-14
measured), because both evaluate the same rule and its exact implicit-function derivative
at the same mode. The written-out derivative is also checked by
``torch.autograd.gradcheck`` (finite differences of the value, default tolerances: the value
is smooth and in float64) for the two canonical links with closed-form third derivatives and
for the probit link, whose third derivative comes from autograd.
"""

from __future__ import annotations

import pytest
import torch

from ngmm_formula.approx import scalar
from ngmm_formula.approx.adaptive import log_marginal
from ngmm_formula.approx.conditional import find_mode
from ngmm_formula.approx.rules import Rule, gauss_hermite_rule, laplace_rule, truncated_rule
from ngmm_formula.approx.scalar import scalar_log_marginal, scalar_modes
from ngmm_formula.families import Binomial, Family, Gaussian, Poisson
from ngmm_formula.layout import Blocks

FAMILIES = [Binomial(), Binomial("probit"), Binomial("cloglog"), Poisson(), Poisson("identity")]


def _data(family: Family, n_groups: int = 7, seed: int = 0
          ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (n_groups,), generator=g)
    block = torch.repeat_interleave(torch.arange(n_groups), sizes)
    block = block[torch.randperm(block.numel(), generator=g)]  # rows need not be sorted
    n = block.numel()
    eta = 0.5 * torch.randn(n, dtype=torch.float64, generator=g)
    if family.link.name == "identity":
        eta = eta.abs() + 1.0
    w = torch.randint(1, 4, (n,), generator=g).double()
    if family.name == "binomial":
        y = torch.binomial(w, torch.sigmoid(eta), generator=g) / w
    else:
        y = torch.poisson(family.mean(eta), generator=g)
    c = 0.3 + 0.5 * torch.rand(n, dtype=torch.float64, generator=g)
    return y, w, eta, c, block


RULES = [laplace_rule(1), gauss_hermite_rule(1, 7), truncated_rule(1, 5.0, 41)]


def _general(family: Family, y: torch.Tensor, w: torch.Tensor, eta: torch.Tensor,
             c: torch.Tensor, block: torch.Tensor, n_groups: int, start: torch.Tensor,
             rule: Rule) -> torch.Tensor:
    blocks = Blocks(n_groups, 1, block, torch.zeros(block.numel(), 1, dtype=torch.long),
                    torch.ones(1, dtype=torch.float64))
    C = c.unsqueeze(-1)
    mode = find_mode(family, y, w, eta, None, C, blocks, start.unsqueeze(-1), tol=1e-13)
    return log_marginal(family, y, w, eta, None, C, blocks, mode, rule,
                        family.data_constant(y, w))


def _modes(family: Family, y: torch.Tensor, w: torch.Tensor, eta: torch.Tensor,
           c: torch.Tensor, block: torch.Tensor, n_groups: int) -> torch.Tensor:
    v = scalar_modes(family, y, w, eta, c, block, n_groups,
                     torch.zeros(n_groups, dtype=torch.float64), 30)
    assert v is not None
    return v


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}{r.n_nodes}")
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_equals_the_general_route(family: Family, rule: Rule) -> None:
    y, w, eta, c, block = _data(family)
    n_groups = int(block.max()) + 1
    # modes from a nearby warm start, as in training
    v = scalar_modes(family, y, w, eta, c, block, n_groups,
                     _modes(family, y, w, eta, c, block, n_groups) + 0.01, 4)
    assert v is not None
    e1, c1 = eta.clone().requires_grad_(), c.clone().requires_grad_()
    out = scalar_log_marginal(family, y, w, e1, c1, block, n_groups, v, rule,
                              family.data_constant(y, w))
    assert out is not None
    value, curvature = out
    value.sum().backward()
    e2, c2 = eta.clone().requires_grad_(), c.clone().requires_grad_()
    general = _general(family, y, w, e2, c2, block, n_groups, v, rule)
    general.sum().backward()
    # both routes evaluate the same float64 expressions at the same mode (the general search
    # starts at v and stops within 1e-13): the differences are rounding, ~1e-14 measured
    torch.testing.assert_close(value, general, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-10, atol=1e-10)
    assert not curvature.requires_grad and bool((curvature > 1).all())


@pytest.mark.parametrize("rule", RULES[:2], ids=lambda r: f"{r.name}{r.n_nodes}")
@pytest.mark.parametrize("family", [Binomial(), Binomial("probit"), Poisson()], ids=repr)
def test_gradcheck(family: Family, rule: Rule) -> None:
    y, w, eta, c, block = _data(family, n_groups=4, seed=1)
    n_groups = int(block.max()) + 1
    settled = _modes(family, y, w, eta, c, block, n_groups)

    def value(e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # enough steps from a nearby start that every perturbed point finds its own mode
        v = scalar_modes(family, y, w, e, s, block, n_groups, settled, 12)
        assert v is not None
        out = scalar_log_marginal(family, y, w, e, s, block, n_groups, v, rule)
        assert out is not None
        return out[0]

    assert torch.autograd.gradcheck(value, (eta.clone().requires_grad_(),
                                            c.clone().requires_grad_()))


def test_unsettled_modes_and_dispersion_families_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    family = Binomial()
    y, w, eta, c, block = _data(family)
    n_groups = int(block.max()) + 1
    far = torch.full((n_groups,), 5.0, dtype=torch.float64)
    # one undamped step from far away cannot move every mode by less than 1e-3 ...
    monkeypatch.setattr(scalar, "EXTRA_STEPS", 0)
    assert scalar_modes(family, y, w, eta, c, block, n_groups, far, 1) is None
    # ... which the extra steps then do
    monkeypatch.setattr(scalar, "EXTRA_STEPS", 8)
    assert scalar_modes(family, y, w, eta, c, block, n_groups, far, 1) is not None
    with pytest.raises(ValueError, match="without dispersion"):
        scalar_modes(Gaussian(), y, w, eta, c, block, n_groups, far, 1)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}{r.n_nodes}")
def test_rows_laid_out_by_group_give_the_same_bits(rule: Rule) -> None:
    """Rows sorted by group: the sums over a group's rows go by segments
    (:attr:`~ngmm_formula.layout.Blocks.row_offsets`), the same additions in the same order,
    so modes, values and gradients are equal bit for bit to the scattered sums'."""
    family = Binomial()
    y, w, eta, c, block = _data(family, n_groups=9, seed=2)
    order = torch.argsort(block, stable=True)
    y, w, eta, c, block = (x[order] for x in (y, w, eta, c, block))
    n_groups = int(block.max()) + 1
    blocks = Blocks(n_groups, 1, block, torch.zeros(block.numel(), 1, dtype=torch.long),
                    torch.ones(1, dtype=torch.float64))
    start = torch.full((n_groups,), 0.2, dtype=torch.float64)
    results = []
    for offsets in (None, blocks.row_offsets):
        v = scalar_modes(family, y, w, eta, c, block, n_groups, start, 3, offsets=offsets)
        assert v is not None
        e1, c1 = eta.clone().requires_grad_(), c.clone().requires_grad_()
        out = scalar_log_marginal(family, y, w, e1, c1, block, n_groups, v, rule,
                                  family.data_constant(y, w), offsets)
        assert out is not None
        out[0].sum().backward()
        results.append((v, out[0].detach(), out[1], e1.grad, c1.grad))
    for scattered, segments in zip(*results):
        assert torch.equal(scattered, segments)


@pytest.mark.parametrize("family", [Binomial(), Poisson()], ids=repr)
def test_training_steps_stop_at_their_tolerance(family: Family,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``settle`` = 1e-3 (training) the steps stop once one moves no mode by more.
    Newton's error is then about the square of that move times |h'''| / 2H, here at most
    max c / 2 < 0.5 (|l'''| <= |l''| for the canonical binomial and Poisson): within 1e-6
    of the mode, asserted with a margin of 10 (an analytic bound, not rounding). From the
    exact modes one step suffices; the linear fits' 1e-6 goes on further."""
    y, w, eta, c, block = _data(family, n_groups=12, seed=3)
    n_groups = int(block.max()) + 1
    exact = _modes(family, y, w, eta, c, block, n_groups)
    calls: list[int] = []
    original = type(family).eta_derivatives

    def counted(self: Family, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls[-1] += 1
        return original(self, *args)

    monkeypatch.setattr(type(family), "eta_derivatives", counted)
    for start_off, settle, bound in ((0.3, 1e-3, 1e-5), (0.3, 1e-6, 1e-11), (0.0, 1e-3, 1e-12)):
        calls.append(0)
        v = scalar_modes(family, y, w, eta, c, block, n_groups, exact + start_off, 1,
                         settle=settle)
        assert v is not None
        assert float((v - exact).abs().max()) < bound
    assert calls[2] == 1 and calls[0] < calls[1]


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_family_derivatives_agree_with_the_separate_ones(family: Family) -> None:
    y, w, eta, _, _ = _data(family)
    d1, d2 = family.eta_derivatives(y, eta, None, w)
    # the same float64 formulas up to the order of a few products and sums (and 1 - p from
    # its own sigmoid): rounding of ~1e-16 relative on any IEEE machine, 1e-13 leaves 1000x
    torch.testing.assert_close(d1, family.dlogp(y, eta, None, w), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(d2, family.d2logp(y, eta, None, w), rtol=1e-13, atol=1e-15)
    # the closed forms of the canonical links against autograd on d2logp
    torch.testing.assert_close(family.d3logp(y, eta, None, w),
                               Family.d3logp(family, y, eta, None, w), rtol=1e-12, atol=1e-14)
