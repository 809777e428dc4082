r"""Data-parallel fitting: shards of groups across processes with :mod:`torch.distributed`.

With a single grouping factor the objective is a sum over independent blocks (groups),

.. math::

    \ell(\psi) = \sum_{r=0}^{R-1} \ell_r(\psi), \qquad
    \ell_r(\psi) = \sum_{b = s_r}^{s_{r+1} - 1} \log \int e^{h_b(v; \psi)}\, dv ,

so process ``r`` of ``R`` evaluates :math:`\ell_r` and :math:`\nabla \ell_r` on the rows of its
contiguous range of groups :math:`[s_r, s_{r+1})` (:class:`Shard`; ranges balanced by the
number of observations), and a sum all-reduce gives every process the same :math:`\ell` and
:math:`\nabla\ell`:

- **Linear GLMMs.** Rank 0 runs the optimiser (:func:`~ngmm_formula.fit.optimise`:
  L-BFGS-B, then Newton steps with a finite-difference Hessian) on the all-reduced value and
  gradient; at every evaluation it broadcasts the point, the other processes evaluate their
  groups there, and at the end they receive its optimum (:meth:`Shard.lead`,
  :meth:`Shard.follow`). Running identical optimisers in every process is not enough:
  L-BFGS-B's last bits depend on memory alignment, and two processes were measured to end
  1 ulp apart -- enough to stop at different iterations and deadlock. The GLM start is
  computed by every process on all the data and rank 0's copy is broadcast
  (:meth:`Shard.sync`); the start of theta compares all-reduced values. At the optimum the
  conditional modes and per-group log-likelihoods are all-gathered so that every process
  builds the same :class:`~ngmm_formula.results.NGMMResult`.
- **Neural training** (:func:`~ngmm_formula.train.train_networks`). Every process draws the
  same global minibatch of whole groups (same seed), evaluates the groups of the batch it
  owns, scales its part of the loss by the *global* batch's number of observations, and the
  gradients are summed by one explicit ``all_reduce`` of the flattened ``.grad`` vector before
  the AdamW step (:meth:`Shard.all_sum_grads`); the training and validation scores are
  all-reduced too (so early stopping decides alike everywhere), and rank 0's weights are
  broadcast when training ends. With the same seed the fit equals the single-process one up
  to the order of summation (a fit of up to 10,000 training rows with ``Control(folds=1)``:
  by default one process trains five folds there, and a distributed fit one split,
  :func:`~ngmm_formula.train.folds_for`).

An explicit all-reduce rather than :class:`torch.nn.parallel.DistributedDataParallel`: the
loss is not a module's ``forward`` (a batched Newton search for the modes runs between the
network pass and the integral), a process may own none of a minibatch's groups (DDP needs
every process to run forward and backward the same number of times), and one reduction of
one flat vector per step is what DDP's bucketing would do here anyway, in a fixed order.

Every process reads the whole data set and builds the whole design (so factor levels, the
standardisation and the networks' input scaling agree bit for bit); the sharded part is the
work repeated at every iteration -- the Newton searches, the integrals and their gradients.
The exception is a **sharded read** (``ngmm(parquet_path, distributed=True)``,
:func:`ngmm_formula.io.read_shard`): each process reads and builds only its own groups' rows,
the encodings are agreed by collectives (:func:`agreement`,
:class:`~ngmm_formula.design.Agreement`; the networks' inputs too), the GLM start sums its
IRLS normal equations over the processes (:func:`~ngmm_formula.fit.glm_start`), and the
:class:`Shard` (:meth:`Shard.of_local`, ``presharded``) numbers the blocks rank by rank; each
process's result then holds its own rows and groups, with the estimates, ``loglik`` and
``nobs`` of all. A neural fit's training numbers the groups of all processes as one process
would (:meth:`Shard.numbering`), so that it draws the same minibatches and validation groups,
with each group's rows counted over all processes
(:meth:`~ngmm_formula.model.RowsByGroup.everywhere`).
Crossed or nested factors (and REML) couple all groups in one joint block, which cannot be
split by group: :func:`shard_groups` raises :class:`~ngmm_formula.errors.NGMMError` for them.
Their **variational fit** (``approx="variational"``) splits instead: every process holds all
rows and every level's Gaussian, and evaluates the rows of a contiguous range of the levels of
the largest grouping factor (:func:`shard_levels`); the full-batch L-BFGS is led by rank 0 as
above, the minibatch fit sums the gradients as the neural training does, and each process's
levels' Gaussians are shared at the end
(:class:`~ngmm_formula.approx.variational.VariationalObjective`,
:class:`~ngmm_formula.approx.variational.Collectives`). Memory is not split there.

Two entry points:

- ``ngmm(..., distributed=True)`` in a script launched by ``torchrun`` on every process (one
  machine or several: see :func:`fit_distributed` for the commands), and
- :func:`fit_distributed`, which starts local worker processes and returns the result.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ngmm_formula.approx import Approximation
from ngmm_formula.approx.conditional import Blocks, ConditionalMode
from ngmm_formula.approx.factor import DenseFactor
from ngmm_formula.design import Agreement
from ngmm_formula.errors import NGMMError

if TYPE_CHECKING:
    from ngmm_formula.model import Problem

__all__ = ["Shard", "agreement", "connect", "shard_groups", "shard_levels"]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# process group


def connect(device: str = "cpu") -> str:
    """Join the process group, starting it from ``torchrun``'s environment if needed.

    Uses an already initialised default group as it is; otherwise calls
    :func:`torch.distributed.init_process_group` with backend ``gloo`` (CPU) or ``nccl``
    (``device="cuda..."``) and the ``env://`` rendezvous that ``torchrun`` sets up (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), and destroys it when Python exits.

    Parameters
    ----------
    device : str
        The device asked for; ``"cuda"`` without an index becomes this process's GPU,
        ``cuda:LOCAL_RANK``.

    Returns
    -------
    str
        The device this process computes on.
    """
    if not dist.is_available():
        raise NGMMError("distributed=True needs a PyTorch build with torch.distributed")
    cuda = str(device).startswith("cuda")
    if not dist.is_initialized():
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise NGMMError(
                "distributed=True needs a torch.distributed process group, and none is "
                f"initialised nor described by the environment (missing {', '.join(missing)}): "
                "launch the script on every process with torchrun, call "
                "torch.distributed.init_process_group first, or use "
                "ngmm_formula.fit_distributed(...) to start local worker processes")
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_destroy)
    if str(device) == "cuda":
        local = os.environ.get("LOCAL_RANK")
        index = int(local) if local is not None else dist.get_rank() % max(
            1, torch.cuda.device_count())
        device = f"cuda:{index}"
        torch.cuda.set_device(device)
    return str(device)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives run: CUDA tensors for nccl, CPU tensors for gloo."""
    return device if dist.get_backend() == "nccl" else _CPU


# --------------------------------------------------------------------------------------------
# the shard of one process


def _bounds(sizes: np.ndarray, world_size: int) -> tuple[int, ...]:
    """Contiguous ranges of blocks with about equal numbers of observations, none empty.

    ``bounds[r]`` is the number of blocks before process ``r``'s range: the cut nearest to the
    ``r / world_size`` quantile of the cumulative observation count, then moved so that every
    range holds at least one block.
    """
    n_blocks = sizes.size
    cum = np.concatenate([[0], np.cumsum(sizes)])
    targets = cum[-1] * np.arange(1, world_size) / world_size
    i = np.clip(np.searchsorted(cum, targets), 1, n_blocks)
    cuts = np.where(cum[i] - targets > targets - cum[i - 1], i - 1, i)
    cuts = np.maximum.accumulate(np.maximum(cuts, np.arange(1, world_size))
                                 - np.arange(1, world_size)) + np.arange(1, world_size)
    cuts = np.minimum(cuts, n_blocks - world_size + np.arange(1, world_size))
    return (0, *(int(c) for c in cuts), n_blocks)


@dataclass(frozen=True)
class Shard:
    """Process ``rank``'s contiguous range of blocks and the collectives over all processes.

    Attributes
    ----------
    rank, world_size : int
    bounds : tuple of int, length ``world_size + 1``
        Block ``b`` belongs to process ``r`` when ``bounds[r] <= b < bounds[r + 1]``.
    device : torch.device
        Where the collectives run (CPU for gloo, the process's GPU for nccl).

    With ``world_size == 1`` every method is the identity and nothing is communicated.
    """

    rank: int
    world_size: int
    bounds: tuple[int, ...]
    device: torch.device = _CPU
    #: a sharded read: the problem holds only this process's groups (numbered from 0), and
    #: the blocks of all processes are numbered in rank order (:meth:`of_local`)
    presharded: bool = False

    @classmethod
    def of(cls, blocks: Blocks, rank: int, world_size: int, device: torch.device = _CPU
           ) -> Shard:
        """Split ``blocks`` into ``world_size`` ranges balanced by observations."""
        sizes = torch.bincount(blocks.block_of_obs, minlength=blocks.n_blocks).cpu().numpy()
        return cls.of_sizes(sizes, rank, world_size, device)

    @classmethod
    def of_sizes(cls, sizes: np.ndarray, rank: int, world_size: int,
                 device: torch.device = _CPU, what: str = "group") -> Shard:
        """Split blocks (or levels: ``what``) with ``sizes`` observations into
        ``world_size`` ranges balanced by observations."""
        if not 0 <= rank < world_size:
            raise NGMMError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if sizes.size < world_size:
            raise NGMMError(f"distributed fitting needs at least one {what} per process: "
                            f"{sizes.size} {what}s for {world_size} processes")
        return cls(rank, world_size, _bounds(sizes, world_size), device)

    @classmethod
    def of_local(cls, n_blocks: int, rank: int, world_size: int, device: torch.device = _CPU
                 ) -> Shard:
        """The shard of a sharded read: this process holds ``n_blocks`` whole groups.

        The blocks of all processes are numbered rank by rank (rank 0's first), so
        ``bounds`` are the cumulative all-reduced counts. Every process needs a group.
        """
        counts = np.zeros(world_size)
        counts[rank] = n_blocks
        if world_size > 1:
            reduced = torch.tensor(counts, device=device)
            dist.all_reduce(reduced)
            counts = reduced.cpu().numpy()
        if (counts < 1).any():
            empty = [r for r in range(world_size) if counts[r] < 1]
            raise NGMMError(f"process(es) {empty} read no groups: a sharded read needs at "
                            f"least one group per process ({int(counts.sum())} groups for "
                            f"{world_size} processes; write the data set with more partitions "
                            "or use fewer processes)")
        bounds = (0, *(int(c) for c in np.cumsum(counts)))
        return cls(rank, world_size, bounds, device, presharded=True)

    @property
    def first(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    def owned(self, n_blocks: int) -> np.ndarray:
        """Boolean mask over the blocks 0..n_blocks-1: True for this process's."""
        b = np.arange(n_blocks)
        return (b >= self.first) & (b < self.stop)

    def local(self, problem: Problem) -> Problem:
        """The rows of this process's blocks, blocks renumbered from 0 (rows keep their order,
        so every block's sums run in the same order as in one process); the problem
        itself after a sharded read (:attr:`presharded`), which holds just those rows."""
        if self.world_size == 1 or self.presharded:
            return problem
        bo = problem.blocks.block_of_obs
        rows = torch.nonzero((bo >= self.first) & (bo < self.stop)).squeeze(1)
        ids = torch.arange(self.first, self.stop, device=bo.device)
        return problem.subset(rows, ids)

    def numbering(self, levels: Sequence[str]) -> np.ndarray:
        """A sharded read: the number of each of this process's group ``levels`` among the
        levels of all processes, ordered as one process reading every row orders them
        (numerically when every level is a number, else as strings; a categorical grouping
        factor's own order is not known here and falls back to these). The neural training
        draws its validation groups and minibatches by these numbers, so that a seeded fit
        draws the same groups as in one process (:func:`~ngmm_formula.train.train_networks`).
        """
        everyone = [str(v) for part in agreement(self.world_size, self.device).all_gather(
            [str(v) for v in levels]) for v in part]

        def number(v: str) -> float | None:
            try:
                return float(v)
            except ValueError:
                return None

        numbers = [number(v) for v in everyone]
        if all(x is not None for x in numbers):
            order = sorted(range(len(everyone)), key=lambda i: (numbers[i], everyone[i]))
        else:
            order = sorted(range(len(everyone)), key=lambda i: everyone[i])
        position = {everyone[i]: k for k, i in enumerate(order)}
        return np.array([position[str(v)] for v in levels], dtype=np.int64)

    # collectives --------------------------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.world_size == 1:
            return t
        on = t.to(self.device).contiguous()
        dist.all_reduce(on, op=dist.ReduceOp.SUM if op is None else op)
        return on.to(t.device)

    def all_sum(self, x: np.ndarray) -> np.ndarray:
        """Elementwise sum of ``x`` over the processes (every process gets the same bits), in
        a new array: ``x`` is copied before the in-place all-reduce, never changed."""
        if self.world_size == 1:
            return x
        return self._all_reduce(torch.tensor(np.asarray(x, dtype=np.float64))).numpy()

    def same(self, x: np.ndarray) -> np.ndarray:
        """Rank 0's ``x`` (float64) in every process: one broadcast, so that quantities each
        process computed from the same all-reduced sums are identical to the last bit."""
        if self.world_size == 1:
            return x
        return self._broadcast(torch.tensor(np.asarray(x, dtype=np.float64))).numpy()

    def agreement(self) -> Agreement:
        """The :class:`~ngmm_formula.design.Agreement` of the design layer over the process
        group: all-reduced sums (:meth:`all_sum`) and all-gathered objects."""
        return agreement(self.world_size, self.device)

    def all_sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the ``.grad`` of ``params`` over the processes, in one all-reduce.

        A process that evaluated none of the minibatch's groups contributes zeros; a
        parameter that no process reached keeps ``grad = None`` (so AdamW skips it, as in one
        process).
        """
        if self.world_size == 1:
            return
        dtype = torch.float64
        device = params[0].device if params else _CPU
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                 for p in params]
        reached = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], dtype=dtype,
                               device=device)
        flat = self._all_reduce(torch.cat([*parts, reached]))
        i, k = 0, flat.numel() - len(params)
        for j, p in enumerate(params):
            n = p.numel()
            p.grad = flat[i:i + n].reshape(p.shape).to(p.dtype) if flat[k + j] > 0 else None
            i += n

    def gather_blocks(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's per-block rows (shape (own blocks, ...)) in block order.

        Ranges have different lengths; each is padded to the longest for ``all_gather``.
        """
        if self.world_size == 1:
            return t
        counts = np.diff(self.bounds)
        pad = t.new_zeros((int(counts.max()), *t.shape[1:]), device=self.device)
        pad[:t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        dist.all_gather(parts, pad)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)

    def gather_mode(self, mode: ConditionalMode) -> ConditionalMode:
        """The conditional modes and curvature factors of every block (detached; per-group
        layouts have dense factors); converged if every process's search converged."""
        if self.world_size == 1:
            return mode
        if not isinstance(mode.factor, DenseFactor):
            raise NGMMError("only per-group (dense) factors are sharded across processes")
        stats = self.all_sum(np.array([mode.iterations, 0.0 if mode.converged else 1.0,
                                       0.0 if mode.factor.ok else 1.0]))
        factor = DenseFactor(self.gather_blocks(mode.factor.chol.detach()), bool(stats[2] == 0))
        # iterations: the mean over processes (each searched its own blocks)
        return ConditionalMode(v=self.gather_blocks(mode.v), factor=factor,
                               iterations=int(math.ceil(stats[0] / self.world_size)),
                               converged=bool(stats[1] == 0))

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        on = t.to(self.device).contiguous()
        dist.broadcast(on, src=0)
        return on.to(t.device)

    def sync(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers of ``module`` to every process."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                t.copy_(self._broadcast(t.detach()))

    # rank 0 leads the optimiser of :func:`~ngmm_formula.fit.optimise`; the others follow

    def lead(self, x: np.ndarray) -> None:
        """Rank 0: tell the other processes to evaluate at ``x``."""
        if self.world_size == 1:
            return
        if self.rank != 0:
            raise RuntimeError("only rank 0 leads the optimiser")
        self._broadcast(torch.as_tensor(np.concatenate([[1.0], x])))

    def finish(self, k: int, result: Any) -> None:
        """Rank 0: end the evaluations (``k`` parameters) and send ``result`` to all."""
        if self.world_size == 1:
            return
        self._broadcast(torch.zeros(k + 1, dtype=torch.float64))
        dist.broadcast_object_list([result], src=0)

    def follow(self, k: int, evaluate: Callable[[np.ndarray], Any]) -> Any:
        """Other ranks: ``evaluate`` wherever rank 0 asks until it finishes; its result."""
        while True:
            msg = self._broadcast(torch.zeros(k + 1, dtype=torch.float64)).numpy()
            if msg[0] == 0.0:
                break
            evaluate(msg[1:])
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def agreement(world_size: int, device: torch.device = _CPU) -> Agreement:
    """The :class:`~ngmm_formula.design.Agreement` over the current process group, before any
    :class:`Shard` exists (the design is built first): sums by ``all_reduce`` on ``device``
    (CPU for gloo), objects by ``all_gather_object``."""
    def all_sum(x: np.ndarray) -> np.ndarray:
        if world_size == 1:
            return x
        t = torch.tensor(np.asarray(x, dtype=np.float64), device=device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def all_gather(obj: Any) -> list[Any]:
        if world_size == 1:
            return [obj]
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    return Agreement(all_sum=all_sum, all_gather=all_gather)


def shard_groups(problem: Problem, approx: Approximation, n_grouping_factors: int,
                 *, presharded: bool = False) -> Shard:
    """This process's :class:`Shard` of ``problem``'s groups in the current process group.

    ``presharded``: ``problem`` holds this process's groups only (a sharded read,
    :meth:`Shard.of_local`); otherwise it holds all groups and gets a contiguous range.

    Raises
    ------
    NGMMError
        When the random effects form one joint block (crossed or nested grouping factors,
        or REML), whose integral does not split by group, or when there are fewer groups
        than processes.
    """
    if approx.joint:
        if approx.reml:
            why = ("REML integrates the fixed effects jointly with every group's random "
                   "effects; use reml=False")
        else:
            why = (f"the model has {n_grouping_factors} grouping factors (crossed or "
                   "nested), so its integral does not factorise by group")
        raise NGMMError(f"distributed=True shards the groups of a single grouping factor, "
                        f"whose integrals are independent; here the random effects form one "
                        f"joint block that cannot be split across processes: {why}. Fit "
                        f"this model in one process (distributed=False)")
    device = problem.y.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise NGMMError("the process group uses the nccl backend, which communicates CUDA "
                        "tensors: pass device='cuda' (or initialise the group with gloo)")
    if presharded:  # a sharded read: the problem holds this process's whole groups
        return Shard.of_local(problem.blocks.n_blocks, dist.get_rank(), dist.get_world_size(),
                              _comm_device(device))
    return Shard.of(problem.blocks, dist.get_rank(), dist.get_world_size(),
                    _comm_device(device))


def shard_levels(level_of_obs: torch.Tensor, n_levels: int, device: torch.device) -> Shard:
    """This process's :class:`Shard` of a variational fit: a contiguous range of the levels
    of the term with the most levels (``level_of_obs``, ``n_levels``: the "students"),
    balanced by observations; this process evaluates their rows
    (:class:`~ngmm_formula.approx.variational.VariationalObjective`)."""
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise NGMMError("the process group uses the nccl backend, which communicates CUDA "
                        "tensors: pass device='cuda' (or initialise the group with gloo)")
    sizes = torch.bincount(level_of_obs, minlength=n_levels).cpu().numpy()
    return Shard.of_sizes(sizes, dist.get_rank(), dist.get_world_size(), _comm_device(device),
                          what="level of the largest grouping factor")


# --------------------------------------------------------------------------------------------
# local launcher
