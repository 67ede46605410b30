"""Verification by expansion: it passes on correct derivations and catches wrong ones."""

from __future__ import annotations

import dataclasses

import pytest
import sympy as sp

from derive.derivation import derive
from derive.model import build_model
from derive.spec import load_spec
from derive.verify import PARAMETER_BUDGET, parameter_count, verify, verify_derivation
from tests.conftest import ELEMENTWISE, make_spec, valid_output_pairs


@pytest.mark.parametrize("name", ["xor", "bce", "custom_mish", "digits"])
def test_built_in_examples_verify(name):
    report = verify(load_spec(name), points=6)
    assert report.ok, "\n".join(report.lines())
    equations = {check.equation for check in report.checks}
    assert equations == {"BP1", "BP2", "BP3", "BP4"}


def test_deep_network_and_every_parameter_is_checked():
    spec = make_spec([3, 3, 3, 3, 2], ["tanh", "elu", "gelu", "identity"], "mse")
    report = verify(spec, points=4)
    assert report.ok, "\n".join(report.lines())
    weights_and_biases = sum(c.entries for c in report.checks if c.formula.startswith("dC/d"))
    assert weights_and_biases == report.parameters == 9 + 3 + 9 + 3 + 9 + 3 + 6 + 2


def test_custom_loss_and_leaky_relu_without_bias():
    spec = make_spec([2, 3, 2], [{"name": "leaky_relu", "alpha": 0.2}, "sigmoid"],
                     {"name": "logcosh", "expr": "log(cosh(a - y))"}, bias=False)
    report = verify(spec, points=4)
    assert report.ok, "\n".join(report.lines())
    assert not any(check.formula.startswith("dC/db") for check in report.checks)


def test_wide_networks_are_checked_on_a_reduced_copy():
    report = verify(load_spec("digits"), points=3)
    assert report.reduced and report.original_sizes == (64, 32, 10)
    assert parameter_count(report.sizes, (True, True)) <= PARAMETER_BUDGET
    assert len(set(report.sizes)) == 1  # every width capped at the same value
    assert any("reduced copy" in line for line in report.lines())
    assert any("sum_j y_j = 1" in line for line in report.lines())


def test_linear_network_is_verified_as_an_exact_identity():
    report = verify(make_spec([2, 2, 1], ["identity", "identity"], "mse"), points=2)
    assert report.ok
    assert {check.method for check in report.checks} == {"symbolic identity"}


def _tampered(derivation, layer, rhs):
    deltas = list(derivation.deltas)
    deltas[layer - 1] = dataclasses.replace(deltas[layer - 1], rhs=rhs)
    return dataclasses.replace(derivation, deltas=tuple(deltas))


def test_a_missing_sigma_prime_factor_is_caught():
    derivation = derive(build_model(make_spec([2, 3, 1], ["sigmoid", "sigmoid"])))
    delta1 = derivation.delta(1)
    (backprop,) = [f for f in sp.Mul.make_args(delta1.rhs) if isinstance(f, sp.Sum)]
    report = verify_derivation(_tampered(derivation, 1, backprop), points=3)
    assert not report.ok
    failed = {check.formula for check in report.checks if not check.ok}
    assert failed == {"delta^1", "dC/db^1", "dC/dw^1"}
    assert any("MISMATCH" in line for line in report.lines())


def test_the_bce_shortcut_used_with_mse_is_caught():
    derivation = derive(build_model(make_spec([2, 3, 1], ["tanh", "sigmoid"], "mse")))
    out = derivation.model.layer(2)
    wrong = out.a[sp.Symbol("j", integer=True, positive=True)] - derivation.model.y[
        sp.Symbol("j", integer=True, positive=True)]
    report = verify_derivation(_tampered(derivation, 2, wrong), points=3)
    assert not report.ok
    assert {c.formula for c in report.checks if not c.ok} >= {"delta^2", "dC/dw^2", "dC/dw^1"}


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_every_activation_verifies_in_hidden_and_output_layers(activation):
    report = verify(make_spec([2, 3, 2], [activation, activation], "mse"), points=3)
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize(("activation", "loss"), valid_output_pairs())
def test_every_output_and_loss_pair_verifies(activation, loss):
    report = verify(make_spec([2, 3, 2], ["tanh", activation], loss), points=3)
    assert report.ok, "\n".join(report.lines())


def test_custom_functions_with_abs_max_min_verify():
    spec = make_spec([2, 3, 2, 2], [{"name": "soft", "expr": "z/(1 + abs(z))"},
                                    {"name": "mx", "expr": "max(z, 0.5*z) + min(z, 0)"},
                                    "softmax"],
                     {"name": "l1ish", "expr": "sqrt((a - y)^2 + 1) + abs(a - y)"})
    report = verify(spec, points=4)
    assert report.ok, "\n".join(report.lines())
