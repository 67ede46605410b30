"""Each named stability rewrite: what it matches, that it is an identity, and what it buys."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy as sp
from sympy.codegen.cfunctions import expm1

from derive.derivation.stepform import Causal, SumLast
from derive.derivation.tensorform import ONE, Inner, MatVec
from derive.quantities import LENGTH, NetTensor
from derive.registry.functions import elementary, sigmoid, softplus
from derive.render.numpy_printer import HELPERS, NumPyBatchPrinter, fold_numbers
from derive.render.stability import (
    REWRITES,
    CausalSoftmax,
    LogSumExp,
    Softmax,
    rewrite,
    stabilize,
)

x = sp.Symbol("x", real=True)
z = NetTensor("z", 2)
s = NetTensor("s", 1, rank=2)       # attention scores

#: rewrite name -> (expression before, expression after); scalar cases use x.
CASES = {
    "sigmoid_from_exp": (sp.exp(x) / (1 + sp.exp(x)), sigmoid(x)),
    "softplus_from_log": (sp.log(1 + sp.exp(x)), softplus(x)),
    "softmax": (sp.exp(z) / Inner(ONE, sp.exp(z)), Softmax(z)),
    "causal_softmax": (Causal(LENGTH) * sp.exp(s) / SumLast(Causal(LENGTH) * sp.exp(s)),
                       CausalSoftmax(s)),
    "log_softmax": (sp.log(Softmax(z)), z - LogSumExp(z)),
    "log_sigmoid": (sp.log(sigmoid(x)), -softplus(-x)),
    "log_one_minus_sigmoid": (sp.log(1 - sigmoid(x)), -softplus(x)),
    "relu_as_max": (sp.Piecewise((x, x > 0), (0, True)), sp.Max(x, 0)),
    "clamp_piecewise_exp": (sp.Piecewise((1, x > 0), (sp.exp(x), True)),
                            sp.Piecewise((1, x > 0), (sp.exp(sp.Min(x, 0)), True))),
    "log_cosh": (sp.log(sp.cosh(x)), sp.Abs(x) + softplus(-2 * sp.Abs(x)) - sp.log(2)),
    "exp_ratio": (sp.exp(x) / (1 + sp.exp(2 * x)), sp.Piecewise(
        (sigmoid(2 * sp.Max(x, 0)) * sp.exp(-sp.Max(x, 0)), x > 0),
        (sigmoid(-2 * sp.Min(x, 0)) * sp.exp(sp.Min(x, 0)), True))),
    "expm1": (sp.exp(x) - 1, expm1(x)),
}


def helpers() -> dict:
    """The helper functions a generated module may define, run from their source."""
    namespace = {"np": np}
    for source in HELPERS.values():
        exec(source, namespace)  # noqa: S102 - the helpers' own source text, as modules hold it
    return namespace


def test_every_rewrite_has_a_case():
    assert set(CASES) == {r.name for r in REWRITES}


@pytest.mark.parametrize("name", list(CASES))
def test_rewrite_gives_the_stable_form(name):
    before, after = CASES[name]
    assert rewrite(name).apply(before) == after


SCALAR = [name for name, (before, _) in CASES.items() if not before.has(NetTensor)]


@pytest.mark.parametrize("name", SCALAR)
def test_rewrite_is_an_identity(name):
    before, after = CASES[name]
    difference = elementary(before - after).rewrite(sp.exp)
    for point in (-7.5, -1.25, -0.5, 0.0, 0.3, 2.0, 9.0):
        value = sp.N(difference.subs(x, sp.Rational(point)), 30)
        assert abs(value) < 1e-25, (name, point)


def test_softmax_rewrites_are_identities_numerically():
    printer = NumPyBatchPrinter()
    namespace = helpers()
    Z2 = np.array([[0.5, -1.0, 2.0], [3.0, 3.0, -4.0]])
    naive = np.exp(Z2) / np.exp(Z2).sum(axis=1, keepdims=True)
    assert printer.doprint(Softmax(z)) == "_softmax(Z2)"
    np.testing.assert_allclose(namespace["_softmax"](Z2), naive, rtol=1e-15)
    np.testing.assert_allclose(namespace["_logsumexp"](Z2),
                               np.log(np.exp(Z2).sum(axis=1, keepdims=True)), rtol=1e-15)


def test_the_causal_softmax_masks_and_normalises_each_row():
    printer = NumPyBatchPrinter()
    printer.length = 3
    assert printer.doprint(CausalSoftmax(s)) == "_causal_softmax(S1)"
    assert printer.doprint(SumLast(s)) == "S1.sum(axis=-1, keepdims=True)"
    assert printer.doprint(Causal(LENGTH)) == "np.tri(3)"
    scores = np.array([[[0.5, -1.0, 2.0], [3.0, 3.0, -4.0], [1e4, -1e4, 0.0]]])
    mask = np.tri(3)
    naive = mask * np.exp(np.minimum(scores, 50)) / (
        mask * np.exp(np.minimum(scores, 50))).sum(axis=-1, keepdims=True)
    with np.errstate(over="raise", invalid="raise"):
        got = helpers()["_causal_softmax"](scores)
    np.testing.assert_allclose(got[0, :2], naive[0, :2], rtol=1e-15)
    np.testing.assert_allclose(got[0, 2], [1.0, 0.0, 0.0])
    assert np.array_equal(np.triu(got[0], 1), np.zeros((3, 3)))


def test_stable_forms_evaluate_where_the_naive_ones_fail():
    """What each rewrite is for, at extreme arguments, with every floating-point error raised."""
    namespace = helpers()
    big = np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        with pytest.raises(FloatingPointError):
            np.log(1 / (1 + np.exp(-big)))                      # naive log sigmoid
        assert np.all(np.isfinite(-namespace["_softplus"](-big)))
        with np.errstate(over="ignore"):      # as the code that calls it runs it
            sigmoid_values = namespace["_sigmoid"](big)
        assert sigmoid_values[0, 0] == 0.0 and sigmoid_values[0, -1] == 1.0
        with pytest.raises(FloatingPointError):
            np.exp(big) / np.exp(big).sum(axis=1, keepdims=True)  # naive softmax
        assert np.isclose(namespace["_softmax"](big).sum(), 1.0)
        assert np.isfinite(namespace["_logsumexp"](big)).all()
        with pytest.raises(FloatingPointError):
            np.where(big > 0, 1.0, np.exp(big * 1e3))          # unclamped ELU' branch
        assert np.isfinite(np.where(big > 0, 1.0, np.exp(np.minimum(big, 0) * 1e3))).all()
    tiny = 1e-12
    assert np.expm1(tiny) == pytest.approx(tiny + tiny**2 / 2, rel=1e-15, abs=0)
    assert (np.exp(tiny) - 1) != pytest.approx(tiny, rel=1e-6, abs=0)   # cancellation without expm1


def test_exp_ratio_normalises_logs_and_combined_exponentials_and_leaves_lone_sums():
    a, y = sp.Symbol("a", real=True), sp.Symbol("y", real=True)
    exp_ratio = rewrite("exp_ratio").apply
    # log(e^x + e^{2x}) = 2x + softplus(-x) for x > 0, x + softplus(x) below
    assert exp_ratio(sp.log(sp.exp(x) + sp.exp(2 * x))) == sp.Piecewise(
        (2 * sp.Max(x, 0) + softplus(-sp.Max(x, 0)), x > 0),
        (sp.Min(x, 0) + softplus(sp.Min(x, 0)), True))
    # e^a e^-y is one exponential of a - y
    combined = exp_ratio((sp.exp(a) * sp.exp(-y) - 1) / (sp.exp(a) * sp.exp(-y) + 1))
    assert isinstance(combined, sp.Piecewise) and combined.args[0].cond == (a - y > 0)
    # a sum alone overflows only where its value does; a clamped form is left alone
    assert exp_ratio(sp.exp(x) + sp.exp(-x)) == sp.exp(x) + sp.exp(-x)
    assert exp_ratio(combined) == combined
    # a positive argument needs no branch
    assert exp_ratio(1 / (1 + sp.exp(-2 * softplus(x)))**2) == \
        1 / (1 + sp.exp(-2 * softplus(x)))**2


def test_stabilize_records_which_rewrites_applied():
    loss = -(sp.Symbol("y") * sp.log(sigmoid(x)) + (1 - sp.Symbol("y")) * sp.log(1 - sigmoid(x)))
    result = stabilize(loss)
    assert result.applied == ("log_sigmoid", "log_one_minus_sigmoid")
    assert not result.expr.has(sp.log)
    assert stabilize(x**2).applied == ()


def test_mish_derivative_is_rewritten_to_softplus_and_sigmoid():
    mish = x * sp.tanh(sp.log(1 + sp.exp(x)))
    result = stabilize(sp.diff(mish, x))
    assert result.expr.has(softplus) and result.expr.has(sigmoid)
    assert not result.expr.has(sp.exp)
    with mpmath.workdps(30):
        for point in (sp.Rational(-3), sp.Rational(1, 5), sp.Rational(4)):
            exact = sp.N(sp.diff(mish, x).subs(x, point), 25)
            assert abs(sp.N(elementary(result.expr).subs(x, point), 25) - exact) < 1e-20


# --- printer details the rewrites rely on ------------------------------------------------------


def test_numbers_print_as_python_floats():
    printer = NumPyBatchPrinter()
    text = printer.doprint(sp.sqrt(2) * z / 2 + sp.Rational(1, 3))
    assert "sqrt" not in text and "0.7071067811865476" in text
    assert fold_numbers(sp.Integer(3)) == 3


def test_matrix_products_are_parenthesized_inside_products():
    printer = NumPyBatchPrinter()
    a1, d2 = NetTensor("a", 1), NetTensor("delta", 2)
    w2 = NetTensor("w", 2, rank=2)
    text = printer.doprint(a1 * (1 - a1) * MatVec(w2, d2, sp.true))
    assert text.endswith("*(delta2 @ W2)")


def test_a_positive_term_prints_first():
    # `Z2 - LSE2`, not `-LSE2 + Z2`: NumPy would negate a whole array first
    printer = NumPyBatchPrinter()
    assert printer.doprint(z - NetTensor("lse", 2)) == "Z2 - LSE2"
    assert printer.doprint(1 - NetTensor("a", 1)) == "1 - A1"


def test_indicator_prints_as_a_mask_and_constant_branches_keep_the_dtype():
    printer = NumPyBatchPrinter()
    z1 = NetTensor("z", 1)
    assert printer.doprint(sp.Piecewise((1, z1 > 0), (0, True))) == "(Z1 > 0)"
    leaky = printer.doprint(sp.Piecewise((1, z1 > 0), (sp.Rational(1, 100), True)))
    assert leaky == "np.where(Z1 > 0, 1, 0.01).astype(Z1.dtype)"


def test_a_negative_product_never_negates_a_mask():
    # NumPy refuses -mask: the signed float factors first, the masks after; a signed mask
    # alone is a bracket of that value, in the array's dtype
    printer = NumPyBatchPrinter()
    a1, a2 = NetTensor("a", 1), NetTensor("a", 2)
    bracket = sp.Piecewise((1, a2 > 0), (0, True))
    arrays = {"A1": np.array([-1.0, 0.5, 2.0], dtype=np.float32),
              "A2": np.array([1.0, -2.0, 3.0], dtype=np.float32), "np": np}
    for expr, expected in ((-bracket * expm1(-a1), -np.expm1(-arrays["A1"]) * [1, 0, 1]),
                           (-3 * bracket, np.array([-3.0, 0.0, -3.0]))):
        code = printer.doprint(expr)
        value = eval(code, arrays)      # derive's own printed code, not user text
        assert value.dtype == np.float32, code
        assert np.allclose(value, expected), code


def test_a_factor_is_pointwise_in_a_tensor_only_through_scalar_functions():
    from derive.derivation.tensorform import Total
    from derive.render.codegen import _pointwise_in
    a1 = NetTensor("a", 1)
    assert _pointwise_in(1 - a1**2, a1)
    assert _pointwise_in(sp.Piecewise((1, a1 > 0), (0, True)) * sigmoid(a1), a1)
    assert _pointwise_in(-expm1(-a1), a1)
    assert not _pointwise_in(1 - Total(a1)**2, a1)          # a sum over the whole array
    assert not _pointwise_in(a1 * NetTensor("z", 1), a1)    # another array
