"""A third, deliberately naive reference for convolutional nets: every entry by explicit loops.

Nothing here imports ``derive``, PyTorch or :mod:`tests.torch_reference`: the spec is read
again here, sizes are computed again here, and the gradients come from a backward pass derived
by hand, layer by layer, written as loops over every index (no autograd, no finite
differences, no vectorised NumPy beyond allocating arrays). Slow and plain on purpose: the
generated code must agree with it, not resemble it.

The definitions, with 1-based indices as in the documents (arrays are 0-based, hence the
``- 1`` when reading or writing an entry):

- ``conv2d`` (stride S = (Sh, Sw), padding P = (Ph, Pw), kernel kh x kw), for a sample::

      z[j, r, s] = sum_{k, p, q} W[j, k, p, q] * x[k, Sh(r-1) + p - Ph, Sw(s-1) + q - Pw] + b[j]

  with k = 1..C_in, p = 1..kh, q = 1..kw, r = 1..H', s = 1..W', H' = floor((H + 2Ph - kh)/Sh)
  + 1, and x[k, i, i2] = 0 when i is outside 1..H or i2 outside 1..W (zero padding). Backward
  (d = dC/d of that quantity)::

      dW[j, k, p, q] = sum_{r, s} dz[j, r, s] * x[k, Sh(r-1) + p - Ph, Sw(s-1) + q - Pw]
      db[j]          = sum_{r, s} dz[j, r, s]
      dx[k, i, i2]   = sum of dz[j, r, s] * W[j, k, p, q] over every (j, r, s, p, q) with
                       Sh(r-1) + p - Ph = i and Sw(s-1) + q - Pw = i2

  (weight gradients summed over the batch too).
- ``max_pool2d`` (kernel kh x kw, stride S, default S = kernel, no padding)::

      out[c, r, s] = max_{p, q} x[c, Sh(r-1) + p, Sw(s-1) + q]

  The gradient of out[c, r, s] goes wholly to the FIRST maximum of its window in row-major
  order (p outer, q inner; a later entry replaces the best only if strictly greater), which is
  also PyTorch's rule.
- ``avg_pool2d``: ``out[c, r, s] = (1/(kh kw)) sum_{p, q} x[c, Sh(r-1) + p, Sw(s-1) + q]``;
  each entry of the window receives dout[c, r, s] / (kh kw).
- ``flatten``: ``v[(c-1) H W + (i-1) W + i2] = x[c, i, i2]`` (C-major, as ``torch.flatten``).
- ``dense``: ``z[j] = sum_k W[j, k] x[k] + b[j]``; ``activation`` and the activations of
  dense/conv2d layers: elementwise (softmax on vectors only, over the features).
- losses, summed over every output component of a sample: mse ``(a - y)^2 / 2``,
  cross_entropy ``-y log a``, binary_cross_entropy ``-(y log a + (1 - y) log(1 - a))``; the
  batch cost is their mean over samples plus ``(l2/2) sum W^2 + l1 sum |W|`` over every
  ``W{l}`` of dense and conv2d layers (|w|' = sign(w), 0 at 0).

Specs: chains only (each layer reads the previous one; an explicit ``input`` naming the
previous layer is accepted), of ``conv2d``, ``max_pool2d``, ``avg_pool2d``, ``flatten``,
``dense`` (op omitted), ``activation`` and ``dropout`` (off: identity). Entry point:
:func:`conv_net_loss_and_grads`; the per-layer functions are public for tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

OPS = ("conv2d", "max_pool2d", "avg_pool2d", "flatten", "dense", "activation", "dropout")
LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")
ALPHA_DEFAULTS = {"leaky_relu": 0.01, "elu": 1.0}


# --- reading a chain spec ----------------------------------------------------------------------


def _int_pair(value: Any, what: str) -> tuple[int, int]:
    """(height, width) from an int or a two-list."""
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if is_int(value):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_int, value)):
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be an int or [h, w], not {value!r}")


def _activation(value: Any) -> tuple[str, float]:
    """(name, alpha) of a built-in activation given by name or ``{name, alpha}``."""
    if isinstance(value, dict):
        if "expr" in value:
            raise NotImplementedError("custom activations are not supported")
        name = value["name"]
        alpha = float(value.get("alpha", ALPHA_DEFAULTS.get(name, 0.0)))
    else:
        name, alpha = value, ALPHA_DEFAULTS.get(value, 0.0)
    if name not in ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu",
                    "silu", "gelu", "softmax"):
        raise NotImplementedError(f"activation {name!r} is not supported")
    return name, alpha


def _windows(size: int, kernel: int, stride: int, padding: int) -> int:
    """The number of positions r = 1, 2, ... whose window, rows S(r-1) + 1 - P to
    S(r-1) + k - P, ends inside the padded input (at most size + P): counted, not by formula."""
    count = 0
    r = 1
    while stride * (r - 1) + kernel - padding <= size + padding:
        count += 1
        r += 1
    if count == 0:
        raise ValueError(f"a kernel of {kernel} does not fit in {size} (padding {padding})")
    return count


def read_chain(spec: dict) -> list[dict]:
    """The layers of a chain spec, each a dict with ``op``, ``number``, ``in_shape``,
    ``out_shape`` and its resolved attributes."""
    value = spec["input"]
    shape = (value,) if isinstance(value, int) else tuple(value)
    names: dict[str, int] = {}
    layers = []
    for number, layer in enumerate(spec["layers"], start=1):
        op = layer.get("op", "dense")
        if "inputs" in layer:
            raise NotImplementedError(f"layer {number}: chains only (no 'inputs')")
        if op not in OPS:
            raise NotImplementedError(f"layer {number}: op {op!r} is not supported")
        if "input" in layer:
            ref = layer["input"]
            ref = ref[0] if isinstance(ref, list) and len(ref) == 1 else ref
            if isinstance(ref, list):
                raise NotImplementedError(f"layer {number}: chains only (reads {ref!r})")
            target = {"input": 0, **names}.get(ref, ref)
            if isinstance(target, str) and target.isdigit():
                target = int(target)
            if target != number - 1:
                raise NotImplementedError(f"layer {number}: chains only (reads {ref!r})")
        entry: dict[str, Any] = {"op": op, "number": number, "in_shape": shape}
        if op == "conv2d":
            if len(shape) != 3:
                raise ValueError(f"layer {number}: conv2d reads an image")
            kh, kw = _int_pair(layer["kernel"], "kernel")
            sh, sw = _int_pair(layer.get("stride", 1), "stride")
            ph, pw = _int_pair(layer.get("padding", 0), "padding")
            entry.update(kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
                         bias=bool(layer.get("bias", True)),
                         activation=_activation(layer.get("activation", "identity")))
            shape = (int(layer["channels"]), _windows(shape[1], kh, sh, ph),
                     _windows(shape[2], kw, sw, pw))
        elif op in ("max_pool2d", "avg_pool2d"):
            if len(shape) != 3:
                raise ValueError(f"layer {number}: {op} reads an image")
            kh, kw = _int_pair(layer["kernel"], "kernel")
            sh, sw = _int_pair(layer.get("stride", [kh, kw]), "stride")
            entry.update(kernel=(kh, kw), stride=(sh, sw))
            shape = (shape[0], _windows(shape[1], kh, sh, 0), _windows(shape[2], kw, sw, 0))
        elif op == "flatten":
            if len(shape) != 3:
                raise ValueError(f"layer {number}: flatten reads an image")
            shape = (shape[0] * shape[1] * shape[2],)
        elif op == "dense":
            if len(shape) != 1:
                raise ValueError(f"layer {number}: dense reads a vector")
            entry.update(bias=bool(layer.get("bias", True)),
                         activation=_activation(layer.get("activation", "identity")))
            shape = (int(layer["size"]),)
        elif op == "activation":
            entry["activation"] = _activation(layer["activation"])
        if entry.get("activation", ("identity",))[0] == "softmax" and len(shape) != 1:
            raise ValueError(f"layer {number}: softmax on an image")
        entry["out_shape"] = shape
        layers.append(entry)
        if "name" in layer:
            names[layer["name"]] = number
    return layers


def parameter_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, by this module's own reading of the spec."""
    shapes = {}
    for layer in read_chain(spec):
        n = layer["number"]
        out, inn = layer["out_shape"], layer["in_shape"]
        if layer["op"] == "conv2d":
            shapes[f"W{n}"] = (out[0], inn[0], *layer["kernel"])
        elif layer["op"] == "dense":
            shapes[f"W{n}"] = (out[0], inn[0])
        else:
            continue
        if layer["bias"]:
            shapes[f"b{n}"] = (out[0],)
    return shapes


# --- conv2d -------------------------------------------------------------------------------------


def _entry(x: np.ndarray, b: int, k: int, i: int, i2: int) -> float:
    """x[b, k, i, i2] with 1-based i, i2 (k, b 0-based), 0 outside 1..H x 1..W."""
    if 1 <= i <= x.shape[2] and 1 <= i2 <= x.shape[3]:
        return float(x[b, k, i - 1, i2 - 1])
    return 0.0


def conv2d_forward(x: np.ndarray, W: np.ndarray, bias: np.ndarray | None,
                   stride: tuple[int, int], padding: tuple[int, int],
                   out_hw: tuple[int, int]) -> np.ndarray:
    """z (B, C_out, H', W') by the index definition, entry by entry."""
    B, C_in = x.shape[:2]
    C_out, _, kh, kw = W.shape
    (Sh, Sw), (Ph, Pw) = stride, padding
    z = np.zeros((B, C_out, *out_hw))
    for b in range(B):
        for j in range(1, C_out + 1):
            for r in range(1, out_hw[0] + 1):
                for s in range(1, out_hw[1] + 1):
                    total = 0.0 if bias is None else float(bias[j - 1])
                    for k in range(1, C_in + 1):
                        for p in range(1, kh + 1):
                            for q in range(1, kw + 1):
                                total += float(W[j - 1, k - 1, p - 1, q - 1]) * _entry(
                                    x, b, k - 1, Sh * (r - 1) + p - Ph, Sw * (s - 1) + q - Pw)
                    z[b, j - 1, r - 1, s - 1] = total
    return z


def conv2d_backward(x: np.ndarray, W: np.ndarray, dz: np.ndarray, stride: tuple[int, int],
                    padding: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dW, db) from dz = dC/dz, by scattering each term of the forward sum."""
    B, C_in, H, Wd = x.shape
    C_out, _, kh, kw = W.shape
    (Sh, Sw), (Ph, Pw) = stride, padding
    dx = np.zeros(x.shape)
    dW = np.zeros(W.shape)
    db = np.zeros(C_out)
    for b in range(B):
        for j in range(1, C_out + 1):
            for r in range(1, dz.shape[2] + 1):
                for s in range(1, dz.shape[3] + 1):
                    g = float(dz[b, j - 1, r - 1, s - 1])
                    db[j - 1] += g
                    for k in range(1, C_in + 1):
                        for p in range(1, kh + 1):
                            for q in range(1, kw + 1):
                                i, i2 = Sh * (r - 1) + p - Ph, Sw * (s - 1) + q - Pw
                                if 1 <= i <= H and 1 <= i2 <= Wd:  # else a padding zero
                                    dW[j - 1, k - 1, p - 1, q - 1] += g * x[b, k - 1, i - 1,
                                                                             i2 - 1]
                                    dx[b, k - 1, i - 1, i2 - 1] += g * W[j - 1, k - 1, p - 1,
                                                                         q - 1]
    return dx, dW, db


# --- pooling ------------------------------------------------------------------------------------


def max_pool2d_forward(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                       out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(out, where): the window maxima and, per output entry, the 1-based (i, i2) of the
    FIRST maximum in row-major window order."""
    B, C = x.shape[:2]
    (kh, kw), (Sh, Sw) = kernel, stride
    out = np.zeros((B, C, *out_hw))
    where = np.zeros((B, C, *out_hw, 2), dtype=int)
    for b in range(B):
        for c in range(C):
            for r in range(1, out_hw[0] + 1):
                for s in range(1, out_hw[1] + 1):
                    best, best_at = -math.inf, None
                    for p in range(1, kh + 1):
                        for q in range(1, kw + 1):
                            i, i2 = Sh * (r - 1) + p, Sw * (s - 1) + q
                            value = float(x[b, c, i - 1, i2 - 1])
                            if best_at is None or value > best:  # strictly: the first wins
                                best, best_at = value, (i, i2)
                    out[b, c, r - 1, s - 1] = best
                    where[b, c, r - 1, s - 1] = best_at
    return out, where


def max_pool2d_backward(dout: np.ndarray, where: np.ndarray,
                        in_shape: tuple[int, ...]) -> np.ndarray:
    """dx: each dout[b, c, r, s] added to the entry its window's maximum came from."""
    dx = np.zeros(in_shape)
    B, C, out_h, out_w = dout.shape
    for b in range(B):
        for c in range(C):
            for r in range(out_h):
                for s in range(out_w):
                    i, i2 = where[b, c, r, s]
                    dx[b, c, i - 1, i2 - 1] += dout[b, c, r, s]
    return dx


def avg_pool2d_forward(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                       out_hw: tuple[int, int]) -> np.ndarray:
    """The mean of each kh x kw window."""
    B, C = x.shape[:2]
    (kh, kw), (Sh, Sw) = kernel, stride
    out = np.zeros((B, C, *out_hw))
    for b in range(B):
        for c in range(C):
            for r in range(1, out_hw[0] + 1):
                for s in range(1, out_hw[1] + 1):
                    total = 0.0
                    for p in range(1, kh + 1):
                        for q in range(1, kw + 1):
                            total += x[b, c, Sh * (r - 1) + p - 1, Sw * (s - 1) + q - 1]
                    out[b, c, r - 1, s - 1] = total / (kh * kw)
    return out


def avg_pool2d_backward(dout: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                        in_shape: tuple[int, ...]) -> np.ndarray:
    """dx: each window entry receives dout / (kh kw) from every window that holds it."""
    (kh, kw), (Sh, Sw) = kernel, stride
    dx = np.zeros(in_shape)
    B, C, out_h, out_w = dout.shape
    for b in range(B):
        for c in range(C):
            for r in range(1, out_h + 1):
                for s in range(1, out_w + 1):
                    for p in range(1, kh + 1):
                        for q in range(1, kw + 1):
                            dx[b, c, Sh * (r - 1) + p - 1, Sw * (s - 1) + q - 1] += (
                                dout[b, c, r - 1, s - 1] / (kh * kw))
    return dx


# --- flatten and dense --------------------------------------------------------------------------


def flatten_forward(x: np.ndarray) -> np.ndarray:
    """v[(c-1) H W + (i-1) W + i2] = x[c, i, i2] (1-based), per sample."""
    B, C, H, Wd = x.shape
    v = np.zeros((B, C * H * Wd))
    for b in range(B):
        for c in range(1, C + 1):
            for i in range(1, H + 1):
                for i2 in range(1, Wd + 1):
                    v[b, (c - 1) * H * Wd + (i - 1) * Wd + i2 - 1] = x[b, c - 1, i - 1, i2 - 1]
    return v


def flatten_backward(dv: np.ndarray, in_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse index map, applied to the gradient."""
    B, C, H, Wd = in_shape
    dx = np.zeros(in_shape)
    for b in range(B):
        for c in range(1, C + 1):
            for i in range(1, H + 1):
                for i2 in range(1, Wd + 1):
                    dx[b, c - 1, i - 1, i2 - 1] = dv[b, (c - 1) * H * Wd + (i - 1) * Wd + i2 - 1]
    return dx


def dense_forward(x: np.ndarray, W: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """z[j] = sum_k W[j, k] x[k] + b[j]."""
    B, n_in = x.shape
    z = np.zeros((B, W.shape[0]))
    for b in range(B):
        for j in range(W.shape[0]):
            total = 0.0 if bias is None else float(bias[j])
            for k in range(n_in):
                total += W[j, k] * x[b, k]
            z[b, j] = total
    return z


def dense_backward(x: np.ndarray, W: np.ndarray,
                   dz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dW, db): dx[k] = sum_j W[j, k] dz[j]; dW[j, k] = sum_b dz[j] x[k]; db = sum_b dz."""
    dx = np.zeros(x.shape)
    dW = np.zeros(W.shape)
    db = np.zeros(W.shape[0])
    for b in range(x.shape[0]):
        for j in range(W.shape[0]):
            db[j] += dz[b, j]
            for k in range(x.shape[1]):
                dW[j, k] += dz[b, j] * x[b, k]
                dx[b, k] += W[j, k] * dz[b, j]
    return dx, dW, db


# --- activations and losses ---------------------------------------------------------------------


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))


def _phi(t: float) -> float:
    """The standard normal CDF."""
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def _scalar(name: str, alpha: float, t: float) -> tuple[float, float]:
    """(sigma(t), sigma'(t)) of an elementwise activation."""
    if name == "identity":
        return t, 1.0
    if name == "sigmoid":
        a = _sigmoid(t)
        return a, a * (1.0 - a)
    if name == "tanh":
        a = math.tanh(t)
        return a, 1.0 - a * a
    if name == "relu":
        return (t, 1.0) if t > 0 else (0.0, 0.0)
    if name == "leaky_relu":
        return (t, 1.0) if t > 0 else (alpha * t, alpha)
    if name == "softplus":
        return max(t, 0.0) + math.log1p(math.exp(-abs(t))), _sigmoid(t)
    if name == "elu":
        return (t, 1.0) if t > 0 else (alpha * math.expm1(t), alpha * math.exp(t))
    if name == "silu":
        g = _sigmoid(t)
        return t * g, g + t * g * (1.0 - g)
    if name == "gelu":
        return t * _phi(t), _phi(t) + t * math.exp(-t * t / 2.0) / math.sqrt(2.0 * math.pi)
    raise NotImplementedError(name)


def activation_forward(act: tuple[str, float], z: np.ndarray) -> np.ndarray:
    """a = sigma(z) entry by entry; softmax over the last axis of a (B, n) array."""
    name, alpha = act
    a = np.zeros(z.shape)
    if name == "softmax":
        for b in range(z.shape[0]):
            top = max(z[b])
            exps = [math.exp(v - top) for v in z[b]]
            for j, e in enumerate(exps):
                a[b, j] = e / sum(exps)
        return a
    for index in np.ndindex(z.shape):
        a[index] = _scalar(name, alpha, float(z[index]))[0]
    return a


def activation_backward(act: tuple[str, float], z: np.ndarray, a: np.ndarray,
                        da: np.ndarray) -> np.ndarray:
    """dz from da: sigma'(z) da entrywise; softmax dz[j] = a[j] (da[j] - sum_i a[i] da[i])."""
    name, alpha = act
    dz = np.zeros(z.shape)
    if name == "softmax":
        for b in range(z.shape[0]):
            inner = sum(a[b, i] * da[b, i] for i in range(z.shape[1]))
            for j in range(z.shape[1]):
                dz[b, j] = a[b, j] * (da[b, j] - inner)
        return dz
    for index in np.ndindex(z.shape):
        dz[index] = _scalar(name, alpha, float(z[index]))[1] * da[index]
    return dz


def loss_and_output_gradient(loss: str, a: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean over samples of the summed loss, dC/da of that mean) entry by entry."""
    B = a.shape[0]
    total = 0.0
    da = np.zeros(a.shape)
    for index in np.ndindex(a.shape):
        ai, yi = float(a[index]), float(Y[index])
        if loss == "mse":
            total += 0.5 * (ai - yi) ** 2
            da[index] = (ai - yi) / B
        elif loss == "cross_entropy":
            total += -yi * math.log(ai)
            da[index] = -yi / ai / B
        elif loss == "binary_cross_entropy":
            total += -(yi * math.log(ai) + (1.0 - yi) * math.log(1.0 - ai))
            da[index] = (-yi / ai + (1.0 - yi) / (1.0 - ai)) / B
        else:
            raise NotImplementedError(loss)
    return total / B, da


# --- the whole net ------------------------------------------------------------------------------


def conv_net_loss_and_grads(spec: dict, params: dict[str, np.ndarray], X: np.ndarray,
                            Y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Batch cost and the gradient of every parameter: a forward pass that keeps each layer's
    input and pre-activation, then the hand-derived backward pass, layer by layer in reverse.
    """
    layers = read_chain(spec)
    shapes = parameter_shapes(spec)
    if set(params) != set(shapes):
        raise KeyError(f"params have keys {sorted(params)}, the spec needs {sorted(shapes)}")
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    for name, shape in shapes.items():
        if params[name].shape != shape:
            raise ValueError(f"{name} has shape {params[name].shape}, expected {shape}")
    loss = spec["loss"]
    loss = loss.get("name") if isinstance(loss, dict) else loss
    if loss not in LOSSES:
        raise NotImplementedError(f"loss {loss!r} is not supported")
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.shape[1:] != layers[0]["in_shape"] or Y.shape != (X.shape[0], *layers[-1]["out_shape"]):
        raise ValueError(f"X {X.shape} or Y {Y.shape} does not fit the spec")

    # forward: keep (input, pre-activation, output, max-pool positions) of every layer
    h = X
    saved = []
    for layer in layers:
        n, op = layer["number"], layer["op"]
        z, where = h, None
        if op == "conv2d":
            z = conv2d_forward(h, params[f"W{n}"], params.get(f"b{n}"), layer["stride"],
                               layer["padding"], layer["out_shape"][1:])
        elif op == "dense":
            z = dense_forward(h, params[f"W{n}"], params.get(f"b{n}"))
        elif op == "max_pool2d":
            z, where = max_pool2d_forward(h, layer["kernel"], layer["stride"],
                                          layer["out_shape"][1:])
        elif op == "avg_pool2d":
            z = avg_pool2d_forward(h, layer["kernel"], layer["stride"], layer["out_shape"][1:])
        elif op == "flatten":
            z = flatten_forward(h)
        out = activation_forward(layer["activation"], z) if "activation" in layer else z
        saved.append((h, z, out, where))
        h = out

    cost, grad = loss_and_output_gradient(loss, h, Y)
    grads: dict[str, np.ndarray] = {}
    # backward: grad is dC/d(this layer's output); turn it into dC/d(its input)
    for layer, (x, z, out, where) in zip(reversed(layers), reversed(saved)):
        n, op = layer["number"], layer["op"]
        if "activation" in layer:
            grad = activation_backward(layer["activation"], z, out, grad)
        if op == "conv2d":
            grad, dW, db = conv2d_backward(x, params[f"W{n}"], grad, layer["stride"],
                                           layer["padding"])
        elif op == "dense":
            grad, dW, db = dense_backward(x, params[f"W{n}"], grad)
        elif op == "max_pool2d":
            grad = max_pool2d_backward(grad, where, x.shape)
        elif op == "avg_pool2d":
            grad = avg_pool2d_backward(grad, layer["kernel"], layer["stride"], x.shape)
        elif op == "flatten":
            grad = flatten_backward(grad, x.shape)
        if op in ("conv2d", "dense"):
            grads[f"W{n}"] = dW
            if layer["bias"]:
                grads[f"b{n}"] = db

    # regularization over every weight and kernel W{l}
    reg = spec.get("regularization") or {}
    l2, l1 = float(reg.get("l2", 0.0)), float(reg.get("l1", 0.0))
    for name in shapes:
        if name.startswith("W"):
            W, dW = params[name], grads[name]
            for index in np.ndindex(W.shape):
                w = float(W[index])
                cost += l2 / 2 * w * w + l1 * abs(w)
                dW[index] += l2 * w + l1 * (1.0 if w > 0 else -1.0 if w < 0 else 0.0)
    return float(cost), grads
