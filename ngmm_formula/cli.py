"""Command line: ``ngmm fit FORMULA --data FILE|DATASET --family FAMILY``.

Fits the formula to a CSV/Parquet file (or a bundled data set by name, see
``ngmm_formula.datasets.available()``) and prints the lme4-style summary. Bad arguments exit
with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ngmm_formula.errors import NGMMError

EXAMPLES = """examples:
  ngmm fit "cbind(incidence, size - incidence) ~ period + (1 | herd)" --data cbpp --family binomial
  ngmm fit "Reaction ~ Days + (Days | Subject)" --data sleepstudy
  ngmm fit "y ~ x + (1 | g)" --data mydata.csv --family poisson --approx agq --nagq 10
"""


def _read(data: str) -> pd.DataFrame:
    path = Path(data)
    if path.suffix.lower() in (".csv", ".gz") or path.suffix.lower() == ".parquet":
        if not path.exists():
            raise NGMMError(f"data file '{data}' does not exist")
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    from ngmm_formula import datasets

    frame = datasets.load(data)
    frame.attrs["name"] = data
    return frame


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngmm", description="Fit (neural) generalized linear mixed models with lme4 "
        "formulas.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a formula and print the summary", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("formula", help="lme4 formula, quoted")
    fit.add_argument("--data", required=True,
                     help="CSV or Parquet file, or the name of a bundled data set")
    fit.add_argument("--family", default="gaussian",
                     help="gaussian, binomial, poisson, negative_binomial or gamma")
    fit.add_argument("--link", default=None, help="link function (default: canonical)")
    fit.add_argument("--approx", default="auto",
                     choices=["auto", "laplace", "agq", "truncated", "variational"])
    fit.add_argument("--nagq", type=int, default=None)
    fit.add_argument("--truncation", type=float, default=None)
    fit.add_argument("--points", type=int, default=None)
    fit.add_argument("--reml", choices=["true", "false"], default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ngmm_formula import ngmm
    from ngmm_formula.families import get_family

    try:
        data = _read(args.data)
        family = get_family(args.family, args.link)
        reml = None if args.reml is None else args.reml == "true"
        fit = ngmm(args.formula, data, family, approx=args.approx, nagq=args.nagq,
                   truncation=args.truncation, points=args.points, reml=reml)
    except NGMMError as exc:
        # one line of message; a formula error adds the formula with a caret under the
        # offending position
        print(f"ngmm: error: {exc}", file=sys.stderr)
        return 2
    print(fit.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
