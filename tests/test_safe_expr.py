"""Tests for the whitelist expression parser used by custom activations and losses (stage 1)."""

from __future__ import annotations

import time

import pytest
import sympy as sp

from derive.errors import DeriveError
from derive.registry.functions import A, Y, Z
from derive.registry.safe_expr import FUNCTIONS, parse_expression

ACTIVATION_VARS = {"z": Z}
LOSS_VARS = {"a": A, "y": Y}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("z", Z),
        ("z*tanh(log(1 + exp(z)))", Z * sp.tanh(sp.log(1 + sp.exp(Z)))),
        ("z^2", Z**2),
        ("z**2 - 3*z + 1", Z**2 - 3 * Z + 1),
        ("-z", -Z),
        ("+z", Z),
        ("z / (1 + abs(z))", Z / (1 + sp.Abs(Z))),
        ("Abs(z)", sp.Abs(Z)),
        ("max(z, 0)", sp.Max(Z, 0)),
        ("Min(z, 0, -1)", sp.Min(Z, -1)),
        ("sqrt(z)", sp.sqrt(Z)),
        ("z * (1 + erf(z / sqrt(2))) / 2", Z * (1 + sp.erf(Z / sp.sqrt(2))) / 2),
        ("sinh(z) + cosh(z)", sp.sinh(Z) + sp.cosh(Z)),
        ("pi * e", sp.pi * sp.E),
        ("0.1 * z", sp.Rational(1, 10) * Z),  # exact: 1/10, not the binary float 0.1
        ("1e-3", sp.Rational(1, 1000)),
        ("2**10", sp.Integer(1024)),
        ("1_000", sp.Integer(1000)),
        ("  z  ", Z),
    ],
)
def test_accepted_activation_expressions(text: str, expected: sp.Expr) -> None:
    assert parse_expression(text, ACTIVATION_VARS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("log(cosh(a - y))", sp.log(sp.cosh(A - Y))),
        ("(a - y)**2 / 2", (A - Y) ** 2 / 2),
        ("-y*log(a) - (1 - y)*log(1 - a)", -Y * sp.log(A) - (1 - Y) * sp.log(1 - A)),
    ],
)
def test_accepted_loss_expressions(text: str, expected: sp.Expr) -> None:
    assert parse_expression(text, LOSS_VARS) == expected


def test_variables_are_the_given_symbols() -> None:
    expr = parse_expression("z + 1", ACTIVATION_VARS)
    assert expr.free_symbols == {Z}
    assert next(iter(expr.free_symbols)).is_real


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "z.real",
        "().__class__.__bases__[0]",
        "lambda z: z",
        "(lambda: 1)()",
        "[z for z in range(3)]",
        "{z for z in (1, 2)}",
        "sum(z for z in (1, 2))",
        "[z][0]",
        "z[0]",
        "'z'",
        "b'z'",
        "f'{z}'",
        "exp(z=1)",
        "exp(*[z])",
        "foo(z)",
        "eval('z')",
        "open('x')",
        "sympify('z')",
        "Symbol('z')",
        "exp",
        "x",
        "w",
        "a",
        "y",
        "True",
        "None",
        "1j",
        "...",
        "z if z > 0 else 0",
        "z > 0",
        "z and 1",
        "not z",
        "~z",
        "z // 2",
        "z % 2",
        "z @ z",
        "z << 1",
        "(z := 1)",
        "[z]",
        "(z, z)",
        "{'a': z}",
        "exp(z, z)",
        "log()",
        "max(z)",
        "z +",
        "",
        "z; z",
        "1e999",
        "z" + " + z" * 1000,  # over the length limit
    ],
)
def test_rejected_activation_expressions(text: str) -> None:
    with pytest.raises(DeriveError):
        parse_expression(text, ACTIVATION_VARS)


@pytest.mark.parametrize("text", ["z", "a * z", "x - y", "a - t"])
def test_loss_variables_are_a_and_y_only(text: str) -> None:
    with pytest.raises(DeriveError, match="variables \\(a, y\\)"):
        parse_expression(text, LOSS_VARS)


@pytest.mark.parametrize(
    "text", ["2**2**2**30", "10**10**10", "9**9**9", "z**(10**10)", "(10**300)**2", "e**1000"]
)
def test_huge_powers_are_refused_fast(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises(DeriveError, match="too large"):
        parse_expression(text, ACTIVATION_VARS)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("text", ["-" * 1990 + "z", "z" + "**z" * 600])
def test_deep_nesting_is_a_derive_error(text: str) -> None:
    with pytest.raises(DeriveError):
        parse_expression(text, ACTIVATION_VARS)


def test_non_strings_are_refused() -> None:
    with pytest.raises(DeriveError, match="must be a string"):
        parse_expression(3, ACTIVATION_VARS)  # type: ignore[arg-type]


def test_message_says_where_and_what_is_allowed() -> None:
    with pytest.raises(DeriveError) as info:
        parse_expression("z + foo(z)", ACTIVATION_VARS)
    message = str(info.value)
    assert "'foo'" in message and "column 5" in message
    assert "variables (z)" in message
    assert all(name in message for name in FUNCTIONS)


@pytest.mark.parametrize("text", ["z*log(0)", "z/0", "sqrt(-1)*z", "z + log(-1)", "0*z/0"])
def test_constants_without_a_finite_real_value_are_refused(text: str) -> None:
    with pytest.raises(DeriveError, match="not a finite real number"):
        parse_expression(text, {"z": sp.Symbol("z")})
