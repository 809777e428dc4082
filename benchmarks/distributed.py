"""One process against ``fit_distributed(nprocs=2)`` on a large linear GLMM (one run); with
``--sharded``, a binomial NGMM read from a partitioned Parquet dataset by one process and by
two ``torchrun`` processes that each read only their own groups' rows.

Prints the wall time of each (the worker's start-up excluded: one untimed warm-up call first
starts the forkserver) and the largest differences between the two fits, with the load
average: on a shared machine only the ratio measured in the same run means anything.

    python benchmarks/distributed.py                 # 4000 groups x 25 = 100k rows, binomial
    python benchmarks/distributed.py --groups 400    # quicker

``--sharded`` (issue 17): ``y ~ nn(x1, x2) + x3 + (1 | g)`` on ``simulate_grouped`` data
(sine effect, ``--groups`` x ``--per-group`` rows) written by ``write_partitioned`` (16
partitions); the one-process fit is ``ngmm(formula, path)`` in a fresh Python process, the
two-process fit ``ngmm(formula, path, distributed=True)`` under ``torchrun --standalone
--nproc_per_node=2``. Each process reports its own peak resident set (``ru_maxrss``: Python,
torch, its rows, the fit), its wall time and the fit; the table gives them with the largest
differences of the estimates and of population predictions (networks and fixed effects) on
10,000 rows, and writes ``results/distributed_sharded.md``.

    python benchmarks/distributed.py --sharded --groups 250000 --per-group 20   # 5 x 10^6 rows
    python benchmarks/distributed.py --sharded --groups 5000                    # quick look

``--two-nodes`` runs the two processes as two "machines" on this host instead: two
``torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d
--rdzv_endpoint=127.0.0.1:PORT`` launches (the README's multi-machine command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ngmm_formula import datasets, fit_distributed, ngmm
from ngmm_formula.datasets import simulate_grouped

HERE = Path(__file__).resolve().parent
NEURAL = "y ~ nn(x1, x2) + x3 + (1 | g)"

# the job of every process of the sharded comparison: argv = dataset, sample, output, distributed
_JOB = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import pandas as pd
from ngmm_formula import Control, ngmm
path, sample, out, distributed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t = time.perf_counter()
fit = ngmm({formula!r}, path, "binomial", seed=0, distributed=distributed,
           control=Control(progress=False))
seconds = time.perf_counter() - t
rank = 0
if distributed:
    import torch.distributed as dist
    rank = dist.get_rank()
eta = fit.predict(pd.read_parquet(sample), type="link", re_form="~0")
rec = dict(rank=rank, seconds=seconds, rows=int(fit.design.nobs), nobs=int(fit.nobs),
           loglik=fit.loglik, fixef=fit.fixef.tolist(), theta=fit.theta.tolist(),
           epochs=len(fit.history.train), best=fit.history.best_epoch, eta=eta.tolist(),
           peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
with open(out + "." + str(rank) + ".json", "w") as fh:
    json.dump(rec, fh)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4000)
    ap.add_argument("--per-group", type=int, default=25)
    ap.add_argument("--family", default="binomial", choices=["binomial", "poisson", "gaussian"])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--sharded", action="store_true",
                    help="an NGMM from a partitioned Parquet dataset, 1 vs 2 torchrun processes")
    ap.add_argument("--two-nodes", action="store_true",
                    help="with --sharded: the two processes as two torchrun launches meeting "
                         "by the c10d rendezvous on localhost")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.sharded:
        sharded(args.groups, args.per_group, args.two_nodes)
        return
    df = simulate_grouped(n_groups=args.groups, n_per_group=args.per_group,
                          family=args.family, effect="linear", seed=1)
    formula = "y ~ x1 + x2 + x3 + (1 | g)"
    kw = {"reml": False} if args.family == "gaussian" else {}
    # warm-up: imports, and the forkserver the workers are forked from
    ngmm(formula, df.head(200), args.family, **kw)
    fit_distributed("TICKS ~ YEAR + (1 | BROOD)", datasets.load("grouseticks"), "poisson",
                    nprocs=args.nprocs)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    one = ngmm(formula, df, args.family, **kw)
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    dist = fit_distributed(formula, df, args.family, nprocs=args.nprocs, **kw)
    t_dist = time.perf_counter() - t
    load1 = os.getloadavg()[0]
    print(f"{len(df)} rows, {args.groups} groups, {args.family}, approx {one.approximation.kind}"
          f"; load average (1 min) {load0:.2f} before, {load1:.2f} after")
    print(f"{'fit':<22}{'wall s':>9}{'ratio':>8}{'evaluations':>13}")
    print(f"{'one process':<22}{t_one:9.2f}{1.0:8.2f}{one.diagnostics.evaluations:13d}")
    print(f"{f'fit_distributed({args.nprocs})':<22}{t_dist:9.2f}{t_dist / t_one:8.2f}"
          f"{dist.diagnostics.evaluations:13d}")
    print(f"max |difference|: loglik {abs(one.loglik - dist.loglik):.2g}, fixef "
          f"{np.abs(one.fixef - dist.fixef).max():.2g}, theta "
          f"{np.abs(one.theta - dist.theta).max():.2g}")


def _run(*cmds: list[str]) -> float:
    """Run the commands side by side with this checkout on ``PYTHONPATH`` and one thread per
    process; the wall seconds until the last ends."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a fit failed: {cmds}")
    return time.perf_counter() - t


def _two_processes(job: list[str], two_nodes: bool) -> list[list[str]]:
    """The command(s) of the two-process fit: one ``torchrun --standalone`` launch, or two
    launches meeting by the c10d rendezvous on a free localhost port."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    if not two_nodes:
        return [[*run, "--standalone", "--nproc_per_node=2", *job]]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = [*run, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ngmm-bench", *job]
    return [node, node]


def sharded(groups: int, per_group: int, two_nodes: bool = False) -> None:
    """The NGMM read from a partitioned dataset by one process and by two (module docs)."""
    from ngmm_formula.io import write_partitioned

    work = Path(tempfile.mkdtemp(prefix="ngmm_sharded_"))
    df = simulate_grouped(n_groups=groups, n_per_group=per_group, family="binomial",
                          effect="sine", seed=1)[["y", "x1", "x2", "x3", "g"]]
    df["g"] = df["g"].astype(str)
    write_partitioned(df, work / "data", group="g", n_parts=16)
    df.sample(10_000, random_state=0).to_parquet(work / "sample.parquet")
    n_rows = len(df)
    del df
    (work / "job.py").write_text(_JOB.format(formula=NEURAL))
    job = [str(work / "job.py"), str(work / "data"), str(work / "sample.parquet")]
    load0 = os.getloadavg()[0]
    wall = {1: _run([sys.executable, *job, str(work / "one"), "0"]),
            2: _run(*_two_processes([*job, str(work / "two"), "1"], two_nodes))}
    load1 = os.getloadavg()[0]
    one = json.loads((work / "one.0.json").read_text())
    two = [json.loads((work / f"two.{r}.json").read_text()) for r in range(2)]
    lines = [f"{n_rows:,} rows, {groups:,} groups, `{NEURAL}`, binomial, default Control; "
             f"load average (1 min) {load0:.2f} before, {load1:.2f} after"
             + ("; the two processes as two torchrun launches (c10d rendezvous)"
                if two_nodes else ""), "",
             "| fit | process | rows read | wall s (fit) | wall s (process) | peak RSS GB "
             "| epochs (best) | logLik |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, recs, w in (("one process", [one], wall[1]), ("two processes", two, wall[2])):
        lines += [f"| {name} | {r['rank']} | {r['rows']:,} | {r['seconds']:.1f} | {w:.1f} | "
                  f"{r['peak_gb']:.2f} | {r['epochs']} ({r['best']}) | {r['loglik']:.3f} |"
                  for r in recs]
    peak2 = max(r["peak_gb"] for r in two)
    d_eta = np.abs(np.subtract(two[0]["eta"], one["eta"])).max()
    lines += ["", f"peak RSS per process, two / one: {peak2 / one['peak_gb']:.2f} "
              "(target <= 0.6)",
              "max |difference| two - one: loglik "
              f"{abs(two[0]['loglik'] - one['loglik']):.2g} (relative "
              f"{abs(two[0]['loglik'] - one['loglik']) / abs(one['loglik']):.2g}), fixef "
              f"{np.abs(np.subtract(two[0]['fixef'], one['fixef'])).max():.2g}, theta "
              f"{np.abs(np.subtract(two[0]['theta'], one['theta'])).max():.2g}, population "
              f"predictions on 10,000 rows {d_eta:.2g}"
              f"; the two ranks identical: {two[0]['loglik'] == two[1]['loglik']}"]
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    name = "distributed_sharded" + ("_two_nodes" if two_nodes else "")
    (HERE / "results" / f"{name}.md").write_text(
        f"`python benchmarks/distributed.py --sharded --groups {groups} --per-group "
        f"{per_group}{' --two-nodes' if two_nodes else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")


if __name__ == "__main__":
    main()
