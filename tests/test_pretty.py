"""The terminal printer writes math, not SymPy's spelling: [z > 0], z², √x, 1e-5."""

from __future__ import annotations

import sympy as sp

from derive.quantities import NetTensor
from derive.registry.functions import ACTIVATIONS, Z
from derive.render.pretty import pretty

z = NetTensor("z", 1)
x = sp.Symbol("x", real=True)


def test_an_indicator_prints_as_an_iverson_bracket_and_other_piecewise_as_cases():
    assert pretty(sp.Piecewise((1, z > 0), (0, True))) == "[z¹ > 0]"
    assert pretty(sp.Piecewise((z, z > 0), (z / 100, True))) == "{z¹ if z¹ > 0, z¹/100 otherwise}"


def test_powers_print_as_superscripts_roots_as_radicals():
    assert pretty(x**2) == "x²"
    assert pretty(z**2) == "(z¹)²"              # not z¹², which reads as z to the 12
    assert pretty((z + 1) ** -2) == "(z¹ + 1)⁻²"
    assert pretty(sp.sqrt(x + 1)) == "√(x + 1)"
    assert pretty(1 / sp.sqrt(x)) == "1/√x"
    assert pretty((x + 1) ** sp.Rational(3, 2)) == "(x + 1)^(3/2)"


def test_a_small_constant_prints_in_scientific_notation():
    assert pretty(x + sp.Rational(1, 100000)) == "x + 1e-5"
    assert pretty(sp.Rational(1, 100000) * x) == "1e-5·x"
    assert pretty(x / 100) == "x/100"


def test_no_activation_or_its_derivative_prints_sympy_spelling():
    for entry in ACTIVATIONS.values():
        expr = entry.build(*(sp.Rational(1, 100) for _ in entry.params))
        if expr is None:
            continue
        for form in (expr, sp.diff(expr, Z)):
            text = pretty(form)
            assert "Piecewise" not in text and "**" not in text and "sqrt" not in text, text
