r"""Saving and loading fitted models: :func:`save` and :func:`load`.

A model file holds everything :class:`~ngmm_formula.results.NGMMResult` needs to summarise the
fit and to predict new data exactly as the fitted object does, bit for bit: the network
architectures and weights, the formulaic ``ModelSpec`` objects and the other encodings learnt
on the training data (:class:`~ngmm_formula.design.DesignSpec`), the formula, the family and
link, the approximation, the estimates, conditional modes and variances, the diagnostics and
the training history. The ``refit`` closure of a fitted result (which refits the model on the
original data, for ``anova`` of REML fits) is not saved: ``refit_ml()`` of a loaded REML model
raises :class:`~ngmm_formula.errors.NGMMError` (:data:`LOADED_REFIT_MESSAGE`) -- fit the model
again with :func:`~ngmm_formula.ngmm` to compare it by likelihood-ratio test.

A model file holds data, not code: loading one never unpickles and never imports anything
named in the file, so a model file from any source can be loaded without running code in it.

File format (version 2)
-----------------------

======  ========  ============================================================================
offset  size      field
======  ========  ============================================================================
0       9         magic bytes ``b"\x89NGMM\r\n\x1a\n"`` (as PNG's: a non-ASCII first byte, and
                  the line endings catch text-mode transfers)
9       2         format version, unsigned big-endian (:data:`FORMAT_VERSION`)
11      4         header length ``H``, unsigned big-endian
15      H         header: UTF-8 JSON -- the package version that wrote the file, the versions
                  of Python, torch, numpy, pandas and formulaic, the formula, family, link and
                  number of observations, and the payload's length, SHA-256 and encoding
15 + H  rest      payload: gzip (``mtime=0``, so the same fit gives the same file) of the
                  container below
======  ========  ============================================================================

The container is ``<json_len: u64, big-endian> <model: UTF-8 JSON> <arrays: .npz>``:

* the model JSON is ``{"fields": {name: value}}`` -- every field of the result except
  ``refit``. JSON numbers, strings, booleans, null and lists stand for themselves (floats are
  written as the shortest decimal that reads back to the same double); every JSON object is a
  tagged value ``{"$": tag, ...}``: a tuple, a dict (any keys), a non-finite float, a numpy
  scalar, an array (a reference to the ``.npz``), a pandas Index, Series or DataFrame (values
  as arrays, strings as JSON lists), a built-in family (name and link), a network
  (:func:`~ngmm_formula.networks.network_to_data`: architecture, and its ``state_dict`` as
  arrays), a formulaic ``ModelSpec`` (:func:`~ngmm_formula.design.spec_to_data`: its fields as
  plain data), or one of the package's value types (``Design``, ``ReTerm``, ``NNTerm``,
  ``Approximation``, ``TrainingHistory``, ...: their fields). Tags are stable names in a
  fixed registry (:data:`VALUE_TYPES`), never module paths: a tag outside it is an error;
* the arrays are numpy's ``.npz`` (a zip of ``.npy`` files, stored without compression, with
  fixed timestamps) read with ``allow_pickle=False``: numbers, booleans, fixed-width strings
  and dates only, never object arrays.

:func:`load` checks, in order, the magic bytes (another kind of file), the format version
(another version: the message names both), the header, the payload length (a truncated file)
and its SHA-256 (a corrupted file), then rebuilds the result from the JSON and the arrays,
checks that its formulaic encodings evaluate only the factors of the formula that the header
shows, and finally checks that the rebuilt model reproduces its stored linear predictor on
the training data. Each failure raises :class:`ModelFileError` with a one-line message: a damaged
file never loads as a silently different model. :func:`save` refuses (with
:class:`ModelFileError`) a model that holds something it could not rebuild from data: a
custom :class:`~ngmm_formula.families.Family` subclass or network, a formulaic value of
another type.

Format version 1 (written by earlier versions of the package) held a pickle. Like any
pickle it can run arbitrary code when loaded, so :func:`load` refuses it unless called with
``trusted=True`` (``ngmm predict --trusted``): do that only for files you wrote yourself,
and save the model again to convert it to version 2. Its container is a pickle (protocol 5) of
``{"fields": {name: value}}`` with numpy's arrays written as out-of-band buffers:
``<n_buffers: u32> <pickle_len: u64> <n_buffers x buffer_len: u64> <pickle> <buffers...>``
(big-endian), behind the same magic bytes, header and checksum.

.. note::

    Predicting new data with a loaded model evaluates the Python expressions of its formula
    (``log(x)``, ``I(x**2)``) with formulaic, as fitting did. :func:`load` checks that the
    file's encodings evaluate nothing but the factors of the formula that its header shows:
    read that formula (:func:`read_header`) before predicting with a model from a source you
    do not trust. A model file also holds the training data's model matrices, responses and
    weights (the summary's residuals and ``simulate`` need them): share it as you would share
    the data.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import platform
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import torch

from ngmm_formula.approx import Approximation
from ngmm_formula.design import (
    Design,
    DesignSpec,
    NetEncoding,
    NetInput,
    ReTerm,
    SparseRows,
    check_spec_formula,
    re_effect,
    spec_from_data,
    spec_to_data,
)
from ngmm_formula.errors import NGMMError, NGMMWarning
from ngmm_formula.families import Family, get_family
from ngmm_formula.formula import BarTerm, NNTerm, ParsedFormula, parse_formula
from ngmm_formula.networks import network_from_data, network_to_data
from ngmm_formula.results import Diagnostics, NGMMResult, ReducedRank
from ngmm_formula.train import TrainingHistory
from ngmm_formula.version import __version__

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "LOADED_REFIT_MESSAGE",
    "ModelFileError",
    "VALUE_TYPES",
    "dumps",
    "load",
    "loads",
    "read_header",
    "save",
]

#: The first nine bytes of every model file.
MAGIC = b"\x89NGMM\r\n\x1a\n"

#: Version of the file layout written by :func:`save` (JSON + arrays). :func:`load` reads it,
#: and version 1 (a pickle) only with ``trusted=True``.
FORMAT_VERSION = 2

#: The old format version: a pickle, loaded only with ``trusted=True``.
PICKLE_FORMAT_VERSION = 1

#: What ``refit_ml()`` of a loaded REML model raises.
LOADED_REFIT_MESSAGE = "a loaded model has no data to refit; fit again with ngmm(...)"

#: The package's value types a model file may hold, by stable tag (never a module path): each
#: is written as its dataclass fields and rebuilt by calling the class with them.
VALUE_TYPES: dict[str, type] = {
    "ParsedFormula": ParsedFormula,
    "BarTerm": BarTerm,
    "NNTerm": NNTerm,
    "Design": Design,
    "DesignSpec": DesignSpec,
    "ReTerm": ReTerm,
    "SparseRows": SparseRows,
    "NetEncoding": NetEncoding,
    "NetInput": NetInput,
    "Approximation": Approximation,
    "Diagnostics": Diagnostics,
    "ReducedRank": ReducedRank,
    "TrainingHistory": TrainingHistory,
}
_TAG_OF = {cls: tag for tag, cls in VALUE_TYPES.items()}

_PREFIX = struct.Struct(f">{len(MAGIC)}sHI")  # magic, format version, header length
_COUNTS = struct.Struct(">IQ")  # number of buffers, pickle length (version 1)
_LENGTH = struct.Struct(">Q")
_MAX_HEADER = 1 << 20  # a header is a few hundred bytes; more means a corrupted length
_PROTOCOL = 5
_COMPRESSION = "gzip"
_SERIALIZER = "json+npz"
_ENCODINGS: dict[int, tuple[Any, ...]] = {
    FORMAT_VERSION: (_COMPRESSION, _SERIALIZER),
    PICKLE_FORMAT_VERSION: (_COMPRESSION, "pickle", _PROTOCOL),
}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: numpy dtype kinds an array in the container may have: bool, integers, floats, complex,
#: dates and durations, fixed-width strings.
_ARRAY_KINDS = "biufcmMUS"
#: pandas dtypes whose values are written as JSON lists (strings, Python objects).
_LIST_DTYPES = ("object", "str", "string")


class ModelFileError(NGMMError):
    """A model file that cannot be read: not a model file, another format version, the old
    pickle format without ``trusted=True``, truncated, corrupted, or written by a package
    version whose objects this one cannot rebuild -- or a model that cannot be saved."""


class _LoadedRefit:
    """The ``refit`` of a loaded result: the training data are not in the file."""

    def __call__(self, **kwargs: Any) -> NoReturn:
        raise NGMMError(LOADED_REFIT_MESSAGE)

    def __repr__(self) -> str:
        return "<no refit: loaded model>"


# --------------------------------------------------------------------------------------------
# writing


def _package_version() -> str:
    return __version__


def _library_versions() -> dict[str, str]:
    import formulaic
    import pandas

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pandas.__version__,
            "formulaic": getattr(formulaic, "__version__", "unknown")}


def _cpu_nets(nets: tuple[Any, ...]) -> tuple[Any, ...]:
    """Networks on the CPU (where ``predict`` evaluates them); copies only those elsewhere."""
    out = []
    for net in nets:
        on_cpu = all(t.device.type == "cpu" for t in [*net.parameters(), *net.buffers()])
        out.append(net if on_cpu else copy.deepcopy(net).cpu())
    return tuple(out)


def _cannot_save(where: str, why: str) -> NoReturn:
    raise ModelFileError(f"cannot save the model: {where}: {why}")


class _Writer:
    """Turns a result's fields into the model JSON (tagged values) and the arrays."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._keys: dict[int, str] = {}  # id(array) -> key: an array held twice is stored once

    def value(self, v: Any, where: str) -> Any:
        if v is None or type(v) in (bool, str, int):
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"$": "float", "value": repr(v)}
        if type(v) is list:
            return [self.value(x, f"{where}[{k}]") for k, x in enumerate(v)]
        if type(v) is tuple:
            return {"$": "tuple", "items": [self.value(x, f"{where}[{k}]")
                                            for k, x in enumerate(v)]}
        if type(v) is dict:
            return {"$": "dict", "items": [[self.value(k, f"{where} key"),
                                            self.value(x, f"{where}[{k!r}]")]
                                           for k, x in v.items()]}
        if type(v) is np.ndarray:
            return self.array(v, where)
        if isinstance(v, np.generic):
            if v.dtype.kind not in "biuf":
                _cannot_save(where, f"a numpy scalar of type {v.dtype} cannot be stored")
            return {"$": "numpy", "dtype": v.dtype.str, "value": self.value(v.item(), where)}
        if type(v) in _TAG_OF:
            return self.record(v, where)
        if isinstance(v, (pd.Index, pd.Series, pd.DataFrame)):
            return self.pandas(v, where)
        if isinstance(v, Family):
            return self.family(v, where)
        if isinstance(v, torch.nn.Module):
            return self.network(v, where)
        _cannot_save(where, f"a value of type {type(v).__module__}.{type(v).__qualname__} is "
                            "not one of the types a model file holds")

    def array(self, a: np.ndarray, where: str) -> dict[str, Any]:
        if a.dtype.hasobject:
            if a.dtype.kind != "O":
                _cannot_save(where, f"an array of dtype {a.dtype} cannot be stored")
            return {"$": "objects", "shape": list(a.shape),
                    "items": [self.value(x, f"{where}[{k}]") for k, x in enumerate(a.ravel())],
                    "writeable": bool(a.flags.writeable)}
        if a.dtype.kind not in _ARRAY_KINDS or a.dtype.fields is not None:
            _cannot_save(where, f"an array of dtype {a.dtype} cannot be stored")
        key = self._keys.get(id(a))
        if key is None:
            key = f"a{len(self.arrays)}"
            self.arrays[key] = a
            self._keys[id(a)] = key
        return {"$": "ndarray", "key": key, "writeable": bool(a.flags.writeable)}

    def record(self, v: Any, where: str) -> dict[str, Any]:
        tag = _TAG_OF[type(v)]
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(v):
            x = getattr(v, f.name)
            at = f"{where}.{f.name}"
            if tag == "DesignSpec" and f.name == "context":
                continue  # the user's context= holds functions, code: not saved (see save())
            if tag == "DesignSpec" and f.name == "fixed_spec":
                fields[f.name] = self.model_spec(x, at)
            elif tag == "DesignSpec" and f.name == "re_specs":
                fields[f.name] = {"$": "tuple", "items": [self.model_spec(s, f"{at}[{k}]")
                                                          for k, s in enumerate(x)]}
            else:
                fields[f.name] = self.value(x, at)
        return {"$": tag, "fields": fields}

    def model_spec(self, spec: Any, where: str) -> dict[str, Any]:
        try:
            return {"$": "ModelSpec", "data": spec_to_data(spec)}
        except TypeError as exc:
            _cannot_save(where, str(exc))

    def values(self, values: Any, where: str) -> dict[str, Any]:
        """The values of a pandas Index or Series column, with its dtype."""
        dtype = values.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cat = pd.Categorical(values)
            return {"dtype": "category", "ordered": bool(cat.ordered),
                    "categories": self.pandas(cat.categories, f"{where} categories"),
                    "codes": self.array(np.asarray(cat.codes), where)}
        if isinstance(dtype, np.dtype) and dtype.kind in _ARRAY_KINDS:
            return {"dtype": dtype.str, "array": self.array(np.asarray(values), where)}
        if str(dtype) in _LIST_DTYPES:
            return {"dtype": str(dtype), "items": [self.value(x, where) for x in values]}
        _cannot_save(where, f"pandas values of dtype {dtype} cannot be stored")

    def pandas(self, v: Any, where: str) -> dict[str, Any]:
        if type(v) is pd.RangeIndex:
            return {"$": "RangeIndex", "start": v.start, "stop": v.stop, "step": v.step,
                    "name": self.value(v.name, f"{where} name")}
        if type(v) is pd.MultiIndex:
            return {"$": "MultiIndex",
                    "levels": [self.pandas(lv, f"{where} level") for lv in v.levels],
                    "codes": [self.array(np.asarray(c), f"{where} codes") for c in v.codes],
                    "names": [self.value(n, f"{where} name") for n in v.names]}
        if isinstance(v, pd.Index):
            return {"$": "Index", "values": self.values(v, where),
                    "name": self.value(v.name, f"{where} name")}
        if type(v) is pd.Series:
            return {"$": "Series", "values": self.values(v, where),
                    "index": self.pandas(v.index, f"{where} index"),
                    "name": self.value(v.name, f"{where} name"),
                    "attrs": self.value(dict(v.attrs), f"{where} attrs")}
        if type(v) is pd.DataFrame:
            return {"$": "DataFrame",
                    "columns": self.pandas(v.columns, f"{where} columns"),
                    "index": self.pandas(v.index, f"{where} index"),
                    "data": [self.values(v.iloc[:, j], f"{where}[{v.columns[j]!r}]")
                             for j in range(v.shape[1])],
                    "attrs": self.value(dict(v.attrs), f"{where} attrs")}
        _cannot_save(where, f"a value of type {type(v).__qualname__} cannot be stored")

    def family(self, fam: Family, where: str) -> dict[str, Any]:
        try:
            builtin = get_family(fam.name, fam.link.name)
        except Exception:
            builtin = None
        if builtin is None or type(builtin) is not type(fam) \
                or type(builtin.link) is not type(fam.link):
            _cannot_save(where, f"the family {fam!r} is not a built-in family; only the "
                                "built-in families (gaussian, binomial, poisson, "
                                "negative_binomial, gamma) with their built-in links can be "
                                "saved")
        return {"$": "Family", "name": fam.name, "link": fam.link.name}

    def network(self, net: torch.nn.Module, where: str) -> dict[str, Any]:
        try:
            description = network_to_data(net)
        except TypeError as exc:
            _cannot_save(where, f"{exc}; only built-in networks can be saved")
        state = {}
        for name, t in net.state_dict().items():
            if t.dtype == torch.bfloat16:
                _cannot_save(where, f"weights {name} of dtype bfloat16 cannot be stored")
            state[name] = self.array(t.detach().cpu().numpy().copy(), f"{where} {name}")
        return {"$": "Network", "network": description, "state": state,
                "training": bool(net.training)}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """numpy's ``.npz`` of ``arrays``, uncompressed (the payload is gzip'd) and with fixed
    timestamps, so that the same fit gives the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, a, allow_pickle=False)
    return buf.getvalue()


def dumps(fit: NGMMResult) -> bytes:
    """The bytes of a model file (what :func:`save` writes; format version 2).

    Raises
    ------
    ModelFileError
        If ``fit`` is not a result, or holds something that a model file cannot describe
        as data (a custom family or network, a formulaic value of another type); the
        message names it.
    """
    if not isinstance(fit, NGMMResult):
        raise ModelFileError(f"save() needs a fitted NGMMResult, got {type(fit).__name__}")
    fields = {f.name: getattr(fit, f.name) for f in dataclasses.fields(fit) if f.name != "refit"}
    fields["nets"] = _cpu_nets(tuple(fields["nets"]))
    writer = _Writer()
    model = {"fields": {name: writer.value(v, name) for name, v in fields.items()}}
    text = json.dumps(model, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")
    container = _LENGTH.pack(len(text)) + text + _npz(writer.arrays)
    payload = gzip.compress(container, compresslevel=6, mtime=0)
    header = {
        "package": "ngmm_formula",
        "package_version": _package_version(),
        "libraries": _library_versions(),
        "formula": fit.formula,
        "family": fit.family.name,
        "link": fit.family.link.name,
        "nobs": fit.nobs,
        "payload": {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                    "compression": _COMPRESSION, "serializer": _SERIALIZER},
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload


def save(fit: NGMMResult, path: str | os.PathLike[str]) -> Path:
    """Write a fitted model to ``path`` (conventionally ``*.ngmm``), in format version 2.

    The file is written to a temporary file in the same folder and then renamed, so an
    interrupted save never leaves a truncated model where a good one was. The ``refit``
    closure is not saved (see the module docstring), nor the functions of ``ngmm(...,
    context=)`` (they are code): a loaded model whose formula calls one of them raises
    :class:`~ngmm_formula.errors.FormulaError` naming it when it predicts.

    Parameters
    ----------
    fit : NGMMResult
    path : str or path-like

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ModelFileError
        If the folder does not exist or cannot be written, or the model holds a custom
        family or network (only the built-in ones can be saved) or another value that a
        model file cannot describe as data.
    """
    data = dumps(fit)
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise ModelFileError(f"cannot write the model file '{target}': the folder "
                             f"'{folder}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if os.name == "posix":  # mkstemp's 0600 -> what open() would have given
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ModelFileError(f"cannot write the model file '{target}': "
                             f"{exc.strerror or exc}") from None
    return target


# --------------------------------------------------------------------------------------------
# reading


def _fail(source: str, message: str) -> NoReturn:
    raise ModelFileError(f"{source}: {message}")


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"model file '{p}' does not exist") from None
    except IsADirectoryError:
        raise ModelFileError(f"model file '{p}' is a folder, not a file") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file '{p}': {exc.strerror or exc}") \
            from None


def _parse_header(data: bytes, source: str) -> tuple[int, dict[str, Any], bytes]:
    """Check magic, version, header and payload integrity; return (version, header,
    payload). Reads nothing but JSON: safe on files from any source."""
    if not data:
        _fail(source, "the model file is empty")
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and data and MAGIC.startswith(data):
            _fail(source, f"the model file is truncated ({len(data)} bytes)")
        _fail(source, "not an ngmm model file (it does not start with the ngmm magic bytes; "
                      "model files are written by NGMMResult.save / ngmm fit --save)")
    if len(data) < _PREFIX.size:
        _fail(source, f"the model file is truncated ({len(data)} bytes)")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version not in _ENCODINGS:
        advice = ("upgrade ngmm_formula to read it" if version > FORMAT_VERSION
                  else "load it with the ngmm_formula that wrote it and fit the model again")
        _fail(source, f"model-file format version {version} is not supported: this "
                      f"ngmm_formula {_package_version()} reads format version "
                      f"{FORMAT_VERSION} (and the old version {PICKLE_FORMAT_VERSION} with "
                      f"trusted=True); {advice}")
    if head_len > _MAX_HEADER:
        _fail(source, f"the model file is corrupted (header length {head_len})")
    end = _PREFIX.size + head_len
    if len(data) < end:
        _fail(source, f"the model file is truncated ({len(data)} bytes, inside the header)")
    try:
        header = json.loads(data[_PREFIX.size:end].decode("utf-8"))
        spec = header["payload"]
        n_bytes, digest = int(spec["bytes"]), str(spec["sha256"])
        encoding: tuple[Any, ...] = (spec["compression"], spec["serializer"])
        if version == PICKLE_FORMAT_VERSION:
            encoding += (int(spec["protocol"]),)
        str(header["package_version"])
    except (ValueError, KeyError, TypeError, RecursionError):
        _fail(source, "the model file is corrupted (its header is not valid)")
    if encoding != _ENCODINGS[version]:
        _fail(source, f"the model file is corrupted (unknown payload encoding {encoding})")
    payload = data[end:]
    if len(payload) < n_bytes:
        _fail(source, f"the model file is truncated: its header announces {n_bytes} payload "
                      f"bytes but only {len(payload)} are present")
    if len(payload) > n_bytes:
        _fail(source, f"the model file is corrupted: {len(payload) - n_bytes} unexpected "
                      "bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != digest:
        _fail(source, "the model file is corrupted: the SHA-256 checksum of its payload does "
                      "not match the one recorded when it was saved")
    return version, header, payload


class _Reader:
    """Rebuilds values from the model JSON and the arrays; every tag must be one of the
    registered ones, and nothing named in the file is ever imported."""

    def __init__(self, arrays: Any) -> None:
        self._npz = arrays
        self._cache: dict[str, np.ndarray] = {}

    def value(self, d: Any) -> Any:
        if d is None or type(d) in (bool, str, int, float):
            return d
        if type(d) is list:
            return [self.value(x) for x in d]
        if type(d) is not dict:
            raise ValueError(f"unexpected JSON value {str(d)[:40]!r}")
        tag = d.get("$")
        if not isinstance(tag, str):
            raise ValueError("a JSON object without a type tag")
        if tag in VALUE_TYPES:
            return self.record(tag, d)
        handler = self._handlers.get(tag)
        if handler is None:
            raise ValueError(f"unknown value type {tag[:60]!r} (a model file holds only the "
                             "registered types)")
        return handler(self, d)

    def record(self, tag: str, d: dict[str, Any]) -> Any:
        cls = VALUE_TYPES[tag]
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        fields = d["fields"]
        if type(fields) is not dict:
            raise ValueError(f"{tag}: its fields are not a JSON object")
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"{tag} has no field(s) {unknown[:3]}")
        return cls(**{k: self.value(x) for k, x in fields.items()})

    def array(self, d: dict[str, Any]) -> np.ndarray:
        if d.get("$") == "objects":
            items = [self.value(x) for x in d["items"]]
            out = np.empty(len(items), dtype=object)
            for k, x in enumerate(items):
                out[k] = x
            a = out.reshape([int(n) for n in d["shape"]])
        else:
            if d.get("$") != "ndarray":
                raise ValueError("expected an array")
            key = str(d["key"])
            if key not in self._cache:
                if key not in self._npz.files:
                    raise ValueError(f"array {key[:20]!r} is not in the file")
                a = self._npz[key]
                if a.dtype.kind not in _ARRAY_KINDS or a.dtype.fields is not None:
                    raise ValueError(f"array {key} has dtype {a.dtype}")
                self._cache[key] = a
            a = self._cache[key]
        if not d["writeable"]:
            a.setflags(write=False)
        return a

    def values(self, d: dict[str, Any]) -> Any:
        dtype = d["dtype"]
        if dtype == "category":
            categories = self.value(d["categories"])
            return pd.Categorical.from_codes(self.array(d["codes"]), categories=categories,
                                             ordered=bool(d["ordered"]))
        if "array" in d:
            np_dtype = np.dtype(str(dtype))
            a = self.array(d["array"])
            if a.dtype != np_dtype:
                raise ValueError(f"values of dtype {a.dtype}, expected {np_dtype}")
            return a
        if dtype not in _LIST_DTYPES:
            raise ValueError(f"unknown pandas dtype {str(dtype)[:40]!r}")
        return pd.array([self.value(x) for x in d["items"]], dtype=dtype)

    def _tuple(self, d: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(self.value(x) for x in d["items"])

    def _dict(self, d: dict[str, Any]) -> dict[Any, Any]:
        out = {}
        for k, x in d["items"]:
            key = self.value(k)
            if isinstance(key, (list, dict)):
                raise ValueError("a dictionary key cannot be a list or a dictionary")
            out[key] = self.value(x)
        return out

    def _float(self, d: dict[str, Any]) -> float:
        if d["value"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"unexpected float {str(d['value'])[:20]!r}")
        return float(d["value"])

    def _numpy(self, d: dict[str, Any]) -> Any:
        dtype = np.dtype(str(d["dtype"]))
        if dtype.kind not in "biuf":
            raise ValueError(f"unexpected numpy scalar type {dtype}")
        return dtype.type(self.value(d["value"]))

    def _range_index(self, d: dict[str, Any]) -> pd.RangeIndex:
        return pd.RangeIndex(int(d["start"]), int(d["stop"]), int(d["step"]),
                             name=self.value(d["name"]))

    def _index(self, d: dict[str, Any]) -> pd.Index:
        return pd.Index(self.values(d["values"]), name=self.value(d["name"]))

    def _multi_index(self, d: dict[str, Any]) -> pd.MultiIndex:
        return pd.MultiIndex(levels=[self.value(lv) for lv in d["levels"]],
                             codes=[list(self.array(c)) for c in d["codes"]],
                             names=[self.value(n) for n in d["names"]])

    def _series(self, d: dict[str, Any]) -> pd.Series:
        s = pd.Series(self.values(d["values"]), index=self.value(d["index"]),
                      name=self.value(d["name"]), copy=False)
        s.attrs.update(self._attrs(d))
        return s

    def _data_frame(self, d: dict[str, Any]) -> pd.DataFrame:
        index, columns = self.value(d["index"]), self.value(d["columns"])
        cols = [pd.Series(self.values(c), index=index, copy=False) for c in d["data"]]
        if len(cols) != len(columns):
            raise ValueError("a DataFrame whose columns do not match its data")
        frame = pd.DataFrame(dict(enumerate(cols)), index=index)
        frame.columns = columns
        frame.attrs.update(self._attrs(d))
        return frame

    def _attrs(self, d: dict[str, Any]) -> dict[Any, Any]:
        attrs = self.value(d["attrs"])
        if not isinstance(attrs, dict):
            raise ValueError("attrs is not a dictionary")
        return attrs

    def _family(self, d: dict[str, Any]) -> Family:
        return get_family(str(d["name"]), str(d["link"]))

    def _network(self, d: dict[str, Any]) -> torch.nn.Module:
        net = network_from_data(d["network"])
        state = d["state"]
        if type(state) is not dict:
            raise ValueError("network weights are not a JSON object")
        tensors = {str(k): torch.from_numpy(np.array(self.array(v))) for k, v in state.items()}
        net.load_state_dict(tensors, strict=True)
        net.train(bool(d["training"]))
        return net

    def _model_spec(self, d: dict[str, Any]) -> Any:
        return spec_from_data(d["data"])

    _handlers: dict[str, Callable[[_Reader, dict[str, Any]], Any]] = {
        "tuple": _tuple, "dict": _dict, "float": _float, "numpy": _numpy,
        "ndarray": array, "objects": array, "RangeIndex": _range_index, "Index": _index,
        "MultiIndex": _multi_index, "Series": _series, "DataFrame": _data_frame,
        "Family": _family, "Network": _network, "ModelSpec": _model_spec,
    }


def _fitted_eta(fit: NGMMResult) -> np.ndarray:
    """The training data's linear predictor recomputed from the loaded parts."""
    d = fit.design
    eta = d.offset + d.X @ fit.fixef.to_numpy()
    with torch.no_grad():
        for ni, net in zip(d.nets, fit.nets):
            eta = eta + net(torch.from_numpy(np.array(ni.X, dtype=np.float64))).numpy()
    for t, b in zip(d.re_terms, fit.random_coef):
        eta = eta + re_effect(t.Zraw, t.group_index, b)
    return np.asarray(eta)


#: How closely a rebuilt model must reproduce its stored linear predictor, relative to
#: 1 + max|eta|: float64 arithmetic throughout, and with float32 networks, whose matrix
#: products round differently on CPUs with other vector units (AVX-512 against AVX2 kernels
#: sum in other orders: a few float32 ulps, 6e-8 each, per layer; measured 1.5e-8 on a
#: fixture written on another machine). A changed meaning moves it by orders more.
CONSISTENT_TOL = {torch.float64: 1e-9, torch.float32: 1e-6}


def _check_consistent(fit: NGMMResult, source: str, versions: str) -> None:
    """A rebuilt model must reproduce its stored fitted linear predictor (to rounding: the
    fit sums the network outputs in another order; :data:`CONSISTENT_TOL`); catches objects
    whose meaning changed between package versions."""
    eta = np.asarray(fit.eta)
    try:
        again = _fitted_eta(fit)
    except Exception as exc:
        _fail(source, f"the loaded model cannot evaluate its linear predictor ({exc}); "
                      f"{versions}")
    if again.shape != eta.shape:
        _fail(source, f"the loaded model's parts do not fit together (fitted values of shape "
                      f"{again.shape}, stored {eta.shape}); {versions}")
    both_nan = np.isnan(eta) & np.isnan(again)
    scale = 1.0 + float(np.max(np.abs(eta[~both_nan]), initial=0.0))
    err = float(np.max(np.abs(again - eta)[~both_nan], initial=0.0))
    tol = max([CONSISTENT_TOL[torch.float64]] + [
        CONSISTENT_TOL.get(p.dtype, CONSISTENT_TOL[torch.float32])
        for net in fit.nets for p in net.parameters()])
    if not err <= tol * scale:
        _fail(source, f"the loaded model does not reproduce its fitted values (max "
                      f"difference {err:.3g} on the linear-predictor scale); {versions}")


def _check_formula(fit: NGMMResult, header: dict[str, Any], source: str) -> None:
    """Everything that predicting evaluates comes from the model's formula, the one the
    header shows (:func:`read_header`): the parsed formula is the formula's, and each
    formulaic ModelSpec evaluates only the factors of its part of the formula."""
    d = fit.design
    try:
        if header.get("formula") != fit.formula:
            raise ValueError(f"its header shows the formula {header.get('formula')!r}, its "
                             f"model {fit.formula!r}")
        if parse_formula(fit.formula) != d.formula or d.spec.formula != d.formula:
            raise ValueError(f"its parsed formula is not that of {fit.formula!r}")
        if len(d.spec.re_specs) != len(d.spec.re_terms):
            raise ValueError("its random-effects terms do not match their encodings")
        check_spec_formula(d.spec.fixed_spec, d.formula.fixed)
        for (bar, _), spec in zip(d.spec.re_terms, d.spec.re_specs):
            check_spec_formula(spec, bar.expr)
    except Exception as exc:  # a ValueError above, or formulaic's parser on a forged formula
        _fail(source, f"the model file is inconsistent: {str(exc)[:300]} (a damaged or "
                      "crafted file)")


def _unpickle(container: bytes) -> Any:
    """The version-1 container. Runs pickle: reached only with ``trusted=True``."""
    view = memoryview(container)
    n_buf, n_pickle = _COUNTS.unpack_from(view)
    pos = _COUNTS.size
    lengths = [_LENGTH.unpack_from(view, pos + k * _LENGTH.size)[0] for k in range(n_buf)]
    pos += n_buf * _LENGTH.size
    stream = view[pos:pos + n_pickle]
    pos += n_pickle
    buffers = []
    for n in lengths:
        buffers.append(bytearray(view[pos:pos + n]))  # own, aligned, writable memory; pickle
        pos += n                                      # re-applies each read-only flag
    if pos != len(container):
        raise ValueError("container length mismatch")
    return pickle.loads(stream, buffers=buffers)  # noqa: S301 -- trusted=True only


def _fields_v1(container: bytes) -> Any:
    obj = _unpickle(container)
    return obj.get("fields") if isinstance(obj, dict) else None


def _fields_v2(container: bytes) -> Any:
    if len(container) < _LENGTH.size:
        raise ValueError("the container is too short")
    (n_json,) = _LENGTH.unpack_from(container)
    end = _LENGTH.size + n_json
    if end > len(container):
        raise ValueError("the container is shorter than its JSON")
    model = json.loads(container[_LENGTH.size:end].decode("utf-8"))
    with np.load(io.BytesIO(container[end:]), allow_pickle=False) as arrays:
        fields = model.get("fields") if isinstance(model, dict) else None
        if type(fields) is not dict:
            return None
        reader = _Reader(arrays)
        return {str(name): reader.value(v) for name, v in fields.items()}


def _old_format_message() -> str:
    return ("the model file is in the old pickle format (format version "
            f"{PICKLE_FORMAT_VERSION}): loading it could run code hidden in it. If you trust "
            "the file (you wrote it yourself), load it with ngmm_formula.load(path, "
            "trusted=True) (or 'ngmm predict --trusted') and save it again with "
            "fit.save(path) to convert it to the current format, which holds data only")


def loads(data: bytes, *, source: str = "<bytes>", trusted: bool = False) -> NGMMResult:
    """Rebuild a model from the bytes of a model file (see :func:`load`, also for
    ``trusted``)."""
    version, header, payload = _parse_header(bytes(data), source)
    if version == PICKLE_FORMAT_VERSION and trusted is not True:
        _fail(source, _old_format_message())
    saved, current = str(header["package_version"]), _package_version()
    libs: dict[str, Any] = header.get("libraries") or {}
    if not isinstance(libs, dict):
        libs = {}
    versions = (f"the file was written by ngmm_formula {saved} (torch {libs.get('torch', '?')}"
                f", formulaic {libs.get('formulaic', '?')}), this is ngmm_formula {current} "
                f"(torch {torch.__version__}, formulaic {_library_versions()['formulaic']})")
    try:
        container = gzip.decompress(payload)
    except (OSError, EOFError, zlib.error):
        _fail(source, "the model file is corrupted (its payload does not decompress)")
    try:
        fields = (_fields_v1 if version == PICKLE_FORMAT_VERSION else _fields_v2)(container)
    except Exception as exc:  # a value type unknown to this version, a malformed value, ...
        _fail(source, f"cannot rebuild the saved model ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); {versions}")
    if not isinstance(fields, dict):
        _fail(source, "the model file is corrupted (unexpected payload)")
    try:
        fit = NGMMResult(**fields, refit=_LoadedRefit())
    except TypeError as exc:
        _fail(source, f"cannot rebuild the saved model ({exc}); {versions}")
    if version == FORMAT_VERSION:
        _check_formula(fit, header, source)
    _check_consistent(fit, source, versions)
    if saved != current:
        warnings.warn(f"{source}: {versions}; the model reproduces its fitted values, but "
                      "check its predictions", NGMMWarning, stacklevel=3)
    return fit


def load(path: str | os.PathLike[str], *, trusted: bool = False) -> NGMMResult:
    """Read a model written by :func:`save`.

    A model file of the current format (version 2) holds data only: loading it never runs
    code from the file, whatever its source.

    Parameters
    ----------
    path : str or path-like
    trusted : bool
        Also read files of the old format version 1, written by ngmm_formula before format
        version 2. Those hold a pickle, and unpickling runs whatever code the file names: a
        crafted file can do anything the Python process can. Pass ``trusted=True`` only for
        files you wrote yourself (or otherwise trust), then save the loaded model again
        (``fit.save(path)``) to convert it to version 2. It changes nothing for version-2
        files.

    Returns
    -------
    NGMMResult
        Predicts, summarises and simulates exactly as the saved result; ``refit_ml()`` of a
        REML fit raises :class:`~ngmm_formula.errors.NGMMError` (the data are not saved).

    Raises
    ------
    ModelFileError
        Not a model file, another format version, a version-1 file without
        ``trusted=True``, a truncated or corrupted file, or values that this version of the
        package cannot rebuild. A model written by another package version with the same
        format version loads with an :class:`~ngmm_formula.errors.NGMMWarning`.
    """
    return loads(_read_bytes(path), source=str(path), trusted=trusted)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a model file (versions, formula, family, payload checksum) and its
    ``format_version``, after the same integrity checks as :func:`load` but without reading
    the payload: safe on files from any source, of either format version."""
    version, header, _ = _parse_header(_read_bytes(path), str(path))
    return dict(header, format_version=version)
