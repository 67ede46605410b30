"""Convolutional networks end to end: the derivation arrives at the textbook formulas, they
verify by expansion on the issue's tiny instance, and generated modules for random image
specs (sizes, kernels, strides, paddings, pools, residual adds) match PyTorch float64, a
loop-by-loop reference and central differences."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derive.derivation.reverse import activation_derivative, derive
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.quantities import NetTensor, entry
from derive.registry.functions import resolve_activation
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.render.codegen import load_module, render_module
from derive.spec.load import load_spec
from derive.verify.expansion import verify
from tests.conftest import ELEMENTWISE
from tests.conv_reference import conv_net_loss_and_grads
from tests.test_torch_reference import random_conv_specs
from tests.torch_reference import reference_batch, torch_loss_and_grads


def tiny(pool: str, stride: int = 2, padding: int = 1) -> dict:
    """The issue's instance: a 1x4x4 input, 2 channels of 2x2 kernels, stride 2, padding 1."""
    return {"name": f"tiny_{pool}", "input": [1, 4, 4], "layers": [
        {"op": "conv2d", "channels": 2, "kernel": 2, "stride": stride, "padding": padding,
         "activation": "tanh"},
        {"op": pool, "kernel": 2, "stride": 1},
        {"op": "flatten"},
        {"size": 2, "activation": "softmax"}], "loss": "cross_entropy"}


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
def test_the_tiny_instance_verifies_by_expansion(pool: str) -> None:
    report = verify(load_spec(tiny(pool)), points=6)
    assert report.ok, "\n".join(report.lines())
    checked = {check.formula for check in report.checks}
    assert {"delta^1", "delta^2", "dC/dw^1", "dC/db^1"} <= checked


def _formulas(spec: dict) -> dict:
    derivation = derive(build_model(load_spec(spec)))
    return {f.key: f for f in derivation.formulas}


def test_a_convolution_input_gets_the_full_correlation_with_the_flipped_kernel() -> None:
    """δ of a conv layer's input, as the reverse pass arrives at it, equals the textbook sum
    over output positions and kernel offsets under the brackets stride and padding imply."""
    spec = {"name": "two_convs", "input": [1, 6, 6], "layers": [
        {"op": "conv2d", "channels": 2, "kernel": 2, "activation": "tanh"},
        {"op": "conv2d", "channels": 3, "kernel": [2, 3], "stride": [1, 2], "padding": 1},
        {"op": "flatten"}, {"size": 2}], "loss": "mse"}
    formulas = _formulas(spec)
    delta1 = formulas["delta^1"]
    j, r, s = delta1.indices
    k, u, v = sp.symbols("k u v", integer=True, positive=True)
    d2, w2, a1 = (NetTensor("delta", 2, rank=3), NetTensor("w", 2, rank=4),
                  NetTensor("a", 1, rank=3))
    kh, kw, (sh, sw), (ph, pw) = 2, 3, (1, 2), (1, 1)
    p, q = r - sh * (u - 1) + ph, s - sw * (v - 1) + pw      # the kernel offsets, 1-based
    H2, W2 = sp.Symbol("H_2", integer=True, positive=True), sp.Symbol("W_2", integer=True,
                                                                       positive=True)
    n2 = sp.Symbol("n_2", integer=True, positive=True)
    expected = (1 - entry(a1, (j, r, s)) ** 2) * sp.Sum(
        InRange(p, 1, kh) * InRange(q, 1, kw) * entry(d2, (k, u, v)) * entry(w2, (k, j, p, q)),
        (k, 1, n2), (u, 1, H2), (v, 1, W2))
    difference = sp.expand((delta1.rhs - expected).doit())
    assert difference == 0 or sp.simplify(difference.subs({H2: 3, W2: 3, n2: 3})
                                          .doit()) == 0
    # ∂C/∂w is the correlation of the input with δ, ∂C/∂b the sum of δ over positions
    grad_w = formulas["dC/dw^2"]
    jj, kk, pp, qq = grad_w.indices
    rr, ss = sp.symbols("r s", integer=True, positive=True)
    H_2 = H2
    assert sp.simplify(grad_w.rhs - sp.Sum(
        entry(d2, (jj, rr, ss)) * entry(a1, (kk, sh * (rr - 1) + pp - ph,
                                             sw * (ss - 1) + qq - pw)),
        (rr, 1, H_2), (ss, 1, W2))) == 0
    grad_b = formulas["dC/db^2"]
    (jb,) = grad_b.indices
    assert sp.simplify(grad_b.rhs - sp.Sum(entry(d2, (jb, rr, ss)), (rr, 1, H_2),
                                           (ss, 1, W2))) == 0


def test_pooling_routes_delta_to_the_first_maximum_or_spreads_it() -> None:
    max_delta = _formulas(tiny("max_pool2d"))["delta^1"].rhs
    assert max_delta.has(FirstMax) and max_delta.has(InRange)
    (indicator,) = max_delta.atoms(FirstMax)
    assert isinstance(indicator.args[0], WindowMax)
    avg_delta = _formulas(tiny("avg_pool2d"))["delta^1"].rhs
    assert not avg_delta.has(FirstMax) and avg_delta.has(sp.Rational(1, 4))


def _module(spec: dict):
    return load_module(render_module(derive(build_model(load_spec(spec)))), spec["name"])


def _source_matching_pytorch(spec: dict, seed: int = 0) -> str:
    """The generated source of ``spec``, after checking its loss and gradients against
    PyTorch float64 on a batch of 3 with non-zero biases."""
    source = render_module(derive(build_model(load_spec(spec))))
    module = load_module(source, spec["name"])
    rng = np.random.default_rng(seed)
    params = {key: value + 0.1 * rng.standard_normal(value.shape)
              for key, value in module.init_params(seed=seed).items()}
    X, Y = reference_batch(spec, seed, 3)
    value, grads = module.gradients(params, X, Y)
    expected_value, expected = torch_loss_and_grads(spec, params, X, Y)
    assert value == pytest.approx(expected_value, rel=1e-10, abs=1e-12)
    for key in expected:
        scale = max(1.0, float(np.abs(expected[key]).max()))
        assert np.abs(grads[key] - expected[key]).max() / scale < 1e-10, key
    return source


def _pooled(activation: str, pool: str, after: dict | None = None) -> dict:
    """conv2d 3x3 (activation) -> 2x2 pool -> flatten -> [after] -> dense softmax."""
    return {"name": "pooled", "input": [2, 4, 4], "layers": [
        {"op": "conv2d", "channels": 2, "kernel": 3, "padding": 1, "activation": activation},
        {"op": pool, "kernel": 2}, {"op": "flatten"}, *([after] if after else []),
        {"size": 3, "activation": "softmax"}], "loss": "cross_entropy"}


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("after", [*ELEMENTWISE, "dropout"])
def test_an_op_after_flatten_leaves_the_pooled_maps_it_views_alone(pool: str, after: str
                                                                   ) -> None:
    """flatten's result is a transposed view of the pooled maps, which a max pool's error
    reads again as its windows' maxima: an activation computed in place into that view wrote
    over them (gradients off by 50% before this test), so a view is never written in place."""
    layer = {"op": "dropout", "rate": 0.5} if after == "dropout" else {
        "op": "activation", "activation": after}
    _source_matching_pytorch(_pooled("tanh", pool, layer))


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_a_pooled_activation_derivative_is_taken_where_the_error_lands(pool: str,
                                                                      activation: str) -> None:
    """Before a max pool, an activation derivative written in the output, f(a¹), is taken on
    the pooled maxima a², where routing puts the error, and z¹ is not kept; before a 2x2
    average pool, f into δ¹ and each tile times its error, no spread copy of it. Both match
    PyTorch."""
    source = _source_matching_pytorch(_pooled(activation, pool))
    derivative = activation_derivative(resolve_activation(activation))
    form = derivative.in_a if derivative.in_a is not None else derivative.in_z
    cache = next(line for line in source.splitlines() if line.strip().startswith("cache = "))
    if pool == "max_pool2d":
        in_output = derivative.in_a is not None and bool(derivative.in_a.free_symbols)
        assert ("_max_unpool(routed_delta2, A1, A2" in source) == in_output
        assert ('"Z1"' in cache) == (derivative.in_a is None)
    else:
        # a bracket [a > 0] is a boolean mask: no array to multiply the tiles into
        bracket = isinstance(form, sp.Piecewise) and [v for v, _ in form.args] == [1, 0]
        compound = bool(form.free_symbols) and not bracket
        assert ("delta1 = _times_tiles(delta1, " in source) == compound
        assert ("_fold(" in source) == (not compound)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=random_conv_specs(chain=False), seed=st.integers(0, 1000))
def test_random_image_specs_match_pytorch_and_central_differences(spec: dict,
                                                                  seed: int) -> None:
    if spec["layers"][-1].get("op") == "conv2d":
        # an image output: the loss reads a vector, refused in one line
        with pytest.raises(DeriveError, match="the last layer gives an image"):
            load_spec(spec)
        return
    module = _module(spec)
    params = module.init_params(seed=seed)
    rng = np.random.default_rng(seed)
    params = {key: value + 0.1 * rng.standard_normal(value.shape) for key, value in
              params.items()}        # non-zero biases
    X, Y = reference_batch(spec, seed, 3)
    value, grads = module.gradients(params, X, Y)
    expected_value, expected = torch_loss_and_grads(spec, params, X, Y)
    assert value == pytest.approx(expected_value, rel=1e-10, abs=1e-12)
    for key in expected:
        scale = max(1.0, float(np.abs(expected[key]).max()))
        assert np.abs(grads[key] - expected[key]).max() / scale < 1e-10, key
    if not any("inputs" in layer or layer.get("op") in ("dropout", "layer_norm")
               for layer in spec["layers"]):
        loop_value, loop = conv_net_loss_and_grads(spec, params, X, Y)
        assert value == pytest.approx(loop_value, rel=1e-10, abs=1e-12)
        for key in loop:
            scale = max(1.0, float(np.abs(loop[key]).max()))
            assert np.abs(grads[key] - loop[key]).max() / scale < 1e-10, key
    # central differences across a relu-family kink near 0 are inexact (about 1e-6 here and
    # there); a wrong formula gives about 1, and exactness is PyTorch's comparison above
    assert module.gradient_check(params, X, Y) < 1e-4


def test_a_given_dropout_mask_of_feature_maps_is_read_per_sample_as_pytorch_would() -> None:
    """Generated code keeps feature maps batch-last, (C, H, W, B); a dropout mask is given as
    X is, (B, C, H, W), and must still drop entry (c, h, w) of sample b: the gradients with
    masks whose every entry differs match PyTorch's conv2d, relu, mask, flatten and linear."""
    torch = pytest.importorskip("torch")
    spec = {"name": "dropped", "input": [2, 4, 3], "layers": [
        {"op": "conv2d", "channels": 3, "kernel": [2, 3], "padding": [0, 1],
         "activation": "relu"},
        {"op": "dropout", "rate": 0.5},
        {"op": "flatten"},
        {"size": 4, "activation": "softmax"}], "loss": "cross_entropy"}
    module = _module(spec)
    rng = np.random.default_rng(3)
    params = {key: value + 0.1 * rng.standard_normal(value.shape)
              for key, value in module.init_params(seed=3).items()}
    X = rng.standard_normal((5, 2, 4, 3))
    Y = np.eye(4)[rng.integers(0, 4, 5)]
    (name,) = module.DROPOUT_SHAPES
    mask = rng.uniform(0.0, 2.0, (5, *module.DROPOUT_SHAPES[name]))
    value, grads = module.gradients(params, X, Y, {name: mask})
    tensors = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    maps = torch.relu(torch.nn.functional.conv2d(torch.tensor(X), tensors["W1"], tensors["b1"],
                                                 padding=(0, 1))) * torch.tensor(mask)
    logits = maps.flatten(1) @ tensors["W4"].T + tensors["b4"]
    expected = -(torch.tensor(Y) * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-12)
    for key, tensor in tensors.items():
        assert np.allclose(grads[key], tensor.grad.numpy(), rtol=1e-10, atol=1e-12), key


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
def test_custom_activations_around_a_pool_give_the_built_ins_gradients(pool: str) -> None:
    """A custom activation on a convolution, and one after a flatten, written as a built-in's
    formula: the module renders (the overflow probe reads feature-map formulas as numbers)
    and gives the built-in network's loss and gradients, which match PyTorch."""
    def spec(first, second) -> dict:
        return {"name": "custom_maps", "input": [2, 6, 6], "layers": [
            {"op": "conv2d", "channels": 3, "kernel": 3, "padding": 1, "activation": first},
            {"op": pool, "kernel": 2}, {"op": "flatten"},
            {"op": "activation", "activation": second},
            {"size": 3, "activation": "softmax"}], "loss": "cross_entropy"}

    built_in = load_module(_source_matching_pytorch(spec("tanh", "softplus")), "built_in")
    custom = _module(spec({"name": "mytanh", "expr": "tanh(z)"},
                          {"name": "mysoftplus", "expr": "log(1 + exp(z))"}))
    rng = np.random.default_rng(2)
    params = {key: value + 0.1 * rng.standard_normal(value.shape)
              for key, value in built_in.init_params(seed=2).items()}
    X, Y = reference_batch(spec("tanh", "softplus"), 2, 3)
    (value, grads), (expected_value, expected) = (custom.gradients(params, X, Y),
                                                  built_in.gradients(params, X, Y))
    assert value == pytest.approx(expected_value, rel=1e-12)
    for key in expected:
        assert np.allclose(grads[key], expected[key], rtol=1e-10, atol=1e-13), key
