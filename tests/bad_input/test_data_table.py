"""The bad-input table of the data checks: ``ngmm``, ``predict`` and the command line.

Each row is a :class:`~tests.bad_input.harness.Case`: the class it must raise or warn, the
words its message must contain (the column or argument at fault), and the caller's frame
unchanged. Fits use 40 rows in 8 groups (well under a second each); the ``predict`` rows share
one fitted model.
"""

from __future__ import annotations

import functools
import io
import tempfile
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ngmm_formula import (
    Control,
    DataError,
    FormulaError,
    NewLevelsError,
    NGMMError,
    ScaleWarning,
    SeparationWarning,
    get_family,
    ngmm,
    persist,
)
from ngmm_formula.cli import main
from tests.bad_input.harness import Case, params, run

N = 40


def frame() -> pd.DataFrame:
    """40 rows, 8 groups of 5: Gaussian ``y``, counts ``c``, 0/1 ``b``, numeric ``x``, ``z``,
    factor ``f`` (a, b), text ``s`` (one value)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=N)
    return pd.DataFrame({
        "y": x + rng.normal(size=N),
        "x": x,
        "z": rng.normal(size=N),
        "c": rng.poisson(2.0, N),
        "b": (rng.random(N) < 0.5).astype(int),
        "f": np.tile(["a", "b"], N // 2),
        "g": np.repeat([f"g{k}" for k in range(8)], 5),
        "s": ["same"] * N,
    })


def separated_numeric() -> pd.DataFrame:
    df = frame()
    return df.assign(b=(df.x > 0.2).astype(int))


def separated_level() -> pd.DataFrame:
    """A factor level (``h == "c"``) with only successes."""
    df = frame()
    h = np.tile(["a", "b", "c", "d"], N // 4)
    b = np.where(h == "c", 1, (np.arange(N) // 4) % 2)  # the other levels alternate
    return df.assign(h=h, b=b)


def quasi_separated() -> pd.DataFrame:
    """y = 1 above 0, 0 below, both outcomes at x = 0 (quasi-complete)."""
    df = frame()
    x = np.round(df.x.to_numpy())
    b = np.where(x > 0, 1, np.where(x < 0, 0, np.arange(N) % 2))
    return df.assign(x=x, b=b)


def separated_pair() -> pd.DataFrame:
    df = frame()
    return df.assign(b=(df.x + df.z > 0).astype(int))


@functools.cache
def fitted() -> Any:
    """One Gaussian fit shared by the predict rows (the caller never sees this frame)."""
    return ngmm("y ~ x + f + (1 | g)", frame())


@functools.cache
def saved_model() -> str:
    folder = Path(tempfile.mkdtemp(prefix="ngmm_table_"))
    return str(persist.save(fitted(), folder / "model.ngmm"))


class CLIFailed(Exception):
    """The command line exited with a non-zero status; the message is its standard error."""


def cli(args: list[str], df: pd.DataFrame) -> None:
    """Write ``df`` to a temporary CSV, run ``ngmm ARGS --data FILE``, raise on failure."""
    folder = Path(tempfile.mkdtemp(prefix="ngmm_table_"))
    path = folder / "data.csv"
    df.to_csv(path, index=False)
    err = io.StringIO()
    with redirect_stderr(err):
        status = main([*args, "--data", str(path), "--quiet"])
    if status != 0:
        raise CLIFailed(err.getvalue())


def fit(formula: str, family: str = "gaussian", **kw: Any) -> Any:
    return lambda df: ngmm(formula, df, family, **kw)


def with_(**cols: Any) -> Any:
    return lambda: frame().assign(**cols)


def inf_first(value: float = 1.0) -> np.ndarray:
    return np.r_[np.inf, np.full(N - 1, value)]


CASES: list[Case] = [
    # -- separation (a warning, as lme4 and glmmTMB fit such data) ----------------------------
    Case("separation-numeric", separated_numeric, fit("b ~ x + z + (1 | g)", "binomial"),
         warns=SeparationWarning, names=("'x'", "infinite")),
    Case("separation-factor-level", separated_level, fit("b ~ h + x + (1 | g)", "binomial"),
         warns=SeparationWarning, names=("hc",)),
    Case("separation-quasi-complete", quasi_separated, fit("b ~ x + z + (1 | g)", "binomial"),
         warns=SeparationWarning, names=("'x'",)),
    Case("separation-two-columns", separated_pair, fit("b ~ x + z + (1 | g)", "binomial"),
         warns=SeparationWarning, names=("'x'", "'z'")),
    Case("separation-poisson-zero-level", with_(c=np.where(np.tile([0, 1], N // 2) == 0, 0, 3)),
         fit("c ~ f + (1 | g)", "poisson"), warns=SeparationWarning, names=("fb",)),
    # -- constant responses ------------------------------------------------------------------
    Case("binomial-all-ones", with_(b=1), fit("b ~ x + (1 | g)", "binomial"),
         raises=DataError, names=("'b'", "all 1")),
    Case("binomial-cbind-all-failures", with_(k=0, m=3),
         fit("cbind(k, m - k) ~ x + (1 | g)", "binomial"), raises=DataError,
         names=("cbind(k, m - k)", "all 0")),
    Case("gaussian-constant", with_(y=3.0), fit("y ~ x + (1 | g)"), raises=DataError,
         names=("'y'", "constant")),
    Case("poisson-all-zero", with_(c=0), fit("c ~ x + (1 | g)", "poisson"), raises=DataError,
         names=("'c'", "zero")),
    Case("gamma-constant", with_(y=2.0), fit("y ~ x + (1 | g)", "gamma"), raises=DataError,
         names=("'y'", "constant")),
    # -- weights and offset ------------------------------------------------------------------
    Case("weights-inf-array", frame, fit("y ~ x + (1 | g)", weights=inf_first()),
         raises=DataError, names=("weights", "infinite", "1 row")),
    Case("weights-inf-column", with_(w=inf_first()), fit("y ~ x + (1 | g)", weights="w"),
         raises=DataError, names=("'w'", "infinite")),
    Case("offset-inf-column", with_(o=inf_first(0.0)), fit("y ~ x + (1 | g)", offset="o"),
         raises=DataError, names=("'o'", "infinite")),
    Case("weights-negative", frame,
         fit("y ~ x + (1 | g)", weights=np.r_[-1.0, np.ones(N - 1)]), raises=DataError,
         names=("weights", "negative", "1 row")),
    Case("weights-wrong-length", frame, fit("y ~ x + (1 | g)", weights=np.ones(3)),
         raises=DataError, names=("weights", "40")),
    Case("weights-text-column", with_(w="heavy"), fit("y ~ x + (1 | g)", weights="w"),
         raises=DataError, names=("'w'", "numeric")),
    Case("offset-not-a-column", frame, fit("y ~ x + (1 | g)", offset="exposure"),
         raises=DataError, names=("exposure",)),
    # -- scales ------------------------------------------------------------------------------
    Case("covariate-overflows", lambda: frame().assign(x=frame().x * 1e300),
         fit("y ~ x + (1 | g)"), raises=DataError, names=("'x'", "rescale")),
    Case("covariate-extreme-scale", lambda: frame().assign(z=frame().z * 1e12),
         fit("y ~ x + z + (1 | g)"), warns=ScaleWarning, names=("'z'", "rescale")),
    Case("random-slope-overflows", lambda: frame().assign(x=frame().x * 1e300),
         fit("y ~ 1 + (x | g)"), raises=DataError, names=("'x'", "(x | g)")),
    # -- the frame itself --------------------------------------------------------------------
    Case("duplicate-columns",
         lambda: pd.concat([frame(), frame()[["x"]]], axis=1), fit("y ~ x + (1 | g)"),
         raises=DataError, names=("duplicate", "'x'")),
    Case("missing-column", frame, fit("y ~ w + (1 | g)"), raises=DataError, names=("'w'",)),
    Case("empty-frame", lambda: frame().iloc[:0], fit("y ~ x + (1 | g)"), raises=DataError,
         names=("no rows",)),
    Case("all-nan-column", with_(x=np.nan), fit("y ~ x + (1 | g)"), raises=DataError,
         names=("'x'", "no non-missing")),
    Case("data-not-a-frame", frame, lambda df: ngmm("y ~ x + (1 | g)", df.to_dict()),
         raises=DataError, names=("DataFrame", "dict")),
    Case("nn-input-missing", with_(x=np.r_[np.nan, np.zeros(N - 1)]),
         fit("y ~ nn(x) + (1 | g)"), raises=DataError, names=("'x'", "missing")),
    # -- arguments ---------------------------------------------------------------------------
    Case("family-misspelt", frame, fit("y ~ x + (1 | g)", "gausian"), raises=DataError,
         names=("gausian",)),
    Case("link-not-of-family", frame,
         lambda df: ngmm("c ~ x + (1 | g)", df, get_family("poisson", "logit")),
         raises=DataError, names=("logit", "poisson")),
    Case("approx-misspelt", frame, fit("y ~ x + (1 | g)", approx="lapalce"),
         raises=NGMMError, names=("approx", "lapalce")),
    Case("nagq-without-agq", frame, fit("c ~ x + (1 | g)", "poisson", approx="laplace", nagq=5),
         raises=NGMMError, names=("nagq", "agq")),
    Case("control-a-dict", frame, fit("y ~ x + (1 | g)", control={"max_iter": 5}),
         raises=NGMMError, names=("control", "Control", "dict")),
    Case("control-bad-value", frame,
         lambda df: ngmm("y ~ x + (1 | g)", df, control=Control(na_action="drop")),
         raises=NGMMError, names=("na_action",)),
    Case("seed-text", frame, fit("y ~ x + (1 | g)", seed="one"), raises=NGMMError,
         names=("seed", "'one'")),
    Case("seed-fraction", frame, fit("y ~ x + (1 | g)", seed=1.5), raises=NGMMError,
         names=("seed", "1.5")),
    Case("reml-with-binomial", frame, fit("b ~ x + (1 | g)", "binomial", reml=True),
         raises=NGMMError, names=("reml",)),
    # -- formula and response ----------------------------------------------------------------
    Case("no-random-effects", frame, fit("y ~ x"), raises=DataError, names=("(1 | group)",)),
    Case("unbalanced-parenthesis", frame, fit("y ~ x + (1 | g"), raises=FormulaError,
         names=("(1 | g",)),
    Case("cbind-with-gaussian", with_(k=1, m=3), fit("cbind(k, m - k) ~ x + (1 | g)"),
         raises=DataError, names=("cbind", "binomial")),
    Case("response-text-gaussian", frame, fit("s ~ x + (1 | g)"), raises=DataError,
         names=("'s'", "numeric")),
    Case("binomial-response-above-one", frame, fit("c ~ x + (1 | g)", "binomial"),
         raises=DataError, names=("'c'", "[0, 1]")),
    Case("binomial-three-levels", with_(r=np.tile(["lo", "mid", "hi", "mid"], N // 4)),
         fit("r ~ x + (1 | g)", "binomial"), raises=DataError, names=("'r'", "3 levels")),
    Case("binomial-negative-failures", with_(k=2, m=1),
         fit("cbind(k, m - k) ~ x + (1 | g)", "binomial"), raises=DataError,
         names=("m - k", "below zero")),
    Case("poisson-non-integer", frame, fit("y ~ x + (1 | g)", "poisson"), raises=DataError,
         names=("'y'",)),
    Case("group-one-level", frame, fit("y ~ x + (1 | s)"), raises=DataError,
         names=("'s'", "1 level")),
    Case("group-level-per-row-gaussian", with_(id=np.arange(N)), fit("y ~ x + (1 | id)"),
         raises=DataError, names=("'id'", "40 levels", "40 observations")),
    Case("random-effects-outnumber-rows", with_(h=np.arange(N) // 2),
         fit("y ~ x + (x | h)"), raises=DataError, names=("'h'", "40")),
    # -- predict -----------------------------------------------------------------------------
    Case("predict-re-form", frame, lambda df: fitted().predict(df, re_form="~(1|g)"),
         raises=NGMMError, names=("re_form", "~(1|g)")),
    Case("predict-type", frame, lambda df: fitted().predict(df, type="prob"),
         raises=NGMMError, names=("type", "prob")),
    Case("predict-missing-column", lambda: frame()[["x", "f"]],
         lambda df: fitted().predict(df), raises=DataError, names=("'g'",)),
    Case("predict-numeric-as-text", with_(x=[f"{v:.3f}" for v in frame().x]),
         lambda df: fitted().predict(df), raises=DataError, names=("'x'", "numeric")),
    Case("predict-unseen-factor-level", with_(f="zzz"), lambda df: fitted().predict(df),
         raises=DataError, names=("'f'", "zzz")),
    Case("predict-no-new-levels", with_(g="new"),
         lambda df: fitted().predict(df, allow_new_levels=False), raises=NewLevelsError,
         names=("'g'", "allow_new_levels=True")),
    Case("predict-new-levels-by-default", with_(g="new"),
         lambda df: fitted().predict(df), raises=NewLevelsError,
         names=("'g'", "allow_new_levels=True")),
    Case("predict-not-a-frame", frame, lambda df: fitted().predict(df.to_numpy()),
         raises=DataError, names=("newdata", "DataFrame")),
    Case("predict-infinite", with_(x=inf_first()), lambda df: fitted().predict(df),
         raises=DataError, names=("'x'", "infinite")),
    Case("predict-duplicate-columns", lambda: pd.concat([frame(), frame()[["f"]]], axis=1),
         lambda df: fitted().predict(df), raises=DataError, names=("'f'", "duplicate")),
    Case("predict-empty", lambda: frame().iloc[:0], lambda df: fitted().predict(df),
         raises=DataError, names=("newdata", "no rows")),
    # -- command line ------------------------------------------------------------------------
    Case("cli-fit-missing-column", frame, lambda df: cli(["fit", "y ~ w + (1 | g)"], df),
         raises=CLIFailed, names=("'w'", "ngmm: error:")),
    Case("cli-fit-constant-response", with_(y=1.0),
         lambda df: cli(["fit", "y ~ x + (1 | g)"], df), raises=CLIFailed,
         names=("'y'", "constant")),
    Case("cli-fit-family", frame,
         lambda df: cli(["fit", "y ~ x + (1 | g)", "--family", "gausian"], df),
         raises=CLIFailed, names=("gausian",)),
    Case("cli-predict-no-new-levels", with_(g="new"),
         lambda df: cli(["predict", saved_model(), "--no-new-levels"], df),
         raises=CLIFailed, names=("'g'", "--allow-new-levels")),
    Case("cli-predict-numeric-as-text", with_(x="high"),
         lambda df: cli(["predict", saved_model()], df), raises=CLIFailed,
         names=("'x'", "numeric")),
    Case("cli-predict-re-form", frame,
         lambda df: cli(["predict", saved_model(), "--re-form", "~(1|g)"], df),
         raises=CLIFailed, names=("--re-form",)),
]


@params(CASES)
def test_data_table(case: Case) -> None:
    run(case)


def test_cli_new_levels_advice_is_the_flag() -> None:
    """The command line does not advise a Python argument it has no flag for."""
    df = frame().assign(g="new")
    try:
        cli(["predict", saved_model(), "--no-new-levels"], df)
    except CLIFailed as exc:
        assert "allow_new_levels" not in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected the command to fail")


def test_table_size() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
