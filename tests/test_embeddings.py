"""Factor inputs of ``nn()`` terms as learnt embeddings (``networks.MLP`` with ``factors``,
``design.NetEncoding`` of kind ``"embedded"``): array sizes, the new-level fallback, model
files, a small fit that recovers a factor effect, and the gradients of the embedding tables.

Small data and few epochs keep these fast; speed and memory at 10,000 levels are measured by
``benchmarks/neural_factor.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula import Control, ngmm
from ngmm_formula.api import _module, prepare
from ngmm_formula.errors import NewLevelsError
from ngmm_formula.networks import (
    EMBEDDING_PRIOR_PRECISION,
    MLP,
    embedding_dim,
    network_from_data,
    network_to_data,
)
from ngmm_formula.train import fit_linear_start

# one network per fit (no average of the fold networks): these tests look inside its tables
QUICK = Control(epochs=15, patience=5, min_steps=0, progress=False, average_folds=False)


def _factor_data(levels: int, rows: int, seed: int = 0, sd: float = 1.0,
                 groups: int = 40) -> tuple[pd.DataFrame, np.ndarray]:
    """Gaussian data ``y = sin(x1) + a_h + b_g + e`` with ``a_h ~ N(0, sd^2)``; returns the
    frame and the level effects."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, sd, levels)
    h = np.arange(rows) % levels  # every level seen
    g = rng.integers(0, groups, rows)
    x1 = rng.uniform(-2, 2, rows)
    y = np.sin(x1) + a[h] + rng.normal(0, 0.5, groups)[g] + rng.normal(0, 0.3, rows)
    df = pd.DataFrame({"y": y, "x1": x1, "g": g.astype(str),
                       "h": pd.Categorical([f"L{v:05d}" for v in h])})
    return df, a


def test_embedding_dim_rule() -> None:
    # min(16, round(1.6 L^0.56)): fastai's rule of thumb, capped at 16
    assert [embedding_dim(k) for k in (1, 2, 10, 30, 60, 10_000)] == [2, 2, 6, 11, 16, 16]


def test_many_levels_make_no_n_by_levels_array() -> None:
    """A 3,000-level factor over 6,000 rows: the design holds one column of codes, the
    network's tables are (levels + 1) x dim, the GLMM start leaves the dummies out (more
    than 64 columns), and no array of the design or problem has n x levels entries."""
    levels, rows = 3000, 6000
    df, _ = _factor_data(levels, rows)
    prepared = prepare("y ~ nn(x1, h, hidden=(8,)) + (1 | g)", df, "gaussian")
    (ni,) = prepared.design.nets
    assert ni.X.shape == (rows, 2) and ni.columns == ["x1", "h"]
    assert ni.encodings[1].kind == "embedded"
    assert tuple(prepared.problem.net_X[0].shape) == (rows, 2)
    np.testing.assert_array_equal(ni.X[:, 1], df["h"].cat.codes)
    module = _module(prepared)
    (net,) = module.nets
    assert isinstance(net, MLP)
    dim = embedding_dim(levels)
    assert [tuple(t.weight.shape) for t in net.tables] == [(levels + 1, dim)]
    assert [tuple(t.weight.shape) for t in net.level_tables] == [(levels + 1, 1)]
    kept = fit_linear_start(prepared.problem, prepared.family, prepared.approximation, module,
                            Control())
    assert kept == [[0]]  # x1 only: 1 + 3000 dummies > 64 columns
    assert not net.level_tables[0].weight.any()
    limit = rows * levels // 100
    arrays = [prepared.design.X, *[t.Zraw for t in prepared.design.re_terms], ni.X]
    assert max(a.size for a in arrays) < limit
    tensors = [prepared.problem.Xs, *prepared.problem.Z, *prepared.problem.net_X,
               *net.state_dict().values()]
    assert max(t.numel() for t in tensors) < limit


@pytest.fixture(scope="module")
def factor_fit():  # type: ignore[no-untyped-def]
    df, a = _factor_data(30, 1500, seed=1)
    fit = ngmm("y ~ nn(x1, h, hidden=(16,)) + (1 | g)", df, "gaussian",
               control=QUICK, seed=2)
    return fit, df, a


def test_small_fit_recovers_the_factor_effect(factor_fit) -> None:  # type: ignore[no-untyped-def]
    """30 levels x 50 rows with effects of SD 1: the partial dependence on the factor tracks
    the true effects (correlation > 0.95; the effects' standard error per level is about
    0.3 / sqrt(50) = 0.04, far below their spread)."""
    fit, _df, a = factor_fit
    pdp = fit.partial_dependence(0, "h")
    assert list(pdp["h"]) == [f"L{v:05d}" for v in range(30)]
    assert np.corrcoef(pdp["effect"].to_numpy(), a)[0, 1] > 0.95


def test_new_levels_raise_unless_allowed_then_use_the_zero_row(factor_fit) -> None:  # type: ignore[no-untyped-def]
    """An unseen level of an nn() factor raises NewLevelsError (also with re_form="~0",
    which concerns random effects only); with allow_new_levels=True it is predicted through
    the reserved row, which training never moved from zero."""
    fit, df, _ = factor_fit
    (net,) = fit.nets
    for table in [*net.tables, *net.level_tables]:
        assert not table.weight[-1].any()  # the unseen row: zero, never trained
    assert net.level_tables[0].weight[:-1].abs().sum() > 0  # the GLMM's level effects
    new = df.iloc[:3].copy()
    new["h"] = new["h"].astype(str)
    new.loc[new.index[0], "h"] = "never"
    for kw in ({}, {"re_form": "~0"}):
        with pytest.raises(NewLevelsError, match=r"nn\(\) input 'h' has 1 level\(s\) not in "
                                                 r"the training data: 'never'"):
            fit.predict(new, **kw)
    got = fit.predict(new, type="link", allow_new_levels=True)
    np.testing.assert_array_equal(got[1:], fit.predict(new.iloc[1:], type="link"))
    # by hand: the same row with the code of the reserved row
    x = torch.tensor([[(new["x1"].iloc[0] - fit.design.nets[0].encodings[0].center)
                       / fit.design.nets[0].encodings[0].scale, 30.0]], dtype=torch.float64)
    with torch.no_grad():
        f_new = float(net(x)[0])
    known = fit.predict(df.iloc[:1], type="link") - fit._net_outputs(
        tuple(ni.X[:1] for ni in fit.design.nets))[0]
    assert got[0] == pytest.approx(float(known[0]) + f_new, abs=1e-12)


def test_model_file_round_trip(factor_fit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Model files (format v2) hold the embedding network's configuration and tables: the
    loaded model predicts bit for bit, new levels included."""
    from ngmm_formula import load

    fit, df, _ = factor_fit
    path = tmp_path / "emb.ngmm"
    fit.save(path)
    back = load(path)
    new = df.iloc[:5].copy()
    new["h"] = new["h"].astype(str)
    new.loc[new.index[2], "h"] = "never"
    np.testing.assert_array_equal(back.predict(new, allow_new_levels=True),
                                  fit.predict(new, allow_new_levels=True))
    np.testing.assert_array_equal(back.predict(), fit.predict())
    config = network_to_data(back.nets[0])["config"]
    assert config["factors"] == [0, 30] and config["embed_dims"] == [embedding_dim(30)]


def test_network_config_round_trip_and_old_configs() -> None:
    """``config()`` / ``from_config`` rebuild an embedding network that takes the same
    ``state_dict``; a configuration without ``factors`` (files before embeddings) is a plain
    MLP."""
    torch.manual_seed(0)
    net = MLP(3, (5,), "tanh", 0.0, numeric=[True, False, True], factors=[0, 7, 0])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        net.tables[0].weight[-1].zero_()
    data = network_to_data(net)
    back = network_from_data(data)
    back.load_state_dict(net.state_dict(), strict=True)
    x = torch.tensor([[0.1, 3.0, -1.0], [2.0, 7.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    old = dict(data["config"])
    del old["factors"], old["embed_dims"]
    plain = network_from_data({"type": "MLP", "config": old})
    assert isinstance(plain, MLP) and not plain.tables and plain.linear.in_features == 3


def test_embedding_gradients() -> None:
    """``gradcheck`` of the output in the tables and the numeric input (float64); the
    reserved row gets no gradient; the penalty's gradient is lambda times the tables."""
    torch.manual_seed(1)
    net = MLP(2, (4,), "tanh", 0.0, factors=[0, 5], embed_dims=[3])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        net.tables[0].weight[-1].zero_()
        net.level_tables[0].weight[-1].zero_()
    codes = torch.tensor([0.0, 4.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    x1 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # the trained rows (the reserved row has no gradient by construction: padding_idx)
    emb = net.tables[0].weight.detach()[:-1].clone().requires_grad_(True)

    def f(x1: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        params = dict(net.named_parameters())
        params["embeddings.0.weight"] = torch.cat([emb, emb.new_zeros(1, 3)])
        return torch.func.functional_call(net, params, (torch.stack([x1, codes], 1),))

    assert torch.autograd.gradcheck(f, (x1, emb))
    net.zero_grad()
    net(torch.stack([x1.detach(), codes], 1)).sum().backward()
    assert not net.tables[0].weight.grad[-1].any()  # type: ignore[index]
    assert net.tables[0].weight.grad[4].abs().sum() > 0  # type: ignore[index]
    net.zero_grad()
    net.penalty().backward()
    torch.testing.assert_close(net.tables[0].weight.grad,
                               EMBEDDING_PRIOR_PRECISION * net.tables[0].weight.detach())


def test_training_learns_level_effects_outside_the_glmm_start() -> None:
    """100 levels: more dummies than the GLMM start takes (64 columns), so the level scalars
    and the embeddings start at zero and training alone must find the effects (SD 1,
    30 rows per level): the partial dependence tracks them (correlation > 0.9; measured
    0.99)."""
    df, a = _factor_data(100, 3000, seed=3)
    fit = ngmm("y ~ nn(x1, h, hidden=(16,)) + (1 | g)", df, "gaussian",
               control=Control(epochs=25, min_steps=0, patience=10, batch_size=256,
                               progress=False, average_folds=False), seed=2)
    net = fit.nets[0]
    assert net.tables[0].weight.abs().sum() > 0
    pdp = fit.partial_dependence(0, "h")
    assert np.corrcoef(pdp["effect"].to_numpy(), a)[0, 1] > 0.9


def test_summary_shows_the_embedding(factor_fit) -> None:  # type: ignore[no-untyped-def]
    fit, _, _ = factor_fit
    (term,) = fit.nn_terms
    # 1 numeric column + 30 levels x 11; weights: tables 31 x 11 and 31 x 1, first layer
    # (1 + 11) x 16 + 16, output 16, linear path 1, additive part 1 numeric input x 32 x 3
    assert term["architecture"] == "1 + 30x11 -> 16 -> 1 (relu) + linear + additive 1x32"
    assert term["n_weights"] == 31 * 11 + 31 + 12 * 16 + 16 + 16 + 1 + 96
