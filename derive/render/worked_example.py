"""The worked numeric example: one forward and backward pass, by evaluating the Derivation.

Takes a :class:`~derive.derivation.Derivation` and gives a :class:`WorkedExample`: the value
of every forward quantity of every node (z^l, a^l, μ^l, σ²^l, x̂^l, ...), the cost C, the
penalty R, and the value of every derived formula (the loss gradient, every δ^l, every adjoint
and every parameter gradient, with ∂R/∂w where there is a penalty) for one input sample.

Nothing is typed in: the forward values come from the nodes' own index-form equations
(``Node.equations``, ``Model.cost``, ``Model.penalty``) and the backward values from the
derived formulas (``Formula.rhs``, ``Formula.penalty``), each evaluated with NumPy over its
free indices (an index is an array axis, a sum over an index sums that axis). So the numbers a
student checks by hand are the numbers of the formulas printed above them. Nothing is
substituted symbolically, and a document computes only what it prints: a wide layer's weight
gradient only for the rows and columns shown (``worked_example(..., shown=...)``).

The input, target and parameters come from the spec's ``example:`` section when it has one
(:class:`~derive.spec.ExampleSpec`: ``x``, ``y``, ``params`` W1, b1, gamma2, ...); otherwise
:func:`default_values` picks short round values. A dropout mask is 1 everywhere: the example
runs with dropout off, as the generated code's ``gradients()`` does.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
import sympy as sp

from derive.derivation.reverse import C, Derivation, Formula, adjoint_tensor
from derive.graph.model import Model
from derive.quantities import NetTensor, tensor_of
from derive.registry.functions import elementary, sigmoid, softplus
from derive.registry.ops import OPS
from derive.spec.load import NetworkSpec, layer_attributes, parameter_key

Vector = tuple[float, ...]


# --- the values of the example ---------------------------------------------------------------


def _tenth(n: int) -> float:
    return n / 10


def default_values(spec: NetworkSpec
                   ) -> tuple[Vector, Vector, dict[str, tuple | np.ndarray]]:
    """Short round values (one decimal) for x, y and the parameters, without randomness.

    The patterns only need to be fixed, varied and small; the target suits the loss: a one-hot
    vector for cross-entropy, 1/0 for outputs in (0, 1), +-0.5 otherwise. A parameter that
    starts at one (a layer norm's scale γ) gets values near one.
    """
    sizes = spec.sizes
    x = tuple(_tenth((7 * n) % 11 - 5) for n in range(1, sizes[0] + 1))
    output = spec.activation(spec.depth)
    n_out = sizes[-1]
    if spec.resolved_loss().needs == "distribution":
        y = tuple(1.0 if n == 0 else 0.0 for n in range(n_out))
    elif output is not None and output.is_probability:
        y = tuple(1.0 if n % 2 == 0 else 0.0 for n in range(n_out))
    else:
        y = tuple(0.5 if n % 2 == 0 else -0.5 for n in range(n_out))
    params: dict[str, tuple | np.ndarray] = {}
    shapes = spec.parameter_shapes()
    for l, layer in enumerate(spec.layers, start=1):
        for parameter in OPS[layer.op].parameters(layer_attributes(layer)):
            key = parameter_key(parameter.role, l)
            shape = shapes[key]
            if len(shape) >= 2:
                params[key] = _matrix_values(shape, l)
            else:
                start = 1.0 if parameter.init == "ones" else 0.0
                params[key] = tuple(start + _tenth((row + l) % 3 - 1)
                                    for row in range(1, shape[0] + 1))
    return x, y, params


def _matrix_values(shape: tuple[int, ...], l: int) -> np.ndarray:
    """Small distinct tenths for a matrix (or a tensor of more axes): the entry at indices
    (r, c1, c2, ...) counted from 1 is ((3 r + 5 c + l) mod 9 − 4)/10 with c = c1 + 4 (c2 +
    ...); all entries at once (an MNIST layer has 100 000)."""
    index = np.indices(shape) + 1
    row, col = index[0], index[1:].sum(axis=0) + 3 * index[2:].sum(axis=0)
    return ((3 * row + 5 * col + l) % 9 - 4) / 10


def example_inputs(spec: NetworkSpec) -> tuple[Vector, Vector, dict[str, tuple], bool]:
    """x, y and the parameters of the worked example, and whether the spec gave any."""
    x, y, params = default_values(spec)
    example = spec.example
    if example is None:
        return x, y, params, False
    given = dict(example.params)
    return (example.x if example.x is not None else x,
            example.y if example.y is not None else y,
            {**params, **given}, True)


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
        self.values: dict[NetTensor, np.ndarray] = {}

    def __call__(self, expr: sp.Expr, indices: tuple[sp.Symbol, ...] = (),
                 shape: tuple[int, ...] = ()) -> np.ndarray:
        """The value of ``expr`` as an array over its free ``indices`` (of sizes ``shape``:
        the first entries of each, when shorter than the tensors they index)."""
        self._sizes = dict(zip(indices, shape))
        self._free = dict(self._sizes)
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
            elif isinstance(node, sp.Sum):
                for index, _low, high in node.limits:
                    self._sizes.setdefault(index, self._int(high))

    def _int(self, expr: sp.Expr) -> int:
        return int(sp.sympify(expr).xreplace(self.widths))

    # -- evaluation --

    def _lookup(self, tensor: NetTensor) -> np.ndarray:
        if tensor not in self.values:
            raise ValueError(f"no value for {tensor} yet")
        return self.values[tensor]

    def _indexed(self, array: np.ndarray, indices: tuple[sp.Expr, ...]) -> _Labeled:
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
        first, second = e.args
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
    given: bool
    values: Mapping[NetTensor, np.ndarray]

    def value(self, tensor: NetTensor) -> np.ndarray:
        """The value of a quantity, parameter, δ^l or adjoint (``NetTensor("grad", ...)``)."""
        return self.values[tensor]

    def of(self, formula: Formula) -> np.ndarray:
        """The value of ``formula``."""
        for candidate, value in self.backward:
            if candidate is formula:
                return value
        raise KeyError(formula.key)

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


def worked_example(derivation: Derivation, *, shown: Callable[[int], int] | None = None
                   ) -> WorkedExample:
    """The forward and backward pass of the spec's example (or the default values).

    ``shown(n)`` is how many entries of an axis of length n a document prints: the gradient of
    a weight matrix, which no other formula reads, is then computed for the entries printed
    only (its top-left block), not for every weight of a wide layer. Without it, everything.
    """
    model = derivation.model
    spec = model.spec
    x, y, params, given = example_inputs(spec)
    evaluate = Evaluator(model.widths)
    evaluate.values[model.x.label] = np.asarray(x, dtype=np.float64)
    evaluate.values[model.y.label] = np.asarray(y, dtype=np.float64)
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
        masks.append((tensor, np.ones((node.width,) * tensor.rank)))
        evaluate.values[tensor] = masks[-1][1]
    forward = []
    for node in model.nodes:
        for eq in node.equations:
            value = evaluate(eq.expr, eq.indices, (node.width,) * len(eq.indices))
            evaluate.values[eq.target] = value
            forward.append((eq.target, value))
    loss = float(evaluate(model.cost))
    penalty = float(evaluate(model.penalty)) if model.penalty != 0 else 0.0
    backward, penalties = [], []
    for formula in derivation.formulas:
        shape = evaluate.values[formula.of].shape
        if shown is not None and formula.kind == "gradient" and formula.of.rank >= 2:
            shape = tuple(shown(n) for n in shape)
        value = evaluate(formula.rhs, formula.indices, shape)
        backward.append((formula, value))
        evaluate.values[formula.target] = value
        evaluate.values[adjoint_tensor(formula.of)] = value
        if formula.penalty != 0:
            penalties.append((formula, evaluate(formula.penalty, formula.indices, shape)))
    return WorkedExample(
        x=evaluate.values[model.x.label], y=evaluate.values[model.y.label],
        parameters=parameters, masks=tuple(masks), forward=tuple(forward), loss=loss,
        penalty=penalty, backward=tuple(backward), penalties=tuple(penalties), given=given,
        values=dict(evaluate.values))
