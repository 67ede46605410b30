"""The derived formulas against the classic backpropagation equations.

The derivation never types in BP1-BP4; these tests check that differentiating the model
arrives at them, for every output activation x loss pair and every hidden activation.
"""

from __future__ import annotations

import random

import mpmath
import pytest
import sympy as sp

from derive.derivation.reverse import C, Derivation, activation_derivative, derive
from derive.derivation.tensorform import MatVec, Outer
from derive.graph.model import build_model, i, j, k, quantity
from derive.quantities import NetTensor
from derive.registry.functions import A, Y, Z, elementary
from tests.conftest import ELEMENTWISE, make_spec, valid_output_pairs


def derivation_of(sizes, activations, loss="mse", **kwargs) -> Derivation:
    return derive(build_model(make_spec(sizes, activations, loss, **kwargs)))


def agree(lhs: sp.Expr, rhs: sp.Expr, symbols: dict, samples: int = 6) -> bool:
    """lhs == rhs at random values of ``symbols`` (name -> (symbol, low, high)), 30 digits."""
    rng = random.Random(1)
    difference = elementary(lhs - rhs)
    fn = sp.lambdify([s for s, _, _ in symbols.values()], difference, modules="mpmath")
    with mpmath.workdps(30):
        for _ in range(samples):
            values = [mpmath.mpf(rng.uniform(low, high)) for _, low, high in symbols.values()]
            if abs(fn(*values)) > mpmath.mpf(10) ** -20:
                return False
    return True


@pytest.mark.parametrize(("activation", "loss"), valid_output_pairs())
def test_output_error_is_bp1(activation, loss):
    derivation = derivation_of([3, 3], [activation], loss)
    out = derivation.model.layer(1)
    delta = derivation.delta(1)
    y = sp.Symbol("yy", real=True)
    if activation == "softmax":
        if loss == "cross_entropy":
            assert delta.rhs == out.a[j] - derivation.model.y[j]
            assert any("sum_j y_j = 1" in text for text in delta.assumptions)
        else:
            # delta^L_j = a_j (g_j - sum_i g_i a_i), g = dC/da: the softmax Jacobian
            g = derivation.loss_gradient.rhs
            expected = out.a[j] * (g - sp.Sum(g.xreplace({j: i}) * out.a[i], (i, 1, out.size)))
            assert sp.cancel(sp.expand((delta.rhs - expected).subs(out.size, 3).doit())) == 0
        return
    sigma = activation_derivative(out.activation)
    f = elementary(out.activation.expr)
    classic = sp.diff(derivation.model.loss.expr, A).subs({A: f, Y: y}) * sp.diff(f, Z)
    derived = delta.rhs.xreplace({out.a[j]: f, out.z[j]: Z, derivation.model.y[j]: y})
    assert sigma is not None
    low, high = (0.05, 0.95) if loss == "binary_cross_entropy" else (-1.0, 1.0)
    assert agree(derived, classic, {"z": (Z, -2.0, 2.0), "y": (y, low, high)})
    assert delta.generic == (sp.Derivative(C, out.a[j], evaluate=False)
                             * sp.Derivative(sp.Function("sigma_1")(out.z[j]), out.z[j]))


def test_sigmoid_with_binary_cross_entropy_simplifies_to_a_minus_y():
    derivation = derivation_of([2, 4, 1], ["tanh", "sigmoid"], "binary_cross_entropy")
    out = derivation.model.layer(2)
    assert derivation.delta(2).rhs == out.a[j] - derivation.model.y[j]
    assert any(step.rule == "simplify" for step in derivation.delta(2).steps)


def test_softmax_with_cross_entropy_states_its_assumption():
    derivation = derivation_of([4, 5, 3], ["relu", "softmax"], "cross_entropy")
    delta = derivation.delta(2)
    assert delta.rhs == derivation.model.layer(2).a[j] - derivation.model.y[j]
    assert [step.rule for step in delta.steps if step.rule == "assumption"] == ["assumption"]


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_hidden_error_is_bp2(activation):
    derivation = derivation_of([2, 3, 2], [activation, "identity"])
    hidden, after = derivation.model.layer(1), derivation.model.layer(2)
    next_delta = quantity("delta", 2)
    backprop = sp.Sum(next_delta[k] * after.w[k, j], (k, 1, after.size))
    delta = derivation.delta(1)
    sigma_prime = sp.Derivative(sp.Function("sigma_1")(hidden.z[j]), hidden.z[j])
    assert delta.generic == sigma_prime * backprop
    factor = sp.cancel(delta.rhs / backprop)
    assert not factor.has(sp.Sum)
    f = elementary(hidden.activation.expr)
    derived = factor.xreplace({hidden.a[j]: f, hidden.z[j]: Z})
    assert agree(derived, sp.diff(f, Z), {"z": (Z, -2.0, 2.0)})


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_are_bp3_and_bp4(bias):
    derivation = derivation_of([3, 4, 4, 2], ["tanh", "relu", "sigmoid"], bias=bias)
    for l in range(1, 4):
        delta, previous = quantity("delta", l), quantity("a", l - 1)
        weight = derivation.weight_gradients[l - 1]
        weights = NetTensor("w", l, rank=2)
        assert weight.lhs == sp.Derivative(C, weights.indexed[j, k], evaluate=False)
        assert weight.of == weights and derivation.gradient(weights) is weight
        assert weight.rhs == previous[k] * delta[j]
        assert weight.vector == Outer(NetTensor("delta", l), NetTensor("a", l - 1))
        bias_gradient = derivation.bias_gradients[l - 1]
        if bias:
            assert bias_gradient.rhs == delta[j]
        else:
            assert bias_gradient is None


def test_matrix_form_of_the_recursion():
    derivation = derivation_of([2, 3, 1], ["sigmoid", "sigmoid"])
    a1, delta2 = NetTensor("a", 1), NetTensor("delta", 2)
    transposed = MatVec(NetTensor("w", 2, rank=2), delta2, sp.true)
    assert sp.expand(derivation.delta(1).vector - a1 * (1 - a1) * transposed) == 0
    a2, y = NetTensor("a", 2), NetTensor("y")
    assert sp.expand(derivation.delta(2).vector - (a2 - y) * a2 * (1 - a2)) == 0
    gradient = NetTensor("grad", 2, of="a")
    sigma = sp.Function("sigma_2")
    z2 = NetTensor("z", 2)
    assert derivation.delta(2).vector_generic == gradient * sp.Derivative(sigma(z2), z2)


def test_every_formula_records_its_chain_rule_steps():
    derivation = derivation_of([2, 3, 3, 2], ["tanh", "softplus", "softmax"], "cross_entropy")
    for formula in derivation.formulas:
        assert formula.steps, formula.key
        for step in formula.steps:
            assert isinstance(step.expr, sp.Basic) and step.why
    rules = [step.rule for step in derivation.delta(1).steps]
    assert "chain rule" in rules and "differentiate" in rules
    assert derivation.delta(1).steps[-1].expr == derivation.delta(1).rhs


def test_sigma_prime_is_written_in_a_where_an_identity_exists():
    derivation = derivation_of([2, 3, 3, 1], ["tanh", "softplus", "sigmoid"])
    rhs1, rhs2 = derivation.delta(1).rhs, derivation.delta(2).rhs
    assert not rhs1.has(quantity("z", 1)) and rhs1.has(quantity("a", 1))
    assert not rhs2.has(quantity("z", 2)) and rhs2.has(quantity("a", 2))
    # relu: [z > 0] = [a > 0], since a = max(z, 0) > 0 exactly where z > 0
    relu = derivation_of([2, 3, 1], ["relu", "sigmoid"])
    assert relu.delta(1).rhs.has(quantity("a", 1)) and not relu.delta(1).rhs.has(quantity("z", 1))
    silu = derivation_of([2, 3, 1], ["silu", "sigmoid"])
    assert silu.delta(1).rhs.has(quantity("z", 1))


def test_custom_activation_and_loss_are_differentiated():
    spec = make_spec([2, 3, 1], [{"name": "mish", "expr": "z*tanh(log(1 + exp(z)))"},
                                 "identity"], {"name": "logcosh", "expr": "log(cosh(a - y))"})
    derivation = derive(build_model(spec))
    out = derivation.model.layer(2)
    assert sp.simplify(derivation.loss_gradient.rhs
                       - sp.tanh(out.a[j] - derivation.model.y[j])) == 0


def test_ten_layer_derivation_has_every_formula():
    derivation = derivation_of([4] + [5] * 10, ["tanh"] * 9 + ["softmax"], "cross_entropy")
    assert len(derivation.deltas) == 10
    assert [f.equation for f in derivation.formulas].count("BP2") == 9


@pytest.mark.parametrize("bias", [True, False])
def test_formulas_run_from_the_output_back(bias):
    """The loss gradient, then layer by layer from the output: δ^l, ∂C/∂W^l, ∂C/∂b^l."""
    derivation = derivation_of([2, 3, 4, 1], ["tanh", "relu", "sigmoid"], bias=bias)
    expected = [("loss gradient", "", NetTensor("a", 3))]
    for l in (3, 2, 1):
        expected.append(("delta", "BP1" if l == 3 else "BP2", NetTensor("z", l)))
        expected.append(("gradient", "BP4", NetTensor("w", l, rank=2)))
        if bias:
            expected.append(("gradient", "BP3", NetTensor("b", l)))
    assert [(f.kind, f.equation, f.of) for f in derivation.formulas] == expected
    assert [f.node for f in derivation.formulas[1:]] == [
        l for l in (3, 2, 1) for _ in range(3 if bias else 2)]


# --- equal layers are derived once ----------------------------------------------------------

#: Networks whose layers repeat: mixed activations with L1 and L2, a residual graph with layer
#: norm and dropout, blocks of a custom op.
REPEATING = {
    "mixed": make_spec([3] + [3] * 13 + [2], ["tanh", "relu", "softplus", "gelu"] * 3
                       + ["elu", "sigmoid"], "binary_cross_entropy"),
    "resnorm": {"name": "resnorm", "input": 3, "loss": "cross_entropy",
                "regularization": {"l1": 0.01, "l2": 0.02},
                "layers": [layer for b in range(4) for layer in (
                    {"size": 3, "activation": "relu", "name": f"h{b}"},
                    {"op": "dropout", "rate": 0.1}, {"op": "layer_norm"},
                    {"op": "add", "inputs": [f"h{b}", 4 * b + 3]})]
                + [{"size": 2, "activation": "softmax"}]},
    "gated": {"name": "gated", "input": 3, "loss": "mse", "layers": [
        {"size": 3, "op": {"name": "gated", "params": {"U": ["size", "in"], "c": ["size"]},
                           "expr": "tanh(sum(U[j,k]*x[k], k)) + c[j]"}}] * 5 + [{"size": 2}]},
}


@pytest.mark.parametrize("name", REPEATING)
def test_renumbered_formulas_equal_formulas_derived_afresh(name, monkeypatch):
    """A layer whose neighbourhood was seen gets the earlier layer's formulas renumbered:
    they equal, steps included, what deriving that layer from scratch gives."""
    from derive.derivation import reverse
    from derive.spec.load import load_spec

    spec = REPEATING[name]
    model = build_model(spec if not isinstance(spec, dict) else load_spec(spec))
    renumbered = derive(model)
    monkeypatch.setattr(reverse._Reverse, "neighbourhood", lambda self, node: object())
    afresh = derive(model)
    assert len(renumbered.formulas) == len(afresh.formulas)
    for ours, theirs in zip(renumbered.formulas, afresh.formulas):
        assert ours == theirs, ours.key
        assert tuple(ours.steps) == tuple(theirs.steps), ours.key
        assert ours.vector == theirs.vector, ours.key


def test_a_deep_chain_derives_a_few_layers_only(monkeypatch):
    """A chain of 40 equal layers is derived for the output layer, the one below it and one
    generic hidden layer (as the textbook derives layer l); the others are renumbered."""
    from derive.derivation import reverse

    derived = []
    original = reverse._Reverse._adjoint

    def counting(self, q, target, loss_gradient):
        derived.append(q)
        return original(self, q, target, loss_gradient)

    monkeypatch.setattr(reverse._Reverse, "_adjoint", counting)
    derivation = derivation_of([4] * 41, ["tanh"] * 40)
    assert len(derivation.formulas) == 1 + 3 * 40
    assert [(q.role, q.node) for q in derived] == [
        (role, l) for l in (40, 39, 38) for role in ("z", "w", "b")]
    assert derivation.delta(17).rhs == (1 - quantity("a", 17)[j] ** 2) * sp.Sum(
        quantity("delta", 18)[k] * NetTensor("w", 18, rank=2).indexed[k, j],
        (k, 1, sp.Symbol("n_18", integer=True, positive=True)))


def test_a_deeply_nested_custom_activation_is_differentiated_without_simplifying() -> None:
    """tanh of tanh ... (eight deep, the limit): sympy.simplify and sympy.solve would take minutes on
    it; its derivative is kept as differentiated, correct, and not rewritten in a."""
    from derive.spec.load import load_spec

    expr = "z"
    for _ in range(8):
        expr = f"tanh({expr})"
    spec = load_spec({"name": "deep", "input": 2, "loss": "mse", "layers": [
        {"size": 2, "activation": {"name": "nested", "expr": expr}}, {"size": 1}]})
    activation = spec.activation(1)
    derivative = activation_derivative(activation)
    assert derivative.in_z == sp.diff(activation.expr, Z)
    assert derivative.in_a is None
