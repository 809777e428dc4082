"""Formula layer: an lme4-style model formula string -> :class:`ParsedFormula`.

No data are touched here. The right-hand side of a formula such as::

    cbind(s, f) ~ nn(x1, x2, hidden=(32, 32)) + x3 + offset(log(t)) + (1 + x3 | school)

is split at its top-level ``+``/``-`` operators into

* bar terms ``(expr | group)`` and ``(expr || group)`` -- the random effects, expanded as lme4's
  ``findbars``/``expandSlash``/``expandDoubleVerts`` do: ``(x || g)`` becomes ``(1 | g) +
  (0 + x | g)``, ``(1 | a/b)`` becomes ``(1 | b:a) + (1 | a)``;
* neural terms ``nn(v1, v2, ..., hidden=(64, 64), activation="relu", dropout=0.0,
  additive=32)`` (``additive``: hidden units of the network's additive part per numeric
  input, 0 for none; :class:`~ngmm_formula.networks.Additive`);
* ``offset(expr)`` terms;
* everything else, which is handed unchanged to formulaic as the fixed part (``C()``, ``I()``,
  interactions, ``scale()``, ``poly()``, ``0 +`` / ``- 1`` ...).

Bars must be removed before formulaic sees the string because formulaic reads ``|`` as the
separator of a multi-part formula. A malformed formula raises :class:`FormulaError` quoting the
formula with a caret under the offending position.

Every Python expression of the formula (the fixed part, the bar terms' left sides and grouping
factors, the ``nn()``, ``offset()`` and ``cbind()`` arguments, the response) is checked by
:mod:`ngmm_formula.safety` before anything is evaluated: no dunder names or attributes, no
attribute access but ``np.<f>``/``numpy.<f>``/``contr.<c>``, no subscripts, lambdas,
comprehensions or calls of Python's built-ins. Given the data's column names
(``parse_formula(formula, names=...)``, as the design layer does), every name must moreover be
a column, a formula transform or a name passed in ``context=``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from ngmm_formula.errors import FormulaError
from ngmm_formula.safety import IDENTIFIER, check_identifier, check_python, check_terms

__all__ = ["BarTerm", "NNTerm", "ParsedFormula", "parse_formula", "ACTIVATIONS"]

#: Activation functions accepted by ``nn(..., activation=...)``.
ACTIVATIONS = ("relu", "tanh", "gelu", "silu", "elu", "sigmoid", "softplus")

_NN_DEFAULTS: dict[str, object] = {"hidden": (64, 64), "activation": "relu", "dropout": 0.0,
                                   "additive": 32}


@dataclass(frozen=True)
class BarTerm:
    """One random-effects term ``(expr | group)`` after lme4's expansion.

    Attributes
    ----------
    expr : str
        The left side of the bar, the term's model formula (``"1"``, ``"1 + Days"``,
        ``"0 + Days"``).
    group : str
        The grouping factor, possibly an interaction such as ``"BROOD:LOCATION"``; a column
        name that is not an identifier keeps its backticks (``"`my g`:school"``).
    correlated : bool
        False for the terms produced by expanding ``||`` (their covariance is diagonal).
    rank : int or None
        ``d`` of a reduced-rank term ``rr(expr | group, d = d)`` (glmmTMB's syntax): the
        term's q random effects are :math:`b_g = \\Lambda z_g` with a q x d loading matrix
        :math:`\\Lambda` and :math:`z_g \\sim N(0, I_d)`; None for an ordinary term.
    """

    expr: str
    group: str
    correlated: bool = True
    rank: int | None = None

    @property
    def group_factors(self) -> tuple[str, ...]:
        """The data columns whose interaction forms the grouping factor (unquoted)."""
        return tuple(_unquote(p) for p, _ in _split_outside_backticks(self.group, ":"))

    def __str__(self) -> str:
        if self.rank is not None:
            return f"rr({self.expr} | {self.group}, d = {self.rank})"
        return f"({self.expr} | {self.group})"


@dataclass(frozen=True)
class NNTerm:
    """A neural term ``nn(v1, v2, ..., hidden=..., activation=..., dropout=..., additive=...)``.

    The network :math:`f(x; w)` maps the standardised inputs to one number that is added to
    the linear predictor; its output is centred on the training data and it has no final
    bias, so the intercept stays in the linear part.
    """

    variables: tuple[str, ...]
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    dropout: float = 0.0
    additive: int = 32

    @property
    def label(self) -> str:
        """Name used in summaries, e.g. ``nn(age, livch)``."""
        return f"nn({', '.join(self.variables)})"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class ParsedFormula:
    """A parsed model formula: response, fixed part, random-effects terms, neural terms.

    Attributes
    ----------
    formula : str
        The formula as the user wrote it.
    response : str or None
        The response expression (``"Reaction"``, ``"log(y)"``); ``None`` for ``cbind``.
    response_cbind : tuple of two str or None
        ``(successes, failures)`` expressions of a ``cbind(successes, failures)`` response.
    fixed : str
        Right-hand side of the fixed (linear) part in formulaic syntax; ``"1"`` when only bars
        and neural terms were given (the intercept is kept, as in lme4).
    bars : tuple of BarTerm
        Random-effects terms in the order written, after expansion of ``/`` and ``||``
        (lme4's ordering by number of levels needs the data and happens in the design layer).
    nn_terms : tuple of NNTerm
    offsets : tuple of str
        Expressions inside ``offset(...)`` terms.
    """

    formula: str
    response: str | None
    fixed: str
    bars: tuple[BarTerm, ...] = field(default_factory=tuple)
    nn_terms: tuple[NNTerm, ...] = field(default_factory=tuple)
    offsets: tuple[str, ...] = field(default_factory=tuple)
    response_cbind: tuple[str, str] | None = None

    @property
    def has_random(self) -> bool:
        return bool(self.bars)

    @property
    def is_linear(self) -> bool:
        """True when the model has no neural terms (it is then exactly a GLMM)."""
        return not self.nn_terms

    @property
    def linear_formula(self) -> str:
        """The formula with each ``nn(a, b)`` replaced by ``a + b`` (the comparable GLMM)."""
        rhs = [self.fixed]
        for t in self.nn_terms:
            rhs.extend(t.variables)
        rhs.extend(f"offset({o})" for o in self.offsets)
        rhs.extend(str(b) for b in self.bars)
        return f"{self.lhs} ~ {' + '.join(rhs)}"

    @property
    def lhs(self) -> str:
        if self.response_cbind is not None:
            return f"cbind({self.response_cbind[0]}, {self.response_cbind[1]})"
        return self.response or ""

    def variables(self) -> set[str]:
        """Names that look like data columns anywhere in the formula (used for NA handling)."""
        names: set[str] = set()
        exprs = [self.fixed, *self.offsets, *(b.expr for b in self.bars)]
        exprs += list(self.response_cbind or ())
        if self.response:
            exprs.append(self.response)
        for e in exprs:
            names |= _expression_names(e)
        for b in self.bars:
            names |= set(b.group_factors)
        for t in self.nn_terms:
            names |= set(t.variables)
        return names


# --------------------------------------------------------------------------------------------
# scanning helpers


def _fail(msg: str, formula: str, pos: int | None) -> FormulaError:
    return FormulaError(msg, formula, pos)


def _check_parens(text: str, base: int, formula: str) -> None:
    stack: list[tuple[str, int]] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    quote: str | None = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            stack.append((ch, i))
        elif ch in ")]}":
            if not stack or stack[-1][0] != pairs[ch]:
                raise _fail(f"unmatched '{ch}' in formula", formula, base + i)
            stack.pop()
    if quote:
        raise _fail("unterminated string in formula", formula, None)
    if stack:
        raise _fail(f"unbalanced '{stack[-1][0]}' in formula (never closed)", formula,
                    base + stack[-1][1])


def _split_top(text: str, seps: str) -> list[tuple[str, int, str]]:
    """Split ``text`` at depth-0 characters in ``seps``.

    Returns (chunk, start offset of the chunk, separator that preceded it ("" first)).
    """
    out: list[tuple[str, int, str]] = []
    depth = 0
    quote: str | None = None
    start = 0
    prev = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in seps:
            out.append((text[start:i], start, prev))
            prev = ch
            start = i + 1
    out.append((text[start:], start, prev))
    return out


def _split_outside_backticks(text: str, sep: str) -> list[tuple[str, int]]:
    """Split ``text`` at ``sep`` outside backtick-quoted names: (piece, offset of the piece)."""
    out: list[tuple[str, int]] = []
    start = 0
    quoted = False
    for i, ch in enumerate(text):
        if ch == "`":
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append((text[start:i], start))
            start = i + 1
    out.append((text[start:], start))
    return out


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name.startswith("`") and name.endswith("`"):
        return name[1:-1]
    return name


def _strip_with_offset(chunk: str, offset: int) -> tuple[str, int]:
    lead = len(chunk) - len(chunk.lstrip())
    return chunk.strip(), offset + lead


def _call_parts(chunk: str, name: str) -> str | None:
    """If ``chunk`` is exactly ``name(...)`` return the inside, else None."""
    m = re.match(rf"^{name}\s*\(", chunk)
    if not m or not chunk.endswith(")"):
        return None
    inner = chunk[m.end() : -1]
    # the opening parenthesis must close at the very end
    depth = 1
    for ch in inner:
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return None
    return inner


def _expression_names(expr: str) -> set[str]:
    """Identifiers in an R/formulaic expression that are not function names."""
    names: set[str] = set()
    for m in re.finditer(r"`([^`]+)`|([A-Za-z_.][A-Za-z0-9_.]*)", expr):
        if m.group(1):
            names.add(m.group(1))
            continue
        tok = m.group(2)
        rest = expr[m.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function call
        if rest.startswith("=") and not rest.startswith("=="):
            continue  # a keyword argument
        if re.fullmatch(r"[0-9.]+", tok) or tok in {"True", "False", "None", "TRUE", "FALSE"}:
            continue
        names.add(tok)
    return names


# --------------------------------------------------------------------------------------------
# bar terms


def _expand_bar(inner: str, pos: int, formula: str,
                names: Collection[str] | None = None) -> list[BarTerm]:
    parts = _split_top(inner, "|")
    if len(parts) == 3 and parts[1][0] == "" :
        # "a || g": the middle chunk between the two bars is empty
        lhs, lpos = _strip_with_offset(parts[0][0], pos + parts[0][1])
        grp, gpos = _strip_with_offset(parts[2][0], pos + parts[2][1])
        double = True
    elif len(parts) == 2:
        lhs, lpos = _strip_with_offset(parts[0][0], pos + parts[0][1])
        grp, gpos = _strip_with_offset(parts[1][0], pos + parts[1][1])
        double = False
    else:
        bad = pos + parts[2][1] - 1 if len(parts) > 2 else pos
        raise _fail("a random-effects term has exactly one '|' (or '||'), as in (1 | g)",
                    formula, bad)
    if not lhs:
        raise _fail("empty left side of a random-effects term: write (1 | g) for a random "
                    "intercept", formula, lpos)
    if not grp:
        raise _fail("missing grouping factor after '|' in a random-effects term", formula, gpos)
    groups = _expand_slash(grp, gpos, formula, names)
    if "nn(" in lhs.replace(" ", ""):
        raise _fail("nn() terms cannot appear inside a random-effects term", formula, lpos)
    check_terms(lhs, formula, lpos, names)
    terms: list[BarTerm] = []
    for g in groups:
        if double:
            terms.extend(_expand_double_verts(lhs, g, lpos, formula))
        else:
            terms.append(BarTerm(_normalise(lhs), g, True))
    return terms


#: glmmTMB's default rank of ``rr()`` terms.
RR_DEFAULT_RANK = 2


def _parse_rr(inner: str, pos: int, formula: str,
              names: Collection[str] | None = None) -> BarTerm:
    """``rr(expr | group, d = K)``: a reduced-rank term (``d`` defaults to 2, as glmmTMB)."""
    args = _split_top(inner, ",")
    body, bpos = _strip_with_offset(args[0][0], pos + args[0][1])
    rank = RR_DEFAULT_RANK
    if len(args) > 2:
        raise _fail("rr() takes the term and d, as in rr(0 + item | id, d = 2)", formula,
                    pos + args[2][1])
    if len(args) == 2:
        arg, apos = _strip_with_offset(args[1][0], pos + args[1][1])
        m = re.fullmatch(r"d\s*=\s*(\S+)", arg)
        if m is None:
            raise _fail("rr()'s second argument is d = <positive integer>", formula, apos)
        if not re.fullmatch(r"[0-9]+", m.group(1)) or int(m.group(1)) < 1:
            raise _fail(f"d in rr() must be a positive integer, got {m.group(1)!r}", formula,
                        apos + arg.index(m.group(1)))
        rank = int(m.group(1))
    parts = _split_top(body, "|")
    if len(parts) != 2:
        raise _fail("rr() needs one term with exactly one '|', as in rr(0 + item | id, d = 1)",
                    formula, bpos)
    if "/" in parts[1][0]:
        raise _fail("rr() takes a single grouping factor (no nesting with '/')", formula,
                    bpos + parts[1][1])
    terms = _expand_bar(body, bpos, formula, names)
    return dataclasses.replace(terms[0], rank=rank)


def _expand_slash(grp: str, pos: int, formula: str,
                  names: Collection[str] | None = None) -> list[str]:
    """lme4's expandSlash: ``a/b/c`` -> ``c:b:a``, ``b:a``, ``a`` (innermost first).

    Each factor is a column name: any identifier valid in the fixed part (``élève``,
    ``Sepal.Length``) or a backtick-quoted name (``` `my g` ```), checked by
    :func:`~ngmm_formula.safety.check_identifier`.
    """
    depth = 0
    quoted = False
    for i, ch in enumerate(grp):
        if ch == "`":
            quoted = not quoted
        if quoted:
            continue
        depth += ch == "("
        depth -= ch == ")"
        if ch in "+*-|~" and depth == 0:
            raise _fail(f"grouping factor '{grp}' may only combine variables with ':' "
                        "or '/'", formula, pos + i)
    pieces: list[str] = []
    for piece, poff in _split_outside_backticks(grp, "/"):
        if not piece.strip():
            raise _fail("empty factor in a nested grouping 'a/b'", formula, pos)
        factors = []
        for factor, foff in _split_outside_backticks(piece, ":"):
            f, fpos = _strip_with_offset(factor, pos + poff + foff)
            if not f:
                raise _fail("empty factor in an interaction 'a:b'", formula, fpos)
            bare = check_identifier(f, formula, fpos, names, what="grouping factor")
            # backticks only where a name needs them (so "`g`" and "g" are the same factor)
            factors.append(bare if IDENTIFIER.fullmatch(bare) else f"`{bare}`")
        pieces.append(":".join(factors))
    out = []
    for k in range(len(pieces), 0, -1):
        out.append(":".join(reversed(pieces[:k])))
    return out


def _expand_double_verts(lhs: str, group: str, pos: int, formula: str) -> list[BarTerm]:
    """lme4's expandDoubleVerts: ``(1 + x + z || g)`` -> ``(1|g) + (0+x|g) + (0+z|g)``."""
    chunks = _split_top(lhs, "+-")
    intercept = True
    slopes: list[str] = []
    for text, _, sep in chunks:
        t = text.strip()
        if not t:
            continue
        if t in ("0", "1"):
            if sep == "-" or t == "0":
                intercept = False
            continue
        if sep == "-":
            raise _fail("only '- 1' or '0 +' may be subtracted inside (... || g)", formula, pos)
        slopes.append(t)
    terms = []
    if intercept:
        terms.append(BarTerm("1", group, False))
    terms.extend(BarTerm(f"0 + {s}", group, False) for s in slopes)
    if not terms:
        raise _fail("a '||' term without any random effect", formula, pos)
    return terms


def _normalise(expr: str) -> str:
    return re.sub(r"\s+", " ", expr.strip())


# --------------------------------------------------------------------------------------------
# nn terms


def _parse_nn(inner: str, pos: int, formula: str,
              names: Collection[str] | None = None) -> NNTerm:
    try:
        call = ast.parse(f"nn({inner})", mode="eval").body
    except SyntaxError as exc:
        off = (exc.offset or 4) - 4
        raise _fail("cannot read the arguments of nn(...)", formula, pos + max(0, off)) from None
    assert isinstance(call, ast.Call)
    variables: list[str] = []
    for arg in call.args:
        if isinstance(arg, ast.Name):
            check_identifier(arg.id, formula, pos + max(0, arg.col_offset - 3), names,
                             what="nn() input")
            variables.append(arg.id)
        else:
            seg = ast.get_source_segment(f"nn({inner})", arg) or "?"
            raise _fail(f"nn() takes column names, got '{seg}'", formula,
                        pos + max(0, arg.col_offset - 3))
    if not variables:
        raise _fail("nn() needs at least one variable, as in nn(x1, x2)", formula, pos - 3)
    for k, arg in enumerate(call.args):
        if variables.index(variables[k]) < k:
            raise _fail(f"the variable '{variables[k]}' appears twice in nn()", formula,
                        pos + arg.col_offset - 3)
    opts: dict[str, object] = dict(_NN_DEFAULTS)
    opt_pos: dict[str, int] = {}  # where each option's value starts, for the caret
    for kw in call.keywords:
        kpos = pos + max(0, kw.value.col_offset - 3)
        if kw.arg not in _NN_DEFAULTS:
            raise _fail(f"unknown nn() option '{kw.arg}'; allowed: "
                        f"{', '.join(_NN_DEFAULTS)}", formula, pos + max(0, kw.col_offset - 3))
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            raise _fail(f"nn() option '{kw.arg}' must be a literal", formula, kpos) from None
        opts[kw.arg] = value
        opt_pos[kw.arg] = kpos
    hidden = opts["hidden"]
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if (not isinstance(hidden, (tuple, list))
            or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)):
        raise _fail(f"nn() option 'hidden' must be a tuple of positive integers, got {hidden!r}",
                    formula, opt_pos.get("hidden", pos))
    act = opts["activation"]
    if act not in ACTIVATIONS:
        raise _fail(f"nn() activation {act!r} is not one of {', '.join(ACTIVATIONS)}",
                    formula, opt_pos.get("activation", pos))
    drop = opts["dropout"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise _fail(f"nn() option 'dropout' must be a number in [0, 1), got {drop!r}",
                    formula, opt_pos.get("dropout", pos))
    additive = opts["additive"]
    if isinstance(additive, bool) or not isinstance(additive, int) or additive < 0:
        raise _fail(f"nn() option 'additive' must be an integer >= 0 (hidden units per numeric "
                    f"input; 0: none), got {additive!r}", formula, opt_pos.get("additive", pos))
    return NNTerm(tuple(variables), tuple(hidden), str(act), float(drop), additive)


# --------------------------------------------------------------------------------------------
# entry point


def parse_formula(formula: str, *, names: Collection[str] | None = None) -> ParsedFormula:
    """Parse an lme4-style formula with optional ``nn()`` terms.

    Every Python expression of the formula is checked before anything is evaluated
    (:mod:`ngmm_formula.safety`).

    Parameters
    ----------
    formula : str
        ``response ~ fixed + nn(...) + (re | group) + offset(...)``.
    names : collection of str, optional
        The names the data provide: their columns and the names passed in ``context=``. When
        given, every name in the formula must be one of them or a formula transform
        (:data:`ngmm_formula.safety.TRANSFORMS`); the design layer passes them.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    FormulaError
        With the formula quoted and a caret under the offending position.

    Examples
    --------
    >>> p = parse_formula("Reaction ~ Days + (Days || Subject)")
    >>> [str(b) for b in p.bars]
    ['(1 | Subject)', '(0 + Days | Subject)']
    """
    lhs, lhs_pos, rhs_text, rhs_start = _split_tilde(formula)
    response, cbind = _parse_response(lhs, lhs_pos, formula, names)
    if not rhs_text.strip():
        raise _fail("nothing on the right of '~'", formula, len(formula))

    bars: list[BarTerm] = []
    bar_pos: list[int] = []  # start of the written term each bar came from (for the caret)
    nns: list[NNTerm] = []
    offsets: list[str] = []
    fixed: list[str] = []
    chunks = _split_top(rhs_text, "+-")
    for k, (chunk, off, sep) in enumerate(chunks):
        text, pos = _strip_with_offset(chunk, rhs_start + off)
        if not text:
            # "-1" at the start gives an empty first chunk; anything else is an error
            if k == 0 and len(chunks) > 1 and chunks[1][2] == "-":
                continue
            where = pos if k > 0 else rhs_start
            raise _fail(f"missing term {'after' if k else 'before'} '{sep or '+'}'", formula,
                        where)
        bar_terms = _random_term(text, pos, sep, formula, names)
        if bar_terms is not None:
            bars.extend(bar_terms)
            bar_pos.extend([pos] * len(bar_terms))
            continue
        nn_inner = _call_parts(text, "nn")
        if nn_inner is not None:
            if sep == "-":
                raise _fail("an nn() term cannot be subtracted", formula, pos)
            nns.append(_parse_nn(nn_inner, pos + text.index("(") + 1, formula, names))
            continue
        off_inner = _call_parts(text, "offset")
        if off_inner is not None:
            if not off_inner.strip():
                raise _fail("offset() needs an expression", formula, pos)
            check_python(off_inner, formula, pos + text.index("(") + 1, names,
                         what="offset() expression")
            offsets.append(_normalise(off_inner))
            continue
        bar_at = _first_top_bar(text)
        if bar_at is not None:
            raise _fail("a random-effects term must be in parentheses, as in (1 | g)", formula,
                        pos + bar_at)
        if re.search(r"(?<![A-Za-z0-9_.])nn\s*\(", text):
            raise _fail("nn() must be a term of its own, added with '+'", formula,
                        pos + text.find("nn"))
        check_terms(text, formula, pos, names)
        fixed.append(f"{'- ' if sep == '-' else ('+ ' if fixed else '')}{_normalise(text)}")
    fixed_rhs = _fixed_rhs(fixed)
    if not bars and not nns and "|" in rhs_text:
        raise _fail("'|' outside a parenthesised random-effects term", formula,
                    rhs_start + rhs_text.find("|"))
    _check_bars_unique(bars, bar_pos, formula)
    return ParsedFormula(
        formula=formula,
        response=response,
        fixed=fixed_rhs,
        bars=tuple(bars),
        nn_terms=tuple(nns),
        offsets=tuple(offsets),
        response_cbind=cbind,
    )


def _random_term(text: str, pos: int, sep: str, formula: str,
                 names: Collection[str] | None) -> list[BarTerm] | None:
    """The bar terms of one chunk of the right side: ``(expr | g)`` (expanded as lme4 does) or
    ``rr(expr | g, d = K)``; None if the chunk is neither."""
    body = None
    if text.startswith("(") and text.endswith(")") and _call_parts(text, "") is not None:
        body = text[1:-1]
        if len(_split_top(body, "|")) < 2:
            return None
    rr_inner = _call_parts(text, "rr")
    if body is None and rr_inner is None:
        return None
    if sep == "-":
        raise _fail("a random-effects term cannot be subtracted", formula, pos)
    if rr_inner is not None:
        return [_parse_rr(rr_inner, pos + text.index("(") + 1, formula, names)]
    assert body is not None
    return _expand_bar(body, pos + 1, formula, names)


def _split_tilde(formula: str) -> tuple[str, int, str, int]:
    """Response and right-hand side of ``formula``, each with where it starts (a formula that
    is no string, is empty or has unbalanced parentheses raises first)."""
    if not isinstance(formula, str):
        raise FormulaError(f"the formula must be a string, got {type(formula).__name__}")
    if not formula.strip():
        raise FormulaError("the formula is empty", formula, 0)
    _check_parens(formula, 0, formula)
    tilde = _split_top(formula, "~")
    if len(tilde) == 1:
        raise _fail("the formula needs a '~' between response and predictors", formula,
                    len(formula))
    if len(tilde) > 2:
        raise _fail("the formula has more than one '~'", formula, tilde[2][1] - 1)
    lhs, lhs_pos = _strip_with_offset(tilde[0][0], 0)
    rhs_text, rhs_start = tilde[1][0], tilde[1][1]
    if not lhs:
        raise _fail("the formula has no response on the left of '~'", formula, 0)
    return lhs, lhs_pos, rhs_text, rhs_start


def _parse_response(lhs: str, lhs_pos: int, formula: str, names: Collection[str] | None
                    ) -> tuple[str | None, tuple[str, str] | None]:
    """The response (None for ``cbind(successes, failures)``) and the two columns of a
    cbind() response, each checked as the formula's other expressions are."""
    response: str | None = _normalise(lhs)
    cbind: tuple[str, str] | None = None
    inner = _call_parts(lhs, "cbind")
    if inner is not None:
        args = [a for a, _, _ in _split_top(inner, ",")]
        if len(args) != 2 or not all(a.strip() for a in args):
            raise _fail("cbind() in the response takes two arguments: cbind(successes, "
                        "failures)", formula, lhs_pos)
        cbind = (_normalise(args[0]), _normalise(args[1]))
        response = None
        inner_pos = lhs_pos + lhs.index("(") + 1
        for arg, aoff, _ in _split_top(inner, ","):
            check_python(arg, formula, inner_pos + aoff, names, what="cbind() argument")
    elif "|" in lhs:
        raise _fail("'|' is not allowed in the response", formula, lhs_pos + lhs.find("|"))
    elif IDENTIFIER.fullmatch(lhs) or (lhs.startswith("`") and lhs.endswith("`")):
        check_identifier(lhs, formula, lhs_pos, None, what="response")
    else:
        check_python(lhs, formula, lhs_pos, names, what="response")
    return response, cbind


def _fixed_rhs(fixed: list[str]) -> str:
    """The fixed-effect terms as one formulaic right-hand side ("1" when there is none)."""
    fixed_rhs = " ".join(fixed).strip()
    if not fixed_rhs:
        fixed_rhs = "1"
    elif fixed_rhs.startswith("- "):
        fixed_rhs = "1 " + fixed_rhs
    return fixed_rhs


def _check_bars_unique(bars: list[BarTerm], bar_pos: list[int], formula: str) -> None:
    """No random-effects term twice (the caret at the second)."""
    seen: set[tuple[str, str]] = set()
    for b, bpos in zip(bars, bar_pos, strict=True):
        key = (b.expr, b.group)
        if key in seen:
            raise _fail(f"the random-effects term {b} appears twice", formula, bpos)
        seen.add(key)


def _first_top_bar(text: str) -> int | None:
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "|" and depth == 0:
            return i
    return None
