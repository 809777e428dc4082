r"""AdamW and the plateau decay of its learning rate, without :mod:`torch.optim` (a leaf).

The trainer (:mod:`~ngmm_formula.train`) and the variational approximation
(:mod:`~ngmm_formula.approx.variational`) used ``torch.optim.AdamW(groups, lr,
foreach=True)`` and ``torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max",
factor=0.5, patience=p)``; these classes compute the same numbers, bit for bit on the CPU
(``tests/test_adamw.py`` runs both side by side), without what ``torch.optim`` costs a process
on its first optimiser: ``Optimizer.__init__`` imports ``torch._dynamo`` (about 800 modules,
1.1 s on this project's machine, 10 % of a fit of 10^5 rows), which nothing else of a fit
needs.

The update of a parameter :math:`w` with gradient :math:`g` at step :math:`t`, learning rate
:math:`\eta`, decoupled weight decay :math:`\lambda` (Loshchilov and Hutter, 2019):

.. math::

    w \leftarrow w (1 - \eta\lambda), \quad
    m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
    w \leftarrow w - \frac{\eta}{1 - \beta_1^t}
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon},

as torch's multi-tensor ("foreach") implementation orders the operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["AdamW", "Plateau"]


class AdamW:
    """AdamW over parameter groups (dicts with ``"params"`` and any of ``"lr"``,
    ``"weight_decay"``, ``"betas"``, ``"eps"``, plus keys of the caller's own, kept as
    they are), as ``torch.optim.AdamW(groups, lr=lr, foreach=True)``.

    Parameters
    ----------
    groups : iterable of dict
    lr : float
        Default learning rate of a group without ``"lr"``.
    betas : tuple of float
    eps : float
    weight_decay : float
        Default of a group without ``"weight_decay"``.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        # per parameter: [step, first moment, second moment]
        self.state: dict[torch.Tensor, list[Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter with a gradient (module docs)."""
        for group in self.param_groups:
            by_dtype: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_dtype.setdefault((p.device, p.dtype), []).append(p)
            for params in by_dtype.values():
                self._update(group, params)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        states = []
        for p in params:
            if p not in self.state:
                self.state[p] = [0, torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format)]
            states.append(self.state[p])
        grads = [g for g in (p.grad for p in params) if g is not None]  # all of them
        avgs = [s[1] for s in states]
        sqs = [s[2] for s in states]
        for s in states:
            s[0] += 1
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
        step_size = [(lr / (1 - beta1 ** float(s[0]))) * -1 for s in states]
        root = [(1 - beta2 ** float(s[0])) ** 0.5 for s in states]
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, root)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, avgs, denom, step_size)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists and plain values (the checkpoints' format): every parameter's step
        and moments by position, and the groups' settings."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {
            "state": {index[p]: {"step": s[0], "exp_avg": s[1], "exp_avg_sq": s[2]}
                      for p, s in self.state.items()},
            "param_groups": [{k: (list(v) if k == "betas" else v) for k, v in g.items()
                              if k != "params"} for g in self.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a :meth:`state_dict` of an optimiser of the same parameters."""
        params = [p for g in self.param_groups for p in g["params"]]
        if len(state["param_groups"]) != len(self.param_groups):
            raise ValueError("the saved optimiser has another number of parameter groups")
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
        self.state = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            self.state[p] = [int(s["step"]), s["exp_avg"].to(p).clone(),
                             s["exp_avg_sq"].to(p).clone()]


class Plateau:
    """The learning rate of every group multiplied by ``factor`` after more than
    ``patience`` scores in a row without improvement, as
    ``torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor, patience)``
    (relative threshold 1e-4, no cooldown, no floor; a score improves on the best if it
    exceeds ``best * (1 + 1e-4)``, which for negative scores, such as log-likelihoods,
    admits a slightly lower one: torch's rule, kept so that the fits stay the same)."""

    THRESHOLD = 1e-4
    EPS = 1e-8

    def __init__(self, optimizer: AdamW, factor: float, patience: int) -> None:
        self.optimizer = optimizer
        self.factor, self.patience = factor, patience
        self.best = -math.inf
        self.num_bad_epochs = 0

    def step(self, score: float) -> None:
        """After a score: the count of scores without improvement, and the decay."""
        if float(score) > self.best * (self.THRESHOLD + 1.0):
            self.best = float(score)
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > self.patience:
            for group in self.optimizer.param_groups:
                old = float(group["lr"])
                new = max(old * self.factor, 0.0)
                if old - new > self.EPS:
                    group["lr"] = new
            self.num_bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
