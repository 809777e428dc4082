"""The data reader (:mod:`ngmm_formula.io`) and fits from Parquet files and pyarrow Datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import DataError, NGMMError, ngmm
from ngmm_formula.design import required_columns
from ngmm_formula.formula import parse_formula
from ngmm_formula.io import read_data
from tests.references import REFS, dataset

pa = pytest.importorskip("pyarrow")
pads = pytest.importorskip("pyarrow.dataset")
pq = pytest.importorskip("pyarrow.parquet")

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """cbpp with 30 unused extra columns, as a Parquet file written in 4 row groups."""
    df = dataset("cbpp").copy()
    rng = np.random.default_rng(0)
    for k in range(30):
        df[f"junk{k}"] = rng.normal(size=len(df))
    path = tmp_path_factory.mktemp("pq") / "cbpp_wide.parquet"
    df.to_parquet(path, row_group_size=16)
    return df, path


def test_required_columns_table() -> None:
    cases = {
        "y ~ x + (1 | g)": ["y", "x", "g"],
        "cbind(s, n - s) ~ a * b + offset(log(t)) + (1 + a | g/h)": ["s", "n", "a", "b", "t",
                                                                      "g", "h"],
        "y ~ nn(x1, x2) + x3 + (1 | g)": ["y", "x3", "g", "x1", "x2"],
    }
    for formula, cols in cases.items():
        assert sorted(required_columns(parse_formula(formula))) == sorted(cols), formula


def test_parquet_reads_only_the_needed_columns(wide: tuple[pd.DataFrame, Path]) -> None:
    df, path = wide
    cols = ["incidence", "size", "period", "herd"]
    got = read_data(path, cols)
    assert list(got.columns) == cols  # the 30 junk columns are never read
    assert got.attrs["name"] == "cbpp_wide.parquet"
    pd.testing.assert_frame_equal(got, df[cols], check_dtype=False, check_categorical=False)
    # the same through a pyarrow Dataset, a Table, and a folder of Parquet files
    folder = path.parent / "parts"
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df.iloc[:30]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(df.iloc[30:]), folder / "b.parquet")
    for source in (pads.dataset(path), pa.Table.from_pandas(df), folder):
        other = read_data(source, cols)
        assert list(other.columns) == cols
        np.testing.assert_array_equal(other["incidence"], df["incidence"])
        assert (other["herd"].astype(str).to_numpy() == df["herd"].astype(str).to_numpy()).all()


def test_csv_usecols_and_dataframe_passthrough(tmp_path: Path) -> None:
    df = dataset("cbpp")
    df.to_csv(tmp_path / "cbpp.csv", index=False)
    got = read_data(tmp_path / "cbpp.csv", ["herd", "size"])
    assert list(got.columns) == ["herd", "size"]
    assert read_data(df, ["herd"]) is df  # never copied


def test_missing_columns_and_bad_sources(wide: tuple[pd.DataFrame, Path], tmp_path: Path
                                         ) -> None:
    df, path = wide
    with pytest.raises(DataError, match=r"data \('.*cbpp_wide.parquet'\) is missing the "
                                        r"column\(s\) \['nope'\]"):
        read_data(path, ["herd", "nope"])
    with pytest.raises(DataError, match=r"missing the column\(s\) \['nope'\]"):
        read_data(pads.dataset(path), ["nope"])
    with pytest.raises(DataError, match=r"missing the column\(s\) \['nope'\]"):
        read_data(df, ["nope"])
    df.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"d.csv'\) is missing the column\(s\) \['zz'\]"):
        read_data(tmp_path / "d.csv", ["herd", "zz"])
    with pytest.raises(NGMMError, match="does not exist"):
        read_data(tmp_path / "none.parquet")
    with pytest.raises(NGMMError, match="does not exist"):
        read_data("cbpp")  # names of bundled data sets only with allow_names (the CLI)
    with pytest.raises(DataError, match="data must be a pandas DataFrame, a path"):
        read_data([1, 2, 3])
    # ngmm names the missing column of a file before reading anything
    with pytest.raises(DataError, match=r"missing the column\(s\) \['x9'\]"):
        ngmm("cbind(incidence, size - incidence) ~ x9 + (1 | herd)", path, "binomial")


def test_fit_from_parquet_equals_fit_from_frame(wide: tuple[pd.DataFrame, Path]) -> None:
    df, path = wide
    ref = REFS["cbpp_logit_laplace"]
    from_frame = ngmm(CBPP, df, "binomial", approx="laplace")
    for source in (path, str(path), pads.dataset(path)):
        fit = ngmm(CBPP, source, "binomial", approx="laplace")
        # the same rows and columns: the same fit (up to L-BFGS-B's last bits, which vary
        # with memory alignment; measured: equal). Should they differ, both stop at
        # max|gradient| < 1e-6: log L is flat there (Var x g^2 ~1e-13, so 1e-12 relative
        # holds), the fixed effects move by Var x g <= 0.18 x 1e-6 on coefficients of size
        # >= 0.99 (2e-7 relative), so 1e-6 (was 1e-7)
        assert fit.loglik == pytest.approx(from_frame.loglik, rel=1e-12)
        np.testing.assert_allclose(fit.fixef, from_frame.fixef, rtol=1e-6)
        # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
        assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-3)
    assert ngmm(CBPP, path, "binomial", approx="laplace").data_name == "cbpp_wide.parquet"


def test_cli_fit_reads_only_the_model_columns(wide: tuple[pd.DataFrame, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from ngmm_formula import cli

    _, path = wide
    got = cli._read_model_columns(str(path), CBPP)
    assert sorted(got.columns) == ["herd", "incidence", "period", "size"]
    assert cli.main(["fit", CBPP, "--data", str(path), "--family", "binomial", "--approx",
                     "laplace", "--quiet"]) == 0
    out = capsys.readouterr().out
    # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
    assert "-92.0" in out and "cbpp_wide.parquet" in out
