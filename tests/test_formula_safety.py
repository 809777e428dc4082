"""Formulas cannot reach Python's internals (issue 12, item 2).

A formula's expressions are evaluated on the data as Python (as in patsy and R); every one of
them is checked by :mod:`ngmm_formula.safety` before anything is evaluated. Each escape attempt
below would run ``touch MARKER`` (or write a file) if it were evaluated: the test asserts a
:class:`FormulaError` and that the marker file was not created -- from :func:`parse_formula`,
from :func:`ngmm` and from the command line. The allowed grammar is tested table-driven on
:func:`build_design` (no fit), and ``context=`` with one small fit and its predictions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import cli
from ngmm_formula.api import ngmm
from ngmm_formula.design import build_design, required_columns
from ngmm_formula.errors import DataError, FormulaError
from ngmm_formula.formula import parse_formula
from ngmm_formula.safety import EXTRA_TRANSFORMS, TRANSFORMS, check_python, formula_tokens


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A file that an escaping formula would create, in a fresh working folder."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a formula ran code"


def _frame(n: int = 60, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(6), n // 6)
    x = rng.uniform(0.5, 3.0, size=n)
    df = pd.DataFrame({
        "x": x,
        "f": rng.choice(["a", "b", "c"], size=n),
        "g": [f"g{k}" for k in g],
        "t": rng.uniform(1.0, 2.0, size=n),
    })
    df["y"] = 1.0 + 0.5 * x + rng.normal(size=6)[g] + rng.normal(scale=0.3, size=n)
    df["my col"] = rng.normal(size=n)
    df["élève"] = df["g"]
    df["my g"] = [f"h{k % 4}" for k in range(n)]
    return df


SHELL = "__import__('os').system('touch MARKER')"

#: (id, formula): each would run code (or reach Python's internals) if it were evaluated.
ESCAPES: list[tuple[str, str]] = [
    ("dunder-globals", "y ~ I(x.__class__.__init__.__globals__['__builtins__']['__import__']"
                       "('os').system('touch MARKER')*0 + x) + (1|g)"),
    ("subclasses", "y ~ I(().__class__.__bases__[0].__subclasses__()) + (1 | g)"),
    ("getattr", "y ~ I(getattr(x, '__class__')) + (1 | g)"),
    ("eval", f'y ~ I(eval("{SHELL}")) + (1 | g)'),
    ("exec", f'y ~ I(exec("{SHELL}")) + (1 | g)'),
    ("globals", "y ~ I(globals()) + (1 | g)"),
    ("vars", "y ~ I(vars()) + (1 | g)"),
    ("builtins", "y ~ I(__builtins__) + (1 | g)"),
    ("import", f"y ~ I({SHELL}) + (1 | g)"),
    ("open", "y ~ I(open('MARKER', 'w')) + (1 | g)"),
    ("np-dict", "y ~ np.__dict__ + (1 | g)"),
    ("np-dict-call", "y ~ I(np.__dict__['savetxt']('MARKER', x)) + (1 | g)"),
    ("x-dict", "y ~ I(x.__dict__) + (1 | g)"),
    ("comprehension", "y ~ I([c for c in ()]) + (1 | g)"),
    ("lambda", "y ~ I((lambda: 0)()) + (1 | g)"),
    ("walrus", "y ~ I((z := x)) + (1 | g)"),
    ("fstring", "y ~ I(f'{x}') + (1 | g)"),
    ("os-system", "y ~ os.system('touch MARKER') + (1 | g)"),
    ("np-chain", "y ~ np.lib.npyio.savetxt('MARKER', x) + (1 | g)"),
    ("np-savetxt", "y ~ I(np.savetxt('MARKER', x)) + (1 | g)"),
    ("python-block", "y ~ {x.__class__} + (1 | g)"),
    ("subscript", "y ~ I(x[0]) + (1 | g)"),
    ("starred", "y ~ log(*x) + (1 | g)"),
    ("bar-group", "y ~ x + (1 | g.__class__)"),
    ("bar-lhs", f"y ~ x + (I({SHELL}) | g)"),
    ("nn-attr", "y ~ nn(x.__class__) + (1 | g)"),
    ("nn-dunder", "y ~ nn(__builtins__) + (1 | g)"),
    ("offset", f"y ~ x + offset({SHELL}) + (1 | g)"),
    ("offset-attr", "y ~ x + offset(t.__class__) + (1 | g)"),
    ("cbind", f"cbind(y, {SHELL}) ~ x + (1 | g)"),
    ("response", f"I({SHELL}) ~ x + (1 | g)"),
    ("response-attr", "y.__class__ ~ x + (1 | g)"),
]


@pytest.mark.parametrize("formula", [f for _, f in ESCAPES], ids=[i for i, _ in ESCAPES])
def test_escape_refused_by_the_parser(formula: str, marker: Path) -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula(formula)
    err = info.value
    assert err.formula == formula and err.position is not None
    assert str(err).split("\n")[2].endswith("^")


@pytest.mark.parametrize("formula", [f for _, f in ESCAPES], ids=[i for i, _ in ESCAPES])
def test_escape_refused_by_ngmm(formula: str, marker: Path) -> None:
    with pytest.raises(FormulaError):
        ngmm(formula, _frame())


def test_caret_under_the_first_dunder(marker: Path) -> None:
    formula = ESCAPES[0][1]
    with pytest.raises(FormulaError) as info:
        parse_formula(formula)
    assert "'__class__'" in info.value.reason
    assert info.value.position == formula.index(".__class__")


@pytest.mark.parametrize("formula", [
    "y ~ I(x.__class__.__init__.__globals__['__builtins__']['__import__']('os')"
    ".system('touch MARKER')*0 + x) + (1|g)",
    "y ~ x + (1 | g.__class__)",
    f"y ~ x + offset({SHELL}) + (1 | g)",
])
def test_escape_refused_by_the_command_line(formula: str, marker: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = marker.parent / "d.csv"
    _frame().to_csv(data, index=False)
    code = cli.main(["fit", formula, "--data", str(data), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ngmm: error:" in err and "refused" in err


# --------------------------------------------------------------------------------------------
# names must be columns, transforms or context names once the data are known

#: (formula, exception, name in the message): a function that is neither a transform nor a
#: context name is a FormulaError; a value name that is not a column is the DataError of a
#: missing column (as before), both raised before anything is evaluated.
UNKNOWN: list[tuple[str, type[Exception], str]] = [
    ("y ~ myfun(x) + (1 | g)", FormulaError, "myfun"),
    ("y ~ x + offset(shift(t)) + (1 | g)", FormulaError, "shift"),
    ("y ~ I(x * k) + (1 | g)", DataError, "'k'"),
    ("y ~ log(`no such`) + (1 | g)", DataError, "no such"),
    ("y ~ x + offset(log(tt)) + (1 | g)", DataError, "tt"),
    ("y ~ Q('zz') + (1 | g)", DataError, "zz"),
]


@pytest.mark.parametrize(("formula", "error", "name"), UNKNOWN)
def test_unknown_names_refused_before_evaluation(formula: str, error: type[Exception],
                                                 name: str) -> None:
    parse_formula(formula)  # structurally fine
    with pytest.raises(error) as info:
        build_design(parse_formula(formula), _frame())
    assert name in str(info.value)


def test_callers_variables_are_not_visible() -> None:
    k = 2.0  # noqa: F841 -- a local that a captured frame would have shown to formulaic
    with pytest.raises(DataError, match="'k'"):
        build_design(parse_formula("y ~ I(x * k) + (1 | g)"), _frame())


# --------------------------------------------------------------------------------------------
# the grammar that keeps working

ALLOWED: list[tuple[str, dict[str, Any] | None]] = [
    ("y ~ np.log(x) + (1 | g)", None),
    ("y ~ numpy.exp(x) + np.sqrt(t) + (1 | g)", None),
    ("y ~ I(x ** 2) + (1 | g)", None),
    ("y ~ scale(x) + center(t) + (1 | g)", None),
    ("y ~ poly(x, 2) + (1 | g)", None),
    ("y ~ C(f) + (1 | g)", None),
    ("y ~ C(f, contr.treatment) + (1 | g)", None),
    ("y ~ C(f, Treatment('b')) + (1 | g)", None),
    ("y ~ C(f, Sum) + (1 | g)", None),
    ("y ~ log(x) + log10(t) + log2(t) + log1p(x) + (1 | g)", None),
    ("y ~ exp(x) + expm1(t) + sqrt(x) + abs(x) + (1 | g)", None),
    ("y ~ bs(x, df=4) + (1 | g)", None),
    ("y ~ `my col` + log(`my col` + 10) + (1 | g)", None),
    ("y ~ Q('my col') + (1 | g)", None),
    ("y ~ {x + 1} + (1 | g)", None),
    ("y ~ (x + t)**2 + (1 | g)", None),
    ("y ~ x * f - 1 + (1 | g)", None),
    ("y ~ 0 + x:f + (1 | g)", None),
    ("y ~ x + I(x if True else 0) + I(x > 1) + (1 | g)", None),
    ("log(y + 10) ~ x + offset(log(t)) + (1 | g)", None),
    ("y ~ x + (1 + x | g) + (1 | élève:`my g`)", None),
    ("y ~ x + (1 | élève)", None),
    ("y ~ x + (1 | `my g`)", None),
    ("y ~ x + (1 | g/`my g`)", None),
    ("y ~ x + (0 + `my col` || g)", None),
    ("y ~ myfun(x) + (1 | g)", {"myfun": lambda v: np.asarray(v) * 2.0}),
    ("y ~ I(x * k) + (1 | g)", {"k": 3.0}),
    ("y ~ x + offset(shift(t)) + (1 | g)", {"shift": np.log}),
]


@pytest.mark.parametrize(("formula", "context"), ALLOWED, ids=[f for f, _ in ALLOWED])
def test_allowed_formulas_build(formula: str, context: dict[str, Any] | None) -> None:
    df = _frame()
    before = df.copy()
    d = build_design(parse_formula(formula), df, context=context)
    assert d.X.shape[0] == len(df) and np.isfinite(d.X).all()
    pd.testing.assert_frame_equal(df, before)
    # new data are encoded the same way, with the same context
    nd = d.spec.new_data(df)
    np.testing.assert_allclose(nd.X, d.X)


def test_grouping_factor_names() -> None:
    df = _frame()
    d = build_design(parse_formula("y ~ x + (1 | élève) + (1 | `my g`)"), df)
    assert {t.group for t in d.re_terms} == {"élève", "`my g`"}
    assert {t.n_levels for t in d.re_terms} == {6, 4}
    p = parse_formula("y ~ (1 | `my g`/élève)")
    assert [b.group_factors for b in p.bars] == [("élève", "my g"), ("my g",)]
    assert "my g" in required_columns(p)
    nested = build_design(p, df)
    # every group holds rows of all four levels of `my g`: 6 x 4 levels, then the 4
    assert [t.n_levels for t in nested.re_terms] == [24, 4]


def test_context_values_are_not_columns() -> None:
    p = parse_formula("y ~ I(x * k) + myfun(t) + (1 | g)")
    assert sorted(required_columns(p, context={"k": 2.0, "myfun": np.log})) == [
        "g", "t", "x", "y"]


def test_context_fit_and_predict() -> None:
    df = _frame()
    calls: list[int] = []

    def double(v: Any) -> np.ndarray:
        calls.append(len(v))
        return np.asarray(v, dtype=float) * 2.0

    fit = ngmm("y ~ double(x) + (1 | g)", df, context={"double": double})
    assert "double(x)" in fit.fixef.index
    ref = ngmm("y ~ x + (1 | g)", df)
    # Two fits of one model (the column x scaled by 2): the profiled REML objective is a
    # function of theta and of X's column space only, so both optimise the same function of
    # theta from the same start; the fixed effects and predictions follow from theta by a
    # least-squares solve. Measured: predictions equal, theta equal. 1e-6 relative on
    # predictions of size ~1 allows the L-BFGS stopping points to differ by Var x gtol.
    np.testing.assert_allclose(fit.fixef["double(x)"] * 2.0, ref.fixef["x"], rtol=1e-5)
    np.testing.assert_allclose(fit.predict(df.iloc[:5]), ref.predict(df.iloc[:5]), rtol=1e-6)
    assert calls[-1] == 5  # predict re-applied the context's function
    with pytest.raises(FormulaError, match="double"):
        ngmm("y ~ double(x) + (1 | g)", df)  # without the context


@pytest.mark.parametrize("context", [{"__import__": __import__}, {"a b": 1}, [("k", 1)]])
def test_bad_context_refused(context: Any) -> None:
    with pytest.raises(FormulaError, match="context"):
        build_design(parse_formula("y ~ x + (1 | g)"), _frame(), context=context)


def test_transform_names_are_formulaics() -> None:
    from formulaic.transforms import TRANSFORMS as FORMULAIC

    assert set(FORMULAIC) <= TRANSFORMS
    assert TRANSFORMS - set(FORMULAIC) == set(EXTRA_TRANSFORMS)


@pytest.mark.parametrize("text", [
    "np.log(x) + a:b + {x+1} + `my col` + I(x**2) + C(f, contr.treatment) + (a+b)**2 + a.b",
    "a %in% b", "x.__class__", "élève + x", "x[0]", "f(x)(y)[0] + 1", "{ x + `a b` } - 1",
    "C(f, Treatment('a')) + x^2", "I(x.__class__.__init__.__globals__['__builtins__'])",
])
def test_tokens_as_formulaics(text: str) -> None:
    """The pieces checked are the pieces formulaic evaluates: same tokens, same kinds."""
    from formulaic.parser.algos.tokenize import tokenize

    theirs = [(t.kind.value, t.token) for t in tokenize(text)]
    ours = [(t.kind, t.text) for t in formula_tokens(text)]
    assert ours == theirs


def test_check_python_without_formula_quotes_the_expression() -> None:
    with pytest.raises(FormulaError) as info:
        check_python("log(x.__class__)")
    assert info.value.formula == "log(x.__class__)" and info.value.position == 5
