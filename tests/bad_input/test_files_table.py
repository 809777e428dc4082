"""Bad-input table, model files: ``save``, ``load`` and ``ngmm predict`` on files that are not
what they should be (see ``harness.py``). The DataFrame of each row is the data a user would
predict; it must come back unchanged."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ngmm_formula import NGMMError, load
from ngmm_formula.persist import ModelFileError, save
from tests.bad_input.harness import Case, params, run
from tests.bad_input.test_data_table import CLIFailed, cli, fitted, frame, saved_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="ngmm_files_"))


def _written(data: bytes) -> str:
    path = _folder() / "model.ngmm"
    path.write_bytes(data)
    return str(path)


def _truncated() -> str:
    return _written(Path(saved_model()).read_bytes()[:-100])


def _flipped() -> str:
    data = bytearray(Path(saved_model()).read_bytes())
    data[-50] ^= 0xFF
    return _written(bytes(data))


CASES: list[Case] = [
    Case("load-missing-file", frame, lambda df: load(_folder() / "none.ngmm"),
         raises=ModelFileError, names=("none.ngmm", "does not exist")),
    Case("load-a-folder", frame, lambda df: load(_folder()), raises=ModelFileError,
         names=("folder",)),
    Case("load-a-csv", frame, lambda df: load(_written(b"y,x\n1,2\n")),
         raises=ModelFileError, names=("not an ngmm model file",)),
    Case("load-empty", frame, lambda df: load(_written(b"")), raises=ModelFileError,
         names=("empty",)),
    Case("load-truncated", frame, lambda df: load(_truncated()), raises=ModelFileError,
         names=("truncated",)),
    Case("load-corrupted", frame, lambda df: load(_flipped()), raises=ModelFileError,
         names=("corrupted",)),
    Case("load-v1-untrusted", frame, lambda df: load(FIXTURES / "v1_lmm.ngmm"),
         raises=ModelFileError, names=("old pickle format", "trusted=True")),
    Case("save-missing-folder", frame,
         lambda df: save(fitted(), _folder() / "no" / "m.ngmm"), raises=ModelFileError,
         names=("does not exist",)),
    Case("save-not-a-fit", frame, lambda df: save(df, _folder() / "m.ngmm"),  # type: ignore[arg-type]
         raises=ModelFileError, names=("NGMMResult", "DataFrame")),
    Case("cli-predict-v1-untrusted", frame,
         lambda df: cli(["predict", str(FIXTURES / "v1_lmm.ngmm")], df), raises=CLIFailed,
         names=("old pickle format", "--trusted")),
    Case("cli-predict-not-a-model", frame,
         lambda df: cli(["predict", _written(b"hello")], df), raises=CLIFailed,
         names=("not an ngmm model file",)),
    Case("fit-save-missing-folder", frame,
         lambda df: fitted().save(_folder() / "no" / "m.ngmm"), raises=NGMMError,
         names=("does not exist",)),
]


@params(CASES)
def test_files_table(case: Case) -> None:
    run(case)
