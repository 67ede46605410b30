"""Self-test of the independent references: PyTorch autograd against the NumPy forward pass,
and, for convolutional chains, against the loop-by-loop backward pass of tests/conv_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import conv_reference
from tests.strategies import ELEMENTWISE_ACTIVATIONS, random_batch, random_dag_specs
from tests.torch_reference import (
    ATTENTION_MODES,
    Node,
    _np_attention,
    _torch_attention,
    init_reference_params,
    numpy_forward_loss,
    reference_batch,
    reference_graph,
    spec_input_shape,
    spec_input_size,
    spec_output_shape,
    spec_output_size,
    torch_loss_and_grads,
)

pytest.importorskip("torch")

RESIDUAL_SPEC = {
    "name": "resmlp",
    "input": 3,
    "layers": [
        {"size": 4, "activation": "relu", "name": "h1"},
        {"op": "dense", "size": 4, "activation": {"name": "leaky_relu", "alpha": 0.2}},
        {"op": "layer_norm", "name": "ln"},
        {"op": "add", "inputs": ["h1", 3, 2]},
        {"op": "dropout", "rate": 0.5},
        {"op": "activation", "activation": "gelu"},
        {"size": 4, "bias": False, "activation": "elu", "input": "h1"},
        {"op": "add", "inputs": [6, 7]},
        {"op": "dense", "size": 3, "activation": "softmax"},
    ],
    "loss": "cross_entropy",
    "regularization": {"l2": 1.0e-2, "l1": 1.0e-3},
}


def central_differences(spec: dict, params: dict[str, np.ndarray], X: np.ndarray,
                        Y: np.ndarray, h: float = 1e-5) -> dict[str, np.ndarray]:
    """Gradient of the NumPy batch cost by fourth-order central differences, entry by entry.

    (8 (f(w+h) - f(w-h)) - (f(w+2h) - f(w-2h))) / 12h: truncation O(h^4), so h can be large
    enough to keep rounding small even where layer_norm over two features is steep.
    """
    def cost_at(name: str, index: tuple[int, ...], step: float) -> float:
        shifted = {k: v.copy() for k, v in params.items()}
        shifted[name][index] += step
        return numpy_forward_loss(spec, shifted, X, Y)

    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            f = [cost_at(name, index, step) for step in (h, -h, 2 * h, -2 * h)]
            grad[index] = (8 * (f[0] - f[1]) - (f[2] - f[3])) / (12 * h)
        grads[name] = grad
    return grads


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the larger of the two arrays' max magnitude (at least 1e-3)."""
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-3)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def check_spec(spec: dict, seed: int, batch: int = 5) -> None:
    """Torch loss equals the NumPy loss; torch gradients match central differences."""
    params = init_reference_params(spec, seed)
    X, Y = random_batch(spec, seed, batch)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(numpy_forward_loss(spec, params, X, Y), rel=1e-12, abs=1e-12)
    assert set(grads) == set(params)
    numeric = central_differences(spec, params, X, Y)
    for name in params:
        assert grads[name].shape == params[name].shape
        assert relative_error(grads[name], numeric[name]) < 1e-6, name


def test_residual_spec() -> None:
    assert spec_input_size(RESIDUAL_SPEC) == 3
    assert spec_output_size(RESIDUAL_SPEC) == 3
    assert set(init_reference_params(RESIDUAL_SPEC, 0)) == {
        "W1", "b1", "W2", "b2", "gamma3", "beta3", "W7", "W9", "b9"}
    for seed in range(3):
        check_spec(RESIDUAL_SPEC, seed)


def test_regularization_counts_weights_only() -> None:
    spec = {**RESIDUAL_SPEC, "regularization": {}}
    params = init_reference_params(spec, 1)
    X, Y = random_batch(spec, 1, 4)
    base = numpy_forward_loss(spec, params, X, Y)
    l2, l1 = 0.3, 0.2
    reg_spec = {**spec, "regularization": {"l2": l2, "l1": l1}}
    weights = [v for k, v in params.items() if k.startswith("W")]
    expected = base + l2 / 2 * sum((w ** 2).sum() for w in weights) + l1 * sum(
        np.abs(w).sum() for w in weights)
    loss, grads = torch_loss_and_grads(reg_spec, params, X, Y)
    assert loss == pytest.approx(expected, rel=1e-12)
    _, plain = torch_loss_and_grads(spec, params, X, Y)
    np.testing.assert_allclose(grads["W7"], plain["W7"] + l2 * params["W7"]
                               + l1 * np.sign(params["W7"]), rtol=1e-12)
    np.testing.assert_allclose(grads["gamma3"], plain["gamma3"], rtol=1e-12)


def test_rejects_bad_specs() -> None:
    unused = {"input": 2, "layers": [{"size": 2, "name": "a"}, {"size": 2, "input": "input"}],
              "loss": "mse"}
    with pytest.raises(ValueError, match="unused"):
        reference_graph(unused)
    custom = {"input": 2, "layers": [{"size": 1, "activation": {"name": "sq", "expr": "x**2"}}],
              "loss": "mse"}
    with pytest.raises(NotImplementedError):
        reference_graph(custom)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_dag_specs(), seed=st.integers(0, 2**16))
def test_random_dag_specs(spec: dict, seed: int) -> None:
    graph = reference_graph(spec)  # valid: every layer used, widths agree
    assert 2 <= len(graph.nodes) <= 6
    check_spec(spec, seed)


# --- images: conv2d, pooling, flatten ------------------------------------------------------------


def _pair_value(draw: st.DrawFn, pair: tuple[int, int]) -> int | list[int]:
    """A (h, w) attribute as the spec may write it: an int when h == w (or a list), else a list."""
    if pair[0] == pair[1] and draw(st.booleans()):
        return pair[0]
    return list(pair)


def _window_layer(draw: st.DrawFn, op: str, shape: tuple[int, int, int],
                  activations: tuple = ELEMENTWISE_ACTIVATIONS) -> tuple[dict, tuple]:
    """A conv2d / max_pool2d / avg_pool2d layer that fits ``shape``; (layer, output shape)."""
    c, h, w = shape
    layer: dict = {"op": op}
    padding = (0, 0)
    if op == "conv2d":
        padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
        if padding != (0, 0) or draw(st.booleans()):
            layer["padding"] = _pair_value(draw, padding)
    kernel = (draw(st.integers(1, min(3, h + 2 * padding[0]))),
              draw(st.integers(1, min(3, w + 2 * padding[1]))))
    layer["kernel"] = _pair_value(draw, kernel)
    stride = kernel if op != "conv2d" else (1, 1)
    if draw(st.booleans()):
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        layer["stride"] = _pair_value(draw, stride)
    out = tuple((n + 2 * pad - k) // st_ + 1
                for n, k, st_, pad in zip((h, w), kernel, stride, padding))
    if op == "conv2d":
        c = draw(st.integers(1, 3))
        layer["channels"] = c
        bias = draw(st.sampled_from([None, True, False]))
        if bias is not None:
            layer["bias"] = bias
        act = draw(st.sampled_from((None,) + activations))
        if act is not None:
            layer["activation"] = act
    return layer, (c, *out)


@st.composite
def random_conv_specs(draw: st.DrawFn, chain: bool = True) -> dict:
    """A small valid spec with image input: 1-3 image layers (conv2d, pools, activation; with
    ``chain=False`` also dropout, ``add`` skip connections and residual blocks: a conv2d that
    keeps the shape, added to its input), then either an image output (a
    conv2d: mse, or sigmoid + binary_cross_entropy) or flatten, at most one hidden vector
    layer (dense or activation; layer_norm when not ``chain``) and a dense output.
    C <= 3, H, W <= 7, kernel <= 3, stride <= 2, padding <= 1."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    shapes = [shape]
    layers: list[dict] = []
    for _ in range(draw(st.integers(1, 3))):
        ops = ["conv2d", "conv2d", "max_pool2d", "avg_pool2d", "activation"]
        same = [i for i in range(len(shapes) - 1) if shapes[i] == shape]
        if not chain:
            ops += ["dropout", "residual", "residual"] + (["add", "add"] if same else [])
        op = draw(st.sampled_from(ops))
        if op == "residual":  # a shape-keeping conv2d (odd kernel, half padding), then add
            kernel = (draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3])))
            layers.append({"op": "conv2d", "channels": shape[0],
                           "kernel": _pair_value(draw, kernel),
                           "padding": _pair_value(draw, (kernel[0] // 2, kernel[1] // 2)),
                           "activation": draw(st.sampled_from(ELEMENTWISE_ACTIVATIONS))})
            shapes.append(shape)
            layer = {"op": "add", "inputs": draw(st.permutations([len(shapes) - 1,
                                                                  len(shapes) - 2]))}
        elif op == "activation":
            layer = {"op": op, "activation": draw(st.sampled_from(ELEMENTWISE_ACTIVATIONS))}
        elif op == "dropout":
            layer = {"op": op, "rate": 0.5}
        elif op == "add":
            other = draw(st.sampled_from(same))
            layer = {"op": op, "inputs": draw(st.permutations([len(shapes) - 1, other]))}
        else:
            layer, shape = _window_layer(draw, op, shape)
        layers.append(layer)
        shapes.append(shape)
    if draw(st.integers(0, 2)) == 0:  # an image output
        loss = draw(st.sampled_from(["mse", "binary_cross_entropy"]))
        acts = ELEMENTWISE_ACTIVATIONS if loss == "mse" else ("sigmoid",)
        layer, shape = _window_layer(draw, "conv2d", shape, acts)
        if loss == "binary_cross_entropy":
            layer["activation"] = "sigmoid"
        layers.append(layer)
    else:
        layers.append({"op": "flatten"})
        width = shape[0] * shape[1] * shape[2]
        hidden = ["none", "dense", "activation"] + ([] if chain else ["layer_norm"] * (width > 1))
        kind = draw(st.sampled_from(hidden))
        if kind == "dense":
            layers.append({"size": draw(st.integers(1, 3)),
                           "activation": draw(st.sampled_from(ELEMENTWISE_ACTIVATIONS))})
        elif kind == "activation":
            layers.append({"op": "activation",
                           "activation": draw(st.sampled_from(ELEMENTWISE_ACTIVATIONS))})
        elif kind == "layer_norm":
            layers.append({"op": "layer_norm"})
        loss = draw(st.sampled_from(["mse", "cross_entropy", "binary_cross_entropy"]))
        if loss == "cross_entropy":
            out = {"size": draw(st.integers(2, 3)), "activation": "softmax"}
        elif loss == "binary_cross_entropy":
            out = {"size": draw(st.integers(1, 3)), "activation": "sigmoid"}
        else:
            out = {"size": draw(st.integers(1, 3)),
                   "activation": draw(st.sampled_from(ELEMENTWISE_ACTIVATIONS))}
        if draw(st.booleans()):
            out["bias"] = False
        layers.append(out)
    spec = {"name": "convnet", "input": list(shapes[0]), "layers": layers, "loss": loss}
    reg = draw(st.sampled_from([None, {"l2": 0.01}, {"l1": 0.01}, {"l2": 0.05, "l1": 0.02}]))
    if reg is not None:
        spec["regularization"] = reg
    return spec


def difference_error(exact: np.ndarray, numeric: np.ndarray, cost: float) -> float:
    """max |exact - numeric| in units of rtol * max|exact| + atol, rtol = 1e-8 and atol =
    1e-10 * max(1, |cost|): the differences of f(w +- h) lose about eps * |cost| / h ~ 1e-11 * |cost|
    to rounding (h = 1e-5), which dominates for gradients much smaller than 1e-3."""
    tolerance = 1e-8 * np.abs(exact).max(initial=0.0) + 1e-10 * max(1.0, abs(cost))
    return float(np.abs(exact - numeric).max(initial=0.0) / tolerance)


def away_from_zero(params: dict[str, np.ndarray], margin: float = 1e-3) -> dict[str, np.ndarray]:
    """The parameters with every entry of magnitude below ``margin`` pushed out to it, so that
    finite differences of an l1 penalty never straddle its kink at 0."""
    return {name: np.where(np.abs(value) < margin, np.where(value < 0, -margin, margin), value)
            for name, value in params.items()}


def check_image_spec(spec: dict, seed: int, batch: int, chain: bool) -> None:
    """Torch, central differences of the NumPy forward and (for chains) conv_reference agree."""
    params = away_from_zero(init_reference_params(spec, seed))
    X, Y = reference_batch(spec, seed, batch)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(numpy_forward_loss(spec, params, X, Y), rel=1e-12, abs=1e-12)
    assert set(grads) == set(params)
    numeric = central_differences(spec, params, X, Y)
    for name in params:
        assert grads[name].shape == params[name].shape
        assert difference_error(grads[name], numeric[name], loss) < 1.0, name
    if chain:
        naive_loss, naive = conv_reference.conv_net_loss_and_grads(spec, params, X, Y)
        assert naive_loss == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert set(naive) == set(params)
        for name in params:
            assert relative_error(naive[name], grads[name]) < 1e-11, name


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_conv_specs(), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_random_conv_chains_three_references_agree(spec: dict, seed: int, batch: int) -> None:
    check_image_spec(spec, seed, batch, chain=True)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_conv_specs(chain=False), seed=st.integers(0, 2**16),
       batch=st.integers(1, 3))
def test_random_conv_graphs_torch_matches_differences(spec: dict, seed: int,
                                                      batch: int) -> None:
    check_image_spec(spec, seed, batch, chain=False)


LENET_SPEC = {
    "name": "lenet",
    "input": [2, 7, 6],
    "layers": [
        {"op": "conv2d", "channels": 3, "kernel": [3, 2], "stride": [2, 1], "padding": 1,
         "activation": "tanh"},                                       # [3, 4, 7]
        {"op": "max_pool2d", "kernel": 2, "stride": [1, 2]},           # [3, 3, 3]
        {"op": "conv2d", "channels": 2, "kernel": 2, "padding": [1, 0], "bias": False,
         "activation": {"name": "leaky_relu", "alpha": 0.1}},          # [2, 4, 2]
        {"op": "avg_pool2d", "kernel": [2, 1]},                        # [2, 2, 2]
        {"op": "flatten"},                                             # 8
        {"size": 4, "activation": "gelu"},
        {"size": 3, "activation": "softmax"},
    ],
    "loss": "cross_entropy",
    "regularization": {"l2": 0.02, "l1": 0.01},
}


def test_image_spec_shapes() -> None:
    graph = reference_graph(LENET_SPEC)
    assert spec_input_shape(LENET_SPEC) == (2, 7, 6)
    assert [node.shape for node in graph.nodes] == [
        (3, 4, 7), (3, 3, 3), (2, 4, 2), (2, 2, 2), (8,), (4,), (3,)]
    assert spec_output_shape(LENET_SPEC) == (3,)
    assert spec_output_size(LENET_SPEC) == 3
    assert graph.param_shapes == {"W1": (3, 2, 3, 2), "b1": (3,), "W3": (2, 3, 2, 2),
                                  "W6": (4, 8), "b6": (4,), "W7": (3, 4), "b7": (3,)}
    assert graph.weight_names == ["W1", "W3", "W6", "W7"]
    assert conv_reference.parameter_shapes(LENET_SPEC) == graph.param_shapes
    with pytest.raises(NotImplementedError, match="spec_input_shape"):
        spec_input_size(LENET_SPEC)
    X, Y = reference_batch(LENET_SPEC, 0, 4)
    assert X.shape == (4, 2, 7, 6) and Y.shape == (4, 3)
    np.testing.assert_allclose(Y.sum(axis=1), 1.0)
    # vector specs: the batch of tests.strategies.random_batch, and the former 0.5 * normal
    # initialisation of narrow dense layers
    vector = {"input": 3, "layers": [{"size": 2}], "loss": "mse"}
    for got, want in zip(reference_batch(vector, 5, 3), random_batch(vector, 5, 3)):
        np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(init_reference_params(vector, 7)["W1"],
                                  0.5 * rng.standard_normal((2, 3)))
    # conv kernels: fan-in scaling
    kernels = init_reference_params({"input": [3, 9, 9], "layers": [
        {"op": "conv2d", "channels": 40, "kernel": 3}], "loss": "mse"}, 0)["W1"]
    assert kernels.std() == pytest.approx(1 / np.sqrt(27), rel=0.1)


@pytest.mark.parametrize("seed", [0, 1])
def test_lenet_spec_three_references_agree(seed: int) -> None:
    check_image_spec(LENET_SPEC, seed, 3, chain=True)


def test_image_output_sums_the_loss_over_every_component() -> None:
    spec = {"input": [1, 3, 2], "layers": [
        {"op": "conv2d", "channels": 2, "kernel": 1, "bias": False}], "loss": "mse"}
    params = {"W1": np.zeros((2, 1, 1, 1))}
    X = np.random.default_rng(0).standard_normal((4, 1, 3, 2))
    Y = np.ones((4, 2, 3, 2))
    expected = 0.5 * 2 * 3 * 2  # every one of the 12 components of a sample, mean over 4
    assert numpy_forward_loss(spec, params, X, Y) == pytest.approx(expected, rel=1e-15)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    naive_loss, naive = conv_reference.conv_net_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(expected, rel=1e-15)
    assert naive_loss == pytest.approx(expected, rel=1e-15)
    # dC/dW[j] = mean over samples of sum_{r,s} (0 - 1) * x[r, s]
    want = -X.sum(axis=(1, 2, 3)).mean() * np.ones((2, 1, 1, 1))
    np.testing.assert_allclose(grads["W1"], want, rtol=1e-13)
    np.testing.assert_allclose(naive["W1"], want, rtol=1e-13)


def test_conv2d_is_cross_correlation_with_zero_padding() -> None:
    """A kernel with a single 1 at (p, q) = (1, 2) (1-based) reads x[i, i2 + 1]: no flip."""
    import torch
    import torch.nn.functional as F

    x = np.arange(1.0, 13.0).reshape(1, 1, 3, 4)
    W = np.zeros((1, 1, 2, 2))
    W[0, 0, 0, 1] = 1.0
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = padded[:, :, 0:3:2, 1:6:2]  # z[r, s] = xpad[2(r-1) + 1, 2(s-1) + 2], 1-based
    assert want.shape == (1, 1, 2, 3)
    naive = conv_reference.conv2d_forward(x, W, None, (2, 2), (1, 1), (2, 3))
    np.testing.assert_array_equal(naive, want)
    torch_z = F.conv2d(torch.tensor(x), torch.tensor(W), stride=2, padding=1).numpy()
    np.testing.assert_array_equal(torch_z, want)
    np.testing.assert_array_equal(conv_reference.flatten_forward(naive),
                                  torch.flatten(torch.tensor(naive), 1).numpy())


def test_max_pool_ties_route_to_the_first_maximum() -> None:
    """PyTorch and conv_reference send a tied window's gradient to its FIRST maximum in
    row-major order; the generated code does the same. (Finite differences cannot check this:
    at a tie the cost is not differentiable.)"""
    import torch
    import torch.nn.functional as F

    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 2.0, 3.0],
                    [0.0, 0.0, 0.0]]]])
    first = np.array([[[[0.0, 2.0, 0.0],     # windows (1,1), (1,2) pick x[1,2]
                        [1.0, 0.0, 1.0],     # window (2,1) x[2,1]; window (2,2) x[2,3]
                        [0.0, 0.0, 0.0]]]])
    xt = torch.tensor(x, requires_grad=True)
    F.max_pool2d(xt, 2, stride=1).sum().backward()
    np.testing.assert_array_equal(xt.grad.numpy(), first)
    out, where = conv_reference.max_pool2d_forward(x, (2, 2), (1, 1), (2, 2))
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), 3.0))
    dx = conv_reference.max_pool2d_backward(np.ones((1, 1, 2, 2)), where, x.shape)
    np.testing.assert_array_equal(dx, first)
    spec = {"input": [1, 3, 3], "layers": [{"op": "max_pool2d", "kernel": 2, "stride": 1},
                                           {"op": "flatten"}, {"size": 1, "bias": False}],
            "loss": "mse"}
    params, Y = {"W3": np.ones((1, 4))}, np.zeros((1, 1))
    _, grads = torch_loss_and_grads(spec, params, x, Y)
    _, naive = conv_reference.conv_net_loss_and_grads(spec, params, x, Y)
    np.testing.assert_array_equal(grads["W3"], naive["W3"])


def test_regularization_covers_conv_kernels() -> None:
    spec = {**LENET_SPEC, "regularization": {}}
    params = init_reference_params(spec, 3)
    X, Y = reference_batch(spec, 3, 2)
    base = numpy_forward_loss(spec, params, X, Y)
    l2, l1 = 0.3, 0.2
    reg_spec = {**spec, "regularization": {"l2": l2, "l1": l1}}
    weights = [params[name] for name in ("W1", "W3", "W6", "W7")]
    expected = base + l2 / 2 * sum((w ** 2).sum() for w in weights) + l1 * sum(
        np.abs(w).sum() for w in weights)
    _, plain = torch_loss_and_grads(spec, params, X, Y)
    for reference in (torch_loss_and_grads, conv_reference.conv_net_loss_and_grads):
        loss, grads = reference(reg_spec, params, X, Y)
        assert loss == pytest.approx(expected, rel=1e-12)
        np.testing.assert_allclose(grads["W1"], plain["W1"] + l2 * params["W1"]
                                   + l1 * np.sign(params["W1"]), rtol=1e-10)
        np.testing.assert_allclose(grads["b1"], plain["b1"], rtol=1e-10)


@pytest.mark.parametrize(("layers", "error", "match"), [
    ([{"op": "conv2d", "channels": 2, "kernel": 2, "activation": "softmax"}], ValueError,
     "softmax"),
    ([{"op": "activation", "activation": "softmax"}], ValueError, "softmax"),
    ([{"size": 2}], ValueError, "flatten it first"),
    ([{"op": "layer_norm"}], ValueError, "vector"),
    ([{"op": "conv2d", "kernel": 2}], ValueError, "channels"),
    ([{"op": "conv2d", "channels": 1}], ValueError, "kernel"),
    ([{"op": "conv2d", "channels": 1, "kernel": 5}], ValueError, "exceeds"),
    ([{"op": "conv2d", "channels": 1, "kernel": 6, "padding": 1}], ValueError, "padded"),
    ([{"op": "conv2d", "channels": 1, "kernel": 2, "stride": 0}], ValueError, "stride"),
    ([{"op": "conv2d", "channels": 1, "kernel": [2, 2, 2]}], ValueError, "kernel"),
    ([{"op": "max_pool2d", "kernel": [2, 4]}], ValueError, "exceeds"),
    ([{"op": "avg_pool2d", "kernel": 2, "padding": 1}], ValueError, "padding"),
    ([{"op": "flatten"}, {"op": "flatten"}], ValueError, "image"),
])
def test_rejects_bad_image_specs(layers: list, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        reference_graph({"input": [1, 3, 3], "layers": layers, "loss": "mse"})


def test_rejects_bad_image_inputs() -> None:
    for value in ([1, 3], [1, 0, 3], [1, 2.5, 3], "image"):
        with pytest.raises((ValueError, NotImplementedError)):
            spec_input_shape({"input": value, "layers": [], "loss": "mse"})
    vector = {"input": 4, "layers": [{"op": "max_pool2d", "kernel": 2}], "loss": "mse"}
    with pytest.raises(ValueError, match="reads an image"):
        reference_graph(vector)
    dag = {"input": [1, 2, 2], "layers": [{"op": "activation", "activation": "tanh"},
                                          {"op": "add", "inputs": ["input", 1]}],
           "loss": "mse"}
    assert spec_output_shape(dag) == (1, 2, 2)
    with pytest.raises(NotImplementedError, match="chains only"):
        conv_reference.conv_net_loss_and_grads(dag, {}, np.zeros((1, 1, 2, 2)),
                                               np.zeros((1, 1, 2, 2)))


# --- sequences: rnn, lstm, gru -------------------------------------------------------------------

#: The built-in sequence examples, as dicts.
RNN_SINE = {"name": "rnn_sine", "input": {"size": 1, "length": 20},
            "layers": [{"op": "rnn", "size": 16}, {"size": 1}], "loss": "mse"}
LSTM_ADDING = {"name": "lstm_adding", "input": {"size": 2, "length": 20},
               "layers": [{"op": "lstm", "size": 32, "return": "last"}, {"size": 1}],
               "loss": "mse"}
GRU_TONES = {"name": "gru_tones", "input": {"size": 1, "length": 16},
             "layers": [{"op": "gru", "size": 16, "return": "last"},
                        {"size": 3, "activation": "softmax"}],
             "loss": "cross_entropy"}
SEQUENCE_LOSSES = {"mse": "tanh", "cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}


def sequence_spec(cell: str, returns: str, loss: str, **extra: object) -> dict:
    """input (T, n) = (4, 2) -> ``cell`` of size 3 -> dense of 2 (per step for a sequence),
    with l2 and l1 regularization; ``extra`` are attributes of the recurrent layer."""
    return {"name": f"{cell}_{returns}", "input": {"size": 2, "length": 4},
            "layers": [{"op": cell, "size": 3, "return": returns, **extra},
                       {"size": 2, "activation": SEQUENCE_LOSSES[loss]}],
            "loss": loss, "regularization": {"l2": 0.02, "l1": 0.01}}


def difference_check(spec: dict, params: dict[str, np.ndarray], X: np.ndarray, Y: np.ndarray,
                     grads: dict[str, np.ndarray], entries: int | None = None,
                     eps: float = 1e-6) -> dict[str, float]:
    """Relative error of torch's gradient against central differences
    (f(w + eps) - f(w - eps)) / 2 eps of :func:`numpy_forward_loss`, per parameter: over every
    entry, or over ``entries`` entries drawn at random; max |difference| over the selected
    entries, relative to max |gradient| over the whole parameter (at least 1e-3)."""
    rng = np.random.default_rng(0)
    errors = {}
    for name, value in params.items():
        indices = list(np.ndindex(value.shape))
        if entries is not None and entries < len(indices):
            indices = [indices[i] for i in rng.choice(len(indices), entries, replace=False)]
        worst = 0.0
        for index in indices:
            f = []
            for step in (eps, -eps):
                shifted = dict(params)
                shifted[name] = value.copy()
                shifted[name][index] += step
                f.append(numpy_forward_loss(spec, shifted, X, Y))
            worst = max(worst, abs((f[0] - f[1]) / (2 * eps) - grads[name][index]))
        errors[name] = worst / max(float(np.abs(grads[name]).max()), 1e-3)
    return errors


def check_sequence_spec(spec: dict, seed: int, batch: int = 3,
                        entries: int | None = None) -> None:
    """Torch and NumPy losses agree to 1e-10; torch gradients match central differences."""
    params = away_from_zero(init_reference_params(spec, seed))
    X, Y = reference_batch(spec, seed, batch)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(numpy_forward_loss(spec, params, X, Y), rel=1e-10, abs=1e-10)
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == params[name].shape, name
        assert np.abs(grads[name]).max() > 1e-6, name  # every parameter matters
    errors = difference_check(spec, params, X, Y, grads, entries)
    assert max(errors.values()) < 1e-6, errors


def test_sequence_spec_shapes() -> None:
    assert spec_input_shape(RNN_SINE) == (20, 1)
    assert spec_output_shape(RNN_SINE) == (20, 1)
    graph = reference_graph(RNN_SINE)
    assert graph.param_shapes == {"Wx1": (16, 1), "Wh1": (16, 16), "b1": (16,),
                                  "W2": (1, 16), "b2": (1,)}
    assert graph.weight_names == ["Wx1", "Wh1", "W2"]
    assert spec_input_shape(LSTM_ADDING) == (20, 2)
    assert spec_output_shape(LSTM_ADDING) == (1,) and spec_output_size(LSTM_ADDING) == 1
    assert reference_graph(LSTM_ADDING).param_shapes == {
        "Wx1": (128, 2), "Wh1": (128, 32), "b1": (128,), "W2": (1, 32), "b2": (1,)}
    graph = reference_graph(GRU_TONES)
    assert graph.param_shapes == {"Wx1": (48, 1), "Wh1": (48, 16), "bx1": (48,),
                                  "bh1": (48,), "W2": (3, 16), "b2": (3,)}
    assert graph.weight_names == ["Wx1", "Wh1", "W2"]
    X, Y = reference_batch(GRU_TONES, 0, 5)
    assert X.shape == (5, 16, 1) and Y.shape == (5, 3)
    np.testing.assert_allclose(Y.sum(axis=1), 1.0)
    for spec in (RNN_SINE, LSTM_ADDING, GRU_TONES):
        params = init_reference_params(spec, 0)
        assert {k: v.shape for k, v in params.items()} == reference_graph(spec).param_shapes
    with pytest.raises(NotImplementedError, match="not a vector"):
        spec_input_size(RNN_SINE)
    with pytest.raises(NotImplementedError, match="sequence"):
        spec_output_size(RNN_SINE)
    # cross-entropy targets of a sequence output: a distribution at every time step
    spec = sequence_spec("gru", "sequence", "cross_entropy")
    X, Y = reference_batch(spec, 1, 3)
    assert X.shape == (3, 4, 2) and Y.shape == (3, 4, 2)
    np.testing.assert_allclose(Y.sum(axis=2), 1.0)
    assert (Y > 0).all()
    # the output of every layer after the recurrent one keeps the time axis
    chain = {"input": {"size": 2, "length": 3}, "layers": [
        {"op": "lstm", "size": 4, "name": "h"}, {"size": 3, "activation": "relu"},
        {"op": "dropout", "rate": 0.1}, {"size": 4}, {"op": "add", "inputs": ["h", 4]},
        {"op": "rnn", "size": 2, "activation": "silu", "bias": False, "return": "last"}],
        "loss": "mse"}
    assert [node.shape for node in reference_graph(chain).nodes] == [
        (3, 4), (3, 3), (3, 3), (3, 4), (3, 4), (2,)]
    assert set(reference_graph(chain).param_shapes) == {
        "Wx1", "Wh1", "b1", "W2", "b2", "W4", "b4", "Wx6", "Wh6"}


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
@pytest.mark.parametrize("returns", ["sequence", "last"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_torch_matches_numpy(cell: str, returns: str, loss: str) -> None:
    spec = sequence_spec(cell, returns, loss)
    for seed in range(3):
        params = init_reference_params(spec, seed)
        X, Y = reference_batch(spec, seed, 3)
        loss_value, _ = torch_loss_and_grads(spec, params, X, Y)
        assert loss_value == pytest.approx(numpy_forward_loss(spec, params, X, Y), rel=1e-10,
                                           abs=1e-10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("returns", ["sequence", "last"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_torch_matches_differences(cell: str, returns: str, loss: str) -> None:
    check_sequence_spec(sequence_spec(cell, returns, loss), seed=11)


@pytest.mark.parametrize("activation", [
    "relu",                                  # torch.nn.RNN(nonlinearity="relu")
    "sigmoid", "identity", "gelu",           # written out in torch ops, step by step
    {"name": "leaky_relu", "alpha": 0.2},
])
def test_rnn_activations(activation: object) -> None:
    check_sequence_spec(sequence_spec("rnn", "sequence", "mse", activation=activation),
                        seed=5)
    check_sequence_spec(sequence_spec("rnn", "last", "mse", activation=activation,
                                      bias=False), seed=6)


@pytest.mark.parametrize("spec", [RNN_SINE, LSTM_ADDING, GRU_TONES],
                         ids=lambda spec: spec["name"])
def test_builtin_sequence_examples(spec: dict) -> None:
    check_sequence_spec({**spec, "regularization": {"l2": 0.01, "l1": 0.001}}, seed=2,
                        batch=2, entries=3)


def test_sequence_cost_sums_over_time() -> None:
    """With zero weights h_t = 0 at every step: 0.5 * (0 - 1)^2 per step and component, summed
    over T = 3 steps and n = 2 components (not averaged over time), mean over the batch."""
    spec = {"input": {"size": 1, "length": 3},
            "layers": [{"op": "rnn", "size": 2, "bias": False}], "loss": "mse"}
    params = {"Wx1": np.zeros((2, 1)), "Wh1": np.zeros((2, 2))}
    X = np.random.default_rng(0).standard_normal((4, 3, 1))
    Y = np.ones((4, 3, 2))
    assert numpy_forward_loss(spec, params, X, Y) == pytest.approx(3.0, rel=1e-15)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(3.0, rel=1e-15)
    # dC/dWx[j] = mean over samples of sum_t (h_t - y_t) tanh'(0) x_t = -mean(sum_t x_t)
    np.testing.assert_allclose(grads["Wx1"], -X.sum(axis=(1, 2)).mean() * np.ones((2, 1)),
                               rtol=1e-13)
    np.testing.assert_allclose(grads["Wh1"], 0.0, atol=1e-15)  # h_{t-1} = 0


def test_regularization_covers_recurrent_weights() -> None:
    spec = sequence_spec("gru", "sequence", "cross_entropy")
    plain_spec = {**spec, "regularization": {}}
    params = init_reference_params(spec, 4)
    X, Y = reference_batch(spec, 4, 2)
    base = numpy_forward_loss(plain_spec, params, X, Y)
    l2, l1 = 0.02, 0.01
    weights = [params[name] for name in ("Wx1", "Wh1", "W2")]
    expected = base + l2 / 2 * sum((w ** 2).sum() for w in weights) + l1 * sum(
        np.abs(w).sum() for w in weights)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert numpy_forward_loss(spec, params, X, Y) == pytest.approx(expected, rel=1e-12)
    _, plain = torch_loss_and_grads(plain_spec, params, X, Y)
    for name in ("Wx1", "Wh1"):
        np.testing.assert_allclose(grads[name], plain[name] + l2 * params[name]
                                   + l1 * np.sign(params[name]), rtol=1e-10)
    for name in ("bx1", "bh1"):
        np.testing.assert_allclose(grads[name], plain[name], rtol=1e-12)


def test_recurrent_modules_leave_torch_rng_alone() -> None:
    import torch

    spec = sequence_spec("lstm", "last", "mse")
    params = init_reference_params(spec, 0)
    X, Y = reference_batch(spec, 0, 2)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    torch_loss_and_grads(spec, params, X, Y)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize(("input_", "layers", "error", "match"), [
    (3, [{"op": "rnn", "size": 2}], ValueError, "reads a sequence"),
    ([1, 3, 3], [{"op": "gru", "size": 2}], ValueError, "reads a sequence"),
    ({"size": 2, "length": 3}, [{"op": "lstm", "size": 2, "return": "last"},
                                {"op": "lstm", "size": 2}], ValueError, "reads a sequence"),
    ({"size": 2, "length": 3}, [{"op": {"name": "sq", "expr": "x[j]^2"}, "size": 2}],
     NotImplementedError, "sequence"),
    (3, [{"op": "attention", "size": 2}], ValueError, "reads a sequence"),
    ([1, 3, 3], [{"op": "attention", "size": 2}], ValueError, "reads a sequence"),
    ({"size": 2, "length": 3}, [{"op": "attention"}], ValueError, "size"),
    ({"size": 2, "length": 3}, [{"op": "attention", "size": 0}], ValueError, "size"),
    ({"size": 2, "length": 3}, [{"op": "attention", "size": 2, "causal": "yes"}], TypeError,
     "causal"),
    ({"size": 2, "length": 3}, [{"op": "attention", "size": 2, "activation": "tanh"}],
     ValueError, "activation"),
    ({"size": 2, "length": 3}, [{"op": "attention", "size": 2, "bias": True}], ValueError,
     "bias"),
    ({"size": 2, "length": 3}, [{"op": "attention", "size": 3, "name": "a"},
                                {"op": "add", "inputs": ["input", "a"]}], ValueError,
     "different shapes"),
    ({"size": 2, "length": 3}, [{"op": "conv2d", "channels": 1, "kernel": 1}], ValueError,
     "reads an image"),
    ({"size": 2, "length": 3}, [{"op": "flatten"}], ValueError, "reads an image"),
    ({"size": 2, "length": 3}, [{"op": "rnn"}], ValueError, "size"),
    ({"size": 2, "length": 3}, [{"op": "rnn", "size": 0}], ValueError, "size"),
    ({"size": 2, "length": 3}, [{"op": "rnn", "size": 2, "return": "first"}], ValueError,
     "return"),
    ({"size": 2, "length": 3}, [{"op": "rnn", "size": 2, "activation": "softmax"}],
     ValueError, "elementwise"),
    ({"size": 2, "length": 3}, [{"op": "lstm", "size": 2, "activation": "relu"}],
     ValueError, "activation"),
    ({"size": 2, "length": 3}, [{"op": "gru", "size": 2, "bias": False}], ValueError, "bias"),
    ({"size": 2, "length": 3}, [{"op": "rnn", "size": 2, "name": "a"},
                                {"op": "gru", "size": 2, "return": "last", "input": "a"},
                                {"op": "add", "inputs": ["a", 2]}], ValueError,
     "different shapes"),
])
def test_rejects_bad_sequence_specs(input_: object, layers: list, error: type,
                                    match: str) -> None:
    with pytest.raises(error, match=match):
        reference_graph({"input": input_, "layers": layers, "loss": "mse"})


def test_rejects_bad_sequence_inputs() -> None:
    for value in ({"size": 2}, {"size": 2, "length": 0}, {"size": 2.0, "length": 3},
                  {"size": 2, "length": 3, "channels": 1}):
        with pytest.raises((ValueError, NotImplementedError)):
            spec_input_shape({"input": value, "layers": [], "loss": "mse"})


# --- attention and layer_norm on sequences -------------------------------------------------------


def attention_spec(causal: bool, residual: bool) -> dict:
    """input (T, n) = (4, 3) -> attention -> layer_norm -> dense of 2 per step, mse, with l2 and
    l1 regularization. ``residual``: attention of size 3 added to the input (x + att(x)), then
    layer_norm; otherwise attention of size 2, a tanh dense layer of 3 and layer_norm (over 3
    features: layer_norm over two is +-1, nearly constant, whatever its input)."""
    if residual:
        layers = [{"op": "attention", "size": 3, "causal": causal, "name": "att"},
                  {"op": "add", "inputs": ["input", "att"]}]
    else:
        layers = [{"op": "attention", "size": 2, "causal": causal},
                  {"size": 3, "activation": "tanh"}]
    return {"name": "attention", "input": {"size": 3, "length": 4},
            "layers": [*layers, {"op": "layer_norm"}, {"size": 2}], "loss": "mse",
            "regularization": {"l2": 0.02, "l1": 0.01}}


def transformer_spec(causal: bool) -> dict:
    """A transformer-like block on (T, n) = (5, 4): x + attention(x), layer_norm, a relu
    feed-forward pair of dense layers (8, then 4) added to that, layer_norm, dense of 3."""
    return {"name": "transformer", "input": {"size": 4, "length": 5}, "layers": [
        {"op": "attention", "size": 4, "causal": causal, "name": "att"},
        {"op": "add", "inputs": ["input", "att"], "name": "r1"},
        {"op": "layer_norm", "name": "n1"},
        {"size": 8, "activation": "relu"},
        {"size": 4, "name": "ff"},
        {"op": "add", "inputs": ["n1", "ff"]},
        {"op": "layer_norm"},
        {"size": 3}], "loss": "mse", "regularization": {"l2": 0.01, "l1": 0.001}}


def check_attention_modes_agree(spec: dict, seed: int, batch: int = 3) -> None:
    """The explicit and the scaled_dot_product_attention versions agree to 1e-12 on the loss
    and on every gradient."""
    params = init_reference_params(spec, seed)
    X, Y = reference_batch(spec, seed, batch)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    sdpa_loss, sdpa = torch_loss_and_grads(spec, params, X, Y, attention="sdpa")
    assert sdpa_loss == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert set(sdpa) == set(grads) == set(params)
    for name in params:
        assert relative_error(sdpa[name], grads[name]) < 1e-12, name


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_torch_matches_differences(causal: bool, residual: bool) -> None:
    spec = attention_spec(causal, residual)
    d = 3 if residual else 2
    graph = reference_graph(spec)
    assert graph.nodes[0].shape == (4, d) and graph.nodes[0].causal is causal
    assert {name: graph.param_shapes[name] for name in ("Wq1", "Wk1", "Wv1")} == {
        "Wq1": (d, 3), "Wk1": (d, 3), "Wv1": (d, 3)}
    assert spec_output_shape(spec) == (4, 2)
    for seed in range(2):
        check_attention_modes_agree(spec, seed)
        check_sequence_spec(spec, seed)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_transformer_block(causal: bool) -> None:
    spec = transformer_spec(causal)
    graph = reference_graph(spec)
    assert [node.inputs for node in graph.nodes] == [(0,), (0, 1), (2,), (3,), (4,), (3, 5),
                                                     (6,), (7,)]
    assert [node.shape for node in graph.nodes] == [(5, 4)] * 3 + [(5, 8)] + [(5, 4)] * 3 + [
        (5, 3)]
    assert graph.param_shapes == {
        "Wq1": (4, 4), "Wk1": (4, 4), "Wv1": (4, 4), "gamma3": (4,), "beta3": (4,),
        "W4": (8, 4), "b4": (8,), "W5": (4, 8), "b5": (4,), "gamma7": (4,), "beta7": (4,),
        "W8": (3, 4), "b8": (3,)}
    assert graph.weight_names == ["Wq1", "Wk1", "Wv1", "W4", "W5", "W8"]
    check_attention_modes_agree(spec, seed=3)
    check_sequence_spec(spec, seed=3, batch=2)


def test_attention_modes_are_checked() -> None:
    spec = attention_spec(False, True)
    params = init_reference_params(spec, 0)
    X, Y = reference_batch(spec, 0, 1)
    with pytest.raises(ValueError, match="attention must be"):
        torch_loss_and_grads(spec, params, X, Y, attention="flash")


def _attention_outputs(node: Node, params: dict[str, np.ndarray],
                       x: np.ndarray) -> dict[str, np.ndarray]:
    """An attention layer's output (B, T, d) on x by the three implementations."""
    import torch

    tp = {name: torch.tensor(value) for name, value in params.items()}
    outputs = {mode: _torch_attention(node, torch.tensor(x), tp, mode).numpy()
               for mode in ATTENTION_MODES}
    outputs["numpy"] = _np_attention(node, x, params)
    return outputs


def test_attention_matches_its_definition() -> None:
    """out_t = sum_s p_ts Wv x_s with p_t = softmax over s (s <= t when causal) of
    (Wq x_t) . (Wk x_s) / sqrt(d), written out for one sample."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 3))
    for causal in (False, True):
        spec = {"input": {"size": 3, "length": 4},
                "layers": [{"op": "attention", "size": 2, "causal": causal}], "loss": "mse"}
        node = reference_graph(spec).nodes[0]
        params = init_reference_params(spec, 4)
        Wq, Wk, Wv = params["Wq1"], params["Wk1"], params["Wv1"]
        want = np.zeros((2, 4, 2))
        for b in range(2):
            for t in range(4):
                keys = range(t + 1) if causal else range(4)
                e = np.array([Wq @ x[b, t] @ (Wk @ x[b, s]) / np.sqrt(2) for s in keys])
                p = np.exp(e) / np.exp(e).sum()
                want[b, t] = sum(p_s * (Wv @ x[b, s]) for p_s, s in zip(p, keys))
        for mode, got in _attention_outputs(node, params, x).items():
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15, err_msg=mode)


def test_causal_attention_ignores_later_steps() -> None:
    """With ``causal: true`` changing x at step t leaves the output at every step before t as
    it was (in all three implementations); without it, every step changes."""
    rng = np.random.default_rng(9)
    length = 5
    x = rng.standard_normal((3, length, 3))
    for causal in (True, False):
        spec = {"input": {"size": 3, "length": length},
                "layers": [{"op": "attention", "size": 2, "causal": causal}], "loss": "mse"}
        node = reference_graph(spec).nodes[0]
        params = init_reference_params(spec, 1)
        before = _attention_outputs(node, params, x)
        for t in range(length):
            changed = x.copy()
            changed[:, t] += rng.standard_normal((3, 3))
            after = _attention_outputs(node, params, changed)
            for mode in before:
                moved = np.abs(after[mode] - before[mode]).max(axis=(0, 2))  # per step
                if causal:
                    assert (moved[:t] == 0.0).all(), (mode, t, moved)
                    assert (moved[t:] > 1e-6).all(), (mode, t, moved)
                else:
                    assert (moved > 1e-6).all(), (mode, t, moved)


def test_regularization_covers_attention_weights() -> None:
    spec = attention_spec(True, False)
    plain_spec = {**spec, "regularization": {}}
    params = init_reference_params(spec, 2)
    X, Y = reference_batch(spec, 2, 2)
    l2, l1 = 0.02, 0.01
    weights = [params[name] for name in ("Wq1", "Wk1", "Wv1", "W2", "W4")]
    assert reference_graph(spec).weight_names == ["Wq1", "Wk1", "Wv1", "W2", "W4"]
    expected = numpy_forward_loss(plain_spec, params, X, Y) + l2 / 2 * sum(
        (w ** 2).sum() for w in weights) + l1 * sum(np.abs(w).sum() for w in weights)
    _, plain = torch_loss_and_grads(plain_spec, params, X, Y)
    for mode in ATTENTION_MODES:
        loss, grads = torch_loss_and_grads(spec, params, X, Y, attention=mode)
        assert loss == pytest.approx(expected, rel=1e-12)
        for name in ("Wq1", "Wk1", "Wv1"):
            np.testing.assert_allclose(grads[name], plain[name] + l2 * params[name]
                                       + l1 * np.sign(params[name]), rtol=1e-10)
        for name in ("gamma3", "beta3", "b2"):
            np.testing.assert_allclose(grads[name], plain[name], rtol=1e-10)


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_layer_norm_of_a_sequence_normalises_each_step(eps: float | None) -> None:
    """Each time step normalised over its features (biased variance, eps 1e-5 by default), the
    same gamma and beta (n,) at every step; then with mse loss
    dC/dbeta = mean_b sum_t (out - y) and dC/dgamma = mean_b sum_t (out - y) xhat."""
    layer = {"op": "layer_norm"} if eps is None else {"op": "layer_norm", "eps": eps}
    spec = {"input": {"size": 3, "length": 4}, "layers": [layer], "loss": "mse"}
    assert reference_graph(spec).param_shapes == {"gamma1": (3,), "beta1": (3,)}
    assert spec_output_shape(spec) == (4, 3)
    params = init_reference_params(spec, 6)
    X, Y = reference_batch(spec, 6, 2)
    gamma, beta = params["gamma1"], params["beta1"]
    xhat = np.zeros_like(X)
    for b in range(X.shape[0]):
        for t in range(X.shape[1]):
            step = X[b, t]
            mean = sum(step) / 3
            var = sum((v - mean) ** 2 for v in step) / 3
            xhat[b, t] = (step - mean) / np.sqrt(var + (1e-5 if eps is None else eps))
    out = xhat * gamma + beta
    expected = 0.5 * ((out - Y) ** 2).sum() / X.shape[0]
    assert numpy_forward_loss(spec, params, X, Y) == pytest.approx(expected, rel=1e-13)
    loss, grads = torch_loss_and_grads(spec, params, X, Y)
    assert loss == pytest.approx(expected, rel=1e-13)
    np.testing.assert_allclose(grads["beta1"], (out - Y).sum(axis=(0, 1)) / X.shape[0],
                               rtol=1e-12)
    np.testing.assert_allclose(grads["gamma1"],
                               ((out - Y) * xhat).sum(axis=(0, 1)) / X.shape[0], rtol=1e-12)
