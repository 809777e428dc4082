#!/usr/bin/env python
"""Which Control settings let the NGMM close the held-out log-likelihood gap on synthetic data.

For every family and seed the data, the split and the metrics are those of
``vignettes/nonlinear_synthetic.py`` (sine effect, 200 groups x 20 training observations);
the linear GLMM and the oracle are fitted once per data set, and the NGMM
``y ~ nn(x1, x2) + x3 + (1 | g)`` once per configuration. Each configuration is a
comma-separated list of Control options, optionally with ``hidden=32;32``,
``activation=tanh`` or ``dropout=0.1`` (options of the ``nn()`` term) -- "default" is
``Control()``.

Usage::

    python benchmarks/neural/tune_control.py --seeds 5 --families binomial \
        default lr=0.01 batch_size=512 "lr=0.01,patience=30"

Writes ``benchmarks/neural/results/<tag>.csv`` and ``.md`` and prints a table (gap closed on
known and new groups: mean, SD and worst seed; the NGMM's random-intercept SD; epochs; seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "vignettes"))
import _common as C  # noqa: E402
import nonlinear_synthetic as S  # noqa: E402

from ngmm_formula import Control  # noqa: E402


def config(text: str) -> tuple[Control, str]:
    if text == "default":
        return Control(progress=False), ""
    parts = text.split(",")
    nn_opts = ("hidden=", "activation=", "dropout=")
    kw = S.parse_control(",".join(p for p in parts if not p.startswith(nn_opts)))
    term = ""
    for p in parts:
        if p.startswith("hidden="):
            term += f", hidden=({p.split('=', 1)[1].replace(';', ', ')},)"
        elif p.startswith("activation="):
            term += f", activation='{p.split('=', 1)[1]}'"
        elif p.startswith("dropout="):
            term += f", dropout={p.split('=', 1)[1]}"
    return Control(progress=False, **kw), term


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--families", default="gaussian,binomial,poisson")
    ap.add_argument("--effect", default="sine")
    ap.add_argument("--tag", default="tune")
    args = ap.parse_args()
    sizes = {"groups": 200, "per_group": 20, "test_per_group": 10, "new": 50}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for fam in args.families.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            train, known, new, _ = S.make_data(fam, args.effect, seed, sizes)
            base = {}
            for m in ("glmm", "oracle"):
                est, _ = S.run_method(m, train, fam, seed, Control(progress=False), "")
                base[m] = (C.score(fam, est, known, known.y.to_numpy(), "g", known=True)
                           ["loglik"],
                           C.score(fam, est, new, new.y.to_numpy(), "g", known=False)
                           ["loglik"])
            for cfg in args.configs:
                ctl, hidden = config(cfg)
                with C.Timer() as t:
                    est, info = S.run_method("ngmm", train, fam, seed, ctl, hidden)
                lk = C.score(fam, est, known, known.y.to_numpy(), "g", known=True)["loglik"]
                ln = C.score(fam, est, new, new.y.to_numpy(), "g", known=False)["loglik"]
                gk = (lk - base["glmm"][0]) / (base["oracle"][0] - base["glmm"][0])
                gn = (ln - base["glmm"][1]) / (base["oracle"][1] - base["glmm"][1])
                rows.append({"family": fam, "seed": seed, "config": cfg, "gap_known": gk,
                             "gap_new": gn, "ll_known": lk, "ll_new": ln, "sd_b": est.sd_b,
                             "epochs": info.get("epochs"), "best_epoch": info.get("best_epoch"),
                             "seconds": t.seconds})
                print(f"{fam:8s} seed {seed} {cfg:40s} gap known {gk:7.1%} new {gn:7.1%} "
                      f"sd_b {est.sd_b:.3f} epochs {info.get('epochs')} "
                      f"({info.get('best_epoch')}) {t.seconds:5.1f}s", flush=True)
    runs = pd.DataFrame(rows)
    runs.to_csv(out / f"{args.tag}.csv", index=False)
    agg = runs.groupby(["family", "config"], sort=False).agg(
        gap_known=("gap_known", "mean"), gap_known_sd=("gap_known", "std"),
        gap_known_min=("gap_known", "min"), gap_new=("gap_new", "mean"),
        gap_new_min=("gap_new", "min"), sd_b=("sd_b", "mean"), epochs=("epochs", "mean"),
        seconds=("seconds", "mean")).reset_index()
    print(C.md_table(agg, ".3f"))
    (out / f"{args.tag}.md").write_text(C.md_table(agg, ".3f"))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
