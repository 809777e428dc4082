"""The options of a fit (:class:`Control`), a leaf of the package.

Every stage that reads an option (the approximations' variational optimiser, the fit, the
training of networks, inference, the entry points) imports it from here, below all of them;
:mod:`ngmm_formula.fit` and :mod:`ngmm_formula.api` re-export it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ngmm_formula.errors import NGMMError

__all__ = ["Control"]


@dataclass(frozen=True)
class Control:
    """Options of the fit; the defaults need no tuning on the bundled examples.

    Attributes
    ----------
    max_iter : int
        L-BFGS iterations (linear models, and the final refit of neural ones).
    gtol : float
        Target max |gradient| of the log-likelihood for the Newton polishing steps.
    singular_tol : float
        A relative standard deviation (lme4's theta diagonal) below this is a singular fit
        (lme4's ``isSingular`` tolerance, 1e-4).
    na_action : {"omit", "raise"}
        Missing values: drop the rows (and report how many) or raise.
    epochs : int
        Maximum number of epochs (neural models): passes over the training groups, or parts
        of them of ``steps_per_epoch`` minibatches.
    lr : float
        AdamW learning rate. 1e-3: on the binomial synthetic benchmark (4,000 Bernoulli
        responses, where an epoch is one full-batch step) early stopping at 3e-3 left noisier
        networks (gap closed 92.3% / 92.1% on known / new groups over seeds 0-4, against
        94.9% / 94.2% at 1e-3; 93.4% / 95.6% over seeds 0-19 before the linear start and
        input noise of the networks, 94.7% / 95.5% with them);
        gaussian and poisson are unchanged. At 100,000 rows 1e-3 trains a few more epochs
        and fits the true effect more closely (benchmarks/neural/README.md). With both,
        lr 5e-4 and ``min_steps`` 400 gained 0.4 points (95.6% / 96.6% against 95.2% /
        96.3%, seeds 0-39) for about twice the epochs: not adopted.
    weight_decay : float
        Decoupled weight decay on the network weights.
    input_noise : float
        Standard deviation of the Gaussian noise added, during training only, to the
        standardised numeric inputs of each network's nonlinear layers (not to its linear
        path; :mod:`~ngmm_formula.networks`); 0 turns it off. Not used by
        ``approx="variational"``. 0.1: on the binomial synthetic benchmark it raised the gap
        closed by about 1 point (93.4% -> 94.3% on seeds 0-19, 93.6% -> 95.0% on seeds
        20-39, known groups); 0.2 cost 3 points on new groups, 0.3 biased the fit (89% /
        86%).
    batch_size : int
        Target observations per minibatch (rounded to whole groups).
    batch_groups : int or None
        Groups per minibatch; overrides ``batch_size``.
    validation : float
        Fraction of groups held out for early stopping (0 disables early stopping).
    patience : int
        Epochs without improvement of the validation score before stopping.
    steps_per_epoch : int or None
        An epoch -- the unit of ``epochs``, ``patience``, the learning-rate decay, the
        validation score and the checkpoints -- is at most this many minibatches: a pass
        over the training groups with more minibatches is cut into epochs of
        ``steps_per_epoch`` steps (the last one of a pass shorter; an epoch never spans two
        passes). None: an epoch is a pass. With the default 50 and ``batch_size`` 4096
        nothing changes below about 205,000 training rows. On 10^6 rows a pass is 220
        steps, the network has learnt the effect within the first, and early stopping
        counted ``patience`` whole passes of noise around a plateau (best epoch 20-35 of
        35-63); with epochs of 50 steps the binomial sine fit at 10^6 rows took 47.8 s
        instead of 132.5 s, with the gap closed 99.9 / 99.5 % against 100.1 / 99.5 % (known
        / new groups, confirmation seed; ``benchmarks/README.md``).
    min_steps : int
        Optimiser steps before early stopping and learning-rate decay may act.
    min_delta : float
        Relative improvement that counts.
    ensemble : int
        Networks trained per ``nn()`` term (different initial weights and validation splits)
        whose outputs are averaged; 1 (the default) trains a single network. Training time
        grows in proportion; over 5 seeds of the synthetic benchmark (at lr 3e-3) three
        networks gained 0.3-1.0 points of the closed gap on gaussian and poisson data, lost
        0.3-2.7 on binomial and took 2.4x the time; at lr 1e-3 five networks retrained on all
        groups gave binomial 94.4% / 94.9% over 20 seeds (benchmarks/neural/README.md).
    retrain : bool
        After early stopping, train again from the same initial weights on all groups
        (validation groups included) for the selected number of epochs, replaying the
        learning rates of the first run; the networks then learn from 10% more groups at up
        to twice the training time. On the binomial synthetic benchmark at lr 3e-3 it did
        not help (gap closed 91.5% / 91.2% vs 92.3% / 92.1%; benchmarks/neural/README.md).
    folds : int or None
        K > 1: K-fold early stopping over groups; the number of epochs maximises the pooled
        validation curve of K networks (each with one fold of the groups held out, all from the
        same initial weights), then one network is trained on all groups for that many epochs
        (K + 1 trainings; the fit averages the K + 1 networks: ``average_folds``). 1: one
        validation split (``validation``). None (the default): 5 folds where the training groups
        hold at most 10,000 rows (one network, one process:
        :func:`~ngmm_formula.train.folds_for`), 1 above, where one split holds enough groups and
        the cost would grow with the data (at 10,000 rows a binomial fit takes 9.5-9.9 s of CPU
        with five folds, 1.4-1.5 s with one split). Measured on the broad benchmark's fifth
        confirmation half (36 cells x 10 seeds, the rule written before the run): gap closed
        +2.0 / +1.8 points pooled over the nonlinear cells (SE 0.5; known / new groups), no cell
        below two paired standard errors, the worst cell 37 / 53 -> 66 / 65 % (small binomial:
        30 groups of 10 rows); the sine benchmark and the real data sets within their standard
        errors or above (benchmarks/neural/README.md, "Five folds of early stopping on little
        data").
        Not combined with ``ensemble``.
    average_folds : bool
        With K > 1 folds (``folds``; by default on up to 10,000 training rows): each
        ``nn()`` term is the average of the K fold networks (each at its own best validation
        epoch) and the network trained on all groups
        (:class:`~ngmm_formula.networks.Ensemble` of K + 1 members) instead of the last
        alone (False). No more training; K + 1 network evaluations wherever the fit is used,
        and K + 1 times the weights in the saved model and in AIC / BIC. Without folds it
        changes nothing. Measured on the broad benchmark's sixth confirmation half (36 cells
        x 10 seeds, the rule written before the run): gap closed +0.35 / +0.29 points
        pooled over the nonlinear cells (SE 0.18; known / new groups), 1 of 66 comparisons
        below two paired standard errors (benchmarks/neural/README.md, "A sixth
        confirmation half").
    refit : bool
        Refit the linear and variance parameters by L-BFGS after training.
    train_approx : {"laplace", "fit"}
        The integral of the training steps' minibatch objectives (neural models):
        ``"laplace"`` (the default) one node, ``"fit"`` the fit's own approximation (e.g.
        adaptive Gauss--Hermite with 11 nodes). Only the optimiser's steps use it: the
        validation score of early stopping, the GLMM start, the final refit of the linear and
        variance parameters and every reported number use the fit's approximation (except
        the validation score above :data:`~ngmm_formula.train.VALIDATION_TRAINING_RULE_ROWS`
        rows, 2^18, which takes this one: the score only chooses the epoch). Fits
        whose approximation has one node already (exact, Laplace, variational) are
        unaffected. Measured (issue 19, ``benchmarks/README.md``): the binomial epoch at
        10^5 rows / 1,000 groups fell from 0.189 to 0.148 CPU s (the plain MLP's: 0.05 s);
        on the synthetic benchmark (20 seeds, paired with ``"fit"``) the gap closed moved by
        -0.01 / +0.06 points on binomial (known / new groups; standard error of the paired
        difference 0.11 / 0.12, of today's mean 0.9 / 1.0) and 0.00 / 0.00 on poisson.
    train_mode_steps : int
        k > 0 (default 3): the conditional modes of a training step's groups take k
        undamped Newton steps from their last visit's modes (one scalar effect per group in
        a family without dispersion, :mod:`~ngmm_formula.approx.scalar`: up to
        :data:`~ngmm_formula.approx.scalar.EXTRA_STEPS` more while the last moves a mode by
        more than 1e-3), falling back to the damped
        search when the last step still moves a mode by more than 1e-3 (a group's first
        visit, a jump of the weights); 0: the damped search to convergence (tolerance 1e-7) every
        time. The validation score takes the same steps (a mode within about 1e-6, where
        the value, stationary in it, is within about 1e-12); every reported number keeps
        the search. The search took 4
        iterations (3-6) per step at 10^5 rows, each with step halving tests that evaluate
        the log-likelihood over all rows; with the Laplace training integral k = 3 brought
        the binomial epoch from 0.148 to 0.125 CPU s and left the synthetic benchmark's gap
        closed within 0.1 point of ``train_approx="fit", train_mode_steps=0`` on every
        family (k = 2: the same; ``benchmarks/neural/README.md``).
    progress : bool or None
        Progress bar (tqdm); None shows it when standard error is a terminal.
    threads : int or None
        torch intra-op threads during the fit (None: one, see
        :func:`~ngmm_formula.fit.torch_threads`).
    checkpoint : str, path-like or None
        A file in which the training of the networks saves its state every
        ``checkpoint_every`` epochs (and at the end of training), written atomically
        (:mod:`~ngmm_formula.checkpoint`). When the file exists at the start of a fit, the fit
        resumes from it: a fit killed after a checkpoint and started again with the same
        call ends with the same estimates as an uninterrupted one (bit for bit on the CPU).
        A file written by another fit (other data, formula, family, options that change the
        result, or seed) raises :class:`~ngmm_formula.errors.CheckpointError`. The file is
        kept after the fit (running the same call again then skips the training). Only
        models with ``nn()`` terms train, so only they write checkpoints; not with
        ``distributed=True`` or ``approx="variational"`` (an error). The retraining of
        ``retrain`` and ``folds`` on all groups is not saved (a fit killed during it runs
        it again); the loops before it are. None (default): no checkpoints.
    checkpoint_every : int
        Epochs between two checkpoints (default 10: a checkpoint costs a copy of the
        weights, of the optimiser's moments and of the conditional modes, and an ``fsync``,
        which is small beside ten epochs of any fit long enough to need one). Named for what
        it counts rather than ``every``, which would be ambiguous among the many counts of
        a Control (epochs, steps, iterations, folds).
    """

    max_iter: int = 2000
    gtol: float = 1e-6
    singular_tol: float = 1e-4
    na_action: str = "omit"
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    input_noise: float = 0.1
    batch_size: int = 4096
    batch_groups: int | None = None
    validation: float = 0.1
    patience: int = 15
    steps_per_epoch: int | None = 50
    min_steps: int = 200
    min_delta: float = 1e-5
    ensemble: int = 1
    retrain: bool = False
    folds: int | None = None
    average_folds: bool = True
    refit: bool = True
    train_approx: str = "laplace"
    train_mode_steps: int = 3
    progress: bool | None = None
    threads: int | None = None
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        checks = [
            ("max_iter", self.max_iter >= 1), ("epochs", self.epochs >= 1),
            ("lr", self.lr > 0), ("weight_decay", self.weight_decay >= 0),
            ("input_noise", 0 <= self.input_noise < float("inf")),
            ("batch_size", self.batch_size >= 1),
            ("batch_groups", self.batch_groups is None or self.batch_groups >= 1),
            ("validation", 0 <= self.validation < 1), ("patience", self.patience >= 1),
            ("min_steps", self.min_steps >= 0), ("ensemble", self.ensemble >= 1),
            ("steps_per_epoch", self.steps_per_epoch is None or (
                isinstance(self.steps_per_epoch, int)
                and not isinstance(self.steps_per_epoch, bool) and self.steps_per_epoch >= 1)),
            ("folds", self.folds is None
             or (self.folds >= 1 and (self.folds == 1 or self.ensemble == 1))),
            ("average_folds", isinstance(self.average_folds, bool)),
            ("na_action", self.na_action in ("omit", "raise")),
            ("train_approx", self.train_approx in ("fit", "laplace")),
            ("train_mode_steps", self.train_mode_steps >= 0),
            ("threads", self.threads is None or self.threads >= 1),
            ("checkpoint", self.checkpoint is None
             or (isinstance(self.checkpoint, (str, os.PathLike)) and str(self.checkpoint) != "")),
            ("checkpoint_every", isinstance(self.checkpoint_every, int)
             and not isinstance(self.checkpoint_every, bool) and self.checkpoint_every >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise NGMMError(f"Control: invalid {name}={getattr(self, name)!r}")
