"""The numeric service shared by verify and check: points, capped sizes, 50-digit values."""

from __future__ import annotations

import math
import random

import mpmath
import pytest
import symengine as se

from derive.check.formulas import SAMPLING as CHECK_SAMPLING
from derive.check.formulas import _network
from derive.graph.model import build_model
from derive.registry.functions import LOSSES
from derive.spec.load import load_spec
from derive.verify import Instance, numeric
from derive.verify.numeric import (
    DIGITS,
    PROBABILITY_RANGE,
    Batch,
    Sampling,
    capped_spec,
    evaluate,
    largest_cap,
    number,
    random_point,
    random_targets,
    reduced_spec,
    spec_parameter_count,
    value_at,
)
from tests.conftest import make_spec

#: One valid output activation per loss of the registry.
OUTPUT_FOR = {"mse": "tanh", "cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}
SAMPLINGS = {"verify": Sampling(), "check": CHECK_SAMPLING}


def _residual(width: int, input_width: int = 4) -> dict:
    """A dense stem, two residual blocks (dense, dense, add, relu) and a softmax output."""
    return {"name": "res", "input": input_width, "layers": [
        {"size": width, "activation": "relu", "name": "h1"},
        {"size": width, "activation": "relu"}, {"size": width},
        {"op": "add", "inputs": ["h1", 3], "name": "r1"},
        {"op": "activation", "activation": "relu"},
        {"size": width, "activation": "relu"}, {"size": width},
        {"op": "add", "inputs": ["r1", 7]},
        {"op": "activation", "activation": "relu"},
        {"size": 3, "activation": "softmax"}], "loss": "cross_entropy"}


def _layer_norm(width: int) -> dict:
    return {"name": "ln", "input": width + 3, "layers": [
        {"size": width, "activation": "tanh"}, {"op": "layer_norm"},
        {"op": "dropout", "rate": 0.5}, {"size": 2 * width, "activation": "relu", "bias": False},
        {"size": 2, "activation": "sigmoid"}], "loss": "binary_cross_entropy"}


GRAPHS = {
    "chain": make_spec([64, 32, 10], ["relu", "softmax"], "cross_entropy"),
    "narrow output": make_spec([40, 17, 1], ["tanh", "identity"]),
    "residual": load_spec(_residual(32)),
    "residual, wide input": load_spec(_residual(9, input_width=50)),
    "layer norm": load_spec(_layer_norm(12)),
    "digits": load_spec("digits"),
    "resmlp": load_spec("resmlp"),
}


# --- random points ------------------------------------------------------------------------


def _leaves(spec):
    instance = Instance(build_model(spec))
    return instance, list(instance.leaf_tensors)


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS)
def test_points_are_deterministic_per_seed(sampling):
    _, leaves = _leaves(load_spec(_residual(3)))
    needs = "distribution"
    first = [random_point(random.Random(7), leaves, needs, sampling) for _ in range(2)]
    assert first[0] == first[1]
    other = random_point(random.Random(8), leaves, needs, sampling)
    assert other != first[0]
    assert list(first[0]) == [key for key, _ in leaves]   # every leaf, in the order given


def test_the_points_of_verify_and_check_are_deterministic_per_seed():
    spec = load_spec("resmlp")
    instance = Instance(build_model(reduced_spec(spec, 40)))
    assert instance.random_point(random.Random(3)) == instance.random_point(random.Random(3))
    evaluator = _network(capped_spec(spec, 3)).evaluator
    assert evaluator.point(random.Random(3))[1] == evaluator.point(random.Random(3))[1]


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS)
@pytest.mark.parametrize("loss", LOSSES)
def test_targets_are_valid_for_every_loss(loss, sampling):
    spec = make_spec([3, 4, 5], ["tanh", OUTPUT_FOR[loss]], loss)
    instance = Instance(build_model(spec))
    needs = LOSSES[loss].needs
    for seed in range(20):
        point = random_point(random.Random(seed), instance.leaf_tensors, needs, sampling)
        targets = [point[t] for t in instance.targets]
        assert len(targets) == 5
        if needs == "probability":
            assert all(PROBABILITY_RANGE[0] <= float(t) <= PROBABILITY_RANGE[1]
                       for t in targets)
        elif needs == "distribution":
            assert all(isinstance(t, se.Rational | se.Integer) and t > 0 for t in targets)
            assert sum(targets, se.Integer(0)) == 1          # exactly, not to rounding
        else:
            assert needs is None
            assert all(sampling.low <= float(t) <= sampling.high for t in targets)


def test_leaves_are_drawn_in_range_and_rounded_where_asked():
    spec = load_spec({"name": "drop", "input": 3, "layers": [
        {"size": 3, "activation": "relu"}, {"op": "dropout", "rate": 0.5},
        {"size": 2, "activation": "identity"}], "loss": "mse"})
    instance = Instance(build_model(spec))
    masks = {s for s, tensor in instance.leaf_tensors if tensor.role == "mask"}
    assert len(masks) == 3
    verify_point = random_point(random.Random(1), instance.leaf_tensors, None)
    check_point = random_point(random.Random(1), instance.leaf_tensors, None, CHECK_SAMPLING)
    assert all(-1.5 <= float(v) <= 1.5 for v in verify_point.values())
    assert all(float(check_point[m]) == 1.0 for m in masks)          # dropout off
    assert len({float(verify_point[m]) for m in masks}) == 3          # random, like any leaf
    for value in check_point.values():
        assert float(value) == round(float(value), 2)
        assert abs(value - se.Rational(round(float(value) * 100), 100)) < 1e-55


@pytest.mark.parametrize("count", [1, 2, 7])
def test_a_probability_vector_of_any_length_sums_to_one(count):
    for decimals in (None, 2):
        targets = random_targets(random.Random(count), count, "distribution",
                                 Sampling(decimals=decimals))
        assert len(targets) == count and sum(targets, se.Integer(0)) == 1


# --- capped sizes -------------------------------------------------------------------------


def _brute_force_cap(spec, budget: int) -> int:
    """What the cap search used to do: from the widest width down, one at a time."""
    cap = max(spec.sizes)
    while cap > numeric.MIN_WIDTH and spec_parameter_count(capped_spec(spec, cap)) > budget:
        cap -= 1
    return cap


@pytest.mark.parametrize("spec", GRAPHS.values(), ids=GRAPHS)
@pytest.mark.parametrize("budget", [1, 10, 40, 120, 333, 1000, 10**6])
def test_the_cap_found_by_bisection_is_the_largest_that_fits(spec, budget):
    cap = largest_cap(spec, budget)
    assert cap == _brute_force_cap(spec, budget)
    assert cap >= numeric.MIN_WIDTH
    small = reduced_spec(spec, budget)
    if spec_parameter_count(spec) <= budget:
        assert small is spec
        return
    assert small == capped_spec(spec, cap)
    if cap > numeric.MIN_WIDTH:
        assert spec_parameter_count(small) <= budget
    if cap < max(spec.sizes):
        assert spec_parameter_count(capped_spec(spec, cap + 1)) > budget


def test_the_cap_search_counts_parameters_a_logarithmic_number_of_times(monkeypatch):
    spec = load_spec(_residual(1000))
    counted = []
    count = numeric.spec_parameter_count
    monkeypatch.setattr(numeric, "spec_parameter_count",
                        lambda s: counted.append(s) or count(s))
    assert largest_cap(spec, 120) == _brute_force_cap(spec, 120)
    assert len(counted) <= math.ceil(math.log2(1000)) + 1


@pytest.mark.parametrize("spec", GRAPHS.values(), ids=GRAPHS)
def test_a_capped_copy_keeps_the_graph_and_equal_widths(spec):
    small = capped_spec(spec, 3)
    assert [(layer.op, layer.inputs, layer.activation) for layer in small.layers] == [
        (layer.op, layer.inputs, layer.activation) for layer in spec.layers]
    assert max(small.sizes) <= 3
    for l, layer in enumerate(small.layers, start=1):
        if layer.op == "add":
            assert len({small.sizes[n] for n in layer.reads(l)}) == 1
    assert capped_spec(small, 3) is small     # nothing over the cap: the spec itself


# --- values at a point --------------------------------------------------------------------


X = se.Symbol("x")


def test_evaluation_carries_50_digits():
    point = {X: number(0.37)}
    assert abs(point[X] - se.Rational(37, 100)) < se.Integer(10) ** -59  # 0.37, not binary
    with mpmath.workdps(80):
        expected = mpmath.sqrt(2) * mpmath.mpf(37) / 100 + mpmath.exp(mpmath.mpf(-37) / 100)
        value = evaluate(se.sqrt(2) * X + se.exp(-X), point)
        assert abs(mpmath.mpf(str(value)) - expected) < mpmath.mpf(10) ** -(DIGITS + 5)
    # a cancellation that a double gets entirely wrong: ((1 + x^2) - 1) / x^2 with x = 1e-20
    tiny = {X: number(1e-20)}
    assert abs(float(evaluate(((1 + X**2) - 1) / X**2, tiny)) - 1) < 1e-15
    assert ((1 + 1e-20**2) - 1) / 1e-20**2 == 0.0


@pytest.mark.parametrize("expr", [se.log(X - 1), 1 / (X - X), se.sqrt(X - 2)])
def test_no_real_value_is_none_or_an_error(expr):
    point = {X: number(0.5)}
    assert value_at(expr, point) is None
    assert Batch([expr]).at(point) == [None]
    with pytest.raises(ValueError, match="no finite real value"):
        evaluate(expr, point)


def test_undecided_piecewise_conditions_are_decided():
    """0 < sqrt(2)*x stays undecided when x is substituted; folding sqrt(2) decides it."""
    expr = se.Piecewise((X * se.sqrt(2), se.StrictLessThan(0, X * se.sqrt(2))), (X / 3, True))
    for x, expected in ((0.3, 0.3 * math.sqrt(2)), (-0.3, -0.1)):
        point = {X: number(x)}
        assert abs(float(evaluate(expr, point)) - expected) < 1e-15
        (batched,) = Batch([expr]).at(point)
        assert abs(float(batched) - expected) < 1e-15
