r"""Networks of the ``nn()`` terms.

Each ``nn(x1, ..., hidden=(h_1, ..., h_L), activation=a, dropout=p)`` term becomes a
multilayer perceptron on its standardised input matrix (numeric inputs standardised, factors
one-hot encoded, see :class:`~ngmm_formula.design.NetInput`):

.. math::

    f(x; w) = \gamma^\top x + W_{L+1}\, a(\cdots a(W_1 (x + \epsilon) + c_1) \cdots)
              - \bar f,

with no bias in the output layer and :math:`\bar f` the mean of the network's output over the
training data, so that the intercept lives in the linear part :math:`X\beta`. During training
:math:`\bar f` is absorbed by the intercept; when training ends the network is centred once
(:meth:`MLP.centre`) and the intercept shifted by the same amount, leaving every prediction
unchanged.

**Linear path** :math:`\gamma^\top x`. This is a departure from a plain MLP (the design asks
for "an MLP by default"), written down here as the design asks. The output layer starts at
zero and :math:`\gamma` at the GLMM's coefficients of the standardised inputs
(:func:`~ngmm_formula.train.fit_linear_start`), so training starts from the GLMM in which the
``nn()`` inputs enter linearly, and early stopping shrinks towards that GLMM rather than towards
a model without the inputs (``approx="variational"`` starts :math:`\gamma` at zero and trains
it with the rest). On the binomial synthetic benchmark this start (measured, before
it was built in, as the formula ``nn(x1, x2) + x1 + x2 + ...``) raised the gap closed from
93.5% to 94.5% (known groups, seeds 0-39, without input noise; ``benchmarks/neural/README.md``).
A :math:`\gamma` that starts at zero and is trained gave nothing (93.6% against 93.4% on
seeds 0-19): what helps is starting from the GLMM, not the extra weights.

**Input noise** :math:`\epsilon`. During training (only) the MLP body -- not the linear
path -- sees its standardised numeric inputs perturbed by Gaussian noise of standard deviation
``Control.input_noise`` (0.1 by default; one-hot columns are left alone), drawn by the trainer
(:mod:`~ngmm_formula.train`) so that every process of a distributed fit draws the same noise
for the same row. Training with noisy inputs penalises the network's gradient (Bishop, 1995,
"Training with noise is equivalent to Tikhonov regularization"): the ReLU network's spurious
interactions and edge swings shrink. Evaluation, validation and prediction use clean inputs.

**Additive part** (``nn(..., additive=H)``, :math:`H = 32` by default, 0 for none). Each
standardised numeric input :math:`x_j` also gets a one-input network of :math:`H` ReLU
units (:class:`Additive`), a linear spline with learnt knots:

.. math::

    f(x; w) = \gamma^\top x + \mathrm{MLP}(x + \epsilon)
              + \sum_j \sum_{h=1}^{H} v_{jh} \max(0,\, a_{jh} (x_j + \epsilon_j) + c_{jh})
              - \bar f ,

with :math:`a, c \sim U(-1, 1)` (knots spread over the inputs' range), :math:`v = 0` at
the start (still the GLMM), input noise as for the body, and :math:`v, a, c` trained at
:data:`~ngmm_formula.train.ADDITIVE_LR_SCALE` (10) times the learning rate. Why: a joint
MLP trained by Adam moves every first-layer weight at the same rate, so with many inputs it
fits the noise inputs' random features before it finds the one input that matters, and early
stopping then keeps the GLMM. The additive part learns one-input effects about ten times
faster than the body learns anything; the body is left the interactions. Measured on the
broad benchmark's development seeds 0-2 (``benchmarks/neural/README.md``, "An additive
part"): gap closed on 20 inputs of which 18 are noise from 0 % to 63-91 % (three
families), with 3 noise inputs (binomial) 65 -> 87 %, step effects +2 to +6 points, a
60-level factor beside a numeric input +8 to +26; interactions -1 to -2; 73 of 99
seed-cases improve, the median of 33 cells 93.0 -> 94.3 %. Confirmed on fresh seeds
2000-2009 by a rule written before the run: median gap closed (known / new groups) 92.0 /
90.1 -> 93.4 / 94.0 %, cells ahead of GPBoost 25 / 25 -> 28 / 30 of 33, 239 / 233 of 330
seed-cases improve; linear truth within 0.4 % of the GLMM. It costs :math:`3 H` weights and
:math:`3 H` operations per row and numeric input in each pass; its activations are computed
in chunks of rows and none are kept for the backward pass (its gradient is written out:
:class:`_HingeSum`). Factor inputs (one-hot or embedded) have no additive part.

With ``Control(ensemble=K)`` a term's network is an :class:`Ensemble`: the average of K such
networks trained from different initial weights and validation splits,

.. math::

    f(x) = \frac{1}{K} \sum_{k=1}^{K} f_k(x; w_k) - \bar f ,

which has the same interface (centring, number of weights) as one network.

**Factor inputs as embeddings.** A factor input of kind ``"embedded"``
(:class:`~ngmm_formula.design.NetEncoding`; every factor input of a new fit) arrives as one
column of integer codes. Level :math:`l` of factor :math:`j` enters the body as a learnt
vector :math:`e_{jl} \in \mathbb{R}^{d_j}` (``torch.nn.Embedding``), concatenated with the
standardised numeric inputs, and the linear path as a learnt scalar :math:`\gamma_{jl}`
(the GLMM's per-level coefficient, one-hot dummies of a factor being a per-level scalar):

.. math::

    f(x; w) = \gamma_{\text{num}}^\top x_{\text{num}} + \sum_j \gamma_{j, l_j}
              + W_{L+1}\, a(\cdots a(W_1 [x_{\text{num}} + \epsilon, e_{1 l_1}, \dots]
              + c_1) \cdots) - \bar f .

Memory is :math:`O(n + \text{levels} \times d)` where one-hot columns take
:math:`O(n \times \text{levels})` (a 10,000-level factor over 20,000 rows: 1.6 GB per copy in
float64). The width is :func:`embedding_dim`, :math:`d = \min(16, \mathrm{round}(1.6\,
L^{0.56}))` for :math:`L` levels: fastai's rule of thumb for tabular embeddings (Howard and
Gugger, 2020), capped at 16 -- a quarter of the default hidden width, and at 10,000 levels
160,000 weights, about 8 weights per row on the benchmark of issue 13. The embeddings start
at zero (every level equal, as in the GLMM start), and :math:`\gamma_{jl}` at the GLMM's
per-level coefficients when the factor's dummies fit in the start
(:data:`~ngmm_formula.train.LINEAR_START_COLUMNS` columns in all), else at zero.

*Shrinkage.* Both tables carry a Gaussian prior :math:`N(0, 1)` per entry (the scale of a
standardised input; :meth:`MLP.penalty`), added to the training objective as
:math:`-\tfrac12 \sum_{jl} (\lVert e_{jl} \rVert^2 + \gamma_{jl}^2)` (per observation:
divided by the number of training observations): a level seen in few rows is pulled
towards zero as a random effect is, and a level with no training rows stays at zero.
Row :math:`L` of each table is reserved for levels not in the training data: it is zero and
never trained (``padding_idx``), so a new level is predicted as a level without data, the
shrinkage target. Prediction uses it only with ``allow_new_levels=True`` (else
:class:`~ngmm_formula.errors.NewLevelsError`, as for grouping factors).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch

from ngmm_formula.formula import NNTerm

__all__ = ["MLP", "Additive", "CentredNetwork", "Ensemble", "NETWORKS",
           "EMBEDDING_PRIOR_PRECISION", "additive_label", "embedding_dim", "input_label",
           "make_network", "network_from_data", "network_to_data"]

#: Precision of the Gaussian prior on every entry of an embedding table (module docs).
EMBEDDING_PRIOR_PRECISION = 1.0

#: Largest embedding width :func:`embedding_dim` gives.
MAX_EMBEDDING_DIM = 16


def embedding_dim(levels: int) -> int:
    r"""Width of the embedding of a factor with ``levels`` levels:
    :math:`\min(16, \max(1, \mathrm{round}(1.6\, L^{0.56})))` (module docs): 2 levels -> 2,
    10 -> 6, 60 and more -> 16."""
    return int(min(MAX_EMBEDDING_DIM, max(1, round(1.6 * max(levels, 1) ** 0.56))))

_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "relu": torch.nn.ReLU,
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    "elu": torch.nn.ELU,
    "sigmoid": torch.nn.Sigmoid,
    "softplus": torch.nn.Softplus,
}


class CentredNetwork(torch.nn.Module, abc.ABC):
    """A network whose output is shifted by a stored constant (set once by :meth:`centre`);
    subclasses define :meth:`raw`."""

    centre_value: torch.Tensor

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("centre_value", torch.zeros((), dtype=dtype))

    @abc.abstractmethod
    def raw(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The output before centring, shape (n,); ``noise`` (training only) perturbs the
        inputs of the nonlinear layers."""

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The centred output, shape (n,), in the dtype of the centring constant (float64
        unless the whole fit is float32, so the centred network has mean 0 on the training
        data to double precision)."""
        return self.raw(x, noise).to(self.centre_value.dtype) - self.centre_value

    @torch.no_grad()
    def centre(self, x: torch.Tensor,
               all_sum: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> tuple[float, torch.Tensor]:
        """Centre the output on ``x`` (the training inputs); returns the shift applied and
        the centred output on ``x`` (what :meth:`forward` in evaluation mode now gives, from
        the same pass: one pass over the rows instead of two). ``all_sum`` (a sharded read,
        :meth:`~ngmm_formula.shards.Shard.all_sum`): ``x`` is this process's rows, and the
        mean is of all processes' rows."""
        was = self.training
        self.eval()
        raw = self.raw(x).to(self.centre_value.dtype)
        out = (raw - self.centre_value).double()
        if all_sum is None:
            shift = float(out.mean())
        else:
            total, n = all_sum(np.array([float(out.sum()), out.numel()]))
            shift = float(total / n)
        self.centre_value.add_(shift)
        self.train(was)
        return shift, raw - self.centre_value

    def penalty(self) -> torch.Tensor:
        """Minus the log-prior of the weights that carry one (0 here; the embeddings of
        :class:`MLP`), added to the training loss."""
        return self.centre_value.new_zeros(())

    def fast_parameters(self) -> list[torch.nn.Parameter]:
        """The weights trained at a higher learning rate (the additive part of an
        :class:`MLP`; :data:`~ngmm_formula.train.ADDITIVE_LR_SCALE`); none here."""
        return []

    @property
    def n_weights(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The architecture as plain JSON data (no weights): what :meth:`from_config` needs to
        build the same network, whose :meth:`~torch.nn.Module.load_state_dict` then takes
        this one's ``state_dict()``."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict[str, Any]) -> CentredNetwork:
        """A network of the architecture ``config`` (from :meth:`config`); its weights are
        placeholders until a ``state_dict`` is loaded."""


def _additive_input(x: torch.Tensor, body_in: torch.Tensor, noise: torch.Tensor | None,
                    scale: float, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The additive part's input: ``x`` plus ``scale`` times the body's input noise (the
    body's own input when ``scale`` is 1; ``x`` in the weights' dtype; ``columns``: those of
    the noise that ``x`` holds, all when None). ``scale``: :attr:`MLP.additive_noise_scale`,
    set by the trainer (:func:`~ngmm_formula.train.additive_noise_scale`)."""
    if noise is None or scale == 1.0:
        return body_in
    noise = noise.to(dtype=x.dtype, device=x.device)
    if columns is not None:
        noise = noise.index_select(1, columns.to(noise.device))
    return x + scale * noise


#: Bytes of the buffer of pre-activations :class:`_HingeSum` works in: rows are taken in chunks
#: of this size (a buffer that stays in a core's L2 cache; a whole minibatch's, with many
#: inputs, costs about 1.5x, and a fresh one per call costs about three passes over it).
HINGE_CHUNK_BYTES = 1 << 20


def _pre_activations(z: torch.Tensor, a: torch.Tensor, c: torch.Tensor
                     ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Per chunk of rows: the rows and :math:`a_{jh} z_{nj} + c_{jh}`, shape (rows, m, H),
    computed as the broadcasting formula does (a product, then a sum: two roundings) in one
    buffer reused across chunks. The chunk's rows depend on the shape and dtype only."""
    n, m = z.shape
    per_row = m * a.shape[1] * a.element_size()
    step = max(1, HINGE_CHUNK_BYTES // max(1, per_row))
    buf = torch.empty((min(step, n), *a.shape), dtype=torch.result_type(z, a), device=z.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        pre = buf[:rows.stop - start]
        torch.mul(z[rows].unsqueeze(-1), a, out=pre)
        yield rows, pre.add_(c)


class _HingeSum(torch.autograd.Function):
    r""":math:`y_n = \sum_j \sum_h v_{jh} \max(0, a_{jh} z_{nj} + c_{jh})`, shape (n, 1), the
    forward pass of :class:`Additive`, with its gradient written out so that nothing of shape
    (n, m, H) is kept between the passes or allocated at all: both passes take the rows in
    chunks of :data:`HINGE_CHUNK_BYTES` (:func:`_pre_activations`). Forward: the broadcasting
    formula's operations in its order, in place (the same values bit for bit: each row's sum
    over the contiguous last axis does not depend on the other rows). Backward: only ``z`` and
    the weights are saved; the pre-activations :math:`p = a z + c` are recomputed and, with
    :math:`r_{njh} = g_n [p_{njh} > 0]` (``relu``'s derivative at the kink is 0, as torch's),

    .. math::

        \frac{\partial}{\partial c_{jh}} = v_{jh} S_{jh},\quad
        \frac{\partial}{\partial a_{jh}} = v_{jh} S^z_{jh},\quad
        \frac{\partial}{\partial v_{jh}} = a_{jh} S^z_{jh} + c_{jh} S_{jh}
        \;(= \textstyle\sum_n g_n \max(0, p_{njh})),\quad
        \frac{\partial}{\partial z_{nj}} = g_n \sum_h v_{jh} a_{jh} [p_{njh} > 0],

    with :math:`S = \sum_n r_n` and :math:`S^z = \sum_n r_n z_n`: sums over the leading axis
    per chunk, then over the chunks in order (and over the last axis for :math:`z`), an order
    fixed by the shape and dtype; no BLAS contraction (:func:`~ngmm_formula.model.matvec`).
    Measured (``benchmarks/additive_kernel.py``: one thread, float32, 4,096 rows, 32 units,
    forward and backward): 2 inputs 0.85-0.96 ms against autograd's 1.3-1.7 ms through the
    broadcasting formula, 5 inputs 1.6 against 3.2-3.6, 20 inputs 4.6-5.0 against 16-20
    (``tests/test_additive.py`` checks values and gradients against it). Not twice
    differentiable (nothing in the package differentiates a network twice)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                z: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, a, c, v)
        out = torch.empty((z.shape[0], 1), dtype=torch.result_type(z, a), device=z.device)
        for rows, pre in _pre_activations(z, a, c):
            torch.sum(pre.relu_().mul_(v).flatten(1), -1, keepdim=True, out=out[rows])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, a, c, v = ctx.saved_tensors  # type: ignore[attr-defined]
        want_z = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        grad_z = torch.empty_like(z) if want_z else None
        s, s_z = torch.zeros_like(a), torch.zeros_like(a)
        for rows, pre in _pre_activations(z, a, c):
            if grad_z is not None:
                grad_z[rows] = torch.where(pre > 0, v * a, 0.0).sum(-1) * g[rows]
            r = pre.gt_(0).mul_(g[rows].unsqueeze(-1))  # g_n [p > 0], in the buffer of p
            s += r.sum(0)
            s_z += r.mul_(z[rows].unsqueeze(-1)).sum(0)
        return grad_z, v * s_z, v * s, a * s_z + c * s


class Additive(torch.nn.Module):
    r"""The additive part of an :class:`MLP`: one small ReLU network per numeric input,
    :math:`\sum_j \sum_{h=1}^{H} v_{jh}\, \max(0,\, a_{jh} x_j + c_{jh})`, a linear spline
    in each input with :math:`H` learnt knots (module docs).

    Parameters
    ----------
    numeric : sequence of bool
        Per input column it sees, whether it is a numeric input (only those get a
        subnetwork; one-hot columns are left to the body and the linear path).
    units : int
        :math:`H`, hidden units per numeric input (0: no additive part, no weights).
    dtype : torch.dtype
    """

    columns: torch.Tensor

    def __init__(self, numeric: Sequence[bool], units: int, dtype: torch.dtype):
        super().__init__()
        cols = [j for j, b in enumerate(numeric) if b]
        if units < 0:
            raise ValueError(f"Additive: units must be >= 0, got {units}")
        self.units = int(units) if cols else 0
        self.register_buffer("columns", torch.tensor(cols, dtype=torch.long), persistent=False)
        if self.units:
            shape = (len(cols), self.units)
            self.slope = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
            self.shift = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
            self.weight = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Slopes and shifts uniform on (-1, 1) from torch's global generator (knots
        :math:`-c/a` spread over the standardised inputs' range), output weights zero (the
        part starts at 0: the GLMM start is kept)."""
        if self.units:
            self.slope.uniform_(-1.0, 1.0)
            self.shift.uniform_(-1.0, 1.0)
            self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape (n, 1) from the columns ``x`` (n, len(numeric)); memory O(n x inputs) kept
        for the backward pass and a buffer of :data:`HINGE_CHUNK_BYTES` (:class:`_HingeSum`).
        The sum over inputs and units is an elementwise product summed along the contiguous
        last axis, in an order fixed by the shape (a BLAS contraction's rounding depends on
        memory alignment: :func:`~ngmm_formula.model.matvec`)."""
        z = x.index_select(1, self.columns)
        return cast(torch.Tensor, _HingeSum.apply(z, self.slope, self.shift, self.weight))


class MLP(CentredNetwork):
    r"""Multilayer perceptron without output bias, plus a linear path, with a stored centring
    constant (module docs).

    Parameters
    ----------
    in_features : int
    hidden : tuple of int
    activation : str
    dropout : float
    dtype : torch.dtype
    numeric : sequence of bool, optional
        Which input columns are standardised numeric variables (the ones the trainer's input
        noise perturbs); default all.
    factors : sequence of int, optional
        Per input column, the number of levels of the embedded factor whose codes it holds
        (0: not a code column); default none.
    embed_dims : sequence of int, optional
        Width of each embedded factor's embedding, in column order (default
        :func:`embedding_dim`).
    additive : int
        Hidden units per numeric input of the additive part (:class:`Additive`; 0: none).

    Attributes
    ----------
    body : torch.nn.Sequential
        The layers of the MLP, the output layer last (initialised at zero).
    linear : torch.nn.Linear
        The linear path :math:`\gamma^\top x` of the columns that are not codes (no bias;
        initialised at zero, set to the GLMM's coefficients before training).
    embeddings, level_effects : torch.nn.ModuleList of torch.nn.Embedding
        Per embedded factor: the table of ``levels + 1`` rows that the body sees, and the
        per-level scalars of the linear path; row ``levels`` is the zero "unseen" row.
    """

    dense_columns: torch.Tensor
    code_columns: torch.Tensor

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str,
                 dropout: float, dtype: torch.dtype = torch.float64,
                 numeric: Sequence[bool] | None = None, factors: Sequence[int] | None = None,
                 embed_dims: Sequence[int] | None = None, additive: int = 0):
        super().__init__(dtype)
        self.numeric = tuple(numeric) if numeric is not None else (True,) * in_features
        if len(self.numeric) != in_features:
            raise ValueError(f"MLP: numeric has {len(self.numeric)} entries for "
                             f"{in_features} input columns")
        self.factors = tuple(int(k) for k in factors) if factors is not None else (
            0,) * in_features
        if len(self.factors) != in_features or any(k < 0 for k in self.factors):
            raise ValueError(f"MLP: factors must hold {in_features} level counts >= 0")
        levels = [k for k in self.factors if k]
        dims = ([int(d) for d in embed_dims] if embed_dims is not None
                else [embedding_dim(k) for k in levels])
        if len(dims) != len(levels) or any(d < 1 for d in dims):
            raise ValueError(f"MLP: embed_dims must hold {len(levels)} widths >= 1")
        self.embed_dims = tuple(dims)
        dense = [j for j, k in enumerate(self.factors) if not k]
        codes = [j for j, k in enumerate(self.factors) if k]
        self.register_buffer("dense_columns", torch.tensor(dense, dtype=torch.long),
                             persistent=False)
        self.register_buffer("code_columns", torch.tensor(codes, dtype=torch.long),
                             persistent=False)
        self.embeddings = torch.nn.ModuleList(
            torch.nn.Embedding(k + 1, d, padding_idx=k, dtype=dtype) for k, d in zip(levels, dims))
        self.level_effects = torch.nn.ModuleList(
            torch.nn.Embedding(k + 1, 1, padding_idx=k, dtype=dtype) for k in levels)
        for emb in [*self.tables, *self.level_tables]:
            torch.nn.init.zeros_(emb.weight)  # every level equal at the start: the GLMM
        layers: list[torch.nn.Module] = []
        width = len(dense) + sum(dims)
        for h in hidden:
            layers.append(torch.nn.Linear(width, h, dtype=dtype))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(torch.nn.Dropout(dropout))
            width = h
        out = torch.nn.Linear(width, 1, bias=False, dtype=dtype)
        torch.nn.init.zeros_(out.weight)  # start at f = 0: the GLMM
        layers.append(out)
        self.body = torch.nn.Sequential(*layers)
        self.linear = torch.nn.Linear(len(dense), 1, bias=False, dtype=dtype)
        torch.nn.init.zeros_(self.linear.weight)
        # built after the body, so a network without it starts from the same weights
        self.additive = Additive([self.numeric[j] for j in dense], int(additive), dtype)
        #: the additive part's input noise as a multiple of the body's (training only: no
        #: noise enters a prediction); the trainer sets it by family
        self.additive_noise_scale = 1.0

    @property
    def tables(self) -> list[torch.nn.Embedding]:
        """The embedding tables that the body sees, one per embedded factor."""
        return cast("list[torch.nn.Embedding]", list(self.embeddings))

    @property
    def level_tables(self) -> list[torch.nn.Embedding]:
        """The per-level scalars of the linear path, one table per embedded factor."""
        return cast("list[torch.nn.Embedding]", list(self.level_effects))

    @property
    def in_features(self) -> int:
        """Number of input columns (numeric, one-hot and code columns)."""
        return len(self.numeric)

    def config(self) -> dict[str, Any]:
        linears = [m for m in self.body if isinstance(m, torch.nn.Linear)]
        activations = [name for m in self.body for name, cls in _ACTIVATIONS.items()
                       if type(m) is cls]
        dropouts = [m.p for m in self.body if isinstance(m, torch.nn.Dropout)]
        out = {"in_features": self.in_features,
               "hidden": [lin.out_features for lin in linears[:-1]],
               "activation": activations[0] if activations else "relu",
               "dropout": float(dropouts[0]) if dropouts else 0.0,
               "dtype": _dtype_name(self.linear.weight.dtype),
               "output_dtype": _dtype_name(self.centre_value.dtype),
               "numeric": [bool(b) for b in self.numeric]}
        if any(self.factors):  # absent: a network without embeddings (files before them)
            out["factors"] = list(self.factors)
            out["embed_dims"] = list(self.embed_dims)
        if self.additive.units:  # absent: no additive part (files before it)
            out["additive"] = self.additive.units
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MLP:
        activation = str(config["activation"])
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        factors = config.get("factors")
        dims = config.get("embed_dims")
        net = cls(int(config["in_features"]), tuple(int(h) for h in config["hidden"]),
                  activation, float(config["dropout"]), dtype=_dtype(config["dtype"]),
                  numeric=[bool(b) for b in config["numeric"]],
                  factors=None if factors is None else [int(k) for k in factors],
                  embed_dims=None if dims is None else [int(d) for d in dims],
                  additive=int(config.get("additive", 0)))
        net.centre_value = torch.zeros((), dtype=_dtype(config["output_dtype"]))
        return net

    def __setstate__(self, state: dict) -> None:
        # networks pickled before the linear path existed (model files of 2026-11-24/25),
        # or before embeddings
        super().__setstate__(state)
        first = self.body[0]
        assert isinstance(first, torch.nn.Linear)
        if "linear" not in self._modules:
            self.linear = torch.nn.Linear(first.in_features, 1, bias=False,
                                          dtype=first.weight.dtype)
            torch.nn.init.zeros_(self.linear.weight)
        if "numeric" not in self.__dict__:
            self.numeric = (True,) * first.in_features
        if "factors" not in self.__dict__:
            self.factors = (0,) * len(self.numeric)
            self.embed_dims = ()
            self.embeddings = torch.nn.ModuleList()
            self.level_effects = torch.nn.ModuleList()
            self.register_buffer("dense_columns", torch.arange(len(self.numeric)),
                                 persistent=False)
            self.register_buffer("code_columns", torch.zeros(0, dtype=torch.long),
                                 persistent=False)
        if "additive" not in self._modules:  # before the additive part: none
            self.additive = Additive([], 0, first.weight.dtype)
        if not hasattr(self, "additive_noise_scale"):
            self.additive_noise_scale = 1.0

    @torch.no_grad()
    def reset(self) -> None:
        """New initial weights from torch's global generator (as at construction): PyTorch's
        default initialisation of the hidden layers, zero output layer and embeddings, no
        centring. The linear path (and the per-level scalars) keeps its weights (the GLMM
        start of every member of an ensemble)."""
        linears = [m for m in self.body if isinstance(m, torch.nn.Linear)]
        for lin in linears[:-1]:
            lin.reset_parameters()
        torch.nn.init.zeros_(linears[-1].weight)
        for emb in self.tables:
            torch.nn.init.zeros_(emb.weight)
        self.additive.reset()
        self.centre_value.zero_()

    def fast_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.additive.parameters())

    def penalty(self) -> torch.Tensor:
        r"""Minus the log-prior of the embedding tables, up to a constant:
        :math:`\frac{\lambda}{2} \sum (\lVert e_{jl} \rVert^2 + \gamma_{jl}^2)` with
        :math:`\lambda` = :data:`EMBEDDING_PRIOR_PRECISION` (0 without embedded factors)."""
        total = self.centre_value.new_zeros(())
        for emb in [*self.tables, *self.level_tables]:
            total = total + emb.weight.square().sum().to(total.dtype)
        return 0.5 * EMBEDDING_PRIOR_PRECISION * total

    def raw(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The layers in the weights' dtype and device (``x`` is cast to them: the caller may
        hold float64 inputs for a float32 network); ``noise`` is added to the body's numeric
        input. Code columns are looked up in the embedding tables."""
        w = self.linear.weight
        x = x.to(dtype=w.dtype, device=w.device)
        if not self.embeddings:
            body_in = x if noise is None else x + noise.to(dtype=w.dtype, device=w.device)
            out = self.body(body_in) + self.linear(x)
            if self.additive.units:
                out = out + self.additive(_additive_input(x, body_in, noise,
                                                          self.additive_noise_scale))
            return out.squeeze(-1)  # type: ignore[no-any-return]
        dense = x.index_select(1, self.dense_columns)
        codes = x.index_select(1, self.code_columns).round().long()
        body_dense = dense if noise is None else dense + noise.to(
            dtype=w.dtype, device=w.device).index_select(1, self.dense_columns)
        parts = [body_dense] + [emb(codes[:, j]) for j, emb in enumerate(self.tables)]
        out = self.body(torch.cat(parts, dim=1)) + self.linear(dense)
        if self.additive.units:
            out = out + self.additive(_additive_input(dense, body_dense, noise,
                                                      self.additive_noise_scale,
                                                      self.dense_columns))
        for j, lev in enumerate(self.level_tables):
            out = out + lev(codes[:, j])
        return out.squeeze(-1)  # type: ignore[no-any-return]

    # ------------------------------------------------------------ the linear path as a GLMM
    def linear_columns(self, x: torch.Tensor, expand: bool = True
                       ) -> tuple[torch.Tensor, list[bool]]:
        """The columns of which the linear path is a linear function, for the GLMM start
        (:func:`~ngmm_formula.train.fit_linear_start`), and which of them are numeric: the
        input columns that are not codes, then (with ``expand``) the one-hot dummies of each
        embedded factor's levels, shape (n, :meth:`linear_width`)."""
        dense = x.index_select(1, self.dense_columns.to(x.device))
        numeric = [self.numeric[j] for j in self.dense_columns.tolist()]
        if not expand or not self.embeddings:
            return dense, numeric
        parts = [dense]
        for j, k in zip(self.code_columns.tolist(), [k for k in self.factors if k]):
            codes = x[:, j].round().long()
            parts.append(torch.nn.functional.one_hot(codes.clamp(max=k), k + 1)[:, :k]
                         .to(x.dtype))
            numeric += [False] * k
        return torch.cat(parts, dim=1), numeric

    def linear_width(self, expand: bool = True) -> int:
        """Number of columns of :meth:`linear_columns`."""
        return int(self.dense_columns.numel()) + (sum(self.factors) if expand else 0)

    @torch.no_grad()
    def set_linear(self, coef: torch.Tensor) -> None:
        """Set the linear path to the coefficients ``coef`` of :meth:`linear_columns` (with
        ``expand`` if it has :meth:`linear_width` entries, else the per-level scalars to 0)."""
        n_dense = int(self.dense_columns.numel())
        w = self.linear.weight
        w.copy_(coef[:n_dense].to(w).reshape(1, -1))
        start = n_dense
        for lev in self.level_tables:
            lev.weight.zero_()
            k = lev.num_embeddings - 1
            if coef.numel() >= start + k:
                lev.weight[:k, 0] = coef[start:start + k].to(lev.weight)
            start += k

    def linear_coefficients(self) -> torch.Tensor:
        """The linear path as coefficients of :meth:`linear_columns` (``expand``)."""
        parts = [self.linear.weight.detach().reshape(-1)]
        parts += [lev.weight.detach()[:-1, 0] for lev in self.level_tables]
        return torch.cat(parts)


class Ensemble(CentredNetwork):
    """The average of several trained networks of one ``nn()`` term, centred once.

    Parameters
    ----------
    members : sequence of CentredNetwork
        Trained networks of the same term (uncentred).
    """

    def __init__(self, members: Sequence[CentredNetwork]):
        if not members:
            raise ValueError("Ensemble: members must not be empty")
        super().__init__(members[0].centre_value.dtype)
        self.members = torch.nn.ModuleList(members)

    def config(self) -> dict[str, Any]:
        return {"members": [network_to_data(m) for m in self.members],
                "output_dtype": _dtype_name(self.centre_value.dtype)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Ensemble:
        net = cls([network_from_data(m) for m in config["members"]])
        net.centre_value = torch.zeros((), dtype=_dtype(config["output_dtype"]))
        return net

    def fast_parameters(self) -> list[torch.nn.Parameter]:
        return [p for net in self.members for p in cast(CentredNetwork, net).fast_parameters()]

    def penalty(self) -> torch.Tensor:
        total = self.centre_value.new_zeros(())
        for net in self.members:
            assert isinstance(net, CentredNetwork)
            total = total + net.penalty()
        return total

    def raw(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        total = self.members[0](x, noise)
        for net in self.members[1:]:  # a fixed order: reproducible bit for bit
            total = total + net(x, noise)
        return total / len(self.members)


#: The networks a model file can hold, by stable name (never by module path).
NETWORKS: dict[str, type[CentredNetwork]] = {"MLP": MLP, "Ensemble": Ensemble}

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"a network with weights of dtype {dtype} cannot be described")


def _dtype(name: Any) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPES[name]


def network_to_data(net: torch.nn.Module) -> dict[str, Any]:
    """``{"type": name, "config": architecture}`` of a built-in network (:data:`NETWORKS`).

    Raises
    ------
    TypeError
        For a network of another class (a custom network is code, not data).
    """
    for name, cls in NETWORKS.items():
        if type(net) is cls:
            return {"type": name, "config": net.config()}  # type: ignore[operator]
    raise TypeError(f"a network of type {type(net).__qualname__} is not one of the built-in "
                    f"networks ({', '.join(NETWORKS)})")


def network_from_data(data: dict[str, Any]) -> CentredNetwork:
    """The network described by :func:`network_to_data` (weights not loaded).

    Raises
    ------
    ValueError
        If ``data`` names no built-in network or is malformed.
    """
    name = data.get("type") if isinstance(data, dict) else None
    if not isinstance(name, str) or name not in NETWORKS:
        raise ValueError(f"unknown network type {name!r} (built-in: {', '.join(NETWORKS)})")
    config = data.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"network {name}: its configuration is not a dictionary")
    try:
        return NETWORKS[name].from_config(config)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"network {name}: malformed configuration ({exc})") from None


def input_label(net: torch.nn.Module, width: int) -> str:
    """The input side of a network's architecture for summaries: its number of input
    columns ``width``, or with embedded factors the other columns plus each factor's
    embedding, e.g. ``"1 + 10000x16"`` (levels x width)."""
    while isinstance(net, Ensemble):
        net = net.members[0]
    if not isinstance(net, MLP) or not net.tables:
        return str(width)
    embeds = [f"{t.num_embeddings - 1}x{t.embedding_dim}" for t in net.tables]
    return " + ".join([str(int(net.dense_columns.numel())), *embeds])


def additive_label(net: torch.nn.Module) -> str:
    """The additive part of a network's architecture for summaries, e.g. ``" + additive
    2x32"`` (numeric inputs x units each), or ``""`` without one."""
    while isinstance(net, Ensemble):
        net = net.members[0]
    if not isinstance(net, MLP) or not net.additive.units:
        return ""
    return f" + additive {int(net.additive.columns.numel())}x{net.additive.units}"


def make_network(term: NNTerm, in_features: int, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu", output_dtype: torch.dtype | None = None,
                 numeric: Sequence[bool] | None = None,
                 factors: Sequence[int] | None = None) -> MLP:
    """The network of one ``nn()`` term, with its weights in ``dtype`` on ``device``.

    The weights are initialised on the CPU in float64 from torch's generator and then
    converted, so a seed gives the same starting network whatever the dtype and device.
    ``output_dtype`` (default ``dtype``) is the dtype of the output and of its centring
    constant: float64 weights are not needed for a float64 output. ``numeric`` marks the
    standardised numeric input columns and ``factors`` the code columns of embedded factors
    with their numbers of levels (:class:`MLP`).
    """
    net = MLP(in_features, term.hidden, term.activation, term.dropout, numeric=numeric,
              factors=factors, additive=term.additive)
    net.to(device=device, dtype=dtype)
    net.centre_value = torch.zeros((), dtype=output_dtype or dtype, device=device)
    return net
