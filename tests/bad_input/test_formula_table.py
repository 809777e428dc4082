"""Bad formulas: escapes into Python's internals, unknown names, bad grouping identifiers.

Every row raises before anything is evaluated, names the offending term or name, and leaves
the caller's DataFrame unchanged (:func:`tests.bad_input.harness.run`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ngmm_formula.api import ngmm
from ngmm_formula.design import build_design
from ngmm_formula.errors import DataError, FormulaError
from ngmm_formula.formula import parse_formula
from tests.bad_input.harness import Case, params, run


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 24
    return pd.DataFrame({
        "y": rng.normal(size=n),
        "x": rng.uniform(1.0, 2.0, size=n),
        "t": rng.uniform(1.0, 2.0, size=n),
        "g": [f"g{k % 4}" for k in range(n)],
        "my g": [f"h{k % 3}" for k in range(n)],
    })


def _fit(formula: str, **kw: Any) -> Any:
    return lambda df: ngmm(formula, df, **kw)


def _design(formula: str, **kw: Any) -> Any:
    return lambda df: build_design(parse_formula(formula), df, **kw)


CASES: list[Case] = [
    # escapes into Python's internals (refused by the parser, from ngmm)
    Case("dunder-globals", _frame,
         _fit("y ~ I(x.__class__.__init__.__globals__['__builtins__']['__import__']('os')"
              ".system('true')*0 + x) + (1|g)"),
         raises=FormulaError, names=("__class__", "x.__class__")),
    Case("subclasses", _frame, _fit("y ~ I(().__class__.__bases__[0].__subclasses__()) + (1|g)"),
         raises=FormulaError, names=("__class__",)),
    Case("getattr", _frame, _fit("y ~ I(getattr(x, '__class__')) + (1|g)"),
         raises=FormulaError, names=("getattr()",)),
    Case("eval", _frame, _fit("y ~ I(eval('1')) + (1|g)"), raises=FormulaError,
         names=("eval()",)),
    Case("exec", _frame, _fit("y ~ I(exec('1')) + (1|g)"), raises=FormulaError,
         names=("exec()",)),
    Case("globals", _frame, _fit("y ~ I(globals()) + (1|g)"), raises=FormulaError,
         names=("globals()",)),
    Case("builtins-name", _frame, _fit("y ~ I(__builtins__) + (1|g)"), raises=FormulaError,
         names=("__builtins__",)),
    Case("np-dict", _frame, _fit("y ~ np.__dict__ + (1|g)"), raises=FormulaError,
         names=("np.__dict__",)),
    Case("np-not-allowed", _frame, _fit("y ~ I(np.savetxt('m', x)) + (1|g)"),
         raises=FormulaError, names=("np.savetxt",)),
    Case("os-system", _frame, _fit("y ~ os.system('true') + (1|g)"), raises=FormulaError,
         names=("os.system",)),
    Case("comprehension", _frame, _fit("y ~ I([c for c in x]) + (1|g)"), raises=FormulaError,
         names=("comprehensions", "[c for c in x]")),
    Case("lambda", _frame, _fit("y ~ I((lambda v: v)(x)) + (1|g)"), raises=FormulaError,
         names=("lambda",)),
    Case("subscript", _frame, _fit("y ~ I(x[0]) + (1|g)"), raises=FormulaError,
         names=("subscripts", "x[0]")),
    Case("offset-escape", _frame, _fit("y ~ x + offset(t.__class__) + (1|g)"),
         raises=FormulaError, names=("__class__",)),
    Case("nn-escape", _frame, _fit("y ~ nn(x.__class__) + (1|g)"), raises=FormulaError,
         names=("x.__class__",)),
    Case("response-escape", _frame, _fit("y.__class__ ~ x + (1|g)"), raises=FormulaError,
         names=("y.__class__",)),
    # bad grouping identifiers
    Case("group-dunder", _frame, _fit("y ~ x + (1 | g.__class__)"), raises=FormulaError,
         names=("g.__class__",)),
    Case("group-call", _frame, _fit("y ~ x + (1 | log(g))"), raises=FormulaError,
         names=("log(g)", "column name")),
    Case("group-unclosed-backtick", _frame, _fit("y ~ x + (1 | `my g)"), raises=FormulaError,
         names=("`my g",)),
    Case("group-missing-column", _frame, _fit("y ~ x + (1 | `no g`)"), raises=DataError,
         names=("no g",)),
    # unknown names, once the data are known
    Case("unknown-function", _frame, _design("y ~ myfun(x) + (1|g)"), raises=FormulaError,
         names=("myfun",)),
    Case("unknown-value", _frame, _design("y ~ I(x * k) + (1|g)"), raises=DataError,
         names=("'k'",)),
    Case("unknown-backtick", _frame, _design("y ~ `no col` + (1|g)"), raises=DataError,
         names=("no col",)),
    Case("context-not-mapping", _frame, _design("y ~ x + (1|g)", context=["k"]),
         raises=FormulaError, names=("context", "list")),
    Case("context-dunder-key", _frame,
         _design("y ~ x + (1|g)", context={"__import__": __import__}),
         raises=FormulaError, names=("__import__",)),
]


@params(CASES)
def test_formula_table(case: Case) -> None:
    run(case)
