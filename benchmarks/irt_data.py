r"""Synthetic student-proficiency data: a d-dimensional 2PL model with nonlinear covariates.

The model
---------
Student :math:`i = 1..N` has covariates :math:`x_{i1}, x_{i2} \sim N(0, 1)` (independent)
and a latent proficiency :math:`z_i \sim N(0, I_d)`, independent of the covariates. Item
:math:`j = 1..J` has an easiness :math:`\beta_j \sim N(0, 1)` and a loading row
:math:`\lambda_j \in \mathbb{R}^d`. The response of student :math:`i` to item :math:`j` is

.. math::

    \Pr(y_{ij} = 1 \mid z_i) = \operatorname{logit}^{-1}\big(\beta_j + f(x_{i1}, x_{i2})
        + \lambda_j^\top z_i\big),
    \qquad
    f(x_1, x_2) = a \sin(2 x_1) + c\, x_1 x_2 ,

with :math:`a = 0.9, c = 0.6` when ``nonlinear=True`` (the default) and
:math:`f = 0.3 x_1 - 0.2 x_2` otherwise. :math:`E f = 0` in both cases (so the easiness is
the item's intercept), and in the nonlinear case
:math:`\operatorname{Var} f = a^2 (1 - e^{-8}) / 2 + c^2 \approx 0.76` (SD 0.87), comparable
to the latent term's SD :math:`\lVert\lambda_j\rVert \approx 1.1`--1.7. A model linear in
:math:`x_1, x_2` recovers only the projection :math:`2 a e^{-2} x_1 \approx 0.24 x_1` of
:math:`f` (:math:`E[x \sin 2x] = 2 e^{-2}`), i.e. 8% of its variance.

Loadings (the identification of ``rr()``, glmmTMB's): :math:`\Lambda = [\lambda_1; \ldots;
\lambda_J]` is lower triangular with a positive diagonal, so item 1 loads on factor 1 only,
item 2 on factors 1 and 2, and so on. Diagonal entries are drawn from :math:`U(1.0, 1.5)`
(well-identified anchors); the other free entries from :math:`U(0.2, 1.2)` on the factor
the item "belongs to" (items dealt to factors in turn: item j mainly measures factor
:math:`(j - 1) \bmod d + 1`) and :math:`U(0, 0.5)` on the others, so the factors are
distinct but correlated in what the items measure. The fitted loadings of
``y ~ 0 + item + ... + rr(0 + item | id, d = d)`` therefore estimate :math:`\Lambda`
directly, without rotation or sign flips.

Missing by design: each student answers ``items_per_student`` items drawn without
replacement, uniformly among the J items (an incomplete, balanced-in-expectation design;
each item gets about :math:`N \cdot` ``items_per_student`` / J responses).

Also here (numpy only, shared by ``benchmarks/irt.py``, the vignette and the tests):
:func:`split` (held-out responses and students), :func:`conditional_modes` (the oracle's
scores: Newton per student, d-dimensional) and :func:`marginal_loglik` (each student's
marginal log-likelihood, :math:`z \sim N(0, I_d)` integrated by an adaptive product
Gauss--Hermite rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import expit, logsumexp

__all__ = ["Truth", "simulate", "split", "conditional_modes", "marginal_loglik",
           "item_codes"]


@dataclass(frozen=True)
class Truth:
    """The parameters that generated a :func:`simulate` data set.

    Attributes
    ----------
    loadings : (J, d) array
        :math:`\\Lambda`, lower triangular with a positive diagonal (rows in item order).
    easiness : (J,) array
        :math:`\\beta_j`.
    z : (N, d) array
        The students' latent proficiencies, rows in the order of ``students``.
    effect : callable
        :math:`f(x_1, x_2)` on the logit scale (vectorised).
    items, students : list of str
        The level names (item order = the categorical's level order).
    """

    loadings: np.ndarray
    easiness: np.ndarray
    z: np.ndarray
    effect: Callable[[np.ndarray, np.ndarray], np.ndarray]
    items: list[str]
    students: list[str]

    @property
    def d(self) -> int:
        return int(self.loadings.shape[1])

    def eta(self, data: pd.DataFrame, z: np.ndarray | None = None) -> np.ndarray:
        """The true linear predictor of the rows of ``data`` (with ``z``, default the truth's;
        students must be among ``students``)."""
        z = self.z if z is None else z
        s = student_codes(data, self.students)
        j = item_codes(data, self.items)
        return (self.easiness[j] + self.effect(data.x1.to_numpy(float), data.x2.to_numpy(float))
                + np.einsum("nk,nk->n", self.loadings[j], z[s]))

    def offset(self, data: pd.DataFrame) -> np.ndarray:
        """:math:`\\beta_j + f(x_i)`: the true linear predictor without the latent term."""
        j = item_codes(data, self.items)
        return self.easiness[j] + self.effect(data.x1.to_numpy(float), data.x2.to_numpy(float))


def item_codes(data: pd.DataFrame, items: list[str]) -> np.ndarray:
    """Integer position of each row's item in ``items``."""
    return pd.Categorical(data["item"].astype(str), categories=items).codes.astype(np.int64)


def student_codes(data: pd.DataFrame, students: list[str]) -> np.ndarray:
    codes = pd.Categorical(data["id"].astype(str), categories=students).codes
    if (codes < 0).any():
        raise ValueError("rows of students unknown to the truth")
    return codes.astype(np.int64)


def _effect(nonlinear: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if nonlinear:
        return lambda x1, x2: 0.9 * np.sin(2.0 * x1) + 0.6 * x1 * x2
    return lambda x1, x2: 0.3 * x1 - 0.2 * x2


def true_loadings(n_items: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """:math:`\\Lambda` as described in the module docstring."""
    main = np.arange(n_items) % d
    lam = np.where(main[:, None] == np.arange(d)[None, :],
                   rng.uniform(0.2, 1.2, (n_items, d)), rng.uniform(0.0, 0.5, (n_items, d)))
    lam = np.tril(lam)
    k = np.arange(min(d, n_items))
    lam[k, k] = rng.uniform(1.0, 1.5, k.size)
    return lam


def simulate(n_students: int, n_items: int, items_per_student: int, d: int = 2,
             seed: int = 0, nonlinear: bool = True) -> tuple[pd.DataFrame, Truth]:
    """Draw a data set of the model in the module docstring.

    Returns
    -------
    data : DataFrame
        One row per response, sorted by student then item: ``id`` (categorical, ``s000001``
        ...), ``item`` (categorical, levels ``i001``... in item order), ``y`` (0/1 float),
        the student's ``x1``, ``x2``.
    truth : Truth
    """
    if not 1 <= d <= n_items:
        raise ValueError("need 1 <= d <= n_items")
    if not 1 <= items_per_student <= n_items:
        raise ValueError("need 1 <= items_per_student <= n_items")
    rng = np.random.default_rng(seed)
    lam = true_loadings(n_items, d, rng)
    beta = rng.normal(0.0, 1.0, n_items)
    z = rng.standard_normal((n_students, d))
    x = rng.standard_normal((n_students, 2))
    effect = _effect(nonlinear)
    # items_per_student distinct items per student, by chunks (argpartition of uniforms)
    chosen = np.empty((n_students, items_per_student), dtype=np.int64)
    chunk = max(1, 2_000_000 // n_items)
    for a in range(0, n_students, chunk):
        u = rng.random((min(chunk, n_students - a), n_items))
        pick = np.argpartition(u, items_per_student - 1, axis=1)[:, :items_per_student]
        chosen[a:a + len(u)] = np.sort(pick, axis=1)
    s = np.repeat(np.arange(n_students), items_per_student)
    j = chosen.reshape(-1)
    eta = beta[j] + effect(x[s, 0], x[s, 1]) + np.einsum("nk,nk->n", lam[j], z[s])
    y = (rng.random(eta.size) < expit(eta)).astype(float)
    width_s, width_i = len(str(n_students)), len(str(n_items))
    students = [f"s{k + 1:0{width_s}d}" for k in range(n_students)]
    items = [f"i{k + 1:0{width_i}d}" for k in range(n_items)]
    data = pd.DataFrame({
        "id": pd.Categorical.from_codes(s, categories=students),
        "item": pd.Categorical.from_codes(j, categories=items),
        "y": y,
        "x1": x[s, 0],
        "x2": x[s, 1],
    })
    return data, Truth(lam, beta, z, effect, items, students)


def split(data: pd.DataFrame, frac_students: float = 0.1, frac_responses: float = 0.1,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(new_student, held_response)`` over the rows of ``data``.

    ``new_student``: every response of a random ``frac_students`` of the students.
    ``held_response``: a random ``frac_responses`` of the other students' responses; a
    student who would lose all of them keeps their first row for training, and every item
    must keep training responses (checked).
    """
    rng = np.random.default_rng(seed)
    students = data["id"].cat.categories
    new = rng.random(len(students)) < frac_students
    codes = data["id"].cat.codes.to_numpy()
    new_row = new[codes]
    held = (~new_row) & (rng.random(len(data)) < frac_responses)
    kept = np.bincount(codes[~new_row & ~held], minlength=len(students))
    _, first = np.unique(codes, return_index=True)
    lost = (kept == 0) & ~new & (np.bincount(codes, minlength=len(students)) > 0)
    held[first[lost[codes[first]]]] = False
    train_items = data["item"][~new_row & ~held].nunique()
    if train_items != data["item"].nunique():
        raise ValueError("an item lost all its training responses; use more students")
    return new_row, held


# ------------------------------------------------------------------------------------------
# per-student integrals (numpy): oracle scores and marginal likelihoods


def _newton_modes(y: np.ndarray, offset: np.ndarray, lam_rows: np.ndarray, g: np.ndarray,
                  G: int, iters: int = 50, tol: float = 1e-10
                  ) -> tuple[np.ndarray, np.ndarray]:
    r"""Modes :math:`\hat z_g` of :math:`h_g(z) = \sum_{i \in g} \log p(y_i \mid o_i +
    \lambda_{j(i)}^\top z) - \tfrac12 z^\top z` and the negative Hessians there (G, d, d).

    Newton with the step clipped to length 1 (h is strictly concave: Bernoulli-logit plus
    the Gaussian prior)."""
    d = lam_rows.shape[1]
    z = np.zeros((G, d))
    outer = lam_rows[:, :, None] * lam_rows[:, None, :]  # (n, d, d)
    eye = np.eye(d)
    for _ in range(iters):
        eta = offset + np.einsum("nk,nk->n", lam_rows, z[g])
        p = expit(eta)
        grad = -z.copy()
        for k in range(d):
            grad[:, k] += np.bincount(g, (y - p) * lam_rows[:, k], minlength=G)
        H = np.zeros((G, d, d))
        w = p * (1.0 - p)
        for k in range(d):
            for m in range(k, d):
                H[:, k, m] = np.bincount(g, w * outer[:, k, m], minlength=G)
                H[:, m, k] = H[:, k, m]
        H += eye
        step = np.linalg.solve(H, grad[:, :, None])[:, :, 0]
        norm = np.linalg.norm(step, axis=1, keepdims=True)
        step = step / np.maximum(norm, 1.0)
        z += step
        if float(np.max(np.abs(step))) < tol:
            break
    eta = offset + np.einsum("nk,nk->n", lam_rows, z[g])
    w = expit(eta) * (1.0 - expit(eta))
    H = np.zeros((G, d, d))
    for k in range(d):
        for m in range(k, d):
            H[:, k, m] = np.bincount(g, w * outer[:, k, m], minlength=G)
            H[:, m, k] = H[:, k, m]
    return z, H + eye


def conditional_modes(y: np.ndarray, offset: np.ndarray, loadings: np.ndarray,
                      items: np.ndarray, groups: np.ndarray) -> np.ndarray:
    r"""Conditional modes of :math:`z_g \sim N(0, I_d)` per group (student).

    ``offset``: each row's linear predictor without the latent term; ``loadings`` (J, d);
    ``items``: each row's item code 0..J-1; ``groups``: each row's group code 0..G-1.
    With the true offset and loadings this is the oracle's score of :mod:`benchmarks.irt`.
    """
    groups = np.asarray(groups, dtype=np.int64)
    G = int(groups.max()) + 1
    z, _ = _newton_modes(np.asarray(y, float), np.asarray(offset, float),
                         np.asarray(loadings, float)[np.asarray(items)], groups, G)
    return z


def marginal_loglik(y: np.ndarray, offset: np.ndarray, loadings: np.ndarray,
                    items: np.ndarray, groups: np.ndarray, nodes: int = 20,
                    chunk: int = 4_000_000) -> np.ndarray:
    r"""Each group's log marginal likelihood with :math:`z \sim N(0, I_d)` integrated out.

    .. math::

        \log \int \prod_{i \in g} p(y_i \mid o_i + \lambda_{j(i)}^\top z)\,
            \phi_d(z)\, dz

    by the adaptive product Gauss--Hermite rule: ``nodes`` nodes per dimension
    (:math:`\text{nodes}^d` points), centred at the group's mode :math:`\hat z_g` and scaled
    by the Cholesky factor :math:`L_g` of the inverse negative Hessian there,
    :math:`z = \hat z_g + \sqrt2 L_g x`, weights :math:`\prod_k w_k\, e^{x_k^2}` times
    :math:`2^{d/2} |L_g|`. Bernoulli log densities with all constants. Returns an array
    of length G (group codes 0..G-1).
    """
    y = np.asarray(y, float)
    offset = np.asarray(offset, float)
    groups = np.asarray(groups, dtype=np.int64)
    lam_rows = np.asarray(loadings, float)[np.asarray(items)]
    d = lam_rows.shape[1]
    G = int(groups.max()) + 1
    zhat, H = _newton_modes(y, offset, lam_rows, groups, G)
    L = np.linalg.cholesky(np.linalg.inv(H))  # (G, d, d)
    x, w = np.polynomial.hermite.hermgauss(nodes)
    grid = np.stack(np.meshgrid(*([x] * d), indexing="ij"), -1).reshape(-1, d)  # (P, d)
    logw = np.sum(np.stack(np.meshgrid(*([np.log(w)] * d), indexing="ij"), -1)
                  .reshape(-1, d), axis=1) + np.sum(grid**2, axis=1)
    P = grid.shape[0]
    M = sparse.csr_matrix((np.ones(len(y)), (groups, np.arange(len(y)))), shape=(G, len(y)))
    const = 0.5 * d * np.log(2.0) + np.log(np.abs(np.linalg.det(L)))  # (G,)
    terms = np.empty((G, P))
    step = max(1, chunk // max(1, len(y)))
    for a in range(0, P, step):
        pts = grid[a:a + step]  # (p, d)
        zk = zhat[:, None, :] + np.sqrt(2.0) * np.einsum("gkm,pm->gpk", L, pts)  # (G, p, d)
        eta = offset[:, None] + np.einsum("nk,npk->np", lam_rows, zk[groups])  # (n, p)
        ll = y[:, None] * eta - np.logaddexp(0.0, eta)
        lik = M @ ll
        prior = -0.5 * np.sum(zk**2, axis=2) - 0.5 * d * np.log(2.0 * np.pi)
        terms[:, a:a + len(pts)] = lik + prior + logw[None, a:a + len(pts)]
    return const + logsumexp(terms, axis=1)
