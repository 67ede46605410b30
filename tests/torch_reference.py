"""An independent reference for graph specs: PyTorch autograd and a plain NumPy forward pass.

Nothing here imports ``derive``. A spec is a plain dict (already parsed YAML/JSON) in the form
of Contract 1, restricted to vector input (``input: n``), sequence input
(``input: {size: n, length: T}``) or image input (``input: [C, H, W]``) and the ops ``dense``
(op omitted = dense), ``activation``, ``add``, ``layer_norm``, ``dropout`` (identity: gradients
are taken with dropout off), ``conv2d``, ``max_pool2d``, ``avg_pool2d``, ``flatten``, ``rnn``,
``lstm``, ``gru``, ``attention`` and custom ops. Parameters follow Contract 2, where l is the
1-based position of the layer in ``layers``: ``W{l}`` (n, n_in) and ``b{l}`` (n,) of a dense
layer; ``W{l}`` (C_out, C_in, kh, kw) and ``b{l}`` (C_out,) of a conv2d layer; ``gamma{l}`` and
``beta{l}`` (n,) of layer_norm (n the number of features, also on a sequence); ``Wx{l}``,
``Wh{l}`` and biases of the recurrent ops, ``Wq{l}``, ``Wk{l}``, ``Wv{l}`` of attention (below).

Shapes. Every node's output has a per-sample shape: ``(n,)`` (a vector), ``(T, n)`` (a
sequence of T time steps of n features) or ``(C, H, W)`` (an image); X is
``(B, *input shape)`` -- ``(B, T, n)`` for a sequence -- and Y ``(B, *output shape)``:
``(B, T, n_L)`` for a sequence output, ``(B, n_L)`` for a vector one. ``dense`` reads a vector
or a sequence (a sequence step by step, the same W and b at every step: output
``(T, n_out)``); ``layer_norm`` reads a vector or a sequence (a sequence step by step: each
time step normalised over its n features, biased variance, the same gamma and beta at every
step); custom ops read vectors (a sequence raises ``NotImplementedError``: not supported yet);
``conv2d`` and the pools read images; ``flatten`` turns an image into the vector of its C*H*W
entries, C-major (``torch.flatten(x, 1)``); ``rnn``, ``lstm``, ``gru`` and ``attention`` read
sequences only; ``activation``,
``add`` and ``dropout`` work on any shape, elementwise (softmax on vectors, over the feature
axis, and on sequences, over the feature axis at each time step; not on images).

- ``rnn``, ``lstm``, ``gru``: ``size`` n required; ``return`` ``sequence`` (the default: the
  output is h_1..h_T, shape (T, n)) or ``last`` (h_T, shape (n,)). They start from
  h_0 = 0 (and c_0 = 0); sigma is the logistic sigmoid.

  - ``rnn``: ``activation`` (default tanh; any elementwise one, not softmax) and ``bias``
    (default true). ``Wx{l}`` (n, n_in), ``Wh{l}`` (n, n), ``b{l}`` (n,);
    h_t = act(Wx x_t + Wh h_{t-1} + b).
  - ``lstm``: ``Wx{l}`` (4n, n_in), ``Wh{l}`` (4n, n), ``b{l}`` (4n,), the rows of the gates
    i, f, g, o stacked in that order (PyTorch's). With [i; f; g; o] = Wx x_t + Wh h_{t-1} + b:
    c_t = sigma(f) c_{t-1} + sigma(i) tanh(g), h_t = sigma(o) tanh(c_t).
  - ``gru``: ``Wx{l}`` (3n, n_in), ``Wh{l}`` (3n, n), ``bx{l}`` and ``bh{l}`` (3n,), the rows
    of r, z, n in that order (PyTorch's, and PyTorch's equations): with [a_r; a_z; a_n] =
    Wx x_t + bx and [u_r; u_z; u_n] = Wh h_{t-1} + bh, r = sigma(a_r + u_r),
    z = sigma(a_z + u_z), n = tanh(a_n + r * u_n), h_t = (1 - z) * n + z * h_{t-1}.

  lstm and gru take no ``activation``, and no ``bias`` other than ``true`` (ValueError).

- ``attention``: single-head self-attention of a sequence x_1..x_T (T, n_in); ``size`` d
  required, ``causal`` (bool, default false); no bias, no activation (ValueError). ``Wq{l}``,
  ``Wk{l}``, ``Wv{l}`` (d, n_in). Per sample, q_t = Wq x_t, k_s = Wk x_s, v_s = Wv x_s,
  e_ts = q_t . k_s / sqrt(d), p_ts = exp(e_ts) / sum_s' exp(e_ts') (softmax over s; causal: over
  s, s' <= t only, p_ts = 0 for s > t) and out_t = sum_s p_ts v_s: output (T, d).
  :func:`torch_loss_and_grads` computes it one of two ways, ``attention="explicit"`` (the
  default: ``softmax(q k^T / sqrt(d))`` masked with -inf, then ``@ v``) or ``"sdpa"``
  (``torch.nn.functional.scaled_dot_product_attention``, whose default scale 1/sqrt(d) with d
  the last dimension of q is the same): the two must agree.

- ``conv2d``: ``channels`` C_out and ``kernel`` (int or [kh, kw]) required; ``stride`` (int
  or [sh, sw], default 1), ``padding`` (int or [ph, pw], default 0; zeros on both sides),
  ``bias`` (true), ``activation`` (identity, applied elementwise). Cross-correlation, as
  ``torch.nn.functional.conv2d``; output [C_out, H', W'] with
  H' = floor((H + 2 ph - kh) / sh) + 1 (and W' alike), which must be at least 1.
- ``max_pool2d``, ``avg_pool2d``: ``kernel`` required, ``stride`` (default = kernel), no
  padding; output [C, floor((H - kh) / sh) + 1, floor((W - kw) / sw) + 1]. The average is over
  the kh*kw entries of the window. Max-pool ties: PyTorch's CPU kernel
  (aten/src/ATen/native/cpu/MaxPoolKernel.cpp) scans a window row by row, left to right, and
  takes a value only when it is strictly greater than the best so far (or NaN), so its
  gradient goes wholly to the FIRST maximum in row-major window order -- the same rule as the
  generated code and :mod:`tests.conv_reference` (checked by the tests). At a tie the cost is
  not differentiable, so finite differences are meaningless there: tests use continuous random
  data, where ties have probability zero.

The per-sample cost is the loss summed over every output component (all C*H*W entries of an
image output; every time step and every component of a sequence output: a sum over time, not
a mean; cross_entropy with a softmax per step); the batch cost is its mean over samples plus,
once, ``(l2/2) * sum(W**2) + l1 * sum(|W|)`` over the weights ``W{l}`` of dense and conv2d
layers, ``Wx{l}``, ``Wh{l}`` of rnn, lstm and gru and ``Wq{l}``, ``Wk{l}``, ``Wv{l}`` of
attention only (not biases ``b``, ``bx``, ``bh``, gamma/beta or custom-op parameters).

:func:`torch_loss_and_grads` uses PyTorch's own functions in float64 and autograd: for the
recurrent ops the modules ``torch.nn.RNN`` (tanh, relu; an rnn with another activation is a
loop of torch ops), ``torch.nn.LSTM`` and ``torch.nn.GRU`` (``batch_first=True``) with our
values copied in (``bias_ih_l0`` = b and ``bias_hh_l0`` = 0 for rnn and lstm; bx and bh for
gru). :func:`numpy_forward_loss` is separate NumPy code for the same cost (forward only;
convolution and pooling written as loops over kernel offsets, the recurrent ops as a loop
over time steps from the equations above, attention as loops over the query step t and the key
step s with a max-shifted softmax), for finite differences. Both share only the
reading of the spec's structure (:func:`reference_graph`). Custom ops are evaluated entry by
entry by :mod:`tests.index_reference` (its own reading of the index notation); custom
activations and losses raise ``NotImplementedError``. :mod:`tests.conv_reference` is a third,
loop-by-loop reference for convolutional chains with its own reading of the spec.

API: :func:`reference_graph`, :func:`spec_input_shape`, :func:`spec_output_shape`,
:func:`spec_input_size` and :func:`spec_output_size` (vector input / output only),
:func:`init_reference_params`, :func:`reference_batch`, :func:`torch_loss_and_grads`,
:func:`numpy_forward_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

#: Recurrent ops: they read a sequence [T, n_in], step by step from h_0 = 0.
RECURRENT_OPS = ("rnn", "lstm", "gru")
SUPPORTED_OPS = ("dense", "activation", "add", "layer_norm", "dropout", "conv2d", "max_pool2d",
                 "avg_pool2d", "flatten", *RECURRENT_OPS, "attention")
#: Ops with a weight ``W{l}`` that the regularization penalises (recurrent ops: ``Wx{l}`` and
#: ``Wh{l}``; attention: ``Wq{l}``, ``Wk{l}``, ``Wv{l}``).
WEIGHTED_OPS = ("dense", "conv2d")
#: The weights of an attention layer, all penalised: query, key, value.
ATTENTION_WEIGHTS = ("Wq", "Wk", "Wv")
#: The ways :func:`torch_loss_and_grads` computes attention: written out, or by
#: ``torch.nn.functional.scaled_dot_product_attention``.
ATTENTION_MODES = ("explicit", "sdpa")
#: Gates stacked in the rows of ``Wx{l}``, ``Wh{l}`` and the biases, PyTorch's order.
GATES = {"lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}
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
    """One layer of the spec: its 1-based number, op, input node numbers (0 = x) and the
    per-sample shape of its output: ``(n,)`` for a vector, ``(T, n)`` for a sequence,
    ``(C, H, W)`` for an image.

    ``kernel``, ``stride`` and ``padding`` are (height, width) pairs of conv2d and the pools;
    ``returns`` is ``"sequence"`` or ``"last"`` for a recurrent op; ``causal`` says whether an
    attention layer's step t attends to steps s <= t only.
    """

    number: int
    op: str
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    activation: Activation | None = None
    bias: bool = True
    eps: float = 1e-5
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    custom: dict[str, Any] | None = None          # a custom op: {name, expr, params}
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    returns: str = "sequence"
    causal: bool = False

    @property
    def width(self) -> int:
        """The number of components of the output (n for a vector, T*n for a sequence, C*H*W
        for an image)."""
        return math.prod(self.shape)

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
    """The spec's structure: input shape, nodes in order, loss name and regularization."""

    input_shape: tuple[int, ...]
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
        """The penalised parameters: the weights of dense layers, the kernels of conv2d, the
        input and recurrent weights ``Wx{l}``, ``Wh{l}`` of rnn, lstm and gru and the query,
        key and value weights ``Wq{l}``, ``Wk{l}``, ``Wv{l}`` of attention."""
        names = []
        for node in self.nodes:
            if node.op in WEIGHTED_OPS:
                names.append(f"W{node.number}")
            elif node.op in RECURRENT_OPS:
                names += [f"Wx{node.number}", f"Wh{node.number}"]
            elif node.op == "attention":
                names += [f"{w}{node.number}" for w in ATTENTION_WEIGHTS]
        return names

    @property
    def input_size(self) -> int:
        """Number of input components (n_0 for a vector, T*n for a sequence, C*H*W for an
        image)."""
        return math.prod(self.input_shape)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the last layer's output."""
        return self.nodes[-1].shape

    @property
    def output_size(self) -> int:
        """Number of output components (the width of a vector output)."""
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


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def spec_input_shape(spec: dict) -> tuple[int, ...]:
    """The per-sample input shape: ``(n_0,)`` for ``input: n_0``, ``(T, n)`` for a sequence
    ``input: {size: n, length: T}``, ``(C, H, W)`` for ``input: [C, H, W]``."""
    value = spec["input"]
    if _is_int(value):
        shape = (int(value),)
    elif isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_is_int, value)):
        shape = tuple(int(v) for v in value)
    elif (isinstance(value, dict) and set(value) == {"size", "length"}
          and _is_int(value["size"]) and _is_int(value["length"])):
        shape = (int(value["length"]), int(value["size"]))
    else:
        raise NotImplementedError(
            f"input must be a width n, a sequence {{size: n, length: T}} or an image "
            f"[C, H, W] of ints, not {value!r}")
    if min(shape) < 1:
        raise ValueError(f"input sizes must be positive, not {value!r}")
    return shape


def spec_input_size(spec: dict) -> int:
    """The width n_0 of a vector input (a sequence or an image input raises: see
    :func:`spec_input_shape`)."""
    shape = spec_input_shape(spec)
    if len(shape) != 1:
        raise NotImplementedError(f"input {spec['input']!r} is {_describe(shape)}, not a "
                                  "vector; use spec_input_shape")
    return shape[0]


def _pair(layer: dict, key: str, number: int, default: Any = None,
          minimum: int = 1) -> tuple[int, int]:
    """An (height, width) attribute given as an int or a two-list ``[h, w]``."""
    value = layer.get(key, default)
    if value is None:
        raise ValueError(f"layer {number}: {layer.get('op')} needs {key!r}")
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"layer {number}: {key} must be an int or [h, w], not {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"layer {number}: {key} must be at least {minimum}, not {value!r}")
    return pair


def _window_count(size: int, kernel: int, stride: int, padding: int, number: int) -> int:
    """floor((size + 2 padding - kernel) / stride) + 1, the positions of a sliding window."""
    if size + 2 * padding < kernel:
        raise ValueError(f"layer {number}: kernel {kernel} exceeds the input size {size}"
                         + (f" padded by {padding} on each side" if padding else ""))
    return (size + 2 * padding - kernel) // stride + 1


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


def _describe(shape: tuple[int, ...]) -> str:
    """A per-sample shape in words: a vector, a sequence [T, n] or an image [C, H, W]."""
    if len(shape) == 1:
        return f"a vector of {shape[0]}"
    if len(shape) == 2:
        return f"a sequence [T, n] = {list(shape)}"
    return f"an image {list(shape)}"


def _check_activation(act: Activation, shape: tuple[int, ...], number: int) -> Activation:
    """Softmax normalises over the feature axis: a vector's, or a sequence's at each time step;
    an image has none."""
    if act.name == "softmax" and len(shape) == 3:
        raise ValueError(f"layer {number}: softmax applies to vectors and sequences, not to "
                         f"an image {list(shape)}")
    return act


def _recurrent(layer: dict, op: str, in_shape: tuple[int, ...], number: int) -> tuple[
        tuple[int, ...], dict[str, Any]]:
    """Output shape and Node fields of an rnn, lstm or gru layer reading ``in_shape`` (T, n_in).

    rnn: ``Wx{l}`` (n, n_in), ``Wh{l}`` (n, n), ``b{l}`` (n,) unless ``bias: false``; lstm:
    (4n, n_in), (4n, n), ``b{l}`` (4n,); gru: (3n, n_in), (3n, n), ``bx{l}`` and ``bh{l}``
    (3n,). Output (T, n) (``return: sequence``, the default) or (n,) (``return: last``)."""
    size = layer.get("size")
    if not _is_int(size) or size < 1:
        raise ValueError(f"layer {number}: {op} needs size, a positive int, not {size!r}")
    n = int(size)
    returns = layer.get("return", "sequence")
    if returns not in ("sequence", "last"):
        raise ValueError(f"layer {number}: return must be 'sequence' or 'last', not "
                         f"{returns!r}")
    length, n_in = in_shape
    if op == "rnn":
        act = parse_activation(layer.get("activation", "tanh"))
        if act.name == "softmax":
            raise ValueError(f"layer {number}: rnn needs an elementwise activation, not "
                             "softmax")
        bias = bool(layer.get("bias", True))
        params = {f"Wx{number}": (n, n_in), f"Wh{number}": (n, n)}
        if bias:
            params[f"b{number}"] = (n,)
    else:
        if "activation" in layer:
            raise ValueError(f"layer {number}: {op} takes no activation (its gates are fixed)")
        if layer.get("bias", True) is not True:
            raise ValueError(f"layer {number}: {op} takes no bias attribute (its biases are "
                             "always there)")
        act, bias = None, True
        rows = len(GATES[op]) * n
        params = {f"Wx{number}": (rows, n_in), f"Wh{number}": (rows, n)}
        if op == "lstm":
            params[f"b{number}"] = (rows,)
        else:
            params.update({f"bx{number}": (rows,), f"bh{number}": (rows,)})
    shape = (length, n) if returns == "sequence" else (n,)
    return shape, {"activation": act, "bias": bias, "params": params, "returns": returns}


def _attention(layer: dict, in_shape: tuple[int, ...], number: int) -> tuple[
        tuple[int, ...], dict[str, Any]]:
    """Output shape (T, d) and Node fields of an attention layer reading ``in_shape``
    (T, n_in): ``Wq{l}``, ``Wk{l}``, ``Wv{l}`` (d, n_in) and ``causal``."""
    size = layer.get("size")
    if not _is_int(size) or size < 1:
        raise ValueError(f"layer {number}: attention needs size, a positive int, not {size!r}")
    causal = layer.get("causal", False)
    if not isinstance(causal, bool):
        raise TypeError(f"layer {number}: causal must be true or false, not {causal!r}")
    for key in ("activation", "bias"):
        if key in layer:
            raise ValueError(f"layer {number}: attention takes no {key} (q, k and v are linear "
                             "maps without biases)")
    length, n_in = in_shape
    d = int(size)
    params = {f"{w}{number}": (d, n_in) for w in ATTENTION_WEIGHTS}
    return (length, d), {"params": params, "causal": causal}


def reference_graph(spec: dict) -> Graph:
    """Read the spec's structure: nodes, shapes, parameter shapes; checks unused layers."""
    input_shape = spec_input_shape(spec)
    layers = spec["layers"]
    if not layers:
        raise ValueError("a spec needs at least one layer")
    shapes = [input_shape]
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
        in_shapes = {shapes[i] for i in inputs}
        if op == "add":
            if len(inputs) < 2:
                raise ValueError(f"layer {number}: add needs at least two inputs")
            if len(in_shapes) != 1:
                raise ValueError(f"layer {number}: add of different shapes "
                                 f"{sorted(map(list, in_shapes))}")
        elif len(inputs) != 1 and custom is None:
            raise ValueError(f"layer {number}: {op} takes one input, got {len(inputs)}")
        in_shape = shapes[inputs[0]]
        ranks = {len(shapes[i]) for i in inputs}
        if op in ("dense", "layer_norm", "custom") and 3 in ranks:
            reads = "a vector" if op == "custom" else "a vector or a sequence"
            raise ValueError(f"layer {number}: {op} reads {reads}, not an image "
                             f"{list(in_shape)} (flatten it first)")
        if op == "custom" and 2 in ranks:
            raise NotImplementedError(f"layer {number}: {op} of a sequence [T, n] is not "
                                      "supported yet")
        if op in ("conv2d", "max_pool2d", "avg_pool2d", "flatten") and len(in_shape) != 3:
            raise ValueError(f"layer {number}: {op} reads an image [C, H, W], not "
                             f"{_describe(in_shape)}")
        if (op in RECURRENT_OPS or op == "attention") and len(in_shape) != 2:
            raise ValueError(f"layer {number}: {op} reads a sequence [T, n], not "
                             f"{_describe(in_shape)}")
        kwargs: dict[str, Any] = {}
        if op == "dense":  # on a sequence: the same weights at every time step
            n_in = in_shape[-1]
            shape = (*in_shape[:-1], int(layer["size"]))
            bias = bool(layer.get("bias", True))
            params = {f"W{number}": (shape[-1], n_in)}
            if bias:
                params[f"b{number}"] = (shape[-1],)
            kwargs = {"activation": parse_activation(layer.get("activation", "identity")),
                      "bias": bias, "params": params}
        elif op == "conv2d":
            channels = layer.get("channels")
            if not _is_int(channels) or channels < 1:
                raise ValueError(f"layer {number}: conv2d needs channels, a positive int, "
                                 f"not {channels!r}")
            kernel = _pair(layer, "kernel", number)
            stride = _pair(layer, "stride", number, default=1)
            padding = _pair(layer, "padding", number, default=0, minimum=0)
            shape = (int(channels),) + tuple(
                _window_count(in_shape[1 + a], kernel[a], stride[a], padding[a], number)
                for a in (0, 1))
            bias = bool(layer.get("bias", True))
            params = {f"W{number}": (shape[0], in_shape[0], *kernel)}
            if bias:
                params[f"b{number}"] = (shape[0],)
            act = parse_activation(layer.get("activation", "identity"))
            kwargs = {"activation": _check_activation(act, shape, number), "bias": bias,
                      "params": params, "kernel": kernel, "stride": stride,
                      "padding": padding}
        elif op in ("max_pool2d", "avg_pool2d"):
            if "padding" in layer:
                raise ValueError(f"layer {number}: {op} takes no padding")
            kernel = _pair(layer, "kernel", number)
            stride = _pair(layer, "stride", number, default=list(kernel))
            shape = (in_shape[0],) + tuple(
                _window_count(in_shape[1 + a], kernel[a], stride[a], 0, number)
                for a in (0, 1))
            kwargs = {"kernel": kernel, "stride": stride}
        elif op == "flatten":
            shape = (math.prod(in_shape),)
        elif op in RECURRENT_OPS:
            shape, kwargs = _recurrent(layer, op, in_shape, number)
        elif op == "attention":
            shape, kwargs = _attention(layer, in_shape, number)
        elif op == "activation":
            shape = in_shape
            kwargs = {"activation": _check_activation(parse_activation(layer["activation"]),
                                                      shape, number)}
        elif custom is not None:
            shape = (int(layer["size"]),)
            axes = {"size": shape[0], "in": in_shape[0],
                    **{f"in{n}": shapes[i][0] for n, i in enumerate(inputs, start=1)}}
            kwargs = {"custom": custom, "params": {
                f"{name}{number}": tuple(axes[axis] for axis in param_shape)
                for name, param_shape in custom.get("params", {}).items()}}
        elif op == "layer_norm":  # over the feature axis (of each time step of a sequence)
            shape = in_shape
            kwargs = {"eps": float(layer.get("eps", 1e-5)),
                      "params": {f"gamma{number}": shape[-1:], f"beta{number}": shape[-1:]}}
        else:  # add, dropout
            shape = in_shape
        nodes.append(Node(number, op, inputs, shape, **kwargs))
        shapes.append(shape)
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
    return Graph(input_shape, tuple(nodes), parse_loss(spec["loss"]),
                 float(reg.get("l2", 0.0)), float(reg.get("l1", 0.0)))


def spec_output_shape(spec: dict) -> tuple[int, ...]:
    """The per-sample shape of the last layer's output: ``(n_L,)``, ``(T, n_L)`` or
    ``(C, H, W)``."""
    return reference_graph(spec).output_shape


def spec_output_size(spec: dict) -> int:
    """The width n_L of a vector output (a sequence or an image output raises: see
    spec_output_shape)."""
    shape = spec_output_shape(spec)
    if len(shape) != 1:
        raise NotImplementedError(f"the output is {_describe(shape)}, not a vector; "
                                  "use spec_output_shape")
    return shape[0]


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
    if X.ndim != 1 + len(graph.input_shape) or X.shape[1:] != graph.input_shape:
        raise ValueError(f"X has shape {X.shape}, expected (B, "
                         f"{', '.join(map(str, graph.input_shape))})")
    if Y.shape != (X.shape[0], *graph.output_shape):
        raise ValueError(f"Y has shape {Y.shape}, expected "
                         f"{(X.shape[0], *graph.output_shape)}")
    return out, X, Y


def init_reference_params(spec: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float64 parameters, drawn in layer order from ``default_rng(seed)``.

    Each entry is a standard normal draw, scaled: a dense weight by min(0.5, 1/sqrt(n_in))
    (0.5 up to n_in = 4); a conv2d kernel by 1/sqrt(C_in*kh*kw) (fan-in); a recurrent layer's
    ``Wx{l}`` by min(0.5, 1/sqrt(n_in)) and ``Wh{l}`` by min(0.5, 1/sqrt(n)) (n its size, the
    fan-in of every gate); an attention layer's ``Wq{l}``, ``Wk{l}``, ``Wv{l}`` (d, n_in) by
    sqrt(2 / (n_in + d)) (Glorot normal); gamma is 1 + 0.1 * normal, beta 0.1 * normal; biases
    (``b``, ``bx``, ``bh``) and custom-op parameters 0.5 * normal.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for node in reference_graph(spec).nodes:
        for name, shape in node.params.items():
            noise = rng.standard_normal(shape)
            if name.startswith("gamma") and node.op == "layer_norm":
                params[name] = 1.0 + 0.1 * noise
            elif name.startswith("beta") and node.op == "layer_norm":
                params[name] = 0.1 * noise
            elif name == f"W{node.number}" and node.op == "dense":
                params[name] = min(0.5, 1.0 / math.sqrt(shape[1])) * noise
            elif name == f"W{node.number}" and node.op == "conv2d":
                params[name] = noise / math.sqrt(math.prod(shape[1:]))
            elif name in (f"Wx{node.number}", f"Wh{node.number}") and node.op in RECURRENT_OPS:
                params[name] = min(0.5, 1.0 / math.sqrt(shape[1])) * noise
            elif node.op == "attention":  # Wq, Wk, Wv
                params[name] = math.sqrt(2.0 / (shape[0] + shape[1])) * noise
            else:
                params[name] = 0.5 * noise
    return params


def reference_batch(spec: dict, seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (X, Y) of shapes (B, *input shape) and (B, *output shape): vector, sequence
    (B, T, n) or image.

    X is standard normal (continuous: no max-pool ties). Y suits the loss: cross_entropy,
    positive entries summing to 1 per sample (per sample and time step for a sequence
    output); binary_cross_entropy, entries in (0.05, 0.95); mse, standard normal. For vector specs this is the batch of
    ``tests.strategies.random_batch`` (the same stream, apart from the params' seed).
    """
    graph = reference_graph(spec)
    rng = np.random.default_rng([seed, 0xBA7C])
    X = rng.standard_normal((batch, *graph.input_shape))
    shape = (batch, *graph.output_shape)
    if graph.loss == "cross_entropy":
        Y = rng.uniform(0.05, 1.0, shape)
        if len(graph.output_shape) == 2:  # a sequence: a distribution at every time step
            Y /= Y.sum(axis=-1, keepdims=True)
        else:
            Y /= Y.reshape(batch, -1).sum(axis=1).reshape((batch,) + (1,) * (Y.ndim - 1))
    elif graph.loss == "binary_cross_entropy":
        Y = rng.uniform(0.05, 0.95, shape)
    else:
        Y = rng.standard_normal(shape)
    return X, Y


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


def _torch_recurrent(node: Node, x: torch.Tensor, tp: dict[str, torch.Tensor]) -> torch.Tensor:
    """An rnn, lstm or gru layer on x (B, T, n_in), batch first: its output (B, T, n) or, with
    ``return: last``, (B, n).

    PyTorch's own ``torch.nn.RNN`` (tanh or relu), ``torch.nn.LSTM`` and ``torch.nn.GRU`` in
    float64, our values copied in: ``weight_ih_l0`` = Wx, ``weight_hh_l0`` = Wh; for rnn and
    lstm ``bias_ih_l0`` = b and ``bias_hh_l0`` = 0 (constant: PyTorch adds both biases, ours is
    one), for gru ``bias_ih_l0`` = bx and ``bias_hh_l0`` = bh (they differ: bh sits inside
    r * (...)). The module's parameters then replace our entries of ``tp``, so that their
    gradients are those of Wx, Wh and the biases. An rnn with another activation is written
    out step by step: h_t = act(x_t Wx^T + b + h_{t-1} Wh^T), h_0 = 0.
    """
    import torch
    import torch.nn.functional as F

    k, n = node.number, node.shape[-1]
    if node.op == "rnn" and node.activation.name not in ("tanh", "relu"):
        bias = tp[f"b{k}"] if node.bias else None
        h = x.new_zeros((x.shape[0], n))
        steps = []
        for t in range(x.shape[1]):
            h = _torch_activation(node.activation, F.linear(x[:, t], tp[f"Wx{k}"], bias)
                                  + F.linear(h, tp[f"Wh{k}"]))
            steps.append(h)
        out = torch.stack(steps, dim=1)
    else:
        with torch.random.fork_rng(devices=[]):  # the modules' own initialisation, discarded
            if node.op == "rnn":
                module = torch.nn.RNN(x.shape[-1], n, nonlinearity=node.activation.name,
                                      bias=node.bias, batch_first=True, dtype=torch.float64)
            else:
                cls = torch.nn.LSTM if node.op == "lstm" else torch.nn.GRU
                module = cls(x.shape[-1], n, batch_first=True, dtype=torch.float64)
        ours = {"weight_ih_l0": f"Wx{k}", "weight_hh_l0": f"Wh{k}"}
        if node.op == "gru":
            ours.update(bias_ih_l0=f"bx{k}", bias_hh_l0=f"bh{k}")
        elif node.bias:
            ours["bias_ih_l0"] = f"b{k}"
        with torch.no_grad():
            for attribute, parameter in module.named_parameters():
                if attribute in ours:
                    parameter.copy_(tp[ours[attribute]])
                else:  # bias_hh_l0 of rnn and lstm
                    parameter.zero_()
                    parameter.requires_grad_(False)
        for attribute, name in ours.items():
            tp[name] = getattr(module, attribute)
        out, _ = module(x)
    return out if node.returns == "sequence" else out[:, -1]


def _torch_attention(node: Node, x: torch.Tensor, tp: dict[str, torch.Tensor],
                     mode: str) -> torch.Tensor:
    """An attention layer on x (B, T, n_in): its output (B, T, d).

    q, k, v = x Wq^T, x Wk^T, x Wv^T (B, T, d). ``mode`` ``"explicit"``: softmax over the last
    axis of q k^T / sqrt(d), entries s > t set to -inf first when causal, times v;
    ``"sdpa"``: ``scaled_dot_product_attention(q, k, v, is_causal=causal)`` (scale 1/sqrt(d),
    its default, and the same lower-triangular mask).
    """
    import torch
    import torch.nn.functional as F

    k = node.number
    q, key, v = (F.linear(x, tp[f"{w}{k}"]) for w in ATTENTION_WEIGHTS)
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, key, v, is_causal=node.causal)
    scores = q @ key.transpose(-1, -2) / math.sqrt(node.shape[-1])
    if node.causal:
        length = x.shape[1]
        later = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)  # s > t
        scores = scores.masked_fill(later, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def torch_loss_and_grads(spec: dict, params: dict[str, np.ndarray], X: np.ndarray,
                         Y: np.ndarray, *, attention: str = "explicit") -> tuple[
                             float, dict[str, np.ndarray]]:
    """Batch cost and its gradient for every parameter, by PyTorch autograd in float64.

    X is (B, *input shape), (B, T, n) for a sequence input; Y (B, *output shape).
    ``attention`` (one of :data:`ATTENTION_MODES`) chooses how attention layers are computed:
    ``"explicit"`` (softmax of the scaled scores, written out) or ``"sdpa"``
    (``torch.nn.functional.scaled_dot_product_attention``)."""
    import torch
    import torch.nn.functional as F

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, not {attention!r}")
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
        elif node.op == "conv2d":
            z = F.conv2d(h, tp[f"W{k}"], tp[f"b{k}"] if node.bias else None,
                         stride=node.stride, padding=node.padding)
            out = _torch_activation(node.activation, z)
        elif node.op == "max_pool2d":
            out = F.max_pool2d(h, node.kernel, stride=node.stride)
        elif node.op == "avg_pool2d":
            out = F.avg_pool2d(h, node.kernel, stride=node.stride)
        elif node.op == "flatten":
            out = torch.flatten(h, 1)
        elif node.op in RECURRENT_OPS:
            out = _torch_recurrent(node, h, tp)
        elif node.op == "attention":
            out = _torch_attention(node, h, tp, attention)
        elif node.op == "activation":
            out = _torch_activation(node.activation, h)
        elif node.op == "add":
            out = torch.stack([outputs[i] for i in node.inputs]).sum(dim=0)
        elif node.op == "layer_norm":
            out = F.layer_norm(h, node.shape[-1:], weight=tp[f"gamma{k}"],
                               bias=tp[f"beta{k}"], eps=node.eps)
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


def _np_conv2d(x: np.ndarray, W: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
               padding: tuple[int, int]) -> np.ndarray:
    """Cross-correlation of a batch x (B, C_in, H, W) with W (C_out, C_in, kh, kw).

    z[:, j, r, s] = sum_{k,p,q} W[j, k, p, q] * xpad[:, k, r*sh + p, s*sw + q] (0-based), xpad
    being x with ph (pw) rows (columns) of zeros on each side: one term per kernel offset.
    """
    batch, channels, height, width = x.shape
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = W.shape[2:]
    xpad = np.zeros((batch, channels, height + 2 * ph, width + 2 * pw))
    xpad[:, :, ph:ph + height, pw:pw + width] = x
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    z = np.zeros((batch, W.shape[0], out_h, out_w))
    for p in range(kh):
        for q in range(kw):
            window = xpad[:, :, p:p + sh * (out_h - 1) + 1:sh, q:q + sw * (out_w - 1) + 1:sw]
            z += np.einsum("bkrs,jk->bjrs", window, W[:, :, p, q])
    if b is not None:
        z += b[None, :, None, None]
    return z


def _np_pool2d(x: np.ndarray, op: str, kernel: tuple[int, int],
               stride: tuple[int, int]) -> np.ndarray:
    """Max or mean of x (B, C, H, W) over each kh x kw window, windows stride apart."""
    (kh, kw), (sh, sw) = kernel, stride
    out_h = (x.shape[2] - kh) // sh + 1
    out_w = (x.shape[3] - kw) // sw + 1
    windows = [x[:, :, p:p + sh * (out_h - 1) + 1:sh, q:q + sw * (out_w - 1) + 1:sw]
               for p in range(kh) for q in range(kw)]
    if op == "max_pool2d":
        out = windows[0]
        for window in windows[1:]:
            out = np.maximum(out, window)
        return out
    return sum(windows[1:], windows[0]) / (kh * kw)


def _np_sigmoid(z: np.ndarray) -> np.ndarray:
    return _np_activation(Activation("sigmoid"), z)


def _np_recurrent(node: Node, x: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """An rnn, lstm or gru layer on x (B, T, n_in), one time step at a time from h_0 = c_0 = 0;
    the stacked h_1..h_T (B, T, n), or h_T (B, n) for ``return: last``.

    rnn:  h_t = act(Wx x_t + Wh h_{t-1} + b).
    lstm: rows [i; f; g; o] of Wx x_t + Wh h_{t-1} + b; c_t = sig(f) c_{t-1} + sig(i) tanh(g),
          h_t = sig(o) tanh(c_t).
    gru:  rows [r; z; n] of a = Wx x_t + bx and u = Wh h_{t-1} + bh; r = sig(a_r + u_r),
          z = sig(a_z + u_z), n = tanh(a_n + r u_n), h_t = (1 - z) n + z h_{t-1}.
    """
    k, n = node.number, node.shape[-1]
    Wx, Wh = params[f"Wx{k}"], params[f"Wh{k}"]
    h = np.zeros((x.shape[0], n))
    c = np.zeros((x.shape[0], n))
    steps = []
    for t in range(x.shape[1]):
        xt = x[:, t, :]
        if node.op == "rnn":
            z = xt @ Wx.T + h @ Wh.T
            if node.bias:
                z = z + params[f"b{k}"]
            h = _np_activation(node.activation, z)
        elif node.op == "lstm":
            z = xt @ Wx.T + h @ Wh.T + params[f"b{k}"]
            i, f, g, o = (z[:, j * n:(j + 1) * n] for j in range(4))
            c = _np_sigmoid(f) * c + _np_sigmoid(i) * np.tanh(g)
            h = _np_sigmoid(o) * np.tanh(c)
        else:  # gru
            a = xt @ Wx.T + params[f"bx{k}"]
            u = h @ Wh.T + params[f"bh{k}"]
            r = _np_sigmoid(a[:, :n] + u[:, :n])
            update = _np_sigmoid(a[:, n:2 * n] + u[:, n:2 * n])
            candidate = np.tanh(a[:, 2 * n:] + r * u[:, 2 * n:])
            h = (1.0 - update) * candidate + update * h
        steps.append(h)
    return np.stack(steps, axis=1) if node.returns == "sequence" else h


def _np_attention(node: Node, x: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """An attention layer on x (B, T, n_in), one query step t and one key step s at a time;
    the stacked out_1..out_T (B, T, d).

    q_t = Wq x_t, k_s = Wk x_s, v_s = Wv x_s; e_ts = q_t . k_s / sqrt(d) for s = 1..T (causal:
    s = 1..t); out_t = sum_s exp(e_ts - m_t) v_s / sum_s exp(e_ts - m_t), m_t = max_s e_ts.
    """
    k, d = node.number, node.shape[-1]
    q, key, v = (x @ params[f"{w}{k}"].T for w in ATTENTION_WEIGHTS)
    length = x.shape[1]
    steps = []
    for t in range(length):
        keys = range(t + 1) if node.causal else range(length)
        scores = [(q[:, t] * key[:, s]).sum(axis=-1) / math.sqrt(d) for s in keys]  # (B,) each
        shift = np.max(scores, axis=0)
        weights = [np.exp(e - shift) for e in scores]
        total = sum(weights[1:], weights[0])
        out = sum(w[:, None] * v[:, s] for w, s in zip(weights, keys))
        steps.append(out / total[:, None])
    return np.stack(steps, axis=1)


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
        elif node.op == "conv2d":
            out = _np_activation(node.activation, _np_conv2d(
                h, params[f"W{k}"], params[f"b{k}"] if node.bias else None, node.stride,
                node.padding))
        elif node.op in ("max_pool2d", "avg_pool2d"):
            out = _np_pool2d(h, node.op, node.kernel, node.stride)
        elif node.op == "flatten":
            out = h.reshape(h.shape[0], -1)  # C order: channel slowest, then row, column
        elif node.op in RECURRENT_OPS:
            out = _np_recurrent(node, h, params)
        elif node.op == "attention":
            out = _np_attention(node, h, params)
        elif node.op == "activation":
            out = _np_activation(node.activation, h)
        elif node.op == "add":
            out = outputs[node.inputs[0]].copy()
            for i in node.inputs[1:]:
                out = out + outputs[i]
        elif node.op == "custom":
            out = node.custom_output(outputs, params, np)
        elif node.op == "layer_norm":  # over the last (feature) axis
            mean = h.mean(axis=-1, keepdims=True)
            var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
            out = (h - mean) / np.sqrt(var + node.eps) * params[f"gamma{k}"] + params[f"beta{k}"]
        else:  # dropout, off
            out = h
        outputs.append(out)
    a = outputs[-1]
    if graph.loss == "mse":
        terms = 0.5 * (a - Y) ** 2
    elif graph.loss == "cross_entropy":
        terms = -(Y * np.log(a))
    else:
        terms = -(Y * np.log(a) + (1.0 - Y) * np.log1p(-a))
    per_sample = terms.reshape(terms.shape[0], -1).sum(axis=1)  # every output component
    cost = per_sample.mean()
    weights = [params[name] for name in graph.weight_names]
    cost += graph.l2 / 2 * sum(float((w ** 2).sum()) for w in weights)
    cost += graph.l1 * sum(float(np.abs(w).sum()) for w in weights)
    return float(cost)
