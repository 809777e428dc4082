r"""Training of models with ``nn()`` terms (the fit layer's stochastic half).

The objective is the same approximate marginal log-likelihood as for linear GLMMs
(:class:`~ngmm_formula.fit.Objective`), now differentiable in the networks' weights too. It is
a sum over groups, so it is maximised with AdamW on minibatches made of **whole groups** (a
group's integral is never split):

.. math::

    \text{loss}_B = -\frac{1}{n_B} \sum_{g \in B} \log \int p(y_g \mid u; \psi)\,
    N(u; 0, I)\, du ,

with decoupled weight decay on the network weights only (the networks' additive parts at
:data:`ADDITIVE_LR_SCALE` times the learning rate: :mod:`~ngmm_formula.networks`), Gaussian
noise of standard deviation ``Control.input_noise`` on the numeric inputs of the networks'
nonlinear layers (the additive parts see a share of it that depends on the family,
:data:`ADDITIVE_NOISE_SCALE`; drawn here,
per minibatch, from a generator seeded by ``seed``: every process of a distributed fit draws
the noise of the whole minibatch and keeps its own rows', so the fit does not depend on the
number of processes), a learning rate halved when the
validation score stalls (:class:`~ngmm_formula.adamw.Plateau`, torch's
``ReduceLROnPlateau``), and early stopping on **held-out groups**:
a fraction ``Control.validation`` of the levels of the (largest) grouping factor is set
aside, and training stops when their marginal log-likelihood per observation has not improved
for ``Control.patience`` epochs; the best weights are restored. An epoch is a pass over the
training groups, or ``Control.steps_per_epoch`` minibatches of it on large data
(:class:`_Epochs`). Neither early stopping nor
the learning-rate decay acts during the first ``Control.min_steps`` optimiser steps (on small
data an epoch is a single step, and stopping after a few dozen steps left networks that had
learnt nothing: measured in ``benchmarks/neural/README.md``). Before the first epoch the
linear part (beta, theta, sigma) is refitted to the training groups alone, so that the
validation groups are out of sample from the first epoch on (the GLMM start saw them). The
conditional modes of every group are kept between minibatches as warm starts of the Newton
search.

**Cheaper integral in the steps.** The optimiser's steps use the Laplace approximation
(``Control.train_approx``; the fit's own rule, e.g. 11 Gauss--Hermite nodes, with
``"fit"``), and their conditional modes take ``Control.train_mode_steps`` undamped Newton
steps from the warm starts instead of a damped search to convergence
(:func:`~ngmm_formula.approx.conditional.find_mode`). The validation score, the GLMM start,
the final refit and everything reported use the fit's approximation and the full search;
the training curve (``TrainingHistory.train``) is the steps' objective.

**Start.** Training starts from the GLMM in which every network's inputs enter linearly
(:func:`fit_linear_start`): its coefficients of the standardised inputs become the networks'
linear paths (:class:`~ngmm_formula.networks.MLP`), the output layers are zero, so the NGMM
starts as that GLMM and early stopping shrinks towards it.

**Ensembles.** ``Control.ensemble = K`` networks per ``nn()`` term are trained one after
the other, each from the fitted GLMM with its own initial weights and its own validation
split (so that together they see every group), and their outputs are averaged
(:class:`~ngmm_formula.networks.Ensemble`); beta, theta and sigma start the refit from the
members' average. Averaging removes part of the variance that early stopping on a few
held-out groups leaves in one network, at K times the training time; the default is K = 1
(three networks did not help on binomial data: ``benchmarks/neural/README.md``).

**Retraining.** With ``Control.retrain`` the early-stopped network is replaced by one
trained from the same initial weights on all groups for the selected number of epochs
:math:`e^*`, replaying the learning rates of the first run. With ``Control.folds = K`` the
groups are dealt into K disjoint folds, K networks are trained from the same initial weights
with fold k held out, :math:`e^*` maximises their pooled validation curve
:math:`\bar s(e) = \sum_k n_k s_k(e) / \sum_k n_k` (:math:`s_k` per observation, :math:`n_k`
the fold's observations), and one network is trained on all groups for :math:`e^*` epochs.
By default (``Control.folds = None``) a fit of little data trains this way with
:data:`AUTO_FOLDS` folds, and one of more data with one split (:func:`folds_for`): where an
epoch is one full-batch step and 10 % of the groups are a few dozen Bernoulli responses, the
epoch chosen on one split is noise. The fit's network is then the average of the K fold
networks (each at its own best epoch) and the one trained on all groups (an
:class:`~ngmm_formula.networks.Ensemble` of K + 1 members; ``Control.average_folds``, the
default): no more training, K + 1 network evaluations where the fit is used; it closed
0.3 points more of the broad benchmark's gap (``benchmarks/neural/README.md``, "A sixth
confirmation half").

When training ends the networks are centred on the training data (the intercept absorbs the
shift) and frozen, and the linear and variance parameters are refitted on all the data by
L-BFGS with the networks' outputs as a known offset (:func:`~ngmm_formula.fit.optimise`),
which also gives their standard errors -- conditional on the networks.

Reproducibility: all randomness (initial weights, the validation split, the order of
minibatches, dropout) comes from ``seed``; on the CPU the same seed gives the same fit bit for
bit, in any process (the kernels whose rounding depends on memory alignment are avoided: see
:func:`~ngmm_formula.model.matvec`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ngmm_formula.adamw import AdamW, Plateau
from ngmm_formula.approx import Approximation
from ngmm_formula.checkpoint import Checkpoints
from ngmm_formula.design import full_rank_columns, full_rank_columns_gram
from ngmm_formula.errors import NGMMError
from ngmm_formula.families import Family
from ngmm_formula.fit import Control, Objective, optimise, piece_bounds
from ngmm_formula.model import (
    FixedTensor,
    LinearPredictor,
    Problem,
    RowsByGroup,
    SparseRowsTensor,
    linear_part,
)
from ngmm_formula.networks import MLP, CentredNetwork, Ensemble

if TYPE_CHECKING:
    from ngmm_formula.shards import Shard

__all__ = ["TrainingHistory", "fingerprint", "fit_linear_start", "start_problem",
           "train_networks"]


@dataclass(frozen=True)
class TrainingHistory:
    """The training curve: objective per observation on training and validation groups.

    With an ensemble the curve and the stopping information are those of the first network,
    ``seconds`` is the time of all of them, and ``members`` holds every network's own history.
    With ``Control.folds = K`` the validation curve is the folds' pooled one, ``best_epoch``
    its maximiser, ``train`` the first fold's curve and ``members`` the folds' histories.
    ``retrained_steps`` is the number of optimiser steps of the retraining on all groups
    (``Control.retrain`` or ``Control.folds``; 0 without them). ``steps`` is the number of
    optimiser steps of the early-stopping loop and ``pass_steps`` the minibatches of one pass
    over its training groups (an epoch is a pass, or ``Control.steps_per_epoch`` steps of
    one: :attr:`passes`). The validation curve is the fit's rule's log-likelihood, or the
    training rule's above :data:`VALIDATION_TRAINING_RULE_ROWS` rows.
    """

    train: tuple[float, ...]
    validation: tuple[float, ...]
    best_epoch: int
    stopped_early: bool
    seconds: float
    n_validation_groups: int
    lr: tuple[float, ...] = field(default=())
    members: tuple[TrainingHistory, ...] = field(default=())
    retrained_steps: int = 0
    steps: int = 0
    pass_steps: int = 0

    @property
    def passes(self) -> float:
        """Passes over the training groups (of the first network): ``steps / pass_steps``."""
        return self.steps / self.pass_steps if self.pass_steps else 0.0

    @property
    def epochs(self) -> int:
        """Number of epochs run (of the first network, as the curves)."""
        return len(self.train)

    @property
    def best_score(self) -> float:
        """Validation objective per observation at ``best_epoch`` (NaN without validation)."""
        if not self.validation or not 1 <= self.best_epoch <= len(self.validation):
            return math.nan
        return float(self.validation[self.best_epoch - 1])

    def __repr__(self) -> str:
        # a few numbers, not the curves (``.train``, ``.validation``, ``.lr`` hold them)
        parts = [f"{self.epochs} epochs ({self.passes:.1f} passes)"
                 if self.pass_steps and self.steps != self.epochs * self.pass_steps
                 else f"{self.epochs} epochs", "stopped early" if self.stopped_early
                 else "ran all epochs", f"best epoch {self.best_epoch}"]
        if self.validation:
            parts.append(f"validation {self.best_score:.4f}/obs at best "
                         f"({self.n_validation_groups} held-out groups)")
        if self.train:
            parts.append(f"train {self.train[-1]:.4f}/obs at the end")
        if self.retrained_steps:
            parts.append(f"retrained {self.retrained_steps} steps on all groups")
        if self.members:
            parts.append(f"{len(self.members)} members")
        parts.append(f"{self.seconds:.1f} s")
        return f"<TrainingHistory: {', '.join(parts)}>"


#: Input columns of all networks up to which one-hot columns join the GLMM start
#: (:func:`fit_linear_start`).
LINEAR_START_COLUMNS = 64

#: Learning rate of the networks' additive parts (:class:`~ngmm_formula.networks.Additive`)
#: over ``Control.lr`` (module docs).
ADDITIVE_LR_SCALE = 10.0

#: The input noise the additive parts see during training, as a multiple of the body's
#: (``Control.input_noise``), by family (:func:`additive_noise_scale`): noise of SD 0.1 on a
#: standardised input makes a one-input effect fit the truth convolved with it, which blurs
#: a step. Measured on the broad benchmark (``benchmarks/neural/README.md``, the third to
#: fifth confirmation halves): 0.3 gained on gaussian and poisson data in the two halves
#: that chose it (mean gap closed +0.1 to +1.0 point) and was neutral or lost on binomial
#: data (-3.9 points in one half), which keeps the body's noise. On the fifth half, fixed
#: before it ran: pooled gap closed +0.28 (SE 0.12) / +0.43 (SE 0.11) points on known / new
#: groups, steps +0.005 / +0.027 per observation (gaussian / poisson, 10 of 10 seeds), one
#: cell of 33 ahead of GPBoost more on new groups, binomial fits unchanged bit for bit.
#: Families not measured (Gamma, negative binomial, ...) take 0.3 with the gaussian and the
#: poisson.
ADDITIVE_NOISE_SCALE = {"binomial": 1.0}
ADDITIVE_NOISE_SCALE_OTHER = 0.3


def additive_noise_scale(family: Family) -> float:
    """The additive parts' input noise as a multiple of the body's for ``family``
    (:data:`ADDITIVE_NOISE_SCALE`)."""
    return ADDITIVE_NOISE_SCALE.get(family.name, ADDITIVE_NOISE_SCALE_OTHER)


#: Rows above which the linear starts of a neural fit (:func:`fit_linear_start` and the
#: refit of the linear part to the training groups) use a subsample of the groups
#: (:func:`start_groups`): a start needs estimates good to a few percent, not all rows.
START_MAX_ROWS = 1 << 18


#: Rows (of all processes) above which a neural fit's validation score, taken every epoch
#: for early stopping, uses the training rule (:func:`training_approximation`: one node)
#: instead of the fit's rule. Below it (every fit of the sine benchmark, the broad suite and
#: the real data sets) the score is the fit's rule's, as before. At 10^6 rows (50,000
#: groups of 20) the score is taken 4.4 times a pass on 100,000 validation rows, and with
#: 11 nodes it was 12-15 % of a pass (``benchmarks/README.md``); with 20 rows a group the
#: two rules' scores differ by a nearly constant offset, and the choice of the best epoch is
#: what the score is for. The reported log-likelihood and the final refit keep the fit's rule.
VALIDATION_TRAINING_RULE_ROWS = START_MAX_ROWS


def start_groups(sizes: np.ndarray) -> np.ndarray | None:
    """The groups (``sizes``: rows per group, of all processes) that the linear starts use:
    None (all) up to :data:`START_MAX_ROWS` rows, else every ``k``-th group by number, ``k``
    the smallest that leaves about that many rows. The numbers are one process's
    (:meth:`~ngmm_formula.shards.Shard.numbering` after a sharded read), so a distributed fit
    starts from the same subsample."""
    n = int(sizes.sum())
    if n <= START_MAX_ROWS:
        return None
    return np.arange(sizes.size) % -(-n // START_MAX_ROWS) == 0


def start_problem(problem: Problem, split_groups: np.ndarray, shard: Shard | None = None
                  ) -> Problem:
    """``problem`` on the rows of the groups of :func:`start_groups` (``split_groups``:
    each row's group, as :func:`train_networks`'), or ``problem`` itself up to
    :data:`START_MAX_ROWS` rows: the data of a neural fit's starts (the GLM start, theta's
    scale and :func:`fit_linear_start`). Every block is kept, those without rows integrating
    to 1, so a distributed fit's ranges of blocks stay valid."""
    by_group = _rows_by_group(split_groups, shard)
    use = start_groups(by_group.sizes)
    if use is None:
        return problem
    return problem.subset(torch.as_tensor(np.sort(by_group.rows(np.flatnonzero(use))),
                                          device=problem.y.device))


def fit_linear_start(problem: Problem, family: Family, approx: Approximation,
                     module: LinearPredictor, control: Control,
                     shard: Shard | None = None,
                     split_groups: np.ndarray | None = None, *, warm: bool = False
                     ) -> list[list[int]]:
    r"""Fit the GLMM in which the networks' inputs enter linearly, and start from it.

    The fixed-effects matrix is extended by the standardised input columns of every network,
    :math:`[X_s, N_1, \dots, N_K]`; columns aliased with earlier ones (an input that is also
    a linear term, one level of a one-hot factor, an input shared by two networks) are left
    out by the pivoting rank check of the fixed effects
    (:func:`~ngmm_formula.design.full_rank_columns`; after a sharded read, the rule from the
    cross-product of all processes' rows, :func:`~ngmm_formula.design.full_rank_columns_gram`).
    The GLMM is fitted by L-BFGS from
    ``module``'s beta, theta and sigma (extra coefficients from 0); then beta, theta and sigma
    are set to its estimates and network ``k``'s linear path :math:`\gamma_k` to the
    coefficients of :math:`N_k` (0 for left-out columns). With the output layers at zero the
    NGMM's linear predictor is then exactly that GLMM's.

    The rank check and the fit cost :math:`O(n k^2)` in the number of columns :math:`k`: when
    the networks have more than :data:`LINEAR_START_COLUMNS` input columns, one-hot columns
    of factors are left out of the start (their linear paths start at zero and train with the
    rest); numeric inputs are always in it. An embedded factor's input column holds codes:
    it joins the start as its levels' one-hot dummies (:meth:`~ngmm_formula.networks.MLP.
    linear_columns`), whose coefficients become its per-level scalars, when the networks'
    columns so counted are at most :data:`LINEAR_START_COLUMNS`; else its scalars start at 0.

    With ``split_groups`` (as :func:`train_networks`') the fit uses the rows of
    :func:`start_groups` only (above :data:`START_MAX_ROWS` rows; the rank check keeps all).

    ``warm``: the linear part starts near its optimum (:func:`~ngmm_formula.fit.
    loadings_start`): Newton steps with BHHH's matrix come first (:func:`~ngmm_formula.fit.
    optimise`'s ``warm``).

    Returns the kept columns of every network's :meth:`~ngmm_formula.networks.MLP.
    linear_columns` (for tests and diagnostics).
    """
    nets = list(module.nets)
    p = problem.p
    # the columns of which each linear path is a function: inputs that are not codes, and
    # the one-hot dummies of embedded factors when all of them fit in the start
    expand = sum(net.linear_width() for net in nets
                 if isinstance(net, MLP)) <= LINEAR_START_COLUMNS
    parts = [net.linear_columns(x.to(problem.Xs.dtype), expand) if isinstance(net, MLP)
             else (x.to(problem.Xs.dtype), [True] * x.shape[1])
             for net, x in zip(nets, problem.net_X)]
    blocks = [b for b, _ in parts]
    numeric = np.concatenate([np.asarray(flags, dtype=bool) for _, flags in parts]
                             ) if blocks else np.zeros(0, dtype=bool)
    candidates = (np.arange(numeric.size) if numeric.size <= LINEAR_START_COLUMNS
                  else np.flatnonzero(numeric))
    # every column of X is kept (the design's rank check already dropped aliased ones)
    columns = np.concatenate([np.arange(p), p + candidates])
    Xs_aug: FixedTensor
    if isinstance(problem.Xs, SparseRowsTensor):  # a wide factor design stays sparse
        net_cols = torch.cat(blocks, dim=1)
        cand = problem.Xs.with_columns(net_cols[:, torch.as_tensor(candidates)])
        rank_ok = full_rank_columns_gram(cand.on_host().gram())
        extra = [int(columns[j]) for j in rank_ok if j >= p]
        Xs_aug = problem.Xs.with_columns(net_cols[:, [k - p for k in extra]])
    else:
        X_all = torch.cat([problem.Xs, *blocks], dim=1)
        X_cand = X_all[:, columns].cpu().numpy()
        rank_ok = (full_rank_columns(X_cand) if shard is None or not shard.presharded
                   else full_rank_columns_gram(shard.all_sum(X_cand.T @ X_cand)))  # all rows'
        extra = [int(columns[j]) for j in rank_ok if j >= p]
        Xs_aug = X_all[:, list(range(p)) + extra]
    owner = np.concatenate([np.full(x.shape[1], k) for k, x in enumerate(blocks)])
    column = np.concatenate([np.arange(x.shape[1]) for x in blocks])
    augmented = dataclasses.replace(problem, Xs=Xs_aug, net_X=(), net_noise=())
    if split_groups is not None:
        augmented = start_problem(augmented, split_groups, shard)
    glmm = linear_part(module, augmented)  # shares theta and sigma with module
    with torch.no_grad():
        glmm.beta = torch.nn.Parameter(torch.cat([
            module.beta.detach(), module.beta.new_zeros(len(extra))]))
    optimise(Objective(augmented, family, approx, glmm, shard=shard),
             max_iter=control.max_iter, gtol=1e-10, final_hessian=False, warm=warm)
    kept_by_net: list[list[int]] = [[] for _ in nets]
    gammas = [torch.zeros(b.shape[1], dtype=b.dtype) for b in blocks]
    with torch.no_grad():
        module.beta.copy_(glmm.beta[:p])
        for coef, j in zip(glmm.beta[p:], extra):
            k, c = int(owner[j - p]), int(column[j - p])
            kept_by_net[k].append(c)
            gammas[k][c] = coef
        for net, gamma in zip(nets, gammas):
            if isinstance(net, MLP):
                net.set_linear(gamma)
    return kept_by_net


def _rows_by_group(split_groups: np.ndarray, shard: Shard | None) -> RowsByGroup:
    """The rows of every group of ``split_groups``; after a sharded read (``shard.
    presharded``: ``split_groups`` numbers this process's groups among every process's,
    :meth:`~ngmm_formula.shards.Shard.numbering`) with the rows per group of all processes,
    summed over them, as :attr:`~ngmm_formula.model.RowsByGroup.sizes`."""
    if shard is None or not shard.presharded:
        return RowsByGroup.of(split_groups, int(split_groups.max()) + 1)
    # the groups of all processes are numbered 0 .. (their number - 1)
    n_groups = int(shard.all_sum(np.array([float(np.unique(split_groups).size)]))[0])
    here = RowsByGroup.of(split_groups, n_groups)
    return here.everywhere(np.rint(shard.all_sum(here.sizes.astype(np.float64))))


def _split_groups(sizes: np.ndarray, fraction: float, rng: np.random.Generator
                  ) -> np.ndarray:
    """Boolean mask over groups (``sizes``: their rows): True for the held-out (validation)
    ones, drawn among the groups with rows."""
    held = np.zeros(sizes.size, dtype=bool)
    present = np.flatnonzero(sizes > 0)
    k = int(round(fraction * present.size))
    if fraction > 0 and present.size >= 10 and k >= 1:
        held[rng.choice(present, size=k, replace=False)] = True
    return held


def train_networks(problem: Problem, family: Family, approx: Approximation,
                   module: LinearPredictor, split_groups: np.ndarray, control: Control,
                   seed: int, shard: Shard | None = None, *,
                   describe: Mapping[str, str] | None = None) -> TrainingHistory:
    """Train ``module`` (networks, beta, theta, log_sigma) in place; see the module docs.

    The first network starts from the weights ``module`` holds and splits the groups with
    ``numpy.random.default_rng(seed)``; network ``k >= 1`` of an ensemble gets new weights
    drawn after ``torch.manual_seed`` of a seed derived from ``(seed, k)`` and its split from
    ``default_rng((seed, k))``. With ``control.ensemble > 1`` every network of ``module`` is
    replaced by an :class:`~ngmm_formula.networks.Ensemble` and beta, theta and log_sigma are
    set to the members' average.

    Parameters
    ----------
    problem : Problem
    family : Family
    approx : Approximation
    module : LinearPredictor
        With its networks; modified in place (best validation state restored).
    split_groups : ndarray of int, shape (n,)
        Group of every observation used for minibatches and the validation split (the
        blocks' groups when the integral factorises, else the largest grouping factor).
    control : Control
    seed : int
    shard : Shard, optional
        Data-parallel training (:mod:`ngmm_formula.distributed`): every process draws the same
        minibatches and evaluates the groups it owns (``split_groups`` are then the blocks;
        after a sharded read, ``shard.presharded``, the problem holds this process's groups
        only and ``split_groups`` numbers them among every process's groups,
        :meth:`~ngmm_formula.shards.Shard.numbering`); the loss keeps the global batch's
        number of observations as denominator, and the gradients and the scores are summed
        over the processes.
    describe : mapping of str to str, optional
        What the caller knows of the fit and the trainer does not (the formula): joins the
        fingerprint of the checkpoints (``Control.checkpoint``; :func:`fingerprint`).

    Raises
    ------
    CheckpointError
        ``Control.checkpoint`` names a file written by another fit, or not a checkpoint.
    """
    import time

    t0 = time.perf_counter()
    start = copy.deepcopy(module.state_dict())
    checkpoints = None
    if control.checkpoint is not None:
        if shard is not None:
            raise NGMMError("Control.checkpoint is not available with distributed=True (each "
                            "process would need its own file, written at the same epoch)")
        checkpoints = Checkpoints(control.checkpoint, control.checkpoint_every, fingerprint(
            problem, family, approx, module, split_groups, control, seed, describe))
    by_group = _rows_by_group(split_groups, shard)
    folds = folds_for(control, int(by_group.sizes.sum()), distributed=shard is not None)
    if folds > 1 and np.count_nonzero(by_group.sizes) >= 2 * folds:
        return _train_folds(problem, family, approx, module, by_group, control, folds, seed,
                            shard, start, t0, checkpoints)
    histories: list[TrainingHistory] = []
    members: list[list[CentredNetwork]] = [[] for _ in module.nets]
    linear: list[list[torch.Tensor]] = []
    for k in range(control.ensemble):
        if k:
            module.load_state_dict(start)
            torch.manual_seed(int(np.random.SeedSequence((seed, k)).generate_state(1)[0]))
            for net in module.nets:
                if isinstance(net, MLP):
                    net.reset()
        rng = np.random.default_rng(seed if k == 0 else (seed, k))
        histories.append(train_member(
            problem, family, approx, module, by_group, control, rng, shard,
            checkpoints=checkpoints,
            label="ngmm" if control.ensemble == 1 else f"ngmm {k + 1}/{control.ensemble}"))
        _keep_networks(module, members)
        linear.append([p.detach().clone() for p in _linear_params(module)])
    if control.ensemble > 1:
        module.nets = torch.nn.ModuleList(Ensemble(m) for m in members)
        with torch.no_grad():
            for j, p in enumerate(_linear_params(module)):
                p.copy_(torch.stack([values[j] for values in linear]).mean(0))
    first = histories[0]
    return TrainingHistory(
        train=first.train, validation=first.validation, best_epoch=first.best_epoch,
        stopped_early=first.stopped_early, seconds=time.perf_counter() - t0,
        n_validation_groups=first.n_validation_groups, lr=first.lr,
        members=tuple(histories) if control.ensemble > 1 else (),
        retrained_steps=sum(h.retrained_steps for h in histories), steps=first.steps,
        pass_steps=first.pass_steps)


#: ``Control.folds = None`` (the default) trains with this many folds of early stopping
#: (:func:`_train_folds`) where the training groups hold at most :data:`AUTO_FOLDS_MAX_ROWS`
#: rows, and with one validation split above.
AUTO_FOLDS = 5

#: The largest training set (rows of the groups that ``nn()`` terms train on) that
#: ``Control.folds = None`` trains with :data:`AUTO_FOLDS` folds. On little data the early
#: stopping epoch chosen on 10 % of the groups is noise (a few groups, a few Bernoulli
#: responses each), and K folds choose it from K times as many held-out groups, then train
#: on all of them; the fit costs about K + 1 times the training. Measured on the broad
#: benchmark's cells (200 groups of 20 rows and the others up to about 8,000 rows; 30 groups
#: of 10 rows) and the real data sets (180 to 4,059 rows) in ``benchmarks/neural/README.md``
#: ("Five folds of early stopping on little data"); at 10,000 rows a binomial fit
#: (``simulate_grouped``, 500 groups of 20) takes 1.4-1.5 s of CPU with one split and
#: 9.5-9.9 s with five folds (one thread). Above it one split holds enough groups, and the
#: cost would grow with the data.
AUTO_FOLDS_MAX_ROWS = 10_000


def folds_for(control: Control, n_rows: int, *, distributed: bool = False) -> int:
    """The number of folds of early stopping a fit trains with: ``control.folds`` if set,
    else :data:`AUTO_FOLDS` on at most :data:`AUTO_FOLDS_MAX_ROWS` training rows (one network,
    a validation split, one process), else 1."""
    if control.folds is not None:
        return control.folds
    small = n_rows <= AUTO_FOLDS_MAX_ROWS and control.validation > 0
    return AUTO_FOLDS if small and control.ensemble == 1 and not distributed else 1


def _train_folds(problem: Problem, family: Family, approx: Approximation,
                 module: LinearPredictor, by_group: RowsByGroup, control: Control,
                 n_folds: int, seed: int, shard: Shard | None, start: dict, t0: float,
                 checkpoints: Checkpoints | None = None) -> TrainingHistory:
    r"""K-fold early stopping over groups, then one network trained on all groups, and
    with ``control.average_folds`` their average.

    The groups are dealt into ``K = n_folds`` disjoint folds (:func:`folds_for`); fold
    ``k``'s network starts from the same weights (``start``) and is trained with fold ``k``
    as validation groups, and it is kept at its best validation epoch. The number of epochs
    is the maximiser of the pooled validation curve

    .. math::

        \bar s(e) = \frac{\sum_k n_k s_k(e)}{\sum_k n_k}, \qquad e \le \min_k E_k,

    (``s_k`` the per-observation validation score of fold ``k``, ``n_k`` its number of
    observations, ``E_k`` its number of epochs), and the network is trained again from
    ``start`` on all groups for that many epochs with the folds' mean learning rates. With
    ``control.average_folds`` every ``nn()`` term becomes the
    :class:`~ngmm_formula.networks.Ensemble` of its K fold networks and that last one
    (beta, theta and sigma are the last training's: the refit starts from them).
    """
    import time

    rows = by_group.sizes
    present = np.flatnonzero(rows > 0)
    rng = np.random.default_rng(seed)
    fold = np.full(rows.size, -1)
    fold[rng.permutation(present)] = np.arange(present.size) % n_folds
    histories, weights = [], []
    members: list[list[CentredNetwork]] = [[] for _ in module.nets]
    for k in range(n_folds):
        module.load_state_dict(start)
        histories.append(train_member(problem, family, approx, module, by_group, control,
                                      np.random.default_rng((seed, k)), shard,
                                      held=fold == k, checkpoints=checkpoints,
                                      label=f"ngmm fold {k + 1}/{n_folds}"))
        weights.append(float(rows[fold == k].sum()))
        if control.average_folds:
            _keep_networks(module, members)
    length = min(len(h.validation) for h in histories)
    curves = np.array([h.validation[:length] for h in histories])
    w = np.array(weights)[:, None]
    pooled = (w * curves).sum(0) / w.sum()
    best = int(np.argmax(pooled)) + 1
    schedule = np.array([h.lr[:best] for h in histories]).mean(0).tolist()
    module.load_state_dict(start)
    final = train_member(problem, family, approx, module, by_group, control, rng, shard,
                         schedule=schedule, label="ngmm")
    if control.average_folds:
        _keep_networks(module, members)
        module.nets = torch.nn.ModuleList(Ensemble(m) for m in members)
    return TrainingHistory(
        train=histories[0].train[:length], validation=tuple(float(v) for v in pooled),
        best_epoch=best, stopped_early=all(h.stopped_early for h in histories),
        seconds=time.perf_counter() - t0, n_validation_groups=int(present.size),
        lr=tuple(schedule), members=tuple(histories), retrained_steps=final.retrained_steps,
        steps=histories[0].steps, pass_steps=histories[0].pass_steps)


def _keep_networks(module: LinearPredictor, members: list[list[CentredNetwork]]) -> None:
    """Append a copy of each of ``module``'s networks, as trained so far, to its ``nn()``
    term's list in ``members``: the members of an ensemble (``Control.ensemble``) or of the
    folds' average (``Control.average_folds``), made into
    :class:`~ngmm_formula.networks.Ensemble` once all are trained."""
    for kept, net in zip(members, module.nets):
        assert isinstance(net, CentredNetwork)
        kept.append(copy.deepcopy(net))


def _fast_parameters(module: LinearPredictor) -> list[torch.nn.Parameter]:
    return [p for net in module.nets if isinstance(net, CentredNetwork)
            for p in net.fast_parameters()]


def _linear_params(module: LinearPredictor) -> list[torch.nn.Parameter]:
    return [module.beta, module.theta] + (
        [module.log_sigma] if module.log_sigma is not None else [])


def train_member(problem: Problem, family: Family, approx: Approximation,
                 module: LinearPredictor, by_group: RowsByGroup, control: Control,
                 rng: np.random.Generator, shard: Shard | None = None, *,
                 held: np.ndarray | None = None,
                 schedule: Sequence[float] | None = None,
                 checkpoints: Checkpoints | None = None,
                 label: str = "ngmm") -> TrainingHistory:
    """Train one set of networks (with beta, theta, log_sigma) by AdamW with early stopping.

    ``rng`` draws the validation groups and the order of the minibatches; the best
    validation state is restored in ``module``. Parameters as :func:`train_networks`, and

    by_group : RowsByGroup
        In place of :func:`train_networks`' ``split_groups``: the rows of each of its groups
        (:func:`_rows_by_group`; after a sharded read, the rows per group of all processes
        as ``sizes``).
    held : ndarray of bool, shape (n_groups,), optional
        The validation groups (default: a fraction ``control.validation`` drawn by ``rng``).
    schedule : sequence of float, optional
        Train on all groups, without validation, for ``len(schedule)`` epochs with these
        learning rates (the retraining of ``Control.retrain`` and ``Control.folds``).
    checkpoints : Checkpoints, optional
        Where the early-stopping loop saves its state and what it resumes from
        (``Control.checkpoint``); the retraining on a schedule is not saved (a fit killed
        during it runs it again from its start).
    label : str
        The progress bar's name (``Control.progress``): one bar for the early-stopping loop
        and one, ``"<label>, all groups"``, for a retraining on a schedule.
    """
    import time

    t0 = time.perf_counter()
    if held is None:
        held = (_split_groups(by_group.sizes, control.validation, rng) if schedule is None
                else np.zeros(by_group.sizes.size, dtype=bool))
    train_groups = np.flatnonzero(~held & (by_group.sizes > 0))
    val_groups = np.flatnonzero(held)
    batch_groups = _groups_per_batch(by_group.sizes, control)
    net_params = [p for net in module.nets for p in net.parameters()]
    for net in module.nets:
        if isinstance(net, MLP):
            net.additive_noise_scale = additive_noise_scale(family)
    other = _linear_params(module)
    initial = copy.deepcopy(module.state_dict()) if control.retrain else None
    if schedule is None and val_groups.size:
        use = start_groups(by_group.sizes)
        start = train_groups if use is None else train_groups[use[train_groups]]
        _fit_linear_part(problem, family, training_approximation(approx, control), module,
                         by_group.rows(start), control, shard)
    opt = _optimiser(net_params, other, control, _fast_parameters(module))
    # the embeddings' prior (networks.MLP.penalty) is per training observation
    n_train = [max(1, int(by_group.sizes[train_groups].sum()))]  # all groups' when retraining
    evaluate, batches, step, step_state = _minibatch_objective(
        problem, family, approx, module, by_group, control, rng, shard, net_params + other,
        n_train)
    saver = (_Saver(checkpoints, step_state)
             if checkpoints is not None and schedule is None else None)
    show = shard is None or shard.rank == 0  # the progress bars
    log = _train_with_early_stopping(module, opt, evaluate, batches, step, rng, train_groups,
                                     val_groups, by_group.sizes, batch_groups, control, shard,
                                     control.epochs if schedule is None else 0, saver,
                                     label=label if show else None)
    retrained = 0
    if schedule is None and initial is not None and val_groups.size and log.best_epoch:
        schedule = log.lr[:log.best_epoch]
        module.load_state_dict(initial)
    if schedule is not None:  # a fixed number of epochs on all groups
        everything = np.sort(np.concatenate([train_groups, val_groups]))
        n_train[0] = max(1, int(by_group.sizes[everything].sum()))
        retrained = _train_on_schedule(module, net_params, other, batches, step, rng,
                                       everything, batch_groups, schedule, control,
                                       label=f"{label}, all groups" if show else None)
    elif log.best_state is not None:
        module.load_state_dict(log.best_state)
    if shard is not None:  # the processes' weights agree to the last bit: rank 0's
        shard.sync(module)
    module.eval()
    return TrainingHistory(train=tuple(log.train), validation=tuple(log.validation),
                           best_epoch=log.best_epoch, stopped_early=log.stopped,
                           seconds=time.perf_counter() - t0,
                           n_validation_groups=int(val_groups.size), lr=tuple(log.lr),
                           retrained_steps=retrained, steps=log.steps,
                           pass_steps=math.ceil(train_groups.size / batch_groups))


def training_approximation(approx: Approximation, control: Control) -> Approximation:
    """The approximation of the optimiser's steps: ``approx``, or its one-node (Laplace)
    version with ``control.train_approx = "laplace"`` when ``approx`` is a quadrature rule
    on per-group blocks (the mode search, the layout and the warm starts are the same)."""
    if control.train_approx == "laplace" and approx.kind in ("agq", "truncated"):
        return Approximation("laplace", joint=approx.joint)
    return approx


def _groups_per_batch(sizes: np.ndarray, control: Control) -> int:
    """Groups per minibatch: ``control.batch_groups``, or as many as make about
    ``control.batch_size`` rows at the mean group size.

    Parameters
    ----------
    sizes : ndarray of int
        Rows per group of the grouping factor that minibatches are made of (of all
        processes).
    control : Control
    """
    rows_per_group = int(sizes.sum()) / max(1, int(np.count_nonzero(sizes)))
    return control.batch_groups or max(1, int(round(control.batch_size / rows_per_group)))


def _minibatch_objective(
        problem: Problem, family: Family, approx: Approximation, module: LinearPredictor,
        by_group: RowsByGroup, control: Control, rng: np.random.Generator,
        shard: Shard | None, params: list[torch.nn.Parameter], n_train: list[int],
) -> tuple[Callable[..., torch.Tensor], Callable[[np.ndarray, int], list[_Batch]],
           Callable[[AdamW, _Batch], float], _StepState]:
    """The log-likelihood of a set of groups and one optimiser step on a minibatch.

    The conditional modes of every group are cached between calls as warm starts; the input
    noise of ``control.input_noise`` is drawn from a generator seeded by ``rng``.

    Parameters
    ----------
    problem, family, approx, module
        As :func:`train_member`.
    by_group : RowsByGroup
        The rows of each group of ``split_groups``.
    control : Control
    rng : numpy.random.Generator
        Draws the seed of the input noise (one draw, here).
    shard : Shard or None
        This process's part of a distributed fit.
    params : list of Parameter
        Every trained parameter (their gradients are summed over the processes).
    n_train : list of one int
        The training observations that the embeddings' prior is divided by; read at every
        step, so the caller may change it (retraining on all groups).

    Returns
    -------
    evaluate : callable
        ``evaluate(groups, grad=...)``: log-likelihood of this process's part of ``groups``.
    batches : callable
        ``batches(order, batch_groups)``: a pass's minibatches (:class:`_Batch`).
    step : callable
        ``step(optimiser, batch)``: one step on a :class:`_Batch`; its log-likelihood.
    state : _StepState
        What they keep between calls (the modes' warm starts, the noise's generator).
    """
    per_group_blocks = not approx.joint
    step_approx = training_approximation(approx, control)
    score_approx = (step_approx if int(by_group.sizes.sum()) > VALIDATION_TRAINING_RULE_ROWS
                    else approx)  # the validation score's rule
    n_groups = by_group.sizes.size
    owned = (np.ones(n_groups, dtype=bool) if shard is None  # the groups evaluated here
             else by_group.here > 0 if by_group.here is not None else shard.owned(n_groups))
    sizes, rows_of = by_group.sizes, by_group.rows
    blocks_of = _blocks_of(problem, by_group)
    device = problem.y.device
    cache = torch.zeros(problem.blocks.n_blocks, problem.blocks.dim, dtype=problem.y.dtype,
                        device=device)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    input_noise = _input_noise_sampler(problem, module, control, noise_gen, sizes)

    pieces = _Pieces(problem, by_group, blocks_of)  # the validation groups', gathered once

    def evaluate(groups: np.ndarray, *, grad: bool, laid: Problem | None = None
                 ) -> torch.Tensor:
        """Log-likelihood of this process's part of ``groups`` (0 when it owns none); with
        ``grad`` the networks see the input noise. ``laid``: the groups' problem, gathered
        in advance (:func:`_lay_out`); else validation goes by :class:`_Pieces`."""
        gs_np = np.sort(groups[owned[groups]])
        noise = None
        if grad and input_noise is not None:  # drawn before the early return: in step
            noise = input_noise(groups, gs_np)
        if not gs_np.size:
            return problem.y.new_zeros(())
        if not grad and laid is None and per_group_blocks:
            return functools.reduce(torch.add, [evaluate(g, grad=False, laid=sub)
                                                for g, sub in pieces.of(gs_np)])
        gs = torch.as_tensor(blocks_of(gs_np), dtype=torch.long, device=device)
        start = cache[gs] if per_group_blocks else None
        if laid is None:
            rows = torch.as_tensor(rows_of(gs_np), dtype=torch.long, device=device)
            laid = problem.subset(rows, gs if per_group_blocks else None)
        sub = laid if noise is None else dataclasses.replace(laid, net_noise=noise)
        # validation too takes the fixed Newton steps from the cached modes (the value, at
        # a mode within ~1e-6 where it is stationary, is within ~1e-12)
        obj = Objective(sub, family, step_approx if grad else score_approx, module,
                        mode_tol=1e-7, mode_steps=control.train_mode_steps or None)
        with torch.set_grad_enabled(grad):
            ll = obj.per_block(start=start).sum()
        if per_group_blocks and obj.mode is not None:
            cache[gs] = obj.mode.v
        return ll

    # the embeddings' prior, counted by one process (the gradients are summed over them)
    penalised = [net for net in module.nets if isinstance(net, CentredNetwork)
                 and (shard is None or shard.rank == 0)]
    step = functools.partial(_step, evaluate, sizes, penalised, n_train, shard, params)
    batches = functools.partial(_batches, problem, by_group,
                                lay_out=shard is None and per_group_blocks)
    return evaluate, batches, step, _StepState(cache, noise_gen)


def _step(evaluate: Callable[..., torch.Tensor], sizes: np.ndarray,
          penalised: list[CentredNetwork], n_train: list[int], shard: Shard | None,
          params: list[torch.nn.Parameter], optimiser: AdamW, minibatch: _Batch) -> float:
    """One AdamW step on ``minibatch`` (:func:`_minibatch_objective`, whose arguments the
    first six are); returns its log-likelihood."""
    batch = minibatch.groups
    ll = evaluate(batch, grad=True, laid=minibatch.problem)
    loss = -ll / int(sizes[batch].sum())
    for net in penalised:
        loss = loss + net.penalty() / n_train[0]
    optimiser.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    if shard is not None:
        shard.all_sum_grads(params)
    optimiser.step()
    return float(ll.detach())


def _blocks_of(problem: Problem, by_group: RowsByGroup
               ) -> Callable[[np.ndarray], np.ndarray]:
    """``blocks_of(groups)``: the sorted blocks of ``problem`` that hold the sorted groups
    ``groups`` (groups with rows here, one block each): the groups' own numbers, except
    after a sharded read, where a group's number is among all processes' groups and its
    block is this process's (each group's block read off its first row here)."""
    if by_group.here is None:
        return lambda groups: groups
    block_of_obs = problem.blocks.block_of_obs.cpu().numpy()
    return lambda groups: np.sort(block_of_obs[by_group.order[by_group.starts[groups]]])


class _Pieces:
    """Groups (one block each) in consecutive pieces of about
    :data:`~ngmm_formula.fit.CHUNK_ROWS` rows (:func:`~ngmm_formula.fit.piece_bounds`), each
    with its rows' problem, gathered on first use and kept: the validation groups are the
    same every epoch, and a piece's (rows x nodes) temporaries stay in cache
    (:meth:`~ngmm_formula.fit.Objective.chunks`). Below that many rows: one piece,
    the problem the evaluation gathered before (the same numbers)."""

    def __init__(self, problem: Problem, by_group: RowsByGroup,
                 blocks_of: Callable[[np.ndarray], np.ndarray]) -> None:
        self.problem, self.by_group, self.blocks_of = problem, by_group, blocks_of
        self._kept: dict[bytes, list[tuple[np.ndarray, Problem]]] = {}

    def of(self, groups: np.ndarray) -> list[tuple[np.ndarray, Problem]]:
        """The pieces of the sorted ``groups``: (their groups, their problem)."""
        key = groups.tobytes()
        if key not in self._kept:
            bounds = piece_bounds(self.by_group.sizes[groups])
            device = self.problem.y.device
            self._kept[key] = [
                (g, self.problem.subset(torch.as_tensor(self.by_group.rows(g), device=device),
                                        torch.as_tensor(self.blocks_of(g), device=device)))
                for g in (groups[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))]
        return self._kept[key]


@dataclass(frozen=True)
class _Batch:
    """A minibatch: its groups and, where the epoch was laid out in advance
    (:func:`_lay_out`), its rows' problem."""

    groups: np.ndarray
    problem: Problem | None = None


class _Epochs:
    """The minibatches of the training loop, epoch after epoch.

    A *pass* visits every group of ``groups`` once, in an order drawn by ``rng``, in
    minibatches of ``batch_groups`` groups; an *epoch* is the next ``steps`` minibatches of
    the current pass, or what is left of it (``steps`` None: the whole pass). An epoch never
    spans two passes, so where a pass has at most ``steps`` minibatches (every data set of
    up to ``steps * Control.batch_size`` training rows) an epoch is a pass.

    Parameters
    ----------
    batches : callable
        ``batches(order, batch_groups)``: a pass's minibatches (:func:`_batches`).
    rng : numpy.random.Generator
        Draws each pass's order.
    groups : ndarray of int
    batch_groups : int
    steps : int or None
    """

    def __init__(self, batches: Callable[[np.ndarray, int], list[_Batch]],
                 rng: np.random.Generator, groups: np.ndarray, batch_groups: int,
                 steps: int | None) -> None:
        self._batches, self._rng, self._groups = batches, rng, groups
        self._batch_groups, self._steps = batch_groups, steps
        self._order: np.ndarray | None = None  # the current pass's order
        self._pending: list[_Batch] = []  # its minibatches not yet taken
        self._taken = 0

    def next(self) -> list[_Batch]:
        """The next epoch's minibatches."""
        if not self._pending:
            self._order = self._rng.permutation(self._groups)
            self._pending = self._batches(self._order, self._batch_groups)
            self._taken = 0
        n = len(self._pending) if self._steps is None else self._steps
        epoch, self._pending = self._pending[:n], self._pending[n:]
        self._taken += len(epoch)
        return epoch

    def state(self) -> dict:
        """Where the current pass stands (for a checkpoint): its order, None at a pass's
        end, and the minibatches taken."""
        order = None if not self._pending or self._order is None else torch.as_tensor(
            self._order)
        return {"order": order, "taken": self._taken}

    def restore(self, state: dict | None) -> None:
        """Continue the pass of :meth:`state` (the generator's state is restored apart)."""
        if state is None or state["order"] is None:
            self._order, self._pending, self._taken = None, [], 0
            return
        self._order = state["order"].numpy()
        self._taken = int(state["taken"])
        self._pending = self._batches(self._order, self._batch_groups)[self._taken:]


def _batches(problem: Problem, by_group: RowsByGroup, order: np.ndarray, batch_groups: int,
             *, lay_out: bool) -> list[_Batch]:
    """A pass's minibatches: consecutive runs of ``batch_groups`` groups of ``order``, laid
    out in advance (:func:`_lay_out`) with ``lay_out`` (one block per group, one process)."""
    if lay_out and order.size:
        return _lay_out(problem, by_group, order, batch_groups)
    return [_Batch(order[s:s + batch_groups]) for s in range(0, order.size, batch_groups)]


def _lay_out(problem: Problem, by_group: RowsByGroup, order: np.ndarray, batch_groups: int
             ) -> list[_Batch]:
    """The minibatches of ``order`` (consecutive runs of ``batch_groups`` groups, one block
    per group) with their problems.

    The rows of all of them are gathered once (batch after batch, each batch's groups
    sorted: the order the minibatch objective uses) and each minibatch's problem is a slice
    of that copy: one gather per tensor and epoch instead of one per tensor and step, with
    the same rows in the same order (the same numbers).
    """
    groups = [order[s:s + batch_groups] for s in range(0, order.size, batch_groups)]
    ordered = [np.sort(g) for g in groups]
    everything = np.concatenate(ordered)
    device = problem.y.device
    whole = problem.subset(torch.as_tensor(by_group.rows(everything), device=device))
    # each row's block: its group's position in its (sorted) minibatch
    local = np.repeat(np.concatenate([np.arange(g.size) for g in ordered]),
                      by_group.sizes[everything])
    block = torch.as_tensor(local, dtype=whole.blocks.block_of_obs.dtype, device=device)
    ends = np.cumsum([int(by_group.sizes[g].sum()) for g in ordered])
    starts = ends - [int(by_group.sizes[g].sum()) for g in ordered]
    return [_Batch(g, whole.window(int(lo), int(hi), block[int(lo):int(hi)], g.size))
            for g, lo, hi in zip(groups, starts, ends)]


@dataclass(frozen=True)
class _StepState:
    """What the minibatch steps keep between calls: the conditional modes of every block
    (warm starts of the Newton search) and the generator of the input noise."""

    modes: torch.Tensor
    noise: torch.Generator


def _input_noise_sampler(
        problem: Problem, module: LinearPredictor, control: Control,
        noise_gen: torch.Generator, sizes: np.ndarray,
) -> Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, ...]] | None:
    """The Gaussian noise of standard deviation ``control.input_noise`` on the networks'
    numeric inputs (none on one-hot columns), or None when no input gets any.

    Parameters
    ----------
    problem : Problem
    module : LinearPredictor
    control : Control
    noise_gen : torch.Generator
        Draws the noise (seeded by the caller from its ``rng`` whether there is noise or
        not: the stream of ``rng`` does not depend on ``control.input_noise``).
    sizes : ndarray of int
        Rows per group (of all processes).

    Returns
    -------
    callable or None
        ``sample(groups, own)``: the noise of the rows of the sorted groups ``own`` among
        those of the minibatch ``groups``, one tensor per network (an MLP's in its weights'
        dtype).
    """
    # SD per input column of every network (0 for one-hot columns), in the dtype of the
    # network's weights (float32 by default), to which its input is cast: drawn in it
    # directly (float64 draws took 0.14 against 0.03 ms a minibatch of 4,096 x 2, and a
    # cast to float32 after; until 2026-12-07 the noise was drawn in float64)
    noise_sd = [control.input_noise * torch.tensor(
        net.numeric if isinstance(net, MLP) else [False] * x.shape[1],
        dtype=net.linear.weight.dtype if isinstance(net, MLP) else x.dtype)
        for net, x in zip(module.nets, problem.net_X)]
    noisy = any(bool(sd.any()) for sd in noise_sd)
    if not noisy:
        return None

    def sample(groups: np.ndarray, own: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Noise of the rows of the groups ``own`` among those of the minibatch ``groups``:
        drawn for the whole minibatch in group order (a group's rows together, in their
        order), so every process draws the same numbers."""
        counts = sizes[np.sort(groups)]
        pick = None
        if own.size < counts.size:  # the positions of the own groups' rows
            mine = np.isin(np.sort(groups), own)
            c = counts[mine]
            first = (np.cumsum(counts) - counts)[mine]
            pick = torch.as_tensor(np.repeat(first - np.cumsum(c) + c, c) + np.arange(c.sum()))
        out = []
        for sd, x in zip(noise_sd, problem.net_X):
            e = torch.randn(int(counts.sum()), x.shape[1], generator=noise_gen,
                            dtype=sd.dtype) * sd
            out.append((e if pick is None else e[pick]).to(device=x.device))
        return tuple(out)

    return sample


@dataclass
class _EpochLog:
    """What :func:`_train_with_early_stopping` saw and decides on: the curves per epoch
    (training and validation objective per observation, learning rate), the best epoch, its
    score and weights, the epochs without improvement, the last epoch run, the optimiser
    steps taken, and whether training stopped early."""

    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    stopped: bool = False
    best_score: float = -math.inf
    wait: int = 0
    epoch: int = 0
    steps: int = 0


@dataclass(frozen=True)
class _Saver:
    """The checkpoints of a fit and the state of the minibatch steps that they save."""

    checkpoints: Checkpoints
    step_state: _StepState


def _train_with_early_stopping(
        module: LinearPredictor, opt: AdamW,
        evaluate: Callable[..., torch.Tensor],
        batches: Callable[[np.ndarray, int], list[_Batch]],
        step: Callable[[AdamW, _Batch], float], rng: np.random.Generator,
        train_groups: np.ndarray, val_groups: np.ndarray, sizes: np.ndarray,
        batch_groups: int, control: Control, shard: Shard | None, epochs: int,
        saver: _Saver | None = None, *, label: str | None = "ngmm") -> _EpochLog:
    """Up to ``epochs`` epochs of minibatch steps on ``train_groups``, scored on
    ``val_groups`` (on the training curve without them), with the learning rate halved when
    the score stalls and early stopping after ``control.patience`` epochs without
    improvement; neither acts before ``control.min_steps`` steps.

    Parameters
    ----------
    module : LinearPredictor
        Trained in place; its weights at the end are the last epoch's (the best are returned).
    opt : Optimizer
    evaluate, batches, step : callable
        From :func:`_minibatch_objective`.
    rng : numpy.random.Generator
        Draws the order of the minibatches.
    train_groups, val_groups : ndarray of int
    sizes : ndarray of int
        Rows per group.
    batch_groups : int
        Groups per minibatch.
    control : Control
    shard : Shard or None
    epochs : int
    saver : _Saver, optional
        Checkpoints (``Control.checkpoint``): the loop starts from the saved state when there
        is one for it, and saves its state every ``control.checkpoint_every`` epochs and
        after the last.
    label : str or None
        The progress bar's name (None: no bar, as on the processes of a distributed fit other
        than the first).
    """
    sched = Plateau(opt, factor=0.5, patience=max(1, control.patience // 3))
    progress = _progress(control, epochs, label) if label is not None else None
    log = _EpochLog()
    minibatches = _Epochs(batches, rng, train_groups, batch_groups, control.steps_per_epoch)
    saved = saver.checkpoints.start_loop() if saver is not None else None
    if saver is not None and saved is not None:
        _restore(saved, module, opt, sched, rng, saver.step_state, log)
        minibatches.restore(saved.get("pass"))
        if progress is not None:
            progress.update(log.epoch)
    for epoch in range(log.epoch + 1, epochs + 1) if not log.stopped else ():
        module.train()
        total, n_rows = 0.0, 0
        for batch in minibatches.next():
            total += step(opt, batch)
            log.steps += 1
            n_rows += int(sizes[batch.groups].sum())
        module.eval()
        vll = 0.0
        if val_groups.size:
            with torch.no_grad():
                vll = float(evaluate(val_groups, grad=False))
        if shard is not None:  # this epoch's sums over the processes
            total, vll = map(float, shard.all_sum(np.array([total, vll])))
        log.train.append(total / max(1, n_rows))
        if val_groups.size:
            score = vll / int(sizes[val_groups].sum())
            log.validation.append(score)
        else:
            score = log.train[-1]
        log.lr.append(opt.param_groups[0]["lr"])
        _decide(log, score, epoch, module, sched, control)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(train=f"{log.train[-1]:.4f}",
                                 valid=f"{log.validation[-1]:.4f}" if log.validation else "-")
        if saver is not None and saver.checkpoints.due(epoch, log.stopped or epoch == epochs):
            saver.checkpoints.write(_loop_state(module, opt, sched, rng, saver.step_state, log,
                                                minibatches))
        if log.stopped:
            break
    if progress is not None:
        _close_progress(progress, len(log.train), log.best_epoch, log.stopped)
    return log


def _decide(log: _EpochLog, score: float, epoch: int, module: LinearPredictor,
            sched: Plateau, control: Control) -> None:
    """After ``epoch`` with validation ``score``: the learning-rate decay, the best epoch
    (and a copy of its weights), the epochs without improvement and whether to stop."""
    log.epoch = epoch
    warm = log.steps >= control.min_steps  # early stopping and lr decay wait for warm-up
    if warm:
        sched.step(score)
    if log.best_state is None or score > log.best_score + control.min_delta * max(
            1.0, abs(log.best_score)):
        log.best_score, log.best_epoch, log.wait = score, epoch, 0
        log.best_state = copy.deepcopy(module.state_dict())
    elif warm:
        log.wait += 1
    log.stopped = log.wait >= control.patience


def _loop_state(module: LinearPredictor, opt: AdamW,
                sched: Plateau, rng: np.random.Generator,
                step_state: _StepState, log: _EpochLog, minibatches: _Epochs) -> dict:
    """Everything :func:`_restore` needs to continue the loop after ``log.epoch`` exactly as
    it would have gone on: tensors, dicts, lists and plain values only
    (:mod:`~ngmm_formula.checkpoint`)."""
    return {
        "epoch": log.epoch,
        "module": module.state_dict(),
        "best_state": log.best_state,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "log": {"train": list(log.train), "validation": list(log.validation),
                "lr": list(log.lr), "best_epoch": log.best_epoch,
                "best_score": log.best_score, "wait": log.wait, "steps": log.steps,
                "stopped": log.stopped},
        # PCG64's 128-bit state as JSON text (a plain int of any size, whatever the reader)
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),  # dropout
        "noise_rng": step_state.noise.get_state(),
        "modes": step_state.modes.detach().cpu().clone(),
        "pass": minibatches.state(),
    }


def _restore(saved: dict, module: LinearPredictor, opt: AdamW,
             sched: Plateau, rng: np.random.Generator,
             step_state: _StepState, log: _EpochLog) -> None:
    """Put the state of :func:`_loop_state` back (parameters copied in place, so the
    optimiser keeps its references)."""
    module.load_state_dict(saved["module"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    rng.bit_generator.state = json.loads(saved["numpy_rng"])
    torch.set_rng_state(saved["torch_rng"])
    step_state.noise.set_state(saved["noise_rng"])
    with torch.no_grad():
        step_state.modes.copy_(saved["modes"])
    entries = saved["log"]
    log.train, log.validation, log.lr = (list(entries["train"]), list(entries["validation"]),
                                         list(entries["lr"]))
    log.best_epoch, log.best_score = int(entries["best_epoch"]), float(entries["best_score"])
    log.wait, log.steps = int(entries["wait"]), int(entries["steps"])
    log.stopped, log.epoch = bool(entries["stopped"]), int(saved["epoch"])
    log.best_state = saved["best_state"]


def fingerprint(problem: Problem, family: Family, approx: Approximation,
                module: LinearPredictor, split_groups: np.ndarray, control: Control,
                seed: int, describe: Mapping[str, str] | None = None) -> dict[str, str]:
    """The description of a fit that its checkpoints carry: a checkpoint is resumed only by
    a fit with the same one (:func:`~ngmm_formula.checkpoint.read_checkpoint`).

    Entries: ``describe`` (the formula, from the caller), the family, the approximation, the
    number of observations, a SHA-256 of the data as the trainer sees it (response, weights,
    offset, fixed-effects matrix, networks' inputs, groups), the parameters' names and
    shapes, the dtype, the seed, and every option of ``control`` except those that do not
    change the result: ``progress``, ``threads`` (torch's threads may change the last bits,
    not the fit), ``checkpoint`` and ``checkpoint_every``.
    """
    digest = hashlib.sha256()
    Xs = problem.Xs
    X_parts = (Xs.values, Xs.columns) if isinstance(Xs, SparseRowsTensor) else (Xs,)
    for t in (problem.y, problem.w, problem.offset, *X_parts, *problem.net_X,
              torch.as_tensor(np.asarray(split_groups, dtype=np.int64))):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    skip = {"progress", "threads", "checkpoint", "checkpoint_every"}
    options = {f.name: getattr(control, f.name) for f in dataclasses.fields(control)
               if f.name not in skip}
    return {
        **{k: str(v) for k, v in (describe or {}).items()},
        "family": repr(family),
        "approximation": repr(approx),
        "nobs": str(problem.y.shape[0]),
        "data (sha256)": digest.hexdigest(),
        "parameters": ", ".join(f"{k}{tuple(v.shape)}" for k, v in module.state_dict().items()),
        "dtype": str(problem.y.dtype),
        "seed": str(seed),
        **{f"Control.{k}": repr(v) for k, v in options.items()},
    }


def _train_on_schedule(module: LinearPredictor, net_params: list[torch.nn.Parameter],
                       other: list[torch.nn.Parameter],
                       batches: Callable[[np.ndarray, int], list[_Batch]],
                       step: Callable[[AdamW, _Batch], float],
                       rng: np.random.Generator, groups: np.ndarray, batch_groups: int,
                       schedule: Sequence[float], control: Control, *,
                       label: str | None = None) -> int:
    """Train with a fresh optimiser on ``groups`` for one epoch per learning rate of
    ``schedule``, without validation; returns the number of optimiser steps.

    Parameters
    ----------
    module : LinearPredictor
    net_params, other : list of Parameter
        The networks' weights (with weight decay) and the linear part's parameters.
    batches, step : callable
        From :func:`_minibatch_objective`.
    rng : numpy.random.Generator
        Draws the order of the minibatches.
    groups : ndarray of int
    batch_groups : int
        Groups per minibatch.
    schedule : sequence of float
    control : Control
    label : str, optional
        The progress bar's name (none without it, or without ``Control.progress``).
    """
    module.train()
    opt = _optimiser(net_params, other, control, _fast_parameters(module))
    steps = 0
    minibatches = _Epochs(batches, rng, groups, batch_groups, control.steps_per_epoch)
    progress = _progress(control, len(schedule), label) if label is not None else None
    for lr in schedule:
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for batch in minibatches.next():
            step(opt, batch)
            steps += 1
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return steps


def _fit_linear_part(problem: Problem, family: Family, approx: Approximation,
                     module: LinearPredictor, rows: np.ndarray, control: Control,
                     shard: Shard | None) -> None:
    """Refit beta, theta and log_sigma by L-BFGS to the training groups' ``rows``, with the
    networks' current outputs as a known offset.

    The fit starts from the GLMM fitted to all groups, validation groups included: at that
    point the linear part is in-sample for the validation groups, and the validation score
    of the first epochs is optimistic by as much as training the linear part on the other
    groups costs: on VerbAgg (persons as groups), with the network frozen, the validation
    score fell by 0.0012 per response over 100 epochs from this alone, and is flat after
    this refit (``benchmarks/neural/README.md``). The validation blocks keep their ids
    without rows (they integrate to 1), so a distributed fit's shards stay valid.

    Started at that nearby optimum, Newton steps with BHHH's Hessian come first
    (``warm=True``): at 10^6 rows 9 evaluations instead of 18 (12 of L-BFGS-B and the
    polish) to the same max|gradient| < 1e-10, 1.5 s instead of 3.0 s; from the GLMM start
    of :func:`fit_linear_start`, whose new columns start at 0, the steps stopped short and
    cost 28 (``benchmarks/README.md``).
    """
    sub = problem.subset(torch.as_tensor(rows, dtype=torch.long, device=problem.y.device))
    with torch.no_grad():
        fixed = sub.with_offset(module.network_output(sub))
    optimise(Objective(fixed, family, approx, linear_part(module, fixed), shard=shard),
             max_iter=control.max_iter, gtol=1e-10, final_hessian=False, warm=True)


def _optimiser(net_params: list[torch.nn.Parameter], other: list[torch.nn.Parameter],
               control: Control, fast: Sequence[torch.nn.Parameter] = ()) -> AdamW:
    """AdamW with weight decay on the network weights only (:class:`~ngmm_formula.adamw.AdamW`:
    ``torch.optim.AdamW``'s multi-tensor update, the same numbers bit for bit, without
    torch.optim's import of ``torch._dynamo``). The weights ``fast`` (among ``net_params``:
    the networks' additive parts) have their own group at :data:`ADDITIVE_LR_SCALE` times
    the learning rate; every group's ``"lr_scale"`` is its rate over ``control.lr``, which
    the plateau decay keeps and a schedule (:func:`_train_on_schedule`) applies."""
    fast_ids = {id(p) for p in fast}
    groups = [{"params": [p for p in net_params if id(p) not in fast_ids],
               "weight_decay": control.weight_decay, "lr_scale": 1.0},
              {"params": other, "weight_decay": 0.0, "lr_scale": 1.0}]
    if fast_ids:
        groups.append({"params": [p for p in net_params if id(p) in fast_ids],
                       "weight_decay": control.weight_decay, "lr_scale": ADDITIVE_LR_SCALE,
                       "lr": control.lr * ADDITIVE_LR_SCALE})
    return AdamW(groups, lr=control.lr)


def _progress(control: Control, total: int, label: str):  # type: ignore[no-untyped-def]
    """A bar of ``total`` epochs named ``label`` where ``Control.progress`` asks for one
    (None: when standard error is a terminal), else None."""
    show = control.progress if control.progress is not None else sys.stderr.isatty()
    if not show or total < 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="epoch", leave=True)


def _close_progress(progress, epochs: int, best_epoch: int,  # type: ignore[no-untyped-def]
                    stopped: bool) -> None:
    """End the bar at 100%: on early stopping its total becomes the epochs run (the bar
    would otherwise stay at, say, 74%) and the postfix says where training stopped."""
    if stopped:
        progress.total = epochs
        progress.set_postfix_str(f"early stopping at epoch {epochs} (best {best_epoch})",
                                 refresh=False)
    progress.close()
