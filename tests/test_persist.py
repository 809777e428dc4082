"""Tests of :mod:`ngmm_formula.persist`: model files.

* round trip: save -> load -> the same predictions, bit for bit, on new data with a new
  grouping level (conditional and population-level, response and link scale), the same
  summary text and estimates, for a Gaussian LMM, a binomial NGMM and a crossed model;
* the learnt encodings come from the file (a stateful ``scale()`` is not relearnt on newdata);
* ``refit_ml()`` of a loaded REML fit raises a clear error;
* every damaged file is an error, never a silently different model: truncated, a flipped byte
  (every byte of the payload), wrong magic, another format version, forged contents.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import persist
from ngmm_formula.api import ngmm
from ngmm_formula.datasets import load, simulate_grouped
from ngmm_formula.errors import NGMMError, NGMMWarning
from ngmm_formula.fit import Control
from ngmm_formula.persist import ModelFileError
from ngmm_formula.results import NGMMResult

MODELS = ["lmm", "ngmm", "crossed"]


@cache
def fit_of(kind: str) -> NGMMResult:
    if kind == "lmm":
        return ngmm("Reaction ~ Days + (Days | Subject)", load("sleepstudy"))
    if kind == "ngmm":
        return ngmm("y ~ nn(x1, x2, hidden=(8, 8)) + x3 + (1 | g)",
                    simulate_grouped(30, 10, "binomial", seed=1), "binomial",
                    control=Control(epochs=5, progress=False), seed=0)
    return ngmm("diameter ~ 1 + (1 | plate) + (1 | sample)", load("Penicillin"))


def newdata_of(kind: str) -> pd.DataFrame:
    """New rows: known levels and one level the training data did not have."""
    if kind == "lmm":
        nd = pd.DataFrame({"Days": [0.0, 2.5, 9.0, 4.0, 11.0],
                           "Subject": ["308", "309", "372", "new", "new"]})
    elif kind == "ngmm":
        nd = simulate_grouped(4, 5, "binomial", seed=99)
        nd["g"] = nd["g"].astype(str)
        nd.loc[nd.index[-3:], "g"] = "new"
    else:
        nd = pd.DataFrame({"plate": ["a", "x", "new", "b"], "sample": ["A", "F", "B", "new"]})
    nd.index = pd.RangeIndex(100, 100 + len(nd))
    return nd


@cache
def loaded_of(kind: str, folder: Path) -> NGMMResult:
    path = persist.save(fit_of(kind), folder / f"{kind}.ngmm")
    return persist.load(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit for bit (NaN in the same places)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("kind", MODELS)
def test_predictions_identical(kind: str, folder: Path) -> None:
    fit, back = fit_of(kind), loaded_of(kind, folder)
    nd = newdata_of(kind)
    for type_ in ("response", "link"):
        for re_form in (None, "~0"):
            _same(back.predict(nd, type=type_, re_form=re_form, allow_new_levels=True),
                  fit.predict(nd, type=type_, re_form=re_form, allow_new_levels=True))
    _same(back.predict(), fit.predict())
    _same(back.simulate(2, seed=3).to_numpy(), fit.simulate(2, seed=3).to_numpy())


@pytest.mark.parametrize("kind", MODELS)
def test_summary_and_estimates_identical(kind: str, folder: Path) -> None:
    fit, back = fit_of(kind), loaded_of(kind, folder)
    assert str(back.summary()) == str(fit.summary())
    assert back.formula == fit.formula and back.family == fit.family
    assert back.approximation == fit.approximation and back.diagnostics == fit.diagnostics
    assert back.history == fit.history and back.data_name == fit.data_name
    pd.testing.assert_series_equal(back.fixef, fit.fixef, check_exact=True)
    pd.testing.assert_frame_equal(back.vcov, fit.vcov, check_exact=True)
    pd.testing.assert_frame_equal(back.varcorr, fit.varcorr, check_exact=True)
    for g in fit.ranef:
        pd.testing.assert_frame_equal(back.ranef[g], fit.ranef[g], check_exact=True)
        _same(back.ranef[g].attrs["postVar"], fit.ranef[g].attrs["postVar"])
    assert (back.loglik, back.aic, back.bic, back.sigma) == (fit.loglik, fit.aic, fit.bic,
                                                             fit.sigma)
    # the design's arrays stay read-only, as in the fitted result
    assert not back.design.X.flags.writeable and back.eta.flags.writeable


def test_networks_identical(folder: Path) -> None:
    fit, back = fit_of("ngmm"), loaded_of("ngmm", folder)
    assert back.history is not None and len(back.history.train) == 5
    for a, b in zip(fit.nets, back.nets):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            _same(sa[k].numpy(), sb[k].numpy())
        assert a.training == b.training
    pd.testing.assert_frame_equal(back.partial_dependence(0, "x1", grid=5),
                                  fit.partial_dependence(0, "x1", grid=5), check_exact=True)


def test_stateful_transform_state_is_saved(tmp_path: Path) -> None:
    """``scale(Days)`` keeps the training centre and scale: predicting two rows must not
    re-standardise them on themselves."""
    sleep = load("sleepstudy")
    fit = ngmm("Reaction ~ scale(Days) + (1 | Subject)", sleep)
    back = persist.load(persist.save(fit, tmp_path / "m.ngmm"))
    rows = sleep.iloc[[3, 17]]
    _same(back.predict(rows), fit.predict()[[3, 17]])


def test_files_are_deterministic() -> None:
    fit = fit_of("crossed")
    assert persist.dumps(fit) == persist.dumps(fit)


def test_loaded_fit_cannot_refit(folder: Path) -> None:
    back = loaded_of("lmm", folder)  # REML: refit_ml must refit
    assert back.reml
    with pytest.raises(NGMMError, match=r"a loaded model has no data to refit; fit again "
                                        r"with ngmm\(\.\.\.\)"):
        back.refit_ml()
    ml = loaded_of("ngmm", folder)  # not REML: nothing to refit
    assert ml.refit_ml() is ml


def test_save_does_not_change_the_fit(tmp_path: Path) -> None:
    fit = fit_of("lmm")
    persist.save(fit, tmp_path / "a.ngmm")
    assert fit.refit is not None and callable(fit.refit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ngmm"]  # no temporary left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_replaces_with_default_permissions(tmp_path: Path) -> None:
    path = tmp_path / "m.ngmm"
    path.write_bytes(b"old contents")
    persist.save(fit_of("crossed"), path)
    assert path.read_bytes() == persist.dumps(fit_of("crossed"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_read_header(folder: Path) -> None:
    persist.save(fit_of("ngmm"), folder / "h.ngmm")
    header = persist.read_header(folder / "h.ngmm")
    assert header["formula"] == "y ~ nn(x1, x2, hidden=(8, 8)) + x3 + (1 | g)"
    assert (header["family"], header["link"], header["nobs"]) == ("binomial", "logit", 300)
    assert header["format_version"] == persist.FORMAT_VERSION
    assert header["package_version"] == __import__("ngmm_formula").__version__


# ------------------------------------------------------------------------------------------
# damaged and foreign files


@pytest.fixture(scope="module")
def good() -> bytes:
    return persist.dumps(fit_of("lmm"))


def _payload_start(data: bytes) -> int:
    n = len(persist.MAGIC)
    return n + 6 + struct.unpack(">I", data[n + 2:n + 6])[0]


def _load_bytes(tmp_path: Path, data: bytes) -> NGMMResult:
    path = tmp_path / "m.ngmm"
    path.write_bytes(data)
    return persist.load(path)


@pytest.mark.parametrize("cut", [0, 4, 12, 40, -1000, -1])
def test_truncated_file(tmp_path: Path, good: bytes, cut: int) -> None:
    data = good[:cut]
    msg = "empty" if cut == 0 else "truncated"
    with pytest.raises(ModelFileError, match=msg):
        _load_bytes(tmp_path, data)


def test_every_flipped_payload_byte_is_detected(good: bytes) -> None:
    start = _payload_start(good)
    for pos in range(start, len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        with pytest.raises(ModelFileError, match="corrupted: the SHA-256 checksum"):
            persist.loads(bytes(bad))


def test_flipped_header_bytes(tmp_path: Path, good: bytes) -> None:
    """Any flipped byte of magic, version and lengths is an error; in the JSON header the
    structure, the payload's length, encoding and checksum are checked, and a flip that
    passes can only have changed an informational entry (versions, formula, a key's name)."""
    path = tmp_path / "m.ngmm"
    path.write_bytes(good)
    original = persist.read_header(path)
    passed = []
    for pos in range(_payload_start(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        try:
            header = persist.read_header(path)
        except ModelFileError:
            continue
        passed.append(pos)
        assert pos >= len(persist.MAGIC) + 6
        assert header["payload"] == original["payload"]
        assert header["format_version"] == original["format_version"]
    assert passed  # some flips hit informational text; such a file still loads correctly
    bad = bytearray(good)
    bad[passed[0]] ^= 0x01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NGMMWarning)  # if the flip hit the package version
        back = persist.loads(bytes(bad))
    _same(back.predict(newdata_of("lmm"), allow_new_levels=True),
          fit_of("lmm").predict(newdata_of("lmm"), allow_new_levels=True))


@pytest.mark.parametrize("content", [
    b"Reaction,Days,Subject\n249.56,0,308\n",
    pickle.dumps({"a": 1}),
    gzip.compress(b"hello"),
    b"\x89PNG\r\n\x1a\n" + bytes(40),
])
def test_wrong_magic(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ModelFileError, match="not an ngmm model file"):
        _load_bytes(tmp_path, content)


@pytest.mark.parametrize("version", [2, 0])
def test_other_format_version(tmp_path: Path, good: bytes, version: int) -> None:
    n = len(persist.MAGIC)
    data = good[:n] + struct.pack(">H", version) + good[n + 2:]
    with pytest.raises(ModelFileError,
                       match=rf"format version {version} is not supported: this ngmm_formula "
                             rf"\S+ reads format version 1"):
        _load_bytes(tmp_path, data)
    with pytest.raises(ModelFileError, match="format version"):
        persist.read_header(tmp_path / "m.ngmm")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        persist.load(tmp_path / "nope.ngmm")
    with pytest.raises(ModelFileError, match="is a folder"):
        persist.load(tmp_path)
    with pytest.raises(ModelFileError, match="folder .* does not exist"):
        persist.save(fit_of("crossed"), tmp_path / "no" / "m.ngmm")
    with pytest.raises(ModelFileError, match="needs a fitted NGMMResult"):
        persist.save("not a fit", tmp_path / "m.ngmm")  # type: ignore[arg-type]


def test_inconsistent_model_is_refused() -> None:
    """A file whose (validly checksummed) parts no longer fit together -- as when a class
    changed meaning between package versions -- is refused, not loaded silently wrong."""
    fit = fit_of("lmm")
    forged = dataclasses.replace(fit, fixef=fit.fixef + 1e-6)
    with pytest.raises(ModelFileError, match="does not reproduce its fitted values"):
        persist.loads(persist.dumps(forged))


def test_other_package_version_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(persist, "_package_version", lambda: "0.0.1")
        data = persist.dumps(fit_of("crossed"))
    with pytest.warns(NGMMWarning, match=r"written by ngmm_formula 0\.0\.1"):
        back = persist.loads(data)
    _same(back.predict(newdata_of("crossed"), allow_new_levels=True),
          fit_of("crossed").predict(newdata_of("crossed"), allow_new_levels=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        persist.loads(persist.dumps(fit_of("crossed")))  # same version: silent
