"""The factorisations of :mod:`ngmm_formula.approx.factor` against the dense algebra.

:class:`~ngmm_formula.approx.factor.SchurFactor` (block elimination over one grouping factor)
must give the same log-determinant, Newton solve and diagonal blocks of :math:`H^{-1}` as the
dense Cholesky factor of the same :math:`H` -- to round-off (1e-10 relative: both are
backward-stable factorisations of a well-conditioned matrix with entries of order 1-100) --
for crossed, nested, correlated-slope and REML layouts, with both ways of forming the Schur
complement's correction (pairs of pairs, dense product). Its index maps are checked exactly on
a design small enough to count by hand, and its gradients with ``gradcheck``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula.api import Prepared, prepare
from ngmm_formula.approx.conditional import Blocks, factorise, neg_hessian
from ngmm_formula.approx.factor import DenseFactor, SchurFactor, SchurMaps
from ngmm_formula.model import LinearPredictor, joint_split
from tests.test_objective import small_data


def _with_split(p: Prepared, split: Any) -> Blocks:
    return dataclasses.replace(p.problem.blocks, split=split)


LAYOUTS = [
    # (id, formula, family, prepare kwargs, n_groups of small_data)
    ("crossed_ml", "ygauss ~ x + (1 | g) + (1 | h)", "gaussian", {"reml": False}, 30),
    ("crossed_reml", "ygauss ~ x + (1 | g) + (1 | h)", "gaussian", {"reml": True}, 30),
    ("slope_crossed", "ycount ~ x + (1 + x | g) + (1 | h)", "poisson", {"approx": "laplace"},
     20),
    ("single_factor_reml", "ygauss ~ x + (1 + x | g)", "gaussian", {"reml": True}, 25),
    ("uncorrelated_reml", "ygauss ~ x + (x || g) + (1 | h)", "gaussian", {"reml": True}, 25),
    ("nested_reml", "ygauss ~ x + (1 | h/g)", "gaussian", {"reml": True}, 12),
]


def _random_weights(p: Prepared, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    module = LinearPredictor(p.problem, p.family.has_dispersion)
    with torch.no_grad():
        module.theta.copy_(0.3 + torch.rand(module.theta.shape, generator=gen,
                                            dtype=torch.float64))
    C = module.slot_values(p.problem).detach()
    W = 0.2 + torch.rand(C.shape[0], generator=gen, dtype=torch.float64)
    return W, C


@pytest.fixture(params=[False, True], ids=["pairs", "dense_product"])
def dense_correction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    # 0 makes every correction a scatter over pairs of pairs, 1e30 a dense product
    monkeypatch.setattr(SchurMaps, "SCATTER_COST", 1e30 if request.param else 0.0)
    return bool(request.param)


@pytest.mark.parametrize(("formula", "family", "kw", "n_groups"), [c[1:] for c in LAYOUTS],
                         ids=[c[0] for c in LAYOUTS])
def test_schur_factor_equals_dense(formula: str, family: str, kw: dict[str, Any],
                                   n_groups: int, dense_correction: bool) -> None:
    p = prepare(formula, small_data(n_groups=n_groups), family, **kw)
    split = joint_split(p.design.re_terms, p.problem.blocks.dim, dense_max_dim=0)
    assert split is not None
    schur_blocks, dense_blocks = _with_split(p, split), _with_split(p, None)
    assert schur_blocks.schur_maps.dense_correction == dense_correction
    W, C = _random_weights(p, 0)
    schur = factorise(W, C, schur_blocks)
    dense = factorise(W, C, dense_blocks)
    assert isinstance(schur, SchurFactor) and isinstance(dense, DenseFactor)
    assert schur.ok and dense.ok
    H = neg_hessian(W, C, dense_blocks)[0]
    D = H.shape[0]
    # log|H| against LAPACK's determinant of the dense matrix
    logdet = torch.linalg.slogdet(H)[1]
    assert float(2 * schur.half_logdet()[0]) == pytest.approx(float(logdet), rel=1e-10)
    assert float(2 * dense.half_logdet()[0]) == pytest.approx(float(logdet), rel=1e-10)
    g = torch.randn(1, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = schur.solve(g)
    torch.testing.assert_close(H @ x[0], g[0], rtol=1e-10, atol=1e-10)
    # diagonal blocks of H^{-1}: every coordinate alone, and each term's level blocks
    Hinv = torch.linalg.inv(H)
    single = torch.arange(D)[:, None]
    torch.testing.assert_close(schur.inverse_blocks(single)[:, 0, 0], torch.diagonal(Hinv),
                               rtol=1e-10, atol=1e-12)
    start = 0
    for t in p.design.re_terms:
        idx = start + torch.arange(t.n_levels)[:, None] * t.q + torch.arange(t.q)[None, :]
        want = Hinv[idx[:, :, None], idx[:, None, :]]
        torch.testing.assert_close(schur.inverse_blocks(idx), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dense.inverse_blocks(idx), want, rtol=1e-10, atol=1e-12)
        start += t.n_levels * t.q
    if p.problem.reml:
        # conditional on beta: blocks of the inverse of the u-block of H; and beta's block
        beta = torch.arange(D - p.problem.p, D)
        u = torch.arange(D - p.problem.p)
        Huu_inv = torch.linalg.inv(H[u[:, None], u[None, :]])
        idx = split.a_coords
        want = Huu_inv[idx[:, :, None], idx[:, None, :]]
        torch.testing.assert_close(schur.inverse_blocks(idx, beta), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dense.inverse_blocks(idx, beta), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(schur.inverse_blocks(beta[None, :])[0],
                                   Hinv[beta[:, None], beta[None, :]], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("formula", "family", "kw"),
                         [c[1:4] for c in LAYOUTS if c[0] in ("crossed_reml", "slope_crossed")],
                         ids=["crossed_reml", "slope_crossed"])
def test_schur_half_logdet_gradient(formula: str, family: str, kw: dict[str, Any],
                                    dense_correction: bool) -> None:
    """The log-determinant is differentiated through S with the custom backward
    0.5 S^{-1} (``_HalfLogdet``) and through the scatter-adds; gradcheck in W and C
    (8 groups: a few hundred inputs)."""
    p = prepare(formula, small_data(n_groups=8), family, **kw)
    blocks = _with_split(p, joint_split(p.design.re_terms, p.problem.blocks.dim,
                                        dense_max_dim=0))
    W, C = _random_weights(p, 2)
    W.requires_grad_(True)
    C.requires_grad_(True)

    def f(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return factorise(W, C, blocks).half_logdet()

    # fast mode: random projections of the Jacobian (a few hundred inputs)
    assert torch.autograd.gradcheck(f, (W, C), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_maps_counted_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten observations of a factor a (5 levels) crossed with b (2 levels), intercept only,
    REML: A = a (most coordinates), B = (b1, b2, beta)."""
    data = pd.DataFrame({
        "y": [1.0, 2.0, 0.5, 1.5, 3.0, 2.5, 1.0, 0.0, 2.0, 1.0],
        "a": pd.Categorical(["a1", "a1", "a2", "a2", "a3", "a3", "a4", "a5", "a1", "a2"]),
        "b": pd.Categorical(["b1", "b2", "b1", "b1", "b2", "b2", "b1", "b2", "b1", "b1"]),
    })
    p = prepare("y ~ 1 + (1 | a) + (1 | b)", data, "gaussian", reml=True)
    # lme4's Zt order: a1 .. a5 | b1 b2 | beta
    split = joint_split(p.design.re_terms, 8, dense_max_dim=0)
    assert split is not None
    assert split.a_coords.tolist() == [[0], [1], [2], [3], [4]]
    assert split.b_coords.tolist() == [5, 6, 7]
    assert split.a_slots.tolist() == [0] and split.b_slots.tolist() == [1, 2]
    monkeypatch.setattr(SchurMaps, "SCATTER_COST", 0.0)  # keep the pairs of pairs
    maps = SchurMaps.of(p.problem.blocks.slot_pos, split)
    # distinct (level of a, B coordinate) pairs, sorted by level: a1-b1 a1-b2 a1-beta a2-b1
    # a2-beta a3-b2 a3-beta a4-b1 a4-beta a5-b2 a5-beta
    assert list(zip(maps.pair_level.tolist(), maps.pair_b.tolist())) == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 1), (2, 2), (3, 0), (3, 2), (4, 1), (4, 2)]
    # pairs p < r of pairs sharing a level: a1 has 3 pairs (3 combinations), the others 2 (1)
    assert maps.left is not None and maps.right is not None
    assert list(zip(maps.left.tolist(), maps.right.tolist())) == [
        (0, 1), (0, 2), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]
    # H_AB of the observations a1-b1 (rows 0 and 8) lands on pair 0 twice
    assert maps.ab_index[0, 0, 0] == maps.ab_index[8, 0, 0] == 0


def test_joint_split_choice() -> None:
    """A is the grouping factor with most coordinates (two terms of one factor count
    together); small joint blocks stay dense."""
    p = prepare("ygauss ~ x + (x || h) + (1 | g)", small_data(n_groups=30), "gaussian",
                reml=True)
    terms = p.design.re_terms
    assert [t.group for t in terms] == ["g", "h", "h"]
    D = p.problem.blocks.dim
    split = joint_split(terms, D, dense_max_dim=0)
    assert split is not None and split.n_levels == 30 and split.q == 1
    assert split.dim_b == 4 + 4 + p.problem.p
    assert joint_split(terms, D) is None  # D = 40 + 2: dense is cheaper
    # B would be most of the block: no gain from the elimination
    q = prepare("ygauss ~ x + (1 | g) + (1 | h)", small_data(n_groups=4), "gaussian",
                reml=True)
    assert joint_split(q.design.re_terms, q.problem.blocks.dim, dense_max_dim=0) is None


def test_inverse_blocks_rejects_mixed_rows() -> None:
    p = prepare("ygauss ~ x + (1 | g) + (1 | h)", small_data(n_groups=30), "gaussian",
                reml=True)
    split = joint_split(p.design.re_terms, p.problem.blocks.dim, dense_max_dim=0)
    W, C = _random_weights(p, 3)
    f = factorise(W, C, _with_split(p, split))
    with pytest.raises(ValueError, match="entirely in A or in B"):
        f.inverse_blocks(torch.tensor([[0, 30]]))
    with pytest.raises(ValueError, match="one level"):
        f.inverse_blocks(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="coordinates of B"):
        f.inverse_blocks(torch.tensor([[0]]), given=torch.tensor([1]))


def test_many_groups_reml_is_eliminated() -> None:
    """A single-factor REML model with many groups used to be one dense joint block of
    2 x groups + p coordinates; with the split B is beta only."""
    rng = np.random.default_rng(5)
    n_groups, n_per = 2000, 3
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.standard_normal(g.size)
    y = 1 + 0.5 * x + rng.normal(0, 0.7, n_groups)[g] + rng.normal(0, 0.3, n_groups)[g] * x
    data = pd.DataFrame({"y": y + rng.normal(0, 0.5, g.size), "x": x,
                         "g": pd.Categorical(g)})
    p = prepare("y ~ x + (1 + x | g)", data, "gaussian", reml=True)
    blocks = p.problem.blocks
    assert blocks.dim == 2 * n_groups + 2
    assert blocks.split is not None and blocks.split.dim_b == 2
    assert blocks.schur_maps.n_pairs == 2 * n_groups
    W, C = _random_weights(p, 4)
    f = factorise(W, C, blocks)
    H = neg_hessian(W, C, _with_split(p, None))[0]
    assert float(2 * f.half_logdet()[0]) == pytest.approx(float(torch.linalg.slogdet(H)[1]),
                                                          rel=1e-10)
