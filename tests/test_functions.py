"""The registry: every activation's derivative and a-rewrite, every loss, checked independently.

Derivatives are compared with central differences of the activation itself (mpmath, 30
digits), so nothing here trusts sympy.diff or the rewrite search.
"""

from __future__ import annotations

import mpmath
import pytest
import sympy as sp

from derive.derivation.reverse import _piecewise_in_output, activation_derivative
from derive.registry.functions import (
    ACTIVATIONS,
    LOSSES,
    SCALAR_FUNCTIONS,
    A,
    Y,
    Z,
    elementary,
    resolve_activation,
    resolve_loss,
    sigmoid,
    softplus,
    step,
)
from tests.conftest import ELEMENTWISE, make_spec

POINTS = (-3.3, -1.1, -0.25, 0.2, 0.8, 2.6)


def numeric(expr: sp.Expr, symbol: sp.Symbol):
    return sp.lambdify(symbol, elementary(expr), modules="mpmath")


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_activation_derivative_matches_central_differences(name):
    activation = resolve_activation(name)
    derivative = activation_derivative(activation)
    f, d = numeric(activation.expr, Z), numeric(derivative.in_z, Z)
    with mpmath.workdps(30):
        for p in POINTS:
            expected = mpmath.diff(f, mpmath.mpf(p))
            assert abs(d(mpmath.mpf(p)) - expected) < mpmath.mpf(10) ** -20, (name, p)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_rewrite_in_a_is_an_identity(name):
    activation = resolve_activation(name)
    derivative = activation_derivative(activation)
    if derivative.in_a is None:
        assert name in NO_REWRITE  # sigma' stays in z; checked by the test below
        return
    assert not derivative.in_a.has(Z)
    f, d = numeric(activation.expr, Z), numeric(derivative.in_z, Z)
    in_a = numeric(derivative.in_a, A)
    with mpmath.workdps(30):
        for p in (*POINTS, 0):      # 0: the relu family's kink, where σ'(0) is its left side
            assert abs(in_a(f(mpmath.mpf(p))) - d(mpmath.mpf(p))) < mpmath.mpf(10) ** -20


@pytest.mark.parametrize(("name", "params", "expected"), [
    ("sigmoid", None, A * (1 - A)),
    ("tanh", None, 1 - A**2),
    ("softplus", None, 1 - sp.exp(-A)),
    ("identity", None, sp.Integer(1)),
    ("relu", None, sp.Piecewise((1, A > 0), (0, True))),
    ("leaky_relu", {"alpha": 0.2}, sp.Piecewise((1, A > 0), (sp.Rational(1, 5), True))),
    ("elu", {"alpha": 0.5}, sp.Piecewise((1, A > 0), (A + sp.Rational(1, 2), True))),
])
def test_known_rewrites_are_found(name, params, expected):
    in_a = activation_derivative(resolve_activation(name, params)).in_a
    assert in_a == expected if isinstance(expected, sp.Piecewise) else \
        sp.expand(in_a - expected) == 0


NO_REWRITE = ["silu", "gelu"]


@pytest.mark.parametrize("name", NO_REWRITE)
def test_no_rewrite_where_none_is_exact(name):
    # z sigma(z) and z Phi(z) have no closed inverse, nor a piecewise form
    assert activation_derivative(resolve_activation(name)).in_a is None


@pytest.mark.parametrize("f", [
    sp.Piecewise((Z - 1, Z > 0), (0, True)),          # 0 < z < 1 gives a < 0
    sp.Piecewise((Z, Z > 0), (Z + 1, True)),          # -1 < z <= 0 gives a > 0
    sp.Piecewise((Z, Z > 0), (sp.sin(Z), True)),      # not provably <= 0 for z <= 0
    # n(0) <= 0 and n' = 0 wherever it exists, but n = 1 on (-0.9, -0.8]: a jump diff misses
    sp.Piecewise((Z, Z > 0), (-1 + 2 * (step(Z + sp.Rational(9, 10))
                                        - step(Z + sp.Rational(4, 5))), True)),
])
def test_a_piecewise_function_whose_sign_is_not_that_of_z_keeps_its_condition_in_z(f):
    # [z > 0] = [a > 0] holds only where a > 0 exactly when z > 0
    assert _piecewise_in_output(sp.diff(f, Z), f) is None


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu"])
def test_relu_family_derivative_at_zero_takes_the_negative_side(name):
    activation = resolve_activation(name, {"alpha": 0.5} if name != "relu" else None)
    value = activation_derivative(activation).in_z.subs(Z, 0)
    assert value == {"relu": 0, "leaky_relu": sp.Rational(1, 2), "elu": sp.Rational(1, 2)}[name]


def test_parameters_are_exact_rationals():
    activation = resolve_activation("leaky_relu", {"alpha": 0.2})
    assert activation.expr.subs(Z, -1) == sp.Rational(-1, 5)
    assert dict(activation.params) == {"alpha": 0.2}


def test_sigmoid_and_softplus_functions_agree_with_their_elementary_forms():
    assert sp.simplify(elementary(sp.diff(sigmoid(Z), Z)) - sp.diff(1 / (1 + sp.exp(-Z)), Z)) == 0
    assert sp.simplify(elementary(sp.diff(softplus(Z), Z)) - sp.diff(sp.log(1 + sp.exp(Z)), Z)) == 0


@pytest.mark.parametrize(("name", "gradient"), [
    ("mse", A - Y),
    ("cross_entropy", -Y / A),
    ("binary_cross_entropy", (A - Y) / (A * (1 - A))),
])
def test_loss_gradients(name, gradient):
    assert sp.simplify(sp.diff(LOSSES[name].expr, A) - gradient) == 0


def test_custom_functions_are_parsed_not_evaluated():
    mish = resolve_activation("mish", expr="z*tanh(log(1 + exp(z)))")
    assert mish.custom and mish.expr == Z * sp.tanh(sp.log(1 + sp.exp(Z)))
    logcosh = resolve_loss("logcosh", expr="log(cosh(a - y))")
    assert logcosh.expr == sp.log(sp.cosh(A - Y))


def test_every_registry_entry_has_a_description():
    assert all(entry.description for entry in ACTIVATIONS.values())


# --- the function table both user-expression parsers read ----------------------------------


def _call(name: str, argument: str) -> str:
    entry = SCALAR_FUNCTIONS[name]
    return f"{name}({', '.join([argument] * entry.arity)})"


def test_the_parsers_whitelists_are_the_registry_table():
    from derive.check import parser
    from derive.registry import safe_expr

    assert dict(safe_expr.FUNCTIONS) == dict(SCALAR_FUNCTIONS)
    assert parser.FUNCTIONS == {"sigma", *SCALAR_FUNCTIONS, *ACTIVATIONS}


@pytest.mark.parametrize("name", SCALAR_FUNCTIONS)
def test_every_function_of_the_table_is_accepted_by_both_parsers(name):
    from derive.check.formulas import check_formula
    from derive.registry.safe_expr import parse_expression

    entry = SCALAR_FUNCTIONS[name]
    z = parse_expression(_call(name, "z"), {"z": Z})
    assert z == entry.build(*[Z] * entry.arity)
    call = _call(name, "a^L - y")       # check's meaning of it: f(x) - f(x) cancels
    linear = make_spec([2, 2], ["identity"], "mse")     # delta^L = a^L - y
    verdict = check_formula(linear, f"delta^L = (a^L - y) + {call} - {call}", points=1)
    assert verdict.correct, verdict.lines()


@pytest.mark.parametrize("name", ["cos", "sin", "atan", "gamma_fn", "floor", "sign", "Heaviside"])
def test_a_function_outside_the_table_is_refused_by_both_parsers(name):
    from derive.check.parser import FormulaSyntaxError, parse_formula
    from derive.errors import DeriveError
    from derive.registry.safe_expr import parse_expression

    with pytest.raises(DeriveError, match="not allowed"):
        parse_expression(f"{name}(z)", {"z": Z})
    with pytest.raises(FormulaSyntaxError):
        parse_formula(f"delta^L = {name}(a^L)")


@pytest.mark.parametrize("name", [*ELEMENTWISE, *LOSSES])
def test_the_table_covers_the_functions_the_registry_uses(name):
    """Every built-in activation and loss can be written as a custom expression: the
    functions its expression calls are in the table (piecewise ones through step)."""
    expr = LOSSES[name].expr if name in LOSSES else resolve_activation(name).expr
    used = {type(f) for f in expr.atoms(sp.Function)} - {sp.Piecewise}
    assert used <= {entry.build for entry in SCALAR_FUNCTIONS.values()}
