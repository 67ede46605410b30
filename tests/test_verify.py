"""Verification by expansion: it passes on correct derivations and catches wrong ones."""

from __future__ import annotations

import dataclasses
import math

import pytest
import symengine as se
import sympy as sp

from derive.derivation.reverse import derive
from derive.graph.model import build_model
from derive.quantities import tensor_of
from derive.spec.load import list_examples, load_spec
from derive.verify import (
    PARAMETER_BUDGET,
    Instance,
    backprop_values,
    evaluate,
    parameter_count,
    reduced_spec,
    verify,
    verify_derivation,
)
from derive.verify.numeric import spec_parameter_count
from tests.conftest import ELEMENTWISE, make_spec, valid_output_pairs


def _ok(report):
    assert report.ok, "\n".join(report.lines())


def _resmlp(width=4, activation="relu", regularization=None):
    """input 4, a dense stem, two residual blocks (dense, dense, add, relu), softmax + CE."""
    spec = {"name": "resmlp", "input": 4, "layers": [
        {"size": width, "activation": activation, "name": "h1"},
        {"size": width, "activation": activation}, {"size": width},
        {"op": "add", "inputs": ["h1", 3], "name": "r1"},
        {"op": "activation", "activation": activation},
        {"size": width, "activation": activation}, {"size": width},
        {"op": "add", "inputs": ["r1", 7]},
        {"op": "activation", "activation": activation},
        {"size": 3, "activation": "softmax"}], "loss": "cross_entropy"}
    if regularization:
        spec["regularization"] = regularization
    return load_spec(spec)


def _replace(derivation, pick, **changes):
    """``derivation`` with the formulas ``pick`` selects changed (rhs=..., penalty=...)."""
    formulas = tuple(dataclasses.replace(f, **changes) if pick(f) else f
                     for f in derivation.formulas)
    return dataclasses.replace(derivation, formulas=formulas)


def _failed(report):
    return {check.formula for check in report.checks if not check.ok}


# --- dense chains --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, _ in list_examples()])
def test_built_in_examples_verify(name):
    spec = load_spec(name)
    report = verify(spec, points=4)
    _ok(report)
    if spec.is_chain:
        equations = {check.equation for check in report.checks} - {""}
        assert equations == {"BP1", "BP2", "BP3", "BP4"}


def test_every_formula_is_checked_once():
    spec = make_spec([3, 3, 3, 3, 2], ["tanh", "elu", "gelu", "identity"], "mse")
    derivation = derive(build_model(spec))
    report = verify_derivation(derivation, points=4)
    _ok(report)
    assert [check.kind for check in report.checks] == [f.kind for f in derivation.formulas]
    weights_and_biases = sum(c.entries for c in report.checks if c.kind == "gradient")
    assert weights_and_biases == report.parameters == 9 + 3 + 9 + 3 + 9 + 3 + 6 + 2
    # the loss gradient dC/da^L is checked on its own, against a perturbation of a^L
    (loss_gradient,) = [c for c in report.checks if c.kind == "loss gradient"]
    assert loss_gradient.ok and loss_gradient.entries == 2


def test_custom_loss_and_leaky_relu_without_bias():
    spec = make_spec([2, 3, 2], [{"name": "leaky_relu", "alpha": 0.2}, "sigmoid"],
                     {"name": "logcosh", "expr": "log(cosh(a - y))"}, bias=False)
    report = verify(spec, points=4)
    _ok(report)
    assert not any(check.formula.startswith("dC/db") for check in report.checks)


def test_wide_networks_are_checked_on_a_reduced_copy():
    report = verify(load_spec("digits"), points=3)
    assert report.reduced and report.original_sizes == (64, 32, 10)
    assert parameter_count(report.sizes, (True, True)) <= PARAMETER_BUDGET
    cap = max(report.sizes)
    assert report.sizes == tuple(min(n, cap) for n in report.original_sizes)  # one cap
    assert any("checked copy of the 64-32-10 network" in line for line in report.lines())
    assert any(f"widths capped at {cap}" in line for line in report.lines())
    assert any("sum_j y_j = 1" in line for line in report.lines())


def test_a_shortened_sequence_says_what_was_cut_and_nothing_else():
    # 4 steps of a 1-unit rnn: the copy has fewer steps but the same widths, so the report
    # says the steps and not "widths capped" (it said "widths capped at 2 ..., none below 3")
    spec = load_spec({"name": "short", "input": {"size": 2, "length": 4}, "loss": "mse",
                      "layers": [{"op": "rnn", "size": 1, "return": "last"}]})
    lines = verify(spec, points=2).lines()
    assert any("its one layer" in line for line in lines)
    assert any(line.strip().startswith("3 time steps of 4") for line in lines)
    assert not any("widths capped" in line for line in lines)
    assert any("dC/da^1     1 entry   " in line for line in lines)     # not "1 entries"


def test_linear_network_is_verified_as_an_exact_identity():
    report = verify(make_spec([2, 2, 1], ["identity", "identity"], "mse"), points=2)
    _ok(report)
    assert {check.method for check in report.checks} == {"symbolic identity"}


def test_a_missing_sigma_prime_factor_is_caught():
    derivation = derive(build_model(make_spec([2, 3, 1], ["sigmoid", "sigmoid"])))
    delta1 = derivation.delta(1)
    (backprop,) = [f for f in sp.Mul.make_args(delta1.rhs) if isinstance(f, sp.Sum)]
    wrong = _replace(derivation, lambda f: f.kind == "delta" and f.node == 1, rhs=backprop)
    report = verify_derivation(wrong, points=3)
    assert not report.ok
    assert _failed(report) == {"delta^1", "dC/db^1", "dC/dw^1"}
    assert any("MISMATCH" in line for line in report.lines())


def test_the_bce_shortcut_used_with_mse_is_caught():
    derivation = derive(build_model(make_spec([2, 3, 1], ["tanh", "sigmoid"], "mse")))
    model = derivation.model
    j = sp.Symbol("j", integer=True, positive=True)
    wrong = _replace(derivation, lambda f: f.kind == "delta" and f.node == 2,
                     rhs=model.layer(2).a[j] - model.y[j])
    report = verify_derivation(wrong, points=3)
    assert not report.ok
    assert _failed(report) >= {"delta^2", "dC/dw^2", "dC/dw^1"}


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_every_activation_verifies_in_hidden_and_output_layers(activation):
    report = verify(make_spec([2, 3, 2], [activation, activation], "mse"), points=3)
    _ok(report)


@pytest.mark.parametrize(("activation", "loss"), valid_output_pairs())
def test_every_output_and_loss_pair_verifies(activation, loss):
    report = verify(make_spec([2, 3, 2], ["tanh", activation], loss), points=3)
    _ok(report)


def test_custom_functions_with_abs_max_min_verify():
    spec = make_spec([2, 3, 2, 2], [{"name": "soft", "expr": "z/(1 + abs(z))"},
                                    {"name": "mx", "expr": "max(z, 0.5*z) + min(z, 0)"},
                                    "softmax"],
                     {"name": "l1ish", "expr": "sqrt((a - y)^2 + 1) + abs(a - y)"})
    report = verify(spec, points=4)
    _ok(report)


def test_targets_of_cross_entropy_sum_to_one_exactly():
    import random

    instance = Instance(build_model(make_spec([2, 3, 4], ["tanh", "softmax"],
                                              "cross_entropy")))
    point = instance.random_point(random.Random(3))
    assert sum((point[t] for t in instance.targets), se.Integer(0)) == 1


def test_instance_api_of_a_dense_chain():
    """What derive.check.formulas reads: forward values, backprop's δ^l_j, evaluation at a point."""
    import random

    derivation = derive(build_model(make_spec([2, 3, 2], ["tanh", "sigmoid"], "mse")))
    model = derivation.model
    instance = Instance(model)
    point = instance.random_point(random.Random(0))
    env = backprop_values(instance, derivation,
                          {q: evaluate(v, point) for q, v in instance.values.items()})
    for layer in model.layers:
        for jj in range(1, layer.width + 1):
            assert layer.a[jj] in instance.values and layer.z[jj] in instance.values
            delta = sp.IndexedBase(derivation.delta(layer.index).lhs.base.label, real=True)
            assert math.isfinite(float(evaluate(env[delta[jj]], point)))
    delta2 = derivation.delta(2)
    value = evaluate(instance.instantiate(delta2, (1,), env), point)
    assert value == evaluate(env[delta2.lhs.base[1]], point)


# --- graphs --------------------------------------------------------------------------------


def test_residual_graph_verifies():
    report = verify(_resmlp())
    _ok(report)
    kinds = [check.kind for check in report.checks]
    assert kinds.count("delta") == 10  # every node's error, the add and activation nodes too
    assert report.parameters == spec_parameter_count(_resmlp())
    assert not report.reduced


def test_layer_norm_adjoints_are_checked():
    spec = load_spec({"name": "ln", "input": 3, "layers": [
        {"size": 3, "activation": "tanh"}, {"op": "layer_norm", "eps": 1e-3},
        {"size": 2, "activation": "sigmoid"}], "loss": "binary_cross_entropy"})
    report = verify(spec, points=5)
    _ok(report)
    adjoints = [check for check in report.checks if check.kind == "adjoint"]
    assert len(adjoints) == 3               # the mean, the variance and the normalised input
    assert sorted(check.entries for check in adjoints) == [1, 1, 3]
    assert {"dC/dgamma^2", "dC/dbeta^2"} <= {check.formula for check in report.checks}


def test_dropout_masks_are_leaves_with_random_values():
    spec = load_spec({"name": "drop", "input": 3, "layers": [
        {"size": 3, "activation": "relu"}, {"op": "dropout", "rate": 0.5},
        {"size": 2, "activation": "identity"}], "loss": "mse"})
    report = verify(spec, points=4)
    _ok(report)
    instance = Instance(build_model(spec))
    masks = [q for q in instance.values if tensor_of(q).role == "mask"]
    assert len(masks) == 3
    assert all(instance.values[q] in instance.leaves for q in masks)


def test_regularization_is_checked_as_its_own_line():
    spec = _resmlp(width=3, regularization={"l2": 0.01, "l1": 0.001})
    report = verify(spec, points=4)
    _ok(report)
    penalties = [check for check in report.checks if check.kind == "penalty"]
    weights = [key for key in spec.parameter_shapes() if key.startswith("W")]
    assert len(penalties) == len(weights) == 6   # weights only: not biases
    assert sum(check.entries for check in penalties) == sum(
        math.prod(spec.parameter_shapes()[key]) for key in weights)
    assert all(check.formula.endswith("+ penalty") for check in penalties)


def test_l2_penalty_is_an_exact_identity():
    spec = load_spec({"name": "l2", "input": 2, "layers": [
        {"size": 2, "activation": "tanh"}, {"size": 1, "activation": "sigmoid"}],
        "loss": "mse", "regularization": {"l2": 0.1}})
    report = verify(spec, points=3)
    _ok(report)
    penalties = [check for check in report.checks if check.kind == "penalty"]
    assert len(penalties) == 2
    assert {check.method for check in penalties} == {"symbolic identity"}


@pytest.mark.parametrize("regularization", [{"l2": 0.01}, {"l1": 0.01}])
def test_a_wrong_penalty_is_caught(regularization):
    spec = _resmlp(width=2, regularization=regularization)
    derivation = derive(build_model(spec))
    (weight,) = [f for f in derivation.formulas
                 if f.kind == "gradient" and f.node == 2 and f.of.role == "w"]
    assert weight.penalty != 0
    wrong = _replace(derivation, lambda f: f is weight, penalty=2 * weight.penalty)
    report = verify_derivation(wrong, points=3)
    assert not report.ok
    assert _failed(report) == {"dC/dw^2 + penalty"}   # the per-sample gradient is fine


def test_a_wrong_layer_norm_adjoint_is_caught():
    spec = load_spec({"name": "ln", "input": 3, "layers": [
        {"size": 3, "activation": "tanh"}, {"op": "layer_norm"},
        {"size": 2, "activation": "identity"}], "loss": "mse"})
    derivation = derive(build_model(spec))
    (var,) = [f for f in derivation.formulas if f.kind == "adjoint" and f.of.role == "var"]
    wrong = _replace(derivation, lambda f: f is var, rhs=var.rhs / 2)
    report = verify_derivation(wrong, points=3)
    assert not report.ok
    failed = {c.formula for c in report.checks if not c.ok}
    assert var.key in failed
    assert "dC/dw^1" in failed            # everything below the layer norm reads it
    assert "dC/dgamma^2" not in failed    # everything above does not


def test_a_formula_that_reads_a_later_result_is_reported():
    derivation = derive(build_model(make_spec([2, 2, 2], ["tanh", "tanh"])))
    formulas = list(derivation.formulas)
    delta1 = next(n for n, f in enumerate(formulas) if f.kind == "delta" and f.node == 1)
    delta2 = next(n for n, f in enumerate(formulas) if f.kind == "delta" and f.node == 2)
    formulas.insert(delta2, formulas.pop(delta1))   # delta^1 before the delta^2 it reads
    report = verify_derivation(dataclasses.replace(derivation, formulas=tuple(formulas)),
                               points=2)
    assert not report.ok
    assert _failed(report) == {"delta^1", "dC/dw^1", "dC/db^1"}
    (check,) = [check for check in report.checks if check.formula == "delta^1"]
    assert "not computable" in check.method and "delta^2[" in check.method


def test_reduced_copy_of_a_graph_keeps_its_ops_and_graph():
    spec = _resmlp(width=32)
    small = reduced_spec(spec)
    assert spec_parameter_count(spec) > PARAMETER_BUDGET >= spec_parameter_count(small)
    assert [(layer.op, layer.inputs, layer.activation) for layer in small.layers] == [
        (layer.op, layer.inputs, layer.activation) for layer in spec.layers]
    sizes = small.sizes
    assert min(sizes) >= 2
    for l, layer in enumerate(small.layers, start=1):
        if layer.op == "add":
            assert len({sizes[n] for n in layer.reads(l)}) == 1
    assert sizes[-1] == 3  # the output fits under the cap
    report = verify(spec, points=3)
    _ok(report)
    assert report.reduced and report.original_sizes == spec.sizes


def test_widths_are_never_capped_below_three():
    spec = _resmlp(width=64)
    small = reduced_spec(spec, budget=10)
    assert min(small.sizes) == 3
    assert reduced_spec(make_spec([2, 40, 1], ["tanh", "sigmoid"]), budget=10).sizes == (
        2, 3, 1)   # widths already under the floor stay


@pytest.mark.parametrize("points", [3, 12])
def test_piecewise_conditions_on_irrational_values_are_decided(points):
    """relu after gelu: the condition 0 < z*(1 + erf(z/sqrt(2)))/2 has an exact constant in
    it; evaluated with 50-digit numbers for every constant, each point is compared."""
    spec = load_spec({"name": "pw", "input": 2, "layers": [
        {"size": 2, "activation": "gelu"}, {"op": "activation", "activation": "relu"},
        {"size": 2, "activation": {"name": "mx", "expr": "max(z*sqrt(2), z/3)"}},
        {"size": 1}], "loss": "mse"})
    report = verify(spec, points=points)
    _ok(report)
    assert all(f"{points} points" in check.method for check in report.checks
               if check.method != "symbolic identity")
