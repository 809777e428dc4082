"""Griffe extension for the documentation site: turns the reStructuredText that the numpydoc
docstrings use into Markdown while mkdocstrings renders them.

The docstrings themselves stay as they are, so ``help()`` in a terminal keeps showing the
plain, readable forms (``:math:`\\hat\\beta```, ``:func:`ngmm```). Only the site sees:

* ``:math:`TeX``` and ``.. math::`` blocks as MathML, converted at build time by
  ``latex2mathml`` (pure Python): no JavaScript and no network when the page is viewed;
  browsers render MathML natively (MathML Core);
* ``:func:`a.b```, ``:class:`~a.b.C``` and the other Python-domain roles as inline code
  (``a.b()``, ``C``: a leading ``~`` keeps the last component, as in Sphinx);
* reStructuredText simple tables (``=====  =====`` borders) as Markdown tables;
* ``text::`` before an indented literal block as ``text:`` (the indented block is then
  Markdown's code block).

Loaded by mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe
from latex2mathml.converter import convert

_ROLE = re.compile(r":(?:py:)?(func|meth|class|attr|mod|data|obj|exc|const):`([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_BORDER = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


def _mathml(tex: str, display: bool) -> str:
    """MathML for ``tex``, on one line, with the characters that Markdown would read as
    markup (``* _ ` [ ] \\``) written as character references in the text nodes."""
    # "\_" in \text{} is an underscore (latex2mathml would keep the backslash)
    tex = re.sub(r"\\text\{([^}]*)\}", lambda m: m.group(0).replace("\\_", "_"), tex)
    out = convert(tex.strip(), display="block" if display else "inline")
    out = out.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', "").replace("\n", " ")

    def text(m: re.Match[str]) -> str:
        return ">" + "".join(f"&#{ord(c)};" if c in "*_`[]\\" else c for c in m.group(1)) + "<"

    return re.sub(r">([^<]+)<", text, out)


def _role(m: re.Match[str]) -> str:
    kind, target = m.group(1), m.group(2).strip()
    explicit = re.fullmatch(r"(.+?)\s*<(.+)>", target)
    if explicit:  # :func:`title <target>`
        name = explicit.group(1)
    else:
        name = target.split(".")[-1] if target.startswith("~") else target
        name = name.lstrip("~")
        if kind in ("func", "meth") and not name.endswith(")"):
            name += "()"
    return f"`{name}`"


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math::`` and its indented body (equations separated by blank lines) become one
    line of display MathML per equation, at the directive's indentation."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, first = m.group(1), m.group(2)
        body: list[str] = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # the blank lines after the block stay
            body.pop()
            i -= 1
        equations = "\n".join(body).strip().split("\n\n")
        for k, eq in enumerate(e for e in equations if e.strip()):
            if k:
                out.append("")
            out.append(indent + _mathml(" ".join(eq.split()), display=True))
    return out


def _cells(line: str, starts: list[int]) -> list[str]:
    """A simple table's row split at the columns' start offsets (the last takes the rest)."""
    ends = [*starts[1:], len(line)]
    return [line[a:b].strip() for a, b in zip(starts, ends)]


def _simple_tables(lines: list[str]) -> list[str]:
    """reStructuredText simple tables (a header between the first two ``=`` borders, rows up
    to the third; a row whose first column is empty continues the previous row) become
    Markdown tables."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        borders = [j for j in range(i, len(lines)) if _BORDER.match(lines[j])][:3]
        if not m or len(borders) < 3 or any(not lines[j].strip() for j in range(i, borders[2])):
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        starts = [s.start() for s in re.finditer(r"=+", lines[i])]
        header = [_cells(x, starts) for x in lines[borders[0] + 1:borders[1]]]
        rows: list[list[str]] = []
        for line in lines[borders[1] + 1:borders[2]]:
            c = _cells(line, starts)
            if rows and not c[0]:
                rows[-1] = [f"{p}<br>{q}" if p and q else p or q for p, q in zip(rows[-1], c)]
            else:
                rows.append(c)
        head = [" ".join(col).strip() for col in zip(*header)] if header else [""] * len(starts)
        out.append(indent + "| " + " | ".join(head) + " |")
        out.append(indent + "|" + "|".join("---" for _ in starts) + "|")
        out.extend(indent + "| " + " | ".join(r) + " |" for r in rows)
        i = borders[2] + 1
    return out


def rewrite(text: str) -> str:
    """The Markdown that the site renders for a docstring's reStructuredText."""
    lines = _simple_tables(_math_blocks(text.split("\n")))
    text = "\n".join(lines)
    # inline math inside a <span>: Python-Markdown counts <math> as a block-level tag, so a
    # line starting with a bare <math> would break the paragraph
    text = _MATH.sub(lambda m: '<span class="math">' + _mathml(m.group(1), display=False)
                     + "</span>", text)
    text = _ROLE.sub(_role, text)
    # a literal block: "text::" -> "text:", a lone "::" line disappears
    text = re.sub(r"(?m)^[ \t]*::[ \t]*$", "", text)
    text = re.sub(r"(?m)(\S)::[ \t]*$", r"\1:", text)
    return text


class SphinxToMarkdown(griffe.Extension):
    """Rewrites every docstring as it is loaded (see the module docstring)."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
