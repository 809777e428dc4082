"""The package's imports flow one way: a module imports only modules of its own layer or of
lower ones, and neither the modules nor the folders import each other in a circle.

The layers are written once here (``LAYERS``, lowest first) and shown in README.md's
"Layout" section, which :func:`test_readme_shows_the_layers` holds to the same order. Every
import statement of the package is read from the source with :mod:`ast`: at the top of a
module, inside ``if TYPE_CHECKING:`` and inside functions alike, so a deferred import cannot
hide a dependency. There is no exception: NGMMResult's methods computed in higher layers
(``confint``, ``plot_*``, ``save``, ...) call the implementation that
:data:`ngmm_formula.registry.RESULT_METHODS` holds for their name, declared by the package's
``__init__`` (the top layer); the tests at the end hold that table to the methods.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ngmm_formula"

#: The layers, lowest first. A name is a module (``formula`` for formula.py) or a folder
#: (``approx``: every module under ngmm_formula/approx/); ``__init__`` is the package itself.
#: A module may import from its own layer (without a cycle) and from every layer above it in
#: this list; README.md shows the same list.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version"),
    ("safety", "control", "runtime", "scaling", "families", "summary", "datasets", "registry",
     "adamw"),
    ("formula",),
    ("io", "networks", "design"),
    ("checks",),
    ("layout",),
    ("model",),
    ("approx",),
    ("shards",),
    ("fit", "checkpoint"),
    ("train",),
    ("results", "assemble"),
    ("plots", "persist", "emmeans", "intervals", "residuals", "scoring"),
    ("api",),
    ("inference", "compare", "performance", "sklearn"),
    ("distributed", "cli"),
    ("__init__",),
)

def _modules() -> dict[str, Path]:
    """Dotted name relative to the package (``approx.factor``; ``__init__`` for the package
    itself, ``approx`` for approx/__init__.py) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The package module that an absolute dotted name refers to (None outside the package)."""
    if name == "ngmm_formula":
        return "__init__"
    if not name.startswith("ngmm_formula."):
        return None
    rel = name[len("ngmm_formula."):]
    while rel and rel not in MODULES:
        rel = rel.rpartition(".")[0]
    return rel or "__init__"


def _imports(module: str, path: Path) -> list[tuple[str, int, str, list[str]]]:
    """(imported module, line, absolute name, names taken) of every import statement."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                t = _target(alias.name)
                if t is not None:
                    out.append((t, node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = [] if module == "__init__" else module.split(".")
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(["ngmm_formula", *base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if _target(name) is None:
                continue
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                t = _target(sub)
                # ``from ngmm_formula import plots`` imports the module plots; ``from
                # ngmm_formula.fit import Control`` imports from the module fit
                if t is not None and t in MODULES and t.split(".")[-1] == alias.name:
                    out.append((t, node.lineno, sub, []))
                else:
                    t = _target(name)
                    assert t is not None
                    out.append((t, node.lineno, name, [alias.name]))
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> where, for every pair of distinct package modules."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in MODULES.items():
        for target, line, _, _ in _imports(module, path):
            if target != module:
                edges[module, target].append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def _unit(module: str) -> str:
    """The layer entry a module belongs to: its top-level module or folder."""
    return module.split(".")[0]


def _layer_of() -> dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path a -> ... -> a), or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_every_module_has_one_layer() -> None:
    names = [name for layer in LAYERS for name in layer]
    assert len(names) == len(set(names)), "a name in two layers"
    units = {_unit(m) for m in MODULES}
    assert units == set(names), (f"modules without a layer: {sorted(units - set(names))}; "
                                 f"layers naming no module: {sorted(set(names) - units)}")


def test_imports_follow_the_layer_order() -> None:
    layer = _layer_of()
    against = []
    for (importer, imported), where in sorted(_edges().items()):
        if layer[_unit(imported)] > layer[_unit(importer)]:
            against.append(f"{importer} imports {imported} (a later layer) at {where}")
    assert not against, "\n".join(against)


def test_no_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported in _edges():
        graph[importer].add(imported)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_cycle_between_folders_and_modules() -> None:
    """The same at the granularity of the layers' names (approx/ as one node)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported in _edges():
        if _unit(importer) != _unit(imported):
            graph[_unit(importer)].add(_unit(imported))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_across_modules() -> None:
    private = []
    for module, path in MODULES.items():
        for target, line, name, taken in _imports(module, path):
            if target == module:
                continue
            if any(_private(n) for n in taken) or any(_private(p) for p in name.split(".")):
                private.append(f"{path.relative_to(ROOT)}:{line}: {name} {taken}")
    assert not private, "\n".join(private)


def test_readme_shows_the_layers() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^<!-- layers, lowest first -->\n```text\n(.*?)^```", text, re.S | re.M)
    assert m is not None, "README.md has no layer block"
    shown = tuple(tuple(line.split("|", 1)[0].replace("/", "").split())
                  for line in m.group(1).splitlines() if line.strip())
    assert shown == LAYERS


@pytest.mark.parametrize(("source", "expected"), [
    ("from ngmm_formula import plots", ["plots"]),
    ("from ngmm_formula.fit import Control", ["fit"]),
    ("import ngmm_formula.approx.factor", ["approx.factor"]),
    ("from ngmm_formula.approx import factor, Approximation", ["approx.factor", "approx"]),
    ("import numpy", []),
])
def test_import_reading(source: str, expected: list[str], tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert [t for t, _, _, _ in _imports("checks", path)] == expected


def test_relative_import_reading(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("from .rules import Rule\nfrom .. import errors\n")
    assert [t for t, _, _, _ in _imports("approx.adaptive", path)] == ["approx.rules", "errors"]


#: Functions still over MAX_FUNCTION_LINES (docstring included), each with why it is left:
#: the list must shrink, never grow (an entry that is no longer long fails too).
LONG_FUNCTIONS: dict[str, str] = {}
MAX_FUNCTION_LINES = 100


def test_no_function_is_over_100_lines() -> None:
    long = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{module}.{node.name}"] = lines
    assert set(long) == set(LONG_FUNCTIONS), (
        f"new long functions: {sorted(set(long) - set(LONG_FUNCTIONS))}; "
        f"no longer long (remove them from LONG_FUNCTIONS): "
        f"{sorted(set(LONG_FUNCTIONS) - set(long))}")


# ---------------------------------------------------------------- NGMMResult's registry
def _dispatches() -> dict[str, ast.Call]:
    """Method name in the registry -> the call of its implementation in results.py
    (``RESULT_METHODS.implementation("confint")(self, ...)``)."""
    tree = ast.parse((PACKAGE / "results.py").read_text(encoding="utf-8"))
    out: dict[str, ast.Call] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)):
            continue
        lookup = node.func
        if (isinstance(lookup.func, ast.Attribute) and lookup.func.attr == "implementation"
                and isinstance(lookup.func.value, ast.Name)
                and lookup.func.value.id == "RESULT_METHODS"):
            arg = lookup.args[0]
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                f"results.py:{node.lineno}: name the method with a string literal")
            assert arg.value not in out, f"{arg.value} is dispatched twice"
            out[arg.value] = node
    return out


def test_the_registry_is_declared_on_import_without_torch() -> None:
    """``import ngmm_formula`` declares every method's implementation (naming it; its module
    is imported on the method's first call) and still imports neither torch nor pandas."""
    code = ("import json, sys\nimport ngmm_formula\n"
            "from ngmm_formula.registry import RESULT_METHODS\n"
            "print(json.dumps([RESULT_METHODS.methods(),"
            " [m for m in ('torch', 'pandas') if m in sys.modules]]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    methods, heavy = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(methods) == set(_dispatches())
    assert heavy == []


def test_each_dispatching_method_names_a_declared_entry() -> None:
    """Every call through the registry in results.py names a declared method, every
    declared method is called, and each implementation accepts the arguments the method
    passes (the check mypy made when the method imported the function)."""
    import ngmm_formula  # noqa: F401  (declares the implementations)
    from ngmm_formula.registry import RESULT_METHODS

    calls = _dispatches()
    assert set(calls) == set(RESULT_METHODS.methods())
    layer = _layer_of()
    for method, call in calls.items():
        target = RESULT_METHODS.target(method)
        module = target.partition(":")[0]
        impl = RESULT_METHODS.implementation(method)
        assert impl.__module__ == module, f"{method}: {target} is defined in {impl.__module__}"
        # a function in the results layer or below is imported directly, not declared here
        unit = _unit(_target(module) or "")
        assert layer[unit] > layer["results"], f"{method}: {module} is not above results"
        positional = [object() for a in call.args if not isinstance(a, ast.Starred)]
        keywords = {k.arg: object() for k in call.keywords if k.arg is not None}
        try:
            inspect.signature(impl).bind(*positional, **keywords)
        except TypeError as e:
            pytest.fail(f"results.py:{call.lineno}: {target} does not take the arguments "
                        f"NGMMResult.{method} passes: {e}")


def test_only_the_package_declares_implementations() -> None:
    """The registry must not carry an upward dependency: the declarations (which name the
    higher modules) are made in the package's ``__init__``, the top layer, and nowhere else."""
    declaring = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "declare"):
                declaring.append(module)
    assert declaring == ["__init__"]


def test_a_missing_implementation_is_a_clear_error() -> None:
    from ngmm_formula.errors import NGMMError
    from ngmm_formula.registry import MethodRegistry

    registry = MethodRegistry("NGMMResult")
    with pytest.raises(NGMMError, match=r"NGMMResult\.confint has no implementation declared"
                                        r".*ngmm_formula/__init__\.py"):
        registry.implementation("confint")
    registry.declare({"confint": "ngmm_formula.errors:confint"})
    with pytest.raises(NGMMError, match="the module ngmm_formula.errors defines no function "
                                        "'confint'"):
        registry.implementation("confint")
    with pytest.raises(NGMMError, match="already implemented by ngmm_formula.errors:confint"):
        registry.declare({"confint": "ngmm_formula.inference:confint"})
    with pytest.raises(NGMMError, match="must be written 'module:function'"):
        registry.declare({"profile": "ngmm_formula.inference.profile"})
