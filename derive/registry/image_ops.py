"""The image ops of the registry: conv2d, max_pool2d, avg_pool2d and flatten
(docs/architecture.md, "Images").

A feature map is a per-sample tensor of rank 3, entry (channel j, row r, column s), indices
from 1. With kernel kh x kw, stride (S_h, S_w) and zero padding (P_h, P_w), output entry (r, s)
reads input rows S_h (r - 1) + p - P_h for the kernel's row offsets p = 1..kh (and columns
likewise); an entry outside the input (in the padding) is 0. So a convolution (a
cross-correlation, as PyTorch's) is

    z^l_{jrs} = sum_k sum_p sum_q w^l_{jkpq} x_{k, S_h(r-1)+p-P_h, S_w(s-1)+q-P_w} + b^l_j

and its backward pass (the full correlation with the flipped kernel, ∂C/∂w as a correlation of
the input with δ) is derived from it by the generic reverse pass, like every other op's.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from derive.quantities import entry, family_indices
from derive.registry.ops import (
    _ACTIVATION,
    Attribute,
    Context,
    Equation,
    Forward,
    OpDef,
    ParameterDef,
)
from derive.registry.windows import WindowMax

_KERNEL = Attribute("kernel", "pair", required=True,
                    doc="the window's rows and columns: an integer or [kh, kw]")


def geometry(attrs: Mapping[str, object], pooling: bool
             ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, padding), each (rows, columns). A stride left out is 1 for a
    convolution and the kernel for a pooling layer, which has no padding."""
    def pair(value: object) -> tuple[int, int]:
        return value if isinstance(value, tuple) else (int(value), int(value))

    kernel = pair(attrs["kernel"])
    stride = attrs.get("stride")
    return (kernel, pair(stride) if stride is not None else (kernel if pooling else (1, 1)),
            pair(attrs.get("padding", 0)))


def _windows(size: int, kernel: int, stride: int, padding: int, axis: str) -> int:
    """How many windows fit along an axis; ValueError when none does."""
    span = size + 2 * padding
    if kernel > span:
        raise ValueError(f"its kernel's {axis} ({kernel}) is larger than the input's {axis} "
                         f"({size}{f' + 2 x padding {padding}' if padding else ''})")
    return (span - kernel) // stride + 1


def _window_shape(attrs: Mapping[str, object], shape: tuple[int, ...], channels: int,
                  pooling: bool) -> tuple[int, int, int]:
    kernel, stride, padding = geometry(attrs, pooling)
    (_c, height, width) = shape
    return (channels, _windows(height, kernel[0], stride[0], padding[0], "height"),
            _windows(width, kernel[1], stride[1], padding[1], "width"))


def window_entry(ctx: Context, channel: sp.Expr, row: sp.Symbol, col: sp.Symbol,
                 p: sp.Symbol, q: sp.Symbol, pooling: bool) -> sp.Expr:
    """The input's entry at kernel offsets (p, q) of the window of output entry (row, col)."""
    (x,) = ctx.inputs
    _kernel, (sh, sw), (ph, pw) = geometry(ctx.attrs, pooling)
    return entry(x.tensor, (channel, sh * (row - 1) + p - ph, sw * (col - 1) + q - pw))


# --- conv2d: z^l_jrs = sum_kpq w^l_jkpq x_{k, S(r-1)+p-P, S(s-1)+q-P} + b^l_j, a = σ(z) --


def _conv_parameters(attrs: Mapping[str, object]) -> tuple[ParameterDef, ...]:
    (kh, kw), _stride, _padding = geometry(attrs, False)
    kernel = ParameterDef("w", ("size", "in", kh, kw), "fan")
    if attrs.get("bias", True):
        return kernel, ParameterDef("b", ("size",), "zeros")
    return (kernel,)


def _conv_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    (kh, kw), _stride, _padding = geometry(ctx.attrs, False)
    j, r, s = family_indices(("channel", "row", "col"), set())
    k, p, q = family_indices(("channel", "offset_row", "offset_col"), {j, r, s})
    expr = sp.Sum(ctx.params["w"][j, k, p, q] * window_entry(ctx, k, r, s, p, q, False),
                  (k, 1, x.shape[0]), (p, 1, kh), (q, 1, kw))
    if "b" in ctx.params:
        expr = expr + ctx.params["b"][j]
    z = ctx.quantity("z", 3)
    linear = Equation(z, (j, r, s), expr, source_kind="z", ranges=ctx.shape)
    activation = ctx.activate(z)
    activation = Equation(activation.target, activation.indices, activation.expr, inline=True,
                          activation=activation.activation, argument=activation.argument,
                          source_kind="a", ranges=ctx.shape)
    return Forward((linear, activation), z)


def _conv_shape(attrs: Mapping[str, object], shape: tuple[int, ...]) -> tuple[int, ...]:
    return _window_shape(attrs, shape, int(attrs["size"]), False)


# --- pooling: the maximum or the mean over each window -------------------------------------


def _pool_forward(ctx: Context, reduce: str) -> Forward:
    (kh, kw), _stride, _padding = geometry(ctx.attrs, True)
    j, r, s = family_indices(("channel", "row", "col"), set())
    p, q = family_indices(("offset_row", "offset_col"), {j, r, s})
    window = window_entry(ctx, j, r, s, p, q, True)
    if reduce == "max":
        expr = WindowMax(window, (p, 1, kh), (q, 1, kw))
    else:
        expr = sp.Sum(window, (p, 1, kh), (q, 1, kw)) / (kh * kw)
    out = ctx.quantity("a", 3)
    return Forward((Equation(out, (j, r, s), expr, source_kind="a", ranges=ctx.shape),), out)


def _pool_shape(attrs: Mapping[str, object], shape: tuple[int, ...]) -> tuple[int, ...]:
    return _window_shape(attrs, shape, shape[0], True)


# --- flatten: a^l_{(k-1)HW + (r-1)W + s} = x_krs, channel-major -----------------------------


def _flatten_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    _channels, height, width = x.shape
    k, r, s = family_indices(("channel", "row", "col"), set())
    out = ctx.quantity("a")
    flat = (k - 1) * height * width + (r - 1) * width + s
    equation = Equation(out, (k, r, s), entry(x.tensor, (k, r, s)), source_kind="a",
                        ranges=x.shape, at=(flat,))
    return Forward((equation,), out)


def _flatten_shape(attrs: Mapping[str, object], shape: tuple[int, ...]) -> tuple[int, ...]:
    channels, height, width = shape
    return (channels * height * width,)


def _no_size(attrs: Mapping[str, object], inputs: tuple[int, ...]) -> int:
    raise AssertionError("an image op's output comes from output_shape")


_STRIDE = Attribute("stride", "pair", 1, doc="the step between windows (default 1)")
_POOL_STRIDE = Attribute("stride", "pair", None,
                         doc="the step between windows (default: the kernel, no overlap)")

IMAGE_OPS: dict[str, OpDef] = {
    "conv2d": OpDef(
        "conv2d", "2-d convolution (cross-correlation, as PyTorch's): z = w ⋆ x + b, a = σ(z)",
        (Attribute("channels", "size", required=True, doc="output channels C_out"), _KERNEL,
         _STRIDE, Attribute("padding", "pair0", 0, doc="zero padding of rows and columns "
                                                       "(default 0)"),
         Attribute("bias", "bool", True, doc="whether the layer has a bias b^l"), _ACTIVATION),
        (1, 1), _conv_parameters, _no_size, _conv_forward, label="conv", reads="image",
        output_shape=_conv_shape),
    "max_pool2d": OpDef(
        "max_pool2d", "the maximum over each window, channel by channel",
        (_KERNEL, _POOL_STRIDE), (1, 1), lambda attrs: (), _no_size,
        lambda ctx: _pool_forward(ctx, "max"), label="max", reads="image",
        output_shape=_pool_shape),
    "avg_pool2d": OpDef(
        "avg_pool2d", "the mean over each window, channel by channel",
        (_KERNEL, _POOL_STRIDE), (1, 1), lambda attrs: (), _no_size,
        lambda ctx: _pool_forward(ctx, "avg"), label="avg", reads="image",
        output_shape=_pool_shape),
    "flatten": OpDef(
        "flatten", "an image as a vector, channel-major (as torch.flatten)",
        (), (1, 1), lambda attrs: (), _no_size, _flatten_forward, label="flat",
        reads="image", output_shape=_flatten_shape),
}
