"""The fused Laplace approximation for one scalar random effect per group
(:mod:`ngmm_formula.approx.scalar`), which the training steps of ``(1 | g)`` models take.

It computes the same quantity as the general route (:func:`find_mode` with fixed steps, then
:func:`log_marginal` with the one-node rule), in float64: values and gradients agree to
round-off (1e-10 relative here; measured 2e-14 and 2e-16 on the binomial case), because both
evaluate the Laplace approximation and its exact implicit-function derivative at the same
mode. The written-out derivative is also checked by ``torch.autograd.gradcheck`` (finite
differences of the value, default tolerances: the value is smooth and in float64) for the
two canonical links with closed-form third derivatives and for the probit link, whose
third derivative comes from autograd.
"""

from __future__ import annotations

import pytest
import torch

from ngmm_formula.approx import scalar
from ngmm_formula.approx.adaptive import log_marginal
from ngmm_formula.approx.conditional import find_mode
from ngmm_formula.approx.rules import laplace_rule
from ngmm_formula.approx.scalar import scalar_laplace
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


def _general(family: Family, y: torch.Tensor, w: torch.Tensor, eta: torch.Tensor,
             c: torch.Tensor, block: torch.Tensor, n_groups: int, start: torch.Tensor
             ) -> torch.Tensor:
    blocks = Blocks(n_groups, 1, block, torch.zeros(block.numel(), 1, dtype=torch.long),
                    torch.ones(1, dtype=torch.float64))
    C = c.unsqueeze(-1)
    mode = find_mode(family, y, w, eta, None, C, blocks, start.unsqueeze(-1), tol=1e-13)
    return log_marginal(family, y, w, eta, None, C, blocks, mode, laplace_rule(1),
                        family.data_constant(y, w))


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_equals_the_general_laplace(family: Family) -> None:
    y, w, eta, c, block = _data(family)
    n_groups = int(block.max()) + 1
    start = torch.zeros(n_groups, dtype=torch.float64)
    # converge the modes first (the fused steps start warm in training)
    settled = scalar_laplace(family, y, w, eta, c, block, n_groups, start, 30)
    assert settled is not None
    start = settled[1] + 0.01
    e1, c1 = eta.clone().requires_grad_(), c.clone().requires_grad_()
    out = scalar_laplace(family, y, w, e1, c1, block, n_groups, start, 4,
                         family.data_constant(y, w))
    assert out is not None
    value, mode, curvature = out
    value.sum().backward()
    e2, c2 = eta.clone().requires_grad_(), c.clone().requires_grad_()
    general = _general(family, y, w, e2, c2, block, n_groups, start)
    general.sum().backward()
    torch.testing.assert_close(value, general, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-10, atol=1e-10)
    assert not mode.requires_grad and bool((curvature > 1).all())


@pytest.mark.parametrize("family", [Binomial(), Binomial("probit"), Poisson()], ids=repr)
def test_gradcheck(family: Family) -> None:
    y, w, eta, c, block = _data(family, n_groups=4, seed=1)
    n_groups = int(block.max()) + 1
    settled = scalar_laplace(family, y, w, eta, c, block, n_groups,
                             torch.zeros(n_groups, dtype=torch.float64), 30)
    assert settled is not None

    def value(e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # enough steps from a nearby start that every perturbed point finds its own mode
        out = scalar_laplace(family, y, w, e, s, block, n_groups, settled[1], 12)
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
    assert scalar_laplace(family, y, w, eta, c, block, n_groups, far, 1) is None
    # ... which the extra steps then do
    monkeypatch.setattr(scalar, "EXTRA_STEPS", 8)
    assert scalar_laplace(family, y, w, eta, c, block, n_groups, far, 1) is not None
    with pytest.raises(ValueError, match="without dispersion"):
        scalar_laplace(Gaussian(), y, w, eta, c, block, n_groups, far, 1)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_family_derivatives_agree_with_the_separate_ones(family: Family) -> None:
    y, w, eta, _, _ = _data(family)
    d1, d2 = family.eta_derivatives(y, eta, None, w)
    torch.testing.assert_close(d1, family.dlogp(y, eta, None, w), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(d2, family.d2logp(y, eta, None, w), rtol=1e-13, atol=1e-15)
    # the closed forms of the canonical links against autograd on d2logp
    torch.testing.assert_close(family.d3logp(y, eta, None, w),
                               Family.d3logp(family, y, eta, None, w), rtol=1e-12, atol=1e-14)
