r"""Response families and link functions: the only family- or link-specific code in the package.

Every approximation (Laplace, adaptive quadrature, the exact Gaussian integral, the variational
bound) and the fitting loop talk to the response distribution only through the :class:`Family`
interface defined here, in the style of gpytorch's likelihoods and glum's distributions:
objects with methods, never flags.

The conditional model is an exponential-dispersion model

.. math::

    y_i \mid \eta_i \sim \mathrm{Family}\bigl(\mu_i = g^{-1}(\eta_i),\ \sigma\bigr),
    \qquad \operatorname{Var}(y_i \mid \eta_i) = \phi\, V(\mu_i) / w_i ,

with link :math:`g`, variance function :math:`V`, dispersion :math:`\phi` and prior weights
:math:`w_i`. The dispersion parameter is called ``sigma`` throughout the package and means what
``sigma()`` means for lme4 and glmmTMB fits:

==================  ===============================  ==========================================
family              ``sigma``                        variance
==================  ===============================  ==========================================
gaussian            residual standard deviation      :math:`\sigma^2 / w`
binomial            none (reported as 1)             :math:`\mu(1-\mu) / m` (``m`` trials)
poisson             none (reported as 1)             :math:`\mu`
negative_binomial   size :math:`k` (NB2; glmmTMB's   :math:`\mu + \mu^2 / k`
                    ``nbinom2`` sigma, glmer.nb's
                    ``theta``)
gamma               coefficient of variation         :math:`\sigma^2 \mu^2`
                    :math:`1/\sqrt{\text{shape}}`
==================  ===============================  ==========================================

Optimisers work with :math:`\log\sigma` (a raw unconstrained parameter); families without
dispersion accept ``log_sigma=None`` and ignore it.

Log-likelihoods carry their full normalising constants (``lgamma`` terms, :math:`\log 2\pi`),
so that summed over observations they equal R's ``dnorm``/``dbinom``/``dpois``/``dnbinom``/
``dgamma`` log densities, and hence the ``logLik`` reported by lme4 and glmmTMB. Conventions
for prior weights :math:`w_i` follow R:

* gaussian: :math:`\log \mathcal N(y; \mu, \sigma^2/w)` (``lm``, ``lmer``; glmmTMB instead
  multiplies the unit log density by ``w``, which differs when weights are not all 1);
* binomial: ``y`` is the proportion of successes and ``w`` the number of trials ``m``
  (R's ``cbind(successes, failures)`` response), so the contribution is
  :math:`\log\binom{m}{my} + my\log p + m(1-y)\log(1-p)`;
* poisson, negative binomial and gamma: the unit log density is multiplied by ``w``
  (R's ``poisson()$aic`` and ``Gamma()$aic``, and glmmTMB for every family).

Derivatives with respect to the linear predictor use the exponential-family identity

.. math::

    \frac{\partial \ell}{\partial \eta} = \frac{w (y - \mu)}{\phi} A(\eta), \qquad
    \frac{\partial^2 \ell}{\partial \eta^2}
        = \frac{w}{\phi}\bigl(-\mu'(\eta) A(\eta) + (y - \mu) A'(\eta)\bigr), \qquad
    A(\eta) = \frac{\mu'(\eta)}{V(\mu(\eta))},

so that the Fisher (IRLS) weight is :math:`E[-\partial^2\ell/\partial\eta^2] = w\mu' A/\phi`.
For a canonical link :math:`A` is constant and the observed and expected information coincide.
Binomial models are differentiated through :math:`\log p` and :math:`\log(1-p)` instead, which
stays finite far into the tails of every probability link.

References
----------
McCullagh, P. and Nelder, J. A. (1989). *Generalized Linear Models*, 2nd ed., ch. 2.
Brooks, M. E. et al. (2017). glmmTMB balances speed and flexibility among packages for
zero-inflated generalized linear mixed modeling. *The R Journal* 9(2), 378--400.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special as sp_special

from ngmm_formula.errors import DataError, NGMMWarning

__all__ = [
    "Binomial",
    "CloglogLink",
    "Family",
    "Gamma",
    "Gaussian",
    "IdentityLink",
    "InverseLink",
    "Link",
    "LogLink",
    "LogitLink",
    "NegativeBinomial",
    "Poisson",
    "ProbabilityLink",
    "ProbitLink",
    "NGMMFamilyWarning",
    "get_family",
    "get_link",
]

Tensor = torch.Tensor

_LOG_2PI = math.log(2.0 * math.pi)
_HALF_LOG_2PI = 0.5 * _LOG_2PI
_LN2 = math.log(2.0)
# Below this t the series of t + expm1(-t) is used (see CloglogLink._t_plus_expm1_neg).
_SERIES_T = 0.05


def _finfo(x: Tensor) -> torch.finfo:
    return torch.finfo(x.dtype if x.is_floating_point() else torch.get_default_dtype())


def _max_log(x: Tensor) -> float:
    """Largest ``eta`` with ``exp(eta)`` finite in ``x``'s dtype (with a margin of one)."""
    return math.log(_finfo(x).max) - 1.0


def _min_log(x: Tensor) -> float:
    """Smallest ``eta`` with ``exp(eta)`` a normal number in ``x``'s dtype."""
    return math.log(_finfo(x).tiny)


def _safe_exp(eta: Tensor) -> Tensor:
    return torch.exp(eta.clamp(max=_max_log(eta)))


def _positive(x: Tensor) -> Tensor:
    """Clamp to the smallest positive normal number (for means that must be positive)."""
    return x.clamp(min=_finfo(x).tiny)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


class Link(ABC):
    r"""A link function :math:`\eta = g(\mu)` and its inverse.

    All methods act elementwise on torch tensors (float32 or float64), are differentiable by
    autograd, and clamp where an input outside the link's domain would otherwise give an
    infinite or NaN value.

    Attributes
    ----------
    name : str
        R's name of the link (``"logit"``, ``"log"``, ...).
    positive_range : bool
        Whether :math:`g^{-1}(\eta) > 0` for every real :math:`\eta` (log and probability
        links); families with a positive mean mark other :math:`\eta` as outside the support.
    """

    name: ClassVar[str]
    positive_range: ClassVar[bool] = False
    __slots__ = ()

    @abstractmethod
    def link(self, mu: Tensor) -> Tensor:
        r"""The link :math:`\eta = g(\mu)`."""

    @abstractmethod
    def inverse(self, eta: Tensor) -> Tensor:
        r"""The inverse link (mean function) :math:`\mu = g^{-1}(\eta)`."""

    @abstractmethod
    def mu_eta(self, eta: Tensor) -> Tensor:
        r"""The derivative :math:`\mu'(\eta) = d\mu / d\eta` (R's ``family$mu.eta``)."""

    @abstractmethod
    def mu_eta2(self, eta: Tensor) -> Tensor:
        r"""The second derivative :math:`\mu''(\eta) = d^2\mu / d\eta^2`."""

    def log_inverse(self, eta: Tensor) -> Tensor:
        r""":math:`\log \mu(\eta)`, computed stably where the link allows it.

        Only meaningful for positive means; a non-positive mean (possible with the identity
        and inverse links) is clamped to the smallest positive normal number, consistently with
        the families' ``mean``.
        """
        return torch.log(_positive(self.inverse(eta)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), ())


class IdentityLink(Link):
    r"""Identity link :math:`\eta = \mu`, :math:`\mu' = 1`, :math:`\mu'' = 0`."""

    name = "identity"
    __slots__ = ()

    def link(self, mu: Tensor) -> Tensor:
        return mu.clone()

    def inverse(self, eta: Tensor) -> Tensor:
        return eta.clone()

    def mu_eta(self, eta: Tensor) -> Tensor:
        return torch.ones_like(eta)

    def mu_eta2(self, eta: Tensor) -> Tensor:
        return torch.zeros_like(eta)


class LogLink(Link):
    r"""Log link :math:`\eta = \log\mu`, :math:`\mu = \mu' = \mu'' = e^\eta`.

    ``exp`` is evaluated with :math:`\eta` clamped below the overflow threshold of the dtype,
    and ``link`` clamps :math:`\mu` to the smallest positive normal number.
    """

    name = "log"
    positive_range = True
    __slots__ = ()

    def link(self, mu: Tensor) -> Tensor:
        return torch.log(_positive(mu))

    def inverse(self, eta: Tensor) -> Tensor:
        return _safe_exp(eta)

    def mu_eta(self, eta: Tensor) -> Tensor:
        return _safe_exp(eta)

    def mu_eta2(self, eta: Tensor) -> Tensor:
        return _safe_exp(eta)

    def log_inverse(self, eta: Tensor) -> Tensor:
        return eta.clone()


class InverseLink(Link):
    r"""Inverse (reciprocal) link :math:`\eta = 1/\mu` (R's ``"inverse"``).

    .. math::

        \mu = 1/\eta, \qquad \mu' = -1/\eta^2, \qquad \mu'' = 2/\eta^3 .
    """

    name = "inverse"
    __slots__ = ()

    def link(self, mu: Tensor) -> Tensor:
        return torch.reciprocal(mu)

    def inverse(self, eta: Tensor) -> Tensor:
        return torch.reciprocal(eta)

    def mu_eta(self, eta: Tensor) -> Tensor:
        return -torch.reciprocal(eta * eta)

    def mu_eta2(self, eta: Tensor) -> Tensor:
        return 2.0 * torch.reciprocal(eta * eta * eta)


class ProbabilityLink(Link):
    r"""A link for a probability :math:`p = \mu \in (0, 1)` (binomial family).

    Besides the mean function these links provide :math:`\log p`, :math:`\log(1-p)` and their
    first two derivatives in :math:`\eta`, each computed without forming :math:`p` or
    :math:`1-p` where that would underflow, and the binomial information per trial

    .. math::

        \mathcal I(\eta) = \frac{\mu'(\eta)^2}{p(1-p)} .
    """

    positive_range = True
    __slots__ = ()

    @abstractmethod
    def log_p(self, eta: Tensor) -> Tensor:
        r""":math:`\log p(\eta)`."""

    @abstractmethod
    def log_q(self, eta: Tensor) -> Tensor:
        r""":math:`\log(1 - p(\eta))`."""

    @abstractmethod
    def dlog_p(self, eta: Tensor) -> Tensor:
        r""":math:`d \log p / d\eta`."""

    @abstractmethod
    def dlog_q(self, eta: Tensor) -> Tensor:
        r""":math:`d \log(1-p) / d\eta`."""

    @abstractmethod
    def d2log_p(self, eta: Tensor) -> Tensor:
        r""":math:`d^2 \log p / d\eta^2`."""

    @abstractmethod
    def d2log_q(self, eta: Tensor) -> Tensor:
        r""":math:`d^2 \log(1-p) / d\eta^2`."""

    @abstractmethod
    def information(self, eta: Tensor) -> Tensor:
        r"""Binomial Fisher information per trial :math:`\mu'(\eta)^2 / (p(1-p))`."""

    def log_inverse(self, eta: Tensor) -> Tensor:
        return self.log_p(eta)

    def log_kernel(self, k: Tensor, m: Tensor, eta: Tensor) -> Tensor:
        r""":math:`k \log p + (m - k) \log(1 - p)` (``k`` successes of ``m`` trials)."""
        return k * self.log_p(eta) + (m - k) * self.log_q(eta)

    def score(self, y: Tensor, m: Tensor, eta: Tensor) -> Tensor:
        r""":math:`m\bigl(y\, (\log p)' + (1-y)(\log(1-p))'\bigr)`, its derivative in
        :math:`\eta` (``y`` the proportion of successes)."""
        return m * (y * self.dlog_p(eta) + (1.0 - y) * self.dlog_q(eta))

    def link(self, mu: Tensor) -> Tensor:
        eps = _finfo(mu).eps
        return self._link(mu.clamp(min=_finfo(mu).tiny, max=1.0 - eps))

    @abstractmethod
    def _link(self, mu: Tensor) -> Tensor: ...


class LogitLink(ProbabilityLink):
    r"""Logit link :math:`\eta = \log\frac{\mu}{1-\mu}`, :math:`p = \operatorname{expit}(\eta)`.

    .. math::

        \log p = -\log(1 + e^{-\eta}), \quad \frac{d\log p}{d\eta} = 1 - p, \quad
        \frac{d\log(1-p)}{d\eta} = -p, \quad
        \frac{d^2\log p}{d\eta^2} = \frac{d^2\log(1-p)}{d\eta^2} = -p(1-p) = -\mu'(\eta).
    """

    name = "logit"
    __slots__ = ()

    def _link(self, mu: Tensor) -> Tensor:
        return torch.logit(mu)

    def inverse(self, eta: Tensor) -> Tensor:
        return torch.sigmoid(eta)

    def mu_eta(self, eta: Tensor) -> Tensor:
        return torch.sigmoid(eta) * torch.sigmoid(-eta)

    def mu_eta2(self, eta: Tensor) -> Tensor:
        p = torch.sigmoid(eta)
        q = torch.sigmoid(-eta)
        return p * q * (q - p)

    def log_p(self, eta: Tensor) -> Tensor:
        return F.logsigmoid(eta)

    def log_q(self, eta: Tensor) -> Tensor:
        return F.logsigmoid(-eta)

    def dlog_p(self, eta: Tensor) -> Tensor:
        return torch.sigmoid(-eta)

    def dlog_q(self, eta: Tensor) -> Tensor:
        return -torch.sigmoid(eta)

    def d2log_p(self, eta: Tensor) -> Tensor:
        return -self.mu_eta(eta)

    def d2log_q(self, eta: Tensor) -> Tensor:
        return -self.mu_eta(eta)

    def information(self, eta: Tensor) -> Tensor:
        return self.mu_eta(eta)

    def log_kernel(self, k: Tensor, m: Tensor, eta: Tensor) -> Tensor:
        r""":math:`k\eta + m \log(1 - p)`, as :math:`\log p = \eta + \log(1-p)`: one
        ``logsigmoid`` instead of two (absolute error a few ulp of :math:`k\eta`)."""
        return k * eta + m * self.log_q(eta)

    def score(self, y: Tensor, m: Tensor, eta: Tensor) -> Tensor:
        r""":math:`m(y - p)`: one sigmoid instead of two (absolute error a few ulp of m)."""
        return m * (y - torch.sigmoid(eta))


def _log_dnorm(x: Tensor) -> Tensor:
    return -0.5 * x * x - _HALF_LOG_2PI


def _mills(x: Tensor) -> Tensor:
    r"""Inverse Mills ratio :math:`r(x) = \varphi(x)/\Phi(x)`, via ``log_ndtr``."""
    return torch.exp(_log_dnorm(x) - torch.special.log_ndtr(x))


class ProbitLink(ProbabilityLink):
    r"""Probit link :math:`\eta = \Phi^{-1}(\mu)`, :math:`p = \Phi(\eta)`.

    With the inverse Mills ratio :math:`r(x) = \varphi(x)/\Phi(x)` (computed from
    ``torch.special.log_ndtr``, so finite far into both tails),

    .. math::

        \frac{d\log p}{d\eta} = r(\eta), \quad
        \frac{d^2\log p}{d\eta^2} = -r(\eta)\bigl(\eta + r(\eta)\bigr), \quad
        \frac{d\log(1-p)}{d\eta} = -r(-\eta), \quad
        \frac{d^2\log(1-p)}{d\eta^2} = -r(-\eta)\bigl(r(-\eta) - \eta\bigr),

    and :math:`\mathcal I(\eta) = \varphi(\eta)^2/(\Phi(\eta)\Phi(-\eta)) = r(\eta) r(-\eta)`.
    """

    name = "probit"
    __slots__ = ()

    def _link(self, mu: Tensor) -> Tensor:
        return torch.special.ndtri(mu)

    def inverse(self, eta: Tensor) -> Tensor:
        return torch.special.ndtr(eta)

    def mu_eta(self, eta: Tensor) -> Tensor:
        return torch.exp(_log_dnorm(eta))

    def mu_eta2(self, eta: Tensor) -> Tensor:
        return -eta * torch.exp(_log_dnorm(eta))

    def log_p(self, eta: Tensor) -> Tensor:
        return torch.special.log_ndtr(eta)

    def log_q(self, eta: Tensor) -> Tensor:
        return torch.special.log_ndtr(-eta)

    def dlog_p(self, eta: Tensor) -> Tensor:
        return _mills(eta)

    def dlog_q(self, eta: Tensor) -> Tensor:
        return -_mills(-eta)

    def d2log_p(self, eta: Tensor) -> Tensor:
        r = _mills(eta)
        return -r * (eta + r)

    def d2log_q(self, eta: Tensor) -> Tensor:
        r = _mills(-eta)
        return -r * (r - eta)

    def information(self, eta: Tensor) -> Tensor:
        return torch.exp(
            2.0 * _log_dnorm(eta) - torch.special.log_ndtr(eta) - torch.special.log_ndtr(-eta)
        )


class CloglogLink(ProbabilityLink):
    r"""Complementary log-log link :math:`\eta = \log(-\log(1-\mu))`.

    With :math:`t = e^\eta`: :math:`p = 1 - e^{-t}`, :math:`\log(1-p) = -t` and

    .. math::

        \log p = \log(1 - e^{-t}), \qquad
        \frac{d\log p}{d\eta} = \frac{t e^{-t}}{1 - e^{-t}} =: s(t), \qquad
        \frac{d^2\log p}{d\eta^2} = -s(t)\,\frac{t - (1 - e^{-t})}{1 - e^{-t}},

        \frac{d\log(1-p)}{d\eta} = \frac{d^2\log(1-p)}{d\eta^2} = -t, \qquad
        \mathcal I(\eta) = t\, s(t), \qquad \mu' = t e^{-t}, \qquad \mu'' = t e^{-t}(1 - t).

    :math:`\log(1-e^{-t})` uses the two-branch ``log1mexp`` of Mächler (2012);
    :math:`t - (1-e^{-t})` uses its Taylor series for small :math:`t` (where the direct
    difference cancels). :math:`\eta` is clamped to the range where :math:`e^\eta` is a finite
    normal number.
    """

    name = "cloglog"
    __slots__ = ()

    @staticmethod
    def _t(eta: Tensor) -> Tensor:
        return torch.exp(eta.clamp(min=_min_log(eta), max=_max_log(eta)))

    @staticmethod
    def _one_minus_exp_neg(t: Tensor) -> Tensor:
        return -torch.expm1(-t)

    @staticmethod
    def _t_plus_expm1_neg(t: Tensor) -> Tensor:
        # t - (1 - exp(-t)) = t^2/2 - t^3/6 + ... ; the series (to t^8) for t < _SERIES_T,
        # where the direct difference would lose up to -log10(t/2) digits.
        small = t < _SERIES_T
        ts = t.clamp(max=_SERIES_T)
        series = (
            ts
            * ts
            * (
                1.0 / 2.0
                - ts
                * (
                    1.0 / 6.0
                    - ts
                    * (
                        1.0 / 24.0
                        - ts
                        * (1.0 / 120.0 - ts * (1.0 / 720.0 - ts * (1.0 / 5040.0 - ts / 40320.0)))
                    )
                )
            )
        )
        tb = t.clamp(min=_SERIES_T)
        direct = tb + torch.expm1(-tb)
        return torch.where(small, series, direct)

    def _link(self, mu: Tensor) -> Tensor:
        return torch.log(-torch.log1p(-mu))

    def inverse(self, eta: Tensor) -> Tensor:
        return self._one_minus_exp_neg(self._t(eta))

    def mu_eta(self, eta: Tensor) -> Tensor:
        t = self._t(eta)
        return t * torch.exp(-t)

    def mu_eta2(self, eta: Tensor) -> Tensor:
        t = self._t(eta)
        return t * torch.exp(-t) * (1.0 - t)

    def log_p(self, eta: Tensor) -> Tensor:
        t = self._t(eta)
        small = t <= _LN2
        ts = t.clamp(max=_LN2)
        tb = t.clamp(min=_LN2)
        return torch.where(small, torch.log(-torch.expm1(-ts)), torch.log1p(-torch.exp(-tb)))

    def log_q(self, eta: Tensor) -> Tensor:
        return -self._t(eta)

    def _s(self, t: Tensor) -> Tensor:
        return t * torch.exp(-t) / self._one_minus_exp_neg(t)

    def dlog_p(self, eta: Tensor) -> Tensor:
        return self._s(self._t(eta))

    def dlog_q(self, eta: Tensor) -> Tensor:
        return -self._t(eta)

    def d2log_p(self, eta: Tensor) -> Tensor:
        t = self._t(eta)
        return -self._s(t) * self._t_plus_expm1_neg(t) / self._one_minus_exp_neg(t)

    def d2log_q(self, eta: Tensor) -> Tensor:
        return -self._t(eta)

    def information(self, eta: Tensor) -> Tensor:
        t = self._t(eta)
        return t * self._s(t)


_LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        IdentityLink(),
        LogLink(),
        LogitLink(),
        ProbitLink(),
        CloglogLink(),
        InverseLink(),
    )
}


def get_link(link: str | Link) -> Link:
    """Return the link called ``link`` (a :class:`Link` is returned as is).

    Raises
    ------
    DataError
        If no link has that name.
    """
    if isinstance(link, Link):
        return link
    key = str(link).strip().lower()
    if key not in _LINKS:
        raise DataError(f"unknown link {link!r}; available: {', '.join(_LINKS)}")
    return _LINKS[key]


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------


def _as_tensor_like(x: Tensor | float | None, like: Tensor) -> Tensor | None:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x.to(dtype=like.dtype, device=like.device)
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _weights_like(weights: Tensor | None, like: Tensor) -> Tensor:
    if weights is None:
        return torch.ones_like(like)
    return weights.to(dtype=like.dtype, device=like.device)


def _first_rows(mask: np.ndarray, limit: int = 3) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" (and {rows.size - limit} more)" if rows.size > limit else ""
    return f"row{'s' if rows.size > 1 else ''} {shown}{more}"


def _first_values(values: np.ndarray, mask: np.ndarray, limit: int = 3) -> str:
    return ", ".join(f"{v:.6g}" for v in values[mask][:limit])


def _near_integer(x: np.ndarray) -> np.ndarray:
    return np.abs(x - np.round(x)) <= 1e-7 * np.maximum(1.0, np.abs(x))


class NGMMFamilyWarning(NGMMWarning):
    """A response that is accepted but probably not what the user meant."""


class Family(ABC):
    r"""A response distribution with its link: the interface every approximation calls.

    Families are immutable values; construct them with a link name (or :class:`Link`), e.g.
    ``Binomial("probit")``, or through :func:`get_family`.

    Attributes
    ----------
    name : str
        ``"gaussian"``, ``"binomial"``, ``"poisson"``, ``"negative_binomial"`` or ``"gamma"``.
    allowed_links : tuple of str
        Names of the links this family accepts; the first is not necessarily the default.
    default_link : str
        The link used when none is given (canonical, except the negative binomial: log).
    canonical_link : str
        The link under which :math:`A(\eta) = \mu'/V(\mu)` is constant.
    has_dispersion : bool
        Whether ``sigma`` is a free parameter.
    sigma_label : str
        What ``sigma`` means for this family, for summaries.

    Parameters
    ----------
    link : str or Link, optional
        The link; ``None`` for :attr:`default_link`.

    Raises
    ------
    DataError
        If the family has no such link.
    """

    name: ClassVar[str]
    allowed_links: ClassVar[tuple[str, ...]]
    default_link: ClassVar[str]
    canonical_link: ClassVar[str]
    has_dispersion: ClassVar[bool]
    sigma_label: ClassVar[str]
    # A(eta) = mu'(eta) / V(mu) under the canonical link (-1 for the Gamma "inverse" link,
    # because R's inverse link is eta = 1/mu while the canonical parameter is -1/mu).
    _canonical_a: ClassVar[float] = 1.0
    # whether canonical_link is the natural parameter's link (see newton_scoring)
    _canonical_natural: ClassVar[bool] = True

    __slots__ = ("_link",)
    _link: Link

    def __init__(self, link: str | Link | None = None) -> None:
        chosen = self.default_link if link is None else link
        name = chosen.name if isinstance(chosen, Link) else str(chosen).strip().lower()
        if name not in self.allowed_links:
            raise DataError(
                f"family {self.name!r} has no link {name!r}; "
                f"allowed: {', '.join(self.allowed_links)}"
            )
        object.__setattr__(self, "_link", get_link(name))

    # -- value semantics -----------------------------------------------------------------------

    @property
    def link(self) -> Link:
        """The :class:`Link` object."""
        return self._link

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} objects are immutable")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} objects are immutable")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(link={self.link.name!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.link == self.link  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, self.link.name))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.link.name,))

    # -- dispersion ------------------------------------------------------------------------------

    def sigma(self, log_sigma: Tensor | float | None) -> float:
        """``sigma`` as reported to users: ``exp(log_sigma)``, or 1 without dispersion."""
        if not self.has_dispersion or log_sigma is None:
            return 1.0
        return float(math.exp(float(log_sigma)))

    def _log_sigma(self, log_sigma: Tensor | float | None, like: Tensor) -> Tensor:
        ls = _as_tensor_like(log_sigma, like)
        if ls is None:
            raise ValueError(f"family {self.name!r} needs log_sigma (its dispersion parameter)")
        return ls

    def _phi(self, log_sigma: Tensor | float | None, like: Tensor) -> Tensor | float:
        r"""The dispersion :math:`\phi` dividing the log-likelihood kernel (1 by default)."""
        return 1.0

    # -- mean and variance -----------------------------------------------------------------------

    def mean(self, eta: Tensor) -> Tensor:
        r"""The conditional mean :math:`\mu = g^{-1}(\eta)`."""
        return self.link.inverse(eta)

    def _log_mean(self, eta: Tensor) -> Tensor:
        return self.link.log_inverse(eta)

    @property
    def newton_scoring(self) -> bool:
        r"""Whether the expected information in :math:`\eta` equals the observed one for
        every response (the canonical link of an exponential family; not the negative
        binomial's log link): Fisher scoring is then Newton's method, and converges
        quadratically near the mode."""
        return self.link.name == self.canonical_link and self._canonical_natural

    @property
    def quadratic(self) -> bool:
        """Whether the log-likelihood is exactly quadratic in eta (Gaussian, identity link):
        one Newton step then finds a conditional mode, and Laplace is exact."""
        return self.name == "gaussian" and self.link.name == "identity"

    def valid_eta(self, eta: Tensor) -> Tensor:
        r"""Boolean mask of the :math:`\eta` inside the family's support.

        R's ``family$valideta`` and ``validmu`` together: :math:`\eta` must be finite, and for
        the Poisson, negative binomial and gamma families with a link whose range is not
        positive (identity, inverse) a finite :math:`g^{-1}(\eta) > 0`. :meth:`log_prob` is
        :math:`-\infty` outside; optimisers should halve steps that leave the support, as
        R's ``glm`` does ("step size truncated: out of bounds").
        """
        return torch.isfinite(eta)

    @abstractmethod
    def _variance_terms(self, mu: Tensor, log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        r"""The variance function :math:`V(\mu)` (without :math:`\phi`) and :math:`V'(\mu)`."""

    @abstractmethod
    def variance(self, mu: Tensor, log_sigma: Tensor | float | None = None) -> Tensor:
        r"""Variance per unit prior weight, :math:`\operatorname{Var}(y) = \phi V(\mu)`."""

    # -- log-likelihood and its derivatives ------------------------------------------------------

    def data_constant(self, y: Tensor, weights: Tensor | None = None) -> Tensor:
        r"""The part of :meth:`log_prob` that depends on the data only (not on eta or sigma),
        e.g. :math:`\log\binom{m}{my}` for the binomial. The engine adds it once per
        evaluation instead of at every quadrature node. Zero unless a family overrides it."""
        return torch.zeros_like(y)

    def log_kernel(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """:meth:`log_prob` minus :meth:`data_constant` (same shape as ``eta``)."""
        return self.log_prob(y, eta, log_sigma, weights) - self.data_constant(y, weights)

    @abstractmethod
    def log_prob(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Per-observation log-likelihood contributions with full normalising constants.

        Parameters
        ----------
        y : Tensor, shape (n,)
            Responses (for the binomial family: proportions of successes).
        eta : Tensor, shape (n,)
            Linear predictor.
        log_sigma : Tensor (0-dim) or float or None
            Log of the dispersion parameter ``sigma``; ignored (may be None) by families
            without dispersion.
        weights : Tensor, shape (n,), optional
            Prior weights (binomial: number of trials); ones if omitted.

        Returns
        -------
        Tensor, shape (n,)
        """

    def _score_terms(
        self, eta: Tensor, log_sigma: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""Return :math:`(\mu, \mu', A, A')` with :math:`A = \mu'/V(\mu)`."""
        link = self.link
        mu = self.mean(eta)
        m1 = link.mu_eta(eta)
        if link.name == self.canonical_link:
            a = torch.full_like(eta, self._canonical_a)
            return mu, m1, a, torch.zeros_like(eta)
        m2 = link.mu_eta2(eta)
        v, dv = self._variance_terms(mu, log_sigma)
        a = m1 / v
        da = m2 / v - m1 * m1 * dv / (v * v)
        return mu, m1, a, da

    def _ls_or_none(self, log_sigma: Tensor | float | None, like: Tensor) -> Tensor | None:
        return self._log_sigma(log_sigma, like) if self.has_dispersion else None

    def dlogp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r"""First derivative of :meth:`log_prob` with respect to :math:`\eta` (elementwise).

        .. math::

            \frac{\partial \ell_i}{\partial \eta_i} = \frac{w_i (y_i - \mu_i)}{\phi} A(\eta_i)

        An analytic torch expression, itself differentiable by autograd.
        """
        w = _weights_like(weights, eta)
        ls = self._ls_or_none(log_sigma, eta)
        mu, _, a, _ = self._score_terms(eta, ls)
        return w * (y - mu) * a / self._phi(ls, eta)

    def d2logp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r"""Second derivative of :meth:`log_prob` with respect to :math:`\eta` (elementwise).

        .. math::

            \frac{\partial^2 \ell_i}{\partial \eta_i^2}
            = \frac{w_i}{\phi}\bigl(-\mu'(\eta_i) A(\eta_i) + (y_i - \mu_i) A'(\eta_i)\bigr)

        (the observed information, with a minus sign). Differentiable by autograd, as the
        Laplace log-determinant requires.
        """
        w = _weights_like(weights, eta)
        ls = self._ls_or_none(log_sigma, eta)
        mu, m1, a, da = self._score_terms(eta, ls)
        return w * (-m1 * a + (y - mu) * da) / self._phi(ls, eta)

    def eta_derivatives(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r""":meth:`dlogp` and :meth:`d2logp` together (families override it where the two
        share work, e.g. one :math:`\mu` for a canonical link)."""
        return self.dlogp(y, eta, log_sigma, weights), self.d2logp(y, eta, log_sigma, weights)

    def d3logp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r"""Third derivative of :meth:`log_prob` with respect to :math:`\eta` (elementwise,
        not differentiable): by autograd on :meth:`d2logp`, or a family's closed form. The
        derivative of the Laplace log-determinant (:mod:`~ngmm_formula.approx.scalar`)
        needs it."""
        with torch.enable_grad():
            e = eta.detach().requires_grad_(True)
            (d3,) = torch.autograd.grad(self.d2logp(y, e, log_sigma, weights).sum(), e)
        return d3

    def fisher_weight(
        self,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r"""Expected information :math:`E[-\partial^2\ell/\partial\eta^2]` (IRLS weight, >= 0).

        .. math::

            W_i = \frac{w_i\, \mu'(\eta_i)^2}{\phi\, V(\mu_i)}
                = \frac{w_i\, \mu'(\eta_i) A(\eta_i)}{\phi}
        """
        w = _weights_like(weights, eta)
        ls = self._ls_or_none(log_sigma, eta)
        _, m1, a, _ = self._score_terms(eta, ls)
        return w * m1 * a / self._phi(ls, eta)

    # -- numpy side: validation, simulation, residuals, starting values -------------------------

    def validate_response(self, y: np.ndarray, weights: np.ndarray, name: str) -> None:
        """Check that ``y`` (with prior ``weights``) is a valid response for this family.

        Parameters
        ----------
        y, weights : ndarray, shape (n,)
            The response as the engine passes it (binomial: proportions, weights = trials).
        name : str
            The response's name in the formula, quoted in error messages.

        Raises
        ------
        DataError
            Naming the response, the offending rows and what was expected.
        """
        y = np.asarray(y, dtype=float)
        w = np.asarray(weights, dtype=float)
        if y.shape != w.shape:
            raise DataError(
                f"response {name!r} has shape {y.shape} but its weights have shape {w.shape}"
            )
        bad = ~np.isfinite(w)
        if bad.any():
            raise DataError(
                f"weights for response {name!r} must be finite; "
                f"{int(bad.sum())} are NaN or infinite ({_first_rows(bad)})"
            )
        bad = w < 0
        if bad.any():
            raise DataError(
                f"weights for response {name!r} must be non-negative; "
                f"{int(bad.sum())} are negative ({_first_rows(bad)}: {_first_values(w, bad)})"
            )
        bad = ~np.isfinite(y)
        if bad.any():
            raise DataError(
                f"{self.name} response {name!r} has {int(bad.sum())} non-finite value"
                f"{'s' if bad.sum() > 1 else ''} (NaN or infinite) at {_first_rows(bad)}"
                f"{self._nonfinite_hint()}"
            )
        self._validate_support(y, w, name)

    # -- data checks before a fit -------------------------------------------------------------

    def check_response_varies(self, y: np.ndarray, weights: np.ndarray, name: str) -> None:
        """Raise when the response leaves nothing to fit (lme4: "Response is constant").

        Only rows with positive weight count. By default a constant response is an error (a
        Gaussian's or Gamma's dispersion would go to zero: the likelihood is unbounded);
        families override :meth:`_degenerate_response` (binomial: all successes or all
        failures; counts: all zero).

        Raises
        ------
        DataError
            Naming the response and the value it is stuck at.
        """
        y = np.asarray(y, dtype=float)[np.asarray(weights, dtype=float) > 0]
        if y.size == 0:
            raise DataError(f"response {name!r}: every row has zero weight")
        reason = self._degenerate_response(y)
        if reason is not None:
            raise DataError(f"{self.name} response {name!r} {reason}; there is nothing to "
                            "fit (lme4: 'Response is constant')")

    def _degenerate_response(self, y: np.ndarray) -> str | None:
        if np.ptp(y) == 0:
            return f"is constant (every value is {y[0]:.6g})"
        return None

    def check_levels(self, terms: Sequence[tuple[str, int, int]], nobs: int) -> None:
        """Raise when random effects cannot be told apart from the residual (lmer's
        ``check.nobs.vs.nlev`` and ``check.nobs.vs.nRE``); only models with a residual
        variance on the linear-predictor scale (Gaussian, identity link) check this, as
        ``glmer`` ignores it by default.

        Parameters
        ----------
        terms : sequence of (grouping factor, number of levels, columns q)
        nobs : int
        """
        return None

    def separation_signs(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        r"""The constraints that make a direction of the fixed effects separate the data.

        Returns, per row, :math:`s_i = +1` (the fit improves as :math:`\eta_i` grows without
        bound), :math:`-1` (as it falls), 0 (the row pins :math:`\eta_i`) or NaN (zero weight:
        no constraint); None when this family cannot have infinite estimates this way (see
        :func:`ngmm_formula.checks.separating_columns`).
        """
        return None

    def _nonfinite_hint(self) -> str:
        return ""

    @abstractmethod
    def _validate_support(self, y: np.ndarray, w: np.ndarray, name: str) -> None: ...

    @abstractmethod
    def simulate(
        self,
        mu: np.ndarray,
        sigma: float | None,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Draw one response per observation from the family at mean ``mu``.

        Rows with zero prior weight carry no information and are returned as ``mu``.
        """

    @abstractmethod
    def _unit_deviance(
        self, y: np.ndarray, mu: np.ndarray, sigma: float | None, w: np.ndarray
    ) -> np.ndarray: ...

    @abstractmethod
    def _variance_np(self, mu: np.ndarray, sigma: float | None) -> np.ndarray: ...

    def deviance_residuals(
        self,
        y: np.ndarray,
        mu: np.ndarray,
        sigma: float | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        r"""Deviance residuals :math:`\operatorname{sign}(y-\mu)\sqrt{d_i}`.

        As R's ``residuals(glm, type = "deviance")``: :math:`d_i` is R's
        ``family$dev.resids(y, mu, wt)`` (not divided by the dispersion). Only the negative
        binomial uses ``sigma`` (its size :math:`k`, as MASS's ``negative.binomial(theta)``).
        """
        y = np.asarray(y, dtype=float)
        mu = np.asarray(mu, dtype=float)
        w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
        d = self._unit_deviance(y, mu, sigma, w)
        return np.sign(y - mu) * np.sqrt(np.maximum(d, 0.0))

    def pearson_residuals(
        self,
        y: np.ndarray,
        mu: np.ndarray,
        sigma: float | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        r"""Pearson residuals :math:`(y-\mu)\sqrt{w}/\sqrt{V(\mu)}`.

        As R's ``residuals(glm, type = "pearson")``: divided by the variance function, not by
        the dispersion (the negative binomial's :math:`V = \mu + \mu^2/k` uses ``sigma = k``).
        """
        y = np.asarray(y, dtype=float)
        mu = np.asarray(mu, dtype=float)
        w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
        return (y - mu) * np.sqrt(w) / np.sqrt(self._variance_np(mu, sigma))

    @abstractmethod
    def _initial_mu(self, y: np.ndarray, w: np.ndarray) -> np.ndarray: ...

    def initial_eta(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """A safe starting linear predictor, :math:`g(\\mu_{start})` as R's ``family$initialize``.

        Returns
        -------
        ndarray of float64, shape (n,)
        """
        y = np.asarray(y, dtype=float)
        w = np.asarray(weights, dtype=float)
        mu = self._initial_mu(y, w)
        eta = self.link.link(torch.as_tensor(mu, dtype=torch.float64))
        return eta.numpy().astype(np.float64)

    def initial_log_sigma(self, y: np.ndarray, mu: np.ndarray, weights: np.ndarray) -> float:
        """A moment estimate of ``log(sigma)`` given fitted means ``mu`` (0 without dispersion)."""
        return 0.0

    def statsmodels_family(self, sigma: float | None = None) -> Any:
        """The matching ``statsmodels.genmod.families`` object with the same link.

        ``sigma`` is used only by the negative binomial (``alpha = 1/sigma``).
        """
        from statsmodels.genmod import families as smf

        links = smf.links
        link_cls = {
            "identity": links.Identity,
            "log": links.Log,
            "logit": links.Logit,
            "probit": links.Probit,
            "cloglog": links.CLogLog,
            "inverse": links.InversePower,
        }[self.link.name]
        return self._statsmodels_family(smf, link_cls(), sigma)

    @abstractmethod
    def _statsmodels_family(self, smf: Any, link: Any, sigma: float | None) -> Any: ...


class _PositiveMeanFamily(Family):
    r"""A family whose mean must be positive (Poisson, negative binomial, gamma).

    With a link whose range is not positive (identity, inverse), :math:`\eta` with
    :math:`g^{-1}(\eta) \le 0` lies outside the support: :meth:`log_prob` is :math:`-\infty`
    there (with a zero, not NaN, gradient), so that line searches and step-halving reject such
    steps, as R's ``glm`` does ("step size truncated: out of bounds"). :meth:`mean` clamps to
    the smallest positive normal number.
    """

    __slots__ = ()

    def mean(self, eta: Tensor) -> Tensor:
        return _positive(self.link.inverse(eta))

    def valid_eta(self, eta: Tensor) -> Tensor:
        valid = torch.isfinite(eta)
        if self.link.positive_range:
            return valid
        mu = self.link.inverse(eta)
        return valid & (mu > 0) & torch.isfinite(mu)

    @abstractmethod
    def _log_prob_in_support(
        self, y: Tensor, eta: Tensor, log_sigma: Tensor | float | None, w: Tensor
    ) -> Tensor:
        """The log-likelihood contributions for eta inside the support."""

    def _log_kernel_in_support(
        self, y: Tensor, eta: Tensor, log_sigma: Tensor | float | None, w: Tensor
    ) -> Tensor:
        """:meth:`_log_prob_in_support` minus the data constant (override to save work)."""
        return self._log_prob_in_support(y, eta, log_sigma, w) - self.data_constant(y, w)

    def log_kernel(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        return self._in_support(self._log_kernel_in_support, y, eta, log_sigma, weights)

    def log_prob(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        return self._in_support(self._log_prob_in_support, y, eta, log_sigma, weights)

    def _in_support(
        self,
        fn: Any,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None,
        weights: Tensor | None,
    ) -> Tensor:
        w = _weights_like(weights, eta)
        if self.link.positive_range:
            return fn(y, eta, log_sigma, w)
        # a NaN eta stays NaN (a bug upstream should not look like a rejected step)
        mu = self.link.inverse(eta)
        valid = ~((mu <= 0) | torch.isinf(mu))
        # evaluate at a harmless eta (mean 1) outside the support, so gradients stay finite
        eta_safe = torch.where(valid, eta, self.link.link(torch.ones_like(eta)))
        lp = fn(y, eta_safe, log_sigma, w)
        return torch.where(valid, lp, torch.full_like(lp, -math.inf))


class Gaussian(Family):
    r"""Normal response, :math:`y \sim \mathcal N(\mu, \sigma^2 / w)`.

    ``sigma`` is the residual standard deviation (lme4's and glmmTMB's ``sigma()``).

    .. math::

        \ell = -\tfrac12\log(2\pi) - \log\sigma + \tfrac12\log w - \frac{w (y-\mu)^2}{2\sigma^2},
        \qquad V(\mu) = 1, \quad \phi = \sigma^2 .

    Observations with zero weight contribute exactly 0. With non-unit weights this is the
    ``lm``/``lmer`` convention (variance :math:`\sigma^2/w`); glmmTMB multiplies the unit log
    density by ``w`` instead.
    """

    name = "gaussian"
    allowed_links = ("identity", "log", "inverse")
    default_link = "identity"
    canonical_link = "identity"
    has_dispersion = True
    sigma_label = "residual standard deviation"
    __slots__ = ()

    def _phi(self, log_sigma: Tensor | float | None, like: Tensor) -> Tensor | float:
        return torch.exp(2.0 * self._log_sigma(log_sigma, like))

    def _variance_terms(self, mu: Tensor, log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        return torch.ones_like(mu), torch.zeros_like(mu)

    def variance(self, mu: Tensor, log_sigma: Tensor | float | None = None) -> Tensor:
        r""":math:`\sigma^2` (constant)."""
        return torch.exp(2.0 * self._log_sigma(log_sigma, mu)) * torch.ones_like(mu)

    def log_prob(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        ls = self._log_sigma(log_sigma, eta)
        w = _weights_like(weights, eta)
        positive = w > 0
        w_safe = torch.where(positive, w, torch.ones_like(w))
        mu = self.mean(eta)
        r = y - mu
        lp = -_HALF_LOG_2PI - ls + 0.5 * torch.log(w_safe) - 0.5 * w * r * r * torch.exp(-2.0 * ls)
        return torch.where(positive, lp, torch.zeros_like(lp))

    def _validate_support(self, y: np.ndarray, w: np.ndarray, name: str) -> None:
        return None

    def check_levels(self, terms: Sequence[tuple[str, int, int]], nobs: int) -> None:
        if not self.quadratic:
            return
        for group, n_levels, _ in terms:
            if n_levels >= nobs:
                raise DataError(
                    f"grouping factor {group!r} has {n_levels} levels for {nobs} observations: "
                    "the number of levels of each grouping factor must be < the number of "
                    "observations, or its variance cannot be told apart from the residual "
                    "variance (as lmer's check.nobs.vs.nlev)")
        total = sum(n_levels * q for _, n_levels, q in terms)
        if total >= nobs:
            names = ", ".join(repr(g) for g, _, _ in terms)
            raise DataError(
                f"the random effects of {names} number {total}, not fewer than the {nobs} "
                "observations: the random-effects variances and the residual variance are "
                "probably unidentifiable (as lmer's check.nobs.vs.nRE)")

    def simulate(
        self,
        mu: np.ndarray,
        sigma: float | None,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Normal draws with standard deviation ``sigma / sqrt(w)`` (R's gaussian simulate)."""
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        s = 1.0 if sigma is None else float(sigma)
        sd = s / np.sqrt(np.where(w > 0, w, 1.0))
        draws = rng.normal(mu, sd)
        return np.where(w > 0, draws, mu)

    def _unit_deviance(
        self, y: np.ndarray, mu: np.ndarray, sigma: float | None, w: np.ndarray
    ) -> np.ndarray:
        return w * (y - mu) ** 2

    def _variance_np(self, mu: np.ndarray, sigma: float | None) -> np.ndarray:
        return np.ones_like(mu)

    def _initial_mu(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self.link.name == "identity":
            return y.copy()
        # log and inverse links need mu > 0 (R would stop: "cannot find valid starting
        # values"); shrink towards the (positive) mean and floor at a small positive value.
        pos = y[(y > 0) & (w > 0)]
        centre = float(pos.mean()) if pos.size else 1.0
        return np.maximum(0.5 * (y + centre), 1e-3 * centre)

    def initial_log_sigma(self, y: np.ndarray, mu: np.ndarray, weights: np.ndarray) -> float:
        r""":math:`\tfrac12\log\bigl(\sum_i w_i (y_i - \mu_i)^2 / n_+\bigr)`, floored."""
        y = np.asarray(y, dtype=float)
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        n = max(int((w > 0).sum()), 1)
        s2 = float(np.sum(w * (y - mu) ** 2)) / n
        scale = float(np.mean(w * y * y)) if y.size else 1.0
        return 0.5 * math.log(max(s2, 1e-8 * max(scale, 1.0)))

    def _statsmodels_family(self, smf: Any, link: Any, sigma: float | None) -> Any:
        return smf.Gaussian(link=link)


class Binomial(Family):
    r"""Binomial response: ``y`` is the proportion of successes out of ``w`` trials.

    .. math::

        \ell = \log\binom{m}{my} + my \log p + m(1-y)\log(1-p),
        \qquad m = w, \quad p = g^{-1}(\eta), \quad V(\mu) = \mu(1-\mu).

    The binomial coefficient is evaluated with ``lgamma`` (no rounding), so for whole
    ``m`` and ``my`` it is R's ``dbinom(m*y, m, p, log = TRUE)`` (the per-observation term of
    ``binomial()$aic``), and for a 0/1 response with fractional case weights ``w <= 1`` it is
    ``w`` times the Bernoulli log-likelihood. :math:`\log p` and :math:`\log(1-p)` come from
    the link's stable expressions (``logsigmoid``, ``log_ndtr``, ``-exp(eta)``), so the
    contributions are finite for :math:`|\eta|` far beyond 40. No dispersion (``sigma`` = 1).
    """

    name = "binomial"
    allowed_links = ("logit", "probit", "cloglog")
    default_link = "logit"
    canonical_link = "logit"
    has_dispersion = False
    sigma_label = "none (fixed at 1)"
    __slots__ = ()

    @property
    def plink(self) -> ProbabilityLink:
        """The link as a :class:`ProbabilityLink`."""
        link = self.link
        assert isinstance(link, ProbabilityLink)
        return link

    def _variance_terms(self, mu: Tensor, log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        return mu * (1.0 - mu), 1.0 - 2.0 * mu

    def variance(self, mu: Tensor, log_sigma: Tensor | float | None = None) -> Tensor:
        r""":math:`\mu(1-\mu)` (per trial)."""
        return mu * (1.0 - mu)

    def log_prob(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        return self.log_kernel(y, eta, log_sigma, weights) + self.data_constant(y, weights)

    def data_constant(self, y: Tensor, weights: Tensor | None = None) -> Tensor:
        r""":math:`\log\binom{m}{my}` (zero for 0/1 data)."""
        m = _weights_like(weights, y)
        k = m * y
        return torch.lgamma(m + 1.0) - torch.lgamma(k + 1.0) - torch.lgamma(m - k + 1.0)

    def log_kernel(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        m = _weights_like(weights, eta)
        return self.plink.log_kernel(m * y, m, eta)

    def dlogp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r""":math:`m\bigl(y\, (\log p)' + (1-y)(\log(1-p))'\bigr)` (= :math:`m(y-p)` for logit),
        the link's :meth:`ProbabilityLink.score`."""
        return self.plink.score(y, _weights_like(weights, eta), eta)

    def d2logp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r""":math:`m\bigl(y\, (\log p)'' + (1-y)(\log(1-p))''\bigr)`."""
        m = _weights_like(weights, eta)
        link = self.plink
        return m * (y * link.d2log_p(eta) + (1.0 - y) * link.d2log_q(eta))

    def eta_derivatives(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Logit link: :math:`m(y - p)` and :math:`-m\,p(1-p)` from one :math:`p` and
        :math:`1-p` (each from its own sigmoid, so neither underflows)."""
        if self.link.name != "logit":
            return super().eta_derivatives(y, eta, log_sigma, weights)
        m = _weights_like(weights, eta)
        p, q = torch.sigmoid(eta), torch.sigmoid(-eta)
        return m * (y * q - (1.0 - y) * p), -(m * p * q)

    def d3logp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r"""Logit link: :math:`-m\,p(1-p)(1-2p)`."""
        if self.link.name != "logit":
            return super().d3logp(y, eta, log_sigma, weights)
        m = _weights_like(weights, eta)
        p, q = torch.sigmoid(eta), torch.sigmoid(-eta)
        return -(m * p * q * (q - p))

    def fisher_weight(
        self,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r""":math:`m\,\mu'(\eta)^2/(p(1-p))`, from the link's stable ``information``."""
        m = _weights_like(weights, eta)
        return m * self.plink.information(eta)

    def _nonfinite_hint(self) -> str:
        return (
            "; a row with zero trials gives the proportion 0/0: drop it or set its proportion to 0"
        )

    def _degenerate_response(self, y: np.ndarray) -> str | None:
        if (y == 1).all():
            return "is a success in every row (all 1)"
        if (y == 0).all():
            return "is a failure in every row (all 0)"
        return None

    def separation_signs(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """+1 for all-success rows, -1 for all-failure rows, 0 for proportions strictly in
        between (a row of cbind counts with successes and failures counts as both)."""
        y = np.asarray(y, dtype=float)
        signs = np.where(y >= 1, 1.0, np.where(y <= 0, -1.0, 0.0))
        return np.where(np.asarray(weights, dtype=float) > 0, signs, np.nan)

    def _validate_support(self, y: np.ndarray, w: np.ndarray, name: str) -> None:
        trials = bool(np.any(w > 1))
        bad = y < 0
        if bad.any():
            raise DataError(
                f"binomial response {name!r} must be a proportion in [0, 1] (or counts given "
                f"as cbind(successes, failures)); {int(bad.sum())} value"
                f"{'s are' if bad.sum() > 1 else ' is'} negative at {_first_rows(bad)}: "
                f"{_first_values(y, bad)} (a success count below zero)"
            )
        bad = y > 1
        if bad.any():
            what = (
                "more successes than trials: a failure count below zero in "
                "cbind(successes, failures)"
                if trials
                else "a 0/1 or proportion response was expected; for counts of successes use "
                "cbind(successes, failures)"
            )
            raise DataError(
                f"binomial response {name!r} must be a proportion in [0, 1]; "
                f"{int(bad.sum())} value{'s exceed' if bad.sum() > 1 else ' exceeds'} 1 at "
                f"{_first_rows(bad)}: {_first_values(y, bad)} ({what})"
            )
        if trials:
            # R's convention (binomial()$aic): if any weight exceeds 1 the weights are
            # numbers of trials, and proportion x trials must count successes.
            k = y * w
            bad = ~_near_integer(k)
            if not bad.any():
                return
            raise DataError(
                f"binomial response {name!r}: the weights are numbers of trials, so "
                f"proportion x trials must be a whole number of successes; it is not at "
                f"{_first_rows(bad)} (successes {_first_values(k, bad)} of trials "
                f"{_first_values(w, bad)})"
            )
        # weights <= 1 are case weights: y should be 0/1 (R only warns, as here)
        bad = (y > 0) & (y < 1)
        if not bad.any():
            return
        warnings.warn(
            f"binomial response {name!r} has non-integer success counts at {_first_rows(bad)} "
            "(proportions without numbers of trials?); give the response as "
            "cbind(successes, failures) or the trials as weights",
            NGMMFamilyWarning,
            stacklevel=2,
        )

    def simulate(
        self,
        mu: np.ndarray,
        sigma: float | None,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Proportions of successes in ``weights`` trials (rounded to whole trials)."""
        mu = np.asarray(mu, dtype=float)
        m = np.rint(np.asarray(weights, dtype=float)).astype(np.int64)
        successes = rng.binomial(np.maximum(m, 0), np.clip(mu, 0.0, 1.0))
        return np.where(m > 0, successes / np.maximum(m, 1), mu)

    def _unit_deviance(
        self, y: np.ndarray, mu: np.ndarray, sigma: float | None, w: np.ndarray
    ) -> np.ndarray:
        return (
            2.0
            * w
            * (
                sp_special.xlogy(y, y)
                - sp_special.xlogy(y, mu)
                + sp_special.xlogy(1.0 - y, 1.0 - y)
                - sp_special.xlogy(1.0 - y, 1.0 - mu)
            )
        )

    def _variance_np(self, mu: np.ndarray, sigma: float | None) -> np.ndarray:
        return mu * (1.0 - mu)

    def _initial_mu(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (w * y + 0.5) / (w + 1.0)

    def _statsmodels_family(self, smf: Any, link: Any, sigma: float | None) -> Any:
        return smf.Binomial(link=link)


class Poisson(_PositiveMeanFamily):
    r"""Poisson counts.

    .. math::

        \ell = w\,\bigl(y\log\mu - \mu - \log\Gamma(y+1)\bigr), \qquad V(\mu) = \mu .

    Prior weights multiply the log-probability, as in R's ``poisson()$aic`` (and glmmTMB);
    for non-integer weights this is a quasi-likelihood (R's ``glm`` does the same, while
    ``simulate`` ignores the weights). Means from the identity link are clamped to be
    positive. No dispersion (``sigma`` = 1).
    """

    name = "poisson"
    allowed_links = ("log", "identity")
    default_link = "log"
    canonical_link = "log"
    has_dispersion = False
    sigma_label = "none (fixed at 1)"
    __slots__ = ()

    def _variance_terms(self, mu: Tensor, log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        return mu, torch.ones_like(mu)

    def variance(self, mu: Tensor, log_sigma: Tensor | float | None = None) -> Tensor:
        r""":math:`\mu`."""
        return mu.clone()

    def _log_prob_in_support(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None,
        w: Tensor,
    ) -> Tensor:
        return self._log_kernel_in_support(y, eta, log_sigma, w) + self.data_constant(y, w)

    def data_constant(self, y: Tensor, weights: Tensor | None = None) -> Tensor:
        r""":math:`-w \log y!`."""
        return -_weights_like(weights, y) * torch.lgamma(y + 1.0)

    def _log_kernel_in_support(
        self, y: Tensor, eta: Tensor, log_sigma: Tensor | float | None, w: Tensor
    ) -> Tensor:
        return w * (y * self._log_mean(eta) - self.mean(eta))

    def eta_derivatives(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Log link: :math:`w(y - \mu)` and :math:`-w\mu` from one :math:`\mu`."""
        if self.link.name != "log":
            return super().eta_derivatives(y, eta, log_sigma, weights)
        w = _weights_like(weights, eta)
        wmu = w * self.link.inverse(eta)
        return w * y - wmu, -wmu

    def d3logp(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        r"""Log link: :math:`-w\mu`."""
        if self.link.name != "log":
            return super().d3logp(y, eta, log_sigma, weights)
        return -(_weights_like(weights, eta) * self.link.inverse(eta))

    def _validate_support(self, y: np.ndarray, w: np.ndarray, name: str) -> None:
        _validate_counts(self.name, y, name)

    def _degenerate_response(self, y: np.ndarray) -> str | None:
        return _no_counts(y)

    def separation_signs(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """Log link: -1 for zero counts (a level with only zeros has an estimate of -inf)."""
        return _count_separation_signs(self.link, y, weights)

    def simulate(
        self,
        mu: np.ndarray,
        sigma: float | None,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Poisson draws; prior weights are ignored (as R's ``poisson()$simulate``)."""
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        return np.where(w > 0, rng.poisson(np.maximum(mu, 0.0)).astype(float), mu)

    def _unit_deviance(
        self, y: np.ndarray, mu: np.ndarray, sigma: float | None, w: np.ndarray
    ) -> np.ndarray:
        return 2.0 * w * (sp_special.xlogy(y, y) - sp_special.xlogy(y, mu) - (y - mu))

    def _variance_np(self, mu: np.ndarray, sigma: float | None) -> np.ndarray:
        return mu.copy()

    def _initial_mu(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        return y + 0.1

    def _statsmodels_family(self, smf: Any, link: Any, sigma: float | None) -> Any:
        return smf.Poisson(link=link)


def _count_separation_signs(link: Link, y: np.ndarray, weights: np.ndarray
                            ) -> np.ndarray | None:
    """Log link: a zero count may fall without bound (-1), a positive one pins eta (0)."""
    if link.name != "log":
        return None
    y = np.asarray(y, dtype=float)
    signs = np.where(y <= 0, -1.0, 0.0)
    return np.where(np.asarray(weights, dtype=float) > 0, signs, np.nan)


def _no_counts(y: np.ndarray) -> str | None:
    return "is zero in every row" if (y == 0).all() else None


def _validate_counts(family: str, y: np.ndarray, name: str) -> None:
    bad = y < 0
    if bad.any():
        raise DataError(
            f"{family} response {name!r} must be non-negative counts; {int(bad.sum())} "
            f"value{'s are' if bad.sum() > 1 else ' is'} negative at {_first_rows(bad)}: "
            f"{_first_values(y, bad)}"
        )
    bad = ~_near_integer(y)
    if bad.any():
        raise DataError(
            f"{family} response {name!r} must be whole-number counts; {int(bad.sum())} "
            f"value{'s are' if bad.sum() > 1 else ' is'} not integer at {_first_rows(bad)}: "
            f"{_first_values(y, bad)}"
        )


class NegativeBinomial(_PositiveMeanFamily):
    r"""Negative binomial counts, quadratic parameterisation (NB2).

    ``sigma`` is the size :math:`k` (glmmTMB's ``nbinom2`` ``sigma()``, ``glmer.nb``'s and
    MASS's ``theta``); larger :math:`k` means less overdispersion.

    .. math::

        \ell = w\Bigl(\log\Gamma(y+k) - \log\Gamma(k) - \log\Gamma(y+1)
               + k\log\frac{k}{k+\mu} + y\log\frac{\mu}{k+\mu}\Bigr),
        \qquad V(\mu) = \mu + \mu^2/k ,

    i.e. R's ``dnbinom(y, size = k, mu = mu, log = TRUE)`` times the prior weight (glmmTMB's
    convention). The two log-ratios are evaluated as :math:`-\operatorname{softplus}` of
    :math:`\pm(\log\mu - \log k)`, exact for any ratio of :math:`\mu` and :math:`k`.
    With the log link and :math:`s = \mu/(k+\mu)`:

    .. math::

        \frac{\partial\ell}{\partial\eta} = w(y-\mu)(1-s), \qquad
        \frac{\partial^2\ell}{\partial\eta^2} = -w(k+y)\,s(1-s), \qquad
        W = w\,\mu(1-s) = \frac{w\,\mu k}{k+\mu}.

    ``statsmodels_family(sigma)`` returns ``NegativeBinomial(alpha=1/sigma)`` (statsmodels'
    :math:`\alpha = 1/k`).
    """

    name = "negative_binomial"
    allowed_links = ("log",)
    default_link = "log"
    canonical_link = "log"  # not canonical in the strict sense; see _score_terms
    _canonical_natural = False
    has_dispersion = True
    sigma_label = "size k (NB2: Var = mu + mu^2/k)"
    __slots__ = ()

    def _variance_terms(self, mu: Tensor, log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        assert log_sigma is not None
        inv_k = torch.exp(-log_sigma)
        return mu + mu * mu * inv_k, 1.0 + 2.0 * mu * inv_k

    def variance(self, mu: Tensor, log_sigma: Tensor | float | None = None) -> Tensor:
        r""":math:`\mu + \mu^2/k`."""
        ls = self._log_sigma(log_sigma, mu)
        return mu + mu * mu * torch.exp(-ls)

    def _score_terms(
        self, eta: Tensor, log_sigma: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert log_sigma is not None
        if not isinstance(self.link, LogLink):  # pragma: no cover - only "log" is allowed
            link = self.link
            mu = self.mean(eta)
            m1, m2 = link.mu_eta(eta), link.mu_eta2(eta)
            v, dv = self._variance_terms(mu, log_sigma)
            return mu, m1, m1 / v, m2 / v - m1 * m1 * dv / (v * v)
        # log link: A = mu'/V = k/(k+mu) = 1 - s, A' = -s(1-s), s = sigmoid(log mu - log k)
        log_mu = self._log_mean(eta)
        mu = self.mean(eta)
        s = torch.sigmoid(log_mu - log_sigma)
        one_minus_s = torch.sigmoid(log_sigma - log_mu)
        return mu, mu, one_minus_s, -s * one_minus_s

    def _log_prob_in_support(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None,
        w: Tensor,
    ) -> Tensor:
        ls = self._log_sigma(log_sigma, eta)
        k = torch.exp(ls)
        log_mu = self._log_mean(eta)
        zero = torch.zeros_like(log_mu)
        lp = (
            torch.lgamma(y + k)
            - torch.lgamma(k)
            - torch.lgamma(y + 1.0)
            - k * torch.logaddexp(log_mu - ls, zero)
            - y * torch.logaddexp(ls - log_mu, zero)
        )
        return w * lp

    def _validate_support(self, y: np.ndarray, w: np.ndarray, name: str) -> None:
        _validate_counts(self.name, y, name)

    def _degenerate_response(self, y: np.ndarray) -> str | None:
        return _no_counts(y)

    def separation_signs(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """Log link: -1 for zero counts (a level with only zeros has an estimate of -inf)."""
        return _count_separation_signs(self.link, y, weights)

    def simulate(
        self,
        mu: np.ndarray,
        sigma: float | None,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """NB2 draws with size ``sigma`` (as ``rnbinom(size = k, mu = mu)``); weights ignored."""
        if sigma is None:
            raise ValueError("the negative binomial family needs sigma (the size k) to simulate")
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        k = float(sigma)
        draws = rng.negative_binomial(k, k / (k + np.maximum(mu, 0.0))).astype(float)
        return np.where(w > 0, draws, mu)

    def _unit_deviance(
        self, y: np.ndarray, mu: np.ndarray, sigma: float | None, w: np.ndarray
    ) -> np.ndarray:
        if sigma is None:
            raise ValueError("the negative binomial deviance needs sigma (the size k)")
        k = float(sigma)
        return (
            2.0
            * w
            * (sp_special.xlogy(y, np.maximum(y, 1.0) / mu) - (y + k) * np.log((y + k) / (mu + k)))
        )

    def _variance_np(self, mu: np.ndarray, sigma: float | None) -> np.ndarray:
        if sigma is None:
            raise ValueError("the negative binomial variance needs sigma (the size k)")
        return mu + mu * mu / float(sigma)

    def _initial_mu(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        return y + 0.1

    def initial_log_sigma(self, y: np.ndarray, mu: np.ndarray, weights: np.ndarray) -> float:
        r"""Moment estimate :math:`1/k = \sum w((y-\mu)^2 - \mu) / \sum w\mu^2`.

        Clamped to :math:`k \in [10^{-3}, 10^{4}]` (an underdispersed start gives
        :math:`k = 10^4`, close to Poisson).
        """
        y = np.asarray(y, dtype=float)
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        denom = float(np.sum(w * mu * mu))
        alpha = float(np.sum(w * ((y - mu) ** 2 - mu))) / denom if denom > 0 else 1.0
        alpha = min(max(alpha, 1e-4), 1e3)
        return -math.log(alpha)

    def _statsmodels_family(self, smf: Any, link: Any, sigma: float | None) -> Any:
        # statsmodels' NB2 has Var = mu + alpha mu^2, i.e. alpha = 1/k; it treats alpha as
        # fixed (known), so the comparison needs k from our fit (default k = 1).
        alpha = 1.0 if sigma is None else 1.0 / float(sigma)
        return smf.NegativeBinomial(link=link, alpha=alpha)


class Gamma(_PositiveMeanFamily):
    r"""Gamma response; ``sigma`` is the coefficient of variation :math:`1/\sqrt{\text{shape}}`.

    With shape :math:`a = 1/\sigma^2` and scale :math:`\mu\sigma^2` (glmmTMB's ``Gamma``
    parameterisation; ``sigma()`` of a glmmTMB fit),

    .. math::

        \ell = w\Bigl(-\log\Gamma(a) + a\log\frac{a}{\mu} + (a-1)\log y - \frac{a y}{\mu}\Bigr),
        \qquad V(\mu) = \mu^2, \quad \phi = \sigma^2,

    i.e. R's ``dgamma(y, shape = 1/sigma^2, scale = mu * sigma^2, log = TRUE)`` times the prior
    weight, which is both glmmTMB's likelihood and the form of R's ``Gamma()$aic`` (which
    lme4's ``glmer`` uses, though with the plug-in dispersion ``deviance/n`` rather than a
    fitted ``sigma``). For ``w = 1`` this is also shape :math:`w/\sigma^2`; for other weights
    the :math:`\mu`-kernel (and hence every derivative in :math:`\eta`) equals that of
    shape :math:`w/\sigma^2`, and only the :math:`\sigma`-dependent constants differ.
    ``simulate`` follows R's ``Gamma()$simulate`` (shape :math:`w/\sigma^2`). The default
    link is ``"inverse"`` (:math:`\eta = 1/\mu`), as R's ``Gamma()``.
    """

    name = "gamma"
    allowed_links = ("inverse", "log", "identity")
    default_link = "inverse"
    canonical_link = "inverse"
    _canonical_a = -1.0
    has_dispersion = True
    sigma_label = "coefficient of variation (1/sqrt(shape))"
    __slots__ = ()

    def _phi(self, log_sigma: Tensor | float | None, like: Tensor) -> Tensor | float:
        return torch.exp(2.0 * self._log_sigma(log_sigma, like))

    def _variance_terms(self, mu: Tensor, log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        return mu * mu, 2.0 * mu

    def variance(self, mu: Tensor, log_sigma: Tensor | float | None = None) -> Tensor:
        r""":math:`\sigma^2\mu^2`."""
        return torch.exp(2.0 * self._log_sigma(log_sigma, mu)) * mu * mu

    def _log_prob_in_support(
        self,
        y: Tensor,
        eta: Tensor,
        log_sigma: Tensor | float | None,
        w: Tensor,
    ) -> Tensor:
        ls = self._log_sigma(log_sigma, eta)
        a = torch.exp(-2.0 * ls)
        log_a = -2.0 * ls
        log_mu = self._log_mean(eta)
        log_y = torch.log(_positive(y))
        y_over_mu = y * torch.exp(-log_mu)
        lp = -torch.lgamma(a) + a * (log_a - log_mu) + (a - 1.0) * log_y - a * y_over_mu
        return w * lp

    def _validate_support(self, y: np.ndarray, w: np.ndarray, name: str) -> None:
        bad = y <= 0
        if bad.any():
            raise DataError(
                f"gamma response {name!r} must be strictly positive; {int(bad.sum())} "
                f"value{'s are' if bad.sum() > 1 else ' is'} zero or negative at "
                f"{_first_rows(bad)}: {_first_values(y, bad)}"
            )

    def simulate(
        self,
        mu: np.ndarray,
        sigma: float | None,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Gamma draws with shape ``w / sigma**2`` and mean ``mu`` (R's ``Gamma()$simulate``)."""
        if sigma is None:
            raise ValueError("the gamma family needs sigma to simulate")
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        shape = np.where(w > 0, w, 1.0) / float(sigma) ** 2
        draws = rng.gamma(shape, mu / shape)
        return np.where(w > 0, draws, mu)

    def _unit_deviance(
        self, y: np.ndarray, mu: np.ndarray, sigma: float | None, w: np.ndarray
    ) -> np.ndarray:
        ratio = np.where(y == 0, 1.0, y / mu)
        return -2.0 * w * (np.log(ratio) - (y - mu) / mu)

    def _variance_np(self, mu: np.ndarray, sigma: float | None) -> np.ndarray:
        return mu * mu

    def _initial_mu(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        return y.copy()

    def initial_log_sigma(self, y: np.ndarray, mu: np.ndarray, weights: np.ndarray) -> float:
        r"""Pearson moment estimate :math:`\tfrac12\log\bigl(\sum w (y-\mu)^2/\mu^2 / n_+\bigr)`."""
        y = np.asarray(y, dtype=float)
        mu = np.asarray(mu, dtype=float)
        w = np.asarray(weights, dtype=float)
        n = max(int((w > 0).sum()), 1)
        cv2 = float(np.sum(w * ((y - mu) / mu) ** 2)) / n
        return 0.5 * math.log(min(max(cv2, 1e-8), 1e4))

    def _statsmodels_family(self, smf: Any, link: Any, sigma: float | None) -> Any:
        return smf.Gamma(link=link)


_FAMILIES: dict[str, type[Family]] = {
    "gaussian": Gaussian,
    "binomial": Binomial,
    "poisson": Poisson,
    "negative_binomial": NegativeBinomial,
    "nbinom2": NegativeBinomial,
    "gamma": Gamma,
}


def get_family(family: str | Family, link: str | None = None) -> Family:
    """Return the :class:`Family` named ``family`` with the given link.

    Parameters
    ----------
    family : str or Family
        ``"gaussian"``, ``"binomial"``, ``"poisson"``, ``"negative_binomial"`` (alias
        ``"nbinom2"``) or ``"gamma"``, case-insensitive; a :class:`Family` is returned as is.
    link : str, optional
        A link name; the family's default link when omitted. Must be None when ``family`` is a
        :class:`Family` object (which already has its link).

    Raises
    ------
    DataError
        For an unknown family, a family/link pair that does not exist, or a link given together
        with a Family object.

    Examples
    --------
    >>> get_family("binomial", "probit")
    Binomial(link='probit')
    >>> get_family("poisson", "probit")
    Traceback (most recent call last):
    ...
    ngmm_formula.errors.DataError: family 'poisson' has no link 'probit'; allowed: log, identity
    """
    if isinstance(family, Family):
        if link is not None:
            raise DataError(
                f"link {link!r} given together with the family object {family!r}, which "
                f"already has a link; pass {type(family).__name__}(link={link!r}) instead"
            )
        return family
    if not isinstance(family, str):
        raise DataError(f"family must be a string or a Family object, not {type(family).__name__}")
    key = family.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _FAMILIES:
        raise DataError(
            f"unknown family {family!r}; available: gaussian, binomial, poisson, "
            "negative_binomial (alias nbinom2), gamma"
        )
    return _FAMILIES[key](link)
