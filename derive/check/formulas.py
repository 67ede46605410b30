"""Checking what users wrote: a δ, gradient or adjoint formula against the derivation of a spec.

Stage: a consumer of the derivation (like verify). Takes a spec and a formula text parsed by
:mod:`derive.check.parser` (never ``eval``/``sympify``); gives a :class:`FormulaVerdict`.
The formula is given its meaning here: layers resolved (``l`` runs over every layer the left
side can name), every quantity found by its role and node in the model (a NetTensor's fields,
never its printed name), vectors and matrices given shapes by node (so a missing transpose is
caught for every layer size), and everything turned into a SymPy expression in index form, in
the model's own quantities. Any node of a graph can be named: the δ entering a residual
branch, the δ of a layer norm's input, ∂C/∂γ^l, ∂C/∂β^l, ∂C/∂x̂^l, ...

Then the user's right-hand side is compared with the derived one, per layer:

1. **symbolic identity** at generic sizes: both sides with a^l written as sigma_l(z^l), the
   adjoints of intermediates (∂C/∂x̂, ∂C/∂μ, ...) and the intermediates themselves (x̂, μ, σ²)
   replaced by their definitions, sums collapsed and bound indices renamed canonically, then
   expanded (and simplified when small);
2. **numeric agreement** on a concrete copy of the network (widths capped at
   :data:`MAX_WIDTH`): every entry at N random points with 50-digit arithmetic, the user's
   quantities (a, z, delta of other layers, ...) all computed from the same random parameters,
   inputs and targets (targets summing to 1 where the loss needs it) by this module's small
   evaluator: the forward equations of the graph, then the derived formulas in the
   derivation's order. The capped copy, the random points and the 50-digit arithmetic are
   those of :mod:`derive.verify.numeric`, the numeric service verification uses too.

Networks with feature maps (``input: [C, H, W]``) are checked the same way, in index form:
an axis is a node's width n_l, a feature map's rows H_l or columns W_l, or a kernel's offsets;
indices may be expressions (a^0_{k,r+p-1,s+q-1}); Iverson brackets become ``InRange`` (an
index's range, as the derivation writes it) or 1/0 comparisons, and the argmax of a window the
derivation's ``FirstMax``. Their numeric check runs on the expanded copy verification builds
(:class:`derive.verify.expansion.Instance`, which reads a feature map's padding as 0 and
writes a window's maximum out); an entry the user's formula reads outside a kernel or vector
has no value, which makes the formula incorrect (a missing bracket).

A mismatch gives a counterexample — the parameter and input values (two decimals, to be
reproducible by hand), the user's value and the correct one — and the derived formula printed
in the notation the user wrote. Hand-written backprop code is checked by
:mod:`derive.check.backward`; the ``derive check`` command for both is in :mod:`derive.cli.check`.

Python API::

    from derive.check.formulas import check_formula
    verdict = check_formula("xor", "delta^L = a^L - y")
    verdict.correct, verdict.method, verdict.counterexample
    print("\\n".join(verdict.lines()))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import symengine as se
import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.core.relational import Relational
from sympy.printing.str import StrPrinter

from derive.check.parser import (
    Adjoint,
    Binary,
    Call,
    Const,
    Coordinates,
    FormulaError,
    IndexVar,
    Iverson,
    Layer,
    Node,
    Num,
    ParsedFormula,
    Product,
    Ref,
    ShapeSize,
    SumOver,
    Target,
    Transpose,
    Unary,
    WindowMaxOf,
    parse_formula,
)
from derive.derivation.indexcalc import collapse
from derive.derivation.reverse import C, Derivation, Formula, activation_derivative, derive
from derive.derivation.tensorform import ONE, Einsum, Inner, MatVec, Outer
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.quantities import NetTensor, entry, j, size_symbol, tensor_of
from derive.registry import functions
from derive.registry.functions import Z, elementary
from derive.registry.image_ops import geometry
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.render.pretty import pretty
from derive.spec.load import NetworkSpec, layer_attributes, load_spec
from derive.verify.expansion import Instance, MissingQuantity, backprop_values
from derive.verify.numeric import (
    DIGITS,
    TOLERANCE,
    Sampling,
    as_float,
    capped_spec,
    evaluate,
    random_point,
    real_value,
    value_at,
)
from derive.verify.reduction import network_shape

#: Widths of the concrete copy the numeric check runs on.
MAX_WIDTH = 3
#: Random points of the numeric check. Its arithmetic (DIGITS, TOLERANCE) is that of
#: derive.verify.numeric, the numeric service verification uses too.
POINTS = 20
#: Largest integer exponent a formula may use.
MAX_EXPONENT = 64
#: Largest expansion the symbolic check attempts; a larger one is left to the numeric check.
MAX_EXPANDED_TERMS = 5000
#: How the random points are drawn: leaves rounded to two decimals, so that a counterexample
#: can be retyped by hand; dropout masks 1, as gradients are taken with dropout off.
SAMPLING = Sampling(decimals=2, mask=1.0)

# Placeholders for the implicit row and column index of vector-form values.
_ROW = sp.Dummy("row", integer=True, positive=True)
_COL = sp.Dummy("col", integer=True, positive=True)


class _OutsideRange(Exception):
    """The user's formula reads an entry outside a quantity's range (a kernel offset past the
    kernel's size): it has no value there. Entries of feature maps outside the map are 0
    (zero padding, as in the convolution's own equation)."""


class WindowMaximum(WindowMax):
    """A window's maximum as a value (max_{p,q} f in a user's formula): written out with
    concrete limits as ``Max`` of the window's entries, which a comparison [a = max ...] can
    hold (the registry's WindowMax, written out as a piecewise choice, is for the maximum a
    pooling layer computes and whose first maximum FirstMax marks)."""

    def doit(self, **hints: object) -> sp.Expr:
        entries = [self.function]
        for index, low, high in self.limits:
            if not (low.is_Integer and high.is_Integer):
                return self
            entries = [e.xreplace({index: sp.Integer(v)}) for e in entries
                       for v in range(int(low), int(high) + 1)]
        return sp.Max(*(e.doit(**hints) for e in entries))


_RELATIONS = {"<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge, "=": sp.Eq}
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "="}


class AgainstMax(sp.Function):
    """``AgainstMax(x, window, op)``: the Iverson bracket [x op max window], op one of < <= >
    >= = (its position in :data:`_RELATIONS`). With concrete limits it is written out
    without a maximum: x = max f holds where x >= every entry and equals one of them (a
    comparison with a piecewise maximum is not something SymEngine evaluates)."""

    nargs = 3
    is_real = True
    is_integer = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)

    def doit(self, **hints: object) -> sp.Expr:
        x, window, code = self.args
        entries = [window.function]
        for index, low, high in window.limits:
            if not (low.is_Integer and high.is_Integer):
                return self
            entries = [e.xreplace({index: sp.Integer(v)}) for e in entries
                       for v in range(int(low), int(high) + 1)]
        x = x.doit(**hints)
        entries = [e.doit(**hints) for e in entries]
        op = list(_RELATIONS)[int(code)]
        if op == "=":
            holds = sp.And(*(x >= e for e in entries), sp.Or(*(sp.Eq(x, e) for e in entries)))
        elif op in (">", ">="):
            holds = sp.And(*(_RELATIONS[op](x, e) for e in entries))
        else:
            holds = sp.Or(*(_RELATIONS[op](x, e) for e in entries))
        return sp.Piecewise((1, holds), (0, True))


class IllFormed(Exception):
    """The formula parses but has no meaning as written (shapes, index ranges): incorrect."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos


class _DoesNotFit(IllFormed):
    """At this value of the generic l, a quantity has more or fewer indices than written
    (delta^l_jrs where δ^l is a vector): l does not run over this layer."""


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Counterexample:
    """Where the user's formula and the derived one disagree."""

    layer: int
    entry: tuple[int, ...]          # 1-based (j,) or (j, k); () for a per-sample scalar
    user_value: str
    correct_value: str
    values: tuple[tuple[str, str], ...]      # ("W^1", "[[0.37, -1.2], ...]"), ("x", ...)
    quantities: tuple[tuple[str, str], ...]  # the user's quantities at that entry


@dataclass(frozen=True)
class FormulaVerdict:
    """The outcome of checking one formula against one spec."""

    formula: str
    spec_name: str
    target: str                      # "delta^L", "dC/dw^l", "dC/dgamma^4", ...
    layers: tuple[int, ...]          # the concrete layers (nodes) checked
    correct: bool
    method: str                      # how it was established
    assumptions: tuple[str, ...]
    derived: tuple[str, ...]         # the derived formula, in the user's notation (+ Unicode)
    counterexample: Counterexample | None = None
    reason: str = ""                 # for an ill-formed formula: what is wrong with it
    max_error: float = 0.0
    tautological: bool = False       # the right side restates the left: true, but no result

    @property
    def exit_code(self) -> int:
        return 0 if self.correct else 1

    def lines(self) -> list[str]:
        """The verdict as text for a terminal."""
        layers = ", ".join(map(str, self.layers))
        plural = "s" if len(self.layers) > 1 else ""
        out = [f"check {self.spec_name}: {self.formula}",
               f"  {self.target} at layer{plural} {layers}"]
        verdict = "CORRECT" if self.correct else "INCORRECT"
        if self.tautological:
            out.append("TAUTOLOGICAL: not a verified result")
        else:
            out.append(f"{verdict}: {self.method}" if self.correct else f"{verdict}")
        for assumption in self.assumptions:
            out.append(f"  assuming {assumption}; the derivation uses it"
                       + (" and the random targets satisfy it" if "y" in assumption else ""))
        if self.reason:
            out.append(f"  {self.reason}")
        example = self.counterexample
        if example is not None:
            where = (f", entry ({', '.join(map(str, example.entry))})" if example.entry
                     else "")
            out.append(f"  counterexample ({self.method}) at layer {example.layer}{where}:")
            out.append(f"    your formula gives  {example.user_value}")
            out.append(f"    the correct value is {example.correct_value}")
            out.append("    with")
            for name, value in example.values:
                out.append(f"      {name} = {value}")
            if example.quantities:
                out.append("    where " + ", ".join(f"{n} = {v}" for n, v in example.quantities))
        if not self.correct:
            out.append("  the derived formula:")
            out.extend(f"    {line}" for line in self.derived)
        return out


# --- the network as formulas see it ------------------------------------------------------


class _Network:
    """What a formula can name in one derivation: every quantity by (role, node), the nodes
    its axes run over, which nodes share a width by construction, and the derived formula of
    each adjoint.

    An axis of node l's vectors (or of its feature maps' channels) is the node number l, with
    n_l entries; a feature map's rows and columns are the symbols H_l and W_l, and a kernel's
    offsets its size (an Integer): :func:`axis_size` gives the size of any of them. Two nodes
    share an axis class when an equation indexes both with the same free index (an add's
    inputs and output, a layer norm's input and output, a pooling layer's channels): a vector
    over one is a vector over the other.

    The algebra of this module (sums written out term by term, expansions) runs on stand-ins
    (:meth:`stand_ins`): an entry q[j] becomes ``q(j)``, an undefined function of its
    indices, and an adjoint ∂C/∂q[j] another one; a per-sample scalar a symbol. Writing out
    sums rebuilds every entry many times, and a function of plain indices rebuilds far
    faster than an Indexed with assumptions; an adjoint as an atom of its own also keeps
    substitutions from reaching inside ∂C/∂(...).
    """

    def __init__(self, derivation: Derivation) -> None:
        model = derivation.model
        self._stand_in: dict[tuple[NetTensor, bool], sp.Basic] = {}
        self._stands_for: dict[sp.Basic, tuple[NetTensor, bool]] = {}
        self._standing: dict[sp.Expr, sp.Expr] = {}
        self._real: dict[sp.Expr, sp.Expr] = {}
        self._deltas: dict[int, NetTensor] = {}
        self.derivation = derivation
        self.model = model
        self.depth = model.depth
        self.chain = model.is_chain
        self.widths = {0: model.spec.input, **{node.index: node.width for node in model.nodes}}
        self.size_node = {size_symbol(0): 0, **{node.size: node.index for node in model.nodes}}
        #: the concrete size of every axis that is not a node's width (H_l, W_l)
        self.extents = {symbol: value for symbol, value in model.widths.items()
                        if symbol not in self.size_node}
        self.images = model.spec.image is not None
        self.axes: dict[NetTensor, tuple[Axis, ...]] = {}
        for tensor, shape in model.shapes.items():
            self._add(tensor, tuple(self.axis_of(size) for size in shape))
        targets = {eq.target for eq in model.equations}
        for node in model.nodes:
            for eq in node.equations:       # leaves an op reads besides parameters (masks)
                for tensor in sorted(eq.expr.atoms(NetTensor), key=sp.default_sort_key):
                    if tensor not in self.axes and tensor.node == node.index:
                        self._add(tensor, (node.index,) * tensor.rank)
            self._add(self.delta_tensor(node.index), self.axes[node.forward.delta])
        #: the inputs of the forward pass: parameters, x, y and masks, in a fixed order
        self.leaves = tuple(t for t in self.axes if t not in targets and t.role != "delta")
        self.parent: dict[Axis, Axis] = {}
        for eq in model.equations:
            if eq.at is not None:           # a flatten's entry is not its input's entry
                continue
            for atom in eq.expr.atoms(sp.Indexed):
                tensor = tensor_of(atom)
                for position, index in enumerate(atom.indices):
                    if index in eq.indices and tensor in self.axes:
                        self._union(self.axes[tensor][position],
                                    self.axes[eq.target][eq.indices.index(index)])
        self.eps = self._eps()

    def _add(self, tensor: NetTensor, axes: tuple[Axis, ...]) -> None:
        self.axes.setdefault(tensor, axes)

    def axis_of(self, size: sp.Expr) -> Axis:
        """The axis whose size is ``size``: n_l is node l's, H_l, W_l and a kernel's size
        their own."""
        return self.size_node.get(size, size)

    def width(self, axis: Axis) -> int:
        """The concrete number of entries along ``axis``."""
        if isinstance(axis, int):
            return self.widths[axis]
        return int(self.extents.get(axis, axis))

    def _root(self, node: Axis) -> Axis:
        while self.parent.get(node, node) != node:
            node = self.parent[node]
        return node

    def _union(self, a: Axis, b: Axis) -> None:
        a, b = self._root(a), self._root(b)
        if a != b:
            first, second = sorted((a, b), key=_axis_order)
            self.parent[second] = first

    def same(self, a: Axis, b: Axis) -> bool:
        """Whether axes a and b are one axis (same width by construction)."""
        return self._root(a) == self._root(b)

    def _eps(self) -> sp.Expr | None:
        values = set()
        for node, layer in zip(self.model.nodes, self.model.spec.layers):
            attribute = node.op.attribute("eps")
            if attribute is not None:
                value = layer_attributes(layer).get("eps", attribute.default)
                values.add(sp.Rational(repr(float(value))))
        return values.pop() if len(values) == 1 else None

    # -- quantities --

    def delta_tensor(self, node: int) -> NetTensor:
        """δ^l as the derivation writes it (the adjoint of z^l, or of a^l for an op without
        an activation)."""
        if node not in self._deltas:
            rank = self.model.node(node).forward.delta.rank
            self._deltas[node] = NetTensor("delta", node, rank=rank)
        return self._deltas[node]

    # -- stand-ins --

    def _stand_in_for(self, tensor: NetTensor, adjoint: bool) -> sp.Basic:
        key = (tensor, adjoint)
        if key not in self._stand_in:
            name = f"{'dC/d' if adjoint else ''}{tensor.name}#{len(self._stand_in)}"
            head = (sp.Dummy(name, real=True) if tensor.rank == 0 else
                    sp.Function(name, real=True))
            self._stand_in[key] = head
            self._stands_for[head] = key
        return self._stand_in[key]

    def stand_in(self, tensor: NetTensor, index: tuple[int, ...], adjoint: bool = False
                 ) -> sp.Expr:
        """The stand-in of ``tensor`` (or of its adjoint) at a concrete ``index``."""
        head = self._stand_in_for(tensor, adjoint)
        return head if tensor.rank == 0 else head(*map(sp.Integer, index))

    def stand_ins(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every entry of a quantity, and every adjoint ∂C/∂ of one, replaced by
        its stand-in."""
        if expr not in self._standing:
            def stand_in(atom: sp.Expr, adjoint: bool) -> sp.Expr:
                head = self._stand_in_for(tensor_of(atom), adjoint)
                return head if tensor_of(atom).rank == 0 else head(*atom.indices)

            out = expr.replace(
                lambda e: isinstance(e, sp.Derivative) and e.expr == C
                and tensor_of(e.variables[0]) is not None,
                lambda e: stand_in(e.variables[0], True))
            entries = {atom: stand_in(atom, False) for atom in out.atoms(sp.Indexed)
                       if tensor_of(atom) is not None}
            out = out.xreplace(entries)
            scalars = {t: stand_in(t, False) for t in out.atoms(NetTensor)}
            self._standing[expr] = out.xreplace(scalars)
        return self._standing[expr]

    def stands_for(self, atom: sp.Expr) -> tuple[NetTensor, bool] | None:
        """(quantity, whether it is the adjoint ∂C/∂ of it) of a stand-in, else None."""
        return self._stands_for.get(atom.func if isinstance(atom, AppliedUndef) else atom)

    def real(self, atom: sp.Expr) -> sp.Expr:
        """A stand-in as the entry (or adjoint) it stands for."""
        if atom not in self._real:
            tensor, adjoint = self.stands_for(atom)
            quantity = entry(tensor, _indices_of(atom))
            self._real[atom] = (sp.Derivative(C, quantity, evaluate=False) if adjoint
                                else quantity)
        return self._real[atom]

    def tensor(self, role: str, node: int | None) -> NetTensor | None:
        """The quantity ``role`` at ``node`` (``delta`` for a node's error), or None."""
        for tensor in self.axes:
            if tensor.role == role and tensor.node == node:
                return tensor
        return None

    def layers_with(self, role: str) -> list[int]:
        return sorted({t.node for t in self.axes if t.role == role and t.node is not None})

    def is_leaf(self, tensor: NetTensor | None) -> bool:
        return tensor in self.leaves

    def entries(self, tensor: NetTensor) -> list[tuple[int, ...]]:
        """Every 1-based index tuple of ``tensor`` at the model's concrete widths."""
        out: list[tuple[int, ...]] = [()]
        for axis in self.axes[tensor]:
            out = [(*e, n) for e in out for n in range(1, self.width(axis) + 1)]
        return out

    # -- derived formulas --

    def formula_for(self, q: NetTensor) -> Formula | None:
        """The derived formula of ∂C/∂q: the node's δ, the loss gradient, an intermediate's
        adjoint or a parameter's gradient; None where the derivation has none (a dense
        layer's hidden a^l enters through δ^l)."""
        derivation = self.derivation
        if q.node and q == self.model.node(q.node).forward.delta:
            return derivation.delta(q.node)
        for formula in derivation.formulas:
            if formula.of == q and formula.kind != "delta":
                return formula
        return None

    def outside(self, atom: sp.Expr) -> str:
        """Why ``atom`` (a concrete entry, or a stand-in of one) has no value: it lies outside
        its quantity's range and is not a feature map's padding; "" when it has one."""
        standing = self.stands_for(atom)
        tensor = standing[0] if standing else tensor_of(atom)
        if tensor is None or tensor not in self.axes or (standing and standing[1]):
            return ""
        indices = _indices_of(atom)
        if not indices or not all(i.is_Integer for i in indices):
            return ""
        axes = self.axes[tensor]
        if all(1 <= int(i) <= self.width(axis) for i, axis in zip(indices, axes)):
            return ""
        if len(axes) == 3 and not tensor.parameter:
            return ""                      # zero padding
        shape = " x ".join(str(self.width(axis)) for axis in axes)
        hint = " (a bracket such as [1 <= r-u+1 <= 2] missing?)" if len(axes) == 4 else ""
        return (f"it reads {pretty(entry(tensor, indices))}, outside {tensor.name}'s "
                f"{shape} entries{hint}")

    def describe(self, node: int) -> str:
        if node == 0:
            return "the input"
        return f"layer {node} is {self.model.node(node).op.name}"

    @functools.cached_property
    def evaluator(self) -> _Evaluator | _Expanded:
        """The numeric evaluator of this network (it keeps what it compiled): verify's
        expansion for a network with feature maps, which reads padding entries as 0 and
        writes a window's maximum out, else this module's own."""
        return _Expanded(self) if self.images else _Evaluator(self)


#: An axis: a node's width (its number), a feature map's rows or columns (H_l, W_l) or a
#: kernel's offsets (its size, an Integer).
Axis = "int | sp.Expr"


def axis_size(axis: Axis) -> sp.Expr:
    """The symbolic size of an axis: n_l, H_l, W_l or a kernel's size."""
    return size_symbol(axis) if isinstance(axis, int) else axis


def describe_axis(axis: Axis) -> str:
    """``layer 2 (n_2 values)``, ``the rows of layer 1 (H_1 values)``, ``a kernel's 2
    offsets``."""
    if isinstance(axis, int):
        return f"layer {axis} (n_{axis} values)"
    if axis.is_Integer:
        return f"a kernel's {axis} offsets"
    dim, node = str(axis).split("_", 1)
    what = "rows" if dim == "H" else "columns"
    return f"the {what} of layer {node} ({axis} values)"


def _axis_order(axis: Axis) -> tuple:
    return (0, axis, "") if isinstance(axis, int) else (1, 0, str(axis))


@functools.lru_cache(maxsize=8)
def _network(spec: NetworkSpec) -> _Network:
    """The derivation of ``spec``, as formulas see it (kept: a spec is often checked against
    several formulas in a row)."""
    return _Network(derive(build_model(spec)))


# --- meaning: syntax tree to SymPy -------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    """A converted piece: ``expr`` with placeholders for its implicit indices, and its shape.

    kind "s" scalar (index form), "v" column vector over ``rows``, "r" row vector over
    ``rows``, "m" matrix ``rows`` x ``cols`` (axes named by node).
    """

    expr: sp.Expr
    kind: str
    rows: int | None = None
    cols: int | None = None

    def describe(self) -> str:
        if self.kind == "s":
            return "a scalar"
        if self.kind == "v":
            return f"a vector over layer {self.rows} (n_{self.rows} entries)"
        if self.kind == "r":
            return f"a row vector over layer {self.rows}"
        return f"an n_{self.rows} x n_{self.cols} matrix"


def _ranges(name: str, layers: Sequence[int]) -> str:
    """``delta^1..delta^3``, ``gamma^4``, ``w^1..w^2, w^5``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{name}^{run[0]}" if len(run) == 1 else f"{name}^{run[0]}..{name}^{run[-1]}"
                     for run in runs)


class _Meaning:
    """Converts a parsed formula to SymPy at one concrete value of the generic layer l."""

    def __init__(self, parsed: ParsedFormula, network: _Network, l_value: int | None) -> None:
        self.parsed = parsed
        self.network = network
        self.model = network.model
        self.spec = network.model.spec
        self.depth = network.depth
        self.l_value = l_value
        self.scopes: list[dict[str, list]] = []

    def error(self, message: str, pos: int) -> DeriveError:
        return FormulaError(message, self.parsed.text, pos + 1)

    def layer(self, layer: Layer) -> int:
        if layer.base is None:
            return layer.offset
        if layer.base == "L":
            return self.depth + layer.offset
        if self.l_value is None:
            raise self.error("the formula uses the generic layer l, but its left side names "
                             "a fixed layer", layer.pos)
        return self.l_value + layer.offset

    def layer_text(self, layer: Layer) -> str:
        value = self.layer(layer)
        return str(layer) if layer.base is None else f"{layer} = {value}"

    def missing(self, name: str, role: str, layer: Layer, pos: int) -> Exception:
        """The error for ``name^layer`` that the network does not have. In a graph, a generic
        layer l that lands on a node without it makes the formula ill-formed there (the claim
        "for every l" fails); anything else is a usage error."""
        value = self.layer(layer)
        if role == "b" and 1 <= value <= self.depth and self.model.node(value).parameter(
                "w") is not None:
            return self.error(f"layer {value} has no bias (bias: false in the spec)", pos)
        have = self.network.layers_with(role)
        text = f"{name}^{self.layer_text(layer)} does not exist: " + (
            f"this network has {_ranges(name, have)}" if have else f"this network has no {name}")
        if 0 <= value <= self.depth and not self.network.chain:
            text += f" ({self.network.describe(value)})"
            if self.l_value is not None:
                return IllFormed(text, pos)
        return self.error(text, pos)

    # -- the left side --

    def target_indices(self, target: Target, axes: tuple[int, ...], free: tuple[sp.Symbol, ...]
                       ) -> list[tuple[str, int, sp.Symbol, int]]:
        """(letter, node its axis runs over, canonical symbol, position) of the left side's
        free indices; the implicit ones of the vector form are placed at the left side's
        start."""
        name = _target_name(target)
        if not axes:
            if target.indices:
                raise self.error(f"{name} is a scalar per sample: it takes no index",
                                 target.indices[0][1])
            return []
        if len(axes) > 2:
            return self.image_indices(target, name, axes, free)
        if len(target.indices) > 2:
            raise self.error(f"{name} takes {len(axes)} "
                             f"{'index' if len(axes) == 1 else 'indices'}, not "
                             f"{len(target.indices)}", target.indices[0][1])
        if len(axes) == 2:
            written = target.indices or (("j", target.pos), ("k", target.pos))
            if len(written) != 2:
                raise self.error(f"{name} takes two indices, as in {name}_jk", target.pos)
            (row, row_pos), (col, col_pos) = written
            if row == col:
                raise self.error(f"{name}_{row}{col} needs two different indices, as in "
                                 f"{name}_jk", col_pos)
            return [(row, axes[0], free[0], row_pos), (col, axes[1], free[1], col_pos)]
        written = target.indices or (("j", target.pos),)
        if len(written) != 1:
            raise self.error("this left side takes one index, as in delta^l_j", target.pos)
        ((letter, pos),) = written
        return [(letter, axes[0], free[0], pos)]

    def image_indices(self, target: Target, name: str, axes: tuple[Axis, ...],
                      free: tuple[sp.Symbol, ...]) -> list[tuple[str, Axis, sp.Symbol, int]]:
        """The left side's indices of a feature map (j, r, s) or a kernel (j, k, p, q):
        written out, each a different letter."""
        example = "_jkpq" if len(axes) == 4 else "_jrs"
        what = "a kernel" if len(axes) == 4 else "a feature map"
        if len(target.indices) != len(axes):
            raise self.error(f"{name} is {what}: write its entries with {len(axes)} indices, "
                             f"as in {name}{example}",
                             target.indices[0][1] if target.indices else target.pos)
        letters = [letter for letter, _ in target.indices]
        for n, (letter, pos) in enumerate(target.indices):
            if letter in letters[:n]:
                raise self.error(f"{name} needs {len(axes)} different indices, as in "
                                 f"{name}{example}", pos)
        return [(letter, axis, symbol, pos)
                for (letter, pos), axis, symbol in zip(target.indices, axes, free)]

    # -- the right side --

    def convert(self, target: Target, formula: Formula) -> sp.Expr:
        """The right side in index form, in the derived formula's free indices."""
        network = self.network
        axes = network.axes[formula.of]
        free = self.target_indices(target, axes, formula.indices)
        self.scopes = [{letter: [symbol, rng, pos] for letter, rng, symbol, pos in free}]
        value = self.value(self.parsed.rhs)
        if value.kind == "s":
            return value.expr
        if len(axes) > 2:
            raise IllFormed(f"the right side is {value.describe()}; write the entry of the "
                            "feature map or kernel with indices", self.parsed.rhs.pos)
        name = _target_name(target, formula.node)
        if len(axes) == 2:
            if value.kind == "m" and network.same(value.rows, axes[0]) and network.same(
                    value.cols, axes[1]):
                return value.expr.xreplace({_ROW: free[0][2], _COL: free[1][2]})
            raise IllFormed(f"the right side is {value.describe()}; {name} is an "
                            f"n_{axes[0]} x n_{axes[1]} matrix", self.parsed.rhs.pos)
        if len(axes) == 1:
            if value.kind == "v" and network.same(value.rows, axes[0]):
                return value.expr.xreplace({_ROW: free[0][2]})
            raise IllFormed(f"the right side is {value.describe()}; the left side is a vector "
                            f"over layer {axes[0]}", self.parsed.rhs.pos)
        raise IllFormed(f"the right side is {value.describe()}; the left side is a scalar per "
                        "sample", self.parsed.rhs.pos)

    def index(self, letter: str, layer: Axis, pos: int) -> sp.Symbol:
        for scope in reversed(self.scopes):
            if letter in scope:
                entry = scope[letter]
                if entry[1] is None:
                    entry[1], entry[2] = layer, pos
                elif not self.network.same(entry[1], layer):
                    if isinstance(entry[1], int) and isinstance(layer, int):
                        raise IllFormed(
                            f"index {letter} ranges over layer {entry[1]} (n_{entry[1]} "
                            f"values, column {entry[2] + 1}) but here over layer {layer} "
                            f"(n_{layer} values)", pos)
                    raise IllFormed(
                        f"index {letter} ranges over {describe_axis(entry[1])}, column "
                        f"{entry[2] + 1}, but here over {describe_axis(layer)}", pos)
                return entry[0]
        raise IllFormed(f"index {letter} is neither on the left side nor summed over", pos)

    def index_symbol(self, letter: str, pos: int) -> sp.Symbol:
        """An index letter inside an index expression: its symbol (the range it runs over
        comes from where it stands alone, or from its sum's upper bound)."""
        for scope in reversed(self.scopes):
            if letter in scope:
                return scope[letter][0]
        raise IllFormed(f"index {letter} is neither on the left side nor summed over", pos)

    def index_expression(self, node: Node) -> sp.Expr:
        """An index written as an expression (r+p-1, 2s+q-3, H_2W_2(j-1)+W_2(r-1)+s)."""
        if isinstance(node, IndexVar):
            return self.index_symbol(node.letter, node.pos)
        if isinstance(node, Num):
            return sp.Integer(node.text)
        if isinstance(node, (ShapeSize, Ref)):
            return self.value(node).expr
        if isinstance(node, Unary):
            return -self.index_expression(node.operand)
        if isinstance(node, Binary):
            left, right = self.index_expression(node.left), self.index_expression(node.right)
            return left + right if node.op == "+" else left - right
        assert isinstance(node, Product)
        out = self.index_expression(node.first)
        for _op, _pos, factor in node.rest:
            out = out * self.index_expression(factor)
        return out

    def _IndexVar(self, node: IndexVar) -> _Value:
        return _Value(self.index_symbol(node.letter, node.pos), "s")

    def _ShapeSize(self, node: ShapeSize) -> _Value:
        layer = self.layer(node.layer)
        size = sp.Symbol(f"{node.dim}_{layer}", integer=True, positive=True)
        if size not in self.network.extents:
            raise self.error(f"{node.dim}_{node.layer}: layer {layer} has no feature maps",
                             node.pos)
        return _Value(size, "s")

    def value(self, node: Node) -> _Value:
        method = getattr(self, f"_{type(node).__name__}")
        return method(node)

    def _Num(self, node: Num) -> _Value:
        return _Value(sp.Rational(node.text if not node.text.endswith(".") else node.text + "0"),
                      "s")

    def _Const(self, node: Const) -> _Value:
        if node.name == "eps":
            if self.network.eps is None:
                raise self.error("eps is the epsilon of a layer norm; this network has no "
                                 "layer norm, or its layer norms differ: write the number",
                                 node.pos)
            return _Value(self.network.eps, "s")
        return _Value(sp.pi if node.name == "pi" else sp.E, "s")

    def shaped(self, tensor: NetTensor, written: tuple[tuple[str, int], ...], name: str,
               pos: int) -> _Value:
        """``tensor`` as a whole (vector, matrix, per-sample scalar) or at written indices."""
        axes = self.network.axes[tensor]
        letters = [c for c, _ in written]
        if not letters:
            if not axes:
                return _Value(tensor, "s")
            if len(axes) == 1:
                return _Value(tensor.indexed[_ROW], "v", axes[0])
            if len(axes) == 2:
                return _Value(tensor.indexed[_ROW, _COL], "m", axes[0], axes[1])
            example = "_{j,k,p,q}" if len(axes) == 4 else "_{j,r,s}"
            raise self.error(f"{name} is {'a kernel' if len(axes) == 4 else 'a feature map'}"
                             f": write its entries with {len(axes)} indices, as in "
                             f"{name}{example}", pos)
        if not axes:
            raise self.error(f"{name} is a scalar per sample: it takes no index", pos)
        if len(letters) != len(axes):
            if len(axes) == 2:
                message = f"{name} takes two indices ({name}_jk) or none (the matrix)"
            elif len(axes) > 2:
                message = f"{name} takes {len(axes)} indices, not {len(letters)}"
            else:
                message = f"{name} takes one index"
            if self.l_value is not None and self.network.images:
                raise _DoesNotFit(message, pos)
            raise self.error(message, pos)
        symbols = tuple(self.index(letter, axis, at) if isinstance(letter, str)
                        else self.index_expression(letter)
                        for (letter, at), axis in zip(written, axes))
        return _Value(tensor.indexed[symbols], "s")

    def _Ref(self, node: Ref) -> _Value:
        letter = node.letter
        if letter == "n":
            layer = self.layer(node.layer)
            if not 0 <= layer <= self.depth:
                raise self.error(f"n_{node.layer} = n_{layer}: layers are 0..{self.depth}",
                                 node.pos)
            return _Value(size_symbol(layer), "s")
        if letter == "y":
            tensor = self.network.tensor("y", None)
        else:
            tensor = self.network.tensor(letter, self.layer(node.layer))
            if tensor is None:
                raise self.missing(letter, letter, node.layer, node.pos)
        name = letter if tensor.node is None else f"{letter}^{tensor.node}"
        return self.shaped(tensor, node.indices, name, node.pos)

    def _Adjoint(self, node: Adjoint) -> _Value:
        """dC/dq^l on the right: δ^l where q is what the node's error differentiates, else the
        derived adjoint (loss gradient, an intermediate's adjoint, a parameter's gradient)."""
        name = f"dC/d{node.role}"
        q = self.network.tensor(node.role, self.layer(node.layer))
        if q is None:
            raise self.missing(name, node.role, node.layer, node.pos)
        formula = self.network.formula_for(q)
        if formula is None:
            raise self.error(f"{name}^{q.node} is not derived: the output of dense layer "
                             f"{q.node} enters through its error delta^{q.node}; dC/da is "
                             "derived for the output layer, dC/da^L", node.pos)
        if formula.kind == "delta":
            return self.shaped(self.network.delta_tensor(q.node), node.indices,
                               f"delta^{q.node}", node.pos)
        value = self.shaped(q, node.indices, f"{name}^{q.node}", node.pos)
        return dataclasses.replace(value, expr=sp.Derivative(C, value.expr, evaluate=False))

    def _Unary(self, node: Unary) -> _Value:
        value = self.value(node.operand)
        return dataclasses.replace(value, expr=-value.expr)

    def _Transpose(self, node: Transpose) -> _Value:
        value = self.value(node.operand)
        if value.kind == "v":
            return dataclasses.replace(value, kind="r")
        if value.kind == "r":
            return dataclasses.replace(value, kind="v")
        if value.kind == "m":
            return _Value(value.expr.xreplace({_ROW: _COL, _COL: _ROW}), "m", value.cols,
                          value.rows)
        return value

    def _Binary(self, node: Binary) -> _Value:
        left, right = self.value(node.left), self.value(node.right)
        if node.op == "^":
            if right.kind != "s" or right.expr.has(_ROW, _COL):
                raise IllFormed("an exponent must be a scalar", node.right.pos)
            self.check_power(left.expr, right.expr, node.pos)
            return dataclasses.replace(left, expr=left.expr ** right.expr)
        return self.elementwise(left, right, node.op, node.pos)

    def check_power(self, base: sp.Expr, exponent: sp.Expr, pos: int) -> None:
        if not exponent.is_number:
            return
        if exponent.is_real is False or abs(exponent) > MAX_EXPONENT:
            raise self.error(f"exponent {exponent} is too large (at most {MAX_EXPONENT})", pos)
        if base.is_number and base.is_real and abs(base) > 1 and (
                float(abs(exponent)) * sp.log(abs(base), 10).evalf() > 300):
            raise self.error("constant power too large (over 10^300)", pos)

    def same_shape(self, left: _Value, right: _Value) -> bool:
        if left.kind != right.kind:
            return False
        network = self.network
        return all(a == b or (a is not None and b is not None and network.same(a, b))
                   for a, b in ((left.rows, right.rows), (left.cols, right.cols)))

    def elementwise(self, left: _Value, right: _Value, op: str, pos: int) -> _Value:
        if left.kind == "s" or right.kind == "s" or self.same_shape(left, right):
            shaped = right if left.kind == "s" else left
            a, b = left.expr, right.expr
            expr = {"+": a + b, "-": a - b, "*": a * b, "odot": a * b, "/": a / b,
                    "": a * b, "@": a * b}[op]
            return _Value(expr, shaped.kind, shaped.rows, shaped.cols)
        word = {"+": "add", "-": "subtract", "/": "divide"}.get(op, "multiply elementwise")
        raise IllFormed(f"cannot {word} {left.describe()} and {right.describe()}", pos)

    def _Product(self, node: Product) -> _Value:
        items: list[list[Any]] = [["", node.pos, self.value(node.first)]]
        items += [[op, pos, self.value(factor)] for op, pos, factor in node.rest]
        # matrix products first (rightmost first: A B v = A (B v)), then elementwise
        while True:
            for n in range(len(items) - 2, -1, -1):
                op = items[n + 1][0]
                pair = (items[n][2].kind, items[n + 1][2].kind)
                linear = {("m", "v"), ("m", "m"), ("r", "v"), ("r", "m"), ("v", "r")}
                if op in ("", "*", "@") and (pair in linear or (op == "@" and pair == ("v", "v"))):
                    items[n][2] = self.matmul(items[n][2], items[n + 1][2], items[n + 1][1])
                    del items[n + 1]
                    break
            else:
                break
        value = items[0][2]
        for op, pos, factor in items[1:]:
            if "m" in (value.kind, factor.kind) and "s" not in (value.kind, factor.kind) and (
                    value.kind != factor.kind):
                raise IllFormed(self.product_error(value, factor), pos)
            value = self.elementwise(value, factor, op, pos)
        return value

    def product_error(self, left: _Value, right: _Value) -> str:
        return f"no product of {left.describe()} and {right.describe()}"

    def matmul(self, left: _Value, right: _Value, pos: int) -> _Value:
        s = sp.Dummy("s", integer=True, positive=True)
        kinds = (left.kind, right.kind)
        if kinds == ("v", "r"):
            return _Value(left.expr * right.expr.xreplace({_ROW: _COL}), "m", left.rows,
                          right.rows)
        inner = left.cols if left.kind == "m" else left.rows
        if not self.network.same(inner, right.rows):
            hint = ""
            if left.kind == "m" and self.network.same(left.rows, right.rows):
                hint = " (did you mean the transpose of the matrix?)"
            raise IllFormed(f"dimension mismatch: {left.describe()} times "
                            f"{right.describe()}{hint}", pos)
        size = size_symbol(inner)
        if kinds == ("m", "v"):
            expr = sp.Sum(left.expr.xreplace({_COL: s}) * right.expr.xreplace({_ROW: s}),
                          (s, 1, size))
            return _Value(expr, "v", left.rows)
        if kinds == ("m", "m"):
            expr = sp.Sum(left.expr.xreplace({_COL: s}) * right.expr.xreplace({_ROW: s}),
                          (s, 1, size))
            return _Value(expr, "m", left.rows, right.cols)
        if kinds == ("r", "v") or kinds == ("v", "v"):
            expr = sp.Sum(left.expr.xreplace({_ROW: s}) * right.expr.xreplace({_ROW: s}),
                          (s, 1, size))
            return _Value(expr, "s")
        # ("r", "m"): a row vector times a matrix is a row vector over its columns
        expr = sp.Sum(left.expr.xreplace({_ROW: s}) * right.expr.xreplace({_ROW: s,
                                                                          _COL: _ROW}),
                      (s, 1, size))
        return _Value(expr, "r", right.cols)

    def _SumOver(self, node: SumOver) -> _Value:
        dummy = sp.Dummy(node.index, integer=True, positive=True)
        entry: list = [dummy, None, node.pos]
        self.scopes.append({node.index: entry})
        body = self.value(node.body)
        self.scopes.pop()
        if body.kind != "s":
            raise IllFormed(f"sum_{node.index} of {body.describe()}: write the summand with "
                            "indices", node.pos)
        bound = None
        if node.upper is not None:
            upper = self.value(node.upper)
            bound = self.network.axis_of(upper.expr)
            if not (isinstance(bound, int) or upper.expr in self.network.extents
                    or (upper.expr.is_Integer and upper.expr > 0)):
                raise IllFormed(f"sum_{node.index} runs to {upper.expr}: a sum runs to a "
                                "size, n_l, H_l, W_l or a kernel's size", node.upper.pos)
        if entry[1] is None:
            if bound is None:
                if not body.expr.has(dummy):
                    raise self.error(f"the summed index {node.index} does not appear in the "
                                     "sum", node.pos)
                raise self.error(f"the summed index {node.index} stands only inside index "
                                 "expressions: say how far it runs, as in "
                                 f"sum_{{{node.index}=1}}^{{H_2}}", node.pos)
            entry[1] = bound
        elif bound is not None and not self.network.same(bound, entry[1]):
            raise IllFormed(f"sum_{node.index} runs to {upper.expr}, but {node.index} "
                            f"indexes {describe_axis(entry[1])}", node.upper.pos)
        return _Value(sp.Sum(body.expr, (dummy, 1, axis_size(entry[1]))), "s")

    def _Iverson(self, node: Iverson) -> _Value:
        """An Iverson bracket: [low <= e <= high] of an index e is InRange(e, low, high), as
        the derivation writes a kernel offset's range; [(P, Q) = argmax_{p,q} f] the
        indicator FirstMax of the window's first maximum; any other comparison 1 or 0."""
        operands, ops = node.operands, node.ops
        first_max = self.first_max(node)
        if first_max is not None:
            return first_max
        for operand in operands:
            if isinstance(operand, Coordinates) or (
                    isinstance(operand, WindowMaxOf) and operand.arg):
                raise self.error("write the argmax of a window as [(P, Q) = argmax_{p,q} "
                                 "...], a position of as many offsets as the window has",
                                 operand.pos)
        values = [self.value(operand) for operand in operands]
        shaped = values[0]
        for other, operand in zip(values[1:], operands[1:]):
            shaped = self.elementwise(shaped, other, "+", operand.pos)
        exprs = [value.expr for value in values]
        if (ops in (("<=", "<="), (">=", ">=")) and not _reads_quantities(exprs[1])
                and all(e.is_integer for e in exprs)):
            low, high = (exprs[0], exprs[2]) if ops[0] == "<=" else (exprs[2], exprs[0])
            return _Value(InRange(exprs[1], low, high), shaped.kind, shaped.rows, shaped.cols)
        out = sp.Integer(1)
        for op, left, right in zip(ops, exprs, exprs[1:]):
            if isinstance(right, WindowMax) or isinstance(left, WindowMax):
                if isinstance(left, WindowMax):
                    op, left, right = _FLIPPED[op], right, left
                out *= AgainstMax(left, right, sp.Integer(list(_RELATIONS).index(op)))
                continue
            holds = _RELATIONS[op](left, right)
            if holds in (sp.true, sp.false):
                out *= sp.Integer(1 if holds == sp.true else 0)
            else:
                out *= sp.Piecewise((1, holds), (0, True))
        return _Value(out, shaped.kind, shaped.rows, shaped.cols)

    def first_max(self, node: Iverson) -> _Value | None:
        """[(P, Q) = argmax_{p,q} f] (either way round): FirstMax(max_{p,q} f, P, Q)."""
        if node.ops != ("=",):
            return None
        left, right = node.operands
        if isinstance(left, WindowMaxOf):
            left, right = right, left
        if not (isinstance(left, Coordinates) and isinstance(right, WindowMaxOf)
                and right.arg):
            return None
        if len(left.items) != len(right.offsets):
            raise IllFormed(f"a position of {len(left.items)} coordinates compared with a "
                            f"window of {len(right.offsets)} offsets", left.pos)
        window = self.window(right)
        position = [self.value(item) for item in left.items]
        if any(value.kind != "s" for value in position):
            raise IllFormed("a position in a window is written with indices", left.pos)
        return _Value(FirstMax(window, *(value.expr for value in position)), "s")

    def _Coordinates(self, node: Coordinates) -> _Value:
        raise self.error("a position (P, Q) is compared with an argmax: [(P, Q) = "
                         "argmax_{p,q} ...]", node.pos)

    def _WindowMaxOf(self, node: WindowMaxOf) -> _Value:
        if node.arg:
            raise self.error("argmax gives a position: compare it, as in [(r-u+1, s-v+1) = "
                             "argmax_{p,q} a^1_{j,u+p-1,v+q-1}]", node.pos)
        window = self.window(node)
        return _Value(WindowMaximum(window.function, *window.limits), "s")

    def window(self, node: WindowMaxOf) -> WindowMax:
        """max_{p,q} f over a pooling window: p and q run over the kernel of the max pooling
        layer that reads f's quantity (or over the axis where they stand alone)."""
        if len(node.offsets) != 2:
            raise self.error("a window has two offsets (rows and columns), as in max_{p,q}",
                             node.pos)
        entries = [[sp.Dummy(letter, integer=True, positive=True), None, pos]
                   for letter, pos in node.offsets]
        self.scopes.append({letter: entry for (letter, _), entry in zip(node.offsets, entries)})
        body = self.value(node.body)
        self.scopes.pop()
        if body.kind != "s":
            raise IllFormed(f"the maximum of {body.describe()}: write the window's entry with "
                            "indices", node.body.pos)
        kernel = self.pooling_kernel(node)
        limits = []
        for n, (symbol, axis, _pos) in enumerate(entries):
            size = axis_size(axis) if axis is not None else sp.Integer(kernel[n])
            limits.append((symbol, 1, size))
        return WindowMax(body.expr, *limits)

    def pooling_kernel(self, node: WindowMaxOf) -> tuple[int, int]:
        """The kernel of the max pooling layer that reads the quantity under max_{p,q}."""
        read = {self.layer(ref.layer) for ref in _refs(node.body) if ref.layer is not None}
        kernels = set()
        for pooling in self.model.nodes:
            if pooling.op.name == "max_pool2d" and read & set(pooling.inputs):
                attrs = layer_attributes(self.spec.layers[pooling.index - 1])
                kernels.add(geometry(attrs, pooling=True)[0])
        if len(kernels) != 1:
            quantity = ", ".join(f"layer {n}" for n in sorted(read)) or "no layer"
            raise self.error(f"max_{{p,q}} here reads {quantity}, which "
                             f"{'no' if not kernels else 'more than one'} max pooling layer "
                             "reads: the window's offsets have no range", node.pos)
        return kernels.pop()

    def _Call(self, node: Call) -> _Value:
        """A call: ``sigma`` or an activation by name (its derivative with a prime), else
        one of the registry's scalar functions (elementwise; max and min of two values)."""
        args = [self.value(arg) for arg in node.args]
        name = node.name
        if name != "sigma" and name not in functions.ACTIVATIONS:
            function = functions.SCALAR_FUNCTIONS[name]
            if len(args) != function.arity:
                count = "two arguments" if function.arity == 2 else "one argument"
                raise self.error(f"{name}() takes {count}", node.pos)
            if node.prime:
                raise self.error(f"{name}' is not supported; write the derivative out",
                                 node.pos)
            shaped = args[0]
            for other in args[1:]:
                shaped = self.elementwise(shaped, other, "+", node.pos)
            return dataclasses.replace(shaped,
                                       expr=function.build(*(arg.expr for arg in args)))
        if len(args) != 1:
            raise self.error(f"{name}() takes one argument", node.pos)
        (arg,) = args
        activation = self.activation_of(node)
        if activation.is_softmax:
            if node.prime:
                raise self.error("softmax' is a Jacobian, not an elementwise function; write "
                                 "the output error with sums", node.pos)
            if arg.kind != "v":
                raise IllFormed("softmax takes a vector", node.pos)
            s = sp.Dummy("s", integer=True, positive=True)
            total = sp.Sum(sp.exp(arg.expr.xreplace({_ROW: s})), (s, 1, size_symbol(arg.rows)))
            return dataclasses.replace(arg, expr=sp.exp(arg.expr) / total)
        expr = activation_derivative(activation).in_z if node.prime else activation.expr
        return dataclasses.replace(arg, expr=expr.subs(Z, arg.expr))

    def activations(self) -> dict[int, functions.Activation]:
        """The activation of every node that applies one."""
        return {node.index: node.activation for node in self.model.nodes
                if node.activation is not None}

    def activation_of(self, node: Call) -> functions.Activation:
        activations = self.activations()
        if node.name != "sigma":
            params = {}
            for activation in activations.values():
                if activation.name == node.name:
                    params = dict(activation.params)
                    break
            return functions.resolve_activation(node.name, params)
        if node.layer is not None:
            layer = self.layer(node.layer)
            if not 1 <= layer <= self.depth:
                raise self.error(f"sigma_{layer}: layers are 1..{self.depth}", node.pos)
            if layer not in activations:
                raise self.error(f"sigma_{layer}: {self.network.describe(layer)}, which has no "
                                 "activation", node.pos)
            return activations[layer]
        layers = sorted({self.layer(ref.layer) for ref in _refs(node.args[0])
                         if ref.layer is not None and ref.letter in ("z", "a", "w", "b")})
        layers = [layer for layer in layers if layer in activations]
        if len(layers) == 1:
            return activations[layers[0]]
        read = sorted({self.layer(ref.layer) for ref in _refs(node.args[0])
                       if ref.layer is not None})
        if read and not layers and not any(layer in activations for layer in read):
            raise self.error(f"sigma(...) here reads layer {read[0]}, which has no "
                             "activation: write the function by name, e.g. sigmoid(...)",
                             node.pos)
        distinct = set(activations.values())
        if len(distinct) == 1:
            return distinct.pop()
        raise self.error("which layer's sigma? the layers have different activations; write "
                         "sigma_2(...) or apply it to z^l", node.pos)


def _reads_quantities(expr: sp.Expr) -> bool:
    """Whether ``expr`` reads a network quantity (else it is an expression of indices)."""
    return bool(expr.atoms(sp.Indexed, NetTensor, sp.Derivative, WindowMax))


def _refs(node: Node) -> list[Ref]:
    """Every quantity reference under ``node``."""
    if isinstance(node, Ref):
        return [node]
    found: list[Ref] = []
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        children = value if isinstance(value, tuple) else (value,)
        for child in children:
            if isinstance(child, tuple):
                child = child[-1]
            if isinstance(child, Node):
                found.extend(_refs(child))
    return found


# --- which derived formula the left side names -------------------------------------------


def _target_tensor(target: Target, layer: int, network: _Network) -> NetTensor | None:
    """The quantity the left side differentiates at ``layer`` (z^l for sigma'(z^l))."""
    if target.kind == "delta":
        return network.model.node(layer).forward.delta
    if target.kind == "sigma'":
        return network.tensor("z", layer)
    return network.tensor(target.role, layer)


def _has_target(target: Target, layer: int, network: _Network) -> bool:
    """Whether the left side names a derived formula at ``layer``."""
    q = _target_tensor(target, layer, network)
    if q is None:
        return False
    if target.kind == "sigma'":
        activation = network.model.node(layer).activation
        return activation is not None and not activation.is_softmax and (
            target.activation is None or activation.name == target.activation)
    return target.kind == "delta" or network.formula_for(q) is not None


def _target_layers(target: Target, meaning: _Meaning,
                   network: _Network) -> list[tuple[int | None, int]]:
    """(value of l, concrete layer) for every layer the left side names."""
    depth = network.depth
    role = target.role
    if target.kind == "grad" and role == "a" and network.chain and (
            target.layer.base == "l" or meaning.layer(target.layer) != depth):
        raise meaning.error("dC/da is only derived for the output layer: dC/da^L", target.pos)
    if target.layer.base == "l":
        if target.kind == "delta":
            candidates = list(range(1, depth))        # BP2: the hidden layers
            if depth == 1:
                raise meaning.error("this network has no hidden layer; the output error is "
                                    "delta^L", target.pos)
        else:
            candidates = list(range(1, depth + 1))
        pairs = [(layer - target.layer.offset, layer) for layer in candidates]
    else:
        meaning.l_value = None
        layer = meaning.layer(target.layer)
        if not 1 <= layer <= depth:
            raise meaning.error(f"layer {layer} does not exist: layers are 1..{depth}",
                                target.layer.pos)
        pairs = [(None, layer)]
    result = [(l_value, layer) for l_value, layer in pairs
              if _has_target(target, layer, network)]
    if target.layer.base == "l":
        # the generic l of a network with feature maps: the layers whose quantity has as
        # many indices as the left side writes (delta^l_jrs: the feature maps' δ)
        fitting = [(l_value, layer) for l_value, layer in result
                   if _fits(target, _target_tensor(target, layer, network), network)]
        result = fitting or result
    if result:
        return result
    if target.kind == "sigma'":
        message = "no layer has that elementwise activation"
    elif role == "b" and any(network.model.node(layer).parameter("w") is not None
                             for _, layer in pairs):
        message = "no layer has a bias (bias: false in the spec)"
    else:
        name = "dC/da" if role == "a" else f"dC/d{role}"
        have = [layer for layer in range(1, depth + 1) if _has_target(target, layer, network)]
        where = ("; it is derived at " + _ranges(name, have)) if have else (
            f": this network has no {role}")
        if role == "a":
            where += " (a dense layer's output enters through its error delta^l)"
        message = f"no layer named by the left side has {name}{where}"
    raise meaning.error(message, target.pos)


def _fits(target: Target, q: NetTensor | None, network: _Network) -> bool:
    """Whether the left side's indices (none: the vector form) fit ``q``'s rank."""
    rank = len(network.axes.get(q, ())) if q is not None else 0
    return rank == len(target.indices) if target.indices else rank <= 2


def _derived_formula(target: Target, layer: int, network: _Network) -> Formula:
    derivation = network.derivation
    if target.kind == "delta":
        return derivation.delta(layer)
    q = _target_tensor(target, layer, network)
    assert q is not None
    if target.kind == "grad":
        formula = network.formula_for(q)
        assert formula is not None
        return formula
    derivative = activation_derivative(network.model.node(layer).activation)
    z = q.indexed[j]
    sigma = sp.Function(f"sigma_{layer}")
    return Formula(f"sigma'^{layer}", "", sp.Derivative(sigma(z), z, evaluate=False),
                   derivative.in_z.subs(Z, z), derivative.in_z.subs(Z, z), (j,),
                   derivative.steps, of=q, node=layer, kind="sigma'")


def _target_name(target: Target, layer: int | None = None) -> str:
    """The left side's name: at the written layer, or at a concrete ``layer``."""
    text = str(target.layer) if layer is None else str(layer)
    if target.kind == "delta":
        return f"delta^{text}"
    if target.kind == "grad":
        return f"dC/d{target.role}^{text}"
    return f"{target.activation or 'sigma'}'(z^{text})"


# --- comparison --------------------------------------------------------------------------


def _canonical_sums(expr: sp.Expr, depth: int = 0) -> sp.Expr:
    """Bound indices renamed by nesting depth, so that equal sums compare equal. Directly
    nested sums (sum_r sum_s, or one sum over r and s) become one sum over their indices,
    ordered by their ranges where no range reads another index (the order of independent
    sums does not matter); a window's maximum has its offsets renamed likewise."""
    if isinstance(expr, sp.Sum):
        limits: list[tuple] = []
        body = expr
        while isinstance(body, sp.Sum):
            limits = [*limits, *body.limits]
            body = body.function
        variables = {limit[0] for limit in limits}
        if not any(bound.has(*variables) for _v, *bounds in limits for bound in bounds):
            limits.sort(key=lambda limit: (str(limit[1]), str(limit[2])))
        names = {var: sp.Symbol(f"_s{depth + n}", integer=True, positive=True)
                 for n, (var, _low, _high) in enumerate(limits)}
        body = _canonical_sums(body.xreplace(names), depth + len(limits))
        return sp.Sum(body, *((names[var], low.xreplace(names), high.xreplace(names))
                              for var, low, high in limits))
    if isinstance(expr, WindowMax):
        names = {limit[0]: sp.Symbol(f"_w{depth + n}", integer=True, positive=True)
                 for n, limit in enumerate(expr.limits)}
        body = _canonical_sums(expr.function.xreplace(names), depth + len(names))
        return expr.func(body, *((names[var], low, high) for var, low, high in expr.limits))
    if not expr.args:
        return expr
    return expr.func(*(_canonical_sums(arg, depth) for arg in expr.args))


def _instantiate(expr: sp.Expr, free: tuple[sp.Symbol, ...], values: tuple[sp.Expr, ...]
                 ) -> sp.Expr:
    """``expr`` with its free indices set to ``values`` and its bound ones made fresh."""
    bound = {limit[0] for s in expr.atoms(sp.Sum) for limit in s.limits}
    mapping: dict[sp.Expr, sp.Expr] = {b: sp.Dummy(str(b), integer=True, positive=True)
                                       for b in bound}
    mapping.update(zip(free, values))
    return expr.xreplace(mapping)


def _indices_of(atom: sp.Expr) -> tuple[sp.Expr, ...]:
    """The indices of an entry: an Indexed, or a stand-in q(j, k); () for a scalar."""
    if isinstance(atom, sp.Indexed):
        return tuple(atom.indices)
    return tuple(atom.args) if isinstance(atom, AppliedUndef) else ()


def _substitute(expr: sp.Expr, definitions: Mapping[tuple[NetTensor, bool], tuple],
                network: _Network) -> sp.Expr:
    """Every stand-in of ``definitions`` ((quantity, adjoint) -> (indices, stand-in expr))
    replaced by its definition, to a fixed point."""
    def defined(e: sp.Expr) -> bool:
        return isinstance(e, (AppliedUndef, sp.Dummy)) and network.stands_for(e) in definitions

    def define(e: sp.Expr) -> sp.Expr:
        free, body = definitions[network.stands_for(e)]
        return _instantiate(body, free, _indices_of(e))

    for _ in range(len(definitions) + 1):
        new = expr.replace(defined, define)
        if new == expr:
            return new
        expr = new
    return expr


def _canonical(expr: sp.Expr, network: _Network) -> sp.Expr:
    """``expr`` (in stand-ins) in the fewest kinds of atoms: the adjoints of intermediates
    and parameters replaced by their derived formulas, a node's internal quantities (x̂, μ, σ²
    of a layer norm) by their definitions, a^l = sigma_l(z^l) for every elementwise
    activation, and widths equal by construction written as one width."""
    adjoints = {(f.of, True): (f.indices, network.stand_ins(f.rhs))
                for f in network.derivation.formulas if f.kind != "delta"}
    internal: dict[tuple[NetTensor, bool], tuple] = {}
    activations: dict[tuple[NetTensor, bool], tuple] = {}
    for node in network.model.nodes:
        for eq in node.equations:
            if eq.target not in (node.output, node.forward.delta):
                internal[(eq.target, False)] = (eq.indices, network.stand_ins(eq.expr))
            elif eq.activation is not None:
                activations[(eq.target, False)] = (eq.indices, network.stand_ins(eq.expr))
    expr = _substitute(expr, adjoints, network)
    expr = _substitute(_substitute(expr, internal, network), activations, network)
    widths = {size_symbol(n): axis_size(network._root(n)) for n in network.widths}
    return expr.xreplace(widths)


def _expanded_terms(expr: sp.Expr) -> int:
    """An upper bound on the number of terms ``sp.expand(expr)`` gives, in any subexpression.

    A short formula can expand to millions of terms (14 factors of degree 12); this bound is
    checked first so that such a formula goes straight to the numeric check.
    """
    worst = 1

    def terms(e: sp.Expr) -> int:
        nonlocal worst
        if isinstance(e, sp.Add):
            count = sum(terms(arg) for arg in e.args)
        elif isinstance(e, sp.Mul):
            count = math.prod(terms(arg) for arg in e.args)
        elif isinstance(e, sp.Pow) and e.exp.is_Integer:
            base = terms(e.base)
            # monomials of degree |n| in `base` terms, as a binomial coefficient
            count = math.comb(base + abs(int(e.exp)) - 1, abs(int(e.exp))) if base > 1 else 1
        else:
            for arg in e.args:     # a function's argument is expanded in place
                terms(arg)
            count = 1
        count = min(count, MAX_EXPANDED_TERMS + 1)
        worst = max(worst, count)
        return count

    terms(expr)
    return worst


def symbolic_identity(user: sp.Expr, derived: sp.Expr, network: _Network) -> bool:
    """True when user == derived for every layer size (see :func:`_canonical`)."""
    if any(relation.has(WindowMax) for relation in user.atoms(Relational)):
        return False          # [a = max_{p,q} ...]: SymPy would compare piecewise maxima
    def prepared(expr: sp.Expr) -> sp.Expr:
        expr = collapse(network.stand_ins(expr))
        return _canonical_sums(collapse(_canonical(expr, network)))

    difference = prepared(user) - prepared(derived)
    if sp.count_ops(difference) > 400:
        return False          # expanding it could take long; the numeric check decides
    for attempt in (lambda e: e, elementary):
        attempted = attempt(difference)
        if _expanded_terms(attempted) > MAX_EXPANDED_TERMS:
            return False
        candidate = sp.expand(attempted)
        if candidate == 0:
            return True
    # simplify is tried on small differences only, and never on sums: simplifying sums of
    # square roots (a layer norm's) can take minutes for a verdict the numeric check gives
    if sp.count_ops(difference) <= 80 and not difference.has(sp.Sum):
        try:
            return sp.simplify(elementary(difference)) == 0
        except (TypeError, ValueError, NotImplementedError):
            return False
    return False


# --- the numeric check: a small self-contained evaluator ---------------------------------


def _unroll(expr: sp.Expr) -> sp.Expr:
    """Every sum over concrete limits written out term by term (``doit`` would also evaluate
    the derivatives ∂C/∂q, which here are values, not operations)."""
    if not expr.has(sp.Sum):
        return expr
    if isinstance(expr, sp.Sum):
        out = _unroll(expr.function)
        for var, low, high in expr.limits:
            out = sp.Add(*(out.xreplace({var: sp.Integer(v)})
                           for v in range(int(low), int(high) + 1)))
        return out
    return expr.func(*(_unroll(arg) for arg in expr.args))


def _show(value: float | None) -> str:
    return "not a real number" if value is None else f"{value:.10g}"


class _Evaluator:
    """Values of a (small) model's quantities and derived formulas at random points: the
    forward equations of the graph in order, then every derived formula in the derivation's
    order (each reads only what came before it). The points and the 50-digit arithmetic are
    derive.verify.numeric's; what is evaluated (the formulas in stand-ins) is this module's."""

    def __init__(self, network: _Network) -> None:
        self.network = network
        self.sizes = {size_symbol(n): sp.Integer(w) for n, w in network.widths.items()}
        self.compiled: dict[tuple, tuple[se.Basic, tuple[tuple[se.Symbol, sp.Expr], ...]]] = {}

    def compile(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...]
                ) -> tuple[se.Basic, tuple[tuple[se.Symbol, sp.Expr], ...]]:
        """``expr`` at concrete indices and widths as a SymEngine expression in one symbol per
        value it reads (an entry of a quantity, or an adjoint ∂C/∂q)."""
        key = (expr, free, index)
        if key not in self.compiled:
            network = self.network
            concrete = network.stand_ins(expr).xreplace(dict(zip(free, map(sp.Integer, index))))
            concrete = _unroll(concrete.xreplace(self.sizes))
            atoms = sorted((a for a in concrete.atoms(AppliedUndef, sp.Dummy)
                            if network.stands_for(a) is not None), key=str)
            names = {atom: sp.Symbol(f"_q{n}") for n, atom in enumerate(atoms)}
            converted = se.sympify(elementary(concrete.xreplace(names)))
            self.compiled[key] = (converted, tuple((se.Symbol(symbol.name), atom)
                                                   for atom, symbol in names.items()))
        return self.compiled[key]

    def point_of(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...],
                 env: Mapping[sp.Expr, se.Basic]) -> tuple[se.Basic, dict[se.Symbol, se.Basic]]:
        """``expr`` compiled at ``index``, and the values it reads from ``env``."""
        compiled, reads = self.compile(expr, free, index)
        for _symbol, atom in reads:
            if atom not in env:
                raise _OutsideRange(self.network.outside(atom) or f"it reads {atom}")
        return compiled, {symbol: env[atom] for symbol, atom in reads}

    def evaluate(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...],
                 env: Mapping[sp.Expr, se.Basic]) -> se.Basic:
        """``expr`` at ``index``, a 50-digit number; ValueError where it has no real value."""
        return evaluate(*self.point_of(expr, free, index, env))

    def number(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...],
               env: Mapping[sp.Expr, se.Basic]) -> float | None:
        """``expr`` at ``index`` as a float, or None where it has no finite real value
        (1/0, log(0), a square root of a negative number)."""
        return as_float(value_at(*self.point_of(expr, free, index, env)))

    def point(self, rng: random.Random) -> tuple[dict[sp.Expr, se.Basic],
                                                 dict[tuple[NetTensor, tuple[int, ...]], float]]:
        """Every value at one random point, and the random leaves themselves (two decimals,
        for a reproducible counterexample). Dropout masks are 1: gradients are taken with
        dropout off."""
        network = self.network
        model = network.model
        leaves = [((tensor, index), tensor) for tensor in network.leaves
                  for index in network.entries(tensor)]
        values = random_point(rng, leaves, model.loss.needs, SAMPLING)
        raw = {key: float(value) for key, value in values.items()}
        # values by stand-in (see _Network.stand_ins)
        env: dict[sp.Expr, se.Basic] = {network.stand_in(t, index): value
                                         for (t, index), value in values.items()}
        for eq in model.equations:
            for index in network.entries(eq.target):
                value = self.evaluate(eq.expr, eq.indices, index, env)
                env[network.stand_in(eq.target, index)] = value
        for formula in network.derivation.formulas:
            lhs = network.stand_ins(formula.lhs)
            for index in network.entries(formula.of):
                at = lhs.xreplace(dict(zip(formula.indices, map(sp.Integer, index))))
                env[at] = self.evaluate(formula.rhs, formula.indices, index, env)
        return env, raw

    def quantities(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...],
                   env: Mapping[sp.Expr, se.Basic]) -> tuple[tuple[str, str], ...]:
        """The values ``expr`` reads at ``index`` that are not random leaves (those are listed
        with the point): a, z, δ of other layers, adjoints."""
        _compiled, reads = self.compile(expr, free, index)
        shown = []
        for _symbol, atom in reads:
            if atom not in env:
                continue
            tensor, adjoint = self.network.stands_for(atom)
            if self.network.is_leaf(tensor) and not adjoint:
                continue
            shown.append((pretty(self.network.real(atom)), _show(float(env[atom]))))
        return tuple(shown[:8])


class _Expanded:
    """Values of a small network with feature maps at random points, on the expanded copy
    that verification builds (:class:`derive.verify.expansion.Instance`: padding entries are
    0, a flatten's entries land where it puts them, a window's maximum is the piecewise
    choice of its first maximum), the derived formulas evaluated in the derivation's order by
    :func:`derive.verify.expansion.backprop_values`. Same interface as :class:`_Evaluator`."""

    def __init__(self, network: _Network) -> None:
        self.network = network
        self.instance = Instance(network.model, perturb=())
        self.outside: dict[tuple, str] = {}
        # δ^l has the shape of what it differentiates: read outside it, it is 0 as well
        # (the padding of a full correlation written Σ_p δ_{j,r-p+1,...} w_{jkpq})
        for node in network.model.nodes:
            forward = self.instance.shapes.get(node.forward.delta)
            if forward is not None:
                self.instance.shapes[network.delta_tensor(node.index)] = forward

    def point(self, rng: random.Random) -> tuple[dict[sp.Expr, se.Basic],
                                                 dict[tuple[NetTensor, tuple[int, ...]], float]]:
        network, instance = self.network, self.instance
        for _ in range(100):
            point = random_point(rng, instance.leaf_tensors, network.model.loss.needs,
                                 SAMPLING, steps=instance.target_steps)
            # the forward values only: the reverse sweep from node 0, a leaf, is empty
            swept = instance.tape.sweep(point, 0)
            if swept is not None:
                break
        else:
            raise DeriveError("no random point gives a real forward pass")
        values = {key: swept[0][n] for key, n in instance.nodes.items()}
        env = backprop_values(instance, network.derivation, values, numeric=True)
        raw = {(tensor, index): float(point[instance.values[entry(tensor, index)]])
               for tensor in network.leaves for index in network.entries(tensor)
               if entry(tensor, index) in instance.values}
        return env, raw

    def number(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...],
               env: Mapping[sp.Expr, se.Basic]) -> float | None:
        """``expr`` at ``index``; raises _OutsideRange where it reads an entry that has no
        value (the expansion would read any entry outside a quantity as 0, padding or not)."""
        key = (expr, free, index)
        if key not in self.outside and not self.may_read_outside(expr):
            self.outside[key] = ""
        if key not in self.outside:
            self.outside[key] = next(
                (why for atom in sorted(self.concrete(expr, free, index).atoms(sp.Indexed),
                                        key=sp.default_sort_key)
                 if (why := self.network.outside(atom))), "")
        if self.outside[key]:
            raise _OutsideRange(self.outside[key])
        try:
            value = self.instance.instantiate_expr(expr, free, index, env, numeric=True)
        except (MissingQuantity, ValueError, TypeError):
            return None
        return as_float(real_value(value))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one evaluator per cached network)
    def may_read_outside(self, expr: sp.Expr) -> bool:
        """Whether ``expr`` reads an entry at a computed index of a quantity that is not a
        feature map (a kernel's w_{j,k,r-u+1,s-v+1}): only those can lie outside."""
        return any(not (len(self.network.axes.get(tensor_of(atom), ())) == 3
                        and not tensor_of(atom).parameter)
                   and not all(isinstance(i, sp.Symbol) for i in atom.indices)
                   for atom in expr.atoms(sp.Indexed) if tensor_of(atom) is not None)

    def concrete(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...]
                 ) -> sp.Expr:
        """``expr`` at ``index`` and the concrete sizes, its sums written out (a term under
        a bracket that does not hold is gone: InRange of numbers is 0)."""
        sizes = {size: sp.Integer(n) for size, n in self.instance.sizes.items()}
        return _unroll(expr.xreplace(dict(zip(free, map(sp.Integer, index)))).xreplace(sizes))

    def quantities(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: tuple[int, ...],
                   env: Mapping[sp.Expr, se.Basic]) -> tuple[tuple[str, str], ...]:
        """The computed values (not random leaves) that ``expr`` reads at ``index``, where
        its sums can be written out (not inside a window's maximum)."""
        concrete = self.concrete(expr, free, index)
        reads = sorted(concrete.atoms(sp.Indexed, sp.Derivative), key=sp.default_sort_key)
        shown = []
        for atom in reads:
            tensor = tensor_of(atom.variables[0] if isinstance(atom, sp.Derivative) else atom)
            if atom in env and not (self.network.is_leaf(tensor)
                                    and not isinstance(atom, sp.Derivative)):
                shown.append((pretty(atom), _show(float(env[atom]))))
        return tuple(shown[:8])


@dataclass
class _Numeric:
    ok: bool
    max_error: float
    points: int
    counterexample: Counterexample | None


def _numeric_check(user_by_layer: Mapping[int, sp.Expr], target: Target, network: _Network,
                   *, points: int, seed: int) -> _Numeric:
    evaluator = network.evaluator
    rng = random.Random(seed)
    formulas = {layer: _derived_formula(target, layer, network) for layer in user_by_layer}
    worst = 0.0
    reasons: dict[tuple[int, tuple[int, ...]], str] = {}
    for _ in range(points):
        env, raw = evaluator.point(rng)
        failure: tuple[float, int, tuple[int, ...], float | None, float | None] | None = None
        for layer, user in user_by_layer.items():
            formula = formulas[layer]
            for index in network.entries(formula.of):
                correct = evaluator.number(formula.rhs, formula.indices, index, env)
                try:
                    theirs = evaluator.number(user, formula.indices, index, env)
                except _OutsideRange as err:
                    theirs, reasons[(layer, index)] = None, str(err)
                assert correct is not None, "the derived formula gave no real number"
                error = float("inf") if theirs is None else (
                    abs(theirs - correct) / max(1.0, abs(correct)))
                if error < TOLERANCE:
                    worst = max(worst, error)
                    continue
                if failure is None or error > failure[0]:
                    failure = (error, layer, index, theirs, correct)
        if failure is not None:
            error, layer, index, theirs, correct = failure
            formula = formulas[layer]
            shown = (f"no value: {reasons[(layer, index)]}" if (layer, index) in reasons
                     else _show(theirs))
            example = Counterexample(
                layer, index, shown, _show(correct), _point_values(network, raw),
                evaluator.quantities(user_by_layer[layer], formula.indices, index, env))
            return _Numeric(False, error, points, example)
    return _Numeric(True, worst, points, None)


def _point_values(network: _Network, raw: Mapping[tuple[NetTensor, tuple[int, ...]], float]
                  ) -> tuple[tuple[str, str], ...]:
    """The random parameters, input and target, as matrices and vectors by layer."""
    out: list[tuple[str, str]] = []
    for parameter in network.model.parameters:
        tensor = parameter.tensor
        name = f"W^{tensor.node}" if tensor.role == "w" else f"{tensor.role}^{tensor.node}"
        out.append((name, _array(tensor, network, raw)))
    for name, tensor in (("x", network.tensor("a", 0)), ("y", network.tensor("y", None))):
        out.append((name, _array(tensor, network, raw)))
    return tuple(out)


def _array(tensor: NetTensor, network: _Network,
           raw: Mapping[tuple[NetTensor, tuple[int, ...]], float]) -> str:
    """The values of ``tensor`` as nested lists, as NumPy prints an array: a vector
    ``[0.3, -1.2]``, a matrix ``[[...], [...]]``, a kernel four levels deep."""
    widths = [network.width(axis) for axis in network.axes[tensor]]

    def nested(prefix: tuple[int, ...]) -> str:
        if len(prefix) == len(widths) - 1:
            return _vector([raw[(tensor, (*prefix, n))] for n in range(1, widths[-1] + 1)])
        return "[" + ", ".join(nested((*prefix, n))
                               for n in range(1, widths[len(prefix)] + 1)) + "]"

    return nested(()) if widths else _show(raw[(tensor, ())])


def _vector(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


# --- printing the derived formula in the user's notation ---------------------------------


class PlainPrinter(StrPrinter):
    """Prints derive expressions in the plain formula syntax ``derive check`` reads back.

    Quantities print from their fields (role and node), with the layer names of the
    ``layers`` setting (``{2: "l+1"}``); ``sizes`` maps width symbols to their node.
    """

    printmethod = "_derive_plain"
    _default_settings: ClassVar[dict[str, Any]] = {**StrPrinter._default_settings,
                                                   "layers": {}, "sizes": {}}

    def _layer(self, layer: int | None) -> str:
        if layer is None:
            return ""
        text = self._settings["layers"].get(layer, str(layer))
        return "^" + (text if len(text) == 1 else "{" + text + "}")

    def _adjoint(self, tensor: NetTensor, indices: tuple[sp.Expr, ...] = ()) -> str:
        script = "_" + "".join(map(str, indices)) if indices else ""
        return f"(dC/d{tensor.role}{self._layer(tensor.node)}{script})"

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if isinstance(expr, NetTensor):
            if expr.role == "grad":     # the tensor form of an adjoint
                return self._adjoint(expr.target)
            letter = "W" if expr.role == "w" and expr.rank == 2 else expr.role
            return letter + self._layer(expr.node)
        node = self._settings["sizes"].get(expr)
        if node is not None:
            text = self._settings["layers"].get(node, str(node))
            return "n_" + (text if len(text) == 1 else "{" + text + "}")
        return expr.name

    def _print_Dummy(self, expr: sp.Dummy) -> str:
        return expr.name

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        tensor = tensor_of(expr)
        if tensor is None:
            return super()._print_Indexed(expr)
        return tensor.role + self._layer(tensor.node) + self._indices(expr.indices)

    def _indices(self, indices: Sequence[sp.Expr]) -> str:
        """``_jk`` for letters, ``_{k,r+p-1,s+q-1}`` once an index is an expression."""
        printed = [self._index(index) for index in indices]
        if all(len(text) == 1 for text in printed):
            return "_" + "".join(printed)
        return "_{" + ",".join(printed) + "}"

    def _index(self, index: sp.Expr) -> str:
        return self._print(index).replace(" ", "")

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        (variable, _count), = expr.variable_count
        tensor = tensor_of(variable)
        if expr.expr == C and tensor is not None:
            return self._adjoint(tensor, _indices_of(variable))
        return super()._print_Derivative(expr)

    def _print_Sum(self, expr: sp.Sum) -> str:
        body = self.parenthesize(expr.function, sp.printing.precedence.PRECEDENCE["Mul"])
        # the first limit is the innermost sum
        return " ".join(f"sum_{limit[0]}" for limit in reversed(expr.limits)) + f" {body}"

    def _print_InRange(self, expr: InRange) -> str:
        value, low, high = expr.args
        return f"[{self._index(low)} <= {self._index(value)} <= {self._index(high)}]"

    def _print_WindowMax(self, expr: WindowMax) -> str:
        window, letters = self._window(expr, set())
        return f"max_{{{letters}}} {self.parenthesize(window.function, 999)}"

    def _print_FirstMax(self, expr: FirstMax) -> str:
        window, p, q = expr.args
        used = {str(symbol) for symbol in (p.free_symbols | q.free_symbols)}
        window, letters = self._window(window, used)
        return (f"[({self._index(p)}, {self._index(q)}) = argmax_{{{letters}}} "
                f"{self.parenthesize(window.function, 999)}]")

    def _window(self, window: WindowMax, used: set[str]) -> tuple[WindowMax, str]:
        """``window`` with offsets the formula syntax can name (p', a renamed p, cannot) and
        those names, "p,q"."""
        used = used | {str(symbol) for symbol in window.free_symbols}
        names: dict[sp.Symbol, sp.Symbol] = {}
        for offset, *_bounds in window.limits:
            name = str(offset)
            if len(name) != 1 or name in used:
                name = next(c for c in "pqghtxyz" if c not in used)
            used.add(name)
            names[offset] = sp.Symbol(name, integer=True, positive=True)
        renamed = window.xreplace(names)
        return renamed, ",".join(str(names[limit[0]]) for limit in window.limits)

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        # derive's piecewise activations test z > 0: written with step(z) = [z > 0]
        if len(expr.args) == 2 and expr.args[1].cond == sp.true and isinstance(
                expr.args[0].cond, sp.StrictGreaterThan):
            (value, cond), (other, _) = expr.args
            step = f"step({self._print(cond.lhs - cond.rhs)})"
            prec = sp.printing.precedence.PRECEDENCE["Mul"]
            on = step if value == 1 else f"{self.parenthesize(value, prec)}*{step}"
            if other == 0:
                return on
            return f"({on} + {self.parenthesize(other, prec)}*(1 - {step}))"
        return self._print_Basic(expr)

    def _print_MatVec(self, expr: MatVec) -> str:
        matrix, vector, transposed = expr.args
        w, v = self._print(matrix), self._operand(vector)
        return f"(({w})^T {v})" if transposed else f"({w} {v})"

    def _print_Outer(self, expr: Outer) -> str:
        u, v = expr.args
        return f"{self._operand(u)} ({self._print(v)})^T"

    def _print_Inner(self, expr: Inner) -> str:
        u, v = expr.args
        return f"({self._print(u)})^T {self._operand(v)}"

    def _operand(self, expr: sp.Expr) -> str:
        text = self._print(expr)
        return text if isinstance(expr, (sp.Symbol, MatVec)) else f"({text})"


def plain(expr: sp.Expr, layers: Mapping[int, str] | None = None,
          sizes: Mapping[sp.Symbol, int] | None = None) -> str:
    """``expr`` in the plain formula syntax (``derive check`` parses it back)."""
    return PlainPrinter({"layers": dict(layers or {}), "sizes": dict(sizes or {})}).doprint(expr)


def _layer_names(target: Target, layer: int, depth: int) -> dict[int, str]:
    if target.layer.base == "l":
        lv = layer - target.layer.offset
        names = {lv - 1: "l-1", lv: "l", lv + 1: "l+1"}
        if target.kind == "grad":
            names[depth] = names.get(depth, "L")
        return names
    if target.layer.base == "L":
        return {depth: "L", depth - 1: "L-1"}
    return {}


def _printable_vector(formula: Formula) -> sp.Expr | None:
    """The tensor form of the formula when the plain syntax can say it (no sums of a vector's
    entries, no einsum), else None."""
    try:
        vector = formula.vector
    except DeriveError:
        return None
    return None if vector.has(Einsum) or vector.has(ONE) else vector


def _derived_lines(parsed: ParsedFormula, target: Target, layer: int, formula: Formula,
                   network: _Network) -> tuple[str, ...]:
    names = _layer_names(target, layer, network.depth)

    def say(expr: sp.Expr) -> str:
        return plain(expr, names, network.size_node)

    lhs = _target_name(target)
    vector = None if parsed.index_form or target.kind == "sigma'" else (
        _printable_vector(formula))
    if target.kind == "sigma'":
        z = "z" + PlainPrinter({"layers": names})._layer(layer) + "_j"
        text = f"{target.activation or 'sigma'}'({z}) = {say(formula.rhs)}"
    elif vector is None:
        letters = "_" + "".join(map(str, formula.indices)) if formula.indices else ""
        text = f"{lhs}{letters} = {say(formula.rhs)}"
    else:
        text = f"{lhs} = {say(vector)}"
    lines = [text, f"{pretty(formula.lhs)} = {pretty(formula.rhs)}"]
    if parsed.latex:
        from derive.render.latex_printer import equation  # a later stage, imported on use only

        lines.append(equation(formula.lhs, formula.rhs))
    return tuple(lines)


# --- the API -----------------------------------------------------------------------------


def _restated(parsed: ParsedFormula, user: Mapping[int, sp.Expr],
              formulas: Mapping[int, Formula]) -> str:
    """Why the right side only restates the left (``delta^l = delta^l``, ``δᴸ = ∂C/∂zᴸ``,
    ``sigma'(z^l) = sigma'(z^l)``), or "" when it says how to compute it."""
    target, rhs = parsed.target, parsed.rhs
    name = _target_name(target)
    if target.kind == "sigma'":
        same = (isinstance(rhs, Call) and rhs.prime and len(rhs.args) == 1
                and isinstance(rhs.args[0], Ref) and rhs.args[0].letter == "z"
                and _same_layer(rhs.args[0].layer, target.layer)
                and all(user[layer] == formula.rhs for layer, formula in formulas.items()))
    else:
        # structurally equal (SymPy's automatic simplification only: expanding a large
        # right side could take minutes)
        same = all(user[layer] == formula.lhs for layer, formula in formulas.items())
    if not same:
        return ""
    definition = (f" (dC/dz^{target.layer} is the definition of delta^{target.layer})"
                  if target.kind == "delta" and isinstance(rhs, Adjoint) else "")
    return (f"the right side is {name} itself{definition}: the formula is true by "
            "definition and says nothing about how to compute it")


def _same_layer(a: Layer | None, b: Layer) -> bool:
    return a is not None and (a.base, a.offset) == (b.base, b.offset)


def _fitting_layers(pairs: list[tuple[int | None, int]], meaning: _Meaning, target: Target,
                    formulas: Mapping[int, Formula]) -> list[tuple[int | None, int]]:
    """The layers a generic l runs over in a network with feature maps: those where the
    formula's indices fit its quantities (``dC/db^l_j = sum_r sum_s delta^l_jrs`` names the
    convolutions, not a dense layer's bias); every layer it can name otherwise."""
    if len(pairs) < 2 or not meaning.network.images:
        return pairs
    fitting, misfit = [], None
    for l_value, layer in pairs:
        meaning.l_value = l_value
        try:
            meaning.convert(target, formulas[layer])
        except _DoesNotFit as err:
            misfit = err
            continue
        except (IllFormed, DeriveError):
            pass                  # reported when the formula is converted for the verdict
        fitting.append((l_value, layer))
    if not fitting:
        assert misfit is not None
        raise meaning.error(misfit.message, misfit.pos)
    return fitting


def own_names(spec: NetworkSpec) -> dict[str, str]:
    """The quantities a formula about ``spec`` may name beyond the built-in ones, by role: each
    custom op's parameters (U) and the sums derive names in its forward pass (s1, s2)."""
    names: dict[str, str] = {}
    for node in build_model(spec).nodes:
        if "custom" in node.op.extra:
            names.update((p.tensor.role, p.tensor.role) for p in node.parameters)
            names.update((e.target.role, e.target.role) for e in node.equations[:-1])
    return names


def check_formula(spec: NetworkSpec | str | Mapping, formula: str, *, points: int = POINTS,
                  seed: int = 0) -> FormulaVerdict:
    """Check ``formula`` (derive notation, plain or LaTeX) against the derivation of ``spec``.

    Raises :class:`~derive.errors.DeriveError` (a ``FormulaSyntaxError`` with the column for
    text that does not parse) when the formula cannot be checked; returns a verdict otherwise.
    """
    spec = load_spec(spec)
    if spec.sequence:
        raise DeriveError(f"{spec.name}: derive check reads formulas of vector and image "
                          "networks; a sequence network's (time steps t) are not supported "
                          "yet: derive show and derive verify cover it")
    parsed = parse_formula(formula, own_names(spec))
    if points < 1:
        raise DeriveError("points must be at least 1")
    network = _network(spec)
    target = parsed.target
    meaning = _Meaning(parsed, network, None)
    pairs = _target_layers(target, meaning, network)
    name = _target_name(target)
    formulas = {layer: _derived_formula(target, layer, network) for _, layer in pairs}
    pairs = _fitting_layers(pairs, meaning, target, formulas)
    concrete = [layer for _, layer in pairs]
    assumptions = tuple(dict.fromkeys(a for layer in concrete
                                      for a in formulas[layer].assumptions))
    user: dict[int, sp.Expr] = {}
    for l_value, layer in pairs:
        meaning.l_value = l_value
        try:
            user[layer] = meaning.convert(target, formulas[layer])
        except IllFormed as err:
            return FormulaVerdict(
                formula, spec.name, name, tuple(concrete), False, "ill-formed", assumptions,
                _derived_lines(parsed, target, layer, formulas[layer], network),
                reason=f"ill-formed at column {err.pos + 1}: {err.message}")

    restated = _restated(parsed, user, formulas)
    if restated:
        return FormulaVerdict(
            formula, spec.name, name, tuple(concrete), False, "tautology", assumptions,
            _derived_lines(parsed, target, concrete[0], formulas[concrete[0]], network),
            reason=restated, tautological=True)
    symbolic = all(symbolic_identity(user[layer], formulas[layer].rhs, network)
                   for layer in concrete)
    small = capped_spec(spec, MAX_WIDTH)
    small_network = _network(small)
    numeric = _numeric_check(user, target, small_network, points=points, seed=seed)
    shape = network_shape(small.shapes)
    where = (f"the {shape} network" if small.shapes == spec.shapes else
             f"a {shape} copy of the {network_shape(spec.shapes)} network")
    numeric_text = (f"numeric agreement at {numeric.points} random points, {DIGITS}-digit "
                    f"arithmetic, on {where} (max rel. error {numeric.max_error:.1e})")
    if symbolic and not numeric.ok:
        raise AssertionError(f"internal error: {formula!r} is symbolically equal to the "
                             "derivation but differs numerically")
    if symbolic:
        method = ("symbolic identity for every layer size (after writing a^l = sigma_l(z^l) "
                  f"and the activation definitions); confirmed by {numeric_text}")
    elif numeric.ok:
        method = numeric_text + "; not shown symbolically"
    else:
        method = (f"numeric, {DIGITS}-digit arithmetic, on {where}")
    failing = numeric.counterexample.layer if numeric.counterexample else concrete[0]
    return FormulaVerdict(
        formula, spec.name, name, tuple(concrete), numeric.ok, method, assumptions,
        _derived_lines(parsed, target, failing, formulas[failing], network),
        numeric.counterexample, max_error=numeric.max_error)


# --- the command -------------------------------------------------------------------------
