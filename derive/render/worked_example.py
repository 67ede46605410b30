"""The worked numeric example: one forward and backward pass, by evaluating the Derivation.

Takes a :class:`~derive.derivation.Derivation` and gives a :class:`WorkedExample`: the value
of every forward quantity of every node (z^l, a^l, μ^l, σ²^l, x̂^l, ...), the cost C, the
penalty R, and the value of every derived formula (the loss gradient, every δ^l, every adjoint
and every parameter gradient, with ∂R/∂w where there is a penalty) for one input sample.

Nothing is typed in: the forward values come from the nodes' own index-form equations
(``Node.equations``, ``Model.cost``, ``Model.penalty``) and the backward values from the
derived formulas (``Formula.rhs``, ``Formula.penalty``), each evaluated with NumPy over its
free indices (an index is an array axis, a sum over an index sums that axis; an entry at a
shifted index, a_{k, 2r+p-3, 2s+q-3}, gathers the entries its index expressions reach, 0 outside
the array, which is where the padding is; a window's maximum, the indicator of its first
maximum and an Iverson bracket are evaluated as the registry defines them). So the numbers a
student checks by hand are the numbers of the formulas printed above them. Nothing is
substituted symbolically, and a document computes only what it prints: a wide layer's weight
gradient only for the rows and columns shown (``worked_example(..., shown=...)``).

The input, target and parameters come from the spec's ``example:`` section when it has one
(:class:`~derive.spec.ExampleSpec`: ``x``, ``y``, ``params`` W1, b1, gamma2, ...); otherwise
:func:`default_values` picks short round values. A dropout mask is 1 everywhere: the example
runs with dropout off, as the generated code's ``gradients()`` does.

A recurrent layer (one whose equations read its own quantities at the step before, h_{t-1})
is evaluated step by step, t = 1..T, its equations in order within each step; an entry at step
0 lies outside the sequence and reads 0 (h_0 = 0). Its errors go the other way: the formulas
of a recurrent layer with the time step t free are evaluated from t = T down to 1, since δ_t
reads δ_{t+1} (which is 0 past the last step). A parameter's gradient sums over the steps; the
terms of that sum, one per step, are kept as well (``WorkedExample.step_terms``), for a
document that shows the sum term by term.

Attention reads every step at once (its scores s_{tτ} read the keys k_τ of every step): its
equations, and its formulas, which read the adjoints at every step τ (whole T × T matrices),
are evaluated over all steps at once, in the derivation's order (each reads only what an
earlier one computed). Its worked numbers would be T² per matrix, so a network with attention
whose spec gives no example is worked on a small copy (``worked_example(..., small=True)``,
:func:`small_copy`): :data:`SMALL_STEPS` steps and every width at most :data:`SMALL_WIDTH`,
the same graph. The formulas are the derivation's, which hold for every T and every width
n_l; only the numbers they are evaluated with change (``WorkedExample.widths``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
import sympy as sp

from derive.derivation.reverse import C, Derivation, Formula, adjoint_tensor
from derive.graph.model import Model, Node, build_model
from derive.quantities import LENGTH, NetTensor, index_family, tensor_of
from derive.registry.functions import elementary, sigmoid, softplus
from derive.registry.ops import OPS, Equation
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.spec.load import NetworkSpec, layer_attributes, parameter_key

Vector = tuple[float, ...]

#: The small copy of a network with attention that the worked example runs (no example given):
#: this many time steps, every width at most this (3: a layer norm over 2 features would
#: give ±1 whatever it reads, and a gradient through it of almost 0).
SMALL_STEPS = 3
SMALL_WIDTH = 3


# --- the values of the example ---------------------------------------------------------------


def _tenth(n: int) -> float:
    return n / 10


def default_values(spec: NetworkSpec
                   ) -> tuple[Vector, Vector, dict[str, tuple | np.ndarray]]:
    """Short round values (one decimal) for x, y and the parameters, without randomness.

    The patterns only need to be fixed, varied and small; the target suits the loss: a one-hot
    vector for cross-entropy, 1/0 for outputs in (0, 1), +-0.5 otherwise. A parameter that
    starts at one (a layer norm's scale γ) gets values near one.

    A network with attention gets steps that differ by more than a shift (which a layer norm
    would undo), a class per step that changes with the step, and projections in halves, each
    its own, so that the weights α are far from uniform (with tenths the scores would all be
    near 0) and the gradients of queries and keys far from 0.
    """
    sizes = spec.sizes
    attention = spec.sequence and build_model(spec).reads_whole_sequences
    if attention:
        steps_x, width = spec.input_shape
        x = tuple(_tenth((7 * t * k + 2 * t + 2 * k) % 11 - 5)
                  for t in range(1, steps_x + 1) for k in range(1, width + 1))
    elif spec.image is None:
        # a sequence's values step by step: T steps of n_0 (the same pattern, longer)
        count = math.prod(spec.input_shape)
        x = tuple(_tenth((7 * n) % 11 - 5) for n in range(1, count + 1))
    else:
        # an image's values row by row, channel-major; a longer period than a vector's, so
        # that the windows of a max-pooling layer have no ties (which the first maximum
        # would break by rounding errors rather than by the numbers shown)
        x = tuple(_tenth((7 * n) % 17 - 8) for n in range(1, math.prod(spec.input_shape) + 1))
    output = spec.activation(spec.depth)
    n_out = sizes[-1]
    steps = math.prod(spec.shapes[-1][:-1])       # T outputs of a sequence, else one
    if spec.resolved_loss().needs == "distribution" and attention:
        y = tuple(1.0 if n % n_out == (n // n_out + 1) % n_out else 0.0
                  for n in range(n_out * steps))          # class t mod n_L at step t
    elif spec.resolved_loss().needs == "distribution":
        y = tuple(1.0 if n % n_out == 0 else 0.0 for n in range(n_out * steps))
    elif output is not None and output.is_probability:
        y = tuple(1.0 if n % 2 == 0 else 0.0 for n in range(n_out * steps))
    else:
        y = tuple(0.5 if n % 2 == 0 else -0.5 for n in range(n_out * steps))
    params: dict[str, tuple | np.ndarray] = {}
    shapes = spec.parameter_shapes()
    seen: dict[tuple[int, int], int] = {}   # (layer, rank 1 or more): its parameters so far
    for l, layer, parameter in spec.parameter_defs():
        key = parameter_key(parameter.role, l)
        shape = shapes[key]
        k = seen.get((l, min(len(shape), 2)), 0)        # the k-th matrix (or vector) of l
        seen[l, min(len(shape), 2)] = k + 1
        if layer.op == "conv2d" and len(shape) == 4:
            params[key] = _kernel_values(shape, l)
        elif attention and parameter.role in _PROJECTIONS:
            params[key] = _projection_values(shape, l + 2 * _PROJECTIONS.index(
                parameter.role))
        elif len(shape) >= 2:
            params[key] = _matrix_values(shape, l, k)
        else:
            # the k-th vector of a layer shifted by 3k: a GRU's bx and bh differ
            start = 1.0 if parameter.init == "ones" else 0.0
            params[key] = tuple(start + _tenth((2 * row + l + 3 * k) % 5 - 2)
                                for row in range(1, shape[0] + 1))
    return x, y, params


#: Attention's projections, which get values of their own (:func:`_projection_values`).
_PROJECTIONS = ("wq", "wk", "wv")


def _projection_values(shape: tuple[int, ...], offset: int) -> np.ndarray:
    """Halves for a projection of attention: the entry at (r, c), counted from 1, is
    ((2 r + 3 c + offset) mod 5 − 2)/2, one of −1, −0.5, 0, 0.5, 1."""
    row, col = np.indices(shape) + 1
    return ((2 * row + 3 * col + offset) % 5 - 2) / 2


#: The column multipliers of a layer's first, second, ... matrix (each prime to 9)
_COLUMN_STEPS = (5, 4, 7, 2)


def _matrix_values(shape: tuple[int, ...], l: int, k: int = 0) -> np.ndarray:
    """Small distinct tenths for the k-th matrix of layer l (or a tensor of more axes): the
    entry at indices (r, c1, c2, ...) counted from 1 is ((2 r + m c + l) mod 9 − 4)/10 with
    c = c1 + 4 (c2 + ...) and m = _COLUMN_STEPS[k]; all entries at once (an MNIST layer has
    100 000). A row's entries sum to about 0 and repeat every 9, a period prime to that of
    the default inputs (11), so that wide layers' sums stay small; rows repeat every 9 and
    biases every 5, so two units of a layer have the same weights and bias only 45 or more
    apart (an LSTM's input and output gates, 3n rows apart, only where 15 divides n); a
    layer's two matrices of one shape (an rnn's W_x and W_h) differ, not one a shift of the
    other, as the column step m differs."""
    index = np.indices(shape) + 1
    row, col = index[0], index[1:].sum(axis=0) + 3 * index[2:].sum(axis=0)
    return ((2 * row + _COLUMN_STEPS[k % len(_COLUMN_STEPS)] * col + l) % 9 - 4) / 10


def _kernel_values(shape: tuple[int, ...], l: int) -> np.ndarray:
    """Small distinct tenths for a convolution's kernels, different in every channel: the
    entry at position n (row-major, from 1) is ((7 n + l) mod 17 − 8)/10."""
    n = np.arange(1, int(np.prod(shape)) + 1).reshape(shape)
    return ((7 * n + l) % 17 - 8) / 10


def example_inputs(spec: NetworkSpec
                   ) -> tuple[Vector, Vector, dict[str, tuple], tuple[str, ...]]:
    """x, y and the parameters of the worked example, and which of the spec's example fields
    (EXAMPLE_FIELDS) the spec gave; default_values for the rest."""
    x, y, params = default_values(spec)
    example = spec.example
    if example is None:
        return x, y, params, ()
    return (example.x if example.x is not None else x,
            example.y if example.y is not None else y,
            {**params, **dict(example.params)}, example.given)


def small_copy(spec: NetworkSpec, steps: int = SMALL_STEPS, width: int = SMALL_WIDTH
               ) -> NetworkSpec:
    """``spec`` with at most ``steps`` time steps and every width that an op chooses (a
    ``size``), the input's too, at most ``width``: the same graph, ops, activations and loss
    (the widths of the other ops follow from what they read). ``spec`` itself where nothing
    is larger, or where it is not a sequence network or gives its own example."""
    if not spec.sequence or spec.image is not None or spec.example is not None:
        return spec
    length = min(spec.length, steps)
    shapes: list[tuple[int, ...]] = [(length, min(spec.input, width))]
    for l, layer in enumerate(spec.layers, start=1):
        definition = OPS[layer.op]
        chooses = any(attribute.kind == "size" for attribute in definition.attributes)
        attrs = {**layer_attributes(layer),
                 "size": min(layer.size, width) if chooses else layer.size}
        reads = layer.reads(l)
        if definition.output_shape is not None:
            shapes.append(tuple(definition.output_shape(attrs, shapes[reads[0]])))
        else:
            size = definition.output_size(attrs, tuple(shapes[n][-1] for n in reads))
            steps_of = shapes[reads[0]][:1] if len(shapes[reads[0]]) == 2 else ()
            shapes.append((*steps_of, size))
    if shapes == list(spec.shapes):
        return spec
    layers = tuple(dataclasses.replace(layer, size=shape[-1],
                                       length=shape[0] if len(shape) == 2 else None)
                   for layer, shape in zip(spec.layers, shapes[1:]))
    return dataclasses.replace(spec, input=shapes[0][-1], layers=layers, length=length)


# --- NumPy evaluation of index expressions ----------------------------------------------------


class _Labeled(NamedTuple):
    """An array whose axes are the index symbols ``labels`` (a scalar has none)."""

    array: np.ndarray
    labels: tuple[sp.Symbol, ...]


def _align(items: list[_Labeled]) -> tuple[list[np.ndarray], tuple[sp.Symbol, ...]]:
    """The arrays of ``items`` arranged to broadcast against each other by index."""
    labels: list[sp.Symbol] = []
    for item in items:
        labels.extend(label for label in item.labels if label not in labels)
    out = []
    for array, own in items:
        array = np.asarray(array)
        if own:
            order = sorted(range(len(own)), key=lambda axis: labels.index(own[axis]))
            array = np.transpose(array, order)
            ordered = [own[axis] for axis in order]
            shape = [array.shape[ordered.index(label)] if label in own else 1
                     for label in labels]
            array = array.reshape(shape)
        out.append(array)
    return out, tuple(labels)


def _stable_sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


#: Elementwise functions, by SymPy class.
_FUNCTIONS: Mapping[type, Callable[[np.ndarray], np.ndarray]] = {
    sp.exp: np.exp, sp.log: np.log, sp.tanh: np.tanh, sp.sinh: np.sinh, sp.cosh: np.cosh,
    sp.sin: np.sin, sp.cos: np.cos, sp.Abs: np.abs, sp.sign: np.sign,
    sp.erf: np.vectorize(math.erf, otypes=[np.float64]),
    sigmoid: _stable_sigmoid, softplus: lambda x: np.logaddexp(0.0, x),
}
_RELATIONS = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le,
              "==": operator.eq, "!=": operator.ne}


@cache
def _fallback(func: type) -> Callable[[np.ndarray], np.ndarray]:
    """Any other elementwise function of one argument, through the math module."""
    x = sp.Dummy("x", real=True)
    scalar = sp.lambdify(x, elementary(func(x)), modules="math")
    return np.vectorize(scalar, otypes=[np.float64])


class Evaluator:
    """Evaluates index-form expressions with NumPy, from the values of tensors known so far.

    ``values`` maps each :class:`NetTensor` (quantities, parameters, δ^l, adjoints ∂C/∂q as
    ``NetTensor("grad", ...)``) to its array, indexed from 0 (the notation counts from 1).
    """

    def __init__(self, widths: Mapping[sp.Symbol, int]) -> None:
        self.widths = {symbol: int(n) for symbol, n in widths.items()}
        self._numbers = {symbol: sp.Integer(n) for symbol, n in self.widths.items()}
        self._numbered: dict[sp.Expr, sp.Expr] = {}
        self._fixed: dict[sp.Symbol, sp.Integer] = {}
        self.values: dict[NetTensor, np.ndarray] = {}

    def __call__(self, expr: sp.Expr, indices: tuple[sp.Symbol, ...] = (),
                 shape: tuple[int, ...] = (), fixed: Mapping[sp.Symbol, int] | None = None,
                 ) -> np.ndarray:
        """The value of ``expr`` as an array over its free ``indices`` (of sizes ``shape``:
        the first entries of each, when shorter than the tensors they index); an index of
        ``fixed`` has the value given there (the step t of a recurrence, one at a time)."""
        self._sizes = dict(zip(indices, shape))
        self._free = dict(self._sizes)
        self._fixed = {symbol: sp.Integer(value) for symbol, value in (fixed or {}).items()}
        # the sizes as numbers: an entry at the last step h_{T,j} is at an index, and so is
        # the step of a Kronecker delta δ_{Tt} (once per expression: a recurrence evaluates
        # the same ones at every step)
        expr = sp.sympify(expr)
        if expr not in self._numbered:
            self._numbered[expr] = expr.xreplace(self._numbers)
        expr = self._numbered[expr]
        self._scan(expr)
        array, labels = self._eval(expr)
        array = np.asarray(array, dtype=np.float64)
        extra = [label for label in labels if label not in indices]
        if extra:
            raise ValueError(f"{expr} has free indices {extra} besides {indices}")
        for index in indices:
            if index not in labels:  # constant along this index
                array = array[..., np.newaxis]
                labels = (*labels, index)
        if indices:
            array = np.transpose(array, [labels.index(index) for index in indices])
        return np.broadcast_to(array, shape).copy()

    # -- the sizes of indices, for Kronecker deltas and missing axes --

    def _scan(self, expr: sp.Expr) -> None:
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Indexed):
                tensor = tensor_of(node)
                if tensor is not None and tensor in self.values:
                    for axis, index in enumerate(node.indices):
                        if isinstance(index, sp.Symbol):
                            self._sizes.setdefault(index, self.values[tensor].shape[axis])
            elif isinstance(node, sp.Sum | WindowMax):
                for index, _low, high in node.limits:
                    self._sizes.setdefault(index, self._int(high))

    def _int(self, expr: sp.Expr) -> int:
        return int(sp.sympify(expr).xreplace(self.widths))

    def size(self, expr: sp.Expr) -> int:
        """The value of a size expression (n_l, H_l, a kernel's 3)."""
        return self._int(expr)

    # -- evaluation --

    def _lookup(self, tensor: NetTensor) -> np.ndarray:
        if tensor not in self.values:
            raise ValueError(f"no value for {tensor} yet")
        return self.values[tensor]

    def _indexed(self, array: np.ndarray, indices: tuple[sp.Expr, ...]) -> _Labeled:
        if self._fixed:
            indices = tuple(index.xreplace(self._fixed) if index.free_symbols & set(self._fixed)
                            else index for index in indices)
        if any(index.is_Integer and not 1 <= int(index) <= n
               for index, n in zip(indices, np.shape(array))):
            # a step outside the sequence (h_0 before the first step, δ_{T+1} after the
            # last): the entry is 0
            inside = tuple(sp.Integer(1) if index.is_Integer else index for index in indices)
            found = self._indexed(array, inside)
            return _Labeled(np.zeros_like(found.array), found.labels)
        if not all(index.is_Integer or isinstance(index, sp.Symbol) for index in indices) or \
                any(self._free.get(index, 0) > n for index, n in zip(indices, np.shape(array))):
            # an index expression, or a free index longer than the axis (i_{tj} of an LSTM's
            # gate in its stacked error, j = 1..4n): the entries reached, 0 outside the array
            return self._gathered(array, indices)
        labels: list[sp.Symbol] = []
        selection: list[object] = []
        for index in indices:
            if index.is_Integer:
                selection.append(int(index) - 1)
            elif isinstance(index, sp.Symbol):
                if index in labels:
                    raise ValueError(f"repeated index {index} in one entry")
                labels.append(index)
                selection.append(slice(None, self._free.get(index)))
            else:
                raise ValueError(f"cannot evaluate the index {index}")
        return _Labeled(array[tuple(selection)], tuple(labels))

    def _index_value(self, e: sp.Expr) -> _Labeled:
        """An index expression as an integer array over its index symbols (values from 1)."""
        if e.is_Integer:
            return _Labeled(np.int64(int(e)), ())
        if isinstance(e, sp.Symbol):
            if e in self.widths:
                return _Labeled(np.int64(self.widths[e]), ())
            if e in self._fixed:
                return _Labeled(np.int64(int(self._fixed[e])), ())
            size = self._free.get(e) or self._sizes.get(e)
            if size is None:
                raise ValueError(f"no range for the index {e}")
            return _Labeled(np.arange(1, size + 1), (e,))
        if isinstance(e, sp.Add | sp.Mul):
            arrays, labels = _align([self._index_value(arg) for arg in e.args])
            combine = np.add if isinstance(e, sp.Add) else np.multiply
            return _Labeled(combine.reduce(np.broadcast_arrays(*arrays)), labels)
        raise ValueError(f"cannot evaluate the index {e}")

    def index_values(self, expr: sp.Expr, indices: tuple[sp.Symbol, ...],
                     shape: tuple[int, ...]) -> np.ndarray:
        """The values (from 1) of the index expression ``expr`` over ``indices``."""
        self._sizes = dict(zip(indices, shape))
        self._free = dict(self._sizes)
        self._fixed = {}
        array, labels = self._index_value(sp.sympify(expr))
        full = [a for a in indices if a not in labels]
        array = np.asarray(array).reshape(np.shape(array) + (1,) * len(full))
        order = [(*labels, *full).index(a) for a in indices]
        return np.broadcast_to(np.transpose(array, order), shape).copy()

    def _gathered(self, array: np.ndarray, indices: tuple[sp.Expr, ...]) -> _Labeled:
        """An entry at index expressions (x_{k, 2r+p-3, ...}): the entries they reach, 0 where
        one falls outside its axis (the padding)."""
        positions, labels = _align([self._index_value(index) for index in indices])
        positions = np.broadcast_arrays(*positions)
        inside = np.ones(positions[0].shape, dtype=bool)
        for axis, position in enumerate(positions):
            inside &= (position >= 1) & (position <= array.shape[axis])
        clipped = tuple(np.clip(position, 1, array.shape[axis]) - 1
                        for axis, position in enumerate(positions))
        return _Labeled(np.where(inside, array[clipped], 0.0), labels)

    def _window(self, window: WindowMax) -> tuple[np.ndarray, tuple[sp.Symbol, ...],
                                                  list[int]]:
        """The entries of each window, the window's offsets on the last two axes (their
        lower limits too)."""
        offsets = [sp.Dummy(str(limit[0]), integer=True) for limit in window.limits]
        renamed = window.xreplace(dict(zip([limit[0] for limit in window.limits], offsets)))
        lows = []
        for offset, (_index, low, high) in zip(offsets, renamed.limits):
            self._sizes[offset] = self._int(high)
            lows.append(self._int(low))
        array, labels = self._eval(renamed.function)
        for offset in offsets:
            if offset not in labels:          # a window constant along an offset
                array, labels = np.asarray(array)[..., np.newaxis], (*labels, offset)
        order = [n for n, label in enumerate(labels) if label not in offsets] + [
            labels.index(offset) for offset in offsets]
        array = np.transpose(array, order)
        rest = tuple(labels[n] for n in order[:-len(offsets)])
        slices = tuple(slice(low - 1, None) for low in lows)
        return array[(..., *slices)], rest, lows

    def _window_max(self, e: WindowMax) -> _Labeled:
        array, labels, _lows = self._window(e)
        return _Labeled(array.max(axis=(-2, -1)), labels)

    def _first_max(self, e: FirstMax) -> _Labeled:
        """1 where offsets (p, q) are the window's first maximum in row-major order, else 0."""
        window, p, q = e.args
        array, labels, (low_p, low_q) = self._window(window)
        columns = array.shape[-1]
        first = np.argmax(array.reshape(*array.shape[:-2], -1), axis=-1)  # the first maximum
        items = [_Labeled(first // columns + low_p, labels), _Labeled(first % columns + low_q,
                                                                       labels),
                 self._index_value(p), self._index_value(q)]
        (best_p, best_q, at_p, at_q), labels = _align(items)
        return _Labeled(((best_p == at_p) & (best_q == at_q)).astype(np.float64), labels)

    def _in_range(self, e: InRange) -> _Labeled:
        (value, low, high), labels = _align([self._index_value(arg) for arg in e.args])
        return _Labeled(((low <= value) & (value <= high)).astype(np.float64), labels)

    def _eval(self, e: sp.Basic) -> _Labeled:
        if isinstance(e, NetTensor):
            return _Labeled(self._lookup(e), ())
        if e.is_Number or isinstance(e, sp.NumberSymbol):
            return _Labeled(np.float64(float(e)), ())
        if e is sp.true or e is sp.false:
            return _Labeled(np.bool_(bool(e)), ())
        if isinstance(e, sp.Symbol):
            if e in self.widths:
                return _Labeled(np.float64(self.widths[e]), ())
            if e in self._fixed:
                return _Labeled(np.float64(int(self._fixed[e])), ())
            raise ValueError(f"no value for the symbol {e}")
        if isinstance(e, sp.Indexed):
            return self._indexed(self._lookup(tensor_of(e)), e.indices)
        if isinstance(e, sp.Derivative):
            (variable, count), = e.variable_count
            quantity = tensor_of(variable)
            if e.expr != C or count != 1 or quantity is None:
                raise ValueError(f"cannot evaluate {e}: only derivatives of the cost are known")
            array = self._lookup(adjoint_tensor(quantity))
            if isinstance(variable, sp.Indexed):
                return self._indexed(array, variable.indices)
            return _Labeled(array, ())
        if isinstance(e, sp.Add):
            arrays, labels = _align([self._eval(arg) for arg in e.args])
            return _Labeled(sum(arrays[1:], arrays[0]), labels)
        if isinstance(e, sp.Mul):
            arrays, labels = _align([self._eval(arg) for arg in e.args])
            out = arrays[0]
            for array in arrays[1:]:
                out = out * array
            return _Labeled(out, labels)
        if isinstance(e, sp.Pow):
            (base, exponent), labels = _align([self._eval(arg) for arg in e.args])
            return _Labeled(np.power(base, exponent), labels)
        if isinstance(e, sp.Sum):
            return self._sum(e)
        if isinstance(e, sp.KroneckerDelta):
            return self._kronecker(e)
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e)
        if isinstance(e, WindowMax):
            return self._window_max(e)
        if isinstance(e, FirstMax):
            return self._first_max(e)
        if isinstance(e, InRange):
            return self._in_range(e)
        if isinstance(e, sp.core.relational.Relational):
            (lhs, rhs), labels = _align([self._eval(e.lhs), self._eval(e.rhs)])
            return _Labeled(_RELATIONS[e.rel_op](lhs, rhs), labels)
        if isinstance(e, (sp.And, sp.Or)):
            arrays, labels = _align([self._eval(arg) for arg in e.args])
            combine = np.logical_and if isinstance(e, sp.And) else np.logical_or
            return _Labeled(combine.reduce(np.broadcast_arrays(*arrays)), labels)
        if isinstance(e, (sp.Max, sp.Min)):
            arrays, labels = _align([self._eval(arg) for arg in e.args])
            pick = np.maximum if isinstance(e, sp.Max) else np.minimum
            return _Labeled(pick.reduce(np.broadcast_arrays(*arrays)), labels)
        if isinstance(e, sp.Function) and len(e.args) == 1:
            inner = self._eval(e.args[0])
            function = _FUNCTIONS.get(type(e)) or _fallback(type(e))
            return _Labeled(function(np.asarray(inner.array, dtype=np.float64)), inner.labels)
        raise ValueError(f"cannot evaluate {e}")

    def _sum(self, e: sp.Sum) -> _Labeled:
        array, labels = self._eval(e.function)
        for index, low, high in e.limits:
            low, high = self._int(low), self._int(high)
            if index in labels:
                axis = labels.index(index)
                taken = np.take(array, range(low - 1, high), axis=axis)
                array = taken.sum(axis=axis)
                labels = labels[:axis] + labels[axis + 1:]
            else:
                array = array * (high - low + 1)
        return _Labeled(array, labels)

    def _kronecker(self, e: sp.KroneckerDelta) -> _Labeled:
        first, second = (arg.xreplace(self._fixed) for arg in e.args)
        symbols = [arg for arg in (first, second) if isinstance(arg, sp.Symbol)]
        if not symbols:
            return _Labeled(np.float64(first == second), ())
        sizes = [self._sizes[s] for s in symbols]
        if len(symbols) == 2:
            return _Labeled(np.eye(sizes[0], sizes[1]), tuple(symbols))
        constant = int(second if first in symbols else first)
        return _Labeled(np.eye(sizes[0])[constant - 1], tuple(symbols))

    def _piecewise(self, e: sp.Piecewise) -> _Labeled:
        items = []
        for value, condition in e.args:
            items += [self._eval(value), self._eval(condition)]
        arrays, labels = _align(items)
        arrays = np.broadcast_arrays(*arrays)
        values, conditions = arrays[0::2], [a.astype(bool) for a in arrays[1::2]]
        return _Labeled(np.select(conditions, values, default=np.nan), labels)


# --- the example ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class WorkedExample:
    """One sample's forward and backward pass.

    ``parameters`` maps each key (``W1``, ``b1``, ``gamma3``) to its array; ``forward`` holds
    every forward quantity in evaluation order; ``backward`` every formula of the derivation
    with its value, in the derivation's order (a weight matrix's gradient: the block a document
    shows, when made with ``shown``); ``penalties`` ∂R/∂w of the weights with one.
    """

    x: np.ndarray
    y: np.ndarray
    parameters: Mapping[str, np.ndarray]
    masks: tuple[tuple[NetTensor, np.ndarray], ...]
    forward: tuple[tuple[NetTensor, np.ndarray], ...]
    loss: float
    penalty: float
    backward: tuple[tuple[Formula, np.ndarray], ...]
    penalties: tuple[tuple[Formula, np.ndarray], ...]
    #: which of EXAMPLE_FIELDS the spec gave: all, none, or some (the rest default_values)
    given: tuple[str, ...]
    values: Mapping[NetTensor, np.ndarray]
    #: for each max-pooling layer, the indicator of its windows' first maxima summed over
    #: the windows, on its input's grid: where its errors go
    indicators: tuple[tuple[int, np.ndarray], ...] = ()
    #: for each parameter gradient that sums over the time steps, the terms of that sum: one
    #: array per step (axis 0 is t), of the shape of the gradient (the block shown)
    step_terms: tuple[tuple[Formula, np.ndarray], ...] = ()
    #: the spec whose numbers these are (a small copy of the derivation's: ``small``) and the
    #: value of every size symbol (n_l, T) in it
    spec: NetworkSpec | None = None
    widths: Mapping[sp.Symbol, int] = dataclasses.field(default_factory=dict)

    @property
    def small(self) -> bool:
        """Whether the example runs a small copy of the network (fewer steps, narrower)."""
        return self.spec is not None and self.spec.shapes != self.derived_shapes

    #: the shapes of the network that was derived (``small`` compares them)
    derived_shapes: tuple[tuple[int, ...], ...] = ()

    def value(self, tensor: NetTensor) -> np.ndarray:
        """The value of a quantity, parameter, δ^l or adjoint (``NetTensor("grad", ...)``)."""
        return self.values[tensor]

    def of(self, formula: Formula) -> np.ndarray:
        """The value of ``formula``."""
        for candidate, value in self.backward:
            if candidate is formula:
                return value
        raise KeyError(formula.key)

    def terms_of(self, formula: Formula) -> np.ndarray | None:
        """The terms of ``formula``'s sum over the time steps, one per step (or None)."""
        for candidate, value in self.step_terms:
            if candidate is formula:
                return value
        return None

    def params(self) -> dict[str, list]:
        """The parameters as nested lists, keyed as in a generated module."""
        return {key: value.tolist() for key, value in self.parameters.items()}

    def gradients(self, *, penalty: bool = True) -> dict[str, np.ndarray]:
        """The gradient of every parameter for this one-sample batch: ∂C/∂P, plus ∂R/∂P with
        ``penalty`` (the gradient of the batch objective J for B = 1)."""
        extra = {formula.of: value for formula, value in self.penalties}
        out = {}
        for formula, value in self.backward:
            if formula.kind == "gradient":
                key = parameter_key(formula.of.role, formula.of.node)
                total = value + extra[formula.of] if penalty and formula.of in extra else value
                out[key] = total
        return out

    def inside(self, expr: sp.Indexed) -> bool:
        """Whether an entry with integer indices (from 1) lies inside its array; one outside,
        in a feature map's padding, is 0."""
        tensor = tensor_of(expr)
        if tensor is None or tensor not in self.values:
            return True
        shape = np.shape(self.values[tensor])
        return all(not i.is_Integer or 1 <= int(i) <= n for i, n in zip(expr.indices, shape))

    def lookup(self, expr: sp.Expr) -> float:
        """The value of one entry: ``q[1, 2]`` (indices from 1), a per-sample scalar, or
        ``∂C/∂q[1]``."""
        if isinstance(expr, sp.Derivative):
            (variable, _count), = expr.variable_count
            array = self.values[adjoint_tensor(tensor_of(variable))]
            expr = variable
        elif isinstance(expr, NetTensor):
            return float(self.values[expr])
        else:
            array = self.values[tensor_of(expr)]
        if isinstance(expr, sp.Indexed):
            return float(array[tuple(int(i) - 1 for i in expr.indices)])
        return float(array)


def _inputs_of(model: Model) -> list[NetTensor]:
    """Quantities the forward equations read that no equation defines and that are neither
    parameters nor the input: the dropout masks."""
    defined = {eq.target for eq in model.equations}
    parameters = {p.tensor for p in model.parameters}
    out: list[NetTensor] = []
    for eq in model.equations:
        for atom in sp.preorder_traversal(eq.expr):
            tensor = tensor_of(atom) if isinstance(atom, (sp.Indexed, NetTensor)) else None
            if tensor is None or tensor in defined or tensor in parameters or tensor in out:
                continue
            if tensor == model.x.label:
                continue
            out.append(tensor)
    return out


def worked_example(derivation: Derivation, *, shown: Callable[[int], int] | None = None,
                   small: bool = False) -> WorkedExample:
    """The forward and backward pass of the spec's example (or the default values).

    ``shown(n)`` is how many entries of an axis of length n a document prints: the gradient of
    a weight matrix, which no other formula reads, is then computed for the entries printed
    only (its top-left block), not for every weight of a wide layer. Without it, everything.
    With ``small``, a network with attention whose spec gives no example runs its
    :func:`small_copy`: the derivation's formulas evaluated with fewer steps and widths.
    """
    model = derivation.model
    derived_shapes = model.spec.shapes
    if small and model.reads_whole_sequences:
        copy = small_copy(model.spec)
        if copy is not model.spec:
            model = build_model(copy)
    spec = model.spec
    x, y, params, given = example_inputs(spec)
    evaluate = Evaluator(model.widths)
    evaluate.values[model.x.label] = np.asarray(x, dtype=np.float64).reshape(
        spec.input_shape)
    evaluate.values[model.y.label] = np.asarray(y, dtype=np.float64).reshape(
        spec.shapes[-1])
    parameters = {}
    for parameter in model.parameters:
        value = np.asarray(params[parameter.key], dtype=np.float64).reshape(parameter.shape)
        parameters[parameter.key] = value
        evaluate.values[parameter.tensor] = value
    masks = []
    for tensor in _inputs_of(model):
        if tensor.role != "mask":
            raise ValueError(f"the worked example has no value for {tensor}")
        node = model.node(tensor.node)
        masks.append((tensor, np.ones(node.dims if tensor.rank == len(node.dims)
                                      else (node.width,) * tensor.rank)))
        evaluate.values[tensor] = masks[-1][1]
    forward = []
    for node in model.nodes:
        timed = recurrent_equations(node)
        if timed:
            _forward_steps(evaluate, timed, node)
        for eq in node.equations:
            if eq in timed:
                forward.append((eq.target, evaluate.values[eq.target]))
                continue
            shape = _shape(evaluate, eq, node)
            value = evaluate(eq.expr, eq.indices, shape)
            if eq.at is not None:     # a flatten: each value placed at the target's entry
                placed = np.zeros(node.dims)
                at = tuple(evaluate.index_values(e, eq.indices, shape) - 1 for e in eq.at)
                placed[at] = value
                value = placed
            evaluate.values[eq.target] = value
            forward.append((eq.target, value))
    loss = float(evaluate(model.cost))
    penalty = float(evaluate(model.penalty)) if model.penalty != 0 else 0.0
    backward, penalties, step_terms = [], [], []
    recurrent = {node.index for node in model.nodes if recurrent_equations(node)}
    done: dict[int, np.ndarray] = {}          # id(formula) -> value, of the stepped ones
    for formula in derivation.formulas:
        if id(formula) not in done and formula.node in recurrent and _timed(formula):
            # the errors of a recurrence through time: step by step, from T down to 1
            done.update(_backward_steps(evaluate, [f for f in derivation.formulas
                                                   if f.node == formula.node and _timed(f)]))
        shape = evaluate.values[formula.of].shape
        if shown is not None and formula.kind == "gradient" and formula.of.rank >= 2:
            shape = tuple(shown(n) for n in shape)
        if id(formula) in done:
            value = done[id(formula)]
        else:
            value = evaluate(formula.rhs, formula.indices, shape)
            terms = _step_terms(evaluate, formula, shape)
            if terms is not None:
                step_terms.append((formula, terms))
        backward.append((formula, value))
        evaluate.values[formula.target] = value
        evaluate.values[adjoint_tensor(formula.of)] = value
        if formula.penalty != 0:
            penalties.append((formula, evaluate(formula.penalty, formula.indices, shape)))
    return WorkedExample(
        x=evaluate.values[model.x.label], y=evaluate.values[model.y.label],
        parameters=parameters, masks=tuple(masks), forward=tuple(forward), loss=loss,
        penalty=penalty, backward=tuple(backward), penalties=tuple(penalties), given=given,
        values=dict(evaluate.values), indicators=_indicators(derivation, evaluate),
        step_terms=tuple(step_terms), spec=spec, widths=dict(model.widths),
        derived_shapes=derived_shapes)


def _shape(evaluate: Evaluator, eq: Equation, node: Node) -> tuple[int, ...]:
    return tuple(evaluate.size(r) for r in eq.ranges) if eq.ranges else (
        (node.width,) * len(eq.indices))


def recurrent_equations(node: Node) -> tuple[Equation, ...]:
    """The equations of a recurrent layer that run step by step (their first index is the
    time step, and one of them reads what one of them computes: h_{t-1}); () for a layer
    that is not recurrent."""
    timed = tuple(eq for eq in node.equations
                  if eq.indices and index_family(eq.indices[0]) == "time")
    targets = {eq.target for eq in timed}
    if any(tensor_of(found) in targets and shifted_step(found.indices[0], eq.indices[0])
           for eq in timed for found in eq.expr.atoms(sp.Indexed)):
        return timed
    return ()


def shifted_step(position: sp.Expr, time: sp.Symbol) -> bool:
    """Whether an entry's step ``position`` is the step ``time`` shifted by a constant
    (h_{t-1}): a recurrence. An entry at another time index (k_{τj} read by attention's
    scores s_{tτ}, every step at once) is not one."""
    shift = sp.expand(position - time)
    return shift.is_Integer and shift != 0


def _forward_steps(evaluate: Evaluator, timed: tuple[Equation, ...], node: Node) -> None:
    """A recurrent layer's equations, step by step: at each step t = 1..T every equation in
    order, each entry at step 0 reading 0 (h_0 = 0)."""
    length = evaluate.size(LENGTH)
    for eq in timed:
        evaluate.values[eq.target] = np.full(_shape(evaluate, eq, node), np.nan)
    for step in range(1, length + 1):
        for eq in timed:
            time, *rest = eq.indices
            shape = _shape(evaluate, eq, node)[1:]
            value = evaluate(eq.expr, tuple(rest), shape, fixed={time: step})
            evaluate.values[eq.target][step - 1] = value


def _timed(formula: Formula) -> bool:
    return bool(formula.indices) and index_family(formula.indices[0]) == "time"


def _backward_steps(evaluate: Evaluator, formulas: list[Formula]) -> dict[int, np.ndarray]:
    """The formulas of a recurrent layer with the step t free, from t = T down to 1: each
    step's entries read those of the step after (0 past the last step). Within a step the
    formulas are taken in the derivation's order; one that reads an entry of its step not yet
    computed waits for it (a NaN in its result), and the others are tried again."""
    length = evaluate.size(LENGTH)
    arrays = {}
    for formula in formulas:
        array = np.full(evaluate.values[formula.of].shape, np.nan)
        arrays[id(formula)] = array
        evaluate.values[formula.target] = array
        evaluate.values[adjoint_tensor(formula.of)] = array
    for step in range(length, 0, -1):
        waiting = list(formulas)
        while waiting:
            left = []
            for formula in waiting:
                time, *rest = formula.indices
                shape = evaluate.values[formula.of].shape[1:]
                value = evaluate(formula.rhs, tuple(rest), shape, fixed={time: step})
                if np.isnan(value).any():
                    left.append(formula)
                else:
                    arrays[id(formula)][step - 1] = value
            if len(left) == len(waiting):
                raise ValueError(f"the errors of step {step} read values no formula computes: "
                                 f"{', '.join(f.key for f in left)}")
            waiting = left
    return arrays


def _step_terms(evaluate: Evaluator, formula: Formula, shape: tuple[int, ...]
                ) -> np.ndarray | None:
    """The terms, one per step, of a gradient that is a sum over the time steps."""
    total = formula.rhs
    if formula.kind != "gradient" or not isinstance(total, sp.Sum) or len(total.limits) != 1:
        return None
    (time, low, high), = total.limits
    if index_family(time) != "time" or (low, high) != (1, LENGTH):
        return None
    return evaluate(total.function, (time, *formula.indices),
                    (evaluate.size(LENGTH), *shape))


def _indicators(derivation: Derivation, evaluate: Evaluator
                ) -> tuple[tuple[int, np.ndarray], ...]:
    """For each max-pooling layer n, the part of the derived error of its input that routes
    the errors of n (the outermost sum holding the indicator of a window's first maximum),
    with every error of n set to 1: on the input's grid, how many windows take their
    maximum at each entry (1 or 0 when the windows do not overlap)."""
    out = []
    for node in derivation.model.nodes:
        if node.op.name != "max_pool2d":
            continue
        source = node.inputs[0]

        def upstream(e: sp.Basic, node: Node = node) -> bool:
            if isinstance(e, sp.Derivative) and e.expr == C:
                tensor = tensor_of(e.variable_count[0][0])
            elif isinstance(e, sp.Indexed):
                tensor = tensor_of(e)
            else:
                return False
            target = tensor.target if tensor is not None and tensor.role == "grad" else tensor
            return target is not None and target.node == node.index and (
                tensor.role in ("delta", "grad") or isinstance(e, sp.Derivative))

        for formula in derivation.formulas:
            if formula.node != source or not formula.rhs.has(FirstMax):
                continue
            sums = [s for s in formula.rhs.atoms(sp.Sum) if s.has(FirstMax)]
            outer = [s for s in sums if not any(s != t and t.has(s) for t in sums)]
            if len(outer) != 1:
                continue
            routing = outer[0].replace(upstream, lambda e: sp.Integer(1))
            shape = evaluate.values[formula.of].shape
            out.append((node.index, evaluate(routing, formula.indices, shape)))
            break
    return tuple(out)
