"""Sharded reading (issue 17, part 1): each process of a distributed fit reads only the rows
of its own groups from a Parquet dataset, and the encodings that must agree are agreed by
collective operations (:class:`~ngmm_formula.design.Agreement`).

In one process: :func:`~ngmm_formula.io.group_hash` gives fixed values (it must not change
between sessions, machines or versions: a dataset written today is read by tomorrow's
processes), :func:`~ngmm_formula.io.write_partitioned` / :func:`~ngmm_formula.io.read_shard` /
:func:`~ngmm_formula.io.read_data` round-trip, the Gram-matrix rank rule equals the QR one,
and what a sharded read cannot do is a clear error. With two processes (one ``torchrun
--standalone`` launch, gloo): a binomial GLMM from a partitioned folder and a Gaussian one
from a plain Parquet file (rows filtered row group by row group), each process reading about
half the rows, equal to the one-process fit of the whole DataFrame; and a binomial NGMM from
a partitioned folder, whose networks' input standardisation and factor levels, minibatches,
validation groups, input noise and centring are agreed across the processes.

Tolerance 1e-6 (relative, at least absolute). Both fits maximise the same objective over the
same rows with the same encodings; what differs is the order of floating-point summation
(the all-reduce adds two partial sums, the rows of a partitioned dataset come back in another
order) and the GLM start (normal equations from all-reduced sums instead of a QR): round-off of
~1e-16 relative moves the optimiser's path by as little, and both fits end with Newton steps at
max|gradient| < 1e-6, so estimates and log-likelihoods agree far inside 1e-6 (measured: 1e-10
or less). The NGMM is held to 1e-3, as in ``test_distributed.py``: its training amplifies
the round-off of the gradients' all-reduce through its AdamW steps (measured: 2e-9 on the
log-likelihood, 3e-7 on the linear predictor of the float32 networks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ngmm_formula import Control, NGMMError, ngmm
from ngmm_formula.design import full_rank_columns, full_rank_columns_gram
from ngmm_formula.io import (
    PARTITION_FILE,
    group_hash,
    partition_info,
    read_data,
    read_shard,
    write_partitioned,
)

pytest.importorskip("pyarrow")

from tests.torchrun import run_two_processes

ROOT = Path(__file__).resolve().parents[1]
BINOMIAL = "y ~ x + f + (1 | g)"
GAUSSIAN = "z ~ x + f + (1 | g)"
N_PARTS = 8


def close(a: Any, b: Any, tol: float) -> bool:
    """|a - b| <= tol * max(1, |a|) elementwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(a.shape == b.shape and np.all(np.abs(a - b) <= tol * np.maximum(1, np.abs(a))))


NEURAL = "y ~ nn(x1, x2, f, hidden=(8, 8)) + x3 + (1 | g)"
# minibatches of 6 of the 60 groups: many hold groups of one process only
# one validation split, as a distributed fit trains (train.folds_for)
NEURAL_CONTROL = dict(epochs=12, patience=6, batch_groups=6, progress=False, folds=1)


def neural_data() -> pd.DataFrame:
    """60 groups of 10 binomial rows with a sine effect of x1 (the network's to learn), the
    group labels as strings, and a factor input ``f`` whose level "z" occurs only in groups
    that process 1 of 2 reads."""
    from ngmm_formula.datasets import simulate_grouped

    d = simulate_grouped(n_groups=60, n_per_group=10, family="binomial", effect="sine", seed=3)
    g = d["g"].astype(str).to_numpy()
    rng = np.random.default_rng(2)
    f = rng.choice(["a", "b"], size=len(d)).astype(object)
    f[(group_hash(g, N_PARTS) % 2 == 1) & (rng.random(len(d)) < 0.2)] = "z"
    return d[["y", "x1", "x2", "x3"]].assign(g=g, f=f)


def shard_data() -> pd.DataFrame:
    """200 groups of 10 rows; the level "z" of the fixed factor ``f`` occurs only in groups
    that process 1 of 2 reads, so process 0 learns it from the agreement alone."""
    rng = np.random.default_rng(1)
    n_groups, m = 200, 10
    g = np.repeat([f"s{k:03d}" for k in range(n_groups)], m)
    owner = group_hash(g, N_PARTS) % 2
    x = rng.normal(size=g.size)
    f = rng.choice(["a", "b", "c"], size=g.size)
    f[(owner == 1) & (rng.random(g.size) < 0.1)] = "z"
    b = rng.normal(size=n_groups)[np.repeat(np.arange(n_groups), m)]
    eta = -0.3 + 0.8 * x + (f == "b") * 0.5 + b
    return pd.DataFrame({"g": g, "x": x, "f": f,
                         "y": (rng.random(g.size) < 1 / (1 + np.exp(-eta))).astype(float),
                         "z": 1 + x + b + rng.normal(size=g.size)})


# --------------------------------------------------------------------------------------------
# one process


def test_group_hash_values_are_fixed() -> None:
    # BLAKE2b-64 of the text, mod n: these values must never change (datasets on disk)
    assert group_hash(["a", "b", "c", "s000", "s001"], 8).tolist() == [0, 4, 7, 0, 0]
    assert group_hash(["a", "b", "c", "s000", "s001"], 1000).tolist() == [928, 668, 95,
                                                                         968, 56]
    # a value hashes as its text, whatever its type (the labels of a grouping factor)
    assert group_hash([1, 2], 97).tolist() == group_hash(["1", "2"], 97).tolist()
    assert group_hash(pd.Categorical(["b", "a"]), 8).tolist() == [4, 0]
    assert group_hash([], 8).shape == (0,)
    with pytest.raises(NGMMError, match="n_parts"):
        group_hash(["a"], 0)


def test_group_hash_is_the_same_in_another_process() -> None:
    """Not Python's hash(), which is salted per process for strings."""
    code = ("from ngmm_formula.io import group_hash; "
            "print(group_hash(['a', 'b', 'c', 's000', 's001'], 8).tolist())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[0, 4, 7, 0, 0]"


def test_write_partitioned_and_read_back(tmp_path: Path) -> None:
    df = shard_data()
    path = write_partitioned(df, tmp_path / "ds", "g", N_PARTS)
    info = partition_info(path)
    assert info is not None and (path / PARTITION_FILE).is_file()
    assert (info["group"], info["n_parts"], info["version"], info["rows"]) == ("g", 8, 1, 2000)
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == [
        f"ngmm_part={k}" for k in range(N_PARTS)]
    # read whole: the same rows and columns (rows grouped by partition)
    whole = read_data(path)
    assert list(whole.columns) == list(df.columns)
    key = ["g", "x"]
    pd.testing.assert_frame_equal(whole.sort_values(key).reset_index(drop=True),
                                  df.sort_values(key).reset_index(drop=True))
    # two shards: disjoint groups, together every row, and the partitions k % 2 == rank
    shards = [read_shard(path, r, 2, ["g", "x"]) for r in range(2)]
    assert shards[0].attrs["shard"]["partitions"] == [0, 2, 4, 6]
    assert set(shards[0]["g"]).isdisjoint(shards[1]["g"])
    assert sum(len(s) for s in shards) == len(df)
    assert list(shards[1].columns) == ["g", "x"]
    owner = group_hash(df["g"], N_PARTS) % 2
    assert len(shards[0]) == int((owner == 0).sum())
    # a plain Parquet file, filtered row group by row group: the same split
    df.to_parquet(tmp_path / "plain.parquet", row_group_size=300)
    plain = [read_shard(tmp_path / "plain.parquet", r, 2, ["x"], group="g") for r in range(2)]
    assert [len(p) for p in plain] == [len(s) for s in shards]
    assert list(plain[0].columns) == ["x"]
    with pytest.raises(NGMMError, match="group= column"):
        read_shard(tmp_path / "plain.parquet", 0, 2)
    with pytest.raises(NGMMError, match="partitioned by 'g', not by 'x'"):
        read_shard(path, 0, 2, group="x")
    with pytest.raises(NGMMError, match="fewer than the 16 processes"):
        read_shard(path, 0, 16)
    with pytest.raises(NGMMError, match="already holds Parquet files"):
        write_partitioned(df, path, "g", N_PARTS)


def test_rank_rule_from_the_cross_product_equals_the_qr() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 7))
    X[:, 2] = X[:, 0] - 2 * X[:, 1]  # aliased
    X[:, 4] = 0.0  # empty (an unused factor level)
    X[:, 6] = 3 * X[:, 3]
    assert full_rank_columns_gram(X.T @ X) == full_rank_columns(X) == [0, 1, 3, 5]


def test_what_a_sharded_read_refuses(tmp_path: Path) -> None:
    import torch.distributed as dist

    df = shard_data().assign(h=lambda d: d["g"].str[:3])
    path = write_partitioned(df, tmp_path / "ds", "h", N_PARTS)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(NGMMError, match="not available with approx='variational'"):
            ngmm(BINOMIAL, path, "binomial", approx="variational", distributed=True)
        with pytest.raises(NGMMError, match="partitioned by 'h'.*split across processes"):
            ngmm(BINOMIAL, path, "binomial", distributed=True)
        with pytest.raises(NGMMError, match="has 2 .*crossed or nested"):
            ngmm("y ~ x + (1 | g) + (1 | h)", path, "binomial", distributed=True)
        # g:h is within h, the column the data set was partitioned by: supported
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = ngmm("y ~ x + (1 | g:h)", path, "binomial", distributed=True)
            single = ngmm("y ~ x + (1 | g:h)", df, "binomial")
        assert fit.nobs == len(df)
        assert close(single.loglik, fit.loglik, 1e-6)
        assert close(single.fixef, fit.fixef, 1e-6)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# two processes, launched by torchrun

_JOB = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch.distributed as dist
import pandas as pd
from ngmm_formula import Control, ngmm
folder = sys.argv[1]

def record(fit):
    return {{"loglik": fit.loglik, "fixef": fit.fixef.tolist(), "names": list(fit.fixef.index),
            "theta": fit.theta.tolist(), "sigma": fit.sigma, "nobs": fit.nobs,
            "rows": fit.design.nobs, "groups": fit.design.re_terms[0].n_levels}}

out = {{"binomial": record(ngmm({binomial!r}, folder + "/part", "binomial",
                                distributed=True)),
        "gaussian": record(ngmm({gaussian!r}, folder + "/plain.parquet", reml=False,
                                distributed=True))}}
fit = ngmm({neural!r}, folder + "/neural", "binomial", seed=1, distributed=True,
           control=Control(**{neural_control!r}))
whole = pd.read_parquet(folder + "/neural.parquet")  # every row, for the predictions
ranef = fit.ranef["g"].iloc[:, 0]
out["neural"] = {{**record(fit), "best_epoch": fit.history.best_epoch,
                 "eta": fit.predict(whole, type="link", re_form="~0").tolist(),
                 "ranef": dict(zip(ranef.index.astype(str), ranef.tolist())),
                 "levels": list(fit.design.nets[0].encodings[2].levels),
                 "centre": [e.center for e in fit.design.nets[0].encodings[:2]]}}
with open(folder + "/out." + str(dist.get_rank()) + ".json", "w") as fh:
    json.dump(out, fh)
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    d = tmp_path_factory.mktemp("shards")
    df = shard_data()
    write_partitioned(df, d / "part", "g", N_PARTS)
    df.to_parquet(d / "plain.parquet", row_group_size=300)
    write_partitioned(neural_data(), d / "neural", "g", N_PARTS)
    neural_data().to_parquet(d / "neural.parquet")
    script = d / "job.py"
    script.write_text(_JOB.format(binomial=BINOMIAL, gaussian=GAUSSIAN, neural=NEURAL,
                                  neural_control=NEURAL_CONTROL))
    run_two_processes(script, str(d))
    return [json.loads((d / f"out.{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name, formula, kw", [
    ("binomial", BINOMIAL, {"family": "binomial"}),  # from the partitioned folder
    ("gaussian", GAUSSIAN, {"reml": False}),  # from a plain Parquet file, row group by row group
])
def test_two_processes_reading_half_each_equal_one_process(
        two_processes: list[dict[str, Any]], name: str, formula: str, kw: dict[str, Any]
        ) -> None:
    df = shard_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ngmm(formula, df, **kw)
    got = [p[name] for p in two_processes]
    # each process read 40-60 % of the rows (1090 and 910 of 2000 here), together
    # all of them, and the groups of each are its own
    rows = [g["rows"] for g in got]
    assert sum(rows) == len(df) and all(0.4 <= r / len(df) <= 0.6 for r in rows)
    assert sum(g["groups"] for g in got) == df["g"].nunique()
    for g in got:
        assert g["nobs"] == single.nobs == len(df)
        # the level "z" of f occurs in process 1's rows only, and both have its column
        assert g["names"] == list(single.fixef.index) == ["(Intercept)", "x", "fb", "fc", "fz"]
        assert close(single.loglik, g["loglik"], 1e-6)
        assert close(single.fixef, g["fixef"], 1e-6)
        assert close(single.theta, g["theta"], 1e-6)
        assert close(single.sigma, g["sigma"], 1e-6)
    # both processes hold the same estimates, to the last bit (rank 0 ran the optimiser)
    keys = ("loglik", "fixef", "theta", "sigma")
    assert [got[0][k] for k in keys] == [got[1][k] for k in keys]


def test_two_processes_reading_half_each_fit_the_ngmm_of_one_process(
        two_processes: list[dict[str, Any]]) -> None:
    """The networks' inputs are encoded alike in both processes (the mean and standard
    deviation of the numeric inputs and the factor levels are those of all rows: level "z"
    of f occurs in process 1's rows only), the training draws the same minibatches and
    validation groups as one process (groups numbered by their labels among all processes'),
    and the fit equals the one-process fit of the whole DataFrame: the same best epoch, the
    estimates and every row's linear predictor (networks included) within 1e-3 (module
    docstring)."""
    df = neural_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ngmm(NEURAL, df, "binomial", seed=1, control=Control(**NEURAL_CONTROL))
    got = [p["neural"] for p in two_processes]
    assert sum(g["rows"] for g in got) == len(df) and all(g["rows"] < len(df) for g in got)
    enc = single.design.nets[0].encodings
    assert single.history is not None and single.history.best_epoch > 1  # the network trained
    for g in got:
        assert g["nobs"] == len(df) and g["best_epoch"] == single.history.best_epoch
        assert g["levels"] == list(enc[2].levels) == ["a", "b", "z"]
        assert close([e.center for e in enc[:2]], g["centre"], 1e-12)
        assert close(single.loglik, g["loglik"], 1e-3)
        assert close(single.fixef, g["fixef"], 1e-3)
        assert close(single.theta, g["theta"], 1e-3)
        # the networks and fixed effects on every row, and this process's groups' modes
        assert close(single.predict(df, type="link", re_form="~0"), g["eta"], 1e-3)
        modes = single.ranef["g"].iloc[:, 0]
        assert close(modes.loc[list(g["ranef"])], list(g["ranef"].values()), 1e-3)
    assert sorted(k for g in got for k in g["ranef"]) == sorted(df["g"].unique())
