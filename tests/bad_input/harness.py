"""The bad-input table's harness: one :class:`Case` per bad or edge input.

Each row names the entry point it calls, the input, the exception (or warning) class it must
raise, and the words its message must contain -- the offending column, term or argument, so
that a user can act on it. Every row also checks that the caller's DataFrame is unchanged
(values, dtypes, index and column order): the package never mutates its input.

Rows live in the ``test_*.py`` files of this folder, grouped by entry point, as lists named
``CASES``; ``test_table.py`` counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes
    ----------
    id : str
        Short name, shown by pytest.
    data : callable
        Builds the caller's DataFrame afresh (so rows never share state).
    call : callable
        ``call(df)`` runs the entry point on that DataFrame.
    raises : exception class, optional
        What ``call`` must raise; exactly one of ``raises`` and ``warns``.
    warns : warning class, optional
        What ``call`` must warn (and then return normally).
    names : tuple of str
        Substrings the message must contain (the column, term or argument at fault).
    """

    id: str
    data: Callable[[], pd.DataFrame]
    call: Callable[[pd.DataFrame], Any]
    raises: type[BaseException] | None = None
    warns: type[Warning] | None = None
    names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.raises is None) == (self.warns is None):
            raise TypeError(f"case {self.id}: give exactly one of raises= and warns=")


def run(case: Case) -> None:
    """Run one row: the class, the message's names, and the caller's frame unchanged."""
    df = case.data()
    before = df.copy(deep=True)
    if case.raises is not None:
        with pytest.raises(case.raises) as info:
            case.call(df)
        message = str(info.value)
    else:
        assert case.warns is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.call(df)
        hits = [w for w in caught if issubclass(w.category, case.warns)]
        assert hits, (f"{case.id}: expected a {case.warns.__name__}, got "
                      f"{[w.category.__name__ for w in caught]}")
        message = "\n".join(str(w.message) for w in hits)
    for name in case.names:
        assert name in message, f"{case.id}: the message does not name {name!r}:\n{message}"
    pd.testing.assert_frame_equal(df, before, check_exact=True)
    assert list(df.columns) == list(before.columns)


def params(cases: list[Case]) -> Any:
    """``pytest.mark.parametrize`` over a table, with the rows' ids."""
    return pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases])
