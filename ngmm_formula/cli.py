"""Command line: ``ngmm fit``, ``ngmm predict`` and ``ngmm compare``.

* ``ngmm fit FORMULA --data FILE|DATASET --family FAMILY [...] [--save model.ngmm]`` fits the
  formula to a CSV/Parquet file (or a bundled data set by name, see
  ``ngmm_formula.datasets.available()``), prints the lme4-style summary and optionally saves
  the model (:mod:`ngmm_formula.persist`);
* ``ngmm predict model.ngmm --data new.csv --out pred.csv [--type link] [--re-form "~0"]
  [--allow-new-levels]``
  writes one column ``prediction``, indexed as the input rows;
* ``ngmm compare FORMULA [FORMULA ...] --data ... --family ...`` fits each formula and prints
  the comparison with the linear GLMM that statsmodels fits (:mod:`ngmm_formula.compare`).

The summary and tables go to standard output; progress bars, the package's warnings
(``ngmm: warning: ...``) and notes go to standard error (``--quiet`` silences them).
Exit status: 0 on success, 2 with a one-line ``ngmm: error: ...`` message for bad arguments,
data or model files (a formula error adds the formula with a caret under the offending
position), 1 for an internal error (``--traceback`` shows the Python traceback), 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ngmm_formula.errors import FormulaError, NewLevelsError, NGMMError, NGMMWarning

if TYPE_CHECKING:  # pandas, torch and the engine are imported by the subcommands only, so
    import pandas as pd  # that the argument parsing and --help start in a fraction of a second

__all__ = ["build_parser", "main", "read_data"]

FIT_EXAMPLES = """examples:
  ngmm fit "cbind(incidence, size - incidence) ~ period + (1 | herd)" --data cbpp --family binomial
  ngmm fit "Reaction ~ Days + (Days | Subject)" --data sleepstudy --reml false
  ngmm fit "y ~ x + (1 | g)" --data mydata.csv --family poisson --approx agq --nagq 10
  ngmm fit "use ~ nn(age, livch) + urban + (1 | district)" --data Contraception \\
      --family binomial --epochs 50 --seed 1 --save contra.ngmm
"""

PREDICT_EXAMPLES = """examples:
  ngmm predict contra.ngmm --data new_women.csv --out pred.csv
  ngmm predict contra.ngmm --data new_women.parquet --out pred.csv --type link
  ngmm predict contra.ngmm --data new_women.csv --re-form "~0"     # to standard output

The output has one column, prediction, indexed as the rows of --data (a column "row" for a
CSV input: 0, 1, 2, ...). A grouping level not in the training data is an error (as lme4's
allow.new.levels = FALSE) unless --allow-new-levels gives it a zero random effect.
Quote "~0": unquoted, the shell expands ~0 to the current folder.
"""

COMPARE_EXAMPLES = """examples:
  ngmm compare "cbind(incidence, size - incidence) ~ period + (1 | herd)" --data cbpp \\
      --family binomial
  ngmm compare "use ~ age + urban + (1 | district)" \\
      "use ~ nn(age, livch) + urban + (1 | district)" --data Contraception --family binomial \\
      --newdata heldout.csv
"""

EXAMPLES = """examples (see 'ngmm COMMAND --help' for more):
  ngmm fit "Reaction ~ Days + (Days | Subject)" --data sleepstudy --save sleep.ngmm
  ngmm predict sleep.ngmm --data new_subjects.csv --out pred.csv --allow-new-levels
  ngmm compare "cbind(incidence, size - incidence) ~ period + (1 | herd)" --data cbpp \\
      --family binomial
"""

_POPULATION = {"~0": "~0", "~ 0": "~0", "0": "~0", "NA": "~0", "na": "~0"}


class _Parser(argparse.ArgumentParser):
    """argparse with the package's one-line error message (``ngmm: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ngmm: error: {message} (see '{self.prog} --help')\n")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "t", "yes", "1"):
        return True
    if value in ("false", "f", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar, warnings or notes on standard error")
    common.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of an internal error (for bug reports)")
    return common


def _model_options() -> _Parser:
    opts = _Parser(add_help=False)
    opts.add_argument("--data", required=True, metavar="FILE|DATASET",
                      help="CSV (.csv, .csv.gz, .tsv) or Parquet file, or the name of a "
                           "bundled data set (cbpp, sleepstudy, Contraception, ...)")
    opts.add_argument("--family", default="gaussian",
                      help="gaussian (default), binomial, poisson, negative_binomial or gamma")
    opts.add_argument("--link", default=None, help="link function (default: canonical)")
    opts.add_argument("--approx", default="auto",
                      choices=["auto", "laplace", "agq", "truncated", "variational"],
                      help="how the random effects are integrated out (default: auto)")
    opts.add_argument("--nagq", type=_positive_int, default=None, metavar="N",
                      help="Gauss-Hermite nodes per dimension for --approx agq (lme4's nAGQ)")
    opts.add_argument("--truncation", type=float, default=None, metavar="M",
                      help="half-width M of the truncated rule (--approx truncated)")
    opts.add_argument("--points", type=_positive_int, default=None, metavar="K",
                      help="points per axis K of the truncated rule")
    opts.add_argument("--reml", type=_bool, default=None, metavar="true|false",
                      help="REML for linear Gaussian models (default true there, as lmer)")
    opts.add_argument("--seed", type=int, default=0, metavar="N",
                      help="random seed of the fit (default 0)")
    opts.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                      help="maximum training epochs of models with nn() terms")
    return opts


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="ngmm", description="Fit (neural) generalized linear mixed models with lme4 "
        "formulas, save them, predict with them.", epilog=EXAMPLES, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, model = _common_options(), _model_options()

    fit = sub.add_parser("fit", parents=[model, common], epilog=FIT_EXAMPLES,
                         formatter_class=raw, help="fit a formula and print the summary",
                         description="Fit a formula and print the lme4-style summary.")
    fit.add_argument("formula", help="lme4 formula, quoted")
    fit.add_argument("--save", default=None, metavar="MODEL",
                     help="also save the fitted model to this file (e.g. model.ngmm)")
    fit.set_defaults(handler=_run_fit)

    pred = sub.add_parser("predict", parents=[common], epilog=PREDICT_EXAMPLES,
                          formatter_class=raw, help="predict new data with a saved model",
                          description="Predict new data with a model saved by 'ngmm fit "
                          "--save'. Loading a model file never runs code from it; model files "
                          "of the old pickle format (version 1) need --trusted.")
    pred.add_argument("model", help="model file written by 'ngmm fit --save'")
    pred.add_argument("--data", required=True, metavar="FILE|DATASET",
                      help="CSV or Parquet file (or bundled data set) with the model's columns")
    pred.add_argument("--out", default="-", metavar="FILE",
                      help="output CSV (or .parquet) file; '-' or omitted: standard output")
    pred.add_argument("--type", default="response", choices=["response", "link"],
                      help="scale of the predictions (default: response)")
    pred.add_argument("--re-form", default=None, dest="re_form", metavar='"~0"',
                      help='"~0": population-level prediction (random effects set to zero); '
                           "default: include every random effect")
    levels = pred.add_mutually_exclusive_group()
    levels.add_argument("--allow-new-levels", action="store_true",
                        help="grouping levels not in the training data get a zero random "
                             "effect (default: they are an error, as lme4)")
    levels.add_argument("--no-new-levels", action="store_true",
                        help="a grouping level not in the training data is an error (the "
                             "default)")
    pred.add_argument("--trusted", action="store_true",
                      help="also read a model file of the old pickle format (version 1), "
                           "which can run code when loaded: only for files you wrote "
                           "yourself")
    pred.set_defaults(handler=_run_predict)

    cmp_ = sub.add_parser("compare", parents=[model, common], epilog=COMPARE_EXAMPLES,
                          formatter_class=raw,
                          help="fit formulas and compare them with statsmodels' GLMM",
                          description="Fit each formula and print the comparison table with "
                          "the linear GLMM that statsmodels fits.")
    cmp_.add_argument("formula", nargs="+", help="lme4 formula(s), quoted")
    cmp_.add_argument("--newdata", default=None, metavar="FILE|DATASET",
                      help="held-out data to compare predictions on")
    cmp_.set_defaults(handler=_run_compare)
    return parser


# --------------------------------------------------------------------------------------------
# helpers


def read_data(spec: str) -> pd.DataFrame:
    """A data frame from a CSV/TSV/Parquet file or a bundled data set's name
    (:func:`ngmm_formula.io.read_data`, the reader :func:`~ngmm_formula.ngmm` uses too)."""
    from ngmm_formula.io import read_data as _read

    return _read(spec, allow_names=True)


def _read_model_columns(spec: str, formula: str) -> pd.DataFrame:
    """Only the columns ``formula`` uses (a wide Parquet file costs the memory of those)."""
    from ngmm_formula.design import required_columns
    from ngmm_formula.formula import parse_formula
    from ngmm_formula.io import read_data as _read

    return _read(spec, required_columns(parse_formula(formula)), allow_names=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"ngmm: {message}", file=sys.stderr)


@contextmanager
def _warnings_to_stderr(quiet: bool) -> Iterator[None]:
    """The package's warnings as one line each, ``ngmm: warning: ...``; other libraries'
    warnings (torch, pandas internals) are not shown -- the summary lists the fit's own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not quiet:
            warnings.simplefilter("default", NGMMWarning)

            def show(message: Warning | str, category: type[Warning], filename: str,
                     lineno: int, file: Any = None, line: str | None = None) -> None:
                text = " ".join(str(message).split())
                print(f"ngmm: warning: {text}", file=sys.stderr)

            warnings.showwarning = show
        yield


def _fit(args: argparse.Namespace, formula: str, data: pd.DataFrame) -> Any:
    from ngmm_formula.api import ngmm
    from ngmm_formula.families import get_family
    from ngmm_formula.fit import Control

    family = get_family(args.family, args.link)
    options: dict[str, Any] = {"progress": False} if args.quiet else {}
    if args.epochs is not None:
        options["epochs"] = args.epochs
    return ngmm(formula, data, family, approx=args.approx, nagq=args.nagq,
                truncation=args.truncation, points=args.points, reml=args.reml,
                control=Control(**options), seed=args.seed)


# --------------------------------------------------------------------------------------------
# subcommands


def _run_fit(args: argparse.Namespace) -> int:
    if args.save is not None:
        folder = Path(args.save).parent
        if not folder.is_dir():  # before a possibly long fit
            raise NGMMError(f"cannot save the model to '{args.save}': the folder '{folder}' "
                            "does not exist")
    data = _read_model_columns(args.data, args.formula)
    fit = _fit(args, args.formula, data)
    print(fit.summary())
    if args.save is not None:
        from ngmm_formula import persist

        path = persist.save(fit, args.save)
        _note(args, f"saved the model to {path}")
    return 0


def _population(value: str | None) -> str | None:
    if value is None:
        return None
    if value.strip() in _POPULATION:
        return _POPULATION[value.strip()]
    raise NGMMError(f'--re-form must be "~0" (population-level prediction) or omitted, got '
                    f"'{value}' (quote \"~0\": unquoted, the shell expands ~0 to the current "
                    "folder)")


def _run_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from ngmm_formula import persist

    re_form = _population(args.re_form)
    out = None if args.out in (None, "-") else Path(args.out)
    if out is not None and not out.parent.is_dir():
        raise NGMMError(f"cannot write '{args.out}': the folder '{out.parent}' does not exist")
    fit = persist.load(args.model, trusted=args.trusted)
    data = read_data(args.data)
    try:
        pred = fit.predict(data, type=args.type, re_form=re_form,
                           allow_new_levels=args.allow_new_levels)
    except NewLevelsError as exc:  # the Python advice (allow_new_levels=True) in CLI words
        advice = ("use --allow-new-levels to predict them with a zero random effect, or "
                  "--re-form \"~0\" for population-level predictions"
                  if exc.what == "grouping factor" else
                  "use --allow-new-levels to predict them as a level without data (the "
                  "network's zero 'unseen' embedding)")
        raise NewLevelsError(exc.group, exc.levels, advice=advice, what=exc.what) from None
    table = pd.DataFrame({"prediction": pred}, index=data.index)
    table.index.name = data.index.name or "row"
    if out is None:
        table.to_csv(sys.stdout)
        return 0
    try:
        if out.suffix.lower() in (".parquet", ".pq"):
            table.to_parquet(out)
        else:
            table.to_csv(out)
    except ImportError as exc:
        raise NGMMError(f"cannot write '{out}': {_first_line(exc)} (writing Parquet needs "
                        "pyarrow)") from None
    except OSError as exc:
        raise NGMMError(f"cannot write '{out}': {exc.strerror or exc}") from None
    _note(args, f"wrote {len(table)} predictions to {out}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    try:
        from ngmm_formula.compare import compare
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name not in (None,
                                                                     "ngmm_formula.compare"):
            raise NGMMError(f"the comparison module is not available: {_first_line(exc)}") \
                from None
        raise NGMMError("the comparison module is not available") from None
    data = read_data(args.data)
    newdata = read_data(args.newdata) if args.newdata is not None else None
    fits = [_fit(args, formula, data) for formula in args.formula]
    print(compare(*fits, data=data, newdata=newdata))
    return 0


# --------------------------------------------------------------------------------------------
# entry point


def _error(exc: BaseException) -> None:
    # one line; a formula error adds the formula with a caret under the offending position
    text = str(exc) if isinstance(exc, FormulaError) else " ".join(str(exc).split())
    print(f"ngmm: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        with _warnings_to_stderr(args.quiet):
            return int(args.handler(args))
    except NGMMError as exc:
        _error(exc)
        return 2
    except KeyboardInterrupt:
        print("ngmm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ngmm predict ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.traceback:
            raise
        print(f"ngmm: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(rerun with --traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
