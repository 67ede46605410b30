"""Shared helpers of the codegen tests (no tests here): generated modules, data, a PyTorch peer."""

from __future__ import annotations

import functools
import types

import numpy as np

from derive.derivation.reverse import derive
from derive.graph.model import build_model
from derive.render.codegen import load_module, render_module
from derive.spec.load import NetworkSpec, load_spec


@functools.cache
def generated(spec: NetworkSpec) -> types.ModuleType:
    """The generated module of ``spec``, imported (cached per spec)."""
    return load_module(render_module(derive(build_model(spec))), f"{spec.name}_net")


def example(name: str) -> tuple[NetworkSpec, types.ModuleType]:
    spec = load_spec(name)
    return spec, generated(spec)


def batch(spec: NetworkSpec, rows: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and non-uniform targets of the kind the spec's loss expects."""
    rng = np.random.default_rng(seed)
    *steps, n_out = spec.shapes[-1]          # (n_L,), or (T, n_L) for a sequence output
    X = rng.normal(size=(rows, *spec.input_shape))
    needs = spec.resolved_loss().needs
    if needs == "distribution":                           # soft targets, summing to 1
        Y = rng.dirichlet(np.ones(n_out), size=(rows, *steps))
    elif needs == "probability":
        Y = rng.uniform(0.05, 0.95, size=(rows, *steps, n_out))
    else:
        Y = rng.normal(size=(rows, *steps, n_out))
    return X, Y


def random_params(spec: NetworkSpec, seed: int = 0, scale: float = 0.8) -> dict:
    """Parameters of every key and shape of the spec (Contract 2), with non-zero biases and
    shifts and scales away from 1 (init_params starts them at 0 and 1)."""
    rng = np.random.default_rng(seed + 1000)
    params = {}
    for key, shape in spec.parameter_shapes().items():
        if key.startswith("W"):
            params[key] = rng.normal(scale=scale, size=shape)
        elif key.startswith("gamma"):
            params[key] = 1.0 + rng.normal(scale=0.3, size=shape)
        else:  # b, beta
            params[key] = rng.normal(scale=0.3, size=shape)
    return params


def is_plain_chain(spec: NetworkSpec) -> bool:
    """A chain of dense layers without regularization: what the hand-written reference knows."""
    return spec.is_chain and not spec.regularization


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (a norm-wise relative error)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


# --- PyTorch, the autograd peer ------------------------------------------------------------


def torch_loss_and_grads(spec: NetworkSpec, params: dict, X: np.ndarray, Y: np.ndarray):
    """Loss and gradients by PyTorch autograd in float64 (import torch before calling).

    A plain dense chain is written out here (custom activations such as mish included); any
    other graph goes to the graph reference, which reads the spec's plain dict only."""
    if not is_plain_chain(spec):
        from tests import torch_reference

        return torch_reference.torch_loss_and_grads(spec.to_dict(), params, X, Y)
    import torch
    import torch.nn.functional as F

    tensors = {key: torch.tensor(value, dtype=torch.float64, requires_grad=True)
               for key, value in params.items()}
    a = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(Y, dtype=torch.float64)
    z = a
    for l, layer in enumerate(spec.layers, start=1):
        z = a @ tensors[f"W{l}"].T
        if layer.bias:
            z = z + tensors[f"b{l}"]
        name = layer.activation.name
        alpha = dict(layer.activation.params).get("alpha")
        leaky_alpha = 0.01 if alpha is None else alpha
        elu_alpha = 1.0 if alpha is None else alpha
        functions = {
            "identity": lambda t: t,
            "sigmoid": torch.sigmoid,
            "tanh": torch.tanh,
            "relu": torch.relu,
            "leaky_relu": lambda t, s=leaky_alpha: F.leaky_relu(t, s),
            "softplus": lambda t: torch.logaddexp(torch.zeros_like(t), t),
            "elu": lambda t, s=elu_alpha: F.elu(t, s),
            "silu": F.silu,
            "gelu": lambda t: F.gelu(t, approximate="none"),
            "softmax": lambda t: torch.softmax(t, dim=1),
            "mish": F.mish,
        }
        a = functions[name](z)
    rows = X.shape[0]
    out = spec.layers[-1].activation.name
    loss_name = spec.loss.name
    if loss_name == "mse":
        total = 0.5 * ((a - y) ** 2).sum()
    elif loss_name == "cross_entropy":
        total = -(y * torch.log_softmax(z, dim=1)).sum()
    elif loss_name == "binary_cross_entropy" and out == "sigmoid":
        total = F.binary_cross_entropy_with_logits(z, y, reduction="sum")
    elif loss_name == "binary_cross_entropy":
        total = -(y * torch.log(a) + (1 - y) * torch.log(1 - a)).sum()
    else:
        raise ValueError(f"no PyTorch form of the loss {loss_name!r}")
    loss = total / rows
    loss.backward()
    return float(loss.detach()), {key: tensor.grad.numpy() for key, tensor in tensors.items()}
