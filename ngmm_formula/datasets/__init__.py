r"""Bundled example data sets and a generator of synthetic grouped data.

Bundled data
------------
:func:`load` returns one of the classic mixed-model data sets exactly as R has them (same rows
in the same order, factor levels in R's order, ordered factors ordered), so that reference
values computed with lme4 or glmmTMB line up row for row:

=================  ===========  ==========================
name               rows x cols  R source
=================  ===========  ==========================
``cbpp``           56 x 4       ``lme4::cbpp``
``sleepstudy``     180 x 3      ``lme4::sleepstudy``
``grouseticks``    403 x 7      ``lme4::grouseticks``
``VerbAgg``        7584 x 9     ``lme4::VerbAgg``
``Penicillin``     144 x 3      ``lme4::Penicillin``
``Pastes``         60 x 4       ``lme4::Pastes``
``Dyestuff``       30 x 2       ``lme4::Dyestuff``
``InstEval``       73421 x 7    ``lme4::InstEval``
``Contraception``  1934 x 6     ``mlmRev::Contraception``
``Exam``           4059 x 10    ``mlmRev::Exam``
``Chem97``         31022 x 7    ``mlmRev::Chem97`` (no
                                ``student``: the row number)
``guImmun``        2159 x 13    ``mlmRev::guImmun``
=================  ===========  ==========================

Provenance, citations and licences are in ``datasets/README.md``; the files were written by
``datasets/export_datasets.R``. Besides one CSV per data set (``InstEval.csv.gz`` and
``Chem97.csv.gz`` compressed) the export writes ``columns.csv`` (R's class of every column:
double, integer, factor, ordered) and ``levels.csv`` (every factor's levels in R's order), which
a CSV file cannot carry; :func:`load` uses both to rebuild the frame.

Where the files are found
-------------------------
The repository's top-level ``datasets/`` folder is shipped inside the wheel as the package
``ngmm_formula.datasets.files`` (a ``package-dir`` mapping in ``pyproject.toml``), so the files
are located with ``importlib.resources.files("ngmm_formula.datasets.files")``; in an installed
wheel that is a namespace package (the folder has no ``__init__.py``, so that it never shadows
another distribution's top-level ``datasets`` package). When that package cannot be imported
(a plain checkout that was never installed, and also an editable install, whose setuptools
finder does not map a folder without ``__init__.py``) the top-level ``datasets/`` folder next
to the package, ``Path(__file__).resolve().parents[2] / "datasets"``, is used instead; in both
cases that is the folder the files live in.

Synthetic data
--------------
:func:`simulate_grouped` draws grouped data with a known nonlinear covariate effect, a known
random intercept (and optionally slope) and a Gaussian, Bernoulli or Poisson response, and
returns the true effect and linear predictor alongside the data, for simulation studies and
oracle comparisons.

Its model: for group :math:`j = 1, \dots, J` (``n_groups``) and observation
:math:`i = 1, \dots, m` (``n_per_group``) in it,

.. math::

    x_{1,ij},\, x_{2,ij} \sim U(-2, 2), \qquad x_{3,ij} \sim N(0, 1), \qquad
    b_j \sim N(0, \sigma_b^2), \qquad s_j \sim N(0, \sigma_s^2),

    \eta_{ij} = \beta_0 + f(x_{1,ij}, x_{2,ij}) + 0.5\, x_{3,ij} + b_j + s_j\, x_{3,ij},

all independent, with :math:`\beta_0` = ``intercept``, :math:`\sigma_b` = ``re_sd`` and
:math:`\sigma_s` = ``slope_sd``. The nonlinear effect is centred on the sample,
:math:`f = \tilde f - \overline{\tilde f}`, so that the intercept is identified (as the
package centres its networks). The built-in effects :math:`\tilde f` are

- ``"linear"``: :math:`0.8\, x_1 - 0.5\, x_2`;
- ``"sine"``: :math:`\sin(2 x_1) + 0.5\, x_2^2`;
- ``"interaction"``: :math:`\sin(x_1)\, x_2` (a pure interaction: no additive model in
  :math:`x_1` and :math:`x_2` captures any of it);

each has a standard deviation of roughly 0.9 to 1.1 over the covariate distribution.
The response is

- ``"gaussian"``: :math:`y_{ij} = \eta_{ij} + \varepsilon_{ij}`,
  :math:`\varepsilon_{ij} \sim N(0, \sigma^2)`;
- ``"binomial"``: :math:`y_{ij} \sim \mathrm{Bernoulli}(\operatorname{logit}^{-1}
  \eta_{ij})`;
- ``"poisson"``: :math:`y_{ij} \sim \mathrm{Poisson}(\exp \eta_{ij})`. With the default
  scales :math:`\operatorname{Var}\eta \approx 2` to 2.5, so the mean count is about
  :math:`3\, e^{\beta_0}` and the largest of 40 000 counts is a few hundred.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ngmm_formula.errors import DataError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["available", "load", "simulate_crossed", "simulate_grouped"]

_FILES_PACKAGE = "ngmm_formula.datasets.files"

EffectFunction = Callable[[np.ndarray, np.ndarray], Any]
Effect = str | EffectFunction


# ---------------------------------------------------------------------------------------------
# Bundled data sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    name: str
    type: str  # R's class: "double", "integer", "factor" or "ordered"
    levels: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Spec:
    name: str
    file: str
    columns: tuple[_Column, ...]


def _data_dir() -> Traversable:
    """Folder holding the bundled files (see the module docstring)."""
    try:
        return importlib.resources.files(_FILES_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "datasets"


def _read_rows(folder: Traversable, file: str) -> list[dict[str, str]]:
    entry = folder.joinpath(file)
    if not entry.is_file():
        raise DataError(f"bundled data file {file!r} not found in {folder}")
    return list(csv.DictReader(io.StringIO(entry.read_text(encoding="utf-8"), newline="")))


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, _Spec]:
    """Read ``columns.csv`` and ``levels.csv`` once: lower-cased name → spec."""
    folder = _data_dir()
    levels: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for row in _read_rows(folder, "levels.csv"):
        key = (row["dataset"], row["column"])
        levels.setdefault(key, []).append((int(row["level_position"]), row["level"]))
    columns: dict[str, list[tuple[int, _Column]]] = {}
    for row in _read_rows(folder, "columns.csv"):
        name, column, kind = row["dataset"], row["column"], row["type"]
        if kind not in ("double", "integer", "factor", "ordered"):
            raise DataError(f"columns.csv: unsupported type {kind!r} for {name}${column}")
        lev = tuple(level for _, level in sorted(levels.get((name, column), [])))
        if kind in ("factor", "ordered") and not lev:
            raise DataError(f"levels.csv has no levels for factor {name}${column}")
        columns.setdefault(name, []).append((int(row["position"]), _Column(column, kind, lev)))
    catalogue: dict[str, _Spec] = {}
    for name, cols in columns.items():
        file = f"{name}.csv.gz" if folder.joinpath(f"{name}.csv.gz").is_file() else f"{name}.csv"
        ordered_cols = tuple(col for _, col in sorted(cols, key=lambda pc: pc[0]))
        catalogue[name.lower()] = _Spec(name, file, ordered_cols)
    return catalogue


def available() -> list[str]:
    """Names of the bundled data sets, as spelled in R, sorted case-insensitively.

    Returns
    -------
    list of str
        For example ``["cbpp", "Contraception", "Dyestuff", ...]``.
    """
    return sorted((spec.name for spec in _catalogue().values()), key=str.lower)


def load(name: str) -> pd.DataFrame:
    """Load a bundled data set as R has it.

    Parameters
    ----------
    name : str
        Name of the data set, case-insensitive (``"cbpp"``, ``"contraception"``); see
        :func:`available`.

    Returns
    -------
    pandas.DataFrame
        A new frame on every call (changing it does not affect later calls). Rows are in R's
        order with a default ``RangeIndex``; R factors are ``pandas.Categorical`` with R's
        levels in R's order (``ordered=True`` for R's ordered factors), R doubles are
        ``float64`` and R integers ``int64``.

    Raises
    ------
    DataError
        If ``name`` is not a bundled data set (the message lists the available names) or a
        bundled file is inconsistent with its metadata.

    Examples
    --------
    >>> from ngmm_formula.datasets import load
    >>> cbpp = load("cbpp")
    >>> cbpp.shape
    (56, 4)
    >>> list(cbpp["herd"].cat.categories[:3])
    ['1', '2', '3']
    """
    if not isinstance(name, str):
        raise DataError(f"data set name must be a string, got {type(name).__name__}")
    spec = _catalogue().get(name.lower())
    if spec is None:
        raise DataError(
            f"unknown data set {name!r}; available data sets: {', '.join(available())}"
        )
    dtypes = {
        col.name: (str if col.type in ("factor", "ordered") else
                   "int64" if col.type == "integer" else "float64")
        for col in spec.columns
    }
    entry = _data_dir().joinpath(spec.file)
    with entry.open("rb") as raw:
        payload = raw.read()
    frame = pd.read_csv(
        io.BytesIO(payload),
        dtype=dtypes,  # type: ignore[arg-type]
        compression="gzip" if spec.file.endswith(".gz") else None,
        na_filter=False,
        encoding="utf-8",
    )
    expected = [col.name for col in spec.columns]
    if list(frame.columns) != expected:
        raise DataError(f"{spec.file}: columns {list(frame.columns)} differ from {expected}")
    for col in spec.columns:
        if col.type in ("factor", "ordered"):
            values = frame[col.name].to_numpy(dtype=object)
            cat = pd.Categorical(values, categories=list(col.levels),
                                 ordered=col.type == "ordered")
            if (cat.codes < 0).any():
                bad = sorted(set(values[cat.codes < 0]))[:5]
                raise DataError(f"{spec.file}: column {col.name!r} has values {bad} that "
                                "are not among its levels in levels.csv")
            frame[col.name] = cat
    frame.attrs["name"] = spec.name  # shown as "Data:" in summaries
    return frame


# ---------------------------------------------------------------------------------------------
# Synthetic grouped data
# ---------------------------------------------------------------------------------------------

_FAMILIES = ("gaussian", "binomial", "poisson")
_BETA_X3 = 0.5
_MAX_POISSON_ETA = 20.0  # exp(20) ≈ 4.9e8 expected counts: a mis-scaled simulation


def _effect_linear(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    return 0.8 * x1 - 0.5 * x2


def _effect_sine(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    return np.sin(2.0 * x1) + 0.5 * x2**2


def _effect_interaction(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    return np.sin(x1) * x2


_EFFECTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "linear": _effect_linear,
    "sine": _effect_sine,
    "interaction": _effect_interaction,
}


def _count(value: Any, argument: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {number}")
    return int(number)


def _real(value: object, argument: str, *, positive: bool = False,
          nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{argument} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{argument} must be finite, got {number}")
    if positive and number <= 0:
        raise ValueError(f"{argument} must be > 0, got {number}")
    if nonnegative and number < 0:
        raise ValueError(f"{argument} must be >= 0, got {number}")
    return number


def simulate_grouped(
    n_groups: int = 100,
    n_per_group: int = 20,
    family: str = "gaussian",
    effect: Effect = "sine",
    *,
    intercept: float = 0.0,
    re_sd: float = 1.0,
    slope_sd: float = 0.0,
    sigma: float = 1.0,
    n_noise: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    r"""Simulate grouped data with a known nonlinear covariate effect and random effects.

    The model, :math:`\eta_{ij} = \beta_0 + f(x_{1,ij}, x_{2,ij}) + 0.5\, x_{3,ij} + b_j +
    s_j\, x_{3,ij}` with :math:`f` centred on the sample, the effects and the responses are
    written out in the module docstring (:mod:`ngmm_formula.datasets`, *Synthetic data*).

    Parameters
    ----------
    n_groups : int, default 100
        Number of groups :math:`J` (levels of ``g``), at least 1.
    n_per_group : int, default 20
        Observations per group :math:`m`, at least 1 (the design is balanced).
    family : {"gaussian", "binomial", "poisson"}, default "gaussian"
        Response distribution (case-insensitive).
    effect : {"linear", "sine", "interaction"} or callable, default "sine"
        The nonlinear effect :math:`\tilde f`. A callable receives the arrays ``x1`` and
        ``x2`` and must return a finite array of the same length.
    intercept : float, default 0.0
        :math:`\beta_0`.
    re_sd : float, default 1.0
        Standard deviation :math:`\sigma_b \ge 0` of the random intercept.
    slope_sd : float, default 0.0
        Standard deviation :math:`\sigma_s \ge 0` of the random slope on ``x3``
        (independent of the intercept); 0 means no random slope.
    sigma : float, default 1.0
        Residual standard deviation :math:`\sigma > 0` (used by ``"gaussian"`` only).
    n_noise : int, default 0
        Number of irrelevant covariates ``noise1, noise2, ...`` ~ U(-2, 2) to add.
    seed : int, default 0
        Non-negative seed. The covariates, random effects, noise covariates and response
        draws come from four independent streams of ``numpy.random.SeedSequence(seed)``
        (each used through ``numpy.random.default_rng``), so the same arguments give
        identical data, and changing ``n_noise`` leaves all other columns unchanged.

    Returns
    -------
    pandas.DataFrame
        ``n_groups * n_per_group`` rows sorted by group, with columns

        - ``y``: response (``float64`` for gaussian, ``int64`` otherwise);
        - ``x1``, ``x2``, ``x3``, then ``noise1`` ... ``noise{n_noise}``: covariates;
        - ``g``: grouping factor, categorical with levels ``"g0001"``, ``"g0002"``, ...;
        - ``f_true``: the centred nonlinear effect :math:`f` (usable as an oracle offset);
        - ``eta_true``: the full linear predictor :math:`\eta` including random effects;
        - ``b_true``, ``b_x3_true``: the random intercept :math:`b_j` and slope
          :math:`s_j` of the row's group.

        ``df.attrs`` records the true parameters: ``family``, ``effect`` (the effect's name,
        or the callable's ``__name__``), ``intercept``, ``beta_x3`` (0.5), ``re_sd``,
        ``slope_sd``, ``sigma`` (``None`` unless gaussian), ``n_groups``, ``n_per_group``,
        ``n_noise`` and ``seed``.

    Raises
    ------
    ValueError
        If an argument is invalid (the message names it), the effect callable returns a
        wrong shape or non-finite values, or a Poisson linear predictor exceeds 20 (expected
        counts above :math:`e^{20}`: lower ``intercept`` or the scales).

    Examples
    --------
    >>> from ngmm_formula.datasets import simulate_grouped
    >>> df = simulate_grouped(n_groups=50, n_per_group=10, family="binomial", seed=1)
    >>> df.shape
    (500, 9)
    >>> df.attrs["re_sd"]
    1.0
    """
    n_groups = _count(n_groups, "n_groups", 1)
    n_per_group = _count(n_per_group, "n_per_group", 1)
    n_noise = _count(n_noise, "n_noise", 0)
    seed = _count(seed, "seed", 0)
    intercept = _real(intercept, "intercept")
    re_sd = _real(re_sd, "re_sd", nonnegative=True)
    slope_sd = _real(slope_sd, "slope_sd", nonnegative=True)
    sigma = _real(sigma, "sigma", positive=True)
    if not isinstance(family, str) or family.lower() not in _FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, _FAMILIES))}, "
                         f"got {family!r}")
    effect_fn, effect_name = _effect_function(effect)
    frame = _draw_grouped(n_groups, n_per_group, family.lower(), effect_fn, intercept, re_sd,
                          slope_sd, sigma, n_noise, seed)
    frame.attrs.update(
        family=family.lower(), effect=effect_name, intercept=intercept, beta_x3=_BETA_X3,
        re_sd=re_sd, slope_sd=slope_sd, sigma=sigma if family.lower() == "gaussian" else None,
        n_groups=n_groups, n_per_group=n_per_group, n_noise=n_noise, seed=seed)
    return frame


def _effect_function(effect: Effect) -> tuple[EffectFunction, str]:
    r"""The nonlinear effect :math:`\tilde f` of :func:`simulate_grouped` and its name.

    Parameters
    ----------
    effect : str or callable
        A built-in effect's name (case-insensitive) or a function of ``x1`` and ``x2``.

    Returns
    -------
    function : callable
    name : str
        The built-in name, or the callable's ``__name__`` ("custom" without one).
    """
    if isinstance(effect, str):
        if effect.lower() not in _EFFECTS:
            raise ValueError(f"effect must be a callable or one of "
                             f"{', '.join(map(repr, _EFFECTS))}, got {effect!r}")
        return _EFFECTS[effect.lower()], effect.lower()
    if callable(effect):
        return effect, getattr(effect, "__name__", "custom")
    raise ValueError(f"effect must be a callable or one of "
                     f"{', '.join(map(repr, _EFFECTS))}, got {effect!r}")


def _draw_grouped(n_groups: int, n_per_group: int, family: str, effect_fn: EffectFunction,
                  intercept: float, re_sd: float, slope_sd: float, sigma: float,
                  n_noise: int, seed: int) -> pd.DataFrame:
    r"""Draw the data of :func:`simulate_grouped` from its checked arguments (the same
    names), without ``attrs``.

    Parameters
    ----------
    n_groups, n_per_group, n_noise, seed : int
    family : {"gaussian", "binomial", "poisson"}
    effect_fn : callable
        The effect :math:`\tilde f` (:func:`_effect_function`).
    intercept, re_sd, slope_sd, sigma : float
    """
    n = n_groups * n_per_group
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    rng_x, rng_re, rng_noise, rng_y = streams

    x1 = rng_x.uniform(-2.0, 2.0, n)
    x2 = rng_x.uniform(-2.0, 2.0, n)
    x3 = rng_x.standard_normal(n)
    b = re_sd * rng_re.standard_normal(n_groups)
    s = slope_sd * rng_re.standard_normal(n_groups) + 0.0  # + 0.0 turns -0.0 into 0.0
    noise = rng_noise.uniform(-2.0, 2.0, (n, n_noise))
    group = np.repeat(np.arange(n_groups), n_per_group)

    f_raw = np.asarray(effect_fn(x1.copy(), x2.copy()), dtype=np.float64)
    if f_raw.shape != (n,):
        raise ValueError(f"effect callable must return an array of shape ({n},), "
                         f"got shape {f_raw.shape}")
    if not np.isfinite(f_raw).all():
        raise ValueError("effect callable returned non-finite values")
    f_true = f_raw - f_raw.mean()
    eta = intercept + f_true + _BETA_X3 * x3 + b[group] + s[group] * x3
    y = _draw_response(family, eta, sigma, rng_y)

    width = max(4, len(str(n_groups)))
    labels = [f"g{j + 1:0{width}d}" for j in range(n_groups)]
    columns: dict[str, Any] = {"y": y, "x1": x1, "x2": x2, "x3": x3}
    for k in range(n_noise):
        columns[f"noise{k + 1}"] = noise[:, k]
    columns["g"] = pd.Categorical.from_codes(group, categories=pd.Index(labels))
    columns.update(f_true=f_true, eta_true=eta, b_true=b[group], b_x3_true=s[group])
    return pd.DataFrame(columns)


def _draw_response(family: str, eta: np.ndarray, sigma: float,
                   rng: np.random.Generator) -> np.ndarray:
    """The response of :func:`simulate_grouped` given the linear predictor ``eta``.

    Parameters
    ----------
    family : {"gaussian", "binomial", "poisson"}
    eta : ndarray
    sigma : float
        The residual SD (gaussian only).
    rng : numpy.random.Generator
        The response's stream.
    """
    n = eta.size
    if family == "gaussian":
        return eta + sigma * rng.standard_normal(n)
    if family == "binomial":
        mu = 1.0 / (1.0 + np.exp(-eta))
        return (rng.uniform(size=n) < mu).astype(np.int64)
    if eta.max() > _MAX_POISSON_ETA:
        raise ValueError(f"Poisson linear predictor reaches {eta.max():.3g} (expected "
                         f"count {math.exp(eta.max()):.3g}); lower intercept, re_sd, "
                         "slope_sd or the scale of the effect")
    return rng.poisson(np.exp(eta)).astype(np.int64)


def simulate_crossed(
    n_students: int = 1000,
    n_items: int = 50,
    items_per_student: int = 10,
    family: str = "binomial",
    *,
    intercept: float = -0.5,
    beta_x: float = 0.5,
    student_sd: float = 1.0,
    item_sd: float = 0.5,
    slope_sd: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    r"""Simulate a crossed design (students answering items) with known variance components.

    Student :math:`s` answers ``items_per_student`` items drawn uniformly (with replacement:
    a student may meet an item twice), with a covariate :math:`x \sim N(0, 1)` per response,

    .. math::

        \eta = \beta_0 + \beta_x x + a_s + c_s x + d_{\text{item}}, \qquad
        a_s \sim N(0, \sigma_a^2),\ c_s \sim N(0, \sigma_c^2),\
        d_j \sim N(0, \sigma_d^2),

    all independent (:math:`\sigma_a` = ``student_sd``, :math:`\sigma_c` = ``slope_sd``,
    :math:`\sigma_d` = ``item_sd``); ``y`` is Bernoulli with logit link ("binomial") or
    Poisson with log link ("poisson"). The columns are ``y``, ``x``, ``student`` and
    ``item`` (categoricals); the truth is in ``frame.attrs``, with the SDs (and the item
    mean) of the effects actually drawn (``*_realised``), which is what a fit can recover.
    """
    if family not in ("binomial", "poisson"):
        raise ValueError(f"family must be 'binomial' or 'poisson', got {family!r}")
    for name, value in (("n_students", n_students), ("n_items", n_items),
                        ("items_per_student", items_per_student)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, student_sd, n_students)
    c = rng.normal(0.0, slope_sd, n_students) if slope_sd > 0 else np.zeros(n_students)
    d = rng.normal(0.0, item_sd, n_items)
    student = np.repeat(np.arange(n_students), items_per_student)
    item = rng.integers(0, n_items, student.size)
    x = rng.standard_normal(student.size)
    eta = intercept + beta_x * x + a[student] + c[student] * x + d[item]
    if family == "binomial":
        y = (rng.uniform(size=eta.size) < 1.0 / (1.0 + np.exp(-eta))).astype(np.int64)
    else:
        y = rng.poisson(np.exp(eta)).astype(np.int64)
    frame = pd.DataFrame({
        "y": y, "x": x,
        "student": pd.Categorical.from_codes(student, categories=pd.RangeIndex(n_students)
                                             .astype(str)),
        "item": pd.Categorical.from_codes(item, categories=pd.RangeIndex(n_items).astype(str)),
    })
    frame.attrs.update(family=family, intercept=intercept, beta_x=beta_x,
                       student_sd=student_sd, item_sd=item_sd, slope_sd=slope_sd, seed=seed,
                       student_sd_realised=float(a.std()), item_sd_realised=float(d.std()),
                       item_mean_realised=float(d.mean()))
    return frame
