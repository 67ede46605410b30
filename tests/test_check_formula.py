"""derive check FORMULA: correct and incorrect formulas, syntaxes, errors, malicious input."""

from __future__ import annotations

import builtins
import time

import pytest
import sympy

from derive.check.formulas import check_formula
from derive.check.parser import FormulaSyntaxError, parse_formula
from derive.cli.main import main
from derive.errors import DeriveError
from tests.conftest import ELEMENTWISE, make_spec

HIDDEN_DELTA = "delta^l = ((W^{l+1})^T delta^{l+1}) * sigma'(z^l)"


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_hidden_delta_for_every_activation(activation):
    spec = make_spec([2, 2, 2], [activation, "sigmoid"], "mse")
    right = check_formula(spec, HIDDEN_DELTA, points=4)
    assert right.correct, "\n".join(right.lines())
    # leaving sigma' out is wrong for every activation but the identity (sigma' = 1)
    missing = check_formula(spec, "delta^l = (W^{l+1})^T delta^{l+1}", points=4)
    assert missing.correct == (activation == "identity"), "\n".join(missing.lines())


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_activation_derivative_on_the_left(activation):
    spec = make_spec([2, 2, 1], [activation, "identity"], "mse")
    verdict = check_formula(spec, "sigma'(z^1) = sigma'(z^1) + 0*a^1", points=3)
    assert verdict.correct
    if activation not in ("identity",):
        wrong = check_formula(spec, "sigma'(z^1) = sigma(z^1)", points=6)
        assert not wrong.correct


@pytest.mark.parametrize(("output", "loss", "right", "wrong"), [
    ("sigmoid", "mse", "delta^L = (a^L - y) * a^L * (1 - a^L)", "delta^L = a^L - y"),
    ("tanh", "mse", "delta^L = (a^L - y) * (1 - a^L^2)", "delta^L = (a^L - y) * a^L*(1 - a^L)"),
    ("identity", "mse", "delta^L = a^L - y", "delta^L = y - a^L"),
    ("sigmoid", "binary_cross_entropy", "delta^L = a^L - y",
     "delta^L = (a^L - y) * a^L * (1 - a^L)"),
    ("softmax", "cross_entropy", "delta^L = a^L - y", "delta^L = -y / a^L"),
    ("softmax", "mse", "delta^L_j = a^L_j (a^L_j - y_j) - a^L_j sum_i a^L_i (a^L_i - y_i)",
     "delta^L = (a^L - y) * a^L * (1 - a^L)"),
])
def test_output_error_for_each_loss(output, loss, right, wrong):
    spec = make_spec([2, 3, 3], ["tanh", output], loss)
    good = check_formula(spec, right, points=5)
    assert good.correct, "\n".join(good.lines())
    bad = check_formula(spec, wrong, points=5)
    assert not bad.correct
    assert bad.counterexample is not None
    assert bad.counterexample.user_value != bad.counterexample.correct_value
    text = "\n".join(bad.lines())
    assert "the derived formula:" in text and "your formula gives" in text


def test_softmax_cross_entropy_mentions_the_assumption():
    verdict = check_formula("digits", "delta^L = a^L - y")
    assert verdict.correct
    text = "\n".join(verdict.lines())
    assert "sum_j y_j = 1" in text and "random targets satisfy it" in text
    # a form that needs the assumption to agree is found correct only numerically
    numeric = check_formula("digits", "delta^L_j = a^L_j * sum_i y_i - y_j", points=5)
    assert numeric.correct and "numeric agreement" in numeric.method
    assert "sum_j y_j = 1" in "\n".join(numeric.lines())


def test_issue_examples_and_exit_codes(capsys):
    assert main(["check", "xor", "delta^L = (a^L - y) * a^L * (1 - a^L)"]) == 0
    assert main(["check", "xor", "delta^L = a^L - y"]) == 1
    out = capsys.readouterr().out
    assert "INCORRECT" in out and "W^1 = [[" in out and "delta^L = a^L*(1 - a^L)*(a^L - y)" in out
    assert main(["check", "bce", "delta^L = a^L - y"]) == 0
    assert main(["check", "xor", "dC/dw^2_jk = delta^2_j * a^1_k"]) == 0
    out = capsys.readouterr().out
    assert "symbolic identity for every layer size" in out


@pytest.mark.parametrize("formula", [
    r"\delta^L_j = (a^L_j - y_j)\sigma'(z^L_j)",
    r"\delta^{L}_{j} = \left(a^{L}_{j} - y_{j}\right) \sigma^{\prime}\left(z^{L}_{j}\right)",
    r"\frac{\partial C}{\partial w^l_{jk}} = a^{l-1}_k \delta^l_j",
    r"\frac{\partial C}{\partial b^{l}_{j}} = \delta^{l}_{j}",
    r"\delta^l_j = \sum_{k=1}^{n_{l+1}} w^{l+1}_{kj} \delta^{l+1}_k \, \sigma'(z^l_j)",
    (r"\boldsymbol{\delta}^{l} = \left((W^{l+1})^{\top} \boldsymbol{\delta}^{l+1}\right) "
     r"\odot \sigma'(z^{l})"),
    "δ¹ⱼ = (1 - a¹ⱼ)*a¹ⱼ*Σₖ (δ²ₖ*w²ₖⱼ)",
    "δ² = a² ⊙ (1 - a²) ⊙ (a² - y)",
    "∂C/∂w²ⱼₖ = a¹ₖ δ²ⱼ",
    "delta^l_j = sum_k w^{l+1}_kj delta^{l+1}_k sigma'(z^l_j)",
    "dC/dW^l = delta^l (a^{l-1})^T",
    "dC/da^L = a^L - y",
    "sigma'(z^l) = a^l (1 - a^l)",
    "sigmoid'(z^l) = sigmoid(z^l) * (1 - sigmoid(z^l))",
])
def test_correct_in_every_syntax(formula):
    verdict = check_formula("xor", formula, points=4)
    assert verdict.correct, "\n".join(verdict.lines())


@pytest.mark.parametrize("formula", [
    r"\delta^L_j = (a^L_j - y_j)",
    r"\frac{\partial C}{\partial w^l_{jk}} = a^{l}_k \delta^l_j",
    "sigma'(z^l) = z^l (1 - z^l)",
    "dC/dw^l_jk = a^{l-1}_k",
    "delta^1 = a^1 * (1 - a^1) * (W^2)^T (a^2 - y)",
])
def test_incorrect_in_every_syntax(formula):
    verdict = check_formula("xor", formula, points=4)
    assert not verdict.correct


def test_latex_input_gets_the_derived_formula_in_latex():
    verdict = check_formula("xor", r"\delta^L_j = a^L_j - y_j", points=3)
    assert not verdict.correct
    assert any("\\" in line for line in verdict.derived)


def test_the_printed_derived_formula_checks_back_as_correct():
    for spec in ("xor", "bce", "digits"):
        for formula in ("delta^L = 0", "delta^L_j = 0", "delta^l = 0", "dC/dw^l_jk = 0",
                        "dC/db^l = 0"):
            verdict = check_formula(spec, formula, points=2)
            assert not verdict.correct
            printed = verdict.derived[0]
            again = check_formula(spec, printed, points=3)
            assert again.correct, (spec, printed, again.lines())


def test_ill_formed_formulas_are_incorrect_with_a_reason():
    transposed = check_formula("xor", "delta^l = (W^{l+1} delta^{l+1}) * sigma'(z^l)")
    assert not transposed.correct
    assert "dimension mismatch" in transposed.reason and "transpose" in transposed.reason
    swapped = check_formula("xor", "dC/dw^l_jk = delta^l_k a^{l-1}_j")
    assert not swapped.correct and "index" in swapped.reason
    outer = check_formula("xor", "dC/dw^l = a^{l-1} (delta^l)^T")
    assert not outer.correct and "matrix" in outer.reason
    assert main(["check", "xor", "delta^l = (W^{l+1} delta^{l+1}) * sigma'(z^l)"]) == 1


def test_generic_layer_runs_over_every_hidden_layer():
    verdict = check_formula("deep_tanh", "delta^l = (W^{l+1})^T delta^{l+1} * (1 - a^l^2)",
                            points=3)
    assert verdict.correct and verdict.layers == tuple(range(1, 9))
    wrong = check_formula("deep_tanh", "delta^l = (W^{l+1})^T delta^{l+1} * (1 - a^l)",
                          points=3)
    assert not wrong.correct


@pytest.mark.parametrize(("formula", "column"), [
    ("delta^L = (a^L - y", 19),
    ("delta^L = a^L - - ", 19),
    ("delta^L a^L - y", 16),
    ("delta^L = a^L ! y", 15),
    ("delta^L = foo(a^L)", 11),
    ("delta = a^L - y", 7),
    ("delta^L = a^L - y = 1", 19),
    ("dC/dq^2 = 1", 4),
    ("delta^L = a^{l+}", 16),
    ("delta^L = sum a^L", 15),
])
def test_unparsable_input_exit_2_with_the_column(formula, column, capsys):
    with pytest.raises(FormulaSyntaxError) as info:
        check_formula("xor", formula)
    assert info.value.column == column, str(info.value)
    assert main(["check", "xor", formula]) == 2
    err = capsys.readouterr().err
    assert f"at column {column}" in err and "Traceback" not in err


@pytest.mark.parametrize("formula", [
    "__import__('os').system('echo hacked')",
    "delta^L = __import__('os').system('echo hacked')",
    "delta^L = ().__class__.__bases__[0].__subclasses__()",
    "delta^L = a^L.__class__",
    "delta^L = (lambda: 1)()",
    "delta^L = lambda x: x",
    "delta^L = 2**2**2**30",
    "delta^L = 2^2^2^30",
    "delta^L = 9**9**9**9**9",
    "delta^L = (10^30)^64 * a^L",
    "delta^L = (a^L - y)^100000",
    "delta^L = " + "(" * 3000 + "a^L" + ")" * 3000,
    "delta^L = " + "-" * 3000 + "a^L",
    "delta^L = " + "1" * 500,
    "delta^L = eval('1')",
    "delta^L = exec",
    "delta^L = open('/etc/passwd')",
    "delta^L = a^L; import os",
    "delta^L = `a`",
    "delta^L = \\input{/etc/passwd}",
])
def test_malicious_input_is_rejected_quickly_without_executing(formula, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("user text reached an evaluator")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(sympy, "sympify", refuse)
    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", refuse)
    start = time.perf_counter()
    with pytest.raises(DeriveError):
        parse_formula(formula)
        monkeypatch.undo()
        check_formula("xor", formula, points=2)
    assert time.perf_counter() - start < 1.0


def test_errors_about_meaning_name_the_column():
    with pytest.raises(DeriveError, match="column"):
        check_formula("xor", "delta^L = a^5 - y")
    with pytest.raises(DeriveError, match="no layer has a bias"):
        check_formula(make_spec([2, 2, 1], ["sigmoid", "sigmoid"], bias=False),
                      "dC/db^l = delta^l")
    with pytest.raises(DeriveError, match="generic layer l"):
        check_formula("xor", "delta^1 = a^l")
    with pytest.raises(DeriveError, match="which layer"):
        check_formula("bce", "delta^L = sigma(y)")


@pytest.mark.parametrize("formula", [
    "delta^L = 1/0",
    "delta^L = log(0)",
    "delta^L = 0^{-1}",
    "delta^L = (-1)^(0.5)",
    "delta^L = (a^L - y)/(a^L - a^L)",
])
def test_a_formula_without_a_real_value_is_incorrect_not_a_crash(formula, capsys):
    verdict = check_formula("xor", formula, points=2)
    assert not verdict.correct
    assert verdict.counterexample.user_value == "not a real number"
    assert main(["check", "xor", formula]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_product_too_large_to_expand_is_left_to_the_numeric_check():
    # 14 factors of degree 12: expanding the difference symbolically would take minutes
    product = " * ".join(f"(a^L - {n}*y)^12" for n in range(1, 15))
    start = time.perf_counter()
    verdict = check_formula("xor", f"delta^L = {product}", points=2)
    assert not verdict.correct
    assert time.perf_counter() - start < 10.0


def test_an_index_range_error_points_at_the_index_on_the_left_side():
    verdict = check_formula("xor", "dC/dw^l_jk = delta^l_k a^{l-1}_j")
    assert not verdict.correct
    # k is written at column 10 on the left side (not the start of the formula)
    assert "(n_0 values, column 10)" in verdict.reason, verdict.reason
    with pytest.raises(DeriveError, match="two different indices"):
        check_formula("xor", "dC/dw^l_jj = delta^l_j a^{l-1}_j")


@pytest.mark.parametrize(("formula", "column"), [
    ("delta^L = 1.2.3", 14),
    ("delta^L = a^L - 1..5", 19),
    ("delta^L = 2 3 a^L", 13),
])
def test_malformed_numbers_are_not_silently_multiplied(formula, column):
    with pytest.raises(FormulaSyntaxError) as info:
        parse_formula(formula)
    assert info.value.column == column, str(info.value)


def test_a_layer_on_y_is_explained():
    with pytest.raises(FormulaSyntaxError, match="y takes no layer"):
        parse_formula("delta^L = a^L - y^L")


@pytest.mark.parametrize("formula", [
    # parenthesized and bracketed layers (Goodfellow et al., Ng)
    r"\delta^{(L)} = (a^{(L)} - y) \odot \sigma'(z^{(L)})",
    r"\delta^{[l]} = ((W^{[l+1]})^T \delta^{[l+1]}) \odot \sigma'(z^{[l]})",
    # font commands without braces, and \limits
    r"\boldsymbol\delta^L = (\mathbf a^L - \mathbf y) \odot \sigma'(\mathbf z^L)",
    r"\delta^l = \left((W^{l+1})^{\mathsf T} \delta^{l+1}\right) \odot \sigma'(z^l)",
    r"\delta^l_j = \sum\limits_{k} w^{l+1}_{kj} \delta^{l+1}_k \sigma'(z^l_j)",
])
def test_more_latex_variants(formula):
    verdict = check_formula("xor", formula, points=3)
    assert verdict.correct, "\n".join(verdict.lines())


# --- the numeric service and the registry's functions ------------------------------------


def test_piecewise_conditions_on_irrational_values_are_decided():
    """relu after gelu: the condition 0 < z (1 + erf(z/sqrt(2)))/2 is left undecided by
    substitution; check evaluates through derive.verify.numeric, which decides it."""
    spec = {"name": "pw", "input": 2, "layers": [
        {"size": 2, "activation": "gelu"}, {"op": "activation", "activation": "relu"},
        {"size": 2, "activation": {"name": "mx", "expr": "max(z*sqrt(2), z/3)"}},
        {"size": 1}], "loss": "mse"}
    assert check_formula(spec, "dC/dw^1_jk = delta^1_j x_k", points=5).correct
    wrong = check_formula(spec, "dC/dw^1_jk = 2 delta^1_j x_k", points=5)
    assert not wrong.correct and wrong.counterexample is not None


@pytest.mark.parametrize(("formula", "correct"), [
    ("delta^L = (a^L - y) * tanh'(z^L)", True),      # an activation by name, with a prime
    ("delta^L = (a^L - y) * (1 - tanh(z^L)^2)", True),
    ("delta^L = (a^L - y) * Abs(1 - a^L^2)", True),  # the registry's aliases: Abs, Max, ln
    ("delta^L = (a^L - y) * Max(1 - a^L^2, 0)", True),
    ("delta^L = (a^L - y) * exp(ln(1 - a^L^2))", True),
    ("delta^L = (a^L - y) * step(z^L)", False),
])
def test_functions_from_the_registry_table(formula, correct):
    spec = make_spec([2, 3, 2], ["tanh", "tanh"])
    assert check_formula(spec, formula, points=3).correct is correct


def test_an_elementary_function_takes_no_prime():
    with pytest.raises(DeriveError, match="exp' is not supported"):
        check_formula("xor", "delta^L = exp'(z^L)", points=1)


# --- textbook forms and tautologies (issue 15, item 4) -----------------------------------


@pytest.mark.parametrize("formula", [
    "δᴸ = ∇ₐC ⊙ σ′(zᴸ)",                               # Nielsen's BP1, vector form
    "\\delta^L = \\nabla_a C \\odot \\sigma'(z^L)",
    "delta^L = nabla_{a^L} C * sigma'(z^L)",
    "δᴸⱼ = ∂C/∂aᴸⱼ σ′(zᴸⱼ)",                            # BP1, by components
    "\\delta^L_j = \\frac{\\partial C}{\\partial a^L_j} \\sigma'(z^L_j)",
    "δˡ = ((wˡ⁺¹)ᵀ δˡ⁺¹) ⊙ σ′(zˡ)",                     # BP2
    "∂C/∂bˡⱼ = δˡⱼ",                                    # BP3
    "∂C/∂wˡⱼₖ = aˡ⁻¹ₖ δˡⱼ",                             # BP4
])
def test_nielsens_four_equations_as_he_writes_them(formula):
    verdict = check_formula("xor", formula, points=3)
    assert verdict.correct and not verdict.tautological, "\n".join(verdict.lines())


@pytest.mark.parametrize(("formula", "definition"), [
    ("delta^l = delta^l", False),
    ("δᴸ = ∂C/∂zᴸ", True),
    ("delta^L_j = dC/dz^L_j", True),
    ("delta^L = 2*delta^L - delta^L", False),
    ("dC/dw^l = dC/dw^l", False),
    ("dC/da^L = nabla_a C", False),
    ("sigma'(z^l) = sigma'(z^l)", False),
])
def test_a_tautology_is_reported_as_such_not_verified(formula, definition, capsys):
    verdict = check_formula("xor", formula, points=3)
    assert verdict.tautological and not verdict.correct and verdict.exit_code == 1
    text = "\n".join(verdict.lines())
    assert "TAUTOLOGICAL" in text and "CORRECT" not in text.replace("INCORRECT", "")
    assert "true by definition" in text
    assert ("is the definition of delta^L" in text) == definition
    assert main(["check", "xor", formula]) == 1
    assert "TAUTOLOGICAL" in capsys.readouterr().out


def test_nabla_takes_the_output_activations_only():
    with pytest.raises(FormulaSyntaxError, match="nabla_a C"):
        check_formula("xor", "delta^L = nabla_b C")
    with pytest.raises(DeriveError, match="dC/da is derived for the output layer"):
        check_formula("xor", "delta^1 = nabla_{a^1} C")


def test_an_index_expression_outside_a_vector_has_no_value():
    # index expressions (written for feature maps) are read for vectors too; an entry past
    # the end is no value, not zero padding
    verdict = check_formula("xor", "delta^1_j = a^1_{j+1}", points=2)
    assert not verdict.correct
    assert verdict.counterexample.user_value.startswith("no value: it reads a¹₄, outside")
