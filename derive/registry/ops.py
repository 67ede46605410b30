"""The op registry: every layer kind is one entry here (docs/architecture.md, "The op contract").

An entry declares what the spec may say about the op (its attributes), how many inputs it reads,
its parameters and their shapes, the width of its output, and its forward pass in index form:
a short list of :class:`Equation` objects (SymPy ``Indexed``, ``Sum`` and activation functions)
that define the node's quantities one after another. Nothing else about an op is math: the
derivation differentiates these equations with ``sympy.diff``, and every later stage reads the
derivation. Entries may add presentation (a description, a diagram label).

Stage 0 (a registry used by the spec and the graph stages). Takes nothing; gives :data:`OPS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import sympy as sp

from derive.quantities import NetTensor, entry, fresh_indices, indices_for
from derive.registry.functions import Activation


@dataclass(frozen=True)
class Attribute:
    """An attribute an op takes in the spec.

    ``kind``: ``"size"`` (a positive integer), ``"activation"`` (an activation reference),
    ``"bool"``, ``"rate"`` (a number in [0, 1)), ``"positive"`` (a number > 0), ``"pair"``
    (a positive integer or [rows, columns]: a kernel, a stride), ``"pair0"`` (the same,
    from 0: a padding) or ``"choice"`` (one of ``choices``; a recurrent layer's ``return``).
    ``default`` ``None`` with ``required`` false means "absent".
    """

    name: str
    kind: str
    default: object = None
    required: bool = False
    doc: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParameterDef:
    """A parameter of an op: ``role`` (``w``, ``b``, ``gamma``, ``beta``; a custom op's own
    names), its shape in terms of ``"size"`` (the node's width), ``"in"`` (its input's width)
    and ``"in1"``, ``"in2"``, ... (each input's), and how it starts."""

    role: str
    #: axis names, numbers (a kernel's rows and columns), or (name, k): k times the axis (an
    #: LSTM's four gates stacked: ("size", 4))
    shape: tuple[str | int | tuple[str, int], ...]
    init: str   # "fan" (He or Glorot by activation), "glorot", "zeros" or "ones"


def axis_name(axis: str | int | tuple[str, int], node: int) -> str:
    """One axis of a parameter's shape in words, for messages: ``n_3`` (the width of node 3),
    ``n_in`` (its input's), ``4 n_3`` (an LSTM's four gates stacked), a number as it is."""
    if isinstance(axis, tuple):
        name, times = axis
        return f"{times} {axis_name(name, node)}"
    if isinstance(axis, str):
        return f"n_{node}" if axis == "size" else f"n_{axis}"
    return str(axis)


def axis_value(axis: str | int | tuple[str, int], values: Mapping[str, object]) -> object:
    """One axis of a parameter's shape, with the axis names' ``values`` (numbers or
    symbols)."""
    if isinstance(axis, str):
        return values[axis]
    if isinstance(axis, tuple):
        name, times = axis
        return times * values[name]
    return axis


@dataclass(frozen=True)
class Equation:
    """``target[indices] = expr`` in index form.

    ``activation`` and ``argument`` are set when the equation applies an elementwise
    activation: ``expr`` is then ``activation(argument)``, and the derivation writes its
    derivative as σ'(argument) before inserting the activation's own derivative. ``inline``
    says the target's adjoint is substituted where it is used rather than shown as a formula of
    its own (the a^l of a dense layer: the classic equations speak of δ^l = ∂C/∂z^l only).

    ``ranges`` are the ranges 1..n of ``indices`` (empty: the node's width for each, filled in
    by the graph); ``at`` the target's entry as expressions of ``indices`` when it is not
    simply ``indices`` (a flatten's a_{(k-1)HW + (r-1)W + s} = x_{krs}).
    """

    target: NetTensor
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr
    inline: bool = False
    activation: Activation | None = None
    argument: sp.Expr | None = None
    source_kind: str = ""           # what the equation defines, for documents: "z", "a", ...
    ranges: tuple[sp.Expr, ...] = ()
    at: tuple[sp.Expr, ...] | None = None
    gate: bool = False              # ``activation`` is the op's own, not the node's (a gate)
    #: a softmax: expr is e^{x_j} / Σ_i e^{x_i} (each term possibly masked by a bracket); its
    #: derivative is written in the outputs it defines
    softmax: bool = False

    @property
    def lhs(self) -> sp.Expr:
        return entry(self.target, self.target_indices(self.indices))

    def target_indices(self, indices: tuple[sp.Expr, ...]) -> tuple[sp.Expr, ...]:
        """The target's entry when the equation's indices are ``indices``."""
        if self.at is None:
            return tuple(indices)
        mapping = dict(zip(self.indices, indices))
        return tuple(sp.sympify(e).xreplace(mapping) for e in self.at)


@dataclass(frozen=True)
class Input:
    """One input a node reads: its quantity, its width symbol (an image's channels) and its
    per-sample shape as symbols ((n,) or (C, H, W))."""

    tensor: NetTensor
    size: sp.Symbol
    shape: tuple[sp.Symbol, ...] = ()

    def __getitem__(self, index: sp.Expr) -> sp.Expr:
        return self.tensor.indexed[index]


@dataclass(frozen=True)
class Context:
    """What an op's forward builder gets: the node, its attributes, inputs and parameters."""

    node: int
    attrs: Mapping[str, object]
    inputs: tuple[Input, ...]
    size: sp.Symbol
    activation: Activation | None
    params: Mapping[str, sp.IndexedBase]
    shape: tuple[sp.Symbol, ...] = ()     # the node's own per-sample shape, as symbols

    def quantity(self, role: str, rank: int = 1) -> NetTensor:
        return NetTensor(role, self.node, rank=rank)

    def activate(self, argument: NetTensor, role: str = "a") -> Equation:
        """The equation ``role^l_j = σ(argument_j)`` of this node's activation (softmax: the
        vector function over the feature axis); entrywise on an image."""
        out = self.quantity(role, argument.rank)
        activation = self.activation
        if activation.vector is not None:       # over the feature axis, per step of a sequence
            *steps, j = indices_for(argument)
            summed = fresh_indices(3, set())[2]
            z = _StepBase(argument.indexed, tuple(steps))
            return Equation(out, (*steps, j), activation.vector(z, j, summed, self.size),
                            source_kind=role, softmax=activation.is_softmax)
        indices = indices_for(argument)
        z = entry(argument, indices)
        return Equation(out, indices, activation.expr.subs(activation.variable, z),
                        activation=activation, argument=z, source_kind=role)


@dataclass(frozen=True)
class _StepBase:
    """An indexed base read at fixed leading indices: ``z[j]`` is ``z[t, j]`` (softmax over
    the features of one time step)."""

    base: sp.IndexedBase
    steps: tuple[sp.Symbol, ...]

    def __getitem__(self, index: sp.Expr) -> sp.Expr:
        return self.base[(*self.steps, index)]


@dataclass(frozen=True)
class Forward:
    """An op's forward pass: its equations in order; ``delta`` is the quantity whose adjoint is
    the node's error δ^l (its pre-activation for an op with an activation, else its output)."""

    equations: tuple[Equation, ...]
    delta: NetTensor

    @property
    def output(self) -> NetTensor:
        return self.equations[-1].target


@dataclass(frozen=True)
class OpDef:
    """One registry entry."""

    name: str
    description: str
    attributes: tuple[Attribute, ...]
    inputs: tuple[int, int | None]                         # (min, max); max None: any
    parameters: Callable[[Mapping[str, object]], tuple[ParameterDef, ...]]
    output_size: Callable[[Mapping[str, object], tuple[int, ...]], int]
    forward: Callable[[Context], Forward]
    same_width_inputs: bool = False                         # every input has the output's width
    label: str = ""                                         # short label for diagrams
    extra: Mapping[str, object] = field(default_factory=dict)
    #: what its inputs are: "vector", "sequence" ((T, n)), "image" ([C, H, W]) or "any" (an
    #: entrywise op)
    reads: str = "vector"
    #: a vector op that also reads a sequence, step by step (dense: z_t = W x_t + b)
    per_step: bool = False
    #: the per-sample output shape from the attributes and the first input's shape, for ops
    #: whose output is not a vector of ``output_size`` (raises ValueError when none fits)
    output_shape: Callable[[Mapping[str, object], tuple[int, ...]], tuple[int, ...]] | None = None

    def attribute(self, name: str) -> Attribute | None:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        return None


_ACTIVATION = Attribute("activation", "activation", "identity",
                        doc="activation applied to the result (default identity)")


# --- dense: z^l_j = sum_k w^l_jk x_k + b^l_j, a^l_j = sigma(z^l_j) -----------------------


def _dense_parameters(attrs: Mapping[str, object]) -> tuple[ParameterDef, ...]:
    weight = ParameterDef("w", ("size", "in"), "fan")
    if attrs.get("bias", True):
        return weight, ParameterDef("b", ("size",), "zeros")
    return (weight,)


def _dense_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    z = ctx.quantity("z", len(ctx.shape))
    *steps, j = indices_for(z)                  # (t, j) on a sequence: one step at a time
    (k,) = fresh_indices(1, {j, *steps})
    expr = sp.Sum(ctx.params["w"][j, k] * entry(x.tensor, (*steps, k)), (k, 1, x.size))
    if "b" in ctx.params:
        expr = expr + ctx.params["b"][j]
    linear = Equation(z, (*steps, j), expr, source_kind="z")
    activation = replace(ctx.activate(z), inline=True, source_kind="a")
    return Forward((linear, activation), z)


# --- activation: a^l_j = sigma(x_j) -------------------------------------------------------


def _activation_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    equation = ctx.activate(x.tensor)
    return Forward((equation,), equation.target)


# --- add: a^l_j = sum over inputs x_j ------------------------------------------------------


def _add_forward(ctx: Context) -> Forward:
    out = ctx.quantity("a", len(ctx.shape) or 1)
    indices = indices_for(out)
    equation = Equation(out, indices, sp.Add(*(entry(x.tensor, indices) for x in ctx.inputs)),
                        source_kind="a")
    return Forward((equation,), out)


# --- layer norm: mean, variance, normalised input, scale and shift ------------------------


def _layer_norm_forward(ctx: Context) -> Forward:
    """Over the features; on a sequence, of each step t: μ_t, σ²_t of step t's features."""
    (x,) = ctx.inputs
    steps = indices_for(NetTensor("a", rank=len(ctx.shape)))[:-1]      # (t,) on a sequence
    j, k = fresh_indices(2, set(steps))
    n = x.size
    eps = sp.Rational(repr(float(ctx.attrs.get("eps", 1e-5))))
    rank = len(steps)
    mu, var = ctx.quantity("mu", rank), ctx.quantity("var", rank)
    xhat, out = ctx.quantity("xhat", rank + 1), ctx.quantity("a", rank + 1)
    m, v = entry(mu, steps), entry(var, steps)
    ranges = ctx.shape[:-1]

    def x_at(index: sp.Symbol) -> sp.Expr:
        return entry(x.tensor, (*steps, index))

    mean = Equation(mu, steps, sp.Sum(x_at(k), (k, 1, n)) / n, source_kind="mu",
                    ranges=ranges)
    variance = Equation(var, steps, sp.Sum((x_at(k) - m) ** 2, (k, 1, n)) / n,
                        source_kind="var", ranges=ranges)
    normalised = Equation(xhat, (*steps, j), (x_at(j) - m) / sp.sqrt(v + eps),
                          source_kind="xhat")
    affine = Equation(out, (*steps, j), ctx.params["gamma"][j] * entry(xhat, (*steps, j))
                      + ctx.params["beta"][j], source_kind="a")
    return Forward((mean, variance, normalised, affine), out)


# --- dropout: a^l_j = m^l_j x_j, the mask m = 1 except while training ---------------------


def _dropout_forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    rank = len(ctx.shape) or 1
    out = ctx.quantity("a", rank)
    indices = indices_for(out)
    mask = NetTensor("mask", ctx.node, rank=rank)
    equation = Equation(out, indices, entry(mask, indices) * entry(x.tensor, indices),
                        source_kind="a")
    return Forward((equation,), out)


def _same_size(attrs: Mapping[str, object], inputs: tuple[int, ...]) -> int:
    return inputs[0]


def _same_shape(attrs: Mapping[str, object], shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape


from derive.registry.attention_ops import ATTENTION_OPS
from derive.registry.image_ops import IMAGE_OPS
from derive.registry.sequence_ops import SEQUENCE_OPS


class _Registry(Mapping):
    """The built-in ops by name; a custom op (:class:`~derive.registry.custom_ops.CustomOp`)
    is a key too, whose entry it builds itself. Iterating lists the built-in ops."""

    def __init__(self, builtins: Mapping[str, OpDef]) -> None:
        self._builtins = dict(builtins)

    def __getitem__(self, key: object) -> OpDef:
        if isinstance(key, str):
            return self._builtins[key]
        definition = getattr(key, "definition", None)
        if definition is None:
            raise KeyError(key)
        return definition()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builtins)

    def __len__(self) -> int:
        return len(self._builtins)


OPS: Mapping[object, OpDef] = _Registry({
    "dense": OpDef(
        "dense", "fully connected: z = W x + b, a = σ(z)",
        (Attribute("size", "size", required=True, doc="number of neurons n_l"), _ACTIVATION,
         Attribute("bias", "bool", True, doc="whether the layer has a bias b^l")),
        (1, 1), _dense_parameters, lambda attrs, inputs: int(attrs["size"]), _dense_forward,
        label="dense", per_step=True),
    "activation": OpDef(
        "activation", "an activation on its own: a = σ(x)",
        (Attribute("activation", "activation", required=True, doc="the activation"),),
        (1, 1), lambda attrs: (), _same_size, _activation_forward, label="σ", reads="any",
        output_shape=_same_shape),
    "add": OpDef(
        "add", "sum of two or more inputs of equal width (a residual connection)",
        (), (2, None), lambda attrs: (), _same_size, _add_forward, same_width_inputs=True,
        label="+", reads="any", output_shape=_same_shape),
    "layer_norm": OpDef(
        "layer_norm", "layer normalisation over the features, with scale γ and shift β",
        (Attribute("eps", "positive", 1e-5, doc="added to the variance (default 1e-5)"),),
        (1, 1),
        lambda attrs: (ParameterDef("gamma", ("size",), "ones"),
                       ParameterDef("beta", ("size",), "zeros")),
        _same_size, _layer_norm_forward, label="LN", per_step=True),
    "dropout": OpDef(
        "dropout", "inverted dropout while training (mask m/(1-p)); identity otherwise",
        (Attribute("rate", "rate", required=True, doc="probability p of dropping a unit"),),
        (1, 1), lambda attrs: (), _same_size, _dropout_forward, label="drop", reads="any",
        output_shape=_same_shape),
    **IMAGE_OPS,
    **SEQUENCE_OPS,
    **ATTENTION_OPS,
})


def op(name: str) -> OpDef:
    """The registry entry called ``name``."""
    return OPS[name]
