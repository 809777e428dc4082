"""Tests of :mod:`ngmm_formula.persist`: model files.

* round trip: save -> load -> the same predictions, bit for bit, on new data with a new
  grouping level (conditional and population-level, response and link scale), the same
  summary text and estimates, for a Gaussian LMM, a binomial NGMM and a crossed model;
* the learnt encodings come from the file (a stateful ``scale()`` is not relearnt on newdata);
* ``refit_ml()`` of a loaded REML fit raises a clear error;
* every damaged file is an error, never a silently different model: truncated, a flipped byte
  (every byte of the payload), wrong magic, another format version, forged contents;
* a model file holds data, not code: the format (version 2) is JSON and a numpy ``.npz``;
  loading never unpickles and never imports anything named in the file (a crafted version-1
  pickle is refused without ``trusted=True`` and its code does not run, also through
  ``ngmm predict``; a version-2 file naming an unregistered type is refused); custom
  families and networks are refused by ``save``;
* formulaic's ModelSpec round-trips through plain data (``scale``, ``poly``, ``C`` with
  contrasts, interactions, ``I()``): the same matrices on new data;
* the committed version-1 fixtures (``tests/fixtures``) load with ``trusted=True`` and predict
  bit for bit as when they were written.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula import cli, persist
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


def _same(a: np.ndarray, b: np.ndarray, rel: float = 0.0) -> None:
    """Bit for bit (NaN in the same places), or with ``rel`` within ``rel * (1 + |b|)``."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if not rel:
        assert a.tobytes() == b.tobytes()
        return
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(b)
    assert np.all(np.abs(a[ok] - b[ok]) <= rel * (1 + np.abs(b[ok])))


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
    # the design's arrays and the result's own (eta) are read-only, as in the fitted result
    assert not back.design.X.flags.writeable and not back.eta.flags.writeable


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
    assert header["format_version"] == persist.FORMAT_VERSION == 2
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


@pytest.mark.parametrize("version", [3, 0])
def test_other_format_version(tmp_path: Path, good: bytes, version: int) -> None:
    n = len(persist.MAGIC)
    data = good[:n] + struct.pack(">H", version) + good[n + 2:]
    with pytest.raises(ModelFileError,
                       match=rf"format version {version} is not supported: this ngmm_formula "
                             rf"\S+ reads format version 2 \(and the old version 1 with "
                             rf"trusted=True\)"):
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


# ------------------------------------------------------------------------------------------
# data, not code: format version 2, the old pickle format, crafted files


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _header_and_container(data: bytes) -> tuple[int, dict, bytes]:
    n = len(persist.MAGIC)
    version, head_len = struct.unpack(">HI", data[n:n + 6])
    header = json.loads(data[n + 6:n + 6 + head_len])
    return version, header, gzip.decompress(data[n + 6 + head_len:])


def _file(version: int, header: dict, container: bytes) -> bytes:
    """A model file around ``container`` with a valid header and recomputed checksum."""
    payload = gzip.compress(container, mtime=0)
    spec = dict(header["payload"], bytes=len(payload),
                sha256=hashlib.sha256(payload).hexdigest())
    if version == 1:
        spec.update(serializer="pickle", protocol=5)
    head = json.dumps(dict(header, payload=spec)).encode()
    return persist.MAGIC + struct.pack(">HI", version, len(head)) + head + payload


def _split_v2(container: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">Q", container[:8])
    return json.loads(container[8:8 + n]), container[8 + n:]


def _join_v2(model: dict, npz: bytes) -> bytes:
    text = json.dumps(model).encode()
    return struct.pack(">Q", len(text)) + text + npz


def _rewrite_v2(data: bytes, edit: Callable[[dict], None]) -> bytes:
    version, header, container = _header_and_container(data)
    model, npz = _split_v2(container)
    edit(model)
    return _file(version, header, _join_v2(model, npz))


class _MakeFolder:
    """Unpickling this runs ``os.mkdir(path)``: the marker of code run by a model file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def _crafted_v1(marker: Path) -> bytes:
    stream = pickle.dumps({"fields": _MakeFolder(marker)}, protocol=5)
    _, header, _ = _header_and_container(persist.dumps(fit_of("crossed")))
    return _file(1, header, struct.pack(">IQ", 0, len(stream)) + stream)


def test_format_is_json_and_npz() -> None:
    """The payload is JSON plus a ``.npz`` that numpy reads without pickle; no module path
    and no object array is in it."""
    version, header, container = _header_and_container(persist.dumps(fit_of("ngmm")))
    assert version == persist.FORMAT_VERSION == 2
    assert header["payload"]["serializer"] == "json+npz" and "protocol" not in header["payload"]
    model, npz = _split_v2(container)
    text = json.dumps(model)
    for path in ("ngmm_formula.", "formulaic.", "torch.", "numpy.", "pandas.", "builtins"):
        assert path not in text
    with np.load(io.BytesIO(npz), allow_pickle=False) as arrays:
        assert arrays.files and all(arrays[k].dtype.kind != "O" for k in arrays.files)
    tags: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if "$" in v:
                tags.add(v["$"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(model["fields"])
    assert {"Design", "DesignSpec", "ReTerm", "NetInput", "NNTerm", "Network", "ModelSpec",
            "Family", "TrainingHistory", "DataFrame", "Series", "ndarray"} <= tags


def test_crafted_pickle_is_refused_without_trusted(tmp_path: Path) -> None:
    """A version-1 file whose pickle would run code (valid header and checksum): load,
    loads and ``ngmm predict`` refuse it and the code does not run; read_header is safe."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ngmm"
    path.write_bytes(_crafted_v1(marker))
    message = (r"old pickle format \(format version 1\): loading it could run code hidden in "
               r"it\. If you trust the file .* trusted=True\) .*save it again")
    with pytest.raises(ModelFileError, match=message):
        persist.load(path)
    with pytest.raises(ModelFileError, match="old pickle format"):
        persist.loads(path.read_bytes())
    with pytest.raises(ModelFileError, match="old pickle format"):
        __import__("ngmm_formula").load(path, trusted=False)
    assert persist.read_header(path)["format_version"] == 1
    assert cli.main(["predict", str(path), "--data", "Penicillin", "--quiet"]) == 2
    assert not marker.exists()
    # the file is a real attack: with trusted=True its pickle runs (and the model is refused)
    with pytest.raises(ModelFileError, match="unexpected payload"):
        persist.load(path, trusted=True)
    assert marker.is_dir()


def test_cli_predict_refuses_v1_without_trusted(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "new.csv"
    newdata_of("lmm").to_csv(data)
    assert cli.main(["predict", str(FIXTURES / "v1_lmm.ngmm"), "--data", str(data)]) == 2
    assert "old pickle format" in capsys.readouterr().err
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", str(FIXTURES / "v1_lmm.ngmm"), "--data", str(data), "--out",
                     str(out), "--trusted", "--allow-new-levels", "--quiet"]) == 0
    assert len(pd.read_csv(out)) == len(newdata_of("lmm"))


@pytest.mark.parametrize("tag", ["os.system", "builtins.eval", "ngmm_evil_module_xyz.Boom",
                                 "ngmm_formula.results.Diagnostics", "NGMMResult"])
def test_unregistered_type_is_refused(tag: str) -> None:
    """A version-2 file naming a type outside the registry (a module path, a class of the
    package that is not a value type) is refused; nothing is imported."""

    def edit(model: dict) -> None:
        model["fields"]["diagnostics"]["$"] = tag

    data = _rewrite_v2(persist.dumps(fit_of("crossed")), edit)
    with pytest.raises(ModelFileError, match=r"cannot rebuild the saved model \(ValueError: "
                                             r"unknown value type"):
        persist.loads(data)
    assert "ngmm_evil_module_xyz" not in sys.modules


def test_unregistered_network_is_refused() -> None:
    def edit(model: dict) -> None:
        model["fields"]["nets"]["items"][0]["network"]["type"] = "torch.nn.Module"

    with pytest.raises(ModelFileError, match="unknown network type 'torch.nn.Module'"):
        persist.loads(_rewrite_v2(persist.dumps(fit_of("ngmm")), edit))


def test_object_array_in_npz_is_refused(tmp_path: Path) -> None:
    """An object array (a pickle inside the .npz) is never unpickled."""
    marker = tmp_path / "marker"
    version, header, container = _header_and_container(persist.dumps(fit_of("crossed")))
    model, npz = _split_v2(container)
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(npz)) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array([_MakeFolder(marker)], dtype=object),
                                      allow_pickle=True)
            dst.writestr(name, member.getvalue())
    data = _file(version, header, _join_v2(model, buf.getvalue()))
    with pytest.raises(ModelFileError, match="cannot rebuild the saved model"):
        persist.loads(data)
    assert not marker.exists()


def test_malformed_json_values_are_refused() -> None:
    def unknown_field(model: dict) -> None:
        model["fields"]["approximation"]["fields"]["evil"] = 1

    def bad_array(model: dict) -> None:
        model["fields"]["eta"]["key"] = "nope"

    def bad_family(model: dict) -> None:
        model["fields"]["family"]["name"] = "os"

    good_bytes = persist.dumps(fit_of("crossed"))
    for edit, message in ((unknown_field, "Approximation has no field"),
                          (bad_array, "array 'nope' is not in the file"),
                          (bad_family, "unknown family 'os'")):
        with pytest.raises(ModelFileError, match=message):
            persist.loads(_rewrite_v2(good_bytes, edit))


def test_custom_family_and_network_are_refused() -> None:
    from ngmm_formula.families import Binomial
    from ngmm_formula.networks import MLP

    class MyBinomial(Binomial):
        __slots__ = ()

    class MyNet(MLP):
        pass

    fit = fit_of("ngmm")
    with pytest.raises(ModelFileError, match=r"cannot save the model: family: the family "
                                             r"MyBinomial\(link='logit'\) is not a built-in "
                                             r"family; only the built-in families"):
        persist.dumps(dataclasses.replace(fit, family=MyBinomial()))
    net = MyNet(2, (8, 8), "relu", 0.0)
    with pytest.raises(ModelFileError, match=r"cannot save the model: nets\[0\]: a network of "
                                             r"type .*MyNet is not one of the built-in "
                                             r"networks .*only built-in networks can be saved"):
        persist.dumps(dataclasses.replace(fit, nets=(net,)))


def test_unknown_formulaic_value_is_refused() -> None:
    """save() names what it cannot store instead of storing it some other way."""
    fit = fit_of("lmm")
    spec = fit.design.spec
    odd = spec.fixed_spec.update(transform_state={"scale(Days)": {"center": Path("x")}})
    forged = dataclasses.replace(fit, design=dataclasses.replace(
        fit.design, spec=dataclasses.replace(spec, fixed_spec=odd)))
    with pytest.raises(ModelFileError, match=r"cannot save the model: design\.spec\.fixed_spec: "
                                             r"cannot store transform_state\['scale\(Days\)'\]"
                                             r"\['center'\]: a value of type pathlib\.\S*Path"):
        persist.dumps(forged)


SPEC_FORMULAS = [
    "scale(x) + poly(z, 2) + C(f, contr.sum) + C(h, contr.treatment('q')) + x:f + I(x**2)",
    "f * h + center(z) + C(f, contr.helmert) + C(k) + poly(x, 3)",
    "0 + f:z + C(f, contr.diff) + C(h, contr.poly) + I(z - x) + np.log(x ** 2)",
]


@pytest.mark.parametrize("formula", SPEC_FORMULAS)
def test_model_spec_round_trip(formula: str) -> None:
    """formulaic's ModelSpec through JSON: new data give exactly the same matrix."""
    from formulaic import Formula

    from ngmm_formula.design import spec_from_data, spec_to_data

    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n),
                       "f": rng.choice(list("abc"), n), "k": rng.integers(0, 3, n),
                       "h": pd.Categorical(rng.choice(list("pq"), n))})
    spec = Formula(formula).get_model_matrix(df, ensure_full_rank=True).model_spec
    back = spec_from_data(json.loads(json.dumps(spec_to_data(spec), allow_nan=False)))
    new = df.sample(12, random_state=1).assign(x=lambda d: d.x * 3.0)
    a, b = spec.get_model_matrix(new), back.get_model_matrix(new)
    assert list(a.columns) == list(b.columns)
    _same(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    assert back.transform_state == spec.transform_state
    assert back.encoder_state == spec.encoder_state
    assert back.structure == spec.structure and str(back.formula) == str(spec.formula)


def test_stateful_fixed_part_round_trip(tmp_path: Path) -> None:
    """A model whose fixed part uses poly(), C() with sum contrasts and I() predicts new
    data identically after a round trip."""
    data = simulate_grouped(12, 6, "gaussian", seed=4)
    data["f"] = np.array(list("abc"))[np.arange(len(data)) % 3]
    fit = ngmm("y ~ poly(x1, 2) + C(f, contr.sum) + I(x2 ** 2) + x3:f + (1 | g)", data)
    back = persist.load(persist.save(fit, tmp_path / "m.ngmm"))
    new = data.iloc[::7].assign(x1=lambda d: d.x1 + 0.5)
    _same(back.predict(new), fit.predict(new))


# ------------------------------------------------------------------------------------------
# the committed version-1 files (tests/fixtures/make_v1_fixtures.py)


def _fixture_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_v1_fixtures",
                                                  FIXTURES / "make_v1_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["lmm", "ngmm"])
def test_v1_fixture_loads_with_trusted(kind: str, tmp_path: Path) -> None:
    """The committed predictions were computed where the fixtures were written: the linear
    model's (float64, sums in a fixed order) reproduce bit for bit on any machine; the neural
    model's float32 network rounds its matrix products differently on CPUs with other vector
    units (a few float32 ulps per layer; 1.5e-8 measured on another machine), so there within
    1e-6 relative (persist.CONSISTENT_TOL), far below what a wrongly rebuilt model gives."""
    rel = persist.CONSISTENT_TOL[torch.float32] if kind == "ngmm" else 0.0
    path = FIXTURES / f"v1_{kind}.ngmm"
    assert persist.read_header(path)["format_version"] == 1
    with pytest.raises(ModelFileError, match="old pickle format"):
        persist.load(path)
    fit = persist.load(path, trusted=True)
    make = _fixture_module()
    with np.load(FIXTURES / "v1_predictions.npz", allow_pickle=False) as stored:
        expected = {k: stored[k] for k in stored.files if k.startswith(f"{kind}_")}
    got = make.predictions(fit, kind)
    assert sorted(got) == sorted(expected)
    for key in expected:
        _same(got[key], expected[key], rel)
    # converting: save again (version 2) and load without trusted
    again = persist.load(persist.save(fit, tmp_path / "converted.ngmm"))
    assert persist.read_header(tmp_path / "converted.ngmm")["format_version"] == 2
    for key, values in make.predictions(again, kind).items():
        _same(values, expected[key], rel)
    assert str(again.summary()) == str(fit.summary())


def test_spec_evaluating_other_code_is_refused(tmp_path: Path) -> None:
    """Predicting evaluates the specs' factor expressions: a file whose spec holds an
    expression that its formula does not have, or whose header shows another formula, is
    refused at load, before anything is evaluated."""
    marker = tmp_path / "marker"
    evil = f"__import__('os').mkdir({str(marker)!r})"

    def fixed_spec(model: dict) -> dict:
        return model["fields"]["design"]["fields"]["spec"]["fields"]["fixed_spec"]["data"]

    def term(model: dict) -> None:
        data = fixed_spec(model)
        data["terms"][1]["factors"][0].update(expr=evil, eval_method="python")
        data["formula"] = f"1 + {evil}"

    def scoped(model: dict) -> None:
        factor = fixed_spec(model)["structure"][1]["scoped_terms"][0]["factors"][0]["factor"]
        factor.update(expr=evil, eval_method="python")

    good_bytes = persist.dumps(fit_of("lmm"))
    for edit, message in ((term, "its terms .* are not those of 'Days'"),
                          (scoped, "it evaluates .*mkdir.* which is not a factor of 'Days'")):
        with pytest.raises(ModelFileError, match=f"the model file is inconsistent: {message}"):
            persist.loads(_rewrite_v2(good_bytes, edit))
    version, header, container = _header_and_container(good_bytes)
    forged = _file(version, dict(header, formula="Reaction ~ 1 + (1 | Subject)"), container)
    with pytest.raises(ModelFileError, match="its header shows the formula"):
        persist.loads(forged)
    assert not marker.exists()


def test_ensemble_round_trip(tmp_path: Path) -> None:
    """An ensemble of networks (and its members' training histories) round-trips."""
    data = simulate_grouped(12, 8, "binomial", seed=2)
    fit = ngmm("y ~ nn(x1, x2, hidden=(4,), activation='tanh') + (1 | g)", data, "binomial",
               control=Control(epochs=2, ensemble=2, progress=False), seed=0)
    back = persist.load(persist.save(fit, tmp_path / "e.ngmm"))
    assert type(back.nets[0]).__name__ == "Ensemble" and len(back.nets[0].members) == 2
    assert back.history == fit.history and len(back.history.members) == 2
    new = data.iloc[::5]
    _same(back.predict(new), fit.predict(new))
    _same(back.predict(new, re_form="~0", type="link"), fit.predict(new, re_form="~0",
                                                                    type="link"))
