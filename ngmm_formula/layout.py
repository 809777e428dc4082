r"""Layout of the integrated coordinates: which observation touches which coordinate of which
block (:class:`Blocks`), and the partition of a joint block for its block elimination
(:class:`Split`, with the index maps :class:`SchurMaps` built from it once per problem).

Data only, below both the model (:func:`~ngmm_formula.model.build_problem` lays the blocks
out) and the approximations (:mod:`~ngmm_formula.approx.conditional` and
:mod:`~ngmm_formula.approx.factor` integrate and factorise over them); the algebra is in
:mod:`ngmm_formula.approx.factor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["SEGMENT_MAX_ENTRIES", "Blocks", "SchurMaps", "Split", "pairs_of_pairs", "sum_rows"]


#: The most entries per row (the product of the value's trailing shape) that
#: :func:`sum_rows` sums by segments. ``torch.segment_reduce`` goes through a row's entries
#: one by one, while ``index_add`` (int64 index) vectorises over them from 16 on. One
#: thread, float64, rows in groups of 100 or 20 (4,100 or 32,000 rows):
#: - 1 to 15 entries: segments take 0.3-0.6 of ``index_add``'s time (4,100 x 1: 5 against
#:   17 us; 32,000 x 11: 0.32 against 0.66 ms);
#: - 16 to 32 entries: 1.2-3.8 times ``index_add``'s (32,000 x 32 in one group: 1.11 against
#:   0.29 ms).
SEGMENT_MAX_ENTRIES = 15


def sum_rows(values: torch.Tensor, index: torch.Tensor, n: int,
             offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the rows of ``values`` (m, ...) into ``n`` rows: row ``index[i]`` of the result
    receives row ``i``, in the order of ``i`` (``index_add`` along the first axis).

    The index may be int32 (:func:`~ngmm_formula.model.index_dtype`). Torch's CPU
    ``index_add`` along the first axis of a tensor of two or more axes is 3-16x slower with
    an int32 index than with int64 (torch 2.13, one thread, float64: 4,100 x 1 rows 222
    against 14 us, 32,760 x 11 2,063 against 695 us; a training step of a random-intercept
    NGMM made two such sums of 4,100 x 1), so a value of one entry per row is summed as a
    vector and wider values with the index as int64: the same sums bit for bit (each result
    row adds its rows in the same order either way; ``tests/test_layout_sums.py``).

    With ``offsets`` (:attr:`Blocks.row_offsets`: ``index`` is non-decreasing, result row
    ``b`` sums rows ``offsets[b]:offsets[b + 1]``) and at most :data:`SEGMENT_MAX_ENTRIES`
    entries per row, the sums are segment sums (``torch.segment_reduce``), which add each
    segment's rows one after the other from 0 as ``index_add`` does: the same bits, at
    0.3-0.5 of the time. Their gradient is ``index_add``'s, a gather by ``index``
    (:class:`_SegmentSum`; torch's own is not differentiable twice). A training step of a
    random-intercept NGMM makes about a dozen, an evaluation of the 11-node rule a few.
    """
    entries = math.prod(values.shape[1:])  # per row
    if offsets is not None and entries <= SEGMENT_MAX_ENTRIES:
        if torch.is_grad_enabled() and values.requires_grad:
            return _SegmentSum.apply(values, index, offsets)  # type: ignore[no-any-return]
        return torch.segment_reduce(values, "sum", offsets=offsets, axis=0)
    out = values.new_zeros((n, *values.shape[1:]))
    if entries == 1:
        return out.view(-1).index_add(0, index, values.reshape(-1)).view(out.shape)
    return out.index_add(0, index if index.dtype == torch.int64 else index.long(), values)


class _SegmentSum(torch.autograd.Function):
    """Segment sums (:func:`sum_rows` with offsets) with ``index_add``'s gradient: each row
    receives its segment's gradient (a gather, itself differentiable)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                values: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(index)
        return torch.segment_reduce(values, "sum", offsets=offsets, axis=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad.index_select(0, index), None, None


def pairs_of_pairs(pair_level: torch.Tensor, n_levels: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered combination (p, r) of pairs at the same level, for ``pair_level`` sorted;
    built with ``repeat_interleave``, without a loop over levels."""
    dev = pair_level.device
    counts = torch.bincount(pair_level, minlength=n_levels)
    first = torch.cumsum(counts, 0) - counts  # first pair of each level
    rep = counts[pair_level]
    left = torch.repeat_interleave(torch.arange(pair_level.numel(), device=dev), rep)
    start = torch.cumsum(rep, 0) - rep
    within = torch.arange(int(rep.sum()), device=dev) - torch.repeat_interleave(start, rep)
    return left, first[pair_level[left]] + within


@dataclass(frozen=True)
class Split:
    """Partition of a joint block's D coordinates into A (block diagonal) and B.

    Attributes
    ----------
    a_slots, b_slots : LongTensor
        The observation slots (columns of ``Blocks.slot_pos``) whose coordinates are in A,
        and the others.
    a_coords : LongTensor, shape (n_levels, q)
        Coordinate of the j-th A coordinate of each level of A's grouping factor.
    b_coords : LongTensor, shape (dim_B,)
        Coordinate of each B coordinate.
    """

    a_slots: torch.Tensor
    b_slots: torch.Tensor
    a_coords: torch.Tensor
    b_coords: torch.Tensor

    @property
    def n_levels(self) -> int:
        return int(self.a_coords.shape[0])

    @property
    def q(self) -> int:
        return int(self.a_coords.shape[1])

    @property
    def dim_b(self) -> int:
        return int(self.b_coords.numel())

    @property
    def dim(self) -> int:
        return self.n_levels * self.q + self.dim_b

    @cached_property
    def coord_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per coordinate (D,): its level of A (-1 in B), and its position within the level
        (A) or its index in B."""
        dev = self.a_coords.device
        level_of = torch.full((self.dim,), -1, dtype=torch.long, device=dev)
        local_of = torch.full((self.dim,), -1, dtype=torch.long, device=dev)
        a = self.a_coords.reshape(-1)
        level_of[a] = torch.arange(self.n_levels, device=dev).repeat_interleave(self.q)
        local_of[a] = torch.arange(self.q, device=dev).repeat(self.n_levels)
        local_of[self.b_coords] = torch.arange(self.dim_b, device=dev)
        return level_of, local_of


@dataclass(frozen=True)
class SchurMaps:
    """Index maps of :class:`SchurFactor` for one set of observations (built once).

    Attributes
    ----------
    split : Split
    aa_index : LongTensor, shape (n, S_A, S_A)
        Flat index into (n_levels, q, q) of each observation's contribution to H_AA.
    ab_index : LongTensor, shape (n, S_A, S_B)
        Flat index into (n_pairs, q) of each contribution to H_AB.
    bb_index : LongTensor, shape (n, S_B, S_B)
        Flat index into (dim_B, dim_B) of each contribution to H_BB.
    pair_level, pair_b : LongTensor, shape (n_pairs,)
        Level of A and coordinate of B (0..dim_B-1) of each distinct pair, sorted by level.
    left, right : LongTensor, shape (n_pp,)
        The pairs of pairs (p, r), p < r, sharing a level, or None when the correction is
        computed as a dense product (``dense_correction``). The correction is symmetric: the
        pairs p > r are its transpose and p = r its diagonal part.
    pp_index : LongTensor, shape (n_pp,)
        Flat index into (dim_B, dim_B) of each pair of pairs (or None).
    diag_index : LongTensor, shape (n_pairs,)
        Flat index into (dim_B, dim_B) of the pairs (p, p).
    dense_correction : bool
        Whether :math:`H_{BA} H_{AA}^{-1} H_{AB}` is cheaper as a dense product than as
        :math:`\\sum_l n_{\\text{pairs}}(l)^2` scatter-adds.
    """

    split: Split
    aa_index: torch.Tensor
    ab_index: torch.Tensor
    bb_index: torch.Tensor
    pair_level: torch.Tensor
    pair_b: torch.Tensor
    left: torch.Tensor | None
    right: torch.Tensor | None
    pp_index: torch.Tensor | None
    diag_index: torch.Tensor
    dense_correction: bool

    # A product of the dense (n_levels q x dim_B) matrices runs at BLAS speed, a scatter-add
    # about this many times slower per multiply-add (measured on this project's machine)
    SCATTER_COST = 30.0

    @classmethod
    def of(cls, slot_pos: torch.Tensor, split: Split) -> SchurMaps:
        dev = slot_pos.device
        n_a, q, dim_b = split.n_levels, split.q, split.dim_b
        level_of, local_of = split.coord_maps
        pos_a = slot_pos[:, split.a_slots]
        pos_b = slot_pos[:, split.b_slots]
        level = level_of[pos_a[:, 0]] if pos_a.shape[1] else torch.zeros(
            slot_pos.shape[0], dtype=torch.long, device=dev)
        a_local = local_of[pos_a]  # (n, S_A)
        b_local = local_of[pos_b]  # (n, S_B)
        aa_index = level[:, None, None] * q * q + a_local[:, :, None] * q + a_local[:, None, :]
        bb_index = b_local[:, :, None] * dim_b + b_local[:, None, :]
        key = level[:, None] * dim_b + b_local  # (n, S_B)
        uniq, pair_of = torch.unique(key.reshape(-1), return_inverse=True)  # sorted by level
        pair_of = pair_of.reshape(key.shape)
        pair_level, pair_b = uniq // dim_b, uniq % dim_b
        ab_index = pair_of[:, None, :] * q + a_local[:, :, None]
        counts = torch.bincount(pair_level, minlength=n_a)
        n_pp = int((counts * (counts + 1) // 2).sum())
        dense = cls.SCATTER_COST * n_pp * q * q > n_a * q * dim_b * dim_b
        left = right = pp_index = None
        if not dense:
            left, right = pairs_of_pairs(pair_level, n_a)
            upper = left < right
            left, right = left[upper], right[upper]
            pp_index = pair_b[left] * dim_b + pair_b[right]
        return cls(split=split, aa_index=aa_index, ab_index=ab_index, bb_index=bb_index,
                   pair_level=pair_level, pair_b=pair_b, left=left, right=right, pp_index=pp_index,
                   diag_index=pair_b * dim_b + pair_b,
                   dense_correction=dense)

    @property
    def n_pairs(self) -> int:
        return int(self.pair_level.numel())


@dataclass(frozen=True)
class Blocks:
    """Layout of the integrated coordinates.

    Attributes
    ----------
    n_blocks : int
        Number of independent blocks (groups, or 1).
    dim : int
        Dimension ``D`` of every block.
    block_of_obs : LongTensor, shape (n,)
    slot_pos : LongTensor, shape (n, S)
        Coordinate inside the block of each slot of each observation.
    prior_precision : Tensor, shape (D,)
        1 for a random effect, 0 for a flat (REML) coordinate.
    split : Split, optional
        For a single joint block: the partition of its coordinates over which :math:`H` is
        factorised by block elimination (:class:`~ngmm_formula.approx.factor.SchurFactor`);
        None for a dense factorisation of every block.
    """

    n_blocks: int
    dim: int
    block_of_obs: torch.Tensor
    slot_pos: torch.Tensor
    prior_precision: torch.Tensor
    split: Split | None = None

    @cached_property
    def schur_maps(self) -> SchurMaps:
        """Index maps of the block elimination for these observations (computed once)."""
        assert self.split is not None and self.n_blocks == 1
        return SchurMaps.of(self.slot_pos, self.split)

    @cached_property
    def row_offsets(self) -> torch.Tensor | None:
        """Where each block's rows begin and end, shape (n_blocks + 1,), when
        ``block_of_obs`` is non-decreasing (every block's rows are consecutive: a minibatch
        or validation piece laid out group by group, data sorted by group); else None.
        :func:`sum_rows` then sums by segments (computed once per layout)."""
        b = self.block_of_obs
        if b.numel() > 1 and not bool((b[1:] >= b[:-1]).all()):
            return None
        offsets = torch.zeros(self.n_blocks + 1, dtype=torch.int64, device=b.device)
        torch.cumsum(torch.bincount(b, minlength=self.n_blocks), 0, out=offsets[1:])
        return offsets

    @property
    def n_prior(self) -> float:
        return float(self.prior_precision.sum())

    def flat_index(self) -> torch.Tensor:
        """Index of each slot in the flattened (n_blocks * D) coordinate vector."""
        return self._flat_index

    @cached_property
    def _flat_index(self) -> torch.Tensor:
        return self.block_of_obs[:, None] * self.dim + self.slot_pos

    @cached_property
    def pair_index(self) -> torch.Tensor:
        """Index of each (slot, slot) pair of each observation in the flattened
        (n_blocks * D * D) blocks of :math:`H` (n * S * S,), computed once: building it
        took 2.8 of the 4.0 ms of one :func:`~ngmm_formula.approx.conditional.neg_hessian`
        on 32,768 rows with D = 2."""
        D, pos = self.dim, self.slot_pos
        return (self.block_of_obs[:, None, None] * D * D + pos[:, :, None] * D
                + pos[:, None, :]).reshape(-1)
