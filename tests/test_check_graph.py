"""derive check on graphs: formulas about any node (residual branches, layer norms)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from derive.check.backward import check_backward
from derive.check.formulas import check_formula
from derive.check.parser import Adjoint, Ref, parse_formula
from derive.cli.main import main
from derive.derivation.reverse import derive
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.spec.load import load_spec

FIXTURES = Path(__file__).parent / "fixtures"
#: 2 -> dense 3 tanh (h1) -> dense 3 sigmoid -> add(h1, 2) -> layer_norm -> dense 2 sigmoid
GRAPH = str(FIXTURES / "residual_ln.yaml")

# the textbook backward pass of a layer norm, for the delta entering it (node 3)
LAYER_NORM_INPUT = (
    "delta^3_j = (gamma^4_j delta^4_j - (1/n_3) sum_k gamma^4_k delta^4_k"
    " - xhat^4_j (1/n_3) sum_k gamma^4_k delta^4_k xhat^4_k) / sqrt(var^4 + eps)")


def verdict_text(verdict) -> str:
    return "\n".join(verdict.lines())


# --- the delta entering a residual branch ------------------------------------------------


@pytest.mark.parametrize("formula", [
    "delta^1 = (delta^3 + (W^2)^T delta^2) * sigma'(z^1)",
    "delta^1 = (delta^3 + (W^2)^T delta^2) * (1 - a^1^2)",
    "delta^1_j = (delta^3_j + sum_k w^2_kj delta^2_k) sigma'(z^1_j)",
    "δ¹ = (δ³ + (W²)ᵀ δ²) ⊙ σ'(z¹)",
    r"\delta^{1} = \left(\delta^{3} + (W^{2})^\top \delta^{2}\right) \odot \sigma'(z^{1})",
    "dC/dz^1 = (dC/da^3 + (W^2)^T delta^2) * sigma'(z^1)",
])
def test_the_residual_delta_sums_both_paths(formula):
    verdict = check_formula(GRAPH, formula, points=4)
    assert verdict.correct, verdict_text(verdict)
    assert verdict.layers == (1,)


def test_the_residual_delta_without_the_skip_path_is_wrong():
    verdict = check_formula(GRAPH, "delta^1 = ((W^2)^T delta^2) * sigma'(z^1)", points=4)
    assert not verdict.correct
    example = verdict.counterexample
    assert example is not None and example.layer == 1
    assert example.user_value != example.correct_value
    text = verdict_text(verdict)
    assert "gamma^4 = [" in text and "W^5 = [[" in text
    # the derived formula, in the user's notation, names the skip path
    assert "delta^3" in verdict.derived[0]


def test_the_add_node_passes_its_delta_to_both_inputs():
    assert check_formula(GRAPH, "delta^2 = delta^3 * a^2 * (1 - a^2)", points=3).correct
    assert not check_formula(GRAPH, "delta^2 = 2 * delta^3 * a^2 * (1 - a^2)",
                             points=3).correct


# --- layer norm: its parameters and the delta of its input -------------------------------


@pytest.mark.parametrize("formula", [
    "dC/dgamma^4 = delta^4 * xhat^4",
    "dC/dgamma^4_j = delta^4_j xhat^4_j",
    "∂C/∂γ⁴ⱼ = δ⁴ⱼ x̂⁴ⱼ",
    r"\frac{\partial C}{\partial \gamma^{4}_{j}} = \delta^{4}_{j} \hat{x}^{4}_{j}",
    "dC/dgamma^4 = delta^4 * (a^3 - mu^4) / sqrt(var^4 + eps)",
])
def test_the_layer_norm_scale_gradient(formula):
    verdict = check_formula(GRAPH, formula, points=4)
    assert verdict.correct, verdict_text(verdict)
    assert verdict.target.startswith("dC/dgamma^4") and verdict.layers == (4,)


@pytest.mark.parametrize("formula", [
    "dC/dgamma^4 = delta^4",
    "dC/dgamma^4 = delta^4 * a^3",
    "dC/dgamma^4 = delta^4 * xhat^4 * gamma^4",
])
def test_a_wrong_layer_norm_scale_gradient_gets_a_counterexample(formula):
    verdict = check_formula(GRAPH, formula, points=4)
    assert not verdict.correct
    assert verdict.counterexample is not None
    assert verdict.derived[0] == "dC/dgamma^4 = delta^4*xhat^4"


def test_the_layer_norm_shift_gradient():
    assert check_formula(GRAPH, "dC/dbeta^4 = delta^4", points=3).correct
    assert check_formula(GRAPH, "∂C/∂β⁴ = δ⁴", points=3).correct
    assert not check_formula(GRAPH, "dC/dbeta^4 = delta^4 * gamma^4", points=3).correct


def test_the_delta_of_a_layer_norm_input():
    right = check_formula(GRAPH, LAYER_NORM_INPUT, points=4)
    assert right.correct, verdict_text(right)
    # leaving out the variance's term is the classic mistake
    wrong = check_formula(
        GRAPH, "delta^3_j = (gamma^4_j delta^4_j - (1/n_3) sum_k gamma^4_k delta^4_k) "
        "/ sqrt(var^4 + eps)", points=4)
    assert not wrong.correct and wrong.counterexample is not None
    # the adjoints of the layer norm's intermediates can be named on the right
    adjoints = check_formula(
        GRAPH, "delta^3 = dC/dxhat^4 / sqrt(var^4 + eps) + dC/dmu^4 / n_3 "
        "+ dC/dvar^4 * 2 * (a^3 - mu^4) / n_3", points=4)
    assert adjoints.correct, verdict_text(adjoints)
    assert check_formula(GRAPH, "dC/dxhat^4 = delta^4 * gamma^4", points=3).correct


# --- the derived formulas in the user's notation check back ------------------------------


def _left_sides() -> list[str]:
    derivation = derive(build_model(load_spec(GRAPH)))
    out = []
    for formula in derivation.formulas:
        if formula.kind == "loss gradient":
            out.append(f"dC/da^{formula.node}")
        elif formula.kind == "delta":
            out.append(f"delta^{formula.node}")
        else:
            out.append(f"dC/d{formula.of.role}^{formula.node}")
    return out


@pytest.mark.parametrize("lhs", _left_sides())
def test_every_printed_derived_formula_checks_back_as_correct(lhs):
    wrong = check_formula(GRAPH, f"{lhs} = 0", points=2)
    assert not wrong.correct
    again = check_formula(GRAPH, wrong.derived[0], points=2)
    assert again.correct, (wrong.derived[0], verdict_text(again))


# --- the generic layer l on a graph, errors ----------------------------------------------


def test_the_classic_bp2_with_a_generic_layer_is_ill_formed_at_the_add():
    verdict = check_formula(GRAPH, "delta^l = ((W^{l+1})^T delta^{l+1}) * sigma'(z^l)")
    assert not verdict.correct
    assert "w^{l+1} = 3 does not exist" in verdict.reason
    assert "layer 3 is add" in verdict.reason


def test_the_generic_layer_runs_over_the_nodes_that_have_the_left_side():
    verdict = check_formula(GRAPH, "dC/dw^l_jk = delta^l_j a^{l-1}_k", points=2)
    assert verdict.correct and verdict.layers == (1, 2, 5)
    verdict = check_formula(GRAPH, "dC/dgamma^l = delta^l * xhat^l", points=2)
    assert verdict.correct and verdict.layers == (4,)
    assert not check_formula(GRAPH, "dC/dW^5 = delta^5 (a^3)^T", points=2).correct


@pytest.mark.parametrize(("formula", "message"), [
    ("dC/dgamma^2 = delta^2", "dC/dgamma"),
    ("delta^1 = gamma^2", "gamma^2 does not exist"),
    ("dC/db^3 = delta^3", "dC/db"),
    ("delta^1 = dC/da^1", "dC/da^1 is not derived"),
    ("dC/dmu^4_j = 0", "scalar per sample"),
])
def test_errors_name_what_the_network_has(formula, message):
    with pytest.raises(DeriveError, match=re.escape(message)):
        check_formula(GRAPH, formula)


def test_eps_needs_a_layer_norm():
    with pytest.raises(DeriveError, match="eps"):
        check_formula("xor", "delta^L = eps")


def test_the_parser_knows_the_layer_norm_names():
    for text in ("dC/dgamma^4 = delta^4 * xhat^4", "∂C/∂γ⁴ = δ⁴ ⊙ x̂⁴",
                 r"\frac{\partial C}{\partial \gamma^4} = \delta^4 \odot \hat{x}^4"):
        parsed = parse_formula(text)
        assert (parsed.target.kind, parsed.target.role) == ("grad", "gamma")
        assert [r.letter for r in (parsed.rhs.first, parsed.rhs.rest[0][2])] == ["delta",
                                                                                "xhat"]
    beta = parse_formula("∂C/∂β⁴ = μ⁴ + ε")
    assert beta.target.role == "beta"
    assert isinstance(parse_formula("delta^3 = dC/dxhat^4").rhs, Adjoint)
    assert isinstance(parse_formula("delta^3 = gamma^4").rhs, Ref)


# --- the command line --------------------------------------------------------------------


def test_the_command_line_on_a_graph(capsys):
    assert main(["check", GRAPH, "dC/dgamma^4 = delta^4 * xhat^4"]) == 0
    assert main(["check", GRAPH, "dC/dgamma^4 = delta^4"]) == 1
    out = capsys.readouterr().out
    assert "INCORRECT" in out and "dC/dgamma^4 = delta^4*xhat^4" in out


def test_backward_says_it_supports_dense_chains_for_now(capsys, tmp_path):
    def backward(X, Y, params):
        return {}

    with pytest.raises(DeriveError, match="supports dense chains for now"):
        check_backward(GRAPH, backward)
    script = tmp_path / "mine.py"
    script.write_text("def backward(X, Y, params):\n    return {}\n")
    assert main(["check", GRAPH, "--backward", f"{script}:backward"]) == 2
    err = capsys.readouterr().err
    assert "supports dense chains for now" in err and "layer 3 is add" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
