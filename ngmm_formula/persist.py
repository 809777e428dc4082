r"""Saving and loading fitted models: :func:`save` and :func:`load`.

A model file holds everything :class:`~ngmm_formula.results.NGMMResult` needs to summarise the
fit and to predict new data exactly as the fitted object does, bit for bit: the network
weights and centring constants, the formulaic ``ModelSpec`` objects and the other encodings
learnt on the training data (:class:`~ngmm_formula.design.DesignSpec`), the formula, the
family and link, the approximation, the estimates, conditional modes and variances, the
diagnostics and the training history. The ``refit`` closure of a fitted result (which refits
the model on the original data, for ``anova`` of REML fits) is not saved: ``refit_ml()`` of a
loaded REML model raises :class:`~ngmm_formula.errors.NGMMError` (:data:`LOADED_REFIT_MESSAGE`)
-- fit the model again with :func:`~ngmm_formula.ngmm` to compare it by likelihood-ratio test.

File format (version 1)
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

The payload container is a pickle (protocol 5) of ``{"fields": {name: value}}`` -- every field
of the result except ``refit`` -- with numpy's arrays (and so pandas' columns) written as
out-of-band buffers, which keeps each array's read-only flag: ``<n_buffers: u32>
<pickle_len: u64> <n_buffers x buffer_len: u64> <pickle> <buffers...>`` (big-endian).

:func:`load` checks, in order, the magic bytes (another kind of file), the format version
(another version: the message names both), the header, the payload length (a truncated file)
and its SHA-256 (a corrupted file), then unpickles and rebuilds the result, and finally checks
that the rebuilt model reproduces its stored linear predictor on the training data. Each
failure raises :class:`ModelFileError` with a one-line message: a damaged file never loads as
a silently different model.

.. warning::

    Like any pickle, a model file can run arbitrary code when loaded: load only files from a
    source you trust. :func:`read_header` reads the JSON header without unpickling anything.
    A model file also holds the training data's model matrices, responses and weights (the
    summary's residuals and ``simulate`` need them): share it as you would share the data.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import platform
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ngmm_formula.errors import NGMMError, NGMMWarning
from ngmm_formula.results import NGMMResult

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "LOADED_REFIT_MESSAGE",
    "ModelFileError",
    "dumps",
    "load",
    "loads",
    "read_header",
    "save",
]

#: The first nine bytes of every model file.
MAGIC = b"\x89NGMM\r\n\x1a\n"

#: Version of the file layout written by :func:`save`; :func:`load` reads only this one.
FORMAT_VERSION = 1

#: What ``refit_ml()`` of a loaded REML model raises.
LOADED_REFIT_MESSAGE = "a loaded model has no data to refit; fit again with ngmm(...)"

_PREFIX = struct.Struct(f">{len(MAGIC)}sHI")  # magic, format version, header length
_COUNTS = struct.Struct(">IQ")  # number of buffers, pickle length
_LENGTH = struct.Struct(">Q")
_MAX_HEADER = 1 << 20  # a header is a few hundred bytes; more means a corrupted length
_PROTOCOL = 5
_COMPRESSION = "gzip"
_SERIALIZER = "pickle"


class ModelFileError(NGMMError):
    """A model file that cannot be read: not a model file, another format version, truncated,
    corrupted, or written by a package version whose objects this one cannot rebuild."""


class _LoadedRefit:
    """The ``refit`` of a loaded result: the training data are not in the file."""

    def __call__(self, **kwargs: Any) -> NoReturn:
        raise NGMMError(LOADED_REFIT_MESSAGE)

    def __repr__(self) -> str:
        return "<no refit: loaded model>"


# --------------------------------------------------------------------------------------------
# writing


def _package_version() -> str:
    import ngmm_formula  # at call time: this module may be imported by the package's __init__

    return str(getattr(ngmm_formula, "__version__", "unknown"))


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


def _container(fields: dict[str, Any]) -> bytes:
    buffers: list[pickle.PickleBuffer] = []
    try:
        stream = pickle.dumps({"fields": fields}, protocol=_PROTOCOL,
                              buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"cannot save the model: part of it cannot be pickled ({exc}); "
                             "a custom Family or network must be defined at module level") \
            from None
    raws: list[memoryview] = [b.raw() for b in buffers]
    parts: list[bytes | memoryview] = [_COUNTS.pack(len(raws), len(stream)),
             *(_LENGTH.pack(r.nbytes) for r in raws), stream, *raws]
    return b"".join(parts)


def dumps(fit: NGMMResult) -> bytes:
    """The bytes of a model file (what :func:`save` writes)."""
    if not isinstance(fit, NGMMResult):
        raise ModelFileError(f"save() needs a fitted NGMMResult, got {type(fit).__name__}")
    fields = {f.name: getattr(fit, f.name) for f in dataclasses.fields(fit) if f.name != "refit"}
    fields["nets"] = _cpu_nets(tuple(fields["nets"]))
    payload = gzip.compress(_container(fields), compresslevel=6, mtime=0)
    header = {
        "package": "ngmm_formula",
        "package_version": _package_version(),
        "libraries": _library_versions(),
        "formula": fit.formula,
        "family": fit.family.name,
        "link": fit.family.link.name,
        "nobs": fit.nobs,
        "payload": {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                    "compression": _COMPRESSION, "serializer": _SERIALIZER,
                    "protocol": _PROTOCOL},
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload


def save(fit: NGMMResult, path: str | os.PathLike[str]) -> Path:
    """Write a fitted model to ``path`` (conventionally ``*.ngmm``).

    The file is written to a temporary file in the same folder and then renamed, so an
    interrupted save never leaves a truncated model where a good one was. The ``refit``
    closure is not saved (see the module docstring).

    Parameters
    ----------
    fit : NGMMResult
    path : str or path-like

    Returns
    -------
    Path
        The path written.
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


def _parse_header(data: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    """Check magic, version, header and payload integrity; return (header, payload)."""
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
    if version != FORMAT_VERSION:
        advice = ("upgrade ngmm_formula to read it" if version > FORMAT_VERSION
                  else "load it with the ngmm_formula that wrote it and fit the model again")
        _fail(source, f"model-file format version {version} is not supported: this "
                      f"ngmm_formula {_package_version()} reads format version "
                      f"{FORMAT_VERSION}; {advice}")
    if head_len > _MAX_HEADER:
        _fail(source, f"the model file is corrupted (header length {head_len})")
    end = _PREFIX.size + head_len
    if len(data) < end:
        _fail(source, f"the model file is truncated ({len(data)} bytes, inside the header)")
    try:
        header = json.loads(data[_PREFIX.size:end].decode("utf-8"))
        spec = header["payload"]
        n_bytes, digest = int(spec["bytes"]), str(spec["sha256"])
        encoding = (spec["compression"], spec["serializer"], int(spec["protocol"]))
        str(header["package_version"])
    except (ValueError, KeyError, TypeError):
        _fail(source, "the model file is corrupted (its header is not valid)")
    if encoding != (_COMPRESSION, _SERIALIZER, _PROTOCOL):
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
    return header, payload


def _unpack(container: bytes) -> Any:
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
    return pickle.loads(stream, buffers=buffers)


def _fitted_eta(fit: NGMMResult) -> np.ndarray:
    """The training data's linear predictor recomputed from the loaded parts."""
    d = fit.design
    eta = d.offset + d.X @ fit.fixef.to_numpy()
    with torch.no_grad():
        for ni, net in zip(d.nets, fit.nets):
            eta = eta + net(torch.from_numpy(np.array(ni.X, dtype=np.float64))).numpy()
    for t, b in zip(d.re_terms, fit.random_coef):
        eta = eta + (t.Zraw * b[t.group_index]).sum(1)
    return np.asarray(eta)


def _check_consistent(fit: NGMMResult, source: str, versions: str) -> None:
    """A rebuilt model must reproduce its stored fitted linear predictor (to rounding: the
    fit sums the network outputs in another order); catches objects whose meaning changed
    between package versions."""
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
    if not err <= 1e-9 * scale:
        _fail(source, f"the loaded model does not reproduce its fitted values (max "
                      f"difference {err:.3g} on the linear-predictor scale); {versions}")


def loads(data: bytes, *, source: str = "<bytes>") -> NGMMResult:
    """Rebuild a model from the bytes of a model file (see :func:`load`)."""
    header, payload = _parse_header(bytes(data), source)
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
        obj = _unpack(container)
    except Exception as exc:  # a class renamed or changed between versions, ...
        _fail(source, f"cannot rebuild the saved model ({type(exc).__name__}: {exc}); "
                      f"{versions}")
    fields = obj.get("fields") if isinstance(obj, dict) else None
    if not isinstance(fields, dict):
        _fail(source, "the model file is corrupted (unexpected payload)")
    try:
        fit = NGMMResult(**fields, refit=_LoadedRefit())
    except TypeError as exc:
        _fail(source, f"cannot rebuild the saved model ({exc}); {versions}")
    _check_consistent(fit, source, versions)
    if saved != current:
        warnings.warn(f"{source}: {versions}; the model reproduces its fitted values, but "
                      "check its predictions", NGMMWarning, stacklevel=3)
    return fit


def load(path: str | os.PathLike[str]) -> NGMMResult:
    """Read a model written by :func:`save`.

    .. warning::

        Like any pickle, a model file can run arbitrary code when loaded: load only files
        from a source you trust.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    NGMMResult
        Predicts, summarises and simulates exactly as the saved result; ``refit_ml()`` of a
        REML fit raises :class:`~ngmm_formula.errors.NGMMError` (the data are not saved).

    Raises
    ------
    ModelFileError
        Not a model file, another format version, a truncated or corrupted file, or objects
        that this version of the package cannot rebuild. A model written by another package
        version with the same format version loads with an
        :class:`~ngmm_formula.errors.NGMMWarning`.
    """
    return loads(_read_bytes(path), source=str(path))


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a model file (versions, formula, family, payload checksum),
    after the same integrity checks as :func:`load` but without unpickling anything: safe
    on files from any source."""
    header, _ = _parse_header(_read_bytes(path), str(path))
    return dict(header, format_version=FORMAT_VERSION)

