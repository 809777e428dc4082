"""Wide factor designs held as sparse rows (:class:`~ngmm_formula.design.SparseRows`).

An item-response model's fixed part ``0 + item + x1 + x2`` over hundreds of items is a matrix
with three non-zeros per row; :func:`~ngmm_formula.design.wide_and_sparse` designs keep it as
(value, column) pairs, and every consumer (the standardisation, ``X beta`` and its gradient,
the GLM start, BHHH's scores, the separation and scale checks, prediction) works from the
non-zeros. The tests compare each piece, and whole fits, with the dense path the same model
takes when the threshold is raised out of reach (``WIDE_SPARSE_MIN_COLUMNS``): the same
function is maximised, so the two fits differ only by where each optimiser stops.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import ngmm_formula.design as design_module
from ngmm_formula import ngmm
from ngmm_formula.api import prepare
from ngmm_formula.checks import separating_columns
from ngmm_formula.design import SparseRows, build_design, matrix_columns
from ngmm_formula.errors import ScaleWarning, SeparationWarning
from ngmm_formula.formula import parse_formula
from ngmm_formula.model import SparseRowsTensor, Standardisation, matvec
from ngmm_formula.scaling import column_scale_problems, sparse_column_scale_problems

ITEMS = 60


def responses(n_students: int = 300, per_student: int = 12, seed: int = 1) -> pd.DataFrame:
    """Binary responses of students (random intercepts, SD 1) to ``per_student`` of
    :data:`ITEMS` items each, with two student covariates."""
    rng = np.random.default_rng(seed)
    easy = rng.normal(0.0, 1.0, ITEMS)
    z = rng.standard_normal(n_students)
    x1, x2 = rng.standard_normal(n_students), rng.uniform(-1, 1, n_students)
    student = np.repeat(np.arange(n_students), per_student)
    item = np.concatenate([rng.choice(ITEMS, per_student, replace=False)
                           for _ in range(n_students)])
    eta = easy[item] + z[student] + 0.5 * x1[student] - 0.4 * x2[student]
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-eta)))
    return pd.DataFrame({
        "id": pd.Categorical([f"s{s:03d}" for s in student]),
        "item": pd.Categorical([f"i{i:02d}" for i in item],
                               categories=[f"i{i:02d}" for i in range(ITEMS)]),
        "x1": x1[student], "x2": x2[student], "y": y.astype(float)})


def dense_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every design dense (the path of a model below the threshold)."""
    monkeypatch.setattr(design_module, "WIDE_SPARSE_MIN_COLUMNS", 10**9)


def test_a_wide_factor_design_is_held_as_sparse_rows_and_a_narrow_one_stays_dense():
    df = responses()
    wide = build_design(parse_formula("y ~ 0 + item + x1 + x2 + (1 | id)"), df)
    assert isinstance(wide.X, SparseRows)
    assert wide.X.values.shape == (len(df), 3)  # item, x1, x2: never n x 62
    assert wide.fixed_names[:2] == ("itemi00", "itemi01") and wide.X.shape == (len(df), 62)
    narrow = build_design(parse_formula("y ~ x1 + x2 + (1 | id)"), df)
    assert isinstance(narrow.X, np.ndarray)
    # an intercept makes the first item the reference level, dropped as R drops it
    ref = build_design(parse_formula("y ~ 1 + item + x1 + (1 | id)"), df)
    assert isinstance(ref.X, SparseRows) and "itemi00" not in ref.fixed_names


def test_sparse_rows_equal_the_dense_matrix_of_the_same_design(monkeypatch):
    df = responses()
    form = parse_formula("y ~ 1 + item + x1 + x2 + (1 | id)")
    sparse = build_design(form, df)
    dense_path(monkeypatch)
    dense = build_design(form, df)
    assert isinstance(dense.X, np.ndarray) and sparse.fixed_names == dense.fixed_names
    # the same numbers, placed: exact (copies of the same floats)
    np.testing.assert_array_equal(sparse.X.dense(), dense.X)
    cols = list(matrix_columns(sparse.X))
    np.testing.assert_array_equal(np.column_stack(cols), dense.X)
    beta = np.random.default_rng(0).standard_normal(dense.X.shape[1])
    # sums of the same products in another order: rounding of 64-bit sums of 4 terms
    np.testing.assert_allclose(matvec(sparse.X, beta), dense.X @ beta, rtol=0, atol=1e-12)
    # new data is encoded the same way, sparse
    nd = sparse.spec.new_data(df.iloc[:50])
    assert isinstance(nd.X, SparseRows)
    np.testing.assert_array_equal(nd.X.dense(), dense.X[:50])


def test_sparse_standardisation_scales_as_the_dense_one_without_centring():
    df = responses()
    d = build_design(parse_formula("y ~ 0 + item + x1 + x2 + (1 | id)"), df)
    A_sparse = Standardisation.of_sparse(d.X).A
    # no intercept: the dense standardisation is diagonal too; two-pass moments of the same
    # values in another summation order agree to rounding (1e-12 relative)
    A_dense = Standardisation.of(d.X.dense()).A
    np.testing.assert_allclose(A_sparse, A_dense, rtol=1e-12, atol=0)


def test_the_gradient_of_a_sparse_matvec_is_x_transpose_g():
    rng = np.random.default_rng(2)
    n, p, m = 40, 7, 3
    cols = np.stack([rng.choice(p, m, replace=False) for _ in range(n)])
    X = SparseRowsTensor(torch.as_tensor(rng.standard_normal((n, m))),
                         torch.as_tensor(cols, dtype=torch.long), p)
    beta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    g = torch.as_tensor(rng.standard_normal(n))
    (matvec(X, beta) * g).sum().backward()
    # float64 sums of at most n = 40 products: 1e-13
    torch.testing.assert_close(beta.grad, X.dense().T @ g, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda b: matvec(X, b), (beta.detach().requires_grad_(),))


def test_scale_problems_from_the_non_zeros_equal_the_dense_ones():
    rng = np.random.default_rng(3)
    n, p = 500, 60
    d = SparseRows.of(np.where(rng.uniform(size=(n, p)) < 0.05, rng.standard_normal((n, p)),
                               0.0))
    dense = d.dense()
    dense[:, 5] *= 1e9  # an extreme column
    dense[:, 7] = 3.0   # a constant, full column (not extreme: constant)
    dense[:, 9] = 0.0   # an empty column
    names = [f"c{j}" for j in range(p)]
    sparse = SparseRows.of(dense)
    got = sparse_column_scale_problems(sparse.values, sparse.columns, names)
    assert got == column_scale_problems(dense, names) == ([], ["c5"])


def test_separation_is_found_on_sparse_rows_as_on_the_dense_matrix():
    df = responses()
    df.loc[df.item == "i07", "y"] = 1.0  # every answer to item 7 right
    d = build_design(parse_formula("y ~ 0 + item + x1 + x2 + (1 | id)"), df)
    signs = np.where(d.y > 0.5, 1.0, -1.0)
    found_sparse = separating_columns(d.X.csr(), signs)
    found_dense = separating_columns(d.X.dense(), signs)
    assert found_sparse == found_dense == [d.fixed_names.index("itemi07")]
    with pytest.warns(SeparationWarning, match="itemi07"):
        prepare("y ~ 0 + item + x1 + x2 + (1 | id)", df, "binomial")


def test_an_extreme_fixed_column_in_a_sparse_design_warns():
    df = responses()
    df["x1"] = df["x1"] * 1e12
    with pytest.warns(ScaleWarning, match="x1"):
        build_design(parse_formula("y ~ 0 + item + x1 + x2 + (1 | id)"), df)


@pytest.mark.parametrize("formula", [
    "y ~ 0 + item + x1 + x2 + (1 | id)",
    "y ~ 1 + item + x1 + (1 | id)",
    "y ~ 0 + item + x1 + x2 + rr(0 + item | id, d = 1)",
])
def test_a_sparse_fit_equals_the_dense_fit(formula, monkeypatch):
    df = responses()
    held = df.sample(100, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = ngmm(formula, df, "binomial")
        assert isinstance(sparse.design.X, SparseRows)
        dense_path(monkeypatch)
        dense = ngmm(formula, df, "binomial")
        assert isinstance(dense.design.X, np.ndarray)
    # both maximise the same log-likelihood to a gradient of about 1e-6 (in standardised
    # coordinates of unit scale): the maxima differ by O(gradient^2 / curvature), far below
    # 1e-6, and the estimates by O(gradient / curvature), below 1e-4 (measured on this
    # machine: logLik within 1.3e-9, estimates 8.4e-6, both for the model with an intercept,
    # whose sparse standardisation does not centre and so takes another optimiser path)
    assert abs(sparse.loglik - dense.loglik) < 1e-6
    np.testing.assert_allclose(sparse.fixef.to_numpy(), dense.fixef.to_numpy(), atol=1e-4)
    # standard errors from Hessians at points 1e-5 apart: relative 1e-3 (measured 2.7e-6)
    np.testing.assert_allclose(np.sqrt(np.diag(sparse.vcov)), np.sqrt(np.diag(dense.vcov)),
                               rtol=1e-3)
    np.testing.assert_allclose(sparse.predict(held, type="response"),
                               dense.predict(held, type="response"), atol=1e-5)
    np.testing.assert_allclose(sparse.predict_se(held, re_form="~0"),
                               dense.predict_se(held, re_form="~0"), rtol=1e-3)


def test_the_separation_check_of_a_wide_factor_design_stays_on_few_rows(monkeypatch):
    """With 2,000 random rows of 60,000 most of 400 items have a handful of rows, and the
    programme kept finding directions that other rows violate until it took all rows (a
    dense 810,000 x 503 programme: 23 GB and 68 s at 10^6 responses). With rows of every
    column in the first programme it proves non-separation from a small subset (without
    them, ROWS_PER_COLUMN = 0, this test fails: the programme reaches all rows)."""
    import ngmm_formula.checks as checks

    rng = np.random.default_rng(4)
    n, items = 60_000, 400
    item = rng.integers(0, items, n)
    x = rng.standard_normal(n)
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-(rng.normal(0, 1, items)[item] + 0.5 * x))))
    X = sp.hstack([sp.csr_matrix((np.ones(n), (np.arange(n), item)), shape=(n, items)),
                   sp.csr_matrix(x[:, None])]).tocsr()
    used: list[int] = []
    solve = checks._solve

    def counting(A_ub, A_eq, total):
        used.append(A_ub.shape[0] + A_eq.shape[0])
        return solve(A_ub, A_eq, total)

    monkeypatch.setattr(checks, "_solve", counting)
    assert separating_columns(X, np.where(y > 0, 1.0, -1.0)) is None
    assert max(used) < n // 4


def test_a_sparse_fit_round_trips_through_its_file(tmp_path):
    from ngmm_formula import load

    df = responses()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ngmm("y ~ 0 + item + x1 + x2 + (1 | id)", df, "binomial")
    fit.save(tmp_path / "sparse.ngmm")
    back = load(tmp_path / "sparse.ngmm")
    assert isinstance(back.design.X, SparseRows)
    np.testing.assert_array_equal(back.predict(df), fit.predict(df))


def test_a_gaussian_model_of_a_wide_factor_design_takes_the_dense_solver(monkeypatch):
    """lmer's profiled objective works on the dense cross-products (``model.dense_fixed``):
    the same REML fit as the dense path's, to rounding (1e-8 relative on the criterion;
    both solve the same profiled problem from cross-products of the same numbers, the
    densified matrix being the dense one's; measured: equal, estimates within 7e-16)."""
    df = responses()
    rng = np.random.default_rng(5)
    student = rng.normal(0, 1, df["id"].cat.categories.size)[df["id"].cat.codes]
    df["y"] = df["y"] + df["x1"] + student + rng.normal(0, 1, len(df))
    sparse = ngmm("y ~ 0 + item + x1 + (1 | id)", df)
    assert isinstance(sparse.design.X, SparseRows)
    dense_path(monkeypatch)
    dense = ngmm("y ~ 0 + item + x1 + (1 | id)", df)
    assert sparse.loglik == pytest.approx(dense.loglik, rel=1e-8)
    np.testing.assert_allclose(sparse.fixef.to_numpy(), dense.fixef.to_numpy(), atol=1e-6)
