r"""Networks of the ``nn()`` terms.

Each ``nn(x1, ..., hidden=(h_1, ..., h_L), activation=a, dropout=p)`` term becomes a
multilayer perceptron on its standardised input matrix (numeric inputs standardised, factors
one-hot encoded, see :class:`~ngmm_formula.design.NetInput`):

.. math::

    f(x; w) = W_{L+1}\, a(\cdots a(W_1 x + c_1) \cdots) - \bar f,

with no bias in the output layer and :math:`\bar f` the mean of the network's output over the
training data, so that the intercept lives in the linear part :math:`X\beta`. During training
:math:`\bar f` is absorbed by the intercept; when training ends the network is centred once
(:meth:`MLP.centre`) and the intercept shifted by the same amount, leaving every prediction
unchanged.

With ``Control(ensemble=K)`` a term's network is an :class:`Ensemble`: the average of K such
networks trained from different initial weights and validation splits,

.. math::

    f(x) = \frac{1}{K} \sum_{k=1}^{K} f_k(x; w_k) - \bar f ,

which has the same interface (centring, number of weights) as one network.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from ngmm_formula.formula import NNTerm

__all__ = ["MLP", "CentredNetwork", "Ensemble", "make_network"]

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
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The output before centring, shape (n,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The centred output, shape (n,), in the dtype of the centring constant (float64
        unless the whole fit is float32, so the centred network has mean 0 on the training
        data to double precision)."""
        return self.raw(x).to(self.centre_value.dtype) - self.centre_value

    @torch.no_grad()
    def centre(self, x: torch.Tensor) -> float:
        """Centre the output on ``x`` (the training inputs); returns the shift applied."""
        was = self.training
        self.eval()
        shift = float(self.forward(x).double().mean())
        self.centre_value.add_(shift)
        self.train(was)
        return shift

    @property
    def n_weights(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MLP(CentredNetwork):
    """Multilayer perceptron without output bias, with a stored centring constant.

    Parameters
    ----------
    in_features : int
    hidden : tuple of int
    activation : str
    dropout : float
    dtype : torch.dtype
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str,
                 dropout: float, dtype: torch.dtype = torch.float64):
        super().__init__(dtype)
        layers: list[torch.nn.Module] = []
        width = in_features
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

    @torch.no_grad()
    def reset(self) -> None:
        """New initial weights from torch's global generator (as at construction): PyTorch's
        default initialisation of the hidden layers, zero output layer, no centring."""
        linears = [m for m in self.body if isinstance(m, torch.nn.Linear)]
        for lin in linears[:-1]:
            lin.reset_parameters()
        torch.nn.init.zeros_(linears[-1].weight)
        self.centre_value.zero_()

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The layers in the weights' dtype and device (``x`` is cast to them: the caller may
        hold float64 inputs for a float32 network)."""
        w = next(self.parameters())
        return self.body(x.to(dtype=w.dtype, device=w.device)).squeeze(-1)  # type: ignore[no-any-return]


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

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for net in self.members[1:]:  # a fixed order: reproducible bit for bit
            total = total + net(x)
        return total / len(self.members)


def make_network(term: NNTerm, in_features: int, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu", output_dtype: torch.dtype | None = None
                 ) -> MLP:
    """The network of one ``nn()`` term, with its weights in ``dtype`` on ``device``.

    The weights are initialised on the CPU in float64 from torch's generator and then
    converted, so a seed gives the same starting network whatever the dtype and device.
    ``output_dtype`` (default ``dtype``) is the dtype of the output and of its centring
    constant: float64 weights are not needed for a float64 output.
    """
    net = MLP(in_features, term.hidden, term.activation, term.dropout)
    net.to(device=device, dtype=dtype)
    net.centre_value = torch.zeros((), dtype=output_dtype or dtype, device=device)
    return net
