"""Index form → tensor form: each pattern, printed in batch form and evaluated against the
index-form sum computed entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from derive.derivation.tensorform import (
    Broadcast,
    Einsum,
    Inner,
    MatVec,
    Outer,
    SumAxes,
    Total,
    to_vector,
)
from derive.errors import DeriveError
from derive.quantities import NetTensor, j, k
from derive.render.numpy_printer import NumPyBatchPrinter

W2 = NetTensor("w", 2, rank=2)
W3 = NetTensor("w", 3, rank=2)
A1 = NetTensor("a", 1)
D2 = NetTensor("delta", 2)
MU = NetTensor("mu", 2, rank=0)


def _values(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"W2": rng.standard_normal((3, 4)), "W3": rng.standard_normal((3, 4)),
            "A1": rng.standard_normal((5, 3)), "delta2": rng.standard_normal((5, 3)),
            "mu2": rng.standard_normal((5, 1)), "np": np}


def _batch(expr: sp.Expr, values: dict) -> np.ndarray:
    return eval(NumPyBatchPrinter().doprint(expr), {}, values)


def test_each_pattern_prints_and_evaluates_as_its_index_form() -> None:
    values = _values(np.random.default_rng(0))
    W, V, a, d = values["W2"], values["W3"], values["A1"], values["delta2"]
    cases = [
        # sum_k w_kj a_k = (Wᵀ a)_j: V @ W per sample
        (sp.Sum(W2.indexed[k, j] * A1.indexed[k], (k, 1, 3)), (j,), MatVec,
         np.einsum("kj,bk->bj", W, a)),
        # a_k * delta_j: an outer product, summed over the samples
        (D2.indexed[j] * A1.indexed[k], (j, k), Outer, d.T @ a),
        # sum_j delta_j a_j: a per-sample scalar
        (sp.Sum(D2.indexed[j] * A1.indexed[j], (j, 1, 3)), (), Inner,
         (d * a).sum(axis=1, keepdims=True)),
        # sum_k w_kj v_kj a_k: no matrix product, an einsum with explicit subscripts
        (sp.Sum(W2.indexed[k, j] * W3.indexed[k, j] * A1.indexed[k], (k, 1, 3)), (j,), Einsum,
         np.einsum("kj,kj,bk->bj", W, V, a)),
    ]
    for expr, free, kind, expected in cases:
        tensor = to_vector(expr, free)
        assert tensor.atoms(kind), (expr, tensor)
        assert np.allclose(_batch(tensor, values), expected), expr


def test_an_einsum_keeps_factors_free_of_the_summed_index_outside() -> None:
    expr = sp.Sum(MU * W2.indexed[k, j] * W3.indexed[k, j] * A1.indexed[k], (k, 1, 3))
    tensor = to_vector(expr, (j,))
    values = _values(np.random.default_rng(1))
    expected = values["mu2"] * np.einsum("kj,kj,bk->bj", values["W2"], values["W3"],
                                         values["A1"])
    assert np.allclose(_batch(tensor, values), expected)


def test_any_other_sum_is_an_elementwise_expression_summed_over_its_axes() -> None:
    values = _values(np.random.default_rng(3))
    W, a, d = values["W2"], values["A1"], values["delta2"]
    i = sp.Symbol("i", integer=True, positive=True)
    cases = [
        # sum_k exp(w_kj a_k): no product of entries; the (B, j, k) array summed over k
        (sp.Sum(sp.exp(W2.indexed[k, j] * A1.indexed[k]), (k, 1, 3)), (j,), SumAxes,
         np.exp(W.T[None, :, :] * a[:, None, :]).sum(axis=2)),
        # (a_k - w_kj)² for free j, k: a per-sample matrix, each tensor placed on its axes
        ((A1.indexed[k] - W2.indexed[k, j]) ** 2, (j, k), Broadcast,
         (a[:, None, :] - W.T[None, :, :]) ** 2),
        # delta_j a_k a_i: three free indices, an einsum
        (D2.indexed[j] * A1.indexed[k] * A1.indexed[i], (j, k, i), Einsum,
         np.einsum("bj,bk,bi->bjki", d, a, a)),
    ]
    for expr, free, kind, expected in cases:
        tensor = to_vector(expr, free)
        assert tensor.atoms(kind), (expr, tensor)
        assert np.allclose(_batch(tensor, values), expected), expr


def test_an_index_pattern_without_tensor_form_is_a_clear_error() -> None:
    # a per-sample scalar among the axes of an elementwise sum
    with pytest.raises(DeriveError, match="no tensor form"):
        to_vector(sp.Sum(sp.exp(MU * W2.indexed[k, j] * A1.indexed[k]), (k, 1, 3)), (j,))


def test_a_sum_over_every_entry_of_a_parameter_is_a_total() -> None:
    i, m = sp.symbols("i m", integer=True, positive=True)
    w = W2.indexed[i, m]
    penalty = sp.Rational(1, 2) * sp.Sum(w ** 2, (i, 1, 3), (m, 1, 4)) + sp.Sum(
        sp.Abs(w), (i, 1, 3), (m, 1, 4))
    tensor = to_vector(penalty, ())
    assert tensor.atoms(Total)
    values = _values(np.random.default_rng(2))
    W = values["W2"]
    assert np.isclose(_batch(tensor, values), 0.5 * np.sum(W ** 2) + np.sum(np.abs(W)))
