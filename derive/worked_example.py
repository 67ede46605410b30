"""The worked numeric example: one forward and backward pass, by evaluating the Derivation.

Takes a :class:`~derive.derivation.Derivation` and gives a :class:`WorkedExample` with every
z^l_j, a^l_j, the loss C, every delta^l_j and the gradients dC/dw^l_{jk}, dC/db^l_j for one
input sample. Nothing is typed in: the forward values come from the model's expressions
(``LayerModel.z_expr``, ``a_expr``, ``Model.cost``) and the backward values from the derived
formulas (``Formula.rhs`` of BP1..BP4), each with its indices and the layer sizes set to
numbers and the values computed so far substituted. So the numbers a student checks by hand
are the numbers of the formulas printed above them.

The input, target and parameters come from the spec's ``example:`` section when it has one
(:class:`~derive.spec.ExampleSpec`: ``x``, ``y``, ``params`` W1 (n_1 x n_0), b1, ...);
otherwise :func:`default_values` picks short round values.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from derive.derivation import Derivation, Formula
from derive.functions import elementary
from derive.model import j, k
from derive.spec import NetworkSpec

Vector = tuple[float, ...]
Matrix = tuple[Vector, ...]


@dataclass(frozen=True)
class WorkedExample:
    """One sample's forward and backward pass; lists are indexed by layer - 1."""

    x: Vector
    y: Vector
    weights: tuple[Matrix, ...]          # W^l, n_l x n_{l-1}
    biases: tuple[Vector | None, ...]    # b^l, or None for a layer without bias
    z: tuple[Vector, ...]
    a: tuple[Vector, ...]                # a^l, l = 1..L (a^0 is x)
    loss: float
    delta: tuple[Vector, ...]
    weight_gradients: tuple[Matrix, ...]
    bias_gradients: tuple[Vector | None, ...]
    given: bool                          # taken from the spec's example section

    def params(self) -> dict[str, list]:
        """The parameters in the layout of a generated module: W1, b1, W2, ..."""
        out: dict[str, list] = {}
        for l, (w, b) in enumerate(zip(self.weights, self.biases), start=1):
            out[f"W{l}"] = [list(row) for row in w]
            if b is not None:
                out[f"b{l}"] = list(b)
        return out


def default_values(spec: NetworkSpec) -> tuple[Vector, Vector, dict[str, tuple]]:
    """Short round values (one decimal) for x, y and the parameters, without randomness.

    The patterns only need to be fixed, varied and small; the target suits the loss: a one-hot
    vector for cross-entropy, 1/0 for outputs in (0, 1), +-0.5 otherwise.
    """
    sizes = spec.sizes
    x = tuple(_tenth((7 * n) % 11 - 5) for n in range(1, sizes[0] + 1))
    output = spec.activation(spec.depth)
    n_out = sizes[-1]
    if spec.resolved_loss().needs == "distribution":
        y = tuple(1.0 if n == 0 else 0.0 for n in range(n_out))
    elif output.is_probability:
        y = tuple(1.0 if n % 2 == 0 else 0.0 for n in range(n_out))
    else:
        y = tuple(0.5 if n % 2 == 0 else -0.5 for n in range(n_out))
    params: dict[str, tuple] = {}
    for l, layer in enumerate(spec.layers, start=1):
        params[f"W{l}"] = tuple(
            tuple(_tenth((3 * row + 5 * col + l) % 9 - 4) for col in range(1, sizes[l - 1] + 1))
            for row in range(1, layer.size + 1))
        if layer.bias:
            params[f"b{l}"] = tuple(_tenth((row + l) % 3 - 1) for row in range(1, layer.size + 1))
    return x, y, params


def _tenth(n: int) -> float:
    return n / 10


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


class _Evaluator:
    """Evaluates index expressions at concrete indices with the values known so far."""

    def __init__(self, derivation: Derivation) -> None:
        model = derivation.model
        self.sizes = {symbol: sp.Integer(n) for symbol, n in zip(model.sizes, model.spec.sizes)}
        self.values: dict[sp.Expr, sp.Float] = {}

    def set(self, base: sp.IndexedBase, values: tuple, dims: int = 1) -> None:
        if dims == 1:
            for n, value in enumerate(values, start=1):
                self.values[base[n]] = sp.Float(value, 30)
        else:
            for r, row in enumerate(values, start=1):
                for c, value in enumerate(row, start=1):
                    self.values[base[r, c]] = sp.Float(value, 30)

    def __call__(self, expr: sp.Expr, **indices: int) -> float:
        concrete = expr.xreplace({**self.sizes, **{_INDEX[name]: sp.Integer(value)
                                                   for name, value in indices.items()}})
        concrete = elementary(concrete.doit()).xreplace(self.values)
        value = sp.N(concrete, 30)
        if not value.is_Number:
            raise ValueError(f"could not evaluate {expr} at {indices}: left {value}")
        return float(value)


_INDEX = {"j": j, "k": k}


def worked_example(derivation: Derivation) -> WorkedExample:
    """The forward and backward pass of the spec's example (or the default values)."""
    model = derivation.model
    spec = model.spec
    x, y, params, given = example_inputs(spec)
    evaluate = _Evaluator(derivation)
    evaluate.set(model.x, x)
    evaluate.set(model.y, y)
    zs, as_ = [], []
    for layer in model.layers:
        evaluate.set(layer.w, params[f"W{layer.index}"], dims=2)
        if layer.b is not None:
            evaluate.set(layer.b, params[f"b{layer.index}"])
        n = spec.sizes[layer.index]
        z = tuple(evaluate(layer.z_expr, j=row) for row in range(1, n + 1))
        evaluate.set(layer.z, z)
        a = tuple(evaluate(layer.a_expr, j=row) for row in range(1, n + 1))
        evaluate.set(layer.a, a)
        zs.append(z)
        as_.append(a)
    loss = evaluate(model.cost)
    deltas: dict[int, Vector] = {}
    for l in range(model.depth, 0, -1):
        formula = derivation.delta(l)
        deltas[l] = _vector(evaluate, formula, spec.sizes[l])
        evaluate.set(formula.lhs.base, deltas[l])
    weight_gradients = tuple(
        tuple(tuple(evaluate(formula.rhs, j=row, k=col)
                    for col in range(1, spec.sizes[l - 1] + 1))
              for row in range(1, spec.sizes[l] + 1))
        for l, formula in enumerate(derivation.weight_gradients, start=1))
    bias_gradients = tuple(
        None if formula is None else _vector(evaluate, formula, spec.sizes[l])
        for l, formula in enumerate(derivation.bias_gradients, start=1))
    return WorkedExample(
        x=tuple(x), y=tuple(y),
        weights=tuple(params[f"W{l}"] for l in range(1, model.depth + 1)),
        biases=tuple(params.get(f"b{l}") if model.layer(l).b is not None else None
                     for l in range(1, model.depth + 1)),
        z=tuple(zs), a=tuple(as_), loss=loss,
        delta=tuple(deltas[l] for l in range(1, model.depth + 1)),
        weight_gradients=weight_gradients, bias_gradients=bias_gradients, given=given,
    )


def _vector(evaluate: _Evaluator, formula: Formula, n: int) -> Vector:
    return tuple(evaluate(formula.rhs, j=row) for row in range(1, n + 1))
