"""Reading data: one reader for the API and the command line.

:func:`read_data` turns what a user hands to :func:`~ngmm_formula.ngmm` or to the ``ngmm``
command into a :class:`pandas.DataFrame`:

* a DataFrame is returned as it is (never copied or modified);
* a Parquet file (``.parquet``, ``.pq``) or a folder of Parquet files is opened as a
  :class:`pyarrow.dataset.Dataset` and read batch by batch, **only the columns the formula
  needs** (``columns``), so a wide file of many gigabytes costs the memory of the few columns
  the model uses;
* a :class:`pyarrow.dataset.Dataset` (e.g. ``pyarrow.dataset.dataset("s3://...")``) and a
  :class:`pyarrow.Table` are read the same way;
* a CSV/TSV file (optionally compressed) is parsed with ``usecols`` = ``columns``;
* with ``allow_names=True`` (the command line) any other string is the name of a bundled data
  set (:func:`ngmm_formula.datasets.load`).

A column the formula needs but the source does not have is a :class:`~ngmm_formula.errors.DataError`
naming the column(s) and the source, raised before anything is read.

``frame.attrs["name"]`` is set to the file's (or data set's) name for the summary's ``Data:``
line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ngmm_formula.errors import DataError, NGMMError

__all__ = ["PARQUET_SUFFIXES", "is_data_source", "read_data"]

PARQUET_SUFFIXES = (".parquet", ".pq")
_FILE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".gz", ".bz2", ".zip", ".xz",
                  *PARQUET_SUFFIXES)
#: rows per record batch when a Parquet file or data set is scanned
BATCH_ROWS = 1 << 18


def is_data_source(data: Any) -> bool:
    """Whether ``data`` is something :func:`read_data` reads (rather than a DataFrame)."""
    if isinstance(data, str | os.PathLike):
        return True
    return _is_arrow(data)


def _is_arrow(data: Any) -> bool:
    mod = type(data).__module__
    if not mod.startswith("pyarrow"):
        return False
    import pyarrow as pa
    import pyarrow.dataset as pads

    return isinstance(data, pads.Dataset | pa.Table)


def read_data(source: Any, columns: Sequence[str] | None = None, *, what: str = "data",
              allow_names: bool = False) -> pd.DataFrame:
    """A data frame with (at least) ``columns`` from ``source``.

    Parameters
    ----------
    source : DataFrame, str, os.PathLike, pyarrow.dataset.Dataset or pyarrow.Table
        See the module docstring.
    columns : sequence of str, optional
        The columns to read (all if None). A DataFrame is returned whole; it must hold them.
    what : str
        Name of the argument, for error messages (``"data"``, ``"newdata"``).
    allow_names : bool
        Treat a string that is not an existing file as the name of a bundled data set.

    Returns
    -------
    DataFrame

    Raises
    ------
    DataError
        A needed column is missing.
    NGMMError
        The file does not exist or cannot be read.
    """
    cols = None if columns is None else list(dict.fromkeys(columns))
    if isinstance(source, pd.DataFrame):
        _check_columns(cols, list(source.columns), what, None)
        return source
    if _is_arrow(source):
        return _read_arrow(source, cols, what, None)
    if not isinstance(source, str | os.PathLike):
        raise DataError(f"{what} must be a pandas DataFrame, a path to a Parquet or CSV file, "
                        f"or a pyarrow Dataset; got {type(source).__name__}")
    spec = os.fspath(source)
    path = Path(spec)
    suffixes = [s.lower() for s in path.suffixes]
    looks_like_file = (path.suffix.lower() in _FILE_SUFFIXES or os.sep in spec
                       or (os.altsep is not None and os.altsep in spec))
    parquet_dir = path.is_dir() and any(p.suffix.lower() in PARQUET_SUFFIXES
                                        for p in path.iterdir())
    if not path.is_file() and not parquet_dir:
        if path.is_dir():
            raise NGMMError(f"{what} file '{spec}' is a folder (without Parquet files)")
        if looks_like_file or not allow_names:
            raise NGMMError(f"{what} file '{spec}' does not exist")
        from ngmm_formula import datasets

        frame = datasets.load(spec)
        _check_columns(cols, list(frame.columns), what, spec)
        return frame
    try:
        if parquet_dir or (suffixes and suffixes[-1] in PARQUET_SUFFIXES):
            import pyarrow.dataset as pads

            frame = _read_arrow(pads.dataset(path, format="parquet"), cols, what, spec)
        else:
            tab = ".tsv" in suffixes or ".tab" in suffixes
            sep = "\t" if tab else ","
            if cols is not None:
                header = pd.read_csv(path, sep=sep, nrows=0)
                _check_columns(cols, list(header.columns), what, spec)
            frame = pd.read_csv(path, sep=sep, usecols=cols)
    except ImportError as exc:
        raise NGMMError(f"cannot read '{spec}': {_first_line(exc)} (reading Parquet needs "
                        "pyarrow: pip install pyarrow)") from None
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise NGMMError(f"cannot read the {what} file '{spec}': {_first_line(exc)}") from None
    frame.attrs["name"] = path.name
    return frame


def _read_arrow(source: Any, cols: list[str] | None, what: str, name: str | None
                ) -> pd.DataFrame:
    """Scan a pyarrow Dataset (or Table) batch by batch, projecting onto ``cols``."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    if isinstance(source, pa.Table):
        source = pads.dataset(source)
    _check_columns(cols, list(source.schema.names), what, name)
    batches = source.to_batches(columns=cols, batch_size=BATCH_ROWS)
    table = pa.Table.from_batches(list(batches),
                                  schema=source.schema if cols is None else
                                  pa.schema([source.schema.field(c) for c in cols]))
    # one conversion of the projected table; the Arrow buffers are released with it
    frame = table.to_pandas(self_destruct=True, split_blocks=True)
    del table
    return frame


def _check_columns(cols: list[str] | None, have: list[str], what: str, name: str | None
                   ) -> None:
    if cols is None:
        return
    missing = [c for c in cols if c not in set(have)]
    if missing:
        where = f" ('{name}')" if name else ""
        raise DataError(f"{what}{where} is missing the column(s) {missing} used by the model "
                        f"(columns: {have[:12]}{' ...' if len(have) > 12 else ''})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
