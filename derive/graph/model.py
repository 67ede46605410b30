"""Stage 2, the graph: the symbolic network built from a :class:`~derive.spec.NetworkSpec`.

A network is a DAG of nodes. Node 0 is the input x = a⁰; node l (layer l of the spec) applies
its op from the registry (:mod:`derive.registry.ops`) to the outputs of the nodes it reads, with its
parameters (``w^l``, ``b^l``, ``gamma^l``, ...) and its forward pass as index-form
equations, e.g. for a dense layer

    z^l_j = sum_{k=1}^{n_in} w^l_{jk} x_k + b^l_j,      a^l_j = sigma_l(z^l_j).

The per-sample cost is C = sum_j loss(a^L_j, y_j) over the output node; the batch objective adds
the regularization penalty R once. Indices are 1-based, as in the classic notation. Nothing
here differentiates anything (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import sympy as sp

from derive.quantities import (
    INDEX_POOL,
    LENGTH,
    WEIGHT_ROLES,
    NetTensor,
    fresh_indices,
    i,
    j,
    k,
    m,
    shape_symbols,
    size_symbol,
)
from derive.registry.functions import A, Activation, Loss, Y
from derive.registry.ops import OPS, Context, Equation, Forward, Input, OpDef, axis_value
from derive.spec.load import axis_values, layer_attributes, parameter_key

if TYPE_CHECKING:
    from derive.spec.load import NetworkSpec

__all__ = ["Model", "Node", "Parameter", "build_model", "i", "j", "k", "m", "quantity",
           "size_symbol"]


def quantity(role: str, node: int | None = None) -> sp.IndexedBase:
    """The indexed base of a rank-1 quantity (``quantity("a", 2)`` is a^2)."""
    return NetTensor(role, node).indexed


@dataclass(frozen=True)
class Parameter:
    """A parameter of a node: its tensor, its key in the parameter dict, shape and start."""

    tensor: NetTensor
    key: str                                   # "W1", "b1", "gamma3", ...
    shape: tuple[int, ...]
    shape_symbols: tuple[sp.Symbol, ...]
    init: str                                  # "fan", "zeros", "ones"

    @property
    def indexed(self) -> sp.IndexedBase:
        return self.tensor.indexed

    @property
    def is_weight(self) -> bool:
        return self.tensor.role in WEIGHT_ROLES


@dataclass(frozen=True)
class Node:
    """Node l: its op, what it reads, its width, parameters and forward equations."""

    index: int
    op: OpDef
    name: str | None
    inputs: tuple[int, ...]
    size: sp.Symbol
    width: int
    activation: Activation | None
    parameters: tuple[Parameter, ...]
    forward: Forward
    options: tuple[tuple[str, float], ...] = ()
    shape: tuple[sp.Symbol, ...] = ()        # per-sample output shape: (n_l,) or (n_l, H_l, W_l)
    dims: tuple[int, ...] = ()               # its values

    @property
    def equations(self) -> tuple[Equation, ...]:
        return self.forward.equations

    @property
    def output(self) -> NetTensor:
        return self.forward.output

    @property
    def label(self) -> str:
        return f"{self.index}" + (f" ({self.name})" if self.name else "")

    @property
    def reads_whole_sequences(self) -> bool:
        """Whether this node reads every step of a sequence at once: an equation over two
        time axes (attention's scores s_{tτ} and weights α_{tτ}), not one step t."""
        return any(list(eq.ranges).count(LENGTH) > 1 for eq in self.equations)

    def parameter(self, role: str) -> Parameter | None:
        for parameter in self.parameters:
            if parameter.tensor.role == role:
                return parameter
        return None

    # the classic names of a dense layer (w^l, b^l, z^l, a^l and its two equations)
    @property
    def w(self) -> sp.IndexedBase:
        return self.parameter("w").indexed

    @property
    def b(self) -> sp.IndexedBase | None:
        bias = self.parameter("b")
        return None if bias is None else bias.indexed

    @property
    def z(self) -> sp.IndexedBase:
        return NetTensor("z", self.index).indexed

    @property
    def a(self) -> sp.IndexedBase:
        return self.output.indexed

    @property
    def z_expr(self) -> sp.Expr:
        return self.equations[0].expr

    @property
    def a_expr(self) -> sp.Expr:
        return self.equations[-1].expr


@dataclass(frozen=True)
class Model:
    """The whole symbolic network: its nodes, per-sample cost and regularization penalty."""

    spec: NetworkSpec
    nodes: tuple[Node, ...]            # nodes[l - 1] is node l
    x: sp.IndexedBase                  # a^0
    y: sp.IndexedBase
    loss: Loss
    cost: sp.Expr                      # C = sum_i loss(a^L_i, y_i)
    penalty: sp.Expr                   # R = l2/2 sum w^2 + l1 sum |w| (0 without one)
    widths: dict[sp.Symbol, int]       # every size symbol's value

    @property
    def depth(self) -> int:
        return len(self.nodes)

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    @cached_property
    def is_chain(self) -> bool:   # asked once per formula by later stages: found once
        return self.spec.is_chain

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    @property
    def reads_whole_sequences(self) -> bool:
        """Whether a node reads every step of a sequence at once (Node.reads_whole_sequences)."""
        return any(node.reads_whole_sequences for node in self.nodes)

    @property
    def equations(self) -> tuple[Equation, ...]:
        """Every forward equation of the network, in evaluation order."""
        return tuple(eq for node in self.nodes for eq in node.equations)

    @cached_property
    def output_read_again(self) -> bool:
        """Whether the network reads its own output too (a recurrent layer's state, read at
        the step after), not the loss alone: then the loss gradient is only the loss's own
        part of ∂C/∂h_t."""
        output = self.output.output
        return any(eq.expr.has(output) for eq in self.equations)

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for node in self.nodes for p in node.parameters)

    @cached_property
    def shapes(self) -> dict[NetTensor, tuple[sp.Expr, ...]]:
        """The per-sample shape, as symbols, of x, y, every equation's target and every
        parameter."""
        out: dict[NetTensor, tuple[sp.Expr, ...]] = {
            self.x.label: shape_symbols(0, self.x.label.rank),
            self.y.label: self.output.shape}
        for node in self.nodes:
            for eq in node.equations:
                out[eq.target] = node.shape if eq.at is not None else eq.ranges
            for parameter in node.parameters:
                out[parameter.tensor] = parameter.shape_symbols
        return out

    @cached_property
    def feature_widths(self) -> dict[NetTensor, sp.Expr]:
        """The width of every quantity's last axis (its features), as symbols."""
        return {tensor: shape[-1] for tensor, shape in self.shapes.items() if shape}

    def consumers(self, index: int) -> tuple[Node, ...]:
        """The nodes that read node ``index``'s output."""
        return self._consumers.get(index, ())

    @cached_property
    def _consumers(self) -> dict[int, tuple[Node, ...]]:   # found once, not per node
        out: dict[int, list[Node]] = {}
        for node in self.nodes:
            for index in dict.fromkeys(node.inputs):
                out.setdefault(index, []).append(node)
        return {index: tuple(nodes) for index, nodes in out.items()}

    # the dense-chain view (layers = nodes), for stages that present the classic MLP
    @property
    def layers(self) -> tuple[Node, ...]:
        return self.nodes

    def layer(self, index: int) -> Node:
        return self.nodes[index - 1]

    @property
    def sizes(self) -> tuple[sp.Symbol, ...]:
        """n_0, ..., n_L."""
        return (size_symbol(0), *(node.size for node in self.nodes))

    def loss_of(self, a_expr: sp.Expr, y_expr: sp.Expr) -> sp.Expr:
        """The per-component loss at (a, y)."""
        return self.loss.expr.subs({A: a_expr, Y: y_expr}, simultaneous=True)


def _parameters(node: int, definition: OpDef, attrs: dict, symbols: dict[str, sp.Symbol],
                values: dict[str, int]) -> tuple[Parameter, ...]:
    out = []
    for parameter in definition.parameters(attrs):
        rank = len(parameter.shape)
        out.append(Parameter(
            NetTensor(parameter.role, node, rank=rank, parameter=True),
            parameter_key(parameter.role, node),
            tuple(axis_value(axis, values) for axis in parameter.shape),
            tuple(sp.sympify(axis_value(axis, symbols)) for axis in parameter.shape),
            parameter.init))
    return tuple(out)


def penalty_expression(spec: NetworkSpec, parameters: tuple[Parameter, ...]) -> sp.Expr:
    """R = (l2/2) sum w^2 + l1 sum |w| over every weight, in index form (0 without one)."""
    l2 = sp.Rational(repr(spec.l2)) if spec.l2 else sp.Integer(0)
    l1 = sp.Rational(repr(spec.l1)) if spec.l1 else sp.Integer(0)
    total = sp.Integer(0)
    for parameter in parameters:
        if not parameter.is_weight:
            continue
        # summation indices apart from every free index a gradient formula may have
        # (j, k of a matrix; j, k, p, q of a kernel)
        indices = fresh_indices(len(parameter.shape), {j, k, *INDEX_POOL[4:6]})
        limits = [(index, 1, n) for index, n in zip(indices, parameter.shape_symbols)]
        w = parameter.indexed[indices]
        if l2:
            total += l2 / 2 * sp.Sum(w ** 2, *limits)
        if l1:
            total += l1 * sp.Sum(sp.Abs(w), *limits)
    return total


def _ranged(forward: Forward, shape: tuple[sp.Symbol, ...]) -> Forward:
    """``forward`` with the ranges of every equation's indices given: an equation over as many
    indices as the node's shape has axes runs over that shape, any other over its width."""
    equations = []
    for eq in forward.equations:
        if not eq.ranges and eq.indices:
            ranges = shape if len(eq.indices) == len(shape) else (shape[0],) * len(eq.indices)
            eq = replace(eq, ranges=ranges)
        equations.append(eq)
    return replace(forward, equations=tuple(equations))


def build_model(spec: NetworkSpec) -> Model:
    """The symbolic :class:`Model` of ``spec``."""
    x = NetTensor("a", 0, rank=len(spec.input_shape))
    outputs: list[NetTensor] = [x]
    sizes: list[sp.Symbol] = [size_symbol(0)]
    shapes = [shape_symbols(0, len(spec.input_shape))]
    widths: dict[sp.Symbol, int] = dict(zip(shapes[0], spec.input_shape))
    nodes: list[Node] = []
    for l, layer_spec in enumerate(spec.layers, start=1):
        definition = OPS[layer_spec.op]
        reads = layer_spec.reads(l)
        attrs = layer_attributes(layer_spec)
        size = size_symbol(l)
        shape = shape_symbols(l, len(layer_spec.shape))
        widths.update(zip(shape, layer_spec.shape))
        parameters = _parameters(l, definition, attrs, axis_values(layer_spec, l, [*sizes, size]),
                                 axis_values(layer_spec, l, spec.sizes))
        activation = spec.activation(l)
        ctx = Context(l, attrs, tuple(Input(outputs[n], sizes[n], shapes[n]) for n in reads),
                      size, activation, {p.tensor.role: p.indexed for p in parameters}, shape)
        forward = _ranged(definition.forward(ctx), shape)
        nodes.append(Node(l, definition, layer_spec.name, reads, size, layer_spec.size,
                          activation, parameters, forward, layer_spec.options, shape,
                          layer_spec.shape))
        outputs.append(forward.output)
        sizes.append(size)
        shapes.append(shape)
    output = nodes[-1]
    y = NetTensor("y", rank=len(output.shape)).indexed
    loss = spec.resolved_loss()
    # the loss of every output component (of every time step of a sequence: Σ_t Σ_i)
    steps = (sp.Symbol("t", integer=True, positive=True),) if len(output.shape) == 2 else ()
    at = (*steps, i)
    cost = sp.Sum(loss.expr.subs({A: output.a[at], Y: y[at]}, simultaneous=True),
                  *((s, 1, n) for s, n in zip(at, output.shape)))
    all_parameters = tuple(p for node in nodes for p in node.parameters)
    return Model(spec, tuple(nodes), x.indexed, y, loss, cost,
                 penalty_expression(spec, all_parameters), widths)
