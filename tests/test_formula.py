"""Tests of the formula layer (:mod:`ngmm_formula.formula`).

Table-driven, in formulaic's style: each row maps a formula string to the parts the parser must
return. The random-effects expansions follow lme4's ``findbars``/``expandSlash``/
``expandDoubleVerts``; the R output they mirror is quoted in comments, e.g.::

    > sapply(findbars(lme4:::expandDoubleVerts(~ (x + z || g))), deparse)
    [1] "1 | g"     "0 + x | g" "0 + z | g"
    > sapply(findbars(~ (1 | a/b/c)), deparse)
    [1] "1 | c:(b:a)" "1 | b:a"     "1 | a"
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ngmm_formula.errors import FormulaError, NGMMError
from ngmm_formula.formula import ACTIVATIONS, BarTerm, NNTerm, ParsedFormula, parse_formula

# Defaults of a row: no cbind, no nn() terms, no offsets.
_DEFAULTS: dict[str, Any] = {"cbind": None, "nn": [], "offsets": []}

# "bars" rows are (expr, group, correlated).
PARSE_CASES: dict[str, dict[str, Any]] = {
    # ---- random-effects forms -------------------------------------------------------------
    "y ~ x + (1 | g)": {"response": "y", "fixed": "x", "bars": [("1", "g", True)]},
    "y ~ (x | g)": {"response": "y", "fixed": "1", "bars": [("x", "g", True)]},
    "y ~ (1 + x | g)": {"response": "y", "fixed": "1", "bars": [("1 + x", "g", True)]},
    "y ~ (0 + x | g)": {"response": "y", "fixed": "1", "bars": [("0 + x", "g", True)]},
    "y ~ (x - 1 | g)": {"response": "y", "fixed": "1", "bars": [("x - 1", "g", True)]},
    # lme4: expandDoubleVerts(~ (x || g)) -> (1 | g) + (0 + x | g)
    "y ~ (x || g)": {
        "response": "y", "fixed": "1", "bars": [("1", "g", False), ("0 + x", "g", False)],
    },
    # lme4: (1 | g) + (0 + x | g) + (0 + z | g)
    "y ~ (1 + x + z || g)": {
        "response": "y", "fixed": "1",
        "bars": [("1", "g", False), ("0 + x", "g", False), ("0 + z", "g", False)],
    },
    "y ~ (0 + x || g)": {"response": "y", "fixed": "1", "bars": [("0 + x", "g", False)]},
    "y ~ (x + 0 || g)": {"response": "y", "fixed": "1", "bars": [("0 + x", "g", False)]},
    "y ~ (x - 1 || g)": {"response": "y", "fixed": "1", "bars": [("0 + x", "g", False)]},
    # lme4: findbars(~ (1 | g1/g2)) -> "1 | g2:g1", "1 | g1" (expandSlash: innermost first)
    "y ~ (1 | g1/g2)": {
        "response": "y", "fixed": "1", "bars": [("1", "g2:g1", True), ("1", "g1", True)],
    },
    # lme4 deparses the innermost term as "c:(b:a)"; the parser writes the same factor (same
    # levels, the first factor varying slowest) without the redundant parentheses.
    "y ~ (1 | a/b/c)": {
        "response": "y", "fixed": "1",
        "bars": [("1", "c:b:a", True), ("1", "b:a", True), ("1", "a", True)],
    },
    "y ~ x + (1 + x | g/h)": {
        "response": "y", "fixed": "x", "bars": [("1 + x", "h:g", True), ("1 + x", "g", True)],
    },
    "y ~ (1 | g1:g2)": {"response": "y", "fixed": "1", "bars": [("1", "g1:g2", True)]},
    "y ~ (1 | g1 : g2)": {"response": "y", "fixed": "1", "bars": [("1", "g1:g2", True)]},
    # crossed factors, in the order written (lme4 sorts by number of levels in the design)
    "y ~ x + (1 | id) + (1 | item)": {
        "response": "y", "fixed": "x", "bars": [("1", "id", True), ("1", "item", True)],
    },
    "y ~ (1 | g) + (1 | g:h)": {
        "response": "y", "fixed": "1", "bars": [("1", "g", True), ("1", "g:h", True)],
    },
    "y ~ (1 | g) + (0 + x | g)": {
        "response": "y", "fixed": "1", "bars": [("1", "g", True), ("0 + x", "g", True)],
    },
    "y~x+(1|g)": {"response": "y", "fixed": "x", "bars": [("1", "g", True)]},
    "y ~ (1  +   x | g)": {"response": "y", "fixed": "1", "bars": [("1 + x", "g", True)]},
    # ---- offsets and responses ------------------------------------------------------------
    "y ~ x + offset(log(t)) + (1 | g)": {
        "response": "y", "fixed": "x", "bars": [("1", "g", True)], "offsets": ["log(t)"],
    },
    "y ~ offset(t) + offset(log(u))": {
        "response": "y", "fixed": "1", "bars": [], "offsets": ["t", "log(u)"],
    },
    "cbind(s, n - s) ~ x + (1 | g)": {
        "response": None, "cbind": ("s", "n - s"), "fixed": "x", "bars": [("1", "g", True)],
    },
    "cbind(incidence, size - incidence) ~ period + (1 | herd)": {
        "response": None, "cbind": ("incidence", "size - incidence"), "fixed": "period",
        "bars": [("1", "herd", True)],
    },
    "log(Reaction) ~ Days + (Days | Subject)": {
        "response": "log(Reaction)", "fixed": "Days", "bars": [("Days", "Subject", True)],
    },
    # ---- the fixed part is handed to formulaic unchanged ----------------------------------
    "y ~ C(a) + I(x^2) + (1 | g)": {
        "response": "y", "fixed": "C(a) + I(x^2)", "bars": [("1", "g", True)],
    },
    "y ~ a*b + (1 | g)": {"response": "y", "fixed": "a*b", "bars": [("1", "g", True)]},
    "y ~ a:b + (1 | g)": {"response": "y", "fixed": "a:b", "bars": [("1", "g", True)]},
    "y ~ scale(x) + poly(x, 2) + (1 | g)": {
        "response": "y", "fixed": "scale(x) + poly(x, 2)", "bars": [("1", "g", True)],
    },
    "y ~ x - 1 + (1 | g)": {"response": "y", "fixed": "x - 1", "bars": [("1", "g", True)]},
    "y ~ x + (x | g) - 1": {"response": "y", "fixed": "x - 1", "bars": [("x", "g", True)]},
    "y ~ 0 + x + (1 | g)": {"response": "y", "fixed": "0 + x", "bars": [("1", "g", True)]},
    "y ~ -1 + x": {"response": "y", "fixed": "1 - 1 + x", "bars": []},
    # only bars: the intercept is kept, as in lme4
    "y ~ (1 | g)": {"response": "y", "fixed": "1", "bars": [("1", "g", True)]},
    "y ~ 1 + (1 | g)": {"response": "y", "fixed": "1", "bars": [("1", "g", True)]},
    # ---- nn() terms -----------------------------------------------------------------------
    'y ~ nn(a, b, hidden=(16, 8), activation="tanh", dropout=0.1) + nn(c) + x + (1 | g)': {
        "response": "y", "fixed": "x", "bars": [("1", "g", True)],
        "nn": [(("a", "b"), (16, 8), "tanh", 0.1), (("c",), (64, 64), "relu", 0.0)],
    },
    "y ~ nn(x, hidden=32)": {
        "response": "y", "fixed": "1", "bars": [], "nn": [(("x",), (32,), "relu", 0.0)],
    },
    "y ~ nn(x, hidden=[8, 4], activation='gelu') + nn(z, dropout=0)": {
        "response": "y", "fixed": "1", "bars": [],
        "nn": [(("x",), (8, 4), "gelu", 0.0), (("z",), (64, 64), "relu", 0.0)],
    },
    "use ~ nn(age, children) + urban + (1 + urban | district)": {
        "response": "use", "fixed": "urban", "bars": [("1 + urban", "district", True)],
        "nn": [(("age", "children"), (64, 64), "relu", 0.0)],
    },
    "y ~ 0 + nn(x) + offset(o) + (1 | g)": {
        "response": "y", "fixed": "0", "bars": [("1", "g", True)], "offsets": ["o"],
        "nn": [(("x",), (64, 64), "relu", 0.0)],
    },
}


@pytest.mark.parametrize("formula", list(PARSE_CASES))
def test_parse(formula: str) -> None:
    expected = {**_DEFAULTS, **PARSE_CASES[formula]}
    p = parse_formula(formula)
    assert isinstance(p, ParsedFormula)
    assert p.formula == formula
    assert p.response == expected["response"]
    assert p.response_cbind == expected["cbind"]
    assert p.fixed == expected["fixed"]
    assert [(b.expr, b.group, b.correlated) for b in p.bars] == expected["bars"]
    assert all(isinstance(b, BarTerm) for b in p.bars)
    assert [(t.variables, t.hidden, t.activation, t.dropout) for t in p.nn_terms] == \
        expected["nn"]
    assert all(isinstance(t, NNTerm) for t in p.nn_terms)
    assert list(p.offsets) == expected["offsets"]
    assert p.has_random == bool(expected["bars"])
    assert p.is_linear == (not expected["nn"])


def test_parsed_formula_helpers() -> None:
    p = parse_formula("cbind(s, n - s) ~ nn(a, b) + x + offset(log(t)) + (1 + z | g1/g2)")
    assert p.lhs == "cbind(s, n - s)"
    assert p.bars[0].group_factors == ("g2", "g1")
    assert str(p.bars[0]) == "(1 + z | g2:g1)"
    assert p.nn_terms[0].label == "nn(a, b)" == str(p.nn_terms[0])
    assert p.variables() == {"s", "n", "a", "b", "x", "t", "z", "g1", "g2"}
    assert p.linear_formula == (
        "cbind(s, n - s) ~ x + a + b + offset(log(t)) + (1 + z | g2:g1) + (1 + z | g1)"
    )
    # a frozen value
    with pytest.raises(AttributeError):
        p.fixed = "z"  # type: ignore[misc]


def test_variables_skip_functions_and_keywords() -> None:
    p = parse_formula("log(y) ~ poly(x, degree=2) + C(f) + I(z ** 2) + (1 | g)")
    assert p.variables() == {"y", "x", "f", "z", "g"}


# --------------------------------------------------------------------------------------------
# malformed formulas: (formula, message fragment, caret position)

ERROR_CASES: list[tuple[str, str, int]] = [
    # unbalanced parentheses: the caret is under the unclosed '(' / the stray ')'
    ("y ~ x + (1 | g", "unbalanced '('", 8),
    ("y ~ x + nn(a", "unbalanced '('", 10),
    ("y ~ x)", "unmatched ')'", 5),
    # missing and doubled '~'
    ("y x + z", "needs a '~'", 7),
    ("y ~ x ~ z", "more than one '~'", 6),
    ("~ x", "no response", 0),
    ("y ~", "nothing on the right", 3),
    # bars
    ("y ~ x + 1 | g", "must be in parentheses", 10),
    ("y ~ x + ( | g)", "empty left side", 10),
    ("y ~ x + (1 | )", "missing grouping factor", 13),
    ("y ~ (1 | g | h)", "exactly one '|'", 11),
    ("y ~ (1 | g + h)", "may only combine variables with ':' or '/'", 11),
    ("y ~ (1 | g/)", "empty factor", 9),
    ("y ~ x + (1 | log(g))", "must be a column name", 13),
    ("y ~ x - (1|g)", "cannot be subtracted", 8),
    ("y ~ (1 | g) + (1 | g)", "(1 | g) appears twice", 14),
    ("y ~ (1 | g) + (x || g)", "(1 | g) appears twice", 14),
    ("y | z ~ x", "not allowed in the response", 2),
    # nn()
    ("y ~ nn() + x", "at least one variable", 4),
    ("y ~ nn(x, width=3)", "unknown nn() option 'width'", 10),
    ("y ~ nn(x, hidden=(0, 3))", "'hidden' must be a tuple of positive integers", 17),
    ('y ~ nn(x, hidden="a")', "'hidden' must be a tuple of positive integers", 17),
    ("y ~ nn(x, hidden=h)", "'hidden' must be a literal", 17),
    ('y ~ nn(x, activation="swish")', "activation 'swish' is not one of", 21),
    ("y ~ nn(x, dropout=1.5)", "'dropout' must be a number in [0, 1)", 18),
    ("y ~ nn(x, dropout=True)", "'dropout' must be a number in [0, 1)", 18),
    ("y ~ nn(log(x))", "nn() takes column names, got 'log(x)'", 7),
    ("y ~ nn(x, x)", "'x' appears twice in nn()", 10),
    ("y ~ x:nn(a)", "must be a term of its own", 6),
    ("y ~ (nn(x) | g)", "cannot appear inside a random-effects term", 5),
    ("y ~ x - nn(a)", "cannot be subtracted", 8),
    # dangling operators
    ("y ~ x +", "missing term after '+'", 7),
    ("y ~ x + + z", "missing term after '+'", 8),
    # cbind response
    ("cbind(s) ~ x", "cbind() in the response takes two arguments", 0),
    ("cbind(s, ) ~ x", "cbind() in the response takes two arguments", 0),
]


@pytest.mark.parametrize(("formula", "fragment", "position"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_malformed(formula: str, fragment: str, position: int) -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula(formula)
    err = info.value
    assert isinstance(err, NGMMError) and isinstance(err, ValueError)
    assert fragment in err.reason
    assert err.formula == formula
    assert err.position == position
    # the message quotes the formula and puts a caret under the offending character
    lines = str(err).split("\n")
    assert lines[0] == err.reason
    assert lines[1] == f"  {formula}"
    assert lines[2] == "  " + " " * position + "^"


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_not_a_formula(bad: Any) -> None:
    with pytest.raises(FormulaError, match="formula"):
        parse_formula(bad)


# --------------------------------------------------------------------------------------------
# property: linear_formula round-trips

_COVARIATES = ["x", "z", "w"]
_GROUPS = ["g", "h", "g/h", "g:h"]


@st.composite
def _formulas(draw: st.DrawFn) -> str:
    fixed = draw(st.lists(st.sampled_from(_COVARIATES + ["x:z", "C(f)", "I(x ** 2)"]),
                          max_size=3, unique=True))
    if draw(st.booleans()):
        fixed = ["0", *fixed]
    terms = list(fixed)
    for _ in range(draw(st.integers(0, 2))):
        vars_ = draw(st.lists(st.sampled_from(_COVARIATES), min_size=1, max_size=2, unique=True))
        act = draw(st.sampled_from(ACTIVATIONS))
        terms.append(f"nn({', '.join(vars_)}, hidden={draw(st.integers(1, 9))}, "
                     f"activation='{act}')")
    if draw(st.booleans()):
        terms.append("offset(log(t))")
    used: set[tuple[str, str]] = set()
    for _ in range(draw(st.integers(0, 3))):
        lhs = draw(st.sampled_from(["1", "x", "1 + x", "0 + x", "1 + x + z"]))
        grp = draw(st.sampled_from(_GROUPS))
        bar = draw(st.sampled_from(["|", "||"]))
        if (lhs, grp) in used:
            continue
        used.add((lhs, grp))
        terms.append(f"({lhs} {bar} {grp})")
    if not terms:
        terms = ["1"]
    order = draw(st.permutations(terms))
    return "y ~ " + " + ".join(order)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_formulas())
def test_linear_formula_round_trips(formula: str) -> None:
    try:
        p = parse_formula(formula)
    except FormulaError as err:
        # two written terms can expand to the same bar, e.g. (x || g) and (1 | g)
        assert "appears twice" in err.reason
        return
    q = parse_formula(p.linear_formula)
    # Same bars in the same order. The `correlated` flag of a `||` expansion is not written
    # back (each expanded term has one column, so (0 + x | g) means the same model).
    assert [(b.expr, b.group) for b in q.bars] == [(b.expr, b.group) for b in p.bars]
    assert q.offsets == p.offsets
    assert q.response == p.response
    assert q.is_linear
    assert parse_formula(q.linear_formula) == q
