"""Tests of the design layer (:mod:`ngmm_formula.design`).

The random-effects structure is compared EXACTLY with lme4's: every entry of
``tests/reference/lme4_refs.json["structure"]`` was written by ``tests/reference/make_refs.R``
from ``lFormula(formula, data)`` (``glFormula(..., family)`` for GLMMs); its formula, the R call
that produced it, is part of each test id.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ngmm_formula.datasets import load
from ngmm_formula.design import Design, build_design
from ngmm_formula.errors import DataError, NewLevelsError
from ngmm_formula.formula import parse_formula

REFS = Path(__file__).parent / "reference" / "lme4_refs.json"


def _structure_entries() -> list[dict[str, Any]]:
    if not REFS.exists():
        return []
    return list(json.loads(REFS.read_text())["structure"])


STRUCTURE = _structure_entries()


def _vec(value: Any) -> list[Any]:
    """jsonlite writes length-one R vectors as scalars (auto_unbox): make them lists again."""
    return value if isinstance(value, list) else [value]


def _python_formula(r_formula: str) -> str:
    """R's formula -> the formula string passed to the package.

    R writes powers inside ``I()`` as ``^``; formulaic evaluates ``I()`` as Python, where the
    power is ``**`` (``^`` is XOR). So ``I(age^2)`` is passed as ``I(age ** 2)``; the design
    translates formulaic's column name ``I(age ** 2)`` back to lme4's ``I(age^2)``
    (``design.lme4_name``), and the fixed-effect names are compared with lme4's untranslated.
    """
    return re.sub(r"I\(([^()]*)\)", lambda m: "I(" + m.group(1).replace("^", " ** ") + ")",
                  r_formula)


def _design(entry: dict[str, Any]) -> Design:
    binomial = entry["family"] == "binomial"
    return build_design(parse_formula(_python_formula(entry["formula"])),
                        load(entry["dataset"]), binomial=binomial)


# --------------------------------------------------------------------------------------------
# structure against lme4


def test_reference_file_has_structures() -> None:
    assert REFS.exists(), "run tests/reference/make_refs.R"
    assert len(STRUCTURE) >= 8


def test_python_formula_translation() -> None:
    assert _python_formula("use ~ age + I(age^2) + urban") == "use ~ age + I(age ** 2) + urban"
    assert _python_formula("y ~ x + (1 | g)") == "y ~ x + (1 | g)"


@pytest.mark.parametrize("entry", STRUCTURE,
                         ids=[f"{e['id']}: {e['formula']}" for e in STRUCTURE])
def test_structure_matches_lme4(entry: dict[str, Any]) -> None:
    d = _design(entry)
    # R: lf <- lFormula(formula, data) (glFormula for GLMMs); rt <- lf$reTrms
    assert d.nobs == entry["nobs"]

    # fixed effects, colnames(lf$X)
    assert list(d.fixed_names) == _vec(entry["X"]["colnames"])
    assert list(d.X.shape) == _vec(entry["X"]["dim"])
    assert d.dropped_columns == ()

    # Zt: dims, nonzero pattern (0-based, sorted by column then row) and values
    Zt = d.Zt().tocoo()
    assert list(Zt.shape) == _vec(entry["Zt"]["dim"])
    order = np.lexsort((Zt.row, Zt.col))
    np.testing.assert_array_equal(Zt.row[order], _vec(entry["Zt"]["i"]))
    np.testing.assert_array_equal(Zt.col[order], _vec(entry["Zt"]["j"]))
    np.testing.assert_allclose(Zt.data[order], _vec(entry["Zt"]["x"]), rtol=0, atol=1e-12)

    # theta: names (getME(fit, "theta") naming), start values rt$theta, bounds rt$lower
    # (jsonlite writes -Inf as null)
    assert d.theta_names == _vec(entry["theta_names"])
    np.testing.assert_array_equal(d.theta_start, _vec(entry["theta"]))
    lower = [-np.inf if v is None else v for v in _vec(entry["lower"])]
    np.testing.assert_array_equal(d.theta_lower, lower)

    # cnms in lme4's term order (decreasing number of levels), nl and Gp
    assert [(t.group, list(t.cnms)) for t in d.re_terms] == \
        [(c["group"], _vec(c["columns"])) for c in entry["cnms"]]
    assert [t.n_levels for t in d.re_terms] == _vec(entry["nl"])
    gp = np.concatenate([[0], np.cumsum([t.q * t.n_levels for t in d.re_terms])])
    assert gp.tolist() == _vec(entry["Gp"])

    # flist: grouping factors (e.g. "BROOD:LOCATION"), their levels in order, and which factor
    # each term uses (attr(flist, "assign"), 1-based)
    assert list(d.grouping_factors) == [f["name"] for f in entry["flist"]]
    levels = {t.group: list(t.levels) for t in d.re_terms}
    for f in entry["flist"]:
        assert len(levels[f["name"]]) == f["nlevels"]
        assert levels[f["name"]] == _vec(f["levels"])
    assert [d.grouping_factors.index(t.group) + 1 for t in d.re_terms] == \
        _vec(entry["flist_assign"])


# --------------------------------------------------------------------------------------------
# the response


def _frame(n: int = 40, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    trials = rng.integers(1, 9, n).astype(float)
    succ = np.floor(trials * rng.uniform(size=n))
    return pd.DataFrame({
        "y": rng.normal(size=n),
        "y01": rng.integers(0, 2, n).astype(float),
        "x": rng.normal(size=n),
        "z": rng.uniform(1, 2, n),
        "g": np.repeat([f"g{k}" for k in range(8)], n // 8),
        "f": pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"]),
        "s": succ,
        "n": trials,
        "prop": succ / trials,
    })


def test_response_zero_one() -> None:
    df = _frame()
    d = build_design(parse_formula("y01 ~ x + (1 | g)"), df, binomial=True)
    np.testing.assert_array_equal(d.y, df["y01"])
    np.testing.assert_array_equal(d.weights, np.ones(len(df)))
    assert d.response_name == "y01"


def test_response_two_level_factor_second_level_is_success() -> None:
    # R: glmer(use ~ ..., family = binomial) counts the second level "Y" as 1
    df = load("Contraception")
    d = build_design(parse_formula("use ~ age + (1 | district)"), df, binomial=True)
    np.testing.assert_array_equal(d.y, (df["use"] == "Y").to_numpy(dtype=float))
    # the order of the levels decides, not their names
    rev = df.assign(use=df["use"].cat.reorder_categories(["Y", "N"]))
    d = build_design(parse_formula("use ~ age + (1 | district)"), rev, binomial=True)
    np.testing.assert_array_equal(d.y, (df["use"] == "N").to_numpy(dtype=float))
    # strings: sorted levels, as R's factor()
    s = pd.DataFrame({"r": ["yes", "no", "no", "yes"], "x": [1.0, 2.0, 3.0, 4.0]})
    d = build_design(parse_formula("r ~ x"), s, binomial=True)
    np.testing.assert_array_equal(d.y, [1.0, 0.0, 0.0, 1.0])
    # booleans
    b = s.assign(r=s["r"] == "no")
    np.testing.assert_array_equal(build_design(parse_formula("r ~ x"), b, binomial=True).y,
                                  [0.0, 1.0, 1.0, 0.0])


def test_response_factor_new_data_keeps_training_levels() -> None:
    s = pd.DataFrame({"r": ["yes", "no", "no", "yes"], "x": [1.0, 2.0, 3.0, 4.0]})
    d = build_design(parse_formula("r ~ x"), s, binomial=True)
    nd = d.spec.new_data(s.iloc[[1, 2]], with_response=True)  # only "no" present
    np.testing.assert_array_equal(nd.y, [0.0, 0.0])


def test_response_factor_with_three_levels() -> None:
    df = _frame()
    with pytest.raises(DataError, match=r"'f' is a factor with 3 levels"):
        build_design(parse_formula("f ~ x"), df, binomial=True)


def test_response_proportion_with_weights() -> None:
    # R: glmer(prop ~ x + (1 | g), weights = n, family = binomial)
    df = _frame()
    for w in ("n", df["n"], df["n"].to_numpy()):
        d = build_design(parse_formula("prop ~ x + (1 | g)"), df, binomial=True, weights=w)
        np.testing.assert_array_equal(d.y, df["prop"])
        np.testing.assert_array_equal(d.weights, df["n"])


def test_response_cbind_counts() -> None:
    # R: glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
    cbpp = load("cbpp")
    d = build_design(parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)"),
                     cbpp, binomial=True)
    np.testing.assert_allclose(d.y, cbpp["incidence"] / cbpp["size"], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(d.weights, cbpp["size"])
    assert d.response_name == "cbind(incidence, size - incidence)"
    # prior weights multiply the number of trials
    w = np.linspace(0.5, 2.0, len(cbpp))
    d = build_design(parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)"),
                     cbpp, binomial=True, weights=w)
    np.testing.assert_allclose(d.weights, cbpp["size"] * w)


def test_response_cbind_errors() -> None:
    df = _frame()
    with pytest.raises(DataError, match="needs family='binomial'"):
        build_design(parse_formula("cbind(s, n - s) ~ x"), df)
    with pytest.raises(DataError, match="failure count 's - n' is below zero"):
        build_design(parse_formula("cbind(s, s - n) ~ x"), df.assign(s=df["n"] - 1),
                     binomial=True)


@pytest.mark.parametrize("response", ["f", "g"])
def test_numeric_family_with_factor_response(response: str) -> None:
    with pytest.raises(DataError, match=f"response '{response}' is not numeric"):
        build_design(parse_formula(f"{response} ~ x + (1 | g)"), _frame())


def test_response_expression() -> None:
    sleep = load("sleepstudy")
    d = build_design(parse_formula("log(Reaction) ~ Days + (Days | Subject)"), sleep)
    np.testing.assert_allclose(d.y, np.log(sleep["Reaction"]), rtol=1e-15)


def test_offset_terms_and_argument() -> None:
    df = _frame()
    d = build_design(parse_formula("y ~ x + offset(log(z)) + (1 | g)"), df, offset="x")
    np.testing.assert_allclose(d.offset, np.log(df["z"]) + df["x"], rtol=1e-15)
    d = build_design(parse_formula("y ~ x + (1 | g)"), df)
    np.testing.assert_array_equal(d.offset, np.zeros(len(df)))


# --------------------------------------------------------------------------------------------
# missing values


def _with_na() -> pd.DataFrame:
    df = _frame()
    df.loc[3, "x"] = np.nan
    df.loc[5, "y"] = np.nan
    df.loc[11, "g"] = None
    df.loc[20, "prop"] = np.nan  # not used by the model below: the row is kept
    return df


def test_na_rows_dropped_and_counted() -> None:
    df = _with_na()
    before = copy.deepcopy(df)
    f = parse_formula("y ~ x + nn(z) + (1 | g)")
    d = build_design(f, df)
    pd.testing.assert_frame_equal(df, before)  # the caller's frame is unchanged
    assert d.n_dropped_na == 3
    assert d.nobs == len(df) - 3
    assert list(d.row_index) == [i for i in df.index if i not in (3, 5, 11)]
    ref = build_design(f, df.drop(index=[3, 5, 11]))
    np.testing.assert_array_equal(d.X, ref.X)
    np.testing.assert_array_equal(d.y, ref.y)
    np.testing.assert_array_equal(d.re_terms[0].group_index, ref.re_terms[0].group_index)
    # standardisation of network inputs is learnt on the rows used
    np.testing.assert_allclose(d.nets[0].X.mean(), 0.0, atol=1e-12)


def test_na_in_weights_drops_row() -> None:
    df = _frame()
    w = df["n"].to_numpy().copy()
    w[7] = np.nan
    d = build_design(parse_formula("prop ~ x"), df, binomial=True, weights=w)
    assert d.n_dropped_na == 1
    assert 7 not in d.row_index


def test_na_action_raise_names_columns() -> None:
    df = _with_na()
    before = copy.deepcopy(df)
    with pytest.raises(DataError, match=r"missing values in column\(s\) \['y', 'x', 'g'\]"):
        build_design(parse_formula("y ~ x + (1 | g)"), df, na_action="raise")
    pd.testing.assert_frame_equal(df, before)
    with pytest.raises(DataError, match="na_action"):
        build_design(parse_formula("y ~ x"), df, na_action="drop")  # type: ignore[arg-type]


def test_all_rows_missing() -> None:
    df = _frame().assign(x=np.nan)
    with pytest.raises(DataError, match="no rows left"):
        build_design(parse_formula("y ~ x"), df)


def test_caller_frame_unchanged() -> None:
    df = load("Contraception")
    before = copy.deepcopy(df)
    build_design(parse_formula("use ~ scale(age) + I(age ** 2) + livch + nn(age, livch) + "
                               "(1 + urban | district)"), df, binomial=True)
    pd.testing.assert_frame_equal(df, before)


# --------------------------------------------------------------------------------------------
# new data

_CONTRA = ("use ~ scale(age) + poly(age, 2) + urban + livch + nn(age, livch) + offset(age / 10) "
           "+ (1 + urban | district)")


@pytest.fixture(scope="module")
def contra() -> tuple[pd.DataFrame, Design]:
    df = load("Contraception")
    return df, build_design(parse_formula(_CONTRA), df, binomial=True)


def test_new_data_reproduces_training_rows(contra: tuple[pd.DataFrame, Design]) -> None:
    df, d = contra
    rows = np.random.default_rng(3).permutation(len(df))[:50]
    nd = d.spec.new_data(df.iloc[rows], with_response=True)
    np.testing.assert_array_equal(nd.X, d.X[rows])
    np.testing.assert_array_equal(nd.offset, d.offset[rows])
    np.testing.assert_array_equal(nd.y, d.y[rows])
    assert len(nd.Zraw) == len(d.re_terms) == 1
    for z, gi, t in zip(nd.Zraw, nd.group_index, d.re_terms, strict=True):
        np.testing.assert_array_equal(z, t.Zraw[rows])
        np.testing.assert_array_equal(gi, t.group_index[rows])
    for nx, net in zip(nd.net_X, d.nets, strict=True):
        np.testing.assert_array_equal(nx, net.X[rows])
    assert nd.new_levels == (False,)
    assert list(nd.row_index) == list(df.index[rows])


def test_new_data_unseen_levels(contra: tuple[pd.DataFrame, Design]) -> None:
    df, d = contra
    sub = df.iloc[:4].copy()
    sub["district"] = ["1", "999", "2", "999"]
    nd = d.spec.new_data(sub)
    levels = list(d.re_terms[0].levels)
    np.testing.assert_array_equal(nd.group_index[0],
                                  [levels.index("1"), -1, levels.index("2"), -1])
    assert nd.new_levels == (True,)
    with pytest.raises(DataError, match=r"grouping factor 'district' has 1 level\(s\) not in "
                                        r"the training data: '999'; use allow_new_levels=True"):
        d.spec.new_data(sub, allow_new_levels=False)


def test_new_data_missing_column(contra: tuple[pd.DataFrame, Design]) -> None:
    df, d = contra
    with pytest.raises(DataError, match=r"missing the column\(s\) \['livch'\]"):
        d.spec.new_data(df.drop(columns="livch"))
    # the response is needed only with with_response=True
    d.spec.new_data(df.drop(columns="use").iloc[:3])
    with pytest.raises(DataError, match=r"\['use'\]"):
        d.spec.new_data(df.drop(columns="use"), with_response=True)


def test_new_data_unseen_fixed_factor_level() -> None:
    df = _frame()
    d = build_design(parse_formula("y ~ x + f + (1 | g)"), df)
    sub = df.iloc[:3].astype({"f": str})
    sub.loc[sub.index[1], "f"] = "extreme"
    with pytest.raises(DataError, match=r"'f' \['extreme'\]"):
        d.spec.new_data(sub)


def test_new_data_missing_values_raise(contra: tuple[pd.DataFrame, Design]) -> None:
    df, d = contra
    sub = df.iloc[:5].copy()
    sub.loc[sub.index[2], "age"] = np.nan
    with pytest.raises(DataError, match=r"newdata has missing values in \['age'\]"):
        d.spec.new_data(sub)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("formula", "data", "kwargs", "message"),
    [
        pytest.param("y ~ x + w + (1 | g)", _frame(), {}, r"\['w'\] in the formula",
                     id="variable-not-in-data"),
        pytest.param("y ~ x + (1 | h)", _frame(), {}, r"\['h'\]", id="group-not-in-data"),
        pytest.param("y ~ x + (1 | g)", _frame().assign(g="one"), {},
                     r"grouping factor 'g' in \(1 \| g\) has 1 level", id="one-level-group"),
        pytest.param("g ~ x", _frame(), {}, "response 'g' is not numeric",
                     id="non-numeric-response"),
        pytest.param("y ~ x", _frame().iloc[:0], {}, "no rows", id="empty-frame"),
        pytest.param("y ~ x", _frame().to_dict(), {}, "must be a pandas DataFrame, got dict",
                     id="not-a-frame"),
        pytest.param("y ~ x", _frame(), {"weights": np.ones(3)},
                     r"weights must have one value per row of data \(40\)", id="weights-length"),
        pytest.param("y ~ x", _frame(), {"weights": "nope"}, "weights='nope' is not a column",
                     id="weights-column"),
        pytest.param("y ~ x", _frame(), {"offset": np.ones(41)}, "offset must have one value",
                     id="offset-length"),
        pytest.param("y ~ nn(x, z)", _frame().assign(z=np.r_[np.inf, np.ones(39)]), {},
                     "nn\\(\\) input 'z' has infinite values", id="nn-infinite"),
        pytest.param("y ~ x + z", _frame().assign(z=np.r_[np.ones(39), -np.inf]), {},
                     "column 'z' has infinite values", id="fixed-infinite"),
        pytest.param("y ~ x + (0 + z | g)", _frame().assign(z=np.r_[np.ones(39), np.inf]), {},
                     "column 'z' has infinite values", id="random-slope-infinite"),
        pytest.param("y ~ x", _frame().assign(y=np.r_[np.inf, np.ones(39)]), {},
                     "response 'y' has infinite values", id="response-infinite"),
        pytest.param("y ~ x", _frame(), {"weights": -_frame()["n"]},
                     "weights must be non-negative", id="negative-weights"),
    ],
)
def test_bad_input(formula: str, data: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        build_design(parse_formula(formula), data, **kwargs)


def test_rank_check_drops_aliased_column() -> None:
    # R: lm(y ~ x + I(2 * x)) reports the coefficient of I(2 * x) as NA (aliased); lme4 drops it
    df = _frame()
    d = build_design(parse_formula("y ~ x + I(2 * x) + (1 | g)"), df)
    assert d.fixed_names == ("(Intercept)", "x")
    assert d.dropped_columns == ("I(2 * x)",)
    assert d.X.shape == (len(df), 2)
    # new data gives the same columns
    assert d.spec.new_data(df).X.shape == (len(df), 2)
    # a full-rank design drops nothing
    assert build_design(parse_formula("y ~ x + z"), df).dropped_columns == ()


def test_fixed_names_are_lme4s() -> None:
    df = _frame()
    d = build_design(parse_formula("y ~ f * x + I(x ** 2) + poly(z, 2)"), df)
    # R: colnames(model.matrix(y ~ f * x + I(x^2) + poly(z, 2), df)); terms sorted by order,
    # so the interaction comes last in R too
    assert d.fixed_names == ("(Intercept)", "fmid", "fhi", "x", "I(x^2)", "poly(z, 2)1",
                             "poly(z, 2)2", "fmid:x", "fhi:x")
    assert build_design(parse_formula("y ~ 0 + f"), df).fixed_names == ("flo", "fmid", "fhi")


@pytest.mark.parametrize(("formula", "names"), [
    ("y ~ (1 | g)", ("(Intercept)",)),  # lme4 keeps the intercept
    ("y ~ x - 1 + (1 | g)", ("x",)),
    ("y ~ -1 + x", ("x",)),
    ("y ~ 0 + x", ("x",)),
    ("y ~ 0 + nn(x)", ()),
])
def test_intercept_handling(formula: str, names: tuple[str, ...]) -> None:
    assert build_design(parse_formula(formula), _frame()).fixed_names == names


def test_design_arrays_are_read_only() -> None:
    d = build_design(parse_formula("y ~ x + nn(z) + (1 | g)"), _frame())
    for a in (d.X, d.y, d.weights, d.offset, d.re_terms[0].Zraw, d.re_terms[0].group_index,
              d.nets[0].X):
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1


# --------------------------------------------------------------------------------------------
# network inputs


def test_net_inputs_standardised_and_factor_codes(contra: tuple[pd.DataFrame, Design]
                                                  ) -> None:
    df, d = contra
    (net,) = d.nets
    assert net.term.variables == ("age", "livch")
    assert net.columns == ["age", "livch"]
    age = net.X[:, 0]
    # standardised on the training data (population sd, ddof = 0)
    np.testing.assert_allclose(age.mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(age.std(), 1.0, rtol=1e-12)
    enc_age, enc_livch = net.encodings
    assert enc_age.kind == "numeric"
    np.testing.assert_allclose(enc_age.center, df["age"].mean(), rtol=1e-12)
    np.testing.assert_allclose(enc_age.scale, df["age"].std(ddof=0), rtol=1e-12)
    # a factor is one column of codes over its levels in R's order (an embedding's rows)
    assert enc_livch.kind == "embedded"
    assert enc_livch.levels == ("0", "1", "2", "3+")
    np.testing.assert_array_equal(net.X[:, 1], df["livch"].cat.codes)


def test_net_factor_one_hot_below_the_embedding_threshold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``EMBED_MIN_LEVELS`` at or above a factor's levels it is one-hot encoded over all
    levels (no reference level), as before embeddings; an unseen level is an error unless
    allowed, then an all-zero row."""
    import ngmm_formula.design as design_module

    monkeypatch.setattr(design_module, "EMBED_MIN_LEVELS", 3)
    df = _frame()
    d = build_design(parse_formula("y ~ x + nn(z, f) + (1 | g)"), df)
    (net,) = d.nets
    assert net.columns == ["z", "f[lo]", "f[mid]", "f[hi]"]
    assert net.encodings[1].kind == "categorical"
    onehot = net.X[:, 1:]
    np.testing.assert_array_equal(onehot.sum(axis=1), np.ones(len(df)))
    np.testing.assert_array_equal(onehot.argmax(axis=1), df["f"].cat.codes)
    new = df.iloc[:2].astype({"f": str})
    new.loc[new.index[0], "f"] = "new"
    with pytest.raises(NewLevelsError, match=r"nn\(\) input 'f' has 1 level"):
        d.spec.new_data(new)
    nd = d.spec.new_data(new, allow_new_input_levels=True)
    np.testing.assert_array_equal(nd.net_X[0][0, 1:], np.zeros(3))
    np.testing.assert_array_equal(nd.net_X[0][1, 1:], onehot[1])


def test_net_encoding_reapplied_to_new_data(contra: tuple[pd.DataFrame, Design]) -> None:
    df, d = contra
    enc_age = d.nets[0].encodings[0]
    new = df.iloc[:3].copy()
    new["age"] = [0.0, 10.0, -10.0]
    nd = d.spec.new_data(new)
    # the training centre and scale, not the new data's
    np.testing.assert_allclose(nd.net_X[0][:, 0],
                               (new["age"] - enc_age.center) / enc_age.scale, rtol=1e-14)
    np.testing.assert_array_equal(nd.net_X[0][:, 1:], d.nets[0].X[:3, 1:])


def test_net_unseen_level_in_new_data() -> None:
    df = _frame()
    d = build_design(parse_formula("y ~ x + nn(f, z)"), df)
    sub = df.iloc[:2].astype({"f": str})
    sub.loc[sub.index[0], "f"] = "new"
    with pytest.raises(NewLevelsError, match=r"nn\(\) input 'f' has 1 level\(s\) not in the "
                                             r"training data: 'new'; use allow_new_levels"):
        d.spec.new_data(sub)
    # allowed: the reserved code len(levels), the network's zero "unseen" row
    enc = d.nets[0].encodings[0]
    nd = d.spec.new_data(sub, allow_new_input_levels=True)
    assert nd.net_X[0][0, 0] == enc.unseen_code == len(enc.levels)
    assert nd.net_X[0][1, 0] == enc.levels.index(str(sub["f"].iloc[1]))


def test_net_constant_input_has_unit_scale() -> None:
    d = build_design(parse_formula("y ~ nn(x, c)"), _frame().assign(c=3.0))
    np.testing.assert_array_equal(d.nets[0].X[:, 1], np.zeros(40))
    assert d.nets[0].encodings[1].scale == 1.0


@pytest.mark.parametrize("expr", ["size - incidence", "incidence", "2 * size / 3 - incidence",
                                  "-size", "size * (incidence + 1)"])
def test_arithmetic_of_numeric_columns_equals_formulaic(expr: str) -> None:
    """The direct evaluation of +, -, *, / of numeric columns (cbind's counts, offsets) gives
    formulaic's I(expr) exactly (the same float64 operations in the same order)."""
    from ngmm_formula.design import _arithmetic, _checked_formula, _formulaic_context

    d = load("cbpp")
    mm = _checked_formula(f"0 + I({expr})", d, None).get_model_matrix(
        d, na_action="ignore", context=_formulaic_context(None))
    np.testing.assert_array_equal(_arithmetic(expr, d, None), np.asarray(mm, float)[:, 0])


@pytest.mark.parametrize("expr", ["log(size)", "herd", "3", "size ** 2"])
def test_other_expressions_are_left_to_formulaic(expr: str) -> None:
    from ngmm_formula.design import _arithmetic

    assert _arithmetic(expr, load("cbpp"), None) is None
