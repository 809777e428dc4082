"""The entry point :func:`ngmm`: a short composition of the stage functions.

``parse_formula`` (formula) -> ``build_design`` (design) -> ``choose_approximation`` ->
``build_problem`` (model) -> :class:`~ngmm_formula.fit.Objective` -> ``optimise`` (fit) ->
``make_result`` (results: :mod:`ngmm_formula.assemble`). Each stage can be called alone;
:func:`objective_at` evaluates the objective at given parameters (lme4's
``devFunOnly = TRUE``). A result's ``refit`` is a :class:`FitCall`, the call as data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ngmm_formula.approx import choose_approximation
from ngmm_formula.approx.variational import (
    Levels,
    VariationalObjective,
    fit_variational,
    profiled_elbo,
)
from ngmm_formula.assemble import Prepared, make_result, variational_result
from ngmm_formula.checks import check_separation
from ngmm_formula.design import (
    Agreement,
    FixedMatrix,
    SparseRows,
    build_design,
    check_reduced_rank_response,
    required_columns,
)
from ngmm_formula.errors import (
    DataError,
    NGMMError,
)
from ngmm_formula.families import Family, get_family
from ngmm_formula.fit import (
    Control,
    Objective,
    glm_start,
    loadings_start,
    optimise,
    profiled,
    theta_start,
    torch_threads,
)
from ngmm_formula.formula import ParsedFormula, parse_formula
from ngmm_formula.io import PARQUET_SUFFIXES, is_data_source, partition_info, read_data, read_shard
from ngmm_formula.model import (
    LinearPredictor,
    Problem,
    build_problem,
    linear_part,
    resolve_device,
)
from ngmm_formula.networks import CentredNetwork, make_network
from ngmm_formula.results import NGMMResult
from ngmm_formula.shards import Shard, agreement, connect, shard_groups, shard_levels
from ngmm_formula.train import (
    TrainingHistory,
    fit_linear_start,
    start_problem,
    train_networks,
    training_approximation,
)

__all__ = ["Control", "ngmm", "objective_at", "prepare"]


def load_data(parsed: ParsedFormula, data: Any, weights: Any = None, offset: Any = None,
              context: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The data frame of a fit: ``data`` itself, or the columns the model uses read from a
    Parquet/CSV file or a pyarrow Dataset (:func:`ngmm_formula.io.read_data`)."""
    if isinstance(data, pd.DataFrame) or not is_data_source(data):
        return data  # build_design names what is wrong with anything else
    cols = required_columns(parsed, with_response=True,
                            context=context if isinstance(context, Mapping) else None)
    cols += [a for a in (weights, offset) if isinstance(a, str)]
    return read_data(data, cols)


def _nonfinite_columns(X: FixedMatrix) -> list[int]:
    """The columns of ``X`` with a NaN or infinite value (a :class:`SparseRows` matrix's
    from its non-zeros)."""
    if isinstance(X, SparseRows):
        return sorted(set(X.columns[~np.isfinite(X.values)].tolist()))
    return [j for j, col in enumerate(X.T) if not np.isfinite(col).all()]


def prepare(formula: str, data: Any, family: str | Family = "gaussian", *,
            approx: str = "auto", nagq: int | None = None, truncation: float | None = None,
            points: int | None = None, weights: Any = None, offset: Any = None,
            reml: bool | None = None, control: Control | None = None,
            device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
            context: Mapping[str, Any] | None = None, agree: Agreement | None = None
            ) -> Prepared:
    """Parse, build the design, validate it against the family and lay out the blocks.

    ``device``, ``dtype`` and ``context`` as :func:`ngmm`; ``data`` a DataFrame, a
    Parquet/CSV path or a pyarrow Dataset. ``agree``: ``data`` is this process's shard of a
    sharded read, and the encodings are agreed with the other processes
    (:class:`~ngmm_formula.design.Agreement`).
    """
    control = control or Control()
    dev, dt = resolve_device(device, dtype)
    fam = get_family(family)
    parsed = parse_formula(formula)
    if not parsed.bars:
        raise DataError(f"no random-effects terms in the formula '{formula}': add one such "
                        "as (1 | group)")
    data = load_data(parsed, data, weights, offset, context)
    design = build_design(parsed, data, binomial=fam.name == "binomial", weights=weights,
                          offset=offset, na_action=control.na_action,  # type: ignore[arg-type]
                          context=context, agree=agree)
    fam.validate_response(design.y, design.weights, design.response_name)
    fam.check_response_varies(design.y, design.weights, design.response_name)
    fam.check_levels([(t.group, t.n_levels, t.dim) for t in design.re_terms], design.nobs)
    check_reduced_rank_response(design)
    check_separation(design, fam, stacklevel=4)
    for j in _nonfinite_columns(design.X)[:1]:
        name = design.fixed_names[j]
        raise DataError(f"fixed-effect column '{name}' has NaN or infinite values")
    n_groups = len(design.grouping_factors)
    block_dim = sum(t.dim for t in design.re_terms)
    gauss_id = fam.name == "gaussian" and fam.link.name == "identity"
    rr = next((t for t in design.re_terms if t.rank is not None), None)
    approximation = choose_approximation(
        approx, nagq=nagq, truncation=truncation, points=points, reml=reml,
        n_grouping_factors=n_groups, block_dim=block_dim, gaussian_identity=gauss_id,
        has_networks=bool(design.nets),
        reduced_rank=None if rr is None else f"rr({rr.expr} | {rr.group}, d = {rr.rank})")
    # networks train in float32 unless a dtype is asked for: twice the arithmetic rate of
    # float64 on a CPU and half the memory traffic, while the integrals stay in float64
    net_dtype = torch.float32 if dtype is None else dt
    problem = build_problem(design, fam, approximation, dtype=dt, device=dev,
                            net_dtype=net_dtype, agree=agree)
    return Prepared(design, fam, approximation, problem)


def objective_at(prepared: Prepared, fixef: np.ndarray | None, theta: np.ndarray,
                 sigma: float | None = None) -> float:
    """The approximate marginal log-likelihood at user-scale parameters.

    ``theta`` in lme4's convention (relative to sigma for Gaussian identity models);
    ``fixef`` on the user's scale (ignored under REML, where beta is integrated out).
    ``-2 *`` this value is lme4's deviance function at the same parameters. For
    ``approx="variational"`` it is the ELBO maximised over the variational parameters
    (:func:`~ngmm_formula.approx.variational.profiled_elbo`), a lower bound.
    """
    module = _module(prepared)
    with torch.no_grad():
        if fixef is not None and not prepared.problem.reml:
            beta_s = np.linalg.solve(prepared.problem.standardisation.A, np.asarray(fixef))
            module.beta.copy_(torch.as_tensor(beta_s, dtype=module.beta.dtype))
        scale = sigma if prepared.approximation.kind == "exact" and sigma else 1.0
        module.theta.copy_(torch.as_tensor(np.asarray(theta, dtype=float) * scale,
                                           dtype=module.theta.dtype))
        if module.log_sigma is not None:
            if sigma is None:
                raise NGMMError(f"family {prepared.family.name} needs sigma")
            module.log_sigma.fill_(float(np.log(sigma)))
    if prepared.approximation.kind == "variational":
        return profiled_elbo(prepared.problem, prepared.family, module)
    obj = Objective(prepared.problem, prepared.family, prepared.approximation, module)
    with torch.no_grad():
        return float(obj())


@dataclass(frozen=True)
class FitCall:
    """The call that made a result, as data: ``fit.refit(reml=False)`` is
    ``ngmm(formula, data, family, **options, reml=False)`` (lme4 keeps the call and the model
    frame for ``refitML`` likewise).

    ``data`` is the fit's own copy of the caller's DataFrame (a shallow copy: pandas'
    copy-on-write keeps it as it was when the caller's frame changes later, without copying
    the columns now), or the path or dataset the data were read from; a result holds no
    reference to the caller's DataFrame.
    """

    formula: str
    data: Any = field(repr=False)
    family: str | Family
    options: Mapping[str, Any] = field(default_factory=dict)
    #: the entry point called again (:func:`ngmm`, or
    #: :func:`~ngmm_formula.distributed.fit_distributed` for its results)
    fitter: Callable[..., NGMMResult] | None = field(default=None, repr=False)

    def __call__(self, **changes: Any) -> NGMMResult:
        fitter = ngmm if self.fitter is None else self.fitter
        return fitter(self.formula, self.data, self.family, **{**self.options, **changes})


def own_copy(data: Any) -> Any:
    """A new DataFrame object over the same columns (copy-on-write), or ``data`` itself when
    it is a file name or a dataset."""
    return data.copy(deep=False) if isinstance(data, pd.DataFrame) else data


def _nets(module: LinearPredictor) -> tuple[CentredNetwork, ...]:
    return tuple(n for n in module.nets if isinstance(n, CentredNetwork))


def _module(prepared: Prepared) -> LinearPredictor:
    pr = prepared.problem
    nets = tuple(make_network(ni.term, ni.X.shape[1], dtype=x.dtype, device=x.device,
                              output_dtype=pr.y.dtype,
                              numeric=[e.kind == "numeric" for e in ni.encodings
                                       for _ in e.columns],
                              factors=[len(e.levels) if e.kind == "embedded" else 0
                                       for e in ni.encodings for _ in e.columns])
                 for ni, x in zip(prepared.design.nets, pr.net_X))
    return LinearPredictor(pr, prepared.family.has_dispersion, nets)


def ngmm(formula: str, data: Any, family: str | Family = "gaussian", *,
         approx: str = "auto", nagq: int | None = None, truncation: float | None = None,
         points: int | None = None, weights: Any = None, offset: Any = None,
         reml: bool | None = None, control: Control | None = None, seed: int = 0,
         device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         distributed: bool = False, context: Mapping[str, Any] | None = None) -> NGMMResult:
    """Fit a (neural) generalized linear mixed model.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"use ~ age + urban + (1 + urban | district)"``; ``nn(...)``
        terms add neural networks to the linear predictor.
    data : DataFrame, str, os.PathLike or pyarrow.dataset.Dataset
        A DataFrame (never modified), or a Parquet file (or folder of Parquet files), a CSV
        file or a pyarrow Dataset, of which only the columns the model uses are read, batch
        by batch (:func:`ngmm_formula.io.read_data`).
    family : str or Family
        "gaussian", "binomial", "poisson", "negative_binomial", "gamma", or a Family object
        (e.g. ``get_family("binomial", "probit")``).
    approx : {"auto", "laplace", "agq", "truncated", "variational"}
        How the random effects are integrated out (see :mod:`ngmm_formula.approx`).
    nagq : int, optional
        Gauss--Hermite nodes per dimension for ``approx="agq"`` (lme4's nAGQ).
    truncation, points : float, int, optional
        ``M`` and ``K`` of the truncated rule.
    weights, offset : array, column name or None
    reml : bool, optional
        REML for linear Gaussian models (default True there, as lmer).
    control : Control
    seed : int
        Seeds torch for anything random in the fit.
    device : str or torch.device
        ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"`` or ``"mps"``: where the parameters,
        the data tensors and every evaluation of the objective live. Results are returned on
        the CPU.
    dtype : {"float32", "float64"}, optional
        Floating point precision. Default: on the CPU the integrals and the linear and
        variance parameters in float64 (the reference precision, agreeing with lme4 to
        1e-6) and the networks in float32; on a GPU everything in float32. An explicit
        dtype applies to everything.
    distributed : bool
        Data-parallel fit over the processes of a :mod:`torch.distributed` process group
        (started from ``torchrun``'s environment if not yet initialised; gloo on the CPU, nccl
        on CUDA): each process evaluates a contiguous range of the groups and values and
        gradients are all-reduced, so every process returns the same result, equal to the
        one-process fit up to the order of summation (with ``Control.folds`` given: the
        default trains one validation split in a distributed fit, five folds in one process
        on up to 10,000 training rows, :func:`~ngmm_formula.train.folds_for`). Call it on
        every process with the same arguments; models with one grouping factor, or crossed
        and nested ones with ``approx="variational"`` (each process evaluates the rows of a
        range of the largest factor's levels; see :mod:`ngmm_formula.shards`, and
        :func:`ngmm_formula.fit_distributed` for local worker processes and the
        ``torchrun`` commands for several machines). With ``data`` the path of a Parquet
        file or dataset (e.g. written by :func:`ngmm_formula.io.write_partitioned`) a model
        with one grouping factor, ``nn()`` terms or not, is read shard by shard: each
        process reads only its own groups' rows (:func:`ngmm_formula.io.read_shard`) and
        the encodings are agreed across processes; the result's ``design``, ``ranef`` and
        ``predict()`` then hold this process's rows and groups, ``nobs`` and the estimates
        all.
    context : mapping, optional
        Extra names the formula may use, e.g. ``{"winsor": my_function, "k": 3.0}`` for
        ``y ~ winsor(x) + I(x * k) + (1 | g)`` (patsy's ``eval_env``, formulaic's
        ``context``). The formula is evaluated on the data as Python expressions (as in patsy
        and R), restricted to the data's columns, the formula transforms
        (:data:`ngmm_formula.safety.TRANSFORMS`: ``log``, ``sqrt``, ``scale``, ``poly``,
        ``C``, ``I``, ``np.<f>``, ...) and these names; the caller's variables are never
        visible, and dunder names and attributes are refused before anything is evaluated.
        ``predict`` reuses the context of the fit; a model file keeps it only as far as its
        format can store functions (re-fit, or predict in the session that fitted, otherwise).

    Returns
    -------
    NGMMResult

    Raises
    ------
    FormulaError
        A malformed formula, a name that is neither a column, a transform nor a ``context``
        name, or an expression that reaches Python's internals.
    """
    control = Control() if control is None else control
    if not isinstance(control, Control):
        raise NGMMError(f"control must be a Control object (e.g. control=Control(max_iter="
                        f"500)), got {type(control).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise NGMMError(f"seed must be a whole number, got {seed!r} ({type(seed).__name__})")
    with torch_threads(control.threads):
        return _ngmm(formula, data, family, approx=approx, nagq=nagq, truncation=truncation,
                     points=points, weights=weights, offset=offset, reml=reml, control=control,
                     seed=seed, device=device, dtype=dtype, distributed=distributed,
                     context=context)


def _ngmm(formula: str, data: Any, family: str | Family, *, approx: str,
          nagq: int | None, truncation: float | None, points: int | None, weights: Any,
          offset: Any, reml: bool | None, control: Control, seed: int,
          device: str | torch.device, dtype: str | torch.dtype | None = None,
          distributed: bool = False, context: Mapping[str, Any] | None = None) -> NGMMResult:
    torch.manual_seed(seed)
    if distributed and approx == "variational" and sharded_source(data):
        raise NGMMError("a sharded read (distributed=True with a Parquet path) is not "
                        "available with approx='variational': its crossed factors cannot be "
                        "split by the rows of one; pass the data frame (every process reads "
                        "all rows and evaluates its share of them)")
    if distributed:
        device = connect(str(device))
    source = data
    agree = None
    if distributed and sharded_source(data):  # each process reads its own groups' rows
        data, agree = _read_own_shard(parse_formula(formula), data, weights, offset, context,
                                      str(device))
    data = load_data(parse_formula(formula), data, weights, offset, context)
    data_name = getattr(data, "attrs", {}).get("name") if isinstance(data, pd.DataFrame) else None
    prepared = prepare(formula, data, family, approx=approx, nagq=nagq, truncation=truncation,
                       points=points, weights=weights, offset=offset, reml=reml,
                       control=control, device=device, dtype=dtype, context=context,
                       agree=agree)

    refit = FitCall(formula, own_copy(source), family, dict(
        approx=approx, nagq=nagq, truncation=truncation, points=points, weights=weights,
        offset=offset, reml=reml, control=control, seed=seed, device=device, dtype=dtype,
        distributed=distributed, context=context))

    if prepared.approximation.kind == "variational":
        return _ngmm_variational(prepared, control, seed, formula=formula,
                                 data_name=data_name, refit=refit, distributed=distributed)
    # this process's range of groups in a distributed fit (None: all groups, one process)
    shard = (shard_groups(prepared.problem, prepared.approximation,
                          len(prepared.design.grouping_factors), presharded=agree is not None)
             if distributed else None)
    module = _module(prepared)
    pr, fam = prepared.problem, prepared.family
    obj = Objective(pr, fam, prepared.approximation, module, shard=shard)
    # the GLMM part (the networks' output is 0 at initialisation): the same parameters
    # without evaluating the networks, which would only cost time
    glmm_obj = (Objective(pr, fam, prepared.approximation, linear_part(module, pr),
                          shard=shard)
                if module.nets else obj)
    near = False  # the start is near the optimum (reduced-rank loadings: loadings_start)
    # a neural fit's split of the rows into groups, and the rows its starts use (a
    # subsample of the groups on large data: train.start_problem)
    split = _split_groups(prepared, shard) if module.nets else None
    start_pr = pr if split is None else start_problem(pr, split, shard)
    if not profiled(obj):  # lmer's profiled fit starts at relative theta = 1 and needs no more
        glm_start(start_pr, fam, module, shard=shard if agree is not None else None)
        if prepared.approximation.kind == "exact" and module.log_sigma is not None:
            with torch.no_grad():  # lme4 starts at relative theta = 1, i.e. absolute sigma
                module.theta.mul_(module.log_sigma.exp())
        if shard is not None:  # rank 0's start for every process (the IRLS bits may differ)
            shard.sync(module)
        # a reduced-rank term's loadings from the moments of the GLM's residuals; the fits
        # from there start with Newton steps (BHHH's matrix, ``warm``)
        near = loadings_start(glmm_obj)
        theta_start(glmm_obj if start_pr is pr else Objective(
            start_pr, fam, prepared.approximation, linear_part(module, start_pr), shard=shard))
    history = None
    net_offset = None
    if split is not None:  # a neural fit
        # start the networks from the GLMM with their inputs entering linearly (polished to
        # a tight gradient so that runs with the same seed start training from the same
        # point: L-BFGS-B's last bits vary with memory alignment; no Hessian at the end: no
        # standard errors come from it)
        fit_linear_start(pr, fam, training_approximation(prepared.approximation, control),
                         module, control, shard, split, warm=near)
        history, obj, net_offset = _train(prepared, module, control, seed, split, shard)
    # the refit starts at the trained linear part, near its optimum (``warm``)
    opt = optimise(obj, max_iter=control.max_iter if control.refit else 1, gtol=control.gtol,
                   warm=bool(module.nets) or near)
    return make_result(prepared, obj, opt, control, formula=formula, data_name=data_name,
                       refit=refit, nets=_nets(module), net_offset=net_offset,
                       history=history)


def sharded_source(data: Any) -> bool:
    """Whether a distributed fit reads ``data`` shard by shard: a folder written by
    :func:`~ngmm_formula.io.write_partitioned`, a Parquet file or a folder of Parquet files
    (DataFrames, CSV files and pyarrow objects are read whole by every process)."""
    if not isinstance(data, str | os.PathLike):
        return False
    path = Path(os.fspath(data))
    if path.is_dir():
        return partition_info(path) is not None or any(
            p.suffix.lower() in PARQUET_SUFFIXES for p in path.iterdir())
    return path.is_file() and path.suffix.lower() in PARQUET_SUFFIXES


def _read_own_shard(parsed: ParsedFormula, source: Any, weights: Any, offset: Any,
                    context: Mapping[str, Any] | None, device: str
                    ) -> tuple[pd.DataFrame, Agreement]:
    """This process's rows of a sharded read (:func:`~ngmm_formula.io.read_shard`: whole
    groups of the formula's grouping factor) and the agreement on the encodings.

    Refused with a clear :class:`NGMMError`: several grouping factors (crossed or nested: no
    split by group). ``nn()`` terms are read alike: their inputs' standardisation and levels
    are agreed in the design (:class:`~ngmm_formula.design.Agreement`), the training numbers
    the groups of all processes as one process would (:meth:`~ngmm_formula.shards.Shard.
    numbering`) and the networks are centred on all rows. A grouping factor
    ``a:b`` is read by the hash of ``a`` (each ``a:b`` group lies within one ``a``), or of
    whichever of ``a``, ``b`` a partitioned dataset was written by.
    """
    import torch.distributed as dist

    groups = sorted({bar.group for bar in parsed.bars})
    if len(groups) != 1:
        raise NGMMError(
            f"a sharded read (distributed=True with a Parquet path) splits the rows by one "
            f"grouping factor, and the formula has {len(groups)} ({', '.join(groups)}): "
            "crossed or nested factors cannot be split across processes")
    factors = next(bar for bar in parsed.bars).group_factors
    info = partition_info(source) if Path(os.fspath(source)).is_dir() else None
    if info is not None and info["group"] not in factors:
        raise NGMMError(
            f"'{os.fspath(source)}' is partitioned by '{info['group']}', but the model's groups "
            f"are '{groups[0]}': its groups would be split across processes; write it again "
            f"with write_partitioned(df, path, group='{factors[0]}', ...)")
    cols = required_columns(parsed, with_response=True,
                            context=context if isinstance(context, Mapping) else None)
    cols += [a for a in (weights, offset) if isinstance(a, str)]
    rank, world = dist.get_rank(), dist.get_world_size()
    frame = read_shard(source, rank, world, cols,
                       group=info["group"] if info is not None else factors[0])
    comm = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    return frame, agreement(world, comm)


def _split_groups(prepared: Prepared, shard: Shard | None) -> np.ndarray:
    """Each row's group for the training's minibatches and validation split (the blocks'
    groups when the integral factorises, else the first grouping factor's); after a sharded
    read, this process's groups numbered among all processes' (:meth:`Shard.numbering`)."""
    design, pr = prepared.design, prepared.problem
    split = np.asarray(design.re_terms[0].group_index if prepared.approximation.joint
                       else pr.blocks.block_of_obs.cpu().numpy())
    if shard is not None and shard.presharded:
        split = shard.numbering(design.re_terms[0].levels)[split]
    return split


def _train(prepared: Prepared, module: LinearPredictor, control: Control, seed: int,
           split: np.ndarray, shard: Shard | None = None
           ) -> tuple[TrainingHistory, Objective, torch.Tensor]:
    """Train the networks, centre them, and return the objective of the linear refit and the
    networks' outputs (all observations).

    The refit's problem carries the frozen networks' outputs as an offset, so the L-BFGS
    refit and the Hessian concern beta, theta and sigma only (conditional on the networks).
    """
    pr, design, approx = prepared.problem, prepared.design, prepared.approximation
    history = train_networks(pr, prepared.family, approx, module, split, control, seed,
                             shard, describe={"formula": design.formula.formula})
    linear, lin_module, net_out = _freeze_networks(prepared, module, shard)
    return (history, Objective(linear, prepared.family, approx, lin_module, shard=shard),
            net_out)


def _freeze_networks(prepared: Prepared, module: LinearPredictor, shard: Shard | None = None
                     ) -> tuple[Problem, LinearPredictor, torch.Tensor]:
    """Centre the trained networks (the intercept absorbs the shift), freeze them, and return
    the problem with their outputs as offset, a linear module with the same parameters and
    the outputs. After a sharded read (``shard.presharded``) the centre is the mean over
    every process's rows."""
    pr, design = prepared.problem, prepared.design
    intercept = [j for j, n in enumerate(design.fixed_names) if n == "(Intercept)"]
    all_sum = shard.all_sum if shard is not None and shard.presharded else None
    with torch.no_grad():
        # a centred network's output from the pass that centres it
        centred: list[torch.Tensor | None] = []
        for net, x in zip(module.nets, pr.net_X):
            out = None
            if intercept and isinstance(net, CentredNetwork):
                # centre on the training data; the intercept absorbs the shift
                shift, out = net.centre(x, all_sum)
                module.beta[intercept[0]] += shift
            centred.append(out)
        net_out = module.network_output(pr, centred)
    module.nets.requires_grad_(False)
    linear = pr.with_offset(net_out)
    lin_module = LinearPredictor(linear, prepared.family.has_dispersion)
    with torch.no_grad():
        lin_module.beta.copy_(module.beta)
        lin_module.theta.copy_(module.theta)
        if module.log_sigma is not None and lin_module.log_sigma is not None:
            lin_module.log_sigma.copy_(module.log_sigma)
    return linear, lin_module, net_out


def _ngmm_variational(prepared: Prepared, control: Control, seed: int, *, formula: str,
                      data_name: str | None, refit: Any, distributed: bool = False
                      ) -> NGMMResult:
    """``approx="variational"``: maximise the evidence lower bound
    (:func:`~ngmm_formula.approx.variational.fit_variational`) from the GLM start; with
    ``distributed``, each process evaluates the rows of its range of the levels of the
    largest grouping factor (:func:`~ngmm_formula.shards.shard_levels`) and every process
    returns the same fit."""
    if control.checkpoint is not None and prepared.problem.net_X:
        raise NGMMError("Control.checkpoint is not available with approx='variational' "
                        "(its optimiser does not write checkpoints yet): drop checkpoint= or "
                        "choose another approx")
    module = _module(prepared)
    pr, fam = prepared.problem, prepared.family
    shard = None
    if distributed:
        levels = Levels.of(pr)
        k = int(np.argmax(levels.n_levels))
        shard = shard_levels(levels.level_of_obs[k], levels.n_levels[k], pr.y.device)
    glm_start(pr, fam, module)
    if shard is not None:  # rank 0's start for every process (the IRLS bits may differ)
        shard.sync(module)

    def freeze(obj: VariationalObjective) -> VariationalObjective:
        linear, lin_module, _ = _freeze_networks(prepared, module)
        return VariationalObjective(linear, fam, lin_module, obj.params, shard=obj.shard)

    obj, vfit = fit_variational(pr, fam, module, control, seed, on_trained=freeze,
                                shard=shard)
    net_offset = obj.problem.offset - pr.offset if module.nets else None
    return variational_result(prepared, obj, vfit, control, formula=formula,
                              data_name=data_name, refit=refit, nets=_nets(module),
                              net_offset=net_offset)
