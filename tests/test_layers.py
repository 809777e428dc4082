"""The package's imports flow one way: a module imports only modules of its own layer or of
lower ones, and neither the modules nor the folders import each other in a circle.

The layers are written once here (``LAYERS``, lowest first) and shown in README.md's
"Layout" section, which :func:`test_readme_shows_the_layers` holds to the same order. Every
import statement of the package is read from the source with :mod:`ast`: at the top of a
module, inside ``if TYPE_CHECKING:`` and inside functions alike, so a deferred import cannot
hide a dependency. The one kind of upward import allowed is listed in ``DELEGATIONS``, each
with its reason; the list must stay exact (an entry that no longer occurs fails too).
"""

from __future__ import annotations

import ast
import re
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
    ("safety", "control", "runtime", "scaling", "families", "summary", "datasets", "registry"),
    ("formula",),
    ("io", "networks", "design"),
    ("checks",),
    ("layout",),
    ("model",),
    ("approx",),
    ("shards",),
    ("fit",),
    ("train",),
    ("results", "assemble"),
    ("plots", "persist", "emmeans", "intervals", "residuals"),
    ("api",),
    ("inference", "compare", "performance", "sklearn"),
    ("distributed", "cli"),
    ("__init__",),
)

#: The only imports against the layer order: each (importing module, imported module) is an
#: import inside one method of NGMMResult. The result offers lme4's methods on the fitted
#: object (``confint(fit)``, ``profile``, ``plot``, ``save``, ``compare``) as Python methods,
#: and each delegates to the layer above that computes it; the import runs when the method is
#: called, never when a module is imported, so no import-time cycle exists. Removing a method's
#: delegation (or moving the function below results) must remove its entry here.
DELEGATIONS: dict[tuple[str, str], str] = {
    ("results", "plots"): "plot_partial_dependence, plot_caterpillar, plot_residuals, "
                          "plot_training_curve",
    ("results", "inference"): "confint, profile, predict_se (inference refits: above api)",
    ("results", "persist"): "save (persist builds NGMMResult objects when it loads)",
    ("results", "compare"): "compare (compare refits through api)",
    ("results", "emmeans"): "emmeans (marginal means over a reference grid of the fit)",
    ("results", "intervals"): "predict(interval=...) (intervals simulate from the fit)",
    ("results", "residuals"): "simulate_residuals (simulates from the fit)",
    ("results", "performance"): "r2, icc (refit the null model through api)",
}


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


def _is_delegation(importer: str, imported: str) -> bool:
    return (_unit(importer), _unit(imported)) in DELEGATIONS


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
        if layer[_unit(imported)] > layer[_unit(importer)] and not _is_delegation(importer,
                                                                                   imported):
            against.append(f"{importer} imports {imported} (a later layer) at {where}")
    assert not against, "\n".join(against)


def test_delegations_are_function_level_and_still_needed() -> None:
    edges = _edges()
    seen = {(_unit(a), _unit(b)) for a, b in edges}
    assert set(DELEGATIONS) <= seen, f"stale entries: {sorted(set(DELEGATIONS) - seen)}"
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in {t for t, line, _, _ in _imports(module, path)
                           if line == node.lineno}:
                if target != module and _is_delegation(module, target):
                    assert id(node) not in top_level, (
                        f"{path.relative_to(ROOT)}:{node.lineno}: a delegation must be an "
                        "import inside the method that needs it")


def test_no_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported in _edges():
        if not _is_delegation(importer, imported):
            graph[importer].add(imported)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_cycle_between_folders_and_modules() -> None:
    """The same at the granularity of the layers' names (approx/ as one node)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported in _edges():
        if _unit(importer) != _unit(imported) and not _is_delegation(importer, imported):
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
