""":func:`ngmm_formula.layout.sum_rows`, the scatter-sum of rows into groups that the
integrals use (:func:`~ngmm_formula.approx.conditional.block_sum`, the fused scalar route).

It must give the same numbers as ``index_add`` along the first axis, whatever the index's
dtype (the designs hold int32 group indices) and the value's shape: each result row adds its
rows in the order of the rows either way, so the sums are compared for exact equality (on
any machine: the same additions in the same order). Where the rows are laid out group by
group (:attr:`~ngmm_formula.layout.Blocks.row_offsets`) the sums go by segments, again the
same additions in the same order.
"""

from __future__ import annotations

import pytest
import torch

from ngmm_formula.layout import Blocks, sum_rows


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


def _laid_out(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Rows laid out group by group (some groups empty), with values that make the order
    of the additions visible: magnitudes over 20 decades, a NaN, a negative zero."""
    g = torch.Generator().manual_seed(seed)
    groups = 23
    lengths = torch.randint(0, 9, (groups,), generator=g)
    index = torch.repeat_interleave(torch.arange(groups), lengths).to(torch.int32)
    n = index.numel()
    values = (torch.randn(n, *shape, dtype=torch.float64, generator=g)
              * torch.exp(10 * torch.randn(n, *shape, dtype=torch.float64, generator=g)))
    values.view(-1)[0] = float("nan")
    values.view(-1)[-1] = -0.0
    return index, values, groups


@pytest.mark.parametrize("shape", [(), (1,), (3,), (2, 4), (15,), (4, 5)])
@pytest.mark.parametrize("seed", range(5))
def test_segment_sums_are_index_add_bit_for_bit(shape: tuple[int, ...], seed: int) -> None:
    """With rows laid out group by group, :attr:`Blocks.row_offsets` makes :func:`sum_rows`
    sum by segments (up to ``SEGMENT_MAX_ENTRIES`` entries a row; wider rows, here 20, keep
    ``index_add``): the same additions in the same order (from 0, row after row), so the
    same bits, NaN and the sign of zero included."""
    index, values, groups = _laid_out(seed, shape)
    blocks = Blocks(groups, 1, index, torch.zeros(index.numel(), 1, dtype=torch.long),
                    torch.ones(1, dtype=torch.float64))
    offsets = blocks.row_offsets
    assert offsets is not None and offsets.tolist()[-1] == index.numel()
    expected = values.new_zeros((groups, *shape)).index_add_(0, index.long(), values)
    got = sum_rows(values, index, groups, offsets)
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    assert torch.equal(got.signbit(), expected.signbit())
    assert int(torch.isnan(got).sum()) == int(torch.isnan(expected).sum()) == 1


def test_segment_sums_are_differentiable_twice_and_need_laid_out_rows() -> None:
    """The segment sums' gradient is ``index_add``'s (each row gets its group's), itself
    differentiable (torch's own segment gradient is not); rows that are not laid out group
    by group have no offsets."""
    index = torch.tensor([0, 0, 2, 2, 2, 3], dtype=torch.int32)
    blocks = Blocks(4, 1, index, torch.zeros(6, 1, dtype=torch.long),
                    torch.ones(1, dtype=torch.float64))
    offsets = blocks.row_offsets
    assert offsets is not None and offsets.tolist() == [0, 2, 2, 5, 6]
    values = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sum_rows(v * v, index, 4, offsets), (values,))
    assert torch.autograd.gradgradcheck(lambda v: sum_rows(v * v, index, 4, offsets),
                                        (values,))
    weights = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    (sum_rows(values, index, 4, offsets) * weights).sum().backward()
    assert torch.equal(values.grad, weights[index.long()])
    shuffled = Blocks(4, 1, index.flip(0), torch.zeros(6, 1, dtype=torch.long),
                      torch.ones(1, dtype=torch.float64))
    assert shuffled.row_offsets is None
    empty = Blocks(3, 1, index[:0], torch.zeros(0, 1, dtype=torch.long),
                   torch.ones(1, dtype=torch.float64))
    assert empty.row_offsets is not None and empty.row_offsets.tolist() == [0, 0, 0, 0]
    assert torch.equal(sum_rows(torch.zeros(0, 1, dtype=torch.float64), index[:0], 3,
                                empty.row_offsets), torch.zeros(3, 1, dtype=torch.float64))
