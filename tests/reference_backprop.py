"""Hand-written, vectorized NumPy backpropagation: the independent reference for generated code.

Written from the textbook equations, without derive: no SymPy, no printer, no template. First
the classic 2-3-1 sigmoid XOR network with squared error, spelled out line by line; then the
same algorithm for any depth and the built-in activations and losses, with each derivative
typed in by hand. Batches are rows; the loss and the gradients are means over the batch;
parameters follow Contract 2 (W{l} has shape (n_l, n_{l-1}), b{l} shape (n_l,)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z), exponentiating only non-positive numbers."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# --- the classic network ---------------------------------------------------------------------


def xor_backprop(params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, dict]:
    """Loss and gradients of the 2-3-1 sigmoid network with C = 1/2 |a - y|^2."""
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    batch = X.shape[0]
    Z1 = X @ W1.T + b1
    A1 = sigmoid(Z1)
    Z2 = A1 @ W2.T + b2
    A2 = sigmoid(Z2)
    loss = 0.5 * np.sum((A2 - Y) ** 2) / batch
    dZ2 = (A2 - Y) * A2 * (1.0 - A2)            # output error: dC/da times sigma'(z)
    dZ1 = (dZ2 @ W2) * A1 * (1.0 - A1)          # propagated back through W2
    grads = {
        "W1": dZ1.T @ X / batch, "b1": dZ1.mean(axis=0),
        "W2": dZ2.T @ A1 / batch, "b2": dZ2.mean(axis=0),
    }
    return float(loss), grads


# --- any depth ----------------------------------------------------------------------------


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _phi(z):   # standard normal density
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _Phi(z):   # standard normal distribution function
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _softplus(z):
    return np.logaddexp(0.0, z)


def _mish(z):
    return z * np.tanh(_softplus(z))


def _mish_prime(z):
    t = np.tanh(_softplus(z))
    return t + z * (1.0 - t * t) * sigmoid(z)


#: name -> (sigma(z, alpha), sigma'(z, alpha)), each typed in by hand.
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda z, _: z, lambda z, _: np.ones_like(z)),
    "sigmoid": (lambda z, _: sigmoid(z), lambda z, _: sigmoid(z) * (1.0 - sigmoid(z))),
    "tanh": (lambda z, _: np.tanh(z), lambda z, _: 1.0 - np.tanh(z) ** 2),
    "relu": (lambda z, _: np.maximum(z, 0.0), lambda z, _: (z > 0).astype(z.dtype)),
    "leaky_relu": (lambda z, alpha: np.where(z > 0, z, alpha * z),
                   lambda z, alpha: np.where(z > 0, 1.0, alpha)),
    "softplus": (lambda z, _: _softplus(z), lambda z, _: sigmoid(z)),
    "elu": (lambda z, alpha: np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0))),
            lambda z, alpha: np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0.0)))),
    "silu": (lambda z, _: z * sigmoid(z),
             lambda z, _: sigmoid(z) * (1.0 + z * (1.0 - sigmoid(z)))),
    "gelu": (lambda z, _: z * _Phi(z), lambda z, _: _Phi(z) + z * _phi(z)),
    # custom activations of the built-in examples, by name
    "mish": (lambda z, _: _mish(z), lambda z, _: _mish_prime(z)),
}
DEFAULT_ALPHA = {"leaky_relu": 0.01, "elu": 1.0}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


#: name -> (per-sample loss summed over outputs, dC/da), by hand.
LOSSES: dict[str, tuple[Callable, Callable]] = {
    "mse": (lambda a, y: 0.5 * np.sum((a - y) ** 2, axis=1), lambda a, y: a - y),
    "cross_entropy": (lambda a, y: -np.sum(y * np.log(a), axis=1), lambda a, y: -y / a),
    "binary_cross_entropy": (
        lambda a, y: -np.sum(y * np.log(a) + (1.0 - y) * np.log(1.0 - a), axis=1),
        lambda a, y: (a - y) / (a * (1.0 - a))),
}


@dataclass(frozen=True)
class Net:
    """What the reference needs to know of a network: per layer (activation, alpha, bias)."""

    layers: tuple[tuple[str, float, bool], ...]
    loss: str

    @classmethod
    def from_spec(cls, spec) -> Net:
        """Read a derive NetworkSpec's plain fields (names and parameters only)."""
        layers = []
        for layer in spec.layers:
            name = layer.activation.name
            alpha = dict(layer.activation.params).get("alpha", DEFAULT_ALPHA.get(name, 0.0))
            layers.append((name, float(alpha), layer.bias))
        return cls(tuple(layers), spec.loss.name)


def forward(net: Net, params: dict, X: np.ndarray) -> tuple[list, list]:
    """Pre-activations Z[l] and activations A[l] (A[0] = X)."""
    Z, A = [None], [X]
    for l, (name, alpha, bias) in enumerate(net.layers, start=1):
        z = A[-1] @ params[f"W{l}"].T
        if bias:
            z = z + params[f"b{l}"]
        a = softmax(z) if name == "softmax" else ACTIVATIONS[name][0](z, alpha)
        Z.append(z)
        A.append(a)
    return Z, A


def batch_loss(net: Net, Z: list, A: list, Y: np.ndarray) -> float:
    """Mean loss; softmax + cross-entropy and sigmoid + BCE from the logits (no log(0))."""
    out = net.layers[-1][0]
    if out == "softmax" and net.loss == "cross_entropy":
        per_sample = -np.sum(Y * log_softmax(Z[-1]), axis=1)
    elif out == "sigmoid" and net.loss == "binary_cross_entropy":
        z = Z[-1]   # -log sigmoid(z) = softplus(-z), -log(1 - sigmoid(z)) = softplus(z)
        per_sample = np.sum(Y * _softplus(-z) + (1.0 - Y) * _softplus(z), axis=1)
    else:
        per_sample = LOSSES[net.loss][0](A[-1], Y)
    return float(np.mean(per_sample))


def output_error(net: Net, Z: list, A: list, Y: np.ndarray, fused: bool) -> np.ndarray:
    """delta^L = dC/dz^L for each sample (rows)."""
    name, alpha, _ = net.layers[-1]
    a = A[-1]
    if fused and (name, net.loss) in (("softmax", "cross_entropy"),
                                      ("sigmoid", "binary_cross_entropy")):
        return a - Y      # the textbook simplification
    g = LOSSES[net.loss][1](a, Y)
    if name == "softmax":
        # Jacobian-vector product: da_i/dz_j = a_i (delta_ij - a_j)
        return a * (g - np.sum(a * g, axis=1, keepdims=True))
    return g * ACTIVATIONS[name][1](Z[-1], alpha)


def backprop(net: Net, params: dict, X: np.ndarray, Y: np.ndarray,
             fused: bool = True) -> tuple[float, dict]:
    """Loss and batch-mean gradients, by backpropagation."""
    batch = X.shape[0]
    Z, A = forward(net, params, X)
    loss = batch_loss(net, Z, A, Y)
    delta = output_error(net, Z, A, Y, fused)
    grads = {}
    for l in range(len(net.layers), 0, -1):
        grads[f"W{l}"] = delta.T @ A[l - 1] / batch
        if net.layers[l - 1][2]:
            grads[f"b{l}"] = delta.mean(axis=0)
        if l > 1:
            name, alpha, _ = net.layers[l - 2]
            delta = (delta @ params[f"W{l}"]) * ACTIVATIONS[name][1](Z[l - 1], alpha)
    return loss, {key: grads[key] for key in params}


def train_step(net: Net, params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> float:
    """One step of gradient descent in place; returns the loss before the step."""
    loss, grads = backprop(net, params, X, Y)
    for key, grad in grads.items():
        params[key] -= lr * grad
    return loss
