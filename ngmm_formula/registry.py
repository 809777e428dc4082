"""The registry through which :class:`~ngmm_formula.results.NGMMResult`'s methods reach the
functions above the results layer that compute them.

lme4 offers its tools as methods of the fitted object (``confint(fit)``, ``profile``,
``plot``, ``emmeans``), and so does ``NGMMResult``; but the functions behind them live in
modules above ``results`` (``inference`` refits through ``api``, ``persist`` builds results
when it loads, ``plots`` draws from a result). Instead of importing those modules, each such
method asks :data:`RESULT_METHODS` for its implementation by name::

    RESULT_METHODS.implementation("confint")(self, method, level, **kw)

The package's ``__init__`` (the top layer, which may name every module) declares which function
implements each name, as ``"module:function"`` (the form of Python's entry points). The module
is imported when the method is first called, not when the package is imported: ``import
ngmm_formula`` stays free of torch and pandas, as its public names are (PEP 562), and since
importing any submodule runs the package's ``__init__`` first, every declaration exists before
any result does. This module imports nothing of the package but its errors; it does not know
which modules it will import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from ngmm_formula.errors import NGMMError

__all__ = ["Implementation", "MethodRegistry", "RESULT_METHODS"]

#: A function computing one method: it takes the result first, then the method's arguments.
Implementation = Callable[..., Any]


class MethodRegistry:
    """Method name -> the ``"module:function"`` that implements it, imported on first use.

    Parameters
    ----------
    owner : str
        The class whose methods these are (for messages).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, Implementation] = {}

    def declare(self, targets: Mapping[str, str]) -> None:
        """Declare the implementations: method name -> ``"package.module:function"``.

        A name declared twice must name the same target (re-running the package's
        ``__init__``, as ``importlib.reload`` does, declares the same table again).
        """
        for method, target in targets.items():
            module, sep, function = target.partition(":")
            if not (sep and module and function.isidentifier()):
                raise NGMMError(f"{self.owner}.{method}: the implementation must be written "
                                f"'module:function', got {target!r}")
            if self._targets.get(method, target) != target:
                raise NGMMError(f"{self.owner}.{method} is already implemented by "
                                f"{self._targets[method]}, not {target}")
            self._targets[method] = target

    def methods(self) -> tuple[str, ...]:
        """The declared method names, sorted."""
        return tuple(sorted(self._targets))

    def target(self, method: str) -> str:
        """The ``"module:function"`` declared for ``method``."""
        try:
            return self._targets[method]
        except KeyError:
            raise NGMMError(
                f"{self.owner}.{method} has no implementation declared: the package's "
                f"__init__ (ngmm_formula/__init__.py) names the function behind each of "
                f"{self.owner}'s methods that live above the results layer "
                f"(declared: {', '.join(self.methods()) or 'none'})") from None

    def implementation(self, method: str) -> Implementation:
        """The function implementing ``method``, importing its module on first use."""
        found = self._loaded.get(method)
        if found is not None:
            return found
        target = self.target(method)
        module, _, function = target.partition(":")
        found = getattr(importlib.import_module(module), function, None)
        if not callable(found):
            raise NGMMError(f"{self.owner}.{method} is declared as {target}, but the module "
                            f"{module} defines no function {function!r}")
        self._loaded[method] = found
        return found


#: NGMMResult's methods computed above the results layer (declared in ngmm_formula/__init__.py).
RESULT_METHODS = MethodRegistry("NGMMResult")
