"""An independent reference for graph specs: PyTorch autograd and a plain NumPy forward pass.

Nothing here imports ``derive``. A spec is a plain dict (already parsed YAML/JSON) in the form
of Contract 1, restricted to vector input and the ops ``dense`` (op omitted = dense),
``activation``, ``add``, ``layer_norm`` and ``dropout`` (identity: gradients are taken with
dropout off). Parameters follow Contract 2: ``W{l}`` (n, n_in), ``b{l}`` (n,), ``gamma{l}`` and
``beta{l}`` (n,), where l is the 1-based position of the layer in ``layers``.

The batch cost is the mean over samples of the per-sample cost (summed over output components)
plus, once, ``(l2/2) * sum(W**2) + l1 * sum(|W|)`` over the weight matrices ``W{l}`` only.

:func:`torch_loss_and_grads` uses PyTorch's own functions in float64 and autograd;
:func:`numpy_forward_loss` is separate NumPy code for the same cost (forward only), for finite
differences. Both share only the reading of the spec's structure (:func:`reference_graph`).
Custom ops are evaluated entry by entry by :mod:`tests.index_reference` (its own reading of
the index notation); custom activations and losses raise ``NotImplementedError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SUPPORTED_OPS = ("dense", "activation", "add", "layer_norm", "dropout")
ACTIVATION_NAMES = (
    "identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu", "silu", "gelu",
    "softmax",
)
LOSS_NAMES = ("mse", "cross_entropy", "binary_cross_entropy")
#: Default values of activation parameters.
ACTIVATION_DEFAULTS = {"leaky_relu": {"alpha": 0.01}, "elu": {"alpha": 1.0}}


# --- reading the spec ------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """A built-in activation with its parameters (``alpha`` for leaky_relu and elu)."""

    name: str
    alpha: float = 0.0


@dataclass(frozen=True)
class Node:
    """One layer of the spec: its 1-based number, op, input node numbers (0 = x) and width."""

    number: int
    op: str
    inputs: tuple[int, ...]
    width: int
    activation: Activation | None = None
    bias: bool = True
    eps: float = 1e-5
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    custom: dict[str, Any] | None = None          # a custom op: {name, expr, params}

    def custom_output(self, outputs: list, params: dict, lib: Any) -> Any:
        """A custom op's output by :func:`tests.index_reference.evaluate`."""
        from tests.index_reference import evaluate

        names = ["x"] if len(self.inputs) == 1 else [f"x{n}" for n in
                                                     range(1, len(self.inputs) + 1)]
        arrays = {name: outputs[i] for name, i in zip(names, self.inputs)}
        arrays.update({name: params[f"{name}{self.number}"]
                       for name in self.custom.get("params", {})})
        return evaluate(self.custom["expr"], arrays, self.width, lib, frozenset(names))


@dataclass(frozen=True)
class Graph:
    """The spec's structure: input width, nodes in order, loss name and regularization."""

    input_size: int
    nodes: tuple[Node, ...]
    loss: str
    l2: float
    l1: float

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in layer order."""
        return {name: shape for node in self.nodes for name, shape in node.params.items()}

    @property
    def weight_names(self) -> list[str]:
        """The penalised parameters: the weight matrices of dense layers."""
        return [f"W{node.number}" for node in self.nodes if node.op == "dense"]

    @property
    def output_size(self) -> int:
        """Width of the last layer."""
        return self.nodes[-1].width


def parse_activation(value: Any) -> Activation:
    """An activation from a name string or a mapping ``{name: ..., alpha: ...}``."""
    if isinstance(value, str):
        name, extra = value, {}
    elif isinstance(value, dict):
        if "expr" in value:
            raise NotImplementedError(f"custom activation {value!r} is not supported")
        extra = {k: v for k, v in value.items() if k != "name"}
        name = value.get("name")
    else:
        raise TypeError(f"activation must be a name or a mapping, not {value!r}")
    if name not in ACTIVATION_NAMES:
        raise NotImplementedError(f"activation {name!r} is not supported")
    allowed = ACTIVATION_DEFAULTS.get(name, {})
    unknown = set(extra) - set(allowed)
    if unknown:
        raise ValueError(f"activation {name!r} takes no parameter(s) {sorted(unknown)}")
    return Activation(name, float(extra.get("alpha", allowed.get("alpha", 0.0))))


def parse_loss(value: Any) -> str:
    """The loss name from a string or a mapping ``{name: ...}`` without ``expr``."""
    if isinstance(value, dict):
        if "expr" in value:
            raise NotImplementedError(f"custom loss {value!r} is not supported")
        value = value.get("name")
    if value not in LOSS_NAMES:
        raise NotImplementedError(f"loss {value!r} is not supported")
    return value


def spec_input_size(spec: dict) -> int:
    """The width n_0 of the (vector) input."""
    size = spec["input"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise NotImplementedError(f"only vector input (an int) is supported, not {size!r}")
    if size < 1:
        raise ValueError(f"input width must be positive, not {size}")
    return size


def _resolve(ref: Any, names: dict[str, int], number: int) -> int:
    """Node number (0 = x) of a reference made by layer ``number``."""
    if isinstance(ref, str):
        if ref == "input":
            return 0
        if ref in names:
            return names[ref]
        if ref.isdigit():
            ref = int(ref)
        else:
            raise ValueError(f"layer {number}: unknown layer name {ref!r}")
    if isinstance(ref, bool) or not isinstance(ref, int):
        raise TypeError(f"layer {number}: bad layer reference {ref!r}")
    if not 0 <= ref < number:
        raise ValueError(f"layer {number}: reference {ref} is not an earlier layer")
    return ref


def reference_graph(spec: dict) -> Graph:
    """Read the spec's structure: nodes, widths, parameter shapes; checks unused layers."""
    n_in0 = spec_input_size(spec)
    layers = spec["layers"]
    if not layers:
        raise ValueError("a spec needs at least one layer")
    widths = [n_in0]
    names: dict[str, int] = {}
    nodes: list[Node] = []
    for number, layer in enumerate(layers, start=1):
        op = layer.get("op", "dense")
        custom = op if isinstance(op, dict) else None
        if custom is not None:
            op = "custom"
        elif not isinstance(op, str) or op not in SUPPORTED_OPS:
            raise NotImplementedError(f"layer {number}: op {op!r} is not supported")
        if "inputs" in layer:
            refs = layer["inputs"]
        elif "input" in layer:
            refs = layer["input"] if isinstance(layer["input"], list) else [layer["input"]]
        else:
            refs = [number - 1]
        inputs = tuple(_resolve(ref, names, number) for ref in refs)
        in_widths = {widths[i] for i in inputs}
        if op == "add":
            if len(inputs) < 2:
                raise ValueError(f"layer {number}: add needs at least two inputs")
            if len(in_widths) != 1:
                raise ValueError(f"layer {number}: add of different widths {sorted(in_widths)}")
        elif len(inputs) != 1 and custom is None:
            raise ValueError(f"layer {number}: {op} takes one input, got {len(inputs)}")
        n_in = widths[inputs[0]]
        kwargs: dict[str, Any] = {}
        if op == "dense":
            width = int(layer["size"])
            bias = bool(layer.get("bias", True))
            params = {f"W{number}": (width, n_in)}
            if bias:
                params[f"b{number}"] = (width,)
            kwargs = {"activation": parse_activation(layer.get("activation", "identity")),
                      "bias": bias, "params": params}
        elif op == "activation":
            width = n_in
            kwargs = {"activation": parse_activation(layer["activation"])}
        elif custom is not None:
            width = int(layer["size"])
            axes = {"size": width, "in": n_in,
                    **{f"in{n}": widths[i] for n, i in enumerate(inputs, start=1)}}
            kwargs = {"custom": custom, "params": {
                f"{name}{number}": tuple(axes[axis] for axis in shape)
                for name, shape in custom.get("params", {}).items()}}
        elif op == "layer_norm":
            width = n_in
            kwargs = {"eps": float(layer.get("eps", 1e-5)),
                      "params": {f"gamma{number}": (width,), f"beta{number}": (width,)}}
        else:  # add, dropout
            width = n_in
        nodes.append(Node(number, op, inputs, width, **kwargs))
        widths.append(width)
        if "name" in layer:
            name = layer["name"]
            if name in names or name == "input":
                raise ValueError(f"layer {number}: name {name!r} is taken")
            names[name] = number
    used = {i for node in nodes for i in node.inputs}
    unused = [node.number for node in nodes[:-1] if node.number not in used]
    if unused:
        raise ValueError(f"unused layer(s) {unused}")
    reg = spec.get("regularization") or {}
    return Graph(n_in0, tuple(nodes), parse_loss(spec["loss"]),
                 float(reg.get("l2", 0.0)), float(reg.get("l1", 0.0)))


def spec_output_size(spec: dict) -> int:
    """The width n_L of the last layer."""
    return reference_graph(spec).output_size


def _check_arrays(graph: Graph, params: dict[str, np.ndarray], X: np.ndarray,
                  Y: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Float64 copies of params, X, Y, after checking keys and shapes."""
    shapes = graph.param_shapes
    if set(params) != set(shapes):
        raise KeyError(f"params have keys {sorted(params)}, the spec needs {sorted(shapes)}")
    out = {}
    for name, shape in shapes.items():
        value = np.asarray(params[name], dtype=np.float64)
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, the spec needs {shape}")
        out[name] = value
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != graph.input_size:
        raise ValueError(f"X has shape {X.shape}, expected (B, {graph.input_size})")
    if Y.shape != (X.shape[0], graph.output_size):
        raise ValueError(f"Y has shape {Y.shape}, expected ({X.shape[0]}, {graph.output_size})")
    return out, X, Y


def init_reference_params(spec: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float64 parameters: normal * 0.5; gamma 1 + 0.1 * normal, beta 0.1 * normal."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in reference_graph(spec).param_shapes.items():
        noise = rng.standard_normal(shape)
        if name.startswith("gamma"):
            params[name] = 1.0 + 0.1 * noise
        elif name.startswith("beta"):
            params[name] = 0.1 * noise
        else:
            params[name] = 0.5 * noise
    return params


# --- PyTorch ---------------------------------------------------------------------------------


def _torch_activation(act: Activation, z: torch.Tensor) -> torch.Tensor:
    """The activation with PyTorch's own functions (softmax over the feature axis)."""
    import torch
    import torch.nn.functional as F

    if act.name == "identity":
        return z
    if act.name == "sigmoid":
        return torch.sigmoid(z)
    if act.name == "tanh":
        return torch.tanh(z)
    if act.name == "relu":
        return F.relu(z)
    if act.name == "leaky_relu":
        return F.leaky_relu(z, negative_slope=act.alpha)
    if act.name == "softplus":
        return F.softplus(z)
    if act.name == "elu":
        return F.elu(z, alpha=act.alpha)
    if act.name == "silu":
        return F.silu(z)
    if act.name == "gelu":
        return F.gelu(z, approximate="none")
    if act.name == "softmax":
        return F.softmax(z, dim=-1)
    raise NotImplementedError(act.name)


def torch_loss_and_grads(spec: dict, params: dict[str, np.ndarray], X: np.ndarray,
                         Y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Batch cost and its gradient for every parameter, by PyTorch autograd in float64."""
    import torch
    import torch.nn.functional as F

    graph = reference_graph(spec)
    params, X, Y = _check_arrays(graph, params, X, Y)
    tp = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
          for name, value in params.items()}
    x = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(Y, dtype=torch.float64)
    outputs: list[torch.Tensor] = [x]
    for node in graph.nodes:
        h = outputs[node.inputs[0]]
        k = node.number
        if node.op == "dense":
            out = _torch_activation(node.activation,
                                    F.linear(h, tp[f"W{k}"], tp[f"b{k}"] if node.bias else None))
        elif node.op == "activation":
            out = _torch_activation(node.activation, h)
        elif node.op == "add":
            out = torch.stack([outputs[i] for i in node.inputs]).sum(dim=0)
        elif node.op == "layer_norm":
            out = F.layer_norm(h, (node.width,), weight=tp[f"gamma{k}"], bias=tp[f"beta{k}"],
                               eps=node.eps)
        elif node.op == "custom":
            out = node.custom_output(outputs, tp, torch)
        else:  # dropout, evaluation mode
            out = F.dropout(h, p=0.0, training=False)
        outputs.append(out)
    a = outputs[-1]
    batch = x.shape[0]
    if graph.loss == "mse":
        total = 0.5 * F.mse_loss(a, y, reduction="sum")
    elif graph.loss == "cross_entropy":
        total = -(y * torch.log(a)).sum()
    else:
        total = F.binary_cross_entropy(a, y, reduction="sum")
    cost = total / batch
    weights = [tp[name] for name in graph.weight_names]
    if graph.l2 and weights:
        cost = cost + graph.l2 / 2 * sum((w ** 2).sum() for w in weights)
    if graph.l1 and weights:
        cost = cost + graph.l1 * sum(w.abs().sum() for w in weights)
    grads_t = torch.autograd.grad(cost, list(tp.values()), allow_unused=True)
    grads = {name: (np.zeros(params[name].shape) if g is None else g.detach().numpy().copy())
             for name, g in zip(tp, grads_t)}
    return float(cost.detach()), grads


# --- NumPy -----------------------------------------------------------------------------------


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_activation(act: Activation, z: np.ndarray) -> np.ndarray:
    """The activation in plain NumPy, written out from its definition."""
    name = act.name
    if name == "identity":
        return z
    if name == "sigmoid":
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, act.alpha * z)
    if name == "softplus":
        return np.logaddexp(0.0, z)
    if name == "elu":
        return np.where(z > 0, z, act.alpha * np.expm1(np.minimum(z, 0.0)))
    if name == "silu":
        return z * _np_activation(Activation("sigmoid"), z)
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if name == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise NotImplementedError(name)


def numpy_forward_loss(spec: dict, params: dict[str, np.ndarray], X: np.ndarray,
                       Y: np.ndarray) -> float:
    """The same batch cost as :func:`torch_loss_and_grads`, in plain NumPy float64."""
    graph = reference_graph(spec)
    params, X, Y = _check_arrays(graph, params, X, Y)
    outputs = [X]
    for node in graph.nodes:
        h = outputs[node.inputs[0]]
        k = node.number
        if node.op == "dense":
            z = h @ params[f"W{k}"].T
            if node.bias:
                z = z + params[f"b{k}"]
            out = _np_activation(node.activation, z)
        elif node.op == "activation":
            out = _np_activation(node.activation, h)
        elif node.op == "add":
            out = outputs[node.inputs[0]].copy()
            for i in node.inputs[1:]:
                out = out + outputs[i]
        elif node.op == "custom":
            out = node.custom_output(outputs, params, np)
        elif node.op == "layer_norm":
            mean = h.mean(axis=-1, keepdims=True)
            var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
            out = (h - mean) / np.sqrt(var + node.eps) * params[f"gamma{k}"] + params[f"beta{k}"]
        else:  # dropout, off
            out = h
        outputs.append(out)
    a = outputs[-1]
    if graph.loss == "mse":
        per_sample = 0.5 * ((a - Y) ** 2).sum(axis=1)
    elif graph.loss == "cross_entropy":
        per_sample = -(Y * np.log(a)).sum(axis=1)
    else:
        per_sample = -(Y * np.log(a) + (1.0 - Y) * np.log1p(-a)).sum(axis=1)
    cost = per_sample.mean()
    weights = [params[name] for name in graph.weight_names]
    cost += graph.l2 / 2 * sum(float((w ** 2).sum()) for w in weights)
    cost += graph.l1 * sum(float(np.abs(w).sum()) for w in weights)
    return float(cost)
