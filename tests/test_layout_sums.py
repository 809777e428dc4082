""":func:`ngmm_formula.layout.sum_rows`, the scatter-sum of rows into groups that the
integrals use (:func:`~ngmm_formula.approx.conditional.block_sum`, the fused scalar route).

It must give the same numbers as ``index_add`` along the first axis, whatever the index's
dtype (the designs hold int32 group indices) and the value's shape: each result row adds its
rows in the order of the rows either way, so the sums are compared for exact equality (on
any machine: the same additions in the same order).
"""

from __future__ import annotations

import pytest
import torch

from ngmm_formula.layout import sum_rows


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (3,), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_sum_rows_is_index_add_bit_for_bit(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    n, groups = 500, 37
    index = torch.randint(0, groups, (n,), generator=g)
    values = torch.randn(n, *shape, dtype=torch.float64, generator=g) * 1e3
    expected = values.new_zeros((groups, *shape)).index_add_(0, index, values)
    got = sum_rows(values, index.to(dtype), groups)
    assert got.shape == expected.shape and got.dtype == values.dtype
    assert torch.equal(got, expected)


def test_sum_rows_of_no_rows_and_its_gradient() -> None:
    """No rows: zeros of the groups' shape. The sum is differentiable in the values (each
    row's gradient is its group's), as ``index_add`` is."""
    index = torch.tensor([], dtype=torch.int32)
    assert torch.equal(sum_rows(torch.zeros(0, 1), index, 3), torch.zeros(3, 1))
    values = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 2, 2, 1, 0, 2], dtype=torch.int32)
    weights = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)
    (sum_rows(values, idx, 3) * weights).sum().backward()
    assert torch.equal(values.grad, weights[idx.long()])
