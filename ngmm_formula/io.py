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

Sharded reading (issue 17): :func:`write_partitioned` writes a Parquet dataset split into
``n_parts`` folders ``ngmm_part=k`` by :func:`group_hash` of a grouping factor, with a small
``_ngmm_partition.json`` describing it; :func:`read_shard` reads only the partitions (or, for
a Parquet file that is not partitioned, only the rows) whose groups belong to one process of
a distributed fit, so that every group's rows are read by exactly one process and the
processes' memory adds up to that of the data set. :func:`read_data` reads a partitioned
folder whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ngmm_formula.errors import DataError, NGMMError

__all__ = ["PARQUET_SUFFIXES", "PARTITION_FILE", "group_hash", "is_data_source",
           "partition_info", "read_data", "read_shard", "write_partitioned"]

PARQUET_SUFFIXES = (".parquet", ".pq")
_FILE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".gz", ".bz2", ".zip", ".xz",
                  *PARQUET_SUFFIXES)
#: rows per record batch when a Parquet file or data set is scanned
BATCH_ROWS = 1 << 18
#: the file that marks a folder written by :func:`write_partitioned` (the leading underscore
#: makes pyarrow's dataset discovery skip it)
PARTITION_FILE = "_ngmm_partition.json"
#: the partition column of the folder names ``ngmm_part=k`` (hive partitioning)
PART_COLUMN = "ngmm_part"
#: the format of :data:`PARTITION_FILE`
PARTITION_VERSION = 1


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
    partitioned = path.is_dir() and (path / PARTITION_FILE).is_file()
    parquet_dir = path.is_dir() and (partitioned or any(p.suffix.lower() in PARQUET_SUFFIXES
                                                        for p in path.iterdir()))
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
        if partitioned:
            frame = _read_arrow(_partitioned_dataset(path), cols, what, spec)
            frame = frame.drop(columns=[PART_COLUMN], errors="ignore") if cols is None else frame
        elif parquet_dir or (suffixes and suffixes[-1] in PARQUET_SUFFIXES):
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


# --------------------------------------------------------------------------------------------
# partitioned data sets and the shard of one process


def group_hash(values: Any, n_parts: int) -> np.ndarray:
    r"""The partition (0 to ``n_parts - 1``) of each value of a grouping factor.

    A stable hash: the first 8 bytes of the BLAKE2b digest of the value's text (``str(v)``,
    UTF-8; the labels :func:`~ngmm_formula.design.group_labels` gives the groups), as an
    unsigned little-endian integer, modulo ``n_parts``. Unlike Python's ``hash`` (salted per
    process for strings) it is the same in every process, session and machine, so the
    process that writes a data set and every process that reads it agree on where a group
    lives. Each distinct value is hashed once.

    Parameters
    ----------
    values : array-like or Series
        One value per row (missing values hash as their text, e.g. ``"nan"``).
    n_parts : int
        Number of partitions (at least 1).

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise NGMMError(f"n_parts must be a positive integer, got {n_parts!r}")
    codes, uniques = pd.factorize(pd.Series(values).astype(str), use_na_sentinel=False)
    digests = np.array([int.from_bytes(hashlib.blake2b(str(u).encode("utf-8"),
                                                       digest_size=8).digest(), "little")
                        for u in uniques], dtype=np.uint64)
    parts = (digests % np.uint64(n_parts)).astype(np.int64)
    return parts[codes] if len(parts) else np.zeros(len(codes), dtype=np.int64)


def write_partitioned(df: pd.DataFrame, path: str | os.PathLike, group: str,
                      n_parts: int) -> Path:
    """Write ``df`` as a Parquet dataset partitioned by :func:`group_hash` of ``group``.

    The folder ``path`` gets one sub-folder ``ngmm_part=k`` per non-empty partition (hive
    partitioning: the partition is in the folder name, not in the files) and
    :data:`PARTITION_FILE`, a JSON record of the group column, ``n_parts``, the hash and the
    format version, which :func:`read_shard` and :func:`read_data` recognise. Every group's
    rows land in one partition, in their order in ``df``.

    Parameters
    ----------
    df : DataFrame
        Written without its index.
    path : str or os.PathLike
        A folder, created if needed; it must not hold Parquet files already.
    group : str
        The grouping factor's column.
    n_parts : int
        Number of partitions; a multiple of the number of processes that will read it keeps
        their shares even (process ``r`` of ``R`` reads the partitions ``k`` with
        ``k % R == r``).

    Returns
    -------
    Path
        ``path``.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    if group not in df.columns:
        raise DataError(f"write_partitioned: no column '{group}' (columns: "
                        f"{list(df.columns)[:12]})")
    if PART_COLUMN in df.columns:
        raise DataError(f"write_partitioned: the column name '{PART_COLUMN}' is reserved")
    out = Path(path)
    if out.is_dir() and any(out.rglob("*.parquet")):
        raise NGMMError(f"write_partitioned: '{out}' already holds Parquet files")
    out.mkdir(parents=True, exist_ok=True)
    parts = group_hash(df[group], n_parts)
    table = pa.Table.from_pandas(df.assign(**{PART_COLUMN: parts}), preserve_index=False)
    pads.write_dataset(table, out, format="parquet", partitioning=[PART_COLUMN],
                       partitioning_flavor="hive", use_threads=False,
                       existing_data_behavior="overwrite_or_ignore")
    info = {"format": "ngmm_formula partitioned dataset", "version": PARTITION_VERSION,
            "group": group, "n_parts": int(n_parts), "hash": "blake2b-8 of str(value), "
            "little-endian, mod n_parts", "rows": len(df)}
    (out / PARTITION_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return out


def partition_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a folder written by :func:`write_partitioned` (None for anything else)."""
    file = Path(path) / PARTITION_FILE
    if not file.is_file():
        return None
    info = json.loads(file.read_text())
    if info.get("version") != PARTITION_VERSION:
        raise NGMMError(f"'{file}' has format version {info.get('version')!r}; this version "
                        f"of ngmm_formula reads version {PARTITION_VERSION}")
    return dict(info)


def _partitioned_dataset(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as pads

    schema = pads.partitioning(pa.schema([(PART_COLUMN, pa.int64())]), flavor="hive")
    return pads.dataset(path, format="parquet", partitioning=schema)


def read_shard(path: str | os.PathLike, rank: int, world: int,
               columns: Sequence[str] | None = None, *, group: str | None = None
               ) -> pd.DataFrame:
    """The rows of the groups that process ``rank`` of ``world`` owns.

    A folder written by :func:`write_partitioned`: the partitions ``k`` with
    ``k % world == rank``, found from the folder names (the other partitions' files are never
    opened). A Parquet file or a folder of Parquet files that is not partitioned: every row
    group is read in turn (only ``columns``) and the rows kept whose
    ``group_hash(group, world) == rank``, so at most one row group beyond the shard is in
    memory. Either way every group's rows are read by exactly one process.

    Parameters
    ----------
    path : str or os.PathLike
    rank, world : int
        This process and the number of processes.
    columns : sequence of str, optional
        The columns to read (all if None).
    group : str, optional
        The grouping factor (required for a data set that is not partitioned; for a
        partitioned one, if given, it must be the column it was partitioned by).

    Returns
    -------
    DataFrame
        ``attrs["name"]`` the file's name; ``attrs["shard"]`` a dict with ``rank``,
        ``world``, ``group``, ``rows`` (read here) and ``partitions`` (read here, for a
        partitioned folder).
    """
    if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
        raise NGMMError(f"read_shard needs 0 <= rank < world, got rank={rank!r}, "
                        f"world={world!r}")
    src = Path(path)
    cols = None if columns is None else list(dict.fromkeys(columns))
    info = partition_info(src) if src.is_dir() else None
    if info is not None:
        if group is not None and group != info["group"]:
            raise NGMMError(f"'{src}' is partitioned by '{info['group']}', not by '{group}'")
        frame, parts = _read_partitions(src, info, rank, world, cols)
        shard = {"partitions": parts}
        group = info["group"]
    else:
        if group is None:
            raise NGMMError(f"'{src}' is not a partitioned dataset (no {PARTITION_FILE}): "
                            "read_shard needs the group= column to split it by")
        frame = _filter_row_groups(src, rank, world, cols, group)
        shard = {}
    frame.attrs["name"] = src.name
    frame.attrs["shard"] = {"rank": rank, "world": world, "group": group,
                            "rows": len(frame), **shard}
    return frame


def _read_partitions(src: Path, info: dict[str, Any], rank: int, world: int,
                     cols: list[str] | None) -> tuple[pd.DataFrame, list[int]]:
    """The partitions ``k % world == rank`` of a partitioned folder (pruned by folder name)."""
    import pyarrow.dataset as pads

    n_parts = int(info["n_parts"])
    if n_parts < world:
        raise NGMMError(f"'{src}' has {n_parts} partitions, fewer than the {world} processes: "
                        f"write it again with n_parts >= {world}")
    parts = [k for k in range(n_parts) if k % world == rank]
    ds = _partitioned_dataset(src).filter(pads.field(PART_COLUMN).isin(parts))
    want = cols if cols is not None else [c for c in ds.schema.names if c != PART_COLUMN]
    return _read_arrow(ds, want, "data", str(src)), parts


def _filter_row_groups(src: Path, rank: int, world: int, cols: list[str] | None,
                       group: str) -> pd.DataFrame:
    """Read ``src`` row group by row group, keeping the rows of this process's groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = (sorted(p for p in src.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES)
             if src.is_dir() else [src])
    if not files:
        raise NGMMError(f"data file '{src}' does not exist or holds no Parquet files")
    pieces = []
    read = None if cols is None else list(dict.fromkeys([*cols, group]))
    for file in files:
        pf = pq.ParquetFile(file)
        _check_columns([*(cols or []), group], pf.schema_arrow.names, "data", str(file))
        empty = pf.schema_arrow.empty_table()
        pieces.append(empty if read is None else empty.select(read))
        for i in range(pf.num_row_groups):
            table = pf.read_row_group(i, columns=read)
            mine = group_hash(table.column(group).to_pandas(), world) == rank
            pieces.append(table.filter(pa.array(mine)))
    table = pa.concat_tables(pieces)
    if cols is not None and group not in cols:
        table = table.drop_columns([group])
    return table.to_pandas()
