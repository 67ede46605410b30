"""Checking what users wrote: a δ or gradient formula against the derivation of a spec.

Reads a :class:`~derive.derivation.Derivation` (like :mod:`derive.verify`) and a formula text
parsed by :mod:`derive.formula_parser` (never ``eval``/``sympify``). The formula is given its
meaning here: layers resolved (``l`` runs over every layer the left side can name), vectors and
matrices given shapes by layer (so a missing transpose is caught for every layer size), and
everything turned into a SymPy expression in index form, in the model's own indexed symbols.

Then the user's right-hand side is compared with the derived one, per layer:

1. **symbolic identity** at generic sizes: both sides with a^l written as sigma_l(z^l), sums
   collapsed and bound indices renamed canonically, then expanded (and simplified when small);
2. **numeric agreement** on a concrete copy of the network (widths capped at
   :data:`MAX_WIDTH`): every entry at N random points with 50-digit arithmetic, the user's
   quantities (a, z, delta of other layers, ...) all computed from the same random parameters,
   inputs and targets (targets summing to 1 where the loss needs it).

A mismatch gives a counterexample — the parameter and input values (two decimals, to be
reproducible by hand), the user's value and the correct one — and the derived formula printed
in the notation the user wrote. Hand-written backprop code is checked by
:mod:`derive.backward_check`; this module also holds the ``derive check`` command for both.

Python API::

    from derive.check import check_formula
    verdict = check_formula("xor", "delta^L = a^L - y")
    verdict.correct, verdict.method, verdict.counterexample
    print("\\n".join(verdict.lines()))
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import symengine as se
import sympy as sp
from sympy.printing.str import StrPrinter

from derive import functions
from derive.derivation import Derivation, Formula, activation_derivative, derive
from derive.errors import DeriveError
from derive.formula_parser import (
    Binary,
    Call,
    Const,
    FormulaError,
    Layer,
    Node,
    Num,
    ParsedFormula,
    Product,
    Ref,
    SumOver,
    Target,
    Transpose,
    Unary,
    parse_formula,
)
from derive.functions import Z, elementary
from derive.indexcalc import collapse
from derive.model import Model, build_model, j, k, quantity, size_symbol, split_name
from derive.pretty import pretty
from derive.spec import NetworkSpec, load_spec
from derive.vectorform import Inner, Mat, MatVec, Outer, Vec
from derive.verify import DIGITS, Instance, backprop_values, evaluate

#: Widths of the concrete copy the numeric check runs on.
MAX_WIDTH = 3
#: Random points of the numeric check.
POINTS = 20
#: Relative agreement required at 50 digits (as derive.verify).
TOLERANCE = 10.0 ** -(DIGITS - 10)
#: Largest integer exponent a formula may use.
MAX_EXPONENT = 64
#: Largest expansion the symbolic check attempts; a larger one is left to the numeric check.
MAX_EXPANDED_TERMS = 5000
_BITS = 200

# Placeholders for the implicit row and column index of vector-form values.
_ROW = sp.Dummy("row", integer=True, positive=True)
_COL = sp.Dummy("col", integer=True, positive=True)


class IllFormed(Exception):
    """The formula parses but has no meaning as written (shapes, index ranges): incorrect."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Counterexample:
    """Where the user's formula and the derived one disagree."""

    layer: int
    entry: tuple[int, ...]          # 1-based (j,) or (j, k)
    user_value: str
    correct_value: str
    values: tuple[tuple[str, str], ...]      # ("W^1", "[[0.37, -1.2], ...]"), ("x", ...)
    quantities: tuple[tuple[str, str], ...]  # the user's quantities at that entry


@dataclass(frozen=True)
class FormulaVerdict:
    """The outcome of checking one formula against one spec."""

    formula: str
    spec_name: str
    target: str                      # "delta^L", "dC/dw^l", ...
    layers: tuple[int, ...]          # the concrete layers checked
    correct: bool
    method: str                      # how it was established
    assumptions: tuple[str, ...]
    derived: tuple[str, ...]         # the derived formula, in the user's notation (+ Unicode)
    counterexample: Counterexample | None = None
    reason: str = ""                 # for an ill-formed formula: what is wrong with it
    max_error: float = 0.0

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
        out.append(f"{verdict}: {self.method}" if self.correct else f"{verdict}")
        for assumption in self.assumptions:
            out.append(f"  assuming {assumption}; the derivation uses it"
                       + (" and the random targets satisfy it" if "y" in assumption else ""))
        if self.reason:
            out.append(f"  {self.reason}")
        example = self.counterexample
        if example is not None:
            entry = ", ".join(map(str, example.entry))
            out.append(f"  counterexample ({self.method}) at layer {example.layer}, entry "
                       f"({entry}):")
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


# --- meaning: syntax tree to SymPy -------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    """A converted piece: ``expr`` with placeholders for its implicit indices, and its shape.

    kind "s" scalar (index form), "v" column vector over ``rows``, "r" row vector over
    ``rows``, "m" matrix ``rows`` x ``cols`` (layers).
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


_ELEMENTARY: Mapping[str, Callable[..., sp.Expr]] = {
    "exp": sp.exp, "log": sp.log, "ln": sp.log, "sqrt": sp.sqrt, "tanh": sp.tanh,
    "sinh": sp.sinh, "cosh": sp.cosh, "erf": sp.erf, "abs": sp.Abs,
    "step": lambda x: sp.Piecewise((1, x > 0), (0, True)),
}


class _Meaning:
    """Converts a parsed formula to SymPy at one concrete value of the generic layer l."""

    def __init__(self, parsed: ParsedFormula, model: Model, l_value: int | None) -> None:
        self.parsed = parsed
        self.model = model
        self.spec = model.spec
        self.depth = model.depth
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

    # -- the left side --

    def target_indices(self, target: Target, layer: int
                       ) -> list[tuple[str, int, sp.Symbol, int]]:
        """(letter, layer it ranges over, canonical symbol, position) of the left side's free
        indices; the implicit ones of the vector form are placed at the left side's start."""
        if target.kind == "dw":
            written = target.indices or (("j", target.pos), ("k", target.pos))
            if len(written) != 2:
                raise self.error("dC/dw^l takes two indices, as in dC/dw^l_jk", target.pos)
            (row, row_pos), (col, col_pos) = written
            if row == col:
                raise self.error(f"dC/dw^l_{row}{col} needs two different indices, as in "
                                 "dC/dw^l_jk", col_pos)
            return [(row, layer, j, row_pos), (col, layer - 1, k, col_pos)]
        written = target.indices or (("j", target.pos),)
        if len(written) != 1:
            raise self.error("this left side takes one index, as in delta^l_j", target.pos)
        ((letter, pos),) = written
        return [(letter, layer, j, pos)]

    # -- the right side --

    def convert(self, target: Target, layer: int) -> sp.Expr:
        """The right side in index form, free indices j (and k), at ``layer``."""
        free = self.target_indices(target, layer)
        self.scopes = [{letter: [symbol, rng, pos] for letter, rng, symbol, pos in free}]
        value = self.value(self.parsed.rhs)
        if value.kind == "s":
            return value.expr
        if target.kind == "dw":
            if value.kind == "m" and (value.rows, value.cols) == (layer, layer - 1):
                return value.expr.xreplace({_ROW: j, _COL: k})
            raise IllFormed(f"the right side is {value.describe()}; dC/dw^{layer} is an "
                            f"n_{layer} x n_{layer - 1} matrix", self.parsed.rhs.pos)
        if value.kind == "v" and value.rows == layer:
            return value.expr.xreplace({_ROW: j})
        raise IllFormed(f"the right side is {value.describe()}; the left side is a vector "
                        f"over layer {layer}", self.parsed.rhs.pos)

    def index(self, letter: str, layer: int, pos: int) -> sp.Symbol:
        for scope in reversed(self.scopes):
            if letter in scope:
                entry = scope[letter]
                if entry[1] is None:
                    entry[1], entry[2] = layer, pos
                elif entry[1] != layer:
                    raise IllFormed(
                        f"index {letter} ranges over layer {entry[1]} (n_{entry[1]} values, "
                        f"column {entry[2] + 1}) but here over layer {layer} (n_{layer} "
                        "values)", pos)
                return entry[0]
        raise IllFormed(f"index {letter} is neither on the left side nor summed over", pos)

    def value(self, node: Node) -> _Value:
        method = getattr(self, f"_{type(node).__name__}")
        return method(node)

    def _Num(self, node: Num) -> _Value:
        return _Value(sp.Rational(node.text if not node.text.endswith(".") else node.text + "0"),
                      "s")

    def _Const(self, node: Const) -> _Value:
        return _Value(sp.pi if node.name == "pi" else sp.E, "s")

    def _Ref(self, node: Ref) -> _Value:
        letter = node.letter
        if letter == "n":
            layer = self.layer(node.layer)
            if not 0 <= layer <= self.depth:
                raise self.error(f"n_{node.layer} = n_{layer}: layers are 0..{self.depth}",
                                 node.pos)
            return _Value(size_symbol(layer), "s")
        if letter == "y":
            layer, base = self.depth, quantity("y")
        else:
            layer = self.layer(node.layer)
            low = 0 if letter == "a" else 1
            if not low <= layer <= self.depth:
                name = {"delta": "delta", "w": "w"}.get(letter, letter)
                raise self.error(f"{name}^{self.layer_text(node.layer)} does not exist: this "
                                 f"network has {name}^{low}..{name}^{self.depth}", node.pos)
            if letter == "b" and self.model.layer(layer).b is None:
                raise self.error(f"layer {layer} has no bias (bias: false in the spec)",
                                 node.pos)
            base = self.model.x if (letter == "a" and layer == 0) else quantity(letter, layer)
        positions = [pos for _, pos in node.indices]
        letters = [c for c, _ in node.indices]
        if letter == "w":
            if not letters:
                return _Value(base[_ROW, _COL], "m", layer, layer - 1)
            if len(letters) != 2:
                raise self.error("w^l takes two indices (w^l_jk) or none (the matrix W^l)",
                                 node.pos)
            row = self.index(letters[0], layer, positions[0])
            col = self.index(letters[1], layer - 1, positions[1])
            return _Value(base[row, col], "s")
        if not letters:
            return _Value(base[_ROW], "v", layer)
        if len(letters) != 1:
            raise self.error(f"{letter} takes one index", node.pos)
        return _Value(base[self.index(letters[0], layer, positions[0])], "s")

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

    def elementwise(self, left: _Value, right: _Value, op: str, pos: int) -> _Value:
        if left.kind == "s" or right.kind == "s" or (left.kind, left.rows, left.cols) == (
                right.kind, right.rows, right.cols):
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
        if inner != right.rows:
            hint = ""
            if left.kind == "m" and left.rows == right.rows:
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
        if entry[1] is None:
            raise self.error(f"the summed index {node.index} does not appear in the sum",
                             node.pos)
        size = size_symbol(entry[1])
        if node.upper is not None:
            upper = self.value(node.upper)
            if upper.expr != size:
                raise IllFormed(f"sum_{node.index} runs to {upper.expr}, but {node.index} "
                                f"indexes layer {entry[1]} ({size} values)", node.upper.pos)
        return _Value(sp.Sum(body.expr, (dummy, 1, size)), "s")

    def _Call(self, node: Call) -> _Value:
        args = [self.value(arg) for arg in node.args]
        name = node.name
        if name in ("max", "min"):
            if len(args) != 2:
                raise self.error(f"{name}() takes two arguments", node.pos)
            fn = sp.Max if name == "max" else sp.Min
            shaped = self.elementwise(args[0], args[1], "+", node.pos)
            return dataclasses.replace(shaped, expr=fn(args[0].expr, args[1].expr))
        if len(args) != 1:
            raise self.error(f"{name}() takes one argument", node.pos)
        (arg,) = args
        if name in _ELEMENTARY:
            if node.prime:
                raise self.error(f"{name}' is not supported; write the derivative out",
                                 node.pos)
            return dataclasses.replace(arg, expr=_ELEMENTARY[name](arg.expr))
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

    def activation_of(self, node: Call) -> functions.Activation:
        if node.name != "sigma":
            params = {}
            for l in range(1, self.depth + 1):
                if self.spec.activation(l).name == node.name:
                    params = dict(self.spec.activation(l).params)
                    break
            return functions.resolve_activation(node.name, params)
        if node.layer is not None:
            layer = self.layer(node.layer)
            if not 1 <= layer <= self.depth:
                raise self.error(f"sigma_{layer}: layers are 1..{self.depth}", node.pos)
            return self.spec.activation(layer)
        layers = sorted({self.layer(ref.layer) for ref in _refs(node.args[0])
                         if ref.layer is not None and ref.letter in ("z", "a", "w", "b")})
        if len(layers) == 1 and 1 <= layers[0] <= self.depth:
            return self.spec.activation(layers[0])
        distinct = {self.spec.activation(l) for l in range(1, self.depth + 1)}
        if len(distinct) == 1:
            return distinct.pop()
        raise self.error("which layer's sigma? the layers have different activations; write "
                         "sigma_2(...) or apply it to z^l", node.pos)


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


def _target_layers(target: Target, meaning: _Meaning,
                   derivation: Derivation) -> list[tuple[int | None, int]]:
    """(value of l, concrete layer) for every layer the left side names."""
    depth = derivation.model.depth
    spec = derivation.model.spec
    if target.layer.base == "l":
        if target.kind == "delta":
            candidates = range(1, depth)        # BP2: the hidden layers
            if depth == 1:
                raise meaning.error("this network has no hidden layer; the output error is "
                                    "delta^L", target.pos)
        elif target.kind == "da":
            raise meaning.error("dC/da is only derived for the output layer: dC/da^L",
                                target.pos)
        else:
            candidates = range(1, depth + 1)
        pairs = [(layer - target.layer.offset, layer) for layer in candidates]
    else:
        meaning.l_value = None
        layer = meaning.layer(target.layer)
        if not 1 <= layer <= depth:
            raise meaning.error(f"layer {layer} does not exist: layers are 1..{depth}",
                                target.layer.pos)
        pairs = [(None, layer)]
    result = []
    for l_value, layer in pairs:
        if target.kind == "db" and derivation.bias_gradients[layer - 1] is None:
            continue
        if target.kind == "da" and layer != depth:
            raise meaning.error("dC/da is only derived for the output layer: dC/da^L",
                                target.pos)
        if target.kind == "sigma'":
            activation = spec.activation(layer)
            if activation.is_softmax:
                continue
            if target.activation and activation.name != target.activation:
                continue
        result.append((l_value, layer))
    if not result:
        what = {"db": "no layer has a bias (bias: false in the spec)",
                "sigma'": "no layer has that elementwise activation"}
        raise meaning.error(what.get(target.kind, "no layer matches the left side"),
                            target.pos)
    return result


def _derived_formula(target: Target, layer: int, derivation: Derivation) -> Formula:
    if target.kind == "delta":
        return derivation.delta(layer)
    if target.kind == "dw":
        return derivation.weight_gradients[layer - 1]
    if target.kind == "db":
        formula = derivation.bias_gradients[layer - 1]
        assert formula is not None
        return formula
    if target.kind == "da":
        return derivation.loss_gradient
    model = derivation.model
    derivative = activation_derivative(model.spec.activation(layer))
    z = model.layer(layer).z[j]
    sigma = sp.Function(f"sigma_{layer}")
    return Formula(f"sigma'^{layer}", "", sp.Derivative(sigma(z), z, evaluate=False),
                   derivative.in_z.subs(Z, z), derivative.in_z.subs(Z, z), (j,),
                   derivative.steps)


def _target_name(target: Target) -> str:
    layer = str(target.layer)
    return {"delta": f"delta^{layer}", "dw": f"dC/dw^{layer}", "db": f"dC/db^{layer}",
            "da": f"dC/da^{layer}", "sigma'": f"{target.activation or 'sigma'}'(z^{layer})"
            }[target.kind]


# --- comparison --------------------------------------------------------------------------


def _canonical_sums(expr: sp.Expr, depth: int = 0) -> sp.Expr:
    """Bound indices renamed by nesting depth, so that equal sums compare equal."""
    if isinstance(expr, sp.Sum):
        (var, low, high), = expr.limits
        name = sp.Symbol(f"_s{depth}", integer=True, positive=True)
        body = _canonical_sums(expr.function.xreplace({var: name}), depth + 1)
        return sp.Sum(body, (name, low, high))
    if not expr.args:
        return expr
    return expr.func(*(_canonical_sums(arg, depth) for arg in expr.args))


def _in_z(expr: sp.Expr, model: Model) -> sp.Expr:
    """a^l_x written as sigma_l(z^l_x) for every elementwise layer."""
    def rewrite(e: sp.Indexed) -> sp.Expr:
        letter, layer = split_name(str(e.base.label))
        if letter != "a" or not layer:
            return e
        activation = model.layer(layer).activation
        if activation.is_softmax:
            return e
        return activation.expr.subs(Z, model.layer(layer).z[e.indices[0]])
    return expr.replace(lambda e: isinstance(e, sp.Indexed), rewrite)


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


def symbolic_identity(user: sp.Expr, derived: sp.Expr, model: Model) -> bool:
    """True when user == derived for every layer size, with a^l = sigma_l(z^l)."""
    def prepared(expr: sp.Expr) -> sp.Expr:
        return _canonical_sums(collapse(_in_z(collapse(expr), model)))

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
    if sp.count_ops(difference) <= 80:
        try:
            return sp.simplify(elementary(difference)) == 0
        except (TypeError, ValueError, NotImplementedError):
            return False
    return False


def _decimal(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)


def _random_point(instance: Instance, rng: random.Random) -> tuple[dict, dict]:
    """Two-decimal values for every leaf (a reproducible counterexample), as MPFR numbers."""
    raw = {s: _decimal(rng, -1.5, 1.5) for s in instance.leaves}
    needs = instance.model.loss.needs
    if needs == "probability":
        raw.update({t: _decimal(rng, 0.05, 0.95) for t in instance.targets})
    elif needs == "distribution":
        n = len(instance.targets)
        cuts = sorted(rng.sample(range(1, 100), n - 1))
        shares = [b - a for a, b in zip([0, *cuts], [*cuts, 100])]
        raw.update({t: share / 100 for t, share in zip(instance.targets, shares)})
    point = {s: se.RealMPFR(repr(v), _BITS) for s, v in raw.items()}
    point.update(instance.at_zero_error)
    return point, raw


def _value_at(expr: se.Basic, point: Mapping) -> float | None:
    """``expr`` at ``point`` as a float, or None where it has no finite real value."""
    try:
        # SymEngine's real evaluation refuses complex or infinite results (1/0, log(0))
        number = complex(evaluate(expr, point))
    except (TypeError, ValueError, RuntimeError):
        return None
    if number.imag != 0 or number.real != number.real or abs(number.real) == float("inf"):
        return None
    return number.real


def _show(value: float | None) -> str:
    return "not a real number" if value is None else f"{value:.10g}"


@dataclass
class _Numeric:
    ok: bool
    max_error: float
    points: int
    counterexample: Counterexample | None


def _numeric_check(user_by_layer: Mapping[int, sp.Expr], target: Target, derivation: Derivation,
                   instance: Instance, *, points: int, seed: int) -> _Numeric:
    model = instance.model
    rng = random.Random(seed)
    worst = 0.0
    for _ in range(points):
        point, raw = _random_point(instance, rng)
        env = backprop_values(instance, derivation,
                              {q: evaluate(v, point) for q, v in instance.values.items()})
        failure: tuple[float, int, tuple[int, ...], float | None, float | None] | None = None
        for layer, user in user_by_layer.items():
            # SymEngine evaluates elementary functions only: sigmoid, softplus rewritten
            derived = _derived_formula(target, layer, derivation)
            formula = dataclasses.replace(derived, rhs=elementary(derived.rhs))
            mine = Formula(formula.key, "", formula.lhs, elementary(user), user,
                           formula.indices, ())
            for entry in _entries(formula, model, layer):
                correct = _value_at(instance.instantiate(formula, entry, env), point)
                theirs = _value_at(instance.instantiate(mine, entry, env), point)
                assert correct is not None, "the derived formula gave no real number"
                error = float("inf") if theirs is None else (
                    abs(theirs - correct) / max(1.0, abs(correct)))
                if error < TOLERANCE:
                    worst = max(worst, error)
                    continue
                if failure is None or error > failure[0]:
                    failure = (error, layer, entry, theirs, correct)
        if failure is not None:
            error, layer, entry, theirs, correct = failure
            formula = _derived_formula(target, layer, derivation)
            user = user_by_layer[layer]
            example = Counterexample(
                layer, entry, _show(theirs), _show(correct), _point_values(instance, raw),
                _quantities(instance, user, formula.indices, entry, env, point))
            return _Numeric(False, error, points, example)
    return _Numeric(True, worst, points, None)


def _entries(formula: Formula, model: Model, layer: int) -> list[tuple[int, ...]]:
    n = model.spec.sizes
    if len(formula.indices) == 2:
        return [(a, b) for a in range(1, n[layer] + 1) for b in range(1, n[layer - 1] + 1)]
    return [(a,) for a in range(1, n[layer] + 1)]


def _point_values(instance: Instance, raw: Mapping[se.Symbol, float]) -> tuple:
    """The random parameters, input and target, as matrices and vectors by layer."""
    model = instance.model
    n = model.spec.sizes
    names: dict[str, float] = {str(symbol): value for symbol, value in raw.items()}
    out: list[tuple[str, str]] = []
    for layer in model.layers:
        l = layer.index
        rows = [[names[f"w{l}_{a}_{b}"] for b in range(1, n[l - 1] + 1)]
                for a in range(1, n[l] + 1)]
        out.append((f"W^{l}", "[" + ", ".join(_vector(r) for r in rows) + "]"))
        if layer.b is not None:
            out.append((f"b^{l}", _vector([names[f"b{l}_{a}"] for a in range(1, n[l] + 1)])))
    out.append(("x", _vector([names[f"x_{a}"] for a in range(1, n[0] + 1)])))
    out.append(("y", _vector([names[f"y_{a}"] for a in range(1, n[-1] + 1)])))
    return tuple(out)


def _vector(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _quantities(instance: Instance, user: sp.Expr, indices: tuple, entry: tuple[int, ...],
                env: Mapping, point: Mapping) -> tuple[tuple[str, str], ...]:
    concrete = user.xreplace(dict(zip(indices, map(sp.Integer, entry))))
    concrete = concrete.xreplace(instance.sizes).doit()
    atoms = sorted(concrete.atoms(sp.Indexed), key=sp.default_sort_key)
    shown = []
    for atom in atoms[:8]:
        letter, _layer = split_name(str(atom.base.label))
        if letter in ("w", "b") or (letter == "a" and _layer == 0) or letter == "y":
            continue          # already listed with the point
        if atom in env:
            shown.append((pretty(atom), _show(_value_at(env[atom], point))))
    return tuple(shown)


# --- printing the derived formula in the user's notation ---------------------------------


class PlainPrinter(StrPrinter):
    """Prints derive expressions in the plain formula syntax ``derive check`` reads back."""

    printmethod = "_derive_plain"
    _default_settings: ClassVar[dict[str, Any]] = {**StrPrinter._default_settings,
                                                   "layers": {}}

    def _layer(self, layer: int | None) -> str:
        if layer is None:
            return ""
        text = self._settings["layers"].get(layer, str(layer))
        return "^" + (text if len(text) == 1 else "{" + text + "}")

    def _name(self, name: str) -> str:
        letter, layer = split_name(name)
        return letter + self._layer(layer)

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if expr.name.startswith("n_") and expr.name[2:].isdigit():
            text = self._settings["layers"].get(int(expr.name[2:]), expr.name[2:])
            return "n_" + (text if len(text) == 1 else "{" + text + "}")
        return self._name(expr.name)

    def _print_Dummy(self, expr: sp.Dummy) -> str:
        return expr.name

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        return self._name(str(expr.base.label)) + "_" + "".join(map(str, expr.indices))

    def _print_Sum(self, expr: sp.Sum) -> str:
        (index, _low, _high), = expr.limits
        body = self.parenthesize(expr.function, sp.printing.precedence.PRECEDENCE["Mul"])
        return f"sum_{index} {body}"

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

    def _print_Vec(self, expr: Vec) -> str:
        return self._name(expr.name)

    def _print_Mat(self, expr: Mat) -> str:
        _letter, layer = split_name(expr.name)
        return "W" + self._layer(layer)

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
        return text if isinstance(expr, (Vec, sp.Symbol, MatVec)) else f"({text})"


def plain(expr: sp.Expr, layers: Mapping[int, str] | None = None) -> str:
    """``expr`` in the plain formula syntax (``derive check`` parses it back)."""
    return PlainPrinter({"layers": dict(layers or {})}).doprint(expr)


def _layer_names(target: Target, layer: int, depth: int) -> dict[int, str]:
    if target.layer.base == "l":
        lv = layer - target.layer.offset
        names = {lv - 1: "l-1", lv: "l", lv + 1: "l+1"}
        if target.kind == "dw" or target.kind == "db":
            names[depth] = names.get(depth, "L")
        return names
    if target.layer.base == "L":
        return {depth: "L", depth - 1: "L-1"}
    return {}


def _derived_lines(parsed: ParsedFormula, target: Target, layer: int, formula: Formula,
                   depth: int) -> tuple[str, ...]:
    names = _layer_names(target, layer, depth)
    lhs = _target_name(target)
    if parsed.index_form or target.kind == "sigma'":
        letters = {"dw": "_jk"}.get(target.kind, "_j")
        if target.kind == "sigma'":
            z = "z" + PlainPrinter({"layers": names})._layer(layer) + "_j"
            text = f"{target.activation or 'sigma'}'({z}) = {plain(formula.rhs, names)}"
        else:
            text = f"{lhs}{letters} = {plain(formula.rhs, names)}"
    else:
        text = f"{lhs} = {plain(formula.vector, names)}"
    lines = [text, f"{pretty(formula.lhs)} = {pretty(formula.rhs)}"]
    if parsed.latex:
        from derive.latex_printer import equation

        lines.append(equation(formula.lhs, formula.rhs))
    return tuple(lines)


# --- the API -----------------------------------------------------------------------------


def capped_spec(spec: NetworkSpec, width: int = MAX_WIDTH) -> NetworkSpec:
    """``spec`` with every width (the input's too) capped at ``width``: the concrete copy the
    numeric check expands (a formula's shapes are checked by layer, for every size)."""
    if max(spec.sizes) <= width:
        return spec
    layers = tuple(dataclasses.replace(layer, size=min(layer.size, width))
                   for layer in spec.layers)
    return dataclasses.replace(spec, input=min(spec.input, width), layers=layers, example=None)


def check_formula(spec: NetworkSpec | str | Mapping, formula: str, *, points: int = POINTS,
                  seed: int = 0) -> FormulaVerdict:
    """Check ``formula`` (derive notation, plain or LaTeX) against the derivation of ``spec``.

    Raises :class:`~derive.errors.DeriveError` (a ``FormulaSyntaxError`` with the column for
    text that does not parse) when the formula cannot be checked; returns a verdict otherwise.
    """
    spec = load_spec(spec)
    parsed = parse_formula(formula)
    if points < 1:
        raise DeriveError("points must be at least 1")
    derivation = derive(build_model(spec))
    model = derivation.model
    target = parsed.target
    meaning = _Meaning(parsed, model, None)
    pairs = _target_layers(target, meaning, derivation)
    concrete = [layer for _, layer in pairs]
    name = _target_name(target)
    formulas = {layer: _derived_formula(target, layer, derivation) for layer in concrete}
    assumptions = tuple(dict.fromkeys(a for f in formulas.values() for a in f.assumptions))
    user: dict[int, sp.Expr] = {}
    for l_value, layer in pairs:
        meaning.l_value = l_value
        try:
            user[layer] = meaning.convert(target, layer)
        except IllFormed as err:
            return FormulaVerdict(
                formula, spec.name, name, tuple(concrete), False, "ill-formed", assumptions,
                _derived_lines(parsed, target, layer, formulas[layer], model.depth),
                reason=f"ill-formed at column {err.pos + 1}: {err.message}")

    symbolic = all(symbolic_identity(user[layer], formulas[layer].rhs, model)
                   for layer in concrete)
    small = capped_spec(spec, MAX_WIDTH)
    small_derivation = derive(build_model(small)) if small != spec else derivation
    instance = Instance(small_derivation.model)
    numeric = _numeric_check(user, target, small_derivation, instance, points=points,
                             seed=seed)
    shape = "-".join(map(str, small.sizes))
    where = (f"the {shape} network" if small.sizes == spec.sizes else
             f"a {shape} copy of the {'-'.join(map(str, spec.sizes))} network")
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
        _derived_lines(parsed, target, failing, formulas[failing], model.depth),
        numeric.counterexample, max_error=numeric.max_error)


# --- the command -------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive check`` to the CLI."""
    parser = commands.add_parser(
        "check", help="check a user's formula or hand-written backprop against the derivation",
        description=(
            "Check a delta or gradient formula written in derive notation (plain or LaTeX), "
            "or a hand-written backprop function (--backward FILE:FUNCTION), against the "
            "derivation of SPEC. Exit code 0 correct, 1 incorrect, 2 unparsable or bad "
            "input."),
        epilog=(
            "formula examples:\n"
            "  derive check xor \"delta^L = (a^L - y) * a^L * (1 - a^L)\"\n"
            "  derive check xor \"delta^l_j = sum_k w^{l+1}_kj delta^{l+1}_k sigma'(z^l_j)\"\n"
            "  derive check bce \"dC/dw^l_jk = delta^l_j a^{l-1}_k\"\n"
            "  derive check xor '\\delta^L_j = (a^L_j - y_j)\\sigma'\"'\"'(z^L_j)'\n"
            "backprop code:\n"
            "  derive check net.yaml --backward my_backprop.py:backward\n"
            "  derive check net.yaml --backward tutorial.py:backward --weights in-out \\\n"
            "      --reduction sum --no-bias --arg a3=A2 --global a2=A1"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC",
                        help="a spec file (.yaml, .yml, .json) or a built-in example name")
    parser.add_argument("formula", metavar="FORMULA", nargs="?",
                        help="LHS = RHS, e.g. \"delta^L = a^L - y\"")
    parser.add_argument("--points", type=int, default=POINTS,
                        help=f"random points of the numeric check (default {POINTS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random points")
    from derive.backward_check import add_arguments

    add_arguments(parser)
    parser.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace, echo: Callable[[str], None]) -> int:
    if args.backward:
        if args.formula:
            raise DeriveError("give either a FORMULA or --backward FILE:FUNCTION, not both")
        from derive.backward_check import run_from_args

        return run_from_args(args, echo)
    if not args.formula:
        raise DeriveError("derive check: give a FORMULA (\"delta^L = a^L - y\") or "
                          "--backward FILE:FUNCTION (see derive check --help)")
    verdict = check_formula(args.spec, args.formula, points=args.points, seed=args.seed)
    for line in verdict.lines():
        echo(line)
    return verdict.exit_code
