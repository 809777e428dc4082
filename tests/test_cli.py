"""Tests of the command line :mod:`ngmm_formula.cli`.

End to end in subprocesses (``python -m ngmm_formula.cli``; the independent ones run
concurrently, each pays the torch import): a fit on a bundled data set, fit -> ``--save`` ->
``predict`` on CSV files in ``tmp_path`` (predictions identical to the saved model's, row for
row), and the error paths (exit status 2, a one-line ``ngmm: error:`` message, no traceback).
The console script ``ngmm`` is run too when it is installed. Option parsing, help texts, the
other ``predict`` options, ``compare`` and the handling of warnings and internal errors are
tested in-process through :func:`ngmm_formula.cli.main`.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import cli, persist
from ngmm_formula.api import ngmm
from ngmm_formula.datasets import load, simulate_grouped
from ngmm_formula.errors import NGMMError, SingularFitWarning

ROOT = Path(__file__).resolve().parents[1]
NN_FORMULA = "y ~ nn(x1, x2, hidden=(4,)) + x3 + (1 | g)"
TIMEOUT = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Run:
    """A finished command: exit status, standard output and error."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.stdout, self.stderr = proc.communicate(timeout=TIMEOUT)
        self.returncode = proc.returncode

    def __repr__(self) -> str:
        return f"<Run {self.returncode}\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}>"


def _start(args: list[str], cwd: Path, program: list[str] | None = None
           ) -> subprocess.Popen[str]:
    cmd = (program or [sys.executable, "-m", "ngmm_formula.cli"]) + args
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _new_rows() -> pd.DataFrame:
    """Rows to predict: no response column, known groups and one new group."""
    nd = simulate_grouped(3, 4, "binomial", seed=99)[["x1", "x2", "x3", "g"]]
    nd["g"] = nd["g"].astype(str)
    nd.loc[nd.index[-2:], "g"] = "new_group"
    return nd


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run | Path]:
    """Start every independent subprocess at once; then ``predict`` with the saved model."""
    tmp = tmp_path_factory.mktemp("cli")
    simulate_grouped(30, 10, "binomial", seed=1).to_csv(tmp / "train.csv", index=False)
    _new_rows().to_csv(tmp / "new.csv", index=False)
    jobs = {
        # glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
        "dataset": ["fit", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                    "--data", "cbpp", "--family", "binomial"],
        "save": ["fit", NN_FORMULA, "--data", "train.csv", "--family", "binomial",
                 "--epochs", "3", "--seed", "1", "--quiet", "--save", "model.ngmm"],
        "bad_family": ["fit", "y ~ x3 + (1 | g)", "--data", "train.csv", "--family",
                       "binomal"],
        "missing_file": ["fit", "y ~ x3 + (1 | g)", "--data", "nowhere.csv"],
        "bad_formula": ["fit", "y ~ x3 + (1 | g", "--data", "train.csv"],
        "bad_model": ["predict", "train.csv", "--data", "new.csv", "--out", "pred.csv"],
    }
    procs = {name: _start(args, tmp) for name, args in jobs.items()}
    script = shutil.which("ngmm")
    if script is not None:
        procs["script"] = _start(["--help"], tmp, program=[script])
    out: dict[str, Run | Path] = {name: Run(p) for name, p in procs.items()}
    out["predict"] = Run(_start(["predict", "model.ngmm", "--data", "new.csv", "--out",
                                 "pred.csv", "--allow-new-levels"], tmp))
    out["folder"] = tmp
    return out


def _run(runs: dict[str, Run | Path], name: str) -> Run:
    r = runs[name]
    assert isinstance(r, Run)
    return r


def _folder(runs: dict[str, Run | Path]) -> Path:
    f = runs["folder"]
    assert isinstance(f, Path)
    return f


def _read_predictions(source: Path | io.StringIO) -> pd.DataFrame:
    """The predictions, each parsed by Python's float() (exact for the shortest repr that
    pandas writes, whatever pandas' own float parser does)."""
    table = pd.read_csv(source, index_col=0, dtype={"prediction": str})
    table["prediction"] = np.array([float(v) for v in table["prediction"]])
    return table


# ------------------------------------------------------------------------------------------
# end to end


def test_fit_bundled_dataset(runs: dict[str, Run | Path]) -> None:
    r = _run(runs, "dataset")
    assert r.returncode == 0, r
    assert "Generalized linear mixed model fit by maximum likelihood" in r.stdout
    assert "Formula: cbind(incidence, size - incidence) ~ period + (1 | herd)" in r.stdout
    assert "Data: cbpp" in r.stdout and "period4" in r.stdout
    assert "Traceback" not in r.stderr


def test_fit_save_predict_round_trip(runs: dict[str, Run | Path]) -> None:
    tmp = _folder(runs)
    fit_run, pred_run = _run(runs, "save"), _run(runs, "predict")
    assert fit_run.returncode == 0, fit_run
    assert fit_run.stderr == ""  # --quiet: no progress bar, warnings or notes
    model = persist.load(tmp / "model.ngmm")
    # the summary printed is the saved model's
    assert fit_run.stdout.rstrip("\n") == str(model.summary()).rstrip("\n")
    assert "Data: train.csv" in fit_run.stdout and "Neural terms" in fit_run.stdout
    assert pred_run.returncode == 0, pred_run
    assert pred_run.stderr.strip() == f"ngmm: wrote 12 predictions to {Path('pred.csv')}"
    pred = _read_predictions(tmp / "pred.csv")
    new = pd.read_csv(tmp / "new.csv")
    assert list(pred.columns) == ["prediction"] and pred.index.name == "row"
    assert list(pred.index) == list(new.index) == list(range(12))
    # bit for bit: the CSV holds the shortest repr of each float
    expected = model.predict(new, allow_new_levels=True)
    assert pred["prediction"].to_numpy().tobytes() == expected.tobytes()
    assert np.all((expected > 0) & (expected < 1))


@pytest.mark.parametrize(("name", "message"), [
    ("bad_family", "ngmm: error: unknown family 'binomal'; available: gaussian, binomial"),
    ("missing_file", "ngmm: error: data file 'nowhere.csv' does not exist"),
    ("bad_formula", "ngmm: error: unbalanced '(' in formula"),
    ("bad_model", "ngmm: error: train.csv: not an ngmm model file"),
])
def test_error_paths(runs: dict[str, Run | Path], name: str, message: str) -> None:
    r = _run(runs, name)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.rstrip("\n").splitlines()
    assert lines[0].startswith(message), r
    # one line; a formula error adds the formula and a caret under the offending position
    if name == "bad_formula":
        assert lines[1:] == ["  y ~ x3 + (1 | g", "  " + " " * 9 + "^"]
    else:
        assert len(lines) == 1


def test_console_script(runs: dict[str, Run | Path]) -> None:
    if "script" not in runs:
        pytest.skip("the console script 'ngmm' is not installed (pip install -e .)")
    r = _run(runs, "script")
    assert r.returncode == 0, r
    assert "examples" in r.stdout and "ngmm fit" in r.stdout


# ------------------------------------------------------------------------------------------
# in-process: parsing, help, options


@pytest.mark.parametrize(("command", "example"), [
    ("fit", 'ngmm fit "Reaction ~ Days + (Days | Subject)" --data sleepstudy'),
    ("predict", "ngmm predict contra.ngmm --data new_women.csv --out pred.csv"),
    ("compare", 'ngmm compare "cbind(incidence, size - incidence) ~ period + (1 | herd)"'),
])
def test_help_has_examples(capsys: pytest.CaptureFixture[str], command: str,
                           example: str) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ngmm {command}") and "examples:" in out and example in out
    assert cli.main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    ([], "the following arguments are required: COMMAND"),
    (["fitt"], "argument COMMAND: invalid choice: 'fitt'"),
    (["fit", "y ~ x + (1 | g)"], "the following arguments are required: --data"),
    (["fit", "y ~ (1 | g)", "--data", "cbpp", "--approx", "exact"],
     "argument --approx: invalid choice: 'exact'"),
    (["fit", "y ~ (1 | g)", "--data", "cbpp", "--nagq", "0"],
     "argument --nagq: expected a number >= 1, got 0"),
    (["fit", "y ~ (1 | g)", "--data", "cbpp", "--reml", "maybe"],
     "argument --reml: expected true or false, got 'maybe'"),
    (["predict", "m.ngmm", "--data", "x.csv", "--type", "prob"],
     "argument --type: invalid choice: 'prob'"),
])
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                      message: str) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ngmm: error: {message}"), captured.err
    assert "--help" in lines[0]


@pytest.fixture(scope="module")
def sleep_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved sleepstudy LMM and a CSV of new rows (a new subject, an index of labels)."""
    tmp = tmp_path_factory.mktemp("sleep")
    model = persist.save(ngmm("Reaction ~ Days + (Days | Subject)", load("sleepstudy")),
                         tmp / "sleep.ngmm")
    new = pd.DataFrame({"Days": [0.0, 4.5, 9.0], "Subject": ["308", "999", "372"]})
    new.to_csv(tmp / "new.csv", index=False)
    return model, tmp / "new.csv"


def test_predict_options(capsys: pytest.CaptureFixture[str], sleep_model: tuple[Path, Path],
                         tmp_path: Path) -> None:
    model, new_csv = sleep_model
    fit, new = persist.load(model), pd.read_csv(new_csv)
    # to standard output, population level, link scale
    assert cli.main(["predict", str(model), "--data", str(new_csv), "--re-form", "~0",
                     "--type", "link"]) == 0
    out = _read_predictions(io.StringIO(capsys.readouterr().out))
    assert out["prediction"].to_numpy().tobytes() == \
        fit.predict(new, type="link", re_form="~0").tobytes()
    # Parquet in and out keeps the input's index labels
    new.index = pd.Index([10, 20, 30], name="id")
    new.to_parquet(tmp_path / "new.parquet")
    assert cli.main(["predict", str(model), "--data", str(tmp_path / "new.parquet"), "--out",
                     str(tmp_path / "p.parquet"), "--quiet", "--allow-new-levels"]) == 0
    assert capsys.readouterr().err == ""
    got = pd.read_parquet(tmp_path / "p.parquet")
    assert list(got.index) == [10, 20, 30] and got.index.name == "id"
    assert got["prediction"].to_numpy().tobytes() == \
        fit.predict(new, allow_new_levels=True).tobytes()


@pytest.mark.parametrize(("extra", "message"), [
    ([], "grouping factor 'Subject' has 1 level(s) not in the training data: '999'; use "
         "--allow-new-levels"),
    (["--no-new-levels"], "grouping factor 'Subject' has 1 level(s) not in the training data"),
    (["--re-form", "/home/me"], "--re-form must be \"~0\""),
    (["--out", "no/such/folder/p.csv"], "cannot write 'no/such/folder/p.csv': the folder"),
])
def test_predict_errors(capsys: pytest.CaptureFixture[str], sleep_model: tuple[Path, Path],
                        extra: list[str], message: str) -> None:
    model, new_csv = sleep_model
    assert cli.main(["predict", str(model), "--data", str(new_csv), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ngmm: error: {message}"), err


def test_damaged_model_file(capsys: pytest.CaptureFixture[str], sleep_model: tuple[Path, Path],
                            tmp_path: Path) -> None:
    model, new_csv = sleep_model
    cut = tmp_path / "cut.ngmm"
    cut.write_bytes(model.read_bytes()[:-10])
    assert cli.main(["predict", str(cut), "--data", str(new_csv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model file is truncated" in err


def test_read_data(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.5, 2.0], "b": ["x", "y"]})
    frame.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    with gzip.open(tmp_path / "d.csv.gz", "wt") as fh:
        frame.to_csv(fh, index=False)
    for name in ("d.tsv", "d.csv.gz"):
        got = cli.read_data(str(tmp_path / name))
        pd.testing.assert_frame_equal(got, frame, check_dtype=False)
        assert got.attrs["name"] == name
    assert cli.read_data("sleepstudy").attrs["name"] == "sleepstudy"
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00\x81garbage\n\x00\x00")
    for spec, message in [(str(tmp_path), "is a folder"),
                          (str(tmp_path / "no.parquet"), "does not exist"),
                          ("no_such_dataset", "unknown data set 'no_such_dataset'"),
                          (str(tmp_path / "bad.csv"), "cannot read the data file")]:
        with pytest.raises(NGMMError, match=message):
            cli.read_data(spec)


# ------------------------------------------------------------------------------------------
# in-process: compare, warnings, internal errors


def test_compare(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", "Reaction ~ Days + (1 | Subject)", "--data", "sleepstudy", "--quiet"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    if importlib.util.find_spec("ngmm_formula.compare") is None:
        assert code == 2
        assert captured.err == "ngmm: error: the comparison module is not available\n"
    else:
        assert code == 0, captured.err
        assert "Reaction ~ Days + (1 | Subject)" in captured.out
        assert "statsmodels" in captured.out


def test_compare_module_missing(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ngmm_formula.compare", None)  # import fails
    assert cli.main(["compare", "y ~ x + (1 | g)", "--data", "cbpp"]) == 2
    assert capsys.readouterr().err == "ngmm: error: the comparison module is not available\n"


def test_warnings_are_one_line(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(args: object) -> int:
        warnings.warn("boundary (singular) fit:\n  see help('isSingular')", SingularFitWarning,
                      stacklevel=1)
        warnings.warn("torch internals", UserWarning, stacklevel=1)
        print("summary")
        return 0

    monkeypatch.setattr(cli, "_run_fit", handler)
    assert cli.main(["fit", "y ~ (1 | g)", "--data", "cbpp"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "summary\n"
    assert captured.err == ("ngmm: warning: boundary (singular) fit: see "
                            "help('isSingular')\n")
    assert cli.main(["fit", "y ~ (1 | g)", "--data", "cbpp", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_internal_error(capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(args: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_run_fit", handler)
    assert cli.main(["fit", "y ~ (1 | g)", "--data", "cbpp"]) == 1
    err = capsys.readouterr().err
    assert err == ("ngmm: internal error: RuntimeError: boom (rerun with --traceback and "
                   "report it)\n")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["fit", "y ~ (1 | g)", "--data", "cbpp", "--traceback"])


def test_entry_point_declared() -> None:
    """pyproject's console script resolves to :func:`cli.main` (which returns the status)."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["ngmm"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main
