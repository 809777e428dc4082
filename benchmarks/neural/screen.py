#!/usr/bin/env python
"""Screen one NGMM specification on the synthetic benchmark: gap closed per seed.

The data, split and scoring of ``vignettes/nonlinear_synthetic.py`` (200 groups x 20 training
rows; known-group and new-group test sets); the GLMM and oracle scores of each seed are
cached in ``--cache`` (JSON) so that several specifications can be screened quickly. Prints
one line per seed (gap closed on known and new groups, or the relative difference to the
GLMM for the linear truth) and a ``RESULT`` line with the means::

    python benchmarks/neural/screen.py binomial sine "y ~ nn(x1, x2) + x3 + (1 | g)" lr=0.001
    python benchmarks/neural/screen.py binomial sine \\
        "y ~ nn(x1, x2, activation='gelu') + x3 + (1 | g)" "" --seeds 10:20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

VIGNETTES = Path(__file__).resolve().parents[2] / "vignettes"
sys.path.insert(0, str(VIGNETTES))
import _common as C  # noqa: E402
import nonlinear_synthetic as S  # noqa: E402

from ngmm_formula import Control  # noqa: E402

SIZES = {"groups": 200, "per_group": 20, "test_per_group": 10, "new": 50}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family")
    ap.add_argument("effect")
    ap.add_argument("formula")
    ap.add_argument("control", help="Control options, e.g. lr=0.001,folds=3 ('' = defaults)")
    ap.add_argument("--seeds", default="0:5", help="first:stop (Python range)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/ngmm_screen_cache.json"))
    args = ap.parse_args()
    fam, eff = args.family, args.effect
    control = Control(progress=False, **C.parse_control(args.control))
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    rows = []
    for seed in range(*map(int, args.seeds.split(":"))):
        train, known, new, _ = S.make_data(fam, eff, seed, SIZES)

        def score(est: C.Estimates, known: pd.DataFrame = known,
                  new: pd.DataFrame = new) -> tuple[float, float]:
            return (C.score(fam, est, known, known["y"].to_numpy(), "g", known=True)["loglik"],
                    C.score(fam, est, new, new["y"].to_numpy(), "g", known=False)["loglik"])

        key = f"{fam}/{eff}/{seed}"
        if key not in cache:
            cache[key] = {m: score(S.run_method(m, train, fam, seed, Control(progress=False),
                                                "")[0]) for m in ("glmm", "oracle")}
            args.cache.write_text(json.dumps(cache))
        t0 = time.perf_counter()
        est, info = S.fit_package(args.formula, train, fam, seed, control)
        seconds = time.perf_counter() - t0
        s, base = score(est), cache[key]
        h = info["fit"].history
        row = {"seed": seed, "seconds": round(seconds, 1), "best_epoch": h.best_epoch,
               "epochs": len(h.train), "sd_b": round(est.sd_b, 3)}
        for i, k in enumerate(("known", "new")):
            g, o = base["glmm"][i], base["oracle"][i]
            row[k] = round(100 * ((s[i] - g) / (o - g) if eff != "linear"
                                  else (s[i] - g) / abs(g)), 2)
        rows.append(row)
        print(row, flush=True)
    d = pd.DataFrame(rows)
    print(f"RESULT {args.formula} | {args.control or 'defaults'} | seeds {args.seeds} | "
          f"known {d.known.mean():.2f} (min {d.known.min():.1f}) new {d.new.mean():.2f} "
          f"(min {d.new.min():.1f}) | {d.seconds.mean():.1f} s per fit")


if __name__ == "__main__":
    main()
