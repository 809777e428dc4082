"""Static checks of the Python expressions in a model formula, before anything is evaluated.

A formula such as ``y ~ np.log(x) + I(x ** 2) + C(f) + (1 | g)`` holds Python expressions that
formulaic evaluates on the data (``np.log(x)``, ``x ** 2``, ``C(f)``), as patsy and R do. An
expression that is evaluated can reach Python's internals (``x.__class__.__init__.__globals__``
leads to ``__import__('os').system(...)``), so every expression of a formula -- the fixed part,
the left sides and grouping factors of the bar terms, the arguments of ``nn()``, ``offset()``
and ``cbind()``, the response -- is parsed with :mod:`ast` and refused with a
:class:`~ngmm_formula.errors.FormulaError` (caret under the offending position) unless it is
built from:

* names: the data's columns, the formula transforms :data:`TRANSFORMS` and the names passed in
  ``context=`` (when the data are known; before that any name that is not a dunder, and no
  call of a Python built-in);
* attribute access only as ``np.<f>`` / ``numpy.<f>`` for the functions in
  :data:`NUMPY_FUNCTIONS` and ``contr.<c>`` for formulaic's contrasts (:data:`CONTRASTS`), one
  level deep; never a dunder;
* constants, arithmetic, comparisons, boolean operators, ``a if c else b``, tuples, lists,
  sets and dicts, and calls of allowed functions with plain (keyword) arguments.

Subscripts, lambdas, comprehensions, starred arguments, ``**kwargs``, the walrus operator and
f-strings are refused. The formula-level grammar (``+ - * / : ** ^ %in%``, ``.``, backticks,
``{...}`` Python blocks, ``name(...)`` calls) is split into tokens exactly as formulaic's own
tokenizer does (:func:`formula_tokens` mirrors ``formulaic.parser.algos.tokenize``), so every
piece of Python that formulaic would evaluate is seen here first.

This module does not import formulaic (the design layer does, and re-checks formulaic's parsed
factors with :func:`check_python` before materialising them).
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from ngmm_formula.errors import FormulaError

__all__ = [
    "CONTRASTS",
    "EXTRA_TRANSFORMS",
    "NUMPY_FUNCTIONS",
    "TRANSFORMS",
    "check_identifier",
    "check_python",
    "check_terms",
    "formula_tokens",
]

#: Functions and objects that formulaic provides to every formula (its ``TRANSFORMS``,
#: patsy's compatibility names included) and the few this package adds
#: (:data:`EXTRA_TRANSFORMS`).
TRANSFORMS: frozenset[str] = frozenset({
    # formulaic's transforms
    "np", "log", "log10", "log2", "exp", "exp10", "exp2", "bs", "cc", "cr", "cs", "center",
    "lag", "poly", "scale", "C", "contr", "I", "hashed",
    # formulaic's patsy-compatibility transforms
    "standardize", "Q", "Treatment", "Poly", "Sum", "Helmert", "Diff",
    # added by this package (EXTRA_TRANSFORMS)
    "numpy", "sqrt", "abs", "log1p", "expm1",
})

#: Names this package adds to formulaic's transforms (R's ``sqrt``, ``abs``, ``log1p``,
#: ``expm1``, and ``numpy`` besides ``np``).
EXTRA_TRANSFORMS: dict[str, object] = {
    "numpy": np, "sqrt": np.sqrt, "abs": np.abs, "log1p": np.log1p, "expm1": np.expm1,
}

#: The numpy functions and constants a formula may name as ``np.<f>`` or ``numpy.<f>``:
#: element-wise mathematics and a few reductions; nothing that reads or writes files, builds
#: functions or reaches numpy's submodules.
NUMPY_FUNCTIONS: frozenset[str] = frozenset({
    "abs", "absolute", "sqrt", "cbrt", "square", "exp", "exp2", "expm1", "log", "log10",
    "log2", "log1p", "logaddexp", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "arctan2",
    "sinh", "cosh", "tanh", "arcsinh", "arccosh", "arctanh", "deg2rad", "rad2deg", "degrees",
    "radians", "floor", "ceil", "trunc", "rint", "round", "around", "sign", "clip", "where",
    "minimum", "maximum", "fmin", "fmax", "power", "float_power", "hypot", "mod", "fmod",
    "remainder", "reciprocal", "negative", "heaviside", "isnan", "isfinite", "isinf",
    "logical_and", "logical_or", "logical_not", "logical_xor", "mean", "std", "var", "median",
    "sum", "prod", "cumsum", "cumprod", "min", "max", "percentile", "quantile",
    "pi", "e", "nan", "inf",
})

#: formulaic's contrasts, written ``contr.<name>`` (``C(f, contr.treatment)``).
CONTRASTS: frozenset[str] = frozenset({"treatment", "sum", "helmert", "poly", "diff", "custom",
                                       "SAS"})

_MODULES: dict[str, frozenset[str]] = {"np": NUMPY_FUNCTIONS, "numpy": NUMPY_FUNCTIONS,
                                       "contr": CONTRASTS}

# Python's built-ins are reachable from formulaic's eval; calling one is never a formula
# transform (a data column is never called), so a call of any of them is refused before the
# data are known. The transforms that share a built-in's name (abs) are supplied by this
# package and stay allowed.
_BUILTIN_NAMES: frozenset[str] = frozenset(n for n in dir(builtins)) - TRANSFORMS

_NODE_WORDS: dict[type, str] = {
    ast.Lambda: "lambda functions",
    ast.ListComp: "comprehensions", ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions", ast.GeneratorExp: "generator expressions",
    ast.NamedExpr: "assignment expressions (:=)",
    ast.JoinedStr: "f-strings", ast.FormattedValue: "f-strings",
    ast.Starred: "starred arguments (*args)",
    ast.Subscript: "subscripts", ast.Slice: "subscripts",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
}

_ALLOWED_NODES: tuple[type, ...] = (
    ast.Expression, ast.Name, ast.Load, ast.Constant, ast.BinOp, ast.UnaryOp, ast.BoolOp,
    ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Tuple, ast.List, ast.Set, ast.Dict,
    ast.Attribute, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)

_SCOPES: tuple[type, ...] = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                             ast.GeneratorExp, ast.NamedExpr, ast.JoinedStr)

_PLACEHOLDER = "_ngmm_quoted_{}_"


def _is_dunder(name: str) -> bool:
    return name.startswith("__")


def _dunder_part(name: str) -> str | None:
    """The first dot-separated part of ``name`` that starts with ``__``, if any."""
    for part in name.split("."):
        if _is_dunder(part):
            return part
    return None


def _fail(message: str, formula: str | None, expr: str, pos: int) -> FormulaError:
    """A FormulaError with the caret in ``formula`` (or, without one, in ``expr``)."""
    if formula is None:
        return FormulaError(message, expr, pos)
    return FormulaError(message, formula, pos)


# --------------------------------------------------------------------------------------------
# Python expressions


@dataclass
class _Source:
    """An expression with its backtick-quoted names replaced by placeholder identifiers, and
    the position in the original expression of every character of the replaced one."""

    text: str
    origin: list[int]
    quoted: dict[str, str] = field(default_factory=dict)

    def position(self, node: ast.AST) -> int:
        lineno = getattr(node, "lineno", 1)
        col = getattr(node, "col_offset", 0)
        lines = self.text.split("\n")
        start = sum(len(line) + 1 for line in lines[: lineno - 1])
        # ast's col_offset counts UTF-8 bytes
        chars = len(lines[lineno - 1].encode()[:col].decode(errors="ignore"))
        k = min(start + chars, len(self.origin) - 1)
        return self.origin[k] if k >= 0 else 0


def _unquote(expr: str) -> _Source:
    """Replace each backtick-quoted name by an identifier (formulaic does the same before
    evaluating), outside string literals."""
    out: list[str] = []
    origin: list[int] = []
    quoted: dict[str, str] = {}
    i, n = 0, len(expr)
    quote: str | None = None
    while i < n:
        ch = expr[i]
        if quote:
            if ch == "\\" and i + 1 < n:
                out.extend(expr[i:i + 2])
                origin.extend((i, i + 1))
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "`":
            end = expr.find("`", i + 1)
            if end > i:
                name = expr[i + 1:end]
                ident = _PLACEHOLDER.format(len(quoted))
                quoted[ident] = name
                out.append(ident)
                origin.extend([i] * len(ident))
                i = end + 1
                continue
        out.append(ch)
        origin.append(i)
        i += 1
    origin.append(n)  # one past the end, for nodes that end the expression
    return _Source("".join(out), origin, quoted)


def check_python(expr: str, formula: str | None = None, pos: int = 0,
                 names: Collection[str] | None = None, *, what: str = "expression") -> None:
    """Refuse a Python expression of a formula that could reach anything but the data.

    Parameters
    ----------
    expr : str
        The expression as formulaic will evaluate it (backtick-quoted names allowed).
    formula : str, optional
        The whole formula, for the caret; without it the caret is placed in ``expr``.
    pos : int
        Position of ``expr``'s first character in ``formula``.
    names : collection of str, optional
        The names the data provide (columns and ``context=`` names). When given, every name
        must be one of them or a transform of :data:`TRANSFORMS`; when None (the data are not
        known yet) only the structure is checked.
    what : str
        What the expression is, for the message (``"offset()"``, ``"response"``).

    Raises
    ------
    FormulaError
        With the caret under the offending name, attribute or construct.
    """
    stripped = expr.lstrip()
    lead = len(expr) - len(stripped)
    src = _unquote(stripped.rstrip())
    base = pos + lead
    if formula is None:
        formula, base = expr, lead
    try:
        tree = ast.parse(src.text, mode="eval")
    except SyntaxError as exc:
        k = src.origin[min(max((exc.offset or 1) - 1, 0), len(src.origin) - 1)]
        raise _fail(f"cannot read the {what} '{expr.strip()}' as an expression", formula, expr,
                    base + k) from None
    _Checker(src, formula, base, names).visit(tree)


class _Checker(ast.NodeVisitor):
    def __init__(self, src: _Source, formula: str, base: int,
                 names: Collection[str] | None) -> None:
        self.src = src
        self.formula = formula
        self.base = base
        self.names = names

    # helpers ---------------------------------------------------------------------------------

    def fail(self, message: str, node: ast.AST, at: int | None = None) -> FormulaError:
        where = self.base + (self.src.position(node) if at is None else at)
        return FormulaError(message, self.formula, where)

    def segment(self, node: ast.AST) -> str:
        text = ast.get_source_segment(self.src.text, node) or ast.unparse(node)
        for ident, name in self.src.quoted.items():
            text = text.replace(ident, f"`{name}`")
        return text

    def name_of(self, node: ast.Name) -> str:
        return self.src.quoted.get(node.id, node.id)

    # visitors --------------------------------------------------------------------------------

    def generic_visit(self, node: ast.AST) -> None:
        # the children first (the leftmost, innermost offence is the one reported), except
        # under constructs that bind names of their own (lambdas, comprehensions, :=)
        if not isinstance(node, _SCOPES):
            super().generic_visit(node)
        if not isinstance(node, _ALLOWED_NODES):
            word = _NODE_WORDS.get(type(node), f"'{type(node).__name__}' expressions")
            raise self.fail(f"{word} such as '{self.segment(node)}' are not allowed in a "
                            "formula", node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.src.quoted:  # a backtick-quoted column name
            name = self.src.quoted[node.id]
            if self.names is not None and name not in self.names:
                raise self.fail(f"unknown name '{name}' in the formula: not a column of the "
                                "data nor a name passed in context=", node)
            return
        if _is_dunder(node.id) or node.id.startswith("_ngmm_quoted_"):
            raise self.fail(f"the name '{node.id}' is refused: a formula may not reach "
                            "Python's internals (dunder names)", node)
        if not isinstance(node.ctx, ast.Load):
            raise self.fail(f"assignment to '{node.id}' is not allowed in a formula", node)
        if self.names is not None and node.id not in self.names and node.id not in TRANSFORMS:
            raise self.fail(f"unknown name '{node.id}' in the formula: not a column of the "
                            "data, a formula transform (such as log, scale, poly, C, I, np.<f>) "
                            "nor a name passed in context=", node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.visit(node.value)
        dot = self.src.position(node) + len(self.segment(node.value))
        if _is_dunder(node.attr):
            raise self.fail(f"the attribute '{node.attr}' in '{self.segment(node)}' is refused: "
                            "a formula may not reach Python's internals (dunder names)",
                            node, dot)
        value = node.value
        if not isinstance(value, ast.Name) or value.id not in _MODULES:
            seg = self.segment(node)
            hint = (f"; quote a column whose name has a dot with backticks, as `{seg}`"
                    if re.fullmatch(r"[\w.]+", seg) else "")
            raise self.fail(f"attribute access '{seg}' is not allowed in a formula (only "
                            f"np.<function>, numpy.<function> and contr.<contrast>){hint}",
                            node, dot)
        if node.attr not in _MODULES[value.id]:
            allowed = "a contrast" if value.id == "contr" else "an allowed numpy function"
            raise self.fail(f"'{self.segment(node)}' is not {allowed} in a formula", node, dot)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id not in self.src.quoted:
            if (func.id in _BUILTIN_NAMES and not _is_dunder(func.id)
                    and (self.names is None or func.id not in self.names)):
                raise self.fail(f"'{func.id}()' is not allowed in a formula: Python's "
                                "built-in functions are not formula transforms", func)
            if (self.names is not None and func.id not in TRANSFORMS
                    and func.id not in self.names and not _is_dunder(func.id)):
                raise self.fail(f"unknown function '{func.id}()' in the formula: not a formula "
                                "transform; pass your own functions in context=", func)
        self.visit(func)
        if not isinstance(func, (ast.Name, ast.Attribute)):
            raise self.fail(f"only named functions may be called in a formula, not "
                            f"'{self.segment(func)}'", func)
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(f"'**{self.segment(kw.value)}' (keyword unpacking) is not "
                                "allowed in a formula", kw)
            if _is_dunder(kw.arg):
                raise self.fail(f"the keyword '{kw.arg}' is refused: a formula may not reach "
                                "Python's internals (dunder names)", kw)
        if isinstance(func, ast.Name) and func.id == "Q":
            # formulaic's Q('name') looks a name up by string: only a column may be named
            if (len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Constant)
                    or not isinstance(node.args[0].value, str)):
                raise self.fail("Q() takes one quoted column name, as in Q('my col')", node)
            name = node.args[0].value
            if _is_dunder(name) or (self.names is not None and name not in self.names):
                raise self.fail(f"Q('{name}') does not name a column of the data", node.args[0])
        for child in (*node.args, *node.keywords):
            self.visit(child)

    def visit_Dict(self, node: ast.Dict) -> None:
        if any(k is None for k in node.keys):
            raise self.fail("dictionary unpacking (**) is not allowed in a formula", node)
        self.generic_visit(node)


# --------------------------------------------------------------------------------------------
# identifiers

#: An R/Python-style column name: a letter (any script), ``_`` or ``.`` first, then letters,
#: digits, ``_`` and ``.``.
IDENTIFIER = re.compile(r"(?:[^\W\d]|\.)[\w.]*")


def check_identifier(name: str, formula: str | None = None, pos: int = 0,
                     names: Collection[str] | None = None, *, what: str = "name") -> str:
    """Check a column name written in a formula (plain or backtick-quoted); return it
    unquoted.

    Parameters
    ----------
    name : str
        ``g``, ``élève``, ``Sepal.Length`` or ``` `my g` ```.
    formula, pos : str, int
        The formula and the position of ``name`` in it, for the caret.
    names : collection of str, optional
        The data's column names (and ``context=`` names); None: not known yet.
    what : str
        What the name is, for the message (``"grouping factor"``).

    Raises
    ------
    FormulaError
    """
    text = formula if formula is not None else name
    base = pos if formula is not None else 0
    if len(name) >= 2 and name.startswith("`") and name.endswith("`"):
        bare = name[1:-1]
        if not bare.strip() or "`" in bare:
            raise FormulaError(f"{what} {name} is not a column name", text, base)
    else:
        bare = name
        if not IDENTIFIER.fullmatch(name):
            raise FormulaError(f"{what} '{name}' must be a column name (quote names with "
                               "spaces or symbols in backticks, as `my col`)", text, base)
        part = _dunder_part(name)
        if part is not None:
            raise FormulaError(f"the {what} '{name}' is refused: a formula may not reach "
                               f"Python's internals (dunder name '{part}')", text,
                               base + name.find(part))
    if names is not None and bare not in names:
        raise FormulaError(f"{what} '{bare}' is not a column of the data", text, base)
    return bare


# --------------------------------------------------------------------------------------------
# the formula-level grammar


@dataclass
class Token:
    """One token of a formula part, as formulaic's tokenizer cuts it.

    ``kind`` is ``"name"`` (a column looked up by name; ``quoted`` when written in
    backticks), ``"python"`` (code that formulaic evaluates: ``f(...)`` or the inside of
    ``{...}``), ``"value"`` (a number or a string), ``"operator"`` or ``"context"`` (a
    grouping parenthesis). ``start`` is the position of the token's first character.
    """

    kind: str | None = None
    text: str = ""
    start: int = -1
    quoted: bool = False

    def add(self, ch: str, i: int, kind: str | None = None) -> None:
        if self.start < 0:
            self.start = i
        self.text += ch
        if kind is not None:
            self.kind = kind


_WORD = re.compile(r"[._\w]")
_NUMERIC = re.compile(r"[0-9.]")


def formula_tokens(text: str, formula: str | None = None, pos: int = 0) -> list[Token]:
    """Cut a formula part (formulaic syntax) into tokens as formulaic does.

    A faithful port of ``formulaic.parser.algos.tokenize`` (formulaic 1.x, MIT licence), so
    that the pieces checked here are the pieces formulaic evaluates: its loop over the
    characters is this function's, its branches for a character inside quotes (or brackets
    of Python code) are :meth:`_Tokenizer.quoted` and the others :meth:`_Tokenizer.unquoted`,
    in formulaic's order.

    Raises
    ------
    FormulaError
        Where formulaic's tokenizer raises (an unclosed quote, a misplaced quote).
    """
    where = formula if formula is not None else text
    base = pos if formula is not None else 0
    state = _Tokenizer(where, base)
    for i, ch in enumerate(text):
        if state.take > 0:
            state.tok.add(ch, i)
            state.take -= 1
            continue
        if state.quote and state.quoted(ch, i):
            continue
        state.unquoted(ch, i)
    if state.quote:
        raise FormulaError(f"the formula ends before a closing {state.quote[-1]}", where,
                           base + max(state.tok.start, 0))
    state.flush()
    return state.out


@dataclass
class _Tokenizer:
    """The state of :func:`formula_tokens`: the tokens so far, the token being read, the
    open quotes and brackets (innermost last), and the characters still to take verbatim
    (after a backslash).

    Parameters
    ----------
    where : str
        The formula that errors point into.
    base : int
        The position of the formula part in ``where``.
    """

    where: str
    base: int
    out: list[Token] = field(default_factory=list)
    quote: list[str] = field(default_factory=list)
    take: int = 0
    tok: Token = field(default_factory=Token)

    def flush(self) -> None:
        """End the current token (kept when it has text) and start an empty one."""
        if self.tok.text:
            self.out.append(self.tok)
        self.tok = Token()

    def quoted(self, ch: str, i: int) -> bool:
        """Read character ``ch`` at ``i`` inside a quote or bracket; False when it is not
        one of the quoted cases (it then is read as :meth:`unquoted`)."""
        quote = self.quote
        if ch == "\\":
            self.tok.add(ch, i)
            self.take = 1
            return True
        if quote[-1] in "}`%" and ch == quote[-1]:
            quote.pop()
            if self.tok.text:
                if quote:
                    self.tok.add(ch, i)
                else:
                    self.flush()
            return True
        if ch == quote[-1]:
            self.tok.add(ch, i)
            quote.pop()
            return True
        if quote[-1] in ('"', "'", "`", ")", "]", "}", "%"):
            if ch in "`([" and quote[-1] in "})]":
                quote.append({"(": ")", "[": "]"}.get(ch, ch))
            self.tok.add(ch, i)
            return True
        return False

    def unquoted(self, ch: str, i: int) -> None:
        """Read character ``ch`` at ``i`` outside quotes: an opening quote or bracket, a
        grouping parenthesis, a space, or a character of a name, value or operator."""
        if ch == "%":
            self.flush()
            self.tok = Token("operator")
            self.quote.append("%")
        elif ch == "{":
            self.flush()
            self.tok = Token("python")
            self.quote.append("}")
        elif ch == "`":
            self.flush()
            self.tok = Token("name", quoted=True)
            self.quote.append("`")
        elif ch in "([":
            if self.tok.kind in ("name", "python"):
                self.tok.add(ch, i, "python")
                self.quote.append(")" if ch == "(" else "]")
            else:
                self.flush()
                self.out.append(Token("context", ch, i))
        elif ch in ")]":
            self.flush()
            self.out.append(Token("context", ch, i))
        elif ch.isspace():
            if self.tok.text and self.tok.kind != "operator":
                self.flush()
        elif ch in "\"'":
            if self.tok.text and self.tok.kind == "operator":
                self.flush()
            if not self.tok.text:
                self.tok.add(ch, i, "value")
                self.quote.append(ch)
            else:
                raise FormulaError(f"unexpected {ch} after '{self.tok.text}'", self.where,
                                   self.base + i)
        elif _WORD.match(ch):
            if self.tok.text and self.tok.kind in ("operator", "python"):
                self.flush()
            if self.tok.kind not in (None, "value", "name"):
                raise FormulaError(f"unexpected character {ch!r}", self.where, self.base + i)
            kind = ("value" if _NUMERIC.match(ch) and self.tok.kind in (None, "value")
                    else "name")
            self.tok.add(ch, i, kind)
        else:
            if self.tok.text and self.tok.kind != "operator":
                self.flush()
            self.tok.add(ch, i, "operator")


def check_terms(text: str, formula: str | None = None, pos: int = 0,
                names: Collection[str] | None = None) -> None:
    """Check one part of a formula written in formulaic's syntax (the fixed part, the left
    side of a bar term): every Python piece with :func:`check_python`, every bare name with
    :func:`check_identifier`'s dunder rule (and, when ``names`` is given, against them).

    Raises
    ------
    FormulaError
    """
    where = formula if formula is not None else text
    base = pos if formula is not None else 0
    for tok in formula_tokens(text, where, base):
        at = base + tok.start
        if tok.kind == "python":
            check_python(tok.text, where, at, names)
        elif tok.kind == "name":
            if tok.quoted:
                if names is not None and tok.text not in names:
                    raise FormulaError(f"unknown name '{tok.text}' in the formula: not a "
                                       "column of the data nor a name passed in context=",
                                       where, at - 1)
                continue
            if tok.text == ".":
                continue
            part = _dunder_part(tok.text)
            if part is not None:
                raise FormulaError(f"the name '{tok.text}' is refused: a formula may not reach "
                                   f"Python's internals (dunder name '{part}')", where,
                                   at + tok.text.find(part))
            if names is not None and tok.text not in names:
                raise FormulaError(f"unknown name '{tok.text}' in the formula: not a column "
                                   "of the data nor a name passed in context=", where, at)
