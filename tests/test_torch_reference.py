"""Self-test of the independent references: PyTorch autograd against the NumPy forward pass."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import random_batch, random_dag_specs
from tests.torch_reference import (
    init_reference_params,
    numpy_forward_loss,
    reference_graph,
    spec_input_size,
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
