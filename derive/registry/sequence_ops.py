"""The recurrent ops of the registry: rnn, lstm and gru (docs/architecture.md, "Sequences").

A sequence is a per-sample tensor of rank 2, entry (time step t, feature j), indices from 1;
its steps are t = 1..T. A recurrent layer reads its own state at the step before, h_{t-1},
with h_0 = 0: an entry at step 0 is outside the sequence and reads 0, as a padded entry of a
feature map does. So a simple recurrent layer is

    z^l_{tj} = sum_k wx^l_{jk} x_{tk} + sum_k wh^l_{jk} h^l_{t-1,k} + b^l_j,
    h^l_{tj} = sigma(z^l_{tj})

and backpropagation through time (the error of step t fed by the error of step t + 1 through
wh^l) is derived from it by the generic reverse pass, like every other op's backward pass.
The LSTM and the GRU stack their gates' rows in one matrix, in PyTorch's order; a gate reads
its block of the stacked pre-activation at j + (its block) n.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from derive.quantities import LENGTH, entry, family_indices
from derive.registry.functions import resolve_activation
from derive.registry.ops import Attribute, Context, Equation, Forward, OpDef, ParameterDef

_RETURN = Attribute("return", "choice", "sequence",
                    doc="`sequence` (every step's h_t, default) or `last` (h_T only)",
                    choices=("sequence", "last"))
_SIZE = Attribute("size", "size", required=True, doc="the hidden state's width n_l")


def _sigmoid() -> object:
    return resolve_activation("sigmoid", {}, None)


def _tanh() -> object:
    return resolve_activation("tanh", {}, None)


def _indices() -> tuple[sp.Symbol, sp.Symbol, sp.Symbol]:
    """(t, j, k): a step, a feature of the layer, a feature it reads."""
    t, j = family_indices(("time", "channel"), set())
    (k,) = family_indices(("channel",), {t, j})
    return t, j, k


def _linear(ctx: Context, weight: str, source: sp.IndexedBase, t: sp.Expr, row: sp.Expr,
            k: sp.Symbol, width: sp.Expr) -> sp.Expr:
    """sum_k weight_{row, k} source_{t, k}."""
    return sp.Sum(ctx.params[weight][row, k] * source[t, k], (k, 1, width))


def _returned(ctx: Context, h: Equation) -> tuple[Equation, ...]:
    """The layer's last equation: h itself, or with `return: last` the vector a_j = h_{Tj}."""
    if ctx.attrs.get("return", "sequence") != "last":
        return (h,)
    (j,) = family_indices(("channel",), set())
    out = ctx.quantity("a", 1)
    return h, Equation(out, (j,), entry(h.target, (LENGTH, j)), inline=True, source_kind="a",
                       ranges=(ctx.size,))


def _gate(ctx: Context, role: str, activation: object, argument: sp.Expr,
          indices: tuple[sp.Symbol, ...]) -> Equation:
    """role_{tj} = activation(argument): a gate, with its own (fixed) activation."""
    target = ctx.quantity(role, 2)
    return Equation(target, indices, activation.expr.subs(activation.variable, argument),
                    activation=activation, argument=argument, source_kind=role,
                    ranges=(LENGTH, ctx.size), gate=True)


# --- rnn: z_t = Wx x_t + Wh h_{t-1} + b, h_t = sigma(z_t) ------------------------------------


def _rnn_parameters(attrs: Mapping[str, object]) -> tuple[ParameterDef, ...]:
    weights = (ParameterDef("wx", ("size", "in"), "glorot"),
               ParameterDef("wh", ("size", "size"), "glorot"))
    if attrs.get("bias", True):
        return (*weights, ParameterDef("b", ("size",), "zeros"))
    return weights


def _rnn_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    t, j, k = _indices()
    z, h = ctx.quantity("z", 2), ctx.quantity("h", 2)
    expr = (_linear(ctx, "wx", x.tensor.indexed, t, j, k, x.size)
            + _linear(ctx, "wh", h.indexed, t - 1, j, k, ctx.size))
    if "b" in ctx.params:
        expr = expr + ctx.params["b"][j]
    linear = Equation(z, (t, j), expr, source_kind="z", ranges=(LENGTH, ctx.size))
    activation = ctx.activate(z, "h")
    state = Equation(h, (t, j), activation.expr, inline=True, activation=activation.activation,
                     argument=activation.argument, source_kind="h", ranges=(LENGTH, ctx.size))
    return Forward((linear, *_returned(ctx, state)), z)


# --- lstm: gates i, f, g, o from one stacked z; c_t = f c_{t-1} + i g, h_t = o tanh(c_t) --------


def _lstm_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    t, j, k = _indices()
    (u,) = family_indices(("channel",), {t, j, k})
    n = ctx.size
    z, c, h = ctx.quantity("z", 2), ctx.quantity("c", 2), ctx.quantity("h", 2)
    stacked = Equation(z, (t, u), _linear(ctx, "wx", x.tensor.indexed, t, u, k, x.size)
                       + _linear(ctx, "wh", h.indexed, t - 1, u, k, n) + ctx.params["b"][u],
                       source_kind="z", ranges=(LENGTH, 4 * n))
    gates = [_gate(ctx, role, activation, z.indexed[t, j + block * n], (t, j))
             for block, (role, activation) in enumerate(
                 (("i", _sigmoid()), ("f", _sigmoid()), ("g", _tanh()), ("o", _sigmoid())))]
    i, f, g, o = (gate.target.indexed for gate in gates)
    cell = Equation(c, (t, j), f[t, j] * c.indexed[t - 1, j] + i[t, j] * g[t, j],
                    source_kind="c", ranges=(LENGTH, n))
    state = Equation(h, (t, j), o[t, j] * sp.tanh(c.indexed[t, j]), source_kind="h",
                     ranges=(LENGTH, n))
    return Forward((stacked, *gates, cell, *_returned(ctx, state)), z)


# --- gru: PyTorch's r, z (here u), n (here g); h_t = (1 - u) g + u h_{t-1} ---------------------


def _gru_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    t, j, k = _indices()
    (v,) = family_indices(("channel",), {t, j, k})
    n = ctx.size
    zx, zh, h = ctx.quantity("zx", 2), ctx.quantity("zh", 2), ctx.quantity("h", 2)
    inputs = Equation(zx, (t, v), _linear(ctx, "wx", x.tensor.indexed, t, v, k, x.size)
                      + ctx.params["bx"][v], source_kind="zx", ranges=(LENGTH, 3 * n))
    hidden = Equation(zh, (t, v), _linear(ctx, "wh", h.indexed, t - 1, v, k, n)
                      + ctx.params["bh"][v], source_kind="zh", ranges=(LENGTH, 3 * n))
    a, b = zx.indexed, zh.indexed
    reset = _gate(ctx, "r", _sigmoid(), a[t, j] + b[t, j], (t, j))
    update = _gate(ctx, "u", _sigmoid(), a[t, j + n] + b[t, j + n], (t, j))
    r, w = reset.target.indexed, update.target.indexed
    candidate = _gate(ctx, "g", _tanh(), a[t, j + 2 * n] + r[t, j] * b[t, j + 2 * n], (t, j))
    g = candidate.target.indexed
    state = Equation(h, (t, j), (1 - w[t, j]) * g[t, j] + w[t, j] * h.indexed[t - 1, j],
                     source_kind="h", ranges=(LENGTH, n))
    return Forward((inputs, hidden, reset, update, candidate, *_returned(ctx, state)), h)


def _recurrent_shape(attrs: Mapping[str, object], shape: tuple[int, ...]) -> tuple[int, ...]:
    size = int(attrs["size"])
    return (size,) if attrs.get("return", "sequence") == "last" else (shape[0], size)


def _no_size(attrs: Mapping[str, object], inputs: tuple[int, ...]) -> int:
    raise AssertionError("a recurrent op's output comes from output_shape")


SEQUENCE_OPS: dict[str, OpDef] = {
    "rnn": OpDef(
        "rnn", "simple recurrent layer: h_t = σ(Wx x_t + Wh h_{t−1} + b), h_0 = 0",
        (_SIZE, Attribute("activation", "activation", "tanh",
                          doc="the state's activation (default tanh)"), _RETURN,
         Attribute("bias", "bool", True, doc="whether the layer has a bias b^l")),
        (1, 1), _rnn_parameters, _no_size, _rnn_forward, label="rnn", reads="sequence",
        output_shape=_recurrent_shape),
    "lstm": OpDef(
        "lstm", "long short-term memory: gates i, f, g, o (PyTorch's order), "
                "c_t = f c_{t−1} + i g, h_t = o tanh(c_t)",
        (_SIZE, _RETURN), (1, 1),
        lambda attrs: (ParameterDef("wx", (("size", 4), "in"), "glorot"),
                       ParameterDef("wh", (("size", 4), "size"), "glorot"),
                       ParameterDef("b", (("size", 4),), "zeros")),
        _no_size, _lstm_forward, label="LSTM", reads="sequence", output_shape=_recurrent_shape),
    "gru": OpDef(
        "gru", "gated recurrent unit (PyTorch's equations): reset r, update u (PyTorch's z), "
               "candidate g (PyTorch's n), h_t = (1 − u) g + u h_{t−1}",
        (_SIZE, _RETURN), (1, 1),
        lambda attrs: (ParameterDef("wx", (("size", 3), "in"), "glorot"),
                       ParameterDef("wh", (("size", 3), "size"), "glorot"),
                       ParameterDef("bx", (("size", 3),), "zeros"),
                       ParameterDef("bh", (("size", 3),), "zeros")),
        _no_size, _gru_forward, label="GRU", reads="sequence", output_shape=_recurrent_shape),
}
