"""The documentation site's docstring conversion (``docs/griffe_sphinx.py``): Sphinx roles,
``:math:`` and ``.. math::``, simple tables and literal blocks become Markdown / MathML. The
site itself is built by ``mkdocs build --strict`` in ``.ci/run``; this checks the conversion
on small inputs and that every ``:math:`` in the package converts."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("latex2mathml")  # the docs extra
pytest.importorskip("griffe")

_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("griffe_sphinx", _ROOT / "docs" / "griffe_sphinx.py")
assert _spec is not None and _spec.loader is not None
gs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gs)


def test_roles_become_inline_code() -> None:
    out = gs.rewrite("See :func:`ngmm_formula.ngmm`, :class:`~ngmm_formula.results.NGMMResult`"
                     " and :meth:`title <NGMMResult.predict>`.")
    assert out == "See `ngmm_formula.ngmm()`, `NGMMResult` and `title`."


def test_math_becomes_mathml_without_markdown_markup() -> None:
    out = gs.rewrite(r"the SD :math:`\hat\sigma_b^*` and :math:`\text{a\_b}`")
    assert out.count('<span class="math"><math display="inline">') == 2
    assert ":math:" not in out and "*" not in out and "_" not in out.replace("&#95;", "")
    block = gs.rewrite("Then\n\n.. math::\n\n    a = b\n    + c\n\n    d = e\n\nafter")
    lines = block.split("\n")
    assert lines[:2] == ["Then", ""] and lines[-2:] == ["", "after"]
    assert sum(line.startswith('<math display="block">') for line in lines) == 2


def test_simple_table_and_literal_block() -> None:
    text = ("x::\n\n    code\n\n"
            "=====  =====\nname   value\n=====  =====\na      1\n       2\nb      3\n=====  =====")
    assert gs.rewrite(text).split("\n") == [
        "x:", "", "    code", "",
        "| name | value |", "|---|---|", "| a | 1<br>2 |", "| b | 3 |"]


def test_every_math_role_in_the_package_converts() -> None:
    n = 0
    for path in (_ROOT / "ngmm_formula").glob("*.py"):
        for tex in re.findall(r":math:`([^`]+)`", path.read_text()):
            gs.rewrite(f":math:`{tex}`")
            n += 1
    assert n > 300
