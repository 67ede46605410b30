"""Verification of deep and wide networks: the checked copy, what it covers, the tape, limits."""

from __future__ import annotations

import dataclasses
import random

import pytest
import symengine as se
import sympy as sp

from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.limits import MAX_POINTS
from derive.quantities import NetTensor
from derive.spec.load import load_spec
from derive.verify import Instance, evaluate, reduction, verify, verify_derivation
from derive.verify.numeric import MIN_WIDTH, PARAMETER_BUDGET, spec_parameter_count
from derive.verify.reduction import checked_copy


def _chain(sizes, hidden="tanh", output="identity", loss="mse", extra=()):
    layers = [{"size": n, "activation": hidden} for n in sizes[1:-1]]
    layers += [{"size": sizes[-1], "activation": output}, *extra]
    return load_spec({"name": "deep", "input": sizes[0], "layers": layers, "loss": loss})


def _transposed(derivation, node):
    """``derivation`` with W instead of Wᵀ in the error of ``node`` (w_jk for w_kj)."""
    def swap(indexed):
        label = indexed.base.label
        if isinstance(label, NetTensor) and label.role == "w" and label.node == node + 1:
            return indexed.base[tuple(reversed(indexed.indices))]
        return indexed

    formulas = tuple(
        dataclasses.replace(f, rhs=f.rhs.replace(lambda e: isinstance(e, sp.Indexed), swap))
        if f.kind == "delta" and f.node == node else f for f in derivation.formulas)
    return dataclasses.replace(derivation, formulas=formulas)


def _failed(report):
    return {check.formula for check in report.checks if not check.ok}


# --- the checked copy ---------------------------------------------------------------------


def test_a_network_within_the_budget_is_checked_whole():
    spec = _chain([8, 8, 8, 8, 2])
    report = verify(spec, points=2)
    assert report.ok and report.sizes == spec.sizes and report.copy is None


def test_a_deep_chain_keeps_every_kind_of_layer_and_leaves_out_repeats():
    spec = _chain([8] * 12 + [2])
    assert spec_parameter_count(spec) > PARAMETER_BUDGET
    copy = checked_copy(spec)
    assert copy.layers == (1, 2, 11, 12) and copy.stands_for == ((2, tuple(range(3, 11))),)
    assert copy.spec.sizes == (8, 8, 8, 8, 2) and copy.mismatch is None
    report = verify(spec, points=3)
    assert report.ok, "\n".join(report.lines())
    names = [check.formula for check in report.checks]
    assert "delta^11" in names and "delta^2" in names and "delta^3" not in names
    text = "\n".join(report.lines())
    assert "layers 3-10 (dense tanh) are not expanded" in text
    assert "compared term by term" in text


def test_layers_read_elsewhere_or_of_another_kind_are_kept():
    # layer 5 is also read by the add at the end: it and its neighbours stay
    spec = _chain([6] * 12 + [6], extra=({"op": "add", "inputs": [5, 12]},))
    kept, stands_for = reduction._repeats(spec)
    assert 5 in kept and 4 in kept and 6 in kept
    assert all(5 not in dropped for dropped in stands_for.values())
    alternating = load_spec({"name": "alt", "input": 6, "loss": "mse", "layers": [
        {"size": 6, "activation": a} for a in ["tanh", "relu"] * 6]})
    assert reduction._repeats(alternating)[0] == tuple(range(1, 13))


def test_every_width_of_the_copy_is_at_least_three():
    spec = load_spec({"name": "wide", "input": 50, "loss": "cross_entropy", "layers": [
        {"size": 40, "activation": "tanh"}, {"op": "layer_norm"},
        {"size": 30, "activation": "softmax"}]})
    copy = checked_copy(spec, budget=20)
    assert min(copy.spec.sizes) == MIN_WIDTH == 3
    assert [layer.op for layer in copy.spec.layers] == [layer.op for layer in spec.layers]


def test_w_instead_of_its_transpose_is_caught_on_the_copy_of_a_deep_network():
    copy = checked_copy(_chain([8] * 12 + [2]))
    wrong = _transposed(copy.derivation, node=2)   # the generic layer standing for 3-10
    report = verify_derivation(wrong, points=2)
    assert "delta^2" in _failed(report) and "dC/dw^2" in _failed(report)


def test_a_wrong_formula_in_a_left_out_layer_is_caught(monkeypatch):
    """The layers left out are covered by the comparison: a transposed W in layer 7's error
    (not expanded when correct) makes verify check every layer, and fail."""
    spec = _chain([8] * 12 + [2])
    real = reduction.derive

    def wrong_in_layer_7(model):
        derivation = real(model)
        return _transposed(derivation, 7) if model.spec.depth == spec.depth else derivation

    monkeypatch.setattr(reduction, "derive", wrong_in_layer_7)
    report = verify(spec, points=2)
    assert not report.ok
    assert report.copy.layers == tuple(range(1, 13))       # nothing left out
    assert "delta^7" in _failed(report)


def test_a_copy_that_does_not_cover_the_network_fails(monkeypatch):
    """Widths capped only: if the whole network's derivation differed from the copy's, the
    report says so and verification fails."""
    spec = load_spec("digits")
    real = reduction.derive

    def wrong_when_wide(model):
        derivation = real(model)
        return _transposed(derivation, 1) if model.spec.sizes == spec.sizes else derivation

    monkeypatch.setattr(reduction, "derive", wrong_when_wide)
    report = verify(spec, points=2)
    assert not report.ok
    assert report.copy.mismatch == "delta^1"
    assert any("NOT COVERED: delta^1" in line for line in report.lines())


# --- the direct derivatives -----------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    _chain([3, 3, 2], hidden="relu", output="softmax", loss="cross_entropy"),
    load_spec({"name": "ln", "input": 3, "loss": "binary_cross_entropy", "layers": [
        {"size": 3, "activation": "elu"}, {"op": "layer_norm"}, {"op": "dropout", "rate": 0.5},
        {"size": 2, "activation": "sigmoid"}]}),
    load_spec("resmlp"),
], ids=["softmax", "layer_norm", "resmlp"])
def test_the_tape_gives_the_derivatives_of_the_expanded_cost(spec):
    """Reverse accumulation over the entries against se.diff of the fully expanded C."""
    instance = Instance(build_model(spec))
    point = instance.random_point(random.Random(1))
    values, direct = instance.sweep(point)
    zero = instance.at_zero_error
    for key, leaf in [*instance.parameters.items(), *instance.errors.items()]:
        expected = evaluate(se.diff(instance.cost, leaf).subs(zero), point)
        assert abs(float(direct[key] - expected)) <= 1e-40 * max(1.0, abs(float(expected)))
    for key, value in instance.values.items():
        expected = evaluate(value.subs(zero), point)
        assert abs(float(values[key] - expected)) <= 1e-40 * max(1.0, abs(float(expected)))


# --- limits ---------------------------------------------------------------------------------


def test_points_over_the_limit_are_refused_in_one_line():
    with pytest.raises(DeriveError, match="MAX_POINTS") as err:
        verify(load_spec("xor"), points=MAX_POINTS + 1)
    assert "\n" not in str(err.value)


def test_the_checked_copy_of_a_very_wide_network_is_found_quickly():
    spec = _chain([4, 100_000, 2])
    copy = checked_copy(spec)
    assert spec_parameter_count(copy.spec) <= PARAMETER_BUDGET
    assert copy.spec.sizes[0] == 4 and copy.spec.sizes[-1] == 2
